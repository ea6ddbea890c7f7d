//! Checks of requests that need no state (lengths, ranges, counts, the payload hash), turning
//! wire messages into the store's types. Run before any rate limit or store call, in the order
//! the spec lists the errors.

use std::collections::HashSet;

use super::error::RelayError;
use crate::config::Config;
use crate::store::{Identity, Registration, HASH_LEN, NONCE_LEN, TICKET_LEN};
use botd_protocol::keys::{sha256, SIGNATURE_LEN};
use botd_protocol::proto::{PreKey, Register, Send, SignedPreKey};

/// Message ids one `AckMessages` may name.
pub const MAX_ACK_IDS: usize = 4096;

/// An identity named in a request field, or `BAD_REQUEST` naming the field.
pub fn identity_field(bytes: &[u8], field: &str) -> Result<Identity, RelayError> {
    bytes
        .try_into()
        .map_err(|_| RelayError::bad_request(format!("{field} must be a 33-byte key")))
}

fn check_key(config: &Config, field: &'static str, bytes: &[u8]) -> Result<(), RelayError> {
    if bytes.is_empty() || bytes.len() > config.max_key_len {
        return Err(RelayError::bad_request(format!(
            "{field} must be 1 to {} bytes",
            config.max_key_len
        )));
    }
    Ok(())
}

/// Checks prekey material: key lengths, the per-request count, distinct one-time ids.
pub fn prekeys(
    config: &Config,
    signed: Option<&SignedPreKey>,
    one_time: &[PreKey],
) -> Result<(), RelayError> {
    if let Some(signed) = signed {
        check_key(config, "signed_prekey.public_key", &signed.public_key)?;
        check_key(config, "signed_prekey.signature", &signed.signature)?;
    }
    if one_time.len() > config.max_prekeys_per_upload {
        return Err(RelayError::bad_request(format!(
            "at most {} one-time prekeys per request",
            config.max_prekeys_per_upload
        )));
    }
    let mut ids = HashSet::with_capacity(one_time.len());
    for key in one_time {
        check_key(config, "one_time_prekeys.public_key", &key.public_key)?;
        if !ids.insert(key.id) {
            return Err(RelayError::bad_request(format!(
                "one-time prekey id {} appears twice",
                key.id
            )));
        }
    }
    Ok(())
}

/// A `Register` as the store's registration.
pub fn registration(config: &Config, req: Register) -> Result<Registration, RelayError> {
    if req.device_id == 0 {
        return Err(RelayError::bad_request("device_id must be at least 1"));
    }
    check_key(config, "identity_key", &req.identity_key)?;
    let signed = req
        .signed_prekey
        .ok_or_else(|| RelayError::bad_request("signed_prekey is required"))?;
    prekeys(config, Some(&signed), &req.one_time_prekeys)?;
    Ok(Registration {
        device: req.device_id,
        registration_id: req.registration_id,
        identity_key: req.identity_key,
        signed_prekey: signed,
        one_time_prekeys: req.one_time_prekeys,
    })
}

/// The fixed-size fields of a validated `Send`.
#[derive(Debug, Clone, Copy)]
pub struct SendFields {
    pub recipient: Identity,
    pub nonce: [u8; NONCE_LEN],
    pub payload_hash: [u8; HASH_LEN],
    pub signature: [u8; SIGNATURE_LEN],
    pub ticket: Option<[u8; TICKET_LEN]>,
}

/// Checks a `Send` before any limit or lock: sizes and lengths (the payload hash's length
/// among them), the ticket's form, then the payload hash itself.
pub fn send(req: &Send, max_payload_len: usize) -> Result<SendFields, RelayError> {
    if req.payload.len() > max_payload_len {
        return Err(RelayError::PayloadTooLarge {
            len: req.payload.len(),
            max: max_payload_len,
        });
    }
    let recipient = identity_field(&req.recipient, "recipient")?;
    if req.recipient_device == 0 {
        return Err(RelayError::bad_request(
            "recipient_device must be at least 1",
        ));
    }
    let nonce = req.sender_nonce[..]
        .try_into()
        .map_err(|_| RelayError::bad_request("sender_nonce must be 8 bytes"))?;
    let signature = req.sender_signature[..]
        .try_into()
        .map_err(|_| RelayError::bad_request("sender_signature must be 64 bytes"))?;
    let payload_hash: [u8; HASH_LEN] = req.payload_hash[..]
        .try_into()
        .map_err(|_| RelayError::bad_request("payload_hash must be 32 bytes"))?;
    let ticket = match req.ticket.len() {
        0 => None,
        TICKET_LEN => Some(req.ticket[..].try_into().expect("16 bytes")),
        _ => return Err(RelayError::TicketInvalid),
    };
    if payload_hash != sha256(&[&req.payload]) {
        return Err(RelayError::bad_request(
            "payload_hash is not SHA-256 of the payload",
        ));
    }
    Ok(SendFields {
        recipient,
        nonce,
        payload_hash,
        signature,
        ticket,
    })
}

/// The lifetime (ms) and uses of a `CreateTicket`: 0 means one day and one use.
pub fn ticket(config: &Config, ttl_s: u32, uses: u32) -> Result<(u64, u32), RelayError> {
    let max_ttl_ms = config.max_ticket_ttl.as_millis() as u64;
    let ttl_ms = if ttl_s == 0 {
        86_400_000
    } else {
        u64::from(ttl_s) * 1000
    };
    if ttl_ms > max_ttl_ms {
        return Err(RelayError::bad_request(format!(
            "ttl_s may be at most {}",
            max_ttl_ms / 1000
        )));
    }
    let uses = uses.max(1);
    if uses > config.max_ticket_uses {
        return Err(RelayError::bad_request(format!(
            "uses may be at most {}",
            config.max_ticket_uses
        )));
    }
    Ok((ttl_ms, uses))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// A payload of `len` bytes with its hash.
    fn hashed(len: usize) -> (Bytes, Bytes) {
        let payload = Bytes::from(vec![7u8; len]);
        let hash = Bytes::copy_from_slice(&sha256(&[&payload]));
        (payload, hash)
    }

    fn request() -> Send {
        let (payload, payload_hash) = hashed(10);
        Send {
            recipient: Bytes::from(vec![2u8; 33]),
            recipient_device: 1,
            sender_device: 1,
            sender_nonce: Bytes::from(vec![1u8; 8]),
            payload_hash,
            sender_signature: Bytes::from(vec![0u8; 64]),
            payload,
            ticket: Bytes::new(),
        }
    }

    #[test]
    fn a_short_payload_hash_is_a_length_error_and_wins_over_a_bad_ticket() {
        let mut req = request();
        req.payload_hash = req.payload_hash.slice(..31);
        req.ticket = Bytes::from_static(b"short");
        let err = send(&req, 1000).unwrap_err();
        assert_eq!(
            err,
            RelayError::bad_request("payload_hash must be 32 bytes")
        );
        // A well-formed hash that does not match comes after the ticket's form.
        let mut req = request();
        req.payload_hash = Bytes::from(vec![0u8; 32]);
        req.ticket = Bytes::from_static(b"short");
        assert_eq!(send(&req, 1000).unwrap_err(), RelayError::TicketInvalid);
        req.ticket = Bytes::new();
        assert!(matches!(send(&req, 1000), Err(RelayError::BadRequest(_))));
        assert!(send(&request(), 1000).is_ok());
    }

    #[test]
    fn payload_size_is_checked_first() {
        let mut req = request();
        req.recipient = Bytes::new();
        assert!(matches!(
            send(&req, 5),
            Err(RelayError::PayloadTooLarge { len: 10, max: 5 })
        ));
    }
}
