//! Fuzzes HBONE CONNECT checking: method, authority and `forwarded` header parsing.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_tunnel::testing::fuzz_connect(data));
