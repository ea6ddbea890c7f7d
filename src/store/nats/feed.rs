//! The relay's own connection for the traffic of every message (where the servers are
//! plaintext): the publishes of new messages ([`super::outbox`]) go out on it, framed by
//! [`super::wire`]; their acknowledgements, the per-mailbox subscriptions of [`super::live`]
//! and the removal notices come in on it, and each is handed on in the task that read it. The
//! client's connection keeps the requests (reads, purges, records).
//!
//! Why not the client's connection: every message the client receives becomes a map of
//! `String` headers and travels through a channel to a task per subscription (a republished
//! message carries six headers), and every publish a header map and a hop through the client's
//! command channel: about a third of the relay's CPU per message on the JetStream store
//! (docs/BENCHMARKS.md). Here a message in costs a parse of its control line, two numbers read
//! from its header block and a lookup of its subscription; a message out is its bytes appended
//! to what the next write sends.
//!
//! Core NATS is at most once, and so is this connection: what was published while it was down
//! is not received. After every (re)connection it subscribes again to everything, and once the
//! server confirmed that (a `PONG` after the `SUB`s) it counts a reconnection, upon which the
//! live feed reads every watched mailbox again ([`super::live`]). A server that stops answering
//! pings is left after two [`PING_INTERVAL`]s.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ahash::AHashMap;
use async_nats::ServerAddr;
use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use super::error::NatsError;
use super::wire::{self, Delivered, ServerOp, WireError};
use crate::store::MailboxId;

/// How often the connection pings the server; two unanswered pings close it.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);

/// The most servers the feed remembers (configured and announced by the cluster).
const MAX_SERVERS: usize = 64;

/// Room for what one read takes in: a wake-up's worth of republished messages at full load.
const READ_BUFFER: usize = 64 * 1024;

/// Read buffer kept between bursts; a larger one (a big message) is dropped once empty.
const KEPT_READ_BUFFER: usize = 256 * 1024;

/// What a subscription's messages are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The mailbox's republished messages.
    Stored(MailboxId),
    /// Notices of the mailbox's messages removed through other relays.
    Removed(MailboxId),
    /// The acknowledgements of the relay's publishes ([`super::outbox`]).
    Acks,
}

/// Receives each message, in the connection's task: it must not block.
pub type Deliver = Box<dyn Fn(Target, Delivered) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
enum FeedError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("the server refused the connection: {0}")]
    Refused(String),
    #[error("the server asks for TLS")]
    TlsRequired,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the server stopped answering pings")]
    Stale,
    #[error("the connection closed")]
    Closed,
}

/// Who waits for the `PONG` of a `PING` written on the current connection.
enum PongWaiter {
    Keepalive,
    /// Callers whose `SUB` went out before that `PING`.
    Confirm(Vec<oneshot::Sender<()>>),
    /// The resubscription after a connection: a reconnection to count.
    Resubscribed,
}

#[derive(Default)]
struct State {
    next_sid: u64,
    subscriptions: AHashMap<u64, (String, Target)>,
    connected: bool,
    /// The current server's limit on a message (header block and body).
    max_payload: usize,
    /// Bytes to write on the current connection.
    out: Vec<u8>,
    pongs: VecDeque<PongWaiter>,
    /// Callers who subscribed while there was no connection: confirmed with the next one's
    /// resubscription.
    after_connect: Vec<oneshot::Sender<()>>,
}

/// The feed's connection and its subscriptions.
pub struct Feed {
    state: Mutex<State>,
    wake_writer: Notify,
    /// Woken each time a connection is up (after the server's handshake).
    link_up: Notify,
    deliver: Deliver,
    timeout: Duration,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl Feed {
    /// Starts the connection to `servers` (each tried in turn, forever, until `stop`); each
    /// message goes to `deliver`, each confirmed resubscription to `reconnected`. `timeout`
    /// bounds connecting and a subscription's confirmation.
    pub fn start(
        servers: Vec<ServerAddr>,
        timeout: Duration,
        deliver: Deliver,
        reconnected: tokio::sync::watch::Sender<u64>,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let feed = Arc::new(Self {
            state: Mutex::new(State::default()),
            wake_writer: Notify::new(),
            link_up: Notify::new(),
            deliver,
            timeout,
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        });
        let task = feed.clone();
        tokio::spawn(async move { task.run(servers, reconnected, stop).await });
        feed
    }

    /// Bytes read and written so far.
    pub fn traffic(&self) -> (u64, u64) {
        (
            self.bytes_in.load(Ordering::Relaxed),
            self.bytes_out.load(Ordering::Relaxed),
        )
    }

    /// Subscribes to `subject`; resolves with the subscription's id once the server has it, so
    /// that nothing published after that is missed.
    pub async fn subscribe(&self, subject: String, target: Target) -> Result<u64, NatsError> {
        let (confirmed, on_confirmed) = oneshot::channel();
        let sid = {
            let mut state = self.state.lock();
            state.next_sid += 1;
            let sid = state.next_sid;
            if state.connected {
                wire::subscribe(&mut state.out, &subject, sid);
                wire::ping(&mut state.out);
                state.pongs.push_back(PongWaiter::Confirm(vec![confirmed]));
            } else {
                // Callers that gave up waiting (timed out) leave nothing behind: a long
                // outage with many subscriptions tried keeps only those still waiting.
                state.after_connect.retain(|caller| !caller.is_closed());
                state.after_connect.push(confirmed);
            }
            state.subscriptions.insert(sid, (subject, target));
            sid
        };
        self.wake_writer.notify_one();
        match tokio::time::timeout(self.timeout, on_confirmed).await {
            Ok(Ok(())) => Ok(sid),
            _ => {
                self.unsubscribe(sid);
                Err(NatsError::request(format!(
                    "the live feed's subscription was not confirmed within {:?}",
                    self.timeout
                )))
            }
        }
    }

    /// Whether a connection is up (its handshake done).
    pub fn connected(&self) -> bool {
        self.state.lock().connected
    }

    /// Waits until a connection is up, at most until `deadline`; whether one is.
    pub async fn until_connected(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            // Registered before the look, so a connection made in between is not missed.
            let up = self.link_up.notified();
            let mut up = std::pin::pin!(up);
            up.as_mut().enable();
            if self.connected() {
                return true;
            }
            if tokio::time::timeout_at(deadline, up).await.is_err() {
                return self.connected();
            }
        }
    }

    /// Publishes a new message with its message id and a reply subject (`reply_prefix` and
    /// `number`), to be written with what else is queued. Refused at once while the connection
    /// is down (the caller waits for it first, see [`Feed::until_connected`]; a retry is
    /// recognised by the message id) and for a message the server would refuse for its size
    /// (which would close the connection).
    pub fn publish(
        &self,
        subject: &str,
        reply_prefix: &str,
        number: u64,
        message_id: &str,
        body: &[u8],
    ) -> Result<(), NatsError> {
        {
            let mut state = self.state.lock();
            if !state.connected {
                return Err(NatsError::request("the feed connection is down"));
            }
            let mark = state.out.len();
            let size = wire::publish_with_id(
                &mut state.out,
                subject,
                reply_prefix,
                number,
                message_id,
                body,
            );
            if size > state.max_payload {
                state.out.truncate(mark);
                return Err(NatsError::request(format!(
                    "a message of {size} bytes is over the server's max_payload of {}",
                    state.max_payload
                )));
            }
        }
        self.wake_writer.notify_one();
        Ok(())
    }

    pub fn unsubscribe(&self, sid: u64) {
        {
            let mut state = self.state.lock();
            if state.subscriptions.remove(&sid).is_none() {
                return;
            }
            if state.connected {
                wire::unsubscribe(&mut state.out, sid);
            }
        }
        self.wake_writer.notify_one();
    }

    /// Subscriptions in effect.
    #[cfg(test)]
    fn subscriptions(&self) -> usize {
        self.state.lock().subscriptions.len()
    }

    async fn run(
        self: Arc<Self>,
        mut servers: Vec<ServerAddr>,
        reconnected: tokio::sync::watch::Sender<u64>,
        stop: CancellationToken,
    ) {
        let mut attempt: u64 = 0;
        let mut next = 0;
        loop {
            let server = servers[next % servers.len()].clone();
            next += 1;
            let outcome = tokio::select! {
                _ = stop.cancelled() => return,
                outcome = self.session(&server, &mut servers, &reconnected, &mut attempt) => outcome,
            };
            self.disconnected();
            match outcome {
                FeedError::TlsRequired => tracing::error!(
                    server = %server.as_url_str(),
                    "the live feed connects without TLS and this server asks for it: name every \
                     server with a tls:// URL, and the live feed uses the client's connection"
                ),
                err => tracing::warn!(
                    server = %server.as_url_str(),
                    error = %err,
                    "live feed disconnected"
                ),
            }
            attempt += 1;
            let delay = Duration::from_millis((50 * attempt).min(1_000));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// The connection is gone: what was waiting for its `PONG`s waits for the next one.
    fn disconnected(&self) {
        let mut state = self.state.lock();
        state.connected = false;
        state.out.clear();
        let waiting: Vec<_> = state.pongs.drain(..).collect();
        for waiter in waiting {
            if let PongWaiter::Confirm(callers) = waiter {
                state.after_connect.extend(callers);
            }
        }
    }

    /// One connection, from connecting to its end (the returned error).
    async fn session(
        &self,
        server: &ServerAddr,
        servers: &mut Vec<ServerAddr>,
        reconnected: &tokio::sync::watch::Sender<u64>,
        attempt: &mut u64,
    ) -> FeedError {
        if server.tls_required() {
            return FeedError::TlsRequired;
        }
        let stream = match tokio::time::timeout(
            self.timeout,
            TcpStream::connect((server.host(), server.port())),
        )
        .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => return err.into(),
            Err(_) => return FeedError::Timeout(self.timeout),
        };
        let _ = stream.set_nodelay(true);
        let (mut reader, mut writer) = stream.into_split();
        let mut buf = BytesMut::with_capacity(READ_BUFFER);
        let info = match self
            .handshake(server, &mut reader, &mut writer, &mut buf)
            .await
        {
            Ok(info) => info,
            Err(err) => return err,
        };
        learn_servers(servers, &info.connect_urls);
        let max_message = info.max_payload.max(1 << 20) + 64 * 1024;
        *attempt = 0;
        {
            let mut state = self.state.lock();
            state.connected = true;
            state.max_payload = info.max_payload;
            let mut out = std::mem::take(&mut state.out);
            for (sid, (subject, _)) in &state.subscriptions {
                wire::subscribe(&mut out, subject, *sid);
            }
            wire::ping(&mut out);
            state.out = out;
            state.pongs.push_back(PongWaiter::Resubscribed);
            let callers = std::mem::take(&mut state.after_connect);
            if !callers.is_empty() {
                state.pongs.push_back(PongWaiter::Confirm(callers));
                wire::ping(&mut state.out);
            }
        }
        self.link_up.notify_waiters();
        let mut pings = tokio::time::interval(PING_INTERVAL);
        pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        pings.tick().await;
        let mut unanswered = 0u32;
        loop {
            let pending = {
                let mut state = self.state.lock();
                std::mem::take(&mut state.out)
            };
            if !pending.is_empty() {
                if let Err(err) = writer.write_all(&pending).await {
                    return err.into();
                }
                self.bytes_out
                    .fetch_add(pending.len() as u64, Ordering::Relaxed);
                continue;
            }
            tokio::select! {
                read = reader.read_buf(&mut buf) => match read {
                    Ok(0) => return FeedError::Closed,
                    Ok(n) => {
                        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                        if let Err(err) = self.handle(&mut buf, max_message, reconnected, &mut unanswered) {
                            return err;
                        }
                        if buf.is_empty() && buf.capacity() > KEPT_READ_BUFFER {
                            buf = BytesMut::with_capacity(READ_BUFFER);
                        } else if buf.capacity() - buf.len() < READ_BUFFER / 4 {
                            buf.reserve(READ_BUFFER);
                        }
                    }
                    Err(err) => return err.into(),
                },
                _ = self.wake_writer.notified() => {}
                _ = pings.tick() => {
                    if unanswered >= 2 {
                        return FeedError::Stale;
                    }
                    unanswered += 1;
                    let mut state = self.state.lock();
                    wire::ping(&mut state.out);
                    state.pongs.push_back(PongWaiter::Keepalive);
                }
            }
        }
    }

    /// Reads the server's `INFO`, sends `CONNECT` and waits for the `PONG` that says it was
    /// accepted.
    async fn handshake(
        &self,
        server: &ServerAddr,
        reader: &mut tokio::net::tcp::OwnedReadHalf,
        writer: &mut tokio::net::tcp::OwnedWriteHalf,
        buf: &mut BytesMut,
    ) -> Result<async_nats::ServerInfo, FeedError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let info = match self.read_op(reader, buf, deadline).await? {
            ServerOp::Info(json) => serde_json::from_slice::<async_nats::ServerInfo>(&json)
                .map_err(|err| FeedError::Refused(format!("unreadable INFO: {err}")))?,
            other => return Err(FeedError::Refused(format!("expected INFO, got {other:?}"))),
        };
        if info.tls_required {
            return Err(FeedError::TlsRequired);
        }
        let mut out = Vec::new();
        wire::connect(&mut out, &connect_options(server));
        writer.write_all(&out).await?;
        self.bytes_out
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        loop {
            match self.read_op(reader, buf, deadline).await? {
                ServerOp::Pong => return Ok(info),
                ServerOp::Err(text) => return Err(FeedError::Refused(text)),
                ServerOp::Ping => {
                    writer.write_all(b"PONG\r\n").await?;
                }
                _ => {}
            }
        }
    }

    async fn read_op(
        &self,
        reader: &mut tokio::net::tcp::OwnedReadHalf,
        buf: &mut BytesMut,
        deadline: tokio::time::Instant,
    ) -> Result<ServerOp, FeedError> {
        loop {
            if let Some(op) = wire::parse(buf, 1 << 20)? {
                return Ok(op);
            }
            match tokio::time::timeout_at(deadline, reader.read_buf(buf)).await {
                Ok(Ok(0)) => return Err(FeedError::Closed),
                Ok(Ok(n)) => {
                    self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                }
                Ok(Err(err)) => return Err(err.into()),
                Err(_) => return Err(FeedError::Timeout(self.timeout)),
            }
        }
    }

    /// Handles every complete operation in `buf`.
    fn handle(
        &self,
        buf: &mut BytesMut,
        max_message: usize,
        reconnected: &tokio::sync::watch::Sender<u64>,
        unanswered: &mut u32,
    ) -> Result<(), FeedError> {
        while let Some(op) = wire::parse(buf, max_message)? {
            match op {
                ServerOp::Message(message) => {
                    let target = self
                        .state
                        .lock()
                        .subscriptions
                        .get(&message.sid)
                        .map(|(_, target)| *target);
                    if let Some(target) = target {
                        (self.deliver)(target, message);
                    }
                }
                ServerOp::Ping => {
                    wire::pong(&mut self.state.lock().out);
                    self.wake_writer.notify_one();
                }
                ServerOp::Pong => {
                    let waiter = self.state.lock().pongs.pop_front();
                    match waiter {
                        Some(PongWaiter::Keepalive) => *unanswered = 0,
                        Some(PongWaiter::Confirm(callers)) => {
                            for caller in callers {
                                let _ = caller.send(());
                            }
                        }
                        Some(PongWaiter::Resubscribed) => {
                            reconnected.send_modify(|n| *n += 1);
                        }
                        None => {}
                    }
                }
                ServerOp::Err(text) => {
                    // Errors that do not end the connection (a permission on one subject)
                    // are only reported; the server closes the connection after the others.
                    tracing::warn!(error = %text, "live feed: the server reported an error");
                }
                ServerOp::Info(_) | ServerOp::Ok => {}
            }
        }
        Ok(())
    }
}

/// `CONNECT`'s options: no `+OK` per operation, headers on, and the credentials of the URL
/// (`user:password@` or a token as `token@`), as the client's own connection sends them.
fn connect_options(server: &ServerAddr) -> String {
    let mut options = serde_json::json!({
        "verbose": false,
        "pedantic": false,
        "headers": true,
        "no_responders": true,
        "protocol": 1,
        "lang": "rust",
        "version": env!("CARGO_PKG_VERSION"),
        "name": "botd-relay live feed",
    });
    match (server.username(), server.password()) {
        (Some(user), Some(pass)) => {
            options["user"] = user.into();
            options["pass"] = pass.into();
        }
        (Some(token), None) => options["auth_token"] = token.into(),
        _ => {}
    }
    options.to_string()
}

/// Adds the servers the cluster announces (`host:port`) to those tried on reconnection.
fn learn_servers(servers: &mut Vec<ServerAddr>, announced: &[String]) {
    for url in announced {
        if servers.len() >= MAX_SERVERS {
            return;
        }
        let Ok(addr) = format!("nats://{url}").parse::<ServerAddr>() else {
            continue;
        };
        if !servers
            .iter()
            .any(|known| known.host() == addr.host() && known.port() == addr.port())
        {
            // Announced servers take the credentials of the first configured one.
            let addr = match (servers.first(), servers.first().and_then(|s| s.username())) {
                (Some(first), Some(_)) => with_credentials(&addr, first).unwrap_or(addr),
                _ => addr,
            };
            servers.push(addr);
        }
    }
}

fn with_credentials(addr: &ServerAddr, from: &ServerAddr) -> Option<ServerAddr> {
    let mut url = addr.clone().into_inner();
    url.set_username(from.username()?).ok()?;
    url.set_password(from.password()).ok()?;
    ServerAddr::from_url(url).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_of_the_url_go_into_connect() {
        let options = |url: &str| -> serde_json::Value {
            serde_json::from_str(&connect_options(&url.parse().unwrap())).unwrap()
        };
        let with_password = options("nats://alice:s3cret@127.0.0.1:4222");
        assert_eq!(with_password["user"], "alice");
        assert_eq!(with_password["pass"], "s3cret");
        assert_eq!(with_password["headers"], true);
        assert_eq!(with_password["verbose"], false);
        let with_token = options("nats://t0ken@127.0.0.1:4222");
        assert_eq!(with_token["auth_token"], "t0ken");
        assert!(with_token.get("user").is_none());
        let plain = options("nats://127.0.0.1:4222");
        assert!(plain.get("user").is_none() && plain.get("auth_token").is_none());
    }

    #[test]
    fn announced_servers_are_added_once_with_the_configured_credentials() {
        let mut servers: Vec<ServerAddr> = vec!["nats://u:p@10.0.0.1:4222".parse().unwrap()];
        learn_servers(
            &mut servers,
            &[
                "10.0.0.1:4222".into(),
                "10.0.0.2:4222".into(),
                "10.0.0.2:4222".into(),
            ],
        );
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[1].host(), "10.0.0.2");
        assert_eq!(servers[1].username(), Some("u"));
        assert_eq!(servers[1].password(), Some("p"));
        let many: Vec<String> = (0..200)
            .map(|i| format!("10.1.0.{}:4222", i % 250))
            .collect();
        learn_servers(&mut servers, &many);
        assert_eq!(servers.len(), MAX_SERVERS);
    }

    /// A feed for the one server at `127.0.0.1:port`, with its reconnection count and what
    /// stops it.
    fn feed_on(
        port: u16,
        timeout: Duration,
        deliver: Deliver,
    ) -> (
        Arc<Feed>,
        tokio::sync::watch::Receiver<u64>,
        CancellationToken,
    ) {
        let (reconnected, reconnections) = tokio::sync::watch::channel(0u64);
        let stop = CancellationToken::new();
        let feed = Feed::start(
            vec![format!("nats://127.0.0.1:{port}").parse().unwrap()],
            timeout,
            deliver,
            reconnected,
            stop.clone(),
        );
        (feed, reconnections, stop)
    }

    /// While no server answers, each subscription fails after the timeout and what it left
    /// waiting is dropped by the next one: the waiting list does not grow with the attempts.
    #[tokio::test]
    async fn subscriptions_tried_during_an_outage_leave_nothing_behind() {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let (feed, _reconnections, stop) =
            feed_on(port, Duration::from_millis(50), Box::new(|_, _| {}));
        let mailbox = MailboxId {
            identity: [2; 33],
            device: 1,
        };
        for _ in 0..5 {
            let tried = feed
                .subscribe("live.a".into(), Target::Stored(mailbox))
                .await;
            assert!(tried.is_err());
        }
        assert_eq!(feed.subscriptions(), 0);
        assert!(feed.state.lock().after_connect.len() <= 1);
        stop.cancel();
    }

    type ServerLines = tokio::io::Lines<tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>>;

    /// Accepts the feed's next connection as a server: `INFO`, then the feed's `CONNECT` and
    /// `PING`, answered `PONG`.
    async fn accept_feed(
        listener: &tokio::net::TcpListener,
    ) -> (ServerLines, tokio::net::tcp::OwnedWriteHalf) {
        use tokio::io::AsyncBufReadExt;
        let (socket, _) = listener.accept().await.unwrap();
        let (read, mut write) = socket.into_split();
        let mut lines = tokio::io::BufReader::new(read).lines();
        write
            .write_all(b"INFO {\"server_id\":\"x\",\"max_payload\":1048576,\"headers\":true}\r\n")
            .await
            .unwrap();
        let connect = lines.next_line().await.unwrap().unwrap();
        assert!(connect.starts_with("CONNECT {"), "{connect}");
        assert_eq!(lines.next_line().await.unwrap().unwrap(), "PING");
        write.write_all(b"PONG\r\n").await.unwrap();
        (lines, write)
    }

    /// A scripted server on loopback: the feed connects, subscribes, receives, is disconnected
    /// and subscribes again on the next connection, counting the reconnection.
    #[tokio::test]
    async fn subscriptions_survive_a_lost_connection() {
        tokio::time::timeout(Duration::from_secs(20), lost_connection_script())
            .await
            .expect("the script ran to its end within 20 s");
    }

    async fn lost_connection_script() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (got, mut received) = tokio::sync::mpsc::unbounded_channel();
        let deliver: Deliver = Box::new(move |target, message| {
            let _ = got.send((target, message.payload));
        });
        let (feed, mut reconnections, stop) = feed_on(port, Duration::from_secs(5), deliver);
        let mailbox = MailboxId {
            identity: [2; 33],
            device: 1,
        };
        let subscribing = {
            let feed = feed.clone();
            tokio::spawn(async move {
                feed.subscribe("live.a".into(), Target::Stored(mailbox))
                    .await
            })
        };

        // Connection 1: after the handshake, the SUB with the PINGs that confirm it (the
        // resubscription's and the waiting caller's, in either order).
        let (mut lines, mut write) = accept_feed(&listener).await;
        let mut seen = Vec::new();
        while seen.iter().filter(|l: &&String| *l == "PING").count() < 2 {
            assert!(seen.len() < 8, "unexpected lines: {seen:?}");
            seen.push(lines.next_line().await.unwrap().unwrap());
        }
        let sub = seen
            .iter()
            .find(|l| l.starts_with("SUB "))
            .expect("a SUB")
            .clone();
        let sid: u64 = sub.rsplit(' ').next().unwrap().parse().unwrap();
        assert_eq!(sub, format!("SUB live.a {sid}"));
        write.write_all(b"PONG\r\nPONG\r\n").await.unwrap();
        assert_eq!(subscribing.await.unwrap().unwrap(), sid);
        reconnections.changed().await.unwrap();
        let headers = "NATS/1.0\r\nNats-Sequence: 5\r\n\r\n";
        let (h, t) = (headers.len(), headers.len() + 5);
        write
            .write_all(
                format!("HMSG live.a {sid} {h} {t}\r\n{headers}hello\r\nMSG other 999 1\r\nx\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let (target, payload) = received.recv().await.unwrap();
        assert_eq!(target, Target::Stored(mailbox));
        assert_eq!(&payload[..], b"hello");
        drop(write);
        drop(lines);

        // Connection 2: the subscription is sent again and the reconnection counted.
        let (mut lines, mut write) = accept_feed(&listener).await;
        assert_eq!(
            lines.next_line().await.unwrap().unwrap(),
            format!("SUB live.a {sid}")
        );
        assert_eq!(lines.next_line().await.unwrap().unwrap(), "PING");
        let before = *reconnections.borrow_and_update();
        write.write_all(b"PONG\r\n").await.unwrap();
        reconnections.changed().await.unwrap();
        assert_eq!(*reconnections.borrow(), before + 1);

        // A publish goes out framed on the connection; an unsubscription too.
        feed.publish("botd.m0.ab", "_INBOX.x.", 7, "id1", b"body")
            .unwrap();
        assert_eq!(
            lines.next_line().await.unwrap().unwrap(),
            "HPUB botd.m0.ab _INBOX.x.7 30 34"
        );
        assert_eq!(lines.next_line().await.unwrap().unwrap(), "NATS/1.0");
        assert_eq!(
            lines.next_line().await.unwrap().unwrap(),
            "Nats-Msg-Id: id1"
        );
        assert_eq!(lines.next_line().await.unwrap().unwrap(), "");
        assert_eq!(lines.next_line().await.unwrap().unwrap(), "body");
        let too_large = vec![0u8; 1 << 20];
        assert!(feed.publish("s", "r.", 8, "id2", &too_large).is_err());
        feed.unsubscribe(sid);
        assert_eq!(
            lines.next_line().await.unwrap().unwrap(),
            format!("UNSUB {sid}")
        );
        assert_eq!(feed.subscriptions(), 0);

        // Without a connection a publish is refused at once (the outbox waits before it).
        drop(write);
        drop(lines);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while feed.publish("s", "r.", 9, "id3", b"x").is_ok() {
            assert!(tokio::time::Instant::now() < deadline, "still connected");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
    }

    /// A publish that meets the connection down waits for the next one: not past its deadline
    /// while none comes, and no longer than the handshake once one does.
    #[tokio::test]
    async fn a_wait_for_the_connection_ends_with_the_handshake_or_the_deadline() {
        tokio::time::timeout(Duration::from_secs(20), async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let (feed, _reconnections, stop) =
                feed_on(port, Duration::from_secs(5), Box::new(|_, _| {}));
            // Connected at the TCP level, but the server has not sent its INFO yet.
            let soon = tokio::time::Instant::now() + Duration::from_millis(50);
            assert!(!feed.until_connected(soon).await);
            assert!(feed.publish("s", "r.", 1, "id1", b"x").is_err());
            // A deadline past the test's own bound: only the handshake can end this wait.
            let waiting = {
                let feed = feed.clone();
                let later = tokio::time::Instant::now() + Duration::from_secs(60);
                tokio::spawn(async move { feed.until_connected(later).await })
            };
            let (mut lines, _write) = accept_feed(&listener).await;
            assert!(waiting.await.unwrap());
            feed.publish("s", "r.", 2, "id2", b"x").unwrap();
            let mut seen = Vec::new();
            loop {
                assert!(seen.len() < 8, "unexpected lines: {seen:?}");
                let line = lines.next_line().await.unwrap().unwrap();
                if line.starts_with("HPUB ") {
                    assert_eq!(line, "HPUB s r.2 30 31");
                    break;
                }
                seen.push(line);
            }
            stop.cancel();
        })
        .await
        .expect("the wait ended with the handshake, within 20 s");
    }
}
