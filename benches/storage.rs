//! Durability-layer benchmarks: journal group commit, recovery, memory per stored message and
//! send latency during a snapshot.
//!
//! Run with `cargo bench --bench storage` (about 3 to 5 minutes on 2 cores). A custom `main`
//! first runs the measurements criterion does not suit and prints one `storage:` line per
//! figure (repeated in a summary block at the end), then the criterion groups:
//!
//! 1. journal appends/s under fsync `always`, `interval` (10 ms) and `never` with 1, 16 and 256
//!    writer tasks; the fsync count is inferred from the journal thread's write syscalls
//!    (`/proc/self/task/<tid>/io`: one `write` per batch, and under `always` one `fdatasync`
//!    per batch);
//! 2. recovery of 1M stored 100-B messages: `EmbeddedStore::open` from the journal only, and from a
//!    snapshot;
//! 3. memory per stored message beyond its payload (RSS, and the allocator's own count: heap in
//!    use from glibc's `mallinfo2`, or, built with the `mimalloc` feature, the memory mimalloc
//!    has committed, as the relay binary uses it then), each
//!    variant in a fresh child process (this binary re-run with `BOTD_STORAGE_BENCH_CHILD` set):
//!    the target workload, the recovery and live paths, small mailboxes, distinct senders, and
//!    half-acked mailboxes;
//! 4. p50/p99/max of a store append normally, during `EmbeddedStore::snapshot`, during a bare
//!    walk of `State::snapshot_shard` and beside a CPU hog, plus the per-shard `snapshot_shard` call.
//!
//! Without `--bench` (`cargo test --benches`) everything runs at a tiny scale, as a smoke test.
//! `BOTD_BENCH_PARTS=1,2,3,4,criterion` selects parts (default: all).
//! Format with `cargo fmt` or `rustfmt --edition 2021` (bare `rustfmt` assumes edition 2015,
//! which has no `async` blocks).

use std::hint::black_box;

// The allocator of the relay binary built with the same features, so that memory figures are
// the relay's.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use criterion::{criterion_group, Criterion, Throughput};
use prost::Message;

use botd_protocol::cipher::TAG_LEN;
use botd_protocol::keys::{sha256, KeyPair, SIGNATURE_LEN};
use botd_protocol::proto::{self, Body, Frame, Send};
use botd_relay::config::{Config, FsyncPolicy};
use botd_relay::store::embedded::{EmbeddedStore, Journal, JournalOptions, RecoveryReport, State};
use botd_relay::store::proto::{event::Kind, Event, MessageStored};
use botd_relay::store::{Appended, Identity, MailboxId, NewMessage, Registration};

const PAYLOAD_LEN: usize = 100;
const SENDERS: usize = 16;
const SHARDS: usize = 256;
/// Initial read buffer of tokio-util's `FramedRead`, which the session's frames are split from.
const READ_BUF: usize = 8 * 1024;
const CHILD_ENV: &str = "BOTD_STORAGE_BENCH_CHILD";
const SIGNATURE: &[u8; SIGNATURE_LEN] = &[1; SIGNATURE_LEN];

/// How big each measurement is: the real one under `cargo bench`, a smoke test otherwise.
#[derive(Debug, Clone, Copy)]
struct Scale {
    full: bool,
    messages: usize,
    /// Recipient identities (one device each) the messages are spread over; 1M / 1000 keeps
    /// every mailbox at 1,000 messages, under the default quota of 10,000.
    recipients: usize,
    journal_window: Duration,
    journal_reps: usize,
    recovery_reps: usize,
    latency_window: Duration,
    /// Paced sends per second of each of the two latency threads.
    latency_rate: f64,
    /// Rounds of the alternating latency phases.
    latency_rounds: usize,
}

impl Scale {
    fn new(full: bool) -> Self {
        if full {
            Self {
                full,
                messages: 1_000_000,
                recipients: 1_000,
                journal_window: Duration::from_millis(1500),
                journal_reps: 3,
                recovery_reps: 3,
                latency_window: Duration::from_millis(1500),
                latency_rate: 5_000.0,
                latency_rounds: 2,
            }
        } else {
            Self {
                full,
                messages: 20_000,
                recipients: 100,
                journal_window: Duration::from_millis(100),
                journal_reps: 1,
                recovery_reps: 1,
                latency_window: Duration::from_millis(200),
                latency_rate: 2_000.0,
                latency_rounds: 1,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "botd-bench-storage-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Summary lines, printed as they come and again at the end.
#[derive(Default)]
struct Summary(Vec<String>);

impl Summary {
    fn line(&mut self, line: String) {
        println!("storage: {line}");
        self.0.push(line);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Resident set size of this process, from `/proc/self/status`.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().strip_suffix("kB"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The id of this process's thread called `name`.
fn find_thread(name: &str) -> Option<u64> {
    for entry in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        if let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) {
            if comm.trim() == name {
                return entry.file_name().to_str()?.parse().ok();
            }
        }
    }
    None
}

/// Write syscalls and bytes written by a thread so far (`syscw`, `wchar` of its io accounting).
fn thread_writes(tid: Option<u64>) -> Option<(u64, u64)> {
    let io = std::fs::read_to_string(format!("/proc/self/task/{}/io", tid?)).ok()?;
    let field = |name: &str| {
        io.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some((field("syscw:")?, field("wchar:")?))
}

/// Total size of the files in `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// (CPU ticks the whole machine spent busy, ticks this process and its waited-for children
/// spent), from `/proc/stat` and `/proc/self/stat`.
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let machine: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy = machine.iter().take(8).sum::<u64>() - machine.get(3)? - machine.get(4)?;
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    // After the command's closing parenthesis come field 3 (state) onwards; utime, stime,
    // cutime and cstime are fields 14 to 17.
    let fields: Vec<&str> = own.rsplit_once(')')?.1.split_whitespace().collect();
    let mine = fields
        .get(11..15)?
        .iter()
        .map(|v| v.parse::<u64>().ok())
        .sum::<Option<u64>>()?;
    Some((busy, mine))
}

/// The file system holding `path` (longest matching mount point of `/proc/mounts`).
fn filesystem_of(path: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 3 || !path.starts_with(fields[1]) {
            continue;
        }
        if best.as_ref().is_none_or(|(len, _)| fields[1].len() > *len) {
            best = Some((
                fields[1].len(),
                format!("{} on {} ({})", fields[0], fields[1], fields[2]),
            ));
        }
    }
    best.map_or_else(|| "unknown".into(), |(_, fs)| fs)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn us(ns: u64) -> String {
    format!("{:.1} µs", ns as f64 / 1000.0)
}

fn payload(i: u64) -> Vec<u8> {
    let mut p = vec![0x5a; PAYLOAD_LEN];
    p[..8].copy_from_slice(&i.to_le_bytes());
    p
}

fn registration(device: u32) -> Registration {
    Registration {
        device,
        registration_id: 7,
        identity_key: Bytes::from_static(&[7; 33]),
        signed_prekey: proto::SignedPreKey {
            id: 1,
            public_key: Bytes::from_static(&[8; 33]),
            signature: Bytes::from_static(&[9; 64]),
        },
        one_time_prekeys: Vec::new(),
    }
}

/// A validated `Send` as the store's message (what the relay hands the store).
fn new_message(sender: &Identity, req: &Send, now_ms: u64) -> NewMessage {
    NewMessage {
        to: MailboxId {
            identity: req.recipient[..].try_into().expect("33 bytes"),
            device: req.recipient_device,
        },
        sender: *sender,
        sender_device: req.sender_device,
        nonce: req.sender_nonce[..].try_into().expect("8 bytes"),
        payload_hash: req.payload_hash[..].try_into().expect("32 bytes"),
        signature: req.sender_signature[..].try_into().expect("64 bytes"),
        payload: req.payload.clone(),
        ticket: None,
        received_at_ms: now_ms,
        bad_signature: None,
    }
}

/// Stores a message through the state (as `append` does); returns its id.
fn append(state: &State, sender: &Identity, req: &Send, now_ms: u64) -> u64 {
    let change = state
        .append(new_message(sender, req, now_ms))
        .expect("send");
    // As the relay does once the message is durable: the announcement it queued (the
    // message for live delivery) goes, or it would stay in memory with every message.
    let (appended, shard) = change.value;
    if let Some(shard) = shard {
        state.release(shard, &Unheard);
    }
    match appended {
        Appended::Stored(id) | Appended::Duplicate(id) => id,
    }
}

/// A listener for stored messages nobody subscribes to.
struct Unheard;

impl botd_relay::store::Listener for Unheard {
    fn stored(&self, _: &MailboxId, _: &Arc<botd_relay::store::Message>, _: Option<u64>) {}
    fn removed(&self, _: &MailboxId, _: &[u64]) {}
    fn closed(&self, _: &MailboxId) {}
    fn prekeys_low(&self, _: &Identity, _: u32, _: u32) {}
}

fn mailbox(identity: &Identity) -> MailboxId {
    MailboxId {
        identity: *identity,
        device: 1,
    }
}

/// A store opened from disk, with what recovery reported.
struct Recovered {
    store: EmbeddedStore,
    report: RecoveryReport,
}

/// Recipients (one device each) and senders; the i-th message goes round-robin over both,
/// with nonce i, so every message is new.
struct Workload {
    recipients: Vec<Identity>,
    senders: Vec<Identity>,
}

impl Workload {
    fn new(recipients: usize, senders: usize) -> Self {
        let ids = |n| {
            (0..n)
                .map(|_| *KeyPair::generate().public().as_bytes())
                .collect::<Vec<Identity>>()
        };
        Self {
            recipients: ids(recipients),
            senders: ids(senders),
        }
    }

    fn register_all(&self, store: &State) {
        for id in self.recipients.iter().chain(&self.senders) {
            store
                .register(id, registration(1), now_ms())
                .expect("register");
        }
    }

    fn recipient(&self, i: u64) -> &Identity {
        &self.recipients[i as usize % self.recipients.len()]
    }

    fn sender(&self, i: u64) -> &Identity {
        &self.senders[i as usize % self.senders.len()]
    }

    fn send(&self, i: u64, payload: Bytes) -> Send {
        Send {
            recipient: Bytes::copy_from_slice(self.recipient(i)),
            recipient_device: 1,
            sender_device: 1,
            sender_nonce: Bytes::copy_from_slice(&i.to_be_bytes()),
            payload_hash: Bytes::copy_from_slice(&sha256(&[&payload])),
            sender_signature: Bytes::from_static(SIGNATURE),
            payload,
            ticket: Bytes::new(),
        }
    }

    /// Stores message i through the store's API, with the payload in its own allocation.
    fn store_message(&self, store: &State, i: u64, now_ms: u64) {
        let req = self.send(i, Bytes::from(payload(i)));
        append(store, self.sender(i), &req, now_ms);
    }
}

/// The journal record of a stored message, as a store append produces it.
fn message_stored(
    recipient: &Identity,
    sender: &Identity,
    message_id: u64,
    nonce: u64,
    payload: Bytes,
) -> Event {
    Event {
        kind: Some(Kind::MessageStored(MessageStored {
            recipient: Bytes::copy_from_slice(recipient),
            device_id: 1,
            message_id,
            sender: Bytes::copy_from_slice(sender),
            sender_device: 1,
            sender_nonce: Bytes::copy_from_slice(&nonce.to_be_bytes()),
            sender_signature: Bytes::from_static(SIGNATURE),
            payload,
            received_at_ms: now_ms(),
            ticket_used: Bytes::new(),
            contact_added: false,
        })),
    }
}

fn config(data_dir: &Path) -> Config {
    Config {
        data_dir: data_dir.to_owned(),
        fsync: FsyncPolicy::Never,
        store_shards: SHARDS,
        ..Config::default()
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Journal appends per second
// ---------------------------------------------------------------------------------------------

struct JournalRun {
    appends_per_s: f64,
    /// Journal bytes that reached the segment files per second.
    written_bytes_per_s: f64,
    /// `write`s of record batches per second by the journal thread: one per batch, and under
    /// `always` each batch is followed by one `fdatasync`.
    batches_per_s: Option<f64>,
}

/// The journal thread's (write syscalls, bytes written) and the bytes in the segment files,
/// read together (retried if the thread wrote in between).
fn journal_counters(tid: Option<u64>, dir: &Path) -> (Option<(u64, u64)>, u64) {
    let mut last = (None, 0);
    for _ in 0..20 {
        let before = thread_writes(tid);
        let bytes = dir_bytes(dir);
        let after = thread_writes(tid);
        last = (after, bytes);
        if before == after {
            break;
        }
    }
    last
}

fn journal_run(policy: FsyncPolicy, writers: usize, window: Duration) -> JournalRun {
    let dir = TempDir::new("journal");
    let options = JournalOptions {
        policy,
        fsync_interval: Duration::from_millis(10),
        segment_bytes: 64 << 20,
        max_pending_bytes: 64 << 20,
    };
    let journal = Journal::start(&dir.0, 1, options).expect("start journal");
    // The writer thread names itself once it runs.
    let mut tid = None;
    for _ in 0..100 {
        tid = find_thread("botd-journal");
        if tid.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let run = runtime.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..writers)
            .map(|w| {
                let (journal, stop) = (journal.clone(), stop.clone());
                let mut recipient = [2u8; 33];
                recipient[1..9].copy_from_slice(&(w as u64).to_le_bytes());
                let mut event =
                    message_stored(&recipient, &[3; 33], 0, w as u64, Bytes::from(payload(0)));
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(Kind::MessageStored(m)) = &mut event.kind {
                            m.message_id += 1;
                        }
                        let lsn = journal.record(&event).expect("record");
                        // Under `always` the relay answers only once the record is durable;
                        // under the other policies at once.
                        if policy == FsyncPolicy::Always {
                            journal.progress().wait(lsn).await.expect("durable");
                        } else {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (lsn0, t0) = (journal.last_lsn(), Instant::now());
        let (io0, bytes0) = journal_counters(tid, &dir.0);
        tokio::time::sleep(window).await;
        let lsn1 = journal.last_lsn();
        let (io1, bytes1) = journal_counters(tid, &dir.0);
        let elapsed = t0.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            task.await.expect("writer task");
        }
        let written = bytes1 - bytes0;
        // The thread's other writes are 8-byte eventfd writes that wake parked runtime
        // workers when the durable lsn is published; the rest are record batches.
        let batches = io0
            .zip(io1)
            .map(|((calls0, bytes_w0), (calls1, bytes_w1))| {
                let wakes = (bytes_w1 - bytes_w0).saturating_sub(written) / 8;
                (calls1 - calls0).saturating_sub(wakes) as f64 / elapsed
            });
        JournalRun {
            appends_per_s: (lsn1 - lsn0) as f64 / elapsed,
            written_bytes_per_s: written as f64 / elapsed,
            batches_per_s: batches,
        }
    });
    journal.shutdown();
    run
}

fn bench_journal(scale: Scale, summary: &mut Summary) {
    println!(
        "\n== 1. journal appends/s (MessageStored, 100-B payload; median of {} x {:?}) ==",
        scale.journal_reps, scale.journal_window
    );
    let record_len = {
        let event = message_stored(&[2; 33], &[3; 33], 1, 1, Bytes::from(payload(0)));
        (event.encoded_len() + 8 + 12) as f64
    };
    println!("one record: {record_len:.0} B (12-B frame header, 8-B lsn, event)");
    let policies = [
        ("always", FsyncPolicy::Always),
        ("interval(10ms)", FsyncPolicy::Interval),
        ("never", FsyncPolicy::Never),
    ];
    for (name, policy) in policies {
        for writers in [1, 16, 256] {
            let mut appends = Vec::new();
            let mut written = Vec::new();
            let mut batches = Vec::new();
            for _ in 0..scale.journal_reps {
                let run = journal_run(policy, writers, scale.journal_window);
                appends.push(run.appends_per_s);
                written.push(run.written_bytes_per_s / record_len);
                batches.extend(run.batches_per_s);
            }
            let range = format!(
                "[{:.0}..{:.0}]",
                appends.iter().copied().fold(f64::INFINITY, f64::min),
                appends.iter().copied().fold(0.0, f64::max)
            );
            let appends = median(&mut appends);
            let written = median(&mut written);
            let batches = (!batches.is_empty()).then(|| median(&mut batches));
            let fsync = match (policy, batches) {
                (_, None) => "fsyncs: unknown (no /proc/self/task/<tid>/io)".to_string(),
                (FsyncPolicy::Always, Some(b)) => format!(
                    "fsyncs ≈ {b:.0}/s (one per batch), {:.1} appends per fsync",
                    appends / b.max(1e-9)
                ),
                (FsyncPolicy::Interval, Some(b)) => format!(
                    "fsyncs ≤ {:.0}/s (one per 10 ms at most), {b:.0} batches/s",
                    b.min(100.0)
                ),
                (FsyncPolicy::Never, Some(b)) => format!("fsyncs: 0, {b:.0} batches/s"),
            };
            let lag = if policy == FsyncPolicy::Always {
                String::new()
            } else {
                format!(", reached the file: {written:.0} records/s")
            };
            summary.line(format!(
                "journal fsync={name:<14} writers={writers:<3} appends/s={appends:>9.0} {range:<19} {fsync}{lag}"
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Recovery and 4. latency during a snapshot
// ---------------------------------------------------------------------------------------------

/// Opens the store, checks it holds `messages`, and returns it with the time `open` took.
fn timed_open(config: &Config, messages: usize) -> (Recovered, Duration) {
    let started = Instant::now();
    let (store, report) = EmbeddedStore::open(config, now_ms()).expect("open");
    let recovered = Recovered { store, report };
    let elapsed = started.elapsed();
    assert_eq!(recovered.report.stats.messages, messages, "recovered store");
    (recovered, elapsed)
}

fn close(recovered: Recovered) {
    recovered.store.journal().expect("durable").shutdown();
    drop(recovered);
}

fn bench_recovery_and_latency(scale: Scale, summary: &mut Summary) {
    let n = scale.messages;
    println!("\n== 2. recovery of {n} stored 100-B messages ==");
    let dir = TempDir::new("recovery");
    let config = config(&dir.0);
    let workload = Workload::new(scale.recipients, SENDERS);

    let (store, report) = EmbeddedStore::open(&config, now_ms()).expect("open empty");
    let recovered = Recovered { store, report };
    workload.register_all(recovered.store.state());
    let started = Instant::now();
    let now = now_ms();
    for i in 0..n as u64 {
        workload.store_message(recovered.store.state(), i, now);
    }
    let build = started.elapsed();
    close(recovered);
    let journal_bytes: u64 = std::fs::read_dir(dir.0.join("journal"))
        .expect("journal dir")
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!(
        "built through State::append with the journal as sink (fsync never): {n} messages in {:.2} s ({:.0}/s), journal {:.0} MB",
        build.as_secs_f64(),
        n as f64 / build.as_secs_f64(),
        journal_bytes as f64 / 1e6
    );

    let mut from_journal = Vec::new();
    let mut recover_only = Vec::new();
    let mut replayed = 0;
    for _ in 0..scale.recovery_reps {
        let (recovered, elapsed) = timed_open(&config, n);
        replayed = recovered.report.records_replayed;
        from_journal.push(elapsed.as_secs_f64());
        recover_only.push(recovered.report.elapsed_ms as f64 / 1000.0);
        close(recovered);
    }
    let all = format!("{from_journal:.2?}");
    let journal_median = median(&mut from_journal);
    summary.line(format!(
        "recovery from journal only: {journal_median:.3} s (median of {all} s; recover() alone {:.3} s; {replayed} records replayed, {:.0} MB; warm page cache) target ≤ 2 s: {}",
        median(&mut recover_only),
        journal_bytes as f64 / 1e6,
        if journal_median <= 2.0 { "met" } else { "MISSED" }
    ));

    let (recovered, _) = timed_open(&config, n);
    let started = Instant::now();
    let info = recovered
        .store
        .snapshot(now_ms())
        .expect("snapshot")
        .expect("a durable store");
    let snapshot_time = started.elapsed();
    close(recovered);
    summary.line(format!(
        "snapshot of {n} messages: {:.3} s, {} events, {:.0} MB (incl. fsync)",
        snapshot_time.as_secs_f64(),
        info.events,
        info.bytes as f64 / 1e6
    ));

    let mut from_snapshot = Vec::new();
    let mut recover_only = Vec::new();
    let mut kept = None;
    for rep in 0..scale.recovery_reps {
        let (recovered, elapsed) = timed_open(&config, n);
        assert!(
            recovered.report.snapshot.is_some(),
            "recovered from a snapshot"
        );
        from_snapshot.push(elapsed.as_secs_f64());
        recover_only.push(recovered.report.elapsed_ms as f64 / 1000.0);
        if rep + 1 == scale.recovery_reps {
            kept = Some(recovered);
        } else {
            close(recovered);
        }
    }
    let all = format!("{from_snapshot:.2?}");
    let snapshot_median = median(&mut from_snapshot);
    summary.line(format!(
        "recovery from snapshot:     {snapshot_median:.3} s (median of {all} s; recover() alone {:.3} s; {} snapshot events; warm page cache) target ≤ 2 s: {}",
        median(&mut recover_only),
        info.events,
        if snapshot_median <= 2.0 { "met" } else { "MISSED" }
    ));

    let recovered = kept.expect("kept store");
    bench_latency(scale, &recovered, &workload, summary);
    close(recovered);
}

/// Runs two paced sender threads while `during` runs; returns every send's duration in ns.
fn paced_sends(
    store: &State,
    workload: &Workload,
    counter: &AtomicU64,
    scale: Scale,
    during: &mut dyn FnMut(),
) -> Vec<u64> {
    let stop = AtomicBool::new(false);
    let interval = Duration::from_secs_f64(1.0 / scale.latency_rate);
    let now = now_ms();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut latencies = Vec::with_capacity(1 << 16);
                    let mut next = Instant::now();
                    while !stop.load(Ordering::Acquire) {
                        let now_i = Instant::now();
                        if now_i < next {
                            std::thread::sleep(next - now_i);
                        }
                        next = next.max(now_i) + interval;
                        let i = counter.fetch_add(1, Ordering::Relaxed);
                        let req = workload.send(i, Bytes::from(payload(i)));
                        let started = Instant::now();
                        append(store, workload.sender(i), &req, now);
                        latencies.push(started.elapsed().as_nanos() as u64);
                    }
                    latencies
                })
            })
            .collect();
        // Let the senders start before the phase begins.
        std::thread::sleep(Duration::from_millis(20));
        during();
        stop.store(true, Ordering::Release);
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("sender thread"))
            .collect::<Vec<u64>>()
    })
}

fn bench_latency(scale: Scale, recovered: &Recovered, workload: &Workload, summary: &mut Summary) {
    let (store, storage) = (recovered.store.state(), &recovered.store);
    let messages = store.stats().messages;
    println!(
        "\n== 4. store append latency, 2 threads x {:.0} paced sends/s, store of {messages} messages (journal fsync never) ==",
        scale.latency_rate
    );

    // snapshot_shard per shard: the lock is held only while the shard is copied, the rest of
    // the call builds events from the copy.
    let mut calls = Vec::with_capacity(store.shard_count());
    let mut busiest = 0;
    for index in 0..store.shard_count() {
        let started = Instant::now();
        let (events, _) = store.snapshot_shard(index);
        calls.push(started.elapsed().as_nanos() as u64);
        busiest = busiest.max(events.len());
    }
    let total: u64 = calls.iter().sum();
    calls.sort_unstable();
    summary.line(format!(
        "snapshot_shard call over {} shards: median={} p99={} max={} sum={:.0} ms (busiest shard: {busiest} events)",
        calls.len(),
        us(percentile(&calls, 0.5)),
        us(percentile(&calls, 0.99)),
        us(*calls.last().unwrap_or(&0)),
        total as f64 / 1e6,
    ));

    let counter = AtomicU64::new(1 << 40);
    let window = scale.latency_window;
    let send = |during: &mut dyn FnMut()| paced_sends(store, workload, &counter, scale, during);
    let (mut normal, mut during_snapshot, mut during_walk, mut beside_hog) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut snapshot_times, mut walks) = (Vec::new(), 0);
    // The phases alternate, so that a change of the machine's background load spreads over
    // all of them.
    for _ in 0..scale.latency_rounds {
        normal.extend(send(&mut || std::thread::sleep(window)));

        during_snapshot.extend(send(&mut || {
            let started = Instant::now();
            let mut taken = 0;
            while taken == 0 || started.elapsed() < window {
                let t = Instant::now();
                storage.snapshot(now_ms()).expect("snapshot");
                snapshot_times.push(t.elapsed().as_secs_f64());
                taken += 1;
            }
        }));

        during_walk.extend(send(&mut || {
            let started = Instant::now();
            let mut done = 0;
            while done == 0 || started.elapsed() < window {
                for index in 0..store.shard_count() {
                    black_box(store.snapshot_shard(index));
                }
                done += 1;
            }
            walks += done;
        }));

        beside_hog.extend(send(&mut || {
            let started = Instant::now();
            let mut block = [0u8; 64];
            while started.elapsed() < window {
                for _ in 0..1000 {
                    let digest = sha256(&[&block]);
                    block[..32].copy_from_slice(&digest);
                }
            }
            black_box(block);
        }));
    }
    for lat in [
        &mut normal,
        &mut during_snapshot,
        &mut during_walk,
        &mut beside_hog,
    ] {
        lat.sort_unstable();
    }

    let p99_normal = percentile(&normal, 0.99).max(1);
    let mut describe = |name: &str, lat: &[u64], extra: String| {
        let p99 = percentile(lat, 0.99);
        summary.line(format!(
            "send latency {name:<27} n={:<6} p50={:>9} p99={:>9} p99.9={:>9} max={:>9} >1ms={:<4} p99/normal={:.2}{extra}",
            lat.len(),
            us(percentile(lat, 0.50)),
            us(p99),
            us(percentile(lat, 0.999)),
            us(*lat.last().unwrap_or(&0)),
            lat.iter().filter(|&&ns| ns > 1_000_000).count(),
            p99 as f64 / p99_normal as f64,
        ));
    };
    describe("normal", &normal, String::new());
    let ratio = percentile(&during_snapshot, 0.99) as f64 / p99_normal as f64;
    describe(
        "during Storage::snapshot",
        &during_snapshot,
        format!(
            " ({} snapshot(s), {:.2} s each; target ≤ 2x: {})",
            snapshot_times.len(),
            median(&mut snapshot_times),
            if ratio <= 2.0 { "met" } else { "MISSED" }
        ),
    );
    describe(
        "during snapshot_shard walk",
        &during_walk,
        format!(" ({walks} walk(s) over all shards, no file IO)"),
    );
    describe(
        "beside a CPU hog",
        &beside_hog,
        " (sha256 loop: CPU contention only)".into(),
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Memory per stored message (each variant in a fresh process)
// ---------------------------------------------------------------------------------------------

/// The allocator the figures are for.
#[cfg(feature = "mimalloc")]
const ALLOCATOR_NAME: &str = "mimalloc (heap: memory it has committed)";
#[cfg(not(feature = "mimalloc"))]
const ALLOCATOR_NAME: &str = "the system's (heap: glibc's bytes in use)";

/// Memory mimalloc has committed (pages it took from the system and still holds).
#[cfg(feature = "mimalloc")]
fn heap_in_use() -> u64 {
    let mut committed = 0usize;
    let null = std::ptr::null_mut();
    // SAFETY: mi_process_info writes the figures asked for; null pointers ask for none.
    unsafe {
        libmimalloc_sys::mi_process_info(null, null, null, null, null, &mut committed, null, null)
    };
    committed as u64
}

/// Bytes the allocator has handed out and not yet taken back (glibc's `mallinfo2`: chunk
/// headers included, free holes excluded), so that memory freed by acks but kept by the
/// allocator is not counted as live.
#[cfg(all(not(feature = "mimalloc"), target_os = "linux", target_env = "gnu"))]
fn heap_in_use() -> u64 {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks + info.hblkhd) as u64
}

#[cfg(all(
    not(feature = "mimalloc"),
    not(all(target_os = "linux", target_env = "gnu"))
))]
fn heap_in_use() -> u64 {
    0
}

/// A sender identity that is not a key; the store only compares and interns it.
fn synthetic_sender(i: u64) -> Identity {
    let mut id = [3u8; 33];
    id[1..9].copy_from_slice(&i.to_le_bytes());
    id
}

fn child_memory(spec: &str) {
    let mut parts = spec.split(':');
    let (variant, n, recipients) = (
        parts.next().expect("variant").to_string(),
        parts
            .next()
            .and_then(|v| v.parse::<usize>().ok())
            .expect("count"),
        parts
            .next()
            .and_then(|v| v.parse::<usize>().ok())
            .expect("recipients"),
    );
    let now = now_ms();
    let store = State::new(&shards_config(SHARDS), None);
    let workload = Workload::new(recipients, SENDERS);
    workload.register_all(&store);
    let mut read_buf = BytesMut::with_capacity(READ_BUF);
    let mut encoded = Vec::with_capacity(512);
    let (rss_before, heap_before) = (rss_bytes(), heap_in_use());
    for i in 0..n as u64 {
        match variant.as_str() {
            // The payload in its own allocation, as an API caller builds it.
            "store-vec" | "half-acked" | "small-swept" => workload.store_message(&store, i, now),
            // Every message from another sender: nothing to share in the sender table.
            "distinct-senders" => {
                let req = workload.send(i, Bytes::from(payload(i)));
                append(&store, &synthetic_sender(i), &req, now);
            }
            // Recovery's path: the event decoded from the journal's bytes, replayed.
            "store-replayed" => {
                let id = i / workload.recipients.len() as u64 + 1;
                let event = message_stored(
                    workload.recipient(i),
                    workload.sender(i),
                    id,
                    i,
                    Bytes::from(payload(i)),
                );
                encoded.clear();
                event.encode(&mut encoded).expect("encode");
                let decoded = Event::decode(&encoded[..]).expect("decode");
                store.replay(&decoded).expect("replay");
            }
            // The live path: a frame split from the session's 8 KiB read buffer (length
            // prefix, body, tag), decoded from the frozen plaintext.
            "store-readbuf" => {
                let req = workload.send(i, Bytes::from(payload(i)));
                encoded.clear();
                Frame::new(i + 1, Body::Send(req))
                    .encode(&mut encoded)
                    .expect("encode");
                read_buf.reserve(4 + encoded.len() + TAG_LEN);
                read_buf.put_u32(encoded.len() as u32);
                read_buf.extend_from_slice(&encoded);
                read_buf.extend_from_slice(&[0; TAG_LEN]);
                read_buf.advance(4);
                let mut body = read_buf.split_to(encoded.len() + TAG_LEN);
                drop(body.split_off(encoded.len()));
                let frame = Frame::decode(body.freeze()).expect("decode");
                let Some(Body::Send(req)) = frame.body else {
                    unreachable!("a Send")
                };
                append(&store, workload.sender(i), &req, now);
            }
            other => panic!("unknown memory variant {other}"),
        }
    }
    if variant == "half-acked" {
        // Every other message of every mailbox acked: holes in every chunk.
        let per_mailbox = (n / recipients) as u64;
        for recipient in &workload.recipients {
            let odd: Vec<u64> = (1..=per_mailbox).step_by(2).collect();
            for ids in odd.chunks(4096) {
                store.ack(&mailbox(recipient), ids).expect("ack");
            }
        }
    }
    match variant.as_str() {
        // As `EmbeddedStore::open` does after recovery.
        "store-replayed" => botd_relay::memory::release_free_memory(),
        // As the relay's maintenance sweep does (nothing is old enough to expire).
        "small-swept" | "half-acked" => {
            store.expire(0, 0);
            botd_relay::memory::release_free_memory();
        }
        _ => {}
    }
    let (rss_after, heap_after) = (rss_bytes(), heap_in_use());
    let live = store.stats().messages;
    black_box(&store);
    println!(
        "MEMRESULT {} {} {live}",
        rss_after.saturating_sub(rss_before),
        heap_after.saturating_sub(heap_before)
    );
}

/// Bytes per live message of one variant, measured in a fresh copy of this process.
#[derive(Debug, Clone, Copy)]
struct MemoryUse {
    rss: f64,
    heap: f64,
    live: usize,
}

fn memory_variant(variant: &str, n: usize, recipients: usize) -> Option<MemoryUse> {
    let exe = std::env::current_exe().ok()?;
    let output = Command::new(exe)
        .env(CHILD_ENV, format!("{variant}:{n}:{recipients}"))
        .output()
        .ok()?;
    if !output.status.success() {
        eprintln!(
            "memory variant {variant} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        return None;
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().find_map(|l| l.strip_prefix("MEMRESULT "))?;
    let mut values = line.split_whitespace().map(|v| v.parse::<u64>().ok());
    let (rss, heap, live) = (values.next()??, values.next()??, values.next()??);
    let per = |bytes: u64| bytes as f64 / live.max(1) as f64;
    Some(MemoryUse {
        rss: per(rss),
        heap: per(heap),
        live: live as usize,
    })
}

fn bench_memory(scale: Scale, summary: &mut Summary) {
    let (n, r) = (scale.messages, scale.recipients);
    println!(
        "\n== 3. memory per stored message beyond its {PAYLOAD_LEN}-B payload: RSS and heap delta over the live messages, fresh process per variant; allocator: {ALLOCATOR_NAME} =="
    );
    let variants: [(&str, usize, String); 7] = [
        (
            "store-vec",
            r,
            format!(
                "State::append, {r} mailboxes x {}, {SENDERS} senders",
                n / r
            ),
        ),
        (
            "store-replayed",
            r,
            "as recovered (journal/snapshot replay)".into(),
        ),
        (
            "store-readbuf",
            r,
            "live path (payload sliced from an 8 KiB read buffer)".into(),
        ),
        (
            "store-vec",
            n / 10,
            format!("small mailboxes: {} mailboxes x 10", n / 10),
        ),
        (
            "small-swept",
            n / 10,
            "the same after a sweep (trim) and release_free_memory".into(),
        ),
        (
            "distinct-senders",
            r,
            "every message from a different sender".into(),
        ),
        (
            "half-acked",
            r,
            "every other message of each mailbox acked, then a sweep and release_free_memory"
                .into(),
        ),
    ];
    for (index, (variant, recipients, what)) in variants.iter().enumerate() {
        let line = match memory_variant(variant, n, *recipients) {
            Some(m) => {
                let rss = m.rss - PAYLOAD_LEN as f64;
                let heap = m.heap - PAYLOAD_LEN as f64;
                let target = if index == 0 {
                    format!(
                        " (target ≤ 96 B: {})",
                        if rss <= 96.0 { "met" } else { "MISSED" }
                    )
                } else {
                    String::new()
                };
                format!(
                    "memory beyond payload, {what}: RSS {rss:.0} B, heap {heap:.0} B per message over {} live{target}",
                    m.live
                )
            }
            None => format!("memory beyond payload, {what}: n/a"),
        };
        summary.line(line);
    }
}

// ---------------------------------------------------------------------------------------------
// Criterion groups
// ---------------------------------------------------------------------------------------------

fn criterion_config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

/// `State::append` of a 100-B message into an in-memory store; every 1,000 sends the messages
/// are acked (outside the timing) so the store stays small.
fn store_send(c: &mut Criterion) {
    let store = State::new(&shards_config(SHARDS), None);
    let workload = Workload::new(64, SENDERS);
    workload.register_all(&store);
    let mut next = 0u64;
    let mut group = c.benchmark_group("store");
    group.throughput(Throughput::Elements(1));
    group.bench_function("send_100B_no_journal", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            let mut left = iters;
            let now = now_ms();
            while left > 0 {
                let chunk = left.min(1000);
                let requests: Vec<Send> = (next..next + chunk)
                    .map(|i| workload.send(i, Bytes::from(payload(i))))
                    .collect();
                let started = Instant::now();
                let mut ids = Vec::with_capacity(chunk as usize);
                for (k, req) in requests.iter().enumerate() {
                    let i = next + k as u64;
                    let id = append(&store, workload.sender(i), req, now);
                    ids.push((i, id));
                }
                timed += started.elapsed();
                for (i, id) in ids {
                    store
                        .ack(&mailbox(workload.recipient(i)), &[id])
                        .expect("ack");
                }
                next += chunk;
                left -= chunk;
            }
            timed
        })
    });
    group.finish();
}

/// `State::snapshot_shard` of one shard holding 1M/256 messages: the lock hold per shard.
fn snapshot_shard(c: &mut Criterion) {
    let store = State::new(&shards_config(1), None);
    let workload = Workload::new(4, SENDERS);
    workload.register_all(&store);
    let now = now_ms();
    let per_shard = 1_000_000 / SHARDS;
    for i in 0..per_shard as u64 {
        workload.store_message(&store, i, now);
    }
    let mut group = c.benchmark_group("store");
    group.throughput(Throughput::Elements(per_shard as u64));
    group.bench_function(format!("snapshot_shard_{per_shard}_messages"), |b| {
        b.iter_with_large_drop(|| store.snapshot_shard(0))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion_config();
    targets = store_send, snapshot_shard
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child_memory(&spec);
        return;
    }
    let scale = Scale::new(std::env::args().any(|a| a == "--bench"));
    let parts = std::env::var("BOTD_BENCH_PARTS").unwrap_or_else(|_| "1,2,3,4,criterion".into());
    let wants = |part: &str| parts.split(',').any(|p| p.trim() == part);
    let started = Instant::now();
    let ticks_at_start = cpu_ticks();
    let mut summary = Summary::default();
    summary.line(format!(
        "machine: {} CPUs available, temp dir {} on {}; shared and noisy: figures vary run to run",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::env::temp_dir().display(),
        filesystem_of(&std::env::temp_dir()),
    ));
    if !scale.full {
        summary.line("smoke scale (no --bench): figures are not meaningful".into());
    }
    if wants("1") {
        bench_journal(scale, &mut summary);
    }
    if wants("2") || wants("4") {
        bench_recovery_and_latency(scale, &mut summary);
    }
    if wants("3") {
        bench_memory(scale, &mut summary);
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let (Some((busy0, mine0)), Some((busy1, mine1))) = (ticks_at_start, cpu_ticks()) {
        // Ticks are 1/100 s on Linux.
        let others = (busy1 - busy0).saturating_sub(mine1 - mine0) as f64 / 100.0 / elapsed;
        summary.line(format!(
            "noise: other processes kept {others:.2} of the {} CPUs busy during these {elapsed:.0} s (load average now: {})",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
        ));
    }
    println!("\n==== storage bench summary ({elapsed:.0} s) ====");
    for line in &summary.0 {
        println!("storage: {line}");
    }
    println!();
    if wants("criterion") {
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
}

/// The default limits with `shards` store shards.
fn shards_config(shards: usize) -> Config {
    Config {
        store_shards: shards,
        ..Config::default()
    }
}
