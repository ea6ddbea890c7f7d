//! A relayed message as both ends see it: the digest a sender signs (§8.3), and the `Deliver`
//! a recipient receives (§8.4), encoded straight from the stored fields so that a relay seals a
//! delivery without copying its payload.

use std::sync::Arc;

use bytes::{BufMut, Bytes};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};

use crate::keys::{sha256, PUBLIC_KEY_LEN, SIGNATURE_LEN};
use crate::proto::{Body, Deliver, Frame};
use crate::session::{Session, SessionError};

/// Length of `Send.sender_nonce`.
pub const NONCE_LEN: usize = 8;
/// Length of a payload hash (SHA-256).
pub const HASH_LEN: usize = 32;
/// Length of a ticket token.
pub const TICKET_LEN: usize = 16;

/// The digest a sender signs for `Send.sender_signature`:
/// SHA-256("botd/1 message" ‖ sender ‖ recipient ‖ recipient_device u32 BE ‖ nonce ‖ payload_hash).
pub fn message_digest(
    sender: &[u8],
    recipient: &[u8],
    recipient_device: u32,
    nonce: &[u8],
    payload_hash: &[u8],
) -> [u8; 32] {
    sha256(&[
        b"botd/1 message",
        sender,
        recipient,
        &recipient_device.to_be_bytes(),
        nonce,
        payload_hash,
    ])
}

/// A message stored in a mailbox, with everything a `Deliver` carries but the recipient device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: u64,
    pub sender: [u8; PUBLIC_KEY_LEN],
    pub sender_device: u32,
    pub nonce: [u8; NONCE_LEN],
    pub payload_hash: [u8; HASH_LEN],
    pub signature: [u8; SIGNATURE_LEN],
    pub payload: Bytes,
    pub received_at_ms: u64,
}

impl Message {
    /// The protobuf `Deliver` of this message for mailbox `device`.
    pub fn deliver_body(&self, device: u32) -> Deliver {
        Deliver {
            message_id: self.id,
            sender: Bytes::copy_from_slice(&self.sender),
            sender_device: self.sender_device,
            recipient_device: device,
            sender_nonce: Bytes::copy_from_slice(&self.nonce),
            payload_hash: Bytes::copy_from_slice(&self.payload_hash),
            sender_signature: Bytes::copy_from_slice(&self.signature),
            payload: self.payload.clone(),
            received_at_ms: self.received_at_ms,
        }
    }
}

/// `Frame { id: frame_id, deliver }` of a stored message for mailbox `device`, kept as the
/// stored message itself until it is sealed.
#[derive(Debug, Clone)]
pub struct DeliverFrame {
    pub frame_id: u64,
    pub device: u32,
    pub message: Arc<Message>,
}

const FRAME_ID_TAG: u32 = 1;
const FRAME_DELIVER_TAG: u32 = 36;
const FRAME_BUNDLES_TAG: u32 = 24;

fn varint_field_len(tag: u32, value: u64) -> usize {
    if value == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(value)
    }
}

fn varint_field(tag: u32, value: u64, buf: &mut impl BufMut) {
    if value != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(value, buf);
    }
}

fn bytes_field_len(tag: u32, len: usize) -> usize {
    if len == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(len as u64) + len
    }
}

fn bytes_field(tag: u32, value: &[u8], buf: &mut impl BufMut) {
    if !value.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(value.len() as u64, buf);
        buf.put_slice(value);
    }
}

/// Bytes of a `Deliver` frame before its payload, at most: frame id, the body's key and length,
/// fields 1 to 7 and field 8's key and length.
const DELIVER_HEAD_MAX: usize = 11 + 6 + 11 + 35 + 6 + 6 + 10 + 34 + 66 + 6;

impl DeliverFrame {
    /// Encoded length of the `Deliver` message (without the `Frame` around it).
    fn body_len(&self) -> usize {
        let m = &self.message;
        varint_field_len(1, m.id)
            + bytes_field_len(2, m.sender.len())
            + varint_field_len(3, u64::from(m.sender_device))
            + varint_field_len(4, u64::from(self.device))
            + bytes_field_len(5, m.nonce.len())
            + bytes_field_len(6, m.payload_hash.len())
            + bytes_field_len(7, m.signature.len())
            + bytes_field_len(8, m.payload.len())
            + varint_field_len(9, m.received_at_ms)
    }

    /// Bytes of the encoded `Frame`.
    pub fn encoded_len(&self) -> usize {
        let inner = self.body_len();
        varint_field_len(FRAME_ID_TAG, self.frame_id)
            + key_len(FRAME_DELIVER_TAG)
            + encoded_len_varint(inner as u64)
            + inner
    }

    /// The frame in protobuf's canonical encoding, up to and including the payload's length
    /// (the payload and field 9 follow).
    fn encode_head(&self, buf: &mut impl BufMut) {
        let m = &self.message;
        varint_field(FRAME_ID_TAG, self.frame_id, buf);
        encode_key(FRAME_DELIVER_TAG, WireType::LengthDelimited, buf);
        encode_varint(self.body_len() as u64, buf);
        varint_field(1, m.id, buf);
        bytes_field(2, &m.sender, buf);
        varint_field(3, u64::from(m.sender_device), buf);
        varint_field(4, u64::from(self.device), buf);
        bytes_field(5, &m.nonce, buf);
        bytes_field(6, &m.payload_hash, buf);
        bytes_field(7, &m.signature, buf);
        if !m.payload.is_empty() {
            encode_key(8, WireType::LengthDelimited, buf);
            encode_varint(m.payload.len() as u64, buf);
        }
    }

    /// Seals the frame into the session's output; the payload is encrypted from where it is
    /// stored.
    pub fn seal(&self, session: &mut Session) -> Result<(), SessionError> {
        let mut head = [0u8; DELIVER_HEAD_MAX];
        let mut tail = [0u8; 16];
        let (head_len, tail_len) = {
            let (mut h, mut t) = (&mut head[..], &mut tail[..]);
            self.encode_head(&mut h);
            varint_field(9, self.message.received_at_ms, &mut t);
            (DELIVER_HEAD_MAX - h.len(), 16 - t.len())
        };
        session.send_parts(&[&head[..head_len], &self.message.payload, &tail[..tail_len]])
    }

    /// As a decoded `Frame`.
    pub fn to_frame(&self) -> Frame {
        Frame::new(
            self.frame_id,
            Body::Deliver(self.message.deliver_body(self.device)),
        )
    }
}

/// The largest plaintext of a `Frame` carrying `PreKeyBundles` that a relay with these limits
/// can send (docs/PROTOCOL.md §3): `devices` bundles, every uint32 at its maximum, every
/// key-material field `key_len` bytes, in a frame with the largest id.
pub fn largest_bundles_frame_len(devices: usize, key_len: usize) -> usize {
    let uint32 = |tag: u32| prost::encoding::key_len(tag) + encoded_len_varint(u64::from(u32::MAX));
    let field =
        |tag: u32, len: usize| prost::encoding::key_len(tag) + encoded_len_varint(len as u64) + len;
    let signed = uint32(1) + field(2, key_len) + field(3, key_len);
    let one_time = uint32(1) + field(2, key_len);
    let bundle = uint32(1) + uint32(2) + field(3, key_len) + field(4, signed) + field(5, one_time);
    let bundles = devices * field(1, bundle);
    largest_frame_len(FRAME_BUNDLES_TAG, bundles)
}

/// The largest plaintext of a `Frame` carrying a `Deliver` of a `payload_len`-byte payload
/// (docs/PROTOCOL.md §3), in a frame with the largest id.
pub fn largest_deliver_frame_len(payload_len: usize) -> usize {
    let id = 1 + encoded_len_varint(u64::MAX);
    let uint32 = 1 + encoded_len_varint(u64::from(u32::MAX));
    let field = |len: usize| 1 + encoded_len_varint(len as u64) + len;
    // message_id, sender, sender_device, recipient_device, sender_nonce, payload_hash,
    // sender_signature, payload, received_at_ms.
    let body = id
        + field(PUBLIC_KEY_LEN)
        + 2 * uint32
        + field(NONCE_LEN)
        + field(HASH_LEN)
        + field(SIGNATURE_LEN)
        + field(payload_len)
        + id;
    largest_frame_len(FRAME_DELIVER_TAG, body)
}

/// `Frame { id: u64::MAX, <tag>: <body of body_len bytes> }`, encoded.
fn largest_frame_len(tag: u32, body_len: usize) -> usize {
    key_len(FRAME_ID_TAG)
        + encoded_len_varint(u64::MAX)
        + key_len(tag)
        + encoded_len_varint(body_len as u64)
        + body_len
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use bytes::BytesMut;
    use prost::Message as _;

    use super::*;
    use crate::cipher::{DirectionKeys, Opener};
    use crate::handshake::SessionKeys;
    use crate::keys::KeyPair;
    use crate::session::Timers;

    #[test]
    fn largest_answers_are_exact() {
        use crate::proto::{PreKey, PreKeyBundle, PreKeyBundles, SignedPreKey};
        for (devices, key) in [(16, 256), (1, 1), (3, 127), (5, 128), (40, 20_000)] {
            let k = || Bytes::from(vec![0xab; key]);
            let bundle = PreKeyBundle {
                device_id: u32::MAX,
                registration_id: u32::MAX,
                identity_key: k(),
                signed_prekey: Some(SignedPreKey {
                    id: u32::MAX,
                    public_key: k(),
                    signature: k(),
                }),
                one_time_prekey: Some(PreKey {
                    id: u32::MAX,
                    public_key: k(),
                }),
            };
            let frame = Frame::new(
                u64::MAX,
                Body::PreKeyBundles(PreKeyBundles {
                    bundles: vec![bundle; devices],
                }),
            );
            assert_eq!(
                largest_bundles_frame_len(devices, key),
                frame.encoded_len(),
                "{devices} × {key}"
            );
        }
        // docs/PROTOCOL.md §3: the defaults.
        assert_eq!(largest_bundles_frame_len(16, 256), 17_120);
        for payload in [0usize, 1, 127, 128, 16_383, 16_384, 262_144] {
            let frame = Frame::new(
                u64::MAX,
                Body::Deliver(Deliver {
                    message_id: u64::MAX,
                    sender: Bytes::from(vec![2; PUBLIC_KEY_LEN]),
                    sender_device: u32::MAX,
                    recipient_device: u32::MAX,
                    sender_nonce: Bytes::from(vec![1; NONCE_LEN]),
                    payload_hash: Bytes::from(vec![1; HASH_LEN]),
                    sender_signature: Bytes::from(vec![1; SIGNATURE_LEN]),
                    payload: Bytes::from(vec![1; payload.max(1)]),
                    received_at_ms: u64::MAX,
                }),
            );
            assert_eq!(
                largest_deliver_frame_len(payload.max(1)),
                frame.encoded_len()
            );
            assert!(largest_deliver_frame_len(payload) <= payload + 203);
        }
    }

    #[test]
    fn message_digest_matches_the_protocol_example() {
        // docs/PROTOCOL.md §8.3: sender secret 11 × 32, recipient secret 22 × 32.
        let sender = KeyPair::from_secret_bytes(&[0x11; 32]).unwrap();
        let recipient = KeyPair::from_secret_bytes(&[0x22; 32]).unwrap();
        let hash = sha256(&[b"hello"]);
        let digest = message_digest(
            sender.public().as_bytes(),
            recipient.public().as_bytes(),
            1,
            &[0, 1, 2, 3, 4, 5, 6, 7],
            &hash,
        );
        assert_eq!(
            hex::encode(digest),
            "4a58bca16d5bcd84b6a88da0609d2f7d7931389917b585854c99e1e04f809ec9"
        );
    }

    #[test]
    fn a_deliver_sealed_from_parts_is_the_protobuf_encoding() {
        for (id, payload, time) in [
            (1u64, &b"hello"[..], 1_767_225_600_000u64),
            (0, &b""[..], 0),
            (u64::MAX >> 2, &[7u8; 300][..], 5),
        ] {
            let frame = DeliverFrame {
                frame_id: id ^ 9,
                device: 7,
                message: Arc::new(Message {
                    id,
                    sender: [2; 33],
                    sender_device: 3,
                    nonce: [4; 8],
                    payload_hash: [5; 32],
                    signature: [6; 64],
                    payload: Bytes::copy_from_slice(payload),
                    received_at_ms: time,
                }),
            };
            let expected = frame.to_frame().encode_to_vec();
            assert_eq!(frame.encoded_len(), expected.len());
            // Sealed as a connection seals it, then opened: the plaintext is the encoding.
            let keys = |b: u8| DirectionKeys {
                enc: [b; 32],
                mac: [b + 1; 32],
            };
            let mut session = Session::responder(
                SessionKeys {
                    send: keys(1),
                    recv: keys(3),
                },
                Timers {
                    ping_min_interval: Duration::from_secs(30),
                    probe_after: None,
                    keepalive_after: None,
                    pong_timeout: Duration::from_secs(20),
                    idle_timeout: None,
                },
                1 << 20,
                Instant::now(),
            );
            frame.seal(&mut session).unwrap();
            let wire = session.poll_transmit().unwrap();
            let mut opener = Opener::new(keys(1));
            let buf = opener.open(BytesMut::from(&wire[4..])).unwrap();
            assert_eq!(&buf[..], &expected[..]);
        }
    }
}
