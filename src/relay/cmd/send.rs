//! `Send`: stores a message in a mailbox, with its checks in the spec's order (§8.3): fields,
//! rate limits, the sender's device, the signature when the relay verifies it, then the
//! store's own (recipient, duplicate, policy and ticket, quotas).

use botd_protocol::keys::PublicKeyBytes;
use botd_protocol::message::message_digest;
use botd_protocol::proto::{Body, Send, Sent};

use super::{Ctx, Reply, Request};
use crate::relay::{validate, RelayError};
use crate::store::{Appended, MailboxId, NewMessage, Store};

impl Request for Send {
    const NAME: &'static str = "send";

    fn execute<S: Store>(self, ctx: Ctx<'_, S>) -> Reply {
        let relay = ctx.relay;
        let fields = validate::send(&self, relay.config.max_payload_len as usize)?;
        let session = &*ctx.session;
        relay.limits.send(
            &session.identity,
            &fields.recipient,
            &session.address,
            session.now,
        )?;
        let sender = session.identity;
        let registered = relay.store.is_registered(&sender, self.sender_device);
        let store = relay.store.clone();
        let verify = relay.config.verify_message_signatures;
        let message = NewMessage {
            to: MailboxId {
                identity: fields.recipient,
                device: self.recipient_device,
            },
            sender,
            sender_device: self.sender_device,
            nonce: fields.nonce,
            payload_hash: fields.payload_hash,
            signature: fields.signature,
            payload: self.payload,
            ticket: fields.ticket,
            received_at_ms: relay.clock.at(session.now),
        };
        let metrics = relay.metrics.clone();
        ctx.reply(async move {
            if !registered.await? {
                return Err(RelayError::NotRegistered(message.sender_device));
            }
            if verify {
                let digest = message_digest(
                    &sender,
                    &message.to.identity,
                    message.to.device,
                    &message.nonce,
                    &message.payload_hash,
                );
                PublicKeyBytes::parse(&sender)
                    .expect("session identities are valid keys")
                    .verify(&digest, &message.signature)
                    .map_err(|err| RelayError::bad_request(format!("sender_signature: {err}")))?;
            }
            let (message_id, duplicate) = match store.append(message).await? {
                Appended::Stored(id) => {
                    metrics.messages_sent.increment(1);
                    (id, false)
                }
                Appended::Duplicate(id) => {
                    metrics.messages_duplicate.increment(1);
                    (id, true)
                }
            };
            Ok(Body::Sent(Sent {
                message_id,
                duplicate,
            }))
        })
    }
}
