//! The relay application over loopback: registration, prekeys, mailboxes, live delivery, acks.

mod common;

use botd_relay::client::{verify_delivery, OutgoingMessage};
use botd_relay::proto::Body;
use common::*;

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
        Some(botd_relay::proto::ErrorCode::NotFound)
    );
    relay.stop().await;
}
