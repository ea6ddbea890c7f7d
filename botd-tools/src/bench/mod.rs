//! `botd bench`: a load generator for botd relays, NATS core and NATS JetStream, measured the
//! same way, and the report of a side-by-side comparison (docs/BENCHMARKS.md).
//!
//! Scenarios: `relay` (S senders → R receivers, closed or open loop), `handshake`, `bulk`,
//! `idle`; `report` turns the JSON results of `benches/compare.sh` into tables and a chart.
//! The target is chosen by the address: `HOST:PORT` or `botd://HOST:PORT` for a relay,
//! `nats://HOST:PORT` for NATS core, `jetstream://HOST:PORT` for JetStream.

pub mod botd;
pub mod flood;
pub mod load;
pub mod nats;
pub mod procfs;
pub mod report;
pub mod scenario;
pub mod sessions;
pub mod stats;
pub mod ticker;
pub mod wire;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use botd_protocol::keys::PublicKeyBytes;
use botd_protocol::DEFAULT_PORT;

use procfs::Usage;
use scenario::LoadParams;
use stats::{human, human_bytes, Percentiles};

/// Default port of a NATS server.
pub const NATS_PORT: u16 = 4222;

/// `botd bench …`
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Subcommand, Debug)]
pub enum Scenario {
    /// S senders → R receivers end to end (send → Deliver → ack), msgs/s and latency
    Relay(RelayArgs),
    /// C concurrent connectors doing full handshakes + Welcome, against the crypto bound
    Handshake(HandshakeArgs),
    /// One sender session → one receiver session with large payloads, bytes/s against the
    /// raw cipher
    Bulk(BulkArgs),
    /// K authenticated idle sessions: the server's memory per session
    Idle(IdleArgs),
    /// Bad-signature Inits from many loopback addresses while a good peer does handshakes:
    /// the good peer's handshake latency (relay on 127.0.0.1 only)
    Flood(FloodArgs),
    /// Medians, ratios and an SVG chart of the JSON lines a comparison wrote
    Report(report::ReportArgs),
}

/// Options every measuring scenario has.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// HOST:PORT or botd://HOST:PORT (a relay), nats://HOST:PORT, jetstream://HOST:PORT
    /// [default: the global --relay address]
    #[arg(value_name = "TARGET")]
    pub target: Option<String>,
    /// Measured interval
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Load before the measured interval, not counted
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Pid of the server under test (local): its CPU per operation and its memory
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
    /// Name of the target in results (e.g. "botd interval")
    #[arg(long)]
    pub label: Option<String>,
    /// Round number, recorded in the JSON for `bench report`
    #[arg(long)]
    pub round: Option<u32>,
    /// Limit for each connection's setup (TCP connect, handshake, Welcome, registration)
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// No progress line on stderr
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug, Clone)]
pub struct RelayArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Sender sessions (NATS: publisher connections)
    #[arg(long, short = 's', default_value_t = 16)]
    pub senders: usize,
    /// Receiver sessions (NATS: subscriber connections); sender i sends to receiver i mod R
    #[arg(long, short = 'r', default_value_t = 16)]
    pub receivers: usize,
    /// Payload bytes per message (at least 20), e.g. 100, 1KiB
    #[arg(long, default_value = "100", value_parser = parse_size)]
    pub payload: usize,
    /// Messages per sender sent and not yet received by its receiver, at most
    #[arg(long, default_value_t = 128)]
    pub window: u64,
    /// Open loop: messages per second over all senders, latency from the intended send time
    #[arg(long, value_name = "MSGS_PER_S")]
    pub rate: Option<f64>,
    /// Time after the measured interval for messages in flight to arrive
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain: Duration,
    /// One AckMessages per delivery instead of one per read batch (relay targets)
    #[arg(long)]
    pub ack_each: bool,
    /// What --rate stands for, when it is derived from another run (e.g. "half the relay's
    /// maximum"): recorded in the JSON, and `bench report` groups runs by it
    #[arg(long, requires = "rate")]
    pub rate_label: Option<String>,
    /// Sign every message and verify every delivery, relay targets (measures the generator's ECDSA too)
    #[arg(long)]
    pub sign: bool,
    /// A second relay on the same store (HOST:PORT=KEYHEX): every other sender and receiver
    /// connects there, so messages cross relays
    #[arg(long, value_name = "ADDR=KEY")]
    pub also: Option<String>,
    /// Replicas of the stream a JetStream target creates (3 on a cluster of three)
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
}

#[derive(Args, Debug, Clone)]
pub struct HandshakeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Concurrent connectors
    #[arg(long, short = 'c', default_value_t = 16)]
    pub connectors: usize,
}

#[derive(Args, Debug, Clone)]
pub struct BulkArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Payload bytes per message, e.g. 256KiB (at most the relay's max_payload_len)
    #[arg(long, default_value = "256KiB", value_parser = parse_size)]
    pub payload: usize,
    /// Messages sent and not yet received, at most
    #[arg(long, default_value_t = 8)]
    pub window: u64,
    /// Time after the measured interval for messages in flight to arrive
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct FloodArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Bad-signature Inits per second, over all flooding addresses
    #[arg(long, default_value_t = 5000.0)]
    pub rate: f64,
    /// Flooding source addresses: 127.0.0.2 and up (at most 250)
    #[arg(long, default_value_t = 250)]
    pub addresses: usize,
    /// The good peer's handshakes per second (from 127.0.0.1; back to back if slower)
    #[arg(long, default_value_t = 20.0)]
    pub good_rate: f64,
    /// Flood connections started together, one from each address in turn (a burst every
    /// burst / rate seconds; 1 spreads them evenly)
    #[arg(long, default_value_t = 250)]
    pub burst: usize,
    /// Flood connections open at once, at most
    #[arg(long, default_value_t = 4096)]
    pub max_in_flight: usize,
}

#[derive(Args, Debug, Clone)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Sessions to open and hold
    #[arg(long, short = 'k', default_value_t = 1000)]
    pub sessions: usize,
}

/// `100`, `100B`, `1k`, `1KiB`, `2M`, `2MiB` (k and M are powers of 1024).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: usize = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 100, 1KiB, 256KiB, 1MiB)"))?;
    let factor = match unit.trim() {
        "" | "B" | "b" => 1,
        "k" | "K" | "KiB" | "kiB" | "KB" | "kB" => 1024,
        "M" | "MiB" | "MB" => 1 << 20,
        other => return Err(format!("unknown size unit {other:?} in {text:?}")),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// What a run talks to, from the scheme of its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A botd relay at HOST:PORT.
    Botd(String),
    /// NATS core pub/sub.
    Nats(String),
    /// NATS JetStream.
    JetStream(String),
}

impl Target {
    pub fn parse(text: &str) -> Result<Target, String> {
        let text = text.trim();
        let with_port = |addr: &str, port: u16| {
            if addr.is_empty() {
                Err(format!("{text:?} has no address"))
            } else if has_port(addr) {
                Ok(addr.to_owned())
            } else {
                Ok(format!("{addr}:{port}"))
            }
        };
        if let Some(addr) = text.strip_prefix("botd://") {
            Ok(Target::Botd(with_port(addr, DEFAULT_PORT)?))
        } else if let Some(addr) = text.strip_prefix("nats://") {
            Ok(Target::Nats(with_port(addr, NATS_PORT)?))
        } else if let Some(addr) = text.strip_prefix("jetstream://") {
            Ok(Target::JetStream(with_port(addr, NATS_PORT)?))
        } else if let Some((scheme, _)) = text.split_once("://") {
            Err(format!(
                "unknown scheme {scheme}:// (use botd://, nats:// or jetstream://)"
            ))
        } else {
            Ok(Target::Botd(with_port(text, DEFAULT_PORT)?))
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Target::Botd(_) => "botd",
            Target::Nats(_) => "nats",
            Target::JetStream(_) => "jetstream",
        }
    }

    pub fn addr(&self) -> &str {
        match self {
            Target::Botd(addr) | Target::Nats(addr) | Target::JetStream(addr) => addr,
        }
    }
}

fn has_port(addr: &str) -> bool {
    addr.rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

/// The parameters of a run, as recorded in its result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Params {
    pub senders: Option<usize>,
    pub receivers: Option<usize>,
    pub payload: Option<usize>,
    pub window: Option<u64>,
    pub rate: Option<f64>,
    pub connectors: Option<usize>,
    pub sessions: Option<usize>,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub ack_each: bool,
    pub sign: bool,
    /// What the open-loop rate stands for when it is derived from another run (e.g. "half
    /// the relay's maximum"): reports group such runs by this, not by the rate.
    pub rate_label: Option<String>,
}

/// Memory of idle sessions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct IdleFigures {
    pub sessions: usize,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    pub bytes_per_session: f64,
}

/// One run's figures: what `--json` prints and `bench report` reads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunResult {
    pub scenario: String,
    /// `botd`, `nats` or `jetstream`.
    pub target: String,
    /// Display name of the target (default: `target`).
    pub label: String,
    pub round: Option<u32>,
    pub addr: String,
    pub params: Params,
    pub measured_s: f64,
    /// Operations in the measured interval: messages delivered, handshakes, sessions.
    pub ops: u64,
    pub ops_per_s: f64,
    /// Payload bytes delivered per second in the measured interval.
    pub bytes_per_s: f64,
    pub latency_us: Option<Percentiles>,
    pub server: Option<Usage>,
    pub generator: Option<Usage>,
    /// Messages the target accepted, over the whole run (warm-up and drain included).
    pub sent: u64,
    /// Distinct messages received, over the whole run.
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Refused requests and failed operations, by kind.
    pub errors: BTreeMap<String, u64>,
    /// Connections that ended the run early, with the reason.
    pub closed: Vec<String>,
    pub warnings: Vec<String>,
    /// handshake: responder crypto per second on one core; bulk: raw seal+open bytes/s.
    pub bound_per_s: Option<f64>,
    /// Measured rate over `bound_per_s`.
    pub bound_ratio: Option<f64>,
    pub idle: Option<IdleFigures>,
    /// relay: the server's resident memory before the sessions connected and at the end of
    /// the measured interval, per session (senders and receivers).
    pub busy: Option<IdleFigures>,
    pub flood: Option<flood::FloodFigures>,
}

impl RunResult {
    /// True when nothing was lost, duplicated, refused or closed.
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.duplicates == 0 && self.errors.is_empty() && self.closed.is_empty()
    }

    /// The loud part: what went wrong in this run, one line each.
    pub fn problems(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if self.lost > 0 {
            lines.push(format!(
                "LOST {} of {} accepted messages",
                self.lost, self.sent
            ));
        }
        if self.duplicates > 0 {
            lines.push(format!(
                "DUPLICATES: {} messages arrived twice",
                self.duplicates
            ));
        }
        for (what, n) in &self.errors {
            lines.push(format!("ERROR {what}: {n}"));
        }
        for closed in &self.closed {
            lines.push(format!("CLOSED {closed}"));
        }
        lines
    }

    /// The summary table printed at the end of a run.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let mut row = |name: &str, value: String| out.push_str(&format!("  {name:<22} {value}\n"));
        row(
            "scenario",
            format!("{} → {} ({})", self.scenario, self.label, self.addr),
        );
        let p = &self.params;
        let mut shape = Vec::new();
        if let (Some(s), Some(r)) = (p.senders, p.receivers) {
            shape.push(format!("{s}→{r} sessions"));
        }
        if let Some(payload) = p.payload {
            shape.push(format!("{} payload", human_bytes(payload as f64)));
        }
        if let Some(window) = p.window {
            shape.push(format!("window {window}"));
        }
        if let Some(rate) = p.rate {
            shape.push(format!("open loop {} msgs/s", human(rate)));
        }
        if let Some(label) = &p.rate_label {
            shape.push(format!("({label})"));
        }
        if let Some(c) = p.connectors {
            shape.push(format!("{c} connectors"));
        }
        if let Some(k) = p.sessions {
            shape.push(format!("{k} sessions"));
        }
        if p.sign {
            shape.push("signed".into());
        }
        if p.ack_each {
            shape.push("ack each".into());
        }
        row("shape", shape.join(", "));
        row(
            "measured",
            format!("{:.2} s after {:.1} s warm-up", self.measured_s, p.warmup_s),
        );
        let unit = match self.scenario.as_str() {
            "handshake" => "handshakes/s",
            "flood" => "good handshakes/s",
            "idle" => "sessions/s (connect)",
            _ => "msgs/s",
        };
        row(
            unit,
            format!("{} ({} in the interval)", human(self.ops_per_s), self.ops),
        );
        if self.bytes_per_s > 0.0 {
            row("payload bytes/s", human_bytes(self.bytes_per_s) + "/s");
        }
        if let Some(l) = &self.latency_us {
            row(
                "latency µs",
                format!(
                    "p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
                    l.p50, l.p90, l.p99, l.p999, l.max
                ),
            );
        }
        if let Some(bound) = self.bound_per_s {
            let what = if self.scenario == "bulk" {
                format!("{}/s raw seal+open", human_bytes(bound))
            } else {
                format!("{} handshakes/s responder crypto", human(bound))
            };
            row("bound (one core)", what);
        }
        if let Some(ratio) = self.bound_ratio {
            row("measured / bound", format!("{ratio:.3}"));
        }
        for (name, memory, sessions) in [
            ("server RSS", &self.idle, "sessions"),
            ("server RSS (busy)", &self.busy, "busy sessions"),
        ] {
            if let Some(memory) = memory {
                row(
                    name,
                    format!(
                        "{} before the sessions, {} with {} {sessions}: {} per session",
                        human_bytes(memory.rss_before_bytes as f64),
                        human_bytes(memory.rss_after_bytes as f64),
                        memory.sessions,
                        human_bytes(memory.bytes_per_session)
                    ),
                );
            }
        }
        if let Some(flood) = &self.flood {
            row(
                "flood",
                format!(
                    "{} bad Inits/s from {} addresses in bursts of {}, {} refused/s, {} connects failed, {} skipped",
                    human(flood.attempts_per_s),
                    flood.addresses,
                    flood.burst,
                    human(flood.rejected_per_s),
                    flood.connect_failures,
                    flood.skipped
                ),
            );
        }
        if let Some(server) = &self.server {
            row(
                "server CPU",
                format!(
                    "{:.2} µs per op, {:.0}% of a core",
                    server.cpu_us_per_op,
                    server.cpu_cores * 100.0
                ),
            );
            if self.idle.is_none() {
                row(
                    "server RSS",
                    format!(
                        "{} → {}",
                        human_bytes(server.rss_start_bytes as f64),
                        human_bytes(server.rss_end_bytes as f64)
                    ),
                );
            }
        }
        if let Some(generator) = &self.generator {
            row(
                "generator CPU",
                format!("{:.0}% of a core", generator.cpu_cores * 100.0),
            );
        }
        if self.sent > 0 || self.delivered > 0 {
            row(
                "accounting",
                format!(
                    "{} accepted, {} delivered, {} lost, {} duplicates, {} out of order",
                    self.sent, self.delivered, self.lost, self.duplicates, self.out_of_order
                ),
            );
        }
        for warning in &self.warnings {
            row("warning", warning.clone());
        }
        let problems = self.problems();
        if !problems.is_empty() {
            out.push_str("  !!! THIS RUN IS NOT CLEAN !!!\n");
            for line in problems {
                out.push_str(&format!("  !!! {line}\n"));
            }
        }
        out
    }
}

async fn resolve(addr: &str) -> Result<SocketAddr, String> {
    tokio::net::lookup_host(addr)
        .await
        .map_err(|err| format!("cannot resolve {addr}: {err}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to no address"))
}

fn relay_key(server_key: Option<&str>) -> Result<PublicKeyBytes, String> {
    let hex = server_key
        .ok_or("a relay target needs the relay's key: --server-key HEX or BOTD_SERVER_KEY")?;
    PublicKeyBytes::from_hex(hex.trim()).map_err(|err| format!("--server-key: {err}"))
}

fn only_botd(target: &Target, scenario: &str) -> Result<(), String> {
    match target {
        Target::Botd(_) => Ok(()),
        other => Err(format!(
            "the {scenario} scenario measures botd relays only, not {}://",
            other.kind()
        )),
    }
}

/// The longest a whole run may take: every setup step at its timeout, the phases, and a
/// margin. Only a safety net: each step has its own, shorter bound.
pub fn run_limit(scenario: &Scenario, common: &CommonArgs) -> Duration {
    const SETUP_CONCURRENCY: u32 = 32;
    let connections = match scenario {
        Scenario::Relay(a) => (a.senders + a.receivers) as u32,
        Scenario::Bulk(_) => 2,
        Scenario::Handshake(_) => 1,
        Scenario::Idle(a) => a.sessions as u32,
        Scenario::Flood(_) => 1,
        Scenario::Report(_) => 0,
    };
    let drain = match scenario {
        Scenario::Relay(a) => a.drain,
        Scenario::Bulk(a) => a.drain,
        _ => Duration::ZERO,
    };
    // Connect and register per chunk of connections, then subscribe one by one.
    let setup_steps = 2 * connections.div_ceil(SETUP_CONCURRENCY) + connections + 2;
    common.connect_timeout * setup_steps
        + common.warmup
        + common.duration
        + drain
        + Duration::from_secs(30)
}

/// Entry point of `botd bench`. `default_target` is the global `--relay` address,
/// `server_key` the global `--server-key`.
/// Runs a scenario; with `json` (the CLI's global `--json`) the result is one JSON object on
/// stdout instead of the summary table.
pub async fn run(
    args: BenchArgs,
    default_target: &str,
    server_key: Option<&str>,
    json: bool,
) -> Result<(), String> {
    let common = match &args.scenario {
        Scenario::Relay(a) => a.common.clone(),
        Scenario::Handshake(a) => a.common.clone(),
        Scenario::Bulk(a) => a.common.clone(),
        Scenario::Idle(a) => a.common.clone(),
        Scenario::Flood(a) => a.common.clone(),
        Scenario::Report(report) => return report::run(report),
    };
    let target = Target::parse(common.target.as_deref().unwrap_or(default_target))?;
    let limit = run_limit(&args.scenario, &common);
    let scenario = async {
        match args.scenario {
            Scenario::Relay(a) => relay(&a, &target, server_key).await,
            Scenario::Handshake(a) => {
                only_botd(&target, "handshake")?;
                let addr = resolve(target.addr()).await?;
                sessions::handshake(&a, addr, relay_key(server_key)?).await
            }
            Scenario::Bulk(a) => {
                only_botd(&target, "bulk")?;
                let addr = resolve(target.addr()).await?;
                sessions::bulk(&a, addr, relay_key(server_key)?).await
            }
            Scenario::Idle(a) => {
                only_botd(&target, "idle")?;
                let addr = resolve(target.addr()).await?;
                sessions::idle(&a, addr, relay_key(server_key)?).await
            }
            Scenario::Flood(a) => {
                only_botd(&target, "flood")?;
                let addr = resolve(target.addr()).await?;
                flood::run(&a, addr, relay_key(server_key)?).await
            }
            Scenario::Report(_) => unreachable!("handled above"),
        }
    };
    let mut result = tokio::time::timeout(limit, scenario)
        .await
        .map_err(|_| format!("the run did not finish within {limit:?}; gave up"))??;
    result.target = target.kind().to_owned();
    result.addr = target.addr().to_owned();
    result.label = common
        .label
        .clone()
        .unwrap_or_else(|| target.kind().to_owned());
    result.round = common.round;
    if json {
        println!(
            "{}",
            serde_json::to_string(&result).map_err(|err| format!("json: {err}"))?
        );
    } else {
        print!("{}", result.summary());
    }
    for line in result.problems() {
        eprintln!("botd bench: {line}");
    }
    Ok(())
}

/// Builds the run parameters of the `relay` scenario from its arguments.
pub fn load_params(args: &RelayArgs) -> LoadParams {
    LoadParams {
        senders: args.senders,
        receivers: args.receivers,
        payload: args.payload,
        window: args.window,
        rate: args.rate,
        warmup: args.common.warmup,
        duration: args.common.duration,
        drain: args.drain,
        connect_timeout: args.common.connect_timeout,
        ack_each: args.ack_each,
        sign: args.sign,
        rate_label: args.rate_label.clone(),
        progress: !args.common.quiet,
        server_pid: args.common.server_pid,
    }
}

async fn relay(
    args: &RelayArgs,
    target: &Target,
    server_key: Option<&str>,
) -> Result<RunResult, String> {
    let params = load_params(args);
    params.check()?;
    let title = format!(
        "{} {}→{} {}",
        args.common.label.as_deref().unwrap_or(target.kind()),
        params.senders,
        params.receivers,
        human_bytes(params.payload as f64)
    );
    let rss_before = params
        .server_pid
        .map(|pid| procfs::rss_bytes(Some(pid)))
        .transpose()?;
    let outcome = match target {
        Target::Botd(addr) => {
            let mut relays = vec![(resolve(addr).await?, relay_key(server_key)?)];
            if let Some(also) = &args.also {
                let (addr, key) = also
                    .split_once('=')
                    .ok_or("--also takes HOST:PORT=KEYHEX")?;
                relays.push((resolve(addr).await?, relay_key(Some(key))?));
            }
            botd::run(&params, &relays, &title).await?
        }
        Target::Nats(addr) => nats::run_core(&params, addr, &title).await?,
        Target::JetStream(addr) => {
            nats::run_jetstream(&params, addr, &title, args.replicas).await?
        }
    };
    let mut result = outcome.into_result("relay", target, params.params());
    result.busy = busy_memory(rss_before, &result, params.senders + params.receivers);
    Ok(result)
}

/// The server's memory per busy session: resident memory at the end of the measured interval
/// less what it held before the sessions connected, over the sessions.
fn busy_memory(
    rss_before: Option<u64>,
    result: &RunResult,
    sessions: usize,
) -> Option<IdleFigures> {
    let (before, server) = (rss_before?, result.server?);
    Some(IdleFigures {
        sessions,
        rss_before_bytes: before,
        rss_after_bytes: server.rss_end_bytes,
        bytes_per_session: (server.rss_end_bytes as f64 - before as f64) / sessions.max(1) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Subcommand, Debug)]
    enum Command {
        Bench(BenchArgs),
    }

    fn parse(args: &[&str]) -> BenchArgs {
        let Command::Bench(bench) =
            Cli::try_parse_from(std::iter::once("botd").chain(args.iter().copied()))
                .unwrap_or_else(|err| panic!("{args:?}: {err}"))
                .command;
        bench
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("100B"), Ok(100));
        assert_eq!(parse_size("1KiB"), Ok(1024));
        assert_eq!(parse_size("256KiB"), Ok(262_144));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert!(parse_size("1.5k").is_err());
        assert!(parse_size("10 parsecs").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn targets_by_scheme() {
        assert_eq!(
            Target::parse("127.0.0.1:9000"),
            Ok(Target::Botd("127.0.0.1:9000".into()))
        );
        assert_eq!(
            Target::parse("botd://localhost"),
            Ok(Target::Botd("localhost:9945".into()))
        );
        assert_eq!(
            Target::parse("nats://127.0.0.1"),
            Ok(Target::Nats("127.0.0.1:4222".into()))
        );
        assert_eq!(
            Target::parse("jetstream://10.0.0.1:4333"),
            Ok(Target::JetStream("10.0.0.1:4333".into()))
        );
        assert!(Target::parse("http://x").is_err());
        assert!(Target::parse("nats://").is_err());
    }

    #[test]
    fn relay_arguments_and_defaults() {
        let args = parse(&["bench", "relay", "nats://127.0.0.1:4222"]);
        let Scenario::Relay(relay) = args.scenario else {
            panic!("relay expected")
        };
        assert_eq!(
            relay.common.target.as_deref(),
            Some("nats://127.0.0.1:4222")
        );
        assert_eq!(
            (relay.senders, relay.receivers, relay.payload, relay.window),
            (16, 16, 100, 128)
        );
        assert_eq!(relay.common.duration, Duration::from_secs(10));
        assert_eq!(relay.rate, None);
        assert!(!relay.ack_each && !relay.sign);

        let args = parse(&[
            "bench",
            "relay",
            "-s",
            "1",
            "-r",
            "1",
            "--payload",
            "1KiB",
            "--window",
            "8",
            "--rate",
            "5000",
            "--duration",
            "5s",
            "--warmup",
            "500ms",
            "--server-pid",
            "42",
            "--label",
            "botd interval",
            "--round",
            "3",
            "--ack-each",
            "--sign",
        ]);
        let Scenario::Relay(relay) = args.scenario else {
            panic!("relay expected")
        };
        let params = load_params(&relay);
        assert_eq!(
            (
                params.senders,
                params.receivers,
                params.payload,
                params.window
            ),
            (1, 1, 1024, 8)
        );
        assert_eq!(params.rate, Some(5000.0));
        assert_eq!(params.sender_interval(), Some(Duration::from_micros(200)));
        assert_eq!(params.warmup, Duration::from_millis(500));
        assert_eq!(params.server_pid, Some(42));
        assert!(params.ack_each && params.sign);
        assert_eq!(relay.common.round, Some(3));
        assert_eq!(relay.common.target, None);
    }

    #[test]
    fn other_scenarios_parse() {
        let Scenario::Handshake(h) = parse(&["bench", "handshake", "-c", "4"]).scenario else {
            panic!()
        };
        assert_eq!(h.connectors, 4);
        let Scenario::Bulk(b) = parse(&["bench", "bulk"]).scenario else {
            panic!()
        };
        assert_eq!((b.payload, b.window), (262_144, 8));
        let Scenario::Idle(i) = parse(&["bench", "idle", "-k", "50"]).scenario else {
            panic!()
        };
        assert_eq!(i.sessions, 50);
        assert!(matches!(
            parse(&["bench", "report", "r.jsonl"]).scenario,
            Scenario::Report(_)
        ));
    }

    #[test]
    fn whole_run_limit_covers_setup_phases_and_drain() {
        let args = parse(&["bench", "relay", "-s", "2", "-r", "2", "--duration", "5s"]);
        let Scenario::Relay(relay) = &args.scenario else {
            panic!()
        };
        // 4 connections: 2 setup chunks + 4 subscribes + 2, at 10 s each; 2 + 5 + 10 + 30 s.
        assert_eq!(
            run_limit(&args.scenario, &relay.common),
            Duration::from_secs(80 + 47)
        );
    }

    #[test]
    fn bad_parameters_are_refused() {
        let args = parse(&["bench", "relay", "--window", "0"]);
        let Scenario::Relay(relay) = args.scenario else {
            panic!()
        };
        assert!(load_params(&relay)
            .check()
            .unwrap_err()
            .contains("--window"));
        let args = parse(&["bench", "relay", "--rate=-5"]);
        let Scenario::Relay(relay) = args.scenario else {
            panic!()
        };
        assert!(load_params(&relay).check().is_err());
    }

    #[test]
    fn summary_says_loudly_when_a_run_lost_messages() {
        let mut result = RunResult {
            scenario: "relay".into(),
            label: "botd".into(),
            sent: 10,
            delivered: 9,
            lost: 1,
            ..RunResult::default()
        };
        result.errors.insert("Send: RATE_LIMITED".into(), 2);
        assert!(!result.clean());
        let text = result.summary();
        assert!(text.contains("NOT CLEAN"), "{text}");
        assert!(text.contains("LOST 1 of 10"), "{text}");
        assert!(text.contains("RATE_LIMITED: 2"), "{text}");
        let json = serde_json::to_string(&result).unwrap();
        let back: RunResult = serde_json::from_str(&json).unwrap();
        assert_eq!(back, result);
    }
}
