//! A lean botd/1 connection for the load generator: the handshake done by hand, then
//! non-blocking reads and writes of whole batches of frames over one socket, driven by the
//! caller's own loop (no channel or task per request). `Send` frames are encoded by hand
//! straight into the session's output buffer.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use std::time::Instant;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;

use tokio::time::timeout;

use botd_protocol::codec::{encode_frame, FrameCodec};
use botd_protocol::handshake::AwaitingAck;
use botd_protocol::keys::{KeyPair, PublicKeyBytes, PUBLIC_KEY_LEN, SIGNATURE_LEN};
use botd_protocol::proto::{self, Body, ErrorCode, Frame, Welcome};
use botd_protocol::session::{Received, Session, Timers};

use super::load::{PayloadTemplate, Stamp};

/// Frames a relay may announce beyond which we refuse to buffer.
const MAX_RELAY_FRAME_LEN: u32 = 16 << 20;
/// Bytes read from the socket before the frames are processed.
const READ_CHUNK: usize = 256 * 1024;
/// Bytes read in one go before the caller gets to write again.
const MAX_READ_PER_CALL: usize = 4 << 20;

/// The text of a relay's `Error` frame.
pub fn describe_error(error: &proto::Error) -> String {
    let code = error.code();
    if error.message.is_empty() {
        code.as_str_name().to_owned()
    } else {
        format!("{}: {}", code.as_str_name(), error.message)
    }
}

/// An authenticated session with a relay, past `Welcome`.
pub struct Conn {
    stream: TcpStream,
    pub session: Session,
    codec: FrameCodec,
    rbuf: BytesMut,
    next_id: u64,
    pub welcome: Welcome,
    /// The relay closed its side.
    pub eof: bool,
}

impl Conn {
    /// Connects, runs the handshake as `identity` towards the relay key `relay` and waits for
    /// `Welcome`, all within `limit`.
    pub async fn connect(
        addr: SocketAddr,
        identity: &KeyPair,
        relay: PublicKeyBytes,
        limit: Duration,
    ) -> Result<Conn, String> {
        match timeout(limit, Self::establish(addr, identity, relay)).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "no handshake with {addr} within {limit:?} (connect, Init/Ack, Welcome)"
            )),
        }
    }

    async fn establish(
        addr: SocketAddr,
        identity: &KeyPair,
        relay: PublicKeyBytes,
    ) -> Result<Conn, String> {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|err| format!("connect to {addr}: {err}"))?;
        let _ = stream.set_nodelay(true);
        let (waiting, init) = AwaitingAck::start(identity, relay);
        stream
            .write_all(&encode_frame(&init))
            .await
            .map_err(|err| format!("send Init to {addr}: {err}"))?;
        let timers = Timers::initiator();
        let mut codec = FrameCodec::new(1024);
        let mut rbuf = BytesMut::with_capacity(4096);
        let ack = read_body(&mut stream, &mut codec, &mut rbuf)
            .await?
            .ok_or_else(|| {
                format!(
                    "{addr} closed the connection during the handshake (wrong --server-key, \
                     or an admission limit of the relay)"
                )
            })?;
        let established = waiting
            .on_ack(identity, &ack)
            .map_err(|err| format!("handshake with {addr}: {err}"))?;
        let mut session = Session::initiator(established.keys, timers, 1024, Instant::now());
        let body = read_body(&mut stream, &mut codec, &mut rbuf)
            .await?
            .ok_or_else(|| format!("{addr} closed the connection before Welcome"))?;
        let welcome = match session.on_frame(body, Instant::now()) {
            Ok(Received::Frame(Frame {
                body: Some(Body::Welcome(welcome)),
                ..
            })) => welcome,
            Ok(_) => return Err(format!("{addr}: first frame was not Welcome")),
            Err(err) => return Err(format!("{addr}: {err}")),
        };
        if welcome.protocol != proto::PROTOCOL_NAME {
            return Err(format!(
                "{addr} speaks {:?}, not {}",
                welcome.protocol,
                proto::PROTOCOL_NAME
            ));
        }
        codec.set_max_frame_len(welcome.max_frame_len.clamp(1024, MAX_RELAY_FRAME_LEN));
        session.set_peer_max_frame_len(welcome.max_frame_len.max(1024));
        let ping_min_interval =
            Duration::from_millis(welcome.ping_min_interval_ms).max(Duration::from_secs(30));
        session.set_timers(Timers {
            ping_min_interval,
            ..session.timers().clone()
        });
        Ok(Conn {
            stream,
            session,
            codec,
            rbuf,
            next_id: 1,
            welcome,
            eof: false,
        })
    }

    /// A fresh request id.
    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Seals `body` as a request with a fresh id; returns the id.
    pub fn queue(&mut self, body: Body) -> Result<u64, String> {
        let id = self.next_id();
        self.session
            .send(&Frame::new(id, body))
            .map_err(|err| format!("seal: {err}"))?;
        Ok(id)
    }

    /// Writes what the socket takes now; returns the bytes written.
    pub fn try_flush(&mut self) -> Result<usize, String> {
        let mut written = 0;
        while self.session.transmit_len() > 0 {
            let pending = self.session.transmit_len();
            match self.stream.try_write(self.session.transmit()) {
                Ok(0) => return Err("the connection closed while writing".into()),
                Ok(n) => {
                    self.session.advance_transmit(n);
                    written += n;
                    if n < pending {
                        // The socket buffer is full; another try would only say so.
                        break;
                    }
                }
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(err) => return Err(format!("write: {err}")),
            }
        }
        if written > 0 {
            self.session.mark_sent(Instant::now());
        }
        Ok(written)
    }

    /// Reads what the socket has now (up to a few MiB); returns the bytes read. Sets
    /// [`Conn::eof`] when the relay closed its side.
    pub fn try_fill(&mut self) -> Result<usize, String> {
        let mut read = 0;
        while read < MAX_READ_PER_CALL && !self.eof {
            self.rbuf.reserve(READ_CHUNK);
            let room = self.rbuf.capacity() - self.rbuf.len();
            match self.stream.try_read_buf(&mut self.rbuf) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    read += n;
                    if n < room {
                        // A short read drained the socket; another read would only say so.
                        break;
                    }
                }
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(err) => return Err(format!("read: {err}")),
            }
        }
        Ok(read)
    }

    /// The next complete frame in the read buffer for the caller. Session replies (a `Pong`
    /// to the relay's `Ping`) are sealed for sending here.
    pub fn next_frame(&mut self, now: Instant) -> Result<Option<Frame>, String> {
        loop {
            let body = match self.codec.decode(&mut self.rbuf) {
                Ok(Some(body)) => body,
                Ok(None) => return Ok(None),
                Err(err) => return Err(format!("framing: {err}")),
            };
            match self.session.on_frame(body, now) {
                Ok(Received::Frame(frame)) => return Ok(Some(frame)),
                Ok(Received::Reply(reply)) => self
                    .session
                    .send(&reply)
                    .map_err(|err| format!("seal: {err}"))?,
                Ok(Received::Nothing) => {}
                Err(err) => return Err(format!("session: {err}")),
            }
        }
    }

    /// Waits until the socket can be read, or written when `write` is set.
    pub async fn ready(&self, write: bool) -> Result<(), String> {
        let interest = if write {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        self.stream
            .ready(interest)
            .await
            .map(drop)
            .map_err(|err| format!("poll: {err}"))
    }

    /// Sends one request and waits for its answer (setup only: no pipelining). An `Error`
    /// answer, an `Error` push or a close is an `Err`.
    pub async fn request(&mut self, body: Body, limit: Duration) -> Result<Body, String> {
        let kind = body.kind();
        let id = self.queue(body)?;
        let deadline = Instant::now() + limit;
        loop {
            self.try_flush()?;
            self.try_fill()?;
            while let Some(frame) = self.next_frame(Instant::now())? {
                match frame.body {
                    Some(Body::Error(error)) if frame.id == id => {
                        return Err(format!("{kind} refused: {}", describe_error(&error)))
                    }
                    Some(Body::Error(error)) if frame.id == 0 => {
                        return Err(format!(
                            "relay closed the connection: {}",
                            describe_error(&error)
                        ))
                    }
                    Some(body) if frame.id == id => return Ok(body),
                    _ => {}
                }
            }
            if self.eof {
                return Err(format!("relay closed the connection during {kind}"));
            }
            let pending = self.session.transmit_len() > 0;
            tokio::select! {
                ready = self.ready(pending) => ready?,
                _ = tokio::time::sleep_until(deadline.into()) => {
                    return Err(format!("no answer to {kind} within {limit:?}"))
                }
            }
        }
    }

    /// Closes the write side, so the relay sees an orderly end.
    pub async fn close(mut self) {
        let _ = timeout(Duration::from_secs(1), self.stream.shutdown()).await;
    }
}

/// Reads one frame body during the handshake; `None` if the peer closed first.
async fn read_body(
    stream: &mut TcpStream,
    codec: &mut FrameCodec,
    rbuf: &mut BytesMut,
) -> Result<Option<BytesMut>, String> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(body) = codec
            .decode(rbuf)
            .map_err(|err| format!("handshake framing: {err}"))?
        {
            return Ok(Some(body));
        }
        match stream.read_buf(rbuf).await {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(err) => return Err(format!("handshake read: {err}")),
        }
    }
}

/// A `Register` for device `device_id` with a signed prekey and no one-time prekeys: all the
/// relay needs before a session may send from or subscribe to that device.
pub fn registration(identity: &PublicKeyBytes, device_id: u32) -> proto::Register {
    let public = bytes::Bytes::copy_from_slice(identity.as_bytes());
    proto::Register {
        device_id,
        registration_id: 1,
        identity_key: public.clone(),
        signed_prekey: Some(proto::SignedPreKey {
            id: 1,
            public_key: public,
            signature: bytes::Bytes::from_static(&[0x30; SIGNATURE_LEN]),
        }),
        one_time_prekeys: Vec::new(),
    }
}

/// The fixed fields of one sender's `Send` requests.
pub struct SendHeader {
    pub recipient: [u8; PUBLIC_KEY_LEN],
    pub recipient_device: u32,
    pub sender_device: u32,
}

fn bytes_field_len(tag: u32, len: usize) -> usize {
    if len == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(len as u64) + len
    }
}

fn varint_field_len(tag: u32, value: u64) -> usize {
    if value == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(value)
    }
}

fn put_bytes_field(buf: &mut impl BufMut, tag: u32, value: &[u8]) {
    if !value.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(value.len() as u64, buf);
        buf.put_slice(value);
    }
}

fn put_varint_field(buf: &mut impl BufMut, tag: u32, value: u64) {
    if value != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(value, buf);
    }
}

/// Field number of `Frame.send`.
const FRAME_SEND: u32 = 32;

impl SendHeader {
    fn body_len(&self, payload_len: usize) -> usize {
        bytes_field_len(1, PUBLIC_KEY_LEN)
            + varint_field_len(2, self.recipient_device.into())
            + varint_field_len(3, self.sender_device.into())
            + bytes_field_len(4, 8)
            + bytes_field_len(5, 32)
            + bytes_field_len(6, SIGNATURE_LEN)
            + bytes_field_len(7, payload_len)
    }

    /// Length of the encoded `Frame { id, send }`.
    pub fn frame_len(&self, id: u64, payload_len: usize) -> usize {
        let body = self.body_len(payload_len);
        varint_field_len(1, id) + key_len(FRAME_SEND) + encoded_len_varint(body as u64) + body
    }

    /// Encodes `Frame { id, send: Send { … } }` canonically (fields in number order) with the
    /// payload of `template` for `stamp`.
    #[allow(clippy::too_many_arguments)]
    pub fn encode(
        &self,
        buf: &mut impl BufMut,
        id: u64,
        nonce: &[u8; 8],
        payload_hash: &[u8; 32],
        signature: &[u8; SIGNATURE_LEN],
        template: &PayloadTemplate,
        stamp: &Stamp,
    ) {
        put_varint_field(buf, 1, id);
        encode_key(FRAME_SEND, WireType::LengthDelimited, buf);
        encode_varint(self.body_len(template.len()) as u64, buf);
        put_bytes_field(buf, 1, &self.recipient);
        put_varint_field(buf, 2, self.recipient_device.into());
        put_varint_field(buf, 3, self.sender_device.into());
        put_bytes_field(buf, 4, nonce);
        put_bytes_field(buf, 5, payload_hash);
        put_bytes_field(buf, 6, signature);
        encode_key(7, WireType::LengthDelimited, buf);
        encode_varint(template.len() as u64, buf);
        template.write(stamp, buf);
    }
}

/// What an `Error` push (frame id 0) means for the run.
pub fn push_error(error: &proto::Error) -> String {
    if closes_session(error.code()) {
        format!("relay closed the connection: {}", describe_error(error))
    } else {
        format!("relay ended the session's work: {}", describe_error(error))
    }
}

/// Whether a relay's `Error` code means the session is over.
pub fn closes_session(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::SlowConsumer
            | ErrorCode::ShuttingDown
            | ErrorCode::Timeout
            | ErrorCode::PingFlood
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn hand_encoded_send_equals_prost_canonical_encoding() {
        let recipient = KeyPair::generate();
        let header = SendHeader {
            recipient: *recipient.public().as_bytes(),
            recipient_device: 1,
            sender_device: 3,
        };
        for size in [20, 100, 1024, 300_000] {
            let template = PayloadTemplate::new(size).unwrap();
            let stamp = Stamp {
                sender: 2,
                seq: 99,
                intended_ns: 42,
            };
            let nonce = 99u64.to_be_bytes();
            let hash = template.hash(&stamp);
            let signature = [0x5a; SIGNATURE_LEN];
            let id = 1 << 20;
            let mut buf = BytesMut::new();
            header.encode(&mut buf, id, &nonce, &hash, &signature, &template, &stamp);
            assert_eq!(buf.len(), header.frame_len(id, size));

            let mut payload = Vec::new();
            template.write(&stamp, &mut payload);
            let want = Frame::new(
                id,
                Body::Send(proto::Send {
                    recipient: bytes::Bytes::copy_from_slice(recipient.public().as_bytes()),
                    recipient_device: 1,
                    sender_device: 3,
                    sender_nonce: bytes::Bytes::copy_from_slice(&nonce),
                    payload_hash: bytes::Bytes::copy_from_slice(&hash),
                    sender_signature: bytes::Bytes::copy_from_slice(&signature),
                    payload: payload.into(),
                    ticket: bytes::Bytes::new(),
                }),
            );
            assert_eq!(&buf[..], &want.encode_to_vec()[..], "size {size}");
            assert_eq!(Frame::decode(&buf[..]).unwrap(), want);
        }
    }

    #[test]
    fn registration_has_the_required_signed_prekey() {
        let key = KeyPair::generate();
        let register = registration(key.public(), 1);
        assert_eq!(register.device_id, 1);
        assert!(register.signed_prekey.is_some());
        assert_eq!(register.identity_key.len(), PUBLIC_KEY_LEN);
    }
}
