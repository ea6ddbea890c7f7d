//! The node scenario of docs/CONFORMANCE.md, run with this crate's [`Client`]: what the client
//! role expects node software to do on each connection.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use botd_client::{verify_delivery, Client, ClientError, ClientOptions, OutgoingMessage};
use botd_protocol::keys::{KeyPair, PublicKeyBytes};
use botd_protocol::proto::{Body, ErrorCode};

/// The payloads the scenario sends to itself.
pub const PAYLOADS: [&[u8]; 2] = [b"botd conformance 1", b"botd conformance 2"];

#[derive(Debug, Clone)]
pub struct Options {
    /// Bound of the whole scenario.
    pub limit: Duration,
    /// Retries of one `Send` after `RATE_LIMITED`.
    pub send_retries: u32,
    /// Rules to break on purpose (none by default): the suite's own faulty nodes.
    pub faults: NodeFaults,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            limit: Duration::from_secs(20),
            send_retries: 3,
            faults: NodeFaults::default(),
        }
    }
}

/// Rules of PROTOCOL.md the scenario's node breaks on purpose, one per field (all off: a
/// correct node). The suite's tests run the client role against each, and the case meant for
/// the rule must fail (docs/CONFORMANCE.md lists them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeFaults {
    /// Takes a `Deliver` whatever its `recipient_device` (§8.4).
    pub no_device_check: bool,
    /// Checks the payload hash but not the signature (§8.4).
    pub no_signature_check: bool,
    /// Checks the signature but not the payload hash (§8.4).
    pub no_hash_check: bool,
    /// Accepts the high-S twin of a valid signature (§2, §8.4).
    pub lenient_high_s: bool,
    /// Verifies with the message's sender as recipient, not itself (§8.4).
    pub sender_as_recipient: bool,
    /// Counts a message id it has already received again (§8.5).
    pub no_dedup: bool,
    /// Subscribes again after `REPLACED` (§8.4).
    pub resubscribe_on_replaced: bool,
    /// Sends a refused `Send` again at once, not after `retry_after_ms` (§8.1).
    pub retry_at_once: bool,
    /// Sends a refused `Send` again with a new nonce (§8.3).
    pub retry_new_nonce: bool,
    /// Acknowledges nothing (§8.4).
    pub no_acks: bool,
    /// Sends both messages with one nonce (§8.3).
    pub one_nonce: bool,
    /// Closes without unregistering (the scenario's last step).
    pub no_unregister: bool,
}

impl NodeFaults {
    /// The faults by name, as docs/CONFORMANCE.md lists them.
    pub fn named(name: &str) -> Option<Self> {
        let mut f = Self::default();
        let flag = match name {
            "node-no-device-check" => &mut f.no_device_check,
            "node-no-signature-check" => &mut f.no_signature_check,
            "node-no-hash-check" => &mut f.no_hash_check,
            "node-lenient-high-s" => &mut f.lenient_high_s,
            "node-sender-as-recipient" => &mut f.sender_as_recipient,
            "node-no-dedup" => &mut f.no_dedup,
            "node-resubscribes-on-replaced" => &mut f.resubscribe_on_replaced,
            "node-retries-at-once" => &mut f.retry_at_once,
            "node-retries-with-new-nonce" => &mut f.retry_new_nonce,
            "node-no-acks" => &mut f.no_acks,
            "node-one-nonce" => &mut f.one_nonce,
            "node-skips-the-last-step" => &mut f.no_unregister,
            _ => return None,
        };
        *flag = true;
        Some(f)
    }

    /// Whether the node takes `d` as a verified message for its device 1.
    fn verifies(&self, d: &botd_protocol::proto::Deliver, me: &PublicKeyBytes) -> bool {
        if *self == Self::default() {
            return d.recipient_device == 1 && verify_delivery(d, me).is_ok();
        }
        let Ok(sender) = PublicKeyBytes::parse(&d.sender) else {
            return false;
        };
        let hash_ok = d.payload_hash[..] == botd_protocol::keys::sha256(&[&d.payload])[..];
        let recipient = if self.sender_as_recipient {
            sender
        } else {
            *me
        };
        let digest = botd_protocol::message::message_digest(
            sender.as_bytes(),
            recipient.as_bytes(),
            d.recipient_device,
            &d.sender_nonce,
            &d.payload_hash,
        );
        let signature_ok = <[u8; 64]>::try_from(&d.sender_signature[..]).is_ok_and(|sig| {
            sender.verify(&digest, &sig).is_ok()
                || (self.lenient_high_s
                    && sender
                        .verify(&digest, &botd_protocol::keys::negate_s(&sig))
                        .is_ok())
        });
        (self.no_device_check || d.recipient_device == 1)
            && (self.no_hash_check || hash_ok)
            && (self.no_signature_check || signature_ok)
    }
}

/// Runs the scenario once; `Ok` says how it ended normally, `Err` why it stopped early.
pub async fn run(
    addr: SocketAddr,
    relay: PublicKeyBytes,
    options: &Options,
) -> Result<String, String> {
    let identity = Arc::new(KeyPair::generate());
    tokio::time::timeout(options.limit, scenario(addr, relay, identity, options))
        .await
        .map_err(|_| format!("scenario not done within {:?}", options.limit))?
}

async fn connect(
    addr: SocketAddr,
    relay: PublicKeyBytes,
    identity: Arc<KeyPair>,
) -> Result<Client, String> {
    let options = ClientOptions {
        connect_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    };
    Client::connect(addr, identity, relay, options)
        .await
        .map_err(|e| format!("connect: {e}"))
}

/// How a `Send` of the scenario ended.
enum SendOutcome {
    Sent,
    /// The connection went away before the answer; the pushes still buffered say why.
    Lost,
}

async fn send_with_retries(
    client: &Client,
    message: &OutgoingMessage,
    options: &Options,
) -> Result<SendOutcome, String> {
    let mut tries = 0;
    let mut message = message.clone();
    loop {
        match client.send_message(message.clone()).await {
            Ok(_) => return Ok(SendOutcome::Sent),
            Err(ClientError::Remote {
                code: ErrorCode::RateLimited,
                retry_after_ms,
                ..
            }) if tries < options.send_retries => {
                tries += 1;
                if options.faults.retry_new_nonce {
                    message.nonce = rand::random();
                }
                if !options.faults.retry_at_once {
                    tokio::time::sleep(Duration::from_millis(retry_after_ms.clamp(1, 10_000)))
                        .await;
                }
            }
            Err(ClientError::Closed | ClientError::Timeout(_)) => return Ok(SendOutcome::Lost),
            Err(e) => return Err(format!("send: {e}")),
        }
    }
}

/// Error pushes after which the relay closes the session (§7.4).
fn ends_session(code: i32) -> bool {
    [
        ErrorCode::PingFlood,
        ErrorCode::ShuttingDown,
        ErrorCode::Timeout,
    ]
    .iter()
    .any(|c| *c as i32 == code)
}

async fn scenario(
    addr: SocketAddr,
    relay: PublicKeyBytes,
    identity: Arc<KeyPair>,
    options: &Options,
) -> Result<String, String> {
    let me = *identity.public();
    let mut client = connect(addr, relay, identity.clone()).await?;
    client
        .register(crate::conformance::probe::registration(1, 5))
        .await
        .map_err(|e| format!("register: {e}"))?;
    client
        .subscribe(1, 0)
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    // Sends run beside the delivery loop: deliveries may arrive before the second Sent.
    let mut verified: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut seen: BTreeMap<u64, ()> = BTreeMap::new();
    let mut highest = 0u64;
    let mut reconnected = false;
    // The connection is gone: no more requests, only the pushes still buffered.
    let mut lost = false;
    let mut messages: Vec<OutgoingMessage> = PAYLOADS
        .iter()
        .map(|p| OutgoingMessage::new(me, 1, 1, p.to_vec()))
        .collect();
    if options.faults.one_nonce {
        messages[1].nonce = messages[0].nonce;
    }
    let faults = options.faults;
    let mut to_send = messages.iter();
    let mut current = to_send.next();
    let deadline = Instant::now() + options.limit;
    // Bounded in time by `options.limit` (see `run`) and in steps here.
    for _ in 0..MAX_STEPS {
        if let Some(message) = current.filter(|_| !lost) {
            match send_with_retries(&client, message, options).await? {
                // After a reconnection the same message goes again, with the same nonce.
                SendOutcome::Lost => lost = true,
                SendOutcome::Sent => current = to_send.next(),
            }
        }
        if PAYLOADS.iter().all(|p| verified.values().any(|v| v == p)) {
            if faults.no_unregister {
                return Ok("received both messages, not unregistering".into());
            }
            client
                .unregister(1)
                .await
                .map_err(|e| format!("unregister: {e}"))?;
            return Ok(format!(
                "received both messages (ids {:?})",
                verified.keys().collect::<Vec<_>>()
            ));
        }
        let wait = if current.is_some() && !lost {
            Duration::from_millis(1)
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        let push = match tokio::time::timeout(wait, client.next_push()).await {
            Err(_) if current.is_some() && !lost => continue,
            Err(_) => return Err("no more deliveries".into()),
            Ok(None) => return Err("the relay closed the connection".into()),
            Ok(Some(push)) => push,
        };
        match push.body {
            Some(Body::Deliver(d)) => {
                let fresh = seen.insert(d.message_id, ()).is_none() || faults.no_dedup;
                highest = highest.max(d.message_id);
                if fresh && faults.verifies(&d, &me) {
                    // A faulty node that counts an id twice keeps both copies.
                    let key = if faults.no_dedup {
                        d.message_id << 8 | verified.len() as u64
                    } else {
                        d.message_id
                    };
                    verified.insert(key, d.payload.to_vec());
                }
                // Acknowledged, verified or not. On a lost connection the pushes still
                // buffered tell why it went.
                if !lost && !faults.no_acks {
                    match client.ack(1, vec![d.message_id]).await {
                        Ok(_) => {}
                        Err(ClientError::Closed | ClientError::Timeout(_)) => lost = true,
                        Err(e) => return Err(format!("ack: {e}")),
                    }
                }
            }
            Some(Body::Error(e)) if e.code == ErrorCode::Replaced as i32 => {
                if !faults.resubscribe_on_replaced {
                    return Err("REPLACED: not subscribing again".into());
                }
                client
                    .subscribe(1, highest)
                    .await
                    .map_err(|e| format!("subscribe after REPLACED: {e}"))?;
            }
            Some(Body::Error(e)) if e.code == ErrorCode::SlowConsumer as i32 && !reconnected => {
                reconnected = true;
                drop(client);
                client = connect(addr, relay, identity.clone()).await?;
                lost = false;
                client
                    .subscribe(1, highest)
                    .await
                    .map_err(|e| format!("subscribe after SLOW_CONSUMER: {e}"))?;
            }
            Some(Body::Error(e))
                if e.code == ErrorCode::SlowConsumer as i32 || ends_session(e.code) =>
            {
                return Err(format!(
                    "relay pushed {}",
                    crate::conformance::probe::code_name(e.code)
                ));
            }
            // PreKeysLow, error codes it does not know, and pushes it does not understand
            // are ignored (§7.1, §7.4).
            _ => {}
        }
    }
    Err(format!("not done after {MAX_STEPS} steps"))
}

/// Sends, pushes and polls one scenario may go through.
const MAX_STEPS: usize = 100_000;
