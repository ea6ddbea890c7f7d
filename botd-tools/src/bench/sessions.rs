//! The `handshake`, `bulk` and `idle` scenarios (botd relays only), each with the bound it is
//! compared with, measured in the same process.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::time::{sleep, sleep_until, timeout, Instant};

use botd_client::{Client, ClientOptions};
use botd_protocol::cipher::{DirectionKeys, Opener, Sealer};
use botd_protocol::handshake::{respond, AwaitingAck};
use botd_protocol::keys::{KeyPair, PublicKeyBytes};

use super::load::Phases;
use super::procfs::Sample;
use super::scenario::{count_error, LoadParams};
use super::stats::{human, per_second, Latency};
use super::wire::Conn;
use super::{BulkArgs, HandshakeArgs, IdleArgs, IdleFigures, Params, RunResult, Target};

/// A connector stops after this many failed handshakes in a row.
const MAX_CONSECUTIVE_FAILURES: u32 = 100;
/// Time spent measuring each in-process bound.
const BOUND_TIME: Duration = Duration::from_secs(1);

/// Responder-side handshakes per second on one core: `respond` on one pre-built `Init` (one
/// signature verify, one ephemeral key, one Ack signature, three ECDH, HKDF).
pub fn handshake_bound(min_time: Duration) -> f64 {
    let relay = KeyPair::generate();
    let client = KeyPair::generate();
    let (_, init) = AwaitingAck::start(&client, *relay.public());
    let start = std::time::Instant::now();
    let mut count = 0u64;
    while count < 10 || start.elapsed() < min_time {
        black_box(respond(&relay, &init, |_| true).expect("valid Init"));
        count += 1;
    }
    count as f64 / start.elapsed().as_secs_f64()
}

/// Payload bytes per second through one `Sealer::seal_into` and one `Opener::open` each, for
/// frames of `size` plaintext bytes.
pub fn cipher_bound(size: usize, min_time: Duration) -> f64 {
    let keys = DirectionKeys {
        enc: [0x11; 32],
        mac: [0x22; 32],
    };
    let mut sealer = Sealer::new(keys.clone());
    let mut opener = Opener::new(keys);
    let plaintext = vec![0x42u8; size];
    let mut buf = BytesMut::with_capacity(size + 64);
    let start = std::time::Instant::now();
    let mut count = 0u64;
    while count < 3 || start.elapsed() < min_time {
        buf.clear();
        sealer.seal_into(&mut buf, size, |out| out.extend_from_slice(&plaintext));
        buf.advance(4);
        let opened = opener.open(buf).expect("own frame opens");
        black_box(&opened);
        buf = opened;
        count += 1;
    }
    (count as f64 * size as f64) / start.elapsed().as_secs_f64()
}

fn check_pid(pid: Option<u32>) -> Result<(), String> {
    if let Some(pid) = pid {
        Sample::take(Some(pid)).map_err(|err| format!("--server-pid {pid}: {err}"))?;
    }
    Ok(())
}

/// C connectors, each doing handshake after handshake (connect, Init/Ack, Welcome, close).
pub async fn handshake(
    args: &HandshakeArgs,
    addr: SocketAddr,
    relay: PublicKeyBytes,
) -> Result<RunResult, String> {
    let common = &args.common;
    check_pid(common.server_pid)?;
    if args.connectors == 0 {
        return Err("--connectors must be at least 1".into());
    }
    let phases = Phases::new(
        Instant::now(),
        common.warmup,
        common.duration,
        common.connect_timeout,
    );
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.connectors {
        let done = done.clone();
        let limit = common.connect_timeout;
        tasks.push(tokio::spawn(async move {
            let identity = KeyPair::generate();
            let mut latency = Latency::new();
            let mut errors = BTreeMap::new();
            let mut measured = 0u64;
            let mut failures_in_row = 0u32;
            while Instant::now() < phases.measure_end {
                let started = Instant::now();
                match Conn::connect(addr, &identity, relay, limit).await {
                    Ok(conn) => {
                        let finished = Instant::now();
                        drop(conn);
                        failures_in_row = 0;
                        done.fetch_add(1, Ordering::Relaxed);
                        if phases.measuring(started) && phases.measuring(finished) {
                            measured += 1;
                            latency.record(finished - started);
                        }
                    }
                    Err(err) => {
                        count_error(&mut errors, err);
                        failures_in_row += 1;
                        if failures_in_row >= MAX_CONSECUTIVE_FAILURES {
                            return Err(format!(
                                "{MAX_CONSECUTIVE_FAILURES} handshakes in a row failed; last: {}",
                                errors.keys().last().cloned().unwrap_or_default()
                            ));
                        }
                        sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            Ok::<_, String>((measured, latency, errors))
        }));
    }
    let progress = (!common.quiet).then(|| {
        let done = done.clone();
        tokio::spawn(async move {
            let mut last = 0;
            let mut tick = tokio::time::interval_at(
                phases.epoch + Duration::from_secs(1),
                Duration::from_secs(1),
            );
            while Instant::now() < phases.measure_end {
                tick.tick().await;
                let now = done.load(Ordering::Relaxed);
                eprintln!(
                    "[handshake] {:>5.1}s {:>9} handshakes/s  total {now}",
                    phases.epoch.elapsed().as_secs_f64(),
                    human((now - last) as f64)
                );
                last = now;
            }
        })
    });
    sleep_until(phases.measure_start).await;
    let server_start = common.server_pid.map(|pid| Sample::take(Some(pid)));
    let self_start = Sample::take(None);
    let count_start = done.load(Ordering::Relaxed);
    sleep_until(phases.measure_end).await;
    let server_end = common.server_pid.map(|pid| Sample::take(Some(pid)));
    let self_end = Sample::take(None);
    let count_end = done.load(Ordering::Relaxed);
    let ops = count_end - count_start;

    let mut latency = Latency::new();
    let mut errors = BTreeMap::new();
    let mut closed = Vec::new();
    let mut measured = 0;
    for (index, task) in tasks.into_iter().enumerate() {
        match timeout(common.connect_timeout + Duration::from_secs(1), task).await {
            Ok(Ok(Ok((n, l, e)))) => {
                measured += n;
                latency.merge(&l);
                for (what, count) in e {
                    *errors.entry(what).or_insert(0) += count;
                }
            }
            Ok(Ok(Err(err))) => closed.push(format!("connector {index}: {err}")),
            Ok(Err(err)) => closed.push(format!("connector {index}: task failed: {err}")),
            Err(_) => closed.push(format!("connector {index}: did not stop in time")),
        }
    }
    if let Some(progress) = progress {
        progress.abort();
    }
    let interval = phases.measure_end - phases.measure_start;
    let rate = per_second(measured, interval);
    let bound = handshake_bound(BOUND_TIME);
    let generator = match (self_start, self_end) {
        (Ok(start), Ok(end)) => Some(start.usage_until(&end, ops)),
        _ => None,
    };
    let mut warnings = Vec::new();
    if generator.is_some_and(|g| g.cpu_cores > 0.9) {
        warnings.push(
            "the load generator used more than 90% of a core (the initiator's crypto costs \
             about as much as the responder's): it may be the bottleneck"
                .to_owned(),
        );
    }
    Ok(RunResult {
        scenario: "handshake".into(),
        params: Params {
            connectors: Some(args.connectors),
            duration_s: common.duration.as_secs_f64(),
            warmup_s: common.warmup.as_secs_f64(),
            ..Params::default()
        },
        measured_s: interval.as_secs_f64(),
        ops: measured,
        ops_per_s: rate,
        latency_us: latency.summary(),
        server: match (server_start, server_end) {
            (Some(Ok(start)), Some(Ok(end))) => Some(start.usage_until(&end, ops)),
            _ => None,
        },
        generator,
        errors,
        closed,
        warnings,
        bound_per_s: Some(bound),
        bound_ratio: Some(rate / bound),
        ..RunResult::default()
    })
}

/// One sender session → one receiver session (two identities) with large payloads.
pub async fn bulk(
    args: &BulkArgs,
    addr: SocketAddr,
    relay: PublicKeyBytes,
) -> Result<RunResult, String> {
    let common = &args.common;
    let params = LoadParams {
        senders: 1,
        receivers: 1,
        payload: args.payload,
        window: args.window,
        rate: None,
        warmup: common.warmup,
        duration: common.duration,
        drain: args.drain,
        connect_timeout: common.connect_timeout,
        ack_each: false,
        sign: false,
        rate_label: None,
        progress: !common.quiet,
        server_pid: common.server_pid,
    };
    let title = format!("bulk {}", super::stats::human_bytes(args.payload as f64));
    let outcome = super::botd::run(&params, &[(addr, relay)], &title).await?;
    let mut result = outcome.into_result("bulk", &Target::Botd(addr.to_string()), params.params());
    let bound = cipher_bound(args.payload, BOUND_TIME);
    result.bound_per_s = Some(bound);
    result.bound_ratio = Some(result.bytes_per_s / bound);
    Ok(result)
}

/// K sessions authenticated and held open; the server's resident memory before and after.
pub async fn idle(
    args: &IdleArgs,
    addr: SocketAddr,
    relay: PublicKeyBytes,
) -> Result<RunResult, String> {
    let common = &args.common;
    let pid = common
        .server_pid
        .ok_or("the idle scenario needs --server-pid: it measures the server's memory")?;
    check_pid(Some(pid))?;
    let before = Sample::take(Some(pid))?;
    let started = Instant::now();
    let mut clients = Vec::with_capacity(args.sessions);
    let mut pending = Vec::new();
    let options = ClientOptions {
        connect_timeout: common.connect_timeout,
        ..ClientOptions::default()
    };
    let mut last_report = Instant::now();
    for chunk in (0..args.sessions).collect::<Vec<_>>().chunks(32) {
        for _ in chunk {
            let options = options.clone();
            pending.push(tokio::spawn(async move {
                Client::connect(addr, Arc::new(KeyPair::generate()), relay, options).await
            }));
        }
        for task in pending.drain(..) {
            let client = task
                .await
                .map_err(|err| format!("connect task: {err}"))?
                .map_err(|err| {
                    format!("session {} of {}: {err}", clients.len() + 1, args.sessions)
                })?;
            clients.push(client);
        }
        if !common.quiet && last_report.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "[idle] {} of {} sessions open",
                clients.len(),
                args.sessions
            );
            last_report = Instant::now();
        }
    }
    let connect_time = started.elapsed();
    // Let the relay settle (handshake buffers freed), then hold for the measured interval.
    sleep(common.warmup).await;
    let held_from = Sample::take(Some(pid))?;
    sleep(common.duration).await;
    let after = Sample::take(Some(pid))?;
    let usage = held_from.usage_until(&after, 0);
    drop(clients);
    let sessions = args.sessions;
    let per_session = if sessions > 0 {
        (after_rss(&before, &after)) / sessions as f64
    } else {
        0.0
    };
    Ok(RunResult {
        scenario: "idle".into(),
        params: Params {
            sessions: Some(sessions),
            duration_s: common.duration.as_secs_f64(),
            warmup_s: common.warmup.as_secs_f64(),
            ..Params::default()
        },
        measured_s: common.duration.as_secs_f64(),
        ops: sessions as u64,
        ops_per_s: per_second(sessions as u64, connect_time),
        server: Some(usage),
        idle: Some(IdleFigures {
            sessions,
            rss_before_bytes: before.usage_until(&before, 0).rss_start_bytes,
            rss_after_bytes: usage.rss_end_bytes,
            bytes_per_session: per_session,
        }),
        ..RunResult::default()
    })
}

fn after_rss(before: &Sample, after: &Sample) -> f64 {
    let usage = before.usage_until(after, 0);
    usage.rss_end_bytes as f64 - usage.rss_start_bytes as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_process_bounds_are_positive() {
        assert!(handshake_bound(Duration::from_millis(10)) > 0.0);
        assert!(cipher_bound(4096, Duration::from_millis(10)) > 0.0);
    }
}
