//! The journal: every store event, appended as a framed record `lsn (u64 BE) || Event` to
//! segment files `journal-<first lsn>.log`. Sessions append to one in-memory buffer (which also
//! fixes the order: file order is lsn order); a writer thread takes whole batches, writes them
//! with one `write` and covers them with one `fdatasync` (group commit), then publishes the
//! durable lsn that waiting responses watch.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use prost::Message;
use tokio::sync::watch;

use super::record::{append_record, file_header, StorageError};
use crate::config::FsyncPolicy;
use crate::proto::store::Event;
use crate::relay::EventSink;

pub const JOURNAL_MAGIC: &[u8; 8] = b"BOTDJRNL";

/// Name of the segment whose first record has `lsn`.
pub fn segment_name(first_lsn: u64) -> String {
    super::numbered_name("journal-", first_lsn, ".log")
}

/// The first lsn of a segment, from its file name.
pub fn segment_first_lsn(name: &str) -> Option<u64> {
    super::name_number(name, "journal-", ".log")
}

/// Progress of the journal as seen by waiters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durable {
    UpTo(u64),
    /// Writing or syncing failed; nothing after this lsn will become durable.
    Failed(u64),
}

struct Pending {
    buf: Vec<u8>,
    next_lsn: u64,
    /// A snapshot asked for a new segment: the records from this offset of `buf` on, the first
    /// of which has this lsn, go into it.
    rotate_at: Option<(usize, u64)>,
    shutdown: bool,
}

/// How a journal writes.
#[derive(Debug, Clone, Copy)]
pub struct JournalOptions {
    pub policy: FsyncPolicy,
    pub fsync_interval: Duration,
    pub segment_bytes: u64,
    /// Encoded records waiting for the writer; past this, recording waits (backpressure).
    pub max_pending_bytes: usize,
}

impl JournalOptions {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            policy: config.fsync,
            fsync_interval: config.fsync_interval,
            segment_bytes: config.journal_segment_bytes,
            max_pending_bytes: config.journal_max_pending_bytes,
        }
    }
}

pub struct Journal {
    dir: PathBuf,
    policy: FsyncPolicy,
    fsync_interval: Duration,
    segment_bytes: u64,
    max_pending_bytes: usize,
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Signalled when the writer takes a batch, for recorders waiting on a full buffer.
    drained: Condvar,
    last_lsn: AtomicU64,
    /// Bytes appended since start, for the snapshot trigger.
    appended: AtomicU64,
    durable: watch::Sender<Durable>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Journal {
    /// Opens a new segment starting at `next_lsn` and starts the writer thread.
    pub fn start(
        dir: &Path,
        next_lsn: u64,
        options: JournalOptions,
    ) -> Result<Arc<Self>, StorageError> {
        let (durable, _) = watch::channel(Durable::UpTo(next_lsn - 1));
        let journal = Arc::new(Self {
            dir: dir.to_owned(),
            policy: options.policy,
            fsync_interval: options.fsync_interval,
            segment_bytes: options.segment_bytes,
            max_pending_bytes: options.max_pending_bytes.max(1 << 16),
            pending: Mutex::new(Pending {
                buf: Vec::with_capacity(1 << 20),
                next_lsn,
                rotate_at: None,
                shutdown: false,
            }),
            wake: Condvar::new(),
            drained: Condvar::new(),
            last_lsn: AtomicU64::new(next_lsn - 1),
            appended: AtomicU64::new(0),
            durable,
            writer: Mutex::new(None),
        });
        let file = journal.create_segment(next_lsn)?;
        let writer = journal.clone();
        let handle = std::thread::Builder::new()
            .name("botd-journal".into())
            .spawn(move || writer.write_loop(file, next_lsn))
            .map_err(StorageError::io(dir))?;
        *journal.writer.lock() = Some(handle);
        Ok(journal)
    }

    fn create_segment(&self, first_lsn: u64) -> Result<File, StorageError> {
        let path = self.dir.join(segment_name(first_lsn));
        let mut file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .map_err(StorageError::io(&path))?;
        file.write_all(&file_header(JOURNAL_MAGIC))
            .map_err(StorageError::io(&path))?;
        file.sync_all().map_err(StorageError::io(&path))?;
        sync_dir(&self.dir)?;
        Ok(file)
    }

    pub fn policy(&self) -> FsyncPolicy {
        self.policy
    }

    /// True once writing failed: no further change can be made durable.
    pub fn failed(&self) -> bool {
        matches!(*self.durable.borrow(), Durable::Failed(_))
    }

    /// Bytes appended since the journal started.
    pub fn appended_bytes(&self) -> u64 {
        self.appended.load(Ordering::Relaxed)
    }

    /// Starts a new segment with the next record; returns that record's lsn. Every record
    /// before it is in older segments.
    pub fn rotate(&self) -> u64 {
        let mut pending = self.pending.lock();
        let next = match pending.rotate_at {
            Some((_, first)) => first,
            None => {
                let at = (pending.buf.len(), pending.next_lsn);
                pending.rotate_at = Some(at);
                at.1
            }
        };
        self.wake.notify_one();
        next
    }

    /// Resolves once the record with `lsn` (and all before it) is durable under the policy.
    pub async fn wait_durable(&self, lsn: u64) -> Result<(), StorageError> {
        let mut rx = self.durable.subscribe();
        let state = rx
            .wait_for(|d| match d {
                Durable::UpTo(done) => *done >= lsn,
                Durable::Failed(_) => true,
            })
            .await
            .map(|d| *d)
            .unwrap_or(Durable::Failed(0));
        match state {
            Durable::UpTo(_) => Ok(()),
            Durable::Failed(at) => Err(StorageError::WriterFailed(format!(
                "journal stopped at lsn {at}"
            ))),
        }
    }

    /// Waits until everything recorded so far is written (and fsynced unless the policy is
    /// `never`), then stops the writer.
    pub fn shutdown(&self) {
        {
            let mut pending = self.pending.lock();
            pending.shutdown = true;
            self.wake.notify_one();
        }
        if let Some(handle) = self.writer.lock().take() {
            let _ = handle.join();
        }
    }

    fn write_loop(&self, file: File, first_lsn: u64) {
        let mut segment = Segment {
            path: self.dir.join(segment_name(first_lsn)),
            file,
            first_lsn,
            len: super::record::FILE_HEADER_LEN as u64,
        };
        let mut batch = Vec::with_capacity(1 << 20);
        let mut last_sync = Instant::now();
        let mut written_lsn = first_lsn - 1;
        let mut synced_lsn = written_lsn;
        loop {
            let (batch_last, rotate_at, shutdown) = {
                let mut pending = self.pending.lock();
                while pending.buf.is_empty() && pending.rotate_at.is_none() && !pending.shutdown {
                    let wait = match self.policy {
                        FsyncPolicy::Interval if synced_lsn < written_lsn => {
                            self.fsync_interval.saturating_sub(last_sync.elapsed())
                        }
                        _ => Duration::from_secs(3600),
                    };
                    if self.wake.wait_for(&mut pending, wait).timed_out() {
                        break;
                    }
                }
                std::mem::swap(&mut pending.buf, &mut batch);
                self.drained.notify_all();
                (
                    pending.next_lsn - 1,
                    pending.rotate_at.take(),
                    pending.shutdown,
                )
            };
            let result = (|| -> Result<(), StorageError> {
                // Records before the rotation point end the current segment.
                let split = rotate_at.map_or(batch.len(), |(offset, _)| offset);
                segment.append(&batch[..split])?;
                written_lsn = rotate_at.map_or(batch_last, |(_, first)| first - 1);
                let next_first = match rotate_at {
                    // Already at the start of a fresh segment: nothing to rotate.
                    Some((_, first)) if first == segment.first_lsn => None,
                    Some((_, first)) => Some(first),
                    None if segment.len >= self.segment_bytes => Some(batch_last + 1),
                    None => None,
                };
                if let Some(first) = next_first {
                    if self.policy != FsyncPolicy::Never {
                        segment.sync()?;
                        synced_lsn = written_lsn;
                    }
                    segment = Segment {
                        path: self.dir.join(segment_name(first)),
                        file: self.create_segment(first)?,
                        first_lsn: first,
                        len: super::record::FILE_HEADER_LEN as u64,
                    };
                    segment.append(&batch[split..])?;
                    written_lsn = batch_last;
                }
                batch.clear();
                let sync_due = match self.policy {
                    FsyncPolicy::Always => true,
                    FsyncPolicy::Interval => last_sync.elapsed() >= self.fsync_interval || shutdown,
                    FsyncPolicy::Never => false,
                };
                if sync_due && synced_lsn < written_lsn {
                    segment.sync()?;
                    synced_lsn = written_lsn;
                    last_sync = Instant::now();
                }
                Ok(())
            })();
            if let Err(err) = result {
                tracing::error!(error = %err, "journal write failed; no further change will be acknowledged");
                self.durable.send_replace(Durable::Failed(synced_lsn));
                return;
            }
            let published = match self.policy {
                FsyncPolicy::Always => synced_lsn,
                FsyncPolicy::Interval | FsyncPolicy::Never => written_lsn,
            };
            self.durable.send_if_modified(|d| {
                let changed = *d != Durable::UpTo(published);
                *d = Durable::UpTo(published);
                changed
            });
            if shutdown {
                return;
            }
        }
    }
}

/// The segment file being appended to.
struct Segment {
    path: PathBuf,
    file: File,
    first_lsn: u64,
    len: u64,
}

impl Segment {
    fn append(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        if !bytes.is_empty() {
            self.file
                .write_all(bytes)
                .map_err(StorageError::io(&self.path))?;
            self.len += bytes.len() as u64;
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.file.sync_data().map_err(StorageError::io(&self.path))
    }
}

impl EventSink for Journal {
    fn record(&self, event: &Event) -> u64 {
        let body = event.encode_to_vec();
        let mut pending = self.pending.lock();
        // Backpressure: a writer that falls behind (slow disk, `never` under overload) slows
        // the requests down instead of letting the buffer grow without bound.
        while pending.buf.len() >= self.max_pending_bytes && !pending.shutdown && !self.failed() {
            self.drained
                .wait_for(&mut pending, Duration::from_millis(100));
        }
        let lsn = pending.next_lsn;
        pending.next_lsn += 1;
        if pending.shutdown || self.failed() {
            // Nothing will write it: keep memory bounded; the change is refused by the caller.
            self.last_lsn.store(lsn, Ordering::Release);
            return lsn;
        }
        let before = pending.buf.len();
        append_record(&mut pending.buf, &[&lsn.to_be_bytes(), &body]);
        self.appended
            .fetch_add((pending.buf.len() - before) as u64, Ordering::Relaxed);
        self.last_lsn.store(lsn, Ordering::Release);
        drop(pending);
        self.wake.notify_one();
        lsn
    }

    fn last_lsn(&self) -> u64 {
        self.last_lsn.load(Ordering::Acquire)
    }
}

/// fsync of a directory, so that created, renamed and removed entries are durable.
pub fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StorageError::io(dir))
}
