//! The JetStream backend's own failures, how a JetStream refusal is read (a limit of the
//! store, a lost compare-and-set, a transient state of the cluster), and how they reach the
//! application: a refusal that is a rule of the store becomes that rule's error, everything
//! else `StoreError::Unavailable` (answered `INTERNAL`), since the outcome of a change that met
//! it may be either.

use crate::store::StoreError;

/// JetStream API error codes the backend tells apart (`err_code` of an API error).
pub mod code {
    /// `wrong last sequence: N`: a compare-and-set lost.
    pub const WRONG_LAST_SEQUENCE: u64 = 10071;
    /// `wrong last sequence`: another write to the subject is still being applied (clusters).
    pub const WRONG_LAST_SEQUENCE_IN_FLIGHT: u64 = 10164;
    /// `maximum messages per subject exceeded` (`discard_new_per_subject`).
    pub const MAX_MESSAGES_PER_SUBJECT: u64 = 10077;
    /// `duplicate message id is in process`: the first copy is being applied (clusters).
    pub const DUPLICATE_IN_PROCESS: u64 = 10158;
    /// `sequence N not found` (delete of a message already gone).
    pub const SEQUENCE_NOT_FOUND: u64 = 10043;
    /// `no message found` (delete of a message removed while the request was under way).
    pub const NO_MESSAGE_FOUND: u64 = 10057;
    /// `insufficient resources`: at a publish, the stream's limits are reached (discard new);
    /// at a stream's creation, the servers cannot reserve its `max_bytes`.
    pub const STREAM_STORE_FULL: u64 = 10047;
}

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot connect to NATS at {urls}: {message}")]
    Connect { urls: String, message: String },
    #[error(
        "nats-server {found} is too old: the JetStream store needs {needed} or later (atomic \
         batches, message counters, per-message TTL); see docs/SCALING.md for how to install it"
    )]
    ServerTooOld { found: String, needed: String },
    #[error("cannot set up {what} on the cluster: {message}")]
    Setup { what: String, message: String },
    /// JetStream reserves a stream's `max_bytes` when it creates the stream, and refuses a
    /// stream that its storage (`max_file_store`, by default 75 % of the free disk) cannot hold.
    #[error(
        "the NATS servers cannot reserve {bytes} bytes for stream {stream} (max_stored_bytes \
         spread over nats_streams): give JetStream more storage (free disk, or max_file_store in \
         the server's jetstream block) or lower max_stored_bytes"
    )]
    NoStorage { stream: String, bytes: i64 },
    #[error(
        "stream {stream} has {found} replicas, but nats_replicas is {wanted}: set nats_replicas \
         to {found}, or change the stream with `nats stream edit {stream} --replicas {wanted}`"
    )]
    ReplicasMismatch {
        stream: String,
        found: usize,
        wanted: usize,
    },
    #[error("JetStream request failed: {0}")]
    Request(String),
    /// Nothing answered for the stream: it has no leader right now (an election after a
    /// node was lost), or the cluster is out of reach.
    #[error("no JetStream server answered for the stream")]
    NoResponders,
    /// An API error of JetStream, with its code.
    #[error("JetStream refused: {description} (error code {code})")]
    Api { code: u64, description: String },
    #[error("a compare-and-set on {0} kept conflicting")]
    Contended(&'static str),
    #[error("a record on the cluster does not decode: {0}")]
    Corrupt(&'static str),
}

impl NatsError {
    pub fn request(err: impl std::fmt::Display) -> Self {
        Self::Request(err.to_string())
    }

    /// The JetStream error code, for an API error.
    pub fn code(&self) -> Option<u64> {
        match self {
            NatsError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// A compare-and-set that lost (or could not yet be decided): read again and retry.
    pub fn is_lost_race(&self) -> bool {
        matches!(
            self.code(),
            Some(code::WRONG_LAST_SEQUENCE | code::WRONG_LAST_SEQUENCE_IN_FLIGHT)
        )
    }

    /// A state of the cluster that passes within moments (a first copy still being applied,
    /// a stream between two leaders): the same request may succeed shortly, within
    /// `nats_request_timeout`. (A request that timed out is not retried: the timeout already
    /// spent what a request may wait.)
    pub fn is_transient(&self) -> bool {
        matches!(self, NatsError::NoResponders) || self.code() == Some(code::DUPLICATE_IN_PROCESS)
    }
}

impl From<async_nats::jetstream::context::PublishError> for NatsError {
    fn from(err: async_nats::jetstream::context::PublishError) -> Self {
        use std::error::Error as _;
        match err
            .source()
            .and_then(|source| source.downcast_ref::<async_nats::jetstream::Error>())
        {
            Some(api) => NatsError::Api {
                code: api.error_code().0,
                description: api.to_string(),
            },
            None if err.kind()
                == async_nats::jetstream::context::PublishErrorKind::StreamNotFound =>
            {
                NatsError::NoResponders
            }
            None => NatsError::request(err),
        }
    }
}

impl From<NatsError> for StoreError {
    fn from(err: NatsError) -> Self {
        StoreError::Unavailable(err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn races_and_transient_states_are_told_apart() {
        let api = |code| NatsError::Api {
            code,
            description: String::new(),
        };
        assert!(api(code::WRONG_LAST_SEQUENCE).is_lost_race());
        assert!(api(code::WRONG_LAST_SEQUENCE_IN_FLIGHT).is_lost_race());
        assert!(!api(code::MAX_MESSAGES_PER_SUBJECT).is_lost_race());
        assert!(api(code::DUPLICATE_IN_PROCESS).is_transient());
        assert!(!api(code::MAX_MESSAGES_PER_SUBJECT).is_transient());
        assert!(!NatsError::request("timed out").is_transient());
        assert!(NatsError::NoResponders.is_transient());
        let message = NatsError::ReplicasMismatch {
            stream: "BOTD_M0".into(),
            found: 1,
            wanted: 3,
        }
        .to_string();
        assert!(message.contains("set nats_replicas to 1"), "{message}");
    }
}
