//! Fuzzes the waypoint's own request parsing: route matching on hostile paths, headers
//! and query strings, redirect and rewrite building, and `traceparent`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| waypoint::fuzzing::request(data));
