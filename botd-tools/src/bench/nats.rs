//! The `relay` scenario against NATS core pub/sub and NATS JetStream, through `async-nats`,
//! with the same pairing, window, payload stamp and accounting as against a relay.
//!
//! * Core: publisher i publishes on `bench.<run>.<i mod R>`; subscriber j subscribes to
//!   `bench.<run>.<j>`. A publisher keeps at most W messages not yet received by its subscriber.
//! * JetStream: one file-backed stream (one replica, work-queue retention, so that an acked
//!   message is removed, as a relay mailbox does) over `bench.<run>.>`; publishers await publish
//!   acks with at most W outstanding (and at most W messages not yet received); each subscriber
//!   has a durable pull consumer on its own subject that acks every message explicitly.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::{Client, ConnectOptions, Subject};
use bytes::BytesMut;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use tokio::time::{sleep, timeout, Instant};

use super::load::{receiver_of, wait_until, Pacer, PayloadTemplate, Phases, Shared, Stamp, Tally};
use super::scenario::{
    count_error, orchestrate, LoadParams, Outcome, ReceiverReport, SenderReport, Task,
};

/// Messages published in one go before the publisher looks at its window again.
const MAX_SEND_BATCH: u64 = 256;
/// Messages taken from a subscription before the counters are updated.
const MAX_RECEIVE_BATCH: usize = 1024;
/// How often an idle subscriber looks at the shared "done" flag.
const RECEIVER_TICK: Duration = Duration::from_millis(50);

async fn connect(addr: &str, limit: Duration) -> Result<Client, String> {
    let url = format!("nats://{addr}");
    let connecting = ConnectOptions::new()
        .connection_timeout(limit)
        .subscription_capacity(1 << 17)
        .connect(url.as_str());
    match timeout(limit, connecting).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(err)) => Err(format!("connect to {url}: {err}")),
        Err(_) => Err(format!("no connection to {url} within {limit:?}")),
    }
}

/// A short random name for this run's subjects, stream and consumers.
fn run_id() -> String {
    hex::encode(rand::random::<[u8; 6]>())
}

fn subject(run: &str, receiver: usize) -> Subject {
    Subject::from(format!("bench.{run}.{receiver}"))
}

fn pacers(params: &LoadParams, start: Instant) -> Vec<Pacer> {
    (0..params.senders)
        .map(|index| params.pacer(start, index))
        .collect()
}

fn payload(template: &PayloadTemplate, stamp: &Stamp) -> bytes::Bytes {
    let mut buf = BytesMut::with_capacity(template.len());
    template.write(stamp, &mut buf);
    buf.freeze()
}

/// Starts the run's clock and one task per publisher, each with its pacer, sending to its
/// receiver's subject.
fn start_senders<P, Fut>(
    publishers: Vec<P>,
    params: &LoadParams,
    run: &str,
    template: &Arc<PayloadTemplate>,
    publish: fn(usize, P, Subject, Pacer, Arc<Shared>, Arc<PayloadTemplate>) -> Fut,
) -> (Arc<Shared>, Vec<Task<SenderReport>>)
where
    P: Send + 'static,
    Fut: std::future::Future<Output = Result<SenderReport, String>> + Send + 'static,
{
    let start = Instant::now();
    let shared = Shared::new(
        params.senders,
        Phases::new(start, params.warmup, params.duration, params.drain),
    );
    let tasks = publishers
        .into_iter()
        .enumerate()
        .zip(pacers(params, start))
        .map(|((index, publisher), pacer)| {
            let subject = subject(run, receiver_of(index, params.receivers));
            tokio::spawn(publish(
                index,
                publisher,
                subject,
                pacer,
                shared.clone(),
                template.clone(),
            ))
        })
        .collect();
    (shared, tasks)
}

/// NATS core pub/sub.
pub async fn run_core(params: &LoadParams, addr: &str, title: &str) -> Result<Outcome, String> {
    params.check()?;
    let template = Arc::new(PayloadTemplate::new(params.payload)?);
    let run = run_id();
    let limit = params.connect_timeout;
    let mut subscribers = Vec::new();
    for receiver in 0..params.receivers {
        let client = connect(addr, limit).await?;
        let subscription = client
            .subscribe(subject(&run, receiver))
            .await
            .map_err(|err| format!("subscribe: {err}"))?;
        // The server has the subscription once the flush's PING is answered.
        timeout(limit, client.flush())
            .await
            .map_err(|_| "no flush answer from the NATS server".to_owned())?
            .map_err(|err| format!("flush: {err}"))?;
        subscribers.push((client, subscription));
    }
    let mut publishers = Vec::new();
    for _ in 0..params.senders {
        publishers.push(connect(addr, limit).await?);
    }

    let (shared, sender_tasks) = start_senders(publishers, params, &run, &template, core_publisher);
    let mut receiver_tasks = Vec::new();
    for (client, subscription) in subscribers {
        let shared = shared.clone();
        let senders = params.senders;
        receiver_tasks.push(tokio::spawn(async move {
            let stream = subscription.map(Ok::<_, String>);
            let report = receive(stream, shared, senders, |_| async { Ok(()) }).await;
            drop(client);
            report
        }));
    }
    Ok(orchestrate(shared, params, title, sender_tasks, receiver_tasks).await)
}

async fn core_publisher(
    index: usize,
    client: Client,
    subject: Subject,
    pacer: Pacer,
    shared: Arc<Shared>,
    template: Arc<PayloadTemplate>,
) -> Result<SenderReport, String> {
    let pair = &shared.pairs[index];
    let phases = shared.phases;
    let mut seq = 0u64;
    loop {
        let now = Instant::now();
        if now >= phases.measure_end {
            break;
        }
        let received = pair.received.load(Ordering::Acquire);
        let budget = pacer.budget(seq, 0, received, now);
        let batch = budget.min(MAX_SEND_BATCH);
        for _ in 0..batch {
            let stamp = Stamp {
                sender: index as u32,
                seq,
                intended_ns: phases.ns_since_epoch(pacer.intended(seq, now)),
            };
            client
                .publish(subject.clone(), payload(&template, &stamp))
                .await
                .map_err(|err| format!("publish: {err}"))?;
            seq += 1;
        }
        shared.progress.sent.fetch_add(batch, Ordering::Relaxed);
        if batch > 0 {
            continue;
        }
        let room = pacer.room(seq, 0, pair.received.load(Ordering::Acquire));
        let wake_at = pacer.wake_at(seq, room, phases.measure_end);
        tokio::select! {
            _ = pair.notify.notified(), if room == 0 => {}
            _ = wait_until(pair, wake_at) => {}
        }
    }
    match timeout(
        phases.deadline.saturating_duration_since(Instant::now()),
        client.flush(),
    )
    .await
    {
        Ok(Ok(())) => Ok(SenderReport {
            sent_ok: seq,
            ..SenderReport::default()
        }),
        Ok(Err(err)) => Err(format!("flush: {err}")),
        Err(_) => Err("no flush answer from the NATS server by the deadline".into()),
    }
}

/// A message with a payload, of either kind.
trait Payload {
    fn payload(&self) -> &[u8];
}

impl Payload for async_nats::Message {
    fn payload(&self) -> &[u8] {
        &self.payload
    }
}

impl Payload for jetstream::Message {
    fn payload(&self) -> &[u8] {
        &self.message.payload
    }
}

/// A subscriber's loop for both kinds: records each message of `messages`, then hands it to
/// `after_each` (a JetStream ack), until the run is done.
async fn receive<S, T, F, Fut>(
    mut messages: S,
    shared: Arc<Shared>,
    senders: usize,
    mut after_each: F,
) -> Result<ReceiverReport, String>
where
    S: futures_util::Stream<Item = Result<T, String>> + Unpin,
    T: Payload,
    F: FnMut(T) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let phases = shared.phases;
    let mut tally = Tally::new(senders);
    let mut errors = BTreeMap::new();
    let mut per_sender = vec![0u64; senders];
    let give_up = phases.deadline + Duration::from_secs(2);
    while !shared.progress.is_done() {
        if Instant::now() >= give_up {
            return Err("still receiving at the deadline".into());
        }
        let mut next = tokio::select! {
            message = messages.next() => message,
            _ = shared.progress.wake.notified() => continue,
            _ = sleep(RECEIVER_TICK) => continue,
        };
        let mut taken = 0;
        let now = Instant::now();
        loop {
            match next {
                None => return Err("the subscription ended".into()),
                Some(Ok(message)) => {
                    if let Some(sender) = tally.record(message.payload(), now, &phases) {
                        per_sender[sender] += 1;
                    }
                    after_each(message).await?;
                }
                Some(Err(err)) => {
                    count_error(&mut errors, err);
                    shared.progress.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            taken += 1;
            if taken >= MAX_RECEIVE_BATCH {
                break;
            }
            match messages.next().now_or_never() {
                Some(message) => next = message,
                None => break,
            }
        }
        let mut delivered = 0;
        for (sender, count) in per_sender.iter_mut().enumerate() {
            if *count > 0 {
                shared.pairs[sender].add_received(*count);
                delivered += *count;
                *count = 0;
            }
        }
        shared
            .progress
            .delivered
            .fetch_add(delivered, Ordering::Relaxed);
    }
    Ok(ReceiverReport { tally, errors })
}

/// NATS JetStream: a file-backed stream, publish acks, durable pull consumers with acks.
pub async fn run_jetstream(
    params: &LoadParams,
    addr: &str,
    title: &str,
    replicas: usize,
) -> Result<Outcome, String> {
    params.check()?;
    let template = Arc::new(PayloadTemplate::new(params.payload)?);
    let run = run_id();
    let limit = params.connect_timeout;
    let admin = connect(addr, limit).await?;
    let admin_js = jetstream::new(admin.clone());
    let stream_name = format!("BENCH_{run}");
    admin_js
        .create_stream(stream::Config {
            name: stream_name.clone(),
            subjects: vec![format!("bench.{run}.>")],
            storage: stream::StorageType::File,
            num_replicas: replicas.max(1),
            retention: stream::RetentionPolicy::WorkQueue,
            // One consumer per receiver. nats-server 2.15 limits a stream that names no limit
            // to 1,000 consumers, and takes any value not above zero for "its default".
            max_consumers: i32::try_from(params.receivers).unwrap_or(i32::MAX).max(1),
            ..Default::default()
        })
        .await
        .map_err(|err| {
            format!("create stream {stream_name} (is JetStream enabled, -js?): {err}")
        })?;
    let outcome = jetstream_inner(params, addr, title, &run, &stream_name, template).await;
    if let Err(err) = admin_js.delete_stream(&stream_name).await {
        eprintln!("botd bench: could not delete stream {stream_name}: {err}");
    }
    outcome
}

async fn jetstream_inner(
    params: &LoadParams,
    addr: &str,
    title: &str,
    run: &str,
    stream_name: &str,
    template: Arc<PayloadTemplate>,
) -> Result<Outcome, String> {
    let limit = params.connect_timeout;
    let senders_per_receiver = params.senders.div_ceil(params.receivers) as u64;
    let batch = (params.window * senders_per_receiver).clamp(64, 4096) as usize;
    let mut consumers = Vec::new();
    for receiver in 0..params.receivers {
        let client = connect(addr, limit).await?;
        let js = jetstream::new(client.clone());
        let stream = js
            .get_stream(stream_name)
            .await
            .map_err(|err| format!("get stream: {err}"))?;
        let consumer: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(format!("bench{receiver}")),
                filter_subject: subject(run, receiver).to_string(),
                ack_policy: consumer::AckPolicy::Explicit,
                max_ack_pending: (batch as i64 * 4).max(1000),
                ..Default::default()
            })
            .await
            .map_err(|err| format!("create consumer: {err}"))?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(batch)
            .messages()
            .await
            .map_err(|err| format!("consumer messages: {err}"))?;
        consumers.push((client, messages));
    }
    let mut publishers = Vec::new();
    for _ in 0..params.senders {
        let client = connect(addr, limit).await?;
        let js = jetstream::context::ContextBuilder::new()
            .max_ack_inflight(params.window as usize + 1)
            .backpressure_on_inflight(true)
            .timeout(params.drain.max(Duration::from_secs(5)))
            .build(client);
        publishers.push(js);
    }

    let (shared, sender_tasks) = start_senders(publishers, params, run, &template, js_publisher);
    let mut receiver_tasks = Vec::new();
    for (client, messages) in consumers {
        let shared = shared.clone();
        let senders = params.senders;
        receiver_tasks.push(tokio::spawn(async move {
            // Each message is acked right after it is recorded: the ack is a publish to the
            // message's reply subject on the consumer's connection (no double ack).
            let stream = messages.map(|message| message.map_err(|err| format!("consumer: {err}")));
            let report = receive(
                stream,
                shared,
                senders,
                |message: jetstream::Message| async move {
                    message.ack().await.map_err(|err| format!("ack: {err}"))
                },
            )
            .await;
            let _ = timeout(Duration::from_secs(5), client.flush()).await;
            report
        }));
    }
    Ok(orchestrate(shared, params, title, sender_tasks, receiver_tasks).await)
}

async fn js_publisher(
    index: usize,
    js: jetstream::Context,
    subject: Subject,
    pacer: Pacer,
    shared: Arc<Shared>,
    template: Arc<PayloadTemplate>,
) -> Result<SenderReport, String> {
    let pair = &shared.pairs[index];
    let phases = shared.phases;
    let window = pacer.window as usize;
    let mut report = SenderReport::default();
    let mut seq = 0u64;
    let mut acks = FuturesOrdered::new();
    loop {
        let now = Instant::now();
        let stopping = now >= phases.measure_end;
        if !stopping {
            let received = pair.received.load(Ordering::Acquire);
            let budget = pacer
                .budget(seq, report.failed, received, now)
                .min(window.saturating_sub(acks.len()) as u64);
            let batch = budget.min(MAX_SEND_BATCH);
            for _ in 0..batch {
                let stamp = Stamp {
                    sender: index as u32,
                    seq,
                    intended_ns: phases.ns_since_epoch(pacer.intended(seq, now)),
                };
                seq += 1;
                match js
                    .publish(subject.clone(), payload(&template, &stamp))
                    .await
                {
                    Ok(ack) => acks.push_back(std::future::IntoFuture::into_future(ack)),
                    Err(err) => {
                        report.failed += 1;
                        count_error(&mut report.errors, format!("publish: {:?}", err.kind()));
                        shared.progress.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            shared.progress.sent.fetch_add(batch, Ordering::Relaxed);
            if batch > 0 && budget > batch {
                continue;
            }
        }
        if stopping && acks.is_empty() {
            return Ok(report);
        }
        if now >= phases.deadline {
            return Err(format!(
                "{} publish acks still outstanding at the deadline",
                acks.len()
            ));
        }
        let room = pacer.room(seq, report.failed, pair.received.load(Ordering::Acquire));
        let window_full = !stopping && room == 0;
        let wake_at = if stopping {
            phases.deadline
        } else if acks.len() >= window {
            // An ack frees a place; the acks branch wakes us.
            phases.measure_end
        } else {
            pacer.wake_at(seq, room, phases.measure_end)
        };
        tokio::select! {
            Some(ack) = acks.next(), if !acks.is_empty() => match ack {
                Ok(_) => report.sent_ok += 1,
                Err(err) => {
                    report.failed += 1;
                    count_error(&mut report.errors, format!("publish ack: {:?}", err.kind()));
                    shared.progress.errors.fetch_add(1, Ordering::Relaxed);
                }
            },
            _ = pair.notify.notified(), if window_full => {}
            _ = wait_until(pair, wake_at) => {}
        }
    }
}
