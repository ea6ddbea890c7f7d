//! Durability exactly as documented, on a relay over a durable store whose journal the test can
//! hold back (`Journal::hold_writes`: the disk "stalls", nothing new becomes durable):
//!
//! * under every fsync policy, an answer reporting a change leaves only once its record is
//!   written (and, under `always`, synced): when `Sent` arrives, the journal file holds the
//!   message;
//! * nothing not yet durable is visible to a recipient: not to `GetMessage`, not in
//!   `Subscribed.last_id`, not as a `Deliver`, and an `AckMessages` cannot delete it;
//! * past `journal_max_pending_bytes` the journal is congested: sessions stop taking requests
//!   (the buffer stops growing) and nothing is refused or lost, while the relay itself is not
//!   blocked (new handshakes complete on this single-threaded runtime);
//! * a torn tail of several records in the last group-commit write is cut off and logged by
//!   the real start path;
//! * the store gauges are current between sweeps.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use botd_client::Client;
use botd_protocol::keys::KeyPair;
use botd_protocol::proto::{self, ErrorCode, Frame};
use botd_relay::config::{Config, FsyncPolicy};
use botd_relay::store::embedded::journal::{Journal, JOURNAL_MAGIC, READABLE_VERSIONS};
use botd_relay::store::embedded::record::{Next, RecordReader};
use botd_relay::store::embedded::{EmbeddedStore, State};
use botd_relay::store::proto::event::Kind;
use botd_relay::store::{Identity, Registration};
use bytes::Bytes;
use common::*;
use prost::Message;
use tokio::time::timeout;

fn durable_config(fsync: FsyncPolicy) -> Config {
    Config {
        fsync,
        store_shards: 4,
        ..test_config()
    }
}

fn journal(store: &EmbeddedStore) -> Arc<Journal> {
    store.journal().expect("a durable store").clone()
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir.join("journal"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    found.sort();
    found
}

/// The message ids of `recipient`'s stored messages found in the journal files (as far as
/// they are written).
fn journaled_messages(dir: &Path, recipient: &Identity) -> Vec<u64> {
    let mut ids = Vec::new();
    for path in segments(dir) {
        let data = std::fs::read(&path).unwrap();
        let Ok(mut reader) =
            RecordReader::new(&path, &data, JOURNAL_MAGIC, READABLE_VERSIONS, "journal")
        else {
            continue;
        };
        while let Next::Record { body, .. } = reader.next_record() {
            if body[..8] == [0; 8] {
                continue; // a batch marker
            }
            let event = botd_relay::store::proto::Event::decode(&body[8..]).unwrap();
            if let Some(Kind::MessageStored(stored)) = event.kind {
                if stored.recipient[..] == recipient[..] {
                    ids.push(stored.message_id);
                }
            }
        }
    }
    ids
}

/// A push `client` has already received, after a round trip of its own (pushes sent before the
/// answer have arrived by then).
async fn pushes_so_far(client: &mut Client) -> Vec<Frame> {
    client.prekey_count(1).await.unwrap();
    let mut frames = Vec::new();
    while let Ok(Some(frame)) = timeout(Duration::ZERO, client.next_push()).await {
        frames.push(frame);
    }
    frames
}

async fn visibility_under(fsync: FsyncPolicy) {
    let dir = TempDir::new("visibility");
    let (relay, _app, store) = start_durable_relay(durable_config(fsync), &dir).await;
    let alice = registered(&relay, 0).await;
    let bob_key = Arc::new(KeyPair::generate());
    let mut bob = relay.client_as(bob_key.clone()).await;
    bob.register(registration(1, 0)).await.unwrap();
    bob.register(registration(2, 0)).await.unwrap();
    assert_eq!(bob.subscribe(1, 0).await.unwrap().last_id, 0);
    let mut bob_elsewhere = relay.client_as(bob_key.clone()).await;
    let bob_acking = relay.client_as(bob_key).await;
    let bob_id = *bob.identity().as_bytes();

    let journal = journal(&store);
    let held = journal.hold_writes();
    let before = journal.last_lsn();
    let alice = Arc::new(alice);
    let sends: Vec<_> = [1u32, 2]
        .into_iter()
        .map(|device| {
            let (alice, outgoing) = (alice.clone(), to_device(&bob, device, &b"not yet"[..]));
            tokio::spawn(async move { alice.send_message(outgoing).await })
        })
        .collect();
    // Both messages are applied in memory and recorded, not written.
    wait_until("both sends are recorded", HANG, || {
        journal.last_lsn() >= before + 2
    })
    .await;

    assert_eq!(
        bob_elsewhere.get_message(1, 1).await.unwrap_err().code(),
        Some(ErrorCode::NotFound),
        "GetMessage shows a message that is not durable"
    );
    let subscribed = bob_elsewhere.subscribe(2, 0).await.unwrap();
    assert_eq!(subscribed.last_id, 0, "Subscribed.last_id counts it");
    assert!(pushes_so_far(&mut bob).await.is_empty(), "pushed too early");
    assert!(pushes_so_far(&mut bob_elsewhere).await.is_empty());
    // An ack reports the state it leaves, so its answer waits for the disk too; but it must
    // not delete what nobody could have received.
    // A send of bob's own follows the ack in the same session: once its record is in the
    // journal's buffer, the ack has been applied.
    let marker = to(&alice, &b"after the ack"[..]);
    let ack = tokio::spawn(async move {
        let (acked, sent) =
            tokio::join!(bob_acking.ack(2, vec![1]), bob_acking.send_message(marker));
        sent.unwrap();
        acked
    });
    wait_until("the ack is applied", HANG, || {
        journal.last_lsn() >= before + 3
    })
    .await;
    assert!(
        sends.iter().all(|send| !send.is_finished()),
        "answered too early"
    );
    assert!(journaled_messages(dir.path(), &bob_id).is_empty());

    drop(held);
    let acked = timeout(HANG, ack).await.unwrap().unwrap().unwrap();
    assert_eq!(
        acked.deleted, 0,
        "an ack deleted a message that was not durable"
    );
    for send in sends {
        let sent = timeout(HANG, send).await.unwrap().unwrap().unwrap();
        assert_eq!(sent.message_id, 1);
    }
    // By the time the answers left, the records were in the file.
    assert_eq!(journaled_messages(dir.path(), &bob_id), [1, 1]);
    assert_eq!(next_deliver(&mut bob).await.message_id, 1);
    let deliver = next_deliver(&mut bob_elsewhere).await;
    assert_eq!((deliver.recipient_device, deliver.message_id), (2, 1));
    assert_eq!(
        &bob.get_message(1, 1).await.unwrap().payload[..],
        b"not yet"
    );
    relay.stop().await;
    store.journal().unwrap().shutdown();
}

#[tokio::test]
async fn nothing_unwritten_is_visible_or_answered_under_fsync_always() {
    visibility_under(FsyncPolicy::Always).await;
}

#[tokio::test]
async fn nothing_unwritten_is_visible_or_answered_under_fsync_interval() {
    visibility_under(FsyncPolicy::Interval).await;
}

#[tokio::test]
async fn nothing_unwritten_is_visible_or_answered_under_fsync_never() {
    visibility_under(FsyncPolicy::Never).await;
}

/// With the disk stalled, a sender's session fills the journal's buffer past
/// `journal_max_pending_bytes` and then stops taking requests; the relay goes on accepting
/// handshakes; once the disk catches up every request is answered, in order, nothing refused.
#[test]
fn journal_congestion_makes_sessions_wait_without_blocking_the_relay() {
    with_metrics(false, |metrics| async move {
        let dir = TempDir::new("congestion");
        let (relay, app, store) = start_durable_relay(
            Config {
                journal_max_pending_bytes: 64 << 10,
                ..durable_config(FsyncPolicy::Never)
            },
            &dir,
        )
        .await;
        let background = tokio_util::sync::CancellationToken::new();
        tokio::spawn(app.clone().run_maintenance(background.clone()));
        let alice = Arc::new(registered(&relay, 0).await);
        let bob = registered(&relay, 0).await;

        let journal = journal(&store);
        let held = journal.hold_writes();
        let send = |n: u8| {
            let (alice, outgoing) = (alice.clone(), to(&bob, vec![n; 16 << 10]));
            tokio::spawn(async move { alice.send_message(outgoing).await })
        };
        let mut first_wave: Vec<_> = (0..8).map(send).collect();
        wait_until("the journal is congested", HANG, || journal.congested()).await;
        wait_until("the pending-bytes gauge shows it", HANG, || {
            metrics.get("botd_journal_pending_bytes", &[]) >= f64::from(64u32 << 10)
        })
        .await;
        // The session counts the congestion once it has dispatched all it read and stops
        // taking requests: from then on the first wave is settled.
        wait_until("the session waits for the journal", HANG, || {
            metrics.get("botd_journal_backpressure_total", &[]) >= 1.0
        })
        .await;
        let pending = journal.pending_bytes();
        let second_wave: Vec<_> = (8..16).map(send).collect();
        // The relay is not blocked: a new peer completes its handshake meanwhile.
        let newcomer = relay.client().await;
        // What must not happen (the session taking the second wave) has no event to wait for:
        // watch for it for QUIET.
        tokio::time::sleep(QUIET).await;
        assert_eq!(
            journal.pending_bytes(),
            pending,
            "requests taken while congested"
        );
        assert!(first_wave
            .iter()
            .chain(&second_wave)
            .all(|t| !t.is_finished()));
        assert!(metrics.get("botd_journal_backpressure_total", &[]) >= 1.0);

        drop(held);
        first_wave.extend(second_wave);
        let mut ids = Vec::new();
        for send in first_wave {
            ids.push(
                timeout(HANG, send)
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap()
                    .message_id,
            );
        }
        ids.sort_unstable();
        assert_eq!(
            ids,
            (1..=16).collect::<Vec<u64>>(),
            "every send stored once"
        );
        newcomer.ping().await.unwrap();
        wait_until("the buffer drained", HANG, || !journal.congested()).await;
        wait_until("the pending-bytes gauge follows it down", HANG, || {
            metrics.get("botd_journal_pending_bytes", &[]) < f64::from(64u32 << 10)
        })
        .await;
        background.cancel();
        relay.stop().await;
        store.journal().unwrap().shutdown();
    });
}

/// Writes that are in the buffer while the writer is held go out in one write behind one batch
/// marker; a crash that tears that write after its second record leaves a torn tail of several
/// records, which the next start cuts off and logs, keeping everything before it.
#[test]
fn a_torn_tail_of_several_records_is_cut_off_and_logged_at_start() {
    let dir = TempDir::new("torn");
    let config = Config {
        data_dir: dir.path().to_owned(),
        ..durable_config(FsyncPolicy::Always)
    };
    let register = |store: &EmbeddedStore, who: &Identity| {
        store
            .state()
            .register(who, registration_of(who), 1)
            .unwrap();
    };
    let ids: Vec<Identity> = (0..12)
        .map(|_| *KeyPair::generate().public().as_bytes())
        .collect();
    let (kept, lost) = ids.split_at(4);
    let (segment, tail_start) = {
        let (store, _) = EmbeddedStore::open(&config, 1).unwrap();
        let journal = journal(&store);
        for who in kept {
            register(&store, who);
        }
        wait_durable(&journal, journal.last_lsn());
        let segment = segments(dir.path()).pop().unwrap();
        let tail_start = std::fs::metadata(&segment).unwrap().len();
        let held = journal.hold_writes();
        for who in lost {
            register(&store, who);
        }
        drop(held);
        wait_durable(&journal, journal.last_lsn());
        journal.shutdown();
        (segment, tail_start)
    };
    // The last write: a marker and eight records. Tear it inside its second record.
    let data = std::fs::read(&segment).unwrap();
    let mut reader =
        RecordReader::new(&segment, &data, JOURNAL_MAGIC, READABLE_VERSIONS, "journal").unwrap();
    let mut starts = Vec::new();
    while let Next::Record { offset, .. } = reader.next_record() {
        if offset >= tail_start {
            starts.push(offset);
        }
    }
    assert_eq!(
        starts.len(),
        1 + lost.len(),
        "one write: a marker and its records"
    );
    let tear = starts[2] + 10;
    std::fs::write(&segment, &data[..tear as usize]).unwrap();

    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer({
            let log = log.clone();
            move || Capture(log.clone())
        })
        .finish();
    let (store, report) =
        tracing::subscriber::with_default(subscriber, || EmbeddedStore::open(&config, 1)).unwrap();
    // The marker and the first record of the write survive; the rest is cut off.
    let (path, offset, cut) = report.torn_tail.clone().expect("a torn tail");
    assert_eq!(
        (path, offset, cut),
        (segment.clone(), starts[2], tear - starts[2])
    );
    let log = String::from_utf8(log.lock().unwrap().clone()).unwrap();
    assert!(
        log.contains("torn write") && log.contains(&format!("offset={}", starts[2])),
        "not logged: {log}"
    );
    // Exactly what the first five registrations make.
    let expected = State::new(&config, None);
    for who in &ids[..kept.len() + 1] {
        let registration = registration_of(who);
        expected.register(who, registration, 1).unwrap();
    }
    assert_eq!(store.canonical_state(), expected.canonical_state());
    journal(&store).shutdown();
}

fn registration_of(_who: &Identity) -> Registration {
    Registration {
        device: 1,
        registration_id: 1,
        identity_key: Bytes::from_static(&[5; 33]),
        signed_prekey: proto::SignedPreKey {
            id: 1,
            public_key: Bytes::from_static(&[6; 33]),
            signature: Bytes::from_static(&[7; 64]),
        },
        one_time_prekeys: Vec::new(),
    }
}

struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The maintenance task refreshes the store gauges every second: they follow sends, acks and
/// unregistrations without waiting for the (here hourly) sweep.
#[test]
fn store_gauges_are_current_between_sweeps() {
    with_metrics(false, |metrics| async move {
        let (relay, app) = start_relay(Config {
            expiry_interval: Duration::from_secs(3600),
            ..test_config()
        })
        .await;
        let background = tokio_util::sync::CancellationToken::new();
        tokio::spawn(app.clone().run_maintenance(background.clone()));
        let alice = registered(&relay, 0).await;
        let bob = registered(&relay, 0).await;
        let mut ids = Vec::new();
        for n in 0..3u8 {
            ids.push(
                alice
                    .send_message(to(&bob, vec![n; 100]))
                    .await
                    .unwrap()
                    .message_id,
            );
        }
        let gauges = |messages: f64, bytes: f64, identities: f64| {
            let metrics = metrics.clone();
            move || {
                metrics.get("botd_mailbox_messages", &[]) == messages
                    && metrics.get("botd_mailbox_bytes", &[]) == bytes
                    && metrics.get("botd_identities", &[]) == identities
            }
        };
        wait_until(
            "3 messages, 300 bytes, 2 identities",
            HANG,
            gauges(3.0, 300.0, 2.0),
        )
        .await;
        bob.ack(1, vec![ids[0]]).await.unwrap();
        wait_until("2 messages after an ack", HANG, gauges(2.0, 200.0, 2.0)).await;
        bob.unregister(1).await.unwrap();
        wait_until("bob's account gone", HANG, gauges(0.0, 0.0, 1.0)).await;
        background.cancel();
        relay.stop().await;
    });
}

/// A request flood in one session: with the disk stalled, a session that pipelines 40 sends
/// has `max_pipelined_requests` of them started and reads no further (the rest wait unread in
/// the socket). Waiting on the relay's own disk is not a trickled frame: the session outlives
/// `frame_timeout` meanwhile, and once the disk catches up every send is answered.
#[tokio::test]
async fn a_pipelined_flood_starts_at_most_max_pipelined_requests() {
    let dir = TempDir::new("pipeline");
    let frame_timeout = Duration::from_millis(300);
    let (relay, _app, store) = start_durable_relay(
        Config {
            max_pipelined_requests: 8,
            frame_timeout,
            ..durable_config(FsyncPolicy::Always)
        },
        &dir,
    )
    .await;
    let alice = Arc::new(registered(&relay, 0).await);
    let bob = registered(&relay, 0).await;

    let journal = journal(&store);
    let held = journal.hold_writes();
    let before = journal.last_lsn();
    let sends: Vec<_> = (0..40u8)
        .map(|n| {
            let (alice, outgoing) = (alice.clone(), to(&bob, vec![n; 10]));
            tokio::spawn(async move { alice.send_message(outgoing).await })
        })
        .collect();
    wait_until("8 sends are recorded", HANG, || {
        journal.last_lsn() >= before + 8
    })
    .await;
    // Time is the subject: with tokio's clock paused, it jumps from timer to timer whenever
    // the relay is idle, past frame_timeout; the rest stay unread, and the session stays open.
    // The clock runs again before the disk is released (paused, it would run ahead of the
    // journal's thread).
    tokio::time::pause();
    tokio::time::sleep(2 * frame_timeout).await;
    assert_eq!(
        journal.last_lsn(),
        before + 8,
        "more than 8 requests started"
    );
    assert!(sends.iter().all(|send| !send.is_finished()));
    tokio::time::resume();

    drop(held);
    let mut ids = Vec::new();
    for send in sends {
        let sent = timeout(HANG, send).await.unwrap().unwrap();
        ids.push(sent.expect("answered, not closed").message_id);
    }
    ids.sort_unstable();
    assert_eq!(ids, (1..=40).collect::<Vec<u64>>());
    relay.stop().await;
    store.journal().unwrap().shutdown();
}
