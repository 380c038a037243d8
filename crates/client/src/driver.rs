//! The tokio driver: one task that owns the [`ClientState`], the WebSocket and the local store,
//! and carries out the state's effects in order (store, then send, then tell the app).
//!
//! The app talks to it through [`Client`]: `send` returns once the message is in the outbox on
//! disk; `next_event` yields messages, status changes, receipts, gaps and connection changes.
//! The connection comes back by itself with backoff; a client reopened on the same store
//! carries on where it stopped.
//!
//! # Connection trouble
//!
//! Every failed connection attempt comes out as [`Event::ConnectFailed`], and every lost
//! connection as [`Event::Disconnected`]; with each, [`Client::connection`] says why, typed
//! ([`ConnectError`]), and when the next attempt is ([`Connection::Retrying`]). The faults that
//! can pass (the server is down or restarting, the network is out, a 429 or a 503, a timeout,
//! a dropped connection) are retried for ever with backoff and jitter
//! ([`RetryPolicy::reconnect`]); pending messages are then resent with the same client message
//! ids. The faults that trying again cannot mend ([`ConnectError::is_permanent`]) stop the
//! client instead, so that an app or a script says so at once rather than retrying in silence:
//!
//! - a server URL that cannot work is refused by [`Client::open`] before anything else
//!   ([`ClientError::Connect`]): not `ws://` or `wss://`, no scheme at all, or a URL that ends
//!   with the WebSocket endpoint's path `/v1/ws` (the driver appends it to the URL itself:
//!   give `ws://host:port`, or `ws://host:port/prefix` behind a proxy that serves Ordo under
//!   a prefix; see [`endpoint`]);
//! - a token refused by the server (HTTP 401, [`ConnectError::Unauthorized`] with the server's
//!   message), any other 4xx answer to the upgrade but 408, 425 and 429, and a TLS certificate
//!   that does not verify ([`ConnectError::Certificate`]): the driver reports the error as
//!   [`Connection::Stopped`] with a last [`Event::ConnectFailed`] and stops; `next_event` then
//!   returns `None`, and `send` fails with [`ClientError::Connect`]. Messages still pending stay
//!   in the outbox on disk, for a client opened again on the same store (with a new token, say).
//!
//! A token that expires while connected has its connection closed by the server (close code
//! 4001): that is a drop like any other, and the reconnection that follows gets the 401.

use crate::backoff::RetryPolicy;
use crate::outbox::Target;
use crate::state::{ClientConfig, ClientState, Effect, Event};
use crate::store::{LocalStore, LocalStoreError};
use futures_util::{SinkExt, StreamExt};
use ordo_protocol::{decode_server, encode, Encoded, Encoding, Message};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message as WsMessage;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The path of the server's WebSocket endpoint, appended by the driver to
/// [`ClientOptions::url`].
pub const WS_PATH: &str = "/v1/ws";

/// How to reach the server and where to keep local state.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// WebSocket base URL, e.g. `ws://127.0.0.1:7400` or `wss://chat.example.com`; the driver
    /// appends [`WS_PATH`] (so not `ws://127.0.0.1:7400/v1/ws`). Several, separated by commas
    /// (the nodes of a cluster): the driver starts with the first and moves to the next, in
    /// turn, each time a connection attempt fails or a connection is lost.
    pub url: String,
    /// A PEM file of certificates to trust for `wss://` beside the system's roots (a private
    /// CA).
    pub ca: Option<PathBuf>,
    pub token: String,
    /// The local store file (created if missing). One client process per file.
    pub store: PathBuf,
    pub config: ClientConfig,
    /// Backoff between reconnection attempts.
    pub reconnect: RetryPolicy,
    /// Give up a connection attempt after this long.
    pub connect_timeout: Duration,
}

impl ClientOptions {
    pub fn new(
        url: impl Into<String>,
        token: impl Into<String>,
        store: impl Into<PathBuf>,
    ) -> Self {
        ClientOptions {
            url: url.into(),
            ca: None,
            token: token.into(),
            store: store.into(),
            config: ClientConfig::default(),
            reconnect: RetryPolicy::reconnect(),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Store(#[from] LocalStoreError),
    #[error("the client is closed")]
    Closed,
    #[error("invalid token for the Authorization header")]
    BadToken,
    #[error("TLS: {0}")]
    Tls(String),
    /// A connection error that trying again cannot mend: from [`Client::open`] for a server
    /// URL that cannot work, and from the calls made after the driver stopped for one (a token
    /// refused, a certificate that does not verify).
    #[error(transparent)]
    Connect(ConnectError),
}

/// Why the client is not connected: a connection attempt that failed, or a connection lost.
///
/// [`is_permanent`](Self::is_permanent) says whether trying again can help; the driver retries
/// the others by itself. The `Display` form is a sentence for a person (it names the URL and
/// says what to do where it can).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The URL's scheme is not `ws` or `wss` (`http://...`, say); `suggestion` is the URL to
    /// use instead.
    #[error("{url} is not a WebSocket URL; use {suggestion}")]
    NotWebSocket { url: String, suggestion: String },
    /// The URL has no `scheme://`.
    #[error("{url} has no scheme; use {suggestion} (or wss:// for a server with TLS)")]
    MissingScheme { url: String, suggestion: String },
    /// The URL ends with [`WS_PATH`], which the driver appends itself.
    #[error("{url} ends with {WS_PATH}, which the client appends itself; use {suggestion}")]
    EndpointInUrl { url: String, suggestion: String },
    /// Another URL that cannot work (no host, a query, unparsable).
    #[error("bad server URL {url}: {reason}")]
    BadUrl { url: String, reason: String },
    /// The server refused the token (HTTP 401); `message` is the server's own explanation
    /// (malformed, wrongly signed, expired, revoked). Only a new token helps.
    #[error("{url} refused the token (HTTP 401): {message}")]
    Unauthorized { url: String, message: String },
    /// The server's TLS certificate does not verify (unknown issuer, wrong name, expired).
    #[error("the TLS certificate of {url} does not verify: {reason} (a private CA is trusted with ClientOptions::ca, --ca FILE)")]
    Certificate { url: String, reason: String },
    /// The server answered the upgrade with another HTTP error; `message` is the server's,
    /// from its JSON error body when it has one. Permanent for a 4xx but 408, 425 and 429.
    #[error("{url} refused the connection (HTTP {status}): {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    /// No connection: refused, unreachable, a name that does not resolve, reset.
    #[error("cannot connect to {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// No answer within [`ClientOptions::connect_timeout`].
    #[error("no answer from {url} within {} s", .after.as_secs_f32())]
    Timeout { url: String, after: Duration },
    /// The TLS handshake failed for a reason other than the certificate.
    #[error("TLS handshake with {url} failed: {reason}")]
    Tls { url: String, reason: String },
    /// An established connection ended (the server closed it, or the network did).
    #[error("lost the connection to {url}: {reason}")]
    Lost { url: String, reason: String },
}

impl ConnectError {
    /// Whether trying again with the same options cannot help: the driver stops on these.
    pub fn is_permanent(&self) -> bool {
        match self {
            ConnectError::NotWebSocket { .. }
            | ConnectError::MissingScheme { .. }
            | ConnectError::EndpointInUrl { .. }
            | ConnectError::BadUrl { .. }
            | ConnectError::Unauthorized { .. }
            | ConnectError::Certificate { .. } => true,
            ConnectError::Refused { status, .. } => permanent_status(*status),
            ConnectError::Unreachable { .. }
            | ConnectError::Timeout { .. }
            | ConnectError::Tls { .. }
            | ConnectError::Lost { .. } => false,
        }
    }

    /// Whether the server refused the token (only a new token helps).
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, ConnectError::Unauthorized { .. })
    }

    /// Whether the server URL itself is wrong (found before connecting).
    pub fn is_bad_url(&self) -> bool {
        matches!(
            self,
            ConnectError::NotWebSocket { .. }
                | ConnectError::MissingScheme { .. }
                | ConnectError::EndpointInUrl { .. }
                | ConnectError::BadUrl { .. }
        )
    }

    /// The HTTP status the server answered the upgrade with, if it did.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            ConnectError::Unauthorized { .. } => Some(401),
            ConnectError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// An HTTP error answer to the upgrade that will be the same next time: a 4xx, but for 408
/// (request timeout), 425 (too early) and 429 (too many connections, for now).
fn permanent_status(status: u16) -> bool {
    (400..500).contains(&status) && !matches!(status, 408 | 425 | 429)
}

/// Where the driver stands with the server, as of the last event taken ([`Client::connection`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Connection {
    /// The first attempt is under way.
    Connecting,
    /// Connected (the server's `welcome` may still be on its way).
    Connected,
    /// Not connected because of `cause` (a transient fault); the next attempt comes
    /// `retry_in` after the failure. `failures`: attempts failed in a row, the drop of an
    /// established connection counted as one.
    Retrying {
        cause: ConnectError,
        failures: u32,
        retry_in: Duration,
    },
    /// The driver stopped on a permanent error; only new options (a new token, another URL, a
    /// trusted CA) and a new [`Client::open`] help.
    Stopped(ConnectError),
}

/// The WebSocket endpoint for the server base URL `url` (`<url>/v1/ws`), or why `url` cannot
/// work: it must be `ws://` or `wss://`, with a host, and without the endpoint's path, a query
/// or a fragment (a path prefix, for a proxy that serves Ordo under one, is fine).
pub fn endpoint(url: &str) -> Result<String, ConnectError> {
    let raw = url.trim();
    let bad = |reason: &str| ConnectError::BadUrl {
        url: raw.to_string(),
        reason: reason.to_string(),
    };
    if raw.is_empty() {
        return Err(bad("it is empty; use ws://host:port"));
    }
    // What follows the scheme, less a trailing endpoint path: the base a suggestion is made of.
    let base = |rest: &str| -> String {
        let mut r = rest.trim_end_matches('/');
        while let Some(s) = r.strip_suffix(WS_PATH) {
            r = s.trim_end_matches('/');
        }
        r.to_string()
    };
    let Some((scheme, rest)) = raw.split_once("://") else {
        return Err(ConnectError::MissingScheme {
            url: raw.to_string(),
            suggestion: format!("ws://{}", base(raw)),
        });
    };
    let scheme = scheme.to_ascii_lowercase();
    match scheme.as_str() {
        "ws" | "wss" => {}
        other => {
            let to = if other == "https" { "wss" } else { "ws" };
            return Err(ConnectError::NotWebSocket {
                url: raw.to_string(),
                suggestion: format!("{to}://{}", base(rest)),
            });
        }
    }
    if rest.contains(['?', '#']) {
        return Err(bad(
            "a query or a fragment has no place in it; give only ws[s]://host:port",
        ));
    }
    if rest.trim_end_matches('/').ends_with(WS_PATH) {
        return Err(ConnectError::EndpointInUrl {
            url: raw.to_string(),
            suggestion: format!("{scheme}://{}", base(rest)),
        });
    }
    let authority = rest.split('/').next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("");
    let (host, port) = match host_port.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((h, p)) => (h, p),
            None => return Err(bad("its IPv6 address lacks the closing ]")),
        },
        None => match host_port.split_once(':') {
            Some((h, _)) => (h, &host_port[h.len()..]),
            None => (host_port, ""),
        },
    };
    if host.is_empty() {
        return Err(bad("it names no host"));
    }
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .and_then(|p| p.parse::<u16>().ok())
            .is_some_and(|p| p > 0);
    if !port_ok {
        return Err(bad("its port must be a number from 1 to 65535"));
    }
    let ep = format!("{scheme}://{}{WS_PATH}", rest.trim_end_matches('/'));
    ep.as_str()
        .into_client_request()
        .map_err(|e| bad(&describe_ws_error(&e)))?;
    Ok(ep)
}

enum Cmd {
    Send {
        target: Target,
        body: String,
        reply_to: Option<u64>,
        reply: oneshot::Sender<Result<String, ClientError>>,
    },
    MarkRead {
        conv: String,
        seq: u64,
    },
    Close {
        done: oneshot::Sender<()>,
    },
}

/// What the driver hands to [`Client`]: the app's events, and the connection's state just
/// before the connection event it goes with.
enum Out {
    Event(Event),
    Connection(Connection),
}

/// A connected (or reconnecting) client. Dropping it stops the driver.
pub struct Client {
    cmds: mpsc::UnboundedSender<Cmd>,
    events: mpsc::UnboundedReceiver<Out>,
    store: Arc<LocalStore>,
    /// The last message handed out, recorded as done when the app asks for the next event.
    taken: Option<(String, u64)>,
    /// The connection's state as of the last event taken.
    connection: Connection,
    /// Set by the driver when it stops on a permanent error.
    stopped: Arc<OnceLock<ConnectError>>,
    driver: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Opens the local store and starts the driver, which connects in the background.
    /// Messages stored earlier but never taken by the app come out of [`Self::next_event`] first.
    ///
    /// Fails at once, before touching the store, on a server URL that cannot work
    /// ([`ClientError::Connect`], see [`endpoint`]), a token that cannot go in a header
    /// ([`ClientError::BadToken`]) or unreadable TLS settings ([`ClientError::Tls`]).
    pub async fn open(opts: ClientOptions) -> Result<Client, ClientError> {
        let servers = opts
            .url
            .split(',')
            .map(|u| {
                let e = endpoint(u).map_err(ClientError::Connect)?;
                Ok((e, u.trim().trim_end_matches('/').to_string()))
            })
            .collect::<Result<Vec<_>, ClientError>>()?;
        let (endpoint, url) = servers[0].clone();
        let auth = HeaderValue::from_str(&format!("Bearer {}", opts.token.trim()))
            .map_err(|_| ClientError::BadToken)?;
        let tls = if servers.iter().any(|(e, _)| e.starts_with("wss://")) {
            Some(crate::tls::client_config(opts.ca.as_deref()).map_err(ClientError::Tls)?)
        } else {
            None
        };
        let path = opts.store.clone();
        let store = tokio::task::spawn_blocking(move || LocalStore::open(&path))
            .await
            .map_err(|_| ClientError::Closed)??;
        let store = Arc::new(store);
        let snapshot = store.snapshot()?;
        let unhanded = store.unhanded()?;
        let device = device_of(&opts.token);
        let state = ClientState::new(opts.config.clone(), &device, rand::random(), snapshot);
        let (cmds, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, events) = mpsc::unbounded_channel();
        for m in unhanded {
            let _ = ev_tx.send(Out::Event(Event::Message(m)));
        }
        let stopped = Arc::new(OnceLock::new());
        let driver = Driver {
            state,
            store: store.clone(),
            tls,
            endpoint,
            url,
            servers,
            current: 0,
            auth,
            opts,
            events: ev_tx,
            ws: None,
            start: Instant::now(),
            attempt: 0,
            reconnect_at: None,
            closed_by_server: None,
            stopped: stopped.clone(),
        };
        let driver = tokio::spawn(driver.run(cmd_rx));
        Ok(Client {
            cmds,
            events,
            store,
            taken: None,
            connection: Connection::Connecting,
            stopped,
            driver,
        })
    }

    /// The error for a call the driver can no longer take: why it stopped, if it stopped on a
    /// permanent connection error.
    fn gone(&self) -> ClientError {
        match self.stopped.get() {
            Some(e) => ClientError::Connect(e.clone()),
            None => ClientError::Closed,
        }
    }

    /// Queues a message and returns its client message id once it is in the outbox on disk.
    /// Its status (Pending, Sent, Delivered, Read or Failed) arrives as events.
    pub async fn send(
        &self,
        target: Target,
        body: impl Into<String>,
    ) -> Result<String, ClientError> {
        self.send_reply(target, body, None).await
    }

    /// Like [`send`](Self::send), as a reply to message `reply_to` of the same conversation.
    pub async fn send_reply(
        &self,
        target: Target,
        body: impl Into<String>,
        reply_to: Option<u64>,
    ) -> Result<String, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Send {
                target,
                body: body.into(),
                reply_to,
                reply,
            })
            .map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())?
    }

    /// The user has seen `conv` up to `seq`.
    pub fn mark_read(&self, conv: &str, seq: u64) -> Result<(), ClientError> {
        self.cmds
            .send(Cmd::MarkRead {
                conv: conv.to_string(),
                seq,
            })
            .map_err(|_| self.gone())
    }

    /// The next event; `None` once the client is closed, or stopped on a permanent connection
    /// error ([`Self::stopped`] says which).
    ///
    /// Messages come per conversation in seq order, each once. Asking for the next event
    /// records, on disk, that the app is done with the message returned before, so a client
    /// reopened on the same store hands out exactly the messages the app had not finished
    /// (only a crash between finishing one and asking for the next can repeat that one).
    pub async fn next_event(&mut self) -> Option<Event> {
        self.commit_taken();
        loop {
            match self.events.recv().await? {
                Out::Connection(c) => self.connection = c,
                Out::Event(e) => {
                    if let Event::Message(m) = &e {
                        self.taken = Some((m.conv.clone(), m.seq));
                    }
                    return Some(e);
                }
            }
        }
    }

    /// The connection's state as of the last event [`next_event`](Self::next_event) returned:
    /// after an [`Event::ConnectFailed`] or an [`Event::Disconnected`] it holds the typed cause
    /// and when the next attempt is ([`Connection::Retrying`]), or that the driver stopped
    /// ([`Connection::Stopped`]).
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// The permanent error the driver stopped on, if it did; known as soon as it happens,
    /// ahead of the events.
    pub fn stopped(&self) -> Option<&ConnectError> {
        self.stopped.get()
    }

    fn commit_taken(&mut self) {
        if let Some((conv, seq)) = self.taken.take() {
            if let Err(err) = self.store.set_handed(&conv, seq) {
                tracing::error!(error = %err, "cannot record a handed message");
            }
        }
    }

    /// Client message ids still in the outbox (queued, not yet accepted), oldest first.
    pub fn pending(&self) -> Result<Vec<String>, ClientError> {
        Ok(self
            .store
            .snapshot()?
            .outbox
            .into_iter()
            .map(|p| p.cmid)
            .collect())
    }

    /// Messages of `conv` stored locally with seq > `after`, at most `limit`.
    pub fn history(
        &self,
        conv: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Message>, ClientError> {
        Ok(self.store.history(conv, after, limit)?)
    }

    /// Stops the driver at once, mid-flight, the way a crash of the app would: no close frame,
    /// nothing flushed beyond what the store already holds. The app is taken to have finished
    /// with the last message it took. For fault-injection tools such as `ordo check`.
    pub fn crash(mut self) {
        self.commit_taken();
        self.driver.abort();
    }

    /// Stops the driver (pending messages stay in the outbox for the next open) and records
    /// that the app is done with the last message it took.
    pub async fn close(mut self) {
        self.commit_taken();
        let (done, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Close { done }).is_ok() {
            let _ = rx.await;
        }
    }
}

/// The (user, device) a token names, read from its claims without checking the signature:
/// only the server can, and does. Two shapes: Ordo's own `<payload>.<sig>` (the payload
/// base64url JSON with `u` and `d`) and a JWT `<header>.<claims>.<sig>` (the claims base64url
/// JSON with `sub` and `device`). `None` for a token of another shape.
pub fn token_identity(token: &str) -> Option<(String, String)> {
    use base64::Engine;
    let parts: Vec<&str> = token.trim().split('.').collect();
    let (payload, user, device) = match parts.as_slice() {
        [payload, _sig] => (*payload, "u", "d"),
        [_header, claims, _sig] => (*claims, "sub", "device"),
        _ => return None,
    };
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&json).ok()?;
    Some((
        v[user].as_str()?.to_string(),
        v[device].as_str()?.to_string(),
    ))
}

/// The device id used to prefix client message ids.
fn device_of(token: &str) -> String {
    token_identity(token)
        .map(|(_, d)| d)
        .filter(|d| ordo_protocol::validate_id(ordo_protocol::IdKind::Device, d).is_ok())
        .unwrap_or_else(|| "client".to_string())
}

struct Driver {
    state: ClientState,
    store: Arc<LocalStore>,
    /// TLS settings, for a `wss://` server.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// `<url>/v1/ws`, checked by [`endpoint`].
    endpoint: String,
    /// The server URL as the app gave it, for messages.
    url: String,
    /// Every server given, (endpoint, URL), and which of them is in use: `endpoint` and
    /// `url` are its.
    servers: Vec<(String, String)>,
    current: usize,
    /// The `Authorization` header.
    auth: HeaderValue,
    opts: ClientOptions,
    events: mpsc::UnboundedSender<Out>,
    ws: Option<Ws>,
    start: Instant,
    /// Connection attempts failed in a row (a drop counts as one).
    attempt: u32,
    /// When to try to connect next (ms on the driver's clock); `None` while connected.
    reconnect_at: Option<u64>,
    /// The close frame the server sent on the current connection, if any: the reason it ends.
    closed_by_server: Option<String>,
    stopped: Arc<OnceLock<ConnectError>>,
}

impl Driver {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    fn emit(&self, e: Event) {
        let _ = self.events.send(Out::Event(e));
    }

    fn report(&self, c: Connection) {
        let _ = self.events.send(Out::Connection(c));
    }

    /// Counts a failure and schedules the next attempt with backoff and jitter; the delay.
    fn schedule_reconnect(&mut self) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        // The next server, in turn (the same one if only one was given).
        self.current = (self.current + 1) % self.servers.len();
        (self.endpoint, self.url) = self.servers[self.current].clone();
        let delay = self.opts.reconnect.delay_ms(self.attempt, rand::random());
        self.reconnect_at = Some(self.now() + delay);
        Duration::from_millis(delay)
    }

    /// The connection is gone (a failed read or write, or the server closed it): say why, and
    /// schedule the next attempt.
    fn lost(&mut self, reason: String) {
        if self.ws.take().is_none() {
            return;
        }
        let reason = self.closed_by_server.take().unwrap_or(reason);
        let cause = ConnectError::Lost {
            url: self.url.clone(),
            reason,
        };
        let retry_in = self.schedule_reconnect();
        tracing::debug!(error = %cause, ?retry_in, "connection lost");
        self.report(Connection::Retrying {
            cause,
            failures: self.attempt,
            retry_in,
        });
        self.state.disconnected();
    }

    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        self.reconnect_at = Some(self.now());
        loop {
            // However the connection was lost, the next attempt is always scheduled.
            if self.ws.is_none() && self.reconnect_at.is_none() {
                self.schedule_reconnect();
            }
            if self.ws.is_none() && self.reconnect_at.is_some_and(|t| t <= self.now()) {
                match self.connect().await {
                    Ok(ws) => {
                        self.attempt = 0;
                        self.reconnect_at = None;
                        self.closed_by_server = None;
                        self.ws = Some(ws);
                        self.report(Connection::Connected);
                        let now = self.now();
                        self.state.connected(now);
                    }
                    Err(cause) if cause.is_permanent() => {
                        tracing::warn!(error = %cause, "cannot connect; stopping the client");
                        let _ = self.carry_out().await;
                        let _ = self.stopped.set(cause.clone());
                        self.report(Connection::Stopped(cause.clone()));
                        self.emit(Event::ConnectFailed {
                            reason: cause.to_string(),
                            unauthorized: cause.is_unauthorized(),
                        });
                        return;
                    }
                    Err(cause) => {
                        let retry_in = self.schedule_reconnect();
                        tracing::debug!(error = %cause, ?retry_in, "connect failed");
                        let reason = cause.to_string();
                        self.report(Connection::Retrying {
                            cause,
                            failures: self.attempt,
                            retry_in,
                        });
                        self.emit(Event::ConnectFailed {
                            reason,
                            unauthorized: false,
                        });
                    }
                }
                if !self.carry_out().await {
                    return;
                }
                continue;
            }
            let deadline = self.state.next_deadline();
            let wake = match (deadline, self.reconnect_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let sleep_until = self.at(wake.unwrap_or(u64::MAX / 4));
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    None => return,
                    Some(Cmd::Close { done }) => {
                        if let Some(mut ws) = self.ws.take() {
                            let _ = ws.close(None).await;
                        }
                        let _ = done.send(());
                        return;
                    }
                    Some(Cmd::Send { target, body, reply_to, reply }) => {
                        let now = self.now();
                        let cmid = self.state.send(target, body, reply_to, now);
                        // The first effect is the outbox write: carry it out before answering. If
                        // it fails the driver stops: the message must not go out unrecorded.
                        match self.persist_next() {
                            Ok(()) => { let _ = reply.send(Ok(cmid)); }
                            Err(e) => {
                                tracing::error!(error = %e, "client store failed; stopping the client");
                                let _ = reply.send(Err(e));
                                return;
                            }
                        }
                    }
                    Some(Cmd::MarkRead { conv, seq }) => self.state.mark_read(&conv, seq),
                },
                msg = next_ws(&mut self.ws) => {
                    let now = self.now();
                    match msg {
                        Some(Ok(WsMessage::Text(t))) => match decode_server(t.as_bytes(), Encoding::Json) {
                            Ok(f) => self.state.frame(f, now),
                            Err(e) => tracing::warn!(error = %e, "undecodable frame from the server"),
                        },
                        Some(Ok(WsMessage::Binary(b))) => match decode_server(&b, Encoding::MsgPack) {
                            Ok(f) => self.state.frame(f, now),
                            Err(e) => tracing::warn!(error = %e, "undecodable frame from the server"),
                        },
                        Some(Ok(WsMessage::Close(frame))) => {
                            // The library answers the close; the stream ends next.
                            self.closed_by_server = Some(match frame {
                                Some(f) if f.reason.is_empty() => {
                                    format!("the server closed it (code {})", u16::from(f.code))
                                }
                                Some(f) => format!(
                                    "the server closed it (code {}: {})",
                                    u16::from(f.code),
                                    f.reason
                                ),
                                None => "the server closed it".to_string(),
                            });
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => self.lost(describe_ws_error(&e)),
                        None => self.lost("the connection ended".to_string()),
                    }
                }
                _ = tokio::time::sleep_until(sleep_until), if wake.is_some() => {
                    let now = self.now();
                    self.state.tick(now);
                }
            }
            if !self.carry_out().await {
                return;
            }
        }
    }

    /// One connection attempt; the error says why, typed.
    async fn connect(&self) -> Result<Ws, ConnectError> {
        let mut req =
            self.endpoint
                .as_str()
                .into_client_request()
                .map_err(|e| ConnectError::BadUrl {
                    url: self.url.clone(),
                    reason: describe_ws_error(&e),
                })?;
        req.headers_mut().insert("authorization", self.auth.clone());
        let connector = self
            .tls
            .clone()
            .filter(|_| self.endpoint.starts_with("wss://"))
            .map(tokio_tungstenite::Connector::Rustls);
        let fut = tokio_tungstenite::connect_async_tls_with_config(
            req,
            Some(ws_config()),
            true,
            connector,
        );
        match tokio::time::timeout(self.opts.connect_timeout, fut).await {
            Err(_) => Err(ConnectError::Timeout {
                url: self.url.clone(),
                after: self.opts.connect_timeout,
            }),
            Ok(Err(e)) => Err(classify(&self.url, e)),
            Ok(Ok((ws, _))) => Ok(ws),
        }
    }

    /// Carries out the first effect, which must be a `Persist` (used by `send`).
    fn persist_next(&mut self) -> Result<(), ClientError> {
        if let Some(Effect::Persist(ops)) = self.state.poll_effect() {
            self.store.apply(&ops)?;
        }
        Ok(())
    }

    /// Carries out every queued effect in order. A store failure stops the driver (false):
    /// going on would acknowledge messages that are not stored.
    async fn carry_out(&mut self) -> bool {
        while let Some(effect) = self.state.poll_effect() {
            match effect {
                Effect::Persist(ops) => {
                    if let Err(e) = self.store.apply(&ops) {
                        tracing::error!(error = %e, "client store failed; stopping the client");
                        return false;
                    }
                }
                Effect::Transmit(frame) => {
                    let Some(ws) = self.ws.as_mut() else { continue };
                    let msg = match encode(&frame, Encoding::Json) {
                        Encoded::Text(s) => WsMessage::Text(s.into()),
                        Encoded::Binary(b) => WsMessage::Binary(b.into()),
                    };
                    if let Err(e) = ws.send(msg).await {
                        self.lost(describe_ws_error(&e));
                    }
                }
                Effect::Event(e) => self.emit(e),
            }
        }
        true
    }
}

/// What a failed connection attempt means, for the server at `url`.
fn classify(url: &str, e: tungstenite::Error) -> ConnectError {
    use tungstenite::error::TlsError;
    let url = url.to_string();
    match e {
        tungstenite::Error::Http(resp) => {
            let status = resp.status().as_u16();
            let body = resp.body().as_deref().unwrap_or_default();
            let message = error_message(body)
                .or_else(|| resp.status().canonical_reason().map(str::to_string))
                .unwrap_or_else(|| "no reason given".to_string());
            if status == 401 {
                ConnectError::Unauthorized { url, message }
            } else {
                ConnectError::Refused {
                    url,
                    status,
                    message,
                }
            }
        }
        tungstenite::Error::Io(io) => {
            if let Some(tls) = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            {
                return tls_error(url, tls);
            }
            ConnectError::Unreachable {
                url,
                reason: describe_io(&io),
            }
        }
        tungstenite::Error::Tls(TlsError::Rustls(tls)) => tls_error(url, &tls),
        tungstenite::Error::Tls(TlsError::InvalidDnsName) => ConnectError::BadUrl {
            url,
            reason: "its host is not a valid name for TLS".to_string(),
        },
        tungstenite::Error::Url(u) => ConnectError::BadUrl {
            url,
            reason: u.to_string(),
        },
        other => ConnectError::Unreachable {
            url,
            reason: describe_ws_error(&other),
        },
    }
}

fn tls_error(url: String, e: &rustls::Error) -> ConnectError {
    match e {
        rustls::Error::InvalidCertificate(c) => ConnectError::Certificate {
            url,
            reason: c.to_string(),
        },
        rustls::Error::InvalidMessage(_) => ConnectError::Tls {
            url,
            reason: format!("{e} (does the server speak TLS? use ws:// for one that does not)"),
        },
        other => ConnectError::Tls {
            url,
            reason: other.to_string(),
        },
    }
}

/// The message of the server's JSON error body `{"error":{"code","message"}}`, or the body
/// itself if it is short text.
fn error_message(body: &[u8]) -> Option<String> {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        if let Some(m) = v["error"]["message"].as_str() {
            return Some(m.to_string());
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    (!text.is_empty() && text.len() <= 500).then(|| text.to_string())
}

fn describe_io(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "connection refused".to_string(),
        ConnectionReset => "connection reset".to_string(),
        ConnectionAborted => "connection aborted".to_string(),
        TimedOut => "timed out".to_string(),
        BrokenPipe => "the connection was cut (broken pipe)".to_string(),
        UnexpectedEof => "the connection ended early".to_string(),
        _ => e.to_string(),
    }
}

fn describe_ws_error(e: &tungstenite::Error) -> String {
    use tungstenite::error::ProtocolError;
    match e {
        tungstenite::Error::Io(io) => describe_io(io),
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            "the connection was closed".to_string()
        }
        tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            "the connection was reset without a closing handshake".to_string()
        }
        other => other.to_string(),
    }
}

async fn next_ws(ws: &mut Option<Ws>) -> Option<Result<WsMessage, tungstenite::Error>> {
    match ws {
        Some(ws) => ws.next().await,
        None => std::future::pending().await,
    }
}

/// The WebSocket settings of the SDK's connection. The read buffer is zero-filled up to its size
/// before every read, so it is kept well below the library's default of 128 KiB.
fn ws_config() -> tungstenite::protocol::WebSocketConfig {
    tungstenite::protocol::WebSocketConfig::default().read_buffer_size(16 << 10)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[test]
    fn good_urls_get_the_endpoint_appended() {
        assert_eq!(
            endpoint("ws://127.0.0.1:7400").unwrap(),
            "ws://127.0.0.1:7400/v1/ws"
        );
        assert_eq!(
            endpoint(" wss://chat.example.com/ ").unwrap(),
            "wss://chat.example.com/v1/ws"
        );
        assert_eq!(
            endpoint("WS://host:1/ordo").unwrap(),
            "ws://host:1/ordo/v1/ws",
            "a path prefix (behind a proxy) is kept; the scheme is not case-sensitive"
        );
        assert_eq!(
            endpoint("ws://[::1]:7400").unwrap(),
            "ws://[::1]:7400/v1/ws"
        );
    }

    #[test]
    fn urls_that_cannot_work_are_permanent_errors_that_say_what_to_use() {
        let cases = [
            ("http://x:7400", "http://x:7400 is not a WebSocket URL; use ws://x:7400"),
            ("https://x/", "https://x/ is not a WebSocket URL; use wss://x"),
            ("http://x:7400/v1/ws", "use ws://x:7400"),
            ("x:7400", "x:7400 has no scheme; use ws://x:7400"),
            ("127.0.0.1:7400/v1/ws", "use ws://127.0.0.1:7400 "),
            (
                "ws://x:7400/v1/ws",
                "ws://x:7400/v1/ws ends with /v1/ws, which the client appends itself; use ws://x:7400",
            ),
            ("wss://x/chat/v1/ws/", "use wss://x/chat"),
            ("ws://x:7400/?token=t", "query"),
            ("ws:///v1", "no host"),
            ("ws://x:port", "port must be a number"),
            ("ws://x:0", "port must be a number"),
            ("", "empty"),
        ];
        for (url, want) in cases {
            let e = endpoint(url).expect_err(url);
            assert!(e.is_permanent(), "{url}: {e:?}");
            assert!(e.is_bad_url(), "{url}: {e:?}");
            assert!(e.to_string().contains(want), "{url}: {e}");
        }
    }

    fn http(status: u16, body: &str) -> tungstenite::Error {
        let resp = tungstenite::http::Response::builder()
            .status(status)
            .body(Some(body.as_bytes().to_vec()))
            .unwrap();
        tungstenite::Error::Http(Box::new(resp))
    }

    #[test]
    fn a_refused_token_is_permanent_and_carries_the_servers_message() {
        let e = classify(
            "ws://h",
            http(
                401,
                r#"{"error":{"code":"unauthorized","message":"token expired at 5 (unix seconds); ask for a new one"}}"#,
            ),
        );
        assert_eq!(
            e,
            ConnectError::Unauthorized {
                url: "ws://h".into(),
                message: "token expired at 5 (unix seconds); ask for a new one".into()
            }
        );
        assert!(e.is_permanent() && e.is_unauthorized());
        assert_eq!(e.http_status(), Some(401));
        assert_eq!(
            e.to_string(),
            "ws://h refused the token (HTTP 401): token expired at 5 (unix seconds); ask for a new one"
        );
        // A body that is not JSON is shown as it is; no body, the status's name.
        let e = classify("ws://h", http(401, "nope\n"));
        assert!(e.to_string().ends_with(": nope"), "{e}");
        let e = classify("ws://h", http(401, ""));
        assert!(e.to_string().ends_with(": Unauthorized"), "{e}");
    }

    #[test]
    fn busy_and_unavailable_servers_are_transient_other_4xx_permanent() {
        for status in [429, 503, 502, 500, 408] {
            let e = classify(
                "ws://h",
                http(status, r#"{"error":{"code":"x","message":"m"}}"#),
            );
            assert!(!e.is_permanent(), "{status}: {e:?}");
            assert_eq!(e.http_status(), Some(status));
            assert_eq!(
                e.to_string(),
                format!("ws://h refused the connection (HTTP {status}): m")
            );
        }
        for status in [400, 403, 404] {
            assert!(
                classify("ws://h", http(status, "")).is_permanent(),
                "{status}"
            );
        }
    }

    #[test]
    fn network_faults_are_transient_and_say_what_happened() {
        use std::io::{Error, ErrorKind};
        let e = classify(
            "ws://127.0.0.1:7400",
            tungstenite::Error::Io(Error::from(ErrorKind::ConnectionRefused)),
        );
        assert_eq!(
            e.to_string(),
            "cannot connect to ws://127.0.0.1:7400: connection refused"
        );
        assert!(!e.is_permanent());
        let e = ConnectError::Timeout {
            url: "ws://h".into(),
            after: Duration::from_secs(10),
        };
        assert_eq!(e.to_string(), "no answer from ws://h within 10 s");
        assert!(!e.is_permanent());
        let lost = ConnectError::Lost {
            url: "ws://h".into(),
            reason: "connection reset".into(),
        };
        assert!(!lost.is_permanent());
        let e = classify(
            "ws://h",
            tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            ),
        );
        assert!(!e.is_permanent(), "{e:?}");
    }

    #[test]
    fn a_certificate_that_does_not_verify_is_permanent_other_tls_faults_are_not() {
        use std::io::{Error, ErrorKind};
        let cert = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        // As tokio-rustls reports it (an io::Error around the rustls error), and as tungstenite.
        for err in [
            tungstenite::Error::Io(Error::new(ErrorKind::InvalidData, cert.clone())),
            tungstenite::Error::Tls(cert.into()),
        ] {
            let e = classify("wss://h", err);
            assert!(matches!(e, ConnectError::Certificate { .. }), "{e:?}");
            assert!(e.is_permanent());
            assert!(e.to_string().contains("does not verify"), "{e}");
        }
        let plain = rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType);
        let e = classify(
            "wss://h",
            tungstenite::Error::Io(Error::new(ErrorKind::InvalidData, plain)),
        );
        assert!(matches!(e, ConnectError::Tls { .. }), "{e:?}");
        assert!(!e.is_permanent());
        assert!(e.to_string().contains("use ws://"), "{e}");
    }

    #[test]
    fn token_identity_reads_ordo_tokens_and_jwts() {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let ordo = format!("{}.sig", b64(r#"{"u":"alice","d":"phone","exp":9}"#));
        assert_eq!(
            token_identity(&ordo),
            Some(("alice".into(), "phone".into()))
        );
        let jwt = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"HS256","typ":"JWT"}"#),
            b64(r#"{"sub":"bob","device":"laptop","exp":9}"#)
        );
        assert_eq!(token_identity(&jwt), Some(("bob".into(), "laptop".into())));
        // Padded base64 is taken too.
        let padded = format!(
            "{}.{}=.sig",
            b64("{}"),
            b64(r#"{"sub":"bob","device":"laptop!"}"#)
        );
        assert_eq!(
            token_identity(&padded),
            Some(("bob".into(), "laptop!".into()))
        );
        assert_eq!(
            device_of(&padded),
            "client",
            "an invalid device id is not used"
        );
        for bad in [
            "",
            "opaque",
            "a.b",
            "a.b.c.d",
            &format!("{}.s", b64(r#"{"sub":"x"}"#)),
        ] {
            assert_eq!(token_identity(bad), None, "{bad}");
        }
    }

    fn opts(url: String, dir: &tempfile::TempDir) -> ClientOptions {
        let mut o = ClientOptions::new(url, "opaque-token", dir.path().join("c.redb"));
        o.reconnect.initial_ms = 20;
        o.reconnect.max_ms = 100;
        o
    }

    /// The next event of `c` that is not a message or a status.
    async fn next_conn_event(c: &mut Client) -> Option<Event> {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match c.next_event().await {
                    Some(Event::Message(_) | Event::Status { .. }) => {}
                    other => return other,
                }
            }
        })
        .await
        .expect("an event in time")
    }

    /// An HTTP server that answers every request with `status` and a JSON error `message`.
    async fn http_server(status: u16, message: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let mut buf = vec![0u8; 4096];
                let mut got = 0;
                while !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf[got..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                }
                let body = format!(r#"{{"error":{{"code":"x","message":"{message}"}}}}"#);
                let resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(resp.as_bytes()).await;
            }
        });
        format!("ws://{addr}")
    }

    #[tokio::test]
    async fn a_server_that_is_down_is_retried_and_each_failure_says_why() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let mut c = Client::open(opts(format!("ws://127.0.0.1:{port}"), &dir))
            .await
            .unwrap();
        assert_eq!(c.connection(), &Connection::Connecting);
        for n in 1..=2 {
            let ev = next_conn_event(&mut c).await;
            assert!(
                matches!(
                    ev,
                    Some(Event::ConnectFailed {
                        unauthorized: false,
                        ..
                    })
                ),
                "{ev:?}"
            );
            match c.connection() {
                Connection::Retrying {
                    cause,
                    failures,
                    retry_in,
                } => {
                    assert_eq!(*failures, n);
                    assert!(*retry_in <= Duration::from_millis(130), "{retry_in:?}");
                    assert_eq!(
                        cause.to_string(),
                        format!("cannot connect to ws://127.0.0.1:{port}: connection refused")
                    );
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(c.stopped().is_none());
        // A message sent meanwhile waits in the outbox.
        c.send(Target::Conv("team".into()), "later").await.unwrap();
        assert_eq!(c.pending().unwrap().len(), 1);
        c.close().await;
    }

    #[tokio::test]
    async fn a_refused_token_stops_the_client_with_the_servers_message() {
        let url = http_server(401, "token signature does not match this server's secret").await;
        let dir = tempfile::tempdir().unwrap();
        let mut c = Client::open(opts(url.clone(), &dir)).await.unwrap();
        let ev = next_conn_event(&mut c).await;
        match ev {
            Some(Event::ConnectFailed {
                reason,
                unauthorized: true,
            }) => assert!(reason.contains("HTTP 401"), "{reason}"),
            other => panic!("{other:?}"),
        }
        let want = ConnectError::Unauthorized {
            url,
            message: "token signature does not match this server's secret".into(),
        };
        assert_eq!(c.connection(), &Connection::Stopped(want.clone()));
        assert_eq!(c.stopped(), Some(&want));
        assert_eq!(next_conn_event(&mut c).await, None, "the client stopped");
        match c.send(Target::Conv("team".into()), "x").await {
            Err(ClientError::Connect(e)) => assert_eq!(e, want),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_unavailable_server_is_retried() {
        let url = http_server(503, "server is shutting down").await;
        let dir = tempfile::tempdir().unwrap();
        let mut c = Client::open(opts(url, &dir)).await.unwrap();
        for _ in 0..3 {
            let ev = next_conn_event(&mut c).await;
            assert!(matches!(ev, Some(Event::ConnectFailed { .. })), "{ev:?}");
            match c.connection() {
                Connection::Retrying { cause, .. } => {
                    assert_eq!(cause.http_status(), Some(503));
                    assert!(
                        cause.to_string().ends_with("server is shutting down"),
                        "{cause}"
                    );
                }
                other => panic!("{other:?}"),
            }
        }
        c.close().await;
    }

    #[tokio::test]
    async fn a_dropped_connection_says_why_and_comes_back() {
        use tungstenite::protocol::frame::coding::CloseCode;
        use tungstenite::protocol::CloseFrame;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                        return;
                    };
                    let _ = ws
                        .close(Some(CloseFrame {
                            code: CloseCode::Away,
                            reason: "server is shutting down".into(),
                        }))
                        .await;
                    while let Some(Ok(_)) = ws.next().await {}
                });
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let mut c = Client::open(opts(format!("ws://{addr}"), &dir))
            .await
            .unwrap();
        for _ in 0..2 {
            assert_eq!(next_conn_event(&mut c).await, Some(Event::Connected));
            assert_eq!(c.connection(), &Connection::Connected);
            assert_eq!(next_conn_event(&mut c).await, Some(Event::Disconnected));
            match c.connection() {
                Connection::Retrying {
                    cause, failures: 1, ..
                } => assert_eq!(
                    cause.to_string(),
                    format!(
                        "lost the connection to ws://{addr}: the server closed it (code 1001: server is shutting down)"
                    )
                ),
                other => panic!("{other:?}"),
            }
        }
        c.close().await;
    }

    #[tokio::test]
    async fn open_refuses_a_url_that_cannot_work_before_touching_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts("http://127.0.0.1:7400".into(), &dir);
        o.store = dir.path().join("no/such/dir/c.redb");
        match Client::open(o).await {
            Err(ClientError::Connect(e)) => assert_eq!(
                e.to_string(),
                "http://127.0.0.1:7400 is not a WebSocket URL; use ws://127.0.0.1:7400"
            ),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("opened"),
        }
    }
}
