//! Limits on connections: a socket that never sends its request is closed, a WebSocket that
//! answers nothing (not even pings) is closed with 4002, a user's connections are capped (HTTP
//! 429), and the server's sockets are capped (one more is closed at once); each gives its place
//! back when it ends.

use super::common::*;
use ordo_protocol::Encoding;
use std::time::Duration;
use tokio::io::AsyncReadExt;

async fn wire(server: &Server, user: &str, device: &str) -> Result<Client, u16> {
    match ordo_testkit::wire::WireClient::connect(
        &server.ws_url(),
        &token(user, device),
        Encoding::Json,
    )
    .await
    {
        Ok(wire) => Ok(Client {
            wire,
            user: user.into(),
            device: device.into(),
        }),
        Err(e) => Err(http_status(e)),
    }
}

/// Reads until the peer closes (EOF or reset); panics if it is still open after `within`.
async fn closed_within(tcp: &mut tokio::net::TcpStream, within: Duration) {
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(within, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    read.await.expect("the server closed the socket");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_socket_that_never_sends_its_request_is_closed() {
    let server = Server::start(&["--handshake-timeout-secs", "1"]).await;
    let addr = format!("127.0.0.1:{}", server.port());
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // Half a request line, then nothing.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut slow, b"GET /healthz HT")
        .await
        .unwrap();
    closed_within(&mut silent, Duration::from_secs(20)).await;
    closed_within(&mut slow, Duration::from_secs(20)).await;
}

/// The close frame a raw WebSocket receives, skipping other frames (the server's frames are
/// not masked). A raw socket, because a WebSocket library answers the server's pings as it reads,
/// which is just what this client must not do.
async fn raw_close(tcp: &mut tokio::net::TcpStream) -> (u16, String) {
    let mut head = [0u8; 2];
    loop {
        tcp.read_exact(&mut head).await.expect("a frame");
        let len = match head[1] & 0x7f {
            126 => u64::from(tcp.read_u16().await.unwrap()),
            127 => tcp.read_u64().await.unwrap(),
            n => u64::from(n),
        };
        let mut payload = vec![0u8; len as usize];
        tcp.read_exact(&mut payload).await.expect("a payload");
        if head[0] & 0x0f == 0x8 {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            return (code, String::from_utf8_lossy(&payload[2..]).into_owned());
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_that_answers_nothing_is_closed_with_4002() {
    let server = Server::start(&["--idle-timeout-secs", "3"]).await;
    let mut mute = tokio::net::TcpStream::connect(format!("127.0.0.1:{}", server.port()))
        .await
        .unwrap();
    let request = format!(
        "GET /v1/ws?token={} HTTP/1.1\r\nHost: ordo\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        token("alice", "phone")
    );
    tokio::io::AsyncWriteExt::write_all(&mut mute, request.as_bytes())
        .await
        .unwrap();
    let mut response = Vec::new();
    while !response.ends_with(b"\r\n\r\n") {
        response.push(mute.read_u8().await.expect("the upgrade response"));
    }
    assert!(
        response.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&response)
    );
    let (code, reason) = tokio::time::timeout(Duration::from_secs(30), raw_close(&mut mute))
        .await
        .expect("closed");
    assert_eq!(code, 4002, "{reason}");
    assert!(reason.contains("nothing heard"), "{reason}");
    // A client that reads answers the pings and stays, past several idle timeouts.
    let mut live = wire(&server, "alice", "tablet").await.expect("connect");
    for nonce in 0..4 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        live.ping(nonce).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_users_connections_are_capped() {
    let server = Server::start(&["--max-connections-per-user", "2"]).await;
    let a = wire(&server, "alice", "a").await.expect("first");
    let _b = wire(&server, "alice", "b").await.expect("second");
    assert_eq!(wire(&server, "alice", "c").await.err(), Some(429));
    // Another user is not affected.
    let _bob = wire(&server, "bob", "a").await.expect("bob");
    // One closed: its place is given back (once the server has seen it go).
    a.close().await;
    let mut again = None;
    for _ in 0..100 {
        if let Ok(c) = wire(&server, "alice", "c").await {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    again.expect("a place after one closed").ping(1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_servers_sockets_are_capped() {
    let server = Server::start(&["--max-connections", "3"]).await;
    let healthz = format!("{}/healthz", server.http_url());
    let http = reqwest::Client::new();
    let a = wire(&server, "alice", "a").await.expect("first");
    let _b = wire(&server, "bob", "a").await.expect("second");
    let _c = wire(&server, "carol", "a").await.expect("third");
    // A fourth socket is closed as soon as it is accepted.
    assert!(
        http.get(&healthz).send().await.is_err(),
        "served past the cap"
    );
    a.close().await;
    let mut ok = false;
    for _ in 0..100 {
        if http
            .get(&healthz)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "a place after one closed");
}

/// The server's resident memory, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// A client that never reads and repeats `sync` over a megabyte of history (and `convs`) is
/// held to its outbound budget (`outbound_bytes`, 8 MiB by default): its frames are read only
/// as fast as their answers go out, so the server grows by about that, not by everything asked
/// for (before the budget, about a gigabyte per such connection); once nothing has gone out for
/// a third of the idle timeout (15 s here) it is closed with 1013.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_reads_is_held_to_its_outbound_budget() {
    let server = Server::start(&["--idle-timeout-secs", "15"]).await;
    let conv = "g-budget";
    server
        .create_group(conv, &["alice", "bob"], serde_json::json!({}))
        .await;
    let mut alice = Client::connect(&server, "alice", "phone").await;
    let body = "x".repeat(30_000);
    let cmids = cmids("big", 40);
    for c in &cmids {
        alice.send_one(&Target::conv(conv), c, &body).await;
    }
    let before = rss(server.pid());
    let mut bob = wire(&server, "bob", "mute").await.expect("connect");
    let sync = serde_json::json!({"type": "sync", "conv": conv, "after": 0}).to_string();
    let convs = serde_json::json!({"type": "convs"}).to_string();
    for i in 0..300 {
        let frame = if i % 10 == 9 { &convs } else { &sync };
        if bob
            .wire
            .send_raw(tokio_tungstenite::tungstenite::Message::Text(
                frame.as_str().into(),
            ))
            .await
            .is_err()
        {
            break; // closed already
        }
    }
    // Give the server time to read what it will of them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown = rss(server.pid()).saturating_sub(before);
    eprintln!(
        "a never-reading client with 300 syncs of 1.2 MB: the server grew by {:.1} MiB",
        grown as f64 / (1 << 20) as f64
    );
    assert!(grown < 64 << 20, "grew by {grown} bytes");
    // Everyone else is served meanwhile.
    alice.ping(2).await;
    // After 5 s with nothing written it was closed: 1013 if the close frame reaches it before
    // the reset of its unread frames does.
    tokio::time::sleep(Duration::from_secs(7)).await;
    loop {
        match bob.recv_raw().await {
            Ok(Some(tokio_tungstenite::tungstenite::Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 1013, "{}", f.reason);
                break;
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(ordo_testkit::wire::WireError::Ws(_)) => break,
            Err(e) => panic!("not closed: {e}"),
        }
    }
    // Everyone else is served as before.
    alice.ping(1).await;
}

/// A client that pipelines 1,500 sends before reading anything gets an answer to every one
/// (one commit may answer them all at once: the queue holds that), and so does its resend of
/// all 1,500, answered at once from the dedup cache.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_pipelining_1500_sends_gets_every_answer() {
    let server = Server::start(&[]).await;
    let mut alice = Client::connect(&server, "alice", "phone").await;
    let ids = cmids("pipe", 1500);
    for round in ["first", "resend"] {
        for c in &ids {
            alice.send(&send_frame(&Target::to("bob"), c, c)).await;
        }
        let mut answered = std::collections::HashMap::new();
        while answered.len() < ids.len() {
            match alice.next().await {
                ordo_protocol::ServerFrame::Accepted { cmid, seq, .. } => {
                    answered.insert(cmid, seq);
                }
                other @ ordo_protocol::ServerFrame::Rejected { .. } => {
                    panic!("{round}: {other:?}")
                }
                _ => {}
            }
        }
        let mut seqs: Vec<u64> = answered.into_values().collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=1500).collect::<Vec<_>>(), "{round}");
    }
}

/// A group too large for receipts is summarised in `convs` (its member count and the others'
/// lowest positions, not 5,000 members), and a user in more conversations than one page holds
/// gets them page after page, each once.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_overview_comes_in_pages_and_a_huge_group_is_summarised() {
    let server = Server::start(&[]).await;
    let mut members: Vec<String> = (0..4998).map(|i| format!("fan{i:04}")).collect();
    members.extend(["alice".to_string(), "bob".to_string()]);
    let refs: Vec<&str> = members.iter().map(String::as_str).collect();
    server
        .create_group("town", &refs, serde_json::json!({}))
        .await;
    let mut alice = Client::connect(&server, "alice", "phone").await;
    alice
        .send_one(&Target::conv("town"), "t1", "hello town")
        .await;
    // 600 direct conversations: more than one page (500).
    for i in 0..600 {
        let peer = format!("peer{i:03}");
        alice
            .send_one(&Target::to(&peer), &format!("d{i}"), "hi")
            .await;
    }
    let (first, more) = alice.convs_page(None, None).await;
    assert_eq!(first.len(), 500, "a full page");
    assert!(more);
    let all = alice.convs().await;
    assert_eq!(all.len(), 601);
    let mut ids: Vec<&str> = all.iter().map(|c| c.conv.as_str()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 601, "each once");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in id order");
    let town = all.iter().find(|c| c.conv == "town").expect("town listed");
    assert_eq!(town.member_count, 5000);
    assert!(town.members.is_empty(), "5,000 members are not listed");
    assert_eq!((town.max_seq, town.others_delivered), (1, 0));
    let direct = all.iter().find(|c| c.conv != "town").expect("a direct one");
    assert_eq!(direct.member_count, 2);
    assert_eq!(direct.members.len(), 2);
}

/// `reader` asks for ~30 MB of history (group `history`, written by `writer`) without reading:
/// the socket's buffers fill, and its queue (and reader) wait. It must read within 30 s.
async fn clog(server: &Server, writer: &mut Client, reader: &mut Client) {
    server
        .create_group(
            "history",
            &[writer.user.as_str(), reader.user.as_str()],
            serde_json::json!({}),
        )
        .await;
    let body = "h".repeat(30_000);
    for c in cmids("old", 30) {
        writer.send_one(&Target::conv("history"), &c, &body).await;
    }
    for _ in 0..30 {
        reader
            .send(&ordo_protocol::ClientFrame::Sync {
                conv: "history".into(),
                after: 0,
                limit: None,
            })
            .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// A server whose connections queue at most 16 frames.
async fn small_queues() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("ordo.toml");
    std::fs::write(&file, "outbound_queue = 16\n").expect("write config");
    let server = Server::start(&["--config", file.to_str().expect("utf-8 path")]).await;
    (dir, server)
}

/// With a queue of 16 frames, a client pipelining 1,500 sends before reading is paced (the
/// server reads its sends as fast as their answers go out), not dropped: every send answered.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_pipelining_far_past_its_queue_is_paced_not_dropped() {
    let (_dir, server) = small_queues().await;
    let mut alice = Client::connect(&server, "alice", "phone").await;
    let ids = cmids("paced", 1500);
    for c in &ids {
        alice.send(&send_frame(&Target::to("bob"), c, c)).await;
    }
    let mut answered = std::collections::HashSet::new();
    while answered.len() < ids.len() {
        match alice.next().await {
            ordo_protocol::ServerFrame::Accepted { cmid, .. } => {
                answered.insert(cmid);
            }
            other @ ordo_protocol::ServerFrame::Rejected { .. } => panic!("{other:?}"),
            _ => {}
        }
    }
    let m = server.metrics().await;
    assert_eq!(m.get("ordo_slow_consumers_dropped_total").copied(), None);
}

/// With a queue of 16 frames, one commit releasing a message in each of 100 conversations to
/// a reader that is slow, but reads, does not drop it: pushes past the queue are left out, it
/// is sent `notify` for those conversations once there is room, and syncing gets it every
/// message, once, in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_release_larger_than_the_queue_is_paced_to_a_reader_that_reads() {
    let (_dir, server) = small_queues().await;
    let convs: Vec<String> = (0..100).map(|i| format!("room{i:03}")).collect();
    for c in &convs {
        server
            .create_group(c, &["alice", "bob"], serde_json::json!({}))
            .await;
    }
    let mut alice = Client::connect(&server, "alice", "a1").await;
    let mut bob = Client::connect(&server, "bob", "b1").await;
    clog(&server, &mut alice, &mut bob).await;
    // One message into each of 100 conversations: more than bob's queue holds.
    for (i, c) in convs.iter().enumerate() {
        alice
            .send(&send_frame(&Target::conv(c), &format!("m{i}"), "hello"))
            .await;
    }
    let mut accepted = 0;
    while accepted < convs.len() {
        if let ordo_protocol::ServerFrame::Accepted { .. } = alice.next().await {
            accepted += 1;
        }
    }
    // Bob reads now (within 30 s, or he is taken for one that does not): pages of history,
    // then pushes, notifies (each followed by a sync) and their pages.
    let mut got: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    let mut notified = 0;
    while got.values().map(Vec::len).sum::<usize>() < convs.len() {
        let frame = match bob
            .wire
            .recv_timeout(std::time::Duration::from_secs(10))
            .await
        {
            Ok(f) => f,
            Err(e) => panic!("bob got {got:?} then {e}"),
        };
        match frame {
            ordo_protocol::ServerFrame::Msg(m) if m.conv != "history" => {
                got.entry(m.conv.clone()).or_default().push(m.seq)
            }
            ordo_protocol::ServerFrame::Notify { conv, .. } => {
                notified += 1;
                let after = got.get(&conv).and_then(|s| s.last()).copied().unwrap_or(0);
                bob.send(&ordo_protocol::ClientFrame::Sync {
                    conv,
                    after,
                    limit: None,
                })
                .await;
            }
            ordo_protocol::ServerFrame::Synced { conv, messages, .. } if conv != "history" => {
                let seen = got.entry(conv).or_default();
                for m in messages {
                    if seen.last().is_none_or(|&l| m.seq > l) {
                        seen.push(m.seq);
                    }
                }
            }
            _ => {}
        }
    }
    assert!(notified > 0, "the release did not overflow the queue");
    assert_eq!(got.len(), 100);
    assert!(got.values().all(|s| s == &[1]), "{got:?}");
    let m = server.metrics().await;
    assert!(m
        .get("ordo_pushes_deferred_total")
        .is_some_and(|&n| n > 0.0));
    assert_eq!(m.get("ordo_slow_consumers_dropped_total").copied(), None);
    bob.ping(1).await;
}

/// With a queue of 16 frames, receipts from 30 members of a group reaching a member who is not
/// reading for a moment do not drop him: those that do not fit are sent later, one per member
/// with the latest positions.
#[tokio::test(flavor = "multi_thread")]
async fn receipts_past_the_queue_are_sent_later_not_a_reason_to_drop() {
    let (_dir, server) = small_queues().await;
    let users: Vec<String> = (0..30).map(|i| format!("member{i:02}")).collect();
    let mut all: Vec<&str> = users.iter().map(String::as_str).collect();
    all.push("bob");
    server
        .create_group("team", &all, serde_json::json!({}))
        .await;
    let mut bob = Client::connect(&server, "bob", "b1").await;
    assert_eq!(
        bob.send_one(&Target::conv("team"), "hello", "hello team")
            .await
            .seq(),
        1
    );
    let mut alice = Client::connect(&server, "alice", "a1").await;
    clog(&server, &mut alice, &mut bob).await;
    // Each member reads 1 while bob reads nothing.
    let mut members = Vec::new();
    for u in &users {
        let mut c = Client::connect(&server, u, "phone").await;
        c.read("team", 1).await;
        members.push(c);
    }
    // Every member's read reached bob, late or not; he was never dropped.
    let mut read: std::collections::BTreeMap<String, u64> = Default::default();
    while read.values().filter(|&&r| r >= 1).count() < users.len() {
        match bob.wire.recv_timeout(Duration::from_secs(10)).await {
            Ok(ordo_protocol::ServerFrame::Receipt { user, read: r, .. }) => {
                let e = read.entry(user).or_default();
                *e = (*e).max(r);
            }
            Ok(_) => {}
            Err(e) => panic!("bob got {read:?} then {e}"),
        }
    }
    let m = server.metrics().await;
    assert!(
        m.get("ordo_pushes_deferred_total")
            .is_some_and(|&n| n > 0.0),
        "the receipts did not overflow the queue: {m:?}"
    );
    assert_eq!(m.get("ordo_slow_consumers_dropped_total").copied(), None);
    bob.ping(1).await;
}
