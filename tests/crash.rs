//! Crash recovery of the real `botd-relay` binary under each fsync policy: rounds of concurrent
//! sends and acks, each ended by a SIGKILL while the load is still running, then a restart on
//! the same data directory. Afterwards every answered `Send` must still be there (or acked),
//! no answered ack may come back, nothing may be invented and no message id may be reused; and
//! since the relay pushes a message only once it is durable, every pushed message must survive
//! too (unless its ack was sent). Even rounds kill at a random moment; odd rounds, after the
//! random delay, kill right when a message is pushed ahead of its `Sent` answer, the moment a
//! relay that pushed too early would lose it.
//!
//! The random choices (kill delays, which messages get acked) come from a seed that is printed;
//! rerun with `BOTD_CRASH_SEED=<seed>` to repeat them. `BOTD_CRASH_KEEP=1` keeps the data
//! directory and the relay logs of a failed run.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use botd_client::{verify_delivery, Client, ClientError, ClientOptions, OutgoingMessage};
use botd_protocol::keys::{KeyPair, PublicKeyBytes};
use botd_protocol::proto::{Body, Deliver};
use common::TempDir;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;
use tokio::time::{sleep, timeout, timeout_at, Instant};

/// Crash rounds before the final check.
const ROUNDS: usize = 6;
/// Concurrent sending sessions per round.
const SEND_TASKS: usize = 4;
/// Upper bound on the sends of one task in one round (the kill normally comes first).
const MAX_SENDS_PER_TASK: usize = 5_000;
/// The relay is killed this long (ms, inclusive range) after the load started.
const KILL_AFTER_MS: (u64, u64) = (50, 400);
/// Time for the relay to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Connect and request timeouts of the clients.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for the load tasks to notice the kill and end.
const JOIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Final collection: overall cap, and the quiet spell after which nothing more is expected.
const COLLECT_TIMEOUT: Duration = Duration::from_secs(15);
const COLLECT_QUIET: Duration = Duration::from_secs(1);
/// Cap on the whole test.
const TEST_TIMEOUT: Duration = Duration::from_secs(55);
/// In the targeted rounds, how much longer than the random delay the kill may wait for a push
/// of a message whose `Sent` has not arrived yet.
const TARGET_WAIT: Duration = Duration::from_millis(200);
/// Chance that the recipient acks a delivered message.
const ACK_PROBABILITY: f64 = 0.5;

// ---------------------------------------------------------------------------------------------
// The relay process
// ---------------------------------------------------------------------------------------------

/// A running `botd-relay`; killed (SIGKILL) and reaped when dropped, whatever happened.
struct RelayProcess {
    child: Child,
    addr: SocketAddr,
    key: PublicKeyBytes,
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills a child that has not yet become a [`RelayProcess`].
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl RelayProcess {
    /// Starts the relay on 127.0.0.1:0 over `data_dir`, its stderr going to `log`, and waits
    /// (bounded) for its `listening on ADDR as KEY` line.
    async fn start(data_dir: &Path, log: &Path, fsync: &str) -> Result<Self, String> {
        let stderr = std::fs::File::create(log)
            .map_err(|err| format!("cannot create {}: {err}", log.display()))?;
        let mut command = Command::new(env!("CARGO_BIN_EXE_botd-relay"));
        // Only the settings below, whatever BOTD_* variables the test runs with.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("BOTD_") {
                command.env_remove(name);
            }
        }
        let unlimited = "{ per_second = 1000000.0, burst = 1000000 }";
        command
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--metrics-listen")
            .arg("off")
            .env("BOTD_FSYNC", fsync)
            .env("BOTD_LOG", "info")
            // The load, not the quotas, is what this test is about.
            .env("BOTD_SEND_RATE_PER_IDENTITY", unlimited)
            .env("BOTD_SEND_RATE_PER_PAIR", unlimited)
            .env("BOTD_MAILBOX_MAX_MESSAGES", "100000")
            .env("BOTD_MAX_UNACKED", "1000000")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        let mut child = command
            .spawn()
            .map_err(|err| format!("cannot start botd-relay: {err}"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut guard = KillOnDrop(Some(child));

        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            // Keep draining until the relay exits, so it never writes into a closed pipe.
            for _ in lines {}
        });
        let line = match timeout(START_TIMEOUT, rx).await {
            Err(_) => return Err(format!("no listening line within {START_TIMEOUT:?}")),
            Ok(Err(_)) | Ok(Ok(None)) => {
                let status = guard.0.as_mut().and_then(|c| c.try_wait().ok().flatten());
                return Err(format!("relay closed stdout before listening ({status:?})"));
            }
            Ok(Ok(Some(Err(err)))) => return Err(format!("reading the relay's stdout: {err}")),
            Ok(Ok(Some(Ok(line)))) => line,
        };
        let (addr, key) = parse_listening(&line)?;
        Ok(RelayProcess {
            child: guard.0.take().expect("child present"),
            addr,
            key,
        })
    }

    /// SIGKILL, then reap.
    fn kill(&mut self) -> Result<ExitStatus, String> {
        self.child
            .kill()
            .map_err(|err| format!("cannot kill the relay: {err}"))?;
        self.child
            .wait()
            .map_err(|err| format!("cannot reap the relay: {err}"))
    }
}

/// Parses `botd-relay listening on ADDR as <66 hex digits>`.
fn parse_listening(line: &str) -> Result<(SocketAddr, PublicKeyBytes), String> {
    let rest = line
        .trim()
        .strip_prefix("botd-relay listening on ")
        .ok_or_else(|| format!("unexpected first line {line:?}"))?;
    let (addr, key) = rest
        .split_once(" as ")
        .ok_or_else(|| format!("no key in {line:?}"))?;
    let addr: SocketAddr = addr
        .parse()
        .map_err(|err| format!("bad address in {line:?}: {err}"))?;
    if key.len() != 66 {
        return Err(format!("key in {line:?} is not 66 hex digits"));
    }
    let key = PublicKeyBytes::from_hex(key).map_err(|err| format!("bad key in {line:?}: {err}"))?;
    Ok((addr, key))
}

// ---------------------------------------------------------------------------------------------
// What the clients saw
// ---------------------------------------------------------------------------------------------

/// Everything the clients attempted and were told, across all rounds.
#[derive(Default)]
struct Ledger {
    /// Payloads of every `Send` issued, answered or not.
    attempted: HashSet<String>,
    /// Answered `Send`s: message id -> payload.
    sent: BTreeMap<u64, String>,
    /// Every (id, payload) seen anywhere, from either side.
    by_id: HashMap<u64, String>,
    by_payload: HashMap<String, u64>,
    /// Messages pushed during the rounds: id -> payload.
    delivered: BTreeMap<u64, String>,
    /// Ids named in an `AckMessages` (the answer may have been lost in a crash).
    ack_attempted: HashSet<u64>,
    /// Ids whose `Acked` answer arrived.
    acked: HashSet<u64>,
    violations: Vec<String>,
    /// (id, payload) conflicts already reported, so that a reused id is reported once.
    reported: HashSet<(&'static str, u64, String)>,
}

impl Ledger {
    fn violation(&mut self, text: String) {
        eprintln!("VIOLATION: {text}");
        self.violations.push(text);
    }

    /// Checks one observed (id, payload) against everything seen before.
    fn observe(&mut self, id: u64, payload: &str, how: &str) {
        if !self.attempted.contains(payload) {
            self.violation(format!(
                "{how}: message {id} carries {payload:?}, which the test never sent"
            ));
        }
        match self.by_id.get(&id) {
            Some(earlier)
                if earlier != payload && self.reported.insert(("id", id, payload.to_owned())) =>
            {
                let text = format!(
                    "{how}: message id {id} reused: it was {earlier:?} before, now {payload:?}"
                );
                self.violation(text);
            }
            Some(_) => {}
            None => {
                self.by_id.insert(id, payload.to_owned());
            }
        }
        match self.by_payload.get(payload) {
            Some(&other)
                if other != id && self.reported.insert(("payload", id, payload.to_owned())) =>
            {
                let text = format!(
                    "{how}: payload {payload:?} seen as message {other} before, now as {id}"
                );
                self.violation(text);
            }
            Some(_) => {}
            None => {
                self.by_payload.insert(payload.to_owned(), id);
            }
        }
    }

    /// Checks a delivered message: sender (and, with `verify`, its signature end to end), and
    /// the observations above. Returns the payload.
    fn delivery(
        &mut self,
        deliver: &Deliver,
        parties: &Parties,
        verify: bool,
        how: &str,
    ) -> String {
        let payload = String::from_utf8_lossy(&deliver.payload).into_owned();
        let sender = if verify {
            verify_delivery(deliver, parties.recipient.public()).map_err(|err| err.to_string())
        } else {
            PublicKeyBytes::parse(&deliver.sender).map_err(|err| err.to_string())
        };
        match sender {
            Ok(sender) if sender == *parties.sender.public() => {}
            Ok(sender) => self.violation(format!(
                "{how}: message {} claims sender {sender}",
                deliver.message_id
            )),
            Err(err) => self.violation(format!(
                "{how}: message {} fails verification: {err}",
                deliver.message_id
            )),
        }
        if deliver.recipient_device != 1 {
            self.violation(format!(
                "{how}: message {} is for device {}",
                deliver.message_id, deliver.recipient_device
            ));
        }
        if self.acked.contains(&deliver.message_id) {
            self.violation(format!(
                "{how}: message {} ({payload:?}) delivered again after its ack was answered",
                deliver.message_id
            ));
        }
        self.observe(deliver.message_id, &payload, how);
        payload
    }
}

/// The two identities; their keys stay the same across restarts.
struct Parties {
    sender: Arc<KeyPair>,
    recipient: Arc<KeyPair>,
}

type Shared = Arc<Mutex<Ledger>>;

/// Lets the recipient tell the killer that it was just pushed a message of this round whose
/// `Sent` has not arrived: the moment a message that is not yet known durable is visible.
#[derive(Default)]
struct Trigger {
    armed: AtomicBool,
    fired: Notify,
}

async fn connect(
    relay: (SocketAddr, PublicKeyBytes),
    identity: Arc<KeyPair>,
) -> Result<Client, ClientError> {
    let options = ClientOptions {
        connect_timeout: CLIENT_TIMEOUT,
        request_timeout: CLIENT_TIMEOUT,
        // The relay may push a whole mailbox at once; never stall the connection on it.
        push_buffer: 1 << 20,
        keepalive: false,
        ..ClientOptions::default()
    };
    Client::connect(relay.0, identity, relay.1, options).await
}

/// How a load task ended.
#[derive(Debug, Default)]
struct TaskEnd {
    ok: usize,
    ended: String,
}

/// Sends distinct payloads one after another until the connection fails (the kill), the cap,
/// or `deadline`.
async fn send_load(
    relay: (SocketAddr, PublicKeyBytes),
    parties: Arc<Parties>,
    ledger: Shared,
    round: usize,
    task: usize,
    deadline: Instant,
) -> TaskEnd {
    let mut end = TaskEnd::default();
    let client = match connect(relay, parties.sender.clone()).await {
        Ok(client) => client,
        Err(err) => {
            end.ended = format!("connect: {err}");
            return end;
        }
    };
    let recipient = *parties.recipient.public();
    for n in 0..MAX_SENDS_PER_TASK {
        if Instant::now() >= deadline {
            end.ended = "deadline".into();
            return end;
        }
        let payload = format!("r{round}-t{task}-{n}");
        ledger.lock().attempted.insert(payload.clone());
        let message = OutgoingMessage::new(recipient, 1, 1, payload.clone().into_bytes());
        match client.send_message(message).await {
            Ok(sent) => {
                end.ok += 1;
                let mut ledger = ledger.lock();
                if sent.duplicate {
                    ledger.violation(format!(
                        "Sent for fresh {payload:?} says duplicate (id {})",
                        sent.message_id
                    ));
                }
                ledger.observe(sent.message_id, &payload, "Sent");
                ledger.sent.insert(sent.message_id, payload);
            }
            Err(err) => {
                if let Some(code) = err.code() {
                    // An answer from the relay: it was alive, and refused a valid send.
                    ledger.lock().violation(format!(
                        "relay refused {payload:?} with {}: {err}",
                        code.as_str_name()
                    ));
                }
                end.ended = format!("after {n} sends: {err}");
                return end;
            }
        }
    }
    end.ended = "cap reached".into();
    end
}

/// How the recipient's round ended.
#[derive(Debug, Default)]
struct RecipientEnd {
    deliveries: usize,
    acked: usize,
    ended: String,
    acker_ended: String,
}

/// Subscribes from the start of the mailbox and acks a random part of what is pushed, in small
/// batches, until the connection fails or `deadline`. The acks go over a second session of the
/// recipient, so that waiting for an ack's durability never holds up the pushes.
async fn receive_and_ack(
    relay: (SocketAddr, PublicKeyBytes),
    parties: Arc<Parties>,
    ledger: Shared,
    round: usize,
    seed: u64,
    trigger: Arc<Trigger>,
    deadline: Instant,
) -> RecipientEnd {
    let mut end = RecipientEnd::default();
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut client, acker) = match tokio::try_join!(
        connect(relay, parties.recipient.clone()),
        connect(relay, parties.recipient.clone())
    ) {
        Ok(clients) => clients,
        Err(err) => {
            end.ended = format!("connect: {err}");
            return end;
        }
    };
    let (batches, batch_rx) = tokio::sync::mpsc::unbounded_channel();
    let acker = tokio::spawn(ack_batches(acker, batch_rx, ledger.clone(), deadline));
    end.ended = match client.subscribe(1, 0).await {
        Err(err) => format!("subscribe: {err}"),
        Ok(_) => {
            let how = format!("round {round} delivery");
            let this_round = format!("r{round}-");
            let mut batch = Vec::new();
            let mut batch_size = rng.gen_range(1..=8);
            loop {
                let frame = match timeout_at(deadline, client.next_push()).await {
                    Err(_) => break "deadline".to_owned(),
                    Ok(None) => break "connection closed".to_owned(),
                    Ok(Some(frame)) => frame,
                };
                match frame.body {
                    Some(Body::Deliver(deliver)) => {
                        end.deliveries += 1;
                        {
                            let mut ledger = ledger.lock();
                            let payload = ledger.delivery(&deliver, &parties, false, &how);
                            let unanswered = !ledger.sent.contains_key(&deliver.message_id);
                            if unanswered
                                && payload.starts_with(&this_round)
                                && trigger.armed.swap(false, Ordering::AcqRel)
                            {
                                trigger.fired.notify_one();
                            }
                            ledger.delivered.insert(deliver.message_id, payload);
                        }
                        if rng.gen_bool(ACK_PROBABILITY) {
                            batch.push(deliver.message_id);
                        }
                    }
                    Some(Body::Error(error)) => break format!("error push: {error:?}"),
                    _ => {}
                }
                if batch.len() >= batch_size {
                    let _ = batches.send(std::mem::take(&mut batch));
                    batch_size = rng.gen_range(1..=8);
                }
            }
        }
    };
    drop(batches);
    match timeout(JOIN_TIMEOUT, acker).await {
        Ok(Ok((acked, ended))) => {
            end.acked = acked;
            end.acker_ended = ended;
        }
        Ok(Err(err)) => end.acker_ended = format!("task failed: {err}"),
        Err(_) => end.acker_ended = "did not end".into(),
    }
    end
}

/// Acks the batches it is handed, one request each, recording what was asked and answered.
/// Returns the number deleted and how it ended.
async fn ack_batches(
    client: Client,
    mut batches: tokio::sync::mpsc::UnboundedReceiver<Vec<u64>>,
    ledger: Shared,
    deadline: Instant,
) -> (usize, String) {
    let mut deleted = 0;
    loop {
        let batch = match timeout_at(deadline, batches.recv()).await {
            Err(_) => return (deleted, "deadline".into()),
            Ok(None) => return (deleted, "receiver ended".into()),
            Ok(Some(batch)) => batch,
        };
        ledger.lock().ack_attempted.extend(batch.iter().copied());
        match client.ack(1, batch.clone()).await {
            Ok(acked) => {
                let mut ledger = ledger.lock();
                if acked.deleted as usize != batch.len() {
                    ledger.violation(format!(
                        "ack of {} delivered messages {batch:?} deleted {}",
                        batch.len(),
                        acked.deleted
                    ));
                }
                ledger.acked.extend(batch);
                deleted += acked.deleted as usize;
            }
            Err(err) => {
                if let Some(code) = err.code() {
                    ledger.lock().violation(format!(
                        "relay refused ack {batch:?} with {}: {err}",
                        code.as_str_name()
                    ));
                }
                return (deleted, format!("ack: {err}"));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

fn log_path(dir: &Path, start: usize) -> PathBuf {
    dir.join(format!("relay-{start}.log"))
}

/// The last `lines` lines of every relay log in `dir`.
fn log_tails(dir: &Path, lines: usize) -> String {
    let mut out = String::new();
    for start in 0..=ROUNDS {
        let path = log_path(dir, start);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let all: Vec<&str> = text.lines().collect();
        // Panics and warnings anywhere in the log, then its tail.
        for (at, line) in all.iter().enumerate() {
            if line.contains("panicked at") || line.contains(" ERROR ") || line.contains(" WARN ") {
                let _ = writeln!(out, "{}:{}: {line}", path.display(), at + 1);
                if line.contains("panicked at") {
                    if let Some(next) = all.get(at + 1) {
                        let _ = writeln!(out, "{}:{}: {next}", path.display(), at + 2);
                    }
                }
            }
        }
        let _ = writeln!(out, "--- {} (last {lines} lines) ---", path.display());
        for line in &all[all.len().saturating_sub(lines)..] {
            let _ = writeln!(out, "{line}");
        }
    }
    out
}

/// Runs the crash rounds under one fsync policy. Under every policy an answer leaves only once
/// its record was handed to the operating system, so a crash of the process loses nothing
/// answered (what `interval` and `never` may lose is a machine crash's, not this test's).
async fn survives_sigkill(fsync: &str) {
    // One policy at a time: each run loads the machine with a relay and its clients.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = ONE_AT_A_TIME.lock().await;
    let seed = match std::env::var("BOTD_CRASH_SEED") {
        Ok(text) => text.trim().parse().expect("BOTD_CRASH_SEED is a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    };
    println!("crash test (fsync {fsync}) seed {seed} (repeat with BOTD_CRASH_SEED={seed})");
    let mut dir = TempDir::new("crash");
    let started = Instant::now();
    let outcome = match timeout(TEST_TIMEOUT, run(dir.path(), seed, fsync)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!("the test took longer than {TEST_TIMEOUT:?}")),
    };
    println!("total {:?}", started.elapsed());
    if let Err(failure) = outcome {
        eprintln!("{}", log_tails(dir.path(), 30));
        if std::env::var_os("BOTD_CRASH_KEEP").is_some() {
            dir.keep();
        }
        panic!("fsync {fsync}, seed {seed}: {failure}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_messages_and_acks_survive_sigkill_under_fsync_always() {
    survives_sigkill("always").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_messages_and_acks_survive_sigkill_under_fsync_interval() {
    survives_sigkill("interval").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_messages_and_acks_survive_sigkill_under_fsync_never() {
    survives_sigkill("never").await;
}

/// Rounds of load and SIGKILL, then the final restart and the checks. Every relay process is
/// killed when its guard goes out of scope, also on the error paths.
async fn run(dir: &Path, seed: u64, fsync: &str) -> Result<(), String> {
    let data = dir.join("data");
    let mut rng = StdRng::seed_from_u64(seed);
    let parties = Arc::new(Parties {
        sender: Arc::new(KeyPair::generate()),
        recipient: Arc::new(KeyPair::generate()),
    });
    let ledger: Shared = Arc::default();
    let mut relay_key: Option<PublicKeyBytes> = None;

    for round in 0..ROUNDS {
        let t0 = Instant::now();
        let mut relay = RelayProcess::start(&data, &log_path(dir, round), fsync)
            .await
            .map_err(|err| format!("round {round}: {err}"))?;
        let startup = t0.elapsed();
        match relay_key {
            None => relay_key = Some(relay.key),
            Some(key) if key != relay.key => {
                return Err(format!(
                    "round {round}: the relay key changed across a restart: {key} -> {}",
                    relay.key
                ))
            }
            Some(_) => {}
        }
        let target = (relay.addr, relay.key);
        if round == 0 {
            for identity in [&parties.sender, &parties.recipient] {
                let client = connect(target, identity.clone())
                    .await
                    .map_err(|err| format!("connect to register: {err}"))?;
                client
                    .register(common::registration(1, 5))
                    .await
                    .map_err(|err| format!("register: {err}"))?;
            }
        }

        let deadline = Instant::now() + JOIN_TIMEOUT;
        let trigger = Arc::new(Trigger::default());
        let recipient = tokio::spawn(receive_and_ack(
            target,
            parties.clone(),
            ledger.clone(),
            round,
            rng.gen(),
            trigger.clone(),
            deadline,
        ));
        let senders: Vec<_> = (0..SEND_TASKS)
            .map(|task| {
                tokio::spawn(send_load(
                    target,
                    parties.clone(),
                    ledger.clone(),
                    round,
                    task,
                    deadline,
                ))
            })
            .collect();
        // Even rounds: killed after a random delay. Odd rounds: after a random delay, at the
        // next push of a message that is not yet answered (at most TARGET_WAIT later). The
        // delay is real time: the relay is another process.
        let load_started = Instant::now();
        let kill_after = Duration::from_millis(rng.gen_range(KILL_AFTER_MS.0..=KILL_AFTER_MS.1));
        sleep(kill_after).await;
        let mode = if round % 2 == 1 {
            trigger.armed.store(true, Ordering::Release);
            match timeout(TARGET_WAIT, trigger.fired.notified()).await {
                Ok(()) => "at a push ahead of its Sent",
                Err(_) => "no push ahead of its Sent came",
            }
        } else {
            "random"
        };
        let killed_at = load_started.elapsed();
        let running = senders.iter().filter(|h| !h.is_finished()).count();
        let status = relay
            .kill()
            .map_err(|err| format!("round {round}: {err}"))?;
        drop(relay);

        let mut sends_ok = 0;
        let mut ends = Vec::new();
        for handle in senders {
            let end = timeout(JOIN_TIMEOUT, handle)
                .await
                .map_err(|_| format!("round {round}: a send task did not end"))?
                .map_err(|err| format!("round {round}: a send task failed: {err}"))?;
            sends_ok += end.ok;
            ends.push(end.ended);
        }
        let recipient = timeout(JOIN_TIMEOUT, recipient)
            .await
            .map_err(|_| format!("round {round}: the recipient task did not end"))?
            .map_err(|err| format!("round {round}: the recipient task failed: {err}"))?;
        println!(
            "round {round}: relay up in {startup:?}, killed after {killed_at:?} ({mode}; {status}) with \
             {running}/{SEND_TASKS} send tasks running; {sends_ok} Sent answers, {} deliveries, \
             {} acked; recipient ended: {}, its acks: {}; senders ended: {ends:?}",
            recipient.deliveries, recipient.acked, recipient.ended, recipient.acker_ended
        );
        if running == 0 {
            return Err(format!(
                "round {round}: every send task had ended before the kill: {ends:?}"
            ));
        }
    }

    let final_round = final_check(dir, &data, relay_key, &parties, &ledger, fsync).await?;
    let ledger = ledger.lock();
    println!(
        "totals: {} sends attempted, {} answered, {} delivered during rounds, {} acks answered; \
         final: {final_round}",
        ledger.attempted.len(),
        ledger.sent.len(),
        ledger.delivered.len(),
        ledger.acked.len()
    );
    if ledger.violations.is_empty() {
        Ok(())
    } else {
        let mut text = format!("{} invariant violation(s):", ledger.violations.len());
        for v in ledger.violations.iter().take(30) {
            let _ = write!(text, "\n  {v}");
        }
        Err(text)
    }
}

/// Restarts once more, collects the whole mailbox and checks the invariants. Returns a summary.
async fn final_check(
    dir: &Path,
    data: &Path,
    relay_key: Option<PublicKeyBytes>,
    parties: &Arc<Parties>,
    ledger: &Shared,
    fsync: &str,
) -> Result<String, String> {
    let t0 = Instant::now();
    let relay = RelayProcess::start(data, &log_path(dir, ROUNDS), fsync)
        .await
        .map_err(|err| format!("final start: {err}"))?;
    let startup = t0.elapsed();
    if relay_key.is_some_and(|key| key != relay.key) {
        return Err(format!(
            "the relay key changed on the final restart: {}",
            relay.key
        ));
    }
    let target = (relay.addr, relay.key);
    let mut client = connect(target, parties.recipient.clone())
        .await
        .map_err(|err| format!("final connect: {err}"))?;
    let last_id = client
        .subscribe(1, 0)
        .await
        .map_err(|err| format!("final subscribe: {err}"))?
        .last_id;

    // Everything stored is pushed at once; stop at `last_id`, or once nothing more comes.
    let mut present: BTreeMap<u64, String> = BTreeMap::new();
    let collect_deadline = Instant::now() + COLLECT_TIMEOUT;
    let mut finished = "quiet";
    loop {
        let wait = (Instant::now() + COLLECT_QUIET).min(collect_deadline);
        let frame = match timeout_at(wait, client.next_push()).await {
            Err(_) if Instant::now() >= collect_deadline => {
                finished = "collection timeout";
                break;
            }
            Err(_) => break,
            Ok(None) => return Err("final: the relay closed the recipient's connection".into()),
            Ok(Some(frame)) => frame,
        };
        match frame.body {
            Some(Body::Deliver(deliver)) => {
                let id = deliver.message_id;
                let payload = ledger
                    .lock()
                    .delivery(&deliver, parties, true, "final delivery");
                if present.insert(id, payload).is_some() {
                    ledger
                        .lock()
                        .violation(format!("final: message {id} pushed twice"));
                }
                if id >= last_id {
                    finished = "last_id reached";
                    break;
                }
            }
            other => return Err(format!("final: unexpected push {other:?}")),
        }
    }
    if present.keys().any(|id| *id > last_id) {
        ledger.lock().violation(format!(
            "final: pushed ids {:?} beyond last_id {last_id}",
            present
                .range(last_id + 1..)
                .map(|(id, _)| *id)
                .collect::<Vec<_>>()
        ));
    }

    // Answered sends: acked, or still there with their payload.
    let (sent, delivered, ack_attempted, acked) = {
        let l = ledger.lock();
        (
            l.sent.clone(),
            l.delivered.clone(),
            l.ack_attempted.clone(),
            l.acked.clone(),
        )
    };
    let mut lost = Vec::new();
    for (id, payload) in &sent {
        if acked.contains(id) || present.get(id) == Some(payload) {
            continue;
        }
        if present.contains_key(id) {
            continue; // a different payload: reported as id reuse already
        }
        if ack_attempted.contains(id) {
            continue; // its ack may have become durable before the crash took the answer
        }
        lost.push((*id, payload.clone()));
    }
    for (id, payload) in &lost {
        let detail = match client.get_message(1, *id).await {
            Ok(deliver) => format!(
                "GetMessage finds it ({:?}) though it was not pushed",
                String::from_utf8_lossy(&deliver.payload)
            ),
            Err(err) => format!("GetMessage: {err}"),
        };
        ledger.lock().violation(format!(
            "message {id} ({payload:?}) was answered with Sent but is gone after recovery; {detail}"
        ));
    }
    // Pushed during a round: must have been durable, so acked or still there.
    for (id, payload) in &delivered {
        if !present.contains_key(id) && !ack_attempted.contains(id) && !sent.contains_key(id) {
            ledger.lock().violation(format!(
                "message {id} ({payload:?}) was pushed to the recipient, never acked, and is gone \
                 after recovery: it was pushed before its record was durable"
            ));
        }
    }
    let unanswered = present.keys().filter(|id| !sent.contains_key(id)).count();
    Ok(format!(
        "relay up in {startup:?}, last_id {last_id}, {} messages present ({finished}), \
         {unanswered} of them stored without their Sent arriving, {} answered sends lost",
        present.len(),
        lost.len()
    ))
}
