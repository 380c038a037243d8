//! Receiving: a message past a hole is held and one sync fills the hole, a notify pulls only
//! when behind and pages until caught up, duplicates are dropped wherever they come from, and
//! every message is stored before the app is handed it.

use crate::support::*;
use ordo_client::{ClientConfig, Effect, Event, StoreOp};
use ordo_protocol::ClientFrame;
use std::collections::HashSet;

#[test]
fn an_out_of_order_msg_is_held_and_triggers_exactly_one_sync_until_answered() {
    let mut c = Tc::online("alice");
    assert_eq!(handed(&c.frame(push(TEAM, 1), 10)), vec![1]);

    let fx = c.frame(push(TEAM, 3), 20);
    assert!(handed(&fx).is_empty(), "3 is not handed past the hole at 2");
    assert_eq!(wire(&fx), vec!["sync team>1"]);
    assert!(fx.contains(&Effect::Transmit(ClientFrame::Sync {
        conv: TEAM.into(),
        after: 1,
        limit: Some(ClientConfig::default().sync_limit),
    })));
    // More out-of-order pushes and a notify while the sync is outstanding: no second sync.
    assert!(c.frame(push(TEAM, 4), 30).is_empty());
    assert!(c.frame(notify(TEAM, 6), 35).is_empty());
    assert!(c.frame(push(TEAM, 3), 36).is_empty(), "a held duplicate");
    assert_eq!(c.st.contiguous(TEAM), 1);

    let fx = c.frame(synced(TEAM, EPOCH, 2..=6, 1, 6, false), 40);
    assert_eq!(handed(&fx), vec![2, 3, 4, 5, 6]);
    assert!(wire(&fx).is_empty(), "caught up: no further sync");
    let stored: Vec<u64> = fx
        .iter()
        .filter_map(|e| match e {
            Effect::Persist(ops) => Some(ops),
            _ => None,
        })
        .flatten()
        .filter_map(|op| match op {
            StoreOp::PutMessages { messages, .. } => Some(messages.iter().map(|m| m.seq)),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(stored, vec![2, 3, 4, 5, 6], "stored as one run");
    assert_eq!(c.st.contiguous(TEAM), 6);

    // Answered: the next hole gets its own sync.
    assert_eq!(wire(&c.frame(push(TEAM, 8), 50)), vec!["sync team>6"]);
}

#[test]
fn notify_pulls_only_when_behind_and_pages_until_caught_up() {
    let cfg = ClientConfig {
        sync_limit: 2,
        ..ClientConfig::default()
    };
    let mut c = Tc::online_with(cfg, "alice");
    assert_eq!(wire(&c.frame(notify(TEAM, 5), 1)), vec!["sync team>0"]);
    let fx = c.frame(synced(TEAM, EPOCH, 1..=2, 1, 5, true), 2);
    assert_eq!(handed(&fx), vec![1, 2]);
    assert_eq!(wire(&fx), vec!["sync team>2"], "has_more: next page");
    let fx = c.frame(synced(TEAM, EPOCH, 3..=4, 1, 5, true), 3);
    assert_eq!(wire(&fx), vec!["sync team>4"]);
    // A page that says no more but stops short of max_seq: ask again.
    let fx = c.frame(synced(TEAM, EPOCH, 5..=5, 1, 7, false), 4);
    assert_eq!(wire(&fx), vec!["sync team>5"]);
    let fx = c.frame(synced(TEAM, EPOCH, 6..=7, 1, 7, false), 5);
    assert_eq!(handed(&fx), vec![6, 7]);
    assert!(wire(&fx).is_empty());
    assert!(
        wire(&c.frame(notify(TEAM, 7), 6)).is_empty(),
        "a notify for what is stored pulls nothing"
    );
}

#[test]
fn duplicates_are_dropped_wherever_they_come_from() {
    let mut c = Tc::online("alice");
    assert_eq!(handed(&c.frame(push(TEAM, 1), 1)), vec![1]);
    assert!(c.frame(push(TEAM, 1), 2).is_empty(), "a repeated push");
    // A page overlapping what was pushed: only the new seqs reach the app.
    c.frame(notify(TEAM, 3), 3);
    let fx = c.frame(synced(TEAM, EPOCH, 1..=3, 1, 3, false), 4);
    assert_eq!(handed(&fx), vec![2, 3]);
    // A push racing the page.
    assert!(c.frame(push(TEAM, 3), 5).is_empty());
    // A whole page again.
    c.frame(notify(TEAM, 4), 6);
    let fx = c.frame(synced(TEAM, EPOCH, 1..=4, 1, 4, false), 7);
    assert_eq!(handed(&fx), vec![4]);
}

#[test]
fn every_message_event_comes_after_the_persist_that_stores_it() {
    // `Tc::take` checks this for every effect of every test; here it is spelt out once on a
    // mixed stream of pushes, holes and pages.
    let mut c = Tc::online("alice");
    let mut fx = Vec::new();
    for f in [
        push(TEAM, 1),
        push(TEAM, 3),
        push(OTHER, 1),
        synced(TEAM, EPOCH, 2..=4, 1, 4, false),
        push(TEAM, 5),
    ] {
        fx.extend(c.frame(f, 10));
    }
    let mut stored = HashSet::new();
    let mut events = 0;
    for e in &fx {
        match e {
            Effect::Persist(ops) => {
                for op in ops {
                    if let StoreOp::PutMessages { messages, .. } = op {
                        stored.extend(messages.iter().map(|m| (m.conv.clone(), m.seq)));
                    }
                }
            }
            Effect::Event(Event::Message(m)) => {
                events += 1;
                assert!(stored.contains(&(m.conv.clone(), m.seq)), "{m:?}");
            }
            _ => {}
        }
    }
    assert_eq!(events, 6);
}
