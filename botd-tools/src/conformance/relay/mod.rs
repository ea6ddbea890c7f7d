//! The relay role: cases run by the suite's node ([`Probe`]) against any relay.

mod app;
mod expiry;
mod fields;
mod handshake;
mod limits;
mod send;
mod session;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use parking_lot::Mutex;

use super::probe::{Cleanup, Probe, Raw, Target};
use super::{
    run_guarded, CaseReport, CaseResultFuture, Level, Log, Outcome, Report, Selection, Step,
};
use botd_protocol::keys::KeyPair;
use botd_protocol::proto::{Body, Unregister};

/// One case of the relay role.
pub struct CaseDef {
    pub id: &'static str,
    pub level: Level,
    pub title: &'static str,
    /// Waits for minutes of timers: runs only with `--slow`.
    pub slow: bool,
    /// Whether the case runs on its own rather than beside others.
    pub alone: Alone,
    pub run: fn(Ctx) -> CaseResultFuture,
}

/// When a case runs relative to the others. The suite's sessions all come from one source
/// address, so they share the relay's per-address buckets (§8.1): a case that measures a
/// bucket must not see other cases take its tokens, and a case that empties a per-address
/// bucket must not starve the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alone {
    /// Runs beside other cases (`--jobs` at a time).
    No,
    /// Measures a bucket: runs one at a time, before the others.
    First,
    /// Empties a per-address bucket: runs one at a time, after the others.
    Last,
}

impl CaseDef {
    /// Runs this case on its own (see [`Alone`]).
    pub fn alone(mut self, alone: Alone) -> Self {
        self.alone = alone;
        self
    }
}

/// Defines a case inline: `case!("8.3/x", Must, "title", |cx| { … Ok(Outcome::pass()) })`.
macro_rules! case {
    ($id:literal, $level:ident, $title:literal, |$cx:ident| $body:block) => {
        $crate::conformance::relay::CaseDef {
            id: $id,
            level: $crate::conformance::Level::$level,
            title: $title,
            slow: false,
            alone: $crate::conformance::relay::Alone::No,
            run: {
                #[allow(unused_mut)]
                async fn case_fn(
                    mut $cx: $crate::conformance::relay::Ctx,
                ) -> $crate::conformance::Step<$crate::conformance::Outcome> {
                    let _ = &mut $cx;
                    $body
                }
                fn boxed(
                    cx: $crate::conformance::relay::Ctx,
                ) -> $crate::conformance::CaseResultFuture {
                    Box::pin(case_fn(cx))
                }
                boxed
            },
        }
    };
    (slow $id:literal, $level:ident, $title:literal, |$cx:ident| $body:block) => {{
        let mut def = case!($id, $level, $title, |$cx| $body);
        def.slow = true;
        def
    }};
}
pub(crate) use case;

/// What a case gets: the target, its log, and the list of what to clean up.
#[derive(Clone)]
pub struct Ctx {
    pub t: Arc<Target>,
    pub log: Log,
    pub cleanup: Cleanup,
    /// The run was started with `--slow`.
    pub slow: bool,
}

/// Longest a case may spend waiting for rate-limit tokens without `--slow`.
const FAST_TOKEN_WAIT: Duration = Duration::from_secs(20);
/// Longest a case may spend waiting for the relay's timers without `--slow`.
const FAST_TIMER_WAIT: Duration = Duration::from_secs(30);

impl Ctx {
    /// A session with a fresh identity.
    pub async fn probe(&self, name: &str) -> Step<Probe> {
        self.probe_as(name, Arc::new(KeyPair::generate())).await
    }

    pub async fn probe_as(&self, name: &str, identity: Arc<KeyPair>) -> Step<Probe> {
        let mut p = Probe::connect_as(&self.t, &self.log, name, identity).await?;
        p.cleanup = self.cleanup.clone();
        Ok(p)
    }

    /// A session with a fresh identity whose device 1 is registered with 5 one-time prekeys.
    pub async fn node(&self, name: &str) -> Step<Probe> {
        let mut p = self.probe(name).await?;
        p.register(1, 5).await?;
        Ok(p)
    }

    pub async fn raw(&self, name: &str) -> Step<Raw> {
        Raw::open(&self.t, &self.log, name).await
    }

    /// An assumed limit, or the spec's default.
    pub fn limit(&self, key: &str, default: u64) -> u64 {
        self.t.assume.or(key, default)
    }

    /// A limit that must be given with `--assume`, else the case is skipped.
    pub fn need(&self, key: &str) -> Step<u64> {
        self.t.assume.get(key).ok_or_else(|| {
            Outcome::skip(format!(
                "needs a small limit: run with --assume {key}=N matching the relay's configuration"
            ))
        })
    }

    /// A bucket's burst and rate per second, as assumed (or the spec's defaults).
    pub fn bucket(&self, burst: (&str, u64), rate: (&str, u64)) -> (u64, u64) {
        (
            self.limit(burst.0, burst.1),
            self.limit(rate.0, rate.1).max(1),
        )
    }

    /// The per-identity bucket of account changes (burst, rate).
    pub fn change_bucket(&self) -> (u64, u64) {
        self.bucket(
            ("change_burst_per_identity", 100),
            ("change_rate_per_identity", 10),
        )
    }

    /// Skips the case unless `requests` tokens of the bucket can be had quickly, or the run
    /// is `--slow`: waiting for tokens beyond the burst takes `(requests − burst) / rate`.
    pub fn affordable(&self, requests: u64, bucket: (u64, u64), what: &str) -> Step<()> {
        let (burst, rate) = bucket;
        let secs = requests.saturating_sub(burst) / rate.max(1);
        if self.slow || Duration::from_secs(secs) <= FAST_TOKEN_WAIT {
            return Ok(());
        }
        Err(Outcome::skip(format!(
            "needs {requests} {what}, about {secs} s of rate-limit waits (burst {burst}, {rate}/s): \
             run with --slow, or give the relay's smaller limits with --assume"
        )))
    }

    /// Skips the case unless waiting `total` for the relay's timers is quick, or the run is
    /// `--slow`: against a relay with short timers (a test setup, PROTOCOL.md §7.5) the timer
    /// cases run in every run.
    pub fn timer_wait(&self, total: Duration, what: &str) -> Step<()> {
        if self.slow || total <= FAST_TIMER_WAIT {
            return Ok(());
        }
        Err(Outcome::skip(format!(
            "waits {total:?} for {what}: run with --slow, or against a relay with shorter timers"
        )))
    }

    pub fn wait(&self) -> Duration {
        self.t.wait
    }

    pub fn quiet(&self) -> Duration {
        self.t.quiet
    }

    pub fn note(&self, text: impl Into<String>) {
        self.log.note(text);
    }
}

/// Every case of the relay role, in section order.
pub fn cases() -> Vec<CaseDef> {
    let mut all = Vec::new();
    all.extend(handshake::cases());
    all.extend(session::cases());
    all.extend(app::cases());
    all.extend(fields::cases());
    all.extend(expiry::cases());
    all.extend(send::cases());
    all.extend(limits::cases());
    all.sort_by(|a, b| {
        super::section_key(super::section_of(a.id))
            .cmp(&super::section_key(super::section_of(b.id)))
            .then_with(|| a.id.cmp(b.id))
    });
    all
}

/// Hard limit for one case: 90 s, or the idle timeout and more in a `--slow` run (slow cases,
/// and cases that wait for many rate-limit tokens).
fn case_limit(slow: bool) -> Duration {
    if slow {
        Duration::from_secs(15 * 60)
    } else {
        Duration::from_secs(90)
    }
}

/// Runs the selected cases with at most `jobs` at once; `progress` sees each as it finishes.
pub async fn run(
    target: Target,
    selection: &Selection,
    jobs: usize,
    progress: impl Fn(&CaseReport),
) -> Report {
    let started = tokio::time::Instant::now();
    let started_unix_ms = super::unix_ms();
    let target = Arc::new(target);
    let selected: Vec<CaseDef> = cases()
        .into_iter()
        .filter(|c| selection.matches(c.id))
        .collect();
    let slow = selection.slow;
    let (first, others): (Vec<CaseDef>, Vec<CaseDef>) =
        selected.into_iter().partition(|c| c.alone == Alone::First);
    let (last, rest): (Vec<CaseDef>, Vec<CaseDef>) =
        others.into_iter().partition(|c| c.alone == Alone::Last);
    let mut reports = Vec::new();
    for def in first {
        let report = run_one(def, target.clone(), slow).await;
        progress(&report);
        reports.push(report);
    }
    let mut stream = futures_util::stream::iter(rest.into_iter().map(|def| {
        let target = target.clone();
        async move { run_one(def, target, slow).await }
    }))
    .buffer_unordered(jobs.max(1));
    while let Some(report) = stream.next().await {
        progress(&report);
        reports.push(report);
    }
    drop(stream);
    for def in last {
        let report = run_one(def, target.clone(), slow).await;
        progress(&report);
        reports.push(report);
    }
    let mut report = Report {
        role: "relay".into(),
        target: format!("{} (key {})", target.addr, target.key),
        started_unix_ms,
        duration: started.elapsed(),
        cases: reports,
    };
    report.sort();
    report
}

async fn run_one(def: CaseDef, target: Arc<Target>, slow: bool) -> CaseReport {
    let started = tokio::time::Instant::now();
    let log = Log::new();
    let outcome = if def.slow && !slow {
        Outcome::skip("slow case (minutes of timers): run with --slow")
    } else {
        let cx = Ctx {
            t: target.clone(),
            log: log.clone(),
            cleanup: Arc::new(Mutex::new(Vec::new())),
            slow,
        };
        let cleanup = cx.cleanup.clone();
        let outcome = run_guarded((def.run)(cx), case_limit(slow)).await;
        clean_up(&target, &log, &cleanup).await;
        outcome
    };
    CaseReport {
        id: def.id.to_owned(),
        title: def.title.to_owned(),
        level: def.level,
        outcome,
        duration: started.elapsed(),
        log: log.lines(),
    }
}

/// Unregisters what the case registered, over a fresh session per identity (bounded).
async fn clean_up(target: &Target, log: &Log, cleanup: &Cleanup) {
    let mut by_identity: BTreeMap<String, (Arc<KeyPair>, Vec<u32>)> = BTreeMap::new();
    for (key, device) in cleanup.lock().drain(..) {
        let entry = by_identity
            .entry(key.public().to_hex())
            .or_insert_with(|| (key.clone(), Vec::new()));
        if !entry.1.contains(&device) {
            entry.1.push(device);
        }
    }
    if by_identity.is_empty() {
        return;
    }
    let work = async {
        for (_, (key, devices)) in by_identity {
            let Ok(mut p) = Probe::connect_as(target, log, "cleanup", key).await else {
                continue;
            };
            for device in devices {
                let _ = p
                    .call_patiently(Body::Unregister(Unregister { device_id: device }))
                    .await;
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), work)
        .await
        .is_err()
    {
        log.note("cleanup did not finish in time");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn case_ids_are_unique_and_keyed_to_sections() {
        let all = cases();
        assert!(all.len() >= 150, "only {} cases", all.len());
        let mut seen = HashSet::new();
        for c in &all {
            assert!(seen.insert(c.id), "duplicate case id {}", c.id);
            let (section, slug) = c.id.split_once('/').expect("section/slug");
            assert!(
                section.split('.').all(|p| p.parse::<u32>().is_ok()),
                "{}",
                c.id
            );
            assert!(
                !slug.is_empty()
                    && slug
                        .chars()
                        .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-'),
                "slug of {}",
                c.id
            );
        }
    }

    #[test]
    fn every_case_id_is_named_in_the_spec_checklist() {
        let spec = include_str!("../../../../docs/PROTOCOL.md");
        let checklist = spec
            .split("## 10. Conformance checklist")
            .nth(1)
            .expect("§10 exists");
        let missing: Vec<_> = cases()
            .iter()
            .map(|c| c.id)
            .filter(|id| !checklist.contains(&format!("`{id}`")))
            .collect();
        assert!(missing.is_empty(), "not named in §10: {missing:?}");
    }
}
