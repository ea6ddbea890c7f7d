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

use bytes::BufMut;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use prost::Message as _;

use crate::core::keys::PublicKeyBytes;
use crate::core::session::{Session, SessionError};
use crate::proto::{Body, ErrorCode, Frame};
use crate::store::Message;

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

/// The answer of a relay to a frame it does not serve: `Error{UNSUPPORTED}`, except for frames
/// that must never be answered (errors and pongs from the peer, to avoid reply loops).
pub fn unsupported_unless_ignorable(frame: &Frame) -> Option<Frame> {
    match &frame.body {
        Some(Body::Error(_)) | Some(Body::Pong(_)) => None,
        Some(body) => Some(Frame::error(
            frame.id,
            ErrorCode::Unsupported,
            format!("{} is not a request this relay serves", body.kind()),
        )),
        None => Some(Frame::error(
            frame.id,
            ErrorCode::Unsupported,
            "missing frame body",
        )),
    }
}

/// A frame for the connection to seal.
#[derive(Debug, Clone)]
pub enum Outgoing {
    Frame(Frame),
    /// `Frame { id: frame_id, deliver }` of a stored message, encoded straight from the store's
    /// type: no copy of the payload and no allocation per delivery.
    Deliver {
        frame_id: u64,
        device: u32,
        message: Arc<Message>,
    },
}

const FRAME_ID_TAG: u32 = 1;
const FRAME_DELIVER_TAG: u32 = 36;

fn varint_field_len(tag: u32, value: u64) -> usize {
    if value == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(value)
    }
}

fn varint_field(tag: u32, value: u64, buf: &mut impl BufMut) {
    if value != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(value, buf);
    }
}

fn bytes_field_len(tag: u32, len: usize) -> usize {
    if len == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(len as u64) + len
    }
}

fn bytes_field(tag: u32, value: &[u8], buf: &mut impl BufMut) {
    if !value.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(value.len() as u64, buf);
        buf.put_slice(value);
    }
}

/// Encoded length of the `Deliver` message (without the `Frame` around it).
fn deliver_len(device: u32, m: &Message) -> usize {
    varint_field_len(1, m.id)
        + bytes_field_len(2, m.sender.len())
        + varint_field_len(3, u64::from(m.sender_device))
        + varint_field_len(4, u64::from(device))
        + bytes_field_len(5, m.nonce.len())
        + bytes_field_len(6, m.payload_hash.len())
        + bytes_field_len(7, m.signature.len())
        + bytes_field_len(8, m.payload.len())
        + varint_field_len(9, m.received_at_ms)
}

/// Bytes of a `Deliver` frame before its payload, at most: frame id, the body's key and length,
/// fields 1 to 7 and field 8's key and length.
const DELIVER_HEAD_MAX: usize = 11 + 6 + 11 + 35 + 6 + 6 + 10 + 34 + 66 + 6;

/// `Frame { id: frame_id, deliver: <m for device> }` in protobuf's canonical encoding, up to
/// and including the payload's length (the payload and field 9 follow).
fn encode_deliver_head(frame_id: u64, device: u32, m: &Message, buf: &mut impl BufMut) {
    varint_field(FRAME_ID_TAG, frame_id, buf);
    encode_key(FRAME_DELIVER_TAG, WireType::LengthDelimited, buf);
    encode_varint(deliver_len(device, m) as u64, buf);
    varint_field(1, m.id, buf);
    bytes_field(2, &m.sender, buf);
    varint_field(3, u64::from(m.sender_device), buf);
    varint_field(4, u64::from(device), buf);
    bytes_field(5, &m.nonce, buf);
    bytes_field(6, &m.payload_hash, buf);
    bytes_field(7, &m.signature, buf);
    if !m.payload.is_empty() {
        encode_key(8, WireType::LengthDelimited, buf);
        encode_varint(m.payload.len() as u64, buf);
    }
}

impl Outgoing {
    /// Bytes of the encoded `Frame`.
    pub fn encoded_len(&self) -> usize {
        match self {
            Outgoing::Frame(frame) => frame.encoded_len(),
            Outgoing::Deliver {
                frame_id,
                device,
                message,
            } => {
                let inner = deliver_len(*device, message);
                varint_field_len(FRAME_ID_TAG, *frame_id)
                    + key_len(FRAME_DELIVER_TAG)
                    + encoded_len_varint(inner as u64)
                    + inner
            }
        }
    }

    /// Seals the frame into the session's output.
    pub fn seal(&self, session: &mut Session) -> Result<(), SessionError> {
        match self {
            Outgoing::Frame(frame) => session.send(frame),
            Outgoing::Deliver {
                frame_id,
                device,
                message,
            } => {
                // Everything but the payload (and the time after it) is encoded here; the
                // payload is encrypted from where the store keeps it.
                let mut head = [0u8; DELIVER_HEAD_MAX];
                let mut tail = [0u8; 16];
                let (head_len, tail_len) = {
                    let (mut h, mut t) = (&mut head[..], &mut tail[..]);
                    encode_deliver_head(*frame_id, *device, message, &mut h);
                    varint_field(9, message.received_at_ms, &mut t);
                    (DELIVER_HEAD_MAX - h.len(), 16 - t.len())
                };
                session.send_parts(&[&head[..head_len], &message.payload, &tail[..tail_len]])
            }
        }
    }

    /// The frame id it carries.
    pub fn frame_id(&self) -> u64 {
        match self {
            Outgoing::Frame(frame) => frame.id,
            Outgoing::Deliver { frame_id, .. } => *frame_id,
        }
    }

    /// As a decoded `Frame` (for callers without a session, e.g. tests driving a handler).
    pub fn into_frame(self) -> Frame {
        match self {
            Outgoing::Frame(frame) => frame,
            Outgoing::Deliver {
                frame_id,
                device,
                message,
            } => Frame::new(frame_id, Body::Deliver(deliver_body(device, &message))),
        }
    }
}

/// The protobuf `Deliver` of a stored message.
pub fn deliver_body(device: u32, m: &Message) -> crate::proto::Deliver {
    use bytes::Bytes;
    crate::proto::Deliver {
        message_id: m.id,
        sender: Bytes::copy_from_slice(&m.sender),
        sender_device: m.sender_device,
        recipient_device: device,
        sender_nonce: Bytes::copy_from_slice(&m.nonce),
        payload_hash: Bytes::copy_from_slice(&m.payload_hash),
        sender_signature: Bytes::copy_from_slice(&m.signature),
        payload: m.payload.clone(),
        received_at_ms: m.received_at_ms,
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
    use bytes::Bytes;

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

    #[test]
    fn a_deliver_sealed_from_parts_is_the_protobuf_encoding() {
        for (id, payload, time) in [
            (1u64, &b"hello"[..], 1_767_225_600_000u64),
            (0, &b""[..], 0),
            (u64::MAX >> 2, &[7u8; 300][..], 5),
        ] {
            let message = Arc::new(Message {
                id,
                sender: [2; 33],
                sender_device: 3,
                nonce: [4; 8],
                payload_hash: [5; 32],
                signature: [6; 64],
                payload: Bytes::copy_from_slice(payload),
                received_at_ms: time,
            });
            let out = Outgoing::Deliver {
                frame_id: id ^ 9,
                device: 7,
                message,
            };
            let expected = out.clone().into_frame().encode_to_vec();
            assert_eq!(out.encoded_len(), expected.len());
            // Sealed as a connection seals it, then opened: the plaintext is the encoding.
            let keys = |b: u8| crate::core::cipher::DirectionKeys {
                enc: [b; 32],
                mac: [b + 1; 32],
            };
            let mut session = Session::responder(
                crate::core::handshake::SessionKeys {
                    send: keys(1),
                    recv: keys(3),
                },
                crate::core::session::Timers {
                    ping_min_interval: std::time::Duration::from_secs(30),
                    probe_after: None,
                    keepalive_after: None,
                    pong_timeout: std::time::Duration::from_secs(20),
                    idle_timeout: None,
                },
                1 << 20,
                tokio::time::Instant::now(),
            );
            out.seal(&mut session).unwrap();
            let wire = session.poll_transmit().unwrap();
            let mut opener = crate::core::cipher::Opener::new(keys(1));
            let buf = opener.open(bytes::BytesMut::from(&wire[4..])).unwrap();
            assert_eq!(&buf[..], &expected[..]);
        }
    }
}
