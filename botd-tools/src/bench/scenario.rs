//! The `relay` scenario's run, whatever the target: phases (warm-up, measured interval,
//! drain), the progress line, CPU and memory samples at the edges of the measured interval, and
//! the tallies of every sender and receiver merged into one [`RunResult`].

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, Instant};

use super::load::{Pacer, Schedule, Shared, Tally};
use super::procfs::{Sample, Usage};
use super::stats::{human, per_second};
use super::{Params, RunResult, Target};

/// What a `relay` run is asked to do.
#[derive(Debug, Clone)]
pub struct LoadParams {
    pub senders: usize,
    pub receivers: usize,
    pub payload: usize,
    /// Messages of one sender not yet received by its receiver, at most.
    pub window: u64,
    /// Open loop: messages per second over all senders. `None`: closed loop.
    pub rate: Option<f64>,
    pub warmup: Duration,
    pub duration: Duration,
    /// Time after the measured interval for messages in flight to arrive.
    pub drain: Duration,
    pub connect_timeout: Duration,
    /// One `AckMessages` per delivery instead of one per read batch.
    pub ack_each: bool,
    /// Sign every message and verify every delivery for real (measures the generator).
    pub sign: bool,
    /// What the open-loop rate stands for, if derived from another run.
    pub rate_label: Option<String>,
    /// Print a progress line on stderr once a second.
    pub progress: bool,
    /// The server process, for CPU and memory figures.
    pub server_pid: Option<u32>,
}

impl LoadParams {
    pub fn check(&self) -> Result<(), String> {
        if self.senders == 0 || self.receivers == 0 {
            return Err("need at least one sender and one receiver".into());
        }
        if self.window == 0 {
            return Err("--window must be at least 1".into());
        }
        if self.duration.is_zero() {
            return Err("--duration must be positive".into());
        }
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && rate > 0.0) {
                return Err("--rate must be a positive number of messages per second".into());
            }
        }
        if let Some(pid) = self.server_pid {
            Sample::take(Some(pid)).map_err(|err| format!("--server-pid {pid}: {err}"))?;
        }
        Ok(())
    }

    /// The interval between one sender's messages in open loop.
    pub fn sender_interval(&self) -> Option<Duration> {
        self.rate
            .map(|rate| Duration::from_secs_f64(self.senders as f64 / rate))
    }

    /// The open-loop schedule of a run that starts at `start`.
    pub fn schedule(&self, start: Instant) -> Option<Schedule> {
        self.sender_interval().map(|interval| Schedule {
            start,
            interval,
            senders: self.senders,
        })
    }

    /// Sender `index`'s pacer in a run that starts at `start`.
    pub fn pacer(&self, start: Instant, index: usize) -> Pacer {
        Pacer::new(self.window, self.schedule(start), index)
    }

    pub fn params(&self) -> Params {
        Params {
            senders: Some(self.senders),
            receivers: Some(self.receivers),
            payload: Some(self.payload),
            window: Some(self.window),
            rate: self.rate,
            duration_s: self.duration.as_secs_f64(),
            warmup_s: self.warmup.as_secs_f64(),
            ack_each: self.ack_each,
            sign: self.sign,
            rate_label: self.rate_label.clone(),
            ..Params::default()
        }
    }
}

/// A sender's account at the end.
#[derive(Debug, Default)]
pub struct SenderReport {
    /// Messages the target accepted (relay: `Sent`; JetStream: publish ack; NATS core: published).
    pub sent_ok: u64,
    /// Messages the target refused.
    pub failed: u64,
    pub errors: BTreeMap<String, u64>,
}

/// A receiver's account at the end.
pub struct ReceiverReport {
    pub tally: Tally,
    pub errors: BTreeMap<String, u64>,
}

pub fn count_error(errors: &mut BTreeMap<String, u64>, what: impl Into<String>) {
    *errors.entry(what.into()).or_insert(0) += 1;
}

pub type Task<T> = JoinHandle<Result<T, String>>;

/// Runs the phases for tasks already spawned against `shared`, then merges their reports.
pub async fn orchestrate(
    shared: Arc<Shared>,
    params: &LoadParams,
    title: &str,
    senders: Vec<Task<SenderReport>>,
    receivers: Vec<Task<ReceiverReport>>,
) -> Outcome {
    let phases = shared.phases;
    let progress = params
        .progress
        .then(|| tokio::spawn(progress_line(shared.clone(), title.to_owned())));
    let ticker = params
        .schedule(phases.epoch)
        .map(|schedule| super::ticker::spawn(shared.clone(), schedule, phases.measure_end));

    sleep_until(phases.measure_start).await;
    let server_start = params.server_pid.map(|pid| Sample::take(Some(pid)));
    let self_start = Sample::take(None);
    let delivered_start = shared.progress.delivered.load(Ordering::Relaxed);
    sleep_until(phases.measure_end).await;
    let server_end = params.server_pid.map(|pid| Sample::take(Some(pid)));
    let self_end = Sample::take(None);
    let delivered_end = shared.progress.delivered.load(Ordering::Relaxed);
    let measured_ops = delivered_end - delivered_start;

    let mut outcome = Outcome {
        tally: Tally::new(params.senders),
        sent_ok: vec![0; params.senders],
        errors: BTreeMap::new(),
        closed: Vec::new(),
        server: match (server_start, server_end) {
            (Some(Ok(start)), Some(Ok(end))) => Some(start.usage_until(&end, measured_ops)),
            _ => None,
        },
        generator: match (self_start, self_end) {
            (Ok(start), Ok(end)) => Some(start.usage_until(&end, measured_ops)),
            _ => None,
        },
        measured: phases.measure_end - phases.measure_start,
        drain_timed_out: false,
    };

    for (index, task) in senders.into_iter().enumerate() {
        match task.await {
            Ok(Ok(report)) => {
                outcome.sent_ok[index] = report.sent_ok;
                merge_errors(&mut outcome.errors, &report.errors);
            }
            Ok(Err(err)) => outcome.closed.push(format!("sender {index}: {err}")),
            Err(err) => outcome
                .closed
                .push(format!("sender {index}: task failed: {err}")),
        }
    }
    // Drain: wait until everything accepted has arrived, a receiver gave up, or the deadline.
    let accepted: u64 = outcome.sent_ok.iter().sum();
    loop {
        let arrived = shared.progress.delivered.load(Ordering::Relaxed);
        if arrived >= accepted || receivers.iter().any(|r| r.is_finished()) {
            break;
        }
        if Instant::now() >= phases.deadline {
            outcome.drain_timed_out = true;
            break;
        }
        sleep(Duration::from_millis(5)).await;
    }
    shared.progress.finish();
    for (index, task) in receivers.into_iter().enumerate() {
        match task.await {
            Ok(Ok(report)) => {
                outcome.tally.merge(&report.tally);
                merge_errors(&mut outcome.errors, &report.errors);
            }
            Ok(Err(err)) => outcome.closed.push(format!("receiver {index}: {err}")),
            Err(err) => outcome
                .closed
                .push(format!("receiver {index}: task failed: {err}")),
        }
    }
    if let Some(progress) = progress {
        let _ = progress.await;
    }
    if let Some(ticker) = ticker {
        ticker.abort();
    }
    outcome
}

fn merge_errors(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (what, n) in from {
        *into.entry(what.clone()).or_insert(0) += n;
    }
}

/// Everything a run found, before it becomes a [`RunResult`].
pub struct Outcome {
    pub tally: Tally,
    pub sent_ok: Vec<u64>,
    pub errors: BTreeMap<String, u64>,
    pub closed: Vec<String>,
    pub server: Option<Usage>,
    pub generator: Option<Usage>,
    pub measured: Duration,
    pub drain_timed_out: bool,
}

impl Outcome {
    /// Messages accepted by the target that never arrived, summed per sender.
    pub fn lost(&self) -> u64 {
        self.sent_ok
            .iter()
            .zip(&self.tally.seen)
            .map(|(sent, seen)| sent.saturating_sub(seen.distinct()))
            .sum()
    }

    pub fn into_result(self, scenario: &str, target: &Target, params: Params) -> RunResult {
        let lost = self.lost();
        let delivered = self.tally.seen.iter().map(|s| s.distinct()).sum();
        let mut warnings = Vec::new();
        if self.drain_timed_out {
            warnings.push(format!(
                "drain timed out: {lost} accepted messages had not arrived by the deadline"
            ));
        }
        if self.tally.foreign > 0 {
            warnings.push(format!(
                "{} deliveries carried no stamp of this run or came to the wrong receiver",
                self.tally.foreign
            ));
        }
        if let Some(generator) = &self.generator {
            if generator.cpu_cores > 0.9 {
                warnings.push(format!(
                    "the load generator used {:.0}% of a core: it may be the bottleneck",
                    generator.cpu_cores * 100.0
                ));
            }
        }
        RunResult {
            scenario: scenario.to_owned(),
            target: target.kind().to_owned(),
            addr: target.addr().to_owned(),
            params,
            measured_s: self.measured.as_secs_f64(),
            ops: self.tally.measured,
            ops_per_s: per_second(self.tally.measured, self.measured),
            bytes_per_s: per_second(self.tally.measured_bytes, self.measured),
            latency_us: self.tally.latency.summary(),
            server: self.server,
            generator: self.generator,
            sent: self.sent_ok.iter().sum(),
            delivered,
            lost,
            duplicates: self.tally.duplicates,
            out_of_order: self.tally.out_of_order,
            errors: self.errors,
            closed: self.closed,
            warnings,
            ..RunResult::default()
        }
    }
}

/// Once a second on stderr: phase, delivery rate of the last second, totals.
async fn progress_line(shared: Arc<Shared>, title: String) {
    let phases = shared.phases;
    let mut last = 0u64;
    let mut tick = tokio::time::interval_at(
        phases.epoch + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    while !shared.progress.is_done() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.progress.wake.notified() => break,
        }
        let now = Instant::now();
        let delivered = shared.progress.delivered.load(Ordering::Relaxed);
        let sent = shared.progress.sent.load(Ordering::Relaxed);
        let errors = shared.progress.errors.load(Ordering::Relaxed);
        let phase = if now < phases.measure_start {
            "warm-up"
        } else if now < phases.measure_end {
            "measure"
        } else {
            "drain"
        };
        eprintln!(
            "[{title}] {:>5.1}s {phase:<7} {:>9} msgs/s  delivered {:>9}  in flight {:>7}  errors {errors}",
            now.duration_since(phases.epoch).as_secs_f64(),
            human((delivered - last) as f64),
            human(delivered as f64),
            sent.saturating_sub(delivered),
        );
        last = delivered;
    }
}
