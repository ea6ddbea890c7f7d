//! A bounded memory of recently seen handshake ephemeral keys, so a replayed `Init` is refused.
//! When full, the oldest entry is forgotten: the bound holds whatever a peer sends.

use std::collections::VecDeque;

use ahash::AHashSet;

use super::keys::{PublicKeyBytes, PUBLIC_KEY_LEN};

#[derive(Debug)]
pub struct ReplayCache {
    capacity: usize,
    order: VecDeque<[u8; PUBLIC_KEY_LEN]>,
    seen: AHashSet<[u8; PUBLIC_KEY_LEN]>,
}

impl ReplayCache {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            order: VecDeque::with_capacity(capacity.min(4096)),
            seen: AHashSet::with_capacity(capacity.min(4096)),
        }
    }

    /// Records `key`; false when it was already remembered.
    pub fn insert(&mut self, key: &PublicKeyBytes) -> bool {
        let bytes = *key.as_bytes();
        if !self.seen.insert(bytes) {
            return false;
        }
        if self.order.len() == self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
        self.order.push_back(bytes);
        true
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyPair;

    #[test]
    fn refuses_repeats_and_stays_bounded() {
        let mut cache = ReplayCache::new(3);
        let keys: Vec<KeyPair> = (0..5).map(|_| KeyPair::generate()).collect();
        assert!(cache.insert(keys[0].public()));
        assert!(!cache.insert(keys[0].public()));
        for key in &keys[1..] {
            assert!(cache.insert(key.public()));
        }
        assert_eq!(cache.len(), 3);
        // The oldest was forgotten; the newest are still refused.
        assert!(cache.insert(keys[0].public()));
        assert!(!cache.insert(keys[4].public()));
    }
}
