//! Durability of the embedded store: recovery after a torn journal write at every byte of its
//! last records, a power cut inside a group-commit write, snapshots taken while the store
//! changes, corruption and overflowing values reported with file and offset, and the data
//! directory lock.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use botd_protocol::keys::{sha256, KeyPair};
use botd_protocol::proto::{self, Accept, PreKey};
use botd_relay::config::{Config, FsyncPolicy};
use botd_relay::store::embedded::journal::{JOURNAL_MAGIC, READABLE_VERSIONS};
use botd_relay::store::embedded::record::{Next, RecordReader};
use botd_relay::store::embedded::recovery;
use botd_relay::store::embedded::{EmbeddedStore, State, StorageError};
use botd_relay::store::{Identity, MailboxId, NewMessage, Registration};
use bytes::Bytes;
use common::{wait_durable, TempDir};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn config(dir: &Path) -> Config {
    Config {
        data_dir: dir.to_owned(),
        fsync: FsyncPolicy::Never,
        store_shards: 8,
        ..Config::default()
    }
}

fn open(config: &Config) -> Result<(EmbeddedStore, recovery::RecoveryReport), StorageError> {
    EmbeddedStore::open(config, 1)
}

fn shutdown(store: &EmbeddedStore) {
    store.journal().unwrap().shutdown();
}

fn empty_state(config: &Config) -> State {
    State::new(config, None)
}

fn identities(n: usize) -> Vec<Identity> {
    (0..n)
        .map(|_| *KeyPair::generate().public().as_bytes())
        .collect()
}

fn prekeys(rng: &mut StdRng, n: u32) -> Vec<PreKey> {
    (0..n)
        .map(|_| PreKey {
            id: rng.gen(),
            public_key: Bytes::from(vec![rng.gen::<u8>(); 33]),
        })
        .collect()
}

/// One random request through the store's state; refusals are part of the game.
fn random_op(state: &State, rng: &mut StdRng, ids: &[Identity], now_ms: u64) {
    let me = ids[rng.gen_range(0..ids.len())];
    let other = ids[rng.gen_range(0..ids.len())];
    let device = rng.gen_range(1..=2);
    let mailbox = MailboxId {
        identity: me,
        device,
    };
    let _ = match rng.gen_range(0..100) {
        0..=14 => {
            let count = rng.gen_range(0..4);
            let registration = Registration {
                device,
                registration_id: rng.gen(),
                identity_key: Bytes::from(vec![7; 33]),
                signed_prekey: proto::SignedPreKey {
                    id: 1,
                    public_key: Bytes::from(vec![8; 33]),
                    signature: Bytes::from(vec![9; 64]),
                },
                one_time_prekeys: prekeys(rng, count),
            };
            state.register(&me, registration, now_ms).map(drop)
        }
        15..=19 => {
            let count = rng.gen_range(1..3);
            state
                .upload_prekeys(&me, device, None, prekeys(rng, count))
                .map(drop)
        }
        20..=27 => state.fetch_prekeys(&other, &[], |_| true).map(drop),
        28..=64 => {
            let payload = Bytes::from(
                (0..rng.gen_range(0..64))
                    .map(|_| rng.gen())
                    .collect::<Vec<u8>>(),
            );
            state
                .append(NewMessage {
                    to: MailboxId {
                        identity: other,
                        device,
                    },
                    sender: me,
                    sender_device: rng.gen_range(1..=2),
                    nonce: rng.gen(),
                    payload_hash: sha256(&[&payload]),
                    signature: [1; 64],
                    payload,
                    ticket: None,
                    received_at_ms: now_ms,
                    bad_signature: None,
                })
                .map(drop)
        }
        65..=79 => {
            let acked: Vec<u64> = (0..rng.gen_range(1..4))
                .map(|_| rng.gen_range(1..20))
                .collect();
            state.ack(&mailbox, &acked).map(drop)
        }
        80..=84 => {
            let accept = if rng.gen() {
                Accept::Open
            } else {
                Accept::ContactsOnly
            };
            state.set_policy(&me, accept).map(drop)
        }
        85..=89 => state.add_contact(&me, other).map(drop),
        90..=92 => state.remove_contact(&me, other).map(drop),
        93..=96 => state
            .create_ticket(&me, rng.gen(), now_ms + rng.gen_range(1..100), 2, now_ms)
            .map(drop),
        97 => state.unregister(&me, device).map(drop),
        _ => {
            state.expire(now_ms.saturating_sub(rng.gen_range(0..50)), 0);
            Ok(())
        }
    };
}

/// A record of a journal segment: where it starts and ends, and whether it is an event (not a
/// batch marker).
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
    event: bool,
}

fn record_spans(path: &Path) -> Vec<Span> {
    let data = std::fs::read(path).unwrap();
    let mut reader =
        RecordReader::new(path, &data, JOURNAL_MAGIC, READABLE_VERSIONS, "journal").unwrap();
    let mut spans = Vec::new();
    loop {
        match reader.next_record() {
            Next::Record { offset, body } => {
                let start = offset as usize;
                let event = body[..8] != [0; 8];
                spans.push(Span {
                    start,
                    end: start + 12 + body.len(),
                    event,
                });
            }
            Next::End => return spans,
            Next::Damaged { offset, damage } => {
                panic!("a complete journal has no damage ({damage:?} at {offset})")
            }
        }
    }
}

fn only_segment(data_dir: &Path) -> PathBuf {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(data_dir.join("journal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segments.sort();
    assert_eq!(segments.len(), 1, "{segments:?}");
    segments.pop().unwrap()
}

/// The state after the first `events` journal events, replayed into an empty state.
fn state_after(config: &Config, segment: &Path, events: usize) -> Vec<Vec<u8>> {
    use prost::Message;
    let data = std::fs::read(segment).unwrap();
    let mut reader =
        RecordReader::new(segment, &data, JOURNAL_MAGIC, READABLE_VERSIONS, "journal").unwrap();
    let state = empty_state(config);
    let mut replayed = 0;
    while replayed < events {
        let Next::Record { body, .. } = reader.next_record() else {
            panic!("too few records")
        };
        if body[..8] == [0; 8] {
            continue;
        }
        state
            .replay(&botd_relay::store::proto::Event::decode(&body[8..]).unwrap())
            .unwrap();
        replayed += 1;
    }
    state.canonical_state()
}

/// Runs `steps` random operations on a fresh durable store, in two writes of the journal at
/// least, and shuts its journal down.
fn populate(config: &Config, seed: u64, ids: &[Identity], steps: u64) -> Vec<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (store, _) = open(config).unwrap();
    for step in 0..steps {
        random_op(store.state(), &mut rng, ids, 1_000 + step);
        if step == steps / 2 {
            let journal = store.journal().unwrap();
            wait_durable(journal, journal.last_lsn());
        }
    }
    shutdown(&store);
    store.canonical_state()
}

#[test]
fn a_journal_cut_at_any_byte_of_its_last_records_recovers_the_last_complete_record() {
    for seed in [1u64, 2, 3] {
        let dir = TempDir::new("cut");
        let config = config(dir.path());
        let ids = identities(4);
        populate(&config, seed, &ids, 150);
        let segment = only_segment(dir.path());
        let spans = record_spans(&segment);
        let events: Vec<&Span> = spans.iter().filter(|s| s.event).collect();
        assert!(
            events.len() > 20,
            "seed {seed}: only {} events",
            events.len()
        );
        let full = std::fs::read(&segment).unwrap();
        let last = 4.min(events.len());
        let first_cut = events[events.len() - last].start;
        let expected: Vec<Vec<Vec<u8>>> = (events.len() - last..=events.len())
            .map(|k| state_after(&config, &segment, k))
            .collect();
        let mut cuts = 0;
        for cut in first_cut..=full.len() {
            std::fs::write(&segment, &full[..cut]).unwrap();
            let state = empty_state(&config);
            let report = recovery::recover(dir.path(), &state, true).unwrap();
            let complete = events.iter().filter(|s| s.end <= cut).count();
            let boundary = spans.iter().any(|s| s.end == cut) || cut == first_cut;
            assert_eq!(
                report.torn_tail.is_some(),
                !boundary,
                "seed {seed} cut {cut}"
            );
            assert_eq!(
                state.canonical_state(),
                expected[complete - (events.len() - last)],
                "seed {seed}: cut at byte {cut} must recover exactly {complete} events"
            );
            // The torn bytes were cut off the file.
            let repaired = std::fs::metadata(&segment).unwrap().len() as usize;
            let keep = spans
                .iter()
                .map(|s| s.end)
                .filter(|end| *end <= cut)
                .max()
                .unwrap_or(12);
            assert_eq!(repaired, keep, "seed {seed} cut {cut}");
            cuts += 1;
        }
        assert_eq!(cuts, full.len() - first_cut + 1);
    }
}

/// A power cut during the last group-commit write: pages of it lost, others written. Under
/// `always`, everything before that write was fsynced, so the damage is a torn tail however
/// many records it spans; the same damage in an earlier write is corruption.
#[test]
fn a_power_cut_inside_the_last_group_commit_write_is_a_torn_tail_of_several_records() {
    let dir = TempDir::new("power-cut");
    let mut config = config(dir.path());
    config.fsync = FsyncPolicy::Always;
    let ids = identities(4);
    // One write of many records: the writer is busy with the first fsync while these pile up.
    {
        let (store, _) = open(&config).unwrap();
        let mut rng = StdRng::seed_from_u64(31);
        for step in 0..40 {
            random_op(store.state(), &mut rng, &ids, step);
        }
        shutdown(&store);
    }
    let segment = only_segment(dir.path());
    let spans = record_spans(&segment);
    let markers: Vec<usize> = spans
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.event)
        .map(|(i, _)| i)
        .collect();
    let last_marker = *markers.last().unwrap();
    let tail: Vec<Span> = spans[last_marker + 1..].to_vec();
    assert!(
        tail.len() >= 3,
        "the last write holds {} records",
        tail.len()
    );
    let full = std::fs::read(&segment).unwrap();
    // Zero the second record of the last write; the records after it stay intact.
    let hole = tail[1];
    let mut damaged = full.clone();
    damaged[hole.start..hole.end].fill(0);
    std::fs::write(&segment, &damaged).unwrap();
    let kept_events = spans[..last_marker + 2].iter().filter(|s| s.event).count();
    let state = empty_state(&config);
    let report = recovery::recover(dir.path(), &state, true).unwrap();
    let (_, offset, cut_bytes) = report.torn_tail.clone().expect("a torn tail");
    assert_eq!(offset as usize, hole.start);
    assert_eq!(cut_bytes as usize, full.len() - hole.start);
    assert_eq!(
        state.canonical_state(),
        state_after(&config, &segment, kept_events)
    );
    assert_eq!(
        std::fs::metadata(&segment).unwrap().len() as usize,
        hole.start
    );

    // The same hole in a write that was followed by an fsync is corruption.
    if markers.len() >= 2 {
        let earlier = spans[markers[markers.len() - 2] + 1];
        let mut damaged = full.clone();
        damaged[earlier.start..earlier.end].fill(0);
        std::fs::write(&segment, &damaged).unwrap();
        expect_corrupt(open(&config).map(drop), &segment, earlier.start as u64);
    }
}

#[test]
fn recovery_after_a_torn_write_continues_the_journal() {
    let dir = TempDir::new("continue");
    let config = config(dir.path());
    let ids = identities(3);
    populate(&config, 9, &ids, 40);
    let segment = only_segment(dir.path());
    let len = std::fs::metadata(&segment).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    let expected = {
        let (store, report) = open(&config).unwrap();
        assert!(report.torn_tail.is_some());
        let mut rng = StdRng::seed_from_u64(10);
        for step in 0..40 {
            random_op(store.state(), &mut rng, &ids, 100 + step);
        }
        shutdown(&store);
        store.canonical_state()
    };
    let (again, report) = open(&config).unwrap();
    assert!(report.torn_tail.is_none());
    assert_eq!(again.canonical_state(), expected);
    shutdown(&again);
}

#[test]
fn snapshots_taken_while_the_store_changes_recover_exactly() {
    let dir = TempDir::new("concurrent");
    let mut config = config(dir.path());
    config.fsync = FsyncPolicy::Always;
    let ids = Arc::new(identities(6));
    let expected = {
        let (store, _) = open(&config).unwrap();
        let writers: Vec<_> = (0..2u64)
            .map(|t| {
                let (store, ids) = (store.clone(), ids.clone());
                std::thread::spawn(move || {
                    let mut rng = StdRng::seed_from_u64(100 + t);
                    for step in 0..1500 {
                        random_op(store.state(), &mut rng, &ids, 10_000 + step);
                    }
                })
            })
            .collect();
        let mut snapshots = 0;
        while writers.iter().any(|w| !w.is_finished()) && snapshots < 50 {
            store.snapshot(20_000).unwrap();
            snapshots += 1;
        }
        for writer in writers {
            writer.join().unwrap();
        }
        assert!(snapshots >= 1);
        // A crash: no final snapshot, only what the journal holds.
        shutdown(&store);
        store.canonical_state()
    };
    let (reopened, report) = open(&config).unwrap();
    assert!(report.snapshot.is_some());
    assert_eq!(reopened.canonical_state(), expected);
    shutdown(&reopened);
}

#[test]
fn a_different_shard_count_recovers_the_same_state() {
    let dir = TempDir::new("reshard");
    let config = config(dir.path());
    let ids = identities(5);
    let mut rng = StdRng::seed_from_u64(5);
    let expected = {
        let (store, _) = open(&config).unwrap();
        for step in 0..200 {
            random_op(store.state(), &mut rng, &ids, step);
            if step == 100 {
                store.snapshot(150).unwrap();
            }
        }
        shutdown(&store);
        store.canonical_state()
    };
    let mut more_shards = config.clone();
    more_shards.store_shards = 32;
    let (reopened, _) = open(&more_shards).unwrap();
    assert_eq!(reopened.canonical_state(), expected);
    shutdown(&reopened);
}

fn expect_corrupt(result: Result<(), StorageError>, file: &Path, offset: u64) {
    match result {
        Err(err @ StorageError::Corrupt { .. }) => {
            let text = err.to_string();
            assert!(text.contains(&file.display().to_string()), "{text}");
            assert!(text.contains(&format!("offset {offset}")), "{text}");
        }
        Err(other) => panic!("expected a corruption error, got {other}"),
        Ok(()) => panic!("corrupt file accepted"),
    }
}

#[test]
fn a_flipped_byte_in_a_middle_journal_record_stops_the_start() {
    let dir = TempDir::new("corrupt-journal");
    let config = config(dir.path());
    let ids = identities(3);
    populate(&config, 11, &ids, 60);
    let segment = only_segment(dir.path());
    let spans = record_spans(&segment);
    // An event of a write that is not the last one: no crash can have damaged it.
    let last_marker = spans.iter().rposition(|s| !s.event).unwrap();
    let candidates: Vec<&Span> = spans[..last_marker].iter().filter(|s| s.event).collect();
    let target = candidates[candidates.len() / 2];
    let mut data = std::fs::read(&segment).unwrap();
    data[(target.start + target.end) / 2] ^= 0x10;
    std::fs::write(&segment, &data).unwrap();
    expect_corrupt(open(&config).map(drop), &segment, target.start as u64);
    // check reports the same without changing anything.
    let err = EmbeddedStore::check(dir.path()).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("offset {}", target.start)),
        "{err}"
    );
    assert_eq!(std::fs::read(&segment).unwrap(), data);
}

#[test]
fn a_flipped_byte_in_a_snapshot_stops_the_start() {
    let dir = TempDir::new("corrupt-snapshot");
    let config = config(dir.path());
    let ids = identities(3);
    let mut rng = StdRng::seed_from_u64(12);
    let snapshot = {
        let (store, _) = open(&config).unwrap();
        for step in 0..80 {
            random_op(store.state(), &mut rng, &ids, step);
        }
        let info = store.snapshot(100).unwrap().expect("a durable store");
        shutdown(&store);
        info.path
    };
    let spans = {
        let data = std::fs::read(&snapshot).unwrap();
        let mut reader =
            RecordReader::new(&snapshot, &data, b"BOTDSNAP", &[1], "snapshot").unwrap();
        let mut spans = Vec::new();
        while let Next::Record { offset, body } = reader.next_record() {
            spans.push((offset as usize, offset as usize + 12 + body.len()));
        }
        spans
    };
    let (start, end) = spans[spans.len() / 2];
    let mut data = std::fs::read(&snapshot).unwrap();
    data[end - 1] ^= 0x01;
    std::fs::write(&snapshot, &data).unwrap();
    expect_corrupt(open(&config).map(drop), &snapshot, start as u64);

    // A snapshot cut short is corrupt too (snapshots are complete before they get their name).
    std::fs::write(&snapshot, &data[..start + 5]).unwrap();
    expect_corrupt(open(&config).map(drop), &snapshot, start as u64);
}

/// A journal segment holding the given (lsn, event) records, as the journal writes them.
fn crafted_segment(dir: &Path, records: &[(u64, botd_relay::store::proto::Event)]) -> PathBuf {
    use botd_relay::store::embedded::journal::{segment_name, JOURNAL_VERSION};
    use botd_relay::store::embedded::record::{append_record, file_header};
    use prost::Message;
    let journal = dir.join("journal");
    std::fs::create_dir_all(&journal).unwrap();
    let path = journal.join(segment_name(records[0].0.max(1)));
    let mut data = file_header(JOURNAL_MAGIC, JOURNAL_VERSION).to_vec();
    for (lsn, event) in records {
        append_record(&mut data, &[&lsn.to_be_bytes(), &event.encode_to_vec()]);
    }
    std::fs::write(&path, data).unwrap();
    path
}

#[test]
fn crafted_values_that_would_overflow_are_refused_with_file_and_offset() {
    use botd_relay::store::proto::{event::Kind, Event, MessageStored};
    let identity = Bytes::from(identities(1)[0].to_vec());
    let stored = |message_id| Event {
        kind: Some(Kind::MessageStored(MessageStored {
            recipient: identity.clone(),
            device_id: 1,
            message_id,
            sender: identity.clone(),
            sender_device: 1,
            sender_nonce: Bytes::from_static(&[1; 8]),
            sender_signature: Bytes::from_static(&[2; 64]),
            ..Default::default()
        })),
    };
    for (records, bad_index) in [
        (vec![(1, stored(1)), (2, stored(u64::MAX))], 1),
        (vec![(1, stored(1)), (u64::MAX, stored(2))], 1),
        (vec![(u64::MAX - 1, stored(3))], 0),
    ] {
        let dir = TempDir::new("overflow");
        let config = config(dir.path());
        let segment = crafted_segment(dir.path(), &records);
        let spans = record_spans(&segment);
        expect_corrupt(
            open(&config).map(drop),
            &segment,
            spans[bad_index].start as u64,
        );
    }
}

#[test]
fn two_relays_cannot_share_a_data_dir() {
    let dir = TempDir::new("lock");
    let config = config(dir.path());
    let (first, _) = open(&config).unwrap();
    assert!(matches!(open(&config), Err(StorageError::Locked { .. })));
    shutdown(&first);
    drop(first);
    let (second, _) = open(&config).unwrap();
    shutdown(&second);
}

#[tokio::test]
async fn under_fsync_always_answers_wait_for_their_record() {
    let dir = TempDir::new("wait");
    let mut config = config(dir.path());
    config.fsync = FsyncPolicy::Always;
    let (store, _) = open(&config).unwrap();
    let journal = store.journal().unwrap().clone();
    let ids = identities(2);
    let mut rng = StdRng::seed_from_u64(3);
    for step in 0..30 {
        random_op(store.state(), &mut rng, &ids, step);
    }
    let lsn = journal.last_lsn();
    assert!(lsn > 0);
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        journal.progress().wait(lsn),
    )
    .await
    .expect("group commit completes")
    .unwrap();
    journal.shutdown();
    drop(store);
    // Everything acknowledged as durable is in the file.
    let report = EmbeddedStore::check(dir.path()).unwrap();
    assert_eq!(report.next_lsn, lsn + 1);
}

#[test]
fn a_segment_cut_inside_its_header_is_removed_not_fatal() {
    let dir = TempDir::new("header");
    let config = config(dir.path());
    let ids = identities(2);
    let expected = populate(&config, 21, &ids, 20);
    // The process died right after creating the next segment, mid-header.
    let next = dir
        .path()
        .join("journal")
        .join("journal-00000000000099999999.log");
    std::fs::write(&next, b"BOTDJ").unwrap();
    let (reopened, _) = open(&config).unwrap();
    assert_eq!(reopened.canonical_state(), expected);
    assert!(!next.exists());
    shutdown(&reopened);
    drop(reopened);
    // A damaged header elsewhere is still an error.
    let first = dir
        .path()
        .join("journal")
        .join("journal-00000000000000000001.log");
    let mut data = std::fs::read(&first).unwrap();
    data[0] = b'X';
    std::fs::write(&first, &data).unwrap();
    assert!(matches!(open(&config), Err(StorageError::BadHeader { .. })));
}
