//! Received bytes not yet taken as frames: the read buffer, the length-prefix codec and the
//! relay-wide budget that partly received frames are charged to.
//!
//! Memory follows what the peer is doing: an empty buffer is given back, and room for a frame
//! announced but not complete is reserved only once the budget covers it, so many peers that
//! each start a large frame cannot make the relay hold more than `max_inbound_buffer_bytes`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use botd_protocol::codec::{frame_len_at_front, CodecError, FrameCodec};
use bytes::BytesMut;

use crate::metrics as m;

/// Bytes reserved for a read when no longer frame is announced (in a session; before the
/// handshake completes, the frame limit itself), at first: small frames arriving a few at a
/// time need no more.
const MIN_READ_CHUNK: usize = 4 * 1024;
/// The read size doubles, up to this, while reads fill the room they were given (a burst of
/// frames is read in fewer system calls); it starts small again once the connection is quiet.
const MAX_READ_CHUNK: usize = 64 * 1024;

/// Bytes of partly received frames, relay-wide.
pub struct InboundBudget {
    limit: usize,
    used: AtomicUsize,
    /// The most `used` has ever been.
    peak: AtomicUsize,
    gauge: metrics::Gauge,
}

impl InboundBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            gauge: metrics::gauge!(m::INBOUND_BUFFER_BYTES),
        })
    }

    /// Takes `bytes` from the budget, or nothing if that would pass the limit.
    pub fn try_charge(&self, bytes: usize) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            if used + bytes > self.limit {
                return false;
            }
            match self.used.compare_exchange_weak(
                used,
                used + bytes,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.peak.fetch_max(used + bytes, Ordering::Relaxed);
                    self.gauge.increment(bytes as f64);
                    return true;
                }
                Err(now) => used = now,
            }
        }
    }

    pub fn release(&self, bytes: usize) {
        if bytes > 0 {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
            self.gauge.decrement(bytes as f64);
        }
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The most the budget has held at once since start.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// Received bytes not yet taken as frames.
pub struct Inbound {
    buf: BytesMut,
    codec: FrameCodec,
    budget: Arc<InboundBudget>,
    /// Budget held for the partly received frame at the front of `buf`.
    charged: usize,
    /// When the first byte of the frame being received arrived.
    partial_since: Option<Instant>,
    /// Bytes reserved for the next read when no longer frame is announced.
    chunk: usize,
    /// Room the last [`Inbound::receive_buffer`] offered.
    offered: usize,
}

impl Inbound {
    pub fn new(max_frame_len: u32, budget: Arc<InboundBudget>) -> Self {
        Self {
            buf: BytesMut::new(),
            codec: FrameCodec::new(max_frame_len),
            budget,
            charged: 0,
            partial_since: None,
            chunk: MIN_READ_CHUNK,
            offered: 0,
        }
    }

    /// Raises (or lowers) the frame limit, e.g. from the handshake's to the session's.
    pub fn set_max_frame_len(&mut self, max_frame_len: u32) {
        self.codec.set_max_frame_len(max_frame_len);
    }

    /// The next complete frame body, if buffered (`now` dates a frame that begins here).
    pub fn next_frame(&mut self, now: Instant) -> Result<Option<BytesMut>, CodecError> {
        let frame = self.codec.decode(&mut self.buf)?;
        if frame.is_some() {
            self.budget.release(std::mem::take(&mut self.charged));
            self.partial_since = None;
        }
        if !self.buf.is_empty() && self.partial_since.is_none() {
            self.partial_since = Some(now);
        }
        Ok(frame)
    }

    /// The buffer to append received bytes to, with room reserved for what is expected next:
    /// the rest of a frame whose length has arrived (charged to the budget first), else a
    /// chunk. `None` when the budget cannot cover the frame being received: try again later.
    pub fn receive_buffer(&mut self) -> Option<&mut BytesMut> {
        let want = match frame_len_at_front(&self.buf) {
            Some(total) if total > self.buf.len() => {
                if self.charged < total {
                    if !self.budget.try_charge(total - self.charged) {
                        return None;
                    }
                    self.charged = total;
                }
                total - self.buf.len()
            }
            _ => self.chunk.min(self.codec.max_frame_len() as usize + 4),
        };
        if self.buf.capacity() - self.buf.len() < want {
            self.buf.reserve(want);
        }
        self.offered = self.buf.capacity() - self.buf.len();
        Some(&mut self.buf)
    }

    /// `n` bytes were appended to the buffer [`Inbound::receive_buffer`] gave: a read that
    /// filled its room makes the next one larger.
    pub fn on_read(&mut self, n: usize) {
        if n >= self.offered {
            self.chunk = (self.chunk * 2).min(MAX_READ_CHUNK);
        }
    }

    /// Bytes received and not yet taken as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The peer closed its side: fine between frames, a truncated frame otherwise.
    pub fn on_peer_closed(&self) -> Result<(), CodecError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(CodecError::Truncated {
                buffered: self.buf.len(),
            })
        }
    }

    /// Gives back the spare room of a buffer that holds only a few bytes of a frame whose
    /// length has not arrived yet (an empty buffer is kept for the next read until
    /// [`Inbound::release`]).
    pub fn compact(&mut self) {
        if !self.buf.is_empty()
            && frame_len_at_front(&self.buf).is_none()
            && self.buf.capacity() > 1024
        {
            self.buf = BytesMut::from(&self.buf[..]);
        }
    }

    /// Gives back the buffer if it is empty (the connection went quiet), and starts reading
    /// small again.
    pub fn release(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
        self.chunk = MIN_READ_CHUNK;
    }

    /// When the frame being received, if any, must be complete.
    pub fn frame_deadline(&self, frame_timeout: Duration) -> Option<Instant> {
        self.partial_since.map(|since| since + frame_timeout)
    }

    /// Moves the start of the frame being received `by` later: time the relay did not read.
    pub fn shift_frame_clock(&mut self, by: Duration) {
        if let Some(since) = &mut self.partial_since {
            *since += by;
        }
    }
}

impl Drop for Inbound {
    fn drop(&mut self) {
        self.budget.release(self.charged);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_never_passes_its_limit() {
        let budget = InboundBudget::new(100);
        assert!(budget.try_charge(60));
        assert!(!budget.try_charge(41));
        assert!(budget.try_charge(40));
        budget.release(60);
        assert_eq!(budget.used(), 40);
    }

    #[test]
    fn a_partly_received_frame_is_charged_until_complete_or_dropped() {
        let budget = InboundBudget::new(1000);
        let now = Instant::now();
        let mut inbound = Inbound::new(4096, budget.clone());
        // Only the length prefix of a 600-byte frame: its whole length is charged.
        inbound
            .receive_buffer()
            .expect("budget")
            .extend_from_slice(&600u32.to_be_bytes());
        assert!(inbound.next_frame(now).unwrap().is_none());
        assert_eq!(
            inbound.frame_deadline(Duration::from_secs(1)),
            Some(now + Duration::from_secs(1))
        );
        let buf = inbound.receive_buffer().expect("budget");
        assert!(buf.capacity() >= 604);
        assert_eq!(budget.used(), 604);
        buf.extend_from_slice(&[7; 600]);
        assert_eq!(inbound.next_frame(now).unwrap().map(|f| f.len()), Some(600));
        assert_eq!(budget.used(), 0);
        assert_eq!(inbound.frame_deadline(Duration::from_secs(1)), None);

        // Another frame started, then the connection goes: its charge is given back.
        inbound
            .receive_buffer()
            .unwrap()
            .extend_from_slice(&900u32.to_be_bytes());
        assert!(inbound.next_frame(now).unwrap().is_none());
        assert!(inbound.receive_buffer().is_some());
        assert_eq!(budget.used(), 904);
        assert!(inbound.on_peer_closed().is_err(), "truncated");
        drop(inbound);
        assert_eq!(budget.used(), 0);
    }
}
