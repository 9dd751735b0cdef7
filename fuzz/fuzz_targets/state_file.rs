#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mpp_fuzz::checks::state_file(data));
