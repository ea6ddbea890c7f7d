//! Prekeys: uploads, counts, and fetches that hand each one-time prekey out once.
use super::*;
impl State {
    pub fn upload_prekeys(
        &self,
        me: &Identity,
        device: u32,
        signed_prekey: Option<SignedPreKey>,
        one_time_prekeys: Vec<PreKey>,
    ) -> Result<Change<u32>, StoreError> {
        self.check_writable()?;
        let mut shard = self.data(me);
        let keys = shard
            .accounts
            .get(me)
            .and_then(|a| a.registered(device))
            .and_then(Device::keys)
            .ok_or(StoreError::NotRegistered(device))?;
        self.limits
            .check_prekey_upload(keys.one_time_prekeys.len(), &one_time_prekeys, |id| {
                keys.one_time_prekeys.iter().any(|k| k.id == id)
            })?;
        let stored = keys.one_time_prekeys.len();
        let count = (stored + one_time_prekeys.len()) as u32;
        let lsn = self.commit(
            &mut shard,
            Kind::PreKeysUploaded(ev::PreKeysUploaded {
                identity: Bytes::copy_from_slice(me),
                device_id: device,
                signed_prekey,
                one_time_prekeys,
            }),
        )?;
        if !self.limits.prekeys_low(count) {
            if let Some(keys) = shard
                .accounts
                .get_mut(me)
                .and_then(|a| a.registered_mut(device))
                .and_then(Device::keys_mut)
            {
                keys.low_announced = false;
            }
        }
        Ok(Change { value: count, lsn })
    }

    pub fn prekey_count(&self, me: &Identity, device: u32) -> Result<u32, StoreError> {
        let shard = self.data(me);
        shard
            .accounts
            .get(me)
            .and_then(|a| a.registered(device))
            .and_then(Device::keys)
            .map(|keys| keys.one_time_prekeys.len() as u32)
            .ok_or(StoreError::NotRegistered(device))
    }

    /// Hands out one bundle per device, popping a one-time prekey from each for which
    /// `take_one_time` allows it.
    pub fn fetch_prekeys(
        &self,
        target: &Identity,
        devices: &[u32],
        mut take_one_time: impl FnMut(u32) -> bool,
    ) -> Result<Change<FetchChange>, StoreError> {
        self.check_writable()?;
        let mut shard = self.data(target);
        let account = shard
            .accounts
            .get_mut(target)
            .filter(|a| a.is_registered())
            .ok_or(StoreError::UnknownRecipient)?;
        let wanted: Vec<u32> = if devices.is_empty() {
            account
                .devices
                .iter()
                .filter(|(_, d)| d.keys().is_some())
                .map(|(id, _)| *id)
                .collect()
        } else {
            for id in devices {
                account
                    .registered(*id)
                    .ok_or(StoreError::UnknownRecipient)?;
            }
            devices.to_vec()
        };
        let mut fetched = Fetched::default();
        let mut taken = Vec::new();
        let mut low = Vec::new();
        for device_id in wanted {
            let keys = account
                .registered_mut(device_id)
                .and_then(Device::keys_mut)
                .expect("checked above");
            let one_time_prekey = match keys.one_time_prekeys.front() {
                None => {
                    fetched.exhausted += 1;
                    None
                }
                Some(_) if !take_one_time(device_id) => {
                    fetched.withheld += 1;
                    None
                }
                Some(key) => {
                    let key = key.clone();
                    taken.push(ev::TakenPreKey {
                        device_id,
                        prekey_id: key.id,
                    });
                    let remaining = keys.one_time_prekeys.len() as u32 - 1;
                    if self.limits.prekeys_low(remaining) && !keys.low_announced {
                        keys.low_announced = true;
                        low.push((device_id, remaining));
                    }
                    Some(key)
                }
            };
            fetched.bundles.push(PreKeyBundle {
                device_id,
                registration_id: keys.registration_id,
                identity_key: keys.identity_key.clone(),
                signed_prekey: Some(keys.signed_prekey.clone()),
                one_time_prekey,
            });
        }
        fetched.handed_out = taken.len();
        let lsn = if taken.is_empty() {
            self.current_lsn()
        } else {
            self.commit(
                &mut shard,
                Kind::PreKeysTaken(ev::PreKeysTaken {
                    identity: Bytes::copy_from_slice(target),
                    taken,
                }),
            )?
        };
        Ok(Change {
            value: FetchChange { fetched, low },
            lsn,
        })
    }
}
