//! The relay application: arbitrary plaintexts decoded as `Frame` and handed to a
//! `Relay<EmbeddedStore>` (in memory) through [`Handler::request`] for a few sessions, as a
//! connection does, with every answer and push checked.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;

use super::input::Input;
use super::storage::assert_snapshot_round_trip;
use super::transport::{keys, relay_keys, relay_session};
use super::{cap, Outcome};
use botd_protocol::cipher::{Opener, TAG_LEN};
use botd_protocol::keys::{sha256, KeyPair};
use botd_protocol::message::message_digest;
use botd_protocol::proto::{Body, ErrorCode, Frame};
use botd_relay::app::{push_channel, Answer, Handler, Outgoing, PendingAnswer, Push, PushReceiver};
use botd_relay::config::{Config, MetricsListen};
use botd_relay::ratelimit::Rate;
use botd_relay::relay::{Relay, RelaySession};
use botd_relay::store::embedded::EmbeddedStore;

/// Steps of one input.
const MAX_STEPS: usize = 256;
/// Times a pending answer is polled before the harness calls it a hang (the in-memory store
/// answers at once, so one poll should do).
const MAX_POLLS: usize = 16;

type App = Arc<Relay<EmbeddedStore>>;

/// The relay's configuration: the defaults, or (flag bit 0) limits small enough for an input
/// to reach them; bit 1 turns on the verification of message signatures.
pub(super) fn relay_config(flags: u8) -> Config {
    let mut config = Config {
        metrics_listen: MetricsListen::Off,
        data_dir: std::env::temp_dir(),
        store_shards: 4,
        ..Config::default()
    };
    if flags & 1 != 0 {
        let rate = |burst| Rate::new(1.0, burst);
        config = Config {
            max_frame_len: 8192,
            max_payload_len: 1024,
            max_key_len: 64,
            max_devices_per_identity: 3,
            max_prekeys_per_upload: 4,
            max_prekeys_per_device: 6,
            prekey_low_threshold: 2,
            max_contacts: 2,
            max_tickets_per_identity: 2,
            max_ticket_uses: 3,
            max_ticket_ttl: Duration::from_secs(120),
            mailbox_max_messages: 6,
            mailbox_max_bytes: 4096,
            max_unacked: 2,
            max_identities: 2,
            max_stored_bytes: 6000,
            max_identity_stored_bytes: 5000,
            max_outbound_bytes: 4 * 8192,
            message_ttl: Duration::ZERO,
            account_ttl: Duration::ZERO,
            send_rate_per_pair: rate(8),
            change_rate_per_identity: rate(24),
            prekey_fetch_rate: rate(8),
            one_time_prekey_rate_per_device: rate(3),
            max_rate_limited_keys: 2,
            ..config
        };
    }
    config.verify_message_signatures = flags & 2 != 0;
    config
}

/// The answer kind each request gets when it succeeds.
fn answer_kind(request: &Body) -> Option<&'static str> {
    Some(match request {
        Body::Register(_) => "registered",
        Body::Unregister(_) => "unregistered",
        Body::UploadPreKeys(_) | Body::GetPreKeyCount(_) => "pre_key_count",
        Body::FetchPreKeys(_) => "pre_key_bundles",
        Body::Send(_) => "sent",
        Body::Subscribe(_) => "subscribed",
        Body::GetMessage(_) => "deliver",
        Body::AckMessages(_) => "acked",
        Body::SetPolicy(_) | Body::AddContact(_) | Body::RemoveContact(_) => "done",
        Body::CreateTicket(_) => "ticket",
        _ => return None,
    })
}

fn poll_now<F: Future + ?Sized>(future: Pin<&mut F>) -> Poll<F::Output> {
    future.poll(&mut Context::from_waker(Waker::noop()))
}

/// One connected session of the application, as a connection holds it.
struct Peer {
    key: &'static KeyPair,
    addr: SocketAddr,
    session: Option<RelaySession>,
    pushes: PushReceiver,
    /// Answers not yet resolved, in request order.
    pipeline: VecDeque<(Frame, PendingAnswer)>,
    /// Devices this connection subscribed to (with success).
    subscribed: HashSet<u32>,
    /// Highest message id pushed per device in the current subscription.
    pushed: HashMap<u32, u64>,
}

/// The harness's relay and its sessions.
struct World {
    app: App,
    config: Arc<Config>,
    peers: Vec<Peer>,
    /// Answers that went out, and how many of them were errors.
    answers: usize,
    errors: usize,
    /// Messages pushed live.
    pushed: usize,
}

impl World {
    fn new(flags: u8) -> Self {
        let config = Arc::new(relay_config(flags));
        let keys = keys();
        let store = EmbeddedStore::in_memory(&config);
        let app = Relay::new(config.clone(), *keys.relay.public(), store);
        // Two sessions of alice (the same identity on two devices) and one of bob, from two
        // address groups.
        let peers = [
            (&keys.alice, "192.0.2.1:4000"),
            (&keys.bob, "[2001:db8::1]:4000"),
            (&keys.alice, "192.0.2.1:4001"),
        ]
        .into_iter()
        .map(|(key, addr)| {
            let addr = addr.parse().expect("an address");
            let (session, pushes) = connect(&app, &config, key, addr);
            Peer {
                key,
                addr,
                session: Some(session),
                pushes,
                pipeline: VecDeque::new(),
                subscribed: HashSet::new(),
                pushed: HashMap::new(),
            }
        })
        .collect();
        Self {
            app,
            config,
            peers,
            answers: 0,
            errors: 0,
            pushed: 0,
        }
    }

    fn disconnect(&mut self, index: usize) {
        let peer = &mut self.peers[index];
        peer.pipeline.clear();
        if let Some(session) = peer.session.take() {
            Handler::disconnect(&self.app, session);
        }
    }

    fn reconnect(&mut self, index: usize) {
        self.disconnect(index);
        let peer = &mut self.peers[index];
        let (session, pushes) = connect(&self.app, &self.config, peer.key, peer.addr);
        peer.session = Some(session);
        peer.pushes = pushes;
        peer.subscribed.clear();
        peer.pushed.clear();
    }

    /// Hands one frame to the application as a connection does, and checks every answer that
    /// is ready.
    fn request(&mut self, index: usize, frame: Frame) {
        if self.peers[index].session.is_none() {
            self.reconnect(index);
        }
        if Handler::is_barrier(&self.app, &frame) {
            // A barrier is handed over only once every earlier answer has gone out.
            for _ in 0..MAX_POLLS {
                self.poll_answers(index);
            }
            assert!(
                self.peers[index].pipeline.is_empty(),
                "an answer never resolved"
            );
        }
        let peer = &mut self.peers[index];
        if let Some(Body::Subscribe(subscribe)) = &frame.body {
            peer.pushed.remove(&subscribe.device_id);
        }
        let session = peer.session.as_mut().expect("connected above");
        let answer = Handler::request(&self.app, session, frame.clone());
        let ready = match answer {
            Answer::None => None,
            Answer::Ready(out) => Some(out),
            Answer::Pending(mut pending) => match poll_now(pending.as_mut()) {
                Poll::Ready(out) if peer.pipeline.is_empty() => Some(out),
                Poll::Ready(out) => {
                    peer.pipeline
                        .push_back((frame, Box::pin(std::future::ready(out))));
                    return;
                }
                Poll::Pending => {
                    peer.pipeline.push_back((frame, pending));
                    return;
                }
            },
        };
        match ready {
            Some(out) if !peer.pipeline.is_empty() => {
                // Answers leave in request order.
                peer.pipeline
                    .push_back((frame, Box::pin(std::future::ready(out))));
            }
            ready => self.answered(index, &frame, ready),
        }
    }

    /// Takes the answers at the front of a session's pipeline that have resolved.
    fn poll_answers(&mut self, index: usize) {
        loop {
            let peer = &mut self.peers[index];
            let Some((_, pending)) = peer.pipeline.front_mut() else {
                return;
            };
            let Poll::Ready(out) = poll_now(pending.as_mut()) else {
                return;
            };
            let (frame, _) = peer.pipeline.pop_front().expect("looked above");
            self.answered(index, &frame, Some(out));
        }
    }

    /// Checks the answer to `request` and notes what it changed for the session.
    fn answered(&mut self, index: usize, request: &Frame, out: Option<Outgoing>) {
        let limit = self.config.max_frame_len as usize - TAG_LEN;
        let me = *self.peers[index].key.public().as_bytes();
        let answer = check_answer(request, out, limit);
        if super::tracing_enabled() {
            eprintln!("session {index}: {request:?}\n  -> {answer:?}");
        }
        let Some(answer) = answer else {
            return;
        };
        self.answers += 1;
        if matches!(answer.body, Some(Body::Error(_))) {
            self.errors += 1;
        }
        let peer = &mut self.peers[index];
        match (&request.body, &answer.body) {
            (Some(Body::Subscribe(subscribe)), Some(Body::Subscribed(subscribed))) => {
                assert_eq!(subscribed.device_id, subscribe.device_id);
                peer.subscribed.insert(subscribe.device_id);
            }
            (Some(Body::Register(register)), Some(Body::Registered(registered))) => {
                assert_eq!(registered.device_id, register.device_id);
                assert!(registered.one_time_prekeys as usize <= self.config.max_prekeys_per_device);
            }
            (Some(Body::Unregister(unregister)), Some(Body::Unregistered(unregistered))) => {
                assert_eq!(unregistered.device_id, unregister.device_id);
            }
            (Some(Body::UploadPreKeys(upload)), Some(Body::PreKeyCount(count))) => {
                assert_eq!(count.device_id, upload.device_id);
                assert!(count.count as usize <= self.config.max_prekeys_per_device);
            }
            (Some(Body::GetPreKeyCount(get)), Some(Body::PreKeyCount(count))) => {
                assert_eq!(count.device_id, get.device_id);
            }
            (Some(Body::FetchPreKeys(fetch)), Some(Body::PreKeyBundles(bundles))) => {
                let devices: Vec<u32> = bundles.bundles.iter().map(|b| b.device_id).collect();
                assert!(devices.windows(2).all(|w| w[0] < w[1]), "{devices:?}");
                assert!(!devices.is_empty());
                if !fetch.device_ids.is_empty() {
                    let mut asked = fetch.device_ids.clone();
                    asked.sort_unstable();
                    asked.dedup();
                    assert_eq!(devices, asked);
                }
            }
            (Some(Body::Send(_)), Some(Body::Sent(sent))) => assert!(sent.message_id >= 1),
            (Some(Body::GetMessage(get)), Some(Body::Deliver(deliver))) => {
                assert_eq!(deliver.message_id, get.message_id);
                assert_eq!(deliver.recipient_device, get.device_id);
                check_deliver(deliver);
            }
            (Some(Body::AckMessages(ack)), Some(Body::Acked(acked))) => {
                assert!(acked.deleted as usize <= ack.message_ids.len());
            }
            (Some(Body::CreateTicket(_)), Some(Body::Ticket(ticket))) => {
                assert_eq!(&ticket.identity[..], &me[..]);
                assert_eq!(&ticket.relay_pubkey[..], keys().relay.public().as_bytes());
                assert!(ticket.uses >= 1 && ticket.uses <= self.config.max_ticket_uses);
            }
            _ => {}
        }
    }

    /// Takes every queued push of every session and checks it.
    fn drain_pushes(&mut self) {
        let limit = self.config.max_frame_len as usize - TAG_LEN;
        let threshold = self.config.prekey_low_threshold;
        let mut slow = Vec::new();
        for (index, peer) in self.peers.iter_mut().enumerate() {
            while let Some(push) = peer.pushes.try_recv() {
                let out = match push {
                    Push::Out(out) => out,
                    Push::SlowConsumer => {
                        // The connection sends SLOW_CONSUMER and closes.
                        slow.push(index);
                        break;
                    }
                };
                let frame = sealable(out, limit);
                assert_eq!(frame.id, 0, "pushes carry frame id 0");
                match frame.body.expect("pushes have a body") {
                    Body::Deliver(deliver) => {
                        let device = deliver.recipient_device;
                        assert!(
                            peer.subscribed.contains(&device),
                            "push for device {device}"
                        );
                        let last = peer.pushed.insert(device, deliver.message_id);
                        assert!(
                            last.is_none_or(|last| last < deliver.message_id),
                            "device {device}: pushed {} after {last:?}",
                            deliver.message_id
                        );
                        check_deliver(&deliver);
                        self.pushed += 1;
                    }
                    Body::PreKeysLow(low) => assert!(low.count < threshold),
                    Body::Error(error) => {
                        assert_eq!(error.code(), ErrorCode::Replaced, "{error:?}")
                    }
                    other => panic!("unexpected push {other:?}"),
                }
            }
        }
        for index in slow {
            self.disconnect(index);
        }
    }
}

fn connect(
    app: &App,
    config: &Config,
    key: &KeyPair,
    addr: SocketAddr,
) -> (RelaySession, PushReceiver) {
    let (push, pushes) = push_channel(config.max_outbound_bytes);
    (Handler::connect(app, *key.public(), addr, push), pushes)
}

/// The frame of an answer or push, checked to fit the relay's frame limit, to encode as long
/// as it says, and to seal (as a connection seals it) into a frame that opens to exactly its
/// protobuf encoding.
fn sealable(out: Outgoing, limit: usize) -> Frame {
    let len = out.encoded_len();
    assert!(
        len <= limit,
        "a frame of {len} bytes exceeds the limit of {limit}"
    );
    let mut session = relay_session(std::time::Instant::now());
    out.seal(&mut session)
        .expect("an answer within the limit seals");
    let wire = session.poll_transmit().expect("a sealed frame");
    let opened = Opener::new(relay_keys())
        .open(bytes::BytesMut::from(&wire[4..]))
        .expect("a sealed answer opens");
    let frame = out.into_frame();
    assert_eq!(frame.encoded_len(), len, "encoded_len of {frame:?}");
    assert_eq!(&opened[..], &frame.encode_to_vec()[..], "sealed {frame:?}");
    frame
}

/// Every request gets exactly one answer with its id, except `Pong` and `Error` frames, which
/// get none; the answer is the request's answer kind or an error a request may get.
fn check_answer(request: &Frame, out: Option<Outgoing>, limit: usize) -> Option<Frame> {
    let unanswered = matches!(request.body, Some(Body::Pong(_) | Body::Error(_)));
    let Some(out) = out else {
        assert!(unanswered, "no answer to {request:?}");
        return None;
    };
    assert!(!unanswered, "{request:?} was answered");
    let answer = sealable(out, limit);
    assert_eq!(answer.id, request.id, "answer to {request:?}: {answer:?}");
    let body = answer.body.as_ref().expect("answers have a body");
    let expected = request.body.as_ref().and_then(answer_kind);
    if let Body::Error(error) = body {
        let code = ErrorCode::try_from(error.code).expect("a known error code");
        let allowed = match expected {
            None => code == ErrorCode::Unsupported,
            Some(_) if request.id == 0 => code == ErrorCode::BadRequest,
            Some(_) => !matches!(
                code,
                ErrorCode::Unspecified
                    | ErrorCode::Unsupported
                    | ErrorCode::PingFlood
                    | ErrorCode::SlowConsumer
                    | ErrorCode::Replaced
                    | ErrorCode::ShuttingDown
                    | ErrorCode::Timeout
                    // The store lives in memory: nothing can fail to be durable.
                    | ErrorCode::Internal
            ),
        };
        assert!(allowed, "{code:?} answers {request:?}: {error:?}");
        assert_eq!(error.retry_after_ms > 0, code == ErrorCode::RateLimited);
    } else {
        assert_eq!(Some(body.kind()), expected, "answer to {request:?}");
        assert_ne!(request.id, 0);
    }
    Some(answer)
}

/// A `Deliver` carries the hash of its payload and a sender that can send.
fn check_deliver(deliver: &botd_protocol::proto::Deliver) {
    assert_eq!(&deliver.payload_hash[..], &sha256(&[&deliver.payload])[..]);
    let keys = keys();
    assert!(
        deliver.sender[..] == keys.alice.public().as_bytes()[..]
            || deliver.sender[..] == keys.bob.public().as_bytes()[..],
        "sender {:?}",
        deliver.sender
    );
    assert!(deliver.message_id >= 1);
}

/// Points a request's identity fields at one of the harness's identities and makes a `Send`
/// well formed and signed by `me`, so that inputs reach the store.
fn fix_up(frame: &mut Frame, me: &KeyPair, pick: u8) {
    let keys = keys();
    let target = if pick & 1 == 0 {
        &keys.alice
    } else {
        &keys.bob
    };
    let target = Bytes::copy_from_slice(target.public().as_bytes());
    match &mut frame.body {
        Some(Body::Send(send)) => {
            send.recipient = target;
            let mut nonce = send.sender_nonce.to_vec();
            nonce.resize(8, pick);
            send.sender_nonce = nonce.into();
            send.payload_hash = Bytes::copy_from_slice(&sha256(&[&send.payload]));
            let digest = message_digest(
                me.public().as_bytes(),
                &send.recipient,
                send.recipient_device,
                &send.sender_nonce,
                &send.payload_hash,
            );
            send.sender_signature = Bytes::copy_from_slice(&me.sign(&digest));
        }
        Some(Body::FetchPreKeys(fetch)) => fetch.identity = target,
        Some(Body::AddContact(add)) => add.identity = target,
        Some(Body::RemoveContact(remove)) => remove.identity = target,
        _ => {}
    }
}

/// Requests from three sessions (alice twice, bob once) to a relay over the in-memory store.
/// Input: flags (u8: bit 0 small limits, bit 1 signature checks), then steps. A step is one
/// byte: `% 4` picks the session (3: a control step), bit 4 fixes up identities and signatures
/// (a u8 choice follows), and a chunk holds the plaintext. Control steps (bits 2-3): reconnect a
/// session, sweep, or nothing. Plaintexts that do not decode as a `Frame` are what the session
/// layer answers; they are skipped here. At the end, every answer must have resolved, and the
/// store's snapshot must rebuild exactly its state.
/// Rate limits, tickets and expiry follow the wall clock and the system's randomness, so the
/// outcome of one input can differ between runs; the checks hold either way.
pub fn relay_requests(data: &[u8]) -> Outcome {
    let mut input = Input::new(cap(data, 1 << 16));
    let mut world = World::new(input.u8());
    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        let index = usize::from(op % 4);
        if index == 3 {
            match (op >> 2) % 4 {
                0 => world.reconnect(usize::from(op >> 4) % 3),
                1 => {
                    let mut sweep = std::pin::pin!(world.app.sweep());
                    match poll_now(sweep.as_mut()) {
                        Poll::Ready(swept) => {
                            swept.expect("an in-memory sweep succeeds");
                        }
                        Poll::Pending => panic!("an in-memory sweep waits"),
                    }
                }
                _ => {}
            }
        } else {
            let pick = (op & 0x10 != 0).then(|| input.u8());
            let plaintext = input.chunk();
            if let Ok(mut frame) = Frame::decode(plaintext) {
                if let Some(pick) = pick {
                    fix_up(&mut frame, world.peers[index].key, pick);
                }
                world.request(index, frame);
            }
        }
        for index in 0..world.peers.len() {
            world.poll_answers(index);
        }
        world.drain_pushes();
    }
    for _ in 0..MAX_POLLS {
        for index in 0..world.peers.len() {
            world.poll_answers(index);
        }
    }
    for (index, peer) in world.peers.iter().enumerate() {
        assert!(
            peer.pipeline.is_empty(),
            "session {index}: an answer never resolved"
        );
    }
    world.drain_pushes();
    for index in 0..world.peers.len() {
        world.disconnect(index);
    }
    assert_snapshot_round_trip(world.app.store().state(), &world.config);
    format!(
        "{} answers ({} errors), {} pushed",
        world.answers, world.errors, world.pushed
    )
}
