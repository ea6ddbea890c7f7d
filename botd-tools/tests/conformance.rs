//! The conformance suite checks itself: both roles against this crate's relay and client (no
//! FAIL beyond the cases of decided relay changes still pending), and a corpus of peers with
//! one planted defect each (a relay or a node breaking one rule of PROTOCOL.md), each caught by
//! the case meant for it. docs/CONFORMANCE.md lists the corpus.

#[path = "conformance/faulty_handler.rs"]
mod faulty_handler;
#[path = "conformance/faulty_store.rs"]
mod faulty_store;

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use botd_protocol::codec::{encode_frame, FrameCodec};
use botd_protocol::keys::{KeyPair, PublicKeyBytes};
use botd_protocol::proto::{self, Body, ErrorCode, Frame, Ping, Pong};
use botd_relay::config::Config;
use botd_relay::store::QuotaKind;
use botd_tools::conformance::client::{serve_forever, Listener};
use botd_tools::conformance::faulty::{AckFault, First, Script};
use botd_tools::conformance::probe::{registration, Probe, Target};
use botd_tools::conformance::scenario::NodeFaults;
use botd_tools::conformance::{
    relay, scenario, Assumptions, Level, Log, Report, Selection, Verdict,
};
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
            "8.6/expired-tickets-not-counted",
            "8.6/add-contact-limit",
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

/// A peer with one planted defect, and the cases that must fail against it.
struct Planted {
    name: &'static str,
    cases: &'static [&'static str],
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
    /// The scripted relay of the client role (faulty.rs): `good` passes the cases, `broken`
    /// fails them.
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

fn relay_peer(handler: HandlerFault, store: StoreFault) -> Peer {
    Peer::Relay {
        handler,
        store,
        config: no_config,
        assume: "",
    }
}

fn handler(name: &'static str, cases: &'static [&'static str], fault: HandlerFault) -> Planted {
    Planted {
        name,
        cases,
        peer: relay_peer(fault, StoreFault::None),
    }
}

fn store(name: &'static str, cases: &'static [&'static str], fault: StoreFault) -> Planted {
    Planted {
        name,
        cases,
        peer: relay_peer(HandlerFault::None, fault),
    }
}

fn script(name: &'static str, cases: &'static [&'static str], broken: fn() -> Script) -> Planted {
    Planted {
        name,
        cases,
        peer: Peer::Script {
            good: Script::default,
            broken,
        },
    }
}

fn node(name: &'static str, case: &'static [&'static str], kind: Node) -> Planted {
    Planted {
        name,
        cases: case,
        peer: Peer::Node(kind),
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

    /// The correct script the broken one is compared with, when not the default.
    fn good(mut self, script: fn() -> Script) -> Self {
        if let Peer::Script { good, .. } = &mut self.peer {
            *good = script;
        }
        self
    }
}

fn small_mailboxes(c: &mut Config) {
    c.mailbox_max_messages = 20;
    c.mailbox_max_bytes = 1 << 20;
    c.max_contacts = 10;
    c.max_tickets_per_identity = 20;
}
const SMALL_MAILBOXES: &str =
    "mailbox_max_messages=20 mailbox_max_bytes=1048576 max_contacts=10 max_tickets_per_identity=20";

fn small_quotas(c: &mut Config) {
    c.max_identity_stored_bytes = 1 << 20;
    c.max_stored_bytes = 3 << 20;
}
const SMALL_QUOTAS: &str = "max_identity_stored_bytes=1048576 max_stored_bytes=3145728";

fn few_identities(c: &mut Config) {
    c.max_identities = 12;
}

fn few_limiter_keys(c: &mut Config) {
    c.max_rate_limited_keys = 8;
}

fn twenty_devices(c: &mut Config) {
    c.max_devices_per_identity = 20;
}

fn one_second_window() -> Script {
    Script {
        welcome_ping_min_interval_ms: Some(1000),
        ..Default::default()
    }
}

/// The cases of §2 and §4.2 that an `Init` must fail, silently.
const REFUSED_INITS: &[&str] = &[
    "2/ephemeral-key-off-curve",
    "2/ephemeral-key-uncompressed",
    "2/sender-key-32-bytes",
    "2/sender-key-off-curve",
    "2/sender-key-prefix-04",
    "2/sender-key-uncompressed",
    "2/signature-63-bytes",
    "2/signature-65-bytes",
    "2/signature-r-is-n",
    "2/signature-r-zero",
    "2/signature-s-zero",
    "4.2/bad-signature",
    "4.2/empty-id",
    "4.2/high-s-signature",
    "4.2/id-65-bytes",
    "4.2/id-invalid-utf8",
    "4.2/not-protobuf",
    "4.2/recipient-uncompressed",
    "4.2/replayed-ephemeral",
    "4.2/signature-by-other-key",
    "4.2/signature-key-order",
    "4.2/signature-other-ephemeral",
    "4.2/wrong-recipient",
];

/// The cases a relay must answer with nothing but a close.
const SILENT_CLOSES: &[&str] = &[
    "3/session-frame-over-limit",
    "3/session-zero-length",
    "3/session-truncated",
    "6.2/bad-tag",
    "6.2/bad-ciphertext",
    "6.2/short-body",
    "6.2/replayed-frame",
    "6.2/reordered-frames",
    "6.2/dropped-frame",
];

/// The cases of frames a relay does not serve: `UNSUPPORTED`.
const UNSUPPORTED: &[&str] = &[
    "6.1/empty-plaintext",
    "7.1/no-body",
    "7.1/unknown-body",
    "7.1/welcome-from-node",
    "7.1/two-bodies-last-wins-reversed",
    "7.1/non-request-acked",
    "7.1/non-request-deliver",
    "7.1/non-request-done",
    "7.1/non-request-pre-key-bundles",
    "7.1/non-request-pre-key-count",
    "7.1/non-request-pre-keys-low",
    "7.1/non-request-registered",
    "7.1/non-request-sent",
    "7.1/non-request-subscribed",
    "7.1/non-request-ticket",
    "7.1/non-request-unregistered",
    "8.1/non-request-id-0",
];

/// Every planted defect of a relay.
#[rustfmt::skip]
fn relay_corpus() -> Vec<Planted> {
    use HandlerFault as H;
    use StoreFault as S;
    vec![
        // §2–§7, on the scripted relay.
        script("answers-before-checking-inits", REFUSED_INITS, || Script { ack_before_checks: true, ..Default::default() }),
        script("accepts-high-s-init", &["4.2/high-s-signature"], || Script { accept_high_s: true, ..Default::default() }),
        script("ignores-init-recipient", &["4.2/wrong-recipient"], || Script { skip_recipient_check: true, ..Default::default() }),
        script("no-replay-cache", &["4.2/replayed-ephemeral"], || Script { no_replay_cache: true, ..Default::default() }),
        script("reencodes-init-for-keys", &["4.2/unknown-init-fields", "4.2/non-canonical-init"], || Script { reencodes_init: true, ..Default::default() }),
        script("init-ids-32-hex-only", &["4.2/id-1-byte", "4.2/id-64-bytes", "4.2/id-non-ascii"], || Script { ids_hex32_only: true, ..Default::default() }),
        script("replies-to-bad-handshake-frames", &["3/handshake-zero-length", "3/handshake-length-huge", "3/handshake-truncated"], || Script { replies_to_bad_handshake_frames: true, ..Default::default() }),
        script("closes-on-undecodable-plaintext", &["7.1/undecodable-plaintext", "1/invalid-utf8-string"], || Script { closes_on_undecodable: true, ..Default::default() }),
        script("refuses-non-canonical-frames", &["1/unknown-fields-ignored"], || Script { strict_canonical_frames: true, ..Default::default() }),
        script("handshake-limit-2048", &["3/handshake-frame-1025"], || Script { handshake_limit: Some(2048), ..Default::default() }),
        script("handshake-limit-1023", &["3/handshake-frame-1024"], || Script { handshake_limit: Some(1023), ..Default::default() }),
        script("ack-over-1024", &["3/ack-within-1024"], || Script { ack_len: Some(1100), ..Default::default() }),
        script("session-limit-doubled", &["3/session-frame-over-limit"], || Script { session_limit: Some(2 << 20), ..Default::default() }),
        script("session-limit-below-announced", &["3/session-frame-at-limit"], || Script { session_limit: Some((1 << 20) - 1), ..Default::default() }),
        script("replies-before-closing", SILENT_CLOSES, || Script { error_before_close: true, ..Default::default() }),
        script("ack-for-another-init", &["4.4/ack-init-id"], || Script { ack: AckFault::WrongInitId, ..Default::default() }),
        script("ack-bad-signature", &["4.4/ack-valid"], || Script { ack: AckFault::BadSignature, ..Default::default() }),
        script("ack-high-s", &["4.4/ack-valid"], || Script { ack: AckFault::HighS, ..Default::default() }),
        script("ack-signed-by-another-key", &["4.4/ack-valid"], || Script { ack: AckFault::OtherKey, ..Default::default() }),
        script("ack-empty-id", &["4.4/ack-valid"], || Script { ack: AckFault::EmptyId, ..Default::default() }),
        script("reuses-ack-ephemeral", &["4.4/ack-fresh-ephemeral"], || Script { reuse_ephemeral: true, ..Default::default() }),
        script("first-frame-not-welcome", &["7.2/welcome-first"], || Script { first: First::ErrorFrame, ..Default::default() }),
        script("welcome-bad-tag", &["5/key-schedule"], || Script { first: First::BadTagWelcome, ..Default::default() }),
        script("skips-tag-check", &["6.2/bad-tag"], || Script { skip_tag_check: true, ..Default::default() }),
        script("rotates-late", &["6.3/rotation-r2i", "6.3/second-rotation"], || Script { rotate_shift: Some(1), ..Default::default() }),
        script("opens-rotation-late", &["6.3/rotation-i2r"], || Script { rotate_open_shift: Some(1), ..Default::default() }),
        script("announces-another-key", &["7.2/welcome-relay-pubkey"], || Script { welcome_other_key: true, ..Default::default() }),
        script("announces-another-protocol", &["7.2/welcome-protocol"], || Script { welcome_protocol: Some("botd/2"), ..Default::default() }),
        script("frame-limit-below-payload", &["7.2/welcome-frame-limits"], || Script { welcome_max_frame_len: Some(2048), ..Default::default() }),
        script("ping-window-below-1s", &["7.2/welcome-ping-min-interval"], || Script { welcome_ping_min_interval_ms: Some(500), ..Default::default() }),
        script("probes-inside-the-window", &["7.2/welcome-timers"], || Script { welcome_ping_interval_ms: Some(10_000), ..Default::default() }),
        script("unsupported-as-bad-request", UNSUPPORTED, || Script { unsupported_as_bad_request: true, ..Default::default() }),
        script("answers-pongs", &["7.1/pong-not-answered"], || Script { answer_pongs: true, ..Default::default() }),
        script("answers-ping-floods", &["7.3/ping-flood", "7.3/ping-flood-malformed-id"], || Script { answer_ping_flood: true, ..Default::default() }),
        script("enforces-30s-announces-1s", &["7.3/ping-after-interval"], || Script { welcome_ping_min_interval_ms: Some(1000), enforced_ping_window: Some(Duration::from_secs(30)), ..Default::default() }).good(one_second_window),
        script("enforces-no-window", &["7.3/ping-inside-window"], || Script { welcome_ping_min_interval_ms: Some(1000), enforced_ping_window: Some(Duration::ZERO), ..Default::default() }).good(one_second_window),
        script("ping-ids-up-to-65", &["7.3/ping-id-65-bytes"], || Script { ping_id_max: Some(65), ..Default::default() }),
        script("ping-ids-up-to-63", &["7.3/ping-id-64-bytes"], || Script { ping_id_max: Some(63), ..Default::default() }),
        script("pong-names-another-ping", &["7.3/ping-answered"], || Script { pong_wrong_ping_id: true, ..Default::default() }),
        script("pong-in-frame-1", &["7.3/ping-frame-id-0"], || Script { pong_frame_id: Some(1), ..Default::default() }),
        script("id-0-pings-not-counted", &["7.3/ping-frame-id-0-counts"], || Script { id0_pings_not_counted: true, ..Default::default() }),
        script("counts-malformed-pings", &["7.3/malformed-ping-not-counted"], || Script { counts_malformed_pings: true, ..Default::default() }),
        script("subscribed-after-deliveries", &["8.4/subscribed-before-deliver"], || Script { deliver_before_subscribed: true, ..Default::default() }),
        // §7 and §8.1, in our relay.
        handler("answers-errors", &["7.1/error-not-answered"], H::AnswersErrors),
        handler("serves-non-requests", &["7.1/non-request-sent"], H::NonRequestServed),
        handler("retry-after-on-errors", &["7.4/retry-after-zero", "8.3/error-retry-after"], H::RetryAfterOnErrors),
        handler("executes-id-0", &["8.1/request-id-0"], H::ExecutesIdZero),
        handler("validates-before-rate-limiting", &["8.1/change-rate-limit"], H::ValidatesBeforeLimiting),
        handler("reads-other-identities-mailboxes", &["8.1/own-mailbox-only-get"], H::CrossMailbox),
        handler("acks-other-identities-mailboxes", &["8.1/own-mailbox-only-ack"], H::AcksOtherIdentities),
        handler("session-bound-to-its-devices", &["8.1/any-session-of-identity"], H::SessionBoundDevices),
        handler("registers-device-0", &["8.1/device-0-register"], H::DeviceZeroRegistered),
        handler("device-0-is-device-1", &["8.1/device-0-unregister", "8.1/device-0-upload", "8.1/device-0-count", "8.1/device-0-subscribe", "8.1/device-0-get", "8.1/device-0-ack", "8.1/device-0-fetch", "8.1/device-0-send-recipient", "8.1/device-0-send-sender", "8.3/recipient-device-0"], H::DeviceZeroIsOne),
        handler("sender-device-0-bad-request", &["8.1/device-0-send-sender"], H::SenderDeviceZeroBadRequest),
        store("sender-is-recipient", &["8.1/sender-is-session", "8.4/deliver-fields"], S::SenderIsRecipient),
        // §8.2
        handler("registered-count-0", &["8.2/register"], H::RegisteredCountZero),
        handler("cuts-long-identity-key", &["8.2/register-identity-key-too-long"], H::IdentityKeyCut),
        handler("fills-empty-keys", &["8.2/register-identity-key-empty", "8.2/register-signed-prekey-empty-key", "8.2/register-signed-prekey-empty-signature", "8.2/register-prekey-empty-key"], H::FillsEmptyKeys),
        handler("key-limit-off-by-one", &["8.2/register-key-at-limit", "3/answers-within-limit"], H::KeyLimitOffByOne),
        handler("prekey-limit-off-by-one", &["8.2/register-max-prekeys"], H::PrekeyLimitOffByOne),
        handler("makes-up-signed-prekey", &["8.2/register-no-signed-prekey"], H::SignedPrekeyMadeUp),
        handler("cuts-prekey-lists", &["8.2/register-too-many-prekeys", "8.2/upload-too-many"], H::PrekeysCut),
        handler("merges-prekey-ids", &["8.2/register-duplicate-prekey-ids", "8.2/upload-duplicate-ids"], H::PrekeyIdsMerged),
        handler("moves-uploaded-ids", &["8.2/upload-id-stored"], H::UploadIdsMoved),
        handler("unregistered-device-1", &["8.2/unregister"], H::UnregisteredDeviceOne),
        handler("unregisters-unknown-devices", &["8.2/unregister-not-registered"], H::UnregisterUnknownOk),
        handler("reregister-drops-mailbox", &["8.2/reregister-keeps-mailbox"], H::ReregisterDropsMailbox),
        handler("reregister-appends-prekeys", &["8.2/reregister-replaces-prekeys"], H::ReregisterAppends),
        handler("uploads-to-unregistered-devices", &["8.2/upload-not-registered"], H::UploadUnregisteredOk),
        store("ignores-one-time-prekey-rate", &["8.2/one-time-prekey-rate"], S::IgnoresPrekeyRate),
        store("fetch-takes-before-checking", &["8.2/fetch-unknown-device-takes-nothing"], S::FetchTakesBeforeChecking),
        store("prekeys-low-every-fetch", &["8.2/prekeys-low-once", "8.2/no-prekeys-low-above-threshold"], S::PrekeysLowEveryFetch),
        handler("prekey-count-device-1", &["8.2/get-prekey-count"], H::PreKeyCountDeviceOne),
        handler("upload-count-before", &["8.2/upload-prekeys"], H::UploadCountBefore),
        handler("drops-uploaded-signed-prekey", &["8.2/upload-signed-prekey"], H::IgnoresUploadedSignedPrekey),
        handler("bundle-loses-registration-id", &["8.2/fetch-bundle-content"], H::BundleFieldLost),
        handler("bundles-reversed", &["8.2/fetch-device-order"], H::BundlesReversed),
        handler("bundle-per-listed-id", &["8.2/fetch-duplicates-merged"], H::DuplicateBundles),
        handler("merges-before-counting", &["8.2/fetch-too-many-entries-with-duplicates"], H::MergesBeforeCounting),
        handler("fetch-cap-16", &["8.2/fetch-max-entries"], H::FetchCapSixteen).with(twenty_devices, "max_devices_per_identity=20"),
        handler("fetch-without-cap", &["8.2/fetch-too-many-entries"], H::FetchNoCap),
        handler("short-identity-unknown", &["8.2/fetch-identity-32-bytes"], H::ShortIdentityUnknown),
        handler("unknown-identity-no-bundles", &["8.2/fetch-unknown-identity"], H::FetchUnknownIdentityEmpty),
        handler("refuses-own-fetch", &["8.2/fetch-own-identity"], H::FetchOwnRefused),
        handler("prekey-handed-twice", &["8.2/one-time-prekey-once"], H::PrekeyTwice),
        store("no-prekeys-low", &["8.2/prekeys-low"], S::NoPrekeysLow),
        store("ignores-device-limit", &["8.2/register-device-limit"], S::IgnoresLimit(QuotaKind::Devices)),
        store("ignores-device-id-budget", &["8.2/register-device-id-budget"], S::IgnoresLimit(QuotaKind::DeviceIds)),
        store("ignores-prekey-limit", &["8.2/upload-device-limit"], S::IgnoresLimit(QuotaKind::Prekeys)),
        store("ignores-identities-cap", &["8.2/register-identities-quota"], S::IgnoresLimit(QuotaKind::Identities)).with(few_identities, "max_identities=12"),
        // §8.3
        handler("ignores-payload-hash", &["8.3/payload-hash-mismatch"], H::IgnoresHash),
        handler("payload-limit-off-by-one", &["8.3/payload-at-limit"], H::PayloadLimitOffByOne),
        handler("cuts-large-payloads", &["8.3/payload-too-large", "8.3/order-too-large-before-bad-request"], H::CutsLargePayloads),
        handler("refuses-empty-payload", &["8.3/empty-payload"], H::EmptyPayloadRefused),
        handler("cuts-34-byte-recipient", &["8.3/recipient-34-bytes"], H::RecipientCut),
        handler("short-recipient-unknown", &["8.3/recipient-32-bytes", "8.3/recipient-34-bytes"], H::ShortRecipientUnknown),
        handler("cuts-9-byte-nonce", &["8.3/nonce-9-bytes"], H::NonceCut),
        handler("pads-short-nonce", &["8.3/nonce-7-bytes"], H::PadsShortNonce),
        handler("pads-short-signature", &["8.3/signature-63-bytes"], H::PadsShortSignature),
        handler("ignores-ticket-length", &["8.3/ticket-15-bytes"], H::TicketLengthIgnored),
        handler("recipient-before-payload-length", &["8.3/order-too-large-before-bad-request"], H::RecipientBeforePayloadLength),
        handler("ticket-length-first", &["8.3/order-bad-request-before-ticket", "8.3/order-hash-length-before-ticket"], H::TicketFirst),
        handler("hash-before-ticket-length", &["8.3/order-ticket-before-hash-mismatch"], H::HashBeforeTicket),
        handler("device-checked-first", &["8.3/order-hash-before-not-registered", "8.3/order-rate-limit-before-not-registered", "8.4/ack-order", "8.2/upload-order-bad-request-first"], H::DeviceCheckedFirst),
        handler("unknown-recipient-before-sender-device", &["8.3/order-not-registered-before-unknown-recipient"], H::NotRegisteredAsUnknownRecipient),
        handler("policy-before-recipient-device", &["8.3/order-unknown-recipient-before-forbidden", "8.3/order-duplicate-before-policy"], H::PolicyFirst),
        handler("rate-limited-as-bad-request", &["8.1/change-rate-limit", "8.2/fetch-rate-limit", "8.3/pair-rate-limit", "8.3/sender-rate-limit", "8.3/rate-limit-per-identity", "8.3/retry-after-honoured", "8.4/ack-rate-limit", "8.1/change-rate-limit-per-address", "8.2/fetch-rate-limit-per-address", "8.3/send-rate-limit-per-address"], H::RateLimitedAsBadRequest),
        handler("limiter-refuses-as-bad-request", &["8.1/limiter-keys-full"], H::RateLimitedAsBadRequest).with(few_limiter_keys, "max_rate_limited_keys=8"),
        handler("rate-limit-before-fields", &["8.3/order-bad-request-before-rate-limit"], H::LimitsBeforeFields),
        handler("fixes-short-hashes", &["8.3/payload-hash-31-bytes"], H::FixesShortHash),
        handler("accepts-unknown-recipients", &["8.3/unknown-recipient", "8.3/unknown-recipient-device", "8.2/unregister-drops-messages"], H::UnknownRecipientAccepted),
        handler("sender-device-unchecked", &["8.3/sender-device-not-registered"], H::SenderDeviceUnchecked),
        handler("refuses-messages-to-oneself", &["8.3/send-to-self"], H::RefusesSelfSend),
        handler("message-id-0", &["8.3/send-ok"], H::MessageIdZero),
        handler("no-idempotent-sends", &["8.3/idempotent-resend"], H::NoDeduplication),
        handler("duplicate-flag-lost", &["8.3/idempotent-resend"], H::DuplicateFlagLost),
        handler("nonce-with-payload", &["8.3/resend-ignores-other-fields"], H::NonceWithPayload),
        store("duplicates-by-nonce-alone", &["8.3/nonce-per-sender"], S::DuplicateByNonceOnly),
        store("duplicates-per-sender-device", &["8.3/nonce-per-identity"], S::DuplicatePerSenderDevice),
        store("duplicates-across-devices", &["8.3/nonce-per-device-mailbox"], S::DuplicateAcrossDevices),
        store("duplicates-across-recipients", &["8.3/nonce-per-mailbox"], S::DuplicateAcrossRecipients),
        store("duplicates-after-ack", &["8.3/nonce-reusable-after-ack"], S::DuplicateAfterAck),
        handler("retry-after-0", &["8.3/pair-rate-limit"], H::RateLimitedRetryAfterZero),
        handler("ignores-policy", &["8.3/forbidden-without-ticket"], H::PolicyIgnored),
        handler("checks-tickets-when-open", &["8.3/ticket-ignored-when-open"], H::ChecksTicketWhenOpen),
        handler("drops-tickets", &["8.3/ticket-admits"], H::TicketDropped),
        handler("ticket-not-checked", &["8.3/ticket-unknown", "8.3/ticket-used-up", "8.3/ticket-other-identity", "8.6/ticket-uses", "8.6/ticket-expires"], H::TicketNotChecked),
        handler("add-contact-does-nothing", &["8.3/contact-admitted"], H::AddContactNoop),
        handler("remove-contact-does-nothing", &["8.3/removed-contact-forbidden"], H::RemoveContactNoop),
        handler("forbids-self-send", &["8.3/self-send-contacts-only"], H::SelfSendForbidden),
        store("mailbox-full-as-quota", &["8.3/mailbox-full-messages", "8.3/mailbox-full-bytes"], S::MailboxFullAsQuota).with(small_mailboxes, SMALL_MAILBOXES),
        store("contacts-full-as-quota", &["8.3/contacts-full-ticket"], S::ContactsFullAsQuota).with(small_mailboxes, SMALL_MAILBOXES),
        store("quota-as-mailbox-full", &["8.3/identity-quota"], S::QuotaAsMailboxFull).with(small_quotas, SMALL_QUOTAS),
        store("relay-quota-as-mailbox-full", &["8.3/relay-quota"], S::QuotaAsMailboxFull).with(small_quotas, SMALL_QUOTAS),
        // §8.4
        store("acks-across-devices", &["8.4/ack-one-mailbox"], S::AckAcrossDevices),
        store("gets-across-devices", &["8.4/get-message-one-mailbox"], S::GetAcrossDevices),
        store("reads-across-devices", &["8.4/subscribe-one-mailbox"], S::ReadAcrossDevices),
        store("reads-newest-first", &["8.4/backlog-in-order"], S::ReadsNewestFirst),
        handler("ignores-after-id", &["8.4/after-id"], H::IgnoresAfterId),
        store("last-id-of-identity", &["8.4/subscribed-last-id"], S::LastIdOfIdentity),
        handler("subscribed-device-1", &["8.4/subscribed-last-id"], H::SubscribedDeviceOne),
        handler("last-id-ahead", &["8.4/subscribed-last-id-new-mailbox", "8.4/subscribed-last-id"], H::LastIdAhead),
        handler("get-answered-as-push", &["8.4/get-message"], H::GetAnsweredAsPush),
        store("sender-device-lost", &["8.4/deliver-fields", "8.4/get-message-fields"], S::SenderDeviceOne),
        store("no-live-delivery", &["8.4/live-delivery"], S::NoLiveDelivery),
        store("acks-free-no-place", &["8.4/window"], S::NoRemovedEvents),
        handler("subscribes-unregistered-device", &["8.4/subscribe-not-registered"], H::SubscribeUnregistered),
        handler("not-found-as-not-registered", &["8.4/get-message-not-found"], H::NotFoundAsNotRegistered),
        handler("not-registered-as-not-found", &["8.4/get-message-order"], H::NotRegisteredAsNotFound),
        handler("acks-on-unregistered-devices", &["8.4/ack-not-registered"], H::AckNotRegisteredOk),
        handler("ack-counts-listed-ids", &["8.4/ack"], H::AckCountsListed),
        handler("truncates-ack-lists", &["8.4/ack-4097-ids"], H::TruncatesAcks),
        handler("refuses-4096-acks", &["8.4/ack-4096-ids"], H::RefusesAck4096),
        // §8.5
        store("received-at-0", &["8.5/received-at"], S::ReceivedAtZero),
        handler("first-id-0", &["8.5/first-id"], H::IdsStartAtZero),
        store("deletes-on-push", &["8.5/redelivered-after-reconnect"], S::DeletesOnPush),
        store("messages-never-expire", &["8.5/message-expiry"], S::MessagesNeverExpire).with(short_lifetimes, SHORT_LIFETIMES),
        // §8.6
        handler("unknown-policy-accepted", &["8.6/set-policy-unknown-value"], H::UnknownPolicyAccepted),
        handler("account-changes-without-device", &["8.6/set-policy-not-registered", "8.6/add-contact-not-registered", "8.6/remove-contact-not-registered", "8.6/create-ticket-not-registered"], H::AccountWithoutDevice),
        handler("accepts-32-byte-contacts", &["8.6/add-contact-32-bytes", "8.6/remove-contact-32-bytes"], H::ShortContactAccepted),
        handler("unregister-resets-policy", &["8.6/settings-kept-while-a-device-remains"], H::UnregisterResetsPolicy),
        handler("no-set-policy", &["8.6/set-policy"], H::NoSetPolicy),
        handler("registration-checked-first", &["8.6/add-contact-order", "8.6/create-ticket-order"], H::RegistrationCheckedFirst),
        handler("refuses-present-contacts", &["8.6/contacts-idempotent"], H::DuplicateContactRefused),
        handler("ticket-lifetime-off-by-one", &["8.6/create-ticket-max-ttl"], H::TicketTtlOffByOne),
        store("forgets-open-sessions", &["8.6/account-kept-while-connected"], S::IgnoresTouch).with(short_lifetimes, SHORT_LIFETIMES),
        store("contact-limit-ignored", &["8.6/add-contact-limit"], S::IgnoresLimit(QuotaKind::Contacts)).with(small_mailboxes, SMALL_MAILBOXES),
        store("ticket-limit-ignored", &["8.6/ticket-limit"], S::IgnoresLimit(QuotaKind::Tickets)).with(small_mailboxes, SMALL_MAILBOXES),
        handler("cuts-ticket-lifetime", &["8.6/create-ticket-ttl-too-long"], H::TicketTtlCut),
        handler("cuts-ticket-uses", &["8.6/create-ticket-too-many-uses"], H::TicketUsesCut),
        handler("ticket-uses-1", &["8.6/create-ticket-fields"], H::TicketUsesOne),
        store("one-use-tickets", &["8.6/ticket-uses"], S::TicketUsesIgnored),
        handler("ticket-expiry-late", &["8.6/create-ticket-defaults"], H::TicketExpiryLate),
        handler("ticket-token-repeats", &["8.6/ticket-tokens-random"], H::TicketTokenRepeats),
        store("tickets-never-expire", &["8.6/ticket-expires"], S::TicketsNeverExpire),
        store("accounts-never-expire", &["8.6/account-ttl"], S::AccountsNeverExpire).with(short_lifetimes, SHORT_LIFETIMES),
    ]
}

/// Every planted defect of a node.
#[rustfmt::skip]
fn node_corpus() -> Vec<Planted> {
    vec![
        node("node-takes-any-ack", &["4.5/ack-wrong-init-id"], Node::Credulous),
        node("node-takes-high-s-ack", &["4.5/ack-high-s"], Node::Credulous),
        node("node-takes-ack-with-bad-signature", &["4.5/ack-bad-signature"], Node::Credulous),
        node("node-takes-ack-of-another-key", &["4.5/ack-other-key"], Node::Credulous),
        node("node-takes-ack-with-empty-id", &["4.5/ack-empty-id"], Node::Credulous),
        node("node-takes-ack-with-bad-ephemeral", &["4.5/ack-bad-ephemeral"], Node::Credulous),
        node("node-ignores-welcome-tag", &["6.2/client-welcome-bad-tag"], Node::Credulous),
        node("node-takes-any-first-frame", &["7.2/client-first-frame-not-welcome"], Node::Credulous),
        node("node-drops-bytes-after-ack", &["4.4/client-ack-and-welcome-together"], Node::Raw(|t| Box::pin(drops_bytes_after_ack(t)))),
        node("node-request-id-0", &["7.1/client-request-ids"], Node::Raw(|t| Box::pin(request_id_zero(t)))),
        node("node-keeps-no-frame-limit", &["3/client-frame-over-limit"], Node::Raw(|t| Box::pin(no_frame_limit(t)))),
        node("node-limit-below-announced", &["3/client-frame-at-limit"], Node::Raw(|t| Box::pin(limit_below_announced(t)))),
        node("node-answers-pongs", &["7.1/client-pong-not-answered"], Node::Raw(|t| Box::pin(answers_pongs(t)))),
        node("node-ignores-pings", &["7.3/client-answers-ping"], Node::Raw(|t| Box::pin(ignores_pings(t)))),
        node("node-pings-at-the-announced-window", &["7.3/client-ping-spacing"], Node::Raw(|t| Box::pin(pings_fast(t)))),
        node("node-answers-error-pushes", &["7.4/client-error-push"], Node::Raw(|t| Box::pin(answers_error_push(t)))),
        node("node-no-device-check", &["8.4/client-deliver-wrong-device"], Node::Scenario),
        node("node-no-signature-check", &["8.4/client-deliver-bad-signature"], Node::Scenario),
        node("node-no-hash-check", &["8.4/client-deliver-bad-hash"], Node::Scenario),
        node("node-lenient-high-s", &["8.4/client-deliver-high-s"], Node::Scenario),
        node("node-sender-as-recipient", &["8.4/client-deliver-for-another-recipient"], Node::Scenario),
        node("node-no-dedup", &["8.5/client-duplicate-id"], Node::Scenario),
        node("node-resubscribes-on-replaced", &["8.4/client-replaced"], Node::Scenario),
        node("node-retries-at-once", &["8.3/client-rate-limited"], Node::Scenario),
        node("node-retries-with-new-nonce", &["8.3/client-rate-limited"], Node::Scenario),
        node("node-no-acks", &["8.4/client-acks"], Node::Scenario),
        node("node-one-nonce", &["8.3/client-send-signed"], Node::Scenario),
        node("node-skips-the-last-step", &["8.1/client-scenario"], Node::Scenario),
    ]
}

/// MUST cases no planted defect is aimed at, and why: what they check is covered by the
/// planted defects of neighbouring cases, or cannot be planted in these peers without
/// rebuilding the part of the relay they test.
const NOT_PLANTED: &[(&str, &str)] = &[
    (
        "1/non-canonical-frame",
        "the scripted relay does not keep registrations, and decoding elsewhere is prost's",
    ),
    (
        "3/client-frame-zero-length",
        "the client library and the suite's probe share one codec",
    ),
    (
        "4.3/handshake-deadline",
        "the relay's network layer (src/net), not wrapped here",
    ),
    (
        "4.3/handshake-deadline-partial",
        "the relay's network layer (src/net), not wrapped here",
    ),
    (
        "6.2/client-frame-bad-tag",
        "the client library and the suite's probe share one cipher",
    ),
    (
        "6.3/client-rotation",
        "the client library and the suite's probe share one cipher",
    ),
    (
        "6.3/client-rotation-late",
        "the client library and the suite's probe share one cipher",
    ),
    (
        "7.1/two-bodies-last-wins",
        "the scripted relay does not keep registrations, and decoding elsewhere is prost's",
    ),
    (
        "7.3/idle-restarted-by-frames",
        "the relay's timers (src/net), not wrapped here",
    ),
    (
        "7.3/idle-timeout",
        "the relay's timers (src/net), not wrapped here",
    ),
    (
        "7.3/pong-restarts-probe-timer",
        "the relay's timers (src/net), not wrapped here",
    ),
    (
        "7.3/pong-timeout",
        "the relay's timers (src/net), not wrapped here",
    ),
    (
        "7.3/probe-ping",
        "the relay's timers (src/net), not wrapped here",
    ),
    (
        "7.3/wrong-pong-ignored",
        "the relay's timers (src/net), not wrapped here",
    ),
    (
        "7.4/error-message-utf8",
        "decoding is prost's in every peer here",
    ),
    (
        "8.1/answers-in-order",
        "the relay's network layer orders answers",
    ),
    (
        "8.1/own-mailbox-only-subscribe",
        "subscriptions are the relay's delivery (src/relay), not wrapped here",
    ),
    (
        "8.1/pipelined-sees-earlier",
        "the relay's network layer orders requests",
    ),
    (
        "8.2/upload-appends",
        "the order of stored prekeys is the store's own",
    ),
    (
        "8.3/ticket-not-used-when-open",
        "ticket bookkeeping is the store's own rules",
    ),
    (
        "8.3/ticket-retry-not-used-again",
        "ticket bookkeeping is the store's own rules",
    ),
    (
        "8.4/acked-not-pushed",
        "subscriptions are the relay's delivery (src/relay), not wrapped here",
    ),
    (
        "8.4/large-backlog-flows",
        "subscriptions are the relay's delivery (src/relay), not wrapped here",
    ),
    (
        "8.4/replaced",
        "subscriptions are the relay's delivery (src/relay), not wrapped here",
    ),
    (
        "8.4/replaced-gets-no-deliveries",
        "subscriptions are the relay's delivery (src/relay), not wrapped here",
    ),
    (
        "8.4/resubscribe-restarts",
        "subscriptions are the relay's delivery (src/relay), not wrapped here",
    ),
    (
        "8.4/unregister-ends-subscription",
        "subscriptions are the relay's delivery (src/relay), not wrapped here",
    ),
    ("8.5/ids-increase", "id assignment is the store's own"),
    (
        "8.5/ids-not-reused-after-ack",
        "id assignment is the store's own",
    ),
    (
        "8.5/ids-survive-account-removal",
        "id assignment is the store's own",
    ),
    (
        "8.5/ids-survive-reregistration",
        "id assignment is the store's own",
    ),
    (
        "8.6/account-removed-with-last-device",
        "account removal is the store's own",
    ),
    (
        "8.6/expired-tickets-not-counted",
        "ticket bookkeeping is the store's own rules",
    ),
    (
        "8.6/removal-keeps-others-contacts",
        "account removal is the store's own",
    ),
];

/// The cases of `p` that did not FAIL against it (with their verdict and detail).
async fn escapes(p: &Planted) -> Vec<(&'static str, Verdict, String)> {
    let not_failed = |report: &Report| -> Vec<(&'static str, Verdict, String)> {
        p.cases
            .iter()
            .filter_map(|id| {
                let c = report.case(id).expect("the case ran");
                (c.outcome.verdict != Verdict::Fail)
                    .then(|| (*id, c.outcome.verdict, c.outcome.detail.clone()))
            })
            .collect()
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
            let report = run_cases(t, p.cases).await;
            r.stop().await;
            stop.cancel();
            not_failed(&report)
        }
        Peer::Script { good, broken } => {
            let report = run_cases(scripted(good()).await, p.cases).await;
            let not_passed: Vec<_> = p
                .cases
                .iter()
                .filter_map(|id| {
                    let c = report.case(id).expect("the case ran");
                    (c.outcome.verdict != Verdict::Pass).then(|| {
                        (
                            *id,
                            c.outcome.verdict,
                            format!("the correct script: {}", c.outcome.detail),
                        )
                    })
                })
                .collect();
            if !not_passed.is_empty() {
                return not_passed;
            }
            not_failed(&run_cases(scripted(broken()).await, p.cases).await)
        }
        Peer::Node(kind) => {
            let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), KeyPair::generate())
                .await
                .unwrap();
            let (addr, key, name, kind, runs) = (
                listener.local_addr(),
                listener.key(),
                p.name,
                *kind,
                p.cases.len(),
            );
            let node = tokio::spawn(async move {
                for _ in 0..runs {
                    run_node(kind, name, addr, key).await;
                }
            });
            let sel = Selection {
                cases: p.cases.iter().map(|s| s.to_string()).collect(),
                ..Selection::default()
            };
            let report = listener.run(&sel, Duration::from_secs(8), |_| {}).await;
            node.abort();
            not_failed(&report)
        }
    }
}

/// One connection of the planted node `kind` named `name`.
async fn run_node(kind: Node, name: &'static str, addr: std::net::SocketAddr, key: PublicKeyBytes) {
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
}

/// Runs every planted peer of `corpus` (4 at a time); panics naming the cases that missed one.
async fn all_caught(corpus: Vec<Planted>) {
    let missed: Vec<_> = futures_util::stream::iter(corpus.iter().map(|p| async move {
        escapes(p)
            .await
            .into_iter()
            .map(|e| (p.name, e))
            .collect::<Vec<_>>()
    }))
    .buffer_unordered(4)
    .collect::<Vec<_>>()
    .await
    .into_iter()
    .flatten()
    .collect();
    assert!(
        missed.is_empty(),
        "planted defects their cases did not catch: {missed:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_planted_relay_defect_is_caught() {
    all_caught(relay_corpus()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_planted_node_defect_is_caught() {
    all_caught(node_corpus()).await;
}

/// Every MUST case of both roles is aimed at by a planted defect, or named in [`NOT_PLANTED`].
#[test]
fn every_must_case_has_a_planted_defect_or_a_reason() {
    let musts: BTreeSet<&str> = relay::cases()
        .iter()
        .filter(|c| c.level == Level::Must)
        .map(|c| c.id)
        .chain(
            botd_tools::conformance::client::cases()
                .iter()
                .filter(|c| c.level == Level::Must)
                .map(|c| c.id),
        )
        .collect();
    let planted: BTreeSet<&str> = relay_corpus()
        .iter()
        .chain(node_corpus().iter())
        .flat_map(|p| p.cases.iter().copied())
        .collect();
    let excused: BTreeSet<&str> = NOT_PLANTED.iter().map(|(id, _)| *id).collect();
    let uncovered: Vec<_> = musts
        .difference(&planted)
        .filter(|id| !excused.contains(*id))
        .collect();
    assert!(
        uncovered.is_empty(),
        "MUST cases without a planted defect or a reason: {uncovered:#?}"
    );
    let stale: Vec<_> = excused
        .iter()
        .filter(|id| planted.contains(*id) || !musts.contains(*id))
        .collect();
    assert!(
        stale.is_empty(),
        "NOT_PLANTED names cases that are planted or not MUST: {stale:?}"
    );
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
        let row = doc
            .lines()
            .find(|l| l.starts_with(&format!("| `{}` | ", p.name)))
            .unwrap_or_else(|| panic!("docs/CONFORMANCE.md has no row for {}", p.name));
        for case in p.cases {
            assert!(ids.contains(case), "{}: no case {case}", p.name);
            assert!(
                row.contains(&format!("`{case}`")) || p.cases.len() > 3,
                "the row of {} does not name {case}",
                p.name
            );
        }
        if let Peer::Node(Node::Scenario) = p.peer {
            assert!(NodeFaults::named(p.name).is_some(), "{}", p.name);
        }
    }
    for (id, _) in NOT_PLANTED {
        assert!(
            doc.contains(&format!("`{id}`")),
            "docs/CONFORMANCE.md does not name {id}"
        );
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

/// Reads the `Ack` with a reader of its own and throws away what came with it: a `Welcome`
/// written in the same write as the `Ack` is lost, and the node waits for it in vain.
async fn drops_bytes_after_ack(t: Target) {
    let Some((mut stream, _with_the_ack)) = init_and_ack(t.addr, t.key).await else {
        return;
    };
    let mut codec = FrameCodec::new(1024);
    let mut session_buf = BytesMut::new();
    while stream.read_buf(&mut session_buf).await.unwrap_or(0) > 0 {
        if !matches!(codec.decode(&mut session_buf), Ok(None)) {
            return;
        }
    }
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

/// Reads frames of any length (up to 4 GiB): waits for the body of a huge one.
async fn no_frame_limit(t: Target) {
    let Some(mut p) = probe(&t).await else { return };
    p.set_max_frame_len(u32::MAX);
    let _ = p.call(Body::Register(registration(1, 1))).await;
    let _ = p.next_event(Duration::from_secs(10)).await;
}

/// Reads frames of at most the announced limit minus one byte.
async fn limit_below_announced(t: Target) {
    let Some(mut p) = probe(&t).await else { return };
    let limit = p.max_frame_len().saturating_sub(1);
    p.set_max_frame_len(limit);
    let _ = p.call(Body::Register(registration(1, 1))).await;
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
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        let Some((mut stream, mut buf)) = init_and_ack(addr, relay).await else {
            return;
        };
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

/// Connects, sends a hand-made `Init` and reads until the first frame (taken as the `Ack`,
/// unchecked) is whole; the stream and what arrived after that frame.
async fn init_and_ack(
    addr: std::net::SocketAddr,
    relay: PublicKeyBytes,
) -> Option<(TcpStream, BytesMut)> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let (me, eph) = (KeyPair::generate(), KeyPair::generate());
    let parts = botd_tools::conformance::wire::InitParts::new(&me, &eph, &relay);
    stream
        .write_all(&encode_frame(&parts.encode()))
        .await
        .ok()?;
    let mut buf = BytesMut::new();
    let mut codec = FrameCodec::new(1024);
    loop {
        if let Ok(Some(_ack)) = codec.decode(&mut buf) {
            return Some((stream, buf));
        }
        if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
            return None;
        }
    }
}
