//! The botd/1 peer protocol (BOTD #2 with the wire rules of `docs/PROTOCOL.md`), without IO.
//!
//! Nothing here touches a socket or reads a clock: callers pass bytes and `now` in and take
//! bytes, frames and deadlines out, so two peers can be driven in memory. The pieces, in the
//! order a connection meets them:
//!
//! - [`codec`]: `len: u32 BE ‖ body` framing, with the length checked before the body is
//!   buffered (a tokio-util `Decoder` with the `codec` feature, on by default);
//! - [`keys`]: secp256k1 identity keys, compact low-S signatures, ECDH;
//! - [`handshake`]: the `Init` / `Ack` exchange and the key schedule;
//! - [`cipher`]: AES-256-CTR + HMAC-SHA256 per direction, with key rotation;
//! - [`session`]: an established session: sealing, opening, `Welcome`, the ping rules and
//!   liveness deadlines;
//! - [`proto`]: the protobuf messages carried inside a session;
//! - [`message`]: what a relay stores and delivers (the signed digest, the `Deliver` frame);
//! - [`replay`]: the responder's cache of recently seen ephemeral keys;
//! - [`keyfile`]: identity keys on disk.
//!
//! Two peers in memory: a handshake, the relay's `Welcome`, and a ping answered.
//!
//! ```
//! use std::time::Instant;
//!
//! use botd_protocol::codec::FrameCodec;
//! use botd_protocol::handshake::{respond, AwaitingAck};
//! use botd_protocol::keys::KeyPair;
//! use botd_protocol::proto::{Body, Welcome};
//! use botd_protocol::session::{Received, Session, Timers};
//! use bytes::BytesMut;
//!
//! let (node, relay) = (KeyPair::generate(), KeyPair::generate());
//! let now = Instant::now();
//!
//! // Init → Ack (the frame bodies; a transport prefixes each with its length).
//! let (waiting, init) = AwaitingAck::start(&node, *relay.public());
//! let answer = respond(&relay, &init, |_ephemeral| true).unwrap();
//! let node_keys = waiting.on_ack(&node, &answer.ack_body).unwrap();
//! assert_eq!(answer.established.remote, *node.public());
//!
//! let mut relay_side = Session::responder(answer.established.keys, Timers::initiator(), 1 << 20, now);
//! let mut node_side = Session::initiator(node_keys.keys, Timers::initiator(), 1 << 20, now);
//!
//! // Bytes from one side to the other, split into frames as a socket reader would.
//! fn carry(from: &mut Session, to: &mut Session, now: Instant) -> Vec<Received> {
//!     let mut wire = BytesMut::from(&from.poll_transmit().unwrap()[..]);
//!     let mut codec = FrameCodec::new(1 << 20);
//!     let mut received = Vec::new();
//!     while let Some(body) = codec.decode(&mut wire).unwrap() {
//!         received.push(to.on_frame(body, now).unwrap());
//!     }
//!     received
//! }
//!
//! relay_side
//!     .send_welcome(Welcome { protocol: "botd/1".into(), ..Welcome::default() })
//!     .unwrap();
//! assert!(matches!(&carry(&mut relay_side, &mut node_side, now)[..],
//!     [Received::Frame(f)] if matches!(f.body, Some(Body::Welcome(_)))));
//!
//! let ping_id = node_side.ping(1, now).unwrap().expect("first ping is allowed");
//! let [Received::Reply(pong)] = &carry(&mut node_side, &mut relay_side, now)[..] else {
//!     panic!("a ping is answered by the session")
//! };
//! assert!(matches!(&pong.body, Some(Body::Pong(p)) if p.ping_id == ping_id));
//! ```

pub mod cipher;
pub mod codec;
pub mod handshake;
pub mod keyfile;
pub mod keys;
pub mod message;
pub mod proto;
pub mod replay;
pub mod session;

/// The TCP port a relay listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 9945;
