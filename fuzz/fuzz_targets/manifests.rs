//! Manifest files read and translated by the controller (`controller::fuzzing::manifests`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| controller::fuzzing::manifests(data));
