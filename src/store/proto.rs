//! The records of the embedded store's journal and snapshots, generated from
//! `proto/store.proto`; they embed botd/1 messages from [`botd_protocol::proto`].

#![allow(clippy::doc_lazy_continuation)]

include!(concat!(env!("OUT_DIR"), "/botd.store.v1.rs"));
