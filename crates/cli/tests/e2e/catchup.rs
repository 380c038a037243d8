//! A long offline period (G5, G6): a device catches up on everything, exactly once.

use super::common::*;
use ordo_protocol::{direct_conv_id, ConvKind, Message, ServerFrame};
use std::collections::BTreeMap;

#[tokio::test(flavor = "multi_thread")]
async fn an_offline_device_catches_up_on_1000_messages_exactly_once() {
    let server = Server::start(&[]).await;
    let n = 1000u64;
    let conv = direct_conv_id("alice", "bob");
    let mut alice = Client::connect(&server, "alice", "phone").await;
    let sent = cmids("offline", n as usize);
    let seqs = alice.send_all(&Target::to("bob"), &sent, 64).await;
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>());

    let mut bob = Client::connect(&server, "bob", "phone").await;
    let mut got: Vec<Message> = Vec::new();
    let mut after = 0;
    let mut pages = 0;
    let mut epoch = None;
    loop {
        let page = bob.sync(&conv, after, Some(100)).await;
        pages += 1;
        assert_eq!(
            *epoch.get_or_insert(page.epoch),
            page.epoch,
            "epoch changed"
        );
        assert_eq!((page.first_seq, page.max_seq), (1, n));
        assert_eq!(page.messages.len(), 100, "page {pages} is not full");
        after = page.messages.last().map(|m| m.seq).expect("non-empty page");
        got.extend(page.messages);
        if !page.has_more {
            break;
        }
        assert!(pages < 10, "has_more after the last message");
    }
    assert_eq!(pages, 10);
    assert_seqs(&got, 1, n, "catch-up");
    for (m, cmid) in got.iter().zip(&sent) {
        assert_eq!((&m.cmid, &m.body, m.from.as_str()), (cmid, cmid, "alice"));
    }

    // The last sync acknowledged up to its `after` (900). Positions are reported once they
    // are durable: alice (online all along) is told with a receipt, then the overview shows it.
    alice
        .wait_for(|f| match f {
            ServerFrame::Receipt {
                user, delivered, ..
            } if user == "bob" && *delivered == 900 => Some(()),
            _ => None,
        })
        .await;
    let info = bob.convs().await;
    assert_eq!(info.len(), 1);
    assert_eq!(
        (info[0].conv.as_str(), info[0].delivered),
        (conv.as_str(), 900)
    );
    bob.ack(&conv, n).await;
    bob.wait_for(|f| match f {
        ServerFrame::Receipt {
            user, delivered, ..
        } if user == "bob" && *delivered == n => Some(()),
        _ => None,
    })
    .await;
    bob.close().await;

    let mut bob = Client::connect(&server, "bob", "phone").await;
    let info = bob.convs().await;
    assert_eq!(info.len(), 1);
    let c = &info[0];
    assert_eq!(c.conv, conv);
    assert_eq!(c.kind, ConvKind::Direct);
    assert_eq!(Some(c.epoch), epoch);
    assert_eq!((c.max_seq, c.first_seq, c.delivered, c.read), (n, 1, n, 0));
    let members: BTreeMap<&str, (u64, u64)> = c
        .members
        .iter()
        .map(|m| (m.user.as_str(), (m.delivered, m.read)))
        .collect();
    assert_eq!(members["bob"], (n, 0));
    assert!(members.contains_key("alice"));
    let tail = bob.sync(&conv, n, Some(100)).await;
    assert!(tail.messages.is_empty());
    assert!(!tail.has_more);
    assert_eq!(tail.max_seq, n);
}
