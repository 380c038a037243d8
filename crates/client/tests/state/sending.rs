//! Sending: the pending message stored before it is transmitted, valid and unique client
//! message ids, the outbox resent in order on every connection, resends on the retry policy
//! until the message fails, retryable and final rejections, and `accepted`.

use crate::support::*;
use ordo_client::{
    ClientConfig, ClientSnapshot, ClientState, Effect, Event, Pending, Status, StoreOp, Target,
};
use ordo_protocol::{direct_conv_id, validate_id, ClientFrame, ErrorCode, IdKind};
use std::collections::HashSet;

/// The effects fail `cmid`, a message to `TEAM`: it leaves the outbox, then the app is told
/// why (the reason contains `why`), and nothing else happens.
#[track_caller]
fn assert_fails(fx: &[Effect], cmid: &str, why: &str) {
    assert_eq!(fx.len(), 2, "{fx:?}");
    assert_eq!(
        fx[0],
        Effect::Persist(vec![StoreOp::RemovePending(cmid.to_string())])
    );
    assert!(
        matches!(&fx[1], Effect::Event(Event::Status { cmid: c, conv: Some(conv), status: Status::Failed(reason) })
            if c == cmid && conv == TEAM && reason.contains(why)),
        "{:?}",
        fx[1]
    );
}

#[test]
fn send_stores_the_pending_message_before_transmitting_it() {
    let mut c = Tc::online("alice");
    let (cmid, fx) = c.send(team(), "hello", 10);
    validate_id(IdKind::ClientMessage, &cmid).expect("a valid client message id");
    assert_eq!(
        fx,
        vec![
            Effect::Persist(vec![StoreOp::PutPending(Pending {
                cmid: cmid.clone(),
                target: team(),
                body: "hello".into(),
                reply_to: None,
                attempts: 0,
                due_ms: 0,
                in_flight: false,
            })]),
            Effect::Event(Event::Status {
                cmid: cmid.clone(),
                conv: Some(TEAM.into()),
                status: Status::Pending,
            }),
            Effect::Transmit(send_frame(Some(TEAM), None, &cmid, "hello")),
        ]
    );
    assert_eq!(c.db.outbox.len(), 1);

    // To a user: the frame names `to`, the status has no conversation yet; reply_to goes along.
    let cmid =
        c.st.send(Target::User("bob".into()), "hi".into(), Some(3), 20);
    let fx = c.take();
    assert!(
        matches!(&fx[0], Effect::Persist(ops) if matches!(&ops[..], [StoreOp::PutPending(p)] if p.cmid == cmid))
    );
    assert_eq!(
        fx[1],
        Effect::Event(Event::Status {
            cmid: cmid.clone(),
            conv: None,
            status: Status::Pending
        })
    );
    assert_eq!(
        fx[2],
        Effect::Transmit(ClientFrame::Send {
            conv: None,
            to: Some("bob".into()),
            cmid,
            body: "hi".into(),
            reply_to: Some(3),
        })
    );
}

#[test]
fn client_message_ids_are_valid_and_unique_even_for_the_longest_device_id() {
    let device = "d".repeat(128);
    let mut st = ClientState::new(
        ClientConfig::default(),
        &device,
        9,
        ClientSnapshot::default(),
    );
    let mut seen = HashSet::new();
    for i in 0..2_000 {
        let cmid = st.send(team(), format!("m{i}"), None, i);
        validate_id(IdKind::ClientMessage, &cmid).expect("valid id");
        assert!(seen.insert(cmid), "a client message id repeats");
    }
}

#[test]
fn offline_sends_wait_for_connected_which_resends_the_outbox_in_order_then_asks_convs() {
    let mut c = Tc::new(ClientConfig::default());
    let (a, fx) = c.send(team(), "a", 0);
    assert!(wire(&fx).is_empty(), "nothing goes out while offline");
    let (b, _) = c.send(Target::User("bob".into()), "b", 1);
    let (x, _) = c.send(team(), "x", 2);
    assert_eq!(c.st.next_deadline(), None, "no timer while offline");
    assert!(wire(&c.tick(60_000)).is_empty());

    let fx = c.connect(70_000);
    assert_eq!(fx[0], Effect::Event(Event::Connected));
    let resent = vec![
        format!("send {a}"),
        format!("send {b}"),
        format!("send {x}"),
        "convs".to_string(),
    ];
    assert_eq!(wire(&fx), resent);
    // The resent frames are the original ones, same cmid and body.
    assert!(fx.contains(&Effect::Transmit(send_frame(None, Some("bob"), &b, "b"))));

    // A dropped connection: nothing is sent until the next one, which resends it all again.
    c.st.disconnected();
    assert_eq!(c.take(), vec![Effect::Event(Event::Disconnected)]);
    assert_eq!(c.st.next_deadline(), None);
    assert!(wire(&c.tick(200_000)).is_empty());
    let fx = c.connect(300_000);
    assert_eq!(wire(&fx), resent);
}

#[test]
fn resends_follow_the_retry_policy_then_the_message_fails() {
    let mut c = Tc::online("alice");
    let (a, _) = c.send(team(), "a", 0);
    let mut last = 0;
    let mut off_centre = 0;
    for attempt in 1..=10u32 {
        let due = c.st.next_deadline().expect("a resend is scheduled");
        let base = (500u64 << (attempt - 1)).min(60_000);
        let delay = due - last;
        let (lo, hi) = (base * 7 / 10, (base * 13).div_ceil(10));
        assert!(
            (lo..=hi).contains(&delay),
            "after attempt {attempt} the resend waits {delay} ms, not {base} ms ± 30 %"
        );
        if delay != base {
            off_centre += 1;
        }
        assert!(wire(&c.tick(due - 1)).is_empty(), "not before its time");
        if attempt < 10 {
            assert_eq!(wire(&c.tick(due)), vec![format!("send {a}")]);
            last = due;
        } else {
            // Ten attempts were made: the message fails instead of going an eleventh time.
            assert_fails(&c.tick(due), &a, "10 attempts");
        }
    }
    assert!(off_centre > 0, "the delays are jittered");
    assert_eq!(c.st.next_deadline(), None);
    assert!(c.db.outbox.is_empty());
}

#[test]
fn a_retryable_rejection_waits_its_retry_after_and_keeps_the_conversation_order() {
    let mut c = Tc::online("alice");
    let (a, _) = c.send(team(), "a", 0);
    let (b, _) = c.send(team(), "b", 0);
    let (x, _) = c.send(Target::Conv(OTHER.into()), "x", 0);
    let fx = c.frame(rejected(&a, ErrorCode::RateLimited, Some(5_000)), 10);
    assert!(
        fx.is_empty(),
        "a retryable rejection changes nothing stored: {fx:?}"
    );

    let mut early = Vec::new();
    // Refused at 10 with retry_after 5000: nothing of `team` goes before 5010.
    for t in (20..5_010).step_by(10) {
        early.extend(wire(&c.tick(t)));
    }
    assert!(
        !early.contains(&format!("send {a}")),
        "a resent before its retry_after: {early:?}"
    );
    assert!(
        !early.contains(&format!("send {b}")),
        "b overtook a, refused earlier in the same conversation: {early:?}"
    );
    assert!(
        early.contains(&format!("send {x}")),
        "another conversation is not held up: {early:?}"
    );

    let now = wire(&c.tick(5_010));
    let pa = now.iter().position(|f| *f == format!("send {a}"));
    let pb = now.iter().position(|f| *f == format!("send {b}"));
    assert!(
        matches!((pa, pb), (Some(pa), Some(pb)) if pa < pb),
        "at 5010 a then b: {now:?}"
    );
}

#[test]
fn a_short_retry_after_still_waits_for_the_regular_backoff() {
    let mut c = Tc::online("alice");
    let (a, _) = c.send(team(), "a", 0);
    let due = c.st.next_deadline().expect("scheduled");
    assert!((350..=650).contains(&due));
    c.frame(rejected(&a, ErrorCode::Unavailable, Some(10)), 5);
    assert_eq!(c.st.next_deadline(), Some(due));
    for t in (6..due).step_by(7) {
        assert!(wire(&c.tick(t)).is_empty(), "resent at {t}, before {due}");
    }
    assert_eq!(wire(&c.tick(due)), vec![format!("send {a}")]);
    // Without a retry_after the regular schedule applies too.
    c.frame(rejected(&a, ErrorCode::Unavailable, None), due + 1);
    let next = c.st.next_deadline().expect("scheduled");
    assert!((due + 700..=due + 1_300).contains(&next), "{next}");
}

#[test]
fn a_non_retryable_rejection_fails_the_message_and_removes_it_from_the_outbox() {
    let mut c = Tc::online("alice");
    let (a, _) = c.send(team(), "a", 0);
    let (b, _) = c.send(team(), "b", 0);
    assert_fails(
        &c.frame(rejected(&a, ErrorCode::NotMember, None), 5),
        &a,
        "not_member",
    );
    assert!(c.st.outbox().get(&a).is_none());
    assert_eq!(
        c.db.outbox.iter().map(|p| &p.cmid).collect::<Vec<_>>(),
        [&b]
    );
    assert!(
        c.frame(rejected(&a, ErrorCode::NotMember, None), 6)
            .is_empty(),
        "a second answer for a message no longer pending is ignored"
    );
    // The failed message does not hold back the next one of its conversation.
    let due = c.st.next_deadline().expect("b is pending");
    assert_eq!(wire(&c.tick(due)), vec![format!("send {b}")]);

    // A message to a user fails without a conversation.
    let (u, _) = c.send(Target::User("nobody".into()), "u", due + 1);
    let fx = c.frame(rejected(&u, ErrorCode::Invalid, None), due + 2);
    assert!(matches!(
        &fx[1],
        Effect::Event(Event::Status {
            conv: None,
            status: Status::Failed(_),
            ..
        })
    ));
}

#[test]
fn accepted_stores_then_reports_sent_and_a_second_accepted_is_ignored() {
    let mut c = Tc::online("alice");
    let (a, _) = c.send(team(), "a", 0);
    let fx = c.frame(accepted(&a, TEAM, 7), 50);
    assert_eq!(
        fx,
        vec![
            Effect::Persist(vec![
                StoreOp::RemovePending(a.clone()),
                StoreOp::PutSent {
                    conv: TEAM.into(),
                    seq: 7,
                    cmid: a.clone(),
                    status: Status::Sent(7),
                },
            ]),
            Effect::Event(Event::Status {
                cmid: a.clone(),
                conv: Some(TEAM.into()),
                status: Status::Sent(7),
            }),
        ]
    );
    assert!(c.frame(accepted(&a, TEAM, 7), 60).is_empty());
    assert!(c.st.outbox().is_empty());
    assert_eq!(c.st.next_deadline(), None);
    assert!(wire(&c.tick(1_000_000)).is_empty(), "never resent");

    // A message sent to a user learns its conversation from the answer.
    let (d, _) = c.send(Target::User("bob".into()), "d", 70);
    let conv = direct_conv_id("alice", "bob");
    let fx = c.frame(accepted(&d, &conv, 1), 80);
    assert_eq!(
        fx.last(),
        Some(&Effect::Event(Event::Status {
            cmid: d,
            conv: Some(conv),
            status: Status::Sent(1),
        }))
    );
}

// Regressions: each test below once failed on a defect of the client state machine.

/// A message sent while an earlier message of its conversation is unanswered is not
/// transmitted: `Outbox::take_due` treats the in-flight earlier message (due at its resend time)
/// as blocking its conversation, so the new one waits with `due_ms` 0. `next_deadline` then
/// reports that 0, a time in the past which `tick` cannot act on: a driver that sleeps until
/// `next_deadline` (driver.rs does) wakes at once and loops, a busy spin, until the earlier
/// message is answered or its own resend is due (up to the 60 s backoff cap, or the server's
/// retry_after for a rate-limited one).
#[test]
fn next_deadline_is_after_the_tick_that_could_not_send() {
    let mut c = Tc::online("alice");
    let (a, _) = c.send(team(), "a", 0);
    let (_b, _) = c.send(team(), "b", 0);
    c.frame(rejected(&a, ErrorCode::RateLimited, Some(10_000)), 5);
    // a (and b behind it) may not go before 10,005.
    let fx = c.tick(1_000);
    assert!(wire(&fx).is_empty());
    let next = c.st.next_deadline();
    assert!(
        next.is_some_and(|d| d > 1_000),
        "after a tick at 1000 that could send nothing, next_deadline is {next:?}: a driver spins"
    );
}

/// Same root cause, seen from throughput: within one conversation the client is stop-and-wait.
/// A second message is not transmitted by `send` while the first is unanswered, nor when the
/// first is accepted; only a later `tick` sends it (today promptly, but only because of the
/// busy spin above). A burst of N messages to one conversation takes N round trips. The
/// protocol allows pipelining (a connection's sends are numbered in the order sent; the rate
/// limit holds later sends back itself), and on (re)connect the outbox is pipelined already.
#[test]
fn a_second_message_to_a_conversation_is_transmitted_without_waiting_for_the_first_answer() {
    let mut c = Tc::online("alice");
    let (a, fx) = c.send(team(), "a", 0);
    assert_eq!(wire(&fx), vec![format!("send {a}")]);
    let (b, fx) = c.send(team(), "b", 1);
    let mut sent = wire(&fx);
    sent.extend(wire(&c.frame(accepted(&a, TEAM, 1), 50)));
    assert_eq!(
        sent,
        vec![format!("send {b}")],
        "b went out neither when sent nor when a was accepted"
    );
}
