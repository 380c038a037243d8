//! Duplicates (G2): a resend gets the same seq and is stored once.

use super::common::*;
use ordo_protocol::{ClientFrame, ServerFrame};
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread")]
async fn a_duplicate_send_returns_the_same_seq_and_is_stored_once() {
    let server = Server::start(&[]).await;
    let conv = "g-dup";
    server
        .create_group(conv, &["alice", "bob"], serde_json::json!({}))
        .await;
    let g = Target::conv(conv);
    let mut alice = Client::connect(&server, "alice", "phone").await;
    let mut bob = Client::connect(&server, "bob", "phone").await;

    // Twice back to back: the second arrives while the first may not be durable yet.
    alice.send(&send_frame(&g, "dup-1", "hello")).await;
    alice.send(&send_frame(&g, "dup-1", "hello")).await;
    let mut answers = Vec::new();
    while answers.len() < 2 {
        match alice.next().await {
            ServerFrame::Accepted {
                cmid,
                conv,
                seq,
                ts,
            } => answers.push((cmid, conv, seq, ts)),
            ServerFrame::Rejected { cmid, code, .. } => panic!("{cmid} rejected: {code}"),
            _ => {}
        }
    }
    assert_eq!(
        answers[0], answers[1],
        "a duplicate gets the identical answer"
    );
    assert_eq!(answers[0].2, 1);
    let first_ts = answers[0].3;

    assert_eq!(alice.send_one(&g, "m-2", "two").await.seq(), 2);
    assert_eq!(alice.send_one(&g, "m-3", "three").await.seq(), 3);

    // Again, after other messages, with another body: still the original answer.
    alice.send(&send_frame(&g, "dup-1", "changed body")).await;
    let again = alice
        .wait_for(|f| match f {
            ServerFrame::Accepted { cmid, seq, ts, .. } if cmid == "dup-1" => Some((*seq, *ts)),
            ServerFrame::Rejected { cmid, code, .. } => panic!("{cmid} rejected: {code}"),
            _ => None,
        })
        .await;
    assert_eq!(again, (1, first_ts));

    // Bob was online: each message was pushed to him once.
    let mut pushed = Vec::new();
    while pushed.len() < 3 {
        if let ServerFrame::Msg(m) = bob.next().await {
            pushed.push(Arc::unwrap_or_clone(m));
        }
    }

    // Dedup is per user, not per device: the same user's other device gets the same answer.
    let mut laptop = Client::connect(&server, "alice", "laptop").await;
    assert_eq!(
        laptop.send_one(&g, "dup-1", "from the laptop").await.seq(),
        1
    );
    // ...but another user's cmid is another message. (`accepted` comes before the push.)
    assert_eq!(bob.send_one(&g, "dup-1", "bob's own").await.seq(), 4);
    while pushed.len() < 4 {
        if let ServerFrame::Msg(m) = bob.next().await {
            pushed.push(Arc::unwrap_or_clone(m));
        }
    }

    let all = alice.sync_all(conv, 0).await;
    assert_seqs(&all, 1, 4, "sync");
    let cm: Vec<(&str, &str, &str)> = all
        .iter()
        .map(|m| (m.from.as_str(), m.cmid.as_str(), m.body.as_str()))
        .collect();
    assert_eq!(
        cm,
        [
            ("alice", "dup-1", "hello"),
            ("alice", "m-2", "two"),
            ("alice", "m-3", "three"),
            ("bob", "dup-1", "bob's own"),
        ]
    );
    assert_eq!(pushed, all);
    // Nothing more was pushed (a duplicate must not be fanned out again).
    bob.send(&ClientFrame::Ping { nonce: Some(9) }).await;
    match bob.next().await {
        ServerFrame::Pong { nonce, .. } => assert_eq!(nonce, Some(9)),
        other => panic!("bob got {other:?}"),
    }
    let overview = bob.convs().await;
    assert_eq!(overview.len(), 1);
    assert_eq!(overview[0].max_seq, 4);

    // The server counted three resends answered from the dedup table and four new messages.
    let m = server.metrics().await;
    assert_eq!(m.get("ordo_dedup_hits_total"), Some(&3.0), "{m:?}");
    assert_eq!(m.get("ordo_messages_accepted_total"), Some(&4.0), "{m:?}");
}
