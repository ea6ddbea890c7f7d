//! NATS servers for tests: one JetStream server, or a 3-node JetStream cluster, on loopback in
//! temporary directories, each killed (SIGKILL) and cleaned up on drop; relay processes of
//! this crate's binary on such a cluster. When no recent enough `nats-server` can be found,
//! [`binary`] says so and the tests using it pass as skipped (fail, under `CI=true`).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use botd_client::{Client, ClientOptions};
use botd_protocol::keys::{KeyPair, PublicKeyBytes};
use botd_relay::config::Config;
use botd_relay::store::nats::NatsStore;

/// The longest a server or cluster may take to be ready.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// A `nats-server` of at least the version the JetStream store needs: `$BOTD_NATS_SERVER`, or
/// the first on PATH (or in /usr/sbin, where Debian puts it) that is recent enough. `None`
/// prints the skip; under `CI=true` a test that needs one and finds none fails instead.
pub fn binary(test: &str) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(path) = std::env::var_os("BOTD_NATS_SERVER") {
        candidates.push(path.into());
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push("/usr/sbin".into());
    dirs.push("/usr/local/sbin".into());
    candidates.extend(dirs.into_iter().map(|d| d.join("nats-server")));
    let (a, b, c) = botd_relay::store::nats::MIN_SERVER_VERSION;
    let found = candidates
        .into_iter()
        .filter(|p| p.is_file())
        .find(|p| version_of(p).is_some_and(|v| v >= (a, b, c)));
    if found.is_none() {
        let why = format!(
            "no nats-server {a}.{b}.{c} or later (set BOTD_NATS_SERVER, or see docs/SCALING.md)"
        );
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: {why}; under CI=true a test that needs it fails instead of passing");
        }
        // Straight to the process's stderr: the test harness captures `eprintln!` of passing
        // tests, and a skip must be seen.
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "{test}: SKIPPED, {why}");
    }
    found
}

/// `nats-server --version` as (major, minor, patch).
fn version_of(binary: &Path) -> Option<(u64, u64, u64)> {
    let output = Command::new(binary).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text.split_whitespace().last()?.trim_start_matches('v');
    let mut parts = version.split(['.', '-']).map(|p| p.parse::<u64>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "botd-{what}-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn wait_for_port(port: u16, child: &mut Child) {
    let deadline = Instant::now() + READY_WITHIN;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("nats-server exited early: {status}");
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nats-server did not listen on {port} in time");
}

/// One nats-server process.
pub struct Node {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    args: Vec<String>,
    bin: PathBuf,
}

impl Node {
    fn spawn(bin: &Path, args: Vec<String>, port: u16, dir: PathBuf) -> Node {
        let mut node = Node {
            child: None,
            port,
            dir,
            args,
            bin: bin.to_owned(),
        };
        node.start();
        node
    }

    fn start(&mut self) {
        let mut child = Command::new(&self.bin)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        wait_for_port(self.port, &mut child);
        self.child = Some(child);
    }

    /// Started and not killed since.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, no goodbye to the cluster.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again with the same name, ports and store.
    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One JetStream server or a cluster of three.
pub struct Nats {
    pub nodes: Vec<Node>,
}

impl Nats {
    /// One JetStream server.
    pub async fn single(bin: &Path) -> Nats {
        let port = free_port();
        let dir = temp_dir("nats");
        let args = vec![
            "-js".into(),
            "-sd".into(),
            dir.join("js").display().to_string(),
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ];
        let nats = Nats {
            nodes: vec![Node::spawn(bin, args, port, dir)],
        };
        nats.wait_ready(1).await;
        nats
    }

    /// Three JetStream servers routed into one cluster.
    pub async fn cluster(bin: &Path) -> Nats {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let dir = temp_dir("nats-cluster");
        let nodes = (0..3)
            .map(|i| {
                let (port, cluster_port) = ports[i];
                let routes: Vec<String> = (0..3)
                    .filter(|j| *j != i)
                    .map(|j| format!("nats://127.0.0.1:{}", ports[j].1))
                    .collect();
                let node_dir = dir.join(format!("n{i}"));
                let args = vec![
                    "-js".into(),
                    "-sd".into(),
                    node_dir.join("js").display().to_string(),
                    "-n".into(),
                    format!("n{i}"),
                    "-a".into(),
                    "127.0.0.1".into(),
                    "-p".into(),
                    port.to_string(),
                    "--cluster_name".into(),
                    "botd-test".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{cluster_port}"),
                    "--routes".into(),
                    routes.join(","),
                ];
                Node::spawn(bin, args, port, node_dir)
            })
            .collect();
        let nats = Nats { nodes };
        nats.wait_ready(3).await;
        nats
    }

    /// `nats://` URLs of all nodes, for `store`.
    pub fn store_setting(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("nats://{}", hosts.join(","))
    }

    /// The store setting naming only node `i` (the client still learns the others).
    pub fn store_setting_of(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    /// Waits until JetStream takes a stream of `replicas` replicas (a cluster needs its meta
    /// leader first).
    async fn wait_ready(&self, replicas: usize) {
        let deadline = Instant::now() + READY_WITHIN;
        let url = self.nodes[0].url();
        loop {
            assert!(Instant::now() < deadline, "JetStream not ready in time");
            if let Ok(client) = async_nats::connect(url.as_str()).await {
                let js = async_nats::jetstream::new(client);
                let created = js
                    .create_stream(async_nats::jetstream::stream::Config {
                        name: "READY_PROBE".into(),
                        subjects: vec!["ready.probe".into()],
                        num_replicas: replicas,
                        storage: async_nats::jetstream::stream::StorageType::Memory,
                        ..Default::default()
                    })
                    .await;
                if created.is_ok() {
                    let _ = js.delete_stream("READY_PROBE").await;
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// `max_stored_bytes` of the test relays: the messages stream reserves this much of the
/// server's storage, so the tests do not need gigabytes of free disk.
const TEST_STREAM_BYTES: u64 = 64 << 20;

/// A prefix of names on the cluster of its own, so tests never share state.
pub fn prefix(test: &str) -> String {
    format!("t{}{:08x}", test.len(), rand::random::<u32>())
}

/// A relay in this process on the JetStream store `config` names.
pub async fn relay_on(
    config: Config,
) -> (
    super::common::Relay,
    std::sync::Arc<botd_relay::relay::Relay<NatsStore>>,
) {
    let store = tokio::time::timeout(READY_WITHIN, NatsStore::connect(&config))
        .await
        .expect("connects in time")
        .expect("the JetStream store connects");
    super::common::start_relay_on(config, store).await
}

/// A client of `relay` with the identity `identity`.
pub async fn client_as(relay: &super::common::Relay, identity: &std::sync::Arc<KeyPair>) -> Client {
    Client::connect(
        relay.addr,
        identity.clone(),
        relay.key,
        ClientOptions::default(),
    )
    .await
    .expect("client connects")
}

/// A test config for a relay on `store`, with a prefix of its own so tests never share state.
pub fn relay_config(store: String, prefix: &str, replicas: usize) -> Config {
    Config {
        store,
        nats_prefix: prefix.into(),
        nats_replicas: replicas,
        nats_request_timeout: Duration::from_secs(3),
        max_stored_bytes: TEST_STREAM_BYTES,
        ..super::common::test_config()
    }
}

/// A `botd-relay` process (this crate's binary) on a JetStream store; SIGKILLed on drop.
pub struct RelayProcess {
    child: Child,
    pub addr: SocketAddr,
    pub key: PublicKeyBytes,
    dir: PathBuf,
}

impl RelayProcess {
    pub fn start(store: &str, prefix: &str, replicas: usize) -> RelayProcess {
        Self::start_with(store, prefix, replicas, &[])
    }

    /// As [`RelayProcess::start`], with more settings (`BOTD_…` variables).
    pub fn start_with(
        store: &str,
        prefix: &str,
        replicas: usize,
        settings: &[(&str, String)],
    ) -> RelayProcess {
        let dir = temp_dir("relay");
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_botd-relay"))
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
                &dir.display().to_string(),
                "--metrics-listen",
                "off",
                "--store",
                store,
            ])
            .env("BOTD_NATS_PREFIX", prefix)
            .env("BOTD_NATS_REPLICAS", replicas.to_string())
            .env("BOTD_NATS_REQUEST_TIMEOUT", "3s")
            .env("BOTD_MAX_STORED_BYTES", TEST_STREAM_BYTES.to_string())
            .env("BOTD_LOG", "warn")
            .envs(settings.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("botd-relay starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the relay never blocks on a full pipe.
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(READY_WITHIN)
            .expect("botd-relay announced where it listens");
        // "botd-relay listening on ADDR as KEY"
        let mut words = line.split_whitespace().skip(3);
        let addr: SocketAddr = words.next().expect("addr").parse().expect("an address");
        let key = words.nth(1).expect("key");
        let key = PublicKeyBytes::parse(&hex::decode(key).expect("hex key")).expect("a key");
        RelayProcess {
            child,
            addr,
            key,
            dir,
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
