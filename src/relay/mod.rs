//! The relay application served over authenticated sessions: registration, prekeys, mailboxes
//! with live delivery, contacts and tickets. The sender of every request is the identity the
//! session authenticated, never a field of the request, so a session can only read, ack or
//! configure its own mailboxes.

pub mod error;
pub mod mailbox;
pub mod store;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::time::Instant;

pub use error::RelayError;
pub use store::{EventSink, NoJournal, Store};

use crate::config::Config;
use crate::core::keys::{sha256, PublicKeyBytes};
use crate::memory::RELEASE_AFTER_FREED_BYTES;
use crate::metrics as m;
use crate::net::{unsupported_unless_ignorable, Handler, PushHandle};
use crate::proto::{Acked, Body, Done, Frame, PreKeysLow, Send, Sent, Subscribed, Unregistered};
use crate::ratelimit::KeyedLimiter;
use store::{validate_send, Identity};

pub use crate::clock::Clock;

/// The digest a sender signs for `Send.sender_signature`:
/// SHA-256("botd/1 message" || sender || recipient || recipient_device u32 BE || nonce || payload_hash).
pub fn message_digest(
    sender: &[u8],
    recipient: &[u8],
    recipient_device: u32,
    nonce: &[u8],
    payload_hash: &[u8],
) -> [u8; 32] {
    sha256(&[
        b"botd/1 message",
        sender,
        recipient,
        &recipient_device.to_be_bytes(),
        nonce,
        payload_hash,
    ])
}

struct Limiters {
    sends: Mutex<KeyedLimiter<Identity>>,
    pairs: Mutex<KeyedLimiter<(Identity, Identity)>>,
    fetches: Mutex<KeyedLimiter<Identity>>,
}

pub struct Relay {
    store: Store,
    /// The journal, when the store is durable: changing requests wait for their records.
    journal: Option<Arc<crate::storage::Journal>>,
    config: Arc<Config>,
    clock: Clock,
    relay_key: PublicKeyBytes,
    limiters: Limiters,
    /// Open sessions per identity, for notices such as `PreKeysLow`. Bounded by the connection cap.
    sessions: Mutex<HashMap<Identity, Vec<PushHandle>>>,
    /// Highest stored payload total a sweep has seen since free memory was last given back.
    payload_peak: std::sync::atomic::AtomicU64,
}

/// Per-session state: who the peer is and which mailboxes it listens to.
pub struct RelaySession {
    identity: Identity,
    push: PushHandle,
    subscriptions: Vec<u32>,
}

/// A stored message to push once its record is durable: (recipient, device, message id).
type Release = (Identity, u32, u64);

impl Relay {
    pub fn new(config: Arc<Config>, relay_key: PublicKeyBytes, sink: Arc<dyn EventSink>) -> Self {
        let store = Store::new(&config, sink);
        Self::with_store(config, relay_key, store)
    }

    /// A relay over a recovered store whose changes go to `journal`.
    pub fn durable(
        config: Arc<Config>,
        relay_key: PublicKeyBytes,
        store: Store,
        journal: Arc<crate::storage::Journal>,
    ) -> Self {
        let mut relay = Self::with_store(config, relay_key, store);
        relay.journal = Some(journal);
        relay
    }

    /// A relay over an existing store.
    pub fn with_store(config: Arc<Config>, relay_key: PublicKeyBytes, store: Store) -> Self {
        let keys = config.max_rate_limited_keys;
        let limiters = Limiters {
            sends: Mutex::new(KeyedLimiter::new(config.send_rate_per_identity, keys)),
            pairs: Mutex::new(KeyedLimiter::new(config.send_rate_per_pair, keys)),
            fetches: Mutex::new(KeyedLimiter::new(config.prekey_fetch_rate, keys)),
        };
        Self {
            store,
            journal: None,
            config,
            clock: Clock::new(),
            relay_key,
            limiters,
            sessions: Mutex::new(HashMap::new()),
            payload_peak: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Removes messages past the retention TTL and refreshes the store gauges; returns how
    /// many were removed.
    pub fn expire_now(&self) -> usize {
        let ttl = self.config.message_ttl.as_millis() as u64;
        let expiry = self.store.expire(self.clock.now_ms().saturating_sub(ttl));
        metrics::counter!(m::MESSAGES_EXPIRED).increment(expiry.expired as u64);
        metrics::gauge!(m::MAILBOX_MESSAGES).set(expiry.messages_left as f64);
        metrics::gauge!(m::MAILBOX_BYTES).set(expiry.payload_bytes_left as f64);
        self.release_memory_if_worth_it(&expiry);
        expiry.expired
    }

    /// After a sweep: once the store has shrunk by [`RELEASE_AFTER_FREED_BYTES`] since the last
    /// time (acks, expiry, trimmed mailboxes), asks the allocator to give its free pages back.
    fn release_memory_if_worth_it(&self, expiry: &store::Expiry) {
        use std::sync::atomic::Ordering::Relaxed;
        let held = expiry.payload_bytes_left as u64;
        let peak = self.payload_peak.fetch_max(held, Relaxed).max(held);
        let freed = peak - held + expiry.bytes_trimmed as u64;
        if freed >= RELEASE_AFTER_FREED_BYTES {
            let started = std::time::Instant::now();
            crate::memory::release_free_memory();
            self.payload_peak.store(held, Relaxed);
            tracing::debug!(
                freed,
                took_us = started.elapsed().as_micros() as u64,
                "gave free memory back to the system"
            );
        }
    }

    /// Sweeps expired messages every `expiry_interval` and refreshes the store gauges, until
    /// `shutdown` fires.
    pub async fn run_maintenance(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(self.config.expiry_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    // The sweep walks every mailbox and may trim the heap: off the runtime's
                    // workers, like snapshots.
                    let relay = self.clone();
                    if let Err(err) = tokio::task::spawn_blocking(move || relay.expire_now()).await {
                        tracing::error!(error = %err, "expiry sweep failed");
                    }
                }
            }
        }
    }

    /// Under `fsync = always`, waits until every change made so far is durable (group commit:
    /// one fsync covers many requests). The other policies answer at once.
    async fn wait_durable(&self) -> Result<(), crate::storage::StorageError> {
        match &self.journal {
            Some(journal) if journal.policy() == crate::config::FsyncPolicy::Always => {
                journal.wait_durable(journal.last_lsn()).await
            }
            Some(journal) if journal.failed() => Err(crate::storage::StorageError::WriterFailed(
                "the journal can no longer be written".into(),
            )),
            _ => Ok(()),
        }
    }

    /// Takes a token for `key`; `label` names the limit in metrics, `what` in the error.
    fn rate_limit<K: std::hash::Hash + Eq + Clone>(
        limiter: &Mutex<KeyedLimiter<K>>,
        key: &K,
        label: &'static str,
        what: &'static str,
    ) -> Result<(), RelayError> {
        limiter
            .lock()
            .try_take(key, Instant::now())
            .map_err(|retry_after| {
                metrics::counter!(m::RATE_LIMITED, "limit" => label).increment(1);
                RelayError::RateLimited { what, retry_after }
            })
    }

    fn send(&self, sender: &Identity, req: Send) -> Result<(Sent, Release), RelayError> {
        if let Err(err) = validate_send(&req, self.config.max_payload_len as usize) {
            if let RelayError::PayloadTooLarge { .. } = err {
                metrics::counter!(m::QUOTA_HITS, "kind" => "payload_too_large").increment(1);
            }
            return Err(err);
        }
        Self::rate_limit(&self.limiters.sends, sender, "sends", "sends")?;
        let recipient: Identity = req.recipient[..].try_into().expect("validated length");
        let pair = (*sender, recipient);
        Self::rate_limit(
            &self.limiters.pairs,
            &pair,
            "sends_to_recipient",
            "sends to this recipient",
        )?;
        if !self.store.is_registered(sender, req.sender_device) {
            return Err(RelayError::NotRegistered(req.sender_device));
        }
        if self.config.verify_message_signatures {
            let digest = message_digest(
                sender,
                &req.recipient,
                req.recipient_device,
                &req.sender_nonce,
                &req.payload_hash,
            );
            let key = PublicKeyBytes::parse(sender).expect("session identities are valid keys");
            key.verify(&digest, &req.sender_signature)
                .map_err(|err| RelayError::bad_request(format!("sender_signature: {err}")))?;
        }
        let outcome = self
            .store
            .send(sender, &req, self.clock.now_ms())
            .inspect_err(|err| {
                if let RelayError::MailboxFull(_) = err {
                    metrics::counter!(m::QUOTA_HITS, "kind" => "mailbox_full").increment(1);
                }
            })?;
        if outcome.duplicate {
            metrics::counter!(m::MESSAGES_DUPLICATE).increment(1);
        } else {
            metrics::counter!(m::MESSAGES_SENT).increment(1);
        }
        let sent = Sent {
            message_id: outcome.message_id,
            duplicate: outcome.duplicate,
        };
        // Pushed to a subscriber only after the durability wait (see `request`).
        Ok((sent, (recipient, req.recipient_device, outcome.message_id)))
    }

    fn notify_owner(&self, identity: &Identity, frame: Frame) {
        let sessions = self.sessions.lock();
        for push in sessions.get(identity).into_iter().flatten() {
            let _ = push.push(frame.clone());
        }
    }

    /// Answers one request of `session`, with the message it stored, if any.
    fn dispatch(
        &self,
        session: &mut RelaySession,
        body: Body,
    ) -> Result<(Body, Option<Release>), RelayError> {
        let me = session.identity;
        let answer = match body {
            Body::Register(req) => Body::Registered(self.store.register(&me, req)?),
            Body::Unregister(req) => {
                self.store.unregister(&me, req.device_id)?;
                session.subscriptions.retain(|d| *d != req.device_id);
                Body::Unregistered(Unregistered {
                    device_id: req.device_id,
                })
            }
            Body::UploadPreKeys(req) => Body::PreKeyCount(self.store.upload_prekeys(&me, req)?),
            Body::GetPreKeyCount(req) => {
                Body::PreKeyCount(self.store.prekey_count(&me, req.device_id)?)
            }
            Body::FetchPreKeys(req) => {
                Self::rate_limit(
                    &self.limiters.fetches,
                    &me,
                    "prekey_fetches",
                    "prekey fetches",
                )?;
                let target = store::identity_field(&req.identity, "identity")?;
                let outcome = self.store.fetch_prekeys(
                    &target,
                    &req.device_ids,
                    self.config.prekey_low_threshold,
                )?;
                metrics::counter!(m::PREKEYS_HANDED_OUT).increment(outcome.handed_out as u64);
                metrics::counter!(m::PREKEYS_EXHAUSTED).increment(outcome.exhausted as u64);
                for (device_id, count) in outcome.low {
                    self.notify_owner(
                        &target,
                        Frame::new(0, Body::PreKeysLow(PreKeysLow { device_id, count })),
                    );
                }
                Body::PreKeyBundles(outcome.bundles)
            }
            Body::Send(req) => {
                let (sent, release) = self.send(&me, req)?;
                return Ok((Body::Sent(sent), Some(release)));
            }
            Body::Subscribe(req) => {
                let (last_id, replaced) =
                    self.store
                        .subscribe(&me, req.device_id, req.after_id, session.push.clone())?;
                if let Some(old) = replaced {
                    let _ = old.push(store::replaced_notice(req.device_id));
                }
                if !session.subscriptions.contains(&req.device_id) {
                    session.subscriptions.push(req.device_id);
                }
                Body::Subscribed(Subscribed {
                    device_id: req.device_id,
                    last_id,
                })
            }
            Body::GetMessage(req) => {
                Body::Deliver(self.store.get_message(&me, req.device_id, req.message_id)?)
            }
            Body::AckMessages(req) => {
                let deleted = self.store.ack(&me, req.device_id, &req.message_ids)?;
                metrics::counter!(m::MESSAGES_ACKED).increment(u64::from(deleted));
                Body::Acked(Acked { deleted })
            }
            Body::SetPolicy(req) => {
                let accept = crate::proto::Accept::try_from(req.accept).map_err(|_| {
                    RelayError::bad_request(format!("unknown accept value {}", req.accept))
                })?;
                self.store.set_policy(&me, accept)?;
                Body::Done(Done {})
            }
            Body::AddContact(req) => {
                self.store.add_contact(&me, &req.identity)?;
                Body::Done(Done {})
            }
            Body::RemoveContact(req) => {
                self.store.remove_contact(&me, &req.identity)?;
                Body::Done(Done {})
            }
            Body::CreateTicket(req) => {
                let mut ticket =
                    self.store
                        .create_ticket(&me, req.ttl_s, req.uses, self.clock.now_ms())?;
                ticket.relay_pubkey = Bytes::copy_from_slice(self.relay_key.as_bytes());
                Body::Ticket(ticket)
            }
            other => {
                return Err(RelayError::bad_request(format!(
                    "{} is not a request",
                    other.kind()
                )))
            }
        };
        Ok((answer, None))
    }
}

/// True for requests whose answer must wait until their change is durable.
fn changes_state(body: &Body) -> bool {
    !matches!(
        body,
        Body::GetPreKeyCount(_) | Body::Subscribe(_) | Body::GetMessage(_)
    )
}

/// True for the bodies a node may send as requests.
fn is_request(body: &Body) -> bool {
    matches!(
        body,
        Body::Register(_)
            | Body::Unregister(_)
            | Body::UploadPreKeys(_)
            | Body::GetPreKeyCount(_)
            | Body::FetchPreKeys(_)
            | Body::Send(_)
            | Body::Subscribe(_)
            | Body::GetMessage(_)
            | Body::AckMessages(_)
            | Body::SetPolicy(_)
            | Body::AddContact(_)
            | Body::RemoveContact(_)
            | Body::CreateTicket(_)
    )
}

impl Handler for Arc<Relay> {
    type Session = RelaySession;

    fn connect(&self, peer: PublicKeyBytes, push: PushHandle) -> RelaySession {
        let identity = *peer.as_bytes();
        let mut sessions = self.sessions.lock();
        let list = sessions.entry(identity).or_default();
        list.retain(|p| !p.is_closed());
        list.push(push.clone());
        RelaySession {
            identity,
            push,
            subscriptions: Vec::new(),
        }
    }

    async fn request(&self, session: &mut RelaySession, frame: Frame) -> Vec<Frame> {
        let id = frame.id;
        let body = match frame.body {
            Some(body) if is_request(&body) => body,
            _ => return unsupported_unless_ignorable(&frame).into_iter().collect(),
        };
        let kind = body.kind();
        if id == 0 {
            return vec![RelayError::bad_request("requests need a non-zero frame id").to_frame(0)];
        }
        let changes_state = changes_state(&body);
        let mut outcome = self.dispatch(session, body);
        if changes_state && outcome.is_ok() {
            if let Err(err) = self.wait_durable().await {
                outcome = Err(RelayError::Internal(err.to_string()));
            }
        }
        let outcome = outcome.map(|(body, release)| {
            if let Some((recipient, device_id, message_id)) = release {
                self.store.release(&recipient, device_id, message_id);
            }
            body
        });
        let answer = match outcome {
            Ok(body) => {
                metrics::counter!(m::REQUESTS, "kind" => kind, "outcome" => "ok").increment(1);
                Frame::new(id, body)
            }
            Err(err) => {
                metrics::counter!(m::REQUESTS, "kind" => kind, "outcome" => err.code().as_str_name()).increment(1);
                err.to_frame(id)
            }
        };
        vec![answer]
    }

    fn resume(&self, session: &mut RelaySession) {
        for device_id in &session.subscriptions {
            self.store
                .resume(&session.identity, *device_id, &session.push);
        }
    }

    fn disconnect(&self, session: RelaySession) {
        for device_id in &session.subscriptions {
            self.store
                .unsubscribe(&session.identity, *device_id, &session.push);
        }
        let mut sessions = self.sessions.lock();
        if let Some(list) = sessions.get_mut(&session.identity) {
            list.retain(|p| !p.same_session(&session.push) && !p.is_closed());
            if list.is_empty() {
                sessions.remove(&session.identity);
            }
        }
    }
}
