#![no_main]

// The harness lives in the library, where `cargo test` replays fuzz/seeds/frame_codec/ through it.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _outcome = botd_relay::fuzzing::frame_codec(data);
});
