//! Bounded storage, accounts and request rates over loopback, each limit driven past its end
//! and checked on the wire and in the metrics: relay-wide caps answering `QUOTA_EXCEEDED`,
//! account limits answering `BAD_REQUEST` (counted by kind, tickets included), an account
//! removed with its last device and after `account_ttl` (paused time) without its message ids
//! ever coming back, `RATE_LIMITED` with `retry_after_ms` for every state-changing request per
//! identity and per source address, one-time prekeys rationed per target device, and
//! `PreKeysLow` once per crossing of the threshold.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use botd_client::{Client, OutgoingMessage};
use botd_protocol::keys::{KeyPair, PublicKeyBytes};
use botd_protocol::proto::{
    Accept, AddContact, Body, CreateTicket, ErrorCode, Frame, PreKey, RemoveContact, SetPolicy,
    Subscribe, Unregister, UploadPreKeys,
};
use botd_relay::app::Push;
use botd_relay::config::Config;
use botd_relay::ratelimit::Rate;
use bytes::Bytes;
use common::*;

/// A limit so slow that a test never sees a token come back.
fn scarce(burst: u32) -> Rate {
    Rate::new(0.01, burst)
}

/// A push already received by `client`, without waiting.
fn try_push(client: &mut Client) -> Option<Frame> {
    let mut next = Box::pin(client.next_push());
    match next.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(frame) => frame,
        Poll::Pending => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Relay-wide caps and account limits
// ---------------------------------------------------------------------------------------------

#[test]
fn a_new_identity_past_max_identities_gets_quota_exceeded() {
    with_metrics(false, |metrics| async move {
        let (relay, _app) = start_relay(Config {
            max_identities: 3,
            ..test_config()
        })
        .await;
        let alice = registered(&relay, 0).await;
        let _bob = registered(&relay, 0).await;
        let carol = registered(&relay, 0).await;
        let dave = relay.client().await;
        assert_eq!(
            code(dave.register(registration(1, 0)).await),
            ErrorCode::QuotaExceeded
        );
        // The session goes on, and identities that have an account still register devices.
        dave.ping().await.unwrap();
        alice.register(registration(2, 0)).await.unwrap();
        // An account that goes makes room.
        carol.unregister(1).await.unwrap();
        dave.register(registration(1, 0)).await.unwrap();
        assert_eq!(
            metrics.get("botd_quota_hits_total", &[("kind", "identities")]),
            1.0
        );
        assert_eq!(
            metrics.get(
                "botd_requests_total",
                &[("kind", "register"), ("outcome", "QUOTA_EXCEEDED")]
            ),
            1.0
        );
        relay.stop().await;
    });
}

/// Payload stored per identity (all its devices) and relay-wide: a send that would take either
/// past its cap is refused, one that reaches it exactly is not, and acks make room again.
#[test]
fn stored_bytes_per_identity_and_relay_wide_get_quota_exceeded() {
    with_metrics(false, |metrics| async move {
        let (relay, _app) = start_relay(Config {
            max_identity_stored_bytes: 10_000,
            max_stored_bytes: 25_000,
            ..test_config()
        })
        .await;
        let alice = registered(&relay, 0).await;
        let bob = registered(&relay, 0).await;
        bob.register(registration(2, 0)).await.unwrap();
        let carol = registered(&relay, 0).await;
        let dave = registered(&relay, 0).await;

        let first = alice.send_message(to(&bob, vec![1; 6_000])).await.unwrap();
        alice
            .send_message(to_device(&bob, 2, vec![2; 4_000]))
            .await
            .unwrap();
        // Bob's two mailboxes hold his 10 000 bytes: one more byte to either is refused.
        let refused = to_device(&bob, 2, vec![3; 1]);
        assert_eq!(
            code(alice.send_message(refused.clone()).await),
            ErrorCode::QuotaExceeded
        );
        alice.send_message(to(&bob, Vec::new())).await.unwrap();
        alice
            .send_message(to(&carol, vec![4; 10_000]))
            .await
            .unwrap();
        alice.send_message(to(&dave, vec![5; 5_000])).await.unwrap();
        // 25 000 bytes stored relay-wide; dave has room of his own, the relay has none.
        assert_eq!(
            code(alice.send_message(to(&dave, vec![6; 1])).await),
            ErrorCode::QuotaExceeded
        );
        alice.ping().await.unwrap();
        // An ack makes room for both: the refused message, retried, is stored.
        bob.ack(1, vec![first.message_id]).await.unwrap();
        let retried = alice.send_message(refused).await.unwrap();
        assert!(!retried.duplicate);
        alice.send_message(to(&dave, vec![6; 1])).await.unwrap();
        assert_eq!(
            metrics.get("botd_quota_hits_total", &[("kind", "identity_bytes")]),
            1.0
        );
        assert_eq!(
            metrics.get("botd_quota_hits_total", &[("kind", "stored_bytes")]),
            1.0
        );
        relay.stop().await;
    });
}

/// Limits of one account and of one mailbox answer `BAD_REQUEST`, `MAILBOX_FULL` or
/// `PAYLOAD_TOO_LARGE`, and every one of them is counted by kind in `quota_hits_total`.
#[test]
fn account_and_mailbox_limits_are_counted_by_kind() {
    with_metrics(false, |metrics| async move {
        let (relay, _app) = start_relay(Config {
            max_tickets_per_identity: 2,
            max_contacts: 2,
            max_devices_per_identity: 2,
            max_prekeys_per_device: 5,
            mailbox_max_messages: 2,
            ..test_config()
        })
        .await;
        let alice = registered(&relay, 0).await;
        let bob = registered(&relay, 4).await;
        bob.create_ticket(0, 0).await.unwrap();
        bob.create_ticket(0, 0).await.unwrap();
        assert_eq!(code(bob.create_ticket(0, 0).await), ErrorCode::BadRequest);
        for _ in 0..2 {
            bob.add_contact(KeyPair::generate().public()).await.unwrap();
        }
        assert_eq!(
            code(bob.add_contact(KeyPair::generate().public()).await),
            ErrorCode::BadRequest
        );
        bob.register(registration(2, 0)).await.unwrap();
        assert_eq!(
            code(bob.register(registration(3, 0)).await),
            ErrorCode::BadRequest
        );
        let upload = UploadPreKeys {
            device_id: 1,
            signed_prekey: None,
            one_time_prekeys: (100..102)
                .map(|id| PreKey {
                    id,
                    public_key: Bytes::from_static(&[9; 33]),
                })
                .collect(),
        };
        assert_eq!(
            code(bob.upload_prekeys(upload).await),
            ErrorCode::BadRequest
        );
        for n in 0..2u8 {
            alice.send_message(to(&bob, vec![n])).await.unwrap();
        }
        assert_eq!(
            code(alice.send_message(to(&bob, vec![9])).await),
            ErrorCode::MailboxFull
        );
        let too_large = vec![0; relay_max_payload() + 1];
        assert_eq!(
            code(alice.send_message(to_device(&bob, 2, too_large)).await),
            ErrorCode::PayloadTooLarge
        );
        for kind in [
            "tickets",
            "contacts",
            "devices",
            "prekeys",
            "mailbox_full",
            "payload_too_large",
        ] {
            assert_eq!(
                metrics.get("botd_quota_hits_total", &[("kind", kind)]),
                1.0,
                "{kind}:\n{}",
                metrics.render()
            );
        }
        relay.stop().await;
    });
}

fn relay_max_payload() -> usize {
    test_config().max_payload_len as usize
}

/// Unregistering the last device removes the whole account: policy, contacts and tickets are
/// gone when the identity registers again, while a remaining device keeps them. Message ids
/// never come back.
#[tokio::test]
async fn the_account_goes_with_its_last_device_and_its_ids_are_never_reused() {
    let (relay, _app) = start_relay(test_config()).await;
    let alice = registered(&relay, 0).await;
    let bob = registered(&relay, 0).await;
    let dave = registered(&relay, 0).await;
    bob.register(registration(2, 0)).await.unwrap();
    bob.set_policy(Accept::ContactsOnly).await.unwrap();
    bob.add_contact(alice.identity()).await.unwrap();
    let ticket = bob.create_ticket(0, 5).await.unwrap().token;
    for n in 0..3u8 {
        alice
            .send_message(to_device(&bob, 2, vec![n]))
            .await
            .unwrap();
    }
    assert_eq!(
        code(dave.send_message(to_device(&bob, 2, &b"hi"[..])).await),
        ErrorCode::Forbidden
    );
    // One device goes: the account and its settings stay.
    bob.unregister(1).await.unwrap();
    assert_eq!(
        code(dave.send_message(to_device(&bob, 2, &b"hi"[..])).await),
        ErrorCode::Forbidden
    );
    let last = alice
        .send_message(to_device(&bob, 2, &b"still a contact"[..]))
        .await
        .unwrap()
        .message_id;
    // The last device goes: so does everything else.
    bob.unregister(2).await.unwrap();
    assert_eq!(
        code(alice.send_message(to_device(&bob, 2, &b"x"[..])).await),
        ErrorCode::UnknownRecipient
    );
    bob.register(registration(2, 0)).await.unwrap();
    // Policy back to open: dave needs no ticket.
    let first_again = dave
        .send_message(to_device(&bob, 2, &b"open"[..]))
        .await
        .unwrap();
    assert!(
        first_again.message_id > last,
        "id {} reused (last was {last})",
        first_again.message_id
    );
    // Contacts and tickets are gone.
    bob.set_policy(Accept::ContactsOnly).await.unwrap();
    assert_eq!(
        code(alice.send_message(to_device(&bob, 2, &b"x"[..])).await),
        ErrorCode::Forbidden
    );
    let mut with_ticket = to_device(&bob, 2, &b"x"[..]);
    with_ticket.ticket = ticket;
    assert_eq!(
        code(alice.send_message(with_ticket).await),
        ErrorCode::TicketInvalid
    );
    // A device id new to the account starts above every id the relay gave out too.
    bob.register(registration(7, 0)).await.unwrap();
    bob.set_policy(Accept::Open).await.unwrap();
    let other = alice
        .send_message(to_device(&bob, 7, &b"x"[..]))
        .await
        .unwrap();
    assert!(other.message_id > last);
    relay.stop().await;
}

// --- Driving the application directly (paused time) ------------------------------------------

/// Sends one message from `from` to device 1 of `to`; its id.
async fn send_id(from: &mut DirectPeer, app: &Arc<App>, to: PublicKeyBytes) -> u64 {
    match from
        .send(app, &OutgoingMessage::new(to, 1, 1, &b"m"[..]))
        .await
    {
        Body::Sent(sent) => sent.message_id,
        other => panic!("expected Sent, got {other:?}"),
    }
}

/// An account none of whose sessions was open or asked anything for `account_ttl` is removed by
/// the sweep, with its mailboxes; an open session keeps its account whatever it does; ids of
/// the removed account never come back.
#[test]
fn idle_accounts_are_removed_after_account_ttl() {
    with_metrics(true, |metrics| async move {
        const HOUR: Duration = Duration::from_secs(3600);
        let config = Config {
            account_ttl: 16 * HOUR,
            ..test_config()
        };
        let app = app(&config, *KeyPair::generate().public());
        let bob_key = Arc::new(KeyPair::generate());
        let mut alice = DirectPeer::connect_as(&app, Arc::new(KeyPair::generate()));
        let mut bob = DirectPeer::connect_as(&app, bob_key.clone());
        let mut carol = DirectPeer::connect_as(&app, Arc::new(KeyPair::generate()));
        for peer in [&mut alice, &mut bob, &mut carol] {
            let answer = peer.call(&app, Body::Register(registration(1, 0))).await;
            assert!(matches!(answer, Body::Registered(_)), "{answer:?}");
        }
        let bob_id = bob.identity();
        send_id(&mut alice, &app, bob_id).await;
        let last = send_id(&mut alice, &app, bob_id).await;
        bob.call(
            &app,
            Body::SetPolicy(SetPolicy {
                accept: Accept::ContactsOnly as i32,
            }),
        )
        .await;
        bob.disconnect(&app);

        // Just short of the ttl: nothing goes.
        tokio::time::advance(16 * HOUR - Duration::from_secs(60)).await;
        app.sweep().await.unwrap();
        assert_eq!(metrics.get("botd_accounts_removed_total", &[]), 0.0);
        // Past it: bob's account goes; alice and carol, connected all along, stay.
        tokio::time::advance(Duration::from_secs(120)).await;
        app.sweep().await.unwrap();
        assert_eq!(metrics.get("botd_accounts_removed_total", &[]), 1.0);
        let request = OutgoingMessage::new(bob_id, 1, 1, &b"m"[..]).sign(&alice.key);
        match alice.call(&app, Body::Send(request)).await {
            Body::Error(error) => assert_eq!(error.code(), ErrorCode::UnknownRecipient),
            other => panic!("bob's account should be gone: {other:?}"),
        }
        let carol_id = carol.identity();
        assert!(
            send_id(&mut alice, &app, carol_id).await >= 1,
            "carol's account stays"
        );

        // Bob comes back as a new account: open policy, ids above the old ones.
        let mut bob = DirectPeer::connect_as(&app, bob_key);
        bob.call(&app, Body::Register(registration(1, 0))).await;
        match bob
            .call(
                &app,
                Body::Subscribe(Subscribe {
                    device_id: 1,
                    after_id: 0,
                }),
            )
            .await
        {
            Body::Subscribed(subscribed) => assert!(subscribed.last_id >= last),
            other => panic!("{other:?}"),
        }
        assert!(bob.pushes.try_recv().is_none(), "nothing survived");
        let fresh = send_id(&mut alice, &app, bob_id).await;
        assert!(fresh > last, "id {fresh} reused (last was {last})");
        match bob.pushes.try_recv() {
            Some(Push::Out(out)) => match out.into_frame().body {
                Some(Body::Deliver(deliver)) => assert_eq!(deliver.message_id, fresh),
                other => panic!("expected a Deliver, got {other:?}"),
            },
            _ => panic!("the new message is delivered"),
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Rate limits on every state change
// ---------------------------------------------------------------------------------------------

/// One request of each state-changing kind, as a body (what it names need not exist: the
/// bucket comes first).
fn change(kind: &str, other: &PublicKeyBytes) -> Body {
    let identity = Bytes::copy_from_slice(other.as_bytes());
    match kind {
        "register" => Body::Register(registration(1, 0)),
        "unregister" => Body::Unregister(Unregister { device_id: 9 }),
        "upload_pre_keys" => Body::UploadPreKeys(UploadPreKeys {
            device_id: 1,
            signed_prekey: None,
            one_time_prekeys: Vec::new(),
        }),
        "set_policy" => Body::SetPolicy(SetPolicy { accept: 0 }),
        "add_contact" => Body::AddContact(AddContact { identity }),
        "remove_contact" => Body::RemoveContact(RemoveContact { identity }),
        "create_ticket" => Body::CreateTicket(CreateTicket { ttl_s: 0, uses: 0 }),
        _ => unreachable!(),
    }
}

const CHANGES: [&str; 7] = [
    "register",
    "unregister",
    "upload_pre_keys",
    "set_policy",
    "add_contact",
    "remove_contact",
    "create_ticket",
];

/// Every account change, `FetchPreKeys` and `AckMessages` take a token of the identity's
/// bucket before any other check (a request that fails otherwise still costs one); an empty
/// bucket answers `RATE_LIMITED` with `retry_after_ms`; `Send` likewise after its own field
/// checks.
#[test]
fn every_state_change_is_rate_limited_per_identity() {
    with_metrics(false, |metrics| async move {
        let (relay, _app) = start_relay(Config {
            change_rate_per_identity: scarce(3),
            prekey_fetch_rate: scarce(2),
            ack_rate_per_identity: scarce(2),
            send_rate_per_identity: scarce(2),
            ..test_config()
        })
        .await;
        let target = registered(&relay, 0).await;
        for kind in CHANGES {
            let client = registered(&relay, 0).await;
            // Two more tokens, whatever the outcome (unregister names an unknown device).
            for _ in 0..2 {
                let _ = client.request(change(kind, target.identity())).await;
            }
            let wait = retry_after(client.request(change(kind, target.identity())).await);
            assert!(
                (1..=100_000).contains(&wait),
                "{kind}: retry_after_ms {wait}"
            );
            // Other kinds of the same family share the bucket; other families do not.
            let wait = retry_after(
                client
                    .request(change("set_policy", target.identity()))
                    .await,
            );
            assert!(wait >= 1);
            client.prekey_count(1).await.unwrap();
        }
        // FetchPreKeys: an unknown identity costs a token too.
        let fetcher = registered(&relay, 0).await;
        let unknown = *KeyPair::generate().public();
        assert_eq!(
            code(fetcher.fetch_prekeys(&unknown, vec![]).await),
            ErrorCode::UnknownRecipient
        );
        fetcher
            .fetch_prekeys(target.identity(), vec![])
            .await
            .unwrap();
        assert!(retry_after(fetcher.fetch_prekeys(target.identity(), vec![]).await) >= 1);
        // AckMessages: acks of nothing cost a token too.
        fetcher.ack(1, vec![1]).await.unwrap();
        fetcher.ack(1, vec![]).await.unwrap();
        assert!(retry_after(fetcher.ack(1, vec![2]).await) >= 1);
        // Send: the sender's bucket.
        fetcher.send_message(to(&target, &b"1"[..])).await.unwrap();
        fetcher.send_message(to(&target, &b"2"[..])).await.unwrap();
        assert!(retry_after(fetcher.send_message(to(&target, &b"3"[..])).await) >= 1);
        // The session goes on.
        fetcher.prekey_count(1).await.unwrap();

        for (limit, refused) in [
            ("changes", 14.0),
            ("prekey_fetches", 1.0),
            ("acks", 1.0),
            ("sends", 1.0),
        ] {
            assert_eq!(
                metrics.get("botd_rate_limited_total", &[("limit", limit)]),
                refused,
                "{limit}"
            );
        }
        relay.stop().await;
    });
}

/// The per-address buckets: two identities connecting from 127.0.0.7 share one, an identity
/// from 127.0.0.8 has its own. Account changes, prekey fetches and sends each have one.
#[test]
fn identities_from_one_address_share_its_buckets() {
    with_metrics(false, |metrics| async move {
        let (relay, _app) = start_relay(Config {
            change_rate_per_ip: scarce(4),
            prekey_fetch_rate_per_ip: scarce(2),
            send_rate_per_ip: scarce(2),
            ..test_config()
        })
        .await;
        let shared = loopback(7);
        let a = relay.client_from(shared).await;
        let b = relay.client_from(shared).await;
        let c = relay.client_from(loopback(8)).await;
        // Account changes: four tokens for 127.0.0.7, whoever takes them.
        a.register(registration(1, 0)).await.unwrap();
        b.register(registration(1, 0)).await.unwrap();
        a.register(registration(2, 0)).await.unwrap();
        b.set_policy(Accept::Open).await.unwrap();
        let wait = retry_after(a.set_policy(Accept::Open).await);
        assert!((1..=100_000).contains(&wait), "retry_after_ms {wait}");
        assert!(retry_after(b.add_contact(c.identity()).await) >= 1);
        c.register(registration(1, 5)).await.unwrap();
        c.set_policy(Accept::Open).await.unwrap();
        // Prekey fetches.
        a.fetch_prekeys(c.identity(), vec![]).await.unwrap();
        b.fetch_prekeys(c.identity(), vec![]).await.unwrap();
        assert!(retry_after(a.fetch_prekeys(c.identity(), vec![]).await) >= 1);
        c.fetch_prekeys(a.identity(), vec![]).await.unwrap();
        // Sends.
        a.send_message(to(&c, &b"a"[..])).await.unwrap();
        b.send_message(to(&c, &b"b"[..])).await.unwrap();
        assert!(retry_after(b.send_message(to(&c, &b"b2"[..])).await) >= 1);
        c.send_message(to(&a, &b"c"[..])).await.unwrap();
        for limit in [
            "changes_per_address",
            "prekey_fetches_per_address",
            "sends_per_address",
        ] {
            let expected = if limit == "changes_per_address" {
                2.0
            } else {
                1.0
            };
            assert_eq!(
                metrics.get("botd_rate_limited_total", &[("limit", limit)]),
                expected,
                "{limit}"
            );
        }
        relay.stop().await;
    });
}

// ---------------------------------------------------------------------------------------------
// One-time prekeys
// ---------------------------------------------------------------------------------------------

/// However many identities fetch, a device hands out at most its burst of one-time prekeys;
/// beyond it bundles go out without one (the fetch succeeds), the keys stay stored, and the
/// withheld bundles are counted.
#[test]
fn one_time_prekeys_are_rationed_per_target_device() {
    with_metrics(false, |metrics| async move {
        let (relay, _app) = start_relay(Config {
            one_time_prekey_rate_per_device: scarce(3),
            prekey_low_threshold: 1,
            ..test_config()
        })
        .await;
        let bob = registered(&relay, 10).await;
        bob.register(registration(2, 10)).await.unwrap();
        let mut with_key = 0;
        for _ in 0..5 {
            let fetcher = relay.client().await;
            let bundles = fetcher
                .fetch_prekeys(bob.identity(), vec![1])
                .await
                .unwrap();
            assert_eq!(bundles.len(), 1);
            assert!(bundles[0].signed_prekey.is_some());
            with_key += usize::from(bundles[0].one_time_prekey.is_some());
        }
        assert_eq!(with_key, 3);
        assert_eq!(bob.prekey_count(1).await.unwrap().count, 7);
        // The other device has a bucket of its own.
        let fetcher = relay.client().await;
        let bundles = fetcher
            .fetch_prekeys(bob.identity(), vec![2])
            .await
            .unwrap();
        assert!(bundles[0].one_time_prekey.is_some());
        assert_eq!(metrics.get("botd_prekeys_handed_out_total", &[]), 4.0);
        assert_eq!(metrics.get("botd_prekeys_withheld_total", &[]), 2.0);
        relay.stop().await;
    });
}

/// `PreKeysLow` is pushed when a fetch takes a device below the threshold, once per crossing:
/// not again while it stays below, again after an upload lifted it to the threshold.
#[tokio::test]
async fn prekeys_low_is_pushed_once_per_crossing() {
    let (relay, _app) = start_relay(Config {
        prekey_low_threshold: 10,
        ..test_config()
    })
    .await;
    let mut bob = registered(&relay, 12).await;
    let fetcher = relay.client().await;
    // Fetches, then a round trip of bob's: a push sent before its answer has arrived by then.
    async fn fetch_then_pushes(fetcher: &Client, bob: &mut Client) -> Vec<(u32, u32)> {
        fetcher.fetch_prekeys(bob.identity(), vec![]).await.unwrap();
        bob.prekey_count(1).await.unwrap();
        let mut lows = Vec::new();
        while let Some(frame) = try_push(bob) {
            match frame.body {
                Some(Body::PreKeysLow(low)) => lows.push((low.device_id, low.count)),
                other => panic!("unexpected push {other:?}"),
            }
        }
        lows
    }
    assert!(fetch_then_pushes(&fetcher, &mut bob).await.is_empty()); // 11 left
    assert!(fetch_then_pushes(&fetcher, &mut bob).await.is_empty()); // 10
    assert_eq!(fetch_then_pushes(&fetcher, &mut bob).await, [(1, 9)]);
    // 8 left: the same crossing, no second push.
    assert!(fetch_then_pushes(&fetcher, &mut bob).await.is_empty());
    // An upload that does not reach the threshold does not re-arm it.
    let upload = |from: u32, n: u32| UploadPreKeys {
        device_id: 1,
        signed_prekey: None,
        one_time_prekeys: (from..from + n)
            .map(|id| PreKey {
                id,
                public_key: Bytes::from_static(&[3; 33]),
            })
            .collect(),
    };
    assert_eq!(bob.upload_prekeys(upload(100, 1)).await.unwrap().count, 9);
    // 8 left, still below.
    assert!(fetch_then_pushes(&fetcher, &mut bob).await.is_empty());
    // One that does re-arms it: the next crossing is announced.
    assert_eq!(bob.upload_prekeys(upload(200, 3)).await.unwrap().count, 11);
    assert!(fetch_then_pushes(&fetcher, &mut bob).await.is_empty()); // 10
    assert_eq!(fetch_then_pushes(&fetcher, &mut bob).await, [(1, 9)]);
    relay.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Values at the ends of their types
// ---------------------------------------------------------------------------------------------

/// Ids, lifetimes and counts at the ends of their types get the answers the spec defines,
/// nothing is stored out of range, and the session goes on: a ticket of `u32::MAX` seconds or
/// uses is refused, `u64::MAX` as `after_id`, `message_id` or an ack id is harmless, and
/// `u32::MAX` as a device id, registration id or prekey id is an ordinary value.
#[tokio::test]
async fn values_at_the_ends_of_their_types_get_defined_answers() {
    let (relay, _app) = start_relay(test_config()).await;
    let alice = registered(&relay, 0).await;
    let bob = registered(&relay, 0).await;
    // Tickets: u32::MAX seconds is far past max_ticket_ttl, u32::MAX uses past max_ticket_uses.
    assert_eq!(
        code(bob.create_ticket(u32::MAX, 1).await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(bob.create_ticket(60, u32::MAX).await),
        ErrorCode::BadRequest
    );
    // Message ids: nothing is stored above u64::MAX - 1, nothing wraps.
    assert_eq!(bob.subscribe(1, u64::MAX).await.unwrap().last_id, 0);
    assert_eq!(
        code(bob.get_message(1, u64::MAX).await),
        ErrorCode::NotFound
    );
    let sent = alice.send_message(to(&bob, &b"m"[..])).await.unwrap();
    assert_eq!(sent.message_id, 1);
    assert_eq!(
        bob.ack(1, vec![u64::MAX, u64::MAX - 1])
            .await
            .unwrap()
            .deleted,
        0
    );
    assert_eq!(&bob.get_message(1, 1).await.unwrap().payload[..], b"m");
    assert_eq!(bob.ack(1, vec![u64::MAX, 1]).await.unwrap().deleted, 1);
    // Device, registration and prekey ids: the whole u32 range is usable.
    let mut last = registration(1, 0);
    last.device_id = u32::MAX;
    last.registration_id = u32::MAX;
    last.one_time_prekeys = vec![PreKey {
        id: u32::MAX,
        public_key: Bytes::from_static(&[8; 33]),
    }];
    bob.register(last).await.unwrap();
    let bundles = alice
        .fetch_prekeys(bob.identity(), vec![u32::MAX])
        .await
        .unwrap();
    assert_eq!(bundles.len(), 1);
    assert_eq!(bundles[0].device_id, u32::MAX);
    assert_eq!(bundles[0].registration_id, u32::MAX);
    assert_eq!(
        bundles[0].one_time_prekey.as_ref().map(|key| key.id),
        Some(u32::MAX)
    );
    let sent = alice
        .send_message(to_device(&bob, u32::MAX, &b"n"[..]))
        .await
        .unwrap();
    assert_eq!(
        &bob.get_message(u32::MAX, sent.message_id)
            .await
            .unwrap()
            .payload[..],
        b"n"
    );
    bob.ping().await.unwrap();
    relay.stop().await;
}
