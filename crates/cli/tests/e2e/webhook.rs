//! The offline-push webhook against a real endpoint (a small HTTP server in the test): an event
//! for members with no connected device, signed, with an idempotency key; sent again after a
//! `kill -9` with the same key; an endpoint that hangs or refuses never holds messages up.

use super::common::*;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const SECRET: &str = "whsec_e2e";

/// How the endpoint answers.
const OK: u8 = 0;
const REFUSE: u8 = 1;
const HANG: u8 = 2;

#[derive(Clone, Debug)]
struct Received {
    headers: HashMap<String, String>,
    body: String,
    answered: u16,
    at: Instant,
}

/// A webhook endpoint: records every request, answers as `mode` says.
struct Endpoint {
    url: String,
    got: Arc<Mutex<Vec<Received>>>,
    mode: Arc<AtomicU8>,
}

impl Endpoint {
    async fn start(mode: u8) -> Endpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/hooks/ordo", listener.local_addr().expect("addr"));
        let got = Arc::new(Mutex::new(Vec::new()));
        let mode = Arc::new(AtomicU8::new(mode));
        let (g, m) = (got.clone(), mode.clone());
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (g, m) = (g.clone(), m.clone());
                tokio::spawn(async move {
                    let mut r = BufReader::new(sock);
                    // Requests on a kept-alive connection, one after another.
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let mut headers = HashMap::new();
                        loop {
                            let mut h = String::new();
                            if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                                return;
                            }
                            let h = h.trim_end();
                            if h.is_empty() {
                                break;
                            }
                            if let Some((k, v)) = h.split_once(':') {
                                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                            }
                        }
                        let len: usize = headers
                            .get("content-length")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        let mut body = vec![0; len];
                        if r.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let mode = m.load(Ordering::SeqCst);
                        let status = if mode == REFUSE { 500 } else { 200 };
                        g.lock().unwrap().push(Received {
                            headers,
                            body: String::from_utf8_lossy(&body).into_owned(),
                            answered: if mode == HANG { 0 } else { status },
                            at: Instant::now(),
                        });
                        if mode == HANG {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            return;
                        }
                        let reply = format!(
                            "HTTP/1.1 {status} X\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok"
                        );
                        if r.get_mut().write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Endpoint { url, got, mode }
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until a request matches `pick`; panics after `WAIT`.
    async fn wait_for(&self, what: &str, pick: impl Fn(&Received) -> bool) -> Received {
        let until = Instant::now() + WAIT;
        loop {
            if let Some(r) = self.received().into_iter().find(|r| pick(r)) {
                return r;
            }
            assert!(
                Instant::now() < until,
                "no webhook request {what}: {:?}",
                self.received()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn json_of(r: &Received) -> Value {
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.body))
}

/// Checks `Ordo-Signature: t=<t>,v1=<hex>` against HMAC-SHA256(secret, "<t>.<body>").
fn assert_signed(r: &Received) {
    let sig = r
        .headers
        .get("ordo-signature")
        .expect("Ordo-Signature header");
    let (t, v1) = sig
        .split_once(",v1=")
        .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v)))
        .unwrap_or_else(|| panic!("Ordo-Signature {sig:?} is not t=...,v1=..."));
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(format!("{t}.{}", r.body).as_bytes());
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(v1, want, "signature of {}", r.body);
    let t: u64 = t.parse().expect("t is unix seconds");
    assert!(t.abs_diff(now_secs()) < 600, "t={t} is now");
}

async fn server_with(endpoint: &Endpoint, extra: &[&str]) -> Server {
    let mut args = vec![
        "--webhook-url",
        endpoint.url.as_str(),
        "--webhook-secret",
        SECRET,
    ];
    args.extend_from_slice(extra);
    Server::start(&args).await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_offline_member_is_reported_signed_at_once() {
    let hook = Endpoint::start(OK).await;
    let server = server_with(&hook, &["--webhook-preview-bytes", "5"]).await;
    server
        .create_group("team", &["alice", "bob", "carol"], json!({}))
        .await;
    let mut alice = Client::connect(&server, "alice", "a1").await;
    let _bob = Client::connect(&server, "bob", "b1").await;
    let g = Target::conv("team");
    let epoch = alice.sync("team", 0, None).await.epoch;

    let sent = Instant::now();
    assert_eq!(alice.send_one(&g, "m1", "héllo world").await.seq(), 1);
    let r = hook
        .wait_for("for team seq 1", |r| json_of(r)["seq"] == 1)
        .await;
    println!(
        "webhook event {} ms after the send",
        r.at.duration_since(sent).as_millis()
    );
    assert_signed(&r);
    let id = format!("team/{epoch}/1");
    assert_eq!(r.headers.get("idempotency-key"), Some(&id));
    assert_eq!(
        r.headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    let ev = json_of(&r);
    assert_eq!(ev["id"], json!(id));
    assert_eq!(ev["type"], "message");
    assert_eq!(ev["conv"], "team");
    assert_eq!(ev["from"], "alice");
    assert_eq!(
        ev["users"],
        json!(["carol"]),
        "only the member with no device"
    );
    assert_eq!(
        ev["preview"], "héll",
        "5 bytes, cut at a character boundary"
    );
    assert!(ev["ts"].as_u64().is_some());

    // A direct message to someone offline; a message everyone is online for has no event.
    let mut carol = Client::connect(&server, "carol", "c1").await;
    assert_eq!(carol.send_one(&g, "m2", "all here").await.seq(), 2);
    let dm = carol
        .send_one(&Target::to("dave"), "d1", "hi dave")
        .await
        .seq();
    let r = hook
        .wait_for("for the direct message", |r| {
            json_of(r)["users"] == json!(["dave"])
        })
        .await;
    assert_eq!(json_of(&r)["seq"], json!(dm));
    assert_eq!(json_of(&r)["from"], "carol");
    let seqs: Vec<(String, u64)> = hook
        .received()
        .iter()
        .map(|r| {
            let v = json_of(r);
            (
                v["conv"].as_str().unwrap_or("").to_string(),
                v["seq"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert!(
        !seqs.contains(&("team".to_string(), 2)),
        "no event when every member is online: {seqs:?}"
    );
    let m = server.metrics().await;
    assert_eq!(m.get("ordo_webhook_sent_total"), Some(&2.0), "{m:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_due_at_a_kill_is_sent_after_the_restart_with_the_same_key() {
    let hook = Endpoint::start(REFUSE).await;
    let mut server = server_with(&hook, &[]).await;
    server
        .create_group("team", &["alice", "carol"], json!({}))
        .await;
    let mut alice = Client::connect(&server, "alice", "a1").await;
    assert_eq!(
        alice
            .send_one(&Target::conv("team"), "m1", "hello")
            .await
            .seq(),
        1
    );
    // Refused: it stays queued and is tried again.
    let first = hook.wait_for("refused", |r| r.answered == 500).await;
    let key = first.headers.get("idempotency-key").cloned().expect("key");
    server.kill9();
    hook.mode.store(OK, Ordering::SeqCst);
    server.restart().await;
    let again = hook
        .wait_for("taken after the restart", |r| r.answered == 200)
        .await;
    assert_eq!(again.headers.get("idempotency-key"), Some(&key));
    assert_eq!(again.body, first.body, "the same event");
    assert_signed(&again);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_that_hangs_holds_no_message_up() {
    let hook = Endpoint::start(HANG).await;
    let server = server_with(&hook, &[]).await;
    server
        .create_group("team", &["alice", "carol"], json!({}))
        .await;
    let mut alice = Client::connect(&server, "alice", "a1").await;
    let ids = cmids("m", 300);
    let seqs = alice.send_all(&Target::conv("team"), &ids, 64).await;
    assert_eq!(
        seqs,
        (1..=300).collect::<Vec<u64>>(),
        "every message accepted, in order"
    );
    hook.wait_for("hanging", |r| r.answered == 0).await;
    let m = server.metrics().await;
    let queued = m.get("ordo_webhook_queued").copied().unwrap_or(0.0);
    assert!(queued > 0.0, "events wait in the queue: {m:?}");
    // carol, coming online, gets every message: the webhook is beside delivery, not in it.
    let mut carol = Client::connect(&server, "carol", "c1").await;
    assert_eq!(seqs_of(carol.sync_all("team", 0).await).len(), 300);
}

fn seqs_of(m: Vec<ordo_protocol::Message>) -> Vec<u64> {
    m.iter().map(|m| m.seq).collect()
}
