//! What every target's `relay` scenario shares: the payload layout that carries sender, sequence
//! number and intended send time; the pacing of a sender (window, open-loop schedule); the
//! per-sender counters that link senders and receivers in this process; and the receiver-side
//! bookkeeping that finds losses and duplicates.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::stats::Latency;
pub use super::ticker::Schedule;

/// Bytes at the end of every payload: sender index (u32), sequence number (u64) and intended
/// send time (u64 nanoseconds since the run's epoch), all big-endian.
pub const HEADER_LEN: usize = 20;

/// The stamp a payload carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub sender: u32,
    pub seq: u64,
    pub intended_ns: u64,
}

impl Stamp {
    pub fn write(&self, out: &mut [u8; HEADER_LEN]) {
        out[..4].copy_from_slice(&self.sender.to_be_bytes());
        out[4..12].copy_from_slice(&self.seq.to_be_bytes());
        out[12..].copy_from_slice(&self.intended_ns.to_be_bytes());
    }

    /// The stamp at the end of `payload`, if it is long enough.
    pub fn read(payload: &[u8]) -> Option<Stamp> {
        let tail = payload.get(payload.len().checked_sub(HEADER_LEN)?..)?;
        Some(Stamp {
            sender: u32::from_be_bytes(tail[..4].try_into().ok()?),
            seq: u64::from_be_bytes(tail[4..12].try_into().ok()?),
            intended_ns: u64::from_be_bytes(tail[12..].try_into().ok()?),
        })
    }
}

/// Payloads of one size: constant filler, then the stamp. The filler's whole SHA-256 blocks
/// are hashed once, so each message's `payload_hash` costs only its last block or two.
#[derive(Clone)]
pub struct PayloadTemplate {
    filler: Vec<u8>,
    /// SHA-256 state after the first `hashed` filler bytes.
    midstate: Sha256,
    hashed: usize,
}

impl PayloadTemplate {
    pub fn new(size: usize) -> Result<Self, String> {
        if size < HEADER_LEN {
            return Err(format!(
                "payloads must be at least {HEADER_LEN} bytes (sender, sequence number and send \
                 time are embedded), got {size}"
            ));
        }
        let filler: Vec<u8> = (0..size - HEADER_LEN).map(|i| (i % 251) as u8).collect();
        let hashed = filler.len() / 64 * 64;
        let mut midstate = Sha256::new();
        midstate.update(&filler[..hashed]);
        Ok(Self {
            filler,
            midstate,
            hashed,
        })
    }

    pub fn len(&self) -> usize {
        self.filler.len() + HEADER_LEN
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Appends the payload for `stamp` to `out`.
    pub fn write(&self, stamp: &Stamp, out: &mut impl bytes::BufMut) {
        let mut header = [0u8; HEADER_LEN];
        stamp.write(&mut header);
        out.put_slice(&self.filler);
        out.put_slice(&header);
    }

    /// SHA-256 of the payload for `stamp`.
    pub fn hash(&self, stamp: &Stamp) -> [u8; 32] {
        let mut header = [0u8; HEADER_LEN];
        stamp.write(&mut header);
        let mut hasher = self.midstate.clone();
        hasher.update(&self.filler[self.hashed..]);
        hasher.update(header);
        hasher.finalize().into()
    }
}

/// How a sender decides how many messages it may send now.
#[derive(Debug, Clone, Copy)]
pub struct Pacer {
    /// At most this many of its messages not yet received by its receiver.
    pub window: u64,
    /// Open loop: the run's schedule and this sender's index in it.
    pub schedule: Option<(Schedule, usize)>,
}

impl Pacer {
    /// Sender `index`'s pacer: closed loop without a schedule.
    pub fn new(window: u64, schedule: Option<Schedule>, index: usize) -> Self {
        Self {
            window,
            schedule: schedule.map(|schedule| (schedule, index)),
        }
    }

    /// Messages that may be sent at `now`, given `seq` sent so far, `failed` of them refused
    /// by the target (they will never arrive) and `received` by the receiver.
    pub fn budget(&self, seq: u64, failed: u64, received: u64, now: Instant) -> u64 {
        let mut budget = self.room(seq, failed, received);
        if self.schedule.is_some() {
            budget = budget.min(self.due(now).saturating_sub(seq));
        }
        budget
    }

    /// Free places in the window: what may be sent as far as the receiver is concerned.
    pub fn room(&self, seq: u64, failed: u64, received: u64) -> u64 {
        let in_flight = seq.saturating_sub(failed).saturating_sub(received);
        self.window.saturating_sub(in_flight)
    }

    /// When a sender that may send nothing now should look again: never by the clock while
    /// its window is full (its receiver wakes it), else when its next message is due (open
    /// loop), and at the end of the measured interval in any case.
    pub fn wake_at(&self, seq: u64, room: u64, measure_end: Instant) -> Instant {
        match self.next_due(seq) {
            Some(due) if room > 0 => due.min(measure_end),
            _ => measure_end,
        }
    }

    /// This sender's messages due by `now` under the schedule: its ticks among the run's.
    fn due(&self, now: Instant) -> u64 {
        let Some((schedule, index)) = self.schedule else {
            return 0;
        };
        let ticks = schedule.due(now);
        let (index, senders) = (index as u64, schedule.senders.max(1) as u64);
        if ticks > index {
            (ticks - 1 - index) / senders + 1
        } else {
            0
        }
    }

    /// When message `seq` is meant to leave: its scheduled time in open loop, `now` otherwise.
    pub fn intended(&self, seq: u64, now: Instant) -> Instant {
        match self.schedule {
            Some((schedule, index)) => schedule.at(seq
                .saturating_mul(schedule.senders.max(1) as u64)
                .saturating_add(index as u64)),
            None => now,
        }
    }

    /// In open loop, when message `seq` is due.
    pub fn next_due(&self, seq: u64) -> Option<Instant> {
        self.schedule.map(|_| self.intended(seq, Instant::now()))
    }
}

/// Waits until `at`, or until the run's ticker says the sender of `pair` has a message due
/// (open loop: the ticker is the precise clock, `at` only a backstop).
pub async fn wait_until(pair: &Pair, at: Instant) {
    tokio::select! {
        _ = pair.due.notified() => {}
        _ = tokio::time::sleep_until(at) => {}
    }
}

/// Counters of one sender that its receiver updates.
#[derive(Default)]
pub struct Pair {
    /// Distinct messages of this sender its receiver got.
    pub received: AtomicU64,
    /// Woken whenever `received` moves.
    pub notify: Notify,
    /// Woken by the ticker when one of this sender's messages falls due (open loop).
    pub due: Notify,
}

impl Pair {
    pub fn add_received(&self, n: u64) {
        self.received.fetch_add(n, Ordering::Release);
        self.notify.notify_one();
    }
}

/// The phases of a run, shared by every task.
#[derive(Debug, Clone, Copy)]
pub struct Phases {
    /// Zero of the payload clock.
    pub epoch: Instant,
    pub measure_start: Instant,
    pub measure_end: Instant,
    /// Nothing may run past this, drain included.
    pub deadline: Instant,
}

impl Phases {
    pub fn new(start: Instant, warmup: Duration, duration: Duration, drain: Duration) -> Self {
        let measure_start = start + warmup;
        let measure_end = measure_start + duration;
        Self {
            epoch: start,
            measure_start,
            measure_end,
            deadline: measure_end + drain,
        }
    }

    pub fn measuring(&self, now: Instant) -> bool {
        now >= self.measure_start && now < self.measure_end
    }

    pub fn ns_since_epoch(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    pub fn at_ns(&self, ns: u64) -> Instant {
        self.epoch + Duration::from_nanos(ns)
    }
}

/// Totals for the progress line; updated once per batch.
#[derive(Default)]
pub struct Progress {
    pub sent: AtomicU64,
    pub delivered: AtomicU64,
    pub errors: AtomicU64,
    /// Set once every sender has stopped and the drain is over: receivers finish.
    pub done: AtomicBool,
    pub wake: Notify,
}

impl Progress {
    pub fn finish(&self) {
        self.done.store(true, Ordering::Release);
        self.wake.notify_waiters();
    }

    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }
}

/// State shared by the tasks of one `relay` scenario run.
pub struct Shared {
    pub pairs: Vec<Pair>,
    pub phases: Phases,
    pub progress: Progress,
}

impl Shared {
    pub fn new(senders: usize, phases: Phases) -> Arc<Self> {
        Arc::new(Self {
            pairs: (0..senders).map(|_| Pair::default()).collect(),
            phases,
            progress: Progress::default(),
        })
    }
}

/// The receiver of sender `sender` when `senders` share `receivers`.
pub fn receiver_of(sender: usize, receivers: usize) -> usize {
    sender % receivers
}

/// Sequence numbers of one sender seen by a receiver: a bit set, grown as numbers arrive.
#[derive(Default, Debug, Clone)]
pub struct SeenSet {
    bits: Vec<u64>,
    distinct: u64,
}

impl SeenSet {
    /// Marks `seq`; false when it was already seen (a duplicate).
    pub fn insert(&mut self, seq: u64) -> bool {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.bits.len() {
            self.bits.resize((word + 1).next_power_of_two(), 0);
        }
        let mask = 1u64 << bit;
        if self.bits[word] & mask != 0 {
            return false;
        }
        self.bits[word] |= mask;
        self.distinct += 1;
        true
    }

    pub fn distinct(&self) -> u64 {
        self.distinct
    }

    /// Numbers below `sent` that never arrived.
    pub fn missing_below(&self, sent: u64) -> u64 {
        let mut present = 0u64;
        for (i, word) in self.bits.iter().enumerate() {
            let base = i as u64 * 64;
            if base >= sent {
                break;
            }
            let valid = if sent - base >= 64 {
                u64::MAX
            } else {
                (1u64 << (sent - base)) - 1
            };
            present += (word & valid).count_ones() as u64;
        }
        sent - present
    }
}

/// What a receiver tallies; merged over all receivers at the end.
#[derive(Clone)]
pub struct Tally {
    pub latency: Latency,
    /// Messages delivered inside the measured interval.
    pub measured: u64,
    pub measured_bytes: u64,
    /// Per sender index: the sequence numbers seen.
    pub seen: Vec<SeenSet>,
    pub duplicates: u64,
    /// Messages whose sequence number was lower than one seen before from the same sender.
    pub out_of_order: u64,
    /// Payloads without a readable stamp, or from a sender this receiver does not serve.
    pub foreign: u64,
    last_seq: Vec<Option<u64>>,
}

impl Tally {
    pub fn new(senders: usize) -> Self {
        Self {
            latency: Latency::new(),
            measured: 0,
            measured_bytes: 0,
            seen: vec![SeenSet::default(); senders],
            duplicates: 0,
            out_of_order: 0,
            foreign: 0,
            last_seq: vec![None; senders],
        }
    }

    /// Records one delivery received at `now`. Returns the sender index when it was a new
    /// message (so the sender's window moves), `None` for duplicates and foreign payloads.
    pub fn record(&mut self, payload: &[u8], now: Instant, phases: &Phases) -> Option<usize> {
        let Some(stamp) = Stamp::read(payload) else {
            self.foreign += 1;
            return None;
        };
        let sender = stamp.sender as usize;
        let Some(seen) = self.seen.get_mut(sender) else {
            self.foreign += 1;
            return None;
        };
        if !seen.insert(stamp.seq) {
            self.duplicates += 1;
            return None;
        }
        let last = &mut self.last_seq[sender];
        if last.is_some_and(|last| stamp.seq < last) {
            self.out_of_order += 1;
        } else {
            *last = Some(stamp.seq);
        }
        if phases.measuring(now) {
            self.measured += 1;
            self.measured_bytes += payload.len() as u64;
            let intended = phases.at_ns(stamp.intended_ns);
            self.latency.record(now.saturating_duration_since(intended));
        }
        Some(sender)
    }

    pub fn merge(&mut self, other: &Tally) {
        self.latency.merge(&other.latency);
        self.measured += other.measured;
        self.measured_bytes += other.measured_bytes;
        self.duplicates += other.duplicates;
        self.out_of_order += other.out_of_order;
        self.foreign += other.foreign;
        for (mine, theirs) in self.seen.iter_mut().zip(&other.seen) {
            if theirs.distinct > 0 {
                if mine.distinct == 0 {
                    *mine = theirs.clone();
                } else {
                    // Two receivers saw the same sender: count the overlap as duplicates.
                    for (word, bits) in theirs.bits.iter().enumerate() {
                        for bit in 0..64 {
                            if bits & (1 << bit) != 0 && !mine.insert(word as u64 * 64 + bit) {
                                self.duplicates += 1;
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trip_at_the_end_of_the_payload() {
        let template = PayloadTemplate::new(100).unwrap();
        let stamp = Stamp {
            sender: 7,
            seq: 1 << 40,
            intended_ns: 123_456_789,
        };
        let mut payload = Vec::new();
        template.write(&stamp, &mut payload);
        assert_eq!(payload.len(), 100);
        assert_eq!(Stamp::read(&payload), Some(stamp));
        assert_eq!(Stamp::read(&payload[..19]), None);
        assert!(PayloadTemplate::new(19).is_err());
    }

    #[test]
    fn template_hash_is_the_sha256_of_the_payload() {
        for size in [20, 63, 64, 84, 100, 1024, 4096 + 17] {
            let template = PayloadTemplate::new(size).unwrap();
            let stamp = Stamp {
                sender: 1,
                seq: size as u64,
                intended_ns: 5,
            };
            let mut payload = Vec::new();
            template.write(&stamp, &mut payload);
            let want: [u8; 32] = Sha256::digest(&payload).into();
            assert_eq!(template.hash(&stamp), want, "size {size}");
        }
    }

    #[test]
    fn closed_loop_budget_is_the_free_window() {
        let pacer = Pacer::new(128, None, 0);
        let now = Instant::now();
        assert_eq!(pacer.budget(0, 0, 0, now), 128);
        assert_eq!(pacer.budget(128, 0, 0, now), 0);
        assert_eq!(pacer.budget(128, 0, 28, now), 28);
        // Refused messages never arrive; they must not hold the window forever.
        assert_eq!(pacer.budget(128, 100, 28, now), 128);
        assert_eq!(pacer.intended(5, now), now);
        assert_eq!(pacer.next_due(5), None);
        let end = now + Duration::from_secs(1);
        assert_eq!(pacer.wake_at(5, 0, end), end);
        assert_eq!(pacer.wake_at(5, 3, end), end);
    }

    #[test]
    fn open_loop_budget_follows_the_schedule() {
        let start = Instant::now();
        let ms = Duration::from_millis(1);
        // One of one sender: a message every millisecond.
        let schedule = Schedule {
            start,
            interval: ms,
            senders: 1,
        };
        let pacer = Pacer::new(10, Some(schedule), 0);
        assert_eq!(pacer.budget(0, 0, 0, start - ms), 0);
        assert_eq!(pacer.budget(0, 0, 0, start), 1);
        assert_eq!(pacer.budget(1, 0, 0, start + ms / 2), 0);
        // 5.5 ms in: messages 0..=5 are due.
        assert_eq!(pacer.budget(2, 0, 2, start + ms * 11 / 2), 4);
        // The window still bounds a sender that fell behind.
        assert_eq!(pacer.budget(0, 0, 0, start + ms * 100), 10);
        assert_eq!(pacer.intended(3, start + ms * 100), start + ms * 3);
        assert_eq!(pacer.next_due(7), Some(start + ms * 7));
        // A full window is woken by the receiver, not by an overdue schedule (no busy loop).
        let end = start + ms * 1000;
        assert_eq!(pacer.wake_at(7, 0, end), end);
        assert_eq!(pacer.wake_at(7, 1, end), start + ms * 7);
        assert_eq!(pacer.wake_at(7_000, 1, end), end);
        let far = 5u64 << 32;
        assert_eq!(
            pacer.intended(far, start),
            start + Duration::from_nanos(far * 1_000_000)
        );
    }

    #[test]
    fn senders_take_their_turns_of_the_schedule() {
        let start = Instant::now();
        let schedule = Schedule {
            start,
            interval: Duration::from_millis(3),
            senders: 3,
        };
        let pacers: Vec<_> = (0..3).map(|i| Pacer::new(100, Some(schedule), i)).collect();
        let ms = Duration::from_millis(1);
        // Sender i's message k is due at start + (3k + i) ms: exactly when the ticker's
        // tick 3k + i is.
        for (i, pacer) in pacers.iter().enumerate() {
            for k in 0..4u64 {
                let at = start + ms * (3 * k as u32 + i as u32);
                assert_eq!(pacer.intended(k, at), at);
                assert_eq!(pacer.due(at), k + 1, "sender {i} message {k}");
                assert_eq!(
                    pacer.due(at - Duration::from_nanos(1)),
                    k,
                    "sender {i} message {k}"
                );
                assert_eq!(schedule.at(3 * k + i as u64), at);
            }
        }
    }

    #[test]
    fn seen_set_counts_duplicates_and_gaps() {
        let mut seen = SeenSet::default();
        for seq in [0, 1, 2, 5, 64, 200] {
            assert!(seen.insert(seq));
        }
        assert!(!seen.insert(5));
        assert_eq!(seen.distinct(), 6);
        assert_eq!(seen.missing_below(3), 0);
        assert_eq!(seen.missing_below(6), 2);
        assert_eq!(seen.missing_below(65), 65 - 5);
        assert_eq!(seen.missing_below(300), 300 - 6);
    }

    #[test]
    fn tally_measures_inside_the_interval_only() {
        let start = Instant::now();
        let phases = Phases::new(
            start,
            Duration::from_secs(1),
            Duration::from_secs(2),
            Duration::from_secs(1),
        );
        let template = PayloadTemplate::new(32).unwrap();
        let payload = |sender, seq, at: Instant| {
            let mut p = Vec::new();
            let stamp = Stamp {
                sender,
                seq,
                intended_ns: phases.ns_since_epoch(at),
            };
            template.write(&stamp, &mut p);
            p
        };
        let mut tally = Tally::new(2);
        let warm = start + Duration::from_millis(500);
        let inside = start + Duration::from_millis(1500);
        assert_eq!(tally.record(&payload(0, 0, warm), warm, &phases), Some(0));
        assert_eq!(
            tally.record(
                &payload(1, 0, inside),
                inside + Duration::from_micros(250),
                &phases
            ),
            Some(1)
        );
        assert_eq!(tally.record(&payload(1, 0, inside), inside, &phases), None);
        assert_eq!(tally.record(&payload(9, 0, inside), inside, &phases), None);
        assert_eq!(tally.record(b"short", inside, &phases), None);
        assert_eq!(tally.measured, 1);
        assert_eq!(tally.duplicates, 1);
        assert_eq!(tally.foreign, 2);
        let p = tally.latency.summary().unwrap();
        assert!((p.p50 - 250.0).abs() < 1.0, "{p:?}");

        let mut other = Tally::new(2);
        other.record(&payload(0, 0, inside), inside, &phases);
        other.record(&payload(0, 1, inside), inside, &phases);
        tally.merge(&other);
        assert_eq!(
            tally.duplicates, 2,
            "seq 0 of sender 0 seen by two receivers"
        );
        assert_eq!(tally.seen[0].distinct(), 2);
        assert_eq!(tally.measured, 3);
    }

    #[test]
    fn senders_spread_over_receivers() {
        assert_eq!(
            (0..5).map(|s| receiver_of(s, 2)).collect::<Vec<_>>(),
            vec![0, 1, 0, 1, 0]
        );
    }
}
