//! Durability of the store: recovery after a torn journal write at every byte of its last
//! records, snapshots taken while the store changes, corruption reported with file and offset,
//! and the data directory lock.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use botd_relay::config::{Config, FsyncPolicy};
use botd_relay::core::keys::{sha256, KeyPair};
use botd_relay::proto::{self, Accept, PreKey, Send};
use botd_relay::relay::store::Identity;
use botd_relay::relay::{NoJournal, Store};
use botd_relay::storage::record::{Next, RecordReader};
use botd_relay::storage::{self, StorageError};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "botd-durability-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(dir: &Path) -> Config {
    Config {
        data_dir: dir.to_owned(),
        fsync: FsyncPolicy::Never,
        store_shards: 8,
        ..Config::default()
    }
}

fn empty_store(config: &Config) -> Store {
    Store::new(config, Arc::new(NoJournal))
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

/// One random request through the store's API; refusals are part of the game.
fn random_op(store: &Store, rng: &mut StdRng, ids: &[Identity], now_ms: u64) {
    let me = ids[rng.gen_range(0..ids.len())];
    let other = ids[rng.gen_range(0..ids.len())];
    let device = rng.gen_range(1..=2);
    let _ = match rng.gen_range(0..100) {
        0..=14 => {
            let mut register = proto::Register {
                device_id: device,
                registration_id: rng.gen(),
                identity_key: Bytes::from(vec![7; 33]),
                signed_prekey: Some(proto::SignedPreKey {
                    id: 1,
                    public_key: Bytes::from(vec![8; 33]),
                    signature: Bytes::from(vec![9; 64]),
                }),
                one_time_prekeys: Vec::new(),
            };
            let count = rng.gen_range(0..4);
            register.one_time_prekeys = prekeys(rng, count);
            store.register(&me, register).map(drop)
        }
        15..=19 => {
            let count = rng.gen_range(1..3);
            let upload = proto::UploadPreKeys {
                device_id: device,
                signed_prekey: None,
                one_time_prekeys: prekeys(rng, count),
            };
            store.upload_prekeys(&me, upload).map(drop)
        }
        20..=27 => store.fetch_prekeys(&other, &[], 10).map(drop),
        28..=64 => {
            let payload = Bytes::from(
                (0..rng.gen_range(0..64))
                    .map(|_| rng.gen())
                    .collect::<Vec<u8>>(),
            );
            let send = Send {
                recipient: Bytes::copy_from_slice(&other),
                recipient_device: device,
                sender_device: rng.gen_range(1..=2),
                sender_nonce: Bytes::from(rng.gen::<[u8; 8]>().to_vec()),
                payload_hash: Bytes::copy_from_slice(&sha256(&[&payload])),
                sender_signature: Bytes::from(vec![1; 64]),
                payload,
                ticket: Bytes::new(),
            };
            store.send(&me, &send, now_ms).map(drop)
        }
        65..=79 => {
            let acked: Vec<u64> = (0..rng.gen_range(1..4))
                .map(|_| rng.gen_range(1..20))
                .collect();
            store.ack(&me, device, &acked).map(drop)
        }
        80..=84 => store
            .set_policy(
                &me,
                if rng.gen() {
                    Accept::Open
                } else {
                    Accept::ContactsOnly
                },
            )
            .map(drop),
        85..=89 => store.add_contact(&me, &other).map(drop),
        90..=92 => store.remove_contact(&me, &other).map(drop),
        93..=96 => store
            .create_ticket(&me, rng.gen_range(1..100), rng.gen_range(1..3), now_ms)
            .map(drop),
        97 => store.unregister(&me, device).map(drop),
        _ => {
            store.expire(now_ms.saturating_sub(rng.gen_range(0..50)));
            Ok(())
        }
    };
}

/// (start, end) offsets of the records of a journal segment.
fn record_spans(path: &Path) -> Vec<(usize, usize)> {
    let data = std::fs::read(path).unwrap();
    let mut reader = RecordReader::new(path, &data, b"BOTDJRNL", "journal").unwrap();
    let mut spans: Vec<(usize, usize)> = Vec::new();
    loop {
        match reader.next_record().unwrap() {
            Next::Record { offset, body } => {
                let start = offset as usize;
                spans.push((start, start + 12 + body.len()));
            }
            Next::End => return spans,
            Next::TornTail { .. } => panic!("a complete journal has no torn tail"),
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

/// The state after the first `records` journal records, replayed into an empty store.
fn state_after(config: &Config, segment: &Path, records: usize) -> Vec<Vec<u8>> {
    use prost::Message;
    let data = std::fs::read(segment).unwrap();
    let mut reader = RecordReader::new(segment, &data, b"BOTDJRNL", "journal").unwrap();
    let store = empty_store(config);
    for _ in 0..records {
        let Next::Record { body, .. } = reader.next_record().unwrap() else {
            panic!("too few records")
        };
        store
            .replay(&proto::store::Event::decode(&body[8..]).unwrap())
            .unwrap();
    }
    store.canonical_state()
}

#[test]
fn a_journal_cut_at_any_byte_of_its_last_records_recovers_the_last_complete_record() {
    for seed in [1u64, 2, 3] {
        let mut rng = StdRng::seed_from_u64(seed);
        let dir = TempDir::new("cut");
        let config = config(&dir.0);
        let ids = identities(4);
        {
            let recovered = storage::open(&config).unwrap();
            for step in 0..150 {
                random_op(&recovered.store, &mut rng, &ids, 1_000 + step);
            }
            recovered.storage.journal().shutdown();
        }
        let segment = only_segment(&dir.0);
        let spans = record_spans(&segment);
        assert!(
            spans.len() > 20,
            "seed {seed}: only {} records",
            spans.len()
        );
        let full = std::fs::read(&segment).unwrap();
        let last = 4.min(spans.len());
        let first_cut = spans[spans.len() - last].0;
        let expected: Vec<Vec<Vec<u8>>> = (spans.len() - last..=spans.len())
            .map(|k| state_after(&config, &segment, k))
            .collect();
        let mut cuts = 0;
        for cut in first_cut..=full.len() {
            std::fs::write(&segment, &full[..cut]).unwrap();
            let store = empty_store(&config);
            let report = storage::recover(&dir.0, &store, true).unwrap();
            let complete = spans.iter().filter(|(_, end)| *end <= cut).count();
            let boundary = spans.iter().any(|(_, end)| *end == cut) || cut == first_cut;
            assert_eq!(
                report.torn_tail.is_some(),
                !boundary,
                "seed {seed} cut {cut}"
            );
            assert_eq!(
                store.canonical_state(),
                expected[complete - (spans.len() - last)],
                "seed {seed}: cut at byte {cut} must recover exactly {complete} records"
            );
            // The torn bytes were cut off the file.
            let repaired = std::fs::metadata(&segment).unwrap().len() as usize;
            let keep = spans
                .iter()
                .map(|(_, end)| *end)
                .filter(|end| *end <= cut)
                .max()
                .unwrap_or(12);
            assert_eq!(repaired, keep, "seed {seed} cut {cut}");
            cuts += 1;
        }
        assert_eq!(cuts, full.len() - first_cut + 1);
    }
}

#[test]
fn recovery_after_a_torn_write_continues_the_journal() {
    let mut rng = StdRng::seed_from_u64(9);
    let dir = TempDir::new("continue");
    let config = config(&dir.0);
    let ids = identities(3);
    {
        let recovered = storage::open(&config).unwrap();
        for step in 0..40 {
            random_op(&recovered.store, &mut rng, &ids, step);
        }
        recovered.storage.journal().shutdown();
    }
    let segment = only_segment(&dir.0);
    let len = std::fs::metadata(&segment).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    let expected = {
        let recovered = storage::open(&config).unwrap();
        assert!(recovered.report.torn_tail.is_some());
        for step in 0..40 {
            random_op(&recovered.store, &mut rng, &ids, 100 + step);
        }
        recovered.storage.journal().shutdown();
        recovered.store.canonical_state()
    };
    let again = storage::open(&config).unwrap();
    assert!(again.report.torn_tail.is_none());
    assert_eq!(again.store.canonical_state(), expected);
    again.storage.journal().shutdown();
}

#[test]
fn snapshots_taken_while_the_store_changes_recover_exactly() {
    let dir = TempDir::new("concurrent");
    let mut config = config(&dir.0);
    config.fsync = FsyncPolicy::Always;
    let ids = Arc::new(identities(6));
    let expected = {
        let recovered = Arc::new(storage::open(&config).unwrap());
        let writers: Vec<_> = (0..2u64)
            .map(|t| {
                let (recovered, ids) = (recovered.clone(), ids.clone());
                std::thread::spawn(move || {
                    let mut rng = StdRng::seed_from_u64(100 + t);
                    for step in 0..1500 {
                        random_op(&recovered.store, &mut rng, &ids, 10_000 + step);
                    }
                })
            })
            .collect();
        let mut snapshots = 0;
        while writers.iter().any(|w| !w.is_finished()) && snapshots < 50 {
            recovered
                .storage
                .snapshot(&recovered.store, 20_000)
                .unwrap();
            snapshots += 1;
        }
        for writer in writers {
            writer.join().unwrap();
        }
        assert!(snapshots >= 1);
        // A crash: no final snapshot, only what the journal holds.
        recovered.storage.journal().shutdown();
        recovered.store.canonical_state()
    };
    let reopened = storage::open(&config).unwrap();
    assert!(reopened.report.snapshot.is_some());
    assert_eq!(reopened.store.canonical_state(), expected);
    reopened.storage.journal().shutdown();
}

#[test]
fn a_different_shard_count_recovers_the_same_state() {
    let dir = TempDir::new("reshard");
    let config = config(&dir.0);
    let ids = identities(5);
    let mut rng = StdRng::seed_from_u64(5);
    let expected = {
        let recovered = storage::open(&config).unwrap();
        for step in 0..200 {
            random_op(&recovered.store, &mut rng, &ids, step);
            if step == 100 {
                recovered.storage.snapshot(&recovered.store, 150).unwrap();
            }
        }
        recovered.storage.journal().shutdown();
        recovered.store.canonical_state()
    };
    let mut more_shards = config.clone();
    more_shards.store_shards = 32;
    let reopened = storage::open(&more_shards).unwrap();
    assert_eq!(reopened.store.canonical_state(), expected);
    reopened.storage.journal().shutdown();
}

fn expect_corrupt(result: Result<storage::Recovered, StorageError>, file: &Path, offset: u64) {
    match result {
        Err(err @ StorageError::Corrupt { .. }) => {
            let text = err.to_string();
            assert!(text.contains(&file.display().to_string()), "{text}");
            assert!(text.contains(&format!("offset {offset}")), "{text}");
        }
        Err(other) => panic!("expected a corruption error, got {other}"),
        Ok(_) => panic!("corrupt file accepted"),
    }
}

#[test]
fn a_flipped_byte_in_a_middle_journal_record_stops_the_start() {
    let dir = TempDir::new("corrupt-journal");
    let config = config(&dir.0);
    let ids = identities(3);
    let mut rng = StdRng::seed_from_u64(11);
    {
        let recovered = storage::open(&config).unwrap();
        for step in 0..60 {
            random_op(&recovered.store, &mut rng, &ids, step);
        }
        recovered.storage.journal().shutdown();
    }
    let segment = only_segment(&dir.0);
    let spans = record_spans(&segment);
    let (start, end) = spans[spans.len() / 2];
    let mut data = std::fs::read(&segment).unwrap();
    data[(start + end) / 2] ^= 0x10;
    std::fs::write(&segment, &data).unwrap();
    expect_corrupt(storage::open(&config), &segment, start as u64);
    // check reports the same without changing anything.
    let err = storage::check(&dir.0).unwrap_err();
    assert!(
        err.to_string().contains(&format!("offset {start}")),
        "{err}"
    );
    assert_eq!(std::fs::read(&segment).unwrap(), data);
}

#[test]
fn a_flipped_byte_in_a_snapshot_stops_the_start() {
    let dir = TempDir::new("corrupt-snapshot");
    let config = config(&dir.0);
    let ids = identities(3);
    let mut rng = StdRng::seed_from_u64(12);
    let snapshot = {
        let recovered = storage::open(&config).unwrap();
        for step in 0..80 {
            random_op(&recovered.store, &mut rng, &ids, step);
        }
        let info = recovered.storage.snapshot(&recovered.store, 100).unwrap();
        recovered.storage.journal().shutdown();
        info.path
    };
    let spans = {
        let data = std::fs::read(&snapshot).unwrap();
        let mut reader = RecordReader::new(&snapshot, &data, b"BOTDSNAP", "snapshot").unwrap();
        let mut spans = Vec::new();
        while let Next::Record { offset, body } = reader.next_record().unwrap() {
            spans.push((offset as usize, offset as usize + 12 + body.len()));
        }
        spans
    };
    let (start, end) = spans[spans.len() / 2];
    let mut data = std::fs::read(&snapshot).unwrap();
    data[end - 1] ^= 0x01;
    std::fs::write(&snapshot, &data).unwrap();
    expect_corrupt(storage::open(&config), &snapshot, start as u64);

    // A snapshot cut short is corrupt too (snapshots are complete before they get their name).
    std::fs::write(&snapshot, &data[..start + 5]).unwrap();
    expect_corrupt(storage::open(&config), &snapshot, start as u64);
}

#[test]
fn two_relays_cannot_share_a_data_dir() {
    let dir = TempDir::new("lock");
    let config = config(&dir.0);
    let first = storage::open(&config).unwrap();
    assert!(matches!(
        storage::open(&config),
        Err(StorageError::Locked { .. })
    ));
    first.storage.journal().shutdown();
    drop(first);
    let second = storage::open(&config).unwrap();
    second.storage.journal().shutdown();
}

#[tokio::test]
async fn under_fsync_always_answers_wait_for_their_record() {
    let dir = TempDir::new("wait");
    let mut config = config(&dir.0);
    config.fsync = FsyncPolicy::Always;
    let recovered = storage::open(&config).unwrap();
    let journal = recovered.storage.journal().clone();
    let ids = identities(2);
    let mut rng = StdRng::seed_from_u64(3);
    for step in 0..30 {
        random_op(&recovered.store, &mut rng, &ids, step);
    }
    let lsn = botd_relay::relay::EventSink::last_lsn(&*journal);
    assert!(lsn > 0);
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        journal.wait_durable(lsn),
    )
    .await
    .expect("group commit completes")
    .unwrap();
    journal.shutdown();
    drop(recovered);
    // Everything acknowledged as durable is in the file.
    let report = storage::check(&dir.0).unwrap();
    assert_eq!(report.next_lsn, lsn + 1);
}

#[test]
fn a_segment_cut_inside_its_header_is_removed_not_fatal() {
    let dir = TempDir::new("header");
    let config = config(&dir.0);
    let ids = identities(2);
    let mut rng = StdRng::seed_from_u64(21);
    let expected = {
        let recovered = storage::open(&config).unwrap();
        for step in 0..20 {
            random_op(&recovered.store, &mut rng, &ids, step);
        }
        recovered.storage.journal().shutdown();
        recovered.store.canonical_state()
    };
    // The process died right after creating the next segment, mid-header.
    let next = dir
        .0
        .join("journal")
        .join("journal-00000000000099999999.log");
    std::fs::write(&next, b"BOTDJ").unwrap();
    let reopened = storage::open(&config).unwrap();
    assert_eq!(reopened.store.canonical_state(), expected);
    assert!(!next.exists());
    reopened.storage.journal().shutdown();
    drop(reopened);
    // A damaged header elsewhere is still an error.
    let first = dir
        .0
        .join("journal")
        .join("journal-00000000000000000001.log");
    let mut data = std::fs::read(&first).unwrap();
    data[0] = b'X';
    std::fs::write(&first, &data).unwrap();
    assert!(matches!(
        storage::open(&config),
        Err(StorageError::BadHeader { .. })
    ));
}
