//! The embedded store's files: journal segments, snapshots and whole data directories. Each
//! file of an input is built by one of four encodings, so that the fuzzer can work below the
//! checksums (raw bytes) or above them (records framed correctly by the harness):
//!
//! | mode `& 3` | journal segment                         | snapshot                              |
//! |------------|-----------------------------------------|---------------------------------------|
//! | 0          | the bytes as they are                   | the bytes as they are                 |
//! | 1          | a valid file header, then the bytes     | a valid file header, then the bytes   |
//! | 2          | header, then each chunk as a record     | header, then each chunk as a record   |
//! | 3          | header, then lsn-numbered events        | header record, event chunks, trailer  |
//!
//! A journal header is version 2, or version 1 when mode bit 2 is set.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message;

use super::input::Input;
use super::{cap, Outcome};
use botd_relay::config::{Config, FsyncPolicy, MetricsListen};
use botd_relay::store::embedded::journal::{
    self, BatchMarker, JOURNAL_MAGIC, JOURNAL_VERSION, MARKER_LSN, READABLE_VERSIONS,
};
use botd_relay::store::embedded::record::{
    append_record, file_header, Damage, Next, RecordReader, FILE_HEADER_LEN, MAX_RECORD_LEN,
    RECORD_HEADER_LEN,
};
use botd_relay::store::embedded::snapshot::{self, SNAPSHOT_MAGIC, SNAPSHOT_VERSION};
use botd_relay::store::embedded::state::event_identity;
use botd_relay::store::embedded::{recovery, EmbeddedStore, State, StorageError};
use botd_relay::store::proto::{
    snapshot_record, Event, SnapshotHeader, SnapshotRecord, SnapshotTrailer,
};

/// Largest input of the storage targets.
const MAX_INPUT: usize = 1 << 17;

/// A store configuration with `shards` shards (1 to 4).
fn store_config(shards: u8, data_dir: &Path) -> Config {
    Config {
        metrics_listen: MetricsListen::Off,
        data_dir: data_dir.to_owned(),
        fsync: FsyncPolicy::Never,
        store_shards: 1 + usize::from(shards % 4),
        ..Config::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Building files
// ---------------------------------------------------------------------------------------------

/// A journal segment's file header.
pub(super) fn journal_header(mode: u8) -> [u8; FILE_HEADER_LEN] {
    let version = if mode & 4 != 0 { 1 } else { JOURNAL_VERSION };
    file_header(JOURNAL_MAGIC, version)
}

/// The body of a journal record: `lsn || event`.
pub(super) fn journal_record(lsn: u64, event: &[u8]) -> Vec<u8> {
    let mut body = lsn.to_be_bytes().to_vec();
    body.extend_from_slice(event);
    body
}

/// The body of a batch marker record.
pub(super) fn marker_record(first_lsn: u64, last_lsn: u64, synced_offset: u64) -> Vec<u8> {
    let mut body = MARKER_LSN.to_be_bytes().to_vec();
    for word in [first_lsn, last_lsn, synced_offset] {
        body.extend_from_slice(&word.to_be_bytes());
    }
    body
}

/// A journal segment from `content` in encoding `mode` (see the module documentation). In
/// mode 3, each step is a byte `k`: 0 is a batch marker (first and last lsn as u16, synced
/// offset as u32), 255 an event at any lsn (u64, then the event as a chunk), anything else an
/// event (chunk) at the previous lsn plus `k`.
pub(super) fn journal_bytes(mode: u8, content: &[u8]) -> Vec<u8> {
    framed_file(mode, content, &journal_header(mode), |input, file| {
        let mut lsn = 0u64;
        while !input.is_empty() {
            let body = match input.u8() {
                0 => {
                    let first = u64::from(input.u16());
                    let last = u64::from(input.u16());
                    marker_record(first, last, u64::from(input.u32()))
                }
                255 => {
                    lsn = input.u64();
                    journal_record(lsn, input.chunk())
                }
                step => {
                    lsn = lsn.wrapping_add(u64::from(step));
                    journal_record(lsn, input.chunk())
                }
            };
            append_record(file, &[&body]);
        }
    })
}

/// A file from `content` in encoding `mode` (see the module documentation): 0 the bytes as
/// they are, 1 `header` then the bytes, 2 `header` then each chunk as a framed record, 3
/// `header` then what `structured` writes.
fn framed_file(
    mode: u8,
    content: &[u8],
    header: &[u8],
    structured: impl FnOnce(&mut Input, &mut Vec<u8>),
) -> Vec<u8> {
    if mode & 3 == 0 {
        return content.to_vec();
    }
    let mut input = Input::new(content);
    let mut file = header.to_vec();
    match mode & 3 {
        1 => file.extend_from_slice(content),
        2 => {
            while !input.is_empty() {
                append_record(&mut file, &[input.chunk()]);
            }
        }
        _ => structured(&mut input, &mut file),
    }
    file
}

/// A snapshot record's body.
pub(super) fn snapshot_record_body(kind: snapshot_record::Kind) -> Vec<u8> {
    SnapshotRecord { kind: Some(kind) }.encode_to_vec()
}

/// A snapshot from `content` in encoding `mode` (see the module documentation). In mode 3 the
/// content starts with the trailer's fields (a cover count `u8 % 5`, the covers as u16, the id
/// floor as u16); each chunk after them is an event, and the trailer counts them.
pub(super) fn snapshot_bytes(mode: u8, content: &[u8]) -> Vec<u8> {
    let header = file_header(SNAPSHOT_MAGIC, SNAPSHOT_VERSION);
    framed_file(mode, content, &header, |input, file| {
        let covers: Vec<u64> = (0..input.u8() % 5)
            .map(|_| u64::from(input.u16()))
            .collect();
        let id_floor = u64::from(input.u16());
        let header = snapshot_record_body(snapshot_record::Kind::Header(SnapshotHeader {
            shard_count: covers.len() as u32,
            created_at_ms: 1,
        }));
        append_record(file, &[&header]);
        let mut events = 0;
        while !input.is_empty() {
            // An event's bytes as the `event` field of a record, without decoding them.
            let event = input.chunk();
            let mut body = vec![0x12];
            prost::encoding::encode_varint(event.len() as u64, &mut body);
            body.extend_from_slice(event);
            append_record(file, &[&body]);
            events += 1;
        }
        let trailer = snapshot_record_body(snapshot_record::Kind::Trailer(SnapshotTrailer {
            events,
            cover_lsns: covers,
            id_floor,
        }));
        append_record(file, &[&trailer]);
    })
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

/// A snapshot of `state` (its shards' events, then the id floor, as recovery applies them)
/// rebuilds exactly `state`: whatever recovery accepted, the next snapshot preserves.
pub(super) fn assert_snapshot_round_trip(state: &State, config: &Config) {
    let rebuilt = State::new(config, None);
    for index in 0..state.shard_count() {
        for event in state.snapshot_shard(index).0 {
            if let Err(err) = rebuilt.replay(&event) {
                panic!("a snapshot event does not replay ({err}): {event:?}");
            }
        }
    }
    rebuilt.raise_id_floor(state.id_floor());
    assert_eq!(rebuilt.id_floor(), state.id_floor());
    assert_eq!(
        rebuilt.canonical_state(),
        state.canonical_state(),
        "a snapshot rebuilds another state"
    );
    assert_eq!(rebuilt.stats(), state.stats());
}

/// A refusal to start must name a file of the directory and, for damage, an offset inside it.
fn assert_refusal(err: &StorageError, dir: &Path) {
    match err {
        StorageError::BadHeader { path, .. } => assert!(path.starts_with(dir), "{err}"),
        StorageError::Corrupt { path, offset, .. } => {
            assert!(path.starts_with(dir), "{err}");
            let len = std::fs::metadata(path).map_or(0, |m| m.len());
            assert!(*offset <= len, "offset beyond the file: {err}");
        }
        other => panic!("recovery failed without naming damage: {other}"),
    }
}

/// A refusal in words that hold no temporary path.
fn refusal(err: &StorageError) -> Outcome {
    let name = |path: &Path| {
        path.file_name()
            .map_or_else(String::new, |name| name.to_string_lossy().into_owned())
    };
    match err {
        StorageError::BadHeader { path, .. } => format!("refused: bad header in {}", name(path)),
        StorageError::Corrupt {
            path,
            offset,
            reason,
        } => format!("refused: {} at {offset}: {reason}", name(path)),
        other => format!("refused: {other}"),
    }
}

/// How the bytes at the front of `rest` fail to be a record (`None`: they are one), by the
/// format in `record.rs`'s documentation.
fn reference_damage(rest: &[u8]) -> Option<Damage> {
    if rest.iter().all(|b| *b == 0) {
        return Some(Damage::ZeroTail);
    }
    if rest.len() < RECORD_HEADER_LEN {
        return Some(Damage::Truncated);
    }
    let word = |at: usize| u32::from_be_bytes(rest[at..at + 4].try_into().expect("4 bytes"));
    if crc32fast::hash(&rest[..8]) != word(8) {
        return Some(Damage::HeaderChecksum);
    }
    let len = word(0) as usize;
    if len > MAX_RECORD_LEN {
        return Some(Damage::TooLong);
    }
    let end = RECORD_HEADER_LEN + len;
    if rest.len() < end {
        return Some(Damage::Truncated);
    }
    if crc32fast::hash(&rest[RECORD_HEADER_LEN..end]) != word(4) {
        return Some(Damage::BodyChecksum {
            at_end: rest.len() == end,
        });
    }
    None
}

/// Reads a whole segment held in memory as recovery does, replaying its events into `state`,
/// and checks the reader against [`reference_damage`]. Returns the records read, the events
/// applied and how the segment ended.
fn replay_segment(file: &[u8], state: &State) -> Outcome {
    let path = Path::new("journal-fuzz.log");
    let Ok(mut reader) = RecordReader::new(path, file, JOURNAL_MAGIC, READABLE_VERSIONS, "journal")
    else {
        assert!(
            READABLE_VERSIONS
                .iter()
                .all(|v| !file.starts_with(&file_header(JOURNAL_MAGIC, *v))),
            "a readable header was refused"
        );
        return "bad header".into();
    };
    let (mut records, mut applied) = (0, 0);
    let summary = |records, applied, end: String| {
        format!("{records} records, {applied} events applied, {end}")
    };
    loop {
        let position = reader.position() as usize;
        let rest = &file[position..];
        let next = reader.next_record();
        match next {
            Next::End => {
                assert_eq!(position, file.len());
                return summary(records, applied, "end".into());
            }
            Next::Damaged { offset, damage } => {
                assert_eq!(offset as usize, position);
                assert_eq!(Some(damage), reference_damage(rest), "at {offset}");
                // The reader stays at the damage.
                assert_eq!(reader.next_record(), Next::Damaged { offset, damage });
                return summary(records, applied, format!("{damage:?} at {offset}"));
            }
            Next::Record { offset, body } => {
                assert_eq!(offset as usize, position);
                assert_eq!(reference_damage(rest), None, "at {offset}");
                assert_eq!(&rest[RECORD_HEADER_LEN..][..body.len()], body);
                assert_eq!(
                    reader.position() as usize,
                    position + RECORD_HEADER_LEN + body.len()
                );
                records += 1;
                let Some(lsn) = body.get(..8) else {
                    continue;
                };
                if lsn == MARKER_LSN.to_be_bytes() {
                    if let Some(marker) = BatchMarker::decode(body) {
                        assert_eq!(body.len(), 32, "{marker:?}");
                    }
                    continue;
                }
                let Ok(event) = Event::decode(&body[8..]) else {
                    continue;
                };
                let identity = event_identity(&event);
                let replayed = state.replay(&event);
                if let Err(err) = identity {
                    assert_eq!(replayed, Err(err));
                }
                applied += usize::from(replayed.is_ok());
            }
        }
    }
}

/// A directory of its own under the fastest temporary file system, removed when dropped.
pub(super) struct TempDir(pub(super) PathBuf);

impl TempDir {
    pub(super) fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_owned()
        } else {
            std::env::temp_dir()
        };
        let path = base.join(format!(
            "botd-fuzz-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("a temporary directory");
        Self(path)
    }

    fn write(&self, dir: &str, name: &str, bytes: &[u8]) {
        let dir = self.0.join(dir);
        std::fs::create_dir_all(&dir).expect("a directory");
        std::fs::write(dir.join(name), bytes).expect("a file");
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------------------------

/// Arbitrary segment bytes through the record reader, event decoding and replay, in memory.
/// Input: a mode byte (bits 0-2: the encoding, see the module documentation; bits 4-5: store
/// shards), then the segment's content. The replayed state must survive a snapshot unchanged.
pub fn journal_segment(data: &[u8]) -> Outcome {
    let mut input = Input::new(cap(data, MAX_INPUT));
    let mode = input.u8();
    let file = journal_bytes(mode, input.rest());
    let config = store_config(mode >> 4, Path::new("."));
    let state = State::new(&config, None);
    let outcome = replay_segment(&file, &state);
    assert_snapshot_round_trip(&state, &config);
    outcome
}

/// An arbitrary snapshot file (the only file of a data directory) through recovery. Input: a
/// mode byte (bits 0-1: the encoding; bits 4-5: store shards), then the content. Recovery must
/// load it or refuse it naming file and offset, and a loaded state must survive a snapshot
/// unchanged.
pub fn snapshot_file(data: &[u8]) -> Outcome {
    let mut input = Input::new(cap(data, MAX_INPUT));
    let mode = input.u8();
    let dir = TempDir::new();
    dir.write(
        "snapshots",
        &snapshot::snapshot_name(1),
        &snapshot_bytes(mode, input.rest()),
    );
    let config = store_config(mode >> 4, &dir.0);
    let state = State::new(&config, None);
    match recovery::recover(&dir.0, &state, false) {
        Ok(report) => {
            assert!(report.snapshot.is_some());
            assert_eq!((report.segments, report.records_replayed), (0, 0));
            assert_eq!(report.stats, state.stats());
            assert_snapshot_round_trip(&state, &config);
            format!("loaded {} events", report.snapshot_events)
        }
        Err(err) => {
            assert_refusal(&err, &dir.0);
            refusal(&err)
        }
    }
}

/// Report fields that must not depend on whether recovery repairs.
fn outcome(report: &recovery::RecoveryReport) -> impl PartialEq + std::fmt::Debug {
    (
        report.snapshot.clone(),
        report.snapshot_events,
        report.segments,
        report.records_replayed,
        report.records_skipped,
        report.torn_tail.clone(),
        report.next_lsn,
        report.stats,
    )
}

/// A whole data directory through `recover`, first only checking (`botd-relay check`), then
/// repairing (a start), then checking again; and the relay started on the result, stopped and
/// started again. Input: flags (bits 0-1: journal segments, 0 to 3; bit 2: a snapshot; bit 3:
/// a leftover `.tmp` snapshot; bits 4-5: store shards); per segment its name (first lsn,
/// u16), encoding mode (u8) and content (chunk); for the snapshot its name (u8), mode and
/// content. Checking and repairing must agree; a repaired directory must recover without a
/// torn tail to the same state, and the relay must start on it, twice.
pub fn data_dir(data: &[u8]) -> Outcome {
    let mut input = Input::new(cap(data, MAX_INPUT));
    let flags = input.u8();
    let dir = TempDir::new();
    for _ in 0..flags & 3 {
        let name = journal::segment_name(u64::from(input.u16()));
        let mode = input.u8();
        dir.write("journal", &name, &journal_bytes(mode, input.chunk()));
    }
    if flags & 4 != 0 {
        let name = snapshot::snapshot_name(u64::from(input.u8()));
        let mode = input.u8();
        dir.write("snapshots", &name, &snapshot_bytes(mode, input.chunk()));
    }
    if flags & 8 != 0 {
        dir.write("snapshots", "snapshot-9.snap.tmp", b"half a snapshot");
    }
    let config = store_config(flags >> 4, &dir.0);

    let checked = recovery::recover(&dir.0, &State::new(&config, None), false);
    let state = State::new(&config, None);
    let repaired = recovery::recover(&dir.0, &state, true);
    let report = match (checked, repaired) {
        (Err(checked), Err(repaired)) => {
            assert_refusal(&checked, &dir.0);
            assert_refusal(&repaired, &dir.0);
            assert_eq!(checked.to_string(), repaired.to_string());
            return refusal(&checked);
        }
        (Ok(checked), Ok(repaired)) => {
            assert_eq!(outcome(&checked), outcome(&repaired));
            repaired
        }
        (checked, repaired) => {
            panic!("checking says {checked:?}, repairing says {repaired:?}")
        }
    };
    assert_eq!(report.stats, state.stats());
    assert_snapshot_round_trip(&state, &config);

    let again_state = State::new(&config, None);
    let again = recovery::recover(&dir.0, &again_state, false)
        .unwrap_or_else(|err| panic!("a repaired directory does not recover: {err}"));
    assert!(again.torn_tail.is_none(), "{:?}", again.torn_tail);
    assert_eq!(again.next_lsn, report.next_lsn);
    assert_eq!(again_state.canonical_state(), state.canonical_state());

    // A start counts accounts never seen (older files) as seen now.
    state.mark_recovered(1);
    for start in ["first", "second"] {
        let (store, started) = EmbeddedStore::open(&config, 1)
            .unwrap_or_else(|err| panic!("the {start} start on a recovered directory: {err}"));
        assert_eq!(started.next_lsn, report.next_lsn, "{start} start");
        assert_eq!(
            store.canonical_state(),
            state.canonical_state(),
            "{start} start"
        );
        store.journal().expect("a durable store").shutdown();
    }
    let snapshot = report.snapshot.as_ref().map_or_else(
        || "no snapshot".to_string(),
        |_| format!("a snapshot of {} events", report.snapshot_events),
    );
    let torn = report.torn_tail.as_ref().map_or_else(
        || "no torn tail".to_string(),
        |(_, _, cut)| format!("{cut} bytes cut"),
    );
    format!(
        "recovered: {snapshot}, {} segments, {} records replayed, {} skipped, {torn}, next lsn {}",
        report.segments, report.records_replayed, report.records_skipped, report.next_lsn
    )
}
