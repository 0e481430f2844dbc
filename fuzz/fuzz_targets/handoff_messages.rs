//! The handoff socket's messages, both ends (`runtime::fuzzing::handoff`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_runtime::fuzzing::handoff(data));
