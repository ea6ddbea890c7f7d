//! `botd conformance relay|client|scenario`: the command line of the conformance suite
//! ([`botd_tools::conformance`]), its case listings and reports, and its exit status (a run
//! with a failing case exits 1).

use std::path::PathBuf;
use std::time::Duration;

use botd_protocol::keys::KeyPair;
use botd_tools::conformance::{self, cli::Outputs, Level, Selection};
use clap::Subcommand;
use serde_json::json;

use super::error::CliError;
use super::output::Out;
use super::session::{relay_key, resolve};
use super::Context;

/// Options shared by both roles of the conformance suite.
#[derive(clap::Args, Debug)]
pub struct SuiteArgs {
    /// List the cases and exit (dry run)
    #[arg(long)]
    list: bool,
    /// Run one section and its subsections (repeatable), e.g. 8.3
    #[arg(long, value_name = "SECTION")]
    section: Vec<String>,
    /// Run one case (repeatable), e.g. 8.3/idempotent-resend
    #[arg(long = "case", value_name = "ID")]
    cases: Vec<String>,
    /// Also run the cases that wait long (more than 30 s of timers, or of rate-limit waits)
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
pub enum ConformanceRole {
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

impl SuiteArgs {
    /// With `--list`, prints the selected cases (`id, level, title, slow`) and returns true:
    /// nothing is to be run.
    fn list(
        &self,
        out: Out,
        cases: impl Iterator<Item = (&'static str, Level, &'static str, bool)>,
    ) -> bool {
        if !self.list {
            return false;
        }
        let sel = self.selection();
        let items: Vec<_> = cases
            .filter(|(id, ..)| sel.matches(id))
            .map(|(id, level, title, slow)| (id.to_owned(), level.as_str(), title, slow))
            .collect();
        let value = json!({
            "cases": items.iter().map(|(id, level, title, slow)| json!({
                "id": id, "level": level, "title": title, "slow": slow,
            })).collect::<Vec<_>>(),
        });
        let text = conformance::report::listing(&items);
        out.emit(text.trim_end(), value);
        true
    }

    fn selection(&self) -> Selection {
        Selection {
            sections: self.section.clone(),
            cases: self.cases.clone(),
            slow: self.slow,
        }
    }

    fn outputs(&self, out: Out) -> Outputs {
        Outputs {
            json: self.json_file.clone(),
            junit: self.junit.clone(),
            html: self.html.clone(),
            quiet: self.quiet,
            json_to_stdout: out.json,
        }
    }

    /// Prints the report (as JSON on standard output with `--json`); an error when a case
    /// failed.
    fn conclude(&self, report: &conformance::Report, out: Out) -> Result<(), CliError> {
        if conformance::cli::finish(report, &self.outputs(out))? {
            Ok(())
        } else {
            Err(CliError::ConformanceFailed(
                report.count(conformance::Verdict::Fail),
            ))
        }
    }
}

/// `botd conformance ROLE`.
pub async fn run(ctx: &Context, role: ConformanceRole) -> Result<(), CliError> {
    let out = ctx.out;
    match role {
        ConformanceRole::Relay {
            addr,
            suite,
            assume,
            jobs,
            wait_ms,
        } => {
            let cases = conformance::relay::cases();
            if suite.list(out, cases.iter().map(|c| (c.id, c.level, c.title, c.slow))) {
                return Ok(());
            }
            let sel = suite.selection();
            let key = relay_key(ctx.server_key.as_deref())?;
            let socket = resolve(addr.as_deref().unwrap_or(&ctx.relay)).await?;
            let mut target = conformance::probe::Target::new(socket, key);
            target.assume = conformance::Assumptions::parse(assume.iter().map(String::as_str))?;
            target.wait = Duration::from_millis(wait_ms.max(100));
            let report = conformance::relay::run(target, &sel, jobs, |c| {
                eprintln!("{}", conformance::cli::progress_line(c))
            })
            .await;
            suite.conclude(&report, out)
        }
        ConformanceRole::Client {
            listen,
            suite,
            key_file,
            case_timeout,
        } => {
            let cases = conformance::client::cases();
            if suite.list(out, cases.iter().map(|c| (c.id, c.level, c.title, c.slow))) {
                return Ok(());
            }
            let sel = suite.selection();
            let socket = resolve(&listen).await?;
            let listener = conformance::client::Listener::bind(socket, KeyPair::generate())
                .await
                .map_err(|source| CliError::Listen { socket, source })?;
            let count = cases.iter().filter(|c| sel.matches(c.id)).count();
            if let Some(path) = key_file {
                std::fs::write(&path, format!("{}\n", listener.key()))
                    .map_err(|source| CliError::WriteFile { path, source })?;
            }
            out.say(format!(
                "listening on {} with key {}",
                listener.local_addr(),
                listener.key()
            ));
            out.say(format!(
                "{count} cases: run the node scenario once per case, e.g. botd conformance scenario {} --server-key {} --repeat {count}",
                listener.local_addr(),
                listener.key()
            ));
            let report = listener
                .run(&sel, Duration::from_secs(case_timeout.max(1)), |c| {
                    eprintln!("{}", conformance::cli::progress_line(c))
                })
                .await;
            suite.conclude(&report, out)
        }
        ConformanceRole::Scenario { addr, repeat } => {
            let key = relay_key(ctx.server_key.as_deref())?;
            let socket = resolve(addr.as_deref().unwrap_or(&ctx.relay)).await?;
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
