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

mod accounts;
mod apply;
mod expiry;
mod mailboxes;
mod model;
mod prekeys;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};

use ahash::{AHashMap, AHashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;

use super::journal::{Journal, Progress, MAX_SEQUENCE};
use super::mailbox::{MessageLog, NewRecord, SenderTable, StoredMessage};
use crate::config::Config;
use crate::store::proto::{self as ev, event::Kind, Event, Removal};
use crate::store::{
    AccountLimits, Admission, Appended, Expiry, Fetched, Identity, Listener, MailboxId, Message,
    NewMessage, RecipientView, Registration, StoreError, StoreStats, StoreTotals, TicketOffer,
    NONCE_LEN, TICKET_LEN,
};
use botd_protocol::keys::{sha256, PUBLIC_KEY_LEN, SIGNATURE_LEN};
use botd_protocol::proto::{Accept, PreKey, PreKeyBundle, SignedPreKey};

use apply::{apply, describe_account};
pub use apply::{event_identity, ApplyError};
use model::*;

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
        self.commit_event(shard, &Event { kind: Some(kind) })
    }

    /// [`State::commit`] of an event the caller keeps (to take its values back after).
    fn commit_event(&self, shard: &mut ShardData, event: &Event) -> Result<u64, StoreError> {
        if let Err(err) = apply(shard, event, &self.counters) {
            tracing::error!(error = %err, "live event could not be applied");
            return Err(StoreError::Unavailable(err.to_string()));
        }
        match &self.journal {
            None => Ok(0),
            Some(journal) => journal.record(event).map_err(|err| {
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

// Keep the wire constants and the store's in one place of truth.
const _: () = assert!(NONCE_LEN == 8 && SIGNATURE_LEN == 64);
