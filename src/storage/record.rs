//! The on-disk record framing shared by journal segments and snapshots.
//!
//! A file is `magic (8 bytes) || version (u32 BE)` followed by records:
//! `len (u32 BE) || crc32(body) (u32 BE) || crc32(len || crc32(body)) (u32 BE) || body`.
//! The header checksum lets a reader trust a length before it trusts the body, so a damaged
//! length in the middle of a file is reported as corruption instead of being mistaken for the
//! torn end of the file.

use std::path::{Path, PathBuf};

/// Bytes of a file header.
pub const FILE_HEADER_LEN: usize = 12;
/// Bytes of a record header.
pub const RECORD_HEADER_LEN: usize = 12;
/// Format version of both file kinds.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a botd {kind} file of version {FORMAT_VERSION} (bad header)")]
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

pub fn file_header(magic: &[u8; 8]) -> [u8; FILE_HEADER_LEN] {
    let mut header = [0u8; FILE_HEADER_LEN];
    header[..8].copy_from_slice(magic);
    header[8..].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
    header
}

/// Appends one framed record whose body is `parts` concatenated.
pub fn append_record(buf: &mut Vec<u8>, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut hasher = crc32fast::Hasher::new();
    for part in parts {
        hasher.update(part);
    }
    let body_crc = hasher.finalize();
    let mut header = [0u8; RECORD_HEADER_LEN];
    header[..4].copy_from_slice(&(len as u32).to_be_bytes());
    header[4..8].copy_from_slice(&body_crc.to_be_bytes());
    let header_crc = crc32fast::hash(&header[..8]);
    header[8..].copy_from_slice(&header_crc.to_be_bytes());
    buf.reserve(RECORD_HEADER_LEN + len);
    buf.extend_from_slice(&header);
    for part in parts {
        buf.extend_from_slice(part);
    }
}

/// One step of reading a file's records.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<'a> {
    Record {
        offset: u64,
        body: &'a [u8],
    },
    /// The file ends inside a record that was being written: everything from `offset` on is a
    /// torn write.
    TornTail {
        offset: u64,
    },
    End,
}

/// Reads the records of a whole file held in memory.
pub struct RecordReader<'a> {
    path: &'a Path,
    data: &'a [u8],
    pos: usize,
}

impl<'a> RecordReader<'a> {
    /// Checks the file header and positions the reader on the first record.
    pub fn new(
        path: &'a Path,
        data: &'a [u8],
        magic: &[u8; 8],
        kind: &'static str,
    ) -> Result<Self, StorageError> {
        if data.len() < FILE_HEADER_LEN || data[..FILE_HEADER_LEN] != file_header(magic) {
            return Err(StorageError::BadHeader {
                path: path.to_owned(),
                kind,
            });
        }
        Ok(Self {
            path,
            data,
            pos: FILE_HEADER_LEN,
        })
    }

    fn corrupt(&self, reason: impl Into<String>) -> StorageError {
        StorageError::Corrupt {
            path: self.path.to_owned(),
            offset: self.pos as u64,
            reason: reason.into(),
        }
    }

    pub fn next_record(&mut self) -> Result<Next<'a>, StorageError> {
        let rest = &self.data[self.pos..];
        let offset = self.pos as u64;
        if rest.is_empty() {
            return Ok(Next::End);
        }
        // Zeros to the end: space the file system extended but the crash never filled.
        if rest.len() < RECORD_HEADER_LEN || rest.iter().all(|b| *b == 0) {
            return Ok(Next::TornTail { offset });
        }
        let header = &rest[..RECORD_HEADER_LEN];
        let header_crc = u32::from_be_bytes(header[8..].try_into().expect("4 bytes"));
        if crc32fast::hash(&header[..8]) != header_crc {
            return Err(self.corrupt("record header checksum mismatch"));
        }
        let len = u32::from_be_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let body_crc = u32::from_be_bytes(header[4..8].try_into().expect("4 bytes"));
        let end = RECORD_HEADER_LEN + len;
        if rest.len() < end {
            return Ok(Next::TornTail { offset });
        }
        let body = &rest[RECORD_HEADER_LEN..end];
        if crc32fast::hash(body) != body_crc {
            if rest.len() == end {
                // The last record of the file, written only in part before a crash.
                return Ok(Next::TornTail { offset });
            }
            return Err(self.corrupt("record body checksum mismatch"));
        }
        self.pos += end;
        Ok(Next::Record { offset, body })
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
        let mut buf = file_header(MAGIC).to_vec();
        for r in records {
            append_record(&mut buf, &[r]);
        }
        buf
    }

    fn read_all(data: &[u8]) -> Result<(Vec<Vec<u8>>, Option<u64>), StorageError> {
        let path = Path::new("test");
        let mut reader = RecordReader::new(path, data, MAGIC, "test")?;
        let mut out = Vec::new();
        loop {
            match reader.next_record()? {
                Next::Record { body, .. } => out.push(body.to_vec()),
                Next::TornTail { offset } => return Ok((out, Some(offset))),
                Next::End => return Ok((out, None)),
            }
        }
    }

    #[test]
    fn every_cut_of_the_last_record_is_a_torn_tail() {
        let data = file(&[b"first", b"second record"]);
        let second_start = FILE_HEADER_LEN + RECORD_HEADER_LEN + 5;
        for cut in second_start..data.len() {
            let (records, torn) = read_all(&data[..cut]).unwrap();
            assert_eq!(records, vec![b"first".to_vec()], "cut at {cut}");
            let expected = if cut == second_start {
                None
            } else {
                Some(second_start as u64)
            };
            assert_eq!(torn, expected, "cut at {cut}");
        }
        assert_eq!(read_all(&data).unwrap().0.len(), 2);
    }

    #[test]
    fn a_flipped_byte_in_the_middle_is_corruption_with_its_offset() {
        let data = file(&[b"first", b"second", b"third"]);
        for at in [FILE_HEADER_LEN + 2, FILE_HEADER_LEN + RECORD_HEADER_LEN + 1] {
            let mut bad = data.clone();
            bad[at] ^= 0x40;
            match read_all(&bad) {
                Err(StorageError::Corrupt { offset, .. }) => {
                    assert_eq!(offset, FILE_HEADER_LEN as u64)
                }
                other => panic!("byte {at}: {other:?}"),
            }
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
            (vec![b"first".to_vec()], Some(end))
        );
    }
}
