//! The app's backend taking part: messages posted through the admin API (as a user or as the
//! system), idempotent by cmid across a `kill -9`, ordered with client sends; group changes
//! recorded as system events that every device sees at the same place, and reported by the SDK.

use super::common::*;
use ordo_client::{Client as SdkClient, ClientOptions, Event};
use ordo_protocol::{ConvEvent, Message};
use serde_json::{json, Value};

async fn post(server: &Server, body: Value) -> (u16, Value) {
    let r = server.admin_post("/v1/admin/messages", body).await;
    let v: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
    (r.status, v)
}

async fn patch(server: &Server, id: &str, body: Value) {
    let r = server
        .admin()
        .patch(&format!("/v1/admin/groups/{id}"), &body)
        .await
        .expect("PATCH");
    assert_eq!(r.status, 200, "PATCH {id} {body}: {}", r.body);
}

/// What a device sees of a message: (seq, from, body, event).
fn seen(m: &Message) -> (u64, String, String, Option<ConvEvent>) {
    (m.seq, m.from.clone(), m.body.clone(), m.event.clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_post_is_deduplicated_and_ordered_between_client_sends() {
    let mut server = Server::start(&[]).await;
    server
        .create_group("team", &["alice", "bob"], json!({}))
        .await;
    let g = Target::conv("team");
    let mut alice = Client::connect(&server, "alice", "a1").await;
    let mut bob = Client::connect(&server, "bob", "b1").await;

    assert_eq!(alice.send_one(&g, "a-1", "first").await.seq(), 1);
    let (status, first) = post(
        &server,
        json!({"conv": "team", "cmid": "welcome-1", "body": "Welcome!"}),
    )
    .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(
        (first["seq"].as_u64(), first["duplicate"].as_bool()),
        (Some(2), Some(false))
    );
    assert_eq!(alice.send_one(&g, "a-2", "second").await.seq(), 3);
    let (_, again) = post(
        &server,
        json!({"conv": "team", "cmid": "welcome-1", "body": "Welcome!"}),
    )
    .await;
    assert_eq!(
        (
            again["seq"].as_u64(),
            again["duplicate"].as_bool(),
            &again["ts"]
        ),
        (Some(2), Some(true), &first["ts"]),
        "the same cmid is the same message"
    );
    let (_, as_bob) = post(
        &server,
        json!({"conv": "team", "from": "bob", "cmid": "import-1", "body": "from the old system"}),
    )
    .await;
    assert_eq!(as_bob["seq"].as_u64(), Some(4));

    // Refusals say why.
    let (status, e) = post(
        &server,
        json!({"conv": "team", "from": "carol", "cmid": "x-1", "body": "hi"}),
    )
    .await;
    assert_eq!(status, 400, "not a member: {e}");
    let (status, _) = post(
        &server,
        json!({"conv": "nope", "cmid": "x-2", "body": "hi"}),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = post(
        &server,
        json!({"conv": "team", "cmid": "bad id!", "body": "hi"}),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = post(&server, json!({"to": "bob", "cmid": "x-3", "body": "hi"})).await;
    assert_eq!(status, 400, "`to` needs `from`");

    // A direct conversation, created by the post.
    let (status, direct) = post(
        &server,
        json!({"to": "bob", "from": "alice", "cmid": "dm-1", "body": "psst"}),
    )
    .await;
    assert_eq!(status, 200, "{direct}");
    assert_eq!(direct["seq"].as_u64(), Some(1));
    assert_eq!(
        direct["conv"].as_str(),
        Some(ordo_protocol::direct_conv_id("alice", "bob").as_str())
    );

    // Bob saw the group's messages pushed in seq order, the posts among them; a sync agrees.
    let want = vec![
        (1, "alice".into(), "first".into(), None),
        (2, "".into(), "Welcome!".into(), None),
        (3, "alice".into(), "second".into(), None),
        (4, "bob".into(), "from the old system".into(), None),
    ];
    let mut pushed = Vec::new();
    while pushed.len() < 4 {
        let m = bob
            .wait_for(|f| match f {
                ordo_protocol::ServerFrame::Msg(m) if m.conv == "team" => Some(seen(m)),
                _ => None,
            })
            .await;
        pushed.push(m);
    }
    assert_eq!(pushed, want);
    let synced: Vec<_> = bob.sync_all("team", 0).await.iter().map(seen).collect();
    assert_eq!(synced, want);

    // After a kill -9 the server answers the repeat from its store.
    server.kill9();
    server.restart().await;
    let (_, after) = post(
        &server,
        json!({"conv": "team", "cmid": "welcome-1", "body": "Welcome!"}),
    )
    .await;
    assert_eq!(
        (after["seq"].as_u64(), after["duplicate"].as_bool()),
        (Some(2), Some(true)),
        "{after}"
    );
    let (_, next) = post(
        &server,
        json!({"conv": "team", "cmid": "welcome-2", "body": "!"}),
    )
    .await;
    assert_eq!(next["seq"].as_u64(), Some(5));
}

#[tokio::test(flavor = "multi_thread")]
async fn membership_events_are_seen_in_the_same_order_by_every_device() {
    let server = Server::start(&[]).await;
    server.create_group("g", &["alice", "bob"], json!({})).await;
    let g = Target::conv("g");
    let mut alice = Client::connect(&server, "alice", "a1").await;
    let mut bob2 = Client::connect(&server, "bob", "b2").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut opts = ClientOptions::new(
        server.ws_url(),
        token("bob", "b1"),
        dir.path().join("bob.redb"),
    );
    opts.reconnect.initial_ms = 100;
    let mut bob_sdk = SdkClient::open(opts).await.expect("open the SDK");

    assert_eq!(alice.send_one(&g, "m1", "one").await.seq(), 1);
    patch(&server, "g", json!({"add": ["carol", "dave"]})).await;
    assert_eq!(alice.send_one(&g, "m2", "two").await.seq(), 3);
    patch(
        &server,
        "g",
        json!({"name": "The team", "metadata": {"topic": "launch"}}),
    )
    .await;
    patch(&server, "g", json!({"leave": ["dave"]})).await;
    patch(&server, "g", json!({"remove": ["bob"]})).await;
    assert_eq!(alice.send_one(&g, "m3", "three").await.seq(), 7);

    let users = |u: &[&str]| u.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let sys = |seq, e| (seq, String::new(), String::new(), Some(e));
    let want = vec![
        (1, "alice".to_string(), "one".to_string(), None),
        sys(
            2,
            ConvEvent::Joined {
                users: users(&["carol", "dave"]),
            },
        ),
        (3, "alice".to_string(), "two".to_string(), None),
        sys(
            4,
            ConvEvent::Renamed {
                name: "The team".into(),
            },
        ),
        sys(
            5,
            ConvEvent::Left {
                users: users(&["dave"]),
            },
        ),
        sys(
            6,
            ConvEvent::Removed {
                users: users(&["bob"]),
            },
        ),
        (7, "alice".to_string(), "three".to_string(), None),
    ];
    let of = |list: Vec<Message>| list.iter().map(seen).collect::<Vec<_>>();
    assert_eq!(of(alice.sync_all("g", 0).await), want, "alice");
    let mut carol = Client::connect(&server, "carol", "c1").await;
    assert_eq!(
        of(carol.sync_all("g", 0).await),
        want,
        "carol (added later, reads it all)"
    );
    let group = server.admin_get("/v1/admin/groups/g").await;
    let group: Value = serde_json::from_str(&group.body).expect("JSON");
    assert_eq!(group["name"], "The team");
    assert_eq!(group["metadata"]["topic"], "launch");
    let info = carol.convs().await;
    assert_eq!(info[0].name.as_deref(), Some("The team"));

    // Bob's devices were pushed everything up to their removal, and nothing after.
    let mut bob_seen = Vec::new();
    while bob_seen.last().map(|s: &(u64, _, _, _)| s.0) != Some(6) {
        let m = bob2
            .wait_for(|f| match f {
                ordo_protocol::ServerFrame::Msg(m) => Some(seen(m)),
                _ => None,
            })
            .await;
        bob_seen.push(m);
    }
    assert_eq!(bob_seen, want[..6].to_vec());
    bob2.send(&ordo_protocol::ClientFrame::Sync {
        conv: "g".into(),
        after: 0,
        limit: None,
    })
    .await;
    let code = bob2
        .wait_for(|f| match f {
            ordo_protocol::ServerFrame::Error { code, .. } => Some(*code),
            _ => None,
        })
        .await;
    assert_eq!(
        code,
        ordo_protocol::ErrorCode::NotFound,
        "a removed member reads nothing more"
    );

    // The SDK hands the events over in order and reports the removal.
    let mut got = Vec::new();
    let removed = loop {
        match tokio::time::timeout(WAIT, bob_sdk.next_event()).await {
            Ok(Some(Event::Message(m))) => got.push(seen(&m)),
            Ok(Some(Event::Removed { conv, seq, left })) => break (conv, seq, left),
            Ok(Some(_)) => {}
            other => panic!("bob's SDK: {other:?}"),
        }
    };
    assert_eq!(removed, ("g".to_string(), 6, false));
    assert_eq!(got, want[..6].to_vec());
}

#[tokio::test(flavor = "multi_thread")]
async fn groups_are_listed_and_deleted() {
    let mut server = Server::start(&[]).await;
    for id in ["alpha", "bravo", "charlie"] {
        server.create_group(id, &["alice", "bob"], json!({})).await;
    }
    let mut alice = Client::connect(&server, "alice", "a1").await;
    let mut bob = Client::connect(&server, "bob", "b1").await;
    // A direct conversation is not a group.
    alice.send_one(&Target::to("bob"), "dm", "hi").await.seq();
    let g = Target::conv("bravo");
    assert_eq!(alice.send_one(&g, "b-1", "one").await.seq(), 1);
    let epoch = alice.sync("bravo", 0, None).await.epoch;

    let list = |after: Option<&str>, limit: usize| {
        let path = match after {
            Some(a) => format!("/v1/admin/groups?after={a}&limit={limit}"),
            None => format!("/v1/admin/groups?limit={limit}"),
        };
        let server = &server;
        async move {
            let r = server.admin_get(&path).await;
            assert_eq!(r.status, 200, "{}", r.body);
            let v: Value = serde_json::from_str(&r.body).expect("JSON");
            let ids: Vec<String> = v["groups"]
                .as_array()
                .expect("groups")
                .iter()
                .map(|g| g["id"].as_str().expect("id").to_string())
                .collect();
            (ids, v["has_more"].as_bool().expect("has_more"))
        }
    };
    assert_eq!(
        list(None, 2).await,
        (vec!["alpha".to_string(), "bravo".to_string()], true)
    );
    assert_eq!(
        list(Some("bravo"), 2).await,
        (vec!["charlie".to_string()], false)
    );
    assert_eq!(
        server.admin_get("/v1/admin/groups?limit=0").await.status,
        400
    );

    let r = server
        .admin()
        .delete("/v1/admin/groups/bravo")
        .await
        .expect("DELETE");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        serde_json::from_str::<Value>(&r.body).expect("JSON"),
        json!({"id": "bravo", "deleted": true})
    );
    // Its members' devices are told they were removed.
    let removed = bob
        .wait_for(|f| match f {
            ordo_protocol::ServerFrame::Msg(m) if m.conv == "bravo" && m.event.is_some() => {
                Some(m.event.clone())
            }
            _ => None,
        })
        .await;
    assert_eq!(
        removed,
        Some(ConvEvent::Removed {
            users: vec!["alice".into(), "bob".into()]
        })
    );
    assert_eq!(server.admin_get("/v1/admin/groups/bravo").await.status, 404);
    let again = server
        .admin()
        .delete("/v1/admin/groups/bravo")
        .await
        .expect("DELETE");
    assert_eq!(again.status, 404);
    let (status, _) = post(&server, json!({"conv": "bravo", "cmid": "x", "body": "?"})).await;
    assert_eq!(status, 404, "nothing is posted into a deleted group");
    assert_eq!(
        list(None, 10).await,
        (vec!["alpha".to_string(), "charlie".to_string()], false)
    );

    // Its id makes a new group, across a restart: a new epoch, no old message.
    server.kill9();
    server.restart().await;
    assert_eq!(server.admin_get("/v1/admin/groups/bravo").await.status, 404);
    server.create_group("bravo", &["alice"], json!({})).await;
    let mut alice = Client::connect(&server, "alice", "a1").await;
    let synced = alice.sync("bravo", 0, None).await;
    assert_ne!(synced.epoch, epoch, "a new group, a new epoch");
    assert!(synced.messages.is_empty(), "{:?}", synced.messages);
    let seq = alice.send_one(&g, "b-2", "new").await.seq();
    assert!(seq > 2, "seqs go on after the deleted group's: {seq}");
    assert_eq!(seqs(&alice.sync_all("bravo", 0).await), vec![seq]);
}
