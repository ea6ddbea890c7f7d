//! What the examples share: reading their arguments and connecting.

// Each example uses its own part of this module.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use botd_client::protocol::keyfile;
use botd_client::protocol::keys::{KeyPair, PublicKeyBytes};
use botd_client::{Client, ClientOptions};

/// The positional arguments, or a usage line and exit code 2 when some are missing.
pub fn args<const N: usize>(usage: &str) -> [String; N] {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.try_into() {
        Ok(args) => args,
        Err(_) => {
            eprintln!("usage: {usage}");
            std::process::exit(2);
        }
    }
}

pub fn public_key(hex: &str) -> PublicKeyBytes {
    PublicKeyBytes::from_hex(hex).unwrap_or_else(|err| fail(format!("{hex:?}: {err}")))
}

/// The identity in `path`, created there (mode 0600) if the file does not exist.
pub fn identity(path: &str) -> Arc<KeyPair> {
    let (pair, created) = keyfile::load_or_create(Path::new(path))
        .unwrap_or_else(|err| fail(format!("{path}: {err}")));
    if created {
        eprintln!("created identity {} in {path}", pair.public());
    }
    Arc::new(pair)
}

pub async fn connect(addr: &str, relay_key: &str, identity: Arc<KeyPair>) -> Client {
    let addr: SocketAddr = addr
        .parse()
        .unwrap_or_else(|err| fail(format!("{addr:?}: {err}")));
    Client::connect(
        addr,
        identity,
        public_key(relay_key),
        ClientOptions::default(),
    )
    .await
    .unwrap_or_else(|err| fail(format!("cannot connect to {addr}: {err}")))
}

pub fn fail(message: impl std::fmt::Display) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1)
}
