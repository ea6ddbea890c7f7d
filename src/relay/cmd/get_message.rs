//! `GetMessage`: one stored message of a mailbox of the caller, as a `Deliver` (§8.4).

use botd_protocol::message::DeliverFrame;
use botd_protocol::proto::GetMessage;

use super::{Ctx, Reply, Request};
use crate::app::Outgoing;
use crate::store::{MailboxId, Store};

impl Request for GetMessage {
    const NAME: &'static str = "get_message";

    fn execute<S: Store>(self, ctx: Ctx<'_, S>) -> Reply {
        let device = self.device_id;
        let mailbox = MailboxId {
            identity: ctx.me(),
            device,
        };
        let done = ctx.relay.store.get(mailbox, self.message_id);
        let frame_id = ctx.id;
        ctx.reply_with(async move {
            Ok(Outgoing::Deliver(DeliverFrame {
                frame_id,
                device,
                message: done.await?,
            }))
        })
    }
}
