//! When the server's history changes under the client: a page that starts past what was asked
//! reports the range retention removed, and a new epoch resets the conversation and resyncs
//! it from zero.

use crate::support::*;
use ordo_client::{ClientConfig, Effect, Event, StoreOp};
use ordo_protocol::{ClientFrame, ConvInfo, ServerFrame};

#[test]
fn a_page_starting_past_after_plus_one_reports_the_removed_range() {
    let mut c = Tc::online("alice");
    c.frame(push(TEAM, 1), 1);
    c.frame(push(TEAM, 2), 2);
    assert_eq!(wire(&c.frame(notify(TEAM, 9), 3)), vec!["sync team>2"]);
    let fx = c.frame(synced(TEAM, EPOCH, 6..=9, 6, 9, false), 4);
    let gap_at = fx
        .iter()
        .position(|e| {
            *e == Effect::Event(Event::HistoryGap {
                conv: TEAM.into(),
                from: 3,
                to: 5,
            })
        })
        .expect("the gap 3..=5 is reported");
    let first_msg = fx
        .iter()
        .position(|e| matches!(e, Effect::Event(Event::Message(_))))
        .expect("messages follow");
    assert!(gap_at < first_msg);
    assert!(fx.iter().any(|e| matches!(e, Effect::Persist(ops) if ops.contains(&StoreOp::SetConv { conv: TEAM.into(), epoch: Some(EPOCH), contiguous: 5, reset: false }))));
    assert_eq!(handed(&fx), vec![6, 7, 8, 9]);
    assert_eq!(c.st.contiguous(TEAM), 9);
    assert!(!wire(&fx).iter().any(|f| f.starts_with("sync")));

    // Everything after `after` removed: an empty page still moves the position past the gap.
    assert_eq!(wire(&c.frame(notify(TEAM, 20), 5)), vec!["sync team>9"]);
    let empty = ServerFrame::Synced {
        conv: TEAM.into(),
        epoch: EPOCH,
        messages: Vec::new(),
        has_more: false,
        first_seq: 21,
        max_seq: 20,
    };
    let fx = c.frame(empty, 6);
    assert!(fx.contains(&Effect::Event(Event::HistoryGap {
        conv: TEAM.into(),
        from: 10,
        to: 20
    })));
    assert_eq!(c.st.contiguous(TEAM), 20);
    assert!(wire(&fx).iter().all(|f| !f.starts_with("sync")), "{fx:?}");
}

#[test]
fn a_new_epoch_resets_the_conversation_and_resyncs_it_from_zero() {
    let mut c = Tc::online("alice");
    c.frame(notify(TEAM, 3), 1);
    assert_eq!(
        handed(&c.frame(synced(TEAM, EPOCH, 1..=3, 1, 3, false), 2)),
        vec![1, 2, 3]
    );
    c.st.mark_read(TEAM, 3);
    c.take();

    assert_eq!(wire(&c.frame(notify(TEAM, 5), 3)), vec!["sync team>3"]);
    let fx = c.frame(synced(TEAM, EPOCH + 1, 4..=5, 1, 5, false), 4);
    assert_eq!(
        fx,
        vec![
            Effect::Persist(vec![StoreOp::SetConv {
                conv: TEAM.into(),
                epoch: Some(EPOCH + 1),
                contiguous: 0,
                reset: true,
            }]),
            Effect::Event(Event::EpochReset {
                conv: TEAM.into(),
                epoch: EPOCH + 1,
            }),
            Effect::Transmit(ClientFrame::Sync {
                conv: TEAM.into(),
                after: 0,
                limit: Some(ClientConfig::default().sync_limit),
            }),
        ],
        "nothing of the page of the new epoch is handed; the old history is dropped"
    );
    assert_eq!(c.st.contiguous(TEAM), 0);
    assert!(c.db.messages.is_empty());
    let fx = c.frame(synced(TEAM, EPOCH + 1, 1..=2, 1, 2, false), 5);
    assert_eq!(handed(&fx), vec![1, 2], "the new history from its start");

    // An overview with yet another epoch leads to the same reset through a sync.
    let fx = c.frame(
        overview(vec![ConvInfo {
            epoch: EPOCH + 2,
            ..info(TEAM, 2, 2, 0, &[])
        }]),
        6,
    );
    assert_eq!(wire(&fx), vec!["sync team>2"]);
    let fx = c.frame(synced(TEAM, EPOCH + 2, 3..=3, 1, 3, false), 7);
    assert!(fx.contains(&Effect::Event(Event::EpochReset {
        conv: TEAM.into(),
        epoch: EPOCH + 2
    })));
    assert_eq!(wire(&fx), vec!["sync team>0"]);
}
