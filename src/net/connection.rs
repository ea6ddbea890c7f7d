//! One connection: the responder handshake (the whole `Init` under its own deadline before any
//! slot is taken, then a fair turn for the crypto), then the session loop.
//!
//! The session loop is one hand-written poll function, so that one wake-up does all the work
//! that is ready: answers at the head of the request pipeline (in arrival order), queued
//! pushes, requests newly read (each started at once, so a session's requests are applied in
//! order while earlier ones wait for the disk), and then a single write of everything sealed.
//! Memory per connection follows what the peer is doing: no buffer is kept while idle, a
//! partly received frame is charged to the relay-wide inbound budget, and the pipeline and the
//! output are bounded.

use std::collections::VecDeque;
use std::future::Future;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout_at, Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tracing::info;

use super::admission::{InboundBudget, Ticket};
use super::server::Shared;
use super::NetError;
use crate::app::{Answer, Handler, Outgoing, PendingAnswer, Push, PushReceiver};
use botd_protocol::codec::{encode_frame, frame_len_at_front, FrameCodec};
use botd_protocol::handshake::{respond, Established};
use botd_protocol::proto::{ErrorCode, Frame, Welcome, PROTOCOL_NAME};
use botd_protocol::session::{Received, Session, Timers};

/// Largest frame accepted before the handshake completes. An `Init` with every field at its
/// maximum is under 300 bytes; a small bound keeps unauthenticated peers from making the relay
/// buffer `max_frame_len` bytes.
pub const MAX_HANDSHAKE_FRAME_LEN: u32 = 1024;

/// Bytes reserved for a read when no longer frame is announced (in a session; before the
/// handshake completes, the frame limit itself).
const READ_CHUNK: usize = 16 * 1024;
/// Past this much sealed and unwritten output, the session takes no new requests or pushes
/// until the peer reads.
const OUTBOX_HIGH: usize = 256 * 1024;
/// How long, and how much, a closing connection still reads so its last frame is not reset away.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 1 << 20;
/// While the inbound budget is exhausted, how often a waiting connection tries again.
const BUDGET_RETRY: Duration = Duration::from_millis(5);

/// How a session ended when nothing went wrong.
#[derive(Debug, Clone, Copy)]
enum SessionEnd {
    PeerClosed,
    Shutdown,
    SlowConsumer,
}

impl SessionEnd {
    fn reason(self) -> &'static str {
        match self {
            SessionEnd::PeerClosed => "peer_closed",
            SessionEnd::Shutdown => "shutdown",
            SessionEnd::SlowConsumer => "slow_consumer",
        }
    }
}

/// Traffic of one connection, added to the relay-wide counters in batches.
#[derive(Debug, Default, Clone, Copy)]
struct Traffic {
    frames_in: u64,
    frames_out: u64,
    bytes_in: u64,
    bytes_out: u64,
}

/// Received bytes not yet taken as frames.
struct Inbound {
    buf: BytesMut,
    codec: FrameCodec,
    budget: Arc<InboundBudget>,
    /// Budget held for the partly received frame at the front of `buf`.
    charged: usize,
    /// When the first byte of the frame being received arrived.
    partial_since: Option<Instant>,
}

enum Fill {
    Read(usize),
    Eof,
    /// The inbound budget cannot cover the frame being received; try again later.
    NoBudget,
}

impl Inbound {
    fn new(max_frame_len: u32, budget: Arc<InboundBudget>) -> Self {
        Self {
            buf: BytesMut::new(),
            codec: FrameCodec::new(max_frame_len),
            budget,
            charged: 0,
            partial_since: None,
        }
    }

    /// The next complete frame body, if buffered (`now` dates a frame that begins here).
    fn next_frame(&mut self, now: Instant) -> Result<Option<BytesMut>, NetError> {
        let frame = self.codec.decode(&mut self.buf)?;
        if frame.is_some() {
            self.budget.release(std::mem::take(&mut self.charged));
            self.partial_since = None;
        }
        if !self.buf.is_empty() && self.partial_since.is_none() {
            self.partial_since = Some(now);
        }
        Ok(frame)
    }

    /// Reads what the socket has, reserving (and charging) room for a frame announced but
    /// not complete.
    fn poll_fill(
        &mut self,
        stream: &TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Fill, NetError>> {
        loop {
            let want = match frame_len_at_front(&self.buf) {
                Some(total) if total > self.buf.len() => {
                    if self.charged < total {
                        if !self.budget.try_charge(total - self.charged) {
                            return Poll::Ready(Ok(Fill::NoBudget));
                        }
                        self.charged = total;
                    }
                    total - self.buf.len()
                }
                _ => READ_CHUNK.min(self.codec.max_frame_len() as usize + 4),
            };
            if self.buf.capacity() - self.buf.len() < want {
                self.buf.reserve(want);
            }
            match stream.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err.into())),
                Poll::Ready(Ok(())) => {}
            }
            match stream.try_read_buf(&mut self.buf) {
                Ok(0) => return Poll::Ready(Ok(Fill::Eof)),
                Ok(n) => return Poll::Ready(Ok(Fill::Read(n))),
                Err(err) if err.kind() == ErrorKind::WouldBlock => continue,
                Err(err) => return Poll::Ready(Err(err.into())),
            }
        }
    }

    /// Gives back memory once the buffer holds nothing worth it: all of it when empty, the
    /// spare room when it holds a few bytes of a frame whose length has not arrived yet.
    fn compact(&mut self) {
        if self.buf.is_empty() {
            if self.buf.capacity() > 0 {
                self.buf = BytesMut::new();
            }
        } else if frame_len_at_front(&self.buf).is_none() && self.buf.capacity() > 1024 {
            self.buf = BytesMut::from(&self.buf[..]);
        }
    }

    /// A frame started and not finished by `deadline`: when the peer must have completed it.
    fn frame_deadline(&self, frame_timeout: Duration) -> Option<Instant> {
        self.partial_since.map(|since| since + frame_timeout)
    }

    /// Moves the start of the frame being received `by` later: time the relay did not read.
    fn shift_frame_clock(&mut self, by: Duration) {
        if let Some(since) = &mut self.partial_since {
            *since += by;
        }
    }
}

impl Drop for Inbound {
    fn drop(&mut self) {
        self.budget.release(self.charged);
    }
}

pub(super) async fn serve<H: Handler>(
    shared: Arc<Shared<H>>,
    mut stream: TcpStream,
    peer: SocketAddr,
    ticket: Ticket,
) {
    let started = Instant::now();
    let mut inbound = Inbound::new(MAX_HANDSHAKE_FRAME_LEN, shared.budget.clone());
    let handshake = tokio::select! {
        _ = shared.shutdown.cancelled() => Ok(None),
        // Boxed: its state is dropped once the session runs, so a task holds only the session's.
        outcome = Box::pin(handshake(&shared, &mut stream, &mut inbound, peer, ticket, started)) => outcome.map(Some),
    };
    match handshake {
        Ok(Some(established)) => {
            shared.metrics.handshakes_ok.increment(1);
            shared
                .metrics
                .handshake_seconds
                .record(started.elapsed().as_secs_f64());
            let remote = established.remote;
            let mut traffic = Traffic::default();
            // Boxed, like the handshake: the task itself stays small for the whole session.
            let result = Box::pin(session(
                &shared,
                &mut stream,
                inbound,
                established,
                peer,
                &mut traffic,
            ))
            .await;
            let reason = match &result {
                Ok(end) => end.reason(),
                Err(err) => err.reason(),
            };
            metrics::counter!(crate::metrics::SESSIONS_CLOSED, "reason" => reason).increment(1);
            let t = traffic;
            let error = result.as_ref().err().map(|err| err.to_string());
            info!(%peer, identity = %remote, reason, error, frames_in = t.frames_in, frames_out = t.frames_out,
                bytes_in = t.bytes_in, bytes_out = t.bytes_out, duration_ms = started.elapsed().as_millis() as u64,
                "session closed");
        }
        Ok(None) => {}
        Err(err) => {
            metrics::counter!(crate::metrics::HANDSHAKES, "outcome" => "failed", "reason" => err.reason())
                .increment(1);
            metrics::counter!(crate::metrics::SESSIONS_CLOSED, "reason" => err.reason())
                .increment(1);
            info!(%peer, reason = err.reason(), error = %err, "handshake failed");
        }
    }
    // Boxed: its read buffer exists only while a connection closes, not in every task.
    Box::pin(linger_close(&mut stream)).await;
}

/// Reads the whole `Init` (before any slot is taken), waits its turn for crypto, answers it
/// and returns the keys; any failure closes without a reply.
async fn handshake<H: Handler>(
    shared: &Shared<H>,
    stream: &mut TcpStream,
    inbound: &mut Inbound,
    peer: SocketAddr,
    ticket: Ticket,
    accepted: Instant,
) -> Result<Established, NetError> {
    let config = &shared.config;
    let init_deadline = accepted + config.init_timeout.min(config.handshake_timeout);
    let deadline = accepted + config.handshake_timeout;
    let evicted = ticket.evicted.clone();
    let init = tokio::select! {
        _ = evicted.cancelled() => return Err(NetError::Evicted),
        init = timeout_at(init_deadline, read_frame(stream, inbound)) => {
            init.map_err(|_| NetError::InitTimeout(config.init_timeout))??
        }
    };
    let slot = tokio::select! {
        _ = evicted.cancelled() => return Err(NetError::Evicted),
        slot = timeout_at(deadline, shared.crypto.acquire(peer.ip())) => {
            slot.map_err(|_| NetError::HandshakeTimeout(config.handshake_timeout))?
        }
    };
    let response = respond(&shared.identity, &init, |key| {
        shared.replay.lock().insert(key)
    })?;
    drop(slot);
    timeout_at(
        deadline,
        stream.write_all(&encode_frame(&response.ack_body)),
    )
    .await
    .map_err(|_| NetError::HandshakeTimeout(config.handshake_timeout))??;
    ticket.authenticated();
    Ok(response.established)
}

/// Reads one whole frame (the `Init`).
async fn read_frame(stream: &TcpStream, inbound: &mut Inbound) -> Result<BytesMut, NetError> {
    loop {
        if let Some(frame) = inbound.next_frame(Instant::now())? {
            return Ok(frame);
        }
        let fill = std::future::poll_fn(|cx| inbound.poll_fill(stream, cx)).await?;
        match fill {
            Fill::Read(_) => {}
            Fill::Eof if inbound.buf.is_empty() => return Err(NetError::PeerClosed),
            Fill::Eof => {
                return Err(botd_protocol::codec::CodecError::Truncated {
                    buffered: inbound.buf.len(),
                }
                .into())
            }
            Fill::NoBudget => tokio::time::sleep(BUDGET_RETRY).await,
        }
    }
}

async fn session<H: Handler>(
    shared: &Shared<H>,
    stream: &mut TcpStream,
    inbound: Inbound,
    established: Established,
    peer: SocketAddr,
    traffic: &mut Traffic,
) -> Result<SessionEnd, NetError> {
    let config = &shared.config;
    let mut conn = Live::start(shared, stream, inbound, established, peer)?;
    let result = std::future::poll_fn(|cx| conn.poll_session(cx)).await;
    let app = conn.app.take().expect("taken once");
    shared.handler.disconnect(app);
    // Answers still pending do their work (e.g. announce a stored message) even though nobody
    // will read them.
    for pending in conn.pipeline.drain(..) {
        tokio::spawn(async move {
            pending.await;
        });
    }
    // Whatever was sealed before the end (an Error frame, usually) still goes out, bounded by
    // the write timeout whatever the peer does.
    let flush_deadline = Instant::now() + config.write_timeout;
    let _ = timeout_at(flush_deadline, conn.flush_all()).await;
    conn.report_traffic();
    *traffic = conn.traffic;
    result
}

/// The state of an established session.
struct Live<'a, H: Handler> {
    shared: &'a Shared<H>,
    stream: &'a mut TcpStream,
    inbound: Inbound,
    session: Session,
    app: Option<H::Session>,
    pushes: PushReceiver,
    pushes_open: bool,
    /// Answers not yet sealed, in request order.
    pipeline: VecDeque<PendingAnswer>,
    /// A barrier request waiting for the pipeline to empty.
    held: Option<Frame>,
    /// A barrier's answer is pending: pushes wait until it has been sealed.
    barrier_pending: bool,
    /// Requests were dispatched since the application was last asked to flush.
    dispatched: bool,
    congestion: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    timer: Pin<Box<Sleep>>,
    timer_at: Option<Instant>,
    write_blocked_since: Option<Instant>,
    budget_retry_at: Option<Instant>,
    /// Since when the session has not been reading because of the relay itself (see
    /// [`Live::frame_deadline`]).
    frame_clock_paused: Option<Instant>,
    traffic: Traffic,
    reported: Traffic,
    /// The clock, read once per round of work.
    now: Instant,
}

impl<'a, H: Handler> Live<'a, H> {
    /// Sends `Welcome` and connects the application. A plain function, so that nothing of
    /// this size stays in the connection task's state (an idle session's memory is mostly
    /// what this box holds).
    fn start(
        shared: &'a Shared<H>,
        stream: &'a mut TcpStream,
        mut inbound: Inbound,
        established: Established,
        peer: SocketAddr,
    ) -> Result<Box<Self>, NetError> {
        let config = &shared.config;
        inbound.codec.set_max_frame_len(config.max_frame_len);
        let timers = Timers {
            ping_min_interval: config.ping_min_interval,
            probe_after: Some(config.ping_interval),
            keepalive_after: None,
            pong_timeout: config.pong_timeout,
            idle_timeout: Some(config.idle_timeout),
        };
        // Peers accept frames up to the relay's own announced limit (docs/PROTOCOL.md).
        let mut session = Session::responder(
            established.keys,
            timers,
            config.max_frame_len,
            Instant::now().into_std(),
        );
        session.send_welcome(Welcome {
            protocol: PROTOCOL_NAME.to_owned(),
            server_version: env!("CARGO_PKG_VERSION").to_owned(),
            max_frame_len: config.max_frame_len,
            max_payload_len: config.max_payload_len,
            ping_interval_ms: config.ping_interval.as_millis() as u64,
            server_time_ms: crate::clock::unix_millis(),
            idle_timeout_ms: config.idle_timeout.as_millis() as u64,
            relay_pubkey: bytes::Bytes::copy_from_slice(shared.identity.public().as_bytes()),
            ping_min_interval_ms: config.ping_min_interval.as_millis() as u64,
        })?;
        let (push, pushes) = crate::app::push_channel(config.max_outbound_bytes);
        let app = shared.handler.connect(established.remote, peer, push);
        Ok(Box::new(Live {
            shared,
            stream,
            inbound,
            session,
            app: Some(app),
            pushes,
            pushes_open: true,
            pipeline: VecDeque::new(),
            held: None,
            barrier_pending: false,
            dispatched: false,
            congestion: None,
            shutdown: Box::pin(shared.shutdown.clone().cancelled_owned()),
            timer: Box::pin(sleep_until(Instant::now())),
            timer_at: None,
            write_blocked_since: None,
            budget_retry_at: None,
            frame_clock_paused: None,
            traffic: Traffic::default(),
            reported: Traffic::default(),
            now: Instant::now(),
        }))
    }

    fn app(&mut self) -> &mut H::Session {
        self.app.as_mut().expect("present while the session runs")
    }

    fn poll_session(&mut self, cx: &mut Context<'_>) -> Poll<Result<SessionEnd, NetError>> {
        let result = self.poll_work(cx);
        self.report_traffic();
        result
    }

    fn poll_work(&mut self, cx: &mut Context<'_>) -> Poll<Result<SessionEnd, NetError>> {
        loop {
            self.now = Instant::now();
            if self.shutdown.as_mut().poll(cx).is_ready() {
                self.session.send(&Frame::error(
                    0,
                    ErrorCode::ShuttingDown,
                    "relay is shutting down",
                ))?;
                return Poll::Ready(Ok(SessionEnd::Shutdown));
            }
            let mut progress = self.poll_answers(cx)?;
            if let Some(end) = self.poll_pushes(cx)? {
                return Poll::Ready(Ok(end));
            }
            if let Some(congestion) = &mut self.congestion {
                if congestion.as_mut().poll(cx).is_ready() {
                    self.congestion = None;
                    progress = true;
                }
            }
            match self.poll_requests(cx)? {
                Poll::Ready(Some(end)) => return Poll::Ready(Ok(end)),
                Poll::Ready(None) => progress = true,
                Poll::Pending => {}
            }
            if std::mem::take(&mut self.dispatched) {
                // Everything readable is dispatched: one write of the journal serves it all.
                self.shared.handler.flush();
            }
            progress |= self.poll_write(cx)?;
            progress |= self.poll_timers(cx)?;
            if !progress {
                // Nothing more to do until the peer or the application moves: an idle
                // session keeps no buffers.
                self.session.release_idle_memory();
                self.pushes.release_idle_memory();
                return Poll::Pending;
            }
        }
    }

    /// Seals answers at the head of the pipeline that are ready, in order.
    fn poll_answers(&mut self, cx: &mut Context<'_>) -> Result<bool, NetError> {
        let mut progress = false;
        while let Some(head) = self.pipeline.front_mut() {
            let Poll::Ready(out) = head.as_mut().poll(cx) else {
                break;
            };
            self.pipeline.pop_front();
            self.seal(&out)?;
            progress = true;
        }
        if self.pipeline.is_empty() {
            self.barrier_pending = false;
        }
        Ok(progress)
    }

    /// Seals queued pushes while the output has room; a barrier's answer goes first.
    fn poll_pushes(&mut self, cx: &mut Context<'_>) -> Result<Option<SessionEnd>, NetError> {
        while self.pushes_open && !self.barrier_pending && self.session.transmit_len() < OUTBOX_HIGH
        {
            match self.pushes.poll_recv(cx) {
                Poll::Pending => break,
                Poll::Ready(Some(Push::Out(out))) => {
                    self.seal(&out)?;
                    if self.pushes.take_resume() {
                        let app = self.app.as_mut().expect("present while the session runs");
                        self.shared.handler.resume(app);
                    }
                }
                Poll::Ready(Some(Push::SlowConsumer)) => {
                    self.session.send(&Frame::error(
                        0,
                        ErrorCode::SlowConsumer,
                        "outbound queue overflowed",
                    ))?;
                    return Ok(Some(SessionEnd::SlowConsumer));
                }
                // The application dropped every handle: nothing more will be pushed.
                Poll::Ready(None) => self.pushes_open = false,
            }
        }
        Ok(None)
    }

    /// True while the session takes new requests.
    fn can_dispatch(&self) -> bool {
        self.pipeline.len() < self.shared.handler.max_pipelined()
            && self.session.transmit_len() < OUTBOX_HIGH
            && self.congestion.is_none()
    }

    /// Dispatches buffered frames, reading more while the session takes them. `Ready(None)`
    /// when something happened.
    fn poll_requests(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<SessionEnd>, NetError>> {
        let mut progress = false;
        loop {
            if let Some(frame) = self.held.take() {
                if !self.pipeline.is_empty() {
                    self.held = Some(frame);
                    break;
                }
                self.dispatch(frame, true)?;
                progress = true;
                continue;
            }
            if !self.can_dispatch() {
                break;
            }
            if let Some(body) = self.inbound.next_frame(self.now)? {
                self.count_in();
                match self.session.on_frame(body, self.now.into_std())? {
                    Received::Frame(frame) => {
                        if self.shared.handler.is_barrier(&frame) && !self.pipeline.is_empty() {
                            self.held = Some(frame);
                        } else {
                            let barrier = self.shared.handler.is_barrier(&frame);
                            self.dispatch(frame, barrier)?;
                        }
                    }
                    Received::Reply(reply) => self.answer(Outgoing::Frame(reply))?,
                    Received::Nothing => {}
                }
                progress = true;
                continue;
            }
            if self.budget_retry_at.is_some() {
                break;
            }
            match self.inbound.poll_fill(self.stream, cx) {
                Poll::Pending => break,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Ready(Ok(Fill::Read(n))) => {
                    self.traffic.bytes_in += n as u64;
                    progress = true;
                }
                Poll::Ready(Ok(Fill::Eof)) => {
                    if !self.inbound.buf.is_empty() {
                        return Poll::Ready(Err(botd_protocol::codec::CodecError::Truncated {
                            buffered: self.inbound.buf.len(),
                        }
                        .into()));
                    }
                    return Poll::Ready(Ok(Some(SessionEnd::PeerClosed)));
                }
                Poll::Ready(Ok(Fill::NoBudget)) => {
                    self.budget_retry_at = Some(self.now + BUDGET_RETRY);
                    progress = true;
                    break;
                }
            }
        }
        self.inbound.compact();
        if self.congestion.is_none() {
            self.congestion = self.shared.handler.congestion();
        }
        if progress {
            Poll::Ready(Ok(None))
        } else {
            Poll::Pending
        }
    }

    /// Hands a frame to the application and queues its answer in order.
    fn dispatch(&mut self, frame: Frame, barrier: bool) -> Result<(), NetError> {
        let answer = {
            let handler = &self.shared.handler;
            handler.request(self.app(), frame)
        };
        match answer {
            Answer::None => Ok(()),
            Answer::Ready(out) => self.answer(out),
            Answer::Pending(mut pending) => {
                self.dispatched = true;
                // Polled once now, so what it does before its first wait happens in arrival
                // order.
                let waker = std::task::Waker::noop();
                let mut cx = Context::from_waker(waker);
                match pending.as_mut().poll(&mut cx) {
                    Poll::Ready(out) => self.answer(out),
                    Poll::Pending => {
                        self.pipeline.push_back(pending);
                        self.barrier_pending |= barrier;
                        Ok(())
                    }
                }
            }
        }
    }

    /// An answer that is ready: sealed now if nothing is ahead of it, else queued behind.
    fn answer(&mut self, out: Outgoing) -> Result<(), NetError> {
        if self.pipeline.is_empty() {
            self.seal(&out)
        } else {
            self.pipeline.push_back(Box::pin(std::future::ready(out)));
            Ok(())
        }
    }

    fn seal(&mut self, out: &Outgoing) -> Result<(), NetError> {
        let before = self.session.transmit_len();
        match out.seal(&mut self.session) {
            Ok(()) => {}
            // Limits checked at start make this impossible; if it happens anyway the request
            // fails, the session does not.
            Err(botd_protocol::session::SessionError::FrameTooLarge { len, max }) => {
                tracing::error!(len, max, "an answer exceeds the peer's frame limit");
                self.session.send(&Frame::error(
                    out.frame_id(),
                    ErrorCode::Internal,
                    "the answer exceeds the frame limit",
                ))?;
            }
            Err(err) => return Err(err.into()),
        }
        self.traffic.frames_out += 1;
        self.traffic.bytes_out += (self.session.transmit_len() - before) as u64;
        Ok(())
    }

    /// Writes what is sealed, as far as the socket takes it.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Result<bool, NetError> {
        let mut progress = false;
        while self.session.transmit_len() > 0 {
            match self.stream.poll_write_ready(cx) {
                Poll::Pending => {
                    self.write_blocked_since.get_or_insert(self.now);
                    return Ok(progress);
                }
                Poll::Ready(Err(err)) => return Err(err.into()),
                Poll::Ready(Ok(())) => {}
            }
            match self.stream.try_write(self.session.transmit()) {
                Ok(n) => {
                    self.session.advance_transmit(n);
                    self.write_blocked_since = None;
                    progress = true;
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => continue,
                Err(err) => return Err(err.into()),
            }
        }
        if progress {
            self.session.mark_sent(self.now.into_std());
        }
        Ok(progress)
    }

    /// When the frame being received must be complete. `frame_timeout` bounds the peer's time
    /// to send a frame, so while the session does not read because of the relay itself (its
    /// pipeline is full, a barrier waits for it, the journal is congested) the clock stands
    /// still: a peer whose requests wait for the disk is not a trickler. Not reading because
    /// the peer does not read its answers is the peer's doing, bounded by `write_timeout`.
    fn frame_deadline(&mut self) -> Option<Instant> {
        let relay_busy = self.held.is_some()
            || self.congestion.is_some()
            || self.pipeline.len() >= self.shared.handler.max_pipelined();
        match (relay_busy, self.frame_clock_paused) {
            (true, None) => {
                self.frame_clock_paused = Some(self.now);
                None
            }
            (true, Some(_)) => None,
            (false, paused) => {
                if let Some(since) = paused {
                    self.frame_clock_paused = None;
                    self.inbound
                        .shift_frame_clock(self.now.saturating_duration_since(since));
                }
                self.inbound
                    .frame_deadline(self.shared.config.frame_timeout)
            }
        }
    }

    /// Session timers, the write timeout, the frame timeout and the budget retry.
    fn poll_timers(&mut self, cx: &mut Context<'_>) -> Result<bool, NetError> {
        let config = &self.shared.config;
        let write_deadline = self
            .write_blocked_since
            .map(|since| since + config.write_timeout);
        let frame_deadline = self.frame_deadline();
        let deadline = [
            Some(Instant::from_std(self.session.next_deadline())),
            write_deadline,
            frame_deadline,
            self.budget_retry_at,
        ]
        .into_iter()
        .flatten()
        .min()
        .expect("the session always has a deadline");
        if self.timer_at != Some(deadline) {
            self.timer.as_mut().reset(deadline);
            self.timer_at = Some(deadline);
        }
        if self.timer.as_mut().poll(cx).is_pending() {
            return Ok(false);
        }
        self.timer_at = None;
        let now = Instant::now();
        if write_deadline.is_some_and(|at| now >= at) {
            return Err(NetError::WriteTimeout(config.write_timeout));
        }
        if frame_deadline.is_some_and(|at| now >= at) {
            return Err(NetError::FrameTimeout(config.frame_timeout));
        }
        if self.budget_retry_at.is_some_and(|at| now >= at) {
            self.budget_retry_at = None;
        }
        self.session.on_timeout(now.into_std())?;
        Ok(true)
    }

    fn count_in(&mut self) {
        self.traffic.frames_in += 1;
    }

    /// Adds this connection's traffic since the last report to the relay-wide counters.
    fn report_traffic(&mut self) {
        let (now, before, m) = (self.traffic, self.reported, &self.shared.metrics);
        if now.frames_in != before.frames_in {
            m.frames_in.increment(now.frames_in - before.frames_in);
        }
        if now.bytes_in != before.bytes_in {
            m.bytes_in.increment(now.bytes_in - before.bytes_in);
        }
        if now.frames_out != before.frames_out {
            m.frames_out.increment(now.frames_out - before.frames_out);
        }
        if now.bytes_out != before.bytes_out {
            m.bytes_out.increment(now.bytes_out - before.bytes_out);
        }
        self.reported = now;
    }

    /// Writes everything sealed (used once the session has ended).
    async fn flush_all(&mut self) -> std::io::Result<()> {
        while self.session.transmit_len() > 0 {
            let n = self.stream.write(self.session.transmit()).await?;
            if n == 0 {
                return Err(ErrorKind::WriteZero.into());
            }
            self.session.advance_transmit(n);
        }
        Ok(())
    }
}

/// Half-closes, then reads and discards what the peer still sends for a short, bounded
/// while: closing a socket with unread input makes the kernel send a reset, which can destroy
/// the final `Error` frame before the peer reads it.
async fn linger_close(stream: &mut TcpStream) {
    let deadline = Instant::now() + LINGER;
    if timeout_at(deadline, stream.shutdown()).await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let mut drained = 0usize;
    let _ = timeout_at(deadline, async {
        while drained < LINGER_BYTES {
            match tokio::io::AsyncReadExt::read(stream, &mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}
