//! `AckMessages`: deletes delivered messages from a mailbox of the caller (§8.4).

use botd_protocol::proto::{AckMessages, Acked, Body};
use futures_util::FutureExt as _;

use super::{Ctx, Reply, Request};
use crate::relay::limits::Limit;
use crate::relay::{validate, RelayError};
use crate::store::{MailboxId, Store};

impl Request for AckMessages {
    const NAME: &'static str = "ack_messages";

    fn execute<S: Store>(self, ctx: Ctx<'_, S>) -> Reply {
        ctx.limit(Limit::Ack)?;
        if self.message_ids.len() > validate::MAX_ACK_IDS {
            return Err(RelayError::bad_request(format!(
                "at most {} ids per ack",
                validate::MAX_ACK_IDS
            )));
        }
        let mailbox = MailboxId {
            identity: ctx.me(),
            device: self.device_id,
        };
        let done = ctx.relay.store.ack(mailbox, self.message_ids);
        let metrics = ctx.relay.metrics.clone();
        ctx.reply(done.map(move |deleted| {
            let deleted = deleted?;
            metrics.messages_acked.increment(u64::from(deleted));
            Ok(Body::Acked(Acked { deleted }))
        }))
    }
}
