//! What `botd conformance …` does with a report: the terminal table, the report files and the
//! exit status (0 only when nothing failed).

use std::path::PathBuf;

use super::{report, CaseReport, Report, Verdict};

/// Where the reports go.
#[derive(Debug, Clone, Default)]
pub struct Outputs {
    pub json: Option<PathBuf>,
    pub junit: Option<PathBuf>,
    pub html: Option<PathBuf>,
    /// Print only the closing line and failures (no table).
    pub quiet: bool,
    /// Print the JSON report on standard output; the lines for people go to standard error.
    pub json_to_stdout: bool,
}

/// A progress line for a finished case (to stderr, as cases finish).
pub fn progress_line(c: &CaseReport) -> String {
    format!("{:10} {}", c.outcome.verdict.as_str(), c.id)
}

/// A report file that could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}: {source}", path.display())]
pub struct WriteError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Writes the report files and prints the table and closing line; returns whether the run
/// passed (no FAIL).
pub fn finish(report: &Report, outputs: &Outputs) -> Result<bool, WriteError> {
    let write = |path: &Option<PathBuf>, text: String| -> Result<(), WriteError> {
        if let Some(path) = path {
            std::fs::write(path, text).map_err(|source| WriteError {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    };
    write(&outputs.json, report::json(report))?;
    write(&outputs.junit, report::junit(report))?;
    write(&outputs.html, report::html(report))?;
    let mut text = String::new();
    if outputs.quiet || outputs.json_to_stdout {
        for c in report
            .cases
            .iter()
            .filter(|c| c.outcome.verdict == Verdict::Fail)
        {
            text.push_str(&format!("FAIL {}: {}\n", c.id, c.outcome.detail));
        }
    } else {
        text.push_str(&report::table(report));
    }
    text.push_str(&format!("{}\n", report::totals(report)));
    text.push_str(&format!("{}\n", report::closing_line(report)));
    if outputs.json_to_stdout {
        println!("{}", report::json_line(report));
        eprint!("{text}");
    } else {
        print!("{text}");
    }
    Ok(report.ok())
}
