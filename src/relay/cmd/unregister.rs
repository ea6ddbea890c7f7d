//! `Unregister`: a device goes, with its keys and its mailbox; the identity's last device
//! takes the account with it (§8.2).

use botd_protocol::proto::{Body, Unregister, Unregistered};

use super::{Ctx, Reply, Request};
use crate::relay::limits::Limit;
use crate::store::Store;

impl Request for Unregister {
    const NAME: &'static str = "unregister";

    fn execute<S: Store>(self, ctx: Ctx<'_, S>) -> Reply {
        ctx.limit(Limit::Change)?;
        let device_id = self.device_id;
        let done = ctx.relay.store.unregister(&ctx.me(), device_id);
        ctx.session.subscriptions.retain(|d| *d != device_id);
        ctx.reply(async move {
            done.await?;
            Ok(Body::Unregistered(Unregistered { device_id }))
        })
    }
}
