//! The contract between the network glue ([`crate::net`]) and the application it serves
//! ([`crate::relay`]): the [`Handler`] a connection drives, the [`Answer`]s it returns, the
//! [`Outgoing`] frames a connection seals, and the push path for unsolicited frames towards one
//! session ([`PushHandle`]).
//!
//! The push path is bounded in bytes: a push that would pass `max_outbound_bytes` is refused
//! and the session is told to close as a slow consumer, so a reader that never reads cannot grow
//! the relay's memory.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use botd_protocol::keys::PublicKeyBytes;
use botd_protocol::message::DeliverFrame;
use botd_protocol::proto::{unsupported_unless_ignorable, Frame};
use botd_protocol::session::{Session, SessionError};
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use prost::Message as _;

/// A future answer, boxed so that a connection can keep a queue of them.
pub type PendingAnswer = Pin<Box<dyn Future<Output = Outgoing> + Send>>;

/// What a handler makes of one frame.
pub enum Answer {
    /// No answer (e.g. for a `Pong` or an `Error` from the peer).
    None,
    Ready(Outgoing),
    /// An answer that waits (for the disk, or a remote store). The connection polls it once
    /// right away, so whatever it does before its first wait happens in arrival order.
    Pending(PendingAnswer),
}

impl Answer {
    pub fn frame(frame: Frame) -> Self {
        Answer::Ready(Outgoing::Frame(frame))
    }

    pub fn pending(future: impl Future<Output = Outgoing> + Send + 'static) -> Self {
        Answer::Pending(Box::pin(future))
    }
}

/// The application served over authenticated sessions.
pub trait Handler: Send + Sync + 'static {
    /// Per-session state of the application.
    type Session: Send + 'static;

    /// A session for `peer`, connected from `addr`, is established; frames pushed through
    /// `push` reach it unsolicited.
    fn connect(&self, peer: PublicKeyBytes, addr: SocketAddr, push: PushHandle) -> Self::Session;

    /// Answers one frame that the session layer passed up (a request, or a frame the
    /// application must judge). Frames come in arrival order; answers leave in that order.
    fn request(&self, session: &mut Self::Session, frame: Frame) -> Answer;

    /// True for a frame whose handling pushes frames that must follow its answer (e.g. a
    /// subscription's first deliveries): the connection hands it over only once every
    /// earlier answer has gone out.
    fn is_barrier(&self, _frame: &Frame) -> bool {
        false
    }

    /// How many answers one session may have pending at once.
    fn max_pipelined(&self) -> usize {
        1
    }

    /// The connection has handed over every request it could read for now and will wait for
    /// the answers: the moment for a store to write them in one go.
    fn flush(&self) {}

    /// While the application is behind (e.g. its journal), a future that resolves when it
    /// can take more requests; the connection reads no further request until then.
    fn congestion(&self) -> Option<Pin<Box<dyn Future<Output = ()> + Send>>> {
        None
    }

    /// The session's push queue drained after the application asked to hear of it
    /// ([`PushHandle::request_resume`]): paused pushes may continue.
    fn resume(&self, _session: &mut Self::Session) {}

    /// The session ended.
    fn disconnect(&self, session: Self::Session);
}

/// A handler that serves no application: every request is `UNSUPPORTED`.
#[derive(Debug, Default, Clone, Copy)]
pub struct TransportOnly;

impl Handler for TransportOnly {
    type Session = ();

    fn connect(&self, _peer: PublicKeyBytes, _addr: SocketAddr, _push: PushHandle) {}

    fn request(&self, _session: &mut (), frame: Frame) -> Answer {
        unsupported_unless_ignorable(&frame).map_or(Answer::None, Answer::frame)
    }

    fn disconnect(&self, _session: ()) {}
}

/// A frame for the connection to seal.
#[derive(Debug, Clone)]
pub enum Outgoing {
    Frame(Frame),
    /// A stored message, encoded straight from the store's type when it is sealed: no copy of
    /// the payload and no allocation per delivery.
    Deliver(DeliverFrame),
}

impl Outgoing {
    /// Bytes of the encoded `Frame`.
    pub fn encoded_len(&self) -> usize {
        match self {
            Outgoing::Frame(frame) => frame.encoded_len(),
            Outgoing::Deliver(deliver) => deliver.encoded_len(),
        }
    }

    /// Seals the frame into the session's output.
    pub fn seal(&self, session: &mut Session) -> Result<(), SessionError> {
        match self {
            Outgoing::Frame(frame) => session.send(frame),
            Outgoing::Deliver(deliver) => deliver.seal(session),
        }
    }

    /// The frame id it carries.
    pub fn frame_id(&self) -> u64 {
        match self {
            Outgoing::Frame(frame) => frame.id,
            Outgoing::Deliver(deliver) => deliver.frame_id,
        }
    }

    /// As a decoded `Frame` (for callers without a session, e.g. tests driving a handler).
    pub fn into_frame(self) -> Frame {
        match self {
            Outgoing::Frame(frame) => frame,
            Outgoing::Deliver(deliver) => deliver.to_frame(),
        }
    }
}

/// What the connection task receives from the push path.
// Pushes live in the channel's slots inline; boxing the frame would cost an allocation per
// delivery instead.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Push {
    Out(Outgoing),
    /// The queue overflowed: send `SLOW_CONSUMER` and close.
    SlowConsumer,
}

/// The queue between the application and one connection. It holds no memory while empty (an
/// idle session costs nothing here), and the receiver is woken once per batch, not per push.
#[derive(Debug)]
struct Queue {
    items: Mutex<VecDeque<(Push, usize)>>,
    waker: AtomicWaker,
    /// Bytes queued and not yet taken.
    bytes: AtomicUsize,
    overflowed: AtomicBool,
    /// The application paused its pushes and wants to hear when the queue has drained.
    resume_wanted: AtomicBool,
    /// The receiver is gone.
    closed: AtomicBool,
    /// Live senders; at zero the receiver hears that nothing more will come.
    senders: AtomicUsize,
    limit: usize,
}

/// Cloneable sender side, held by the application.
#[derive(Debug)]
pub struct PushHandle {
    queue: Arc<Queue>,
}

/// Receiver side, held by the connection task.
#[derive(Debug)]
pub struct PushReceiver {
    queue: Arc<Queue>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PushError {
    #[error("session is gone")]
    Closed,
    #[error("session's outbound queue is full")]
    SlowConsumer,
}

/// A push path bounded to `limit` queued bytes.
pub fn push_channel(limit: usize) -> (PushHandle, PushReceiver) {
    let queue = Arc::new(Queue {
        items: Mutex::new(VecDeque::new()),
        waker: AtomicWaker::new(),
        bytes: AtomicUsize::new(0),
        overflowed: AtomicBool::new(false),
        resume_wanted: AtomicBool::new(false),
        closed: AtomicBool::new(false),
        senders: AtomicUsize::new(1),
        limit,
    });
    (
        PushHandle {
            queue: queue.clone(),
        },
        PushReceiver { queue },
    )
}

impl Queue {
    fn enqueue(&self, push: Push, size: usize) {
        let was_empty = {
            let mut items = self.items.lock();
            items.push_back((push, size));
            items.len() == 1
        };
        // A non-empty queue has already woken its receiver, which drains it all.
        if was_empty {
            self.waker.wake();
        }
    }
}

impl Clone for PushHandle {
    fn clone(&self) -> Self {
        self.queue.senders.fetch_add(1, Ordering::AcqRel);
        Self {
            queue: self.queue.clone(),
        }
    }
}

impl Drop for PushHandle {
    fn drop(&mut self) {
        if self.queue.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.queue.waker.wake();
        }
    }
}

impl PushHandle {
    /// Queues a frame for the session. Never blocks; refuses when the session is gone or behind.
    pub fn push(&self, out: Outgoing) -> Result<(), PushError> {
        let queue = &*self.queue;
        if queue.closed.load(Ordering::Acquire) {
            return Err(PushError::Closed);
        }
        if queue.overflowed.load(Ordering::Acquire) {
            return Err(PushError::SlowConsumer);
        }
        let size = out.encoded_len();
        let queued = queue.bytes.fetch_add(size, Ordering::AcqRel) + size;
        if queued > queue.limit {
            queue.bytes.fetch_sub(size, Ordering::AcqRel);
            if !queue.overflowed.swap(true, Ordering::AcqRel) {
                queue.enqueue(Push::SlowConsumer, 0);
            }
            return Err(PushError::SlowConsumer);
        }
        queue.enqueue(Push::Out(out), size);
        Ok(())
    }

    /// Queues a protobuf frame.
    pub fn push_frame(&self, frame: Frame) -> Result<(), PushError> {
        self.push(Outgoing::Frame(frame))
    }

    /// Bytes queued and not yet taken by the session.
    pub fn queued_bytes(&self) -> usize {
        self.queue.bytes.load(Ordering::Acquire)
    }

    /// The queue's limit in bytes; past it the session is closed as a slow consumer.
    pub fn limit(&self) -> usize {
        self.queue.limit
    }

    /// Asks the session to call the handler's `resume` once everything queued has been taken.
    pub fn request_resume(&self) {
        self.queue.resume_wanted.store(true, Ordering::Release);
    }

    /// True while a requested resume has not happened yet: the application paused its pushes.
    pub fn resume_pending(&self) -> bool {
        self.queue.resume_wanted.load(Ordering::Acquire)
    }

    /// True once the session ended.
    pub fn is_closed(&self) -> bool {
        self.queue.closed.load(Ordering::Acquire)
    }

    /// True when both handles lead to the same session.
    pub fn same_session(&self, other: &PushHandle) -> bool {
        Arc::ptr_eq(&self.queue, &other.queue)
    }
}

impl PushReceiver {
    fn take(&self) -> Option<Push> {
        let (push, size) = self.queue.items.lock().pop_front()?;
        self.queue.bytes.fetch_sub(size, Ordering::AcqRel);
        Some(push)
    }

    /// The next push, registering for a wake-up if none is queued; `None` once every sender
    /// is gone and the queue is empty.
    pub fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Push>> {
        if let Some(push) = self.take() {
            return std::task::Poll::Ready(Some(push));
        }
        self.queue.waker.register(cx.waker());
        match self.take() {
            Some(push) => std::task::Poll::Ready(Some(push)),
            None if self.queue.senders.load(Ordering::Acquire) == 0 => std::task::Poll::Ready(None),
            None => std::task::Poll::Pending,
        }
    }

    pub async fn recv(&mut self) -> Option<Push> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next queued push, if one is waiting.
    pub fn try_recv(&mut self) -> Option<Push> {
        self.take()
    }

    /// Bytes queued and not yet taken.
    pub fn queued_bytes(&self) -> usize {
        self.queue.bytes.load(Ordering::Acquire)
    }

    /// True (once) when a resume was requested and the queue is now empty.
    pub fn take_resume(&self) -> bool {
        self.queued_bytes() == 0 && self.queue.resume_wanted.swap(false, Ordering::AcqRel)
    }

    /// Gives back the queue's memory once it is empty (a burst of pushes leaves capacity).
    pub fn release_idle_memory(&self) {
        let mut items = self.queue.items.lock();
        if items.is_empty() && items.capacity() > 0 {
            *items = VecDeque::new();
        }
    }
}

impl Drop for PushReceiver {
    fn drop(&mut self) {
        self.queue.closed.store(true, Ordering::Release);
        // What is queued can no longer be delivered; let its memory go now.
        self.queue.items.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use botd_protocol::proto::ErrorCode;

    #[tokio::test]
    async fn overflow_turns_into_one_slow_consumer_notice() {
        let frame = Frame::error(0, ErrorCode::Internal, "x".repeat(100));
        let size = frame.encoded_len();
        let (handle, mut rx) = push_channel(size * 2);
        handle.push_frame(frame.clone()).unwrap();
        handle.push_frame(frame.clone()).unwrap();
        assert_eq!(
            handle.push_frame(frame.clone()),
            Err(PushError::SlowConsumer)
        );
        assert_eq!(
            handle.push_frame(frame.clone()),
            Err(PushError::SlowConsumer)
        );
        assert!(matches!(rx.recv().await, Some(Push::Out(_))));
        assert!(matches!(rx.recv().await, Some(Push::Out(_))));
        assert!(matches!(rx.recv().await, Some(Push::SlowConsumer)));
        assert_eq!(rx.queued_bytes(), 0);
        drop(rx);
        assert!(handle.is_closed());
    }
}
