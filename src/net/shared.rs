//! What every connection task of a server shares with the server and with each other: the
//! configuration, the relay's key, the application, the handshake state and the metric
//! handles. Its own module, so the listener and the connection tasks both depend on it and
//! not on each other.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::admission::CryptoSlots;
use crate::config::Config;
use crate::connection::InboundBudget;
use crate::metrics as m;
use botd_protocol::keys::KeyPair;
use botd_protocol::replay::ReplayCache;

/// Metric handles every connection shares, resolved once.
pub(super) struct NetMetrics {
    pub handshakes_ok: metrics::Counter,
    pub handshake_seconds: metrics::Histogram,
    pub frames_in: metrics::Counter,
    pub frames_out: metrics::Counter,
    pub bytes_in: metrics::Counter,
    pub bytes_out: metrics::Counter,
    pub open: metrics::Gauge,
}

impl NetMetrics {
    pub fn new() -> Self {
        Self {
            handshakes_ok: metrics::counter!(m::HANDSHAKES, "outcome" => "ok", "reason" => "ok"),
            handshake_seconds: metrics::histogram!(m::HANDSHAKE_SECONDS),
            frames_in: metrics::counter!(m::FRAMES_IN),
            frames_out: metrics::counter!(m::FRAMES_OUT),
            bytes_in: metrics::counter!(m::BYTES_IN),
            bytes_out: metrics::counter!(m::BYTES_OUT),
            open: metrics::gauge!(m::CONNECTIONS_OPEN),
        }
    }
}

/// State every connection task shares.
pub(super) struct Shared<H> {
    pub config: Config,
    pub identity: KeyPair,
    pub handler: H,
    pub replay: Mutex<ReplayCache>,
    pub crypto: Arc<CryptoSlots>,
    pub budget: Arc<InboundBudget>,
    pub shutdown: CancellationToken,
    pub metrics: NetMetrics,
    /// Connections closed since memory was last handed back.
    pub closed: AtomicUsize,
}
