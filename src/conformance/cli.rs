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
}

/// A progress line for a finished case (to stderr, as cases finish).
pub fn progress_line(c: &CaseReport) -> String {
    format!("{:10} {}", c.outcome.verdict.as_str(), c.id)
}

/// Writes the report files and prints the table and closing line; returns whether the run
/// passed (no FAIL).
pub fn finish(report: &Report, outputs: &Outputs) -> Result<bool, String> {
    let write = |path: &Option<PathBuf>, text: String| -> Result<(), String> {
        if let Some(path) = path {
            std::fs::write(path, text)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        Ok(())
    };
    write(&outputs.json, report::json(report))?;
    write(&outputs.junit, report::junit(report))?;
    write(&outputs.html, report::html(report))?;
    if outputs.quiet {
        for c in report
            .cases
            .iter()
            .filter(|c| c.outcome.verdict == Verdict::Fail)
        {
            println!("FAIL {}: {}", c.id, c.outcome.detail);
        }
    } else {
        print!("{}", report::table(report));
    }
    println!("{}", report::totals(report));
    println!("{}", report::closing_line(report));
    Ok(report.ok())
}
