//! The node agent's socket: weft-cni's requests, the agent's replies, the published state (`node_agent::fuzzing::request`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_node_agent::fuzzing::request(data));
