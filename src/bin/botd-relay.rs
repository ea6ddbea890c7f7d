//! The relay server: `botd-relay [--listen ADDR] [--data-dir DIR] [--metrics-listen ADDR|off]
//! [--store embedded|nats://HOST:PORT[,…]] [--config FILE]`, and `botd-relay pubkey --data-dir
//! DIR`.

use std::path::PathBuf;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::process::ExitCode;

use botd_relay::config::{Config, MetricsListen};
use botd_relay::protocol::keyfile;
use std::sync::Arc;

use botd_relay::config::StoreBackend;
use botd_relay::net::Server;
use botd_relay::relay::Relay;
use botd_relay::store::embedded::{self, EmbeddedStore};
#[cfg(feature = "jetstream")]
use botd_relay::store::nats::NatsStore;
use botd_relay::store::Store;
use clap::{Parser, Subcommand};
use tracing::{error, info, warn};

/// File name of the relay's identity key inside the data directory.
const IDENTITY_FILE: &str = "identity.key";

#[derive(Parser, Debug)]
#[command(name = "botd-relay", version, about = "BOTD #2 relay server (botd/1)")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Address to listen on for nodes [default: 0.0.0.0:9945]
    #[arg(long, value_name = "ADDR", global = true)]
    listen: Option<std::net::SocketAddr>,
    /// Directory for the identity key and the store [default: ./botd-data]
    #[arg(long, value_name = "DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Prometheus exporter address, or `off` [default: 127.0.0.1:9946]
    #[arg(long, value_name = "ADDR|off", global = true)]
    metrics_listen: Option<MetricsListen>,
    /// Store backend: `embedded`, or `nats://HOST:PORT[,HOST:PORT…]` for a JetStream cluster
    /// shared with other relays [default: embedded]
    #[arg(long, value_name = "BACKEND", global = true)]
    store: Option<String>,
    /// TOML file with any `Config` field (see README); flags and BOTD_* variables override it
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the relay (the default)
    Run,
    /// Print the relay's public key (creating the key if the data dir has none)
    Pubkey,
    /// Verify the store's snapshot and journal files and print what they hold
    Check,
}

fn load_config(args: &RunArgs) -> Result<Config, String> {
    let mut config =
        Config::load(args.config.as_deref(), std::env::vars()).map_err(|e| e.to_string())?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    if let Some(metrics) = args.metrics_listen {
        config.metrics_listen = metrics;
    }
    if let Some(store) = &args.store {
        config.store = store.clone();
        config.validate().map_err(|e| e.to_string())?;
    }
    Ok(config)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BOTD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match load_config(&cli.run) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("botd-relay: {err}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Check) = cli.command {
        return check(&config);
    }
    let key_path = config.data_dir.join(IDENTITY_FILE);
    let (identity, created) = match keyfile::load_or_create(&key_path) {
        Ok(loaded) => loaded,
        Err(err) => {
            eprintln!("botd-relay: {err}");
            return ExitCode::FAILURE;
        }
    };
    if created {
        eprintln!("botd-relay: created identity key {}", key_path.display());
    }
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => check(&config),
        Command::Pubkey => {
            println!("{}", identity.public());
            ExitCode::SUCCESS
        }
        Command::Run => {
            raise_open_files(config.max_connections);
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(err) => {
                    eprintln!("botd-relay: cannot start the runtime: {err}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(config, identity)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    error!("{err}");
                    eprintln!("botd-relay: {err}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Each connection is a descriptor: lifts the soft limit to what `max_connections` needs (at
/// most the hard limit) and warns when that is still short.
fn raise_open_files(max_connections: usize) {
    match botd_relay::fdlimit::raise_open_files(max_connections) {
        Ok(Some(limit)) if !limit.fits(max_connections) => warn!(
            open_files = limit.after,
            hard_limit = limit.hard,
            max_connections,
            "the open-files limit is below max_connections: connections past it are refused at \
             accept (raise `ulimit -Hn` / LimitNOFILE, or lower max_connections)"
        ),
        Ok(Some(limit)) if limit.after > limit.before => {
            info!(
                from = limit.before,
                to = limit.after,
                "open-files limit raised"
            )
        }
        Ok(_) => {}
        Err(err) => warn!(%err, "cannot raise the open-files limit"),
    }
}

/// The relay on a NATS JetStream cluster (`store = "nats://…"`).
#[cfg(feature = "jetstream")]
async fn run_on_jetstream(
    config: Config,
    identity: botd_relay::protocol::keys::KeyPair,
    urls: Vec<String>,
) -> Result<(), String> {
    let store = NatsStore::connect(&config)
        .await
        .map_err(|err| err.to_string())?;
    info!(
        servers = urls.join(","),
        prefix = config.nats_prefix,
        replicas = config.nats_replicas,
        "JetStream store connected"
    );
    let config = Arc::new(config);
    let relay = Relay::new(config.clone(), *identity.public(), store);
    let background = tokio_util::sync::CancellationToken::new();
    tokio::spawn(relay.clone().run_maintenance(background.clone()));
    serve(config, identity, relay).await?;
    background.cancel();
    Ok(())
}

#[cfg(not(feature = "jetstream"))]
async fn run_on_jetstream(
    _config: Config,
    _identity: botd_relay::protocol::keys::KeyPair,
    _urls: Vec<String>,
) -> Result<(), String> {
    Err(
        "this relay was built without the `jetstream` feature: build it with the default \
         features to use store = \"nats://…\""
            .into(),
    )
}

async fn run(config: Config, identity: botd_relay::protocol::keys::KeyPair) -> Result<(), String> {
    if let MetricsListen::At(addr) = config.metrics_listen {
        botd_relay::metrics::install_prometheus(addr)
            .map_err(|err| format!("cannot serve metrics on {addr}: {err}"))?;
        info!(%addr, "metrics exporter listening");
    }
    if let Ok(StoreBackend::Nats(urls)) = config.store_backend() {
        return run_on_jetstream(config, identity, urls).await;
    }
    let clock = botd_relay::clock::Clock::new();
    let (store, report) =
        EmbeddedStore::open(&config, clock.now_ms()).map_err(|err| err.to_string())?;
    info!(
        snapshot = report.snapshot.as_ref().map(|p| p.display().to_string()),
        replayed = report.records_replayed,
        torn_tail = report.torn_tail.is_some(),
        identities = report.stats.identities,
        messages = report.stats.messages,
        elapsed_ms = report.elapsed_ms as u64,
        "store recovered"
    );
    let config = Arc::new(config);
    let relay = Relay::new(config.clone(), *identity.public(), store.clone());
    let background = tokio_util::sync::CancellationToken::new();
    tokio::spawn(relay.clone().run_maintenance(background.clone()));
    tokio::spawn(embedded::disk::run_disk_gauges(
        config.data_dir.clone(),
        background.clone(),
    ));
    tokio::spawn(embedded::run_snapshots(
        store.clone(),
        config.clone(),
        *relay.clock(),
        background.clone(),
    ));
    serve(config.clone(), identity, relay.clone()).await?;
    background.cancel();
    let now_ms = relay.clock().now_ms();
    tokio::task::spawn_blocking(move || store.close(now_ms))
        .await
        .map_err(|err| err.to_string())?
        .map_err(|err| format!("final snapshot failed: {err}"))?;
    info!("store saved");
    Ok(())
}

/// Serves the relay application until SIGINT or SIGTERM.
async fn serve<S: Store>(
    config: Arc<Config>,
    identity: botd_relay::protocol::keys::KeyPair,
    relay: Arc<Relay<S>>,
) -> Result<(), String> {
    let listen = config.listen;
    let server = Server::bind((*config).clone(), identity, relay)
        .await
        .map_err(|err| format!("cannot listen on {listen}: {err}"))?;
    let addr = server.local_addr().map_err(|err| err.to_string())?;
    println!(
        "botd-relay listening on {addr} as {}",
        server.identity().public()
    );
    let handle = server.handle();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutdown requested");
        handle.shutdown();
    });
    server.run().await;
    Ok(())
}

fn check(config: &Config) -> ExitCode {
    match EmbeddedStore::check(&config.data_dir) {
        Ok(report) => {
            println!("data dir:      {}", config.data_dir.display());
            match &report.snapshot {
                Some(path) => println!(
                    "snapshot:      {} ({} events)",
                    path.display(),
                    report.snapshot_events
                ),
                None => println!("snapshot:      none"),
            }
            println!(
                "journal:       {} segment(s), {} record(s) after the snapshot, {} covered by it",
                report.segments, report.records_replayed, report.records_skipped
            );
            if let Some((path, offset, bytes)) = &report.torn_tail {
                println!(
                    "torn tail:     {} at offset {offset}, {bytes} bytes (cut off at the next start)",
                    path.display()
                );
            }
            let s = report.stats;
            println!("identities:    {}", s.identities);
            println!("devices:       {}", s.devices);
            println!(
                "messages:      {} ({} payload bytes)",
                s.messages, s.payload_bytes
            );
            println!("prekeys:       {} one-time", s.one_time_prekeys);
            println!("next lsn:      {}", report.next_lsn);
            println!("ok ({} ms)", report.elapsed_ms);
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("botd-relay check: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
