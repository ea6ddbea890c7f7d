//! Per-direction frame protection after the handshake: AES-256-CTR with an implicit 64-bit frame
//! counter, a truncated HMAC-SHA256 tag checked in constant time before decryption, and the key
//! rotation every 1024 frames.

use aes::cipher::{BlockEncrypt, KeyInit};
use aes::Aes256Enc;
use bytes::{BufMut, Bytes, BytesMut};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Bytes of HMAC-SHA256 kept as the frame tag.
pub const TAG_LEN: usize = 16;
/// Keys of a direction are replaced after the frame whose `seq % REKEY_INTERVAL == REKEY_INTERVAL - 1`.
pub const REKEY_INTERVAL: u64 = 1024;
const REKEY_INFO: &[u8] = b"botd/1 rekey";

type HmacSha256 = Hmac<Sha256>;

/// Keystream blocks made at a time.
const KEYSTREAM_BLOCKS: usize = 16;

/// AES-256-CTR with a 64-bit big-endian block counter after the 64-bit frame counter (the
/// `ctr` crate's `Ctr64BE` with IV `seq || 0`), keyed by a borrowed key schedule: blocks of
/// keystream are encrypted [`KEYSTREAM_BLOCKS`] at a time and used across the parts of a
/// plaintext. (Unlike the `ctr` crate with `zeroize`, the keystream left on the stack is not
/// wiped: it tells only what the frame's plaintext, which the caller holds in its buffers
/// anyway, XOR its ciphertext tells.)
struct Keystream<'a> {
    aes: &'a Aes256Enc,
    seq: [u8; 8],
    /// The next block's counter.
    counter: u64,
    blocks: [aes::Block; KEYSTREAM_BLOCKS],
    /// Blocks of keystream in `blocks`, and the bytes of them already used.
    made: usize,
    used: usize,
}

/// Keystream for one stretch of data: a whole block, or part of one.
enum Key<'k> {
    Block(u128),
    Bytes(&'k [u8]),
}

impl<'a> Keystream<'a> {
    fn new(aes: &'a Aes256Enc, seq: u64) -> Self {
        Self {
            aes,
            seq: seq.to_be_bytes(),
            counter: 0,
            blocks: [aes::Block::default(); KEYSTREAM_BLOCKS],
            made: 0,
            used: 0,
        }
    }

    /// Hands out the keystream for `len` bytes, as `(offset, key)` stretches in order.
    fn stream(&mut self, len: usize, mut xor: impl FnMut(usize, Key<'_>)) {
        let mut at = 0;
        while at < len {
            if self.used == self.made * 16 {
                let blocks = (len - at).div_ceil(16).clamp(1, KEYSTREAM_BLOCKS);
                for block in &mut self.blocks[..blocks] {
                    block[..8].copy_from_slice(&self.seq);
                    block[8..].copy_from_slice(&self.counter.to_be_bytes());
                    self.counter = self.counter.wrapping_add(1);
                }
                self.aes.encrypt_blocks(&mut self.blocks[..blocks]);
                self.made = blocks;
                self.used = 0;
            }
            let (block, offset) = (self.used / 16, self.used % 16);
            if offset == 0 && len - at >= 16 {
                let whole = (self.made - block).min((len - at) / 16);
                for key in &self.blocks[block..block + whole] {
                    xor(at, Key::Block(u128::from_ne_bytes((*key).into())));
                    at += 16;
                }
                self.used += whole * 16;
            } else {
                let take = (16 - offset).min(len - at);
                xor(at, Key::Bytes(&self.blocks[block][offset..offset + take]));
                at += take;
                self.used += take;
            }
        }
    }

    /// XORs the keystream into `data`.
    fn apply(&mut self, data: &mut [u8]) {
        self.stream(data.len(), |at, key| match key {
            Key::Block(key) => {
                let word = &mut data[at..at + 16];
                let value = u128::from_ne_bytes(word.try_into().expect("16 bytes")) ^ key;
                word.copy_from_slice(&value.to_ne_bytes());
            }
            Key::Bytes(key) => {
                for (d, k) in data[at..at + key.len()].iter_mut().zip(key) {
                    *d ^= k;
                }
            }
        });
    }

    /// Writes `src` XOR keystream to `dst` (of the same length).
    fn apply_b2b(&mut self, src: &[u8], dst: &mut [u8]) {
        debug_assert_eq!(src.len(), dst.len());
        self.stream(src.len(), |at, key| match key {
            Key::Block(key) => {
                let value =
                    u128::from_ne_bytes(src[at..at + 16].try_into().expect("16 bytes")) ^ key;
                dst[at..at + 16].copy_from_slice(&value.to_ne_bytes());
            }
            Key::Bytes(key) => {
                for ((d, s), k) in dst[at..at + key.len()]
                    .iter_mut()
                    .zip(&src[at..at + key.len()])
                    .zip(key)
                {
                    *d = s ^ k;
                }
            }
        });
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CipherError {
    #[error("frame shorter than its tag")]
    Truncated,
    #[error("frame tag does not verify")]
    BadTag,
}

/// The two 32-byte keys of one direction.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct DirectionKeys {
    pub enc: [u8; 32],
    pub mac: [u8; 32],
}

impl DirectionKeys {
    /// The next keys: `enc' || mac' = HKDF-SHA256(salt = mac, ikm = enc, info = "botd/1 rekey")`.
    pub fn rotated(&self) -> DirectionKeys {
        let mut okm = [0u8; 64];
        Hkdf::<Sha256>::new(Some(&self.mac), &self.enc)
            .expand(REKEY_INFO, &mut okm)
            .expect("64 bytes is a valid HKDF-SHA256 length");
        let mut next = DirectionKeys {
            enc: [0; 32],
            mac: [0; 32],
        };
        next.enc.copy_from_slice(&okm[..32]);
        next.mac.copy_from_slice(&okm[32..]);
        okm.zeroize();
        next
    }
}

impl std::fmt::Debug for DirectionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DirectionKeys(..)")
    }
}

/// A direction's keys in the form the primitives use: the expanded AES key schedule
/// (encryption only: CTR never decrypts a block) and the keyed HMAC state, so a frame costs no
/// key setup.
struct Keyed {
    aes: Aes256Enc,
    mac: HmacSha256,
}

impl Keyed {
    fn new(keys: &DirectionKeys) -> Self {
        Self {
            aes: Aes256Enc::new(&keys.enc.into()),
            mac: <HmacSha256 as Mac>::new_from_slice(&keys.mac).expect("HMAC takes any key size"),
        }
    }
}

/// One direction's keys and frame counter. The keyed primitives take about 2 KiB (the AES
/// implementation reserves room for its software fallback), so they exist only while the
/// session is busy: [`DirectionState::release`] drops them when it goes quiet, and the next
/// frame keys them again (about 100 ns).
struct DirectionState {
    keys: DirectionKeys,
    keyed: Option<Box<Keyed>>,
    seq: u64,
}

impl DirectionState {
    fn new(keys: DirectionKeys) -> Self {
        Self {
            keys,
            keyed: None,
            seq: 0,
        }
    }

    fn keyed(&mut self) -> &Keyed {
        let keys = &self.keys;
        self.keyed.get_or_insert_with(|| Box::new(Keyed::new(keys)))
    }

    fn release(&mut self) {
        self.keyed = None;
    }

    /// The CTR keystream of the current frame, encrypted from the borrowed key schedule (no
    /// copy of it per frame).
    fn ctr(&mut self) -> Keystream<'_> {
        let seq = self.seq;
        Keystream::new(&self.keyed().aes, seq)
    }

    fn keystream(&mut self, data: &mut [u8]) {
        self.ctr().apply(data);
    }

    fn tag_mac(&mut self, ciphertext: &[u8]) -> HmacSha256 {
        let seq = self.seq;
        let mut mac = self.keyed().mac.clone();
        mac.update(&seq.to_be_bytes());
        mac.update(ciphertext);
        mac
    }

    /// Moves to the next frame, rotating keys at the end of each block of 1024 frames.
    fn advance(&mut self) {
        if self.seq % REKEY_INTERVAL == REKEY_INTERVAL - 1 {
            let next = self.keys.rotated();
            let seq = self.seq;
            *self = Self::new(next);
            self.seq = seq;
        }
        self.seq += 1;
    }

    #[cfg(test)]
    fn keys(&self) -> &DirectionKeys {
        &self.keys
    }
}

/// Protects outgoing frames of one direction.
pub struct Sealer(DirectionState);

impl Sealer {
    pub fn new(keys: DirectionKeys) -> Self {
        Self(DirectionState::new(keys))
    }

    /// Drops the keyed primitives until the next frame (an idle session holds only its keys).
    pub fn release(&mut self) {
        self.0.release();
    }

    /// The counter the next sealed frame will use.
    pub fn seq(&self) -> u64 {
        self.0.seq
    }

    /// Seals the plaintext that `write` produces (exactly `plaintext_len` bytes) and appends the
    /// whole wire frame `len (u32 BE) || ciphertext || tag` to `out`. The plaintext is encoded
    /// into a buffer of the thread's and encrypted from there into `out` in one pass: a
    /// connection seals all it has ready into one output buffer and writes it with one call,
    /// and no frame costs an allocation.
    pub fn seal_into(
        &mut self,
        out: &mut BytesMut,
        plaintext_len: usize,
        write: impl FnOnce(&mut Vec<u8>),
    ) {
        PLAINTEXT.with(|scratch| {
            let mut plaintext = scratch.borrow_mut();
            plaintext.clear();
            write(&mut plaintext);
            debug_assert_eq!(
                plaintext.len(),
                plaintext_len,
                "writer wrote the announced length"
            );
            self.seal_bytes(out, &plaintext);
            if plaintext.capacity() > MAX_KEPT_SCRATCH {
                *plaintext = Vec::new();
            }
        })
    }

    /// Seals a plaintext given as bytes, appending the wire frame to `out`.
    pub fn seal_bytes(&mut self, out: &mut BytesMut, plaintext: &[u8]) {
        self.seal_parts(out, &[plaintext]);
    }

    /// Seals the plaintext made of `parts` one after the other, encrypting each straight from
    /// where it lies (a stored payload is not copied into a plaintext buffer first).
    pub fn seal_parts(&mut self, out: &mut BytesMut, parts: &[&[u8]]) {
        let plaintext_len: usize = parts.iter().map(|p| p.len()).sum();
        let body_len = plaintext_len + TAG_LEN;
        out.reserve(4 + body_len);
        out.put_u32(body_len as u32);
        let start = out.len();
        out.resize(start + plaintext_len, 0);
        let state = &mut self.0;
        let mut ctr = state.ctr();
        let mut at = start;
        for part in parts {
            ctr.apply_b2b(part, &mut out[at..at + part.len()]);
            at += part.len();
        }
        let tag = state.tag_mac(&out[start..]).finalize().into_bytes();
        out.extend_from_slice(&tag[..TAG_LEN]);
        state.advance();
    }

    /// Seals a plaintext given as bytes and returns the wire frame.
    pub fn seal(&mut self, plaintext: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(4 + plaintext.len() + TAG_LEN);
        self.seal_bytes(&mut out, plaintext);
        out.freeze()
    }
}

thread_local! {
    /// Where plaintext is encoded before it is sealed.
    static PLAINTEXT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A thread's plaintext buffer keeps at most this much capacity between frames.
const MAX_KEPT_SCRATCH: usize = 1 << 20;

/// Checks and decrypts incoming frames of one direction.
pub struct Opener(DirectionState);

impl Opener {
    pub fn new(keys: DirectionKeys) -> Self {
        Self(DirectionState::new(keys))
    }

    /// Drops the keyed primitives until the next frame (an idle session holds only its keys).
    pub fn release(&mut self) {
        self.0.release();
    }

    /// The counter the next opened frame must carry.
    pub fn seq(&self) -> u64 {
        self.0.seq
    }

    /// Verifies the tag (constant time) and decrypts the frame body in place, returning the
    /// plaintext. A failed frame leaves the counter where it was; the session must close anyway.
    pub fn open(&mut self, mut body: BytesMut) -> Result<BytesMut, CipherError> {
        if body.len() < TAG_LEN {
            return Err(CipherError::Truncated);
        }
        let ciphertext_len = body.len() - TAG_LEN;
        let (ciphertext, tag) = body.split_at(ciphertext_len);
        let state = &mut self.0;
        state
            .tag_mac(ciphertext)
            .verify_truncated_left(tag)
            .map_err(|_| CipherError::BadTag)?;
        body.truncate(ciphertext_len);
        state.keystream(&mut body);
        state.advance();
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(byte: u8) -> DirectionKeys {
        DirectionKeys {
            enc: [byte; 32],
            mac: [byte.wrapping_add(1); 32],
        }
    }

    fn body(frame: &Bytes) -> BytesMut {
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 4);
        BytesMut::from(&frame[4..])
    }

    #[test]
    fn seal_open_round_trip_across_rotations() {
        let mut sealer = Sealer::new(keys(7));
        let mut opener = Opener::new(keys(7));
        for i in 0..3000u32 {
            let plaintext = i.to_be_bytes().repeat((i % 50) as usize);
            let frame = sealer.seal(&plaintext);
            assert_eq!(&opener.open(body(&frame)).unwrap()[..], &plaintext[..]);
        }
        assert_eq!(sealer.seq(), 3000);
        assert_eq!(opener.seq(), 3000);
        assert_eq!(sealer.0.keys(), &keys(7).rotated().rotated());
    }

    #[test]
    fn replayed_reordered_and_corrupt_frames_fail() {
        let mut sealer = Sealer::new(keys(1));
        let mut opener = Opener::new(keys(1));
        let first = sealer.seal(b"first");
        let second = sealer.seal(b"second");
        assert_eq!(opener.open(body(&second)), Err(CipherError::BadTag));
        opener.open(body(&first)).unwrap();
        assert_eq!(opener.open(body(&first)), Err(CipherError::BadTag));
        let mut flipped = body(&second);
        flipped[0] ^= 1;
        assert_eq!(opener.open(flipped), Err(CipherError::BadTag));
        assert_eq!(
            opener.open(BytesMut::from(&b"short"[..])),
            Err(CipherError::Truncated)
        );
        assert_eq!(&opener.open(body(&second)).unwrap()[..], b"second");
    }

    #[test]
    fn keystream_is_ctr64be_with_the_frame_counter_as_iv() {
        use aes::cipher::{KeyIvInit, StreamCipher};
        let key = [9u8; 32];
        let aes = Aes256Enc::new(&key.into());
        for (seq, len) in [
            (0u64, 0usize),
            (1, 1),
            (5, 15),
            (1023, 16),
            (7, 255),
            (8, 256),
            (9, 257),
            (u64::MAX, 5000),
        ] {
            let mut iv = [0u8; 16];
            iv[..8].copy_from_slice(&seq.to_be_bytes());
            let mut want = vec![0x3c; len];
            ctr::Ctr64BE::<Aes256Enc>::new(&key.into(), &iv.into()).apply_keystream(&mut want);
            let mut got = vec![0x3c; len];
            Keystream::new(&aes, seq).apply(&mut got);
            assert_eq!(got, want, "seq {seq}, {len} bytes");
            // The same in uneven parts, as a sealed Deliver is (head, payload, tail).
            let src = vec![0x3c; len];
            let mut parts = vec![0; len];
            let mut stream = Keystream::new(&aes, seq);
            let mut at = 0;
            for step in [3usize, 100, 1, 300, 17].iter().cycle() {
                if at == len {
                    break;
                }
                let end = (at + step).min(len);
                stream.apply_b2b(&src[at..end], &mut parts[at..end]);
                at = end;
            }
            assert_eq!(parts, want, "seq {seq}, {len} bytes in parts");
        }
    }

    #[test]
    fn wrong_key_fails() {
        let mut sealer = Sealer::new(keys(1));
        let mut opener = Opener::new(keys(2));
        assert_eq!(
            opener.open(body(&sealer.seal(b"x"))),
            Err(CipherError::BadTag)
        );
    }
}
