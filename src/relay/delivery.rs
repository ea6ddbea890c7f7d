//! Live delivery: each mailbox's one subscriber, its window of unacknowledged deliveries, the
//! pacing of a backlog against the subscriber's push queue, and the pushes. It works on top of
//! any [`Store`]: newly durable messages arrive as listener events ([`Delivery::stored`]), a
//! backlog is read from the store.
//!
//! A subscription's `cursor` is the highest id it has pushed (or started after). A stored
//! message with nothing stored between the cursor and it (its `prev_id` is at most the cursor)
//! is pushed at once, from the event, without reading the store: the common case of a
//! subscriber that keeps up. Anything else
//! (the backlog at subscription, a full window, a paused queue, a gap) is read from the store by
//! a *pump*, one per subscription at a time, which runs synchronously when the store answers at
//! once and finishes in a task otherwise.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Waker};

use ahash::AHashMap;
use parking_lot::Mutex;

use crate::app::{Outgoing, PushHandle};
use crate::store::{MailboxId, Message, Store, StoreResult};
use botd_protocol::message::DeliverFrame;

/// Shards of the subscription map.
const SHARDS: usize = 64;

struct Subscription {
    push: PushHandle,
    /// Tells this subscription from a later one of the same mailbox.
    generation: u64,
    /// Highest id pushed in this subscription, or its `after_id`.
    cursor: u64,
    /// Highest id known to be stored and durable.
    known: u64,
    /// Pushed in this subscription and still stored, ascending.
    in_flight: VecDeque<u64>,
    /// A pump is reading the store for this subscription.
    pumping: bool,
    /// A message arrived while pumping: read once more before stopping.
    again: bool,
}

impl Subscription {
    fn has_room(&self, max_unacked: usize) -> bool {
        self.in_flight.len() < max_unacked && !self.push.resume_pending()
    }

    fn pushed(&mut self, id: u64) {
        self.cursor = id;
        self.known = self.known.max(id);
        self.in_flight.push_back(id);
    }
}

/// What the caller must do after a change under the lock.
enum Next {
    Nothing,
    Pump(u64),
}

pub struct Delivery<S: Store> {
    store: Arc<S>,
    shards: Box<[Mutex<AHashMap<MailboxId, Subscription>>]>,
    max_unacked: usize,
    generations: AtomicU64,
    delivered: metrics::Counter,
}

impl<S: Store> Delivery<S> {
    pub fn new(store: Arc<S>, max_unacked: usize) -> Arc<Self> {
        Arc::new(Self {
            store,
            shards: (0..SHARDS).map(|_| Mutex::new(AHashMap::new())).collect(),
            max_unacked: max_unacked.max(1),
            generations: AtomicU64::new(1),
            delivered: metrics::counter!(crate::metrics::MESSAGES_DELIVERED),
        })
    }

    fn shard(&self, mailbox: &MailboxId) -> &Mutex<AHashMap<MailboxId, Subscription>> {
        let h = u64::from_le_bytes(mailbox.identity[1..9].try_into().expect("8 bytes"));
        &self.shards[((h ^ u64::from(mailbox.device)) % SHARDS as u64) as usize]
    }

    /// Makes `push` the mailbox's subscriber from `after` on and pushes its backlog. Returns
    /// the mailbox's last durable id and the subscriber it replaced, if another session.
    pub fn subscribe(
        self: &Arc<Self>,
        mailbox: MailboxId,
        after: u64,
        push: PushHandle,
    ) -> impl Future<Output = StoreResult<(u64, Option<PushHandle>)>> + Send + 'static {
        // The store hears of the mailbox from here on before its backlog is read, so nothing
        // stored in between is missed.
        let watched = self.store.watch(mailbox);
        let this = self.clone();
        async move {
            watched.await?;
            let last_id = match this.store.last_id(mailbox).await {
                Ok(last_id) => last_id,
                Err(err) => {
                    this.store.unwatch(&mailbox);
                    return Err(err);
                }
            };
            let generation = this.generations.fetch_add(1, Ordering::Relaxed);
            let previous = this.shard(&mailbox).lock().insert(
                mailbox,
                Subscription {
                    push: push.clone(),
                    generation,
                    cursor: after,
                    known: last_id,
                    in_flight: VecDeque::new(),
                    pumping: true,
                    again: false,
                },
            );
            if previous.is_some() {
                // One watch per subscription of the map: the replaced one's goes.
                this.store.unwatch(&mailbox);
            }
            this.clone().pump(mailbox, generation).await;
            let replaced = previous
                .map(|s| s.push)
                .filter(|old| !old.same_session(&push) && !old.is_closed());
            Ok((last_id, replaced))
        }
    }

    /// Ends `push`'s subscription to a mailbox, if it still holds it.
    pub fn unsubscribe(&self, mailbox: &MailboxId, push: &PushHandle) {
        let mut shard = self.shard(mailbox).lock();
        if shard
            .get(mailbox)
            .is_some_and(|s| s.push.same_session(push))
        {
            self.end(&mut shard, mailbox);
        }
    }

    /// Ends a subscription: the store no longer needs to tell this relay of the mailbox.
    fn end(&self, shard: &mut AHashMap<MailboxId, Subscription>, mailbox: &MailboxId) {
        if shard.remove(mailbox).is_some() {
            self.store.unwatch(mailbox);
        }
    }

    /// Events of the mailbox may have been missed: reads what is stored after the cursor.
    pub fn resync(self: &Arc<Self>, mailbox: &MailboxId) {
        let next = {
            let mut shard = self.shard(mailbox).lock();
            match shard.get_mut(mailbox) {
                Some(sub) => {
                    sub.known = sub.known.max(sub.cursor + 1);
                    self.pump_if_behind(sub)
                }
                None => Next::Nothing,
            }
        };
        self.run(mailbox, next);
    }

    /// `push`'s queue drained: continues a paused backlog.
    pub fn resume(self: &Arc<Self>, mailbox: &MailboxId, push: &PushHandle) {
        let next = {
            let mut shard = self.shard(mailbox).lock();
            match shard.get_mut(mailbox) {
                Some(sub) if sub.push.same_session(push) => self.pump_if_behind(sub),
                _ => Next::Nothing,
            }
        };
        self.run(mailbox, next);
    }

    /// A newly durable message (from the store's listener).
    pub fn stored(
        self: &Arc<Self>,
        mailbox: &MailboxId,
        message: &Arc<Message>,
        prev: Option<u64>,
    ) {
        let next = {
            let mut shard = self.shard(mailbox).lock();
            let Some(sub) = shard.get_mut(mailbox) else {
                return;
            };
            sub.known = sub.known.max(message.id);
            if message.id <= sub.cursor {
                Next::Nothing
            } else if sub.pumping {
                sub.again = true;
                Next::Nothing
            } else if prev.is_some_and(|prev| prev <= sub.cursor) && sub.has_room(self.max_unacked)
            {
                let out = Outgoing::Deliver(DeliverFrame {
                    frame_id: 0,
                    device: mailbox.device,
                    message: message.clone(),
                });
                // Live messages are paced like a backlog: past half of the push queue they
                // wait in the store, and the pump sends them once the session has drained its
                // queue. Only a peer that stops reading altogether fills the queue.
                if paced_out(sub, &out) {
                    return;
                }
                if sub.push.push(out).is_ok() {
                    sub.pushed(message.id);
                    self.delivered.increment(1);
                } else {
                    // The session is gone or too slow: it ends; the message stays stored.
                    self.end(&mut shard, mailbox);
                }
                Next::Nothing
            } else {
                self.pump_if_behind(sub)
            }
        };
        self.run(mailbox, next);
    }

    /// Messages left a mailbox: they free places in the window.
    pub fn removed(self: &Arc<Self>, mailbox: &MailboxId, ids: &[u64]) {
        let next = {
            let mut shard = self.shard(mailbox).lock();
            let Some(sub) = shard.get_mut(mailbox) else {
                return;
            };
            for id in ids {
                if let Ok(at) = sub.in_flight.binary_search(id) {
                    sub.in_flight.remove(at);
                }
            }
            self.pump_if_behind(sub)
        };
        self.run(mailbox, next);
    }

    /// The mailbox is gone (device unregistered): its subscription ends without notice.
    pub fn closed(&self, mailbox: &MailboxId) {
        self.end(&mut self.shard(mailbox).lock(), mailbox);
    }

    /// Starts a pump when the subscription is behind what is stored and may take more.
    fn pump_if_behind(&self, sub: &mut Subscription) -> Next {
        if sub.pumping {
            sub.again = true;
            return Next::Nothing;
        }
        if sub.cursor < sub.known && sub.has_room(self.max_unacked) {
            sub.pumping = true;
            return Next::Pump(sub.generation);
        }
        Next::Nothing
    }

    fn run(self: &Arc<Self>, mailbox: &MailboxId, next: Next) {
        if let Next::Pump(generation) = next {
            run_now_or_spawn(self.clone().pump(*mailbox, generation));
        }
    }

    /// Reads the store after the cursor and pushes, while the window and the pacing allow;
    /// then clears `pumping`. Only the pump of the subscription's current generation runs.
    async fn pump(self: Arc<Self>, mailbox: MailboxId, generation: u64) {
        loop {
            let (after, room, budget) = {
                let mut shard = self.shard(&mailbox).lock();
                let Some(sub) = shard
                    .get_mut(&mailbox)
                    .filter(|s| s.generation == generation)
                else {
                    return;
                };
                sub.again = false;
                if !sub.has_room(self.max_unacked) {
                    sub.pumping = false;
                    return;
                }
                let half = sub.push.limit() / 2;
                (
                    sub.cursor,
                    self.max_unacked - sub.in_flight.len(),
                    half.saturating_sub(sub.push.queued_bytes()),
                )
            };
            let read = self.store.read(mailbox, after, room, budget).await;
            let mut shard = self.shard(&mailbox).lock();
            let Some(sub) = shard
                .get_mut(&mailbox)
                .filter(|s| s.generation == generation)
            else {
                return;
            };
            let messages = match read {
                Ok(messages) => messages,
                Err(err) => {
                    tracing::debug!(error = %err, "delivery pump stopped: the store refused a read");
                    sub.pumping = false;
                    return;
                }
            };
            if messages.is_empty() && !sub.again {
                // Nothing after the cursor is stored now.
                sub.known = sub.cursor;
                sub.pumping = false;
                return;
            }
            let mut pushed = 0u64;
            for message in messages {
                if message.id <= sub.cursor {
                    continue;
                }
                let out = Outgoing::Deliver(DeliverFrame {
                    frame_id: 0,
                    device: mailbox.device,
                    message,
                });
                // The subscriber's connection may be busy answering the very request that
                // started this pump, so its queue cannot drain meanwhile: stop at half of it
                // and continue when it has drained. Only a peer that stops reading while
                // live messages keep coming reaches the hard limit (SLOW_CONSUMER).
                if paced_out(sub, &out) {
                    sub.pumping = false;
                    self.delivered.increment(pushed);
                    return;
                }
                let id = message_id(&out);
                if sub.push.push(out).is_err() {
                    self.end(&mut shard, &mailbox);
                    self.delivered.increment(pushed);
                    return;
                }
                sub.pushed(id);
                pushed += 1;
            }
            self.delivered.increment(pushed);
            if pushed == 0 && !sub.again {
                // Nothing newer than the cursor: caught up.
                sub.known = sub.cursor;
                sub.pumping = false;
                return;
            }
        }
    }

    /// Subscriptions currently open (for tests and stats).
    pub fn subscriptions(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}

/// True when `out` would take the subscriber's push queue past half its bound while it has
/// deliveries in flight: the subscription pauses until the queue has drained.
fn paced_out(sub: &Subscription, out: &Outgoing) -> bool {
    let half = sub.push.limit() / 2;
    if !sub.in_flight.is_empty() && sub.push.queued_bytes() + out.encoded_len() > half {
        sub.push.request_resume();
        return true;
    }
    false
}

fn message_id(out: &Outgoing) -> u64 {
    match out {
        Outgoing::Deliver(deliver) => deliver.message.id,
        Outgoing::Frame(_) => 0,
    }
}

/// Runs `future` here as far as it goes without waiting; if it must wait (a remote store),
/// the rest runs as a task. Stores that answer at once (the embedded one) thus deliver
/// synchronously, in the caller's turn.
fn run_now_or_spawn(future: impl Future<Output = ()> + Send + 'static) {
    let mut future = Box::pin(future);
    let mut cx = Context::from_waker(Waker::noop());
    if future.as_mut().poll(&mut cx).is_pending() {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(future);
            }
            Err(_) => {
                tracing::warn!("no runtime to finish a delivery pump; it resumes on the next event")
            }
        }
    }
}
