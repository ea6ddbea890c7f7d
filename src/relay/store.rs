//! The relay's state in memory: accounts (identities with their devices, prekeys, policy,
//! contacts, tickets) and per-device mailboxes, split into shards by identity so that every
//! request locks exactly one shard, briefly.
//!
//! Every change is an [`Event`] applied by [`apply`], the one function that mutates durable
//! state, both live and when a journal is replayed; live changes are also handed to the
//! [`EventSink`] under the same lock, so a shard's events reach the sink in the order they were
//! applied. Live subscriptions (who is listening to a mailbox) are not durable and sit beside
//! the mailbox, outside the events.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use super::error::RelayError;
use super::mailbox::{MessageLog, NewMessage, SenderTable, StoredMessage};
use crate::config::Config;
use crate::core::keys::{sha256, PUBLIC_KEY_LEN, SIGNATURE_LEN};
use crate::net::PushHandle;
use crate::proto::store::{self as ev, event::Kind, Event, Removal};
use crate::proto::{
    Accept, Body, Deliver, ErrorCode, Frame, PreKey, PreKeyBundle, PreKeyBundles, PreKeyCount,
    Registered, Send, SignedPreKey, Ticket,
};

/// An identity: the 33-byte compressed public key a session authenticated with.
pub type Identity = [u8; PUBLIC_KEY_LEN];
/// Length of `Send.sender_nonce`.
pub const NONCE_LEN: usize = 8;
/// Length of a ticket token.
pub const TICKET_LEN: usize = 16;
/// Message ids one `AckMessages` may name.
pub const MAX_ACK_IDS: usize = 4096;

/// Receives every applied event (the journal, in a durable relay). Called with the event's
/// shard locked, so a shard's events are recorded in the order they were applied.
pub trait EventSink: std::marker::Send + Sync + 'static {
    /// Records the event and returns its log sequence number (increasing, never reused).
    fn record(&self, event: &Event) -> u64;
    /// The highest sequence number handed out so far.
    fn last_lsn(&self) -> u64;
}

/// A sink that keeps nothing: the store lives only in memory.
#[derive(Debug, Default)]
pub struct NoJournal;

impl EventSink for NoJournal {
    fn record(&self, _event: &Event) -> u64 {
        0
    }

    fn last_lsn(&self) -> u64 {
        0
    }
}

/// The `Deliver` push of a stored message.
fn deliver(message: &StoredMessage<'_>, senders: &SenderTable, recipient_device: u32) -> Deliver {
    let mut deliver = unhashed_deliver(message, senders, recipient_device);
    // Recomputed rather than stored: 32 bytes per stored message against a hash of the
    // payload per delivery.
    deliver.payload_hash = Bytes::copy_from_slice(&sha256(&[message.payload]));
    deliver
}

/// Every field of a stored message's `Deliver` but `payload_hash`: all a snapshot keeps.
fn unhashed_deliver(
    message: &StoredMessage<'_>,
    senders: &SenderTable,
    recipient_device: u32,
) -> Deliver {
    let (sender, sender_device) = senders.resolve(message.sender);
    Deliver {
        message_id: message.id,
        sender: Bytes::copy_from_slice(sender),
        sender_device,
        recipient_device,
        sender_nonce: Bytes::copy_from_slice(&message.nonce),
        payload_hash: Bytes::new(),
        sender_signature: Bytes::copy_from_slice(message.signature),
        payload: Bytes::copy_from_slice(message.payload),
        received_at_ms: message.received_at_ms,
    }
}

/// A session listening to a mailbox, with its delivery window.
#[derive(Debug)]
struct Subscriber {
    push: PushHandle,
    /// Highest message id pushed so far.
    cursor: u64,
    /// Pushed and not yet acked.
    in_flight: BTreeSet<u64>,
}

#[derive(Debug, Default)]
struct Mailbox {
    /// Next id to assign; never goes back, even across unregistration.
    next_id: u64,
    /// The stored messages; their nonces answer idempotent retries.
    log: MessageLog,
    /// Highest id whose record is durable: only these are pushed, so an id a recipient saw can
    /// never be reassigned after a crash.
    deliverable_up_to: u64,
    subscriber: Option<Subscriber>,
}

impl Mailbox {
    fn last_id(&self) -> u64 {
        self.next_id.saturating_sub(1)
    }

    fn remove(&mut self, id: u64, senders: &mut SenderTable) {
        if let Some(sender) = self.log.remove(id) {
            senders.release(sender);
            if let Some(sub) = &mut self.subscriber {
                sub.in_flight.remove(&id);
            }
        }
    }

    fn clear(&mut self, senders: &mut SenderTable) {
        for sender in self.log.clear() {
            senders.release(sender);
        }
        self.subscriber = None;
    }
}

#[derive(Debug, Clone)]
struct DeviceKeys {
    registration_id: u32,
    identity_key: Bytes,
    signed_prekey: SignedPreKey,
    one_time_prekeys: VecDeque<PreKey>,
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
    contacts: HashSet<Identity>,
    tickets: HashMap<[u8; TICKET_LEN], TicketState>,
}

impl Default for Account {
    fn default() -> Self {
        Self {
            devices: BTreeMap::new(),
            accept: Accept::Open,
            contacts: HashSet::new(),
            tickets: HashMap::new(),
        }
    }
}

impl Account {
    /// The durable part of the account (what a snapshot writes), without live subscriptions.
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
                    ..Mailbox::default()
                };
                (id, Device { state, mailbox })
            })
            .collect();
        Account {
            devices,
            accept: self.accept,
            contacts: self.contacts.clone(),
            tickets: self.tickets.clone(),
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
}

#[derive(Debug, Default)]
struct Shard {
    accounts: HashMap<Identity, Account>,
    /// The senders named by the shard's stored messages.
    senders: SenderTable,
}

/// Why a replayed event could not be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApplyError {
    #[error("event has no kind")]
    Empty,
    #[error("event field {0} has the wrong length")]
    Field(&'static str),
}

fn fixed<const N: usize>(bytes: &[u8], field: &'static str) -> Result<[u8; N], ApplyError> {
    bytes.try_into().map_err(|_| ApplyError::Field(field))
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
    };
    fixed(bytes, "identity")
}

/// Applies one event to the accounts of its shard. The only code that changes durable state.
fn apply(shard: &mut Shard, event: &Event) -> Result<(), ApplyError> {
    let Shard { accounts, senders } = shard;
    let identity = event_identity(event)?;
    let kind = event.kind.as_ref().ok_or(ApplyError::Empty)?;
    let account = accounts.entry(identity).or_default();
    match kind {
        Kind::DeviceRegistered(e) => {
            let keys = DeviceKeys {
                registration_id: e.registration_id,
                identity_key: e.identity_key.clone(),
                signed_prekey: e.signed_prekey.clone().unwrap_or_default(),
                one_time_prekeys: e.one_time_prekeys.iter().cloned().collect(),
            };
            let device = account
                .devices
                .entry(e.device_id)
                .or_insert_with(|| Device {
                    state: DeviceState::Retired,
                    mailbox: Mailbox {
                        next_id: 1,
                        ..Mailbox::default()
                    },
                });
            device.state = DeviceState::Registered(keys);
        }
        Kind::DeviceUnregistered(e) => {
            if let Some(device) = account.devices.get_mut(&e.device_id) {
                device.state = DeviceState::Retired;
                device.mailbox.clear(senders);
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
                mailbox.next_id = mailbox.next_id.max(e.message_id + 1);
                let message = NewMessage {
                    sender: senders.acquire(&sender, e.sender_device),
                    nonce,
                    signature: &signature,
                    payload: &e.payload,
                    received_at_ms: e.received_at_ms,
                };
                if let Some(replaced) = mailbox.log.insert(e.message_id, &message) {
                    senders.release(replaced);
                }
            }
        }
        Kind::MessagesRemoved(e) => {
            if let Some(device) = account.devices.get_mut(&e.device_id) {
                for id in &e.message_ids {
                    device.mailbox.remove(*id, senders);
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
            let device = account
                .devices
                .entry(e.device_id)
                .or_insert_with(|| Device {
                    state: DeviceState::Retired,
                    mailbox: Mailbox::default(),
                });
            device.mailbox.next_id = device.mailbox.next_id.max(e.next_id);
        }
        Kind::TicketCreated(e) => {
            account
                .tickets
                .retain(|_, t| t.expires_at_ms > e.created_at_ms);
            account.tickets.insert(
                fixed(&e.token, "token")?,
                TicketState {
                    expires_at_ms: e.expires_at_ms,
                    uses_left: e.uses,
                },
            );
        }
    }
    Ok(())
}

/// What a successful `Send` produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendOutcome {
    pub message_id: u64,
    pub duplicate: bool,
}

/// What a prekey fetch produced, plus the devices now running low.
#[derive(Debug)]
pub struct FetchOutcome {
    pub bundles: PreKeyBundles,
    pub handed_out: usize,
    pub exhausted: usize,
    /// (device, remaining) for devices left below the threshold by this fetch.
    pub low: Vec<(u32, u32)>,
}

/// What an expiry sweep removed and what it left.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    pub expired: usize,
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

pub struct Store {
    shards: Box<[Mutex<Shard>]>,
    /// Limits and quotas; the store reads them, nothing else.
    config: Config,
    sink: Arc<dyn EventSink>,
}

impl Store {
    /// An empty store of `config.store_shards` shards enforcing `config`'s limits.
    pub fn new(config: &Config, sink: Arc<dyn EventSink>) -> Self {
        Self {
            shards: (0..config.store_shards.max(1))
                .map(|_| Mutex::new(Shard::default()))
                .collect(),
            config: config.clone(),
            sink,
        }
    }

    /// The same store recording into another sink (after recovery: the journal).
    pub fn with_sink(mut self, sink: Arc<dyn EventSink>) -> Self {
        self.sink = sink;
        self
    }

    fn shard(&self, identity: &Identity) -> &Mutex<Shard> {
        &self.shards[shard_index(identity, self.shards.len())]
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The events that rebuild shard `index` as it is now, and the highest sequence number
    /// they cover. The shard is locked only while its state is copied.
    pub fn snapshot_shard(&self, index: usize) -> (Vec<Event>, u64) {
        // Copying packed mailboxes is a fraction of the cost of building events, so the lock
        // is held only for the copy.
        let (copies, senders, cover) = {
            let shard = self.shards[index].lock();
            let copies: Vec<(Identity, Account)> = shard
                .accounts
                .iter()
                .map(|(identity, account)| (*identity, account.durable_copy()))
                .collect();
            (copies, shard.senders.clone(), self.sink.last_lsn())
        };
        let mut events = Vec::new();
        for (identity, account) in &copies {
            describe_account(identity, account, &senders, &mut events);
        }
        (events, cover)
    }

    /// The whole durable state as sorted, encoded events: two stores with equal contents give
    /// equal lists, whatever their shard counts or map orders.
    pub fn canonical_state(&self) -> Vec<Vec<u8>> {
        use prost::Message;
        let mut all: Vec<Vec<u8>> = (0..self.shards.len())
            .flat_map(|i| self.snapshot_shard(i).0)
            .map(|event| event.encode_to_vec())
            .collect();
        all.sort();
        all
    }

    /// Makes every stored message deliverable (after recovery: all of it is durable).
    pub fn mark_all_deliverable(&self) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            for account in shard.accounts.values_mut() {
                for device in account.devices.values_mut() {
                    device.mailbox.deliverable_up_to = device.mailbox.last_id();
                }
            }
        }
    }

    /// Marks `message_id` of a mailbox durable (so it and all before it may be pushed) and
    /// pushes what a subscriber may now receive.
    pub fn release(&self, recipient: &Identity, device_id: u32, message_id: u64) {
        let mut shard = self.shard(recipient).lock();
        self.pump_device(
            &mut shard,
            recipient,
            device_id,
            Some(message_id),
            Pace::Other,
        );
    }

    /// Pushes what the subscriber of a device's mailbox may now receive, after marking
    /// `durable_up_to` (if given) deliverable.
    fn pump_device(
        &self,
        shard: &mut Shard,
        identity: &Identity,
        device_id: u32,
        durable_up_to: Option<u64>,
        pace: Pace,
    ) {
        let Shard { accounts, senders } = shard;
        if let Some(device) = accounts
            .get_mut(identity)
            .and_then(|a| a.devices.get_mut(&device_id))
        {
            let mailbox = &mut device.mailbox;
            if let Some(id) = durable_up_to {
                mailbox.deliverable_up_to = mailbox.deliverable_up_to.max(id);
            }
            pump(mailbox, senders, device_id, self.config.max_unacked, pace);
        }
    }

    /// Applies an event and hands it to the sink while the shard is still locked.
    fn commit(&self, shard: &mut Shard, kind: Kind) {
        let event = Event { kind: Some(kind) };
        match apply(shard, &event) {
            Ok(()) => {
                self.sink.record(&event);
            }
            Err(err) => tracing::error!(error = %err, "live event could not be applied"),
        }
    }

    /// Applies an event read back from the journal.
    pub fn replay(&self, event: &Event) -> Result<(), ApplyError> {
        let identity = event_identity(event)?;
        apply(&mut self.shard(&identity).lock(), event)
    }

    fn check_key(&self, field: &'static str, bytes: &[u8]) -> Result<(), RelayError> {
        if bytes.is_empty() || bytes.len() > self.config.max_key_len {
            return Err(RelayError::bad_request(format!(
                "{field} must be 1 to {} bytes",
                self.config.max_key_len
            )));
        }
        Ok(())
    }

    fn check_prekeys(
        &self,
        signed: Option<&SignedPreKey>,
        one_time: &[PreKey],
    ) -> Result<(), RelayError> {
        if let Some(signed) = signed {
            self.check_key("signed_prekey.public_key", &signed.public_key)?;
            self.check_key("signed_prekey.signature", &signed.signature)?;
        }
        if one_time.len() > self.config.max_prekeys_per_upload {
            return Err(RelayError::bad_request(format!(
                "at most {} one-time prekeys per request",
                self.config.max_prekeys_per_upload
            )));
        }
        let mut ids = HashSet::with_capacity(one_time.len());
        for key in one_time {
            self.check_key("one_time_prekeys.public_key", &key.public_key)?;
            if !ids.insert(key.id) {
                return Err(RelayError::bad_request(format!(
                    "one-time prekey id {} appears twice",
                    key.id
                )));
            }
        }
        Ok(())
    }

    pub fn register(
        &self,
        me: &Identity,
        req: crate::proto::Register,
    ) -> Result<Registered, RelayError> {
        if req.device_id == 0 {
            return Err(RelayError::bad_request("device_id must be at least 1"));
        }
        self.check_key("identity_key", &req.identity_key)?;
        let signed = req
            .signed_prekey
            .as_ref()
            .ok_or_else(|| RelayError::bad_request("signed_prekey is required"))?;
        self.check_prekeys(Some(signed), &req.one_time_prekeys)?;
        let mut shard = self.shard(me).lock();
        if let Some(account) = shard.accounts.get(me) {
            let new_device = account.registered(req.device_id).is_none();
            if new_device && account.active_devices() >= self.config.max_devices_per_identity {
                return Err(RelayError::bad_request(format!(
                    "at most {} devices per identity",
                    self.config.max_devices_per_identity
                )));
            }
            // Retired device ids are kept to protect message ids; bound them too.
            if new_device
                && !account.devices.contains_key(&req.device_id)
                && account.devices.len() >= 4 * self.config.max_devices_per_identity
            {
                return Err(RelayError::bad_request(
                    "too many device ids used by this identity",
                ));
            }
        }
        let count = req.one_time_prekeys.len() as u32;
        self.commit(
            &mut shard,
            Kind::DeviceRegistered(ev::DeviceRegistered {
                identity: Bytes::copy_from_slice(me),
                device_id: req.device_id,
                registration_id: req.registration_id,
                identity_key: req.identity_key,
                signed_prekey: req.signed_prekey,
                one_time_prekeys: req.one_time_prekeys,
            }),
        );
        Ok(Registered {
            device_id: req.device_id,
            one_time_prekeys: count,
        })
    }

    pub fn unregister(&self, me: &Identity, device_id: u32) -> Result<(), RelayError> {
        let mut shard = self.shard(me).lock();
        let registered = shard
            .accounts
            .get(me)
            .and_then(|a| a.registered(device_id))
            .is_some();
        if !registered {
            return Err(RelayError::NotRegistered(device_id));
        }
        self.commit(
            &mut shard,
            Kind::DeviceUnregistered(ev::DeviceUnregistered {
                identity: Bytes::copy_from_slice(me),
                device_id,
            }),
        );
        Ok(())
    }

    pub fn upload_prekeys(
        &self,
        me: &Identity,
        req: crate::proto::UploadPreKeys,
    ) -> Result<PreKeyCount, RelayError> {
        self.check_prekeys(req.signed_prekey.as_ref(), &req.one_time_prekeys)?;
        let mut shard = self.shard(me).lock();
        let keys = shard
            .accounts
            .get(me)
            .and_then(|a| a.registered(req.device_id))
            .and_then(Device::keys)
            .ok_or(RelayError::NotRegistered(req.device_id))?;
        let stored = keys.one_time_prekeys.len();
        if stored + req.one_time_prekeys.len() > self.config.max_prekeys_per_device {
            return Err(RelayError::bad_request(format!(
                "a device stores at most {} one-time prekeys ({stored} stored)",
                self.config.max_prekeys_per_device
            )));
        }
        if let Some(dup) = req
            .one_time_prekeys
            .iter()
            .find(|new| keys.one_time_prekeys.iter().any(|old| old.id == new.id))
        {
            return Err(RelayError::bad_request(format!(
                "one-time prekey id {} is already stored",
                dup.id
            )));
        }
        let count = (stored + req.one_time_prekeys.len()) as u32;
        self.commit(
            &mut shard,
            Kind::PreKeysUploaded(ev::PreKeysUploaded {
                identity: Bytes::copy_from_slice(me),
                device_id: req.device_id,
                signed_prekey: req.signed_prekey,
                one_time_prekeys: req.one_time_prekeys,
            }),
        );
        Ok(PreKeyCount {
            device_id: req.device_id,
            count,
        })
    }

    pub fn prekey_count(&self, me: &Identity, device_id: u32) -> Result<PreKeyCount, RelayError> {
        let shard = self.shard(me).lock();
        let keys = shard
            .accounts
            .get(me)
            .and_then(|a| a.registered(device_id))
            .and_then(Device::keys)
            .ok_or(RelayError::NotRegistered(device_id))?;
        Ok(PreKeyCount {
            device_id,
            count: keys.one_time_prekeys.len() as u32,
        })
    }

    /// Hands out one bundle per device, popping one one-time prekey from each for good.
    pub fn fetch_prekeys(
        &self,
        target: &Identity,
        device_ids: &[u32],
        low_threshold: u32,
    ) -> Result<FetchOutcome, RelayError> {
        if device_ids.len() > self.config.max_devices_per_identity {
            return Err(RelayError::bad_request("too many device ids in one fetch"));
        }
        let mut shard = self.shard(target).lock();
        let account = shard
            .accounts
            .get(target)
            .filter(|a| a.is_registered())
            .ok_or(RelayError::UnknownRecipient)?;
        let wanted: Vec<u32> = if device_ids.is_empty() {
            account
                .devices
                .iter()
                .filter(|(_, d)| d.keys().is_some())
                .map(|(id, _)| *id)
                .collect()
        } else {
            for id in device_ids {
                account
                    .registered(*id)
                    .ok_or(RelayError::UnknownRecipient)?;
            }
            let mut ids = device_ids.to_vec();
            ids.sort_unstable();
            ids.dedup();
            ids
        };
        let mut bundles = Vec::with_capacity(wanted.len());
        let mut taken = Vec::new();
        let mut low = Vec::new();
        let mut exhausted = 0;
        for device_id in wanted {
            let keys = account
                .registered(device_id)
                .and_then(Device::keys)
                .expect("checked above");
            let one_time_prekey = keys.one_time_prekeys.front().cloned();
            match &one_time_prekey {
                Some(key) => {
                    taken.push(ev::TakenPreKey {
                        device_id,
                        prekey_id: key.id,
                    });
                    let remaining = keys.one_time_prekeys.len() as u32 - 1;
                    if remaining < low_threshold {
                        low.push((device_id, remaining));
                    }
                }
                None => exhausted += 1,
            }
            bundles.push(PreKeyBundle {
                device_id,
                registration_id: keys.registration_id,
                identity_key: keys.identity_key.clone(),
                signed_prekey: Some(keys.signed_prekey.clone()),
                one_time_prekey,
            });
        }
        let handed_out = taken.len();
        if !taken.is_empty() {
            self.commit(
                &mut shard,
                Kind::PreKeysTaken(ev::PreKeysTaken {
                    identity: Bytes::copy_from_slice(target),
                    taken,
                }),
            );
        }
        Ok(FetchOutcome {
            bundles: PreKeyBundles { bundles },
            handed_out,
            exhausted,
            low,
        })
    }

    /// True when `identity` has `device_id` registered.
    pub fn is_registered(&self, identity: &Identity, device_id: u32) -> bool {
        self.shard(identity)
            .lock()
            .accounts
            .get(identity)
            .and_then(|a| a.registered(device_id))
            .is_some()
    }

    /// Stores a message (the request already validated by [`validate_send`]). It is pushed to a
    /// subscriber once the caller [`Store::release`]s it, after its record is durable.
    pub fn send(
        &self,
        sender: &Identity,
        req: &Send,
        now_ms: u64,
    ) -> Result<SendOutcome, RelayError> {
        let recipient = identity_field(&req.recipient, "recipient")?;
        let nonce: [u8; NONCE_LEN] = req.sender_nonce[..]
            .try_into()
            .map_err(|_| RelayError::bad_request("sender_nonce must be 8 bytes"))?;
        let mut shard = self.shard(&recipient).lock();
        let account = shard
            .accounts
            .get(&recipient)
            .ok_or(RelayError::UnknownRecipient)?;
        let device = account
            .registered(req.recipient_device)
            .ok_or(RelayError::UnknownRecipient)?;
        let mailbox = &device.mailbox;
        let earlier = mailbox
            .log
            .find_nonce(&nonce, |s| shard.senders.resolve(s).0 == sender);
        if let Some(message_id) = earlier {
            return Ok(SendOutcome {
                message_id,
                duplicate: true,
            });
        }
        let mut ticket_used = Bytes::new();
        let mut contact_added = false;
        if account.accept == Accept::ContactsOnly
            && *sender != recipient
            && !account.contacts.contains(sender)
        {
            if req.ticket.is_empty() {
                return Err(RelayError::Forbidden(
                    "recipient accepts contacts only; a ticket is required",
                ));
            }
            let token: [u8; TICKET_LEN] = req.ticket[..]
                .try_into()
                .map_err(|_| RelayError::TicketInvalid)?;
            match account.tickets.get(&token) {
                Some(t) if t.expires_at_ms > now_ms && t.uses_left > 0 => {}
                _ => return Err(RelayError::TicketInvalid),
            }
            if account.contacts.len() >= self.config.max_contacts {
                return Err(RelayError::MailboxFull("recipient's contact list is full"));
            }
            ticket_used = req.ticket.clone();
            contact_added = true;
        }
        if mailbox.log.len() >= self.config.mailbox_max_messages {
            return Err(RelayError::MailboxFull("message count"));
        }
        if mailbox.log.payload_bytes() + req.payload.len() > self.config.mailbox_max_bytes {
            return Err(RelayError::MailboxFull("bytes"));
        }
        let message_id = mailbox.next_id;
        let device_id = req.recipient_device;
        self.commit(
            &mut shard,
            Kind::MessageStored(ev::MessageStored {
                recipient: req.recipient.clone(),
                device_id,
                message_id,
                sender: Bytes::copy_from_slice(sender),
                sender_device: req.sender_device,
                sender_nonce: req.sender_nonce.clone(),
                sender_signature: req.sender_signature.clone(),
                // Shared with the request: the store copies it into its mailbox.
                payload: req.payload.clone(),
                received_at_ms: now_ms,
                ticket_used,
                contact_added,
            }),
        );
        Ok(SendOutcome {
            message_id,
            duplicate: false,
        })
    }

    /// Makes `push` the mailbox's subscriber from `after_id` on; returns the last id and the
    /// subscriber it replaced, if that was another session.
    pub fn subscribe(
        &self,
        me: &Identity,
        device_id: u32,
        after_id: u64,
        push: PushHandle,
    ) -> Result<(u64, Option<PushHandle>), RelayError> {
        let mut shard = self.shard(me).lock();
        let Shard { accounts, senders } = &mut *shard;
        let device = accounts
            .get_mut(me)
            .and_then(|a| a.registered_mut(device_id))
            .ok_or(RelayError::NotRegistered(device_id))?;
        let mailbox = &mut device.mailbox;
        let previous = mailbox
            .subscriber
            .take()
            .map(|s| s.push)
            .filter(|old| !old.same_session(&push) && !old.is_closed());
        mailbox.subscriber = Some(Subscriber {
            push,
            cursor: after_id,
            in_flight: BTreeSet::new(),
        });
        let last_id = mailbox.last_id();
        pump(
            mailbox,
            senders,
            device_id,
            self.config.max_unacked,
            Pace::OwnRequest,
        );
        Ok((last_id, previous))
    }

    /// Runs `f` on a mailbox of `me` if `push`'s session is its subscriber.
    fn with_subscription(
        &self,
        me: &Identity,
        device_id: u32,
        push: &PushHandle,
        f: impl FnOnce(&mut Mailbox, &SenderTable),
    ) {
        let mut shard = self.shard(me).lock();
        let Shard { accounts, senders } = &mut *shard;
        let mailbox = accounts
            .get_mut(me)
            .and_then(|a| a.devices.get_mut(&device_id))
            .map(|device| &mut device.mailbox)
            .filter(|mailbox| {
                mailbox
                    .subscriber
                    .as_ref()
                    .is_some_and(|s| s.push.same_session(push))
            });
        if let Some(mailbox) = mailbox {
            f(mailbox, senders);
        }
    }

    /// Continues paced deliveries to `push`'s subscription of a mailbox (its queue drained).
    pub fn resume(&self, me: &Identity, device_id: u32, push: &PushHandle) {
        let max_unacked = self.config.max_unacked;
        self.with_subscription(me, device_id, push, |mailbox, senders| {
            pump(mailbox, senders, device_id, max_unacked, Pace::OwnRequest)
        });
    }

    /// Ends `push`'s subscription to a mailbox, if it still holds it.
    pub fn unsubscribe(&self, me: &Identity, device_id: u32, push: &PushHandle) {
        self.with_subscription(me, device_id, push, |mailbox, _| mailbox.subscriber = None);
    }

    pub fn get_message(
        &self,
        me: &Identity,
        device_id: u32,
        message_id: u64,
    ) -> Result<Deliver, RelayError> {
        let shard = self.shard(me).lock();
        let device = shard
            .accounts
            .get(me)
            .and_then(|a| a.registered(device_id))
            .ok_or(RelayError::NotRegistered(device_id))?;
        device
            .mailbox
            .log
            .get(message_id)
            .map(|m| deliver(&m, &shard.senders, device_id))
            .ok_or(RelayError::NotFound)
    }

    /// Deletes acknowledged messages; unknown ids are ignored. Returns how many were deleted.
    pub fn ack(&self, me: &Identity, device_id: u32, ids: &[u64]) -> Result<u32, RelayError> {
        if ids.len() > MAX_ACK_IDS {
            return Err(RelayError::bad_request(format!(
                "at most {MAX_ACK_IDS} ids per ack"
            )));
        }
        let mut shard = self.shard(me).lock();
        let device = shard
            .accounts
            .get(me)
            .and_then(|a| a.registered(device_id))
            .ok_or(RelayError::NotRegistered(device_id))?;
        let mut present: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|id| device.mailbox.log.contains(*id))
            .collect();
        present.sort_unstable();
        present.dedup();
        let deleted = present.len() as u32;
        if !present.is_empty() {
            self.commit(
                &mut shard,
                Kind::MessagesRemoved(ev::MessagesRemoved {
                    identity: Bytes::copy_from_slice(me),
                    device_id,
                    message_ids: present,
                    reason: Removal::Acked as i32,
                }),
            );
        }
        self.pump_device(&mut shard, me, device_id, None, Pace::OwnRequest);
        Ok(deleted)
    }

    fn with_registered_account(
        &self,
        me: &Identity,
    ) -> Result<parking_lot::MutexGuard<'_, Shard>, RelayError> {
        let shard = self.shard(me).lock();
        if !shard.accounts.get(me).is_some_and(Account::is_registered) {
            return Err(RelayError::IdentityNotRegistered);
        }
        Ok(shard)
    }

    pub fn set_policy(&self, me: &Identity, accept: Accept) -> Result<(), RelayError> {
        let mut shard = self.with_registered_account(me)?;
        self.commit(
            &mut shard,
            Kind::PolicySet(ev::PolicySet {
                identity: Bytes::copy_from_slice(me),
                accept: accept as i32,
            }),
        );
        Ok(())
    }

    pub fn add_contact(&self, me: &Identity, contact: &[u8]) -> Result<(), RelayError> {
        let contact = identity_field(contact, "identity")?;
        let mut shard = self.with_registered_account(me)?;
        let account = shard.accounts.get(me).expect("checked registered");
        if account.contacts.contains(&contact) {
            return Ok(());
        }
        if account.contacts.len() >= self.config.max_contacts {
            return Err(RelayError::bad_request(format!(
                "at most {} contacts",
                self.config.max_contacts
            )));
        }
        self.commit(
            &mut shard,
            Kind::ContactAdded(ev::ContactAdded {
                identity: Bytes::copy_from_slice(me),
                contact: Bytes::copy_from_slice(&contact),
            }),
        );
        Ok(())
    }

    pub fn remove_contact(&self, me: &Identity, contact: &[u8]) -> Result<(), RelayError> {
        let contact = identity_field(contact, "identity")?;
        let mut shard = self.with_registered_account(me)?;
        if !shard
            .accounts
            .get(me)
            .expect("checked registered")
            .contacts
            .contains(&contact)
        {
            return Ok(());
        }
        self.commit(
            &mut shard,
            Kind::ContactRemoved(ev::ContactRemoved {
                identity: Bytes::copy_from_slice(me),
                contact: Bytes::copy_from_slice(&contact),
            }),
        );
        Ok(())
    }

    /// Creates a ticket; `ttl_s` 0 means one day, `uses` 0 means one use.
    pub fn create_ticket(
        &self,
        me: &Identity,
        ttl_s: u32,
        uses: u32,
        now_ms: u64,
    ) -> Result<Ticket, RelayError> {
        let max_ticket_ttl_ms = self.config.max_ticket_ttl.as_millis() as u64;
        let ttl_ms = if ttl_s == 0 {
            86_400_000
        } else {
            u64::from(ttl_s) * 1000
        };
        if ttl_ms > max_ticket_ttl_ms {
            return Err(RelayError::bad_request(format!(
                "ttl_s may be at most {}",
                max_ticket_ttl_ms / 1000
            )));
        }
        let uses = uses.max(1);
        if uses > self.config.max_ticket_uses {
            return Err(RelayError::bad_request(format!(
                "uses may be at most {}",
                self.config.max_ticket_uses
            )));
        }
        let mut shard = self.with_registered_account(me)?;
        let live = shard
            .accounts
            .get(me)
            .expect("checked registered")
            .tickets
            .values()
            .filter(|t| t.expires_at_ms > now_ms)
            .count();
        if live >= self.config.max_tickets_per_identity {
            return Err(RelayError::bad_request(format!(
                "at most {} unexpired tickets per identity",
                self.config.max_tickets_per_identity
            )));
        }
        let token: [u8; TICKET_LEN] = rand::random();
        let expires_at_ms = now_ms + ttl_ms;
        self.commit(
            &mut shard,
            Kind::TicketCreated(ev::TicketCreated {
                identity: Bytes::copy_from_slice(me),
                token: Bytes::copy_from_slice(&token),
                expires_at_ms,
                uses,
                created_at_ms: now_ms,
            }),
        );
        Ok(Ticket {
            token: Bytes::copy_from_slice(&token),
            expires_at_ms,
            relay_pubkey: Bytes::new(),
            identity: Bytes::copy_from_slice(me),
            uses,
        })
    }

    /// Removes messages received at or before `cutoff_ms`; returns how many.
    /// In the same pass, counts what stays stored (for the mailbox gauges).
    pub fn expire(&self, cutoff_ms: u64) -> Expiry {
        let mut expiry = Expiry::default();
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            let mut removals = Vec::new();
            for (identity, account) in shard.accounts.iter_mut() {
                for (device_id, device) in account.devices.iter_mut() {
                    let mailbox = &mut device.mailbox;
                    expiry.bytes_trimmed += mailbox.log.trim();
                    // Ids are assigned in receive order, so the expired ones are a prefix.
                    let mut expired_bytes = 0;
                    let ids: Vec<u64> = mailbox
                        .log
                        .iter()
                        .take_while(|m| m.received_at_ms <= cutoff_ms)
                        .map(|m| {
                            expired_bytes += m.payload.len();
                            m.id
                        })
                        .collect();
                    expiry.messages_left += mailbox.log.len() - ids.len();
                    expiry.payload_bytes_left += mailbox.log.payload_bytes() - expired_bytes;
                    if !ids.is_empty() {
                        removals.push((*identity, *device_id, ids));
                    }
                }
            }
            for (identity, device_id, ids) in removals {
                expiry.expired += ids.len();
                self.commit(
                    &mut shard,
                    Kind::MessagesRemoved(ev::MessagesRemoved {
                        identity: Bytes::copy_from_slice(&identity),
                        device_id,
                        message_ids: ids,
                        reason: Removal::Expired as i32,
                    }),
                );
                self.pump_device(&mut shard, &identity, device_id, None, Pace::Other);
            }
        }
        expiry
    }

    pub fn stats(&self) -> StoreStats {
        let mut stats = StoreStats::default();
        for shard in self.shards.iter() {
            let shard = shard.lock();
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
}

/// An identity named in a request field, or `BAD_REQUEST` naming the field.
pub fn identity_field(bytes: &[u8], field: &str) -> Result<Identity, RelayError> {
    bytes
        .try_into()
        .map_err(|_| RelayError::bad_request(format!("{field} must be a 33-byte key")))
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
            }));
        }
        push(Kind::MailboxState(ev::MailboxState {
            identity: id(),
            device_id,
            next_id: device.mailbox.next_id,
        }));
        for m in device.mailbox.log.iter() {
            let d = unhashed_deliver(&m, senders, device_id);
            push(Kind::MessageStored(ev::MessageStored {
                recipient: id(),
                device_id,
                message_id: d.message_id,
                sender: d.sender,
                sender_device: d.sender_device,
                sender_nonce: d.sender_nonce,
                sender_signature: d.sender_signature,
                payload: d.payload,
                received_at_ms: d.received_at_ms,
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
}

/// Checks a `Send` before any lock is taken: sizes, lengths and the payload hash.
pub fn validate_send(req: &Send, max_payload_len: usize) -> Result<(), RelayError> {
    if req.payload.len() > max_payload_len {
        return Err(RelayError::PayloadTooLarge {
            len: req.payload.len(),
            max: max_payload_len,
        });
    }
    identity_field(&req.recipient, "recipient")?;
    if req.recipient_device == 0 {
        return Err(RelayError::bad_request(
            "recipient_device must be at least 1",
        ));
    }
    if req.sender_nonce.len() != NONCE_LEN {
        return Err(RelayError::bad_request("sender_nonce must be 8 bytes"));
    }
    if req.sender_signature.len() != SIGNATURE_LEN {
        return Err(RelayError::bad_request("sender_signature must be 64 bytes"));
    }
    if !req.ticket.is_empty() && req.ticket.len() != TICKET_LEN {
        return Err(RelayError::TicketInvalid);
    }
    if req.payload_hash.len() != 32 || req.payload_hash[..] != sha256(&[&req.payload])[..] {
        return Err(RelayError::bad_request(
            "payload_hash is not SHA-256 of the payload",
        ));
    }
    Ok(())
}

/// Who is pumping a mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pace {
    /// The subscriber's own connection, which cannot drain its queue meanwhile.
    OwnRequest,
    /// Another session or a background task, while the subscriber's connection drains freely.
    Other,
}

/// Pushes stored messages past the subscriber's cursor, in id order, while its window
/// (`max_unacked` deliveries, half the session's outbound queue) allows.
/// A refused push (session gone or too slow) ends the subscription; the messages stay stored.
fn pump(
    mailbox: &mut Mailbox,
    senders: &SenderTable,
    device_id: u32,
    max_unacked: usize,
    pace: Pace,
) {
    let Mailbox {
        log,
        deliverable_up_to,
        subscriber,
        ..
    } = mailbox;
    let Some(sub) = subscriber.as_mut() else {
        return;
    };
    let mut delivered = 0u64;
    let mut refused = false;
    for message in log.iter_from(sub.cursor.saturating_add(1)) {
        if sub.in_flight.len() >= max_unacked || message.id > *deliverable_up_to {
            break;
        }
        let frame = Frame::new(0, Body::Deliver(deliver(&message, senders, device_id)));
        // Pumping from the subscriber's own request: its queue cannot drain until the request
        // returns, so stop at half of it and continue when it has drained; once paused, every
        // pump waits for that resume. Only a peer that stops reading while live messages keep
        // coming reaches the hard limit (SLOW_CONSUMER).
        if (pace == Pace::OwnRequest || sub.push.resume_pending())
            && !sub.in_flight.is_empty()
            && sub.push.queued_bytes() + prost::Message::encoded_len(&frame) > sub.push.limit() / 2
        {
            sub.push.request_resume();
            break;
        }
        if sub.push.push(frame).is_err() {
            refused = true;
            break;
        }
        sub.cursor = message.id;
        sub.in_flight.insert(message.id);
        delivered += 1;
    }
    if refused {
        *subscriber = None;
    }
    if delivered > 0 {
        metrics::counter!(crate::metrics::MESSAGES_DELIVERED).increment(delivered);
    }
}

/// A `REPLACED` notice for a subscription taken over by another session.
pub fn replaced_notice(device_id: u32) -> Frame {
    Frame::error(
        0,
        ErrorCode::Replaced,
        format!("another session subscribed to device {device_id}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::keys::KeyPair;
    use crate::net::{push_channel, Push};

    fn store(config: &Config) -> Store {
        let config = Config {
            store_shards: 4,
            ..config.clone()
        };
        Store::new(&config, Arc::new(NoJournal))
    }

    fn identity() -> Identity {
        *KeyPair::generate().public().as_bytes()
    }

    fn register(store: &Store, who: &Identity) {
        let request = crate::proto::Register {
            device_id: 1,
            registration_id: 1,
            identity_key: Bytes::from_static(&[1; 33]),
            signed_prekey: Some(SignedPreKey {
                id: 1,
                public_key: Bytes::from_static(&[2; 33]),
                signature: Bytes::from_static(&[3; 64]),
            }),
            one_time_prekeys: Vec::new(),
        };
        store.register(who, request).unwrap();
    }

    fn message(to: &Identity, nonce: u8, len: usize) -> Send {
        let payload = Bytes::from(vec![nonce; len]);
        Send {
            recipient: Bytes::copy_from_slice(to),
            recipient_device: 1,
            sender_device: 1,
            sender_nonce: Bytes::from(vec![nonce; NONCE_LEN]),
            payload_hash: Bytes::copy_from_slice(&sha256(&[&payload])),
            sender_signature: Bytes::from_static(&[0; SIGNATURE_LEN]),
            payload,
            ticket: Bytes::new(),
        }
    }

    fn delivered(rx: &mut crate::net::PushReceiver) -> Vec<u64> {
        let mut ids = Vec::new();
        while let Some(push) = rx.try_recv() {
            match push {
                Push::Frame(frame) => match frame.body {
                    Some(Body::Deliver(d)) => ids.push(d.message_id),
                    other => panic!("unexpected push {other:?}"),
                },
                Push::SlowConsumer => panic!("slow consumer"),
            }
        }
        ids
    }

    #[test]
    fn a_message_is_pushed_only_once_released() {
        let store = store(&Config::default());
        let (alice, bob) = (identity(), identity());
        register(&store, &alice);
        register(&store, &bob);
        let (push, mut rx) = push_channel(1 << 20);
        store.subscribe(&bob, 1, 0, push).unwrap();
        let sent = store.send(&alice, &message(&bob, 1, 10), 0).unwrap();
        assert!(delivered(&mut rx).is_empty(), "not durable yet, not pushed");
        store.release(&bob, 1, sent.message_id);
        assert_eq!(delivered(&mut rx), vec![sent.message_id]);
    }

    #[test]
    fn expiry_removes_the_old_prefix_and_counts_what_stays() {
        let store = store(&Config::default());
        let (alice, bob) = (identity(), identity());
        register(&store, &alice);
        register(&store, &bob);
        for (n, at) in [(1u8, 0u64), (2, 10), (3, 20)] {
            store.send(&alice, &message(&bob, n, 10), at).unwrap();
        }
        let expiry = store.expire(10);
        assert_eq!(
            (
                expiry.expired,
                expiry.messages_left,
                expiry.payload_bytes_left
            ),
            (2, 1, 10)
        );
        assert!(matches!(
            store.get_message(&bob, 1, 2),
            Err(RelayError::NotFound)
        ));
        assert!(store.get_message(&bob, 1, 3).is_ok());
    }

    #[test]
    fn stored_messages_written_with_their_payload_hash_still_replay() {
        use prost::Message;
        let store = store(&Config::default());
        let (alice, bob) = (identity(), identity());
        register(&store, &bob);
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
        store
            .replay(&Event {
                kind: Some(Kind::MessageStored(decoded)),
            })
            .unwrap();
        let delivered = store.get_message(&bob, 1, 7).unwrap();
        assert_eq!(&delivered.payload[..], b"old");
        assert_eq!(&delivered.payload_hash[..], &sha256(&[b"old"])[..]);
    }

    fn interned_senders(store: &Store) -> usize {
        store.shards.iter().map(|s| s.lock().senders.len()).sum()
    }

    #[test]
    fn senders_are_interned_while_their_messages_are_stored() {
        let store = store(&Config::default());
        let (alice, carol, bob) = (identity(), identity(), identity());
        for who in [&alice, &carol, &bob] {
            register(&store, who);
        }
        let first = store.send(&alice, &message(&bob, 1, 10), 0).unwrap();
        store.send(&alice, &message(&bob, 2, 10), 0).unwrap();
        // The same nonce from another sender is another message.
        let other = store.send(&carol, &message(&bob, 1, 10), 0).unwrap();
        assert!(!other.duplicate && other.message_id != first.message_id);
        let retry = store.send(&alice, &message(&bob, 1, 10), 0).unwrap();
        assert_eq!(
            (retry.message_id, retry.duplicate),
            (first.message_id, true)
        );
        assert_eq!(interned_senders(&store), 2);
        let delivered = store.get_message(&bob, 1, other.message_id).unwrap();
        assert_eq!(&delivered.sender[..], &carol[..]);
        assert_eq!(
            &delivered.payload_hash[..],
            &sha256(&[&delivered.payload])[..],
            "the hash is recomputed at delivery"
        );
        store.ack(&bob, 1, &[other.message_id]).unwrap();
        assert_eq!(interned_senders(&store), 1, "carol has nothing stored");
        store.unregister(&bob, 1).unwrap();
        assert_eq!(interned_senders(&store), 0);
    }

    #[test]
    fn a_paused_subscription_is_not_overrun_by_live_sends() {
        let config = Config::default();
        let store = store(&config);
        let (alice, bob) = (identity(), identity());
        register(&store, &alice);
        register(&store, &bob);
        let limit = 64 * 1024;
        for n in 0..20u8 {
            let sent = store.send(&alice, &message(&bob, n, 10_000), 0).unwrap();
            store.release(&bob, 1, sent.message_id);
        }
        let (push, mut rx) = push_channel(limit);
        store.subscribe(&bob, 1, 0, push.clone()).unwrap();
        assert!(push.resume_pending(), "the backlog is paced");
        let paced = push.queued_bytes();
        assert!(paced <= limit / 2 + 11_000, "{paced}");
        // A live message while paused must not push the rest of the window at once.
        let live = store.send(&alice, &message(&bob, 99, 10_000), 0).unwrap();
        store.release(&bob, 1, live.message_id);
        assert!(push.queued_bytes() <= limit / 2 + 11_000);
        // Draining and resuming delivers everything, in order, without an overflow.
        let mut ids = Vec::new();
        for _ in 0..50 {
            ids.extend(delivered(&mut rx));
            if rx.take_resume() {
                store.resume(&bob, 1, &push);
            }
        }
        assert_eq!(ids, (1..=21).collect::<Vec<u64>>());
    }
}
