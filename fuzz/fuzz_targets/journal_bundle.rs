#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| weilan_fuzz::journal_bundle::run(data));
