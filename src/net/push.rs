//! The path for unsolicited frames towards one session (live deliveries, notices). Its depth is
//! bounded in bytes: a push that would pass `max_outbound_bytes` is refused and the session is
//! told to close as a slow consumer, so a reader that never reads cannot grow the relay's memory.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use prost::Message;
use tokio::sync::mpsc;

use crate::proto::Frame;

/// What the connection task receives from the push path.
#[derive(Debug)]
pub enum Push {
    Frame(Box<Frame>),
    /// The queue overflowed: send `SLOW_CONSUMER` and close.
    SlowConsumer,
}

#[derive(Debug)]
struct Depth {
    bytes: AtomicUsize,
    overflowed: AtomicBool,
    /// The application paused its pushes and wants to hear when the queue has drained.
    resume_wanted: AtomicBool,
    limit: usize,
}

/// Cloneable sender side, held by the application.
#[derive(Debug, Clone)]
pub struct PushHandle {
    tx: mpsc::UnboundedSender<(Push, usize)>,
    depth: Arc<Depth>,
}

/// Receiver side, held by the connection task.
#[derive(Debug)]
pub struct PushReceiver {
    rx: mpsc::UnboundedReceiver<(Push, usize)>,
    depth: Arc<Depth>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PushError {
    #[error("session is gone")]
    Closed,
    #[error("session's outbound queue is full")]
    SlowConsumer,
}

/// A push path bounded to `limit` queued bytes.
pub fn channel(limit: usize) -> (PushHandle, PushReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let depth = Arc::new(Depth {
        bytes: AtomicUsize::new(0),
        overflowed: AtomicBool::new(false),
        resume_wanted: AtomicBool::new(false),
        limit,
    });
    (
        PushHandle {
            tx,
            depth: depth.clone(),
        },
        PushReceiver { rx, depth },
    )
}

impl PushHandle {
    /// Queues a frame for the session. Never blocks; refuses when the session is gone or behind.
    pub fn push(&self, frame: Frame) -> Result<(), PushError> {
        if self.depth.overflowed.load(Ordering::Acquire) {
            return Err(PushError::SlowConsumer);
        }
        let size = frame.encoded_len();
        let queued = self.depth.bytes.fetch_add(size, Ordering::AcqRel) + size;
        if queued > self.depth.limit {
            self.depth.bytes.fetch_sub(size, Ordering::AcqRel);
            if !self.depth.overflowed.swap(true, Ordering::AcqRel) {
                let _ = self.tx.send((Push::SlowConsumer, 0));
            }
            return Err(PushError::SlowConsumer);
        }
        self.tx
            .send((Push::Frame(Box::new(frame)), size))
            .map_err(|_| {
                self.depth.bytes.fetch_sub(size, Ordering::AcqRel);
                PushError::Closed
            })
    }

    /// Bytes queued and not yet taken by the session.
    pub fn queued_bytes(&self) -> usize {
        self.depth.bytes.load(Ordering::Acquire)
    }

    /// The queue's limit in bytes; past it the session is closed as a slow consumer.
    pub fn limit(&self) -> usize {
        self.depth.limit
    }

    /// Asks the session to call the handler's `resume` once everything queued has been taken.
    pub fn request_resume(&self) {
        self.depth.resume_wanted.store(true, Ordering::Release);
    }

    /// True while a requested resume has not happened yet: the application paused its pushes.
    pub fn resume_pending(&self) -> bool {
        self.depth.resume_wanted.load(Ordering::Acquire)
    }

    /// True once the session ended.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// True when both handles lead to the same session.
    pub fn same_session(&self, other: &PushHandle) -> bool {
        self.tx.same_channel(&other.tx)
    }
}

impl PushReceiver {
    pub async fn recv(&mut self) -> Option<Push> {
        let (push, size) = self.rx.recv().await?;
        self.depth.bytes.fetch_sub(size, Ordering::AcqRel);
        Some(push)
    }

    /// The next queued push, if one is waiting.
    pub fn try_recv(&mut self) -> Option<Push> {
        let (push, size) = self.rx.try_recv().ok()?;
        self.depth.bytes.fetch_sub(size, Ordering::AcqRel);
        Some(push)
    }

    /// Bytes queued and not yet taken.
    pub fn queued_bytes(&self) -> usize {
        self.depth.bytes.load(Ordering::Acquire)
    }

    /// True (once) when a resume was requested and the queue is now empty.
    pub fn take_resume(&self) -> bool {
        self.queued_bytes() == 0 && self.depth.resume_wanted.swap(false, Ordering::AcqRel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ErrorCode;

    #[tokio::test]
    async fn overflow_turns_into_one_slow_consumer_notice() {
        let frame = Frame::error(0, ErrorCode::Internal, "x".repeat(100));
        let size = frame.encoded_len();
        let (handle, mut rx) = channel(size * 2);
        handle.push(frame.clone()).unwrap();
        handle.push(frame.clone()).unwrap();
        assert_eq!(handle.push(frame.clone()), Err(PushError::SlowConsumer));
        assert_eq!(handle.push(frame.clone()), Err(PushError::SlowConsumer));
        assert!(matches!(rx.recv().await, Some(Push::Frame(_))));
        assert!(matches!(rx.recv().await, Some(Push::Frame(_))));
        assert!(matches!(rx.recv().await, Some(Push::SlowConsumer)));
        assert_eq!(rx.queued_bytes(), 0);
        drop(rx);
        assert!(handle.is_closed());
    }
}
