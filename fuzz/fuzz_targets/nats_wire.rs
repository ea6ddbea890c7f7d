#![no_main]

// The harness lives in this package's library, where `cargo test` replays fuzz/seeds/nats_wire/ through it.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _outcome = botd_fuzz::nats_wire(data);
});
