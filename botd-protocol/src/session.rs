//! An established botd/1 session without IO: it opens incoming frame bodies, seals outgoing
//! frames into one output buffer, and enforces the session rules (Welcome first, the
//! 30-second ping rule, liveness probes, idle and pong timeouts). Time is passed in; the caller
//! sleeps until [`Session::next_deadline`] and then calls [`Session::on_timeout`].
//!
//! Session-level answers (a `Pong`, or an `Error` for a plaintext that is not a `Frame` or a
//! frame without a known body) are handed back as [`Received::Reply`] rather than sealed at
//! once, so that the caller can send them in turn with the answers to earlier requests.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prost::Message;
use std::time::Instant;

use super::cipher::{CipherError, Opener, Sealer, TAG_LEN};
use super::handshake::SessionKeys;
use crate::proto::{random_id, valid_id, Body, ErrorCode, Frame, Ping, Pong, Welcome};

/// Extra wait beyond the peer's ping interval before we ping again.
pub const OWN_PING_MARGIN: Duration = Duration::from_secs(1);

/// An emptied output buffer keeps at most this much capacity for the next frames (enough for
/// a 256 KiB payload's `Deliver`, so large messages do not allocate their output each time);
/// [`Session::release_idle_memory`] gives it all back once the session is quiet.
const IDLE_OUTBOX_CAPACITY: usize = 512 * 1024;
/// The first allocation of an empty output buffer: room for a few small frames (it grows for
/// a burst).
const OUTBOX_START: usize = 4 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("{0}")]
    Cipher(#[from] CipherError),
    #[error("peer pinged twice within {0:?}")]
    PingFlood(Duration),
    #[error("no pong within {0:?}")]
    PongTimeout(Duration),
    #[error("idle for {0:?}")]
    Idle(Duration),
    #[error("first frame from the responder was not Welcome")]
    ExpectedWelcome,
    #[error("frame of {len} bytes exceeds the peer's limit of {max}")]
    FrameTooLarge { len: usize, max: u32 },
}

impl SessionError {
    /// Short stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            SessionError::Cipher(CipherError::BadTag) => "bad_tag",
            SessionError::Cipher(CipherError::Truncated) => "truncated_frame",
            SessionError::PingFlood(_) => "ping_flood",
            SessionError::PongTimeout(_) => "pong_timeout",
            SessionError::Idle(_) => "idle",
            SessionError::ExpectedWelcome => "expected_welcome",
            SessionError::FrameTooLarge { .. } => "frame_too_large",
        }
    }
}

/// The timing rules of one side of a session.
#[derive(Debug, Clone)]
pub struct Timers {
    /// A peer may ping at most once per this interval (BOTD: 30 s); we keep to it too.
    pub ping_min_interval: Duration,
    /// Ping the peer when nothing was received from it for this long.
    pub probe_after: Option<Duration>,
    /// Ping the peer when nothing was sent to it for this long (keeps our own session alive).
    pub keepalive_after: Option<Duration>,
    /// How long an unanswered ping may stay unanswered.
    pub pong_timeout: Duration,
    /// Close when the peer sent nothing but Pongs for this long.
    pub idle_timeout: Option<Duration>,
}

impl Timers {
    /// A node's timers until `Welcome` says more: BOTD's 30 s ping rule, 20 s for a Pong, and
    /// no pings of its own.
    pub fn initiator() -> Self {
        Self {
            ping_min_interval: Duration::from_secs(30),
            probe_after: None,
            keepalive_after: None,
            pong_timeout: Duration::from_secs(20),
            idle_timeout: None,
        }
    }
}

/// What an opened frame means for the caller.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    /// A frame for the layer above: a request, an answer, a push, or a `Pong` (a client may be
    /// waiting for it).
    Frame(Frame),
    /// A session-level answer to send in its turn: a `Pong`, or an `Error` for a plaintext
    /// that is not a `Frame` or a frame without a known body.
    Reply(Frame),
    /// Nothing for the caller (an accepted `Welcome` is passed up as a frame).
    Nothing,
}

/// What the session is waiting for from the peer.
#[derive(Debug)]
enum Phase {
    /// Initiator only: the responder's first encrypted frame must be `Welcome`.
    AwaitingWelcome,
    Open,
}

#[derive(Debug)]
enum Liveness {
    Quiet,
    AwaitingPong { ping_id: String, deadline: Instant },
}

pub struct Session {
    sealer: Sealer,
    opener: Opener,
    phase: Phase,
    timers: Timers,
    /// Largest frame body the peer accepts.
    peer_max_frame_len: u32,
    last_received: Instant,
    last_active: Instant,
    /// When we last sent something other than a Pong (our own Pongs do not keep us alive).
    last_sent: Instant,
    /// A frame other than a Pong was queued since the last [`Session::mark_sent`].
    sent_active: bool,
    last_peer_ping: Option<Instant>,
    last_own_ping: Option<Instant>,
    liveness: Liveness,
    /// Sealed wire frames not yet handed to the transport, back to back.
    outbox: BytesMut,
    /// The node's side (pushes it does not understand are ignored, not answered).
    initiator: bool,
}

impl Session {
    /// The responder's side; it must send `Welcome` as its first frame.
    pub fn responder(
        keys: SessionKeys,
        timers: Timers,
        peer_max_frame_len: u32,
        now: Instant,
    ) -> Self {
        Self::new(keys, timers, peer_max_frame_len, Phase::Open, now)
    }

    /// The initiator's side; the first frame it accepts is `Welcome`.
    pub fn initiator(
        keys: SessionKeys,
        timers: Timers,
        peer_max_frame_len: u32,
        now: Instant,
    ) -> Self {
        Self::new(
            keys,
            timers,
            peer_max_frame_len,
            Phase::AwaitingWelcome,
            now,
        )
    }

    fn new(
        keys: SessionKeys,
        timers: Timers,
        peer_max_frame_len: u32,
        phase: Phase,
        now: Instant,
    ) -> Self {
        let initiator = matches!(phase, Phase::AwaitingWelcome);
        Self {
            sealer: Sealer::new(keys.send),
            opener: Opener::new(keys.recv),
            phase,
            timers,
            peer_max_frame_len,
            last_received: now,
            last_active: now,
            last_sent: now,
            sent_active: false,
            last_peer_ping: None,
            last_own_ping: None,
            liveness: Liveness::Quiet,
            outbox: BytesMut::new(),
            initiator,
        }
    }

    pub fn timers(&self) -> &Timers {
        &self.timers
    }

    /// Replaces the timing rules, e.g. once the initiator learns the relay's from `Welcome`.
    pub fn set_timers(&mut self, timers: Timers) {
        self.timers = timers;
    }

    pub fn set_peer_max_frame_len(&mut self, max: u32) {
        self.peer_max_frame_len = max;
    }

    /// The largest frame body the peer accepts.
    pub fn peer_max_frame_len(&self) -> u32 {
        self.peer_max_frame_len
    }

    /// Opens one frame body. Pings, bodies nobody understands and undecodable plaintext are
    /// answered with a [`Received::Reply`]; a Pong satisfies the pending ping and is also
    /// passed up; anything else is returned for the layer above.
    /// An `Err` means: flush the outbox, then close.
    pub fn on_frame(&mut self, body: BytesMut, now: Instant) -> Result<Received, SessionError> {
        let plaintext = self.opener.open(body)?;
        self.last_received = now;
        let frame = match Frame::decode(plaintext.freeze()) {
            Ok(frame) => frame,
            Err(_) if matches!(self.phase, Phase::AwaitingWelcome) => {
                return Err(SessionError::ExpectedWelcome)
            }
            Err(err) => {
                self.last_active = now;
                return Ok(Received::Reply(Frame::error(
                    0,
                    ErrorCode::BadRequest,
                    format!("frame does not decode: {err}"),
                )));
            }
        };
        if let Phase::AwaitingWelcome = self.phase {
            return match frame.body {
                Some(Body::Welcome(_)) => {
                    self.phase = Phase::Open;
                    self.last_active = now;
                    Ok(Received::Frame(frame))
                }
                _ => Err(SessionError::ExpectedWelcome),
            };
        }
        if !matches!(frame.body, Some(Body::Pong(_))) {
            self.last_active = now;
        }
        match frame.body {
            Some(Body::Ping(ping)) => self.on_ping(frame.id, ping, now),
            Some(Body::Pong(pong)) => {
                self.on_pong(&pong);
                Ok(Received::Frame(Frame::new(frame.id, Body::Pong(pong))))
            }
            // A node ignores pushes it does not understand (§7.1); only the relay answers them.
            None if self.initiator && frame.id == 0 => Ok(Received::Nothing),
            None => Ok(Received::Reply(Frame::error(
                frame.id,
                ErrorCode::Unsupported,
                "missing or unknown frame body",
            ))),
            Some(_) => Ok(Received::Frame(frame)),
        }
    }

    fn on_ping(
        &mut self,
        frame_id: u64,
        ping: Ping,
        now: Instant,
    ) -> Result<Received, SessionError> {
        // The 30-second rule is checked first: any Ping inside the window is a flood, whether
        // or not its id is well formed.
        if let Some(previous) = self.last_peer_ping {
            if now.saturating_duration_since(previous) < self.timers.ping_min_interval {
                let limit = self.timers.ping_min_interval;
                self.send(&Frame::error(
                    frame_id,
                    ErrorCode::PingFlood,
                    format!("more than one ping within {}s", limit.as_secs()),
                ))?;
                return Err(SessionError::PingFlood(limit));
            }
        }
        if !valid_id(&ping.id) {
            return Ok(Received::Reply(Frame::error(
                frame_id,
                ErrorCode::BadRequest,
                "ping id must be 1 to 64 bytes",
            )));
        }
        self.last_peer_ping = Some(now);
        Ok(Received::Reply(Frame::new(
            frame_id,
            Body::Pong(Pong {
                id: random_id(),
                ping_id: ping.id,
            }),
        )))
    }

    fn on_pong(&mut self, pong: &Pong) {
        if let Liveness::AwaitingPong { ping_id, .. } = &self.liveness {
            if *ping_id == pong.ping_id {
                self.liveness = Liveness::Quiet;
            }
        }
    }

    /// Earliest moment at which a ping may be sent without breaking the 30-second rule. A
    /// margin keeps network jitter from making two pings arrive too close together.
    fn ping_allowed_at(&self) -> Option<Instant> {
        self.last_own_ping
            .map(|at| at + self.timers.ping_min_interval + OWN_PING_MARGIN)
    }

    /// Sends a Ping in a frame with `frame_id` now, if the 30-second rule allows it; returns the
    /// ping's id. The Pong comes back in a frame with the same `frame_id`.
    pub fn ping(&mut self, frame_id: u64, now: Instant) -> Result<Option<String>, SessionError> {
        if self.ping_allowed_at().is_some_and(|at| now < at) {
            return Ok(None);
        }
        let id = random_id();
        self.send(&Frame::new(frame_id, Body::Ping(Ping { id: id.clone() })))?;
        self.last_own_ping = Some(now);
        self.liveness = Liveness::AwaitingPong {
            ping_id: id.clone(),
            deadline: now + self.timers.pong_timeout,
        };
        Ok(Some(id))
    }

    /// When [`Session::on_timeout`] has something to do next.
    pub fn next_deadline(&self) -> Instant {
        // Called once per frame by the connection loop, so it allocates nothing.
        let (pong, probe, keepalive) = match &self.liveness {
            Liveness::AwaitingPong { deadline, .. } => (Some(*deadline), None, None),
            Liveness::Quiet => {
                let floor = self.ping_allowed_at();
                let not_before = |due: Instant| floor.map_or(due, |floor| due.max(floor));
                let probe = self
                    .timers
                    .probe_after
                    .map(|d| not_before(self.last_received + d));
                let keepalive = self
                    .timers
                    .keepalive_after
                    .map(|d| not_before(self.last_sent + d));
                (None, probe, keepalive)
            }
        };
        let idle = self.timers.idle_timeout.map(|d| self.last_active + d);
        [pong, probe, keepalive, idle]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(|| self.last_received + Duration::from_secs(24 * 3600))
    }

    /// Runs the timers due at `now`: closes dead or idle sessions, pings silent peers.
    pub fn on_timeout(&mut self, now: Instant) -> Result<(), SessionError> {
        if let Liveness::AwaitingPong { deadline, .. } = &self.liveness {
            if now >= *deadline {
                let waited = self.timers.pong_timeout;
                self.send(&Frame::error(0, ErrorCode::Timeout, "no pong in time"))?;
                return Err(SessionError::PongTimeout(waited));
            }
        }
        if let Some(idle) = self.timers.idle_timeout {
            if now >= self.last_active + idle {
                self.send(&Frame::error(0, ErrorCode::Timeout, "idle session closed"))?;
                return Err(SessionError::Idle(idle));
            }
        }
        if let Liveness::Quiet = self.liveness {
            let probe_due = self
                .timers
                .probe_after
                .is_some_and(|d| now >= self.last_received + d);
            let keepalive_due = self
                .timers
                .keepalive_after
                .is_some_and(|d| now >= self.last_sent + d);
            if probe_due || keepalive_due {
                self.ping(0, now)?;
            }
        }
        Ok(())
    }

    /// Seals a frame into the outbox.
    pub fn send(&mut self, frame: &Frame) -> Result<(), SessionError> {
        let active = !matches!(frame.body, Some(Body::Pong(_)));
        self.send_encoded(frame.encoded_len(), active, |buf| frame.encode_raw(buf))
    }

    /// Seals a plaintext of `len` bytes that `write` encodes (a `Frame` encoded by hand, e.g.
    /// a `Deliver` from the store's own message type) into the outbox. `active` is false only
    /// for a `Pong`, which does not count as activity of ours.
    pub fn send_encoded(
        &mut self,
        len: usize,
        active: bool,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), SessionError> {
        if len + TAG_LEN > self.peer_max_frame_len as usize {
            return Err(SessionError::FrameTooLarge {
                len: len + TAG_LEN,
                max: self.peer_max_frame_len,
            });
        }
        self.sent_active |= active;
        if self.outbox.capacity() == 0 {
            self.outbox.reserve(OUTBOX_START.max(len + TAG_LEN + 4));
        }
        self.sealer.seal_into(&mut self.outbox, len, write);
        Ok(())
    }

    /// Seals a plaintext given in parts (see [`Sealer::seal_parts`]) into the outbox.
    pub fn send_parts(&mut self, parts: &[&[u8]]) -> Result<(), SessionError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len + TAG_LEN > self.peer_max_frame_len as usize {
            return Err(SessionError::FrameTooLarge {
                len: len + TAG_LEN,
                max: self.peer_max_frame_len,
            });
        }
        self.sent_active = true;
        if self.outbox.capacity() == 0 {
            self.outbox.reserve(OUTBOX_START.max(len + TAG_LEN + 4));
        }
        self.sealer.seal_parts(&mut self.outbox, parts);
        Ok(())
    }

    /// Seals bytes that need not be a `Frame` and returns the wire frame without queuing it.
    /// For conformance tests that must send what a correct peer never would.
    pub fn seal_plaintext(&mut self, plaintext: &[u8]) -> Bytes {
        self.sealer.seal(plaintext)
    }

    /// Records that queued frames were handed to the transport at `now`.
    pub fn mark_sent(&mut self, now: Instant) {
        if std::mem::take(&mut self.sent_active) {
            self.last_sent = now;
        }
    }

    /// The sealed bytes waiting to be written: whole wire frames, back to back.
    pub fn transmit(&self) -> &[u8] {
        &self.outbox
    }

    /// Bytes sealed and not yet written.
    pub fn transmit_len(&self) -> usize {
        self.outbox.len()
    }

    /// Drops `written` bytes from the front of [`Session::transmit`]. Once the outbox is empty,
    /// a large buffer is given back, so an idle session holds little memory.
    pub fn advance_transmit(&mut self, written: usize) {
        bytes::Buf::advance(&mut self.outbox, written);
        if self.outbox.is_empty() && self.outbox.capacity() > IDLE_OUTBOX_CAPACITY {
            self.outbox = BytesMut::new();
        }
    }

    /// Gives back the output buffer's memory if nothing waits in it (a session about to go
    /// quiet).
    pub fn release_idle_memory(&mut self) {
        if self.outbox.is_empty() && self.outbox.capacity() > 0 {
            self.outbox = BytesMut::new();
        }
        self.sealer.release();
        self.opener.release();
    }

    /// Takes every sealed wire frame at once (length prefixes included), if any.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        if self.outbox.is_empty() {
            return None;
        }
        Some(self.outbox.split().freeze())
    }

    /// A `Welcome` frame as the responder's first message.
    pub fn send_welcome(&mut self, welcome: Welcome) -> Result<(), SessionError> {
        self.send(&Frame::new(0, Body::Welcome(welcome)))
    }

    /// The responder's first output: the handshake's cleartext `Ack` frame, then `Welcome`
    /// sealed behind it, so that one write carries both (the initiator reads them in this
    /// order either way, and a separate write for each costs the relay a system call and the
    /// node a wake-up per connection).
    pub fn send_ack_and_welcome(
        &mut self,
        ack_body: &[u8],
        welcome: Welcome,
    ) -> Result<(), SessionError> {
        debug_assert!(self.outbox.is_empty(), "the Ack goes before anything else");
        crate::codec::put_frame(&mut self.outbox, ack_body);
        self.send_welcome(welcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::{respond, AwaitingAck};
    use crate::keys::KeyPair;
    use crate::proto::Error as ErrorBody;

    const SECOND: Duration = Duration::from_secs(1);

    fn server_timers() -> Timers {
        Timers {
            ping_min_interval: 30 * SECOND,
            probe_after: Some(60 * SECOND),
            keepalive_after: None,
            pong_timeout: 20 * SECOND,
            idle_timeout: Some(300 * SECOND),
        }
    }

    fn client_timers() -> Timers {
        Timers {
            ping_min_interval: 30 * SECOND,
            probe_after: None,
            keepalive_after: Some(120 * SECOND),
            pong_timeout: 20 * SECOND,
            idle_timeout: None,
        }
    }

    /// A real handshake up to the `Ack`: the node's key and waiting state, the `Ack` body and
    /// the relay's session, which has sent nothing yet.
    fn answered(now: Instant) -> (KeyPair, AwaitingAck, Bytes, Session) {
        let (client_key, server_key) = (KeyPair::generate(), KeyPair::generate());
        let (waiting, init) = AwaitingAck::start(&client_key, *server_key.public());
        let response = respond(&server_key, &init, |_| true).unwrap();
        let server = Session::responder(response.established.keys, server_timers(), 1 << 20, now);
        (client_key, waiting, response.ack_body, server)
    }

    /// Both sides after a real handshake, before `Welcome`.
    fn keyed_pair(now: Instant) -> (Session, Session) {
        let (client_key, waiting, ack_body, server) = answered(now);
        let keys = waiting.on_ack(&client_key, &ack_body).unwrap().keys;
        let client = Session::initiator(keys, client_timers(), 1 << 20, now);
        (server, client)
    }

    /// A connected pair after a real handshake, with `Welcome` already exchanged.
    fn pair(now: Instant) -> (Session, Session) {
        let (mut server, mut client) = keyed_pair(now);
        server.send_welcome(Welcome::default()).unwrap();
        let welcome = deliver(&mut server, &mut client, now).unwrap();
        assert!(matches!(welcome[0].body, Some(Body::Welcome(_))));
        (server, client)
    }

    /// Moves every queued frame from `from` to `to`; returns what `to` passed up.
    fn deliver(
        from: &mut Session,
        to: &mut Session,
        now: Instant,
    ) -> Result<Vec<Frame>, SessionError> {
        let mut up = Vec::new();
        for body in wire_bodies(&from.poll_transmit().unwrap_or_default()) {
            match to.on_frame(body, now)? {
                Received::Frame(frame) => up.push(frame),
                Received::Reply(reply) => to.send(&reply)?,
                Received::Nothing => {}
            }
        }
        Ok(up)
    }

    /// The frame bodies of a run of wire frames.
    fn wire_bodies(wire: &[u8]) -> Vec<BytesMut> {
        let mut bodies = Vec::new();
        let mut rest = wire;
        while !rest.is_empty() {
            let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            bodies.push(BytesMut::from(&rest[4..4 + len]));
            rest = &rest[4 + len..];
        }
        bodies
    }

    fn error_code(frame: &Frame) -> ErrorCode {
        match &frame.body {
            Some(Body::Error(ErrorBody { code, .. })) => ErrorCode::try_from(*code).unwrap(),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    /// The responder's first output is the cleartext `Ack` frame and the sealed `Welcome`
    /// behind it: the initiator takes its keys from the first and opens the second.
    #[test]
    fn ack_and_welcome_leave_together() {
        let now = Instant::now();
        let (client_key, waiting, ack_body, mut server) = answered(now);
        server
            .send_ack_and_welcome(&ack_body, Welcome::default())
            .unwrap();
        let bodies = wire_bodies(&server.poll_transmit().unwrap());
        assert_eq!(bodies.len(), 2);
        assert_eq!(&bodies[0][..], &ack_body[..]);
        let keys = waiting.on_ack(&client_key, &bodies[0]).unwrap().keys;
        let mut client = Session::initiator(keys, client_timers(), 1 << 20, now);
        let opened = client.on_frame(bodies[1].clone(), now).unwrap();
        assert!(matches!(
            opened,
            Received::Frame(Frame {
                body: Some(Body::Welcome(_)),
                ..
            })
        ));
    }

    #[test]
    fn initiator_requires_welcome_first() {
        let now = Instant::now();
        let (mut server, mut client) = keyed_pair(now);
        server
            .send(&Frame::error(0, ErrorCode::Internal, "x"))
            .unwrap();
        assert_eq!(
            deliver(&mut server, &mut client, now),
            Err(SessionError::ExpectedWelcome)
        );
    }

    #[test]
    fn ping_pong_and_ping_flood() {
        let now = Instant::now();
        let (mut server, mut client) = pair(now);
        let id = client.ping(1, now).unwrap().expect("first ping allowed");
        assert!(deliver(&mut client, &mut server, now).unwrap().is_empty());
        let pongs = deliver(&mut server, &mut client, now).unwrap();
        match &pongs[..] {
            [Frame {
                id: 1,
                body: Some(Body::Pong(pong)),
            }] => assert_eq!(pong.ping_id, id),
            other => panic!("expected one pong, got {other:?}"),
        }
        assert!(matches!(client.liveness, Liveness::Quiet));

        // The client's own guard refuses a second ping within 30 s ...
        assert_eq!(client.ping(2, now + 10 * SECOND).unwrap(), None);
        // ... but a peer that ignores the rule gets PING_FLOOD and is closed.
        client.last_own_ping = None;
        client.ping(2, now + 10 * SECOND).unwrap();
        let err = deliver(&mut client, &mut server, now + 10 * SECOND).unwrap_err();
        assert_eq!(err, SessionError::PingFlood(30 * SECOND));
        let up = deliver(&mut server, &mut client, now).unwrap();
        assert_eq!(error_code(&up[0]), ErrorCode::PingFlood);
    }

    #[test]
    fn ping_after_thirty_seconds_is_fine() {
        let now = Instant::now();
        let (mut server, mut client) = pair(now);
        for round in 0..3u32 {
            let at = now + 32 * round * SECOND;
            client.ping(1, at).unwrap().unwrap();
            deliver(&mut client, &mut server, at).unwrap();
            deliver(&mut server, &mut client, at).unwrap();
        }
    }

    #[test]
    fn silent_peer_is_probed_then_closed() {
        let now = Instant::now();
        let (mut server, mut client) = pair(now);
        assert_eq!(server.next_deadline(), now + 60 * SECOND);
        server.on_timeout(now + 60 * SECOND).unwrap();
        let probe = server.poll_transmit().expect("a ping was queued");
        assert!(server.poll_transmit().is_none());
        assert_eq!(server.next_deadline(), now + 80 * SECOND);
        // A live peer answers and the probe is satisfied.
        match client
            .on_frame(BytesMut::from(&probe[4..]), now + 61 * SECOND)
            .unwrap()
        {
            Received::Reply(pong) => client.send(&pong).unwrap(),
            other => panic!("expected a Pong to send, got {other:?}"),
        }
        deliver(&mut client, &mut server, now + 61 * SECOND).unwrap();
        assert!(matches!(server.liveness, Liveness::Quiet));
        // Next time nobody answers.
        let next = server.next_deadline();
        assert_eq!(next, now + 121 * SECOND);
        server.on_timeout(next).unwrap();
        let deadline = server.next_deadline();
        assert_eq!(
            server.on_timeout(deadline),
            Err(SessionError::PongTimeout(20 * SECOND))
        );
        let up = deliver(&mut server, &mut client, deadline);
        assert_eq!(
            error_code(&up.unwrap().last().unwrap().clone()),
            ErrorCode::Timeout
        );
    }

    #[test]
    fn answering_probes_does_not_postpone_our_keepalive() {
        let now = Instant::now();
        let (mut server, mut client) = pair(now);
        client.mark_sent(now);
        // The relay probes at 60 s; the client's Pong must not count as its own activity.
        server.on_timeout(now + 60 * SECOND).unwrap();
        deliver(&mut server, &mut client, now + 60 * SECOND).unwrap();
        let pong = client.poll_transmit().expect("pong queued");
        server
            .on_frame(BytesMut::from(&pong[4..]), now + 60 * SECOND)
            .unwrap();
        client.mark_sent(now + 60 * SECOND);
        assert_eq!(client.next_deadline(), now + 120 * SECOND);
        client.on_timeout(now + 120 * SECOND).unwrap();
        let ping = client.poll_transmit().expect("keepalive ping");
        server
            .on_frame(BytesMut::from(&ping[4..]), now + 120 * SECOND)
            .unwrap();
        assert_eq!(
            server.last_active,
            now + 120 * SECOND,
            "the relay counts it as activity"
        );
    }

    #[test]
    fn idle_peer_is_closed_even_when_it_answers_pings() {
        let now = Instant::now();
        let (mut server, mut client) = pair(now);
        let mut at = now;
        for _ in 0..10 {
            at = server.next_deadline();
            match server.on_timeout(at) {
                Ok(()) => {
                    deliver(&mut server, &mut client, at).unwrap();
                    deliver(&mut client, &mut server, at).unwrap();
                }
                Err(err) => {
                    assert_eq!(err, SessionError::Idle(300 * SECOND));
                    break;
                }
            }
        }
        assert_eq!(at, now + 300 * SECOND);
    }

    #[test]
    fn unknown_body_and_garbage_plaintext_get_errors_and_session_goes_on() {
        let now = Instant::now();
        let (mut server, mut client) = pair(now);
        client.send(&Frame { id: 7, body: None }).unwrap();
        // A plaintext that is not a Frame: field 1 with wire type 7 (invalid).
        let garbage = client.sealer.seal(&[0x0f, 0xff]);
        client.outbox.extend_from_slice(&garbage);
        assert!(deliver(&mut client, &mut server, now).unwrap().is_empty());
        let replies = deliver(&mut server, &mut client, now).unwrap();
        assert_eq!(replies.len(), 2);
        assert_eq!(
            (replies[0].id, error_code(&replies[0])),
            (7, ErrorCode::Unsupported)
        );
        assert_eq!(
            (replies[1].id, error_code(&replies[1])),
            (0, ErrorCode::BadRequest)
        );
        // The session still carries requests afterwards.
        client
            .send(&Frame::new(9, Body::Done(Default::default())))
            .unwrap();
        assert_eq!(deliver(&mut client, &mut server, now).unwrap()[0].id, 9);
    }

    #[test]
    fn oversized_outbound_frame_is_refused() {
        let now = Instant::now();
        let (mut server, _client) = pair(now);
        server.set_peer_max_frame_len(64);
        let big = Frame::error(1, ErrorCode::Internal, "x".repeat(100));
        assert!(matches!(
            server.send(&big),
            Err(SessionError::FrameTooLarge { .. })
        ));
    }
}
