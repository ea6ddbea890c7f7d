//! The connection to the NATS cluster and the streams the backend keeps there: connecting
//! (with reconnection for good), checking the server's version, creating or checking the
//! streams, and the few JetStream requests every operation is made of: publishes (with their
//! conditions), direct gets (single and batched, raw bytes with no JSON or base64), deletes
//! without erasure, purges of one subject, and atomic batches.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture, stream};
use async_nats::{HeaderMap, HeaderValue, StatusCode};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::error::{code, NatsError};
use super::feed::Feed;
use super::names::Names;
use super::outbox::{Outbox, Sent};
use super::wire::{self, Delivered};
use crate::config::Config;

/// The oldest nats-server the backend runs on: atomic batches, message counters and
/// per-message TTL came in 2.12.
pub const MIN_SERVER_VERSION: (u64, u64, u64) = (2, 12, 0);

/// Publishes one relay keeps unacknowledged at most (async-nats waits beyond it).
const MAX_ACKS_IN_FLIGHT: usize = 16_384;

/// Messages in one batched direct get at most.
pub const MAX_GET_BATCH: usize = 256;

/// A stored message as a direct get returns it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub subject: String,
    pub sequence: u64,
    /// Messages matching the request after this one (for a `next_by_subj` get: how many more
    /// the subject holds).
    pub pending: u64,
    pub payload: Bytes,
}

/// Everything the backend talks to.
pub struct Cluster {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub names: Names,
    outbox: Arc<Outbox>,
    requests: Requests,
}

/// `botd_jetstream_requests_total{kind}`, resolved once.
struct Requests {
    publish: metrics::Counter,
    get: metrics::Counter,
    delete: metrics::Counter,
    purge: metrics::Counter,
    atomic_batch: metrics::Counter,
    messages_read: metrics::Counter,
}

impl Requests {
    fn new() -> Self {
        let counter = |kind: &'static str| metrics::counter!(crate::metrics::JETSTREAM_REQUESTS, "kind" => kind);
        Self {
            publish: counter("publish"),
            get: counter("get"),
            delete: counter("delete"),
            purge: counter("purge"),
            atomic_batch: counter("atomic_batch"),
            messages_read: metrics::counter!(crate::metrics::JETSTREAM_MESSAGES_READ),
        }
    }
}

fn setup(what: &str, err: impl std::fmt::Display) -> NatsError {
    NatsError::Setup {
        what: what.to_owned(),
        message: err.to_string(),
    }
}

/// A refused creation or update of `spec`'s stream: the storage it cannot reserve said as
/// such, anything else as [`setup`].
fn stream_setup(spec: &Spec, err: async_nats::jetstream::context::CreateStreamError) -> NatsError {
    use async_nats::jetstream::context::CreateStreamErrorKind;
    match err.kind() {
        CreateStreamErrorKind::JetStream(api)
            if api.error_code().0 == super::error::code::STREAM_STORE_FULL =>
        {
            NatsError::NoStorage {
                stream: spec.name.clone(),
                bytes: spec.max_bytes,
            }
        }
        _ => setup(&spec.name, err),
    }
}

/// `major.minor.patch` of a server version string such as `2.15.1` or `v2.12.0-beta`.
pub fn parse_version(version: &str) -> Option<(u64, u64, u64)> {
    let core = version.trim_start_matches('v');
    let core = core.split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

/// What the backend needs of one stream.
struct Spec {
    name: String,
    description: &'static str,
    subjects: Vec<String>,
    max_msgs_per_subject: i64,
    /// New messages are refused (per subject) at the limit, instead of old ones dropped.
    discard_new: bool,
    max_bytes: i64,
    max_age: Duration,
    duplicate_window: Duration,
    republish: Option<(String, String)>,
    atomic: bool,
    counter: bool,
    ttl: bool,
}

impl Spec {
    fn config(&self, replicas: usize) -> stream::Config {
        stream::Config {
            name: self.name.clone(),
            description: Some(self.description.into()),
            subjects: self.subjects.clone(),
            storage: stream::StorageType::File,
            num_replicas: replicas,
            max_messages_per_subject: self.max_msgs_per_subject,
            discard: if self.discard_new {
                stream::DiscardPolicy::New
            } else {
                stream::DiscardPolicy::Old
            },
            discard_new_per_subject: self.discard_new && self.max_msgs_per_subject > 0,
            max_bytes: self.max_bytes,
            max_age: self.max_age,
            duplicate_window: self.duplicate_window,
            republish: self
                .republish
                .clone()
                .map(|(source, destination)| stream::Republish {
                    source,
                    destination,
                    headers_only: false,
                }),
            allow_direct: true,
            allow_atomic_publish: self.atomic,
            allow_message_counter: self.counter,
            allow_message_ttl: self.ttl,
            ..Default::default()
        }
    }
}

impl Cluster {
    /// Connects to `urls` (any one is enough; the client learns the others and reconnects
    /// forever), refuses a server older than [`MIN_SERVER_VERSION`], and creates or checks the
    /// streams.
    pub async fn connect(urls: &[String], config: &Config) -> Result<Self, NatsError> {
        let timeout = config.nats_request_timeout;
        let joined = urls.join(",");
        let connect_error = |message: String| NatsError::Connect {
            urls: joined.clone(),
            message,
        };
        let addrs = urls
            .iter()
            .map(|url| url.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| connect_error(err.to_string()))?;
        let client = async_nats::ConnectOptions::new()
            .name("botd-relay")
            .connection_timeout(timeout)
            .request_timeout(Some(timeout))
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((50 * attempts as u64).min(1_000))
            })
            // Pub acks, and live messages where the servers use TLS (otherwise those come on
            // the live feed's own connection), wait here when the relay falls behind: room for
            // bursts.
            .subscription_capacity(65_536)
            // Every subject is made here from `nats_prefix` (checked by the config: letters,
            // digits, `_`, `-`), hex and numbers: checking each publish's subject again cost
            // about 2 % of the relay's CPU per message.
            .skip_subject_validation(true)
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("NATS connected"),
                    async_nats::Event::Disconnected => tracing::warn!("NATS disconnected"),
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            })
            .connect(addrs)
            .await
            .map_err(|err| connect_error(err.to_string()))?;
        let version = client.server_info().version;
        match parse_version(&version) {
            Some(found) if found >= MIN_SERVER_VERSION => {}
            _ => {
                let (a, b, c) = MIN_SERVER_VERSION;
                return Err(NatsError::ServerTooOld {
                    found: version,
                    needed: format!("{a}.{b}.{c}"),
                });
            }
        }
        let js = jetstream::context::ContextBuilder::new()
            .timeout(timeout)
            .max_ack_inflight(MAX_ACKS_IN_FLIGHT)
            .build(client.clone());
        let outbox = Arc::new(Outbox::new(client.new_inbox(), timeout, MAX_ACKS_IN_FLIGHT));
        let cluster = Self {
            client,
            js,
            names: Names::new(&config.nats_prefix, config.nats_streams),
            outbox,
            requests: Requests::new(),
        };
        for spec in cluster.specs(config) {
            cluster.ensure(&spec, config.nats_replicas).await?;
        }
        let earlier = cluster.names.earlier_layout();
        if cluster.js.get_stream(&earlier[0]).await.is_ok() {
            tracing::warn!(
                streams = %earlier.join(", "),
                "streams of the store's earlier layout exist under this prefix: this version \
                 neither reads nor removes them (docs/SCALING.md, \"Upgrading\")"
            );
        }
        Ok(cluster)
    }

    fn specs(&self, config: &Config) -> Vec<Spec> {
        let names = &self.names;
        let k = names.message_streams;
        let mut specs: Vec<Spec> = (0..k)
            .map(|index| Spec {
                name: names.message_stream(index),
                description: "botd-relay mailboxes, one subject each",
                subjects: vec![names.message_stream_subjects(index)],
                max_msgs_per_subject: i64::try_from(config.mailbox_max_messages)
                    .unwrap_or(i64::MAX),
                discard_new: true,
                max_bytes: i64::try_from(config.max_stored_bytes / k as u64).unwrap_or(i64::MAX),
                max_age: config.message_ttl,
                // JetStream refuses a window longer than the stream's max age (a message that
                // expired is no longer there to be a duplicate of).
                duplicate_window: config.nats_duplicate_window.min(config.message_ttl),
                republish: Some(names.republish(index)),
                atomic: false,
                counter: false,
                ttl: false,
            })
            .collect();
        specs.push(Spec {
            name: names.accounts_stream(),
            description: "botd-relay accounts, keys, contacts and tickets",
            subjects: vec![names.accounts_subjects()],
            max_msgs_per_subject: 1,
            discard_new: false,
            max_bytes: -1,
            max_age: Duration::ZERO,
            duplicate_window: Duration::from_secs(120),
            republish: None,
            atomic: true,
            counter: false,
            ttl: true,
        });
        specs.push(Spec {
            name: names.prekeys_stream(),
            description: "botd-relay one-time prekeys, one subject per registration",
            subjects: vec![names.prekeys_subjects()],
            max_msgs_per_subject: i64::try_from(config.max_prekeys_per_device).unwrap_or(i64::MAX),
            discard_new: true,
            max_bytes: -1,
            max_age: Duration::ZERO,
            duplicate_window: Duration::from_secs(120),
            republish: None,
            atomic: true,
            counter: false,
            ttl: false,
        });
        specs.push(Spec {
            name: names.usage_stream(),
            description: "botd-relay payload bytes per mailbox (counters)",
            subjects: vec![names.usage_subjects()],
            max_msgs_per_subject: 1,
            discard_new: false,
            max_bytes: -1,
            max_age: Duration::ZERO,
            duplicate_window: Duration::from_secs(120),
            republish: None,
            atomic: false,
            counter: true,
            ttl: false,
        });
        specs
    }

    /// Creates the stream, or checks an existing one: its replicas must be `replicas` (a
    /// mismatch is refused with the fix), and its limits follow the configuration.
    async fn ensure(&self, spec: &Spec, replicas: usize) -> Result<(), NatsError> {
        let wanted = spec.config(replicas);
        match self.js.get_stream(&spec.name).await {
            Ok(mut existing) => {
                let info = existing
                    .info()
                    .await
                    .map_err(|err| setup(&spec.name, err))?;
                let found = info.config.num_replicas.max(1);
                if found != replicas {
                    return Err(NatsError::ReplicasMismatch {
                        stream: spec.name.clone(),
                        found,
                        wanted: replicas,
                    });
                }
                let current = &info.config;
                let differs = current.max_messages_per_subject != wanted.max_messages_per_subject
                    || current.max_bytes != wanted.max_bytes
                    || current.max_age != wanted.max_age
                    || current.duplicate_window != wanted.duplicate_window
                    || current.subjects != wanted.subjects
                    || !current.allow_direct;
                if differs {
                    tracing::info!(stream = %spec.name, "updating the stream's limits to the configuration");
                    self.js
                        .update_stream(wanted)
                        .await
                        .map_err(|err| stream_setup(spec, err))?;
                }
                Ok(())
            }
            Err(_) => {
                self.js
                    .create_stream(wanted)
                    .await
                    .map_err(|err| stream_setup(spec, err))?;
                Ok(())
            }
        }
    }

    /// Queues a publish of a new message with its message id (in call order, without waiting).
    pub fn enqueue(&self, subject: async_nats::Subject, message_id: String, body: Bytes) -> Sent {
        self.outbox.enqueue(subject, message_id, body)
    }

    /// Starts the outbox's tasks, until `stop`; its acknowledgements come on `feed` when there
    /// is one (handed to [`Cluster::publish_answered`]).
    pub async fn run_outbox(
        &self,
        feed: Option<Arc<Feed>>,
        stop: CancellationToken,
    ) -> Result<(), NatsError> {
        self.outbox
            .run(
                self.client.clone(),
                feed,
                self.requests.publish.clone(),
                stop,
            )
            .await
    }

    /// An acknowledgement of one of the outbox's publishes, from the live feed's connection.
    pub fn publish_answered(&self, message: &Delivered) {
        let status = wire::status(&message.headers).and_then(|s| StatusCode::from_u16(s).ok());
        self.outbox
            .answer(&message.subject, status, &message.payload);
    }

    /// Publishes and waits for the acknowledgement.
    pub async fn publish(
        &self,
        subject: String,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<jetstream::publish::PublishAck, NatsError> {
        let ack = self.send(subject, headers, body).await?;
        Ok(ack.await?)
    }

    /// Hands a publish to the connection (in call order) and returns its acknowledgement to
    /// wait for.
    pub async fn send(
        &self,
        subject: String,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<PublishAckFuture, NatsError> {
        self.requests.publish.increment(1);
        Ok(self.js.publish_with_headers(subject, headers, body).await?)
    }

    /// Writes `body` to `subject` if the subject's last message is `expected` (0: the
    /// subject holds none). `Ok(false)` when another write came first. The message id makes a
    /// retry of a write that was applied come back as a duplicate, not as a lost race.
    pub async fn compare_and_set(
        &self,
        subject: String,
        expected: u64,
        body: Bytes,
        extra: impl FnOnce(&mut HeaderMap),
    ) -> Result<Option<u64>, NatsError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            HeaderValue::from(expected),
        );
        let id = format!(
            "{}@{expected}:{:x}",
            &subject[subject.len().saturating_sub(40)..],
            rand::random::<u64>()
        );
        headers.insert("Nats-Msg-Id", id.as_str());
        extra(&mut headers);
        let deadline = tokio::time::Instant::now() + self.timeout();
        for attempt in 0u64.. {
            match self
                .publish(subject.clone(), headers.clone(), body.clone())
                .await
            {
                Ok(ack) => return Ok(Some(ack.sequence)),
                Err(err) if err.is_lost_race() => return Ok(None),
                Err(err) if err.is_transient() => {
                    let pause = Duration::from_millis((10 * (attempt + 1)).min(250));
                    if tokio::time::Instant::now() + pause >= deadline {
                        return Err(err);
                    }
                    tokio::time::sleep(pause).await;
                }
                Err(err) => return Err(err),
            }
        }
        Err(NatsError::Contended("a record"))
    }

    /// The last message of `subject` in `stream`, if any.
    pub async fn last(&self, stream: &str, subject: &str) -> Result<Option<Stored>, NatsError> {
        self.direct_one(stream, json!({ "last_by_subj": subject }))
            .await
    }

    /// The first message at or after `from` on `subject` (wildcards allowed), with how many
    /// more match after it (a batch of one: single gets do not say).
    pub async fn next(
        &self,
        stream: &str,
        subject: &str,
        from: u64,
    ) -> Result<Option<Stored>, NatsError> {
        Ok(self
            .batch(stream, subject, from, 1)
            .await?
            .into_iter()
            .next())
    }

    /// The last message of `subject`, read from the stream's leader: what every acknowledged
    /// write left (a direct get may be answered by a replica that lags).
    pub async fn last_from_leader(
        &self,
        stream: &str,
        subject: &str,
    ) -> Result<Option<Stored>, NatsError> {
        self.requests.get.increment(1);
        let handle = self
            .js
            .get_stream_no_info(stream)
            .await
            .map_err(NatsError::request)?;
        match handle.get_last_raw_message_by_subject(subject).await {
            Ok(message) => Ok(Some(Stored {
                subject: message.subject.to_string(),
                sequence: message.sequence,
                pending: 0,
                payload: message.payload,
            })),
            Err(err) if err.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(err) => Err(NatsError::request(err)),
        }
    }

    /// Message `seq` of `stream`, if stored.
    pub async fn get(&self, stream: &str, seq: u64) -> Result<Option<Stored>, NatsError> {
        self.direct_one(stream, json!({ "seq": seq })).await
    }

    async fn direct_one(
        &self,
        stream: &str,
        request: serde_json::Value,
    ) -> Result<Option<Stored>, NatsError> {
        let body = Bytes::from(serde_json::to_vec(&request).map_err(NatsError::request)?);
        self.retrying(|| async {
            self.requests.get.increment(1);
            let reply = self
                .client
                .request(format!("$JS.API.DIRECT.GET.{stream}"), body.clone())
                .await
                .map_err(core_request_error)?;
            let stored = read_stored(reply)?;
            self.requests
                .messages_read
                .increment(stored.is_some() as u64);
            Ok(stored)
        })
        .await
    }

    /// Runs `request` again while the cluster answers with a passing state (a stream between
    /// leaders), within `nats_request_timeout`.
    async fn retrying<T, F, Fut>(&self, mut request: F) -> Result<T, NatsError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, NatsError>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout();
        for attempt in 0u64.. {
            match request().await {
                Err(err) if err.is_transient() => {
                    let pause = Duration::from_millis((10 * (attempt + 1)).min(250));
                    if tokio::time::Instant::now() + pause >= deadline {
                        return Err(err);
                    }
                    tokio::time::sleep(pause).await;
                }
                outcome => return outcome,
            }
        }
        unreachable!("the loop returns")
    }

    /// Up to `max` messages at or after `from` on `subject`, in sequence order.
    pub async fn batch(
        &self,
        stream: &str,
        subject: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<Stored>, NatsError> {
        let request = json!({ "seq": from.max(1), "next_by_subj": subject, "batch": max.clamp(1, MAX_GET_BATCH) });
        self.retrying(|| self.direct_many(stream, request.clone()))
            .await
    }

    /// The last message of every subject matching `filter` (at most 1024).
    pub async fn last_of_each(&self, stream: &str, filter: &str) -> Result<Vec<Stored>, NatsError> {
        self.retrying(|| self.direct_many(stream, json!({ "multi_last": [filter] })))
            .await
    }

    async fn direct_many(
        &self,
        stream: &str,
        request: serde_json::Value,
    ) -> Result<Vec<Stored>, NatsError> {
        self.requests.get.increment(1);
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(NatsError::request)?;
        let body = Bytes::from(serde_json::to_vec(&request).map_err(NatsError::request)?);
        self.client
            .publish_with_reply(format!("$JS.API.DIRECT.GET.{stream}"), inbox, body)
            .await
            .map_err(NatsError::request)?;
        let deadline = tokio::time::Instant::now() + self.timeout();
        let mut out = Vec::new();
        loop {
            let reply = tokio::time::timeout_at(deadline, replies.next())
                .await
                .map_err(|_| NatsError::request("a batched read timed out"))?
                .ok_or_else(|| NatsError::request("the connection closed during a read"))?;
            match reply.status {
                // End of batch (204), or nothing matched.
                Some(status) if status.as_u16() == 204 || status == StatusCode::NOT_FOUND => {
                    self.requests.messages_read.increment(out.len() as u64);
                    return Ok(out);
                }
                Some(status) => return Err(status_error(status, reply.description)),
                None => {
                    if let Some(stored) = read_stored(reply)? {
                        out.push(stored);
                    }
                    // A batch cannot run away: the server stops at its own limits too.
                    if out.len() > 4 * MAX_GET_BATCH.max(1024) {
                        self.requests.messages_read.increment(out.len() as u64);
                        return Ok(out);
                    }
                }
            }
        }
    }

    fn timeout(&self) -> Duration {
        self.client.timeout().unwrap_or(Duration::from_secs(5))
    }

    /// Deletes message `seq` without overwriting it on disk (an erase rewrites the whole
    /// block). `Ok(false)` when it was not there.
    pub async fn delete(&self, stream: &str, seq: u64) -> Result<bool, NatsError> {
        let response: serde_json::Value = self
            .retrying(|| async {
                self.requests.delete.increment(1);
                self.js
                    .request(
                        format!("STREAM.MSG.DELETE.{stream}"),
                        &json!({ "seq": seq, "no_erase": true }),
                    )
                    .await
                    .map_err(api_request_error)
            })
            .await?;
        match api_error(&response) {
            None => Ok(true),
            Some(err)
                if matches!(
                    err.code(),
                    Some(code::SEQUENCE_NOT_FOUND | code::NO_MESSAGE_FOUND)
                ) =>
            {
                Ok(false)
            }
            Some(err) => Err(err),
        }
    }

    /// Removes the messages of `subject` below `below` (every one when `below` is `None`);
    /// returns how many.
    pub async fn purge(
        &self,
        stream: &str,
        subject: &str,
        below: Option<u64>,
    ) -> Result<u64, NatsError> {
        let request = match below {
            Some(seq) => json!({ "filter": subject, "seq": seq }),
            None => json!({ "filter": subject }),
        };
        let response: serde_json::Value = self
            .retrying(|| async {
                self.requests.purge.increment(1);
                self.js
                    .request(format!("STREAM.PURGE.{stream}"), &request)
                    .await
                    .map_err(api_request_error)
            })
            .await?;
        if let Some(err) = api_error(&response) {
            return Err(err);
        }
        Ok(response["purged"].as_u64().unwrap_or(0))
    }

    /// Publishes `messages` as one atomic batch: all are stored, or none. Returns the last
    /// sequence.
    pub async fn atomic_batch(
        &self,
        messages: Vec<(String, HeaderMap, Bytes)>,
    ) -> Result<u64, NatsError> {
        let count = messages.len();
        if count == 0 {
            return Ok(0);
        }
        self.requests.atomic_batch.increment(1);
        let id = format!("{:032x}", rand::random::<u128>());
        let mut last = None;
        for (i, (subject, mut headers, body)) in messages.into_iter().enumerate() {
            headers.insert("Nats-Batch-Id", id.as_str());
            headers.insert("Nats-Batch-Sequence", HeaderValue::from(i as u64 + 1));
            if i + 1 == count {
                headers.insert("Nats-Batch-Commit", "1");
                last = Some((subject, headers, body));
            } else {
                // Staged without a reply: only the commit is acknowledged.
                self.client
                    .publish_with_headers(subject, headers, body)
                    .await
                    .map_err(NatsError::request)?;
            }
        }
        let (subject, headers, body) = last.expect("at least one message");
        Ok(self.publish(subject, headers, body).await?.sequence)
    }
}

/// A core request's failure: nothing answering is a passing state of the cluster.
fn core_request_error(err: async_nats::RequestError) -> NatsError {
    match err.kind() {
        async_nats::RequestErrorKind::NoResponders => NatsError::NoResponders,
        _ => NatsError::request(err),
    }
}

/// A JetStream API request's failure, read the same way.
fn api_request_error(err: jetstream::context::RequestError) -> NatsError {
    match err.kind() {
        jetstream::context::RequestErrorKind::NoResponders => NatsError::NoResponders,
        _ => NatsError::request(err),
    }
}

/// A status in place of a reply: 503 says nothing answered for the stream.
fn status_error(status: StatusCode, description: Option<String>) -> NatsError {
    if status == StatusCode::NO_RESPONDERS {
        return NatsError::NoResponders;
    }
    NatsError::Api {
        code: u64::from(status.as_u16()),
        description: description.unwrap_or_default(),
    }
}

/// The error a JetStream API response carries, if any.
fn api_error(response: &serde_json::Value) -> Option<NatsError> {
    let error = response.get("error")?;
    Some(NatsError::Api {
        code: error["err_code"].as_u64().unwrap_or(0),
        description: error["description"].as_str().unwrap_or("").to_owned(),
    })
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.as_str().parse().ok()
}

/// A direct get's reply: a stored message, nothing (404), or an error status.
fn read_stored(reply: async_nats::Message) -> Result<Option<Stored>, NatsError> {
    match reply.status {
        None => {}
        Some(status) if status == StatusCode::NOT_FOUND || status.as_u16() == 204 => {
            return Ok(None)
        }
        Some(status) => return Err(status_error(status, reply.description)),
    }
    let headers = reply
        .headers
        .ok_or(NatsError::Corrupt("a direct get reply without headers"))?;
    let sequence =
        header_u64(&headers, "Nats-Sequence").ok_or(NatsError::Corrupt("Nats-Sequence"))?;
    let subject = headers
        .get("Nats-Subject")
        .map(|s| s.as_str().to_owned())
        .ok_or(NatsError::Corrupt("Nats-Subject"))?;
    let pending = header_u64(&headers, "Nats-Num-Pending").unwrap_or(0);
    Ok(Some(Stored {
        subject,
        sequence,
        pending,
        payload: reply.payload,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_compare() {
        assert_eq!(parse_version("2.15.1"), Some((2, 15, 1)));
        assert_eq!(parse_version("v2.12.0-beta.3"), Some((2, 12, 0)));
        assert_eq!(parse_version("2.10"), Some((2, 10, 0)));
        assert_eq!(parse_version("garbage"), None);
        assert!(parse_version("2.9.10").unwrap() < MIN_SERVER_VERSION);
        assert!(parse_version("2.12.0").unwrap() >= MIN_SERVER_VERSION);
        assert!(parse_version("3.0.0").unwrap() >= MIN_SERVER_VERSION);
    }
}
