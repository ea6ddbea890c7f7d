//! A client for botd/1 relays, on tokio.
//!
//! [`Client::connect`] opens a TCP connection, runs the `Init` / `Ack` handshake, checks the
//! relay's `Welcome`, and then offers typed requests (register a device, publish and fetch
//! prekeys, send, subscribe, acknowledge, policy, contacts, tickets) matched to their answers
//! by frame id, a stream of pushes ([`Client::next_push`]), and ping. One background task owns
//! the socket and the session; the [`Client`] talks to it over bounded channels. Requests may
//! be issued concurrently from clones of a reference; answers come back in order.
//!
//! The protocol itself (keys, frames, the session without IO) is [`botd_protocol`], re-exported
//! here as [`protocol`]. Runnable programs are in `examples/` (connect, register, send, listen).
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use botd_client::protocol::keys::{KeyPair, PublicKeyBytes};
//! use botd_client::{Client, ClientOptions, OutgoingMessage};
//!
//! # async fn example(relay_key: PublicKeyBytes, bob: PublicKeyBytes) -> Result<(), botd_client::ClientError> {
//! let me = Arc::new(KeyPair::generate());
//! let client = Client::connect("127.0.0.1:9945".parse().unwrap(), me.clone(), relay_key,
//!     ClientOptions::default()).await?;
//! let sent = client
//!     .send_message(OutgoingMessage::new(bob, 1, 1, b"ciphertext for bob".to_vec()))
//!     .await?;
//! println!("stored as message {}", sent.message_id);
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::codec::FramedRead;

use botd_protocol::codec::{encode_frame, CodecError, FrameCodec};
use botd_protocol::handshake::{AwaitingAck, HandshakeError};
use botd_protocol::keys::{sha256, KeyPair, PublicKeyBytes};
use botd_protocol::message::message_digest;
use botd_protocol::proto::{self, Body, ErrorCode, Frame, Welcome};
use botd_protocol::session::{Received, Session, SessionError, Timers};
use bytes::Bytes;

pub use botd_protocol as protocol;

/// tokio's clock (which tests may pause) as the protocol core takes it.
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("framing: {0}")]
    Codec(#[from] CodecError),
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("session: {0}")]
    Session(#[from] SessionError),
    #[error("relay answered {}: {message}", code.as_str_name())]
    Remote {
        code: ErrorCode,
        message: String,
        retry_after_ms: u64,
    },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the connection is closed")]
    Closed,
    #[error("relay closed the connection during the handshake")]
    HandshakeRefused,
    #[error("unexpected answer: {0}")]
    UnexpectedResponse(&'static str),
    #[error("a ping was sent less than 30 s ago; BOTD forbids another")]
    PingTooSoon,
}

impl ClientError {
    /// The relay's `Error` answer as a client error.
    pub fn remote(error: proto::Error) -> Self {
        ClientError::Remote {
            code: error.code(),
            message: error.message,
            retry_after_ms: error.retry_after_ms,
        }
    }

    /// The relay's error code, if this is an answer from the relay.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Remote { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Knobs of the client side.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Time for TCP connect plus handshake plus `Welcome`.
    pub connect_timeout: Duration,
    /// Time a request may wait for its answer.
    pub request_timeout: Duration,
    /// Largest frame accepted from the relay before `Welcome` tells its own limit.
    pub max_frame_len: u32,
    /// Highest limit a relay's `Welcome` may raise that to: the reader reserves a frame's
    /// announced length, so a hostile relay must not choose it freely.
    pub max_relay_frame_len: u32,
    /// Pushes buffered for the application before the connection stops reading.
    pub push_buffer: usize,
    /// Send keepalive pings so the relay does not close a quiet session (e.g. a listener).
    pub keepalive: bool,
    /// The local address to connect from (any port); `None` lets the system choose.
    pub local_ip: Option<IpAddr>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_frame_len: 1 << 20,
            max_relay_frame_len: 16 << 20,
            push_buffer: 1024,
            keepalive: true,
            local_ip: None,
        }
    }
}

type Reply = oneshot::Sender<Result<Frame, ClientError>>;

enum Command {
    Request(Box<Body>, Reply),
    Ping(Reply),
}

/// A connected, authenticated client session.
pub struct Client {
    commands: mpsc::Sender<Command>,
    pushes: mpsc::Receiver<Frame>,
    welcome: Welcome,
    relay: PublicKeyBytes,
    identity: Arc<KeyPair>,
    request_timeout: Duration,
}

impl Client {
    /// Connects to `addr`, authenticates as `identity` and checks that the relay holds `relay`.
    pub async fn connect(
        addr: SocketAddr,
        identity: Arc<KeyPair>,
        relay: PublicKeyBytes,
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        let budget = options.connect_timeout;
        timeout(budget, Self::establish(addr, identity, relay, options))
            .await
            .map_err(|_| ClientError::Timeout(budget))?
    }

    async fn establish(
        addr: SocketAddr,
        identity: Arc<KeyPair>,
        relay: PublicKeyBytes,
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        let stream = match options.local_ip {
            None => TcpStream::connect(addr).await?,
            Some(ip) => {
                let socket = if ip.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                socket.bind(SocketAddr::new(ip, 0))?;
                socket.connect(addr).await?
            }
        };
        let _ = stream.set_nodelay(true);
        let (read, mut write) = stream.into_split();
        let mut reader = FramedRead::new(read, FrameCodec::new(options.max_frame_len));

        let (waiting, init) = AwaitingAck::start(&identity, relay);
        let identity_for_client = identity.clone();
        write.write_all(&encode_frame(&init)).await?;
        let ack = reader.next().await.ok_or(ClientError::HandshakeRefused)??;
        let established = waiting.on_ack(&identity, &ack)?;

        let timers = Timers::initiator();
        let mut session =
            Session::initiator(established.keys, timers, options.max_frame_len, now());
        let body = reader.next().await.ok_or(ClientError::Closed)??;
        let welcome = match session.on_frame(body, now())? {
            Received::Frame(Frame {
                body: Some(Body::Welcome(welcome)),
                ..
            }) => welcome,
            _ => return Err(ClientError::UnexpectedResponse("expected Welcome")),
        };
        if welcome.protocol != botd_protocol::proto::PROTOCOL_NAME {
            return Err(ClientError::UnexpectedResponse(
                "Welcome names another protocol",
            ));
        }
        if !welcome.relay_pubkey.is_empty() && welcome.relay_pubkey[..] != relay.as_bytes()[..] {
            return Err(ClientError::UnexpectedResponse(
                "Welcome carries another relay key",
            ));
        }
        reader.decoder_mut().set_max_frame_len(
            welcome
                .max_frame_len
                .clamp(1024, options.max_relay_frame_len.max(1024)),
        );
        session.set_peer_max_frame_len(welcome.max_frame_len.max(1024));
        // The relay may ask for more than the 30 seconds between Pings that BOTD sets.
        let ping_min_interval =
            Duration::from_millis(welcome.ping_min_interval_ms).max(Duration::from_secs(30));
        let idle = Duration::from_millis(welcome.idle_timeout_ms);
        session.set_timers(Timers {
            ping_min_interval,
            // Ping well inside the relay's idle timeout, never faster than the ping rule.
            keepalive_after: options
                .keepalive
                .then(|| (idle / 3).max(ping_min_interval + Duration::from_secs(1))),
            ..session.timers().clone()
        });

        let (commands, command_rx) = mpsc::channel(256);
        let (push_tx, pushes) = mpsc::channel(options.push_buffer.max(1));
        let driver = Driver {
            session,
            reader,
            writer: write,
            pending: HashMap::new(),
            prune_pending_at: MIN_PRUNE_PENDING_AT,
            next_id: 1,
            pushes: push_tx,
        };
        tokio::spawn(driver.run(command_rx));
        Ok(Self {
            commands,
            pushes,
            welcome,
            relay,
            identity: identity_for_client,
            request_timeout: options.request_timeout,
        })
    }

    /// What the relay announced.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    pub fn relay_key(&self) -> &PublicKeyBytes {
        &self.relay
    }

    /// The identity this session authenticated as.
    pub fn identity(&self) -> &PublicKeyBytes {
        self.identity.public()
    }

    /// Sends a request and waits for the frame answering it. An `Error` answer becomes
    /// [`ClientError::Remote`].
    pub async fn request(&self, body: Body) -> Result<Body, ClientError> {
        let frame = self
            .call(|reply| Command::Request(Box::new(body), reply))
            .await?;
        match frame.body {
            Some(Body::Error(error)) => Err(ClientError::remote(error)),
            Some(body) => Ok(body),
            None => Err(ClientError::UnexpectedResponse("empty frame")),
        }
    }

    /// Pings the relay and returns the round-trip time. BOTD allows one ping per 30 s.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let started = Instant::now();
        let frame = self.call(Command::Ping).await?;
        match frame.body {
            Some(Body::Pong(_)) => Ok(started.elapsed()),
            Some(Body::Error(error)) => Err(ClientError::remote(error)),
            _ => Err(ClientError::UnexpectedResponse("expected Pong")),
        }
    }

    async fn call(&self, command: impl FnOnce(Reply) -> Command) -> Result<Frame, ClientError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| ClientError::Closed)?;
        match timeout(self.request_timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout(self.request_timeout)),
        }
    }

    /// The next unsolicited frame from the relay (`None` once the connection is gone). Errors
    /// with id 0 (e.g. `SHUTTING_DOWN`, `REPLACED`) arrive here too.
    pub async fn next_push(&mut self) -> Option<Frame> {
        self.pushes.recv().await
    }
}

/// Pending answers below which no pruning is done.
const MIN_PRUNE_PENDING_AT: usize = 64;

/// Remembers who waits for the answer to `id`. A caller that timed out has dropped its
/// receiver; such entries are dropped whenever the map has doubled, so a relay that never
/// answers cannot grow it.
fn await_answer(pending: &mut HashMap<u64, Reply>, prune_at: &mut usize, id: u64, reply: Reply) {
    if pending.len() >= *prune_at {
        pending.retain(|_, waiting| !waiting.is_closed());
        *prune_at = (2 * pending.len()).max(MIN_PRUNE_PENDING_AT);
    }
    pending.insert(id, reply);
}

/// Owns the socket and the session; answers commands and routes frames.
struct Driver {
    session: Session,
    reader: FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    pending: HashMap<u64, Reply>,
    /// Size of `pending` at which replies nobody waits for (timed out) are dropped.
    prune_pending_at: usize,
    next_id: u64,
    pushes: mpsc::Sender<Frame>,
}

impl Driver {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let result = self.run_inner(&mut commands).await;
        if let Err(err) = &result {
            tracing::debug!(error = %err, "client connection ended");
        }
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(ClientError::Closed));
        }
        let _ = self.writer.shutdown().await;
    }

    fn await_answer(&mut self, id: u64, reply: Reply) {
        await_answer(&mut self.pending, &mut self.prune_pending_at, id, reply);
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    async fn run_inner(
        &mut self,
        commands: &mut mpsc::Receiver<Command>,
    ) -> Result<(), ClientError> {
        loop {
            self.flush().await?;
            tokio::select! {
                command = commands.recv() => match command {
                    None => return Ok(()),
                    Some(Command::Request(body, reply)) => {
                        let id = self.next_id();
                        self.session.send(&Frame::new(id, *body))?;
                        self.await_answer(id, reply);
                    }
                    Some(Command::Ping(reply)) => {
                        let id = self.next_id();
                        match self.session.ping(id, now())? {
                            Some(_) => self.await_answer(id, reply),
                            None => { let _ = reply.send(Err(ClientError::PingTooSoon)); }
                        }
                    }
                },
                frame = self.reader.next() => {
                    let body = frame.ok_or(ClientError::Closed)??;
                    let frame = match self.session.on_frame(body, now())? {
                        Received::Frame(frame) => frame,
                        Received::Reply(reply) => {
                            self.session.send(&reply)?;
                            continue;
                        }
                        Received::Nothing => continue,
                    };
                    if let Some(reply) = self.pending.remove(&frame.id).filter(|_| frame.id != 0) {
                        let _ = reply.send(Ok(frame));
                    } else if !matches!(frame.body, Some(Body::Pong(_))) {
                        // Backpressure: a full push buffer stops reading, which stops the relay.
                        // An error means nobody listens for pushes; requests still work.
                        let _ = self.pushes.send(frame).await;
                    }
                }
                _ = sleep_until(Instant::from_std(self.session.next_deadline())) => self.session.on_timeout(now())?,
            }
        }
    }

    async fn flush(&mut self) -> Result<(), ClientError> {
        if let Some(wire) = self.session.poll_transmit() {
            self.writer.write_all(&wire).await?;
            self.session.mark_sent(now());
        }
        Ok(())
    }
}

/// Answers the request with the expected body variant, or says what came instead.
macro_rules! expect {
    ($client:expr, $request:expr, $variant:ident) => {
        match $client.request($request).await? {
            Body::$variant(answer) => Ok(answer),
            other => Err(ClientError::UnexpectedResponse(other.kind())),
        }
    };
}

/// Typed relay requests.
impl Client {
    pub async fn register(
        &self,
        request: proto::Register,
    ) -> Result<proto::Registered, ClientError> {
        expect!(self, Body::Register(request), Registered)
    }

    pub async fn unregister(&self, device_id: u32) -> Result<proto::Unregistered, ClientError> {
        expect!(
            self,
            Body::Unregister(proto::Unregister { device_id }),
            Unregistered
        )
    }

    pub async fn upload_prekeys(
        &self,
        request: proto::UploadPreKeys,
    ) -> Result<proto::PreKeyCount, ClientError> {
        expect!(self, Body::UploadPreKeys(request), PreKeyCount)
    }

    pub async fn prekey_count(&self, device_id: u32) -> Result<proto::PreKeyCount, ClientError> {
        expect!(
            self,
            Body::GetPreKeyCount(proto::GetPreKeyCount { device_id }),
            PreKeyCount
        )
    }

    /// One bundle per device of `identity` (all devices when `device_ids` is empty).
    pub async fn fetch_prekeys(
        &self,
        identity: &PublicKeyBytes,
        device_ids: Vec<u32>,
    ) -> Result<Vec<proto::PreKeyBundle>, ClientError> {
        let request = proto::FetchPreKeys {
            identity: Bytes::copy_from_slice(identity.as_bytes()),
            device_ids,
        };
        expect!(self, Body::FetchPreKeys(request), PreKeyBundles).map(|b| b.bundles)
    }

    /// Signs and sends `payload` to `recipient`'s device. `nonce` makes retries idempotent: the
    /// same nonce to the same mailbox returns the first message id with `duplicate = true`.
    pub async fn send_message(&self, message: OutgoingMessage) -> Result<proto::Sent, ClientError> {
        let request = message.sign(&self.identity);
        expect!(self, Body::Send(request), Sent)
    }

    /// A raw `Send`, for callers that build and sign it themselves.
    pub async fn send_raw(&self, request: proto::Send) -> Result<proto::Sent, ClientError> {
        expect!(self, Body::Send(request), Sent)
    }

    /// Subscribes to a device's mailbox; `Deliver` pushes follow on [`Client::next_push`].
    pub async fn subscribe(
        &self,
        device_id: u32,
        after_id: u64,
    ) -> Result<proto::Subscribed, ClientError> {
        expect!(
            self,
            Body::Subscribe(proto::Subscribe {
                device_id,
                after_id
            }),
            Subscribed
        )
    }

    pub async fn get_message(
        &self,
        device_id: u32,
        message_id: u64,
    ) -> Result<proto::Deliver, ClientError> {
        expect!(
            self,
            Body::GetMessage(proto::GetMessage {
                device_id,
                message_id
            }),
            Deliver
        )
    }

    pub async fn ack(
        &self,
        device_id: u32,
        message_ids: Vec<u64>,
    ) -> Result<proto::Acked, ClientError> {
        expect!(
            self,
            Body::AckMessages(proto::AckMessages {
                device_id,
                message_ids
            }),
            Acked
        )
    }

    pub async fn set_policy(&self, accept: proto::Accept) -> Result<(), ClientError> {
        expect!(
            self,
            Body::SetPolicy(proto::SetPolicy {
                accept: accept as i32
            }),
            Done
        )
        .map(drop)
    }

    pub async fn add_contact(&self, identity: &PublicKeyBytes) -> Result<(), ClientError> {
        let identity = Bytes::copy_from_slice(identity.as_bytes());
        expect!(self, Body::AddContact(proto::AddContact { identity }), Done).map(drop)
    }

    pub async fn remove_contact(&self, identity: &PublicKeyBytes) -> Result<(), ClientError> {
        let identity = Bytes::copy_from_slice(identity.as_bytes());
        expect!(
            self,
            Body::RemoveContact(proto::RemoveContact { identity }),
            Done
        )
        .map(drop)
    }

    pub async fn create_ticket(&self, ttl_s: u32, uses: u32) -> Result<proto::Ticket, ClientError> {
        expect!(
            self,
            Body::CreateTicket(proto::CreateTicket { ttl_s, uses }),
            Ticket
        )
    }
}

/// A message to send; [`Client::send_message`] hashes and signs it.
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    pub recipient: PublicKeyBytes,
    pub recipient_device: u32,
    pub sender_device: u32,
    pub nonce: [u8; 8],
    pub payload: Bytes,
    /// A ticket of the recipient, needed for first contact when it accepts contacts only.
    pub ticket: Bytes,
}

impl OutgoingMessage {
    /// A message with a fresh random nonce and no ticket.
    pub fn new(
        recipient: PublicKeyBytes,
        recipient_device: u32,
        sender_device: u32,
        payload: impl Into<Bytes>,
    ) -> Self {
        Self {
            recipient,
            recipient_device,
            sender_device,
            nonce: rand::random(),
            payload: payload.into(),
            ticket: Bytes::new(),
        }
    }

    /// The `Send` request, with `payload_hash` and `sender_signature` filled in.
    pub fn sign(&self, sender: &KeyPair) -> proto::Send {
        let payload_hash = sha256(&[&self.payload]);
        let digest = message_digest(
            sender.public().as_bytes(),
            self.recipient.as_bytes(),
            self.recipient_device,
            &self.nonce,
            &payload_hash,
        );
        proto::Send {
            recipient: Bytes::copy_from_slice(self.recipient.as_bytes()),
            recipient_device: self.recipient_device,
            sender_device: self.sender_device,
            sender_nonce: Bytes::copy_from_slice(&self.nonce),
            payload_hash: Bytes::copy_from_slice(&payload_hash),
            sender_signature: Bytes::copy_from_slice(&sender.sign(&digest)),
            payload: self.payload.clone(),
            ticket: self.ticket.clone(),
        }
    }
}

/// Checks a delivered message end to end: the payload hash and the sender's signature.
pub fn verify_delivery(
    deliver: &proto::Deliver,
    recipient: &PublicKeyBytes,
) -> Result<PublicKeyBytes, botd_protocol::keys::KeyError> {
    use botd_protocol::keys::KeyError;
    let sender = PublicKeyBytes::parse(&deliver.sender)?;
    if deliver.payload_hash[..] != sha256(&[&deliver.payload])[..] {
        return Err(KeyError::BadSignature);
    }
    let digest = message_digest(
        sender.as_bytes(),
        recipient.as_bytes(),
        deliver.recipient_device,
        &deliver.sender_nonce,
        &deliver.payload_hash,
    );
    sender.verify(&digest, &deliver.sender_signature)?;
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_nobody_waits_for_are_pruned() {
        let mut pending = HashMap::new();
        let mut prune_at = MIN_PRUNE_PENDING_AT;
        let mut waiting = Vec::new();
        for id in 0..10_000u64 {
            let (reply, answer) = oneshot::channel();
            await_answer(&mut pending, &mut prune_at, id, reply);
            // One caller in a hundred is still waiting; the others timed out.
            if id % 100 == 0 {
                waiting.push(answer);
            }
        }
        assert!(
            pending.len() <= 2 * MIN_PRUNE_PENDING_AT + waiting.len(),
            "{}",
            pending.len()
        );
        assert!(waiting
            .iter()
            .enumerate()
            .all(|(i, _)| pending.contains_key(&(i as u64 * 100))));
    }
}
