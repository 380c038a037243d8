//! Retention: count retention trims in the batch, age retention by time with the first seq
//! taken from the store; `first_seq` moves only once the trim is durable.

use crate::support::*;
use ordo_core::{Action, AdminOp, CoreConfig, Retention};
use ordo_protocol::direct_conv_id;

#[test]
fn count_retention_trims_in_the_batch_and_raises_first_seq() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice"], keep_last(3));
    s.core.connect(1, "alice", "a1");
    s.send(1, "g", "m1");
    s.send(1, "g", "m2");
    let (batches, _) = s.flush();
    assert!(batches[0].trim_below.is_empty(), "under the count");

    s.send_many(1, "g", 3..=5);
    let (batches, _) = s.flush();
    assert_eq!(batches[0].trim_below, vec![("g".to_string(), 3)]);
    assert_eq!(batches[0].positions[0].first_seq, 3);
    assert_eq!(s.store.seqs("g"), vec![3, 4, 5]);
    let i = info(&mut s, 1, "g");
    assert_eq!((i.first_seq, i.max_seq), (3, 5));

    s.send(1, "g", "m6");
    let (batches, _) = s.flush();
    assert_eq!(batches[0].trim_below, vec![("g".to_string(), 4)]);
    assert_eq!(s.store.seqs("g"), vec![4, 5, 6]);
    assert_eq!(info(&mut s, 1, "g").first_seq, 4);
}

#[test]
fn default_count_retention_applies_to_direct_conversations() {
    let mut s = Sim::new(CoreConfig {
        default_retention: keep_last(2),
        ..cfg()
    });
    s.core.connect(1, "alice", "a1");
    let id = direct_conv_id("alice", "bob");
    for i in 1..=4 {
        s.send_to(1, "bob", &format!("m{i}"));
    }
    let (batches, _) = s.flush();
    assert_eq!(batches[0].trim_below, vec![(id.clone(), 3)]);
    assert_eq!(s.store.seqs(&id), vec![3, 4]);
    assert_eq!(info(&mut s, 1, &id).first_seq, 3);
}

#[test]
fn shrinking_a_groups_count_retention_trims_at_the_next_batch() {
    let mut s = alice_alone_in_g(cfg());
    s.send_many(1, "g", 1..=5);
    s.flush();
    s.core
        .admin(
            9,
            AdminOp::UpdateGroup {
                id: "g".into(),
                add: vec![],
                remove: vec![],
                retention: Some(keep_last(1)),
                leave: vec![],
                name: None,
                metadata: None,
            },
            s.now,
        )
        .unwrap();
    let (batches, out) = s.flush();
    assert_eq!(batches[0].trim_below, vec![("g".to_string(), 5)]);
    assert!(
        matches!(&out[..], [Action::AdminDone { ticket: 9, reply: Ok(r) }] if r.first_seq == 5)
    );
    assert_eq!(s.store.seqs("g"), vec![5]);
}

#[test]
fn age_retention_trims_by_time_and_takes_first_seq_from_the_store() {
    let mut s = Sim::new(cfg());
    s.group(
        "g",
        &["alice"],
        Retention {
            max_age_ms: Some(1_000),
            max_count: None,
        },
    );
    s.group("keep", &["alice"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.now = 10_000;
    for i in 1..=3 {
        s.send(1, "g", &format!("old{i}"));
    }
    s.send(1, "keep", "k1");
    s.flush();
    s.now = 15_000;
    s.send(1, "g", "new4");
    s.send(1, "g", "new5");
    s.flush();

    // The store is asked which conversations hold messages past their age (the core need not
    // hold them), and the core trims those in its next batch.
    let asked = s.core.retention_tick(15_500);
    let sweep = match &asked[..] {
        [Action::Sweep(sweep)] => sweep.clone(),
        other => panic!("expected one retention step, got {other:?}"),
    };
    assert_eq!((sweep.now_ms, sweep.after.as_deref()), (15_500, None));
    let expired = s.store.expired(&sweep);
    assert_eq!(expired.swept_to, None, "two conversations: one step");
    s.core.expired(expired);
    let b = s.take();
    assert_eq!(b.trim_before_ms, vec![("g".to_string(), 14_500)]);
    assert!(b.messages.is_empty() && b.trim_below.is_empty());
    let outcome = s.store.apply(&b).unwrap();
    assert_eq!(outcome.first_seqs, vec![("g".to_string(), 4)]);
    // Not raised before the trim is durable.
    assert_eq!(info(&mut s, 1, "g").first_seq, 1);
    s.core.commit_done(b.id, outcome);
    let i = info(&mut s, 1, "g");
    assert_eq!((i.first_seq, i.max_seq), (4, 5));
    assert_eq!(s.store.seqs("g"), vec![4, 5]);

    // Within a pass (a minute by default) no further step is asked.
    assert!(s.core.retention_tick(16_000).is_empty());

    // Everything old: first_seq is max_seq + 1, and later passes have nothing to do for it.
    s.retention(100_000);
    s.flush();
    let i = info(&mut s, 1, "g");
    assert_eq!((i.first_seq, i.max_seq), (6, 5));
    assert!(s.store.seqs("g").is_empty());
    s.retention(200_000);
    assert!(s.core.take_batch().is_none(), "nothing left to trim");
    assert_eq!(s.store.seqs("keep"), vec![1]);

    // Numbering goes on after a full trim.
    s.now = 200_000;
    s.send(1, "g", "after");
    let (_, out) = s.flush();
    assert_eq!(accepted(&out, 1)[0].2, 6);
    let i = info(&mut s, 1, "g");
    assert_eq!((i.first_seq, i.max_seq), (6, 6));
}

// Regressions: each test below once failed on a real defect of the core.

/// `take_batch` raises the in-memory `first_seq` for count retention when it hands the batch
/// out, and `overview` reports it before the trim is durable. After a crash the store still
/// has the older messages and the overview's `first_seq` goes back.
#[test]
fn overview_first_seq_moves_only_when_the_trim_is_durable() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice"], keep_last(2));
    s.core.connect(1, "alice", "a1");
    s.send_many(1, "g", 1..=3);
    s.flush();
    assert_eq!(info(&mut s, 1, "g").first_seq, 2);
    s.send(1, "g", "m4");
    let _b = s.take(); // trims below 3, not durable yet
    let i = info(&mut s, 1, "g");
    assert_eq!(s.store.seqs("g"), vec![2, 3], "seq 2 is still stored");
    assert_eq!(
        (i.first_seq, i.max_seq),
        (2, 3),
        "overview must describe durable state"
    );
}
