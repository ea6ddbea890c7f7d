#!/usr/bin/env python3
"""Independent reference implementation of the botd/1 wire rules, used to publish test vectors.

Requires Python >= 3.8 and two pip packages:

    pip install ecdsa cryptography

  - ecdsa:        secp256k1 curve arithmetic, and a second RFC 6979 signer to cross-check ours
  - cryptography: the AES-256 block function (ECB on one block at a time; CTR is built here),
                  a second HKDF and a second ECDH to cross-check ours

Run from the repository root:

    python3 botd-protocol/tests/vectors/reference.py

It writes handshake.json and failures.json next to this file.
`botd-protocol/tests/vectors.rs` checks the Rust implementation against those files.

This file is written from the wire brief (botd-wire-v1.md), not from the Rust code:
  1. encodings: 33-byte compressed keys; ECDSA secp256k1, RFC 6979 nonces (SHA-256), low-S,
     64-byte compact r||s; sha256(a, b, c) = SHA-256 of the plain concatenation of three keys;
     ECDH(x, Y) = SHA-256 of the 33-byte compressed point x*Y (libsecp256k1's default).
  2. framing: u32 big-endian length || body.
  3. handshake: Init{id=1, sender_pubkey=2, recipient_pubkey=3, ephemeral_pubkey=4, signature=5},
     Ack{id=1, init_id=2, ephemeral_pubkey=3, signature=4}; protobuf encoded by hand here.
  4. key schedule: ee/es/se, h = SHA-256("botd/1 transcript" || init_body || ack_body),
     okm = HKDF-SHA256(salt=h, ikm=ee||es||se, info="botd/1 session keys", L=128).
  5. frames: AES-256-CTR, iv = seq u64 BE || 0u64 (64-bit BE block counter),
     tag = HMAC-SHA256(k_mac, seq u64 BE || ciphertext)[:16]; after the frame with
     seq % 1024 == 1023: k_enc'||k_mac' = HKDF-SHA256(salt=k_mac, ikm=k_enc, info="botd/1 rekey", L=64).

Before writing anything the script runs self-checks of every primitive against published
test values (RFC 6979 secp256k1 vectors, RFC 5869, RFC 4231, NIST SP 800-38A) and against the
second implementation from the pip packages; it refuses to write vectors if any fails.
"""

import hashlib
import hmac
import json
import os
import sys

try:
    import ecdsa
    from ecdsa import SECP256k1
    from ecdsa.ellipticcurve import PointJacobi
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
except ImportError as exc:  # pragma: no cover
    sys.exit(f"missing package ({exc}); run: pip install ecdsa cryptography")

HERE = os.path.dirname(os.path.abspath(__file__))

# --------------------------------------------------------------------------------------------
# secp256k1
# --------------------------------------------------------------------------------------------

CURVE = SECP256k1.curve
G = SECP256k1.generator
N = SECP256k1.order
P = CURVE.p()
HALF_N = N // 2


def i2b(x, n=32):
    return x.to_bytes(n, "big")


def b2i(b):
    return int.from_bytes(b, "big")


def sha256(*parts):
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.digest()


def compress(point):
    """SEC1 compressed encoding (33 bytes)."""
    x, y = point.x(), point.y()
    return bytes([2 + (y & 1)]) + i2b(x)


def uncompressed(point):
    return b"\x04" + i2b(point.x()) + i2b(point.y())


def decompress(data):
    """Strict: only 33-byte 02/03 points on the curve."""
    if len(data) != 33 or data[0] not in (2, 3):
        raise ValueError("not a compressed key")
    x = b2i(data[1:])
    if x >= P:
        raise ValueError("x out of range")
    y2 = (pow(x, 3, P) + 7) % P
    y = pow(y2, (P + 1) // 4, P)
    if y * y % P != y2:
        raise ValueError("not on the curve")
    if (y & 1) != (data[0] & 1):
        y = P - y
    return ecdsa.ellipticcurve.Point(CURVE, x, y, N)


def public_key(secret):
    d = b2i(secret)
    assert 0 < d < N
    return compress(G * d)


def ecdh(secret, public):
    """libsecp256k1 default ECDH: SHA-256 of the compressed shared point."""
    shared = decompress(public) * b2i(secret)
    return sha256(compress(shared))


# ---- RFC 6979 (HMAC-SHA256), written out by hand; checked against python-ecdsa's signer ----

def rfc6979_k(secret, digest):
    """RFC 6979 section 3.2 with H = SHA-256, qlen = 256, message hash h1 = digest."""
    x = b2i(secret)
    h1 = b2i(digest)
    # bits2octets(h1): reduce mod n (qlen == hlen == 256, so bits2int is the identity).
    h1_octets = i2b(h1 % N)
    v = b"\x01" * 32
    k = b"\x00" * 32
    k = hmac.new(k, v + b"\x00" + i2b(x) + h1_octets, hashlib.sha256).digest()
    v = hmac.new(k, v, hashlib.sha256).digest()
    k = hmac.new(k, v + b"\x01" + i2b(x) + h1_octets, hashlib.sha256).digest()
    v = hmac.new(k, v, hashlib.sha256).digest()
    while True:
        v = hmac.new(k, v, hashlib.sha256).digest()
        cand = b2i(v)
        if 1 <= cand < N:
            yield cand
        k = hmac.new(k, v + b"\x00", hashlib.sha256).digest()
        v = hmac.new(k, v, hashlib.sha256).digest()


def sign(secret, digest):
    """ECDSA over secp256k1, RFC 6979 nonce, low-S normalised, 64-byte compact r || s."""
    d = b2i(secret)
    z = b2i(digest) % N
    for k in rfc6979_k(secret, digest):
        r = (G * k).x() % N
        if r == 0:
            continue
        s = pow(k, -1, N) * (z + r * d) % N
        if s == 0:
            continue
        if s > HALF_N:
            s = N - s
        return i2b(r) + i2b(s)


def high_s_twin(sig):
    r, s = sig[:32], b2i(sig[32:])
    return r + i2b(N - s)


def verify(public, digest, sig, allow_high_s=False):
    """Plain ECDSA verification, by hand; low-S enforced unless allow_high_s."""
    if len(sig) != 64:
        return False
    r, s = b2i(sig[:32]), b2i(sig[32:])
    if not (1 <= r < N and 1 <= s < N):
        return False
    if s > HALF_N and not allow_high_s:
        return False
    q = decompress(public)
    z = b2i(digest) % N
    w = pow(s, -1, N)
    pt = G * (z * w % N) + q * (r * w % N)
    return pt != ecdsa.ellipticcurve.INFINITY and pt.x() % N == r


# --------------------------------------------------------------------------------------------
# HMAC / HKDF / AES-256-CTR (64-bit counter) / frames
# --------------------------------------------------------------------------------------------

def hmac_sha256(key, *parts):
    m = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:
        m.update(p)
    return m.digest()


def hkdf_sha256(salt, ikm, info, length):
    """RFC 5869, by hand."""
    prk = hmac_sha256(salt, ikm)
    out, t, i = b"", b"", 1
    while len(out) < length:
        t = hmac_sha256(prk, t, info, bytes([i]))
        out += t
        i += 1
    return out[:length]


def aes256_block(key, block):
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return enc.update(block) + enc.finalize()


def aes256_ctr64be(key, iv, data):
    """CTR where only the last 8 bytes of the counter block count (big-endian, wrapping mod 2^64);
    the first 8 bytes (the nonce, here seq) never change."""
    nonce, ctr = iv[:8], b2i(iv[8:])
    out = bytearray()
    for off in range(0, len(data), 16):
        ks = aes256_block(key, nonce + i2b(ctr, 8))
        chunk = data[off:off + 16]
        out += bytes(a ^ b for a, b in zip(chunk, ks))
        ctr = (ctr + 1) % (1 << 64)
    return bytes(out)


TAG_LEN = 16
REKEY_INTERVAL = 1024


def rekey(k_enc, k_mac):
    okm = hkdf_sha256(k_mac, k_enc, b"botd/1 rekey", 64)
    return okm[:32], okm[32:]


class Direction:
    """One direction's keys and implicit counter (sealing and opening are the same walk)."""

    def __init__(self, k_enc, k_mac):
        self.k_enc, self.k_mac, self.seq = k_enc, k_mac, 0

    def _advance(self):
        if self.seq % REKEY_INTERVAL == REKEY_INTERVAL - 1:
            self.k_enc, self.k_mac = rekey(self.k_enc, self.k_mac)
        self.seq += 1

    def seal(self, plaintext):
        seq_be = i2b(self.seq, 8)
        iv = seq_be + b"\x00" * 8
        ct = aes256_ctr64be(self.k_enc, iv, plaintext)
        tag = hmac_sha256(self.k_mac, seq_be, ct)[:TAG_LEN]
        body = ct + tag
        self._advance()
        return i2b(len(body), 4) + body

    def open(self, body):
        if len(body) < TAG_LEN:
            raise ValueError("truncated")
        ct, tag = body[:-TAG_LEN], body[-TAG_LEN:]
        seq_be = i2b(self.seq, 8)
        if not hmac.compare_digest(hmac_sha256(self.k_mac, seq_be, ct)[:TAG_LEN], tag):
            raise ValueError("bad_tag")
        pt = aes256_ctr64be(self.k_enc, seq_be + b"\x00" * 8, ct)
        self._advance()
        return pt


# --------------------------------------------------------------------------------------------
# protobuf (proto3) by hand: fields in number order, zero / empty fields omitted
# --------------------------------------------------------------------------------------------

def varint(n):
    assert n >= 0
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pb_varint(field, value):
    return b"" if value == 0 else varint(field << 3 | 0) + varint(value)


def pb_bytes(field, value):
    if isinstance(value, str):
        value = value.encode("utf-8")
    return b"" if len(value) == 0 else varint(field << 3 | 2) + varint(len(value)) + value


def pb_message(field, encoded):
    """A set oneof member / sub-message field is emitted even when its encoding is empty."""
    return varint(field << 3 | 2) + varint(len(encoded)) + encoded


def encode_init(id_, sender, recipient, ephemeral, signature):
    return (pb_bytes(1, id_) + pb_bytes(2, sender) + pb_bytes(3, recipient)
            + pb_bytes(4, ephemeral) + pb_bytes(5, signature))


def encode_ack(id_, init_id, ephemeral, signature):
    return pb_bytes(1, id_) + pb_bytes(2, init_id) + pb_bytes(3, ephemeral) + pb_bytes(4, signature)


def encode_ping(id_):
    return pb_bytes(1, id_)


def encode_pong(id_, ping_id):
    return pb_bytes(1, id_) + pb_bytes(2, ping_id)


def encode_welcome(protocol, server_version, max_frame_len, max_payload_len, ping_interval_ms,
                   server_time_ms, idle_timeout_ms, relay_pubkey):
    return (pb_bytes(1, protocol) + pb_bytes(2, server_version) + pb_varint(3, max_frame_len)
            + pb_varint(4, max_payload_len) + pb_varint(5, ping_interval_ms)
            + pb_varint(6, server_time_ms) + pb_varint(7, idle_timeout_ms)
            + pb_bytes(8, relay_pubkey))


# Frame field numbers (proto/frame.proto): id = 1, welcome = 2, ping = 4, pong = 5.
def encode_frame(id_, body_field, body):
    return pb_varint(1, id_) + pb_message(body_field, body)


# --------------------------------------------------------------------------------------------
# self-checks against published values and against the pip packages
# --------------------------------------------------------------------------------------------

def self_check():
    # secp256k1 generator and 2G.
    assert public_key(i2b(1)).hex() == (
        "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798")
    assert public_key(i2b(2)).hex() == (
        "02c6047f9441ed7d6d3045406e95c07cd85c778e4b8cef3ca7abac09b95c709ee5")
    assert decompress(public_key(i2b(3))) == G * 3

    # RFC 6979 secp256k1 / SHA-256 vectors (bitcointalk topic 285142, used by bitcoinj,
    # python-ecdsa, trezor-crypto), k and the low-S signature.
    known = [
        (1, b"Satoshi Nakamoto",
         0x8F8A276C19F4149656B280621E358CCE24F5F52542772691EE69063B74F15D15,
         "934b1ea10a4b3c1757e2b0c017d0b6143ce3c9a7e6a4a49860d7a6ab210ee3d8"
         "2442ce9d2b916064108014783e923ec36b49743e2ffa1c4496f01a512aafd9e5"),
        (1, b"All those moments will be lost in time, like tears in rain. Time to die...",
         0x38AA22D72376B4DBC472E06C3BA403EE0A394DA63FC58D88686C611ABA98D6B3,
         "8600dbd41e348fe5c9465ab92d23e3db8b98b873beecd930736488696438cb6b"
         "547fe64427496db33bf66019dacbf0039c04199abb0122918601db38a72cfc21"),
        (N - 1, b"Satoshi Nakamoto",
         0x33A19B60E25FB6F4435AF53A3D42D493644827367E6453928554F43E49AA6F90,
         "fd567d121db66e382991534ada77a6bd3106f0a1098c231e47993447cd6af2d0"
         "6b39cd0eb1bc8603e159ef5c20a5c8ad685a45b06ce9bebed3f153d10d93bed5"),
        (0xf8b8af8ce3c7cca5e300d33939540c10d45ce001b8f252bfbc57ba0342904181, b"Alan Turing",
         0x525A82B70E67874398067543FD84C83D30C175FDC45FDEEE082FE13B1D7CFDF1,
         "7063ae83e7f62bbb171798131b4a0564b956930092b33b07b395615d9ec7e15c"
         "58dfcc1e00a35e1572f366ffe34ba0fc47db1e7189759b9fb233c5b05ab388ea"),
    ]
    for d, msg, k, sig_hex in known:
        digest = sha256(msg)
        assert next(rfc6979_k(i2b(d), digest)) == k, "RFC 6979 nonce"
        sig = sign(i2b(d), digest)
        assert sig.hex() == sig_hex, "RFC 6979 signature"
        assert verify(public_key(i2b(d)), digest, sig)
        assert not verify(public_key(i2b(d)), digest, high_s_twin(sig))
        assert verify(public_key(i2b(d)), digest, high_s_twin(sig), allow_high_s=True)

    # Our signer against python-ecdsa's RFC 6979 signer (then low-S normalised).
    for d in (0x11, 0x22, 0xDEADBEEF, N - 2):
        digest = sha256(i2b(d))
        sk = ecdsa.SigningKey.from_secret_exponent(d, curve=SECP256k1, hashfunc=hashlib.sha256)
        r, s = sk.sign_digest_deterministic(
            digest, hashfunc=hashlib.sha256, sigencode=lambda r, s, order: (r, s))
        if s > HALF_N:
            s = N - s
        assert sign(i2b(d), digest) == i2b(r) + i2b(s), "python-ecdsa RFC 6979 disagrees"
        vk = sk.get_verifying_key()
        assert vk.verify_digest(sign(i2b(d), digest), digest, sigdecode=ecdsa.util.sigdecode_string)
        assert vk.to_string("compressed") == public_key(i2b(d))

    # ECDH: symmetric, and the shared x equals the one from `cryptography` (OpenSSL).
    a, b = i2b(0x1234), i2b(0xABCDEF)
    assert ecdh(a, public_key(b)) == ecdh(b, public_key(a))
    priv = ec.derive_private_key(b2i(a), ec.SECP256K1())
    peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), public_key(b))
    shared_x = priv.exchange(ec.ECDH(), peer)
    shared = decompress(public_key(b)) * b2i(a)
    assert shared_x == i2b(shared.x())
    # ECDH(1, G) = SHA-256 of G's compressed form.
    assert ecdh(i2b(1), public_key(i2b(1))) == sha256(public_key(i2b(1)))

    # HMAC-SHA256: RFC 4231 test case 2.
    assert hmac_sha256(b"Jefe", b"what do ya want for nothing?").hex() == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")

    # HKDF-SHA256: RFC 5869 test case 1, and against `cryptography`'s HKDF.
    okm = hkdf_sha256(bytes(range(13)), b"\x0b" * 22, bytes(range(0xF0, 0xFA)), 42)
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
                         "34007208d5b887185865")
    for length in (42, 64, 128):
        ref = HKDF(algorithm=hashes.SHA256(), length=length, salt=b"s" * 32,
                   info=b"botd/1 session keys").derive(b"i" * 96)
        assert hkdf_sha256(b"s" * 32, b"i" * 96, b"botd/1 session keys", length) == ref

    # AES-256-CTR: NIST SP 800-38A F.5.5 (the low 64 bits do not wrap over these 4 blocks).
    key = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
    iv = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    pt = bytes.fromhex("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51"
                       "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710")
    ct = bytes.fromhex("601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c5"
                       "2b0930daa23de94ce87017ba2d84988ddfc9c58db67aada613c2dd08457941a6")
    assert aes256_ctr64be(key, iv, pt) == ct
    # Against `cryptography`'s 128-bit CTR where no carry crosses into the nonce half.
    iv = i2b(5, 8) + b"\x00" * 8
    data = bytes(range(256)) * 3 + b"tail"
    enc = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    assert aes256_ctr64be(key, iv, data) == enc.update(data) + enc.finalize()
    # And the 64-bit wrap itself: the nonce half must not change.
    iv = b"\x00" * 7 + b"\x01" + b"\xff" * 8
    two = aes256_ctr64be(key, iv, b"\x00" * 32)
    assert two[16:] == aes256_block(key, b"\x00" * 7 + b"\x01" + b"\x00" * 8)

    # protobuf varints (protobuf docs: 150 -> 96 01, 300 -> ac 02).
    assert varint(150) == b"\x96\x01" and varint(300) == b"\xac\x02" and varint(0) == b"\x00"

    # Seal / open round trip across a rotation.
    s, o = Direction(b"k" * 32, b"m" * 32), Direction(b"k" * 32, b"m" * 32)
    for i in range(1030):
        wire = s.seal(i2b(i, 4))
        assert b2i(wire[:4]) == len(wire) - 4
        assert o.open(wire[4:]) == i2b(i, 4)


# --------------------------------------------------------------------------------------------
# the vectors
# --------------------------------------------------------------------------------------------

S_I = b"\x11" * 32
S_R = b"\x22" * 32
E_I = b"\x33" * 32
E_R = b"\x44" * 32
S_OTHER = b"\x55" * 32
INIT_ID = "00112233445566778899aabbccddeeff"
ACK_ID = "ffeeddccbbaa99887766554433221100"

WELCOME = dict(protocol="botd/1", server_version="0.1.0", max_frame_len=1048576,
               max_payload_len=262144, ping_interval_ms=60000, server_time_ms=1767225600000,
               idle_timeout_ms=600000)
DEFAULT_MAX_FRAME_LEN = 1 << 20
LISTED_SEQS = (0, 1, 1023, 1024, 1025)


def i2r_plaintext(n):
    return encode_frame(n + 1, 4, encode_ping(f"vector-{n}"))


def r2i_plaintext(n, relay_pubkey):
    if n == 0:
        return encode_frame(0, 2, encode_welcome(relay_pubkey=relay_pubkey, **WELCOME))
    return encode_frame(n + 1, 5, encode_pong(f"vector-{n}", f"vector-{n}"))


def build():
    pk_si, pk_sr = public_key(S_I), public_key(S_R)
    pk_ei, pk_er = public_key(E_I), public_key(E_R)

    # 3.1 Init
    init_digest = sha256(pk_si, pk_sr, pk_ei)
    init_sig = sign(S_I, init_digest)
    init_body = encode_init(INIT_ID, pk_si, pk_sr, pk_ei, init_sig)

    # 3.3 Ack
    ack_digest = sha256(pk_sr, pk_si, pk_er)
    ack_sig = sign(S_R, ack_digest)
    ack_body = encode_ack(ACK_ID, INIT_ID, pk_er, ack_sig)

    # 3.2 / 3.4: both signatures verify as the peers would check them.
    assert verify(pk_si, sha256(pk_si, pk_sr, pk_ei), init_sig)
    assert verify(pk_sr, sha256(pk_sr, pk_si, pk_er), ack_sig)

    # 4. key schedule, from both sides.
    ee, es, se = ecdh(E_I, pk_er), ecdh(E_I, pk_sr), ecdh(S_I, pk_er)
    assert (ee, es, se) == (ecdh(E_R, pk_ei), ecdh(S_R, pk_ei), ecdh(E_R, pk_si))
    h = sha256(b"botd/1 transcript", init_body, ack_body)
    okm = hkdf_sha256(h, ee + es + se, b"botd/1 session keys", 128)
    k_enc_i2r, k_mac_i2r, k_enc_r2i, k_mac_r2i = okm[:32], okm[32:64], okm[64:96], okm[96:]
    rot_i2r = rekey(k_enc_i2r, k_mac_i2r)
    rot_r2i = rekey(k_enc_r2i, k_mac_r2i)

    # 5. frames: every seq 0..=1025 is sealed, the listed ones are published.
    frames = []
    for direction, keys, plaintext in (
        ("i2r", (k_enc_i2r, k_mac_i2r), i2r_plaintext),
        ("r2i", (k_enc_r2i, k_mac_r2i), lambda n: r2i_plaintext(n, pk_sr)),
    ):
        sealer, opener = Direction(*keys), Direction(*keys)
        for n in range(max(LISTED_SEQS) + 1):
            pt = plaintext(n)
            wire = sealer.seal(pt)
            assert opener.open(wire[4:]) == pt
            if n in LISTED_SEQS:
                frames.append({"direction": direction, "seq": n, "plaintext": pt.hex(),
                               "wire": wire.hex()})
        assert sealer.seq == max(LISTED_SEQS) + 1
    # The rotation really applies from seq 1024 on: the published keys open frame 1024.
    for direction, rot in (("i2r", rot_i2r), ("r2i", rot_r2i)):
        f = next(f for f in frames if f["direction"] == direction and f["seq"] == 1024)
        d = Direction(*rot)
        d.seq = 1024
        assert d.open(bytes.fromhex(f["wire"])[4:]).hex() == f["plaintext"]

    handshake = {
        "description": "botd/1 handshake and first frames from fixed keys, computed by "
                       "tests/vectors/reference.py from the wire brief. All byte strings are "
                       "lowercase hex; ids are plain strings. Bodies carry no length prefix; "
                       "frame 'wire' values are the whole wire frame: u32 BE length || "
                       "ciphertext || 16-byte tag. Frames at seqs not listed were sealed too "
                       "(plaintexts built the same way) so the counters and the rotation "
                       "after seq 1023 apply.",
        "initiator_static_secret": S_I.hex(),
        "initiator_static_public": pk_si.hex(),
        "responder_static_secret": S_R.hex(),
        "responder_static_public": pk_sr.hex(),
        "initiator_ephemeral_secret": E_I.hex(),
        "initiator_ephemeral_public": pk_ei.hex(),
        "responder_ephemeral_secret": E_R.hex(),
        "responder_ephemeral_public": pk_er.hex(),
        "init_id": INIT_ID,
        "ack_id": ACK_ID,
        "init_digest": init_digest.hex(),
        "init_signature": init_sig.hex(),
        "init_body": init_body.hex(),
        "ack_digest": ack_digest.hex(),
        "ack_signature": ack_sig.hex(),
        "ack_body": ack_body.hex(),
        "ee": ee.hex(),
        "es": es.hex(),
        "se": se.hex(),
        "transcript_hash": h.hex(),
        "okm": okm.hex(),
        "k_enc_i2r": k_enc_i2r.hex(),
        "k_mac_i2r": k_mac_i2r.hex(),
        "k_enc_r2i": k_enc_r2i.hex(),
        "k_mac_r2i": k_mac_r2i.hex(),
        "rotated_k_enc_i2r": rot_i2r[0].hex(),
        "rotated_k_mac_i2r": rot_i2r[1].hex(),
        "rotated_k_enc_r2i": rot_r2i[0].hex(),
        "rotated_k_mac_r2i": rot_r2i[1].hex(),
        "welcome": dict(WELCOME, relay_pubkey=pk_sr.hex()),
        "frames": frames,
    }

    # ---- failure cases -------------------------------------------------------------------
    failures = []

    def case(name, applies_to, description, data, expect):
        failures.append({"name": name, "applies_to": applies_to, "description": description,
                         "input_hex": data.hex(), "expect": expect})

    # Bad signature: flip the lowest bit of byte 31 (the last byte of r).
    bad_sig = bytearray(init_sig)
    bad_sig[31] ^= 0x01
    bad_sig = bytes(bad_sig)
    assert not verify(pk_si, init_digest, bad_sig, allow_high_s=True)
    case("init_bad_signature", "responder_init",
         "The valid Init with the lowest bit of signature byte 31 (last byte of r) flipped.",
         encode_init(INIT_ID, pk_si, pk_sr, pk_ei, bad_sig), "bad_signature")

    high = high_s_twin(init_sig)
    assert b2i(high[32:]) > HALF_N
    assert verify(pk_si, init_digest, high, allow_high_s=True)
    case("init_high_s", "responder_init",
         "The valid Init with its signature replaced by the high-S twin (r, n - s), which "
         "plain ECDSA accepts but botd/1 forbids.",
         encode_init(INIT_ID, pk_si, pk_sr, pk_ei, high), "high_s")

    pk_other = public_key(S_OTHER)
    wrong_sig = sign(S_I, sha256(pk_si, pk_other, pk_ei))
    case("init_wrong_recipient", "responder_init",
         "An Init addressed to the key of secret 0x55 * 32 and correctly signed for it by the "
         "initiator, presented to the responder (secret 0x22 * 32).",
         encode_init(INIT_ID, pk_si, pk_other, pk_ei, wrong_sig), "wrong_recipient")

    pk_si_long = uncompressed(G * b2i(S_I))
    long_sig = sign(S_I, sha256(pk_si_long, pk_sr, pk_ei))
    case("init_uncompressed_sender_key", "responder_init",
         "An Init whose sender_pubkey is the initiator's key in 65-byte uncompressed SEC1 form "
         "(signed over sha256 of the 65 + 33 + 33 bytes). PROTOCOL.md section 2: only 33-byte "
         "compressed keys are valid; section 4.2 checks field lengths (check 4) before keys "
         "parse (check 5), so it fails the field-length check.",
         encode_init(INIT_ID, pk_si_long, pk_sr, pk_ei, long_sig), "bad_field")

    first = bytearray(bytes.fromhex(frames[0]["wire"]))
    assert frames[0]["direction"] == "i2r" and frames[0]["seq"] == 0
    first[-1] ^= 0x01
    case("frame_bad_tag", "i2r_seq0_wire",
         "The i2r seq 0 wire frame (length prefix included) with the lowest bit of the last "
         "tag byte flipped; opened with the i2r keys at seq 0.",
         bytes(first), "bad_tag")

    case("frame_too_long", "decoder_default_max",
         "A length prefix announcing 1048577 bytes, one more than the default max_frame_len "
         "1048576, with no body: refused before any body byte is read.",
         i2b(DEFAULT_MAX_FRAME_LEN + 1, 4), "frame_too_long")

    return handshake, failures


def main():
    self_check()
    handshake, failures = build()
    for name, value in (("handshake.json", handshake), ("failures.json", failures)):
        with open(os.path.join(HERE, name), "w") as f:
            json.dump(value, f, indent=2)
            f.write("\n")
    print(f"self-checks passed; wrote {len(handshake['frames'])} frames and "
          f"{len(failures)} failure cases to {HERE}")


if __name__ == "__main__":
    main()
