//! What the JetStream backend writes on the cluster: protobuf records (prost derives, no
//! `.proto` file: they never leave the cluster) and the envelope of a stored message. Every
//! record is small and of fixed shape: nothing grows with contacts, tickets or messages.

use bytes::Bytes;
use prost::Message as _;

use crate::store::{Message, NONCE_LEN};
use botd_protocol::keys::{sha256, PUBLIC_KEY_LEN, SIGNATURE_LEN};
use botd_protocol::proto::SignedPreKey;

/// A device id an account has used: registered now, or retired (kept so that the device id
/// budget holds and a mailbox token is never reused).
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeviceSlot {
    #[prost(uint32, tag = "1")]
    pub device_id: u32,
    #[prost(bool, tag = "2")]
    pub registered: bool,
    /// Names the keys record and the one-time prekeys of the current registration.
    #[prost(uint64, tag = "3")]
    pub keys_generation: u64,
    /// Names the mailbox of the current registration (its token, `names::MailboxKey`).
    #[prost(uint64, tag = "4")]
    pub mailbox_generation: u64,
    /// The highest id of the device's earlier registrations' mailboxes: `last_id` of a
    /// mailbox counts the ids its device ever had.
    #[prost(uint64, tag = "5")]
    pub id_floor: u64,
}

/// One account (`<p>.a.i.<identity>`): changed by compare-and-set, by registrations, policy,
/// contacts and the use a session records, never by a message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AccountRecord {
    /// `Accept` as its wire value.
    #[prost(int32, tag = "1")]
    pub accept: i32,
    /// Sorted by device id; at most 4 × `max_devices_per_identity`.
    #[prost(message, repeated, tag = "2")]
    pub devices: Vec<DeviceSlot>,
    /// How many contact records the account has.
    #[prost(uint32, tag = "3")]
    pub contacts: u32,
    #[prost(uint64, tag = "4")]
    pub last_seen_ms: u64,
}

impl AccountRecord {
    pub fn slot(&self, device: u32) -> Option<&DeviceSlot> {
        self.devices
            .binary_search_by_key(&device, |s| s.device_id)
            .ok()
            .map(|i| &self.devices[i])
    }

    /// The slot of `device`, created (retired) if absent.
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
}

/// The bundle part of a registration (`<p>.a.k.<identity>.<device>.<generation>`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeysRecord {
    #[prost(uint32, tag = "1")]
    pub registration_id: u32,
    #[prost(bytes = "bytes", tag = "2")]
    pub identity_key: Bytes,
    #[prost(message, optional, tag = "3")]
    pub signed_prekey: Option<SignedPreKey>,
    /// `PreKeysLow` was announced since the count last rose to the threshold: set by the one
    /// fetch that wins the compare-and-set, so it is announced once per crossing.
    #[prost(bool, tag = "4")]
    pub low_announced: bool,
}

/// A ticket (`<p>.a.t.<identity>.<token>`), removed by the server once expired.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TicketRecord {
    #[prost(uint64, tag = "1")]
    pub expires_at_ms: u64,
    #[prost(uint32, tag = "2")]
    pub uses_left: u32,
}

/// The highest id that left a mailbox (`<p>.a.l.<mailbox>`), so that `last_id` still counts
/// it once the mailbox is empty.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LastRemoved {
    #[prost(uint64, tag = "1")]
    pub id: u64,
}

/// What relays tell each other on `<p>.acct`: an account changed (drop what is cached of
/// it), or a device ran low on one-time prekeys.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AccountNotice {
    #[prost(bytes = "vec", tag = "1")]
    pub identity: Vec<u8>,
    /// `PreKeysLow`: the device and the keys it has left.
    #[prost(uint32, optional, tag = "2")]
    pub low_device: Option<u32>,
    #[prost(uint32, tag = "3")]
    pub low_count: u32,
    /// The sequence of the account record the change wrote (0: not an account change).
    #[prost(uint64, tag = "4")]
    pub seq: u64,
}

/// Removals from one mailbox, on `<p>.gone.<mailbox>`; no ids: the mailbox is closed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GoneNotice {
    #[prost(uint64, repeated, tag = "1")]
    pub ids: Vec<u64>,
    #[prost(bool, tag = "2")]
    pub closed: bool,
}

/// A stored message, as the body of its stream message (the id is the stream sequence and
/// the payload hash is computed again when it is read).
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredMessage {
    #[prost(bytes = "vec", tag = "1")]
    pub sender: Vec<u8>,
    #[prost(uint32, tag = "2")]
    pub sender_device: u32,
    #[prost(fixed64, tag = "3")]
    pub nonce: u64,
    #[prost(bytes = "vec", tag = "4")]
    pub signature: Vec<u8>,
    #[prost(uint64, tag = "5")]
    pub received_at_ms: u64,
    #[prost(bytes = "bytes", tag = "6")]
    pub payload: Bytes,
}

impl StoredMessage {
    pub fn of(message: &crate::store::NewMessage) -> Self {
        Self {
            sender: message.sender.to_vec(),
            sender_device: message.sender_device,
            nonce: u64::from_be_bytes(message.nonce),
            signature: message.signature.to_vec(),
            received_at_ms: message.received_at_ms,
            payload: message.payload.clone(),
        }
    }

    /// The message stored under `id`; `None` for bytes that are not one (the cluster may be
    /// shared with other software: nothing read from it is trusted blindly).
    pub fn decode_message(body: Bytes, id: u64) -> Option<Message> {
        let stored = StoredMessage::decode(body).ok()?;
        let sender: [u8; PUBLIC_KEY_LEN] = stored.sender.as_slice().try_into().ok()?;
        let signature: [u8; SIGNATURE_LEN] = stored.signature.as_slice().try_into().ok()?;
        let nonce: [u8; NONCE_LEN] = stored.nonce.to_be_bytes();
        Some(Message {
            id,
            sender,
            sender_device: stored.sender_device,
            nonce,
            payload_hash: sha256(&[&stored.payload]),
            signature,
            payload: stored.payload,
            received_at_ms: stored.received_at_ms,
        })
    }
}

/// Decodes a record; `None` for bytes that are not one.
pub fn decode<T: prost::Message + Default>(bytes: &[u8]) -> Option<T> {
    T::decode(bytes).ok()
}

pub fn encode<T: prost::Message>(record: &T) -> Bytes {
    Bytes::from(record.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MailboxId, NewMessage};

    #[test]
    fn a_stored_message_round_trips_with_its_hash() {
        let new = NewMessage {
            to: MailboxId {
                identity: [3; 33],
                device: 1,
            },
            sender: [2; 33],
            sender_device: 9,
            nonce: [1, 2, 3, 4, 5, 6, 7, 8],
            payload_hash: sha256(&[b"hello"]),
            signature: [7; 64],
            payload: Bytes::from_static(b"hello"),
            ticket: None,
            received_at_ms: 1_700_000_000_123,
            bad_signature: None,
        };
        let body = encode(&StoredMessage::of(&new));
        let message = StoredMessage::decode_message(body, 42).expect("decodes");
        assert_eq!(message.id, 42);
        assert_eq!(message.sender, new.sender);
        assert_eq!(message.sender_device, 9);
        assert_eq!(message.nonce, new.nonce);
        assert_eq!(message.payload_hash, new.payload_hash);
        assert_eq!(message.signature, new.signature);
        assert_eq!(message.received_at_ms, new.received_at_ms);
        assert!(StoredMessage::decode_message(Bytes::from_static(b"\x0a\x01x"), 1).is_none());
    }

    #[test]
    fn slots_stay_sorted() {
        let mut account = AccountRecord::default();
        account.slot_entry(5).registered = true;
        account.slot_entry(2);
        account.slot_entry(9).registered = true;
        let ids: Vec<u32> = account.devices.iter().map(|s| s.device_id).collect();
        assert_eq!(ids, [2, 5, 9]);
        assert_eq!(account.active_devices(), 2);
        assert!(account.registered(2).is_none());
        assert!(account.registered(5).is_some());
    }
}
