//! Harness for the end-to-end tests: runs the real `ordo` binary on a free port with a
//! temporary data directory, and drives it over real WebSockets with [`ordo::wire::WireClient`].
//!
//! Every wait has a generous deadline (CI machines are small and shared) and no assertion
//! depends on timing.

#![allow(dead_code)]

use ordo::wire::{WireClient, WireError};
use ordo_protocol::{ClientFrame, ConvInfo, Encoding, ErrorCode, Message, Position, ServerFrame};
use ordo_server::auth::{Claims, TokenKey};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_tungstenite::tungstenite::Message as WsMessage;

pub const SECRET: &str = "test-secret";
/// Prefix of each server's admin key. Every server gets its own key, which also tells the
/// harness that it is talking to its own process and not to another test's server that took
/// the port meanwhile (a restart reuses the port only if it is still free).
pub const ADMIN_KEY_PREFIX: &str = "test-admin";
/// Deadline for any single wait (a frame, a start, an exit).
pub const WAIT: Duration = Duration::from_secs(20);

/// A running (or stopped) `ordo serve` process and its data directory.
pub struct Server {
    child: Option<Child>,
    port: u16,
    extra: Vec<String>,
    /// Holds `data/` (the server's data directory) and `server-<n>.log` (its stderr).
    root: tempfile::TempDir,
    starts: u32,
    admin_key: String,
}

fn unique_admin_key() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{ADMIN_KEY_PREFIX}-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

impl Server {
    /// Starts a server on a fresh data directory with the standard flags plus `extra`.
    pub async fn start(extra: &[&str]) -> Server {
        let root = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(root.path().join("data")).expect("data dir");
        let mut s = Server {
            child: None,
            port: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            root,
            starts: 0,
            admin_key: unique_admin_key(),
        };
        s.launch().await;
        s
    }

    /// The admin API key of this server.
    pub fn admin_key(&self) -> &str {
        &self.admin_key
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is running").id()
    }

    fn log_path(&self, n: u32) -> PathBuf {
        self.root.path().join(format!("server-{n}.log"))
    }

    /// The stderr of the most recent run, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path(self.starts)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn spawn(&mut self) -> Child {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path(self.starts)).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ordo"));
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data")
            .arg(self.data_dir())
            .args(["--secret", SECRET, "--admin-key", &self.admin_key])
            .args(["--rate-per-sec", "0"])
            .args(&self.extra)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, _) in std::env::vars() {
            if k.starts_with("ORDO_") {
                cmd.env_remove(k);
            }
        }
        cmd.spawn().expect("spawn the ordo binary")
    }

    /// Starts the process (on the same port if it is free, else on a new one) and waits for
    /// `/healthz`.
    async fn launch(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let http = reqwest::Client::new();
        for attempt in 0..5 {
            let mut child = self.spawn();
            let deadline = Instant::now() + WAIT;
            loop {
                if let Some(status) = child.try_wait().expect("try_wait") {
                    // Most likely the port was taken meanwhile: try another one.
                    eprintln!(
                        "ordo exited at start ({status}), attempt {attempt}:\n{}",
                        self.log_tail()
                    );
                    self.port = free_port();
                    break;
                }
                if self.is_up(&http).await {
                    self.child = Some(child);
                    return;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("ordo did not become healthy in time:\n{}", self.log_tail());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("ordo could not be started:\n{}", self.log_tail());
    }

    /// Healthy, and ours: `/healthz` answers and the admin API takes our key (a server that
    /// does not know the key is another test's, on a port that was reused).
    async fn is_up(&self, http: &reqwest::Client) -> bool {
        let base = self.http_url();
        let healthy = http
            .get(format!("{base}/healthz"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if !healthy {
            return false;
        }
        http.get(format!("{base}/v1/admin/groups/no-such-group"))
            .bearer_auth(&self.admin_key)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status().as_u16() != 401)
    }

    /// SIGKILL: no chance to flush or close anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL the server");
            c.wait().expect("reap the server");
        }
    }

    /// SIGTERM, then waits for the process to exit and returns its status.
    pub async fn sigterm(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("server is running");
        let pid = c.id() as libc::pid_t;
        // SAFETY: `pid` is our own child, not yet reaped, so it cannot have been reused.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = c.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("server did not exit after SIGTERM:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the server again on the same data directory (after a kill).
    pub async fn restart(&mut self) {
        self.launch().await;
    }

    // ----- admin API -----

    pub async fn admin_post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}{path}", self.http_url()))
            .bearer_auth(&self.admin_key)
            .json(&body)
            .timeout(WAIT)
            .send()
            .await
            .expect("admin request")
    }

    /// Creates a group; panics unless the server answers 201.
    pub async fn create_group(&self, id: &str, members: &[&str], retention: serde_json::Value) {
        let r = self
            .admin_post(
                "/v1/admin/groups",
                serde_json::json!({"id": id, "members": members, "retention": retention}),
            )
            .await;
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        assert_eq!(status.as_u16(), 201, "create group {id}: {text}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// A token for `user` on `device`, signed with the test secret, valid for an hour.
pub fn token(user: &str, device: &str) -> String {
    TokenKey::new(SECRET.as_bytes())
        .sign(&Claims {
            user: user.into(),
            device: device.into(),
            exp: now_secs() + 3600,
        })
        .expect("sign a token")
}

/// Where a `send` goes.
#[derive(Clone, Debug)]
pub enum Target {
    Conv(String),
    To(String),
}

impl Target {
    pub fn conv(id: &str) -> Target {
        Target::Conv(id.to_string())
    }

    pub fn to(user: &str) -> Target {
        Target::To(user.to_string())
    }
}

pub fn send_frame(target: &Target, cmid: &str, body: &str) -> ClientFrame {
    let (conv, to) = match target {
        Target::Conv(c) => (Some(c.clone()), None),
        Target::To(u) => (None, Some(u.clone())),
    };
    ClientFrame::Send {
        conv,
        to,
        cmid: cmid.to_string(),
        body: body.to_string(),
        reply_to: None,
    }
}

/// One connected device.
pub struct Client {
    pub wire: WireClient,
    pub user: String,
    pub device: String,
}

impl Client {
    /// Connects and reads `welcome`.
    pub async fn connect(server: &Server, user: &str, device: &str) -> Client {
        Self::connect_with(server, user, device, Encoding::Json).await
    }

    pub async fn connect_with(server: &Server, user: &str, device: &str, enc: Encoding) -> Client {
        let wire = tokio::time::timeout(
            WAIT,
            WireClient::connect(&server.ws_url(), &token(user, device), enc),
        )
        .await
        .unwrap_or_else(|_| panic!("connect {user}/{device}: timed out"))
        .unwrap_or_else(|e| panic!("connect {user}/{device}: {e}"));
        let mut c = Client {
            wire,
            user: user.into(),
            device: device.into(),
        };
        match c.next().await {
            ServerFrame::Welcome {
                user: u, device: d, ..
            } => {
                assert_eq!((u.as_str(), d.as_str()), (user, device), "welcome names us");
            }
            other => panic!("{user}/{device}: expected welcome, got {other:?}"),
        }
        c
    }

    pub async fn send(&mut self, frame: &ClientFrame) {
        self.wire
            .send(frame)
            .await
            .unwrap_or_else(|e| panic!("{}/{}: send failed: {e}", self.user, self.device));
    }

    /// The next frame, whatever it is (panics after [`WAIT`]).
    pub async fn next(&mut self) -> ServerFrame {
        match self.wire.recv_timeout(WAIT).await {
            Ok(f) => f,
            Err(e) => panic!("{}/{}: waiting for a frame: {e}", self.user, self.device),
        }
    }

    /// Reads frames until `pick` returns `Some`, dropping the others.
    pub async fn wait_for<T>(&mut self, mut pick: impl FnMut(&ServerFrame) -> Option<T>) -> T {
        loop {
            let f = self.next().await;
            if let Some(t) = pick(&f) {
                return t;
            }
        }
    }

    /// Sends one message and waits for its `accepted` (or `rejected`), dropping other frames.
    pub async fn send_one(&mut self, target: &Target, cmid: &str, body: &str) -> SendResult {
        self.send(&send_frame(target, cmid, body)).await;
        let want = cmid.to_string();
        self.wait_for(|f| match f {
            ServerFrame::Accepted {
                cmid, seq, conv, ..
            } if *cmid == want => Some(SendResult::Accepted {
                conv: conv.clone(),
                seq: *seq,
            }),
            ServerFrame::Rejected { cmid, code, .. } if *cmid == want => {
                Some(SendResult::Rejected(*code))
            }
            _ => None,
        })
        .await
    }

    /// Sends every cmid (body = cmid) with at most `window` unanswered, and returns each
    /// accepted seq, in send order. Other frames (pushes, notifies, receipts) are dropped.
    /// Panics on a rejection.
    pub async fn send_all(&mut self, target: &Target, cmids: &[String], window: usize) -> Vec<u64> {
        let mut seqs: HashMap<String, u64> = HashMap::new();
        let mut next = 0;
        while seqs.len() < cmids.len() {
            while next < cmids.len() && next - seqs.len() < window {
                let c = &cmids[next];
                self.send(&send_frame(target, c, c)).await;
                next += 1;
            }
            match self.next().await {
                ServerFrame::Accepted { cmid, seq, .. } => {
                    assert!(
                        seqs.insert(cmid.clone(), seq).is_none(),
                        "two `accepted` for {cmid}"
                    );
                }
                ServerFrame::Rejected {
                    cmid,
                    code,
                    message,
                    ..
                } => {
                    panic!("{cmid} rejected: {code} {message}")
                }
                _ => {}
            }
        }
        cmids.iter().map(|c| seqs[c]).collect()
    }

    /// One `sync`; drops frames other than its answer (and panics on an `error`).
    pub async fn sync(&mut self, conv: &str, after: u64, limit: Option<u32>) -> Synced {
        self.send(&ClientFrame::Sync {
            conv: conv.into(),
            after,
            limit,
        })
        .await;
        let want = conv.to_string();
        self.wait_for(|f| match f {
            ServerFrame::Synced {
                conv,
                epoch,
                messages,
                has_more,
                first_seq,
                max_seq,
            } if *conv == want => Some(Synced {
                epoch: *epoch,
                messages: messages.clone(),
                has_more: *has_more,
                first_seq: *first_seq,
                max_seq: *max_seq,
            }),
            ServerFrame::Error { code, message } => panic!("sync {want}: error {code} {message}"),
            _ => None,
        })
        .await
    }

    /// Pages through the whole conversation after `after`; returns every message.
    pub async fn sync_all(&mut self, conv: &str, after: u64) -> Vec<Message> {
        let mut out: Vec<Message> = Vec::new();
        let mut after = after;
        loop {
            let page = self.sync(conv, after, Some(200)).await;
            if let Some(last) = page.messages.last() {
                after = last.seq;
            }
            out.extend(page.messages);
            if !page.has_more {
                return out;
            }
        }
    }

    pub async fn convs(&mut self) -> Vec<ConvInfo> {
        self.send(&ClientFrame::Convs).await;
        self.wait_for(|f| match f {
            ServerFrame::Convs { conversations } => Some(conversations.clone()),
            _ => None,
        })
        .await
    }

    pub async fn ack(&mut self, conv: &str, seq: u64) {
        self.send(&ClientFrame::Ack {
            acks: vec![Position {
                conv: conv.into(),
                seq,
            }],
        })
        .await;
    }

    pub async fn read(&mut self, conv: &str, seq: u64) {
        self.send(&ClientFrame::Read {
            conv: conv.into(),
            seq,
        })
        .await;
    }

    /// A ping round trip: proves the connection is alive and everything sent before it was
    /// handled by the connection.
    pub async fn ping(&mut self, nonce: u64) {
        self.send(&ClientFrame::Ping { nonce: Some(nonce) }).await;
        self.wait_for(|f| match f {
            ServerFrame::Pong { nonce: n, .. } if *n == Some(nonce) => Some(()),
            _ => None,
        })
        .await
    }

    /// The raw next WebSocket message, `None` once the stream ended.
    pub async fn recv_raw(&mut self) -> Result<Option<WsMessage>, WireError> {
        self.wire.recv_raw(WAIT).await
    }

    pub async fn close(self) {
        self.wire.close().await;
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendResult {
    Accepted { conv: String, seq: u64 },
    Rejected(ErrorCode),
}

impl SendResult {
    pub fn seq(&self) -> u64 {
        match self {
            SendResult::Accepted { seq, .. } => *seq,
            SendResult::Rejected(c) => panic!("expected accepted, got rejected {c}"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Synced {
    pub epoch: u64,
    pub messages: Vec<Message>,
    pub has_more: bool,
    pub first_seq: u64,
    pub max_seq: u64,
}

pub fn seqs(msgs: &[Message]) -> Vec<u64> {
    msgs.iter().map(|m| m.seq).collect()
}

/// `prefix-0000`, `prefix-0001`, ...
pub fn cmids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}
