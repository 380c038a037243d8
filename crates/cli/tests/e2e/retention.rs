//! Retention: removing old messages moves the first available seq.

use super::common::*;

#[tokio::test(flavor = "multi_thread")]
async fn retention_by_count_moves_the_first_available_seq() {
    let server = Server::start(&[]).await;
    let conv = "g-ret";
    server
        .create_group(conv, &["alice", "bob"], serde_json::json!({"max_count": 5}))
        .await;
    let mut alice = Client::connect(&server, "alice", "phone").await;
    let sent = cmids("ret", 10);
    assert_eq!(
        alice.send_all(&Target::conv(conv), &sent, 10).await,
        (1..=10).collect::<Vec<_>>()
    );

    let mut bob = Client::connect(&server, "bob", "phone").await;
    let page = bob.sync(conv, 0, None).await;
    assert_eq!(
        (page.first_seq, page.max_seq, page.has_more),
        (6, 10, false)
    );
    assert_seqs(&page.messages, 6, 10, "sync after 0");
    let got: Vec<&str> = page.messages.iter().map(|m| m.cmid.as_str()).collect();
    assert_eq!(got, &sent[5..]);
    let page = bob.sync(conv, 3, None).await;
    assert_eq!(page.first_seq, 6);
    assert_seqs(&page.messages, 6, 10, "sync after 3");
    let page = bob.sync(conv, 7, None).await;
    assert_seqs(&page.messages, 8, 10, "sync after 7");

    let info = bob.convs().await;
    assert_eq!(info.len(), 1);
    assert_eq!((info[0].first_seq, info[0].max_seq), (6, 10));

    let r = server.admin_get(&format!("/v1/admin/groups/{conv}")).await;
    let group: serde_json::Value = serde_json::from_str(&r.body).expect("json");
    assert_eq!(
        (group["first_seq"].as_u64(), group["max_seq"].as_u64()),
        (Some(6), Some(10))
    );
}
