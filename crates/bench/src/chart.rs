//! `ordo-bench chart`: turns the `--json` outputs of benchmark runs into one SVG, a panel of
//! horizontal bars per scenario (one bar per system, the median of its runs), so
//! `docs/benchmarks.md` can show what the tables say.

use clap::Args;
use serde::Deserialize;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct ChartArgs {
    /// `ordo-bench ... --json` outputs, one scenario per file, drawn in this order.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Where to write the SVG.
    #[arg(long, default_value = "benchmarks.svg")]
    output: PathBuf,
}

#[derive(Deserialize)]
struct Doc {
    scenario: String,
    #[serde(default)]
    params: serde_json::Value,
    medians: Vec<Row>,
}

#[derive(Deserialize)]
struct Row {
    system: String,
    delivered_per_sec: f64,
    delivery_ms: Option<Pct>,
    #[serde(default)]
    extra: std::collections::BTreeMap<String, f64>,
}

#[derive(Deserialize)]
struct Pct {
    p99: f64,
}

/// One bar chart: a title, a unit, bars (name, value, a note such as how many were lost).
pub struct Panel {
    pub title: String,
    pub unit: String,
    pub lower_is_better: bool,
    pub bars: Vec<(String, f64, String)>,
}

fn panel(doc: &Doc) -> Panel {
    let lost_note = |r: &Row| match r.extra.get("lost") {
        Some(&l) if l > 0.0 => format!("  (lost {l:.0})"),
        _ => String::new(),
    };
    let pick = |f: &dyn Fn(&Row) -> Option<f64>| -> Vec<(String, f64, String)> {
        doc.medians
            .iter()
            .filter_map(|r| f(r).map(|v| (r.system.clone(), v, lost_note(r))))
            .collect()
    };
    let param = |k: &str| doc.params.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
    let (title, unit, lower, bars) = match doc.scenario.as_str() {
        "pairs" => (
            format!(
                "pairs ({} x {}, window {}): delivered messages per second",
                param("pairs"),
                param("messages"),
                param("window")
            ),
            "msgs/s",
            false,
            pick(&|r| Some(r.delivered_per_sec)),
        ),
        "pairs-fixed-rate" => {
            let mut bars = pick(&|r| r.delivery_ms.as_ref().map(|d| d.p99));
            if let Some(d) = doc
                .medians
                .iter()
                .find_map(|r| r.extra.get("disk_fdatasync_p99_ms"))
            {
                bars.push(("disk fdatasync".into(), *d, String::new()));
            }
            (
                format!("fixed {} msgs/s: p99 delivery latency", param("rate")),
                "ms",
                true,
                bars,
            )
        }
        "fanout" => (
            format!(
                "fanout to {} members: time until every member has a message (max)",
                param("members")
            ),
            "ms",
            true,
            pick(&|r| r.extra.get("fanout_ms_max").copied()),
        ),
        "catchup" => (
            format!(
                "catchup of {} messages: time to receive them",
                param("messages")
            ),
            "ms",
            true,
            pick(&|r| r.extra.get("catchup_ms").copied()),
        ),
        "connections" => (
            "connections: server memory per idle connection".to_string(),
            "bytes",
            true,
            pick(&|r| r.extra.get("server_bytes_per_connection").copied()),
        ),
        other => (
            other.to_string(),
            "",
            false,
            pick(&|r| Some(r.delivered_per_sec)),
        ),
    };
    Panel {
        title,
        unit: unit.to_string(),
        lower_is_better: lower,
        bars,
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Draws the panels one under another.
pub fn svg(panels: &[Panel]) -> String {
    const W: f64 = 720.0;
    const LABEL: f64 = 130.0;
    const BAR_H: f64 = 22.0;
    const GAP: f64 = 6.0;
    const HEAD: f64 = 34.0;
    let heights: Vec<f64> = panels
        .iter()
        .map(|p| HEAD + p.bars.len() as f64 * (BAR_H + GAP) + 18.0)
        .collect();
    let total: f64 = heights.iter().sum::<f64>() + 10.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{total}" viewBox="0 0 {W} {total}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let mut y = 10.0;
    for (p, h) in panels.iter().zip(&heights) {
        let better = if p.lower_is_better {
            "lower is better"
        } else {
            "higher is better"
        };
        let _ = writeln!(
            s,
            r#"<text x="10" y="{:.1}" font-weight="bold">{} ({}, {better})</text>"#,
            y + 18.0,
            escape(&p.title),
            escape(&p.unit)
        );
        let max = p.bars.iter().map(|b| b.1).fold(0.0f64, f64::max).max(1e-9);
        let span = W - LABEL - 190.0;
        for (i, (name, v, note)) in p.bars.iter().enumerate() {
            let top = y + HEAD + i as f64 * (BAR_H + GAP);
            let len = (v / max * span).max(1.0);
            let color = match name.as_str() {
                "ordo" => "#2b6cb0",
                "ordo-pg" => "#4c51bf",
                "disk fdatasync" => "#a0aec0",
                _ => "#ed8936",
            };
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text><rect x="{LABEL}" y="{top:.1}" width="{len:.1}" height="{BAR_H}" fill="{color}"/><text x="{:.1}" y="{:.1}">{}{}</text>"#,
                LABEL - 8.0,
                top + 16.0,
                escape(name),
                LABEL + len + 6.0,
                top + 16.0,
                fmt_value(*v),
                escape(note)
            );
        }
        y += h;
    }
    s.push_str("</svg>\n");
    s
}

fn fmt_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub fn run(a: ChartArgs) -> ExitCode {
    let mut panels = Vec::new();
    for path in &a.inputs {
        let doc: Doc = match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
        {
            Ok(d) => d,
            Err(e) => {
                eprintln!(
                    "ordo-bench chart: cannot read {} (expected the output of `ordo-bench <scenario> --json`): {e}",
                    path.display()
                );
                return ExitCode::FAILURE;
            }
        };
        panels.push(panel(&doc));
    }
    if let Err(e) = std::fs::write(&a.output, svg(&panels)) {
        eprintln!("ordo-bench chart: cannot write {}: {e}", a.output.display());
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Keeps [`Outcome`]'s field names and the chart's reader in step.
#[cfg(test)]
mod tests {
    use super::super::report::Outcome;
    use super::*;

    #[test]
    fn reads_what_the_bench_writes_and_draws_one_bar_per_system() {
        let mut o = Outcome::new("ordo");
        o.delivered_per_sec = 1000.0;
        let mut q = Outcome::new("mqtt-qos1");
        q.delivered_per_sec = 250.0;
        let json =
            serde_json::json!({"scenario": "pairs", "params": {}, "runs": [], "medians": [o, q]});
        let doc: Doc = serde_json::from_value(json).unwrap();
        let p = panel(&doc);
        assert_eq!(
            p.bars,
            vec![
                ("ordo".to_string(), 1000.0, String::new()),
                ("mqtt-qos1".to_string(), 250.0, String::new())
            ]
        );
        let out = svg(&[p]);
        assert_eq!(out.matches("<rect x=").count(), 2);
        assert!(out.contains(">1000<") && out.contains(">250<"));
    }
}
