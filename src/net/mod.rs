//! The tokio layer: accepts TCP connections, admits them (connection cap, per-address rate and
//! caps, a fair turn for handshake crypto, a relay-wide budget for partly received frames), does
//! the handshake's IO, and moves bytes between each socket and its [`crate::connection`] state
//! machine. It owns sockets, timers and the shutdown signal and nothing else; what a connection
//! does with the bytes is the state machine's, and what a request means is up to the
//! [`crate::app::Handler`].

mod admission;
mod connection;
mod server;
mod shared;

pub use crate::connection::InboundBudget;
pub use admission::{Admission, CryptoSlots, Refusal};
pub use server::{Server, ServerHandle, ServerStats};

use botd_protocol::codec::CodecError;
use botd_protocol::handshake::HandshakeError;

use crate::connection::ConnectionError;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("framing: {0}")]
    Codec(#[from] CodecError),
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    #[error("init not received within {0:?}")]
    InitTimeout(std::time::Duration),
    #[error("handshake not completed within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    #[error("closed to make room: too many connections without a handshake")]
    Evicted,
    #[error("peer closed the connection")]
    PeerClosed,
}

impl NetError {
    /// Short stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            NetError::Io(_) => "io",
            NetError::Codec(err) => err.reason(),
            NetError::Handshake(err) => err.reason(),
            NetError::Connection(err) => err.reason(),
            NetError::InitTimeout(_) => "init_timeout",
            NetError::HandshakeTimeout(_) => "handshake_timeout",
            NetError::Evicted => "evicted",
            NetError::PeerClosed => "peer_closed",
        }
    }
}
