//! Crash recovery: a client rebuilt from what its store holds keeps its outbox, positions and
//! statuses, and acknowledges what it stored before the crash.

use crate::support::*;
use ordo_client::{ClientConfig, Status, Target};

#[test]
fn a_restart_from_the_store_keeps_the_outbox_positions_and_statuses() {
    // A first life: two messages pending, five received, three read, one sent message.
    let mut first = Tc::online("alice");
    first.frame(notify(TEAM, 5), 1);
    first.frame(synced(TEAM, EPOCH, 1..=5, 1, 5, false), 2);
    first.st.mark_read(TEAM, 3);
    let (s, _) = first.send(team(), "sent", 3);
    first.frame(accepted(&s, TEAM, 6), 4);
    first.frame(push(TEAM, 6), 5);
    let (a, _) = first.send(team(), "a", 6);
    let (b, _) = first.send(Target::User("bob".into()), "b", 7);
    first.take();

    let mut c = Tc::restarted(ClientConfig::default(), first.db.clone());
    assert_eq!(c.st.contiguous(TEAM), 6);
    assert_eq!(
        c.st.outbox()
            .iter()
            .map(|p| p.cmid.clone())
            .collect::<Vec<_>>(),
        vec![a.clone(), b.clone()]
    );
    assert!(
        wire(&c.tick(1_000_000)).is_empty(),
        "offline: nothing goes out"
    );
    let fx = c.connect(2_000_000);
    assert_eq!(
        wire(&fx),
        vec![format!("send {a}"), format!("send {b}"), "convs".into()]
    );
    c.frame(welcome("alice"), 2_000_001);
    assert!(
        c.frame(push(TEAM, 6), 2_000_002).is_empty(),
        "6 was stored before"
    );
    let fx = c.frame(
        overview(vec![info(TEAM, 6, 6, 3, &[("alice", 6, 3), ("bob", 6, 0)])]),
        2_000_003,
    );
    assert!(wire(&fx).is_empty(), "caught up, read known: {fx:?}");
    assert_eq!(
        statuses(&fx),
        vec![(s, Status::Delivered)],
        "our stored sent message moves on"
    );
    c.st.mark_read(TEAM, 3);
    assert!(c.take().is_empty(), "the read position was kept");
    assert_eq!(handed(&c.frame(push(TEAM, 7), 2_000_004)), vec![7]);
    assert_eq!(c.frame(accepted(&a, TEAM, 8), 2_000_005).len(), 2);
}

// Regressions: each test below once failed on a defect of the client state machine.

/// As `acks::a_delivery_position_cut_off_by_a_disconnect_reaches_the_server_after_reconnecting`,
/// after a restart: what was stored but not yet acknowledged before the crash is acknowledged
/// once the overview shows the server lacks it.
#[test]
fn a_restarted_client_acknowledges_what_it_stored_before_the_crash() {
    let mut first = Tc::online("alice");
    first.frame(push(TEAM, 1), 100);
    first.frame(push(TEAM, 2), 110);
    // Crash before the ack at 300.
    let mut c = Tc::restarted(ClientConfig::default(), first.db.clone());
    c.connect(1_000);
    c.frame(welcome("alice"), 1_001);
    c.frame(overview(vec![info(TEAM, 2, 0, 0, &[])]), 1_002);
    assert_eq!(told_delivered(&mut c, 1_002..20_000), 2);
}
