//! G1 / G3: sequencing and group commit. Seqs start at one and have no gaps per conversation;
//! nothing (a message, a new group) is visible or answered before its batch is durable; one
//! batch is in flight at a time and sends pending meanwhile join the next.

use crate::support::*;
use ordo_core::{Action, CommitOutcome, Retention};
use ordo_protocol::{direct_conv_id, ConvKind, ErrorCode};
use std::collections::BTreeSet;

#[test]
fn seqs_start_at_one_and_are_gap_free_per_conversation() {
    let mut s = Sim::new(cfg());
    s.group("g1", &["alice", "bob"], Retention::default());
    s.group("g2", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    for i in 0..5 {
        assert!(s.send(1, "g1", &format!("a{i}")).is_empty());
        assert!(s.send(2, "g2", &format!("b{i}")).is_empty());
        assert!(s.send(2, "g1", &format!("c{i}")).is_empty());
    }
    let b = s.take();
    assert_eq!(batch_seqs(&b, "g1"), (1..=10).collect::<Vec<_>>());
    assert_eq!(batch_seqs(&b, "g2"), (1..=5).collect::<Vec<_>>());
    // Both groups were committed before: the batch moves their seq ranges and does not rewrite
    // their records (member lists).
    assert!(b.convs.is_empty());
    let pos = |id: &str| b.positions.iter().find(|p| p.id == id).unwrap().clone();
    assert_eq!(pos("g1").max_seq, 10);
    assert_eq!(pos("g2").max_seq, 5);
    assert!(
        b.dedup_put.is_empty(),
        "every message is its own dedup entry"
    );
    s.commit(&b);
    assert_eq!(s.store.dedup.len(), 15);

    s.send(1, "g1", "late1");
    s.send(1, "g2", "late2");
    let b = s.take();
    assert_eq!(batch_seqs(&b, "g1"), vec![11]);
    assert_eq!(batch_seqs(&b, "g2"), vec![6]);
    s.commit(&b);
    assert_eq!(s.store.seqs("g1"), (1..=11).collect::<Vec<_>>());
    assert_eq!(s.store.seqs("g2"), (1..=6).collect::<Vec<_>>());
    assert_eq!(info(&mut s, 1, "g1").max_seq, 11);
    assert_eq!(s.core.stats().accepted, 17);
}

#[test]
fn nothing_is_visible_before_its_batch_commits() {
    let mut s = alice_and_bob_in_g(cfg());

    assert!(s.send(1, "g", "m1").is_empty(), "no answer before commit");
    assert_eq!(info(&mut s, 2, "g").max_seq, 0);
    assert_eq!(s.core.sync(2, "g", 0, None).unwrap().to, 0);
    let b1 = s.take();
    assert!(s.send(1, "g", "m2").is_empty());
    // In flight is not durable either.
    assert_eq!(info(&mut s, 2, "g").max_seq, 0);
    assert_eq!(s.core.sync(2, "g", 0, None).unwrap().to, 0);
    assert_eq!(s.core.stats().accepted, 0);
    assert_eq!(s.core.stats().pushed, 0);

    let out = s.commit(&b1);
    assert_eq!(accepted(&out, 1).len(), 1, "only m1 is durable: {out:?}");
    assert_eq!(accepted(&out, 1)[0].2, 1);
    assert_eq!(msg_seqs(&out, 1), vec![1]);
    assert_eq!(msg_seqs(&out, 2), vec![1]);
    assert_eq!(info(&mut s, 2, "g").max_seq, 1);
    assert_eq!(s.core.sync(2, "g", 0, None).unwrap().to, 1);

    let (_, out) = s.flush();
    assert_eq!(accepted(&out, 1)[0].2, 2);
    assert_eq!(msg_seqs(&out, 2), vec![2]);
}

#[test]
fn a_new_group_is_invisible_and_unanswered_until_durable() {
    let mut s = Sim::new(cfg());
    s.core.connect(1, "alice", "a1");
    s.create_group(42, "g", &["alice"], Retention::default());
    assert!(s.core.group("g").is_none());
    assert!(s.overview(1).is_empty());
    assert_eq!(code(s.core.sync(1, "g", 0, None)), ErrorCode::NotFound);
    let b = s.take();
    assert_eq!(b.convs.len(), 1);
    assert_eq!(b.convs[0].kind, ConvKind::Group);
    let out = s.commit(&b);
    match &out[..] {
        [Action::AdminDone {
            ticket: 42,
            reply: Ok(rec),
        }] => {
            assert_eq!(rec.id, "g");
            assert_eq!(rec.members, BTreeSet::from(["alice".to_string()]));
            assert_eq!(rec.max_seq, 0);
            assert_ne!(rec.epoch, 0);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(s.overview(1).len(), 1);
}

#[test]
fn one_batch_in_flight_and_pending_sends_join_the_next() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    assert!(s.core.take_batch().is_none(), "nothing pending");
    assert!(!s.core.has_pending());

    s.send(1, "g", "m1");
    assert!(s.core.has_pending());
    let b1 = s.take();
    assert!(s.core.in_flight());
    assert!(
        s.core.take_batch().is_none(),
        "one batch in flight at a time"
    );
    s.send(1, "g", "m2");
    s.send(1, "g", "m3");
    assert!(s.core.take_batch().is_none(), "still in flight");

    // A report for another batch changes nothing.
    assert!(s
        .core
        .commit_done(b1.id + 100, CommitOutcome::default())
        .is_empty());
    assert!(s.core.in_flight());
    assert!(s.core.take_batch().is_none());

    let out = s.commit(&b1);
    assert_eq!(
        accepted(&out, 1)
            .into_iter()
            .map(|a| a.0)
            .collect::<Vec<_>>(),
        vec!["m1"]
    );
    assert!(!s.core.in_flight());
    let b2 = s.take();
    assert!(b2.id > b1.id);
    assert_eq!(batch_seqs(&b2, "g"), vec![2, 3], "group commit");
    let out = s.commit(&b2);
    assert_eq!(
        accepted(&out, 1)
            .into_iter()
            .map(|a| (a.0, a.2))
            .collect::<Vec<_>>(),
        vec![("m2".to_string(), 2), ("m3".to_string(), 3)]
    );
    // A late duplicate report of a committed batch is ignored.
    assert!(s
        .core
        .commit_done(b2.id, CommitOutcome::default())
        .is_empty());
    assert!(s.core.take_batch().is_none());
}

/// A conversation's record (with its member list) is written when it is created or changed; a
/// batch of new messages writes only its seq range, and a restart from the store has both.
#[test]
fn messages_move_the_seq_range_without_rewriting_the_record() {
    let mut s = Sim::new(cfg());
    s.core.connect(1, "alice", "a1");
    // A direct conversation's first batch creates it: the whole record.
    s.send_to(1, "bob", "d1");
    let b = s.take();
    assert_eq!(b.convs.len(), 1);
    assert!(b.positions.is_empty());
    s.commit(&b);
    s.send_to(1, "bob", "d2");
    let b = s.take();
    assert!(b.convs.is_empty());
    assert_eq!(b.positions.len(), 1);
    assert_eq!((b.positions[0].max_seq, b.positions[0].first_seq), (2, 1));
    s.commit(&b);

    s.group("g", &["alice", "bob"], Retention::default());
    s.send(1, "g", "m1");
    s.commit_pending();
    // A membership change in the same batch as a message: the whole record, once (its event,
    // carol's joining, is seq 2).
    s.add_member(900, "g", "carol");
    s.send(1, "g", "m2");
    let b = s.take();
    assert!(b.positions.is_empty());
    assert_eq!(b.convs.len(), 1);
    assert_eq!(b.convs[0].max_seq, 3);
    assert!(b.convs[0].members.contains("carol"));
    s.commit(&b);
    s.send(1, "g", "m3");
    s.commit_pending();

    s.restart(cfg());
    s.warm("g");
    let g = s.core.group("g").unwrap();
    assert_eq!(g.max_seq, 4);
    assert_eq!(
        g.members.iter().cloned().collect::<Vec<_>>(),
        ["alice", "bob", "carol"]
    );
    assert_eq!(s.store.max_seq(&direct_conv_id("alice", "bob")), 2);
}
