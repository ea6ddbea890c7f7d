//! The connection to the NATS cluster and the streams and buckets the backend keeps there:
//! connecting (with reconnection for good), creating what is missing, and the small
//! request helpers every operation uses (reads from the stream leader, compare-and-set of a
//! bucket entry, message encoding in headers).

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;

use super::error::NatsError;
use super::records::Names;
use crate::config::Config;
use crate::store::{MailboxId, Message};
use botd_protocol::keys::{sha256, SIGNATURE_LEN};

/// Headers of a stored message (sender and nonce are in its subject).
pub const H_SENDER_DEVICE: &str = "Botd-Sender-Device";
pub const H_SIGNATURE: &str = "Botd-Signature";
pub const H_RECEIVED_AT: &str = "Botd-Received-At";
pub const H_MAILBOX_GENERATION: &str = "Botd-Mailbox-Generation";
const H_EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
const H_MSG_ID: &str = "Nats-Msg-Id";

/// The events stream keeps notices this long: enough for a relay that lost its connection
/// for a while to catch up.
pub const EVENTS_MAX_AGE: Duration = Duration::from_secs(600);
/// Messages outlive `message_ttl` on the stream by this much at most: the relays' sweep removes
/// them first (and counts them out of their mailboxes); the stream's own age limit is a backstop.
pub const MESSAGE_AGE_MARGIN: Duration = Duration::from_secs(3600);

/// Everything the backend talks to.
pub struct Cluster {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub messages: stream::Stream,
    pub events: stream::Stream,
    pub accounts: Bucket,
    pub keys: Bucket,
    pub names: Names,
}

fn setup(what: &str, err: impl std::fmt::Display) -> NatsError {
    NatsError::Setup {
        what: what.to_owned(),
        message: err.to_string(),
    }
}

impl Cluster {
    /// Connects to `urls` (any one is enough; the client learns the others and reconnects
    /// forever) and creates the streams and buckets that do not exist yet.
    pub async fn connect(urls: &[String], config: &Config) -> Result<Self, NatsError> {
        let timeout = config.nats_request_timeout;
        let joined = urls.join(",");
        let addrs = urls
            .iter()
            .map(|url| url.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| NatsError::Connect {
                urls: joined.clone(),
                message: err.to_string(),
            })?;
        let client = async_nats::ConnectOptions::new()
            .name("botd-relay")
            .connection_timeout(timeout)
            .request_timeout(Some(timeout))
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((50 * attempts as u64).min(2_000))
            })
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("NATS connected"),
                    async_nats::Event::Disconnected => tracing::warn!("NATS disconnected"),
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            })
            .connect(addrs)
            .await
            .map_err(|err| NatsError::Connect {
                urls: joined.clone(),
                message: err.to_string(),
            })?;
        let js = jetstream::context::ContextBuilder::new()
            .timeout(timeout)
            .build(client.clone());
        let names = Names::new(&config.nats_prefix);
        let replicas = config.nats_replicas;
        let messages = js
            .get_or_create_stream(stream::Config {
                name: names.messages_stream.clone(),
                description: Some("botd-relay mailboxes".into()),
                subjects: vec![names.all_messages()],
                storage: stream::StorageType::File,
                num_replicas: replicas,
                max_bytes: i64::try_from(config.max_stored_bytes).unwrap_or(i64::MAX),
                max_age: config.message_ttl + MESSAGE_AGE_MARGIN,
                max_message_size: i32::try_from(config.max_payload_len as usize + 4096)
                    .unwrap_or(i32::MAX),
                discard: stream::DiscardPolicy::New,
                allow_direct: false,
                ..Default::default()
            })
            .await
            .map_err(|err| setup(&names.messages_stream, err))?;
        let events = js
            .get_or_create_stream(stream::Config {
                name: names.events_stream.clone(),
                description: Some("botd-relay notices between relays".into()),
                subjects: vec![format!("{}.>", names.event_root)],
                storage: stream::StorageType::Memory,
                num_replicas: replicas,
                max_age: EVENTS_MAX_AGE,
                max_bytes: 64 << 20,
                discard: stream::DiscardPolicy::Old,
                ..Default::default()
            })
            .await
            .map_err(|err| setup(&names.events_stream, err))?;
        let accounts = bucket(&js, &names.accounts_bucket, replicas).await?;
        let keys = bucket(&js, &names.keys_bucket, replicas).await?;
        Ok(Self {
            client,
            js,
            messages,
            events,
            accounts,
            keys,
            names,
        })
    }
}

/// A key-value bucket in the layout of NATS KV (stream `KV_<name>`, subjects
/// `$KV.<name>.<key>`, one value per key, `KV-Operation` markers), so operators can inspect it
/// with the usual tools; reads go to the stream leader (no direct gets, which a replica that
/// lags could answer), so a read after an acknowledged write sees it on every relay.
#[derive(Clone)]
pub struct Bucket {
    js: jetstream::Context,
    stream: stream::Stream,
    /// `$KV.<name>.`
    prefix: String,
}

const KV_OPERATION: &str = "KV-Operation";
const NATS_ROLLUP: &str = "Nats-Rollup";

async fn bucket(js: &jetstream::Context, name: &str, replicas: usize) -> Result<Bucket, NatsError> {
    let stream = js
        .get_or_create_stream(stream::Config {
            name: format!("KV_{name}"),
            description: Some("botd-relay state".into()),
            subjects: vec![format!("$KV.{name}.>")],
            max_messages_per_subject: 1,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            discard: stream::DiscardPolicy::New,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: false,
            ..Default::default()
        })
        .await
        .map_err(|err| setup(name, err))?;
    Ok(Bucket {
        js: js.clone(),
        stream,
        prefix: format!("$KV.{name}."),
    })
}

struct PublishFailure(jetstream::context::PublishError);

impl Bucket {
    /// The value and revision of an entry; `None` value when absent or removed (the revision
    /// is then what a create must expect: 0 when the key never existed).
    pub async fn load(&self, key: &str) -> Result<(Option<Bytes>, u64), NatsError> {
        let subject = format!("{}{key}", self.prefix);
        match self.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(raw) => {
                let removed = raw.headers.get(KV_OPERATION).is_some();
                if removed || raw.payload.is_empty() {
                    Ok((None, raw.sequence))
                } else {
                    Ok((Some(raw.payload), raw.sequence))
                }
            }
            Err(err) if err.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok((None, 0))
            }
            Err(err) => Err(NatsError::request(err)),
        }
    }

    async fn publish(
        &self,
        key: &str,
        headers: HeaderMap,
        value: Bytes,
    ) -> Result<jetstream::publish::PublishAck, PublishFailure> {
        let subject = format!("{}{key}", self.prefix);
        let ack = self
            .js
            .publish_with_headers(subject, headers, value)
            .await
            .map_err(PublishFailure)?;
        ack.await.map_err(PublishFailure)
    }

    /// Writes `value` if the entry is still at `revision`: `Ok(None)` when another write came
    /// first.
    ///
    /// The condition is `Nats-Expected-Last-Subject-Sequence`, which a clustered nats-server
    /// 2.9 checks against what its stream has applied, not against writes still being
    /// replicated: two writers from one revision could both succeed. The message id
    /// `<key>@<revision>` closes that gap, since the leader records message ids (for
    /// de-duplication) as it proposes them: the second writer from a revision is answered
    /// "duplicate" and counts as having lost.
    pub async fn compare_and_set(
        &self,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> Result<Option<u64>, NatsError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            H_EXPECTED_LAST_SUBJECT_SEQUENCE,
            HeaderValue::from(revision),
        );
        headers.insert(H_MSG_ID, format!("{key}@{revision}").as_str());
        match self.publish(key, headers, value).await {
            Ok(ack) if ack.duplicate => Ok(None),
            Ok(ack) => Ok(Some(ack.sequence)),
            Err(PublishFailure(err))
                if err.kind() == jetstream::context::PublishErrorKind::WrongLastSequence =>
            {
                Ok(None)
            }
            Err(PublishFailure(err)) => Err(NatsError::request(err)),
        }
    }

    /// Writes `value` whatever the entry holds.
    pub async fn put(&self, key: &str, value: Bytes) -> Result<u64, NatsError> {
        self.publish(key, HeaderMap::new(), value)
            .await
            .map(|ack| ack.sequence)
            .map_err(|PublishFailure(err)| NatsError::request(err))
    }

    /// Removes an entry for good (a purge marker replaces it).
    pub async fn purge(&self, key: &str) -> Result<(), NatsError> {
        let mut headers = HeaderMap::new();
        headers.insert(KV_OPERATION, "PURGE");
        headers.insert(NATS_ROLLUP, "sub");
        self.publish(key, headers, Bytes::new())
            .await
            .map(drop)
            .map_err(|PublishFailure(err)| NatsError::request(err))
    }

    /// The keys starting with `key_prefix` (lists the stream's subjects: for rare sweeps).
    pub async fn keys(&self, key_prefix: &str) -> Result<Vec<String>, NatsError> {
        use futures_util::TryStreamExt;
        let filter = format!("{}{key_prefix}>", self.prefix);
        let mut subjects = self
            .stream
            .info_with_subjects(filter)
            .await
            .map_err(NatsError::request)?;
        let mut keys = Vec::new();
        while let Some((subject, _)) = subjects.try_next().await.map_err(NatsError::request)? {
            if let Some(key) = subject.strip_prefix(&self.prefix) {
                keys.push(key.to_owned());
            }
        }
        Ok(keys)
    }
}

/// Headers of a new message: its fields, and the condition that makes the append also the
/// idempotency check (no message on its subject yet).
pub fn message_headers(
    sender_device: u32,
    signature: &[u8; SIGNATURE_LEN],
    received_at_ms: u64,
    mailbox_generation: u64,
) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(H_EXPECTED_LAST_SUBJECT_SEQUENCE, HeaderValue::from(0u64));
    headers.insert(H_SENDER_DEVICE, HeaderValue::from(u64::from(sender_device)));
    headers.insert(H_SIGNATURE, hex::encode(signature).as_str());
    headers.insert(H_RECEIVED_AT, HeaderValue::from(received_at_ms));
    headers.insert(H_MAILBOX_GENERATION, HeaderValue::from(mailbox_generation));
    headers
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.as_str().parse().ok()
}

/// The mailbox generation a stored message was written for.
pub fn message_generation(headers: &HeaderMap) -> Option<u64> {
    header_u64(headers, H_MAILBOX_GENERATION)
}

/// The time a stored message was received.
pub fn message_received_at(headers: &HeaderMap) -> Option<u64> {
    header_u64(headers, H_RECEIVED_AT)
}

/// A stored message as delivered, with its mailbox and generation; `None` for anything on the
/// stream that is not a well-formed message.
pub fn decode_message(
    names: &Names,
    subject: &str,
    sequence: u64,
    headers: &HeaderMap,
    payload: Bytes,
) -> Option<(MailboxId, u64, Message)> {
    let (mailbox, sender, nonce) = names.parse_message_subject(subject)?;
    let sender_device = u32::try_from(header_u64(headers, H_SENDER_DEVICE)?).ok()?;
    let mut signature = [0u8; SIGNATURE_LEN];
    hex::decode_to_slice(headers.get(H_SIGNATURE)?.as_str(), &mut signature).ok()?;
    let received_at_ms = header_u64(headers, H_RECEIVED_AT)?;
    let generation = message_generation(headers)?;
    let message = Message {
        id: sequence,
        sender,
        sender_device,
        nonce,
        payload_hash: sha256(&[&payload]),
        signature,
        payload,
        received_at_ms,
    };
    Some((mailbox, generation, message))
}
