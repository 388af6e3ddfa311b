#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sanjevani::fuzzing::ws_frames(data));
