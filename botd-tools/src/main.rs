//! The `botd` command-line client: key management and every relay request.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use botd_client::{verify_delivery, Client, ClientOptions, OutgoingMessage};
use botd_protocol::keyfile;
use botd_protocol::keys::{sha256, KeyPair, PublicKeyBytes};
use botd_protocol::proto::{self, Accept, Body, PreKey, SignedPreKey};
use botd_protocol::DEFAULT_PORT;
use botd_tools::conformance::{self, cli::Outputs, Selection};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

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
    json: bool,
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
        action: PrekeysAction,
    },
    /// Create a one-time ticket others can use for first contact
    Ticket {
        #[command(subcommand)]
        action: TicketAction,
    },
    /// Who may send to this identity
    Policy { accept: PolicyArg },
    /// Manage the contacts allowed under `policy contacts-only`
    Contacts {
        #[command(subcommand)]
        action: ContactsAction,
    },
    /// The botd/1 conformance suite (docs/CONFORMANCE.md)
    Conformance {
        #[command(subcommand)]
        role: ConformanceRole,
    },
    /// Load generator and comparison report (docs/BENCHMARKS.md)
    Bench(botd_tools::bench::BenchArgs),
}

/// Options shared by both roles of the conformance suite.
#[derive(clap::Args, Debug)]
struct SuiteArgs {
    /// List the cases and exit (dry run)
    #[arg(long)]
    list: bool,
    /// Run one section and its subsections (repeatable), e.g. 8.3
    #[arg(long, value_name = "SECTION")]
    section: Vec<String>,
    /// Run one case (repeatable), e.g. 8.3/idempotent-resend
    #[arg(long = "case", value_name = "ID")]
    cases: Vec<String>,
    /// Also run the slow cases (minutes of timers, or of rate-limit waits)
    #[arg(long)]
    slow: bool,
    /// Write the JSON report (as `--json` prints it)
    #[arg(long, value_name = "FILE")]
    json_file: Option<PathBuf>,
    /// Write the JUnit XML report
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// Write the self-contained HTML report
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
    /// Print only failures and the closing line
    #[arg(long)]
    quiet: bool,
}

#[derive(Subcommand, Debug)]
enum ConformanceRole {
    /// Run every case against a relay (give its key with --server-key)
    Relay {
        /// Relay address, HOST[:PORT]
        addr: Option<String>,
        #[command(flatten)]
        suite: SuiteArgs,
        /// Limits the suite cannot read from Welcome: KEY=VALUE ..., e.g. mailbox_max_messages=50
        /// or change_rate_per_identity=100 (the keys are listed in docs/CONFORMANCE.md)
        #[arg(long, value_name = "KEY=VALUE", num_args = 1..)]
        assume: Vec<String>,
        /// Cases run at once
        #[arg(long, default_value_t = 8)]
        jobs: usize,
        /// Longest wait for an answer, in milliseconds
        #[arg(long, default_value_t = 5000)]
        wait_ms: u64,
    },
    /// Listen as a relay that misbehaves on purpose, one case per connection of the node under test
    Client {
        /// Address to listen on
        #[arg(long, default_value = "127.0.0.1:9946")]
        listen: String,
        #[command(flatten)]
        suite: SuiteArgs,
        /// Write the listener's public key to this file as well as printing it
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// Longest time the node under test gets for one case, in seconds
        #[arg(long, default_value_t = 15)]
        case_timeout: u64,
    },
    /// Run the node scenario of docs/CONFORMANCE.md with this crate's client (e.g. against `conformance client`)
    Scenario {
        /// Relay address, HOST[:PORT] (overrides --relay)
        addr: Option<String>,
        /// Run it this many times (one connection per case of the client role)
        #[arg(long, default_value_t = 1)]
        repeat: u32,
    },
}

#[derive(Subcommand, Debug)]
enum PrekeysAction {
    /// Upload fresh one-time prekeys (and optionally a new signed prekey)
    Upload {
        #[arg(long, default_value_t = 1)]
        device: u32,
        #[arg(long, default_value_t = 20)]
        count: u32,
        /// Also replace the signed prekey
        #[arg(long)]
        signed: bool,
    },
    /// Fetch prekey bundles of an identity (pops one one-time prekey per device)
    Fetch {
        pubkey: String,
        /// Devices to fetch (all when omitted)
        #[arg(long = "device")]
        devices: Vec<u32>,
    },
    /// How many one-time prekeys a device has left
    Count {
        #[arg(long, default_value_t = 1)]
        device: u32,
    },
}

#[derive(Subcommand, Debug)]
enum TicketAction {
    Create {
        /// Lifetime, e.g. 1h, 7d
        #[arg(long, default_value = "1d", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
}

#[derive(Subcommand, Debug)]
enum ContactsAction {
    Add { pubkey: String },
    Remove { pubkey: String },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum PolicyArg {
    Open,
    ContactsOnly,
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

fn parse_pubkey(text: &str) -> Result<PublicKeyBytes, String> {
    PublicKeyBytes::from_hex(text).map_err(|err| format!("{text:?} is not a public key: {err}"))
}

/// Fresh prekey material: the relay stores it opaquely; private halves go next to the key file.
fn fresh_prekeys(
    identity: &KeyPair,
    key_path: &Path,
    first_id: u32,
    count: u32,
    signed: bool,
) -> Result<(Option<SignedPreKey>, Vec<PreKey>), String> {
    let mut secrets = String::new();
    let signed = signed.then(|| {
        let pair = KeyPair::generate();
        secrets.push_str(&format!(
            "signed {first_id} {}\n",
            hex::encode(*pair.secret_bytes())
        ));
        let public = Bytes::copy_from_slice(pair.public().as_bytes());
        let signature = identity.sign(&sha256(&[&public]));
        SignedPreKey {
            id: first_id,
            public_key: public,
            signature: Bytes::copy_from_slice(&signature),
        }
    });
    let one_time = (0..count)
        .map(|i| {
            let pair = KeyPair::generate();
            let id = first_id.wrapping_add(i);
            secrets.push_str(&format!(
                "one-time {id} {}\n",
                hex::encode(*pair.secret_bytes())
            ));
            PreKey {
                id,
                public_key: Bytes::copy_from_slice(pair.public().as_bytes()),
            }
        })
        .collect();
    let path = key_path.with_extension("prekeys");
    keyfile::append_secret(&path, &secrets)
        .map_err(|err| format!("cannot write {}: {err}", path.display()))?;
    Ok((signed, one_time))
}

fn show_payload(payload: &[u8]) -> String {
    match std::str::from_utf8(payload) {
        Ok(text)
            if !text
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t') =>
        {
            text.to_owned()
        }
        _ => format!("0x{}", hex::encode(payload)),
    }
}

/// RFC 3339 (UTC, milliseconds) of a Unix time in milliseconds.
fn time(unix_ms: u64) -> String {
    conformance::rfc3339_ms(unix_ms)
}

/// A delivered message as the terminal shows it, and as JSON with the same fields.
fn delivery(deliver: &proto::Deliver, me: &PublicKeyBytes) -> (String, Value) {
    let verified = verify_delivery(deliver, me);
    let check = match &verified {
        Ok(_) => "signature ok".to_owned(),
        Err(err) => format!("SIGNATURE INVALID: {err}"),
    };
    let text = format!(
        "#{} from {}:{} at {} ({} bytes, {check}): {}",
        deliver.message_id,
        hex::encode(&deliver.sender),
        deliver.sender_device,
        time(deliver.received_at_ms),
        deliver.payload.len(),
        show_payload(&deliver.payload)
    );
    let value = json!({
        "message_id": deliver.message_id,
        "sender": hex::encode(&deliver.sender),
        "sender_device": deliver.sender_device,
        "recipient_device": deliver.recipient_device,
        "received_at": time(deliver.received_at_ms),
        "received_at_ms": deliver.received_at_ms,
        "payload_len": deliver.payload.len(),
        "signature_ok": verified.is_ok(),
        "signature_error": verified.err().map(|e| e.to_string()),
        "sender_nonce": hex::encode(&deliver.sender_nonce),
        // The payload as text when it is UTF-8, and always as hex.
        "text": std::str::from_utf8(&deliver.payload).ok(),
        "payload": hex::encode(&deliver.payload),
    });
    (text, value)
}

/// Where results go: text for people, or one JSON object per line.
#[derive(Clone, Copy)]
struct Out {
    json: bool,
}

impl Out {
    /// Prints one result, a line at a time (so that `listen` can be piped). When the reader has
    /// gone away (e.g. `| head -1`), `botd` stops at once, before acting on what it could not
    /// show: `listen` does not acknowledge a message it could not print.
    fn emit(&self, text: impl std::fmt::Display, value: Value) {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        let written = if self.json {
            writeln!(stdout, "{value}")
        } else {
            writeln!(stdout, "{text}")
        };
        if written.and_then(|()| stdout.flush()).is_err() {
            std::process::exit(0);
        }
    }
}

fn bundle_json(b: &proto::PreKeyBundle) -> Value {
    let signed = b.signed_prekey.clone().unwrap_or_default();
    json!({
        "device_id": b.device_id,
        "registration_id": b.registration_id,
        "identity_key": hex::encode(&b.identity_key),
        "signed_prekey": {
            "id": signed.id,
            "public_key": hex::encode(&signed.public_key),
            "signature": hex::encode(&signed.signature),
        },
        "one_time_prekey": b.one_time_prekey.as_ref().map(|k| json!({
            "id": k.id,
            "public_key": hex::encode(&k.public_key),
        })),
    })
}

struct Session {
    client: Client,
    identity: Arc<KeyPair>,
    key_path: PathBuf,
}

async fn connect(
    cli_relay: &str,
    server_key: Option<&str>,
    key_path: &Path,
) -> Result<Session, String> {
    let server_key =
        server_key.ok_or("the relay's key is needed: --server-key HEX or BOTD_SERVER_KEY")?;
    let relay =
        PublicKeyBytes::from_hex(server_key).map_err(|err| format!("--server-key: {err}"))?;
    let identity = Arc::new(load_key(key_path)?);
    let socket = resolve(cli_relay).await?;
    let client = Client::connect(socket, identity.clone(), relay, ClientOptions::default())
        .await
        .map_err(|err| format!("connect to {socket}: {err}"))?;
    Ok(Session {
        client,
        identity,
        key_path: key_path.to_owned(),
    })
}

/// Turns a client error into the CLI's message, naming the step that failed.
fn fail(what: &'static str) -> impl Fn(botd_client::ClientError) -> String {
    move |err| format!("{what}: {err}")
}

async fn run(cli: Cli) -> Result<(), String> {
    let key_path = cli.key.clone().unwrap_or_else(default_key_path);
    let server_key = cli.server_key.as_deref();
    let out = Out { json: cli.json };
    match cli.command {
        Command::Conformance { role } => {
            return conformance(role, &cli.relay, server_key, out).await
        }
        Command::Bench(args) => {
            botd_tools::bench::run(args, &cli.relay, server_key, cli.json).await?
        }
        Command::Keygen => {
            let pair = KeyPair::generate();
            keyfile::create(&key_path, &pair).map_err(|e| e.to_string())?;
            eprintln!("wrote {}", key_path.display());
            out.emit(
                pair.public(),
                json!({ "identity": pair.public().to_hex(), "key_file": key_path }),
            );
        }
        Command::Id => {
            let public = *load_key(&key_path)?.public();
            out.emit(public, json!({ "identity": public.to_hex() }));
        }
        Command::Ping { addr } => {
            let relay_addr = addr.unwrap_or(cli.relay);
            let s = connect(&relay_addr, server_key, &key_path).await?;
            let welcome = s.client.welcome().clone();
            let rtt = s.client.ping().await.map_err(fail("ping"))?;
            let rtt_ms = rtt.as_secs_f64() * 1000.0;
            out.emit(
                format!(
                    "connected to {relay_addr} ({} {}), relay key {}, relay time {}\npong in {rtt_ms:.3} ms",
                    welcome.protocol,
                    welcome.server_version,
                    s.client.relay_key(),
                    time(welcome.server_time_ms),
                ),
                json!({
                    "relay": relay_addr,
                    "protocol": welcome.protocol,
                    "server_version": welcome.server_version,
                    "relay_key": s.client.relay_key().to_hex(),
                    "server_time": time(welcome.server_time_ms),
                    "server_time_ms": welcome.server_time_ms,
                    "max_frame_len": welcome.max_frame_len,
                    "max_payload_len": welcome.max_payload_len,
                    "rtt_ms": rtt_ms,
                }),
            );
        }
        Command::Register {
            device,
            prekeys,
            registration_id,
        } => {
            let s = connect(&cli.relay, server_key, &key_path).await?;
            let (signed, one_time) = fresh_prekeys(&s.identity, &s.key_path, 1, prekeys, true)?;
            let registered = s
                .client
                .register(proto::Register {
                    device_id: device,
                    registration_id: registration_id
                        .unwrap_or_else(|| rand::random::<u32>() & 0x3fff),
                    identity_key: Bytes::copy_from_slice(s.identity.public().as_bytes()),
                    signed_prekey: signed,
                    one_time_prekeys: one_time,
                })
                .await
                .map_err(fail("register"))?;
            out.emit(
                format!(
                    "registered {}:{} with {} one-time prekeys",
                    s.identity.public(),
                    registered.device_id,
                    registered.one_time_prekeys
                ),
                json!({
                    "identity": s.identity.public().to_hex(),
                    "device_id": registered.device_id,
                    "one_time_prekeys": registered.one_time_prekeys,
                }),
            );
        }
        Command::Unregister { device } => {
            let s = connect(&cli.relay, server_key, &key_path).await?;
            let done = s
                .client
                .unregister(device)
                .await
                .map_err(fail("unregister"))?;
            out.emit(
                format!("unregistered device {}", done.device_id),
                json!({ "identity": s.identity.public().to_hex(), "device_id": done.device_id }),
            );
        }
        Command::Send {
            to,
            text,
            file,
            device,
            ticket,
        } => {
            let (recipient, recipient_device) = match to.rsplit_once(':') {
                Some((key, dev)) => (
                    parse_pubkey(key)?,
                    dev.parse().map_err(|_| format!("bad device in {to:?}"))?,
                ),
                None => (parse_pubkey(&to)?, 1),
            };
            let payload = match (text, file) {
                (Some(text), _) => Bytes::from(text.into_bytes()),
                (None, Some(path)) => Bytes::from(
                    std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?,
                ),
                (None, None) => return Err("give --text or --file".into()),
            };
            let s = connect(&cli.relay, server_key, &key_path).await?;
            let mut message = OutgoingMessage::new(recipient, recipient_device, device, payload);
            if let Some(ticket) = ticket {
                message.ticket =
                    Bytes::from(hex::decode(ticket.trim()).map_err(|_| "--ticket must be hex")?);
            }
            let nonce = hex::encode(message.nonce);
            let sent = s.client.send_message(message).await.map_err(fail("send"))?;
            out.emit(
                format!(
                    "sent message {} to {recipient}:{recipient_device}{}",
                    sent.message_id,
                    if sent.duplicate { " (duplicate)" } else { "" }
                ),
                json!({
                    "message_id": sent.message_id,
                    "duplicate": sent.duplicate,
                    "recipient": recipient.to_hex(),
                    "recipient_device": recipient_device,
                    "sender_device": device,
                    "sender_nonce": nonce,
                }),
            );
        }
        Command::Listen {
            device,
            after,
            no_ack,
            count,
        } => {
            let mut s = connect(&cli.relay, server_key, &key_path).await?;
            let subscribed = s
                .client
                .subscribe(device, after)
                .await
                .map_err(fail("subscribe"))?;
            eprintln!(
                "listening on device {device} (mailbox last id {}); Ctrl-C to stop",
                subscribed.last_id
            );
            let me = *s.identity.public();
            let mut received = 0u64;
            while count.is_none_or(|limit| received < limit) {
                let Some(push) = s.client.next_push().await else {
                    return Err("connection closed".into());
                };
                match push.body {
                    Some(Body::Deliver(deliver)) => {
                        let (text, value) = delivery(&deliver, &me);
                        out.emit(text, value);
                        if !no_ack {
                            s.client
                                .ack(device, vec![deliver.message_id])
                                .await
                                .map_err(fail("ack"))?;
                        }
                        received += 1;
                    }
                    Some(Body::PreKeysLow(low)) => eprintln!(
                        "note: device {} has {} one-time prekeys left",
                        low.device_id, low.count
                    ),
                    Some(Body::Error(error)) => {
                        return Err(format!(
                            "relay: {}: {}",
                            conformance::probe::code_name(error.code),
                            error.message
                        ))
                    }
                    other => eprintln!("note: unexpected push {other:?}"),
                }
            }
        }
        Command::Get { id, device } => {
            let s = connect(&cli.relay, server_key, &key_path).await?;
            let deliver = s
                .client
                .get_message(device, id)
                .await
                .map_err(fail("get"))?;
            let (text, value) = delivery(&deliver, s.identity.public());
            out.emit(text, value);
        }
        Command::Prekeys { action } => {
            let s = connect(&cli.relay, server_key, &key_path).await?;
            match action {
                PrekeysAction::Upload {
                    device,
                    count,
                    signed,
                } => {
                    let first_id = rand::random::<u32>() & 0x00ff_ffff;
                    let (signed_prekey, one_time_prekeys) =
                        fresh_prekeys(&s.identity, &s.key_path, first_id, count, signed)?;
                    let stored = s
                        .client
                        .upload_prekeys(proto::UploadPreKeys {
                            device_id: device,
                            signed_prekey,
                            one_time_prekeys,
                        })
                        .await
                        .map_err(fail("upload"))?;
                    out.emit(
                        format!(
                            "device {} now has {} one-time prekeys",
                            stored.device_id, stored.count
                        ),
                        json!({ "device_id": stored.device_id, "count": stored.count }),
                    );
                }
                PrekeysAction::Fetch { pubkey, devices } => {
                    let identity = parse_pubkey(&pubkey)?;
                    let bundles = s
                        .client
                        .fetch_prekeys(&identity, devices)
                        .await
                        .map_err(fail("fetch"))?;
                    let text = bundles
                        .iter()
                        .map(|b| {
                            let one_time = b.one_time_prekey.as_ref().map_or(
                                "none".to_owned(),
                                |k| format!("#{} {}", k.id, hex::encode(&k.public_key)),
                            );
                            let signed = b.signed_prekey.clone().unwrap_or_default();
                            format!(
                                "device {} registration {} identity_key {} signed_prekey #{} {} one_time {}",
                                b.device_id,
                                b.registration_id,
                                hex::encode(&b.identity_key),
                                signed.id,
                                hex::encode(&signed.public_key),
                                one_time
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n");
                    out.emit(
                        text,
                        json!({
                            "identity": identity.to_hex(),
                            "bundles": bundles.iter().map(bundle_json).collect::<Vec<_>>(),
                        }),
                    );
                }
                PrekeysAction::Count { device } => {
                    let count = s.client.prekey_count(device).await.map_err(fail("count"))?;
                    out.emit(
                        format!(
                            "device {} has {} one-time prekeys",
                            count.device_id, count.count
                        ),
                        json!({ "device_id": count.device_id, "count": count.count }),
                    );
                }
            }
        }
        Command::Ticket {
            action: TicketAction::Create { ttl, uses },
        } => {
            let s = connect(&cli.relay, server_key, &key_path).await?;
            let ttl_s = u32::try_from(ttl.as_secs().max(1)).map_err(|_| "--ttl is too long")?;
            let ticket = s
                .client
                .create_ticket(ttl_s, uses)
                .await
                .map_err(fail("ticket"))?;
            if !out.json {
                eprintln!(
                    "ticket for {} on relay {}: {} use(s), expires {}",
                    hex::encode(&ticket.identity),
                    hex::encode(&ticket.relay_pubkey),
                    ticket.uses,
                    time(ticket.expires_at_ms)
                );
            }
            out.emit(
                hex::encode(&ticket.token),
                json!({
                    "token": hex::encode(&ticket.token),
                    "identity": hex::encode(&ticket.identity),
                    "relay_pubkey": hex::encode(&ticket.relay_pubkey),
                    "uses": ticket.uses,
                    "expires_at": time(ticket.expires_at_ms),
                    "expires_at_ms": ticket.expires_at_ms,
                }),
            );
        }
        Command::Policy { accept } => {
            let s = connect(&cli.relay, server_key, &key_path).await?;
            let accept = match accept {
                PolicyArg::Open => Accept::Open,
                PolicyArg::ContactsOnly => Accept::ContactsOnly,
            };
            s.client.set_policy(accept).await.map_err(fail("policy"))?;
            out.emit(
                format!("policy set to {}", accept.as_str_name()),
                json!({ "policy": accept.as_str_name() }),
            );
        }
        Command::Contacts { action } => {
            let s = connect(&cli.relay, server_key, &key_path).await?;
            let (verb, pubkey) = match action {
                ContactsAction::Add { pubkey } => {
                    s.client
                        .add_contact(&parse_pubkey(&pubkey)?)
                        .await
                        .map_err(fail("add contact"))?;
                    ("added", pubkey)
                }
                ContactsAction::Remove { pubkey } => {
                    s.client
                        .remove_contact(&parse_pubkey(&pubkey)?)
                        .await
                        .map_err(fail("remove contact"))?;
                    ("removed", pubkey)
                }
            };
            let contact = parse_pubkey(&pubkey)?.to_hex();
            out.emit(format!("{verb} {contact}"), json!({ verb: contact }));
        }
    }
    Ok(())
}

fn selection(suite: &SuiteArgs) -> Selection {
    Selection {
        sections: suite.section.clone(),
        cases: suite.cases.clone(),
        slow: suite.slow,
    }
}

fn outputs(suite: &SuiteArgs, out: Out) -> Outputs {
    Outputs {
        json: suite.json_file.clone(),
        junit: suite.junit.clone(),
        html: suite.html.clone(),
        quiet: suite.quiet,
        json_to_stdout: out.json,
    }
}

/// Prints the report (as JSON on standard output with `--json`); an error when a case failed.
fn conclude(report: &conformance::Report, suite: &SuiteArgs, out: Out) -> Result<(), String> {
    if conformance::cli::finish(report, &outputs(suite, out))? {
        Ok(())
    } else {
        Err(format!(
            "{} case(s) failed",
            report.count(conformance::Verdict::Fail)
        ))
    }
}

/// A line for people: standard output, or standard error when standard output carries JSON.
fn say(out: Out, text: impl std::fmt::Display) {
    if out.json {
        eprintln!("{text}");
    } else {
        println!("{text}");
    }
}

async fn conformance(
    role: ConformanceRole,
    cli_relay: &str,
    server_key: Option<&str>,
    out: Out,
) -> Result<(), String> {
    match role {
        ConformanceRole::Relay {
            addr,
            suite,
            assume,
            jobs,
            wait_ms,
        } => {
            let sel = selection(&suite);
            if suite.list {
                let items: Vec<_> = conformance::relay::cases()
                    .into_iter()
                    .filter(|c| sel.matches(c.id))
                    .map(|c| (c.id.to_owned(), c.level.as_str(), c.title, c.slow))
                    .collect();
                list(out, &items);
                return Ok(());
            }
            let server_key = server_key
                .ok_or("the relay's key is needed: --server-key HEX or BOTD_SERVER_KEY")?;
            let key =
                PublicKeyBytes::from_hex(server_key).map_err(|e| format!("--server-key: {e}"))?;
            let socket = resolve(addr.as_deref().unwrap_or(cli_relay)).await?;
            let mut target = conformance::probe::Target::new(socket, key);
            target.assume = conformance::Assumptions::parse(assume.iter().map(String::as_str))?;
            target.wait = Duration::from_millis(wait_ms.max(100));
            let report = conformance::relay::run(target, &sel, jobs, |c| {
                eprintln!("{}", conformance::cli::progress_line(c))
            })
            .await;
            conclude(&report, &suite, out)
        }
        ConformanceRole::Client {
            listen,
            suite,
            key_file,
            case_timeout,
        } => {
            let sel = selection(&suite);
            if suite.list {
                let items: Vec<_> = conformance::client::cases()
                    .into_iter()
                    .filter(|c| sel.matches(c.id))
                    .map(|c| (c.id.to_owned(), c.level.as_str(), c.title, c.slow))
                    .collect();
                list(out, &items);
                return Ok(());
            }
            let socket = resolve(&listen).await?;
            let listener = conformance::client::Listener::bind(socket, KeyPair::generate())
                .await
                .map_err(|e| format!("cannot listen on {socket}: {e}"))?;
            let count = conformance::client::cases()
                .iter()
                .filter(|c| sel.matches(c.id))
                .count();
            if let Some(path) = &key_file {
                std::fs::write(path, format!("{}\n", listener.key()))
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            }
            say(
                out,
                format!(
                    "listening on {} with key {}",
                    listener.local_addr(),
                    listener.key()
                ),
            );
            say(
                out,
                format!(
                    "{count} cases: run the node scenario once per case, e.g. botd conformance scenario {} --server-key {} --repeat {count}",
                    listener.local_addr(),
                    listener.key()
                ),
            );
            let report = listener
                .run(&sel, Duration::from_secs(case_timeout.max(1)), |c| {
                    eprintln!("{}", conformance::cli::progress_line(c))
                })
                .await;
            conclude(&report, &suite, out)
        }
        ConformanceRole::Scenario { addr, repeat } => {
            let server_key = server_key
                .ok_or("the relay's key is needed: --server-key HEX or BOTD_SERVER_KEY")?;
            let key =
                PublicKeyBytes::from_hex(server_key).map_err(|e| format!("--server-key: {e}"))?;
            let socket = resolve(addr.as_deref().unwrap_or(cli_relay)).await?;
            let mut failures = 0;
            let mut runs = Vec::new();
            for round in 0..repeat {
                let result = conformance::scenario::run(
                    socket,
                    key,
                    &conformance::scenario::Options::default(),
                )
                .await;
                match &result {
                    Ok(summary) => eprintln!("scenario {}: {summary}", round + 1),
                    Err(err) => {
                        failures += 1;
                        eprintln!("scenario {}: ended: {err}", round + 1);
                    }
                }
                runs.push(json!({
                    "run": round + 1,
                    "completed": result.is_ok(),
                    "detail": result.unwrap_or_else(|e| e),
                }));
            }
            out.emit(
                format!("scenario ran {repeat} time(s), {failures} ended early"),
                json!({ "runs": repeat, "ended_early": failures, "results": runs }),
            );
            Ok(())
        }
    }
}

/// The case listing of `--list`.
fn list(out: Out, items: &[(String, &'static str, &'static str, bool)]) {
    let value = json!({
        "cases": items.iter().map(|(id, level, title, slow)| json!({
            "id": id, "level": level, "title": title, "slow": slow,
        })).collect::<Vec<_>>(),
    });
    let text = conformance::report::listing(items);
    out.emit(text.trim_end(), value);
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("botd: {err}");
            if json {
                println!("{}", json!({ "error": err }));
            }
            ExitCode::FAILURE
        }
    }
}
