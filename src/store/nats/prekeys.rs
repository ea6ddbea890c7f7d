//! Prekeys on the cluster. A registration's one-time prekeys are messages of one subject
//! (`<p>.k.<identity>.<device>.<generation>`, oldest first), whose limit per subject is
//! `max_prekeys_per_device`: an upload is one atomic batch, refused whole at the limit. A
//! fetch takes the oldest key by deleting that message: a delete succeeds once, so across
//! relays and leader changes a key is handed out at most once. The bundle around it (the
//! registration id, identity key and signed prekey) is the registration's keys record.

use std::collections::HashSet;

use prost::Message as _;

use super::error::NatsError;
use super::records::{decode, KeysRecord};
use super::Inner;
use crate::store::{Fetched, Identity, StoreError, StoreResult};
use botd_protocol::proto::{PreKey, PreKeyBundle, SignedPreKey};

/// Tries to take the oldest key of a device before it gives up for this fetch (each lost try
/// means another relay took that key at the same moment).
const MAX_POP_ATTEMPTS: usize = 16;

impl Inner {
    /// The keys generation of a registered device.
    async fn keys_generation(&self, identity: &Identity, device: u32) -> StoreResult<u64> {
        let read = self.account_fresh(identity).await?;
        read.record
            .as_deref()
            .and_then(|a| a.registered(device))
            .map(|slot| slot.keys_generation)
            .ok_or(StoreError::NotRegistered(device))
    }

    /// One-time prekeys stored for a registration.
    async fn stored_prekeys(&self, subject: &str) -> StoreResult<usize> {
        let first = self
            .cluster
            .next(&self.cluster.names.prekeys_stream(), subject, 1)
            .await?;
        Ok(first.map_or(0, |m| m.pending as usize + 1))
    }

    pub async fn prekey_count(&self, me: Identity, device: u32) -> StoreResult<u32> {
        let generation = self.keys_generation(&me, device).await?;
        let subject = self.cluster.names.prekeys(&me, device, generation);
        Ok(self.stored_prekeys(&subject).await? as u32)
    }

    pub async fn upload_prekeys(
        &self,
        me: Identity,
        device: u32,
        signed_prekey: Option<SignedPreKey>,
        one_time_prekeys: Vec<PreKey>,
    ) -> StoreResult<u32> {
        let generation = self.keys_generation(&me, device).await?;
        let names = &self.cluster.names;
        let subject = names.prekeys(&me, device, generation);
        // The ids stored (an upload is rare; a device stores at most max_prekeys_per_device).
        let mut ids = HashSet::new();
        let mut from = 1;
        for _ in 0..=(self.limits.max_prekeys_per_device / super::client::MAX_GET_BATCH + 1) {
            let batch = self
                .cluster
                .batch(
                    &names.prekeys_stream(),
                    &subject,
                    from,
                    super::client::MAX_GET_BATCH,
                )
                .await?;
            let Some(last) = batch.last() else { break };
            from = last.sequence + 1;
            ids.extend(
                batch
                    .iter()
                    .filter_map(|m| PreKey::decode(m.payload.clone()).ok())
                    .map(|k| k.id),
            );
        }
        self.limits
            .check_prekey_upload(ids.len(), &one_time_prekeys, |id| ids.contains(&id))?;
        let count = (ids.len() + one_time_prekeys.len()) as u32;
        self.publish_prekeys(&subject, one_time_prekeys).await?;
        self.update_keys(&me, device, generation, signed_prekey, count)
            .await?;
        Ok(count)
    }

    /// Takes the oldest one-time prekey of a registration; with what it leaves.
    async fn pop_prekey(&self, subject: &str) -> StoreResult<Option<(PreKey, u64)>> {
        let stream = self.cluster.names.prekeys_stream();
        let mut from = 1;
        for _ in 0..MAX_POP_ATTEMPTS {
            let Some(oldest) = self.cluster.next(&stream, subject, from).await? else {
                return Ok(None);
            };
            if self.cluster.delete(&stream, oldest.sequence).await? {
                let key = PreKey::decode(oldest.payload)
                    .map_err(|_| NatsError::Corrupt("one-time prekey"))?;
                return Ok(Some((key, oldest.pending)));
            }
            // Taken by someone else just now: the next one.
            from = oldest.sequence + 1;
        }
        Err(NatsError::Contended("one-time prekeys").into())
    }

    /// Announces `PreKeysLow` if this fetch is the one that marks the keys record: once per
    /// crossing of the threshold, whichever relay the fetches run on.
    async fn announce_low(
        &self,
        target: &Identity,
        device: u32,
        left: u32,
        subject: &str,
        keys: &KeysRecord,
        seq: u64,
    ) {
        let marked = KeysRecord {
            low_announced: true,
            ..keys.clone()
        };
        match self
            .cluster
            .compare_and_set(
                subject.to_owned(),
                seq,
                super::records::encode(&marked),
                |_| {},
            )
            .await
        {
            Ok(Some(_)) => self.announce(target, 0, Some((device, left))).await,
            Ok(None) => {}
            Err(err) => tracing::warn!(error = %err, "PreKeysLow not announced"),
        }
    }

    pub async fn fetch_prekeys(
        &self,
        target: Identity,
        devices: Vec<u32>,
        mut take_one_time: impl FnMut(u32) -> bool,
    ) -> StoreResult<Fetched> {
        let names = &self.cluster.names;
        let read = self.account_fresh(&target).await?;
        let account = read
            .registered()
            .cloned()
            .ok_or(StoreError::UnknownRecipient)?;
        let wanted: Vec<u32> = if devices.is_empty() {
            account
                .devices
                .iter()
                .filter(|s| s.registered)
                .map(|s| s.device_id)
                .collect()
        } else {
            for device in &devices {
                account
                    .registered(*device)
                    .ok_or(StoreError::UnknownRecipient)?;
            }
            devices
        };
        let mut fetched = Fetched::default();
        for device_id in wanted {
            let slot = account.registered(device_id).expect("checked above");
            let keys_subject = names.keys(&target, device_id, slot.keys_generation);
            let (keys, keys_seq) = self
                .cluster
                .last_from_leader(&names.accounts_stream(), &keys_subject)
                .await?
                .and_then(|m| Some((decode::<KeysRecord>(&m.payload)?, m.sequence)))
                .ok_or(NatsError::Corrupt("keys record"))?;
            let prekeys_subject = names.prekeys(&target, device_id, slot.keys_generation);
            let one_time_prekey = if self.stored_prekeys(&prekeys_subject).await? == 0 {
                fetched.exhausted += 1;
                None
            } else if !take_one_time(device_id) {
                fetched.withheld += 1;
                None
            } else {
                match self.pop_prekey(&prekeys_subject).await? {
                    None => {
                        fetched.exhausted += 1;
                        None
                    }
                    Some((key, left)) => {
                        fetched.handed_out += 1;
                        let left = left as u32;
                        if self.limits.prekeys_low(left) && !keys.low_announced {
                            self.announce_low(
                                &target,
                                device_id,
                                left,
                                &keys_subject,
                                &keys,
                                keys_seq,
                            )
                            .await;
                        }
                        Some(key)
                    }
                }
            };
            let keys = keys;
            fetched.bundles.push(PreKeyBundle {
                device_id,
                registration_id: keys.registration_id,
                identity_key: keys.identity_key,
                signed_prekey: keys.signed_prekey,
                one_time_prekey,
            });
        }
        Ok(fetched)
    }
}
