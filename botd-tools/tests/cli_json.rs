//! `botd --json`: one JSON object per message for `listen`, one object for the other commands,
//! times as RFC 3339 and Unix milliseconds, keys as hex. Runs the built `botd` against a relay
//! on loopback.

mod common;

use std::time::UNIX_EPOCH;

use serde_json::Value;

use common::{finish, Botd};

/// Checks that `value[name]` is an RFC 3339 time equal to `value[name_ms]`.
fn assert_time(value: &Value, name: &str) {
    let text = value[name]
        .as_str()
        .unwrap_or_else(|| panic!("{name} in {value}"));
    let ms = value[&format!("{name}_ms")]
        .as_u64()
        .unwrap_or_else(|| panic!("{name}_ms in {value}"));
    let parsed = humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("{text}: {e}"));
    assert_eq!(
        parsed.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64,
        ms,
        "{name}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_and_send_print_json() {
    let (relay, _app) =
        botd_relay::testing::start_relay(botd_relay::testing::loopback_config()).await;
    let botd = Botd::new(&relay);
    let dir = botd_relay::testing::TempDir::new("cli-json");
    let (alice, bob) = (dir.path().join("alice.key"), dir.path().join("bob.key"));
    let checks = tokio::task::spawn_blocking(move || {
        let a = botd.run(&alice, &["keygen"])["identity"]
            .as_str()
            .expect("identity")
            .to_owned();
        let b = botd.run(&bob, &["keygen"])["identity"]
            .as_str()
            .expect("identity")
            .to_owned();
        let registered = botd.run(&bob, &["register", "--prekeys", "2"]);
        assert_eq!(registered["identity"], b.as_str());
        assert_eq!(registered["device_id"], 1);
        assert_eq!(registered["one_time_prekeys"], 2);
        botd.run(&alice, &["register", "--prekeys", "2"]);

        let listen = botd
            .command(&bob, &["listen", "--count", "2"])
            .spawn()
            .expect("listen starts");
        let to = format!("{b}:1");
        let mut sent = Vec::new();
        for text in ["hello json", "second"] {
            let s = botd.run(&alice, &["send", "--to", &to, "--text", text]);
            assert_eq!(s["duplicate"], false, "{s}");
            assert_eq!(s["recipient"], b.as_str());
            assert_eq!(s["recipient_device"], 1);
            assert_eq!(s["sender_nonce"].as_str().map(str::len), Some(16));
            sent.push(s["message_id"].as_u64().expect("message_id"));
        }

        let out = finish(listen);
        assert!(
            out.status.success(),
            "listen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let messages: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect();
        assert_eq!(messages.len(), 2, "one object per message: {text:?}");
        for (m, (id, payload)) in messages
            .iter()
            .zip(sent.iter().zip(["hello json", "second"]))
        {
            assert_eq!(m["message_id"].as_u64(), Some(*id), "{m}");
            assert_eq!(m["sender"], a.as_str());
            assert_eq!(m["sender_device"], 1);
            assert_eq!(m["recipient_device"], 1);
            assert_eq!(m["signature_ok"], true);
            assert_eq!(m["text"], payload);
            assert_eq!(m["payload"], hex::encode(payload));
            assert_time(m, "received_at");
        }

        // The terminal shows times as RFC 3339 too.
        let s = botd.run(&alice, &["send", "--to", &to, "--text", "kept"]);
        let id = s["message_id"].as_u64().expect("message_id").to_string();
        let get = botd.run(&bob, &["get", "--id", &id]);
        assert_time(&get, "received_at");
        let out = finish(
            botd.text_command(&bob, &["get", "--id", &id])
                .spawn()
                .expect("get starts"),
        );
        let line = String::from_utf8(out.stdout).unwrap();
        let time = get["received_at"].as_str().unwrap();
        assert!(line.contains(&format!("at {time} ")), "{line}");
        assert!(!line.contains(" ms "), "{line}");

        let ticket = botd.run(&bob, &["ticket", "create", "--ttl", "1h"]);
        assert_eq!(ticket["token"].as_str().map(str::len), Some(32));
        assert_eq!(ticket["identity"], b.as_str());
        assert_time(&ticket, "expires_at");
    });
    let result = checks.await;
    relay.stop().await;
    result.expect("the checks pass");
}
