//! The account rules every backend enforces, once: who may write to whom (§8.3, §8.6), the
//! limits of an account (devices, prekeys, contacts, tickets), of a mailbox and of the relay's
//! storage. Each rule is a pure function over the numbers and flags a backend reads from its
//! state, and each refusal's message is written here only; a backend decides how it reads
//! those numbers atomically with its change.

use botd_protocol::proto::{Accept, PreKey};

use super::{QuotaKind, StoreError, StoreResult};

/// The account limits every backend enforces, read once from `Config`.
#[derive(Debug, Clone)]
pub struct AccountLimits {
    pub max_devices_per_identity: usize,
    pub max_prekeys_per_device: usize,
    pub prekey_low_threshold: u32,
    pub max_contacts: usize,
    pub max_tickets_per_identity: usize,
    pub mailbox_max_messages: usize,
    pub mailbox_max_bytes: usize,
    pub max_identities: usize,
    pub max_stored_bytes: u64,
    pub max_identity_stored_bytes: usize,
    /// An account's use is recorded at most this often (a sixteenth of `account_ttl`, at most
    /// a day), so a busy account costs no write per request.
    pub touch_interval_ms: u64,
}

/// How a sender may write to a recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The recipient is open, or the sender is the recipient or one of its contacts.
    Admitted,
    /// Under `ACCEPT_CONTACTS_ONLY`, by a valid ticket: the store uses one of its uses and
    /// makes the sender a contact, with the message.
    ByTicket,
}

/// What the recipient's account says about a sender.
#[derive(Debug, Clone, Copy)]
pub struct RecipientView {
    pub accept: Accept,
    /// The sender writes to itself.
    pub is_sender: bool,
    pub sender_is_contact: bool,
    /// Contacts the recipient has.
    pub contacts: usize,
}

/// The ticket a `Send` presented, as the recipient's account knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketOffer {
    /// No ticket was presented.
    None,
    /// A ticket the recipient does not have.
    Unknown,
    Known {
        expires_at_ms: u64,
        uses_left: u32,
    },
}

impl AccountLimits {
    pub fn from_config(config: &crate::config::Config) -> Self {
        let ttl_ms = config.account_ttl.as_millis() as u64;
        Self {
            max_devices_per_identity: config.max_devices_per_identity,
            max_prekeys_per_device: config.max_prekeys_per_device,
            prekey_low_threshold: config.prekey_low_threshold,
            max_contacts: config.max_contacts,
            max_tickets_per_identity: config.max_tickets_per_identity,
            mailbox_max_messages: config.mailbox_max_messages,
            mailbox_max_bytes: config.mailbox_max_bytes,
            max_identities: config.max_identities,
            max_stored_bytes: config.max_stored_bytes,
            max_identity_stored_bytes: config.max_identity_stored_bytes,
            touch_interval_ms: (ttl_ms / 16).clamp(1, 24 * 3600 * 1000),
        }
    }

    /// Whether `sender` may write to the recipient, given its policy, contacts and the ticket
    /// offered (checked in this order: policy, ticket, room for the new contact).
    pub fn admit(
        &self,
        recipient: RecipientView,
        ticket: TicketOffer,
        now_ms: u64,
    ) -> StoreResult<Admission> {
        if recipient.accept != Accept::ContactsOnly
            || recipient.is_sender
            || recipient.sender_is_contact
        {
            return Ok(Admission::Admitted);
        }
        match ticket {
            TicketOffer::None => return Err(StoreError::Forbidden),
            TicketOffer::Known {
                expires_at_ms,
                uses_left,
            } if expires_at_ms > now_ms && uses_left > 0 => {}
            TicketOffer::Unknown | TicketOffer::Known { .. } => {
                return Err(StoreError::TicketInvalid)
            }
        }
        if recipient.contacts >= self.max_contacts {
            return Err(StoreError::MailboxFull("recipient's contact list is full"));
        }
        Ok(Admission::ByTicket)
    }

    /// Room in a mailbox holding `messages` messages of `bytes` payload bytes for one more of
    /// `payload` bytes.
    pub fn check_mailbox_room(
        &self,
        messages: usize,
        bytes: usize,
        payload: usize,
    ) -> StoreResult<()> {
        if messages >= self.mailbox_max_messages {
            return Err(StoreError::MailboxFull("message count"));
        }
        if bytes + payload > self.mailbox_max_bytes {
            return Err(StoreError::MailboxFull("bytes"));
        }
        Ok(())
    }

    /// Room for `payload` more bytes in an identity storing `stored` bytes, and in a relay
    /// storing `relay_stored` bytes.
    pub fn check_storage(
        &self,
        stored: usize,
        relay_stored: u64,
        payload: usize,
    ) -> StoreResult<()> {
        if stored + payload > self.max_identity_stored_bytes {
            return Err(StoreError::QuotaExceeded {
                kind: QuotaKind::IdentityBytes,
                message: "the recipient's identity stores as much as it may",
            });
        }
        self.check_relay_storage(relay_stored, payload)
    }

    /// Room for `payload` more bytes in a relay storing `relay_stored` bytes.
    pub fn check_relay_storage(&self, relay_stored: u64, payload: usize) -> StoreResult<()> {
        if relay_stored + payload as u64 > self.max_stored_bytes {
            return Err(self.storage_full());
        }
        Ok(())
    }

    /// The refusal of a relay whose storage is full.
    pub fn storage_full(&self) -> StoreError {
        StoreError::QuotaExceeded {
            kind: QuotaKind::StoredBytes,
            message: "the relay's storage is full",
        }
    }

    /// Room for a new identity in a relay holding `identities`.
    pub fn check_new_identity(&self, identities: usize) -> StoreResult<()> {
        if identities >= self.max_identities {
            return Err(StoreError::QuotaExceeded {
                kind: QuotaKind::Identities,
                message: "the relay holds as many identities as it may",
            });
        }
        Ok(())
    }

    /// Room for registering a device that is not registered now, in an account with
    /// `active_devices` registered devices and `device_ids` device ids ever used (retired ones
    /// are kept so their mailboxes' ids are never reused); `known_id`: the id was used before.
    pub fn check_new_device(
        &self,
        active_devices: usize,
        device_ids: usize,
        known_id: bool,
    ) -> StoreResult<()> {
        if active_devices >= self.max_devices_per_identity {
            return Err(StoreError::Limit {
                kind: QuotaKind::Devices,
                message: format!(
                    "at most {} devices per identity",
                    self.max_devices_per_identity
                ),
            });
        }
        if !known_id && device_ids >= 4 * self.max_devices_per_identity {
            return Err(StoreError::Limit {
                kind: QuotaKind::DeviceIds,
                message: "too many device ids used by this identity".into(),
            });
        }
        Ok(())
    }

    /// Refuses an upload that would take a device storing `stored` one-time prekeys past
    /// `max_prekeys_per_device`, or that repeats the id of one it stores (`is_stored`).
    pub fn check_prekey_upload(
        &self,
        stored: usize,
        new: &[PreKey],
        mut is_stored: impl FnMut(u32) -> bool,
    ) -> StoreResult<()> {
        if stored + new.len() > self.max_prekeys_per_device {
            return Err(StoreError::Limit {
                kind: QuotaKind::Prekeys,
                message: format!(
                    "a device stores at most {} one-time prekeys ({stored} stored)",
                    self.max_prekeys_per_device,
                ),
            });
        }
        if let Some(dup) = new.iter().find(|new| is_stored(new.id)) {
            return Err(StoreError::Limit {
                kind: QuotaKind::PrekeyIds,
                message: format!("one-time prekey id {} is already stored", dup.id),
            });
        }
        Ok(())
    }

    /// Whether a device left with `remaining` one-time prekeys after a fetch crossed the
    /// `PreKeysLow` threshold.
    pub fn prekeys_low(&self, remaining: u32) -> bool {
        remaining < self.prekey_low_threshold
    }

    /// Room for one more contact in an account that has `contacts`.
    pub fn check_new_contact(&self, contacts: usize) -> StoreResult<()> {
        if contacts >= self.max_contacts {
            return Err(StoreError::Limit {
                kind: QuotaKind::Contacts,
                message: format!("at most {} contacts", self.max_contacts),
            });
        }
        Ok(())
    }

    /// Room for one more ticket in an account with `unexpired` tickets.
    pub fn check_new_ticket(&self, unexpired: usize) -> StoreResult<()> {
        if unexpired >= self.max_tickets_per_identity {
            return Err(StoreError::Limit {
                kind: QuotaKind::Tickets,
                message: format!(
                    "at most {} unexpired tickets per identity",
                    self.max_tickets_per_identity
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> AccountLimits {
        AccountLimits::from_config(&crate::config::Config {
            max_contacts: 2,
            mailbox_max_messages: 3,
            mailbox_max_bytes: 100,
            max_identity_stored_bytes: 150,
            max_stored_bytes: 1000,
            max_identities: 5,
            max_devices_per_identity: 2,
            max_prekeys_per_device: 4,
            max_tickets_per_identity: 1,
            ..crate::config::Config::default()
        })
    }

    fn contacts_only(is_sender: bool, sender_is_contact: bool, contacts: usize) -> RecipientView {
        RecipientView {
            accept: Accept::ContactsOnly,
            is_sender,
            sender_is_contact,
            contacts,
        }
    }

    #[test]
    fn open_recipients_self_and_contacts_are_admitted_without_a_ticket() {
        let l = limits();
        let open = RecipientView {
            accept: Accept::Open,
            ..contacts_only(false, false, 9)
        };
        assert_eq!(l.admit(open, TicketOffer::None, 0), Ok(Admission::Admitted));
        // A ticket offered to an open recipient is not used.
        let ticket = TicketOffer::Known {
            expires_at_ms: 10,
            uses_left: 1,
        };
        assert_eq!(l.admit(open, ticket, 0), Ok(Admission::Admitted));
        for view in [contacts_only(true, false, 9), contacts_only(false, true, 9)] {
            assert_eq!(l.admit(view, TicketOffer::None, 0), Ok(Admission::Admitted));
        }
    }

    #[test]
    fn strangers_need_a_live_ticket_with_uses_and_room_for_a_contact() {
        let l = limits();
        let stranger = contacts_only(false, false, 0);
        assert_eq!(
            l.admit(stranger, TicketOffer::None, 5),
            Err(StoreError::Forbidden)
        );
        assert_eq!(
            l.admit(stranger, TicketOffer::Unknown, 5),
            Err(StoreError::TicketInvalid)
        );
        let ticket = |expires_at_ms, uses_left| TicketOffer::Known {
            expires_at_ms,
            uses_left,
        };
        assert_eq!(
            l.admit(stranger, ticket(5, 1), 5),
            Err(StoreError::TicketInvalid),
            "a ticket is expired at its expiry time"
        );
        assert_eq!(
            l.admit(stranger, ticket(6, 0), 5),
            Err(StoreError::TicketInvalid),
            "used up"
        );
        assert_eq!(l.admit(stranger, ticket(6, 1), 5), Ok(Admission::ByTicket));
        assert_eq!(
            l.admit(contacts_only(false, false, 2), ticket(6, 1), 5),
            Err(StoreError::MailboxFull("recipient's contact list is full"))
        );
    }

    #[test]
    fn mailbox_and_storage_limits_are_inclusive() {
        let l = limits();
        assert_eq!(l.check_mailbox_room(2, 50, 50), Ok(()));
        assert_eq!(
            l.check_mailbox_room(3, 0, 1),
            Err(StoreError::MailboxFull("message count"))
        );
        assert_eq!(
            l.check_mailbox_room(0, 50, 51),
            Err(StoreError::MailboxFull("bytes"))
        );
        assert_eq!(l.check_storage(100, 950, 50), Ok(()));
        assert!(matches!(
            l.check_storage(101, 0, 50),
            Err(StoreError::QuotaExceeded {
                kind: QuotaKind::IdentityBytes,
                ..
            })
        ));
        assert!(matches!(
            l.check_storage(0, 951, 50),
            Err(StoreError::QuotaExceeded {
                kind: QuotaKind::StoredBytes,
                ..
            })
        ));
        assert_eq!(l.check_new_identity(4), Ok(()));
        assert!(matches!(
            l.check_new_identity(5),
            Err(StoreError::QuotaExceeded {
                kind: QuotaKind::Identities,
                ..
            })
        ));
    }

    #[test]
    fn account_limits_name_their_kind() {
        let l = limits();
        let kind = |r: StoreResult<()>| match r {
            Err(StoreError::Limit { kind, .. }) => Some(kind),
            _ => None,
        };
        assert_eq!(kind(l.check_new_device(1, 7, false)), None);
        assert_eq!(
            kind(l.check_new_device(2, 0, true)),
            Some(QuotaKind::Devices)
        );
        assert_eq!(
            kind(l.check_new_device(1, 8, false)),
            Some(QuotaKind::DeviceIds)
        );
        assert_eq!(kind(l.check_new_device(1, 8, true)), None);
        let keys = |ids: &[u32]| {
            ids.iter()
                .map(|&id| PreKey {
                    id,
                    ..PreKey::default()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            kind(l.check_prekey_upload(2, &keys(&[3, 4]), |_| false)),
            None
        );
        assert_eq!(
            kind(l.check_prekey_upload(3, &keys(&[3, 4]), |_| false)),
            Some(QuotaKind::Prekeys)
        );
        assert_eq!(
            kind(l.check_prekey_upload(1, &keys(&[3, 4]), |id| id == 4)),
            Some(QuotaKind::PrekeyIds)
        );
        assert_eq!(kind(l.check_new_contact(2)), Some(QuotaKind::Contacts));
        assert_eq!(kind(l.check_new_contact(1)), None);
        assert_eq!(kind(l.check_new_ticket(1)), Some(QuotaKind::Tickets));
        assert!(l.prekeys_low(l.prekey_low_threshold - 1));
        assert!(!l.prekeys_low(l.prekey_low_threshold));
    }
}
