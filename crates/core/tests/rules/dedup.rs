//! G2: idempotent send. A resend (same user, same cmid) is answered with the original answer
//! whether the original is pending, in flight or durable; past the dedup window it is a new
//! message; a cmid is not reused across conversations.

use crate::support::*;
use ordo_core::{Core, CoreConfig, DedupRecord, Retention, SendRequest};
use ordo_protocol::{direct_conv_id, ErrorCode};

/// Resends are recognised for one second.
fn short_dedup_window() -> CoreConfig {
    CoreConfig {
        dedup_window_ms: 1_000,
        ..cfg()
    }
}

#[test]
fn duplicate_while_pending_is_answered_at_commit_with_the_same_seq() {
    let mut s = alice_and_bob_in_g(cfg());
    s.send(1, "g", "x");
    assert!(s.send(1, "g", "x").is_empty(), "no answer before commit");
    assert!(s
        .core
        .send(
            1,
            SendRequest {
                conv: Some("g"),
                to: None,
                cmid: "x".into(),
                body: "other body".into(),
                reply_to: None
            },
            s.now + 5
        )
        .is_empty());
    let b = s.take();
    assert_eq!(b.messages.len(), 1, "a duplicate stores nothing");
    let out = s.commit(&b);
    let acc = accepted(&out, 1);
    assert_eq!(acc.len(), 3, "every send gets its answer");
    assert!(
        acc.iter().all(|a| *a == acc[0]),
        "identical answers {acc:?}"
    );
    assert_eq!(acc[0].2, 1);
    assert_eq!(msg_seqs(&out, 2), vec![1], "delivered once");
    assert_eq!(s.core.stats().dedup_hits, 2);
    assert_eq!(s.store.message("g", 1).unwrap().body, "body of x");
}

#[test]
fn duplicate_while_in_flight_is_answered_after_the_original_is_durable() {
    let mut s = alice_and_bob_in_g(cfg());
    s.send(1, "g", "x");
    let b1 = s.take();
    assert!(s.send(1, "g", "x").is_empty(), "not durable yet: no answer");
    let mut out = s.commit(&b1);
    // The resend's answer comes at this commit or at the next one, never before.
    let (batches, more) = s.flush();
    out.extend(more);
    assert!(batches
        .iter()
        .all(|b| b.messages.is_empty() && b.dedup_put.is_empty()));
    let acc = accepted(&out, 1);
    assert_eq!(acc.len(), 2, "{out:?}");
    assert_eq!(acc[0], acc[1]);
    assert_eq!(acc[0].2, 1);
    assert_eq!(msg_seqs(&out, 2), vec![1]);
    assert_eq!(s.store.seqs("g"), vec![1]);
}

#[test]
fn duplicate_after_durable_is_answered_at_once_with_the_original_answer() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(3, "alice", "a2");
    s.core.connect(2, "bob", "b1");
    s.send(1, "g", "x");
    let (_, out) = s.flush();
    let original = accepted(&out, 1);
    assert_eq!(original.len(), 1);

    s.now += 5_000;
    let out = s.core.send(
        1,
        SendRequest {
            conv: Some("g"),
            to: None,
            cmid: "x".into(),
            body: "changed".into(),
            reply_to: None,
        },
        s.now,
    );
    assert_eq!(accepted(&out, 1), original, "the same answer, same ts");
    assert_eq!(out.len(), 1);
    // The key is (user, cmid): another device of the same user is a resend too.
    let out = s.send(3, "g", "x");
    assert_eq!(accepted(&out, 3), original);
    assert!(s.core.take_batch().is_none(), "nothing new to store");
    assert!(!s.core.has_pending());
    assert_eq!(s.core.stats().dedup_hits, 2);
    assert_eq!(s.store.seqs("g"), vec![1]);

    // Another user may use the same cmid: it is a different message.
    assert!(s.send(2, "g", "x").is_empty());
    let (_, out) = s.flush();
    assert_eq!(accepted(&out, 2)[0].2, 2);
}

#[test]
fn after_the_dedup_window_a_resend_is_a_new_message() {
    let mut s = alice_alone_in_g(short_dedup_window());
    s.now = 10_000;
    s.send(1, "g", "x");
    s.send(1, "g", "y");
    s.flush();

    s.now = 10_999;
    let out = s.send(1, "g", "x");
    assert_eq!(accepted(&out, 1)[0].2, 1, "still inside the window");

    s.core.expire_dedup(10_999);
    assert!(s.core.take_batch().is_none(), "nothing expired yet");
    s.core.expire_dedup(11_000);
    let b = s.take();
    // Both were accepted at 10,000: everything accepted before 10,001 may go.
    assert_eq!(b.dedup_forget_before_ms, Some(10_001));
    assert!(b.dedup_delete.is_empty());
    s.commit(&b);
    assert!(s.store.dedup.is_empty());

    s.now = 11_001;
    assert!(s.send(1, "g", "x").is_empty(), "a new message now");
    let (batches, out) = s.flush();
    assert_eq!(batch_seqs(&batches[0], "g"), vec![3]);
    assert_eq!(accepted(&out, 1)[0].2, 3);
}

#[test]
fn past_the_window_a_resend_is_new_even_before_expiry_runs() {
    let mut s = alice_alone_in_g(short_dedup_window());
    s.now = 5_000;
    s.send(1, "g", "x");
    s.flush();
    s.now = 6_000;
    assert!(s.send(1, "g", "x").is_empty());
    let (_, out) = s.flush();
    assert_eq!(accepted(&out, 1)[0].2, 2);
    // The later expiry of the first acceptance must not forget the second one.
    s.core.expire_dedup(6_500);
    s.flush();
    s.now = 6_500;
    let out = s.send(1, "g", "x");
    assert_eq!(accepted(&out, 1)[0].2, 2, "the renewed key is still known");
    assert_eq!(
        s.store
            .dedup
            .get(&("alice".into(), "x".into(), "g".into()))
            .unwrap()
            .seq,
        2
    );
}

/// A store may keep expired dedup entries next to newer ones (the embedded store forgets them
/// by runs): a core rebuilt from such a snapshot answers a resend from the newest entry of its
/// key and treats a key whose only entry is expired as new.
#[test]
fn a_restart_from_a_snapshot_with_stale_dedup_entries_keeps_the_newest() {
    let mut s = alice_alone_in_g(short_dedup_window());
    s.now = 5_000;
    s.send(1, "g", "x");
    s.send(1, "g", "y");
    s.flush();
    s.now = 6_000;
    s.send(1, "g", "x");
    s.flush();
    let entry = |cmid: &str, seq, ts| DedupRecord {
        user: "alice".into(),
        cmid: cmid.into(),
        conv: "g".into(),
        seq,
        ts,
    };
    let mut snapshot = s.store.snapshot();
    // As a store that kept the expired ones would hand them back, oldest last.
    snapshot.dedup = vec![
        entry("x", 3, 6_000),
        entry("y", 2, 5_000),
        entry("x", 1, 5_000),
    ];
    s.core = Core::new(short_dedup_window(), 5, snapshot);
    s.core.connect(1, "alice", "a1");
    s.now = 6_500;
    let out = s.send(1, "g", "x");
    assert_eq!(accepted(&out, 1)[0].2, 3, "answered from the newest entry");
    assert!(s.send(1, "g", "y").is_empty(), "y's window is over: new");
    let (batches, out) = s.flush();
    assert_eq!(batch_seqs(&batches[0], "g"), vec![4]);
    assert_eq!(accepted(&out, 1)[0].2, 4);
    // Expiring the old entries forgets neither the renewed x nor the new y.
    s.core.expire_dedup(6_999);
    s.flush();
    s.now = 6_999;
    assert_eq!(accepted(&s.send(1, "g", "x"), 1)[0].2, 3);
    assert_eq!(accepted(&s.send(1, "g", "y"), 1)[0].2, 4);
}

#[test]
fn reusing_a_cmid_in_another_conversation_is_rejected() {
    let mut s = Sim::new(cfg());
    s.group("g1", &["alice", "bob"], Retention::default());
    s.group("g2", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.send(1, "g1", "x");
    // While the original is pending...
    let (code, retryable, after) = rejected(&s.send(1, "g2", "x"));
    assert_eq!((code, retryable, after), (ErrorCode::Invalid, false, None));
    let (batches, _) = s.flush();
    assert!(batch_seqs(&batches[0], "g2").is_empty());
    // ... and after it is durable, including through `to`.
    assert_eq!(rejected(&s.send(1, "g2", "x")).0, ErrorCode::Invalid);
    assert_eq!(rejected(&s.send_to(1, "bob", "x")).0, ErrorCode::Invalid);
    assert!(s.core.take_batch().is_none());
    assert!(s.store.seqs("g2").is_empty());
    assert!(!s.store.convs.contains_key(&direct_conv_id("alice", "bob")));
}

// Regressions: each test below once failed on a real defect of the core.

/// `expire_dedup` queues forgetting an expired key; a resend of that cmid before the next batch
/// is taken is a new message and queues a put of the same key. If the batch told the store to
/// forget the renewed entry too, it would be lost on disk: after a restart, another resend
/// inside the new window would be stored a second time (G2).
#[test]
fn a_batch_never_forgets_the_dedup_entries_it_puts() {
    let mut s = alice_alone_in_g(short_dedup_window());
    s.send(1, "g", "x");
    s.flush();
    s.now += 1_000;
    s.core.expire_dedup(s.now);
    assert!(
        s.send(1, "g", "x").is_empty(),
        "past the window: a new message"
    );
    let b = s.take();
    assert_eq!(batch_seqs(&b, "g"), vec![2]);
    let forget = b
        .dedup_forget_before_ms
        .expect("the first acceptance expired");
    assert!(b.messages.iter().all(|m| m.ts >= forget));
    s.commit(&b);
    assert_eq!(s.store.dedup.len(), 1, "the renewed entry is stored");
}

/// The whole window, exactly: a message accepted 23 hours earlier is still recognised after
/// thousands of other sends, hourly housekeeping and three restarts from the store, and its
/// resend gets the original answer and stores nothing; two hours later, past the 24 h window,
/// the same id is a new message.
#[test]
fn a_resend_23_hours_later_after_thousands_of_sends_and_restarts_gets_the_original_seq() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    let connect = |s: &mut Sim| {
        s.core.connect(1, "alice", "a1");
        s.core.connect(2, "bob", "b1");
    };
    connect(&mut s);
    s.send(1, "g", "first");
    let (_, out) = s.flush();
    let original = accepted(&out, 1);
    assert_eq!(original.len(), 1);
    let mut stored = 1;
    for hour in 1..=23u64 {
        s.now += 3_600_000;
        for i in 0..120 {
            s.send(1, "g", &format!("a-{hour}-{i}"));
            s.send(2, "g", &format!("b-{hour}-{i}"));
            stored += 2;
        }
        s.core.expire_dedup(s.now);
        s.core.retention_tick(s.now);
        s.flush();
        if hour % 6 == 0 {
            s.restart(cfg());
            connect(&mut s);
        }
    }
    assert_eq!(s.store.seqs("g").len(), stored);

    let out = s.send(1, "g", "first");
    assert_eq!(accepted(&out, 1), original, "the original seq and time");
    assert!(s.core.take_batch().is_none(), "nothing new to store");
    assert_eq!(s.store.seqs("g").len(), stored);

    s.now += 2 * 3_600_000;
    s.core.expire_dedup(s.now);
    s.send(1, "g", "first");
    let (_, out) = s.flush();
    let again = accepted(&out, 1);
    assert_eq!(again.len(), 1);
    assert_eq!(
        again[0].2,
        stored as u64 + 1,
        "past the window: a new message"
    );
}
