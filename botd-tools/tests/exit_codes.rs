//! The exit codes `botd --help` documents, for scripts: 0 success, 2 usage, 3 no session with
//! the relay, 4 refused by the relay. Runs the built `botd`, against a relay on loopback where
//! one is needed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use botd_protocol::keys::KeyPair;

use common::Botd;

const OK: i32 = 0;
const USAGE: i32 = 2;
const CONNECTION: i32 = 3;
const REFUSED: i32 = 4;

/// Checks the exit code of a run and, for a failure, the `--json` error object that names it.
fn assert_exit(out: &Output, code: i32, error: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    if code != OK {
        let value = common::one_object(&out.stdout);
        let message = value["error"].as_str().expect("an error object");
        assert!(message.contains(error), "{message:?} names {error:?}");
        assert!(stderr.starts_with("botd: "), "{stderr}");
    }
}

/// A loopback address nothing listens on: a port reserved, then closed.
fn closed_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let addr = listener.local_addr().expect("its address");
    drop(listener);
    addr.to_string()
}

fn keygen(botd: &Botd, key: &Path) {
    assert_exit(&botd.output(key, &["keygen"]), OK, "");
}

/// `botd` for a relay that is not there (with a valid key of its own), and a new identity key
/// file in a fresh directory: `(botd, directory, key file)`.
fn offline(name: &str) -> (Botd, PathBuf, PathBuf) {
    let botd = Botd {
        relay: closed_port(),
        server_key: KeyPair::generate().public().to_hex(),
    };
    let dir = botd_relay::testing::temp_dir(name);
    let key = dir.join("node.key");
    keygen(&botd, &key);
    (botd, dir, key)
}

#[test]
fn bad_arguments_exit_2() {
    let (botd, dir, key) = offline("exit-usage");

    // Rejected by clap, which prints its usage message and no JSON.
    let out = common::finish(
        botd.command(&key, &["send", "--no-such-flag"])
            .spawn()
            .expect("botd starts"),
    );
    assert_eq!(out.status.code(), Some(USAGE));
    assert!(out.stdout.is_empty());

    for (args, error) in [
        (
            &["send", "--to", "not-a-key", "--text", "hi"][..],
            "is not a public key",
        ),
        (&["contacts", "add", "02ab"], "is not a public key"),
        (&["ping", "no such host:x"], "is not an address"),
    ] {
        assert_exit(&botd.output(&key, args), USAGE, error);
    }
    for (server_key, error) in [("zz", "--server-key"), ("", "the relay's key is needed")] {
        let botd = Botd {
            relay: botd.relay.clone(),
            server_key: server_key.into(),
        };
        assert_exit(&botd.output(&key, &["ping"]), USAGE, error);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn no_relay_exits_3() {
    let (botd, dir, key) = offline("exit-connection");
    assert_exit(&botd.output(&key, &["ping"]), CONNECTION, "connect to");
    assert_exit(
        &botd.output(&key, &["send", "--to", &botd.server_key, "--text", "hi"]),
        CONNECTION,
        "connect to",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_handshake_and_requests() {
    let (relay, _app) =
        botd_relay::testing::start_relay(botd_relay::testing::loopback_config()).await;
    let botd = Botd::new(&relay);
    let dir = botd_relay::testing::temp_dir("exit-relay");
    let key = dir.join("node.key");
    let checks = tokio::task::spawn_blocking(move || {
        keygen(&botd, &key);
        assert_exit(&botd.output(&key, &["register", "--prekeys", "1"]), OK, "");
        assert_exit(
            &botd.output(&key, &["get", "--id", "4242"]),
            REFUSED,
            "get: ",
        );
        assert_exit(
            &botd.output(&key, &["unregister", "--device", "7"]),
            REFUSED,
            "NOT_REGISTERED",
        );
        assert_exit(&botd.output(&key, &["unregister"]), OK, "");

        // The relay holds another key: the handshake fails.
        let impostor = Botd {
            relay: botd.relay.clone(),
            server_key: KeyPair::generate().public().to_hex(),
        };
        assert_exit(&impostor.output(&key, &["ping"]), CONNECTION, "connect to");
    });
    let result = checks.await;
    relay.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    result.expect("the checks pass");
}
