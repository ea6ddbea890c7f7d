//! §8.1, §8.2, §8.4, §8.5 and §8.6: requests and their ids, who may touch what, devices and
//! prekeys, subscriptions, acknowledgements, message ids, policy, contacts and tickets.

use bytes::Bytes;
use std::collections::HashSet;

use super::{case, CaseDef, Ctx};
use crate::conformance::probe::{prekeys, registration, Probe};
use crate::conformance::wire::describe;
use crate::conformance::{Outcome, Step};
use botd_protocol::keys::KeyPair;
use botd_protocol::proto::{self, Body, ErrorCode, Frame};
use prost::Message;

fn key_bytes(p: &Probe) -> Bytes {
    Bytes::copy_from_slice(p.key().as_bytes())
}

/// A fresh identity without devices: `body` must fail with `code`.
async fn bare_fails(cx: Ctx, body: Body, code: ErrorCode) -> Step<Outcome> {
    let mut p = cx.probe("A").await?;
    p.expect_code(body, code).await
}

/// A node with device 1: `body` must fail with `code`.
async fn node_fails(cx: Ctx, body: Body, code: ErrorCode) -> Step<Outcome> {
    let mut p = cx.node("A").await?;
    p.expect_code(body, code).await
}

/// A `Register` of device 1 changed by `f` must fail with `BAD_REQUEST`.
async fn register_fails(cx: Ctx, f: fn(&mut proto::Register)) -> Step<Outcome> {
    let mut r = registration(1, 3);
    f(&mut r);
    bare_fails(cx, Body::Register(r), ErrorCode::BadRequest).await
}

/// Sends three messages to the node's own device 1, unregisters and registers it again, and
/// sends one more: the last id before, and the id after.
async fn id_after_reregistering_device_1(a: &mut Probe) -> Step<(u64, u64)> {
    let me = a.key();
    let mut last = 0;
    for _ in 0..3 {
        last = a.send_msg(&me, 1, Bytes::new()).await?.message_id;
    }
    a.unregister(1).await?;
    a.register(1, 1).await?;
    let next = a.send_msg(&me, 1, Bytes::new()).await?.message_id;
    Ok((last, next))
}

/// A registration whose every field names its device, so that bundles of two devices differ.
fn distinct_registration(device: u32) -> proto::Register {
    let tag = |kind: u8| Bytes::from([&[kind][..], &device.to_be_bytes()[..]].concat());
    proto::Register {
        device_id: device,
        registration_id: 9000 + device,
        identity_key: tag(0x05),
        signed_prekey: Some(proto::SignedPreKey {
            id: 100 + device,
            public_key: tag(0x06),
            signature: tag(0x07),
        }),
        one_time_prekeys: prekeys(1000 * device, 2),
    }
}

fn upload(device: u32, keys: Vec<proto::PreKey>) -> Body {
    Body::UploadPreKeys(proto::UploadPreKeys {
        device_id: device,
        signed_prekey: None,
        one_time_prekeys: keys,
    })
}

fn one_time_id(b: &proto::PreKeyBundle) -> Option<u32> {
    b.one_time_prekey.as_ref().map(|k| k.id)
}

async fn get(
    p: &mut Probe,
    device: u32,
    id: u64,
) -> Step<Result<Body, crate::conformance::probe::ErrorAnswer>> {
    p.call(Body::GetMessage(proto::GetMessage {
        device_id: device,
        message_id: id,
    }))
    .await
}

pub(super) fn cases() -> Vec<CaseDef> {
    vec![
        // --- §8.1 principles -----------------------------------------------------------------
        case!("8.1/request-id-0", Must, "a request in a frame with id 0 gets BAD_REQUEST with id 0 and is not executed", |cx| {
            let mut p = cx.probe("A").await?;
            p.send_frame(&Frame::new(0, Body::Register(registration(1, 1)))).await;
            let f = p.next_frame(cx.wait()).await?;
            match &f.body {
                Some(Body::Error(e)) if f.id == 0 && e.code == ErrorCode::BadRequest as i32 => {}
                _ => {
                    p.cleanup.lock().push((p.identity.clone(), 1));
                    return Err(Outcome::fail(format!("expected BAD_REQUEST with id 0, got {}", describe(&f))));
                }
            }
            match p.call(Body::GetPreKeyCount(proto::GetPreKeyCount { device_id: 1 })).await? {
                Err(e) if e.code == ErrorCode::NotRegistered as i32 => Ok(Outcome::pass()),
                _ => {
                    p.cleanup.lock().push((p.identity.clone(), 1));
                    Err(Outcome::fail("the Register with frame id 0 was executed"))
                }
            }
        }),
        case!("8.1/answers-in-order", Must, "pipelined requests are answered one by one in request order", |cx| {
            let mut p = cx.node("A").await?;
            let mut ids = Vec::new();
            for i in 0..20u32 {
                let id = p.fresh_id();
                let body = match i % 3 {
                    0 => Body::GetPreKeyCount(proto::GetPreKeyCount { device_id: 1 }),
                    1 => Body::GetPreKeyCount(proto::GetPreKeyCount { device_id: 2 }),
                    _ => Body::Done(proto::Done {}),
                };
                p.send_frame(&Frame::new(id, body)).await;
                ids.push(id);
            }
            for id in ids {
                p.answer_to(id).await?;
            }
            Ok(Outcome::pass())
        }),
        case!("8.1/own-mailbox-only-get", Must, "a session cannot read another identity's mailbox with GetMessage", |cx| {
            let mut a = cx.node("A").await?;
            let mut b = cx.node("B").await?;
            let mut c = cx.node("C").await?;
            let sent = b.send_msg(&a.key(), 1, &b"for A only"[..]).await?;
            match get(&mut c, 1, sent.message_id).await? {
                Err(e) if e.code == ErrorCode::NotFound as i32 => {}
                other => return Err(Outcome::fail(format!("C asked for A's message {}: {other:?}", sent.message_id))),
            }
            match get(&mut a, 1, sent.message_id).await? {
                Ok(Body::Deliver(_)) => Ok(Outcome::pass()),
                other => Err(Outcome::fail(format!("A could not read its own message: {other:?}"))),
            }
        }),
        case!("8.1/own-mailbox-only-ack", Must, "a session cannot acknowledge another identity's messages", |cx| {
            let mut a = cx.node("A").await?;
            let mut b = cx.node("B").await?;
            let sent = b.send_msg(&a.key(), 1, &b"keep"[..]).await?;
            let acked = b.ack(1, vec![sent.message_id]).await?;
            if acked.deleted != 0 {
                return Err(Outcome::fail(format!("B's ack deleted {} messages", acked.deleted)));
            }
            match get(&mut a, 1, sent.message_id).await? {
                Ok(Body::Deliver(_)) => Ok(Outcome::pass()),
                other => Err(Outcome::fail(format!("A's message is gone: {other:?}"))),
            }
        }),
        case!("8.1/own-mailbox-only-subscribe", Must, "a subscription delivers only the session's own identity's messages", |cx| {
            let a = cx.node("A").await?;
            let mut b = cx.node("B").await?;
            let mut c = cx.node("C").await?;
            b.send_msg(&a.key(), 1, &b"for A"[..]).await?;
            c.subscribe(1, 0).await?;
            match c.quiet_for(cx.quiet()).await {
                Ok(()) => Ok(Outcome::pass()),
                Err(e) => Err(Outcome::fail(format!("C received {e:?}"))),
            }
        }),
        case!("8.1/sender-is-session", Must, "Deliver.sender is the key of the session that sent the message", |cx| {
            let mut a = cx.node("A").await?;
            let mut b = cx.node("B").await?;
            let sent = b.send_msg(&a.key(), 1, &b"who"[..]).await?;
            match get(&mut a, 1, sent.message_id).await? {
                Ok(Body::Deliver(d)) if d.sender[..] == b.key().as_bytes()[..] => Ok(Outcome::pass()),
                other => Err(Outcome::fail(format!("{other:?}"))),
            }
        }),
        case!("8.1/any-session-of-identity", Must, "any session of an identity may act for its devices", |cx| {
            let mut a = cx.node("A").await?;
            let mut a2 = cx.probe_as("A2", a.identity.clone()).await?;
            let me = a.key();
            let sent = a.send_msg(&me, 1, &b"shared"[..]).await?;
            match get(&mut a2, 1, sent.message_id).await? {
                Ok(Body::Deliver(_)) => Ok(Outcome::pass()),
                other => Err(Outcome::fail(format!("{other:?}"))),
            }
        }),
        case!("8.1/device-0-register", Must, "Register with device_id 0 gets BAD_REQUEST", |cx| {
            register_fails(cx, |r| r.device_id = 0).await
        }),
        case!("8.1/device-0-send-recipient", Must, "Send to recipient_device 0 gets BAD_REQUEST", |cx| {
            let mut a = cx.node("A").await?;
            let me = a.key();
            let req = a.signed(&me, 0, 1, Bytes::new());
            a.expect_code(Body::Send(req), ErrorCode::BadRequest).await
        }),
        case!("8.1/device-0-send-sender", Must, "Send from sender_device 0 gets NOT_REGISTERED", |cx| {
            let mut a = cx.node("A").await?;
            let me = a.key();
            let req = a.signed(&me, 1, 0, Bytes::new());
            a.expect_code(Body::Send(req), ErrorCode::NotRegistered).await
        }),
        case!("8.1/device-0-unregister", Must, "Unregister device 0 gets NOT_REGISTERED", |cx| {
            node_fails(cx, Body::Unregister(proto::Unregister { device_id: 0 }), ErrorCode::NotRegistered).await
        }),
        case!("8.1/device-0-upload", Must, "UploadPreKeys for device 0 gets NOT_REGISTERED", |cx| {
            node_fails(cx, upload(0, prekeys(50, 1)), ErrorCode::NotRegistered).await
        }),
        case!("8.1/device-0-count", Must, "GetPreKeyCount for device 0 gets NOT_REGISTERED", |cx| {
            node_fails(cx, Body::GetPreKeyCount(proto::GetPreKeyCount { device_id: 0 }), ErrorCode::NotRegistered).await
        }),
        case!("8.1/device-0-subscribe", Must, "Subscribe to device 0 gets NOT_REGISTERED", |cx| {
            node_fails(cx, Body::Subscribe(proto::Subscribe { device_id: 0, after_id: 0 }), ErrorCode::NotRegistered).await
        }),
        case!("8.1/device-0-get", Must, "GetMessage on device 0 gets NOT_REGISTERED", |cx| {
            node_fails(cx, Body::GetMessage(proto::GetMessage { device_id: 0, message_id: 1 }), ErrorCode::NotRegistered).await
        }),
        case!("8.1/device-0-ack", Must, "AckMessages on device 0 gets NOT_REGISTERED", |cx| {
            node_fails(cx, Body::AckMessages(proto::AckMessages { device_id: 0, message_ids: vec![1] }), ErrorCode::NotRegistered).await
        }),
        case!("8.1/device-0-fetch", Must, "FetchPreKeys listing device 0 gets UNKNOWN_RECIPIENT", |cx| {
            let mut a = cx.node("A").await?;
            let id = key_bytes(&a);
            a.expect_code(Body::FetchPreKeys(proto::FetchPreKeys { identity: id, device_ids: vec![0] }), ErrorCode::UnknownRecipient).await
        }),
        // --- §8.2 Register / Unregister ------------------------------------------------------
        case!("8.2/register", Must, "Register answers Registered with the device id and the number of one-time prekeys", |cx| {
            let mut p = cx.probe("A").await?;
            let r = p.register(3, 7).await?;
            if r.device_id == 3 && r.one_time_prekeys == 7 { Ok(Outcome::pass()) } else {
                Err(Outcome::fail(format!("{r:?}")))
            }
        }),
        case!("8.2/register-identity-key-empty", Must, "an empty identity_key gets BAD_REQUEST", |cx| {
            register_fails(cx, |r| r.identity_key = Bytes::new()).await
        }),
        case!("8.2/register-identity-key-too-long", Must, "an identity_key of max_key_len + 1 bytes gets BAD_REQUEST", |cx| {
            let len = cx.limit("max_key_len", 256) as usize + 1;
            let mut r = registration(1, 1);
            r.identity_key = Bytes::from(vec![1; len]);
            bare_fails(cx, Body::Register(r), ErrorCode::BadRequest).await
        }),
        case!("8.2/register-key-at-limit", Must, "key fields of exactly max_key_len bytes are accepted", |cx| {
            let len = cx.limit("max_key_len", 256) as usize;
            let mut p = cx.probe("A").await?;
            let mut r = registration(1, 1);
            r.identity_key = Bytes::from(vec![1; len]);
            if let Some(s) = r.signed_prekey.as_mut() { s.public_key = Bytes::from(vec![2; len]); s.signature = Bytes::from(vec![3; len]); }
            r.one_time_prekeys[0].public_key = Bytes::from(vec![4; len]);
            p.setup(Body::Register(r), "Register").await?;
            p.cleanup.lock().push((p.identity.clone(), 1));
            Ok(Outcome::pass())
        }),
        case!("8.2/register-no-signed-prekey", Must, "a Register without signed_prekey gets BAD_REQUEST", |cx| {
            register_fails(cx, |r| r.signed_prekey = None).await
        }),
        case!("8.2/register-signed-prekey-empty-key", Must, "a signed prekey with an empty public_key gets BAD_REQUEST", |cx| {
            register_fails(cx, |r| if let Some(s) = r.signed_prekey.as_mut() { s.public_key = Bytes::new() }).await
        }),
        case!("8.2/register-signed-prekey-empty-signature", Must, "a signed prekey with an empty signature gets BAD_REQUEST", |cx| {
            register_fails(cx, |r| if let Some(s) = r.signed_prekey.as_mut() { s.signature = Bytes::new() }).await
        }),
        case!("8.2/register-prekey-empty-key", Must, "a one-time prekey with an empty public_key gets BAD_REQUEST", |cx| {
            register_fails(cx, |r| r.one_time_prekeys[0].public_key = Bytes::new()).await
        }),
        case!("8.2/register-too-many-prekeys", Must, "max_prekeys_per_upload + 1 one-time prekeys get BAD_REQUEST", |cx| {
            let n = cx.limit("max_prekeys_per_upload", 100) as u32 + 1;
            let mut r = registration(1, 0);
            r.one_time_prekeys = prekeys(1, n);
            bare_fails(cx, Body::Register(r), ErrorCode::BadRequest).await
        }),
        case!("8.2/register-max-prekeys", Must, "exactly max_prekeys_per_upload one-time prekeys are accepted", |cx| {
            let n = cx.limit("max_prekeys_per_upload", 100) as u32;
            let mut p = cx.probe("A").await?;
            let r = p.register(1, n).await?;
            if r.one_time_prekeys == n { Ok(Outcome::pass()) } else { Err(Outcome::fail(format!("{r:?}"))) }
        }),
        case!("8.2/register-duplicate-prekey-ids", Must, "two one-time prekeys with the same id get BAD_REQUEST", |cx| {
            register_fails(cx, |r| r.one_time_prekeys[1].id = r.one_time_prekeys[0].id).await
        }),
        case!("8.2/register-device-limit", Must, "a device beyond max_devices_per_identity gets BAD_REQUEST", |cx| {
            let max = cx.limit("max_devices_per_identity", 16) as u32;
            let mut p = cx.probe("A").await?;
            for d in 1..=max { p.register(d, 0).await?; }
            p.expect_code(Body::Register(registration(max + 1, 0)), ErrorCode::BadRequest).await
        }),
        case!("8.2/register-device-id-budget", Must, "after 4 × max_devices_per_identity device ids were used, a new id gets BAD_REQUEST", |cx| {
            let budget = 4 * cx.limit("max_devices_per_identity", 16) as u32;
            cx.affordable(2 * u64::from(budget) + 2, cx.change_bucket(), "account changes of one identity")?;
            let mut p = cx.probe("A").await?;
            // Device 1 stays registered: unregistering the last device would remove the
            // account, and its used ids with it (§8.6).
            p.register(1, 0).await?;
            for d in 2..=budget {
                p.register(d, 0).await?;
                p.unregister(d).await?;
            }
            p.register(2, 0).await.map_err(|o| Outcome::fail(format!("re-registering a used id failed: {}", o.detail)))?;
            p.expect_code(Body::Register(registration(budget + 1, 0)), ErrorCode::BadRequest).await
        }),
        case!("8.2/reregister-replaces-prekeys", Must, "re-registering replaces the stored one-time prekeys", |cx| {
            let mut p = cx.probe("A").await?;
            p.register(1, 5).await?;
            let mut r = registration(1, 0);
            r.one_time_prekeys = prekeys(500, 2);
            p.setup(Body::Register(r), "Register").await?;
            let me = p.key();
            let b = p.fetch(&me, vec![1]).await?;
            match b.first().and_then(one_time_id) {
                Some(500) => {}
                other => return Err(Outcome::fail(format!("first key after re-register {other:?}, expected 500"))),
            }
            let count = p.prekey_count(1).await?;
            if count == 1 { Ok(Outcome::pass()) } else { Err(Outcome::fail(format!("count {count}, expected 1"))) }
        }),
        case!("8.2/reregister-keeps-mailbox", Must, "re-registering keeps stored messages and the id counter", |cx| {
            let mut a = cx.node("A").await?;
            let me = a.key();
            let first = a.send_msg(&me, 1, &b"kept"[..]).await?;
            a.setup(Body::Register(registration(1, 2)), "Register").await?;
            match get(&mut a, 1, first.message_id).await? {
                Ok(Body::Deliver(_)) => {}
                other => return Err(Outcome::fail(format!("message lost on re-register: {other:?}"))),
            }
            let next = a.send_msg(&me, 1, &b"next"[..]).await?;
            if next.message_id > first.message_id { Ok(Outcome::pass()) } else { Err(Outcome::fail(format!("{next:?} after {first:?}"))) }
        }),
        case!("8.2/unregister", Must, "Unregister answers Unregistered with the device id (5), and only that device is gone", |cx| {
            let mut a = cx.node("A").await?;
            a.register(5, 2).await?;
            match a.ok(Body::Unregister(proto::Unregister { device_id: 5 }), "Unregister").await? {
                Body::Unregistered(u) if u.device_id == 5 => {}
                other => return Err(Outcome::fail(describe(&Frame::new(0, other)))),
            }
            a.cleanup.lock().retain(|(_, d)| *d != 5);
            a.expect_code(Body::GetPreKeyCount(proto::GetPreKeyCount { device_id: 5 }), ErrorCode::NotRegistered).await?;
            match a.prekey_count(1).await {
                Ok(5) => Ok(Outcome::pass()),
                Ok(n) => Err(Outcome::fail(format!("device 1 has {n} prekeys left, not 5"))),
                Err(o) => Err(Outcome::fail(format!("device 1 went with device 5: {}", o.detail))),
            }
        }),
        case!("8.2/unregister-not-registered", Must, "Unregister of a device that is not registered gets NOT_REGISTERED", |cx| {
            node_fails(cx, Body::Unregister(proto::Unregister { device_id: 2 }), ErrorCode::NotRegistered).await
        }),
        case!("8.2/unregister-drops-messages", Must, "unregistering drops stored messages; sends to the device get UNKNOWN_RECIPIENT", |cx| {
            let mut a = cx.node("A").await?;
            let mut b = cx.node("B").await?;
            let sent = b.send_msg(&a.key(), 1, &b"dropped"[..]).await?;
            a.unregister(1).await?;
            let req = b.signed(&a.key(), 1, 1, Bytes::new());
            b.expect_code(Body::Send(req), ErrorCode::UnknownRecipient).await?;
            a.register(1, 1).await?;
            match get(&mut a, 1, sent.message_id).await? {
                Err(e) if e.code == ErrorCode::NotFound as i32 => Ok(Outcome::pass()),
                other => Err(Outcome::fail(format!("the message survived Unregister: {other:?}"))),
            }
        }),
        // --- §8.2 prekeys ----------------------------------------------------------------------
        case!("8.2/upload-appends", Must, "uploaded one-time prekeys go after the stored ones: fetches hand out the registered key, then the uploaded ones in order", |cx| {
            let mut a = cx.probe("A").await?;
            a.register(1, 1).await?;
            a.setup(upload(1, prekeys(50, 2)), "UploadPreKeys").await?;
            let mut f = cx.probe("F").await?;
            let mut got = Vec::new();
            for _ in 0..3 {
                got.push(f.fetch(&a.key(), vec![1]).await?.first().and_then(one_time_id));
            }
            if got == vec![Some(1), Some(50), Some(51)] { Ok(Outcome::pass()) } else {
                Err(Outcome::fail(format!("one-time keys handed out: {got:?}, expected [1, 50, 51]")))
            }
        }),
        case!("8.2/upload-prekeys", Must, "UploadPreKeys appends keys and answers the device id (2) and its new count", |cx| {
            let mut a = cx.node("A").await?;
            a.register(2, 3).await?;
            match a.ok(upload(2, prekeys(100, 4)), "UploadPreKeys").await? {
                Body::PreKeyCount(c) if c.device_id == 2 && c.count == 7 => {}
                other => return Err(Outcome::fail(format!("expected PreKeyCount {{ device 2, count 7 }}, got {}", describe(&Frame::new(0, other))))),
            }
            match a.prekey_count(1).await? {
                5 => Ok(Outcome::pass()),
                n => Err(Outcome::fail(format!("device 1 has {n} keys after an upload to device 2, not 5"))),
            }
        }),
        case!("8.2/upload-too-many", Must, "UploadPreKeys of max_prekeys_per_upload + 1 keys gets BAD_REQUEST", |cx| {
            let n = cx.limit("max_prekeys_per_upload", 100) as u32 + 1;
            node_fails(cx, upload(1, prekeys(100, n)), ErrorCode::BadRequest).await
        }),
        case!("8.2/upload-duplicate-ids", Must, "UploadPreKeys with an id twice gets BAD_REQUEST", |cx| {
            let mut keys = prekeys(100, 2);
            keys[1].id = 100;
            node_fails(cx, upload(1, keys), ErrorCode::BadRequest).await
        }),
        case!("8.2/upload-id-stored", Must, "UploadPreKeys of an id already stored gets BAD_REQUEST and stores nothing", |cx| {
            let mut a = cx.node("A").await?;
            a.expect_code(upload(1, [prekeys(200, 1), prekeys(1, 1)].concat()), ErrorCode::BadRequest).await?;
            let c = a.prekey_count(1).await?;
            if c == 5 { Ok(Outcome::pass()) } else { Err(Outcome::fail(format!("count {c} after a refused upload"))) }
        }),
        case!("8.2/upload-not-registered", Must, "UploadPreKeys for an unregistered device gets NOT_REGISTERED", |cx| {
            node_fails(cx, upload(2, prekeys(1, 1)), ErrorCode::NotRegistered).await
        }),
        case!("8.2/upload-order-bad-request-first", Must, "UploadPreKeys: a malformed request for an unregistered device gets BAD_REQUEST", |cx| {
            let mut keys = prekeys(1, 2);
            keys[0].public_key = Bytes::new();
            node_fails(cx, upload(2, keys), ErrorCode::BadRequest).await
        }),
        case!("8.2/upload-device-limit", Must, "storing more than max_prekeys_per_device keys gets BAD_REQUEST", |cx| {
            let max = cx.limit("max_prekeys_per_device", 1000) as u32;
            let per = cx.limit("max_prekeys_per_upload", 100) as u32;
            let mut a = cx.probe("A").await?;
            a.register(1, 0).await?;
            let mut stored = 0;
            while stored < max {
                let n = per.min(max - stored);
                a.setup(upload(1, prekeys(10 + stored, n)), "UploadPreKeys").await?;
                stored += n;
            }
            a.expect_code(upload(1, prekeys(10 + stored, 1)), ErrorCode::BadRequest).await
        }),
        case!("8.2/upload-signed-prekey", Must, "UploadPreKeys with a signed prekey replaces the bundle's signed prekey", |cx| {
            let mut a = cx.node("A").await?;
            let spk = proto::SignedPreKey { id: 99, public_key: Bytes::from_static(b"new-spk"), signature: Bytes::from_static(b"sig") };
            a.setup(Body::UploadPreKeys(proto::UploadPreKeys { device_id: 1, signed_prekey: Some(spk.clone()), one_time_prekeys: vec![] }), "UploadPreKeys").await?;
            let me = a.key();
            let b = a.fetch(&me, vec![1]).await?;
            if b.first().and_then(|b| b.signed_prekey.clone()) == Some(spk) { Ok(Outcome::pass()) } else {
                Err(Outcome::fail("the signed prekey was not replaced"))
            }
        }),
        case!("8.2/get-prekey-count", Must, "GetPreKeyCount answers the device id and its stored count (devices 1 and 4 differ); NOT_REGISTERED for an unknown device", |cx| {
            let mut a = cx.node("A").await?;
            a.register(4, 8).await?;
            for (device, count) in [(4u32, 8u32), (1, 5)] {
                match a.ok(Body::GetPreKeyCount(proto::GetPreKeyCount { device_id: device }), "GetPreKeyCount").await? {
                    Body::PreKeyCount(c) if c.device_id == device && c.count == count => {}
                    other => return Err(Outcome::fail(format!("expected PreKeyCount {{ device {device}, count {count} }}, got {}", describe(&Frame::new(0, other))))),
                }
            }
            a.expect_code(Body::GetPreKeyCount(proto::GetPreKeyCount { device_id: 3 }), ErrorCode::NotRegistered).await
        }),
        case!("8.2/fetch-bundle-content", Must, "each bundle returns its own device's registered fields as given (two devices with different keys)", |cx| {
            let mut a = cx.probe("A").await?;
            let regs = [distinct_registration(3), distinct_registration(1)];
            for r in &regs {
                a.setup(Body::Register(r.clone()), "Register").await?;
                a.cleanup.lock().push((a.identity.clone(), r.device_id));
            }
            let mut f = cx.probe("F").await?;
            let bundles = f.fetch(&a.key(), vec![]).await?;
            let expected: Vec<proto::PreKeyBundle> = [&regs[1], &regs[0]].iter().map(|r| proto::PreKeyBundle {
                device_id: r.device_id,
                registration_id: r.registration_id,
                identity_key: r.identity_key.clone(),
                signed_prekey: r.signed_prekey.clone(),
                one_time_prekey: r.one_time_prekeys.first().cloned(),
            }).collect();
            if bundles == expected { Ok(Outcome::pass()) } else {
                Err(Outcome::fail(format!("bundles {bundles:?}, registered {expected:?}")))
            }
        }),
        case!("8.2/one-time-prekey-once", Must, "one-time prekeys go out oldest first, each at most once, then bundles come without one", |cx| {
            let mut a = cx.probe("A").await?;
            a.register(1, 2).await?;
            let mut f = cx.probe("F").await?;
            let mut got = Vec::new();
            for _ in 0..3 {
                let b = f.fetch(&a.key(), vec![1]).await?;
                got.push(b.first().and_then(one_time_id));
            }
            if got == vec![Some(1), Some(2), None] { Ok(Outcome::pass()) } else {
                Err(Outcome::fail(format!("one-time keys handed out: {got:?}, expected [1, 2, none]")))
            }
        }),
        case!("8.2/fetch-device-order", Must, "bundles come in increasing device-id order; an empty list means all devices", |cx| {
            let mut a = cx.probe("A").await?;
            for d in [5, 2, 9] { a.register(d, 1).await?; }
            let mut f = cx.probe("F").await?;
            let b = f.fetch(&a.key(), vec![]).await?;
            let ids: Vec<u32> = b.iter().map(|b| b.device_id).collect();
            if ids == vec![2, 5, 9] { Ok(Outcome::pass()) } else { Err(Outcome::fail(format!("{ids:?}"))) }
        }),
        case!("8.2/fetch-duplicates-merged", Must, "duplicate device ids in FetchPreKeys are merged", |cx| {
            let mut a = cx.node("A").await?;
            let mut f = cx.probe("F").await?;
            let b = f.fetch(&a.key(), vec![1, 1, 1]).await?;
            let left = a.prekey_count(1).await?;
            if b.len() == 1 && left == 4 { Ok(Outcome::pass()) } else {
                Err(Outcome::fail(format!("{} bundles, {left} keys left", b.len())))
            }
        }),
        case!("8.2/fetch-too-many-entries", Must, "FetchPreKeys with more than max_devices_per_identity device ids gets BAD_REQUEST", |cx| {
            let max = cx.limit("max_devices_per_identity", 16) as u32;
            let mut a = cx.node("A").await?;
            let id = key_bytes(&a);
            a.expect_code(Body::FetchPreKeys(proto::FetchPreKeys { identity: id, device_ids: (1..=max + 1).collect() }), ErrorCode::BadRequest).await
        }),
        case!("8.2/fetch-too-many-entries-with-duplicates", Must, "the max_devices_per_identity limit of FetchPreKeys counts the list as sent, before duplicates are merged", |cx| {
            let max = cx.limit("max_devices_per_identity", 16) as usize;
            let mut a = cx.node("A").await?;
            let id = key_bytes(&a);
            a.expect_code(Body::FetchPreKeys(proto::FetchPreKeys { identity: id, device_ids: vec![1; max + 1] }), ErrorCode::BadRequest).await
        }),
        case!("8.2/fetch-max-entries", Must, "FetchPreKeys listing max_devices_per_identity device ids (every registered device) is served", |cx| {
            let max = cx.limit("max_devices_per_identity", 16) as u32;
            cx.affordable(u64::from(max) + 2, cx.change_bucket(), "account changes of one identity")?;
            let mut a = cx.probe("A").await?;
            for d in 1..=max { a.register(d, 0).await?; }
            let mut f = cx.probe("F").await?;
            let bundles = f.fetch(&a.key(), (1..=max).rev().collect()).await?;
            let ids: Vec<u32> = bundles.iter().map(|b| b.device_id).collect();
            if ids == (1..=max).collect::<Vec<_>>() { Ok(Outcome::pass()) } else { Err(Outcome::fail(format!("bundles for devices {ids:?}"))) }
        }),
        case!("8.2/fetch-identity-32-bytes", Must, "FetchPreKeys with a 32-byte identity gets BAD_REQUEST", |cx| {
            let mut a = cx.node("A").await?;
            let id = key_bytes(&a).slice(..32);
            a.expect_code(Body::FetchPreKeys(proto::FetchPreKeys { identity: id, device_ids: vec![] }), ErrorCode::BadRequest).await
        }),
        case!("8.2/fetch-unknown-identity", Must, "FetchPreKeys of an identity without devices gets UNKNOWN_RECIPIENT", |cx| {
            bare_fails(cx, Body::FetchPreKeys(proto::FetchPreKeys { identity: Bytes::copy_from_slice(KeyPair::generate().public().as_bytes()), device_ids: vec![] }), ErrorCode::UnknownRecipient).await
        }),
        case!("8.2/fetch-unknown-device-takes-nothing", Must, "FetchPreKeys listing an unregistered device gets UNKNOWN_RECIPIENT and hands out no key", |cx| {
            let mut a = cx.node("A").await?;
            let mut f = cx.probe("F").await?;
            f.expect_code(Body::FetchPreKeys(proto::FetchPreKeys { identity: key_bytes(&a), device_ids: vec![1, 2] }), ErrorCode::UnknownRecipient).await?;
            let left = a.prekey_count(1).await?;
            if left == 5 { Ok(Outcome::pass()) } else { Err(Outcome::fail(format!("{left} keys left, a key was handed out"))) }
        }),
        case!("8.2/prekeys-low-once", Must, "PreKeysLow comes once per crossing of the threshold; only an upload back to the threshold brings the next one", |cx| {
            let threshold = cx.limit("prekey_low_threshold", 10) as u32;
            if threshold < 3 {
                return Ok(Outcome::skip("prekey_low_threshold below 3"));
            }
            let mut a = cx.probe("A").await?;
            a.register(1, threshold).await?;
            let mut f = cx.probe("F").await?;
            let owner = a.key();
            let low = |push: &Frame, count: u32| matches!(&push.body, Some(Body::PreKeysLow(l)) if l.device_id == 1 && l.count == count);
            f.fetch(&owner, vec![1]).await?;
            let push = a.next_push(cx.wait()).await?;
            if !low(&push, threshold - 1) {
                return Err(Outcome::fail(format!("expected PreKeysLow {{ device 1, count {} }}, got {}", threshold - 1, describe(&push))));
            }
            f.fetch(&owner, vec![1]).await?;
            if let Err(e) = a.quiet_for(cx.quiet()).await {
                return Err(Outcome::fail(format!("a second fetch below the threshold was announced again: {e:?}")));
            }
            // An upload that stays below the threshold does not bring the next announcement.
            a.setup(upload(1, prekeys(500, 1)), "UploadPreKeys").await?;
            f.fetch(&owner, vec![1]).await?;
            if let Err(e) = a.quiet_for(cx.quiet()).await {
                return Err(Outcome::fail(format!("announced again after an upload that stayed below the threshold: {e:?}")));
            }
            // Back to the threshold: the next fetch below it is announced.
            a.setup(upload(1, prekeys(600, 2)), "UploadPreKeys").await?;
            f.fetch(&owner, vec![1]).await?;
            let push = a.next_push(cx.wait()).await?;
            if low(&push, threshold - 1) { Ok(Outcome::pass()) } else {
                Err(Outcome::fail(format!("after an upload back to {threshold} keys, expected PreKeysLow {{ device 1, count {} }}, got {}", threshold - 1, describe(&push))))
            }
        }),
        case!("8.2/prekeys-low", Must, "a fetch that leaves fewer than 10 keys pushes PreKeysLow { device, count left } to every session of the owner", |cx| {
            let mut a = cx.probe("A").await?;
            let threshold = cx.limit("prekey_low_threshold", 10) as u32;
            a.register(1, threshold + 5).await?;
            a.register(2, threshold).await?;
            let mut a2 = cx.probe_as("A2", a.identity.clone()).await?;
            let mut f = cx.probe("F").await?;
            f.fetch(&a.key(), vec![2]).await?;
            for p in [&mut a, &mut a2] {
                let push = p.next_push(cx.wait()).await?;
                match push.body {
                    Some(Body::PreKeysLow(low)) if low.device_id == 2 && low.count == threshold - 1 => {}
                    _ => return Err(Outcome::fail(format!("session {}: expected PreKeysLow {{ device 2, count {} }}, got {}", p.name, threshold - 1, describe(&push)))),
                }
            }
            Ok(Outcome::pass())
        }),
        case!("8.2/no-prekeys-low-above-threshold", Must, "a fetch that leaves the threshold or more keys pushes nothing", |cx| {
            let mut a = cx.probe("A").await?;
            let threshold = cx.limit("prekey_low_threshold", 10) as u32;
            a.register(1, threshold + 1).await?;
            let mut f = cx.probe("F").await?;
            f.fetch(&a.key(), vec![1]).await?;
            match a.quiet_for(cx.quiet()).await {
                Ok(()) => Ok(Outcome::pass()),
                Err(e) => Err(Outcome::fail(format!("{e:?}"))),
            }
        }),
        case!("8.2/fetch-own-identity", Must, "an identity may fetch its own bundles", |cx| {
            let mut a = cx.node("A").await?;
            let me = a.key();
            let b = a.fetch(&me, vec![]).await?;
            if b.len() == 1 { Ok(Outcome::pass()) } else { Err(Outcome::fail(format!("{} bundles", b.len()))) }
        }),
        // --- §8.4 receiving --------------------------------------------------------------------
        case!("8.4/subscribe-not-registered", Must, "Subscribe to an unregistered device gets NOT_REGISTERED", |cx| {
            node_fails(cx, Body::Subscribe(proto::Subscribe { device_id: 2, after_id: 0 }), ErrorCode::NotRegistered).await
        }),
        case!("8.4/subscribed-last-id-new-mailbox", Must, "a new mailbox's Subscribed.last_id is below the id its first message gets", |cx| {
            let mut a = cx.node("A").await?;
            let sub = a.subscribe(1, 0).await?;
            let me = a.key();
            let s = a.send_msg(&me, 1, Bytes::new()).await?;
            if s.message_id > sub.last_id {
                let gap = if s.message_id == sub.last_id + 1 { "consecutive" } else { "with a gap" };
                Ok(Outcome::pass_with(format!("last_id {}, first id {} ({gap})", sub.last_id, s.message_id)))
            } else {
                Err(Outcome::fail(format!("last_id {} before the first message, which got id {}", sub.last_id, s.message_id)))
            }
        }),
        case!("8.4/backlog-in-order", Must, "stored messages above after_id are pushed in id order after Subscribed", |cx| {
            let mut a = cx.node("A").await?;
            let mut b = cx.node("B").await?;
            let mut ids = Vec::new();
            for i in 0..5u8 { ids.push(b.send_msg(&a.key(), 1, vec![i]).await?.message_id); }
            a.subscribe(1, 0).await?;
            let mut got = Vec::new();
            for _ in 0..5 { got.push(a.next_deliver().await?.message_id); }
            if got == ids { Ok(Outcome::pass()) } else { Err(Outcome::fail(format!("{got:?}, sent {ids:?}"))) }
        }),
        case!("8.4/after-id", Must, "messages up to after_id are not pushed", |cx| {
            let mut a = cx.node("A").await?;
            let me = a.key();
            let s1 = a.send_msg(&me, 1, &b"old"[..]).await?;
            let s2 = a.send_msg(&me, 1, &b"new"[..]).await?;
            a.subscribe(1, s1.message_id).await?;
            let d = a.next_deliver().await?;
            if d.message_id != s2.message_id { return Err(Outcome::fail(format!("got {} first", d.message_id))); }
            match a.quiet_for(cx.quiet()).await { Ok(()) => Ok(Outcome::pass()), Err(e) => Err(Outcome::fail(format!("{e:?}"))) }
        }),
        case!("8.4/live-delivery", Must, "a message stored while subscribed is pushed at once", |cx| {
            let mut a = cx.node("A").await?;
            let mut b = cx.node("B").await?;
            a.subscribe(1, 0).await?;
            let s = b.send_msg(&a.key(), 1, &b"live"[..]).await?;
            let d = a.next_deliver().await?;
            if d.message_id == s.message_id { Ok(Outcome::pass()) } else { Err(Outcome::fail(format!("{}", d.message_id))) }
        }),
        case!("8.4/window", Must, "at most max_unacked deliveries are in flight; an ack lets the next one follow", |cx| {
            let window = cx.limit("max_unacked", 256);
            if window > 1000 { return Ok(Outcome::skip("max_unacked above 1000")); }
            let mut a = cx.node("A").await?;
            let pair_burst = cx.limit("send_burst_per_pair", 200);
            let total = window + 4;
            let mut senders = Vec::new();
            let mut left = total;
            while left > 0 {
                let mut s = cx.node(&format!("S{}", senders.len())).await?;
                let n = left.min(pair_burst.saturating_sub(10).max(1));
                for _ in 0..n { s.send_msg(&a.key(), 1, Bytes::new()).await?; }
                left -= n;
                senders.push(s);
                if senders.len() > 20 { return Err(Outcome::fail("too many senders needed")); }
            }
            a.subscribe(1, 0).await?;
            let mut first = None;
            for _ in 0..window {
                let d = a.next_deliver().await?;
                first.get_or_insert(d.message_id);
            }
            if let Err(e) = a.quiet_for(cx.quiet()).await {
                return Err(Outcome::fail(format!("more than {window} in flight: {e:?}")));
            }
            a.ack(1, vec![first.unwrap_or(1)]).await?;
            a.next_deliver().await.map_err(|o| Outcome::fail(format!("no delivery after an ack freed a place: {}", o.detail)))?;
            Ok(Outcome::pass())
        }),
        case!("8.4/resubscribe-restarts", Must, "re-subscribing from the same session pushes unacknowledged messages again", |cx| {
            let mut a = cx.node("A").await?;
            let me = a.key();
            let s = a.send_msg(&me, 1, &b"again"[..]).await?;
            a.subscribe(1, 0).await?;
            a.next_deliver().await?;
            a.subscribe(1, 0).await?;
            let d = a.next_deliver().await?;
            if d.message_id == s.message_id { Ok(Outcome::pass()) } else { Err(Outcome::fail(format!("{}", d.message_id))) }
        }),
        case!("8.4/replaced", Must, "a newer subscription from another session sends REPLACED (id 0) to the older one, which stays open", |cx| {
            let mut a = cx.node("A").await?;
            a.subscribe(1, 0).await?;
            let mut a2 = cx.probe_as("A2", a.identity.clone()).await?;
            a2.subscribe(1, 0).await?;
            let push = a.next_push(cx.wait()).await?;
            match &push.body {
                Some(Body::Error(e)) if e.code == ErrorCode::Replaced as i32 && push.id == 0 => {}
                _ => return Err(Outcome::fail(format!("expected REPLACED, got {}", describe(&push)))),
            }
            a.prekey_count(1).await.map_err(|o| Outcome::fail(format!("the replaced session did not stay open: {}", o.detail)))?;
            Ok(Outcome::pass())
        }),
        case!("8.4/replaced-gets-no-deliveries", Must, "after REPLACED the older session gets no Deliver for that device; its subscription to another device goes on", |cx| {
            let mut a = cx.node("A").await?;
            a.register(2, 0).await?;
            a.subscribe(1, 0).await?;
            a.subscribe(2, 0).await?;
            let mut a2 = cx.probe_as("A2", a.identity.clone()).await?;
            a2.subscribe(1, 0).await?;
            let _ = a.next_push(cx.wait()).await?;
            let me = a.key();
            a2.send_msg(&me, 1, &b"to the new one"[..]).await?;
            a2.next_deliver().await?;
            if let Err(e) = a.quiet_for(cx.quiet()).await {
                return Err(Outcome::fail(format!("the replaced session got: {e:?}")));
            }
            let s = a2.send_msg(&me, 2, &b"to device 2"[..]).await?;
            let d = a.next_deliver().await.map_err(|o| Outcome::fail(format!("the replaced session's subscription to device 2 ended too: {}", o.detail)))?;
            if d.message_id == s.message_id && d.recipient_device == 2 { Ok(Outcome::pass()) } else {
                Err(Outcome::fail(describe(&Frame::new(0, Body::Deliver(d)))))
            }
        }),
        case!("8.4/unregister-ends-subscription", Must, "unregistering a device ends its subscription: registered again, its messages do not reach the old subscriber", |cx| {
            let mut a = cx.node("A").await?;
            a.register(2, 0).await?;
            a.subscribe(2, 0).await?;
            let mut a2 = cx.probe_as("A2", a.identity.clone()).await?;
            a2.unregister(2).await?;
            a2.register(2, 0).await?;
            let me = a.key();
            a2.send_msg(&me, 2, &b"after re-registration"[..]).await?;
            match a.quiet_for(cx.quiet()).await {
                Ok(()) => Ok(Outcome::pass()),
                Err(e) => Err(Outcome::fail(format!("the subscription outlived the unregistration: {e:?}"))),
            }
        }),
        case!("8.4/subscribed-before-deliver", Must, "a pipelined Subscribe is answered after the answers before it, and before any Deliver of its subscription", |cx| {
            let mut a = cx.node("A").await?;
            let me = a.key();
            let bodies = vec![
                Body::Send(a.signed(&me, 1, 1, &b"1"[..])),
                Body::Send(a.signed(&me, 1, 1, &b"2"[..])),
                Body::Subscribe(proto::Subscribe { device_id: 1, after_id: 0 }),
            ];
            let first = a.fresh_id();
            let mut wire = Vec::new();
            for (i, body) in bodies.into_iter().enumerate() {
                if i > 0 { a.fresh_id(); }
                wire.extend_from_slice(&a.seal(&Frame::new(first + i as u64, body).encode_to_vec()));
            }
            a.send_wire(&wire, format!("Send, Send, Subscribe pipelined (frames {first}..={})", first + 2)).await;
            let mut order = Vec::new();
            while order.len() < 5 {
                let f = a.next_frame(cx.wait()).await?;
                order.push(match (&f.body, f.id) {
                    (Some(Body::Sent(_)), id) if id < first + 2 => "Sent",
                    (Some(Body::Subscribed(_)), id) if id == first + 2 => "Subscribed",
                    (Some(Body::Deliver(_)), 0) => "Deliver",
                    (Some(Body::PreKeysLow(_)), 0) => continue,
                    _ => return Err(Outcome::fail(format!("unexpected {}", describe(&f)))),
                });
            }
            if order == ["Sent", "Sent", "Subscribed", "Deliver", "Deliver"] { Ok(Outcome::pass()) } else {
                Err(Outcome::fail(format!("frames in the order {order:?}")))
            }
        }),
        case!("8.1/pipelined-sees-earlier", Must, "each pipelined request sees the effects of the earlier ones: Register, a Send from that device, GetPreKeyCount, Unregister, GetPreKeyCount", |cx| {
            let mut a = cx.probe("A").await?;
            let me = a.key();
            let send = a.signed(&me, 1, 1, &b"pipelined"[..]);
            let answers = a.pipeline(vec![
                Body::Register(registration(1, 1)),
                Body::Send(send),
                Body::GetPreKeyCount(proto::GetPreKeyCount { device_id: 1 }),
                Body::Unregister(proto::Unregister { device_id: 1 }),
                Body::GetPreKeyCount(proto::GetPreKeyCount { device_id: 1 }),
            ]).await?;
            let names: Vec<String> = answers.iter().map(|r| match r {
                Ok(b) => describe(&Frame::new(0, b.clone())),
                Err(e) => e.name(),
            }).collect();
            let ok = matches!(&answers[..], [
                Ok(Body::Registered(_)),
                Ok(Body::Sent(_)),
                Ok(Body::PreKeyCount(_)),
                Ok(Body::Unregistered(_)),
                Err(e),
            ] if e.code == ErrorCode::NotRegistered as i32);
            if !ok {
                if matches!(answers.first(), Some(Ok(Body::Registered(_)))) && !matches!(answers.get(3), Some(Ok(Body::Unregistered(_)))) {
                    a.cleanup.lock().push((a.identity.clone(), 1));
                }
                return Err(Outcome::fail(format!("answers {names:?}")));
            }
            Ok(Outcome::pass())
        }),
        case!("8.4/get-message", Must, "GetMessage answers a Deliver with the request's frame id", |cx| {
            let mut a = cx.node("A").await?;
            let me = a.key();
            let s = a.send_msg(&me, 1, &b"get"[..]).await?;
            match get(&mut a, 1, s.message_id).await? {
                Ok(Body::Deliver(d)) if d.message_id == s.message_id => Ok(Outcome::pass()),
                other => Err(Outcome::fail(format!("{other:?}"))),
            }
        }),
        case!("8.4/get-message-not-found", Must, "GetMessage of an id never assigned gets NOT_FOUND", |cx| {
            node_fails(cx, Body::GetMessage(proto::GetMessage { device_id: 1, message_id: 999 }), ErrorCode::NotFound).await
        }),
        case!("8.4/get-message-order", Must, "GetMessage on an unregistered device gets NOT_REGISTERED before NOT_FOUND", |cx| {
            node_fails(cx, Body::GetMessage(proto::GetMessage { device_id: 2, message_id: 999 }), ErrorCode::NotRegistered).await
        }),
        case!("8.4/ack", Must, "AckMessages deletes the listed stored messages and counts distinct deletions", |cx| {
            let mut a = cx.node("A").await?;
            let me = a.key();
            let s1 = a.send_msg(&me, 1, &b"1"[..]).await?;
            let s2 = a.send_msg(&me, 1, &b"2"[..]).await?;
            let acked = a.ack(1, vec![s1.message_id, s1.message_id, s2.message_id, 999_999]).await?;
            if acked.deleted != 2 { return Err(Outcome::fail(format!("deleted {}", acked.deleted))); }
            match get(&mut a, 1, s1.message_id).await? {
                Err(e) if e.code == ErrorCode::NotFound as i32 => Ok(Outcome::pass()),
                other => Err(Outcome::fail(format!("acknowledged message still there: {other:?}"))),
            }
        }),
        case!("8.4/ack-4096-ids", Must, "AckMessages of 4096 ids is accepted", |cx| {
            let mut a = cx.node("A").await?;
            a.ack(1, (1..=4096).collect()).await?;
            Ok(Outcome::pass())
        }),
        case!("8.4/ack-4097-ids", Must, "AckMessages of 4097 ids gets BAD_REQUEST", |cx| {
            node_fails(cx, Body::AckMessages(proto::AckMessages { device_id: 1, message_ids: (1..=4097).collect() }), ErrorCode::BadRequest).await
        }),
        case!("8.4/ack-order", Must, "AckMessages: 4097 ids for an unregistered device gets BAD_REQUEST first", |cx| {
            node_fails(cx, Body::AckMessages(proto::AckMessages { device_id: 2, message_ids: (1..=4097).collect() }), ErrorCode::BadRequest).await
        }),
        case!("8.4/ack-not-registered", Must, "AckMessages on an unregistered device gets NOT_REGISTERED", |cx| {
            node_fails(cx, Body::AckMessages(proto::AckMessages { device_id: 2, message_ids: vec![1] }), ErrorCode::NotRegistered).await
        }),
        case!("8.4/acked-not-pushed", Must, "a message acknowledged before subscribing is not pushed", |cx| {
            let mut a = cx.node("A").await?;
            let me = a.key();
            let s = a.send_msg(&me, 1, &b"acked"[..]).await?;
            a.ack(1, vec![s.message_id]).await?;
            a.subscribe(1, 0).await?;
            match a.quiet_for(cx.quiet()).await { Ok(()) => Ok(Outcome::pass()), Err(e) => Err(Outcome::fail(format!("{e:?}"))) }
        }),
        case!("8.4/large-backlog-flows", Must, "a backlog of max-size messages is delivered without stalling", |cx| {
            let mut a = cx.node("A").await?;
            let me = a.key();
            let max = a.max_payload_len();
            for i in 0..4u8 { a.send_msg(&me, 1, Bytes::from(vec![i; max])).await?; }
            a.subscribe(1, 0).await?;
            for _ in 0..4 { a.next_deliver().await?; }
            Ok(Outcome::pass())
        }),
        // --- §8.5 ids and retention ------------------------------------------------------------
        case!("8.5/first-id", Must, "a new mailbox's first id is at least 1 (the relay chooses it) and later ids are higher", |cx| {
            let mut a = cx.node("A").await?;
            let me = a.key();
            let mut ids = Vec::new();
            for _ in 0..3 { ids.push(a.send_msg(&me, 1, Bytes::new()).await?.message_id); }
            if ids[0] < 1 { return Err(Outcome::fail("the first id is 0")); }
            if ids.windows(2).any(|w| w[1] <= w[0]) { return Err(Outcome::fail(format!("ids {ids:?} do not increase"))); }
            Ok(Outcome::pass_with(format!("first id {} (1 on a relay that never removed an account)", ids[0])))
        }),
        case!("8.5/ids-increase", Must, "each new message gets an id above every earlier one of the mailbox, in the order of the sends", |cx| {
            let mut a = cx.node("A").await?;
            let me = a.key();
            let mut ids: Vec<u64> = Vec::new();
            for _ in 0..10 {
                let s = a.send_msg(&me, 1, Bytes::new()).await?;
                if let Some(last) = ids.last() {
                    if s.message_id <= *last { return Err(Outcome::fail(format!("{} after {last}", s.message_id))); }
                }
                ids.push(s.message_id);
            }
            let consecutive = ids.windows(2).all(|w| w[1] == w[0] + 1);
            Ok(Outcome::pass_with(if consecutive { "consecutive ids".to_string() } else { format!("ids with gaps: {ids:?}") }))
        }),
        case!("8.5/ids-not-reused-after-ack", Must, "an acknowledged message's id is not reused", |cx| {
            let mut a = cx.node("A").await?;
            let me = a.key();
            let s1 = a.send_msg(&me, 1, Bytes::new()).await?;
            a.ack(1, vec![s1.message_id]).await?;
            let s2 = a.send_msg(&me, 1, Bytes::new()).await?;
            if s2.message_id > s1.message_id { Ok(Outcome::pass()) } else { Err(Outcome::fail(format!("{} after {}", s2.message_id, s1.message_id))) }
        }),
        case!("8.5/ids-survive-reregistration", Must, "ids continue after the device is unregistered and registered again (the account stays)", |cx| {
            let mut a = cx.node("A").await?;
            a.register(2, 0).await?;
            let (last, next) = id_after_reregistering_device_1(&mut a).await?;
            if next > last { Ok(Outcome::pass()) } else { Err(Outcome::fail(format!("id {next} reused after re-registration (had reached {last})"))) }
        }),
        case!("8.5/ids-survive-account-removal", Must, "ids are not reused after the account went with its last device and the identity registered again", |cx| {
            let mut a = cx.node("A").await?;
            let (last, next) = id_after_reregistering_device_1(&mut a).await?;
            if next > last { Ok(Outcome::pass_with(format!("{next} after {last}"))) } else {
                Err(Outcome::fail(format!("id {next} reused after the account was removed (had reached {last})")))
            }
        }),
        case!("8.5/ids-per-mailbox", Open, "whether sends to another mailbox take ids of this one (a relay may leave gaps); ids still increase", |cx| {
            let mut a = cx.probe("A").await?;
            a.register(1, 0).await?;
            a.register(2, 0).await?;
            let me = a.key();
            let first = a.send_msg(&me, 2, Bytes::new()).await?.message_id;
            a.send_msg(&me, 1, Bytes::new()).await?;
            a.send_msg(&me, 1, Bytes::new()).await?;
            let next = a.send_msg(&me, 2, Bytes::new()).await?.message_id;
            if next <= first { return Err(Outcome::fail(format!("device 2's ids {first}, then {next}: not increasing"))); }
            if next == first + 1 { Ok(Outcome::info("consecutive per mailbox")) } else { Ok(Outcome::info(format!("device 2's ids {first}, then {next} after two sends to device 1: ids shared across mailboxes"))) }
        }),
        case!("8.5/received-at", Must, "received_at_ms is Unix time in ms by the relay's clock and never goes backwards", |cx| {
            let mut a = cx.node("A").await?;
            let me = a.key();
            let mut times = Vec::new();
            for _ in 0..3 {
                let s = a.send_msg(&me, 1, Bytes::new()).await?;
                match get(&mut a, 1, s.message_id).await? {
                    Ok(Body::Deliver(d)) => times.push(d.received_at_ms),
                    other => return Err(Outcome::fail(format!("{other:?}"))),
                }
            }
            if times.windows(2).any(|w| w[1] < w[0]) { return Err(Outcome::fail(format!("went backwards: {times:?}"))); }
            let skew = times[0] as i64 - a.welcome.server_time_ms as i64;
            if !(-1000..=60_000).contains(&skew) { return Err(Outcome::fail(format!("{} ms from Welcome.server_time_ms", skew))); }
            Ok(Outcome::pass_with(crate::conformance::rfc3339_ms(times[0])))
        }),
        // --- §8.6 policy, contacts, tickets ------------------------------------------------------
        case!("8.6/set-policy", Must, "SetPolicy answers Done", |cx| {
            let mut a = cx.node("A").await?;
            match a.ok(Body::SetPolicy(proto::SetPolicy { accept: proto::Accept::ContactsOnly as i32 }), "SetPolicy").await? {
                Body::Done(_) => Ok(Outcome::pass()),
                other => Err(Outcome::fail(describe(&Frame::new(0, other)))),
            }
        }),
        case!("8.6/set-policy-unknown-value", Must, "SetPolicy with an unknown accept value gets BAD_REQUEST", |cx| {
            node_fails(cx, Body::SetPolicy(proto::SetPolicy { accept: 7 }), ErrorCode::BadRequest).await
        }),
        case!("8.6/set-policy-not-registered", Must, "SetPolicy without a registered device gets NOT_REGISTERED", |cx| {
            bare_fails(cx, Body::SetPolicy(proto::SetPolicy { accept: 1 }), ErrorCode::NotRegistered).await
        }),
        case!("8.6/account-removed-with-last-device", Must, "when the last device goes, policy, contacts and tickets go: a new registration starts open, with neither", |cx| {
            let mut b = cx.node("B").await?;
            let c = cx.node("C").await?;
            b.setup(Body::SetPolicy(proto::SetPolicy { accept: 1 }), "SetPolicy").await?;
            b.setup(Body::AddContact(proto::AddContact { identity: Bytes::copy_from_slice(c.key().as_bytes()) }), "AddContact").await?;
            let token = match b.setup(Body::CreateTicket(proto::CreateTicket { ttl_s: 0, uses: 5 }), "CreateTicket").await? {
                Body::Ticket(t) => t.token,
                other => return Err(Outcome::fail(format!("CreateTicket answered {}", describe(&Frame::new(0, other))))),
            };
            b.unregister(1).await?;
            b.register(1, 0).await?;
            let mut a = cx.node("A").await?;
            let req = a.signed(&b.key(), 1, 1, Bytes::new());
            a.call_patiently(Body::Send(req)).await?.map_err(|e| Outcome::fail(format!("a stranger's message after re-registration got {}: the policy should be ACCEPT_OPEN again", e.name())))?;
            b.setup(Body::SetPolicy(proto::SetPolicy { accept: 1 }), "SetPolicy").await?;
            let mut c = c;
            let req = c.signed(&b.key(), 1, 1, Bytes::new());
            c.expect_code(Body::Send(req), ErrorCode::Forbidden).await.map_err(|o| Outcome::fail(format!("the old contact: {} (the contact list should be empty)", o.detail)))?;
            let mut s = cx.node("S").await?;
            let mut req = s.signed(&b.key(), 1, 1, Bytes::new());
            req.ticket = token;
            s.expect_code(Body::Send(req), ErrorCode::TicketInvalid).await.map_err(|o| Outcome::fail(format!("the old ticket: {} (tickets should be gone)", o.detail)))
        }),
        case!("8.6/removal-keeps-others-contacts", Must, "an account's removal leaves other accounts alone: the removed identity stays in their contact lists", |cx| {
            let mut c = cx.node("C").await?;
            let mut b = cx.node("B").await?;
            c.setup(Body::AddContact(proto::AddContact { identity: key_bytes(&b) }), "AddContact").await?;
            c.setup(Body::SetPolicy(proto::SetPolicy { accept: 1 }), "SetPolicy").await?;
            b.unregister(1).await?;
            b.register(1, 0).await?;
            let req = b.signed(&c.key(), 1, 1, &b"still a contact"[..]);
            b.call_patiently(Body::Send(req)).await?.map_err(|e| Outcome::fail(format!("B, C's contact, removed and registered again, got {}", e.name())))?;
            Ok(Outcome::pass())
        }),
        case!("8.6/add-contact-limit", Must, "AddContact beyond max_contacts gets BAD_REQUEST; a contact already present still succeeds", |cx| {
            let max = cx.need("max_contacts")?;
            if max > 2000 {
                return Ok(Outcome::skip("max_contacts above 2000 takes too long to fill"));
            }
            cx.affordable(max + 4, cx.change_bucket(), "account changes of one identity")?;
            let mut a = cx.node("A").await?;
            let first = Bytes::copy_from_slice(KeyPair::generate().public().as_bytes());
            a.setup(Body::AddContact(proto::AddContact { identity: first.clone() }), "AddContact").await?;
            for _ in 1..max {
                a.setup(Body::AddContact(proto::AddContact { identity: Bytes::copy_from_slice(KeyPair::generate().public().as_bytes()) }), "AddContact").await?;
            }
            a.setup(Body::AddContact(proto::AddContact { identity: first }), "AddContact of a present contact").await?;
            a.expect_code(Body::AddContact(proto::AddContact { identity: Bytes::copy_from_slice(KeyPair::generate().public().as_bytes()) }), ErrorCode::BadRequest).await
        }),
        case!("8.6/settings-kept-while-a-device-remains", Must, "unregistering a device that is not the last keeps the account's policy", |cx| {
            let mut b = cx.node("B").await?;
            b.register(2, 0).await?;
            b.setup(Body::SetPolicy(proto::SetPolicy { accept: 1 }), "SetPolicy").await?;
            b.unregister(1).await?;
            let mut a = cx.node("A").await?;
            let req = a.signed(&b.key(), 2, 1, Bytes::new());
            a.expect_code(Body::Send(req), ErrorCode::Forbidden).await
        }),
        case!("8.6/add-contact-32-bytes", Must, "AddContact with a 32-byte identity gets BAD_REQUEST", |cx| {
            node_fails(cx, Body::AddContact(proto::AddContact { identity: Bytes::from(vec![2; 32]) }), ErrorCode::BadRequest).await
        }),
        case!("8.6/add-contact-order", Must, "AddContact: a 32-byte identity without devices gets BAD_REQUEST first", |cx| {
            bare_fails(cx, Body::AddContact(proto::AddContact { identity: Bytes::from(vec![2; 32]) }), ErrorCode::BadRequest).await
        }),
        case!("8.6/add-contact-not-registered", Must, "AddContact without a registered device gets NOT_REGISTERED", |cx| {
            bare_fails(cx, Body::AddContact(proto::AddContact { identity: Bytes::copy_from_slice(KeyPair::generate().public().as_bytes()) }), ErrorCode::NotRegistered).await
        }),
        case!("8.6/contacts-idempotent", Must, "adding a present contact and removing an absent one succeed", |cx| {
            let mut a = cx.node("A").await?;
            let k = Bytes::copy_from_slice(KeyPair::generate().public().as_bytes());
            for body in [Body::AddContact(proto::AddContact { identity: k.clone() }), Body::AddContact(proto::AddContact { identity: k.clone() }),
                         Body::RemoveContact(proto::RemoveContact { identity: k.clone() }), Body::RemoveContact(proto::RemoveContact { identity: k })] {
                a.ok(body, "contact change").await?;
            }
            Ok(Outcome::pass())
        }),
        case!("8.6/remove-contact-32-bytes", Must, "RemoveContact with a 32-byte identity gets BAD_REQUEST", |cx| {
            node_fails(cx, Body::RemoveContact(proto::RemoveContact { identity: Bytes::from(vec![2; 32]) }), ErrorCode::BadRequest).await
        }),
        case!("8.6/remove-contact-not-registered", Must, "RemoveContact without a registered device gets NOT_REGISTERED", |cx| {
            bare_fails(cx, Body::RemoveContact(proto::RemoveContact { identity: Bytes::copy_from_slice(KeyPair::generate().public().as_bytes()) }), ErrorCode::NotRegistered).await
        }),
        case!("8.6/create-ticket-defaults", Must, "CreateTicket with zeros gives a 16-byte token, one use, one day, the relay's and the identity's keys", |cx| {
            let mut a = cx.node("A").await?;
            let before = crate::conformance::unix_ms();
            let t = match a.ok(Body::CreateTicket(proto::CreateTicket { ttl_s: 0, uses: 0 }), "CreateTicket").await? {
                Body::Ticket(t) => t,
                other => return Err(Outcome::fail(describe(&Frame::new(0, other)))),
            };
            let day = 86_400_000u64;
            let expiry_ok = t.expires_at_ms + 120_000 >= before + day && t.expires_at_ms <= crate::conformance::unix_ms() + day + 120_000;
            if t.token.len() == 16 && t.uses == 1 && t.relay_pubkey[..] == cx.t.key.as_bytes()[..] && t.identity[..] == a.key().as_bytes()[..] && expiry_ok {
                Ok(Outcome::pass_with(format!("expires {}", crate::conformance::rfc3339_ms(t.expires_at_ms))))
            } else {
                Err(Outcome::fail(describe(&Frame::new(0, Body::Ticket(t)))))
            }
        }),
        case!("8.6/ticket-tokens-random", Must, "two tickets have different tokens", |cx| {
            let mut a = cx.node("A").await?;
            let mut tokens = HashSet::new();
            for _ in 0..3 {
                if let Body::Ticket(t) = a.ok(Body::CreateTicket(proto::CreateTicket { ttl_s: 60, uses: 1 }), "CreateTicket").await? { tokens.insert(t.token); }
            }
            if tokens.len() == 3 { Ok(Outcome::pass()) } else { Err(Outcome::fail("a token repeated")) }
        }),
        case!("8.6/create-ticket-max-ttl", Must, "a ticket lifetime of exactly max_ticket_ttl is accepted", |cx| {
            let ttl = cx.limit("max_ticket_ttl_s", 2_592_000) as u32;
            let mut a = cx.node("A").await?;
            a.ok(Body::CreateTicket(proto::CreateTicket { ttl_s: ttl, uses: 1 }), "CreateTicket").await?;
            Ok(Outcome::pass())
        }),
        case!("8.6/create-ticket-ttl-too-long", Must, "a ticket lifetime above 30 days gets BAD_REQUEST", |cx| {
            let ttl = cx.limit("max_ticket_ttl_s", 2_592_000) as u32 + 1;
            node_fails(cx, Body::CreateTicket(proto::CreateTicket { ttl_s: ttl, uses: 1 }), ErrorCode::BadRequest).await
        }),
        case!("8.6/create-ticket-too-many-uses", Must, "more than 1000 uses gets BAD_REQUEST", |cx| {
            let uses = cx.limit("max_ticket_uses", 1000) as u32 + 1;
            node_fails(cx, Body::CreateTicket(proto::CreateTicket { ttl_s: 0, uses }), ErrorCode::BadRequest).await
        }),
        case!("8.6/create-ticket-order", Must, "CreateTicket: too long a lifetime without devices gets BAD_REQUEST first", |cx| {
            bare_fails(cx, Body::CreateTicket(proto::CreateTicket { ttl_s: u32::MAX, uses: 1 }), ErrorCode::BadRequest).await
        }),
        case!("8.6/create-ticket-not-registered", Must, "CreateTicket without a registered device gets NOT_REGISTERED", |cx| {
            bare_fails(cx, Body::CreateTicket(proto::CreateTicket { ttl_s: 0, uses: 0 }), ErrorCode::NotRegistered).await
        }),
        case!("8.6/ticket-limit", Must, "an identity holding max_tickets_per_identity unexpired tickets gets BAD_REQUEST for another", |cx| {
            let max = cx.limit("max_tickets_per_identity", 1000);
            cx.affordable(max + 3, cx.change_bucket(), "CreateTicket requests of one identity")?;
            let mut a = cx.node("A").await?;
            for _ in 0..max {
                a.setup(Body::CreateTicket(proto::CreateTicket { ttl_s: 600, uses: 1 }), "CreateTicket").await?;
            }
            a.expect_code(Body::CreateTicket(proto::CreateTicket { ttl_s: 600, uses: 1 }), ErrorCode::BadRequest).await
        }),
        case!("8.6/ticket-uses", Must, "a ticket with 2 uses admits two strangers and refuses a third", |cx| {
            let mut b = cx.node("B").await?;
            b.setup(Body::SetPolicy(proto::SetPolicy { accept: 1 }), "SetPolicy").await?;
            let t = match b.setup(Body::CreateTicket(proto::CreateTicket { ttl_s: 0, uses: 2 }), "CreateTicket").await? {
                Body::Ticket(t) => t,
                _ => return Err(Outcome::fail("no Ticket")),
            };
            for name in ["S1", "S2"] {
                let mut s = cx.node(name).await?;
                let mut req = s.signed(&b.key(), 1, 1, Bytes::new());
                req.ticket = t.token.clone();
                s.send_req(req).await?;
            }
            let mut s = cx.node("S3").await?;
            let mut req = s.signed(&b.key(), 1, 1, Bytes::new());
            req.ticket = t.token.clone();
            s.expect_code(Body::Send(req), ErrorCode::TicketInvalid).await
        }),
    ]
}
