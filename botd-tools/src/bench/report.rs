//! `botd bench report`: reads the JSON lines of a comparison (one [`RunResult`] per run),
//! groups them by scenario and target, and writes medians, min–max, per-round ratios against
//! JetStream and NATS core (Markdown) and a chart of msgs/s and p99 per target (SVG).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;

use super::stats::{human, human_bytes, paired_ratios, Spread};
use super::RunResult;

#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// JSON lines written by `botd bench … --json` (one run per line)
    pub input: PathBuf,
    /// Markdown report to write (default: stdout)
    #[arg(long)]
    pub md: Option<PathBuf>,
    /// SVG chart of msgs/s and p99 per target to write
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Title of the report
    #[arg(long, default_value = "botd-relay vs NATS core vs JetStream")]
    pub title: String,
    /// KEY=VALUE lines for the report's header (machine, versions, durations, …)
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    pub meta: Vec<String>,
}

/// The runs of one target in one scenario, by round.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub target: String,
    pub runs: Vec<RunResult>,
}

impl Series {
    fn values(&self, f: impl Fn(&RunResult) -> Option<f64>) -> Vec<(u32, f64)> {
        self.runs
            .iter()
            .enumerate()
            .filter_map(|(i, r)| Some((r.round.unwrap_or(i as u32 + 1), f(r)?)))
            .collect()
    }

    pub fn rate(&self) -> Vec<(u32, f64)> {
        self.values(|r| Some(r.ops_per_s))
    }

    pub fn p99(&self) -> Vec<(u32, f64)> {
        self.values(|r| r.latency_us.map(|l| l.p99))
    }

    fn spread(values: &[(u32, f64)]) -> Option<Spread> {
        Spread::of(&values.iter().map(|(_, v)| *v).collect::<Vec<_>>())
    }

    pub fn clean(&self) -> bool {
        self.runs.iter().all(RunResult::clean)
    }
}

/// All series of one scenario (same shape), in the order targets first appear.
#[derive(Debug, Clone)]
pub struct Group {
    pub title: String,
    pub scenario: String,
    pub series: Vec<Series>,
}

impl Group {
    fn reference(&self, target: &str) -> Option<&Series> {
        self.series.iter().find(|s| s.target == target)
    }
}

/// The name of a run's scenario shape, e.g. "relay 16→16, 100 B, window 128".
pub fn group_title(run: &RunResult) -> String {
    let p = &run.params;
    let mut parts = Vec::new();
    if let (Some(s), Some(r)) = (p.senders, p.receivers) {
        if run.scenario != "bulk" {
            parts.push(format!("{s}→{r}"));
        }
    }
    if let Some(payload) = p.payload {
        parts.push(human_bytes(payload as f64));
    }
    if let Some(window) = p.window {
        parts.push(format!("window {window}"));
    }
    match (&p.rate_label, p.rate) {
        (Some(label), Some(_)) => parts.push(format!("paced at {label}")),
        (None, Some(rate)) => parts.push(format!("open loop {}/s", human(rate))),
        _ => {}
    }
    if let Some(c) = p.connectors {
        parts.push(format!("{c} connectors"));
    }
    if let Some(k) = p.sessions {
        parts.push(format!("{k} sessions"));
    }
    if p.sign {
        parts.push("signed".into());
    }
    if p.ack_each {
        parts.push("ack each".into());
    }
    format!("{} {}", run.scenario, parts.join(", "))
}

/// Groups runs by scenario shape, then by target label, keeping first-appearance order.
pub fn group(runs: &[RunResult]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for run in runs {
        let title = group_title(run);
        let index = match groups.iter().position(|g| g.title == title) {
            Some(index) => index,
            None => {
                groups.push(Group {
                    title,
                    scenario: run.scenario.clone(),
                    series: Vec::new(),
                });
                groups.len() - 1
            }
        };
        let group = &mut groups[index];
        let label = if run.label.is_empty() {
            run.target.clone()
        } else {
            run.label.clone()
        };
        match group.series.iter_mut().find(|s| s.label == label) {
            Some(series) => series.runs.push(run.clone()),
            None => group.series.push(Series {
                label,
                target: run.target.clone(),
                runs: vec![run.clone()],
            }),
        }
    }
    groups
}

fn fmt_spread(spread: Option<Spread>, fmt: impl Fn(f64) -> String) -> String {
    match spread {
        Some(s) if s.n > 1 => format!("{} ({}–{})", fmt(s.median), fmt(s.min), fmt(s.max)),
        Some(s) => fmt(s.median),
        None => "–".into(),
    }
}

fn fmt_ratio(values: &[f64]) -> String {
    fmt_spread(Spread::of(values), |v| format!("{v:.2}×"))
}

/// msgs/s, latency and server figures of the `relay` scenario, with per-round ratios; an
/// open-loop group also has its server CPU per message against the closed loop of the same
/// shape, target and round (`closed`).
fn relay_table(out: &mut String, group: &Group, closed: Option<&Group>) {
    let js = group.reference("jetstream");
    let nats = group.reference("nats");
    let _ = writeln!(
        out,
        "| target | msgs/s | p50 µs | p99 µs | p99.9 µs | server cores | server CPU µs/msg | RSS per busy session | × JetStream (msgs/s) | × NATS core (msgs/s) | × JetStream (p99) | CPU/msg × NATS core | CPU/msg × closed loop | clean |"
    );
    let _ = writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for series in &group.series {
        let vs = |reference: Option<&Series>, f: Metric| match reference {
            Some(reference) if reference.label != series.label => {
                fmt_ratio(&paired_ratios(&f(series), &f(reference)))
            }
            Some(_) => "1×".into(),
            None => "–".into(),
        };
        let vs_closed = closed
            .and_then(|closed| closed.series.iter().find(|s| s.label == series.label))
            .map_or("–".into(), |closed| {
                fmt_ratio(&paired_ratios(&cpu_values(series), &cpu_values(closed)))
            });
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            series.label,
            fmt_spread(Series::spread(&series.rate()), human),
            fmt_spread(p50(series), |v| format!("{v:.0}")),
            fmt_spread(Series::spread(&series.p99()), |v| format!("{v:.0}")),
            fmt_spread(
                Series::spread(&series.values(|r| r.latency_us.map(|l| l.p999))),
                |v| format!("{v:.0}")
            ),
            fmt_spread(
                Series::spread(&series.values(|r| r.server.map(|s| s.cpu_cores))),
                |v| format!("{v:.2}")
            ),
            fmt_spread(cpu(series), |v| format!("{v:.2}")),
            fmt_spread(
                Series::spread(&series.values(|r| r.busy.map(|b| b.bytes_per_session))),
                human_bytes
            ),
            vs(js, Series::rate),
            vs(nats, Series::rate),
            vs(js, Series::p99),
            vs(nats, cpu_values),
            vs_closed,
            if series.clean() { "yes" } else { "**NO**" },
        );
    }
}

/// The closed-loop group of the same shape as the open-loop `group` (same sessions, payload,
/// window and acks), if the runs have one.
fn closed_loop_of<'a>(group: &Group, groups: &'a [Group]) -> Option<&'a Group> {
    let shape = |r: &RunResult| {
        let p = &r.params;
        (
            p.senders,
            p.receivers,
            p.payload,
            p.window,
            p.ack_each,
            p.sign,
        )
    };
    let open = group.series.first()?.runs.first()?;
    open.params.rate?;
    groups.iter().find(|g| {
        g.scenario == "relay"
            && g.series
                .first()
                .and_then(|s| s.runs.first())
                .is_some_and(|r| r.params.rate.is_none() && shape(r) == shape(open))
    })
}

fn p50(series: &Series) -> Option<Spread> {
    Series::spread(&series.values(|r| r.latency_us.map(|l| l.p50)))
}

fn cpu_values(series: &Series) -> Vec<(u32, f64)> {
    series.values(|r| r.server.map(|s| s.cpu_us_per_op))
}

fn cpu(series: &Series) -> Option<Spread> {
    Series::spread(&cpu_values(series))
}

fn rss(series: &Series) -> Option<Spread> {
    Series::spread(&series.values(|r| r.server.map(|s| s.rss_end_bytes as f64)))
}

/// `handshake`, `bulk` and `idle`: each with the bound it is compared with.
fn session_table(out: &mut String, group: &Group) {
    let (rate_name, bound_name): (&str, &str) = match group.scenario.as_str() {
        "handshake" => (
            "handshakes/s",
            "× crypto bound (responder secp256k1 + HKDF, one core)",
        ),
        "bulk" => (
            "payload bytes/s",
            "× raw AES-256-CTR + HMAC-SHA256 seal+open",
        ),
        "flood" => ("good handshakes/s", "bad Inits/s (from addresses, burst)"),
        _ => ("sessions/s (connect)", "server RSS per session"),
    };
    let _ = writeln!(
        out,
        "| target | {rate_name} | p50 µs | p99 µs | server CPU µs/op | server RSS at end | {bound_name} | clean |"
    );
    let _ = writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for series in &group.series {
        let rate = if group.scenario == "bulk" {
            fmt_spread(
                Series::spread(&series.values(|r| Some(r.bytes_per_s))),
                |v| format!("{}/s", human_bytes(v)),
            )
        } else {
            fmt_spread(Series::spread(&series.rate()), human)
        };
        let bound = if group.scenario == "flood" {
            fmt_spread(
                Series::spread(&series.values(|r| r.flood.map(|f| f.attempts_per_s))),
                human,
            ) + &series
                .runs
                .first()
                .and_then(|r| r.flood)
                .map_or(String::new(), |f| {
                    format!(" ({}, {})", f.addresses, f.burst)
                })
        } else if group.scenario == "idle" {
            fmt_spread(
                Series::spread(&series.values(|r| r.idle.map(|i| i.bytes_per_session))),
                human_bytes,
            )
        } else {
            fmt_spread(Series::spread(&series.values(|r| r.bound_ratio)), |v| {
                format!("{v:.3}")
            })
        };
        let _ = writeln!(
            out,
            "| {} | {rate} | {} | {} | {} | {} | {bound} | {} |",
            series.label,
            fmt_spread(p50(series), |v| format!("{v:.0}")),
            fmt_spread(Series::spread(&series.p99()), |v| format!("{v:.0}")),
            if group.scenario == "idle" {
                "–".to_owned()
            } else {
                fmt_spread(cpu(series), |v| format!("{v:.2}"))
            },
            fmt_spread(rss(series), human_bytes),
            if series.clean() { "yes" } else { "**NO**" },
        );
    }
}

/// The Markdown report.
pub fn markdown(title: &str, meta: &[(String, String)], runs: &[RunResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# {title}\n");
    if !meta.is_empty() {
        let _ = writeln!(out, "| | |\n| --- | --- |");
        for (key, value) in meta {
            let _ = writeln!(out, "| {key} | {value} |");
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "Figures are medians over rounds, with the range (min–max) in parentheses. Ratios are \
         taken per round (each round runs every target once, one after the other) against the \
         JetStream and NATS core runs of the same round, then summarised the same way. Server \
         CPU is the server process's user + system time over the measured interval divided by \
         the messages delivered in it. Latency is from the (intended) send time to the \
         receiver's read of the delivery.\n"
    );
    let groups = group(runs);
    for group in &groups {
        let _ = writeln!(out, "## {}\n", group.title);
        if group.scenario == "relay" {
            relay_table(&mut out, group, closed_loop_of(group, &groups));
        } else {
            session_table(&mut out, group);
        }
        out.push('\n');
    }
    let problems: Vec<String> = runs
        .iter()
        .filter(|r| !r.clean() || !r.warnings.is_empty())
        .map(|r| {
            let mut lines = r.problems();
            lines.extend(r.warnings.iter().map(|w| format!("warning: {w}")));
            format!(
                "* {} / {} / round {}: {}",
                group_title(r),
                if r.label.is_empty() {
                    &r.target
                } else {
                    &r.label
                },
                r.round.map_or("–".to_owned(), |n| n.to_string()),
                lines.join("; ")
            )
        })
        .collect();
    let _ = writeln!(out, "## Runs that were not clean, and warnings\n");
    if problems.is_empty() {
        let _ = writeln!(
            out,
            "None: every run delivered every accepted message exactly once, with no refused \
             request and no closed connection.\n"
        );
    } else {
        for line in problems {
            let _ = writeln!(out, "{line}");
        }
        out.push('\n');
    }
    out.push_str(PROMISES);
    out
}

/// What each peer promises when it answers; printed with every report.
const PROMISES: &str = "## What each peer promises

| peer | a publish / send is answered when | after a crash of the machine |
| --- | --- | --- |
| botd `fsync = always` | the message is in the journal and fsynced (group commit); a delivery is pushed only once durable | nothing answered is lost |
| botd `fsync = interval` | the message is in the journal (written, fsync every 10 ms) | up to the last interval of answered messages can be lost; a process crash loses nothing |
| botd `fsync = never` | the message is in the journal (the kernel writes back when it likes) | anything not yet written back (typically up to ~30 s) |
| JetStream 2.9, file storage | the message is written to the stream's file store; **no fsync per message** (the server syncs every 2 minutes by default, `sync_interval`) | up to the last sync interval; comparable to botd `interval`, with `always` shown beside it |
| NATS core | the message was handed to the server's socket buffer; nothing is stored | everything in flight; a subscriber that is not connected never sees the message |

botd and JetStream both keep a message until the receiver acknowledges it (JetStream here: a
work-queue stream, so an acked message is removed, as in a relay mailbox) and redeliver what
was not acknowledged; NATS core delivers at most once.
";

/// One figure per round of a series.
type Metric = fn(&Series) -> Vec<(u32, f64)>;

/// A bar chart of msgs/s (median, min–max whiskers) and p99 latency per target and scenario.
pub fn chart(path: &std::path::Path, title: &str, runs: &[RunResult]) -> Result<(), String> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};

    let groups: Vec<Group> = group(runs)
        .into_iter()
        .filter(|g| g.scenario == "relay")
        .collect();
    if groups.is_empty() {
        return Err("no relay-scenario runs to chart".into());
    }
    let mut labels: Vec<String> = Vec::new();
    for group in &groups {
        for series in &group.series {
            if !labels.contains(&series.label) {
                labels.push(series.label.clone());
            }
        }
    }
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    let width = (260 * groups.len() as u32).max(900);
    let root = SVGBackend::new(path, (width, 1000)).into_drawing_area();
    let draw_err = |err: &dyn std::fmt::Display| format!("chart {}: {err}", path.display());
    root.fill(&WHITE).map_err(|e| draw_err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 24))
        .map_err(|e| draw_err(&e))?;
    let panels = root.split_evenly((2, 1));
    let metrics: [(&str, Metric); 2] = [
        ("delivered msgs/s (median, bars: min–max)", Series::rate),
        ("p99 latency µs (median, bars: min–max)", Series::p99),
    ];
    for (panel, (caption, metric)) in panels.iter().zip(metrics) {
        let mut y_max: f64 = 0.0;
        for group in &groups {
            for series in &group.series {
                if let Some(s) = Series::spread(&metric(series)) {
                    y_max = y_max.max(s.max);
                }
            }
        }
        let y_max = if y_max > 0.0 { y_max * 1.15 } else { 1.0 };
        let n = groups.len() as f64;
        let mut chart = ChartBuilder::on(panel)
            .caption(caption, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..n, 0f64..y_max)
            .map_err(|e| draw_err(&e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_x_axis()
            .y_label_formatter(&|v| human(*v))
            .draw()
            .map_err(|e| draw_err(&e))?;
        let bar = 0.8 / labels.len() as f64;
        let value_style = ("sans-serif", 11)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Bottom));
        for (k, label) in labels.iter().enumerate() {
            let color = palette[k % palette.len()];
            let mut bars = Vec::new();
            let mut whiskers = Vec::new();
            let mut values = Vec::new();
            for (g, group) in groups.iter().enumerate() {
                let Some(series) = group.series.iter().find(|s| &s.label == label) else {
                    continue;
                };
                let Some(s) = Series::spread(&metric(series)) else {
                    continue;
                };
                let x0 = g as f64 + 0.1 + k as f64 * bar;
                bars.push(Rectangle::new(
                    [(x0, 0.0), (x0 + bar * 0.9, s.median)],
                    color.filled(),
                ));
                let mid = x0 + bar * 0.45;
                values.push(
                    EmptyElement::at((mid, s.max.max(s.median)))
                        + Text::new(human(s.median), (0, -14), value_style.clone()),
                );
                whiskers.push(PathElement::new(
                    vec![(mid, s.min), (mid, s.max)],
                    BLACK.stroke_width(2),
                ));
            }
            chart
                .draw_series(bars)
                .map_err(|e| draw_err(&e))?
                .label(label.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
            chart.draw_series(whiskers).map_err(|e| draw_err(&e))?;
            chart.draw_series(values).map_err(|e| draw_err(&e))?;
        }
        let style = ("sans-serif", 14)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Top));
        chart
            .draw_series(groups.iter().enumerate().map(|(g, group)| {
                let name = group.title.trim_start_matches("relay ").to_owned();
                EmptyElement::at((g as f64 + 0.5, 0.0)) + Text::new(name, (0, 8), style.clone())
            }))
            .map_err(|e| draw_err(&e))?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| draw_err(&e))?;
    }
    root.present().map_err(|e| draw_err(&e))?;
    Ok(())
}

/// Reads JSON lines of results; blank lines are skipped, a bad line is an error.
pub fn read_results(text: &str) -> Result<Vec<RunResult>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| serde_json::from_str(line).map_err(|err| format!("line {}: {err}", i + 1)))
        .collect()
}

pub fn parse_meta(meta: &[String]) -> Result<Vec<(String, String)>, String> {
    meta.iter()
        .map(|item| {
            item.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .ok_or_else(|| format!("--meta {item:?}: expected KEY=VALUE"))
        })
        .collect()
}

pub fn run(args: &ReportArgs) -> Result<(), String> {
    let text = std::fs::read_to_string(&args.input)
        .map_err(|err| format!("{}: {err}", args.input.display()))?;
    let runs = read_results(&text).map_err(|err| format!("{}: {err}", args.input.display()))?;
    if runs.is_empty() {
        return Err(format!("{}: no results", args.input.display()));
    }
    let meta = parse_meta(&args.meta)?;
    let report = markdown(&args.title, &meta, &runs);
    match &args.md {
        Some(path) => {
            std::fs::write(path, &report).map_err(|err| format!("{}: {err}", path.display()))?
        }
        None => print!("{report}"),
    }
    if let Some(path) = &args.svg {
        // The chart is of `relay` runs; a report of session scenarios alone has its tables.
        if runs.iter().any(|run| run.scenario == "relay") {
            chart(path, &args.title, &runs)?;
        } else {
            eprintln!(
                "botd bench report: no relay-scenario runs, so no chart at {}",
                path.display()
            );
        }
    }
    let mut by_label: BTreeMap<&str, usize> = BTreeMap::new();
    for run in &runs {
        *by_label.entry(run.label.as_str()).or_insert(0) += 1;
    }
    eprintln!(
        "botd bench report: {} runs ({})",
        runs.len(),
        by_label
            .iter()
            .map(|(label, n)| format!("{label}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::stats::Percentiles;
    use crate::bench::Params;

    fn run(label: &str, target: &str, round: u32, rate: f64, p99: f64) -> RunResult {
        RunResult {
            scenario: "relay".into(),
            target: target.into(),
            label: label.into(),
            round: Some(round),
            params: Params {
                senders: Some(16),
                receivers: Some(16),
                payload: Some(100),
                window: Some(128),
                ..Params::default()
            },
            ops_per_s: rate,
            latency_us: Some(Percentiles {
                samples: 10,
                mean: p99 / 2.0,
                p50: p99 / 3.0,
                p90: p99 / 1.5,
                p99,
                p999: p99 * 2.0,
                max: p99 * 3.0,
                clamped: 0,
            }),
            ..RunResult::default()
        }
    }

    fn sample() -> Vec<RunResult> {
        let mut runs = Vec::new();
        for round in 1..=3 {
            let r = round as f64;
            runs.push(run("botd interval", "botd", round, 100_000.0 * r, 900.0));
            runs.push(run("NATS core", "nats", round, 400_000.0, 300.0));
            runs.push(run("JetStream", "jetstream", round, 50_000.0, 3000.0 / r));
        }
        let mut other = run("botd interval", "botd", 1, 80_000.0, 1000.0);
        other.params.senders = Some(1);
        other.params.receivers = Some(1);
        runs.push(other);
        runs
    }

    #[test]
    fn groups_by_shape_then_label() {
        let groups = group(&sample());
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].title, "relay 16→16, 100 B, window 128");
        assert_eq!(groups[1].title, "relay 1→1, 100 B, window 128");
        let labels: Vec<&str> = groups[0].series.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, ["botd interval", "NATS core", "JetStream"]);
        assert_eq!(groups[0].series[0].runs.len(), 3);
    }

    #[test]
    fn report_has_medians_ranges_and_per_round_ratios() {
        let text = markdown("t", &[("machine".into(), "2 cores".into())], &sample());
        // botd: 100k, 200k, 300k → median 200k; vs JetStream per round 2×, 4×, 6×.
        assert!(
            text.contains("| botd interval | 200.0k (100.0k–300.0k) |"),
            "{text}"
        );
        assert!(text.contains("4.00× (2.00×–6.00×)"), "{text}");
        // vs NATS core: 0.25×, 0.5×, 0.75×.
        assert!(text.contains("0.50× (0.25×–0.75×)"), "{text}");
        // p99 vs JetStream: 900 / (3000 / r) = 0.3, 0.6, 0.9.
        assert!(text.contains("0.60× (0.30×–0.90×)"), "{text}");
        assert!(text.contains("| machine | 2 cores |"));
        assert!(text.contains("What each peer promises"));
        assert!(text.contains("None: every run delivered"));
    }

    #[test]
    fn paced_runs_group_by_their_rate_label_and_compare_cpu_with_the_closed_loop() {
        let with_cpu = |mut r: RunResult, cpu: f64| {
            r.server = Some(crate::bench::procfs::Usage {
                cpu_cores: 0.5,
                cpu_us_per_op: cpu,
                rss_start_bytes: 0,
                rss_end_bytes: 0,
            });
            r
        };
        let mut runs = Vec::new();
        for round in 1..=2 {
            runs.push(with_cpu(
                run("botd interval", "botd", round, 200_000.0, 900.0),
                4.0,
            ));
            runs.push(with_cpu(
                run("NATS core", "nats", round, 400_000.0, 300.0),
                1.0,
            ));
            // Paced at half of each round's maximum: the rates differ, the group does not.
            for (label, target, cpu) in [("botd interval", "botd", 5.0), ("NATS core", "nats", 2.0)]
            {
                let mut paced = with_cpu(
                    run(label, target, round, 100_000.0 + round as f64, 500.0),
                    cpu,
                );
                paced.params.rate = Some(100_000.0 + round as f64);
                paced.params.rate_label = Some("half the relay's maximum".into());
                runs.push(paced);
            }
        }
        let groups = group(&runs);
        assert_eq!(
            groups.len(),
            2,
            "{:?}",
            groups.iter().map(|g| &g.title).collect::<Vec<_>>()
        );
        assert_eq!(
            groups[1].title,
            "relay 16→16, 100 B, window 128, paced at half the relay's maximum"
        );
        let text = markdown("t", &[], &runs);
        // botd paced 5 µs against its closed loop's 4 µs; against NATS core's 2 µs.
        assert!(
            text.contains("| 2.50× (2.50×–2.50×) | 1.25× (1.25×–1.25×) | yes |"),
            "{text}"
        );
    }

    #[test]
    fn unclean_runs_are_listed() {
        let mut runs = sample();
        runs[0].lost = 3;
        runs[0].sent = 10;
        let text = markdown("t", &[], &runs);
        assert!(text.contains("**NO**"), "{text}");
        assert!(text.contains("LOST 3 of 10"), "{text}");
    }

    #[test]
    fn json_lines_round_trip_and_meta() {
        let runs = sample();
        let text: String = runs
            .iter()
            .map(|r| serde_json::to_string(r).unwrap() + "\n\n")
            .collect();
        assert_eq!(read_results(&text).unwrap(), runs);
        assert!(read_results("{not json}\n")
            .unwrap_err()
            .starts_with("line 1"));
        assert_eq!(
            parse_meta(&["a = b=c".into()]).unwrap(),
            vec![("a".to_owned(), "b=c".to_owned())]
        );
        assert!(parse_meta(&["nope".into()]).is_err());
    }

    #[test]
    fn chart_is_written_as_svg() {
        let path = std::env::temp_dir().join(format!("botd-chart-{}.svg", std::process::id()));
        chart(&path, "test chart", &sample()).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(svg.starts_with("<svg"), "{}", &svg[..60.min(svg.len())]);
        assert!(svg.contains("JetStream"));
        assert!(svg.contains("16→16"));
    }
}
