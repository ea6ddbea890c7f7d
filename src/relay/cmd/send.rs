//! `Send`: stores a message in a mailbox, with its checks in the spec's order (§8.3): fields
//! and rate limits here, then the store's (the sender's device, the signature when the relay
//! verifies it, recipient, duplicate, policy and ticket, quotas).

use botd_protocol::keys::PublicKeyBytes;
use botd_protocol::message::message_digest;
use botd_protocol::proto::{Body, Send, Sent};
use futures_util::FutureExt as _;

use super::{Ctx, Reply, Request};
use crate::relay::validate;
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
        // Verified here, judged by the store in the spec's order (after the sender's device).
        let bad_signature = relay
            .config
            .verify_message_signatures
            .then(|| {
                let digest = message_digest(
                    &sender,
                    &fields.recipient,
                    self.recipient_device,
                    &fields.nonce,
                    &fields.payload_hash,
                );
                PublicKeyBytes::parse(&sender)
                    .expect("session identities are valid keys")
                    .verify(&digest, &fields.signature)
                    .err()
                    .map(|err| err.to_string())
            })
            .flatten();
        // Started now, so the session's sends take effect in their order.
        let appended = relay.store.append(NewMessage {
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
            bad_signature,
        });
        let metrics = relay.metrics.clone();
        ctx.reply(appended.map(move |appended| {
            let (message_id, duplicate) = match appended? {
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
        }))
    }
}
