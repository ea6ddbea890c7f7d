//! A small relay built from `core::*` and [`super::wire`] that misbehaves on purpose, as a
//! [`Script`] says: the client role runs one script per connection of the node under test, and
//! the suite's own tests serve whole scripts as broken relays. It implements just enough of the
//! relay application for the node scenario (register, subscribe, send to oneself, ack).

use std::collections::{HashSet, VecDeque};

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::wire::{derive, describe, digest3, field_bytes, field_varint, FlexCipher};
use super::{Dir, Log};
use botd_protocol::codec::{encode_frame, FrameCodec};
use botd_protocol::keys::{negate_s, KeyPair, PublicKeyBytes};
use botd_protocol::proto::{
    self, random_id, valid_id, Ack, Body, ErrorCode, Frame, Init, Pong, Welcome,
};

/// How the `Ack` is spoiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckFault {
    #[default]
    None,
    WrongInitId,
    BadSignature,
    HighS,
    OtherKey,
    EmptyId,
    /// The responder's ephemeral key is not a point: no session can follow.
    BadEphemeral,
}

/// What the relay sends as its first encrypted frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum First {
    #[default]
    Welcome,
    /// An `Error` push instead of `Welcome`.
    ErrorFrame,
    /// A `Welcome` whose tag is wrong.
    BadTagWelcome,
}

/// What happens to the deliveries of the scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeliverFault {
    #[default]
    None,
    /// An extra `Deliver` of the second payload, signed wrongly, before the real one.
    BadSignature,
    /// An extra `Deliver` of the second payload with the first message's signature and hash.
    BadHash,
    /// A message of the second payload for the node's device 2 (signed correctly for it by
    /// another identity), pushed on device 1's subscription.
    WrongDevice,
    /// A message of the second payload signed correctly by another identity for itself as
    /// recipient (not the node).
    OtherRecipient,
    /// A message of the second payload from another identity, for the node's device 1, with
    /// the high-S twin of a valid signature.
    HighS,
    /// The second message first arrives under the first message's id.
    DuplicateId,
}

/// A frame header that breaks the node's framing, sent instead of the answer to `Register`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadFrame {
    /// `len = 0`.
    ZeroLength,
    /// `len = 2^32 − 1`, above any client's limit (at most 1 GiB, §3); no body follows.
    Huge,
}

/// The knobs of a misbehaving relay (all off: a correct one).
#[derive(Debug, Clone, Default)]
pub struct Script {
    // Responder side of the handshake.
    pub accept_high_s: bool,
    pub skip_recipient_check: bool,
    pub no_replay_cache: bool,
    pub ack: AckFault,
    // Session.
    pub first: First,
    pub welcome_other_key: bool,
    pub welcome_max_frame_len: Option<u32>,
    pub welcome_ping_min_interval_ms: Option<u64>,
    pub skip_tag_check: bool,
    /// Shift of the relay's own rotation point (Some(1): rotates after 1024).
    pub rotate_shift: Option<u64>,
    pub answer_ping_flood: bool,
    /// The ping window enforced, when not the one announced.
    pub enforced_ping_window: Option<Duration>,
    /// The longest `Ping.id` answered, when not 64 bytes.
    pub ping_id_max: Option<usize>,
    /// The frame id of every `Pong`, when not the ping frame's.
    pub pong_frame_id: Option<u64>,
    /// `Ping`s in frames with id 0 do not count for the ping window.
    pub id0_pings_not_counted: bool,
    /// A `Ping` with a malformed id counts for the ping window.
    pub counts_malformed_pings: bool,
    /// Answers an `Init` (an `Ack`) before its checks, then closes if they fail.
    pub ack_before_checks: bool,
    /// Derives the keys from a re-encoding of the `Init`, not the bytes received.
    pub reencodes_init: bool,
    /// Refuses `Init` ids that are not 32 lowercase hex characters.
    pub ids_hex32_only: bool,
    /// Uses one ephemeral key for every `Ack`.
    pub reuse_ephemeral: bool,
    /// Shift of the rotation of the node's direction (Some(1): after 1024).
    pub rotate_open_shift: Option<u64>,
    /// Pads the `Ack` with an unknown field to this many bytes.
    pub ack_len: Option<usize>,
    /// Holds the `Ack` back and writes it and `Welcome` with one write, as the relay does, so
    /// the node's first read after its `Init` brings both.
    pub ack_with_welcome: bool,
    /// `Welcome.protocol`, when not "botd/1".
    pub welcome_protocol: Option<&'static str>,
    /// Sends an `Error` before closing on a frame that fails (framing, tag, end of stream).
    pub error_before_close: bool,
    /// Sends a frame before closing on a bad handshake frame.
    pub replies_to_bad_handshake_frames: bool,
    /// Closes on a plaintext that is not a `Frame` instead of answering `BAD_REQUEST`.
    pub closes_on_undecodable: bool,
    /// Takes a `Frame` not in the canonical encoding (unknown fields, order) for undecodable.
    pub strict_canonical_frames: bool,
    /// Answers a `Ping` with a `Pong` naming another ping id.
    pub pong_wrong_ping_id: bool,
    /// Answers unsolicited `Pong`s with a `Pong`.
    pub answer_pongs: bool,
    /// The frame limit during the handshake, when not 1024.
    pub handshake_limit: Option<u32>,
    /// The limit of session frames read, when not the announced one.
    pub session_limit: Option<u32>,
    /// Answers frames it does not serve with `BAD_REQUEST` instead of `UNSUPPORTED`.
    pub unsupported_as_bad_request: bool,
    /// Frames before answering `Register`: this many unsolicited `Pong`s (to cross a rotation).
    pub pushes_before_registered: usize,
    /// Pushes a `Frame` with an unknown body and an `Error` with an unknown code first.
    pub unknown_pushes: bool,
    /// Answers `Register` with a frame longer than the announced limit.
    pub oversize_registered: bool,
    /// Pushes, before answering `Register`, a frame of exactly the announced `max_frame_len`.
    pub push_at_limit: bool,
    /// Sends this instead of the answer to `Register`.
    pub bad_frame: Option<BadFrame>,
    /// Seals the answer to `Register` with a wrong tag.
    pub bad_tag_registered: bool,
    /// `Welcome.idle_timeout_ms` and `Welcome.ping_interval_ms`, when not the defaults.
    pub welcome_idle_timeout_ms: Option<u64>,
    pub welcome_ping_interval_ms: Option<u64>,
    /// Holds the delivery of the second message this long.
    pub hold_second: Option<Duration>,
    /// Two Pings right after `Welcome`.
    pub ping_twice: bool,
    /// One Ping right after `Welcome`.
    pub ping_once: bool,
    /// Pushes this error with frame id 0 after `Subscribed`, then closes.
    pub push_error_after_subscribed: Option<ErrorCode>,
    /// Pushes `REPLACED` after `Subscribed`.
    pub replaced_after_subscribed: bool,
    /// Pushes the stored messages before `Subscribed`.
    pub deliver_before_subscribed: bool,
    /// Pushes `SLOW_CONSUMER` after the first `Deliver` and closes.
    pub slow_consumer_after_first: bool,
    /// Answers the first `Send` with `RATE_LIMITED` and this `retry_after_ms`.
    pub rate_limit_first_send: Option<u64>,
    pub deliver: DeliverFault,
}

/// What the node did, for the client role's judges.
#[derive(Debug, Clone)]
pub enum Seen {
    /// Bytes before the handshake completed (a non-frame or an extra frame).
    HandshakeBytes(usize),
    /// A frame from the node, decoded.
    Frame(Frame),
    /// A frame that did not open or decode.
    Garbage(String),
    /// The relay sent something the case marks (e.g. "deliver 3").
    Mark(String),
    Closed,
}

#[derive(Debug, Clone)]
pub struct Trace {
    pub events: Vec<(Instant, Seen)>,
    pub identity: Option<PublicKeyBytes>,
}

impl Trace {
    pub fn frames(&self) -> impl Iterator<Item = (&Instant, &Frame)> {
        self.events.iter().filter_map(|(t, e)| match e {
            Seen::Frame(f) => Some((t, f)),
            _ => None,
        })
    }

    pub fn closed(&self) -> bool {
        self.events.iter().any(|(_, e)| matches!(e, Seen::Closed))
    }

    pub fn mark_at(&self, mark: &str) -> Option<Instant> {
        self.events.iter().find_map(|(t, e)| match e {
            Seen::Mark(m) if m == mark => Some(*t),
            _ => None,
        })
    }

    /// Anything the node sent after the handshake.
    pub fn sent_anything(&self) -> bool {
        self.events.iter().any(|(_, e)| {
            matches!(
                e,
                Seen::Frame(_) | Seen::Garbage(_) | Seen::HandshakeBytes(_)
            )
        })
    }
}

/// Shared between the connections of one relay: the replay cache.
#[derive(Default)]
pub struct Shared {
    seen_ephemeral: Mutex<HashSet<Vec<u8>>>,
}

const MAX_EVENTS: usize = 20_000;

struct Conn<'a> {
    stream: TcpStream,
    buf: BytesMut,
    codec: FrameCodec,
    seal: FlexCipher,
    open: FlexCipher,
    log: &'a Log,
    trace: Trace,
    script: &'a Script,
}

impl Conn<'_> {
    fn mark(&mut self, m: &str) {
        self.trace
            .events
            .push((Instant::now(), Seen::Mark(m.to_owned())));
    }

    async fn send(&mut self, frame: &Frame) -> bool {
        self.send_after(&[], frame).await
    }

    /// Writes `before` (bytes already framed, e.g. a held `Ack`) and the sealed `frame` with
    /// one write.
    async fn send_after(&mut self, before: &[u8], frame: &Frame) -> bool {
        self.log.add("relay", Dir::Out, describe(frame));
        let sealed = self.seal.seal(&frame.encode_to_vec());
        if before.is_empty() {
            return self.write(&sealed).await;
        }
        let mut wire = before.to_vec();
        wire.extend_from_slice(&sealed);
        self.write(&wire).await
    }

    /// Writes; a failed write means the node closed.
    async fn write(&mut self, wire: &[u8]) -> bool {
        let ok = self.stream.write_all(wire).await.is_ok();
        if !ok {
            self.trace.events.push((Instant::now(), Seen::Closed));
        }
        ok
    }

    async fn send_raw_plain(&mut self, plaintext: &[u8], what: &str) -> bool {
        self.log.add("relay", Dir::Out, what);
        let wire = self.seal.seal(plaintext);
        self.write(&wire).await
    }

    /// The next frame from the node, until `deadline`.
    async fn next(&mut self, deadline: Instant) -> Option<Frame> {
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(body)) => {
                    let Ok(pt) = self.open.open(&body) else {
                        self.log.add("node", Dir::In, "a frame that fails its tag");
                        self.trace
                            .events
                            .push((Instant::now(), Seen::Garbage("bad tag".into())));
                        return None;
                    };
                    let decoded = Frame::decode(&pt[..])
                        .map_err(|e| e.to_string())
                        .and_then(|f| {
                            if self.script.strict_canonical_frames && f.encode_to_vec() != pt {
                                Err("not in the canonical encoding".to_string())
                            } else {
                                Ok(f)
                            }
                        });
                    match decoded {
                        Ok(f) => {
                            self.log.add("node", Dir::In, describe(&f));
                            if self.trace.events.len() < MAX_EVENTS {
                                self.trace
                                    .events
                                    .push((Instant::now(), Seen::Frame(f.clone())));
                            }
                            return Some(f);
                        }
                        Err(e) => {
                            self.log.add(
                                "node",
                                Dir::In,
                                format!("a plaintext that is not a Frame: {e}"),
                            );
                            self.trace.events.push((Instant::now(), Seen::Garbage(e)));
                            // §7.1: BAD_REQUEST with id 0, and the session goes on.
                            if self.script.closes_on_undecodable
                                || !self
                                    .send(&Frame::error(0, ErrorCode::BadRequest, "not a Frame"))
                                    .await
                            {
                                return None;
                            }
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    self.log.add("node", Dir::In, format!("framing: {e}"));
                    self.trace
                        .events
                        .push((Instant::now(), Seen::Garbage(e.to_string())));
                    return None;
                }
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    self.log.add("node", Dir::In, "connection closed");
                    self.trace.events.push((Instant::now(), Seen::Closed));
                    return None;
                }
                Ok(Ok(_)) => {}
                Err(_) => return None,
            }
        }
    }
}

/// Serves one connection by `script` until the node closes or `limit` passes.
pub async fn serve(
    mut stream: TcpStream,
    identity: &KeyPair,
    shared: &Shared,
    script: &Script,
    log: &Log,
    limit: Duration,
) -> Trace {
    let deadline = Instant::now() + limit;
    let mut trace = Trace {
        events: Vec::new(),
        identity: None,
    };
    let _ = stream.set_nodelay(true);
    // --- handshake ---
    let mut buf = BytesMut::new();
    let mut codec = FrameCodec::new(script.handshake_limit.unwrap_or(1024));
    let init_body = loop {
        match codec.decode(&mut buf) {
            Ok(Some(b)) => break b,
            Ok(None) => {}
            Err(e) => {
                log.add("node", Dir::In, format!("handshake framing: {e}"));
                if script.replies_to_bad_handshake_frames {
                    let _ = stream.write_all(&encode_frame(b"bad frame")).await;
                }
                return trace;
            }
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => {
                if script.replies_to_bad_handshake_frames && !buf.is_empty() {
                    let _ = stream.write_all(&encode_frame(b"bad frame")).await;
                }
                trace.events.push((Instant::now(), Seen::Closed));
                return trace;
            }
        }
    };
    log.add("node", Dir::In, super::wire::describe_init(&init_body));
    let Ok(init) = Init::decode(&init_body[..]) else {
        if script.ack_before_checks {
            let _ = stream
                .write_all(&encode_frame(&Ack::default().encode_to_vec()))
                .await;
        }
        return trace;
    };
    let me = identity.public().as_bytes();
    let checks = (|| {
        if !script.skip_recipient_check && init.recipient_pubkey[..] != me[..] {
            return None;
        }
        if !valid_id(&init.id) {
            return None;
        }
        if script.ids_hex32_only
            && !(init.id.len() == 32
                && init
                    .id
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        {
            return None;
        }
        let sender = PublicKeyBytes::parse(&init.sender_pubkey).ok()?;
        let eph = PublicKeyBytes::parse(&init.ephemeral_pubkey).ok()?;
        let digest = digest3(
            &init.sender_pubkey,
            &init.recipient_pubkey,
            &init.ephemeral_pubkey,
        );
        let sig: [u8; 64] = init.signature[..].try_into().ok()?;
        if sender.verify(&digest, &sig).is_err() {
            // A broken relay may accept the high-S twin.
            if !(script.accept_high_s && sender.verify(&digest, &negate_s(&sig)).is_ok()) {
                return None;
            }
        }
        if !script.no_replay_cache
            && !shared
                .seen_ephemeral
                .lock()
                .insert(init.ephemeral_pubkey.to_vec())
        {
            return None;
        }
        Some((sender, eph))
    })();
    let Some((sender, remote_eph)) = checks else {
        if script.ack_before_checks {
            let ack = Ack {
                id: random_id(),
                init_id: init.id.clone(),
                ephemeral_pubkey: Bytes::copy_from_slice(KeyPair::generate().public().as_bytes()),
                signature: Bytes::from(vec![1; 64]),
            };
            log.add("relay", Dir::Out, "an Ack before the checks");
            let _ = stream.write_all(&encode_frame(&ack.encode_to_vec())).await;
        }
        log.note("Init refused: closing silently");
        return trace;
    };
    trace.identity = Some(sender);
    let eph = if script.reuse_ephemeral {
        KeyPair::from_secret_bytes(&[0x42; 32]).unwrap_or_else(|_| KeyPair::generate())
    } else {
        KeyPair::generate()
    };
    let mut ack = Ack {
        id: random_id(),
        init_id: init.id.clone(),
        ephemeral_pubkey: Bytes::copy_from_slice(eph.public().as_bytes()),
        signature: Bytes::new(),
    };
    let digest = digest3(me, sender.as_bytes(), eph.public().as_bytes());
    let mut sig = identity.sign(&digest);
    match script.ack {
        AckFault::None => {}
        AckFault::WrongInitId => ack.init_id = random_id(),
        AckFault::BadSignature => sig[40] ^= 1,
        AckFault::HighS => sig = negate_s(&sig),
        AckFault::OtherKey => sig = KeyPair::generate().sign(&digest),
        AckFault::EmptyId => ack.id.clear(),
        AckFault::BadEphemeral => {
            let mut k = ack.ephemeral_pubkey.to_vec();
            k[0] = 0x05;
            ack.ephemeral_pubkey = k.into();
        }
    }
    ack.signature = Bytes::copy_from_slice(&sig);
    let mut ack_body = ack.encode_to_vec();
    if let Some(len) = script.ack_len {
        let pad = super::wire::padding_field(15, len.saturating_sub(ack_body.len()));
        ack_body.extend(pad);
    }
    log.add("relay", Dir::Out, super::wire::describe_ack(&ack_body));
    let ack_wire = encode_frame(&ack_body);
    // Only a `Welcome` can carry the Ack: every other script writes it alone, at once.
    let held_ack = if script.ack_with_welcome
        && script.first == First::Welcome
        && script.ack != AckFault::BadEphemeral
    {
        Some(ack_wire)
    } else {
        if stream.write_all(&ack_wire).await.is_err() {
            return trace;
        }
        None
    };
    let ee = eph.ecdh(&remote_eph);
    let es = identity.ecdh(&remote_eph);
    let se = eph.ecdh(&sender);
    let transcript_init = if script.reencodes_init {
        init.encode_to_vec()
    } else {
        init_body.to_vec()
    };
    let (i2r, r2i) = derive(&transcript_init, &ack_body, &ee, &es, &se);
    let mut seal = FlexCipher::new(r2i);
    seal.rotate_shift = script.rotate_shift.or(Some(0));
    let mut open = FlexCipher::new(i2r);
    open.check_tag = !script.skip_tag_check;
    open.rotate_shift = script.rotate_open_shift.or(Some(0));
    let max_frame = script.welcome_max_frame_len.unwrap_or(1 << 20);
    let mut c = Conn {
        stream,
        buf,
        codec: FrameCodec::new(script.session_limit.unwrap_or(max_frame.max(1024))),
        seal,
        open,
        log,
        trace,
        script,
    };
    if script.ack == AckFault::BadEphemeral {
        // No keys: only watch whether the node sends anything.
        let _ = c.next(deadline).await;
        return c.trace;
    }
    let welcome = Welcome {
        protocol: script
            .welcome_protocol
            .unwrap_or(proto::PROTOCOL_NAME)
            .into(),
        server_version: "conformance".into(),
        max_frame_len: max_frame,
        max_payload_len: max_frame.saturating_sub(4096).max(1),
        ping_interval_ms: script.welcome_ping_interval_ms.unwrap_or(60_000),
        server_time_ms: super::unix_ms(),
        idle_timeout_ms: script.welcome_idle_timeout_ms.unwrap_or(600_000),
        relay_pubkey: if script.welcome_other_key {
            Bytes::copy_from_slice(KeyPair::generate().public().as_bytes())
        } else {
            Bytes::copy_from_slice(me)
        },
        ping_min_interval_ms: script.welcome_ping_min_interval_ms.unwrap_or(30_000),
    };
    let welcome_frame = Frame::new(0, Body::Welcome(welcome));
    let ok = match script.first {
        First::Welcome => {
            c.send_after(held_ack.as_deref().unwrap_or_default(), &welcome_frame)
                .await
        }
        First::ErrorFrame => {
            c.send(&Frame::error(0, ErrorCode::Internal, "not a Welcome"))
                .await
        }
        First::BadTagWelcome => {
            c.log.add(
                "relay",
                Dir::Out,
                format!("{} with a bad tag", describe(&welcome_frame)),
            );
            let wire = c.seal.seal_bad_tag(&welcome_frame.encode_to_vec());
            c.stream.write_all(&wire).await.is_ok()
        }
    };
    c.mark("welcome");
    if !ok {
        return c.trace;
    }
    if script.ping_once || script.ping_twice {
        c.send(&Frame::new(
            0,
            Body::Ping(proto::Ping {
                id: "relay-ping-1".into(),
            }),
        ))
        .await;
        c.mark("ping 1");
        if script.ping_twice {
            c.send(&Frame::new(
                0,
                Body::Ping(proto::Ping {
                    id: "relay-ping-2".into(),
                }),
            ))
            .await;
            c.mark("ping 2");
        }
    }
    app_loop(&mut c, identity, deadline).await;
    c.trace
}

/// A `Deliver` (id 0: the caller numbers it) of `payload` from a fresh identity, signed for
/// `recipient`'s `device` (`None`: for the stranger itself; the high-S twin of the signature if
/// `high_s`), with its device set to `device`.
fn stranger_deliver(
    recipient: Option<&PublicKeyBytes>,
    device: u32,
    payload: &Bytes,
    high_s: bool,
) -> proto::Deliver {
    let stranger = KeyPair::generate();
    let recipient = *recipient.unwrap_or(stranger.public());
    let mut signed =
        botd_client::OutgoingMessage::new(recipient, device, 1, payload.clone()).sign(&stranger);
    if high_s {
        let sig: [u8; 64] = signed.sender_signature[..].try_into().unwrap_or([0; 64]);
        signed.sender_signature = Bytes::copy_from_slice(&negate_s(&sig));
    }
    proto::Deliver {
        message_id: 0,
        sender: Bytes::copy_from_slice(stranger.public().as_bytes()),
        sender_device: 1,
        recipient_device: device,
        sender_nonce: signed.sender_nonce,
        payload_hash: signed.payload_hash,
        sender_signature: signed.sender_signature,
        payload: signed.payload,
        received_at_ms: super::unix_ms(),
    }
}

/// The scenario relay: in-memory mailbox of device 1 of the node's own identity.
async fn app_loop(c: &mut Conn<'_>, identity: &KeyPair, deadline: Instant) {
    let script = c.script;
    let mut last_ping: Option<Instant> = None;
    let ping_window = script.enforced_ping_window.unwrap_or(Duration::from_millis(
        script.welcome_ping_min_interval_ms.unwrap_or(30_000),
    ));
    let mut next_id = 1u64;
    let mut subscribed = false;
    let mut stored: Vec<proto::Deliver> = Vec::new();
    // Every real message, acknowledged or not, for forgeries built from them.
    let mut history: Vec<proto::Deliver> = Vec::new();
    let mut pending: VecDeque<(Option<Instant>, proto::Deliver, String)> = VecDeque::new();
    let mut sends = 0u32;
    let mut delivered = 0u32;
    for _ in 0..100_000 {
        // Deliveries whose time has come.
        while subscribed
            && pending
                .front()
                .is_some_and(|(at, _, _)| at.is_none_or(|t| t <= Instant::now()))
        {
            let Some((_, d, mark)) = pending.pop_front() else {
                break;
            };
            c.send(&Frame::new(0, Body::Deliver(d))).await;
            c.mark(&mark);
            delivered += 1;
            if script.slow_consumer_after_first && delivered == 1 {
                c.send(&Frame::error(0, ErrorCode::SlowConsumer, "conformance"))
                    .await;
                c.mark("slow consumer");
                return;
            }
        }
        let wake = pending
            .front()
            .and_then(|(at, _, _)| *at)
            .filter(|_| subscribed)
            .unwrap_or(deadline)
            .min(deadline);
        let Some(frame) = c.next(wake).await else {
            let failed = matches!(c.trace.events.last(), Some((_, Seen::Garbage(_))))
                || (c.trace.closed() && !c.buf.is_empty());
            if failed && script.error_before_close {
                c.send(&Frame::error(0, ErrorCode::BadRequest, "bad frame"))
                    .await;
            }
            if c.trace.closed() || Instant::now() >= deadline || failed {
                return;
            }
            continue;
        };
        let id = frame.id;
        let answer = match frame.body {
            Some(Body::Ping(p)) => {
                let now = Instant::now();
                if !script.answer_ping_flood && last_ping.is_some_and(|t| now - t < ping_window) {
                    c.send(&Frame::error(
                        id,
                        ErrorCode::PingFlood,
                        "more than one ping within 30s",
                    ))
                    .await;
                    return;
                }
                let id_ok = (1..=script.ping_id_max.unwrap_or(64)).contains(&p.id.len());
                if !id_ok && script.counts_malformed_pings {
                    last_ping = Some(now);
                }
                if id_ok {
                    if id != 0 || !script.id0_pings_not_counted {
                        last_ping = Some(now);
                    }
                    Some(Frame::new(
                        script.pong_frame_id.unwrap_or(id),
                        Body::Pong(Pong {
                            id: random_id(),
                            ping_id: if script.pong_wrong_ping_id {
                                random_id()
                            } else {
                                p.id
                            },
                        }),
                    ))
                } else {
                    Some(Frame::error(id, ErrorCode::BadRequest, "ping id"))
                }
            }
            Some(Body::Pong(p)) if script.answer_pongs => Some(Frame::new(
                id,
                Body::Pong(Pong {
                    id: random_id(),
                    ping_id: p.id,
                }),
            )),
            Some(Body::Pong(_)) | Some(Body::Error(_)) => None,
            Some(Body::Register(r)) => {
                if script.unknown_pushes {
                    let unknown = [field_varint(1, 0), field_bytes(201, b"future push")].concat();
                    c.send_raw_plain(&unknown, "Frame { id: 0, <unknown body 201> }")
                        .await;
                    let mut e = Frame::error(0, ErrorCode::Internal, "unknown code");
                    if let Some(Body::Error(err)) = e.body.as_mut() {
                        err.code = 99;
                    }
                    c.send(&e).await;
                    c.mark("unknown pushes");
                }
                for i in 0..script.pushes_before_registered {
                    // Unsolicited Pongs: never answered, and a node passes none to its application.
                    let f = Frame::new(
                        0,
                        Body::Pong(Pong {
                            id: format!("r{i}"),
                            ping_id: "none".into(),
                        }),
                    );
                    let wire = c.seal.seal(&f.encode_to_vec());
                    if !c.write(&wire).await {
                        return;
                    }
                }
                if script.pushes_before_registered > 0 {
                    c.log.add(
                        "relay",
                        Dir::Out,
                        format!("{} unsolicited Pongs", script.pushes_before_registered),
                    );
                    c.mark("pushes sent");
                }
                if script.push_at_limit {
                    let max = script.welcome_max_frame_len.unwrap_or(1 << 20) as usize;
                    let head = field_bytes(201, b"future push");
                    let pt = [
                        head.clone(),
                        super::wire::padding_field(15, max - 16 - head.len()),
                    ]
                    .concat();
                    c.send_raw_plain(
                        &pt,
                        &format!("Frame {{ id: 0, <unknown body 201>, padding }}: a {}-byte body, the announced limit", pt.len() + 16),
                    )
                    .await;
                    c.mark("at limit");
                }
                if let Some(bad) = script.bad_frame {
                    let (header, what) = match bad {
                        BadFrame::ZeroLength => (0u32, "length 0"),
                        BadFrame::Huge => (u32::MAX, "length 2^32 - 1, no body"),
                    };
                    c.log
                        .add("relay", Dir::Out, format!("{what}, instead of Registered"));
                    c.mark("bad frame");
                    if !c.write(&header.to_be_bytes()).await {
                        return;
                    }
                    continue;
                }
                let reg = Frame::new(
                    id,
                    Body::Registered(proto::Registered {
                        device_id: r.device_id,
                        one_time_prekeys: r.one_time_prekeys.len() as u32,
                    }),
                );
                if script.bad_tag_registered {
                    c.log.add(
                        "relay",
                        Dir::Out,
                        format!("{} with a bad tag", describe(&reg)),
                    );
                    c.mark("bad tag");
                    let wire = c.seal.seal_bad_tag(&reg.encode_to_vec());
                    if !c.write(&wire).await {
                        return;
                    }
                    continue;
                }
                if script.oversize_registered {
                    let max = script.welcome_max_frame_len.unwrap_or(1 << 20) as usize;
                    let mut pt = reg.encode_to_vec();
                    pt.extend(super::wire::padding_field(15, max + 100 - pt.len()));
                    c.send_raw_plain(
                        &pt,
                        &format!(
                            "{} padded to {} bytes, above the announced limit",
                            describe(&reg),
                            pt.len() + 16
                        ),
                    )
                    .await;
                    c.mark("oversize");
                    None
                } else {
                    Some(reg)
                }
            }
            Some(Body::Subscribe(s)) => {
                subscribed = true;
                if script.deliver_before_subscribed {
                    for d in stored.iter().filter(|d| d.message_id > s.after_id) {
                        c.send(&Frame::new(0, Body::Deliver(d.clone()))).await;
                    }
                    stored.retain(|d| d.message_id <= s.after_id);
                }
                c.send(&Frame::new(
                    id,
                    Body::Subscribed(proto::Subscribed {
                        device_id: s.device_id,
                        last_id: next_id - 1,
                    }),
                ))
                .await;
                if let Some(code) = script.push_error_after_subscribed {
                    c.send(&Frame::error(0, code, "conformance")).await;
                    c.mark("error pushed");
                    // Closes a little later than a relay would, to see whether the node
                    // answers the push.
                    let linger = (Instant::now() + Duration::from_millis(500)).min(deadline);
                    for _ in 0..100 {
                        if c.next(linger).await.is_none() {
                            break;
                        }
                    }
                    return;
                }
                if script.replaced_after_subscribed {
                    c.send(&Frame::error(0, ErrorCode::Replaced, "conformance"))
                        .await;
                    c.mark("replaced");
                }
                for d in stored.iter().filter(|d| d.message_id > s.after_id) {
                    pending.push_back((None, d.clone(), format!("deliver {}", d.message_id)));
                }
                None
            }
            Some(Body::Send(s)) => {
                sends += 1;
                if sends == 1 && script.rate_limit_first_send.is_some() {
                    let mut e = Frame::error(id, ErrorCode::RateLimited, "conformance");
                    if let Some(Body::Error(err)) = e.body.as_mut() {
                        err.retry_after_ms = script.rate_limit_first_send.unwrap_or(1);
                    }
                    c.send(&e).await;
                    c.mark("rate limited");
                    continue;
                }
                let real = |message_id: u64| proto::Deliver {
                    message_id,
                    sender: Bytes::copy_from_slice(
                        c.trace
                            .identity
                            .map(|k| *k.as_bytes())
                            .unwrap_or([0; 33])
                            .as_slice(),
                    ),
                    sender_device: s.sender_device,
                    recipient_device: s.recipient_device,
                    sender_nonce: s.sender_nonce.clone(),
                    payload_hash: s.payload_hash.clone(),
                    sender_signature: s.sender_signature.clone(),
                    payload: s.payload.clone(),
                    received_at_ms: super::unix_ms(),
                };
                let second = sends >= 2 + u32::from(script.rate_limit_first_send.is_some());
                let forged = match (script.deliver, second) {
                    (DeliverFault::None, _) | (_, false) => None,
                    (DeliverFault::BadSignature, true) => {
                        let mut f = real(0);
                        f.sender_signature = Bytes::from(vec![0x5a; 64]);
                        Some(f)
                    }
                    (DeliverFault::BadHash, true) => history.first().cloned().map(|mut f| {
                        f.message_id = 0;
                        f.payload = s.payload.clone();
                        f
                    }),
                    (DeliverFault::WrongDevice, true) => {
                        let me = c.trace.identity.unwrap_or(*identity.public());
                        Some(stranger_deliver(Some(&me), 2, &s.payload, false))
                    }
                    (DeliverFault::OtherRecipient, true) => {
                        Some(stranger_deliver(None, 1, &s.payload, false))
                    }
                    (DeliverFault::HighS, true) => {
                        let me = c.trace.identity.unwrap_or(*identity.public());
                        Some(stranger_deliver(Some(&me), 1, &s.payload, true))
                    }
                    (DeliverFault::DuplicateId, true) => {
                        history.first().map(|first| real(first.message_id))
                    }
                };
                let delay = forged
                    .as_ref()
                    .map(|_| Duration::from_millis(1000))
                    .or(script.hold_second.filter(|_| second))
                    .map(|d| Instant::now() + d);
                if let Some(mut f) = forged {
                    if f.message_id == 0 {
                        f.message_id = next_id;
                        next_id += 1;
                    }
                    pending.push_back((None, f, "forged".into()));
                }
                let d = real(next_id);
                pending.push_back((
                    delay,
                    d.clone(),
                    if delay.is_some() {
                        "real second".into()
                    } else {
                        format!("deliver {next_id}")
                    },
                ));
                stored.push(d.clone());
                history.push(d);
                next_id += 1;
                Some(Frame::new(
                    id,
                    Body::Sent(proto::Sent {
                        message_id: next_id - 1,
                        duplicate: false,
                    }),
                ))
            }
            Some(Body::AckMessages(a)) => {
                let before = stored.len();
                stored.retain(|d| !a.message_ids.contains(&d.message_id));
                Some(Frame::new(
                    id,
                    Body::Acked(proto::Acked {
                        deleted: (before - stored.len()) as u32,
                    }),
                ))
            }
            Some(Body::Unregister(u)) => {
                c.mark("unregister");
                Some(Frame::new(
                    id,
                    Body::Unregistered(proto::Unregistered {
                        device_id: u.device_id,
                    }),
                ))
            }
            Some(Body::GetPreKeyCount(g)) => Some(Frame::new(
                id,
                Body::PreKeyCount(proto::PreKeyCount {
                    device_id: g.device_id,
                    count: 0,
                }),
            )),
            other => botd_protocol::proto::unsupported_unless_ignorable(&Frame { id, body: other })
                .map(|answer| {
                    if script.unsupported_as_bad_request {
                        Frame::error(id, ErrorCode::BadRequest, "not served")
                    } else {
                        answer
                    }
                }),
        };
        if let Some(a) = answer {
            if !c.send(&a).await {
                return;
            }
        }
    }
}
