//! `Register`: registers or re-registers a device with its keys (§8.2).

use botd_protocol::proto::{Body, Register, Registered};

use super::{Ctx, Reply, Request};
use crate::relay::limits::Limit;
use crate::relay::validate;
use crate::store::Store;

impl Request for Register {
    const NAME: &'static str = "register";

    fn execute<S: Store>(self, ctx: Ctx<'_, S>) -> Reply {
        ctx.limit(Limit::Change)?;
        let registration = validate::registration(&ctx.relay.config, self)?;
        let device_id = registration.device;
        let done = ctx
            .relay
            .store
            .register(&ctx.me(), registration, ctx.relay.clock.now_ms());
        ctx.reply(async move {
            let one_time_prekeys = done.await?;
            Ok(Body::Registered(Registered {
                device_id,
                one_time_prekeys,
            }))
        })
    }
}
