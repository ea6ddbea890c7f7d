//! The on-disk record framing shared by journal segments and snapshots.
//!
//! A file is `magic (8 bytes) || version (u32 BE)` followed by records:
//! `len (u32 BE) || crc32(body) (u32 BE) || crc32(len || crc32(body)) (u32 BE) || body`.
//! The header checksum lets a reader trust a length before it trusts the body, so a damaged
//! length is reported as damage at its offset instead of sending the reader astray. Whether
//! damage is a torn write at the end or corruption is for the file's reader to judge
//! ([`Damage`]), since only it knows which part of the file was ever acknowledged.

use std::path::{Path, PathBuf};

/// Bytes of a file header.
pub const FILE_HEADER_LEN: usize = 12;
/// Bytes of a record header.
pub const RECORD_HEADER_LEN: usize = 12;
/// Largest record body a reader accepts: far above any event (a journal record is one event,
/// at most one frame's worth), far below what would make a damaged length dangerous.
pub const MAX_RECORD_LEN: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a botd {kind} file of a supported version (bad header)")]
    BadHeader { path: PathBuf, kind: &'static str },
    #[error("{path} at offset {offset}: corrupt record ({reason}); refusing to start. Move the file away only if losing its records is acceptable")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("{path}: data directory is in use by another botd-relay")]
    Locked { path: PathBuf },
    #[error("journal writer failed: {0}")]
    WriterFailed(String),
}

impl StorageError {
    pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
        move |source| StorageError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

pub fn file_header(magic: &[u8; 8], version: u32) -> [u8; FILE_HEADER_LEN] {
    let mut header = [0u8; FILE_HEADER_LEN];
    header[..8].copy_from_slice(magic);
    header[8..].copy_from_slice(&version.to_be_bytes());
    header
}

/// The record header of a body of `len` bytes whose CRC-32 is `body_crc`.
pub fn record_header(len: usize, body_crc: u32) -> [u8; RECORD_HEADER_LEN] {
    let mut header = [0u8; RECORD_HEADER_LEN];
    header[..4].copy_from_slice(&(len as u32).to_be_bytes());
    header[4..8].copy_from_slice(&body_crc.to_be_bytes());
    let header_crc = crc32fast::hash(&header[..8]);
    header[8..].copy_from_slice(&header_crc.to_be_bytes());
    header
}

/// Appends one framed record whose body is `parts` concatenated.
pub fn append_record(buf: &mut Vec<u8>, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    buf.reserve(RECORD_HEADER_LEN + len);
    append_record_with(buf, |buf| {
        for part in parts {
            buf.extend_from_slice(part);
        }
    });
}

/// Appends one framed record whose body `write_body` appends to `buf`, behind room left for
/// the header (filled in after): a body encoded for the record lands in place, not encoded
/// elsewhere and copied (for a stored message, a copy of its payload).
pub fn append_record_with(buf: &mut Vec<u8>, write_body: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    let body_at = start + RECORD_HEADER_LEN;
    buf.resize(body_at, 0);
    write_body(buf);
    let header = record_header(buf.len() - body_at, crc32fast::hash(&buf[body_at..]));
    buf[start..body_at].copy_from_slice(&header);
}

/// How the bytes at some offset fail to be a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    /// The file ends inside the record (its header or its body).
    Truncated,
    /// Only zero bytes from here to the end: room the file system extended that a crash never
    /// filled.
    ZeroTail,
    HeaderChecksum,
    /// The body does not match its checksum; `at_end` when the record is the file's last.
    BodyChecksum {
        at_end: bool,
    },
    /// A length beyond [`MAX_RECORD_LEN`].
    TooLong,
}

impl Damage {
    pub fn describe(self) -> &'static str {
        match self {
            Damage::Truncated => "the file ends inside the record",
            Damage::ZeroTail => "zero bytes to the end of the file",
            Damage::HeaderChecksum => "record header checksum mismatch",
            Damage::BodyChecksum { .. } => "record body checksum mismatch",
            Damage::TooLong => "record length out of range",
        }
    }

    /// What a crash in the middle of appending the file's last record can leave, judged by
    /// this record alone (journals without batch markers).
    pub fn is_torn_last_record(self) -> bool {
        matches!(
            self,
            Damage::Truncated | Damage::ZeroTail | Damage::BodyChecksum { at_end: true }
        )
    }
}

/// One step of reading a file's records.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<'a> {
    Record {
        offset: u64,
        body: &'a [u8],
    },
    /// The bytes at `offset` are not a record; the reader stops there.
    Damaged {
        offset: u64,
        damage: Damage,
    },
    End,
}

/// Reads the records of a whole file held in memory.
pub struct RecordReader<'a> {
    path: &'a Path,
    data: &'a [u8],
    pos: usize,
    version: u32,
}

impl<'a> RecordReader<'a> {
    /// Checks the file header (one of `versions`) and positions the reader on the first record.
    pub fn new(
        path: &'a Path,
        data: &'a [u8],
        magic: &[u8; 8],
        versions: &[u32],
        kind: &'static str,
    ) -> Result<Self, StorageError> {
        let version = versions.iter().copied().find(|v| {
            data.len() >= FILE_HEADER_LEN && data[..FILE_HEADER_LEN] == file_header(magic, *v)
        });
        let Some(version) = version else {
            return Err(StorageError::BadHeader {
                path: path.to_owned(),
                kind,
            });
        };
        Ok(Self {
            path,
            data,
            pos: FILE_HEADER_LEN,
            version,
        })
    }

    /// The file's format version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Offset of the next record.
    pub fn position(&self) -> u64 {
        self.pos as u64
    }

    pub fn len(&self) -> u64 {
        self.data.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.data.len() <= FILE_HEADER_LEN
    }

    pub fn next_record(&mut self) -> Next<'a> {
        let rest = &self.data[self.pos..];
        let offset = self.pos as u64;
        if rest.is_empty() {
            return Next::End;
        }
        let damaged = |damage| Next::Damaged { offset, damage };
        if rest.iter().all(|b| *b == 0) {
            return damaged(Damage::ZeroTail);
        }
        if rest.len() < RECORD_HEADER_LEN {
            return damaged(Damage::Truncated);
        }
        let header = &rest[..RECORD_HEADER_LEN];
        let header_crc = u32::from_be_bytes(header[8..].try_into().expect("4 bytes"));
        if crc32fast::hash(&header[..8]) != header_crc {
            return damaged(Damage::HeaderChecksum);
        }
        let len = u32::from_be_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        if len > MAX_RECORD_LEN {
            return damaged(Damage::TooLong);
        }
        let body_crc = u32::from_be_bytes(header[4..8].try_into().expect("4 bytes"));
        let end = RECORD_HEADER_LEN + len;
        if rest.len() < end {
            return damaged(Damage::Truncated);
        }
        let body = &rest[RECORD_HEADER_LEN..end];
        if crc32fast::hash(body) != body_crc {
            return damaged(Damage::BodyChecksum {
                at_end: rest.len() == end,
            });
        }
        self.pos += end;
        Next::Record { offset, body }
    }

    /// A corruption error at the record that started at `offset`.
    pub fn corrupt_at(&self, offset: u64, reason: impl Into<String>) -> StorageError {
        StorageError::Corrupt {
            path: self.path.to_owned(),
            offset,
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGIC: &[u8; 8] = b"BOTDTEST";

    fn file(records: &[&[u8]]) -> Vec<u8> {
        let mut buf = file_header(MAGIC, 1).to_vec();
        for r in records {
            append_record(&mut buf, &[r]);
        }
        buf
    }

    /// The records read, and the damage that stopped the reader, if any.
    type Read = (Vec<Vec<u8>>, Option<(u64, Damage)>);

    fn read_all(data: &[u8]) -> Result<Read, StorageError> {
        let path = Path::new("test");
        let mut reader = RecordReader::new(path, data, MAGIC, &[1], "test")?;
        let mut out = Vec::new();
        loop {
            match reader.next_record() {
                Next::Record { body, .. } => out.push(body.to_vec()),
                Next::Damaged { offset, damage } => return Ok((out, Some((offset, damage)))),
                Next::End => return Ok((out, None)),
            }
        }
    }

    #[test]
    fn every_cut_of_the_last_record_is_a_torn_last_record() {
        let data = file(&[b"first", b"second record"]);
        let second_start = FILE_HEADER_LEN + RECORD_HEADER_LEN + 5;
        for cut in second_start..data.len() {
            let (records, damage) = read_all(&data[..cut]).unwrap();
            assert_eq!(records, vec![b"first".to_vec()], "cut at {cut}");
            match damage {
                None => assert_eq!(cut, second_start),
                Some((offset, damage)) => {
                    assert_eq!(offset, second_start as u64, "cut at {cut}");
                    assert!(damage.is_torn_last_record(), "cut at {cut}: {damage:?}");
                }
            }
        }
        assert_eq!(read_all(&data).unwrap().0.len(), 2);
    }

    #[test]
    fn a_flipped_byte_in_the_middle_is_damage_at_its_record() {
        let data = file(&[b"first", b"second", b"third"]);
        for at in [FILE_HEADER_LEN + 2, FILE_HEADER_LEN + RECORD_HEADER_LEN + 1] {
            let mut bad = data.clone();
            bad[at] ^= 0x40;
            let (records, damage) = read_all(&bad).unwrap();
            assert!(records.is_empty());
            let (offset, damage) = damage.expect("damage found");
            assert_eq!(offset, FILE_HEADER_LEN as u64);
            assert!(!damage.is_torn_last_record(), "byte {at}: {damage:?}");
        }
        let mut bad = data.clone();
        bad[0] ^= 1;
        assert!(matches!(
            read_all(&bad),
            Err(StorageError::BadHeader { .. })
        ));
    }

    #[test]
    fn zero_filled_tail_is_torn() {
        let mut data = file(&[b"first"]);
        let end = data.len() as u64;
        data.extend_from_slice(&[0u8; 100]);
        assert_eq!(
            read_all(&data).unwrap(),
            (vec![b"first".to_vec()], Some((end, Damage::ZeroTail)))
        );
    }

    #[test]
    fn a_huge_length_with_a_valid_header_checksum_is_damage_not_an_allocation() {
        let mut data = file_header(MAGIC, 1).to_vec();
        data.extend_from_slice(&record_header(u32::MAX as usize, 0));
        data.extend_from_slice(b"tail");
        assert_eq!(
            read_all(&data).unwrap().1,
            Some((FILE_HEADER_LEN as u64, Damage::TooLong))
        );
    }
}
