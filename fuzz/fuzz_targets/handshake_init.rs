#![no_main]

// The harness lives in this package's library, where `cargo test` replays fuzz/seeds/handshake_init/ through it.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _outcome = botd_fuzz::handshake_init(data);
});
