//! §8.3: sending, its error checks and their order, idempotency, rate limits, policy, tickets
//! and quotas.

use bytes::Bytes;
use std::time::Duration;

use super::{case, CaseDef, Ctx};
use crate::conformance::probe::{code_name, Probe};
use crate::conformance::{Outcome, Step};
use botd_protocol::keys::{KeyPair, PublicKeyBytes};
use botd_protocol::proto::{self, Accept, Body, ErrorCode};

/// Two registered nodes, A and B.
async fn pair(cx: &Ctx) -> Step<(Probe, Probe)> {
    Ok((cx.node("A").await?, cx.node("B").await?))
}

/// A → B device 1 with `tamper` applied must fail with `code`.
async fn send_fails(
    cx: Ctx,
    code: ErrorCode,
    tamper: fn(&mut proto::Send, usize),
) -> Step<Outcome> {
    let (mut a, b) = pair(&cx).await?;
    let mut req = a.signed(&b.key(), 1, 1, &b"conformance"[..]);
    let max = a.max_payload_len();
    tamper(&mut req, max);
    a.expect_code(Body::Send(req), code).await
}

/// A → B device 1 with `tamper` applied must succeed.
async fn send_ok(cx: Ctx, tamper: fn(&mut proto::Send, usize)) -> Step<Outcome> {
    let (mut a, b) = pair(&cx).await?;
    let mut req = a.signed(&b.key(), 1, 1, &b"conformance"[..]);
    let max = a.max_payload_len();
    tamper(&mut req, max);
    a.send_req(req).await?;
    Ok(Outcome::pass())
}

pub(super) fn resign(req: &mut proto::Send, sender: &KeyPair) {
    let digest = botd_protocol::message::message_digest(
        sender.public().as_bytes(),
        &req.recipient,
        req.recipient_device,
        &req.sender_nonce,
        &req.payload_hash,
    );
    req.sender_signature = Bytes::copy_from_slice(&sender.sign(&digest));
}

fn big_payload(req: &mut proto::Send, len: usize) {
    req.payload = Bytes::from(vec![0x42; len]);
    req.payload_hash = Bytes::copy_from_slice(&botd_protocol::keys::sha256(&[&req.payload]));
}

async fn set_policy(p: &mut Probe, accept: Accept) -> Step<()> {
    p.setup(
        Body::SetPolicy(proto::SetPolicy {
            accept: accept as i32,
        }),
        "SetPolicy",
    )
    .await?;
    Ok(())
}

fn with_ticket(p: &Probe, to: &PublicKeyBytes, token: &Bytes) -> proto::Send {
    let mut req = p.signed(to, 1, 1, &b"first contact"[..]);
    req.ticket = token.clone();
    req
}

/// Sends A → B, pipelined, until `RATE_LIMITED`, at most `limit` times; returns (successes
/// before the first refusal, the error).
async fn exhaust(
    a: &mut Probe,
    to: &PublicKeyBytes,
    limit: u64,
) -> Step<(u64, crate::conformance::probe::ErrorAnswer)> {
    let mut ok = 0u64;
    let mut sent = 0u64;
    while sent < limit {
        let batch = (limit - sent).min(250);
        let bodies = (0..batch)
            .map(|_| Body::Send(a.signed(to, 1, 1, Bytes::new())))
            .collect();
        for r in a.pipeline(bodies).await? {
            match r {
                Ok(_) => ok += 1,
                Err(e) if e.code == ErrorCode::RateLimited as i32 => return Ok((ok, e)),
                Err(e) => return Err(Outcome::fail(format!("send {ok} failed with {}", e.name()))),
            }
        }
        sent += batch;
    }
    Err(Outcome::fail(format!(
        "no RATE_LIMITED after {limit} sends"
    )))
}

/// Empties the pair bucket A → B with one pipeline and appends five sends changed by `f`;
/// returns the errors of those five (a success fails the case).
async fn exhausted_then(
    a: &mut Probe,
    to: &PublicKeyBytes,
    burst: u64,
    f: fn(&mut proto::Send),
) -> Step<Vec<crate::conformance::probe::ErrorAnswer>> {
    let mut bodies: Vec<Body> = (0..burst + 100)
        .map(|_| Body::Send(a.signed(to, 1, 1, Bytes::new())))
        .collect();
    for _ in 0..5 {
        let mut r = a.signed(to, 1, 1, Bytes::new());
        f(&mut r);
        bodies.push(Body::Send(r));
    }
    let answers = a.pipeline(bodies).await?;
    let (head, tail) = answers.split_at(answers.len() - 5);
    if !head
        .iter()
        .any(|r| matches!(r, Err(e) if e.code == ErrorCode::RateLimited as i32))
    {
        return Err(Outcome::fail(format!(
            "{} sends in a row never got RATE_LIMITED",
            head.len()
        )));
    }
    tail.iter()
        .map(|r| match r {
            Err(e) => Ok(e.clone()),
            Ok(_) => Err(Outcome::fail("a changed send was accepted")),
        })
        .collect()
}

pub(super) fn cases() -> Vec<CaseDef> {
    vec![
        case!("8.3/send-ok", Must, "a correct Send is answered Sent { message_id ≥ 1, duplicate: false }", |cx| {
            let (mut a, b) = pair(&cx).await?;
            let sent = a.send_msg(&b.key(), 1, &b"hello"[..]).await?;
            if sent.message_id >= 1 && !sent.duplicate { Ok(Outcome::pass()) } else {
                Err(Outcome::fail(format!("{sent:?}")))
            }
        }),
        case!("8.3/payload-too-large", Must, "a payload of max_payload_len + 1 bytes gets PAYLOAD_TOO_LARGE", |cx| {
            send_fails(cx, ErrorCode::PayloadTooLarge, |r, max| big_payload(r, max + 1)).await
        }),
        case!("8.3/payload-at-limit", Must, "a payload of exactly max_payload_len bytes is stored", |cx| {
            let (mut a, b) = pair(&cx).await?;
            let mut req = a.signed(&b.key(), 1, 1, Bytes::new());
            big_payload(&mut req, a.max_payload_len());
            resign(&mut req, &a.identity);
            a.send_req(req).await?;
            Ok(Outcome::pass())
        }),
        case!("8.3/empty-payload", Must, "an empty payload is stored", |cx| {
            let (mut a, b) = pair(&cx).await?;
            let req = a.signed(&b.key(), 1, 1, Bytes::new());
            a.send_req(req).await?;
            Ok(Outcome::pass())
        }),
        case!("8.3/recipient-32-bytes", Must, "a 32-byte recipient gets BAD_REQUEST", |cx| {
            send_fails(cx, ErrorCode::BadRequest, |r, _| r.recipient = r.recipient.slice(..32)).await
        }),
        case!("8.3/recipient-34-bytes", Must, "a 34-byte recipient gets BAD_REQUEST", |cx| {
            send_fails(cx, ErrorCode::BadRequest, |r, _| r.recipient = [&r.recipient[..], &[0][..]].concat().into()).await
        }),
        case!("8.3/recipient-device-0", Must, "recipient_device 0 gets BAD_REQUEST", |cx| {
            send_fails(cx, ErrorCode::BadRequest, |r, _| r.recipient_device = 0).await
        }),
        case!("8.3/nonce-7-bytes", Must, "a 7-byte sender_nonce gets BAD_REQUEST", |cx| {
            send_fails(cx, ErrorCode::BadRequest, |r, _| r.sender_nonce = r.sender_nonce.slice(..7)).await
        }),
        case!("8.3/nonce-9-bytes", Must, "a 9-byte sender_nonce gets BAD_REQUEST", |cx| {
            send_fails(cx, ErrorCode::BadRequest, |r, _| r.sender_nonce = [&r.sender_nonce[..], &[9][..]].concat().into()).await
        }),
        case!("8.3/signature-63-bytes", Must, "a 63-byte sender_signature gets BAD_REQUEST", |cx| {
            send_fails(cx, ErrorCode::BadRequest, |r, _| r.sender_signature = r.sender_signature.slice(..63)).await
        }),
        case!("8.3/payload-hash-31-bytes", Must, "a 31-byte payload_hash gets BAD_REQUEST", |cx| {
            send_fails(cx, ErrorCode::BadRequest, |r, _| r.payload_hash = r.payload_hash.slice(..31)).await
        }),
        case!("8.3/payload-hash-mismatch", Must, "a payload_hash that is not SHA-256(payload) gets BAD_REQUEST", |cx| {
            send_fails(cx, ErrorCode::BadRequest, |r, _| r.payload_hash = Bytes::from(vec![0u8; 32])).await
        }),
        case!("8.3/ticket-15-bytes", Must, "a 15-byte ticket gets TICKET_INVALID even for an open recipient", |cx| {
            send_fails(cx, ErrorCode::TicketInvalid, |r, _| r.ticket = Bytes::from(vec![1u8; 15])).await
        }),
        case!("8.3/ticket-ignored-when-open", Must, "a 16-byte ticket to an open recipient is ignored", |cx| {
            send_ok(cx, |r, _| r.ticket = Bytes::from(vec![7u8; 16])).await
        }),
        case!("8.3/sender-device-not-registered", Must, "a sender_device that is not registered gets NOT_REGISTERED", |cx| {
            send_fails(cx, ErrorCode::NotRegistered, |r, _| r.sender_device = 9).await
        }),
        case!("8.3/unknown-recipient", Must, "a recipient with no registered device gets UNKNOWN_RECIPIENT", |cx| {
            let mut a = cx.node("A").await?;
            let stranger = *KeyPair::generate().public();
            let req = a.signed(&stranger, 1, 1, Bytes::new());
            a.expect_code(Body::Send(req), ErrorCode::UnknownRecipient).await
        }),
        case!("8.3/unknown-recipient-device", Must, "a recipient device that is not registered gets UNKNOWN_RECIPIENT", |cx| {
            let (mut a, b) = pair(&cx).await?;
            let req = a.signed(&b.key(), 2, 1, Bytes::new());
            a.expect_code(Body::Send(req), ErrorCode::UnknownRecipient).await
        }),
        case!("8.3/send-to-self", Must, "a node may send to its own identity", |cx| {
            let mut a = cx.node("A").await?;
            let me = a.key();
            a.send_msg(&me, 1, &b"note to self"[..]).await?;
            Ok(Outcome::pass())
        }),
        case!("8.3/signature-not-checked-by-default", Open, "a Send with a wrong (64-byte) signature: stored unless verify_message_signatures is on (recorded)", |cx| {
            let (mut a, b) = pair(&cx).await?;
            let mut req = a.signed(&b.key(), 1, 1, &b"x"[..]);
            req.sender_signature = Bytes::from(vec![0x11; 64]);
            match a.call(Body::Send(req)).await? {
                Ok(_) => Ok(Outcome::info("stored: the relay does not verify message signatures")),
                Err(e) if e.code == ErrorCode::BadRequest as i32 => Ok(Outcome::info("BAD_REQUEST: the relay verifies message signatures")),
                Err(e) => Err(Outcome::fail(format!("unexpected {}", e.name()))),
            }
        }),
        case!("8.3/idempotent-resend", Must, "resending the same Send returns the first message id with duplicate: true", |cx| {
            let (mut a, b) = pair(&cx).await?;
            let req = a.signed(&b.key(), 1, 1, &b"once"[..]);
            let first = a.send_req(req.clone()).await?;
            let again = a.send_req(req).await?;
            if again.message_id == first.message_id && again.duplicate && !first.duplicate { Ok(Outcome::pass()) } else {
                Err(Outcome::fail(format!("first {first:?}, resend {again:?}")))
            }
        }),
        case!("8.3/resend-ignores-other-fields", Must, "a resend with the same nonce but another payload is still a duplicate", |cx| {
            let (mut a, b) = pair(&cx).await?;
            let req = a.signed(&b.key(), 1, 1, &b"original"[..]);
            let first = a.send_req(req.clone()).await?;
            let mut changed = a.signed(&b.key(), 1, 1, &b"changed payload"[..]);
            changed.sender_nonce = req.sender_nonce.clone();
            resign(&mut changed, &a.identity);
            let again = a.send_req(changed).await?;
            if again.message_id == first.message_id && again.duplicate { Ok(Outcome::pass()) } else {
                Err(Outcome::fail(format!("first {first:?}, resend {again:?}")))
            }
        }),
        case!("8.3/nonce-reusable-after-ack", Must, "once the message is acknowledged, its nonce stores a new message", |cx| {
            let (mut a, mut b) = pair(&cx).await?;
            let req = a.signed(&b.key(), 1, 1, &b"one"[..]);
            let first = a.send_req(req.clone()).await?;
            b.ack(1, vec![first.message_id]).await?;
            let again = a.send_req(req).await?;
            if !again.duplicate && again.message_id > first.message_id { Ok(Outcome::pass()) } else {
                Err(Outcome::fail(format!("first {first:?}, after ack {again:?}")))
            }
        }),
        case!("8.3/nonce-per-mailbox", Must, "the same nonce towards two mailboxes stores two messages", |cx| {
            let (mut a, b) = pair(&cx).await?;
            let c = cx.node("C").await?;
            let r1 = a.signed(&b.key(), 1, 1, &b"n"[..]);
            let mut r2 = a.signed(&c.key(), 1, 1, &b"n"[..]);
            r2.sender_nonce = r1.sender_nonce.clone();
            resign(&mut r2, &a.identity);
            let (s1, s2) = (a.send_req(r1).await?, a.send_req(r2).await?);
            if !s1.duplicate && !s2.duplicate { Ok(Outcome::pass()) } else {
                Err(Outcome::fail(format!("{s1:?} {s2:?}")))
            }
        }),
        // --- order of the checks -------------------------------------------------------------
        case!("8.3/order-too-large-before-bad-request", Must, "check 1 before 2: too large and a 32-byte recipient gives PAYLOAD_TOO_LARGE", |cx| {
            send_fails(cx, ErrorCode::PayloadTooLarge, |r, max| { big_payload(r, max + 1); r.recipient = r.recipient.slice(..32); }).await
        }),
        case!("8.3/order-bad-request-before-ticket", Must, "check 2 before 3: recipient_device 0 and a 15-byte ticket gives BAD_REQUEST", |cx| {
            send_fails(cx, ErrorCode::BadRequest, |r, _| { r.recipient_device = 0; r.ticket = Bytes::from(vec![1; 15]); }).await
        }),
        case!("8.3/order-hash-length-before-ticket", Must, "check 2 before 3: a 31-byte payload_hash and a 15-byte ticket gives BAD_REQUEST", |cx| {
            send_fails(cx, ErrorCode::BadRequest, |r, _| { r.payload_hash = r.payload_hash.slice(..31); r.ticket = Bytes::from(vec![1; 15]); }).await
        }),
        case!("8.3/order-ticket-before-hash-mismatch", Must, "check 3 before 4: a 15-byte ticket and a wrong 32-byte hash gives TICKET_INVALID", |cx| {
            send_fails(cx, ErrorCode::TicketInvalid, |r, _| { r.payload_hash = Bytes::from(vec![0; 32]); r.ticket = Bytes::from(vec![1; 15]); }).await
        }),
        case!("8.3/order-hash-before-not-registered", Must, "check 4 before 7: a wrong hash from an unregistered sender device gives BAD_REQUEST", |cx| {
            send_fails(cx, ErrorCode::BadRequest, |r, _| { r.payload_hash = Bytes::from(vec![0; 32]); r.sender_device = 9; }).await
        }),
        case!("8.3/order-not-registered-before-unknown-recipient", Must, "check 7 before 9: an unregistered sender device to an unknown recipient gives NOT_REGISTERED", |cx| {
            let mut a = cx.node("A").await?;
            let mut req = a.signed(KeyPair::generate().public(), 1, 1, Bytes::new());
            req.sender_device = 9;
            a.expect_code(Body::Send(req), ErrorCode::NotRegistered).await
        }),
        case!("8.3/order-unknown-recipient-before-forbidden", Must, "check 9 before 11: an unregistered device of a contacts-only identity gives UNKNOWN_RECIPIENT", |cx| {
            let (mut a, mut b) = pair(&cx).await?;
            set_policy(&mut b, Accept::ContactsOnly).await?;
            let req = a.signed(&b.key(), 2, 1, Bytes::new());
            a.expect_code(Body::Send(req), ErrorCode::UnknownRecipient).await
        }),
        case!("8.3/order-duplicate-before-policy", Must, "check 10 before 11: a resend after the recipient turned contacts-only is still a duplicate", |cx| {
            let (mut a, mut b) = pair(&cx).await?;
            let req = a.signed(&b.key(), 1, 1, &b"before"[..]);
            let first = a.send_req(req.clone()).await?;
            set_policy(&mut b, Accept::ContactsOnly).await?;
            let again = a.send_req(req).await?;
            if again.duplicate && again.message_id == first.message_id { Ok(Outcome::pass()) } else {
                Err(Outcome::fail(format!("{again:?}")))
            }
        }),
        case!("8.3/order-bad-request-before-rate-limit", Must, "checks 1–4 before 5: with an empty bucket a wrong hash still gives BAD_REQUEST", |cx| {
            let (mut a, b) = pair(&cx).await?;
            let burst = cx.limit("send_burst_per_pair", 200);
            let tail = exhausted_then(&mut a, &b.key(), burst, |r| r.payload_hash = Bytes::from(vec![0; 32])).await?;
            match tail.iter().find(|e| e.code != ErrorCode::BadRequest as i32) {
                None => Ok(Outcome::pass()),
                Some(e) => Err(Outcome::fail(format!("a wrong hash on an empty bucket got {}", e.name()))),
            }
        }),
        case!("8.3/order-rate-limit-before-not-registered", Must, "check 6 before 7: with an empty pair bucket an unregistered sender device gets RATE_LIMITED", |cx| {
            let (mut a, b) = pair(&cx).await?;
            let burst = cx.limit("send_burst_per_pair", 200);
            let tail = exhausted_then(&mut a, &b.key(), burst, |r| r.sender_device = 9).await?;
            if tail.iter().any(|e| e.code == ErrorCode::RateLimited as i32) { Ok(Outcome::pass()) } else {
                Err(Outcome::fail(format!("on an empty bucket: {:?}", tail.iter().map(|e| e.name()).collect::<Vec<_>>())))
            }
        }),
        // --- rate limits -------------------------------------------------------------------
        case!("8.3/pair-rate-limit", Must, "the (sender, recipient) bucket refuses with RATE_LIMITED and retry_after_ms ≥ 1 after its burst", |cx| {
            let (mut a, b) = pair(&cx).await?;
            let burst = cx.limit("send_burst_per_pair", 200);
            let (n, e) = exhaust(&mut a, &b.key(), burst + 200).await?;
            if n < burst {
                return Err(Outcome::fail(format!("refused after {n} sends, below the burst of {burst} (set --assume send_burst_per_pair)")));
            }
            if e.retry_after_ms < 1 {
                return Err(Outcome::fail("retry_after_ms is 0"));
            }
            Ok(Outcome::pass_with(format!("refused after {n} sends, retry_after_ms {}", e.retry_after_ms)))
        }),
        case!("8.3/retry-after-honoured", Must, "a Send retried after retry_after_ms succeeds", |cx| {
            let (mut a, b) = pair(&cx).await?;
            let burst = cx.limit("send_burst_per_pair", 200);
            let (_, e) = exhaust(&mut a, &b.key(), burst + 200).await?;
            tokio::time::sleep(Duration::from_millis(e.retry_after_ms.clamp(1, 5000) + 20)).await;
            let req = a.signed(&b.key(), 1, 1, Bytes::new());
            match a.call(Body::Send(req)).await? {
                Ok(_) => Ok(Outcome::pass()),
                Err(e) => Err(Outcome::fail(format!("after waiting retry_after_ms: {}", e.name()))),
            }
        }),
        case!("8.3/sender-rate-limit", Must, "the sender's bucket refuses with RATE_LIMITED across recipients", |cx| {
            let burst = cx.limit("send_burst_per_identity", 1000);
            let pair_burst = cx.limit("send_burst_per_pair", 200);
            let recipients = (burst * 4 / (pair_burst * 3 / 4).max(1)).clamp(2, 60);
            let mut keys = Vec::new();
            for i in 0..recipients {
                keys.push(cx.node(&format!("R{i}")).await?.key());
            }
            for attempt in 0..2 {
                let mut a = cx.node(&format!("A{attempt}")).await?;
                let mut counts = vec![0u64; keys.len()];
                let mut n = 0u64;
                let mut refused = None;
                'sending: while n < burst * 4 {
                    let batch: Vec<usize> = (0..250u64).map(|k| ((n + k) as usize) % keys.len()).collect();
                    let bodies = batch.iter().map(|i| Body::Send(a.signed(&keys[*i], 1, 1, Bytes::new()))).collect();
                    for (r, i) in a.pipeline(bodies).await?.into_iter().zip(batch) {
                        match r {
                            Ok(_) => counts[i] += 1,
                            Err(e) if e.code == ErrorCode::RateLimited as i32 => {
                                if counts[i] + 10 >= pair_burst {
                                    return Err(Outcome::fail("the pair bucket refused first; cannot tell the sender bucket"));
                                }
                                refused = Some(n);
                                break 'sending;
                            }
                            Err(e) => return Err(Outcome::fail(format!("send {n}: {}", e.name()))),
                        }
                        n += 1;
                    }
                }
                match refused {
                    None => return Err(Outcome::fail(format!("{n} sends from one identity and the sender bucket never refused"))),
                    // The address's bucket (shared with other sessions of this address, e.g.
                    // an earlier run) may have refused first: once more when it is full.
                    Some(n) if n < burst && attempt == 0 => {
                        let (ip_burst, ip_rate) = cx.bucket(("send_burst_per_ip", 5000), ("send_rate_per_ip", 1000));
                        let wait = Duration::from_secs((ip_burst / ip_rate.max(1)).clamp(1, 15));
                        cx.note(format!("refused below the burst: waiting {wait:?} for the address's bucket to refill, then once more"));
                        tokio::time::sleep(wait).await;
                    }
                    Some(n) if n < burst => return Err(Outcome::fail(format!("refused after {n} sends, below the burst of {burst}"))),
                    Some(n) => return Ok(Outcome::pass_with(format!("refused after {n} sends over {} recipients", keys.len()))),
                }
            }
            Err(Outcome::fail("no attempt"))
        })
        .alone(super::Alone::First),
        case!("8.3/rate-limit-per-identity", Must, "buckets are keyed by identity, shared by all its sessions", |cx| {
            let (mut a, b) = pair(&cx).await?;
            let mut a2 = cx.probe_as("A2", a.identity.clone()).await?;
            let burst = cx.limit("send_burst_per_pair", 200);
            exhaust(&mut a, &b.key(), burst + 200).await?;
            let bodies = (0..20).map(|_| Body::Send(a2.signed(&b.key(), 1, 1, Bytes::new()))).collect();
            let answers = a2.pipeline(bodies).await?;
            if answers.iter().any(|r| matches!(r, Err(e) if e.code == ErrorCode::RateLimited as i32)) { Ok(Outcome::pass()) } else {
                Err(Outcome::fail("another session of the same identity got a full bucket"))
            }
        }),
        // --- policy and tickets --------------------------------------------------------------
        case!("8.3/forbidden-without-ticket", Must, "a non-contact without ticket to a contacts-only identity gets FORBIDDEN", |cx| {
            let (mut a, mut b) = pair(&cx).await?;
            set_policy(&mut b, Accept::ContactsOnly).await?;
            let req = a.signed(&b.key(), 1, 1, Bytes::new());
            a.expect_code(Body::Send(req), ErrorCode::Forbidden).await
        }),
        case!("8.3/ticket-unknown", Must, "an unknown 16-byte ticket to a contacts-only identity gets TICKET_INVALID", |cx| {
            let (mut a, mut b) = pair(&cx).await?;
            set_policy(&mut b, Accept::ContactsOnly).await?;
            let req = with_ticket(&a, &b.key(), &Bytes::from(vec![9; 16]));
            a.expect_code(Body::Send(req), ErrorCode::TicketInvalid).await
        }),
        case!("8.3/ticket-admits", Must, "a valid ticket admits the first message and makes the sender a contact", |cx| {
            let (mut a, mut b) = pair(&cx).await?;
            set_policy(&mut b, Accept::ContactsOnly).await?;
            let t = b.create_ticket(0, 1).await?;
            a.send_req(with_ticket(&a, &b.key(), &t.token)).await?;
            let req = a.signed(&b.key(), 1, 1, &b"second, no ticket"[..]);
            match a.call(Body::Send(req)).await? {
                Ok(_) => Ok(Outcome::pass()),
                Err(e) => Err(Outcome::fail(format!("the sender did not become a contact: {}", e.name()))),
            }
        }),
        case!("8.3/ticket-used-up", Must, "a one-use ticket admits one stranger; the next gets TICKET_INVALID", |cx| {
            let (mut a, mut b) = pair(&cx).await?;
            let mut c = cx.node("C").await?;
            set_policy(&mut b, Accept::ContactsOnly).await?;
            let t = b.create_ticket(0, 1).await?;
            a.send_req(with_ticket(&a, &b.key(), &t.token)).await?;
            let req = with_ticket(&c, &b.key(), &t.token);
            c.expect_code(Body::Send(req), ErrorCode::TicketInvalid).await
        }),
        case!("8.3/ticket-other-identity", Must, "a ticket of another identity gets TICKET_INVALID", |cx| {
            let (mut a, mut b) = pair(&cx).await?;
            let mut c = cx.node("C").await?;
            set_policy(&mut b, Accept::ContactsOnly).await?;
            let t = c.create_ticket(0, 1).await?;
            let req = with_ticket(&a, &b.key(), &t.token);
            a.expect_code(Body::Send(req), ErrorCode::TicketInvalid).await
        }),
        case!("8.3/ticket-retry-not-used-again", Must, "resending a message admitted by a ticket does not use the ticket again", |cx| {
            let (mut a, mut b) = pair(&cx).await?;
            let mut c = cx.node("C").await?;
            set_policy(&mut b, Accept::ContactsOnly).await?;
            let t = b.create_ticket(0, 2).await?;
            let req = with_ticket(&a, &b.key(), &t.token);
            a.send_req(req.clone()).await?;
            a.send_req(req).await?;
            let req = with_ticket(&c, &b.key(), &t.token);
            match c.call(Body::Send(req)).await? {
                Ok(_) => Ok(Outcome::pass()),
                Err(e) => Err(Outcome::fail(format!("the second use was refused ({}): the resend used the ticket", e.name()))),
            }
        }),
        case!("8.3/ticket-not-used-when-open", Must, "a ticket sent to an open identity is not used up", |cx| {
            let (mut a, mut b) = pair(&cx).await?;
            let mut c = cx.node("C").await?;
            let t = b.create_ticket(0, 1).await?;
            a.send_req(with_ticket(&a, &b.key(), &t.token)).await?;
            set_policy(&mut b, Accept::ContactsOnly).await?;
            let req = with_ticket(&c, &b.key(), &t.token);
            match c.call(Body::Send(req)).await? {
                Ok(_) => Ok(Outcome::pass()),
                Err(e) => Err(Outcome::fail(format!("the ticket was used up while the policy was open ({})", e.name()))),
            }
        }),
        case!("8.3/self-send-contacts-only", Must, "a contacts-only identity may always send to itself", |cx| {
            let mut a = cx.node("A").await?;
            set_policy(&mut a, Accept::ContactsOnly).await?;
            let me = a.key();
            a.send_msg(&me, 1, Bytes::new()).await?;
            Ok(Outcome::pass())
        }),
        case!("8.3/contact-admitted", Must, "a contact may send to a contacts-only identity without ticket", |cx| {
            let (mut a, mut b) = pair(&cx).await?;
            set_policy(&mut b, Accept::ContactsOnly).await?;
            b.setup(Body::AddContact(proto::AddContact { identity: Bytes::copy_from_slice(a.key().as_bytes()) }), "AddContact").await?;
            a.send_msg(&b.key(), 1, Bytes::new()).await?;
            Ok(Outcome::pass())
        }),
        case!("8.3/removed-contact-forbidden", Must, "after RemoveContact the sender gets FORBIDDEN again", |cx| {
            let (mut a, mut b) = pair(&cx).await?;
            set_policy(&mut b, Accept::ContactsOnly).await?;
            let id = Bytes::copy_from_slice(a.key().as_bytes());
            b.setup(Body::AddContact(proto::AddContact { identity: id.clone() }), "AddContact").await?;
            b.setup(Body::RemoveContact(proto::RemoveContact { identity: id }), "RemoveContact").await?;
            let req = a.signed(&b.key(), 1, 1, Bytes::new());
            a.expect_code(Body::Send(req), ErrorCode::Forbidden).await
        }),
        // --- quotas ------------------------------------------------------------------------
        case!("8.3/mailbox-full-messages", Must, "at mailbox_max_messages messages a mailbox accepts nothing, not even an empty payload: MAILBOX_FULL", |cx| {
            let max = cx.need("mailbox_max_messages")?;
            if max > 2000 {
                return Ok(Outcome::skip("mailbox_max_messages above 2000 takes too long to fill"));
            }
            let (mut a, b) = pair(&cx).await?;
            let first = a.signed(&b.key(), 1, 1, Bytes::new());
            let stored = a.send_req(first.clone()).await?;
            for _ in 1..max {
                a.send_msg(&b.key(), 1, Bytes::new()).await?;
            }
            let req = a.signed(&b.key(), 1, 1, Bytes::new());
            a.expect_code(Body::Send(req), ErrorCode::MailboxFull).await?;
            // A resend is answered from what is stored, without the quotas (§8.3 check 10).
            let again = a.send_req(first).await.map_err(|o| Outcome::fail(format!("a resend to the full mailbox: {}", o.detail)))?;
            if again.duplicate && again.message_id == stored.message_id { Ok(Outcome::pass()) } else {
                Err(Outcome::fail(format!("a resend to the full mailbox: {again:?}, first {stored:?}")))
            }
        }),
        case!("8.3/mailbox-full-bytes", Must, "a mailbox holding exactly mailbox_max_bytes accepts an empty payload but no byte more", |cx| {
            let max = cx.need("mailbox_max_bytes")? as usize;
            let (mut a, b) = pair(&cx).await?;
            let chunk = a.max_payload_len().max(1);
            if max / chunk > 500 {
                return Ok(Outcome::skip("mailbox_max_bytes is too large to fill quickly"));
            }
            let mut left = max;
            while left > 0 {
                let n = left.min(chunk);
                a.send_msg(&b.key(), 1, Bytes::from(vec![0x33; n])).await?;
                left -= n;
            }
            a.send_msg(&b.key(), 1, Bytes::new()).await.map_err(|o| Outcome::fail(format!("an empty payload at exactly mailbox_max_bytes was refused: {}", o.detail)))?;
            let req = a.signed(&b.key(), 1, 1, &b"!"[..]);
            a.expect_code(Body::Send(req), ErrorCode::MailboxFull).await
        }),
        case!("8.3/contacts-full-ticket", Must, "a ticket use when the recipient's contact list is full gets MAILBOX_FULL", |cx| {
            let max = cx.need("max_contacts")?;
            if max > 2000 {
                return Ok(Outcome::skip("max_contacts above 2000 takes too long to fill"));
            }
            let (mut a, mut b) = pair(&cx).await?;
            for _ in 0..max {
                let id = Bytes::copy_from_slice(KeyPair::generate().public().as_bytes());
                b.setup(Body::AddContact(proto::AddContact { identity: id }), "AddContact").await?;
            }
            set_policy(&mut b, Accept::ContactsOnly).await?;
            let t = b.create_ticket(0, 1).await?;
            let req = with_ticket(&a, &b.key(), &t.token);
            a.expect_code(Body::Send(req), ErrorCode::MailboxFull).await
        }),
        case!("8.3/error-retry-after", Must, "RATE_LIMITED is the only error with retry_after_ms > 0 (checked on a Send error)", |cx| {
            let (mut a, b) = pair(&cx).await?;
            let mut req = a.signed(&b.key(), 1, 1, Bytes::new());
            req.recipient_device = 0;
            match a.call(Body::Send(req)).await? {
                Err(e) if e.retry_after_ms == 0 => Ok(Outcome::pass()),
                Err(e) => Err(Outcome::fail(format!("{} with retry_after_ms {}", code_name(e.code), e.retry_after_ms))),
                Ok(_) => Err(Outcome::fail("recipient_device 0 was accepted")),
            }
        }),
    ]
}
