//! Messages: `botd send`, `botd listen` (subscribe, print, verify, ack) and `botd get`, and how
//! a delivered message is shown.

use std::path::PathBuf;

use botd_client::{verify_delivery, OutgoingMessage};
use botd_protocol::keys::PublicKeyBytes;
use botd_protocol::proto::{self, Body};
use bytes::Bytes;
use serde_json::{json, Value};

use super::error::CliError;
use super::keys::parse_pubkey;
use super::output::time;
use super::session::connect;
use super::Context;

/// `botd send`: one message to `PUBKEY[:DEVICE]`, from `--text` or `--file`.
pub async fn send(
    ctx: &Context,
    to: &str,
    text: Option<String>,
    file: Option<PathBuf>,
    device: u32,
    ticket: Option<String>,
) -> Result<(), CliError> {
    let (recipient, recipient_device) = match to.rsplit_once(':') {
        Some((key, dev)) => (
            parse_pubkey(key)?,
            dev.parse()
                .map_err(|_| CliError::BadDevice(to.to_owned()))?,
        ),
        None => (parse_pubkey(to)?, 1),
    };
    let payload = match (text, file) {
        (Some(text), _) => Bytes::from(text.into_bytes()),
        (None, Some(path)) => {
            Bytes::from(std::fs::read(&path).map_err(|source| CliError::ReadFile { path, source })?)
        }
        (None, None) => return Err(CliError::NoPayload),
    };
    let s = connect(ctx, &ctx.relay).await?;
    let mut message = OutgoingMessage::new(recipient, recipient_device, device, payload);
    if let Some(ticket) = ticket {
        message.ticket = Bytes::from(hex::decode(ticket.trim()).map_err(CliError::BadTicket)?);
    }
    let nonce = hex::encode(message.nonce);
    let sent = s
        .client
        .send_message(message)
        .await
        .map_err(CliError::request("send"))?;
    ctx.out.emit(
        format!(
            "sent message {} to {recipient}:{recipient_device}{}",
            sent.message_id,
            if sent.duplicate { " (duplicate)" } else { "" }
        ),
        json!({
            "message_id": sent.message_id,
            "duplicate": sent.duplicate,
            "recipient": recipient.to_hex(),
            "recipient_device": recipient_device,
            "sender_device": device,
            "sender_nonce": nonce,
        }),
    );
    Ok(())
}

/// `botd listen`: subscribes to a device's mailbox and prints, verifies and (unless `no_ack`)
/// acknowledges each message, until `count` messages or the end of the session.
pub async fn listen(
    ctx: &Context,
    device: u32,
    after: u64,
    no_ack: bool,
    count: Option<u64>,
) -> Result<(), CliError> {
    let mut s = connect(ctx, &ctx.relay).await?;
    let subscribed = s
        .client
        .subscribe(device, after)
        .await
        .map_err(CliError::request("subscribe"))?;
    eprintln!(
        "listening on device {device} (mailbox last id {}); Ctrl-C to stop",
        subscribed.last_id
    );
    let me = *s.identity.public();
    let mut received = 0u64;
    while count.is_none_or(|limit| received < limit) {
        let Some(push) = s.client.next_push().await else {
            return Err(CliError::ConnectionClosed);
        };
        match push.body {
            Some(Body::Deliver(deliver)) => {
                let (text, value) = delivery(&deliver, &me);
                ctx.out.emit(text, value);
                if !no_ack {
                    s.client
                        .ack(device, vec![deliver.message_id])
                        .await
                        .map_err(CliError::request("ack"))?;
                }
                received += 1;
            }
            Some(Body::PreKeysLow(low)) => eprintln!(
                "note: device {} has {} one-time prekeys left",
                low.device_id, low.count
            ),
            Some(Body::Error(error)) => {
                return Err(CliError::SessionEnded {
                    code: error.code,
                    message: error.message,
                })
            }
            other => eprintln!("note: unexpected push {other:?}"),
        }
    }
    Ok(())
}

/// `botd get`: one stored message by id.
pub async fn get(ctx: &Context, id: u64, device: u32) -> Result<(), CliError> {
    let s = connect(ctx, &ctx.relay).await?;
    let deliver = s
        .client
        .get_message(device, id)
        .await
        .map_err(CliError::request("get"))?;
    let (text, value) = delivery(&deliver, s.identity.public());
    ctx.out.emit(text, value);
    Ok(())
}

/// The payload as text when it is printable, else as `0x` and hex.
fn show_payload(payload: &[u8]) -> String {
    match std::str::from_utf8(payload) {
        Ok(text)
            if !text
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t') =>
        {
            text.to_owned()
        }
        _ => format!("0x{}", hex::encode(payload)),
    }
}

/// A delivered message as the terminal shows it, and as JSON with the same fields.
fn delivery(deliver: &proto::Deliver, me: &PublicKeyBytes) -> (String, Value) {
    let verified = verify_delivery(deliver, me);
    let check = match &verified {
        Ok(_) => "signature ok".to_owned(),
        Err(err) => format!("SIGNATURE INVALID: {err}"),
    };
    let text = format!(
        "#{} from {}:{} at {} ({} bytes, {check}): {}",
        deliver.message_id,
        hex::encode(&deliver.sender),
        deliver.sender_device,
        time(deliver.received_at_ms),
        deliver.payload.len(),
        show_payload(&deliver.payload)
    );
    let value = json!({
        "message_id": deliver.message_id,
        "sender": hex::encode(&deliver.sender),
        "sender_device": deliver.sender_device,
        "recipient_device": deliver.recipient_device,
        "received_at": time(deliver.received_at_ms),
        "received_at_ms": deliver.received_at_ms,
        "payload_len": deliver.payload.len(),
        "signature_ok": verified.is_ok(),
        "signature_error": verified.err().map(|e| e.to_string()),
        "sender_nonce": hex::encode(&deliver.sender_nonce),
        // The payload as text when it is UTF-8, and always as hex.
        "text": std::str::from_utf8(&deliver.payload).ok(),
        "payload": hex::encode(&deliver.payload),
    });
    (text, value)
}
