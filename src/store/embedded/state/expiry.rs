//! The maintenance sweep (expired messages, idle accounts) and the counts for metrics.
use super::*;
impl State {
    /// Removes messages received at or before `message_cutoff_ms` and accounts last seen
    /// before `account_cutoff_ms`; in the same pass, counts what stays.
    pub fn expire(&self, message_cutoff_ms: u64, account_cutoff_ms: u64) -> Swept {
        let mut swept = Swept {
            expiry: Expiry::default(),
            removed: Vec::new(),
            closed: Vec::new(),
            lsn: 0,
        };
        for shard in self.shards.iter() {
            let mut shard = shard.data.lock();
            let mut removals = Vec::new();
            let mut idle = Vec::new();
            for (identity, account) in shard.accounts.iter_mut() {
                if account.last_seen_ms < account_cutoff_ms {
                    idle.push((*identity, account.id_floor()));
                    continue;
                }
                for (device_id, device) in account.devices.iter_mut() {
                    let mailbox = &mut device.mailbox;
                    swept.expiry.bytes_trimmed += mailbox.log.trim();
                    // Ids are assigned in receive order, so the expired ones are a prefix.
                    let mut expired_bytes = 0;
                    let ids: Vec<u64> = mailbox
                        .log
                        .iter()
                        .take_while(|m| m.received_at_ms <= message_cutoff_ms)
                        .map(|m| {
                            expired_bytes += m.payload.len();
                            m.id
                        })
                        .collect();
                    swept.expiry.messages_left += mailbox.log.len() - ids.len();
                    swept.expiry.payload_bytes_left += mailbox.log.payload_bytes() - expired_bytes;
                    if !ids.is_empty() {
                        removals.push((*identity, *device_id, ids));
                    }
                }
            }
            if self.check_writable().is_err() {
                continue;
            }
            for (identity, device_id, ids) in removals {
                let kind = Kind::MessagesRemoved(ev::MessagesRemoved {
                    identity: Bytes::copy_from_slice(&identity),
                    device_id,
                    message_ids: ids.clone(),
                    reason: Removal::Expired as i32,
                });
                if let Ok(lsn) = self.commit(&mut shard, kind) {
                    swept.lsn = swept.lsn.max(lsn);
                    swept.expiry.expired_messages += ids.len();
                    swept.removed.push((
                        MailboxId {
                            identity,
                            device: device_id,
                        },
                        ids,
                    ));
                }
            }
            for (identity, id_floor) in idle {
                let devices: Vec<u32> = shard.accounts[&identity]
                    .devices
                    .iter()
                    .filter(|(_, d)| d.keys().is_some())
                    .map(|(id, _)| *id)
                    .collect();
                let kind = Kind::AccountRemoved(ev::AccountRemoved {
                    identity: Bytes::copy_from_slice(&identity),
                    id_floor,
                });
                if let Ok(lsn) = self.commit(&mut shard, kind) {
                    swept.lsn = swept.lsn.max(lsn);
                    swept.expiry.removed_accounts += 1;
                    swept.closed.extend(
                        devices
                            .into_iter()
                            .map(|device| MailboxId { identity, device }),
                    );
                }
            }
        }
        swept
    }

    /// Running totals, read without walking the store.
    pub fn totals(&self) -> StoreTotals {
        StoreTotals {
            identities: self.counters.identities.load(Ordering::Relaxed),
            messages: self.counters.messages.load(Ordering::Relaxed),
            payload_bytes: self.counters.stored_bytes.load(Ordering::Relaxed),
            journal_pending_bytes: self.journal.as_ref().map_or(0, |j| j.pending_bytes()),
        }
    }

    pub fn stats(&self) -> StoreStats {
        let mut stats = StoreStats::default();
        for shard in self.shards.iter() {
            let shard = shard.data.lock();
            for account in shard.accounts.values() {
                if account.is_registered() {
                    stats.identities += 1;
                }
                for device in account.devices.values() {
                    if let Some(keys) = device.keys() {
                        stats.devices += 1;
                        stats.one_time_prekeys += keys.one_time_prekeys.len();
                    }
                    stats.messages += device.mailbox.log.len();
                    stats.payload_bytes += device.mailbox.log.payload_bytes();
                }
            }
        }
        stats
    }

    #[cfg(test)]
    pub(super) fn interned_senders(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.data.lock().senders.len())
            .sum()
    }
}
