//! Long-term and ephemeral secp256k1 keys, the signatures and ECDH that botd/1 uses, and the
//! strict encodings the brief fixes: 33-byte compressed keys, 64-byte compact low-S signatures.

use std::fmt;
use std::sync::LazyLock;

use secp256k1::{ecdh::SharedSecret, ecdsa, All, Message, PublicKey, Secp256k1, SecretKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Length of a SEC1 compressed public key, the only encoding botd/1 accepts.
pub const PUBLIC_KEY_LEN: usize = 33;
/// Length of a compact `r || s` ECDSA signature.
pub const SIGNATURE_LEN: usize = 64;

static SECP: LazyLock<Secp256k1<All>> = LazyLock::new(Secp256k1::new);

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum KeyError {
    #[error("public key must be {PUBLIC_KEY_LEN} bytes (compressed), got {0}")]
    PublicKeyLength(usize),
    #[error("public key is not a valid secp256k1 point")]
    InvalidPublicKey,
    #[error("secret key must be 32 bytes in range")]
    InvalidSecretKey,
    #[error("signature must be {SIGNATURE_LEN} bytes, got {0}")]
    SignatureLength(usize),
    #[error("signature is not a valid compact encoding")]
    MalformedSignature,
    #[error("signature has a high s value")]
    HighS,
    #[error("signature does not verify")]
    BadSignature,
}

/// A validated public key together with its 33-byte wire form.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKeyBytes {
    key: PublicKey,
    bytes: [u8; PUBLIC_KEY_LEN],
}

impl PublicKeyBytes {
    /// Parses a key in the only accepted encoding: 33-byte SEC1 compressed.
    pub fn parse(bytes: &[u8]) -> Result<Self, KeyError> {
        let array: [u8; PUBLIC_KEY_LEN] = bytes
            .try_into()
            .map_err(|_| KeyError::PublicKeyLength(bytes.len()))?;
        if array[0] != 0x02 && array[0] != 0x03 {
            return Err(KeyError::InvalidPublicKey);
        }
        let key = PublicKey::from_slice(&array).map_err(|_| KeyError::InvalidPublicKey)?;
        Ok(Self { key, bytes: array })
    }

    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let raw = hex::decode(text.trim()).map_err(|_| KeyError::InvalidPublicKey)?;
        Self::parse(&raw)
    }

    pub fn as_bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.bytes
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.bytes)
    }

    /// Verifies a 64-byte compact signature over a 32-byte digest, rejecting high-S forms.
    pub fn verify(&self, digest: &[u8; 32], signature: &[u8]) -> Result<(), KeyError> {
        if signature.len() != SIGNATURE_LEN {
            return Err(KeyError::SignatureLength(signature.len()));
        }
        let sig =
            ecdsa::Signature::from_compact(signature).map_err(|_| KeyError::MalformedSignature)?;
        let mut normalized = sig;
        normalized.normalize_s();
        if normalized != sig {
            return Err(KeyError::HighS);
        }
        SECP.verify_ecdsa(&Message::from_digest(*digest), &sig, &self.key)
            .map_err(|_| KeyError::BadSignature)
    }

    pub(crate) fn point(&self) -> &PublicKey {
        &self.key
    }

    /// The 65-byte uncompressed SEC1 form, which botd/1 never accepts (conformance probes send
    /// it to check that a peer refuses it).
    pub fn uncompressed(&self) -> [u8; 65] {
        self.key.serialize_uncompressed()
    }
}

impl From<PublicKey> for PublicKeyBytes {
    fn from(key: PublicKey) -> Self {
        Self {
            key,
            bytes: key.serialize(),
        }
    }
}

impl fmt::Debug for PublicKeyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_hex())
    }
}

impl fmt::Display for PublicKeyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A secp256k1 key pair: a node's long-term identity or a handshake's ephemeral key.
/// The secret is wiped when the pair is dropped.
pub struct KeyPair {
    secret: SecretKey,
    public: PublicKeyBytes,
}

impl KeyPair {
    pub fn generate() -> Self {
        let secret = SecretKey::new(&mut rand::thread_rng());
        Self::from_secret(secret)
    }

    pub fn from_secret_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        let secret = SecretKey::from_slice(bytes).map_err(|_| KeyError::InvalidSecretKey)?;
        Ok(Self::from_secret(secret))
    }

    fn from_secret(secret: SecretKey) -> Self {
        let public = PublicKey::from_secret_key(&SECP, &secret).into();
        Self { secret, public }
    }

    pub fn public(&self) -> &PublicKeyBytes {
        &self.public
    }

    /// The secret scalar, for writing a key file; the caller must keep it out of logs.
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.secret.secret_bytes())
    }

    /// Signs a 32-byte digest: RFC 6979 nonce, low-S, 64-byte compact form.
    pub fn sign(&self, digest: &[u8; 32]) -> [u8; SIGNATURE_LEN] {
        SECP.sign_ecdsa(&Message::from_digest(*digest), &self.secret)
            .serialize_compact()
    }

    /// libsecp256k1's default ECDH: SHA-256 of the compressed shared point.
    pub fn ecdh(&self, remote: &PublicKeyBytes) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(SharedSecret::new(remote.point(), &self.secret).secret_bytes())
    }
}

impl Drop for KeyPair {
    fn drop(&mut self) {
        self.secret.non_secure_erase();
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// SHA-256 of the plain concatenation of the given parts.
pub fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// Replaces `s` by `n - s`, turning a low-S signature into its equally valid high-S twin. Used by
/// tests and the test-vector generator to build the malleated form peers must reject.
pub fn negate_s(sig: &[u8; SIGNATURE_LEN]) -> [u8; SIGNATURE_LEN] {
    const N: [u8; 32] = [
        0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
        0xFE, 0xBA, 0xAE, 0xDC, 0xE6, 0xAF, 0x48, 0xA0, 0x3B, 0xBF, 0xD2, 0x5E, 0x8C, 0xD0, 0x36,
        0x41, 0x41,
    ];
    let mut out = *sig;
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let diff = N[i] as i16 - sig[32 + i] as i16 - borrow;
        out[32 + i] = diff.rem_euclid(256) as u8;
        borrow = i16::from(diff < 0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_uncompressed_and_off_curve_keys() {
        let pair = KeyPair::generate();
        let uncompressed = pair.public().point().serialize_uncompressed();
        assert_eq!(
            PublicKeyBytes::parse(&uncompressed),
            Err(KeyError::PublicKeyLength(65))
        );
        let mut bad = *pair.public().as_bytes();
        bad[0] = 0x04;
        assert_eq!(PublicKeyBytes::parse(&bad), Err(KeyError::InvalidPublicKey));
        // x = 5 has no point on secp256k1 (5^3 + 7 = 132 is not a square mod p).
        let mut off_curve = [0u8; 33];
        off_curve[0] = 0x02;
        off_curve[32] = 5;
        assert_eq!(
            PublicKeyBytes::parse(&off_curve),
            Err(KeyError::InvalidPublicKey)
        );
    }

    #[test]
    fn signature_round_trip_and_high_s_rejected() {
        let pair = KeyPair::generate();
        let digest = sha256(&[b"hello"]);
        let sig = pair.sign(&digest);
        pair.public().verify(&digest, &sig).unwrap();
        let other = sha256(&[b"other"]);
        assert_eq!(
            pair.public().verify(&other, &sig),
            Err(KeyError::BadSignature)
        );
        assert_eq!(
            pair.public().verify(&digest, &negate_s(&sig)),
            Err(KeyError::HighS)
        );
    }

    #[test]
    fn ecdh_agrees_both_ways() {
        let a = KeyPair::generate();
        let b = KeyPair::generate();
        assert_eq!(*a.ecdh(b.public()), *b.ecdh(a.public()));
    }
}
