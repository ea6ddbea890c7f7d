//! The committed fuzz seeds (`fuzz/seeds/<target>/`) replayed through the same harnesses the
//! libFuzzer targets in `fuzz_targets/` call, on stable: a seed that panics fails the test, and so does
//! a target whose seed directory is missing or empty. Seeds made to reach a given state must
//! also reach it ([`EXPECTED`]): a harness returns what it made of its input. Findings become
//! regression tests by adding their input there (README, "Fuzzing").
//!
//! `cargo test -p botd-fuzz --test seeds -- --ignored write_seeds` (re)writes the generated seeds
//! (`botd_fuzz::seeds`); files with other names, such as regression inputs, are kept.
//! `-- --nocapture` prints every seed's outcome.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use botd_fuzz::{seeds::seeds, TARGETS};

/// Seeds whose outcome is part of the point of the seed: (target, seed file, outcome). The
/// relay's seeds are not here: rate limits and expiry follow the wall clock.
const EXPECTED: &[(&str, &str, &str)] = &[
    ("frame_codec", "init-then-session-frame", "2 frames, Clean"),
    (
        "frame_codec",
        "many-frames-byte-by-byte",
        "12 frames, Clean",
    ),
    ("frame_codec", "empty-frame", "0 frames, Empty"),
    (
        "frame_codec",
        "huge-length",
        "0 frames, TooLong { len: 4294967295, max: 1024 }",
    ),
    (
        "frame_codec",
        "truncated",
        "1 frames, Truncated { buffered: 7 }",
    ),
    (
        "frame_codec",
        "over-the-later-limit",
        "1 frames, TooLong { len: 300, max: 256 }",
    ),
    ("handshake_init", "valid", "accepted, the initiator agrees"),
    ("handshake_init", "valid-with-unknown-field", "accepted"),
    ("handshake_init", "signed-by-another-sender", "accepted"),
    (
        "handshake_init",
        "wrong-recipient",
        "refused: wrong_recipient",
    ),
    ("handshake_init", "high-s", "refused: high_s"),
    ("handshake_init", "empty-id", "refused: bad_field"),
    ("handshake_init", "garbage", "refused: decode"),
    ("handshake_ack", "valid", "accepted, the responder agrees"),
    (
        "handshake_ack",
        "other-init-id",
        "refused: init_id_mismatch",
    ),
    ("handshake_ack", "garbage", "refused: decode"),
    (
        "sealed_open",
        "valid-frames-all-three",
        "opener took 2; relay took 3, open; node took 2, open",
    ),
    (
        "sealed_open",
        "flipped-bit",
        "opener took 0; relay took 0, closed (bad_tag); node took 0, open",
    ),
    (
        "sealed_open",
        "replayed",
        "opener took 1; relay took 0, open; node took 0, open",
    ),
    (
        "session_plaintext",
        "no-welcome",
        "closed at step 1, welcomed: false",
    ),
    (
        "session_plaintext",
        "key-rotation",
        "1101 steps, open, welcomed: true",
    ),
    (
        "session_plaintext",
        "raw-round-trips",
        "4 steps, open, welcomed: false",
    ),
    (
        "journal_segment",
        "events-v2",
        "17 records, 16 events applied, end",
    ),
    (
        "journal_segment",
        "events-v1-four-shards",
        "17 records, 16 events applied, end",
    ),
    (
        "journal_segment",
        "whole-file",
        "17 records, 16 events applied, end",
    ),
    ("snapshot_file", "events", "loaded 16 events"),
    (
        "journal_segment",
        "torn-last-record",
        "16 records, 15 events applied, Truncated at 2046",
    ),
    (
        "journal_segment",
        "zero-tail",
        "17 records, 16 events applied, ZeroTail at 2105",
    ),
    (
        "journal_segment",
        "overflowing-id",
        "3 records, 1 events applied, end",
    ),
    ("snapshot_file", "written-by-the-store", "loaded 8 events"),
    (
        "snapshot_file",
        "miscounted",
        "refused: snapshot-00000000000000000001.snap at 351: trailer counts 2 events, file has 1",
    ),
    (
        "data_dir",
        "snapshot-then-journal",
        "recovered: a snapshot of 6 events, 1 segments, 10 records replayed, 0 skipped, \
         no torn tail, next lsn 17",
    ),
    (
        "data_dir",
        "torn-tail-in-last-segment",
        "recovered: no snapshot, 2 segments, 15 records replayed, 0 skipped, 56 bytes cut, \
         next lsn 16",
    ),
    (
        "data_dir",
        "left-by-a-relay",
        "recovered: a snapshot of 4 events, 1 segments, 3 records replayed, 0 skipped, \
         no torn tail, next lsn 6",
    ),
    (
        "data_dir",
        "corrupt-earlier-segment",
        "refused: journal-00000000000000000001.log at 441: record body checksum mismatch \
         before the last journal segment",
    ),
    (
        "data_dir",
        "empty-segments-at-the-end",
        "recovered: no snapshot, 3 segments, 6 records replayed, 0 skipped, no torn tail, \
         next lsn 7",
    ),
    (
        "data_dir",
        "segment-named-after-later-records",
        "refused: journal-00000000000000000020.log at 56: lsn 7 is below the segment's first \
         lsn 20",
    ),
    (
        "data_dir",
        "regression-second-start-new-segment-exists",
        "refused: journal-00000000000000000263.log at 56: lsn 7 is below the segment's first \
         lsn 263",
    ),
    (
        "nats_wire",
        "handshake",
        "INFO, +OK, PONG; waiting with 0 bytes",
    ),
    (
        "nats_wire",
        "republished-and-replies",
        "HMSG 5 B seq 42, MSG 3 B, PING, HMSG 0 B status 404, HMSG 6 B; waiting with 0 bytes",
    ),
    (
        "nats_wire",
        "status-lines",
        "HMSG 0 B, HMSG 0 B status 404, HMSG 0 B status 408, HMSG 0 B status 503; \
         waiting with 0 bytes",
    ),
    (
        "nats_wire",
        "lower-case-and-tabs",
        "MSG 3 B, HMSG 1 B seq 9, INFO, -ERR \"unquoted\"; waiting with 0 bytes",
    ),
    (
        "nats_wire",
        "header-length-one-over",
        "HMSG 4 B seq 42; waiting with 0 bytes",
    ),
    (
        "nats_wire",
        "header-length-over-total",
        "refused at 0: malformed HMSG line",
    ),
    (
        "nats_wire",
        "message-over-the-limit",
        "refused at 0: message of 17 bytes is larger than the limit of 16",
    ),
    (
        "nats_wire",
        "total-one-short",
        "refused at 0: malformed MSG line",
    ),
    (
        "nats_wire",
        "total-one-over-at-the-end",
        "PING; waiting with 30 bytes",
    ),
    (
        "nats_wire",
        "missing-line-end",
        "PING; waiting with 8 bytes",
    ),
    (
        "nats_wire",
        "unknown-after-err",
        "-ERR \"Stale Connection\"; refused at 25: unknown operation \"HPUB\"",
    ),
    (
        "nats_wire",
        "info-at-the-line-limit-cut-before-lf",
        "INFO, PING; waiting with 0 bytes",
    ),
    (
        "nats_wire",
        "line-a-byte-over-the-limit",
        "refused at 0: protocol line longer than 65536 bytes",
    ),
    (
        "nats_wire",
        "regression-line-at-the-limit-before-its-lf",
        "waiting with 65537 bytes",
    ),
    (
        "nats_wire",
        "regression-refused-a-byte-over-the-line-limit",
        "MSG 0 B, PONG; refused at 35: protocol line longer than 65536 bytes",
    ),
];

fn seed_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds")
}

/// The files of `dir`, sorted by name.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    found.sort();
    found
}

/// Every committed seed of every target through its harness: (target, seed file) → outcome.
fn replay_all() -> BTreeMap<(String, String), String> {
    let root = seed_dir();
    let mut failures = Vec::new();
    let mut outcomes = BTreeMap::new();
    for (target, harness) in TARGETS {
        let dir = root.join(target);
        let seeds = files(&dir);
        assert!(
            seeds.len() >= 3,
            "{} holds {} seeds; every target needs a few",
            dir.display(),
            seeds.len()
        );
        for path in seeds {
            let data = std::fs::read(&path).expect("a seed file");
            let name = path
                .file_name()
                .expect("a file name")
                .to_string_lossy()
                .into_owned();
            match catch_unwind(AssertUnwindSafe(|| harness(&data))) {
                Ok(outcome) => {
                    eprintln!("{target}/{name}: {outcome}");
                    outcomes.insert((target.to_string(), name), outcome);
                }
                Err(_) => failures.push(path.display().to_string()),
            }
        }
    }
    assert!(failures.is_empty(), "seeds that panic: {failures:#?}");
    outcomes
}

#[test]
fn every_committed_seed_passes_its_harness() {
    let outcomes = replay_all();
    let mut wrong = Vec::new();
    for (target, seed, expected) in EXPECTED {
        match outcomes.get(&(target.to_string(), seed.to_string())) {
            None => wrong.push(format!("{target}/{seed}: missing")),
            Some(outcome) if outcome != expected => wrong.push(format!(
                "{target}/{seed}: {outcome:?}, expected {expected:?}"
            )),
            Some(_) => {}
        }
    }
    assert!(wrong.is_empty(), "seeds with another outcome: {wrong:#?}");
    eprintln!("{} seeds replayed", outcomes.len());
}

#[test]
fn every_seed_directory_belongs_to_a_target() {
    for dir in std::fs::read_dir(seed_dir()).expect("fuzz/seeds") {
        let name = dir.expect("an entry").file_name();
        let name = name.to_string_lossy();
        assert!(
            TARGETS.iter().any(|(target, _)| *target == name),
            "fuzz/seeds/{name} is not a target"
        );
    }
}

/// The committed seeds are the generator's, byte for byte: the generator is deterministic and
/// nobody forgot to rewrite the seeds after changing it.
#[test]
fn committed_seeds_match_the_generator() {
    let root = seed_dir();
    let mut stale = Vec::new();
    for seed in seeds() {
        let path = root.join(seed.target).join(seed.name);
        match std::fs::read(&path) {
            Ok(bytes) if bytes == seed.data => {}
            Ok(_) => stale.push(format!("{}: differs", path.display())),
            Err(err) => stale.push(format!("{}: {err}", path.display())),
        }
    }
    assert!(
        stale.is_empty(),
        "rewrite the seeds (`cargo test -p botd-fuzz --test seeds -- --ignored write_seeds`): {stale:#?}"
    );
}

/// Writes the generated seeds to `fuzz/seeds/<target>/<name>`.
#[test]
#[ignore = "writes files; run by hand to regenerate the seeds"]
fn write_seeds() {
    let root = seed_dir();
    for seed in seeds() {
        let dir = root.join(seed.target);
        std::fs::create_dir_all(&dir).expect("a seed directory");
        std::fs::write(dir.join(seed.name), &seed.data).expect("a seed file");
    }
}
