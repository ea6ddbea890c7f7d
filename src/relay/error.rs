//! Errors of the relay application, each mapped to the wire `ErrorCode` it is answered with.

use std::time::Duration;

use crate::store::{QuotaKind, StoreError};
use botd_protocol::proto::{self, ErrorCode, Frame};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RelayError {
    #[error("{0}")]
    BadRequest(String),
    #[error("device {0} is not registered for this identity")]
    NotRegistered(u32),
    #[error("this identity has no registered device")]
    IdentityNotRegistered,
    #[error("no such identity or device")]
    UnknownRecipient,
    #[error("no such message")]
    NotFound,
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge { len: usize, max: usize },
    #[error("mailbox is full ({0})")]
    MailboxFull(&'static str),
    #[error("too many {what}; retry in {} ms", retry_after.as_millis())]
    RateLimited {
        what: &'static str,
        retry_after: Duration,
    },
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("ticket is unknown, used up or expired")]
    TicketInvalid,
    /// A limit of the account (devices, prekeys, contacts, tickets): `BAD_REQUEST`; `kind`
    /// names it in `quota_hits_total`.
    #[error("{message}")]
    Limit { kind: QuotaKind, message: String },
    /// A relay-wide storage cap; `kind` names it in `quota_hits_total`.
    #[error("{message}")]
    QuotaExceeded {
        kind: QuotaKind,
        message: &'static str,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for RelayError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotRegistered(device) => RelayError::NotRegistered(device),
            StoreError::IdentityNotRegistered => RelayError::IdentityNotRegistered,
            StoreError::UnknownRecipient => RelayError::UnknownRecipient,
            StoreError::NotFound => RelayError::NotFound,
            StoreError::MailboxFull(what) => RelayError::MailboxFull(what),
            StoreError::Forbidden => {
                RelayError::Forbidden("recipient accepts contacts only; a ticket is required")
            }
            StoreError::TicketInvalid => RelayError::TicketInvalid,
            StoreError::BadSignature(why) => {
                RelayError::BadRequest(format!("sender_signature: {why}"))
            }
            StoreError::Limit { kind, message } => RelayError::Limit { kind, message },
            StoreError::QuotaExceeded { kind, message } => {
                RelayError::QuotaExceeded { kind, message }
            }
            StoreError::Unavailable(message) => RelayError::Internal(message),
        }
    }
}

impl RelayError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        RelayError::BadRequest(message.into())
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            RelayError::BadRequest(_) | RelayError::Limit { .. } => ErrorCode::BadRequest,
            RelayError::NotRegistered(_) | RelayError::IdentityNotRegistered => {
                ErrorCode::NotRegistered
            }
            RelayError::UnknownRecipient => ErrorCode::UnknownRecipient,
            RelayError::NotFound => ErrorCode::NotFound,
            RelayError::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            RelayError::MailboxFull(_) => ErrorCode::MailboxFull,
            RelayError::RateLimited { .. } => ErrorCode::RateLimited,
            RelayError::Forbidden(_) => ErrorCode::Forbidden,
            RelayError::TicketInvalid => ErrorCode::TicketInvalid,
            RelayError::QuotaExceeded { .. } => ErrorCode::QuotaExceeded,
            RelayError::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The quota or size limit this refusal hit, as `quota_hits_total` labels it.
    pub fn quota_kind(&self) -> Option<QuotaKind> {
        match self {
            RelayError::Limit { kind, .. } | RelayError::QuotaExceeded { kind, .. } => Some(*kind),
            RelayError::MailboxFull(_) => Some(QuotaKind::MailboxFull),
            RelayError::PayloadTooLarge { .. } => Some(QuotaKind::PayloadTooLarge),
            _ => None,
        }
    }

    /// The `Error` frame answering request `id`.
    pub fn to_frame(&self, id: u64) -> Frame {
        let retry_after_ms = match self {
            RelayError::RateLimited { retry_after, .. } => retry_after.as_millis().max(1) as u64,
            _ => 0,
        };
        Frame::new(
            id,
            proto::Body::Error(proto::Error {
                code: self.code() as i32,
                message: self.to_string(),
                retry_after_ms,
            }),
        )
    }
}
