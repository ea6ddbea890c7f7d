//! Rate limits and quotas (§8.1–§8.4): the buckets per identity, per source address and per
//! target device, the rule that a request that changes state is limited before any other check,
//! and `QUOTA_EXCEEDED`.
//!
//! Every session of the suite comes from one source address, so the per-address buckets are
//! shared by all running cases: cases that measure a bucket run alone before the others, and
//! cases that empty a per-address bucket run alone after them ([`Alone`]). A bucket refills
//! while a case empties it, so a case that sees no refusal judges only what it can prove: more
//! requests served than the burst plus the refill over the time taken is a FAIL; fewer is a
//! SKIP (the suite could not outpace the refill).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::{case, Alone, CaseDef, Ctx};
use crate::conformance::probe::{code_name, prekeys, registration, ErrorAnswer, Probe};
use crate::conformance::wire::describe;
use crate::conformance::{Outcome, Step};
use botd_protocol::keys::{sha256, KeyPair, PublicKeyBytes};
use botd_protocol::proto::{self, Body, ErrorCode, Frame};

/// Attempts at showing that a malformed request meets the empty bucket first (a token that
/// comes back between the fillers and the request would let one through).
const ATTEMPTS: usize = 6;
/// Fresh identities a per-address case may use, and its time.
const MAX_IDENTITIES: usize = 60;
const DRAIN_TIME: Duration = Duration::from_secs(30);

fn limited(r: &Result<Body, ErrorAnswer>) -> Option<&ErrorAnswer> {
    match r {
        Err(e) if e.code == ErrorCode::RateLimited as i32 => Some(e),
        _ => None,
    }
}

fn answer_name(r: &Result<Body, ErrorAnswer>) -> String {
    match r {
        Ok(b) => describe(&Frame::new(0, b.clone())),
        Err(e) => e.name(),
    }
}

/// What pipelining requests until the first `RATE_LIMITED` gave.
struct Run {
    /// Requests answered before the first refusal.
    served: u64,
    refusal: Option<ErrorAnswer>,
    elapsed: Duration,
}

/// Pipelines requests made by `make` in batches of `batch` until one is refused with
/// `RATE_LIMITED`, at most `max` requests and for at most `time`.
async fn until_refused(
    p: &mut Probe,
    max: u64,
    batch: u64,
    time: Duration,
    make: &mut (dyn FnMut(&Probe, u64) -> Body + Send),
) -> Step<Run> {
    let started = Instant::now();
    let mut served = 0u64;
    while served < max && started.elapsed() < time {
        let n = (max - served).min(batch.max(1));
        let bodies = (0..n).map(|k| make(p, served + k)).collect();
        for r in p.pipeline(bodies).await? {
            if let Some(e) = limited(&r) {
                return Ok(Run {
                    served,
                    refusal: Some(e.clone()),
                    elapsed: started.elapsed(),
                });
            }
            served += 1;
        }
    }
    Ok(Run {
        served,
        refusal: None,
        elapsed: started.elapsed(),
    })
}

/// No refusal came: a FAIL if more was served than the bucket can have held, else a SKIP.
fn no_refusal(run: &Run, bucket: (u64, u64), what: &str) -> Step<Outcome> {
    let (burst, rate) = bucket;
    let allowed = burst as f64 + rate as f64 * run.elapsed.as_secs_f64() + 1.0;
    if run.served as f64 > allowed {
        Err(Outcome::fail(format!(
            "{} {what} in {:?} without RATE_LIMITED: more than a burst of {burst} and {rate}/s allow",
            run.served, run.elapsed
        )))
    } else {
        Ok(Outcome::skip(format!(
            "{} {what} in {:?} did not outpace the bucket's refill ({rate}/s)",
            run.served, run.elapsed
        )))
    }
}

/// With the bucket empty, `malformed` must be refused with `RATE_LIMITED`, not with the code
/// its fault would get (§8.1: the limit comes before any other check). Correct requests go
/// first in the same pipeline, so that tokens that came back since the bucket was emptied go to
/// them: at least `fillers`, and more when an attempt shows that the bucket (refilling at
/// `rate` per second) gained more meanwhile.
async fn limited_first(
    p: &mut Probe,
    (fillers, rate): (usize, u64),
    filler: &Body,
    malformed: &Body,
    what: &str,
) -> Step<()> {
    let mut got = String::new();
    let mut fillers = fillers;
    for _ in 0..ATTEMPTS {
        let started = Instant::now();
        let mut bodies: Vec<Body> = (0..fillers).map(|_| filler.clone()).collect();
        bodies.push(malformed.clone());
        let answers = p.pipeline(bodies).await?;
        let refused = answers.iter().filter(|r| limited(r).is_some()).count();
        match answers.last() {
            Some(r) if limited(r).is_some() => return Ok(()),
            Some(r) => got = answer_name(r),
            None => got = "nothing".into(),
        }
        p.log.note(format!(
            "{what}: {got} after {fillers} correct requests ({refused} of them refused) in {:?}",
            started.elapsed()
        ));
        // Twice the tokens the bucket can have gained over one attempt.
        let gained = (rate as f64 * started.elapsed().as_secs_f64() * 2.0) as usize;
        fillers = fillers.max(gained + 10).min(2000);
    }
    Err(Outcome::fail(format!(
        "{what} on an empty bucket got {got} in {ATTEMPTS} attempts: the rate limit must be checked before anything else"
    )))
}

/// Waits until a per-address bucket has refilled (at most 15 s).
async fn refill(cx: &Ctx, bucket: (u64, u64)) {
    let wait = Duration::from_secs((bucket.0 / bucket.1.max(1)).clamp(1, 15));
    cx.note(format!(
        "refused below the burst: waiting {wait:?} for the address's bucket to refill, then once more"
    ));
    tokio::time::sleep(wait).await;
}

/// Fresh identities, each sending `per_identity` requests (below its own limits), until one is
/// refused with `RATE_LIMITED`: the per-address bucket.
async fn drain_address(
    cx: &Ctx,
    what: &str,
    per_identity: u64,
    address: (u64, u64),
    make: fn(&Probe, u64) -> Body,
) -> Step<Outcome> {
    let started = Instant::now();
    let mut total = 0u64;
    for i in 0..MAX_IDENTITIES {
        if started.elapsed() > DRAIN_TIME {
            break;
        }
        let mut p = cx.probe(&format!("I{i}")).await?;
        let mut mine = 0u64;
        while mine < per_identity {
            let n = (per_identity - mine).min(250);
            let bodies = (0..n).map(|k| make(&p, mine + k)).collect();
            for r in p.pipeline(bodies).await? {
                if let Some(e) = limited(&r) {
                    if e.retry_after_ms < 1 {
                        return Err(Outcome::fail("RATE_LIMITED with retry_after_ms 0"));
                    }
                    return Ok(Outcome::pass_with(format!(
                        "refused after {total} {what} from this address by {} identities, the last of which had sent {mine} (below its own limits); retry_after_ms {}",
                        i + 1,
                        e.retry_after_ms
                    )));
                }
                mine += 1;
                total += 1;
            }
        }
    }
    no_refusal(
        &Run {
            served: total,
            refusal: None,
            elapsed: started.elapsed(),
        },
        address,
        &format!("{what} from one address"),
    )
}

fn set_policy(accept: i32) -> Body {
    Body::SetPolicy(proto::SetPolicy { accept })
}

fn fetch(identity: &PublicKeyBytes, devices: Vec<u32>) -> Body {
    Body::FetchPreKeys(proto::FetchPreKeys {
        identity: Bytes::copy_from_slice(identity.as_bytes()),
        device_ids: devices,
    })
}

fn short_identity() -> Bytes {
    Bytes::from(vec![2u8; 32])
}

/// A `Send` that costs the sender's, the pair's and the address's tokens but stores nothing:
/// its `sender_device` is not registered (checks 5–6 come before check 7, §8.3). The signature
/// is not made (the relay does not look at it before check 8).
fn costly_send(to: &PublicKeyBytes) -> Body {
    Body::Send(proto::Send {
        recipient: Bytes::copy_from_slice(to.as_bytes()),
        recipient_device: 1,
        sender_device: 9,
        sender_nonce: Bytes::copy_from_slice(&rand::random::<[u8; 8]>()),
        payload_hash: Bytes::copy_from_slice(&sha256(&[b""])),
        sender_signature: Bytes::from(vec![1u8; 64]),
        payload: Bytes::new(),
        ticket: Bytes::new(),
    })
}

/// Recipients for [`costly_send`]; none needs to exist. Fixed, so that the per-pair buckets of
/// a fresh sender are fresh too.
fn recipient(k: u64) -> PublicKeyBytes {
    use std::sync::OnceLock;
    static KEYS: OnceLock<Vec<PublicKeyBytes>> = OnceLock::new();
    let keys = KEYS.get_or_init(|| (0..8).map(|_| *KeyPair::generate().public()).collect());
    keys[(k as usize) % keys.len()]
}

/// Payload bytes to send in `n` parts of at most `max` bytes.
fn chunks(total: usize, max: usize) -> usize {
    total.div_ceil(max.max(1))
}

pub(super) fn cases() -> Vec<CaseDef> {
    vec![
        // --- §8.1 account changes --------------------------------------------------------------
        case!("8.1/change-rate-limit", Must, "account changes beyond the identity's burst get RATE_LIMITED (retry_after_ms ≥ 1), checked before any other check of the request", |cx| {
            let bucket = cx.change_bucket();
            let burst = bucket.0;
            if burst > 2000 {
                return Ok(Outcome::skip("change_burst_per_identity above 2000"));
            }
            let open = set_policy(0);
            let address = cx.bucket(("change_burst_per_ip", 500), ("change_rate_per_ip", 50));
            let mut found = None;
            for attempt in 0..2 {
                let mut a = cx.node("A").await?; // its Register is the first change
                let run = until_refused(&mut a, burst + 50, 200, Duration::from_secs(20), &mut |_, _| open.clone()).await?;
                let Some(e) = run.refusal.clone() else { return no_refusal(&run, bucket, "account changes of one identity") };
                if run.served + 1 < burst {
                    // The address's bucket (shared with other sessions of this address, e.g.
                    // an earlier run) may have refused first: once more when it is full.
                    if attempt == 0 {
                        refill(&cx, address).await;
                        continue;
                    }
                    return Err(Outcome::fail(format!("refused after {} changes, below the burst of {burst}", run.served + 1)));
                }
                if e.retry_after_ms < 1 {
                    return Err(Outcome::fail("RATE_LIMITED with retry_after_ms 0"));
                }
                found = Some((a, run.served + 1, e.retry_after_ms));
                break;
            }
            let Some((mut a, n, retry)) = found else { return Err(Outcome::fail("no attempt")) };
            let mut dup = prekeys(100, 2);
            dup[1].id = 100;
            let malformed = [
                ("Register of device 0", Body::Register(registration(0, 1))),
                ("Unregister of a device that is not registered", Body::Unregister(proto::Unregister { device_id: 9 })),
                ("UploadPreKeys with an id twice", Body::UploadPreKeys(proto::UploadPreKeys { device_id: 1, signed_prekey: None, one_time_prekeys: dup })),
                ("SetPolicy with an unknown value", set_policy(7)),
                ("AddContact of a 32-byte identity", Body::AddContact(proto::AddContact { identity: short_identity() })),
                ("RemoveContact of a 32-byte identity", Body::RemoveContact(proto::RemoveContact { identity: short_identity() })),
                ("CreateTicket with too long a lifetime", Body::CreateTicket(proto::CreateTicket { ttl_s: u32::MAX, uses: 1 })),
            ];
            for (what, body) in &malformed {
                limited_first(&mut a, (3, bucket.1), &open, body, what).await?;
            }
            Ok(Outcome::pass_with(format!("refused after {n} changes, retry_after_ms {retry}; the seven kinds refused first")))
        })
        .alone(Alone::First),
        case!("8.1/change-rate-limit-per-address", Must, "account changes of many identities from one address get RATE_LIMITED once the address's bucket is empty", |cx| {
            let per_identity = cx.change_bucket().0.saturating_sub(10).max(1);
            let address = cx.bucket(("change_burst_per_ip", 500), ("change_rate_per_ip", 50));
            // SetPolicy without a device is refused NOT_REGISTERED, but costs its tokens.
            drain_address(&cx, "account changes", per_identity, address, |_, _| set_policy(1)).await
        })
        .alone(Alone::Last),
        case!("8.1/limiter-keys-full", Must, "when a limiter tracks its maximum of keys in use, a new key gets RATE_LIMITED with retry_after_ms ≥ 1", |cx| {
            let keys = cx.need("max_rate_limited_keys")?;
            if keys > 64 {
                return Ok(Outcome::skip("max_rate_limited_keys above 64 is too many identities to fill"));
            }
            // Each identity takes a few account-change tokens (SetPolicy without a device:
            // NOT_REGISTERED, but the tokens are taken), so its key stays in use for a while;
            // all of them together stay below the address's burst.
            let (_, rate) = cx.change_bucket();
            let address = cx.limit("change_burst_per_ip", 500);
            let per_identity = (address * 4 / 5 / (keys + 1)).clamp(1, 20);
            let started = Instant::now();
            for i in 0..=keys {
                let mut p = cx.probe(&format!("I{i}")).await?;
                let answers = p.pipeline((0..per_identity).map(|_| set_policy(1)).collect()).await?;
                if let Some(e) = answers.first().and_then(limited) {
                    if e.retry_after_ms < 1 {
                        return Err(Outcome::fail("RATE_LIMITED with retry_after_ms 0"));
                    }
                    return Ok(Outcome::pass_with(format!("the first request of new identity {i} was refused, retry_after_ms {}", e.retry_after_ms)));
                }
            }
            // The first identity's key is in use for per_identity / rate seconds.
            if started.elapsed() < Duration::from_secs_f64(per_identity as f64 / rate as f64) {
                Err(Outcome::fail(format!("{} new identities were admitted by a limiter said to track at most {keys} keys", keys + 1)))
            } else {
                Ok(Outcome::skip(format!("the suite took {:?} to bring {} identities: their buckets refilled meanwhile", started.elapsed(), keys + 1)))
            }
        })
        .alone(Alone::First),
        // --- §8.2 prekey fetches -----------------------------------------------------------------
        case!("8.2/fetch-rate-limit", Must, "FetchPreKeys beyond the requester's burst gets RATE_LIMITED (retry_after_ms ≥ 1), before any other check", |cx| {
            let bucket = cx.bucket(("prekey_fetch_burst", 100), ("prekey_fetch_rate", 5));
            let burst = bucket.0;
            let address = cx.bucket(("prekey_fetch_burst_per_ip", 200), ("prekey_fetch_rate_per_ip", 20));
            let a = cx.node("A").await?;
            let target = a.key();
            let good = fetch(&target, vec![1]);
            for attempt in 0..2 {
                let mut f = cx.probe("F").await?;
                let run = until_refused(&mut f, burst + 100, 50, Duration::from_secs(20), &mut |_, _| good.clone()).await?;
                let Some(e) = run.refusal.clone() else { return no_refusal(&run, bucket, "fetches of one identity") };
                if run.served < burst {
                    if attempt == 0 {
                        refill(&cx, address).await;
                        continue;
                    }
                    return Err(Outcome::fail(format!("refused after {} fetches, below the burst of {burst}", run.served)));
                }
                if e.retry_after_ms < 1 {
                    return Err(Outcome::fail("RATE_LIMITED with retry_after_ms 0"));
                }
                let short = Body::FetchPreKeys(proto::FetchPreKeys { identity: Bytes::from_static(b"short"), device_ids: vec![] });
                limited_first(&mut f, (2, bucket.1), &good, &short, "a FetchPreKeys with a 5-byte identity").await?;
                return Ok(Outcome::pass_with(format!("refused after {} fetches, retry_after_ms {}", run.served, e.retry_after_ms)));
            }
            Err(Outcome::fail("no attempt"))
        })
        .alone(Alone::First),
        case!("8.2/fetch-rate-limit-per-address", Must, "prekey fetches of many identities from one address get RATE_LIMITED once the address's bucket is empty", |cx| {
            let per_identity = cx.limit("prekey_fetch_burst", 100).saturating_sub(10).max(1);
            let address = cx.bucket(("prekey_fetch_burst_per_ip", 200), ("prekey_fetch_rate_per_ip", 20));
            // A fetch of an identity nobody registered is refused UNKNOWN_RECIPIENT, but costs
            // its tokens.
            drain_address(&cx, "prekey fetches", per_identity, address, |_, _| fetch(&recipient(0), vec![])).await
        })
        .alone(Alone::Last),
        case!("8.2/one-time-prekey-rate", Must, "beyond one_time_prekey_burst_per_device, bundles come without a one-time prekey though the device has keys left; the fetch succeeds", |cx| {
            let burst = cx.limit("one_time_prekey_burst_per_device", 20);
            let keys = burst + 10;
            if keys > cx.limit("max_prekeys_per_upload", 100) {
                return Ok(Outcome::skip("one_time_prekey_burst_per_device + 10 keys do not fit in one Register"));
            }
            let mut a = cx.probe("A").await?;
            a.register(1, keys as u32).await?;
            let owner = a.key();
            let mut f = cx.probe("F").await?;
            let (mut handed, mut without) = (0u64, 0u64);
            for _ in 0..(burst + 5) {
                match f.fetch(&owner, vec![1]).await?.first() {
                    Some(b) if b.one_time_prekey.is_some() => handed += 1,
                    Some(_) => without += 1,
                    None => return Err(Outcome::fail("a fetch of device 1 gave no bundle")),
                }
            }
            let left = u64::from(a.prekey_count(1).await?);
            if left != keys - handed {
                return Err(Outcome::fail(format!("{left} keys left after {handed} of {keys} were handed out")));
            }
            if without == 0 {
                return Err(Outcome::fail(format!("all {handed} fetches took a one-time prekey: no per-device limit of {burst}")));
            }
            if handed < burst {
                return Err(Outcome::fail(format!("only {handed} one-time prekeys went out before bundles came without, below the burst of {burst}")));
            }
            Ok(Outcome::pass_with(format!("{handed} handed out, then {without} bundles without one while {left} keys were left")))
        }),
        case!("8.2/register-identities-quota", Must, "Register of a new identity on a relay holding max_identities gets QUOTA_EXCEEDED and the session goes on; known identities still register devices", |cx| {
            let max = cx.need("max_identities")?;
            if max > 200 {
                return Ok(Outcome::skip("max_identities above 200: too many identities to register"));
            }
            let mut known: Option<Arc<KeyPair>> = None;
            for i in 0..=max {
                let mut p = cx.probe(&format!("I{i}")).await?;
                match p.call_patiently(Body::Register(registration(1, 0))).await? {
                    Ok(_) => {
                        p.cleanup.lock().push((p.identity.clone(), 1));
                        known.get_or_insert_with(|| p.identity.clone());
                    }
                    Err(e) if e.code == ErrorCode::QuotaExceeded as i32 => {
                        if let Err(o) = p.call(Body::GetPreKeyCount(proto::GetPreKeyCount { device_id: 1 })).await {
                            return Err(Outcome::fail(format!("the session did not go on after QUOTA_EXCEEDED: {}", o.detail)));
                        }
                        if let Some(k) = known {
                            let mut q = cx.probe_as("K", k).await?;
                            q.register(2, 0).await.map_err(|o| Outcome::fail(format!("a known identity could not register another device: {}", o.detail)))?;
                        }
                        return Ok(Outcome::pass_with(format!("refused after {i} new identities")));
                    }
                    Err(e) => return Err(Outcome::fail(format!("Register of identity {i}: {}", e.name()))),
                }
            }
            Err(Outcome::fail(format!("{} new identities registered on a relay said to hold at most {max}", max + 1)))
        }),
        // --- §8.3 sends ------------------------------------------------------------------------
        case!("8.3/send-rate-limit-per-address", Must, "sends of many identities from one address get RATE_LIMITED once the address's bucket is empty", |cx| {
            let sender = cx.limit("send_burst_per_identity", 1000);
            let pair = cx.limit("send_burst_per_pair", 200);
            // Each fresh identity stays below its own bucket and below each pair's.
            let per_identity = sender.saturating_sub(100).min(8 * pair.saturating_sub(50)).max(1);
            let address = cx.bucket(("send_burst_per_ip", 5000), ("send_rate_per_ip", 1000));
            drain_address(&cx, "sends", per_identity, address, |_, k| costly_send(&recipient(k))).await
        })
        .alone(Alone::Last),
        case!("8.3/identity-quota", Must, "a Send that would take the recipient identity's mailboxes past max_identity_stored_bytes gets QUOTA_EXCEEDED and the session goes on", |cx| {
            let quota = cx.need("max_identity_stored_bytes")? as usize;
            let mailbox = cx.limit("mailbox_max_bytes", 64 << 20) as usize;
            let mut a = cx.node("A").await?;
            let chunk = a.max_payload_len().min(quota / 4 + 1).max(1);
            if chunks(quota, chunk) > 400 {
                return Ok(Outcome::skip("max_identity_stored_bytes is too large to fill quickly"));
            }
            if quota / 2 + 2 * chunk > mailbox {
                return Ok(Outcome::skip("half of max_identity_stored_bytes does not fit in one mailbox (mailbox_max_bytes)"));
            }
            let mut b = cx.probe("B").await?;
            b.register(1, 0).await?;
            b.register(2, 0).await?;
            let (to, payload) = (b.key(), Bytes::from(vec![0x51; chunk]));
            let mut stored = 0usize;
            let mut n = 0u32;
            while stored + chunk <= quota {
                a.send_msg(&to, 1 + n % 2, payload.clone()).await?;
                stored += chunk;
                n += 1;
            }
            let req = a.signed(&to, 1 + n % 2, 1, payload);
            a.expect_code(Body::Send(req), ErrorCode::QuotaExceeded).await?;
            a.prekey_count(1).await.map_err(|o| Outcome::fail(format!("the session did not go on: {}", o.detail)))?;
            Ok(Outcome::pass_with(format!("refused after {stored} bytes in two mailboxes")))
        }),
        case!("8.3/relay-quota", Must, "a Send that would take the relay's stored payload past max_stored_bytes gets QUOTA_EXCEEDED", |cx| {
            let quota = cx.need("max_stored_bytes")? as usize;
            let mut a = cx.node("A").await?;
            let chunk = a.max_payload_len().max(1);
            let sends = chunks(quota, chunk) + 2;
            if sends > 400 {
                return Ok(Outcome::skip("max_stored_bytes is too large to fill quickly"));
            }
            // Spread over recipients, so that no mailbox or identity limit comes first.
            let per_recipient = (cx.limit("mailbox_max_bytes", 64 << 20) as usize)
                .min(cx.limit("max_identity_stored_bytes", 256 << 20) as usize)
                / 2
                / chunk;
            let per_recipient = per_recipient.max(1);
            let payload = Bytes::from(vec![0x52; chunk]);
            let mut to = cx.node("R0").await?.key();
            for n in 0..sends {
                if n > 0 && n % per_recipient == 0 {
                    to = cx.node(&format!("R{n}")).await?.key();
                }
                let req = a.signed(&to, 1, 1, payload.clone());
                match a.call_patiently(Body::Send(req)).await? {
                    Ok(_) => {}
                    Err(e) if e.code == ErrorCode::QuotaExceeded as i32 => {
                        return Ok(Outcome::pass_with(format!("refused after {n} sends of {chunk} bytes")));
                    }
                    Err(e) => return Err(Outcome::fail(format!("send {n}: {}", code_name(e.code)))),
                }
            }
            Err(Outcome::fail(format!("{sends} sends of {chunk} bytes stored on a relay said to hold at most {quota} bytes")))
        }),
        // --- §8.4 acknowledgements -------------------------------------------------------------
        case!("8.4/ack-rate-limit", Must, "AckMessages beyond the identity's burst gets RATE_LIMITED (retry_after_ms ≥ 1), checked before any other check", |cx| {
            let bucket = cx.bucket(("ack_burst_per_identity", 5000), ("ack_rate_per_identity", 1000));
            let burst = bucket.0;
            let mut a = cx.node("A").await?;
            let ack = Body::AckMessages(proto::AckMessages { device_id: 1, message_ids: vec![] });
            let run = until_refused(&mut a, 4 * burst + 20_000, 500, Duration::from_secs(20), &mut |_, _| ack.clone()).await?;
            let Some(e) = run.refusal.clone() else { return no_refusal(&run, bucket, "AckMessages of one identity") };
            if run.served < burst {
                return Err(Outcome::fail(format!("refused after {} acks, below the burst of {burst}", run.served)));
            }
            if e.retry_after_ms < 1 {
                return Err(Outcome::fail("RATE_LIMITED with retry_after_ms 0"));
            }
            // A small request (a device that is not registered): a long one takes the relay
            // longer to open than this bucket takes to gain a token.
            let other = Body::AckMessages(proto::AckMessages { device_id: 9, message_ids: vec![1] });
            limited_first(&mut a, (20, bucket.1), &ack, &other, "an AckMessages for a device that is not registered").await?;
            Ok(Outcome::pass_with(format!("refused after {} acks in {:?}, retry_after_ms {}", run.served, run.elapsed, e.retry_after_ms)))
        })
        .alone(Alone::First),
    ]
}
