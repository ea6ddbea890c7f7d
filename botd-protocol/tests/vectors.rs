//! Checks the protocol core against the published botd/1 test vectors in `tests/vectors/*.json`.
//!
//! The vectors are computed by `tests/vectors/reference.py`, an independent Python implementation
//! of the wire brief (regenerate with `python3 tests/vectors/reference.py`). Every value in the
//! files is compared with what the Rust code computes, through the crate's public API.

use std::collections::BTreeSet;
use std::fs;

use botd_protocol::cipher::{CipherError, DirectionKeys, Opener, Sealer};
use botd_protocol::codec::{encode_frame, CodecError, FrameCodec};
use botd_protocol::handshake::{
    respond_with, signed_digest, AwaitingAck, HandshakeError, KeySchedule,
};
use botd_protocol::keys::{negate_s, KeyPair, PublicKeyBytes};
use botd_protocol::proto::{Ack, Body, Frame, Init, Ping, Pong, Welcome};
use bytes::{Bytes, BytesMut};
use hmac::{Hmac, Mac};
use prost::Message;
use serde_json::Value;
use sha2::Sha256;

const LISTED_SEQS: [u64; 5] = [0, 1, 1023, 1024, 1025];

fn load(name: &str) -> Value {
    let path = format!("{}/tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("missing string field {key}"))
}

fn bin(v: &Value, key: &str) -> Vec<u8> {
    let s = text(v, key);
    assert_eq!(s, s.to_lowercase(), "{key} is lowercase hex");
    hex::decode(s).unwrap_or_else(|e| panic!("{key}: {e}"))
}

fn num(v: &Value, key: &str) -> u64 {
    v.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("missing integer field {key}"))
}

fn arr32(v: &Value, key: &str) -> [u8; 32] {
    bin(v, key)
        .try_into()
        .unwrap_or_else(|_| panic!("{key} is 32 bytes"))
}

fn pair(v: &Value, key: &str) -> KeyPair {
    KeyPair::from_secret_bytes(&arr32(v, key)).unwrap()
}

fn keys(v: &Value, enc: &str, mac: &str) -> DirectionKeys {
    DirectionKeys {
        enc: arr32(v, enc),
        mac: arr32(v, mac),
    }
}

/// The parties of the vectors, rebuilt from the published secrets.
struct Parties {
    initiator: KeyPair,
    responder: KeyPair,
    initiator_ephemeral: KeyPair,
    responder_ephemeral: KeyPair,
}

fn parties(v: &Value) -> Parties {
    Parties {
        initiator: pair(v, "initiator_static_secret"),
        responder: pair(v, "responder_static_secret"),
        initiator_ephemeral: pair(v, "initiator_ephemeral_secret"),
        responder_ephemeral: pair(v, "responder_ephemeral_secret"),
    }
}

/// Runs the whole handshake in Rust from the published secrets and ids.
fn run_handshake(v: &Value) -> (Parties, Bytes, Bytes, KeySchedule, KeySchedule) {
    let p = parties(v);
    let (waiting, init_body) = AwaitingAck::start_with(
        &p.initiator,
        *p.responder.public(),
        pair(v, "initiator_ephemeral_secret"),
        text(v, "init_id").to_owned(),
    );
    let (response, responder_schedule) = respond_with(
        &p.responder,
        &init_body,
        |_| true,
        pair(v, "responder_ephemeral_secret"),
        text(v, "ack_id").to_owned(),
    )
    .expect("responder accepts the Init");
    let initiator_schedule = waiting
        .schedule(&p.initiator, &response.ack_body)
        .expect("initiator accepts the Ack");
    (
        p,
        init_body,
        response.ack_body,
        initiator_schedule,
        responder_schedule,
    )
}

/// Every field of `handshake.json`; a field added to the file must get a check here too.
const HANDSHAKE_FIELDS: [&str; 32] = [
    "description",
    "initiator_static_secret",
    "initiator_static_public",
    "responder_static_secret",
    "responder_static_public",
    "initiator_ephemeral_secret",
    "initiator_ephemeral_public",
    "responder_ephemeral_secret",
    "responder_ephemeral_public",
    "init_id",
    "ack_id",
    "init_digest",
    "init_signature",
    "init_body",
    "ack_digest",
    "ack_signature",
    "ack_body",
    "ee",
    "es",
    "se",
    "transcript_hash",
    "okm",
    "k_enc_i2r",
    "k_mac_i2r",
    "k_enc_r2i",
    "k_mac_r2i",
    "rotated_k_enc_i2r",
    "rotated_k_mac_i2r",
    "rotated_k_enc_r2i",
    "rotated_k_mac_r2i",
    "welcome",
    "frames",
];

#[test]
fn files_hold_exactly_the_checked_fields() {
    let v = load("handshake.json");
    let fields: BTreeSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(fields, HANDSHAKE_FIELDS.into_iter().collect());
    let welcome: BTreeSet<&str> = v["welcome"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(welcome.len(), 8);
    assert_eq!(
        welcome,
        [
            "protocol",
            "server_version",
            "max_frame_len",
            "max_payload_len",
            "ping_interval_ms",
            "server_time_ms",
            "idle_timeout_ms",
            "relay_pubkey",
        ]
        .into_iter()
        .collect()
    );
    let frames = v["frames"].as_array().unwrap();
    assert_eq!(frames.len(), 2 * LISTED_SEQS.len());
    for f in frames {
        let keys: BTreeSet<&str> = f.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["direction", "seq", "plaintext", "wire"]
                .into_iter()
                .collect()
        );
    }
    let cases = failure_cases();
    assert_eq!(cases.len(), 6);
    for c in &cases {
        let keys: BTreeSet<&str> = c.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["name", "applies_to", "description", "input_hex", "expect"]
                .into_iter()
                .collect()
        );
    }
}

#[test]
fn keys_digests_and_signatures() {
    let v = load("handshake.json");
    let p = parties(&v);
    for (pair, key) in [
        (&p.initiator, "initiator_static_public"),
        (&p.responder, "responder_static_public"),
        (&p.initiator_ephemeral, "initiator_ephemeral_public"),
        (&p.responder_ephemeral, "responder_ephemeral_public"),
    ] {
        assert_eq!(pair.public().as_bytes().to_vec(), bin(&v, key), "{key}");
        assert_eq!(
            PublicKeyBytes::from_hex(text(&v, key)).unwrap(),
            *pair.public()
        );
    }
    for (pair, key) in [
        (&p.initiator, "initiator_static_secret"),
        (&p.responder, "responder_static_secret"),
        (&p.initiator_ephemeral, "initiator_ephemeral_secret"),
        (&p.responder_ephemeral, "responder_ephemeral_secret"),
    ] {
        assert_eq!(*pair.secret_bytes(), arr32(&v, key), "{key}");
    }

    let init_digest = signed_digest(
        p.initiator.public(),
        p.responder.public(),
        p.initiator_ephemeral.public(),
    );
    assert_eq!(init_digest, arr32(&v, "init_digest"));
    let init_signature = p.initiator.sign(&init_digest);
    assert_eq!(init_signature.to_vec(), bin(&v, "init_signature"));
    p.initiator
        .public()
        .verify(&init_digest, &init_signature)
        .unwrap();

    let ack_digest = signed_digest(
        p.responder.public(),
        p.initiator.public(),
        p.responder_ephemeral.public(),
    );
    assert_eq!(ack_digest, arr32(&v, "ack_digest"));
    let ack_signature = p.responder.sign(&ack_digest);
    assert_eq!(ack_signature.to_vec(), bin(&v, "ack_signature"));
    p.responder
        .public()
        .verify(&ack_digest, &ack_signature)
        .unwrap();

    // ECDH from both ends of each pair.
    let ee = arr32(&v, "ee");
    let es = arr32(&v, "es");
    let se = arr32(&v, "se");
    assert_eq!(
        *p.initiator_ephemeral.ecdh(p.responder_ephemeral.public()),
        ee
    );
    assert_eq!(
        *p.responder_ephemeral.ecdh(p.initiator_ephemeral.public()),
        ee
    );
    assert_eq!(*p.initiator_ephemeral.ecdh(p.responder.public()), es);
    assert_eq!(*p.responder.ecdh(p.initiator_ephemeral.public()), es);
    assert_eq!(*p.initiator.ecdh(p.responder_ephemeral.public()), se);
    assert_eq!(*p.responder_ephemeral.ecdh(p.initiator.public()), se);
}

#[test]
fn handshake_bodies_and_key_schedule() {
    let v = load("handshake.json");
    let (p, init_body, ack_body, initiator_schedule, responder_schedule) = run_handshake(&v);

    assert_eq!(init_body.to_vec(), bin(&v, "init_body"));
    assert_eq!(ack_body.to_vec(), bin(&v, "ack_body"));

    // The published bodies decode to exactly the published fields.
    let init = Init::decode(&bin(&v, "init_body")[..]).unwrap();
    assert_eq!(init.id, text(&v, "init_id"));
    assert_eq!(
        init.sender_pubkey.to_vec(),
        bin(&v, "initiator_static_public")
    );
    assert_eq!(
        init.recipient_pubkey.to_vec(),
        bin(&v, "responder_static_public")
    );
    assert_eq!(
        init.ephemeral_pubkey.to_vec(),
        bin(&v, "initiator_ephemeral_public")
    );
    assert_eq!(init.signature.to_vec(), bin(&v, "init_signature"));
    let ack = Ack::decode(&bin(&v, "ack_body")[..]).unwrap();
    assert_eq!(ack.id, text(&v, "ack_id"));
    assert_eq!(ack.init_id, text(&v, "init_id"));
    assert_eq!(
        ack.ephemeral_pubkey.to_vec(),
        bin(&v, "responder_ephemeral_public")
    );
    assert_eq!(ack.signature.to_vec(), bin(&v, "ack_signature"));

    let okm = bin(&v, "okm");
    assert_eq!(okm.len(), 128);
    for (side, schedule) in [
        ("initiator", &initiator_schedule),
        ("responder", &responder_schedule),
    ] {
        assert_eq!(*schedule.ee, arr32(&v, "ee"), "{side} ee");
        assert_eq!(*schedule.es, arr32(&v, "es"), "{side} es");
        assert_eq!(*schedule.se, arr32(&v, "se"), "{side} se");
        assert_eq!(
            schedule.transcript,
            arr32(&v, "transcript_hash"),
            "{side} h"
        );
        assert_eq!(schedule.okm.to_vec(), okm, "{side} okm");
        assert!(
            schedule.initiator_to_responder() == keys(&v, "k_enc_i2r", "k_mac_i2r"),
            "{side} i2r keys"
        );
        assert!(
            schedule.responder_to_initiator() == keys(&v, "k_enc_r2i", "k_mac_r2i"),
            "{side} r2i keys"
        );
    }
    assert_eq!(okm[..32], arr32(&v, "k_enc_i2r"));
    assert_eq!(okm[32..64], arr32(&v, "k_mac_i2r"));
    assert_eq!(okm[64..96], arr32(&v, "k_enc_r2i"));
    assert_eq!(okm[96..], arr32(&v, "k_mac_r2i"));

    // The published rotated keys are the first rotation of each direction.
    assert!(
        keys(&v, "k_enc_i2r", "k_mac_i2r").rotated()
            == keys(&v, "rotated_k_enc_i2r", "rotated_k_mac_i2r")
    );
    assert!(
        keys(&v, "k_enc_r2i", "k_mac_r2i").rotated()
            == keys(&v, "rotated_k_enc_r2i", "rotated_k_mac_r2i")
    );

    // The responder accepts the published Init body and answers with the published Ack body;
    // the initiator's `on_ack` yields the mirrored session keys.
    let (response, _) = respond_with(
        &p.responder,
        &bin(&v, "init_body"),
        |_| true,
        pair(&v, "responder_ephemeral_secret"),
        text(&v, "ack_id").to_owned(),
    )
    .unwrap();
    assert_eq!(response.ack_body.to_vec(), bin(&v, "ack_body"));
    assert_eq!(response.established.remote, *p.initiator.public());
    assert_eq!(
        response.established.transcript,
        arr32(&v, "transcript_hash")
    );
    assert!(response.established.keys.recv == keys(&v, "k_enc_i2r", "k_mac_i2r"));
    assert!(response.established.keys.send == keys(&v, "k_enc_r2i", "k_mac_r2i"));
    let (waiting, _) = AwaitingAck::start_with(
        &p.initiator,
        *p.responder.public(),
        pair(&v, "initiator_ephemeral_secret"),
        text(&v, "init_id").to_owned(),
    );
    let established = waiting.on_ack(&p.initiator, &bin(&v, "ack_body")).unwrap();
    assert_eq!(established.remote, *p.responder.public());
    assert!(established.keys.send == keys(&v, "k_enc_i2r", "k_mac_i2r"));
    assert!(established.keys.recv == keys(&v, "k_enc_r2i", "k_mac_r2i"));
}

fn plaintext(direction: &str, seq: u64, relay_pubkey: &PublicKeyBytes, v: &Value) -> Vec<u8> {
    let name = format!("vector-{seq}");
    let frame = match (direction, seq) {
        ("i2r", n) => Frame::new(n + 1, Body::Ping(Ping { id: name })),
        ("r2i", 0) => {
            let w = &v["welcome"];
            assert_eq!(text(w, "relay_pubkey"), relay_pubkey.to_hex());
            Frame::new(
                0,
                Body::Welcome(Welcome {
                    protocol: text(w, "protocol").to_owned(),
                    server_version: text(w, "server_version").to_owned(),
                    max_frame_len: num(w, "max_frame_len").try_into().unwrap(),
                    max_payload_len: num(w, "max_payload_len").try_into().unwrap(),
                    ping_interval_ms: num(w, "ping_interval_ms"),
                    server_time_ms: num(w, "server_time_ms"),
                    idle_timeout_ms: num(w, "idle_timeout_ms"),
                    relay_pubkey: Bytes::copy_from_slice(relay_pubkey.as_bytes()),
                    ping_min_interval_ms: w["ping_min_interval_ms"].as_u64().unwrap_or(0),
                }),
            )
        }
        ("r2i", n) => Frame::new(
            n + 1,
            Body::Pong(Pong {
                id: name.clone(),
                ping_id: name,
            }),
        ),
        _ => panic!("unknown direction {direction}"),
    };
    frame.encode_to_vec()
}

#[test]
fn frames_in_both_directions_across_the_first_rotation() {
    let v = load("handshake.json");
    // The task's fixed Welcome values, so a regenerated file cannot drift unnoticed.
    let w = &v["welcome"];
    assert_eq!(text(w, "protocol"), botd_protocol::proto::PROTOCOL_NAME);
    assert_eq!(text(w, "server_version"), "0.1.0");
    assert_eq!(num(w, "max_frame_len"), 1_048_576);
    assert_eq!(num(w, "max_payload_len"), 262_144);
    assert_eq!(num(w, "ping_interval_ms"), 60_000);
    assert_eq!(num(w, "server_time_ms"), 1_767_225_600_000);
    assert_eq!(num(w, "idle_timeout_ms"), 600_000);

    let (p, _, _, schedule, _) = run_handshake(&v);
    let relay = *p.responder.public();
    let listed = v["frames"].as_array().expect("frames is a list");
    assert_eq!(listed.len(), 2 * LISTED_SEQS.len());

    let mut checked = BTreeSet::new();
    for (direction, dir_keys) in [
        ("i2r", schedule.initiator_to_responder()),
        ("r2i", schedule.responder_to_initiator()),
    ] {
        let mut sealer = Sealer::new(dir_keys.clone());
        let mut opener = Opener::new(dir_keys);
        let mut codec = FrameCodec::new(botd_protocol::codec::DEFAULT_MAX_FRAME_LEN);
        for seq in 0..=*LISTED_SEQS.last().unwrap() {
            assert_eq!(sealer.seq(), seq);
            assert_eq!(opener.seq(), seq);
            let pt = plaintext(direction, seq, &relay, &v);
            let wire = sealer.seal(&pt);

            let mut buf = BytesMut::from(&wire[..]);
            let body = codec.decode(&mut buf).unwrap().expect("a whole frame");
            assert!(buf.is_empty());
            let opened = opener.open(body).unwrap();
            assert_eq!(&opened[..], &pt[..]);

            if !LISTED_SEQS.contains(&seq) {
                continue;
            }
            let matching: Vec<&Value> = listed
                .iter()
                .filter(|f| text(f, "direction") == direction && num(f, "seq") == seq)
                .collect();
            assert_eq!(matching.len(), 1, "{direction} seq {seq} listed once");
            let f = matching[0];
            assert_eq!(pt, bin(f, "plaintext"), "{direction} seq {seq} plaintext");
            assert_eq!(wire.to_vec(), bin(f, "wire"), "{direction} seq {seq} wire");
            let decoded = Frame::decode(&bin(f, "plaintext")[..]).unwrap();
            assert_eq!(decoded.encode_to_vec(), pt);
            assert!(checked.insert((direction, seq)));
        }
    }
    assert_eq!(checked.len(), 2 * LISTED_SEQS.len());

    // The published frames tie the published keys together: frames up to seq 1023 carry tags
    // under the first keys, frames from seq 1024 on under the published rotated keys.
    let mut tags_checked = 0;
    for f in listed {
        let direction = text(f, "direction");
        let seq = num(f, "seq");
        let (mac, other) = match (direction, seq < 1024) {
            ("i2r", true) => ("k_mac_i2r", "rotated_k_mac_i2r"),
            ("i2r", false) => ("rotated_k_mac_i2r", "k_mac_i2r"),
            ("r2i", true) => ("k_mac_r2i", "rotated_k_mac_r2i"),
            ("r2i", false) => ("rotated_k_mac_r2i", "k_mac_r2i"),
            _ => panic!("unknown direction {direction}"),
        };
        let wire = bin(f, "wire");
        let len = u32::from_be_bytes(wire[..4].try_into().unwrap()) as usize;
        assert_eq!(len, wire.len() - 4);
        let (ciphertext, tag) = wire[4..].split_at(len - 16);
        assert_eq!(ciphertext.len(), bin(f, "plaintext").len());
        let tag_under = |key: &str| {
            let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&arr32(&v, key)).unwrap();
            m.update(&seq.to_be_bytes());
            m.update(ciphertext);
            m.finalize().into_bytes()[..16].to_vec()
        };
        assert_eq!(tag_under(mac), tag, "{direction} seq {seq} tag under {mac}");
        assert_ne!(tag_under(other), tag);
        tags_checked += 1;
    }
    assert_eq!(tags_checked, 2 * LISTED_SEQS.len());
}

fn failure_cases() -> Vec<Value> {
    let cases = load("failures.json");
    let cases = cases.as_array().expect("failures is a list").clone();
    let names: BTreeSet<&str> = cases.iter().map(|c| text(c, "name")).collect();
    assert_eq!(names.len(), cases.len(), "case names are unique");
    cases
}

fn cipher_reason(err: &CipherError) -> &'static str {
    match err {
        CipherError::BadTag => "bad_tag",
        CipherError::Truncated => "truncated",
    }
}

#[test]
fn failure_cases_are_rejected_for_the_published_reason() {
    let v = load("handshake.json");
    let p = parties(&v);
    let cases = failure_cases();
    let valid_init = Init::decode(&bin(&v, "init_body")[..]).unwrap();
    let mut seen = BTreeSet::new();

    for case in &cases {
        let name = text(case, "name");
        let input = bin(case, "input_hex");
        let expect = text(case, "expect");
        assert!(!text(case, "description").is_empty());
        match text(case, "applies_to") {
            "responder_init" => {
                let err: HandshakeError = respond_with(
                    &p.responder,
                    &input,
                    |_| true,
                    pair(&v, "responder_ephemeral_secret"),
                    text(&v, "ack_id").to_owned(),
                )
                .err()
                .unwrap_or_else(|| panic!("{name}: the responder accepted the Init"));
                assert_eq!(err.reason(), expect, "{name}: {err}");

                // Each case differs from the valid Init only in what it claims to break.
                let init = Init::decode(&input[..]).unwrap();
                assert_eq!(init.id, valid_init.id, "{name}");
                assert_eq!(init.ephemeral_pubkey, valid_init.ephemeral_pubkey, "{name}");
                match name {
                    "init_bad_signature" => {
                        assert_eq!(init.sender_pubkey, valid_init.sender_pubkey);
                        assert_eq!(init.recipient_pubkey, valid_init.recipient_pubkey);
                        let flipped: u32 = init
                            .signature
                            .iter()
                            .zip(valid_init.signature.iter())
                            .map(|(a, b)| (a ^ b).count_ones())
                            .sum();
                        assert_eq!(flipped, 1, "exactly one bit flipped");
                    }
                    "init_high_s" => {
                        assert_eq!(init.sender_pubkey, valid_init.sender_pubkey);
                        assert_eq!(init.recipient_pubkey, valid_init.recipient_pubkey);
                        let sig: [u8; 64] = valid_init.signature[..].try_into().unwrap();
                        assert_eq!(init.signature[..], negate_s(&sig)[..]);
                    }
                    "init_wrong_recipient" => {
                        assert_eq!(init.sender_pubkey, valid_init.sender_pubkey);
                        let other = KeyPair::from_secret_bytes(&[0x55; 32]).unwrap();
                        assert_eq!(init.recipient_pubkey[..], other.public().as_bytes()[..]);
                        // Correctly signed: the key it names accepts it.
                        respond_with(
                            &other,
                            &input,
                            |_| true,
                            pair(&v, "responder_ephemeral_secret"),
                            text(&v, "ack_id").to_owned(),
                        )
                        .unwrap_or_else(|e| panic!("{name}: intended recipient refused: {e}"));
                    }
                    "init_uncompressed_sender_key" => {
                        assert_eq!(init.recipient_pubkey, valid_init.recipient_pubkey);
                        assert_eq!(init.sender_pubkey.len(), 65);
                        assert_eq!(init.sender_pubkey[0], 0x04);
                        assert_eq!(
                            init.sender_pubkey[1..33],
                            valid_init.sender_pubkey[1..33],
                            "same x coordinate"
                        );
                        assert_eq!(err, HandshakeError::BadField("sender_pubkey"));
                    }
                    other => panic!("unexpected handshake case {other}"),
                }
            }
            "i2r_seq0_wire" => {
                let mut codec = FrameCodec::new(botd_protocol::codec::DEFAULT_MAX_FRAME_LEN);
                let mut buf = BytesMut::from(&input[..]);
                let body = codec.decode(&mut buf).unwrap().expect("a whole frame");
                assert!(buf.is_empty());
                let i2r = keys(&v, "k_enc_i2r", "k_mac_i2r");
                let err = Opener::new(i2r.clone()).open(body).unwrap_err();
                assert_eq!(cipher_reason(&err), expect, "{name}");
                // The same frame with the bit restored opens.
                let valid = listed_wire(&v, "i2r", 0);
                let mut restored = input.clone();
                let last = restored.len() - 1;
                restored[last] ^= 1;
                assert_eq!(restored, valid, "{name}: one bit of the last tag byte");
                Opener::new(i2r)
                    .open(BytesMut::from(&valid[4..]))
                    .expect("unmodified frame opens");
            }
            "decoder_default_max" => {
                let max = botd_protocol::codec::DEFAULT_MAX_FRAME_LEN;
                assert_eq!(max, 1 << 20);
                assert_eq!(input, (max + 1).to_be_bytes(), "{name}: header only");
                let mut codec = FrameCodec::new(max);
                let mut buf = BytesMut::from(&input[..]);
                let err = codec.decode(&mut buf).unwrap_err();
                assert_eq!(err.reason(), expect, "{name}");
                assert!(
                    matches!(err, CodecError::FrameTooLong { len, max: m } if len == max + 1 && m == max)
                );
                // One byte less is a frame the decoder waits for.
                let mut ok = BytesMut::from(&max.to_be_bytes()[..]);
                assert!(codec.decode(&mut ok).unwrap().is_none());
            }
            other => panic!("{name}: unknown applies_to {other}"),
        }
        assert!(seen.insert(name.to_owned()));
    }

    let expected: BTreeSet<String> = [
        "init_bad_signature",
        "init_high_s",
        "init_wrong_recipient",
        "init_uncompressed_sender_key",
        "frame_bad_tag",
        "frame_too_long",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(seen, expected);
    assert_eq!(cases.len(), 6);
}

fn listed_wire(v: &Value, direction: &str, seq: u64) -> Vec<u8> {
    let f = v["frames"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| text(f, "direction") == direction && num(f, "seq") == seq)
        .unwrap_or_else(|| panic!("{direction} seq {seq} listed"));
    bin(f, "wire")
}

#[test]
fn handshake_frames_carry_the_bodies_with_a_length_prefix() {
    let v = load("handshake.json");
    for key in ["init_body", "ack_body"] {
        let body = bin(&v, key);
        let wire = encode_frame(&body);
        let mut codec = FrameCodec::new(botd_protocol::codec::DEFAULT_MAX_FRAME_LEN);
        let mut buf = BytesMut::from(&wire[..]);
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap().to_vec(), body);
    }
}
