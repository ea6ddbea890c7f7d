//! The conformance suite checks itself: both roles against this crate's relay and client (no
//! FAIL beyond the cases of decided relay changes still pending), and a corpus of peers with
//! one planted defect each (a relay or a node breaking one rule of PROTOCOL.md), each caught by
//! the case meant for it. docs/CONFORMANCE.md lists the corpus.

#[path = "conformance/faulty_handler.rs"]
mod faulty_handler;
#[path = "conformance/faulty_store.rs"]
mod faulty_store;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use botd_protocol::codec::{encode_frame, FrameCodec};
use botd_protocol::keys::{KeyPair, PublicKeyBytes};
use botd_protocol::proto::{self, Body, ErrorCode, Frame, Ping, Pong};
use botd_relay::config::Config;
use botd_tools::conformance::client::{serve_forever, Listener};
use botd_tools::conformance::faulty::{AckFault, First, Script};
use botd_tools::conformance::probe::{registration, Probe, Target};
use botd_tools::conformance::scenario::NodeFaults;
use botd_tools::conformance::{relay, scenario, Assumptions, Log, Report, Selection, Verdict};
use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use faulty_handler::{Faulty, HandlerFault};
use faulty_store::{FaultyStore, StoreFault};

type App = botd_relay::relay::Relay<botd_relay::store::embedded::EmbeddedStore>;

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
async fn passes_with_limits(config: impl FnOnce(&mut Config), assume: &str, ids: &[&str]) {
    let mut c = botd_relay::testing::loopback_config();
    config(&mut c);
    let (r, app) = botd_relay::testing::start_relay(c).await;
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(app.run_maintenance(stop.clone()));
    let mut t = target(r.addr, r.key);
    t.assume = Assumptions::parse([assume]).unwrap();
    let report = run_cases(t, ids).await;
    for id in ids {
        assert_verdict(&report, id, Verdict::Pass);
    }
    r.stop().await;
    stop.cancel();
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
    passes_with_limits(
        |c| c.max_rate_limited_keys = 40,
        "max_rate_limited_keys=40",
        &["8.1/limiter-keys-full"],
    )
    .await;
}

/// Short timers and lifetimes (a test setup, PROTOCOL.md §7.5): the cases that wait for them.
fn short_timers(c: &mut Config) {
    c.ping_min_interval = Duration::from_secs(1);
    c.ping_interval = Duration::from_secs(2);
    c.pong_timeout = Duration::from_secs(2);
    c.idle_timeout = Duration::from_secs(5);
}
const SHORT_TIMERS: &str = "pong_timeout_ms=2000";

fn short_lifetimes(c: &mut Config) {
    c.message_ttl = Duration::from_secs(2);
    c.account_ttl = Duration::from_secs(3);
    c.expiry_interval = Duration::from_millis(500);
}
const SHORT_LIFETIMES: &str = "message_ttl_ms=2000 account_ttl_ms=3000 expiry_interval_ms=500";

const TIMER_CASES: &[&str] = &[
    "7.2/welcome-ping-min-interval",
    "7.2/welcome-timers",
    "7.3/ping-inside-window",
    "7.3/ping-after-interval",
    "7.3/probe-ping",
    "7.3/pong-timeout",
    "7.3/wrong-pong-ignored",
    "7.3/idle-timeout",
    "7.3/idle-restarted-by-frames",
    "7.3/pong-restarts-probe-timer",
];
const LIFETIME_CASES: &[&str] = &[
    "8.5/message-expiry",
    "8.6/account-ttl",
    "8.6/account-kept-while-connected",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_role_timer_cases_pass_against_our_relay_with_short_timers() {
    passes_with_limits(short_timers, SHORT_TIMERS, TIMER_CASES).await;
    passes_with_limits(short_lifetimes, SHORT_LIFETIMES, LIFETIME_CASES).await;
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

// --- the corpus: one planted defect per peer ------------------------------------------------

/// A peer with one planted defect, and the case that must fail against it.
struct Planted {
    name: &'static str,
    case: &'static str,
    peer: Peer,
}

enum Peer {
    /// Our relay with a faulty handler or store, configured by `config`, run with `assume`.
    Relay {
        handler: HandlerFault,
        store: StoreFault,
        config: fn(&mut Config),
        assume: &'static str,
    },
    /// The scripted relay of the client role (faulty.rs): `good` passes the case, `broken`
    /// fails it.
    Script {
        good: fn() -> Script,
        broken: fn() -> Script,
    },
    /// A node for the client role.
    Node(Node),
}

#[derive(Clone, Copy)]
enum Node {
    /// The scenario with one rule broken (scenario::NodeFaults, by name).
    Scenario,
    /// Takes any `Ack` and goes on.
    Credulous,
    /// A node written with the suite's probe, breaking a rule the client library keeps.
    Raw(fn(Target) -> Pin<Box<dyn Future<Output = ()> + Send>>),
}

fn no_config(_: &mut Config) {}

fn handler(name: &'static str, case: &'static str, fault: HandlerFault) -> Planted {
    Planted {
        name,
        case,
        peer: Peer::Relay {
            handler: fault,
            store: StoreFault::None,
            config: no_config,
            assume: "",
        },
    }
}

fn store(name: &'static str, case: &'static str, fault: StoreFault) -> Planted {
    Planted {
        name,
        case,
        peer: Peer::Relay {
            handler: HandlerFault::None,
            store: fault,
            config: no_config,
            assume: "",
        },
    }
}

impl Planted {
    /// The relay runs with `config`, and the suite with `assume`.
    fn with(mut self, config: fn(&mut Config), assume: &'static str) -> Self {
        if let Peer::Relay {
            config: c,
            assume: a,
            ..
        } = &mut self.peer
        {
            *c = config;
            *a = assume;
        }
        self
    }
}

fn script(
    name: &'static str,
    case: &'static str,
    good: fn() -> Script,
    broken: fn() -> Script,
) -> Planted {
    Planted {
        name,
        case,
        peer: Peer::Script { good, broken },
    }
}

fn node(name: &'static str, case: &'static str, kind: Node) -> Planted {
    Planted {
        name,
        case,
        peer: Peer::Node(kind),
    }
}

fn small_mailboxes(c: &mut Config) {
    c.mailbox_max_messages = 20;
    c.max_contacts = 10;
}
const SMALL_MAILBOXES: &str = "mailbox_max_messages=20 max_contacts=10";

fn small_quotas(c: &mut Config) {
    c.max_identity_stored_bytes = 1 << 20;
    c.max_stored_bytes = 3 << 20;
}
const SMALL_QUOTAS: &str = "max_identity_stored_bytes=1048576 max_stored_bytes=3145728";

fn twenty_devices(c: &mut Config) {
    c.max_devices_per_identity = 20;
}

fn one_second_window() -> Script {
    Script {
        welcome_ping_min_interval_ms: Some(1000),
        ..Default::default()
    }
}

/// Every planted defect of a relay.
fn relay_corpus() -> Vec<Planted> {
    use HandlerFault as H;
    use StoreFault as S;
    vec![
        // §2–§7 on the scripted relay.
        script(
            "accepts-high-s-init",
            "4.2/high-s-signature",
            Script::default,
            || Script {
                accept_high_s: true,
                ..Default::default()
            },
        ),
        script(
            "ignores-init-recipient",
            "4.2/wrong-recipient",
            Script::default,
            || Script {
                skip_recipient_check: true,
                ..Default::default()
            },
        ),
        script(
            "no-replay-cache",
            "4.2/replayed-ephemeral",
            Script::default,
            || Script {
                no_replay_cache: true,
                ..Default::default()
            },
        ),
        script(
            "handshake-limit-2048",
            "3/handshake-frame-1025",
            Script::default,
            || Script {
                handshake_limit: Some(2048),
                ..Default::default()
            },
        ),
        script(
            "session-limit-doubled",
            "3/session-frame-over-limit",
            Script::default,
            || Script {
                accept_oversize_frames: true,
                ..Default::default()
            },
        ),
        script(
            "ack-for-another-init",
            "4.4/ack-init-id",
            Script::default,
            || Script {
                ack: AckFault::WrongInitId,
                ..Default::default()
            },
        ),
        script("ack-high-s", "4.4/ack-valid", Script::default, || Script {
            ack: AckFault::HighS,
            ..Default::default()
        }),
        script(
            "ack-signed-by-another-key",
            "4.4/ack-valid",
            Script::default,
            || Script {
                ack: AckFault::OtherKey,
                ..Default::default()
            },
        ),
        script("ack-empty-id", "4.4/ack-valid", Script::default, || {
            Script {
                ack: AckFault::EmptyId,
                ..Default::default()
            }
        }),
        script(
            "first-frame-not-welcome",
            "7.2/welcome-first",
            Script::default,
            || Script {
                first: First::ErrorFrame,
                ..Default::default()
            },
        ),
        script("welcome-bad-tag", "5/key-schedule", Script::default, || {
            Script {
                first: First::BadTagWelcome,
                ..Default::default()
            }
        }),
        script("skips-tag-check", "6.2/bad-tag", Script::default, || {
            Script {
                skip_tag_check: true,
                ..Default::default()
            }
        }),
        script("rotates-late", "6.3/rotation-r2i", Script::default, || {
            Script {
                rotate_shift: Some(1),
                ..Default::default()
            }
        }),
        script(
            "announces-another-key",
            "7.2/welcome-relay-pubkey",
            Script::default,
            || Script {
                welcome_other_key: true,
                ..Default::default()
            },
        ),
        script(
            "frame-limit-below-payload",
            "7.2/welcome-frame-limits",
            Script::default,
            || Script {
                welcome_max_frame_len: Some(2048),
                ..Default::default()
            },
        ),
        script(
            "ping-window-below-1s",
            "7.2/welcome-ping-min-interval",
            Script::default,
            || Script {
                welcome_ping_min_interval_ms: Some(500),
                ..Default::default()
            },
        ),
        script(
            "answers-pongs",
            "7.1/pong-not-answered",
            Script::default,
            || Script {
                answer_pongs: true,
                ..Default::default()
            },
        ),
        script(
            "answers-ping-floods",
            "7.3/ping-flood",
            Script::default,
            || Script {
                answer_ping_flood: true,
                ..Default::default()
            },
        ),
        script(
            "enforces-30s-announces-1s",
            "7.3/ping-after-interval",
            one_second_window,
            || Script {
                welcome_ping_min_interval_ms: Some(1000),
                enforced_ping_window: Some(Duration::from_secs(30)),
                ..Default::default()
            },
        ),
        script(
            "enforces-no-window",
            "7.3/ping-inside-window",
            one_second_window,
            || Script {
                welcome_ping_min_interval_ms: Some(1000),
                enforced_ping_window: Some(Duration::ZERO),
                ..Default::default()
            },
        ),
        script(
            "answers-long-ping-ids",
            "7.3/ping-id-65-bytes",
            Script::default,
            || Script {
                accept_long_ping_ids: true,
                ..Default::default()
            },
        ),
        script(
            "pong-names-another-ping",
            "7.3/ping-answered",
            Script::default,
            || Script {
                pong_wrong_ping_id: true,
                ..Default::default()
            },
        ),
        // §7.1 and §8.1 in our relay.
        handler("answers-errors", "7.1/error-not-answered", H::AnswersErrors),
        script(
            "no-body-bad-request",
            "7.1/no-body",
            Script::default,
            || Script {
                unsupported_as_bad_request: true,
                ..Default::default()
            },
        ),
        handler(
            "serves-non-requests",
            "7.1/non-request-sent",
            H::NonRequestServed,
        ),
        handler(
            "retry-after-on-errors",
            "7.4/retry-after-zero",
            H::RetryAfterOnErrors,
        ),
        handler("executes-id-0", "8.1/request-id-0", H::ExecutesIdZero),
        handler(
            "validates-before-rate-limiting",
            "8.1/change-rate-limit",
            H::ValidatesBeforeLimiting,
        ),
        handler(
            "reads-other-identities-mailboxes",
            "8.1/own-mailbox-only-get",
            H::CrossMailbox,
        ),
        handler(
            "registers-device-0",
            "8.1/device-0-register",
            H::DeviceZeroRegistered,
        ),
        handler(
            "sender-device-0-bad-request",
            "8.1/device-0-send-sender",
            H::SenderDeviceZeroBadRequest,
        ),
        // §8.2
        handler("registered-count-0", "8.2/register", H::RegisteredCountZero),
        handler(
            "cuts-long-identity-key",
            "8.2/register-identity-key-too-long",
            H::IdentityKeyCut,
        ),
        handler(
            "makes-up-signed-prekey",
            "8.2/register-no-signed-prekey",
            H::SignedPrekeyMadeUp,
        ),
        handler(
            "cuts-prekey-lists",
            "8.2/register-too-many-prekeys",
            H::PrekeysCut,
        ),
        handler(
            "merges-prekey-ids",
            "8.2/register-duplicate-prekey-ids",
            H::PrekeyIdsMerged,
        ),
        handler(
            "moves-uploaded-ids",
            "8.2/upload-id-stored",
            H::UploadIdsMoved,
        ),
        handler(
            "unregistered-device-1",
            "8.2/unregister",
            H::UnregisteredDeviceOne,
        ),
        handler(
            "prekey-count-device-1",
            "8.2/get-prekey-count",
            H::PreKeyCountDeviceOne,
        ),
        handler(
            "upload-count-before",
            "8.2/upload-prekeys",
            H::UploadCountBefore,
        ),
        handler(
            "bundles-reversed",
            "8.2/fetch-device-order",
            H::BundlesReversed,
        ),
        handler("fetch-cap-16", "8.2/fetch-max-entries", H::FetchCapSixteen)
            .with(twenty_devices, "max_devices_per_identity=20"),
        handler(
            "fetch-without-cap",
            "8.2/fetch-too-many-entries",
            H::FetchNoCap,
        ),
        handler(
            "refuses-own-fetch",
            "8.2/fetch-own-identity",
            H::FetchOwnRefused,
        ),
        handler(
            "prekey-handed-twice",
            "8.2/one-time-prekey-once",
            H::PrekeyTwice,
        ),
        store("no-prekeys-low", "8.2/prekeys-low", S::NoPrekeysLow),
        // §8.3
        handler(
            "ignores-payload-hash",
            "8.3/payload-hash-mismatch",
            H::IgnoresHash,
        ),
        handler(
            "payload-limit-off-by-one",
            "8.3/payload-at-limit",
            H::PayloadLimitOffByOne,
        ),
        handler(
            "refuses-empty-payload",
            "8.3/empty-payload",
            H::EmptyPayloadRefused,
        ),
        handler(
            "cuts-34-byte-recipient",
            "8.3/recipient-34-bytes",
            H::RecipientCut,
        ),
        handler("cuts-9-byte-nonce", "8.3/nonce-9-bytes", H::NonceCut),
        handler(
            "ignores-ticket-length",
            "8.3/ticket-15-bytes",
            H::TicketLengthIgnored,
        ),
        handler(
            "recipient-before-payload-length",
            "8.3/order-too-large-before-bad-request",
            H::RecipientBeforePayloadLength,
        ),
        handler(
            "unknown-recipient-before-sender-device",
            "8.3/order-not-registered-before-unknown-recipient",
            H::NotRegisteredAsUnknownRecipient,
        ),
        handler(
            "no-idempotent-sends",
            "8.3/idempotent-resend",
            H::NoDeduplication,
        ),
        handler(
            "duplicate-flag-lost",
            "8.3/idempotent-resend",
            H::DuplicateFlagLost,
        ),
        store(
            "duplicates-by-nonce-alone",
            "8.3/nonce-per-sender",
            S::DuplicateByNonceOnly,
        ),
        store(
            "duplicates-per-sender-device",
            "8.3/nonce-per-identity",
            S::DuplicatePerSenderDevice,
        ),
        store(
            "duplicates-across-devices",
            "8.3/nonce-per-device-mailbox",
            S::DuplicateAcrossDevices,
        ),
        handler(
            "retry-after-0",
            "8.3/pair-rate-limit",
            H::RateLimitedRetryAfterZero,
        ),
        handler(
            "ignores-policy",
            "8.3/forbidden-without-ticket",
            H::PolicyIgnored,
        ),
        handler("drops-tickets", "8.3/ticket-admits", H::TicketDropped),
        handler(
            "add-contact-does-nothing",
            "8.3/contact-admitted",
            H::AddContactNoop,
        ),
        handler(
            "remove-contact-does-nothing",
            "8.3/removed-contact-forbidden",
            H::RemoveContactNoop,
        ),
        handler(
            "forbids-self-send",
            "8.3/self-send-contacts-only",
            H::SelfSendForbidden,
        ),
        store(
            "mailbox-full-as-quota",
            "8.3/mailbox-full-messages",
            S::MailboxFullAsQuota,
        )
        .with(small_mailboxes, SMALL_MAILBOXES),
        store(
            "contacts-full-as-quota",
            "8.3/contacts-full-ticket",
            S::ContactsFullAsQuota,
        )
        .with(small_mailboxes, SMALL_MAILBOXES),
        store(
            "quota-as-mailbox-full",
            "8.3/identity-quota",
            S::QuotaAsMailboxFull,
        )
        .with(small_quotas, SMALL_QUOTAS),
        // §8.4
        store(
            "acks-across-devices",
            "8.4/ack-one-mailbox",
            S::AckAcrossDevices,
        ),
        store(
            "gets-across-devices",
            "8.4/get-message-one-mailbox",
            S::GetAcrossDevices,
        ),
        store(
            "reads-across-devices",
            "8.4/subscribe-one-mailbox",
            S::ReadAcrossDevices,
        ),
        store(
            "last-id-of-identity",
            "8.4/subscribed-last-id",
            S::LastIdOfIdentity,
        ),
        handler(
            "subscribed-device-1",
            "8.4/subscribed-last-id",
            H::SubscribedDeviceOne,
        ),
        store(
            "sender-device-lost",
            "8.4/deliver-fields",
            S::SenderDeviceOne,
        ),
        store("no-live-delivery", "8.4/live-delivery", S::NoLiveDelivery),
        store("acks-free-no-place", "8.4/window", S::NoRemovedEvents),
        handler(
            "subscribes-unregistered-device",
            "8.4/subscribe-not-registered",
            H::SubscribeUnregistered,
        ),
        handler(
            "not-found-as-not-registered",
            "8.4/get-message-not-found",
            H::NotFoundAsNotRegistered,
        ),
        handler("ack-counts-listed-ids", "8.4/ack", H::AckCountsListed),
        handler("truncates-ack-lists", "8.4/ack-4097-ids", H::TruncatesAcks),
        handler("refuses-4096-acks", "8.4/ack-4096-ids", H::RefusesAck4096),
        // §8.5
        store("received-at-0", "8.5/received-at", S::ReceivedAtZero),
        store(
            "messages-never-expire",
            "8.5/message-expiry",
            S::MessagesNeverExpire,
        )
        .with(short_lifetimes, SHORT_LIFETIMES),
        // §8.6
        handler(
            "unknown-policy-accepted",
            "8.6/set-policy-unknown-value",
            H::UnknownPolicyAccepted,
        ),
        handler(
            "set-policy-without-device",
            "8.6/set-policy-not-registered",
            H::SetPolicyUnregistered,
        ),
        handler(
            "accepts-32-byte-contact",
            "8.6/add-contact-32-bytes",
            H::ShortContactAccepted,
        ),
        handler(
            "cuts-ticket-lifetime",
            "8.6/create-ticket-ttl-too-long",
            H::TicketTtlCut,
        ),
        handler(
            "cuts-ticket-uses",
            "8.6/create-ticket-too-many-uses",
            H::TicketUsesCut,
        ),
        handler(
            "ticket-uses-1",
            "8.6/create-ticket-fields",
            H::TicketUsesOne,
        ),
        handler(
            "ticket-expiry-late",
            "8.6/create-ticket-defaults",
            H::TicketExpiryLate,
        ),
        handler(
            "ticket-token-repeats",
            "8.6/ticket-tokens-random",
            H::TicketTokenRepeats,
        ),
        store(
            "tickets-never-expire",
            "8.6/ticket-expires",
            S::TicketsNeverExpire,
        ),
        store(
            "accounts-never-expire",
            "8.6/account-ttl",
            S::AccountsNeverExpire,
        )
        .with(short_lifetimes, SHORT_LIFETIMES),
    ]
}

/// Every planted defect of a node.
fn node_corpus() -> Vec<Planted> {
    vec![
        node(
            "node-takes-any-ack",
            "4.5/ack-wrong-init-id",
            Node::Credulous,
        ),
        node("node-takes-high-s-ack", "4.5/ack-high-s", Node::Credulous),
        node(
            "node-takes-ack-of-another-key",
            "4.5/ack-other-key",
            Node::Credulous,
        ),
        node(
            "node-ignores-welcome-tag",
            "6.2/client-welcome-bad-tag",
            Node::Credulous,
        ),
        node(
            "node-takes-any-first-frame",
            "7.2/client-first-frame-not-welcome",
            Node::Credulous,
        ),
        node(
            "node-request-id-0",
            "7.1/client-request-ids",
            Node::Raw(|t| Box::pin(request_id_zero(t))),
        ),
        node(
            "node-answers-pongs",
            "7.1/client-pong-not-answered",
            Node::Raw(|t| Box::pin(answers_pongs(t))),
        ),
        node(
            "node-ignores-pings",
            "7.3/client-answers-ping",
            Node::Raw(|t| Box::pin(ignores_pings(t))),
        ),
        node(
            "node-pings-at-the-announced-window",
            "7.3/client-ping-spacing",
            Node::Raw(|t| Box::pin(pings_fast(t))),
        ),
        node(
            "node-answers-error-pushes",
            "7.4/client-error-push",
            Node::Raw(|t| Box::pin(answers_error_push(t))),
        ),
        node(
            "node-no-device-check",
            "8.4/client-deliver-wrong-device",
            Node::Scenario,
        ),
        node(
            "node-no-signature-check",
            "8.4/client-deliver-bad-signature",
            Node::Scenario,
        ),
        node(
            "node-no-hash-check",
            "8.4/client-deliver-bad-hash",
            Node::Scenario,
        ),
        node(
            "node-lenient-high-s",
            "8.4/client-deliver-high-s",
            Node::Scenario,
        ),
        node(
            "node-sender-as-recipient",
            "8.4/client-deliver-for-another-recipient",
            Node::Scenario,
        ),
        node("node-no-dedup", "8.5/client-duplicate-id", Node::Scenario),
        node(
            "node-resubscribes-on-replaced",
            "8.4/client-replaced",
            Node::Scenario,
        ),
        node(
            "node-retries-at-once",
            "8.3/client-rate-limited",
            Node::Scenario,
        ),
        node(
            "node-retries-with-new-nonce",
            "8.3/client-rate-limited",
            Node::Scenario,
        ),
        node("node-no-acks", "8.4/client-acks", Node::Scenario),
        node("node-one-nonce", "8.3/client-send-signed", Node::Scenario),
    ]
}

/// Runs `case` against the planted relay `p`; its verdict.
async fn judge_relay(p: &Planted) -> (Verdict, String) {
    let one = |report: Report| {
        let c = report.case(p.case).expect("the case ran");
        (c.outcome.verdict, c.outcome.detail.clone())
    };
    match &p.peer {
        Peer::Relay {
            handler,
            store,
            config,
            assume,
        } => {
            let mut c = botd_relay::testing::loopback_config();
            config(&mut c);
            let identity = KeyPair::generate();
            let app = botd_relay::relay::Relay::new(
                Arc::new(c.clone()),
                *identity.public(),
                FaultyStore::new(&c, *store),
            );
            let stop = tokio_util::sync::CancellationToken::new();
            tokio::spawn(app.clone().run_maintenance(stop.clone()));
            let r =
                botd_relay::testing::start_as(c.clone(), identity, Faulty::new(app, *handler, &c))
                    .await;
            let mut t = target(r.addr, r.key);
            t.assume = Assumptions::parse([*assume]).expect("valid --assume");
            let verdict = one(run_cases(t, &[p.case]).await);
            r.stop().await;
            stop.cancel();
            verdict
        }
        Peer::Script { good, broken } => {
            let report = run_cases(scripted(good()).await, &[p.case]).await;
            let (verdict, detail) = one(report);
            if verdict != Verdict::Pass {
                return (
                    verdict,
                    format!("the correct script did not pass: {detail}"),
                );
            }
            one(run_cases(scripted(broken()).await, &[p.case]).await)
        }
        Peer::Node(_) => unreachable!("a node"),
    }
}

/// Runs `case` of the client role against the planted node `p`; its verdict.
async fn judge_node(p: &Planted) -> (Verdict, String) {
    let Peer::Node(kind) = p.peer else {
        unreachable!("a relay")
    };
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), KeyPair::generate())
        .await
        .unwrap();
    let (addr, key) = (listener.local_addr(), listener.key());
    let name = p.name;
    let node = tokio::spawn(async move {
        match kind {
            Node::Scenario => {
                let options = scenario::Options {
                    faults: NodeFaults::named(name).expect("a known node fault"),
                    limit: Duration::from_secs(10),
                    ..Default::default()
                };
                let _ = scenario::run(addr, key, &options).await;
            }
            Node::Credulous => credulous_node(addr, key).await,
            Node::Raw(run) => {
                let _ = tokio::time::timeout(Duration::from_secs(10), run(target(addr, key))).await;
            }
        }
    });
    let sel = Selection {
        cases: vec![p.case.to_string()],
        ..Selection::default()
    };
    let report = listener.run(&sel, Duration::from_secs(8), |_| {}).await;
    node.abort();
    let c = report.case(p.case).expect("the case ran");
    (c.outcome.verdict, c.outcome.detail.clone())
}

/// Runs every planted peer of `corpus` (4 at a time); panics naming those their case missed.
async fn all_caught(corpus: Vec<Planted>, node_role: bool) {
    let results: Vec<_> = futures_util::stream::iter(corpus.iter().map(|p| async move {
        let (verdict, detail) = if node_role {
            judge_node(p).await
        } else {
            judge_relay(p).await
        };
        (p.name, p.case, verdict, detail)
    }))
    .buffer_unordered(4)
    .collect()
    .await;
    let missed: Vec<_> = results
        .into_iter()
        .filter(|(_, _, verdict, _)| *verdict != Verdict::Fail)
        .collect();
    assert!(
        missed.is_empty(),
        "planted defects their case did not catch: {missed:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_planted_relay_defect_is_caught() {
    all_caught(relay_corpus(), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_planted_node_defect_is_caught() {
    all_caught(node_corpus(), true).await;
}

#[test]
fn the_corpus_is_documented_and_names_real_cases() {
    let doc = include_str!("../../docs/CONFORMANCE.md");
    let relay_ids: Vec<&str> = relay::cases().iter().map(|c| c.id).collect();
    let client_ids: Vec<&str> = botd_tools::conformance::client::cases()
        .iter()
        .map(|c| c.id)
        .collect();
    let mut names = std::collections::HashSet::new();
    for (p, ids) in relay_corpus()
        .iter()
        .map(|p| (p, &relay_ids))
        .chain(node_corpus().iter().map(|p| (p, &client_ids)))
    {
        assert!(names.insert(p.name), "{} twice", p.name);
        assert!(ids.contains(&p.case), "{}: no case {}", p.name, p.case);
        let row = format!("| `{}` | `{}` |", p.name, p.case);
        assert!(
            doc.contains(&row),
            "docs/CONFORMANCE.md lacks the row {row}"
        );
        if let Peer::Node(Node::Scenario) = p.peer {
            assert!(NodeFaults::named(p.name).is_some(), "{}", p.name);
        }
    }
}

// --- the scripted relay of the client role, serving every connection -----------------------

async fn scripted(script: Script) -> Target {
    let identity = KeyPair::generate();
    let key = *identity.public();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_forever(listener, identity, script));
    target(addr, key)
}

// --- nodes written with the suite's probe ---------------------------------------------------

async fn probe(t: &Target) -> Option<Probe> {
    Probe::connect(t, &Log::new(), "node").await.ok()
}

/// Registers with frame id 0.
async fn request_id_zero(t: Target) {
    let Some(mut p) = probe(&t).await else { return };
    p.send_frame(&Frame::new(0, Body::Register(registration(1, 1))))
        .await;
    let _ = p.next_event(Duration::from_secs(1)).await;
}

/// Answers the relay's unsolicited Pongs with Pongs.
async fn answers_pongs(t: Target) {
    let Some(mut p) = probe(&t).await else { return };
    p.send_frame(&Frame::new(1, Body::Register(registration(1, 1))))
        .await;
    for _ in 0..10 {
        match p.next_frame(Duration::from_secs(2)).await {
            Ok(Frame {
                body: Some(Body::Pong(pong)),
                ..
            }) => {
                let answer = Pong {
                    id: proto::random_id(),
                    ping_id: pong.id,
                };
                p.send_frame(&Frame::new(0, Body::Pong(answer))).await;
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// Never answers the relay's Ping.
async fn ignores_pings(t: Target) {
    let Some(mut p) = probe(&t).await else { return };
    p.answer_pings = false;
    let _ = p.next_event(Duration::from_secs(2)).await;
}

/// Pings as often as the relay's window (1 s) allows, not every 30 s.
async fn pings_fast(t: Target) {
    let Some(mut p) = probe(&t).await else { return };
    for id in 1..=2u64 {
        p.send_frame(&Frame::new(
            id,
            Body::Ping(Ping {
                id: proto::random_id(),
            }),
        ))
        .await;
        let _ = p.answer_to(id).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
}

/// Answers the relay's `Error` push with an `Error`.
async fn answers_error_push(t: Target) {
    let Some(mut p) = probe(&t).await else { return };
    let _ = p.call(Body::Register(registration(1, 1))).await;
    let _ = p
        .call(Body::Subscribe(proto::Subscribe {
            device_id: 1,
            after_id: 0,
        }))
        .await;
    if let Ok(push) = p.next_push(Duration::from_secs(2)).await {
        if matches!(push.body, Some(Body::Error(_))) {
            p.send_frame(&Frame::error(0, ErrorCode::Internal, "answering a push"))
                .await;
            let _ = p.next_event(Duration::from_millis(500)).await;
        }
    }
}

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
