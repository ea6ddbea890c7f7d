//! Token buckets, and bounded maps of them keyed by peer, without clocks: callers pass `now`.
//! Also how source addresses are grouped for per-address limits (IPv6 by /64, the block one
//! host usually holds).

use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use ahash::AHashMap;
use parking_lot::Mutex;
use tokio::time::Instant;

/// The address a per-address limit counts a peer under: itself for IPv4 (also when written as
/// an IPv4-mapped IPv6 address), its /64 network for IPv6.
pub fn address_group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
        },
    }
}

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
        self.until_full(rate, now).is_zero()
    }

    /// Time until the bucket is full again.
    fn until_full(&self, rate: Rate, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        let missing = f64::from(rate.burst) - (self.tokens + elapsed * rate.per_second);
        if missing <= 0.0 {
            Duration::ZERO
        } else if rate.per_second <= 0.0 {
            Duration::from_secs(3600)
        } else {
            Duration::from_secs_f64(missing / rate.per_second).min(Duration::from_secs(3600))
        }
    }
}

/// One bucket per key, holding at most `max_keys` of them. A key is "in use" while its bucket
/// is not full; full buckets are forgotten when room is needed. If every bucket is in use, a
/// new key is refused (with the time until the first bucket is full again) rather than the map
/// grown.
#[derive(Debug)]
pub struct KeyedLimiter<K> {
    rate: Rate,
    max_keys: usize,
    buckets: AHashMap<K, TokenBucket>,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        Self {
            rate,
            max_keys: max_keys.max(1),
            buckets: AHashMap::new(),
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
                let soonest = self
                    .buckets
                    .values()
                    .map(|bucket| bucket.until_full(rate, now))
                    .min()
                    .unwrap_or(Duration::ZERO);
                return Err(soonest.max(Duration::from_millis(1)));
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

/// A [`KeyedLimiter`] split into independently locked shards by key, so that limiting on the
/// hot path does not serialize every session behind one lock. Each shard holds its share of
/// `max_keys`: the shares differ by at most one and add up to exactly `max_keys`
/// (PROTOCOL.md §8.1).
#[derive(Debug)]
pub struct ShardedLimiter<K> {
    shards: Box<[Mutex<KeyedLimiter<K>>]>,
    hasher: ahash::RandomState,
}

/// Shards of a [`ShardedLimiter`] (fewer when it tracks few keys).
const LIMITER_SHARDS: usize = 32;

impl<K: Hash + Eq + Clone> ShardedLimiter<K> {
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        let max_keys = max_keys.max(1);
        let count = LIMITER_SHARDS.min(max_keys);
        let share = |shard: usize| max_keys / count + usize::from(shard < max_keys % count);
        Self {
            shards: (0..count)
                .map(|shard| Mutex::new(KeyedLimiter::new(rate, share(shard))))
                .collect(),
            hasher: Default::default(),
        }
    }

    /// Takes a token for `key`, or says how long until one is available.
    pub fn try_take(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let index = (self.hasher.hash_one(key) % self.shards.len() as u64) as usize;
        self.shards[index].lock().try_take(key, now)
    }

    /// Keys tracked across all shards.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        // Both buckets are empty: a third key is refused instead of growing the map, and told
        // when the first bucket is full again.
        assert_eq!(limiter.try_take(&3, now), Err(Duration::from_secs(1)));
        assert_eq!(limiter.len(), 2);
        // Once they refill they are forgotten and make room.
        limiter.try_take(&3, now + Duration::from_secs(1)).unwrap();
        assert!(limiter.len() <= 2);
    }

    #[test]
    fn ipv6_peers_are_grouped_by_their_64_bit_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_group(a), address_group(b));
        assert_ne!(address_group(a), address_group(other));
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(address_group(mapped), v4);
        assert_eq!(address_group(v4), v4);
    }

    #[test]
    fn a_sharded_limiter_tracks_exactly_max_keys() {
        let now = Instant::now();
        for max_keys in [1usize, 8, 31, 32, 33, 40, 100_000] {
            let limiter: ShardedLimiter<u32> = ShardedLimiter::new(Rate::new(1.0, 1), max_keys);
            let total: usize = limiter.shards.iter().map(|s| s.lock().max_keys).sum();
            assert_eq!(total, max_keys);
        }
        // Keys in use beyond the maximum are refused, whichever shards they fall into.
        let limiter = ShardedLimiter::new(Rate::new(1.0, 1), 40);
        let admitted = (0..41u32)
            .filter(|key| limiter.try_take(key, now).is_ok())
            .count();
        assert!(admitted <= 40, "{admitted}");
    }

    #[test]
    fn a_sharded_limiter_limits_each_key_alone() {
        let now = Instant::now();
        let limiter = ShardedLimiter::new(Rate::new(1.0, 2), 1000);
        for key in 0..100u32 {
            limiter.try_take(&key, now).unwrap();
            limiter.try_take(&key, now).unwrap();
            assert!(limiter.try_take(&key, now).is_err());
        }
        assert_eq!(limiter.len(), 100);
    }
}
