//! Hostile peers over loopback, from other loopback addresses (127.0.0.2, 127.0.0.3, …): each
//! defence of the transport is driven past its limit and checked on the wire, in the server's
//! own counts ([`botd_relay::net::ServerStats`]) and in the metrics it exports.
//!
//! * Admission before work: silent and half-`Init` sockets hold no handshake slot, sockets over
//!   the per-address cap are closed at accept, the oldest unauthenticated connection makes
//!   room when the relay-wide cap is reached, silent sockets go at `init_timeout`, and a flood of
//!   badly signed `Init`s from several addresses does not keep good handshakes out; the
//!   round-robin crypto scheduler is checked directly for its turn order.
//! * Bounded memory: partly received frames never hold more than `max_inbound_buffer_bytes`,
//!   tricklers go at `frame_timeout`, and a peer that stops reading is gone within
//!   `write_timeout` plus the closing linger, also at shutdown.
//!
//! Every wait has a generous bound that only guards against a hang; assertions are on counts,
//! states and metrics. Lower bounds on time ("closed no earlier than its deadline") are safe:
//! the relay's timers never fire early.

mod common;

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use botd_protocol::handshake::AwaitingAck;
use botd_protocol::keys::KeyPair;
use botd_protocol::proto::{Body, Done, ErrorCode, Frame, GetMessage, Init};
use botd_relay::config::Config;
use botd_relay::net::{Admission, CryptoSlots, Refusal};
use common::*;
use prost::Message;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

/// An `init_timeout` no test waits for: closes seen before it are the relay's refusals.
const LONG: Duration = Duration::from_secs(60);

fn config() -> Config {
    Config {
        init_timeout: LONG,
        handshake_timeout: LONG,
        ..test_config()
    }
}

/// A valid `Init` body for the relay from a fresh identity.
fn init_body(relay: &Relay) -> Vec<u8> {
    let (_, body) = AwaitingAck::start(&KeyPair::generate(), relay.key);
    body.to_vec()
}

/// An `Init` whose signature does not verify: costs the relay one verification.
fn bad_signature_init(relay: &Relay) -> Vec<u8> {
    let mut init = Init::decode(&init_body(relay)[..]).unwrap();
    let mut signature = init.signature.to_vec();
    signature[31] ^= 1;
    init.signature = signature.into();
    init.encode_to_vec()
}

/// A connection from `ip` that sends the length and the first 100 bytes of an `Init`, and then
/// nothing.
async fn half_init(relay: &Relay, ip: IpAddr) -> TcpStream {
    let body = init_body(relay);
    let mut stream = connect_from(relay, ip).await;
    let mut wire = (body.len() as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(&body[..100]);
    stream.write_all(&wire).await.unwrap();
    stream
}

/// Bytes the relay charges to its inbound budget for one half-sent `Init`: the whole frame.
fn half_init_charge(relay: &Relay) -> usize {
    4 + init_body(relay).len()
}

// ---------------------------------------------------------------------------------------------
// Admission before work
// ---------------------------------------------------------------------------------------------

/// 200 silent and 200 half-`Init` sockets from 20 addresses: none of them holds or waits for a
/// handshake slot (there is only one), only the half-`Init`s hold buffer budget (exactly their
/// frames), and a good handshake from 127.0.0.1 completes meanwhile.
#[test]
fn silent_and_half_init_sockets_hold_no_handshake_slot() {
    with_metrics(false, |metrics| async move {
        let relay = start(Config {
            max_handshakes_in_flight: 1,
            ..config()
        })
        .await;
        let mut held = Vec::new();
        for address in 10..30u8 {
            for _ in 0..10 {
                held.push(connect_from(&relay, loopback(address)).await);
                held.push(half_init(&relay, loopback(address)).await);
            }
        }
        let charge = 200 * half_init_charge(&relay);
        wait_until("the relay holds all 400 sockets", HANG, || {
            let stats = relay.stats();
            stats.unauthenticated == 400 && stats.inbound_buffer_bytes == charge
        })
        .await;
        assert_eq!(relay.stats().handshakes_waiting, 0, "no Init is complete");
        assert_eq!(
            metrics.get("botd_inbound_buffer_bytes", &[]),
            charge as f64,
            "the budget gauge shows the half-sent Inits"
        );
        assert_eq!(metrics.get("botd_connections_unauthenticated", &[]), 400.0);

        relay.assert_serving().await;
        assert_eq!(
            relay.stats().unauthenticated,
            400,
            "the good peer authenticated"
        );
        assert!(held.iter().all(|s| !is_closed(s)), "nobody was evicted");
        assert_eq!(metrics.get("botd_connections_rejected_total", &[]), 0.0);
        assert_eq!(
            metrics.get("botd_handshakes_total", &[("outcome", "ok")]),
            1.0
        );
        drop(held);
        wait_until("the relay noticed the closes", HANG, || {
            let stats = relay.stats();
            stats.unauthenticated == 0 && stats.inbound_buffer_bytes == 0
        })
        .await;
        relay.stop().await;
    });
}

/// Silent and half-`Init` sockets are closed at `init_timeout`, no sooner, without a byte.
#[test]
fn silent_sockets_are_closed_at_init_timeout() {
    with_metrics(false, |metrics| async move {
        let init_timeout = Duration::from_millis(300);
        let relay = start(Config {
            init_timeout,
            handshake_timeout: Duration::from_secs(5),
            ..test_config()
        })
        .await;
        let mut sockets = Vec::new();
        for address in 10..20u8 {
            for _ in 0..10 {
                let opened = Instant::now();
                sockets.push((opened, connect_from(&relay, loopback(address)).await));
                let opened = Instant::now();
                sockets.push((opened, half_init(&relay, loopback(address)).await));
            }
        }
        for (opened, mut socket) in sockets {
            let received = read_until_closed(&mut socket, HANG).await;
            assert!(received.is_empty(), "the relay sent {received:?}");
            assert!(
                opened.elapsed() >= init_timeout,
                "closed before init_timeout"
            );
        }
        assert_eq!(
            metrics.get(
                "botd_handshakes_total",
                &[("outcome", "failed"), ("reason", "init_timeout")]
            ),
            200.0
        );
        wait_until("every slot is given back", HANG, || {
            relay.stats()
                == botd_relay::net::ServerStats {
                    inbound_buffer_peak: relay.stats().inbound_buffer_peak,
                    ..Default::default()
                }
        })
        .await;
        relay.assert_serving().await;
        relay.stop().await;
    });
}

/// Past `max_unauthenticated_per_ip` connections in their handshake, an address's further
/// connections are closed at accept; other addresses are not affected, and the address gets
/// room again as its connections go.
#[test]
fn sockets_over_the_per_address_cap_are_closed_at_accept() {
    with_metrics(false, |metrics| async move {
        let relay = start(Config {
            max_unauthenticated_per_ip: 8,
            ..config()
        })
        .await;
        let flooder = loopback(2);
        let mut admitted = Vec::new();
        for _ in 0..8 {
            admitted.push(connect_from(&relay, flooder).await);
        }
        wait_until("8 admitted", HANG, || relay.stats().unauthenticated == 8).await;
        for _ in 0..4 {
            let mut refused = connect_from(&relay, flooder).await;
            // Only a refusal can close it this soon: init_timeout is a minute.
            assert!(read_until_closed(&mut refused, HANG).await.is_empty());
        }
        assert_eq!(relay.stats().unauthenticated, 8);
        assert!(admitted.iter().all(|s| !is_closed(s)));
        assert_eq!(
            metrics.get(
                "botd_connections_rejected_total",
                &[("reason", "unauthenticated_per_address")]
            ),
            4.0
        );
        // Another address has its own cap.
        for _ in 0..8 {
            admitted.push(connect_from(&relay, loopback(3)).await);
        }
        wait_until("16 admitted", HANG, || relay.stats().unauthenticated == 16).await;
        // A good peer from the flooded address is refused too (the cap is per address)...
        let options = botd_client::ClientOptions {
            local_ip: Some(flooder),
            ..Default::default()
        };
        let refused = botd_client::Client::connect(
            relay.addr,
            Arc::new(KeyPair::generate()),
            relay.key,
            options,
        )
        .await;
        assert!(
            refused.is_err(),
            "a ninth connection of 127.0.0.2 is refused"
        );
        // ...until one of the address's connections goes.
        drop(admitted.remove(0));
        wait_until("one gone", HANG, || relay.stats().unauthenticated == 15).await;
        let client = relay.client_from(flooder).await;
        client.ping().await.unwrap();
        // And from elsewhere, good peers are served all along.
        relay.assert_serving().await;
        assert_eq!(
            metrics.get(
                "botd_connections_rejected_total",
                &[("reason", "unauthenticated_per_address")]
            ),
            5.0
        );
        relay.stop().await;
    });
}

/// With `max_unauthenticated` connections in their handshake, a new one closes the oldest.
#[test]
fn the_oldest_unauthenticated_connection_makes_room_for_a_new_one() {
    with_metrics(false, |metrics| async move {
        let relay = start(Config {
            max_unauthenticated: 20,
            max_unauthenticated_per_ip: 5,
            ..config()
        })
        .await;
        let mut sockets = Vec::new();
        for address in 2..6u8 {
            for _ in 0..5 {
                sockets.push(connect_from(&relay, loopback(address)).await);
                let n = sockets.len();
                // One at a time, so the relay's arrival order is ours.
                wait_until("admitted", HANG, || relay.stats().unauthenticated == n).await;
            }
        }
        let newcomer = connect_from(&relay, loopback(6)).await;
        wait_until("one evicted", HANG, || relay.stats().evicted == 1).await;
        assert!(read_until_closed(&mut sockets[0], HANG).await.is_empty());
        assert!(
            sockets[1..].iter().all(|s| !is_closed(s)),
            "only the oldest went"
        );
        assert!(!is_closed(&newcomer));
        assert_eq!(relay.stats().unauthenticated, 20);
        // A good handshake gets in the same way, at the expense of the next oldest.
        relay.assert_serving().await;
        assert_eq!(relay.stats().evicted, 2);
        assert!(read_until_closed(&mut sockets[1], HANG).await.is_empty());
        assert!(sockets[2..].iter().all(|s| !is_closed(s)));
        wait_until("19 left", HANG, || relay.stats().unauthenticated == 19).await;
        assert_eq!(
            metrics.get(
                "botd_connections_rejected_total",
                &[("reason", "evicted_unauthenticated")]
            ),
            2.0
        );
        assert_eq!(
            metrics.get(
                "botd_handshakes_total",
                &[("outcome", "failed"), ("reason", "evicted")]
            ),
            2.0
        );
        relay.stop().await;
    });
}

/// The two refusals at accept that come before the caps on unauthenticated connections: the
/// connection cap and the per-address handshake rate, each counted under its reason.
#[test]
fn refusals_at_accept_are_counted_by_reason() {
    with_metrics(false, |metrics| async move {
        let relay = start(Config {
            max_connections: 4,
            handshake_rate_per_ip: botd_relay::ratelimit::Rate::new(0.001, 2),
            ..config()
        })
        .await;
        let mut open = Vec::new();
        for _ in 0..2 {
            open.push(connect_from(&relay, loopback(52)).await);
        }
        // 127.0.0.52 has used its two handshakes.
        let mut refused = connect_from(&relay, loopback(52)).await;
        assert!(read_until_closed(&mut refused, HANG).await.is_empty());
        for _ in 0..2 {
            open.push(connect_from(&relay, loopback(53)).await);
        }
        wait_until("four open", HANG, || relay.stats().connections_open == 4).await;
        // The relay is full: a fifth connection, from anywhere, is closed at accept.
        let mut refused = connect_from(&relay, loopback(54)).await;
        assert!(read_until_closed(&mut refused, HANG).await.is_empty());
        assert!(open.iter().all(|s| !is_closed(s)));
        for (reason, count) in [("rate_limited", 1.0), ("max_connections", 1.0)] {
            assert_eq!(
                metrics.get("botd_connections_rejected_total", &[("reason", reason)]),
                count,
                "{reason}"
            );
        }
        assert_eq!(metrics.get("botd_connections_open", &[]), 4.0);
        relay.stop().await;
    });
}

/// Four addresses keep sending badly signed `Init`s (each costs a verification) through one
/// handshake slot, while good handshakes from 127.0.0.1 keep completing.
#[test]
fn a_bad_signature_flood_from_several_addresses_does_not_keep_good_handshakes_out() {
    with_metrics(false, |metrics| async move {
        let relay = Arc::new(
            start(Config {
                max_handshakes_in_flight: 1,
                ..config()
            })
            .await,
        );
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut flooders = Vec::new();
        for address in 20..24u8 {
            let (relay, stop) = (relay.clone(), stop.clone());
            flooders.push(tokio::spawn(async move {
                let mut sent = 0u32;
                // Eight connections in flight per address, at most 300 in all.
                while sent < 300 && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut batch = Vec::new();
                    for _ in 0..8 {
                        let mut stream = connect_from(&relay, loopback(address)).await;
                        write_frame(&mut stream, &bad_signature_init(&relay)).await;
                        batch.push(stream);
                        sent += 1;
                    }
                    for mut stream in batch {
                        assert!(read_until_closed(&mut stream, HANG).await.is_empty());
                    }
                }
                sent
            }));
        }
        for _ in 0..20 {
            let client = relay.client().await;
            client.ping().await.expect("served during the flood");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut flood = 0;
        for task in flooders {
            flood += task.await.unwrap();
        }
        assert_eq!(
            metrics.get(
                "botd_handshakes_total",
                &[("outcome", "failed"), ("reason", "bad_signature")]
            ),
            f64::from(flood)
        );
        assert_eq!(
            metrics.get("botd_handshakes_total", &[("outcome", "ok")]),
            20.0
        );
        assert_eq!(relay.stats().handshakes_waiting, 0);
        Arc::into_inner(relay).unwrap().stop().await;
    });
}

/// Polls `future` once: queued, not served.
fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
    let mut cx = Context::from_waker(Waker::noop());
    std::pin::Pin::new(future).poll(&mut cx)
}

/// The scheduler of handshake crypto, directly: with four addresses each queueing 25
/// handshakes, a handshake from a fifth address waits behind at most one of each.
#[tokio::test]
async fn crypto_turns_go_round_robin_by_address() {
    let slots = CryptoSlots::new(1);
    let first = slots.acquire(loopback(1)).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    let mut queue = |name: String, ip: IpAddr| {
        let (slots, tx) = (slots.clone(), tx.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = slots.acquire(ip).await;
            tx.send(name).unwrap();
            tokio::task::yield_now().await;
        }));
    };
    for flooder in 0..4u8 {
        for n in 0..25 {
            queue(format!("flood{flooder}.{n}"), loopback(20 + flooder));
            tokio::task::yield_now().await;
        }
    }
    queue("good".to_owned(), loopback(1));
    tokio::task::yield_now().await;
    assert_eq!(slots.waiting(), 101);
    drop(first);
    for task in tasks {
        timeout(HANG, task).await.unwrap().unwrap();
    }
    drop(tx);
    let mut order = Vec::new();
    while let Some(name) = rx.recv().await {
        order.push(name);
    }
    assert_eq!(order.len(), 101);
    let good = order.iter().position(|n| n == "good").unwrap();
    assert!(
        good <= 4,
        "the good handshake waited behind {good}: {order:?}"
    );
    // The flooders alternate: every run of four turns serves each of them once.
    let flood: Vec<&String> = order.iter().filter(|n| *n != "good").collect();
    for (turn, chunk) in flood.chunks(4).enumerate() {
        let mut seen: Vec<&str> = chunk.iter().map(|n| &n[..6]).collect();
        seen.sort();
        assert_eq!(
            seen,
            ["flood0", "flood1", "flood2", "flood3"],
            "turn {turn}"
        );
    }
    assert_eq!(slots.waiting(), 0);
}

/// A handshake that gives up (its deadline, an eviction) while waiting for crypto must not
/// take the slot with it: neither before the slot is handed to it, nor in the moment after
/// it was handed over and before it took it.
#[tokio::test]
async fn a_waiter_that_gives_up_does_not_lose_the_crypto_slot() {
    let slots = CryptoSlots::new(1);
    // Gives up before its turn: passed over.
    let holder = slots.acquire(loopback(1)).await;
    let mut gave_up = Box::pin(slots.acquire(loopback(2)));
    assert!(poll_once(&mut gave_up).is_pending());
    drop(gave_up);
    drop(holder);
    let holder = timeout(HANG, slots.acquire(loopback(3)))
        .await
        .expect("the slot is free");
    // Gives up right after the slot was handed to it.
    let mut gave_up = Box::pin(slots.acquire(loopback(2)));
    assert!(poll_once(&mut gave_up).is_pending());
    let mut next = Box::pin(slots.acquire(loopback(4)));
    assert!(poll_once(&mut next).is_pending());
    drop(holder); // hands the slot to `gave_up`
    drop(gave_up); // which is dropped before it ran: the slot goes on to `next`
    let permit = timeout(HANG, next).await.expect("the slot was passed on");
    drop(permit);
    let _again = timeout(HANG, slots.acquire(loopback(5)))
        .await
        .expect("and is free again afterwards");
}

/// Unauthenticated connections are counted per IPv4 address and per IPv6 /64 (IPv4-mapped
/// IPv6 as IPv4); the relay-wide cap evicts the oldest across groups.
#[test]
fn unauthenticated_caps_group_ipv6_by_64() {
    let admission = Admission::new(100, 2);
    let ip = |text: &str| -> IpAddr { text.parse().unwrap() };
    let _a = admission.admit(ip("2001:db8:1:2::1")).unwrap();
    let _b = admission.admit(ip("2001:db8:1:2:ffff::2")).unwrap();
    assert_eq!(
        admission.admit(ip("2001:db8:1:2:1234::3")).err(),
        Some(Refusal::PerAddress),
        "the third of one /64"
    );
    let _c = admission.admit(ip("2001:db8:1:3::1")).unwrap();
    let _d = admission.admit(ip("192.0.2.1")).unwrap();
    let _e = admission.admit(ip("::ffff:192.0.2.1")).unwrap();
    assert_eq!(
        admission.admit(ip("192.0.2.1")).err(),
        Some(Refusal::PerAddress),
        "IPv4-mapped counts as IPv4"
    );
    assert_eq!(admission.unauthenticated(), 5);
}

// ---------------------------------------------------------------------------------------------
// Bounded memory per connection and overall
// ---------------------------------------------------------------------------------------------

/// Announced length of the tricklers' frames: two fit in the 64 KiB budget, three do not.
const TRICKLED: u32 = 30_000;

/// Eight authenticated sessions announce 30 000-byte frames and trickle them a byte at a time.
/// The relay-wide budget (64 KiB) holds two of those frames, never more; the tricklers are
/// closed at `frame_timeout` (the ones still waiting for budget too); a good client is answered
/// throughout.
#[test]
fn trickled_frames_are_bounded_by_the_inbound_budget_and_closed_at_frame_timeout() {
    with_metrics(false, |metrics| async move {
        let frame_timeout = Duration::from_millis(600);
        let limit = 64 << 10;
        let relay = start(Config {
            max_frame_len: 32 << 10,
            max_payload_len: 16 << 10,
            max_inbound_buffer_bytes: limit,
            frame_timeout,
            ..test_config()
        })
        .await;
        let good = relay.client().await;
        let mut tricklers = Vec::new();
        for n in 0..8u8 {
            let mut peer = RawPeer::connect_over(&relay, socket_from(loopback(30 + n))).await;
            let started = Instant::now();
            peer.stream
                .write_all(&TRICKLED.to_be_bytes())
                .await
                .unwrap();
            let (read, mut write) = peer.stream.into_split();
            let trickle = tokio::spawn(async move {
                for _ in 0..200 {
                    if write.write_all(&[0]).await.is_err() {
                        return;
                    }
                    // The trickler's pace is the behaviour under test, in real time: the
                    // relay's timers and sockets are real here, and a paused clock would jump
                    // ahead of socket I/O in flight.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
            tricklers.push((started, read, trickle));
        }
        let two = 2 * (4 + TRICKLED as usize);
        wait_until("two frames hold the budget", HANG, || {
            relay.stats().inbound_buffer_bytes == two
        })
        .await;
        assert_eq!(metrics.get("botd_inbound_buffer_bytes", &[]), two as f64);
        // Small frames arrive whole and need no budget: the good client is served.
        for _ in 0..5 {
            let err = good.request(Body::Done(Done {})).await.unwrap_err();
            assert_eq!(err.code(), Some(ErrorCode::Unsupported));
        }
        for (started, mut read, trickle) in tricklers {
            let mut sink = Vec::new();
            let closed = timeout(
                HANG,
                tokio::io::AsyncReadExt::read_to_end(&mut read, &mut sink),
            )
            .await
            .expect("the trickler is closed");
            assert!(
                closed.is_err() || sink.is_empty(),
                "the relay answered a trickler"
            );
            assert!(
                started.elapsed() >= frame_timeout,
                "closed before frame_timeout"
            );
            trickle.abort();
        }
        wait_until("the budget is free", HANG, || {
            relay.stats().inbound_buffer_bytes == 0
        })
        .await;
        let stats = relay.stats();
        assert!(stats.inbound_buffer_peak <= limit, "{stats:?}");
        assert!(stats.inbound_buffer_peak >= two, "{stats:?}");
        assert_eq!(metrics.get("botd_inbound_buffer_bytes", &[]), 0.0);
        assert_eq!(
            metrics.get("botd_sessions_closed_total", &[("reason", "frame_timeout")]),
            8.0
        );
        good.ping().await.expect("still served");
        relay.stop().await;
    });
}

/// A peer with a small receive buffer that asks for 12.8 MB of answers (more than the kernel
/// buffers on both sides hold, whatever they grow to) and then stops reading.
async fn stalled_reader(relay: &Relay, ip: IpAddr) -> RawPeer {
    let socket = socket_from(ip);
    socket.set_recv_buffer_size(4096).unwrap();
    let mut peer = RawPeer::connect_over(relay, socket).await;
    peer.send(&Frame::new(1, Body::Register(registration(1, 0))))
        .await;
    assert!(matches!(
        peer.recv().await.unwrap().body,
        Some(Body::Registered(_))
    ));
    let me = *peer.identity.public();
    let message = botd_client::OutgoingMessage::new(me, 1, 1, vec![7u8; 64 << 10]);
    let request = message.sign(&peer.identity);
    peer.send(&Frame::new(2, Body::Send(request))).await;
    assert!(matches!(
        peer.recv().await.unwrap().body,
        Some(Body::Sent(_))
    ));
    // 200 answers of 64 KiB: more than the socket buffers on both sides hold.
    let mut wire = Vec::new();
    for id in 0..200 {
        wire.extend_from_slice(&peer.seal(&Frame::new(
            10 + id,
            Body::GetMessage(GetMessage {
                device_id: 1,
                message_id: 1,
            }),
        )));
    }
    peer.stream.write_all(&wire).await.unwrap();
    peer
}

/// The stalled reader's session is closed once a write has made no progress for
/// `write_timeout` (the kernel growing its send buffer counts as progress for a while, so this
/// takes a few seconds on loopback), and the connection is gone after the closing linger.
#[test]
fn a_peer_that_stops_reading_is_closed_at_write_timeout() {
    with_metrics(false, |metrics| async move {
        let (relay, _app) = start_relay(Config {
            write_timeout: Duration::from_millis(300),
            ..test_config()
        })
        .await;
        let _stalled = stalled_reader(&relay, loopback(40)).await;
        wait_until("the stalled session is gone", HANG, || {
            relay.stats().connections_open == 0
        })
        .await;
        assert_eq!(
            metrics.get("botd_sessions_closed_total", &[("reason", "write_timeout")]),
            1.0
        );
        relay.assert_serving().await;
        relay.stop().await;
    });
}

/// At shutdown a session that does not read is still gone within `write_timeout` (the bound on
/// flushing its last frames) plus the linger, even though the relay's grace period is over.
#[test]
fn at_shutdown_a_peer_that_stops_reading_is_gone_within_write_timeout_and_linger() {
    with_metrics(false, |metrics| async move {
        let (relay, _app) = start_relay(Config {
            write_timeout: Duration::from_millis(400),
            shutdown_grace: Duration::from_millis(100),
            ..test_config()
        })
        .await;
        let _stalled = stalled_reader(&relay, loopback(41)).await;
        // Shut down while the relay's writes to the stalled reader are blocked: it has written
        // more than one answer, then nothing for 10 polls (no event says the socket buffers
        // are full).
        let bytes_out = || metrics.get("botd_bytes_out_total", &[]);
        let at_least = bytes_out() + f64::from(64u32 << 10);
        let (mut last, mut still) = (0.0, 0);
        wait_until("the relay's writes are blocked", HANG, || {
            let now = bytes_out();
            still = if now == last { still + 1 } else { 0 };
            last = now;
            now > at_least && still >= 10
        })
        .await;
        assert_eq!(relay.stats().connections_open, 1);
        let handle = relay.handle.clone();
        relay.stop().await;
        wait_until("the stalled session is gone", HANG, || {
            handle.stats().connections_open == 0
        })
        .await;
    });
}
