//! Token buckets, and a bounded map of them keyed by peer, without clocks: callers pass `now`.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;

/// Refill rate and burst of a bucket.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: f64,
    /// Bucket size: how many events may happen at once after a quiet spell.
    pub burst: u32,
}

impl Rate {
    pub const fn new(per_second: f64, burst: u32) -> Self {
        Self { per_second, burst }
    }
}

#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    pub fn full(rate: Rate, now: Instant) -> Self {
        Self {
            tokens: f64::from(rate.burst),
            updated: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(f64::from(rate.burst));
        self.updated = now;
    }

    /// Takes one token, or says how long until one is available.
    pub fn try_take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        if rate.per_second <= 0.0 {
            return Err(Duration::from_secs(3600));
        }
        Err(Duration::from_secs_f64(
            (1.0 - self.tokens) / rate.per_second,
        ))
    }

    /// True when the bucket has refilled completely, i.e. forgetting it changes nothing.
    fn is_full(&self, rate: Rate, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens + elapsed * rate.per_second >= f64::from(rate.burst)
    }
}

/// One bucket per key, holding at most `max_keys` of them. Full buckets are forgotten first;
/// if every bucket is in use the request is refused rather than the map grown.
#[derive(Debug)]
pub struct KeyedLimiter<K> {
    rate: Rate,
    max_keys: usize,
    buckets: HashMap<K, TokenBucket>,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        Self {
            rate,
            max_keys: max_keys.max(1),
            buckets: HashMap::new(),
        }
    }

    pub fn try_take(&mut self, key: &K, now: Instant) -> Result<(), Duration> {
        if let Some(bucket) = self.buckets.get_mut(key) {
            return bucket.try_take(self.rate, now);
        }
        if self.buckets.len() >= self.max_keys {
            let rate = self.rate;
            self.buckets.retain(|_, bucket| !bucket.is_full(rate, now));
            if self.buckets.len() >= self.max_keys {
                return Err(Duration::from_secs_f64(1.0 / rate.per_second.max(1e-3))
                    .min(Duration::from_secs(60)));
            }
        }
        let mut bucket = TokenBucket::full(self.rate, now);
        let outcome = bucket.try_take(self.rate, now);
        self.buckets.insert(key.clone(), bucket);
        outcome
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let now = Instant::now();
        let rate = Rate::new(2.0, 3);
        let mut bucket = TokenBucket::full(rate, now);
        for _ in 0..3 {
            bucket.try_take(rate, now).unwrap();
        }
        let wait = bucket.try_take(rate, now).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        bucket.try_take(rate, now + wait).unwrap();
    }

    #[test]
    fn keyed_limiter_is_bounded() {
        let now = Instant::now();
        let mut limiter = KeyedLimiter::new(Rate::new(1.0, 1), 2);
        limiter.try_take(&1, now).unwrap();
        limiter.try_take(&2, now).unwrap();
        assert!(limiter.try_take(&1, now).is_err());
        // Both buckets are empty: a third key is refused instead of growing the map.
        assert!(limiter.try_take(&3, now).is_err());
        assert_eq!(limiter.len(), 2);
        // Once they refill they are forgotten and make room.
        limiter.try_take(&3, now + Duration::from_secs(1)).unwrap();
        assert!(limiter.len() <= 2);
    }
}
