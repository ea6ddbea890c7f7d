//! New messages on their way to the streams: publishes handed over in call order, written by
//! one task all at once (the connection then writes a wake-up's publishes in one go instead of
//! one system call each), and their acknowledgements matched without a request per publish.
//!
//! Every publish carries a reply subject under one inbox the relay subscribes to once; the
//! subject's last token is the publish's number, and the acknowledgements wait in a table in
//! number order. A publish costs one table slot and one channel to its caller, instead of the
//! client's per-request inbox, routing entry, two timers and a boxed future; the table is
//! swept for publishes left unanswered past `nats_request_timeout` (a lost connection, a
//! stream without a leader), which fail as timed out. Publishes and acknowledgements travel on
//! the feed's connection ([`super::feed`]) where there is one, else on the client's.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::{HeaderMap, StatusCode, Subject};
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::error::NatsError;
use super::feed::{Feed, Target};

/// What JetStream answered to a stored publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// The message's sequence in its stream (its id in the mailbox).
    pub sequence: u64,
    /// The message id was seen within the duplicate window: `sequence` is the first copy's.
    pub duplicate: bool,
}

/// The acknowledgement of a queued publish, once the stream answered (or the wait ran out).
pub type Sent = oneshot::Receiver<Result<Ack, NatsError>>;

/// How often the table is swept for publishes left unanswered.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// A publish waiting for the outbox's task.
struct Queued {
    subject: Subject,
    /// Its `Nats-Msg-Id`.
    message_id: String,
    body: Bytes,
    sent: oneshot::Sender<Result<Ack, NatsError>>,
    /// When its caller handed it over: the wait for a lost connection counts from here.
    queued_at: Instant,
}

/// A sent publish waiting for its acknowledgement.
struct Waiting {
    sent: oneshot::Sender<Result<Ack, NatsError>>,
    deadline: Instant,
}

/// Sent publishes by number: slot `i` is publish `first + i`. Acknowledgements of one stream
/// come in publish order and all publishes wait equally long, so answered slots leave from
/// the front and the sweep looks only at the front.
#[derive(Default)]
struct AckTable {
    first: u64,
    slots: VecDeque<Option<Waiting>>,
    /// Slots still waiting.
    waiting: usize,
}

impl AckTable {
    fn register(
        &mut self,
        sent: oneshot::Sender<Result<Ack, NatsError>>,
        deadline: Instant,
    ) -> u64 {
        let number = self.first + self.slots.len() as u64;
        self.slots.push_back(Some(Waiting { sent, deadline }));
        self.waiting += 1;
        number
    }

    /// The waiting publish `number`, taken out of the table (`None`: answered or swept).
    fn take(&mut self, number: u64) -> Option<Waiting> {
        let index = usize::try_from(number.checked_sub(self.first)?).ok()?;
        let waiting = self.slots.get_mut(index)?.take()?;
        self.waiting -= 1;
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.first += 1;
        }
        Some(waiting)
    }

    /// Publishes whose deadline passed, oldest first.
    fn expired(&mut self, now: Instant) -> Vec<Waiting> {
        let mut expired = Vec::new();
        while let Some(front) = self.slots.front() {
            match front {
                Some(waiting) if waiting.deadline > now => break,
                Some(_) => {
                    expired.extend(self.slots.pop_front().flatten());
                    self.waiting -= 1;
                }
                None => {
                    self.slots.pop_front();
                }
            }
            self.first += 1;
        }
        expired
    }
}

/// The headers of a new message's publish on the client's connection: its message id, by which
/// the stream recognises a retry (the feed writes the same header as bytes).
pub fn message_id_headers(message_id: String) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(NATS_MESSAGE_ID, message_id);
    headers
}

/// Reads an acknowledgement's body: `{"stream":…,"seq":N,"duplicate":true}` or
/// `{"error":{"code":…,"err_code":N,"description":…}}`.
pub fn read_ack(status: Option<StatusCode>, body: &[u8]) -> Result<Ack, NatsError> {
    #[derive(serde::Deserialize)]
    struct Body<'a> {
        #[serde(default)]
        seq: Option<u64>,
        #[serde(default)]
        duplicate: bool,
        #[serde(default, borrow)]
        error: Option<ApiError<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct ApiError<'a> {
        #[serde(default)]
        err_code: u64,
        #[serde(default, borrow)]
        description: std::borrow::Cow<'a, str>,
    }
    if status == Some(StatusCode::NO_RESPONDERS) {
        return Err(NatsError::NoResponders);
    }
    let body: Body =
        serde_json::from_slice(body).map_err(|err| NatsError::request(format!("ack: {err}")))?;
    match (body.error, body.seq) {
        (Some(error), _) => Err(NatsError::Api {
            code: error.err_code,
            description: error.description.into_owned(),
        }),
        (None, Some(sequence)) => Ok(Ack {
            sequence,
            duplicate: body.duplicate,
        }),
        (None, None) => Err(NatsError::request("ack without a sequence")),
    }
}

/// The queue, the table and the inbox their answers come to.
pub struct Outbox {
    queue: Mutex<Vec<Queued>>,
    wake: Notify,
    acks: Mutex<AckTable>,
    /// Signalled when a slot frees while the table is full.
    room: Notify,
    /// Reply subjects are this prefix and the publish's number.
    inbox: String,
    timeout: Duration,
    capacity: usize,
}

impl Outbox {
    /// An outbox whose answers come to `inbox.*`, waiting `timeout` for each and keeping at
    /// most `capacity` publishes unanswered.
    pub fn new(inbox: String, timeout: Duration, capacity: usize) -> Self {
        Self {
            queue: Mutex::new(Vec::new()),
            wake: Notify::new(),
            acks: Mutex::new(AckTable::default()),
            room: Notify::new(),
            inbox: format!("{inbox}."),
            timeout,
            capacity,
        }
    }

    /// Queues a publish with its message id (in call order, without waiting).
    pub fn enqueue(&self, subject: Subject, message_id: String, body: Bytes) -> Sent {
        let (sent, receiver) = oneshot::channel();
        self.queue.lock().push(Queued {
            subject,
            message_id,
            body,
            sent,
            queued_at: Instant::now(),
        });
        self.wake.notify_one();
        receiver
    }

    /// Publishes unanswered right now.
    #[cfg(test)]
    fn unanswered(&self) -> usize {
        self.acks.lock().waiting
    }

    /// Starts the task that sends what is queued and the one that sweeps the table (and reads
    /// the answers, unless they come on the live feed's connection, which hands each to
    /// [`Outbox::answer`]), until `stop`. `published` counts each publish.
    pub async fn run(
        self: &Arc<Self>,
        client: async_nats::Client,
        feed: Option<Arc<Feed>>,
        published: metrics::Counter,
        stop: CancellationToken,
    ) -> Result<(), NatsError> {
        let inbox = format!("{}*", self.inbox);
        let mut answers = match &feed {
            Some(feed) => {
                feed.subscribe(inbox, Target::Acks).await?;
                None
            }
            None => Some(client.subscribe(inbox).await.map_err(NatsError::request)?),
        };
        let outbox = self.clone();
        let stop_answers = stop.clone();
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(SWEEP_EVERY);
            sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let answer = async {
                    match answers.as_mut() {
                        Some(answers) => answers.next().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = stop_answers.cancelled() => return,
                    _ = sweep.tick() => outbox.sweep(Instant::now()),
                    answer = answer => match answer {
                        Some(answer) => outbox.answer(
                            answer.subject.as_bytes(),
                            answer.status,
                            &answer.payload,
                        ),
                        None => return,
                    },
                }
            }
        });
        let outbox = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = outbox.wake.notified() => {}
                }
                loop {
                    let queued = std::mem::take(&mut *outbox.queue.lock());
                    if queued.is_empty() {
                        break;
                    }
                    for publish in queued {
                        outbox
                            .send(&client, feed.as_deref(), publish, &published, &stop)
                            .await;
                    }
                }
            }
        });
        Ok(())
    }

    /// Sends one publish: on the feed's connection where there is one (its acknowledgement
    /// comes there too), else on the client's.
    async fn send(
        &self,
        client: &async_nats::Client,
        feed: Option<&Feed>,
        publish: Queued,
        published: &metrics::Counter,
        stop: &CancellationToken,
    ) {
        loop {
            // Registered before the wait, so a slot freed in between is not missed.
            let room = self.room.notified();
            if self.acks.lock().waiting < self.capacity {
                break;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = room => {}
            }
        }
        let number = self
            .acks
            .lock()
            .register(publish.sent, Instant::now() + self.timeout);
        published.increment(1);
        if let Some(feed) = feed {
            // A publish that meets the connection down (a node lost, 50 ms to a second before
            // the feed is on another) waits for the next one, as long as a request waits out a
            // lost node elsewhere, counted from when it was handed over: publishes queued
            // behind it do not wait in turn. Connected (the usual case), nothing is set up
            // to wait: no waiter is registered per publish.
            if !feed.connected() {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = feed.until_connected(publish.queued_at + self.timeout) => {}
                }
            }
            let sent = feed.publish(
                publish.subject.as_str(),
                &self.inbox,
                number,
                &publish.message_id,
                &publish.body,
            );
            if let Err(err) = sent {
                self.settle(number, Err(err));
            }
            return;
        }
        let reply = format!("{}{number}", self.inbox);
        let headers = message_id_headers(publish.message_id);
        if let Err(err) = client
            .publish_with_reply_and_headers(publish.subject, reply, headers, publish.body)
            .await
        {
            self.settle(number, Err(NatsError::request(err)));
        }
    }

    /// An answer to the publish its subject names (`<inbox>.<number>`).
    pub fn answer(&self, subject: &[u8], status: Option<StatusCode>, payload: &[u8]) {
        let Some(number) = subject
            .strip_prefix(self.inbox.as_bytes())
            .and_then(|n| std::str::from_utf8(n).ok())
            .and_then(|n| n.parse::<u64>().ok())
        else {
            return;
        };
        self.settle(number, read_ack(status, payload));
    }

    fn settle(&self, number: u64, outcome: Result<Ack, NatsError>) {
        let (waiting, was_full) = {
            let mut acks = self.acks.lock();
            let was_full = acks.waiting >= self.capacity;
            (acks.take(number), was_full)
        };
        if let Some(waiting) = waiting {
            let _ = waiting.sent.send(outcome);
            if was_full {
                self.room.notify_waiters();
            }
        }
    }

    fn sweep(&self, now: Instant) {
        let expired = self.acks.lock().expired(now);
        if expired.is_empty() {
            return;
        }
        for waiting in expired {
            let _ = waiting.sent.send(Err(NatsError::request(format!(
                "no acknowledgement within {:?}",
                self.timeout
            ))));
        }
        self.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting() -> (oneshot::Sender<Result<Ack, NatsError>>, Sent) {
        oneshot::channel()
    }

    #[test]
    fn answers_in_any_order_reach_their_publish_and_the_table_shrinks() {
        let mut table = AckTable::default();
        let now = Instant::now();
        let (a, mut a_rx) = waiting();
        let (b, mut b_rx) = waiting();
        let (c, _c_rx) = waiting();
        let na = table.register(a, now);
        let nb = table.register(b, now);
        let nc = table.register(c, now);
        assert_eq!((na, nb, nc), (0, 1, 2));
        table
            .take(nb)
            .unwrap()
            .sent
            .send(Ok(Ack {
                sequence: 7,
                duplicate: false,
            }))
            .unwrap();
        assert_eq!(
            table.slots.len(),
            3,
            "an answer behind a waiting one keeps its slot"
        );
        assert!(table.take(nb).is_none(), "answered once");
        assert!(a_rx.try_recv().is_err());
        assert_eq!(b_rx.try_recv().unwrap().unwrap().sequence, 7);
        table.take(na).unwrap();
        assert_eq!((table.first, table.slots.len(), table.waiting), (2, 1, 1));
        assert!(
            table.take(99).is_none() && table.take(0).is_none(),
            "unknown numbers"
        );
    }

    #[test]
    fn the_sweep_takes_only_what_waited_past_its_deadline() {
        let mut table = AckTable::default();
        let start = Instant::now();
        let (a, _a_rx) = waiting();
        let (b, _b_rx) = waiting();
        let (c, _c_rx) = waiting();
        table.register(a, start + Duration::from_secs(1));
        let nb = table.register(b, start + Duration::from_secs(2));
        table.register(c, start + Duration::from_secs(3));
        table.take(nb);
        assert!(table.expired(start).is_empty());
        assert_eq!(table.expired(start + Duration::from_millis(2500)).len(), 1);
        assert_eq!((table.first, table.waiting), (2, 1));
        assert_eq!(table.expired(start + Duration::from_secs(9)).len(), 1);
        assert_eq!((table.first, table.slots.len(), table.waiting), (3, 0, 0));
    }

    #[test]
    fn acknowledgements_and_refusals_are_read() {
        assert_eq!(
            read_ack(None, br#"{"stream":"M0","seq":42}"#).unwrap(),
            Ack {
                sequence: 42,
                duplicate: false
            }
        );
        assert_eq!(
            read_ack(None, br#"{"stream":"M0","seq":9,"duplicate":true}"#).unwrap(),
            Ack {
                sequence: 9,
                duplicate: true
            }
        );
        let refused = read_ack(
            None,
            br#"{"error":{"code":503,"err_code":10077,"description":"maximum messages per subject exceeded"}}"#,
        )
        .unwrap_err();
        assert_eq!(
            refused.code(),
            Some(super::super::error::code::MAX_MESSAGES_PER_SUBJECT)
        );
        assert!(matches!(
            read_ack(Some(StatusCode::NO_RESPONDERS), b""),
            Err(NatsError::NoResponders)
        ));
        assert!(read_ack(None, b"not json").is_err());
        assert!(read_ack(None, b"{}").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn unanswered_publishes_fail_after_the_timeout() {
        let outbox = Outbox::new("_INBOX.test".into(), Duration::from_secs(5), 16);
        let (tx, rx) = waiting();
        let number = outbox
            .acks
            .lock()
            .register(tx, Instant::now() + outbox.timeout);
        assert_eq!(outbox.unanswered(), 1);
        tokio::time::advance(Duration::from_secs(4)).await;
        outbox.sweep(Instant::now());
        assert_eq!(outbox.unanswered(), 1, "still within the timeout");
        tokio::time::advance(Duration::from_secs(2)).await;
        outbox.sweep(Instant::now());
        let err = rx.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("no acknowledgement"), "{err}");
        assert_eq!(outbox.unanswered(), 0);
        outbox.settle(
            number,
            Ok(Ack {
                sequence: 1,
                duplicate: false,
            }),
        );
        assert_eq!(outbox.unanswered(), 0, "a late answer finds nothing");
    }
}
