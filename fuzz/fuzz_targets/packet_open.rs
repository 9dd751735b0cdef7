#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mpp_fuzz::checks::packet_open(data));
