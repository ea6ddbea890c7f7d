//! The `botd` command line: the global options, the commands, and the dispatch of each command
//! to the module of its group.

mod account;
mod conformance;
mod devices;
pub mod error;
mod keys;
mod messages;
mod output;
mod session;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use self::error::CliError;
use self::output::Out;

#[derive(Parser, Debug)]
#[command(
    name = "botd",
    version,
    about = "Client for botd-relay (BOTD #2, botd/1)",
    after_help = error::exit_codes_help()
)]
pub struct Cli {
    /// Identity key file [default: <config dir>/botd/identity.key]
    #[arg(long, value_name = "FILE", global = true, env = "BOTD_KEY")]
    key: Option<PathBuf>,
    /// Relay address, HOST[:PORT]
    #[arg(
        long,
        value_name = "ADDR",
        global = true,
        env = "BOTD_RELAY",
        default_value = "127.0.0.1:9945"
    )]
    relay: String,
    /// The relay's public key (66 hex characters), as printed by `botd-relay pubkey`
    #[arg(long, value_name = "HEX", global = true, env = "BOTD_SERVER_KEY")]
    server_key: Option<String>,
    /// Machine-readable output on standard output: one JSON object per line (one per message
    /// for `listen`, one for the other commands, the report for `conformance`), with the fields
    /// the terminal shows; times as RFC 3339 and Unix milliseconds, keys and bytes as hex
    #[arg(long, global = true)]
    pub json: bool,
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
        /// Relay address, HOST[:PORT] (overrides --relay)
        addr: Option<String>,
    },
    /// Register this identity's device with a signed prekey and one-time prekeys
    Register {
        #[arg(long, default_value_t = 1)]
        device: u32,
        /// One-time prekeys to publish
        #[arg(long, default_value_t = 20)]
        prekeys: u32,
        /// Registration id (random if omitted)
        #[arg(long)]
        registration_id: Option<u32>,
    },
    /// Unregister a device; its stored messages are dropped
    Unregister {
        #[arg(long, default_value_t = 1)]
        device: u32,
    },
    /// Send a message to PUBKEY[:DEVICE]
    Send {
        /// Recipient, as 66 hex characters, optionally followed by :DEVICE (default 1)
        #[arg(long, value_name = "PUBKEY[:DEVICE]")]
        to: String,
        /// Message text
        #[arg(long, conflicts_with = "file", required_unless_present = "file")]
        text: Option<String>,
        /// File whose bytes are the payload
        #[arg(long)]
        file: Option<PathBuf>,
        /// This identity's sending device
        #[arg(long, default_value_t = 1)]
        device: u32,
        /// A ticket of the recipient (hex), for first contact
        #[arg(long)]
        ticket: Option<String>,
    },
    /// Subscribe to a device's mailbox, print and verify each message, and ack it
    Listen {
        #[arg(long, default_value_t = 1)]
        device: u32,
        /// Deliver messages with ids above this
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Do not ack (messages stay stored)
        #[arg(long)]
        no_ack: bool,
        /// Exit after this many messages
        #[arg(long)]
        count: Option<u64>,
    },
    /// Fetch one stored message by id
    Get {
        #[arg(long)]
        id: u64,
        #[arg(long, default_value_t = 1)]
        device: u32,
    },
    /// Publish, count or fetch prekeys
    Prekeys {
        #[command(subcommand)]
        action: devices::PrekeysAction,
    },
    /// Create a one-time ticket others can use for first contact
    Ticket {
        #[command(subcommand)]
        action: account::TicketAction,
    },
    /// Who may send to this identity
    Policy { accept: account::PolicyArg },
    /// Manage the contacts allowed under `policy contacts-only`
    Contacts {
        #[command(subcommand)]
        action: account::ContactsAction,
    },
    /// The botd/1 conformance suite (docs/CONFORMANCE.md)
    Conformance {
        #[command(subcommand)]
        role: conformance::ConformanceRole,
    },
    /// Load generator and comparison report (docs/BENCHMARKS.md)
    Bench(botd_tools::bench::BenchArgs),
}

/// What every command takes from the global options.
struct Context {
    key_path: PathBuf,
    /// `--relay`: the address of the relay, unless the command names one.
    relay: String,
    server_key: Option<String>,
    out: Out,
}

/// Runs the command of the command line.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let ctx = Context {
        key_path: cli.key.unwrap_or_else(keys::default_key_path),
        relay: cli.relay,
        server_key: cli.server_key,
        out: Out { json: cli.json },
    };
    match cli.command {
        Command::Keygen => keys::keygen(&ctx),
        Command::Id => keys::id(&ctx),
        Command::Ping { addr } => session::ping(&ctx, addr).await,
        Command::Register {
            device,
            prekeys,
            registration_id,
        } => devices::register(&ctx, device, prekeys, registration_id).await,
        Command::Unregister { device } => devices::unregister(&ctx, device).await,
        Command::Prekeys { action } => devices::prekeys(&ctx, action).await,
        Command::Send {
            to,
            text,
            file,
            device,
            ticket,
        } => messages::send(&ctx, &to, text, file, device, ticket).await,
        Command::Listen {
            device,
            after,
            no_ack,
            count,
        } => messages::listen(&ctx, device, after, no_ack, count).await,
        Command::Get { id, device } => messages::get(&ctx, id, device).await,
        Command::Ticket { action } => account::ticket(&ctx, action).await,
        Command::Policy { accept } => account::policy(&ctx, accept).await,
        Command::Contacts { action } => account::contacts(&ctx, action).await,
        Command::Conformance { role } => conformance::run(&ctx, role).await,
        Command::Bench(args) => {
            botd_tools::bench::run(args, &ctx.relay, ctx.server_key.as_deref(), ctx.out.json)
                .await
                .map_err(CliError::Bench)
        }
    }
}
