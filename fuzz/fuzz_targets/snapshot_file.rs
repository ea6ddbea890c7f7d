#![no_main]

// The harness lives in the library, where `cargo test` replays fuzz/seeds/snapshot_file/ through it.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _outcome = botd_relay::fuzzing::snapshot_file(data);
});
