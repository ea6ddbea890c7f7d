//! §1, §3, §6 and §7: framing in the session, encrypted frames and rotation, the frame table,
//! `Welcome`, ping rules, timers and errors.

use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tokio::time::Instant;

use super::{case, CaseDef, Ctx};
use crate::conformance::probe::{code_name, Event, Probe};
use crate::conformance::wire::{body_field, describe, field_bytes, field_varint, padding_field};
use crate::conformance::{Outcome, Step};
use botd_protocol::proto::{self, Body, ErrorCode, Frame, Ping, Pong};

/// The code and frame id of an `Error` frame.
fn error_of(f: &Frame) -> Option<(i32, u64)> {
    match &f.body {
        Some(Body::Error(e)) => Some((e.code, f.id)),
        _ => None,
    }
}

/// Expects the next frame to be `Error{code}` with frame id `id`, and the session to go on.
async fn expect_error_frame(p: &mut Probe, code: ErrorCode, id: u64) -> Step<Outcome> {
    let wait = p.wait;
    let f = p.next_frame(wait).await?;
    match error_of(&f) {
        Some((c, fid)) if c == code as i32 && fid == id => {}
        _ => {
            return Err(Outcome::fail(format!(
                "expected Error {{{}}} with frame id {id}, got {}",
                code.as_str_name(),
                describe(&f)
            )))
        }
    }
    still_serving(p).await
}

/// The session still answers a request.
async fn still_serving(p: &mut Probe) -> Step<Outcome> {
    match p
        .call(Body::GetPreKeyCount(proto::GetPreKeyCount { device_id: 1 }))
        .await
    {
        Ok(_) => Ok(Outcome::pass()),
        Err(o) => Err(Outcome::fail(format!(
            "the session did not go on: {}",
            o.detail
        ))),
    }
}

/// Sends a known body that is not a request; expects `UNSUPPORTED` with the frame's id.
async fn non_request(cx: Ctx, body: Body) -> Step<Outcome> {
    let mut p = cx.probe("A").await?;
    let id = p.fresh_id();
    p.send_frame(&Frame::new(id, body)).await;
    expect_error_frame(&mut p, ErrorCode::Unsupported, id).await
}

/// The relay must close with `Error{code}` (frame id `id`) and nothing after it.
async fn expect_error_then_close(p: &mut Probe, code: ErrorCode, id: u64) -> Step<Outcome> {
    let wait = p.wait;
    match p.until_closed(wait).await {
        Ok(frames) => match frames.last().and_then(error_of) {
            Some((c, fid)) if c == code as i32 && fid == id => Ok(Outcome::pass()),
            _ => Err(Outcome::fail(format!(
                "the relay closed, but its last frame was not Error {{{}}} with id {id}: {:?}",
                code.as_str_name(),
                frames.iter().map(describe).collect::<Vec<_>>()
            ))),
        },
        Err(frames) => Err(Outcome::fail(format!(
            "the relay did not close the session (got {:?})",
            frames.iter().map(describe).collect::<Vec<_>>()
        ))),
    }
}

/// Sends `n` frames that the relay answers with `UNSUPPORTED` and checks every answer.
async fn many_unsupported(p: &mut Probe, n: u64) -> Step<()> {
    let first = p.fresh_id();
    // Pipelined in batches so neither side's buffers fill.
    let mut next = first;
    let last = first + n;
    while next < last {
        let batch_end = (next + 200).min(last);
        for id in next..batch_end {
            let frame = Frame::new(id, Body::Done(proto::Done {}));
            let wire = p.seal(&frame.encode_to_vec());
            p.send_wire(&wire, format!("Frame {{ id: {id}, Done }}"))
                .await;
        }
        for id in next..batch_end {
            let wait = p.wait;
            let f = p
                .next_frame(wait)
                .await
                .map_err(|o| Outcome::fail(format!("answer to frame {id}: {}", o.detail)))?;
            if error_of(&f) != Some((ErrorCode::Unsupported as i32, id)) {
                return Err(Outcome::fail(format!(
                    "frame {id} was answered with {}",
                    describe(&f)
                )));
            }
        }
        next = batch_end;
    }
    for _ in 0..(last - first) {
        p.fresh_id();
    }
    Ok(())
}

fn ping(id: &str) -> Body {
    Body::Ping(Ping { id: id.into() })
}

pub(super) fn cases() -> Vec<CaseDef> {
    vec![
        // --- §1 protobuf rules -----------------------------------------------------------------
        case!("1/invalid-utf8-string", Must, "a Frame with invalid UTF-8 in a string field is a decode failure: BAD_REQUEST with id 0", |cx| {
            let mut p = cx.probe("A").await?;
            let pt = [field_varint(1, 5), field_bytes(4, &field_bytes(1, &[0xc3, 0x28]))].concat();
            p.send_plaintext(&pt, "Frame { id: 5, Ping { id: <bytes c3 28> } }").await;
            expect_error_frame(&mut p, ErrorCode::BadRequest, 0).await
        }),
        case!("1/unknown-fields-ignored", Must, "unknown fields inside a known request are ignored and the request is served", |cx| {
            let mut p = cx.probe("A").await?;
            let mut inner = proto::Register::encode_to_vec(&crate::conformance::probe::registration(1, 1));
            inner.extend(field_varint(99, 1));
            inner.extend(field_bytes(100, b"future"));
            let pt = [field_varint(1, 3), field_bytes(16, &inner), field_bytes(15, b"frame-level")].concat();
            p.send_plaintext(&pt, "Frame { id: 3, Register { device 1, +unknown fields 99, 100 }, +unknown field 15 }").await;
            let f = p.answer_to(3).await?;
            match f.body {
                Some(Body::Registered(_)) => {
                    p.cleanup.lock().push((p.identity.clone(), 1));
                    Ok(Outcome::pass())
                }
                _ => Err(Outcome::fail(format!("expected Registered, got {}", describe(&f)))),
            }
        }),
        case!("1/non-canonical-frame", Must, "a request with its fields out of order is served", |cx| {
            let mut p = cx.probe("A").await?;
            let body = field_bytes(21, &field_varint(1, 1));
            let pt = [body, field_varint(1, 4)].concat();
            p.send_plaintext(&pt, "Frame { GetPreKeyCount { device_id: 1 }, id: 4 } (id after the body)").await;
            let f = p.answer_to(4).await?;
            match error_of(&f) {
                Some((c, 4)) if c == ErrorCode::NotRegistered as i32 => Ok(Outcome::pass()),
                _ => Err(Outcome::fail(format!("expected NOT_REGISTERED for frame 4, got {}", describe(&f)))),
            }
        }),
        // --- §3 framing in the session -------------------------------------------------------
        case!("3/session-frame-over-limit", Must, "a length above Welcome.max_frame_len closes the session without reading the body or replying", |cx| {
            let mut p = cx.probe("A").await?;
            let len = p.max_frame_len().saturating_add(1);
            p.send_wire(&len.to_be_bytes(), format!("length {len}, no body")).await;
            let wait = p.wait;
            p.expect_silent_close(wait).await
        }),
        case!("3/session-zero-length", Must, "a zero-length frame in the session closes it without a reply", |cx| {
            let mut p = cx.probe("A").await?;
            p.send_wire(&[0, 0, 0, 0], "length 0").await;
            let wait = p.wait;
            p.expect_silent_close(wait).await
        }),
        case!("3/session-frame-at-limit", Must, "a frame body of exactly max_frame_len bytes is accepted", |cx| {
            let mut p = cx.probe("A").await?;
            let max = p.max_frame_len() as usize;
            let head = field_varint(1, 6);
            let pt = [head.clone(), padding_field(15, max - 16 - head.len())].concat();
            if pt.len() + 16 != max {
                return Err(Outcome::fail("suite could not build the frame"));
            }
            p.send_plaintext(&pt, format!("Frame {{ id: 6, +{} bytes of unknown field, no body }} ({max}-byte body)", pt.len() - 2)).await;
            expect_error_frame(&mut p, ErrorCode::Unsupported, 6).await
        }),
        case!("3/session-truncated", Must, "a frame cut short by the end of the stream closes the session without a reply", |cx| {
            let mut p = cx.probe("A").await?;
            let wire = p.seal(&Frame::new(1, ping("x")).encode_to_vec());
            p.send_wire(&wire[..wire.len() - 5], "a frame without its last 5 bytes, then end of stream").await;
            let _ = p.shutdown_write().await;
            let wait = p.wait;
            p.expect_silent_close(wait).await
        }),
        case!("3/answers-within-limit", Must, "the largest answers (bundles of every device with max_key_len keys) fit in max_frame_len", |cx| {
            let mut p = cx.probe("A").await?;
            let devices = cx.limit("max_devices_per_identity", 16) as u32;
            let key_len = cx.limit("max_key_len", 256) as usize;
            for d in 1..=devices {
                let mut r = crate::conformance::probe::registration(d, 1);
                r.identity_key = Bytes::from(vec![1; key_len]);
                if let Some(s) = r.signed_prekey.as_mut() {
                    s.public_key = Bytes::from(vec![2; key_len]);
                    s.signature = Bytes::from(vec![3; key_len]);
                }
                r.one_time_prekeys[0].public_key = Bytes::from(vec![4; key_len]);
                p.setup(Body::Register(r), "Register").await?;
                p.cleanup.lock().push((p.identity.clone(), d));
            }
            let me = p.key();
            let bundles = p.fetch(&me, vec![]).await?;
            if bundles.len() != devices as usize {
                return Err(Outcome::fail(format!("{} bundles for {devices} devices", bundles.len())));
            }
            if p.largest_in > p.max_frame_len() as usize {
                return Err(Outcome::fail(format!("a {}-byte frame exceeds max_frame_len {}", p.largest_in, p.max_frame_len())));
            }
            Ok(Outcome::pass_with(format!("largest frame {} bytes", p.largest_in)))
        }),
        // --- §6 encrypted frames ---------------------------------------------------------------
        case!("6.1/empty-plaintext", Must, "an empty plaintext is a Frame with id 0 and no body: UNSUPPORTED with id 0", |cx| {
            let mut p = cx.probe("A").await?;
            p.send_plaintext(&[], "empty plaintext (16-byte body: the tag)").await;
            expect_error_frame(&mut p, ErrorCode::Unsupported, 0).await
        }),
        case!("6.2/bad-tag", Must, "a frame whose tag has one bit flipped closes the session without a reply", |cx| {
            let mut p = cx.probe("A").await?;
            let mut wire = p.seal(&Frame::new(1, ping("x")).encode_to_vec()).to_vec();
            let last = wire.len() - 1;
            wire[last] ^= 1;
            p.send_wire(&wire, "Frame { id: 1, Ping } with the last tag bit flipped").await;
            let wait = p.wait;
            p.expect_silent_close(wait).await
        }),
        case!("6.2/bad-ciphertext", Must, "a frame with one ciphertext bit flipped fails its tag and closes without a reply", |cx| {
            let mut p = cx.probe("A").await?;
            let mut wire = p.seal(&Frame::new(1, ping("x")).encode_to_vec()).to_vec();
            wire[4] ^= 0x80;
            p.send_wire(&wire, "Frame { id: 1, Ping } with the first ciphertext bit flipped").await;
            let wait = p.wait;
            p.expect_silent_close(wait).await
        }),
        case!("6.2/short-body", Must, "a frame body of 15 bytes closes the session without a reply", |cx| {
            let mut p = cx.probe("A").await?;
            let mut wire = 15u32.to_be_bytes().to_vec();
            wire.extend_from_slice(&[0x55; 15]);
            p.send_wire(&wire, "a 15-byte body").await;
            let wait = p.wait;
            p.expect_silent_close(wait).await
        }),
        case!("6.2/replayed-frame", Must, "a frame sent twice fails its tag the second time and closes without a reply", |cx| {
            let mut p = cx.probe("A").await?;
            let frame = Frame::new(1, Body::GetPreKeyCount(proto::GetPreKeyCount { device_id: 1 }));
            let wire = p.seal(&frame.encode_to_vec());
            p.send_wire(&wire, describe(&frame)).await;
            let _ = p.answer_to(1).await?;
            p.send_wire(&wire, "the same wire frame again").await;
            let wait = p.wait;
            p.expect_silent_close(wait).await
        }),
        case!("6.2/reordered-frames", Must, "two frames sent in swapped order fail the tag check and close without a reply", |cx| {
            let mut p = cx.probe("A").await?;
            let a = p.seal(&Frame::new(1, Body::GetPreKeyCount(proto::GetPreKeyCount { device_id: 1 })).encode_to_vec());
            let b = p.seal(&Frame::new(2, Body::GetPreKeyCount(proto::GetPreKeyCount { device_id: 1 })).encode_to_vec());
            p.send_wire(&b, "frame sealed as seq 1").await;
            p.send_wire(&a, "frame sealed as seq 0").await;
            let wait = p.wait;
            p.expect_silent_close(wait).await
        }),
        case!("6.2/dropped-frame", Must, "a frame sealed for seq 1 sent as the first frame closes without a reply", |cx| {
            let mut p = cx.probe("A").await?;
            let _skipped = p.seal(&Frame::new(1, ping("x")).encode_to_vec());
            let b = p.seal(&Frame::new(2, Body::GetPreKeyCount(proto::GetPreKeyCount { device_id: 1 })).encode_to_vec());
            p.send_wire(&b, "frame sealed as seq 1 (seq 0 never sent)").await;
            let wait = p.wait;
            p.expect_silent_close(wait).await
        }),
        case!("6.3/rotation-i2r", Must, "the relay opens the node's frames 1024 and 1025 under rotated keys", |cx| {
            let mut p = cx.probe("A").await?;
            // 1100 Pongs, which are never answered, so only the node's direction rotates.
            for i in 0..1100u32 {
                let f = Frame::new(0, Body::Pong(Pong { id: format!("p{i}"), ping_id: "none".into() }));
                let wire = p.seal(&f.encode_to_vec());
                let what = if i % 100 == 0 { format!("unsolicited Pong seq {i}") } else { String::new() };
                if what.is_empty() { p.send_wire_quiet(&wire).await } else { p.send_wire(&wire, what).await }
            }
            if let Err(e) = p.quiet_for(cx.quiet()).await {
                return Err(Outcome::fail(format!("a Pong was answered or the session ended: {e:?}")));
            }
            still_serving(&mut p).await
        }),
        case!("6.3/rotation-r2i", Must, "the relay seals its frames from seq 1024 on under rotated keys", |cx| {
            let mut p = cx.probe("A").await?;
            many_unsupported(&mut p, 1100).await?;
            Ok(Outcome::pass_with(format!("{} frames opened", p.frames_in)))
        }),
        case!("6.3/second-rotation", Must, "keys rotate again after seq 2047 and seq keeps counting", |cx| {
            let mut p = cx.probe("A").await?;
            many_unsupported(&mut p, 2100).await?;
            Ok(Outcome::pass_with(format!("{} frames opened", p.frames_in)))
        }),
        // --- §7.1 the frame table --------------------------------------------------------------
        case!("7.1/undecodable-plaintext", Must, "a plaintext that is not a Frame gets BAD_REQUEST with id 0 and the session continues", |cx| {
            let mut p = cx.probe("A").await?;
            p.send_plaintext(&[0x0f, 0xff, 0xff], "bytes 0f ff ff (field 1 with wire type 7)").await;
            expect_error_frame(&mut p, ErrorCode::BadRequest, 0).await
        }),
        case!("7.1/no-body", Must, "a Frame without a body gets UNSUPPORTED with its id", |cx| {
            let mut p = cx.probe("A").await?;
            p.send_frame(&Frame { id: 41, body: None }).await;
            expect_error_frame(&mut p, ErrorCode::Unsupported, 41).await
        }),
        case!("7.1/unknown-body", Must, "a Frame whose body field number is unknown gets UNSUPPORTED with its id", |cx| {
            let mut p = cx.probe("A").await?;
            let pt = [field_varint(1, 42), field_bytes(200, &field_varint(1, 1))].concat();
            p.send_plaintext(&pt, "Frame { id: 42, <field 200> }").await;
            expect_error_frame(&mut p, ErrorCode::Unsupported, 42).await
        }),
        case!("7.1/two-bodies-last-wins", Must, "with two body fields the last on the wire is the body (Done, then GetPreKeyCount: served)", |cx| {
            let mut p = cx.probe("A").await?;
            let pt = [
                field_varint(1, 43),
                body_field(&Body::Done(proto::Done {})),
                body_field(&Body::GetPreKeyCount(proto::GetPreKeyCount { device_id: 1 })),
            ].concat();
            p.send_plaintext(&pt, "Frame { id: 43, Done, GetPreKeyCount { device_id: 1 } }").await;
            expect_error_frame(&mut p, ErrorCode::NotRegistered, 43).await
        }),
        case!("7.1/two-bodies-last-wins-reversed", Must, "with two body fields the last on the wire is the body (GetPreKeyCount, then Done: UNSUPPORTED)", |cx| {
            let mut p = cx.probe("A").await?;
            let pt = [
                field_varint(1, 44),
                body_field(&Body::GetPreKeyCount(proto::GetPreKeyCount { device_id: 1 })),
                body_field(&Body::Done(proto::Done {})),
            ].concat();
            p.send_plaintext(&pt, "Frame { id: 44, GetPreKeyCount { device_id: 1 }, Done }").await;
            expect_error_frame(&mut p, ErrorCode::Unsupported, 44).await
        }),
        case!("7.1/welcome-from-node", Must, "a Welcome sent by a node gets UNSUPPORTED with its id", |cx| {
            non_request(cx, Body::Welcome(proto::Welcome::default())).await
        }),
        case!("7.1/error-not-answered", Must, "an Error frame from the node is never answered", |cx| {
            let mut p = cx.probe("A").await?;
            p.send_frame(&Frame::error(9, ErrorCode::BadRequest, "conformance: not an answer to anything")).await;
            p.send_frame(&Frame::error(0, ErrorCode::Internal, "conformance")).await;
            match p.quiet_for(cx.quiet()).await {
                Ok(()) => still_serving(&mut p).await,
                Err(e) => Err(Outcome::fail(format!("the relay reacted: {e:?}"))),
            }
        }),
        case!("7.1/pong-not-answered", Must, "an unsolicited Pong (frame id 0 or not) is never answered", |cx| {
            let mut p = cx.probe("A").await?;
            p.send_frame(&Frame::new(0, Body::Pong(Pong { id: "a".into(), ping_id: "b".into() }))).await;
            p.send_frame(&Frame::new(77, Body::Pong(Pong { id: "c".into(), ping_id: "d".into() }))).await;
            match p.quiet_for(cx.quiet()).await {
                Ok(()) => still_serving(&mut p).await,
                Err(e) => Err(Outcome::fail(format!("the relay reacted: {e:?}"))),
            }
        }),
        // --- §7.2 Welcome ----------------------------------------------------------------------
        case!("7.2/welcome-first", Must, "the first encrypted frame is Welcome with frame id 0", |cx| {
            let mut raw = cx.raw("A").await?;
            let h = botd_protocol::keys::KeyPair::generate();
            let eph = botd_protocol::keys::KeyPair::generate();
            let parts = crate::conformance::wire::InitParts::new(&h, &eph, &cx.t.key);
            let body = parts.encode();
            raw.send_init(&body).await?;
            let p = raw.finish(&cx.t, std::sync::Arc::new(h), &eph, &parts, &body).await?;
            let _ = p;
            // `finish` fails unless the first frame is a Welcome; its id is noted in the log.
            let lines = cx.log.lines();
            if lines.iter().any(|l| l.text.starts_with("Welcome came with frame id")) {
                return Err(Outcome::fail("Welcome did not carry frame id 0"));
            }
            Ok(Outcome::pass())
        }),
        case!("7.2/welcome-protocol", Must, "Welcome.protocol is \"botd/1\"", |cx| {
            let p = cx.probe("A").await?;
            if p.welcome.protocol == "botd/1" { Ok(Outcome::pass()) } else {
                Err(Outcome::fail(format!("protocol {:?}", p.welcome.protocol)))
            }
        }),
        case!("7.2/welcome-relay-pubkey", Must, "Welcome.relay_pubkey is the key the node dialled", |cx| {
            let p = cx.probe("A").await?;
            if p.welcome.relay_pubkey[..] == cx.t.key.as_bytes()[..] { Ok(Outcome::pass()) } else {
                Err(Outcome::fail(format!("relay_pubkey {}", hex::encode(&p.welcome.relay_pubkey))))
            }
        }),
        case!("7.2/welcome-frame-limits", Must, "max_frame_len ≥ 1024, max_payload_len + 4096 ≤ max_frame_len, and the largest PreKeyBundles (§3, exact size) fits", |cx| {
            let p = cx.probe("A").await?;
            let w = &p.welcome;
            if w.max_frame_len < 1024 {
                return Err(Outcome::fail(format!("max_frame_len {}", w.max_frame_len)));
            }
            if u64::from(w.max_payload_len) + 4096 > u64::from(w.max_frame_len) {
                return Err(Outcome::fail(format!("max_payload_len {} too close to max_frame_len {}", w.max_payload_len, w.max_frame_len)));
            }
            let devices = cx.limit("max_devices_per_identity", 16) as usize;
            let key_len = cx.limit("max_key_len", 256) as usize;
            let largest = botd_protocol::message::largest_bundles_frame_len(devices, key_len) + 16;
            if largest > w.max_frame_len as usize {
                return Err(Outcome::fail(format!("max_frame_len {} is below the largest answer of {largest} bytes ({devices} devices, {key_len}-byte keys)", w.max_frame_len)));
            }
            Ok(Outcome::pass())
        }),
        case!("7.2/welcome-timers", Must, "ping_interval_ms ≥ ping_min_interval_ms and idle_timeout_ms ≥ 2 × ping_min_interval_ms + 2000", |cx| {
            let p = cx.probe("A").await?;
            let w = &p.welcome;
            let pmi = w.ping_min_interval_ms;
            if w.ping_interval_ms < pmi {
                return Err(Outcome::fail(format!("ping_interval_ms {} below the ping rule {pmi}", w.ping_interval_ms)));
            }
            if w.idle_timeout_ms < 2 * pmi + 2000 {
                return Err(Outcome::fail(format!("idle_timeout_ms {} below 2 × {pmi} + 2000", w.idle_timeout_ms)));
            }
            Ok(Outcome::pass())
        }),
        case!("7.2/welcome-ping-min-interval", Must, "Welcome field 9 ping_min_interval_ms announces the ping window, at least 1000 (30000 unless a test setup)", |cx| {
            let p = cx.probe("A").await?;
            let v = p.welcome.ping_min_interval_ms;
            match v {
                30_000.. => Ok(Outcome::pass_with(format!("{v} ms"))),
                1_000.. => Ok(Outcome::pass_with(format!("{v} ms: below BOTD's 30 s, a test setup"))),
                _ => Err(Outcome::fail(format!("ping_min_interval_ms {v}, below 1000"))),
            }
        }),
        case!("7.2/welcome-server-time", Open, "Welcome.server_time_ms is Unix time in milliseconds (recorded against the suite's clock)", |cx| {
            let p = cx.probe("A").await?;
            let now = crate::conformance::unix_ms() as i64;
            let skew = p.welcome.server_time_ms as i64 - now;
            if skew.abs() < 60_000 {
                Ok(Outcome::pass_with(format!("{skew} ms from the suite's clock")))
            } else {
                Ok(Outcome::info(format!("{skew} ms from the suite's clock ({})", crate::conformance::rfc3339_ms(p.welcome.server_time_ms))))
            }
        }),
        case!("7.2/welcome-server-version", Open, "Welcome.server_version is informational (recorded)", |cx| {
            let p = cx.probe("A").await?;
            Ok(Outcome::info(format!("server_version {:?}", p.welcome.server_version)))
        }),
        // --- §7.3 Ping and Pong ----------------------------------------------------------------
        case!("7.3/ping-answered", Must, "a Ping gets a Pong with the ping frame's id and ping_id = Ping.id", |cx| {
            let mut p = cx.probe("A").await?;
            p.send_frame(&Frame::new(12, ping("conformance-ping"))).await;
            let f = p.answer_to(12).await?;
            match f.body {
                Some(Body::Pong(pong)) if pong.ping_id == "conformance-ping" && proto::valid_id(&pong.id) => Ok(Outcome::pass()),
                _ => Err(Outcome::fail(format!("expected Pong {{ ping_id: \"conformance-ping\" }} with a valid id, got {}", describe(&f)))),
            }
        }),
        case!("7.3/pong-id-fresh", Should, "Pong.id is a fresh id of 32 lowercase hex characters", |cx| {
            let mut p = cx.probe("A").await?;
            p.send_frame(&Frame::new(1, ping("0123456789abcdef0123456789abcdef"))).await;
            let f = p.answer_to(1).await?;
            match f.body {
                Some(Body::Pong(pong)) => {
                    let hex32 = pong.id.len() == 32 && pong.id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
                    if hex32 && pong.id != pong.ping_id { Ok(Outcome::pass()) } else {
                        Ok(Outcome::non_strict(format!("Pong.id {:?}", pong.id)))
                    }
                }
                _ => Err(Outcome::fail(format!("expected a Pong, got {}", describe(&f)))),
            }
        }),
        case!("7.3/ping-flood", Must, "a second Ping within 30 s gets PING_FLOOD with its frame id, then the session is closed", |cx| {
            let mut p = cx.probe("A").await?;
            p.send_frame(&Frame::new(1, ping("first"))).await;
            p.answer_to(1).await?;
            p.send_frame(&Frame::new(2, ping("second"))).await;
            expect_error_then_close(&mut p, ErrorCode::PingFlood, 2).await
        }),
        case!("7.3/ping-flood-malformed-id", Must, "a malformed Ping within 30 s of an accepted one is a flood too (the 30-second rule is checked first)", |cx| {
            let mut p = cx.probe("A").await?;
            p.send_frame(&Frame::new(1, ping("first"))).await;
            p.answer_to(1).await?;
            p.send_frame(&Frame::new(2, ping(""))).await;
            expect_error_then_close(&mut p, ErrorCode::PingFlood, 2).await
        }),
        case!("7.3/malformed-ping-not-counted", Must, "a Ping with an empty id gets BAD_REQUEST with its frame id and is not counted", |cx| {
            let mut p = cx.probe("A").await?;
            p.send_frame(&Frame::new(1, ping(""))).await;
            let f = p.answer_to(1).await?;
            if error_of(&f) != Some((ErrorCode::BadRequest as i32, 1)) {
                return Err(Outcome::fail(format!("expected BAD_REQUEST, got {}", describe(&f))));
            }
            p.send_frame(&Frame::new(2, ping("valid"))).await;
            let f = p.answer_to(2).await?;
            match f.body {
                Some(Body::Pong(_)) => Ok(Outcome::pass()),
                _ => Err(Outcome::fail(format!("the malformed Ping was counted: {}", describe(&f)))),
            }
        }),
        case!("7.3/ping-id-65-bytes", Must, "a Ping id of 65 bytes gets BAD_REQUEST with the ping frame's id; the session continues", |cx| {
            let mut p = cx.probe("A").await?;
            p.send_frame(&Frame::new(3, ping(&"p".repeat(65)))).await;
            expect_error_frame(&mut p, ErrorCode::BadRequest, 3).await
        }),
        case!("7.3/ping-id-64-bytes", Must, "a Ping id of 64 bytes is answered", |cx| {
            let mut p = cx.probe("A").await?;
            let id = "q".repeat(64);
            p.send_frame(&Frame::new(3, ping(&id))).await;
            let f = p.answer_to(3).await?;
            match f.body {
                Some(Body::Pong(pong)) if pong.ping_id == id => Ok(Outcome::pass()),
                _ => Err(Outcome::fail(format!("expected a Pong, got {}", describe(&f)))),
            }
        }),
        case!("7.3/ping-frame-id-0", Must, "a Ping in a frame with id 0 is answered by a Pong in a frame with id 0", |cx| {
            let mut p = cx.probe("A").await?;
            p.send_frame(&Frame::new(0, ping("zero"))).await;
            let f = p.next_frame(cx.wait()).await?;
            match f.body {
                Some(Body::Pong(pong)) if f.id == 0 && pong.ping_id == "zero" => Ok(Outcome::pass()),
                _ => Err(Outcome::fail(format!("expected Frame {{ id: 0, Pong }}, got {}", describe(&f)))),
            }
        }),
        case!("7.3/ping-frame-id-0-counts", Must, "a Ping with frame id 0 counts for the 30-second rule", |cx| {
            let mut p = cx.probe("A").await?;
            p.send_frame(&Frame::new(0, ping("zero"))).await;
            let _ = p.next_frame(cx.wait()).await?;
            p.send_frame(&Frame::new(5, ping("again"))).await;
            expect_error_then_close(&mut p, ErrorCode::PingFlood, 5).await
        }),
        case!("7.3/ping-inside-window", Must, "a Ping half of ping_min_interval after the last accepted one is a flood: PING_FLOOD, then close", |cx| {
            let mut p = cx.probe("A").await?;
            let pmi = Duration::from_millis(p.welcome.ping_min_interval_ms);
            cx.timer_wait(pmi / 2, "half of ping_min_interval")?;
            p.send_frame(&Frame::new(1, ping("first"))).await;
            p.answer_to(1).await?;
            tokio::time::sleep(pmi / 2).await;
            p.send_frame(&Frame::new(2, ping("second"))).await;
            expect_error_then_close(&mut p, ErrorCode::PingFlood, 2).await
        }),
        case!("7.3/ping-after-interval", Must, "a Ping ping_min_interval + 1 s after the last accepted one is answered (the window announced is the one enforced)", |cx| {
            let mut p = cx.probe("A").await?;
            let pmi = Duration::from_millis(p.welcome.ping_min_interval_ms);
            cx.timer_wait(pmi + Duration::from_secs(1), "ping_min_interval")?;
            p.send_frame(&Frame::new(1, ping("first"))).await;
            p.answer_to(1).await?;
            tokio::time::sleep(pmi + Duration::from_secs(1)).await;
            p.send_frame(&Frame::new(2, ping("second"))).await;
            let f = p.answer_to(2).await?;
            match f.body {
                Some(Body::Pong(_)) => Ok(Outcome::pass()),
                _ => Err(Outcome::fail(format!("expected a Pong, got {}", describe(&f)))),
            }
        }),
        case!("7.3/probe-ping", Must, "a silent node is pinged (frame id 0, valid id) after ping_interval", |cx| {
            let mut p = cx.probe("A").await?;
            let interval = Duration::from_millis(p.welcome.ping_interval_ms);
            cx.timer_wait(interval + Duration::from_secs(10), "ping_interval")?;
            let started = Instant::now();
            p.answer_pings = false;
            let f = p.next_frame(interval + Duration::from_secs(10)).await?;
            match f.body {
                Some(Body::Ping(ref ping)) if f.id == 0 && proto::valid_id(&ping.id) => {
                    let after = started.elapsed();
                    if after + Duration::from_secs(1) < interval {
                        Err(Outcome::fail(format!("pinged after {after:?}, before ping_interval {interval:?}")))
                    } else {
                        Ok(Outcome::pass_with(format!("pinged after {after:?}")))
                    }
                }
                _ => Err(Outcome::fail(format!("expected the relay's Ping, got {}", describe(&f)))),
            }
        }),
        case!("7.3/pong-timeout", Must, "an unanswered probe ends with TIMEOUT (id 0) and a close", |cx| {
            let mut p = cx.probe("A").await?;
            p.answer_pings = false;
            let limit = Duration::from_millis(p.welcome.ping_interval_ms + cx.limit("pong_timeout_ms", 20_000) + 10_000);
            cx.timer_wait(limit, "ping_interval and pong_timeout")?;
            match p.until_closed(limit).await {
                Ok(frames) if frames.last().and_then(error_of) == Some((ErrorCode::Timeout as i32, 0)) => Ok(Outcome::pass()),
                Ok(frames) => Err(Outcome::fail(format!("closed without TIMEOUT: {:?}", frames.iter().map(describe).collect::<Vec<_>>()))),
                Err(_) => Err(Outcome::fail("the session stayed open")),
            }
        }),
        case!("7.3/wrong-pong-ignored", Must, "a Pong with another ping_id does not satisfy the probe: TIMEOUT", |cx| {
            let mut p = cx.probe("A").await?;
            p.answer_pings = false;
            let limit = Duration::from_millis(p.welcome.ping_interval_ms + cx.limit("pong_timeout_ms", 20_000) + 10_000);
            cx.timer_wait(limit, "ping_interval and pong_timeout")?;
            let deadline = Instant::now() + limit;
            for _ in 0..10 {
                match p.next_event(deadline.saturating_duration_since(Instant::now())).await {
                    Event::Frame(f) => match (&f.body, error_of(&f)) {
                        (Some(Body::Ping(_)), _) => {
                            p.send_frame(&Frame::new(f.id, Body::Pong(Pong { id: proto::random_id(), ping_id: "not-your-ping".into() }))).await;
                        }
                        (_, Some((c, 0))) if c == ErrorCode::Timeout as i32 => return Ok(Outcome::pass()),
                        _ => return Err(Outcome::fail(format!("unexpected {}", describe(&f)))),
                    },
                    Event::Timeout => return Err(Outcome::fail("the session stayed open")),
                    _ => return Err(Outcome::fail("closed without TIMEOUT")),
                }
            }
            Err(Outcome::fail("no TIMEOUT after several probes"))
        }),
        case!("7.3/idle-timeout", Must, "a node that sends only Pongs is closed with TIMEOUT after idle_timeout; the relay's probes keep ping_min_interval apart", |cx| {
            let mut p = cx.probe("A").await?;
            let idle = Duration::from_millis(p.welcome.idle_timeout_ms);
            let pmi = Duration::from_millis(p.welcome.ping_min_interval_ms);
            let slack = Duration::from_secs(10);
            cx.timer_wait(idle + slack, "idle_timeout")?;
            let started = Instant::now();
            match p.until_closed(idle + slack).await {
                Ok(frames) if frames.last().and_then(error_of) == Some((ErrorCode::Timeout as i32, 0)) => {
                    let after = started.elapsed();
                    let gaps: Vec<_> = p.relay_pings.windows(2).map(|w| w[1].0 - w[0].0).collect();
                    if gaps.iter().any(|g| *g + Duration::from_millis(50) < pmi) {
                        return Err(Outcome::fail(format!("the relay pinged twice within ping_min_interval ({pmi:?}): {gaps:?}")));
                    }
                    if after + Duration::from_secs(1) < idle {
                        return Err(Outcome::fail(format!("closed after {after:?}, before idle_timeout")));
                    }
                    Ok(Outcome::pass_with(format!("closed after {after:?}, {} probes", p.relay_pings.len())))
                }
                Ok(frames) => Err(Outcome::fail(format!("closed without TIMEOUT: {:?}", frames.iter().map(describe).collect::<Vec<_>>()))),
                Err(_) => Err(Outcome::fail("the session stayed open past idle_timeout")),
            }
        }),
        case!("7.3/idle-restarted-by-frames", Must, "an Error frame (never answered) restarts the idle clock: a node sending one every third of idle_timeout stays connected", |cx| {
            let mut p = cx.probe("A").await?;
            let idle = Duration::from_millis(p.welcome.idle_timeout_ms);
            cx.timer_wait(idle * 4 / 3 + Duration::from_secs(1), "idle_timeout")?;
            for i in 0..4 {
                p.send_frame(&Frame::error(0, ErrorCode::Internal, format!("conformance: keeping busy {i}"))).await;
                if let Err(e) = p.quiet_for(idle / 3).await {
                    return Err(Outcome::fail(format!("after {i} of 4 frames, a third of idle_timeout apart: {e:?}")));
                }
            }
            still_serving(&mut p).await
        }),
        case!("7.3/pong-restarts-probe-timer", Must, "any frame that passes its tag check, a Pong included, restarts the probe timer", |cx| {
            let mut p = cx.probe("A").await?;
            let interval = Duration::from_millis(p.welcome.ping_interval_ms);
            cx.timer_wait(interval * 2, "ping_interval")?;
            let step = interval / 2;
            for i in 0..4 {
                p.send_frame(&Frame::new(0, Body::Pong(Pong { id: format!("keep-{i}"), ping_id: "none".into() }))).await;
                if !p.relay_pings.is_empty() {
                    return Err(Outcome::fail("the relay probed although Pongs kept arriving"));
                }
                match p.quiet_for(step).await {
                    Ok(()) => {}
                    Err(Event::Frame(f)) if matches!(f.body, Some(Body::Ping(_))) => {
                        return Err(Outcome::fail("the relay probed although Pongs kept arriving"));
                    }
                    Err(e) => return Err(Outcome::fail(format!("unexpected: {e:?}"))),
                }
            }
            if p.relay_pings.is_empty() { Ok(Outcome::pass()) } else {
                Err(Outcome::fail("the relay probed although Pongs kept arriving"))
            }
        }),
        // --- §7.4 errors ---------------------------------------------------------------------
        case!("7.4/retry-after-zero", Must, "errors other than RATE_LIMITED carry retry_after_ms 0", |cx| {
            let mut p = cx.probe("A").await?;
            p.send_frame(&Frame::new(1, Body::Done(proto::Done {}))).await;
            let f = p.answer_to(1).await?;
            match f.body {
                Some(Body::Error(e)) if e.retry_after_ms == 0 => Ok(Outcome::pass()),
                Some(Body::Error(e)) => Err(Outcome::fail(format!("{} with retry_after_ms {}", code_name(e.code), e.retry_after_ms))),
                _ => Err(Outcome::fail(format!("expected an Error, got {}", describe(&f)))),
            }
        }),
        case!("7.4/error-message-utf8", Must, "Error.message is valid UTF-8 (a string field)", |cx| {
            // Decoding already enforced it: a relay whose message is not UTF-8 fails to decode.
            let mut p = cx.probe("A").await?;
            p.send_frame(&Frame { id: 1, body: None }).await;
            p.answer_to(1).await?;
            Ok(Outcome::pass())
        }),
    ]
    .into_iter()
    .chain(non_request_cases())
    .collect()
}

/// §7.1 / §8.1: every known body that is not a request.
fn non_request_cases() -> Vec<CaseDef> {
    vec![
        case!(
            "7.1/non-request-registered",
            Must,
            "Registered from a node gets UNSUPPORTED",
            |cx| { non_request(cx, Body::Registered(Default::default())).await }
        ),
        case!(
            "7.1/non-request-unregistered",
            Must,
            "Unregistered from a node gets UNSUPPORTED",
            |cx| { non_request(cx, Body::Unregistered(Default::default())).await }
        ),
        case!(
            "7.1/non-request-pre-key-count",
            Must,
            "PreKeyCount from a node gets UNSUPPORTED",
            |cx| { non_request(cx, Body::PreKeyCount(Default::default())).await }
        ),
        case!(
            "7.1/non-request-pre-key-bundles",
            Must,
            "PreKeyBundles from a node gets UNSUPPORTED",
            |cx| { non_request(cx, Body::PreKeyBundles(Default::default())).await }
        ),
        case!(
            "7.1/non-request-pre-keys-low",
            Must,
            "PreKeysLow from a node gets UNSUPPORTED",
            |cx| { non_request(cx, Body::PreKeysLow(Default::default())).await }
        ),
        case!(
            "7.1/non-request-sent",
            Must,
            "Sent from a node gets UNSUPPORTED",
            |cx| { non_request(cx, Body::Sent(Default::default())).await }
        ),
        case!(
            "7.1/non-request-subscribed",
            Must,
            "Subscribed from a node gets UNSUPPORTED",
            |cx| { non_request(cx, Body::Subscribed(Default::default())).await }
        ),
        case!(
            "7.1/non-request-deliver",
            Must,
            "Deliver from a node gets UNSUPPORTED",
            |cx| { non_request(cx, Body::Deliver(Default::default())).await }
        ),
        case!(
            "7.1/non-request-acked",
            Must,
            "Acked from a node gets UNSUPPORTED",
            |cx| { non_request(cx, Body::Acked(Default::default())).await }
        ),
        case!(
            "7.1/non-request-ticket",
            Must,
            "Ticket from a node gets UNSUPPORTED",
            |cx| { non_request(cx, Body::Ticket(Default::default())).await }
        ),
        case!(
            "7.1/non-request-done",
            Must,
            "Done from a node gets UNSUPPORTED",
            |cx| { non_request(cx, Body::Done(Default::default())).await }
        ),
        case!(
            "8.1/non-request-id-0",
            Must,
            "a non-request body with frame id 0 gets UNSUPPORTED with id 0",
            |cx| {
                let mut p = cx.probe("A").await?;
                p.send_frame(&Frame::new(0, Body::Sent(Default::default())))
                    .await;
                expect_error_frame(&mut p, ErrorCode::Unsupported, 0).await
            }
        ),
    ]
}
