//! weft-cni's `CNI_*` environment, `CNI_ARGS` and stdin (`weft_cni::fuzzing::invocation`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_cni::fuzzing::invocation(data));
