//! The deadlines of one connection, in the manner of quinn-proto's timer table: one slot per
//! kind of timer, so the transport sleeps until the earliest and the connection sees which
//! ones are due. Nothing here reads a clock; every moment is passed in.

use std::time::Instant;

/// The kinds of deadline a connection keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// The session's next ping, pong or idle deadline ([`botd_protocol::session::Session::next_deadline`]).
    Session,
    /// Output is waiting and the peer does not take it: `write_timeout` after it first blocked.
    Write,
    /// A frame started and not finished: `frame_timeout` after its first byte, not counting
    /// time the relay itself was too busy to read.
    Frame,
    /// The inbound budget could not cover the frame being received: when to try again.
    BudgetRetry,
    /// The connection went quiet: when to give back its buffers and cipher state if it
    /// stayed so ([`crate::connection::RELEASE_AFTER`]).
    Release,
}

impl Timer {
    const COUNT: usize = 5;

    fn index(self) -> usize {
        match self {
            Timer::Session => 0,
            Timer::Write => 1,
            Timer::Frame => 2,
            Timer::BudgetRetry => 3,
            Timer::Release => 4,
        }
    }
}

/// One optional deadline per [`Timer`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimerTable {
    deadlines: [Option<Instant>; Timer::COUNT],
}

impl TimerTable {
    /// Arms `timer` for `at`, replacing what it was set to.
    pub fn set(&mut self, timer: Timer, at: Instant) {
        self.deadlines[timer.index()] = Some(at);
    }

    /// Arms `timer` for `at` unless it is armed already (a deadline that runs from the first
    /// of several events).
    pub fn set_if_stopped(&mut self, timer: Timer, at: Instant) {
        self.deadlines[timer.index()].get_or_insert(at);
    }

    /// Arms `timer` for `at`, or stops it when `at` is `None`.
    pub fn set_or_stop(&mut self, timer: Timer, at: Option<Instant>) {
        self.deadlines[timer.index()] = at;
    }

    pub fn get(&self, timer: Timer) -> Option<Instant> {
        self.deadlines[timer.index()]
    }

    pub fn stop(&mut self, timer: Timer) {
        self.deadlines[timer.index()] = None;
    }

    /// The earliest armed deadline.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.deadlines.iter().flatten().min().copied()
    }

    /// True when `timer` is armed for `now` or earlier.
    pub fn is_expired(&self, timer: Timer, now: Instant) -> bool {
        self.get(timer).is_some_and(|at| at <= now)
    }

    /// Stops `timer` and returns true if it was armed for `now` or earlier.
    pub fn take_expired(&mut self, timer: Timer, now: Instant) -> bool {
        let expired = self.is_expired(timer, now);
        if expired {
            self.stop(timer);
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_earliest_armed_deadline_is_next() {
        let t0 = Instant::now();
        let mut table = TimerTable::default();
        assert_eq!(table.next_timeout(), None);
        table.set(Timer::Session, t0 + 50 * MS);
        table.set(Timer::Frame, t0 + 30 * MS);
        table.set(Timer::BudgetRetry, t0 + 40 * MS);
        assert_eq!(table.next_timeout(), Some(t0 + 30 * MS));
        table.stop(Timer::Frame);
        assert_eq!(table.next_timeout(), Some(t0 + 40 * MS));
        // Set replaces; set_if_stopped keeps the first deadline.
        table.set(Timer::Session, t0 + 10 * MS);
        assert_eq!(table.next_timeout(), Some(t0 + 10 * MS));
        table.set_if_stopped(Timer::Write, t0 + 5 * MS);
        table.set_if_stopped(Timer::Write, t0 + 20 * MS);
        assert_eq!(table.get(Timer::Write), Some(t0 + 5 * MS));
        table.set_or_stop(Timer::Write, None);
        assert_eq!(table.get(Timer::Write), None);
        assert_eq!(table.next_timeout(), Some(t0 + 10 * MS));
    }

    #[test]
    fn a_timer_expires_at_its_deadline_and_once_taken_is_stopped() {
        let t0 = Instant::now();
        let mut table = TimerTable::default();
        table.set(Timer::BudgetRetry, t0 + 5 * MS);
        table.set(Timer::Write, t0 + 9 * MS);
        assert!(!table.is_expired(Timer::BudgetRetry, t0 + 4 * MS));
        assert!(!table.take_expired(Timer::BudgetRetry, t0 + 4 * MS));
        assert!(table.is_expired(Timer::BudgetRetry, t0 + 5 * MS));
        assert!(!table.is_expired(Timer::Write, t0 + 5 * MS));
        assert!(
            !table.is_expired(Timer::Frame, t0 + 5 * MS),
            "a stopped timer never expires"
        );
        assert!(table.take_expired(Timer::BudgetRetry, t0 + 6 * MS));
        assert_eq!(table.get(Timer::BudgetRetry), None);
        assert!(!table.take_expired(Timer::BudgetRetry, t0 + 6 * MS));
        assert_eq!(table.next_timeout(), Some(t0 + 9 * MS));
    }
}
