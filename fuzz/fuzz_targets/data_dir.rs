#![no_main]

// The harness lives in the library, where `cargo test` replays fuzz/seeds/data_dir/ through it.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _outcome = botd_relay::fuzzing::data_dir(data);
});
