//! A relay inside the test process, on loopback: what the tests of this workspace start, and
//! what an application built on the relay or on a client can start in its own tests.
//!
//! ```no_run
//! # async fn example() {
//! use botd_relay::testing::{loopback_config, start_relay};
//!
//! let (relay, _app) = start_relay(loopback_config()).await;
//! println!("a relay on {} with key {}", relay.addr, relay.key);
//! relay.stop().await;
//! # }
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use botd_protocol::keys::{KeyPair, PublicKeyBytes};
use tokio::task::JoinHandle;

use crate::app::Handler;
use crate::config::{Config, MetricsListen};
use crate::net::{Server, ServerHandle, ServerStats};
use crate::relay::Relay;
use crate::store::embedded::EmbeddedStore;
use crate::store::Store;

/// How long [`LoopbackRelay::stop`] waits for the server's task.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// A relay serving on a loopback port of its own.
pub struct LoopbackRelay {
    pub addr: SocketAddr,
    pub key: PublicKeyBytes,
    pub handle: ServerHandle,
    pub task: JoinHandle<()>,
}

impl LoopbackRelay {
    pub fn stats(&self) -> ServerStats {
        self.handle.stats()
    }

    /// Shuts the server down and waits for it (panics if it does not stop within 10 s).
    pub async fn stop(self) {
        self.handle.shutdown();
        tokio::time::timeout(STOP_LIMIT, self.task)
            .await
            .expect("server stops in time")
            .expect("server task ends without panicking");
    }
}

/// The default configuration on `127.0.0.1:0`, without a metrics listener, with the data
/// directory in the system's temporary directory.
pub fn loopback_config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().expect("a socket address"),
        metrics_listen: MetricsListen::Off,
        data_dir: std::env::temp_dir(),
        ..Config::default()
    }
}

/// A server with the identity `identity` serving `handler`.
pub async fn start_as<H: Handler>(config: Config, identity: KeyPair, handler: H) -> LoopbackRelay {
    let key = *identity.public();
    let server = Server::bind(config, identity, handler)
        .await
        .expect("the loopback listener binds");
    let addr = server
        .local_addr()
        .expect("a bound listener has an address");
    let handle = server.handle();
    let task = tokio::spawn(server.run());
    LoopbackRelay {
        addr,
        key,
        handle,
        task,
    }
}

/// The relay application over a store that lives in memory only (no journal).
pub fn in_memory_app(config: &Config, key: PublicKeyBytes) -> Arc<Relay<EmbeddedStore>> {
    Relay::new(
        Arc::new(config.clone()),
        key,
        EmbeddedStore::in_memory(config),
    )
}

/// A relay serving the application over an in-memory store.
pub async fn start_relay(config: Config) -> (LoopbackRelay, Arc<Relay<EmbeddedStore>>) {
    let identity = KeyPair::generate();
    let app = in_memory_app(&config, *identity.public());
    let relay = start_as(config, identity, app.clone()).await;
    (relay, app)
}

/// A relay serving the application over `store` (any backend).
pub async fn start_relay_on<S: Store>(config: Config, store: S) -> (LoopbackRelay, Arc<Relay<S>>) {
    let identity = KeyPair::generate();
    let app = Relay::new(Arc::new(config.clone()), *identity.public(), store);
    let relay = start_as(config, identity, app.clone()).await;
    (relay, app)
}

/// A fresh directory `botd-<name>-<pid>-<random>` under the system's temporary directory (the
/// caller removes it; [`TempDir`] does so on drop).
pub fn temp_dir(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "botd-{name}-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&path).expect("a temporary directory is created");
    path
}

/// A [`temp_dir`] removed when dropped, unless [`kept`](TempDir::keep).
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    pub fn new(name: &str) -> Self {
        Self {
            path: temp_dir(name),
            keep: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves the directory in place when dropped (and names it on stderr), e.g. for the files
    /// of a failed run.
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
