//! Snapshots: the whole store written as the events that rebuild it, shard by shard, each
//! shard locked only while its state is copied. The trailer records, per shard, the highest
//! journal lsn the shard's part covers, so recovery replays exactly the journal records that
//! came after. Files are written to a temporary name, fsynced, renamed, and the directory is
//! fsynced.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use super::journal::sync_dir;
use super::record::{append_record_with, file_header, StorageError};
use super::state::State;
use crate::store::proto::{snapshot_record, SnapshotHeader, SnapshotRecord, SnapshotTrailer};

pub const SNAPSHOT_MAGIC: &[u8; 8] = b"BOTDSNAP";
pub const SNAPSHOT_VERSION: u32 = 1;

pub fn snapshot_name(seq: u64) -> String {
    super::numbered_name("snapshot-", seq, ".snap")
}

pub fn snapshot_seq(name: &str) -> Option<u64> {
    super::name_number(name, "snapshot-", ".snap")
}

/// What a written snapshot holds.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub path: PathBuf,
    pub events: u64,
    pub bytes: u64,
}

/// Writes a snapshot of `store` as `snapshot-<seq>.snap` in `dir`.
pub fn write(
    dir: &Path,
    seq: u64,
    store: &State,
    now_ms: u64,
) -> Result<SnapshotInfo, StorageError> {
    let final_path = dir.join(snapshot_name(seq));
    let tmp_path = dir.join(format!("{}.tmp", snapshot_name(seq)));
    let io = |source| StorageError::Io {
        path: tmp_path.clone(),
        source,
    };
    let file = File::create(&tmp_path).map_err(io)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    out.write_all(&file_header(SNAPSHOT_MAGIC, SNAPSHOT_VERSION))
        .map_err(io)?;
    let mut bytes = super::record::FILE_HEADER_LEN as u64;
    let mut buf = Vec::with_capacity(1 << 16);
    let mut write_record =
        |out: &mut BufWriter<File>, kind: snapshot_record::Kind, buf: &mut Vec<u8>| {
            buf.clear();
            append_record_with(buf, |buf| {
                SnapshotRecord { kind: Some(kind) }
                    .encode(buf)
                    .expect("a Vec grows as the record needs")
            });
            bytes += buf.len() as u64;
            out.write_all(buf)
        };
    let shard_count = store.shard_count();
    write_record(
        &mut out,
        snapshot_record::Kind::Header(SnapshotHeader {
            shard_count: shard_count as u32,
            created_at_ms: now_ms,
        }),
        &mut buf,
    )
    .map_err(io)?;
    let mut covers = Vec::with_capacity(shard_count);
    let mut events = 0u64;
    for index in 0..shard_count {
        let (shard_events, cover) = store.snapshot_shard(index);
        covers.push(cover);
        for event in shard_events {
            write_record(&mut out, snapshot_record::Kind::Event(event), &mut buf).map_err(io)?;
            events += 1;
        }
    }
    write_record(
        &mut out,
        snapshot_record::Kind::Trailer(SnapshotTrailer {
            events,
            cover_lsns: covers,
            // Taken after every shard was copied, so it covers each removal the copies do.
            id_floor: store.id_floor(),
        }),
        &mut buf,
    )
    .map_err(io)?;
    let file = out.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp_path, &final_path).map_err(StorageError::io(&final_path))?;
    sync_dir(dir)?;
    Ok(SnapshotInfo {
        path: final_path,
        events,
        bytes,
    })
}
