//! The conformance suite checks itself: both roles against this crate's relay and client (no
//! FAIL beyond the cases of decided relay changes still pending), and broken relays and clients
//! built here, each caught by the case meant for it.

use std::sync::Arc;
use std::time::Duration;

use botd_protocol::codec::{encode_frame, FrameCodec};
use botd_protocol::keys::{KeyPair, PublicKeyBytes};
use botd_protocol::message::DeliverFrame;
use botd_protocol::proto::{Body, Frame};
use botd_relay::app::{Answer, Handler, Outgoing, PushHandle};
use botd_relay::relay::RelaySession;
use botd_tools::conformance::client::{serve_forever, Listener};
use botd_tools::conformance::faulty::Script;
use botd_tools::conformance::probe::Target;
use botd_tools::conformance::{relay, scenario, Report, Selection, Verdict};
use bytes::{Bytes, BytesMut};
type App = botd_relay::relay::Relay<botd_relay::store::embedded::EmbeddedStore>;
use parking_lot::Mutex;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Cases written to decided behaviour that today's relay does not have yet (see the report).
const PENDING_RELAY_CHANGES: &[&str] = &[];

/// The one place that starts this crate's relay (adapt here when its constructors change).
async fn start_our_relay() -> (botd_relay::testing::LoopbackRelay, Arc<App>) {
    botd_relay::testing::start_relay(botd_relay::testing::loopback_config()).await
}

fn target(addr: std::net::SocketAddr, key: PublicKeyBytes) -> Target {
    Target::new(addr, key)
}

async fn run_cases(t: Target, ids: &[&str]) -> Report {
    let sel = Selection {
        cases: ids.iter().map(|s| s.to_string()).collect(),
        ..Selection::default()
    };
    relay::run(t, &sel, 4, |_| {}).await
}

fn assert_verdict(r: &Report, id: &str, want: Verdict) {
    let case = r.case(id).unwrap_or_else(|| panic!("{id} did not run"));
    assert_eq!(
        case.outcome.verdict, want,
        "{id}: {} ({:?})",
        case.outcome.detail, case.log
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_role_passes_against_our_relay() {
    let (r, _app) = start_our_relay().await;
    let report = relay::run(target(r.addr, r.key), &Selection::default(), 8, |_| {}).await;
    assert!(report.cases.len() >= 150);
    let failed: Vec<_> = report
        .ids_with(Verdict::Fail)
        .into_iter()
        .filter(|id| !PENDING_RELAY_CHANGES.contains(id))
        .map(|id| (id, report.case(id).map(|c| c.outcome.detail.clone())))
        .collect();
    assert!(failed.is_empty(), "unexpected failures: {failed:?}");
    assert!(report.ids_with(Verdict::NonStrict).is_empty());
    for id in PENDING_RELAY_CHANGES {
        assert_eq!(
            report.verdict(id),
            Some(Verdict::Fail),
            "{id} now passes: update the list"
        );
    }
}

/// Runs `ids` against our relay configured by `config`, with the matching `--assume` values;
/// each must pass.
async fn passes_with_limits(
    config: impl FnOnce(&mut botd_relay::config::Config),
    assume: &str,
    ids: &[&str],
) {
    let mut c = botd_relay::testing::loopback_config();
    config(&mut c);
    let (r, _app) = botd_relay::testing::start_relay(c).await;
    let mut t = target(r.addr, r.key);
    t.assume = botd_tools::conformance::Assumptions::parse([assume]).unwrap();
    let report = run_cases(t, ids).await;
    for id in ids {
        assert_verdict(&report, id, Verdict::Pass);
    }
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_role_cases_that_need_small_limits_pass_against_our_relay() {
    passes_with_limits(
        |c| {
            c.mailbox_max_messages = 20;
            c.mailbox_max_bytes = 1 << 20;
            c.max_contacts = 10;
            c.max_tickets_per_identity = 20;
        },
        "mailbox_max_messages=20 mailbox_max_bytes=1048576 max_contacts=10 max_tickets_per_identity=20",
        &[
            "8.3/mailbox-full-messages",
            "8.3/mailbox-full-bytes",
            "8.3/contacts-full-ticket",
            "8.6/ticket-limit",
        ],
    )
    .await;
    // Each fills the relay's storage, so each gets a relay of its own.
    for case in ["8.3/identity-quota", "8.3/relay-quota"] {
        passes_with_limits(
            |c| {
                c.max_identity_stored_bytes = 1 << 20;
                c.max_stored_bytes = 3 << 20;
            },
            "max_identity_stored_bytes=1048576 max_stored_bytes=3145728",
            &[case],
        )
        .await;
    }
    passes_with_limits(
        |c| c.max_identities = 12,
        "max_identities=12",
        &["8.2/register-identities-quota"],
    )
    .await;
    passes_with_limits(
        |c| c.max_rate_limited_keys = 8,
        "max_rate_limited_keys=8",
        &["8.1/limiter-keys-full"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_role_passes_for_our_client() {
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), KeyPair::generate())
        .await
        .unwrap();
    let (addr, key) = (listener.local_addr(), listener.key());
    let cases = botd_tools::conformance::client::cases().len() as u32;
    let node = tokio::spawn(async move {
        // One run per case, and one more for the reconnection after SLOW_CONSUMER.
        for _ in 0..=cases {
            let _ = scenario::run(addr, key, &scenario::Options::default()).await;
        }
    });
    let report = listener
        .run(&Selection::default(), Duration::from_secs(15), |_| {})
        .await;
    node.abort();
    let bad: Vec<_> = report
        .cases
        .iter()
        .filter(|c| {
            matches!(
                c.outcome.verdict,
                Verdict::Fail | Verdict::NonStrict | Verdict::Skip
            )
        })
        .map(|c| (c.id.clone(), c.outcome.detail.clone()))
        .collect();
    assert!(bad.is_empty(), "{bad:?}");
}

// --- broken relays built from core::* (the client role's misbehaving relay) -----------------

async fn scripted(script: Script) -> Target {
    let identity = KeyPair::generate();
    let key = *identity.public();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_forever(listener, identity, script));
    target(addr, key)
}

/// `id` passes against the correct scripted relay and fails against the broken one.
async fn caught(script: Script, id: &str) {
    let good = run_cases(scripted(Script::default()).await, &[id]).await;
    assert_verdict(&good, id, Verdict::Pass);
    let broken = run_cases(scripted(script).await, &[id]).await;
    assert_verdict(&broken, id, Verdict::Fail);
}

#[tokio::test]
async fn relay_accepting_high_s_is_caught() {
    caught(
        Script {
            accept_high_s: true,
            ..Default::default()
        },
        "4.2/high-s-signature",
    )
    .await;
}

#[tokio::test]
async fn relay_ignoring_the_recipient_is_caught() {
    caught(
        Script {
            skip_recipient_check: true,
            ..Default::default()
        },
        "4.2/wrong-recipient",
    )
    .await;
}

#[tokio::test]
async fn relay_without_replay_cache_is_caught() {
    caught(
        Script {
            no_replay_cache: true,
            ..Default::default()
        },
        "4.2/replayed-ephemeral",
    )
    .await;
}

#[tokio::test]
async fn relay_skipping_the_tag_check_is_caught() {
    caught(
        Script {
            skip_tag_check: true,
            ..Default::default()
        },
        "6.2/bad-tag",
    )
    .await;
}

#[tokio::test]
async fn relay_rotating_at_1025_is_caught() {
    let script = Script {
        rotate_shift: Some(1),
        ..Default::default()
    };
    caught(script.clone(), "6.3/rotation-r2i").await;
    // Its own direction is not the one at fault.
    let r = run_cases(scripted(script).await, &["6.3/rotation-i2r"]).await;
    assert_verdict(&r, "6.3/rotation-i2r", Verdict::Pass);
}

#[tokio::test]
async fn relay_answering_a_ping_flood_is_caught() {
    caught(
        Script {
            answer_ping_flood: true,
            ..Default::default()
        },
        "7.3/ping-flood",
    )
    .await;
}

#[tokio::test]
async fn relay_announcing_another_key_is_caught() {
    caught(
        Script {
            welcome_other_key: true,
            ..Default::default()
        },
        "7.2/welcome-relay-pubkey",
    )
    .await;
}

// --- broken relays wrapping our relay application (net::Handler) ---------------------------

#[derive(Clone, Copy, PartialEq)]
enum Breakage {
    /// Hands out the same one-time prekey again for a repeated fetch.
    PrekeyTwice,
    /// Serves GetMessage from other identities' mailboxes.
    CrossMailbox,
    /// Executes requests sent with frame id 0.
    ExecutesIdZero,
    /// Replaces a wrong payload_hash by the right one.
    IgnoresHash,
    /// Stores every resend as a new message.
    NoDeduplication,
    /// Answers the node's Error frames.
    AnswersErrors,
    /// Cuts AckMessages lists to 4096 ids instead of refusing them.
    TruncatesAcks,
    /// Refuses a Register of device 0 before its rate limit is checked.
    ValidatesBeforeLimiting,
}

/// Fetch requests (encoded) and the answers first given to them.
type Fetches = Arc<Mutex<Vec<(Vec<u8>, Frame)>>>;

struct Broken {
    app: Arc<App>,
    breakage: Breakage,
    fetches: Fetches,
    identities: Arc<Mutex<Vec<PublicKeyBytes>>>,
}

/// What an answer resolves to.
async fn settle(answer: Answer) -> Option<Outgoing> {
    match answer {
        Answer::None => None,
        Answer::Ready(out) => Some(out),
        Answer::Pending(pending) => Some(pending.await),
    }
}

fn with_id(out: Outgoing, id: u64) -> Outgoing {
    match out {
        Outgoing::Frame(frame) => Outgoing::Frame(Frame { id, ..frame }),
        Outgoing::Deliver(deliver) => Outgoing::Deliver(DeliverFrame {
            frame_id: id,
            ..deliver
        }),
    }
}

impl Handler for Broken {
    type Session = (RelaySession, PublicKeyBytes);

    fn connect(
        &self,
        peer: PublicKeyBytes,
        addr: std::net::SocketAddr,
        push: PushHandle,
    ) -> Self::Session {
        self.identities.lock().push(peer);
        (self.app.connect(peer, addr, push), peer)
    }

    fn request(&self, session: &mut Self::Session, mut frame: Frame) -> Answer {
        match (self.breakage, &mut frame.body) {
            (Breakage::PrekeyTwice, Some(Body::FetchPreKeys(f))) => {
                let key = f.encode_to_vec();
                if let Some((_, cached)) = self.fetches.lock().iter().find(|(k, _)| *k == key) {
                    return Answer::frame(Frame {
                        id: frame.id,
                        ..cached.clone()
                    });
                }
                let answer = self.app.request(&mut session.0, frame);
                let fetches = self.fetches.clone();
                return Answer::pending(async move {
                    let out = settle(answer).await.expect("a fetch is answered");
                    fetches.lock().push((key, out.clone().into_frame()));
                    out
                });
            }
            (Breakage::CrossMailbox, Some(Body::GetMessage(_))) => {
                let answer = self.app.request(&mut session.0, frame.clone());
                let (app, identities, me) = (self.app.clone(), self.identities.clone(), session.1);
                return Answer::pending(async move {
                    let out = settle(answer).await.expect("a get is answered");
                    if !matches!(
                        &out,
                        Outgoing::Frame(Frame {
                            body: Some(Body::Error(_)),
                            ..
                        })
                    ) {
                        return out;
                    }
                    let others: Vec<_> = identities
                        .lock()
                        .iter()
                        .copied()
                        .filter(|k| *k != me)
                        .collect();
                    for other in others {
                        let (push, _rx) = botd_relay::app::push_channel(1 << 20);
                        let mut s = app.connect(other, "127.0.0.1:1".parse().unwrap(), push);
                        let theirs = settle(app.request(&mut s, frame.clone())).await;
                        app.disconnect(s);
                        if let Some(found @ Outgoing::Deliver { .. }) = theirs {
                            return found;
                        }
                    }
                    out
                });
            }
            (Breakage::ExecutesIdZero, Some(_)) if frame.id == 0 => {
                frame.id = u64::MAX;
                let answer = self.app.request(&mut session.0, frame);
                return Answer::pending(async move {
                    let out = settle(answer).await.expect("a request is answered");
                    if out.frame_id() == u64::MAX {
                        with_id(out, 0)
                    } else {
                        out
                    }
                });
            }
            (Breakage::IgnoresHash, Some(Body::Send(s))) => {
                s.payload_hash =
                    Bytes::copy_from_slice(&botd_protocol::keys::sha256(&[&s.payload]));
            }
            (Breakage::NoDeduplication, Some(Body::Send(s))) => {
                s.sender_nonce = Bytes::copy_from_slice(&rand::random::<[u8; 8]>());
            }
            (Breakage::AnswersErrors, Some(Body::Error(_))) => {
                return Answer::frame(Frame::error(
                    frame.id,
                    botd_protocol::proto::ErrorCode::Unsupported,
                    "answering an error",
                ));
            }
            (Breakage::TruncatesAcks, Some(Body::AckMessages(a))) => a.message_ids.truncate(4096),
            (Breakage::ValidatesBeforeLimiting, Some(Body::Register(r))) if r.device_id == 0 => {
                return Answer::frame(Frame::error(
                    frame.id,
                    botd_protocol::proto::ErrorCode::BadRequest,
                    "device_id must be at least 1",
                ));
            }
            _ => {}
        }
        self.app.request(&mut session.0, frame)
    }

    fn is_barrier(&self, frame: &Frame) -> bool {
        self.app.is_barrier(frame)
    }

    fn max_pipelined(&self) -> usize {
        self.app.max_pipelined()
    }

    fn resume(&self, session: &mut Self::Session) {
        self.app.resume(&mut session.0)
    }

    fn disconnect(&self, session: Self::Session) {
        self.app.disconnect(session.0)
    }
}

async fn broken_relay(breakage: Breakage) -> botd_relay::testing::LoopbackRelay {
    let config = botd_relay::testing::loopback_config();
    let identity = KeyPair::generate();
    let app = botd_relay::testing::in_memory_app(&config, *identity.public());
    let handler = Broken {
        app,
        breakage,
        fetches: Arc::default(),
        identities: Arc::default(),
    };
    botd_relay::testing::start_as(config, identity, handler).await
}

async fn caught_by(breakage: Breakage, id: &str) {
    let r = broken_relay(breakage).await;
    let report = run_cases(target(r.addr, r.key), &[id]).await;
    assert_verdict(&report, id, Verdict::Fail);
    r.stop().await;
}

#[tokio::test]
async fn relay_handing_out_a_prekey_twice_is_caught() {
    caught_by(Breakage::PrekeyTwice, "8.2/one-time-prekey-once").await;
}

#[tokio::test]
async fn relay_letting_a_session_read_another_mailbox_is_caught() {
    caught_by(Breakage::CrossMailbox, "8.1/own-mailbox-only-get").await;
}

#[tokio::test]
async fn relay_executing_id_zero_requests_is_caught() {
    caught_by(Breakage::ExecutesIdZero, "8.1/request-id-0").await;
}

#[tokio::test]
async fn relay_ignoring_the_payload_hash_is_caught() {
    caught_by(Breakage::IgnoresHash, "8.3/payload-hash-mismatch").await;
}

#[tokio::test]
async fn relay_without_idempotent_sends_is_caught() {
    caught_by(Breakage::NoDeduplication, "8.3/idempotent-resend").await;
}

#[tokio::test]
async fn relay_answering_errors_is_caught() {
    caught_by(Breakage::AnswersErrors, "7.1/error-not-answered").await;
}

#[tokio::test]
async fn relay_truncating_ack_lists_is_caught() {
    caught_by(Breakage::TruncatesAcks, "8.4/ack-4097-ids").await;
}

#[tokio::test]
async fn relay_validating_before_rate_limiting_is_caught() {
    caught_by(Breakage::ValidatesBeforeLimiting, "8.1/change-rate-limit").await;
}

// --- a broken client --------------------------------------------------------------------------

/// A node that takes any `Ack` (no init_id, key or signature check) and goes on.
async fn credulous_node(addr: std::net::SocketAddr, relay: PublicKeyBytes) {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return;
    };
    let me = KeyPair::generate();
    let eph = KeyPair::generate();
    let parts = botd_tools::conformance::wire::InitParts::new(&me, &eph, &relay);
    let _ = stream.write_all(&encode_frame(&parts.encode())).await;
    let mut buf = BytesMut::new();
    let mut codec = FrameCodec::new(1024);
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            if let Ok(Some(_ack)) = codec.decode(&mut buf) {
                break;
            }
            if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return;
            }
        }
        // Sends a "request" without checking anything: 40 bytes of noise as a frame, and
        // stays until the listener has judged it and closes (closing first could turn the
        // close into a reset that loses the noise).
        let _ = stream.write_all(&encode_frame(&[0x42; 40])).await;
        for _ in 0..1_000 {
            if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return;
            }
            buf.clear();
        }
    })
    .await;
}

#[tokio::test]
async fn client_accepting_an_ack_for_another_init_is_caught() {
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), KeyPair::generate())
        .await
        .unwrap();
    let (addr, key) = (listener.local_addr(), listener.key());
    let ids = ["4.5/ack-wrong-init-id", "4.5/ack-high-s"];
    let node = tokio::spawn(async move {
        for _ in 0..ids.len() {
            credulous_node(addr, key).await;
        }
    });
    let sel = Selection {
        cases: ids.iter().map(|s| s.to_string()).collect(),
        ..Selection::default()
    };
    let report = listener.run(&sel, Duration::from_secs(5), |_| {}).await;
    node.abort();
    for id in ids {
        assert_verdict(&report, id, Verdict::Fail);
    }
}
