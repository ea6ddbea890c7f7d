//! Call order per identity. The relay pipelines a session's requests, and the store promises
//! that calls made one after another take effect in that order (a `Send` after a `Register`
//! sees the device; two `Send`s to one mailbox get increasing ids). Operations on the cluster
//! run as tasks, which start in any order; each takes a ticket of its caller's identity when
//! it is called and waits for its turn before it does anything. A change hands the turn on
//! once it is done; a `Send` or an ack as soon as its write is on the connection (the server
//! applies one connection's writes in order), so a session's sends still flow back to back.

use std::collections::BTreeMap;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Poll, Waker};

use ahash::AHashMap;
use parking_lot::Mutex;

use crate::store::Identity;

struct Line {
    /// The next ticket to hand out.
    next: u64,
    /// The ticket whose turn it is.
    serving: u64,
    /// Tickets waiting for their turn, by number: a pass wakes only the ones it lets go (a
    /// session pipelines hundreds of calls, and waking every waiter on each pass cost a task
    /// poll per waiter per call).
    waiting: BTreeMap<u64, Waker>,
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
    done: bool,
}

impl Sequencer {
    /// A ticket behind every call of `identity` made so far.
    pub fn ticket(self: &Arc<Self>, identity: &Identity) -> Ticket {
        let mut lines = self.lines.lock();
        let line = lines.entry(*identity).or_insert_with(|| Line {
            next: 0,
            serving: 0,
            waiting: BTreeMap::new(),
        });
        let number = line.next;
        line.next += 1;
        Ticket {
            sequencer: self.clone(),
            identity: *identity,
            number,
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
        poll_fn(|cx| {
            let mut lines = self.sequencer.lines.lock();
            // No line: every ticket of it is done (a later one went first and closed it).
            let Some(line) = lines.get_mut(&self.identity) else {
                return Poll::Ready(());
            };
            if line.serving >= number {
                return Poll::Ready(());
            }
            match line.waiting.get_mut(&number) {
                Some(waker) => waker.clone_from(cx.waker()),
                None => {
                    line.waiting.insert(number, cx.waker().clone());
                }
            }
            Poll::Pending
        })
        .await
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
        line.waiting.remove(&self.number);
        // Tickets are served one after the other; a ticket dropped before its turn (its task
        // gone) must not turn the line back.
        let next = self.number + 1;
        line.serving = line.serving.max(next);
        while let Some(entry) = line.waiting.first_entry() {
            if *entry.key() > line.serving {
                break;
            }
            // Waking only schedules the task: safe under the lock.
            entry.remove().wake();
        }
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

    /// Counts wake-ups, to tell which waiting tickets a pass woke.
    struct CountingWaker(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_pass_wakes_only_the_ticket_whose_turn_it_is() {
        use std::future::Future;
        use std::sync::atomic::Ordering;
        let sequencer = Arc::new(Sequencer::default());
        let identity = [3; 33];
        let first = sequencer.ticket(&identity);
        let mut waiting: Vec<(Ticket, Arc<CountingWaker>)> = (0..3)
            .map(|_| {
                let counter = Arc::new(CountingWaker(0.into()));
                (sequencer.ticket(&identity), counter)
            })
            .collect();
        let poll = |ticket: &mut Ticket, counter: &Arc<CountingWaker>| {
            let waker = std::task::Waker::from(counter.clone());
            let mut cx = std::task::Context::from_waker(&waker);
            let turn = std::pin::pin!(ticket.turn());
            turn.poll(&mut cx).is_ready()
        };
        for (ticket, counter) in waiting.iter_mut() {
            assert!(!poll(ticket, counter), "every later ticket waits");
        }
        first.pass();
        let woken: Vec<usize> = waiting
            .iter()
            .map(|(_, counter)| counter.0.load(Ordering::SeqCst))
            .collect();
        assert_eq!(woken, [1, 0, 0], "only the next ticket is woken");
        let (mut second, counter) = waiting.remove(0);
        assert!(poll(&mut second, &counter));
        second.pass();
        let woken: Vec<usize> = waiting
            .iter()
            .map(|(_, counter)| counter.0.load(Ordering::SeqCst))
            .collect();
        assert_eq!(woken, [1, 0]);
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
