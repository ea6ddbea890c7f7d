//! `SetPolicy`: whether anyone may write to the caller, or contacts and ticket holders only
//! (§8.6).

use botd_protocol::proto::{Accept, Body, Done, SetPolicy};

use super::{Ctx, Reply, Request};
use crate::relay::limits::Limit;
use crate::relay::RelayError;
use crate::store::Store;

impl Request for SetPolicy {
    const NAME: &'static str = "set_policy";

    fn execute<S: Store>(self, ctx: Ctx<'_, S>) -> Reply {
        ctx.limit(Limit::Change)?;
        let accept = Accept::try_from(self.accept).map_err(|_| {
            RelayError::bad_request(format!("unknown accept value {}", self.accept))
        })?;
        let done = ctx.relay.store.set_policy(&ctx.me(), accept);
        ctx.reply(async move {
            done.await?;
            Ok(Body::Done(Done {}))
        })
    }
}
