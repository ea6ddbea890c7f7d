//! A store with one planted defect: the embedded store (in memory) behind a wrapper that breaks
//! one rule of PROTOCOL.md where a real store would (acks, idempotency, ids, expiry, events).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use botd_protocol::proto::{Accept, PreKey, SignedPreKey};
use botd_relay::config::Config;
use botd_relay::store::embedded::EmbeddedStore;
use botd_relay::store::{
    Appended, Expiry, Fetched, Identity, Listener, MailboxId, Message, NewMessage, QuotaKind,
    Registration, Store, StoreError, StoreResult, StoreStats, StoreTotals,
};
use parking_lot::Mutex;

/// Devices a wrapper looks through when it reaches into other mailboxes of an identity.
const DEVICES: std::ops::RangeInclusive<u32> = 1..=20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFault {
    None,
    /// An ack on one device deletes the same ids in the identity's other mailboxes too.
    AckAcrossDevices,
    /// Records every message as sent from device 1.
    SenderDeviceOne,
    /// Takes a message for a resend when another sender used its nonce in the mailbox.
    DuplicateByNonceOnly,
    /// Keys resends by sender device as well: the same nonce from another device is new.
    DuplicatePerSenderDevice,
    /// Takes a message for a resend when its nonce is stored in another mailbox of the
    /// recipient identity.
    DuplicateAcrossDevices,
    /// Stores tickets without their expiry.
    TicketsNeverExpire,
    /// Answers a full mailbox with `QUOTA_EXCEEDED`.
    MailboxFullAsQuota,
    /// Answers the relay-wide and per-identity caps with `MAILBOX_FULL`.
    QuotaAsMailboxFull,
    /// Answers a full contact list on a ticket use with `QUOTA_EXCEEDED`.
    ContactsFullAsQuota,
    /// `last_id` of a mailbox is the highest of the identity's mailboxes.
    LastIdOfIdentity,
    /// `get` finds a message in another mailbox of the identity.
    GetAcrossDevices,
    /// `read` (subscriptions) returns the identity's other mailboxes' messages too.
    ReadAcrossDevices,
    /// The sweep never removes messages.
    MessagesNeverExpire,
    /// The sweep never removes accounts.
    AccountsNeverExpire,
    /// Records 0 as every message's time of receipt.
    ReceivedAtZero,
    /// Never announces PreKeysLow.
    NoPrekeysLow,
    /// Never announces stored messages (no live delivery).
    NoLiveDelivery,
    /// Never announces removed messages (acks free no place in the window).
    NoRemovedEvents,
    /// Deletes messages as they are read for a subscription (at most once).
    DeletesOnPush,
    /// Goes past this limit of an account, or the relay's cap of identities.
    IgnoresLimit(QuotaKind),
    /// Records the recipient as the sender of every message.
    SenderIsRecipient,
    /// Reads a mailbox newest first.
    ReadsNewestFirst,
    /// Reads a mailbox from its start, whatever `after_id`.
    ReadIgnoresAfter,
    /// Remembers a nonce after its message left: a later message with it is a "resend".
    DuplicateAfterAck,
    /// Takes a message for a resend when its sender used the nonce towards another recipient.
    DuplicateAcrossRecipients,
    /// Stores every ticket with one use.
    TicketUsesIgnored,
    /// Hands out one-time prekeys whatever the per-device rate says.
    IgnoresPrekeyRate,
    /// Takes the listed devices' keys one device at a time, before finding one unknown.
    FetchTakesBeforeChecking,
    /// Announces PreKeysLow after every fetch that takes a key, whatever is left.
    PrekeysLowEveryFetch,
    /// Does not record an account's use.
    IgnoresTouch,
}

/// Nonces of stored messages, as the wrapper's own idempotency keys see them.
type Seen = Arc<Mutex<HashMap<(Identity, [u8; 33], [u8; 8]), (MailboxId, u64)>>>;

pub struct FaultyStore {
    inner: Arc<EmbeddedStore>,
    fault: StoreFault,
    seen: Seen,
    listener: Arc<Mutex<Option<Arc<dyn Listener>>>>,
}

impl FaultyStore {
    pub fn new(config: &Config, fault: StoreFault) -> Self {
        Self {
            inner: Arc::new(EmbeddedStore::in_memory(config)),
            fault,
            seen: Arc::default(),
            listener: Arc::default(),
        }
    }
}

/// Passes events on, but those the fault drops.
struct Events {
    inner: Arc<dyn Listener>,
    fault: StoreFault,
}

impl Listener for Events {
    fn stored(&self, mailbox: &MailboxId, message: &Arc<Message>, prev_id: Option<u64>) {
        if self.fault != StoreFault::NoLiveDelivery {
            self.inner.stored(mailbox, message, prev_id);
        }
    }
    fn removed(&self, mailbox: &MailboxId, ids: &[u64]) {
        if self.fault != StoreFault::NoRemovedEvents {
            self.inner.removed(mailbox, ids);
        }
    }
    fn closed(&self, mailbox: &MailboxId) {
        self.inner.closed(mailbox);
    }
    fn prekeys_low(&self, identity: &Identity, device: u32, count: u32) {
        if self.fault != StoreFault::NoPrekeysLow {
            self.inner.prekeys_low(identity, device, count);
        }
    }
    fn resync(&self, mailbox: &MailboxId) {
        self.inner.resync(mailbox);
    }
}

/// `done`, but with the limit the fault ignores answered as a success (`value`).
async fn ignoring<T>(
    fault: StoreFault,
    value: T,
    done: impl Future<Output = StoreResult<T>>,
) -> StoreResult<T> {
    match (fault, done.await) {
        (StoreFault::IgnoresLimit(kind), Err(StoreError::Limit { kind: k, .. }))
        | (StoreFault::IgnoresLimit(kind), Err(StoreError::QuotaExceeded { kind: k, .. }))
            if k == kind =>
        {
            Ok(value)
        }
        (_, other) => other,
    }
}

fn others(mailbox: MailboxId) -> impl Iterator<Item = MailboxId> {
    DEVICES
        .filter(move |d| *d != mailbox.device)
        .map(move |device| MailboxId {
            identity: mailbox.identity,
            device,
        })
}

impl Store for FaultyStore {
    fn max_pipelined(&self) -> usize {
        self.inner.max_pipelined()
    }

    fn set_listener(&self, listener: Arc<dyn Listener>) {
        *self.listener.lock() = Some(listener.clone());
        self.inner.set_listener(Arc::new(Events {
            inner: listener,
            fault: self.fault,
        }));
    }

    fn congested(&self) -> bool {
        self.inner.congested()
    }

    fn until_uncongested(&self) -> impl Future<Output = ()> + Send + use<> {
        self.inner.until_uncongested()
    }

    fn flush(&self) {
        self.inner.flush();
    }

    fn touch(&self, identity: &Identity, now_ms: u64) {
        if self.fault != StoreFault::IgnoresTouch {
            self.inner.touch(identity, now_ms);
        }
    }

    fn register(
        &self,
        me: &Identity,
        registration: Registration,
        now_ms: u64,
    ) -> impl Future<Output = StoreResult<u32>> + Send + use<> {
        let asked = registration.one_time_prekeys.len() as u32;
        ignoring(
            self.fault,
            asked,
            self.inner.register(me, registration, now_ms),
        )
    }

    fn unregister(
        &self,
        me: &Identity,
        device: u32,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<> {
        self.inner.unregister(me, device)
    }

    fn upload_prekeys(
        &self,
        me: &Identity,
        device: u32,
        signed_prekey: Option<SignedPreKey>,
        one_time_prekeys: Vec<PreKey>,
    ) -> impl Future<Output = StoreResult<u32>> + Send + use<> {
        let asked = one_time_prekeys.len() as u32;
        let uploaded = self
            .inner
            .upload_prekeys(me, device, signed_prekey, one_time_prekeys);
        ignoring(self.fault, asked, uploaded)
    }

    fn prekey_count(
        &self,
        me: &Identity,
        device: u32,
    ) -> impl Future<Output = StoreResult<u32>> + Send + use<> {
        self.inner.prekey_count(me, device)
    }

    fn fetch_prekeys<F: FnMut(u32) -> bool + Send + 'static>(
        &self,
        target: &Identity,
        devices: Vec<u32>,
        take_one_time: F,
    ) -> impl Future<Output = StoreResult<Fetched>> + Send + use<F> {
        let (inner, fault, listener, target) = (
            self.inner.clone(),
            self.fault,
            self.listener.lock().clone(),
            *target,
        );
        let take = Arc::new(Mutex::new(take_one_time));
        let taker = move || {
            let take = take.clone();
            move |device: u32| fault == StoreFault::IgnoresPrekeyRate || (take.lock())(device)
        };
        async move {
            if fault == StoreFault::FetchTakesBeforeChecking && devices.len() > 1 {
                let mut fetched = Fetched::default();
                for device in devices {
                    let one = inner.fetch_prekeys(&target, vec![device], taker()).await?;
                    fetched.bundles.extend(one.bundles);
                    fetched.handed_out += one.handed_out;
                }
                return Ok(fetched);
            }
            let fetched = inner.fetch_prekeys(&target, devices, taker()).await?;
            if let (StoreFault::PrekeysLowEveryFetch, Some(listener)) = (fault, listener) {
                for bundle in fetched
                    .bundles
                    .iter()
                    .filter(|b| b.one_time_prekey.is_some())
                {
                    let left = inner
                        .prekey_count(&target, bundle.device_id)
                        .await
                        .unwrap_or(0);
                    listener.prekeys_low(&target, bundle.device_id, left);
                }
            }
            Ok(fetched)
        }
    }

    fn append(
        &self,
        mut message: NewMessage,
    ) -> impl Future<Output = StoreResult<Appended>> + Send + use<> {
        let (inner, seen, fault) = (self.inner.clone(), self.seen.clone(), self.fault);
        match fault {
            StoreFault::SenderDeviceOne => message.sender_device = 1,
            StoreFault::ReceivedAtZero => message.received_at_ms = 0,
            StoreFault::DuplicatePerSenderDevice => message.nonce[0] ^= message.sender_device as u8,
            StoreFault::SenderIsRecipient => message.sender = message.to.identity,
            _ => {}
        }
        // The wrapper's own idempotency key: the mailbox, or the recipient identity, and the
        // sender, or nobody.
        let key = match fault {
            StoreFault::DuplicateByNonceOnly => Some((message.to.identity, [0; 33], message.nonce)),
            StoreFault::DuplicateAcrossDevices => {
                Some((message.to.identity, message.sender, message.nonce))
            }
            StoreFault::DuplicateAfterAck => {
                Some((message.to.identity, message.sender, message.nonce))
            }
            StoreFault::DuplicateAcrossRecipients => Some(([0; 33], message.sender, message.nonce)),
            _ => None,
        };
        let known = key.and_then(|k| seen.lock().get(&k).copied());
        let to = message.to;
        async move {
            if let Some((mailbox, id)) = known {
                let same_mailbox = mailbox == to;
                if fault == StoreFault::DuplicateAfterAck && same_mailbox {
                    return Ok(Appended::Duplicate(id));
                }
                let anywhere = matches!(
                    fault,
                    StoreFault::DuplicateAcrossDevices | StoreFault::DuplicateAcrossRecipients
                );
                if (same_mailbox || anywhere) && inner.get(mailbox, id).await.is_ok() {
                    return Ok(Appended::Duplicate(id));
                }
            }
            let appended = inner.append(message).await.map_err(|e| match (fault, e) {
                (StoreFault::MailboxFullAsQuota, StoreError::MailboxFull(what))
                    if !what.contains("contact") =>
                {
                    StoreError::QuotaExceeded {
                        kind: QuotaKind::MailboxFull,
                        message: "quota exceeded",
                    }
                }
                (StoreFault::ContactsFullAsQuota, StoreError::MailboxFull(what))
                    if what.contains("contact") =>
                {
                    StoreError::QuotaExceeded {
                        kind: QuotaKind::Contacts,
                        message: "quota exceeded",
                    }
                }
                (StoreFault::QuotaAsMailboxFull, StoreError::QuotaExceeded { .. }) => {
                    StoreError::MailboxFull("quota")
                }
                (_, e) => e,
            })?;
            if let (Some(k), Appended::Stored(id)) = (key, appended) {
                seen.lock().insert(k, (to, id));
            }
            Ok(appended)
        }
    }

    fn read(
        &self,
        mailbox: MailboxId,
        after: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> impl Future<Output = StoreResult<Vec<Arc<Message>>>> + Send + use<> {
        let after = if self.fault == StoreFault::ReadIgnoresAfter {
            0
        } else {
            after
        };
        let own = self.inner.read(mailbox, after, max_count, max_bytes);
        let more: Vec<_> = if self.fault == StoreFault::ReadAcrossDevices {
            others(mailbox)
                .map(|m| self.inner.read(m, after, max_count, max_bytes))
                .collect()
        } else {
            Vec::new()
        };
        let (inner, fault) = (self.inner.clone(), self.fault);
        async move {
            let mut messages = own.await?;
            for other in more {
                messages.extend(other.await.unwrap_or_default());
            }
            messages.sort_by_key(|m| m.id);
            messages.dedup_by_key(|m| m.id);
            messages.truncate(max_count);
            if fault == StoreFault::ReadsNewestFirst {
                messages.reverse();
            }
            if fault == StoreFault::DeletesOnPush && !messages.is_empty() {
                let _ = inner
                    .ack(mailbox, messages.iter().map(|m| m.id).collect())
                    .await;
            }
            Ok(messages)
        }
    }

    fn get(
        &self,
        mailbox: MailboxId,
        id: u64,
    ) -> impl Future<Output = StoreResult<Arc<Message>>> + Send + use<> {
        let own = self.inner.get(mailbox, id);
        let more: Vec<_> = if self.fault == StoreFault::GetAcrossDevices {
            others(mailbox).map(|m| self.inner.get(m, id)).collect()
        } else {
            Vec::new()
        };
        async move {
            let first = own.await;
            if first.is_ok() {
                return first;
            }
            for other in more {
                if let Ok(found) = other.await {
                    return Ok(found);
                }
            }
            first
        }
    }

    fn last_id(&self, mailbox: MailboxId) -> impl Future<Output = StoreResult<u64>> + Send + use<> {
        let own = self.inner.last_id(mailbox);
        let more: Vec<_> = if self.fault == StoreFault::LastIdOfIdentity {
            others(mailbox).map(|m| self.inner.last_id(m)).collect()
        } else {
            Vec::new()
        };
        async move {
            let mut last = own.await?;
            for other in more {
                last = last.max(other.await.unwrap_or(0));
            }
            Ok(last)
        }
    }

    fn ack(
        &self,
        mailbox: MailboxId,
        ids: Vec<u64>,
    ) -> impl Future<Output = StoreResult<u32>> + Send + use<> {
        let own = self.inner.ack(mailbox, ids.clone());
        let more: Vec<_> = if self.fault == StoreFault::AckAcrossDevices {
            others(mailbox)
                .map(|m| self.inner.ack(m, ids.clone()))
                .collect()
        } else {
            Vec::new()
        };
        async move {
            let deleted = own.await?;
            for other in more {
                let _ = other.await;
            }
            Ok(deleted)
        }
    }

    fn set_policy(
        &self,
        me: &Identity,
        accept: Accept,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<> {
        self.inner.set_policy(me, accept)
    }

    fn add_contact(
        &self,
        me: &Identity,
        contact: Identity,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<> {
        ignoring(self.fault, (), self.inner.add_contact(me, contact))
    }

    fn remove_contact(
        &self,
        me: &Identity,
        contact: Identity,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<> {
        self.inner.remove_contact(me, contact)
    }

    fn create_ticket(
        &self,
        me: &Identity,
        token: [u8; 16],
        expires_at_ms: u64,
        uses: u32,
        now_ms: u64,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<> {
        let expires_at_ms = if self.fault == StoreFault::TicketsNeverExpire {
            u64::MAX / 4
        } else {
            expires_at_ms
        };
        let uses = if self.fault == StoreFault::TicketUsesIgnored {
            1
        } else {
            uses
        };
        let created = self
            .inner
            .create_ticket(me, token, expires_at_ms, uses, now_ms);
        ignoring(self.fault, (), created)
    }

    fn expire(
        &self,
        message_cutoff_ms: u64,
        account_cutoff_ms: u64,
    ) -> impl Future<Output = StoreResult<Expiry>> + Send + use<> {
        let (messages, accounts) = match self.fault {
            StoreFault::MessagesNeverExpire => (0, account_cutoff_ms),
            StoreFault::AccountsNeverExpire => (message_cutoff_ms, 0),
            _ => (message_cutoff_ms, account_cutoff_ms),
        };
        self.inner.expire(messages, accounts)
    }

    fn stats(&self) -> StoreStats {
        self.inner.stats()
    }

    fn totals(&self) -> StoreTotals {
        self.inner.totals()
    }
}
