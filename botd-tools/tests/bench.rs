//! `botd bench` against an in-process relay on loopback: short `relay` runs that must deliver
//! every accepted message exactly once. Counts only, never rates.

use std::net::SocketAddr;
use std::time::Duration;

use botd_protocol::keys::PublicKeyBytes;
use botd_relay::config::Config;
use botd_tools::bench::botd;
use botd_tools::bench::scenario::LoadParams;
use botd_tools::bench::Target;

/// The relay's configuration with the application rate limits lifted, built from the same
/// `BOTD_*` variables `benches/compare.sh` sets.
fn lifted_config() -> Config {
    let unlimited = "{ per_second = 100000000.0, burst = 100000000 }";
    let mut vars: Vec<(String, String)> = [
        "BOTD_SEND_RATE_PER_IDENTITY",
        "BOTD_SEND_RATE_PER_PAIR",
        "BOTD_SEND_RATE_PER_IP",
        "BOTD_ACK_RATE_PER_IDENTITY",
        "BOTD_CHANGE_RATE_PER_IDENTITY",
        "BOTD_CHANGE_RATE_PER_IP",
        "BOTD_PREKEY_FETCH_RATE",
        "BOTD_HANDSHAKE_RATE_PER_IP",
    ]
    .iter()
    .map(|var| (var.to_string(), unlimited.to_string()))
    .collect();
    vars.push(("BOTD_MAILBOX_MAX_MESSAGES".into(), "100000".into()));
    vars.push(("BOTD_METRICS_LISTEN".into(), "off".into()));
    let mut config = Config::load(None, vars).expect("lifted limits parse");
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.data_dir = std::env::temp_dir();
    config
}

/// The only use of the shared harness: an in-process relay (application, in memory). The
/// returned guard keeps it running.
async fn relay() -> (SocketAddr, PublicKeyBytes, impl Sized) {
    let (relay, app) = botd_relay::testing::start_relay(lifted_config()).await;
    (relay.addr, relay.key, (relay, app))
}

fn params(senders: usize, receivers: usize) -> LoadParams {
    LoadParams {
        senders,
        receivers,
        payload: 100,
        window: 8,
        rate: None,
        warmup: Duration::from_millis(200),
        duration: Duration::from_secs(1),
        drain: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(10),
        ack_each: false,
        sign: false,
        rate_label: None,
        progress: false,
        server_pid: Some(std::process::id()),
    }
}

fn assert_exactly_once(params: &LoadParams, outcome: botd_tools::bench::scenario::Outcome) {
    let result = outcome.into_result("relay", &Target::Botd("test".into()), params.params());
    assert!(result.sent > 0, "{}", result.summary());
    assert_eq!(result.delivered, result.sent, "{}", result.summary());
    assert_eq!(result.lost, 0, "{}", result.summary());
    assert_eq!(result.duplicates, 0, "{}", result.summary());
    assert_eq!(result.out_of_order, 0, "{}", result.summary());
    assert!(result.errors.is_empty(), "{}", result.summary());
    assert!(result.closed.is_empty(), "{}", result.summary());
    assert!(result.clean());
    let latency = result.latency_us.expect("latency measured");
    assert_eq!(latency.samples, result.ops);
    assert!(
        result.server.is_some(),
        "CPU of the (in-process) server sampled"
    );
}

#[tokio::test]
async fn closed_loop_two_to_two_delivers_everything_exactly_once() {
    let (addr, key, _relay) = relay().await;
    let params = params(2, 2);
    let outcome = botd::run(&params, &[(addr, key)], "test")
        .await
        .expect("run completes");
    assert_eq!(outcome.sent_ok.len(), 2);
    assert!(outcome.sent_ok.iter().all(|&n| n > 0), "both senders sent");
    assert_exactly_once(&params, outcome);
}

#[tokio::test]
async fn open_loop_signed_with_one_ack_per_message_delivers_everything_exactly_once() {
    let (addr, key, _relay) = relay().await;
    let params = LoadParams {
        rate: Some(400.0),
        ack_each: true,
        sign: true,
        ..params(2, 1)
    };
    let outcome = botd::run(&params, &[(addr, key)], "test")
        .await
        .expect("run completes");
    // Two senders share one receiver; the schedule admits about 400 per second in all.
    let sent: u64 = outcome.sent_ok.iter().sum();
    assert!(sent <= 400 * 2, "open loop keeps to its schedule: {sent}");
    assert_exactly_once(&params, outcome);
}

#[tokio::test]
async fn flood_of_bad_inits_is_refused_while_a_good_peer_gets_through() {
    let (addr, key, _relay) = relay().await;
    let args = botd_tools::bench::FloodArgs {
        common: botd_tools::bench::CommonArgs {
            target: None,
            duration: Duration::from_secs(1),
            warmup: Duration::from_millis(200),
            server_pid: Some(std::process::id()),
            label: None,
            round: None,
            connect_timeout: Duration::from_secs(10),
            quiet: true,
        },
        rate: 200.0,
        addresses: 5,
        good_rate: 20.0,
        burst: 5,
        max_in_flight: 64,
    };
    let result = botd_tools::bench::flood::run(&args, addr, key)
        .await
        .expect("run completes");
    assert!(result.ops > 0, "{}", result.summary());
    assert!(result.errors.is_empty(), "{}", result.summary());
    let flood = result.flood.expect("flood figures");
    assert!(flood.attempts_per_s > 0.0, "{}", result.summary());
    assert!(flood.rejected_per_s > 0.0, "{}", result.summary());
    assert_eq!(flood.connect_failures, 0, "{}", result.summary());
}
