#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mpp_fuzz::gcm_checks::aes_gcm_diff(data));
