//! Recovery at start: the newest snapshot, then the journal records after it, with torn-tail
//! repair. The same code verifies a data directory without changing it (`botd-relay check`).
//!
//! Damage in the last journal segment is a torn tail, cut off and logged, when it lies past
//! the offset up to which that segment had been fsynced (the batch markers say so): a crash can
//! only damage bytes written since the last fsync. Anywhere else, or in a snapshot, damage
//! stops the start with an error naming the file and the byte offset: nothing is dropped
//! silently. So are values that would overflow (lsns and ids near `u64::MAX`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use prost::Message;

use super::journal::{self, BatchMarker, MARKER_LSN, MAX_SEQUENCE, READABLE_VERSIONS};
use super::record::{self, Damage, Next, RecordReader, StorageError, FILE_HEADER_LEN};
use super::snapshot::{self, SNAPSHOT_MAGIC, SNAPSHOT_VERSION};
use super::state::{event_identity, shard_index, State};
use crate::store::proto::{snapshot_record, Event, SnapshotRecord};
use crate::store::StoreStats;

/// What recovery found and did.
#[derive(Debug, Default, Clone)]
pub struct RecoveryReport {
    pub snapshot: Option<PathBuf>,
    pub snapshot_events: u64,
    pub segments: usize,
    pub records_replayed: u64,
    pub records_skipped: u64,
    /// Damage at the end of the journal left by a crash: the file, the offset it was cut back
    /// to, and the bytes cut off.
    pub torn_tail: Option<(PathBuf, u64, u64)>,
    pub next_lsn: u64,
    pub stats: StoreStats,
    pub elapsed_ms: u128,
}

/// Lists the files of `dir` whose names `parse` understands, sorted by their number.
pub(super) fn list(
    dir: &Path,
    parse: fn(&str) -> Option<u64>,
) -> Result<Vec<(u64, PathBuf)>, StorageError> {
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

/// Loads the newest snapshot and replays the journal of `data_dir` into `state`. With
/// `repair`, a torn tail is cut off the file and leftovers of interrupted snapshots are
/// removed; without it nothing is changed. The caller holds the directory's lock.
pub fn recover(
    data_dir: &Path,
    state: &State,
    repair: bool,
) -> Result<RecoveryReport, StorageError> {
    let started = Instant::now();
    let mut report = RecoveryReport::default();
    let snapshot_dir = data_dir.join(super::SNAPSHOT_DIR);
    let journal_dir = data_dir.join(super::JOURNAL_DIR);

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
            let (events, snapshot_covers) = load_snapshot(&path, state)?;
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
    for (index, (first_lsn, path)) in segments.iter().enumerate() {
        let is_last = index + 1 == segments.len();
        let data = std::fs::read(path).map_err(StorageError::io(path))?;
        // A crash right after a segment was created can leave its header unfinished.
        let header = record::file_header(journal::JOURNAL_MAGIC, journal::JOURNAL_VERSION);
        if is_last && data.len() < header.len() && header.starts_with(&data) {
            tracing::warn!(path = %path.display(), "last journal segment has no complete header; removing it");
            report.torn_tail = Some((path.clone(), 0, data.len() as u64));
            if repair {
                std::fs::remove_file(path).map_err(StorageError::io(path))?;
            }
            continue;
        }
        let mut reader = RecordReader::new(
            path,
            &data,
            journal::JOURNAL_MAGIC,
            READABLE_VERSIONS,
            "journal",
        )?;
        let mut records = 0u64;
        let mut last_marker: Option<BatchMarker> = None;
        loop {
            match reader.next_record() {
                Next::End => break,
                Next::Record { offset, body } => {
                    if body.len() < 8 {
                        return Err(reader.corrupt_at(offset, "record shorter than its lsn"));
                    }
                    let lsn = u64::from_be_bytes(body[..8].try_into().expect("8 bytes"));
                    if lsn == MARKER_LSN && reader.version() >= 2 {
                        let marker = BatchMarker::decode(body)
                            .ok_or_else(|| reader.corrupt_at(offset, "malformed batch marker"))?;
                        last_marker = Some(marker);
                        continue;
                    }
                    records += 1;
                    if lsn >= MAX_SEQUENCE {
                        return Err(reader.corrupt_at(
                            offset,
                            format!("lsn {lsn} is out of range (at most {MAX_SEQUENCE})"),
                        ));
                    }
                    // A segment is named by the lsn of its first record. One holding older
                    // records is not a segment the journal wrote, and would make the journal
                    // start a segment whose name is taken.
                    if lsn < *first_lsn {
                        return Err(reader.corrupt_at(
                            offset,
                            format!("lsn {lsn} is below the segment's first lsn {first_lsn}"),
                        ));
                    }
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
                        state
                            .replay(&event)
                            .map_err(|err| reader.corrupt_at(offset, err.to_string()))?;
                        report.records_replayed += 1;
                    }
                    last_lsn = last_lsn.max(lsn);
                }
                Next::Damaged { offset, damage } => {
                    let torn =
                        is_last && is_torn(&data, reader.version(), last_marker, offset, damage);
                    if !torn {
                        let reason = if is_last {
                            damage.describe().to_owned()
                        } else {
                            format!("{} before the last journal segment", damage.describe())
                        };
                        return Err(reader.corrupt_at(offset, reason));
                    }
                    let cut = data.len() as u64 - offset;
                    tracing::warn!(path = %path.display(), offset, bytes = cut, damage = damage.describe(),
                        "journal ends in a torn write (crash before its fsync); cutting it off");
                    report.torn_tail = Some((path.clone(), offset, cut));
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
        // segment the journal starts next. (Only the last one can be such a segment; an empty
        // one before it would collide just the same, and holds nothing either.)
        if repair && records == 0 {
            std::fs::remove_file(path).map_err(StorageError::io(path))?;
        }
    }
    report.next_lsn = last_lsn + 1;
    report.stats = state.stats();
    report.elapsed_ms = started.elapsed().as_millis();
    Ok(report)
}

/// Whether damage at `offset` of the last segment is what a crash leaves.
fn is_torn(
    data: &[u8],
    version: u32,
    last_marker: Option<BatchMarker>,
    offset: u64,
    damage: Damage,
) -> bool {
    if version < 2 {
        return damage.is_torn_last_record();
    }
    let synced = last_marker.map_or(FILE_HEADER_LEN as u64, |m| m.synced_offset);
    // A later intact marker that says the file was synced past the damage proves the damaged
    // bytes were synced once: that is corruption, not a torn write.
    offset >= synced && !later_marker_synced_past(data, offset)
}

/// True when an intact batch marker after `offset` records a synced offset beyond it.
fn later_marker_synced_past(data: &[u8], offset: u64) -> bool {
    const MARKER_RECORD: usize = record::RECORD_HEADER_LEN + 32;
    let len_prefix = 32u32.to_be_bytes();
    let start = offset as usize + 1;
    (start..data.len().saturating_sub(MARKER_RECORD - 1)).any(|at| {
        if data[at..at + 4] != len_prefix {
            return false;
        }
        let mut reader_data = Vec::with_capacity(FILE_HEADER_LEN + MARKER_RECORD);
        reader_data.extend_from_slice(&record::file_header(
            journal::JOURNAL_MAGIC,
            journal::JOURNAL_VERSION,
        ));
        reader_data.extend_from_slice(&data[at..at + MARKER_RECORD]);
        let path = Path::new("");
        let Ok(mut reader) = RecordReader::new(
            path,
            &reader_data,
            journal::JOURNAL_MAGIC,
            READABLE_VERSIONS,
            "journal",
        ) else {
            return false;
        };
        match reader.next_record() {
            Next::Record { body, .. } if body[..8] == MARKER_LSN.to_be_bytes() => {
                BatchMarker::decode(body).is_some_and(|m| m.synced_offset > offset)
            }
            _ => false,
        }
    })
}

/// Applies a snapshot to `state`; returns its event count and per-shard covers.
fn load_snapshot(path: &Path, state: &State) -> Result<(u64, Vec<u64>), StorageError> {
    let data = std::fs::read(path).map_err(StorageError::io(path))?;
    let mut reader =
        RecordReader::new(path, &data, SNAPSHOT_MAGIC, &[SNAPSHOT_VERSION], "snapshot")?;
    let mut events = 0u64;
    let mut header_seen = false;
    loop {
        let (offset, body) = match reader.next_record() {
            Next::Record { offset, body } => (offset, body),
            Next::Damaged { offset, damage } => {
                return Err(reader.corrupt_at(offset, format!("snapshot: {}", damage.describe())))
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
                state
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
                if let Some(bad) = trailer.cover_lsns.iter().find(|l| **l >= MAX_SEQUENCE) {
                    return Err(
                        reader.corrupt_at(offset, format!("cover lsn {bad} is out of range"))
                    );
                }
                if trailer.id_floor >= MAX_SEQUENCE {
                    return Err(reader.corrupt_at(
                        offset,
                        format!("id floor {} is out of range", trailer.id_floor),
                    ));
                }
                if !matches!(reader.next_record(), Next::End) {
                    return Err(reader.corrupt_at(offset, "data after the trailer"));
                }
                state.raise_id_floor(trailer.id_floor);
                return Ok((events, trailer.cover_lsns));
            }
            _ => return Err(reader.corrupt_at(offset, "record out of place")),
        }
    }
}
