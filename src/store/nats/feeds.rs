//! Live events across relays, from two ordered consumers every relay runs:
//!
//! * the **messages feed** reads the mailbox stream in stream order from the relay's start and
//!   announces every stored message to the listener (whichever relay stored it), with the id
//!   stored just before it in the same mailbox when this relay saw that one too (`prev_id`);
//! * the **events feed** reads the notices other relays publish after acknowledged changes:
//!   removals (acks, expiry), closed mailboxes, `PreKeysLow`. A relay handles its own changes
//!   at once and skips its own notices.
//!
//! Both consumers are ephemeral and ordered: the client recreates them after a gap, a
//! reconnection or the loss of the server that held them, from the next stream sequence, so
//! nothing is skipped; if one ends anyway it is created again from where it stopped.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ahash::AHashMap;
use async_nats::jetstream::{consumer, stream};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::cluster::decode_message;
use super::records::{decode, EventKind, EventRecord, Names};
use crate::store::{Listener, MailboxId};

/// Mailboxes whose last id the messages feed remembers for `prev_id`; past this it forgets
/// them all (later messages of a forgotten mailbox get `prev_id = None`, which costs a read).
const MAX_TRACKED_MAILBOXES: usize = 200_000;

/// Messages whose mailbox this relay remembers, so that an ack deletes them without reading
/// them first; past this it forgets them all.
const MAX_KNOWN_MESSAGES: usize = 262_144;

/// Where a stored message belongs: mailbox, mailbox generation, payload length.
pub type Placement = (MailboxId, u64, u64);

/// What the feeds share with the store.
pub struct Shared {
    pub listener: OnceLock<Arc<dyn Listener>>,
    pub names: Names,
    /// This relay instance, in the events it publishes.
    pub origin: u64,
    /// Messages seen by the feed (or read), by id.
    pub known: parking_lot::Mutex<AHashMap<u64, Placement>>,
}

impl Shared {
    pub fn remember(&self, id: u64, placement: Placement) {
        let mut known = self.known.lock();
        if known.len() >= MAX_KNOWN_MESSAGES {
            known.clear();
        }
        known.insert(id, placement);
    }

    pub fn forget(&self, id: u64) -> Option<Placement> {
        self.known.lock().remove(&id)
    }
}

/// Starts both feeds; they stop when `stop` is cancelled.
pub fn start(
    shared: Arc<Shared>,
    messages: stream::Stream,
    events: stream::Stream,
    stop: CancellationToken,
) -> Result<(), super::error::NatsError> {
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|err| super::error::NatsError::Request(err.to_string()))?;
    runtime.spawn(run_feed(
        shared.clone(),
        messages,
        shared.names.all_messages(),
        Feed::Messages(AHashMap::new()),
        stop.clone(),
    ));
    runtime.spawn(run_feed(
        shared.clone(),
        events,
        format!("{}.>", shared.names.event_root),
        Feed::Events,
        stop,
    ));
    Ok(())
}

enum Feed {
    /// Last id seen per mailbox.
    Messages(AHashMap<MailboxId, u64>),
    Events,
}

async fn run_feed(
    shared: Arc<Shared>,
    stream: stream::Stream,
    filter: String,
    mut feed: Feed,
    stop: CancellationToken,
) {
    // Next stream sequence to read: from the relay's start on.
    let mut next: Option<u64> = None;
    let mut failures = 0u32;
    loop {
        let messages = match next {
            None => stream
                .get_info()
                .await
                .map(|info| next = Some(info.state.last_sequence + 1))
                .map_err(|err| err.to_string()),
            Some(_) => Ok(()),
        };
        let messages = match (messages, next) {
            (Ok(()), Some(start_sequence)) => {
                let created = stream
                    .create_consumer(consumer::pull::OrderedConfig {
                        filter_subject: filter.clone(),
                        deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence },
                        ..Default::default()
                    })
                    .await;
                match created {
                    Ok(consumer) => consumer.messages().await.map_err(|err| err.to_string()),
                    Err(err) => Err(err.to_string()),
                }
            }
            (Err(err), _) => Err(err),
            (Ok(()), None) => Err("no start sequence".to_owned()),
        };
        let mut messages = match messages {
            Ok(messages) => messages,
            Err(err) => {
                failures += 1;
                tracing::warn!(error = %err, filter, "cannot start a JetStream feed; retrying");
                let pause = Duration::from_millis((100 * u64::from(failures)).min(2_000));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(pause) => continue,
                }
            }
        };
        loop {
            let item = tokio::select! {
                _ = stop.cancelled() => return,
                item = messages.next() => item,
            };
            let message = match item {
                Some(Ok(message)) => message,
                Some(Err(err)) => {
                    tracing::warn!(error = %err, filter, "JetStream feed interrupted");
                    break;
                }
                None => break,
            };
            failures = 0;
            let Ok(info) = message.info() else { continue };
            let sequence = info.stream_sequence;
            next = Some(sequence + 1);
            let Some(listener) = shared.listener.get() else {
                continue;
            };
            match &mut feed {
                Feed::Messages(last_seen) => {
                    let empty = async_nats::HeaderMap::new();
                    let headers = message.headers.as_ref().unwrap_or(&empty);
                    let Some((mailbox, generation, decoded)) = decode_message(
                        &shared.names,
                        message.subject.as_str(),
                        sequence,
                        headers,
                        message.payload.clone(),
                    ) else {
                        continue;
                    };
                    if last_seen.len() >= MAX_TRACKED_MAILBOXES {
                        last_seen.clear();
                    }
                    let prev = last_seen.insert(mailbox, sequence);
                    shared.remember(
                        sequence,
                        (mailbox, generation, decoded.payload.len() as u64),
                    );
                    listener.stored(&mailbox, &Arc::new(decoded), prev);
                }
                Feed::Events => {
                    let Some(event) = decode::<EventRecord>(&message.payload) else {
                        continue;
                    };
                    if event.origin == shared.origin {
                        continue;
                    }
                    dispatch(&**listener, &event);
                }
            }
        }
        if let Feed::Messages(last_seen) = &mut feed {
            // Whatever the next consumer skips (nothing, normally) must not look gapless.
            last_seen.clear();
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// Hands one notice of another relay to the listener.
pub fn dispatch(listener: &dyn Listener, event: &EventRecord) {
    let Some(mailbox) = event.mailbox() else {
        return;
    };
    match EventKind::try_from(event.kind) {
        Ok(EventKind::Removed) => listener.removed(&mailbox, &event.ids),
        Ok(EventKind::Closed) => listener.closed(&mailbox),
        Ok(EventKind::PreKeysLow) => {
            listener.prekeys_low(&mailbox.identity, mailbox.device, event.count)
        }
        _ => {}
    }
}
