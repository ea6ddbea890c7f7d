//! Where results go: lines for people, or with `--json` one JSON object per line on standard
//! output (remarks for people then go to standard error).

use serde_json::Value;

use super::error::EXIT_OK;

/// Text for people, or one JSON object per line.
#[derive(Clone, Copy)]
pub struct Out {
    pub json: bool,
}

impl Out {
    /// Prints one result, a line at a time (so that `listen` can be piped). When the reader has
    /// gone away (e.g. `| head -1`), `botd` stops at once, before acting on what it could not
    /// show: `listen` does not acknowledge a message it could not print.
    pub fn emit(&self, text: impl std::fmt::Display, value: Value) {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        let written = if self.json {
            writeln!(stdout, "{value}")
        } else {
            writeln!(stdout, "{text}")
        };
        if written.and_then(|()| stdout.flush()).is_err() {
            std::process::exit(EXIT_OK.into());
        }
    }

    /// A line for people: standard output, or standard error when standard output carries JSON.
    pub fn say(&self, text: impl std::fmt::Display) {
        if self.json {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }
}

/// RFC 3339 (UTC, milliseconds) of a Unix time in milliseconds.
pub fn time(unix_ms: u64) -> String {
    botd_tools::conformance::rfc3339_ms(unix_ms)
}
