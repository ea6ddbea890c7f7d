//! Mailboxes on the cluster: one subject per mailbox in one of the message streams. A `Send` is
//! one publish, whose rules are the stream's own:
//!
//! * **ids** are stream sequences: increasing, never reused, with gaps (other mailboxes);
//! * **once per (sender, nonce)**: the publish carries a message id derived from the mailbox,
//!   the sender and the nonce, and the stream answers a second one as a duplicate of the first
//!   (within `nats_duplicate_window`; the answer is checked against what is still stored, so a
//!   nonce whose message was acknowledged stores a new one);
//! * **mailbox_max_messages** is the stream's limit per subject, refusing new messages;
//! * **max_stored_bytes** is the streams' byte limit (split evenly between them).
//!
//! The recipient's registration and policy come from the cached account, the byte quotas from
//! [`super::usage`]. An ack of the oldest messages is one purge of the subject below an id
//! ([`super::index`]); other acks delete message by message, each checked to be the mailbox's.

use std::sync::Arc;

use ahash::AHashMap;
use async_nats::HeaderMap;
use botd_protocol::keys::sha256;

use super::error::{code, NatsError};
use super::index::Settled;
use super::names::{MailboxKey, MailboxNaming};
use super::outbox::{message_id_headers, Sent};
use super::records::{decode, encode, GoneNotice, LastRemoved, StoredMessage};
use super::sequence::Ticket;
use super::usage::StoredBytes;
use super::Inner;
use crate::store::{
    Admission, Appended, MailboxId, Message, NewMessage, QuotaKind, RecipientView, StoreError,
    StoreResult, TicketOffer,
};
use botd_protocol::proto::Accept;

/// How a read that a lagging replica answered short is repeated: after 1, 2, 4, 8 and 16 ms
/// (31 ms in all, far beyond a healthy cluster's replication lag), then it is taken as it is.
const READ_LAG_FIRST_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);
const READ_LAG_LAST_PAUSE: std::time::Duration = std::time::Duration::from_millis(16);

/// Whether a read of up to `batch` messages that returned `got`, the last of them `reached`
/// (or its start), stopped before `announced`, a message a live message said is stored: the
/// replica that answered has not applied it yet. A full batch did not stop at the end.
fn answered_short(got: usize, batch: usize, reached: u64, announced: Option<u64>) -> bool {
    got < batch && announced.is_some_and(|id| id > reached)
}

/// Publishes of one send before it gives up (duplicates of acknowledged messages, a first
/// copy still being applied).
const MAX_PUBLISH_ATTEMPTS: u32 = 16;

/// The message id of a send: the mailbox, the sender and the nonce (and, for a nonce whose
/// earlier message was acknowledged, that message's id), hashed to 22 characters.
fn message_id(token: &str, message: &NewMessage, after: u64) -> String {
    let digest = sha256(&[
        token.as_bytes(),
        &message.sender,
        &message.nonce,
        &after.to_be_bytes(),
    ]);
    hex::encode(&digest[..11])
}

/// The headers of a new message's publish (see [`message_id`]).
fn new_message_headers(token: &str, message: &NewMessage, after: u64) -> HeaderMap {
    message_id_headers(message_id(token, message, after))
}

/// The headers of a publish that only asks whether a message id is known: an answer
/// `duplicate` names the message; anything else stored nothing.
fn probe_headers(id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    headers.insert("Nats-TTL", "invalid");
    headers
}

/// The highest id that left each mailbox through this relay and whose record
/// (`<p>.a.l.<mailbox>`) may not hold it yet, by mailbox token: written with the byte counts, so
/// that a burst of acks is one write. An entry stays until its record is known to hold it:
/// `last_id` reads the record and then this, and must find the id in one of the two.
#[derive(Default)]
pub struct UnwrittenRemovals(AHashMap<String, u64>);

impl UnwrittenRemovals {
    /// `id` left the mailbox `token`.
    fn note(&mut self, token: &str, id: u64) {
        let known = self.0.entry(token.to_owned()).or_default();
        *known = (*known).max(id);
    }

    fn get(&self, token: &str) -> Option<u64> {
        self.0.get(token).copied()
    }

    /// What to write now (each entry stays until [`UnwrittenRemovals::written`]).
    fn to_write(&self) -> Vec<(String, u64)> {
        self.0
            .iter()
            .map(|(token, id)| (token.clone(), *id))
            .collect()
    }

    /// The record of `token` holds `id`: the entry goes, unless a higher id came meanwhile.
    fn written(&mut self, token: &str, id: u64) {
        if self.0.get(token).is_some_and(|known| *known <= id) {
            self.0.remove(token);
        }
    }
}

/// How a publish of a new message ended.
enum Published {
    Stored(u64),
    /// The stream has a message with this message id, under this sequence.
    Duplicate(u64),
}

impl Inner {
    /// The mailbox of a registered device (the device's current registration).
    pub async fn mailbox_key(&self, mailbox: &MailboxId) -> StoreResult<MailboxKey> {
        let account = self
            .registration(&mailbox.identity, mailbox.device)
            .await?
            .ok_or(StoreError::NotRegistered(mailbox.device))?;
        let slot = account.registered(mailbox.device).expect("checked");
        Ok(MailboxKey {
            id: *mailbox,
            generation: slot.mailbox_generation,
        })
    }

    /// The common send, decided at once from what is cached (the recipient's registration
    /// and policy, the byte counts): its publish is queued now, in call order. `None` when
    /// something must be read first (the caller then takes [`Inner::append`]).
    pub fn append_now(&self, message: &NewMessage) -> Option<(MailboxKey, Sent)> {
        let sender = self.cache.account(&message.sender)?;
        sender
            .record
            .as_deref()?
            .registered(message.sender_device)?;
        if message.bad_signature.is_some() {
            return None;
        }
        let read = self.cache.account(&message.to.identity)?;
        let recipient = read.record.as_deref()?;
        let slot = recipient.registered(message.to.device)?;
        let accept = Accept::try_from(recipient.accept).unwrap_or(Accept::Open);
        let is_sender = message.sender == message.to.identity;
        let sender_is_contact = accept == Accept::ContactsOnly
            && !is_sender
            && self.cache.is_contact(&message.to.identity, &message.sender);
        let view = RecipientView {
            accept,
            is_sender,
            sender_is_contact,
            contacts: recipient.contacts as usize,
        };
        if self
            .limits
            .admit(view, TicketOffer::None, message.received_at_ms)
            != Ok(Admission::Admitted)
        {
            return None;
        }
        let key = MailboxKey {
            id: message.to,
            generation: slot.mailbox_generation,
        };
        let stored = self.usage.cached(&key.id)?;
        // Near a quota the counts are read and written with the send: the slow path.
        if self.near_quota(stored, message.payload.len()) {
            return None;
        }
        self.bytes_allowed(stored, message.payload.len()).ok()?;
        let naming = self.cluster.names.of_mailbox(&key);
        Some((key, self.enqueue_new(&naming, message)))
    }

    pub async fn append(&self, message: NewMessage, mut ticket: Ticket) -> StoreResult<Appended> {
        ticket.turn().await;
        if self
            .registration(&message.sender, message.sender_device)
            .await?
            .is_none()
        {
            return Err(StoreError::NotRegistered(message.sender_device));
        }
        if let Some(why) = &message.bad_signature {
            return Err(StoreError::BadSignature(why.clone()));
        }
        let recipient = self
            .registration(&message.to.identity, message.to.device)
            .await?
            .ok_or(StoreError::UnknownRecipient)?;
        let slot = recipient.registered(message.to.device).expect("checked");
        let key = MailboxKey {
            id: message.to,
            generation: slot.mailbox_generation,
        };
        let naming = self.cluster.names.of_mailbox(&key);
        // The rules of §8.3 in their order; a refusal is not final before the nonce is known
        // to be new (a retry of a stored message is answered as a duplicate whatever changed).
        let admission = match self.admission(&recipient, &message).await {
            Ok(admission) => admission,
            Err(err) => {
                ticket.pass();
                return self.unless_duplicate(&naming, &message, err).await;
            }
        };
        let near = match self.check_bytes(&key, &naming, message.payload.len()).await {
            Ok(near) => near,
            Err(err) => {
                ticket.pass();
                return self.unless_duplicate(&naming, &message, err).await;
            }
        };
        if let Admission::ByTicket = admission {
            // The ticket's use, before the message: a retry after a failure below finds the
            // sender a contact and does not use the ticket again.
            ticket.pass();
            self.use_ticket(&message).await?;
            let sent = self.enqueue_new(&naming, &message);
            return self.appended(key, message, sent, near).await;
        }
        let sent = self.enqueue_new(&naming, &message);
        // Queued in call order: the next call of the sender may go.
        ticket.pass();
        self.appended(key, message, sent, near).await
    }

    /// The answer to a queued send; `near_quota`: its bytes are written before it is answered.
    pub async fn appended(
        &self,
        key: MailboxKey,
        message: NewMessage,
        sent: Sent,
        near_quota: bool,
    ) -> StoreResult<Appended> {
        let ack = sent
            .await
            .unwrap_or_else(|_| Err(NatsError::request("the store stopped")));
        let published = match ack {
            Ok(ack) if ack.duplicate => Published::Duplicate(ack.sequence),
            Ok(ack) => Published::Stored(ack.sequence),
            // The rare paths are boxed: every send's future (boxed by the relay, moved on
            // each poll) stays the size of the common one.
            Err(err) => {
                let naming = self.cluster.names.of_mailbox(&key);
                Box::pin(self.publish_failed(&naming, &message, 0, err)).await?
            }
        };
        match published {
            Published::Stored(id) => {
                if near_quota {
                    Box::pin(self.stored(&key.id, &message, near_quota)).await;
                } else {
                    self.usage.add(&key.id, message.payload.len() as i64);
                }
                Ok(Appended::Stored(id))
            }
            Published::Duplicate(id) => {
                let naming = self.cluster.names.of_mailbox(&key);
                Box::pin(self.duplicate_of(&naming, &message, id, near_quota)).await
            }
        }
    }

    /// Counts a newly stored message: with the next batch, or now when near a quota.
    async fn stored(&self, mailbox: &MailboxId, message: &NewMessage, near_quota: bool) {
        let bytes = message.payload.len() as i64;
        if near_quota {
            if let Err(err) = self.usage.write_now(&self.cluster, mailbox, bytes).await {
                tracing::warn!(error = %err, "a mailbox byte count is written later");
            }
        } else {
            self.usage.add(mailbox, bytes);
        }
    }

    /// Whether a send of `payload` bytes takes the mailbox or the identity past a quarter of
    /// its quota: from there on, counts are read and written at once.
    fn near_quota(&self, stored: StoredBytes, payload: usize) -> bool {
        4 * (stored.mailbox + payload) > self.limits.mailbox_max_bytes
            || 4 * (stored.identity + payload) > self.limits.max_identity_stored_bytes
    }

    /// Whether the sender may write to the recipient (§8.3, §8.6).
    async fn admission(
        &self,
        recipient: &super::records::AccountRecord,
        message: &NewMessage,
    ) -> StoreResult<Admission> {
        let accept = Accept::try_from(recipient.accept).unwrap_or(Accept::Open);
        let is_sender = message.sender == message.to.identity;
        let needs_contact = accept == Accept::ContactsOnly && !is_sender;
        let sender_is_contact = needs_contact
            && self
                .is_contact(&message.to.identity, &message.sender)
                .await?;
        let offer = if needs_contact && !sender_is_contact {
            self.ticket(&message.to.identity, message.ticket.as_ref())
                .await?
                .0
        } else {
            TicketOffer::None
        };
        self.limits.admit(
            RecipientView {
                accept,
                is_sender,
                sender_is_contact,
                contacts: recipient.contacts as usize,
            },
            offer,
            message.received_at_ms,
        )
    }

    async fn use_ticket(&self, message: &NewMessage) -> StoreResult<()> {
        let token = message.ticket.as_ref().expect("admitted by its ticket");
        for _ in 0..16 {
            let (offer, seq) = self.ticket(&message.to.identity, Some(token)).await?;
            let recipient = self
                .account_fresh(&message.to.identity)
                .await?
                .registered()
                .cloned()
                .ok_or(StoreError::UnknownRecipient)?;
            // Decided again on what the leader has: the ticket may have been used up.
            let view = RecipientView {
                accept: Accept::try_from(recipient.accept).unwrap_or(Accept::Open),
                is_sender: false,
                sender_is_contact: self
                    .is_contact(&message.to.identity, &message.sender)
                    .await?,
                contacts: recipient.contacts as usize,
            };
            match self.limits.admit(view, offer, message.received_at_ms)? {
                Admission::Admitted => return Ok(()),
                Admission::ByTicket => {}
            }
            if self
                .admit_by_ticket(
                    &message.to.identity,
                    &message.sender,
                    token,
                    seq,
                    message.received_at_ms,
                )
                .await?
            {
                return Ok(());
            }
        }
        Err(NatsError::Contended("a ticket").into())
    }

    /// The byte quotas on counted bytes (the message count is the stream's).
    fn bytes_allowed(&self, stored: StoredBytes, payload: usize) -> StoreResult<()> {
        self.limits.check_mailbox_room(0, stored.mailbox, payload)?;
        self.limits.check_storage(stored.identity, 0, payload)
    }

    /// The byte quotas, on the counted bytes (read at once near a quota); a refusal is checked
    /// against the mailbox's stored messages themselves first. Says whether the send is near
    /// a quota.
    async fn check_bytes(
        &self,
        key: &MailboxKey,
        mailbox: &MailboxNaming,
        payload: usize,
    ) -> StoreResult<bool> {
        let device = key.id.device;
        let check = |usage: &ahash::AHashMap<u32, i64>| {
            self.bytes_allowed(StoredBytes::of(usage, device), payload)
        };
        let mut usage = self.usage.of(&self.cluster, &key.id.identity).await?;
        let near = self.near_quota(StoredBytes::of(&usage, device), payload);
        if near {
            usage = self.usage.of_now(&self.cluster, &key.id.identity).await?;
        }
        if check(&usage).is_ok() {
            return Ok(near);
        }
        if !self.usage.counted_recently(&key.id) {
            let actual = self.count_bytes(mailbox).await?;
            self.usage
                .correct(&self.cluster, &key.id, actual as i64)
                .await?;
        }
        let usage = self.usage.of(&self.cluster, &key.id.identity).await?;
        match check(&usage) {
            // The identity's other mailboxes may be counted too high as well (messages that
            // expired there, a relay killed before it wrote an ack's count).
            Err(StoreError::QuotaExceeded {
                kind: QuotaKind::IdentityBytes,
                ..
            }) => {
                self.recount_other_devices(key).await?;
                let usage = self.usage.of(&self.cluster, &key.id.identity).await?;
                check(&usage).map(|()| near)
            }
            other => other.map(|()| near),
        }
    }

    /// Sets the counters of every other registered device of `key`'s identity from their
    /// stored messages (at most `max_devices_per_identity` mailboxes, on a refusal only, each
    /// at most once per `RECOUNT_AFTER`).
    async fn recount_other_devices(&self, key: &MailboxKey) -> StoreResult<()> {
        let read = self.account_fresh(&key.id.identity).await?;
        let Some(account) = read.record.as_deref() else {
            return Ok(());
        };
        for slot in account.devices.iter().filter(|s| s.registered) {
            if slot.device_id == key.id.device {
                continue;
            }
            let other = MailboxKey {
                id: MailboxId {
                    identity: key.id.identity,
                    device: slot.device_id,
                },
                generation: slot.mailbox_generation,
            };
            if self.usage.counted_recently(&other.id) {
                continue;
            }
            let actual = self
                .count_bytes(&self.cluster.names.of_mailbox(&other))
                .await?;
            self.usage
                .correct(&self.cluster, &other.id, actual as i64)
                .await?;
        }
        Ok(())
    }

    /// Checks the byte counters of the mailboxes this relay knows completely and that have
    /// settled (see [`super::usage`]) against what they hold.
    pub async fn settle_counters(&self) {
        use super::usage::MAX_SETTLED_PER_ROUND;
        let indexes = &self.live.indexes;
        for settled in indexes.settled(MAX_SETTLED_PER_ROUND) {
            let mailbox = settled.key.id;
            // Its own changes first: the next round, once they are written.
            if self.usage.unwritten(&mailbox) {
                continue;
            }
            let corrected = match self.holds_what_is_known(&settled).await {
                Ok(true) => {
                    let still = || indexes.unchanged_since(&mailbox, settled.change);
                    let bytes = settled.bytes as i64;
                    let set = self
                        .usage
                        .set(&self.cluster, &mailbox, bytes, "settled", still);
                    match set.await {
                        Ok(corrected) => corrected,
                        Err(err) => {
                            tracing::debug!(error = %err, "a settled mailbox's counter was not checked");
                            continue;
                        }
                    }
                }
                // Its index changes when it learns the rest (or is retired, and goes).
                Ok(false) => false,
                Err(err) => {
                    tracing::debug!(error = %err, "a settled mailbox's counter was not checked");
                    continue;
                }
            };
            indexes.checked(&mailbox, settled.change, corrected);
        }
    }

    /// Whether a mailbox holds exactly what its index knows: nothing newer than what it has
    /// seen (read from the leader), and as many messages (so none went unseen); for an index
    /// that does not know the mailbox from its first message on, whether the leader holds
    /// none of its messages.
    async fn holds_what_is_known(&self, settled: &Settled) -> Result<bool, NatsError> {
        let naming = self.cluster.names.of_mailbox(&settled.key);
        let stream = &*naming.stream;
        let subject = naming.subject.as_str();
        let newest = self.cluster.last_from_leader(stream, subject).await?;
        let Some(through) = settled.through else {
            return Ok(newest.is_none());
        };
        if newest.is_some_and(|m| m.sequence > through) {
            return Ok(false);
        }
        let first = self.cluster.next(stream, subject, 1).await?;
        Ok(first.map_or(0, |m| m.pending + 1) == settled.count)
    }

    /// Payload bytes of the messages stored in a mailbox, counted from the messages.
    async fn count_bytes(&self, mailbox: &MailboxNaming) -> StoreResult<u64> {
        let stream = &*mailbox.stream;
        let subject = mailbox.subject.as_str();
        let mut from = 1;
        let mut bytes = 0u64;
        // Bounded by the mailbox's message limit.
        for _ in 0..=(self.limits.mailbox_max_messages / super::client::MAX_GET_BATCH + 1) {
            let batch = self
                .cluster
                .batch(stream, subject, from, super::client::MAX_GET_BATCH)
                .await?;
            let Some(last) = batch.last() else { break };
            from = last.sequence + 1;
            for stored in batch {
                if let Some(message) = StoredMessage::decode_message(stored.payload, 0) {
                    bytes += message.payload.len() as u64;
                }
            }
        }
        Ok(bytes)
    }

    /// Queues the publish of a new message for the outbox.
    fn enqueue_new(&self, mailbox: &MailboxNaming, message: &NewMessage) -> Sent {
        self.cluster.enqueue(
            mailbox.subject.clone(),
            message_id(&mailbox.token, message, 0),
            encode(&StoredMessage::of(message)),
        )
    }

    /// Hands the publish of a new message to the connection.
    async fn send_new(
        &self,
        mailbox: &MailboxNaming,
        message: &NewMessage,
        after: u64,
    ) -> StoreResult<async_nats::jetstream::context::PublishAckFuture> {
        Ok(self
            .cluster
            .send(
                mailbox.subject.to_string(),
                new_message_headers(&mailbox.token, message, after),
                encode(&StoredMessage::of(message)),
            )
            .await?)
    }

    /// A publish the stream refused: a limit, or a passing state (a first copy still being
    /// applied, a stream between leaders) — retried with the same message id, which comes
    /// back as the duplicate it is if the first try was stored, until `nats_request_timeout`.
    async fn publish_failed(
        &self,
        mailbox: &MailboxNaming,
        message: &NewMessage,
        after: u64,
        mut err: NatsError,
    ) -> StoreResult<Published> {
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        for attempt in 0u64.. {
            match err.code() {
                Some(code::MAX_MESSAGES_PER_SUBJECT) => {
                    return Err(StoreError::MailboxFull("message count"))
                }
                Some(code::STREAM_STORE_FULL) => return Err(self.limits.storage_full()),
                _ if err.is_transient() => {}
                _ => return Err(err.into()),
            }
            let pause = std::time::Duration::from_millis((10 * (attempt + 1)).min(250));
            if tokio::time::Instant::now() + pause >= deadline {
                break;
            }
            tokio::time::sleep(pause).await;
            let ack = match self.send_new(mailbox, message, after).await {
                Ok(ack) => ack.await.map_err(NatsError::from),
                Err(StoreError::Unavailable(text)) => Err(NatsError::Request(text)),
                Err(other) => return Err(other),
            };
            match ack {
                Ok(ack) if ack.duplicate => return Ok(Published::Duplicate(ack.sequence)),
                Ok(ack) => return Ok(Published::Stored(ack.sequence)),
                Err(next) => err = next,
            }
        }
        Err(err.into())
    }

    /// The stream has a message with this send's message id, stored as `id`: the answer is
    /// `Duplicate` while that message is still stored; otherwise the nonce stores a new one
    /// (under a message id of its own).
    async fn duplicate_of(
        &self,
        mailbox: &MailboxNaming,
        message: &NewMessage,
        mut id: u64,
        near_quota: bool,
    ) -> StoreResult<Appended> {
        for _ in 0..MAX_PUBLISH_ATTEMPTS {
            if self.still_stored(mailbox, id).await? {
                return Ok(Appended::Duplicate(id));
            }
            let ack = self.send_new(mailbox, message, id).await?.await;
            let published = match ack {
                Ok(ack) if ack.duplicate => Published::Duplicate(ack.sequence),
                Ok(ack) => Published::Stored(ack.sequence),
                Err(err) => {
                    self.publish_failed(mailbox, message, id, err.into())
                        .await?
                }
            };
            match published {
                Published::Stored(stored) => {
                    self.stored(&message.to, message, near_quota).await;
                    return Ok(Appended::Stored(stored));
                }
                Published::Duplicate(dup) => id = dup,
            }
        }
        Err(NatsError::Contended("a message id").into())
    }

    /// Whether message `id` of the stream is still stored, in this mailbox.
    async fn still_stored(&self, mailbox: &MailboxNaming, id: u64) -> StoreResult<bool> {
        Ok(self
            .cluster
            .get(&mailbox.stream, id)
            .await?
            .is_some_and(|m| m.subject == mailbox.subject.as_str()))
    }

    /// A send refused by a rule: answered as a duplicate when its message is stored.
    async fn unless_duplicate(
        &self,
        mailbox: &MailboxNaming,
        message: &NewMessage,
        refusal: StoreError,
    ) -> StoreResult<Appended> {
        let token = &*mailbox.token;
        // A publish that only asks: its TTL is never valid, so nothing is stored, and the
        // stream looks its message id up before it reads the TTL.
        let headers = probe_headers(&message_id(token, message, 0));
        let probe = self
            .cluster
            .publish(
                self.cluster.names.probe_subject(token),
                headers,
                bytes::Bytes::new(),
            )
            .await;
        match probe {
            Ok(ack) if ack.duplicate => {
                match self.duplicate_chain(mailbox, message, ack.sequence).await? {
                    Some(id) => Ok(Appended::Duplicate(id)),
                    None => Err(refusal),
                }
            }
            _ => Err(refusal),
        }
    }

    /// The stored message of a chain of message ids that starts at `id`, if any.
    async fn duplicate_chain(
        &self,
        mailbox: &MailboxNaming,
        message: &NewMessage,
        mut id: u64,
    ) -> StoreResult<Option<u64>> {
        let token = &*mailbox.token;
        for _ in 0..MAX_PUBLISH_ATTEMPTS {
            if self.still_stored(mailbox, id).await? {
                return Ok(Some(id));
            }
            let headers = probe_headers(&message_id(token, message, id));
            match self
                .cluster
                .publish(
                    self.cluster.names.probe_subject(token),
                    headers,
                    bytes::Bytes::new(),
                )
                .await
            {
                Ok(ack) if ack.duplicate => id = ack.sequence,
                _ => return Ok(None),
            }
        }
        Ok(None)
    }

    pub async fn read(
        &self,
        mailbox: MailboxId,
        after: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> StoreResult<Vec<Arc<Message>>> {
        let key = self.mailbox_key(&mailbox).await?;
        let naming = self.cluster.names.of_mailbox(&key);
        let batch = max_count.min(super::client::MAX_GET_BATCH);
        // A direct get may be answered by a replica that has not applied the newest messages
        // yet (R3), though a live message already announced them: then the read is repeated,
        // briefly, instead of telling the delivery that nothing more is stored (which it
        // would believe until the next message or resync).
        let announced = self
            .live
            .indexes
            .newest_stored(&mailbox)
            .filter(|&id| id > after);
        let mut pause = READ_LAG_FIRST_PAUSE;
        let stored = loop {
            let stored = self
                .cluster
                .batch(&naming.stream, naming.subject.as_str(), after + 1, batch)
                .await?;
            let reached = stored.last().map_or(after, |m| m.sequence);
            if !answered_short(stored.len(), batch, reached, announced)
                || pause > READ_LAG_LAST_PAUSE
            {
                break stored;
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
        };
        let mut out = Vec::with_capacity(stored.len());
        let mut seen = Vec::with_capacity(stored.len());
        let mut bytes = 0;
        for stored in stored {
            let Some(message) = StoredMessage::decode_message(stored.payload, stored.sequence)
            else {
                continue;
            };
            seen.push((message.id, message.payload.len() as u32));
            bytes += message.payload.len();
            if bytes > max_bytes && !out.is_empty() {
                break;
            }
            out.push(Arc::new(message));
        }
        self.live.indexes.read(&mailbox, &seen, after);
        Ok(out)
    }

    pub async fn get(&self, mailbox: MailboxId, id: u64) -> StoreResult<Arc<Message>> {
        let key = self.mailbox_key(&mailbox).await?;
        let naming = self.cluster.names.of_mailbox(&key);
        let stored = self
            .cluster
            .get(&naming.stream, id)
            .await?
            .filter(|m| m.subject == naming.subject.as_str())
            .ok_or(StoreError::NotFound)?;
        StoredMessage::decode_message(stored.payload, id)
            .map(Arc::new)
            .ok_or(StoreError::NotFound)
    }

    pub async fn last_id(&self, mailbox: MailboxId) -> StoreResult<u64> {
        let account = self
            .registration(&mailbox.identity, mailbox.device)
            .await?
            .ok_or(StoreError::NotRegistered(mailbox.device))?;
        let slot = account.registered(mailbox.device).expect("checked");
        let key = MailboxKey {
            id: mailbox,
            generation: slot.mailbox_generation,
        };
        let naming = self.cluster.names.of_mailbox(&key);
        let token = &*naming.token;
        let names = &self.cluster.names;
        // From the leaders: a replica that lags could miss the newest message or the latest
        // record of removals, and this must not answer below an id already given out. The
        // removals not yet written are read last: an entry leaves `removed` only after its
        // record was written (see `flush_removed`).
        let stored = self
            .cluster
            .last_from_leader(&naming.stream, naming.subject.as_str())
            .await?
            .map_or(0, |m| m.sequence);
        let removed = self
            .cluster
            .last_from_leader(&names.accounts_stream(), &names.last_removed(token))
            .await?
            .and_then(|m| decode::<LastRemoved>(&m.payload))
            .map_or(0, |r| r.id);
        let unwritten = self.removed.lock().get(token).unwrap_or(0);
        Ok(stored.max(removed).max(unwritten).max(slot.id_floor))
    }

    pub async fn ack(
        &self,
        mailbox: MailboxId,
        mut ids: Vec<u64>,
        ticket: Ticket,
    ) -> StoreResult<u32> {
        let mut ticket = ticket;
        ticket.turn().await;
        ids.sort_unstable();
        ids.dedup();
        let key = self.mailbox_key(&mailbox).await?;
        let naming = self.cluster.names.of_mailbox(&key);
        let stream = &*naming.stream;
        let subject = naming.subject.as_str();
        let plan = self.live.indexes.plan(&mailbox, &ids);
        ticket.pass();
        let (deleted, bytes): (Vec<u64>, u64) = match plan {
            super::index::AckPlan::Purge { below, gone, bytes } => {
                if let Err(err) = self.cluster.purge(stream, subject, Some(below)).await {
                    self.live.indexes.failed(&mailbox);
                    return Err(err.into());
                }
                (gone, bytes)
            }
            super::index::AckPlan::Each { known, unknown } => {
                let mut deleted = Vec::new();
                let mut bytes = 0u64;
                for (id, len) in known {
                    match self.cluster.delete(stream, id).await {
                        Ok(true) => {
                            deleted.push(id);
                            bytes += u64::from(len);
                        }
                        Ok(false) => {}
                        Err(err) => {
                            self.live.indexes.failed(&mailbox);
                            return Err(err.into());
                        }
                    }
                }
                for id in unknown {
                    // Read first: an ack never deletes another mailbox's message.
                    let Some(stored) = self.cluster.get(stream, id).await? else {
                        continue;
                    };
                    if stored.subject != subject {
                        continue;
                    }
                    let len = StoredMessage::decode_message(stored.payload, id)
                        .map_or(0, |m| m.payload.len() as u64);
                    if self.cluster.delete(stream, id).await? {
                        deleted.push(id);
                        bytes += len;
                    }
                }
                (deleted, bytes)
            }
        };
        if deleted.is_empty() {
            return Ok(0);
        }
        self.usage.add(&mailbox, -(bytes as i64));
        self.removed(&key, &naming, &deleted).await;
        Ok(deleted.len() as u32)
    }

    /// Messages left a mailbox: remembered for `last_id` when they may have been its newest,
    /// announced here and to the other relays.
    async fn removed(&self, key: &MailboxKey, mailbox: &MailboxNaming, ids: &[u64]) {
        let names = &self.cluster.names;
        let token = &*mailbox.token;
        let highest = *ids.last().expect("not empty");
        // A direct get may answer from a replica that does not yet show this ack: one that
        // still shows `highest` itself counts as showing nothing newer (a skipped id would
        // leave `last_id` below it once the mailbox is empty).
        let newest_known = self.live.indexes.known_empty(&key.id)
            || self
                .cluster
                .last(&mailbox.stream, mailbox.subject.as_str())
                .await
                .ok()
                .flatten()
                .is_none_or(|m| m.sequence <= highest);
        if newest_known {
            self.removed.lock().note(token, highest);
        }
        if let Some(listener) = self.live.listener.get() {
            listener.removed(&key.id, ids);
        }
        let notice = GoneNotice {
            ids: ids.to_vec(),
            closed: false,
        };
        let _ = self
            .cluster
            .client
            .publish(names.gone_subject(token), encode(&notice))
            .await;
    }

    /// Writes the highest ids that left mailboxes through this relay (see
    /// [`UnwrittenRemovals`]; a failed write is tried again at the next flush).
    pub async fn flush_removed(&self) {
        let to_write = self.removed.lock().to_write();
        for (token, id) in to_write {
            if self.remember_removed(&token, id).await {
                self.removed.lock().written(&token, id);
            }
        }
    }

    /// Raises the mailbox's highest removed id to `id` (compare-and-set: it never goes back).
    /// Whether the record now holds `id` or more.
    async fn remember_removed(&self, token: &str, id: u64) -> bool {
        let names = &self.cluster.names;
        let subject = names.last_removed(token);
        for _ in 0..16 {
            let current = self
                .cluster
                .last_from_leader(&names.accounts_stream(), &subject)
                .await;
            let Ok(current) = current else { return false };
            let (seq, known) = current.map_or((0, 0), |m| {
                (
                    m.sequence,
                    decode::<LastRemoved>(&m.payload).map_or(0, |r| r.id),
                )
            });
            if known >= id {
                return true;
            }
            match self
                .cluster
                .compare_and_set(subject.clone(), seq, encode(&LastRemoved { id }), |_| {})
                .await
            {
                Ok(Some(_)) => return true,
                Err(_) => return false,
                Ok(None) => continue,
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_is_short_only_when_it_ended_before_an_announced_message() {
        // Nothing announced, or the read reached it: as it is.
        assert!(!answered_short(0, 64, 10, None));
        assert!(!answered_short(3, 64, 13, Some(13)));
        assert!(!answered_short(0, 64, 10, Some(9)));
        // Ended (fewer than asked) before message 14 that a live message announced.
        assert!(answered_short(3, 64, 13, Some(14)));
        assert!(answered_short(0, 64, 10, Some(11)));
        // A full batch may end before it: the next read goes on from there.
        assert!(!answered_short(64, 64, 80, Some(200)));
    }

    #[test]
    fn a_removed_id_stays_unwritten_until_its_record_holds_it() {
        let mut removed = UnwrittenRemovals::default();
        removed.note("m", 5);
        removed.note("m", 3);
        assert_eq!(removed.to_write(), vec![("m".to_owned(), 5)]);
        // While the write is under way the id is still there for `last_id`...
        assert_eq!(removed.get("m"), Some(5));
        // ... and a higher one that came meanwhile outlives the write of the lower.
        removed.note("m", 7);
        removed.written("m", 5);
        assert_eq!(removed.get("m"), Some(7));
        removed.written("m", 7);
        assert_eq!(removed.get("m"), None);
        assert!(removed.to_write().is_empty());
    }
}
