//! botd-relay: a relay for end-to-end-encrypted messaging between nodes speaking the BOTD #2
//! peer protocol (botd/1 wire rules, see `docs/PROTOCOL.md`).
//!
//! The protocol itself (framing, keys, handshake, session) is the [`botd_protocol`] crate,
//! re-exported as [`protocol`]. Layers of the relay, bottom to top:
//! - [`store`]: storage behind one trait, with the embedded backend (memory, journal,
//!   snapshots) and, with the `jetstream` feature (on by default), NATS JetStream;
//! - [`relay`]: the application (requests, rate limits, live delivery) on any store;
//! - [`app`]: the contract between the application and the network glue;
//! - [`connection`]: one connection as a state machine without IO (pipeline, barriers,
//!   congestion, pushes, flow control, deadlines), driving the session and the application;
//! - [`net`]: the tokio server: admission, the handshake's IO, and the bytes between each
//!   socket and its connection state machine;
//! - [`config`], [`metrics`]: the one `Config` with every limit, and the metric names;
//! - [`testing`]: a relay inside a test process, on loopback.

pub mod app;
pub mod clock;
pub mod config;
pub mod connection;
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
