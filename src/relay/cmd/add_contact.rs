//! `AddContact`: an identity that may always write to the caller (§8.6).

use botd_protocol::proto::{AddContact, Body, Done};

use super::{Ctx, Reply, Request};
use crate::relay::limits::Limit;
use crate::relay::validate;
use crate::store::Store;

impl Request for AddContact {
    const NAME: &'static str = "add_contact";

    fn execute<S: Store>(self, ctx: Ctx<'_, S>) -> Reply {
        ctx.limit(Limit::Change)?;
        let contact = validate::identity_field(&self.identity, "identity")?;
        let done = ctx.relay.store.add_contact(&ctx.me(), contact);
        ctx.reply(async move {
            done.await?;
            Ok(Body::Done(Done {}))
        })
    }
}
