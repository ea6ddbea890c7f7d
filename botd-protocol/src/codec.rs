//! Framing: every frame is `len: u32 big-endian || body`. The length is checked against the
//! receiver's limit before a single body byte is buffered, so a hostile length costs nothing.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// The default `max_frame_len` of a relay (1 MiB), announced in `Welcome`.
pub const DEFAULT_MAX_FRAME_LEN: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("zero-length frame")]
    EmptyFrame,
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLong { len: u32, max: u32 },
    #[error("connection closed inside a frame ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl CodecError {
    /// Short stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            CodecError::EmptyFrame => "empty_frame",
            CodecError::FrameTooLong { .. } => "frame_too_long",
            CodecError::Truncated { .. } => "truncated_frame",
            CodecError::Io(_) => "io",
        }
    }
}

/// Splits a byte stream into frame bodies of at most `max_frame_len` bytes.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame_len: u32,
}

impl FrameCodec {
    pub fn new(max_frame_len: u32) -> Self {
        Self { max_frame_len }
    }

    /// The current limit.
    pub fn max_frame_len(&self) -> u32 {
        self.max_frame_len
    }

    /// Changes the limit, e.g. from the small handshake bound to the session bound.
    pub fn set_max_frame_len(&mut self, max_frame_len: u32) {
        self.max_frame_len = max_frame_len;
    }
}

impl FrameCodec {
    /// Takes the frame body at the front of `src` once all of it has arrived; refuses a zero or
    /// oversized length as soon as the prefix is there.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, CodecError> {
        let Some(header) = src.get(..LEN_PREFIX) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(header.try_into().expect("four bytes"));
        if len == 0 {
            return Err(CodecError::EmptyFrame);
        }
        if len > self.max_frame_len {
            return Err(CodecError::FrameTooLong {
                len,
                max: self.max_frame_len,
            });
        }
        let total = LEN_PREFIX + len as usize;
        if src.len() < total {
            // Memory for the rest is the reader's decision (it may count it against a budget).
            return Ok(None);
        }
        src.advance(LEN_PREFIX);
        Ok(Some(src.split_to(len as usize)))
    }

    /// As [`FrameCodec::decode`] at the end of the stream: a partial frame left is an error.
    pub fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, CodecError> {
        match FrameCodec::decode(self, src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(CodecError::Truncated {
                buffered: src.len(),
            }),
        }
    }
}

#[cfg(feature = "codec")]
impl tokio_util::codec::Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, CodecError> {
        FrameCodec::decode(self, src)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, CodecError> {
        FrameCodec::decode_eof(self, src)
    }
}

/// The whole length (prefix included) of the frame at the front of `src`, once its length
/// prefix has arrived. Not checked against any limit.
pub fn frame_len_at_front(src: &[u8]) -> Option<usize> {
    let header = src.get(..LEN_PREFIX)?;
    Some(LEN_PREFIX + u32::from_be_bytes(header.try_into().expect("four bytes")) as usize)
}

/// Prefixes a body with its length, for the two cleartext handshake frames.
pub fn encode_frame(body: &[u8]) -> Bytes {
    let mut buf = BytesMut::new();
    put_frame(&mut buf, body);
    buf.freeze()
}

/// Appends `body` prefixed with its length to `out`.
pub fn put_frame(out: &mut BytesMut, body: &[u8]) {
    out.reserve(LEN_PREFIX + body.len());
    out.put_u32(body.len() as u32);
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_frames_and_waits_for_more() {
        let mut codec = FrameCodec::new(16);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&encode_frame(b"abc"));
        buf.extend_from_slice(&encode_frame(b"defg")[..5]);
        assert_eq!(&codec.decode(&mut buf).unwrap().unwrap()[..], b"abc");
        assert!(codec.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b"efg");
        assert_eq!(&codec.decode(&mut buf).unwrap().unwrap()[..], b"defg");
        assert!(buf.is_empty());
    }

    #[test]
    fn rejects_zero_and_oversized_lengths_before_the_body() {
        let mut codec = FrameCodec::new(16);
        let mut zero = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert!(matches!(
            codec.decode(&mut zero),
            Err(CodecError::EmptyFrame)
        ));
        let mut huge = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            codec.decode(&mut huge),
            Err(CodecError::FrameTooLong {
                len: u32::MAX,
                max: 16
            })
        ));
        assert!(
            huge.capacity() < 1024,
            "nothing reserved for a refused frame"
        );
    }

    #[test]
    fn eof_inside_a_frame_is_an_error() {
        let mut codec = FrameCodec::new(16);
        let mut buf = BytesMut::from(&encode_frame(b"abcdef")[..6]);
        assert!(matches!(
            codec.decode_eof(&mut buf),
            Err(CodecError::Truncated { buffered: 6 })
        ));
        assert!(codec.decode_eof(&mut BytesMut::new()).unwrap().is_none());
    }
}
