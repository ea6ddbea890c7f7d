//! The open-loop clock: one task that wakes each sender when its next message is due, to the
//! microsecond. Tokio's timers have a resolution of one millisecond, so a sender that slept on
//! them would send up to a millisecond late and in bursts (every sender whose message fell due
//! within the same millisecond at once), and that lateness would be counted as latency of the
//! target. On Linux the ticker sleeps on a `timerfd` (no timer slack), waking at most every
//! [`QUANTUM`] and waking every sender whose message fell due since; elsewhere it falls back
//! to tokio's timer.
//!
//! The schedule is the one [`super::load::Pacer`] follows: sender `i` of `S` sends message `k`
//! at `start + (i / S + k) × interval`, so the senders' messages interleave evenly, one every
//! `interval / S`; global tick `j` is sender `j mod S`'s.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::load::Shared;

/// The ticker wakes at most this often; senders due within one quantum are woken together.
pub const QUANTUM: Duration = Duration::from_micros(20);

/// The ticks of a schedule: which global ticks are due at a moment.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub start: Instant,
    /// Time between two consecutive messages of one sender.
    pub interval: Duration,
    pub senders: usize,
}

impl Schedule {
    /// Time between two consecutive global ticks.
    fn period(&self) -> Duration {
        self.interval / self.senders.max(1) as u32
    }

    /// Global ticks due by `now`: ticks `0..due(now)`.
    pub fn due(&self, now: Instant) -> u64 {
        if now < self.start {
            return 0;
        }
        let period = self.period().as_nanos().max(1);
        (now.duration_since(self.start).as_nanos() / period) as u64 + 1
    }

    /// When global tick `tick` is due.
    pub fn at(&self, tick: u64) -> Instant {
        let ns = self.period().as_nanos().saturating_mul(u128::from(tick));
        self.start + Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// The senders whose ticks in `from..to` fell due, each once.
    pub fn senders_of(&self, from: u64, to: u64) -> impl Iterator<Item = usize> {
        let senders = self.senders.max(1) as u64;
        let count = to.saturating_sub(from).min(senders);
        (from..from + count).map(move |tick| (tick % senders) as usize)
    }
}

/// Wakes each sender of `shared` as its messages fall due, until `until`.
pub fn spawn(shared: Arc<Shared>, schedule: Schedule, until: Instant) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut timer = Timer::new();
        let mut next = 0u64;
        loop {
            let now = Instant::now();
            if now >= until || shared.progress.is_done() {
                return;
            }
            let due = schedule.due(now);
            for sender in schedule.senders_of(next, due) {
                shared.pairs[sender].due.notify_one();
            }
            next = next.max(due);
            let wake = schedule.at(next).max(now + QUANTUM).min(until);
            timer.sleep_until(wake).await;
        }
    })
}

/// Sleeps to the microsecond where the platform allows.
struct Timer {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fd: Option<timerfd::TimerFd>,
}

impl Timer {
    fn new() -> Self {
        Self {
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            fd: timerfd::TimerFd::new().ok(),
        }
    }

    async fn sleep_until(&mut self, at: Instant) {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        if let Some(fd) = &self.fd {
            if fd.sleep_until(at).await.is_ok() {
                return;
            }
        }
        tokio::time::sleep_until(at).await;
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod timerfd {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use tokio::io::unix::AsyncFd;
    use tokio::time::Instant;

    /// A non-blocking `timerfd` on `CLOCK_MONOTONIC` (the clock of `Instant`) in the runtime.
    pub struct TimerFd(AsyncFd<OwnedFd>);

    impl TimerFd {
        pub fn new() -> io::Result<Self> {
            // SAFETY: timerfd_create has no memory preconditions; the descriptor it returns is
            // owned by nobody else.
            let fd = unsafe {
                libc::timerfd_create(
                    libc::CLOCK_MONOTONIC,
                    libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` is a fresh descriptor this function owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: an `OwnedFd` stays open, and is the same descriptor, until the `AsyncFd`
            // that owns it is dropped.
            unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
                .map(Self)
                .map_err(io::Error::from)
        }

        /// Fires once at `at` (relative to now; at once if it has passed).
        pub async fn sleep_until(&self, at: Instant) -> io::Result<()> {
            let after = at
                .saturating_duration_since(Instant::now())
                .max(std::time::Duration::from_nanos(1));
            let spec = libc::itimerspec {
                it_interval: libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                },
                it_value: libc::timespec {
                    tv_sec: after.as_secs() as libc::time_t,
                    tv_nsec: after.subsec_nanos() as libc::c_long,
                },
            };
            // SAFETY: `spec` is a valid itimerspec; the old value is not asked for.
            let set = unsafe {
                libc::timerfd_settime(self.0.as_raw_fd(), 0, &spec, std::ptr::null_mut())
            };
            if set < 0 {
                return Err(io::Error::last_os_error());
            }
            loop {
                let mut ready = self.0.readable().await?;
                let mut expirations = [0u8; 8];
                // SAFETY: reads at most 8 bytes into an 8-byte buffer.
                let read = unsafe {
                    libc::read(
                        self.0.as_raw_fd(),
                        expirations.as_mut_ptr().cast(),
                        expirations.len(),
                    )
                };
                if read == 8 {
                    return Ok(());
                }
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::WouldBlock {
                    ready.clear_ready();
                    continue;
                }
                return Err(err);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_interleave_the_senders_evenly() {
        let start = Instant::now();
        let schedule = Schedule {
            start,
            interval: Duration::from_millis(4),
            senders: 4,
        };
        assert_eq!(schedule.due(start - Duration::from_millis(1)), 0);
        assert_eq!(schedule.due(start), 1);
        assert_eq!(schedule.due(start + Duration::from_micros(999)), 1);
        assert_eq!(schedule.due(start + Duration::from_millis(5)), 6);
        assert_eq!(schedule.at(6), start + Duration::from_millis(6));
        assert_eq!(schedule.senders_of(0, 6).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(schedule.senders_of(5, 7).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(schedule.senders_of(7, 7).count(), 0);
    }

    #[tokio::test]
    async fn the_timer_fires_after_its_moment() {
        let mut timer = Timer::new();
        for micros in [0, 50, 300] {
            let at = Instant::now() + Duration::from_micros(micros);
            timer.sleep_until(at).await;
            assert!(Instant::now() >= at);
        }
    }
}
