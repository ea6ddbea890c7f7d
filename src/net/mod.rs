//! The tokio layer: accepts TCP connections, enforces admission limits, and drives the protocol
//! core for each connection. It owns sockets and clocks and nothing else; what a request means is
//! up to the [`Handler`].

mod connection;
mod push;
mod server;

use std::future::Future;

pub use push::{channel as push_channel, Push, PushError, PushHandle, PushReceiver};
pub use server::{Server, ServerHandle};

use crate::core::codec::CodecError;
use crate::core::handshake::HandshakeError;
use crate::core::keys::PublicKeyBytes;
use crate::core::session::SessionError;
use crate::proto::Frame;

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
    #[error("handshake not completed within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    #[error("write made no progress within {0:?}")]
    WriteTimeout(std::time::Duration),
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
            NetError::HandshakeTimeout(_) => "handshake_timeout",
            NetError::WriteTimeout(_) => "write_timeout",
            NetError::PeerClosed => "peer_closed",
        }
    }
}

/// The application served over authenticated sessions.
pub trait Handler: Send + Sync + 'static {
    /// Per-session state of the application.
    type Session: Send + 'static;

    /// A session for `peer` is established; frames pushed through `push` reach it unsolicited.
    fn connect(&self, peer: PublicKeyBytes, push: PushHandle) -> Self::Session;

    /// Answers one frame that the session layer passed up (a request, or a frame the
    /// application must judge). Returns the frames to send back, in order.
    fn request(
        &self,
        session: &mut Self::Session,
        frame: Frame,
    ) -> impl Future<Output = Vec<Frame>> + Send;

    /// The session's push queue drained after the application asked to hear of it
    /// ([`PushHandle::request_resume`]): paused pushes may continue.
    fn resume(&self, _session: &mut Self::Session) {}

    /// The session ended.
    fn disconnect(&self, session: Self::Session);
}

/// A handler that serves no application: every request is `UNSUPPORTED`.
#[derive(Debug, Default, Clone, Copy)]
pub struct TransportOnly;

impl Handler for TransportOnly {
    type Session = ();

    fn connect(&self, _peer: PublicKeyBytes, _push: PushHandle) {}

    async fn request(&self, _session: &mut (), frame: Frame) -> Vec<Frame> {
        unsupported_unless_ignorable(&frame).into_iter().collect()
    }

    fn disconnect(&self, _session: ()) {}
}

/// The answer of a relay to a frame it does not serve: `Error{UNSUPPORTED}`, except for frames
/// that must never be answered (errors and pongs from the peer, to avoid reply loops).
pub fn unsupported_unless_ignorable(frame: &Frame) -> Option<Frame> {
    use crate::proto::{Body, ErrorCode};
    match &frame.body {
        Some(Body::Error(_)) | Some(Body::Pong(_)) => None,
        Some(body) => Some(Frame::error(
            frame.id,
            ErrorCode::Unsupported,
            format!("{} is not a request this relay serves", body.kind()),
        )),
        None => Some(Frame::error(
            frame.id,
            ErrorCode::Unsupported,
            "missing frame body",
        )),
    }
}
