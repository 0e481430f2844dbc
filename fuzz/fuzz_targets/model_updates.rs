//! The controller's updates applied to a proxy's model (`api::fuzzing::updates`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_api::fuzzing::updates(data));
