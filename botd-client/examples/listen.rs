//! Subscribes to device 1 of the identity in KEY_FILE and prints each delivered message after
//! checking it end to end (payload hash, the sender's signature, the recipient device), then
//! acknowledges it so the relay deletes it. Stops after COUNT messages.
//!
//! `cargo run -p botd-client --example listen -- 127.0.0.1:9945 <relay key> bob.key 1`

mod common;

use botd_client::protocol::proto::Body;
use botd_client::verify_delivery;

const DEVICE: u32 = 1;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let [addr, relay_key, key_file, count] = common::args("listen ADDR RELAY_KEY KEY_FILE COUNT");
    let count: u64 = count
        .parse()
        .unwrap_or_else(|err| common::fail(format!("COUNT {count:?}: {err}")));
    let identity = common::identity(&key_file);
    let mut client = common::connect(&addr, &relay_key, identity.clone()).await;

    let subscribed = client
        .subscribe(DEVICE, 0)
        .await
        .unwrap_or_else(|err| common::fail(format!("subscribe: {err}")));
    println!(
        "listening on device {DEVICE} (last id {})",
        subscribed.last_id
    );

    let mut received = 0;
    while received < count {
        let Some(frame) = client.next_push().await else {
            common::fail("the relay closed the connection")
        };
        match frame.body {
            Some(Body::Deliver(deliver)) => {
                // A delivery for another device of ours is not for this mailbox.
                if deliver.recipient_device != DEVICE {
                    common::fail(format!(
                        "message {} is for device {}",
                        deliver.message_id, deliver.recipient_device
                    ));
                }
                let sender = verify_delivery(&deliver, identity.public()).unwrap_or_else(|err| {
                    common::fail(format!(
                        "message {} fails its check: {err}",
                        deliver.message_id
                    ))
                });
                println!(
                    "message {} from {sender} (device {}): {}",
                    deliver.message_id,
                    deliver.sender_device,
                    String::from_utf8_lossy(&deliver.payload)
                );
                client
                    .ack(DEVICE, vec![deliver.message_id])
                    .await
                    .unwrap_or_else(|err| common::fail(format!("ack: {err}")));
                received += 1;
            }
            Some(Body::PreKeysLow(low)) => println!(
                "device {} has {} one-time prekeys left",
                low.device_id, low.count
            ),
            other => println!("push: {other:?}"),
        }
    }
}
