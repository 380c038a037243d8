//! Offline-push webhook: tells the app's backend which members of a conversation have no
//! connected device when a message is accepted, so that it can send them an APNs / FCM push.
//!
//! For each durable message in a conversation of at most [`MAX_MEMBERS`] members that has
//! members (other than its sender) with no connected device, the core reports them
//! ([`ordo_core::Action::Offline`]) and the router hands the event to [`WebhookSender`]
//! without waiting: a full hand-over channel drops the event (and counts it) rather than slow
//! the path of messages. The webhook task then:
//!
//! 1. writes the event to its queue on disk, `<data>/webhooks.redb` (a redb database of its
//!    own, flushed before the event is sent), at most [`MAX_QUEUED`] events and
//!    [`MAX_QUEUED_BYTES`] bytes (past either, new events are dropped and counted);
//! 2. POSTs it as JSON to the configured URL, [`MAX_IN_FLIGHT`] at a time over kept-alive
//!    connections, with `Ordo-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
//!    "<t>.<body>")>` and `Idempotency-Key: <event id>`;
//! 3. deletes it once the endpoint answers 2xx; anything else, or no answer within
//!    [`REQUEST_TIMEOUT`], is tried again after a backoff (1 s, doubling to 5 min), for up to
//!    [`GIVE_UP_AFTER`]; then it is dropped and counted. While the endpoint fails, the whole
//!    queue waits out the same backoff and then tries one event at a time, so that an endpoint
//!    that is down costs one attempt per backoff, not one per event.
//!
//! Events due when the server stops or is killed are sent after it starts again, with the same
//! id: delivery is at least once, and the backend deduplicates by `Idempotency-Key`. An event
//! is written to the queue a moment after its message is committed, not with it: a kill in
//! that moment loses the event (never the message, which the device still receives when it
//! connects).

use crate::metrics as m;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Mutex};
use tokio::task::{JoinHandle, JoinSet};

/// Conversations with more members than this report no offline members.
pub const MAX_MEMBERS: usize = 1000;
/// Most events the queue holds, and most bytes of their bodies.
pub const MAX_QUEUED: usize = 100_000;
pub const MAX_QUEUED_BYTES: usize = 64 << 20;
/// Requests under way at once.
pub const MAX_IN_FLIGHT: usize = 4;
/// How long one request may take, connecting included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an event is tried before it is dropped.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);
const FIRST_RETRY_MS: u64 = 1000;
const MAX_RETRY_MS: u64 = 300_000;
/// Events the router may hand over before the webhook task has taken them, and most bytes of
/// them (user ids and preview).
const HAND_OVER: usize = 10_000;
const HAND_OVER_BYTES: usize = 16 << 20;

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("cannot open the webhook queue {path}: {reason}; if it is damaged, move it aside (its events are lost) and start again")]
    Queue { path: String, reason: String },
}

/// Where events go.
#[derive(Clone, Debug)]
pub struct Endpoint {
    uri: Uri,
    tls: bool,
    host: String,
    port: u16,
}

impl Endpoint {
    /// An `http://` or `https://` URL; the error says what is wrong with it.
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("webhook_url {url:?} is not a URL: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(format!(
                    "webhook_url {url:?} must start with http:// or https://"
                ))
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| format!("webhook_url {url:?} names no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(Endpoint {
            uri,
            tls,
            host,
            port,
        })
    }
}

/// A message some members did not get live, as the router hands it over.
#[derive(Clone, Debug)]
struct Offline {
    conv: String,
    epoch: u64,
    seq: u64,
    from: String,
    ts: u64,
    users: Vec<String>,
    preview: Option<String>,
}

impl Offline {
    /// About what it holds, in bytes (what the hand-over is bounded by).
    fn bytes(&self) -> usize {
        128 + self.conv.len()
            + self.from.len()
            + self.users.iter().map(|u| 24 + u.len()).sum::<usize>()
            + self.preview.as_ref().map_or(0, String::len)
    }
}

/// The JSON an event is POSTed as.
#[derive(Serialize)]
struct EventBody<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    conv: &'a str,
    seq: u64,
    from: &'a str,
    ts: u64,
    users: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    preview: Option<&'a str>,
}

/// An event in the queue.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Queued {
    id: String,
    body: String,
    /// When it was queued, unix ms.
    first_ms: u64,
    attempts: u32,
    /// When to try next, unix ms.
    next_ms: u64,
}

/// The router's end: hands events over without ever waiting.
#[derive(Clone)]
pub struct WebhookSender {
    tx: mpsc::Sender<Offline>,
    preview_bytes: usize,
    /// Bytes handed over and not yet taken by the task.
    in_hand: Arc<AtomicUsize>,
}

impl WebhookSender {
    /// `users`, members of `msg`'s conversation (of epoch `epoch`), have no connected device.
    pub fn offer(&self, msg: &ordo_protocol::Message, epoch: u64, users: Vec<String>) {
        let preview = (self.preview_bytes > 0).then(|| cut(&msg.body, self.preview_bytes));
        let ev = Offline {
            conv: msg.conv.clone(),
            epoch,
            seq: msg.seq,
            from: msg.from.clone(),
            ts: msg.ts,
            users,
            preview: preview.map(str::to_string),
        };
        let bytes = ev.bytes();
        let held = self.in_hand.fetch_add(bytes, Ordering::Relaxed);
        if held + bytes > HAND_OVER_BYTES || self.tx.try_send(ev).is_err() {
            self.in_hand.fetch_sub(bytes, Ordering::Relaxed);
            metrics::counter!(m::WEBHOOK_DROPPED).increment(1);
        }
    }
}

/// Opens the queue in `data` and starts the task that sends it. The task ends once every
/// [`WebhookSender`] is dropped (the router stopped) and what they handed over is on disk;
/// attempts under way then are made again after the next start.
pub fn start(
    endpoint: Endpoint,
    secret: String,
    preview_bytes: usize,
    data: &Path,
) -> Result<(WebhookSender, JoinHandle<()>), WebhookError> {
    let path = data.join("webhooks.redb");
    let fail = |reason: String| WebhookError::Queue {
        path: path.display().to_string(),
        reason,
    };
    let db = Database::create(&path).map_err(|e| fail(e.to_string()))?;
    let queue = Queue::load(db).map_err(fail)?;
    let (tx, rx) = mpsc::channel(HAND_OVER);
    let task = Task {
        queue,
        endpoint,
        secret: Arc::from(secret.as_bytes()),
        pool: Arc::new(Mutex::new(Vec::new())),
        tls: None,
        failing: 0,
        paused_until: 0,
        done: Vec::new(),
        last_flush: 0,
    };
    let in_hand = Arc::new(AtomicUsize::new(0));
    let handle = tokio::spawn(task.run(rx, in_hand.clone()));
    let sender = WebhookSender {
        tx,
        preview_bytes,
        in_hand,
    };
    Ok((sender, handle))
}

/// The queue: on disk, and its index in memory.
struct Queue {
    db: Arc<Database>,
    events: BTreeMap<u64, Queued>,
    /// (next try, key) of every event not being sent right now.
    due: BTreeSet<(u64, u64)>,
    bytes: usize,
    next_key: u64,
}

impl Queue {
    fn load(db: Database) -> Result<Queue, String> {
        let tx = db.begin_write().map_err(|e| e.to_string())?;
        tx.open_table(EVENTS).map_err(|e| e.to_string())?;
        tx.commit().map_err(|e| e.to_string())?;
        let mut q = Queue {
            db: Arc::new(db),
            events: BTreeMap::new(),
            due: BTreeSet::new(),
            bytes: 0,
            next_key: 1,
        };
        let tx = q.db.begin_read().map_err(|e| e.to_string())?;
        let table = tx.open_table(EVENTS).map_err(|e| e.to_string())?;
        for row in table.iter().map_err(|e| e.to_string())? {
            let (k, v) = row.map_err(|e| e.to_string())?;
            let key = k.value();
            let ev: Queued = serde_json::from_slice(v.value())
                .map_err(|e| format!("event {key} is not readable: {e}"))?;
            q.bytes += ev.body.len();
            q.due.insert((ev.next_ms, key));
            q.events.insert(key, ev);
            q.next_key = q.next_key.max(key + 1);
        }
        metrics::gauge!(m::WEBHOOK_QUEUED).set(q.events.len() as f64);
        Ok(q)
    }

    /// Writes these changes in one transaction, flushed: events put, keys deleted.
    async fn write(&self, put: Vec<(u64, Queued)>, delete: Vec<u64>) {
        if put.is_empty() && delete.is_empty() {
            return;
        }
        let db = self.db.clone();
        let done = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let tx = db.begin_write().map_err(|e| e.to_string())?;
            {
                let mut t = tx.open_table(EVENTS).map_err(|e| e.to_string())?;
                for (k, ev) in &put {
                    let bytes = serde_json::to_vec(ev).map_err(|e| e.to_string())?;
                    t.insert(k, bytes.as_slice()).map_err(|e| e.to_string())?;
                }
                for k in &delete {
                    t.remove(k).map_err(|e| e.to_string())?;
                }
            }
            tx.commit().map_err(|e| e.to_string())
        })
        .await;
        match done {
            Ok(Ok(())) => {}
            // The events stay in memory and are still sent; only a restart would lose them.
            Ok(Err(e)) => tracing::error!(error = %e, "cannot write the webhook queue"),
            Err(e) => tracing::error!(error = %e, "cannot write the webhook queue"),
        }
    }
}

struct Task {
    queue: Queue,
    endpoint: Endpoint,
    secret: Arc<[u8]>,
    /// Idle kept-alive connections to the endpoint.
    pool: Arc<Mutex<Vec<SendRequest<Full<Bytes>>>>>,
    tls: Option<tokio_rustls::TlsConnector>,
    /// Attempts that failed in a row, of any event: the endpoint is down or refusing.
    failing: u32,
    /// While the endpoint fails, nothing is sent before this (unix ms): one backoff for the
    /// whole queue, not an attempt per event.
    paused_until: u64,
    /// Events done with (taken, or given up), deleted from disk in batches: a delete lost to a
    /// crash only sends an event again.
    done: Vec<u64>,
    last_flush: u64,
}

/// Deletes are written once this many are waiting, or this long after the last write.
const DELETE_BATCH: usize = 256;
const DELETE_EVERY_MS: u64 = 200;

/// How one attempt ended: the event's key, and whether the endpoint took it (else why not).
type Attempt = (u64, Result<(), String>);

impl Task {
    async fn run(mut self, mut rx: mpsc::Receiver<Offline>, in_hand: Arc<AtomicUsize>) {
        if self.endpoint.tls {
            match crate::tls::client_connector() {
                Ok(c) => self.tls = Some(c),
                Err(e) => {
                    tracing::error!(error = %e, "webhook: no TLS roots; https events will fail")
                }
            }
        }
        let mut in_flight: JoinSet<Attempt> = JoinSet::new();
        loop {
            self.dispatch(&mut in_flight);
            self.flush_done(false).await;
            let now = now_ms();
            let mut wake = self
                .queue
                .due
                .first()
                .map(|(at, _)| {
                    Duration::from_millis((*at).max(self.paused_until).saturating_sub(now))
                })
                .filter(|_| in_flight.len() < MAX_IN_FLIGHT)
                .unwrap_or(Duration::from_secs(3600));
            if !self.done.is_empty() {
                wake = wake.min(Duration::from_millis(DELETE_EVERY_MS));
            }
            tokio::select! {
                got = rx.recv() => {
                    let Some(first) = got else { break };
                    let mut batch = vec![first];
                    while batch.len() < 1000 {
                        match rx.try_recv() {
                            Ok(ev) => batch.push(ev),
                            Err(_) => break,
                        }
                    }
                    let taken = batch.iter().map(Offline::bytes).sum();
                    in_hand.fetch_sub(taken, Ordering::Relaxed);
                    self.enqueue(batch).await;
                }
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Ok(attempt) = done {
                        self.finished(attempt).await;
                    }
                }
                _ = tokio::time::sleep(wake) => {}
            }
        }
        self.flush_done(true).await;
    }

    /// Deletes the events done with from disk, when enough wait or enough time passed (or
    /// `now`).
    async fn flush_done(&mut self, now: bool) {
        let t = now_ms();
        let due = self.done.len() >= DELETE_BATCH || t >= self.last_flush + DELETE_EVERY_MS;
        if self.done.is_empty() || !(now || due) {
            return;
        }
        self.last_flush = t;
        let keys = std::mem::take(&mut self.done);
        self.queue.write(Vec::new(), keys).await;
    }

    /// Queues handed-over events (on disk first), dropping those past the bounds.
    async fn enqueue(&mut self, batch: Vec<Offline>) {
        let now = now_ms();
        let mut put = Vec::with_capacity(batch.len());
        for ev in batch {
            let id = format!("{}/{}/{}", ev.conv, ev.epoch, ev.seq);
            let body = serde_json::to_string(&EventBody {
                id: &id,
                kind: "message",
                conv: &ev.conv,
                seq: ev.seq,
                from: &ev.from,
                ts: ev.ts,
                users: &ev.users,
                preview: ev.preview.as_deref(),
            })
            .unwrap_or_default();
            if self.queue.events.len() + put.len() >= MAX_QUEUED
                || self.queue.bytes + body.len() > MAX_QUEUED_BYTES
            {
                metrics::counter!(m::WEBHOOK_DROPPED).increment(1);
                tracing::warn!(%id, "webhook queue full; event dropped");
                continue;
            }
            let key = self.queue.next_key;
            self.queue.next_key += 1;
            self.queue.bytes += body.len();
            put.push((
                key,
                Queued {
                    id,
                    body,
                    first_ms: now,
                    attempts: 0,
                    next_ms: now,
                },
            ));
        }
        self.queue.write(put.clone(), Vec::new()).await;
        for (key, ev) in put {
            self.queue.due.insert((ev.next_ms, key));
            self.queue.events.insert(key, ev);
        }
        metrics::gauge!(m::WEBHOOK_QUEUED).set(self.queue.events.len() as f64);
    }

    /// Starts attempts for due events while there is room.
    fn dispatch(&mut self, in_flight: &mut JoinSet<Attempt>) {
        let now = now_ms();
        if now < self.paused_until {
            return;
        }
        // After a failure, one attempt at a time until one succeeds.
        let room = if self.failing > 0 { 1 } else { MAX_IN_FLIGHT };
        while in_flight.len() < room {
            let Some(&(at, key)) = self.queue.due.first() else {
                return;
            };
            if at > now {
                return;
            }
            self.queue.due.remove(&(at, key));
            let Some(ev) = self.queue.events.get(&key) else {
                continue;
            };
            let (id, body) = (ev.id.clone(), ev.body.clone());
            let (endpoint, secret, pool, tls) = (
                self.endpoint.clone(),
                self.secret.clone(),
                self.pool.clone(),
                self.tls.clone(),
            );
            in_flight.spawn(async move {
                let sent = tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    post(&endpoint, &secret, &pool, tls.as_ref(), &id, body),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()))
                });
                (key, sent)
            });
        }
    }

    /// An attempt ended: the event leaves the queue, or waits for its next try.
    async fn finished(&mut self, (key, sent): Attempt) {
        let Some(ev) = self.queue.events.get_mut(&key) else {
            return;
        };
        let now = now_ms();
        match sent {
            Ok(()) => {
                metrics::counter!(m::WEBHOOK_SENT).increment(1);
                if self.failing > 0 {
                    tracing::info!(failed = self.failing, "webhook endpoint takes events again");
                }
                self.failing = 0;
                self.paused_until = 0;
                self.forget(key);
            }
            Err(why) => {
                metrics::counter!(m::WEBHOOK_FAILED).increment(1);
                ev.attempts += 1;
                let backoff = |n: u32| {
                    FIRST_RETRY_MS
                        .saturating_mul(1 << (n.clamp(1, 17) - 1))
                        .min(MAX_RETRY_MS)
                };
                let wait = backoff(ev.attempts);
                self.failing += 1;
                self.paused_until = now + backoff(self.failing);
                if self.failing == 1 {
                    tracing::warn!(id = %ev.id, reason = %why, "webhook endpoint does not take events; backing off");
                }
                let give_up = ev.first_ms + GIVE_UP_AFTER.as_millis() as u64;
                if now + wait > give_up {
                    tracing::warn!(id = %ev.id, attempts = ev.attempts, reason = %why, "webhook event given up");
                    metrics::counter!(m::WEBHOOK_DROPPED).increment(1);
                    self.forget(key);
                    return;
                }
                // In memory only: after a restart every queued event is due at once anyway.
                ev.next_ms = now + wait;
                self.queue.due.insert((ev.next_ms, key));
            }
        }
    }

    /// An event done with: out of the queue now, off the disk with the next batch of deletes.
    fn forget(&mut self, key: u64) {
        if let Some(ev) = self.queue.events.remove(&key) {
            self.queue.bytes -= ev.body.len();
        }
        self.done.push(key);
        metrics::gauge!(m::WEBHOOK_QUEUED).set(self.queue.events.len() as f64);
    }
}

/// One POST of an event; `Ok` if the endpoint answered 2xx.
async fn post(
    endpoint: &Endpoint,
    secret: &[u8],
    pool: &Mutex<Vec<SendRequest<Full<Bytes>>>>,
    tls: Option<&tokio_rustls::TlsConnector>,
    id: &str,
    body: String,
) -> Result<(), String> {
    let t = now_ms() / 1000;
    let signature = sign(secret, t, &body);
    let idle = pool.lock().await.pop();
    let mut conn = match idle {
        Some(c) if !c.is_closed() => c,
        _ => connect(endpoint, tls).await?,
    };
    let path = endpoint
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let authority = endpoint
        .uri
        .authority()
        .map_or(endpoint.host.clone(), |a| a.to_string());
    let req = Request::post(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, "ordo-webhook/1")
        .header("Ordo-Signature", format!("t={t},v1={signature}"))
        .header("Idempotency-Key", id)
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    conn.ready().await.map_err(|e| e.to_string())?;
    let resp = conn.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    // The answer's body is read (and dropped) so that the connection can be used again; one
    // too long to read is left, with its connection.
    use http_body_util::BodyExt;
    let read = http_body_util::Limited::new(resp.into_body(), 64 << 10)
        .collect()
        .await;
    if read.is_ok() {
        pool.lock().await.push(conn);
    }
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the endpoint answered {status}"))
    }
}

async fn connect(
    endpoint: &Endpoint,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Result<SendRequest<Full<Bytes>>, String> {
    let tcp = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", endpoint.uri))?;
    let _ = tcp.set_nodelay(true);
    if endpoint.tls {
        let connector = tls.ok_or("no TLS roots to check the endpoint's certificate with")?;
        let name = rustls::pki_types::ServerName::try_from(endpoint.host.clone())
            .map_err(|e| format!("{}: {e}", endpoint.host))?;
        let stream = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {}: {e}", endpoint.uri))?;
        handshake(TokioIo::new(stream)).await
    } else {
        handshake(TokioIo::new(tcp)).await
    }
}

async fn handshake<I>(io: I) -> Result<SendRequest<Full<Bytes>>, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// `hex(HMAC-SHA256(secret, "<t>.<body>"))`.
pub fn sign(secret: &[u8], t: u64, body: &str) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn now_ms() -> u64 {
    crate::router::now_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_signatures() {
        assert!(Endpoint::parse("ftp://x").is_err());
        assert!(Endpoint::parse("not a url").is_err());
        let e = Endpoint::parse("https://push.example.com/hooks/ordo?x=1").unwrap();
        assert_eq!(
            (e.tls, e.host.as_str(), e.port),
            (true, "push.example.com", 443)
        );
        let e = Endpoint::parse("http://[::1]:8080/").unwrap();
        assert_eq!((e.tls, e.host.as_str(), e.port), (false, "::1", 8080));
        // Computed apart: Python's hmac.new(b"whsec_test", b'1764072000.{"id":"team/7/45"}',
        // hashlib.sha256).hexdigest().
        assert_eq!(
            sign(b"whsec_test", 1764072000, r#"{"id":"team/7/45"}"#),
            "721e3359ba42d3824d7449a0f77c7d6522817030bcc951f3575805fee528d540"
        );
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(cut("héllo", 3), "hé");
        assert_eq!(cut("hi", 10), "hi");
    }
}
