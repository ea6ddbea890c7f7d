//! The listener: admission control (connection cap, per-IP handshake rate), one task per
//! connection, and graceful shutdown (stop accepting, tell sessions, drain, return).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::{connection, Handler};
use crate::config::Config;
use crate::core::keys::KeyPair;
use crate::core::replay::ReplayCache;
use crate::metrics as m;
use crate::ratelimit::KeyedLimiter;

/// State every connection task shares.
pub(super) struct Shared<H> {
    pub config: Config,
    pub identity: KeyPair,
    pub handler: H,
    pub replay: Mutex<ReplayCache>,
    pub handshake_slots: Semaphore,
    pub shutdown: CancellationToken,
}

pub struct Server<H> {
    listener: TcpListener,
    shared: Arc<Shared<H>>,
    connection_slots: Arc<Semaphore>,
    ip_limiter: Mutex<KeyedLimiter<IpAddr>>,
}

/// Lets another task stop a running server.
#[derive(Clone, Debug)]
pub struct ServerHandle {
    shutdown: CancellationToken,
}

impl ServerHandle {
    /// Starts a graceful shutdown; [`Server::run`] returns once sessions have drained.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }
}

impl<H: Handler> Server<H> {
    pub async fn bind(config: Config, identity: KeyPair, handler: H) -> std::io::Result<Self> {
        let listener = TcpListener::bind(config.listen).await?;
        let connection_slots = Arc::new(Semaphore::new(config.max_connections));
        let ip_limiter = Mutex::new(KeyedLimiter::new(
            config.handshake_rate_per_ip,
            config.max_tracked_ips,
        ));
        let shared = Arc::new(Shared {
            replay: Mutex::new(ReplayCache::new(config.replay_cache_capacity)),
            handshake_slots: Semaphore::new(config.max_handshakes_in_flight),
            shutdown: CancellationToken::new(),
            config,
            identity,
            handler,
        });
        Ok(Self {
            listener,
            shared,
            connection_slots,
            ip_limiter,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn identity(&self) -> &KeyPair {
        &self.shared.identity
    }

    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            shutdown: self.shared.shutdown.clone(),
        }
    }

    /// Accepts connections until shut down, then drains the sessions (at most `shutdown_grace`).
    pub async fn run(self) {
        let tracker = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                _ = self.shared.shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // Out of descriptors or a similar transient failure: back off, keep serving.
                    warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if let Some(permit) = self.admit(&stream, peer) {
                let shared = self.shared.clone();
                tracker.spawn(async move {
                    connection::serve(shared, stream, peer).await;
                    drop(permit);
                });
            }
        }
        drop(self.listener);
        tracker.close();
        let grace = self.shared.config.shutdown_grace;
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            warn!(
                remaining = tracker.len(),
                "sessions still open after the shutdown grace period"
            );
        }
        info!("relay stopped");
    }

    /// Applies the connection cap and the per-IP handshake rate; `None` closes the stream.
    fn admit(
        &self,
        stream: &TcpStream,
        peer: SocketAddr,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let Ok(permit) = self.connection_slots.clone().try_acquire_owned() else {
            metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => "max_connections").increment(1);
            info!(%peer, reason = "max_connections", "connection refused");
            return None;
        };
        if let Err(wait) = self.ip_limiter.lock().try_take(&peer.ip(), Instant::now()) {
            metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => "rate_limited").increment(1);
            info!(%peer, reason = "rate_limited", retry_after_ms = wait.as_millis() as u64, "connection refused");
            return None;
        }
        // Latency matters more than packet count for small request/response frames.
        let _ = stream.set_nodelay(true);
        Some(permit)
    }
}
