//! The botd/1 conformance suite (docs/CONFORMANCE.md), in the manner of h2spec and the Autobahn
//! testsuite: every case is keyed to a section of `docs/PROTOCOL.md`, judged by what the peer
//! under test does on the wire, and given one of five verdicts.
//!
//! Two roles:
//! - [`relay`]: cases run against any relay by a scripted node ([`probe::Probe`]);
//! - [`client`]: a relay that misbehaves on purpose, one case per connection, for node software.
//!
//! Everything a peer sends is untrusted input: no case panics on it, every wait has a timeout
//! and every loop a bound.

pub mod cli;
pub mod client;
pub mod faulty;
pub mod probe;
pub mod relay;
pub mod report;
pub mod scenario;
pub mod wire;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// The verdicts of a case, as the Autobahn testsuite has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// The peer did what the spec requires.
    Pass,
    /// A SHOULD (or SHOULD NOT) was not followed.
    NonStrict,
    /// A MUST (or MUST NOT) was broken.
    Fail,
    /// Behaviour the spec leaves open, recorded.
    Info,
    /// Not run; the detail says why.
    Skip,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::NonStrict => "NON-STRICT",
            Verdict::Fail => "FAIL",
            Verdict::Info => "INFO",
            Verdict::Skip => "SKIP",
        }
    }

    pub const ALL: [Verdict; 5] = [
        Verdict::Pass,
        Verdict::NonStrict,
        Verdict::Fail,
        Verdict::Info,
        Verdict::Skip,
    ];
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the spec says about the behaviour a case checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Must,
    Should,
    /// Left open by the spec: the case records what the peer does.
    Open,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Must => "MUST",
            Level::Should => "SHOULD",
            Level::Open => "OPEN",
        }
    }
}

/// A verdict with its explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    pub detail: String,
}

impl Outcome {
    pub fn pass() -> Self {
        Self::new(Verdict::Pass, "")
    }
    pub fn pass_with(detail: impl Into<String>) -> Self {
        Self::new(Verdict::Pass, detail)
    }
    pub fn fail(detail: impl Into<String>) -> Self {
        Self::new(Verdict::Fail, detail)
    }
    pub fn non_strict(detail: impl Into<String>) -> Self {
        Self::new(Verdict::NonStrict, detail)
    }
    pub fn info(detail: impl Into<String>) -> Self {
        Self::new(Verdict::Info, detail)
    }
    pub fn skip(detail: impl Into<String>) -> Self {
        Self::new(Verdict::Skip, detail)
    }
    pub fn new(verdict: Verdict, detail: impl Into<String>) -> Self {
        Self {
            verdict,
            detail: detail.into(),
        }
    }
}

/// What a case step returns: `Err` ends the case early with that outcome.
pub type Step<T> = Result<T, Outcome>;
/// What a case returns; `Ok` and `Err` both carry its outcome.
pub type CaseResultFuture = Pin<Box<dyn Future<Output = Step<Outcome>> + Send + 'static>>;

/// Direction of a line in a case's exchange log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Sent by the suite.
    Out,
    /// Received from the peer under test.
    In,
    /// A remark of the suite.
    Note,
}

impl Dir {
    pub fn as_str(self) -> &'static str {
        match self {
            Dir::Out => "sent",
            Dir::In => "received",
            Dir::Note => "note",
        }
    }
}

#[derive(Debug, Clone)]
pub struct LogLine {
    /// Milliseconds since the case started.
    pub at_ms: u64,
    pub dir: Dir,
    /// Which connection of the case ("A", "B", …).
    pub conn: String,
    pub text: String,
}

/// Most lines kept per case: the first ones, and the last [`LOG_TAIL`] (where a long case
/// comes to its verdict); a flood from a peer is summarised, not stored.
const MAX_LOG_LINES: usize = 400;
const LOG_TAIL: usize = 100;

#[derive(Default)]
struct Lines {
    head: Vec<LogLine>,
    tail: std::collections::VecDeque<LogLine>,
    /// Lines that fell out between head and tail.
    dropped: usize,
}

/// The exchange of one case: frames sent and received, and the suite's remarks.
#[derive(Clone)]
pub struct Log {
    start: Instant,
    lines: Arc<Mutex<Lines>>,
}

impl Default for Log {
    fn default() -> Self {
        Self::new()
    }
}

impl Log {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            lines: Arc::new(Mutex::new(Lines::default())),
        }
    }

    pub fn add(&self, conn: &str, dir: Dir, text: impl Into<String>) {
        let mut text = text.into();
        if text.len() > 600 {
            let mut cut = 600;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push('…');
        }
        let line = LogLine {
            at_ms: self.start.elapsed().as_millis() as u64,
            dir,
            conn: conn.to_owned(),
            text,
        };
        let mut lines = self.lines.lock();
        if lines.head.len() < MAX_LOG_LINES - LOG_TAIL {
            lines.head.push(line);
            return;
        }
        if lines.tail.len() == LOG_TAIL {
            lines.tail.pop_front();
            lines.dropped += 1;
        }
        lines.tail.push_back(line);
    }

    pub fn note(&self, text: impl Into<String>) {
        self.add("", Dir::Note, text);
    }

    pub fn lines(&self) -> Vec<LogLine> {
        let lines = self.lines.lock();
        let mut out = lines.head.clone();
        if lines.dropped > 0 {
            let at_ms = lines.tail.front().map_or(0, |l| l.at_ms);
            out.push(LogLine {
                at_ms,
                dir: Dir::Note,
                conn: String::new(),
                text: format!("{} further lines not kept", lines.dropped),
            });
        }
        out.extend(lines.tail.iter().cloned());
        out
    }
}

/// Limits and timers that the suite cannot read from `Welcome`, given as `--assume KEY=VALUE`.
#[derive(Debug, Clone, Default)]
pub struct Assumptions {
    values: BTreeMap<String, u64>,
}

/// Keys `--assume` understands, with what they mean.
pub const ASSUME_KEYS: &[(&str, &str)] = &[
    (
        "max_devices_per_identity",
        "registered devices per identity (default 16)",
    ),
    ("max_key_len", "largest key-material field (default 256)"),
    (
        "max_prekeys_per_upload",
        "one-time prekeys per request (default 100)",
    ),
    (
        "max_prekeys_per_device",
        "one-time prekeys stored per device (default 1000)",
    ),
    ("prekey_low_threshold", "PreKeysLow threshold (default 10)"),
    (
        "prekey_fetch_burst",
        "burst of the prekey fetch limiter (default 100)",
    ),
    (
        "prekey_fetch_rate",
        "prekey fetches per second per requesting identity (default 5)",
    ),
    (
        "prekey_fetch_burst_per_ip",
        "burst of the prekey fetch limiter per source address (default 200)",
    ),
    (
        "prekey_fetch_rate_per_ip",
        "prekey fetches per second per source address (default 20)",
    ),
    (
        "one_time_prekey_burst_per_device",
        "one-time prekeys handed out per device at once (default 20)",
    ),
    (
        "send_burst_per_identity",
        "burst of the sender limiter (default 1000)",
    ),
    (
        "send_burst_per_pair",
        "burst of the pair limiter (default 200)",
    ),
    (
        "send_burst_per_ip",
        "burst of the send limiter per source address (default 5000)",
    ),
    (
        "send_rate_per_ip",
        "sends per second per source address (default 1000)",
    ),
    (
        "change_burst_per_identity",
        "burst of the account-change limiter per identity (default 100)",
    ),
    (
        "change_rate_per_identity",
        "account changes per second per identity (default 10)",
    ),
    (
        "change_burst_per_ip",
        "burst of the account-change limiter per source address (default 500)",
    ),
    (
        "change_rate_per_ip",
        "account changes per second per source address (default 50)",
    ),
    (
        "ack_burst_per_identity",
        "burst of the AckMessages limiter per identity (default 5000)",
    ),
    (
        "ack_rate_per_identity",
        "AckMessages per second per identity (default 1000)",
    ),
    (
        "max_unacked",
        "deliveries in flight per subscription (default 256)",
    ),
    (
        "max_tickets_per_identity",
        "unexpired tickets per identity (default 1000)",
    ),
    ("max_ticket_uses", "uses of one ticket (default 1000)"),
    (
        "max_ticket_ttl_s",
        "longest ticket lifetime in seconds (default 2592000)",
    ),
    (
        "mailbox_max_messages",
        "messages per mailbox (cases skipped unless given)",
    ),
    (
        "mailbox_max_bytes",
        "payload bytes per mailbox (cases skipped unless given)",
    ),
    (
        "max_contacts",
        "contacts per identity (cases skipped unless given)",
    ),
    (
        "max_outbound_bytes",
        "queued push bytes per session (cases skipped unless given)",
    ),
    (
        "max_rate_limited_keys",
        "keys per application rate limiter (cases skipped unless given)",
    ),
    (
        "max_identities",
        "identities the relay stores at most (cases skipped unless given)",
    ),
    (
        "max_identity_stored_bytes",
        "payload bytes stored for one identity (cases skipped unless given)",
    ),
    (
        "max_stored_bytes",
        "payload bytes stored by the relay (cases skipped unless given)",
    ),
    ("handshake_timeout_ms", "handshake deadline (default 10000)"),
    ("pong_timeout_ms", "wait for a Pong (default 20000)"),
    (
        "expiry_interval_ms",
        "period of the relay's expiry sweep (default 10000)",
    ),
    (
        "message_ttl_ms",
        "message lifetime (cases skipped unless given)",
    ),
    (
        "account_ttl_ms",
        "idle account lifetime (cases skipped unless given)",
    ),
];

/// An `--assume` item that is not a known `KEY=VALUE`.
#[derive(Debug, thiserror::Error)]
pub enum AssumeError {
    #[error("--assume {0:?}: expected KEY=VALUE")]
    NotKeyValue(String),
    #[error("--assume: unknown key {0:?} (known: {known})", known = assume_keys())]
    UnknownKey(String),
    #[error("--assume {key}: {value:?} is not an integer")]
    NotInteger { key: String, value: String },
}

/// The keys `--assume` knows, for its error message.
fn assume_keys() -> String {
    ASSUME_KEYS
        .iter()
        .map(|(k, _)| *k)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Assumptions {
    /// Parses `KEY=VALUE` items (values are integers; `_` separators allowed).
    pub fn parse<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Self, AssumeError> {
        let mut values = BTreeMap::new();
        for item in items {
            for part in item.split([',', ' ']).filter(|p| !p.is_empty()) {
                let (key, value) = part
                    .split_once('=')
                    .ok_or_else(|| AssumeError::NotKeyValue(part.to_owned()))?;
                if !ASSUME_KEYS.iter().any(|(k, _)| *k == key) {
                    return Err(AssumeError::UnknownKey(key.to_owned()));
                }
                let value: u64 =
                    value
                        .replace('_', "")
                        .parse()
                        .map_err(|_| AssumeError::NotInteger {
                            key: key.to_owned(),
                            value: value.to_owned(),
                        })?;
                values.insert(key.to_owned(), value);
            }
        }
        Ok(Self { values })
    }

    pub fn set(&mut self, key: &str, value: u64) {
        self.values.insert(key.to_owned(), value);
    }

    /// The assumed value, if given.
    pub fn get(&self, key: &str) -> Option<u64> {
        self.values.get(key).copied()
    }

    /// The assumed value, or the spec's default.
    pub fn or(&self, key: &str, default: u64) -> u64 {
        self.get(key).unwrap_or(default)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &u64)> {
        self.values.iter()
    }
}

/// The section a case id belongs to: the part before the slash.
pub fn section_of(id: &str) -> &str {
    id.split('/').next().unwrap_or(id)
}

/// True when `id` lies in `section` or one of its subsections (`8` matches `8.3/…`).
pub fn in_section(id: &str, section: &str) -> bool {
    let own = section_of(id);
    let section = section.trim_end_matches('.');
    own == section || own.starts_with(&format!("{section}."))
}

/// Orders section numbers numerically ("7.10" after "7.9").
pub fn section_key(section: &str) -> Vec<u32> {
    section
        .split('.')
        .map(|p| p.parse().unwrap_or(u32::MAX))
        .collect()
}

/// The result of one case, for the reports.
#[derive(Debug, Clone)]
pub struct CaseReport {
    pub id: String,
    pub title: String,
    pub level: Level,
    pub outcome: Outcome,
    pub duration: Duration,
    pub log: Vec<LogLine>,
}

/// Everything a run produced.
#[derive(Debug, Clone)]
pub struct Report {
    /// `relay` or `client`.
    pub role: String,
    /// What was tested (address, key).
    pub target: String,
    pub started_unix_ms: u64,
    pub duration: Duration,
    pub cases: Vec<CaseReport>,
}

impl Report {
    pub fn count(&self, verdict: Verdict) -> usize {
        self.cases
            .iter()
            .filter(|c| c.outcome.verdict == verdict)
            .count()
    }

    /// The case with this id, if it ran.
    pub fn case(&self, id: &str) -> Option<&CaseReport> {
        self.cases.iter().find(|c| c.id == id)
    }

    /// The verdict of a case, if it ran.
    pub fn verdict(&self, id: &str) -> Option<Verdict> {
        self.case(id).map(|c| c.outcome.verdict)
    }

    /// Ids of the cases with this verdict.
    pub fn ids_with(&self, verdict: Verdict) -> Vec<&str> {
        self.cases
            .iter()
            .filter(|c| c.outcome.verdict == verdict)
            .map(|c| c.id.as_str())
            .collect()
    }

    /// True when no case failed.
    pub fn ok(&self) -> bool {
        self.count(Verdict::Fail) == 0
    }

    /// Cases in section order (then id).
    pub fn sort(&mut self) {
        self.cases.sort_by(|a, b| {
            section_key(section_of(&a.id))
                .cmp(&section_key(section_of(&b.id)))
                .then_with(|| a.id.cmp(&b.id))
        });
    }
}

/// Which cases to run and how.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Sections to run (empty: all).
    pub sections: Vec<String>,
    /// Case ids to run (empty: all in the sections).
    pub cases: Vec<String>,
    /// Run the cases that wait for minutes of timers.
    pub slow: bool,
}

impl Selection {
    pub fn matches(&self, id: &str) -> bool {
        (self.sections.is_empty() || self.sections.iter().any(|s| in_section(id, s)))
            && (self.cases.is_empty() || self.cases.iter().any(|c| c == id))
    }
}

/// Waits at most `limit` for `future`; an overrun is a FAIL of the case.
pub async fn bounded<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> Step<T> {
    tokio::time::timeout(limit, future)
        .await
        .map_err(|_| Outcome::fail(format!("{what}: no progress within {limit:?}")))
}

/// Turns a panic or a case future into an outcome, with a hard time limit.
pub(crate) async fn run_guarded(future: CaseResultFuture, limit: Duration) -> Outcome {
    let handle = tokio::spawn(async move {
        match future.await {
            Ok(outcome) | Err(outcome) => outcome,
        }
    });
    let abort = handle.abort_handle();
    match tokio::time::timeout(limit, handle).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(err)) if err.is_panic() => {
            Outcome::fail("the case stopped on an internal error (a bug of the suite)")
        }
        Ok(Err(_)) => Outcome::fail("the case was cancelled"),
        Err(_) => {
            abort.abort();
            Outcome::fail(format!("the case did not finish within {limit:?}"))
        }
    }
}

/// Unix milliseconds now.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// RFC 3339 (UTC, milliseconds) of a Unix time in milliseconds.
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_millis(unix_ms);
    humantime::format_rfc3339_millis(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_match_themselves_and_subsections() {
        assert!(in_section("8.3/idempotent-resend", "8.3"));
        assert!(in_section("8.3/idempotent-resend", "8"));
        assert!(!in_section("8.3/idempotent-resend", "8.4"));
        assert!(!in_section("8.30/x", "8.3"));
        assert!(in_section("8.3.1/x", "8.3"));
        assert!(!in_section("18/x", "8"));
        assert!(section_key("7.10") > section_key("7.9"));
    }

    #[test]
    fn assumptions_parse_lists_and_refuse_unknown_keys() {
        let a = Assumptions::parse(["max_outbound_bytes=65_536 mailbox_max_messages=5"]).unwrap();
        assert_eq!(a.get("max_outbound_bytes"), Some(65536));
        assert_eq!(a.or("mailbox_max_messages", 1), 5);
        assert_eq!(a.or("max_unacked", 256), 256);
        assert!(Assumptions::parse(["nope=1"]).is_err());
        assert!(Assumptions::parse(["max_unacked"]).is_err());
        assert!(Assumptions::parse(["max_unacked=x"]).is_err());
    }

    #[test]
    fn every_assume_key_is_documented() {
        let doc = include_str!("../../../docs/CONFORMANCE.md");
        let missing: Vec<_> = ASSUME_KEYS
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| !doc.contains(&format!("| `{k}` |")))
            .collect();
        assert!(
            missing.is_empty(),
            "not in docs/CONFORMANCE.md: {missing:?}"
        );
    }

    #[test]
    fn rfc3339_of_the_vector_time() {
        assert_eq!(rfc3339_ms(1_767_225_600_000), "2026-01-01T00:00:00.000Z");
    }

    #[test]
    fn the_log_is_bounded() {
        let log = Log::new();
        for i in 0..(MAX_LOG_LINES + 50) {
            log.add("A", Dir::In, format!("line {i} {}", "x".repeat(1000)));
        }
        let lines = log.lines();
        assert_eq!(lines.len(), MAX_LOG_LINES + 1);
        assert!(lines[0].text.len() < 700);
        assert!(lines[MAX_LOG_LINES - LOG_TAIL].text.contains("50 further"));
        // The last lines are kept.
        assert!(lines
            .last()
            .unwrap()
            .text
            .starts_with(&format!("line {} ", MAX_LOG_LINES + 49)));
    }
}
