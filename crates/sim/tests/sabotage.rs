//! The harness must catch bugs: with one safeguard switched off, the simulation must find a
//! violation of the kind that safeguard prevents, within a bounded number of seeds. These runs
//! check only what the contract promises (`rule_checks: false`), so what is found is a
//! consequence an app or a user would see, not the broken rule itself.

use ordo_sim::{hunt, Kind, Options, Receipts, Sabotage};

/// Every sabotage must be caught within this many seeds.
const MAX_SEEDS: u64 = 200;

fn catches(sabotage: Sabotage, want: &[Kind]) {
    let opts = Options {
        receipts: Receipts::Off,
        sabotage,
        rule_checks: false,
    };
    let started = std::time::Instant::now();
    let h = hunt(opts, MAX_SEEDS, want);
    let others: Vec<String> = h
        .others
        .iter()
        .map(|(s, v)| format!("  seed {s}: {v}"))
        .collect();
    let Some(o) = h.found else {
        panic!(
            "{sabotage:?}: no {want:?} violation in {MAX_SEEDS} seeds; other violations:\n{}",
            others.join("\n")
        );
    };
    let v = o.result.as_ref().expect_err("a failing outcome");
    eprintln!(
        "{sabotage:?}: caught at seed {} ({} seeds, {:.1} s, profile {}): {v}; {} earlier seeds failed otherwise{}{}",
        o.seed,
        h.seeds,
        started.elapsed().as_secs_f64(),
        o.profile,
        others.len(),
        if others.is_empty() { "" } else { ":\n" },
        others.join("\n")
    );
}

#[test]
fn without_dedup_a_resend_is_stored_twice() {
    catches(Sabotage::Dedup, &[Kind::Duplicated]);
}

/// A crash between the answers and the fsync takes back seqs that were already announced: the
/// sender's accepted message is gone (G1), or its seq is given to another message (G3).
#[test]
fn answering_before_the_fsync_loses_accepted_messages_in_a_crash() {
    catches(Sabotage::FsyncBeforeAccept, &[Kind::NotDurable]);
}

/// A device that crashes between sending a position and storing what it covers leaves the
/// server with a delivered position it does not have.
#[test]
fn acknowledging_before_storing_claims_messages_a_crashed_device_lacks() {
    catches(Sabotage::StoreBeforeAck, &[Kind::AckBeforeStore]);
}

#[test]
fn without_the_reorder_buffer_an_app_gets_messages_out_of_order() {
    catches(Sabotage::ReorderBuffer, &[Kind::AppOrder]);
}

/// How often each sabotage is caught, and as what: `cargo test -p ordo-sim --test sabotage
/// census -- --ignored --nocapture` (`ORDO_SIM_SEEDS` seeds each, default 200).
#[test]
#[ignore = "a measurement, not a check"]
fn census() {
    let (seeds, _) = ordo_sim::seeds_from_env(MAX_SEEDS);
    for sabotage in Sabotage::ALL {
        let opts = Options {
            receipts: Receipts::Off,
            sabotage,
            rule_checks: false,
        };
        let mut kinds: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
        let mut failed = 0;
        for &seed in &seeds {
            if let Err(v) = ordo_sim::run_seed(seed, opts, false).result {
                failed += 1;
                let e = kinds.entry(format!("{:?}", v.kind)).or_insert((0, seed));
                e.0 += 1;
            }
        }
        eprintln!(
            "{sabotage:?}: {failed} of {} seeds fail; by kind (count, first seed): {kinds:?}",
            seeds.len()
        );
    }
}
