//! One connection's IO: the responder handshake (the whole `Init` under its own deadline before
//! any slot is taken, then a fair turn for the crypto), then the session, whose logic is the
//! [`Connection`] state machine. This task only moves bytes between the socket and the state
//! machine, sleeps until the deadline it names, and passes on the shutdown signal.
//!
//! The session is one hand-written poll function that drives one round of the state machine
//! per pass, with the clock read once per round, so that one wake-up does all the work that is
//! ready (answers, pushes, every request readable) and then writes everything sealed at once.
//! When the session ends, what was sealed still goes out (bounded by the write timeout), and a
//! short linger keeps the last frame from being reset away, unless the peer's end of the stream
//! has been read already (nothing can arrive any more to cause a reset).

use std::future::Future;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout_at, Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tracing::info;

use super::admission::Ticket;
use super::shared::Shared;
use super::NetError;
use crate::app::Handler;
use crate::connection::{
    Connection, End, Inbound, Polled, Start, Traffic, BUDGET_RETRY, MAX_HANDSHAKE_FRAME_LEN,
};
use botd_protocol::handshake::{respond, Response};
use botd_protocol::session::Session;

/// How long, and how much, a closing connection still reads so its last frame is not reset away.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 1 << 20;

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
    // Whether the peer's end of the stream has been read: then nothing more can arrive to
    // reset the last frame away, and closing at once sends the same FIN the linger would.
    let peer_closed = match handshake {
        Ok(Some(handshake)) => {
            shared.metrics.handshakes_ok.increment(1);
            shared
                .metrics
                .handshake_seconds
                .record(started.elapsed().as_secs_f64());
            let remote = handshake.established.remote;
            let mut traffic = Traffic::default();
            // Boxed, like the handshake: the task itself stays small for the whole session.
            let result = Box::pin(session(
                &shared,
                &mut stream,
                inbound,
                handshake,
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
            matches!(result, Ok(End::PeerClosed))
        }
        Ok(None) => false,
        Err(err) => {
            metrics::counter!(crate::metrics::HANDSHAKES, "outcome" => "failed", "reason" => err.reason())
                .increment(1);
            metrics::counter!(crate::metrics::SESSIONS_CLOSED, "reason" => err.reason())
                .increment(1);
            info!(%peer, reason = err.reason(), error = %err, "handshake failed");
            matches!(err, NetError::PeerClosed)
        }
    };
    if !peer_closed {
        // Boxed: its read buffer exists only while a connection closes, not in every task.
        Box::pin(linger_close(&mut stream)).await;
    }
}

/// Reads the whole `Init` (before any slot is taken), waits its turn for crypto and answers
/// it; any failure closes without a reply. The `Ack` is not written here: it leaves with
/// `Welcome`, in the session's first write.
async fn handshake<H: Handler>(
    shared: &Shared<H>,
    stream: &mut TcpStream,
    inbound: &mut Inbound,
    peer: SocketAddr,
    ticket: Ticket,
    accepted: Instant,
) -> Result<Response, NetError> {
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
    ticket.authenticated();
    Ok(response)
}

/// Reads one whole frame (the `Init`).
async fn read_frame(stream: &mut TcpStream, inbound: &mut Inbound) -> Result<BytesMut, NetError> {
    loop {
        if let Some(frame) = inbound.next_frame(Instant::now().into_std())? {
            return Ok(frame);
        }
        let Some(buf) = inbound.receive_buffer() else {
            tokio::time::sleep(BUDGET_RETRY).await;
            continue;
        };
        // Through `AsyncRead`, as the session reads: a read that leaves room in `buf` makes
        // tokio forget the socket's readiness, so the session's first read waits for the next
        // event (`try_read_buf` would keep it, and ask the kernel once more for nothing).
        if stream.read_buf(buf).await? == 0 {
            inbound.on_peer_closed()?;
            return Err(NetError::PeerClosed);
        }
    }
}

async fn session<H: Handler>(
    shared: &Shared<H>,
    stream: &mut TcpStream,
    inbound: Inbound,
    handshake: Response,
    peer: SocketAddr,
    traffic: &mut Traffic,
) -> Result<End, NetError> {
    let mut live = Live::start(shared, stream, inbound, handshake, peer)?;
    let result = std::future::poll_fn(|cx| live.poll_session(cx)).await;
    *traffic = live.conn.traffic();
    let (stream, mut output) = live.close();
    // Whatever was sealed before the end (an Error frame, usually) still goes out, bounded by
    // the write timeout whatever the peer does.
    let flush_deadline = Instant::now() + shared.config.write_timeout;
    let _ = timeout_at(flush_deadline, flush_all(stream, &mut output)).await;
    result
}

/// An established session: the state machine and what it needs from tokio.
struct Live<'a, H: Handler> {
    shared: &'a Shared<H>,
    stream: &'a mut TcpStream,
    conn: Connection<'a, H>,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    timer: Pin<Box<Sleep>>,
    timer_at: Option<Instant>,
    /// Traffic already added to the relay-wide counters.
    reported: Traffic,
}

impl<'a, H: Handler> Live<'a, H> {
    /// Starts the state machine (it queues the `Ack` and `Welcome` and connects the
    /// application). A plain function, so that nothing of this size stays in the connection
    /// task's state (an idle session's memory is mostly what this box holds).
    fn start(
        shared: &'a Shared<H>,
        stream: &'a mut TcpStream,
        inbound: Inbound,
        handshake: Response,
        peer: SocketAddr,
    ) -> Result<Box<Self>, NetError> {
        let start = Start {
            handshake,
            addr: peer,
            inbound,
            relay_key: *shared.identity.public(),
            server_time_ms: crate::clock::unix_millis(),
        };
        let conn = Connection::new(
            &shared.handler,
            &shared.config,
            start,
            Instant::now().into_std(),
        )?;
        Ok(Box::new(Live {
            shared,
            stream,
            conn,
            shutdown: Box::pin(shared.shutdown.clone().cancelled_owned()),
            timer: Box::pin(sleep_until(Instant::now())),
            timer_at: None,
            reported: Traffic::default(),
        }))
    }

    /// Ends the application's session and leaves the answers still pending to finish on
    /// their own (they may do work, e.g. announce a stored message, though nobody will read
    /// them); returns the socket and the session holding what is still to be written. A plain
    /// function with the session boxed, so the task's state never holds it inline: that state
    /// is allocated for the whole life of the connection.
    // Taken boxed: unboxing it in the async caller instead makes that caller's state larger.
    #[allow(clippy::boxed_local)]
    fn close(self: Box<Self>) -> (&'a mut TcpStream, Box<Session>) {
        let Live { stream, conn, .. } = *self;
        let closing = conn.disconnect();
        for pending in closing.pending {
            tokio::spawn(async move {
                pending.await;
            });
        }
        (stream, Box::new(closing.session))
    }

    fn poll_session(&mut self, cx: &mut Context<'_>) -> Poll<Result<End, NetError>> {
        let result = self.poll_work(cx);
        self.report_traffic();
        result
    }

    /// Rounds of the state machine until one makes no progress.
    fn poll_work(&mut self, cx: &mut Context<'_>) -> Poll<Result<End, NetError>> {
        loop {
            let now = Instant::now().into_std();
            if self.shutdown.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(self.conn.shutdown()?));
            }
            let mut progress = match self.conn.poll(cx, now)? {
                Polled::End(end) => return Poll::Ready(Ok(end)),
                Polled::Progress => true,
                Polled::Idle => false,
            };
            match self.poll_read(cx, now)? {
                Polled::End(end) => return Poll::Ready(Ok(end)),
                Polled::Progress => progress = true,
                Polled::Idle => {}
            }
            self.conn.end_input(now);
            progress |= self.poll_write(cx, now)?;
            progress |= self.poll_timer(cx)?;
            if !progress {
                // Nothing more to do until the peer or the application moves; buffers are
                // given back once the connection has stayed quiet for a while.
                self.conn.on_quiet();
                return Poll::Pending;
            }
        }
    }

    /// Reads while the connection takes input; each read is dispatched at once. A read that
    /// leaves room in the buffer drained the socket: tokio then forgets its readiness, so the
    /// next attempt waits for the next event instead of asking the kernel again.
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        now: std::time::Instant,
    ) -> Result<Polled, NetError> {
        let mut read = Polled::Idle;
        while let Some(buf) = self.conn.receive_buffer(now) {
            match tokio_util::io::poll_read_buf(Pin::new(&mut *self.stream), cx, buf) {
                Poll::Pending => break,
                Poll::Ready(Ok(0)) => return Ok(Polled::End(self.conn.on_peer_closed()?)),
                Poll::Ready(Ok(n)) => {
                    self.conn.on_received(n, now)?;
                    read = Polled::Progress;
                }
                Poll::Ready(Err(err)) => return Err(err.into()),
            }
        }
        Ok(read)
    }

    /// Writes what is sealed, as far as the socket takes it (a short write makes tokio forget
    /// the socket's readiness, so a full socket costs no further system call).
    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        now: std::time::Instant,
    ) -> Result<bool, NetError> {
        let mut progress = false;
        while let Some(out) = self.conn.poll_transmit() {
            match Pin::new(&mut *self.stream).poll_write(cx, out) {
                Poll::Pending => {
                    self.conn.on_transmit_blocked(now);
                    break;
                }
                Poll::Ready(Ok(0)) => return Err(std::io::Error::from(ErrorKind::WriteZero).into()),
                Poll::Ready(Ok(n)) => {
                    self.conn.advance_transmit(n, now);
                    progress = true;
                }
                Poll::Ready(Err(err)) => return Err(err.into()),
            }
        }
        Ok(progress)
    }

    /// Sleeps until the connection's next deadline, then lets it handle what is due.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Result<bool, NetError> {
        let Some(deadline) = self.conn.poll_timeout() else {
            return Ok(false);
        };
        let deadline = Instant::from_std(deadline);
        // Re-armed only for an earlier deadline: most deadlines move later with every frame
        // (the ping and idle timers), and resetting the runtime's timer on every wake-up costs
        // more than the early wake-up the armed one may bring, which re-arms it then.
        if self.timer_at.is_none_or(|at| deadline < at) {
            self.timer.as_mut().reset(deadline);
            self.timer_at = Some(deadline);
        }
        if self.timer.as_mut().poll(cx).is_pending() {
            return Ok(false);
        }
        self.timer_at = None;
        self.conn.handle_timeout(Instant::now().into_std())?;
        Ok(true)
    }

    /// Adds this connection's traffic since the last report to the relay-wide counters (once
    /// per wake-up, not per frame, so the shared counters' cache lines move at that rate).
    fn report_traffic(&mut self) {
        let (now, before, m) = (self.conn.traffic(), self.reported, &self.shared.metrics);
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
}

/// Writes everything sealed (once the session has ended).
async fn flush_all(stream: &mut TcpStream, session: &mut Session) -> std::io::Result<()> {
    while session.transmit_len() > 0 {
        let n = stream.write(session.transmit()).await?;
        if n == 0 {
            return Err(ErrorKind::WriteZero.into());
        }
        session.advance_transmit(n);
    }
    Ok(())
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
