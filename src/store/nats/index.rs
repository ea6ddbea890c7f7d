//! What a relay knows of the mailboxes it delivers from: the stored messages it has seen, in
//! id order, and whether it has seen every one from the mailbox's first on. With that, an ack
//! of the oldest messages (what a subscriber that keeps up sends) is one purge of the mailbox's
//! subject below an id, instead of a delete per message, and an ack never needs to read a
//! message to learn whose it is. A mailbox whose index knows all of it (or knows it holds
//! nothing) and has not changed for a while also tells what its byte counter should say
//! ([`Indexes::settled`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ahash::AHashMap;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::names::MailboxKey;
use crate::store::MailboxId;

/// Messages one mailbox's index holds at most; past this it starts over, unknown (acks then
/// delete one message at a time until a read from the first message rebuilds it).
const MAX_INDEXED: usize = 4096;
/// Indexes of mailboxes no longer delivered from, kept until their byte counter is checked;
/// past this many they are dropped unchecked.
const MAX_RETIRED: usize = 4096;

#[derive(Debug)]
struct MailboxIndex {
    key: MailboxKey,
    /// Stored messages seen, with their payload bytes.
    stored: BTreeMap<u64, u32>,
    /// Every stored message with an id up to this is in `stored`, when known: the index has
    /// seen the mailbox from its first message on, without a gap.
    complete_through: Option<u64>,
    /// The last change (numbered across all mailboxes, so a reset index never repeats one),
    /// and when it was.
    change: u64,
    changed_at: Instant,
    /// Where checking the byte counter against this index stands.
    check: CounterCheck,
}

/// Where checking a mailbox's byte counter against its index stands. A change of the index
/// makes any check stale: the next one is due once the index is quiet again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CounterCheck {
    /// Checked since the last change, found right (or corrected and checked again until
    /// [`RECHECK_UNTIL`]).
    Done { change: u64 },
    /// Corrected since the last change: checked again at `at`, then `after` later. A relay's
    /// increment that a fault delayed (written again at each flush until the cluster takes it)
    /// can land after a correction that did not count it, and put the counter off again.
    Again {
        change: u64,
        at: Instant,
        after: Duration,
    },
}

/// The first check again after a correction, and the spacing past which they stop (doubling
/// from the first): 2, 4, 8, 16, 32 s, about a minute in all.
pub const RECHECK_FIRST: Duration = Duration::from_secs(2);
pub const RECHECK_UNTIL: Duration = Duration::from_secs(32);

impl MailboxIndex {
    fn new(key: MailboxKey) -> Self {
        Self {
            key,
            stored: BTreeMap::new(),
            complete_through: None,
            change: 0,
            changed_at: Instant::now(),
            check: CounterCheck::Done { change: 0 },
        }
    }

    /// Whether `id` was known and has left: the index has seen every message through it, and
    /// it is not among them any more. A read or a live message that reports it afterwards (a
    /// read answered before an ack's purge, a republished message that arrives after the
    /// message was delivered from a read and acknowledged) is late, and must not bring it back:
    /// a stale entry would stop every later ack from being one purge.
    fn removed(&self, id: u64) -> bool {
        self.complete_through.is_some_and(|through| id <= through) && !self.stored.contains_key(&id)
    }

    /// When the byte counter is next to be checked against this index (`None`: not until it
    /// changes): once quiet for `SETTLE_AFTER` after a change, or as a check again asks.
    fn check_due_at(&self) -> Option<Instant> {
        match self.check {
            CounterCheck::Done { change } if change == self.change => None,
            CounterCheck::Again { change, at, .. } if change == self.change => Some(at),
            _ => Some(self.changed_at + super::usage::SETTLE_AFTER),
        }
    }

    /// Whether the index can tell what the byte counter should say: it knows the mailbox from
    /// its first message on, or knows of no stored message (then the mailbox must be empty).
    fn checkable(&self) -> bool {
        self.complete_through.is_some() || self.stored.is_empty()
    }

    /// Forgets everything known (the change is still marked by the caller).
    fn reset(&mut self) {
        self.stored.clear();
        self.complete_through = None;
    }
}

/// A mailbox whose index has not changed since `change`: what it holds (`count` messages of
/// `bytes` payload bytes), to check its byte counter against. `through`: the index knows every
/// stored message through this id; `None`: it does not know the mailbox from its first
/// message on (a deletion failed, or the delivery started in the middle) but knows of no
/// stored message, so the counter is checked only if the mailbox is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub key: MailboxKey,
    pub change: u64,
    pub through: Option<u64>,
    pub count: u64,
    pub bytes: u64,
}

/// What an ack of a set of ids may do.
#[derive(Debug, PartialEq, Eq)]
pub enum AckPlan {
    /// The acked ids are the mailbox's oldest: purge below `below`; the stored messages
    /// `gone` (of `bytes` payload bytes) go.
    Purge {
        below: u64,
        gone: Vec<u64>,
        bytes: u64,
    },
    /// Delete these ids one by one (`known`: their bytes, as the index has them; `unknown`:
    /// read first, to check they are the mailbox's).
    Each {
        known: Vec<(u64, u32)>,
        unknown: Vec<u64>,
    },
}

/// The indexes of the mailboxes a relay delivers from; each changes with what the relay sees
/// of its mailbox. Those of mailboxes it stopped delivering from are retired (they no longer
/// change) until their byte counter was checked.
#[derive(Default)]
pub struct Indexes {
    mailboxes: Mutex<AHashMap<MailboxId, MailboxIndex>>,
    retired: Mutex<AHashMap<MailboxId, MailboxIndex>>,
    changes: AtomicU64,
}

impl Indexes {
    fn changed(&self, index: &mut MailboxIndex) {
        index.change = self.changes.fetch_add(1, Ordering::Relaxed) + 1;
        index.changed_at = Instant::now();
    }

    /// Starts indexing a mailbox (idempotent; a retired index missed what happened since).
    pub fn watch(&self, key: MailboxKey) {
        self.retired.lock().remove(&key.id);
        self.mailboxes
            .lock()
            .entry(key.id)
            .or_insert_with(|| MailboxIndex::new(key));
    }

    /// Stops indexing a mailbox; what it knew is kept for the counter check when it can tell
    /// and is unchecked.
    pub fn unwatch(&self, mailbox: &MailboxId) {
        let Some(index) = self.mailboxes.lock().remove(mailbox) else {
            return;
        };
        if index.checkable() && index.check_due_at().is_some() {
            let mut retired = self.retired.lock();
            if retired.len() < MAX_RETIRED {
                retired.insert(*mailbox, index);
            }
        }
    }

    /// Drops a mailbox that closed, retired or not.
    pub fn forget(&self, mailbox: &MailboxId) {
        self.mailboxes.lock().remove(mailbox);
        self.retired.lock().remove(mailbox);
    }

    /// Messages read from the store: every stored message with an id above `after`, up to the
    /// last of them (a read returns them in id order, without gaps).
    pub fn read(&self, mailbox: &MailboxId, messages: &[(u64, u32)], after: u64) {
        let mut all = self.mailboxes.lock();
        let Some(index) = all.get_mut(mailbox) else {
            return;
        };
        let before = (index.stored.len(), index.complete_through);
        for &(id, bytes) in messages {
            if !index.removed(id) {
                index.stored.insert(id, bytes);
            }
        }
        // A read from the beginning, or from within what is known, extends what is known.
        let joins = after == 0 || index.complete_through.is_some_and(|t| after <= t);
        if joins {
            let through = messages.last().map_or(after, |(id, _)| *id);
            index.complete_through = Some(index.complete_through.unwrap_or(0).max(through));
        }
        trim(index);
        // A read that found nothing new (a resync) is no change.
        if (index.stored.len(), index.complete_through) != before {
            self.changed(index);
        }
    }

    /// A message stored live, with the id stored just before it in the mailbox (`prev`, 0 for
    /// none).
    pub fn stored(&self, mailbox: &MailboxId, id: u64, bytes: u32, prev: Option<u64>) {
        let mut all = self.mailboxes.lock();
        let Some(index) = all.get_mut(mailbox) else {
            return;
        };
        if index.removed(id) {
            return;
        }
        index.stored.insert(id, bytes);
        index.complete_through = match (index.complete_through, prev) {
            // The mailbox held nothing before it.
            (_, Some(0)) => Some(id),
            (Some(through), Some(prev)) if prev <= through => Some(through.max(id)),
            // A predecessor the index has not seen: it no longer knows everything.
            (Some(_), _) => None,
            (None, _) => None,
        };
        trim(index);
        self.changed(index);
    }

    /// Messages that left the mailbox.
    pub fn removed(&self, mailbox: &MailboxId, ids: &[u64]) {
        if let Some(index) = self.mailboxes.lock().get_mut(mailbox) {
            for id in ids {
                index.stored.remove(id);
            }
            self.changed(index);
        }
    }

    /// What an ack of `ids` (sorted, distinct) may do. The messages it will delete leave the
    /// index at once, so that the next ack (pipelined behind this one) plans on what stays;
    /// if the deletion fails, [`Indexes::failed`] says the index no longer knows.
    pub fn plan(&self, mailbox: &MailboxId, ids: &[u64]) -> AckPlan {
        let mut all = self.mailboxes.lock();
        let index = all.get_mut(mailbox);
        let plan = Self::plan_in(index.as_deref(), ids);
        if let Some(index) = index {
            self.changed(index);
            match &plan {
                AckPlan::Purge { below, .. } => index.stored = index.stored.split_off(below),
                AckPlan::Each { known, .. } => {
                    for (id, _) in known {
                        index.stored.remove(id);
                    }
                }
            }
        }
        plan
    }

    fn plan_in(index: Option<&MailboxIndex>, ids: &[u64]) -> AckPlan {
        if let (Some(index), Some(&max)) = (index, ids.last()) {
            if index.complete_through.is_some_and(|through| max <= through) {
                // Every stored message up to `max` is known: a purge is right when each of
                // them is acked.
                let older: Vec<(u64, u32)> = index
                    .stored
                    .range(..=max)
                    .map(|(id, bytes)| (*id, *bytes))
                    .collect();
                if older.iter().all(|(id, _)| ids.binary_search(id).is_ok()) {
                    return AckPlan::Purge {
                        below: max + 1,
                        bytes: older.iter().map(|(_, b)| u64::from(*b)).sum(),
                        gone: older.into_iter().map(|(id, _)| id).collect(),
                    };
                }
            }
        }
        let mut known = Vec::new();
        let mut unknown = Vec::new();
        for &id in ids {
            match index.and_then(|i| i.stored.get(&id)) {
                Some(bytes) => known.push((id, *bytes)),
                None => unknown.push(id),
            }
        }
        AckPlan::Each { known, unknown }
    }

    /// A planned deletion failed: what the index holds may be wrong.
    pub fn failed(&self, mailbox: &MailboxId) {
        if let Some(index) = self.mailboxes.lock().get_mut(mailbox) {
            index.reset();
            self.changed(index);
        }
    }

    /// The newest message the index knows stored in the mailbox (told by a live message or a
    /// read, and not removed since).
    pub fn newest_stored(&self, mailbox: &MailboxId) -> Option<u64> {
        let all = self.mailboxes.lock();
        all.get(mailbox)?.stored.keys().next_back().copied()
    }

    /// Whether the index knows the mailbox holds nothing (after an ack emptied it).
    pub fn known_empty(&self, mailbox: &MailboxId) -> bool {
        self.mailboxes
            .lock()
            .get(mailbox)
            .is_some_and(|i| i.stored.is_empty() && i.complete_through.is_some())
    }

    /// Mailboxes whose index can tell what their byte counter should say (known from the
    /// first message on, or knowing of no stored message) and whose counter is due for a check
    /// (quiet for `SETTLE_AFTER` since their last change, or asked to be checked again), at
    /// most `max`.
    pub fn settled(&self, max: usize) -> Vec<Settled> {
        let now = Instant::now();
        let of = |index: &MailboxIndex| {
            if index.check_due_at()? > now || !index.checkable() {
                return None;
            }
            Some(Settled {
                key: index.key,
                change: index.change,
                through: index.complete_through,
                count: index.stored.len() as u64,
                bytes: index.stored.values().map(|b| u64::from(*b)).sum(),
            })
        };
        let mut settled: Vec<Settled> = self
            .mailboxes
            .lock()
            .values()
            .filter_map(of)
            .take(max)
            .collect();
        let room = max - settled.len();
        settled.extend(self.retired.lock().values().filter_map(of).take(room));
        settled
    }

    /// Whether a mailbox's index is as it was at `change`.
    pub fn unchanged_since(&self, mailbox: &MailboxId, change: u64) -> bool {
        let same = |index: &MailboxIndex| index.change == change;
        self.mailboxes.lock().get(mailbox).is_some_and(same)
            || self.retired.lock().get(mailbox).is_some_and(same)
    }

    /// The byte counter of a mailbox was checked at `change` (and `corrected`, or found
    /// right): not again until it changes, unless a correction asks for checks again. A retired
    /// index never changes, and goes once done.
    pub fn checked(&self, mailbox: &MailboxId, change: u64, corrected: bool) {
        let now = Instant::now();
        let next = |index: &mut MailboxIndex| {
            if index.change != change {
                return;
            }
            index.check = match (index.check, corrected) {
                (_, true) => CounterCheck::Again {
                    change,
                    at: now + RECHECK_FIRST,
                    after: RECHECK_FIRST,
                },
                (
                    CounterCheck::Again {
                        change: c, after, ..
                    },
                    false,
                ) if c == change && after < RECHECK_UNTIL => CounterCheck::Again {
                    change,
                    at: now + after * 2,
                    after: after * 2,
                },
                _ => CounterCheck::Done { change },
            };
        };
        if let Some(index) = self.mailboxes.lock().get_mut(mailbox) {
            next(index);
        }
        let mut retired = self.retired.lock();
        if let Some(index) = retired.get_mut(mailbox) {
            next(index);
            if index.check == (CounterCheck::Done { change }) {
                retired.remove(mailbox);
            }
        }
    }
}

fn trim(index: &mut MailboxIndex) {
    if index.stored.len() > MAX_INDEXED {
        index.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAILBOX: MailboxId = MailboxId {
        identity: [4; 33],
        device: 1,
    };
    const KEY: MailboxKey = MailboxKey {
        id: MAILBOX,
        generation: 0,
    };

    #[test]
    fn the_newest_stored_message_is_what_was_announced_and_not_removed() {
        let indexes = Indexes::default();
        assert_eq!(indexes.newest_stored(&MAILBOX), None, "not watched");
        indexes.watch(KEY);
        indexes.read(&MAILBOX, &[(3, 10)], 0);
        indexes.stored(&MAILBOX, 9, 5, Some(3));
        assert_eq!(indexes.newest_stored(&MAILBOX), Some(9));
        indexes.removed(&MAILBOX, &[9]);
        assert_eq!(indexes.newest_stored(&MAILBOX), Some(3));
    }

    #[test]
    fn acks_of_the_oldest_messages_are_one_purge() {
        let indexes = Indexes::default();
        indexes.watch(KEY);
        indexes.read(&MAILBOX, &[(3, 10), (7, 20)], 0);
        indexes.stored(&MAILBOX, 9, 5, Some(7));
        assert_eq!(
            indexes.plan(&MAILBOX, &[3, 7]),
            AckPlan::Purge {
                below: 8,
                gone: vec![3, 7],
                bytes: 30
            }
        );
        // Planned on what stays, even before the purge is done.
        assert_eq!(
            indexes.plan(&MAILBOX, &[9]),
            AckPlan::Purge {
                below: 10,
                gone: vec![9],
                bytes: 5
            }
        );
        assert!(indexes.known_empty(&MAILBOX));
    }

    #[test]
    fn skipping_the_oldest_message_means_one_delete_each() {
        let indexes = Indexes::default();
        indexes.watch(KEY);
        indexes.read(&MAILBOX, &[(3, 10), (7, 20)], 0);
        indexes.stored(&MAILBOX, 9, 5, Some(7));
        // A purge below 10 would take 3 too.
        assert_eq!(
            indexes.plan(&MAILBOX, &[7, 9]),
            AckPlan::Each {
                known: vec![(7, 20), (9, 5)],
                unknown: vec![]
            }
        );
        assert_eq!(
            indexes.plan(&MAILBOX, &[3]),
            AckPlan::Purge {
                below: 4,
                gone: vec![3],
                bytes: 10
            }
        );
        indexes.failed(&MAILBOX);
        assert!(!indexes.known_empty(&MAILBOX), "a failure forgets");
    }

    #[test]
    fn a_read_from_within_what_is_known_extends_it() {
        let indexes = Indexes::default();
        indexes.watch(KEY);
        indexes.read(&MAILBOX, &[(3, 1)], 0);
        indexes.read(&MAILBOX, &[(8, 1), (9, 1)], 3);
        indexes.stored(&MAILBOX, 11, 1, Some(9));
        assert!(matches!(
            indexes.plan(&MAILBOX, &[3, 8, 9, 11]),
            AckPlan::Purge { below: 12, .. }
        ));
    }

    #[test]
    fn a_gap_or_a_read_from_the_middle_means_one_delete_each() {
        let indexes = Indexes::default();
        indexes.watch(KEY);
        // Not from the first message: older ones may exist.
        indexes.read(&MAILBOX, &[(5, 1)], 4);
        assert_eq!(
            indexes.plan(&MAILBOX, &[5, 6]),
            AckPlan::Each {
                known: vec![(5, 1)],
                unknown: vec![6]
            }
        );
        indexes.read(&MAILBOX, &[(5, 1)], 0);
        indexes.stored(&MAILBOX, 12, 1, Some(11));
        assert!(matches!(
            indexes.plan(&MAILBOX, &[5, 12]),
            AckPlan::Each { .. }
        ));
        // Not watched: nothing known.
        let other = MailboxId {
            identity: [5; 33],
            device: 1,
        };
        assert_eq!(
            indexes.plan(&other, &[1]),
            AckPlan::Each {
                known: vec![],
                unknown: vec![1]
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_mailbox_known_from_its_first_message_is_settled_once_per_change() {
        let quiet = super::super::usage::SETTLE_AFTER;
        let indexes = Indexes::default();
        indexes.watch(KEY);
        indexes.read(&MAILBOX, &[(3, 10), (7, 20)], 0);
        assert!(indexes.settled(8).is_empty(), "not quiet yet");
        tokio::time::advance(quiet).await;
        let settled = indexes.settled(8);
        assert_eq!(
            settled,
            vec![Settled {
                key: KEY,
                change: settled[0].change,
                through: Some(7),
                count: 2,
                bytes: 30
            }]
        );
        let change = settled[0].change;
        // A resync that finds nothing new is no change.
        indexes.read(&MAILBOX, &[], 7);
        assert!(indexes.unchanged_since(&MAILBOX, change));
        indexes.checked(&MAILBOX, change, false);
        assert!(indexes.settled(8).is_empty(), "checked at this change");

        indexes.stored(&MAILBOX, 9, 5, Some(7));
        assert!(!indexes.unchanged_since(&MAILBOX, change));
        tokio::time::advance(quiet).await;
        let settled = indexes.settled(8);
        assert_eq!((settled[0].through, settled[0].bytes), (Some(9), 35));

        // No longer delivered from: kept, unchanging, until checked.
        indexes.unwatch(&MAILBOX);
        indexes.removed(&MAILBOX, &[9]);
        let retired = indexes.settled(8);
        assert_eq!((retired[0].through, retired[0].bytes), (Some(9), 35));
        indexes.checked(&MAILBOX, retired[0].change, false);
        assert!(indexes.settled(8).is_empty(), "checked, it goes");

        // Known only from the middle: nothing to settle on, whatever the wait.
        indexes.watch(KEY);
        indexes.read(&MAILBOX, &[(9, 5)], 8);
        tokio::time::advance(quiet).await;
        assert!(indexes.settled(8).is_empty());
        indexes.unwatch(&MAILBOX);
        assert!(indexes.settled(8).is_empty(), "incomplete: not kept");

        // A failed deletion: nothing known, not from the first message on. Once the rest is
        // acked, the index knows of no stored message: checked if the mailbox is empty, and
        // kept for that when the delivery ends.
        indexes.watch(KEY);
        indexes.read(&MAILBOX, &[(3, 10), (7, 20)], 0);
        indexes.plan(&MAILBOX, &[3]);
        indexes.failed(&MAILBOX);
        indexes.stored(&MAILBOX, 11, 4, Some(7));
        tokio::time::advance(quiet).await;
        assert!(
            indexes.settled(8).is_empty(),
            "knows of a message, not of all"
        );
        indexes.plan(&MAILBOX, &[11]);
        indexes.unwatch(&MAILBOX);
        tokio::time::advance(quiet).await;
        let settled = indexes.settled(8);
        assert_eq!(
            (settled[0].through, settled[0].count, settled[0].bytes),
            (None, 0, 0)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_corrected_counter_is_checked_again_for_about_a_minute() {
        let indexes = Indexes::default();
        indexes.watch(KEY);
        indexes.read(&MAILBOX, &[(3, 10)], 0);
        tokio::time::advance(super::super::usage::SETTLE_AFTER).await;
        let change = indexes.settled(8)[0].change;
        indexes.checked(&MAILBOX, change, true);
        // Again at 2, 4, 8, 16 and 32 s after, whatever those checks find; a correction
        // among them starts over.
        let mut agains = Vec::new();
        let mut waited = Duration::ZERO;
        for _ in 0..200 {
            tokio::time::advance(Duration::from_millis(500)).await;
            waited += Duration::from_millis(500);
            if !indexes.settled(8).is_empty() {
                agains.push(waited.as_secs_f64());
                waited = Duration::ZERO;
                indexes.checked(&MAILBOX, change, false);
            }
        }
        assert_eq!(agains, vec![2.0, 4.0, 8.0, 16.0, 32.0]);

        // Retired while checked again: kept until the checks are done, then it goes.
        indexes.stored(&MAILBOX, 5, 1, Some(3));
        tokio::time::advance(super::super::usage::SETTLE_AFTER).await;
        let change = indexes.settled(8)[0].change;
        indexes.checked(&MAILBOX, change, true);
        indexes.unwatch(&MAILBOX);
        tokio::time::advance(RECHECK_FIRST).await;
        assert_eq!(indexes.settled(8).len(), 1, "retired, checked again");
        indexes.checked(&MAILBOX, change, true);
        for after in [2, 4, 8, 16, 32] {
            assert!(indexes.settled(8).is_empty());
            tokio::time::advance(Duration::from_secs(after)).await;
            assert_eq!(indexes.settled(8).len(), 1);
            indexes.checked(&MAILBOX, change, false);
        }
        assert!(indexes.retired.lock().is_empty(), "done, it goes");
    }

    #[test]
    fn a_late_report_of_an_acknowledged_message_does_not_bring_it_back() {
        let indexes = Indexes::default();
        indexes.watch(KEY);
        indexes.read(&MAILBOX, &[(3, 10), (7, 20)], 0);
        assert!(matches!(
            indexes.plan(&MAILBOX, &[3]),
            AckPlan::Purge { below: 4, .. }
        ));
        // The republished copy of 3 arrives after it was read, delivered and acknowledged;
        // a read answered before the purge reports it too.
        indexes.stored(&MAILBOX, 3, 10, Some(0));
        indexes.read(&MAILBOX, &[(3, 10), (7, 20)], 0);
        indexes.stored(&MAILBOX, 9, 5, Some(7));
        assert_eq!(
            indexes.plan(&MAILBOX, &[7, 9]),
            AckPlan::Purge {
                below: 10,
                gone: vec![7, 9],
                bytes: 25
            }
        );
        assert!(indexes.known_empty(&MAILBOX));
    }
}
