//! `FetchPreKeys`: one bundle per device of an identity, each with a one-time prekey while the
//! device has one and the caller's ration allows it (§8.2).

use botd_protocol::proto::{Body, FetchPreKeys, PreKeyBundles};

use super::{Ctx, Reply, Request};
use crate::relay::limits::Limit;
use crate::relay::{validate, RelayError};
use crate::store::Store;

impl Request for FetchPreKeys {
    const NAME: &'static str = "fetch_pre_keys";

    fn execute<S: Store>(self, ctx: Ctx<'_, S>) -> Reply {
        ctx.limit(Limit::PrekeyFetch)?;
        let relay = ctx.relay;
        let target = validate::identity_field(&self.identity, "identity")?;
        if self.device_ids.len() > relay.config.max_devices_per_identity {
            return Err(RelayError::bad_request(format!(
                "at most {} device ids in one fetch",
                relay.config.max_devices_per_identity
            )));
        }
        let mut devices = self.device_ids;
        devices.sort_unstable();
        devices.dedup();
        let grants = relay.limits.one_time_prekeys(target);
        let done = relay.store.fetch_prekeys(&target, devices, grants);
        let metrics = relay.metrics.clone();
        ctx.reply(async move {
            let fetched = done.await?;
            metrics
                .prekeys_handed_out
                .increment(fetched.handed_out as u64);
            metrics
                .prekeys_exhausted
                .increment(fetched.exhausted as u64);
            metrics.prekeys_withheld.increment(fetched.withheld as u64);
            Ok(Body::PreKeyBundles(PreKeyBundles {
                bundles: fetched.bundles,
            }))
        })
    }
}
