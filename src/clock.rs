//! Wall-clock time for the tokio layers; the protocol core takes time as an argument.

use tokio::time::Instant;

/// Milliseconds since the Unix epoch, from the system clock.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Unix time in milliseconds that follows tokio's clock, so paused-time tests can move it.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base_ms: u64,
    base: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Self {
            base_ms: unix_millis(),
            base: Instant::now(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.at(Instant::now())
    }

    /// The Unix time in milliseconds of `instant` (a reading of tokio's clock the caller has).
    pub fn at(&self, instant: Instant) -> u64 {
        self.base_ms + instant.saturating_duration_since(self.base).as_millis() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}
