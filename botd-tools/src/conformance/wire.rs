//! Wire machinery of the suite, written from docs/PROTOCOL.md on top of `core::keys`: the key
//! schedule for hand-made `Init`s and tampered `Ack`s, a frame cipher whose key rotation can be
//! moved, raw protobuf pieces for frames no correct peer sends, and short frame descriptions for
//! the exchange logs.

use aes::cipher::{KeyIvInit, StreamCipher};
use bytes::{BufMut, Bytes, BytesMut};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use prost::Message;
use sha2::Sha256;

use botd_protocol::cipher::{DirectionKeys, REKEY_INTERVAL, TAG_LEN};
use botd_protocol::keys::{sha256, KeyPair, PublicKeyBytes, PUBLIC_KEY_LEN, SIGNATURE_LEN};
use botd_protocol::proto::{valid_id, Ack, Body, Frame, Init};

type Aes256Ctr = ctr::Ctr64BE<aes::Aes256>;

/// `SHA-256(a ‖ b ‖ c)` over three keys as bytes (any length, for tampered keys too).
pub fn digest3(a: &[u8], b: &[u8], c: &[u8]) -> [u8; 32] {
    sha256(&[a, b, c])
}

/// Both directions' keys of a session, from the initiator's side.
pub struct InitiatorKeys {
    pub send: DirectionKeys,
    pub recv: DirectionKeys,
}

/// Derives the §5 keys: `h` over the exact bodies, HKDF over `ee ‖ es ‖ se`. Returns
/// (initiator→responder, responder→initiator).
pub fn derive(
    init_body: &[u8],
    ack_body: &[u8],
    ee: &[u8; 32],
    es: &[u8; 32],
    se: &[u8; 32],
) -> (DirectionKeys, DirectionKeys) {
    let h = sha256(&[b"botd/1 transcript", init_body, ack_body]);
    let mut ikm = [0u8; 96];
    ikm[..32].copy_from_slice(ee);
    ikm[32..64].copy_from_slice(es);
    ikm[64..].copy_from_slice(se);
    let mut okm = [0u8; 128];
    Hkdf::<Sha256>::new(Some(&h), &ikm)
        .expand(b"botd/1 session keys", &mut okm)
        .expect("128 bytes is a valid HKDF length");
    let part = |o: usize| {
        let mut k = DirectionKeys {
            enc: [0; 32],
            mac: [0; 32],
        };
        k.enc.copy_from_slice(&okm[o..o + 32]);
        k.mac.copy_from_slice(&okm[o + 32..o + 64]);
        k
    };
    let keys = (part(0), part(64));
    zeroize::Zeroize::zeroize(&mut ikm);
    zeroize::Zeroize::zeroize(&mut okm);
    keys
}

/// The initiator's checks of §4.5 on an `Ack`, then its keys. `Err` names the failed check.
pub fn initiator_accept(
    identity: &KeyPair,
    ephemeral: &KeyPair,
    relay: &PublicKeyBytes,
    init_id: &str,
    init_body: &[u8],
    ack_body: &[u8],
) -> Result<(InitiatorKeys, Ack), String> {
    let ack = Ack::decode(ack_body).map_err(|e| format!("Ack does not decode: {e}"))?;
    if ack.init_id != init_id {
        return Err(format!(
            "Ack.init_id {:?} is not the Init's id {init_id:?}",
            ack.init_id
        ));
    }
    if !valid_id(&ack.id) {
        return Err(format!("Ack.id has {} bytes, not 1 to 64", ack.id.len()));
    }
    if ack.ephemeral_pubkey.len() != PUBLIC_KEY_LEN || ack.signature.len() != SIGNATURE_LEN {
        return Err(format!(
            "Ack field lengths: ephemeral {} bytes, signature {} bytes",
            ack.ephemeral_pubkey.len(),
            ack.signature.len()
        ));
    }
    let remote_eph = PublicKeyBytes::parse(&ack.ephemeral_pubkey)
        .map_err(|e| format!("Ack.ephemeral_pubkey: {e}"))?;
    let digest = digest3(
        relay.as_bytes(),
        identity.public().as_bytes(),
        remote_eph.as_bytes(),
    );
    relay
        .verify(&digest, &ack.signature)
        .map_err(|e| format!("Ack signature: {e}"))?;
    let ee = ephemeral.ecdh(&remote_eph);
    let es = ephemeral.ecdh(relay);
    let se = identity.ecdh(&remote_eph);
    let (send, recv) = derive(init_body, ack_body, &ee, &es, &se);
    Ok((InitiatorKeys { send, recv }, ack))
}

/// The fields of an `Init`, freely settable (a correct one from [`InitParts::new`]).
#[derive(Clone)]
pub struct InitParts {
    pub id: String,
    pub sender: Bytes,
    pub recipient: Bytes,
    pub ephemeral: Bytes,
    pub signature: Bytes,
    /// Appended after the encoded fields (unknown fields, padding).
    pub trailer: Vec<u8>,
}

impl InitParts {
    /// A correct `Init` from `identity` to `relay` with `ephemeral`.
    pub fn new(identity: &KeyPair, ephemeral: &KeyPair, relay: &PublicKeyBytes) -> Self {
        let sender = Bytes::copy_from_slice(identity.public().as_bytes());
        let recipient = Bytes::copy_from_slice(relay.as_bytes());
        let eph = Bytes::copy_from_slice(ephemeral.public().as_bytes());
        let signature = identity.sign(&digest3(&sender, &recipient, &eph));
        Self {
            id: botd_protocol::proto::random_id(),
            sender,
            recipient,
            ephemeral: eph,
            signature: Bytes::copy_from_slice(&signature),
            trailer: Vec::new(),
        }
    }

    /// Re-signs with `signer` over the current key fields.
    pub fn resign(&mut self, signer: &KeyPair) {
        let digest = digest3(&self.sender, &self.recipient, &self.ephemeral);
        self.signature = Bytes::copy_from_slice(&signer.sign(&digest));
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut body = Init {
            id: self.id.clone(),
            sender_pubkey: self.sender.clone(),
            recipient_pubkey: self.recipient.clone(),
            ephemeral_pubkey: self.ephemeral.clone(),
            signature: self.signature.clone(),
        }
        .encode_to_vec();
        body.extend_from_slice(&self.trailer);
        body
    }
}

/// A frame cipher for one direction whose rotation point and tag check can be changed, for
/// relays that misbehave on purpose. With the defaults it is the cipher of §6.
pub struct FlexCipher {
    keys: DirectionKeys,
    seq: u64,
    /// Rotate after the frames `1023 + rotate_shift + k × 1024`; `None`: never.
    pub rotate_shift: Option<u64>,
    /// Check tags when opening (a broken relay may skip it).
    pub check_tag: bool,
}

impl FlexCipher {
    pub fn new(keys: DirectionKeys) -> Self {
        Self {
            keys,
            seq: 0,
            rotate_shift: Some(0),
            check_tag: true,
        }
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    fn keystream(&self, data: &mut [u8]) {
        let mut iv = [0u8; 16];
        iv[..8].copy_from_slice(&self.seq.to_be_bytes());
        let mut c = Aes256Ctr::new(&self.keys.enc.into(), &iv.into());
        c.apply_keystream(data);
    }

    fn tag(&self, ct: &[u8]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.keys.mac).expect("any key size");
        mac.update(&self.seq.to_be_bytes());
        mac.update(ct);
        mac.finalize().into_bytes().into()
    }

    fn advance(&mut self) {
        if let Some(shift) = self.rotate_shift {
            let first = REKEY_INTERVAL - 1 + shift;
            if self.seq >= first && (self.seq - first).is_multiple_of(REKEY_INTERVAL) {
                self.keys = self.keys.rotated();
            }
        }
        self.seq += 1;
    }

    /// Seals a plaintext into a whole wire frame.
    pub fn seal(&mut self, plaintext: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(4 + plaintext.len() + TAG_LEN);
        out.put_u32((plaintext.len() + TAG_LEN) as u32);
        let mut ct = plaintext.to_vec();
        self.keystream(&mut ct);
        let tag = self.tag(&ct);
        out.extend_from_slice(&ct);
        out.extend_from_slice(&tag[..TAG_LEN]);
        self.advance();
        out.freeze()
    }

    /// Seals, then flips a bit of the tag.
    pub fn seal_bad_tag(&mut self, plaintext: &[u8]) -> Bytes {
        let mut wire = BytesMut::from(&self.seal(plaintext)[..]);
        let last = wire.len() - 1;
        wire[last] ^= 0x01;
        wire.freeze()
    }

    /// Opens a frame body (no length prefix).
    pub fn open(&mut self, body: &[u8]) -> Result<Vec<u8>, &'static str> {
        if body.len() < TAG_LEN {
            return Err("frame shorter than its tag");
        }
        let (ct, tag) = body.split_at(body.len() - TAG_LEN);
        if self.check_tag {
            let want = self.tag(ct);
            if !constant_eq(&want[..TAG_LEN], tag) {
                return Err("bad tag");
            }
        }
        let mut pt = ct.to_vec();
        self.keystream(&mut pt);
        self.advance();
        Ok(pt)
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// --- raw protobuf -----------------------------------------------------------------------------

/// A protobuf varint.
pub fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// A length-delimited field `num` holding `bytes`.
pub fn field_bytes(num: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 8);
    varint(u64::from(num) << 3 | 2, &mut out);
    varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

/// A varint field `num` holding `v`.
pub fn field_varint(num: u32, v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    varint(u64::from(num) << 3, &mut out);
    varint(v, &mut out);
    out
}

/// The encoding of a frame body alone (its oneof field), to append a second body.
pub fn body_field(body: &Body) -> Vec<u8> {
    let mut out = Vec::new();
    body.encode(&mut out);
    out
}

/// Unknown length-delimited fields that pad an encoding by exactly `extra` bytes (≥ 3): one
/// field, or two where no single field has that size (e.g. 130 bytes: 128 bytes of content need
/// a 2-byte length, 127 a 1-byte one).
pub fn padding_field(num: u32, extra: usize) -> Vec<u8> {
    if let Some(field) = single_padding_field(num, extra) {
        return field;
    }
    // The smallest field (an empty one) is the tag and a 1-byte length.
    let small = if num < 16 { 2 } else { 3 };
    for k in small..small + 2 {
        if let (Some(a), Some(b)) = (
            single_padding_field(num, extra.saturating_sub(k)),
            single_padding_field(num, k),
        ) {
            return [a, b].concat();
        }
    }
    Vec::new()
}

fn single_padding_field(num: u32, extra: usize) -> Option<Vec<u8>> {
    // tag (2 bytes for num < 2048) + length varint + content
    let tag_len = if num < 16 { 1 } else { 2 };
    for len_len in 1..=4usize {
        if extra < tag_len + len_len {
            break;
        }
        let content = extra - tag_len - len_len;
        let mut probe = Vec::new();
        varint(content as u64, &mut probe);
        if probe.len() == len_len {
            return Some(field_bytes(num, &vec![0u8; content]));
        }
    }
    None
}

// --- descriptions for the logs -----------------------------------------------------------------

fn hex_short(b: &[u8]) -> String {
    if b.len() <= 12 {
        hex::encode(b)
    } else {
        format!("{}…({} bytes)", hex::encode(&b[..6]), b.len())
    }
}

/// A one-line description of a frame for the exchange log.
pub fn describe(frame: &Frame) -> String {
    let body = match &frame.body {
        None => "no body".to_owned(),
        Some(Body::Error(e)) => format!(
            "Error {{ code: {}, retry_after_ms: {}, message: {:?} }}",
            botd_protocol::proto::ErrorCode::try_from(e.code)
                .map(|c| c.as_str_name().to_owned())
                .unwrap_or_else(|_| e.code.to_string()),
            e.retry_after_ms,
            e.message
        ),
        Some(Body::Deliver(d)) => format!(
            "Deliver {{ message_id: {}, sender: {}, sender_device: {}, recipient_device: {}, nonce: {}, payload: {} bytes, received_at_ms: {} }}",
            d.message_id,
            hex_short(&d.sender),
            d.sender_device,
            d.recipient_device,
            hex_short(&d.sender_nonce),
            d.payload.len(),
            d.received_at_ms
        ),
        Some(Body::Send(s)) => format!(
            "Send {{ recipient: {}, recipient_device: {}, sender_device: {}, nonce: {}, payload_hash: {}, signature: {} bytes, payload: {} bytes, ticket: {} bytes }}",
            hex_short(&s.recipient),
            s.recipient_device,
            s.sender_device,
            hex_short(&s.sender_nonce),
            hex_short(&s.payload_hash),
            s.sender_signature.len(),
            s.payload.len(),
            s.ticket.len()
        ),
        Some(Body::Register(r)) => format!(
            "Register {{ device_id: {}, registration_id: {}, identity_key: {} bytes, signed_prekey: {}, one_time_prekeys: {} }}",
            r.device_id,
            r.registration_id,
            r.identity_key.len(),
            if r.signed_prekey.is_some() { "yes" } else { "none" },
            r.one_time_prekeys.len()
        ),
        Some(Body::UploadPreKeys(u)) => format!(
            "UploadPreKeys {{ device_id: {}, signed_prekey: {}, one_time_prekeys: {} }}",
            u.device_id,
            if u.signed_prekey.is_some() { "yes" } else { "none" },
            u.one_time_prekeys.len()
        ),
        Some(Body::AckMessages(a)) if a.message_ids.len() > 8 => format!(
            "AckMessages {{ device_id: {}, message_ids: {} ids }}",
            a.device_id,
            a.message_ids.len()
        ),
        Some(Body::PreKeyBundles(b)) => format!(
            "PreKeyBundles {{ {} }}",
            b.bundles
                .iter()
                .map(|b| format!(
                    "device {} one_time {}",
                    b.device_id,
                    b.one_time_prekey
                        .as_ref()
                        .map_or("none".to_owned(), |k| format!("#{}", k.id))
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Some(Body::Welcome(w)) => format!(
            "Welcome {{ protocol: {:?}, server_version: {:?}, max_frame_len: {}, max_payload_len: {}, ping_interval_ms: {}, server_time_ms: {}, idle_timeout_ms: {}, relay_pubkey: {}, ping_min_interval_ms: {} }}",
            w.protocol,
            w.server_version,
            w.max_frame_len,
            w.max_payload_len,
            w.ping_interval_ms,
            w.server_time_ms,
            w.idle_timeout_ms,
            hex_short(&w.relay_pubkey),
            w.ping_min_interval_ms
        ),
        Some(Body::Ticket(t)) => format!(
            "Ticket {{ token: {}, expires_at_ms: {}, uses: {} }}",
            hex_short(&t.token),
            t.expires_at_ms,
            t.uses
        ),
        Some(other) => {
            let text = format!("{other:?}");
            // `Register(Register { .. })` → `Register { .. }`
            match text.split_once('(') {
                Some((_, rest)) => rest.trim_end_matches(')').to_owned(),
                None => text,
            }
        }
    };
    format!("Frame {{ id: {}, {body} }}", frame.id)
}

/// Describes raw handshake bytes.
pub fn describe_init(body: &[u8]) -> String {
    match Init::decode(body) {
        Ok(i) => format!(
            "Init {{ id: {:?}, sender: {}, recipient: {}, ephemeral: {}, signature: {} }} ({} bytes)",
            i.id,
            hex_short(&i.sender_pubkey),
            hex_short(&i.recipient_pubkey),
            hex_short(&i.ephemeral_pubkey),
            hex_short(&i.signature),
            body.len()
        ),
        Err(_) => format!("{} bytes that are not an Init: {}", body.len(), hex_short(body)),
    }
}

pub fn describe_ack(body: &[u8]) -> String {
    match Ack::decode(body) {
        Ok(a) => format!(
            "Ack {{ id: {:?}, init_id: {:?}, ephemeral: {}, signature: {} }} ({} bytes)",
            a.id,
            a.init_id,
            hex_short(&a.ephemeral_pubkey),
            hex_short(&a.signature),
            body.len()
        ),
        Err(_) => format!(
            "{} bytes that are not an Ack: {}",
            body.len(),
            hex_short(body)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use botd_protocol::cipher::{Opener, Sealer};
    use botd_protocol::handshake::respond;

    #[test]
    fn flex_cipher_matches_the_core_cipher_across_rotations() {
        let keys = DirectionKeys {
            enc: [7; 32],
            mac: [9; 32],
        };
        let mut flex = FlexCipher::new(keys.clone());
        let mut core = Sealer::new(keys.clone());
        let mut opener = Opener::new(keys.clone());
        let mut flex_open = FlexCipher::new(keys);
        for i in 0..2100u32 {
            let pt = i.to_be_bytes();
            let a = flex.seal(&pt);
            assert_eq!(a, core.seal(&pt), "frame {i}");
            assert_eq!(&opener.open(BytesMut::from(&a[4..])).unwrap()[..], &pt);
            assert_eq!(flex_open.open(&a[4..]).unwrap(), pt);
        }
    }

    #[test]
    fn a_shifted_rotation_differs_from_frame_1024() {
        let keys = DirectionKeys {
            enc: [1; 32],
            mac: [2; 32],
        };
        let mut good = FlexCipher::new(keys.clone());
        let mut late = FlexCipher::new(keys);
        late.rotate_shift = Some(1);
        for i in 0..1100u32 {
            let (a, b) = (good.seal(b"x"), late.seal(b"x"));
            // Only frame 1024 differs: from 1025 on both have rotated once.
            assert_eq!(a == b, i != 1024, "frame {i}");
        }
    }

    #[test]
    fn hand_made_init_gives_the_responders_keys() {
        let (me, relay, eph) = (
            KeyPair::generate(),
            KeyPair::generate(),
            KeyPair::generate(),
        );
        let mut parts = InitParts::new(&me, &eph, relay.public());
        parts.trailer = padding_field(15, 40);
        let body = parts.encode();
        let response = respond(&relay, &body, |_| true).unwrap();
        let (keys, _) = initiator_accept(
            &me,
            &eph,
            relay.public(),
            &parts.id,
            &body,
            &response.ack_body,
        )
        .unwrap();
        assert_eq!(keys.send, response.established.keys.recv);
        assert_eq!(keys.recv, response.established.keys.send);
    }

    #[test]
    fn padding_is_exact() {
        for extra in 3..3000 {
            assert_eq!(padding_field(15, extra).len(), extra, "{extra}");
            assert_eq!(padding_field(200, extra + 1).len(), extra + 1, "{extra}");
        }
    }
}
