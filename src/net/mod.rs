//! The tokio layer: accepts TCP connections, admits them (connection cap, per-address rate and
//! caps, a fair turn for handshake crypto, a relay-wide budget for partly received frames), and
//! drives the protocol core for each connection. It owns sockets and clocks and nothing else;
//! what a request means is up to the [`crate::app::Handler`].

mod admission;
mod connection;
mod server;

pub use admission::{Admission, CryptoSlots, InboundBudget, Refusal};
pub use server::{Server, ServerHandle, ServerStats};

use botd_protocol::codec::CodecError;
use botd_protocol::handshake::HandshakeError;
use botd_protocol::session::SessionError;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("framing: {0}")]
    Codec(#[from] CodecError),
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("session: {0}")]
    Session(#[from] SessionError),
    #[error("init not received within {0:?}")]
    InitTimeout(std::time::Duration),
    #[error("handshake not completed within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    #[error("closed to make room: too many connections without a handshake")]
    Evicted,
    #[error("write made no progress within {0:?}")]
    WriteTimeout(std::time::Duration),
    #[error("a frame was not completed within {0:?}")]
    FrameTimeout(std::time::Duration),
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
            NetError::Session(err) => err.reason(),
            NetError::InitTimeout(_) => "init_timeout",
            NetError::HandshakeTimeout(_) => "handshake_timeout",
            NetError::Evicted => "evicted",
            NetError::WriteTimeout(_) => "write_timeout",
            NetError::FrameTimeout(_) => "frame_timeout",
            NetError::PeerClosed => "peer_closed",
        }
    }
}
