//! The secure transport over loopback: handshake, Welcome, ping, key rotation, and every bad
//! input closing only the offending connection while the relay keeps serving good peers.

mod common;

use std::sync::Arc;
use std::time::Duration;

use botd_client::{Client, ClientError, ClientOptions};
use botd_protocol::handshake::AwaitingAck;
use botd_protocol::keys::{negate_s, KeyPair};
use botd_protocol::proto::{Body, Done, ErrorCode, Frame, Init, Ping};
use botd_relay::config::Config;
use bytes::Bytes;
use common::*;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CLOSE_WITHIN: Duration = Duration::from_secs(5);

#[tokio::test]
async fn handshake_welcome_and_ping() {
    let relay = start(test_config()).await;
    let client = relay.client().await;
    let welcome = client.welcome();
    assert_eq!(welcome.protocol, "botd/1");
    assert_eq!(welcome.max_frame_len, 1 << 20);
    assert_eq!(welcome.max_payload_len, 256 << 10);
    assert_eq!(welcome.ping_interval_ms, 60_000);
    assert_eq!(&welcome.relay_pubkey[..], relay.key.as_bytes());
    assert!(welcome.server_time_ms > 1_600_000_000_000);
    client.ping().await.expect("pong");
    // A second ping within 30 s is refused by the client itself, as BOTD requires.
    assert!(matches!(client.ping().await, Err(ClientError::PingTooSoon)));
    relay.stop().await;
}

/// A valid Init for `relay`, decoded so tests can spoil one field.
fn valid_init(relay: &Relay, initiator: &KeyPair) -> Init {
    let (_, body) = AwaitingAck::start(initiator, relay.key);
    Init::decode(body).unwrap()
}

/// Sends `body` as the first frame and expects the relay to close without a single byte.
async fn refused_silently(relay: &Relay, body: &[u8]) {
    let mut stream = TcpStream::connect(relay.addr).await.unwrap();
    write_frame(&mut stream, body).await;
    let answer = read_until_closed(&mut stream, CLOSE_WITHIN).await;
    assert!(
        answer.is_empty(),
        "relay answered a bad Init with {answer:?}"
    );
    relay.assert_serving().await;
}

#[tokio::test]
async fn bad_inits_are_closed_silently_and_the_relay_keeps_serving() {
    let relay = start(test_config()).await;
    let initiator = KeyPair::generate();

    let mut bad_signature = valid_init(&relay, &initiator);
    let mut sig = bad_signature.signature.to_vec();
    sig[20] ^= 0x01;
    bad_signature.signature = sig.into();
    refused_silently(&relay, &bad_signature.encode_to_vec()).await;

    let mut high_s = valid_init(&relay, &initiator);
    let sig: [u8; 64] = high_s.signature[..].try_into().unwrap();
    high_s.signature = Bytes::copy_from_slice(&negate_s(&sig));
    refused_silently(&relay, &high_s.encode_to_vec()).await;

    // Properly signed, but for another relay's key.
    let other = KeyPair::generate();
    let (_, wrong_recipient) = AwaitingAck::start(&initiator, *other.public());
    refused_silently(&relay, &wrong_recipient).await;

    let mut uncompressed = valid_init(&relay, &initiator);
    let mut long_key = vec![0x04];
    long_key.extend_from_slice(&[0x11; 64]);
    uncompressed.sender_pubkey = long_key.into();
    refused_silently(&relay, &uncompressed.encode_to_vec()).await;

    let mut off_curve = valid_init(&relay, &initiator);
    let mut key = [0u8; 33];
    key[0] = 0x02;
    key[32] = 5; // x = 5 is not on secp256k1
    off_curve.ephemeral_pubkey = Bytes::copy_from_slice(&key);
    refused_silently(&relay, &off_curve.encode_to_vec()).await;

    refused_silently(
        &relay,
        b"\x0a\xff\xff\xff\xff\xff\xff garbage that is not protobuf",
    )
    .await;

    relay.stop().await;
}

#[tokio::test]
async fn replayed_init_is_refused() {
    let relay = start(test_config()).await;
    let initiator = KeyPair::generate();
    let (waiting, init) = AwaitingAck::start(&initiator, relay.key);
    let mut first = TcpStream::connect(relay.addr).await.unwrap();
    write_frame(&mut first, &init).await;
    let mut peer_buf = vec![0u8; 4];
    tokio::io::AsyncReadExt::read_exact(&mut first, &mut peer_buf)
        .await
        .unwrap();
    drop(waiting);
    // The same Init again, on a new connection: no Ack.
    refused_silently(&relay, &init).await;
    relay.stop().await;
}

#[tokio::test]
async fn malformed_lengths_close_the_connection() {
    let relay = start(test_config()).await;

    // Zero length, before and after the handshake.
    let mut stream = TcpStream::connect(relay.addr).await.unwrap();
    stream.write_all(&[0, 0, 0, 0]).await.unwrap();
    assert!(read_until_closed(&mut stream, CLOSE_WITHIN)
        .await
        .is_empty());
    let mut peer = RawPeer::connect(&relay).await;
    peer.stream.write_all(&[0, 0, 0, 0]).await.unwrap();
    assert!(peer.read_body().await.is_none());

    // A length above the maximum closes at once, without waiting for the (never sent) body.
    let mut stream = TcpStream::connect(relay.addr).await.unwrap();
    stream.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    assert!(read_until_closed(&mut stream, CLOSE_WITHIN)
        .await
        .is_empty());
    let mut peer = RawPeer::connect(&relay).await;
    peer.stream
        .write_all(&((1u32 << 20) + 1).to_be_bytes())
        .await
        .unwrap();
    assert!(peer.read_body().await.is_none());

    relay.assert_serving().await;
    relay.stop().await;
}

#[tokio::test]
async fn bad_tag_replay_and_truncation_close_the_session() {
    let relay = start(test_config()).await;
    let probe = Frame::new(1, Body::Done(Done {}));

    // Bad tag.
    let mut peer = RawPeer::connect(&relay).await;
    let mut wire = peer.seal(&probe).to_vec();
    *wire.last_mut().unwrap() ^= 0x80;
    peer.stream.write_all(&wire).await.unwrap();
    assert!(peer.read_body().await.is_none(), "closed without a reply");

    // A replayed frame: the first copy is answered, the second closes.
    let mut peer = RawPeer::connect(&relay).await;
    let wire = peer.seal(&probe);
    peer.stream.write_all(&wire).await.unwrap();
    let answer = peer.recv().await.unwrap();
    assert_eq!(
        (answer.id, error_code(&answer)),
        (1, ErrorCode::Unsupported)
    );
    peer.stream.write_all(&wire).await.unwrap();
    assert!(peer.read_body().await.is_none());

    // A body shorter than a tag.
    let mut peer = RawPeer::connect(&relay).await;
    write_frame(&mut peer.stream, b"short").await;
    assert!(peer.read_body().await.is_none());

    // A frame cut short by the end of the stream.
    let mut peer = RawPeer::connect(&relay).await;
    let wire = peer.seal(&probe);
    peer.stream
        .write_all(&wire[..wire.len() - 3])
        .await
        .unwrap();
    peer.stream.shutdown().await.unwrap();
    assert!(peer.read_body().await.is_none());

    relay.assert_serving().await;
    relay.stop().await;
}

#[tokio::test]
async fn unknown_bodies_get_unsupported_and_the_session_goes_on() {
    let relay = start(test_config()).await;
    let mut peer = RawPeer::connect(&relay).await;
    peer.send(&Frame { id: 5, body: None }).await;
    let answer = peer.recv().await.unwrap();
    assert_eq!(
        (answer.id, error_code(&answer)),
        (5, ErrorCode::Unsupported)
    );
    // A field number this relay does not know decodes as a missing body.
    let mut unknown = Frame { id: 6, body: None }.encode_to_vec();
    unknown.extend_from_slice(&[0xfa, 0x3f, 0x01, 0x00]); // field 1023, 1 byte
    let wire = peer.session.seal_plaintext(&unknown);
    peer.stream.write_all(&wire).await.unwrap();
    let answer = peer.recv().await.unwrap();
    assert_eq!(
        (answer.id, error_code(&answer)),
        (6, ErrorCode::Unsupported)
    );
    // Plaintext that is not a Frame at all.
    let wire = peer.session.seal_plaintext(&[0x0f, 0xff]);
    peer.stream.write_all(&wire).await.unwrap();
    let answer = peer.recv().await.unwrap();
    assert_eq!((answer.id, error_code(&answer)), (0, ErrorCode::BadRequest));
    // Still alive.
    peer.send(&Frame::new(7, Body::Ping(Ping { id: "p".into() })))
        .await;
    let pong = peer.recv().await.unwrap();
    assert!(matches!((pong.id, pong.body), (7, Some(Body::Pong(_)))));
    relay.stop().await;
}

/// A peer that sends its last request and closes its side at once still gets the answer, then
/// a clean end of stream (a FIN, not a reset): once the relay has read the peer's end, it flushes
/// and closes without the linger, and nothing unread is left to turn the close into a reset.
#[tokio::test]
async fn a_peer_that_closes_after_its_last_request_gets_the_answer_then_a_clean_end() {
    let relay = start(test_config()).await;
    let mut peer = RawPeer::connect(&relay).await;
    peer.send(&Frame::new(1, Body::Ping(Ping { id: "last".into() })))
        .await;
    peer.stream.shutdown().await.unwrap();
    let pong = peer.recv().await.expect("the answer comes before the end");
    assert!(matches!(pong.body, Some(Body::Pong(ref p)) if p.ping_id == "last"));
    let mut rest = [0u8; 64];
    let read = tokio::time::timeout(CLOSE_WITHIN, peer.stream.read(&mut rest))
        .await
        .expect("the relay closes in time");
    assert_eq!(read.expect("an end of stream, not a reset"), 0);
    relay.assert_serving().await;
    relay.stop().await;
}

#[tokio::test]
async fn ping_flood_gets_an_error_then_close() {
    let relay = start(test_config()).await;
    let mut peer = RawPeer::connect(&relay).await;
    peer.send(&Frame::new(1, Body::Ping(Ping { id: "one".into() })))
        .await;
    let pong = peer.recv().await.unwrap();
    assert!(matches!(pong.body, Some(Body::Pong(ref p)) if p.ping_id == "one"));
    peer.send(&Frame::new(2, Body::Ping(Ping { id: "two".into() })))
        .await;
    let flood = peer.recv().await.unwrap();
    assert_eq!((flood.id, error_code(&flood)), (2, ErrorCode::PingFlood));
    assert!(peer.read_body().await.is_none(), "closed after PING_FLOOD");
    relay.assert_serving().await;
    relay.stop().await;
}

#[tokio::test]
async fn silent_connection_is_closed_at_the_handshake_deadline() {
    let mut config = test_config();
    config.handshake_timeout = Duration::from_millis(200);
    let relay = start(config).await;
    let mut silent = TcpStream::connect(relay.addr).await.unwrap();
    // A half-sent Init counts as silent too.
    let mut partial = TcpStream::connect(relay.addr).await.unwrap();
    partial.write_all(&[0, 0, 0, 100, 1, 2, 3]).await.unwrap();
    assert!(read_until_closed(&mut silent, CLOSE_WITHIN)
        .await
        .is_empty());
    assert!(read_until_closed(&mut partial, CLOSE_WITHIN)
        .await
        .is_empty());
    relay.assert_serving().await;
    relay.stop().await;
}

#[tokio::test]
async fn idle_session_is_told_and_closed() {
    let mut config = test_config();
    config.idle_timeout = Duration::from_millis(300);
    let relay = start(config).await;
    let options = ClientOptions {
        keepalive: false,
        ..ClientOptions::default()
    };
    let mut client = Client::connect(
        relay.addr,
        Arc::new(KeyPair::generate()),
        relay.key,
        options,
    )
    .await
    .unwrap();
    let notice = tokio::time::timeout(CLOSE_WITHIN, client.next_push())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(error_code(&notice), ErrorCode::Timeout);
    assert!(tokio::time::timeout(CLOSE_WITHIN, client.next_push())
        .await
        .unwrap()
        .is_none());
    relay.stop().await;
}

#[tokio::test]
async fn session_crosses_key_rotations_both_ways() {
    let relay = start(test_config()).await;
    let client = relay.client().await;
    // 2600 requests and 2600 answers: two rotations in each direction, Welcome included.
    for i in 0..2600u32 {
        let err = client.request(Body::Done(Done {})).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Unsupported), "request {i}");
    }
    client.ping().await.expect("session still healthy");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_handshakes_succeed() {
    // All from 127.0.0.1: lift the per-address cap on handshakes in progress (a default of 64
    // is meant for one host, not for this test's crowd behind one address).
    let config = Config {
        max_unauthenticated_per_ip: 256,
        ..test_config()
    };
    let relay = Arc::new(start(config).await);
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let relay = relay.clone();
        tasks.push(tokio::spawn(async move {
            let client = relay.client().await;
            client.ping().await.expect("pong");
        }));
    }
    let mut ok = 0;
    for task in tasks {
        task.await.unwrap();
        ok += 1;
    }
    assert_eq!(ok, 200);
    Arc::into_inner(relay).unwrap().stop().await;
}

#[tokio::test]
async fn connection_cap_and_per_ip_rate_are_enforced() {
    let mut config = test_config();
    config.max_connections = 2;
    let relay = start(config).await;
    let first = relay.client().await;
    let second = relay.client().await;
    let third = Client::connect(
        relay.addr,
        Arc::new(KeyPair::generate()),
        relay.key,
        ClientOptions::default(),
    )
    .await;
    assert!(third.is_err(), "third connection refused");
    drop(first);
    drop(second);
    relay.stop().await;

    let mut config = test_config();
    config.handshake_rate_per_ip = botd_relay::ratelimit::Rate::new(0.001, 2);
    let relay = start(config).await;
    relay.client().await;
    relay.client().await;
    let refused = Client::connect(
        relay.addr,
        Arc::new(KeyPair::generate()),
        relay.key,
        ClientOptions::default(),
    )
    .await;
    assert!(
        refused.is_err(),
        "third handshake from the same address refused"
    );
    relay.stop().await;
}

#[tokio::test]
async fn shutdown_tells_sessions_and_drains() {
    let relay = start(test_config()).await;
    let mut client = relay.client().await;
    relay.handle.shutdown();
    let notice = tokio::time::timeout(CLOSE_WITHIN, client.next_push())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(error_code(&notice), ErrorCode::ShuttingDown);
    tokio::time::timeout(CLOSE_WITHIN, relay.task)
        .await
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(relay.addr).await.is_err(),
        "listener closed"
    );
}
