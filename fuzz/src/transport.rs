//! The wire below the application: framing, both handshake roles, sealed frames and the
//! session rules.

use std::sync::OnceLock;
use std::time::Duration;

use bytes::BytesMut;
use prost::Message;
use std::time::Instant;

use super::input::Input;
use super::{cap, Outcome};
use botd_protocol::cipher::{CipherError, DirectionKeys, Opener, Sealer, TAG_LEN};
use botd_protocol::codec::{frame_len_at_front, CodecError, FrameCodec, LEN_PREFIX};
use botd_protocol::handshake::{respond, respond_with, AwaitingAck, HandshakeError, SessionKeys};
use botd_protocol::keys::KeyPair;
use botd_protocol::proto::{valid_id, Ack, Body, ErrorCode, Frame, Init, Welcome, PROTOCOL_NAME};
use botd_protocol::replay::ReplayCache;
use botd_protocol::session::{Received, Session, SessionError, Timers};

/// The frame limit before the handshake completes (docs/PROTOCOL.md §3).
pub(super) const HANDSHAKE_FRAME_LIMIT: usize = 1024;
/// The ids of the initiator's `Init` and the responder's `Ack` in the handshake fixtures.
pub(super) const INIT_ID: &str = "fuzz-init";
pub(super) const ACK_ID: &str = "fuzz-ack";

/// Fixed keys, so that every input means the same thing on every run.
pub(super) struct Keys {
    pub(super) relay: KeyPair,
    pub(super) alice: KeyPair,
    pub(super) bob: KeyPair,
}

const RELAY_SECRET: [u8; 32] = [0x11; 32];
const ALICE_SECRET: [u8; 32] = [0x22; 32];
const BOB_SECRET: [u8; 32] = [0x33; 32];
const INITIATOR_EPHEMERAL: [u8; 32] = [0x44; 32];
const RESPONDER_EPHEMERAL: [u8; 32] = [0x55; 32];

fn pair(secret: &[u8; 32]) -> KeyPair {
    KeyPair::from_secret_bytes(secret).expect("a valid secret")
}

pub(super) fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys {
        relay: pair(&RELAY_SECRET),
        alice: pair(&ALICE_SECRET),
        bob: pair(&BOB_SECRET),
    })
}

/// The ephemeral key of the fixture initiator (alice dialling the relay).
pub(super) fn initiator_ephemeral() -> KeyPair {
    pair(&INITIATOR_EPHEMERAL)
}

/// The ephemeral key of the fixture responder (the relay).
pub(super) fn responder_ephemeral() -> KeyPair {
    pair(&RESPONDER_EPHEMERAL)
}

/// The node-to-relay direction's keys of the sealed-frame targets.
pub(super) fn node_keys() -> DirectionKeys {
    DirectionKeys {
        enc: [0x01; 32],
        mac: [0x02; 32],
    }
}

/// The relay-to-node direction's keys of the sealed-frame targets.
pub(super) fn relay_keys() -> DirectionKeys {
    DirectionKeys {
        enc: [0x03; 32],
        mac: [0x04; 32],
    }
}

/// Keys of a plain sealer/opener pair (no session around it).
pub(super) fn raw_keys() -> DirectionKeys {
    DirectionKeys {
        enc: [0x05; 32],
        mac: [0x06; 32],
    }
}

fn relay_timers() -> Timers {
    Timers {
        ping_min_interval: Duration::from_secs(30),
        probe_after: Some(Duration::from_secs(60)),
        keepalive_after: None,
        pong_timeout: Duration::from_secs(20),
        idle_timeout: Some(Duration::from_secs(300)),
    }
}

fn node_timers() -> Timers {
    Timers {
        ping_min_interval: Duration::from_secs(30),
        probe_after: None,
        keepalive_after: Some(Duration::from_secs(120)),
        pong_timeout: Duration::from_secs(20),
        idle_timeout: None,
    }
}

/// The largest frame body the sessions of these targets accept from each other.
const SESSION_FRAME_LIMIT: u32 = 1 << 20;

pub(super) fn relay_session(now: Instant) -> Session {
    let keys = SessionKeys {
        send: relay_keys(),
        recv: node_keys(),
    };
    Session::responder(keys, relay_timers(), SESSION_FRAME_LIMIT, now)
}

fn node_session(now: Instant) -> Session {
    let keys = SessionKeys {
        send: node_keys(),
        recv: relay_keys(),
    };
    Session::initiator(keys, node_timers(), SESSION_FRAME_LIMIT, now)
}

// ---------------------------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------------------------

/// How a byte stream ends for the framing layer.
#[derive(Debug, PartialEq, Eq)]
enum StreamEnd {
    Clean,
    Empty,
    TooLong { len: u32, max: u32 },
    Truncated { buffered: usize },
}

impl StreamEnd {
    fn of(err: &CodecError) -> Self {
        match err {
            CodecError::EmptyFrame => StreamEnd::Empty,
            CodecError::FrameTooLong { len, max } => StreamEnd::TooLong {
                len: *len,
                max: *max,
            },
            CodecError::Truncated { buffered } => StreamEnd::Truncated {
                buffered: *buffered,
            },
            CodecError::Io(err) => panic!("the codec reported i/o without any i/o: {err}"),
        }
    }
}

/// docs/PROTOCOL.md §3 read literally: the frames of `stream`, and how it ends. The first
/// frame is held to `first_max`, the others to `then_max`.
fn reference_frames(stream: &[u8], first_max: u32, then_max: u32) -> (Vec<&[u8]>, StreamEnd) {
    let mut frames = Vec::new();
    let mut rest = stream;
    let mut max = first_max;
    loop {
        if rest.is_empty() {
            return (frames, StreamEnd::Clean);
        }
        if rest.len() < LEN_PREFIX {
            return (
                frames,
                StreamEnd::Truncated {
                    buffered: rest.len(),
                },
            );
        }
        let len = u32::from_be_bytes(rest[..LEN_PREFIX].try_into().expect("4 bytes"));
        if len == 0 {
            return (frames, StreamEnd::Empty);
        }
        if len > max {
            return (frames, StreamEnd::TooLong { len, max });
        }
        let end = LEN_PREFIX + len as usize;
        if rest.len() < end {
            return (
                frames,
                StreamEnd::Truncated {
                    buffered: rest.len(),
                },
            );
        }
        frames.push(&rest[LEN_PREFIX..end]);
        rest = &rest[end..];
        max = then_max;
    }
}

/// `FrameCodec` over an arbitrary byte stream, fed in arbitrary pieces, against
/// [`reference_frames`]. The limit changes after the first frame, as a connection's does after
/// the handshake. Input: first limit (u16 + 1), later limit (u16 + 1), piece count (u8 % 16),
/// piece lengths (u16 each), then the stream.
pub fn frame_codec(data: &[u8]) -> Outcome {
    let mut input = Input::new(cap(data, 1 << 16));
    let first_max = u32::from(input.u16()) + 1;
    let then_max = u32::from(input.u16()) + 1;
    let pieces = input.u8() % 16;
    let mut cuts: Vec<usize> = (0..pieces).map(|_| usize::from(input.u16())).collect();
    let stream = input.rest();
    cuts.push(stream.len());

    let mut codec = FrameCodec::new(first_max);
    let mut buf = BytesMut::new();
    let mut frames: Vec<BytesMut> = Vec::new();
    let mut end = None;
    let mut fed = 0;
    'feed: for cut in cuts {
        let n = cut.min(stream.len() - fed);
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        loop {
            let (len, capacity) = (buf.len(), buf.capacity());
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(!frame.is_empty() && frame.len() <= codec.max_frame_len() as usize);
                    frames.push(frame);
                    codec.set_max_frame_len(then_max);
                }
                Ok(None) => {
                    assert_eq!(
                        (buf.len(), buf.capacity()),
                        (len, capacity),
                        "waiting for more bytes changes nothing"
                    );
                    assert!(frame_len_at_front(&buf).is_none_or(|total| buf.len() < total));
                    break;
                }
                Err(err) => {
                    assert_eq!(buf.capacity(), capacity, "a refused frame reserves nothing");
                    end = Some(StreamEnd::of(&err));
                    break 'feed;
                }
            }
        }
    }
    let end = end.unwrap_or_else(|| loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => break StreamEnd::Clean,
            Err(err) => break StreamEnd::of(&err),
        }
    });
    let (expected, expected_end) = reference_frames(stream, first_max, then_max);
    let got: Vec<&[u8]> = frames.iter().map(|f| &f[..]).collect();
    assert_eq!(got, expected, "frames");
    assert_eq!(end, expected_end, "end of stream");
    format!("{} frames, {end:?}", got.len())
}

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

/// The responder (the relay) on an arbitrary `Init` body. Checks that `is_fresh` is asked only
/// once everything else holds, that an accepted `Init` gets an `Ack` that answers it and fits
/// the handshake's frame limit, that the same `Init` again is a replay, and that an initiator
/// holding the ephemeral secret derives the mirrored keys.
pub fn handshake_init(data: &[u8]) -> Outcome {
    let body = cap(data, 4096);
    let keys = keys();
    let mut asked = 0;
    let outcome = respond_with(
        &keys.relay,
        body,
        |_| {
            asked += 1;
            true
        },
        responder_ephemeral(),
        ACK_ID.into(),
    );
    let (response, schedule) = match outcome {
        Err(err) => {
            assert_ne!(err, HandshakeError::Replay, "every key is fresh here");
            assert_eq!(asked, 0, "freshness is asked last ({err})");
            assert!(!err.reason().is_empty());
            return format!("refused: {}", err.reason());
        }
        Ok(accepted) => accepted,
    };
    assert_eq!(asked, 1);
    let init = Init::decode(body).expect("an accepted Init decodes");
    assert_eq!(
        &response.established.remote.as_bytes()[..],
        &init.sender_pubkey[..]
    );
    assert!(response.ack_body.len() <= HANDSHAKE_FRAME_LIMIT);
    let ack = Ack::decode(&response.ack_body[..]).expect("our Ack decodes");
    assert_eq!(ack.init_id, init.id);
    assert_eq!(ack.id, ACK_ID);
    let established = &response.established;
    assert!(established.keys.send == schedule.responder_to_initiator());
    assert!(established.keys.recv == schedule.initiator_to_responder());
    assert!(established.keys.send != established.keys.recv);
    assert_eq!(established.transcript, schedule.transcript);

    let mut seen = ReplayCache::new(4);
    assert!(respond(&keys.relay, body, |key| seen.insert(key)).is_ok());
    assert_eq!(
        respond(&keys.relay, body, |key| seen.insert(key)).err(),
        Some(HandshakeError::Replay)
    );

    let ephemeral = initiator_ephemeral();
    if init.sender_pubkey[..] == keys.alice.public().as_bytes()[..]
        && init.ephemeral_pubkey[..] == ephemeral.public().as_bytes()[..]
    {
        let (waiting, own) =
            AwaitingAck::start_with(&keys.alice, *keys.relay.public(), ephemeral, init.id);
        // The transcript binds the exact bytes: only the initiator that sent this very body
        // shares the keys.
        if own[..] == body[..] {
            let done = waiting
                .on_ack(&keys.alice, &response.ack_body)
                .expect("the initiator accepts the Ack to its own Init");
            assert!(done.keys.send == established.keys.recv);
            assert!(done.keys.recv == established.keys.send);
            assert_eq!(done.transcript, established.transcript);
            return "accepted, the initiator agrees".into();
        }
    }
    "accepted".into()
}

/// The initiator (alice dialling the relay) on an arbitrary `Ack` body: `schedule` and `on_ack`
/// agree, an accepted `Ack` answers our `Init`, and the responder that sent exactly these bytes
/// holds the mirrored keys.
pub fn handshake_ack(data: &[u8]) -> Outcome {
    let body = cap(data, 4096);
    let keys = keys();
    let start = || {
        AwaitingAck::start_with(
            &keys.alice,
            *keys.relay.public(),
            initiator_ephemeral(),
            INIT_ID.into(),
        )
    };
    let (waiting, init_body) = start();
    let scheduled = waiting.schedule(&keys.alice, body);
    let established = waiting.on_ack(&keys.alice, body);
    let (schedule, established) = match (scheduled, established) {
        (Err(a), Err(b)) => {
            assert_eq!(a, b, "schedule and on_ack refuse alike");
            assert!(!a.reason().is_empty());
            return format!("refused: {}", a.reason());
        }
        (Ok(schedule), Ok(established)) => (schedule, established),
        (a, b) => panic!(
            "schedule and on_ack disagree: {:?} vs {:?}",
            a.err(),
            b.err()
        ),
    };
    assert_eq!(established.remote, *keys.relay.public());
    assert!(established.keys.send == schedule.initiator_to_responder());
    assert!(established.keys.recv == schedule.responder_to_initiator());
    assert_eq!(established.transcript, schedule.transcript);
    let ack = Ack::decode(body).expect("an accepted Ack decodes");
    assert_eq!(ack.init_id, INIT_ID);
    assert!(valid_id(&ack.id));

    if ack.ephemeral_pubkey[..] == responder_ephemeral().public().as_bytes()[..] {
        let (response, _) = respond_with(
            &keys.relay,
            &init_body,
            |_| true,
            responder_ephemeral(),
            ack.id,
        )
        .expect("the relay accepts our own Init");
        if response.ack_body[..] == body[..] {
            assert!(response.established.keys.send == established.keys.recv);
            assert!(response.established.keys.recv == established.keys.send);
            return "accepted, the responder agrees".into();
        }
    }
    "accepted".into()
}

// ---------------------------------------------------------------------------------------------
// Sealed frames
// ---------------------------------------------------------------------------------------------

/// A failed open leaves the counter where it was, and says `Truncated` exactly for bodies
/// shorter than the tag.
fn check_open_failure(err: &CipherError, body_len: usize) {
    match err {
        CipherError::Truncated => assert!(body_len < TAG_LEN),
        CipherError::BadTag => assert!(body_len >= TAG_LEN),
    }
}

/// Arbitrary frame bodies into `Opener::open` and into both roles' `Session::on_frame` (the
/// keys are fixed, so seeds can hold frames sealed correctly for the first counters). Input:
/// steps of `which (u8 % 3)` and a body (chunk).
pub fn sealed_open(data: &[u8]) -> Outcome {
    let mut input = Input::new(cap(data, 1 << 16));
    let now = Instant::now();
    let mut opener = Opener::new(node_keys());
    let mut sessions = [Some(relay_session(now)), Some(node_session(now))];
    // Frames each of the opener, the relay session and the node session took, and how each
    // session ended.
    let mut taken = [0usize; 3];
    let mut ends: [Option<&'static str>; 2] = [None, None];
    for _ in 0..1024 {
        if input.is_empty() {
            break;
        }
        let which = usize::from(input.u8() % 3);
        let body = input.chunk();
        if which == 0 {
            let seq = opener.seq();
            match opener.open(BytesMut::from(body)) {
                Ok(plaintext) => {
                    assert_eq!(plaintext.len() + TAG_LEN, body.len());
                    assert_eq!(opener.seq(), seq + 1);
                    taken[0] += 1;
                }
                Err(err) => {
                    check_open_failure(&err, body.len());
                    assert_eq!(opener.seq(), seq, "a failed frame leaves the counter");
                }
            }
            continue;
        }
        let slot = &mut sessions[which - 1];
        let Some(session) = slot else {
            continue;
        };
        match session.on_frame(BytesMut::from(body), now) {
            Ok(received) => {
                taken[which] += 1;
                if let Received::Reply(reply) = received {
                    session.send(&reply).expect("a reply fits");
                }
            }
            Err(err) => {
                if let SessionError::Cipher(err) = &err {
                    check_open_failure(err, body.len());
                }
                // A session that failed is closed.
                ends[which - 1] = Some(err.reason());
                *slot = None;
            }
        }
    }
    let end = |end: Option<&str>| end.map_or("open".to_string(), |why| format!("closed ({why})"));
    format!(
        "opener took {}; relay took {}, {}; node took {}, {}",
        taken[0],
        taken[1],
        end(ends[0]),
        taken[2],
        end(ends[1])
    )
}

/// The wire frames of a sealed run: each body, checked to be framed and tagged.
fn wire_bodies(wire: &[u8]) -> Vec<BytesMut> {
    let mut bodies = Vec::new();
    let mut rest = wire;
    while !rest.is_empty() {
        let total = frame_len_at_front(rest).expect("whole frames");
        assert!(
            total - LEN_PREFIX >= TAG_LEN && total - LEN_PREFIX <= SESSION_FRAME_LIMIT as usize
        );
        bodies.push(BytesMut::from(&rest[LEN_PREFIX..total]));
        rest = &rest[total..];
    }
    bodies
}

/// The two ends of one session, a relay (responder) and a node (initiator).
struct Pair {
    relay: Session,
    node: Session,
    /// The node has accepted the relay's `Welcome`.
    welcomed: bool,
}

/// The side a step acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Relay,
    Node,
}

impl Side {
    fn of(bit: u8) -> Self {
        if bit & 1 == 0 {
            Side::Relay
        } else {
            Side::Node
        }
    }

    fn peer(self) -> Self {
        match self {
            Side::Relay => Side::Node,
            Side::Node => Side::Relay,
        }
    }
}

/// The session ended (as a connection would close).
struct Closed;

impl Pair {
    fn get(&mut self, side: Side) -> &mut Session {
        match side {
            Side::Relay => &mut self.relay,
            Side::Node => &mut self.node,
        }
    }

    /// What `to` makes of a frame its peer sealed; replies are queued as a connection would.
    fn receive(
        &mut self,
        to: Side,
        body: BytesMut,
        now: Instant,
    ) -> Result<Received, SessionError> {
        let received = self.get(to).on_frame(body, now)?;
        match &received {
            Received::Reply(reply) => self.get(to).send(reply).expect("a reply fits"),
            Received::Frame(Frame {
                body: Some(Body::Welcome(_)),
                ..
            }) if to == Side::Node => self.welcomed = true,
            _ => {}
        }
        Ok(received)
    }

    /// Delivers everything `from` has sealed to its peer, in order. The frames a session seals
    /// itself must open at its peer; the peer may still close the session by its rules.
    fn deliver(&mut self, from: Side, now: Instant) -> Result<(), Closed> {
        let Some(wire) = self.get(from).poll_transmit() else {
            return Ok(());
        };
        self.get(from).mark_sent(now);
        for body in wire_bodies(&wire) {
            match self.receive(from.peer(), body, now) {
                Ok(_) => {}
                Err(SessionError::PingFlood(_)) => return Err(Closed),
                Err(SessionError::ExpectedWelcome) if from == Side::Relay && !self.welcomed => {
                    return Err(Closed)
                }
                Err(err) => panic!("a frame {from:?} sealed itself was refused: {err}"),
            }
        }
        Ok(())
    }

    /// Delivers both ways until nothing is left. Sessions answer pings and requests, never
    /// answers, so this ends within a few rounds.
    fn settle(&mut self, now: Instant) -> Result<(), Closed> {
        for _ in 0..8 {
            if self.relay.transmit_len() == 0 && self.node.transmit_len() == 0 {
                return Ok(());
            }
            self.deliver(Side::Relay, now)?;
            self.deliver(Side::Node, now)?;
        }
        panic!("the two sessions keep answering each other");
    }

    /// `from` seals `plaintext` (any bytes, not necessarily a `Frame`) and its peer opens it;
    /// what the peer makes of it is checked against decoding the plaintext here.
    fn inject(
        &mut self,
        from: Side,
        plaintext: &[u8],
        corrupt: Option<u16>,
        now: Instant,
    ) -> Result<(), Closed> {
        // Whatever `from` sealed before goes first: the counters of a direction are shared.
        self.deliver(from, now)?;
        let wire = self.get(from).seal_plaintext(plaintext);
        let mut body = wire_bodies(&wire).pop().expect("one frame");
        assert_eq!(body.len(), plaintext.len() + TAG_LEN);
        let to = from.peer();
        if let Some(at) = corrupt {
            let at = usize::from(at) % body.len();
            body[at] ^= 1 << (at % 8);
            let received = self.get(to).on_frame(body, now);
            assert_eq!(
                received.err(),
                Some(SessionError::Cipher(CipherError::BadTag))
            );
            return Err(Closed);
        }
        let awaiting_welcome = to == Side::Node && !self.welcomed;
        let initiator = to == Side::Node;
        let received = self.receive(to, body, now);
        let decoded = Frame::decode(plaintext);
        match (decoded, &received) {
            (Ok(frame), Ok(Received::Frame(up))) if awaiting_welcome => {
                assert!(matches!(frame.body, Some(Body::Welcome(_))));
                assert_eq!(*up, frame);
            }
            (Ok(frame), Err(SessionError::ExpectedWelcome)) if awaiting_welcome => {
                assert!(!matches!(frame.body, Some(Body::Welcome(_))));
            }
            (Err(_), Err(SessionError::ExpectedWelcome)) if awaiting_welcome => {}
            (Err(_), Ok(Received::Reply(reply))) => {
                assert_eq!(reply.id, 0);
                assert_eq!(error_code(reply), Some(ErrorCode::BadRequest));
            }
            (Ok(frame), received) => check_frame(initiator, &frame, received),
            (Err(err), received) => panic!("plaintext does not decode ({err}) but: {received:?}"),
        }
        match received {
            Ok(_) => Ok(()),
            Err(_) => Err(Closed),
        }
    }
}

fn error_code(frame: &Frame) -> Option<ErrorCode> {
    match &frame.body {
        Some(Body::Error(error)) => ErrorCode::try_from(error.code).ok(),
        _ => None,
    }
}

/// What an open session must make of a decoded frame.
fn check_frame(initiator: bool, frame: &Frame, received: &Result<Received, SessionError>) {
    match (&frame.body, received) {
        (Some(Body::Ping(_)), Err(SessionError::PingFlood(_))) => {}
        (Some(Body::Ping(ping)), Ok(Received::Reply(reply))) => {
            assert_eq!(reply.id, frame.id);
            match &reply.body {
                Some(Body::Pong(pong)) => {
                    assert!(valid_id(&ping.id));
                    assert_eq!(pong.ping_id, ping.id);
                    assert!(valid_id(&pong.id));
                }
                _ => {
                    assert!(!valid_id(&ping.id));
                    assert_eq!(error_code(reply), Some(ErrorCode::BadRequest));
                }
            }
        }
        (None, Ok(Received::Nothing)) => assert!(initiator && frame.id == 0),
        (None, Ok(Received::Reply(reply))) => {
            assert!(!(initiator && frame.id == 0));
            assert_eq!(reply.id, frame.id);
            assert_eq!(error_code(reply), Some(ErrorCode::Unsupported));
        }
        (Some(body), Ok(Received::Frame(up))) => {
            assert!(!matches!(body, Body::Ping(_)));
            assert_eq!(up, frame);
        }
        (body, received) => panic!("frame with body {body:?} was handled as {received:?}"),
    }
}

/// A relay session and a node session talking to each other, with arbitrary plaintexts sealed
/// correctly by either side so that they reach `Frame` decoding and the session rules (Welcome
/// first, pings and pongs, the 30-second rule, timeouts, key rotation after 1024 frames). Each
/// step is one byte: the low three bits choose the action, bit 3 the side, bit 6 corrupts an
/// injected frame (a u16 position follows), bit 7 advances the clock (a u16 of 100 ms steps
/// follows). Actions: 0 inject a plaintext (chunk), 1 Welcome from the relay, 2 ping (u16
/// frame id), 3 run the timers, 4 a plain seal/open round trip (chunk), 5 release idle memory,
/// 6/7 deliver.
pub fn session_plaintext(data: &[u8]) -> Outcome {
    let mut input = Input::new(cap(data, 1 << 16));
    let mut now = Instant::now();
    let mut pair = Pair {
        relay: relay_session(now),
        node: node_session(now),
        welcomed: false,
    };
    let mut raw = (Sealer::new(raw_keys()), Opener::new(raw_keys()));
    let mut steps = 0;
    for _ in 0..4096 {
        if input.is_empty() {
            break;
        }
        steps += 1;
        let op = input.u8();
        let side = Side::of(op >> 3);
        let corrupt = (op & 0x40 != 0).then(|| input.u16());
        if op & 0x80 != 0 {
            now += Duration::from_millis(u64::from(input.u16()) * 100);
        }
        let step = match op & 7 {
            0 => {
                let plaintext = input.chunk();
                pair.inject(side, plaintext, corrupt, now)
            }
            1 => {
                let welcome = Welcome {
                    protocol: PROTOCOL_NAME.into(),
                    max_frame_len: SESSION_FRAME_LIMIT,
                    ping_min_interval_ms: 30_000,
                    ..Welcome::default()
                };
                pair.relay.send_welcome(welcome).expect("Welcome fits");
                Ok(())
            }
            2 => {
                let frame_id = u64::from(input.u16());
                pair.get(side).ping(frame_id, now).expect("a ping fits");
                Ok(())
            }
            3 => timers(&mut pair, now),
            4 => {
                let plaintext = input.chunk();
                let wire = raw.0.seal(plaintext);
                let body = wire_bodies(&wire).pop().expect("one frame");
                let opened = raw.1.open(body).expect("a sealed frame opens");
                assert_eq!(&opened[..], plaintext);
                assert_eq!(raw.0.seq(), raw.1.seq());
                Ok(())
            }
            5 => {
                pair.get(side).release_idle_memory();
                Ok(())
            }
            _ => pair.deliver(side, now),
        };
        if step.and_then(|()| pair.settle(now)).is_err() {
            return format!("closed at step {steps}, welcomed: {}", pair.welcomed);
        }
    }
    format!("{steps} steps, open, welcomed: {}", pair.welcomed)
}

/// Runs both sessions' timers at `now`; a session that gives up says why in a frame first.
fn timers(pair: &mut Pair, now: Instant) -> Result<(), Closed> {
    for side in [Side::Relay, Side::Node] {
        let session = pair.get(side);
        let deadline = session.next_deadline();
        if let Err(err) = session.on_timeout(now) {
            assert!(
                matches!(err, SessionError::PongTimeout(_) | SessionError::Idle(_)),
                "{err}"
            );
            assert!(now >= deadline, "closed before its deadline");
            assert!(session.transmit_len() > 0, "a closing session says why");
            return Err(Closed);
        }
    }
    Ok(())
}
