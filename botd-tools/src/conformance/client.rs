//! The client role: a relay that misbehaves on purpose ([`super::faulty`]), one case per
//! connection of the node under test, which runs the scenario of docs/CONFORMANCE.md each time.
//! A case is judged by what the node does on the wire.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;

use super::faulty::{serve, AckFault, BadFrame, DeliverFault, First, Script, Seen, Shared, Trace};
use super::{CaseReport, Level, Log, Outcome, Report, Selection, Verdict};
use botd_protocol::keys::{sha256, KeyPair, PublicKeyBytes};
use botd_protocol::proto::{Body, ErrorCode, Frame};

type Judge = fn(&Trace, Option<&Trace>) -> Outcome;

/// One case of the client role.
pub struct ClientCase {
    pub id: &'static str,
    pub level: Level,
    pub title: &'static str,
    pub slow: bool,
    pub script: fn() -> Script,
    /// Accept a second connection (the node reconnects within the case).
    pub reconnect: bool,
    pub judge: Judge,
}

fn c(
    id: &'static str,
    level: Level,
    title: &'static str,
    script: fn() -> Script,
    judge: Judge,
) -> ClientCase {
    ClientCase {
        id,
        level,
        title,
        slow: false,
        script,
        reconnect: false,
        judge,
    }
}

fn frames_after<'a>(t: &'a Trace, mark: &str) -> Vec<&'a Frame> {
    let at = t.mark_at(mark);
    t.frames()
        .filter(|(when, _)| at.is_some_and(|m| **when >= m))
        .map(|(_, f)| f)
        .collect()
}

/// The node must close without sending anything.
fn closes_silently(t: &Trace, _: Option<&Trace>) -> Outcome {
    if t.sent_anything() {
        Outcome::fail(
            "the node sent data after the failure; it must close and send nothing further",
        )
    } else if t.closed() {
        Outcome::pass()
    } else {
        Outcome::fail("the node did not close the connection")
    }
}

/// The node must close and send nothing after `mark`.
fn closes_after(t: &Trace, mark: &str) -> Outcome {
    let after = frames_after(t, mark);
    if !after.is_empty() {
        return Outcome::fail(format!(
            "the node went on: {} frame(s) after {mark}",
            after.len()
        ));
    }
    if t.closed() {
        Outcome::pass()
    } else {
        Outcome::fail("the node did not close the connection")
    }
}

fn completed(t: &Trace) -> bool {
    t.mark_at("unregister").is_some()
}

fn scenario_completes(t: &Trace, _: Option<&Trace>) -> Outcome {
    if completed(t) {
        Outcome::pass()
    } else {
        Outcome::fail("the node did not complete the scenario")
    }
}

/// A forgery was pushed before the real second message: finishing earlier means it was taken.
fn rejects_forgery(t: &Trace, _: Option<&Trace>) -> Outcome {
    let (Some(forged), real) = (t.mark_at("forged"), t.mark_at("real second")) else {
        return Outcome::fail("the node did not get as far as the second message");
    };
    let done = t.mark_at("unregister");
    match (done, real) {
        (Some(d), Some(r)) if d >= r => {}
        (Some(_), _) => {
            return Outcome::fail(
                "the node finished before the real message came: it accepted the forged Deliver",
            )
        }
        (None, _) if t.closed() && real.is_none() => {
            return Outcome::fail("the node stopped before the real message came")
        }
        (None, _) => return Outcome::fail("the node did not complete the scenario"),
    }
    let _ = forged;
    Outcome::pass()
}

fn send_checks(t: &Trace, _: Option<&Trace>) -> Outcome {
    let Some(me) = t.identity else {
        return Outcome::fail("no handshake");
    };
    let sends: Vec<_> = t
        .frames()
        .filter_map(|(_, f)| match &f.body {
            Some(Body::Send(s)) => Some(s.clone()),
            _ => None,
        })
        .collect();
    if sends.is_empty() {
        return Outcome::fail("the node sent no message");
    }
    let mut nonces = std::collections::HashSet::new();
    for s in &sends {
        if s.payload_hash[..] != sha256(&[&s.payload])[..] {
            return Outcome::fail("payload_hash is not SHA-256(payload)");
        }
        if s.sender_nonce.len() != 8 || !nonces.insert(s.sender_nonce.clone()) {
            return Outcome::fail("sender_nonce is not a fresh 8-byte value per message");
        }
        let digest = botd_protocol::message::message_digest(
            me.as_bytes(),
            &s.recipient,
            s.recipient_device,
            &s.sender_nonce,
            &s.payload_hash,
        );
        if let Err(e) = me.verify(&digest, &s.sender_signature) {
            return Outcome::fail(format!("sender_signature: {e}"));
        }
    }
    Outcome::pass()
}

fn acks_ok(t: &Trace, _: Option<&Trace>) -> Outcome {
    let acks: Vec<_> = t
        .frames()
        .filter_map(|(_, f)| match &f.body {
            Some(Body::AckMessages(a)) => Some(a.clone()),
            _ => None,
        })
        .collect();
    if acks.is_empty() {
        return Outcome::fail("the node acknowledged nothing");
    }
    if acks
        .iter()
        .any(|a| a.message_ids.len() > 4096 || a.device_id != 1)
    {
        return Outcome::fail(
            "an AckMessages with more than 4096 ids, or for another device than the one the messages came for (1)",
        );
    }
    // Both messages were delivered (ids 1 and 2) and processed: both are acknowledged.
    let acked: std::collections::HashSet<u64> =
        acks.iter().flat_map(|a| a.message_ids.clone()).collect();
    if completed(t) && !(acked.contains(&1) && acked.contains(&2)) {
        return Outcome::fail(format!(
            "the node processed messages 1 and 2 but acknowledged only {acked:?}"
        ));
    }
    Outcome::pass()
}

/// The node answers neither the relay's unsolicited `Pong`s nor `Error`s (§7.1), and goes on.
fn pongs_not_answered(t: &Trace, _: Option<&Trace>) -> Outcome {
    if answered_after(t, "pushes sent") {
        return Outcome::fail("the node answered an unsolicited Pong");
    }
    scenario_completes(t, None)
}

/// The node sent a `Pong` or an `Error` after `mark`: it answered a frame that gets no answer.
fn answered_after(t: &Trace, mark: &str) -> bool {
    frames_after(t, mark)
        .iter()
        .any(|f| matches!(f.body, Some(Body::Pong(_) | Body::Error(_))))
}

/// No two of the node's `Ping`s less than `max(30 s, ping_min_interval_ms)` apart (§7.3),
/// though the relay announced a window of 1 s.
fn ping_spacing(t: &Trace, _: Option<&Trace>) -> Outcome {
    let pings: Vec<Instant> = t
        .frames()
        .filter(|(_, f)| matches!(f.body, Some(Body::Ping(_))))
        .map(|(at, _)| *at)
        .collect();
    if let Some(w) = pings
        .windows(2)
        .find(|w| w[1] - w[0] < Duration::from_secs(30))
    {
        return Outcome::fail(format!(
            "two Pings {:?} apart: a node keeps 30 s between its Pings whatever the relay announces",
            w[1] - w[0]
        ));
    }
    Outcome::pass_with(format!("{} Ping(s)", pings.len()))
}

fn over_announced_recorded(t: &Trace, _: Option<&Trace>) -> Outcome {
    if frames_after(t, "oversize").is_empty() && t.closed() {
        Outcome::info("the node closed on a frame above the announced max_frame_len (it keeps the announced limit)")
    } else {
        Outcome::info("the node took a frame above the announced max_frame_len (it keeps a larger limit of its own, allowed by §3)")
    }
}

fn request_ids_ok(t: &Trace, _: Option<&Trace>) -> Outcome {
    let mut outstanding = std::collections::HashSet::new();
    for (_, f) in t.frames() {
        let is_request = matches!(
            f.body,
            Some(
                Body::Register(_)
                    | Body::Subscribe(_)
                    | Body::Send(_)
                    | Body::AckMessages(_)
                    | Body::Unregister(_)
                    | Body::Ping(_)
            )
        );
        if is_request && f.id == 0 {
            return Outcome::fail("a request with frame id 0");
        }
        if is_request {
            outstanding.insert(f.id);
        }
    }
    if outstanding.is_empty() {
        Outcome::fail("no requests")
    } else {
        Outcome::pass()
    }
}

fn answers_ping(t: &Trace, _: Option<&Trace>) -> Outcome {
    let Some(ping_at) = t.mark_at("ping 1") else {
        return Outcome::fail("no handshake");
    };
    for (at, f) in t.frames() {
        if let Some(Body::Pong(p)) = &f.body {
            if p.ping_id == "relay-ping-1" {
                if f.id != 0 {
                    return Outcome::fail(format!(
                        "Pong in frame {} (the Ping's frame id is 0)",
                        f.id
                    ));
                }
                if !botd_protocol::proto::valid_id(&p.id) {
                    return Outcome::fail("Pong.id is not 1 to 64 bytes");
                }
                if *at - ping_at > Duration::from_secs(20) {
                    return Outcome::fail("the Pong came after more than 20 s");
                }
                return Outcome::pass();
            }
        }
    }
    Outcome::fail("the node did not answer the relay's Ping")
}

fn ping_flood_recorded(t: &Trace, _: Option<&Trace>) -> Outcome {
    let pongs = t
        .frames()
        .filter(|(_, f)| matches!(f.body, Some(Body::Pong(_))))
        .count();
    let flood = t.frames().any(
        |(_, f)| matches!(&f.body, Some(Body::Error(e)) if e.code == ErrorCode::PingFlood as i32),
    );
    Outcome::info(format!(
        "{pongs} Pong(s); {}; {}",
        if flood {
            "sent PING_FLOOD"
        } else {
            "no PING_FLOOD"
        },
        if t.closed() { "closed" } else { "stayed open" }
    ))
}

fn no_answer_to_error(t: &Trace, _: Option<&Trace>) -> Outcome {
    if answered_after(t, "error pushed") {
        return Outcome::fail("the node answered an Error push");
    }
    Outcome::pass()
}

fn ignores_unknown(t: &Trace, _: Option<&Trace>) -> Outcome {
    let after = frames_after(t, "unknown pushes");
    if after.iter().any(|f| matches!(f.body, Some(Body::Error(_)))) {
        return Outcome::non_strict(
            "the node answered a push it does not understand with an Error",
        );
    }
    if completed(t) {
        Outcome::pass()
    } else {
        Outcome::non_strict("the node did not go on after pushes it does not understand")
    }
}

fn no_resubscribe(t: &Trace, _: Option<&Trace>) -> Outcome {
    let after = frames_after(t, "replaced");
    if after
        .iter()
        .any(|f| matches!(f.body, Some(Body::Subscribe(_))))
    {
        Outcome::fail("the node subscribed again after REPLACED")
    } else {
        Outcome::pass()
    }
}

fn retries_after_wait(t: &Trace, _: Option<&Trace>) -> Outcome {
    let Some(limited) = t.mark_at("rate limited") else {
        return Outcome::fail("the node sent no message");
    };
    let sends: Vec<_> = t
        .frames()
        .filter_map(|(at, f)| match &f.body {
            Some(Body::Send(s)) => Some((*at, s.sender_nonce.clone())),
            _ => None,
        })
        .collect();
    let Some((first_at, nonce)) = sends.first().cloned() else {
        return Outcome::fail("no Send");
    };
    let _ = first_at;
    match sends.get(1) {
        None => Outcome::non_strict("the node did not retry the refused Send"),
        Some((at, n)) if *at < limited + Duration::from_millis(1500) => Outcome::fail(format!(
            "retried after {:?}, before retry_after_ms (1500 ms)",
            *at - limited
        )),
        Some((_, n2)) if *n2 != nonce => {
            let _ = n2;
            Outcome::fail("the retry used another sender_nonce")
        }
        Some(_) => Outcome::pass(),
    }
}

fn resubscribes_after_slow(_: &Trace, second: Option<&Trace>) -> Outcome {
    let Some(second) = second else {
        return Outcome::non_strict("the node did not reconnect after SLOW_CONSUMER");
    };
    let sub = second.frames().find_map(|(_, f)| match &f.body {
        Some(Body::Subscribe(s)) => Some(s.after_id),
        _ => None,
    });
    match sub {
        Some(1) => Outcome::pass(),
        Some(other) => Outcome::non_strict(format!(
            "re-subscribed with after_id {other}, not the highest id received (1)"
        )),
        None => Outcome::non_strict("reconnected without subscribing"),
    }
}

fn welcome_key_recorded(t: &Trace, _: Option<&Trace>) -> Outcome {
    if frames_after(t, "welcome").is_empty() {
        Outcome::info("the node refused a Welcome with another relay_pubkey (allowed: MAY check)")
    } else {
        Outcome::info("the node accepted a Welcome with another relay_pubkey (allowed: MAY check)")
    }
}

/// Every case of the client role, in section order.
pub fn cases() -> Vec<ClientCase> {
    use Level::*;
    let mut all = vec![
        c("3/client-frame-over-limit", Must, "a length of 2^32 − 1 (above any client's limit) makes the node close without waiting for the body", || Script { welcome_max_frame_len: Some(2048), bad_frame: Some(BadFrame::Huge), ..Default::default() }, |t, _| closes_after(t, "bad frame")),
        c("3/client-frame-zero-length", Must, "a zero-length frame makes the node close", || Script { bad_frame: Some(BadFrame::ZeroLength), ..Default::default() }, |t, _| closes_after(t, "bad frame")),
        c("3/client-frame-at-limit", Must, "a frame body of exactly the announced max_frame_len (2048) is accepted", || Script { welcome_max_frame_len: Some(2048), push_at_limit: true, ..Default::default() }, scenario_completes),
        c("3/client-frame-over-announced", Open, "a frame above the announced max_frame_len: the node may close or keep a larger limit of its own (recorded)", || Script { welcome_max_frame_len: Some(2048), oversize_registered: true, ..Default::default() }, over_announced_recorded),
        c("7.1/client-pong-not-answered", Must, "unsolicited Pongs from the relay are not answered", || Script { pushes_before_registered: 3, ..Default::default() }, pongs_not_answered),
        c("7.3/client-ping-spacing", Must, "the node keeps 30 s between its Pings though the relay announces a 1 s window", || Script { welcome_ping_min_interval_ms: Some(1000), welcome_ping_interval_ms: Some(1000), welcome_idle_timeout_ms: Some(4000), hold_second: Some(Duration::from_secs(3)), ..Default::default() }, ping_spacing),
        c("8.4/client-deliver-high-s", Must, "a Deliver whose signature is the high-S twin of a valid one is discarded", || Script { deliver: DeliverFault::HighS, ..Default::default() }, rejects_forgery),
        c("8.4/client-deliver-for-another-recipient", Must, "a Deliver signed for another recipient is discarded (the node verifies with itself as recipient)", || Script { deliver: DeliverFault::OtherRecipient, ..Default::default() }, rejects_forgery),
        c("4.4/client-ack-and-welcome-together", Must, "the relay writes Ack and Welcome with one write: the node keeps the bytes after the Ack for its session and completes the scenario", || Script { ack_with_welcome: true, ..Default::default() }, scenario_completes),
        c("4.5/ack-wrong-init-id", Must, "an Ack for another Init: the node closes and sends nothing", || Script { ack: AckFault::WrongInitId, ..Default::default() }, closes_silently),
        c("4.5/ack-bad-signature", Must, "an Ack with a bad signature: the node closes and sends nothing", || Script { ack: AckFault::BadSignature, ..Default::default() }, closes_silently),
        c("4.5/ack-high-s", Must, "an Ack with a high-S signature: the node closes and sends nothing", || Script { ack: AckFault::HighS, ..Default::default() }, closes_silently),
        c("4.5/ack-other-key", Must, "an Ack signed by another key: the node closes and sends nothing", || Script { ack: AckFault::OtherKey, ..Default::default() }, closes_silently),
        c("4.5/ack-empty-id", Must, "an Ack with an empty id: the node closes and sends nothing", || Script { ack: AckFault::EmptyId, ..Default::default() }, closes_silently),
        c("4.5/ack-bad-ephemeral", Must, "an Ack whose ephemeral key is not a point: the node closes and sends nothing", || Script { ack: AckFault::BadEphemeral, ..Default::default() }, closes_silently),
        c("6.2/client-welcome-bad-tag", Must, "a Welcome with a bad tag: the node closes and sends nothing", || Script { first: First::BadTagWelcome, ..Default::default() }, closes_silently),
        c("6.2/client-frame-bad-tag", Must, "an answer with a bad tag in the session: the node closes and sends nothing further", || Script { bad_tag_registered: true, ..Default::default() }, |t, _| closes_after(t, "bad tag")),
        c("6.3/client-rotation", Must, "the node opens relay frames 1024 and up under rotated keys", || Script { pushes_before_registered: 1100, ..Default::default() }, scenario_completes),
        c("6.3/client-rotation-late", Must, "a relay that rotates one frame late: the node closes", || Script { pushes_before_registered: 1100, rotate_shift: Some(1), ..Default::default() }, |t, _| closes_after(t, "pushes sent")),
        c("7.1/client-unknown-pushes", Should, "pushes with an unknown body or error code are ignored", || Script { unknown_pushes: true, ..Default::default() }, ignores_unknown),
        c("7.1/client-request-ids", Must, "the node's requests carry non-zero frame ids", Script::default, request_ids_ok),
        c("7.2/client-first-frame-not-welcome", Must, "a first encrypted frame that is not Welcome: the node closes and sends nothing", || Script { first: First::ErrorFrame, ..Default::default() }, closes_silently),
        c("7.2/client-welcome-other-key", Open, "Welcome.relay_pubkey differs from the dialled key (recorded)", || Script { welcome_other_key: true, ..Default::default() }, welcome_key_recorded),
        c("7.3/client-answers-ping", Must, "the node answers the relay's Ping (frame id 0) with a Pong within 20 s", || Script { ping_once: true, ..Default::default() }, answers_ping),
        c("7.3/client-ping-flood", Open, "two relay Pings at once (recorded)", || Script { ping_twice: true, ..Default::default() }, ping_flood_recorded),
        c("7.4/client-error-push", Must, "an Error push with id 0 (TIMEOUT) is not answered", || Script { push_error_after_subscribed: Some(ErrorCode::Timeout), ..Default::default() }, no_answer_to_error),
        c("8.1/client-scenario", Must, "the node completes the scenario against a correct relay", Script::default, scenario_completes),
        c("8.3/client-send-signed", Must, "the node's Sends carry SHA-256 hashes, fresh 8-byte nonces and valid low-S signatures", Script::default, send_checks),
        c("8.3/client-rate-limited", Must, "after RATE_LIMITED the node retries no sooner than retry_after_ms, with the same nonce", || Script { rate_limit_first_send: Some(1500), ..Default::default() }, retries_after_wait),
        c("8.4/client-acks", Must, "the node acknowledges what it processed (≤ 4096 ids per AckMessages)", Script::default, acks_ok),
        c("8.4/client-deliver-bad-signature", Must, "a Deliver with a bad signature is discarded", || Script { deliver: DeliverFault::BadSignature, ..Default::default() }, rejects_forgery),
        c("8.4/client-deliver-bad-hash", Must, "a Deliver whose payload does not match payload_hash is discarded", || Script { deliver: DeliverFault::BadHash, ..Default::default() }, rejects_forgery),
        c("8.4/client-deliver-wrong-device", Must, "a Deliver for another device of the node (correctly signed for it) is discarded", || Script { deliver: DeliverFault::WrongDevice, ..Default::default() }, rejects_forgery),
        c("8.4/client-replaced", Must, "after REPLACED the node does not subscribe again", || Script { replaced_after_subscribed: true, ..Default::default() }, no_resubscribe),
        c("8.5/client-duplicate-id", Must, "a second Deliver with an id already received is a duplicate", || Script { deliver: DeliverFault::DuplicateId, ..Default::default() }, rejects_forgery),
    ];
    all.push(ClientCase {
        id: "8.4/client-slow-consumer",
        level: Should,
        title: "after SLOW_CONSUMER the node reconnects and subscribes with after_id = the highest id received",
        slow: false,
        script: || Script { slow_consumer_after_first: true, ..Default::default() },
        reconnect: true,
        judge: resubscribes_after_slow,
    });
    all.sort_by(|a, b| {
        super::section_key(super::section_of(a.id))
            .cmp(&super::section_key(super::section_of(b.id)))
            .then_with(|| a.id.cmp(b.id))
    });
    all
}

/// The client role's listener.
pub struct Listener {
    listener: TcpListener,
    identity: KeyPair,
}

impl Listener {
    pub async fn bind(addr: SocketAddr, identity: KeyPair) -> std::io::Result<Self> {
        Ok(Self {
            listener: TcpListener::bind(addr).await?,
            identity,
        })
    }

    pub fn key(&self) -> PublicKeyBytes {
        *self.identity.public()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Runs the selected cases in order, one connection each; a node that does not connect
    /// within `case_timeout` (60 s for the first case) leaves the rest skipped.
    pub async fn run(
        &self,
        selection: &Selection,
        case_timeout: Duration,
        progress: impl Fn(&CaseReport),
    ) -> Report {
        let started = tokio::time::Instant::now();
        let started_unix_ms = super::unix_ms();
        let shared = Shared::default();
        let mut reports = Vec::new();
        let mut gone = false;
        for (i, case) in cases()
            .into_iter()
            .filter(|c| selection.matches(c.id))
            .enumerate()
        {
            let case_started = tokio::time::Instant::now();
            let log = Log::new();
            let outcome = if case.slow && !selection.slow {
                Outcome::skip("slow case: run with --slow")
            } else if gone {
                Outcome::skip("the node under test stopped connecting")
            } else {
                let wait = if i == 0 {
                    Duration::from_secs(60)
                } else {
                    case_timeout
                };
                match tokio::time::timeout(wait, self.listener.accept()).await {
                    Ok(Ok((stream, peer))) => {
                        log.note(format!("connection {} from {peer}", i + 1));
                        let trace = serve(
                            stream,
                            &self.identity,
                            &shared,
                            &(case.script)(),
                            &log,
                            case_timeout,
                        )
                        .await;
                        let second = if case.reconnect {
                            match tokio::time::timeout(
                                Duration::from_secs(5),
                                self.listener.accept(),
                            )
                            .await
                            {
                                Ok(Ok((stream, _))) => {
                                    log.note("second connection of the case");
                                    Some(
                                        serve(
                                            stream,
                                            &self.identity,
                                            &shared,
                                            &Script::default(),
                                            &log,
                                            Duration::from_secs(3),
                                        )
                                        .await,
                                    )
                                }
                                _ => None,
                            }
                        } else {
                            None
                        };
                        let mut o = (case.judge)(&trace, second.as_ref());
                        if case.level == Level::Should && o.verdict == Verdict::Fail {
                            o.verdict = Verdict::NonStrict;
                        }
                        o
                    }
                    _ => {
                        gone = true;
                        Outcome::skip("no connection from the node under test")
                    }
                }
            };
            let report = CaseReport {
                id: case.id.to_owned(),
                title: case.title.to_owned(),
                level: case.level,
                outcome,
                duration: case_started.elapsed(),
                log: log.lines(),
            };
            progress(&report);
            reports.push(report);
        }
        let mut report = Report {
            role: "client".into(),
            target: format!(
                "nodes connecting to {} (key {})",
                self.local_addr(),
                self.key()
            ),
            started_unix_ms,
            duration: started.elapsed(),
            cases: reports,
        };
        report.sort();
        report
    }
}

/// Serves every connection with `script` until the listener fails: a broken relay for tests.
pub async fn serve_forever(listener: TcpListener, identity: KeyPair, script: Script) {
    let identity = std::sync::Arc::new(identity);
    let shared = std::sync::Arc::new(Shared::default());
    let script = std::sync::Arc::new(script);
    while let Ok((stream, _)) = listener.accept().await {
        let (identity, shared, script) = (identity.clone(), shared.clone(), script.clone());
        tokio::spawn(async move {
            let log = Log::new();
            let _ = serve(
                stream,
                &identity,
                &shared,
                &script,
                &log,
                Duration::from_secs(60),
            )
            .await;
        });
    }
}

/// True when the trace shows `Seen::Closed` (for callers outside this module).
pub fn trace_closed(t: &Trace) -> bool {
    t.events.iter().any(|(_, e)| matches!(e, Seen::Closed))
}
