//! Seed inputs for every target: a handful of valid and near-valid inputs each, in the input
//! formats the harnesses document. `tests/seeds.rs` writes them to `fuzz/seeds/<target>/`
//! (`cargo test --test seeds -- --ignored write_seeds`) and replays every committed file.
//!
//! Every seed is the same bytes on every run: keys, ids and clocks are fixed, and the seeds
//! that come from the store's own writers hold nothing whose order depends on a hash map.

use bytes::Bytes;
use prost::Message;

use super::input::push_chunk;
use super::nats::{step, BUILT, HANDSHAKE_LIMIT};
use super::storage::{journal_bytes, journal_header, snapshot_bytes};
use super::transport::{
    initiator_ephemeral, keys, node_keys, relay_keys, responder_ephemeral, ACK_ID, INIT_ID,
};
use botd_protocol::cipher::Sealer;
use botd_protocol::codec::encode_frame;
use botd_protocol::handshake::{respond_with, signed_digest, AwaitingAck};
use botd_protocol::keys::{negate_s, KeyPair};
use botd_protocol::proto::{self, Body, ErrorCode, Frame, Init};
use botd_relay::store::embedded::journal::MAX_SEQUENCE;
use botd_relay::store::proto::{self as ev, event::Kind, Event};

/// One seed input.
pub struct Seed {
    pub target: &'static str,
    /// File name in the target's seed directory.
    pub name: &'static str,
    pub data: Vec<u8>,
}

/// Every target's seeds.
pub fn seeds() -> Vec<Seed> {
    let mut all = Vec::new();
    let mut add = |target, list: Vec<(&'static str, Vec<u8>)>| {
        all.extend(
            list.into_iter()
                .map(|(name, data)| Seed { target, name, data }),
        );
    };
    add("frame_codec", frame_codec());
    add("handshake_init", handshake_init());
    add("handshake_ack", handshake_ack());
    add("sealed_open", sealed_open());
    add("session_plaintext", session_plaintext());
    add("relay_requests", relay_requests());
    add("journal_segment", journal_segment());
    add("snapshot_file", snapshot_file());
    add("data_dir", data_dir());
    add("nats_wire", nats_wire());
    all
}

type Seeds = Vec<(&'static str, Vec<u8>)>;

fn encode(frame: &Frame) -> Vec<u8> {
    frame.encode_to_vec()
}

// ---------------------------------------------------------------------------------------------
// Transport
// ---------------------------------------------------------------------------------------------

fn frame_codec() -> Seeds {
    /// Limits (as stored: one less), piece lengths, stream.
    fn input(first: u16, then: u16, pieces: &[u16], stream: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(first - 1).to_be_bytes());
        out.extend_from_slice(&(then - 1).to_be_bytes());
        out.push(pieces.len() as u8);
        for piece in pieces {
            out.extend_from_slice(&piece.to_be_bytes());
        }
        out.extend_from_slice(stream);
        out
    }
    let (_, init) = fixture_init();
    let mut two = encode_frame(&init).to_vec();
    two.extend_from_slice(&encode_frame(&[7u8; 40]));
    let mut many = Vec::new();
    for n in 1..=12u8 {
        many.extend_from_slice(&encode_frame(&vec![n; usize::from(n)]));
    }
    let mut truncated = encode_frame(b"complete").to_vec();
    truncated.extend_from_slice(&encode_frame(b"cut short")[..7]);
    let mut oversized = encode_frame(&[1; 10]).to_vec();
    oversized.extend_from_slice(&encode_frame(&[2; 300]));
    vec![
        ("init-then-session-frame", input(1024, 4096, &[3, 10], &two)),
        ("many-frames-byte-by-byte", input(64, 64, &[1; 15], &many)),
        ("empty-frame", input(1024, 1024, &[], &[0, 0, 0, 0, 1])),
        (
            "huge-length",
            input(1024, 1024, &[2], &[0xff, 0xff, 0xff, 0xff, 0]),
        ),
        ("truncated", input(1024, 1024, &[5], &truncated)),
        ("over-the-later-limit", input(1024, 256, &[], &oversized)),
    ]
}

/// The fixture initiator's `Init` (alice to the relay) and its state.
fn fixture_init() -> (AwaitingAck, Bytes) {
    let keys = keys();
    AwaitingAck::start_with(
        &keys.alice,
        *keys.relay.public(),
        initiator_ephemeral(),
        INIT_ID.into(),
    )
}

fn handshake_init() -> Seeds {
    let keys = keys();
    let (_, valid) = fixture_init();
    let init = Init::decode(&valid[..]).expect("our Init decodes");
    let variant = |change: &dyn Fn(&mut Init)| {
        let mut init = init.clone();
        change(&mut init);
        init.encode_to_vec()
    };
    let mut unknown_field = valid.to_vec();
    unknown_field.extend_from_slice(&[0x78, 0x01]);
    let sig: [u8; 64] = init.signature[..].try_into().expect("64 bytes");
    // A second, fixed ephemeral key: seeds are the same bytes on every run.
    let other_ephemeral = KeyPair::from_secret_bytes(&[0x66; 32]).expect("a valid secret");
    vec![
        ("valid", valid.to_vec()),
        ("valid-with-unknown-field", unknown_field),
        (
            "wrong-recipient",
            variant(&|i| i.recipient_pubkey = Bytes::copy_from_slice(keys.bob.public().as_bytes())),
        ),
        (
            "high-s",
            variant(&|i| i.signature = Bytes::copy_from_slice(&negate_s(&sig))),
        ),
        (
            "bad-signature",
            variant(&|i| {
                let mut s = i.signature.to_vec();
                s[10] ^= 1;
                i.signature = s.into();
            }),
        ),
        ("empty-id", variant(&|i| i.id.clear())),
        ("long-id", variant(&|i| i.id = "x".repeat(65))),
        (
            "invalid-sender-key",
            variant(&|i| i.sender_pubkey = Bytes::from(vec![0x04; 33])),
        ),
        (
            "short-ephemeral",
            variant(&|i| i.ephemeral_pubkey = i.ephemeral_pubkey.slice(..32)),
        ),
        (
            "signed-by-another-sender",
            variant(&|i| {
                let bob = &keys.bob;
                let ephemeral = other_ephemeral.public();
                let digest = signed_digest(bob.public(), keys.relay.public(), ephemeral);
                i.sender_pubkey = Bytes::copy_from_slice(bob.public().as_bytes());
                i.ephemeral_pubkey = Bytes::copy_from_slice(ephemeral.as_bytes());
                i.signature = Bytes::copy_from_slice(&bob.sign(&digest));
            }),
        ),
        ("garbage", vec![0xff, 0xff, 0xff]),
    ]
}

fn handshake_ack() -> Seeds {
    let keys = keys();
    let (_, init) = fixture_init();
    let (response, _) = respond_with(
        &keys.relay,
        &init,
        |_| true,
        responder_ephemeral(),
        ACK_ID.into(),
    )
    .expect("the relay accepts the fixture Init");
    let ack = proto::Ack::decode(&response.ack_body[..]).expect("our Ack decodes");
    let variant = |change: &dyn Fn(&mut proto::Ack)| {
        let mut ack = ack.clone();
        change(&mut ack);
        ack.encode_to_vec()
    };
    vec![
        ("valid", response.ack_body.to_vec()),
        ("other-init-id", variant(&|a| a.init_id = "another".into())),
        ("empty-id", variant(&|a| a.id.clear())),
        (
            "signed-by-bob",
            variant(&|a| {
                let ephemeral = responder_ephemeral();
                let digest =
                    signed_digest(keys.relay.public(), keys.alice.public(), ephemeral.public());
                a.signature = Bytes::copy_from_slice(&keys.bob.sign(&digest));
            }),
        ),
        (
            "invalid-ephemeral",
            variant(&|a| a.ephemeral_pubkey = Bytes::from(vec![0x02; 33])),
        ),
        (
            "short-signature",
            variant(&|a| a.signature = a.signature.slice(..63)),
        ),
        ("garbage", vec![0x12, 0xff]),
    ]
}

/// The frame bodies `sealer` seals for `plaintexts`.
fn sealed_bodies(sealer: &mut Sealer, plaintexts: &[Vec<u8>]) -> Vec<Vec<u8>> {
    plaintexts
        .iter()
        .map(|p| sealer.seal(p)[4..].to_vec())
        .collect()
}

fn sealed_open() -> Seeds {
    let welcome = encode(&Frame::new(0, Body::Welcome(proto::Welcome::default())));
    let done = encode(&Frame::new(1, Body::Done(proto::Done {})));
    let ping = encode(&Frame::new(
        2,
        Body::Ping(proto::Ping {
            id: "ping-1".into(),
        }),
    ));
    // Node-to-relay frames for the plain opener and, sealed afresh, for the relay session;
    // relay-to-node frames for the node session.
    let to_opener = sealed_bodies(&mut Sealer::new(node_keys()), &[done.clone(), ping.clone()]);
    let to_relay = sealed_bodies(
        &mut Sealer::new(node_keys()),
        &[done, vec![0x0f, 0xff], ping],
    );
    let to_node = sealed_bodies(&mut Sealer::new(relay_keys()), &[welcome, vec![]]);
    let steps = |list: &[(u8, &[u8])]| {
        let mut out = Vec::new();
        for (which, body) in list {
            out.push(*which);
            push_chunk(&mut out, body);
        }
        out
    };
    let mut flipped = to_relay[0].clone();
    flipped[3] ^= 0x10;
    vec![
        (
            "valid-frames-all-three",
            steps(&[
                (0, &to_opener[0]),
                (1, &to_relay[0]),
                (2, &to_node[0]),
                (0, &to_opener[1]),
                (1, &to_relay[1]),
                (2, &to_node[1]),
                (1, &to_relay[2]),
            ]),
        ),
        (
            "short-bodies",
            steps(&[
                (0, &[]),
                (0, &[0; 15]),
                (0, &[0; 16]),
                (1, &[1; 15]),
                (2, &[2; 17]),
            ]),
        ),
        ("flipped-bit", steps(&[(1, &flipped), (0, &flipped)])),
        ("replayed", steps(&[(0, &to_opener[0]), (0, &to_opener[0])])),
    ]
}

fn session_plaintext() -> Seeds {
    /// Builds the step bytes of the target.
    struct Steps(Vec<u8>);
    impl Steps {
        fn inject(mut self, from_node: bool, plaintext: &[u8]) -> Self {
            self.0.push(if from_node { 0x08 } else { 0x00 });
            push_chunk(&mut self.0, plaintext);
            self
        }
        fn corrupt(mut self, from_node: bool, at: u16, plaintext: &[u8]) -> Self {
            self.0.push(0x40 | if from_node { 0x08 } else { 0x00 });
            self.0.extend_from_slice(&at.to_be_bytes());
            push_chunk(&mut self.0, plaintext);
            self
        }
        fn op(mut self, op: u8) -> Self {
            self.0.push(op);
            self
        }
        /// Advances the clock by `tenths` × 100 ms and runs the timers.
        fn wait(mut self, tenths: u16) -> Self {
            self.0.push(0x80 | 3);
            self.0.extend_from_slice(&tenths.to_be_bytes());
            self
        }
        fn ping(mut self, from_node: bool, frame_id: u16) -> Self {
            self.0.push(2 | if from_node { 0x08 } else { 0x00 });
            self.0.extend_from_slice(&frame_id.to_be_bytes());
            self
        }
    }
    let start = || Steps(Vec::new()).op(1);
    let request = encode(&Frame::new(
        5,
        Body::GetPreKeyCount(proto::GetPreKeyCount { device_id: 1 }),
    ));
    let ping = |id: &str| encode(&Frame::new(9, Body::Ping(proto::Ping { id: id.into() })));
    let pong = encode(&Frame::new(
        9,
        Body::Pong(proto::Pong {
            id: "p".into(),
            ping_id: "x".into(),
        }),
    ));
    let error = encode(&Frame::error(0, ErrorCode::Internal, "x"));
    let mut rotation = start();
    for _ in 0..1100 {
        rotation = rotation.inject(true, &[]);
    }
    let mut raw = Steps(Vec::new());
    for n in 0..4u8 {
        raw = raw.op(4);
        push_chunk(&mut raw.0, &vec![n; usize::from(n) * 7]);
    }
    vec![
        (
            "welcome-then-traffic",
            start()
                .inject(true, &request)
                .inject(true, &ping("a"))
                .inject(false, &request)
                .inject(true, &pong)
                .inject(true, &error)
                .inject(false, &[])
                .inject(true, &[])
                .ping(false, 3)
                .wait(310)
                .ping(true, 4)
                .0,
        ),
        ("no-welcome", Steps(Vec::new()).inject(false, &request).0),
        (
            "injected-welcome",
            Steps(Vec::new())
                .inject(
                    false,
                    &encode(&Frame::new(0, Body::Welcome(proto::Welcome::default()))),
                )
                .inject(false, &request)
                .0,
        ),
        (
            "garbage-plaintexts",
            start()
                .inject(true, &[0x0f, 0xff])
                .inject(false, &[0x0f, 0xff])
                .inject(true, &ping(""))
                .0,
        ),
        (
            "ping-flood",
            start()
                .inject(true, &ping("a"))
                .wait(100)
                .inject(true, &ping("b"))
                .0,
        ),
        (
            "probe-then-idle",
            start().wait(610).wait(210).wait(3000).wait(3000).0,
        ),
        ("corrupt-frame", start().corrupt(true, 3, &request).0),
        ("key-rotation", rotation.0),
        ("raw-round-trips", raw.0),
    ]
}

// ---------------------------------------------------------------------------------------------
// Relay
// ---------------------------------------------------------------------------------------------

/// Steps of the `relay_requests` target.
struct Requests(Vec<u8>);

impl Requests {
    fn new(flags: u8) -> Self {
        Self(vec![flags])
    }

    /// A frame from session `session` (0, 2: alice; 1: bob), with the harness's fix-up aimed
    /// at `fix` (0: alice, 1: bob) if given.
    fn send(mut self, session: u8, fix: Option<u8>, frame: &Frame) -> Self {
        self.0.push(session | if fix.is_some() { 0x10 } else { 0 });
        if let Some(pick) = fix {
            self.0.push(pick);
        }
        push_chunk(&mut self.0, &encode(frame));
        self
    }

    fn raw(mut self, session: u8, plaintext: &[u8]) -> Self {
        self.0.push(session);
        push_chunk(&mut self.0, plaintext);
        self
    }

    fn reconnect(mut self, session: u8) -> Self {
        self.0.push(3 | (session << 4));
        self
    }

    fn sweep(mut self) -> Self {
        self.0.push(3 | (1 << 2));
        self
    }
}

fn register(id: u64, device_id: u32, one_time: u32) -> Frame {
    Frame::new(
        id,
        Body::Register(proto::Register {
            device_id,
            registration_id: 1000 + device_id,
            identity_key: Bytes::from(vec![0x05; 33]),
            signed_prekey: Some(proto::SignedPreKey {
                id: 1,
                public_key: Bytes::from(vec![0x06; 33]),
                signature: Bytes::from(vec![0x07; 64]),
            }),
            one_time_prekeys: (1..=one_time)
                .map(|id| proto::PreKey {
                    id,
                    public_key: Bytes::from(vec![0x21; 33]),
                })
                .collect(),
        }),
    )
}

fn send_to(id: u64, device: u32, payload: &[u8], nonce: u8) -> Frame {
    Frame::new(
        id,
        Body::Send(proto::Send {
            recipient_device: device,
            sender_device: 1,
            sender_nonce: Bytes::from(vec![nonce; 8]),
            payload: Bytes::copy_from_slice(payload),
            ..proto::Send::default()
        }),
    )
}

fn relay_requests() -> Seeds {
    use proto::{
        AckMessages, AddContact, CreateTicket, FetchPreKeys, GetMessage, GetPreKeyCount,
        RemoveContact, SetPolicy, Subscribe, Unregister, UploadPreKeys,
    };
    let subscribe = |id, device_id, after_id| {
        Frame::new(
            id,
            Body::Subscribe(Subscribe {
                device_id,
                after_id,
            }),
        )
    };
    let ack = |id, ids: Vec<u64>| {
        Frame::new(
            id,
            Body::AckMessages(AckMessages {
                device_id: 1,
                message_ids: ids,
            }),
        )
    };
    let fetch = |id| {
        Frame::new(
            id,
            Body::FetchPreKeys(FetchPreKeys {
                identity: Bytes::new(),
                device_ids: vec![],
            }),
        )
    };
    let policy = |id, accept: proto::Accept| {
        Frame::new(
            id,
            Body::SetPolicy(SetPolicy {
                accept: accept as i32,
            }),
        )
    };
    let contact = Body::AddContact(AddContact {
        identity: Bytes::new(),
    });
    let ticket = Frame::new(30, Body::CreateTicket(CreateTicket { ttl_s: 60, uses: 2 }));

    let conversation = Requests::new(0)
        .send(0, None, &register(1, 1, 3))
        .send(1, None, &register(1, 1, 12))
        .send(0, Some(1), &send_to(2, 1, b"hello bob", 1))
        .send(1, None, &subscribe(2, 1, 0))
        .send(0, Some(1), &send_to(3, 1, b"live", 2))
        .send(0, Some(1), &send_to(4, 1, b"live", 2))
        .send(1, None, &ack(3, vec![1, 2, 99]))
        .send(
            1,
            None,
            &Frame::new(
                4,
                Body::GetMessage(GetMessage {
                    device_id: 1,
                    message_id: 3,
                }),
            ),
        )
        .send(0, Some(1), &fetch(5))
        .send(0, Some(1), &fetch(6))
        .send(
            1,
            None,
            &Frame::new(5, Body::GetPreKeyCount(GetPreKeyCount { device_id: 1 })),
        )
        .send(
            1,
            None,
            &Frame::new(
                6,
                Body::UploadPreKeys(UploadPreKeys {
                    device_id: 1,
                    signed_prekey: None,
                    one_time_prekeys: vec![proto::PreKey {
                        id: 50,
                        public_key: Bytes::from(vec![0x22; 33]),
                    }],
                }),
            ),
        )
        .send(2, None, &subscribe(1, 1, 0))
        .send(1, Some(1), &send_to(7, 1, b"to myself", 3))
        .send(1, Some(0), &send_to(8, 1, b"to alice", 4))
        .send(0, None, &subscribe(9, 1, 0))
        .sweep()
        .reconnect(1)
        .send(1, None, &subscribe(9, 1, 1))
        .send(
            1,
            None,
            &Frame::new(10, Body::Unregister(Unregister { device_id: 1 })),
        )
        .sweep();

    let policy_and_tickets = Requests::new(0)
        .send(0, None, &register(1, 1, 1))
        .send(1, None, &register(1, 1, 1))
        .send(1, None, &policy(2, proto::Accept::ContactsOnly))
        .send(0, Some(1), &send_to(2, 1, b"refused", 1))
        .send(1, None, &ticket)
        .send(1, Some(0), &Frame::new(31, contact.clone()))
        .send(
            1,
            Some(0),
            &Frame::new(
                32,
                Body::RemoveContact(RemoveContact {
                    identity: Bytes::new(),
                }),
            ),
        )
        .send(0, Some(1), &send_to(3, 1, b"with a ticket?", 2))
        .send(1, None, &subscribe(33, 1, 0));

    let mut tight = Requests::new(1)
        .send(0, None, &register(1, 1, 4))
        .send(1, None, &register(1, 1, 4))
        .send(1, None, &register(2, 2, 0))
        .send(1, None, &subscribe(3, 1, 0));
    for n in 0..10u8 {
        tight = tight.send(0, Some(1), &send_to(10 + u64::from(n), 1, &[n; 700], n));
    }
    for n in 0..5 {
        tight = tight.send(0, Some(1), &fetch(30 + n));
    }
    for n in 0..4 {
        tight = tight.send(
            1,
            None,
            &Frame::new(
                40 + n,
                Body::CreateTicket(CreateTicket { ttl_s: 0, uses: 0 }),
            ),
        );
    }
    let tight = tight.send(1, None, &ack(50, vec![1, 2, 3])).sweep().sweep();

    let signed = Requests::new(2)
        .send(0, None, &register(1, 1, 0))
        .send(1, None, &register(1, 1, 0))
        .send(0, Some(1), &send_to(2, 1, b"signed", 1))
        .send(0, None, &send_to(3, 1, b"unsigned", 2));

    let odd = Requests::new(0)
        .send(
            0,
            None,
            &Frame::new(1, Body::Ping(proto::Ping { id: "p".into() })),
        )
        .send(0, None, &Frame::new(2, Body::Pong(proto::Pong::default())))
        .send(0, None, &Frame::error(3, ErrorCode::Internal, "x"))
        .send(
            0,
            None,
            &Frame::new(4, Body::Welcome(proto::Welcome::default())),
        )
        .send(
            0,
            None,
            &Frame::new(5, Body::Deliver(proto::Deliver::default())),
        )
        .send(0, None, &Frame { id: 6, body: None })
        .send(0, None, &register(0, 1, 1))
        .send(0, None, &register(7, 0, 1))
        .send(
            0,
            None,
            &Frame::new(8, Body::SetPolicy(SetPolicy { accept: 7 })),
        )
        .send(
            0,
            None,
            &Frame::new(
                9,
                Body::AddContact(AddContact {
                    identity: Bytes::from_static(b"short"),
                }),
            ),
        )
        .send(
            0,
            None,
            &Frame::new(
                10,
                Body::CreateTicket(CreateTicket {
                    ttl_s: u32::MAX,
                    uses: 1,
                }),
            ),
        )
        .send(0, None, &ack(11, vec![0; 5000]))
        .raw(0, &[0x0f, 0xff]);
    vec![
        ("conversation", conversation.0),
        ("policy-and-tickets", policy_and_tickets.0),
        ("tight-limits", tight.0),
        ("signatures-checked", signed.0),
        ("non-requests-and-bad-requests", odd.0),
    ]
}

// ---------------------------------------------------------------------------------------------
// Storage
// ---------------------------------------------------------------------------------------------

fn identity(key: &KeyPair) -> Bytes {
    Bytes::copy_from_slice(key.public().as_bytes())
}

fn event(kind: Kind) -> Vec<u8> {
    Event { kind: Some(kind) }.encode_to_vec()
}

/// Events that touch every kind, in an order that applies.
fn sample_events() -> Vec<Vec<u8>> {
    let keys = keys();
    let (alice, bob) = (identity(&keys.alice), identity(&keys.bob));
    let prekey = |id| proto::PreKey {
        id,
        public_key: Bytes::from(vec![0x21; 33]),
    };
    let stored = |message_id, payload: &[u8]| {
        event(Kind::MessageStored(ev::MessageStored {
            recipient: alice.clone(),
            device_id: 1,
            message_id,
            sender: bob.clone(),
            sender_device: 1,
            sender_nonce: Bytes::from(vec![message_id as u8; 8]),
            sender_signature: Bytes::from(vec![0x31; 64]),
            payload: Bytes::copy_from_slice(payload),
            received_at_ms: 1_700_000_000_000,
            ..ev::MessageStored::default()
        }))
    };
    vec![
        event(Kind::DeviceRegistered(ev::DeviceRegistered {
            identity: alice.clone(),
            device_id: 1,
            registration_id: 7,
            identity_key: Bytes::from(vec![0x05; 33]),
            signed_prekey: Some(proto::SignedPreKey {
                id: 1,
                public_key: Bytes::from(vec![0x06; 33]),
                signature: Bytes::from(vec![0x07; 64]),
            }),
            one_time_prekeys: vec![prekey(1), prekey(2), prekey(3)],
            at_ms: 1_700_000_000_000,
        })),
        event(Kind::DeviceRegistered(ev::DeviceRegistered {
            identity: bob.clone(),
            device_id: 1,
            ..ev::DeviceRegistered::default()
        })),
        event(Kind::PreKeysUploaded(ev::PreKeysUploaded {
            identity: alice.clone(),
            device_id: 1,
            signed_prekey: None,
            one_time_prekeys: vec![prekey(4)],
        })),
        event(Kind::PreKeysTaken(ev::PreKeysTaken {
            identity: alice.clone(),
            taken: vec![ev::TakenPreKey {
                device_id: 1,
                prekey_id: 2,
            }],
        })),
        stored(1, b"first"),
        stored(2, b"second"),
        stored(3, &[0x42; 300]),
        event(Kind::MessagesRemoved(ev::MessagesRemoved {
            identity: alice.clone(),
            device_id: 1,
            message_ids: vec![2],
            reason: ev::Removal::Acked as i32,
        })),
        event(Kind::PolicySet(ev::PolicySet {
            identity: alice.clone(),
            accept: proto::Accept::ContactsOnly as i32,
        })),
        event(Kind::ContactAdded(ev::ContactAdded {
            identity: alice.clone(),
            contact: bob.clone(),
        })),
        event(Kind::TicketCreated(ev::TicketCreated {
            identity: alice.clone(),
            token: Bytes::from(vec![0x51; 16]),
            expires_at_ms: 1_800_000_000_000,
            uses: 2,
            created_at_ms: 1_700_000_000_000,
        })),
        event(Kind::MailboxState(ev::MailboxState {
            identity: alice.clone(),
            device_id: 2,
            next_id: 40,
        })),
        event(Kind::AccountSeen(ev::AccountSeen {
            identity: bob.clone(),
            at_ms: 1_700_000_000_500,
        })),
        event(Kind::ContactRemoved(ev::ContactRemoved {
            identity: alice.clone(),
            contact: bob.clone(),
        })),
        event(Kind::DeviceUnregistered(ev::DeviceUnregistered {
            identity: bob.clone(),
            device_id: 1,
        })),
        event(Kind::AccountRemoved(ev::AccountRemoved {
            identity: bob,
            id_floor: 5,
        })),
    ]
}

/// Content of journal encoding mode 3: a marker, then `events` at lsns from `first_lsn` on.
fn journal_steps(first_lsn: u64, events: &[Vec<u8>]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&(first_lsn as u16).to_be_bytes());
    out.extend_from_slice(&((first_lsn + events.len() as u64 - 1) as u16).to_be_bytes());
    out.extend_from_slice(&12u32.to_be_bytes());
    for (n, event) in events.iter().enumerate() {
        if n == 0 {
            out.push(255);
            out.extend_from_slice(&first_lsn.to_be_bytes());
        } else {
            out.push(1);
        }
        push_chunk(&mut out, event);
    }
    out
}

/// Content of snapshot encoding mode 3.
fn snapshot_steps(covers: &[u16], id_floor: u16, events: &[Vec<u8>]) -> Vec<u8> {
    let mut out = vec![covers.len() as u8];
    for cover in covers {
        out.extend_from_slice(&cover.to_be_bytes());
    }
    out.extend_from_slice(&id_floor.to_be_bytes());
    for event in events {
        push_chunk(&mut out, event);
    }
    out
}

fn with_mode(mode: u8, content: Vec<u8>) -> Vec<u8> {
    let mut out = vec![mode];
    out.extend(content);
    out
}

fn journal_segment() -> Seeds {
    let events = sample_events();
    let steps = journal_steps(1, &events);
    let file = journal_bytes(3, &steps);
    let mut zero_tail = file.clone();
    zero_tail.extend_from_slice(&[0; 64]);
    let mut framed = Vec::new();
    for (n, event) in events.iter().enumerate() {
        let mut body = (n as u64 + 1).to_be_bytes().to_vec();
        body.extend_from_slice(event);
        push_chunk(&mut framed, &body);
    }
    let overflow = event(Kind::MessageStored(ev::MessageStored {
        recipient: identity(&keys().alice),
        device_id: 1,
        message_id: MAX_SEQUENCE,
        sender: identity(&keys().bob),
        sender_nonce: Bytes::from(vec![1; 8]),
        sender_signature: Bytes::from(vec![1; 64]),
        ..ev::MessageStored::default()
    }));
    vec![
        ("events-v2", with_mode(3, steps.clone())),
        ("events-v1-four-shards", with_mode(3 | 4 | 0x30, steps)),
        ("framed-records", with_mode(2, framed)),
        ("whole-file", with_mode(0, file.clone())),
        ("records-after-header", with_mode(1, file[12..].to_vec())),
        (
            "torn-last-record",
            with_mode(0, file[..file.len() - 5].to_vec()),
        ),
        ("zero-tail", with_mode(0, zero_tail)),
        (
            "overflowing-id",
            with_mode(3, journal_steps(1, &[events[0].clone(), overflow])),
        ),
    ]
}

/// The bytes of a snapshot the store's own writer writes of the sample events.
fn written_snapshot() -> Vec<u8> {
    let dir = super::storage::TempDir::new();
    let config = botd_relay::config::Config {
        store_shards: 2,
        ..botd_relay::config::Config::default()
    };
    let state = botd_relay::store::embedded::State::new(&config, None);
    for bytes in sample_events() {
        let event = Event::decode(&bytes[..]).expect("a sample event");
        state.replay(&event).expect("sample events apply");
    }
    let info = botd_relay::store::embedded::snapshot::write(&dir.0, 3, &state, 1_700_000_001_000)
        .expect("a snapshot is written");
    std::fs::read(info.path).expect("the snapshot reads back")
}

fn snapshot_file() -> Seeds {
    let events = sample_events();
    let record = |kind| {
        let mut out = Vec::new();
        push_chunk(&mut out, &super::storage::snapshot_record_body(kind));
        out
    };
    let header = record(ev::snapshot_record::Kind::Header(ev::SnapshotHeader {
        shard_count: 1,
        created_at_ms: 1,
    }));
    let trailer = |events| {
        record(ev::snapshot_record::Kind::Trailer(ev::SnapshotTrailer {
            events,
            cover_lsns: vec![3],
            id_floor: 0,
        }))
    };
    let one_event = record(ev::snapshot_record::Kind::Event(
        Event::decode(&events[0][..]).expect("a sample event"),
    ));
    let framed = |parts: &[&[u8]]| with_mode(2, parts.concat());
    let written = written_snapshot();
    let mut after_trailer = written.clone();
    after_trailer.extend_from_slice(&written[12..]);
    vec![
        ("events", with_mode(3, snapshot_steps(&[5], 0, &events))),
        (
            "events-two-covers",
            with_mode(3 | 0x10, snapshot_steps(&[5, 9], 3, &events[..6])),
        ),
        (
            "no-covers",
            with_mode(3, snapshot_steps(&[], 0, &events[..2])),
        ),
        ("written-by-the-store", with_mode(0, written.clone())),
        ("no-trailer", framed(&[&header, &one_event])),
        ("miscounted", framed(&[&header, &one_event, &trailer(2)])),
        ("trailer-first", framed(&[&trailer(0), &header])),
        ("data-after-trailer", with_mode(0, after_trailer)),
        (
            "truncated",
            with_mode(0, written[..written.len() - 9].to_vec()),
        ),
    ]
}

/// Input of the `data_dir` target: segments as (name, mode, content), a snapshot likewise.
fn data_dir_input(
    shards: u8,
    segments: &[(u16, u8, Vec<u8>)],
    snapshot: Option<(u8, u8, Vec<u8>)>,
    leftover: bool,
) -> Vec<u8> {
    let flags = segments.len() as u8
        | if snapshot.is_some() { 4 } else { 0 }
        | if leftover { 8 } else { 0 }
        | (shards << 4);
    let mut out = vec![flags];
    for (name, mode, content) in segments {
        out.extend_from_slice(&name.to_be_bytes());
        out.push(*mode);
        push_chunk(&mut out, content);
    }
    if let Some((name, mode, content)) = snapshot {
        out.push(name);
        out.push(mode);
        push_chunk(&mut out, &content);
    }
    out
}

/// A data directory a relay left behind: a snapshot of the first changes, the journal of the
/// later ones; as (segments, snapshot) of raw files.
/// Journal segments as (first lsn, bytes) and a snapshot as (number, bytes).
type RawFiles = (Vec<(u16, Vec<u8>)>, Option<(u8, Vec<u8>)>);

fn relay_data_dir() -> RawFiles {
    use botd_relay::store::{MailboxId, NewMessage, Registration, Store};
    let dir = super::storage::TempDir::new();
    let config = botd_relay::config::Config {
        data_dir: dir.0.clone(),
        fsync: botd_relay::config::FsyncPolicy::Never,
        store_shards: 2,
        ..botd_relay::config::Config::default()
    };
    let keys = keys();
    let (alice, bob) = (
        *keys.alice.public().as_bytes(),
        *keys.bob.public().as_bytes(),
    );
    let (store, _) = botd_relay::store::embedded::EmbeddedStore::open(&config, 1)
        .expect("a fresh directory opens");
    let state = store.state();
    let registration = Registration {
        device: 1,
        registration_id: 1,
        identity_key: Bytes::from(vec![5; 33]),
        signed_prekey: proto::SignedPreKey {
            id: 1,
            public_key: Bytes::from(vec![6; 33]),
            signature: Bytes::from(vec![7; 64]),
        },
        one_time_prekeys: vec![],
    };
    let message = |n: u8| NewMessage {
        to: MailboxId {
            identity: alice,
            device: 1,
        },
        sender: bob,
        sender_device: 1,
        nonce: [n; 8],
        payload_hash: botd_protocol::keys::sha256(&[&[n]]),
        signature: [1; 64],
        payload: Bytes::from(vec![n]),
        ticket: None,
        received_at_ms: 1_700_000_000_000,
        bad_signature: None,
    };
    // One account in the snapshot: a snapshot lists accounts in map order, which differs
    // from run to run, and seeds are the same bytes on every run.
    let _ = state.register(&alice, registration.clone(), 1_700_000_000_000);
    let _ = state.append(message(1));
    store.flush();
    store.snapshot(1_700_000_000_100).expect("a snapshot");
    // Each change written on its own (a batch of one), so that the journal's batch markers
    // fall in the same places on every run.
    let written = |lsn: Option<u64>| {
        let journal = store.journal().expect("a journal");
        let lsn = lsn.expect("the change is recorded");
        for _ in 0..10_000 {
            journal.kick();
            if journal.progress().durable() >= lsn {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("lsn {lsn} is never written");
    };
    written(
        state
            .register(&bob, registration, 1_700_000_000_000)
            .ok()
            .map(|c| c.lsn),
    );
    written(state.append(message(2)).ok().map(|c| c.lsn));
    written(
        state
            .ack(
                &MailboxId {
                    identity: alice,
                    device: 1,
                },
                &[1],
            )
            .ok()
            .map(|c| c.lsn),
    );
    store.journal().expect("a journal").shutdown();
    drop(store);
    let files = |sub: &str| {
        let mut found: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir.0.join(sub))
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        (name, std::fs::read(e.path()).expect("a file"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        found
    };
    let number = |name: &str| -> u64 {
        name.trim_start_matches(|c: char| !c.is_ascii_digit())
            .trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .expect("a numbered file")
    };
    let segments = files("journal")
        .into_iter()
        .map(|(name, bytes)| (number(&name) as u16, bytes))
        .collect();
    let snapshot = files("snapshots")
        .into_iter()
        .last()
        .map(|(name, bytes)| (number(&name) as u8, bytes));
    (segments, snapshot)
}

fn data_dir() -> Seeds {
    let events = sample_events();
    let (first, second) = events.split_at(6);
    let segment = |first_lsn, events: &[Vec<u8>]| journal_steps(first_lsn, events);
    let second_file = journal_bytes(3, &segment(7, second));
    let torn = second_file[12..second_file.len() - 3].to_vec();
    let mut corrupt = journal_bytes(3, &segment(1, first));
    let middle = corrupt.len() / 2;
    corrupt[middle] ^= 0x01;
    let snapshot = (2, 3, snapshot_steps(&[6], 0, first));

    let (relay_segments, relay_snapshot) = relay_data_dir();
    let relay_segments: Vec<(u16, u8, Vec<u8>)> = relay_segments
        .into_iter()
        .map(|(name, bytes)| (name, 0, bytes))
        .collect();
    let relay_snapshot = relay_snapshot.map(|(name, bytes)| (name, 0, bytes));
    let header = journal_header(0).to_vec();
    vec![
        (
            "snapshot-then-journal",
            data_dir_input(
                1,
                &[(7, 3, segment(7, second))],
                Some(snapshot.clone()),
                false,
            ),
        ),
        (
            "journal-only-two-segments",
            data_dir_input(
                0,
                &[(1, 3, segment(1, first)), (7, 3, segment(7, second))],
                None,
                false,
            ),
        ),
        (
            "torn-tail-in-last-segment",
            data_dir_input(2, &[(1, 3, segment(1, first)), (7, 1, torn)], None, true),
        ),
        (
            "corrupt-earlier-segment",
            data_dir_input(
                0,
                &[(1, 0, corrupt), (7, 3, segment(7, second))],
                None,
                false,
            ),
        ),
        (
            "header-only-last-segment",
            data_dir_input(
                0,
                &[(1, 3, segment(1, first)), (9, 0, header.clone())],
                None,
                false,
            ),
        ),
        (
            "empty-segments-at-the-end",
            data_dir_input(
                0,
                &[
                    (1, 3, segment(1, first)),
                    (7, 0, header.clone()),
                    (8, 0, header.clone()),
                ],
                None,
                false,
            ),
        ),
        (
            "segment-named-after-later-records",
            data_dir_input(
                0,
                &[(1, 3, segment(1, first)), (20, 3, segment(7, second))],
                None,
                false,
            ),
        ),
        (
            "partial-header-last-segment",
            data_dir_input(
                0,
                &[(1, 3, segment(1, first)), (9, 0, header[..5].to_vec())],
                None,
                false,
            ),
        ),
        (
            "snapshot-covers-journal",
            data_dir_input(3, &[(1, 3, segment(1, first))], Some(snapshot), false),
        ),
        (
            "left-by-a-relay",
            data_dir_input(1, &relay_segments, relay_snapshot, false),
        ),
        (
            "raw-snapshot-bytes",
            data_dir_input(
                0,
                &[],
                Some((1, 0, snapshot_bytes(3, &snapshot_steps(&[1], 0, first)))),
                false,
            ),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// JetStream store
// ---------------------------------------------------------------------------------------------

/// A `nats_wire` input: flags, message limit, piece lengths, then the stream or the program.
fn nats_input(flags: u8, max_message: u16, pieces: &[u16], content: &[u8]) -> Vec<u8> {
    let mut out = vec![flags];
    out.extend_from_slice(&max_message.to_be_bytes());
    out.push(pieces.len() as u8);
    for piece in pieces {
        out.extend_from_slice(&piece.to_be_bytes());
    }
    out.extend_from_slice(content);
    out
}

/// A `nats_wire` program, step by step (`nats::step`).
#[derive(Default)]
struct Program(Vec<u8>);

impl Program {
    fn step(&mut self, step: u8, variant: u8) -> &mut Self {
        self.0.push(step | variant << 3);
        self
    }

    fn chunk(&mut self, bytes: &[u8]) -> &mut Self {
        push_chunk(&mut self.0, bytes);
        self
    }

    fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.step(step::RAW, 0).chunk(bytes)
    }

    fn msg(&mut self, variant: u8, sid: u8, payload: &[u8]) -> &mut Self {
        self.step(step::MSG, variant).0.push(sid);
        self.chunk(payload)
    }

    fn hmsg(&mut self, variant: u8, sid: u8, shape: u8, seq: u32, payload: &[u8]) -> &mut Self {
        self.step(step::HMSG, variant).0.push(sid);
        self.0.push(shape);
        self.0.extend_from_slice(&seq.to_be_bytes());
        self.chunk(payload)
    }

    fn info(&mut self, variant: u8, json: &[u8]) -> &mut Self {
        self.step(step::INFO, variant).chunk(json)
    }

    fn control(&mut self, variant: u8) -> &mut Self {
        self.step(step::CONTROL, variant)
    }

    fn err(&mut self, variant: u8, text: &[u8]) -> &mut Self {
        self.step(step::ERR, variant).chunk(text)
    }

    fn long_line(&mut self, start: u8, end: u8, change: i8) -> &mut Self {
        self.step(step::LONG_LINE, start | end << 2)
            .0
            .push(change as u8);
        self
    }

    fn cut(&mut self) -> &mut Self {
        self.step(step::CUT, 0)
    }

    fn input(&self, max_message: u16, pieces: &[u16]) -> Vec<u8> {
        nats_input(BUILT, max_message, pieces, &self.0)
    }
}

/// An `HMSG` as a server frames it.
fn hmsg_bytes(subject: &str, sid: u64, headers: &str, payload: &str) -> Vec<u8> {
    let total = headers.len() + payload.len();
    format!(
        "HMSG {subject} {sid} {} {total}\r\n{headers}{payload}\r\n",
        headers.len()
    )
    .into_bytes()
}

fn nats_wire() -> Seeds {
    const INFO: &[u8] = b"INFO {\"server_id\":\"NDQ2XH7C\",\"server_name\":\"n1\",\"version\":\"2.12.1\",\
        \"proto\":1,\"headers\":true,\"max_payload\":1048576,\"jetstream\":true,\"client_id\":7}\r\n";
    const JSON: &[u8] = b"{\"max_payload\":1048576,\"headers\":true}";
    let mut handshake = INFO.to_vec();
    handshake.extend_from_slice(b"+OK\r\nPONG\r\n");

    let mut republished = hmsg_bytes(
        "botd.live.m0.ab",
        7,
        "NATS/1.0\r\nNats-Stream: botd-m0\r\nNats-Subject: botd.m0.ab\r\nNats-Sequence: 42\r\n\
         Nats-Last-Sequence: 40\r\n\r\n",
        "hello",
    );
    republished.extend_from_slice(b"MSG botd.gone.ab 9 reply.x 3\r\nabc\r\nPING\r\n");
    republished.extend_from_slice(&hmsg_bytes(
        "_INBOX.x.1",
        3,
        "NATS/1.0 404 No Messages\r\n\r\n",
        "",
    ));
    republished.extend_from_slice(&hmsg_bytes("_INBOX.x.2", 3, "NATS/1.0\r\n\r\n", "sealed"));

    let mut every_step = Program::default();
    every_step.info(0, JSON);
    for variant in 0..8 {
        every_step.control(variant);
    }
    every_step
        .msg(0, 1, b"abc")
        .msg(4, 2, b"")
        .hmsg(1, 3, 4, 42, b"hello")
        .cut()
        .hmsg(0, 4, 1, 0, b"")
        .err(0, b"Authorization Violation")
        .raw(b"PONG\r\n");
    let mut statuses = Program::default();
    for shape in 0..4 {
        statuses.hmsg(2, 5, shape, 0, b"");
    }
    let mut spellings = Program::default();
    spellings
        .msg(3 << 3, 6, b"xyz")
        .hmsg(3 << 3 | 4, 7, 4, 9, b"p")
        .info(1, b"{}")
        .err(1, b" unquoted ");

    vec![
        (
            "handshake",
            nats_input(HANDSHAKE_LIMIT, 0, &[7, 100], &handshake),
        ),
        (
            "republished-and-replies",
            nats_input(0, 4096, &[3, 40, 60, 1, 59], &republished),
        ),
        (
            "byte-by-byte",
            nats_input(0, 64, &[1; 15], b"PING\r\nMSG s 1 2\r\nhi\r\n+OK\r\n"),
        ),
        ("every-step", every_step.input(4096, &[1, 2, 30])),
        ("status-lines", statuses.input(4096, &[])),
        ("lower-case-and-tabs", spellings.input(4096, &[5])),
        (
            "message-over-the-limit",
            nats_input(0, 16, &[], b"MSG s 1 17\r\n01234567890123456\r\n"),
        ),
        (
            "header-length-over-total",
            Program::default()
                .hmsg(0, 1, 4 | 2 << 3, 1, b"body")
                .input(4096, &[]),
        ),
        (
            "header-length-one-over",
            Program::default()
                .hmsg(0, 1, 4 | 1 << 3, 42, b"hello")
                .input(4096, &[]),
        ),
        (
            "total-one-short",
            Program::default().msg(2 << 3, 1, b"abc").input(4096, &[]),
        ),
        (
            "total-one-over-at-the-end",
            Program::default()
                .control(0)
                .msg(1 << 3, 1, b"abc")
                .input(4096, &[]),
        ),
        (
            "missing-line-end",
            nats_input(0, 4096, &[2], b"PING\r\nPONG\n+OK"),
        ),
        (
            "number-too-long",
            nats_input(0, 4096, &[], b"MSG s 1 99999999999999999999\r\n"),
        ),
        (
            "unknown-after-err",
            nats_input(
                0,
                4096,
                &[],
                b"-ERR 'Stale Connection'\r\nHPUB s 1 2 2\r\nhi\r\n",
            ),
        ),
        (
            "info-at-the-line-limit",
            Program::default()
                .long_line(0, 0, 0)
                .control(0)
                .input(4096, &[]),
        ),
        (
            "info-at-the-line-limit-cut-before-lf",
            Program::default()
                .long_line(0, 1, 0)
                .cut()
                .raw(b"\n")
                .control(0)
                .input(4096, &[]),
        ),
        (
            "line-a-byte-over-the-limit",
            Program::default().long_line(2, 2, 1).input(4096, &[]),
        ),
        (
            "line-over-the-limit",
            Program::default().long_line(2, 2, 2).input(4096, &[]),
        ),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_target_has_seeds_and_they_pass() {
        let seeds = super::seeds();
        for (target, harness) in super::super::TARGETS {
            let mine: Vec<_> = seeds.iter().filter(|s| s.target == *target).collect();
            assert!(mine.len() >= 4, "{target} has {} seeds", mine.len());
            for seed in mine {
                let _ = harness(&seed.data);
            }
        }
    }

    #[test]
    fn fixture_keys_are_distinct() {
        use super::super::transport::{node_keys, raw_keys, relay_keys};
        assert!(node_keys() != relay_keys() && relay_keys() != raw_keys());
    }

    #[test]
    fn relay_configs_are_valid() {
        for flags in 0..4 {
            super::super::relay::relay_config(flags)
                .validate()
                .expect("a valid config");
        }
    }
}
