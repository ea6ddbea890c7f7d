//! The listener: admission control (connection cap, per-address handshake rate and cap on
//! unauthenticated connections), one task per connection, giving memory back after churn, and
//! graceful shutdown (stop accepting, tell sessions, drain, return).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::admission::{Admission, CryptoSlots, Refusal};
use super::connection;
use super::shared::{NetMetrics, Shared};
use crate::app::Handler;
use crate::config::Config;
use crate::connection::InboundBudget;
use crate::metrics as m;
use crate::ratelimit::{address_group, KeyedLimiter};
use botd_protocol::keys::KeyPair;
use botd_protocol::replay::ReplayCache;

/// Closed connections after which free memory is handed back to the system.
const TRIM_AFTER_CLOSED: usize = 256;
/// How often the server checks whether to hand memory back.
const TRIM_CHECK: Duration = Duration::from_secs(10);

pub struct Server<H> {
    listener: TcpListener,
    shared: Arc<Shared<H>>,
    connection_slots: Arc<Semaphore>,
    ip_limiter: Mutex<KeyedLimiter<IpAddr>>,
    admission: Arc<Admission>,
}

/// Lets another task stop a running server and see what it holds.
#[derive(Clone)]
pub struct ServerHandle {
    shutdown: CancellationToken,
    connection_slots: Arc<Semaphore>,
    max_connections: usize,
    admission: Arc<Admission>,
    crypto: Arc<CryptoSlots>,
    budget: Arc<InboundBudget>,
}

/// What a server holds at one moment: the resources its admission control bounds. The same
/// values are exported as metrics; this is for tests and tools that need them exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections with a task (handshake, session or closing linger), against
    /// `max_connections`.
    pub connections_open: usize,
    /// Connections whose handshake has not completed, against `max_unauthenticated`.
    pub unauthenticated: usize,
    /// Unauthenticated connections closed to admit newer ones, since start.
    pub evicted: u64,
    /// Connections whose whole `Init` arrived, queued for a turn of handshake crypto.
    pub handshakes_waiting: usize,
    /// Bytes of partly received frames held now, against `max_inbound_buffer_bytes`.
    pub inbound_buffer_bytes: usize,
    /// The most those bytes have been at once since start.
    pub inbound_buffer_peak: usize,
}

impl ServerHandle {
    /// Starts a graceful shutdown; [`Server::run`] returns once sessions have drained.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// What the server holds now (also after [`Server::run`] returned: connections that
    /// outlive the shutdown grace still count until they end).
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            connections_open: self.max_connections - self.connection_slots.available_permits(),
            unauthenticated: self.admission.unauthenticated(),
            evicted: self.admission.evicted(),
            handshakes_waiting: self.crypto.waiting(),
            inbound_buffer_bytes: self.budget.used(),
            inbound_buffer_peak: self.budget.peak(),
        }
    }
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("shutdown", &self.shutdown.is_cancelled())
            .field("stats", &self.stats())
            .finish()
    }
}

/// A listening socket on `addr` with room for `backlog` connections not yet accepted.
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // As `TcpListener::bind` does: a restarted relay can listen while old connections linger.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    // Latency matters more than packet count for small request/response frames. Linux copies
    // the option into every accepted socket, which saves a system call per connection.
    #[cfg(target_os = "linux")]
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

impl<H: Handler> Server<H> {
    pub async fn bind(config: Config, identity: KeyPair, handler: H) -> std::io::Result<Self> {
        let listener = listen(config.listen, config.listen_backlog)?;
        let connection_slots = Arc::new(Semaphore::new(config.max_connections));
        let ip_limiter = Mutex::new(KeyedLimiter::new(
            config.handshake_rate_per_ip,
            config.max_tracked_ips,
        ));
        let admission = Admission::new(
            config.max_unauthenticated,
            config.max_unauthenticated_per_ip,
        );
        let shared = Arc::new(Shared {
            replay: Mutex::new(ReplayCache::new(config.replay_cache_capacity)),
            crypto: CryptoSlots::new(config.max_handshakes_in_flight),
            budget: InboundBudget::new(config.max_inbound_buffer_bytes),
            shutdown: CancellationToken::new(),
            metrics: NetMetrics::new(),
            closed: AtomicUsize::new(0),
            config,
            identity,
            handler,
        });
        Ok(Self {
            listener,
            shared,
            connection_slots,
            ip_limiter,
            admission,
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
            connection_slots: self.connection_slots.clone(),
            max_connections: self.shared.config.max_connections,
            admission: self.admission.clone(),
            crypto: self.shared.crypto.clone(),
            budget: self.shared.budget.clone(),
        }
    }

    /// What the server holds now; see [`ServerHandle::stats`].
    pub fn stats(&self) -> ServerStats {
        self.handle().stats()
    }

    /// Accepts connections until shut down, then drains the sessions (at most `shutdown_grace`).
    pub async fn run(self) {
        let tracker = TaskTracker::new();
        let mut trim = tokio::time::interval(TRIM_CHECK);
        trim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let accepted = tokio::select! {
                _ = self.shared.shutdown.cancelled() => break,
                _ = trim.tick() => {
                    self.release_memory_after_churn();
                    continue;
                }
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
            if let Some((permit, ticket)) = self.admit(peer) {
                // Elsewhere an accepted socket does not inherit the listener's `TCP_NODELAY`.
                #[cfg(not(target_os = "linux"))]
                let _ = stream.set_nodelay(true);
                let shared = self.shared.clone();
                shared.metrics.open.increment(1.0);
                tracker.spawn(async move {
                    connection::serve(shared.clone(), stream, peer, ticket).await;
                    shared.metrics.open.decrement(1.0);
                    shared.closed.fetch_add(1, Ordering::Relaxed);
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

    /// After many connections closed, asks the allocator to give its free pages back: their
    /// buffers are freed, but glibc keeps freed memory inside its heap otherwise (mimalloc
    /// after a delay).
    fn release_memory_after_churn(&self) {
        if self.shared.closed.load(Ordering::Relaxed) >= TRIM_AFTER_CLOSED {
            self.shared.closed.store(0, Ordering::Relaxed);
            tokio::task::spawn_blocking(crate::memory::release_free_memory);
        }
    }

    /// Applies the connection cap, the per-address handshake rate and the caps on
    /// unauthenticated connections; `None` closes the stream.
    fn admit(
        &self,
        peer: SocketAddr,
    ) -> Option<(tokio::sync::OwnedSemaphorePermit, super::admission::Ticket)> {
        let refuse = |reason: &'static str| {
            metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => reason).increment(1);
            tracing::debug!(%peer, reason, "connection refused");
        };
        let Ok(permit) = self.connection_slots.clone().try_acquire_owned() else {
            refuse("max_connections");
            return None;
        };
        let group = address_group(peer.ip());
        if self
            .ip_limiter
            .lock()
            .try_take(&group, Instant::now())
            .is_err()
        {
            refuse("rate_limited");
            return None;
        }
        let ticket = match self.admission.admit(peer.ip()) {
            Ok(ticket) => ticket,
            Err(Refusal::PerAddress) => {
                refuse("unauthenticated_per_address");
                return None;
            }
        };
        Some((permit, ticket))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpStream;

    #[tokio::test]
    async fn listens_with_the_configured_backlog() {
        let listener = listen("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = listener.local_addr().unwrap();
        // More connects than the backlog complete without accepting: they queue, up to the
        // backlog (and what the kernel adds), and are accepted in order afterwards.
        let mut clients = Vec::new();
        for _ in 0..8 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        for client in &clients {
            let (_, peer) = listener.accept().await.unwrap();
            assert_eq!(peer, client.local_addr().unwrap());
        }
    }

    /// The listener's `TCP_NODELAY` is what turns Nagle's delay off for every session on Linux.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_sockets_send_small_frames_at_once() {
        let listener = listen("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        assert!(
            stream.nodelay().unwrap(),
            "Nagle's delay is off on every session"
        );
    }
}
