//! Mailboxes: appending (with the checks of §8.3), reading what is durable, acknowledging.
use super::*;
/// The `Message` of a stored record (the payload hash is recomputed: 32 bytes per stored
/// message against one hash per delivery from the store).
pub(super) fn message_of(stored: &StoredMessage<'_>, senders: &SenderTable) -> Message {
    let (sender, sender_device) = senders.resolve(stored.sender);
    Message {
        id: stored.id,
        sender: *sender,
        sender_device,
        nonce: stored.nonce,
        payload_hash: sha256(&[stored.payload]),
        signature: *stored.signature,
        payload: Bytes::copy_from_slice(stored.payload),
        received_at_ms: stored.received_at_ms,
    }
}

impl State {
    /// Stores a message; returns the outcome, the lsn to wait for, and the shard to release
    /// once durable (for a newly stored message).
    pub fn append(&self, msg: NewMessage) -> Result<Change<(Appended, Option<usize>)>, StoreError> {
        self.check_writable()?;
        let index = self.shard_of(&msg.to.identity);
        let mut guard = self.shards[index].data.lock();
        let shard = &mut *guard;
        let account = shard
            .accounts
            .get(&msg.to.identity)
            .ok_or(StoreError::UnknownRecipient)?;
        let device = account
            .registered(msg.to.device)
            .ok_or(StoreError::UnknownRecipient)?;
        let mailbox = &device.mailbox;
        let senders = &shard.senders;
        let earlier = mailbox
            .log
            .find_nonce(&msg.nonce, |s| *senders.resolve(s).0 == msg.sender);
        if let Some(id) = earlier {
            // The first message's record comes before everything recorded so far.
            return Ok(Change {
                value: (Appended::Duplicate(id), None),
                lsn: self.current_lsn(),
            });
        }
        let offer = match &msg.ticket {
            None => TicketOffer::None,
            Some(token) => account
                .tickets
                .get(token)
                .map_or(TicketOffer::Unknown, |t| TicketOffer::Known {
                    expires_at_ms: t.expires_at_ms,
                    uses_left: t.uses_left,
                }),
        };
        let recipient = RecipientView {
            accept: account.accept,
            is_sender: msg.sender == msg.to.identity,
            sender_is_contact: account.contacts.contains(&msg.sender),
            contacts: account.contacts.len(),
        };
        let (ticket_used, contact_added) =
            match self.limits.admit(recipient, offer, msg.received_at_ms)? {
                Admission::Admitted => (Bytes::new(), false),
                Admission::ByTicket => (
                    Bytes::copy_from_slice(msg.ticket.as_ref().expect("admitted by its ticket")),
                    true,
                ),
            };
        self.limits.check_mailbox_room(
            mailbox.log.len(),
            mailbox.log.payload_bytes(),
            msg.payload.len(),
        )?;
        self.limits.check_storage(
            account.stored_bytes(),
            self.counters.stored_bytes.load(Ordering::Relaxed),
            msg.payload.len(),
        )?;
        let message_id = mailbox.next_id;
        if message_id >= MAX_SEQUENCE {
            return Err(StoreError::MailboxFull("message ids exhausted"));
        }
        let [recipient, sender, sender_nonce, sender_signature] =
            shared_fields([&msg.to.identity, &msg.sender, &msg.nonce, &msg.signature]);
        let lsn = self.commit(
            shard,
            Kind::MessageStored(ev::MessageStored {
                recipient,
                device_id: msg.to.device,
                message_id,
                sender,
                sender_device: msg.sender_device,
                sender_nonce,
                sender_signature,
                // Shared with the request: the mailbox copies it into its packed records.
                payload: msg.payload.clone(),
                received_at_ms: msg.received_at_ms,
                ticket_used,
                contact_added,
            }),
        )?;
        let release = Release {
            lsn,
            mailbox: msg.to,
            prev_id: message_id.checked_sub(1),
            message: Arc::new(Message {
                id: message_id,
                sender: msg.sender,
                sender_device: msg.sender_device,
                nonce: msg.nonce,
                payload_hash: msg.payload_hash,
                signature: msg.signature,
                payload: msg.payload,
                received_at_ms: msg.received_at_ms,
            }),
        };
        if self.journal.is_some() {
            let device = shard
                .accounts
                .get_mut(&msg.to.identity)
                .and_then(|a| a.devices.get_mut(&msg.to.device))
                .expect("the message was just stored there");
            device.mailbox.unconfirmed.push_back((message_id, lsn));
            // Keeps the list to what is still unconfirmed even if nobody reads the mailbox.
            device.mailbox.visible_up_to(self.progress.durable());
        }
        shard.unreleased.push_back(release);
        Ok(Change {
            value: (Appended::Stored(message_id), Some(index)),
            lsn,
        })
    }

    /// Runs `f` on a registered device's mailbox, with the highest id a read may show.
    fn with_mailbox<T>(
        &self,
        mailbox: &MailboxId,
        f: impl FnOnce(&Mailbox, &SenderTable, u64) -> T,
    ) -> Result<T, StoreError> {
        let durable = self.progress.durable();
        let mut guard = self.data(&mailbox.identity);
        let shard = &mut *guard;
        let device = shard
            .accounts
            .get_mut(&mailbox.identity)
            .and_then(|a| a.registered_mut(mailbox.device))
            .ok_or(StoreError::NotRegistered(mailbox.device))?;
        let visible = device.mailbox.visible_up_to(durable);
        Ok(f(&device.mailbox, &shard.senders, visible))
    }

    pub fn read(
        &self,
        mailbox: &MailboxId,
        after: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Arc<Message>>, StoreError> {
        self.with_mailbox(mailbox, |mb, senders, visible| {
            let mut out = Vec::new();
            let mut bytes = 0usize;
            for stored in mb.log.iter_from(after.saturating_add(1)) {
                if stored.id > visible || out.len() >= max_count {
                    break;
                }
                bytes += stored.payload.len();
                if bytes > max_bytes && !out.is_empty() {
                    break;
                }
                out.push(Arc::new(message_of(&stored, senders)));
            }
            out
        })
    }

    pub fn get(&self, mailbox: &MailboxId, id: u64) -> Result<Arc<Message>, StoreError> {
        self.with_mailbox(mailbox, |mb, senders, visible| {
            mb.log
                .get(id)
                .filter(|_| id <= visible)
                .map(|m| Arc::new(message_of(&m, senders)))
        })?
        .ok_or(StoreError::NotFound)
    }

    pub fn last_id(&self, mailbox: &MailboxId) -> Result<u64, StoreError> {
        self.with_mailbox(mailbox, |mb, _, visible| {
            mb.next_id.saturating_sub(1).min(visible)
        })
    }

    /// Deletes acknowledged messages; returns how many, and which. Only messages a read could
    /// show count: one that is not durable yet was never delivered, so an ack cannot take it.
    pub fn ack(&self, mailbox: &MailboxId, ids: &[u64]) -> Result<Change<Vec<u64>>, StoreError> {
        let durable = self.progress.durable();
        let mut shard = self.data(&mailbox.identity);
        let device = shard
            .accounts
            .get_mut(&mailbox.identity)
            .and_then(|a| a.registered_mut(mailbox.device))
            .ok_or(StoreError::NotRegistered(mailbox.device))?;
        let visible = device.mailbox.visible_up_to(durable);
        let mut present: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|id| *id <= visible && device.mailbox.log.contains(*id))
            .collect();
        present.sort_unstable();
        present.dedup();
        if present.is_empty() {
            return Ok(Change {
                value: present,
                lsn: self.current_lsn(),
            });
        }
        self.check_writable()?;
        let mut event = Event {
            kind: Some(Kind::MessagesRemoved(ev::MessagesRemoved {
                identity: Bytes::copy_from_slice(&mailbox.identity),
                device_id: mailbox.device,
                message_ids: present,
                reason: Removal::Acked as i32,
            })),
        };
        let lsn = self.commit_event(&mut shard, &event)?;
        let Some(Kind::MessagesRemoved(removed)) = event.kind.take() else {
            unreachable!("built just above");
        };
        Ok(Change {
            value: removed.message_ids,
            lsn,
        })
    }
}

/// The small fields of an event as slices of one shared buffer: one allocation instead of one
/// per field, and a field cloned by the journal's encoder (prost clones a `Bytes` to write it)
/// costs a reference count instead of promoting its own buffer.
pub(super) fn shared_fields<const N: usize>(parts: [&[u8]; N]) -> [Bytes; N] {
    let mut buf = BytesMut::with_capacity(parts.iter().map(|p| p.len()).sum());
    for part in parts {
        buf.extend_from_slice(part);
    }
    let mut all = buf.freeze();
    parts.map(|part| all.split_to(part.len()))
}
