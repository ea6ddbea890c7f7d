//! Registers device 1 of the identity in KEY_FILE (created if missing) with a signed prekey
//! and twenty one-time prekeys, so that others can fetch a bundle and write to it.
//!
//! `cargo run -p botd-client --example register -- 127.0.0.1:9945 <relay key> bob.key`
//!
//! The relay stores prekeys as opaque bytes; a real node generates them for its end-to-end
//! encryption (e.g. X3DH) and keeps their private halves. Here they are fresh secp256k1 keys
//! whose private halves are dropped.

mod common;

use botd_client::protocol::keys::{sha256, KeyPair};
use botd_client::protocol::proto::{PreKey, Register, SignedPreKey};
use bytes::Bytes;

const DEVICE: u32 = 1;
const ONE_TIME_PREKEYS: u32 = 20;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let [addr, relay_key, key_file] = common::args("register ADDR RELAY_KEY KEY_FILE");
    let identity = common::identity(&key_file);
    let client = common::connect(&addr, &relay_key, identity.clone()).await;

    let signed = Bytes::copy_from_slice(KeyPair::generate().public().as_bytes());
    let request = Register {
        device_id: DEVICE,
        registration_id: rand::random::<u32>() >> 1,
        identity_key: Bytes::copy_from_slice(identity.public().as_bytes()),
        signed_prekey: Some(SignedPreKey {
            id: 1,
            signature: Bytes::copy_from_slice(&identity.sign(&sha256(&[&signed]))),
            public_key: signed,
        }),
        one_time_prekeys: (1..=ONE_TIME_PREKEYS)
            .map(|id| PreKey {
                id,
                public_key: Bytes::copy_from_slice(KeyPair::generate().public().as_bytes()),
            })
            .collect(),
    };
    match client.register(request).await {
        Ok(registered) => println!(
            "registered device {DEVICE} of {} with {} one-time prekeys",
            identity.public(),
            registered.one_time_prekeys
        ),
        Err(err) => common::fail(format!("register: {err}")),
    }
}
