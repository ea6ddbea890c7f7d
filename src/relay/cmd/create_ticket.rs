//! `CreateTicket`: a token that lets a stranger write to the caller a given number of times
//! until it expires (§8.6).

use botd_protocol::proto::{Body, CreateTicket, Ticket};
use bytes::Bytes;

use super::{Ctx, Reply, Request};
use crate::relay::limits::Limit;
use crate::relay::validate;
use crate::store::{Store, TICKET_LEN};

impl Request for CreateTicket {
    const NAME: &'static str = "create_ticket";

    fn execute<S: Store>(self, ctx: Ctx<'_, S>) -> Reply {
        ctx.limit(Limit::Change)?;
        let relay = ctx.relay;
        let (ttl_ms, uses) = validate::ticket(&relay.config, self.ttl_s, self.uses)?;
        let token: [u8; TICKET_LEN] = rand::random();
        let now = relay.clock.now_ms();
        let expires_at_ms = now + ttl_ms;
        let me = ctx.me();
        let done = relay
            .store
            .create_ticket(&me, token, expires_at_ms, uses, now);
        let relay_pubkey = Bytes::copy_from_slice(relay.relay_key.as_bytes());
        ctx.reply(async move {
            done.await?;
            Ok(Body::Ticket(Ticket {
                token: Bytes::copy_from_slice(&token),
                expires_at_ms,
                relay_pubkey,
                identity: Bytes::copy_from_slice(&me),
                uses,
            }))
        })
    }
}
