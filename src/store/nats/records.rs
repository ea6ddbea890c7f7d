//! What the JetStream backend writes into its buckets and its events stream: protobuf records
//! (prost derives, no `.proto` file: they never leave the cluster) and their names.
//!
//! * Account record (bucket `<prefix>_accounts`, key `a.<identity hex>`): device slots with
//!   their mailbox usage, policy, contacts, tickets, last use. Every change to an account is one
//!   compare-and-set of this record, so limits that span devices hold across relays.
//! * Device keys record (bucket `<prefix>_keys`, key `k.<identity hex>.<device>.<generation>`):
//!   registration id, identity key, signed prekey and the one-time prekeys, oldest first. A
//!   fetch pops a key by compare-and-set of this record, so a key goes out once.
//! * Identity counter (bucket `<prefix>_accounts`, key `n.identities`).
//! * Events (stream `<PREFIX>_EVENTS`): removals, closed mailboxes and `PreKeysLow` notices
//!   for the other relays' sessions.

use bytes::Bytes;

use crate::store::{Identity, MailboxId};
use botd_protocol::proto::{PreKey, SignedPreKey};

/// A device id slot of an account: registered now, or retired (kept so the device id budget
/// holds).
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeviceSlot {
    #[prost(uint32, tag = "1")]
    pub device_id: u32,
    #[prost(bool, tag = "2")]
    pub registered: bool,
    /// Names the device keys record of the current registration.
    #[prost(uint64, tag = "3")]
    pub keys_generation: u64,
    /// Tells this registration's mailbox from an earlier one of the same device id: messages
    /// carry it, and those of another generation are not part of the mailbox.
    #[prost(uint64, tag = "4")]
    pub mailbox_generation: u64,
    /// Messages and payload bytes stored in the mailbox.
    #[prost(uint64, tag = "5")]
    pub messages: u64,
    #[prost(uint64, tag = "6")]
    pub bytes: u64,
    /// The highest id of a message that left the mailbox (acked, expired, or dropped with an
    /// earlier registration), so `last_id` still counts it once the message is gone.
    #[prost(uint64, tag = "7")]
    pub last_removed_id: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TicketRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub token: Vec<u8>,
    #[prost(uint64, tag = "2")]
    pub expires_at_ms: u64,
    #[prost(uint32, tag = "3")]
    pub uses_left: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AccountRecord {
    /// `Accept` as its wire value.
    #[prost(int32, tag = "1")]
    pub accept: i32,
    /// Sorted by device id.
    #[prost(message, repeated, tag = "2")]
    pub devices: Vec<DeviceSlot>,
    /// 33 bytes each, sorted.
    #[prost(bytes = "vec", repeated, tag = "3")]
    pub contacts: Vec<Vec<u8>>,
    #[prost(message, repeated, tag = "4")]
    pub tickets: Vec<TicketRecord>,
    #[prost(uint64, tag = "5")]
    pub last_seen_ms: u64,
}

impl AccountRecord {
    pub fn slot(&self, device: u32) -> Option<&DeviceSlot> {
        self.devices
            .binary_search_by_key(&device, |s| s.device_id)
            .ok()
            .map(|i| &self.devices[i])
    }

    pub fn slot_mut(&mut self, device: u32) -> Option<&mut DeviceSlot> {
        self.devices
            .binary_search_by_key(&device, |s| s.device_id)
            .ok()
            .map(|i| &mut self.devices[i])
    }

    /// The slot of `device`, created (retired, empty) if absent.
    pub fn slot_entry(&mut self, device: u32) -> &mut DeviceSlot {
        let at = match self.devices.binary_search_by_key(&device, |s| s.device_id) {
            Ok(at) => at,
            Err(at) => {
                self.devices.insert(
                    at,
                    DeviceSlot {
                        device_id: device,
                        ..DeviceSlot::default()
                    },
                );
                at
            }
        };
        &mut self.devices[at]
    }

    pub fn registered(&self, device: u32) -> Option<&DeviceSlot> {
        self.slot(device).filter(|s| s.registered)
    }

    pub fn active_devices(&self) -> usize {
        self.devices.iter().filter(|s| s.registered).count()
    }

    pub fn is_registered(&self) -> bool {
        self.devices.iter().any(|s| s.registered)
    }

    pub fn stored_bytes(&self) -> u64 {
        self.devices.iter().map(|s| s.bytes).sum()
    }

    pub fn has_contact(&self, contact: &Identity) -> bool {
        self.contacts
            .binary_search_by(|c| c.as_slice().cmp(contact.as_slice()))
            .is_ok()
    }

    /// Adds a contact; false if it was there.
    pub fn add_contact(&mut self, contact: &Identity) -> bool {
        match self
            .contacts
            .binary_search_by(|c| c.as_slice().cmp(contact.as_slice()))
        {
            Ok(_) => false,
            Err(at) => {
                self.contacts.insert(at, contact.to_vec());
                true
            }
        }
    }

    /// Removes a contact; false if it was absent.
    pub fn remove_contact(&mut self, contact: &Identity) -> bool {
        match self
            .contacts
            .binary_search_by(|c| c.as_slice().cmp(contact.as_slice()))
        {
            Ok(at) => {
                self.contacts.remove(at);
                true
            }
            Err(_) => false,
        }
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DeviceKeys {
    #[prost(uint32, tag = "1")]
    pub registration_id: u32,
    #[prost(bytes = "bytes", tag = "2")]
    pub identity_key: Bytes,
    #[prost(message, optional, tag = "3")]
    pub signed_prekey: Option<SignedPreKey>,
    /// Oldest first.
    #[prost(message, repeated, tag = "4")]
    pub one_time_prekeys: Vec<PreKey>,
    /// `PreKeysLow` was announced since the count last rose to the threshold.
    #[prost(bool, tag = "5")]
    pub low_announced: bool,
}

/// What an event tells the other relays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum EventKind {
    Unknown = 0,
    Removed = 1,
    Closed = 2,
    PreKeysLow = 3,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EventRecord {
    /// The relay instance that published it (it handled the event itself).
    #[prost(uint64, tag = "1")]
    pub origin: u64,
    #[prost(enumeration = "EventKind", tag = "2")]
    pub kind: i32,
    #[prost(bytes = "vec", tag = "3")]
    pub identity: Vec<u8>,
    #[prost(uint32, tag = "4")]
    pub device: u32,
    /// `Removed`: the message ids.
    #[prost(uint64, repeated, tag = "5")]
    pub ids: Vec<u64>,
    /// `PreKeysLow`: keys left.
    #[prost(uint32, tag = "6")]
    pub count: u32,
}

impl EventRecord {
    pub fn mailbox(&self) -> Option<MailboxId> {
        Some(MailboxId {
            identity: self.identity.as_slice().try_into().ok()?,
            device: self.device,
        })
    }
}

/// Decodes a record; `None` for bytes that are not one (never trusted blindly: the cluster
/// may be shared with other software).
pub fn decode<T: prost::Message + Default>(bytes: &[u8]) -> Option<T> {
    T::decode(bytes).ok()
}

pub fn encode<T: prost::Message>(record: &T) -> Bytes {
    Bytes::from(record.encode_to_vec())
}

/// Names of everything the backend keeps on the cluster, from `nats_prefix`.
#[derive(Debug, Clone)]
pub struct Names {
    /// The stream holding every mailbox.
    pub messages_stream: String,
    pub events_stream: String,
    pub accounts_bucket: String,
    pub keys_bucket: String,
    /// `<prefix>.m`: message subjects are `<prefix>.m.<identity hex>.<device>.<sender hex><nonce hex>`.
    message_root: String,
    /// `<prefix>.e`: event subjects are `<prefix>.e.<kind>`.
    pub event_root: String,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        let upper = prefix.to_ascii_uppercase().replace('-', "_");
        let lower = prefix.to_ascii_lowercase();
        Self {
            messages_stream: format!("{upper}_MESSAGES"),
            events_stream: format!("{upper}_EVENTS"),
            accounts_bucket: format!("{lower}_accounts"),
            keys_bucket: format!("{lower}_keys"),
            message_root: format!("{lower}.m"),
            event_root: format!("{lower}.e"),
        }
    }

    /// Every message subject.
    pub fn all_messages(&self) -> String {
        format!("{}.>", self.message_root)
    }

    /// The subjects of one mailbox.
    pub fn mailbox_filter(&self, mailbox: &MailboxId) -> String {
        format!(
            "{}.{}.{}.*",
            self.message_root,
            hex::encode(mailbox.identity),
            mailbox.device
        )
    }

    /// The subject of the message `sender` sent with `nonce` into `mailbox`: one message at
    /// most per subject, which makes the idempotency check part of the append.
    pub fn message_subject(
        &self,
        mailbox: &MailboxId,
        sender: &Identity,
        nonce: &[u8; crate::store::NONCE_LEN],
    ) -> String {
        format!(
            "{}.{}.{}.{}{}",
            self.message_root,
            hex::encode(mailbox.identity),
            mailbox.device,
            hex::encode(sender),
            hex::encode(nonce)
        )
    }

    /// Mailbox, sender and nonce of a message subject.
    pub fn parse_message_subject(
        &self,
        subject: &str,
    ) -> Option<(MailboxId, Identity, [u8; crate::store::NONCE_LEN])> {
        let rest = subject
            .strip_prefix(&self.message_root)?
            .strip_prefix('.')?;
        let mut parts = rest.split('.');
        let identity = parts.next()?;
        let device = parts.next()?;
        let tail = parts.next()?;
        if parts.next().is_some() {
            return None;
        }
        let mut id = [0u8; botd_protocol::keys::PUBLIC_KEY_LEN];
        hex::decode_to_slice(identity, &mut id).ok()?;
        let device: u32 = device.parse().ok()?;
        if tail.len() != 2 * (botd_protocol::keys::PUBLIC_KEY_LEN + crate::store::NONCE_LEN) {
            return None;
        }
        let (sender_hex, nonce_hex) = tail.split_at(2 * botd_protocol::keys::PUBLIC_KEY_LEN);
        let mut sender = [0u8; botd_protocol::keys::PUBLIC_KEY_LEN];
        hex::decode_to_slice(sender_hex, &mut sender).ok()?;
        let mut nonce = [0u8; crate::store::NONCE_LEN];
        hex::decode_to_slice(nonce_hex, &mut nonce).ok()?;
        Some((
            MailboxId {
                identity: id,
                device,
            },
            sender,
            nonce,
        ))
    }

    pub fn event_subject(&self, kind: EventKind) -> String {
        format!("{}.{}", self.event_root, kind as i32)
    }
}

pub fn account_key(identity: &Identity) -> String {
    format!("a.{}", hex::encode(identity))
}

pub fn keys_key(identity: &Identity, device: u32, generation: u64) -> String {
    format!("k.{}.{device}.{generation:016x}", hex::encode(identity))
}

pub const IDENTITIES_KEY: &str = "n.identities";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_subjects_round_trip() {
        let names = Names::new("Botd-x");
        let mailbox = MailboxId {
            identity: [2; 33],
            device: 7,
        };
        let subject = names.message_subject(&mailbox, &[3; 33], &[9; 8]);
        assert!(subject.starts_with("botd-x.m."));
        let (parsed, sender, nonce) = names.parse_message_subject(&subject).unwrap();
        assert_eq!((parsed, sender, nonce), (mailbox, [3; 33], [9; 8]));
        assert!(names.parse_message_subject("botd-x.m.zz.1.00").is_none());
        assert_eq!(names.messages_stream, "BOTD_X_MESSAGES");
        let filter = names.mailbox_filter(&mailbox);
        assert_eq!(&subject[..filter.len() - 1], &filter[..filter.len() - 1]);
    }

    #[test]
    fn contacts_stay_sorted_and_unique() {
        let mut account = AccountRecord::default();
        assert!(account.add_contact(&[5; 33]));
        assert!(account.add_contact(&[1; 33]));
        assert!(!account.add_contact(&[5; 33]));
        assert!(account.has_contact(&[1; 33]));
        assert!(account.remove_contact(&[1; 33]));
        assert!(!account.has_contact(&[1; 33]));
        let decoded: AccountRecord = decode(&encode(&account)).unwrap();
        assert_eq!(decoded, account);
    }
}
