//! The controller's gRPC requests: Hello, acknowledgements, certificate requests (`controller::fuzzing::request`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| controller::fuzzing::request(data));
