//! SIGTERM: a clean exit that keeps everything accepted and closes connections with 1001.

use super::common::*;
use ordo_protocol::{Encoding, ServerFrame};
use std::collections::{BTreeMap, HashMap};
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_exits_cleanly_and_keeps_everything_accepted() {
    let mut server = Server::start(&[]).await;
    let conv = "g-term";
    server
        .create_group(conv, &["alice", "bob"], serde_json::json!({}))
        .await;
    let g = Target::conv(conv);
    let mut alice = Client::connect(&server, "alice", "phone").await;
    let mut bob = Client::connect(&server, "bob", "phone").await;
    let first = cmids("term", 50);
    let mut accepted: HashMap<String, u64> = first
        .iter()
        .cloned()
        .zip(alice.send_all(&g, &first, 16).await)
        .collect();
    // Bob's delivered and read positions must survive too.
    bob.ack(conv, 50).await;
    bob.read(conv, 40).await;
    bob.wait_for(|f| match f {
        ServerFrame::Receipt {
            user,
            delivered: 50,
            read: 40,
            ..
        } if user == "bob" => Some(()),
        _ => None,
    })
    .await;
    let epoch = bob.convs().await[0].epoch;

    // Then a stream of sends, `window` of them unanswered, when the signal comes.
    let more = cmids("late", 300);
    let window = 32;
    let mut sent = 0;
    let mut late_accepted = 0;
    while late_accepted < 50 {
        while sent < more.len() && sent - late_accepted < window {
            alice.send(&send_frame(&g, &more[sent], &more[sent])).await;
            sent += 1;
        }
        match alice.next().await {
            ServerFrame::Accepted { cmid, seq, .. } => {
                assert!(accepted.insert(cmid, seq).is_none());
                late_accepted += 1;
            }
            ServerFrame::Rejected { cmid, code, .. } => panic!("{cmid} rejected: {code}"),
            _ => {}
        }
    }
    let status = server.sigterm().await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );

    // Whatever `accepted` was already on its way still counts. Connected clients are told to
    // go away with 1001 (but see `sigterm_closes_every_connection_with_1001`: a connection is
    // sometimes reset instead, so this test does not insist).
    let mut closes = Vec::new();
    for c in [&mut alice, &mut bob] {
        let end = loop {
            match c.recv_raw().await {
                Ok(Some(WsMessage::Text(t))) => {
                    if let Ok(ServerFrame::Accepted { cmid, seq, .. }) =
                        ordo_protocol::decode_server(t.as_bytes(), Encoding::Json)
                    {
                        assert!(accepted.insert(cmid, seq).is_none());
                    }
                }
                Ok(Some(WsMessage::Close(f))) => break Some(f.map(|f| u16::from(f.code))),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break None,
            }
        };
        closes.push(end);
    }
    for end in &closes {
        assert!(
            matches!(end, Some(Some(1001)) | None),
            "a connection was closed with {end:?} at shutdown"
        );
    }

    server.restart().await;
    let mut alice = Client::connect(&server, "alice", "phone").await;
    let stored = alice.sync_all(conv, 0).await;
    assert_seqs(&stored, 1, stored.len() as u64, "after SIGTERM");
    for (cmid, seq) in &accepted {
        assert_eq!(
            stored.get((*seq - 1) as usize).map(|m| m.cmid.as_str()),
            Some(cmid.as_str()),
            "{cmid} was accepted as {seq}"
        );
    }
    // A prefix of what was sent, in send order.
    let in_order: Vec<&String> = first.iter().chain(&more).collect();
    assert!(stored.len() <= 50 + sent);
    for (i, m) in stored.iter().enumerate() {
        assert_eq!(&m.cmid, in_order[i]);
    }
    eprintln!(
        "sigterm: {} accepted, {} stored after restart",
        accepted.len(),
        stored.len()
    );
    let mut bob = Client::connect(&server, "bob", "phone").await;
    let info = bob.convs().await;
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].epoch, epoch, "epoch changed across a restart");
    assert_eq!((info[0].delivered, info[0].read), (50, 40), "bob's cursor");
    let bob_pos = info[0]
        .members
        .iter()
        .find(|m| m.user == "bob")
        .map(|m| (m.delivered, m.read));
    assert_eq!(bob_pos, Some((50, 40)), "bob's published position");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_closes_every_connection_with_1001() {
    let mut ends: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..10 {
        let mut server = Server::start(&[]).await;
        let mut clients = Vec::new();
        for i in 0..100 {
            clients.push(Client::connect(&server, &format!("user{i}"), "phone").await);
        }
        let status = server.sigterm().await;
        assert_eq!(status.code(), Some(0));
        for c in &mut clients {
            let end = loop {
                match c.recv_raw().await {
                    Ok(Some(WsMessage::Close(f))) => {
                        break format!("close {:?}", f.map(|f| u16::from(f.code)))
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break "end of stream without a close frame".to_string(),
                    Err(e) => break format!("error: {e}"),
                }
            };
            *ends.entry(end).or_default() += 1;
        }
    }
    assert_eq!(
        ends.keys().collect::<Vec<_>>(),
        ["close Some(1001)"],
        "how 1000 connections ended at SIGTERM: {ends:?}"
    );
}
