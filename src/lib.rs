//! botd-relay: a relay for end-to-end-encrypted messaging between nodes speaking the BOTD #2
//! peer protocol (botd/1 wire rules, see `docs/PROTOCOL.md`).
//!
//! The protocol itself (framing, keys, handshake, session) is the [`botd_protocol`] crate,
//! re-exported as [`protocol`]. Layers of the relay, bottom to top:
//! - [`store`]: storage behind one trait, with the embedded backend (memory, journal,
//!   snapshots) and, with the `jetstream` feature (on by default), NATS JetStream;
//! - [`relay`]: the application (requests, rate limits, live delivery) on any store;
//! - [`app`]: the contract between the application and the network glue;
//! - [`net`]: the tokio server that drives the protocol and the application over TCP;
//! - [`config`], [`metrics`]: the one `Config` with every limit, and the metric names;
//! - [`testing`]: a relay inside a test process, on loopback.

pub mod app;
pub mod clock;
pub mod config;
pub mod fdlimit;
pub mod memory;
pub mod metrics;
pub mod net;
pub mod ratelimit;
pub mod relay;
pub mod store;
pub mod testing;

pub use botd_protocol as protocol;
pub use config::Config;
