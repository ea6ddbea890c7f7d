//! Durability of the store: a journal of every event, periodic snapshots, and recovery at start
//! (newest snapshot, then the journal records after it). Also the data directory's layout and
//! lock.
//!
//! ```text
//! <data_dir>/identity.key                 the relay's secret key (0600)
//! <data_dir>/LOCK                         held while a relay uses the directory
//! <data_dir>/journal/journal-<lsn>.log    journal segments, named by their first record's lsn
//! <data_dir>/snapshots/snapshot-<n>.snap  snapshots; the newest is used
//! ```

pub mod journal;
pub mod record;
pub mod snapshot;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use prost::Message;

pub use journal::{Journal, JournalOptions};
pub use record::StorageError;
use record::{Next, RecordReader};
use snapshot::SnapshotInfo;

use crate::config::Config;
use crate::proto::store::{snapshot_record, Event, SnapshotRecord};
use crate::relay::store::{event_identity, shard_index, StoreStats};
use crate::relay::{NoJournal, Store};

const LOCK_FILE: &str = "LOCK";
const JOURNAL_DIR: &str = "journal";
const SNAPSHOT_DIR: &str = "snapshots";

/// What recovery found and did.
#[derive(Debug, Default, Clone)]
pub struct RecoveryReport {
    pub snapshot: Option<PathBuf>,
    pub snapshot_events: u64,
    pub segments: usize,
    pub records_replayed: u64,
    pub records_skipped: u64,
    /// A record cut short by a crash at the end of the journal: the file and the offset it was
    /// cut back to.
    pub torn_tail: Option<(PathBuf, u64)>,
    pub next_lsn: u64,
    pub stats: StoreStats,
    pub elapsed_ms: u128,
}

/// The store's files: the journal being written and the snapshots.
pub struct Storage {
    data_dir: PathBuf,
    journal: Arc<Journal>,
    /// One snapshot at a time.
    snapshot_guard: Mutex<()>,
    _lock: File,
}

/// A store rebuilt from disk, with its storage ready for new records.
pub struct Recovered {
    pub store: Store,
    pub storage: Storage,
    pub report: RecoveryReport,
}

fn list(dir: &Path, parse: fn(&str) -> Option<u64>) -> Result<Vec<(u64, PathBuf)>, StorageError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(StorageError::io(dir))? {
        let entry = entry.map_err(StorageError::io(dir))?;
        if let Some(seq) = entry.file_name().to_str().and_then(parse) {
            found.push((seq, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

fn lock_dir(data_dir: &Path) -> Result<File, StorageError> {
    std::fs::create_dir_all(data_dir).map_err(StorageError::io(data_dir))?;
    let path = data_dir.join(LOCK_FILE);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(StorageError::io(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StorageError::Locked { path }),
        Err(std::fs::TryLockError::Error(err)) => Err(StorageError::Io { path, source: err }),
    }
}

/// Opens (creating if needed) the store under `config.data_dir`: locks the directory, loads the
/// newest snapshot, replays the journal after it (cutting off a torn last record), and starts
/// a new journal segment.
pub fn open(config: &Config) -> Result<Recovered, StorageError> {
    let lock = lock_dir(&config.data_dir)?;
    let journal_dir = config.data_dir.join(JOURNAL_DIR);
    let snapshot_dir = config.data_dir.join(SNAPSHOT_DIR);
    for dir in [&journal_dir, &snapshot_dir] {
        std::fs::create_dir_all(dir).map_err(StorageError::io(dir))?;
    }
    let store = Store::new(config, Arc::new(NoJournal));
    let report = recover(&config.data_dir, &store, true)?;
    // Recovery decodes every record into short-lived buffers between the mailboxes' growing
    // ones: their free memory is scattered over the heap.
    crate::memory::release_free_memory();
    store.mark_all_deliverable();
    let journal = Journal::start(
        &journal_dir,
        report.next_lsn,
        JournalOptions::from_config(config),
    )?;
    let store = store.with_sink(journal.clone());
    Ok(Recovered {
        store,
        storage: Storage {
            data_dir: config.data_dir.clone(),
            journal,
            snapshot_guard: Mutex::new(()),
            _lock: lock,
        },
        report,
    })
}

/// `prefix`, `number` in 20 digits (so names sort as numbers), `suffix`: journal segments and
/// snapshots are named this way.
fn numbered_name(prefix: &str, number: u64, suffix: &str) -> String {
    format!("{prefix}{number:020}{suffix}")
}

/// The number of a file named by [`numbered_name`].
fn name_number(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?
        .strip_suffix(suffix)?
        .parse()
        .ok()
}

/// Verifies every file of a data directory without changing anything, and counts what it holds.
pub fn check(data_dir: &Path) -> Result<RecoveryReport, StorageError> {
    let _lock = lock_dir(data_dir)?;
    let scratch = Config {
        store_shards: 1,
        ..Config::default()
    };
    let store = Store::new(&scratch, Arc::new(NoJournal));
    recover(data_dir, &store, false)
}

/// Loads the newest snapshot and replays the journal of `data_dir` into `store`. With `repair`,
/// a torn last record is cut off the file and leftovers of interrupted snapshots are removed;
/// without it nothing is changed. The caller holds the directory's lock.
pub fn recover(
    data_dir: &Path,
    store: &Store,
    repair: bool,
) -> Result<RecoveryReport, StorageError> {
    let started = Instant::now();
    let mut report = RecoveryReport::default();
    let snapshot_dir = data_dir.join(SNAPSHOT_DIR);
    let journal_dir = data_dir.join(JOURNAL_DIR);

    // Covers per shard of the snapshot (empty: no snapshot, replay everything).
    let mut covers: Vec<u64> = Vec::new();
    if snapshot_dir.exists() {
        if repair {
            for entry in std::fs::read_dir(&snapshot_dir)
                .map_err(StorageError::io(&snapshot_dir))?
                .flatten()
            {
                if entry.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        if let Some((_, path)) = list(&snapshot_dir, snapshot::snapshot_seq)?.pop() {
            let (events, snapshot_covers) = load_snapshot(&path, store)?;
            report.snapshot = Some(path);
            report.snapshot_events = events;
            covers = snapshot_covers;
        }
    }
    let mut last_lsn = covers.iter().copied().max().unwrap_or(0);
    // Records are appended in lsn order, across segments too.
    let mut previous_in_file = 0u64;

    let segments = if journal_dir.exists() {
        list(&journal_dir, journal::segment_first_lsn)?
    } else {
        Vec::new()
    };
    report.segments = segments.len();
    for (index, (_, path)) in segments.iter().enumerate() {
        let is_last = index + 1 == segments.len();
        let data = std::fs::read(path).map_err(StorageError::io(path))?;
        // A crash right after a segment was created can leave its header unfinished.
        let header = record::file_header(journal::JOURNAL_MAGIC);
        if is_last && data.len() < header.len() && header.starts_with(&data) {
            tracing::warn!(path = %path.display(), "last journal segment has no complete header; removing it");
            report.torn_tail = Some((path.clone(), 0));
            if repair {
                std::fs::remove_file(path).map_err(StorageError::io(path))?;
            }
            continue;
        }
        let mut reader = RecordReader::new(path, &data, journal::JOURNAL_MAGIC, "journal")?;
        let mut records = 0u64;
        loop {
            match reader.next_record()? {
                Next::End => break,
                Next::Record { offset, body } => {
                    records += 1;
                    if body.len() < 8 {
                        return Err(reader.corrupt_at(offset, "record shorter than its lsn"));
                    }
                    let lsn = u64::from_be_bytes(body[..8].try_into().expect("8 bytes"));
                    let event = Event::decode(&body[8..]).map_err(|err| {
                        reader.corrupt_at(offset, format!("event does not decode: {err}"))
                    })?;
                    let identity = event_identity(&event)
                        .map_err(|err| reader.corrupt_at(offset, err.to_string()))?;
                    if lsn <= previous_in_file {
                        return Err(reader.corrupt_at(
                            offset,
                            format!("lsn {lsn} does not follow {previous_in_file}"),
                        ));
                    }
                    previous_in_file = lsn;
                    let covered =
                        !covers.is_empty() && lsn <= covers[shard_index(&identity, covers.len())];
                    if covered {
                        report.records_skipped += 1;
                    } else {
                        store
                            .replay(&event)
                            .map_err(|err| reader.corrupt_at(offset, err.to_string()))?;
                        report.records_replayed += 1;
                    }
                    last_lsn = last_lsn.max(lsn);
                }
                Next::TornTail { offset } => {
                    if !is_last {
                        return Err(reader.corrupt_at(
                            offset,
                            "incomplete record before the last journal segment",
                        ));
                    }
                    tracing::warn!(path = %path.display(), offset, "journal ends in a torn record (crash during a write); cutting it off");
                    report.torn_tail = Some((path.clone(), offset));
                    if repair {
                        let file = File::options()
                            .write(true)
                            .open(path)
                            .map_err(StorageError::io(path))?;
                        file.set_len(offset).map_err(StorageError::io(path))?;
                        file.sync_all().map_err(StorageError::io(path))?;
                    }
                    break;
                }
            }
        }
        // A segment created just before a stop holds no record: its name would collide with the
        // segment the journal starts next.
        if repair && is_last && records == 0 {
            std::fs::remove_file(path).map_err(StorageError::io(path))?;
        }
    }
    report.next_lsn = last_lsn + 1;
    report.stats = store.stats();
    report.elapsed_ms = started.elapsed().as_millis();
    Ok(report)
}

/// Applies a snapshot to `store`; returns its event count and per-shard covers.
fn load_snapshot(path: &Path, store: &Store) -> Result<(u64, Vec<u64>), StorageError> {
    let data = std::fs::read(path).map_err(StorageError::io(path))?;
    let mut reader = RecordReader::new(path, &data, snapshot::SNAPSHOT_MAGIC, "snapshot")?;
    let mut events = 0u64;
    let mut header_seen = false;
    loop {
        let (offset, body) = match reader.next_record()? {
            Next::Record { offset, body } => (offset, body),
            Next::TornTail { offset } => {
                return Err(reader.corrupt_at(offset, "snapshot is truncated"))
            }
            Next::End => {
                return Err(reader.corrupt_at(data.len() as u64, "snapshot has no trailer"))
            }
        };
        let record = SnapshotRecord::decode(body)
            .map_err(|err| reader.corrupt_at(offset, format!("record does not decode: {err}")))?;
        match record.kind {
            Some(snapshot_record::Kind::Header(_)) if !header_seen => header_seen = true,
            Some(snapshot_record::Kind::Event(event)) if header_seen => {
                store
                    .replay(&event)
                    .map_err(|err| reader.corrupt_at(offset, err.to_string()))?;
                events += 1;
            }
            Some(snapshot_record::Kind::Trailer(trailer)) if header_seen => {
                if trailer.events != events {
                    return Err(reader.corrupt_at(
                        offset,
                        format!(
                            "trailer counts {} events, file has {events}",
                            trailer.events
                        ),
                    ));
                }
                if trailer.cover_lsns.is_empty() {
                    return Err(reader.corrupt_at(offset, "trailer lists no shard"));
                }
                if !matches!(reader.next_record()?, Next::End) {
                    return Err(reader.corrupt_at(offset, "data after the trailer"));
                }
                return Ok((events, trailer.cover_lsns));
            }
            _ => return Err(reader.corrupt_at(offset, "record out of place")),
        }
    }
}

impl Storage {
    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    /// Writes a snapshot, then removes the journal segments and older snapshots it covers.
    pub fn snapshot(&self, store: &Store, now_ms: u64) -> Result<SnapshotInfo, StorageError> {
        let _one_at_a_time = self.snapshot_guard.lock();
        let started = Instant::now();
        // Every record before `seq` is in an older segment, and every shard's cover is at least
        // seq - 1, so once the snapshot is durable those segments are no longer needed.
        let seq = self.journal.rotate();
        let snapshot_dir = self.data_dir.join(SNAPSHOT_DIR);
        let info = snapshot::write(&snapshot_dir, seq, store, now_ms)?;
        for (old, path) in list(&snapshot_dir, snapshot::snapshot_seq)? {
            if old < seq {
                std::fs::remove_file(&path).map_err(StorageError::io(&path))?;
            }
        }
        let journal_dir = self.data_dir.join(JOURNAL_DIR);
        for (first, path) in list(&journal_dir, journal::segment_first_lsn)? {
            if first < seq {
                std::fs::remove_file(&path).map_err(StorageError::io(&path))?;
            }
        }
        journal::sync_dir(&journal_dir)?;
        tracing::info!(path = %info.path.display(), events = info.events, bytes = info.bytes,
            elapsed_ms = started.elapsed().as_millis() as u64, "snapshot written");
        Ok(info)
    }

    /// Final snapshot and journal shutdown, for a graceful stop.
    pub fn close(&self, store: &Store, now_ms: u64) -> Result<(), StorageError> {
        let result = self.snapshot(store, now_ms).map(drop);
        self.journal.shutdown();
        result
    }
}

/// Writes a snapshot every `snapshot_interval`, or sooner once `snapshot_journal_bytes` of
/// journal accumulated, until `shutdown` fires. Snapshots run on a blocking thread.
pub async fn run_snapshots(
    storage: Arc<Storage>,
    relay: Arc<crate::relay::Relay>,
    config: Arc<Config>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut last_at = tokio::time::Instant::now();
    let mut last_bytes = storage.journal().appended_bytes();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let bytes = storage.journal().appended_bytes();
        let due = last_at.elapsed() >= config.snapshot_interval
            || bytes.saturating_sub(last_bytes) >= config.snapshot_journal_bytes;
        if !due {
            continue;
        }
        let (storage_ref, relay_ref) = (storage.clone(), relay.clone());
        let outcome = tokio::task::spawn_blocking(move || {
            storage_ref.snapshot(relay_ref.store(), relay_ref.clock().now_ms())
        })
        .await;
        match outcome {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                tracing::error!(error = %err, "snapshot failed; the journal keeps everything")
            }
            Err(err) => tracing::error!(error = %err, "snapshot task failed"),
        }
        last_at = tokio::time::Instant::now();
        last_bytes = bytes;
    }
}
