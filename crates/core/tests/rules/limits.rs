//! G9: bad input and limits. Oversized bodies, invalid ids and arguments and sends over the
//! rate limit are rejected, store nothing and create no conversation.

use crate::support::*;
use ordo_core::{Retention, SendRequest};
use ordo_protocol::{direct_conv_id, ErrorCode, ServerFrame};

#[test]
fn bodies_over_the_limit_are_too_large() {
    let mut c = cfg();
    c.limits.max_body_bytes = 10;
    let mut s = Sim::new(c);
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    let send = |s: &mut Sim, conv: Option<&str>, to: Option<&str>, cmid: &str, body: &str| {
        let actions = s.core.send(
            1,
            SendRequest {
                conv,
                to,
                cmid: cmid.to_string(),
                body: body.to_string(),
                reply_to: None,
            },
            s.now,
        );
        s.answer_lookups(actions)
    };
    assert!(send(&mut s, Some("g"), None, "ok", "0123456789").is_empty());
    let (c, retryable, _) = rejected(&send(&mut s, Some("g"), None, "big", "0123456789a"));
    assert_eq!((c, retryable), (ErrorCode::TooLarge, false));
    // Bytes, not characters: six two-byte characters are 12 bytes.
    assert_eq!(
        rejected(&send(&mut s, Some("g"), None, "utf", "éééééé")).0,
        ErrorCode::TooLarge
    );
    // An oversized first message does not create the direct conversation.
    assert_eq!(
        rejected(&send(&mut s, None, Some("bob"), "d", "0123456789a")).0,
        ErrorCode::TooLarge
    );
    let (batches, _) = s.flush();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].messages.len(), 1);
    assert!(batches[0].convs.is_empty());
    assert_eq!(batches[0].positions.len(), 1);
    assert!(!s.store.convs.contains_key(&direct_conv_id("alice", "bob")));
    // The rejected cmid is free for a corrected resend.
    assert!(send(&mut s, Some("g"), None, "big", "short").is_empty());
    let (_, out) = s.flush();
    assert_eq!(accepted(&out, 1)[0].2, 2);
}

#[test]
fn invalid_ids_and_arguments_are_rejected_as_invalid() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    let body = || "hi".to_string();
    let now = s.now;
    type Case<'a> = (Option<&'a str>, Option<&'a str>, String, Option<u64>);
    let cases: Vec<Case> = vec![
        (Some("g"), None, String::new(), None),
        (Some("g"), None, "has space".into(), None),
        (Some("g"), None, "x".repeat(129), None),
        (Some("bad/id"), None, "c1".into(), None),
        (None, Some("bad user"), "c2".into(), None),
        (Some("g"), Some("bob"), "c3".into(), None),
        (None, None, "c4".into(), None),
        (Some("g"), None, "c5".into(), Some(0)),
        (Some("g"), None, "c6".into(), Some(1)),
    ];
    for (conv, to, cmid, reply_to) in cases {
        let out = s.core.send(
            1,
            SendRequest {
                conv,
                to,
                cmid: cmid.clone(),
                body: body(),
                reply_to,
            },
            now,
        );
        let (c, retryable, _) = rejected(&out);
        assert_eq!(
            (c, retryable),
            (ErrorCode::Invalid, false),
            "{conv:?} {to:?} {cmid:?} {reply_to:?}"
        );
        match &frames(&out, 1)[0] {
            ServerFrame::Rejected { cmid: echoed, .. } => assert_eq!(echoed, &cmid),
            f => panic!("{f:?}"),
        }
    }
    assert!(s.core.take_batch().is_none(), "nothing stored");
    assert_eq!(code(s.core.sync(1, "bad id", 0, None)), ErrorCode::Invalid);
    assert_eq!(code(s.core.sync(1, "g", 0, Some(0))), ErrorCode::Invalid);
    assert_eq!(code(s.core.ack(1, "", 0)), ErrorCode::Invalid);

    // reply_to must name an existing seq.
    s.send(1, "g", "first");
    assert!(s
        .core
        .send(
            1,
            SendRequest {
                conv: Some("g"),
                to: None,
                cmid: "reply".into(),
                body: body(),
                reply_to: Some(1)
            },
            now
        )
        .is_empty());
    let (_, out) = s.flush();
    assert_eq!(accepted(&out, 1).len(), 2);
    assert_eq!(s.store.message("g", 2).unwrap().reply_to, Some(1));
}

#[test]
fn sending_too_fast_is_rate_limited_with_a_retry_hint() {
    let mut s = one_per_second(2.0);
    s.core.connect(2, "bob", "b1");
    s.now = 0;
    assert!(s.send(1, "g", "m1").is_empty());
    assert!(s.send(1, "g", "m2").is_empty());
    let (c, retryable, after) = rejected(&s.send(1, "g", "m3"));
    assert_eq!(c, ErrorCode::RateLimited);
    assert!(retryable);
    assert_eq!(after, Some(1_000));
    // A new direct conversation is not created by a limited send.
    assert_eq!(
        rejected(&s.send_to(1, "carol", "d1")).0,
        ErrorCode::RateLimited
    );
    // Resends of accepted messages are not new sends: they are not limited.
    assert!(s.send(1, "g", "m1").is_empty());
    // Per user: bob is not affected.
    assert!(s.send(2, "g", "b1").is_empty());
    let (batches, out) = s.flush();
    assert_eq!(batches[0].messages.len(), 3);
    assert!(
        batches[0].convs.is_empty(),
        "no direct conversation is created"
    );
    assert_eq!(batches[0].positions.len(), 1);
    assert_eq!(accepted(&out, 1).len(), 3);

    s.now = 1_000;
    assert!(s.send(1, "g", "m3").is_empty(), "a token came back");
    let (_, out) = s.flush();
    assert_eq!(accepted(&out, 1)[0].2, 4);
    assert_eq!(
        s.store.seqs("g"),
        vec![1, 2, 3, 4],
        "rejections left no hole"
    );
}

// Regressions: each test below once failed on a real defect of the core.

/// Regression: the first send of a direct conversation used to drop an impossible reply_to
/// silently instead of rejecting it (fixed in the working tree while these tests were written).
#[test]
fn reply_to_is_checked_on_the_first_direct_message_too() {
    let mut s = Sim::new(cfg());
    s.core.connect(1, "alice", "a1");
    let asked = s.core.send(
        1,
        SendRequest {
            conv: None,
            to: Some("bob"),
            cmid: "x".into(),
            body: "hi".into(),
            reply_to: Some(5),
        },
        s.now,
    );
    // The store is asked whether the conversation exists first.
    let out = s.answer_lookups(asked);
    assert_eq!(rejected(&out).0, ErrorCode::Invalid);
    assert!(s.core.take_batch().is_none(), "no conversation created");
}

/// The rate limit keeps a bucket per user who sends; those of users who left are forgotten once
/// they have refilled (a new one would be no different), so the buckets are bounded by the
/// users connected and recent, not by every user who ever sent. One who has not refilled is
/// kept: leaving and coming back does not reset a user's rate.
#[test]
fn rate_buckets_of_users_who_left_are_forgotten_once_refilled() {
    let mut s = one_per_second(2.0);
    for i in 0..3_000u64 {
        let sid = 100 + i;
        s.core.connect(sid, &format!("u{i}"), "d");
        assert!(s.send_to(sid, "alice", &format!("c{i}")).is_empty());
        s.core.disconnect(sid);
    }
    let _ = s.flush();
    assert!(
        s.core.stats().rate_buckets >= 3_000,
        "all kept while not refilled"
    );
    // Everyone refills (2 tokens at 1 a second); then u0 empties its bucket and leaves.
    s.now += 2_000;
    s.core.connect(50, "u0", "d");
    let mut n = 0;
    while s.send_to(50, "alice", &format!("more-{n}")).is_empty() {
        n += 1;
    }
    assert_eq!(n, 2, "the burst");
    s.core.disconnect(50);
    let _ = s.flush();
    // Not long enough for u0 to refill (1.5 of 2 tokens): it is kept through the prune that
    // a newcomer's first send makes.
    s.now += 1_500;
    s.core.connect(60, "newcomer", "d");
    assert!(s.send_to(60, "alice", "n1").is_empty());
    let kept = s.core.stats().rate_buckets;
    assert!(kept <= 2 + 1_024, "{kept} buckets kept");
    // Coming back does not reset u0's rate: one token and a half, not a fresh burst of two.
    s.core.connect(51, "u0", "d");
    assert!(s.send_to(51, "alice", "back-1").is_empty());
    assert_eq!(
        rejected(&s.send_to(51, "alice", "back-2")).0,
        ErrorCode::RateLimited,
        "coming back does not reset the rate"
    );
}
