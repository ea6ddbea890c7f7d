//! The BOTD #2 `Init`/`Ack` handshake in both roles, with the botd/1 key schedule: the static
//! keys are mixed into the derivation (`ee`, `es`, `se`) and the exact frame bodies are bound
//! into the salt, so a replayed Ack or a mismatched transcript yields keys nobody else has.
//!
//! Pure functions of bytes in and bytes out; the caller supplies randomness only through the
//! `*_with` variants' ephemeral keys and ids (used for test vectors).

use bytes::Bytes;
use hkdf::Hkdf;
use prost::Message;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::cipher::DirectionKeys;
use super::keys::{sha256, KeyError, KeyPair, PublicKeyBytes, PUBLIC_KEY_LEN, SIGNATURE_LEN};
use crate::proto::{random_id, valid_id, Ack, Init};

const TRANSCRIPT_LABEL: &[u8] = b"botd/1 transcript";
const SESSION_KEYS_INFO: &[u8] = b"botd/1 session keys";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("handshake message does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("Init is addressed to another key")]
    WrongRecipient,
    #[error("field {0} has an invalid length")]
    BadField(&'static str),
    #[error("{field}: {source}")]
    Key {
        field: &'static str,
        source: KeyError,
    },
    #[error("ephemeral key was seen in a recent Init")]
    Replay,
    #[error("Ack answers another Init")]
    InitIdMismatch,
}

impl HandshakeError {
    /// Short stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Decode(_) => "decode",
            HandshakeError::WrongRecipient => "wrong_recipient",
            HandshakeError::BadField(_) => "bad_field",
            HandshakeError::Key {
                source: KeyError::HighS,
                ..
            } => "high_s",
            HandshakeError::Key {
                source:
                    KeyError::BadSignature | KeyError::MalformedSignature | KeyError::SignatureLength(_),
                ..
            } => "bad_signature",
            HandshakeError::Key { .. } => "invalid_key",
            HandshakeError::Replay => "replay",
            HandshakeError::InitIdMismatch => "init_id_mismatch",
        }
    }
}

fn key_error(field: &'static str) -> impl FnOnce(KeyError) -> HandshakeError {
    move |source| HandshakeError::Key { field, source }
}

/// Both directions' keys, from one side's point of view.
#[derive(Debug)]
pub struct SessionKeys {
    pub send: DirectionKeys,
    pub recv: DirectionKeys,
}

/// The outcome of a completed handshake.
#[derive(Debug)]
pub struct Established {
    /// The peer's long-term key, proven by its signature and by the key schedule.
    pub remote: PublicKeyBytes,
    pub keys: SessionKeys,
    /// `h`, the transcript hash used as HKDF salt.
    pub transcript: [u8; 32],
}

/// Every intermediate value of the key schedule, exposed for the published test vectors.
pub struct KeySchedule {
    pub transcript: [u8; 32],
    pub ee: Zeroizing<[u8; 32]>,
    pub es: Zeroizing<[u8; 32]>,
    pub se: Zeroizing<[u8; 32]>,
    pub okm: Zeroizing<[u8; 128]>,
}

impl KeySchedule {
    fn derive(
        init_body: &[u8],
        ack_body: &[u8],
        ee: Zeroizing<[u8; 32]>,
        es: Zeroizing<[u8; 32]>,
        se: Zeroizing<[u8; 32]>,
    ) -> Self {
        let transcript = sha256(&[TRANSCRIPT_LABEL, init_body, ack_body]);
        let mut ikm = Zeroizing::new([0u8; 96]);
        ikm[..32].copy_from_slice(&*ee);
        ikm[32..64].copy_from_slice(&*es);
        ikm[64..].copy_from_slice(&*se);
        let mut okm = Zeroizing::new([0u8; 128]);
        Hkdf::<Sha256>::new(Some(&transcript), &*ikm)
            .expand(SESSION_KEYS_INFO, &mut *okm)
            .expect("128 bytes is a valid HKDF-SHA256 length");
        Self {
            transcript,
            ee,
            es,
            se,
            okm,
        }
    }

    fn direction(&self, offset: usize) -> DirectionKeys {
        let mut keys = DirectionKeys {
            enc: [0; 32],
            mac: [0; 32],
        };
        keys.enc.copy_from_slice(&self.okm[offset..offset + 32]);
        keys.mac
            .copy_from_slice(&self.okm[offset + 32..offset + 64]);
        keys
    }

    pub fn initiator_to_responder(&self) -> DirectionKeys {
        self.direction(0)
    }

    pub fn responder_to_initiator(&self) -> DirectionKeys {
        self.direction(64)
    }
}

/// `sha256(a || b || c)` over three 33-byte keys: what Init and Ack signatures cover.
pub fn signed_digest(
    a: &PublicKeyBytes,
    b: &PublicKeyBytes,
    ephemeral: &PublicKeyBytes,
) -> [u8; 32] {
    sha256(&[a.as_bytes(), b.as_bytes(), ephemeral.as_bytes()])
}

/// The initiator after sending `Init`, waiting for the `Ack`.
pub struct AwaitingAck {
    remote: PublicKeyBytes,
    ephemeral: KeyPair,
    init_id: String,
    init_body: Bytes,
}

impl AwaitingAck {
    /// Starts a handshake towards `remote` with a fresh ephemeral key; returns the `Init` body.
    pub fn start(local: &KeyPair, remote: PublicKeyBytes) -> (Self, Bytes) {
        Self::start_with(local, remote, KeyPair::generate(), random_id())
    }

    /// As [`AwaitingAck::start`] with a chosen ephemeral key and id (test vectors).
    pub fn start_with(
        local: &KeyPair,
        remote: PublicKeyBytes,
        ephemeral: KeyPair,
        init_id: String,
    ) -> (Self, Bytes) {
        let digest = signed_digest(local.public(), &remote, ephemeral.public());
        let init = Init {
            id: init_id.clone(),
            sender_pubkey: Bytes::copy_from_slice(local.public().as_bytes()),
            recipient_pubkey: Bytes::copy_from_slice(remote.as_bytes()),
            ephemeral_pubkey: Bytes::copy_from_slice(ephemeral.public().as_bytes()),
            signature: Bytes::copy_from_slice(&local.sign(&digest)),
        };
        let init_body = Bytes::from(init.encode_to_vec());
        let state = Self {
            remote,
            ephemeral,
            init_id,
            init_body: init_body.clone(),
        };
        (state, init_body)
    }

    /// Checks the responder's `Ack` and derives the session keys.
    pub fn on_ack(self, local: &KeyPair, ack_body: &[u8]) -> Result<Established, HandshakeError> {
        let schedule = self.schedule(local, ack_body)?;
        Ok(Established {
            remote: self.remote,
            keys: SessionKeys {
                send: schedule.initiator_to_responder(),
                recv: schedule.responder_to_initiator(),
            },
            transcript: schedule.transcript,
        })
    }

    /// Checks the `Ack` and returns the full key schedule (test vectors).
    pub fn schedule(
        &self,
        local: &KeyPair,
        ack_body: &[u8],
    ) -> Result<KeySchedule, HandshakeError> {
        let ack = Ack::decode(ack_body)?;
        if ack.init_id != self.init_id {
            return Err(HandshakeError::InitIdMismatch);
        }
        if !valid_id(&ack.id) {
            return Err(HandshakeError::BadField("id"));
        }
        check_len("ephemeral_pubkey", &ack.ephemeral_pubkey, PUBLIC_KEY_LEN)?;
        check_len("signature", &ack.signature, SIGNATURE_LEN)?;
        let remote_ephemeral =
            PublicKeyBytes::parse(&ack.ephemeral_pubkey).map_err(key_error("ephemeral_pubkey"))?;
        let digest = signed_digest(&self.remote, local.public(), &remote_ephemeral);
        self.remote
            .verify(&digest, &ack.signature)
            .map_err(key_error("signature"))?;
        Ok(KeySchedule::derive(
            &self.init_body,
            ack_body,
            self.ephemeral.ecdh(&remote_ephemeral),
            self.ephemeral.ecdh(&self.remote),
            local.ecdh(&remote_ephemeral),
        ))
    }
}

fn check_len(field: &'static str, value: &[u8], len: usize) -> Result<(), HandshakeError> {
    if value.len() == len {
        Ok(())
    } else {
        Err(HandshakeError::BadField(field))
    }
}

/// The responder's answer to a valid `Init`.
pub struct Response {
    pub ack_body: Bytes,
    pub established: Established,
}

/// Checks an `Init` cheapest first and answers it. `is_fresh` is asked last, once the signature
/// holds, whether the initiator's ephemeral key is new (it records the key as seen). The
/// responder's ephemeral key is made only for an `Init` that passed every check, so a flood of
/// bad `Init`s costs a signature verification each and no key generation.
pub fn respond(
    local: &KeyPair,
    init_body: &[u8],
    is_fresh: impl FnOnce(&PublicKeyBytes) -> bool,
) -> Result<Response, HandshakeError> {
    respond_inner(local, init_body, is_fresh, || {
        (KeyPair::generate(), random_id())
    })
    .map(|(response, _)| response)
}

/// As [`respond`] with a chosen ephemeral key and id; also returns the key schedule.
pub fn respond_with(
    local: &KeyPair,
    init_body: &[u8],
    is_fresh: impl FnOnce(&PublicKeyBytes) -> bool,
    ephemeral: KeyPair,
    ack_id: String,
) -> Result<(Response, KeySchedule), HandshakeError> {
    respond_inner(local, init_body, is_fresh, || (ephemeral, ack_id))
}

/// [`respond`], with the ephemeral key and `Ack` id made by `answer_with` once the `Init` holds.
fn respond_inner(
    local: &KeyPair,
    init_body: &[u8],
    is_fresh: impl FnOnce(&PublicKeyBytes) -> bool,
    answer_with: impl FnOnce() -> (KeyPair, String),
) -> Result<(Response, KeySchedule), HandshakeError> {
    let init = Init::decode(init_body)?;
    if init.recipient_pubkey.as_ref() != local.public().as_bytes() {
        return Err(HandshakeError::WrongRecipient);
    }
    if !valid_id(&init.id) {
        return Err(HandshakeError::BadField("id"));
    }
    check_len("sender_pubkey", &init.sender_pubkey, PUBLIC_KEY_LEN)?;
    check_len("ephemeral_pubkey", &init.ephemeral_pubkey, PUBLIC_KEY_LEN)?;
    check_len("signature", &init.signature, SIGNATURE_LEN)?;
    let sender = PublicKeyBytes::parse(&init.sender_pubkey).map_err(key_error("sender_pubkey"))?;
    let remote_ephemeral =
        PublicKeyBytes::parse(&init.ephemeral_pubkey).map_err(key_error("ephemeral_pubkey"))?;
    let digest = signed_digest(&sender, local.public(), &remote_ephemeral);
    sender
        .verify(&digest, &init.signature)
        .map_err(key_error("signature"))?;
    if !is_fresh(&remote_ephemeral) {
        return Err(HandshakeError::Replay);
    }

    let (ephemeral, ack_id) = answer_with();
    let ack_digest = signed_digest(local.public(), &sender, ephemeral.public());
    let ack = Ack {
        id: ack_id,
        init_id: init.id,
        ephemeral_pubkey: Bytes::copy_from_slice(ephemeral.public().as_bytes()),
        signature: Bytes::copy_from_slice(&local.sign(&ack_digest)),
    };
    let ack_body = Bytes::from(ack.encode_to_vec());
    let schedule = KeySchedule::derive(
        init_body,
        &ack_body,
        ephemeral.ecdh(&remote_ephemeral),
        local.ecdh(&remote_ephemeral),
        ephemeral.ecdh(&sender),
    );
    let established = Established {
        remote: sender,
        keys: SessionKeys {
            send: schedule.responder_to_initiator(),
            recv: schedule.initiator_to_responder(),
        },
        transcript: schedule.transcript,
    };
    Ok((
        Response {
            ack_body,
            established,
        },
        schedule,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::negate_s;

    fn pair() -> (KeyPair, KeyPair) {
        (KeyPair::generate(), KeyPair::generate())
    }

    #[test]
    fn both_roles_derive_mirrored_keys() {
        let (initiator, responder) = pair();
        let (waiting, init) = AwaitingAck::start(&initiator, *responder.public());
        let response = respond(&responder, &init, |_| true).unwrap();
        let done = waiting.on_ack(&initiator, &response.ack_body).unwrap();
        assert_eq!(done.remote, *responder.public());
        assert_eq!(response.established.remote, *initiator.public());
        assert_eq!(done.keys.send, response.established.keys.recv);
        assert_eq!(done.keys.recv, response.established.keys.send);
        assert_ne!(done.keys.send, done.keys.recv);
        assert_eq!(done.transcript, response.established.transcript);
    }

    #[test]
    fn responder_rejects_bad_inits() {
        let (initiator, responder) = pair();
        let (_, init) = AwaitingAck::start(&initiator, *responder.public());
        let mut decoded = Init::decode(&init[..]).unwrap();

        let reencode = |init: &Init| init.encode_to_vec();
        let err = |body: &[u8]| respond(&responder, body, |_| true).err().unwrap();

        let other = KeyPair::generate();
        let mut wrong = decoded.clone();
        wrong.recipient_pubkey = Bytes::copy_from_slice(other.public().as_bytes());
        assert_eq!(err(&reencode(&wrong)), HandshakeError::WrongRecipient);

        let mut high = decoded.clone();
        let sig: [u8; 64] = high.signature[..].try_into().unwrap();
        high.signature = Bytes::copy_from_slice(&negate_s(&sig));
        assert_eq!(err(&reencode(&high)).reason(), "high_s");

        let mut bad_sig = decoded.clone();
        let mut sig = bad_sig.signature.to_vec();
        sig[10] ^= 1;
        bad_sig.signature = sig.into();
        assert_eq!(err(&reencode(&bad_sig)).reason(), "bad_signature");

        let mut no_id = decoded.clone();
        no_id.id.clear();
        assert_eq!(err(&reencode(&no_id)), HandshakeError::BadField("id"));

        assert_eq!(err(b"\xff\xff\xff").reason(), "decode");
        assert_eq!(
            respond(&responder, &init, |_| false).err().unwrap(),
            HandshakeError::Replay
        );

        decoded.sender_pubkey = Bytes::from(vec![0x04; 33]);
        assert_eq!(err(&reencode(&decoded)).reason(), "invalid_key");
    }

    #[test]
    fn initiator_rejects_foreign_or_forged_acks() {
        let (initiator, responder) = pair();
        let (waiting, init) = AwaitingAck::start(&initiator, *responder.public());
        let response = respond(&responder, &init, |_| true).unwrap();

        let mut ack = Ack::decode(&response.ack_body[..]).unwrap();
        ack.init_id = "another".into();
        assert_eq!(
            waiting
                .schedule(&initiator, &ack.encode_to_vec())
                .err()
                .unwrap(),
            HandshakeError::InitIdMismatch
        );

        // An Ack signed by a key other than the one the initiator dialled.
        let impostor = KeyPair::generate();
        let init_for_impostor = {
            let mut init = Init::decode(&init[..]).unwrap();
            init.recipient_pubkey = Bytes::copy_from_slice(impostor.public().as_bytes());
            init.encode_to_vec()
        };
        // The impostor cannot even accept the Init (signature covers the recipient key)...
        assert!(respond(&impostor, &init_for_impostor, |_| true).is_err());
        // ...and an Ack it signs is refused by the initiator.
        let ephemeral = KeyPair::generate();
        let forged = Ack {
            id: "x".into(),
            init_id: Init::decode(&init[..]).unwrap().id,
            ephemeral_pubkey: Bytes::copy_from_slice(ephemeral.public().as_bytes()),
            signature: Bytes::copy_from_slice(&impostor.sign(&signed_digest(
                responder.public(),
                initiator.public(),
                ephemeral.public(),
            ))),
        };
        assert_eq!(
            waiting
                .on_ack(&initiator, &forged.encode_to_vec())
                .err()
                .unwrap()
                .reason(),
            "bad_signature"
        );
    }
}
