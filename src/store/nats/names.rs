//! The names of everything the JetStream backend keeps on the cluster, from `nats_prefix`:
//! streams, the subjects of records and messages, and the core subjects relays talk on.
//!
//! | what | stream | subject |
//! | --- | --- | --- |
//! | messages of one mailbox | `<P>_M<k>` (`nats_streams` of them) | `<p>.m<k>.<mailbox>` |
//! | the same, republished live | (core) | `<p>.live.m<k>.<mailbox>` |
//! | account (devices, policy, contact count, last use) | `<P>_ACCOUNTS` | `<p>.a.i.<identity>` |
//! | a registration's keys (bundle) | `<P>_ACCOUNTS` | `<p>.a.k.<identity>.<device>.<generation>` |
//! | a contact | `<P>_ACCOUNTS` | `<p>.a.c.<identity>.<contact>` |
//! | a ticket | `<P>_ACCOUNTS` | `<p>.a.t.<identity>.<token>` |
//! | the highest id that left a mailbox | `<P>_ACCOUNTS` | `<p>.a.l.<mailbox>` |
//! | a registration's one-time prekeys | `<P>_PREKEYS` | `<p>.k.<identity>.<device>.<generation>` |
//! | payload bytes in a mailbox (counter) | `<P>_USAGE` | `<p>.u.<identity>.<device>` |
//! | account changes, `PreKeysLow` | (core) | `<p>.acct` |
//! | removals from a mailbox | (core) | `<p>.gone.<mailbox>` |
//!
//! `<identity>` is the key in hex; `<mailbox>` is a token of 24 hex digits derived from the
//! identity, the device and the registration's mailbox generation, so that a device registered
//! again starts an empty mailbox (in the same stream) and messages for an earlier registration
//! are never read.

use std::sync::Arc;

use ahash::AHashMap;
use botd_protocol::keys::sha256;
use parking_lot::Mutex;

use crate::store::{Identity, MailboxId, TICKET_LEN};

/// Mailboxes whose token and subject [`Names::of_mailbox`] keeps; past this it forgets them all.
const MAX_NAMED_MAILBOXES: usize = 65_536;

/// A mailbox's token, the subject of its messages and the stream that holds them.
#[derive(Debug, Clone)]
pub struct MailboxNaming {
    pub token: Arc<str>,
    pub subject: async_nats::Subject,
    pub stream: Arc<str>,
}

/// A mailbox of one registration of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MailboxKey {
    pub id: MailboxId,
    pub generation: u64,
}

impl MailboxKey {
    /// 4 bytes of SHA-256 over identity and device, which choose the stream (so every
    /// registration of a device has its mailbox in the same stream, where ids only grow), then
    /// 8 over identity, device and generation.
    pub fn token(&self) -> String {
        let device = sha256(&[
            b"botd device",
            &self.id.identity,
            &self.id.device.to_be_bytes(),
        ]);
        let registration = sha256(&[
            b"botd mailbox",
            &self.id.identity,
            &self.id.device.to_be_bytes(),
            &self.generation.to_be_bytes(),
        ]);
        format!(
            "{}{}",
            hex::encode(&device[..4]),
            hex::encode(&registration[..8])
        )
    }
}

/// Names of everything the backend keeps on the cluster.
#[derive(Debug)]
pub struct Names {
    /// Subject prefix (lowercase).
    prefix: String,
    /// Stream name prefix (uppercase).
    streams_prefix: String,
    /// How many message streams.
    pub message_streams: usize,
    /// Tokens, subjects and streams of the mailboxes used lately: a token is two SHA-256 and
    /// the names formatted strings, on every `Send`, read and ack otherwise.
    named: Mutex<AHashMap<MailboxKey, MailboxNaming>>,
}

impl Names {
    pub fn new(prefix: &str, message_streams: usize) -> Self {
        Self {
            prefix: prefix.to_ascii_lowercase(),
            streams_prefix: prefix.to_ascii_uppercase().replace('-', "_"),
            message_streams: message_streams.max(1),
            named: Mutex::new(AHashMap::new()),
        }
    }

    /// `key`'s token, the subject of its messages and their stream (kept for the next call).
    pub fn of_mailbox(&self, key: &MailboxKey) -> MailboxNaming {
        if let Some(naming) = self.named.lock().get(key) {
            return naming.clone();
        }
        let token = key.token();
        let naming = MailboxNaming {
            subject: self.mailbox_subject(&token).into(),
            stream: self.message_stream(self.stream_of(&token)).into(),
            token: token.into(),
        };
        let mut named = self.named.lock();
        if named.len() >= MAX_NAMED_MAILBOXES {
            named.clear();
        }
        named.insert(*key, naming.clone());
        naming
    }

    /// Which message stream holds a mailbox: spread by the token's first part (the device), so
    /// stream leaders share the load of every node.
    pub fn stream_of(&self, token: &str) -> usize {
        let head = u64::from_str_radix(&token[..8], 16).unwrap_or(0);
        (head % self.message_streams as u64) as usize
    }

    pub fn message_stream(&self, index: usize) -> String {
        format!("{}_M{index}", self.streams_prefix)
    }

    /// The subjects of message stream `index`.
    pub fn message_stream_subjects(&self, index: usize) -> String {
        format!("{}.m{index}.>", self.prefix)
    }

    /// Where a mailbox's messages are stored.
    pub fn mailbox_subject(&self, token: &str) -> String {
        format!("{}.m{}.{token}", self.prefix, self.stream_of(token))
    }

    /// A subject of the mailbox's stream that never holds a message: the target of a
    /// publish that only asks whether a message id was seen.
    pub fn probe_subject(&self, token: &str) -> String {
        format!("{}.m{}.probe", self.prefix, self.stream_of(token))
    }

    /// Republication of stream `index`: stored messages of `<p>.m<k>.<mailbox>` are also
    /// published to `<p>.live.m<k>.<mailbox>`.
    pub fn republish(&self, index: usize) -> (String, String) {
        (
            format!("{}.m{index}.>", self.prefix),
            format!("{}.live.m{index}.>", self.prefix),
        )
    }

    pub fn live_subject(&self, token: &str) -> String {
        format!("{}.live.m{}.{token}", self.prefix, self.stream_of(token))
    }

    /// The mailbox token of a live subject.
    pub fn live_token<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".live.")?
            .split_once('.')
            .map(|(_, token)| token)
    }

    pub fn gone_subject(&self, token: &str) -> String {
        format!("{}.gone.{token}", self.prefix)
    }

    pub fn gone_token<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".gone.")
    }

    pub fn account_changes(&self) -> String {
        format!("{}.acct", self.prefix)
    }

    pub fn accounts_stream(&self) -> String {
        format!("{}_ACCOUNTS", self.streams_prefix)
    }

    pub fn accounts_subjects(&self) -> String {
        format!("{}.a.>", self.prefix)
    }

    pub fn account(&self, identity: &Identity) -> String {
        format!("{}.a.i.{}", self.prefix, hex::encode(identity))
    }

    /// Every account subject.
    pub fn all_accounts(&self) -> String {
        format!("{}.a.i.*", self.prefix)
    }

    /// The identity of an account subject.
    pub fn account_identity(&self, subject: &str) -> Option<Identity> {
        let hex_id = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".a.i.")?;
        let mut identity = [0u8; 33];
        hex::decode_to_slice(hex_id, &mut identity).ok()?;
        Some(identity)
    }

    pub fn keys(&self, identity: &Identity, device: u32, generation: u64) -> String {
        format!(
            "{}.a.k.{}.{device}.{generation:x}",
            self.prefix,
            hex::encode(identity)
        )
    }

    pub fn contact(&self, identity: &Identity, contact: &Identity) -> String {
        format!(
            "{}.a.c.{}.{}",
            self.prefix,
            hex::encode(identity),
            hex::encode(contact)
        )
    }

    pub fn contacts_of(&self, identity: &Identity) -> String {
        format!("{}.a.c.{}.*", self.prefix, hex::encode(identity))
    }

    pub fn ticket(&self, identity: &Identity, token: &[u8; TICKET_LEN]) -> String {
        format!(
            "{}.a.t.{}.{}",
            self.prefix,
            hex::encode(identity),
            hex::encode(token)
        )
    }

    pub fn tickets_of(&self, identity: &Identity) -> String {
        format!("{}.a.t.{}.*", self.prefix, hex::encode(identity))
    }

    pub fn last_removed(&self, token: &str) -> String {
        format!("{}.a.l.{token}", self.prefix)
    }

    pub fn prekeys_stream(&self) -> String {
        format!("{}_PREKEYS", self.streams_prefix)
    }

    pub fn prekeys_subjects(&self) -> String {
        format!("{}.k.>", self.prefix)
    }

    pub fn prekeys(&self, identity: &Identity, device: u32, generation: u64) -> String {
        format!(
            "{}.k.{}.{device}.{generation:x}",
            self.prefix,
            hex::encode(identity)
        )
    }

    /// The streams of the layout before nats-server 2.12 (one messages stream, an events
    /// stream, two KV buckets), the messages stream first.
    pub fn earlier_layout(&self) -> [String; 4] {
        let lower = self.streams_prefix.to_ascii_lowercase();
        [
            format!("{}_MESSAGES", self.streams_prefix),
            format!("{}_EVENTS", self.streams_prefix),
            format!("KV_{lower}_accounts"),
            format!("KV_{lower}_keys"),
        ]
    }

    pub fn usage_stream(&self) -> String {
        format!("{}_USAGE", self.streams_prefix)
    }

    pub fn usage_subjects(&self) -> String {
        format!("{}.u.>", self.prefix)
    }

    pub fn usage(&self, mailbox: &MailboxId) -> String {
        format!(
            "{}.u.{}.{}",
            self.prefix,
            hex::encode(mailbox.identity),
            mailbox.device
        )
    }

    /// The usage counters of every device of an identity.
    pub fn usage_of(&self, identity: &Identity) -> String {
        format!("{}.u.{}.*", self.prefix, hex::encode(identity))
    }

    /// The device of a usage subject.
    pub fn usage_device(&self, subject: &str) -> Option<u32> {
        subject.rsplit('.').next()?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(device: u32, generation: u64) -> MailboxKey {
        MailboxKey {
            id: MailboxId {
                identity: [2; 33],
                device,
            },
            generation,
        }
    }

    #[test]
    fn mailbox_tokens_differ_by_device_and_generation_and_pick_a_stream() {
        let names = Names::new("botd", 3);
        let a = mailbox(1, 7).token();
        assert_eq!(a.len(), 24);
        assert_ne!(a, mailbox(2, 7).token());
        assert_ne!(a, mailbox(1, 8).token());
        assert_eq!(
            names.stream_of(&a),
            names.stream_of(&mailbox(1, 8).token()),
            "a device's registrations share a stream"
        );
        let subject = names.mailbox_subject(&a);
        let k = names.stream_of(&a);
        assert!(k < 3);
        assert_eq!(subject, format!("botd.m{k}.{a}"));
        let (src, dest) = names.republish(k);
        assert_eq!(src, format!("botd.m{k}.>"));
        assert_eq!(dest, format!("botd.live.m{k}.>"));
        assert_eq!(names.live_token(&names.live_subject(&a)), Some(a.as_str()));
        assert_eq!(names.gone_token(&names.gone_subject(&a)), Some(a.as_str()));
    }

    #[test]
    fn a_mailbox_is_named_as_its_key_says_and_once() {
        let names = Names::new("botd", 3);
        let first = names.of_mailbox(&mailbox(1, 7));
        let token = mailbox(1, 7).token();
        assert_eq!(&*first.token, token.as_str());
        assert_eq!(first.subject.as_str(), names.mailbox_subject(&token));
        assert_eq!(
            &*first.stream,
            names.message_stream(names.stream_of(&token))
        );
        let again = names.of_mailbox(&mailbox(1, 7));
        assert!(
            Arc::ptr_eq(&first.token, &again.token),
            "kept, not made again"
        );
        let other = names.of_mailbox(&mailbox(1, 8));
        assert_ne!(other.token, first.token);
    }

    #[test]
    fn subjects_round_trip_and_streams_spread() {
        let names = Names::new("Relay-1", 4);
        assert_eq!(names.accounts_stream(), "RELAY_1_ACCOUNTS");
        assert_eq!(names.message_stream(2), "RELAY_1_M2");
        let identity = [3; 33];
        assert_eq!(
            names.account_identity(&names.account(&identity)),
            Some(identity)
        );
        let usage = names.usage(&MailboxId {
            identity,
            device: 12,
        });
        assert_eq!(names.usage_device(&usage), Some(12));
        let mut used = [false; 4];
        for device in 0..64 {
            used[names.stream_of(&mailbox(device, 1).token())] = true;
        }
        assert_eq!(used, [true; 4], "64 devices reach every stream");
    }
}
