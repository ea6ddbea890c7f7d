//! The suite's node: a scripted initiator that can do everything a correct node does and many
//! things it never would, and writes every frame it sends and receives into the case's log.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::wire::{describe, describe_ack, describe_init, initiator_accept, InitParts};
use super::{Assumptions, Dir, Log, Outcome, Step};
use botd_client::OutgoingMessage;
use botd_protocol::cipher::{Opener, Sealer};
use botd_protocol::codec::{encode_frame, FrameCodec};
use botd_protocol::keys::{KeyPair, PublicKeyBytes};
use botd_protocol::proto::{
    self, random_id, Body, ErrorCode, Frame, Ping, Pong, PreKey, Register, SignedPreKey, Welcome,
};

/// The relay under test.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub key: PublicKeyBytes,
    pub assume: Assumptions,
    /// Longest wait for an answer that must come.
    pub wait: Duration,
    /// How long to watch for something that must not come.
    pub quiet: Duration,
}

impl Target {
    pub fn new(addr: SocketAddr, key: PublicKeyBytes) -> Self {
        Self {
            addr,
            key,
            assume: Assumptions::default(),
            wait: Duration::from_secs(5),
            quiet: Duration::from_millis(400),
        }
    }
}

/// Identities and devices a case registered, unregistered when it ends.
pub type Cleanup = Arc<Mutex<Vec<(Arc<KeyPair>, u32)>>>;

/// What reading from the relay gave.
#[derive(Debug)]
pub enum Event {
    Frame(Frame),
    /// The relay closed the connection (EOF or reset).
    Closed,
    Timeout,
    /// The relay sent something that is not a valid frame of the session.
    Broken(String),
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorAnswer {
    pub code: i32,
    pub retry_after_ms: u64,
    pub message: String,
}

impl ErrorAnswer {
    pub fn name(&self) -> String {
        code_name(self.code)
    }
}

pub fn code_name(code: i32) -> String {
    ErrorCode::try_from(code)
        .map(|c| c.as_str_name().to_owned())
        .unwrap_or_else(|_| format!("code {code}"))
}

/// How often a request is repeated after `RATE_LIMITED` (waiting `retry_after_ms` each time),
/// the longest single wait honoured, and the longest time spent waiting for one request. The
/// suite's sessions share the relay's per-address buckets (§8.1), so a request may have to
/// wait its turn behind other cases' requests.
const RATE_LIMIT_RETRIES: usize = 200;
const MAX_RETRY_WAIT: Duration = Duration::from_secs(5);
const MAX_RATE_LIMIT_WAIT: Duration = Duration::from_secs(40);

/// A raw TCP connection to the relay, for handshake cases.
pub struct Raw {
    pub stream: TcpStream,
    pub log: Log,
    pub name: String,
    buf: BytesMut,
}

/// What came back after a handshake attempt.
#[derive(Debug)]
pub enum RawRead {
    Body(BytesMut),
    /// Closed; `bytes` arrived before (0 for a silent close).
    Closed {
        bytes: usize,
    },
    Timeout,
    Invalid(String),
}

impl Raw {
    pub async fn open(t: &Target, log: &Log, name: &str) -> Step<Raw> {
        let stream = tokio::time::timeout(t.wait, TcpStream::connect(t.addr))
            .await
            .map_err(|_| Outcome::fail(format!("TCP connect to {} timed out", t.addr)))?
            .map_err(|e| Outcome::fail(format!("TCP connect to {}: {e}", t.addr)))?;
        let _ = stream.set_nodelay(true);
        log.add(name, Dir::Note, format!("TCP connected to {}", t.addr));
        Ok(Raw {
            stream,
            log: log.clone(),
            name: name.to_owned(),
            buf: BytesMut::new(),
        })
    }

    pub async fn send(&mut self, bytes: &[u8], what: impl Into<String>) -> Step<()> {
        self.log.add(&self.name, Dir::Out, what);
        // A relay that already closed may reset the connection; that is for the case to judge.
        if let Err(e) = self.stream.write_all(bytes).await {
            self.log
                .add(&self.name, Dir::Note, format!("write failed: {e}"));
        }
        Ok(())
    }

    /// Sends an `Init` body as one frame.
    pub async fn send_init(&mut self, body: &[u8]) -> Step<()> {
        let what = describe_init(body);
        self.send(&encode_frame(body), what).await
    }

    /// Reads one frame of at most `limit` bytes.
    pub async fn read(&mut self, limit: u32, within: Duration) -> RawRead {
        let mut codec = FrameCodec::new(limit);
        let deadline = Instant::now() + within;
        let mut total = self.buf.len();
        loop {
            match codec.decode(&mut self.buf) {
                Ok(Some(body)) => return RawRead::Body(body),
                Ok(None) => {}
                Err(e) => return RawRead::Invalid(e.to_string()),
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return RawRead::Timeout,
                Ok(Ok(0)) | Ok(Err(_)) => return RawRead::Closed { bytes: total },
                Ok(Ok(n)) => {
                    total += n;
                    self.buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
    }

    /// §4.2: the relay must close without sending a byte.
    pub async fn expect_silent_close(&mut self, within: Duration) -> Step<Outcome> {
        match self.read(1024, within).await {
            RawRead::Closed { bytes: 0 } => {
                self.log
                    .add(&self.name, Dir::In, "connection closed, nothing sent");
                Ok(Outcome::pass())
            }
            RawRead::Closed { bytes } => Err(Outcome::fail(format!(
                "the relay sent {bytes} bytes before closing; it must close silently"
            ))),
            RawRead::Body(body) => {
                self.log.add(&self.name, Dir::In, describe_ack(&body));
                Err(Outcome::fail("the relay answered; it must close silently"))
            }
            RawRead::Invalid(e) => Err(Outcome::fail(format!(
                "the relay sent bytes ({e}); it must close silently"
            ))),
            RawRead::Timeout => Err(Outcome::fail(format!(
                "the connection was still open after {within:?}; the relay must close it"
            ))),
        }
    }

    /// Reads the `Ack` to a hand-made `Init` and the `Welcome`, giving a working probe.
    pub async fn finish(
        mut self,
        t: &Target,
        identity: Arc<KeyPair>,
        ephemeral: &KeyPair,
        parts: &InitParts,
        init_body: &[u8],
    ) -> Step<Probe> {
        let ack = match self.read(1024, t.wait).await {
            RawRead::Body(body) => body,
            RawRead::Closed { .. } => {
                return Err(Outcome::fail(
                    "the relay closed the connection instead of answering",
                ))
            }
            RawRead::Timeout => return Err(Outcome::fail("no Ack within the wait")),
            RawRead::Invalid(e) => return Err(Outcome::fail(format!("bad Ack frame: {e}"))),
        };
        self.log.add(&self.name, Dir::In, describe_ack(&ack));
        let (keys, _) = initiator_accept(&identity, ephemeral, &t.key, &parts.id, init_body, &ack)
            .map_err(|e| Outcome::fail(format!("the relay's Ack fails §4.5: {e}")))?;
        let mut probe = Probe {
            name: self.name,
            stream: self.stream,
            inbuf: self.buf,
            codec: FrameCodec::new(1 << 20),
            sealer: Sealer::new(keys.send),
            opener: Opener::new(keys.recv),
            identity,
            welcome: Welcome::default(),
            log: self.log,
            next_id: 1,
            pushes: VecDeque::new(),
            answer_pings: true,
            relay_pings: Vec::new(),
            wait: t.wait,
            quiet: t.quiet,
            cleanup: Arc::new(Mutex::new(Vec::new())),
            frames_in: 0,
            largest_in: 0,
            welcome_at: Instant::now(),
        };
        probe.read_welcome().await?;
        Ok(probe)
    }
}

/// A connected session of the suite's node.
pub struct Probe {
    pub name: String,
    stream: TcpStream,
    inbuf: BytesMut,
    codec: FrameCodec,
    sealer: Sealer,
    opener: Opener,
    pub identity: Arc<KeyPair>,
    pub welcome: Welcome,
    pub log: Log,
    next_id: u64,
    pushes: VecDeque<Frame>,
    /// Answer the relay's pings (a correct node does).
    pub answer_pings: bool,
    /// Pings received from the relay: when, frame id, ping.
    pub relay_pings: Vec<(Instant, u64, Ping)>,
    pub wait: Duration,
    pub quiet: Duration,
    pub cleanup: Cleanup,
    /// Frames received in the session.
    pub frames_in: u64,
    /// Largest frame body received in the session.
    pub largest_in: usize,
    /// When `Welcome` arrived (its `server_time_ms` is the relay's clock then).
    welcome_at: Instant,
}

impl Probe {
    /// Connects with a fresh identity.
    pub async fn connect(t: &Target, log: &Log, name: &str) -> Step<Probe> {
        Self::connect_as(t, log, name, Arc::new(KeyPair::generate())).await
    }

    /// Connects as `identity`. A relay that closes before its `Ack` may be rate-limiting this
    /// address (§4.3): the attempt is repeated with backoff, a bounded number of times.
    pub async fn connect_as(
        t: &Target,
        log: &Log,
        name: &str,
        identity: Arc<KeyPair>,
    ) -> Step<Probe> {
        let mut backoff = Duration::from_millis(200);
        let mut last = Outcome::fail("no attempt");
        for attempt in 0..6 {
            if attempt > 0 {
                log.add(
                    name,
                    Dir::Note,
                    format!("handshake refused, retrying in {backoff:?} (§4.3 admission limits)"),
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(3));
            }
            let mut raw = Raw::open(t, log, name).await?;
            let eph = KeyPair::generate();
            let parts = InitParts::new(&identity, &eph, &t.key);
            let body = parts.encode();
            raw.send_init(&body).await?;
            match raw.read(1024, t.wait).await {
                RawRead::Closed { bytes: 0 } => {
                    last = Outcome::fail("the relay closed every handshake of a correct Init");
                    continue;
                }
                RawRead::Body(ack) => {
                    raw.buf = {
                        // Put the Ack back in front for `finish`.
                        let mut b = BytesMut::from(&encode_frame(&ack)[..]);
                        b.extend_from_slice(&raw.buf);
                        b
                    };
                    return raw.finish(t, identity, &eph, &parts, &body).await;
                }
                RawRead::Closed { bytes } => {
                    return Err(Outcome::fail(format!(
                        "the relay sent {bytes} bytes that are not a frame, then closed"
                    )))
                }
                RawRead::Timeout => return Err(Outcome::fail("no Ack within the wait")),
                RawRead::Invalid(e) => return Err(Outcome::fail(format!("bad Ack frame: {e}"))),
            }
        }
        Err(last)
    }

    async fn read_welcome(&mut self) -> Step<()> {
        match self.next_event(self.wait).await {
            Event::Frame(Frame {
                id,
                body: Some(Body::Welcome(welcome)),
            }) => {
                if id != 0 {
                    self.log
                        .note(format!("Welcome came with frame id {id}, not 0"));
                }
                self.codec
                    .set_max_frame_len(welcome.max_frame_len.clamp(1024, 64 << 20));
                self.welcome = welcome;
                self.welcome_at = Instant::now();
                Ok(())
            }
            Event::Frame(other) => Err(Outcome::fail(format!(
                "the first encrypted frame is not Welcome: {}",
                describe(&other)
            ))),
            Event::Closed => Err(Outcome::fail("the relay closed instead of sending Welcome")),
            Event::Timeout => Err(Outcome::fail("no Welcome within the wait")),
            Event::Broken(e) => Err(Outcome::fail(format!("Welcome frame: {e}"))),
        }
    }

    pub fn key(&self) -> PublicKeyBytes {
        *self.identity.public()
    }

    /// The relay's clock now, as far as the suite can tell: `Welcome.server_time_ms` plus the
    /// time since `Welcome` arrived (a little behind the relay by the network delay).
    pub fn relay_now_ms(&self) -> u64 {
        self.welcome.server_time_ms + self.welcome_at.elapsed().as_millis() as u64
    }

    /// Reads frames up to `limit` bytes from now on, whatever the relay announced.
    pub fn set_max_frame_len(&mut self, limit: u32) {
        self.codec.set_max_frame_len(limit);
    }

    /// The relay's announced frame limit.
    pub fn max_frame_len(&self) -> u32 {
        self.welcome.max_frame_len
    }

    pub fn max_payload_len(&self) -> usize {
        self.welcome.max_payload_len as usize
    }

    pub fn fresh_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    async fn write(&mut self, wire: &[u8]) {
        if let Err(e) = self.stream.write_all(wire).await {
            self.log
                .add(&self.name, Dir::Note, format!("write failed: {e}"));
        }
    }

    pub async fn send_frame(&mut self, frame: &Frame) {
        self.log.add(&self.name, Dir::Out, describe(frame));
        let wire = self.sealer.seal(&frame.encode_to_vec());
        self.write(&wire).await;
    }

    /// Seals any plaintext, a `Frame` or not.
    pub async fn send_plaintext(&mut self, plaintext: &[u8], what: impl Into<String>) {
        self.log.add(&self.name, Dir::Out, what);
        let wire = self.sealer.seal(plaintext);
        self.write(&wire).await;
    }

    /// Seals without sending (for replay and reordering cases).
    pub fn seal(&mut self, plaintext: &[u8]) -> Bytes {
        self.sealer.seal(plaintext)
    }

    /// Writes raw bytes.
    pub async fn send_wire(&mut self, wire: &[u8], what: impl Into<String>) {
        self.log.add(&self.name, Dir::Out, what);
        self.write(wire).await;
    }

    /// Writes raw bytes without a log line (floods).
    pub async fn send_wire_quiet(&mut self, wire: &[u8]) {
        self.write(wire).await;
    }

    /// Ends our direction of the stream.
    pub async fn shutdown_write(&mut self) -> std::io::Result<()> {
        self.stream.shutdown().await
    }

    /// The next frame from the socket (relay pings answered on the way when `answer_pings`).
    pub async fn next_event(&mut self, within: Duration) -> Event {
        let deadline = Instant::now() + within;
        loop {
            let body = match self.codec.decode(&mut self.inbuf) {
                Ok(Some(body)) => body,
                Ok(None) => {
                    match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.inbuf))
                        .await
                    {
                        Err(_) => return Event::Timeout,
                        Ok(Ok(0)) | Ok(Err(_)) => {
                            self.log.add(&self.name, Dir::In, "connection closed");
                            return Event::Closed;
                        }
                        Ok(Ok(_)) => continue,
                    }
                }
                Err(e) => {
                    let e = format!("framing: {e}");
                    self.log.add(&self.name, Dir::In, &e);
                    return Event::Broken(e);
                }
            };
            self.frames_in += 1;
            self.largest_in = self.largest_in.max(body.len());
            let plaintext = match self.opener.open(body) {
                Ok(p) => p,
                Err(e) => {
                    let e = format!("a frame from the relay fails to open: {e}");
                    self.log.add(&self.name, Dir::In, &e);
                    return Event::Broken(e);
                }
            };
            let frame = match Frame::decode(plaintext.freeze()) {
                Ok(f) => f,
                Err(e) => {
                    let e = format!("a plaintext from the relay is not a Frame: {e}");
                    self.log.add(&self.name, Dir::In, &e);
                    return Event::Broken(e);
                }
            };
            self.log.add(&self.name, Dir::In, describe(&frame));
            if let Some(Body::Ping(ping)) = &frame.body {
                self.relay_pings
                    .push((Instant::now(), frame.id, ping.clone()));
                if self.answer_pings && self.relay_pings.len() <= 1000 {
                    let pong = Frame::new(
                        frame.id,
                        Body::Pong(Pong {
                            id: random_id(),
                            ping_id: ping.id.clone(),
                        }),
                    );
                    self.send_frame(&pong).await;
                    continue;
                }
            }
            return Event::Frame(frame);
        }
    }

    /// The next frame, which must come.
    pub async fn next_frame(&mut self, within: Duration) -> Step<Frame> {
        match self.next_event(within).await {
            Event::Frame(f) => Ok(f),
            Event::Closed => Err(Outcome::fail("the relay closed the connection")),
            Event::Timeout => Err(Outcome::fail(format!("nothing arrived within {within:?}"))),
            Event::Broken(e) => Err(Outcome::fail(e)),
        }
    }

    /// Sends a request with a fresh id and returns the frame answering it. Pushes that arrive
    /// meanwhile are kept for [`Probe::next_push`].
    pub async fn request(&mut self, body: Body) -> Step<Frame> {
        let id = self.fresh_id();
        self.send_frame(&Frame::new(id, body)).await;
        self.answer_to(id).await
    }

    /// Waits for the answer to frame `id`.
    pub async fn answer_to(&mut self, id: u64) -> Step<Frame> {
        let deadline = Instant::now() + self.wait;
        for _ in 0..100_000 {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = self.next_frame(left).await.map_err(|o| {
                Outcome::fail(format!(
                    "waiting for the answer to frame {id}: {}",
                    o.detail
                ))
            })?;
            if frame.id == id {
                return Ok(frame);
            }
            if frame.id == 0 {
                if self.pushes.len() < 10_000 {
                    self.pushes.push_back(frame);
                }
                continue;
            }
            return Err(Outcome::fail(format!(
                "waiting for the answer to frame {id}, got one for frame {}: answers must come in request order with the request's id",
                frame.id
            )));
        }
        Err(Outcome::fail("too many frames without an answer"))
    }

    /// A request's outcome: the body, or the error.
    pub async fn call(&mut self, body: Body) -> Step<Result<Body, ErrorAnswer>> {
        let frame = self.request(body).await?;
        Ok(match frame.body {
            Some(Body::Error(e)) => Err(ErrorAnswer {
                code: e.code,
                retry_after_ms: e.retry_after_ms,
                message: e.message,
            }),
            Some(b) => Ok(b),
            None => Ok(Body::Done(proto::Done {})),
        })
    }

    /// Sends all requests before reading any answer (pipelining, §8.1), then returns the
    /// outcomes in order.
    pub async fn pipeline(&mut self, bodies: Vec<Body>) -> Step<Vec<Result<Body, ErrorAnswer>>> {
        let mut ids = Vec::with_capacity(bodies.len());
        let mut wire = Vec::new();
        let n = bodies.len();
        for body in bodies {
            let id = self.fresh_id();
            wire.extend_from_slice(&self.sealer.seal(&Frame::new(id, body).encode_to_vec()));
            ids.push(id);
        }
        self.log.add(
            &self.name,
            Dir::Out,
            format!(
                "{n} requests pipelined (frames {}..={})",
                ids.first().copied().unwrap_or(0),
                ids.last().copied().unwrap_or(0)
            ),
        );
        self.write(&wire).await;
        let mut out = Vec::with_capacity(n);
        for id in ids {
            let frame = self.answer_to(id).await?;
            out.push(match frame.body {
                Some(Body::Error(e)) => Err(ErrorAnswer {
                    code: e.code,
                    retry_after_ms: e.retry_after_ms,
                    message: e.message,
                }),
                Some(b) => Ok(b),
                None => Ok(Body::Done(proto::Done {})),
            });
        }
        Ok(out)
    }

    /// A request's outcome, honouring `RATE_LIMITED`: a refused request changes nothing
    /// (§8.1), so it is sent again after `retry_after_ms` (bounded in count and time). Any
    /// other outcome, or a refusal past the bounds, is returned.
    pub async fn call_patiently(&mut self, body: Body) -> Step<Result<Body, ErrorAnswer>> {
        let started = Instant::now();
        let mut noted = false;
        for _ in 0..RATE_LIMIT_RETRIES {
            match self.call(body.clone()).await? {
                Err(e) if e.code == ErrorCode::RateLimited as i32 => {
                    let wait = Duration::from_millis(e.retry_after_ms.max(1)).min(MAX_RETRY_WAIT)
                        // A little spread, so that cases waiting on one bucket do not retry in
                        // lockstep.
                        + Duration::from_millis(rand::random::<u64>() % 20);
                    if started.elapsed() + wait > MAX_RATE_LIMIT_WAIT {
                        return Ok(Err(e));
                    }
                    if !noted {
                        noted = true;
                        self.log.add(
                            &self.name,
                            Dir::Note,
                            "rate limited: waiting retry_after_ms and sending again (setup)",
                        );
                    }
                    tokio::time::sleep(wait).await;
                }
                other => {
                    if noted {
                        self.log.add(
                            &self.name,
                            Dir::Note,
                            format!("served after waiting {:?}", started.elapsed()),
                        );
                    }
                    return Ok(other);
                }
            }
        }
        self.call(body).await
    }

    /// A request that must succeed (`RATE_LIMITED` honoured).
    pub async fn ok(&mut self, body: Body, what: &str) -> Step<Body> {
        match self.call_patiently(body).await? {
            Ok(b) => Ok(b),
            Err(e) => Err(Outcome::fail(format!(
                "{what}: the relay answered {} ({:?})",
                e.name(),
                e.message
            ))),
        }
    }

    /// A setup request: must succeed, and `RATE_LIMITED` is honoured and retried (bounded).
    pub async fn setup(&mut self, body: Body, what: &str) -> Step<Body> {
        match self.call_patiently(body).await? {
            Ok(b) => Ok(b),
            Err(e) if e.code == ErrorCode::RateLimited as i32 => Err(Outcome::fail(format!(
                "setup step {what}: still RATE_LIMITED after waiting {MAX_RATE_LIMIT_WAIT:?} \
                 as retry_after_ms said"
            ))),
            Err(e) => Err(Outcome::fail(format!(
                "setup step {what}: the relay answered {} ({:?})",
                e.name(),
                e.message
            ))),
        }
    }

    /// PASS when the request fails with `code`, FAIL otherwise. Unless `RATE_LIMITED` is the
    /// code expected, a `RATE_LIMITED` answer is honoured and the request sent again.
    pub async fn expect_code(&mut self, body: Body, code: ErrorCode) -> Step<Outcome> {
        let answer = if code == ErrorCode::RateLimited {
            self.call(body).await?
        } else {
            self.call_patiently(body).await?
        };
        match answer {
            Err(e) if e.code == code as i32 => Ok(Outcome::pass()),
            Err(e) => Err(Outcome::fail(format!(
                "expected {}, got {} ({:?})",
                code.as_str_name(),
                e.name(),
                e.message
            ))),
            Ok(b) => Err(Outcome::fail(format!(
                "expected {}, got a success: {}",
                code.as_str_name(),
                describe(&Frame::new(0, b))
            ))),
        }
    }

    /// The next push (id 0), from those kept or from the socket.
    pub async fn next_push(&mut self, within: Duration) -> Step<Frame> {
        if let Some(f) = self.pushes.pop_front() {
            return Ok(f);
        }
        let f = self.next_frame(within).await?;
        if f.id == 0 {
            return Ok(f);
        }
        Err(Outcome::fail(format!(
            "waiting for a push, got a frame with id {}: {}",
            f.id,
            describe(&f)
        )))
    }

    /// Pushes kept so far (and none read further).
    pub fn take_pushes(&mut self) -> Vec<Frame> {
        self.pushes.drain(..).collect()
    }

    /// Pushes kept and those arriving within `within`.
    pub async fn drain_pushes(&mut self, within: Duration) -> Vec<Frame> {
        let mut out = self.take_pushes();
        let deadline = Instant::now() + within;
        for _ in 0..100_000 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left).await {
                Event::Frame(f) => out.push(f),
                _ => break,
            }
        }
        out
    }

    /// Nothing (but relay pings) arrives for `within`; a frame that does is returned.
    pub async fn quiet_for(&mut self, within: Duration) -> Result<(), Event> {
        if let Some(f) = self.pushes.pop_front() {
            return Err(Event::Frame(f));
        }
        match self.next_event(within).await {
            Event::Timeout => Ok(()),
            other => Err(other),
        }
    }

    /// Reads until the relay closes; returns the frames that came first. `Err` if it stays open.
    pub async fn until_closed(&mut self, within: Duration) -> Result<Vec<Frame>, Vec<Frame>> {
        let mut frames = self.take_pushes();
        let deadline = Instant::now() + within;
        for _ in 0..100_000 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left).await {
                Event::Frame(f) => frames.push(f),
                Event::Closed | Event::Broken(_) => return Ok(frames),
                Event::Timeout => return Err(frames),
            }
        }
        Err(frames)
    }

    /// Reads one raw frame body without opening it (for cases that check silence).
    pub async fn read_raw_event(&mut self, within: Duration) -> RawRead {
        let deadline = Instant::now() + within;
        let mut total = self.inbuf.len();
        loop {
            match self.codec.decode(&mut self.inbuf) {
                Ok(Some(body)) => return RawRead::Body(body),
                Ok(None) => {}
                Err(e) => return RawRead::Invalid(e.to_string()),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.inbuf)).await {
                Err(_) => return RawRead::Timeout,
                Ok(Ok(0)) | Ok(Err(_)) => return RawRead::Closed { bytes: total },
                Ok(Ok(n)) => total += n,
            }
        }
    }

    /// §6.2 / §3: the relay must close without a reply.
    pub async fn expect_silent_close(&mut self, within: Duration) -> Step<Outcome> {
        match self.read_raw_event(within).await {
            RawRead::Closed { bytes: 0 } => {
                self.log
                    .add(&self.name, Dir::In, "connection closed without a reply");
                Ok(Outcome::pass())
            }
            RawRead::Closed { bytes } => Err(Outcome::fail(format!(
                "{bytes} bytes arrived before the close; the relay must close without a reply"
            ))),
            RawRead::Body(b) => {
                self.log.add(
                    &self.name,
                    Dir::In,
                    format!("a {}-byte frame arrived", b.len()),
                );
                Err(Outcome::fail(
                    "the relay sent a frame; it must close without a reply",
                ))
            }
            RawRead::Invalid(e) => Err(Outcome::fail(format!("invalid bytes from the relay: {e}"))),
            RawRead::Timeout => Err(Outcome::fail(format!(
                "the connection was still open after {within:?}; the relay must close it"
            ))),
        }
    }

    // --- relay-application helpers -----------------------------------------------------------

    /// Registers `device` with `prekeys` one-time prekeys numbered from 1; unregistered when
    /// the case ends.
    pub async fn register(&mut self, device: u32, prekeys: u32) -> Step<proto::Registered> {
        let req = registration(device, prekeys);
        match self.setup(Body::Register(req), "Register").await? {
            Body::Registered(r) => {
                self.cleanup.lock().push((self.identity.clone(), device));
                Ok(r)
            }
            other => Err(Outcome::fail(format!(
                "Register answered with {}",
                describe(&Frame::new(0, other))
            ))),
        }
    }

    /// Unregisters `device` (setup: rate limits honoured); the case's cleanup then leaves it.
    pub async fn unregister(&mut self, device: u32) -> Step<()> {
        self.setup(
            Body::Unregister(proto::Unregister { device_id: device }),
            "Unregister",
        )
        .await?;
        let me = self.key();
        self.cleanup
            .lock()
            .retain(|(k, d)| !(*k.public() == me && *d == device));
        Ok(())
    }

    /// A signed `Send` from `sender_device` to `to`'s `device`, with a fresh nonce.
    pub fn signed(
        &self,
        to: &PublicKeyBytes,
        device: u32,
        sender_device: u32,
        payload: impl Into<Bytes>,
    ) -> proto::Send {
        OutgoingMessage::new(*to, device, sender_device, payload).sign(&self.identity)
    }

    /// Sends a signed message from device 1 (setup: rate limits honoured).
    pub async fn send_msg(
        &mut self,
        to: &PublicKeyBytes,
        device: u32,
        payload: impl Into<Bytes>,
    ) -> Step<proto::Sent> {
        let req = self.signed(to, device, 1, payload);
        self.send_req(req).await
    }

    /// Sends a prepared `Send` (setup: rate limits honoured).
    pub async fn send_req(&mut self, req: proto::Send) -> Step<proto::Sent> {
        match self.setup(Body::Send(req), "Send").await? {
            Body::Sent(s) => Ok(s),
            other => Err(Outcome::fail(format!(
                "Send answered with {}",
                describe(&Frame::new(0, other))
            ))),
        }
    }

    /// A ticket of this identity (setup: rate limits honoured); `ttl_s` and `uses` as sent.
    pub async fn create_ticket(&mut self, ttl_s: u32, uses: u32) -> Step<proto::Ticket> {
        let req = Body::CreateTicket(proto::CreateTicket { ttl_s, uses });
        match self.setup(req, "CreateTicket").await? {
            Body::Ticket(t) => Ok(t),
            other => Err(Outcome::fail(format!(
                "CreateTicket answered {}",
                describe(&Frame::new(0, other))
            ))),
        }
    }

    pub async fn subscribe(&mut self, device: u32, after: u64) -> Step<proto::Subscribed> {
        let req = Body::Subscribe(proto::Subscribe {
            device_id: device,
            after_id: after,
        });
        match self.ok(req, "Subscribe").await? {
            Body::Subscribed(s) => Ok(s),
            other => Err(Outcome::fail(format!(
                "Subscribe answered with {}",
                describe(&Frame::new(0, other))
            ))),
        }
    }

    /// The next `Deliver` push.
    pub async fn next_deliver(&mut self) -> Step<proto::Deliver> {
        for _ in 0..1000 {
            let f = self.next_push(self.wait).await?;
            match f.body {
                Some(Body::Deliver(d)) => return Ok(d),
                Some(Body::PreKeysLow(_)) => continue,
                _ => {
                    return Err(Outcome::fail(format!(
                        "expected a Deliver push, got {}",
                        describe(&f)
                    )))
                }
            }
        }
        Err(Outcome::fail("no Deliver among 1000 pushes"))
    }

    pub async fn ack(&mut self, device: u32, ids: Vec<u64>) -> Step<proto::Acked> {
        let req = Body::AckMessages(proto::AckMessages {
            device_id: device,
            message_ids: ids,
        });
        match self.ok(req, "AckMessages").await? {
            Body::Acked(a) => Ok(a),
            other => Err(Outcome::fail(format!(
                "AckMessages answered with {}",
                describe(&Frame::new(0, other))
            ))),
        }
    }

    pub async fn prekey_count(&mut self, device: u32) -> Step<u32> {
        let req = Body::GetPreKeyCount(proto::GetPreKeyCount { device_id: device });
        match self.ok(req, "GetPreKeyCount").await? {
            Body::PreKeyCount(c) => Ok(c.count),
            other => Err(Outcome::fail(format!(
                "GetPreKeyCount answered with {}",
                describe(&Frame::new(0, other))
            ))),
        }
    }

    pub async fn fetch(
        &mut self,
        identity: &PublicKeyBytes,
        devices: Vec<u32>,
    ) -> Step<Vec<proto::PreKeyBundle>> {
        let req = Body::FetchPreKeys(proto::FetchPreKeys {
            identity: Bytes::copy_from_slice(identity.as_bytes()),
            device_ids: devices,
        });
        match self.setup(req, "FetchPreKeys").await? {
            Body::PreKeyBundles(b) => Ok(b.bundles),
            other => Err(Outcome::fail(format!(
                "FetchPreKeys answered with {}",
                describe(&Frame::new(0, other))
            ))),
        }
    }

    /// A correct Ping with a fresh id, as frame `id`.
    pub fn ping_frame(id: u64) -> Frame {
        Frame::new(id, Body::Ping(Ping { id: random_id() }))
    }
}

/// A `Register` with a signed prekey and `one_time` one-time prekeys numbered from 1.
pub fn registration(device_id: u32, one_time: u32) -> Register {
    Register {
        device_id,
        registration_id: 7000 + device_id,
        identity_key: Bytes::from(vec![0x05; 33]),
        signed_prekey: Some(SignedPreKey {
            id: 1,
            public_key: Bytes::from(vec![0x06; 33]),
            signature: Bytes::from(vec![0x07; 64]),
        }),
        one_time_prekeys: prekeys(1, one_time),
    }
}

/// One-time prekeys with ids `first..first + count`, each key naming its id.
pub fn prekeys(first: u32, count: u32) -> Vec<PreKey> {
    (0..count)
        .map(|i| PreKey {
            id: first + i,
            public_key: Bytes::from([&[0x21u8][..], &(first + i).to_be_bytes()[..]].concat()),
        })
        .collect()
}
