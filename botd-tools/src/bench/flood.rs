//! The `flood` scenario: many source addresses open connections and send `Init`s whose
//! signature does not verify, at a fixed total rate, while one good peer does handshake after
//! handshake; reported are the good peer's handshake latencies (connect to `Welcome`) and what
//! the flood achieved. A connect that waits about a second is a dropped SYN (the listen queue
//! was full), which is what this scenario is for.
//!
//! The flood's source addresses are `127.0.0.2`, `127.0.0.3`, …: loopback targets only.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio::time::{sleep_until, timeout, Instant};

use botd_protocol::codec::encode_frame;
use botd_protocol::keys::{KeyPair, PublicKeyBytes};
use botd_protocol::proto::Init;
use prost::Message as _;

use super::load::Phases;
use super::procfs::Sample;
use super::scenario::count_error;
use super::stats::{human, per_second, Latency};
use super::wire::Conn;
use super::{FloodArgs, Params, RunResult};

/// How long a flood connection waits for its connect, and then for the relay to close it.
const FLOOD_STEP_LIMIT: Duration = Duration::from_secs(5);

/// What the flood did over the measured interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct FloodFigures {
    /// Source addresses the flood came from.
    pub addresses: usize,
    /// Flood connections started per second (the asked rate, unless capped by in-flight).
    pub attempts_per_s: f64,
    /// Of them, connections the relay accepted and closed after the bad `Init`, per second.
    pub rejected_per_s: f64,
    /// Flood connections whose connect failed or timed out, in the interval.
    pub connect_failures: u64,
    /// Flood attempts skipped because `max_in_flight` connections were still open.
    pub skipped: u64,
    /// Flood connections started together.
    pub burst: usize,
}

/// An `Init` to `relay` whose signature does not verify (one bit of it flipped).
pub fn bad_init(relay: &PublicKeyBytes) -> Bytes {
    let (_, body) = botd_protocol::handshake::AwaitingAck::start(&KeyPair::generate(), *relay);
    let mut init = Init::decode(&body[..]).expect("own Init decodes");
    let mut signature = init.signature.to_vec();
    signature[10] ^= 0x01;
    init.signature = signature.into();
    encode_frame(&init.encode_to_vec())
}

/// The `n`th flood source address: 127.0.0.2, 127.0.0.3, … (`addresses` of them in turn).
pub fn flood_source(n: u64, addresses: usize) -> IpAddr {
    let k = (n % addresses.max(1) as u64) as u32;
    IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 2)) + k))
}

#[derive(Default)]
struct FloodCounts {
    started: AtomicU64,
    rejected: AtomicU64,
    connect_failures: AtomicU64,
    skipped: AtomicU64,
}

/// One flood connection: connect from `source`, send the bad `Init`, wait for the close.
async fn flood_once(source: IpAddr, addr: SocketAddr, init: Bytes, counts: &FloodCounts) {
    let attempt = async {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let mut stream = timeout(FLOOD_STEP_LIMIT, socket.connect(addr))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        Ok::<_, std::io::Error>(stream_after_connect(&mut stream, &init).await)
    };
    match attempt.await {
        Ok(true) => counts.rejected.fetch_add(1, Ordering::Relaxed),
        Ok(false) => 0,
        Err(_) => counts.connect_failures.fetch_add(1, Ordering::Relaxed),
    };
}

/// Sends `init` and reads until the relay closes; true if it did within the limit.
async fn stream_after_connect(stream: &mut tokio::net::TcpStream, init: &[u8]) -> bool {
    if stream.write_all(init).await.is_err() {
        return true;
    }
    let mut sink = [0u8; 256];
    let closed = async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    timeout(FLOOD_STEP_LIMIT, closed).await.is_ok()
}

/// Starts flood connections at `args.rate` per second until `until`, `args.burst` at a time
/// (one burst every `burst / rate` seconds).
async fn flood(
    args: FloodArgs,
    addr: SocketAddr,
    init: Bytes,
    counts: Arc<FloodCounts>,
    until: Instant,
) {
    let slots = Arc::new(Semaphore::new(args.max_in_flight.max(1)));
    let burst = args.burst.max(1) as u64;
    let every = Duration::from_secs_f64(burst as f64 / args.rate);
    let mut next = Instant::now();
    let mut launched = 0u64;
    while next < until {
        sleep_until(next).await;
        next += every;
        for _ in 0..burst {
            let n = launched;
            launched += 1;
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                counts.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            counts.started.fetch_add(1, Ordering::Relaxed);
            let (init, counts) = (init.clone(), counts.clone());
            let source = flood_source(n, args.addresses);
            tokio::spawn(async move {
                flood_once(source, addr, init, &counts).await;
                drop(permit);
            });
        }
    }
}

/// The good peer: handshakes from 127.0.0.1 at `rate` per second (back to back when one takes
/// longer), each timed from connect to `Welcome`; those that start and end inside the measured
/// interval are counted.
async fn good_peer(
    rate: f64,
    addr: SocketAddr,
    relay: PublicKeyBytes,
    phases: Phases,
    limit: Duration,
) -> (u64, Latency, BTreeMap<String, u64>) {
    let identity = KeyPair::generate();
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let (mut measured, mut latency, mut errors) = (0u64, Latency::new(), BTreeMap::new());
    let mut next = Instant::now();
    while next < phases.measure_end {
        sleep_until(next).await;
        next += interval;
        let started = Instant::now();
        match Conn::connect(addr, &identity, relay, limit).await {
            Ok(conn) => {
                let finished = Instant::now();
                conn.close().await;
                if phases.measuring(started) && phases.measuring(finished) {
                    measured += 1;
                    latency.record(finished - started);
                }
            }
            Err(err) => count_error(&mut errors, format!("good handshake: {err}")),
        }
    }
    (measured, latency, errors)
}

/// Runs the scenario against the relay at `addr` (loopback).
pub async fn run(
    args: &FloodArgs,
    addr: SocketAddr,
    relay: PublicKeyBytes,
) -> Result<RunResult, String> {
    let common = &args.common;
    if !addr.ip().is_loopback() || !addr.is_ipv4() {
        return Err(format!(
            "the flood scenario comes from 127.0.0.2 and up: it needs a relay on IPv4 loopback, not {addr}"
        ));
    }
    if !(args.rate.is_finite() && args.rate > 0.0) || args.addresses == 0 || args.addresses > 250 {
        return Err("--rate must be positive and --addresses between 1 and 250".into());
    }
    if let Some(pid) = common.server_pid {
        Sample::take(Some(pid)).map_err(|err| format!("--server-pid {pid}: {err}"))?;
    }
    let phases = Phases::new(
        Instant::now(),
        common.warmup,
        common.duration,
        common.connect_timeout,
    );
    let counts = Arc::new(FloodCounts::default());
    let flooding = tokio::spawn(flood(
        args.clone(),
        addr,
        bad_init(&relay),
        counts.clone(),
        phases.measure_end,
    ));
    let good = tokio::spawn(good_peer(
        args.good_rate,
        addr,
        relay,
        phases,
        common.connect_timeout,
    ));
    sleep_until(phases.measure_start).await;
    let server_start = common.server_pid.map(|pid| Sample::take(Some(pid)));
    let self_start = Sample::take(None);
    let before = snapshot(&counts);
    if !common.quiet {
        eprintln!("[flood] measuring for {:?}", common.duration);
    }
    sleep_until(phases.measure_end).await;
    let server_end = common.server_pid.map(|pid| Sample::take(Some(pid)));
    let self_end = Sample::take(None);
    let after = snapshot(&counts);
    let (measured, latency, errors) = good.await.map_err(|err| format!("good peer task: {err}"))?;
    let _ = flooding.await;
    let interval = phases.measure_end - phases.measure_start;
    let attempts = after[0] - before[0];
    let figures = FloodFigures {
        addresses: args.addresses,
        attempts_per_s: per_second(attempts, interval),
        rejected_per_s: per_second(after[1] - before[1], interval),
        connect_failures: after[2] - before[2],
        skipped: after[3] - before[3],
        burst: args.burst,
    };
    let mut warnings = Vec::new();
    if figures.attempts_per_s < 0.9 * args.rate {
        warnings.push(format!(
            "the flood reached {}/s of the {}/s asked ({} skipped at --max-in-flight)",
            human(figures.attempts_per_s),
            human(args.rate),
            figures.skipped
        ));
    }
    if !common.quiet {
        eprintln!(
            "[flood] {} bad Inits/s from {} addresses, {} good handshakes",
            human(figures.attempts_per_s),
            args.addresses,
            measured
        );
    }
    Ok(RunResult {
        scenario: "flood".into(),
        params: Params {
            rate: Some(args.rate),
            connectors: Some(1),
            duration_s: common.duration.as_secs_f64(),
            warmup_s: common.warmup.as_secs_f64(),
            ..Params::default()
        },
        measured_s: interval.as_secs_f64(),
        ops: measured,
        ops_per_s: per_second(measured, interval),
        latency_us: latency.summary(),
        // Server CPU per flood connection (the good handshakes are few).
        server: match (server_start, server_end) {
            (Some(Ok(start)), Some(Ok(end))) => Some(start.usage_until(&end, attempts)),
            _ => None,
        },
        generator: match (self_start, self_end) {
            (Ok(start), Ok(end)) => Some(start.usage_until(&end, attempts)),
            _ => None,
        },
        errors,
        warnings,
        flood: Some(figures),
        ..RunResult::default()
    })
}

fn snapshot(counts: &FloodCounts) -> [u64; 4] {
    [
        counts.started.load(Ordering::Relaxed),
        counts.rejected.load(Ordering::Relaxed),
        counts.connect_failures.load(Ordering::Relaxed),
        counts.skipped.load(Ordering::Relaxed),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use botd_protocol::handshake::{respond, HandshakeError};

    #[test]
    fn the_flood_init_is_refused_for_its_signature() {
        let relay = KeyPair::generate();
        let frame = bad_init(relay.public());
        let body = &frame[4..];
        assert_eq!(
            u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize,
            body.len()
        );
        let err = respond(&relay, body, |_| true).err().expect("refused");
        assert!(
            matches!(err, HandshakeError::Key { .. }),
            "refused for its signature, not its form: {err}"
        );
        assert_eq!(err.reason(), "bad_signature");
    }

    #[test]
    fn flood_sources_cycle_over_loopback_addresses() {
        assert_eq!(flood_source(0, 250), "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(
            flood_source(249, 250),
            "127.0.0.251".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            flood_source(250, 250),
            "127.0.0.2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(flood_source(3, 2), "127.0.0.3".parse::<IpAddr>().unwrap());
    }
}
