//! Connects to a relay with a fresh identity, prints what its `Welcome` announced and the
//! round trip of one ping.
//!
//! `cargo run -p botd-client --example connect -- 127.0.0.1:9945 <relay public key>`

mod common;

use std::sync::Arc;

use botd_client::protocol::keys::KeyPair;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let [addr, relay_key] = common::args("connect ADDR RELAY_KEY");
    let client = common::connect(&addr, &relay_key, Arc::new(KeyPair::generate())).await;
    let welcome = client.welcome();
    println!(
        "connected to {} {} as {}: frames up to {} bytes, payloads up to {} bytes",
        welcome.protocol,
        welcome.server_version,
        client.identity(),
        welcome.max_frame_len,
        welcome.max_payload_len
    );
    match client.ping().await {
        Ok(rtt) => println!("ping answered in {rtt:?}"),
        Err(err) => common::fail(format!("ping: {err}")),
    }
}
