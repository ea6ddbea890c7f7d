//! The protobuf messages of botd/1, generated from `proto/*.proto`, plus small constructors
//! for the frames every layer builds.

#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

include!(concat!(env!("OUT_DIR"), "/botd.v1.rs"));

pub use frame::Body;

/// Protocol name announced in `Welcome`.
pub const PROTOCOL_NAME: &str = "botd/1";

/// Longest accepted message id (`Init.id`, `Ack.id`, ping ids), in bytes.
pub const MAX_ID_LEN: usize = 64;

/// True when `id` is 1 to 64 bytes (prost already guarantees valid UTF-8).
pub fn valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
}

/// A fresh message id: 32 lowercase hex characters of 16 random bytes.
pub fn random_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

impl Frame {
    pub fn new(id: u64, body: Body) -> Self {
        Self {
            id,
            body: Some(body),
        }
    }

    pub fn error(id: u64, code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(
            id,
            Body::Error(Error {
                code: code as i32,
                message: message.into(),
                retry_after_ms: 0,
            }),
        )
    }
}

/// The answer to a frame a peer does not serve (§6): `Error{UNSUPPORTED}` with the frame's id,
/// except for frames that are never answered (errors and pongs, to avoid reply loops).
pub fn unsupported_unless_ignorable(frame: &Frame) -> Option<Frame> {
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

impl Body {
    /// Short stable name of the body kind, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Welcome(_) => "welcome",
            Body::Error(_) => "error",
            Body::Ping(_) => "ping",
            Body::Pong(_) => "pong",
            Body::Register(_) => "register",
            Body::Registered(_) => "registered",
            Body::Unregister(_) => "unregister",
            Body::Unregistered(_) => "unregistered",
            Body::UploadPreKeys(_) => "upload_pre_keys",
            Body::GetPreKeyCount(_) => "get_pre_key_count",
            Body::PreKeyCount(_) => "pre_key_count",
            Body::FetchPreKeys(_) => "fetch_pre_keys",
            Body::PreKeyBundles(_) => "pre_key_bundles",
            Body::PreKeysLow(_) => "pre_keys_low",
            Body::Send(_) => "send",
            Body::Sent(_) => "sent",
            Body::Subscribe(_) => "subscribe",
            Body::Subscribed(_) => "subscribed",
            Body::Deliver(_) => "deliver",
            Body::GetMessage(_) => "get_message",
            Body::AckMessages(_) => "ack_messages",
            Body::Acked(_) => "acked",
            Body::SetPolicy(_) => "set_policy",
            Body::AddContact(_) => "add_contact",
            Body::RemoveContact(_) => "remove_contact",
            Body::CreateTicket(_) => "create_ticket",
            Body::Ticket(_) => "ticket",
            Body::Done(_) => "done",
        }
    }
}
