//! The relay application served over authenticated sessions: registration, prekeys, mailboxes
//! with live delivery, contacts and tickets, on top of any [`Store`]. The sender of every
//! request is the identity the session authenticated, never a field of the request, so a
//! session can only read, ack or configure its own mailboxes.
//!
//! Each request is checked here in the spec's order (field checks in [`validate`], rate limits
//! in [`limits`]) and then handed to the store; live delivery is [`delivery`]'s. Requests are
//! answered in arrival order; while one waits for the disk, later ones are already applied.

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

use tokio::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;

pub use error::RelayError;

use crate::app::{Answer, Handler, Outgoing, PushHandle};
use crate::config::Config;
use crate::memory::RELEASE_AFTER_FREED_BYTES;
use crate::metrics as m;
use crate::ratelimit::address_group;
use crate::store::{
    Appended, Identity, Listener, MailboxId, Message, NewMessage, QuotaKind, Store, StoreError,
};
use botd_protocol::keys::PublicKeyBytes;
use botd_protocol::message::{message_digest, DeliverFrame};
use botd_protocol::proto::unsupported_unless_ignorable;
use botd_protocol::proto::{
    Accept, Acked, Body, Done, ErrorCode, Frame, PreKeyBundles, PreKeyCount, PreKeysLow,
    Registered, Sent, Subscribed, Ticket, Unregistered,
};
use delivery::Delivery;
use limits::{Limit, Limits};

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

/// The thirteen requests, for per-kind metrics.
const REQUEST_KINDS: usize = 13;
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
            requests: (0..REQUEST_KINDS * OUTCOMES)
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestKind {
    Register,
    Unregister,
    UploadPreKeys,
    GetPreKeyCount,
    FetchPreKeys,
    Send,
    Subscribe,
    GetMessage,
    AckMessages,
    SetPolicy,
    AddContact,
    RemoveContact,
    CreateTicket,
}

impl RequestKind {
    /// The kind of a body the relay serves as a request.
    fn of(body: &Body) -> Option<Self> {
        Some(match body {
            Body::Register(_) => Self::Register,
            Body::Unregister(_) => Self::Unregister,
            Body::UploadPreKeys(_) => Self::UploadPreKeys,
            Body::GetPreKeyCount(_) => Self::GetPreKeyCount,
            Body::FetchPreKeys(_) => Self::FetchPreKeys,
            Body::Send(_) => Self::Send,
            Body::Subscribe(_) => Self::Subscribe,
            Body::GetMessage(_) => Self::GetMessage,
            Body::AckMessages(_) => Self::AckMessages,
            Body::SetPolicy(_) => Self::SetPolicy,
            Body::AddContact(_) => Self::AddContact,
            Body::RemoveContact(_) => Self::RemoveContact,
            Body::CreateTicket(_) => Self::CreateTicket,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Register => "register",
            Self::Unregister => "unregister",
            Self::UploadPreKeys => "upload_pre_keys",
            Self::GetPreKeyCount => "get_pre_key_count",
            Self::FetchPreKeys => "fetch_pre_keys",
            Self::Send => "send",
            Self::Subscribe => "subscribe",
            Self::GetMessage => "get_message",
            Self::AckMessages => "ack_messages",
            Self::SetPolicy => "set_policy",
            Self::AddContact => "add_contact",
            Self::RemoveContact => "remove_contact",
            Self::CreateTicket => "create_ticket",
        }
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

/// What a request's handling returns: an answer (possibly pending), or an error found before
/// the store was asked.
type Reply = Result<Answer, RelayError>;

fn body(id: u64, body: Body) -> Outgoing {
    Outgoing::Frame(Frame::new(id, body))
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

    /// Takes a token for the request kind's limits (per identity, per address).
    fn limit(&self, limit: Limit, session: &RelaySession) -> Result<(), RelayError> {
        self.limits
            .take(limit, &session.identity, &session.address, session.now)
    }

    /// The answer to request `id`, once `future` resolves; counted by kind and outcome. One
    /// allocation per request.
    fn reply(
        &self,
        kind: RequestKind,
        id: u64,
        future: impl Future<Output = Result<Outgoing, RelayError>> + Send + 'static,
    ) -> Reply {
        let metrics = self.metrics.clone();
        Ok(Answer::pending(async move {
            match future.await {
                Ok(answer) => {
                    metrics.request(kind, None);
                    answer
                }
                Err(err) => {
                    metrics.refused(kind, &err);
                    Outgoing::Frame(err.to_frame(id))
                }
            }
        }))
    }

    fn dispatch(
        &self,
        session: &mut RelaySession,
        kind: RequestKind,
        id: u64,
        request: Body,
    ) -> Reply {
        let me = session.identity;
        let store = &self.store;
        match request {
            Body::Register(req) => {
                self.limit(Limit::Change, session)?;
                let registration = validate::registration(&self.config, req)?;
                let device_id = registration.device;
                let done = store.register(&me, registration, self.clock.now_ms());
                self.reply(kind, id, async move {
                    let count = done.await?;
                    Ok(body(
                        id,
                        Body::Registered(Registered {
                            device_id,
                            one_time_prekeys: count,
                        }),
                    ))
                })
            }
            Body::Unregister(req) => {
                self.limit(Limit::Change, session)?;
                let device_id = req.device_id;
                let done = store.unregister(&me, device_id);
                session.subscriptions.retain(|d| *d != device_id);
                self.reply(kind, id, async move {
                    done.await?;
                    Ok(body(id, Body::Unregistered(Unregistered { device_id })))
                })
            }
            Body::UploadPreKeys(req) => {
                self.limit(Limit::Change, session)?;
                validate::prekeys(
                    &self.config,
                    req.signed_prekey.as_ref(),
                    &req.one_time_prekeys,
                )?;
                let device_id = req.device_id;
                let done =
                    store.upload_prekeys(&me, device_id, req.signed_prekey, req.one_time_prekeys);
                self.reply(kind, id, async move {
                    let count = done.await?;
                    Ok(body(
                        id,
                        Body::PreKeyCount(PreKeyCount { device_id, count }),
                    ))
                })
            }
            Body::GetPreKeyCount(req) => {
                let device_id = req.device_id;
                let done = store.prekey_count(&me, device_id);
                self.reply(kind, id, async move {
                    let count = done.await?;
                    Ok(body(
                        id,
                        Body::PreKeyCount(PreKeyCount { device_id, count }),
                    ))
                })
            }
            Body::FetchPreKeys(req) => {
                self.limit(Limit::PrekeyFetch, session)?;
                let target = validate::identity_field(&req.identity, "identity")?;
                if req.device_ids.len() > self.config.max_devices_per_identity {
                    return Err(RelayError::bad_request(format!(
                        "at most {} device ids in one fetch",
                        self.config.max_devices_per_identity
                    )));
                }
                let mut devices = req.device_ids;
                devices.sort_unstable();
                devices.dedup();
                let grants = self.limits.one_time_prekeys(target);
                let done = store.fetch_prekeys(&target, devices, grants);
                let metrics = self.metrics.clone();
                self.reply(kind, id, async move {
                    let fetched = done.await?;
                    metrics
                        .prekeys_handed_out
                        .increment(fetched.handed_out as u64);
                    metrics
                        .prekeys_exhausted
                        .increment(fetched.exhausted as u64);
                    metrics.prekeys_withheld.increment(fetched.withheld as u64);
                    Ok(body(
                        id,
                        Body::PreKeyBundles(PreKeyBundles {
                            bundles: fetched.bundles,
                        }),
                    ))
                })
            }
            Body::Send(req) => self.send(session, kind, id, req),
            Body::Subscribe(req) => {
                let mailbox = MailboxId {
                    identity: me,
                    device: req.device_id,
                };
                let done = self
                    .delivery
                    .subscribe(mailbox, req.after_id, session.push.clone());
                if !session.subscriptions.contains(&req.device_id) {
                    session.subscriptions.push(req.device_id);
                }
                self.reply(kind, id, async move {
                    let (last_id, replaced) = done.await?;
                    if let Some(old) = replaced {
                        let _ = old.push_frame(Frame::error(
                            0,
                            ErrorCode::Replaced,
                            format!("another session subscribed to device {}", mailbox.device),
                        ));
                    }
                    Ok(body(
                        id,
                        Body::Subscribed(Subscribed {
                            device_id: mailbox.device,
                            last_id,
                        }),
                    ))
                })
            }
            Body::GetMessage(req) => {
                let device = req.device_id;
                let done = store.get(
                    MailboxId {
                        identity: me,
                        device,
                    },
                    req.message_id,
                );
                self.reply(kind, id, async move {
                    Ok(Outgoing::Deliver(DeliverFrame {
                        frame_id: id,
                        device,
                        message: done.await?,
                    }))
                })
            }
            Body::AckMessages(req) => {
                self.limit(Limit::Ack, session)?;
                if req.message_ids.len() > validate::MAX_ACK_IDS {
                    return Err(RelayError::bad_request(format!(
                        "at most {} ids per ack",
                        validate::MAX_ACK_IDS
                    )));
                }
                let done = store.ack(
                    MailboxId {
                        identity: me,
                        device: req.device_id,
                    },
                    req.message_ids,
                );
                let metrics = self.metrics.clone();
                self.reply(kind, id, async move {
                    let deleted = done.await?;
                    metrics.messages_acked.increment(u64::from(deleted));
                    Ok(body(id, Body::Acked(Acked { deleted })))
                })
            }
            Body::SetPolicy(req) => {
                self.limit(Limit::Change, session)?;
                let accept = Accept::try_from(req.accept).map_err(|_| {
                    RelayError::bad_request(format!("unknown accept value {}", req.accept))
                })?;
                let done = store.set_policy(&me, accept);
                self.reply(kind, id, async move {
                    done.await?;
                    Ok(body(id, Body::Done(Done {})))
                })
            }
            Body::AddContact(req) => {
                self.limit(Limit::Change, session)?;
                let contact = validate::identity_field(&req.identity, "identity")?;
                let done = store.add_contact(&me, contact);
                self.reply(kind, id, async move {
                    done.await?;
                    Ok(body(id, Body::Done(Done {})))
                })
            }
            Body::RemoveContact(req) => {
                self.limit(Limit::Change, session)?;
                let contact = validate::identity_field(&req.identity, "identity")?;
                let done = store.remove_contact(&me, contact);
                self.reply(kind, id, async move {
                    done.await?;
                    Ok(body(id, Body::Done(Done {})))
                })
            }
            Body::CreateTicket(req) => {
                self.limit(Limit::Change, session)?;
                let (ttl_ms, uses) = validate::ticket(&self.config, req.ttl_s, req.uses)?;
                let token: [u8; crate::store::TICKET_LEN] = rand::random();
                let now = self.clock.now_ms();
                let expires_at_ms = now + ttl_ms;
                let done = store.create_ticket(&me, token, expires_at_ms, uses, now);
                let relay_pubkey = Bytes::copy_from_slice(self.relay_key.as_bytes());
                self.reply(kind, id, async move {
                    done.await?;
                    Ok(body(
                        id,
                        Body::Ticket(Ticket {
                            token: Bytes::copy_from_slice(&token),
                            expires_at_ms,
                            relay_pubkey,
                            identity: Bytes::copy_from_slice(&me),
                            uses,
                        }),
                    ))
                })
            }
            other => Err(RelayError::bad_request(format!(
                "{} is not a request",
                other.kind()
            ))),
        }
    }

    /// `Send`, with its checks in the order of the spec (§8.3).
    fn send(
        &self,
        session: &RelaySession,
        kind: RequestKind,
        id: u64,
        req: botd_protocol::proto::Send,
    ) -> Reply {
        let fields = validate::send(&req, self.config.max_payload_len as usize)?;
        self.limits.send(
            &session.identity,
            &fields.recipient,
            &session.address,
            session.now,
        )?;
        let sender = session.identity;
        let registered = self.store.is_registered(&sender, req.sender_device);
        let store = self.store.clone();
        let verify = self.config.verify_message_signatures;
        let message = NewMessage {
            to: MailboxId {
                identity: fields.recipient,
                device: req.recipient_device,
            },
            sender,
            sender_device: req.sender_device,
            nonce: fields.nonce,
            payload_hash: fields.payload_hash,
            signature: fields.signature,
            payload: req.payload,
            ticket: fields.ticket,
            received_at_ms: self.clock.at(session.now),
        };
        let metrics = self.metrics.clone();
        self.reply(kind, id, async move {
            if !registered.await? {
                return Err(RelayError::NotRegistered(message.sender_device));
            }
            if verify {
                let digest = message_digest(
                    &sender,
                    &message.to.identity,
                    message.to.device,
                    &message.nonce,
                    &message.payload_hash,
                );
                PublicKeyBytes::parse(&sender)
                    .expect("session identities are valid keys")
                    .verify(&digest, &message.signature)
                    .map_err(|err| RelayError::bad_request(format!("sender_signature: {err}")))?;
            }
            let (message_id, is_duplicate) = match store.append(message).await? {
                Appended::Stored(id) => {
                    metrics.messages_sent.increment(1);
                    (id, false)
                }
                Appended::Duplicate(id) => {
                    metrics.messages_duplicate.increment(1);
                    (id, true)
                }
            };
            Ok(body(
                id,
                Body::Sent(Sent {
                    message_id,
                    duplicate: is_duplicate,
                }),
            ))
        })
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
        match self.dispatch(session, kind, id, request) {
            Ok(answer) => answer,
            Err(err) => {
                self.metrics.refused(kind, &err);
                Answer::frame(err.to_frame(id))
            }
        }
    }

    fn is_barrier(&self, frame: &Frame) -> bool {
        matches!(frame.body, Some(Body::Subscribe(_)))
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
