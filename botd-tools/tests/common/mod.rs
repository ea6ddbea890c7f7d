//! Runs the built `botd` against a relay on loopback: the command with the relay's address and
//! key, every run bounded in time.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use botd_relay::testing::LoopbackRelay;
use serde_json::Value;

/// Bound of one `botd` run.
const RUN_LIMIT: Duration = Duration::from_secs(30);

/// `botd` pointed at one relay.
pub struct Botd {
    pub relay: String,
    /// The relay's key (hex); when empty, `--server-key` is not given.
    pub server_key: String,
}

impl Botd {
    pub fn new(relay: &LoopbackRelay) -> Self {
        Botd {
            relay: relay.addr.to_string(),
            server_key: relay.key.to_hex(),
        }
    }

    /// The command with `--json`.
    pub fn command(&self, key: &Path, args: &[&str]) -> Command {
        let mut c = self.text_command(key, args);
        c.arg("--json");
        c
    }

    /// The command without `--json`: the terminal's output.
    pub fn text_command(&self, key: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_botd"));
        c.arg("--key").arg(key).arg("--relay").arg(&self.relay);
        if !self.server_key.is_empty() {
            c.arg("--server-key").arg(&self.server_key);
        }
        c.args(args)
            .env_remove("BOTD_KEY")
            .env_remove("BOTD_RELAY")
            .env_remove("BOTD_SERVER_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Runs a command with `--json` to its end (bounded), whatever its exit status.
    pub fn output(&self, key: &Path, args: &[&str]) -> Output {
        finish(self.command(key, args).spawn().expect("botd starts"))
    }

    /// Runs a command to its end (bounded), checks that it succeeded and returns its one JSON
    /// object.
    pub fn run(&self, key: &Path, args: &[&str]) -> Value {
        let out = self.output(key, args);
        assert!(
            out.status.success(),
            "botd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        one_object(&out.stdout)
    }
}

/// Kills the child if the test ends early.
struct Running(Option<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits for the child to exit, at most [`RUN_LIMIT`].
pub fn finish(child: Child) -> Output {
    let mut running = Running(Some(child));
    let started = Instant::now();
    loop {
        let child = running.0.as_mut().expect("present");
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        assert!(started.elapsed() < RUN_LIMIT, "botd did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    running
        .0
        .take()
        .expect("present")
        .wait_with_output()
        .expect("output")
}

/// The one JSON object a command printed.
pub fn one_object(stdout: &[u8]) -> Value {
    let text = String::from_utf8(stdout.to_vec()).expect("UTF-8 output");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON object: {text:?}");
    serde_json::from_str(lines[0]).expect("a JSON object")
}
