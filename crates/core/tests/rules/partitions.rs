//! What a cluster's node asks of the core when a partition moves: a conversation with work on
//! it is never forgotten; once forgotten, the next frame loads it afresh from the store, so
//! that seqs go on from what another owner committed (never a seq stored twice); a dedup filter
//! marked incomplete looks up the keys another owner accepted; an overview told not to keep
//! what it read keeps nothing.
//!
//! Two cores on one store play two nodes: the test swaps which one the harness drives.

use crate::support::*;
use ordo_core::{Core, CoreConfig, Retention};

/// The other node: a core of its own on the same store.
fn other_node(s: &Sim) -> Core {
    let mut core = Core::new(cfg(), 11, s.store.snapshot());
    core.dedup_filter_complete();
    core
}

fn is_g(conv: &str) -> bool {
    conv == "g"
}

/// alice alone in `g`: this node commits m1; then the partition moves to the other node, where
/// alice's m2 is committed (seq 2); then it comes back. Returns the seq m2 got.
fn m2_committed_elsewhere(s: &mut Sim) -> u64 {
    s.send(1, "g", "m1");
    let b = s.take();
    s.commit(&b);
    let mut other = other_node(s);
    std::mem::swap(&mut s.core, &mut other);
    s.core.connect(1, "alice", "a1");
    let out = s.send(1, "g", "m2");
    assert!(out.is_empty(), "m2 waits for its commit");
    let b = s.take();
    let done = s.commit(&b);
    std::mem::swap(&mut s.core, &mut other);
    accepted(&done, 1)[0].2
}

#[test]
fn a_conversation_with_work_on_it_is_never_forgotten() {
    let mut s = alice_alone_in_g(cfg());
    s.send(1, "g", "m1");
    assert!(s.core.busy_with(&is_g), "a send pending");
    assert!(s.core.forget_convs(&is_g).is_err());
    let b = s.take();
    assert!(s.core.busy_with(&is_g), "a batch in flight");
    assert!(s.core.forget_convs(&is_g).is_err());
    s.commit(&b);
    assert!(!s.core.busy_with(&is_g));
    let held = s.core.convs_held();
    assert_eq!(s.core.forget_convs(&is_g), Ok(1));
    assert_eq!(s.core.convs_held(), held - 1);
}

#[test]
fn a_conversation_taken_back_goes_on_from_what_the_other_owner_committed() {
    let mut s = alice_alone_in_g(cfg());
    assert_eq!(m2_committed_elsewhere(&mut s), 2);
    // Back here: this node forgets what it held of g before taking it again.
    assert_eq!(s.core.forget_convs(&is_g), Ok(1));
    s.send(1, "g", "m3");
    let b = s.take();
    assert_eq!(
        batch_seqs(&b, "g"),
        [3],
        "seqs go on from the other owner's"
    );
    let done = s.commit(&b);
    assert_eq!(accepted(&done, 1)[0].2, 3);
}

#[test]
fn keys_another_owner_accepted_are_looked_up_once_the_filter_is_marked_incomplete() {
    let mut s = alice_alone_in_g(cfg());
    // The other node accepts m2, which this node's filter has never seen.
    assert_eq!(m2_committed_elsewhere(&mut s), 2);
    s.core.forget_convs(&is_g).expect("nothing pending");
    s.core.dedup_filter_incomplete();
    // A resend of m2 is answered as the other owner accepted it, not stored again.
    let out = s.send(1, "g", "m2");
    let answer = accepted(&out, 1);
    assert_eq!(answer.len(), 1, "{out:?}");
    assert_eq!((answer[0].0.as_str(), answer[0].2), ("m2", 2));
    assert!(!s.core.has_pending(), "nothing new to store");
}

#[test]
fn an_overview_told_not_to_keep_keeps_nothing() {
    for keep in [true, false] {
        let mut s = Sim::new(CoreConfig { ..cfg() });
        s.group("g", &["alice"], Retention::default());
        s.group("h", &["alice"], Retention::default());
        s.restart_cold(cfg());
        s.core.set_keep_overviews(keep);
        s.core.connect(1, "alice", "a1");
        let listed = s.overview(1);
        assert_eq!(listed.len(), 2);
        assert_eq!(s.core.convs_held() > 0, keep, "keep {keep}");
    }
}
