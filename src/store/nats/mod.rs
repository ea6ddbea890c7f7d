//! The JetStream backend: the relay's state on a NATS JetStream cluster, shared by any number
//! of relays (`store = "nats://HOST:PORT[,…]"`, nats-server 2.12 or later). See docs/SCALING.md
//! for the operator's view, and [`names`] for what lives where.
//!
//! The design keeps a `Send` to about one replicated write and lets every rule that must hold
//! across relays be a rule of the cluster itself, not a compare-and-set of a record that
//! senders share:
//!
//! * a mailbox is one subject in one of `nats_streams` message streams (spread over the
//!   cluster's nodes); the stream enforces the mailbox's message limit, the relay-wide byte
//!   limit, expiry and — by message id — one message per (sender, nonce) ([`mailboxes`]);
//! * byte quotas are counters that commute, written in batches ([`usage`]);
//! * accounts, keys, contacts and tickets are small records of their own, changed by
//!   compare-and-set or atomic batch by the requests that change them, cached for sends
//!   ([`accounts`], [`prekeys`]);
//! * each relay hears only the mailboxes it delivers from, as core subscriptions to the
//!   streams' republished messages ([`live`]);
//! * calls of one identity take effect in call order ([`sequence`]), so sessions pipeline.
//!
//! Every answer that reports a change resolves after JetStream acknowledged the write (with
//! the stream's replicas). Requests that cannot reach the cluster fail after
//! `nats_request_timeout` with `StoreError::Unavailable`; the client reconnects meanwhile.

mod accounts;
mod client;
pub mod error;
mod feed;
mod index;
mod live;
mod mailboxes;
pub mod names;
mod outbox;
mod prekeys;
mod records;
mod sequence;
mod usage;
mod wire;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ahash::AHashMap;
use futures_util::future::Either;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use self::client::Cluster;
pub use self::client::MIN_SERVER_VERSION;
pub use self::error::NatsError;
use self::live::Live;
use self::sequence::{Sequencer, Ticket};
use self::usage::Usage;
/// The reading half of the NATS protocol, public only for the fuzz target `nats_wire`
/// (fuzz/src/nats.rs): bytes from the NATS servers reach it. Not part of the relay's API.
#[doc(hidden)]
pub use self::wire::{header_numbers, parse, status, Delivered, ServerOp, WireError, MAX_LINE};
use super::{
    AccountLimits, Appended, Expiry, Fetched, Identity, Listener, MailboxId, Message, NewMessage,
    Registration, Store, StoreError, StoreResult, StoreStats, TICKET_LEN,
};
use crate::config::{Config, StoreBackend};
use botd_protocol::proto::{Accept, PreKey, SignedPreKey};

/// Below a quarter of a byte quota, what another relay stored this recently may be unseen
/// when a send is judged (its counts are written every `usage::FLUSH_INTERVAL`, and read
/// counts are trusted for `usage::READ_INTERVAL`); past a quarter, counts are read and written
/// with every send. docs/SCALING.md states the slack this gives.
pub const QUOTA_BLIND_WINDOW: Duration = Duration::from_millis(
    usage::FLUSH_INTERVAL.as_millis() as u64 + usage::READ_INTERVAL.as_millis() as u64,
);

/// Idle accounts are looked for at most this often by one relay (it lists the accounts).
pub const ACCOUNT_SWEEP_EVERY: Duration = Duration::from_secs(600);
/// Identities whose last `touch` this relay remembers.
const MAX_TOUCHED: usize = 100_000;
/// Requests of one session the relay may have in flight on this store.
const MAX_PIPELINED: usize = 256;
/// Reads ahead of a cache's expiry in flight at most (see [`Inner::read_ahead`]).
const MAX_READS_AHEAD: usize = 1024;

/// What a read ahead refreshes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ReadAhead {
    Account,
    Usage,
}

pub(crate) struct Inner {
    cluster: Arc<Cluster>,
    limits: AccountLimits,
    /// How long a request may wait for the cluster (`nats_request_timeout`).
    request_timeout: Duration,
    live: Arc<Live>,
    usage: Usage,
    cache: accounts::Cache,
    sequencer: Arc<Sequencer>,
    stats: Mutex<StoreStats>,
    /// When this relay last recorded each identity's use.
    touched: Mutex<AHashMap<Identity, u64>>,
    /// The highest ids that left mailboxes through this relay, until their records hold them.
    removed: Mutex<mailboxes::UnwrittenRemovals>,
    last_account_sweep_ms: AtomicU64,
    /// Reads ahead in flight, one per cache entry.
    reading_ahead: Mutex<ahash::AHashSet<(ReadAhead, Identity)>>,
    stop: CancellationToken,
}

impl Inner {
    /// Keeps what a send's fast path needs cached while traffic flows: the sender's and the
    /// recipient's accounts and the recipient's byte counters are read again once past half
    /// of the time they are trusted, in the background. Without it each expiry sent a send
    /// down the slow path (a read of the cluster first), and every send of that sender
    /// pipelined behind it waited its turn in line with it.
    fn read_ahead(self: &Arc<Self>, message: &NewMessage) {
        let wanted = [
            (ReadAhead::Account, message.sender),
            (ReadAhead::Account, message.to.identity),
            (ReadAhead::Usage, message.to.identity),
        ];
        for (what, identity) in wanted {
            let ageing = match what {
                ReadAhead::Account => self.cache.ageing(&identity),
                ReadAhead::Usage => self.usage.ageing(&identity),
            };
            if !ageing {
                continue;
            }
            {
                let mut reading = self.reading_ahead.lock();
                if reading.len() >= MAX_READS_AHEAD || !reading.insert((what, identity)) {
                    continue;
                }
            }
            let inner = self.clone();
            tokio::spawn(async move {
                let outcome = match what {
                    ReadAhead::Account => inner.account_fresh(&identity).await.map(drop),
                    ReadAhead::Usage => inner
                        .usage
                        .refresh(&inner.cluster, &identity)
                        .await
                        .map_err(StoreError::from),
                };
                if let Err(err) = outcome {
                    tracing::debug!(error = %err, ?what, "a read ahead failed: the next send reads");
                }
                inner.reading_ahead.lock().remove(&(what, identity));
            });
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The JetStream store. Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct NatsStore {
    inner: Arc<Inner>,
}

impl NatsStore {
    /// Connects to the cluster `config.store` names and creates what is missing there. Needs a
    /// tokio runtime (its background work runs as tasks).
    pub async fn connect(config: &Config) -> Result<Self, NatsError> {
        let urls = match config.store_backend() {
            Ok(StoreBackend::Nats(urls)) => urls,
            _ => {
                return Err(NatsError::Connect {
                    urls: config.store.clone(),
                    message: "the store setting does not name a NATS cluster".into(),
                })
            }
        };
        let cluster = Arc::new(Cluster::connect(&urls, config).await?);
        let live = Live::new();
        let stop = CancellationToken::new();
        let (reconnected, on_reconnect) = tokio::sync::watch::channel(0u64);
        let feed = start_feed(&cluster, &urls, config, &live, reconnected.clone(), &stop);
        cluster.run_outbox(feed.clone(), stop.clone()).await?;
        live.start(cluster.clone(), on_reconnect, stop.clone());
        watch_reconnections(&cluster, reconnected, stop.clone());
        spawn_traffic_metrics(&cluster, feed, stop.clone());
        let inner = Arc::new(Inner {
            cluster,
            limits: AccountLimits::from_config(config),
            request_timeout: config.nats_request_timeout,
            live,
            usage: Usage::default(),
            cache: accounts::Cache::default(),
            sequencer: Arc::new(Sequencer::default()),
            stats: Mutex::new(StoreStats::default()),
            touched: Mutex::new(AHashMap::new()),
            removed: Mutex::new(mailboxes::UnwrittenRemovals::default()),
            last_account_sweep_ms: AtomicU64::new(0),
            reading_ahead: Mutex::new(ahash::AHashSet::new()),
            stop,
        });
        let weak = Arc::downgrade(&inner);
        let _ = inner
            .live
            .on_account_change
            .set(Box::new(move |identity: &[u8], seq| {
                if let Some(inner) = weak.upgrade() {
                    inner.cache.changed(identity, seq);
                }
            }));
        spawn_usage_tasks(&inner);
        inner.refresh_stats().await;
        Ok(Self { inner })
    }

    /// The NATS client (tests watch its state).
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.cluster.client
    }

    /// Runs `operation` of `identity`'s calls in call order, as a task of its own (the relay
    /// polls only the oldest answer of a session; the others must progress by themselves).
    fn run<T, F, Fut>(
        &self,
        identity: &Identity,
        operation: F,
    ) -> impl Future<Output = StoreResult<T>> + Send + use<T, F, Fut>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>, Ticket) -> Fut + Send + 'static,
        Fut: Future<Output = StoreResult<T>> + Send + 'static,
    {
        let ticket = self.inner.sequencer.ticket(identity);
        let task = tokio::spawn(operation(self.inner.clone(), ticket));
        async move {
            task.await.unwrap_or_else(|err| {
                Err(StoreError::Unavailable(format!("store task failed: {err}")))
            })
        }
    }

    /// As [`NatsStore::run`] for a change that the caller's later calls must see: they wait
    /// until it is done.
    fn change<T, F, Fut>(
        &self,
        identity: &Identity,
        operation: F,
    ) -> impl Future<Output = StoreResult<T>> + Send + use<T, F, Fut>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>) -> Fut + Send + 'static,
        Fut: Future<Output = StoreResult<T>> + Send + 'static,
    {
        self.run(identity, move |inner, mut ticket| async move {
            ticket.turn().await;
            let outcome = operation(inner).await;
            drop(ticket);
            outcome
        })
    }

    /// As [`NatsStore::run`] for a read: it waits for earlier calls, then lets later ones go.
    fn query<T, F, Fut>(
        &self,
        identity: &Identity,
        operation: F,
    ) -> impl Future<Output = StoreResult<T>> + Send + use<T, F, Fut>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>) -> Fut + Send + 'static,
        Fut: Future<Output = StoreResult<T>> + Send + 'static,
    {
        self.run(identity, move |inner, mut ticket| async move {
            ticket.turn().await;
            ticket.pass();
            operation(inner).await
        })
    }
}

/// Counts reconnections, for the live feed to read every watched mailbox again.
fn watch_reconnections(
    cluster: &Arc<Cluster>,
    reconnected: tokio::sync::watch::Sender<u64>,
    stop: CancellationToken,
) {
    let client = cluster.client.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut was_connected = true;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let connected = client.connection_state() == async_nats::connection::State::Connected;
            if connected && !was_connected {
                reconnected.send_modify(|n| *n += 1);
            }
            was_connected = connected;
        }
    });
}

/// Starts the feed connection ([`feed`]) where every server is plaintext: the live feed's
/// subscriptions and the outbox's acknowledgements come on it. With TLS they stay on the
/// client's connection.
fn start_feed(
    cluster: &Arc<Cluster>,
    urls: &[String],
    config: &Config,
    live: &Arc<Live>,
    reconnected: tokio::sync::watch::Sender<u64>,
    stop: &CancellationToken,
) -> Option<Arc<feed::Feed>> {
    let servers: Vec<async_nats::ServerAddr> =
        urls.iter().filter_map(|url| url.parse().ok()).collect();
    let plaintext = !servers.is_empty()
        && servers
            .iter()
            .all(|server| !server.tls_required() && !server.is_websocket())
        && !cluster.client.server_info().tls_required;
    if !plaintext {
        tracing::info!("NATS with TLS: the live feed shares the client's connection");
        return None;
    }
    let weak = Arc::downgrade(live);
    let answers = Arc::downgrade(cluster);
    let feed = feed::Feed::start(
        servers,
        config.nats_request_timeout,
        Box::new(move |target, message| match target {
            feed::Target::Acks => {
                if let Some(cluster) = answers.upgrade() {
                    cluster.publish_answered(&message);
                }
            }
            _ => {
                if let Some(live) = weak.upgrade() {
                    live.delivered(target, message);
                }
            }
        }),
        reconnected,
        stop.clone(),
    );
    live.use_feed(feed.clone());
    Some(feed)
}

/// The connections' traffic as metrics (what the client and the feed counted), every second.
fn spawn_traffic_metrics(
    cluster: &Arc<Cluster>,
    feed: Option<Arc<feed::Feed>>,
    stop: CancellationToken,
) {
    let client = cluster.client.clone();
    let received = metrics::counter!(crate::metrics::JETSTREAM_BYTES, "direction" => "in");
    let sent = metrics::counter!(crate::metrics::JETSTREAM_BYTES, "direction" => "out");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let statistics = client.statistics();
            let (feed_in, feed_out) = feed.as_ref().map_or((0, 0), |feed| feed.traffic());
            received.absolute(statistics.in_bytes.load(Ordering::Relaxed) + feed_in);
            sent.absolute(statistics.out_bytes.load(Ordering::Relaxed) + feed_out);
        }
    });
}

fn spawn_usage_tasks(inner: &Arc<Inner>) {
    spawn_every(inner, usage::FLUSH_INTERVAL, |inner| async move {
        inner.usage.flush(&inner.cluster).await;
        inner.flush_removed().await;
    });
    // Apart from the flushes, which a round of reads would hold up.
    spawn_every(inner, usage::SETTLE_EVERY, |inner| async move {
        inner.settle_counters().await;
    });
}

/// Runs `round` every `interval` (never two at once) until the store stops or is dropped.
fn spawn_every<F, Fut>(inner: &Arc<Inner>, interval: Duration, round: F)
where
    F: Fn(Arc<Inner>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let weak = Arc::downgrade(inner);
    let stop = inner.stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Some(inner) = weak.upgrade() else { return };
            round(inner).await;
        }
    });
}

impl Inner {
    async fn refresh_stats(&self) {
        let names = &self.cluster.names;
        let mut stats = *self.stats.lock();
        let (mut messages, mut bytes) = (0, 0);
        for index in 0..names.message_streams {
            if let Ok(mut stream) = self
                .cluster
                .js
                .get_stream(names.message_stream(index))
                .await
            {
                if let Ok(info) = stream.info().await {
                    messages += info.state.messages as usize;
                    bytes += info.state.bytes as usize;
                }
            }
        }
        stats.messages = messages;
        stats.payload_bytes = bytes;
        if let Ok(Some(first)) = self
            .cluster
            .next(&names.accounts_stream(), &names.all_accounts(), 1)
            .await
        {
            stats.identities = first.pending as usize + 1;
        }
        *self.stats.lock() = stats;
    }

    async fn expire(&self, account_cutoff_ms: u64, now_ms: u64) -> StoreResult<Expiry> {
        // Messages expire on the streams themselves (their age limit is `message_ttl`).
        let last = self.last_account_sweep_ms.load(Ordering::Relaxed);
        let due = account_cutoff_ms > 0
            && (last == 0 || now_ms >= last + ACCOUNT_SWEEP_EVERY.as_millis() as u64);
        let removed_accounts = if due {
            self.last_account_sweep_ms.store(now_ms, Ordering::Relaxed);
            self.expire_accounts(account_cutoff_ms).await?
        } else {
            0
        };
        self.refresh_stats().await;
        let stats = *self.stats.lock();
        Ok(Expiry {
            expired_messages: 0,
            removed_accounts,
            bytes_trimmed: 0,
            messages_left: stats.messages,
            payload_bytes_left: stats.payload_bytes,
        })
    }
}

impl Store for NatsStore {
    fn max_pipelined(&self) -> usize {
        MAX_PIPELINED
    }

    fn set_listener(&self, listener: Arc<dyn Listener>) {
        let _ = self.inner.live.listener.set(listener);
    }

    fn congested(&self) -> bool {
        false
    }

    fn until_uncongested(&self) -> impl Future<Output = ()> + Send + use<> {
        std::future::ready(())
    }

    fn watch(&self, mailbox: MailboxId) -> impl Future<Output = StoreResult<()>> + Send + use<> {
        let inner = self.inner.clone();
        async move {
            let key = inner.mailbox_key(&mailbox).await?;
            inner
                .live
                .watch(&inner.cluster, key)
                .await
                .map_err(StoreError::from)
        }
    }

    fn unwatch(&self, mailbox: &MailboxId) {
        self.inner.live.unwatch(mailbox);
    }

    fn touch(&self, identity: &Identity, now_ms: u64) {
        {
            let mut touched = self.inner.touched.lock();
            let due = touched
                .get(identity)
                .is_none_or(|&at| now_ms >= at.saturating_add(self.inner.limits.touch_interval_ms));
            if !due {
                return;
            }
            if touched.len() >= MAX_TOUCHED {
                touched.clear();
            }
            touched.insert(*identity, now_ms);
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let inner = self.inner.clone();
            let identity = *identity;
            runtime.spawn(async move { inner.touch(identity, now_ms).await });
        }
    }

    fn register(
        &self,
        me: &Identity,
        registration: Registration,
        now_ms: u64,
    ) -> impl Future<Output = StoreResult<u32>> + Send + use<> {
        let me = *me;
        self.change(&me, move |inner| async move {
            inner.register(me, registration, now_ms).await
        })
    }

    fn unregister(
        &self,
        me: &Identity,
        device: u32,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<> {
        let me = *me;
        self.change(&me, move |inner| async move {
            inner.unregister(me, device).await
        })
    }

    fn upload_prekeys(
        &self,
        me: &Identity,
        device: u32,
        signed_prekey: Option<SignedPreKey>,
        one_time_prekeys: Vec<PreKey>,
    ) -> impl Future<Output = StoreResult<u32>> + Send + use<> {
        let me = *me;
        self.change(&me, move |inner| async move {
            inner
                .upload_prekeys(me, device, signed_prekey, one_time_prekeys)
                .await
        })
    }

    fn prekey_count(
        &self,
        me: &Identity,
        device: u32,
    ) -> impl Future<Output = StoreResult<u32>> + Send + use<> {
        let me = *me;
        self.query(&me, move |inner| async move {
            inner.prekey_count(me, device).await
        })
    }

    fn fetch_prekeys<F: FnMut(u32) -> bool + Send + 'static>(
        &self,
        target: &Identity,
        devices: Vec<u32>,
        take_one_time: F,
    ) -> impl Future<Output = StoreResult<Fetched>> + Send + use<F> {
        let target = *target;
        self.change(&target, move |inner| async move {
            inner.fetch_prekeys(target, devices, take_one_time).await
        })
    }

    fn append(
        &self,
        message: NewMessage,
    ) -> impl Future<Output = StoreResult<Appended>> + Send + use<> {
        let sender = message.sender;
        if self.inner.sequencer.is_idle(&sender) {
            if let Some((key, sent)) = self.inner.append_now(&message) {
                self.inner.read_ahead(&message);
                let inner = self.inner.clone();
                return Either::Left(
                    async move { inner.appended(key, message, sent, false).await },
                );
            }
        }
        Either::Right(self.run(&sender, move |inner, ticket| async move {
            inner.append(message, ticket).await
        }))
    }

    fn read(
        &self,
        mailbox: MailboxId,
        after: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> impl Future<Output = StoreResult<Vec<Arc<Message>>>> + Send + use<> {
        let inner = self.inner.clone();
        async move { inner.read(mailbox, after, max_count, max_bytes).await }
    }

    fn get(
        &self,
        mailbox: MailboxId,
        id: u64,
    ) -> impl Future<Output = StoreResult<Arc<Message>>> + Send + use<> {
        self.query(&mailbox.identity, move |inner| async move {
            inner.get(mailbox, id).await
        })
    }

    fn last_id(&self, mailbox: MailboxId) -> impl Future<Output = StoreResult<u64>> + Send + use<> {
        let inner = self.inner.clone();
        async move { inner.last_id(mailbox).await }
    }

    fn ack(
        &self,
        mailbox: MailboxId,
        ids: Vec<u64>,
    ) -> impl Future<Output = StoreResult<u32>> + Send + use<> {
        self.run(&mailbox.identity, move |inner, ticket| async move {
            inner.ack(mailbox, ids, ticket).await
        })
    }

    fn set_policy(
        &self,
        me: &Identity,
        accept: Accept,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<> {
        let me = *me;
        self.change(&me, move |inner| async move {
            inner.set_policy(me, accept).await
        })
    }

    fn add_contact(
        &self,
        me: &Identity,
        contact: Identity,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<> {
        let me = *me;
        self.change(&me, move |inner| async move {
            inner.change_contact(me, contact, true).await
        })
    }

    fn remove_contact(
        &self,
        me: &Identity,
        contact: Identity,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<> {
        let me = *me;
        self.change(&me, move |inner| async move {
            inner.change_contact(me, contact, false).await
        })
    }

    fn create_ticket(
        &self,
        me: &Identity,
        token: [u8; TICKET_LEN],
        expires_at_ms: u64,
        uses: u32,
        now_ms: u64,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<> {
        let me = *me;
        self.change(&me, move |inner| async move {
            inner
                .create_ticket(me, token, expires_at_ms, uses, now_ms)
                .await
        })
    }

    fn expire(
        &self,
        _message_cutoff_ms: u64,
        account_cutoff_ms: u64,
    ) -> impl Future<Output = StoreResult<Expiry>> + Send + use<> {
        let now_ms = crate::clock::unix_millis();
        let inner = self.inner.clone();
        async move { inner.expire(account_cutoff_ms, now_ms).await }
    }

    fn stats(&self) -> StoreStats {
        *self.inner.stats.lock()
    }
}
