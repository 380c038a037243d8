//! G4: sender FIFO. A session's sends get increasing seqs in the order it sent them, also when
//! the rate limit refuses some of them and they are resent later.

use crate::support::*;
use ordo_core::{Action, Batch, CoreConfig, Retention, SessionId};
use ordo_protocol::ErrorCode;

/// "cmid:seq" of every `accepted` a session got, in order.
fn accepted_order(actions: &[Action], sid: SessionId) -> Vec<String> {
    accepted(actions, sid)
        .into_iter()
        .map(|(cmid, _, seq, _)| format!("{cmid}:{seq}"))
        .collect()
}

/// [`one_per_second`] without a burst, at time 0: alice's m0 goes through, her m1 is refused
/// for rate.
fn m1_refused_for_rate() -> Sim {
    let mut s = one_per_second(1.0);
    s.now = 0;
    assert!(s.send(1, "g", "m0").is_empty());
    assert_eq!(rejected(&s.send(1, "g", "m1")).0, ErrorCode::RateLimited);
    s
}

#[test]
fn sends_from_one_session_get_increasing_seqs_in_send_order() {
    let mut s = alice_and_bob_in_g(cfg());
    let mut out = Vec::new();
    let mut in_flight: Option<Batch> = None;
    for i in 0..30u64 {
        out.extend(s.send(1, "g", &format!("a{i}")));
        if i % 3 == 0 {
            out.extend(s.send(2, "g", &format!("b{i}")));
        }
        // Commit at irregular points, sometimes leaving a batch in flight across sends.
        if i % 4 == 1 {
            if let Some(b) = in_flight.take() {
                out.extend(s.commit(&b));
            }
            in_flight = s.core.take_batch();
        }
    }
    if let Some(b) = in_flight.take() {
        out.extend(s.commit(&b));
    }
    out.extend(s.flush().1);
    let acc = accepted(&out, 1);
    assert_eq!(
        acc.iter().map(|a| a.0.clone()).collect::<Vec<_>>(),
        (0..30).map(|i| format!("a{i}")).collect::<Vec<_>>(),
        "answered in send order"
    );
    let seqs: Vec<u64> = acc.iter().map(|a| a.2).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(s.store.seqs("g"), (1..=40).collect::<Vec<_>>());
}

/// G4 under the rate limit: once m1 is refused for rate, m2 from the same connection must not
/// overtake it when a token comes back; m2 is held back until m1 is resent.
#[test]
fn a_rate_limited_send_holds_back_later_sends_so_order_holds() {
    let mut s = one_per_second(1.0);
    s.core.connect(3, "alice", "a2");
    s.now = 0;
    assert!(s.send(1, "g", "m0").is_empty());
    assert_eq!(rejected(&s.send(1, "g", "m1")).0, ErrorCode::RateLimited);
    s.now = 5_000;
    // Tokens are back, but m2 may not overtake m1.
    let (c, retryable, _) = rejected(&s.send(1, "g", "m2"));
    assert_eq!((c, retryable), (ErrorCode::RateLimited, true));
    // Another device of the same user is not held back by this one's order.
    assert!(s.send(3, "g", "x1").is_empty());
    s.now = 10_000;
    assert!(
        s.send(1, "g", "m1").is_empty(),
        "the refused message goes first"
    );
    s.now = 15_000;
    assert!(s.send(1, "g", "m2").is_empty(), "then the next one");
    let (_, out) = s.flush();
    let order: Vec<(String, u64)> = accepted(&out, 1)
        .into_iter()
        .map(|(cmid, _, seq, _)| (cmid, seq))
        .collect();
    assert_eq!(
        order,
        vec![
            ("m0".to_string(), 1),
            ("m1".to_string(), 3),
            ("m2".to_string(), 4)
        ]
    );
}

/// G4 with several refused messages: whatever order their resends come in, they are numbered
/// in the order the connection first sent them.
#[test]
fn refused_messages_are_admitted_in_their_first_send_order() {
    let mut s = one_per_second(2.0);
    s.now = 0;
    assert!(s.send(1, "g", "m0").is_empty());
    assert!(s.send(1, "g", "m1").is_empty());
    for m in ["m2", "m3", "m4"] {
        assert_eq!(rejected(&s.send(1, "g", m)).0, ErrorCode::RateLimited);
    }
    // Later, with two tokens back, the resends arrive out of order.
    s.now = 10_000;
    assert!(s.send(1, "g", "m2").is_empty(), "the first refused goes");
    assert_eq!(
        rejected(&s.send(1, "g", "m4")).0,
        ErrorCode::RateLimited,
        "m4 may not overtake m3, though a token is there"
    );
    assert!(s.send(1, "g", "m3").is_empty());
    s.now = 11_000;
    assert!(s.send(1, "g", "m4").is_empty());
    let (_, out) = s.flush();
    let order: Vec<String> = accepted_order(&out, 1);
    assert_eq!(order, ["m0:1", "m1:2", "m2:3", "m3:4", "m4:5"]);
}

/// A refused send the client gave up on does not hold its conversation back for good: once it
/// has not been resent for two minutes while the client kept resending the next one, that one
/// goes.
#[test]
fn a_held_back_send_that_is_never_resent_expires() {
    let mut s = m1_refused_for_rate();
    s.now = 60_000;
    assert_eq!(
        rejected(&s.send(1, "g", "m2")).0,
        ErrorCode::RateLimited,
        "still held back behind m1"
    );
    s.now = 100_000;
    assert_eq!(
        rejected(&s.send(1, "g", "m2")).0,
        ErrorCode::RateLimited,
        "resent once: m1 is still waited for"
    );
    s.now = 200_000; // m1 was never resent; m2 was resent twice meanwhile
    assert!(s.send(1, "g", "m2").is_empty(), "m1's hold expired");
    let (_, out) = s.flush();
    let order: Vec<String> = accepted_order(&out, 1);
    assert_eq!(order, ["m0:1", "m2:2"]);
}

/// A clock jumping forward right after a refusal does not let the next send overtake the
/// refused one (found by the simulation, seed 866: a send pipelined behind a rate-refused one
/// arrived after the server's clock jumped four minutes and was numbered first).
#[test]
fn a_clock_jump_does_not_let_a_later_send_overtake_a_held_back_one() {
    let mut s = m1_refused_for_rate();
    s.now = 253_000;
    assert_eq!(
        rejected(&s.send(1, "g", "m2")).0,
        ErrorCode::RateLimited,
        "m2 was sent after m1 and m1 is not given up on"
    );
    assert!(s.send(1, "g", "m1").is_empty());
    s.now = 260_000;
    assert!(s.send(1, "g", "m2").is_empty());
    let (_, out) = s.flush();
    let order: Vec<String> = accepted_order(&out, 1);
    assert_eq!(order, ["m0:1", "m1:2", "m2:3"]);
}

/// A resend of a message already accepted is answered from dedup even while the connection's
/// later sends are held back (it is not a new send), and it holds nothing back itself: the
/// client will not resend it again, so the refused send's resend and the next new one go
/// through, in order.
#[test]
fn a_resend_of_an_accepted_message_is_answered_while_others_are_held_back() {
    let mut s = one_per_second(2.0);
    s.now = 0;
    assert!(s.send(1, "g", "m0").is_empty());
    assert!(s.send(1, "g", "m1").is_empty());
    assert_eq!(rejected(&s.send(1, "g", "m2")).0, ErrorCode::RateLimited);
    let (_, out) = s.flush();
    assert_eq!(accepted_order(&out, 1), ["m0:1", "m1:2"]);
    // m1's answer was lost: the client resends it, while m2 is held back.
    let out = s.send(1, "g", "m1");
    assert_eq!(accepted_order(&out, 1), ["m1:2"], "answered from dedup");
    s.now = 10_000;
    assert!(s.send(1, "g", "m2").is_empty());
    assert!(s.send(1, "g", "m3").is_empty(), "m1 holds nothing back");
    let (_, out) = s.flush();
    assert_eq!(accepted_order(&out, 1), ["m2:3", "m3:4"]);
}

/// A send the conversation owner refuses (here: its user is not a member) costs no rate token:
/// the session hub takes one when it lets a send through and gives it back when the owner does
/// not take the send.
#[test]
fn a_send_the_owner_refuses_costs_no_rate_token() {
    let mut s = one_per_second(1.0);
    s.group("h", &["bob"], Retention::default());
    s.now = 0;
    assert_eq!(rejected(&s.send(1, "h", "x0")).0, ErrorCode::NotFound);
    assert!(s.send(1, "g", "m0").is_empty(), "the token is still there");
    assert_eq!(rejected(&s.send(1, "g", "m1")).0, ErrorCode::RateLimited);
}

/// A new send over the rate is refused before its conversation is loaded: a client over its
/// rate makes the server read nothing more from the store.
#[test]
fn a_send_over_the_rate_is_refused_without_loading_its_conversation() {
    let mut s = Sim::new(CoreConfig {
        rate_per_sec: 1.0,
        rate_burst: 1.0,
        conv_cache_entries: 0,
        ..CoreConfig::default()
    });
    s.group("g", &["alice"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.now = 0;
    s.core.evict();
    assert!(s.send(1, "g", "m0").is_empty());
    s.flush();
    s.core.evict();
    assert_eq!(s.core.convs_held(), 0);
    let loads = s.core.stats().conv_loads;
    let out = s.core.send(1, req("g", "m1"), s.now);
    assert_eq!(rejected(&out).0, ErrorCode::RateLimited);
    assert!(
        !out.iter().any(|a| matches!(a, Action::Load { .. })),
        "{out:?}"
    );
    assert_eq!(s.core.stats().conv_loads, loads);
}

/// A send held back behind a refused one, then refused for good by the conversation owner (its
/// client message id was used in another conversation), holds nothing back: the client will
/// not resend it, and the connection's next send goes once the refused one is through.
#[test]
fn a_held_back_send_refused_for_good_holds_nothing_back() {
    let mut s = one_per_second(1.0);
    s.group("h", &["alice"], Retention::default());
    s.now = 0;
    assert!(s.send(1, "h", "x").is_empty());
    s.flush();
    assert_eq!(rejected(&s.send(1, "g", "a1")).0, ErrorCode::RateLimited);
    assert_eq!(
        rejected(&s.send(1, "g", "x")).0,
        ErrorCode::Invalid,
        "x was used in h"
    );
    s.now = 10_000;
    assert!(s.send(1, "g", "a1").is_empty());
    s.now = 12_000;
    assert!(s.send(1, "g", "a2").is_empty(), "x holds nothing back");
    let (_, out) = s.flush();
    assert_eq!(accepted_order(&out, 1), ["a1:1", "a2:2"]);
}

/// A connection with refused sends held back in more conversations than the core keeps in
/// order is closed (the client resends in order on its next connection): a refusal the gate
/// cannot remember must not let a later send of that conversation through first.
#[test]
fn a_connection_whose_held_back_sends_overflow_is_closed() {
    let mut s = one_per_second(1.0);
    s.now = 0;
    assert!(s.send(1, "g", "m0").is_empty());
    for i in 0..ordo_core::held_back::MAX_HELD_CONVS {
        let out = s.send_to(1, &format!("peer{i}"), &format!("d{i}"));
        assert_eq!(rejected(&out).0, ErrorCode::RateLimited);
    }
    assert_eq!(s.core.session_count(), 1);
    let out = s.send_to(1, "one-more", "x");
    assert!(
        matches!(out.last(), Some(Action::Close { session: 1, .. })),
        "{out:?}"
    );
    assert_eq!(rejected(&out[..1]).0, ErrorCode::RateLimited);
    assert_eq!(s.core.session_count(), 0, "forgotten at once");
}
