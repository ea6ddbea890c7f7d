//! Payload bytes per mailbox, for the byte quotas (`mailbox_max_bytes`,
//! `max_identity_stored_bytes`). The message count per mailbox needs no bookkeeping: the stream
//! enforces it per subject. Bytes are message counters on the cluster (`Nats-Incr`, one per
//! mailbox), which commute, so relays never contend on them:
//!
//! * a relay adds what it stores and subtracts what it deletes locally first, and writes the
//!   sums every [`FLUSH_INTERVAL`] (one increment per mailbox with changes, not one per
//!   message);
//! * it reads an identity's counters (one batched read of all its devices) at most every
//!   [`READ_INTERVAL`] while it sends to it;
//! * a quota is judged on what the relay read plus its own unwritten changes.
//!
//! A counter drifts when a relay dies with changes it has not written (at most
//! [`FLUSH_INTERVAL`] of its sends and acks) or messages expire. It is set right from the
//! messages themselves in two places, so drift never refuses a send and never lasts:
//!
//! * before a send is refused on it, the mailbox's stored messages are counted (at most once
//!   per [`RECOUNT_AFTER`]: the refusals right after trust what that count set);
//! * a relay delivering from a mailbox knows every stored message of it ([`super::index`]);
//!   once that knowledge has not changed for [`SETTLE_AFTER`] (so that every relay's
//!   changes from before are written), the counter is checked against it, within a
//!   [`SETTLE_EVERY`] round. A counter that had to be corrected is checked again for about a
//!   minute ([`super::index::RECHECK_FIRST`]): an increment a fault held back may land after
//!   the correction.
//!
//! Near a quota (past a quarter of it) a send reads the counters at once and writes its own change
//! before it is answered, so the other relays see it. The slack, documented in
//! docs/SCALING.md: below a quarter of a quota, what the other relays stored in the last
//! `FLUSH_INTERVAL + READ_INTERVAL` may be unseen; above it, a quota is passed by at most the
//! sends under way at the same moment on all relays.

use std::time::Duration;

use ahash::AHashMap;
use async_nats::HeaderMap;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::client::Cluster;
use super::error::NatsError;
use crate::store::{Identity, MailboxId};

/// How often a relay writes its counted changes.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// How long a relay trusts the counters it read.
pub const READ_INTERVAL: Duration = Duration::from_millis(250);
/// How long a mailbox's index must stay unchanged before its counter is checked against it:
/// well past `FLUSH_INTERVAL`, so the other relays' changes it reflects are written.
pub const SETTLE_AFTER: Duration = Duration::from_secs(1);
/// How often settled mailboxes are checked, and how many at most per round.
pub const SETTLE_EVERY: Duration = Duration::from_secs(1);
pub const MAX_SETTLED_PER_ROUND: usize = 256;
/// Identities whose counters a relay keeps; past this it forgets them all.
const MAX_CACHED: usize = 65_536;
/// A counter set from its mailbox's messages before a refusal is taken as it is for this long:
/// sends refused on a full mailbox (a sender retrying, or one bent on making the relay read)
/// read the mailbox at most once per interval, not once each.
pub const RECOUNT_AFTER: Duration = Duration::from_secs(1);
/// Mailboxes remembered as counted; past this the ones counted longer ago are forgotten.
const MAX_RECOUNTED: usize = 4096;

/// Bytes per device of one identity.
type Counters = AHashMap<u32, i64>;

/// An increment of one mailbox's counter; retried under the same message id, so that one
/// that was applied but not acknowledged is not counted twice.
struct Increment {
    mailbox: MailboxId,
    delta: i64,
    id: String,
}

/// Payload bytes stored in one mailbox and in all of its identity's mailboxes, as far as this
/// relay knows (a device counted below zero counts as zero).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoredBytes {
    pub mailbox: usize,
    pub identity: usize,
}

impl StoredBytes {
    /// From the bytes per device of an identity, for its mailbox of `device`.
    pub fn of(usage: &AHashMap<u32, i64>, device: u32) -> Self {
        Self::sum(device, usage.iter().map(|(d, b)| (*d, *b)))
    }

    /// From each device's bytes (every device once), for the mailbox of `device`.
    fn sum(device: u32, per_device: impl Iterator<Item = (u32, i64)>) -> Self {
        let mut stored = Self::default();
        for (each, bytes) in per_device {
            let bytes = bytes.max(0) as usize;
            stored.identity += bytes;
            if each == device {
                stored.mailbox = bytes;
            }
        }
        stored
    }
}

#[derive(Default)]
pub struct Usage {
    /// Increments written and not acknowledged: sent again, as they were.
    retry: Mutex<Vec<Increment>>,
    /// Changes counted here and not yet written, per identity and device.
    pending: Mutex<AHashMap<Identity, AHashMap<u32, i64>>>,
    /// Counters read, per identity: when, and the bytes per device.
    read: Mutex<AHashMap<Identity, (Instant, Counters)>>,
    /// When mailboxes were last counted before a refusal.
    recounted: Mutex<AHashMap<MailboxId, Instant>>,
    /// Increments written so far: a read that saw this change while it was under way may
    /// have missed them (see [`Usage::read_now`]).
    writes: std::sync::atomic::AtomicU64,
}

impl Usage {
    pub fn add(&self, mailbox: &MailboxId, delta: i64) {
        if delta != 0 {
            *self
                .pending
                .lock()
                .entry(mailbox.identity)
                .or_default()
                .entry(mailbox.device)
                .or_default() += delta;
        }
    }

    fn pending_of(&self, identity: &Identity) -> AHashMap<u32, i64> {
        self.pending
            .lock()
            .get(identity)
            .cloned()
            .unwrap_or_default()
    }

    /// Whether `identity`'s counters were read and are past half of [`READ_INTERVAL`]: read
    /// them again ahead of their expiry, so that sends keep finding them.
    pub fn ageing(&self, identity: &Identity) -> bool {
        self.read
            .lock()
            .get(identity)
            .is_some_and(|(at, _)| at.elapsed() >= READ_INTERVAL / 2)
    }

    /// Reads `identity`'s counters again (see [`Usage::ageing`]).
    pub async fn refresh(&self, cluster: &Cluster, identity: &Identity) -> Result<(), NatsError> {
        self.read_now(cluster, identity).await.map(drop)
    }

    /// Reads an identity's counters from the cluster (and keeps them).
    async fn read_now(
        &self,
        cluster: &Cluster,
        identity: &Identity,
    ) -> Result<Counters, NatsError> {
        use std::sync::atomic::Ordering;
        let writes_before = self.writes.load(Ordering::Acquire);
        let mut counters = read_counters(cluster, identity).await?;
        let mut read = self.read.lock();
        if self.writes.load(Ordering::Acquire) != writes_before {
            // An increment written meanwhile is in the cached counters (`written`) but may be
            // missing from what was read, and it is no longer pending: keep the higher count
            // until the next read (a count too high is checked against the messages before
            // it refuses anything; one too low would let sends past a quota).
            if let Some((_, cached)) = read.get(identity) {
                counters = at_least(counters, cached);
            }
        }
        if read.len() >= MAX_CACHED {
            read.clear();
        }
        read.insert(*identity, (Instant::now(), counters.clone()));
        Ok(counters)
    }

    /// As [`Usage::of`], read from the cluster now (near a quota).
    pub async fn of_now(
        &self,
        cluster: &Cluster,
        identity: &Identity,
    ) -> Result<AHashMap<u32, i64>, NatsError> {
        let mut bytes = self.read_now(cluster, identity).await?;
        for (device, delta) in self.pending_of(identity) {
            *bytes.entry(device).or_default() += delta;
        }
        Ok(bytes)
    }

    /// Writes a change at once (near a quota, so that the other relays see it before the
    /// send is answered).
    pub async fn write_now(
        &self,
        cluster: &Cluster,
        mailbox: &MailboxId,
        delta: i64,
    ) -> Result<(), NatsError> {
        let increment = Increment {
            mailbox: *mailbox,
            delta,
            id: format!("{:032x}", rand::random::<u128>()),
        };
        let written = match send_increment(cluster, &increment).await {
            Ok(ack) => ack.await.map_err(NatsError::from),
            Err(err) => Err(err),
        };
        match written {
            Ok(_) => {
                self.written(&increment);
                Ok(())
            }
            Err(err) => {
                self.failed(increment, NatsError::request(&err));
                Err(err)
            }
        }
    }

    /// An increment is on the cluster: the counters this relay read include it from now on.
    fn written(&self, increment: &Increment) {
        let mut read = self.read.lock();
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if let Some((_, counters)) = read.get_mut(&increment.mailbox.identity) {
            *counters.entry(increment.mailbox.device).or_default() += increment.delta;
        }
    }

    /// As [`Usage::of`] for one mailbox when the counters read are still fresh, without
    /// waiting (and without copying the counters: this is every `Send`'s fast path).
    pub fn cached(&self, mailbox: &MailboxId) -> Option<StoredBytes> {
        // The only place that holds both locks, always in this order.
        let read = self.read.lock();
        let (at, counters) = read.get(&mailbox.identity)?;
        if at.elapsed() >= READ_INTERVAL {
            return None;
        }
        let pending = self.pending.lock();
        let pending = pending.get(&mailbox.identity);
        let delta = |device: &u32| pending.and_then(|p| p.get(device)).copied().unwrap_or(0);
        let read = counters.iter().map(|(d, b)| (*d, b + delta(d)));
        let pending_only = pending
            .into_iter()
            .flatten()
            .filter(|(d, _)| !counters.contains_key(d))
            .map(|(d, b)| (*d, *b));
        Some(StoredBytes::sum(mailbox.device, read.chain(pending_only)))
    }

    /// Bytes stored per device of `identity`, as far as this relay knows.
    pub async fn of(
        &self,
        cluster: &Cluster,
        identity: &Identity,
    ) -> Result<AHashMap<u32, i64>, NatsError> {
        let cached = self
            .read
            .lock()
            .get(identity)
            .filter(|(at, _)| at.elapsed() < READ_INTERVAL)
            .map(|(_, counters)| counters.clone());
        let counters = match cached {
            Some(counters) => counters,
            None => self.read_now(cluster, identity).await?,
        };
        let mut bytes = counters;
        for (device, delta) in self.pending_of(identity) {
            *bytes.entry(device).or_default() += delta;
        }
        Ok(bytes)
    }

    /// Sets what the cluster counts for `mailbox` to `actual` (after counting its messages),
    /// before a send is refused on it.
    pub async fn correct(
        &self,
        cluster: &Cluster,
        mailbox: &MailboxId,
        actual: i64,
    ) -> Result<(), NatsError> {
        self.flush(cluster).await;
        self.set(cluster, mailbox, actual, "before_refusal", || true)
            .await?;
        self.recounted_now(mailbox);
        Ok(())
    }

    /// Remembers that `mailbox` was counted now (within [`MAX_RECOUNTED`]: when full, those
    /// counted longer than [`RECOUNT_AFTER`] ago go; if none has, this one is not remembered
    /// and is simply counted again).
    fn recounted_now(&self, mailbox: &MailboxId) {
        let now = Instant::now();
        let mut recounted = self.recounted.lock();
        if recounted.len() >= MAX_RECOUNTED {
            recounted.retain(|_, at| now.duration_since(*at) < RECOUNT_AFTER);
        }
        if recounted.len() < MAX_RECOUNTED {
            recounted.insert(*mailbox, now);
        }
    }

    /// Whether `mailbox`'s counter was set from its messages less than [`RECOUNT_AFTER`] ago
    /// (a refusal then trusts it without counting again).
    pub fn counted_recently(&self, mailbox: &MailboxId) -> bool {
        self.recounted
            .lock()
            .get(mailbox)
            .is_some_and(|at| at.elapsed() < RECOUNT_AFTER)
    }

    /// Whether this relay has changes of `mailbox` it has not written yet.
    pub fn unwritten(&self, mailbox: &MailboxId) -> bool {
        let pending = self
            .pending
            .lock()
            .get(&mailbox.identity)
            .and_then(|devices| devices.get(&mailbox.device))
            .is_some_and(|delta| *delta != 0);
        pending || self.retry.lock().iter().any(|i| i.mailbox == *mailbox)
    }

    /// Sets the counter of `mailbox` to `actual` if it says otherwise and `still()` holds once
    /// it was read (what `actual` came from has not changed meanwhile); whether it did.
    ///
    /// The counter is read from the stream's leader (a replica may not have applied the last
    /// increments yet). The correction's message id is made of the counter's sequence and the
    /// value it sets, so relays that correct the same reading to the same value apply it once.
    pub async fn set(
        &self,
        cluster: &Cluster,
        mailbox: &MailboxId,
        actual: i64,
        when: &'static str,
        still: impl Fn() -> bool,
    ) -> Result<bool, NatsError> {
        let subject = cluster.names.usage(mailbox);
        let last = cluster
            .last_from_leader(&cluster.names.usage_stream(), &subject)
            .await?;
        let (current, sequence) = last.map_or((0, 0), |m| {
            (counter_value(&m.payload).unwrap_or(0), m.sequence)
        });
        let corrected = current != actual && still();
        if corrected {
            tracing::info!(
                counted = current,
                stored = actual,
                when,
                "mailbox byte counter set right from its stored messages"
            );
            metrics::counter!(crate::metrics::JETSTREAM_COUNTER_CORRECTIONS, "when" => when)
                .increment(1);
            let increment = Increment {
                mailbox: *mailbox,
                delta: actual - current,
                id: correction_id(&subject, sequence, actual),
            };
            send_increment(cluster, &increment).await?.await?;
        }
        self.read.lock().remove(&mailbox.identity);
        Ok(corrected)
    }

    /// Forgets a mailbox that closed: its counter goes with it.
    pub fn forget(&self, mailbox: &MailboxId) {
        if let Some(devices) = self.pending.lock().get_mut(&mailbox.identity) {
            devices.remove(&mailbox.device);
        }
        self.retry.lock().retain(|i| i.mailbox != *mailbox);
        self.read.lock().remove(&mailbox.identity);
    }

    /// Writes the changes counted so far (one increment per mailbox), and again those not
    /// acknowledged before.
    pub async fn flush(&self, cluster: &Cluster) {
        let mut increments = std::mem::take(&mut *self.retry.lock());
        let changes: Vec<(MailboxId, i64)> = self
            .pending
            .lock()
            .drain()
            .flat_map(|(identity, devices)| {
                devices
                    .into_iter()
                    .map(move |(device, delta)| (MailboxId { identity, device }, delta))
            })
            .collect();
        increments.extend(changes.into_iter().filter(|(_, delta)| *delta != 0).map(
            |(mailbox, delta)| Increment {
                mailbox,
                delta,
                id: format!("{:032x}", rand::random::<u128>()),
            },
        ));
        let mut acks = Vec::with_capacity(increments.len());
        for increment in increments {
            match send_increment(cluster, &increment).await {
                Ok(ack) => acks.push((increment, ack)),
                Err(err) => self.failed(increment, err),
            }
        }
        for (increment, ack) in acks {
            match ack.await {
                Ok(_) => self.written(&increment),
                Err(err) => self.failed(increment, err.into()),
            }
        }
    }

    fn failed(&self, increment: Increment, err: NatsError) {
        tracing::warn!(error = %err, "a mailbox byte count was not written; it is written again");
        self.retry.lock().push(increment);
    }
}

async fn send_increment(
    cluster: &Cluster,
    increment: &Increment,
) -> Result<async_nats::jetstream::context::PublishAckFuture, NatsError> {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Incr", format!("{:+}", increment.delta).as_str());
    headers.insert("Nats-Msg-Id", increment.id.as_str());
    cluster
        .send(
            cluster.names.usage(&increment.mailbox),
            headers,
            Bytes::new(),
        )
        .await
}

/// The counters of every device of `identity` (one batched read).
async fn read_counters(
    cluster: &Cluster,
    identity: &Identity,
) -> Result<AHashMap<u32, i64>, NatsError> {
    let names = &cluster.names;
    let stored = cluster
        .last_of_each(&names.usage_stream(), &names.usage_of(identity))
        .await?;
    let mut counters = AHashMap::new();
    for message in stored {
        let Some(device) = names.usage_device(&message.subject) else {
            continue;
        };
        counters.insert(device, counter_value(&message.payload).unwrap_or(0));
    }
    Ok(counters)
}

/// The message id of a correction of the counter on `subject` read at `sequence`, to `actual`.
fn correction_id(subject: &str, sequence: u64, actual: i64) -> String {
    format!("set-{subject}-{sequence}-{actual}")
}

/// The value of a stored counter (`{"val":"123"}`).
fn counter_value(payload: &[u8]) -> Option<i64> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    value["val"].as_str()?.parse().ok()
}

/// Per device, the higher of two counts.
fn at_least(mut counters: Counters, other: &Counters) -> Counters {
    for (device, bytes) in other {
        let count = counters.entry(*device).or_default();
        *count = (*count).max(*bytes);
    }
    counters
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_bytes_add_what_is_pending_and_count_no_device_below_zero() {
        let usage = Usage::default();
        let identity = [4; 33];
        let mailbox = |device| MailboxId { identity, device };
        assert_eq!(usage.cached(&mailbox(1)), None, "never read");
        let read: Counters = [(1, 100), (2, 50), (3, -20)].into_iter().collect();
        usage
            .read
            .lock()
            .insert(identity, (Instant::now(), read.clone()));
        usage.add(&mailbox(1), 30);
        usage.add(&mailbox(2), -60);
        usage.add(&mailbox(4), 7);
        // Devices 1..4: 130, -10 → 0, -20 → 0, 7 (pending only).
        assert_eq!(
            usage.cached(&mailbox(1)),
            Some(StoredBytes {
                mailbox: 130,
                identity: 137
            })
        );
        assert_eq!(usage.cached(&mailbox(2)).map(|s| s.mailbox), Some(0));
        assert_eq!(usage.cached(&mailbox(4)).map(|s| s.mailbox), Some(7));
        // The same as the slow path's arithmetic on the merged counts.
        let mut merged = read;
        for (device, delta) in usage.pending_of(&identity) {
            *merged.entry(device).or_default() += delta;
        }
        for device in 1..=4 {
            assert_eq!(
                usage.cached(&mailbox(device)),
                Some(StoredBytes::of(&merged, device))
            );
        }
    }

    #[test]
    fn a_read_that_raced_a_write_keeps_the_higher_count_per_device() {
        let read: Counters = [(1, 100), (2, 50)].into_iter().collect();
        let cached: Counters = [(1, 140), (2, 10), (3, 7)].into_iter().collect();
        let merged = at_least(read, &cached);
        assert_eq!(merged.get(&1), Some(&140));
        assert_eq!(merged.get(&2), Some(&50));
        assert_eq!(merged.get(&3), Some(&7));
    }

    #[tokio::test(start_paused = true)]
    async fn counters_are_read_again_from_half_their_trust_on() {
        let usage = Usage::default();
        let identity = [9; 33];
        assert!(
            !usage.ageing(&identity),
            "never read: nothing to read ahead"
        );
        usage
            .read
            .lock()
            .insert(identity, (Instant::now(), Counters::default()));
        let mailbox = MailboxId {
            identity,
            device: 1,
        };
        assert!(!usage.ageing(&identity));
        assert!(usage.cached(&mailbox).is_some());
        tokio::time::advance(READ_INTERVAL / 2).await;
        assert!(usage.ageing(&identity));
        assert!(usage.cached(&mailbox).is_some(), "still trusted");
        tokio::time::advance(READ_INTERVAL / 2).await;
        assert!(usage.cached(&mailbox).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_recount_is_trusted_for_a_while_and_the_memory_of_them_is_bounded() {
        let usage = Usage::default();
        let mailbox = |n: u32| MailboxId {
            identity: [7; 33],
            device: n,
        };
        usage.recounted_now(&mailbox(0));
        assert!(usage.counted_recently(&mailbox(0)));
        assert!(!usage.counted_recently(&mailbox(1)));
        tokio::time::advance(RECOUNT_AFTER).await;
        assert!(
            !usage.counted_recently(&mailbox(0)),
            "counted again after the interval"
        );
        for n in 1..=MAX_RECOUNTED as u32 {
            usage.recounted_now(&mailbox(n));
        }
        assert!(usage.recounted.lock().len() <= MAX_RECOUNTED);
        assert!(usage.counted_recently(&mailbox(1)));
        // Full of recent ones: a new mailbox is not remembered (it is counted each time).
        usage.recounted_now(&mailbox(u32::MAX));
        assert!(!usage.counted_recently(&mailbox(u32::MAX)));
        assert_eq!(usage.recounted.lock().len(), MAX_RECOUNTED);
    }

    #[test]
    fn counter_values_parse() {
        assert_eq!(counter_value(br#"{"val":"123"}"#), Some(123));
        assert_eq!(counter_value(br#"{"val":"-5"}"#), Some(-5));
        assert_eq!(counter_value(b"garbage"), None);
    }

    #[test]
    fn pending_changes_add_up_per_mailbox() {
        let usage = Usage::default();
        let mailbox = |device| MailboxId {
            identity: [1; 33],
            device,
        };
        usage.add(&mailbox(1), 100);
        usage.add(&mailbox(1), -30);
        usage.add(&mailbox(2), 5);
        usage.add(
            &MailboxId {
                identity: [2; 33],
                device: 1,
            },
            9,
        );
        let pending = usage.pending_of(&[1; 33]);
        assert_eq!(pending.get(&1), Some(&70));
        assert_eq!(pending.get(&2), Some(&5));
        assert_eq!(pending.len(), 2);
    }
}
