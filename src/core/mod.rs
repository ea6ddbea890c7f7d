//! The protocol core: framing, keys, handshake, per-direction ciphers and session rules. Nothing
//! here touches a socket or reads a clock; callers pass bytes and `now` in and take bytes,
//! frames and deadlines out, so two peers can be driven in memory.

pub mod cipher;
pub mod codec;
pub mod handshake;
pub mod keys;
pub mod replay;
pub mod session;
