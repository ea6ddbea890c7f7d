//! The state machine without a socket: a node's session built from the same handshake sits on
//! the other side of an in-memory wire, the application is a handler whose answers, pushes and
//! congestion the test releases by hand, and time is `Instant`s advanced by hand.

use std::sync::Arc;
use std::task::Waker;

use botd_protocol::codec::FrameCodec;
use botd_protocol::handshake::{respond, AwaitingAck};
use botd_protocol::keys::{KeyPair, PublicKeyBytes};
use botd_protocol::proto::{Body, GetPreKeyCount, PreKeyCount, PreKeysLow, Subscribe};
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::*;
use crate::app::{PushError, PushHandle};

const SECOND: Duration = Duration::from_secs(1);
/// Bound on the rounds of [`settle`]: every scenario here settles in a few.
const MAX_ROUNDS: usize = 16;

/// What the application saw, and what the test releases.
#[derive(Default)]
struct Script {
    /// Request ids in the order they were handed over.
    requests: Vec<u64>,
    /// The pending answers, by request id.
    answers: Vec<(u64, oneshot::Sender<Outgoing>)>,
    push: Option<PushHandle>,
    /// Taken by the next `congestion()` call.
    congestion: Option<oneshot::Receiver<()>>,
    flushes: usize,
    disconnected: bool,
}

/// Every request gets a pending answer that the test completes; `Subscribe` is a barrier.
struct TestHandler {
    max_pipelined: usize,
    script: Mutex<Script>,
}

impl TestHandler {
    fn new(max_pipelined: usize) -> Self {
        Self {
            max_pipelined,
            script: Mutex::new(Script::default()),
        }
    }

    /// Completes the pending answer to request `id`.
    fn answer(&self, id: u64) {
        let mut script = self.script.lock();
        let at = script
            .answers
            .iter()
            .position(|(pending, _)| *pending == id)
            .expect("a pending answer to complete");
        let (_, tx) = script.answers.swap_remove(at);
        let answer = Frame::new(id, Body::PreKeyCount(PreKeyCount::default()));
        assert!(tx.send(Outgoing::Frame(answer)).is_ok());
    }

    fn requests(&self) -> Vec<u64> {
        self.script.lock().requests.clone()
    }

    /// The application falls behind: the next `congestion()` returns a future that resolves
    /// when the returned sender is used.
    fn congest(&self) -> oneshot::Sender<()> {
        let (tx, rx) = oneshot::channel();
        self.script.lock().congestion = Some(rx);
        tx
    }

    fn push(&self, frame: Frame) -> Result<(), PushError> {
        let script = self.script.lock();
        script.push.as_ref().expect("connected").push_frame(frame)
    }
}

impl Handler for TestHandler {
    type Session = ();

    fn connect(&self, _peer: PublicKeyBytes, _addr: SocketAddr, push: PushHandle) {
        self.script.lock().push = Some(push);
    }

    fn request(&self, _session: &mut (), frame: Frame) -> Answer {
        let (tx, rx) = oneshot::channel();
        let mut script = self.script.lock();
        script.requests.push(frame.id);
        script.answers.push((frame.id, tx));
        Answer::pending(async move { rx.await.expect("an answer or the test's end") })
    }

    fn is_barrier(&self, frame: &Frame) -> bool {
        matches!(frame.body, Some(Body::Subscribe(_)))
    }

    fn max_pipelined(&self) -> usize {
        self.max_pipelined
    }

    fn flush(&self) {
        self.script.lock().flushes += 1;
    }

    fn congestion(&self) -> Option<Pin<Box<dyn Future<Output = ()> + Send>>> {
        let rx = self.script.lock().congestion.take()?;
        Some(Box::pin(async move {
            let _ = rx.await;
        }))
    }

    fn disconnect(&self, _session: ()) {
        self.script.lock().disconnected = true;
    }
}

/// The node's end of the in-memory wire.
struct Peer {
    session: Session,
    codec: FrameCodec,
    /// Sealed by the node, not yet taken by the connection.
    unsent: BytesMut,
    /// Written by the connection, not yet opened by the node.
    wire: BytesMut,
}

impl Peer {
    fn send(&mut self, frame: Frame) {
        self.session.send(&frame).unwrap();
        self.take_sealed();
    }

    /// Puts what the node's session sealed on the wire.
    fn take_sealed(&mut self) {
        self.unsent
            .extend_from_slice(&self.session.poll_transmit().unwrap());
    }

    fn request(&mut self, id: u64) {
        self.send(Frame::new(
            id,
            Body::GetPreKeyCount(GetPreKeyCount { device_id: 1 }),
        ));
    }

    /// Hands the connection what it takes of the node's bytes, at most `limit`, each read as
    /// large as the room it offers, as a socket would; returns the bytes taken.
    fn deliver(
        &mut self,
        conn: &mut Connection<'_, TestHandler>,
        limit: usize,
        now: Instant,
    ) -> Result<usize, ConnectionError> {
        let mut taken = 0;
        while taken < limit && !self.unsent.is_empty() {
            let Some(buf) = conn.receive_buffer(now) else {
                break;
            };
            let n = (buf.capacity() - buf.len())
                .min(self.unsent.len())
                .min(limit - taken);
            buf.extend_from_slice(&self.unsent.split_to(n));
            conn.on_received(n, now)?;
            taken += n;
        }
        Ok(taken)
    }

    /// Takes everything the connection sealed and returns the frames the node opens.
    fn receive(&mut self, conn: &mut Connection<'_, TestHandler>, now: Instant) -> Vec<Frame> {
        while let Some(out) = conn.poll_transmit() {
            let n = out.len();
            self.wire.extend_from_slice(out);
            conn.advance_transmit(n, now);
        }
        let mut frames = Vec::new();
        while let Some(body) = self.codec.decode(&mut self.wire).unwrap() {
            if let Received::Frame(frame) = self.session.on_frame(body, now).unwrap() {
                frames.push(frame);
            }
        }
        frames
    }
}

fn ids(frames: &[Frame]) -> Vec<u64> {
    frames.iter().map(|frame| frame.id).collect()
}

/// A connection after its handshake with a node, the `Ack` and `Welcome` already read by the
/// node from the connection's first output.
fn connect<'a>(
    handler: &'a TestHandler,
    config: &'a Config,
    budget: Arc<InboundBudget>,
    now: Instant,
) -> (Connection<'a, TestHandler>, Peer) {
    let (node, relay) = (KeyPair::generate(), KeyPair::generate());
    let (waiting, init) = AwaitingAck::start(&node, *relay.public());
    let start = Start {
        handshake: respond(&relay, &init, |_ephemeral| true).unwrap(),
        addr: "127.0.0.1:9".parse().unwrap(),
        inbound: Inbound::new(MAX_HANDSHAKE_FRAME_LEN, budget),
        relay_key: *relay.public(),
        server_time_ms: 0,
    };
    let mut conn = Connection::new(handler, config, start, now).unwrap();
    let mut wire = BytesMut::from(conn.poll_transmit().expect("Ack and Welcome"));
    let n = wire.len();
    conn.advance_transmit(n, now);
    let mut codec = FrameCodec::new(config.max_frame_len);
    let ack = codec
        .decode(&mut wire)
        .unwrap()
        .expect("the Ack comes first");
    let node_keys = waiting.on_ack(&node, &ack).unwrap();
    let mut peer = Peer {
        session: Session::initiator(
            node_keys.keys,
            Timers::initiator(),
            config.max_frame_len,
            now,
        ),
        codec,
        unsent: BytesMut::new(),
        wire,
    };
    let welcome = peer.receive(&mut conn, now);
    assert!(matches!(
        &welcome[..],
        [Frame {
            body: Some(Body::Welcome(_)),
            ..
        }]
    ));
    (conn, peer)
}

fn budget() -> Arc<InboundBudget> {
    InboundBudget::new(1 << 20)
}

/// One round as the transport runs it, with everything the node sent offered as input.
fn round(
    conn: &mut Connection<'_, TestHandler>,
    peer: &mut Peer,
    now: Instant,
) -> Result<Polled, ConnectionError> {
    let mut cx = Context::from_waker(Waker::noop());
    let polled = conn.poll(&mut cx, now)?;
    if let Polled::End(_) = polled {
        return Ok(polled);
    }
    let read = peer.deliver(conn, usize::MAX, now)?;
    conn.end_input(now);
    Ok(if read > 0 { Polled::Progress } else { polled })
}

/// Rounds until one makes no progress; the end, if the connection ended.
fn settle(
    conn: &mut Connection<'_, TestHandler>,
    peer: &mut Peer,
    now: Instant,
) -> Result<Option<End>, ConnectionError> {
    for _ in 0..MAX_ROUNDS {
        match round(conn, peer, now)? {
            Polled::End(end) => return Ok(Some(end)),
            Polled::Idle => return Ok(None),
            Polled::Progress => {}
        }
    }
    panic!("no quiet round within {MAX_ROUNDS}");
}

/// A timeout fires at `at` and not a second before: the error it ends the connection with.
fn times_out_at(conn: &mut Connection<'_, TestHandler>, at: Instant) -> ConnectionError {
    conn.handle_timeout(at - SECOND).unwrap();
    conn.handle_timeout(at)
        .expect_err("a timeout at its deadline")
}

#[test]
fn answers_leave_in_request_order_whatever_order_they_complete_in() {
    let (handler, config, t0) = (TestHandler::new(8), Config::default(), Instant::now());
    let (mut conn, mut peer) = connect(&handler, &config, budget(), t0);
    for id in 1..=3 {
        peer.request(id);
    }
    // The session answers a ping itself, but in its turn: after the answers before it.
    peer.session.ping(4, t0).unwrap().expect("first ping");
    peer.take_sealed();
    assert_eq!(settle(&mut conn, &mut peer, t0).unwrap(), None);
    assert_eq!(handler.requests(), [1, 2, 3]);
    assert_eq!(handler.script.lock().flushes, 1, "one flush for the round");

    handler.answer(3);
    handler.answer(2);
    settle(&mut conn, &mut peer, t0).unwrap();
    assert!(
        peer.receive(&mut conn, t0).is_empty(),
        "1 is not answered yet"
    );

    handler.answer(1);
    settle(&mut conn, &mut peer, t0).unwrap();
    let frames = peer.receive(&mut conn, t0);
    assert_eq!(ids(&frames), [1, 2, 3, 4]);
    assert!(matches!(frames[3].body, Some(Body::Pong(_))));
    assert_eq!(conn.traffic().frames_in, 4);
    assert_eq!(conn.traffic().frames_out, 4);
    assert_eq!(
        handler.script.lock().flushes,
        1,
        "no flush without dispatching"
    );
}

#[test]
fn at_most_max_pipelined_answers_pending_and_no_more_input_read() {
    let (handler, config, t0) = (TestHandler::new(2), Config::default(), Instant::now());
    let (mut conn, mut peer) = connect(&handler, &config, budget(), t0);
    for id in 1..=4 {
        peer.request(id);
    }
    settle(&mut conn, &mut peer, t0).unwrap();
    assert_eq!(handler.requests(), [1, 2]);
    assert!(
        conn.inbound.buffered() > 0,
        "3 and 4 arrived in the same read"
    );
    assert!(
        conn.receive_buffer(t0).is_none(),
        "a full pipeline reads nothing"
    );

    handler.answer(1);
    settle(&mut conn, &mut peer, t0).unwrap();
    assert_eq!(handler.requests(), [1, 2, 3]);
    assert!(conn.receive_buffer(t0).is_none());
    handler.answer(2);
    handler.answer(3);
    settle(&mut conn, &mut peer, t0).unwrap();
    assert_eq!(handler.requests(), [1, 2, 3, 4]);
    assert!(conn.receive_buffer(t0).is_some(), "room again");
    handler.answer(4);
    settle(&mut conn, &mut peer, t0).unwrap();
    assert_eq!(ids(&peer.receive(&mut conn, t0)), [1, 2, 3, 4]);
}

#[test]
fn a_barrier_waits_for_the_pipeline_and_pushes_wait_for_its_answer() {
    let (handler, config, t0) = (TestHandler::new(8), Config::default(), Instant::now());
    let (mut conn, mut peer) = connect(&handler, &config, budget(), t0);
    peer.request(1);
    peer.send(Frame::new(2, Body::Subscribe(Subscribe::default())));
    peer.request(3);
    settle(&mut conn, &mut peer, t0).unwrap();
    assert_eq!(handler.requests(), [1], "the barrier waits for 1");
    assert!(
        conn.receive_buffer(t0).is_none(),
        "nothing is read behind it"
    );

    handler.answer(1);
    settle(&mut conn, &mut peer, t0).unwrap();
    assert_eq!(handler.requests(), [1, 2, 3]);
    let push = Frame::new(0, Body::PreKeysLow(PreKeysLow::default()));
    handler.push(push.clone()).unwrap();
    settle(&mut conn, &mut peer, t0).unwrap();
    assert_eq!(ids(&peer.receive(&mut conn, t0)), [1]);

    handler.answer(2);
    settle(&mut conn, &mut peer, t0).unwrap();
    assert_eq!(
        ids(&peer.receive(&mut conn, t0)),
        [2],
        "3 is still in flight"
    );
    handler.answer(3);
    settle(&mut conn, &mut peer, t0).unwrap();
    assert_eq!(
        peer.receive(&mut conn, t0),
        [
            Frame::new(3, Body::PreKeyCount(PreKeyCount::default())),
            push
        ]
    );
}

#[test]
fn congestion_stops_reading_until_it_is_over() {
    let (handler, config, t0) = (TestHandler::new(8), Config::default(), Instant::now());
    let (mut conn, mut peer) = connect(&handler, &config, budget(), t0);
    let uncongested = handler.congest();
    peer.request(1);
    settle(&mut conn, &mut peer, t0).unwrap();
    assert_eq!(handler.requests(), [1]);

    peer.request(2);
    settle(&mut conn, &mut peer, t0).unwrap();
    assert_eq!(handler.requests(), [1], "nothing read while congested");
    assert!(!peer.unsent.is_empty());

    uncongested.send(()).unwrap();
    settle(&mut conn, &mut peer, t0).unwrap();
    assert_eq!(handler.requests(), [1, 2]);
}

#[test]
fn a_push_overflow_closes_as_slow_consumer() {
    let config = Config {
        max_outbound_bytes: 100,
        ..Config::default()
    };
    let (handler, t0) = (TestHandler::new(8), Instant::now());
    let (mut conn, mut peer) = connect(&handler, &config, budget(), t0);
    let push = Frame::new(0, Body::PreKeysLow(PreKeysLow::default()));
    let mut pushed = 0;
    while handler.push(push.clone()).is_ok() {
        pushed += 1;
        assert!(pushed < 100, "the queue is bounded");
    }
    assert_eq!(
        settle(&mut conn, &mut peer, t0).unwrap(),
        Some(End::SlowConsumer)
    );
    let frames = peer.receive(&mut conn, t0);
    assert_eq!(frames.len(), pushed + 1);
    let Some(Body::Error(error)) = &frames[pushed].body else {
        panic!("an Error closes: {:?}", frames[pushed]);
    };
    assert_eq!(error.code, ErrorCode::SlowConsumer as i32);
}

#[test]
fn pushes_and_requests_wait_while_unwritten_output_is_high() {
    let (handler, config, t0) = (TestHandler::new(8), Config::default(), Instant::now());
    let (mut conn, mut peer) = connect(&handler, &config, budget(), t0);
    let big = Frame::error(0, ErrorCode::Internal, "x".repeat(OUTBOX_HIGH / 3));
    for _ in 0..4 {
        handler.push(big.clone()).unwrap();
    }
    peer.request(1);
    settle(&mut conn, &mut peer, t0).unwrap();
    assert!(conn.session.transmit_len() >= OUTBOX_HIGH);
    assert!(handler.script.lock().push.as_ref().unwrap().queued_bytes() > 0);
    assert!(
        handler.requests().is_empty(),
        "no request while the peer does not read"
    );

    assert_eq!(peer.receive(&mut conn, t0).len(), 3);
    settle(&mut conn, &mut peer, t0).unwrap();
    assert_eq!(peer.receive(&mut conn, t0).len(), 1);
    assert_eq!(handler.requests(), [1]);
}

#[test]
fn the_write_timeout_runs_only_while_output_is_blocked() {
    let config = Config {
        write_timeout: 10 * SECOND,
        ..Config::default()
    };
    let (handler, t0) = (TestHandler::new(8), Instant::now());
    let (mut conn, mut peer) = connect(&handler, &config, budget(), t0);
    let session_deadline = t0 + config.ping_interval;
    assert_eq!(conn.poll_timeout(), Some(session_deadline));

    peer.request(1);
    settle(&mut conn, &mut peer, t0).unwrap();
    handler.answer(1);
    settle(&mut conn, &mut peer, t0).unwrap();
    conn.on_transmit_blocked(t0);
    assert_eq!(conn.poll_timeout(), Some(t0 + 10 * SECOND));
    // A write that makes progress stops it; blocking again starts it afresh, from the first
    // moment it blocked.
    conn.advance_transmit(1, t0 + 5 * SECOND);
    assert_eq!(conn.poll_timeout(), Some(session_deadline));
    conn.handle_timeout(t0 + 15 * SECOND).unwrap();
    conn.on_transmit_blocked(t0 + 16 * SECOND);
    conn.on_transmit_blocked(t0 + 18 * SECOND);
    assert_eq!(conn.poll_timeout(), Some(t0 + 26 * SECOND));
    assert!(matches!(
        times_out_at(&mut conn, t0 + 26 * SECOND),
        ConnectionError::WriteTimeout(d) if d == 10 * SECOND
    ));
}

#[test]
fn the_frame_clock_stands_still_while_the_relay_is_busy() {
    let config = Config {
        frame_timeout: 10 * SECOND,
        ..Config::default()
    };
    let (handler, t0) = (TestHandler::new(8), Instant::now());
    let (mut conn, mut peer) = connect(&handler, &config, budget(), t0);
    let session_deadline = t0 + config.ping_interval;
    peer.request(1);
    let first = peer.unsent.len();
    peer.request(2);
    // Request 1 and a part of 2 arrive: the clock runs for the part.
    let mut cx = Context::from_waker(Waker::noop());
    conn.poll(&mut cx, t0).unwrap();
    peer.deliver(&mut conn, first + 3, t0).unwrap();
    conn.end_input(t0);
    assert_eq!(handler.requests(), [1]);
    assert_eq!(conn.poll_timeout(), Some(t0 + 10 * SECOND));

    // At t0 + 4 s the application falls behind: the relay does not read, the clock stops.
    let uncongested = handler.congest();
    let t4 = t0 + 4 * SECOND;
    conn.poll(&mut cx, t4).unwrap();
    conn.end_input(t4);
    assert_eq!(conn.poll_timeout(), Some(session_deadline));
    conn.handle_timeout(t0 + 30 * SECOND).unwrap();

    // Over at t0 + 30 s: the 6 s left run from there.
    uncongested.send(()).unwrap();
    let t30 = t0 + 30 * SECOND;
    conn.poll(&mut cx, t30).unwrap();
    conn.end_input(t30);
    assert_eq!(conn.poll_timeout(), Some(t0 + 36 * SECOND));
    assert!(matches!(
        times_out_at(&mut conn, t0 + 36 * SECOND),
        ConnectionError::FrameTimeout(d) if d == 10 * SECOND
    ));
}

#[test]
fn an_exhausted_budget_waits_and_retries() {
    let (handler, config, t0) = (TestHandler::new(8), Config::default(), Instant::now());
    let budget = InboundBudget::new(100);
    let (mut conn, mut peer) = connect(&handler, &config, budget.clone(), t0);
    peer.request(1);
    let frame_len = peer.unsent.len();
    assert!(budget.try_charge(100), "other connections hold it all");

    // The length arrives; the rest needs budget there is none of.
    peer.deliver(&mut conn, 4, t0).unwrap();
    assert!(conn.receive_buffer(t0).is_none());
    let retry = t0 + BUDGET_RETRY;
    assert_eq!(conn.poll_timeout(), Some(retry));
    budget.release(100);
    assert!(conn.receive_buffer(t0).is_none(), "not before the retry");
    conn.handle_timeout(retry).unwrap();

    assert!(conn.receive_buffer(retry).is_some());
    assert_eq!(budget.used(), frame_len, "the whole frame is charged");
    settle(&mut conn, &mut peer, retry).unwrap();
    assert_eq!(handler.requests(), [1]);
    assert_eq!(budget.used(), 0, "given back once complete");
}

#[test]
fn ends_peer_closed_shutdown_and_disconnect() {
    let (handler, config, t0) = (TestHandler::new(8), Config::default(), Instant::now());
    let budget = budget();
    let (mut conn, mut peer) = connect(&handler, &config, budget.clone(), t0);
    assert_eq!(conn.on_peer_closed().unwrap(), End::PeerClosed);
    peer.request(1);
    peer.request(2);
    let whole = peer.unsent.len();
    peer.deliver(&mut conn, whole - 1, t0).unwrap();
    assert_eq!(handler.requests(), [1]);
    assert!(matches!(
        conn.on_peer_closed(),
        Err(ConnectionError::Codec(CodecError::Truncated { .. }))
    ));
    assert!(conn.receive_buffer(t0).is_some());
    assert!(budget.used() > 0, "the partial frame is charged");

    assert_eq!(conn.shutdown().unwrap(), End::Shutdown);
    let closing = conn.disconnect();
    assert!(handler.script.lock().disconnected);
    assert_eq!(closing.pending.len(), 1, "request 1 is still pending");
    assert_eq!(budget.used(), 0, "the partial frame's budget is given back");
    let push = Frame::new(0, Body::PreKeysLow(PreKeysLow::default()));
    assert_eq!(handler.push(push), Err(PushError::Closed));
    let mut session = closing.session;
    peer.wire.extend_from_slice(session.transmit());
    session.advance_transmit(session.transmit_len());
    let body = peer.codec.decode(&mut peer.wire).unwrap().unwrap();
    let Received::Frame(Frame {
        body: Some(Body::Error(error)),
        ..
    }) = peer.session.on_frame(body, t0).unwrap()
    else {
        panic!("the shutdown notice");
    };
    assert_eq!(error.code, ErrorCode::ShuttingDown as i32);
}
