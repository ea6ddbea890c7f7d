//! The `relay` scenario against a botd relay: S sender sessions and R receiver sessions, each
//! driven by its own pipelined loop over [`Conn`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{sleep, Instant};

use botd_protocol::keys::{KeyPair, PublicKeyBytes, SIGNATURE_LEN};
use botd_protocol::proto::{self, Body};

use super::load::{receiver_of, wait_until, Pacer, PayloadTemplate, Phases, Shared, Stamp, Tally};
use super::scenario::{
    count_error, orchestrate, LoadParams, Outcome, ReceiverReport, SenderReport,
};
use super::wire::{closes_session, push_error, registration, Conn, SendHeader};
use botd_protocol::message::message_digest;

/// The device every bench session registers and uses.
const DEVICE: u32 = 1;
/// Most ids in one `AckMessages` (docs/PROTOCOL.md §8.4).
const MAX_ACK_IDS: usize = 4096;
/// Messages sealed in one go before the sender writes and reads again.
const MAX_SEND_BATCH: u64 = 256;
/// A sender stops sealing while this much is waiting for the socket.
const OUTBOX_HIGH: usize = 1 << 20;
/// The fixed signature sent without `--sign` (the relay does not check it by default).
const PLACEHOLDER_SIGNATURE: [u8; SIGNATURE_LEN] = [0x5a; SIGNATURE_LEN];
/// How often an idle receiver looks at the shared "done" flag.
const RECEIVER_TICK: Duration = Duration::from_millis(50);
/// Sessions connected at once during setup.
const SETUP_CONCURRENCY: usize = 32;

struct Member {
    identity: Arc<KeyPair>,
    conn: Conn,
}

/// Connects `count` fresh identities and registers device 1 for each, to the relays in turn.
async fn connect_members(
    relays: &[(SocketAddr, PublicKeyBytes)],
    count: usize,
    limit: Duration,
) -> Result<Vec<Member>, String> {
    let mut members = Vec::with_capacity(count);
    let mut pending = Vec::new();
    for chunk_start in (0..count).step_by(SETUP_CONCURRENCY) {
        for index in chunk_start..(chunk_start + SETUP_CONCURRENCY).min(count) {
            let (addr, relay) = relays[index % relays.len()];
            let identity = Arc::new(KeyPair::generate());
            pending.push(tokio::spawn(async move {
                let mut conn = Conn::connect(addr, &identity, relay, limit).await?;
                conn.request(
                    Body::Register(registration(identity.public(), DEVICE)),
                    limit,
                )
                .await?;
                Ok::<_, String>(Member { identity, conn })
            }));
        }
        for task in pending.drain(..) {
            members.push(task.await.map_err(|err| format!("setup task: {err}"))??);
        }
    }
    Ok(members)
}

/// Runs the scenario against one relay, or several sharing a store (sessions spread over
/// them in turn); the caller turns the outcome into a result.
pub async fn run(
    params: &LoadParams,
    relays: &[(SocketAddr, PublicKeyBytes)],
    title: &str,
) -> Result<Outcome, String> {
    params.check()?;
    let template = Arc::new(PayloadTemplate::new(params.payload)?);
    let limit = params.connect_timeout;
    let mut receivers = connect_members(relays, params.receivers, limit).await?;
    let senders = connect_members(relays, params.senders, limit).await?;
    if let Some(conn) = receivers.first() {
        let max = conn.conn.welcome.max_payload_len as usize;
        if params.payload > max {
            return Err(format!(
                "payload of {} bytes exceeds the relay's max_payload_len of {max}",
                params.payload
            ));
        }
    }
    for member in &mut receivers {
        member
            .conn
            .request(
                Body::Subscribe(proto::Subscribe {
                    device_id: DEVICE,
                    after_id: 0,
                }),
                limit,
            )
            .await?;
    }
    let recipients: Vec<[u8; 33]> = receivers
        .iter()
        .map(|m| *m.identity.public().as_bytes())
        .collect();

    let start = Instant::now();
    let phases = Phases::new(start, params.warmup, params.duration, params.drain);
    let shared = Shared::new(params.senders, phases);
    let mut sender_tasks = Vec::new();
    for (index, member) in senders.into_iter().enumerate() {
        let pacer = params.pacer(start, index);
        let header = SendHeader {
            recipient: recipients[receiver_of(index, params.receivers)],
            recipient_device: DEVICE,
            sender_device: DEVICE,
        };
        let task = SenderTask {
            index,
            conn: member.conn,
            identity: params.sign.then_some(member.identity),
            shared: shared.clone(),
            pacer,
            header,
            template: template.clone(),
        };
        sender_tasks.push(tokio::spawn(task.run()));
    }
    let mut receiver_tasks = Vec::new();
    for member in receivers {
        let task = ReceiverTask {
            identity: member.identity,
            conn: member.conn,
            shared: shared.clone(),
            senders: params.senders,
            ack_each: params.ack_each,
            verify: params.sign,
        };
        receiver_tasks.push(tokio::spawn(task.run()));
    }
    Ok(orchestrate(shared, params, title, sender_tasks, receiver_tasks).await)
}

struct SenderTask {
    index: usize,
    conn: Conn,
    /// Set with `--sign`: each message is signed for real.
    identity: Option<Arc<KeyPair>>,
    shared: Arc<Shared>,
    pacer: Pacer,
    header: SendHeader,
    template: Arc<PayloadTemplate>,
}

impl SenderTask {
    async fn run(mut self) -> Result<SenderReport, String> {
        let result = self.drive().await;
        self.conn.close().await;
        result
    }

    async fn drive(&mut self) -> Result<SenderReport, String> {
        let shared = self.shared.clone();
        let pair = &shared.pairs[self.index];
        let phases = shared.phases;
        let mut report = SenderReport::default();
        let mut seq = 0u64;
        let mut answered = 0u64;
        loop {
            let now = Instant::now();
            let stopping = now >= phases.measure_end;
            let mut progressed = false;
            if !stopping {
                let received = pair.received.load(Ordering::Acquire);
                let budget = self.pacer.budget(seq, report.failed, received, now);
                if self.conn.session.transmit_len() < OUTBOX_HIGH {
                    let batch = budget.min(MAX_SEND_BATCH);
                    for _ in 0..batch {
                        self.seal_one(seq, now, &phases)?;
                        seq += 1;
                    }
                    if batch > 0 {
                        self.shared
                            .progress
                            .sent
                            .fetch_add(batch, Ordering::Relaxed);
                        progressed = true;
                    }
                }
            }
            progressed |= self.conn.try_flush()? > 0;
            if self.conn.try_fill()? > 0 {
                progressed = true;
                let now = Instant::now();
                while let Some(frame) = self.conn.next_frame(now.into_std())? {
                    match frame.body {
                        Some(Body::Sent(_)) if frame.id != 0 => {
                            answered += 1;
                            report.sent_ok += 1;
                        }
                        Some(Body::Error(error))
                            if frame.id == 0 || closes_session(error.code()) =>
                        {
                            return Err(push_error(&error));
                        }
                        Some(Body::Error(error)) => {
                            answered += 1;
                            report.failed += 1;
                            count_error(
                                &mut report.errors,
                                format!("Send: {}", error.code().as_str_name()),
                            );
                            self.shared.progress.errors.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
            }
            if self.conn.eof {
                return Err(format!(
                    "relay closed the connection ({} sends unanswered)",
                    seq - answered
                ));
            }
            if stopping && answered == seq && self.conn.session.transmit_len() == 0 {
                return Ok(report);
            }
            if now >= phases.deadline {
                return Err(format!(
                    "{} sends still unanswered at the deadline",
                    seq - answered
                ));
            }
            if progressed {
                continue;
            }
            let room = self
                .pacer
                .room(seq, report.failed, pair.received.load(Ordering::Acquire));
            let pending = self.conn.session.transmit_len() > 0;
            let wake_at = if stopping {
                phases.deadline
            } else if self.conn.session.transmit_len() >= OUTBOX_HIGH {
                // The socket is full: its readiness wakes us.
                phases.measure_end
            } else {
                self.pacer.wake_at(seq, room, phases.measure_end)
            };
            let window_full = !stopping && room == 0;
            tokio::select! {
                ready = self.conn.ready(pending) => ready?,
                _ = pair.notify.notified(), if window_full => {}
                _ = wait_until(pair, wake_at) => {}
            }
        }
    }

    /// Seals `Send` number `seq` into the session's output buffer.
    fn seal_one(&mut self, seq: u64, now: Instant, phases: &Phases) -> Result<(), String> {
        let stamp = Stamp {
            sender: self.index as u32,
            seq,
            intended_ns: phases.ns_since_epoch(self.pacer.intended(seq, now)),
        };
        let nonce = seq.to_be_bytes();
        let hash = self.template.hash(&stamp);
        let signature = match &self.identity {
            Some(identity) => identity.sign(&message_digest(
                identity.public().as_bytes(),
                &self.header.recipient,
                self.header.recipient_device,
                &nonce,
                &hash,
            )),
            None => PLACEHOLDER_SIGNATURE,
        };
        let id = self.conn.next_id();
        let len = self.header.frame_len(id, self.template.len());
        let (header, template) = (&self.header, &self.template);
        self.conn
            .session
            .send_encoded(len, true, |buf| {
                header.encode(buf, id, &nonce, &hash, &signature, template, &stamp)
            })
            .map_err(|err| format!("seal Send: {err}"))
    }
}

struct ReceiverTask {
    identity: Arc<KeyPair>,
    conn: Conn,
    shared: Arc<Shared>,
    senders: usize,
    ack_each: bool,
    /// With `--sign`: check each delivery's hash and signature.
    verify: bool,
}

impl ReceiverTask {
    async fn run(mut self) -> Result<ReceiverReport, String> {
        let result = self.drive().await;
        self.conn.close().await;
        result
    }

    async fn drive(&mut self) -> Result<ReceiverReport, String> {
        let phases = self.shared.phases;
        let mut tally = Tally::new(self.senders);
        let mut errors = BTreeMap::new();
        let mut per_sender = vec![0u64; self.senders];
        let mut ids: Vec<u64> = Vec::with_capacity(1024);
        let (mut acks_sent, mut acks_answered) = (0u64, 0u64);
        // Grace past the deadline to collect the last acks' answers.
        let give_up = phases.deadline + Duration::from_secs(2);
        loop {
            let mut progressed = false;
            if self.conn.try_fill()? > 0 {
                progressed = true;
                let now = Instant::now();
                while let Some(frame) = self.conn.next_frame(now.into_std())? {
                    match frame.body {
                        Some(Body::Deliver(deliver)) if frame.id == 0 => {
                            if self.verify && !self.verified(&deliver) {
                                count_error(&mut errors, "Deliver: signature or hash invalid");
                            }
                            if let Some(sender) = tally.record(&deliver.payload, now, &phases) {
                                per_sender[sender] += 1;
                            }
                            ids.push(deliver.message_id);
                            if self.ack_each {
                                self.ack(std::mem::take(&mut ids))?;
                                acks_sent += 1;
                            }
                        }
                        Some(Body::Acked(_)) => acks_answered += 1,
                        Some(Body::Error(error))
                            if frame.id == 0 || closes_session(error.code()) =>
                        {
                            return Err(push_error(&error));
                        }
                        Some(Body::Error(error)) => {
                            acks_answered += 1;
                            count_error(
                                &mut errors,
                                format!("AckMessages: {}", error.code().as_str_name()),
                            );
                            self.shared.progress.errors.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
                for chunk in ids.chunks(MAX_ACK_IDS) {
                    self.ack(chunk.to_vec())?;
                    acks_sent += 1;
                }
                ids.clear();
                let mut delivered = 0;
                for (sender, count) in per_sender.iter_mut().enumerate() {
                    if *count > 0 {
                        self.shared.pairs[sender].add_received(*count);
                        delivered += *count;
                        *count = 0;
                    }
                }
                self.shared
                    .progress
                    .delivered
                    .fetch_add(delivered, Ordering::Relaxed);
            }
            progressed |= self.conn.try_flush()? > 0;
            if self.conn.eof {
                return Err("relay closed the connection".into());
            }
            if self.shared.progress.is_done()
                && acks_answered == acks_sent
                && self.conn.session.transmit_len() == 0
            {
                return Ok(ReceiverReport { tally, errors });
            }
            if Instant::now() >= give_up {
                return Err(format!(
                    "{} acks still unanswered at the deadline",
                    acks_sent - acks_answered
                ));
            }
            if progressed {
                continue;
            }
            let pending = self.conn.session.transmit_len() > 0;
            tokio::select! {
                ready = self.conn.ready(pending) => ready?,
                _ = self.shared.progress.wake.notified() => {}
                _ = sleep(RECEIVER_TICK) => {}
            }
        }
    }

    fn ack(&mut self, message_ids: Vec<u64>) -> Result<(), String> {
        self.conn
            .queue(Body::AckMessages(proto::AckMessages {
                device_id: DEVICE,
                message_ids,
            }))
            .map(drop)
    }

    fn verified(&self, deliver: &proto::Deliver) -> bool {
        let Ok(sender) = PublicKeyBytes::parse(&deliver.sender) else {
            return false;
        };
        if botd_protocol::keys::sha256(&[&deliver.payload])[..] != deliver.payload_hash[..] {
            return false;
        }
        let digest = message_digest(
            sender.as_bytes(),
            self.identity.public().as_bytes(),
            deliver.recipient_device,
            &deliver.sender_nonce,
            &deliver.payload_hash,
        );
        sender.verify(&digest, &deliver.sender_signature).is_ok()
    }
}
