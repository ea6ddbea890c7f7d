//! Accounts: devices, use, policy, contacts and tickets.
use super::*;
impl State {
    pub fn touch(&self, identity: &Identity, now_ms: u64) {
        let mut shard = self.data(identity);
        let due = shard.accounts.get(identity).is_some_and(|a| {
            now_ms >= a.last_seen_ms.saturating_add(self.limits.touch_interval_ms)
        });
        if due && self.check_writable().is_ok() {
            let _ = self.commit(
                &mut shard,
                Kind::AccountSeen(ev::AccountSeen {
                    identity: Bytes::copy_from_slice(identity),
                    at_ms: now_ms,
                }),
            );
        }
    }

    pub fn register(
        &self,
        me: &Identity,
        reg: Registration,
        now_ms: u64,
    ) -> Result<Change<u32>, StoreError> {
        self.check_writable()?;
        let mut shard = self.data(me);
        match shard.accounts.get(me) {
            Some(account) if account.registered(reg.device).is_none() => {
                self.limits.check_new_device(
                    account.active_devices(),
                    account.devices.len(),
                    account.devices.contains_key(&reg.device),
                )?;
            }
            Some(_) => {}
            None => self
                .limits
                .check_new_identity(self.counters.identities.load(Ordering::Relaxed))?,
        }
        let count = reg.one_time_prekeys.len() as u32;
        let lsn = self.commit(
            &mut shard,
            Kind::DeviceRegistered(ev::DeviceRegistered {
                identity: Bytes::copy_from_slice(me),
                device_id: reg.device,
                registration_id: reg.registration_id,
                identity_key: reg.identity_key,
                signed_prekey: Some(reg.signed_prekey),
                one_time_prekeys: reg.one_time_prekeys,
                at_ms: now_ms,
            }),
        )?;
        Ok(Change { value: count, lsn })
    }

    /// Unregisters a device (and removes the account if it was the last); returns the
    /// mailboxes that closed.
    pub fn unregister(&self, me: &Identity, device: u32) -> Result<Change<()>, StoreError> {
        self.check_writable()?;
        let mut shard = self.data(me);
        let registered = shard
            .accounts
            .get(me)
            .and_then(|a| a.registered(device))
            .is_some();
        if !registered {
            return Err(StoreError::NotRegistered(device));
        }
        let mut lsn = self.commit(
            &mut shard,
            Kind::DeviceUnregistered(ev::DeviceUnregistered {
                identity: Bytes::copy_from_slice(me),
                device_id: device,
            }),
        )?;
        let account = shard.accounts.get(me).expect("checked above");
        if !account.is_registered() {
            let id_floor = account.id_floor();
            lsn = self.commit(
                &mut shard,
                Kind::AccountRemoved(ev::AccountRemoved {
                    identity: Bytes::copy_from_slice(me),
                    id_floor,
                }),
            )?;
        }
        Ok(Change { value: (), lsn })
    }

    pub fn is_registered(&self, identity: &Identity, device: u32) -> bool {
        self.data(identity)
            .accounts
            .get(identity)
            .and_then(|a| a.registered(device))
            .is_some()
    }

    fn registered_account(
        &self,
        me: &Identity,
    ) -> Result<parking_lot::MutexGuard<'_, ShardData>, StoreError> {
        self.check_writable()?;
        let shard = self.data(me);
        if !shard.accounts.get(me).is_some_and(Account::is_registered) {
            return Err(StoreError::IdentityNotRegistered);
        }
        Ok(shard)
    }

    pub fn set_policy(&self, me: &Identity, accept: Accept) -> Result<Change<()>, StoreError> {
        let mut shard = self.registered_account(me)?;
        let lsn = self.commit(
            &mut shard,
            Kind::PolicySet(ev::PolicySet {
                identity: Bytes::copy_from_slice(me),
                accept: accept as i32,
            }),
        )?;
        Ok(Change { value: (), lsn })
    }

    pub fn add_contact(&self, me: &Identity, contact: Identity) -> Result<Change<()>, StoreError> {
        let mut shard = self.registered_account(me)?;
        let account = shard.accounts.get(me).expect("checked registered");
        if account.contacts.contains(&contact) {
            return Ok(Change {
                value: (),
                lsn: self.current_lsn(),
            });
        }
        self.limits.check_new_contact(account.contacts.len())?;
        let lsn = self.commit(
            &mut shard,
            Kind::ContactAdded(ev::ContactAdded {
                identity: Bytes::copy_from_slice(me),
                contact: Bytes::copy_from_slice(&contact),
            }),
        )?;
        Ok(Change { value: (), lsn })
    }

    pub fn remove_contact(
        &self,
        me: &Identity,
        contact: Identity,
    ) -> Result<Change<()>, StoreError> {
        let mut shard = self.registered_account(me)?;
        let present = shard
            .accounts
            .get(me)
            .expect("checked registered")
            .contacts
            .contains(&contact);
        if !present {
            return Ok(Change {
                value: (),
                lsn: self.current_lsn(),
            });
        }
        let lsn = self.commit(
            &mut shard,
            Kind::ContactRemoved(ev::ContactRemoved {
                identity: Bytes::copy_from_slice(me),
                contact: Bytes::copy_from_slice(&contact),
            }),
        )?;
        Ok(Change { value: (), lsn })
    }

    pub fn create_ticket(
        &self,
        me: &Identity,
        token: [u8; TICKET_LEN],
        expires_at_ms: u64,
        uses: u32,
        now_ms: u64,
    ) -> Result<Change<()>, StoreError> {
        let mut shard = self.registered_account(me)?;
        let live = shard
            .accounts
            .get(me)
            .expect("checked registered")
            .tickets
            .values()
            .filter(|t| t.expires_at_ms > now_ms)
            .count();
        self.limits.check_new_ticket(live)?;
        let lsn = self.commit(
            &mut shard,
            Kind::TicketCreated(ev::TicketCreated {
                identity: Bytes::copy_from_slice(me),
                token: Bytes::copy_from_slice(&token),
                expires_at_ms,
                uses,
                created_at_ms: now_ms,
            }),
        )?;
        Ok(Change { value: (), lsn })
    }
}
