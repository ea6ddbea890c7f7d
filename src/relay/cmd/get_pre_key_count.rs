//! `GetPreKeyCount`: how many one-time prekeys a device of the caller has left (§8.2).

use botd_protocol::proto::{Body, GetPreKeyCount, PreKeyCount};

use super::{Ctx, Reply, Request};
use crate::store::Store;

impl Request for GetPreKeyCount {
    const NAME: &'static str = "get_pre_key_count";

    fn execute<S: Store>(self, ctx: Ctx<'_, S>) -> Reply {
        let device_id = self.device_id;
        let done = ctx.relay.store.prekey_count(&ctx.me(), device_id);
        ctx.reply(async move {
            let count = done.await?;
            Ok(Body::PreKeyCount(PreKeyCount { device_id, count }))
        })
    }
}
