//! The `botd` command-line client: key management and talking to a relay.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use botd_relay::client::{Client, ClientOptions};
use botd_relay::config::DEFAULT_PORT;
use botd_relay::core::keys::{KeyPair, PublicKeyBytes};
use botd_relay::keyfile;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "botd",
    version,
    about = "Client for botd-relay (BOTD #2, botd/1)"
)]
struct Cli {
    /// Identity key file [default: <config dir>/botd/identity.key]
    #[arg(long, value_name = "FILE", global = true, env = "BOTD_KEY")]
    key: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new identity key file (mode 0600) and print its public key
    Keygen,
    /// Print the public key of the identity key file
    Id,
    /// Connect, authenticate, and measure one ping round trip
    Ping {
        /// Relay address, HOST[:PORT] (default port 9945)
        addr: String,
        /// The relay's public key (66 hex characters), as printed by `botd-relay pubkey`
        #[arg(long, value_name = "HEX")]
        server_key: String,
    },
}

fn default_key_path() -> PathBuf {
    dirs::config_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("botd")
        .join("identity.key")
}

async fn resolve(addr: &str) -> Result<std::net::SocketAddr, String> {
    let with_port = if addr
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
    {
        addr.to_owned()
    } else {
        format!("{addr}:{DEFAULT_PORT}")
    };
    let mut addrs = tokio::net::lookup_host(with_port)
        .await
        .map_err(|err| format!("cannot resolve {addr}: {err}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{addr} resolves to no address"))
}

fn load_key(path: &Path) -> Result<KeyPair, String> {
    keyfile::load(path).map_err(|err| format!("{err} (create one with `botd keygen`)"))
}

async fn run(cli: Cli) -> Result<(), String> {
    let key_path = cli.key.unwrap_or_else(default_key_path);
    match cli.command {
        Command::Keygen => {
            let pair = KeyPair::generate();
            keyfile::create(&key_path, &pair).map_err(|e| e.to_string())?;
            eprintln!("wrote {}", key_path.display());
            println!("{}", pair.public());
        }
        Command::Id => println!("{}", load_key(&key_path)?.public()),
        Command::Ping { addr, server_key } => {
            let relay = PublicKeyBytes::from_hex(&server_key)
                .map_err(|err| format!("--server-key: {err}"))?;
            let identity = Arc::new(load_key(&key_path)?);
            let socket = resolve(&addr).await?;
            let client = Client::connect(socket, identity, relay, ClientOptions::default())
                .await
                .map_err(|err| format!("connect to {socket}: {err}"))?;
            let welcome = client.welcome();
            println!(
                "connected to {socket} ({} {}), relay key {relay}",
                welcome.protocol, welcome.server_version
            );
            let rtt = client.ping().await.map_err(|err| format!("ping: {err}"))?;
            println!("pong from {socket} in {:.3} ms", rtt.as_secs_f64() * 1000.0);
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("botd: {err}");
            ExitCode::FAILURE
        }
    }
}
