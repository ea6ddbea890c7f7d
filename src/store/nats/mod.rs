//! The JetStream backend: the relay's state on a NATS JetStream cluster, shared by any number
//! of relays (`store = "nats://HOST:PORT[,…]"`). See docs/SCALING.md for the operator's view.
//!
//! * **Mailboxes** are one stream (`<PREFIX>_MESSAGES`). A message's subject is
//!   `<prefix>.m.<recipient hex>.<device>.<sender hex><nonce hex>`, so a mailbox is the
//!   subjects `<prefix>.m.<recipient hex>.<device>.*` and a `(sender, nonce)` has one subject
//!   per mailbox. The **message id is the stream sequence**: assigned by the stream leader,
//!   strictly increasing in storage order, never reused (the stream never resets its sequence),
//!   with gaps (the other mailboxes' messages). An append is published with
//!   `Nats-Expected-Last-Subject-Sequence: 0`: the idempotency check and the append are one
//!   atomic step on the leader, across relays, for as long as the first message is stored.
//!   Ack deletes the message; the relays' sweep deletes expired ones (the stream's `max_age`,
//!   an hour longer, is the backstop) and the stream's `max_bytes` (discard new) is
//!   `max_stored_bytes`.
//! * **Accounts** (devices, per-mailbox usage, policy, contacts, tickets, last use) are one
//!   record each in bucket `<prefix>_accounts`, and **device keys** (bundle and one-time
//!   prekeys) one record per registration in `<prefix>_keys`. Every change is a
//!   compare-and-set of one record (retried on conflict), so registration limits, quotas,
//!   ticket uses and prekey pops hold across relays: a one-time prekey or a ticket use is
//!   handed out by exactly one successful write.
//! * **Live events** come from [`feeds`]: every relay reads the mailbox stream and a stream of
//!   notices (removals, closed mailboxes, `PreKeysLow`) with ordered consumers.
//!
//! Every answer that reports a change resolves after JetStream acknowledged the write (with
//! the stream's replicas); reads go to the stream leader and see acknowledged writes only.
//! Requests that cannot reach the cluster fail after `nats_request_timeout` with
//! `StoreError::Unavailable`; the client reconnects by itself meanwhile.
//!
//! Operations are several requests each (read, check, write), so none takes effect before its
//! future runs: `max_pipelined()` is 1 and the relay runs one request per session at a time.

pub mod cluster;
pub mod error;
pub mod feeds;
pub mod records;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ahash::AHashMap;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use self::cluster::{
    decode_message, message_generation, message_headers, message_received_at, Cluster,
};
pub use self::error::NatsError;
use self::feeds::Shared;
use self::records::{
    account_key, decode, encode, keys_key, AccountRecord, DeviceKeys, EventKind, EventRecord,
    TicketRecord, IDENTITIES_KEY,
};
use super::{
    AccountLimits, Appended, Expiry, Fetched, Identity, Listener, MailboxId, Message, NewMessage,
    QuotaKind, Registration, Store, StoreError, StoreResult, StoreStats, TICKET_LEN,
};
use crate::config::{Config, StoreBackend};
use botd_protocol::proto::{Accept, PreKey, PreKeyBundle, SignedPreKey};

/// Compare-and-set attempts before an operation gives up (`Unavailable`).
const MAX_ATTEMPTS: u32 = 200;
/// Requests one ack or sweep keeps in flight at once.
const PARALLEL_REQUESTS: usize = 64;
/// Expired messages one sweep of one relay deletes at most.
const SWEEP_BATCH: usize = 10_000;
/// Idle accounts are looked for at most this often by one relay (it lists the bucket).
const ACCOUNT_SWEEP_EVERY_MS: u64 = 600_000;
/// Identities whose last `touch` this relay remembers.
const MAX_TOUCHED: usize = 100_000;

struct Inner {
    limits: AccountLimits,
    shared: Arc<Shared>,
    cluster: Cluster,
    stats: Mutex<StoreStats>,
    /// When this relay last recorded each identity's use.
    touched: Mutex<AHashMap<Identity, u64>>,
    last_account_sweep_ms: AtomicU64,
    stop: CancellationToken,
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

/// What a compare-and-set step decided.
enum Step<R, T> {
    /// Write this record (an empty account removes it), then answer `T`.
    Write(R, T),
    /// Answer without writing.
    Keep(T),
}

fn unavailable(err: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(err.to_string())
}

/// A short, growing, random pause between compare-and-set attempts, so that many writers of
/// one record do not collide in lock step.
async fn back_off(attempt: u32) {
    if attempt >= 2 {
        let most = u64::from(attempt.min(20)) * 500;
        let micros = rand::random::<u64>() % most;
        tokio::time::sleep(Duration::from_micros(micros)).await;
    }
}

impl NatsStore {
    /// Connects to the cluster `config.store` names and creates what is missing there. Needs a
    /// tokio runtime (its feeds run as tasks).
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
        let cluster = Cluster::connect(&urls, config).await?;
        let shared = Arc::new(Shared {
            listener: OnceLock::new(),
            names: cluster.names.clone(),
            origin: rand::random(),
            known: Mutex::new(AHashMap::new()),
        });
        let stop = CancellationToken::new();
        feeds::start(
            shared.clone(),
            cluster.messages.clone(),
            cluster.events.clone(),
            stop.clone(),
        )?;
        let store = Self {
            inner: Arc::new(Inner {
                limits: AccountLimits::from_config(config),
                shared,
                cluster,
                stats: Mutex::new(StoreStats::default()),
                touched: Mutex::new(AHashMap::new()),
                last_account_sweep_ms: AtomicU64::new(0),
                stop,
            }),
        };
        store.inner.refresh_stats().await;
        Ok(store)
    }

    /// The NATS client (tests watch its state).
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.cluster.client
    }
}

impl Inner {
    fn listener(&self) -> Option<&Arc<dyn Listener>> {
        self.shared.listener.get()
    }

    fn messages(&self) -> &stream::Stream {
        &self.cluster.messages
    }

    async fn account(&self, identity: &Identity) -> StoreResult<Option<(AccountRecord, u64)>> {
        let (value, revision) = self.cluster.accounts.load(&account_key(identity)).await?;
        match value {
            None => Ok(None),
            Some(bytes) => {
                let record =
                    decode::<AccountRecord>(&bytes).ok_or(NatsError::Corrupt("account record"))?;
                Ok(Some((record, revision)))
            }
        }
    }

    /// The account, if it has a registered device.
    async fn registered_account(&self, identity: &Identity) -> StoreResult<Option<AccountRecord>> {
        Ok(self
            .account(identity)
            .await?
            .map(|(record, _)| record)
            .filter(AccountRecord::is_registered))
    }

    /// Runs `step` on the current account record (`None`: no account) and writes what it
    /// returns with compare-and-set, again on conflict.
    async fn update_account<T>(
        &self,
        identity: &Identity,
        mut step: impl FnMut(Option<AccountRecord>) -> StoreResult<Step<AccountRecord, T>>,
    ) -> StoreResult<T> {
        let key = account_key(identity);
        for attempt in 0..MAX_ATTEMPTS {
            back_off(attempt).await;
            let (value, revision) = self.cluster.accounts.load(&key).await?;
            let current = match value {
                None => None,
                Some(bytes) => Some(
                    decode::<AccountRecord>(&bytes).ok_or(NatsError::Corrupt("account record"))?,
                ),
            };
            match step(current)? {
                Step::Keep(answer) => return Ok(answer),
                Step::Write(record, answer) => {
                    // An account without devices is removed: its entry is emptied.
                    let bytes = if record.devices.is_empty() {
                        Bytes::new()
                    } else {
                        encode(&record)
                    };
                    if self
                        .cluster
                        .accounts
                        .compare_and_set(&key, bytes, revision)
                        .await?
                        .is_some()
                    {
                        return Ok(answer);
                    }
                }
            }
        }
        Err(NatsError::Contended("an account record").into())
    }

    /// Runs `step` on a device keys record and writes its result with compare-and-set.
    async fn update_keys<T>(
        &self,
        key: &str,
        mut step: impl FnMut(Option<DeviceKeys>) -> StoreResult<Step<DeviceKeys, T>>,
    ) -> StoreResult<T> {
        for attempt in 0..MAX_ATTEMPTS {
            back_off(attempt).await;
            let (value, revision) = self.cluster.keys.load(key).await?;
            let current = match value {
                None => None,
                Some(bytes) => {
                    Some(decode::<DeviceKeys>(&bytes).ok_or(NatsError::Corrupt("device keys"))?)
                }
            };
            match step(current)? {
                Step::Keep(answer) => return Ok(answer),
                Step::Write(record, answer) => {
                    if self
                        .cluster
                        .keys
                        .compare_and_set(key, encode(&record), revision)
                        .await?
                        .is_some()
                    {
                        return Ok(answer);
                    }
                }
            }
        }
        Err(NatsError::Contended("a device keys record").into())
    }

    /// Adds `delta` to the relay-wide identity count, refusing to pass `max` when growing.
    async fn count_identities(&self, delta: i64) -> StoreResult<()> {
        for attempt in 0..MAX_ATTEMPTS {
            back_off(attempt).await;
            let (value, revision) = self.cluster.accounts.load(IDENTITIES_KEY).await?;
            let count: u64 = value
                .as_deref()
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if delta > 0 && count >= self.limits.max_identities as u64 {
                return Err(StoreError::QuotaExceeded {
                    kind: QuotaKind::Identities,
                    message: "the relay holds as many identities as it may",
                });
            }
            let next = count.saturating_add_signed(delta);
            let bytes = Bytes::from(next.to_string());
            if self
                .cluster
                .accounts
                .compare_and_set(IDENTITIES_KEY, bytes, revision)
                .await?
                .is_some()
            {
                return Ok(());
            }
        }
        Err(NatsError::Contended("the identity count").into())
    }

    /// Publishes a notice for the other relays (after the change it reports was acknowledged).
    async fn publish_event(&self, kind: EventKind, mailbox: &MailboxId, ids: Vec<u64>, count: u32) {
        let event = EventRecord {
            origin: self.shared.origin,
            kind: kind as i32,
            identity: mailbox.identity.to_vec(),
            device: mailbox.device,
            ids,
            count,
        };
        let subject = self.shared.names.event_subject(kind);
        let published = match self.cluster.js.publish(subject, encode(&event)).await {
            Ok(ack) => ack.await.map(drop).map_err(|err| err.to_string()),
            Err(err) => Err(err.to_string()),
        };
        if let Err(err) = published {
            tracing::warn!(error = %err, "a notice for the other relays was not published");
        }
    }

    /// Stored message `id` of `mailbox` (of its current generation), if any.
    async fn stored_message(
        &self,
        mailbox: &MailboxId,
        generation: u64,
        id: u64,
    ) -> StoreResult<Option<Message>> {
        match self.messages().get_raw_message(id).await {
            Ok(raw) => Ok(decode_message(
                &self.shared.names,
                raw.subject.as_str(),
                raw.sequence,
                &raw.headers,
                raw.payload,
            )
            .filter(|(of, gen, _)| of == mailbox && *gen == generation)
            .map(|(_, _, message)| message)),
            Err(err) if err.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(err) => Err(unavailable(err)),
        }
    }

    /// The first message at or after `from` on `filter`, if any.
    async fn next_message(
        &self,
        filter: &str,
        from: u64,
    ) -> StoreResult<Option<jetstream::message::StreamMessage>> {
        match self
            .messages()
            .raw_message_builder()
            .sequence(from.max(1))
            .next_by_subject(filter.to_owned())
            .send()
            .await
        {
            Ok(raw) => Ok(Some(raw)),
            Err(err) if err.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(err) => Err(unavailable(err)),
        }
    }

    /// The id of the message `sender` stored with `nonce` in `mailbox`, if it is stored.
    async fn find_nonce(&self, subject: &str) -> StoreResult<Option<u64>> {
        match self
            .messages()
            .get_last_raw_message_by_subject(subject)
            .await
        {
            Ok(raw) => Ok(Some(raw.sequence)),
            Err(err) if err.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(err) => Err(unavailable(err)),
        }
    }

    /// Takes stored messages out of a mailbox's usage (after their deletion); `highest` is the
    /// highest id among them, remembered for `last_id`.
    async fn release_usage(&self, mailbox: &MailboxId, messages: u64, bytes: u64, highest: u64) {
        if messages == 0 {
            return;
        }
        let released = self
            .update_account(&mailbox.identity, |account| {
                let Some(mut account) = account else {
                    return Ok(Step::Keep(()));
                };
                let Some(slot) = account.slot_mut(mailbox.device) else {
                    return Ok(Step::Keep(()));
                };
                slot.messages = slot.messages.saturating_sub(messages);
                slot.bytes = slot.bytes.saturating_sub(bytes);
                slot.last_removed_id = slot.last_removed_id.max(highest);
                Ok(Step::Write(account, ()))
            })
            .await;
        if let Err(err) = released {
            tracing::warn!(error = %err, "mailbox usage not updated after a deletion");
        }
    }

    /// Deletes the listed messages of a mailbox generation; returns the ids deleted (sorted)
    /// and their payload bytes. Only the relay whose delete succeeded counts a message.
    async fn delete_messages(
        &self,
        mailbox: &MailboxId,
        generation: u64,
        ids: Vec<u64>,
    ) -> StoreResult<(Vec<u64>, u64)> {
        let results: Vec<StoreResult<Option<(u64, u64)>>> = futures_util::stream::iter(ids)
            .map(|id| async move {
                // A message this relay saw is known to be of this mailbox; others are read
                // first, so that an ack never deletes another mailbox's message.
                let len = match self.shared.forget(id) {
                    Some((of, gen, len)) if of == *mailbox && gen == generation => len,
                    _ => match self.stored_message(mailbox, generation, id).await? {
                        Some(message) => message.payload.len() as u64,
                        None => return Ok(None),
                    },
                };
                match self.messages().delete_message(id).await {
                    Ok(true) => Ok(Some((id, len))),
                    Ok(false) => Ok(None),
                    Err(err) if err.to_string().contains("no message found") => Ok(None),
                    Err(err) => Err(unavailable(err)),
                }
            })
            .buffer_unordered(PARALLEL_REQUESTS)
            .collect()
            .await;
        let mut deleted = Vec::new();
        let mut bytes = 0;
        let mut failure = None;
        for result in results {
            match result {
                Ok(Some((id, len))) => {
                    deleted.push(id);
                    bytes += len;
                }
                Ok(None) => {}
                Err(err) => failure = Some(err),
            }
        }
        deleted.sort_unstable();
        // What was deleted is gone whatever else failed: count it out before reporting.
        let highest = deleted.last().copied().unwrap_or(0);
        self.release_usage(mailbox, deleted.len() as u64, bytes, highest)
            .await;
        if !deleted.is_empty() {
            if let Some(listener) = self.listener() {
                listener.removed(mailbox, &deleted);
            }
            self.publish_event(EventKind::Removed, mailbox, deleted.clone(), 0)
                .await;
        }
        match failure {
            Some(err) => Err(err),
            None => Ok((deleted, bytes)),
        }
    }

    /// Ends a mailbox: its messages go (all generations), the relays hear it is closed.
    async fn close_mailbox(&self, mailbox: &MailboxId) {
        let filter = self.shared.names.mailbox_filter(mailbox);
        if let Err(err) = self.messages().purge().filter(filter).await {
            tracing::warn!(error = %err, "an unregistered mailbox was not purged");
        }
        if let Some(listener) = self.listener() {
            listener.closed(mailbox);
        }
        self.publish_event(EventKind::Closed, mailbox, Vec::new(), 0)
            .await;
    }

    async fn refresh_stats(&self) {
        let mut stats = *self.stats.lock();
        if let Ok(info) = self.messages().get_info().await {
            stats.messages = info.state.messages as usize;
            stats.payload_bytes = info.state.bytes as usize;
        }
        if let Ok((Some(value), _)) = self.cluster.accounts.load(IDENTITIES_KEY).await {
            if let Some(count) = std::str::from_utf8(&value)
                .ok()
                .and_then(|v| v.parse().ok())
            {
                stats.identities = count;
            }
        }
        *self.stats.lock() = stats;
    }

    async fn register(
        self: Arc<Self>,
        me: Identity,
        reg: Registration,
        now_ms: u64,
    ) -> StoreResult<u32> {
        let count = reg.one_time_prekeys.len() as u32;
        let keys = DeviceKeys {
            registration_id: reg.registration_id,
            identity_key: reg.identity_key,
            signed_prekey: Some(reg.signed_prekey),
            one_time_prekeys: reg.one_time_prekeys,
            low_announced: false,
        };
        let generation: u64 = rand::random();
        let key = keys_key(&me, reg.device, generation);
        self.cluster.keys.put(&key, encode(&keys)).await?;
        let limits = self.limits.clone();
        let device = reg.device;
        let mut counted = false;
        let outcome = loop {
            let mut new_account = false;
            let written = self
                .update_account(&me, |account| {
                    new_account = account.is_none();
                    if new_account && !counted {
                        // Counted first, below, then written.
                        return Ok(Step::Keep(None));
                    }
                    let mut account = account.unwrap_or_default();
                    let was = account.registered(device).cloned();
                    if was.is_none() {
                        if account.active_devices() >= limits.max_devices_per_identity {
                            return Err(StoreError::Limit {
                                kind: QuotaKind::Devices,
                                message: format!(
                                    "at most {} devices per identity",
                                    limits.max_devices_per_identity
                                ),
                            });
                        }
                        if account.slot(device).is_none()
                            && account.devices.len() >= 4 * limits.max_devices_per_identity
                        {
                            return Err(StoreError::Limit {
                                kind: QuotaKind::DeviceIds,
                                message: "too many device ids used by this identity".into(),
                            });
                        }
                    }
                    account.last_seen_ms = account.last_seen_ms.max(now_ms);
                    let slot = account.slot_entry(device);
                    let old_keys = was.as_ref().map(|s| s.keys_generation);
                    if was.is_none() {
                        slot.mailbox_generation = rand::random();
                        slot.messages = 0;
                        slot.bytes = 0;
                    }
                    slot.registered = true;
                    slot.keys_generation = generation;
                    Ok(Step::Write(account, Some(old_keys)))
                })
                .await;
            match written {
                Ok(Some(old_keys)) => {
                    if counted && !new_account {
                        // Another relay created the account meanwhile.
                        let _ = self.count_identities(-1).await;
                    }
                    break Ok(old_keys);
                }
                Ok(None) => {
                    self.count_identities(1).await?;
                    counted = true;
                }
                Err(err) => {
                    if counted {
                        let _ = self.count_identities(-1).await;
                    }
                    break Err(err);
                }
            }
        };
        match outcome {
            Ok(old_keys) => {
                if let Some(old) = old_keys {
                    let _ = self.cluster.keys.purge(&keys_key(&me, device, old)).await;
                }
                Ok(count)
            }
            Err(err) => {
                let _ = self.cluster.keys.purge(&key).await;
                Err(err)
            }
        }
    }

    async fn unregister(self: Arc<Self>, me: Identity, device: u32) -> StoreResult<()> {
        let mailbox = MailboxId {
            identity: me,
            device,
        };
        // The mailbox's messages go: their highest id stays known, as ids continue if the
        // device comes back.
        let last_stored = self
            .find_nonce(&self.shared.names.mailbox_filter(&mailbox))
            .await?
            .unwrap_or(0);
        let (keys_generation, removed) = self
            .update_account(&me, |account| {
                let Some(mut account) = account.filter(|a| a.registered(device).is_some()) else {
                    return Err(StoreError::NotRegistered(device));
                };
                let slot = account.slot_mut(device).expect("registered");
                let generation = slot.keys_generation;
                slot.last_removed_id = slot.last_removed_id.max(last_stored);
                slot.registered = false;
                slot.messages = 0;
                slot.bytes = 0;
                if account.is_registered() {
                    Ok(Step::Write(account, (generation, false)))
                } else {
                    Ok(Step::Write(AccountRecord::default(), (generation, true)))
                }
            })
            .await?;
        if removed {
            let _ = self.count_identities(-1).await;
        }
        let _ = self
            .cluster
            .keys
            .purge(&keys_key(&me, device, keys_generation))
            .await;
        self.close_mailbox(&mailbox).await;
        Ok(())
    }

    async fn device_keys_key(&self, me: &Identity, device: u32) -> StoreResult<String> {
        let account = self.account(me).await?.map(|(a, _)| a);
        let slot = account
            .as_ref()
            .and_then(|a| a.registered(device))
            .ok_or(StoreError::NotRegistered(device))?;
        Ok(keys_key(me, device, slot.keys_generation))
    }

    async fn upload_prekeys(
        self: Arc<Self>,
        me: Identity,
        device: u32,
        signed_prekey: Option<SignedPreKey>,
        one_time_prekeys: Vec<PreKey>,
    ) -> StoreResult<u32> {
        let key = self.device_keys_key(&me, device).await?;
        let limits = self.limits.clone();
        self.update_keys(&key, |keys| {
            let mut keys = keys.ok_or(StoreError::NotRegistered(device))?;
            limits.check_prekey_upload(keys.one_time_prekeys.len(), &one_time_prekeys, |id| {
                keys.one_time_prekeys.iter().any(|k| k.id == id)
            })?;
            if let Some(signed) = &signed_prekey {
                keys.signed_prekey = Some(signed.clone());
            }
            keys.one_time_prekeys
                .extend(one_time_prekeys.iter().cloned());
            let count = keys.one_time_prekeys.len() as u32;
            if count >= limits.prekey_low_threshold {
                keys.low_announced = false;
            }
            Ok(Step::Write(keys, count))
        })
        .await
    }

    async fn prekey_count(self: Arc<Self>, me: Identity, device: u32) -> StoreResult<u32> {
        let key = self.device_keys_key(&me, device).await?;
        let (value, _) = self.cluster.keys.load(&key).await?;
        let keys = value
            .and_then(|v| decode::<DeviceKeys>(&v))
            .ok_or(StoreError::NotRegistered(device))?;
        Ok(keys.one_time_prekeys.len() as u32)
    }

    async fn fetch_prekeys<F: FnMut(u32) -> bool + Send>(
        self: Arc<Self>,
        target: Identity,
        devices: Vec<u32>,
        mut take_one_time: F,
    ) -> StoreResult<Fetched> {
        let account = self
            .registered_account(&target)
            .await?
            .ok_or(StoreError::UnknownRecipient)?;
        let wanted: Vec<(u32, u64)> = if devices.is_empty() {
            account
                .devices
                .iter()
                .filter(|s| s.registered)
                .map(|s| (s.device_id, s.keys_generation))
                .collect()
        } else {
            devices
                .iter()
                .map(|d| {
                    account
                        .registered(*d)
                        .map(|s| (*d, s.keys_generation))
                        .ok_or(StoreError::UnknownRecipient)
                })
                .collect::<StoreResult<_>>()?
        };
        let threshold = self.limits.prekey_low_threshold;
        let mut fetched = Fetched::default();
        let mut low = Vec::new();
        for (device_id, generation) in wanted {
            // Asked once per device, whatever the retries.
            let mut allowed: Option<bool> = None;
            let (bundle, taken, went_low) = self
                .update_keys(&keys_key(&target, device_id, generation), |keys| {
                    // A registration being replaced: the device is not there to fetch from.
                    let mut keys = keys.ok_or(StoreError::UnknownRecipient)?;
                    let mut bundle = PreKeyBundle {
                        device_id,
                        registration_id: keys.registration_id,
                        identity_key: keys.identity_key.clone(),
                        signed_prekey: keys.signed_prekey.clone(),
                        one_time_prekey: None,
                    };
                    if keys.one_time_prekeys.is_empty() {
                        return Ok(Step::Keep((bundle, Taken::Exhausted, None)));
                    }
                    if !*allowed.get_or_insert_with(|| take_one_time(device_id)) {
                        return Ok(Step::Keep((bundle, Taken::Withheld, None)));
                    }
                    bundle.one_time_prekey = Some(keys.one_time_prekeys.remove(0));
                    let remaining = keys.one_time_prekeys.len() as u32;
                    let mut went_low = None;
                    if remaining < threshold && !keys.low_announced {
                        keys.low_announced = true;
                        went_low = Some(remaining);
                    }
                    Ok(Step::Write(keys, (bundle, Taken::One, went_low)))
                })
                .await?;
            match taken {
                Taken::One => fetched.handed_out += 1,
                Taken::Exhausted => fetched.exhausted += 1,
                Taken::Withheld => fetched.withheld += 1,
            }
            if let Some(count) = went_low {
                low.push((device_id, count));
            }
            fetched.bundles.push(bundle);
        }
        for (device, count) in low {
            let mailbox = MailboxId {
                identity: target,
                device,
            };
            if let Some(listener) = self.listener() {
                listener.prekeys_low(&target, device, count);
            }
            self.publish_event(EventKind::PreKeysLow, &mailbox, Vec::new(), count)
                .await;
        }
        Ok(fetched)
    }

    async fn append(self: Arc<Self>, msg: NewMessage) -> StoreResult<Appended> {
        let names = &self.shared.names;
        let subject = names.message_subject(&msg.to, &msg.sender, &msg.nonce);
        let len = msg.payload.len() as u64;
        let limits = self.limits.clone();
        // `None` until looked up; looked up only when a check could refuse the message, since a
        // retry of a stored message must get its id whatever the policy and quotas say now.
        let mut earlier: Option<Option<u64>> = None;
        let mut attempt = 0;
        let generation = loop {
            if attempt == MAX_ATTEMPTS {
                return Err(NatsError::Contended("a mailbox's usage").into());
            }
            back_off(attempt).await;
            attempt += 1;
            let (account, revision) = self
                .account(&msg.to.identity)
                .await?
                .ok_or(StoreError::UnknownRecipient)?;
            let slot = account
                .registered(msg.to.device)
                .ok_or(StoreError::UnknownRecipient)?;
            let needs_ticket = Accept::try_from(account.accept) == Ok(Accept::ContactsOnly)
                && msg.sender != msg.to.identity
                && !account.has_contact(&msg.sender);
            let over_quota = slot.messages >= limits.mailbox_max_messages as u64
                || slot.bytes + len > limits.mailbox_max_bytes as u64
                || account.stored_bytes() + len > limits.max_identity_stored_bytes as u64;
            if needs_ticket || over_quota {
                if earlier.is_none() {
                    earlier = Some(self.find_nonce(&subject).await?);
                }
                if let Some(Some(id)) = earlier {
                    return Ok(Appended::Duplicate(id));
                }
            }
            let mut account = account;
            if needs_ticket {
                let token = msg.ticket.ok_or(StoreError::Forbidden)?;
                let at = account
                    .tickets
                    .iter()
                    .position(|t| {
                        t.token == token && t.expires_at_ms > msg.received_at_ms && t.uses_left > 0
                    })
                    .ok_or(StoreError::TicketInvalid)?;
                if account.contacts.len() >= limits.max_contacts {
                    return Err(StoreError::MailboxFull("recipient's contact list is full"));
                }
                account.tickets[at].uses_left -= 1;
                if account.tickets[at].uses_left == 0 {
                    account.tickets.remove(at);
                }
                account.add_contact(&msg.sender);
            }
            let slot = account.registered(msg.to.device).expect("checked above");
            if slot.messages >= limits.mailbox_max_messages as u64 {
                return Err(StoreError::MailboxFull("message count"));
            }
            if slot.bytes + len > limits.mailbox_max_bytes as u64 {
                return Err(StoreError::MailboxFull("bytes"));
            }
            if account.stored_bytes() + len > limits.max_identity_stored_bytes as u64 {
                return Err(StoreError::QuotaExceeded {
                    kind: QuotaKind::IdentityBytes,
                    message: "the recipient's identity stores as much as it may",
                });
            }
            let slot = account.slot_mut(msg.to.device).expect("checked above");
            slot.messages += 1;
            slot.bytes += len;
            let generation = slot.mailbox_generation;
            let bytes = encode(&account);
            let key = account_key(&msg.to.identity);
            if self
                .cluster
                .accounts
                .compare_and_set(&key, bytes, revision)
                .await?
                .is_some()
            {
                break generation;
            }
        };
        let headers = message_headers(
            msg.sender_device,
            &msg.signature,
            msg.received_at_ms,
            generation,
        );
        let published = match self
            .cluster
            .js
            .publish_with_headers(subject.clone(), headers, msg.payload)
            .await
        {
            Ok(ack) => ack.await,
            Err(err) => Err(err),
        };
        match published {
            Ok(ack) => Ok(Appended::Stored(ack.sequence)),
            Err(err) => {
                let kind = err.kind();
                let text = err.to_string();
                // Nothing was stored (or we cannot know): give the reservation back unless the
                // outcome is open.
                let open = matches!(
                    kind,
                    jetstream::context::PublishErrorKind::TimedOut
                        | jetstream::context::PublishErrorKind::BrokenPipe
                );
                if !open {
                    self.release_usage(&msg.to, 1, len, 0).await;
                }
                if kind == jetstream::context::PublishErrorKind::WrongLastSequence {
                    // Stored meanwhile through another relay (or session): a duplicate.
                    return match self.find_nonce(&subject).await? {
                        Some(id) => Ok(Appended::Duplicate(id)),
                        None => Err(unavailable("a concurrent retry was removed meanwhile")),
                    };
                }
                if text.contains("maximum bytes") || text.contains("maximum messages") {
                    return Err(StoreError::QuotaExceeded {
                        kind: QuotaKind::StoredBytes,
                        message: "the relay's storage is full",
                    });
                }
                Err(unavailable(err))
            }
        }
    }

    async fn mailbox_generation(&self, mailbox: &MailboxId) -> StoreResult<u64> {
        let account = self.account(&mailbox.identity).await?.map(|(a, _)| a);
        account
            .as_ref()
            .and_then(|a| a.registered(mailbox.device))
            .map(|s| s.mailbox_generation)
            .ok_or(StoreError::NotRegistered(mailbox.device))
    }

    async fn read(
        self: Arc<Self>,
        mailbox: MailboxId,
        after: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> StoreResult<Vec<Arc<Message>>> {
        let generation = self.mailbox_generation(&mailbox).await?;
        let filter = self.shared.names.mailbox_filter(&mailbox);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut from = after.saturating_add(1);
        while out.len() < max_count {
            let Some(raw) = self.next_message(&filter, from).await? else {
                break;
            };
            from = raw.sequence + 1;
            let Some((_, gen, message)) = decode_message(
                &self.shared.names,
                raw.subject.as_str(),
                raw.sequence,
                &raw.headers,
                raw.payload,
            ) else {
                continue;
            };
            if gen != generation {
                continue;
            }
            bytes += message.payload.len();
            if bytes > max_bytes && !out.is_empty() {
                break;
            }
            out.push(Arc::new(message));
        }
        Ok(out)
    }

    async fn get(self: Arc<Self>, mailbox: MailboxId, id: u64) -> StoreResult<Arc<Message>> {
        let generation = self.mailbox_generation(&mailbox).await?;
        self.stored_message(&mailbox, generation, id)
            .await?
            .map(Arc::new)
            .ok_or(StoreError::NotFound)
    }

    async fn last_id(self: Arc<Self>, mailbox: MailboxId) -> StoreResult<u64> {
        let account = self.account(&mailbox.identity).await?.map(|(a, _)| a);
        let removed = account
            .as_ref()
            .and_then(|a| a.registered(mailbox.device))
            .map(|s| s.last_removed_id)
            .ok_or(StoreError::NotRegistered(mailbox.device))?;
        let filter = self.shared.names.mailbox_filter(&mailbox);
        let stored = self.find_nonce(&filter).await?.unwrap_or(0);
        Ok(stored.max(removed))
    }

    async fn ack(self: Arc<Self>, mailbox: MailboxId, mut ids: Vec<u64>) -> StoreResult<u32> {
        let generation = self.mailbox_generation(&mailbox).await?;
        ids.sort_unstable();
        ids.dedup();
        let (deleted, _) = self.delete_messages(&mailbox, generation, ids).await?;
        Ok(deleted.len() as u32)
    }

    async fn set_policy(self: Arc<Self>, me: Identity, accept: Accept) -> StoreResult<()> {
        self.update_account(&me, |account| {
            let mut account = account
                .filter(AccountRecord::is_registered)
                .ok_or(StoreError::IdentityNotRegistered)?;
            if account.accept == accept as i32 {
                return Ok(Step::Keep(()));
            }
            account.accept = accept as i32;
            Ok(Step::Write(account, ()))
        })
        .await
    }

    async fn change_contact(
        self: Arc<Self>,
        me: Identity,
        contact: Identity,
        add: bool,
    ) -> StoreResult<()> {
        let max_contacts = self.limits.max_contacts;
        self.update_account(&me, |account| {
            let mut account = account
                .filter(AccountRecord::is_registered)
                .ok_or(StoreError::IdentityNotRegistered)?;
            if account.has_contact(&contact) == add {
                return Ok(Step::Keep(()));
            }
            if add {
                if account.contacts.len() >= max_contacts {
                    return Err(StoreError::Limit {
                        kind: QuotaKind::Contacts,
                        message: format!("at most {max_contacts} contacts"),
                    });
                }
                account.add_contact(&contact);
            } else {
                account.remove_contact(&contact);
            }
            Ok(Step::Write(account, ()))
        })
        .await
    }

    async fn create_ticket(
        self: Arc<Self>,
        me: Identity,
        token: [u8; TICKET_LEN],
        expires_at_ms: u64,
        uses: u32,
        now_ms: u64,
    ) -> StoreResult<()> {
        let max = self.limits.max_tickets_per_identity;
        self.update_account(&me, |account| {
            let mut account = account
                .filter(AccountRecord::is_registered)
                .ok_or(StoreError::IdentityNotRegistered)?;
            account.tickets.retain(|t| t.expires_at_ms > now_ms);
            if account.tickets.len() >= max {
                return Err(StoreError::Limit {
                    kind: QuotaKind::Tickets,
                    message: format!("at most {max} unexpired tickets per identity"),
                });
            }
            account.tickets.push(TicketRecord {
                token: token.to_vec(),
                expires_at_ms,
                uses_left: uses,
            });
            Ok(Step::Write(account, ()))
        })
        .await
    }

    async fn touch(self: Arc<Self>, identity: Identity, now_ms: u64) {
        let interval = self.limits.touch_interval_ms;
        let touched = self
            .update_account(&identity, |account| match account {
                Some(mut account)
                    if account.is_registered()
                        && now_ms >= account.last_seen_ms.saturating_add(interval) =>
                {
                    account.last_seen_ms = now_ms;
                    Ok(Step::Write(account, ()))
                }
                _ => Ok(Step::Keep(())),
            })
            .await;
        if let Err(err) = touched {
            tracing::debug!(error = %err, "account use not recorded");
        }
    }

    /// Deletes the messages at the head of the stream received at or before the cutoff.
    async fn expire_messages(&self, cutoff_ms: u64) -> StoreResult<usize> {
        let all = self.shared.names.all_messages();
        let mut from = 1;
        let mut due: AHashMap<MailboxId, Vec<(u64, u64)>> = AHashMap::new();
        let mut scanned = 0;
        while scanned < SWEEP_BATCH {
            let Some(raw) = self.next_message(&all, from).await? else {
                break;
            };
            // Ids grow with the relays' clocks, so expired messages are a prefix (up to the
            // skew between relays' clocks).
            match message_received_at(&raw.headers) {
                Some(at) if at > cutoff_ms => break,
                _ => {}
            }
            scanned += 1;
            from = raw.sequence + 1;
            let Some((mailbox, _, _)) = self
                .shared
                .names
                .parse_message_subject(raw.subject.as_str())
            else {
                continue;
            };
            let generation = message_generation(&raw.headers).unwrap_or(0);
            due.entry(mailbox)
                .or_default()
                .push((raw.sequence, generation));
        }
        let mut expired = 0;
        for (mailbox, messages) in due {
            // Messages of an earlier registration of the device are not in its usage.
            let current = self
                .account(&mailbox.identity)
                .await?
                .and_then(|(a, _)| a.registered(mailbox.device).map(|s| s.mailbox_generation));
            let (counted, stale): (Vec<_>, Vec<_>) =
                messages.into_iter().partition(|(_, g)| Some(*g) == current);
            for (id, _) in stale {
                let _ = self.messages().delete_message(id).await;
            }
            if let Some(generation) = current {
                let ids = counted.into_iter().map(|(id, _)| id).collect();
                let (deleted, _) = self.delete_messages(&mailbox, generation, ids).await?;
                expired += deleted.len();
            }
        }
        Ok(expired)
    }

    /// Removes the accounts last used before the cutoff (lists the bucket: at most every
    /// [`ACCOUNT_SWEEP_EVERY_MS`] per relay).
    async fn expire_accounts(&self, cutoff_ms: u64, now_ms: u64) -> StoreResult<usize> {
        let last = self.last_account_sweep_ms.load(Ordering::Relaxed);
        if cutoff_ms == 0 || (last != 0 && now_ms < last + ACCOUNT_SWEEP_EVERY_MS) {
            return Ok(0);
        }
        self.last_account_sweep_ms.store(now_ms, Ordering::Relaxed);
        let keys = self.cluster.accounts.keys("a.").await?;
        let mut idle = Vec::new();
        for key in keys {
            let Some(hex_id) = key.strip_prefix("a.") else {
                continue;
            };
            let mut identity = [0u8; botd_protocol::keys::PUBLIC_KEY_LEN];
            if hex::decode_to_slice(hex_id, &mut identity).is_ok() {
                idle.push(identity);
            }
        }
        let mut removed = 0;
        for identity in idle {
            let closed = self
                .update_account(&identity, |account| match account {
                    Some(account) if account.last_seen_ms < cutoff_ms => {
                        let devices: Vec<(u32, u64)> = account
                            .devices
                            .iter()
                            .filter(|s| s.registered)
                            .map(|s| (s.device_id, s.keys_generation))
                            .collect();
                        Ok(Step::Write(AccountRecord::default(), Some(devices)))
                    }
                    _ => Ok(Step::Keep(None)),
                })
                .await?;
            let Some(devices) = closed else { continue };
            removed += 1;
            let _ = self.count_identities(-1).await;
            for (device, generation) in devices {
                let _ = self
                    .cluster
                    .keys
                    .purge(&keys_key(&identity, device, generation))
                    .await;
                self.close_mailbox(&MailboxId { identity, device }).await;
            }
        }
        Ok(removed)
    }

    async fn expire(
        self: Arc<Self>,
        message_cutoff_ms: u64,
        account_cutoff_ms: u64,
        now_ms: u64,
    ) -> StoreResult<Expiry> {
        let expired_messages = self.expire_messages(message_cutoff_ms).await?;
        let removed_accounts = self.expire_accounts(account_cutoff_ms, now_ms).await?;
        self.refresh_stats().await;
        let stats = *self.stats.lock();
        Ok(Expiry {
            expired_messages,
            removed_accounts,
            bytes_trimmed: 0,
            messages_left: stats.messages,
            payload_bytes_left: stats.payload_bytes,
        })
    }
}

/// What a fetch did with one device's one-time prekeys.
enum Taken {
    One,
    Exhausted,
    Withheld,
}

impl Store for NatsStore {
    fn max_pipelined(&self) -> usize {
        1
    }

    fn set_listener(&self, listener: Arc<dyn Listener>) {
        let _ = self.inner.shared.listener.set(listener);
    }

    fn congested(&self) -> bool {
        false
    }

    fn until_uncongested(&self) -> impl Future<Output = ()> + Send + use<> {
        std::future::ready(())
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
            runtime.spawn(self.inner.clone().touch(*identity, now_ms));
        }
    }

    fn register(
        &self,
        me: &Identity,
        registration: Registration,
        now_ms: u64,
    ) -> impl Future<Output = StoreResult<u32>> + Send + use<> {
        self.inner.clone().register(*me, registration, now_ms)
    }

    fn unregister(
        &self,
        me: &Identity,
        device: u32,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<> {
        self.inner.clone().unregister(*me, device)
    }

    fn upload_prekeys(
        &self,
        me: &Identity,
        device: u32,
        signed_prekey: Option<SignedPreKey>,
        one_time_prekeys: Vec<PreKey>,
    ) -> impl Future<Output = StoreResult<u32>> + Send + use<> {
        self.inner
            .clone()
            .upload_prekeys(*me, device, signed_prekey, one_time_prekeys)
    }

    fn prekey_count(
        &self,
        me: &Identity,
        device: u32,
    ) -> impl Future<Output = StoreResult<u32>> + Send + use<> {
        self.inner.clone().prekey_count(*me, device)
    }

    fn fetch_prekeys<F: FnMut(u32) -> bool + Send + 'static>(
        &self,
        target: &Identity,
        devices: Vec<u32>,
        take_one_time: F,
    ) -> impl Future<Output = StoreResult<Fetched>> + Send + use<F> {
        self.inner
            .clone()
            .fetch_prekeys(*target, devices, take_one_time)
    }

    fn is_registered(
        &self,
        identity: &Identity,
        device: u32,
    ) -> impl Future<Output = StoreResult<bool>> + Send + use<> {
        let inner = self.inner.clone();
        let identity = *identity;
        async move {
            Ok(inner
                .registered_account(&identity)
                .await?
                .is_some_and(|a| a.registered(device).is_some()))
        }
    }

    fn append(
        &self,
        message: NewMessage,
    ) -> impl Future<Output = StoreResult<Appended>> + Send + use<> {
        self.inner.clone().append(message)
    }

    fn read(
        &self,
        mailbox: MailboxId,
        after: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> impl Future<Output = StoreResult<Vec<Arc<Message>>>> + Send + use<> {
        self.inner
            .clone()
            .read(mailbox, after, max_count, max_bytes)
    }

    fn get(
        &self,
        mailbox: MailboxId,
        id: u64,
    ) -> impl Future<Output = StoreResult<Arc<Message>>> + Send + use<> {
        self.inner.clone().get(mailbox, id)
    }

    fn last_id(&self, mailbox: MailboxId) -> impl Future<Output = StoreResult<u64>> + Send + use<> {
        self.inner.clone().last_id(mailbox)
    }

    fn ack(
        &self,
        mailbox: MailboxId,
        ids: Vec<u64>,
    ) -> impl Future<Output = StoreResult<u32>> + Send + use<> {
        self.inner.clone().ack(mailbox, ids)
    }

    fn set_policy(
        &self,
        me: &Identity,
        accept: Accept,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<> {
        self.inner.clone().set_policy(*me, accept)
    }

    fn add_contact(
        &self,
        me: &Identity,
        contact: Identity,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<> {
        self.inner.clone().change_contact(*me, contact, true)
    }

    fn remove_contact(
        &self,
        me: &Identity,
        contact: Identity,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<> {
        self.inner.clone().change_contact(*me, contact, false)
    }

    fn create_ticket(
        &self,
        me: &Identity,
        token: [u8; TICKET_LEN],
        expires_at_ms: u64,
        uses: u32,
        now_ms: u64,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<> {
        self.inner
            .clone()
            .create_ticket(*me, token, expires_at_ms, uses, now_ms)
    }

    fn expire(
        &self,
        message_cutoff_ms: u64,
        account_cutoff_ms: u64,
    ) -> impl Future<Output = StoreResult<Expiry>> + Send + use<> {
        let now_ms = crate::clock::unix_millis();
        self.inner
            .clone()
            .expire(message_cutoff_ms, account_cutoff_ms, now_ms)
    }

    fn stats(&self) -> StoreStats {
        *self.inner.stats.lock()
    }
}
