//! Call order per identity. The relay pipelines a session's requests, and the store promises
//! that calls made one after another take effect in that order (a `Send` after a `Register`
//! sees the device; two `Send`s to one mailbox get increasing ids). Operations on the cluster
//! run as tasks, which start in any order; each takes a ticket of its caller's identity when
//! it is called and waits for its turn before it does anything. A change hands the turn on
//! once it is done; a `Send` or an ack as soon as its write is on the connection (the server
//! applies one connection's writes in order), so a session's sends still flow back to back.

use std::sync::Arc;

use ahash::AHashMap;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::store::Identity;

struct Line {
    /// The next ticket to hand out.
    next: u64,
    /// The ticket whose turn it is.
    serving: watch::Sender<u64>,
}

/// One waiting line per identity with calls in progress; a line goes once it is empty.
#[derive(Default)]
pub struct Sequencer {
    lines: Mutex<AHashMap<Identity, Line>>,
}

/// A place in an identity's line; dropping it (done, failed or cancelled) hands the turn on.
pub struct Ticket {
    sequencer: Arc<Sequencer>,
    identity: Identity,
    number: u64,
    turn: watch::Receiver<u64>,
    done: bool,
}

impl Sequencer {
    /// A ticket behind every call of `identity` made so far.
    pub fn ticket(self: &Arc<Self>, identity: &Identity) -> Ticket {
        let mut lines = self.lines.lock();
        let line = lines.entry(*identity).or_insert_with(|| Line {
            next: 0,
            serving: watch::channel(0).0,
        });
        let number = line.next;
        line.next += 1;
        Ticket {
            sequencer: self.clone(),
            identity: *identity,
            number,
            turn: line.serving.subscribe(),
            done: false,
        }
    }

    /// True when no call of `identity` is waiting or in progress: a call may act at once.
    pub fn is_idle(&self, identity: &Identity) -> bool {
        !self.lines.lock().contains_key(identity)
    }

    /// Identities with calls in progress (bounded by the calls in flight).
    #[cfg(test)]
    pub fn lines(&self) -> usize {
        self.lines.lock().len()
    }
}

impl Ticket {
    /// Waits until every earlier call of the identity has handed the turn on.
    pub async fn turn(&mut self) {
        let number = self.number;
        // The sender lives while any ticket of the line does.
        let _ = self.turn.wait_for(|serving| *serving >= number).await;
    }

    /// Hands the turn to the next call.
    pub fn pass(mut self) {
        self.release();
    }

    fn release(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let mut lines = self.sequencer.lines.lock();
        let Some(line) = lines.get_mut(&self.identity) else {
            return;
        };
        // Tickets are served one after the other; a ticket dropped before its turn (its task
        // gone) must not turn the line back.
        let next = self.number + 1;
        line.serving.send_if_modified(|serving| {
            let moved = *serving < next;
            *serving = (*serving).max(next);
            moved
        });
        if line.next == next {
            lines.remove(&self.identity);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tickets_are_served_in_the_order_they_were_taken() {
        let sequencer = Arc::new(Sequencer::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let identity = [7; 33];
        let tickets: Vec<Ticket> = (0..5).map(|_| sequencer.ticket(&identity)).collect();
        // Started in reverse: each still waits for the ones taken before it.
        let mut tasks = Vec::new();
        for (i, mut ticket) in tickets.into_iter().enumerate().rev() {
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                ticket.turn().await;
                order.lock().push(i);
                ticket.pass();
            }));
        }
        for task in tasks {
            tokio::time::timeout(std::time::Duration::from_secs(5), task)
                .await
                .expect("served in time")
                .unwrap();
        }
        assert_eq!(*order.lock(), [0, 1, 2, 3, 4]);
        assert_eq!(sequencer.lines(), 0, "an empty line goes");
    }

    #[tokio::test]
    async fn a_dropped_ticket_hands_the_turn_on_and_identities_do_not_wait_for_each_other() {
        let sequencer = Arc::new(Sequencer::default());
        let first = sequencer.ticket(&[1; 33]);
        let mut second = sequencer.ticket(&[1; 33]);
        let mut other = sequencer.ticket(&[2; 33]);
        tokio::time::timeout(std::time::Duration::from_secs(5), other.turn())
            .await
            .expect("another identity is not held up");
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(5), second.turn())
            .await
            .expect("served after the dropped ticket");
        drop(second);
        drop(other);
        assert_eq!(sequencer.lines(), 0);
    }
}
