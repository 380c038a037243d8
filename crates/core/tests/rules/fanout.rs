//! Fan-out: every online device of every member gets each durable message (`msg`) in seq
//! order; past the push window, or behind, a device gets one `notify` and syncs; large groups
//! get pushes without receipts; sync plans never reach past what is durable.

use crate::support::*;
use ordo_core::{CoreConfig, Retention, SyncPlan};
use ordo_protocol::ServerFrame;

/// A fresh connection counts as caught up to its stored delivered position, even when its
/// first contact with the conversation is a partial sync of older history.
#[test]
fn a_partial_sync_does_not_lower_the_push_position_below_the_stored_one() {
    let mut s = alice_and_bob_in_g(cfg());
    s.send(1, "g", "m1");
    s.send(1, "g", "m2");
    s.flush();
    s.core.read(2, "g", 2).unwrap();
    s.flush();
    s.core.disconnect(2);
    s.core.connect(3, "bob", "b1");
    let plan = s.core.sync(3, "g", 0, Some(1)).unwrap();
    assert_eq!((plan.from, plan.to, plan.limit), (1, 2, 1));
    assert!(s.core.sync_served(3, "g", 1, true).is_empty());
    s.send(1, "g", "m3");
    let (_, out) = s.flush();
    assert_eq!(msg_seqs(&out, 3), vec![3], "pushed, not notified");
    assert!(notifies(&out, 3).is_empty());
}

#[test]
fn every_online_device_of_every_member_gets_msg_in_seq_order() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob", "carol"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "alice", "a2");
    s.core.connect(3, "bob", "b1");
    s.core.connect(4, "bob", "b2");
    s.core.connect(5, "dave", "d1"); // not a member; carol is offline
    let mut out = Vec::new();
    s.send(1, "g", "a-1");
    s.send(3, "g", "b-1");
    s.send(1, "g", "a-2");
    let b = s.take();
    s.send(4, "g", "b-2");
    s.send(2, "g", "a-3");
    out.extend(s.commit(&b));
    out.extend(s.flush().1);
    for sid in 1..=4 {
        assert_eq!(msg_seqs(&out, sid), vec![1, 2, 3, 4, 5], "session {sid}");
        for f in frames(&out, sid) {
            if let ServerFrame::Msg(m) = f {
                assert_eq!(Some(&*m), s.store.message("g", m.seq), "as stored");
            }
        }
        assert!(notifies(&out, sid).is_empty());
    }
    assert!(frames(&out, 5).is_empty());
    assert_eq!(s.core.stats().pushed, 20);
    // `accepted` comes before the pushes of the same commit.
    let first = frames(&out, 1);
    assert!(matches!(first[0], ServerFrame::Accepted { .. }));
}

#[test]
fn past_the_push_window_a_device_gets_one_notify_until_it_syncs() {
    let mut s = alice_and_bob_in_g(CoreConfig {
        push_window: 3,
        ..cfg()
    });
    let mut out = Vec::new();
    for i in 1..=6 {
        s.send(1, "g", &format!("m{i}"));
        out.extend(s.flush().1);
    }
    assert_eq!(msg_seqs(&out, 2), vec![1, 2, 3]);
    assert_eq!(
        notifies(&out, 2),
        vec![4],
        "one notify, not one per message"
    );
    // The sender's own device is a device like any other.
    assert_eq!(msg_seqs(&out, 1), vec![1, 2, 3]);
    assert_eq!(notifies(&out, 1), vec![4]);
    // An ack alone does not reset the notify: the device was told to sync.
    s.core.ack(2, "g", 3).unwrap();
    s.send(1, "g", "m7");
    let out = s.flush().1;
    assert!(frames(&out, 2)
        .iter()
        .all(|f| !matches!(f, ServerFrame::Msg(_) | ServerFrame::Notify { .. })));

    // Bob syncs everything and acks it: pushes resume.
    let plan = s.core.sync(2, "g", 3, None).unwrap();
    assert_eq!((plan.from, plan.to), (4, 7));
    let got = s.store.read(&plan);
    assert_eq!(
        got.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![4, 5, 6, 7]
    );
    assert!(s.core.sync_served(2, "g", 7, false).is_empty());
    s.core.ack(2, "g", 7).unwrap();
    s.send(1, "g", "m8");
    let out = s.flush().1;
    assert_eq!(msg_seqs(&out, 2), vec![8]);
    assert!(notifies(&out, 2).is_empty());

    // Without acking, the window fills again and one notify follows.
    let mut out = Vec::new();
    for i in 9..=14 {
        s.send(1, "g", &format!("m{i}"));
        out.extend(s.flush().1);
    }
    assert_eq!(msg_seqs(&out, 2), vec![9, 10]);
    assert_eq!(notifies(&out, 2), vec![11]);
}

#[test]
fn a_whole_batch_past_the_window_gives_one_notify_with_the_batch_max() {
    let mut s = alice_and_bob_in_g(CoreConfig {
        push_window: 2,
        ..cfg()
    });
    s.send_many(1, "g", 1..=5);
    let (batches, out) = s.flush();
    assert_eq!(batches.len(), 1);
    assert_eq!(msg_seqs(&out, 2), vec![1, 2]);
    assert_eq!(notifies(&out, 2), vec![5]);
    assert_eq!(s.core.stats().notified, 2);
}

#[test]
fn groups_larger_than_receipt_max_members_get_pushes_but_no_receipts() {
    let mut s = big_and_small();
    let mut out = Vec::new();
    for i in 1..=3 {
        s.send(1, "big", &format!("big{i}"));
        s.send(1, "small", &format!("small{i}"));
        out.extend(s.flush().1);
    }
    // Every member of both groups is pushed every message, in order.
    for conv in ["big", "small"] {
        let seqs: Vec<u64> = frames(&out, 2)
            .into_iter()
            .filter_map(|f| match f {
                ServerFrame::Msg(m) if m.conv == conv => Some(m.seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, vec![1, 2, 3], "{conv}");
    }
    // bob's acks move receipts in the small group only.
    s.core.ack(2, "big", 3).unwrap();
    s.core.ack(2, "small", 3).unwrap();
    let out = s.flush().1;
    let receipts: Vec<String> = frames(&out, 1)
        .into_iter()
        .filter_map(|f| match f {
            ServerFrame::Receipt { conv, .. } => Some(conv),
            _ => None,
        })
        .collect();
    assert_eq!(receipts, vec!["small".to_string()]);
    // The big group's positions are still in the overview, as the lowest of the others'
    // (carol has nothing), its members too many to list.
    let big = s.overview(1).into_iter().find(|c| c.conv == "big").unwrap();
    assert!(big.members.is_empty());
    assert_eq!(big.others_delivered, 0);
    let big = s.overview(2).into_iter().find(|c| c.conv == "big").unwrap();
    assert_eq!(big.delivered, 3, "bob's own position");
}

#[test]
fn sync_plans_and_sync_served_notify_a_device_left_behind() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.send_many(1, "g", 1..=5);
    s.flush();
    s.core.connect(2, "bob", "b1");
    let epoch = info(&mut s, 2, "g").epoch;

    let plan = s.core.sync(2, "g", 0, Some(2)).unwrap();
    assert_eq!(
        plan,
        SyncPlan {
            conv: "g".into(),
            epoch,
            from: 1,
            to: 5,
            limit: 2
        }
    );
    assert_eq!(s.core.sync(2, "g", 0, None).unwrap().limit, 100);
    assert_eq!(s.core.sync(2, "g", 0, Some(5_000)).unwrap().limit, 1_000);

    assert!(
        s.core.sync_served(2, "g", 2, true).is_empty(),
        "it asks again"
    );
    s.core.sync(2, "g", 2, Some(2)).unwrap();
    // The server stops early without has_more: the device is still behind and is told.
    let out = s.core.sync_served(2, "g", 4, false);
    assert_eq!(
        frames(&out, 2),
        vec![ServerFrame::Notify {
            conv: "g".into(),
            max_seq: 5
        }]
    );
    s.core.sync(2, "g", 4, None).unwrap();
    assert!(s.core.sync_served(2, "g", 5, false).is_empty(), "caught up");
    // Caught up: the next message is pushed.
    s.send(1, "g", "m6");
    let out = s.flush().1;
    assert_eq!(msg_seqs(&out, 2), vec![6]);

    // A plan never reaches past what is durable.
    s.send(1, "g", "m7");
    let b = s.take();
    assert_eq!(s.core.sync(2, "g", 6, None).unwrap().to, 6);
    s.commit(&b);
    assert_eq!(s.core.sync(2, "g", 6, None).unwrap().to, 7);
}

#[test]
fn a_device_that_was_offline_gets_notify_not_a_gap() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.send_many(1, "g", 1..=3);
    s.flush();
    s.core.connect(2, "bob", "b1");
    s.send(1, "g", "m4");
    let out = s.flush().1;
    assert!(msg_seqs(&out, 2).is_empty(), "4 would leave 1..3 as a gap");
    assert_eq!(notifies(&out, 2), vec![4]);

    // A device that acked everything before reconnecting is pushed at once.
    s.core.disconnect(2);
    s.core.connect(3, "bob", "b1");
    s.core.ack(3, "g", 4).unwrap();
    s.flush();
    s.core.disconnect(3);
    s.core.connect(4, "bob", "b1");
    s.send(1, "g", "m5");
    let out = s.flush().1;
    assert_eq!(msg_seqs(&out, 4), vec![5]);
    assert!(frames(&out, 2).is_empty() && frames(&out, 3).is_empty());
}

#[test]
fn a_push_the_driver_could_not_queue_stops_pushes_until_the_device_syncs() {
    let mut s = alice_and_bob_in_g(cfg());
    s.send_many(1, "g", 1..=3);
    let out = s.flush().1;
    assert_eq!(msg_seqs(&out, 2), vec![1, 2, 3]);
    // bob's queue took 1 only: 2 and 3 were not sent.
    s.core.push_missed(2, "g", 2);
    s.core.push_missed(2, "g", 3);
    s.send(1, "g", "m4");
    let out = s.flush().1;
    assert!(
        frames(&out, 2).is_empty(),
        "no gap pushed, and the notify is the driver's to send: {out:?}"
    );
    // bob syncs from 1 (after the driver's notify): pushes resume after what it was served.
    s.core.sync(2, "g", 1, None).unwrap();
    assert!(s.core.sync_served(2, "g", 4, false).is_empty(), "caught up");
    s.send(1, "g", "m5");
    let out = s.flush().1;
    assert_eq!(msg_seqs(&out, 2), vec![5]);
    // A session or conversation it does not know is no matter.
    s.core.push_missed(99, "g", 1);
    s.core.push_missed(2, "nowhere", 1);
}
