//! Admission before work. A connection costs the relay nothing but a slot until it has sent
//! its whole `Init`; only then does it queue for handshake crypto, and the queue serves source
//! addresses round-robin, so one address that floods with bad signatures delays a good
//! handshake by at most one verification per competing address. Unauthenticated connections
//! are capped per address (IPv6 per /64) and relay-wide; when the relay-wide cap is reached the
//! oldest unauthenticated connection makes room. (Bytes of partly received frames count against
//! one relay-wide budget too: [`crate::connection::InboundBudget`].)

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;
use crate::ratelimit::address_group;

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The address already has `max_unauthenticated_per_ip` connections in their handshake.
    PerAddress,
}

#[derive(Default)]
struct Unauthenticated {
    per_address: HashMap<IpAddr, usize>,
    /// Connections by arrival order; entries of connections already gone are skipped.
    order: VecDeque<u64>,
    live: HashMap<u64, (IpAddr, CancellationToken)>,
    next_id: u64,
    /// Connections closed to make room, since start.
    evicted: u64,
}

/// Caps on connections that have not completed their handshake.
pub struct Admission {
    max_total: usize,
    max_per_address: usize,
    state: Mutex<Unauthenticated>,
    gauge: metrics::Gauge,
    evictions: metrics::Counter,
}

/// An unauthenticated connection's place; dropping it (or [`Ticket::authenticated`]) frees it.
pub struct Ticket {
    admission: Arc<Admission>,
    id: u64,
    /// Fires when the relay closes this connection to make room for a newer one.
    pub evicted: CancellationToken,
    done: bool,
}

impl Admission {
    pub fn new(max_total: usize, max_per_address: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total: max_total.max(1),
            max_per_address: max_per_address.max(1),
            state: Mutex::new(Unauthenticated::default()),
            gauge: metrics::gauge!(m::CONNECTIONS_UNAUTHENTICATED),
            evictions: metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => "evicted_unauthenticated"),
        })
    }

    /// Admits a new connection from `ip`, closing the oldest unauthenticated one if the
    /// relay-wide cap is reached.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refusal> {
        let group = address_group(ip);
        let mut state = self.state.lock();
        let count = state.per_address.get(&group).copied().unwrap_or(0);
        if count >= self.max_per_address {
            return Err(Refusal::PerAddress);
        }
        while state.live.len() >= self.max_total {
            let Some(oldest) = state.order.pop_front() else {
                break;
            };
            if let Some((old_group, token)) = state.live.remove(&oldest) {
                token.cancel();
                Self::forget(&mut state, old_group);
                state.evicted += 1;
                self.evictions.increment(1);
            }
        }
        let id = state.next_id;
        state.next_id += 1;
        let evicted = CancellationToken::new();
        state.live.insert(id, (group, evicted.clone()));
        state.order.push_back(id);
        *state.per_address.entry(group).or_default() += 1;
        // Entries of finished connections linger in `order` until passed; keep that bounded.
        if state.order.len() > 2 * state.live.len() + 64 {
            let Unauthenticated { order, live, .. } = &mut *state;
            order.retain(|id| live.contains_key(id));
        }
        self.gauge.set(state.live.len() as f64);
        Ok(Ticket {
            admission: self.clone(),
            id,
            evicted,
            done: false,
        })
    }

    fn forget(state: &mut Unauthenticated, group: IpAddr) {
        if let Some(count) = state.per_address.get_mut(&group) {
            *count -= 1;
            if *count == 0 {
                state.per_address.remove(&group);
            }
        }
    }

    fn release(&self, id: u64) {
        let mut state = self.state.lock();
        if let Some((group, _)) = state.live.remove(&id) {
            Self::forget(&mut state, group);
        }
        self.gauge.set(state.live.len() as f64);
    }

    /// Connections currently unauthenticated.
    pub fn unauthenticated(&self) -> usize {
        self.state.lock().live.len()
    }

    /// Unauthenticated connections closed to make room for newer ones, since start.
    pub fn evicted(&self) -> u64 {
        self.state.lock().evicted
    }
}

impl Ticket {
    /// The handshake completed: the connection no longer counts as unauthenticated.
    pub fn authenticated(mut self) {
        self.done = true;
        self.admission.release(self.id);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done {
            self.admission.release(self.id);
        }
    }
}

#[derive(Default)]
struct Queues {
    in_use: usize,
    waiting: HashMap<IpAddr, VecDeque<oneshot::Sender<()>>>,
    /// Addresses with waiters, in turn order.
    turns: VecDeque<IpAddr>,
}

/// Slots for handshake crypto, handed out round-robin by source address.
pub struct CryptoSlots {
    slots: usize,
    queues: Mutex<Queues>,
    gauge: metrics::Gauge,
}

/// A slot for one handshake's crypto; dropping it hands the slot to the next address in turn.
pub struct CryptoPermit {
    slots: Arc<CryptoSlots>,
}

impl CryptoSlots {
    pub fn new(slots: usize) -> Arc<Self> {
        Arc::new(Self {
            slots: slots.max(1),
            queues: Mutex::new(Queues::default()),
            gauge: metrics::gauge!(m::HANDSHAKES_WAITING),
        })
    }

    /// Waits for a slot, behind at most one waiter of each other address per turn.
    pub async fn acquire(self: &Arc<Self>, ip: IpAddr) -> CryptoPermit {
        let group = address_group(ip);
        let wait = {
            let mut queues = self.queues.lock();
            if queues.in_use < self.slots && queues.turns.is_empty() {
                queues.in_use += 1;
                None
            } else {
                let (tx, rx) = oneshot::channel();
                let Queues { waiting, turns, .. } = &mut *queues;
                let queue = waiting.entry(group).or_default();
                if queue.is_empty() {
                    turns.push_back(group);
                }
                queue.push_back(tx);
                self.gauge.increment(1.0);
                Some(rx)
            }
        };
        if let Some(rx) = wait {
            // Ours once handed over. If this future is dropped while waiting, the guard closes
            // the channel, so a later handover goes to the next waiter, and passes on a slot
            // that was handed over but not yet taken.
            let mut waiting = Waiting {
                rx,
                slots: self.clone(),
                done: false,
            };
            let _ = (&mut waiting.rx).await;
            waiting.done = true;
        }
        CryptoPermit {
            slots: self.clone(),
        }
    }

    /// Connections queued for a turn (including ones that gave up and are not yet passed over).
    pub fn waiting(&self) -> usize {
        self.queues.lock().waiting.values().map(VecDeque::len).sum()
    }
}

/// A queued [`CryptoSlots::acquire`]: if it is dropped after the slot was handed to it but
/// before it took the slot (a timeout or an eviction firing at that moment), the slot goes on
/// to the next waiter instead of being lost.
struct Waiting {
    rx: oneshot::Receiver<()>,
    slots: Arc<CryptoSlots>,
    done: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.rx.close();
        if self.rx.try_recv().is_ok() {
            drop(CryptoPermit {
                slots: self.slots.clone(),
            });
        }
    }
}

impl Drop for CryptoPermit {
    fn drop(&mut self) {
        let mut queues = self.slots.queues.lock();
        loop {
            let Some(group) = queues.turns.pop_front() else {
                queues.in_use -= 1;
                return;
            };
            let queue = queues
                .waiting
                .get_mut(&group)
                .expect("turns name queued addresses");
            let waiter = queue.pop_front().expect("queued addresses have waiters");
            if queue.is_empty() {
                queues.waiting.remove(&group);
            } else {
                queues.turns.push_back(group);
            }
            self.slots.gauge.decrement(1.0);
            // A waiter that gave up (timed out, evicted) has dropped its receiver.
            if waiter.send(()).is_ok() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn per_address_cap_and_eviction_of_the_oldest() {
        let admission = Admission::new(3, 2);
        let a1 = admission.admit(ip("10.0.0.1")).unwrap();
        let _a2 = admission.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(
            admission.admit(ip("10.0.0.1")).err(),
            Some(Refusal::PerAddress)
        );
        let _b1 = admission.admit(ip("10.0.0.2")).unwrap();
        // Full relay-wide: the oldest (a1) makes room.
        let _c1 = admission.admit(ip("10.0.0.3")).unwrap();
        assert!(a1.evicted.is_cancelled());
        assert_eq!(admission.unauthenticated(), 3);
        drop(a1);
        assert_eq!(admission.unauthenticated(), 3, "already counted out");
        // a1's address has room again.
        let a3 = admission.admit(ip("10.0.0.1")).unwrap();
        a3.authenticated();
        assert_eq!(admission.unauthenticated(), 2);
    }

    #[tokio::test]
    async fn crypto_slots_serve_addresses_in_turn() {
        let slots = CryptoSlots::new(1);
        let first = slots.acquire(ip("10.0.0.1")).await;
        let (order_tx, mut order_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        // Five waiters from a flooding address, then one from a quiet one.
        for n in 0..5 {
            let (slots, tx) = (slots.clone(), order_tx.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = slots.acquire(ip("10.0.0.1")).await;
                tx.send(format!("flood{n}")).unwrap();
            }));
            tokio::task::yield_now().await;
        }
        let (quiet, tx) = (slots.clone(), order_tx.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = quiet.acquire(ip("10.0.0.9")).await;
            tx.send("quiet".to_owned()).unwrap();
        }));
        tokio::task::yield_now().await;
        drop(first);
        for task in tasks {
            task.await.unwrap();
        }
        drop(order_tx);
        let mut order = Vec::new();
        while let Some(who) = order_rx.recv().await {
            order.push(who);
        }
        assert_eq!(
            order[..2],
            ["flood0".to_owned(), "quiet".to_owned()],
            "{order:?}"
        );
    }
}
