//! Order across devices (G3, G4): every device sees the same order, senders keep FIFO.

use super::common::*;
use ordo_protocol::{ClientFrame, Message, ServerFrame};
use std::collections::HashMap;
use std::sync::Arc;

/// What one device saw.
struct DeviceLog {
    name: String,
    /// Every message delivered to this device (pushed or pulled), in arrival order.
    delivered: Vec<Message>,
    /// For a sender: (cmid, seq) in the order the cmids were sent.
    accepted: Vec<(String, u64)>,
    syncs: usize,
}

/// Runs one device: sends `to_send` (at most `window` unanswered), takes pushes,
/// acks every few messages, pulls with `sync` after a `notify`, until it holds seqs
/// `1..=total` and every send is accepted. Any duplicate or out-of-order delivery fails.
async fn run_device(
    mut c: Client,
    conv: String,
    to_send: Vec<String>,
    total: u64,
    window: usize,
) -> (Client, DeviceLog) {
    let name = format!("{}/{}", c.user, c.device);
    let mut delivered: Vec<Message> = Vec::new();
    let mut accepted: HashMap<String, u64> = HashMap::new();
    let mut sent = 0usize;
    let mut last = 0u64;
    let mut acked = 0u64;
    let mut syncing = false;
    let mut notified_max = 0u64;
    let mut syncs = 0usize;
    while last < total || accepted.len() < to_send.len() {
        while sent < to_send.len() && sent - accepted.len() < window {
            let cmid = &to_send[sent];
            c.send(&send_frame(&Target::Conv(conv.clone()), cmid, cmid))
                .await;
            sent += 1;
        }
        let mut fresh: Vec<Message> = Vec::new();
        let frame = c.wire.recv_timeout(WAIT).await.unwrap_or_else(|e| {
            panic!(
                "{name}: {e} (holding 1..={last} of {total}, {}/{} accepted, {sent} sent, \
                 acked {acked}, syncing {syncing}, notified up to {notified_max})",
                accepted.len(),
                to_send.len()
            )
        });
        match frame {
            ServerFrame::Msg(m) => fresh.push(Arc::unwrap_or_clone(m)),
            ServerFrame::Synced {
                conv: sc,
                messages,
                has_more,
                max_seq,
                ..
            } => {
                assert_eq!(sc, conv);
                assert!(syncing, "{name}: a synced nobody asked for");
                syncing = false;
                fresh.extend(messages);
                // The page stopped short of the sync's end (`max_seq`): pull again after it.
                // (No `notify` follows a page with more to come.)
                if has_more {
                    notified_max = notified_max.max(max_seq);
                }
            }
            ServerFrame::Notify { conv: nc, max_seq } => {
                assert_eq!(nc, conv);
                notified_max = notified_max.max(max_seq);
            }
            ServerFrame::Accepted {
                cmid,
                seq,
                conv: ac,
                ..
            } => {
                assert_eq!(ac, conv);
                assert!(
                    accepted.insert(cmid.clone(), seq).is_none(),
                    "{name}: {cmid} accepted twice"
                );
            }
            ServerFrame::Receipt { .. } => {}
            other => panic!("{name}: unexpected {other:?}"),
        }
        for m in fresh {
            assert_eq!(
                m.seq,
                last + 1,
                "{name}: got seq {} after {last} (duplicate, gap or reordering)",
                m.seq
            );
            last = m.seq;
            delivered.push(m);
        }
        if last >= acked + 5 || (last == total && acked < total) {
            c.ack(&conv, last).await;
            acked = last;
        }
        if !syncing && notified_max > last {
            c.send(&ClientFrame::Sync {
                conv: conv.clone(),
                after: last,
                limit: Some(50),
            })
            .await;
            syncing = true;
            syncs += 1;
        }
    }
    let accepted = to_send
        .iter()
        .map(|cmid| (cmid.clone(), accepted[cmid]))
        .collect();
    (
        c,
        DeviceLog {
            name,
            delivered,
            accepted,
            syncs,
        },
    )
}

/// A device far behind pulls page after page: a page with more to come is followed by no
/// `notify`, the device asks again after it. (The device below reads nothing until all 100
/// messages are in, so its first sync is planned up to 100 and answered 50 at a time.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_far_behind_pulls_every_page() {
    let server = Server::start(&["--push-window", "16"]).await;
    let conv = "g-behind";
    server
        .create_group(conv, &["alice", "bob"], serde_json::json!({}))
        .await;
    let laptop = Client::connect(&server, "alice", "laptop").await;
    let mut bob = Client::connect(&server, "bob", "phone").await;
    let seqs = bob
        .send_all(&Target::Conv(conv.into()), &cmids("bob", 100), 10)
        .await;
    assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
    let (laptop, log) = run_device(laptop, conv.to_string(), Vec::new(), 100, 10).await;
    assert_seqs(&log.delivered, 1, 100, &log.name);
    assert!(log.syncs >= 2, "more than one page pulled: {}", log.syncs);
    laptop.close().await;
    bob.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn order_is_the_same_on_every_device_and_senders_keep_fifo() {
    // A small push window so that some devices overflow it and have to pull with `sync`.
    let server = Server::start(&["--push-window", "16"]).await;
    let conv = "g-order";
    server
        .create_group(conv, &["alice", "bob", "carol"], serde_json::json!({}))
        .await;
    let devices = [
        ("alice", "phone"),
        ("alice", "laptop"),
        ("bob", "phone"),
        ("carol", "phone"),
    ];
    let per_sender = 50;
    let total = 2 * per_sender as u64;
    let mut clients = Vec::new();
    for (u, d) in devices {
        clients.push(Client::connect(&server, u, d).await);
    }
    let mut tasks = Vec::new();
    for c in clients {
        let to_send = match (c.user.as_str(), c.device.as_str()) {
            ("alice", "phone") => cmids("alice", per_sender),
            ("bob", "phone") => cmids("bob", per_sender),
            _ => Vec::new(),
        };
        tasks.push(tokio::spawn(run_device(
            c,
            conv.to_string(),
            to_send,
            total,
            10,
        )));
    }
    let mut logs = Vec::new();
    let mut keep = Vec::new();
    for t in tasks {
        let (c, log) = t.await.expect("device task");
        keep.push(c);
        logs.push(log);
    }

    // Every device: seqs 1..=100 exactly once, in order (checked as they came, again here).
    for log in &logs {
        assert_seqs(&log.delivered, 1, total, &log.name);
    }
    // The same order everywhere: same message at the same seq on every device.
    let reference = &logs[0].delivered;
    for log in &logs[1..] {
        assert_eq!(
            &log.delivered, reference,
            "{} differs from {}",
            log.name, logs[0].name
        );
    }
    // Sender FIFO and agreement between `accepted` and what was delivered.
    let by_seq: HashMap<u64, &Message> = reference.iter().map(|m| (m.seq, m)).collect();
    let mut all_seqs = Vec::new();
    for log in logs.iter().filter(|l| !l.accepted.is_empty()) {
        let s: Vec<u64> = log.accepted.iter().map(|(_, s)| *s).collect();
        assert!(
            s.windows(2).all(|w| w[0] < w[1]),
            "{}: seqs not increasing in send order: {s:?}",
            log.name
        );
        for (cmid, seq) in &log.accepted {
            let m = by_seq[seq];
            assert_eq!(&m.cmid, cmid, "seq {seq}");
            assert_eq!(&m.body, cmid, "seq {seq}");
            assert_eq!(format!("{}/{}", m.from, m.device), log.name, "seq {seq}");
        }
        all_seqs.extend(s);
    }
    all_seqs.sort_unstable();
    assert_eq!(all_seqs, (1..=total).collect::<Vec<_>>());
    let syncs: usize = logs.iter().map(|l| l.syncs).sum();
    eprintln!("order test: {syncs} syncs after notify across the devices");
    for c in keep {
        c.close().await;
    }
}
