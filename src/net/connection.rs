//! One connection: the responder handshake under its deadline and slot, then the session loop
//! that feeds the core with frames, pushes and timer ticks, and writes what it seals.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::codec::FramedRead;
use tracing::info;

use super::push::{self, Push};
use super::server::Shared;
use super::{Handler, NetError};
use crate::core::codec::{encode_frame, FrameCodec, LEN_PREFIX};
use crate::core::handshake::{respond, Established};
use crate::core::session::{Received, Session, Timers};
use crate::metrics as m;
use crate::proto::{ErrorCode, Frame, Welcome, PROTOCOL_NAME};

/// Largest frame accepted before the handshake completes. An `Init` with every field at its
/// maximum is under 300 bytes; a small bound keeps unauthenticated peers from making the relay
/// buffer `max_frame_len` bytes per handshake slot.
pub const MAX_HANDSHAKE_FRAME_LEN: u32 = 1024;

const WRITE_BUFFER: usize = 64 * 1024;
/// How long, and how much, a closing connection still reads so its last frame is not reset away.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 1 << 20;

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

#[derive(Debug, Default)]
struct Traffic {
    frames_in: u64,
    frames_out: u64,
    bytes_in: u64,
    bytes_out: u64,
}

struct Conn {
    peer: SocketAddr,
    reader: FramedRead<OwnedReadHalf, FrameCodec>,
    writer: BufWriter<OwnedWriteHalf>,
    traffic: Traffic,
    write_timeout: Duration,
}

pub(super) async fn serve<H: Handler>(shared: Arc<Shared<H>>, stream: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    metrics::gauge!(m::CONNECTIONS_OPEN).increment(1.0);
    let (read, write) = stream.into_split();
    let mut conn = Conn {
        peer,
        reader: FramedRead::new(read, FrameCodec::new(MAX_HANDSHAKE_FRAME_LEN)),
        writer: BufWriter::with_capacity(WRITE_BUFFER, write),
        traffic: Traffic::default(),
        write_timeout: shared.config.write_timeout,
    };

    let handshake = tokio::select! {
        _ = shared.shutdown.cancelled() => Ok(None),
        outcome = timeout(shared.config.handshake_timeout, handshake(&shared, &mut conn)) => {
            outcome.unwrap_or(Err(NetError::HandshakeTimeout(shared.config.handshake_timeout))).map(Some)
        }
    };
    let outcome = match handshake {
        Ok(Some(established)) => {
            let elapsed = started.elapsed();
            metrics::counter!(m::HANDSHAKES, "outcome" => "ok", "reason" => "ok").increment(1);
            metrics::histogram!(m::HANDSHAKE_SECONDS).record(elapsed.as_secs_f64());
            let remote = established.remote;
            let result = session(&shared, &mut conn, established).await;
            Some((remote, result))
        }
        Ok(None) => None,
        Err(err) => {
            metrics::counter!(m::HANDSHAKES, "outcome" => "failed", "reason" => err.reason())
                .increment(1);
            metrics::counter!(m::SESSIONS_CLOSED, "reason" => err.reason()).increment(1);
            info!(%peer, reason = err.reason(), error = %err, "handshake failed");
            None
        }
    };
    if let Some((remote, result)) = outcome {
        let reason = match &result {
            Ok(closed) => closed.reason(),
            Err(err) => err.reason(),
        };
        metrics::counter!(m::SESSIONS_CLOSED, "reason" => reason).increment(1);
        let t = &conn.traffic;
        match &result {
            Ok(_) => {
                info!(%peer, identity = %remote, reason, frames_in = t.frames_in, frames_out = t.frames_out,
                bytes_in = t.bytes_in, bytes_out = t.bytes_out, duration_ms = started.elapsed().as_millis() as u64,
                "session closed")
            }
            Err(err) => {
                info!(%peer, identity = %remote, reason, error = %err, frames_in = t.frames_in,
                frames_out = t.frames_out, bytes_in = t.bytes_in, bytes_out = t.bytes_out,
                duration_ms = started.elapsed().as_millis() as u64, "session closed")
            }
        }
    }
    conn.close().await;
    metrics::gauge!(m::CONNECTIONS_OPEN).decrement(1.0);
}

/// Reads the `Init`, answers it and returns the keys; any failure closes without a reply.
async fn handshake<H: Handler>(
    shared: &Shared<H>,
    conn: &mut Conn,
) -> Result<Established, NetError> {
    let _slot = shared
        .handshake_slots
        .acquire()
        .await
        .expect("the handshake semaphore is never closed");
    let init = conn.read_frame().await?;
    let response = respond(&shared.identity, &init, |key| {
        shared.replay.lock().insert(key)
    })?;
    conn.write_all(&encode_frame(&response.ack_body)).await?;
    conn.flush().await?;
    Ok(response.established)
}

async fn session<H: Handler>(
    shared: &Shared<H>,
    conn: &mut Conn,
    established: Established,
) -> Result<SessionEnd, NetError> {
    let config = &shared.config;
    conn.reader
        .decoder_mut()
        .set_max_frame_len(config.max_frame_len);
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
        Instant::now(),
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
    let (push, mut pushes) = push::channel(config.max_outbound_bytes);
    let mut app = shared.handler.connect(established.remote, push);
    let result = session_loop(shared, conn, &mut session, &mut app, &mut pushes).await;
    shared.handler.disconnect(app);
    // Whatever was queued before the end (an Error frame, usually) still goes out, best effort.
    let _ = conn.flush_session(&mut session).await;
    result
}

async fn session_loop<H: Handler>(
    shared: &Shared<H>,
    conn: &mut Conn,
    session: &mut Session,
    app: &mut H::Session,
    pushes: &mut push::PushReceiver,
) -> Result<SessionEnd, NetError> {
    let mut pushes_open = true;
    loop {
        conn.flush_session(session).await?;
        tokio::select! {
            _ = shared.shutdown.cancelled() => {
                session.send(&Frame::error(0, ErrorCode::ShuttingDown, "relay is shutting down"))?;
                return Ok(SessionEnd::Shutdown);
            }
            frame = conn.reader.next() => {
                let body = match frame {
                    None => return Ok(SessionEnd::PeerClosed),
                    Some(result) => result?,
                };
                conn.count_in(body.len());
                match session.on_frame(body, Instant::now())? {
                    Received::Frame(frame) => {
                        for reply in shared.handler.request(app, frame).await {
                            session.send(&reply)?;
                        }
                    }
                    Received::Reply(reply) => session.send(&reply)?,
                    Received::Nothing => {}
                }
            }
            push = pushes.recv(), if pushes_open => match push {
                Some(Push::Frame(frame)) => {
                    session.send(&frame)?;
                    if pushes.take_resume() {
                        shared.handler.resume(app);
                    }
                }
                Some(Push::SlowConsumer) => {
                    session.send(&Frame::error(0, ErrorCode::SlowConsumer, "outbound queue overflowed"))?;
                    return Ok(SessionEnd::SlowConsumer);
                }
                // The application dropped every handle: nothing more will be pushed.
                None => pushes_open = false,
            },
            _ = sleep_until(session.next_deadline()) => session.on_timeout(Instant::now())?,
        }
    }
}

impl Conn {
    async fn read_frame(&mut self) -> Result<bytes::BytesMut, NetError> {
        let body = self.reader.next().await.ok_or(NetError::PeerClosed)??;
        self.count_in(body.len());
        Ok(body)
    }

    /// Accounts one received frame with a body of `body_len` bytes.
    fn count_in(&mut self, body_len: usize) {
        let wire_len = (LEN_PREFIX + body_len) as u64;
        self.traffic.frames_in += 1;
        self.traffic.bytes_in += wire_len;
        metrics::counter!(m::FRAMES_IN).increment(1);
        metrics::counter!(m::BYTES_IN).increment(wire_len);
    }

    async fn write_all(&mut self, wire: &[u8]) -> Result<(), NetError> {
        timeout(self.write_timeout, self.writer.write_all(wire))
            .await
            .map_err(|_| NetError::WriteTimeout(self.write_timeout))??;
        self.traffic.frames_out += 1;
        self.traffic.bytes_out += wire.len() as u64;
        metrics::counter!(m::FRAMES_OUT).increment(1);
        metrics::counter!(m::BYTES_OUT).increment(wire.len() as u64);
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), NetError> {
        timeout(self.write_timeout, self.writer.flush())
            .await
            .map_err(|_| NetError::WriteTimeout(self.write_timeout))??;
        Ok(())
    }

    /// Half-closes, then reads and discards what the peer still sends for a short, bounded
    /// while: closing a socket with unread input makes the kernel send a reset, which can
    /// destroy the final `Error` frame before the peer reads it.
    async fn close(&mut self) {
        if self.writer.shutdown().await.is_err() {
            return;
        }
        let stream = self.reader.get_mut();
        let mut sink = [0u8; 4096];
        let mut drained = 0usize;
        let _ = timeout(LINGER, async {
            while drained < LINGER_BYTES {
                match tokio::io::AsyncReadExt::read(stream, &mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => drained += n,
                }
            }
        })
        .await;
    }

    /// Writes everything the session sealed, then flushes once.
    async fn flush_session(&mut self, session: &mut Session) -> Result<(), NetError> {
        if let Some(wire) = session.poll_transmit() {
            self.write_all(&wire).await?;
            self.flush().await?;
            session.mark_sent(Instant::now());
        }
        Ok(())
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}
