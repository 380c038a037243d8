//! The model of a cluster's partition ownership ([`ordo_sim::leases`]), explored exhaustively:
//! with the rules as the store and the lease keeper run them no history forks, however stale an
//! owner's belief; with any one of them switched off, the exploration finds the fork it
//! prevents.

use ordo_sim::leases::{explore, Sabotage};

/// Deep enough for every fork a sabotage below allows (the longest takes 8 steps) and for a
/// stale owner's whole story: take, read, lose, be taken over, try to commit.
const DEPTH: usize = 11;

#[test]
fn two_owners_with_a_stale_lease_never_fork_a_history() {
    let e = explore(DEPTH, Sabotage::None);
    assert!(e.fork.is_none(), "{:?}", e.fork);
    eprintln!("{} states explored", e.states);
    assert!(e.states > 10_000, "only {} states explored", e.states);
}

#[test]
fn each_rule_switched_off_lets_a_history_fork() {
    for sabotage in [
        Sabotage::FenceWithoutEpoch,
        Sabotage::SameEpoch,
        Sabotage::TakeoverIgnoresLocks,
        Sabotage::KeepStateOnTakeover,
    ] {
        let e = explore(DEPTH, sabotage);
        let (why, steps) = e
            .fork
            .unwrap_or_else(|| panic!("{sabotage:?}: no fork found in {} states", e.states));
        eprintln!("{sabotage:?}: {why}\n  after {steps:?}");
    }
}
