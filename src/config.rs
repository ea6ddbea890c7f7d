//! The relay's single `Config`: every limit, timeout, rate and quota, each with its default.
//! Values come from (lowest to highest precedence) the defaults, an optional TOML file, `BOTD_*`
//! environment variables (one per field, e.g. `BOTD_MAX_CONNECTIONS=5000`,
//! `BOTD_HANDSHAKE_TIMEOUT=5s`) and command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ratelimit::Rate;

/// Default TCP port of BOTD #2.
pub const DEFAULT_PORT: u16 = 9945;
/// Largest `mailbox_max_messages`: a send looks for a retry of the same nonce by scanning the
/// nonces of its mailbox (8 bytes per stored message, no index to keep memory per message low),
/// so the cap bounds that scan.
pub const MAX_MAILBOX_MESSAGES: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid value in environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid setting: {0}")]
    Invalid(String),
}

/// When the journal is flushed to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Every response that changed state waits for the fsync covering its record (group
    /// commit). A crash loses nothing that was answered.
    Always,
    /// fsync every `fsync_interval`; responses do not wait. A crash of the machine (not just
    /// the process) can lose the changes of the last interval.
    Interval,
    /// Never fsync; the kernel writes back when it likes. A process crash loses nothing that
    /// reached the kernel; a machine crash can lose anything not yet written back.
    Never,
}

/// Where the Prometheus exporter listens, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsListen {
    Off,
    At(SocketAddr),
}

impl std::str::FromStr for MetricsListen {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        if text.eq_ignore_ascii_case("off") {
            return Ok(MetricsListen::Off);
        }
        text.parse()
            .map(MetricsListen::At)
            .map_err(|err| format!("expected ADDR:PORT or off, got {text:?}: {err}"))
    }
}

impl std::fmt::Display for MetricsListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsListen::Off => f.write_str("off"),
            MetricsListen::At(addr) => write!(f, "{addr}"),
        }
    }
}

impl Serialize for MetricsListen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MetricsListen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    // --- Network ---
    /// Address the relay listens on for nodes.
    pub listen: SocketAddr,
    /// Connections the kernel may hold completed but not yet accepted (the `listen(2)`
    /// backlog; Linux caps it at `net.core.somaxconn`). Past it, new connections' SYNs are
    /// dropped and their clients retry after a second: a burst of connections (a flood, many
    /// nodes reconnecting after a restart) must fit.
    pub listen_backlog: u32,
    /// Directory holding the relay's identity key and its store.
    pub data_dir: PathBuf,
    /// Address of the Prometheus exporter (`off` disables it).
    pub metrics_listen: MetricsListen,

    // --- Transport limits ---
    /// Largest frame body accepted, in bytes; announced in `Welcome`. Longer frames close the
    /// connection before their body is read.
    pub max_frame_len: u32,
    /// Largest `Send.payload` accepted, in bytes; announced in `Welcome`.
    pub max_payload_len: u32,
    /// Open connections at once; further connections are closed at accept.
    pub max_connections: usize,
    /// Handshakes whose crypto runs at once; connections whose whole `Init` has arrived wait
    /// for a turn, served round-robin by source address.
    pub max_handshakes_in_flight: usize,
    /// Time from accept to a completed handshake.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Time from accept until the whole `Init` must have arrived (at most `handshake_timeout`);
    /// no handshake slot is held meanwhile.
    #[serde(with = "humantime_serde")]
    pub init_timeout: Duration,
    /// Connections not yet authenticated, relay-wide; when full, the oldest is closed to make
    /// room for a new one.
    pub max_unauthenticated: usize,
    /// Connections not yet authenticated per source address (IPv6 counted per /64); more are
    /// closed at accept.
    pub max_unauthenticated_per_ip: usize,
    /// Bytes of partly received frames all connections together may hold; a connection that
    /// would need more waits until others complete theirs.
    pub max_inbound_buffer_bytes: usize,
    /// A frame whose first byte arrived must be complete within this.
    #[serde(with = "humantime_serde")]
    pub frame_timeout: Duration,
    /// Requests one session may have waiting for their answers (pipelining).
    pub max_pipelined_requests: usize,
    /// Ephemeral keys of recent `Init`s remembered to refuse replays.
    pub replay_cache_capacity: usize,
    /// Handshake attempts per source IP address (token bucket).
    pub handshake_rate_per_ip: Rate,
    /// Source addresses tracked by the handshake rate limiter at once.
    pub max_tracked_ips: usize,

    // --- Session timers ---
    /// A peer may ping at most once per this interval (BOTD #2: 30 s); a second ping closes it.
    /// Announced in `Welcome`; at least 1s (shorter than 30s only for tests).
    #[serde(with = "humantime_serde")]
    pub ping_min_interval: Duration,
    /// The relay pings a peer it has heard nothing from for this long.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// How long the relay waits for the Pong before closing the session.
    #[serde(with = "humantime_serde")]
    pub pong_timeout: Duration,
    /// A session whose peer sent nothing but Pongs for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A write to a peer that makes no progress for this long closes the session.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Bytes of pushes queued towards one session, counted as encoded `Frame` plaintexts (no tag,
    /// no length prefix); past this it gets `SLOW_CONSUMER` and is closed.
    pub max_outbound_bytes: usize,
    /// On shutdown, how long sessions get to flush before they are dropped.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,

    // --- Relay application ---
    /// Verify every `Send.sender_signature` at the relay. Off by default: the session already
    /// authenticates the sender, recipients verify end to end, and a verify per message costs
    /// about as much as the rest of a send.
    pub verify_message_signatures: bool,
    /// Messages older than this are removed, delivered or not.
    #[serde(with = "humantime_serde")]
    pub message_ttl: Duration,
    /// How often expired messages are swept.
    #[serde(with = "humantime_serde")]
    pub expiry_interval: Duration,
    /// Messages one mailbox (identity + device) may hold; more get `MAILBOX_FULL`. At most
    /// [`MAX_MAILBOX_MESSAGES`].
    pub mailbox_max_messages: usize,
    /// Payload bytes one mailbox may hold; more get `MAILBOX_FULL`.
    pub mailbox_max_bytes: usize,
    /// Deliveries in flight (pushed, not acked) per subscription; more follow as acks arrive.
    pub max_unacked: usize,
    /// Devices one identity may have registered at once.
    pub max_devices_per_identity: usize,
    /// Largest key, signature or other key-material field accepted, in bytes.
    pub max_key_len: usize,
    /// One-time prekeys accepted in one `Register` or `UploadPreKeys`.
    pub max_prekeys_per_upload: usize,
    /// One-time prekeys stored per device.
    pub max_prekeys_per_device: usize,
    /// When a fetch leaves a device with fewer one-time prekeys than this, its owner is told.
    pub prekey_low_threshold: u32,
    /// Contacts one identity may keep.
    pub max_contacts: usize,
    /// Unexpired tickets one identity may hold.
    pub max_tickets_per_identity: usize,
    /// Longest ticket lifetime a `CreateTicket` may ask for.
    #[serde(with = "humantime_serde")]
    pub max_ticket_ttl: Duration,
    /// Most uses a single ticket may allow.
    pub max_ticket_uses: u32,
    /// Sends per sender identity (token bucket).
    pub send_rate_per_identity: Rate,
    /// Sends per sender -> recipient pair (token bucket).
    pub send_rate_per_pair: Rate,
    /// Sends per source address (IPv6 per /64) of the sending session.
    pub send_rate_per_ip: Rate,
    /// `AckMessages` requests per identity.
    pub ack_rate_per_identity: Rate,
    /// Account changes (`Register`, `Unregister`, `UploadPreKeys`, `SetPolicy`, `AddContact`,
    /// `RemoveContact`, `CreateTicket`) per identity.
    pub change_rate_per_identity: Rate,
    /// The same account changes per source address.
    pub change_rate_per_ip: Rate,
    /// Prekey fetches per requesting identity (token bucket).
    pub prekey_fetch_rate: Rate,
    /// Prekey fetches per source address.
    pub prekey_fetch_rate_per_ip: Rate,
    /// One-time prekeys handed out per target device; past it, bundles go out without one.
    pub one_time_prekey_rate_per_device: Rate,
    /// Keys tracked by each application rate limiter at once.
    pub max_rate_limited_keys: usize,
    /// Independent locks the in-memory store is split into.
    pub store_shards: usize,
    /// Identities (accounts) the relay stores at most; more registrations get
    /// `QUOTA_EXCEEDED`.
    pub max_identities: usize,
    /// Payload bytes stored in all mailboxes together; more sends get `QUOTA_EXCEEDED`.
    pub max_stored_bytes: u64,
    /// Payload bytes stored in the mailboxes of one identity (all its devices together).
    pub max_identity_stored_bytes: usize,
    /// An account none of whose sessions connected or asked anything for this long is removed.
    #[serde(with = "humantime_serde")]
    pub account_ttl: Duration,

    // --- Durability ---
    /// When the journal is fsynced: `always`, `interval` or `never` (see README).
    pub fsync: FsyncPolicy,
    /// The fsync period under `fsync = "interval"`.
    #[serde(with = "humantime_serde")]
    pub fsync_interval: Duration,
    /// A journal segment is closed and a new one started past this size.
    pub journal_segment_bytes: u64,
    /// Journal bytes waiting for the writer; past this, changes wait for the disk.
    pub journal_max_pending_bytes: usize,
    /// A snapshot is written this often (and on graceful shutdown).
    #[serde(with = "humantime_serde")]
    pub snapshot_interval: Duration,
    /// A snapshot is also written once this many journal bytes accumulated since the last one.
    pub snapshot_journal_bytes: u64,

    // --- Store backend ---
    /// Where the relay keeps its state: `embedded` (memory, journal and snapshots under
    /// `data_dir`) or `nats://HOST:PORT[,HOST:PORT…]` (a NATS JetStream cluster shared by any
    /// number of relays; see docs/SCALING.md).
    pub store: String,
    /// JetStream replicas of every stream the relay creates: 1, or 3 on a cluster of at least
    /// three servers. A relay refuses to start on existing streams with other replicas, and
    /// says how to change them.
    pub nats_replicas: usize,
    /// How long one JetStream request (publish acknowledgement, read, compare-and-set) may take
    /// before the request that needed it fails with `INTERNAL`; also the connect timeout.
    #[serde(with = "humantime_serde")]
    pub nats_request_timeout: Duration,
    /// Prefix of every stream and subject name on the cluster (letters, digits, `_`,
    /// `-`): relays with the same prefix share one state, other prefixes are independent.
    pub nats_prefix: String,
    /// How many JetStream streams hold the mailboxes (each mailbox is in one, chosen by its
    /// id): each stream has one leader, so several spread the writes over the cluster's nodes.
    /// Changing it moves no message: set it before the first start.
    pub nats_streams: usize,
    /// How long JetStream recognises a retried `Send` (same sender and nonce) as the message it
    /// stored, and answers `duplicate: true` (at most `message_ttl`). Each message sent in
    /// this window costs the stream leader about 200 bytes of memory (nats-server 2.15, Go's
    /// heap included), and the more the window holds, the more CPU per message its garbage
    /// collector spends (docs/SCALING.md, "Running on a NATS cluster").
    #[serde(with = "humantime_serde")]
    pub nats_duplicate_window: Duration,
}

/// The `store` setting, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreBackend {
    Embedded,
    /// NATS server URLs (`nats://HOST:PORT` each).
    Nats(Vec<String>),
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
            listen_backlog: 4096,
            data_dir: PathBuf::from("./botd-data"),
            metrics_listen: MetricsListen::At(SocketAddr::from(([127, 0, 0, 1], 9946))),
            max_frame_len: 1 << 20,
            max_payload_len: 256 << 10,
            max_connections: 10_000,
            max_handshakes_in_flight: 512,
            handshake_timeout: Duration::from_secs(10),
            init_timeout: Duration::from_secs(5),
            max_unauthenticated: 4096,
            max_unauthenticated_per_ip: 64,
            max_inbound_buffer_bytes: 256 << 20,
            frame_timeout: Duration::from_secs(30),
            max_pipelined_requests: 256,
            replay_cache_capacity: 100_000,
            handshake_rate_per_ip: Rate::new(50.0, 512),
            max_tracked_ips: 65_536,
            ping_min_interval: Duration::from_secs(30),
            ping_interval: Duration::from_secs(60),
            pong_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(600),
            write_timeout: Duration::from_secs(30),
            max_outbound_bytes: 8 << 20,
            shutdown_grace: Duration::from_secs(5),
            verify_message_signatures: false,
            message_ttl: Duration::from_secs(30 * 24 * 3600),
            expiry_interval: Duration::from_secs(10),
            mailbox_max_messages: 10_000,
            mailbox_max_bytes: 64 << 20,
            max_unacked: 256,
            max_devices_per_identity: 16,
            max_key_len: 256,
            max_prekeys_per_upload: 100,
            max_prekeys_per_device: 1_000,
            prekey_low_threshold: 10,
            max_contacts: 10_000,
            max_tickets_per_identity: 1_000,
            max_ticket_ttl: Duration::from_secs(30 * 24 * 3600),
            max_ticket_uses: 1_000,
            send_rate_per_identity: Rate::new(200.0, 1_000),
            send_rate_per_pair: Rate::new(50.0, 200),
            send_rate_per_ip: Rate::new(1_000.0, 5_000),
            ack_rate_per_identity: Rate::new(1_000.0, 5_000),
            change_rate_per_identity: Rate::new(10.0, 100),
            change_rate_per_ip: Rate::new(50.0, 500),
            prekey_fetch_rate: Rate::new(5.0, 100),
            prekey_fetch_rate_per_ip: Rate::new(20.0, 200),
            one_time_prekey_rate_per_device: Rate::new(1.0, 20),
            max_rate_limited_keys: 100_000,
            store_shards: 256,
            max_identities: 1_000_000,
            max_stored_bytes: 4 << 30,
            max_identity_stored_bytes: 256 << 20,
            account_ttl: Duration::from_secs(90 * 24 * 3600),
            fsync: FsyncPolicy::Always,
            fsync_interval: Duration::from_millis(10),
            journal_segment_bytes: 64 << 20,
            journal_max_pending_bytes: 64 << 20,
            snapshot_interval: Duration::from_secs(300),
            snapshot_journal_bytes: 256 << 20,
            store: "embedded".into(),
            nats_replicas: 1,
            nats_request_timeout: Duration::from_secs(5),
            nats_prefix: "botd".into(),
            nats_streams: 3,
            nats_duplicate_window: Duration::from_secs(120),
        }
    }
}

impl Config {
    /// Defaults, overlaid with the TOML file (if any), then with `BOTD_*` variables from `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table = toml::Table::try_from(Config::default()).expect("config serializes");
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            let parsed: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source,
            })?;
            table = toml::Table::try_from(parsed).expect("config serializes");
        }
        for (var, value) in env {
            let Some(field) = var.strip_prefix("BOTD_") else {
                continue;
            };
            let key = field.to_ascii_lowercase();
            let Some(slot) = table.get_mut(&key) else {
                continue;
            };
            *slot = parse_env_value(slot, &value).map_err(|message| ConfigError::Env {
                var: var.clone(),
                message,
            })?;
        }
        let config: Config = table
            .try_into()
            .map_err(|err: toml::de::Error| ConfigError::Env {
                var: "BOTD_*".into(),
                message: err.to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }

    /// The store backend `store` names.
    pub fn store_backend(&self) -> Result<StoreBackend, ConfigError> {
        let text = self.store.trim();
        if text == "embedded" {
            return Ok(StoreBackend::Embedded);
        }
        let Some(rest) = text.strip_prefix("nats://") else {
            return Err(ConfigError::Invalid(format!(
                "store must be `embedded` or `nats://HOST:PORT[,HOST:PORT…]`, got {text:?}"
            )));
        };
        let mut urls = Vec::new();
        for part in rest.split(',') {
            let host_port = part.trim().trim_start_matches("nats://");
            let valid = host_port
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                return Err(ConfigError::Invalid(format!(
                    "store: {part:?} is not HOST:PORT"
                )));
            }
            urls.push(format!("nats://{host_port}"));
        }
        Ok(StoreBackend::Nats(urls))
    }

    /// Rejects settings that cannot work together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |msg: &str| Err(ConfigError::Invalid(msg.to_owned()));
        self.store_backend()?;
        if self.nats_replicas != 1 && self.nats_replicas != 3 {
            return fail("nats_replicas must be 1 or 3");
        }
        if !(1..=64).contains(&self.nats_streams) {
            return fail("nats_streams must be between 1 and 64");
        }
        if self.nats_duplicate_window < Duration::from_secs(1)
            || self.nats_duplicate_window > Duration::from_secs(24 * 3600)
        {
            return fail("nats_duplicate_window must be between 1s and 24h");
        }
        if self.nats_request_timeout < Duration::from_millis(100)
            || self.nats_request_timeout > Duration::from_secs(600)
        {
            return fail("nats_request_timeout must be between 100ms and 10m");
        }
        if self.nats_prefix.is_empty()
            || self.nats_prefix.len() > 32
            || !self
                .nats_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return fail("nats_prefix must be 1 to 32 letters, digits, `_` or `-`");
        }
        if self.max_frame_len < 1024 {
            return fail("max_frame_len must be at least 1024");
        }
        if u64::from(self.max_payload_len) + 4096 > u64::from(self.max_frame_len) {
            return fail("max_payload_len plus 4096 bytes of envelope must fit in max_frame_len");
        }
        if self.listen_backlog == 0 {
            return fail("listen_backlog must be positive");
        }
        if self.max_connections == 0 || self.max_handshakes_in_flight == 0 {
            return fail("max_connections and max_handshakes_in_flight must be positive");
        }
        if self.ping_min_interval < Duration::from_secs(1) {
            return fail("ping_min_interval must be at least 1s");
        }
        if self.idle_timeout < 2 * self.ping_min_interval + Duration::from_secs(2) {
            return fail(
                "idle_timeout must leave room for two pings: at least 2 × ping_min_interval + 2s",
            );
        }
        if self.ping_interval < self.ping_min_interval {
            return fail("ping_interval must not be shorter than ping_min_interval");
        }
        if self.store_shards == 0 || self.max_unacked == 0 {
            return fail("store_shards and max_unacked must be positive");
        }
        if self.mailbox_max_messages > MAX_MAILBOX_MESSAGES {
            return Err(ConfigError::Invalid(format!(
                "mailbox_max_messages may be at most {MAX_MAILBOX_MESSAGES}: every send scans its mailbox's nonces"
            )));
        }
        if self.max_outbound_bytes < 4 * self.max_frame_len as usize {
            return fail(
                "max_outbound_bytes must hold at least 4 × max_frame_len, so that backlog pacing \
                 (which pauses at half of it) never stalls on one large frame",
            );
        }
        let largest = self.largest_answer_len();
        if largest + botd_protocol::cipher::TAG_LEN > self.max_frame_len as usize {
            return Err(ConfigError::Invalid(format!(
                "max_frame_len ({}) is too small for the largest answer these limits allow \
                 ({largest} bytes plus the 16-byte tag: a PreKeyBundles of \
                 max_devices_per_identity devices with max_key_len keys)",
                self.max_frame_len
            )));
        }
        if self.max_pipelined_requests == 0 || self.max_unauthenticated == 0 {
            return fail("max_pipelined_requests and max_unauthenticated must be positive");
        }
        if self.max_unauthenticated_per_ip == 0 || self.max_inbound_buffer_bytes < 64 << 10 {
            return fail(
                "max_unauthenticated_per_ip must be positive and max_inbound_buffer_bytes at least 64 KiB",
            );
        }
        for (name, rate) in [
            ("handshake_rate_per_ip", self.handshake_rate_per_ip),
            ("send_rate_per_identity", self.send_rate_per_identity),
            ("send_rate_per_pair", self.send_rate_per_pair),
            ("send_rate_per_ip", self.send_rate_per_ip),
            ("ack_rate_per_identity", self.ack_rate_per_identity),
            ("change_rate_per_identity", self.change_rate_per_identity),
            ("change_rate_per_ip", self.change_rate_per_ip),
            ("prekey_fetch_rate", self.prekey_fetch_rate),
            ("prekey_fetch_rate_per_ip", self.prekey_fetch_rate_per_ip),
            (
                "one_time_prekey_rate_per_device",
                self.one_time_prekey_rate_per_device,
            ),
        ] {
            if rate.burst == 0 || rate.per_second < 0.0 {
                return Err(ConfigError::Invalid(format!(
                    "{name} needs a positive burst and a non-negative rate"
                )));
            }
        }
        Ok(())
    }
}

impl Config {
    /// The exact encoded size of the largest answer or push under these limits (PROTOCOL.md
    /// §3): a `PreKeyBundles` with a bundle for each of `max_devices_per_identity` devices,
    /// every key field at `max_key_len` (a `Deliver` stays below `max_payload_len` + 4096,
    /// checked separately).
    pub fn largest_answer_len(&self) -> usize {
        botd_protocol::message::largest_bundles_frame_len(
            self.max_devices_per_identity,
            self.max_key_len,
        )
    }
}

/// Reads an environment value with the type of the field it replaces.
fn parse_env_value(current: &toml::Value, text: &str) -> Result<toml::Value, String> {
    use toml::Value;
    match current {
        Value::Integer(_) => text
            .trim()
            .replace('_', "")
            .parse()
            .map(Value::Integer)
            .map_err(|err| format!("expected an integer: {err}")),
        Value::Float(_) => text
            .trim()
            .parse()
            .map(Value::Float)
            .map_err(|err| format!("expected a number: {err}")),
        Value::Boolean(_) => text
            .trim()
            .parse()
            .map(Value::Boolean)
            .map_err(|err| format!("expected true or false: {err}")),
        Value::Table(_) => {
            // Inline-table syntax, e.g. BOTD_HANDSHAKE_RATE_PER_IP="{ per_second = 10.0, burst = 20 }".
            toml::from_str::<toml::Table>(&format!("v = {text}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .ok_or_else(|| {
                    "expected an inline table like { per_second = 10.0, burst = 20 }".to_owned()
                })
        }
        _ => Ok(Value::String(text.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let config = Config::load(None, vars(&[])).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.listen.port(), 9945);
        assert_eq!(config.handshake_timeout, Duration::from_secs(10));
        assert!(config.handshake_rate_per_ip.burst >= 256);
    }

    #[test]
    fn file_then_env_override() {
        let dir = std::env::temp_dir().join(format!("botd-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("relay.toml");
        std::fs::write(
            &path,
            "max_connections = 7\nhandshake_timeout = \"3s\"\nmetrics_listen = \"off\"\n",
        )
        .unwrap();
        let config = Config::load(
            Some(&path),
            vars(&[
                ("BOTD_MAX_CONNECTIONS", "9"),
                ("BOTD_PONG_TIMEOUT", "5s"),
                (
                    "BOTD_HANDSHAKE_RATE_PER_IP",
                    "{ per_second = 1.5, burst = 3 }",
                ),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.max_connections, 9);
        assert_eq!(config.handshake_timeout, Duration::from_secs(3));
        assert_eq!(config.pong_timeout, Duration::from_secs(5));
        assert_eq!(config.metrics_listen, MetricsListen::Off);
        assert_eq!(config.handshake_rate_per_ip, Rate::new(1.5, 3));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_values_are_named() {
        let err = Config::load(None, vars(&[("BOTD_MAX_CONNECTIONS", "many")])).unwrap_err();
        assert!(err.to_string().contains("BOTD_MAX_CONNECTIONS"), "{err}");
        let err = Config::load(None, vars(&[("BOTD_MAX_FRAME_LEN", "10")])).unwrap_err();
        assert!(err.to_string().contains("max_frame_len"), "{err}");
        let err = Config::load(None, vars(&[("BOTD_MAX_OUTBOUND_BYTES", "1000000")])).unwrap_err();
        assert!(err.to_string().contains("max_outbound_bytes"), "{err}");
        let err = Config::load(
            None,
            vars(&[
                ("BOTD_MAX_KEY_LEN", "100000"),
                ("BOTD_MAX_FRAME_LEN", "1048576"),
            ]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("largest answer"), "{err}");
        let err = Config::load(None, vars(&[("BOTD_LISTEN_BACKLOG", "0")])).unwrap_err();
        assert!(err.to_string().contains("listen_backlog"), "{err}");
        let err = Config::load(None, vars(&[("BOTD_PING_MIN_INTERVAL", "999ms")])).unwrap_err();
        assert!(err.to_string().contains("ping_min_interval"), "{err}");
        let too_many = (MAX_MAILBOX_MESSAGES + 1).to_string();
        let err =
            Config::load(None, vars(&[("BOTD_MAILBOX_MAX_MESSAGES", &too_many)])).unwrap_err();
        assert!(err.to_string().contains("mailbox_max_messages"), "{err}");
    }

    #[test]
    fn the_frame_limit_bound_is_exact() {
        // PROTOCOL.md §3: at the defaults the largest answer is 17 120 bytes, plus the tag.
        let small = |max_frame_len: &str| {
            Config::load(
                None,
                vars(&[
                    ("BOTD_MAX_FRAME_LEN", max_frame_len),
                    ("BOTD_MAX_PAYLOAD_LEN", "13000"),
                    ("BOTD_MAX_OUTBOUND_BYTES", "1048576"),
                ]),
            )
        };
        assert!(small("17136").is_ok());
        let err = small("17135").unwrap_err();
        assert!(err.to_string().contains("largest answer"), "{err}");
    }

    #[test]
    fn store_backend_is_embedded_or_a_nats_server_list() {
        assert_eq!(
            Config::default().store_backend().unwrap(),
            StoreBackend::Embedded
        );
        let config = Config::load(
            None,
            vars(&[("BOTD_STORE", "nats://10.0.0.1:4222, 10.0.0.2:4223")]),
        )
        .unwrap();
        assert_eq!(
            config.store_backend().unwrap(),
            StoreBackend::Nats(vec![
                "nats://10.0.0.1:4222".into(),
                "nats://10.0.0.2:4223".into()
            ])
        );
        for bad in [
            "nats://",
            "nats://host",
            "nats://host:port",
            "redis://x:1",
            "",
        ] {
            let err = Config::load(None, vars(&[("BOTD_STORE", bad)])).unwrap_err();
            assert!(err.to_string().contains("store"), "{bad}: {err}");
        }
        for (var, value) in [
            ("BOTD_NATS_REPLICAS", "2"),
            ("BOTD_NATS_PREFIX", "a.b"),
            ("BOTD_NATS_REQUEST_TIMEOUT", "1ms"),
        ] {
            let err = Config::load(None, vars(&[(var, value)])).unwrap_err();
            assert!(err.to_string().contains("nats_"), "{var}={value}: {err}");
        }
    }
}
