//! The scenarios against Ordo: a fresh `ordo serve` per run (a child process on a temporary data
//! directory, no send rate limit), or the server named by `--server`. Clients speak the raw
//! protocol ([`WireClient`], MessagePack), the way a client in any language would: receivers take
//! `msg` pushes, `sync` on `notify` or a gap, and acknowledge cumulatively every
//! [`ACK_EVERY`] messages.
//!
//! Durability as measured: every `accepted` is sent only after the message is fsynced, and no
//! device sees a message before that.

use super::payload::Clock;
use super::report::{Latency, Outcome};
use super::{
    fail, progress, run_tag, BenchError, CatchupArgs, Common, ConnectionsArgs, FanoutArgs,
    PairsArgs,
};
use crate::check::target::{CheckTarget, LocalServer};
use ordo::wire::WireClient;
use ordo_protocol::{ClientFrame, Encoding, Message, Position, ServerFrame};
use ordo_server::auth::{Claims, TokenKey};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Receivers acknowledge after this many messages (and when they finish).
const ACK_EVERY: u64 = 32;
/// A receiver gives up once nothing arrived for this long.
const IDLE: Duration = Duration::from_secs(10);
const ENC: Encoding = Encoding::MsgPack;

/// The Ordo server under test.
struct Sut {
    server: Option<LocalServer>,
    dial: Arc<Dialer>,
}

/// How to reach the server under test: connect devices, mint tokens, create groups. Shared by
/// connect tasks.
struct Dialer {
    ws: String,
    http_base: String,
    http: reqwest::Client,
    admin_key: String,
    /// Signs tokens locally when the bench started the server (else the admin API mints them).
    key: Option<TokenKey>,
}

impl Sut {
    async fn start(common: &Common) -> Result<Sut, BenchError> {
        let http = reqwest::Client::new();
        if let Some(url) = &common.server {
            let base = url
                .trim_end_matches('/')
                .trim_end_matches("/v1/ws")
                .to_string();
            let http_base = base
                .strip_prefix("ws://")
                .map(|r| format!("http://{r}"))
                .ok_or_else(|| {
                    BenchError(format!(
                        "--server {url:?} must be a WebSocket URL such as ws://127.0.0.1:7400"
                    ))
                })?;
            let admin_key =
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
            return Ok(Sut {
                server: None,
                dial: Arc::new(Dialer {
                    ws: base,
                    http_base,
                    http,
                    admin_key,
                    key: None,
                }),
            });
        }
        let extra: Vec<String> = common
            .serve_args
            .as_deref()
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_string)
            .collect();
        let server = tokio::task::spawn_blocking(move || LocalServer::start_with(0.0, extra))
            .await
            .map_err(fail("starting the server"))?
            .map_err(fail("cannot start `ordo serve`"))?;
        let port = server.port();
        Ok(Sut {
            dial: Arc::new(Dialer {
                key: Some(TokenKey::new(server.secret().as_bytes())),
                admin_key: server.admin_key().to_string(),
                ws: format!("ws://127.0.0.1:{port}"),
                http_base: format!("http://127.0.0.1:{port}"),
                http,
            }),
            server: Some(server),
        })
    }

    async fn metrics(&self) -> HashMap<String, f64> {
        self.dial.metrics().await
    }

    fn pid(&self) -> Option<u32> {
        self.server.as_ref().and_then(|s| s.pid())
    }

    fn data_dir(&self) -> Option<PathBuf> {
        self.server.as_ref().map(|s| s.data_dir())
    }
}

impl Dialer {
    async fn token(&self, user: &str, device: &str) -> Result<String, BenchError> {
        if let Some(key) = &self.key {
            return key
                .sign(&Claims {
                    user: user.to_string(),
                    device: device.to_string(),
                    exp: u64::MAX / 2,
                })
                .map_err(fail("cannot sign a token"));
        }
        let resp: serde_json::Value = self
            .http
            .post(format!("{}/v1/admin/tokens", self.http_base))
            .bearer_auth(&self.admin_key)
            .json(&serde_json::json!({"user": user, "device": device}))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(fail("cannot get a token from the admin API"))?
            .json()
            .await
            .map_err(fail("the token endpoint answered something else"))?;
        resp["token"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| BenchError("the token endpoint returned no token".into()))
    }

    async fn create_group(&self, id: &str, members: &[String]) -> Result<(), BenchError> {
        self.http
            .post(format!("{}/v1/admin/groups", self.http_base))
            .bearer_auth(&self.admin_key)
            .json(&serde_json::json!({"id": id, "members": members}))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(fail("cannot create the group"))?;
        Ok(())
    }

    /// Connects `user`'s device `device` and reads its `welcome`.
    async fn connect(
        &self,
        user: &str,
        device: &str,
        from: Option<std::net::IpAddr>,
    ) -> Result<WireClient, BenchError> {
        let token = self.token(user, device).await?;
        let mut c = WireClient::connect_from(&self.ws, &token, ENC, from)
            .await
            .map_err(fail(&format!("cannot connect to Ordo at {}", self.ws)))?;
        match c.recv_timeout(IDLE).await {
            Ok(ServerFrame::Welcome { .. }) => Ok(c),
            Ok(other) => Err(BenchError(format!("expected welcome, got {other:?}"))),
            Err(e) => Err(BenchError(format!("no welcome: {e}"))),
        }
    }

    /// The server's counters from `/metrics`.
    async fn metrics(&self) -> HashMap<String, f64> {
        let Ok(resp) = self
            .http
            .get(format!("{}/metrics", self.http_base))
            .send()
            .await
        else {
            return HashMap::new();
        };
        let text = resp.text().await.unwrap_or_default();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }
}

/// Messages per fsync between two `/metrics` readings.
fn per_fsync(before: &HashMap<String, f64>, after: &HashMap<String, f64>) -> Option<f64> {
    let d = |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    let commits = d("ordo_commits_total");
    (commits > 0.0).then(|| d("ordo_commit_batch_messages_sum") / commits)
}

/// What one sender measured.
struct Sent {
    accept: Latency,
    /// Actual minus scheduled send times (fixed-rate runs).
    behind: Latency,
    sent: u64,
    accepted: u64,
}

/// Sends `count` messages to user `to` with at most `window` unanswered; with `interval`, the
/// k-th is due at `start_us + k * interval` (how late it went is recorded in `behind`).
async fn send_all(
    mut c: WireClient,
    to: String,
    count: usize,
    window: usize,
    body_bytes: usize,
    pace: Option<(u64, f64)>,
    clock: Clock,
) -> Result<Sent, BenchError> {
    let mut accept = Latency::default();
    let mut behind = Latency::default();
    // Message k (client message id `m{k}`) carries its send stamp here until it is accepted.
    let mut stamps: Vec<Option<u64>> = vec![None; count];
    let (mut next, mut accepted) = (0usize, 0usize);
    let due = |k: usize| pace.map(|(start, every)| start + (k as f64 * every) as u64);
    let frame = |k: usize, stamp: u64| ClientFrame::Send {
        conv: None,
        to: Some(to.clone()),
        cmid: format!("m{k}"),
        body: clock.body_at(stamp, body_bytes),
        reply_to: None,
    };
    let mut idle = Idle::new();
    while accepted < count {
        let can_send = next < count && next - accepted < window;
        // Unpaced, a free window slot is used as soon as no frame is waiting to be read.
        let wake = due(next).map(|us| tokio::time::Instant::from_std(clock.at(us)));
        let slot = async move {
            if let Some(at) = wake {
                tokio::time::sleep_until(at).await;
            }
        };
        tokio::select! {
            biased;
            f = c.recv() => {
                idle.seen();
                match f.map_err(fail("waiting for accepted"))? {
                    ServerFrame::Accepted { cmid, .. } => {
                        let k = cmid.strip_prefix('m').and_then(|k| k.parse::<usize>().ok());
                        if let Some(t) = k.and_then(|k| stamps.get_mut(k)).and_then(Option::take) {
                            accept.record_micros(clock.now_us().saturating_sub(t));
                            accepted += 1;
                        }
                    }
                    ServerFrame::Rejected { message, .. } | ServerFrame::Error { message, .. } => {
                        return Err(BenchError(format!("the server refused a send: {message}")));
                    }
                    _ => {}
                }
            }
            _ = idle.expired() => {
                return Err(BenchError(format!(
                    "waiting for accepted: nothing came for {} s",
                    IDLE.as_secs()
                )));
            }
            _ = slot, if can_send => {
                let now = clock.now_us();
                while next < count && next - accepted < window && due(next).is_none_or(|d| d <= now) {
                    if let Some(d) = due(next) {
                        behind.record_micros(now.saturating_sub(d));
                    }
                    stamps[next] = Some(now);
                    c.feed(&frame(next, now)).await.map_err(fail("sending"))?;
                    next += 1;
                }
                c.flush().await.map_err(fail("sending"))?;
            }
        }
    }
    c.close().await;
    Ok(Sent {
        accept,
        behind,
        sent: next as u64,
        accepted: accepted as u64,
    })
}

/// Notices that no frame came for [`IDLE`] with one timer per period rather than one per frame
/// (a timer per frame would cost CPU the measured server shares): a frame only marks that
/// something came; when the timer fires after one, it is re-armed.
struct Idle {
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    seen: bool,
}

impl Idle {
    fn new() -> Self {
        Idle {
            timer: Box::pin(tokio::time::sleep(IDLE)),
            seen: false,
        }
    }

    fn seen(&mut self) {
        self.seen = true;
    }

    /// Resolves once a whole period (between [`IDLE`] and twice that) passed without a frame.
    async fn expired(&mut self) {
        loop {
            self.timer.as_mut().await;
            if !std::mem::take(&mut self.seen) {
                return;
            }
            self.timer
                .as_mut()
                .reset(tokio::time::Instant::now() + IDLE);
        }
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

/// What one receiving device measured.
struct Received {
    delivery: Latency,
    got: u64,
    /// When the last message arrived (µs on the run's clock).
    last_us: u64,
}

/// Receives until `expected` messages have arrived (or nothing came for [`IDLE`]), taking
/// pushes, syncing on `notify` and gaps, acking every [`ACK_EVERY`]. `on_message` is told
/// each new message's index (its seq - 1) and age in µs.
async fn receive(
    mut c: WireClient,
    expected: u64,
    clock: Clock,
    first_sync: Option<String>,
    mut ack_at_end: Option<tokio::sync::watch::Receiver<bool>>,
    on_message: impl Fn(u64, u64) + Send,
) -> Result<(Received, WireClient), BenchError> {
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut delivery = Latency::default();
    let (mut got, mut unacked, mut last_us) = (0u64, 0u64, 0u64);
    let sync = |conv: &str, after: u64| ClientFrame::Sync {
        conv: conv.to_string(),
        after,
        limit: Some(u32::MAX),
    };
    if let Some(conv) = first_sync {
        c.send(&sync(&conv, 0)).await.map_err(fail("syncing"))?;
    }
    let mut idle = Idle::new();
    while got < expected {
        let frame = tokio::select! {
            biased;
            f = c.recv() => f.map_err(fail("receiving"))?,
            _ = idle.expired() => break,
        };
        idle.seen();
        let mut take = |m: &Message, last: &mut HashMap<String, u64>| -> bool {
            let l = match last.get_mut(m.conv.as_str()) {
                Some(l) => l,
                None => last.entry(m.conv.clone()).or_insert(0),
            };
            if m.seq != *l + 1 {
                return m.seq > *l + 1;
            }
            *l = m.seq;
            let now = clock.now_us();
            let age = Clock::stamp_of(m.body.as_bytes()).map_or(0, |t| now.saturating_sub(t));
            delivery.record_micros(age);
            on_message(m.seq - 1, age);
            got += 1;
            unacked += 1;
            last_us = now;
            false
        };
        match frame {
            ServerFrame::Msg(m) => {
                // A push past a hole: fetch the hole.
                let gap = take(&m, &mut last);
                if gap {
                    let after = last[&m.conv];
                    c.send(&sync(&m.conv, after))
                        .await
                        .map_err(fail("syncing"))?;
                }
            }
            ServerFrame::Notify { conv, max_seq } => {
                let after = last.get(&conv).copied().unwrap_or(0);
                if max_seq > after {
                    c.send(&sync(&conv, after)).await.map_err(fail("syncing"))?;
                }
            }
            ServerFrame::Synced {
                conv,
                messages,
                has_more,
                ..
            } => {
                for m in &messages {
                    take(m, &mut last);
                }
                if has_more {
                    let after = last.get(&conv).copied().unwrap_or(0);
                    c.send(&sync(&conv, after)).await.map_err(fail("syncing"))?;
                }
            }
            ServerFrame::Error { message, .. } => {
                return Err(BenchError(format!("the server sent an error: {message}")))
            }
            _ => {}
        }
        if unacked >= ACK_EVERY {
            unacked = 0;
            c.send(&ack(&last)).await.map_err(fail("acking"))?;
        }
    }
    if unacked > 0 {
        // The last acknowledgement waits for the run's end when asked (in a fan-out, 10,000
        // members acking the last message at once would slow those still receiving it).
        if let Some(end) = ack_at_end.as_mut() {
            let _ = end.wait_for(|&e| e).await;
        }
        c.send(&ack(&last)).await.map_err(fail("acking"))?;
    }
    Ok((
        Received {
            delivery,
            got,
            last_us,
        },
        c,
    ))
}

pub async fn pairs(common: &Common, a: &PairsArgs, clock: &Clock) -> Result<Outcome, BenchError> {
    let sut = Sut::start(common).await?;
    let tag = run_tag();
    let mut out = Outcome::new("ordo");
    if a.rate.is_some() {
        if let Some(dir) = sut.data_dir() {
            let disk = super::disk::probe(&dir, 1000)?;
            out.extra.insert("disk_fdatasync_p50_ms".into(), disk.p50);
            out.extra.insert("disk_fdatasync_p99_ms".into(), disk.p99);
        }
    }
    let total = (a.pairs * a.messages) as u64;
    let bar = progress("ordo pairs", total);
    let mut receivers = Vec::new();
    for i in 0..a.pairs {
        let c = sut.dial.connect(&format!("r{tag}-{i}"), "d", None).await?;
        let (expected, clock, bar) = (a.messages as u64, *clock, bar.clone());
        receivers.push(tokio::spawn(async move {
            receive(c, expected, clock, None, None, move |_, _| bar.inc(1)).await
        }));
    }
    let mut clients = Vec::new();
    for i in 0..a.pairs {
        clients.push(sut.dial.connect(&format!("s{tag}-{i}"), "d", None).await?);
    }
    let before = sut.metrics().await;
    let start_us = clock.now_us();
    let pace = a
        .rate
        .map(|r| (start_us, 1e6 * a.pairs as f64 / r.max(0.001)));
    let mut senders = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let to = format!("r{tag}-{i}");
        let (n, w, b, clock) = (a.messages, a.window, a.body_bytes, *clock);
        senders.push(tokio::spawn(send_all(c, to, n, w, b, pace, clock)));
    }
    let mut accept = Latency::default();
    let mut behind = Latency::default();
    for s in senders {
        let s = s.await.map_err(fail("a sender task"))??;
        accept.merge(&s.accept);
        behind.merge(&s.behind);
        out.sent += s.sent;
        out.accepted += s.accepted;
    }
    let mut delivery = Latency::default();
    let mut end_us = start_us;
    for r in receivers {
        let (r, c) = r.await.map_err(fail("a receiver task"))??;
        c.close().await;
        delivery.merge(&r.delivery);
        out.delivered += r.got;
        end_us = end_us.max(r.last_us);
    }
    bar.finish();
    if let Some(f) = per_fsync(&before, &sut.metrics().await) {
        out.extra.insert("messages_per_fsync".into(), f);
    }
    out.extra
        .insert("lost".into(), out.sent.saturating_sub(out.delivered) as f64);
    super::report::note_behind(&mut out, &behind);
    out.finish((end_us - start_us) as f64 / 1e6, &accept, &delivery);
    Ok(out)
}

pub async fn fanout(common: &Common, a: &FanoutArgs, clock: &Clock) -> Result<Outcome, BenchError> {
    let sut = Sut::start(common).await?;
    let tag = run_tag();
    let members: Vec<String> = (0..a.members).map(|i| format!("m{tag}-{i}")).collect();
    let group = format!("g{tag}");
    sut.dial.create_group(&group, &members).await?;
    let mut out = Outcome::new("ordo");
    // Per message: how many members have it, and when the last one got it.
    let counts: Arc<Vec<std::sync::atomic::AtomicU64>> =
        Arc::new((0..a.messages).map(|_| Default::default()).collect());
    let done = Arc::new(tokio::sync::Notify::new());
    let (ended, end) = tokio::sync::watch::channel(false);
    let bar = progress("ordo fanout: connecting", a.members as u64);
    let receivers = connect_many(&sut, &members, None, 256, &bar).await?;
    bar.finish();
    let bar = progress("ordo fanout", (a.members * a.messages) as u64);
    let mut tasks = Vec::new();
    for c in receivers {
        let (counts, done, bar, n, clock, end) = (
            counts.clone(),
            done.clone(),
            bar.clone(),
            a.members as u64,
            *clock,
            end.clone(),
        );
        tasks.push(tokio::spawn(async move {
            receive(
                c,
                counts.len() as u64,
                clock,
                None,
                Some(end),
                move |k, _| {
                    bar.inc(1);
                    let have = counts[k as usize].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if have + 1 == n {
                        done.notify_one();
                    }
                },
            )
            .await
        }));
    }
    let mut sender = sut.dial.connect(&members[0], "sender", None).await?;
    let mut accept = Latency::default();
    let mut fanout = Latency::default();
    let start_us = clock.now_us();
    for k in 0..a.messages {
        let sent_us = clock.now_us();
        let frame = ClientFrame::Send {
            conv: Some(group.clone()),
            to: None,
            cmid: format!("m{k}"),
            body: clock.body_at(sent_us, a.body_bytes),
            reply_to: None,
        };
        sender.send(&frame).await.map_err(fail("sending"))?;
        out.sent += 1;
        let all = done.notified();
        tokio::pin!(all);
        let wait = tokio::time::Instant::now() + IDLE;
        loop {
            if counts[k].load(std::sync::atomic::Ordering::SeqCst) >= a.members as u64 {
                break;
            }
            tokio::select! {
                _ = &mut all => { all.set(done.notified()); }
                f = sender.recv_timeout(IDLE) => {
                    if let Ok(ServerFrame::Accepted { .. }) = f {
                        accept.record_micros(clock.now_us() - sent_us);
                        out.accepted += 1;
                    }
                }
                _ = tokio::time::sleep_until(wait) => break,
            }
        }
        fanout.record_micros(clock.now_us() - sent_us);
        if std::env::var_os("ORDO_BENCH_TRACE").is_some() {
            eprintln!(
                "fanout message {k}: {} ms",
                (clock.now_us() - sent_us) / 1000
            );
        }
    }
    let _ = ended.send(true);
    let mut delivery = Latency::default();
    let mut end_us = start_us;
    for t in tasks {
        let (r, c) = t.await.map_err(fail("a receiver task"))??;
        drop(c);
        delivery.merge(&r.delivery);
        out.delivered += r.got;
        end_us = end_us.max(r.last_us);
    }
    bar.finish();
    if let Some(s) = fanout.summary() {
        out.extra.insert("fanout_ms_p50".into(), s.p50);
        out.extra.insert("fanout_ms_max".into(), s.max);
    }
    out.extra.insert(
        "lost".into(),
        (out.sent * a.members as u64).saturating_sub(out.delivered) as f64,
    );
    out.finish((end_us - start_us) as f64 / 1e6, &accept, &delivery);
    Ok(out)
}

/// Connects one device for each of `users`, `concurrency` at a time, spreading them over
/// `sources` (local addresses) when given.
async fn connect_many(
    sut: &Sut,
    users: &[String],
    sources: Option<&[std::net::IpAddr]>,
    concurrency: usize,
    bar: &super::progress::Progress,
) -> Result<Vec<WireClient>, BenchError> {
    let mut out = Vec::with_capacity(users.len());
    let mut pending = VecDeque::new();
    for (i, u) in users.iter().enumerate() {
        let from = sources.map(|s| s[i % s.len()]);
        let (d, u) = (sut.dial.clone(), u.clone());
        pending.push_back(tokio::spawn(async move { d.connect(&u, "d", from).await }));
        if pending.len() >= concurrency {
            if let Some(t) = pending.pop_front() {
                out.push(t.await.map_err(fail("a connect task"))??);
                bar.inc(1);
            }
        }
    }
    for t in pending {
        out.push(t.await.map_err(fail("a connect task"))??);
        bar.inc(1);
    }
    Ok(out)
}

pub async fn catchup(
    common: &Common,
    a: &CatchupArgs,
    clock: &Clock,
) -> Result<Outcome, BenchError> {
    let sut = Sut::start(common).await?;
    let tag = run_tag();
    let (sender, receiver) = (format!("s{tag}"), format!("r{tag}"));
    let mut out = Outcome::new("ordo");
    let bar = progress("ordo catchup: filling", a.messages as u64);
    let c = sut.dial.connect(&sender, "d", None).await?;
    let sent = send_all(
        c,
        receiver.clone(),
        a.messages,
        a.window,
        a.body_bytes,
        None,
        *clock,
    )
    .await?;
    bar.finish();
    out.sent = sent.sent;
    out.accepted = sent.accepted;
    let conv = ordo_protocol::direct_conv_id(&sender, &receiver);
    let bar = progress("ordo catchup", a.messages as u64);
    let start = Instant::now();
    let c = sut.dial.connect(&receiver, "d", None).await?;
    let b = bar.clone();
    let (r, c) = receive(
        c,
        a.messages as u64,
        *clock,
        Some(conv),
        None,
        move |_, _| b.inc(1),
    )
    .await?;
    let took = start.elapsed();
    c.close().await;
    bar.finish();
    out.delivered = r.got;
    out.extra
        .insert("catchup_ms".into(), took.as_secs_f64() * 1000.0);
    out.extra
        .insert("lost".into(), out.sent.saturating_sub(out.delivered) as f64);
    out.finish(took.as_secs_f64(), &sent.accept, &Latency::default());
    Ok(out)
}

/// Resident memory of a process, from `/proc/<pid>/status`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub async fn connections(common: &Common, a: &ConnectionsArgs) -> Result<Outcome, BenchError> {
    let sut = Sut::start(common).await?;
    let pid = sut.pid().ok_or_else(|| {
        BenchError(
            "the connections scenario reads the server's memory: run it without --server".into(),
        )
    })?;
    let tag = run_tag();
    let sources: Vec<std::net::IpAddr> = (1..=a.sources.max(1))
        .map(|i| std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, i)))
        .collect();
    let users: Vec<String> = (0..a.connections).map(|i| format!("c{tag}-{i}")).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before =
        rss_bytes(pid).ok_or_else(|| BenchError("cannot read the server's memory".into()))?;
    let bar = progress("ordo connections", a.connections as u64);
    let start = Instant::now();
    let held = connect_many(&sut, &users, Some(&sources), a.concurrency, &bar).await?;
    let took = start.elapsed().as_secs_f64();
    bar.finish();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after =
        rss_bytes(pid).ok_or_else(|| BenchError("cannot read the server's memory".into()))?;
    let mut out = Outcome::new("ordo");
    let n = held.len() as f64;
    out.extra.insert("connections".into(), n);
    out.extra.insert("connects_per_sec".into(), n / took);
    out.extra.insert(
        "server_rss_before_mib".into(),
        before as f64 / (1 << 20) as f64,
    );
    out.extra.insert(
        "server_rss_after_mib".into(),
        after as f64 / (1 << 20) as f64,
    );
    out.extra.insert(
        "server_bytes_per_connection".into(),
        after.saturating_sub(before) as f64 / n.max(1.0),
    );
    out.finish(took, &Latency::default(), &Latency::default());
    drop(held);
    Ok(out)
}
