//! The server on the PostgreSQL store: messages accepted before a `kill -9` are all there after
//! the restart, in order and once, and a resend is answered from the database's dedup entries.
//! Each test uses a schema of its own in the database `ORDO_TEST_POSTGRES` names (by default
//! the local server's `test` database), dropped after. Without a reachable PostgreSQL the test
//! is skipped with the reason printed, except in CI (`CI=true`), where it fails.

use super::common::*;
use ordo_store_postgres::test_schema::TestSchema;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn nothing_accepted_is_lost_across_a_kill_on_postgresql() {
    // The synchronous client runs a runtime of its own: not on this one's threads.
    let made = tokio::task::block_in_place(|| {
        TestSchema::create("nothing_accepted_is_lost_across_a_kill_on_postgresql")
    });
    let Some(schema) = made else {
        return;
    };
    let url = schema.url();
    let mut server = Server::start(&["--store", &url]).await;
    server
        .create_group("team", &["alice", "bob"], json!({}))
        .await;
    let g = Target::conv("team");
    let mut alice = Client::connect(&server, "alice", "a1").await;
    let ids = cmids("m", 200);
    let seqs = alice.send_all(&g, &ids, 32).await;
    assert_eq!(seqs, (1..=200).collect::<Vec<u64>>());
    let dm = alice.send_one(&Target::to("bob"), "dm-1", "hi").await.seq();
    assert_eq!(dm, 1);

    server.kill9();
    server.restart().await;
    let mut bob = Client::connect(&server, "bob", "b1").await;
    let got = bob.sync_all("team", 0).await;
    assert_seqs(&got, 1, 200, "bob after the restart");
    let bodies: Vec<&str> = got.iter().map(|m| m.cmid.as_str()).collect();
    assert_eq!(bodies, ids.iter().map(String::as_str).collect::<Vec<_>>());
    // A resend of an accepted message is answered from the database: the same seq.
    let mut alice = Client::connect(&server, "alice", "a1").await;
    assert_eq!(alice.send_one(&g, "m-0007", "again").await.seq(), 8);
    assert_eq!(alice.send_one(&g, "m-new", "new").await.seq(), 201);
    let overview = bob.convs().await;
    assert_eq!(overview.len(), 2, "{overview:?}");
    server.kill9();
    tokio::task::block_in_place(|| drop(schema));
}
