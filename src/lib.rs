//! botd-relay: a relay for end-to-end-encrypted messaging between nodes speaking the BOTD #2
//! peer protocol (botd/1 wire rules, see `docs/PROTOCOL.md`).
//!
//! Layers, bottom to top:
//! - [`core`]: protocol without IO (framing, handshake, session crypto and rules);
//! - [`net`]: the tokio server that drives the core over TCP;
//! - [`client`]: the initiator side, used by the `botd` CLI and by tests.

pub mod bench;
pub mod client;
pub mod clock;
pub mod config;
pub mod core;
pub mod keyfile;
pub mod memory;
pub mod metrics;
pub mod net;
pub mod proto;
pub mod ratelimit;
pub mod relay;
pub mod storage;

pub use config::Config;
