//! The one place where durable state changes: [`apply`] of an [`Event`], live and when a
//! journal or snapshot is replayed, and its inverse, the events that rebuild an account.
use super::*;
/// Why a replayed event could not be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApplyError {
    #[error("event has no kind")]
    Empty,
    #[error("event field {0} has the wrong length")]
    Field(&'static str),
    #[error("event field {field} is out of range ({value})")]
    OutOfRange { field: &'static str, value: u64 },
}

pub(super) fn fixed<const N: usize>(
    bytes: &[u8],
    field: &'static str,
) -> Result<[u8; N], ApplyError> {
    bytes.try_into().map_err(|_| ApplyError::Field(field))
}

/// Refuses values that would overflow later arithmetic (`+ 1` on ids, time comparisons).
pub(super) fn in_range(field: &'static str, value: u64, min: u64) -> Result<u64, ApplyError> {
    if value < min || value >= MAX_SEQUENCE {
        return Err(ApplyError::OutOfRange { field, value });
    }
    Ok(value)
}

/// The identity whose shard an event belongs to.
pub fn event_identity(event: &Event) -> Result<Identity, ApplyError> {
    let bytes = match event.kind.as_ref().ok_or(ApplyError::Empty)? {
        Kind::DeviceRegistered(e) => &e.identity,
        Kind::DeviceUnregistered(e) => &e.identity,
        Kind::PreKeysUploaded(e) => &e.identity,
        Kind::PreKeysTaken(e) => &e.identity,
        Kind::MessageStored(e) => &e.recipient,
        Kind::MessagesRemoved(e) => &e.identity,
        Kind::PolicySet(e) => &e.identity,
        Kind::ContactAdded(e) => &e.identity,
        Kind::ContactRemoved(e) => &e.identity,
        Kind::TicketCreated(e) => &e.identity,
        Kind::MailboxState(e) => &e.identity,
        Kind::AccountRemoved(e) => &e.identity,
        Kind::AccountSeen(e) => &e.identity,
    };
    fixed(bytes, "identity")
}

/// The account an event applies to, created (and counted) if new.
pub(super) fn account_for<'a>(
    accounts: &'a mut AHashMap<Identity, Account>,
    identity: Identity,
    counters: &Counters,
) -> &'a mut Account {
    accounts.entry(identity).or_insert_with(|| {
        counters.identities.fetch_add(1, Ordering::Relaxed);
        Account::default()
    })
}

/// Applies one event to the accounts of its shard. The only code that changes durable state.
pub(super) fn apply(
    shard: &mut ShardData,
    event: &Event,
    counters: &Counters,
) -> Result<(), ApplyError> {
    let ShardData {
        accounts, senders, ..
    } = shard;
    let identity = event_identity(event)?;
    let kind = event.kind.as_ref().ok_or(ApplyError::Empty)?;
    if let Kind::AccountRemoved(e) = kind {
        let floor = in_range("id_floor", e.id_floor, 0)?;
        counters.id_floor.fetch_max(floor, Ordering::Relaxed);
        if let Some(mut account) = accounts.remove(&identity) {
            counters.identities.fetch_sub(1, Ordering::Relaxed);
            for device in account.devices.values_mut() {
                device.mailbox.clear(senders, counters);
            }
        }
        return Ok(());
    }
    let account = account_for(accounts, identity, counters);
    match kind {
        Kind::DeviceRegistered(e) => {
            in_range("device_id", u64::from(e.device_id), 1)?;
            let keys = DeviceKeys {
                registration_id: e.registration_id,
                identity_key: e.identity_key.clone(),
                signed_prekey: e.signed_prekey.clone().unwrap_or_default(),
                one_time_prekeys: e.one_time_prekeys.iter().cloned().collect(),
                low_announced: false,
            };
            let floor = counters.id_floor.load(Ordering::Relaxed).max(1);
            let device = account
                .devices
                .entry(e.device_id)
                .or_insert_with(|| Device {
                    state: DeviceState::Retired,
                    mailbox: Mailbox::new(floor),
                });
            device.state = DeviceState::Registered(keys);
            account.last_seen_ms = account.last_seen_ms.max(e.at_ms);
        }
        Kind::DeviceUnregistered(e) => {
            if let Some(device) = account.devices.get_mut(&e.device_id) {
                device.state = DeviceState::Retired;
                device.mailbox.clear(senders, counters);
            }
        }
        Kind::PreKeysUploaded(e) => {
            if let Some(keys) = account
                .devices
                .get_mut(&e.device_id)
                .and_then(Device::keys_mut)
            {
                if let Some(signed) = &e.signed_prekey {
                    keys.signed_prekey = signed.clone();
                }
                keys.one_time_prekeys
                    .extend(e.one_time_prekeys.iter().cloned());
            }
        }
        Kind::PreKeysTaken(e) => {
            for taken in &e.taken {
                if let Some(keys) = account
                    .devices
                    .get_mut(&taken.device_id)
                    .and_then(Device::keys_mut)
                {
                    if let Some(pos) = keys
                        .one_time_prekeys
                        .iter()
                        .position(|k| k.id == taken.prekey_id)
                    {
                        keys.one_time_prekeys.remove(pos);
                    }
                }
            }
        }
        Kind::MessageStored(e) => {
            let sender: Identity = fixed(&e.sender, "sender")?;
            let nonce = fixed(&e.sender_nonce, "sender_nonce")?;
            let signature = fixed(&e.sender_signature, "sender_signature")?;
            let message_id = in_range("message_id", e.message_id, 1)?;
            let received_at_ms = in_range("received_at_ms", e.received_at_ms, 0)?;
            if !e.ticket_used.is_empty() {
                let token: [u8; TICKET_LEN] = fixed(&e.ticket_used, "ticket_used")?;
                if let Some(ticket) = account.tickets.get_mut(&token) {
                    ticket.uses_left = ticket.uses_left.saturating_sub(1);
                    if ticket.uses_left == 0 {
                        account.tickets.remove(&token);
                    }
                }
            }
            if e.contact_added {
                account.contacts.insert(sender);
            }
            if let Some(device) = account.devices.get_mut(&e.device_id) {
                let mailbox = &mut device.mailbox;
                mailbox.next_id = mailbox.next_id.max(message_id + 1);
                let record = NewRecord {
                    sender: senders.acquire(&sender, e.sender_device),
                    nonce,
                    signature: &signature,
                    payload: &e.payload,
                    received_at_ms,
                };
                match mailbox.log.insert(message_id, &record) {
                    Some((replaced, len)) => {
                        senders.release(replaced);
                        counters
                            .stored_bytes
                            .fetch_sub(len as u64, Ordering::Relaxed);
                    }
                    None => {
                        counters.messages.fetch_add(1, Ordering::Relaxed);
                    }
                }
                counters
                    .stored_bytes
                    .fetch_add(e.payload.len() as u64, Ordering::Relaxed);
            }
        }
        Kind::MessagesRemoved(e) => {
            if let Some(device) = account.devices.get_mut(&e.device_id) {
                for id in &e.message_ids {
                    device.mailbox.remove(*id, senders, counters);
                }
            }
        }
        Kind::PolicySet(e) => account.accept = e.accept(),
        Kind::ContactAdded(e) => {
            account.contacts.insert(fixed(&e.contact, "contact")?);
        }
        Kind::ContactRemoved(e) => {
            account
                .contacts
                .remove(&fixed::<PUBLIC_KEY_LEN>(&e.contact, "contact")?);
        }
        Kind::MailboxState(e) => {
            in_range("device_id", u64::from(e.device_id), 1)?;
            let next_id = in_range("next_id", e.next_id, 0)?;
            let device = account
                .devices
                .entry(e.device_id)
                .or_insert_with(|| Device {
                    state: DeviceState::Retired,
                    mailbox: Mailbox::default(),
                });
            device.mailbox.next_id = device.mailbox.next_id.max(next_id);
        }
        Kind::TicketCreated(e) => {
            let expires_at_ms = in_range("expires_at_ms", e.expires_at_ms, 0)?;
            account
                .tickets
                .retain(|_, t| t.expires_at_ms > e.created_at_ms);
            account.tickets.insert(
                fixed(&e.token, "token")?,
                TicketState {
                    expires_at_ms,
                    uses_left: e.uses,
                },
            );
        }
        Kind::AccountSeen(e) => {
            let at_ms = in_range("at_ms", e.at_ms, 0)?;
            account.last_seen_ms = account.last_seen_ms.max(at_ms);
        }
        Kind::AccountRemoved(_) => unreachable!("handled above"),
    }
    Ok(())
}

/// Appends the events that rebuild `account` to `out`.
pub(super) fn describe_account(
    identity: &Identity,
    account: &Account,
    senders: &SenderTable,
    out: &mut Vec<Event>,
) {
    let id = || Bytes::copy_from_slice(identity);
    let mut push = |kind| out.push(Event { kind: Some(kind) });
    for (&device_id, device) in &account.devices {
        if let DeviceState::Registered(keys) = &device.state {
            push(Kind::DeviceRegistered(ev::DeviceRegistered {
                identity: id(),
                device_id,
                registration_id: keys.registration_id,
                identity_key: keys.identity_key.clone(),
                signed_prekey: Some(keys.signed_prekey.clone()),
                one_time_prekeys: keys.one_time_prekeys.iter().cloned().collect(),
                at_ms: 0,
            }));
        }
        push(Kind::MailboxState(ev::MailboxState {
            identity: id(),
            device_id,
            next_id: device.mailbox.next_id,
        }));
        for m in device.mailbox.log.iter() {
            let (sender, sender_device) = senders.resolve(m.sender);
            push(Kind::MessageStored(ev::MessageStored {
                recipient: id(),
                device_id,
                message_id: m.id,
                sender: Bytes::copy_from_slice(sender),
                sender_device,
                sender_nonce: Bytes::copy_from_slice(&m.nonce),
                sender_signature: Bytes::copy_from_slice(m.signature),
                payload: Bytes::copy_from_slice(m.payload),
                received_at_ms: m.received_at_ms,
                ticket_used: Bytes::new(),
                contact_added: false,
            }));
        }
    }
    if account.accept != Accept::Open {
        push(Kind::PolicySet(ev::PolicySet {
            identity: id(),
            accept: account.accept as i32,
        }));
    }
    for contact in &account.contacts {
        push(Kind::ContactAdded(ev::ContactAdded {
            identity: id(),
            contact: Bytes::copy_from_slice(contact),
        }));
    }
    for (token, ticket) in &account.tickets {
        // As the live store holds it: expired tickets are pruned by the one apply path only.
        push(Kind::TicketCreated(ev::TicketCreated {
            identity: id(),
            token: Bytes::copy_from_slice(token),
            expires_at_ms: ticket.expires_at_ms,
            uses: ticket.uses_left,
            created_at_ms: 0,
        }));
    }
    if account.last_seen_ms > 0 {
        push(Kind::AccountSeen(ev::AccountSeen {
            identity: id(),
            at_ms: account.last_seen_ms,
        }));
    }
}
