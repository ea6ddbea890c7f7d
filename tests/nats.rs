//! The relay on the JetStream store, against real `nats-server`s on loopback (skipped, and
//! passing, where `nats-server` is not installed; CI installs it):
//!
//! * the request matrix: every request and every error code the store decides, on one server;
//! * two relays on one 3-node cluster (R3): cross-relay delivery and window release, one-time
//!   prekeys popped exactly once by 50 fetchers spread over both relays, a ticket used once,
//!   an idempotent resend through the other relay, unregistration seen by the other relay;
//! * SIGKILL of one NATS node under load: every answered message is delivered as sent;
//! * SIGKILL of one relay process: its client reconnects to the other and gets its backlog;
//! * the NATS server gone and back: `INTERNAL` meanwhile, sessions stay up, then served again
//!   and live delivery resumes;
//! * messages that expired in one device's mailbox do not hold the identity's byte quota;
//! * a `max_stored_bytes` the server cannot reserve is refused at start with the fix.
//!
//! Every wait is bounded; assertions count, they do not time.

#![cfg(feature = "jetstream")]

mod common;
mod jetstream;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use botd_client::{verify_delivery, Client, ClientOptions, OutgoingMessage};
use botd_protocol::keys::KeyPair;
use botd_protocol::proto::{Accept, Body, ErrorCode, PreKey, UploadPreKeys};
use botd_relay::config::Config;
use botd_relay::store::nats::NatsStore;
use bytes::Bytes;
use common::{
    assert_no_push, code, next_deliver_past_prekeys_low as next_deliver, registration, to, Clients,
    QUIET,
};
use jetstream::{binary, client_as, prefix, relay_config, relay_on, Nats, RelayProcess};
use tokio::time::timeout;

const ARRIVES_WITHIN: Duration = common::HANG;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_and_store_error_on_jetstream() {
    let Some(bin) = binary("every_request_and_store_error_on_jetstream") else {
        return;
    };
    let nats = Nats::single(&bin).await;
    let config = Config {
        mailbox_max_messages: 3,
        mailbox_max_bytes: 100,
        max_devices_per_identity: 2,
        max_contacts: 1,
        max_tickets_per_identity: 2,
        max_prekeys_per_device: 8,
        ..relay_config(nats.store_setting(), &prefix("matrix"), 1)
    };
    let (relay, app) = relay_on(config).await;
    let alice = relay.client().await;
    let mut bob = relay.client().await;
    let bob_key = *bob.identity();

    // Before registration.
    assert_eq!(code(alice.prekey_count(1).await), ErrorCode::NotRegistered);
    assert_eq!(
        code(alice.set_policy(Accept::ContactsOnly).await),
        ErrorCode::NotRegistered
    );
    assert_eq!(
        code(alice.send_message(to(&bob, &b"x"[..])).await),
        ErrorCode::NotRegistered
    );
    alice.register(registration(1, 0)).await.unwrap();
    assert_eq!(
        code(alice.send_message(to(&bob, &b"x"[..])).await),
        ErrorCode::UnknownRecipient
    );
    assert_eq!(
        code(alice.fetch_prekeys(&bob_key, vec![]).await),
        ErrorCode::UnknownRecipient
    );

    // Register, re-register, device limits.
    let registered = bob.register(registration(1, 5)).await.unwrap();
    assert_eq!(registered.one_time_prekeys, 5);
    assert_eq!(
        bob.register(registration(1, 3))
            .await
            .unwrap()
            .one_time_prekeys,
        3
    );
    bob.register(registration(2, 2)).await.unwrap();
    assert_eq!(
        code(bob.register(registration(3, 0)).await),
        ErrorCode::BadRequest
    );

    // Prekeys: upload, count, limits, duplicates.
    let count = bob
        .upload_prekeys(UploadPreKeys {
            device_id: 1,
            signed_prekey: None,
            one_time_prekeys: (10..=14)
                .map(|id| PreKey {
                    id,
                    public_key: Bytes::from(vec![0x21; 33]),
                })
                .collect(),
        })
        .await
        .unwrap();
    assert_eq!(count.count, 8);
    let again = bob
        .upload_prekeys(UploadPreKeys {
            device_id: 1,
            signed_prekey: None,
            one_time_prekeys: vec![PreKey {
                id: 99,
                public_key: Bytes::from(vec![0x21; 33]),
            }],
        })
        .await;
    assert_eq!(
        code(again),
        ErrorCode::BadRequest,
        "over max_prekeys_per_device"
    );
    assert_eq!(code(bob.prekey_count(7).await), ErrorCode::NotRegistered);

    // Fetch: oldest first, device 2 runs out and its owner hears PreKeysLow once.
    let bundles = alice.fetch_prekeys(&bob_key, vec![]).await.unwrap();
    let firsts: Vec<_> = bundles
        .iter()
        .map(|b| (b.device_id, b.one_time_prekey.as_ref().map(|k| k.id)))
        .collect();
    assert_eq!(firsts, vec![(1, Some(1)), (2, Some(1))]);
    let bundles = alice.fetch_prekeys(&bob_key, vec![2]).await.unwrap();
    assert_eq!(bundles[0].one_time_prekey.as_ref().map(|k| k.id), Some(2));
    let bundles = alice.fetch_prekeys(&bob_key, vec![2]).await.unwrap();
    assert!(bundles[0].one_time_prekey.is_none(), "exhausted");
    assert_eq!(
        code(alice.fetch_prekeys(&bob_key, vec![5]).await),
        ErrorCode::UnknownRecipient
    );
    let mut lows = Vec::new();
    while let Ok(Some(frame)) = timeout(QUIET, bob.next_push()).await {
        if let Some(Body::PreKeysLow(low)) = frame.body {
            lows.push((low.device_id, low.count));
        }
    }
    assert_eq!(lows, vec![(1, 7), (2, 1)], "once per crossing per device");

    // Send, duplicate, backlog then live delivery, get, ack.
    let first = to(&bob, &b"one"[..]);
    let sent = alice.send_message(first.clone()).await.unwrap();
    assert!(!sent.duplicate);
    let retry = alice.send_message(first.clone()).await.unwrap();
    assert_eq!((retry.message_id, retry.duplicate), (sent.message_id, true));
    let second = alice.send_message(to(&bob, &b"two"[..])).await.unwrap();
    assert!(second.message_id > sent.message_id, "ids increase");
    let subscribed = bob.subscribe(1, 0).await.unwrap();
    assert_eq!(subscribed.last_id, second.message_id);
    let d1 = next_deliver(&mut bob).await;
    let d2 = next_deliver(&mut bob).await;
    assert_eq!(
        (
            d1.message_id,
            &d1.payload[..],
            d2.message_id,
            &d2.payload[..]
        ),
        (sent.message_id, &b"one"[..], second.message_id, &b"two"[..])
    );
    verify_delivery(&d1, &bob_key).unwrap();
    let live = alice.send_message(to(&bob, &b"three"[..])).await.unwrap();
    let d3 = next_deliver(&mut bob).await;
    assert_eq!(
        (d3.message_id, &d3.payload[..]),
        (live.message_id, &b"three"[..])
    );
    assert_eq!(bob.get_message(1, d2.message_id).await.unwrap(), d2);
    assert_eq!(code(bob.get_message(1, 1 << 40).await), ErrorCode::NotFound);
    assert_eq!(
        code(bob.get_message(2, d2.message_id).await),
        ErrorCode::NotFound,
        "another mailbox's id"
    );
    // Quotas: 3 messages stored -> full by count.
    assert_eq!(
        code(alice.send_message(to(&bob, &b"four"[..])).await),
        ErrorCode::MailboxFull
    );
    // ... and a retry of a stored message still gets its id.
    assert!(alice.send_message(first.clone()).await.unwrap().duplicate);
    assert_eq!(
        bob.ack(1, vec![d1.message_id, d1.message_id, 12345])
            .await
            .unwrap()
            .deleted,
        1
    );
    assert_eq!(
        code(bob.get_message(1, d1.message_id).await),
        ErrorCode::NotFound
    );
    assert_eq!(code(bob.ack(9, vec![1]).await), ErrorCode::NotRegistered);
    // After its ack the same nonce stores a new message.
    let renewed = alice.send_message(first.clone()).await.unwrap();
    assert!(!renewed.duplicate && renewed.message_id > live.message_id);
    let d4 = next_deliver(&mut bob).await;
    assert_eq!(d4.message_id, renewed.message_id);
    let acked = bob
        .ack(1, vec![d2.message_id, d3.message_id, d4.message_id])
        .await
        .unwrap();
    assert_eq!(acked.deleted, 3);
    let resubscribed = bob.subscribe(1, 0).await.unwrap();
    assert_eq!(
        resubscribed.last_id, d4.message_id,
        "last_id counts acknowledged messages"
    );
    // Bytes: 100 per mailbox.
    alice.send_message(to(&bob, vec![0u8; 60])).await.unwrap();
    assert_eq!(
        code(alice.send_message(to(&bob, vec![0u8; 41])).await),
        ErrorCode::MailboxFull
    );
    let d5 = next_deliver(&mut bob).await;
    bob.ack(1, vec![d5.message_id]).await.unwrap();

    // Policy, contacts, tickets.
    bob.set_policy(Accept::ContactsOnly).await.unwrap();
    assert_eq!(
        code(alice.send_message(to(&bob, &b"hi"[..])).await),
        ErrorCode::Forbidden
    );
    let mut bad_ticket = to(&bob, &b"hi"[..]);
    bad_ticket.ticket = Bytes::from(vec![7u8; 16]);
    assert_eq!(
        code(alice.send_message(bad_ticket).await),
        ErrorCode::TicketInvalid
    );
    bob.send_message(to(&bob, &b"note to self"[..]))
        .await
        .unwrap();
    let ticket = bob.create_ticket(600, 1).await.unwrap();
    let mut with_ticket = to(&bob, &b"first contact"[..]);
    with_ticket.ticket = ticket.token.clone();
    let admitted = alice.send_message(with_ticket.clone()).await.unwrap();
    assert!(alice.send_message(with_ticket).await.unwrap().duplicate);
    // Alice is a contact now: no ticket needed; the ticket is used up.
    alice.send_message(to(&bob, &b"again"[..])).await.unwrap();
    let mut pushed = Vec::new();
    for _ in 0..3 {
        pushed.push(next_deliver(&mut bob).await.message_id);
    }
    assert!(pushed.contains(&admitted.message_id));
    assert_eq!(bob.ack(1, pushed).await.unwrap().deleted, 3);
    let carol = relay.client().await;
    carol.register(registration(1, 0)).await.unwrap();
    let mut used = to(&bob, &b"me too"[..]);
    used.ticket = ticket.token.clone();
    assert_eq!(
        code(carol.send_message(used).await),
        ErrorCode::TicketInvalid
    );
    // max_contacts = 1: a second ticket admits nobody while the list is full.
    let second_ticket = bob.create_ticket(600, 1).await.unwrap();
    let mut full = to(&bob, &b"me too"[..]);
    full.ticket = second_ticket.token.clone();
    assert_eq!(code(carol.send_message(full).await), ErrorCode::MailboxFull);
    assert_eq!(
        code(bob.add_contact(carol.identity()).await),
        ErrorCode::BadRequest
    );
    bob.remove_contact(alice.identity()).await.unwrap();
    bob.remove_contact(alice.identity()).await.unwrap();
    bob.add_contact(carol.identity()).await.unwrap();
    bob.add_contact(carol.identity()).await.unwrap();
    // max_tickets_per_identity = 2 unexpired: the used-up one does not count.
    bob.create_ticket(600, 1).await.unwrap();
    assert_eq!(code(bob.create_ticket(600, 1).await), ErrorCode::BadRequest);
    bob.set_policy(Accept::Open).await.unwrap();
    while timeout(QUIET, bob.next_push()).await.is_ok() {}
    assert!(admitted.message_id > 0);

    // Unregister: the mailbox goes, the other relay-side subscriber ends, ids stay unique.
    let before = alice.send_message(to(&bob, &b"last"[..])).await.unwrap();
    assert_eq!(next_deliver(&mut bob).await.message_id, before.message_id);
    bob.unregister(1).await.unwrap();
    assert_eq!(
        code(alice.send_message(to(&bob, &b"gone"[..])).await),
        ErrorCode::UnknownRecipient
    );
    assert_eq!(code(bob.unregister(1).await), ErrorCode::NotRegistered);
    bob.register(registration(1, 0)).await.unwrap();
    assert_eq!(
        bob.subscribe(1, 0).await.unwrap().last_id,
        before.message_id,
        "the mailbox is empty, its highest id still counts"
    );
    assert_no_push(&mut bob, "old messages are gone").await;
    let after = alice.send_message(to(&bob, &b"new"[..])).await.unwrap();
    assert!(after.message_id > before.message_id, "ids are never reused");
    assert_eq!(next_deliver(&mut bob).await.message_id, after.message_id);

    // A sweep runs and counts what is stored.
    let removed = app.sweep().await.unwrap();
    assert_eq!(removed, 0);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_one_cluster_share_one_state() {
    let Some(bin) = binary("two_relays_on_one_cluster_share_one_state") else {
        return;
    };
    let nats = Nats::cluster(&bin).await;
    let prefix = prefix("two");
    let config_a = Config {
        one_time_prekey_rate_per_device: botd_relay::ratelimit::Rate::new(1000.0, 1000),
        ..relay_config(nats.store_setting_of(0), &prefix, 3)
    };
    // B names all three servers (A only the first): both forms of `store` work.
    let config_b = Config {
        store: nats.store_setting(),
        ..config_a.clone()
    };
    let (relay_a, _a) = relay_on(config_a).await;
    let (relay_b, _b) = relay_on(config_b).await;
    let alice_key = Arc::new(KeyPair::generate());
    let bob_key = Arc::new(KeyPair::generate());
    let alice_a = client_as(&relay_a, &alice_key).await;
    let mut bob_b = client_as(&relay_b, &bob_key).await;
    alice_a.register(registration(1, 0)).await.unwrap();
    bob_b.register(registration(1, 40)).await.unwrap();
    bob_b.subscribe(1, 0).await.unwrap();

    // Sent through A, pushed live by B.
    let message = to(&bob_b, &b"across"[..]);
    let sent = alice_a.send_message(message.clone()).await.unwrap();
    let delivered = next_deliver(&mut bob_b).await;
    assert_eq!(
        (delivered.message_id, &delivered.payload[..]),
        (sent.message_id, &b"across"[..])
    );
    // The same nonce through B: a duplicate with the first id.
    let alice_b = client_as(&relay_b, &alice_key).await;
    let retry = alice_b.send_message(message).await.unwrap();
    assert_eq!((retry.message_id, retry.duplicate), (sent.message_id, true));

    // An ack through A frees B's window (max_unacked 256: fill it, then ack one).
    let bob_a = client_as(&relay_a, &bob_key).await;
    assert_eq!(
        bob_a.ack(1, vec![sent.message_id]).await.unwrap().deleted,
        1
    );
    assert_eq!(
        code(bob_b.get_message(1, sent.message_id).await),
        ErrorCode::NotFound
    );

    // 50 fetchers over both relays: 40 keys, each handed out once.
    let mut tasks = Vec::new();
    for i in 0..50 {
        let relay = if i % 2 == 0 { &relay_a } else { &relay_b };
        let fetcher = client_as(relay, &Arc::new(KeyPair::generate())).await;
        let target = *bob_b.identity();
        tasks.push(tokio::spawn(async move {
            let bundles = fetcher.fetch_prekeys(&target, vec![1]).await.unwrap();
            bundles[0].one_time_prekey.as_ref().map(|k| k.id)
        }));
    }
    let mut handed = Vec::new();
    for task in tasks {
        if let Some(id) = timeout(ARRIVES_WITHIN * 3, task).await.unwrap().unwrap() {
            handed.push(id);
        }
    }
    let distinct: HashSet<_> = handed.iter().collect();
    assert_eq!(handed.len(), 40, "every key handed out");
    assert_eq!(distinct.len(), 40, "no key twice");
    assert_eq!(bob_b.prekey_count(1).await.unwrap().count, 0);

    // A ticket of one use, tried by two strangers through both relays at once: one gets in.
    bob_b.set_policy(Accept::ContactsOnly).await.unwrap();
    let ticket = bob_a.create_ticket(600, 1).await.unwrap();
    let mut outcomes = Vec::new();
    let mut strangers = Vec::new();
    for relay in [&relay_a, &relay_b] {
        let stranger = client_as(relay, &Arc::new(KeyPair::generate())).await;
        stranger.register(registration(1, 0)).await.unwrap();
        let mut message = to(&bob_b, &b"knock"[..]);
        message.ticket = ticket.token.clone();
        strangers.push((stranger, message));
    }
    let (first, second) = tokio::join!(
        strangers[0].0.send_message(strangers[0].1.clone()),
        strangers[1].0.send_message(strangers[1].1.clone())
    );
    for outcome in [first, second] {
        outcomes.push(match outcome {
            Ok(_) => None,
            Err(err) => err.code(),
        });
    }
    outcomes.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(outcomes, vec![None, Some(ErrorCode::TicketInvalid)]);

    // Unregistration through A ends the subscription on B.
    bob_b.set_policy(Accept::Open).await.unwrap();
    while timeout(QUIET, bob_b.next_push()).await.is_ok() {}
    bob_a.unregister(1).await.unwrap();
    assert_eq!(
        code(alice_b.send_message(to(&bob_b, &b"late"[..])).await),
        ErrorCode::UnknownRecipient
    );
    relay_a.stop().await;
    relay_b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_nats_node_under_load_loses_no_answered_message() {
    let Some(bin) = binary("sigkill_of_a_nats_node_under_load_loses_no_answered_message") else {
        return;
    };
    let mut nats = Nats::cluster(&bin).await;
    let prefix = prefix("nodekill");
    let config = Config {
        send_rate_per_identity: botd_relay::ratelimit::Rate::new(10_000.0, 10_000),
        send_rate_per_pair: botd_relay::ratelimit::Rate::new(10_000.0, 10_000),
        ..relay_config(nats.store_setting(), &prefix, 3)
    };
    // Relay A starts on node 0, relay B on node 1: killing node 0 moves A's connection.
    let (relay_a, _a) = relay_on(Config {
        store: nats.store_setting_of(0),
        ..config.clone()
    })
    .await;
    let (relay_b, _b) = relay_on(Config {
        store: nats.store_setting_of(1),
        ..config
    })
    .await;
    const SENDERS: usize = 4;
    const PER_SENDER: usize = 150;
    let bob_key = Arc::new(KeyPair::generate());
    let bob = client_as(&relay_b, &bob_key).await;
    bob.register(registration(1, 0)).await.unwrap();
    let bob_identity = *bob.identity();
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        let relay = if i % 2 == 0 { &relay_a } else { &relay_b };
        let sender = client_as(relay, &Arc::new(KeyPair::generate())).await;
        sender.register(registration(1, 0)).await.unwrap();
        senders.push(sender);
    }
    let killed = Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::new();
    for (i, sender) in senders.into_iter().enumerate() {
        let killed = killed.clone();
        tasks.push(tokio::spawn(async move {
            let mut answered = BTreeMap::new();
            let mut failed = 0usize;
            for n in 0..PER_SENDER {
                if i == 0 && n == PER_SENDER / 3 {
                    killed.notify_one();
                }
                let payload = format!("sender {i} message {n}").into_bytes();
                let message = OutgoingMessage::new(bob_identity, 1, 1, payload.clone());
                // A retry with the same nonce after INTERNAL (bounded), as clients should.
                let mut outcome = None;
                for _ in 0..10 {
                    match timeout(ARRIVES_WITHIN, sender.send_message(message.clone())).await {
                        Ok(Ok(sent)) => {
                            outcome = Some(sent.message_id);
                            break;
                        }
                        Ok(Err(err)) if err.code() == Some(ErrorCode::Internal) => {
                            tokio::time::sleep(Duration::from_millis(200)).await
                        }
                        Ok(Err(err)) => panic!("send refused: {err}"),
                        Err(_) => panic!("send not answered in time"),
                    }
                }
                match outcome {
                    Some(id) => {
                        answered.insert(id, payload);
                    }
                    None => failed += 1,
                }
            }
            (answered, failed)
        }));
    }
    killed.notified().await;
    nats.nodes[0].kill();
    let mut answered = BTreeMap::new();
    let mut failed = 0;
    for task in tasks {
        let (mine, lost) = timeout(Duration::from_secs(240), task)
            .await
            .expect("senders finish")
            .unwrap();
        failed += lost;
        for (id, payload) in mine {
            assert!(answered.insert(id, payload).is_none(), "an id given twice");
        }
    }
    assert!(
        answered.len() + failed == SENDERS * PER_SENDER
            && answered.len() >= SENDERS * PER_SENDER / 2,
        "{} answered, {failed} failed",
        answered.len()
    );
    // Everything answered is stored and delivered exactly as sent, through the relay whose
    // node died; acked as it arrives (the window is 256).
    let mut bob_a = client_as(&relay_a, &bob_key).await;
    bob_a.subscribe(1, 0).await.unwrap();
    let mut seen = BTreeMap::new();
    let mut unacked = Vec::new();
    let mut deleted = 0usize;
    while seen.len() < answered.len() {
        let deliver = next_deliver(&mut bob_a).await;
        verify_delivery(&deliver, &bob_identity).unwrap();
        assert!(seen
            .insert(deliver.message_id, deliver.payload.to_vec())
            .is_none());
        unacked.push(deliver.message_id);
        if unacked.len() >= 64 || seen.len() == answered.len() {
            deleted += bob_a
                .ack(1, std::mem::take(&mut unacked))
                .await
                .unwrap()
                .deleted as usize;
        }
    }
    assert_eq!(seen, answered, "delivered as answered");
    assert_eq!(
        deleted,
        answered.len(),
        "every answered message was stored once"
    );
    if failed == 0 {
        assert_no_push(&mut bob_a, "nothing unanswered was stored").await;
    }
    let ids: Vec<u64> = answered.keys().copied().collect();
    let probe = bob_a.send_message(to(&bob, &b"after"[..])).await.unwrap();
    assert!(probe.message_id > *ids.last().unwrap());
    relay_a.stop().await;
    relay_b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_relay_its_clients_get_their_backlog_from_the_other() {
    let Some(bin) = binary("sigkill_of_a_relay_its_clients_get_their_backlog_from_the_other")
    else {
        return;
    };
    let nats = Nats::single(&bin).await;
    let prefix = prefix("relaykill");
    let store = nats.store_setting();
    let mut relay_a = RelayProcess::start(&store, &prefix, 1);
    let relay_b = RelayProcess::start(&store, &prefix, 1);
    let bob_key = Arc::new(KeyPair::generate());
    let alice_key = Arc::new(KeyPair::generate());
    let connect = |addr, relay_key, key: &Arc<KeyPair>| {
        Client::connect(addr, key.clone(), relay_key, ClientOptions::default())
    };
    let mut bob = connect(relay_a.addr, relay_a.key, &bob_key).await.unwrap();
    bob.register(registration(1, 0)).await.unwrap();
    bob.subscribe(1, 0).await.unwrap();
    let alice = connect(relay_b.addr, relay_b.key, &alice_key)
        .await
        .unwrap();
    alice.register(registration(1, 0)).await.unwrap();
    let bob_identity = *bob.identity();
    let first = alice
        .send_message(OutgoingMessage::new(bob_identity, 1, 1, &b"before"[..]))
        .await
        .unwrap();
    assert_eq!(next_deliver(&mut bob).await.message_id, first.message_id);

    relay_a.kill();
    // Bob's connection ends.
    let closed = timeout(ARRIVES_WITHIN, async {
        while bob.next_push().await.is_some() {}
    })
    .await;
    assert!(closed.is_ok(), "the killed relay's session ends");
    let mut sent = vec![first.message_id];
    for n in 0..20 {
        let payload = format!("while away {n}");
        let answer = alice
            .send_message(OutgoingMessage::new(
                bob_identity,
                1,
                1,
                payload.into_bytes(),
            ))
            .await
            .unwrap();
        sent.push(answer.message_id);
    }
    // Bob reconnects to B and gets everything not acknowledged, in order.
    let mut bob = connect(relay_b.addr, relay_b.key, &bob_key).await.unwrap();
    bob.subscribe(1, 0).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..sent.len() {
        let deliver = next_deliver(&mut bob).await;
        verify_delivery(&deliver, &bob_identity).unwrap();
        got.push(deliver.message_id);
    }
    assert_eq!(got, sent);
    assert_eq!(bob.ack(1, got).await.unwrap().deleted as usize, sent.len());
    assert_no_push(&mut bob, "nothing more").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_nats_server_answers_internal_and_the_relay_serves_again_after() {
    let Some(bin) =
        binary("losing_the_nats_server_answers_internal_and_the_relay_serves_again_after")
    else {
        return;
    };
    let mut nats = Nats::single(&bin).await;
    let (relay, _app) = relay_on(relay_config(nats.store_setting(), &prefix("outage"), 1)).await;
    let alice = relay.client().await;
    let mut bob = relay.client().await;
    alice.register(registration(1, 0)).await.unwrap();
    bob.register(registration(1, 0)).await.unwrap();
    bob.subscribe(1, 0).await.unwrap();
    let first = alice.send_message(to(&bob, &b"before"[..])).await.unwrap();
    assert_eq!(next_deliver(&mut bob).await.message_id, first.message_id);

    nats.nodes[0].kill();
    let outage = to(&bob, &b"during"[..]);
    let answer = timeout(ARRIVES_WITHIN, alice.send_message(outage.clone()))
        .await
        .expect("answered within the request timeout");
    assert_eq!(code(answer), ErrorCode::Internal);
    // The sessions stay up meanwhile.
    alice.ping().await.expect("session alive");
    bob.ping().await.expect("session alive");

    nats.nodes[0].restart();
    // The client reconnects by itself; the retry (same nonce) goes through, bounded in tries.
    let mut stored = None;
    for _ in 0..50 {
        match alice.send_message(outage.clone()).await {
            Ok(sent) => {
                stored = Some(sent);
                break;
            }
            Err(err) if err.code() == Some(ErrorCode::Internal) => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(err) => panic!("unexpected answer {err}"),
        }
    }
    let stored = stored.expect("the relay serves again after the server is back");
    assert!(stored.message_id > first.message_id);
    // Live delivery resumes too (the feed was recreated from where it stopped).
    let delivered = next_deliver(&mut bob).await;
    assert_eq!(
        (delivered.message_id, &delivered.payload[..]),
        (stored.message_id, &b"during"[..])
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_of_another_device_do_not_hold_the_identity_quota() {
    let Some(bin) = binary("expired_messages_of_another_device_do_not_hold_the_identity_quota")
    else {
        return;
    };
    let nats = Nats::single(&bin).await;
    let prefix = prefix("expired");
    let (relay, _app) = relay_on(Config {
        max_identity_stored_bytes: 1000,
        mailbox_max_bytes: 1000,
        message_ttl: Duration::from_secs(2),
        ..relay_config(nats.store_setting(), &prefix, 1)
    })
    .await;
    let alice = relay.client().await;
    alice.register(registration(1, 0)).await.unwrap();
    let bob = relay.client().await;
    bob.register(registration(1, 0)).await.unwrap();
    bob.register(registration(2, 0)).await.unwrap();
    let bob_key = *bob.identity();
    alice
        .send_message(OutgoingMessage::new(bob_key, 2, 1, vec![2u8; 900]))
        .await
        .unwrap();
    // The identity's quota counts device 2's mailbox.
    assert_eq!(
        code(
            alice
                .send_message(OutgoingMessage::new(bob_key, 1, 1, vec![1u8; 500]))
                .await
        ),
        ErrorCode::QuotaExceeded
    );
    // Device 2's message expires unread (nobody delivers from that mailbox, so its count is
    // not set right by a relay watching it).
    let client = async_nats::connect(nats.nodes[0].url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let streams = relay_config(String::new(), &prefix, 1).nats_streams;
    let mut stored = u64::MAX;
    for _ in 0..100 {
        stored = 0;
        for k in 0..streams {
            let mut stream = js
                .get_stream(format!("{}_M{k}", prefix.to_ascii_uppercase()))
                .await
                .unwrap();
            stored += stream.info().await.unwrap().state.messages;
        }
        if stored == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(stored, 0, "expired within 20 s");
    alice
        .send_message(OutgoingMessage::new(bob_key, 1, 1, vec![1u8; 500]))
        .await
        .expect("the expired bytes no longer count");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_the_server_cannot_reserve_is_refused_with_the_fix() {
    let Some(bin) = binary("storage_the_server_cannot_reserve_is_refused_with_the_fix") else {
        return;
    };
    let nats = Nats::single(&bin).await;
    let prefix = prefix("storage");
    // A pebibyte per message stream: more than any disk under the test.
    let config = Config {
        max_stored_bytes: 3 << 50,
        ..relay_config(nats.store_setting(), &prefix, 1)
    };
    let err = match timeout(ARRIVES_WITHIN, NatsStore::connect(&config))
        .await
        .expect("answers in time")
    {
        Ok(_) => panic!("streams the server cannot hold are refused"),
        Err(err) => err.to_string(),
    };
    assert!(
        err.contains(&format!("cannot reserve {} bytes", 1u64 << 50)),
        "{err}"
    );
    assert!(err.contains("lower max_stored_bytes"), "{err}");
}
