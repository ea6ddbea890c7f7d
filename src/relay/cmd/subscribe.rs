//! `Subscribe`: live delivery of a mailbox of the caller to this session, after its backlog
//! (§8.4). A barrier: the backlog's deliveries follow the answer.

use botd_protocol::proto::{Body, ErrorCode, Frame, Subscribe, Subscribed};

use super::{Ctx, Reply, Request};
use crate::store::{MailboxId, Store};

impl Request for Subscribe {
    const NAME: &'static str = "subscribe";
    const BARRIER: bool = true;

    fn execute<S: Store>(self, ctx: Ctx<'_, S>) -> Reply {
        let mailbox = MailboxId {
            identity: ctx.me(),
            device: self.device_id,
        };
        let done = ctx
            .relay
            .delivery
            .subscribe(mailbox, self.after_id, ctx.session.push.clone());
        if !ctx.session.subscriptions.contains(&self.device_id) {
            ctx.session.subscriptions.push(self.device_id);
        }
        ctx.reply(async move {
            let (last_id, replaced) = done.await?;
            if let Some(old) = replaced {
                let _ = old.push_frame(Frame::error(
                    0,
                    ErrorCode::Replaced,
                    format!("another session subscribed to device {}", mailbox.device),
                ));
            }
            Ok(Body::Subscribed(Subscribed {
                device_id: mailbox.device,
                last_id,
            }))
        })
    }
}
