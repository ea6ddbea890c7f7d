//! Live events, read only where they are needed. Every message stream republishes what it
//! stores to a core subject per mailbox (`<p>.live.m<k>.<mailbox>`, with the mailbox's
//! previous id in `Nats-Last-Sequence`), and a relay subscribes to the mailboxes that have a
//! subscriber on it, so it receives those mailboxes' messages and nothing else; removals by
//! other relays come on `<p>.gone.<mailbox>` the same way. Account changes and `PreKeysLow`
//! are rare and go to every relay on `<p>.acct`.
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
use super::index::Indexes;
use super::names::MailboxKey;
use super::records::{decode, AccountNotice, GoneNotice, StoredMessage};
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
}

impl Live {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            listener: OnceLock::new(),
            watched: Mutex::new(AHashMap::new()),
            indexes: Indexes::default(),
            on_account_change: OnceLock::new(),
        })
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
                        old.stop.cancel();
                    }
                    let ready = Arc::new(tokio::sync::OnceCell::new());
                    watched.insert(
                        key.id,
                        Watch {
                            key,
                            watchers: 1,
                            ready: ready.clone(),
                            stop: CancellationToken::new(),
                        },
                    );
                    self.indexes.watch(key);
                    ready
                }
            }
        };
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

    /// One subscription of the delivery to a mailbox ended.
    pub fn unwatch(&self, mailbox: &MailboxId) {
        let mut watched = self.watched.lock();
        if let Some(watch) = watched.get_mut(mailbox) {
            watch.watchers -= 1;
            if watch.watchers == 0 {
                watch.stop.cancel();
                watched.remove(mailbox);
                self.indexes.unwatch(mailbox);
            }
        }
    }

    /// Stops everything for a mailbox that closed (its device unregistered).
    pub fn closed(&self, mailbox: &MailboxId) {
        if let Some(watch) = self.watched.lock().remove(mailbox) {
            watch.stop.cancel();
        }
        self.indexes.forget(mailbox);
    }

    fn live_message(&self, mailbox: &MailboxId, message: async_nats::Message) {
        let Some(headers) = message.headers.as_ref() else {
            return;
        };
        let number = |name: &str| headers.get(name)?.as_str().parse::<u64>().ok();
        let Some(id) = number("Nats-Sequence") else {
            return;
        };
        let prev = number("Nats-Last-Sequence");
        let Some(stored) = StoredMessage::decode_message(message.payload, id) else {
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
