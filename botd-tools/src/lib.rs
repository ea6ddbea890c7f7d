//! The tools around botd/1 relays, behind the `botd` command:
//!
//! - [`bench`]: `botd bench`, a load generator that measures botd relays, NATS core and NATS
//!   JetStream the same way (docs/BENCHMARKS.md);
//! - [`conformance`]: `botd conformance`, the botd/1 conformance suite for relays and for node
//!   software (docs/CONFORMANCE.md).
//!
//! The client commands (`botd register`, `send`, `listen`, …) are in the binary; they use
//! [`botd_client`].

pub mod bench;
pub mod conformance;
