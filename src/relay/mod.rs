//! The relay application served over authenticated sessions: registration, prekeys, mailboxes
//! with live delivery, contacts and tickets, on top of any [`Store`]. The sender of every
//! request is the identity the session authenticated, never a field of the request, so a
//! session can only read, ack or configure its own mailboxes.
//!
//! Each request kind is a module of `cmd/`, checked there in the spec's order (field checks in
//! [`validate`], rate limits in [`limits`]) and then handed to the store; live delivery is
//! [`delivery`]'s. Requests are answered in arrival order; while one waits for the disk, later
//! ones are already applied.

mod cmd;
pub mod delivery;
pub mod error;
pub mod limits;
pub mod validate;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use botd_protocol::keys::PublicKeyBytes;
use botd_protocol::proto::{unsupported_unless_ignorable, Body, ErrorCode, Frame, PreKeysLow};
use parking_lot::Mutex;
use tokio::time::Instant;

pub use error::RelayError;

use crate::app::{Answer, Handler, PushHandle};
use crate::config::Config;
use crate::memory::RELEASE_AFTER_FREED_BYTES;
use crate::metrics as m;
use crate::ratelimit::address_group;
use crate::store::{Identity, Listener, MailboxId, Message, QuotaKind, Store, StoreError};
use cmd::RequestKind;
use delivery::Delivery;
use limits::Limits;

pub use crate::clock::Clock;

/// Open sessions per identity, for notices such as `PreKeysLow`. Bounded by the connection
/// cap.
#[derive(Default)]
struct Sessions(Mutex<HashMap<Identity, Vec<PushHandle>>>);

impl Sessions {
    fn add(&self, identity: Identity, push: &PushHandle) {
        let mut sessions = self.0.lock();
        let list = sessions.entry(identity).or_default();
        list.retain(|p| !p.is_closed());
        list.push(push.clone());
    }

    fn remove(&self, identity: &Identity, push: &PushHandle) {
        let mut sessions = self.0.lock();
        if let Some(list) = sessions.get_mut(identity) {
            list.retain(|p| !p.same_session(push) && !p.is_closed());
            if list.is_empty() {
                sessions.remove(identity);
            }
        }
    }

    /// Identities with an open session.
    fn connected(&self) -> Vec<Identity> {
        self.0.lock().keys().copied().collect()
    }

    fn notify(&self, identity: &Identity, frame: Frame) {
        let sessions = self.0.lock();
        for push in sessions.get(identity).into_iter().flatten() {
            let _ = push.push_frame(frame.clone());
        }
    }
}

/// What the store tells the relay. The store holds this listener and the delivery holds the
/// store, so the listener holds the delivery weakly: a relay that is dropped frees its store.
struct Events<S: Store> {
    delivery: Weak<Delivery<S>>,
    sessions: Arc<Sessions>,
}

impl<S: Store> Listener for Events<S> {
    fn stored(&self, mailbox: &MailboxId, message: &Arc<Message>, prev_id: Option<u64>) {
        if let Some(delivery) = self.delivery.upgrade() {
            delivery.stored(mailbox, message, prev_id);
        }
    }

    fn removed(&self, mailbox: &MailboxId, ids: &[u64]) {
        if let Some(delivery) = self.delivery.upgrade() {
            delivery.removed(mailbox, ids);
        }
    }

    fn closed(&self, mailbox: &MailboxId) {
        if let Some(delivery) = self.delivery.upgrade() {
            delivery.closed(mailbox);
        }
    }

    fn resync(&self, mailbox: &MailboxId) {
        if let Some(delivery) = self.delivery.upgrade() {
            delivery.resync(mailbox);
        }
    }

    fn prekeys_low(&self, identity: &Identity, device: u32, count: u32) {
        let frame = Frame::new(
            0,
            Body::PreKeysLow(PreKeysLow {
                device_id: device,
                count,
            }),
        );
        self.sessions.notify(identity, frame);
    }
}

/// How often the maintenance task refreshes the store gauges.
pub const GAUGE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// "ok" and every error code.
const OUTCOMES: usize = 1 + 18;

/// Metric handles resolved once, so the hot path looks nothing up by name.
struct RelayMetrics {
    requests: Vec<OnceLock<metrics::Counter>>,
    messages_sent: metrics::Counter,
    messages_duplicate: metrics::Counter,
    messages_acked: metrics::Counter,
    prekeys_handed_out: metrics::Counter,
    prekeys_exhausted: metrics::Counter,
    prekeys_withheld: metrics::Counter,
    journal_backpressure: metrics::Counter,
    quota_hits: [OnceLock<metrics::Counter>; QuotaKind::ALL.len()],
}

impl RelayMetrics {
    fn new() -> Self {
        Self {
            requests: (0..RequestKind::COUNT * OUTCOMES)
                .map(|_| OnceLock::new())
                .collect(),
            messages_sent: metrics::counter!(m::MESSAGES_SENT),
            messages_duplicate: metrics::counter!(m::MESSAGES_DUPLICATE),
            messages_acked: metrics::counter!(m::MESSAGES_ACKED),
            prekeys_handed_out: metrics::counter!(m::PREKEYS_HANDED_OUT),
            prekeys_exhausted: metrics::counter!(m::PREKEYS_EXHAUSTED),
            prekeys_withheld: metrics::counter!(m::PREKEYS_WITHHELD),
            journal_backpressure: metrics::counter!(m::JOURNAL_BACKPRESSURE),
            quota_hits: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    /// A refused request: counted by kind and code, and by the quota it hit, if any.
    fn refused(&self, kind: RequestKind, err: &RelayError) {
        self.request(kind, Some(err.code()));
        if let Some(quota) = err.quota_kind() {
            self.quota_hits[quota as usize]
                .get_or_init(|| metrics::counter!(m::QUOTA_HITS, "kind" => quota.as_str()))
                .increment(1);
        }
    }

    fn request(&self, kind: RequestKind, outcome: Option<ErrorCode>) {
        let column = outcome.map_or(0, |code| (code as usize).min(OUTCOMES - 2) + 1);
        self.requests[kind as usize * OUTCOMES + column]
            .get_or_init(|| {
                let outcome = outcome.map_or("ok", |code| code.as_str_name());
                metrics::counter!(m::REQUESTS, "kind" => kind.name(), "outcome" => outcome)
            })
            .increment(1);
    }
}

/// The relay application over the store `S`.
pub struct Relay<S: Store> {
    store: Arc<S>,
    delivery: Arc<Delivery<S>>,
    sessions: Arc<Sessions>,
    limits: Limits,
    config: Arc<Config>,
    clock: Clock,
    relay_key: PublicKeyBytes,
    metrics: Arc<RelayMetrics>,
    /// Highest stored payload total a sweep has seen since free memory was last given back.
    payload_peak: Arc<AtomicU64>,
}

/// Per-session state: who the peer is, where from, and which mailboxes it listens to.
pub struct RelaySession {
    identity: Identity,
    address: IpAddr,
    push: PushHandle,
    subscriptions: Vec<u32>,
    /// When the account was last marked in use by this session (ms).
    touched_ms: u64,
    /// The clock, read once for the request being handled.
    now: Instant,
}

impl<S: Store> Relay<S> {
    pub fn new(config: Arc<Config>, relay_key: PublicKeyBytes, store: S) -> Arc<Self> {
        let store = Arc::new(store);
        let delivery = Delivery::new(store.clone(), config.max_unacked);
        let sessions = Arc::new(Sessions::default());
        store.set_listener(Arc::new(Events {
            delivery: Arc::downgrade(&delivery),
            sessions: sessions.clone(),
        }));
        Arc::new(Self {
            limits: Limits::new(&config),
            store,
            delivery,
            sessions,
            config,
            clock: Clock::new(),
            relay_key,
            metrics: Arc::new(RelayMetrics::new()),
            payload_peak: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Removes expired messages and idle accounts and refreshes the store gauges; returns how
    /// many messages were removed. Blocking for the embedded store: run it off the runtime.
    pub fn sweep(&self) -> impl Future<Output = Result<usize, StoreError>> + Send + 'static {
        let now = self.clock.now_ms();
        let message_cutoff = now.saturating_sub(self.config.message_ttl.as_millis() as u64);
        let account_cutoff = now.saturating_sub(self.config.account_ttl.as_millis() as u64);
        // A session that stays connected keeps its account, whatever it sends (Pings only,
        // say): its identity counts as in use at every sweep.
        for identity in self.sessions.connected() {
            self.store.touch(&identity, now);
        }
        let swept = self.store.expire(message_cutoff, account_cutoff);
        let peak = self.payload_peak.clone();
        async move {
            let expiry = swept.await?;
            metrics::counter!(m::MESSAGES_EXPIRED).increment(expiry.expired_messages as u64);
            metrics::counter!(m::ACCOUNTS_REMOVED).increment(expiry.removed_accounts as u64);
            metrics::gauge!(m::MAILBOX_MESSAGES).set(expiry.messages_left as f64);
            metrics::gauge!(m::MAILBOX_BYTES).set(expiry.payload_bytes_left as f64);
            release_memory_if_worth_it(
                &peak,
                expiry.payload_bytes_left as u64,
                expiry.bytes_trimmed as u64,
            );
            Ok(expiry.expired_messages)
        }
    }

    /// Refreshes the store gauges from the store's running totals (cheap; the maintenance
    /// task calls it every [`GAUGE_INTERVAL`], so they are current between sweeps).
    pub fn refresh_gauges(&self) {
        let totals = self.store.totals();
        metrics::gauge!(m::MAILBOX_MESSAGES).set(totals.messages as f64);
        metrics::gauge!(m::MAILBOX_BYTES).set(totals.payload_bytes as f64);
        metrics::gauge!(m::IDENTITIES).set(totals.identities as f64);
        metrics::gauge!(m::JOURNAL_PENDING_BYTES).set(totals.journal_pending_bytes as f64);
    }

    /// Sweeps every `expiry_interval` and refreshes the store gauges every
    /// [`GAUGE_INTERVAL`], until `shutdown` fires.
    pub async fn run_maintenance(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(self.config.expiry_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut gauges = tokio::time::interval(GAUGE_INTERVAL);
        gauges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = gauges.tick() => self.refresh_gauges(),
                _ = tick.tick() => {
                    // The sweep walks every mailbox and may trim the heap: off the runtime's
                    // workers, like snapshots.
                    let relay = self.clone();
                    match tokio::task::spawn_blocking(move || relay.sweep()).await {
                        Ok(swept) => {
                            if let Err(err) = swept.await {
                                tracing::error!(error = %err, "expiry sweep failed");
                            }
                        }
                        Err(err) => tracing::error!(error = %err, "expiry sweep failed"),
                    }
                }
            }
        }
    }
}

/// After a sweep: once the store has shrunk by [`RELEASE_AFTER_FREED_BYTES`] since the last
/// time (acks, expiry, trimmed mailboxes), asks the allocator to give its free pages back.
fn release_memory_if_worth_it(peak: &AtomicU64, held: u64, trimmed: u64) {
    let top = peak.fetch_max(held, Ordering::Relaxed).max(held);
    let freed = top - held + trimmed;
    if freed >= RELEASE_AFTER_FREED_BYTES {
        let started = std::time::Instant::now();
        crate::memory::release_free_memory();
        peak.store(held, Ordering::Relaxed);
        tracing::debug!(
            freed,
            took_us = started.elapsed().as_micros() as u64,
            "gave free memory back to the system"
        );
    }
}

impl<S: Store> Handler for Arc<Relay<S>> {
    type Session = RelaySession;

    fn connect(&self, peer: PublicKeyBytes, addr: SocketAddr, push: PushHandle) -> RelaySession {
        let identity = *peer.as_bytes();
        self.sessions.add(identity, &push);
        let now = self.clock.now_ms();
        self.store.touch(&identity, now);
        RelaySession {
            identity,
            address: address_group(addr.ip()),
            push,
            subscriptions: Vec::new(),
            touched_ms: now,
            now: Instant::now(),
        }
    }

    fn request(&self, session: &mut RelaySession, frame: Frame) -> Answer {
        let id = frame.id;
        let Some(kind) = frame.body.as_ref().and_then(RequestKind::of) else {
            return unsupported_unless_ignorable(&frame).map_or(Answer::None, Answer::frame);
        };
        let request = frame.body.expect("checked above");
        if id == 0 {
            return Answer::frame(
                RelayError::bad_request("requests need a non-zero frame id").to_frame(0),
            );
        }
        session.now = Instant::now();
        let now = self.clock.at(session.now);
        if now >= session.touched_ms + 3_600_000 {
            session.touched_ms = now;
            self.store.touch(&session.identity, now);
        }
        match cmd::execute(self, session, kind, id, request) {
            Ok(answer) => answer,
            Err(err) => {
                self.metrics.refused(kind, &err);
                Answer::frame(err.to_frame(id))
            }
        }
    }

    fn is_barrier(&self, frame: &Frame) -> bool {
        frame
            .body
            .as_ref()
            .and_then(RequestKind::of)
            .is_some_and(RequestKind::is_barrier)
    }

    fn max_pipelined(&self) -> usize {
        self.config
            .max_pipelined_requests
            .min(self.store.max_pipelined())
            .max(1)
    }

    fn flush(&self) {
        self.store.flush();
    }

    fn congestion(&self) -> Option<Pin<Box<dyn Future<Output = ()> + Send>>> {
        if !self.store.congested() {
            return None;
        }
        self.metrics.journal_backpressure.increment(1);
        Some(Box::pin(self.store.until_uncongested()))
    }

    fn resume(&self, session: &mut RelaySession) {
        for device in &session.subscriptions {
            let mailbox = MailboxId {
                identity: session.identity,
                device: *device,
            };
            self.delivery.resume(&mailbox, &session.push);
        }
    }

    fn disconnect(&self, session: RelaySession) {
        for device in &session.subscriptions {
            let mailbox = MailboxId {
                identity: session.identity,
                device: *device,
            };
            self.delivery.unsubscribe(&mailbox, &session.push);
        }
        self.sessions.remove(&session.identity, &session.push);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    /// The store holds the relay's listener, which reaches the delivery, which holds the store:
    /// none of it may keep the others alive once the relay is gone.
    #[test]
    fn a_dropped_relay_frees_its_store() {
        let config = Arc::new(Config::default());
        let key = *botd_protocol::keys::KeyPair::generate().public();
        let relay = Relay::new(config.clone(), key, EmbeddedStore::in_memory(&config));
        let (delivery, sessions) = (
            Arc::downgrade(&relay.delivery),
            Arc::downgrade(&relay.sessions),
        );
        drop(relay);
        assert!(
            delivery.upgrade().is_none(),
            "the delivery outlives the relay"
        );
        assert!(sessions.upgrade().is_none(), "the store outlives the relay");
    }
}
