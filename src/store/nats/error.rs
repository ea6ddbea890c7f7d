//! The JetStream backend's own failures, and how they reach the application: every one of them
//! is `StoreError::Unavailable` (answered `INTERNAL`), since the outcome of a change that met
//! one may be either.

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot connect to NATS at {urls}: {message}")]
    Connect { urls: String, message: String },
    #[error("cannot set up {what} on the cluster: {message}")]
    Setup { what: String, message: String },
    #[error("JetStream request failed: {0}")]
    Request(String),
    #[error("a compare-and-set on {0} kept conflicting")]
    Contended(&'static str),
    #[error("a record on the cluster does not decode: {0}")]
    Corrupt(&'static str),
}

impl NatsError {
    pub fn request(err: impl std::fmt::Display) -> Self {
        Self::Request(err.to_string())
    }
}

impl From<NatsError> for StoreError {
    fn from(err: NatsError) -> Self {
        StoreError::Unavailable(err.to_string())
    }
}
