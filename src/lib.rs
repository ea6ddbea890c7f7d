//! botd-relay: a relay for end-to-end-encrypted messaging between nodes speaking the BOTD #2
//! peer protocol (botd/1 wire rules, see `docs/PROTOCOL.md`).
//!
//! Layers, bottom to top:
//! - [`core`]: protocol without IO (framing, handshake, session crypto and rules);
//! - [`store`]: storage behind one trait, with the embedded backend (memory, journal,
//!   snapshots);
//! - [`relay`]: the application (requests, rate limits, live delivery) on any store;
//! - [`app`]: the contract between the application and the network glue;
//! - [`net`]: the tokio server that drives the core and the application over TCP;
//! - [`client`]: the initiator side, used by the `botd` CLI and by tests;
//! - [`conformance`]: the botd/1 conformance suite, for relays and for node software;
//! - [`fuzzing`]: the harnesses of the fuzz targets in `fuzz/`, shared with `cargo test`.

pub mod app;
pub mod bench;
pub mod client;
pub mod clock;
pub mod config;
pub mod conformance;
pub mod core;
pub mod fdlimit;
pub mod fuzzing;
pub mod keyfile;
pub mod memory;
pub mod metrics;
pub mod net;
pub mod proto;
pub mod ratelimit;
pub mod relay;
pub mod store;

pub use config::Config;
