//! Harness for the end-to-end tests: the real `ordo` binary run by the test kit
//! ([`ordo_testkit::ServerProcess`]) on a free port and a temporary data directory, driven over
//! real WebSockets by [`ordo_testkit::device::Device`].
//!
//! The suite runs twice: on the embedded store (the test binary `e2e`), and with every server
//! on PostgreSQL (`e2e_postgres`, the same modules: each server gets a schema of its own, kept
//! across its restarts and dropped with it). A test of something only the embedded store has
//! (its files) says so with [`embedded_only`].
//!
//! Every wait has a generous deadline (CI machines are small and shared) and no assertion
//! depends on timing. The process calls block, so they run under `block_in_place` (every test
//! here runs on the multi-threaded runtime).

// Each test binary uses its own part of this module.
#![allow(dead_code, unused_imports)]

use ordo_protocol::{Encoding, ServerFrame};
use ordo_store_postgres::test_schema::TestSchema;
use ordo_testkit::admin::Reply;
pub use ordo_testkit::device::{
    cmids, send_frame, seqs, Device as Client, SendResult, Target, WAIT,
};
use ordo_testkit::{Admin, ServerOptions, ServerProcess};
use std::collections::HashMap;
use std::process::ExitStatus;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// The secret every test server signs tokens with, so that [`token`] needs no server at hand.
pub const SECRET: &str = "test-secret";

/// A running (or stopped) `ordo serve`; [`ServerProcess`]'s calls, failing the test on error.
/// On PostgreSQL it holds its schema (dropped after the process is gone).
pub struct Server(ServerProcess, Option<TestSchema>);

/// Whether this test binary runs its servers on PostgreSQL (`e2e_postgres`).
pub fn on_postgres() -> bool {
    std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.file_name()?.to_str()?.starts_with("e2e_postgres")))
        .unwrap_or(false)
}

/// True (after printing that `test` is skipped, and why) when the servers run on PostgreSQL:
/// for tests of what only the embedded store has.
pub fn embedded_only(test: &str, why: &str) -> bool {
    if on_postgres() {
        eprintln!("SKIPPED {test} on PostgreSQL: {why}");
    }
    on_postgres()
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(schema) = self.1.take() {
            // The server first: it holds connections to the schema.
            let _ = self.0.kill9();
            drop(schema);
        }
    }
}

impl std::ops::Deref for Server {
    type Target = ServerProcess;
    fn deref(&self) -> &ServerProcess {
        &self.0
    }
}

impl Server {
    /// Starts a server on a fresh data directory with the standard flags (no send rate limit)
    /// plus `extra`.
    pub async fn start(extra: &[&str]) -> Server {
        Self::start_with_rate(0.0, extra).await
    }

    /// Like [`start`](Self::start), with each user allowed `rate` sends per second (and a
    /// burst of that, at least one); 0 for no limit.
    pub async fn start_with_rate(rate: f64, extra: &[&str]) -> Server {
        let mut opts = ServerOptions::new(env!("CARGO_BIN_EXE_ordo"));
        opts.secret = Some(SECRET.into());
        opts.user_rate = rate;
        opts.extra = extra.iter().map(|s| s.to_string()).collect();
        let schema = match on_postgres() && !extra.contains(&"--store") {
            false => None,
            true => {
                let made = tokio::task::block_in_place(|| TestSchema::create("an e2e server"));
                // Without PostgreSQL (and outside CI, where it fails) the suite runs on the
                // embedded store instead, as the message printed says.
                made.inspect(|s| opts.extra.extend(["--store".into(), s.url()]))
            }
        };
        let s = tokio::task::block_in_place(|| ServerProcess::start(opts));
        Server(s.unwrap_or_else(|e| panic!("start ordo: {e}")), schema)
    }

    pub fn pid(&self) -> u32 {
        self.0.pid().expect("server is running")
    }

    /// SIGKILL: no chance to flush or close anything.
    pub fn kill9(&mut self) {
        self.0
            .kill9()
            .unwrap_or_else(|e| panic!("kill the server: {e}"));
    }

    /// SIGTERM, then waits for the process to exit and returns its status.
    pub async fn sigterm(&mut self) -> ExitStatus {
        tokio::task::block_in_place(|| self.0.sigterm())
            .unwrap_or_else(|e| panic!("SIGTERM the server: {e}"))
    }

    /// Starts the server again on the same data directory (after a kill).
    pub async fn restart(&mut self) {
        tokio::task::block_in_place(|| self.0.restart())
            .unwrap_or_else(|e| panic!("restart ordo: {e}"));
    }

    /// Starts the server again on the same data directory; the error (with the server's log)
    /// if it does not come up.
    pub async fn try_restart(&mut self) -> Result<(), String> {
        tokio::task::block_in_place(|| self.0.restart()).map_err(|e| e.to_string())
    }

    // ----- admin API -----

    /// The test kit's client of this server's admin API.
    pub fn admin(&self) -> Admin {
        Admin::new(&self.http_url(), self.admin_key()).expect("admin client")
    }

    /// `POST path` with a JSON body and the admin key.
    pub async fn admin_post(&self, path: &str, body: serde_json::Value) -> Reply {
        self.admin()
            .post(path, &body)
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// `GET path` with the admin key.
    pub async fn admin_get(&self, path: &str) -> Reply {
        self.admin()
            .get(path)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// The server's counters and gauges, by name.
    pub async fn metrics(&self) -> HashMap<String, f64> {
        self.admin()
            .metrics()
            .await
            .unwrap_or_else(|e| panic!("GET /metrics: {e}"))
    }

    /// Creates a group; panics unless the server answers 201.
    pub async fn create_group(&self, id: &str, members: &[&str], retention: serde_json::Value) {
        let r = self
            .admin_post(
                "/v1/admin/groups",
                serde_json::json!({"id": id, "members": members, "retention": retention}),
            )
            .await;
        assert_eq!(r.status, 201, "create group {id}: {}", r.body);
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// A token for `user` on `device`, signed with the test secret, valid for an hour.
pub fn token(user: &str, device: &str) -> String {
    ordo_testkit::token(SECRET, user, device, 3600).expect("sign a token")
}

/// Asserts that `msgs` are exactly seqs `from..=to`, in order.
pub fn assert_seqs(msgs: &[ordo_protocol::Message], from: u64, to: u64, what: &str) {
    let want: Vec<u64> = (from..=to).collect();
    assert_eq!(seqs(msgs), want, "{what}: seqs");
}

/// The next Ordo frame as a raw WebSocket message: whether it came as text, and the frame.
pub async fn raw_frame(c: &mut Client) -> (bool, ServerFrame) {
    loop {
        match c.recv_raw().await {
            Ok(Some(WsMessage::Text(t))) => {
                let f = ordo_protocol::decode_server(t.as_bytes(), Encoding::Json)
                    .unwrap_or_else(|e| panic!("{}: bad JSON frame {t}: {e}", c.user));
                return (true, f);
            }
            Ok(Some(WsMessage::Binary(b))) => {
                let f = ordo_protocol::decode_server(&b, Encoding::MsgPack)
                    .unwrap_or_else(|e| panic!("{}: bad MessagePack frame: {e}", c.user));
                return (false, f);
            }
            Ok(Some(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => {}
            other => panic!("{}: connection ended: {other:?}", c.user),
        }
    }
}

/// Connects without reading `welcome`, so that its kind can be checked too.
pub async fn connect_raw(server: &Server, user: &str, enc: Encoding) -> Client {
    let wire = ordo_testkit::wire::WireClient::connect(&server.ws_url(), &token(user, "d1"), enc)
        .await
        .expect("connect");
    Client {
        wire,
        user: user.into(),
        device: "d1".into(),
    }
}

/// Reads raw messages until a Close frame and returns its code and reason; panics if the
/// stream ends without one. Frames queued before the close (pushes) are skipped.
pub async fn expect_close(c: &mut Client) -> (u16, String) {
    loop {
        match c.recv_raw().await {
            Ok(Some(WsMessage::Close(Some(f)))) => {
                return (u16::from(f.code), f.reason.to_string())
            }
            Ok(Some(WsMessage::Close(None))) => panic!("close without a code"),
            Ok(Some(_)) => {}
            Ok(None) => panic!("stream ended without a close frame"),
            Err(e) => panic!("no close frame: {e}"),
        }
    }
}

/// The HTTP status of a refused WebSocket upgrade.
pub fn http_status(e: ordo_testkit::wire::WireError) -> u16 {
    match e {
        ordo_testkit::wire::WireError::Ws(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            r.status().as_u16()
        }
        other => panic!("expected an HTTP error at the upgrade, got {other}"),
    }
}

/// Connects with `token`: the `welcome`'s user and device, or the 401's message.
pub async fn try_connect(server: &Server, token: &str) -> Result<(String, String), String> {
    let wire = ordo_testkit::wire::WireClient::connect(
        &server.ws_url(),
        token,
        ordo_protocol::Encoding::Json,
    )
    .await;
    match wire {
        Ok(wire) => {
            let mut c = Client {
                wire,
                user: "?".into(),
                device: "?".into(),
            };
            match c.next().await {
                ServerFrame::Welcome { user, device, .. } => Ok((user, device)),
                other => panic!("expected welcome, got {other:?}"),
            }
        }
        Err(ordo_testkit::wire::WireError::Ws(tokio_tungstenite::tungstenite::Error::Http(r))) => {
            assert_eq!(r.status().as_u16(), 401, "refused with 401");
            let body: serde_json::Value =
                serde_json::from_slice(r.body().as_deref().unwrap_or_default()).expect("JSON");
            assert_eq!(body["error"]["code"], "unauthorized");
            Err(body["error"]["message"].as_str().unwrap_or("").to_string())
        }
        Err(e) => panic!("connect: {e}"),
    }
}
