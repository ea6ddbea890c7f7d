//! `RemoveContact`: the identity needs a ticket again under the contacts-only policy (§8.6).

use botd_protocol::proto::{Body, Done, RemoveContact};

use super::{Ctx, Reply, Request};
use crate::relay::limits::Limit;
use crate::relay::validate;
use crate::store::Store;

impl Request for RemoveContact {
    const NAME: &'static str = "remove_contact";

    fn execute<S: Store>(self, ctx: Ctx<'_, S>) -> Reply {
        ctx.limit(Limit::Change)?;
        let contact = validate::identity_field(&self.identity, "identity")?;
        let done = ctx.relay.store.remove_contact(&ctx.me(), contact);
        ctx.reply(async move {
            done.await?;
            Ok(Body::Done(Done {}))
        })
    }
}
