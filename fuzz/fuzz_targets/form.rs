#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sanjevani::fuzzing::form(data));
