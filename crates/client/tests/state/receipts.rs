//! Receipts and reads: other members' positions (by receipt or overview) move our messages to
//! Delivered and Read, and `mark_read` stores the read position before telling the server.

use crate::support::*;
use ordo_client::{ClientConfig, Effect, Event, Status, StoreOp};
use ordo_protocol::{ClientFrame, ErrorCode, ServerFrame};

#[test]
fn receipts_move_our_messages_to_delivered_then_read_once_every_other_member_got_there() {
    let mut c = Tc::online("alice");
    let members = [("alice", 0, 0), ("bob", 0, 0), ("carol", 0, 0)];
    assert!(wire(&c.frame(overview(vec![info(TEAM, 0, 0, 0, &members)]), 1)).is_empty());
    let (a, _) = c.send(team(), "a", 2);
    c.frame(accepted(&a, TEAM, 1), 3);
    let (b, _) = c.send(team(), "b", 4);
    c.frame(accepted(&b, TEAM, 2), 5);

    let fx = c.frame(receipt(TEAM, "bob", 2, 0), 6);
    assert_eq!(
        fx,
        vec![Effect::Event(Event::Receipt {
            conv: TEAM.into(),
            user: "bob".into(),
            delivered: 2,
            read: 0
        })],
        "carol has nothing yet"
    );
    assert!(
        statuses(&c.frame(receipt(TEAM, "alice", 2, 2), 7)).is_empty(),
        "our own positions do not count"
    );
    let fx = c.frame(receipt(TEAM, "carol", 1, 0), 8);
    assert_eq!(statuses(&fx), vec![(a.clone(), Status::Delivered)]);
    let stored_at = fx
        .iter()
        .position(|e| {
            *e == Effect::Persist(vec![StoreOp::PutSent {
                conv: TEAM.into(),
                seq: 1,
                cmid: a.clone(),
                status: Status::Delivered,
            }])
        })
        .expect("the status is stored");
    let told_at = fx
        .iter()
        .position(|e| matches!(e, Effect::Event(Event::Status { .. })))
        .expect("and told");
    assert!(stored_at < told_at);

    let fx = c.frame(receipt(TEAM, "carol", 2, 2), 9);
    assert_eq!(
        statuses(&fx),
        vec![(b.clone(), Status::Delivered)],
        "bob has read nothing"
    );
    let fx = c.frame(receipt(TEAM, "bob", 2, 1), 10);
    assert_eq!(statuses(&fx), vec![(a.clone(), Status::Read)]);
    let fx = c.frame(receipt(TEAM, "bob", 2, 2), 11);
    assert_eq!(statuses(&fx), vec![(b.clone(), Status::Read)]);
    assert!(statuses(&c.frame(receipt(TEAM, "bob", 2, 2), 12)).is_empty());
    assert!(c.db.sent.values().all(|s| s.status == Status::Read));
}

#[test]
fn an_overview_moves_statuses_too() {
    let mut c = Tc::online("alice");
    let (a, _) = c.send(team(), "a", 1);
    c.frame(accepted(&a, TEAM, 4), 2);
    let fx = c.frame(
        overview(vec![info(
            TEAM,
            4,
            0,
            0,
            &[("alice", 4, 4), ("bob", 4, 4), ("carol", 5, 4)],
        )]),
        3,
    );
    assert_eq!(statuses(&fx), vec![(a, Status::Read)]);
}

#[test]
fn a_group_too_large_to_list_moves_statuses_by_the_aggregates() {
    let mut c = Tc::online("alice");
    let (a, _) = c.send(team(), "a", 1);
    c.frame(accepted(&a, TEAM, 4), 2);
    let (b, _) = c.send(team(), "b", 3);
    c.frame(accepted(&b, TEAM, 5), 4);
    let mut big = info(TEAM, 5, 0, 0, &[]);
    big.member_count = 5_000;
    big.others_delivered = 5;
    big.others_read = 4;
    let fx = c.frame(overview(vec![big]), 5);
    assert_eq!(
        statuses(&fx),
        vec![(a, Status::Read), (b, Status::Delivered)],
        "every other member has 5 and has read 4"
    );
}

#[test]
fn an_overview_is_asked_for_page_after_page() {
    let mut c = Tc::online("alice");
    let (a, _) = c.send(team(), "a", 1);
    c.frame(accepted(&a, TEAM, 1), 2);
    let first = ServerFrame::Convs {
        conversations: vec![info("other", 0, 0, 0, &[("alice", 0, 0)])],
        has_more: true,
    };
    assert_eq!(wire(&c.frame(first, 3)), vec!["convs >other"]);
    let last = overview(vec![info(TEAM, 1, 1, 1, &[("alice", 1, 1), ("bob", 1, 1)])]);
    let fx = c.frame(last, 4);
    assert_eq!(statuses(&fx), vec![(a, Status::Read)]);
    assert!(
        !wire(&fx).iter().any(|f| f.starts_with("convs")),
        "no page follows the last: {:?}",
        wire(&fx)
    );
    // The overview is finished: a receipt from a member not listed asks again.
    assert_eq!(
        wire(&c.frame(receipt(TEAM, "carol", 1, 1), 5)),
        vec!["convs"]
    );
    // An overview refused is asked again on the next reason.
    let refused = ServerFrame::error_about(ErrorCode::Unavailable, "busy", "convs", None);
    c.frame(refused, 6);
    assert_eq!(
        wire(&c.frame(receipt(TEAM, "dave", 1, 1), 7)),
        vec!["convs"]
    );
}

#[test]
fn mark_read_stores_then_transmits_a_read_clamped_to_what_is_stored() {
    let mut c = Tc::online("alice");
    for s in 1..=3 {
        c.frame(push(TEAM, s), s);
    }
    let fx = {
        c.st.mark_read(TEAM, 10);
        c.take()
    };
    assert_eq!(
        fx,
        vec![
            Effect::Persist(vec![StoreOp::SetRead {
                conv: TEAM.into(),
                seq: 3
            }]),
            Effect::Transmit(ClientFrame::Read {
                conv: TEAM.into(),
                seq: 3
            }),
        ]
    );
    c.st.mark_read(TEAM, 2);
    assert!(c.take().is_empty(), "a read never goes back");
    c.st.mark_read(TEAM, 3);
    assert!(c.take().is_empty());
    c.st.mark_read("unknown", 5);
    assert!(c.take().is_empty(), "nothing stored, nothing read");

    // Offline: stored now, told once the overview shows the server lacks it.
    c.frame(push(TEAM, 4), 4);
    c.frame(push(TEAM, 5), 5);
    c.st.disconnected();
    c.take();
    c.st.mark_read(TEAM, 5);
    assert_eq!(
        c.take(),
        vec![Effect::Persist(vec![StoreOp::SetRead {
            conv: TEAM.into(),
            seq: 5
        }])]
    );
    let fx = c.connect(100);
    assert_eq!(wire(&fx), vec!["convs"]);
    let fx = c.frame(overview(vec![info(TEAM, 5, 5, 3, &[])]), 101);
    assert_eq!(wire(&fx), vec!["read team:5"]);
    // The server has it: no resend on the next overview.
    let fx = c.frame(overview(vec![info(TEAM, 5, 5, 5, &[])]), 102);
    assert!(wire(&fx).is_empty());
}

// Regressions: each test below once failed on a defect of the client state machine.

/// Before the client has an overview of a conversation (after a restart, until the `convs`
/// answer arrives; or for a group created since the last overview), it takes the members to be
/// the users it has seen receipts from. One member's receipt then marks our message Delivered
/// (or Read) although other members have not got it, and the status never goes back.
#[test]
fn a_receipt_before_the_overview_does_not_mark_a_group_message_delivered() {
    let mut first = Tc::online("alice");
    let (a, _) = first.send(team(), "a", 1);
    first.frame(accepted(&a, TEAM, 1), 2);
    let mut c = Tc::restarted(ClientConfig::default(), first.db.clone());
    c.connect(10);
    c.frame(welcome("alice"), 11);
    // Bob's delivery is committed between our connect and the server's answer to `convs`.
    let mut fx = c.frame(receipt(TEAM, "bob", 1, 1), 12);
    fx.extend(c.frame(
        overview(vec![info(
            TEAM,
            1,
            0,
            0,
            &[("alice", 1, 1), ("bob", 1, 1), ("carol", 0, 0)],
        )]),
        13,
    ));
    assert_eq!(
        statuses(&fx),
        vec![],
        "carol has not received seq 1, yet it is reported as"
    );
}
