//! Sends TEXT from device 1 of the identity in KEY_FILE (registered with the `register`
//! example first: a relay takes messages from registered devices only) to device 1 of
//! RECIPIENT. It fetches the recipient's prekey bundle first (what a node encrypts its first
//! message with), then sends.
//!
//! `cargo run -p botd-client --example send -- 127.0.0.1:9945 <relay key> alice.key <bob's key> hello`
//!
//! The relay only ever sees opaque payloads; a real node encrypts TEXT end to end with the
//! bundle. This example sends it as it is, to show the calls.

mod common;

use botd_client::OutgoingMessage;

const DEVICE: u32 = 1;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let [addr, relay_key, key_file, recipient, text] =
        common::args("send ADDR RELAY_KEY KEY_FILE RECIPIENT_KEY TEXT");
    let identity = common::identity(&key_file);
    let recipient = common::public_key(&recipient);
    let client = common::connect(&addr, &relay_key, identity).await;

    let bundles = client
        .fetch_prekeys(&recipient, vec![DEVICE])
        .await
        .unwrap_or_else(|err| common::fail(format!("fetch prekeys: {err}")));
    let Some(bundle) = bundles.first() else {
        common::fail(format!("{recipient} has no device {DEVICE}"))
    };
    println!(
        "bundle of device {}: registration id {}, one-time prekey {}",
        bundle.device_id,
        bundle.registration_id,
        bundle
            .one_time_prekey
            .as_ref()
            .map_or("none left".to_string(), |k| k.id.to_string())
    );

    let message = OutgoingMessage::new(recipient, DEVICE, DEVICE, text.into_bytes());
    match client.send_message(message).await {
        Ok(sent) => println!(
            "stored as message {} (duplicate: {})",
            sent.message_id, sent.duplicate
        ),
        Err(err) => common::fail(format!("send: {err}")),
    }
}
