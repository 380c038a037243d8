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
