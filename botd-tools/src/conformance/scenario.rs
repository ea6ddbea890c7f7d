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
}

impl Default for Options {
    fn default() -> Self {
        Self {
            limit: Duration::from_secs(20),
            send_retries: 3,
        }
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
    retries: u32,
) -> Result<SendOutcome, String> {
    let mut tries = 0;
    loop {
        match client.send_message(message.clone()).await {
            Ok(_) => return Ok(SendOutcome::Sent),
            Err(ClientError::Remote {
                code: ErrorCode::RateLimited,
                retry_after_ms,
                ..
            }) if tries < retries => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(retry_after_ms.clamp(1, 10_000))).await;
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
    let messages: Vec<OutgoingMessage> = PAYLOADS
        .iter()
        .map(|p| OutgoingMessage::new(me, 1, 1, p.to_vec()))
        .collect();
    let mut to_send = messages.iter();
    let mut current = to_send.next();
    let deadline = Instant::now() + options.limit;
    // Bounded in time by `options.limit` (see `run`) and in steps here.
    for _ in 0..MAX_STEPS {
        if let Some(message) = current.filter(|_| !lost) {
            match send_with_retries(&client, message, options.send_retries).await? {
                // After a reconnection the same message goes again, with the same nonce.
                SendOutcome::Lost => lost = true,
                SendOutcome::Sent => current = to_send.next(),
            }
        }
        if PAYLOADS.iter().all(|p| verified.values().any(|v| v == p)) {
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
                let fresh = seen.insert(d.message_id, ()).is_none();
                highest = highest.max(d.message_id);
                let good = d.recipient_device == 1
                    && matches!(verify_delivery(&d, &me), Ok(sender) if sender == me);
                if fresh && good {
                    verified.insert(d.message_id, d.payload.to_vec());
                }
                // Acknowledged, verified or not. On a lost connection the pushes still
                // buffered tell why it went.
                if !lost {
                    match client.ack(1, vec![d.message_id]).await {
                        Ok(_) => {}
                        Err(ClientError::Closed | ClientError::Timeout(_)) => lost = true,
                        Err(e) => return Err(format!("ack: {e}")),
                    }
                }
            }
            Some(Body::Error(e)) if e.code == ErrorCode::Replaced as i32 => {
                return Err("REPLACED: not subscribing again".into());
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
