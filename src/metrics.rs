//! Metric names (all `botd_`-prefixed) and the Prometheus exporter. The library only records
//! through the `metrics` facade; the binary decides whether an exporter is installed.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

pub const CONNECTIONS_OPEN: &str = "botd_connections_open";
pub const CONNECTIONS_REJECTED: &str = "botd_connections_rejected_total";
pub const CONNECTIONS_UNAUTHENTICATED: &str = "botd_connections_unauthenticated";
pub const HANDSHAKES_WAITING: &str = "botd_handshakes_waiting";
pub const INBOUND_BUFFER_BYTES: &str = "botd_inbound_buffer_bytes";
pub const HANDSHAKES: &str = "botd_handshakes_total";
pub const HANDSHAKE_SECONDS: &str = "botd_handshake_duration_seconds";
pub const FRAMES_IN: &str = "botd_frames_in_total";
pub const FRAMES_OUT: &str = "botd_frames_out_total";
pub const BYTES_IN: &str = "botd_bytes_in_total";
pub const BYTES_OUT: &str = "botd_bytes_out_total";
pub const SESSIONS_CLOSED: &str = "botd_sessions_closed_total";
pub const REQUESTS: &str = "botd_requests_total";
pub const MESSAGES_SENT: &str = "botd_messages_sent_total";
pub const MESSAGES_DUPLICATE: &str = "botd_messages_duplicate_total";
pub const MESSAGES_DELIVERED: &str = "botd_messages_delivered_total";
pub const MESSAGES_ACKED: &str = "botd_messages_acked_total";
pub const MESSAGES_EXPIRED: &str = "botd_messages_expired_total";
pub const MAILBOX_MESSAGES: &str = "botd_mailbox_messages";
pub const MAILBOX_BYTES: &str = "botd_mailbox_bytes";
pub const PREKEYS_HANDED_OUT: &str = "botd_prekeys_handed_out_total";
pub const PREKEYS_EXHAUSTED: &str = "botd_prekeys_exhausted_total";
pub const PREKEYS_WITHHELD: &str = "botd_prekeys_withheld_total";
pub const ACCOUNTS_REMOVED: &str = "botd_accounts_removed_total";
pub const IDENTITIES: &str = "botd_identities";
pub const JOURNAL_PENDING_BYTES: &str = "botd_journal_pending_bytes";
pub const JOURNAL_BACKPRESSURE: &str = "botd_journal_backpressure_total";
pub const STORE_DISK_BYTES: &str = "botd_store_disk_bytes";
pub const STORE_DISK_AVAILABLE_BYTES: &str = "botd_store_disk_available_bytes";
pub const RATE_LIMITED: &str = "botd_rate_limited_total";
pub const QUOTA_HITS: &str = "botd_quota_hits_total";
/// Requests of the JetStream store to the cluster, by kind.
pub const JETSTREAM_REQUESTS: &str = "botd_jetstream_requests_total";
/// Stored messages the JetStream store read back from the streams (backlogs, gets).
pub const JETSTREAM_MESSAGES_READ: &str = "botd_jetstream_messages_read_total";
/// Bytes the JetStream store's connection received from and sent to NATS.
pub const JETSTREAM_BYTES: &str = "botd_jetstream_bytes_total";
/// Byte counters of the JetStream store set right from the messages they count.
pub const JETSTREAM_COUNTER_CORRECTIONS: &str = "botd_jetstream_counter_corrections_total";

/// Installs the global recorder and serves `/metrics` on `addr`.
pub fn install_prometheus(addr: SocketAddr) -> Result<(), BuildError> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Full(HANDSHAKE_SECONDS.to_owned()),
            &[
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )?
        .install()?;
    describe();
    Ok(())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(CONNECTIONS_OPEN, "TCP connections currently open");
    describe_counter!(
        CONNECTIONS_REJECTED,
        "connections closed at accept, by reason"
    );
    describe_gauge!(
        CONNECTIONS_UNAUTHENTICATED,
        "connections accepted whose handshake has not completed"
    );
    describe_gauge!(
        HANDSHAKES_WAITING,
        "connections whose Init arrived, waiting for a turn of handshake crypto"
    );
    describe_gauge!(
        INBOUND_BUFFER_BYTES,
        Unit::Bytes,
        "bytes of partly received frames held, against max_inbound_buffer_bytes"
    );
    describe_counter!(HANDSHAKES, "handshakes by outcome and failure reason");
    describe_histogram!(
        HANDSHAKE_SECONDS,
        Unit::Seconds,
        "accept to completed handshake"
    );
    describe_counter!(FRAMES_IN, "frames received");
    describe_counter!(FRAMES_OUT, "frames sent");
    describe_counter!(
        BYTES_IN,
        Unit::Bytes,
        "bytes received, length prefixes included"
    );
    describe_counter!(
        BYTES_OUT,
        Unit::Bytes,
        "bytes sent, length prefixes included"
    );
    describe_counter!(SESSIONS_CLOSED, "connections closed, by reason");
    describe_counter!(
        REQUESTS,
        "requests by kind and outcome (ok or an error code)"
    );
    describe_counter!(MESSAGES_SENT, "messages stored for delivery");
    describe_counter!(
        MESSAGES_DUPLICATE,
        "sends answered with an existing message id"
    );
    describe_counter!(MESSAGES_DELIVERED, "Deliver pushes to subscribers");
    describe_counter!(MESSAGES_ACKED, "messages deleted by an ack");
    describe_counter!(MESSAGES_EXPIRED, "messages removed by the retention TTL");
    describe_gauge!(MAILBOX_MESSAGES, "messages stored in all mailboxes");
    describe_gauge!(
        MAILBOX_BYTES,
        Unit::Bytes,
        "payload bytes stored in all mailboxes"
    );
    describe_counter!(PREKEYS_HANDED_OUT, "one-time prekeys handed out");
    describe_counter!(
        PREKEYS_WITHHELD,
        "bundles handed out without a one-time prekey because of the per-device rate"
    );
    describe_counter!(
        ACCOUNTS_REMOVED,
        "accounts removed for being idle past account_ttl"
    );
    describe_gauge!(IDENTITIES, "identities with a registered device");
    describe_gauge!(
        JOURNAL_PENDING_BYTES,
        Unit::Bytes,
        "journal bytes waiting for the disk"
    );
    describe_counter!(
        JOURNAL_BACKPRESSURE,
        "times a session waited because the journal was behind"
    );
    describe_counter!(
        PREKEYS_EXHAUSTED,
        "bundles handed out without a one-time prekey"
    );
    describe_counter!(RATE_LIMITED, "requests refused by a rate limit, by limit");
    describe_counter!(
        QUOTA_HITS,
        "requests refused by a quota or size limit, by kind"
    );
    describe_counter!(
        JETSTREAM_REQUESTS,
        "requests of the JetStream store to NATS, by kind"
    );
    describe_counter!(
        JETSTREAM_MESSAGES_READ,
        "stored messages the JetStream store read back from the streams"
    );
    describe_counter!(
        JETSTREAM_BYTES,
        Unit::Bytes,
        "bytes between the JetStream store and NATS, by direction (in, out)"
    );
    describe_counter!(
        JETSTREAM_COUNTER_CORRECTIONS,
        "mailbox byte counters of the JetStream store set right from the stored messages, by when (settled, before_refusal)"
    );
}
