//! Running seeds: one ([`run_seed`]), many with a report that names every failing seed and
//! shows the end of the first one's trace ([`simulate`]), or as many as it takes to find the
//! bug a sabotage planted ([`hunt`]).
//!
//! Environment: `ORDO_SIM_SEED=<n>` runs that seed alone and, if it fails, prints its whole
//! trace; `ORDO_SIM_SEEDS=<n>` runs `n` seeds starting at `ORDO_SIM_FIRST` (default 0).

use crate::checks::{Kind, Violation};
use crate::world::{Options, Sim, Stats};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// How one seed went.
#[derive(Debug)]
pub struct Outcome {
    pub seed: u64,
    pub profile: &'static str,
    pub result: Result<(), Violation>,
    pub stats: Stats,
    /// The whole trace, if it was asked for.
    pub trace: Option<Vec<String>>,
}

/// Runs one seed. A panic anywhere (in the harness, the core or the client) is a violation too.
pub fn run_seed(seed: u64, opts: Options, trace: bool) -> Outcome {
    catch_unwind(AssertUnwindSafe(|| {
        let mut s = Sim::new(seed, opts, trace);
        let result = s.run();
        Outcome {
            seed,
            profile: s.profile,
            result,
            stats: s.stats,
            trace: s.trace.take(),
        }
    }))
    .unwrap_or_else(|p| {
        let why = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Outcome {
            seed,
            profile: "?",
            result: Err(Violation::new(Kind::Other, format!("panicked: {why}"))),
            stats: Stats::default(),
            trace: None,
        }
    })
}

/// The seeds the environment asks for, or `0..default`; and whether it named a single one.
pub fn seeds_from_env(default: u64) -> (Vec<u64>, bool) {
    let var = |name: &str| -> Option<u64> { std::env::var(name).ok()?.trim().parse().ok() };
    if let Some(one) = var("ORDO_SIM_SEED") {
        return (vec![one], true);
    }
    let first = var("ORDO_SIM_FIRST").unwrap_or(0);
    let count = var("ORDO_SIM_SEEDS").unwrap_or(default);
    ((first..first.saturating_add(count)).collect(), false)
}

/// The trace of `seed` (run again with tracing), whole or its last `keep` lines.
fn trace_of(seed: u64, opts: Options, keep: Option<usize>) -> (String, Result<(), Violation>) {
    let o = run_seed(seed, opts, true);
    let trace = o.trace.unwrap_or_default();
    let keep = keep.unwrap_or(trace.len());
    (
        trace[trace.len().saturating_sub(keep)..].join("\n"),
        o.result,
    )
}

/// Runs the seeds the environment asks for (default `0..default`) and panics, listing every
/// failing seed with the end of the first one's trace, if any fails. Returns the totals.
pub fn simulate(default: u64, opts: Options) -> Stats {
    let (seeds, one) = seeds_from_env(default);
    let started = std::time::Instant::now();
    let mut total = Stats::default();
    let mut failures: Vec<(u64, &'static str, Violation)> = Vec::new();
    for &seed in &seeds {
        let o = run_seed(seed, opts, false);
        total += o.stats;
        if let Err(v) = o.result {
            failures.push((seed, o.profile, v));
        }
    }
    eprintln!(
        "{} seeds ({} failed) in {:.1} s, {opts:?}; totals: {total:?}",
        seeds.len(),
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    if let Some((seed, _, _)) = failures.first() {
        // One seed replayed: the whole trace; otherwise its end.
        let (tail, again) = trace_of(*seed, opts, if one { None } else { Some(150) });
        let list: Vec<String> = failures
            .iter()
            .map(|(s, p, v)| format!("  seed {s} ({p}): {v}"))
            .collect();
        panic!(
            "{} of {} seeds failed:\n{}\n\ntrace of seed {seed} (the end), replay with ORDO_SIM_SEED={seed}:\n{tail}\n{again:?}",
            failures.len(),
            seeds.len(),
            list.join("\n")
        );
    }
    total
}

/// What a [`hunt`] found.
#[derive(Debug)]
pub struct Hunt {
    /// The first seed that failed with a wanted kind, with the end of its trace.
    pub found: Option<Outcome>,
    /// Seeds run.
    pub seeds: u64,
    /// Seeds on the way that failed with another kind.
    pub others: Vec<(u64, Violation)>,
}

/// Runs seeds `0..max_seeds` until one fails with a violation of a `want`ed kind.
pub fn hunt(opts: Options, max_seeds: u64, want: &[Kind]) -> Hunt {
    let mut others = Vec::new();
    for seed in 0..max_seeds {
        let o = run_seed(seed, opts, false);
        match &o.result {
            Err(v) if want.contains(&v.kind) => {
                let (tail, _) = trace_of(seed, opts, Some(40));
                return Hunt {
                    found: Some(Outcome {
                        trace: Some(vec![tail]),
                        ..o
                    }),
                    seeds: seed + 1,
                    others,
                };
            }
            Err(v) => others.push((seed, v.clone())),
            Ok(()) => {}
        }
    }
    Hunt {
        found: None,
        seeds: max_seeds,
        others,
    }
}
