//! Live events, read only where they are needed. Every message stream republishes what it
//! stores to a core subject per mailbox (`<p>.live.m<k>.<mailbox>`, with the mailbox's
//! previous id in `Nats-Last-Sequence`), and a relay subscribes to the mailboxes that have a
//! subscriber on it, so it receives those mailboxes' messages and nothing else; removals by
//! other relays come on `<p>.gone.<mailbox>` the same way. Account changes and `PreKeysLow`
//! are rare and go to every relay on `<p>.acct`.
//!
//! The subscriptions are on the relay's feed connection ([`super::feed`]) where the servers are
//! plaintext, and on the client's connection where they use TLS.
//!
//! Core subjects are at most once: a message republished while the relay reconnects is not
//! received. Every watched mailbox is therefore read again (the delivery's pump, from its
//! cursor) after each reconnection and every [`RESYNC_INTERVAL`]; a gap between two received
//! messages is seen at once by the delivery, from the previous id.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ahash::AHashMap;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::client::Cluster;
use super::feed::{Feed, Target};
use super::index::Indexes;
use super::names::MailboxKey;
use super::records::{decode, AccountNotice, GoneNotice, StoredMessage};
use super::wire::{header_numbers, Delivered};
use crate::store::{Listener, MailboxId};

/// How often every watched mailbox is read again, in case a republished message was missed
/// (it bounds how late such a message is delivered).
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(2);

struct Watch {
    key: MailboxKey,
    /// Subscriptions of the relay's delivery to this mailbox.
    watchers: usize,
    /// Set once the subscriptions are in effect at the server.
    ready: Arc<tokio::sync::OnceCell<()>>,
    stop: CancellationToken,
    /// On the feed: the subscriptions to the mailbox's messages and removals, once made.
    subscribed: Option<[u64; 2]>,
}

/// What to do when an account changed (its identity's bytes, the new version).
pub type AccountChanged = Box<dyn Fn(&[u8], u64) + Send + Sync>;

/// The relay's interest and what it hears.
pub struct Live {
    pub listener: OnceLock<Arc<dyn Listener>>,
    watched: Mutex<AHashMap<MailboxId, Watch>>,
    pub indexes: Indexes,
    /// Cached accounts to drop when another relay changes them.
    pub on_account_change: OnceLock<AccountChanged>,
    /// The feed connection, where the servers are plaintext; unset, the mailboxes are watched
    /// on the client's connection.
    feed: OnceLock<Arc<Feed>>,
}

impl Live {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            listener: OnceLock::new(),
            watched: Mutex::new(AHashMap::new()),
            indexes: Indexes::default(),
            on_account_change: OnceLock::new(),
            feed: OnceLock::new(),
        })
    }

    /// Watches mailboxes on `feed` from now on (set once, before the first watch).
    pub fn use_feed(&self, feed: Arc<Feed>) {
        let _ = self.feed.set(feed);
    }

    /// A message of the feed, in the feed's connection task.
    pub fn delivered(&self, target: Target, message: Delivered) {
        match target {
            Target::Stored(mailbox) => {
                let [id, prev] =
                    header_numbers(&message.headers, ["Nats-Sequence", "Nats-Last-Sequence"]);
                if let Some(id) = id {
                    self.stored(&mailbox, id, prev, message.payload);
                }
            }
            Target::Removed(mailbox) => self.gone(&mailbox, &message.payload),
            // The outbox's: routed there by the store.
            Target::Acks => {}
        }
    }

    fn listener(&self) -> Option<&Arc<dyn Listener>> {
        self.listener.get()
    }

    /// Starts the account notices, the resync timer and the reaction to reconnections.
    pub fn start(
        self: &Arc<Self>,
        cluster: Arc<Cluster>,
        mut reconnected: tokio::sync::watch::Receiver<u64>,
        stop: CancellationToken,
    ) {
        let live = self.clone();
        let stop_notices = stop.clone();
        let accounts = cluster.clone();
        tokio::spawn(async move {
            // Resubscribed by the client after a reconnection; a failure to subscribe at all
            // is retried.
            loop {
                let subject = accounts.names.account_changes();
                match accounts.client.subscribe(subject).await {
                    Ok(mut notices) => loop {
                        tokio::select! {
                            _ = stop_notices.cancelled() => return,
                            notice = notices.next() => match notice {
                                Some(notice) => live.account_notice(&notice.payload),
                                None => break,
                            },
                        }
                    },
                    Err(err) => tracing::warn!(error = %err, "account notices not subscribed"),
                }
                tokio::select! {
                    _ = stop_notices.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        let live = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RESYNC_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => live.resync_all(),
                    changed = reconnected.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        live.resync_all();
                    }
                }
            }
        });
    }

    fn account_notice(&self, payload: &[u8]) {
        let Some(notice) = decode::<AccountNotice>(payload) else {
            return;
        };
        if let (Some(changed), true) = (self.on_account_change.get(), notice.seq > 0) {
            changed(&notice.identity, notice.seq);
        }
        if let (Some(device), Ok(identity)) =
            (notice.low_device, notice.identity.as_slice().try_into())
        {
            if let Some(listener) = self.listener() {
                listener.prekeys_low(&identity, device, notice.low_count);
            }
        }
    }

    fn resync_all(&self) {
        let mailboxes: Vec<MailboxId> = self.watched.lock().keys().copied().collect();
        if let Some(listener) = self.listener() {
            for mailbox in mailboxes {
                listener.resync(&mailbox);
            }
        }
    }

    /// Subscribes this relay to a mailbox's live messages and removals; resolves once the
    /// server has the subscriptions, so nothing stored after that is missed.
    pub async fn watch(
        self: &Arc<Self>,
        cluster: &Arc<Cluster>,
        key: MailboxKey,
    ) -> Result<(), super::error::NatsError> {
        let ready = {
            let mut watched = self.watched.lock();
            match watched.get_mut(&key.id) {
                Some(watch) if watch.key == key => {
                    watch.watchers += 1;
                    watch.ready.clone()
                }
                _ => {
                    if let Some(old) = watched.remove(&key.id) {
                        self.stop_watch(old);
                    }
                    let ready = Arc::new(tokio::sync::OnceCell::new());
                    watched.insert(
                        key.id,
                        Watch {
                            key,
                            watchers: 1,
                            ready: ready.clone(),
                            stop: CancellationToken::new(),
                            subscribed: None,
                        },
                    );
                    self.indexes.watch(key);
                    ready
                }
            }
        };
        if let Some(feed) = self.feed.get() {
            return ready
                .get_or_try_init(|| self.watch_on_feed(feed, cluster, key, &ready))
                .await
                .map(drop);
        }
        let stop = self
            .watched
            .lock()
            .get(&key.id)
            .map(|w| w.stop.clone())
            .unwrap_or_default();
        let live = self.clone();
        let cluster = cluster.clone();
        ready
            .get_or_try_init(|| async move {
                let token = key.token();
                let mut messages = cluster
                    .client
                    .subscribe(cluster.names.live_subject(&token))
                    .await
                    .map_err(super::error::NatsError::request)?;
                let mut gone = cluster
                    .client
                    .subscribe(cluster.names.gone_subject(&token))
                    .await
                    .map_err(super::error::NatsError::request)?;
                cluster
                    .client
                    .flush()
                    .await
                    .map_err(super::error::NatsError::request)?;
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            message = messages.next() => match message {
                                Some(message) => live.live_message(&key.id, message),
                                None => break,
                            },
                            notice = gone.next() => match notice {
                                Some(notice) => live.gone(&key.id, &notice.payload),
                                None => break,
                            },
                        }
                    }
                    let _ = messages.unsubscribe().await;
                    let _ = gone.unsubscribe().await;
                });
                Ok(())
            })
            .await
            .map(drop)
    }

    /// Subscribes to the mailbox's messages and removals on the feed for the watch whose
    /// readiness is `ready`. A watch ended (or replaced) while this was under way has its
    /// subscriptions taken back here.
    async fn watch_on_feed(
        &self,
        feed: &Feed,
        cluster: &Cluster,
        key: MailboxKey,
        ready: &Arc<tokio::sync::OnceCell<()>>,
    ) -> Result<(), super::error::NatsError> {
        let token = key.token();
        let stored = feed
            .subscribe(cluster.names.live_subject(&token), Target::Stored(key.id))
            .await?;
        let removed = match feed
            .subscribe(cluster.names.gone_subject(&token), Target::Removed(key.id))
            .await
        {
            Ok(sid) => sid,
            Err(err) => {
                feed.unsubscribe(stored);
                return Err(err);
            }
        };
        let mut watched = self.watched.lock();
        match watched.get_mut(&key.id) {
            Some(watch) if Arc::ptr_eq(&watch.ready, ready) => {
                watch.subscribed = Some([stored, removed]);
            }
            _ => {
                feed.unsubscribe(stored);
                feed.unsubscribe(removed);
            }
        }
        Ok(())
    }

    /// Ends a watch: its task on the client's connection, or its subscriptions on the feed.
    fn stop_watch(&self, watch: Watch) {
        watch.stop.cancel();
        if let (Some(feed), Some(sids)) = (self.feed.get(), watch.subscribed) {
            for sid in sids {
                feed.unsubscribe(sid);
            }
        }
    }

    /// One subscription of the delivery to a mailbox ended.
    pub fn unwatch(&self, mailbox: &MailboxId) {
        let mut watched = self.watched.lock();
        if let Some(watch) = watched.get_mut(mailbox) {
            watch.watchers -= 1;
            if watch.watchers == 0 {
                if let Some(watch) = watched.remove(mailbox) {
                    self.stop_watch(watch);
                }
                self.indexes.unwatch(mailbox);
            }
        }
    }

    /// Stops everything for a mailbox that closed (its device unregistered).
    pub fn closed(&self, mailbox: &MailboxId) {
        let removed = self.watched.lock().remove(mailbox);
        if let Some(watch) = removed {
            self.stop_watch(watch);
        }
        self.indexes.forget(mailbox);
    }

    /// A republished message that came on the client's connection.
    fn live_message(&self, mailbox: &MailboxId, message: async_nats::Message) {
        let Some(headers) = message.headers.as_ref() else {
            return;
        };
        let number = |name: &str| headers.get(name)?.as_str().parse::<u64>().ok();
        let Some(id) = number("Nats-Sequence") else {
            return;
        };
        self.stored(mailbox, id, number("Nats-Last-Sequence"), message.payload);
    }

    /// Message `id` was stored in the mailbox, `prev` its previous one (0: none).
    fn stored(&self, mailbox: &MailboxId, id: u64, prev: Option<u64>, payload: bytes::Bytes) {
        let Some(stored) = StoredMessage::decode_message(payload, id) else {
            return;
        };
        self.indexes
            .stored(mailbox, id, stored.payload.len() as u32, prev);
        if let Some(listener) = self.listener() {
            // 0: the mailbox held nothing before it.
            listener.stored(mailbox, &Arc::new(stored), prev);
        }
    }

    fn gone(&self, mailbox: &MailboxId, payload: &[u8]) {
        let Some(notice) = decode::<GoneNotice>(payload) else {
            return;
        };
        let Some(listener) = self.listener() else {
            return;
        };
        if notice.closed {
            listener.closed(mailbox);
        } else {
            self.indexes.removed(mailbox, &notice.ids);
            listener.removed(mailbox, &notice.ids);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Identity, Message, NewMessage};
    use botd_protocol::keys::sha256;
    use bytes::Bytes;

    const MAILBOX: MailboxId = MailboxId {
        identity: [3; 33],
        device: 1,
    };

    #[derive(Default)]
    struct Recorder {
        events: Mutex<Vec<String>>,
    }

    impl Listener for Recorder {
        fn stored(&self, mailbox: &MailboxId, message: &Arc<Message>, prev_id: Option<u64>) {
            self.events.lock().push(format!(
                "stored {} {} {:?} {:?}",
                mailbox.device,
                message.id,
                prev_id,
                &message.payload[..]
            ));
        }
        fn removed(&self, mailbox: &MailboxId, ids: &[u64]) {
            self.events
                .lock()
                .push(format!("removed {} {ids:?}", mailbox.device));
        }
        fn closed(&self, mailbox: &MailboxId) {
            self.events
                .lock()
                .push(format!("closed {}", mailbox.device));
        }
        fn prekeys_low(&self, _: &Identity, _: u32, _: u32) {}
    }

    fn body() -> Bytes {
        super::super::records::encode(&StoredMessage::of(&NewMessage {
            to: MAILBOX,
            sender: [2; 33],
            sender_device: 9,
            nonce: [1; 8],
            payload_hash: sha256(&[b"hello"]),
            signature: [7; 64],
            payload: Bytes::from_static(b"hello"),
            ticket: None,
            received_at_ms: 1,
            bad_signature: None,
        }))
    }

    fn recording() -> (Arc<Live>, Arc<Recorder>) {
        let live = Live::new();
        let recorder = Arc::new(Recorder::default());
        let listener: Arc<dyn Listener> = recorder.clone();
        let _ = live.listener.set(listener);
        (live, recorder)
    }

    /// The feed's connection and the client's (used with TLS) hand the listener the same
    /// message, id and previous id.
    #[test]
    fn both_connections_deliver_a_republished_message_alike() {
        let (live, recorder) = recording();
        let block =
            "NATS/1.0\r\nNats-Stream: s\r\nNats-Sequence: 42\r\nNats-Last-Sequence: 40\r\n\r\n";
        live.delivered(
            Target::Stored(MAILBOX),
            Delivered {
                sid: 1,
                subject: Bytes::new(),
                headers: Bytes::from_static(block.as_bytes()),
                payload: body(),
            },
        );
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Sequence", "42");
        headers.insert("Nats-Last-Sequence", "40");
        let message = |headers| async_nats::Message {
            subject: "live".into(),
            reply: None,
            payload: body(),
            headers,
            status: None,
            description: None,
            length: 0,
        };
        live.live_message(&MAILBOX, message(Some(headers)));
        // Without a sequence (or without headers) nothing is delivered.
        live.delivered(
            Target::Stored(MAILBOX),
            Delivered {
                sid: 1,
                subject: Bytes::new(),
                headers: Bytes::from_static(b"NATS/1.0\r\n\r\n"),
                payload: body(),
            },
        );
        live.live_message(&MAILBOX, message(None));
        let events = recorder.events.lock().clone();
        let expected = "stored 1 42 Some(40) [104, 101, 108, 108, 111]";
        assert_eq!(events, [expected, expected]);
    }

    #[test]
    fn removal_notices_of_the_feed_reach_the_listener() {
        let (live, recorder) = recording();
        let notice =
            |ids: Vec<u64>, closed| super::super::records::encode(&GoneNotice { ids, closed });
        for payload in [notice(vec![5, 6], false), notice(vec![], true)] {
            live.delivered(
                Target::Removed(MAILBOX),
                Delivered {
                    sid: 2,
                    subject: Bytes::new(),
                    headers: Bytes::new(),
                    payload,
                },
            );
        }
        assert_eq!(*recorder.events.lock(), ["removed 1 [5, 6]", "closed 1"]);
    }
}
