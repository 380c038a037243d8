//! SIGKILL mid-stream (G1, G6): nothing accepted is lost and the dedup window survives.

use super::common::*;
use ordo_protocol::ServerFrame;
use ordo_store_redb::wal::scan::RECORD_MAGIC;
use std::collections::{HashMap, HashSet};

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_stream_loses_nothing_accepted_and_dedup_survives() {
    let mut server = Server::start(&[]).await;
    let conv = "g-crash";
    server
        .create_group(conv, &["alice", "bob"], serde_json::json!({}))
        .await;
    let g = Target::conv(conv);
    let all = cmids("crash", 300);
    let window = 32;
    let kill_after = 150;

    let mut alice = Client::connect(&server, "alice", "phone").await;
    let epoch = alice.convs().await[0].epoch;
    let mut accepted: HashMap<String, u64> = HashMap::new();
    let mut sent = 0;
    let mut killed = false;
    loop {
        while !killed && sent < all.len() && sent - accepted.len() < window {
            alice.send(&send_frame(&g, &all[sent], &all[sent])).await;
            sent += 1;
        }
        match alice.wire.recv_timeout(WAIT).await {
            Ok(ServerFrame::Accepted { cmid, seq, .. }) => {
                assert!(accepted.insert(cmid, seq).is_none());
            }
            Ok(ServerFrame::Rejected { cmid, code, .. }) => panic!("{cmid} rejected: {code}"),
            Ok(_) => {}
            // The server is gone: whatever `accepted` came before is all we know.
            Err(_) if killed => break,
            Err(e) => panic!("connection failed before the kill: {e}"),
        }
        if !killed && accepted.len() >= kill_after {
            server.kill9();
            killed = true;
        }
        assert!(
            accepted.len() < all.len(),
            "all 300 accepted before the kill"
        );
    }
    eprintln!(
        "sigkill: {sent} sent, {} accepted when the server died",
        accepted.len()
    );
    assert!(accepted.len() >= kill_after);

    server.restart().await;
    let mut alice = Client::connect(&server, "alice", "phone").await;
    // Same history, so the same epoch: clients must not be told to throw their cache away.
    assert_eq!(
        alice.convs().await[0].epoch,
        epoch,
        "epoch changed across a restart"
    );
    let stored = alice.sync_all(conv, 0).await;
    let max = stored.len() as u64;
    assert_seqs(&stored, 1, max, "after the crash");
    assert!(max >= accepted.len() as u64);
    for (cmid, seq) in &accepted {
        let m = &stored[(*seq - 1) as usize];
        assert_eq!(
            &m.cmid, cmid,
            "accepted {cmid} as {seq}, stored at {seq}: {}",
            m.cmid
        );
    }
    // What survived is a prefix of what was sent, in send order (sender FIFO).
    for (i, m) in stored.iter().enumerate() {
        assert_eq!(m.cmid, all[i], "seq {}", m.seq);
    }

    // Resend everything: durable ones are recognised, the rest are appended in order.
    let seqs = alice.send_all(&g, &all, window).await;
    for (i, cmid) in all.iter().enumerate() {
        if let Some(s) = accepted.get(cmid) {
            assert_eq!(seqs[i], *s, "{cmid}: dedup did not survive the crash");
        }
        assert_eq!(seqs[i], i as u64 + 1, "{cmid}");
    }
    let last = alice.sync_all(conv, 0).await;
    assert_seqs(&last, 1, all.len() as u64, "final");
    let distinct: HashSet<&str> = last.iter().map(|m| m.cmid.as_str()).collect();
    assert_eq!(distinct.len(), all.len());
    for (i, m) in last.iter().enumerate() {
        assert_eq!(m.cmid, all[i]);
    }
}

/// One bit flipped in a middle record of the log after a SIGKILL (before any checkpoint): the
/// server refuses to start, naming the file and the offset, instead of starting with the
/// acknowledged messages behind the damage gone and their seqs given out again; `ordo store
/// verify` says the same and exits 1.
#[tokio::test(flavor = "multi_thread")]
async fn a_log_damaged_after_a_kill_is_refused_and_verify_names_the_damage() {
    let test = "a_log_damaged_after_a_kill_is_refused_and_verify_names_the_damage";
    if embedded_only(test, "it damages the embedded store's log") {
        return;
    }
    let mut server = Server::start(&[]).await;
    let conv = "g-damage";
    server
        .create_group(conv, &["alice", "bob"], serde_json::json!({}))
        .await;
    let mut alice = Client::connect(&server, "alice", "phone").await;
    // One at a time: one log record per message.
    let all = cmids("damage", 60);
    alice.send_all(&Target::conv(conv), &all, 1).await;
    let epoch = alice.convs().await[0].epoch;
    server.kill9();
    let log = server.data_dir().join("wal-0.log");
    let mut seg = std::fs::read(&log).unwrap();
    let mut records = Vec::new();
    let mut at = 4096;
    while seg[at..at + 4] == RECORD_MAGIC {
        let len = u32::from_le_bytes(seg[at + 4..at + 8].try_into().unwrap()) as usize;
        records.push((at, 20 + len));
        at += 20 + len;
    }
    assert!(records.len() >= 60, "{} records", records.len());
    let (at, len) = records[records.len() / 2];
    seg[at + len - 3] ^= 0x04;
    std::fs::write(&log, &seg).unwrap();

    let err = server
        .try_restart()
        .await
        .expect_err("started on a damaged log");
    assert!(err.contains("wal-0.log is damaged"), "{err}");
    assert!(err.contains(&format!("offset {at}")), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ordo"))
        .args(["store", "verify", "--data"])
        .arg(server.data_dir())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.contains("does not open"), "{report}");
    assert!(report.contains(&format!("offset {at}")), "{report}");

    // Salvage: the messages before the damaged record are kept, the epoch moves, and the
    // server starts and takes messages again; a device that syncs from 0 under the new epoch
    // sees one gap-free history.
    let salvage = |apply: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ordo"));
        cmd.args(["store", "salvage", "--data"])
            .arg(server.data_dir());
        if apply {
            cmd.arg("--apply");
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (code, report) = salvage(false);
    assert_eq!(code, Some(1), "a report only: {report}");
    assert!(report.contains("lost: conversation"), "{report}");
    let (code, report) = salvage(true);
    assert_eq!(code, Some(0), "{report}");
    server.restart().await;
    let mut bob = Client::connect(&server, "bob", "tablet").await;
    let info = bob.convs().await;
    let g = info.iter().find(|c| c.conv == conv).expect("listed");
    assert_ne!(g.epoch, epoch, "the epoch moved: devices drop their copies");
    let kept = g.max_seq;
    assert!(kept > 0 && kept < 60, "kept the {kept} before the damage");
    let mut alice = Client::connect(&server, "alice", "phone2").await;
    let next = alice
        .send_one(&Target::conv(conv), "after-salvage", "hi")
        .await
        .seq();
    assert_eq!(next, kept + 1);
    let history = bob.sync_all(conv, 0).await;
    assert_seqs(&history, 1, kept + 1, "after salvage");
}
