//! Authorization (G8): non-members and bad credentials are refused.

use super::common::*;
use ordo_protocol::{direct_conv_id, ClientFrame, Encoding, ErrorCode, ServerFrame};

#[tokio::test(flavor = "multi_thread")]
async fn non_members_and_bad_credentials_are_rejected() {
    let server = Server::start(&[]).await;
    let conv = "g-private";
    server
        .create_group(conv, &["alice", "bob"], serde_json::json!({}))
        .await;
    let g = Target::conv(conv);
    let mut alice = Client::connect(&server, "alice", "phone").await;
    let mut carol = Client::connect(&server, "carol", "phone").await;
    assert_eq!(alice.send_one(&g, "a-1", "secret").await.seq(), 1);

    // Write: rejected, not retryable.
    carol.send(&send_frame(&g, "c-1", "let me in")).await;
    match carol.next().await {
        ServerFrame::Rejected {
            cmid,
            code,
            retryable,
            ..
        } => {
            assert_eq!(
                (cmid.as_str(), code, retryable),
                ("c-1", ErrorCode::NotFound, false)
            );
        }
        other => panic!("expected rejected, got {other:?}"),
    }
    // Read: an error, and no history.
    carol
        .send(&ClientFrame::Sync {
            conv: conv.into(),
            after: 0,
            limit: None,
        })
        .await;
    match carol.next().await {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::NotFound),
        other => panic!("expected error not_found, got {other:?}"),
    }
    // Positions: also refused.
    carol.ack(conv, 1).await;
    match carol.next().await {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::NotFound),
        other => panic!("expected error not_found, got {other:?}"),
    }
    carol.read(conv, 1).await;
    match carol.next().await {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::NotFound),
        other => panic!("expected error not_found, got {other:?}"),
    }
    // Someone else's direct conversation.
    let mut bob = Client::connect(&server, "bob", "phone").await;
    assert_eq!(
        bob.send_one(&Target::to("alice"), "b-1", "hi").await.seq(),
        1
    );
    let direct = direct_conv_id("alice", "bob");
    assert_eq!(
        carol.send_one(&Target::conv(&direct), "c-3", "x").await,
        SendResult::Rejected(ErrorCode::NotFound)
    );
    // A conversation that does not exist.
    assert_eq!(
        carol.send_one(&Target::conv("g-nope"), "c-2", "x").await,
        SendResult::Rejected(ErrorCode::NotFound)
    );
    // The message alice sends now is not pushed to carol (the push would be queued before
    // alice's `accepted`, so it would come before the pong), and the group is not in carol's
    // overview.
    assert_eq!(alice.send_one(&g, "a-2", "secret 2").await.seq(), 2);
    carol.send(&ClientFrame::Ping { nonce: Some(2) }).await;
    match carol.next().await {
        ServerFrame::Pong { nonce, .. } => assert_eq!(nonce, Some(2)),
        other => panic!("carol got {other:?}"),
    }
    assert!(carol.convs().await.is_empty());
    // The members still see exactly their two messages.
    assert_seqs(&alice.sync_all(conv, 0).await, 1, 2, "members' view");

    // Tokens at the upgrade.
    let url = server.ws_url();
    let bad = [
        "garbage".to_string(),
        "a.b".to_string(),
        ordo_server::auth::TokenKey::new(b"another-secret")
            .sign(&ordo_server::auth::Claims {
                user: "alice".into(),
                device: "phone".into(),
                exp: now_secs() + 3600,
                iat: None,
            })
            .expect("sign"),
        ordo_server::auth::TokenKey::new(SECRET.as_bytes())
            .sign(&ordo_server::auth::Claims {
                user: "alice".into(),
                device: "phone".into(),
                exp: now_secs() - 10,
                iat: None,
            })
            .expect("sign"),
        String::new(),
    ];
    for t in &bad {
        let e = ordo_testkit::wire::WireClient::connect(&url, t, Encoding::Json)
            .await
            .err()
            .unwrap_or_else(|| panic!("token {t:?} was accepted"));
        assert_eq!(http_status(e), 401, "token {t:?}");
    }
    // No Authorization header at all.
    match tokio_tungstenite::connect_async(format!("{url}/v1/ws")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status().as_u16(), 401)
        }
        Err(e) => panic!("expected 401, got {e}"),
        Ok(_) => panic!("connected without a token"),
    }

    // Admin API without the key, or with a wrong one.
    let http = reqwest::Client::new();
    let base = server.http_url();
    let body = serde_json::json!({"id": "g-evil", "members": ["carol"]});
    let r = http
        .post(format!("{base}/v1/admin/groups"))
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 401);
    let r = http
        .post(format!("{base}/v1/admin/groups"))
        .bearer_auth("wrong-key")
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 401);
    let r = http
        .patch(format!("{base}/v1/admin/groups/{conv}"))
        .json(&serde_json::json!({"add": ["carol"]}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 401);
    let r = http
        .get(format!("{base}/v1/admin/groups/{conv}"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 401);
    let r = http
        .post(format!("{base}/v1/admin/tokens"))
        .json(&serde_json::json!({"user": "carol", "device": "x"}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 401);
    // Nothing changed: g-evil does not exist, carol is still not a member.
    let r = http
        .get(format!("{base}/v1/admin/groups/g-evil"))
        .bearer_auth(server.admin_key())
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 404);
    let r = http
        .get(format!("{base}/v1/admin/groups/{conv}"))
        .bearer_auth(server.admin_key())
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 200);
    let group: serde_json::Value = r.json().await.expect("json");
    assert_eq!(group["members"], serde_json::json!(["alice", "bob"]));
    // With the key, a token can be minted and it works.
    let r = server
        .admin_post(
            "/v1/admin/tokens",
            serde_json::json!({"user": "bob", "device": "tablet", "ttl_secs": 600}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
    let t = v["token"].as_str().expect("token");
    let mut w = ordo_testkit::wire::WireClient::connect(&url, t, Encoding::Json)
        .await
        .expect("minted token works");
    match w.recv_timeout(WAIT).await.expect("welcome") {
        ServerFrame::Welcome { user, device, .. } => {
            assert_eq!((user.as_str(), device.as_str()), ("bob", "tablet"))
        }
        other => panic!("expected welcome, got {other:?}"),
    }
}

/// A token that expires while its connection is open ends that connection then, with 4001 and
/// a reason; it does not keep working until the client happens to reconnect.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_is_closed_when_its_token_expires() {
    let server = Server::start(&[]).await;
    let short = ordo_testkit::token(SECRET, "alice", "phone", 2).expect("sign");
    let mut alice = Client {
        wire: ordo_testkit::wire::WireClient::connect(&server.ws_url(), &short, Encoding::Json)
            .await
            .expect("connect"),
        user: "alice".into(),
        device: "phone".into(),
    };
    let (code, reason) = expect_close(&mut alice).await;
    assert_eq!(code, 4001, "{reason}");
    assert!(reason.contains("expired"), "{reason}");
}
