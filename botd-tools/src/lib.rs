//! The tools around botd/1 relays, behind the `botd` command:
//!
//! - [`bench`]: `botd bench`, a load generator that measures botd relays, NATS core and NATS
//!   JetStream the same way (docs/BENCHMARKS.md);
//! - [`conformance`]: `botd conformance`, the botd/1 conformance suite for relays and for node
//!   software (docs/CONFORMANCE.md).
//!
//! The command line itself (`botd register`, `send`, `listen`, …, its errors and exit codes) is
//! in the binary (`src/cli/`); the client commands use [`botd_client`].

pub mod bench;
pub mod conformance;
