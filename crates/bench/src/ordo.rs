//! Ordo as a system of `ordo-bench`: a fresh `ordo serve` per run (the test kit's
//! [`ServerProcess`]: a child process on a temporary data directory, no send rate limit,
//! `ORDO_*` variables cleared), or the server named by `--server`. Clients speak the raw
//! protocol ([`WireClient`], MessagePack), the way a client in any language would: receivers
//! take `msg` pushes, `sync` on `notify` or a gap, and acknowledge cumulatively every
//! [`ACK_EVERY`] messages; a sender keeps its window of unanswered `send`s.
//!
//! Durability as measured: every `accepted` is sent only after the message is fsynced, and no
//! device sees a message before that.
//!
//! Pairs are user `s<tag>-i` sending to user `r<tag>-i` (a direct conversation); a fan-out group
//! has members `m<tag>-0..n`, and its sender is member 0 on a device of its own; catch-up is
//! user `s<tag>` sending to `r<tag>`, who connects only afterwards.
//!
//! `ordo-cluster` is Ordo as a cluster: `--nodes` nodes (`ordo serve --cluster`) on a schema of
//! the run's own in `--store` and on `--nats`. Devices connect to the nodes in turn, so that
//! most messages cross nodes (their sender's node forwards them to their conversation's
//! owner); each node's CPU is measured on its own, and `forwarded_share` says which part of the
//! sends were forwarded.

use crate::report::{Latency, Outcome};
use crate::system::{
    Bodies, Inbox, Publish, Receiving, Sent, Subscribe, System, Task, Until, IDLE,
};
use crate::{fail, run_tag, BenchError, Common};
use futures_util::FutureExt;
use ordo_protocol::{ClientFrame, Encoding, Message, Position, ServerFrame};
use ordo_testkit::{Admin, ServerOptions, ServerProcess, WireClient};
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::time::timeout;

/// Receivers acknowledge after this many messages (and when they finish).
const ACK_EVERY: u64 = 32;
const ENC: Encoding = Encoding::MsgPack;
/// Devices of a fan-out group connected at once.
const CONNECT_CONCURRENCY: usize = 256;
/// Lifetime of the tokens the bench signs (longer than any run).
const TOKEN_TTL_SECS: u64 = 30 * 86_400;

/// The Ordo server under test, and this run's names.
pub struct Ordo {
    server: Option<ServerProcess>,
    /// `ordo-cluster`: its nodes (and `server` is none), each with its admin API.
    nodes: Vec<(ServerProcess, Admin)>,
    /// `/metrics` of each node when the measured part started.
    nodes_before: Vec<HashMap<String, f64>>,
    /// With the PostgreSQL store: the database and the run's schema in it, dropped at close.
    schema: Option<(String, String)>,
    dial: Arc<Dialer>,
    tag: String,
    /// `/metrics` when the measured part started.
    before: HashMap<String, f64>,
}

/// How to reach the server under test: connect devices, mint tokens. Shared by connect tasks.
struct Dialer {
    /// The server's WebSocket URL; a cluster's nodes', taken in turn.
    ws: Vec<String>,
    next: std::sync::atomic::AtomicUsize,
    admin: Admin,
    /// Signs tokens locally when the bench started the server (else the admin API mints them).
    secret: Option<String>,
}

impl Ordo {
    /// Starts `ordo serve` (or names the running `--server`); with `postgres`, on the PostgreSQL
    /// store, in a schema of the run's own in the `--store` database.
    pub async fn start(common: &Common, postgres: bool) -> Result<Ordo, BenchError> {
        let tag = run_tag();
        if let (Some(_), true) = (&common.server, postgres) {
            return Err(BenchError(
                "ordo-pg starts a server of its own on --store; --server measures one that is running: use --systems ordo with it".into(),
            ));
        }
        if let Some(url) = &common.server {
            let ws = url
                .trim_end_matches('/')
                .trim_end_matches("/v1/ws")
                .to_string();
            if !ws.starts_with("ws://") {
                return Err(BenchError(format!(
                    "--server {url:?} must be a WebSocket URL such as ws://127.0.0.1:7400"
                )));
            }
            let key =
                match (&common.admin_key, &common.data) {
                    (Some(k), _) => k.clone(),
                    (None, Some(d)) => std::fs::read_to_string(d.join("admin.key"))
                        .map(|s| s.trim().to_string())
                        .map_err(fail(&format!(
                            "cannot read {}",
                            d.join("admin.key").display()
                        )))?,
                    (None, None) => return Err(BenchError(
                        "with --server, pass --admin-key or --data (the server's data directory)"
                            .into(),
                    )),
                };
            let admin = Admin::new(&ws, &key).map_err(fail("--server"))?;
            return Ok(Ordo {
                server: None,
                nodes: Vec::new(),
                nodes_before: Vec::new(),
                schema: None,
                dial: Arc::new(Dialer::new(vec![ws], admin, None)),
                tag,
                before: HashMap::new(),
            });
        }
        let exe = match &common.ordo {
            Some(p) => p.clone(),
            None => ordo_binary()?,
        };
        let mut opts = ServerOptions::new(exe);
        opts.extra = common
            .serve_args
            .as_deref()
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_string)
            .collect();
        let schema = match postgres {
            false => None,
            true => {
                let (db, name) = (common.store.clone(), format!("ordo_bench_{tag}"));
                let (d, n) = (db.clone(), name.clone());
                tokio::task::spawn_blocking(move || schema_sql(&d, &format!("CREATE SCHEMA {n}")))
                    .await
                    .map_err(fail("making the run's schema"))??;
                opts.extra
                    .extend(["--store".to_string(), in_schema(&db, &name)]);
                Some((db, name))
            }
        };
        let server = tokio::task::spawn_blocking(move || ServerProcess::start(opts))
            .await
            .map_err(fail("starting the server"))?
            .map_err(fail("cannot start `ordo serve`"))?;
        let admin =
            Admin::new(&server.http_url(), server.admin_key()).map_err(fail("the server"))?;
        Ok(Ordo {
            dial: Arc::new(Dialer::new(
                vec![server.ws_url()],
                admin,
                Some(server.secret().to_string()),
            )),
            server: Some(server),
            nodes: Vec::new(),
            nodes_before: Vec::new(),
            schema,
            tag,
            before: HashMap::new(),
        })
    }

    fn receiver(&self, i: usize) -> String {
        format!("r{}-{i}", self.tag)
    }

    fn member(&self, i: usize) -> String {
        format!("m{}-{i}", self.tag)
    }

    fn group(&self) -> String {
        format!("g{}", self.tag)
    }

    /// Connects one device of each of `users` ([`CONNECT_CONCURRENCY`] at a time).
    async fn connect_many(&self, users: Vec<String>) -> Result<Vec<WireClient>, BenchError> {
        let mut out = Vec::with_capacity(users.len());
        let mut pending = VecDeque::new();
        for u in users {
            let d = self.dial.clone();
            pending.push_back(Task::spawn(async move { d.connect(&u, "d", None).await }));
            if pending.len() >= CONNECT_CONCURRENCY {
                if let Some(t) = pending.pop_front() {
                    out.push(t.join().await??);
                }
            }
        }
        for t in pending {
            out.push(t.join().await??);
        }
        Ok(out)
    }
}

/// The `ordo` binary beside this one. Under `cargo run` it is built first (a no-op when it is
/// up to date: `cargo run --bin ordo-bench` builds this package only, and the server is another
/// one, so without this a stale server would be measured). Run directly, the bench measures
/// whatever `ordo` was built last; `cargo build --release` builds both.
fn ordo_binary() -> Result<std::path::PathBuf, BenchError> {
    let me = std::env::current_exe().map_err(fail("cannot find ordo-bench itself"))?;
    if let Some(cargo) = std::env::var_os("CARGO") {
        let release = me
            .parent()
            .and_then(|d| d.file_name())
            .is_some_and(|n| n == "release");
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "--quiet", "--bin", "ordo"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .map_err(fail("cannot run cargo build --bin ordo"))?;
        if !status.success() {
            return Err(BenchError(format!(
                "cargo build --bin ordo failed ({status})"
            )));
        }
    }
    ordo_testkit::ordo_exe().map_err(fail("the server to measure"))
}

impl Dialer {
    fn new(ws: Vec<String>, admin: Admin, secret: Option<String>) -> Self {
        Dialer {
            ws,
            next: 0.into(),
            admin,
            secret,
        }
    }

    /// The URL the next device connects to.
    fn pick(&self) -> &str {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.ws[i % self.ws.len()]
    }

    async fn token(&self, user: &str, device: &str) -> Result<String, BenchError> {
        match &self.secret {
            Some(secret) => ordo_testkit::token(secret, user, device, TOKEN_TTL_SECS)
                .map_err(fail("cannot sign a token")),
            None => self
                .admin
                .token(user, device)
                .await
                .map_err(fail("cannot get a token from the admin API")),
        }
    }

    /// Connects `user`'s device `device` and reads its `welcome`.
    async fn connect(
        &self,
        user: &str,
        device: &str,
        from: Option<IpAddr>,
    ) -> Result<WireClient, BenchError> {
        let token = self.token(user, device).await?;
        let ws = self.pick();
        let mut c = timeout(IDLE, WireClient::connect_from(ws, &token, ENC, from))
            .await
            .map_err(|_| {
                BenchError(format!(
                    "cannot connect to Ordo at {ws}: no answer within {} s",
                    IDLE.as_secs()
                ))
            })?
            .map_err(fail(&format!("cannot connect to Ordo at {ws}")))?;
        match c.recv_timeout(IDLE).await {
            Ok(ServerFrame::Welcome { .. }) => Ok(c),
            Ok(other) => Err(BenchError(format!("expected welcome, got {other:?}"))),
            Err(e) => Err(BenchError(format!("no welcome: {e}"))),
        }
    }
}

impl System for Ordo {
    type Receiver = Receiver;
    type Sender = Sender;
    type Idle = WireClient;

    fn name(&self) -> &'static str {
        match (&self.schema, self.nodes.is_empty()) {
            (Some(_), false) => "ordo-cluster",
            (Some(_), true) => "ordo-pg",
            (None, _) => "ordo",
        }
    }

    async fn pair_receivers(
        &mut self,
        n: usize,
        _body_bytes: usize,
    ) -> Result<Vec<Receiver>, BenchError> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let c = self.dial.connect(&self.receiver(i), "d", None).await?;
            out.push(Receiver::new(c, None));
        }
        Ok(out)
    }

    async fn pair_sender(
        &mut self,
        i: usize,
        window: usize,
        bodies: Bodies,
    ) -> Result<Sender, BenchError> {
        let user = format!("s{}-{i}", self.tag);
        let c = self.dial.connect(&user, "d", None).await?;
        Ok(Sender::new(
            c,
            user,
            To::User(self.receiver(i)),
            window,
            bodies,
        ))
    }

    async fn group_receivers(
        &mut self,
        members: usize,
        _body_bytes: usize,
    ) -> Result<Vec<Receiver>, BenchError> {
        let names: Vec<String> = (0..members).map(|i| self.member(i)).collect();
        self.dial
            .admin
            .create_group(&self.group(), &names)
            .await
            .map_err(fail("cannot create the group"))?;
        let devices = self.connect_many(names).await?;
        Ok(devices
            .into_iter()
            .map(|c| Receiver::new(c, None))
            .collect())
    }

    async fn group_sender(&mut self, bodies: Bodies) -> Result<Sender, BenchError> {
        let user = self.member(0);
        let c = self.dial.connect(&user, "sender", None).await?;
        Ok(Sender::new(c, user, To::Conv(self.group()), 1, bodies))
    }

    /// Nothing to set up: the server keeps a user's messages whether or not a device of theirs
    /// was ever connected.
    async fn offline_receiver(&mut self, _body_bytes: usize) -> Result<(), BenchError> {
        Ok(())
    }

    async fn catchup_sender(
        &mut self,
        window: usize,
        bodies: Bodies,
    ) -> Result<Sender, BenchError> {
        let user = format!("s{}", self.tag);
        let c = self.dial.connect(&user, "d", None).await?;
        let to = format!("r{}", self.tag);
        Ok(Sender::new(c, user, To::User(to), window, bodies))
    }

    /// Connects, then asks for the direct conversation from its start.
    async fn reconnect_receiver(&mut self, _body_bytes: usize) -> Result<Receiver, BenchError> {
        let (sender, receiver) = (format!("s{}", self.tag), format!("r{}", self.tag));
        let c = self.dial.connect(&receiver, "d", None).await?;
        let conv = ordo_protocol::direct_conv_id(&sender, &receiver);
        Ok(Receiver::new(c, Some(conv)))
    }

    /// The server's pid; a cluster's first node's.
    fn server_pid(&self) -> Option<u32> {
        match &self.server {
            Some(s) => s.pid(),
            None => self.nodes.first().and_then(|(n, _)| n.pid()),
        }
    }

    fn idle_connection(
        &self,
        i: usize,
        from: IpAddr,
    ) -> impl std::future::Future<Output = Result<WireClient, BenchError>> + Send + 'static {
        let (d, user) = (self.dial.clone(), format!("c{}-{i}", self.tag));
        async move { d.connect(&user, "d", Some(from)).await }
    }

    async fn create_groups(&self, n: usize) -> Result<(), BenchError> {
        // A few requests at a time: each creation is a commit of its own, and the server
        // groups concurrent ones.
        const AT_ONCE: usize = 32;
        let workers: Vec<_> = (0..AT_ONCE)
            .map(|w| {
                let d = self.dial.clone();
                let tag = self.tag.clone();
                Task::spawn(async move {
                    for i in (w..n).step_by(AT_ONCE) {
                        let members = [format!("gm{tag}-{i}"), format!("gm{tag}-{}", i / 2 + 1)];
                        d.admin
                            .create_group(&format!("sg{tag}-{i}"), &members)
                            .await
                            .map_err(fail("creating a group"))?;
                    }
                    Ok::<_, BenchError>(())
                })
            })
            .collect();
        for w in workers {
            w.join().await??;
        }
        Ok(())
    }

    async fn kill_and_restart(&mut self) -> Result<Duration, BenchError> {
        let mut server = self.server.take().ok_or_else(|| {
            BenchError("the bench can only restart a server it started (not --server)".into())
        })?;
        let (server, took) = tokio::task::spawn_blocking(move || {
            server.kill9()?;
            let start = Instant::now();
            server.restart()?;
            Ok::<_, ordo_testkit::HarnessError>((server, start.elapsed()))
        })
        .await
        .map_err(fail("restarting the server"))?
        .map_err(fail("cannot restart `ordo serve`"))?;
        // It may have had to come back on another port.
        self.dial = Arc::new(Dialer::new(
            vec![server.ws_url()],
            Admin::new(&server.http_url(), server.admin_key()).map_err(fail("the server"))?,
            Some(server.secret().to_string()),
        ));
        self.server = Some(server);
        Ok(took)
    }

    /// The store file (`ordo.redb`); the write-ahead log's two segments are a fixed size
    /// whatever is stored, so they are left out.
    fn data_bytes(&self) -> Option<u64> {
        let file = self.server.as_ref()?.data_dir().join("ordo.redb");
        std::fs::metadata(file).ok().map(|m| m.len())
    }

    fn disk_floor(&self) -> Result<Option<(f64, f64)>, BenchError> {
        match &self.server {
            Some(s) => {
                let disk = crate::disk::probe(&s.data_dir(), 1000)?;
                Ok(Some((disk.p50, disk.p99)))
            }
            None => Ok(None),
        }
    }

    async fn measuring(&mut self) {
        self.before = self.dial.admin.metrics().await.unwrap_or_default();
        self.nodes_before.clear();
        for (_, admin) in &self.nodes {
            self.nodes_before
                .push(admin.metrics().await.unwrap_or_default());
        }
    }

    /// Adds `messages_per_fsync`: how many messages shared one commit during the run.
    async fn measured(&mut self, out: &mut Outcome) {
        let after = self.dial.admin.metrics().await.unwrap_or_default();
        let d = |k: &str| {
            after.get(k).copied().unwrap_or(0.0) - self.before.get(k).copied().unwrap_or(0.0)
        };
        let commits = d("ordo_commits_total");
        if commits > 0.0 {
            out.extra.insert(
                "messages_per_fsync".into(),
                d("ordo_commit_batch_messages_sum") / commits,
            );
        }
        if !self.nodes.is_empty() {
            self.measured_nodes(out).await;
        }
    }

    /// The server (if the bench started it) stops with the run.
    async fn close(self, result: Result<Outcome, BenchError>) -> Result<Outcome, BenchError> {
        if let Some(s) = self.server {
            let _ = tokio::task::spawn_blocking(move || drop(s)).await;
        }
        let nodes = self.nodes;
        let _ = tokio::task::spawn_blocking(move || drop(nodes)).await;
        if let Some((db, name)) = self.schema {
            let drop_it = format!("DROP SCHEMA IF EXISTS {name} CASCADE");
            let _ = tokio::task::spawn_blocking(move || schema_sql(&db, &drop_it)).await;
        }
        result
    }

    fn cpu_groups(&self) -> Vec<(&'static str, crate::cpu::Procs)> {
        let mut groups = Vec::new();
        if let Some(pid) = self.server.as_ref().and_then(ServerProcess::pid) {
            groups.push(("server", crate::cpu::Procs::Pid(pid)));
        }
        for ((node, _), name) in self.nodes.iter().zip(NODE_NAMES) {
            if let Some(pid) = node.pid() {
                groups.push((name, crate::cpu::Procs::Pid(pid)));
            }
        }
        if !self.nodes.is_empty() {
            groups.push(("nats", crate::cpu::Procs::Named("nats-server")));
        }
        if self.schema.is_some() {
            groups.push(("postgres", crate::cpu::Procs::Named("postgres")));
        }
        groups
    }
}

/// Where a sender's messages go.
enum To {
    User(String),
    Conv(String),
}

/// A device sending with at most `window` `send`s unanswered. It reads its `accepted` frames
/// itself, in the same task: while it waits for room in the window, or in [`Publish::idle`].
/// Frames are written out in one flush per batch: a send that finds room only queues its frame,
/// which goes out when the sender next has to wait.
pub struct Sender {
    c: WireClient,
    user: String,
    to: To,
    window: usize,
    bodies: Bodies,
    /// Send stamps of messages `first..`, client message ids `m{first}`, ...: `None` once
    /// accepted. Accepted ones are dropped from the front, so this holds about a window.
    stamps: VecDeque<Option<u64>>,
    /// Client message id number of `stamps[0]`.
    first: usize,
    accepted: usize,
    accept: Latency,
    /// Frames queued but not yet written out.
    unflushed: bool,
    error: Option<String>,
}

impl Sender {
    fn new(c: WireClient, user: String, to: To, window: usize, bodies: Bodies) -> Self {
        Sender {
            c,
            user,
            to,
            window,
            bodies,
            stamps: VecDeque::new(),
            first: 0,
            accepted: 0,
            accept: Latency::default(),
            unflushed: false,
            error: None,
        }
    }

    /// Messages sent so far.
    fn sent(&self) -> usize {
        self.first + self.stamps.len()
    }

    fn in_flight(&self) -> usize {
        self.sent() - self.accepted
    }

    async fn flush(&mut self) -> Result<(), String> {
        if self.unflushed {
            self.c.flush().await.map_err(|e| format!("sending: {e}"))?;
            self.unflushed = false;
        }
        Ok(())
    }

    /// Takes one frame from the server.
    fn on_frame(&mut self, f: ServerFrame) -> Result<(), String> {
        match f {
            ServerFrame::Accepted { cmid, .. } => {
                let k = cmid.strip_prefix('m').and_then(|k| k.parse::<usize>().ok());
                if let Some(t) = k
                    .and_then(|k| k.checked_sub(self.first))
                    .and_then(|i| self.stamps.get_mut(i))
                    .and_then(Option::take)
                {
                    let now = self.bodies.clock.now_us();
                    self.accept.record_micros(now.saturating_sub(t));
                    self.accepted += 1;
                }
                while self.stamps.front().is_some_and(Option::is_none) {
                    self.stamps.pop_front();
                    self.first += 1;
                }
                Ok(())
            }
            ServerFrame::Rejected { message, .. } | ServerFrame::Error { message, .. } => {
                Err(format!("the server refused a send: {message}"))
            }
            _ => Ok(()),
        }
    }

    /// Writes out what is queued, waits for the next frame (at most [`IDLE`]), then takes every
    /// frame that is already here too, so that the room they make is filled in one batch.
    async fn confirmations(&mut self) -> Result<(), String> {
        self.flush().await?;
        let f = match timeout(IDLE, self.c.recv()).await {
            Err(_) => {
                return Err(format!(
                    "waiting for accepted: nothing came for {} s",
                    IDLE.as_secs()
                ))
            }
            Ok(f) => f.map_err(|e| format!("waiting for accepted: {e}"))?,
        };
        self.on_frame(f)?;
        while let Some(f) = self.c.recv().now_or_never() {
            self.on_frame(f.map_err(|e| format!("waiting for accepted: {e}"))?)?;
        }
        Ok(())
    }

    fn fail(&mut self, e: String) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }
}

impl Publish for Sender {
    async fn send(&mut self) -> Option<u64> {
        while self.error.is_none() && self.in_flight() >= self.window {
            if let Err(e) = self.confirmations().await {
                self.fail(e);
            }
        }
        if self.error.is_some() {
            return None;
        }
        let (stamp, body) = self.bodies.stamped();
        let (conv, to) = match &self.to {
            To::User(u) => (None, Some(u.clone())),
            To::Conv(c) => (Some(c.clone()), None),
        };
        let frame = ClientFrame::Send {
            conv,
            to,
            cmid: format!("m{}", self.sent()),
            body,
            reply_to: None,
        };
        if let Err(e) = self.c.feed(&frame).await {
            self.fail(format!("sending: {e}"));
            return None;
        }
        self.stamps.push_back(Some(stamp));
        self.unflushed = true;
        Some(stamp)
    }

    async fn idle(&mut self) {
        if let Err(e) = self.flush().await {
            return self.fail(e);
        }
        while self.error.is_none() {
            let f = match self.c.recv().await {
                Ok(f) => self.on_frame(f),
                Err(e) => Err(format!("waiting for accepted: {e}")),
            };
            if let Err(e) = f {
                self.fail(e);
            }
        }
    }

    async fn finish(mut self) -> Result<Sent, BenchError> {
        while self.error.is_none() && self.in_flight() > 0 {
            if let Err(e) = self.confirmations().await {
                self.fail(e);
            }
        }
        let sent = self.sent() as u64;
        self.c.close().await;
        if let Some(e) = self.error {
            return Err(BenchError(format!("sender {}: {e}", self.user)));
        }
        Ok(Sent {
            sent,
            accepted: self.accepted as u64,
            accept: self.accept,
        })
    }
}

/// A connected device that receives: pushes, `sync` pages after a `notify` or a gap.
pub struct Receiver {
    c: WireClient,
    /// A conversation to pull from its start once receiving starts (catch-up).
    first_sync: Option<String>,
}

impl Receiver {
    fn new(c: WireClient, first_sync: Option<String>) -> Self {
        Receiver { c, first_sync }
    }
}

fn sync(conv: &str, after: u64) -> ClientFrame {
    ClientFrame::Sync {
        conv: conv.to_string(),
        after,
        limit: Some(u32::MAX),
    }
}

/// A cumulative ack of every conversation's last contiguous seq.
fn ack(last: &HashMap<String, u64>) -> ClientFrame {
    ClientFrame::Ack {
        acks: last
            .iter()
            .map(|(conv, &seq)| Position {
                conv: conv.clone(),
                seq,
            })
            .collect(),
    }
}

/// What a receiving device has: each conversation's last contiguous seq, and how many
/// messages it has not acknowledged yet.
#[derive(Default)]
struct Positions {
    last: HashMap<String, u64>,
    unacked: u64,
}

impl Positions {
    fn last(&self, conv: &str) -> u64 {
        self.last.get(conv).copied().unwrap_or(0)
    }

    /// Counts `m` if it is the next seq of its conversation; says whether it lies past a hole
    /// (to be fetched with a `sync`).
    fn take(&mut self, m: &Message, rx: &mut Receiving) -> bool {
        let l = match self.last.get_mut(m.conv.as_str()) {
            Some(l) => l,
            None => self.last.entry(m.conv.clone()).or_insert(0),
        };
        if m.seq != *l + 1 {
            return m.seq > *l + 1;
        }
        *l = m.seq;
        rx.arrived(m.body.as_bytes());
        self.unacked += 1;
        false
    }
}

impl Subscribe for Receiver {
    /// Receives until told to stop ([`Until`]), counting each seq once and in order; the last
    /// acknowledgement waits until the senders are done (in a fan-out, 10,000 members acking
    /// the last message at once would slow those still receiving it).
    fn receive(self, until: Until) -> Task<Inbox> {
        let Receiver { mut c, first_sync } = self;
        Task::spawn(async move {
            let mut rx = until.start();
            let mut at = Positions::default();
            if let Some(conv) = first_sync {
                if let Err(e) = c.send(&sync(&conv, 0)).await {
                    rx.fail(format!("syncing: {e}"));
                    return rx.inbox;
                }
            }
            while let Some(frame) = rx.next(c.recv()).await {
                // A conversation to pull from (after a hole, a `notify`, a partial page).
                let pull = match frame {
                    Err(e) => Err(format!("receiving: {e}")),
                    Ok(ServerFrame::Msg(m)) => Ok(at.take(&m, &mut rx).then(|| m.conv.clone())),
                    Ok(ServerFrame::Notify { conv, max_seq }) => {
                        Ok((max_seq > at.last(&conv)).then_some(conv))
                    }
                    Ok(ServerFrame::Synced {
                        conv,
                        messages,
                        has_more,
                        ..
                    }) => {
                        for m in &messages {
                            at.take(m, &mut rx);
                        }
                        Ok(has_more.then_some(conv))
                    }
                    Ok(ServerFrame::Error { message, .. }) => {
                        Err(format!("the server sent an error: {message}"))
                    }
                    Ok(_) => Ok(None),
                };
                let sent = match pull {
                    Err(e) => Err(e),
                    Ok(Some(conv)) => {
                        let after = at.last(&conv);
                        c.send(&sync(&conv, after))
                            .await
                            .map_err(|e| format!("syncing: {e}"))
                    }
                    Ok(None) => Ok(()),
                };
                let acked = match sent {
                    Ok(()) if at.unacked >= ACK_EVERY => {
                        at.unacked = 0;
                        c.send(&ack(&at.last))
                            .await
                            .map_err(|e| format!("acking: {e}"))
                    }
                    other => other,
                };
                if let Err(e) = acked {
                    rx.fail(e);
                    return rx.inbox;
                }
            }
            if at.unacked > 0 {
                rx.senders_done().await;
                if let Err(e) = c.send(&ack(&at.last)).await {
                    rx.fail(format!("acking: {e}"));
                }
            }
            c.close().await;
            rx.inbox
        })
    }
}

/// The CPU groups of a cluster's nodes, by index (at most this many nodes).
const NODE_NAMES: [&str; 8] = [
    "node0", "node1", "node2", "node3", "node4", "node5", "node6", "node7",
];

impl Ordo {
    /// Starts `common.nodes` nodes of a cluster on a schema of the run's own in `--store`, and
    /// on `--nats`.
    pub async fn start_cluster(common: &Common) -> Result<Ordo, BenchError> {
        let n = common.nodes.unwrap_or(3);
        if !(2..=NODE_NAMES.len()).contains(&n) {
            return Err(BenchError(format!(
                "--nodes is {n}; a cluster here has 2 to {} nodes",
                NODE_NAMES.len()
            )));
        }
        if common.server.is_some() {
            return Err(BenchError(
                "ordo-cluster starts nodes of its own; --server measures one that is running"
                    .into(),
            ));
        }
        let tag = run_tag();
        let exe = match &common.ordo {
            Some(p) => p.clone(),
            None => ordo_binary()?,
        };
        let (db, name) = (common.store.clone(), format!("ordo_bench_{tag}"));
        let (d, nm) = (db.clone(), name.clone());
        tokio::task::spawn_blocking(move || schema_sql(&d, &format!("CREATE SCHEMA {nm}")))
            .await
            .map_err(fail("making the run's schema"))??;
        let opts = ordo_testkit::nodes::NodeOptions {
            exe,
            store: in_schema(&db, &name),
            nats: common.nats.clone(),
            prefix: format!("bench{tag}"),
            lease_ms: 2000,
            partitions: 64,
            secret: format!("bench-secret-{tag}-{:016x}", rand::random::<u64>()),
            extra: common
                .serve_args
                .as_deref()
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_string)
                .collect(),
        };
        let secret = opts.secret.clone();
        let started = ordo_testkit::nodes::Nodes::start(n, opts).await;
        let nodes = match started {
            Ok(nodes) => nodes,
            Err(e) => {
                let drop_it = format!("DROP SCHEMA IF EXISTS {name} CASCADE");
                let _ = tokio::task::spawn_blocking(move || schema_sql(&db, &drop_it)).await;
                return Err(BenchError(format!("cannot start the cluster: {e}")));
            }
        };
        let mut with_admin = Vec::new();
        for node in nodes.nodes {
            let admin = Admin::new(&node.http_url(), node.admin_key()).map_err(fail("a node"))?;
            with_admin.push((node, admin));
        }
        let ws = with_admin.iter().map(|(n, _)| n.ws_url()).collect();
        let admin = Admin::new(&with_admin[0].0.http_url(), with_admin[0].0.admin_key())
            .map_err(fail("a node"))?;
        Ok(Ordo {
            server: None,
            nodes: with_admin,
            nodes_before: Vec::new(),
            schema: Some((db, name)),
            dial: Arc::new(Dialer::new(ws, admin, Some(secret))),
            tag,
            before: HashMap::new(),
        })
    }

    /// A cluster's figures: messages per commit over all nodes, the share of sends forwarded to
    /// another node, and each node's resident memory.
    async fn measured_nodes(&self, out: &mut Outcome) {
        let mut sum = HashMap::<&str, f64>::new();
        let keys = [
            "ordo_commits_total",
            "ordo_commit_batch_messages_sum",
            "ordo_messages_accepted_total",
            "ordo_cluster_forwarded_sends_total",
        ];
        for (i, (node, admin)) in self.nodes.iter().enumerate() {
            let after = admin.metrics().await.unwrap_or_default();
            let before = self.nodes_before.get(i);
            for k in keys {
                let d = after.get(k).copied().unwrap_or(0.0)
                    - before.and_then(|b| b.get(k)).copied().unwrap_or(0.0);
                *sum.entry(k).or_default() += d;
            }
            if let Some(rss) = node.pid().and_then(rss_bytes) {
                out.extra
                    .insert(format!("node{i}_rss_mib"), rss as f64 / (1 << 20) as f64);
            }
        }
        let commits = sum["ordo_commits_total"];
        if commits > 0.0 {
            out.extra.insert(
                "messages_per_fsync".into(),
                sum["ordo_commit_batch_messages_sum"] / commits,
            );
        }
        let accepted = sum["ordo_messages_accepted_total"];
        if accepted > 0.0 {
            out.extra.insert(
                "forwarded_share".into(),
                sum["ordo_cluster_forwarded_sends_total"] / accepted,
            );
        }
    }
}

/// Resident memory of a process, from `/proc/<pid>/status`.
fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs one statement of schema upkeep on the `--store` database.
fn schema_sql(db: &str, sql: &str) -> Result<(), BenchError> {
    let mut c = postgres::Client::connect(db, postgres::NoTls)
        .map_err(|e| BenchError(format!("cannot connect to the --store database: {e}")))?;
    c.batch_execute(sql)
        .map_err(|e| BenchError(format!("{sql}: {e}")))
}

/// The `--store` database's connection string, its tables in `schema`.
fn in_schema(db: &str, schema: &str) -> String {
    if db.starts_with("postgres://") || db.starts_with("postgresql://") {
        let sep = if db.contains('?') { '&' } else { '?' };
        format!("{db}{sep}options=-c%20search_path%3D{schema}")
    } else {
        format!("{db} options='-c search_path={schema}'")
    }
}
