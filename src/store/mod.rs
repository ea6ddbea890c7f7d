//! The storage layer: everything the relay application needs from a store, as the [`Store`]
//! trait, and its backends: [`embedded`] (memory, a journal and snapshots on local disk; the
//! default) and `nats` (NATS JetStream, for several relays on one cluster).
//!
//! The application validates requests on their own (lengths, ranges) before it calls a store; a
//! store checks what needs its state (registration, quotas, uniqueness, policy and tickets)
//! atomically with the change it makes, and reports the first check that fails.
//!
//! **Ordering and durability.** Every operation returns a future that resolves once its outcome
//! is final and, for changes, durable (or failed). Calls made one after another by one task take
//! effect in call order when the store reports `max_pipelined() > 1`: the embedded store applies
//! each change in memory before the call returns, so a session may have many requests waiting
//! for the disk at once. A store that cannot promise that reports 1, and the application then
//! keeps one request per session in flight.
//!
//! **Reads see durable data only.** A message becomes visible to `read`, `get` and `last_id`, and
//! is announced to the [`Listener`], once its record is durable, so a message id a recipient has
//! seen is never given to another message after a crash.

pub mod embedded;
#[cfg(feature = "jetstream")]
pub mod nats;
pub mod proto;
pub mod rules;

pub use rules::{AccountLimits, Admission, RecipientView, TicketOffer};

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

use botd_protocol::keys::{PUBLIC_KEY_LEN, SIGNATURE_LEN};
use botd_protocol::proto::{Accept, PreKey, PreKeyBundle, SignedPreKey};

/// An identity: the 33-byte compressed public key a session authenticated with.
pub type Identity = [u8; PUBLIC_KEY_LEN];
pub use botd_protocol::message::{Message, HASH_LEN, NONCE_LEN, TICKET_LEN};

/// Which limit refused a change: the `kind` label of `quota_hits_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaKind {
    Devices,
    DeviceIds,
    Identities,
    Prekeys,
    PrekeyIds,
    IdentityBytes,
    StoredBytes,
    Contacts,
    Tickets,
    MailboxFull,
    PayloadTooLarge,
}

impl QuotaKind {
    pub const ALL: [QuotaKind; 11] = [
        QuotaKind::Devices,
        QuotaKind::DeviceIds,
        QuotaKind::Identities,
        QuotaKind::Prekeys,
        QuotaKind::PrekeyIds,
        QuotaKind::IdentityBytes,
        QuotaKind::StoredBytes,
        QuotaKind::Contacts,
        QuotaKind::Tickets,
        QuotaKind::MailboxFull,
        QuotaKind::PayloadTooLarge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            QuotaKind::Devices => "devices",
            QuotaKind::DeviceIds => "device_ids",
            QuotaKind::Identities => "identities",
            QuotaKind::Prekeys => "prekeys",
            QuotaKind::PrekeyIds => "prekey_ids",
            QuotaKind::IdentityBytes => "identity_bytes",
            QuotaKind::StoredBytes => "stored_bytes",
            QuotaKind::Contacts => "contacts",
            QuotaKind::Tickets => "tickets",
            QuotaKind::MailboxFull => "mailbox_full",
            QuotaKind::PayloadTooLarge => "payload_too_large",
        }
    }
}

/// One device's mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MailboxId {
    pub identity: Identity,
    pub device: u32,
}

/// A message to store (already validated: lengths and `payload_hash`).
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub to: MailboxId,
    pub sender: Identity,
    pub sender_device: u32,
    pub nonce: [u8; NONCE_LEN],
    pub payload_hash: [u8; HASH_LEN],
    pub signature: [u8; SIGNATURE_LEN],
    pub payload: Bytes,
    /// A ticket of the recipient, for first contact under `ACCEPT_CONTACTS_ONLY`.
    pub ticket: Option<[u8; TICKET_LEN]>,
    pub received_at_ms: u64,
    /// Why the sender's signature does not verify, when the relay checks signatures
    /// (`verify_message_signatures`) and it does not: refused after the sender's device is
    /// checked and before anything of the recipient's.
    pub bad_signature: Option<String>,
}

/// What `append` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored under this id.
    Stored(u64),
    /// A message of the same sender with the same nonce is stored under this id.
    Duplicate(u64),
}

/// A device registration (already validated: lengths, counts, distinct ids).
#[derive(Debug, Clone)]
pub struct Registration {
    pub device: u32,
    pub registration_id: u32,
    pub identity_key: Bytes,
    pub signed_prekey: SignedPreKey,
    pub one_time_prekeys: Vec<PreKey>,
}

/// What a prekey fetch handed out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fetched {
    /// One bundle per device, in increasing device-id order.
    pub bundles: Vec<PreKeyBundle>,
    /// One-time prekeys handed out (each removed for good).
    pub handed_out: usize,
    /// Bundles without a one-time prekey because the device had none left.
    pub exhausted: usize,
    /// Bundles without a one-time prekey because the caller withheld it (rate limit).
    pub withheld: usize,
}

/// What a maintenance sweep removed and what it left.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    pub expired_messages: usize,
    pub removed_accounts: usize,
    /// Growth room given back by idle mailboxes.
    pub bytes_trimmed: usize,
    pub messages_left: usize,
    pub payload_bytes_left: usize,
}

/// Counts for metrics and `check`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    pub identities: usize,
    pub devices: usize,
    pub messages: usize,
    pub payload_bytes: usize,
    pub one_time_prekeys: usize,
}

/// Running totals for gauges, cheap enough to read every second.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StoreTotals {
    pub identities: usize,
    pub messages: usize,
    pub payload_bytes: u64,
    /// Changes recorded but not yet handed to the disk (0 for a store without a journal).
    pub journal_pending_bytes: usize,
}

/// Why a store operation failed. Each maps to one wire error code (`relay::RelayError`).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("device {0} is not registered for this identity")]
    NotRegistered(u32),
    #[error("this identity has no registered device")]
    IdentityNotRegistered,
    #[error("no such identity or device")]
    UnknownRecipient,
    #[error("no such message")]
    NotFound,
    #[error("mailbox is full ({0})")]
    MailboxFull(&'static str),
    #[error("recipient accepts contacts only; a ticket is required")]
    Forbidden,
    #[error("ticket is unknown, used up or expired")]
    TicketInvalid,
    #[error("sender_signature: {0}")]
    BadSignature(String),
    /// A limit of the request or of the account (devices, prekeys, contacts, tickets);
    /// `kind` names it in metrics.
    #[error("{message}")]
    Limit { kind: QuotaKind, message: String },
    /// A relay-wide storage cap (identities, stored bytes, bytes per identity).
    #[error("{message}")]
    QuotaExceeded {
        kind: QuotaKind,
        message: &'static str,
    },
    /// The change could not be made durable, or the store cannot be reached; the outcome of
    /// a change may be either.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// Receives what happens to mailboxes, for live delivery. Called after the fact and never
/// with a store lock held, so a listener may call back into the store.
pub trait Listener: Send + Sync + 'static {
    /// `message` is stored and durable. Per mailbox, calls come in id order. `prev_id`, when
    /// the store knows one, is an id below the message's such that no message with an id in
    /// between is stored (the id assigned just before it, or the previous message still
    /// stored; 0 when there is none): a listener whose cursor is at least `prev_id` has missed
    /// nothing.
    fn stored(&self, mailbox: &MailboxId, message: &Arc<Message>, prev_id: Option<u64>);
    /// Messages left the mailbox (acknowledged from any session, or expired).
    fn removed(&self, mailbox: &MailboxId, ids: &[u64]);
    /// The device was unregistered (or its account removed): its mailbox is gone.
    fn closed(&self, mailbox: &MailboxId);
    /// A fetch left the device with fewer one-time prekeys than the threshold (once per
    /// crossing: the next call for the device comes after an upload lifted it again).
    fn prekeys_low(&self, identity: &Identity, device: u32, count: u32);
    /// Events of the mailbox may have been missed (a store that hears them over the network
    /// reconnected): what the listener keeps of it should be read again from the store.
    fn resync(&self, _mailbox: &MailboxId) {}
}

/// The outcome of a store operation, once final (and durable, for a change).
pub type StoreResult<T> = Result<T, StoreError>;

/// What the relay application needs from storage. See the module documentation for the rules
/// on ordering and durability every backend keeps.
pub trait Store: Send + Sync + 'static {
    /// How many operations of one session may be outstanding at once (see module docs).
    fn max_pipelined(&self) -> usize;

    /// Where mailbox events go; set once, before the relay serves.
    fn set_listener(&self, listener: Arc<dyn Listener>);

    /// True while changes should wait: the store is behind (e.g. its journal's buffer is full).
    fn congested(&self) -> bool;

    /// Resolves once the store is no longer congested.
    fn until_uncongested(&self) -> impl Future<Output = ()> + Send + use<Self>;

    /// The caller has started all the operations it has for now and will wait for them: a
    /// store that batches its writes (group commit) should write now.
    fn flush(&self) {}

    /// The listener wants the events of `mailbox` (it delivers from it), from the moment the
    /// future resolves on. A store that announces everything anyway has nothing to do; one
    /// that hears events over the network subscribes to what is asked for only.
    fn watch(
        &self,
        _mailbox: MailboxId,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<Self> {
        std::future::ready(Ok(()))
    }

    /// The listener no longer wants the events of `mailbox` (once per `watch`).
    fn unwatch(&self, _mailbox: &MailboxId) {}

    /// Marks `identity` as in use at `now_ms` (idle accounts expire after `account_ttl`).
    fn touch(&self, identity: &Identity, now_ms: u64);

    /// Registers or re-registers a device; returns the number of one-time prekeys stored.
    fn register(
        &self,
        me: &Identity,
        registration: Registration,
        now_ms: u64,
    ) -> impl Future<Output = StoreResult<u32>> + Send + use<Self>;

    /// Unregisters a device: its keys and mailbox go; its id counter stays. When it was the
    /// identity's last device, the account goes too.
    fn unregister(
        &self,
        me: &Identity,
        device: u32,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<Self>;

    /// Replaces the signed prekey (if given) and appends one-time prekeys; returns the count
    /// stored after the upload.
    fn upload_prekeys(
        &self,
        me: &Identity,
        device: u32,
        signed_prekey: Option<SignedPreKey>,
        one_time_prekeys: Vec<PreKey>,
    ) -> impl Future<Output = StoreResult<u32>> + Send + use<Self>;

    /// One-time prekeys a device has stored.
    fn prekey_count(
        &self,
        me: &Identity,
        device: u32,
    ) -> impl Future<Output = StoreResult<u32>> + Send + use<Self>;

    /// One bundle per device of `target` (`devices` sorted and distinct; empty: all
    /// registered devices). A one-time prekey is popped for each device for which
    /// `take_one_time(device)` allows it (asked only for devices that have one left); each key
    /// is handed out at most once, ever.
    fn fetch_prekeys<F: FnMut(u32) -> bool + Send + 'static>(
        &self,
        target: &Identity,
        devices: Vec<u32>,
        take_one_time: F,
    ) -> impl Future<Output = StoreResult<Fetched>> + Send + use<Self, F>;

    /// Stores a message: checks the sender's device (`NotRegistered`), the signature verdict
    /// (`BadSignature`), the recipient device, idempotency by (sender, nonce) while the first
    /// message is stored, the recipient's policy and tickets, and the quotas, in that order,
    /// as one operation; assigns the next id of the mailbox. Called when the request arrives,
    /// so a session's sends take effect in their order.
    fn append(
        &self,
        message: NewMessage,
    ) -> impl Future<Output = StoreResult<Appended>> + Send + use<Self>;

    /// Durable stored messages of a registered device with ids above `after`, in id order: at
    /// most `max_count`, and no more payload bytes than `max_bytes` except that the first is
    /// always included.
    fn read(
        &self,
        mailbox: MailboxId,
        after: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> impl Future<Output = StoreResult<Vec<Arc<Message>>>> + Send + use<Self>;

    /// One durable stored message (`NotFound` otherwise).
    fn get(
        &self,
        mailbox: MailboxId,
        id: u64,
    ) -> impl Future<Output = StoreResult<Arc<Message>>> + Send + use<Self>;

    /// The highest id assigned in the mailbox to a durable message (0 if none), whether or not
    /// that message is still stored.
    fn last_id(
        &self,
        mailbox: MailboxId,
    ) -> impl Future<Output = StoreResult<u64>> + Send + use<Self>;

    /// Deletes the listed messages that are stored; returns how many distinct ones it deleted.
    fn ack(
        &self,
        mailbox: MailboxId,
        ids: Vec<u64>,
    ) -> impl Future<Output = StoreResult<u32>> + Send + use<Self>;

    fn set_policy(
        &self,
        me: &Identity,
        accept: Accept,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<Self>;

    fn add_contact(
        &self,
        me: &Identity,
        contact: Identity,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<Self>;

    fn remove_contact(
        &self,
        me: &Identity,
        contact: Identity,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<Self>;

    /// Stores a ticket the application generated.
    fn create_ticket(
        &self,
        me: &Identity,
        token: [u8; TICKET_LEN],
        expires_at_ms: u64,
        uses: u32,
        now_ms: u64,
    ) -> impl Future<Output = StoreResult<()>> + Send + use<Self>;

    /// Removes messages received at or before `message_cutoff_ms`, and accounts last used
    /// before `account_cutoff_ms`; counts what stays.
    fn expire(
        &self,
        message_cutoff_ms: u64,
        account_cutoff_ms: u64,
    ) -> impl Future<Output = StoreResult<Expiry>> + Send + use<Self>;

    fn stats(&self) -> StoreStats;

    /// Identities, messages and payload bytes now, for gauges; without walking the store where
    /// the backend keeps running counts.
    fn totals(&self) -> StoreTotals {
        let stats = self.stats();
        StoreTotals {
            identities: stats.identities,
            messages: stats.messages,
            payload_bytes: stats.payload_bytes as u64,
            journal_pending_bytes: 0,
        }
    }
}
