//! One established connection as a state machine without IO: bytes, `now` and wake-ups in;
//! bytes, deadlines and ends out. [`crate::net`] moves the bytes between it and a socket.
//!
//! What it owns, per connection:
//! - the read buffer ([`Inbound`]), charged to the relay-wide [`InboundBudget`] for a partly
//!   received frame;
//! - the request pipeline: each request is handed to the [`Handler`] as soon as it is read
//!   (so a session's requests are applied in order while earlier ones wait for the disk), and
//!   the answers leave strictly in request order, at most [`Handler::max_pipelined`] pending;
//! - barriers ([`Handler::is_barrier`]): such a request waits until the pipeline is empty,
//!   and pushes wait until its answer is sealed, so its pushes follow its answer;
//! - congestion ([`Handler::congestion`]): no request is read while the application is behind;
//! - the push queue, paused past [`OUTBOX_HIGH`] of unwritten output, and the `SLOW_CONSUMER`
//!   close when it overflows;
//! - group flush: [`Handler::flush`] once per round, after everything readable is dispatched;
//! - the deadlines ([`timers`]): the session's ping, pong and idle deadline, the write timeout,
//!   the frame timeout (whose clock stands still while the relay itself keeps the peer from
//!   sending) and the inbound-budget retry.
//!
//! # Driving it
//!
//! One round of work per wake-up, with `now` read once for the round:
//! 1. [`Connection::poll`]: answers at the head of the pipeline, queued pushes, the end of
//!    congestion, and requests already buffered; the futures register `cx` for a wake-up;
//! 2. input, while [`Connection::receive_buffer`] offers room: append what the socket has, then
//!    [`Connection::on_received`] (the frames are dispatched at once), or
//!    [`Connection::on_peer_closed`] at end of stream;
//! 3. [`Connection::end_input`]: the round's input is over (the group flush);
//! 4. output: write [`Connection::poll_transmit`], then [`Connection::advance_transmit`], or
//!    [`Connection::on_transmit_blocked`] when the socket takes nothing;
//! 5. sleep until [`Connection::poll_timeout`], then [`Connection::handle_timeout`].
//!
//! Another round follows while any step made progress; a round that made none ends with
//! [`Connection::on_quiet`]: a connection that then stays quiet for [`RELEASE_AFTER`] gives
//! back its buffers and cipher state, a busy one keeps them from one wake-up to the next. After an [`End`] or an error, [`Connection::disconnect`]
//! ends the application's session and hands back what is still to be written.

mod inbound;
pub mod timers;

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use botd_protocol::codec::CodecError;
use botd_protocol::handshake::Response;
use botd_protocol::keys::PublicKeyBytes;
use botd_protocol::proto::{ErrorCode, Frame, Welcome, PROTOCOL_NAME};
use botd_protocol::session::{Received, Session, SessionError, Timers};
use bytes::BytesMut;

use crate::app::{Answer, Handler, Outgoing, PendingAnswer, Push, PushReceiver};
use crate::config::Config;
pub use inbound::{Inbound, InboundBudget};
use timers::{Timer, TimerTable};

/// Largest frame accepted before the handshake completes. An `Init` with every field at its
/// maximum is under 300 bytes; a small bound keeps unauthenticated peers from making the relay
/// buffer `max_frame_len` bytes.
pub const MAX_HANDSHAKE_FRAME_LEN: u32 = 1024;
/// Past this much sealed and unwritten output, the connection takes no new requests or pushes
/// until the peer reads.
pub const OUTBOX_HIGH: usize = 256 * 1024;
/// While the inbound budget is exhausted, how often a waiting connection tries again.
pub const BUDGET_RETRY: Duration = Duration::from_millis(5);
/// A connection without traffic for this long gives back its read and write buffers, its
/// push queue's memory and its keyed ciphers; until then they serve the next frames without
/// an allocation or a key schedule each time.
pub const RELEASE_AFTER: Duration = Duration::from_millis(200);

/// How a connection ended when nothing went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The peer closed its side between frames.
    PeerClosed,
    /// The caller asked ([`Connection::shutdown`]); the peer is told `SHUTTING_DOWN`.
    Shutdown,
    /// The push queue overflowed; the peer is told `SLOW_CONSUMER`.
    SlowConsumer,
}

impl End {
    /// Short stable label for metrics and logs.
    pub fn reason(self) -> &'static str {
        match self {
            End::PeerClosed => "peer_closed",
            End::Shutdown => "shutdown",
            End::SlowConsumer => "slow_consumer",
        }
    }
}

/// Why a connection failed. Whatever was sealed before (an `Error` frame, often) should still
/// be written.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("framing: {0}")]
    Codec(#[from] CodecError),
    #[error("session: {0}")]
    Session(#[from] SessionError),
    #[error("write made no progress within {0:?}")]
    WriteTimeout(Duration),
    #[error("a frame was not completed within {0:?}")]
    FrameTimeout(Duration),
}

impl ConnectionError {
    /// Short stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectionError::Codec(err) => err.reason(),
            ConnectionError::Session(err) => err.reason(),
            ConnectionError::WriteTimeout(_) => "write_timeout",
            ConnectionError::FrameTimeout(_) => "frame_timeout",
        }
    }
}

/// What [`Connection::poll`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polled {
    /// Something moved: an answer or a push sealed, congestion over, a request dispatched.
    Progress,
    /// Nothing until a future wakes the context, or input arrives.
    Idle,
    End(End),
}

/// Traffic of one connection since it was established.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    pub frames_in: u64,
    pub frames_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// What a connection starts from once its handshake completed.
pub struct Start {
    /// The handshake's outcome: the `Ack` still to be written (it leaves with `Welcome`, in
    /// the connection's first write) and the session keys.
    pub handshake: Response,
    /// The peer's address, for the application.
    pub addr: SocketAddr,
    /// What the handshake left unread, and the connection's claim on the budget.
    pub inbound: Inbound,
    /// Announced in `Welcome`.
    pub relay_key: PublicKeyBytes,
    /// The relay's wall clock for `Welcome`, in Unix milliseconds (this layer reads no clock).
    pub server_time_ms: u64,
}

/// Whether the frame timeout's clock runs. It stands still while the relay itself does not
/// read (its pipeline is full, a barrier waits, the application is congested): a peer whose
/// requests wait for the disk is not a trickler. Not reading because the peer does not read
/// its answers is the peer's doing, bounded by `write_timeout`.
#[derive(Debug, Clone, Copy)]
enum FrameClock {
    Running,
    Paused { since: Instant },
}

/// An established connection; see the module documentation for how to drive it.
pub struct Connection<'a, H: Handler> {
    handler: &'a H,
    config: &'a Config,
    inbound: Inbound,
    session: Session,
    app: H::Session,
    pushes: PushReceiver,
    /// False once the application dropped every push handle.
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
    timers: TimerTable,
    frame_clock: FrameClock,
    traffic: Traffic,
    /// The last round that moved a frame, and the frame count it saw then.
    last_traffic: (Instant, u64),
}

/// What is left of a connection once the application's session ended.
pub struct Closing {
    /// Holds what was sealed and not yet written ([`Session::transmit`]).
    pub session: Session,
    /// Answers still pending: they should run to completion, since they may do work (e.g.
    /// announce a stored message) though nobody will read them.
    pub pending: VecDeque<PendingAnswer>,
}

impl<'a, H: Handler> Connection<'a, H> {
    /// Seals `Welcome` and connects the application.
    pub fn new(
        handler: &'a H,
        config: &'a Config,
        start: Start,
        now: Instant,
    ) -> Result<Self, ConnectionError> {
        let Start {
            handshake:
                Response {
                    ack_body,
                    established,
                },
            addr,
            mut inbound,
            relay_key,
            server_time_ms,
        } = start;
        inbound.set_max_frame_len(config.max_frame_len);
        let timers = Timers {
            ping_min_interval: config.ping_min_interval,
            probe_after: Some(config.ping_interval),
            keepalive_after: None,
            pong_timeout: config.pong_timeout,
            idle_timeout: Some(config.idle_timeout),
        };
        // Peers accept frames up to the relay's own announced limit (docs/PROTOCOL.md).
        let mut session = Session::responder(established.keys, timers, config.max_frame_len, now);
        session.send_ack_and_welcome(
            &ack_body,
            Welcome {
                protocol: PROTOCOL_NAME.to_owned(),
                server_version: env!("CARGO_PKG_VERSION").to_owned(),
                max_frame_len: config.max_frame_len,
                max_payload_len: config.max_payload_len,
                ping_interval_ms: config.ping_interval.as_millis() as u64,
                server_time_ms,
                idle_timeout_ms: config.idle_timeout.as_millis() as u64,
                relay_pubkey: bytes::Bytes::copy_from_slice(relay_key.as_bytes()),
                ping_min_interval_ms: config.ping_min_interval.as_millis() as u64,
            },
        )?;
        let (push, pushes) = crate::app::push_channel(config.max_outbound_bytes);
        let app = handler.connect(established.remote, addr, push);
        Ok(Self {
            handler,
            config,
            inbound,
            session,
            app,
            pushes,
            pushes_open: true,
            pipeline: VecDeque::new(),
            held: None,
            barrier_pending: false,
            dispatched: false,
            congestion: None,
            timers: TimerTable::default(),
            frame_clock: FrameClock::Running,
            traffic: Traffic::default(),
            last_traffic: (now, 0),
        })
    }

    /// The application's side of a round: seals the answers at the head of the pipeline that
    /// are ready and the queued pushes the output has room for, notices the end of congestion,
    /// and dispatches requests already buffered. Futures that are not ready register `cx`.
    pub fn poll(&mut self, cx: &mut Context<'_>, now: Instant) -> Result<Polled, ConnectionError> {
        let mut progress = self.poll_answers(cx)?;
        if let Some(end) = self.poll_pushes(cx)? {
            return Ok(Polled::End(end));
        }
        if let Some(congestion) = &mut self.congestion {
            if congestion.as_mut().poll(cx).is_ready() {
                self.congestion = None;
                progress = true;
            }
        }
        progress |= self.dispatch_buffered(now)?;
        Ok(if progress {
            Polled::Progress
        } else {
            Polled::Idle
        })
    }

    /// Where to append received bytes, with room reserved for what is expected; `None` while
    /// the connection takes no input: a barrier waits, the pipeline or the output is full, the
    /// application is congested, or the inbound budget cannot cover the frame being received
    /// (then [`Timer::BudgetRetry`] says when to try again). Only appending is allowed; report
    /// the count with [`Connection::on_received`].
    pub fn receive_buffer(&mut self, now: Instant) -> Option<&mut BytesMut> {
        if self.held.is_some()
            || !self.can_dispatch()
            || self.timers.get(Timer::BudgetRetry).is_some()
        {
            return None;
        }
        let buf = self.inbound.receive_buffer();
        if buf.is_none() {
            self.timers.set(Timer::BudgetRetry, now + BUDGET_RETRY);
        }
        buf
    }

    /// `n` bytes (more than none) were appended to [`Connection::receive_buffer`]: the frames
    /// now complete are dispatched while the connection takes them.
    pub fn on_received(&mut self, n: usize, now: Instant) -> Result<(), ConnectionError> {
        self.traffic.bytes_in += n as u64;
        self.inbound.on_read(n);
        self.dispatch_buffered(now)?;
        Ok(())
    }

    /// The peer closed its side: the end of the connection, an error if it was in a frame.
    pub fn on_peer_closed(&self) -> Result<End, ConnectionError> {
        self.inbound.on_peer_closed()?;
        Ok(End::PeerClosed)
    }

    /// The round's input is over (the transport had nothing more, or the connection took no
    /// more). The application writes what was dispatched since the last round in one go
    /// ([`Handler::flush`]), an emptied read buffer is given back, the application is asked
    /// whether it is behind, and the frame timeout follows what the relay now waits for.
    pub fn end_input(&mut self, now: Instant) {
        self.inbound.compact();
        let frames = self.traffic.frames_in + self.traffic.frames_out;
        if frames != self.last_traffic.1 {
            self.last_traffic = (now, frames);
        }
        if self.congestion.is_none() {
            self.congestion = self.handler.congestion();
        }
        if std::mem::take(&mut self.dispatched) {
            self.handler.flush();
        }
        self.update_frame_timer(now);
    }

    /// The sealed output waiting to be written, if any: whole wire frames, back to back.
    pub fn poll_transmit(&self) -> Option<&[u8]> {
        let out = self.session.transmit();
        (!out.is_empty()).then_some(out)
    }

    /// `n` bytes of [`Connection::poll_transmit`] were written at `now`.
    pub fn advance_transmit(&mut self, n: usize, now: Instant) {
        self.session.advance_transmit(n);
        self.timers.stop(Timer::Write);
        self.session.mark_sent(now);
    }

    /// Output is waiting and the transport takes none of it: the write timeout runs from the
    /// first such moment until a write makes progress.
    pub fn on_transmit_blocked(&mut self, now: Instant) {
        self.timers
            .set_if_stopped(Timer::Write, now + self.config.write_timeout);
    }

    /// The earliest deadline: call [`Connection::handle_timeout`] once it has passed.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        self.timers
            .set(Timer::Session, self.session.next_deadline());
        self.timers.next_timeout()
    }

    /// Runs what is due at `now`: a write or frame timeout ends the connection; a budget retry
    /// lets input be read again; the session pings a silent peer or closes a dead one (the
    /// `Error` it seals for that should still be written).
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), ConnectionError> {
        if self.timers.is_expired(Timer::Write, now) {
            return Err(ConnectionError::WriteTimeout(self.config.write_timeout));
        }
        if self.timers.is_expired(Timer::Frame, now) {
            return Err(ConnectionError::FrameTimeout(self.config.frame_timeout));
        }
        self.timers.take_expired(Timer::BudgetRetry, now);
        if self.timers.take_expired(Timer::Release, now) {
            let quiet_until = self.last_traffic.0 + RELEASE_AFTER;
            if now >= quiet_until {
                self.release_idle_memory();
            } else {
                self.timers.set(Timer::Release, quiet_until);
            }
        }
        self.session.on_timeout(now)?;
        Ok(())
    }

    /// The caller ends the connection (the relay shuts down): the peer is told so.
    pub fn shutdown(&mut self) -> Result<End, ConnectionError> {
        self.session.send(&Frame::error(
            0,
            ErrorCode::ShuttingDown,
            "relay is shutting down",
        ))?;
        Ok(End::Shutdown)
    }

    /// The round made no progress: the connection waits for the peer or the application.
    /// Unless it moves again within [`RELEASE_AFTER`] of its last frame, its memory is given
    /// back then ([`Connection::release_idle_memory`]).
    pub fn on_quiet(&mut self) {
        self.timers
            .set_if_stopped(Timer::Release, self.last_traffic.0 + RELEASE_AFTER);
    }

    /// Gives back the buffers a quiet connection does not need: an idle session keeps none.
    pub fn release_idle_memory(&mut self) {
        self.inbound.release();
        self.session.release_idle_memory();
        self.pushes.release_idle_memory();
    }

    pub fn traffic(&self) -> Traffic {
        self.traffic
    }

    /// Ends the application's session ([`Handler::disconnect`]) and hands back what is still
    /// to be written and the answers still pending. The read buffer's budget is given back
    /// and pushes to this session are refused from now on.
    pub fn disconnect(self) -> Closing {
        let Self {
            handler,
            app,
            session,
            pipeline,
            ..
        } = self;
        handler.disconnect(app);
        Closing {
            session,
            pending: pipeline,
        }
    }

    /// Seals answers at the head of the pipeline that are ready, in order.
    fn poll_answers(&mut self, cx: &mut Context<'_>) -> Result<bool, ConnectionError> {
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
    fn poll_pushes(&mut self, cx: &mut Context<'_>) -> Result<Option<End>, ConnectionError> {
        while self.pushes_open && !self.barrier_pending && self.session.transmit_len() < OUTBOX_HIGH
        {
            match self.pushes.poll_recv(cx) {
                Poll::Pending => break,
                Poll::Ready(Some(Push::Out(out))) => {
                    self.seal(&out)?;
                    if self.pushes.take_resume() {
                        self.handler.resume(&mut self.app);
                    }
                }
                Poll::Ready(Some(Push::SlowConsumer)) => {
                    self.session.send(&Frame::error(
                        0,
                        ErrorCode::SlowConsumer,
                        "outbound queue overflowed",
                    ))?;
                    return Ok(Some(End::SlowConsumer));
                }
                // The application dropped every handle: nothing more will be pushed.
                Poll::Ready(None) => self.pushes_open = false,
            }
        }
        Ok(None)
    }

    /// True while the connection takes new requests.
    fn can_dispatch(&self) -> bool {
        self.pipeline.len() < self.handler.max_pipelined()
            && self.session.transmit_len() < OUTBOX_HIGH
            && self.congestion.is_none()
    }

    /// Dispatches buffered frames while the connection takes them; true if any was.
    fn dispatch_buffered(&mut self, now: Instant) -> Result<bool, ConnectionError> {
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
            let Some(body) = self.inbound.next_frame(now)? else {
                break;
            };
            self.traffic.frames_in += 1;
            match self.session.on_frame(body, now)? {
                Received::Frame(frame) => {
                    let barrier = self.handler.is_barrier(&frame);
                    if barrier && !self.pipeline.is_empty() {
                        self.held = Some(frame);
                    } else {
                        self.dispatch(frame, barrier)?;
                    }
                }
                Received::Reply(reply) => self.answer(Outgoing::Frame(reply))?,
                Received::Nothing => {}
            }
            progress = true;
        }
        Ok(progress)
    }

    /// Hands a frame to the application and queues its answer in order.
    fn dispatch(&mut self, frame: Frame, barrier: bool) -> Result<(), ConnectionError> {
        match self.handler.request(&mut self.app, frame) {
            Answer::None => Ok(()),
            Answer::Ready(out) => self.answer(out),
            Answer::Pending(mut pending) => {
                self.dispatched = true;
                // Polled once now, so what it does before its first wait happens in arrival
                // order.
                let mut cx = Context::from_waker(std::task::Waker::noop());
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
    fn answer(&mut self, out: Outgoing) -> Result<(), ConnectionError> {
        if self.pipeline.is_empty() {
            self.seal(&out)
        } else {
            self.pipeline.push_back(Box::pin(std::future::ready(out)));
            Ok(())
        }
    }

    fn seal(&mut self, out: &Outgoing) -> Result<(), ConnectionError> {
        let before = self.session.transmit_len();
        match out.seal(&mut self.session) {
            Ok(()) => {}
            // Limits checked at start make this impossible; if it happens anyway the request
            // fails, the session does not.
            Err(SessionError::FrameTooLarge { len, max }) => {
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

    /// Arms the frame timeout for the frame being received, with the clock stopped while the
    /// relay is what keeps the peer from sending (see [`FrameClock`]).
    fn update_frame_timer(&mut self, now: Instant) {
        let relay_busy = self.held.is_some()
            || self.congestion.is_some()
            || self.pipeline.len() >= self.handler.max_pipelined();
        let deadline = match (relay_busy, self.frame_clock) {
            (true, FrameClock::Running) => {
                self.frame_clock = FrameClock::Paused { since: now };
                None
            }
            (true, FrameClock::Paused { .. }) => None,
            (false, FrameClock::Paused { since }) => {
                self.frame_clock = FrameClock::Running;
                self.inbound
                    .shift_frame_clock(now.saturating_duration_since(since));
                self.inbound.frame_deadline(self.config.frame_timeout)
            }
            (false, FrameClock::Running) => self.inbound.frame_deadline(self.config.frame_timeout),
        };
        self.timers.set_or_stop(Timer::Frame, deadline);
    }
}

#[cfg(test)]
mod tests;
