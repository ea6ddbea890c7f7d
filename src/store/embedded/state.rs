//! The embedded store's state in memory: accounts (identities with their devices, prekeys,
//! policy, contacts, tickets) and per-device mailboxes, split into shards by identity so that
//! every operation locks one shard (a send: the sender's briefly, then the recipient's),
//! briefly.
//!
//! Every change is an [`Event`] applied by [`apply`], the one function that mutates durable
//! state, both live and when a journal is replayed; a live change is recorded in the journal
//! under the same lock, so a shard's events reach the journal in the order they were applied.
//!
//! **Durability of messages.** A message is in its mailbox as soon as it is applied (a retry
//! finds it, an ack may remove it), but reads return it only once its record is durable: each
//! mailbox keeps the (id, lsn) of its messages not yet confirmed durable, and since ids and
//! lsns both grow in the order a shard applies changes, what is durable is a prefix of ids.
//! Newly durable messages are announced to the listener by [`State::release`], in id order
//! per shard.

use std::collections::{BTreeMap, HashMap, VecDeque};

use ahash::{AHashMap, AHashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use super::journal::{Journal, Progress, MAX_SEQUENCE};
use super::mailbox::{MessageLog, NewRecord, SenderTable, StoredMessage};
use crate::config::Config;
use crate::store::proto::{self as ev, event::Kind, Event, Removal};
use crate::store::{
    AccountLimits, Appended, Expiry, Fetched, Identity, Listener, MailboxId, Message, NewMessage,
    QuotaKind, Registration, StoreError, StoreStats, StoreTotals, NONCE_LEN, TICKET_LEN,
};
use botd_protocol::keys::{sha256, PUBLIC_KEY_LEN, SIGNATURE_LEN};
use botd_protocol::proto::{Accept, PreKey, PreKeyBundle, SignedPreKey};

/// The `Message` of a stored record (the payload hash is recomputed: 32 bytes per stored
/// message against one hash per delivery from the store).
fn message_of(stored: &StoredMessage<'_>, senders: &SenderTable) -> Message {
    let (sender, sender_device) = senders.resolve(stored.sender);
    Message {
        id: stored.id,
        sender: *sender,
        sender_device,
        nonce: stored.nonce,
        payload_hash: sha256(&[stored.payload]),
        signature: *stored.signature,
        payload: Bytes::copy_from_slice(stored.payload),
        received_at_ms: stored.received_at_ms,
    }
}

#[derive(Debug, Default)]
struct Mailbox {
    /// Next id to assign; never goes back, even across unregistration.
    next_id: u64,
    /// The stored messages; their nonces answer idempotent retries.
    log: MessageLog,
    /// (id, lsn) of messages applied in this run whose records are not yet known durable,
    /// oldest first.
    unconfirmed: VecDeque<(u64, u64)>,
}

impl Mailbox {
    fn new(next_id: u64) -> Self {
        Self {
            next_id,
            ..Self::default()
        }
    }

    /// Drops the entries that are durable by now; returns the highest id a read may show.
    fn visible_up_to(&mut self, durable: u64) -> u64 {
        while self
            .unconfirmed
            .front()
            .is_some_and(|&(_, lsn)| lsn <= durable)
        {
            self.unconfirmed.pop_front();
        }
        match self.unconfirmed.front() {
            Some(&(id, _)) => id - 1,
            None => u64::MAX,
        }
    }

    fn remove(&mut self, id: u64, senders: &mut SenderTable, counters: &Counters) -> bool {
        let Some((sender, len)) = self.log.remove(id) else {
            return false;
        };
        senders.release(sender);
        counters
            .stored_bytes
            .fetch_sub(len as u64, Ordering::Relaxed);
        counters.messages.fetch_sub(1, Ordering::Relaxed);
        true
    }

    fn clear(&mut self, senders: &mut SenderTable, counters: &Counters) {
        counters
            .stored_bytes
            .fetch_sub(self.log.payload_bytes() as u64, Ordering::Relaxed);
        counters
            .messages
            .fetch_sub(self.log.len(), Ordering::Relaxed);
        for sender in self.log.clear() {
            senders.release(sender);
        }
        self.unconfirmed.clear();
    }
}

#[derive(Debug, Clone)]
struct DeviceKeys {
    registration_id: u32,
    identity_key: Bytes,
    signed_prekey: SignedPreKey,
    one_time_prekeys: VecDeque<PreKey>,
    /// `PreKeysLow` was announced since the count last rose to the threshold (not durable:
    /// after a restart it may be announced once more).
    low_announced: bool,
}

#[derive(Debug)]
enum DeviceState {
    Registered(DeviceKeys),
    /// Unregistered; kept so the mailbox's ids are never reused if the device id comes back.
    Retired,
}

#[derive(Debug)]
struct Device {
    state: DeviceState,
    mailbox: Mailbox,
}

impl Device {
    fn keys(&self) -> Option<&DeviceKeys> {
        match &self.state {
            DeviceState::Registered(keys) => Some(keys),
            DeviceState::Retired => None,
        }
    }

    fn keys_mut(&mut self) -> Option<&mut DeviceKeys> {
        match &mut self.state {
            DeviceState::Registered(keys) => Some(keys),
            DeviceState::Retired => None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct TicketState {
    expires_at_ms: u64,
    uses_left: u32,
}

#[derive(Debug)]
struct Account {
    devices: BTreeMap<u32, Device>,
    accept: Accept,
    contacts: AHashSet<Identity>,
    tickets: HashMap<[u8; TICKET_LEN], TicketState>,
    /// Last time the identity was in use; idle accounts expire.
    last_seen_ms: u64,
}

impl Default for Account {
    fn default() -> Self {
        Self {
            devices: BTreeMap::new(),
            accept: Accept::Open,
            contacts: AHashSet::new(),
            tickets: HashMap::new(),
            last_seen_ms: 0,
        }
    }
}

impl Account {
    /// The durable part of the account (what a snapshot writes).
    fn durable_copy(&self) -> Account {
        let devices = self
            .devices
            .iter()
            .map(|(&id, device)| {
                let state = match &device.state {
                    DeviceState::Registered(keys) => DeviceState::Registered(keys.clone()),
                    DeviceState::Retired => DeviceState::Retired,
                };
                let mailbox = Mailbox {
                    next_id: device.mailbox.next_id,
                    log: device.mailbox.log.clone(),
                    unconfirmed: VecDeque::new(),
                };
                (id, Device { state, mailbox })
            })
            .collect();
        Account {
            devices,
            accept: self.accept,
            contacts: self.contacts.clone(),
            tickets: self.tickets.clone(),
            last_seen_ms: self.last_seen_ms,
        }
    }

    fn registered(&self, device_id: u32) -> Option<&Device> {
        self.devices.get(&device_id).filter(|d| d.keys().is_some())
    }

    fn registered_mut(&mut self, device_id: u32) -> Option<&mut Device> {
        self.devices
            .get_mut(&device_id)
            .filter(|d| d.keys().is_some())
    }

    fn active_devices(&self) -> usize {
        self.devices.values().filter(|d| d.keys().is_some()).count()
    }

    fn is_registered(&self) -> bool {
        self.active_devices() > 0
    }

    fn stored_bytes(&self) -> usize {
        self.devices
            .values()
            .map(|d| d.mailbox.log.payload_bytes())
            .sum()
    }

    /// The lowest id a mailbox created after this account's removal may start at.
    fn id_floor(&self) -> u64 {
        self.devices
            .values()
            .map(|d| d.mailbox.next_id)
            .max()
            .unwrap_or(1)
    }
}

/// A durable message waiting to be announced.
#[derive(Debug)]
struct Release {
    lsn: u64,
    mailbox: MailboxId,
    message: Arc<Message>,
    prev_id: Option<u64>,
}

#[derive(Debug, Default)]
struct ShardData {
    accounts: AHashMap<Identity, Account>,
    /// The senders named by the shard's stored messages.
    senders: SenderTable,
    /// Messages applied in this run, not yet announced, in lsn order.
    unreleased: VecDeque<Release>,
}

#[derive(Debug, Default)]
struct Shard {
    data: Mutex<ShardData>,
    /// Held while the shard's newly durable messages are announced, so announcements of one
    /// shard never overtake each other. Never taken while `data` is held.
    release: Mutex<()>,
}

/// Relay-wide counts kept by [`apply`].
#[derive(Debug, Default)]
pub struct Counters {
    identities: AtomicUsize,
    /// Messages stored in all mailboxes.
    messages: AtomicUsize,
    stored_bytes: AtomicU64,
    /// Mailboxes created from now on start at this id or above.
    id_floor: AtomicU64,
}

/// Why a replayed event could not be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApplyError {
    #[error("event has no kind")]
    Empty,
    #[error("event field {0} has the wrong length")]
    Field(&'static str),
    #[error("event field {field} is out of range ({value})")]
    OutOfRange { field: &'static str, value: u64 },
}

fn fixed<const N: usize>(bytes: &[u8], field: &'static str) -> Result<[u8; N], ApplyError> {
    bytes.try_into().map_err(|_| ApplyError::Field(field))
}

/// Refuses values that would overflow later arithmetic (`+ 1` on ids, time comparisons).
fn in_range(field: &'static str, value: u64, min: u64) -> Result<u64, ApplyError> {
    if value < min || value >= MAX_SEQUENCE {
        return Err(ApplyError::OutOfRange { field, value });
    }
    Ok(value)
}

/// The identity whose shard an event belongs to.
pub fn event_identity(event: &Event) -> Result<Identity, ApplyError> {
    let bytes = match event.kind.as_ref().ok_or(ApplyError::Empty)? {
        Kind::DeviceRegistered(e) => &e.identity,
        Kind::DeviceUnregistered(e) => &e.identity,
        Kind::PreKeysUploaded(e) => &e.identity,
        Kind::PreKeysTaken(e) => &e.identity,
        Kind::MessageStored(e) => &e.recipient,
        Kind::MessagesRemoved(e) => &e.identity,
        Kind::PolicySet(e) => &e.identity,
        Kind::ContactAdded(e) => &e.identity,
        Kind::ContactRemoved(e) => &e.identity,
        Kind::TicketCreated(e) => &e.identity,
        Kind::MailboxState(e) => &e.identity,
        Kind::AccountRemoved(e) => &e.identity,
        Kind::AccountSeen(e) => &e.identity,
    };
    fixed(bytes, "identity")
}

/// The account an event applies to, created (and counted) if new.
fn account_for<'a>(
    accounts: &'a mut AHashMap<Identity, Account>,
    identity: Identity,
    counters: &Counters,
) -> &'a mut Account {
    accounts.entry(identity).or_insert_with(|| {
        counters.identities.fetch_add(1, Ordering::Relaxed);
        Account::default()
    })
}

/// Applies one event to the accounts of its shard. The only code that changes durable state.
fn apply(shard: &mut ShardData, event: &Event, counters: &Counters) -> Result<(), ApplyError> {
    let ShardData {
        accounts, senders, ..
    } = shard;
    let identity = event_identity(event)?;
    let kind = event.kind.as_ref().ok_or(ApplyError::Empty)?;
    if let Kind::AccountRemoved(e) = kind {
        let floor = in_range("id_floor", e.id_floor, 0)?;
        counters.id_floor.fetch_max(floor, Ordering::Relaxed);
        if let Some(mut account) = accounts.remove(&identity) {
            counters.identities.fetch_sub(1, Ordering::Relaxed);
            for device in account.devices.values_mut() {
                device.mailbox.clear(senders, counters);
            }
        }
        return Ok(());
    }
    let account = account_for(accounts, identity, counters);
    match kind {
        Kind::DeviceRegistered(e) => {
            in_range("device_id", u64::from(e.device_id), 1)?;
            let keys = DeviceKeys {
                registration_id: e.registration_id,
                identity_key: e.identity_key.clone(),
                signed_prekey: e.signed_prekey.clone().unwrap_or_default(),
                one_time_prekeys: e.one_time_prekeys.iter().cloned().collect(),
                low_announced: false,
            };
            let floor = counters.id_floor.load(Ordering::Relaxed).max(1);
            let device = account
                .devices
                .entry(e.device_id)
                .or_insert_with(|| Device {
                    state: DeviceState::Retired,
                    mailbox: Mailbox::new(floor),
                });
            device.state = DeviceState::Registered(keys);
            account.last_seen_ms = account.last_seen_ms.max(e.at_ms);
        }
        Kind::DeviceUnregistered(e) => {
            if let Some(device) = account.devices.get_mut(&e.device_id) {
                device.state = DeviceState::Retired;
                device.mailbox.clear(senders, counters);
            }
        }
        Kind::PreKeysUploaded(e) => {
            if let Some(keys) = account
                .devices
                .get_mut(&e.device_id)
                .and_then(Device::keys_mut)
            {
                if let Some(signed) = &e.signed_prekey {
                    keys.signed_prekey = signed.clone();
                }
                keys.one_time_prekeys
                    .extend(e.one_time_prekeys.iter().cloned());
            }
        }
        Kind::PreKeysTaken(e) => {
            for taken in &e.taken {
                if let Some(keys) = account
                    .devices
                    .get_mut(&taken.device_id)
                    .and_then(Device::keys_mut)
                {
                    if let Some(pos) = keys
                        .one_time_prekeys
                        .iter()
                        .position(|k| k.id == taken.prekey_id)
                    {
                        keys.one_time_prekeys.remove(pos);
                    }
                }
            }
        }
        Kind::MessageStored(e) => {
            let sender: Identity = fixed(&e.sender, "sender")?;
            let nonce = fixed(&e.sender_nonce, "sender_nonce")?;
            let signature = fixed(&e.sender_signature, "sender_signature")?;
            let message_id = in_range("message_id", e.message_id, 1)?;
            let received_at_ms = in_range("received_at_ms", e.received_at_ms, 0)?;
            if !e.ticket_used.is_empty() {
                let token: [u8; TICKET_LEN] = fixed(&e.ticket_used, "ticket_used")?;
                if let Some(ticket) = account.tickets.get_mut(&token) {
                    ticket.uses_left = ticket.uses_left.saturating_sub(1);
                    if ticket.uses_left == 0 {
                        account.tickets.remove(&token);
                    }
                }
            }
            if e.contact_added {
                account.contacts.insert(sender);
            }
            if let Some(device) = account.devices.get_mut(&e.device_id) {
                let mailbox = &mut device.mailbox;
                mailbox.next_id = mailbox.next_id.max(message_id + 1);
                let record = NewRecord {
                    sender: senders.acquire(&sender, e.sender_device),
                    nonce,
                    signature: &signature,
                    payload: &e.payload,
                    received_at_ms,
                };
                match mailbox.log.insert(message_id, &record) {
                    Some((replaced, len)) => {
                        senders.release(replaced);
                        counters
                            .stored_bytes
                            .fetch_sub(len as u64, Ordering::Relaxed);
                    }
                    None => {
                        counters.messages.fetch_add(1, Ordering::Relaxed);
                    }
                }
                counters
                    .stored_bytes
                    .fetch_add(e.payload.len() as u64, Ordering::Relaxed);
            }
        }
        Kind::MessagesRemoved(e) => {
            if let Some(device) = account.devices.get_mut(&e.device_id) {
                for id in &e.message_ids {
                    device.mailbox.remove(*id, senders, counters);
                }
            }
        }
        Kind::PolicySet(e) => account.accept = e.accept(),
        Kind::ContactAdded(e) => {
            account.contacts.insert(fixed(&e.contact, "contact")?);
        }
        Kind::ContactRemoved(e) => {
            account
                .contacts
                .remove(&fixed::<PUBLIC_KEY_LEN>(&e.contact, "contact")?);
        }
        Kind::MailboxState(e) => {
            in_range("device_id", u64::from(e.device_id), 1)?;
            let next_id = in_range("next_id", e.next_id, 0)?;
            let device = account
                .devices
                .entry(e.device_id)
                .or_insert_with(|| Device {
                    state: DeviceState::Retired,
                    mailbox: Mailbox::default(),
                });
            device.mailbox.next_id = device.mailbox.next_id.max(next_id);
        }
        Kind::TicketCreated(e) => {
            let expires_at_ms = in_range("expires_at_ms", e.expires_at_ms, 0)?;
            account
                .tickets
                .retain(|_, t| t.expires_at_ms > e.created_at_ms);
            account.tickets.insert(
                fixed(&e.token, "token")?,
                TicketState {
                    expires_at_ms,
                    uses_left: e.uses,
                },
            );
        }
        Kind::AccountSeen(e) => {
            let at_ms = in_range("at_ms", e.at_ms, 0)?;
            account.last_seen_ms = account.last_seen_ms.max(at_ms);
        }
        Kind::AccountRemoved(_) => unreachable!("handled above"),
    }
    Ok(())
}

/// What a change produced: its value, and the lsn an answer must wait for.
pub struct Change<T> {
    pub value: T,
    pub lsn: u64,
}

/// What an expiry sweep did, and what listeners must hear.
pub struct Swept {
    pub expiry: Expiry,
    pub removed: Vec<(MailboxId, Vec<u64>)>,
    pub closed: Vec<MailboxId>,
    pub lsn: u64,
}

/// A fetch's bundles plus the devices it left below the threshold.
pub struct FetchChange {
    pub fetched: Fetched,
    pub low: Vec<(u32, u32)>,
}

pub struct State {
    shards: Box<[Shard]>,
    limits: AccountLimits,
    journal: Option<Arc<Journal>>,
    progress: Arc<Progress>,
    counters: Counters,
}

impl State {
    /// An empty state of `config.store_shards` shards; changes go to `journal` if given.
    pub fn new(config: &Config, journal: Option<Arc<Journal>>) -> Self {
        let progress = journal
            .as_ref()
            .map_or_else(Progress::complete, |j| j.progress().clone());
        Self {
            shards: (0..config.store_shards.max(1))
                .map(|_| Shard::default())
                .collect(),
            limits: AccountLimits::from_config(config),
            journal,
            progress,
            counters: Counters::default(),
        }
    }

    /// The same state recording into `journal` (after recovery).
    pub fn with_journal(mut self, journal: Arc<Journal>) -> Self {
        self.progress = journal.progress().clone();
        self.journal = Some(journal);
        self
    }

    pub fn progress(&self) -> &Arc<Progress> {
        &self.progress
    }

    pub fn journal(&self) -> Option<&Arc<Journal>> {
        self.journal.as_ref()
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    fn shard_of(&self, identity: &Identity) -> usize {
        shard_index(identity, self.shards.len())
    }

    fn data(&self, identity: &Identity) -> parking_lot::MutexGuard<'_, ShardData> {
        self.shards[self.shard_of(identity)].data.lock()
    }

    /// The lsn that covers everything recorded so far (for answers that report state).
    fn current_lsn(&self) -> u64 {
        self.journal.as_ref().map_or(0, |j| j.last_lsn())
    }

    /// Refuses a change before it is applied when the journal can no longer take it.
    fn check_writable(&self) -> Result<(), StoreError> {
        match &self.journal {
            Some(journal) if journal.failed() => Err(unavailable()),
            _ => Ok(()),
        }
    }

    /// Applies an event and records it while the shard is still locked; returns its lsn.
    fn commit(&self, shard: &mut ShardData, kind: Kind) -> Result<u64, StoreError> {
        let event = Event { kind: Some(kind) };
        if let Err(err) = apply(shard, &event, &self.counters) {
            tracing::error!(error = %err, "live event could not be applied");
            return Err(StoreError::Unavailable(err.to_string()));
        }
        match &self.journal {
            None => Ok(0),
            Some(journal) => journal.record(&event).map_err(|err| {
                tracing::error!(error = %err, "change applied in memory but not journaled");
                unavailable()
            }),
        }
    }

    /// Applies an event read back from the journal or a snapshot.
    pub fn replay(&self, event: &Event) -> Result<(), ApplyError> {
        let identity = event_identity(event)?;
        apply(&mut self.data(&identity), event, &self.counters)
    }

    /// Raises the id floor (from a snapshot's trailer).
    pub fn raise_id_floor(&self, floor: u64) {
        self.counters.id_floor.fetch_max(floor, Ordering::Relaxed);
    }

    /// After recovery: accounts never seen (older files) count as seen now, so an upgrade does
    /// not expire them at once.
    pub fn mark_recovered(&self, now_ms: u64) {
        for shard in self.shards.iter() {
            for account in shard.data.lock().accounts.values_mut() {
                if account.last_seen_ms == 0 {
                    account.last_seen_ms = now_ms;
                }
            }
        }
    }

    /// Announces the shard's messages that are durable by now, in order (one at a time, so
    /// the shard's lock is never held while a listener runs).
    pub fn release(&self, index: usize, listener: &dyn Listener) {
        let shard = &self.shards[index];
        let _in_order = shard.release.lock();
        let durable = self.progress.durable();
        loop {
            let next = {
                let mut data = shard.data.lock();
                let ShardData {
                    accounts,
                    unreleased,
                    ..
                } = &mut *data;
                loop {
                    match unreleased.front() {
                        Some(r) if r.lsn <= durable => {}
                        _ => break None,
                    }
                    let r = unreleased.pop_front().expect("just looked");
                    // A message acked before it was announced is not announced.
                    let stored = accounts
                        .get(&r.mailbox.identity)
                        .and_then(|a| a.devices.get(&r.mailbox.device))
                        .is_some_and(|d| d.mailbox.log.contains(r.message.id));
                    if stored {
                        break Some(r);
                    }
                }
            };
            let Some(r) = next else {
                return;
            };
            listener.stored(&r.mailbox, &r.message, r.prev_id);
        }
    }

    /// Indexes of shards holding messages not yet announced.
    pub fn shards_with_unreleased(&self) -> Vec<usize> {
        (0..self.shards.len())
            .filter(|&i| !self.shards[i].data.lock().unreleased.is_empty())
            .collect()
    }

    /// The events that rebuild shard `index` as it is now, and the highest lsn they cover.
    /// The shard is locked only while its state is copied.
    pub fn snapshot_shard(&self, index: usize) -> (Vec<Event>, u64) {
        let (copies, senders, cover) = {
            let shard = self.shards[index].data.lock();
            let copies: Vec<(Identity, Account)> = shard
                .accounts
                .iter()
                .map(|(identity, account)| (*identity, account.durable_copy()))
                .collect();
            (copies, shard.senders.clone(), self.current_lsn())
        };
        let mut events = Vec::new();
        for (identity, account) in &copies {
            describe_account(identity, account, &senders, &mut events);
        }
        (events, cover)
    }

    pub fn id_floor(&self) -> u64 {
        self.counters.id_floor.load(Ordering::Relaxed)
    }

    /// The whole durable state as sorted, encoded events: two stores with equal contents give
    /// equal lists, whatever their shard counts or map orders.
    pub fn canonical_state(&self) -> Vec<Vec<u8>> {
        use prost::Message as _;
        let mut all: Vec<Vec<u8>> = (0..self.shards.len())
            .flat_map(|i| self.snapshot_shard(i).0)
            .map(|event| event.encode_to_vec())
            .collect();
        all.sort();
        all
    }

    pub fn touch(&self, identity: &Identity, now_ms: u64) {
        let mut shard = self.data(identity);
        let due = shard.accounts.get(identity).is_some_and(|a| {
            now_ms >= a.last_seen_ms.saturating_add(self.limits.touch_interval_ms)
        });
        if due && self.check_writable().is_ok() {
            let _ = self.commit(
                &mut shard,
                Kind::AccountSeen(ev::AccountSeen {
                    identity: Bytes::copy_from_slice(identity),
                    at_ms: now_ms,
                }),
            );
        }
    }

    pub fn register(
        &self,
        me: &Identity,
        reg: Registration,
        now_ms: u64,
    ) -> Result<Change<u32>, StoreError> {
        self.check_writable()?;
        let mut shard = self.data(me);
        match shard.accounts.get(me) {
            Some(account) => {
                let new_device = account.registered(reg.device).is_none();
                if new_device && account.active_devices() >= self.limits.max_devices_per_identity {
                    return Err(StoreError::Limit {
                        kind: QuotaKind::Devices,
                        message: format!(
                            "at most {} devices per identity",
                            self.limits.max_devices_per_identity
                        ),
                    });
                }
                // Retired device ids are kept to protect message ids; bound them too.
                if new_device
                    && !account.devices.contains_key(&reg.device)
                    && account.devices.len() >= 4 * self.limits.max_devices_per_identity
                {
                    return Err(StoreError::Limit {
                        kind: QuotaKind::DeviceIds,
                        message: "too many device ids used by this identity".into(),
                    });
                }
            }
            None => {
                if self.counters.identities.load(Ordering::Relaxed) >= self.limits.max_identities {
                    return Err(StoreError::QuotaExceeded {
                        kind: QuotaKind::Identities,
                        message: "the relay holds as many identities as it may",
                    });
                }
            }
        }
        let count = reg.one_time_prekeys.len() as u32;
        let lsn = self.commit(
            &mut shard,
            Kind::DeviceRegistered(ev::DeviceRegistered {
                identity: Bytes::copy_from_slice(me),
                device_id: reg.device,
                registration_id: reg.registration_id,
                identity_key: reg.identity_key,
                signed_prekey: Some(reg.signed_prekey),
                one_time_prekeys: reg.one_time_prekeys,
                at_ms: now_ms,
            }),
        )?;
        Ok(Change { value: count, lsn })
    }

    /// Unregisters a device (and removes the account if it was the last); returns the
    /// mailboxes that closed.
    pub fn unregister(&self, me: &Identity, device: u32) -> Result<Change<()>, StoreError> {
        self.check_writable()?;
        let mut shard = self.data(me);
        let registered = shard
            .accounts
            .get(me)
            .and_then(|a| a.registered(device))
            .is_some();
        if !registered {
            return Err(StoreError::NotRegistered(device));
        }
        let mut lsn = self.commit(
            &mut shard,
            Kind::DeviceUnregistered(ev::DeviceUnregistered {
                identity: Bytes::copy_from_slice(me),
                device_id: device,
            }),
        )?;
        let account = shard.accounts.get(me).expect("checked above");
        if !account.is_registered() {
            let id_floor = account.id_floor();
            lsn = self.commit(
                &mut shard,
                Kind::AccountRemoved(ev::AccountRemoved {
                    identity: Bytes::copy_from_slice(me),
                    id_floor,
                }),
            )?;
        }
        Ok(Change { value: (), lsn })
    }

    pub fn upload_prekeys(
        &self,
        me: &Identity,
        device: u32,
        signed_prekey: Option<SignedPreKey>,
        one_time_prekeys: Vec<PreKey>,
    ) -> Result<Change<u32>, StoreError> {
        self.check_writable()?;
        let mut shard = self.data(me);
        let keys = shard
            .accounts
            .get(me)
            .and_then(|a| a.registered(device))
            .and_then(Device::keys)
            .ok_or(StoreError::NotRegistered(device))?;
        self.limits
            .check_prekey_upload(&keys.one_time_prekeys, &one_time_prekeys)?;
        let stored = keys.one_time_prekeys.len();
        let count = (stored + one_time_prekeys.len()) as u32;
        let lsn = self.commit(
            &mut shard,
            Kind::PreKeysUploaded(ev::PreKeysUploaded {
                identity: Bytes::copy_from_slice(me),
                device_id: device,
                signed_prekey,
                one_time_prekeys,
            }),
        )?;
        if count >= self.limits.prekey_low_threshold {
            if let Some(keys) = shard
                .accounts
                .get_mut(me)
                .and_then(|a| a.registered_mut(device))
                .and_then(Device::keys_mut)
            {
                keys.low_announced = false;
            }
        }
        Ok(Change { value: count, lsn })
    }

    pub fn prekey_count(&self, me: &Identity, device: u32) -> Result<u32, StoreError> {
        let shard = self.data(me);
        shard
            .accounts
            .get(me)
            .and_then(|a| a.registered(device))
            .and_then(Device::keys)
            .map(|keys| keys.one_time_prekeys.len() as u32)
            .ok_or(StoreError::NotRegistered(device))
    }

    /// Hands out one bundle per device, popping a one-time prekey from each for which
    /// `take_one_time` allows it.
    pub fn fetch_prekeys(
        &self,
        target: &Identity,
        devices: &[u32],
        mut take_one_time: impl FnMut(u32) -> bool,
    ) -> Result<Change<FetchChange>, StoreError> {
        self.check_writable()?;
        let threshold = self.limits.prekey_low_threshold;
        let mut shard = self.data(target);
        let account = shard
            .accounts
            .get_mut(target)
            .filter(|a| a.is_registered())
            .ok_or(StoreError::UnknownRecipient)?;
        let wanted: Vec<u32> = if devices.is_empty() {
            account
                .devices
                .iter()
                .filter(|(_, d)| d.keys().is_some())
                .map(|(id, _)| *id)
                .collect()
        } else {
            for id in devices {
                account
                    .registered(*id)
                    .ok_or(StoreError::UnknownRecipient)?;
            }
            devices.to_vec()
        };
        let mut fetched = Fetched::default();
        let mut taken = Vec::new();
        let mut low = Vec::new();
        for device_id in wanted {
            let keys = account
                .registered_mut(device_id)
                .and_then(Device::keys_mut)
                .expect("checked above");
            let one_time_prekey = match keys.one_time_prekeys.front() {
                None => {
                    fetched.exhausted += 1;
                    None
                }
                Some(_) if !take_one_time(device_id) => {
                    fetched.withheld += 1;
                    None
                }
                Some(key) => {
                    let key = key.clone();
                    taken.push(ev::TakenPreKey {
                        device_id,
                        prekey_id: key.id,
                    });
                    let remaining = keys.one_time_prekeys.len() as u32 - 1;
                    if remaining < threshold && !keys.low_announced {
                        keys.low_announced = true;
                        low.push((device_id, remaining));
                    }
                    Some(key)
                }
            };
            fetched.bundles.push(PreKeyBundle {
                device_id,
                registration_id: keys.registration_id,
                identity_key: keys.identity_key.clone(),
                signed_prekey: Some(keys.signed_prekey.clone()),
                one_time_prekey,
            });
        }
        fetched.handed_out = taken.len();
        let lsn = if taken.is_empty() {
            self.current_lsn()
        } else {
            self.commit(
                &mut shard,
                Kind::PreKeysTaken(ev::PreKeysTaken {
                    identity: Bytes::copy_from_slice(target),
                    taken,
                }),
            )?
        };
        Ok(Change {
            value: FetchChange { fetched, low },
            lsn,
        })
    }

    pub fn is_registered(&self, identity: &Identity, device: u32) -> bool {
        self.data(identity)
            .accounts
            .get(identity)
            .and_then(|a| a.registered(device))
            .is_some()
    }

    /// Stores a message; returns the outcome, the lsn to wait for, and the shard to release
    /// once durable (for a newly stored message).
    pub fn append(&self, msg: NewMessage) -> Result<Change<(Appended, Option<usize>)>, StoreError> {
        self.check_writable()?;
        let index = self.shard_of(&msg.to.identity);
        let mut guard = self.shards[index].data.lock();
        let shard = &mut *guard;
        let account = shard
            .accounts
            .get(&msg.to.identity)
            .ok_or(StoreError::UnknownRecipient)?;
        let device = account
            .registered(msg.to.device)
            .ok_or(StoreError::UnknownRecipient)?;
        let mailbox = &device.mailbox;
        let senders = &shard.senders;
        let earlier = mailbox
            .log
            .find_nonce(&msg.nonce, |s| *senders.resolve(s).0 == msg.sender);
        if let Some(id) = earlier {
            // The first message's record comes before everything recorded so far.
            return Ok(Change {
                value: (Appended::Duplicate(id), None),
                lsn: self.current_lsn(),
            });
        }
        let mut ticket_used = Bytes::new();
        let mut contact_added = false;
        if account.accept == Accept::ContactsOnly
            && msg.sender != msg.to.identity
            && !account.contacts.contains(&msg.sender)
        {
            let token = msg.ticket.ok_or(StoreError::Forbidden)?;
            match account.tickets.get(&token) {
                Some(t) if t.expires_at_ms > msg.received_at_ms && t.uses_left > 0 => {}
                _ => return Err(StoreError::TicketInvalid),
            }
            if account.contacts.len() >= self.limits.max_contacts {
                return Err(StoreError::MailboxFull("recipient's contact list is full"));
            }
            ticket_used = Bytes::copy_from_slice(&token);
            contact_added = true;
        }
        if mailbox.log.len() >= self.limits.mailbox_max_messages {
            return Err(StoreError::MailboxFull("message count"));
        }
        if mailbox.log.payload_bytes() + msg.payload.len() > self.limits.mailbox_max_bytes {
            return Err(StoreError::MailboxFull("bytes"));
        }
        if account.stored_bytes() + msg.payload.len() > self.limits.max_identity_stored_bytes {
            return Err(StoreError::QuotaExceeded {
                kind: QuotaKind::IdentityBytes,
                message: "the recipient's identity stores as much as it may",
            });
        }
        let stored = self.counters.stored_bytes.load(Ordering::Relaxed);
        if stored + msg.payload.len() as u64 > self.limits.max_stored_bytes {
            return Err(StoreError::QuotaExceeded {
                kind: QuotaKind::StoredBytes,
                message: "the relay's storage is full",
            });
        }
        let message_id = mailbox.next_id;
        if message_id >= MAX_SEQUENCE {
            return Err(StoreError::MailboxFull("message ids exhausted"));
        }
        let lsn = self.commit(
            shard,
            Kind::MessageStored(ev::MessageStored {
                recipient: Bytes::copy_from_slice(&msg.to.identity),
                device_id: msg.to.device,
                message_id,
                sender: Bytes::copy_from_slice(&msg.sender),
                sender_device: msg.sender_device,
                sender_nonce: Bytes::copy_from_slice(&msg.nonce),
                sender_signature: Bytes::copy_from_slice(&msg.signature),
                // Shared with the request: the mailbox copies it into its packed records.
                payload: msg.payload.clone(),
                received_at_ms: msg.received_at_ms,
                ticket_used,
                contact_added,
            }),
        )?;
        let release = Release {
            lsn,
            mailbox: msg.to,
            prev_id: message_id.checked_sub(1),
            message: Arc::new(Message {
                id: message_id,
                sender: msg.sender,
                sender_device: msg.sender_device,
                nonce: msg.nonce,
                payload_hash: msg.payload_hash,
                signature: msg.signature,
                payload: msg.payload,
                received_at_ms: msg.received_at_ms,
            }),
        };
        if self.journal.is_some() {
            let device = shard
                .accounts
                .get_mut(&msg.to.identity)
                .and_then(|a| a.devices.get_mut(&msg.to.device))
                .expect("the message was just stored there");
            device.mailbox.unconfirmed.push_back((message_id, lsn));
            // Keeps the list to what is still unconfirmed even if nobody reads the mailbox.
            device.mailbox.visible_up_to(self.progress.durable());
        }
        shard.unreleased.push_back(release);
        Ok(Change {
            value: (Appended::Stored(message_id), Some(index)),
            lsn,
        })
    }

    /// Runs `f` on a registered device's mailbox, with the highest id a read may show.
    fn with_mailbox<T>(
        &self,
        mailbox: &MailboxId,
        f: impl FnOnce(&Mailbox, &SenderTable, u64) -> T,
    ) -> Result<T, StoreError> {
        let durable = self.progress.durable();
        let mut guard = self.data(&mailbox.identity);
        let shard = &mut *guard;
        let device = shard
            .accounts
            .get_mut(&mailbox.identity)
            .and_then(|a| a.registered_mut(mailbox.device))
            .ok_or(StoreError::NotRegistered(mailbox.device))?;
        let visible = device.mailbox.visible_up_to(durable);
        Ok(f(&device.mailbox, &shard.senders, visible))
    }

    pub fn read(
        &self,
        mailbox: &MailboxId,
        after: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Arc<Message>>, StoreError> {
        self.with_mailbox(mailbox, |mb, senders, visible| {
            let mut out = Vec::new();
            let mut bytes = 0usize;
            for stored in mb.log.iter_from(after.saturating_add(1)) {
                if stored.id > visible || out.len() >= max_count {
                    break;
                }
                bytes += stored.payload.len();
                if bytes > max_bytes && !out.is_empty() {
                    break;
                }
                out.push(Arc::new(message_of(&stored, senders)));
            }
            out
        })
    }

    pub fn get(&self, mailbox: &MailboxId, id: u64) -> Result<Arc<Message>, StoreError> {
        self.with_mailbox(mailbox, |mb, senders, visible| {
            mb.log
                .get(id)
                .filter(|_| id <= visible)
                .map(|m| Arc::new(message_of(&m, senders)))
        })?
        .ok_or(StoreError::NotFound)
    }

    pub fn last_id(&self, mailbox: &MailboxId) -> Result<u64, StoreError> {
        self.with_mailbox(mailbox, |mb, _, visible| {
            mb.next_id.saturating_sub(1).min(visible)
        })
    }

    /// Deletes acknowledged messages; returns how many, and which. Only messages a read could
    /// show count: one that is not durable yet was never delivered, so an ack cannot take it.
    pub fn ack(&self, mailbox: &MailboxId, ids: &[u64]) -> Result<Change<Vec<u64>>, StoreError> {
        let durable = self.progress.durable();
        let mut shard = self.data(&mailbox.identity);
        let device = shard
            .accounts
            .get_mut(&mailbox.identity)
            .and_then(|a| a.registered_mut(mailbox.device))
            .ok_or(StoreError::NotRegistered(mailbox.device))?;
        let visible = device.mailbox.visible_up_to(durable);
        let mut present: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|id| *id <= visible && device.mailbox.log.contains(*id))
            .collect();
        present.sort_unstable();
        present.dedup();
        if present.is_empty() {
            return Ok(Change {
                value: present,
                lsn: self.current_lsn(),
            });
        }
        self.check_writable()?;
        let lsn = self.commit(
            &mut shard,
            Kind::MessagesRemoved(ev::MessagesRemoved {
                identity: Bytes::copy_from_slice(&mailbox.identity),
                device_id: mailbox.device,
                message_ids: present.clone(),
                reason: Removal::Acked as i32,
            }),
        )?;
        Ok(Change {
            value: present,
            lsn,
        })
    }

    fn registered_account(
        &self,
        me: &Identity,
    ) -> Result<parking_lot::MutexGuard<'_, ShardData>, StoreError> {
        self.check_writable()?;
        let shard = self.data(me);
        if !shard.accounts.get(me).is_some_and(Account::is_registered) {
            return Err(StoreError::IdentityNotRegistered);
        }
        Ok(shard)
    }

    pub fn set_policy(&self, me: &Identity, accept: Accept) -> Result<Change<()>, StoreError> {
        let mut shard = self.registered_account(me)?;
        let lsn = self.commit(
            &mut shard,
            Kind::PolicySet(ev::PolicySet {
                identity: Bytes::copy_from_slice(me),
                accept: accept as i32,
            }),
        )?;
        Ok(Change { value: (), lsn })
    }

    pub fn add_contact(&self, me: &Identity, contact: Identity) -> Result<Change<()>, StoreError> {
        let mut shard = self.registered_account(me)?;
        let account = shard.accounts.get(me).expect("checked registered");
        if account.contacts.contains(&contact) {
            return Ok(Change {
                value: (),
                lsn: self.current_lsn(),
            });
        }
        if account.contacts.len() >= self.limits.max_contacts {
            return Err(StoreError::Limit {
                kind: QuotaKind::Contacts,
                message: format!("at most {} contacts", self.limits.max_contacts),
            });
        }
        let lsn = self.commit(
            &mut shard,
            Kind::ContactAdded(ev::ContactAdded {
                identity: Bytes::copy_from_slice(me),
                contact: Bytes::copy_from_slice(&contact),
            }),
        )?;
        Ok(Change { value: (), lsn })
    }

    pub fn remove_contact(
        &self,
        me: &Identity,
        contact: Identity,
    ) -> Result<Change<()>, StoreError> {
        let mut shard = self.registered_account(me)?;
        let present = shard
            .accounts
            .get(me)
            .expect("checked registered")
            .contacts
            .contains(&contact);
        if !present {
            return Ok(Change {
                value: (),
                lsn: self.current_lsn(),
            });
        }
        let lsn = self.commit(
            &mut shard,
            Kind::ContactRemoved(ev::ContactRemoved {
                identity: Bytes::copy_from_slice(me),
                contact: Bytes::copy_from_slice(&contact),
            }),
        )?;
        Ok(Change { value: (), lsn })
    }

    pub fn create_ticket(
        &self,
        me: &Identity,
        token: [u8; TICKET_LEN],
        expires_at_ms: u64,
        uses: u32,
        now_ms: u64,
    ) -> Result<Change<()>, StoreError> {
        let mut shard = self.registered_account(me)?;
        let live = shard
            .accounts
            .get(me)
            .expect("checked registered")
            .tickets
            .values()
            .filter(|t| t.expires_at_ms > now_ms)
            .count();
        if live >= self.limits.max_tickets_per_identity {
            return Err(StoreError::Limit {
                kind: QuotaKind::Tickets,
                message: format!(
                    "at most {} unexpired tickets per identity",
                    self.limits.max_tickets_per_identity
                ),
            });
        }
        let lsn = self.commit(
            &mut shard,
            Kind::TicketCreated(ev::TicketCreated {
                identity: Bytes::copy_from_slice(me),
                token: Bytes::copy_from_slice(&token),
                expires_at_ms,
                uses,
                created_at_ms: now_ms,
            }),
        )?;
        Ok(Change { value: (), lsn })
    }

    /// Removes messages received at or before `message_cutoff_ms` and accounts last seen
    /// before `account_cutoff_ms`; in the same pass, counts what stays.
    pub fn expire(&self, message_cutoff_ms: u64, account_cutoff_ms: u64) -> Swept {
        let mut swept = Swept {
            expiry: Expiry::default(),
            removed: Vec::new(),
            closed: Vec::new(),
            lsn: 0,
        };
        for shard in self.shards.iter() {
            let mut shard = shard.data.lock();
            let mut removals = Vec::new();
            let mut idle = Vec::new();
            for (identity, account) in shard.accounts.iter_mut() {
                if account.last_seen_ms < account_cutoff_ms {
                    idle.push((*identity, account.id_floor()));
                    continue;
                }
                for (device_id, device) in account.devices.iter_mut() {
                    let mailbox = &mut device.mailbox;
                    swept.expiry.bytes_trimmed += mailbox.log.trim();
                    // Ids are assigned in receive order, so the expired ones are a prefix.
                    let mut expired_bytes = 0;
                    let ids: Vec<u64> = mailbox
                        .log
                        .iter()
                        .take_while(|m| m.received_at_ms <= message_cutoff_ms)
                        .map(|m| {
                            expired_bytes += m.payload.len();
                            m.id
                        })
                        .collect();
                    swept.expiry.messages_left += mailbox.log.len() - ids.len();
                    swept.expiry.payload_bytes_left += mailbox.log.payload_bytes() - expired_bytes;
                    if !ids.is_empty() {
                        removals.push((*identity, *device_id, ids));
                    }
                }
            }
            if self.check_writable().is_err() {
                continue;
            }
            for (identity, device_id, ids) in removals {
                let kind = Kind::MessagesRemoved(ev::MessagesRemoved {
                    identity: Bytes::copy_from_slice(&identity),
                    device_id,
                    message_ids: ids.clone(),
                    reason: Removal::Expired as i32,
                });
                if let Ok(lsn) = self.commit(&mut shard, kind) {
                    swept.lsn = swept.lsn.max(lsn);
                    swept.expiry.expired_messages += ids.len();
                    swept.removed.push((
                        MailboxId {
                            identity,
                            device: device_id,
                        },
                        ids,
                    ));
                }
            }
            for (identity, id_floor) in idle {
                let devices: Vec<u32> = shard.accounts[&identity]
                    .devices
                    .iter()
                    .filter(|(_, d)| d.keys().is_some())
                    .map(|(id, _)| *id)
                    .collect();
                let kind = Kind::AccountRemoved(ev::AccountRemoved {
                    identity: Bytes::copy_from_slice(&identity),
                    id_floor,
                });
                if let Ok(lsn) = self.commit(&mut shard, kind) {
                    swept.lsn = swept.lsn.max(lsn);
                    swept.expiry.removed_accounts += 1;
                    swept.closed.extend(
                        devices
                            .into_iter()
                            .map(|device| MailboxId { identity, device }),
                    );
                }
            }
        }
        swept
    }

    /// Running totals, read without walking the store.
    pub fn totals(&self) -> StoreTotals {
        StoreTotals {
            identities: self.counters.identities.load(Ordering::Relaxed),
            messages: self.counters.messages.load(Ordering::Relaxed),
            payload_bytes: self.counters.stored_bytes.load(Ordering::Relaxed),
            journal_pending_bytes: self.journal.as_ref().map_or(0, |j| j.pending_bytes()),
        }
    }

    pub fn stats(&self) -> StoreStats {
        let mut stats = StoreStats::default();
        for shard in self.shards.iter() {
            let shard = shard.data.lock();
            for account in shard.accounts.values() {
                if account.is_registered() {
                    stats.identities += 1;
                }
                for device in account.devices.values() {
                    if let Some(keys) = device.keys() {
                        stats.devices += 1;
                        stats.one_time_prekeys += keys.one_time_prekeys.len();
                    }
                    stats.messages += device.mailbox.log.len();
                    stats.payload_bytes += device.mailbox.log.payload_bytes();
                }
            }
        }
        stats
    }

    #[cfg(test)]
    fn interned_senders(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.data.lock().senders.len())
            .sum()
    }
}

fn unavailable() -> StoreError {
    StoreError::Unavailable("the journal can no longer be written".into())
}

/// Shard of an identity among `count` shards. Keys are points with uniformly distributed
/// x-coordinates, so a few bytes of x spread them evenly.
pub fn shard_index(identity: &Identity, count: usize) -> usize {
    let h = u64::from_le_bytes(identity[1..9].try_into().expect("8 bytes"));
    (h % count.max(1) as u64) as usize
}

/// Appends the events that rebuild `account` to `out`.
fn describe_account(
    identity: &Identity,
    account: &Account,
    senders: &SenderTable,
    out: &mut Vec<Event>,
) {
    let id = || Bytes::copy_from_slice(identity);
    let mut push = |kind| out.push(Event { kind: Some(kind) });
    for (&device_id, device) in &account.devices {
        if let DeviceState::Registered(keys) = &device.state {
            push(Kind::DeviceRegistered(ev::DeviceRegistered {
                identity: id(),
                device_id,
                registration_id: keys.registration_id,
                identity_key: keys.identity_key.clone(),
                signed_prekey: Some(keys.signed_prekey.clone()),
                one_time_prekeys: keys.one_time_prekeys.iter().cloned().collect(),
                at_ms: 0,
            }));
        }
        push(Kind::MailboxState(ev::MailboxState {
            identity: id(),
            device_id,
            next_id: device.mailbox.next_id,
        }));
        for m in device.mailbox.log.iter() {
            let (sender, sender_device) = senders.resolve(m.sender);
            push(Kind::MessageStored(ev::MessageStored {
                recipient: id(),
                device_id,
                message_id: m.id,
                sender: Bytes::copy_from_slice(sender),
                sender_device,
                sender_nonce: Bytes::copy_from_slice(&m.nonce),
                sender_signature: Bytes::copy_from_slice(m.signature),
                payload: Bytes::copy_from_slice(m.payload),
                received_at_ms: m.received_at_ms,
                ticket_used: Bytes::new(),
                contact_added: false,
            }));
        }
    }
    if account.accept != Accept::Open {
        push(Kind::PolicySet(ev::PolicySet {
            identity: id(),
            accept: account.accept as i32,
        }));
    }
    for contact in &account.contacts {
        push(Kind::ContactAdded(ev::ContactAdded {
            identity: id(),
            contact: Bytes::copy_from_slice(contact),
        }));
    }
    for (token, ticket) in &account.tickets {
        // As the live store holds it: expired tickets are pruned by the one apply path only.
        push(Kind::TicketCreated(ev::TicketCreated {
            identity: id(),
            token: Bytes::copy_from_slice(token),
            expires_at_ms: ticket.expires_at_ms,
            uses: ticket.uses_left,
            created_at_ms: 0,
        }));
    }
    if account.last_seen_ms > 0 {
        push(Kind::AccountSeen(ev::AccountSeen {
            identity: id(),
            at_ms: account.last_seen_ms,
        }));
    }
}

// Keep the wire constants and the store's in one place of truth.
const _: () = assert!(NONCE_LEN == 8 && SIGNATURE_LEN == 64);

#[cfg(test)]
mod tests {
    use super::*;
    use botd_protocol::keys::KeyPair;
    use botd_protocol::proto::SignedPreKey;

    fn state(config: &Config) -> State {
        let config = Config {
            store_shards: 4,
            ..config.clone()
        };
        State::new(&config, None)
    }

    fn identity() -> Identity {
        *KeyPair::generate().public().as_bytes()
    }

    fn register(state: &State, who: &Identity) {
        let reg = Registration {
            device: 1,
            registration_id: 1,
            identity_key: Bytes::from_static(&[1; 33]),
            signed_prekey: SignedPreKey {
                id: 1,
                public_key: Bytes::from_static(&[2; 33]),
                signature: Bytes::from_static(&[3; 64]),
            },
            one_time_prekeys: Vec::new(),
        };
        state.register(who, reg, 0).unwrap();
    }

    fn message(from: &Identity, to: &Identity, nonce: u8, len: usize, at: u64) -> NewMessage {
        let payload = Bytes::from(vec![nonce; len]);
        NewMessage {
            to: MailboxId {
                identity: *to,
                device: 1,
            },
            sender: *from,
            sender_device: 1,
            nonce: [nonce; NONCE_LEN],
            payload_hash: sha256(&[&payload]),
            signature: [0; SIGNATURE_LEN],
            payload,
            ticket: None,
            received_at_ms: at,
        }
    }

    fn stored(state: &State, msg: NewMessage) -> u64 {
        match state.append(msg).unwrap().value.0 {
            Appended::Stored(id) | Appended::Duplicate(id) => id,
        }
    }

    fn mailbox(who: &Identity) -> MailboxId {
        MailboxId {
            identity: *who,
            device: 1,
        }
    }

    #[test]
    fn expiry_removes_the_old_prefix_and_counts_what_stays() {
        let state = state(&Config::default());
        let (alice, bob) = (identity(), identity());
        register(&state, &alice);
        register(&state, &bob);
        for (n, at) in [(1u8, 0u64), (2, 10), (3, 20)] {
            stored(&state, message(&alice, &bob, n, 10, at));
        }
        let swept = state.expire(10, 0);
        let e = swept.expiry;
        assert_eq!(
            (e.expired_messages, e.messages_left, e.payload_bytes_left),
            (2, 1, 10)
        );
        assert_eq!(swept.removed, vec![(mailbox(&bob), vec![1, 2])]);
        assert!(matches!(
            state.get(&mailbox(&bob), 2),
            Err(StoreError::NotFound)
        ));
        assert!(state.get(&mailbox(&bob), 3).is_ok());
    }

    #[test]
    fn stored_messages_written_with_their_payload_hash_still_replay() {
        use prost::Message as _;
        let state = state(&Config::default());
        let (alice, bob) = (identity(), identity());
        register(&state, &bob);
        let stored = ev::MessageStored {
            recipient: Bytes::copy_from_slice(&bob),
            device_id: 1,
            message_id: 7,
            sender: Bytes::copy_from_slice(&alice),
            sender_device: 1,
            sender_nonce: Bytes::from_static(&[1; NONCE_LEN]),
            sender_signature: Bytes::from_static(&[2; SIGNATURE_LEN]),
            payload: Bytes::from_static(b"old"),
            received_at_ms: 5,
            ..Default::default()
        };
        // As files written before field 7 was retired carry it.
        let mut encoded = stored.encode_to_vec();
        prost::encoding::bytes::encode(7, &Bytes::from_static(&[9; 32]), &mut encoded);
        let decoded = ev::MessageStored::decode(&encoded[..]).unwrap();
        state
            .replay(&Event {
                kind: Some(Kind::MessageStored(decoded)),
            })
            .unwrap();
        let delivered = state.get(&mailbox(&bob), 7).unwrap();
        assert_eq!(&delivered.payload[..], b"old");
        assert_eq!(delivered.payload_hash, sha256(&[b"old"]));
    }

    #[test]
    fn senders_are_interned_while_their_messages_are_stored() {
        let state = state(&Config::default());
        let (alice, carol, bob) = (identity(), identity(), identity());
        for who in [&alice, &carol, &bob] {
            register(&state, who);
        }
        let first = stored(&state, message(&alice, &bob, 1, 10, 0));
        stored(&state, message(&alice, &bob, 2, 10, 0));
        // The same nonce from another sender is another message.
        let other = stored(&state, message(&carol, &bob, 1, 10, 0));
        assert_ne!(other, first);
        let retry = state.append(message(&alice, &bob, 1, 10, 0)).unwrap();
        assert_eq!(retry.value.0, Appended::Duplicate(first));
        assert_eq!(state.interned_senders(), 2);
        let delivered = state.get(&mailbox(&bob), other).unwrap();
        assert_eq!(delivered.sender, carol);
        assert_eq!(
            delivered.payload_hash,
            sha256(&[&delivered.payload]),
            "the hash is recomputed at delivery"
        );
        state.ack(&mailbox(&bob), &[other]).unwrap();
        assert_eq!(state.interned_senders(), 1, "carol has nothing stored");
        state.unregister(&bob, 1).unwrap();
        assert_eq!(state.interned_senders(), 0);
    }

    #[test]
    fn replayed_values_that_would_overflow_are_refused() {
        let state = state(&Config::default());
        let bob = identity();
        let event = |message_id| Event {
            kind: Some(Kind::MessageStored(ev::MessageStored {
                recipient: Bytes::copy_from_slice(&bob),
                device_id: 1,
                message_id,
                sender: Bytes::copy_from_slice(&bob),
                sender_device: 1,
                sender_nonce: Bytes::from_static(&[1; NONCE_LEN]),
                sender_signature: Bytes::from_static(&[2; SIGNATURE_LEN]),
                ..Default::default()
            })),
        };
        for bad in [0, u64::MAX, MAX_SEQUENCE] {
            assert!(
                matches!(
                    state.replay(&event(bad)),
                    Err(ApplyError::OutOfRange {
                        field: "message_id",
                        ..
                    })
                ),
                "{bad}"
            );
        }
        state.replay(&event(MAX_SEQUENCE - 1)).unwrap();
        let removed = Event {
            kind: Some(Kind::AccountRemoved(ev::AccountRemoved {
                identity: Bytes::copy_from_slice(&bob),
                id_floor: u64::MAX,
            })),
        };
        assert!(state.replay(&removed).is_err());
    }

    #[test]
    fn a_removed_account_never_gets_its_old_ids_again() {
        let state = state(&Config::default());
        let (alice, bob) = (identity(), identity());
        register(&state, &alice);
        register(&state, &bob);
        for n in 1..=5 {
            stored(&state, message(&alice, &bob, n, 3, 0));
        }
        state.unregister(&bob, 1).unwrap();
        assert_eq!(state.stats().identities, 1, "bob's account is gone");
        register(&state, &bob);
        let next = stored(&state, message(&alice, &bob, 9, 3, 0));
        assert!(next > 5, "ids continue above the removed account's: {next}");
        // An identity never seen before also starts above the floor: the relay no longer
        // knows which identities it removed.
        let carol = identity();
        register(&state, &carol);
        assert!(stored(&state, message(&alice, &carol, 1, 3, 0)) > 5);
    }

    #[test]
    fn idle_accounts_expire_and_their_mailboxes_close() {
        let state = state(&Config::default());
        let (alice, bob) = (identity(), identity());
        register(&state, &alice);
        register(&state, &bob);
        stored(&state, message(&alice, &bob, 1, 3, 0));
        state.touch(&alice, 1_000_000_000);
        let swept = state.expire(0, 500);
        assert_eq!(swept.expiry.removed_accounts, 1);
        assert_eq!(swept.closed, vec![mailbox(&bob)]);
        assert!(!state.is_registered(&bob, 1));
        assert!(state.is_registered(&alice, 1));
    }

    #[test]
    fn relay_wide_quotas_refuse_with_quota_exceeded() {
        let config = Config {
            max_identities: 2,
            max_stored_bytes: 25,
            max_identity_stored_bytes: 15,
            ..Config::default()
        };
        let state = state(&config);
        let (alice, bob, carol) = (identity(), identity(), identity());
        register(&state, &alice);
        register(&state, &bob);
        let reg = Registration {
            device: 1,
            registration_id: 1,
            identity_key: Bytes::from_static(&[1; 33]),
            signed_prekey: SignedPreKey::default(),
            one_time_prekeys: Vec::new(),
        };
        assert!(matches!(
            state.register(&carol, reg, 0),
            Err(StoreError::QuotaExceeded { .. })
        ));
        stored(&state, message(&alice, &bob, 1, 10, 0));
        assert!(matches!(
            state.append(message(&alice, &bob, 2, 10, 0)),
            Err(StoreError::QuotaExceeded { .. })
        ));
        stored(&state, message(&bob, &alice, 3, 10, 0));
        assert!(matches!(
            state.append(message(&bob, &alice, 4, 10, 0)),
            Err(StoreError::QuotaExceeded { .. })
        ));
    }
}
