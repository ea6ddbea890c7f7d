//! The accounts and mailboxes of one shard as they are held in memory: what [`super::apply`]
//! changes and the operations read.
use super::*;
#[derive(Debug, Default)]
pub(super) struct Mailbox {
    /// Next id to assign; never goes back, even across unregistration.
    pub(super) next_id: u64,
    /// The stored messages; their nonces answer idempotent retries.
    pub(super) log: MessageLog,
    /// (id, lsn) of messages applied in this run whose records are not yet known durable,
    /// oldest first.
    pub(super) unconfirmed: VecDeque<(u64, u64)>,
}

impl Mailbox {
    pub(super) fn new(next_id: u64) -> Self {
        Self {
            next_id,
            ..Self::default()
        }
    }

    /// Drops the entries that are durable by now; returns the highest id a read may show.
    pub(super) fn visible_up_to(&mut self, durable: u64) -> u64 {
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

    pub(super) fn remove(
        &mut self,
        id: u64,
        senders: &mut SenderTable,
        counters: &Counters,
    ) -> bool {
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

    pub(super) fn clear(&mut self, senders: &mut SenderTable, counters: &Counters) {
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
pub(super) struct DeviceKeys {
    pub(super) registration_id: u32,
    pub(super) identity_key: Bytes,
    pub(super) signed_prekey: SignedPreKey,
    pub(super) one_time_prekeys: VecDeque<PreKey>,
    /// `PreKeysLow` was announced since the count last rose to the threshold (not durable:
    /// after a restart it may be announced once more).
    pub(super) low_announced: bool,
}

#[derive(Debug)]
pub(super) enum DeviceState {
    Registered(DeviceKeys),
    /// Unregistered; kept so the mailbox's ids are never reused if the device id comes back.
    Retired,
}

#[derive(Debug)]
pub(super) struct Device {
    pub(super) state: DeviceState,
    pub(super) mailbox: Mailbox,
}

impl Device {
    pub(super) fn keys(&self) -> Option<&DeviceKeys> {
        match &self.state {
            DeviceState::Registered(keys) => Some(keys),
            DeviceState::Retired => None,
        }
    }

    pub(super) fn keys_mut(&mut self) -> Option<&mut DeviceKeys> {
        match &mut self.state {
            DeviceState::Registered(keys) => Some(keys),
            DeviceState::Retired => None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct TicketState {
    pub(super) expires_at_ms: u64,
    pub(super) uses_left: u32,
}

#[derive(Debug)]
pub(super) struct Account {
    pub(super) devices: BTreeMap<u32, Device>,
    pub(super) accept: Accept,
    pub(super) contacts: AHashSet<Identity>,
    pub(super) tickets: HashMap<[u8; TICKET_LEN], TicketState>,
    /// Last time the identity was in use; idle accounts expire.
    pub(super) last_seen_ms: u64,
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
    pub(super) fn durable_copy(&self) -> Account {
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

    pub(super) fn registered(&self, device_id: u32) -> Option<&Device> {
        self.devices.get(&device_id).filter(|d| d.keys().is_some())
    }

    pub(super) fn registered_mut(&mut self, device_id: u32) -> Option<&mut Device> {
        self.devices
            .get_mut(&device_id)
            .filter(|d| d.keys().is_some())
    }

    pub(super) fn active_devices(&self) -> usize {
        self.devices.values().filter(|d| d.keys().is_some()).count()
    }

    pub(super) fn is_registered(&self) -> bool {
        self.active_devices() > 0
    }

    pub(super) fn stored_bytes(&self) -> usize {
        self.devices
            .values()
            .map(|d| d.mailbox.log.payload_bytes())
            .sum()
    }

    /// The lowest id a mailbox created after this account's removal may start at.
    pub(super) fn id_floor(&self) -> u64 {
        self.devices
            .values()
            .map(|d| d.mailbox.next_id)
            .max()
            .unwrap_or(1)
    }
}
