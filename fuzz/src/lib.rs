//! Fuzzing harnesses: one function per decoder that sees untrusted bytes, each taking the raw
//! bytes of one fuzz input. The libFuzzer targets in `fuzz_targets/` only call these, and
//! `tests/seeds.rs` replays the committed seeds (`fuzz/seeds/<target>/`) through the same
//! functions on stable, so a finding becomes a regression test by adding its input as a seed.
//!
//! A harness panics only when the code under test breaks a rule: a panic inside the relay's
//! code, an answer that is missing or carries the wrong id, a decoder that disagrees with the
//! reference it is checked against, a recovery that ends in anything but `Ok` or a
//! [`StorageError`](botd_relay::store::embedded::StorageError) naming file and offset. Every harness
//! bounds its own work (input size, loop counts), so a slow input means slow code.
//!
//! Each harness returns its [`Outcome`]: what it made of the input in a few stable words, so
//! that the corpus test can check that a seed reaches what it was made for (a valid `Init` is
//! accepted, a torn journal tail is cut back) rather than only that it does not panic.
//!
//! [`seeds`] builds the seed inputs (valid and near-valid ones per target).

mod input;
mod nats;
mod relay;
pub mod seeds;
mod storage;
mod transport;

pub use nats::nats_wire;
pub use relay::relay_requests;
pub use storage::{data_dir, journal_segment, snapshot_file};
pub use transport::{frame_codec, handshake_ack, handshake_init, sealed_open, session_plaintext};

/// What a harness made of one input, in a few words that do not change from run to run
/// ("2 frames, Clean", "refused: wrong_recipient", "recovered: …").
pub type Outcome = String;

/// A harness: the raw bytes of one fuzz input in, its outcome out.
pub type Harness = fn(&[u8]) -> Outcome;

/// Every target: its name (the `fuzz/fuzz_targets/<name>.rs` file and seed directory) and its
/// harness.
pub const TARGETS: &[(&str, Harness)] = &[
    ("frame_codec", frame_codec),
    ("handshake_init", handshake_init),
    ("handshake_ack", handshake_ack),
    ("sealed_open", sealed_open),
    ("session_plaintext", session_plaintext),
    ("relay_requests", relay_requests),
    ("journal_segment", journal_segment),
    ("snapshot_file", snapshot_file),
    ("data_dir", data_dir),
    ("nats_wire", nats_wire),
];

/// The harness of target `name`.
pub fn harness(name: &str) -> Option<Harness> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// True when `BOTD_FUZZ_TRACE` is set: harnesses then print what they do (to read a crash).
fn tracing_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var_os("BOTD_FUZZ_TRACE").is_some())
}

/// The first `max` bytes of `data`: harnesses bound their work by bounding their input.
fn cap(data: &[u8], max: usize) -> &[u8] {
    &data[..data.len().min(max)]
}
