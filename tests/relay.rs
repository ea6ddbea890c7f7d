//! The relay application over loopback: registration, prekeys, mailboxes, live delivery, acks,
//! ordering, quotas, rate limits, slow consumers, replacement, contacts and tickets, and the rule
//! that a session only ever touches its own identity's mailboxes. Time-dependent behaviour
//! (message TTL, ticket expiry) is driven through the `Handler` trait with paused tokio time.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use botd_client::{verify_delivery, Client, OutgoingMessage};
use botd_protocol::keys::{KeyPair, PublicKeyBytes};
use botd_protocol::proto::{
    Accept, Body, CreateTicket, Deliver, ErrorCode, FetchPreKeys, Frame, GetMessage,
    GetPreKeyCount, PreKey, Registered, Sent, SetPolicy, Subscribe, UploadPreKeys,
};
use botd_relay::config::Config;
use botd_relay::ratelimit::Rate;
use bytes::Bytes;
use common::*;
use tokio::time::{sleep, timeout};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn same_key(a: &KeyPair) -> Arc<KeyPair> {
    Arc::new(KeyPair::from_secret_bytes(&a.secret_bytes()).unwrap())
}

fn prekeys(ids: std::ops::RangeInclusive<u32>) -> Vec<PreKey> {
    ids.map(|id| PreKey {
        id,
        public_key: Bytes::from(vec![0x21; 33]),
    })
    .collect()
}

// --- Driving the application directly through `Handler` (for paused time) -------------------

fn direct_app(config: Config) -> Arc<App> {
    app(&config, *KeyPair::generate().public())
}

fn direct_code(body: &Body) -> ErrorCode {
    match body {
        Body::Error(error) => error.code(),
        other => panic!("expected an Error answer, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Every request and its answer
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn offline_backlog_then_live_delivery_then_ack() {
    let (relay, _app) = start_relay(test_config()).await;
    let alice = relay.client().await;
    let mut bob = relay.client().await;
    alice.register(registration(1, 5)).await.unwrap();
    bob.register(registration(1, 5)).await.unwrap();
    let bob_key = *bob.identity();

    for text in ["one", "two"] {
        let sent = alice
            .send_message(OutgoingMessage::new(
                bob_key,
                1,
                1,
                text.as_bytes().to_vec(),
            ))
            .await
            .unwrap();
        assert!(!sent.duplicate);
    }
    let subscribed = bob.subscribe(1, 0).await.unwrap();
    assert_eq!(subscribed.last_id, 2);
    let mut ids = Vec::new();
    for expected in ["one", "two"] {
        let push = bob.next_push().await.unwrap();
        let Some(Body::Deliver(deliver)) = push.body else {
            panic!("{push:?}")
        };
        assert_eq!(&deliver.payload[..], expected.as_bytes());
        assert_eq!(
            verify_delivery(&deliver, &bob_key).unwrap(),
            *alice.identity()
        );
        ids.push(deliver.message_id);
    }
    assert_eq!(ids, vec![1, 2]);
    alice
        .send_message(OutgoingMessage::new(bob_key, 1, 1, b"live".to_vec()))
        .await
        .unwrap();
    let push = bob.next_push().await.unwrap();
    let Some(Body::Deliver(live)) = push.body else {
        panic!("{push:?}")
    };
    assert_eq!((live.message_id, &live.payload[..]), (3, &b"live"[..]));
    assert_eq!(bob.ack(1, vec![1, 2, 3, 99]).await.unwrap().deleted, 3);
    assert_eq!(
        bob.get_message(1, 2).await.unwrap_err().code(),
        Some(botd_protocol::proto::ErrorCode::NotFound)
    );
    relay.stop().await;
}

#[tokio::test]
async fn every_request_gets_its_answer() {
    let (relay, _app) = start_relay(test_config()).await;
    let alice = registered(&relay, 0).await;
    let mut bob = relay.client().await;
    let bob_key = *bob.identity();

    // Register -> Registered, counting the one-time prekeys stored.
    let registered = bob.register(registration(1, 5)).await.unwrap();
    assert_eq!(
        registered,
        Registered {
            device_id: 1,
            one_time_prekeys: 5
        }
    );
    let registered = bob.register(registration(2, 2)).await.unwrap();
    assert_eq!((registered.device_id, registered.one_time_prekeys), (2, 2));

    // UploadPreKeys -> PreKeyCount; GetPreKeyCount -> PreKeyCount.
    let count = bob
        .upload_prekeys(UploadPreKeys {
            device_id: 1,
            signed_prekey: None,
            one_time_prekeys: prekeys(6..=105),
        })
        .await
        .unwrap();
    assert_eq!((count.device_id, count.count), (1, 105));
    let count = bob.prekey_count(1).await.unwrap();
    assert_eq!((count.device_id, count.count), (1, 105));
    assert_eq!(bob.prekey_count(2).await.unwrap().count, 2);

    // FetchPreKeys with no device ids: one bundle per registered device.
    let bundles = alice.fetch_prekeys(&bob_key, vec![]).await.unwrap();
    let devices: Vec<u32> = bundles.iter().map(|b| b.device_id).collect();
    assert_eq!(devices, vec![1, 2]);
    for bundle in &bundles {
        assert_eq!(bundle.registration_id, 1000 + bundle.device_id);
        assert_eq!(&bundle.identity_key[..], &[0x05; 33][..]);
        assert_eq!(bundle.signed_prekey.as_ref().unwrap().id, 1);
        assert_eq!(bundle.one_time_prekey.as_ref().unwrap().id, 1);
    }
    // ... and with device ids: only those.
    let bundles = alice.fetch_prekeys(&bob_key, vec![2]).await.unwrap();
    assert_eq!(bundles.len(), 1);
    assert_eq!(bundles[0].device_id, 2);
    assert_eq!(bundles[0].one_time_prekey.as_ref().unwrap().id, 2);
    assert_eq!(bob.prekey_count(1).await.unwrap().count, 104);
    assert_eq!(bob.prekey_count(2).await.unwrap().count, 0);
    // Device 2 went 2 -> 1 -> 0: it crossed below the threshold of 10 once, so one
    // PreKeysLow (with the count the crossing left), not one per fetch.
    match next_push(&mut bob).await.body {
        Some(Body::PreKeysLow(low)) => assert_eq!((low.device_id, low.count), (2, 1)),
        other => panic!("expected PreKeysLow, got {other:?}"),
    }

    // Send -> Sent.
    let sent = alice.send_message(to(&bob, &b"hello"[..])).await.unwrap();
    assert_eq!(
        sent,
        Sent {
            message_id: 1,
            duplicate: false
        }
    );

    // Subscribe -> Subscribed, then the Deliver push.
    let subscribed = bob.subscribe(1, 0).await.unwrap();
    assert_eq!((subscribed.device_id, subscribed.last_id), (1, 1));
    let deliver = next_deliver(&mut bob).await;
    assert_eq!(deliver.message_id, 1);
    assert_eq!(&deliver.sender[..], alice.identity().as_bytes());
    assert_eq!((deliver.sender_device, deliver.recipient_device), (1, 1));
    assert_eq!(&deliver.payload[..], b"hello");
    assert!(deliver.received_at_ms > 1_600_000_000_000);
    verify_delivery(&deliver, &bob_key).unwrap();

    // GetMessage -> Deliver.
    let got = bob.get_message(1, 1).await.unwrap();
    assert_eq!(got, deliver);

    // AckMessages -> Acked.
    assert_eq!(bob.ack(1, vec![1]).await.unwrap().deleted, 1);

    // SetPolicy / AddContact / RemoveContact -> Done.
    bob.set_policy(Accept::ContactsOnly).await.unwrap();
    bob.add_contact(alice.identity()).await.unwrap();
    bob.remove_contact(alice.identity()).await.unwrap();
    bob.set_policy(Accept::Open).await.unwrap();

    // CreateTicket -> Ticket.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let ticket = bob.create_ticket(600, 3).await.unwrap();
    assert_eq!(ticket.token.len(), 16);
    assert_eq!(&ticket.identity[..], bob_key.as_bytes());
    assert_eq!(&ticket.relay_pubkey[..], relay.key.as_bytes());
    assert_eq!(ticket.uses, 3);
    assert!(
        ticket.expires_at_ms.abs_diff(before + 600_000) < 5_000,
        "expires_at_ms {} vs now {before}",
        ticket.expires_at_ms
    );

    // Unregister -> Unregistered.
    let unregistered = bob.unregister(2).await.unwrap();
    assert_eq!(unregistered.device_id, 2);
    let bundles = alice.fetch_prekeys(&bob_key, vec![]).await.unwrap();
    assert_eq!(bundles.len(), 1, "an unregistered device has no bundle");
    relay.stop().await;
}

#[tokio::test]
async fn malformed_requests_are_bad_request() {
    let (relay, _app) = start_relay(test_config()).await;
    let alice = registered(&relay, 0).await;
    let bob = registered(&relay, 3).await;

    // Device id 0.
    assert_eq!(
        code(bob.register(registration(0, 1)).await),
        ErrorCode::BadRequest
    );
    // At most 100 one-time prekeys per request, in Register and in UploadPreKeys.
    assert_eq!(
        code(bob.register(registration(3, 101)).await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        bob.register(registration(3, 100))
            .await
            .unwrap()
            .one_time_prekeys,
        100
    );
    let upload = |ids| UploadPreKeys {
        device_id: 1,
        signed_prekey: None,
        one_time_prekeys: prekeys(ids),
    };
    assert_eq!(
        code(bob.upload_prekeys(upload(10..=110)).await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        bob.prekey_count(1).await.unwrap().count,
        3,
        "nothing stored"
    );
    assert_eq!(
        bob.upload_prekeys(upload(10..=109)).await.unwrap().count,
        103
    );
    // An id already stored.
    assert_eq!(
        code(bob.upload_prekeys(upload(1..=1)).await),
        ErrorCode::BadRequest
    );
    // A register without a signed prekey.
    let mut no_signed = registration(4, 0);
    no_signed.signed_prekey = None;
    assert_eq!(code(bob.register(no_signed).await), ErrorCode::BadRequest);

    // Sends: the payload hash is checked by the relay, and every field has its length.
    let good = to(&bob, &b"x"[..]).sign(&KeyPair::generate());
    let mut bad_hash = good.clone();
    bad_hash.payload = Bytes::from_static(b"y");
    assert_eq!(code(alice.send_raw(bad_hash).await), ErrorCode::BadRequest);
    let mut device_zero = good.clone();
    device_zero.recipient_device = 0;
    assert_eq!(
        code(alice.send_raw(device_zero).await),
        ErrorCode::BadRequest
    );
    let mut short_nonce = good.clone();
    short_nonce.sender_nonce = Bytes::from_static(b"1234");
    assert_eq!(
        code(alice.send_raw(short_nonce).await),
        ErrorCode::BadRequest
    );
    let mut short_recipient = good.clone();
    short_recipient.recipient = Bytes::from_static(b"bob");
    assert_eq!(
        code(alice.send_raw(short_recipient).await),
        ErrorCode::BadRequest
    );
    let mut short_signature = good.clone();
    short_signature.sender_signature = Bytes::from(vec![1; 63]);
    assert_eq!(
        code(alice.send_raw(short_signature).await),
        ErrorCode::BadRequest
    );

    // Identities in other requests must be 33-byte keys.
    let request = Body::FetchPreKeys(FetchPreKeys {
        identity: Bytes::from_static(b"short"),
        device_ids: vec![],
    });
    assert_eq!(code(alice.request(request).await), ErrorCode::BadRequest);
    let request = Body::AddContact(botd_protocol::proto::AddContact {
        identity: Bytes::from_static(b"short"),
    });
    assert_eq!(code(alice.request(request).await), ErrorCode::BadRequest);
    relay.stop().await;
}

#[tokio::test]
async fn frame_id_zero_and_non_request_bodies_over_a_raw_session() {
    let (relay, _app) = start_relay(test_config()).await;
    let mut peer = RawPeer::connect(&relay).await;

    // A request needs a non-zero frame id: BAD_REQUEST, answered with id 0.
    let count = Body::GetPreKeyCount(GetPreKeyCount { device_id: 1 });
    peer.send(&Frame::new(0, count.clone())).await;
    let answer = peer.recv().await.unwrap();
    assert_eq!(answer.id, 0);
    assert_eq!(error_code(&answer), ErrorCode::BadRequest);

    // Response-type bodies sent as requests: UNSUPPORTED, with the request's id.
    let responses = [
        Body::Sent(Sent {
            message_id: 1,
            duplicate: false,
        }),
        Body::Registered(Registered {
            device_id: 1,
            one_time_prekeys: 0,
        }),
        Body::Deliver(Deliver::default()),
        Body::Done(botd_protocol::proto::Done {}),
    ];
    for (n, body) in responses.into_iter().enumerate() {
        let id = 10 + n as u64;
        peer.send(&Frame::new(id, body)).await;
        let answer = peer.recv().await.unwrap();
        assert_eq!(answer.id, id);
        assert_eq!(error_code(&answer), ErrorCode::Unsupported);
    }
    // A frame without a body.
    peer.send(&Frame { id: 20, body: None }).await;
    let answer = peer.recv().await.unwrap();
    assert_eq!(
        (answer.id, error_code(&answer)),
        (20, ErrorCode::Unsupported)
    );

    // The session is still served, and the identity is the session's: nothing is registered.
    peer.send(&Frame::new(21, count)).await;
    let answer = peer.recv().await.unwrap();
    assert_eq!(
        (answer.id, error_code(&answer)),
        (21, ErrorCode::NotRegistered)
    );
    peer.send(&Frame::new(22, Body::Register(registration(1, 2))))
        .await;
    let answer = peer.recv().await.unwrap();
    assert_eq!(answer.id, 22);
    assert!(
        matches!(answer.body, Some(Body::Registered(_))),
        "{answer:?}"
    );
    relay.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Registration and prekeys
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn unregistered_device_stops_receiving_and_ids_are_never_reused() {
    let (relay, _app) = start_relay(test_config()).await;
    let alice = registered(&relay, 0).await;
    let bob = registered(&relay, 1).await;
    for n in 1..=3 {
        let sent = alice.send_message(to(&bob, vec![n])).await.unwrap();
        assert_eq!(sent.message_id, u64::from(n));
    }
    bob.unregister(1).await.unwrap();
    assert_eq!(
        code(alice.send_message(to(&bob, &b"gone"[..])).await),
        ErrorCode::UnknownRecipient
    );
    assert_eq!(
        code(alice.fetch_prekeys(bob.identity(), vec![]).await),
        ErrorCode::UnknownRecipient,
        "no registered device left"
    );
    // The device is no longer this session's to read or unregister.
    assert_eq!(code(bob.get_message(1, 1).await), ErrorCode::NotRegistered);
    assert_eq!(code(bob.subscribe(1, 0).await), ErrorCode::NotRegistered);
    assert_eq!(code(bob.unregister(1).await), ErrorCode::NotRegistered);

    // Registering the same device id again: ids continue, never restart at 1.
    bob.register(registration(1, 1)).await.unwrap();
    let sent = alice.send_message(to(&bob, &b"back"[..])).await.unwrap();
    assert_eq!(sent.message_id, 4);
    assert_eq!(bob.subscribe(1, 0).await.unwrap().last_id, 4);
    relay.stop().await;
}

#[tokio::test]
async fn unknown_recipients() {
    let (relay, _app) = start_relay(test_config()).await;
    let alice = registered(&relay, 0).await;
    let bob = registered(&relay, 2).await;
    let stranger = *KeyPair::generate().public();

    let message = OutgoingMessage::new(stranger, 1, 1, &b"?"[..]);
    assert_eq!(
        code(alice.send_message(message).await),
        ErrorCode::UnknownRecipient
    );
    let message = OutgoingMessage::new(*bob.identity(), 7, 1, &b"?"[..]);
    assert_eq!(
        code(alice.send_message(message).await),
        ErrorCode::UnknownRecipient,
        "registered identity, unknown device"
    );
    assert_eq!(
        code(alice.fetch_prekeys(&stranger, vec![]).await),
        ErrorCode::UnknownRecipient
    );
    assert_eq!(
        code(alice.fetch_prekeys(bob.identity(), vec![1, 7]).await),
        ErrorCode::UnknownRecipient
    );
    assert_eq!(
        bob.prekey_count(1).await.unwrap().count,
        2,
        "a refused fetch takes nothing"
    );
    // The sender's own device must be registered.
    let message = OutgoingMessage::new(*bob.identity(), 1, 9, &b"?"[..]);
    assert_eq!(
        code(alice.send_message(message).await),
        ErrorCode::NotRegistered
    );
    let nobody = relay.client().await;
    assert_eq!(
        code(nobody.send_message(to(&bob, &b"?"[..])).await),
        ErrorCode::NotRegistered
    );
    assert_eq!(
        code(nobody.set_policy(Accept::ContactsOnly).await),
        ErrorCode::NotRegistered
    );
    assert_eq!(
        code(nobody.create_ticket(60, 1).await),
        ErrorCode::NotRegistered
    );
    assert_eq!(
        code(nobody.add_contact(alice.identity()).await),
        ErrorCode::NotRegistered
    );
    relay.stop().await;
}

#[tokio::test]
async fn prekeys_are_popped_once_and_bundles_lose_the_one_time_key_when_exhausted() {
    let (relay, _app) = start_relay(test_config()).await;
    let alice = registered(&relay, 0).await;
    let bob = registered(&relay, 2).await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let bundles = alice.fetch_prekeys(bob.identity(), vec![1]).await.unwrap();
        seen.push(bundles[0].one_time_prekey.as_ref().unwrap().id);
    }
    assert_eq!(seen, vec![1, 2]);
    assert_eq!(bob.prekey_count(1).await.unwrap().count, 0);
    for _ in 0..2 {
        let bundles = alice.fetch_prekeys(bob.identity(), vec![1]).await.unwrap();
        assert_eq!(bundles.len(), 1);
        let bundle = &bundles[0];
        assert!(bundle.one_time_prekey.is_none(), "{bundle:?}");
        assert!(bundle.signed_prekey.is_some(), "still a usable bundle");
        assert_eq!(bundle.registration_id, 1001);
    }
    // Fresh keys, and a replaced signed prekey.
    let count = bob
        .upload_prekeys(UploadPreKeys {
            device_id: 1,
            signed_prekey: Some(botd_protocol::proto::SignedPreKey {
                id: 2,
                public_key: Bytes::from(vec![0x31; 33]),
                signature: Bytes::from(vec![0x32; 64]),
            }),
            one_time_prekeys: prekeys(50..=51),
        })
        .await
        .unwrap();
    assert_eq!(count.count, 2);
    let bundles = alice.fetch_prekeys(bob.identity(), vec![1]).await.unwrap();
    assert_eq!(bundles[0].signed_prekey.as_ref().unwrap().id, 2);
    assert_eq!(bundles[0].one_time_prekey.as_ref().unwrap().id, 50);
    relay.stop().await;
}

#[tokio::test]
async fn prekeys_low_is_pushed_to_every_owner_session_below_the_threshold() {
    let (relay, _app) = start_relay(test_config()).await;
    let alice = registered(&relay, 0).await;
    let bob_key = Arc::new(KeyPair::generate());
    let mut bob = relay.client_as(bob_key.clone()).await;
    let mut bob_laptop = relay.client_as(bob_key.clone()).await;
    bob.register(registration(1, 11)).await.unwrap();
    let bob_id = *bob.identity();
    // 11 -> 10 left: not below the default threshold of 10.
    alice.fetch_prekeys(&bob_id, vec![]).await.unwrap();
    assert_no_push(&mut bob, "10 keys left is not low").await;
    // 10 -> 9: below. Both of bob's sessions are told; alice is not.
    alice.fetch_prekeys(&bob_id, vec![]).await.unwrap();
    for session in [&mut bob, &mut bob_laptop] {
        let frame = next_push(session).await;
        assert_eq!(frame.id, 0);
        match frame.body {
            Some(Body::PreKeysLow(low)) => assert_eq!((low.device_id, low.count), (1, 9)),
            other => panic!("expected PreKeysLow, got {other:?}"),
        }
    }
    assert_eq!(bob.prekey_count(1).await.unwrap().count, 9);
    let mut alice = alice;
    assert_no_push(&mut alice, "the fetcher is not told").await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_time_prekeys_go_out_exactly_once_to_50_concurrent_fetchers() {
    let config = Config {
        // This test is about the exactly-once pop, not the per-device rate.
        one_time_prekey_rate_per_device: Rate::new(1000.0, 1000),
        ..test_config()
    };
    let (relay, _app) = start_relay(config).await;
    let mut bob = registered(&relay, 30).await;
    let bob_id = *bob.identity();
    let mut fetchers = Vec::new();
    for _ in 0..50 {
        fetchers.push(relay.client().await);
    }
    let start = Arc::new(tokio::sync::Barrier::new(fetchers.len()));
    let mut tasks = tokio::task::JoinSet::new();
    for fetcher in fetchers {
        let start = start.clone();
        tasks.spawn(async move {
            start.wait().await;
            fetcher.fetch_prekeys(&bob_id, vec![1]).await.unwrap()
        });
    }
    let mut handed_out = Vec::new();
    let mut without = 0;
    while let Some(bundles) = timeout(HANG, tasks.join_next()).await.unwrap() {
        let bundles = bundles.unwrap();
        assert_eq!(bundles.len(), 1);
        match &bundles[0].one_time_prekey {
            Some(key) => handed_out.push(key.id),
            None => without += 1,
        }
    }
    handed_out.sort_unstable();
    assert_eq!(
        handed_out,
        (1..=30).collect::<Vec<u32>>(),
        "30 distinct keys"
    );
    assert_eq!(without, 20, "20 bundles without a one-time prekey");
    assert_eq!(bob.prekey_count(1).await.unwrap().count, 0);
    // The owner heard once, when the count first fell below 10 (fetches of one device are
    // applied one after the other, so that fetch left exactly 9).
    match next_push(&mut bob).await.body {
        Some(Body::PreKeysLow(low)) => assert_eq!((low.device_id, low.count), (1, 9)),
        other => panic!("expected PreKeysLow, got {other:?}"),
    }
    assert_no_push(&mut bob, "one notice per crossing of the threshold").await;
    relay.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Mailboxes
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn idempotent_resend_returns_the_first_id() {
    let (relay, _app) = start_relay(test_config()).await;
    let alice = registered(&relay, 0).await;
    let mallory = registered(&relay, 0).await;
    let bob = registered(&relay, 0).await;
    bob.register(registration(2, 0)).await.unwrap();

    let message = to(&bob, &b"once"[..]);
    let first = alice.send_message(message.clone()).await.unwrap();
    assert_eq!(
        first,
        Sent {
            message_id: 1,
            duplicate: false
        }
    );
    let again = alice.send_message(message.clone()).await.unwrap();
    assert_eq!(
        again,
        Sent {
            message_id: 1,
            duplicate: true
        }
    );
    // Same nonce, even with another payload: still the first message.
    let mut changed = message.clone();
    changed.payload = Bytes::from_static(b"twice?");
    assert_eq!(
        alice.send_message(changed).await.unwrap(),
        Sent {
            message_id: 1,
            duplicate: true
        }
    );
    // Another sender with the same nonce, or the same nonce to another mailbox: new messages.
    let other_sender = mallory.send_message(message.clone()).await.unwrap();
    assert_eq!(
        (other_sender.message_id, other_sender.duplicate),
        (2, false)
    );
    let mut other_device = message.clone();
    other_device.recipient_device = 2;
    let other_mailbox = alice.send_message(other_device).await.unwrap();
    assert_eq!(
        (other_mailbox.message_id, other_mailbox.duplicate),
        (1, false)
    );
    // A fresh nonce: the next id.
    let next = alice.send_message(to(&bob, &b"new"[..])).await.unwrap();
    assert_eq!((next.message_id, next.duplicate), (3, false));

    // Stored once.
    assert_eq!(&bob.get_message(1, 1).await.unwrap().payload[..], b"once");
    assert_eq!(bob.subscribe(1, 0).await.unwrap().last_id, 3);
    relay.stop().await;
}

#[tokio::test]
async fn ack_deletes_and_unknown_ids_are_harmless() {
    let (relay, _app) = start_relay(test_config()).await;
    let alice = registered(&relay, 0).await;
    let bob = registered(&relay, 0).await;
    for n in 1..=3u8 {
        alice.send_message(to(&bob, vec![n])).await.unwrap();
    }
    assert_eq!(bob.ack(1, vec![2]).await.unwrap().deleted, 1);
    assert_eq!(code(bob.get_message(1, 2).await), ErrorCode::NotFound);
    // Acking it again, unknown ids, duplicates in one request and an empty list are harmless.
    assert_eq!(bob.ack(1, vec![2]).await.unwrap().deleted, 0);
    assert_eq!(
        bob.ack(1, vec![0, 4, 99, u64::MAX]).await.unwrap().deleted,
        0
    );
    assert_eq!(bob.ack(1, vec![]).await.unwrap().deleted, 0);
    assert_eq!(bob.ack(1, vec![3, 3, 3]).await.unwrap().deleted, 1);
    // The others are untouched.
    assert_eq!(&bob.get_message(1, 1).await.unwrap().payload[..], &[1]);
    assert_eq!(code(bob.get_message(1, 3).await), ErrorCode::NotFound);
    assert_eq!(code(bob.get_message(1, 77).await), ErrorCode::NotFound);
    // Deleted ids are not reused.
    assert_eq!(
        alice
            .send_message(to(&bob, &b"4"[..]))
            .await
            .unwrap()
            .message_id,
        4
    );
    let mut bob = bob;
    bob.subscribe(1, 0).await.unwrap();
    let ids = [
        next_deliver(&mut bob).await.message_id,
        next_deliver(&mut bob).await.message_id,
    ];
    assert_eq!(ids, [1, 4], "only what was not acked is delivered");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_senders_get_gapless_increasing_ids_in_their_own_order() {
    const SENDERS: usize = 4;
    const EACH: usize = 50;
    let (relay, _app) = start_relay(test_config()).await;
    let mut bob = registered(&relay, 0).await;
    let bob_id = *bob.identity();
    // Subscribed before: half of the traffic arrives live, and order must hold for it too.
    assert_eq!(bob.subscribe(1, 0).await.unwrap().last_id, 0);
    let mut senders = Vec::new();
    for _ in 0..SENDERS {
        senders.push(registered(&relay, 0).await);
    }
    let start = Arc::new(tokio::sync::Barrier::new(SENDERS));
    let mut tasks = tokio::task::JoinSet::new();
    for (s, sender) in senders.into_iter().enumerate() {
        let start = start.clone();
        tasks.spawn(async move {
            start.wait().await;
            let mut ids = Vec::new();
            for n in 0..EACH {
                let payload = format!("{s}:{n}");
                let message = OutgoingMessage::new(bob_id, 1, 1, payload.into_bytes());
                ids.push(sender.send_message(message).await.unwrap().message_id);
            }
            (*sender.identity(), ids)
        });
    }
    let mut all_sent = Vec::new();
    let mut senders_of = HashMap::new();
    while let Some(joined) = timeout(HANG, tasks.join_next()).await.unwrap() {
        let (identity, ids) = joined.unwrap();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "one sender's ids increase"
        );
        all_sent.extend_from_slice(&ids);
        senders_of.insert(identity, ids);
    }
    all_sent.sort_unstable();
    let total = (SENDERS * EACH) as u64;
    assert_eq!(all_sent, (1..=total).collect::<Vec<u64>>());

    let mut next_of_sender: HashMap<String, usize> = HashMap::new();
    for expected_id in 1..=total {
        let deliver = next_deliver(&mut bob).await;
        assert_eq!(deliver.message_id, expected_id, "in id order, no gaps");
        let text = String::from_utf8(deliver.payload.to_vec()).unwrap();
        let (s, n) = text.split_once(':').unwrap();
        let expected_n = next_of_sender.entry(s.to_owned()).or_default();
        assert_eq!(
            n.parse::<usize>().unwrap(),
            *expected_n,
            "sender {s} in order"
        );
        *expected_n += 1;
        let sender = PublicKeyBytes::parse(&deliver.sender).unwrap();
        assert!(senders_of[&sender].contains(&deliver.message_id));
    }
    assert!(next_of_sender.values().all(|n| *n == EACH));
    relay.stop().await;
}

#[tokio::test]
async fn newer_subscription_replaces_the_older_one() {
    let (relay, _app) = start_relay(test_config()).await;
    let alice = registered(&relay, 0).await;
    let bob_key = Arc::new(KeyPair::generate());
    let mut phone = relay.client_as(bob_key.clone()).await;
    let mut laptop = relay.client_as(bob_key.clone()).await;
    phone.register(registration(1, 0)).await.unwrap();

    alice.send_message(to(&phone, &b"1"[..])).await.unwrap();
    phone.subscribe(1, 0).await.unwrap();
    assert_eq!(next_deliver(&mut phone).await.message_id, 1);
    // Subscribing again on the same session is not a replacement.
    phone.subscribe(1, 1).await.unwrap();
    assert_no_push(&mut phone, "same session resubscribing").await;

    let subscribed = laptop.subscribe(1, 0).await.unwrap();
    assert_eq!(subscribed.last_id, 1);
    let notice = next_push(&mut phone).await;
    assert_eq!(notice.id, 0);
    assert_eq!(error_code(&notice), ErrorCode::Replaced);
    // The newer one gets the unacked backlog and the live messages; the older one nothing.
    assert_eq!(next_deliver(&mut laptop).await.message_id, 1);
    alice.send_message(to(&phone, &b"2"[..])).await.unwrap();
    assert_eq!(next_deliver(&mut laptop).await.message_id, 2);
    assert_no_push(&mut phone, "replaced subscription").await;
    // The replaced session itself still works.
    assert_eq!(phone.get_message(1, 2).await.unwrap().message_id, 2);
    relay.stop().await;
}

#[tokio::test]
async fn at_most_max_unacked_deliveries_are_in_flight() {
    let (relay, _app) = start_relay(Config {
        max_unacked: 3,
        ..test_config()
    })
    .await;
    let alice = registered(&relay, 0).await;
    let mut bob = registered(&relay, 0).await;
    for n in 1..=10u8 {
        alice.send_message(to(&bob, vec![n])).await.unwrap();
    }
    assert_eq!(bob.subscribe(1, 0).await.unwrap().last_id, 10);
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_deliver(&mut bob).await.message_id);
    }
    assert_eq!(got, [1, 2, 3]);
    assert_no_push(&mut bob, "window of 3 is full").await;
    // GetMessage does not move the window.
    bob.get_message(1, 7).await.unwrap();
    assert_no_push(&mut bob, "window still full").await;
    // One ack, one more.
    assert_eq!(bob.ack(1, vec![1]).await.unwrap().deleted, 1);
    assert_eq!(next_deliver(&mut bob).await.message_id, 4);
    assert_no_push(&mut bob, "window full again").await;
    // Acking ids not in flight does not open it.
    assert_eq!(bob.ack(1, vec![9]).await.unwrap().deleted, 1);
    assert_no_push(&mut bob, "ack of an undelivered id").await;
    // Three acks, three more (9 is gone).
    bob.ack(1, vec![2, 3, 4]).await.unwrap();
    let got: Vec<u64> = [
        next_deliver(&mut bob).await.message_id,
        next_deliver(&mut bob).await.message_id,
        next_deliver(&mut bob).await.message_id,
    ]
    .into();
    assert_eq!(got, [5, 6, 7]);
    bob.ack(1, vec![5, 6, 7]).await.unwrap();
    assert_eq!(next_deliver(&mut bob).await.message_id, 8);
    assert_eq!(next_deliver(&mut bob).await.message_id, 10);
    // Live messages also wait for room.
    alice.send_message(to(&bob, &b"11"[..])).await.unwrap();
    alice.send_message(to(&bob, &b"12"[..])).await.unwrap();
    assert_eq!(next_deliver(&mut bob).await.message_id, 11);
    assert_no_push(&mut bob, "8, 10, 11 in flight").await;
    bob.ack(1, vec![8]).await.unwrap();
    assert_eq!(next_deliver(&mut bob).await.message_id, 12);
    relay.stop().await;
}

#[tokio::test]
async fn mailbox_quota_by_count_and_by_bytes() {
    let (relay, _app) = start_relay(Config {
        mailbox_max_messages: 3,
        mailbox_max_bytes: 1000,
        ..test_config()
    })
    .await;
    let alice = registered(&relay, 0).await;
    let bob = registered(&relay, 0).await;
    bob.register(registration(2, 0)).await.unwrap();

    // By count (device 1).
    let mut third = None;
    for n in 1..=3u8 {
        let message = to(&bob, vec![n]);
        alice.send_message(message.clone()).await.unwrap();
        third = Some(message);
    }
    assert_eq!(
        code(alice.send_message(to(&bob, &b"4"[..])).await),
        ErrorCode::MailboxFull
    );
    // A resend of a stored message stores nothing: still answered, as a duplicate.
    let resent = alice.send_message(third.unwrap()).await.unwrap();
    assert_eq!((resent.message_id, resent.duplicate), (3, true));
    // Acking makes room; the refused message took no id.
    bob.ack(1, vec![1]).await.unwrap();
    let sent = alice.send_message(to(&bob, &b"4"[..])).await.unwrap();
    assert_eq!(sent.message_id, 4);

    // By bytes (device 2): 600 + 600 > 1000, 600 + 400 = 1000 fits.
    let to2 = |len: usize| OutgoingMessage::new(*bob.identity(), 2, 1, vec![0x5a; len]);
    alice.send_message(to2(600)).await.unwrap();
    assert_eq!(
        code(alice.send_message(to2(600)).await),
        ErrorCode::MailboxFull
    );
    alice.send_message(to2(400)).await.unwrap();
    assert_eq!(
        code(alice.send_message(to2(1)).await),
        ErrorCode::MailboxFull
    );
    // Another mailbox of the same identity has its own quota... and so has another identity.
    let carol = registered(&relay, 0).await;
    alice.send_message(to(&carol, vec![0; 900])).await.unwrap();
    relay.stop().await;
}

#[tokio::test]
async fn payload_too_large() {
    let (relay, _app) = start_relay(Config {
        max_payload_len: 2048,
        ..test_config()
    })
    .await;
    let alice = registered(&relay, 0).await;
    let bob = registered(&relay, 0).await;
    assert_eq!(alice.welcome().max_payload_len, 2048);
    assert_eq!(
        code(alice.send_message(to(&bob, vec![1; 2049])).await),
        ErrorCode::PayloadTooLarge
    );
    let sent = alice.send_message(to(&bob, vec![1; 2048])).await.unwrap();
    assert_eq!(sent.message_id, 1, "the refused message took no id");
    relay.stop().await;
}

#[tokio::test(start_paused = true)]
async fn messages_expire_after_the_ttl_with_paused_time() {
    const DAY: Duration = Duration::from_secs(24 * 3600);
    // The default retention: 30 days.
    let config = Config::default();
    assert_eq!(config.message_ttl, 30 * DAY);
    let app = direct_app(config);
    let mut alice = DirectPeer::connect(&app);
    let mut bob = DirectPeer::connect(&app);
    alice.register(&app).await;
    bob.register(&app).await;
    let bob_id = bob.identity();
    let message = move |text: &'static str| OutgoingMessage::new(bob_id, 1, 1, text);

    let old = message("old");
    assert!(matches!(alice.send(&app, &old).await, Body::Sent(s) if s.message_id == 1));
    tokio::time::advance(20 * DAY).await;
    let young = message("young");
    assert!(matches!(alice.send(&app, &young).await, Body::Sent(s) if s.message_id == 2));

    // 29 days after the first: nothing expires yet.
    tokio::time::advance(9 * DAY).await;
    assert_eq!(app.sweep().await.unwrap(), 0);
    // 30 days and a second: the first expires, the second (10 days old) survives.
    tokio::time::advance(DAY + Duration::from_secs(1)).await;
    assert_eq!(app.sweep().await.unwrap(), 1);
    let get = |message_id| {
        Body::GetMessage(GetMessage {
            device_id: 1,
            message_id,
        })
    };
    assert_eq!(
        direct_code(&bob.call(&app, get(1)).await),
        ErrorCode::NotFound
    );
    match bob.call(&app, get(2)).await {
        Body::Deliver(deliver) => assert_eq!(&deliver.payload[..], b"young"),
        other => panic!("the younger message survives: {other:?}"),
    }
    // A subscriber gets only the survivor; ids keep increasing after expiry.
    let answer = bob
        .call(
            &app,
            Body::Subscribe(Subscribe {
                device_id: 1,
                after_id: 0,
            }),
        )
        .await;
    assert!(
        matches!(answer, Body::Subscribed(s) if s.last_id == 2),
        "{answer:?}"
    );
    let pushed = bob.try_push().expect("the survivor is pushed");
    assert!(matches!(pushed.body, Some(Body::Deliver(d)) if d.message_id == 2));
    assert!(bob.try_push().is_none());
    tokio::time::advance(20 * DAY).await;
    assert_eq!(app.sweep().await.unwrap(), 1);
    assert!(
        matches!(alice.send(&app, &message("later")).await, Body::Sent(s) if s.message_id == 3)
    );
}

// ---------------------------------------------------------------------------------------------
// Rate limits
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn sends_are_rate_limited_per_sender_identity() {
    let (relay, _app) = start_relay(Config {
        send_rate_per_identity: Rate::new(0.1, 3),
        ..test_config()
    })
    .await;
    let alice = registered(&relay, 0).await;
    let bob = registered(&relay, 0).await;
    let carol = registered(&relay, 0).await;
    alice.send_message(to(&bob, &b"1"[..])).await.unwrap();
    alice.send_message(to(&carol, &b"2"[..])).await.unwrap();
    alice.send_message(to(&bob, &b"3"[..])).await.unwrap();
    // The fourth, to anyone, is refused with a hint of when to retry (a token per 10 s).
    let wait = retry_after(alice.send_message(to(&carol, &b"4"[..])).await);
    assert!(wait > 0 && wait <= 10_000, "retry_after_ms = {wait}");
    // Another sender is not affected.
    bob.send_message(to(&carol, &b"b"[..])).await.unwrap();
    relay.stop().await;
}

#[tokio::test]
async fn sends_are_rate_limited_per_sender_recipient_pair() {
    let (relay, _app) = start_relay(Config {
        send_rate_per_pair: Rate::new(0.1, 2),
        ..test_config()
    })
    .await;
    let alice = registered(&relay, 0).await;
    let bob = registered(&relay, 0).await;
    let carol = registered(&relay, 0).await;
    alice.send_message(to(&bob, &b"1"[..])).await.unwrap();
    alice.send_message(to(&bob, &b"2"[..])).await.unwrap();
    let wait = retry_after(alice.send_message(to(&bob, &b"3"[..])).await);
    assert!(wait > 0 && wait <= 10_000, "retry_after_ms = {wait}");
    // Other pairs are not affected.
    alice.send_message(to(&carol, &b"1"[..])).await.unwrap();
    carol.send_message(to(&bob, &b"1"[..])).await.unwrap();
    relay.stop().await;
}

#[tokio::test]
async fn prekey_fetches_are_rate_limited_per_requester() {
    let (relay, _app) = start_relay(Config {
        prekey_fetch_rate: Rate::new(0.1, 2),
        ..test_config()
    })
    .await;
    let alice = registered(&relay, 0).await;
    let bob = registered(&relay, 5).await;
    let carol = registered(&relay, 0).await;
    alice.fetch_prekeys(bob.identity(), vec![]).await.unwrap();
    alice.fetch_prekeys(carol.identity(), vec![]).await.unwrap();
    let wait = retry_after(alice.fetch_prekeys(bob.identity(), vec![]).await);
    assert!(wait > 0 && wait <= 10_000, "retry_after_ms = {wait}");
    assert_eq!(
        bob.prekey_count(1).await.unwrap().count,
        4,
        "a refused fetch takes no key"
    );
    carol.fetch_prekeys(bob.identity(), vec![]).await.unwrap();
    relay.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Slow consumers
// ---------------------------------------------------------------------------------------------

const SLOW_LIMIT: usize = 256 << 10;
const LIVE_LEN: usize = 100 << 10;

/// Bob's session `raw` subscribed to device 1 and then stopped reading; alice sent four 100 KiB
/// messages to device 1 while its outbound queue (limit 256 KiB) could not drain.
struct SlowConsumerScene {
    relay: Relay,
    /// Another session of bob's identity.
    observer: Client,
    /// Bob's stalled session: it read nothing since `Subscribed`.
    raw: RawPeer,
    /// (message id, payload) of what alice sent to device 1 while `raw` was stalled.
    sent: Vec<(u64, Bytes)>,
}

/// Bytes pushed to a session first leave the outbound queue (the part `max_outbound_bytes`
/// bounds) for the connection task, which writes them into the socket; the kernel buffers several
/// MB between the relay and a peer that does not read (`RawPeer` reads only when asked). Only
/// once those are full does the relay's write block, and only then do pushes pile up in the
/// queue. So the stalled session first asks, in one write, for many large answers (GetMessage of
/// a 240 KiB message) interleaved with markers (UploadPreKeys of one key) that another session
/// can count. When the count stops moving, the relay's writes to the stalled session are blocked
/// and every further push stays queued. (One write of < 8 KiB is read by the relay in one go, so
/// none of our bytes is left unread in its socket when it closes: unread data would turn its
/// close into a reset that could drop its last frames, among them the SLOW_CONSUMER notice.)
async fn slow_consumer_scene() -> SlowConsumerScene {
    const PAIRS: u32 = 60;
    let (relay, _app) = start_relay(Config {
        max_outbound_bytes: SLOW_LIMIT,
        ..test_config()
    })
    .await;
    let alice = registered(&relay, 0).await;
    let mut raw = RawPeer::connect(&relay).await;
    let bob_id = *raw.identity.public();
    let observer = relay.client_as(same_key(&raw.identity)).await;
    observer.register(registration(1, 0)).await.unwrap();
    observer.register(registration(2, 0)).await.unwrap();
    let filler = alice
        .send_message(OutgoingMessage::new(bob_id, 2, 1, vec![0xf1; 240 << 10]))
        .await
        .unwrap();

    let subscribe = Body::Subscribe(Subscribe {
        device_id: 1,
        after_id: 0,
    });
    raw.send(&Frame::new(1, subscribe)).await;
    let answer = raw.recv().await.unwrap();
    assert!(
        matches!(answer.body, Some(Body::Subscribed(ref s)) if s.last_id == 0),
        "{answer:?}"
    );

    let mut wire = Vec::new();
    for n in 1..=PAIRS {
        let id = 2 * u64::from(n);
        let get = Body::GetMessage(GetMessage {
            device_id: 2,
            message_id: filler.message_id,
        });
        wire.extend_from_slice(&raw.seal(&Frame::new(id, get)));
        let marker = Body::UploadPreKeys(UploadPreKeys {
            device_id: 2,
            signed_prekey: None,
            one_time_prekeys: prekeys(n..=n),
        });
        wire.extend_from_slice(&raw.seal(&Frame::new(id + 1, marker)));
    }
    assert!(wire.len() < 8 << 10);
    tokio::io::AsyncWriteExt::write_all(&mut raw.stream, &wire)
        .await
        .unwrap();

    let mut last = u32::MAX;
    let mut unchanged = 0;
    // Nothing signals that the kernel's buffers are full: the count standing still over three
    // samples 100 ms apart is the sign (at most 100 samples).
    for _ in 0..100 {
        sleep(Duration::from_millis(100)).await;
        let processed = observer.prekey_count(2).await.unwrap().count;
        assert!(
            processed < PAIRS,
            "the kernel absorbed {PAIRS} x 240 KiB; raise PAIRS"
        );
        unchanged = if processed == last { unchanged + 1 } else { 0 };
        last = processed;
        if unchanged == 3 {
            break;
        }
    }
    assert_eq!(
        unchanged, 3,
        "the relay never blocked writing to the stalled session"
    );

    // Live messages: the first waits in the outbound queue, the others in the store (the
    // subscription paused at half of the 256 KiB queue).
    let mut sent = Vec::new();
    for n in 0..4u8 {
        let payload = Bytes::from(vec![n; LIVE_LEN]);
        let message = OutgoingMessage::new(bob_id, 1, 1, payload.clone());
        sent.push((
            alice.send_message(message).await.unwrap().message_id,
            payload,
        ));
    }
    assert_eq!(
        observer.prekey_count(2).await.unwrap().count,
        last,
        "the stalled session's writes stayed blocked while the messages were pushed"
    );
    SlowConsumerScene {
        relay,
        observer,
        raw,
        sent,
    }
}

/// Deliveries to a session that stopped reading pause at half its outbound queue instead of
/// overflowing it: the messages wait in the store, the session is not closed as a slow
/// consumer, and once it reads again it gets all of them, in order.
#[tokio::test]
async fn a_stalled_subscriber_is_paused_not_dropped_and_gets_everything_when_it_reads_again() {
    let SlowConsumerScene {
        relay,
        observer,
        mut raw,
        sent,
    } = slow_consumer_scene().await;
    assert_eq!(
        sent.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    let mut pushed = Vec::new();
    for _ in 0..1000 {
        if pushed.len() == sent.len() {
            break;
        }
        let frame = raw.recv().await.expect("the session stays open");
        if frame.id == 0 {
            match &frame.body {
                Some(Body::Deliver(deliver)) => {
                    let expected = &sent[pushed.len()];
                    assert_eq!(
                        (deliver.message_id, &deliver.payload),
                        (expected.0, &expected.1)
                    );
                    pushed.push(deliver.message_id);
                }
                other => panic!("unexpected push {other:?}"),
            }
        }
    }
    assert_eq!(pushed, [1, 2, 3, 4], "everything, in order, none twice");
    // Still a working session: it answers a request.
    let count = Body::GetPreKeyCount(GetPreKeyCount { device_id: 2 });
    raw.send(&Frame::new(1000, count)).await;
    // (The answers to the requests pipelined before come first.)
    let mut answered = false;
    for _ in 0..1000 {
        let frame = raw.recv().await.expect("still open");
        if frame.id == 1000 {
            answered = true;
            break;
        }
    }
    assert!(answered, "the session answered a new request");
    // The messages stay stored until acked.
    for (id, payload) in &sent {
        let stored = observer.get_message(1, *id).await.unwrap();
        assert_eq!(&stored.payload, payload);
    }
    relay.assert_serving().await;
    relay.stop().await;
}

#[tokio::test]
async fn after_a_stalled_session_a_new_session_subscribing_gets_the_stored_messages() {
    let SlowConsumerScene {
        relay,
        mut observer,
        raw,
        sent,
    } = slow_consumer_scene().await;
    drop(raw);
    // A new session that reads promptly and acks each message.
    let subscribed = observer.subscribe(1, 0).await.unwrap();
    assert_eq!(subscribed.last_id, 4);
    for (id, payload) in &sent {
        let frame = next_push(&mut observer).await;
        let deliver = match frame.body {
            Some(Body::Deliver(deliver)) => deliver,
            other => panic!("expected Deliver {id}, got {other:?}"),
        };
        assert_eq!((deliver.message_id, &deliver.payload), (*id, payload));
    }
    let ids: Vec<u64> = sent.iter().map(|(id, _)| *id).collect();
    assert_eq!(observer.ack(1, ids).await.unwrap().deleted, 4);
    assert_no_push(&mut observer, "everything delivered").await;
    relay.stop().await;
}

/// A backlog stored while the recipient was offline, whose first `max_unacked` messages together
/// exceed `max_outbound_bytes`, is received in full by a recipient that reads: deliveries are
/// paced to the outbound queue, not cut off as a slow consumer. (With the defaults: 33 messages
/// of 256 KiB against 8 MiB.)
#[tokio::test]
async fn a_fast_reader_subscribing_to_a_backlog_larger_than_the_outbound_queue_gets_all_of_it() {
    let (relay, _app) = start_relay(Config {
        max_outbound_bytes: SLOW_LIMIT,
        ..test_config()
    })
    .await;
    let alice = registered(&relay, 0).await;
    let bob_key = Arc::new(KeyPair::generate());
    let bob = relay.client_as(bob_key.clone()).await;
    bob.register(registration(1, 0)).await.unwrap();
    for n in 1..=4u8 {
        alice
            .send_message(to(&bob, vec![n; LIVE_LEN]))
            .await
            .unwrap();
    }
    drop(bob);
    for attempt in 1..=2 {
        let mut bob = relay.client_as(bob_key.clone()).await;
        assert_eq!(bob.subscribe(1, 0).await.unwrap().last_id, 4);
        for id in 1..=4u64 {
            let frame = next_push(&mut bob).await;
            match frame.body {
                Some(Body::Deliver(deliver)) => assert_eq!(deliver.message_id, id),
                other => panic!("attempt {attempt}: expected Deliver {id}, got {other:?}"),
            }
        }
    }
    relay.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Contacts and tickets
// ---------------------------------------------------------------------------------------------

fn with_ticket(mut message: OutgoingMessage, token: &Bytes) -> OutgoingMessage {
    message.ticket = token.clone();
    message
}

#[tokio::test]
async fn the_whole_ticket_flow() {
    let (relay, _app) = start_relay(test_config()).await;
    let bob = registered(&relay, 0).await;
    let carol = registered(&relay, 0).await;
    let dave = registered(&relay, 0).await;
    let erin = registered(&relay, 0).await;

    // Open by default.
    let sent = erin.send_message(to(&bob, &b"open"[..])).await.unwrap();
    assert_eq!(sent.message_id, 1);

    bob.set_policy(Accept::ContactsOnly).await.unwrap();
    // A non-contact without a ticket.
    assert_eq!(
        code(carol.send_message(to(&bob, &b"hi"[..])).await),
        ErrorCode::Forbidden
    );
    // With a bogus ticket, a ticket of the wrong length, or a ticket of another identity.
    let bogus = Bytes::from(rand::random::<[u8; 16]>().to_vec());
    assert_eq!(
        code(
            carol
                .send_message(with_ticket(to(&bob, &b"hi"[..]), &bogus))
                .await
        ),
        ErrorCode::TicketInvalid
    );
    let short = Bytes::from_static(b"short");
    assert_eq!(
        code(
            carol
                .send_message(with_ticket(to(&bob, &b"hi"[..]), &short))
                .await
        ),
        ErrorCode::TicketInvalid
    );
    let erins = erin.create_ticket(3600, 5).await.unwrap();
    assert_eq!(
        code(
            carol
                .send_message(with_ticket(to(&bob, &b"hi"[..]), &erins.token))
                .await
        ),
        ErrorCode::TicketInvalid
    );

    // Bob's ticket, one use: carol gets in and becomes a contact.
    let ticket = bob.create_ticket(3600, 1).await.unwrap();
    assert_eq!(ticket.uses, 1);
    let sent = carol
        .send_message(with_ticket(to(&bob, &b"with ticket"[..]), &ticket.token))
        .await
        .unwrap();
    assert_eq!(sent.message_id, 2, "refused sends took no id");
    let sent = carol
        .send_message(to(&bob, &b"now a contact"[..]))
        .await
        .unwrap();
    assert_eq!(sent.message_id, 3);

    // The used ticket is rejected for a third identity.
    assert_eq!(
        code(
            dave.send_message(with_ticket(to(&bob, &b"me too"[..]), &ticket.token))
                .await
        ),
        ErrorCode::TicketInvalid
    );
    assert_eq!(
        code(dave.send_message(to(&bob, &b"me too"[..])).await),
        ErrorCode::Forbidden
    );

    // Removing a contact closes the door again; adding one opens it.
    bob.remove_contact(carol.identity()).await.unwrap();
    assert_eq!(
        code(carol.send_message(to(&bob, &b"still?"[..])).await),
        ErrorCode::Forbidden
    );
    bob.add_contact(dave.identity()).await.unwrap();
    let sent = dave.send_message(to(&bob, &b"added"[..])).await.unwrap();
    assert_eq!(sent.message_id, 4);
    // Adding twice and removing a non-contact are harmless.
    bob.add_contact(dave.identity()).await.unwrap();
    bob.remove_contact(erin.identity()).await.unwrap();

    // Only what was accepted is stored, in order.
    let mut bob = bob;
    assert_eq!(bob.subscribe(1, 0).await.unwrap().last_id, 4);
    let mut got = Vec::new();
    for _ in 0..4 {
        let deliver = next_deliver(&mut bob).await;
        got.push((
            deliver.message_id,
            String::from_utf8(deliver.payload.to_vec()).unwrap(),
        ));
    }
    let expected = [
        (1, "open"),
        (2, "with ticket"),
        (3, "now a contact"),
        (4, "added"),
    ];
    assert_eq!(
        got,
        expected.map(|(id, text)| (id, text.to_owned())),
        "only accepted messages"
    );

    // Open again: anyone.
    bob.set_policy(Accept::Open).await.unwrap();
    erin.send_message(to(&bob, &b"open again"[..]))
        .await
        .unwrap();
    carol
        .send_message(to(&bob, &b"open again"[..]))
        .await
        .unwrap();
    relay.stop().await;
}

#[tokio::test(start_paused = true)]
async fn tickets_expire_and_run_out_of_uses_with_paused_time() {
    let app = direct_app(Config::default());
    let mut bob = DirectPeer::connect(&app);
    bob.register(&app).await;
    let done = bob
        .call(
            &app,
            Body::SetPolicy(SetPolicy {
                accept: Accept::ContactsOnly as i32,
            }),
        )
        .await;
    assert!(matches!(done, Body::Done(_)), "{done:?}");
    let mut create = async |ttl_s, uses| match bob
        .call(&app, Body::CreateTicket(CreateTicket { ttl_s, uses }))
        .await
    {
        Body::Ticket(ticket) => ticket,
        other => panic!("expected a Ticket, got {other:?}"),
    };
    let short = create(1, 5).await;
    let long = create(60, 2).await;
    assert_eq!(long.expires_at_ms - short.expires_at_ms, 59_000);

    let mut strangers = Vec::new();
    for _ in 0..5 {
        let mut stranger = DirectPeer::connect(&app);
        stranger.register(&app).await;
        strangers.push(stranger);
    }
    let bob_id = bob.identity();
    let message = |token: &Bytes| with_ticket(OutgoingMessage::new(bob_id, 1, 1, "hi"), token);

    // 999 ms after creation the one-second ticket still works...
    tokio::time::advance(Duration::from_millis(999)).await;
    let answer = strangers[0].send(&app, &message(&short.token)).await;
    assert!(matches!(answer, Body::Sent(_)), "{answer:?}");
    // ... at one second it has expired, although it has uses left.
    tokio::time::advance(Duration::from_millis(1)).await;
    let answer = strangers[1].send(&app, &message(&short.token)).await;
    assert_eq!(direct_code(&answer), ErrorCode::TicketInvalid);

    // Two uses, by two identities; a third is refused.
    for stranger in &mut strangers[1..3] {
        let answer = stranger.send(&app, &message(&long.token)).await;
        assert!(matches!(answer, Body::Sent(_)), "{answer:?}");
    }
    let answer = strangers[3].send(&app, &message(&long.token)).await;
    assert_eq!(direct_code(&answer), ErrorCode::TicketInvalid);

    // Those who got in are contacts: they need no ticket, even after both tickets are gone.
    tokio::time::advance(Duration::from_secs(3600)).await;
    for stranger in &mut strangers[0..3] {
        let plain = OutgoingMessage::new(bob_id, 1, 1, "again");
        let answer = stranger.send(&app, &plain).await;
        assert!(matches!(answer, Body::Sent(_)), "{answer:?}");
    }
    let plain = OutgoingMessage::new(bob_id, 1, 1, "no");
    let answer = strangers[4].send(&app, &plain).await;
    assert_eq!(direct_code(&answer), ErrorCode::Forbidden);
    let answer = strangers[4].send(&app, &message(&long.token)).await;
    assert_eq!(direct_code(&answer), ErrorCode::TicketInvalid);
}

// ---------------------------------------------------------------------------------------------
// Isolation and signatures
// ---------------------------------------------------------------------------------------------

/// No request has a field naming whose mailbox it means: the identity is the session's. A session
/// naming a device id that its own identity has not registered gets NOT_REGISTERED, even when
/// another identity has that device with messages in it.
#[tokio::test]
async fn a_session_cannot_touch_another_identitys_mailbox() {
    let (relay, _app) = start_relay(test_config()).await;
    let alice = registered(&relay, 0).await;
    let bob = registered(&relay, 4).await;
    bob.register(registration(7, 4)).await.unwrap();
    let mut mallory = registered(&relay, 0).await;
    for (device, text) in [(7, "seven-a"), (7, "seven-b"), (1, "one")] {
        let message = OutgoingMessage::new(*bob.identity(), device, 1, text);
        alice.send_message(message).await.unwrap();
    }

    // Device 7: only bob has it.
    assert_eq!(
        code(mallory.subscribe(7, 0).await),
        ErrorCode::NotRegistered
    );
    assert_eq!(
        code(mallory.get_message(7, 1).await),
        ErrorCode::NotRegistered
    );
    assert_eq!(
        code(mallory.ack(7, vec![1, 2]).await),
        ErrorCode::NotRegistered
    );
    assert_eq!(
        code(mallory.prekey_count(7).await),
        ErrorCode::NotRegistered
    );
    let upload = UploadPreKeys {
        device_id: 7,
        signed_prekey: None,
        one_time_prekeys: prekeys(100..=100),
    };
    assert_eq!(
        code(mallory.upload_prekeys(upload).await),
        ErrorCode::NotRegistered
    );
    assert_eq!(code(mallory.unregister(7).await), ErrorCode::NotRegistered);
    // Device 1: both have one, and mallory's is mallory's own, empty mailbox.
    assert_eq!(code(mallory.get_message(1, 1).await), ErrorCode::NotFound);
    assert_eq!(mallory.ack(1, vec![1]).await.unwrap().deleted, 0);
    assert_eq!(mallory.subscribe(1, 0).await.unwrap().last_id, 0);
    assert_no_push(&mut mallory, "someone else's messages").await;

    // Bob's mailboxes and keys are untouched.
    let mut bob = bob;
    assert_eq!(bob.prekey_count(7).await.unwrap().count, 4);
    assert_eq!(&bob.get_message(1, 1).await.unwrap().payload[..], b"one");
    assert_eq!(bob.subscribe(7, 0).await.unwrap().last_id, 2);
    for text in ["seven-a", "seven-b"] {
        assert_eq!(&next_deliver(&mut bob).await.payload[..], text.as_bytes());
    }
    relay.stop().await;
}

#[tokio::test]
async fn the_relay_verifies_sender_signatures_when_configured() {
    let (relay, _app) = start_relay(Config {
        verify_message_signatures: true,
        ..test_config()
    })
    .await;
    let alice = registered(&relay, 0).await;
    let bob = registered(&relay, 0).await;
    // Signed by another key.
    let forged = to(&bob, &b"forged"[..]).sign(&KeyPair::generate());
    assert_eq!(code(alice.send_raw(forged).await), ErrorCode::BadRequest);
    // Alice's own signature, but over another recipient device than the one addressed.
    let alice_key = Arc::new(KeyPair::generate());
    let alice2 = relay.client_as(alice_key.clone()).await;
    alice2.register(registration(1, 0)).await.unwrap();
    let mut misdirected = to(&bob, &b"x"[..]).sign(&alice_key);
    misdirected.recipient_device = 2;
    bob.register(registration(2, 0)).await.unwrap();
    assert_eq!(
        code(alice2.send_raw(misdirected).await),
        ErrorCode::BadRequest
    );
    // Correct signatures pass.
    let sent = alice.send_message(to(&bob, &b"real"[..])).await.unwrap();
    assert_eq!(sent.message_id, 1, "refused sends took no id");
    let good = to(&bob, &b"raw"[..]).sign(&alice_key);
    assert_eq!(alice2.send_raw(good).await.unwrap().message_id, 2);
    relay.stop().await;
}

/// With the default `verify_message_signatures = false` the relay does not check
/// `sender_signature` (only its length): the session already authenticates the sender, whose
/// identity the relay takes from the session and puts in `Deliver.sender`, and recipients verify
/// end to end. A wrongly signed message is stored and delivered, and `verify_delivery` at the
/// recipient is what rejects it.
#[tokio::test]
async fn by_default_a_wrong_signature_is_accepted_and_caught_end_to_end() {
    assert!(!Config::default().verify_message_signatures);
    let (relay, _app) = start_relay(test_config()).await;
    let alice = registered(&relay, 0).await;
    let mut bob = registered(&relay, 0).await;
    let forged = to(&bob, &b"forged"[..]).sign(&KeyPair::generate());
    let sent = alice.send_raw(forged).await.unwrap();
    assert_eq!((sent.message_id, sent.duplicate), (1, false));
    bob.subscribe(1, 0).await.unwrap();
    let deliver = next_deliver(&mut bob).await;
    assert_eq!(
        &deliver.sender[..],
        alice.identity().as_bytes(),
        "sender from the session"
    );
    assert!(verify_delivery(&deliver, bob.identity()).is_err());
    relay.stop().await;
}

/// Seeded garbage: random plaintexts sealed into a live session (so they pass the tag and reach
/// decoding and dispatch), and random bytes on fresh connections. Every frame gets a defined
/// answer, nothing panics, and the relay keeps serving.
#[tokio::test]
async fn random_input_gets_defined_answers_and_the_relay_keeps_serving() {
    use prost::Message;
    use rand::{Rng, SeedableRng};
    use tokio::io::AsyncWriteExt;
    let (relay, _app) = start_relay(test_config()).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xB07D);
    let mut peer = RawPeer::connect(&relay).await;
    let mut answered = 0;
    for round in 0..400 {
        let len = rng.gen_range(0..160);
        let plaintext: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        // Frames that are answered by nothing (errors, pongs) or that would trip the ping rule
        // are not part of this test.
        if let Ok(frame) = Frame::decode(&plaintext[..]) {
            if matches!(
                frame.body,
                Some(Body::Ping(_)) | Some(Body::Pong(_)) | Some(Body::Error(_))
            ) {
                continue;
            }
        }
        let wire = peer.session.seal_plaintext(&plaintext);
        peer.stream.write_all(&wire).await.unwrap();
        let reply = peer
            .recv()
            .await
            .unwrap_or_else(|| panic!("round {round}: the relay closed on {plaintext:02x?}"));
        assert!(reply.body.is_some(), "round {round}: empty reply");
        answered += 1;
    }
    assert!(answered > 300, "only {answered} frames were sent");

    for _ in 0..30 {
        let mut stream = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
        let len = rng.gen_range(1..600);
        let noise: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        let _ = stream.write_all(&noise).await;
        let _ = stream.shutdown().await;
        read_until_closed(&mut stream, HANG).await;
    }
    relay.assert_serving().await;
    relay.stop().await;
}
