//! The `botd` command-line client: key management, every relay request, the conformance suite
//! and the load generator. The commands are in [`cli`]; this parses the command line, runs the
//! command, prints its error and exits with the code the error gives ([`cli::error`]).

mod cli;

use std::process::ExitCode;

use clap::Parser;
use serde_json::json;

use cli::error::{EXIT_OK, EXIT_USAGE};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // `--help` and `--version` print to standard output and succeed.
            let _ = err.print();
            return ExitCode::from(if err.use_stderr() {
                EXIT_USAGE
            } else {
                EXIT_OK
            });
        }
    };
    let json = cli.json;
    match cli::run(cli).await {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(err) => {
            eprintln!("botd: {err}");
            if json {
                println!("{}", json!({ "error": err.to_string() }));
            }
            ExitCode::from(err.exit_code())
        }
    }
}
