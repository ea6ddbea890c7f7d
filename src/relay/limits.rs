//! The relay's rate limits, all token buckets keyed by something a peer cannot mint for free
//! alone: identities (free to create, hence also) source addresses (IPv6 per /64), identity
//! pairs, and target devices. Every request that changes state is limited, per identity and
//! per address; `retry_after_ms` tells when a token is next available.

use std::net::IpAddr;
use std::sync::Arc;

use tokio::time::Instant;

use super::error::RelayError;
use crate::config::Config;
use crate::metrics as m;
use crate::ratelimit::{Rate, ShardedLimiter};
use crate::store::Identity;

/// The request families limited per identity and per address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `Register`, `Unregister`, `UploadPreKeys`, `SetPolicy`, `AddContact`, `RemoveContact`,
    /// `CreateTicket`.
    Change,
    /// `AckMessages` (per identity only: an ack deletes at most what sends stored).
    Ack,
    /// `FetchPreKeys`.
    PrekeyFetch,
}

/// One limiter with its metric label and the words its error uses.
struct Bucket<K> {
    limiter: ShardedLimiter<K>,
    refused: metrics::Counter,
    what: &'static str,
}

impl<K: std::hash::Hash + Eq + Clone> Bucket<K> {
    fn new(rate: Rate, keys: usize, label: &'static str, what: &'static str) -> Self {
        Self {
            limiter: ShardedLimiter::new(rate, keys),
            refused: metrics::counter!(m::RATE_LIMITED, "limit" => label),
            what,
        }
    }

    fn take(&self, key: &K, now: Instant) -> Result<(), RelayError> {
        self.limiter.try_take(key, now).map_err(|retry_after| {
            self.refused.increment(1);
            RelayError::RateLimited {
                what: self.what,
                retry_after,
            }
        })
    }
}

pub struct Limits {
    sends: Bucket<Identity>,
    pairs: Bucket<(Identity, Identity)>,
    send_addresses: Bucket<IpAddr>,
    acks: Bucket<Identity>,
    changes: Bucket<Identity>,
    change_addresses: Bucket<IpAddr>,
    fetches: Bucket<Identity>,
    fetch_addresses: Bucket<IpAddr>,
    one_time_prekeys: Arc<ShardedLimiter<(Identity, u32)>>,
}

impl Limits {
    pub fn new(config: &Config) -> Self {
        let keys = config.max_rate_limited_keys;
        Self {
            sends: Bucket::new(config.send_rate_per_identity, keys, "sends", "sends"),
            pairs: Bucket::new(
                config.send_rate_per_pair,
                keys,
                "sends_to_recipient",
                "sends to this recipient",
            ),
            send_addresses: Bucket::new(
                config.send_rate_per_ip,
                keys,
                "sends_per_address",
                "sends from this address",
            ),
            acks: Bucket::new(config.ack_rate_per_identity, keys, "acks", "acks"),
            changes: Bucket::new(
                config.change_rate_per_identity,
                keys,
                "changes",
                "account changes",
            ),
            change_addresses: Bucket::new(
                config.change_rate_per_ip,
                keys,
                "changes_per_address",
                "account changes from this address",
            ),
            fetches: Bucket::new(
                config.prekey_fetch_rate,
                keys,
                "prekey_fetches",
                "prekey fetches",
            ),
            fetch_addresses: Bucket::new(
                config.prekey_fetch_rate_per_ip,
                keys,
                "prekey_fetches_per_address",
                "prekey fetches from this address",
            ),
            one_time_prekeys: Arc::new(ShardedLimiter::new(
                config.one_time_prekey_rate_per_device,
                keys,
            )),
        }
    }

    /// A `Send`'s tokens: the sender's, then the pair's, then the address's. Tokens taken
    /// before a refusal stay taken.
    pub fn send(
        &self,
        sender: &Identity,
        recipient: &Identity,
        address: &IpAddr,
        now: Instant,
    ) -> Result<(), RelayError> {
        self.sends.take(sender, now)?;
        self.pairs.take(&(*sender, *recipient), now)?;
        self.send_addresses.take(address, now)
    }

    /// A token of `limit` for the identity, then (where the family has one) the address.
    pub fn take(
        &self,
        limit: Limit,
        identity: &Identity,
        address: &IpAddr,
        now: Instant,
    ) -> Result<(), RelayError> {
        match limit {
            Limit::Change => {
                self.changes.take(identity, now)?;
                self.change_addresses.take(address, now)
            }
            Limit::Ack => self.acks.take(identity, now),
            Limit::PrekeyFetch => {
                self.fetches.take(identity, now)?;
                self.fetch_addresses.take(address, now)
            }
        }
    }

    /// Decides, per device of `target`, whether a fetch may take a one-time prekey: beyond
    /// the per-device rate, bundles go out without one, so fresh identities cannot drain a
    /// device's keys.
    pub fn one_time_prekeys(&self, target: Identity) -> impl FnMut(u32) -> bool + Send + 'static {
        let limiter = self.one_time_prekeys.clone();
        move |device| limiter.try_take(&(target, device), Instant::now()).is_ok()
    }
}
