//! `UploadPreKeys`: replaces the signed prekey and adds one-time prekeys (§8.2).

use botd_protocol::proto::{Body, PreKeyCount, UploadPreKeys};

use super::{Ctx, Reply, Request};
use crate::relay::limits::Limit;
use crate::relay::validate;
use crate::store::Store;

impl Request for UploadPreKeys {
    const NAME: &'static str = "upload_pre_keys";

    fn execute<S: Store>(self, ctx: Ctx<'_, S>) -> Reply {
        ctx.limit(Limit::Change)?;
        validate::prekeys(
            &ctx.relay.config,
            self.signed_prekey.as_ref(),
            &self.one_time_prekeys,
        )?;
        let device_id = self.device_id;
        let done = ctx.relay.store.upload_prekeys(
            &ctx.me(),
            device_id,
            self.signed_prekey,
            self.one_time_prekeys,
        );
        ctx.reply(async move {
            let count = done.await?;
            Ok(Body::PreKeyCount(PreKeyCount { device_id, count }))
        })
    }
}
