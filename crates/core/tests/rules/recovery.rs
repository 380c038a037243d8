//! Restart and storage failure (G2, G3, G6 across crashes): a core rebuilt from its store keeps
//! seq numbering, cursors and dedup; a failed store tells every waiter to retry, and a rebuild
//! recovers.

use crate::support::*;
use ordo_core::{Action, Retention};
use ordo_protocol::{direct_conv_id, ErrorCode, ServerFrame};
use std::collections::HashMap;

#[test]
fn a_restarted_core_keeps_seq_numbering_cursors_and_dedup() {
    let mut s = alice_and_bob_in_g(cfg());
    let direct = direct_conv_id("alice", "bob");
    s.send(1, "g", "g1");
    s.send(1, "g", "g2");
    s.send_to(1, "bob", "d1");
    let (_, out) = s.flush();
    let original: HashMap<String, (String, u64, u64)> = accepted(&out, 1)
        .into_iter()
        .map(|(c, conv, seq, ts)| (c, (conv, seq, ts)))
        .collect();
    s.core.read(2, "g", 2).unwrap();
    s.flush();
    let epoch = info(&mut s, 1, "g").epoch;
    // A batch that never becomes durable, and a pending send: both lost in the crash.
    s.send(1, "g", "lost");
    let _lost = s.take();
    s.send(1, "g", "lost2");

    s.now += 60_000;
    s.restart(cfg());
    s.core.connect(11, "alice", "a1");
    s.core.connect(12, "bob", "b1");

    // Resends of durable messages are answered at once, as before.
    for cmid in ["g1", "g2", "d1"] {
        let target = &original[cmid].0;
        let out = if target == &direct {
            s.send_to(11, "bob", cmid)
        } else {
            s.send(11, target, cmid)
        };
        let (conv, seq, ts) = original[cmid].clone();
        assert_eq!(accepted(&out, 11), vec![(cmid.to_string(), conv, seq, ts)]);
    }
    assert!(s.core.take_batch().is_none());
    assert_eq!(rejected(&s.send(11, &direct, "g1")).0, ErrorCode::Invalid);

    // Numbering goes on from the durable max; the lost seq was never visible, so it is reused.
    s.send(11, "g", "lost");
    s.send(12, &direct, "d2");
    let (_, out) = s.flush();
    assert_eq!(accepted(&out, 11)[0].2, 3);
    assert_eq!(accepted(&out, 12)[0].2, 2);
    assert_eq!(s.store.seqs("g"), vec![1, 2, 3]);
    let i = info(&mut s, 12, "g");
    assert_eq!(i.epoch, epoch, "same history, same epoch");
    assert_eq!((i.delivered, i.read), (2, 2), "cursors survive");
    let bob = i.members.iter().find(|m| m.user == "bob").unwrap();
    assert_eq!((bob.delivered, bob.read), (2, 2));
    // Bob's durable cursor in g is 2, so 3 is pushed to his new session; in the direct
    // conversation he never acked seq 1, so he is told to pull instead of getting a gap.
    assert_eq!(msg_seqs(&out, 12), vec![3]);
    assert_eq!(notifies(&out, 12), vec![2]);

    // The restored dedup window still expires.
    s.core.expire_dedup(s.now + 10 * 24 * 60 * 60 * 1000);
    let b = s.take();
    assert!(b.dedup_forget_before_ms.is_some());
    s.commit(&b);
    assert!(s.store.dedup.is_empty());
}

#[test]
fn abort_all_tells_every_waiter_to_retry_and_a_rebuild_recovers() {
    let mut s = alice_alone_in_g(cfg());
    s.send(1, "g", "m1");
    s.flush();
    s.send(1, "g", "x");
    let _in_flight = s.take();
    s.send(1, "g", "y");
    s.send(1, "g", "x"); // a duplicate waiting too
    s.create_group(5, "h", &["alice"], Retention::default());
    let out = s.core.abort_all("disk full");
    let mut rejected_cmids = Vec::new();
    for f in frames(&out, 1) {
        match f {
            ServerFrame::Rejected {
                cmid,
                code,
                retryable,
                retry_after_ms,
                ..
            } => {
                assert_eq!(code, ErrorCode::Unavailable);
                assert!(retryable);
                assert!(retry_after_ms.is_some());
                rejected_cmids.push(cmid);
            }
            f => panic!("unexpected {f:?}"),
        }
    }
    rejected_cmids.sort();
    assert_eq!(rejected_cmids, vec!["x", "x", "y"]);
    assert!(out.iter().any(|a| matches!(
        a,
        Action::AdminDone {
            ticket: 5,
            reply: Err(_)
        }
    )));
    assert!(!s.core.in_flight());
    assert!(s.core.take_batch().is_none());

    // The caller rebuilds from the store: x and y are new messages, numbered after m1.
    s.restart(cfg());
    s.core.connect(2, "alice", "a1");
    s.send(2, "g", "y");
    s.send(2, "g", "x");
    let (_, out) = s.flush();
    assert_eq!(
        accepted(&out, 2)
            .into_iter()
            .map(|a| (a.0, a.2))
            .collect::<Vec<_>>(),
        vec![("y".to_string(), 2), ("x".to_string(), 3)]
    );
    assert!(!s.store.convs.contains_key("h"));
}

/// While the store cannot be reached, the batch in flight waits (its senders get `accepted`
/// only once it commits), new messages are refused with `unavailable` and a retry time, held
/// back so that resending keeps the order, and resends of durable messages are still answered.
#[test]
fn while_the_store_is_unreachable_new_sends_are_refused_in_order_and_the_batch_waits() {
    let mut s = alice_and_bob_in_g(cfg());
    s.send(1, "g", "m1");
    s.flush();
    s.send(1, "g", "m2");
    let in_flight = s.take();
    // The commit failed because the database is gone; the server retries the same batch.
    s.core.set_store_reachable(Err("connection refused".into()));

    // A resend of a durable message is answered from the cache.
    let out = s.send(1, "g", "m1");
    assert_eq!(accepted(&out, 1).len(), 1);
    // A new message is refused for now, with a time to retry after.
    let out = s.send(1, "g", "m3");
    assert_eq!(rejected(&out), (ErrorCode::Unavailable, true, Some(1000)));
    // The next one into the same conversation waits behind it, to keep the order.
    let out = s.send(1, "g", "m4");
    assert_eq!(rejected(&out).0, ErrorCode::Unavailable);
    // A resend of the message in flight waits for it.
    assert!(s.send(1, "g", "m2").is_empty());
    // A backend post is refused too.
    let post = ordo_core::AdminPost {
        conv: Some("g".into()),
        to: None,
        from: None,
        cmid: "p1".into(),
        body: "hello".into(),
        reply_to: None,
    };
    let out = s.core.post(9, post.clone(), s.now);
    assert!(matches!(
        &out[..],
        [Action::Posted { reply: Err(e), .. }] if e.code() == ErrorCode::Unavailable
    ));

    // The retried commit goes through: both copies of m2 are answered with one seq.
    s.core.set_store_reachable(Ok(()));
    let mut out = s.commit(&in_flight);
    let (batches, more) = s.flush();
    out.extend(more);
    assert!(
        batches.iter().all(|b| b.messages.is_empty()),
        "nothing new was taken"
    );
    let got = accepted(&out, 1);
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|(c, _, seq, _)| c == "m2" && *seq == 2));
    // m4 still waits for m3 to be resent; then both go, in order.
    assert_eq!(rejected(&s.send(1, "g", "m4")).0, ErrorCode::Unavailable);
    s.send(1, "g", "m3");
    s.send(1, "g", "m4");
    let (_, out) = s.flush();
    let order: Vec<(String, u64)> = accepted(&out, 1)
        .into_iter()
        .map(|(c, _, seq, _)| (c, seq))
        .collect();
    assert_eq!(order, vec![("m3".into(), 3), ("m4".into(), 4)]);
    assert_eq!(s.store.seqs("g"), vec![1, 2, 3, 4]);
    // The post goes through now.
    let out = s.core.post(10, post, s.now);
    s.answer_lookups(out);
    let (_, out) = s.flush();
    assert!(out
        .iter()
        .any(|a| matches!(a, Action::Posted { reply: Ok(p), .. } if p.seq == 5)));
}
