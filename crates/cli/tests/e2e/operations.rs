//! Running the real binary the way an operator does: settings from a TOML file (flags win),
//! age-based retention on the housekeeping timer, and a client that stops reading being cut
//! off without anyone else noticing.

use super::common::*;
use ordo_protocol::{ClientFrame, ServerFrame};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[tokio::test(flavor = "multi_thread")]
async fn settings_come_from_the_config_file_and_flags_win() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("ordo.toml");
    std::fs::write(
        &file,
        "max_body_bytes = 2000\nmax_frame_bytes = 8192\nmax_sync_limit = 500\n",
    )
    .expect("write config");
    let server = Server::start(&[
        "--config",
        file.to_str().expect("utf-8 path"),
        "--max-sync-limit",
        "77",
    ])
    .await;
    let c = WireClientHelper::connect(&server, "alice").await;
    match c.welcome {
        ServerFrame::Welcome { limits, .. } => {
            assert_eq!(limits.max_body_bytes, 2000, "from the file");
            assert_eq!(limits.max_frame_bytes, 8192, "from the file");
            assert_eq!(limits.max_sync_limit, 77, "the flag wins over the file");
        }
        other => panic!("expected welcome, got {other:?}"),
    }
    c.client.close().await;

    // A file with an unknown key is refused at start with a clear message.
    std::fs::write(&file, "max_body_bytez = 1\n").expect("write config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ordo"))
        .args(["serve", "--config", file.to_str().expect("utf-8 path")])
        .output()
        .expect("run ordo");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_body_bytez"), "names the bad key: {err}");
}

/// `Client::connect` with the `welcome` kept for inspection.
struct WireClientHelper {
    client: ordo_testkit::wire::WireClient,
    welcome: ServerFrame,
}

impl WireClientHelper {
    async fn connect(server: &Server, user: &str) -> Self {
        let mut client = ordo_testkit::wire::WireClient::connect(
            &server.ws_url(),
            &token(user, "d1"),
            ordo_protocol::Encoding::Json,
        )
        .await
        .expect("connect");
        let welcome = client.recv_timeout(WAIT).await.expect("welcome");
        WireClientHelper { client, welcome }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn age_retention_removes_old_messages_and_reports_first_seq() {
    let server = Server::start(&["--housekeeping-secs", "1"]).await;
    server
        .create_group(
            "old",
            &["alice", "bob"],
            serde_json::json!({"max_age_ms": 3000}),
        )
        .await;
    let g = Target::conv("old");
    let mut alice = Client::connect(&server, "alice", "a1").await;
    assert_eq!(alice.send_all(&g, &cmids("early", 3), 3).await, [1, 2, 3]);
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert_eq!(alice.send_all(&g, &cmids("late", 2), 2).await, [4, 5]);

    let mut bob = Client::connect(&server, "bob", "b1").await;
    let deadline = Instant::now() + WAIT;
    let page = loop {
        let page = bob.sync("old", 0, None).await;
        if page.first_seq >= 4 || Instant::now() > deadline {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(page.first_seq, 4, "the three early messages are gone");
    assert_eq!(seqs(&page.messages), vec![4, 5], "the late ones are kept");
    let info = bob.convs().await;
    let old = info
        .iter()
        .find(|c| c.conv == "old")
        .expect("bob is a member");
    assert_eq!((old.first_seq, old.max_seq), (4, 5));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_is_cut_off_and_nobody_else_notices() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("ordo.toml");
    std::fs::write(&file, "outbound_queue = 16\nidle_timeout_secs = 15\n").expect("write config");
    let server = Server::start(&["--config", file.to_str().expect("utf-8 path")]).await;
    server
        .create_group("big", &["alice", "bob", "carol"], serde_json::json!({}))
        .await;
    let g = Target::conv("big");
    let mut alice = Client::connect(&server, "alice", "a1").await;
    let body = "b".repeat(30_000);
    for i in 0..20 {
        alice.send_one(&g, &format!("big-{i}"), &body).await.seq();
    }

    // Bob asks for the same ~600 KB page again and again and never reads the answers.
    let mut bob = Client::connect(&server, "bob", "b1").await;
    for _ in 0..400 {
        if bob
            .wire
            .send(&ClientFrame::Sync {
                conv: "big".into(),
                after: 0,
                limit: None,
            })
            .await
            .is_err()
        {
            break; // the server already closed on us
        }
    }

    // Meanwhile everyone else is served as usual.
    let mut carol = Client::connect(&server, "carol", "c1").await;
    carol.ping(7).await;
    assert_eq!(alice.send_one(&g, "after", "still here").await.seq(), 21);
    // Bob's reads wait for his answers to go out; after 5 s (a third of the idle timeout) with
    // nothing going out, he is taken for a client that does not read.
    tokio::time::sleep(std::time::Duration::from_secs(7)).await;

    // When bob finally reads, his stream ends early: with a 1013 close after what had been
    // queued for him, or with a reset (the server closed a socket holding requests it will
    // never read, and TCP then discards what was in flight).
    let mut pages = 0;
    let ending = loop {
        match bob.recv_raw().await {
            Ok(Some(WsMessage::Close(f))) => break format!("{:?}", f.map(|f| u16::from(f.code))),
            Ok(Some(WsMessage::Text(_))) => pages += 1,
            Ok(Some(_)) => {}
            Ok(None) => break "end of stream".to_string(),
            Err(e) => break format!("error: {e}"),
        }
    };
    assert!(
        ending == "Some(1013)" || ending.contains("reset"),
        "unexpected ending after {pages} pages: {ending}"
    );
    assert!(pages < 400, "bob was cut off, not served all 400 pages");
    let m = server.metrics().await;
    assert!(
        m.get("ordo_slow_consumers_dropped_total")
            .is_some_and(|&n| n > 0.0),
        "the drop is counted: {m:?}"
    );
}

/// A connection with refused sends held back in more conversations than the server keeps in
/// order is closed with 1013 and a reason saying so (answers still queued for it may not go out
/// first: the client resends whatever is pending anyway); the device reconnects and is served.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_with_too_many_held_back_sends_is_closed_with_1013() {
    let server = Server::start_with_rate(0.01, &[]).await;
    let mut alice = Client::connect(&server, "alice", "a1").await;
    // The one token goes to the first send; the next 64 are refused for rate and held back,
    // each in its own direct conversation; the 65th cannot be held back too.
    for i in 0..=65 {
        let frame = ClientFrame::Send {
            conv: None,
            to: Some(format!("peer{i}")),
            cmid: format!("d{i}"),
            body: "hi".into(),
            reply_to: None,
        };
        alice.wire.send(&frame).await.expect("send");
    }
    let mut accepted = 0;
    let ending = loop {
        match alice.recv_raw().await {
            Ok(Some(WsMessage::Close(f))) => {
                break f.map(|f| (u16::from(f.code), f.reason.to_string()))
            }
            Ok(Some(WsMessage::Text(t))) => {
                if t.contains("\"accepted\"") {
                    accepted += 1;
                }
            }
            Ok(Some(_)) => {}
            other => panic!("no close frame: {other:?}"),
        }
    };
    let (code, reason) = ending.expect("a close frame with a code");
    assert_eq!(code, 1013);
    assert!(
        reason.contains("resend pending messages in order"),
        "{reason}"
    );
    assert!(accepted <= 1, "only the first send had a token");
    // A new connection is served.
    let mut again = Client::connect(&server, "alice", "a1").await;
    again.ping(1).await;
}

/// Every error answer of the HTTP API is JSON `{"error":{"code","message"}}`: an unknown path
/// (404), a method a path does not take (405), a body over the limit (413), a malformed body
/// (400), a request to `/v1/ws` that is not a WebSocket upgrade.
#[tokio::test(flavor = "multi_thread")]
async fn every_http_error_is_json() {
    let server = Server::start(&[]).await;
    let base = server.http_url();
    let http = reqwest::Client::new();
    let key = server.admin_key().to_string();
    let cases = [
        (http.get(format!("{base}/no/such/path")), 404, "not_found"),
        (
            http.delete(format!("{base}/healthz")),
            405,
            "method_not_allowed",
        ),
        (
            http.post(format!("{base}/v1/admin/groups"))
                .bearer_auth(&key)
                .header("content-type", "application/json")
                .body("{not json"),
            400,
            "malformed",
        ),
        (http.get(format!("{base}/v1/ws")), 400, "malformed"),
    ];
    for (req, status, code) in cases {
        let resp = req.send().await.expect("an answer");
        let got = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body: serde_json::Value = resp
            .json()
            .await
            .unwrap_or_else(|e| panic!("{got}: not JSON: {e}"));
        assert_eq!(got, status, "{body}");
        assert!(ct.starts_with("application/json"), "{ct}");
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }
    // A body over the limit (2 MiB) is refused once the server has read that much; the client
    // may not get to write the rest (so this one is spoken by hand, writing while it reads).
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let head = format!(
        "POST /v1/admin/groups HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        3 << 20
    );
    tokio::spawn(async move {
        let _ = wr.write_all(head.as_bytes()).await;
        let _ = wr.write_all(&vec![b' '; 3 << 20]).await;
    });
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), rd.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("application/json"), "{answer}");
    assert!(answer.contains("\"too_large\""), "{answer}");
}
