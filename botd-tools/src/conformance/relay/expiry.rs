//! The lifetimes of §8.5 and §8.6: tickets, messages and idle accounts expire. Ticket lifetimes
//! are chosen per request (1 s here); message and account lifetimes are the relay's settings,
//! given with `--assume` (`message_ttl_ms`, `account_ttl_ms`, `expiry_interval_ms`) when the
//! relay under test runs with short ones, as a test setup may (PROTOCOL.md §7.5).

use std::time::Duration;

use bytes::Bytes;

use super::{case, CaseDef, Ctx};
use crate::conformance::probe::Probe;
use crate::conformance::wire::describe;
use crate::conformance::{Outcome, Step};
use botd_protocol::proto::{self, Body, ErrorCode, Frame};

/// Waits until the relay's clock (as `p` tells it) is past `at_ms`, at most `limit`.
async fn until_relay_time(p: &Probe, at_ms: u64, limit: Duration) -> Step<()> {
    let wait = Duration::from_millis(at_ms.saturating_sub(p.relay_now_ms()) + 300);
    if wait > limit {
        return Err(Outcome::fail(format!(
            "{} ms of the relay's clock to wait: more than the lifetime asked for",
            wait.as_millis()
        )));
    }
    tokio::time::sleep(wait).await;
    Ok(())
}

/// The expiry sweep's period: assumed, or the default.
fn sweep(cx: &Ctx) -> Duration {
    Duration::from_millis(cx.limit("expiry_interval_ms", 10_000))
}

pub(super) fn cases() -> Vec<CaseDef> {
    vec![
        case!("8.6/create-ticket-fields", Must, "a Ticket carries the uses asked for, the relay's clock plus ttl_s, a 16-byte token and the two keys", |cx| {
            let mut a = cx.node("A").await?;
            let t = a.create_ticket(3600, 7).await?;
            let expected = a.relay_now_ms() + 3_600_000;
            let off = t.expires_at_ms as i64 - expected as i64;
            if t.uses != 7 || t.token.len() != 16 || t.identity[..] != a.key().as_bytes()[..] || t.relay_pubkey[..] != cx.t.key.as_bytes()[..] {
                return Err(Outcome::fail(describe(&Frame::new(0, Body::Ticket(t)))));
            }
            if off.abs() > 60_000 {
                return Err(Outcome::fail(format!("expires_at_ms is {off} ms from the relay's clock plus 3600 s")));
            }
            Ok(Outcome::pass())
        }),
        case!("8.6/ticket-expires", Must, "a ticket is refused (TICKET_INVALID) once the relay's clock reaches expires_at_ms; a later one of the same identity still admits", |cx| {
            let mut b = cx.node("B").await?;
            b.setup(Body::SetPolicy(proto::SetPolicy { accept: proto::Accept::ContactsOnly as i32 }), "SetPolicy").await?;
            let short = b.create_ticket(1, 1).await?;
            let long = b.create_ticket(600, 1).await?;
            if short.expires_at_ms > b.relay_now_ms() + 5_000 {
                return Err(Outcome::fail(format!("a 1-second ticket expires at {}, more than 5 s after the relay's clock", crate::conformance::rfc3339_ms(short.expires_at_ms))));
            }
            until_relay_time(&b, short.expires_at_ms, Duration::from_secs(6)).await?;
            let mut a = cx.node("A").await?;
            let mut req = a.signed(&b.key(), 1, 1, &b"too late"[..]);
            req.ticket = short.token.clone();
            a.expect_code(Body::Send(req), ErrorCode::TicketInvalid)
                .await
                .map_err(|o| Outcome::fail(format!("the expired ticket: {}", o.detail)))?;
            let mut req = a.signed(&b.key(), 1, 1, &b"in time"[..]);
            req.ticket = long.token;
            a.send_req(req).await.map_err(|o| Outcome::fail(format!("an unexpired ticket: {}", o.detail)))?;
            Ok(Outcome::pass())
        }),
        case!("8.6/expired-tickets-not-counted", Must, "expired tickets do not count towards max_tickets_per_identity", |cx| {
            let max = cx.limit("max_tickets_per_identity", 1000);
            cx.affordable(max + 3, cx.change_bucket(), "CreateTicket requests of one identity")?;
            let mut a = cx.node("A").await?;
            let mut last = 0;
            for _ in 0..max {
                last = a.create_ticket(1, 1).await?.expires_at_ms;
            }
            until_relay_time(&a, last, Duration::from_secs(6)).await?;
            match a.call_patiently(Body::CreateTicket(proto::CreateTicket { ttl_s: 60, uses: 1 })).await? {
                Ok(Body::Ticket(_)) => Ok(Outcome::pass()),
                other => Err(Outcome::fail(format!("with {max} expired tickets, CreateTicket answered {other:?}"))),
            }
        }),
        case!("8.5/message-expiry", Must, "a message is deleted message_ttl after received_at_ms, delivered or not; its nonce then stores a new message", |cx| {
            let ttl = Duration::from_millis(cx.need("message_ttl_ms")?);
            let total = ttl + sweep(&cx) + Duration::from_secs(2);
            cx.timer_wait(total, "message_ttl plus the sweep")?;
            let mut a = cx.node("A").await?;
            let me = a.key();
            let req = a.signed(&me, 1, 1, &b"short-lived"[..]);
            let first = a.send_req(req.clone()).await?;
            if ttl >= Duration::from_secs(2) {
                tokio::time::sleep(ttl / 2).await;
                match a.call(Body::GetMessage(proto::GetMessage { device_id: 1, message_id: first.message_id })).await? {
                    Ok(Body::Deliver(_)) => {}
                    other => return Err(Outcome::fail(format!("gone at half of message_ttl: {other:?}"))),
                }
            }
            tokio::time::sleep(total.saturating_sub(if ttl >= Duration::from_secs(2) { ttl / 2 } else { Duration::ZERO })).await;
            match a.call(Body::GetMessage(proto::GetMessage { device_id: 1, message_id: first.message_id })).await? {
                Err(e) if e.code == ErrorCode::NotFound as i32 => {}
                other => return Err(Outcome::fail(format!("still stored {total:?} after it was sent: {other:?}"))),
            }
            let again = a.send_req(req).await?;
            if again.duplicate || again.message_id <= first.message_id {
                return Err(Outcome::fail(format!("the nonce of the expired message: {again:?} (first {first:?})")));
            }
            a.subscribe(1, 0).await?;
            let d = a.next_deliver().await?;
            if d.message_id != again.message_id {
                return Err(Outcome::fail(format!("the expired message {} was pushed", d.message_id)));
            }
            Ok(Outcome::pass_with(format!("gone within {total:?}")))
        }),
        case!("8.6/account-ttl", Must, "an account none of whose sessions is open or used for account_ttl is removed: its devices and its policy go", |cx| {
            let ttl = Duration::from_millis(cx.need("account_ttl_ms")?);
            let total = ttl + sweep(&cx) + Duration::from_secs(2);
            cx.timer_wait(total, "account_ttl plus the sweep")?;
            let mut b = cx.node("B").await?;
            b.setup(Body::SetPolicy(proto::SetPolicy { accept: proto::Accept::ContactsOnly as i32 }), "SetPolicy").await?;
            let (key, identity) = (b.key(), b.identity.clone());
            drop(b);
            tokio::time::sleep(total).await;
            let mut f = cx.node("F").await?;
            f.expect_code(Body::FetchPreKeys(proto::FetchPreKeys { identity: Bytes::copy_from_slice(key.as_bytes()), device_ids: vec![] }), ErrorCode::UnknownRecipient)
                .await
                .map_err(|o| Outcome::fail(format!("B's devices {total:?} after its last session closed: {}", o.detail)))?;
            let mut b = cx.probe_as("B again", identity).await?;
            b.register(1, 0).await?;
            let req = f.signed(&key, 1, 1, &b"stranger"[..]);
            f.call_patiently(Body::Send(req)).await?.map_err(|e| Outcome::fail(format!("a stranger's message after B registered again got {}: the old policy survived", e.name())))?;
            Ok(Outcome::pass_with(format!("removed within {total:?}")))
        }),
        case!("8.6/account-kept-while-connected", Must, "an open session keeps its account past account_ttl, whatever it sends", |cx| {
            let ttl = Duration::from_millis(cx.need("account_ttl_ms")?);
            let total = ttl + 2 * sweep(&cx) + Duration::from_secs(1);
            cx.timer_wait(total, "account_ttl plus two sweeps")?;
            let mut b = cx.node("B").await?;
            if Duration::from_millis(b.welcome.idle_timeout_ms) <= total + Duration::from_secs(5) {
                return Ok(Outcome::skip("idle_timeout would close the quiet session first"));
            }
            // Reading answers the relay's pings; nothing else is sent.
            if let Err(e) = b.quiet_for(total).await {
                return Err(Outcome::fail(format!("while waiting: {e:?}")));
            }
            let mut f = cx.probe("F").await?;
            let bundles = f.fetch(&b.key(), vec![]).await.map_err(|o| Outcome::fail(format!("B's devices {total:?} into an open session: {}", o.detail)))?;
            if bundles.len() == 1 { Ok(Outcome::pass()) } else { Err(Outcome::fail(format!("{} bundles", bundles.len()))) }
        }),
    ]
}
