//! G2: idempotent send. A resend (same user, same cmid) is answered with the original answer
//! whether the original is pending, in flight or durable; past the dedup window it is a new
//! message; a cmid is not reused across conversations.

use crate::support::*;
use ordo_core::{Action, CoreConfig, Retention, SendRequest};
use ordo_protocol::{direct_conv_id, ErrorCode, ServerFrame};

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
            .get(&("alice".into(), "x".into()))
            .unwrap()
            .seq,
        2
    );
}

/// A restarted core holds no dedup entry in memory: a resend is answered from the store's
/// entry (the newest of its key), a key whose entry is past the window is new, and while the
/// filter is not rebuilt every key the cache does not hold is looked up.
#[test]
fn after_a_restart_resends_are_answered_from_the_store() {
    let mut s = alice_alone_in_g(short_dedup_window());
    s.now = 5_000;
    s.send(1, "g", "x");
    s.send(1, "g", "y");
    s.flush();
    s.now = 6_000;
    s.send(1, "g", "x");
    s.flush();
    s.restart_cold(short_dedup_window());
    s.core.connect(1, "alice", "a1");
    s.now = 6_500;
    let out = s.send(1, "g", "x");
    assert_eq!(accepted(&out, 1)[0].2, 3, "answered from the newest entry");
    assert!(s.send(1, "g", "y").is_empty(), "y's window is over: new");
    let (batches, out) = s.flush();
    assert_eq!(batch_seqs(&batches[0], "g"), vec![4]);
    assert_eq!(accepted(&out, 1)[0].2, 4);
    assert_eq!(s.core.stats().dedup_lookups, 2, "both keys were looked up");
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
/// thousands of other sends (and thousands of evictions from a dedup cache of 16 entries),
/// hourly housekeeping and three restarts from the store, and its resend gets the original
/// answer and stores nothing; two hours later, past the 24 h window, the same id is a new
/// message.
#[test]
fn a_resend_23_hours_later_after_thousands_of_sends_and_restarts_gets_the_original_seq() {
    let small = || CoreConfig {
        dedup_cache_entries: 16,
        ..cfg()
    };
    let mut s = Sim::new(small());
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
            if i % 10 == 0 {
                s.flush();
            }
        }
        s.core.expire_dedup(s.now);
        s.retention(s.now);
        s.flush();
        assert!(
            s.core.dedup_cached() <= 16,
            "the cache stays within its size"
        );
        if hour % 6 == 0 {
            s.restart(small());
            connect(&mut s);
        }
    }
    assert_eq!(s.store.seqs("g").len(), stored);

    let lookups = s.core.stats().dedup_lookups;
    let out = s.send(1, "g", "first");
    assert_eq!(accepted(&out, 1), original, "the original seq and time");
    assert_eq!(
        s.core.stats().dedup_lookups,
        lookups + 1,
        "answered by the store"
    );
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

/// A send whose key must be looked up waits, and so do the later sends of its connection (in
/// order) though they need no lookup; another connection's sends and other frames do not wait.
#[test]
fn sends_behind_a_lookup_wait_in_order() {
    let mut s = alice_and_bob_in_g(cfg());
    s.send(1, "g", "old");
    s.flush();
    s.restart_cold(cfg());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    // Cold: every key is looked up; the answers are held back here.
    let first = s.core.send(1, req("g", "old"), s.now);
    let Some(Action::Lookup { id: first_id, .. }) = first.first().cloned() else {
        panic!("a lookup: {first:?}")
    };
    let mut asked = vec![];
    for cmid in ["n1", "n2"] {
        asked.extend(s.core.send(1, req("g", cmid), s.now));
    }
    assert_eq!(asked.len(), 2, "each parked send asks at once: {asked:?}");
    let bob = s.core.send(2, req("g", "b"), s.now);
    assert!(matches!(bob[..], [Action::Lookup { .. }]));
    let bob = s.answer_lookups(bob);
    assert!(bob.is_empty(), "bob's new send is pending: {bob:?}");
    // n1 and n2's answers come first: they still wait behind "old".
    assert!(s.answer_lookups(asked).is_empty());
    let (batches, _) = s.flush();
    assert_eq!(
        batches[0]
            .messages
            .iter()
            .map(|m| m.cmid.as_str())
            .collect::<Vec<_>>(),
        ["b"]
    );
    let found = s.store.dedup_lookup("alice", "old");
    let out = s.core.looked_up(first_id, found, s.now);
    assert_eq!(
        accepted(&out, 1).iter().map(|a| a.2).collect::<Vec<_>>(),
        [1]
    );
    let (batches, out) = s.flush();
    assert_eq!(batch_seqs(&batches[0], "g"), vec![3, 4]);
    let names: Vec<String> = accepted(&out, 1).into_iter().map(|a| a.0).collect();
    assert_eq!(names, ["n1", "n2"], "in the order they were sent");
}

/// A lookup answered "not held" may be older than an entry the cache accepted and forgot
/// meanwhile (another device of the same user sent the same id): the key is looked up again,
/// and the resend gets the original answer rather than a second seq.
#[test]
fn a_lookup_older_than_a_forgotten_entry_is_asked_again() {
    let tiny = CoreConfig {
        dedup_cache_entries: 0,
        ..cfg()
    };
    let mut s = alice_alone_in_g(tiny.clone());
    s.restart_cold(tiny);
    s.core.connect(1, "alice", "a1");
    s.core.connect(3, "alice", "a2");
    let asked = s.core.send(1, req("g", "x"), s.now);
    let Some(Action::Lookup { id, user, cmid }) = asked.first().cloned() else {
        panic!("a lookup: {asked:?}")
    };
    // The store's answer as of now: not held.
    let stale = s.store.dedup_lookup(&user, &cmid);
    assert!(stale.is_none());
    // Meanwhile the other device sends the same id; it is accepted, committed, forgotten.
    s.send(3, "g", "x");
    let (_, out) = s.flush();
    assert_eq!(accepted(&out, 3)[0].2, 1);
    assert_eq!(s.core.dedup_cached(), 0);
    let again = s.core.looked_up(id, stale, s.now);
    assert!(
        matches!(again[..], [Action::Lookup { .. }]),
        "asked again: {again:?}"
    );
    let out = s.answer_lookups(again);
    assert_eq!(accepted(&out, 1)[0].2, 1, "the original seq");
    assert!(s.core.take_batch().is_none(), "nothing stored twice");
}

/// A connection may have only so many sends waiting for lookups: past that, a send is refused
/// as unavailable with a retry time, and nothing else is lost. The refused send is held back
/// like one refused for rate: the connection's later new sends into the conversation are refused
/// (as unavailable too) until it is resent, so it cannot land behind them.
#[test]
fn a_connection_cannot_park_without_bound() {
    let mut s = alice_alone_in_g(cfg());
    s.restart_cold(cfg());
    s.core.connect(1, "alice", "a1");
    let mut refused = 0;
    let mut asked = Vec::new();
    for i in 0..1100 {
        for a in s.core.send(1, req("g", &format!("m{i}")), s.now) {
            match a {
                Action::Send {
                    frame:
                        ServerFrame::Rejected {
                            code,
                            retry_after_ms,
                            ..
                        },
                    ..
                } => {
                    assert_eq!((code, retry_after_ms), (ErrorCode::Unavailable, Some(100)));
                    refused += 1;
                }
                other => asked.push(other),
            }
        }
    }
    assert_eq!(refused, 1100 - 1024);
    s.answer_lookups(asked);
    let (batches, _) = s.flush();
    assert_eq!(
        batches.iter().map(|b| b.messages.len()).sum::<usize>(),
        1024
    );
    // A new send after the refused ones waits for them.
    assert_eq!(rejected(&s.send(1, "g", "later")).0, ErrorCode::Unavailable);
    for i in 1024..1100 {
        assert!(s.send(1, "g", &format!("m{i}")).is_empty(), "m{i} resent");
    }
    assert!(s.send(1, "g", "later").is_empty());
    let (_, out) = s.flush();
    let seqs: Vec<(String, u64)> = accepted(&out, 1).into_iter().map(|a| (a.0, a.2)).collect();
    assert_eq!(seqs.len(), 77);
    assert_eq!(seqs.last(), Some(&("later".to_string(), 1101)), "{seqs:?}");
    assert!(seqs.windows(2).all(|w| w[0].1 < w[1].1));
}

/// Across connections too, the sends waiting for lookups are bounded (`max_parked_bytes`): past
/// it a send that would wait is refused as unavailable and held back, and the others go on.
#[test]
fn all_connections_together_cannot_park_without_bound() {
    let tight = CoreConfig {
        max_parked_bytes: 50,
        ..cfg()
    };
    let mut s = alice_and_bob_in_g(tight.clone());
    s.restart_cold(tight);
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    // Each send counts 13 bytes (id, body, conversation): alice parks 3.
    let mut asked = Vec::new();
    for i in 0..3 {
        asked.extend(s.core.send(1, req("g", &format!("a{i}")), s.now));
    }
    assert_eq!(asked.len(), 3, "{asked:?}");
    // Bob's first send would wait too and finds the budget spent.
    let (code, retryable, after) = rejected(&s.core.send(2, req("g", "b0"), s.now));
    assert_eq!(
        (code, retryable, after),
        (ErrorCode::Unavailable, true, Some(100))
    );
    // Once the budget is free again, his next send is held back behind the refused one.
    s.answer_lookups(asked);
    assert_eq!(rejected(&s.send(2, "g", "b1")).0, ErrorCode::Unavailable);
    assert!(s.send(2, "g", "b0").is_empty());
    assert!(s.send(2, "g", "b1").is_empty());
    let (_, out) = s.flush();
    let seqs = |sid| {
        accepted(&out, sid)
            .into_iter()
            .map(|a| (a.0, a.2))
            .collect::<Vec<_>>()
    };
    assert_eq!(seqs(1).len(), 3);
    assert_eq!(seqs(2), [("b0".to_string(), 4), ("b1".to_string(), 5)]);
}

/// alice's a0, a1 and a2 wait for their dedup lookups (the returned actions), and the sends
/// of every connection together may have no more bytes waiting.
fn three_waiting_and_no_room_for_more() -> (Sim, Vec<Action>) {
    let tight = CoreConfig {
        max_parked_bytes: 50,
        ..cfg()
    };
    let mut s = alice_alone_in_g(tight.clone());
    s.restart_cold(tight);
    s.core.connect(1, "alice", "a1");
    let mut asked = Vec::new();
    for i in 0..3 {
        asked.extend(s.core.send(1, req("g", &format!("a{i}")), s.now));
    }
    (s, asked)
}

/// A copy of a frame refused because too many sends were waiting holds nothing back once the
/// first copy is accepted: the client, answered, never resends it.
#[test]
fn a_refused_copy_of_an_accepted_send_holds_nothing_back() {
    let (mut s, asked) = three_waiting_and_no_room_for_more();
    // The network delivers a second copy of a0 while all three wait: refused, held back.
    let (code, _, _) = rejected(&s.core.send(1, req("g", "a0"), s.now));
    assert_eq!(code, ErrorCode::Unavailable);
    s.answer_lookups(asked);
    let (_, out) = s.flush();
    assert_eq!(accepted(&out, 1).len(), 3);
    assert!(s.send(1, "g", "a3").is_empty(), "a0 was answered");
    let (_, out) = s.flush();
    assert_eq!(accepted(&out, 1)[0].2, 4);
}

/// A resend of an accepted message that arrives while a send of the same connection is held
/// back (refused because too many were waiting) is answered at once, and holds nothing back.
#[test]
fn a_resend_of_an_accepted_send_passes_a_held_back_one() {
    let (mut s, asked) = three_waiting_and_no_room_for_more();
    let (code, _, _) = rejected(&s.core.send(1, req("g", "a3"), s.now));
    assert_eq!(code, ErrorCode::Unavailable, "a3 is held back");
    s.answer_lookups(asked);
    let (_, out) = s.flush();
    assert_eq!(accepted(&out, 1).len(), 3);
    // a0's answer was lost on the way: its resend is answered, though a3 is held back.
    let out = s.core.send(1, req("g", "a0"), s.now);
    assert_eq!(accepted(&out, 1).len(), 1, "{out:?}");
    assert!(s.send(1, "g", "a3").is_empty());
    assert!(s.send(1, "g", "a4").is_empty(), "a0 holds nothing back");
    let (_, out) = s.flush();
    let seqs: Vec<(String, u64)> = accepted(&out, 1).into_iter().map(|a| (a.0, a.2)).collect();
    assert_eq!(seqs, [("a3".to_string(), 4), ("a4".to_string(), 5)]);
}
