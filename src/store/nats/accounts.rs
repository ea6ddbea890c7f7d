//! Accounts on the cluster: one small record per identity (device slots, policy, contact
//! count, last use), changed by compare-and-set by the rare requests that change an account,
//! never by a message; a registration's keys, each contact and each ticket as records of their
//! own. Relays cache accounts for sends ([`CACHE_TTL`], and each change is announced on
//! `<p>.acct` so the others drop their copy at once); a refusal is never taken from the cache:
//! it is confirmed from the stream's leader first.
//!
//! The limits come from `store::rules`: exact for devices, contacts and tickets of one identity
//! (they are judged on the record the compare-and-set replaces, or atomically with it), and
//! within the slack of concurrent registrations for the relay-wide identity count.

use std::sync::Arc;
use std::time::Duration;

use ahash::AHashMap;
use async_nats::HeaderMap;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::error::NatsError;
use super::names::MailboxKey;
use super::records::{
    decode, encode, AccountNotice, AccountRecord, GoneNotice, KeysRecord, TicketRecord,
};
use super::Inner;
use crate::store::{
    Identity, MailboxId, Registration, StoreError, StoreResult, TicketOffer, TICKET_LEN,
};
use botd_protocol::proto::{Accept, PreKey, SignedPreKey};

/// How long a relay trusts an account it read (another relay's change is normally announced
/// and seen at once; this bounds what a lost announcement costs).
pub const CACHE_TTL: Duration = Duration::from_secs(2);
/// Accounts (and contact answers) a relay caches; past this it forgets them all.
const MAX_CACHED: usize = 100_000;
/// A used-up ticket stays this long (so that its use is seen as such), then the server removes
/// it.
const USED_UP_TTL: Duration = Duration::from_secs(60);
/// Compare-and-set attempts before an operation gives up (`Unavailable`).
const MAX_ATTEMPTS: u32 = 100;

/// An account as read: the record (`None`: no account) and its sequence, for the next
/// compare-and-set.
#[derive(Clone)]
pub struct Read {
    pub record: Option<Arc<AccountRecord>>,
    pub seq: u64,
}

impl Read {
    pub fn registered(&self) -> Option<&AccountRecord> {
        self.record.as_deref().filter(|a| a.is_registered())
    }
}

/// A cached account: what was read, or only the sequence of a change announced since.
struct Entry {
    at: Instant,
    read: Option<Read>,
    /// Reads of an older version than this are not cached.
    seq: u64,
}

#[derive(Default)]
pub struct Cache {
    accounts: Mutex<AHashMap<Identity, Entry>>,
    /// (recipient, sender) → whether the sender is a contact.
    contacts: Mutex<AHashMap<(Identity, Identity), (Instant, bool)>>,
}

impl Cache {
    /// Another relay (or this one) changed the account to version `seq`: what is cached of
    /// an older version goes, and a read that started before the change cannot bring it back.
    pub fn changed(&self, identity: &[u8], seq: u64) {
        let Ok(identity) = <Identity>::try_from(identity) else {
            return;
        };
        let mut accounts = self.accounts.lock();
        match accounts.get_mut(&identity) {
            Some(entry) if entry.seq >= seq && entry.read.is_some() => {}
            _ => {
                accounts.insert(
                    identity,
                    Entry {
                        at: Instant::now(),
                        read: None,
                        seq,
                    },
                );
            }
        }
        drop(accounts);
        self.contacts
            .lock()
            .retain(|(owner, _), _| *owner != identity);
    }

    /// The account, if cached and fresh.
    pub fn account(&self, identity: &Identity) -> Option<Read> {
        self.accounts
            .lock()
            .get(identity)
            .filter(|entry| entry.at.elapsed() < CACHE_TTL)
            .and_then(|entry| entry.read.clone())
    }

    /// Whether the account of `identity` is cached and past half of [`CACHE_TTL`]: read it
    /// again ahead of its expiry, so that sends keep finding it.
    pub fn ageing(&self, identity: &Identity) -> bool {
        self.accounts
            .lock()
            .get(identity)
            .is_some_and(|entry| entry.read.is_some() && entry.at.elapsed() >= CACHE_TTL / 2)
    }

    /// Whether `sender` is a contact of `recipient`, if known to be (a "no" is never cached
    /// as final).
    pub fn is_contact(&self, recipient: &Identity, sender: &Identity) -> bool {
        self.contacts
            .lock()
            .get(&(*recipient, *sender))
            .is_some_and(|(at, yes)| *yes && at.elapsed() < CACHE_TTL)
    }

    /// Caches what was read, unless a later version is known (a read that started before a
    /// change may finish after it).
    fn put(&self, identity: Identity, read: Read) {
        let mut accounts = self.accounts.lock();
        if accounts.len() >= MAX_CACHED {
            accounts.clear();
        }
        let entry = accounts.entry(identity).or_insert(Entry {
            at: Instant::now(),
            read: None,
            seq: 0,
        });
        if read.seq >= entry.seq {
            *entry = Entry {
                at: Instant::now(),
                seq: read.seq,
                read: Some(read),
            };
        }
    }
}

/// A change decided on the current record.
pub enum Step<T> {
    /// Write this record (`None`: remove the account), then answer `T`.
    Write(Option<AccountRecord>, T),
    /// Answer without writing.
    Keep(T),
}

fn unavailable(err: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(err.to_string())
}

impl Inner {
    /// The account as cached (or read, when not cached or too old).
    pub async fn account(&self, identity: &Identity) -> StoreResult<Read> {
        match self.cache.account(identity) {
            Some(read) => Ok(read),
            None => self.account_fresh(identity).await,
        }
    }

    /// The account as the stream's leader has it (and cached).
    pub async fn account_fresh(&self, identity: &Identity) -> StoreResult<Read> {
        let names = &self.cluster.names;
        let stored = self
            .cluster
            .last_from_leader(&names.accounts_stream(), &names.account(identity))
            .await?;
        let read = match stored {
            None => Read {
                record: None,
                seq: 0,
            },
            Some(stored) if stored.payload.is_empty() => Read {
                record: None,
                seq: stored.sequence,
            },
            Some(stored) => Read {
                record: Some(Arc::new(
                    decode(&stored.payload).ok_or(NatsError::Corrupt("account record"))?,
                )),
                seq: stored.sequence,
            },
        };
        self.cache.put(*identity, read.clone());
        Ok(read)
    }

    /// The account if `identity` has `device` registered; a miss is confirmed by the leader.
    pub async fn registration(
        &self,
        identity: &Identity,
        device: u32,
    ) -> StoreResult<Option<Arc<AccountRecord>>> {
        let read = self.account(identity).await?;
        let found = |read: &Read| {
            read.record
                .clone()
                .filter(|a| a.registered(device).is_some())
        };
        if let Some(account) = found(&read) {
            return Ok(Some(account));
        }
        Ok(found(&self.account_fresh(identity).await?))
    }

    /// Runs `step` on the current account and writes what it returns with compare-and-set,
    /// again on conflict; announces the change.
    pub async fn update_account<T>(
        &self,
        identity: &Identity,
        mut step: impl FnMut(Option<&AccountRecord>) -> StoreResult<Step<T>>,
    ) -> StoreResult<T> {
        let subject = self.cluster.names.account(identity);
        for attempt in 0..MAX_ATTEMPTS {
            if attempt >= 2 {
                let most = u64::from(attempt.min(20)) * 500;
                tokio::time::sleep(Duration::from_micros(rand::random::<u64>() % most)).await;
            }
            let read = self.account_fresh(identity).await?;
            let (record, answer) = match step(read.record.as_deref())? {
                Step::Keep(answer) => return Ok(answer),
                Step::Write(record, answer) => (record, answer),
            };
            // An account without devices goes: its record is emptied (the stream keeps one
            // message per subject), and so are its contacts and tickets.
            let body = match &record {
                Some(record) if record.is_registered() => encode(record),
                _ => Bytes::new(),
            };
            let written = self
                .cluster
                .compare_and_set(subject.clone(), read.seq, body.clone(), |_| {})
                .await?;
            if let Some(seq) = written {
                let record = record.filter(AccountRecord::is_registered).map(Arc::new);
                if record.is_none() {
                    self.purge_account_records(identity).await;
                }
                self.cache.put(*identity, Read { record, seq });
                self.announce(identity, seq, None).await;
                return Ok(answer);
            }
        }
        Err(NatsError::Contended("an account record").into())
    }

    /// Tells every relay that an account changed to version `seq` (0: not the account
    /// record), or that a device runs low on prekeys.
    pub async fn announce(&self, identity: &Identity, seq: u64, low: Option<(u32, u32)>) {
        let notice = AccountNotice {
            identity: identity.to_vec(),
            low_device: low.map(|(device, _)| device),
            low_count: low.map_or(0, |(_, count)| count),
            seq,
        };
        if let Err(err) = self
            .cluster
            .client
            .publish(self.cluster.names.account_changes(), encode(&notice))
            .await
        {
            tracing::warn!(error = %err, "an account notice was not published");
        }
    }

    /// The contacts and tickets of an account that went.
    async fn purge_account_records(&self, identity: &Identity) {
        let names = &self.cluster.names;
        let stream = names.accounts_stream();
        for filter in [names.contacts_of(identity), names.tickets_of(identity)] {
            if let Err(err) = self.cluster.purge(&stream, &filter, None).await {
                tracing::warn!(error = %err, "records of a removed account were not purged");
            }
        }
    }

    /// Identities the relay holds (within the slack of registrations under way).
    async fn identities(&self) -> StoreResult<usize> {
        let names = &self.cluster.names;
        let first = self
            .cluster
            .next(&names.accounts_stream(), &names.all_accounts(), 1)
            .await?;
        Ok(first.map_or(0, |m| m.pending as usize + 1))
    }

    pub async fn register(&self, me: Identity, reg: Registration, now_ms: u64) -> StoreResult<u32> {
        let names = &self.cluster.names;
        let device = reg.device;
        let count = reg.one_time_prekeys.len() as u32;
        let generation: u64 = rand::random();
        // The keys of this registration first, under a generation of their own: the account
        // names them only once the compare-and-set below succeeds.
        let keys = KeysRecord {
            registration_id: reg.registration_id,
            identity_key: reg.identity_key,
            signed_prekey: Some(reg.signed_prekey),
            low_announced: false,
        };
        let keys_subject = names.keys(&me, device, generation);
        self.cluster
            .publish(keys_subject.clone(), HeaderMap::new(), encode(&keys))
            .await?;
        let prekeys_subject = names.prekeys(&me, device, generation);
        if let Err(err) = self
            .publish_prekeys(&prekeys_subject, reg.one_time_prekeys)
            .await
        {
            self.drop_keys(&keys_subject, &prekeys_subject).await;
            return Err(err);
        }
        let limits = self.limits.clone();
        let mut identities = None;
        let outcome = loop {
            let new_account = self.account_fresh(&me).await?.registered().is_none();
            if new_account && identities.is_none() {
                let count = self.identities().await?;
                if let Err(err) = limits.check_new_identity(count) {
                    break Err(err);
                }
                identities = Some(count);
            }
            let written = self
                .update_account(&me, |account| {
                    let mut account = account.cloned().unwrap_or_default();
                    let was = account.slot(device).cloned();
                    let registered = was.as_ref().is_some_and(|s| s.registered);
                    if account.is_registered() == new_account {
                        // Created or removed by someone else meanwhile: decide again.
                        return Ok(Step::Keep(None));
                    }
                    if !registered {
                        limits.check_new_device(
                            account.active_devices(),
                            account.devices.len(),
                            was.is_some(),
                        )?;
                    }
                    account.last_seen_ms = account.last_seen_ms.max(now_ms);
                    let slot = account.slot_entry(device);
                    let old_keys = registered.then_some(slot.keys_generation);
                    if !registered {
                        slot.mailbox_generation = rand::random();
                    }
                    slot.registered = true;
                    slot.keys_generation = generation;
                    Ok(Step::Write(Some(account), Some(old_keys)))
                })
                .await;
            match written {
                Ok(Some(old)) => break Ok(old),
                Ok(None) => continue,
                Err(err) => break Err(err),
            }
        };
        match outcome {
            Ok(old_keys) => {
                if let Some(old) = old_keys {
                    // Re-registered: the earlier registration's keys go.
                    self.drop_keys(
                        &names.keys(&me, device, old),
                        &names.prekeys(&me, device, old),
                    )
                    .await;
                }
                Ok(count)
            }
            Err(err) => {
                self.drop_keys(&keys_subject, &prekeys_subject).await;
                Err(err)
            }
        }
    }

    async fn drop_keys(&self, keys: &str, prekeys: &str) {
        let names = &self.cluster.names;
        for (stream, subject) in [
            (names.accounts_stream(), keys),
            (names.prekeys_stream(), prekeys),
        ] {
            if let Err(err) = self.cluster.purge(&stream, subject, None).await {
                tracing::warn!(error = %err, "the keys of a registration were not removed");
            }
        }
    }

    pub async fn unregister(&self, me: Identity, device: u32) -> StoreResult<()> {
        let mailbox = MailboxId {
            identity: me,
            device,
        };
        // The ids the mailbox had stay counted by the device's next registrations.
        let floor = self.last_id(mailbox).await?;
        let slot = self
            .update_account(&me, |account| {
                let mut account = account.cloned().unwrap_or_default();
                let slot = account
                    .registered(device)
                    .cloned()
                    .ok_or(StoreError::NotRegistered(device))?;
                let retired = account.slot_entry(device);
                retired.registered = false;
                retired.id_floor = retired.id_floor.max(floor);
                Ok(Step::Write(Some(account), slot))
            })
            .await?;
        self.close_mailbox(&me, device, &slot).await;
        Ok(())
    }

    /// A registration ended: its keys, mailbox and byte counter go, and every relay hears
    /// that the mailbox closed.
    pub async fn close_mailbox(
        &self,
        identity: &Identity,
        device: u32,
        slot: &super::records::DeviceSlot,
    ) {
        let names = &self.cluster.names;
        self.drop_keys(
            &names.keys(identity, device, slot.keys_generation),
            &names.prekeys(identity, device, slot.keys_generation),
        )
        .await;
        let mailbox = MailboxId {
            identity: *identity,
            device,
        };
        let key = MailboxKey {
            id: mailbox,
            generation: slot.mailbox_generation,
        };
        let token = key.token();
        let stream = names.message_stream(names.stream_of(&token));
        if let Err(err) = self
            .cluster
            .purge(&stream, &names.mailbox_subject(&token), None)
            .await
        {
            tracing::warn!(error = %err, "an unregistered mailbox was not purged");
        }
        for (stream, subject) in [
            (names.usage_stream(), names.usage(&mailbox)),
            (names.accounts_stream(), names.last_removed(&token)),
        ] {
            let _ = self.cluster.purge(&stream, &subject, None).await;
        }
        self.usage.forget(&mailbox);
        let notice = GoneNotice {
            ids: Vec::new(),
            closed: true,
        };
        let _ = self
            .cluster
            .client
            .publish(names.gone_subject(&token), encode(&notice))
            .await;
        if let Some(listener) = self.live.listener.get() {
            listener.closed(&mailbox);
        }
        self.live.closed(&mailbox);
    }

    pub async fn set_policy(&self, me: Identity, accept: Accept) -> StoreResult<()> {
        self.update_account(&me, |account| {
            let account = account
                .filter(|a| a.is_registered())
                .ok_or(StoreError::IdentityNotRegistered)?;
            if account.accept == accept as i32 {
                return Ok(Step::Keep(()));
            }
            let mut account = account.clone();
            account.accept = accept as i32;
            Ok(Step::Write(Some(account), ()))
        })
        .await
    }

    /// Whether `sender` is a contact of `recipient` (cached; a "no" is confirmed by the
    /// leader, since refusing is what it decides).
    pub async fn is_contact(&self, recipient: &Identity, sender: &Identity) -> StoreResult<bool> {
        let key = (*recipient, *sender);
        if self.cache.is_contact(recipient, sender) {
            return Ok(true);
        }
        let names = &self.cluster.names;
        let yes = self
            .cluster
            .last_from_leader(&names.accounts_stream(), &names.contact(recipient, sender))
            .await?
            .is_some_and(|m| !m.payload.is_empty());
        let mut contacts = self.cache.contacts.lock();
        if contacts.len() >= MAX_CACHED {
            contacts.clear();
        }
        contacts.insert(key, (Instant::now(), yes));
        Ok(yes)
    }

    /// Adds or removes a contact: the contact's record and the account's count, as one atomic
    /// batch conditioned on both.
    pub async fn change_contact(
        &self,
        me: Identity,
        contact: Identity,
        add: bool,
    ) -> StoreResult<()> {
        let names = &self.cluster.names;
        let contact_subject = names.contact(&me, &contact);
        for _ in 0..MAX_ATTEMPTS {
            let read = self.account_fresh(&me).await?;
            let account = read
                .registered()
                .ok_or(StoreError::IdentityNotRegistered)?
                .clone();
            let existing = self
                .cluster
                .last_from_leader(&names.accounts_stream(), &contact_subject)
                .await?;
            let present = existing.as_ref().is_some_and(|m| !m.payload.is_empty());
            if present == add {
                return Ok(());
            }
            if add {
                self.limits.check_new_contact(account.contacts as usize)?;
            }
            let mut changed = account;
            changed.contacts = if add {
                changed.contacts + 1
            } else {
                changed.contacts.saturating_sub(1)
            };
            let contact_seq = existing.map_or(0, |m| m.sequence);
            // A removed contact is an empty record: the stream keeps one message per subject.
            let body = if add {
                Bytes::from_static(b"\x01")
            } else {
                Bytes::new()
            };
            match self
                .cluster
                .atomic_batch(vec![
                    (contact_subject.clone(), expect(contact_seq), body),
                    (names.account(&me), expect(read.seq), encode(&changed)),
                ])
                .await
            {
                Ok(seq) => {
                    // The account is the batch's last message.
                    self.cache.changed(&me, seq);
                    self.announce(&me, seq, None).await;
                    return Ok(());
                }
                Err(err) if err.is_lost_race() => continue,
                Err(err) => return Err(err.into()),
            }
        }
        Err(NatsError::Contended("a contact").into())
    }

    pub async fn create_ticket(
        &self,
        me: Identity,
        token: [u8; TICKET_LEN],
        expires_at_ms: u64,
        uses: u32,
        now_ms: u64,
    ) -> StoreResult<()> {
        if self.account_fresh(&me).await?.registered().is_none() {
            return Err(StoreError::IdentityNotRegistered);
        }
        let names = &self.cluster.names;
        // Expired tickets are removed by the server (their TTL), used-up ones soon after
        // (`USED_UP_TTL`): what is stored is few, and only live ones count.
        let stored = self
            .cluster
            .batch(
                &names.accounts_stream(),
                &names.tickets_of(&me),
                1,
                super::client::MAX_GET_BATCH,
            )
            .await?;
        let unexpired = stored
            .iter()
            .filter_map(|m| decode::<TicketRecord>(&m.payload))
            .filter(|t| t.expires_at_ms > now_ms && t.uses_left > 0)
            .count();
        self.limits.check_new_ticket(unexpired)?;
        let record = TicketRecord {
            expires_at_ms,
            uses_left: uses,
        };
        let ttl_s = expires_at_ms.saturating_sub(now_ms).div_ceil(1000).max(1);
        let written = self
            .cluster
            .compare_and_set(names.ticket(&me, &token), 0, encode(&record), |headers| {
                headers.insert("Nats-TTL", ttl_s.to_string().as_str());
            })
            .await?;
        written
            .map(drop)
            .ok_or_else(|| unavailable("a ticket token was generated twice"))
    }

    /// What the recipient's account knows of an offered ticket.
    pub async fn ticket(
        &self,
        recipient: &Identity,
        token: Option<&[u8; TICKET_LEN]>,
    ) -> StoreResult<(TicketOffer, u64)> {
        let Some(token) = token else {
            return Ok((TicketOffer::None, 0));
        };
        let names = &self.cluster.names;
        let stored = self
            .cluster
            .last_from_leader(&names.accounts_stream(), &names.ticket(recipient, token))
            .await?;
        Ok(
            match stored.and_then(|m| Some((decode::<TicketRecord>(&m.payload)?, m.sequence))) {
                None => (TicketOffer::Unknown, 0),
                Some((ticket, seq)) => (
                    TicketOffer::Known {
                        expires_at_ms: ticket.expires_at_ms,
                        uses_left: ticket.uses_left,
                    },
                    seq,
                ),
            },
        )
    }

    /// Uses one use of a ticket and makes the sender a contact of the recipient, in one
    /// atomic batch conditioned on the ticket and the account; `false` when something changed
    /// first (decide again).
    pub async fn admit_by_ticket(
        &self,
        recipient: &Identity,
        sender: &Identity,
        token: &[u8; TICKET_LEN],
        ticket_seq: u64,
        now_ms: u64,
    ) -> StoreResult<bool> {
        let names = &self.cluster.names;
        let read = self.account_fresh(recipient).await?;
        let Some(account) = read.registered() else {
            return Err(StoreError::UnknownRecipient);
        };
        let (offer, seq) = self.ticket(recipient, Some(token)).await?;
        if seq != ticket_seq {
            return Ok(false);
        }
        let TicketOffer::Known {
            expires_at_ms,
            uses_left,
        } = offer
        else {
            return Ok(false);
        };
        let mut changed = account.clone();
        changed.contacts += 1;
        let ticket = TicketRecord {
            expires_at_ms,
            uses_left: uses_left.saturating_sub(1),
        };
        let mut ttl_s = expires_at_ms.saturating_sub(now_ms).div_ceil(1000).max(1);
        if ticket.uses_left == 0 {
            ttl_s = ttl_s.min(USED_UP_TTL.as_secs());
        }
        let mut ticket_headers = expect(ticket_seq);
        ticket_headers.insert("Nats-TTL", ttl_s.to_string().as_str());
        let contact_subject = names.contact(recipient, sender);
        let contact_seq = self
            .cluster
            .last_from_leader(&names.accounts_stream(), &contact_subject)
            .await?
            .map_or(0, |m| m.sequence);
        match self
            .cluster
            .atomic_batch(vec![
                (
                    names.ticket(recipient, token),
                    ticket_headers,
                    encode(&ticket),
                ),
                (
                    contact_subject,
                    expect(contact_seq),
                    Bytes::from_static(b"\x01"),
                ),
                (names.account(recipient), expect(read.seq), encode(&changed)),
            ])
            .await
        {
            Ok(seq) => {
                self.cache.changed(recipient, seq);
                self.announce(recipient, seq, None).await;
                Ok(true)
            }
            Err(err) if err.is_lost_race() => Ok(false),
            Err(err) => Err(err.into()),
        }
    }

    pub async fn touch(&self, identity: Identity, now_ms: u64) {
        let interval = self.limits.touch_interval_ms;
        let touched = self
            .update_account(&identity, |account| match account {
                Some(account)
                    if account.is_registered()
                        && now_ms >= account.last_seen_ms.saturating_add(interval) =>
                {
                    let mut account = account.clone();
                    account.last_seen_ms = now_ms;
                    Ok(Step::Write(Some(account), ()))
                }
                _ => Ok(Step::Keep(())),
            })
            .await;
        if let Err(err) = touched {
            tracing::debug!(error = %err, "account use not recorded");
        }
    }

    /// Removes the accounts last used before the cutoff; returns how many. Lists the
    /// accounts, so it runs at most every [`super::ACCOUNT_SWEEP_EVERY`] per relay.
    pub async fn expire_accounts(&self, cutoff_ms: u64) -> StoreResult<usize> {
        let names = &self.cluster.names;
        let stream = names.accounts_stream();
        let mut from = 1;
        let mut idle = Vec::new();
        // Bounded by the identity limit: every account is one message here.
        for _ in 0..=(self.limits.max_identities / super::client::MAX_GET_BATCH + 1) {
            let batch = self
                .cluster
                .batch(
                    &stream,
                    &names.all_accounts(),
                    from,
                    super::client::MAX_GET_BATCH,
                )
                .await?;
            let Some(last) = batch.last() else {
                break;
            };
            from = last.sequence + 1;
            for stored in &batch {
                let Some(account) = decode::<AccountRecord>(&stored.payload) else {
                    continue;
                };
                if account.is_registered() && account.last_seen_ms < cutoff_ms {
                    if let Some(identity) = names.account_identity(&stored.subject) {
                        idle.push(identity);
                    }
                }
            }
        }
        let mut removed = 0;
        for identity in idle {
            let closed = self
                .update_account(&identity, |account| match account {
                    Some(account)
                        if account.is_registered() && account.last_seen_ms < cutoff_ms =>
                    {
                        let slots: Vec<_> = account
                            .devices
                            .iter()
                            .filter(|s| s.registered)
                            .cloned()
                            .collect();
                        Ok(Step::Write(None, Some(slots)))
                    }
                    _ => Ok(Step::Keep(None)),
                })
                .await?;
            let Some(slots) = closed else { continue };
            removed += 1;
            for slot in slots {
                self.close_mailbox(&identity, slot.device_id, &slot).await;
            }
        }
        Ok(removed)
    }

    /// The keys record of a registration after an upload: its signed prekey replaced (if
    /// given), and `PreKeysLow` armed again once the count is back at the threshold.
    pub async fn update_keys(
        &self,
        me: &Identity,
        device: u32,
        generation: u64,
        signed_prekey: Option<SignedPreKey>,
        count: u32,
    ) -> StoreResult<()> {
        let names = &self.cluster.names;
        let subject = names.keys(me, device, generation);
        for _ in 0..MAX_ATTEMPTS {
            let stored = self
                .cluster
                .last_from_leader(&names.accounts_stream(), &subject)
                .await?
                .ok_or(StoreError::NotRegistered(device))?;
            let mut keys: KeysRecord =
                decode(&stored.payload).ok_or(NatsError::Corrupt("keys record"))?;
            let rearm = keys.low_announced && !self.limits.prekeys_low(count);
            if signed_prekey.is_none() && !rearm {
                return Ok(());
            }
            if let Some(signed_prekey) = &signed_prekey {
                keys.signed_prekey = Some(signed_prekey.clone());
            }
            if rearm {
                keys.low_announced = false;
            }
            if self
                .cluster
                .compare_and_set(subject.clone(), stored.sequence, encode(&keys), |_| {})
                .await?
                .is_some()
            {
                return Ok(());
            }
        }
        Err(NatsError::Contended("a keys record").into())
    }

    /// The one-time prekeys of a registration, as an atomic batch (all or none: the
    /// subject's limit is `max_prekeys_per_device`).
    pub async fn publish_prekeys(&self, subject: &str, keys: Vec<PreKey>) -> StoreResult<()> {
        use prost::Message as _;
        if keys.is_empty() {
            return Ok(());
        }
        let messages = keys
            .into_iter()
            .map(|key| {
                (
                    subject.to_owned(),
                    HeaderMap::new(),
                    Bytes::from(key.encode_to_vec()),
                )
            })
            .collect();
        match self.cluster.atomic_batch(messages).await {
            Ok(_) => Ok(()),
            Err(err) if err.code() == Some(super::error::code::MAX_MESSAGES_PER_SUBJECT) => {
                Err(crate::store::StoreError::Limit {
                    kind: crate::store::QuotaKind::Prekeys,
                    message: format!(
                        "a device stores at most {} one-time prekeys",
                        self.limits.max_prekeys_per_device
                    ),
                })
            }
            Err(err) => Err(err.into()),
        }
    }
}

/// Headers that make a write conditional on the subject's last sequence.
fn expect(seq: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        "Nats-Expected-Last-Subject-Sequence",
        seq.to_string().as_str(),
    );
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_account_is_read_again_from_half_its_trust_on() {
        let cache = Cache::default();
        let identity = [5; 33];
        assert!(
            !cache.ageing(&identity),
            "nothing cached: nothing to read ahead"
        );
        cache.put(
            identity,
            Read {
                record: None,
                seq: 1,
            },
        );
        assert!(!cache.ageing(&identity));
        tokio::time::advance(CACHE_TTL / 2).await;
        assert!(cache.ageing(&identity));
        assert!(cache.account(&identity).is_some(), "still trusted");
        cache.changed(&identity, 2);
        assert!(
            !cache.ageing(&identity),
            "an announced change is read when needed, not ahead"
        );
    }
}
