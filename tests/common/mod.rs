//! Shared loopback harness: a relay on 127.0.0.1:0 and raw-socket helpers for hostile peers.

#![allow(dead_code, unused_imports)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use botd_client::{Client, ClientError, ClientOptions, OutgoingMessage};
use botd_protocol::keys::{KeyPair, PublicKeyBytes};
use botd_protocol::proto::{Body, Deliver, ErrorCode, Frame};
use botd_relay::app::{Handler, TransportOnly};
use botd_relay::config::Config;
use botd_relay::store::embedded::journal::Journal;
use botd_relay::store::embedded::EmbeddedStore;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

pub use botd_relay::testing::{
    in_memory_app as app, loopback_config as test_config, start_as, start_relay, start_relay_on,
    temp_dir, LoopbackRelay as Relay, TempDir,
};

/// The longest wait for something that must happen: a bug fails the test instead of hanging it.
pub const HANG: Duration = Duration::from_secs(10);
/// How long to watch for something that must not happen.
pub const QUIET: Duration = Duration::from_millis(400);
/// The most `PreKeysLow` notices [`next_deliver_past_prekeys_low`] passes over.
const MAX_PREKEYS_LOW: usize = 64;

pub async fn start_with<H: Handler>(config: Config, handler: H) -> Relay {
    start_as(config, KeyPair::generate(), handler).await
}

pub async fn start(config: Config) -> Relay {
    start_with(config, TransportOnly).await
}

/// The relay application over the in-memory embedded store.
pub type App = botd_relay::relay::Relay<EmbeddedStore>;

/// A `Register` with a signed prekey and `one_time` one-time prekeys numbered from 1.
pub fn registration(device_id: u32, one_time: u32) -> botd_protocol::proto::Register {
    use botd_protocol::proto::{PreKey, Register, SignedPreKey};
    Register {
        device_id,
        registration_id: 1000 + device_id,
        identity_key: bytes::Bytes::from(vec![0x05; 33]),
        signed_prekey: Some(SignedPreKey {
            id: 1,
            public_key: bytes::Bytes::from(vec![0x06; 33]),
            signature: bytes::Bytes::from(vec![0x07; 64]),
        }),
        one_time_prekeys: (1..=one_time)
            .map(|id| PreKey {
                id,
                public_key: bytes::Bytes::from(vec![id as u8; 33]),
            })
            .collect(),
    }
}

/// A client of `relay` with device 1 registered with `one_time` one-time prekeys.
pub async fn registered(relay: &Relay, one_time: u32) -> Client {
    let client = relay.client().await;
    client.register(registration(1, one_time)).await.unwrap();
    client
}

/// A message from device 1 to device 1 of `recipient`.
pub fn to(recipient: &Client, payload: impl Into<Bytes>) -> OutgoingMessage {
    to_device(recipient, 1, payload)
}

/// A message from device 1 to device `device` of `recipient`.
pub fn to_device(recipient: &Client, device: u32, payload: impl Into<Bytes>) -> OutgoingMessage {
    OutgoingMessage::new(*recipient.identity(), device, 1, payload)
}

/// The next push to `client`, within [`HANG`]; panics if none comes or the connection closes.
pub async fn next_push(client: &mut Client) -> Frame {
    timeout(HANG, client.next_push())
        .await
        .expect("a push arrives in time")
        .expect("the connection is still open")
}

/// The next push, which must be a `Deliver` with frame id 0.
pub async fn next_deliver(client: &mut Client) -> Deliver {
    deliver_of(next_push(client).await)
}

/// The next push that is not a `PreKeysLow` notice (at most 64 of those), which must be a
/// `Deliver` with frame id 0.
pub async fn next_deliver_past_prekeys_low(client: &mut Client) -> Deliver {
    for _ in 0..=MAX_PREKEYS_LOW {
        let frame = next_push(client).await;
        if !matches!(frame.body, Some(Body::PreKeysLow(_))) {
            return deliver_of(frame);
        }
    }
    panic!("more than {MAX_PREKEYS_LOW} PreKeysLow pushes and no Deliver");
}

fn deliver_of(frame: Frame) -> Deliver {
    assert_eq!(frame.id, 0, "pushes carry frame id 0");
    match frame.body {
        Some(Body::Deliver(deliver)) => deliver,
        other => panic!("expected a Deliver push, got {other:?}"),
    }
}

/// Nothing is pushed to `client` for [`QUIET`], and its connection stays open.
pub async fn assert_no_push(client: &mut Client, what: &str) {
    match timeout(QUIET, client.next_push()).await {
        Err(_) => {}
        Ok(Some(frame)) => panic!("{what}: unexpected push {frame:?}"),
        Ok(None) => panic!("{what}: connection closed"),
    }
}

/// `retry_after_ms` of a `RATE_LIMITED` answer (panics on anything else).
pub fn retry_after(result: Result<impl std::fmt::Debug, ClientError>) -> u64 {
    match result {
        Err(ClientError::Remote {
            code: ErrorCode::RateLimited,
            retry_after_ms,
            ..
        }) => retry_after_ms,
        other => panic!("expected RATE_LIMITED, got {other:?}"),
    }
}

/// What the tests do with a relay through clients.
#[allow(async_fn_in_trait)]
pub trait Clients {
    fn relay(&self) -> &Relay;

    async fn client(&self) -> Client {
        self.client_as(Arc::new(KeyPair::generate())).await
    }

    async fn client_as(&self, identity: Arc<KeyPair>) -> Client {
        let relay = self.relay();
        Client::connect(relay.addr, identity, relay.key, ClientOptions::default())
            .await
            .expect("client connects")
    }

    /// A good peer still gets served: handshake, Welcome and a ping round trip.
    async fn assert_serving(&self) {
        let client = self.client().await;
        client.ping().await.expect("ping answered");
    }

    /// A client connecting from `ip`, with a fresh identity.
    async fn client_from(&self, ip: std::net::IpAddr) -> Client {
        self.client_from_as(ip, Arc::new(KeyPair::generate())).await
    }

    async fn client_from_as(&self, ip: std::net::IpAddr, identity: Arc<KeyPair>) -> Client {
        let relay = self.relay();
        let options = ClientOptions {
            local_ip: Some(ip),
            ..ClientOptions::default()
        };
        Client::connect(relay.addr, identity, relay.key, options)
            .await
            .expect("client connects")
    }
}

impl Clients for Relay {
    fn relay(&self) -> &Relay {
        self
    }
}
/// Reads until the peer closes; returns what arrived. Fails if the peer keeps it open.
pub async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("connection closed by the relay in time");
    received
}

pub async fn write_frame(stream: &mut TcpStream, body: &[u8]) {
    stream
        .write_all(&botd_protocol::codec::encode_frame(body))
        .await
        .unwrap();
}

/// A peer that does the handshake by hand over a socket, so tests can then misbehave.
pub struct RawPeer {
    pub stream: TcpStream,
    pub session: botd_protocol::session::Session,
    pub identity: KeyPair,
    buffer: bytes::BytesMut,
    codec: botd_protocol::codec::FrameCodec,
}

impl RawPeer {
    pub async fn connect(relay: &Relay) -> RawPeer {
        Self::connect_stream(relay, TcpStream::connect(relay.addr).await.unwrap()).await
    }

    /// The handshake over a connected `stream`.
    pub async fn connect_stream(relay: &Relay, mut stream: TcpStream) -> RawPeer {
        use botd_protocol::handshake::AwaitingAck;
        use botd_protocol::session::{Session, Timers};
        let identity = KeyPair::generate();
        let (waiting, init) = AwaitingAck::start(&identity, relay.key);
        write_frame(&mut stream, &init).await;
        let mut peer = RawPeer {
            stream,
            session: Session::initiator(
                botd_protocol::handshake::SessionKeys {
                    send: zero_keys(),
                    recv: zero_keys(),
                },
                Timers {
                    ping_min_interval: Duration::from_secs(30),
                    probe_after: None,
                    keepalive_after: None,
                    pong_timeout: Duration::from_secs(20),
                    idle_timeout: None,
                },
                1 << 20,
                tokio::time::Instant::now().into_std(),
            ),
            identity,
            buffer: bytes::BytesMut::new(),
            codec: botd_protocol::codec::FrameCodec::new(1 << 20),
        };
        let ack = peer.read_body().await.expect("ack");
        let established = waiting.on_ack(&peer.identity, &ack).expect("valid ack");
        let timers = peer.session.timers().clone();
        peer.session = Session::initiator(
            established.keys,
            timers,
            1 << 20,
            tokio::time::Instant::now().into_std(),
        );
        let welcome = peer.recv().await.expect("welcome");
        assert!(matches!(
            welcome.body,
            Some(botd_protocol::proto::Body::Welcome(_))
        ));
        peer
    }

    /// Reads one raw frame body, or `None` when the relay closed.
    pub async fn read_body(&mut self) -> Option<bytes::BytesMut> {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(body) = self
                    .codec
                    .decode(&mut self.buffer)
                    .expect("relay frames well")
                {
                    return Some(body);
                }
                if self.stream.read_buf(&mut self.buffer).await.ok()? == 0 {
                    return None;
                }
            }
        })
        .await
        .expect("relay answered in time")
    }

    /// Reads and opens the next frame the session passes up.
    pub async fn recv(&mut self) -> Option<botd_protocol::proto::Frame> {
        loop {
            let body = self.read_body().await?;
            let received = self
                .session
                .on_frame(body, tokio::time::Instant::now().into_std())
                .expect("relay frames open");
            match received {
                botd_protocol::session::Received::Frame(frame) => return Some(frame),
                botd_protocol::session::Received::Reply(reply) => self.send(&reply).await,
                botd_protocol::session::Received::Nothing => {}
            }
        }
    }

    /// Seals a frame and returns its wire bytes without sending them.
    pub fn seal(&mut self, frame: &botd_protocol::proto::Frame) -> bytes::Bytes {
        self.session.send(frame).unwrap();
        self.session.poll_transmit().unwrap()
    }

    pub async fn send(&mut self, frame: &botd_protocol::proto::Frame) {
        let wire = self.seal(frame);
        self.stream.write_all(&wire).await.unwrap();
    }
}

fn zero_keys() -> botd_protocol::cipher::DirectionKeys {
    botd_protocol::cipher::DirectionKeys {
        enc: [0; 32],
        mac: [0; 32],
    }
}

/// The code of an `Error` frame.
pub fn error_code(frame: &botd_protocol::proto::Frame) -> botd_protocol::proto::ErrorCode {
    match &frame.body {
        Some(botd_protocol::proto::Body::Error(error)) => error.code(),
        other => panic!("expected an Error frame, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile peers from other loopback addresses, bounded waits, metrics, durable relays
// ---------------------------------------------------------------------------------------------

/// The loopback address `127.0.0.<n>` (the whole of 127/8 reaches the relay on 127.0.0.1).
pub fn loopback(n: u8) -> std::net::IpAddr {
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, n))
}

/// A socket bound to `ip` (any port), ready to connect.
pub fn socket_from(ip: std::net::IpAddr) -> tokio::net::TcpSocket {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(ip, 0)).unwrap();
    socket
}

/// A TCP connection to the relay from `ip`.
pub async fn connect_from(relay: &Relay, ip: std::net::IpAddr) -> TcpStream {
    socket_from(ip).connect(relay.addr).await.unwrap()
}

/// Polls `condition` every few milliseconds until it holds; panics (naming `what`) if it does
/// not within `within`. A hang guard, not a measurement.
pub async fn wait_until(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now().into_std() + within;
    while !condition() {
        assert!(
            tokio::time::Instant::now().into_std() < deadline,
            "gave up waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Blocks (off any runtime) until record `lsn` of `journal` is durable, woken by the journal
/// itself; panics if the journal failed or after [`HANG`].
pub fn wait_durable(journal: &Journal, lsn: u64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        timeout(HANG, journal.progress().wait(lsn))
            .await
            .unwrap_or_else(|_| panic!("the journal did not reach lsn {lsn} in time"))
            .expect("the journal is written");
    });
}

/// True when the relay has closed `stream` (end of stream or reset), false while it is open.
/// Does not wait; discards anything readable.
pub fn is_closed(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match stream.try_read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

impl RawPeer {
    /// The handshake over `socket` (bound, not yet connected), e.g. one with a small receive
    /// buffer or another source address.
    pub async fn connect_over(relay: &Relay, socket: tokio::net::TcpSocket) -> RawPeer {
        Self::connect_stream(relay, socket.connect(relay.addr).await.unwrap()).await
    }
}

/// What a test's own metrics recorder has seen (Prometheus text, parsed on demand).
#[derive(Clone)]
pub struct Metrics(metrics_exporter_prometheus::PrometheusHandle);

impl Metrics {
    /// The sum of the series of `name` whose labels include all of `labels` (0 if none).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.0.render();
        let mut sum = 0.0;
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (metric, label_text) = match series.split_once('{') {
                Some((metric, rest)) => (metric, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                continue;
            }
            let matches = labels.iter().all(|(k, v)| {
                label_text
                    .split(',')
                    .any(|pair| pair == format!("{k}=\"{v}\""))
            });
            if matches {
                sum += value.parse::<f64>().unwrap_or(0.0);
            }
        }
        sum
    }

    pub fn render(&self) -> String {
        self.0.render()
    }
}

/// Runs `test` on a current-thread runtime with a metrics recorder of its own, so that its
/// counts are not mixed with other tests' (every metric of the relay is recorded on the
/// runtime's thread). `paused` starts tokio's clock paused.
pub fn with_metrics<F, Fut>(paused: bool, test: F)
where
    F: FnOnce(Metrics) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = Metrics(recorder.handle());
    metrics::with_local_recorder(&recorder, || {
        let mut builder = tokio::runtime::Builder::new_current_thread();
        builder.enable_all();
        if paused {
            builder.start_paused(true);
        }
        builder.build().unwrap().block_on(test(handle))
    })
}

/// A relay serving the application over a durable store in `dir` (journal and snapshots on
/// disk, with `config`'s fsync policy).
pub async fn start_durable_relay(
    mut config: Config,
    dir: &TempDir,
) -> (Relay, Arc<App>, EmbeddedStore) {
    config.data_dir = dir.path().to_owned();
    let (store, _) = EmbeddedStore::open(&config, 1).expect("store opens");
    let identity = KeyPair::generate();
    let app =
        botd_relay::relay::Relay::new(Arc::new(config.clone()), *identity.public(), store.clone());
    let relay = start_as(config, identity, app.clone()).await;
    (relay, app, store)
}

/// The relay's error code of a failed request (panics on success or on a local error).
pub fn code<T: std::fmt::Debug>(
    result: Result<T, botd_client::ClientError>,
) -> botd_protocol::proto::ErrorCode {
    match result {
        Err(err) => err
            .code()
            .unwrap_or_else(|| panic!("expected an answer from the relay, got {err}")),
        Ok(answer) => panic!("expected an error, got {answer:?}"),
    }
}

/// A session of the application without sockets (time can be paused).
pub struct DirectPeer {
    pub key: Arc<KeyPair>,
    session: Option<botd_relay::relay::RelaySession>,
    pub pushes: botd_relay::app::PushReceiver,
    next_id: u64,
}

impl DirectPeer {
    /// A session of a fresh identity.
    pub fn connect(app: &Arc<App>) -> Self {
        Self::connect_as(app, Arc::new(KeyPair::generate()))
    }

    /// A session of `key`'s identity.
    pub fn connect_as(app: &Arc<App>, key: Arc<KeyPair>) -> Self {
        let (push, pushes) = botd_relay::app::push_channel(1 << 20);
        let session = app.connect(*key.public(), "127.0.0.1:1".parse().unwrap(), push);
        Self {
            key,
            session: Some(session),
            pushes,
            next_id: 0,
        }
    }

    pub fn identity(&self) -> PublicKeyBytes {
        *self.key.public()
    }

    /// The session itself, for what the helpers do not cover.
    pub fn session(&mut self) -> &mut botd_relay::relay::RelaySession {
        self.session.as_mut().expect("connected")
    }

    /// One request, one answer with the same frame id.
    pub async fn call(
        &mut self,
        app: &Arc<App>,
        body: botd_protocol::proto::Body,
    ) -> botd_protocol::proto::Body {
        use botd_relay::app::Answer;
        self.next_id += 1;
        let request = botd_protocol::proto::Frame::new(self.next_id, body);
        let answer = match app.request(self.session(), request) {
            Answer::None => panic!("no answer"),
            Answer::Ready(out) => out.into_frame(),
            Answer::Pending(pending) => pending.await.into_frame(),
        };
        assert_eq!(answer.id, self.next_id);
        answer.body.expect("answers have a body")
    }

    /// Registers device 1 with 3 one-time prekeys.
    pub async fn register(&mut self, app: &Arc<App>) {
        let answer = self
            .call(
                app,
                botd_protocol::proto::Body::Register(registration(1, 3)),
            )
            .await;
        assert!(
            matches!(answer, botd_protocol::proto::Body::Registered(_)),
            "{answer:?}"
        );
    }

    /// Signs `message` as this peer and sends it.
    pub async fn send(
        &mut self,
        app: &Arc<App>,
        message: &botd_client::OutgoingMessage,
    ) -> botd_protocol::proto::Body {
        let request = message.sign(&self.key);
        self.call(app, botd_protocol::proto::Body::Send(request))
            .await
    }

    /// Ends the session as a closed connection would.
    pub fn disconnect(&mut self, app: &Arc<App>) {
        app.disconnect(self.session.take().expect("connected"));
    }

    /// A pushed frame that is already queued.
    pub fn try_push(&mut self) -> Option<botd_protocol::proto::Frame> {
        use botd_relay::app::Push;
        match self.pushes.try_recv() {
            Some(Push::Out(out)) => Some(out.into_frame()),
            Some(Push::SlowConsumer) => panic!("unexpected SlowConsumer"),
            None => None,
        }
    }
}
