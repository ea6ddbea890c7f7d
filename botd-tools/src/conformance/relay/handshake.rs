//! §2–§5: encodings, handshake framing, the responder's checks, the `Ack`, admission limits
//! and the key schedule.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tokio::io::AsyncWriteExt;

use super::{case, CaseDef, Ctx};
use crate::conformance::probe::RawRead;
use crate::conformance::wire::{
    describe_ack, digest3, field_bytes, initiator_accept, padding_field, InitParts,
};
use crate::conformance::{Outcome, Step};
use botd_protocol::keys::{negate_s, KeyPair, PublicKeyBytes};
use botd_protocol::proto::Ack;

/// secp256k1 group order.
const N: [u8; 32] = [
    0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFE,
    0xBA, 0xAE, 0xDC, 0xE6, 0xAF, 0x48, 0xA0, 0x3B, 0xBF, 0xD2, 0x5E, 0x8C, 0xD0, 0x36, 0x41, 0x41,
];

/// The 65-byte uncompressed form of a key.
pub(crate) fn uncompressed(key: &PublicKeyBytes) -> Bytes {
    Bytes::copy_from_slice(&key.uncompressed())
}

/// A 33-byte `0x02 ‖ x` whose x is not on the curve.
pub(crate) fn off_curve() -> Bytes {
    for x in 1u8..=255 {
        let mut k = [0u8; 33];
        k[0] = 0x02;
        k[32] = x;
        if PublicKeyBytes::parse(&k).is_err() {
            return Bytes::copy_from_slice(&k);
        }
    }
    Bytes::from(vec![0x02; 33])
}

struct Hand {
    identity: Arc<KeyPair>,
    ephemeral: KeyPair,
    parts: InitParts,
}

fn hand(cx: &Ctx) -> Hand {
    let identity = Arc::new(KeyPair::generate());
    let ephemeral = KeyPair::generate();
    let parts = InitParts::new(&identity, &ephemeral, &cx.t.key);
    Hand {
        identity,
        ephemeral,
        parts,
    }
}

/// Sends the (tampered) `Init` and expects a silent close (§4.2).
async fn refused(cx: &Ctx, h: Hand) -> Step<Outcome> {
    let mut raw = cx.raw("A").await?;
    raw.send_init(&h.parts.encode()).await?;
    raw.expect_silent_close(cx.wait()).await
}

/// Sends the `Init` and expects a working session (`Ack` and `Welcome`).
async fn accepted(cx: &Ctx, h: Hand) -> Step<Outcome> {
    let mut raw = cx.raw("A").await?;
    let body = h.parts.encode();
    raw.send_init(&body).await?;
    raw.finish(&cx.t, h.identity, &h.ephemeral, &h.parts, &body)
        .await?;
    Ok(Outcome::pass_with("Ack and Welcome received"))
}

/// Sends a correct `Init` and returns the raw `Ack` body.
async fn ack_of(cx: &Ctx) -> Step<(Hand, Bytes)> {
    let h = hand(cx);
    let mut raw = cx.raw("A").await?;
    raw.send_init(&h.parts.encode()).await?;
    match raw.read(1024, cx.wait()).await {
        RawRead::Body(b) => {
            raw.log
                .add("A", crate::conformance::Dir::In, describe_ack(&b));
            Ok((h, b.freeze()))
        }
        other => Err(Outcome::fail(format!(
            "no Ack for a correct Init: {other:?}"
        ))),
    }
}

fn set_sig(h: &mut Hand, f: impl FnOnce(&mut [u8; 64])) {
    let mut sig: [u8; 64] = h.parts.signature[..].try_into().unwrap_or([0; 64]);
    f(&mut sig);
    h.parts.signature = Bytes::copy_from_slice(&sig);
}

pub(super) fn cases() -> Vec<CaseDef> {
    vec![
        // --- §2 encodings, as the responder checks them ------------------------------------
        case!("2/sender-key-uncompressed", Must, "Init.sender_pubkey in 65-byte uncompressed form is refused silently", |cx| {
            let mut h = hand(&cx);
            h.parts.sender = uncompressed(h.identity.public());
            let id = h.identity.clone();
            h.parts.resign(&id);
            refused(&cx, h).await
        }),
        case!("2/sender-key-prefix-04", Must, "a 33-byte sender key with prefix 0x04 is refused silently", |cx| {
            let mut h = hand(&cx);
            let mut k = h.parts.sender.to_vec();
            k[0] = 0x04;
            h.parts.sender = k.into();
            let id = h.identity.clone();
            h.parts.resign(&id);
            refused(&cx, h).await
        }),
        case!("2/sender-key-off-curve", Must, "a sender key whose x is not on the curve is refused silently", |cx| {
            let mut h = hand(&cx);
            h.parts.sender = off_curve();
            refused(&cx, h).await
        }),
        case!("2/sender-key-32-bytes", Must, "a 32-byte sender key is refused silently", |cx| {
            let mut h = hand(&cx);
            h.parts.sender = h.parts.sender.slice(..32);
            refused(&cx, h).await
        }),
        case!("2/ephemeral-key-uncompressed", Must, "an uncompressed ephemeral key is refused silently", |cx| {
            let mut h = hand(&cx);
            h.parts.ephemeral = uncompressed(h.ephemeral.public());
            let id = h.identity.clone();
            h.parts.resign(&id);
            refused(&cx, h).await
        }),
        case!("2/ephemeral-key-off-curve", Must, "an ephemeral key off the curve is refused silently", |cx| {
            let mut h = hand(&cx);
            h.parts.ephemeral = off_curve();
            let id = h.identity.clone();
            h.parts.resign(&id);
            refused(&cx, h).await
        }),
        case!("2/signature-63-bytes", Must, "a 63-byte Init signature is refused silently", |cx| {
            let mut h = hand(&cx);
            h.parts.signature = h.parts.signature.slice(..63);
            refused(&cx, h).await
        }),
        case!("2/signature-65-bytes", Must, "a 65-byte Init signature is refused silently", |cx| {
            let mut h = hand(&cx);
            h.parts.signature = [&h.parts.signature[..], &[0u8][..]].concat().into();
            refused(&cx, h).await
        }),
        case!("2/signature-r-zero", Must, "an Init signature with r = 0 is refused silently", |cx| {
            let mut h = hand(&cx);
            set_sig(&mut h, |s| s[..32].fill(0));
            refused(&cx, h).await
        }),
        case!("2/signature-s-zero", Must, "an Init signature with s = 0 is refused silently", |cx| {
            let mut h = hand(&cx);
            set_sig(&mut h, |s| s[32..].fill(0));
            refused(&cx, h).await
        }),
        case!("2/signature-r-is-n", Must, "an Init signature with r = n (out of range) is refused silently", |cx| {
            let mut h = hand(&cx);
            set_sig(&mut h, |s| s[..32].copy_from_slice(&N));
            refused(&cx, h).await
        }),
        // --- §3 framing before the handshake --------------------------------------------------
        case!("3/handshake-frame-1024", Must, "an Init padded with an unknown field to exactly 1024 bytes is accepted", |cx| {
            let mut h = hand(&cx);
            let len = h.parts.encode().len();
            h.parts.trailer = padding_field(15, 1024 - len);
            if h.parts.encode().len() != 1024 {
                return Err(Outcome::fail("suite could not pad the Init to 1024 bytes"));
            }
            accepted(&cx, h).await
        }),
        case!("3/handshake-frame-1025", Must, "a handshake frame of 1025 bytes is refused without a reply", |cx| {
            let mut h = hand(&cx);
            let len = h.parts.encode().len();
            h.parts.trailer = padding_field(15, 1025 - len);
            refused(&cx, h).await
        }),
        case!("3/handshake-zero-length", Must, "a zero-length first frame closes the connection without a reply", |cx| {
            let mut raw = cx.raw("A").await?;
            raw.send(&[0, 0, 0, 0], "length 0").await?;
            raw.expect_silent_close(cx.wait()).await
        }),
        case!("3/handshake-length-huge", Must, "a length prefix of 2^32-1 closes the connection without waiting for the body", |cx| {
            let mut raw = cx.raw("A").await?;
            raw.send(&[0xff, 0xff, 0xff, 0xff], "length 4294967295, no body").await?;
            raw.expect_silent_close(cx.wait()).await
        }),
        case!("3/handshake-truncated", Must, "an Init cut short by the end of the stream is closed without a reply", |cx| {
            let h = hand(&cx);
            let body = h.parts.encode();
            let mut raw = cx.raw("A").await?;
            let mut wire = (body.len() as u32).to_be_bytes().to_vec();
            wire.extend_from_slice(&body[..body.len() / 2]);
            raw.send(&wire, "half an Init, then end of stream").await?;
            let _ = raw.stream.shutdown().await;
            raw.expect_silent_close(cx.wait()).await
        }),
        case!("3/ack-within-1024", Must, "the relay's Ack is at most 1024 bytes", |cx| {
            let (_, ack) = ack_of(&cx).await?;
            if ack.len() <= 1024 {
                Ok(Outcome::pass_with(format!("{} bytes", ack.len())))
            } else {
                Err(Outcome::fail(format!("Ack of {} bytes", ack.len())))
            }
        }),
        // --- §4.2 responder checks ---------------------------------------------------------
        case!("4.2/not-protobuf", Must, "a first frame that is not a protobuf Init is refused silently", |cx| {
            let mut raw = cx.raw("A").await?;
            raw.send(&botd_protocol::codec::encode_frame(&[0xff; 40]), "40 bytes of 0xff").await?;
            raw.expect_silent_close(cx.wait()).await
        }),
        case!("4.2/wrong-recipient", Must, "an Init addressed to another key is refused silently", |cx| {
            let mut h = hand(&cx);
            h.parts.recipient = Bytes::copy_from_slice(KeyPair::generate().public().as_bytes());
            let id = h.identity.clone();
            h.parts.resign(&id);
            refused(&cx, h).await
        }),
        case!("4.2/recipient-uncompressed", Must, "an Init naming the relay's key in uncompressed form is refused silently", |cx| {
            let mut h = hand(&cx);
            h.parts.recipient = uncompressed(&cx.t.key);
            let id = h.identity.clone();
            h.parts.resign(&id);
            refused(&cx, h).await
        }),
        case!("4.2/empty-id", Must, "an Init with an empty id is refused silently", |cx| {
            let mut h = hand(&cx);
            h.parts.id.clear();
            refused(&cx, h).await
        }),
        case!("4.2/id-65-bytes", Must, "an Init id of 65 bytes is refused silently", |cx| {
            let mut h = hand(&cx);
            h.parts.id = "a".repeat(65);
            refused(&cx, h).await
        }),
        case!("4.2/id-64-bytes", Must, "an Init id of 64 bytes is accepted", |cx| {
            let mut h = hand(&cx);
            h.parts.id = "b".repeat(64);
            accepted(&cx, h).await
        }),
        case!("4.2/id-1-byte", Must, "an Init id of 1 byte is accepted", |cx| {
            let mut h = hand(&cx);
            h.parts.id = "x".into();
            accepted(&cx, h).await
        }),
        case!("4.2/id-non-ascii", Must, "an Init id of non-ASCII UTF-8 is accepted", |cx| {
            let mut h = hand(&cx);
            h.parts.id = "grüße-ünïcødé".into();
            accepted(&cx, h).await
        }),
        case!("4.2/id-invalid-utf8", Must, "an Init id that is not UTF-8 is a decode failure and refused silently", |cx| {
            let mut h = hand(&cx);
            h.parts.id.clear();
            h.parts.trailer = field_bytes(1, &[0xc3, 0x28, 0x61]);
            refused(&cx, h).await
        }),
        case!("4.2/high-s-signature", Must, "an Init with the high-S twin of a valid signature is refused silently", |cx| {
            let mut h = hand(&cx);
            set_sig(&mut h, |s| *s = negate_s(s));
            refused(&cx, h).await
        }),
        case!("4.2/bad-signature", Must, "an Init whose signature has one bit flipped is refused silently", |cx| {
            let mut h = hand(&cx);
            set_sig(&mut h, |s| s[31] ^= 1);
            refused(&cx, h).await
        }),
        case!("4.2/signature-key-order", Must, "an Init signed over recipient ‖ sender ‖ ephemeral (wrong order) is refused silently", |cx| {
            let mut h = hand(&cx);
            let d = digest3(&h.parts.recipient, &h.parts.sender, &h.parts.ephemeral);
            h.parts.signature = Bytes::copy_from_slice(&h.identity.sign(&d));
            refused(&cx, h).await
        }),
        case!("4.2/signature-by-other-key", Must, "an Init signed by a key other than sender_pubkey is refused silently", |cx| {
            let mut h = hand(&cx);
            h.parts.resign(&KeyPair::generate());
            refused(&cx, h).await
        }),
        case!("4.2/signature-other-ephemeral", Must, "an Init whose signature covers another ephemeral key is refused silently", |cx| {
            let mut h = hand(&cx);
            h.parts.ephemeral = Bytes::copy_from_slice(KeyPair::generate().public().as_bytes());
            refused(&cx, h).await
        }),
        case!("4.2/replayed-ephemeral", Must, "a second Init with an ephemeral key already used is refused silently", |cx| {
            let h = hand(&cx);
            let body = h.parts.encode();
            let mut raw = cx.raw("A").await?;
            raw.send_init(&body).await?;
            raw.finish(&cx.t, h.identity.clone(), &h.ephemeral, &h.parts, &body).await?;
            let mut again = cx.raw("B").await?;
            again.send_init(&body).await?;
            again.expect_silent_close(cx.wait()).await
        }),
        case!("4.2/unknown-init-fields", Must, "an Init with an unknown field is accepted and the keys cover its exact bytes", |cx| {
            let mut h = hand(&cx);
            h.parts.trailer = [crate::conformance::wire::field_varint(9, 77), field_bytes(12, b"extension")].concat();
            accepted(&cx, h).await
        }),
        case!("4.2/non-canonical-init", Must, "an Init with its fields in reverse order is accepted", |cx| {
            let h = hand(&cx);
            let p = &h.parts;
            let body = [
                field_bytes(5, &p.signature),
                field_bytes(4, &p.ephemeral),
                field_bytes(3, &p.recipient),
                field_bytes(2, &p.sender),
                field_bytes(1, p.id.as_bytes()),
            ]
            .concat();
            let mut raw = cx.raw("A").await?;
            raw.send_init(&body).await?;
            raw.finish(&cx.t, h.identity.clone(), &h.ephemeral, &h.parts, &body).await?;
            Ok(Outcome::pass())
        }),
        // --- §4.3 admission ------------------------------------------------------------------
        case!("4.3/handshake-deadline", Must, "a connection that sends nothing is closed silently after the handshake deadline", |cx| {
            let deadline = Duration::from_millis(cx.limit("handshake_timeout_ms", 10_000));
            let mut raw = cx.raw("A").await?;
            raw.expect_silent_close(deadline + Duration::from_secs(3)).await
        }),
        case!("4.3/handshake-deadline-partial", Must, "a connection that stalls inside its Init is closed silently after the deadline", |cx| {
            let deadline = Duration::from_millis(cx.limit("handshake_timeout_ms", 10_000));
            let h = hand(&cx);
            let body = h.parts.encode();
            let mut raw = cx.raw("A").await?;
            let mut wire = (body.len() as u32).to_be_bytes().to_vec();
            wire.extend_from_slice(&body[..10]);
            raw.send(&wire, "the first 14 bytes of an Init frame, then nothing").await?;
            raw.expect_silent_close(deadline + Duration::from_secs(3)).await
        }),
        // --- §4.4 the Ack ----------------------------------------------------------------------
        case!("4.4/ack-init-id", Must, "Ack.init_id equals Init.id", |cx| {
            let (h, ack) = ack_of(&cx).await?;
            let ack = Ack::decode(&ack[..]).map_err(|e| Outcome::fail(format!("Ack does not decode: {e}")))?;
            if ack.init_id == h.parts.id { Ok(Outcome::pass()) } else {
                Err(Outcome::fail(format!("init_id {:?}, Init.id {:?}", ack.init_id, h.parts.id)))
            }
        }),
        case!("4.4/ack-valid", Must, "the Ack passes every initiator check of §4.5 (id, lengths, point, low-S signature over S_r ‖ S_i ‖ E_r)", |cx| {
            let (h, ack) = ack_of(&cx).await?;
            initiator_accept(&h.identity, &h.ephemeral, &cx.t.key, &h.parts.id, &h.parts.encode(), &ack)
                .map_err(Outcome::fail)?;
            Ok(Outcome::pass())
        }),
        case!("4.4/ack-id-format", Should, "Ack.id is generated as 32 lowercase hex characters (§2)", |cx| {
            let (_, ack) = ack_of(&cx).await?;
            let ack = Ack::decode(&ack[..]).map_err(|e| Outcome::fail(format!("Ack does not decode: {e}")))?;
            if ack.id.len() == 32 && ack.id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                Ok(Outcome::pass())
            } else {
                Ok(Outcome::non_strict(format!("Ack.id {:?}", ack.id)))
            }
        }),
        case!("4.4/ack-canonical", Should, "the Ack uses the canonical protobuf encoding (§1)", |cx| {
            let (_, ack) = ack_of(&cx).await?;
            let decoded = Ack::decode(&ack[..]).map_err(|e| Outcome::fail(format!("Ack does not decode: {e}")))?;
            if decoded.encode_to_vec() == ack.to_vec() { Ok(Outcome::pass()) } else {
                Ok(Outcome::non_strict("the Ack's bytes are not its canonical encoding"))
            }
        }),
        case!("4.4/ack-fresh-ephemeral", Must, "two handshakes get Acks with different ephemeral keys and ids", |cx| {
            let (_, a) = ack_of(&cx).await?;
            let (_, b) = ack_of(&cx).await?;
            let (a, b) = (Ack::decode(&a[..]).unwrap_or_default(), Ack::decode(&b[..]).unwrap_or_default());
            if a.ephemeral_pubkey == b.ephemeral_pubkey {
                return Err(Outcome::fail("the same ephemeral key in two Acks"));
            }
            if a.id == b.id {
                return Err(Outcome::fail("the same Ack.id twice"));
            }
            Ok(Outcome::pass())
        }),
        // --- §5 key schedule ---------------------------------------------------------------
        case!("5/key-schedule", Must, "Welcome opens under the keys of §5 derived by the suite's own implementation", |cx| {
            let p = cx.probe("A").await?;
            Ok(Outcome::pass_with(format!("Welcome from {}", p.welcome.server_version)))
        }),
    ]
}
