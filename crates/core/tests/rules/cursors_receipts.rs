//! Cursors and G7 receipts: acks and reads are cumulative, clamped to what is durable and never
//! go back; receipts go to the members at commit with the user's maximum over devices, report
//! only durable positions, and are monotone for every observer, across crashes too.

use crate::support::*;
use ordo_core::{Batch, Retention};
use std::collections::HashMap;

fn cursor_in(b: &Batch, user: &str, device: &str) -> Option<(u64, u64)> {
    b.cursors
        .iter()
        .find(|c| c.user == user && c.device == device)
        .map(|c| (c.delivered, c.read))
}

#[test]
fn acks_are_cumulative_clamped_to_durable_and_never_go_back() {
    let mut s = alice_and_bob_in_g(cfg());
    s.send_many(1, "g", 1..=3);
    s.flush();
    s.send(1, "g", "m4");
    let b = s.take(); // seq 4 assigned, not durable

    s.core.ack(2, "g", 10).unwrap();
    s.commit(&b);
    let (batches, _) = s.flush();
    assert_eq!(cursor_in(&batches[0], "bob", "b1"), Some((3, 0)), "clamped");
    assert_eq!(info(&mut s, 2, "g").delivered, 3);

    s.core.ack(2, "g", 1).unwrap();
    s.core.sync(2, "g", 0, None).unwrap();
    assert!(s.core.take_batch().is_none(), "going back changes nothing");
    assert_eq!(info(&mut s, 2, "g").delivered, 3);

    s.core.ack(2, "g", 4).unwrap();
    let (batches, _) = s.flush();
    assert_eq!(cursor_in(&batches[0], "bob", "b1"), Some((4, 0)));
    // A sync's `after` is an ack too.
    s.send(1, "g", "m5");
    s.flush();
    s.core.sync(2, "g", 5, None).unwrap();
    let (batches, _) = s.flush();
    assert_eq!(cursor_in(&batches[0], "bob", "b1"), Some((5, 0)));
    assert_eq!(s.store.cursors.len(), 1);
}

#[test]
fn receipts_go_to_members_at_commit_with_the_user_max_over_devices() {
    let mut s = alice_and_bob_in_g(cfg());
    s.core.connect(3, "bob", "b2");
    s.core.connect(4, "carol", "c1");
    s.send_many(1, "g", 1..=5);
    s.flush();

    s.core.ack(2, "g", 3).unwrap();
    let b = s.take();
    assert_eq!(cursor_in(&b, "bob", "b1"), Some((3, 0)));
    let out = s.commit(&b);
    for sid in [1, 2, 3] {
        assert_eq!(
            receipts(&out, sid),
            vec![("bob".to_string(), 3, 0)],
            "{sid}"
        );
    }
    assert!(frames(&out, 4).is_empty(), "not to non-members");

    // Another device behind the user's max: stored, but the user's receipt does not move.
    s.core.ack(3, "g", 2).unwrap();
    let (batches, out) = s.flush();
    assert_eq!(cursor_in(&batches[0], "bob", "b2"), Some((2, 0)));
    assert!(receipts(&out, 1).is_empty());

    s.core.ack(3, "g", 5).unwrap();
    let (_, out) = s.flush();
    assert_eq!(receipts(&out, 1), vec![("bob".to_string(), 5, 0)]);

    s.core.read(2, "g", 4).unwrap();
    let (_, out) = s.flush();
    assert_eq!(receipts(&out, 1), vec![("bob".to_string(), 5, 4)]);

    s.core.read(2, "g", 2).unwrap();
    let (batches, out) = s.flush();
    assert!(batches.is_empty() && out.is_empty(), "read never goes back");

    let i = info(&mut s, 1, "g");
    let bob = i.members.iter().find(|m| m.user == "bob").unwrap();
    assert_eq!((bob.delivered, bob.read), (5, 4));
    let alice = i.members.iter().find(|m| m.user == "alice").unwrap();
    assert_eq!((alice.delivered, alice.read), (0, 0));
    assert_eq!((i.delivered, i.read), (0, 0), "alice's device positions");
}

#[test]
fn read_implies_delivered_and_is_clamped_to_durable() {
    let mut s = alice_and_bob_in_g(cfg());
    s.send_many(1, "g", 1..=3);
    s.flush();
    s.core.read(2, "g", 2).unwrap();
    let (batches, out) = s.flush();
    assert_eq!(cursor_in(&batches[0], "bob", "b1"), Some((2, 2)));
    assert_eq!(receipts(&out, 1), vec![("bob".to_string(), 2, 2)]);
    s.core.read(2, "g", 99).unwrap();
    let (batches, out) = s.flush();
    assert_eq!(cursor_in(&batches[0], "bob", "b1"), Some((3, 3)));
    assert_eq!(receipts(&out, 1), vec![("bob".to_string(), 3, 3)]);
    let i = info(&mut s, 2, "g");
    assert_eq!((i.delivered, i.read), (3, 3));
}

#[test]
fn receipts_are_monotone_for_every_observer() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob", "carol"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    s.core.connect(3, "bob", "b2");
    s.core.connect(4, "carol", "c1");
    let mut out = Vec::new();
    for i in 1..=8u64 {
        s.send(1, "g", &format!("m{i}"));
        out.extend(s.flush().1);
        // Devices ack and read out of order, sometimes behind.
        let _ = s.core.ack(2 + (i % 2), "g", i.saturating_sub(i % 3));
        let _ = s.core.read(4, "g", i / 2);
        let _ = s.core.read(3, "g", i.saturating_sub(4));
        out.extend(s.flush().1);
    }
    for sid in 1..=4 {
        let mut last: HashMap<String, (u64, u64)> = HashMap::new();
        for (user, d, r) in receipts(&out, sid) {
            let prev = last.insert(user.clone(), (d, r)).unwrap_or((0, 0));
            assert!(
                d >= prev.0 && r >= prev.1,
                "{sid} {user}: {prev:?} -> {d},{r}"
            );
            assert!(r <= d, "read implies delivered");
        }
        assert!(last.contains_key("bob") && last.contains_key("carol"));
    }
}

// Regressions: each test below once failed on a real defect of the core.

/// `publish_receipt` reads the live in-memory cursors, which already include acks whose batch
/// is not yet durable. A receipt released by the commit of batch N reports positions that only
/// batch N+1 will store.
#[test]
fn a_receipt_reports_only_durable_positions() {
    let mut s = alice_and_bob_in_g(cfg());
    s.send_many(1, "g", 1..=3);
    s.flush();
    s.core.ack(2, "g", 1).unwrap();
    let b1 = s.take();
    assert_eq!(cursor_in(&b1, "bob", "b1"), Some((1, 0)));
    s.core.ack(2, "g", 3).unwrap(); // joins the next batch
    let out = s.commit(&b1);
    assert_eq!(
        receipts(&out, 1),
        vec![("bob".to_string(), 1, 0)],
        "batch {} stored delivered=1; delivered=3 is not durable",
        b1.id
    );
}

/// The consequence of the bug above across a crash: the sender sees bob's delivered position
/// go 3 -> 2, breaking G7 (cumulative and monotone).
#[test]
fn receipts_never_go_back_across_a_crash() {
    let mut s = alice_and_bob_in_g(cfg());
    s.send_many(1, "g", 1..=3);
    s.flush();
    let mut seen = Vec::new();
    s.core.ack(2, "g", 1).unwrap();
    let b1 = s.take();
    s.core.ack(2, "g", 3).unwrap();
    seen.extend(receipts(&s.commit(&b1), 1));
    // Crash before the batch holding delivered=3 is taken.
    s.restart(cfg());
    s.core.connect(11, "alice", "a1");
    s.core.connect(12, "bob", "b1");
    s.warm("g");
    s.core.ack(12, "g", 2).unwrap();
    seen.extend(receipts(&s.flush().1, 11));
    let delivered: Vec<u64> = seen.iter().map(|r| r.1).collect();
    assert!(
        delivered.windows(2).all(|w| w[0] <= w[1]),
        "alice saw bob's delivered position go back: {delivered:?}"
    );
}
