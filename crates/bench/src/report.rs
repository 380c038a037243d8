//! What one benchmark run measured ([`Outcome`]), how latencies are recorded ([`Latency`], HDR
//! histograms in microseconds), how several runs of the same system are folded into their median,
//! and how results are printed as a table.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// Latencies in microseconds. Samples are kept as they come (a fan-out run has one of these per
/// member device, so an empty one must cost nothing) and put into an HDR histogram (1 µs to 10
/// minutes, 3 significant digits) when the percentiles are asked for.
#[derive(Clone, Default)]
pub struct Latency(Vec<u64>);

impl Latency {
    pub fn record(&mut self, d: Duration) {
        self.record_micros(d.as_micros() as u64);
    }

    pub fn record_micros(&mut self, us: u64) {
        self.0.push(us.max(1));
    }

    pub fn merge(&mut self, other: &Latency) {
        self.0.extend_from_slice(&other.0);
    }

    pub fn summary(&self) -> Option<Summary> {
        if self.0.is_empty() {
            return None;
        }
        let mut h: Histogram<u64> = Histogram::new_with_bounds(1, 600_000_000, 3)
            .expect("1 µs .. 10 min at 3 digits is a valid histogram");
        for &us in &self.0 {
            h.saturating_record(us);
        }
        let ms = |v: u64| v as f64 / 1000.0;
        Some(Summary {
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            count: h.len(),
        })
    }
}

/// Percentiles of one latency, in milliseconds.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Summary {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub count: u64,
}

/// One run of one scenario against one system.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub system: String,
    /// Messages handed to the system.
    pub sent: u64,
    /// Messages the system confirmed (Ordo `accepted`, MQTT PUBACK/PUBCOMP, JetStream ack).
    pub accepted: u64,
    /// Message deliveries received (one per message per receiving device).
    pub delivered: u64,
    /// From the first send to the last delivery.
    pub seconds: f64,
    /// Deliveries per second.
    pub delivered_per_sec: f64,
    /// Send to confirmation.
    pub accept_ms: Option<Summary>,
    /// Send to receipt by the receiver.
    pub delivery_ms: Option<Summary>,
    /// Scenario-specific numbers (fan-out completion times, memory per connection, ...).
    pub extra: BTreeMap<String, f64>,
}

impl Outcome {
    pub fn new(system: &str) -> Self {
        Outcome {
            system: system.to_string(),
            sent: 0,
            accepted: 0,
            delivered: 0,
            seconds: 0.0,
            delivered_per_sec: 0.0,
            accept_ms: None,
            delivery_ms: None,
            extra: BTreeMap::new(),
        }
    }

    /// Fills in throughput and percentiles from the recorded latencies.
    pub fn finish(&mut self, seconds: f64, accept: &Latency, delivery: &Latency) {
        self.seconds = seconds;
        self.delivered_per_sec = if seconds > 0.0 {
            self.delivered as f64 / seconds
        } else {
            0.0
        };
        self.accept_ms = accept.summary();
        self.delivery_ms = delivery.summary();
    }
}

/// Records in `o.extra` how far a fixed-rate run's senders fell behind their schedule
/// (`behind_ms_p50`, `behind_ms_p99`: actual send time minus scheduled send time).
///
/// In a fixed-rate run a message's latency is measured from the moment it is actually sent,
/// not from its scheduled time: the bench's own timers wake about a millisecond late, the same
/// for every system, and that is not the system's latency. A system too slow to confirm within
/// the window holds its senders back instead, which shows here.
pub fn note_behind(o: &mut Outcome, behind: &Latency) {
    if let Some(s) = behind.summary() {
        o.extra.insert("behind_ms_p50".into(), s.p50);
        o.extra.insert("behind_ms_p99".into(), s.p99);
    }
}

/// The median of several runs of one system: every number is the median of that number over
/// the runs (so the row need not be any single run).
pub fn median(runs: &[Outcome]) -> Option<Outcome> {
    let first = runs.first()?;
    let med = |mut v: Vec<f64>| -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        if n == 0 {
            0.0
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    let medu = |f: &dyn Fn(&Outcome) -> u64| med(runs.iter().map(|r| f(r) as f64).collect()) as u64;
    let sum = |f: &dyn Fn(&Outcome) -> Option<Summary>| -> Option<Summary> {
        let all: Vec<Summary> = runs.iter().filter_map(f).collect();
        if all.is_empty() {
            return None;
        }
        let m = |g: &dyn Fn(&Summary) -> f64| med(all.iter().map(g).collect());
        Some(Summary {
            p50: m(&|s| s.p50),
            p90: m(&|s| s.p90),
            p99: m(&|s| s.p99),
            p999: m(&|s| s.p999),
            max: m(&|s| s.max),
            count: m(&|s| s.count as f64) as u64,
        })
    };
    let mut extra = BTreeMap::new();
    for k in first.extra.keys() {
        extra.insert(
            k.clone(),
            med(runs
                .iter()
                .filter_map(|r| r.extra.get(k).copied())
                .collect()),
        );
    }
    Some(Outcome {
        system: first.system.clone(),
        sent: medu(&|r| r.sent),
        accepted: medu(&|r| r.accepted),
        delivered: medu(&|r| r.delivered),
        seconds: med(runs.iter().map(|r| r.seconds).collect()),
        delivered_per_sec: med(runs.iter().map(|r| r.delivered_per_sec).collect()),
        accept_ms: sum(&|r| r.accept_ms),
        delivery_ms: sum(&|r| r.delivery_ms),
        extra,
    })
}

/// A human table: one row per system (median of its runs).
pub fn table(rows: &[Outcome]) -> String {
    let mut out = String::new();
    let fmt_ms = |s: &Option<Summary>| match s {
        Some(s) => format!(
            "{:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>8.2}",
            s.p50, s.p90, s.p99, s.p999, s.max
        ),
        None => format!("{:>7} {:>7} {:>7} {:>7} {:>8}", "-", "-", "-", "-", "-"),
    };
    out.push_str(&format!(
        "{:<12} {:>10} {:>10} {:>10} | {:^40} | {:^40}\n",
        "system", "delivered", "msgs/s", "seconds", "accept latency ms", "delivery latency ms"
    ));
    out.push_str(&format!(
        "{:<12} {:>10} {:>10} {:>10} | {:>7} {:>7} {:>7} {:>7} {:>8} | {:>7} {:>7} {:>7} {:>7} {:>8}\n",
        "", "", "", "", "p50", "p90", "p99", "p99.9", "max", "p50", "p90", "p99", "p99.9", "max"
    ));
    for r in rows {
        out.push_str(&format!(
            "{:<12} {:>10} {:>10.0} {:>10.3} | {} | {}\n",
            r.system,
            r.delivered,
            r.delivered_per_sec,
            r.seconds,
            fmt_ms(&r.accept_ms),
            fmt_ms(&r.delivery_ms)
        ));
    }
    for r in rows {
        if !r.extra.is_empty() {
            let kv: Vec<String> = r
                .extra
                .iter()
                .map(|(k, v)| format!("{k} {}", pretty(*v)))
                .collect();
            out.push_str(&format!("{:<12} {}\n", r.system, kv.join(", ")));
        }
    }
    out
}

fn pretty(v: f64) -> String {
    if v.fract() == 0.0 || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(system: &str, rate: f64, p99: f64) -> Outcome {
        let mut o = Outcome::new(system);
        o.delivered_per_sec = rate;
        o.delivery_ms = Some(Summary {
            p50: 1.0,
            p90: 2.0,
            p99,
            p999: 4.0,
            max: 5.0,
            count: 10,
        });
        o.extra.insert("x".into(), rate / 10.0);
        o
    }

    #[test]
    fn median_takes_each_number_separately() {
        let m = median(&[run("a", 3.0, 9.0), run("a", 1.0, 7.0), run("a", 2.0, 8.0)]).unwrap();
        assert_eq!(m.delivered_per_sec, 2.0);
        assert_eq!(m.delivery_ms.unwrap().p99, 8.0);
        assert_eq!(m.extra["x"], 0.2);
        let even = median(&[run("a", 1.0, 1.0), run("a", 3.0, 3.0)]).unwrap();
        assert_eq!(even.delivered_per_sec, 2.0);
        assert!(median(&[]).is_none());
    }

    #[test]
    fn latency_percentiles_are_in_milliseconds() {
        let mut l = Latency::default();
        for us in 1..=1000u64 {
            l.record_micros(us * 10);
        }
        let s = l.summary().unwrap();
        assert!((s.p50 - 5.0).abs() < 0.01, "{s:?}");
        assert!((s.p99 - 9.9).abs() < 0.02, "{s:?}");
        assert_eq!(s.count, 1000);
        assert!(Latency::default().summary().is_none());
    }
}
