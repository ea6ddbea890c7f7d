//! §8.3–§8.5 with values that differ: two senders with one nonce, one sender on two devices, two
//! mailboxes of one identity whose ids may be equal, and every field of `Deliver` checked with a
//! sender device and a recipient device other than 1. A relay that mixes up senders, devices or
//! mailboxes passes cases where all of them are the same; these cases tell.

use bytes::Bytes;

use super::{case, CaseDef, Ctx};
use crate::conformance::probe::{ErrorAnswer, Probe};
use crate::conformance::wire::describe;
use crate::conformance::{Outcome, Step};
use botd_protocol::proto::{self, Body, ErrorCode, Frame};

/// A recipient with devices 1 and 2, and a sender that has put one message into device 2's
/// mailbox, then two into device 1's: (recipient, sender, ids in device 1, id in device 2). On a
/// relay whose ids count per mailbox device 1's first id equals device 2's; on one whose ids
/// are shared, device 1's are higher. Either way device 1 holds an id device 2 does not.
async fn two_mailboxes(cx: &Ctx) -> Step<(Probe, Probe, [u64; 2], u64)> {
    let mut b = cx.probe("B").await?;
    b.register(1, 1).await?;
    b.register(2, 1).await?;
    let mut a = cx.node("A").await?;
    let to2 = a
        .send_msg(&b.key(), 2, &b"for device 2"[..])
        .await?
        .message_id;
    let to1 = a
        .send_msg(&b.key(), 1, &b"for device 1"[..])
        .await?
        .message_id;
    let to1b = a
        .send_msg(&b.key(), 1, &b"for device 1 again"[..])
        .await?
        .message_id;
    cx.note(if to1 == to2 {
        format!("both mailboxes hold id {to1}; device 1 also {to1b}")
    } else {
        format!("device 1 holds ids {to1} and {to1b}, device 2 id {to2}")
    });
    Ok((b, a, [to1, to1b], to2))
}

/// A message expected in a mailbox: its id and payload.
type Stored = (u64, &'static [u8]);

async fn get(p: &mut Probe, device: u32, id: u64) -> Step<Result<Body, ErrorAnswer>> {
    p.call(Body::GetMessage(proto::GetMessage {
        device_id: device,
        message_id: id,
    }))
    .await
}

/// `GetMessage` must return the message of `device` with this payload.
async fn holds(p: &mut Probe, device: u32, id: u64, payload: &[u8]) -> Step<()> {
    match get(p, device, id).await? {
        Ok(Body::Deliver(d)) if d.payload[..] == *payload && d.recipient_device == device => Ok(()),
        Ok(other) => Err(Outcome::fail(format!(
            "GetMessage(device {device}, id {id}) gave another message: {}",
            describe(&Frame::new(0, other))
        ))),
        Err(e) => Err(Outcome::fail(format!(
            "device {device}'s message {id} is gone: GetMessage answered {}",
            e.name()
        ))),
    }
}

/// Every field of `d` against the `Send` it came from.
fn check_deliver(
    d: &proto::Deliver,
    req: &proto::Send,
    sender: &Probe,
    id: u64,
    recipient: &Probe,
) -> Step<()> {
    let mut wrong = Vec::new();
    if d.message_id != id {
        wrong.push(format!("message_id {} (Sent said {id})", d.message_id));
    }
    if d.sender[..] != sender.key().as_bytes()[..] {
        wrong.push("sender is not the sending session's identity".to_string());
    }
    if d.sender_device != req.sender_device {
        wrong.push(format!(
            "sender_device {} (sent from device {})",
            d.sender_device, req.sender_device
        ));
    }
    if d.recipient_device != req.recipient_device {
        wrong.push(format!(
            "recipient_device {} (sent to device {})",
            d.recipient_device, req.recipient_device
        ));
    }
    if d.sender_nonce != req.sender_nonce {
        wrong.push("sender_nonce differs".into());
    }
    if d.payload_hash != req.payload_hash {
        wrong.push("payload_hash differs".into());
    }
    if d.sender_signature != req.sender_signature {
        wrong.push("sender_signature differs".into());
    }
    if d.payload != req.payload {
        wrong.push("payload differs".into());
    }
    let now = crate::conformance::unix_ms();
    let relay_now = recipient.relay_now_ms();
    if d.received_at_ms == 0
        || d.received_at_ms > relay_now.max(now) + 60_000
        || d.received_at_ms + 600_000 < relay_now.min(now)
    {
        wrong.push(format!(
            "received_at_ms {} is not the relay's time of receipt",
            d.received_at_ms
        ));
    }
    if !wrong.is_empty() {
        return Err(Outcome::fail(format!(
            "{}: {}",
            wrong.join("; "),
            describe(&Frame::new(0, Body::Deliver(d.clone())))
        )));
    }
    botd_client::verify_delivery(d, &recipient.key())
        .map_err(|e| Outcome::fail(format!("the Deliver does not verify end to end: {e}")))?;
    Ok(())
}

/// A sender with devices 1 and 3 and a recipient with devices 1 and 2; a message from device 3
/// to device 2: (sender, recipient, the request, its id).
async fn sent_from_3_to_2(
    cx: &Ctx,
    payload: &'static [u8],
) -> Step<(Probe, Probe, proto::Send, u64)> {
    let mut a = cx.node("A").await?;
    a.register(3, 0).await?;
    let mut b = cx.node("B").await?;
    b.register(2, 0).await?;
    let req = a.signed(&b.key(), 2, 3, payload);
    let id = a.send_req(req.clone()).await?.message_id;
    Ok((a, b, req, id))
}

pub(super) fn cases() -> Vec<CaseDef> {
    vec![
        case!("8.4/deliver-fields", Must, "a pushed Deliver carries every field as sent (sender device 3, recipient device 2) and verifies end to end", |cx| {
            let (a, mut b, req, id) = sent_from_3_to_2(&cx, b"fields").await?;
            b.subscribe(2, 0).await?;
            let d = b.next_deliver().await?;
            check_deliver(&d, &req, &a, id, &b)?;
            Ok(Outcome::pass())
        }),
        case!("8.4/get-message-fields", Must, "GetMessage answers a Deliver with every field as sent (sender device 3, recipient device 2)", |cx| {
            let (a, mut b, req, id) = sent_from_3_to_2(&cx, b"fields by get").await?;
            match get(&mut b, 2, id).await? {
                Ok(Body::Deliver(d)) => check_deliver(&d, &req, &a, id, &b)?,
                other => return Err(Outcome::fail(format!("GetMessage answered {other:?}"))),
            }
            Ok(Outcome::pass())
        }),
        case!("8.3/nonce-per-sender", Must, "two senders using the same nonce towards one mailbox store two messages; each resend finds its own", |cx| {
            let mut b = cx.node("B").await?;
            let mut a = cx.node("A").await?;
            let mut c = cx.node("C").await?;
            let ra = a.signed(&b.key(), 1, 1, &b"from A"[..]);
            let mut rc = c.signed(&b.key(), 1, 1, &b"from C"[..]);
            rc.sender_nonce = ra.sender_nonce.clone();
            super::send::resign(&mut rc, &c.identity);
            let sa = a.send_req(ra.clone()).await?;
            let sc = c.send_req(rc.clone()).await?;
            if sc.duplicate || sc.message_id == sa.message_id {
                return Err(Outcome::fail(format!("C's message was taken for A's: {sc:?} after {sa:?} (a message is identified by sender and nonce)")));
            }
            let (again_a, again_c) = (a.send_req(ra).await?, c.send_req(rc).await?);
            if !(again_a.duplicate && again_a.message_id == sa.message_id && again_c.duplicate && again_c.message_id == sc.message_id) {
                return Err(Outcome::fail(format!("resends: A {again_a:?} (first {sa:?}), C {again_c:?} (first {sc:?})")));
            }
            holds(&mut b, 1, sc.message_id, b"from C").await?;
            Ok(Outcome::pass())
        }),
        case!("8.3/nonce-per-identity", Must, "the nonce is per identity: the same nonce from another device of the sender is a resend (duplicate: true)", |cx| {
            let mut a = cx.node("A").await?;
            a.register(2, 0).await?;
            let b = cx.node("B").await?;
            let first = a.signed(&b.key(), 1, 1, &b"once"[..]);
            let mut other = first.clone();
            other.sender_device = 2;
            let s1 = a.send_req(first).await?;
            let s2 = a.send_req(other).await?;
            if s2.duplicate && s2.message_id == s1.message_id { Ok(Outcome::pass()) } else {
                Err(Outcome::fail(format!("from device 1 {s1:?}, the same nonce from device 2 {s2:?}")))
            }
        }),
        case!("8.3/nonce-per-device-mailbox", Must, "the same nonce towards two devices of one identity stores two messages", |cx| {
            let mut b = cx.probe("B").await?;
            b.register(1, 0).await?;
            b.register(2, 0).await?;
            let mut a = cx.node("A").await?;
            let r1 = a.signed(&b.key(), 1, 1, &b"to 1"[..]);
            let mut r2 = a.signed(&b.key(), 2, 1, &b"to 2"[..]);
            r2.sender_nonce = r1.sender_nonce.clone();
            super::send::resign(&mut r2, &a.identity);
            let (s1, s2) = (a.send_req(r1).await?, a.send_req(r2).await?);
            if s1.duplicate || s2.duplicate {
                return Err(Outcome::fail(format!("{s1:?} {s2:?}: mailboxes of different devices are apart")));
            }
            holds(&mut b, 2, s2.message_id, b"to 2").await?;
            Ok(Outcome::pass())
        }),
        case!("8.4/ack-one-mailbox", Must, "an ack acts on its own mailbox only: acking on device 1 leaves device 2's message with the same id", |cx| {
            let (mut b, _a, [to1, to1b], to2) = two_mailboxes(&cx).await?;
            let acked = b.ack(1, vec![to2]).await?;
            // Ids of different mailboxes are unrelated: either of device 1's may equal device 2's.
            let expected = u32::from(to1 == to2 || to1b == to2);
            if acked.deleted != expected {
                return Err(Outcome::fail(format!("an ack of id {to2} on device 1 deleted {} messages, expected {expected}", acked.deleted)));
            }
            holds(&mut b, 2, to2, b"for device 2").await?;
            Ok(Outcome::pass())
        }),
        case!("8.4/get-message-one-mailbox", Must, "GetMessage reads its own mailbox only: device 2's id asked on device 1 gives device 1's message with that id, or NOT_FOUND", |cx| {
            let (mut b, _a, [to1, to1b], to2) = two_mailboxes(&cx).await?;
            if to1 == to2 {
                holds(&mut b, 1, to2, b"for device 1").await?;
            }
            // Device 1's message with device 2's id (if any) acknowledged: the id is then in
            // device 2's mailbox only.
            b.ack(1, vec![to1]).await?;
            if to1b == to2 {
                // Each mailbox holds the id: each gives its own message.
                holds(&mut b, 1, to2, b"for device 1 again").await?;
                holds(&mut b, 2, to1b, b"for device 2").await?;
            } else {
                for (device, id) in [(1, to2), (2, to1b)] {
                    match get(&mut b, device, id).await? {
                        Err(e) if e.code == ErrorCode::NotFound as i32 => {}
                        other => return Err(Outcome::fail(format!("id {id} asked on device {device}, whose mailbox does not hold it: {other:?}"))),
                    }
                }
            }
            holds(&mut b, 2, to2, b"for device 2").await?;
            holds(&mut b, 1, to1b, b"for device 1 again").await?;
            Ok(Outcome::pass())
        }),
        case!("8.4/subscribe-one-mailbox", Must, "a subscription pushes its own mailbox only, with its device as recipient_device", |cx| {
            let (mut b, mut a, [to1, to1b], to2) = two_mailboxes(&cx).await?;
            let expected: [(u32, &[Stored]); 2] = [
                (2, &[(to2, b"for device 2")]),
                (1, &[(to1, b"for device 1"), (to1b, b"for device 1 again")]),
            ];
            for (device, messages) in expected {
                b.subscribe(device, 0).await?;
                for (id, payload) in messages {
                    let d = b.next_deliver().await?;
                    if d.message_id != *id || d.recipient_device != device || d.payload[..] != **payload {
                        return Err(Outcome::fail(format!("subscribed to device {device}, got {}", describe(&Frame::new(0, Body::Deliver(d))))));
                    }
                }
                if let Err(e) = b.quiet_for(cx.quiet()).await {
                    return Err(Outcome::fail(format!("another delivery on device {device}: {e:?}")));
                }
            }
            // Both subscriptions of the session go on: a new message for device 2 is pushed.
            let live = a.send_msg(&b.key(), 2, &b"live for device 2"[..]).await?;
            let d = b.next_deliver().await.map_err(|o| Outcome::fail(format!("subscribing to device 1 ended the subscription to device 2: {}", o.detail)))?;
            if d.message_id != live.message_id || d.recipient_device != 2 {
                return Err(Outcome::fail(format!("expected device 2's new message, got {}", describe(&Frame::new(0, Body::Deliver(d))))));
            }
            Ok(Outcome::pass())
        }),
        case!("8.5/redelivered-after-reconnect", Must, "a message pushed but not acknowledged is pushed again to the next session that subscribes", |cx| {
            let mut b = cx.node("B").await?;
            let mut a = cx.node("A").await?;
            let s = a.send_msg(&b.key(), 1, &b"at least once"[..]).await?;
            b.subscribe(1, 0).await?;
            b.next_deliver().await?;
            let identity = b.identity.clone();
            drop(b);
            let mut b2 = cx.probe_as("B2", identity).await?;
            b2.subscribe(1, 0).await?;
            let d = b2.next_deliver().await.map_err(|o| Outcome::fail(format!("the unacknowledged message was not pushed again: {}", o.detail)))?;
            if d.message_id == s.message_id { Ok(Outcome::pass()) } else { Err(Outcome::fail(format!("got {} instead of {}", d.message_id, s.message_id))) }
        }),
        case!("8.4/subscribed-last-id", Must, "Subscribed names its device and the highest id ever assigned in that mailbox, stored or not", |cx| {
            let mut b = cx.probe("B").await?;
            b.register(1, 0).await?;
            b.register(2, 0).await?;
            let me = b.key();
            let s1 = b.send_msg(&me, 2, &b"1"[..]).await?;
            let s2 = b.send_msg(&me, 2, &b"2"[..]).await?;
            for _ in 0..3 {
                b.send_msg(&me, 1, Bytes::new()).await?;
            }
            b.ack(2, vec![s1.message_id, s2.message_id]).await?;
            let sub = b.subscribe(2, 0).await?;
            if sub.last_id == s2.message_id && sub.device_id == 2 { Ok(Outcome::pass()) } else {
                Err(Outcome::fail(format!("{sub:?}; device 2's highest id is {} (device 1 got three later messages)", s2.message_id)))
            }
        }),
    ]
}
