//! Reports of a run: the terminal table, JSON, JUnit XML and one self-contained HTML page.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{rfc3339_ms, section_key, section_of, Report, Verdict};

/// The closing line a CI reads: `conformance: N passed, N failed`.
pub fn closing_line(r: &Report) -> String {
    format!(
        "conformance: {} passed, {} failed",
        r.count(Verdict::Pass),
        r.count(Verdict::Fail)
    )
}

/// One line per verdict count.
pub fn totals(r: &Report) -> String {
    Verdict::ALL
        .iter()
        .map(|v| format!("{} {}", r.count(*v), v.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The terminal table: id, verdict, detail.
pub fn table(r: &Report) -> String {
    let width = r
        .cases
        .iter()
        .map(|c| c.id.len())
        .max()
        .unwrap_or(10)
        .max(4);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:width$}  {:10}  {:>7}  detail",
        "case", "verdict", "ms"
    );
    for c in &r.cases {
        let detail = if c.outcome.detail.is_empty() {
            c.title.clone()
        } else {
            c.outcome.detail.clone()
        };
        let _ = writeln!(
            out,
            "{:width$}  {:10}  {:>7}  {}",
            c.id,
            c.outcome.verdict.as_str(),
            c.duration.as_millis(),
            detail.replace('\n', " ")
        );
    }
    out
}

/// A listing for `--list`.
pub fn listing(items: &[(String, &'static str, &'static str, bool)]) -> String {
    let width = items.iter().map(|i| i.0.len()).max().unwrap_or(4);
    let mut out = String::new();
    for (id, level, title, slow) in items {
        let _ = writeln!(
            out,
            "{id:width$}  {level:6}  {}{title}",
            if *slow { "[slow] " } else { "" }
        );
    }
    let _ = writeln!(out, "{} cases", items.len());
    out
}

fn summary_by_section(r: &Report) -> BTreeMap<Vec<u32>, (String, [usize; 5])> {
    let mut sections: BTreeMap<Vec<u32>, (String, [usize; 5])> = BTreeMap::new();
    for c in &r.cases {
        let s = section_of(&c.id).to_owned();
        let entry = sections
            .entry(section_key(&s))
            .or_insert_with(|| (s, [0; 5]));
        let i = Verdict::ALL
            .iter()
            .position(|v| *v == c.outcome.verdict)
            .unwrap_or(0);
        entry.1[i] += 1;
    }
    sections
}

/// The machine-readable report, pretty-printed (for a file).
pub fn json(r: &Report) -> String {
    serde_json::to_string_pretty(&json_value(r)).unwrap_or_default()
}

/// The machine-readable report on one line (for `--json` on standard output).
pub fn json_line(r: &Report) -> String {
    json_value(r).to_string()
}

/// The machine-readable report as a JSON value.
pub fn json_value(r: &Report) -> serde_json::Value {
    let cases: Vec<serde_json::Value> = r
        .cases
        .iter()
        .map(|c| {
            serde_json::json!({
                "id": c.id,
                "section": section_of(&c.id),
                "title": c.title,
                "level": c.level.as_str(),
                "verdict": c.outcome.verdict.as_str(),
                "detail": c.outcome.detail,
                "duration_ms": c.duration.as_millis() as u64,
                "exchange": c.log.iter().map(|l| serde_json::json!({
                    "at_ms": l.at_ms,
                    "dir": l.dir.as_str(),
                    "conn": l.conn,
                    "text": l.text,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut totals = serde_json::Map::new();
    for v in Verdict::ALL {
        totals.insert(v.as_str().to_owned(), r.count(v).into());
    }
    serde_json::json!({
        "suite": "botd/1 conformance",
        "role": r.role,
        "target": r.target,
        "started": rfc3339_ms(r.started_unix_ms),
        "duration_ms": r.duration.as_millis() as u64,
        "totals": totals,
        "ok": r.ok(),
        "cases": cases,
    })
}

fn xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// JUnit XML: one testsuite per section; FAIL is a failure, SKIP is skipped, the rest pass
/// (NON-STRICT and INFO carry their detail as system-out).
pub fn junit(r: &Report) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        "<testsuites name=\"botd/1 conformance ({})\" tests=\"{}\" failures=\"{}\" skipped=\"{}\" time=\"{:.3}\">",
        xml(&r.role),
        r.cases.len(),
        r.count(Verdict::Fail),
        r.count(Verdict::Skip),
        r.duration.as_secs_f64()
    );
    for (_, (section, counts)) in summary_by_section(r) {
        let cases: Vec<_> = r
            .cases
            .iter()
            .filter(|c| section_of(&c.id) == section)
            .collect();
        let _ = writeln!(
            out,
            "  <testsuite name=\"§{}\" tests=\"{}\" failures=\"{}\" skipped=\"{}\">",
            xml(&section),
            cases.len(),
            counts[2],
            counts[4]
        );
        for c in cases {
            let _ = write!(
                out,
                "    <testcase classname=\"botd.conformance.{}.{}\" name=\"{}\" time=\"{:.3}\">",
                xml(&r.role),
                xml(&section),
                xml(&c.id),
                c.duration.as_secs_f64()
            );
            match c.outcome.verdict {
                Verdict::Fail => {
                    let _ = write!(
                        out,
                        "<failure message=\"{}\" type=\"{}\">{}</failure>",
                        xml(&c.outcome.detail),
                        c.level.as_str(),
                        xml(&c.title)
                    );
                }
                Verdict::Skip => {
                    let _ = write!(out, "<skipped message=\"{}\"/>", xml(&c.outcome.detail));
                }
                v => {
                    let _ = write!(
                        out,
                        "<system-out>{}: {}</system-out>",
                        v.as_str(),
                        xml(&c.outcome.detail)
                    );
                }
            }
            out.push_str("</testcase>\n");
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}

fn verdict_class(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "pass",
        Verdict::NonStrict => "nonstrict",
        Verdict::Fail => "fail",
        Verdict::Info => "info",
        Verdict::Skip => "skip",
    }
}

/// One self-contained HTML page: a summary per section and each case's exchange.
pub fn html(r: &Report) -> String {
    let mut out = String::new();
    out.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>botd/1 conformance</title><style>\n");
    out.push_str(
        "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}\
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}th{background:#eee}\
.pass{background:#cfc}.fail{background:#f99}.nonstrict{background:#fd8}.info{background:#cdf}.skip{background:#ddd}\
pre{background:#f7f7f7;padding:6px;white-space:pre-wrap;font-size:12px}details{margin:4px 0}\
.sent{color:#05a}.received{color:#a50}.note{color:#777}code{font-size:90%}\n",
    );
    out.push_str("</style></head><body>\n");
    let _ = writeln!(
        out,
        "<h1>botd/1 conformance: {} role</h1><p>Target: <code>{}</code><br>Started {} · {:.1} s · {}</p>",
        xml(&r.role),
        xml(&r.target),
        rfc3339_ms(r.started_unix_ms),
        r.duration.as_secs_f64(),
        xml(&totals(r))
    );
    out.push_str("<h2>Summary per section</h2><table><tr><th>section</th>");
    for v in Verdict::ALL {
        let _ = write!(
            out,
            "<th class=\"{}\">{}</th>",
            verdict_class(v),
            v.as_str()
        );
    }
    out.push_str("</tr>\n");
    for (_, (section, counts)) in summary_by_section(r) {
        let _ = write!(
            out,
            "<tr><td><a href=\"#s-{0}\">§{0}</a></td>",
            xml(&section)
        );
        for n in counts {
            let _ = write!(out, "<td>{n}</td>");
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n<h2>Cases</h2>\n");
    let mut current = String::new();
    for c in &r.cases {
        let section = section_of(&c.id);
        if section != current {
            current = section.to_owned();
            let _ = writeln!(out, "<h3 id=\"s-{0}\">§{0}</h3>", xml(section));
        }
        let _ = writeln!(
            out,
            "<details id=\"{}\"><summary><span class=\"{}\">&nbsp;{}&nbsp;</span> <code>{}</code> [{}] {} — {}</summary>",
            xml(&c.id),
            verdict_class(c.outcome.verdict),
            c.outcome.verdict.as_str(),
            xml(&c.id),
            c.level.as_str(),
            xml(&c.title),
            xml(&c.outcome.detail)
        );
        out.push_str("<pre>");
        for l in &c.log {
            let arrow = match l.dir {
                super::Dir::Out => "→",
                super::Dir::In => "←",
                super::Dir::Note => "·",
            };
            let _ = writeln!(
                out,
                "<span class=\"{}\">{:>7} ms {} {:8} {}</span>",
                l.dir.as_str(),
                l.at_ms,
                if l.conn.is_empty() { "  " } else { &l.conn },
                arrow,
                xml(&l.text)
            );
        }
        out.push_str("</pre></details>\n");
    }
    out.push_str("</body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{CaseReport, Dir, Level, LogLine, Outcome};
    use std::time::Duration;

    fn report() -> Report {
        let case = |id: &str, v: Verdict| CaseReport {
            id: id.into(),
            title: "a <title> & more".into(),
            level: Level::Must,
            outcome: Outcome::new(v, "why \"so\""),
            duration: Duration::from_millis(3),
            log: vec![LogLine {
                at_ms: 1,
                dir: Dir::Out,
                conn: "A".into(),
                text: "Frame <x>".into(),
            }],
        };
        Report {
            role: "relay".into(),
            target: "127.0.0.1:1".into(),
            started_unix_ms: 0,
            duration: Duration::from_secs(1),
            cases: vec![
                case("4.2/a", Verdict::Pass),
                case("8.3/b", Verdict::Fail),
                case("8.3/c", Verdict::Skip),
                case("10/d", Verdict::NonStrict),
            ],
        }
    }

    #[test]
    fn formats_escape_and_count() {
        let r = report();
        assert_eq!(closing_line(&r), "conformance: 1 passed, 1 failed");
        let j: serde_json::Value = serde_json::from_str(&json(&r)).unwrap();
        assert_eq!(j["totals"]["FAIL"], 1);
        assert_eq!(j["cases"][1]["section"], "8.3");
        let x = junit(&r);
        assert!(x.contains("failures=\"1\""));
        assert!(x.contains("&lt;title&gt; &amp; more"));
        assert!(x.contains("<skipped"));
        let h = html(&r);
        assert!(h.contains("Frame &lt;x&gt;"));
        assert!(h.contains("id=\"s-8.3\""));
        assert!(table(&r).contains("NON-STRICT"));
    }
}
