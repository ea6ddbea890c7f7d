//! The journal: every store event, appended as a framed record `lsn (u64 BE) || Event` to
//! segment files `journal-<first lsn>.log`. Recorders append to one in-memory buffer under a
//! short lock (the event is encoded before the lock is taken; the lock fixes the order, so file
//! order is lsn order). Recording wakes nobody: a caller that will wait for
//! its records asks for the write once it has recorded all it has for now ([`Journal::kick`];
//! a connection does so after dispatching everything it read), so one write carries a whole
//! burst of requests instead of the writer chasing each record. A writer thread takes the whole
//! buffer and writes it with one system call behind a batch marker; a syncer thread covers what has been written with
//! one `fdatasync` (group commit): at once under `always`, every `fsync_interval` under
//! `interval`, never under `never`. Writes do not wait for an fsync in progress, so under load
//! each fsync covers every batch written while the previous one ran. Both threads publish how
//! far the journal is written and synced; answers wait on that progress asynchronously
//! ([`Progress::wait`]).
//!
//! **Batch markers.** Every write begins with a marker record (lsn 0) naming the lsns that
//! follow and the file offset up to which the segment was fsynced before the write. After a
//! power cut only the bytes written since the last fsync can be damaged, so recovery can tell a
//! torn tail (damage past that offset, of any number of records) from corruption (damage in
//! bytes that were synced).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{IoSlice, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use prost::Message;
use tokio::sync::Notify;

use super::record::{
    append_record_with, file_header, record_header, StorageError, FILE_HEADER_LEN,
    RECORD_HEADER_LEN,
};
use crate::config::FsyncPolicy;
use crate::store::proto::Event;

pub const JOURNAL_MAGIC: &[u8; 8] = b"BOTDJRNL";
/// Version 2: every write begins with a batch marker. Version 1 files (no markers) still read.
pub const JOURNAL_VERSION: u32 = 2;
pub const READABLE_VERSIONS: &[u32] = &[1, 2];
/// Largest lsn (and message id) the store accepts: beyond any real count, and far enough below
/// `u64::MAX` that adding one never wraps. Recovery refuses files with larger values.
pub const MAX_SEQUENCE: u64 = 1 << 62;
/// The lsn of batch markers; events start at 1.
pub const MARKER_LSN: u64 = 0;
/// Bytes of a marker body after its lsn: first lsn, last lsn, synced offset.
const MARKER_LEN: usize = 24;
/// The writer wakes on its own at least this often when it was not asked to write: records
/// nobody waits for (and a forgotten [`Journal::kick`]) are written within this.
const BACKSTOP: Duration = Duration::from_millis(10);
/// A buffer this large is written without waiting to be asked.
const KICK_BYTES: usize = 1 << 20;
/// Largest batch a runtime thread writes in place (one `write` into the page cache, a few
/// hundred microseconds at most); larger ones go to the writer thread.
const MAX_IN_PLACE_BYTES: usize = KICK_BYTES;

/// Name of the segment whose first record has `lsn`.
pub fn segment_name(first_lsn: u64) -> String {
    super::numbered_name("journal-", first_lsn, ".log")
}

/// The first lsn of a segment, from its file name.
pub fn segment_first_lsn(name: &str) -> Option<u64> {
    super::name_number(name, "journal-", ".log")
}

/// A batch marker's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchMarker {
    pub first_lsn: u64,
    pub last_lsn: u64,
    /// No crash can damage the segment before this offset: how far it was fsynced when the
    /// batch was written (under `fsync = never`, which never syncs, where this batch starts: a
    /// crash of the process cannot damage completed writes, and a power cut under `never` may
    /// lose anything, so recovery then refuses to guess).
    pub synced_offset: u64,
}

impl BatchMarker {
    /// The whole framed marker record.
    fn encode(&self) -> [u8; RECORD_HEADER_LEN + 8 + MARKER_LEN] {
        let mut body = [0u8; 8 + MARKER_LEN];
        body[..8].copy_from_slice(&MARKER_LSN.to_be_bytes());
        body[8..16].copy_from_slice(&self.first_lsn.to_be_bytes());
        body[16..24].copy_from_slice(&self.last_lsn.to_be_bytes());
        body[24..32].copy_from_slice(&self.synced_offset.to_be_bytes());
        let mut out = [0u8; RECORD_HEADER_LEN + 8 + MARKER_LEN];
        let header = record_header(body.len(), crc32fast::hash(&body));
        out[..header.len()].copy_from_slice(&header);
        out[header.len()..].copy_from_slice(&body);
        out
    }

    /// Reads a marker from a record body whose lsn is [`MARKER_LSN`].
    pub fn decode(body: &[u8]) -> Option<Self> {
        let rest = body.get(8..)?;
        if rest.len() != MARKER_LEN {
            return None;
        }
        let word = |i: usize| u64::from_be_bytes(rest[i..i + 8].try_into().expect("8 bytes"));
        Some(Self {
            first_lsn: word(0),
            last_lsn: word(8),
            synced_offset: word(16),
        })
    }
}

/// How far the journal has got, for waiters.
#[derive(Debug)]
pub struct Progress {
    policy: FsyncPolicy,
    /// Highest lsn handed to the operating system (`write` returned).
    written: AtomicU64,
    /// Highest lsn covered by an fsync.
    synced: AtomicU64,
    failed: AtomicBool,
    changed: Notify,
}

impl Progress {
    fn new(policy: FsyncPolicy, last: u64) -> Self {
        Self {
            policy,
            written: AtomicU64::new(last),
            synced: AtomicU64::new(last),
            failed: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    /// A progress that is always complete: for a store without a journal.
    pub fn complete() -> Arc<Self> {
        Arc::new(Self::new(FsyncPolicy::Never, u64::MAX))
    }

    /// The highest lsn an answer may rely on under the policy: synced under `always`, written
    /// (handed to the OS, so a crash of the process loses nothing) otherwise.
    pub fn durable(&self) -> u64 {
        match self.policy {
            FsyncPolicy::Always => self.synced.load(Ordering::Acquire),
            FsyncPolicy::Interval | FsyncPolicy::Never => self.written.load(Ordering::Acquire),
        }
    }

    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Resolves once the record `lsn` (and every one before it) is durable, or the journal
    /// failed. Allocates nothing; no lock is held while waiting. A poll with the no-op waker
    /// (a connection's first look at an answer it dispatched: it polls the answer again, with
    /// its own waker, once it is at the head of its pipeline) does not join the waiters, so
    /// only the answer a connection waits for is registered, not every answer in its pipeline.
    pub async fn wait(&self, lsn: u64) -> Result<(), StorageError> {
        if self.durable() >= lsn {
            return Ok(());
        }
        unobserved_pending().await;
        loop {
            let notified = self.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.durable() >= lsn {
                return Ok(());
            }
            if self.failed() {
                return Err(StorageError::WriterFailed(
                    "the journal can no longer be written".into(),
                ));
            }
            notified.await;
        }
    }

    fn publish(&self, counter: &AtomicU64, lsn: u64) {
        counter.store(lsn, Ordering::Release);
        self.changed.notify_waiters();
    }

    fn fail(&self) {
        self.failed.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }
}

/// Pending once, without arranging a wake-up, when polled with the no-op waker (nobody would
/// be woken: whoever polls that way polls again when it cares); else ready at once.
fn unobserved_pending() -> impl std::future::Future<Output = ()> {
    let mut first = true;
    std::future::poll_fn(move |cx| {
        if std::mem::take(&mut first) && cx.waker().will_wake(std::task::Waker::noop()) {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
}

struct Pending {
    buf: Vec<u8>,
    next_lsn: u64,
    /// The lsn of the first record in `buf`.
    buf_first_lsn: u64,
    /// A snapshot asked for a new segment: the records from this offset of `buf` on, the first
    /// of which has this lsn, go into it.
    rotate_at: Option<(usize, u64)>,
    shutdown: bool,
    /// Someone asked for the buffer to be written.
    kicked: bool,
}

/// How a journal writes.
#[derive(Debug, Clone, Copy)]
pub struct JournalOptions {
    pub policy: FsyncPolicy,
    pub fsync_interval: Duration,
    pub segment_bytes: u64,
    /// Encoded records waiting for the writer; past this the store reports congestion and
    /// sessions wait before they send more changes.
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
    /// The writer waits on `wake`: only then do recorders need to signal it.
    writer_waiting: AtomicBool,
    /// Test hook ([`Journal::hold_writes`]): the writer takes no batch while set.
    held: AtomicBool,
    /// Bytes in the pending buffer, readable without the lock.
    pending_bytes: AtomicUsize,
    /// Signalled whenever the writer takes a batch (room in the buffer).
    room: Notify,
    last_lsn: AtomicU64,
    /// Bytes appended since start, for the snapshot trigger.
    appended: AtomicU64,
    progress: Arc<Progress>,
    /// What the writer has written and the syncer has yet to cover.
    to_sync: Mutex<SyncQueue>,
    sync_wake: Condvar,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    syncer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The segment being written: held by whoever writes a batch (the writer thread, or a
    /// runtime thread flushing in place), so batches reach the file in lsn order.
    writing: Mutex<Option<Writer>>,
    /// Set while a flush on the runtime is due ([`Journal::kick`] woke the flusher task).
    flush_scheduled: AtomicBool,
    /// Wakes the flusher task, when the journal was started inside a tokio runtime.
    flusher: Option<Arc<Notify>>,
}

/// What the one writing a batch needs: the segment, how far it is written, and the buffer
/// the pending records are swapped into.
struct Writer {
    segment: Segment,
    written_lsn: u64,
    batch: Vec<u8>,
}

/// What [`Journal::write_pending`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wrote {
    /// Nothing was pending (another writer took it).
    Nothing,
    Batch,
    /// The batch was written and the journal is shutting down.
    Shutdown,
    /// Only the writer thread may take this batch (a rotation, a new segment, a large batch,
    /// held writes, shutdown): it was left pending.
    LeftForThread,
}

/// A segment file the writer has written up to `lsn` (and `len` bytes).
struct Written {
    file: Arc<File>,
    path: PathBuf,
    lsn: u64,
    len: u64,
    /// Where the syncer records how far it has synced the file, for the batch markers.
    synced_len: Arc<AtomicU64>,
}

#[derive(Default)]
struct SyncQueue {
    /// In write order; consecutive writes of one file are merged.
    written: VecDeque<Written>,
    /// The writer has stopped: sync what is queued and stop.
    stopping: bool,
}

impl Journal {
    /// Opens a new segment starting at `next_lsn` and starts the writer thread.
    pub fn start(
        dir: &Path,
        next_lsn: u64,
        options: JournalOptions,
    ) -> Result<Arc<Self>, StorageError> {
        let next_lsn = next_lsn.max(1);
        let journal = Arc::new(Self {
            dir: dir.to_owned(),
            policy: options.policy,
            fsync_interval: options.fsync_interval,
            segment_bytes: options.segment_bytes,
            max_pending_bytes: options.max_pending_bytes.max(1 << 16),
            pending: Mutex::new(Pending {
                buf: Vec::with_capacity(1 << 16),
                next_lsn,
                buf_first_lsn: next_lsn,
                rotate_at: None,
                shutdown: false,
                kicked: false,
            }),
            wake: Condvar::new(),
            writer_waiting: AtomicBool::new(false),
            held: AtomicBool::new(false),
            pending_bytes: AtomicUsize::new(0),
            room: Notify::new(),
            last_lsn: AtomicU64::new(next_lsn - 1),
            appended: AtomicU64::new(0),
            progress: Arc::new(Progress::new(options.policy, next_lsn - 1)),
            to_sync: Mutex::new(SyncQueue::default()),
            sync_wake: Condvar::new(),
            writer: Mutex::new(None),
            syncer: Mutex::new(None),
            writing: Mutex::new(None),
            flush_scheduled: AtomicBool::new(false),
            flusher: tokio::runtime::Handle::try_current()
                .is_ok()
                .then(|| Arc::new(Notify::new())),
        });
        let file = journal.create_segment(next_lsn)?;
        *journal.writing.lock() = Some(Writer {
            segment: journal.new_segment(file, next_lsn),
            written_lsn: next_lsn - 1,
            batch: Vec::with_capacity(1 << 16),
        });
        if let Some(wake) = &journal.flusher {
            tokio::spawn(flush_task(Arc::downgrade(&journal), wake.clone()));
        }
        if options.policy != FsyncPolicy::Never {
            let syncer = journal.clone();
            let handle = std::thread::Builder::new()
                .name("botd-fsync".into())
                .spawn(move || syncer.sync_loop())
                .map_err(StorageError::io(dir))?;
            *journal.syncer.lock() = Some(handle);
        }
        let writer = journal.clone();
        let handle = std::thread::Builder::new()
            .name("botd-journal".into())
            .spawn(move || writer.write_loop())
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
        file.write_all(&file_header(JOURNAL_MAGIC, JOURNAL_VERSION))
            .map_err(StorageError::io(&path))?;
        file.sync_all().map_err(StorageError::io(&path))?;
        sync_dir(&self.dir)?;
        Ok(file)
    }

    pub fn policy(&self) -> FsyncPolicy {
        self.policy
    }

    pub fn progress(&self) -> &Arc<Progress> {
        &self.progress
    }

    /// True once writing failed: no further change can be made durable.
    pub fn failed(&self) -> bool {
        self.progress.failed()
    }

    /// Bytes appended since the journal started.
    pub fn appended_bytes(&self) -> u64 {
        self.appended.load(Ordering::Relaxed)
    }

    /// The highest lsn handed out so far.
    pub fn last_lsn(&self) -> u64 {
        self.last_lsn.load(Ordering::Acquire)
    }

    /// Encoded records waiting for the writer.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes.load(Ordering::Acquire)
    }

    /// Test hook: until the returned guard is dropped the writer writes nothing, as if the
    /// disk had stalled: records pile up in the buffer, nothing new becomes durable, and past
    /// `journal_max_pending_bytes` the journal is congested. A rotation or a shutdown still
    /// writes.
    #[doc(hidden)]
    pub fn hold_writes(self: &Arc<Self>) -> WritesHeld {
        self.held.store(true, Ordering::Release);
        WritesHeld {
            journal: self.clone(),
        }
    }

    /// True while the writer is behind by more than `journal_max_pending_bytes`.
    pub fn congested(&self) -> bool {
        self.pending_bytes.load(Ordering::Acquire) >= self.max_pending_bytes
    }

    /// Resolves once the buffer is below its bound again (or the journal stopped).
    pub async fn until_uncongested(&self) {
        loop {
            let notified = self.room.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if !self.congested() || self.failed() {
                return;
            }
            notified.await;
        }
    }

    /// Appends an event; returns its lsn. Fails once the writer has failed or stopped: the
    /// change must then be refused.
    pub fn record(&self, event: &Event) -> Result<u64, StorageError> {
        let body_len = event.encoded_len();
        let mut pending = self.pending.lock();
        if pending.shutdown || self.failed() {
            return Err(StorageError::WriterFailed("the journal is stopped".into()));
        }
        let lsn = pending.next_lsn;
        if lsn >= MAX_SEQUENCE {
            return Err(StorageError::WriterFailed(format!(
                "lsn {lsn} reached the limit of {MAX_SEQUENCE}"
            )));
        }
        pending.next_lsn += 1;
        // Encoded in place: the checksum covers `lsn || event`, so the record can only be
        // framed here, where the lsn is known.
        let lsn_bytes = lsn.to_be_bytes();
        let before = pending.buf.len();
        pending
            .buf
            .reserve(RECORD_HEADER_LEN + lsn_bytes.len() + body_len);
        append_record_with(&mut pending.buf, |buf| {
            buf.extend_from_slice(&lsn_bytes);
            event.encode(buf).expect("a Vec grows as the event needs");
        });
        let size = pending.buf.len();
        self.pending_bytes.store(size, Ordering::Release);
        self.last_lsn.store(lsn, Ordering::Release);
        let full = size >= KICK_BYTES && before < KICK_BYTES;
        if full {
            pending.kicked = true;
        }
        drop(pending);
        self.appended
            .fetch_add((size - before) as u64, Ordering::Relaxed);
        if full && self.writer_waiting.load(Ordering::Acquire) {
            self.wake.notify_one();
        }
        Ok(lsn)
    }

    /// Asks for what is recorded to be written: called by whoever will wait for it, once it
    /// has recorded everything it has for now. Inside a tokio runtime the write is done by the
    /// flusher task on the runtime itself, after the tasks that are ready now have run (so
    /// every connection served in one turn of the scheduler shares one write, and no thread
    /// is woken for it); otherwise, and for what only the writer thread may write, the writer
    /// thread is woken.
    pub fn kick(&self) {
        if self.pending_bytes.load(Ordering::Acquire) == 0 {
            return;
        }
        if let Some(flusher) = &self.flusher {
            if !self.flush_scheduled.swap(true, Ordering::AcqRel) {
                flusher.notify_one();
            }
            return;
        }
        self.kick_thread();
    }

    /// Wakes the writer thread for what is pending.
    fn kick_thread(&self) {
        let mut pending = self.pending.lock();
        pending.kicked = true;
        drop(pending);
        if self.writer_waiting.load(Ordering::Acquire) {
            self.wake.notify_one();
        }
    }

    /// The flusher's turn: writes what is pending here unless the writer thread is writing
    /// (it then takes the rest next) or the batch is one for the thread.
    fn flush_in_place(&self) {
        self.flush_scheduled.store(false, Ordering::Release);
        let Some(mut writing) = self.writing.try_lock() else {
            self.kick_thread();
            return;
        };
        let Some(writer) = writing.as_mut() else {
            return;
        };
        match self.write_pending(writer, true) {
            Ok(Wrote::LeftForThread) => {
                drop(writing);
                self.kick_thread();
            }
            Ok(_) => {}
            Err(err) => {
                *writing = None;
                self.fail(&err);
            }
        }
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

    /// Waits until everything recorded so far is written (and fsynced unless the policy is
    /// `never`), then stops the writer.
    pub fn shutdown(&self) {
        {
            let mut pending = self.pending.lock();
            pending.shutdown = true;
            self.wake.notify_one();
        }
        if let Some(flusher) = &self.flusher {
            flusher.notify_one();
        }
        if let Some(handle) = self.writer.lock().take() {
            let _ = handle.join();
        }
        {
            let mut queue = self.to_sync.lock();
            queue.stopping = true;
            self.sync_wake.notify_one();
        }
        if let Some(handle) = self.syncer.lock().take() {
            let _ = handle.join();
        }
    }

    fn new_segment(&self, file: File, first_lsn: u64) -> Segment {
        Segment {
            path: self.dir.join(segment_name(first_lsn)),
            file: Arc::new(file),
            first_lsn,
            len: FILE_HEADER_LEN as u64,
            synced_len: Arc::new(AtomicU64::new(FILE_HEADER_LEN as u64)),
            never_syncs: self.policy == FsyncPolicy::Never,
        }
    }

    /// Takes batches from the pending buffer and writes them when asked ([`Journal::kick`]
    /// without a runtime, a full buffer, a rotation, shutdown) or at the latest after
    /// [`BACKSTOP`]; hands what it wrote to the syncer. Never waits for an fsync.
    fn write_loop(&self) {
        loop {
            {
                let mut pending = self.pending.lock();
                while (pending.buf.is_empty()
                    || !pending.kicked
                    || self.held.load(Ordering::Acquire))
                    && pending.rotate_at.is_none()
                    && !pending.shutdown
                {
                    self.writer_waiting.store(true, Ordering::Release);
                    let timed_out = self.wake.wait_for(&mut pending, BACKSTOP).timed_out();
                    self.writer_waiting.store(false, Ordering::Release);
                    if timed_out && !pending.buf.is_empty() && !self.held.load(Ordering::Acquire) {
                        break;
                    }
                }
            }
            let mut writing = self.writing.lock();
            let Some(writer) = writing.as_mut() else {
                // A flush in place failed: the journal is failed.
                return;
            };
            match self.write_pending(writer, false) {
                Ok(Wrote::Shutdown) => return,
                Ok(_) => {}
                Err(err) => {
                    *writing = None;
                    self.fail(&err);
                    return;
                }
            }
        }
    }

    /// Takes the pending records and writes them behind their batch marker, into the current
    /// segment or, at a rotation or once the segment is full, partly into a new one. `in_place`
    /// (a runtime thread): only a batch that is small, fits in the current segment and needs
    /// no rotation, while writes are not held and the journal is not shutting down; anything
    /// else is left pending for the writer thread.
    fn write_pending(&self, writer: &mut Writer, in_place: bool) -> Result<Wrote, StorageError> {
        let (batch_first, batch_last, rotate_at, shutdown) = {
            let mut pending = self.pending.lock();
            if in_place
                && (pending.rotate_at.is_some()
                    || pending.shutdown
                    || self.held.load(Ordering::Acquire)
                    || pending.buf.len() > MAX_IN_PLACE_BYTES
                    || writer.segment.len + (pending.buf.len() as u64) >= self.segment_bytes)
            {
                return Ok(if pending.buf.is_empty() {
                    Wrote::Nothing
                } else {
                    Wrote::LeftForThread
                });
            }
            if pending.buf.is_empty() && pending.rotate_at.is_none() && !pending.shutdown {
                return Ok(Wrote::Nothing);
            }
            pending.kicked = false;
            std::mem::swap(&mut pending.buf, &mut writer.batch);
            let first = pending.buf_first_lsn;
            pending.buf_first_lsn = pending.next_lsn;
            self.pending_bytes.store(0, Ordering::Release);
            (
                first,
                pending.next_lsn - 1,
                pending.rotate_at.take(),
                pending.shutdown,
            )
        };
        self.room.notify_waiters();
        let batch = std::mem::take(&mut writer.batch);
        let result = self.write_batch(writer, &batch, batch_first, batch_last, rotate_at);
        writer.batch = batch;
        writer.batch.clear();
        result?;
        Ok(if shutdown {
            Wrote::Shutdown
        } else {
            Wrote::Batch
        })
    }

    /// Writes one batch (lsns `batch_first..=batch_last`) and publishes how far the journal is
    /// written.
    fn write_batch(
        &self,
        writer: &mut Writer,
        batch: &[u8],
        batch_first: u64,
        batch_last: u64,
        rotate_at: Option<(usize, u64)>,
    ) -> Result<(), StorageError> {
        // Records before the rotation point end the current segment; the rest go to the new
        // one (or stay here when the segment is still fresh).
        let (split, tail_first) = match rotate_at {
            Some((offset, first)) => (offset, first),
            None => (batch.len(), batch_last + 1),
        };
        let segment = &mut writer.segment;
        segment.append(&batch[..split], batch_first, tail_first - 1)?;
        self.hand_to_syncer(segment, tail_first - 1);
        let new_segment = match rotate_at {
            Some((_, first)) if first == segment.first_lsn => None,
            Some((_, first)) => Some(first),
            None if segment.len >= self.segment_bytes => Some(batch_last + 1),
            None => None,
        };
        if let Some(first) = new_segment {
            *segment = self.new_segment(self.create_segment(first)?, first);
        }
        segment.append(&batch[split..], tail_first, batch_last)?;
        self.hand_to_syncer(segment, batch_last);
        writer.written_lsn = writer.written_lsn.max(batch_last);
        // Waiters under `always` watch the synced lsn only.
        if self.policy == FsyncPolicy::Always {
            self.progress
                .written
                .store(writer.written_lsn, Ordering::Release);
        } else {
            self.progress
                .publish(&self.progress.written, writer.written_lsn);
        }
        Ok(())
    }

    /// Tells the syncer that `segment` holds everything up to `lsn`.
    fn hand_to_syncer(&self, segment: &Segment, lsn: u64) {
        if self.policy == FsyncPolicy::Never {
            return;
        }
        let mut queue = self.to_sync.lock();
        // Under `interval` a syncer with work queued sleeps until its next fsync is due and
        // needs no wake-up; an empty queue means it waits for work.
        let wake = self.policy == FsyncPolicy::Always || queue.written.is_empty();
        match queue.written.back_mut() {
            Some(last) if Arc::ptr_eq(&last.file, &segment.file) => {
                last.lsn = last.lsn.max(lsn);
                last.len = segment.len;
            }
            _ => queue.written.push_back(Written {
                file: segment.file.clone(),
                path: segment.path.clone(),
                lsn,
                len: segment.len,
                synced_len: segment.synced_len.clone(),
            }),
        }
        if wake {
            self.sync_wake.notify_one();
        }
    }

    /// Covers what was written with fsyncs: as soon as there is something under `always`, at
    /// most every `fsync_interval` under `interval`; publishes the synced lsn.
    fn sync_loop(&self) {
        let mut last_sync = Instant::now();
        loop {
            let (work, stopping) = {
                let mut queue = self.to_sync.lock();
                loop {
                    if queue.stopping {
                        break;
                    }
                    if !queue.written.is_empty() {
                        let due = match self.policy {
                            FsyncPolicy::Interval => {
                                self.fsync_interval.saturating_sub(last_sync.elapsed())
                            }
                            _ => Duration::ZERO,
                        };
                        if due.is_zero() {
                            break;
                        }
                        self.sync_wake.wait_for(&mut queue, due);
                        continue;
                    }
                    self.sync_wake.wait(&mut queue);
                }
                (std::mem::take(&mut queue.written), queue.stopping)
            };
            last_sync = Instant::now();
            for written in work {
                if let Err(err) = written
                    .file
                    .sync_data()
                    .map_err(StorageError::io(&written.path))
                {
                    self.fail(&err);
                    return;
                }
                written.synced_len.fetch_max(written.len, Ordering::AcqRel);
                self.progress.publish(&self.progress.synced, written.lsn);
            }
            if stopping && self.to_sync.lock().written.is_empty() {
                return;
            }
        }
    }

    fn fail(&self, err: &StorageError) {
        tracing::error!(error = %err, "journal write failed; no further change will be acknowledged");
        self.progress.fail();
        self.room.notify_waiters();
    }
}

/// The flusher: once kicked, waits until the tasks that are ready now have run (their records
/// join the same write), then writes in place. Ends when the journal shuts down or is gone.
async fn flush_task(journal: std::sync::Weak<Journal>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        // Deferred until the scheduler has run out of ready tasks and polled for IO.
        tokio::task::yield_now().await;
        let Some(journal) = journal.upgrade() else {
            return;
        };
        if journal.pending.lock().shutdown {
            return;
        }
        journal.flush_in_place();
    }
}

/// Returned by [`Journal::hold_writes`]; dropping it lets the writer go on.
#[doc(hidden)]
pub struct WritesHeld {
    journal: Arc<Journal>,
}

impl Drop for WritesHeld {
    fn drop(&mut self) {
        self.journal.held.store(false, Ordering::Release);
        let mut pending = self.journal.pending.lock();
        pending.kicked = true;
        drop(pending);
        self.journal.wake.notify_one();
    }
}

/// The segment file being appended to.
struct Segment {
    path: PathBuf,
    file: Arc<File>,
    first_lsn: u64,
    len: u64,
    /// Offset before which no crash can damage the file (see [`BatchMarker::synced_offset`]),
    /// kept by the syncer.
    synced_len: Arc<AtomicU64>,
    never_syncs: bool,
}

impl Segment {
    /// Writes `records` (lsns `first..=last`) behind their batch marker, with one system call
    /// unless the kernel takes less.
    fn append(&mut self, records: &[u8], first: u64, last: u64) -> Result<(), StorageError> {
        if records.is_empty() {
            return Ok(());
        }
        if self.never_syncs {
            self.synced_len.store(self.len, Ordering::Release);
        }
        let marker = BatchMarker {
            first_lsn: first,
            last_lsn: last,
            synced_offset: self.synced_len.load(Ordering::Acquire),
        }
        .encode();
        let total = marker.len() + records.len();
        let mut done = 0;
        let mut file: &File = &self.file;
        while done < total {
            let result = if done < marker.len() {
                file.write_vectored(&[IoSlice::new(&marker[done..]), IoSlice::new(records)])
            } else {
                file.write(&records[done - marker.len()..])
            };
            match result {
                Ok(0) => {
                    return Err(StorageError::Io {
                        path: self.path.clone(),
                        source: std::io::ErrorKind::WriteZero.into(),
                    })
                }
                Ok(n) => done += n,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(err) => return Err(StorageError::io(&self.path)(err)),
            }
        }
        self.len += total as u64;
        Ok(())
    }
}

/// fsync of a directory, so that created, renamed and removed entries are durable.
pub fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StorageError::io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_polled_without_a_waker_joins_no_waiters_and_completes_later() {
        use std::future::Future;
        use std::task::{Context, Poll, Waker};
        let progress = Progress::new(FsyncPolicy::Interval, 0);
        let mut wait = Box::pin(progress.wait(2));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        progress.publish(&progress.written, 1);
        let counter = Arc::new(WakeCounter::default());
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(
            wait.as_mut().poll(&mut cx).is_pending(),
            "lsn 2 is not written yet"
        );
        progress.publish(&progress.written, 2);
        assert!(
            counter.0.load(Ordering::SeqCst) > 0,
            "the registered waiter is woken"
        );
        assert!(matches!(wait.as_mut().poll(&mut cx), Poll::Ready(Ok(()))));
        // Already durable: ready at the first poll, whatever the waker.
        let mut done = Box::pin(progress.wait(2));
        assert!(matches!(
            done.as_mut().poll(&mut Context::from_waker(Waker::noop())),
            Poll::Ready(Ok(()))
        ));
    }

    #[derive(Default)]
    struct WakeCounter(AtomicU64);

    impl std::task::Wake for WakeCounter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// What `record` frames in place is what recovery reads back: every record's checksum, its
    /// lsn and its event, for events small and large (a payload far beyond the batch's
    /// initial capacity) recorded into one batch.
    #[test]
    fn recorded_events_read_back_with_their_lsns_and_checksums() {
        use super::super::record::{Next, RecordReader};
        use crate::store::proto::{event::Kind, MessageStored};
        use bytes::Bytes;
        let dir = crate::testing::TempDir::new("journal-record");
        let options = JournalOptions {
            policy: FsyncPolicy::Never,
            fsync_interval: Duration::from_millis(10),
            segment_bytes: 64 << 20,
            max_pending_bytes: 64 << 20,
        };
        let journal = Journal::start(dir.path(), 5, options).expect("the journal starts");
        let events: Vec<Event> = [3usize, 300 * 1024, 0, 17]
            .iter()
            .enumerate()
            .map(|(i, &len)| Event {
                kind: Some(Kind::MessageStored(MessageStored {
                    message_id: i as u64 + 1,
                    payload: Bytes::from(vec![i as u8 + 1; len]),
                    ..Default::default()
                })),
            })
            .collect();
        for (i, event) in events.iter().enumerate() {
            assert_eq!(journal.record(event).expect("recorded"), 5 + i as u64);
        }
        journal.shutdown();

        let path = dir.path().join(segment_name(5));
        let data = std::fs::read(&path).expect("the segment is written");
        let mut reader =
            RecordReader::new(&path, &data, JOURNAL_MAGIC, READABLE_VERSIONS, "journal")
                .expect("the segment's header");
        let mut read = Vec::new();
        loop {
            match reader.next_record() {
                Next::Record { body, .. } => {
                    let lsn = u64::from_be_bytes(body[..8].try_into().unwrap());
                    if lsn != MARKER_LSN {
                        read.push((lsn, Event::decode(&body[8..]).expect("the event decodes")));
                    }
                }
                Next::End => break,
                damaged => panic!("a record the journal wrote is damaged: {damaged:?}"),
            }
        }
        let expected: Vec<(u64, Event)> = (5..).zip(events).collect();
        assert_eq!(read, expected);
    }

    #[test]
    fn markers_round_trip() {
        let marker = BatchMarker {
            first_lsn: 7,
            last_lsn: 9,
            synced_offset: 4096,
        };
        let framed = marker.encode();
        let body = &framed[RECORD_HEADER_LEN..];
        assert_eq!(
            u64::from_be_bytes(body[..8].try_into().unwrap()),
            MARKER_LSN
        );
        assert_eq!(BatchMarker::decode(body), Some(marker));
        assert_eq!(BatchMarker::decode(&body[..20]), None);
    }
}
