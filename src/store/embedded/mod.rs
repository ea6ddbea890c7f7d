//! The embedded store, the relay's default: the whole state in memory ([`state`]), every change
//! appended to a journal ([`journal`]) before its answer leaves, periodic snapshots
//! ([`snapshot`]) that bound the journal, and recovery at start ([`recovery`]). Also the data
//! directory's layout and lock.
//!
//! ```text
//! <data_dir>/identity.key                 the relay's secret key (0600; kept by the binary)
//! <data_dir>/LOCK                         held while a relay uses the directory
//! <data_dir>/journal/journal-<lsn>.log    journal segments, named by their first record's lsn
//! <data_dir>/snapshots/snapshot-<n>.snap  snapshots; the newest is used
//! ```
//!
//! Every operation is applied in memory before the call returns (so a session's pipelined
//! requests take effect in order); the future it returns waits, without holding any lock, for
//! the journal to cover the change under the fsync policy, then announces newly durable
//! messages to the listener.

pub mod disk;
pub mod journal;
pub mod mailbox;
pub mod record;
pub mod recovery;
pub mod snapshot;
pub mod state;

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use futures_util::future::Either;
use futures_util::FutureExt as _;
use parking_lot::Mutex;

pub use journal::{Journal, JournalOptions, Progress};
pub use record::StorageError;
pub use recovery::RecoveryReport;
pub use snapshot::SnapshotInfo;
use state::Change;
pub use state::State;

use super::{
    Appended, Expiry, Fetched, Identity, Listener, MailboxId, Message, NewMessage, Registration,
    Store, StoreError, StoreResult, StoreStats, StoreTotals, TICKET_LEN,
};
use crate::config::Config;
use botd_protocol::proto::{Accept, PreKey, SignedPreKey};

const LOCK_FILE: &str = "LOCK";
pub(crate) const JOURNAL_DIR: &str = "journal";
pub(crate) const SNAPSHOT_DIR: &str = "snapshots";

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

/// The data directory of a durable store.
struct Files {
    data_dir: PathBuf,
    journal: Arc<Journal>,
    /// One snapshot at a time.
    snapshot_guard: Mutex<()>,
    _lock: File,
}

struct Inner {
    state: State,
    listener: OnceLock<Arc<dyn Listener>>,
    max_pipelined: usize,
    files: Option<Files>,
}

impl Inner {
    /// Announces what became durable in `shard`.
    fn release(&self, shard: usize) {
        if let Some(listener) = self.listener.get() {
            self.state.release(shard, &**listener);
        }
    }

    /// A future that resolves once `lsn` is durable.
    fn durable(&self, lsn: u64) -> impl Future<Output = StoreResult<()>> + Send + use<> {
        let progress = self.state.progress().clone();
        async move {
            progress
                .wait(lsn)
                .await
                .map_err(|err| StoreError::Unavailable(err.to_string()))
        }
    }
}

/// The embedded store. Cheap to clone: clones share one state.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

impl EmbeddedStore {
    /// A store that lives only in memory (tests, benchmarks): changes are final at once.
    pub fn in_memory(config: &Config) -> Self {
        Self::with_state(State::new(config, None), config, None)
    }

    fn with_state(state: State, config: &Config, files: Option<Files>) -> Self {
        Self {
            inner: Arc::new(Inner {
                state,
                listener: OnceLock::new(),
                max_pipelined: config.max_pipelined_requests.max(1),
                files,
            }),
        }
    }

    /// Opens (creating if needed) the store under `config.data_dir`: locks the directory,
    /// loads the newest snapshot, replays the journal after it (cutting off a torn tail), and
    /// starts a new journal segment.
    pub fn open(config: &Config, now_ms: u64) -> Result<(Self, RecoveryReport), StorageError> {
        let lock = lock_dir(&config.data_dir)?;
        let journal_dir = config.data_dir.join(JOURNAL_DIR);
        let snapshot_dir = config.data_dir.join(SNAPSHOT_DIR);
        for dir in [&journal_dir, &snapshot_dir] {
            std::fs::create_dir_all(dir).map_err(StorageError::io(dir))?;
        }
        let state = State::new(config, None);
        let report = recovery::recover(&config.data_dir, &state, true)?;
        // Recovery decodes every record into short-lived buffers between the mailboxes' growing
        // ones: their free memory is scattered over the heap.
        crate::memory::release_free_memory();
        state.mark_recovered(now_ms);
        let journal = Journal::start(
            &journal_dir,
            report.next_lsn,
            JournalOptions::from_config(config),
        )?;
        let files = Files {
            data_dir: config.data_dir.clone(),
            journal: journal.clone(),
            snapshot_guard: Mutex::new(()),
            _lock: lock,
        };
        let state = state.with_journal(journal);
        Ok((Self::with_state(state, config, Some(files)), report))
    }

    /// Verifies every file of a data directory without changing anything, and counts what it
    /// holds.
    pub fn check(data_dir: &Path) -> Result<RecoveryReport, StorageError> {
        let _lock = lock_dir(data_dir)?;
        let scratch = Config {
            store_shards: 1,
            ..Config::default()
        };
        recovery::recover(data_dir, &State::new(&scratch, None), false)
    }

    /// The state behind the store, for tests and tools that drive it synchronously.
    pub fn state(&self) -> &State {
        &self.inner.state
    }

    /// The journal, for a durable store.
    pub fn journal(&self) -> Option<&Arc<Journal>> {
        self.inner.state.journal()
    }

    /// The whole durable state as sorted, encoded events (tests compare stores with it).
    pub fn canonical_state(&self) -> Vec<Vec<u8>> {
        self.inner.state.canonical_state()
    }

    /// Announces every message that is durable by now but was not announced yet (normally
    /// the future of its `append` does it; this covers futures that were dropped).
    pub fn release_all(&self) {
        for shard in self.inner.state.shards_with_unreleased() {
            self.inner.release(shard);
        }
    }

    /// Writes a snapshot, then removes the journal segments and older snapshots it covers.
    /// Blocking: run it off the async runtime.
    pub fn snapshot(&self, now_ms: u64) -> Result<Option<SnapshotInfo>, StorageError> {
        let Some(files) = &self.inner.files else {
            return Ok(None);
        };
        let _one_at_a_time = files.snapshot_guard.lock();
        let started = Instant::now();
        // Every record before `seq` is in an older segment, and every shard's cover is at least
        // seq - 1, so once the snapshot is durable those segments are no longer needed.
        let seq = files.journal.rotate();
        let snapshot_dir = files.data_dir.join(SNAPSHOT_DIR);
        let info = snapshot::write(&snapshot_dir, seq, &self.inner.state, now_ms)?;
        for (old, path) in recovery::list(&snapshot_dir, snapshot::snapshot_seq)? {
            if old < seq {
                std::fs::remove_file(&path).map_err(StorageError::io(&path))?;
            }
        }
        let journal_dir = files.data_dir.join(JOURNAL_DIR);
        for (first, path) in recovery::list(&journal_dir, journal::segment_first_lsn)? {
            if first < seq {
                std::fs::remove_file(&path).map_err(StorageError::io(&path))?;
            }
        }
        journal::sync_dir(&journal_dir)?;
        tracing::info!(path = %info.path.display(), events = info.events, bytes = info.bytes,
            elapsed_ms = started.elapsed().as_millis() as u64, "snapshot written");
        Ok(Some(info))
    }

    /// Final snapshot and journal shutdown, for a graceful stop. Blocking.
    pub fn close(&self, now_ms: u64) -> Result<(), StorageError> {
        let result = self.snapshot(now_ms).map(drop);
        if let Some(files) = &self.inner.files {
            files.journal.shutdown();
        }
        result
    }
}

/// Writes a snapshot every `snapshot_interval`, or sooner once `snapshot_journal_bytes` of
/// journal accumulated, until `shutdown` fires. Snapshots run on a blocking thread.
pub async fn run_snapshots(
    store: EmbeddedStore,
    config: Arc<Config>,
    clock: crate::clock::Clock,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let Some(journal) = store.journal().cloned() else {
        return;
    };
    let mut last_at = tokio::time::Instant::now();
    let mut last_bytes = journal.appended_bytes();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let bytes = journal.appended_bytes();
        let due = last_at.elapsed() >= config.snapshot_interval
            || bytes.saturating_sub(last_bytes) >= config.snapshot_journal_bytes;
        if !due {
            continue;
        }
        let snapshotting = store.clone();
        let now_ms = clock.now_ms();
        let outcome = tokio::task::spawn_blocking(move || snapshotting.snapshot(now_ms)).await;
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

/// Resolves a change once its record is durable. (A combinator, not an `async` block: see
/// [`crate::relay`]'s `Ctx::reply` on why answer futures are kept flat.)
fn finish<T: Send + 'static>(
    inner: &Arc<Inner>,
    change: Result<Change<T>, StoreError>,
) -> impl Future<Output = StoreResult<T>> + Send + use<T> {
    match change {
        Err(err) => Either::Left(std::future::ready(Err(err))),
        Ok(Change { value, lsn }) => Either::Right(
            inner
                .durable(lsn)
                .map(move |durable| durable.map(|()| value)),
        ),
    }
}

/// A value known at once.
fn ready<T: Send + 'static>(value: StoreResult<T>) -> impl Future<Output = StoreResult<T>> + Send {
    std::future::ready(value)
}

impl Store for EmbeddedStore {
    fn max_pipelined(&self) -> usize {
        self.inner.max_pipelined
    }

    fn set_listener(&self, listener: Arc<dyn Listener>) {
        let _ = self.inner.listener.set(listener);
    }

    fn congested(&self) -> bool {
        self.journal().is_some_and(|j| j.congested())
    }

    fn until_uncongested(&self) -> impl Future<Output = ()> + Send + use<> {
        let journal = self.journal().cloned();
        async move {
            if let Some(journal) = journal {
                journal.until_uncongested().await;
            }
        }
    }

    fn flush(&self) {
        if let Some(journal) = self.journal() {
            journal.kick();
        }
    }

    fn touch(&self, identity: &Identity, now_ms: u64) {
        self.inner.state.touch(identity, now_ms);
    }

    fn register(
        &self,
        me: &Identity,
        registration: Registration,
        now_ms: u64,
    ) -> impl Future<Output = StoreResult<u32>> + Send + use<> {
        finish(
            &self.inner,
            self.inner.state.register(me, registration, now_ms),
        )
    }

    fn unregister(
        &self,
        me: &Identity,
        device: u32,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<> {
        let change = self.inner.state.unregister(me, device);
        if change.is_ok() {
            if let Some(listener) = self.inner.listener.get() {
                listener.closed(&MailboxId {
                    identity: *me,
                    device,
                });
            }
        }
        finish(&self.inner, change)
    }

    fn upload_prekeys(
        &self,
        me: &Identity,
        device: u32,
        signed_prekey: Option<SignedPreKey>,
        one_time_prekeys: Vec<PreKey>,
    ) -> impl Future<Output = StoreResult<u32>> + Send + use<> {
        finish(
            &self.inner,
            self.inner
                .state
                .upload_prekeys(me, device, signed_prekey, one_time_prekeys),
        )
    }

    fn prekey_count(
        &self,
        me: &Identity,
        device: u32,
    ) -> impl Future<Output = StoreResult<u32>> + Send + use<> {
        ready(self.inner.state.prekey_count(me, device))
    }

    fn fetch_prekeys<F: FnMut(u32) -> bool + Send + 'static>(
        &self,
        target: &Identity,
        devices: Vec<u32>,
        take_one_time: F,
    ) -> impl Future<Output = StoreResult<Fetched>> + Send + use<F> {
        let change = self
            .inner
            .state
            .fetch_prekeys(target, &devices, take_one_time);
        let inner = self.inner.clone();
        let target = *target;
        let done = finish(&self.inner, change);
        async move {
            let change = done.await?;
            // Announced once the keys' removal is durable, like the bundles.
            if let Some(listener) = inner.listener.get() {
                for (device, count) in &change.low {
                    listener.prekeys_low(&target, *device, *count);
                }
            }
            Ok(change.fetched)
        }
    }

    fn append(
        &self,
        message: NewMessage,
    ) -> impl Future<Output = StoreResult<Appended>> + Send + use<> {
        let inner = self.inner.clone();
        let checked = if !self
            .inner
            .state
            .is_registered(&message.sender, message.sender_device)
        {
            Err(StoreError::NotRegistered(message.sender_device))
        } else if let Some(why) = &message.bad_signature {
            Err(StoreError::BadSignature(why.clone()))
        } else {
            self.inner.state.append(message)
        };
        finish(&self.inner, checked).map(move |done| {
            let (appended, release) = done?;
            if let Some(shard) = release {
                inner.release(shard);
            }
            Ok(appended)
        })
    }

    fn read(
        &self,
        mailbox: MailboxId,
        after: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> impl Future<Output = StoreResult<Vec<Arc<Message>>>> + Send + use<> {
        ready(self.inner.state.read(&mailbox, after, max_count, max_bytes))
    }

    fn get(
        &self,
        mailbox: MailboxId,
        id: u64,
    ) -> impl Future<Output = StoreResult<Arc<Message>>> + Send + use<> {
        ready(self.inner.state.get(&mailbox, id))
    }

    fn last_id(&self, mailbox: MailboxId) -> impl Future<Output = StoreResult<u64>> + Send + use<> {
        ready(self.inner.state.last_id(&mailbox))
    }

    fn ack(
        &self,
        mailbox: MailboxId,
        ids: Vec<u64>,
    ) -> impl Future<Output = StoreResult<u32>> + Send + use<> {
        let change = self.inner.state.ack(&mailbox, &ids);
        if let (Ok(change), Some(listener)) = (&change, self.inner.listener.get()) {
            if !change.value.is_empty() {
                listener.removed(&mailbox, &change.value);
            }
        }
        finish(&self.inner, change).map(|done| done.map(|deleted| deleted.len() as u32))
    }

    fn set_policy(
        &self,
        me: &Identity,
        accept: Accept,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<> {
        finish(&self.inner, self.inner.state.set_policy(me, accept))
    }

    fn add_contact(
        &self,
        me: &Identity,
        contact: Identity,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<> {
        finish(&self.inner, self.inner.state.add_contact(me, contact))
    }

    fn remove_contact(
        &self,
        me: &Identity,
        contact: Identity,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<> {
        finish(&self.inner, self.inner.state.remove_contact(me, contact))
    }

    fn create_ticket(
        &self,
        me: &Identity,
        token: [u8; TICKET_LEN],
        expires_at_ms: u64,
        uses: u32,
        now_ms: u64,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<> {
        finish(
            &self.inner,
            self.inner
                .state
                .create_ticket(me, token, expires_at_ms, uses, now_ms),
        )
    }

    fn expire(
        &self,
        message_cutoff_ms: u64,
        account_cutoff_ms: u64,
    ) -> impl Future<Output = StoreResult<Expiry>> + Send + use<> {
        self.release_all();
        let swept = self
            .inner
            .state
            .expire(message_cutoff_ms, account_cutoff_ms);
        if let Some(listener) = self.inner.listener.get() {
            for (mailbox, ids) in &swept.removed {
                listener.removed(mailbox, ids);
            }
            for mailbox in &swept.closed {
                listener.closed(mailbox);
            }
        }
        self.flush();
        let wait = self.inner.durable(swept.lsn);
        let expiry = swept.expiry;
        async move {
            wait.await?;
            Ok(expiry)
        }
    }

    fn stats(&self) -> StoreStats {
        self.inner.state.stats()
    }

    fn totals(&self) -> StoreTotals {
        self.inner.state.totals()
    }
}
