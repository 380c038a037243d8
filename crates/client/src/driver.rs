//! The tokio driver: one task that owns the [`ClientState`], the WebSocket and the local store,
//! and carries out the state's effects in order (store, then send, then tell the app).
//!
//! The app talks to it through [`Client`]: `send` returns once the message is in the outbox on
//! disk; `next_event` yields messages, status changes, receipts, gaps and connection changes.
//! The connection comes back by itself with backoff; a client reopened on the same store
//! carries on where it stopped.

use crate::backoff::RetryPolicy;
use crate::outbox::Target;
use crate::state::{ClientConfig, ClientState, Effect, Event};
use crate::store::{LocalStore, LocalStoreError};
use futures_util::{SinkExt, StreamExt};
use ordo_protocol::{decode_server, encode, Encoded, Encoding, Message};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message as WsMessage;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How to reach the server and where to keep local state.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// WebSocket base URL, e.g. `ws://127.0.0.1:7400` or `wss://chat.example.com`.
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

/// A connected (or reconnecting) client. Dropping it stops the driver.
pub struct Client {
    cmds: mpsc::UnboundedSender<Cmd>,
    events: mpsc::UnboundedReceiver<Event>,
    store: Arc<LocalStore>,
    /// The last message handed out, recorded as done when the app asks for the next event.
    taken: Option<(String, u64)>,
    driver: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Opens the local store and starts the driver, which connects in the background.
    /// Messages stored earlier but never taken by the app come out of [`Self::next_event`] first.
    pub async fn open(opts: ClientOptions) -> Result<Client, ClientError> {
        let tls = if opts.url.starts_with("wss://") {
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
            let _ = ev_tx.send(Event::Message(m));
        }
        let driver = Driver {
            state,
            store: store.clone(),
            tls,
            opts,
            events: ev_tx,
            ws: None,
            start: Instant::now(),
        };
        let driver = tokio::spawn(driver.run(cmd_rx));
        Ok(Client {
            cmds,
            events,
            store,
            taken: None,
            driver,
        })
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
            .map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// The user has seen `conv` up to `seq`.
    pub fn mark_read(&self, conv: &str, seq: u64) -> Result<(), ClientError> {
        self.cmds
            .send(Cmd::MarkRead {
                conv: conv.to_string(),
                seq,
            })
            .map_err(|_| ClientError::Closed)
    }

    /// The next event; `None` once the client is closed.
    ///
    /// Messages come per conversation in seq order, each once. Asking for the next event
    /// records, on disk, that the app is done with the message returned before, so a client
    /// reopened on the same store hands out exactly the messages the app had not finished
    /// (only a crash between finishing one and asking for the next can repeat that one).
    pub async fn next_event(&mut self) -> Option<Event> {
        self.commit_taken();
        let e = self.events.recv().await?;
        if let Event::Message(m) = &e {
            self.taken = Some((m.conv.clone(), m.seq));
        }
        Some(e)
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

/// The (user, device) a token names, read from its payload (`<payload>.<sig>`, the payload
/// base64url JSON with `u` and `d`) without checking the signature: only the server can, and
/// does. `None` for a token of another shape.
pub fn token_identity(token: &str) -> Option<(String, String)> {
    use base64::Engine;
    let (payload, _) = token.split_once('.')?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&json).ok()?;
    Some((v["u"].as_str()?.to_string(), v["d"].as_str()?.to_string()))
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
    opts: ClientOptions,
    events: mpsc::UnboundedSender<Event>,
    ws: Option<Ws>,
    start: Instant,
}

impl Driver {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        let mut attempt: u32 = 0;
        let mut reconnect_at = Some(self.now());
        loop {
            // However the connection was lost (a failed read, a failed write while carrying out
            // effects), the next attempt is always scheduled.
            if self.ws.is_none() && reconnect_at.is_none() {
                attempt = attempt.saturating_add(1);
                reconnect_at =
                    Some(self.now() + self.opts.reconnect.delay_ms(attempt, rand::random()));
            }
            if self.ws.is_none() && reconnect_at.is_some_and(|t| t <= self.now()) {
                match self.connect().await {
                    Ok(ws) => {
                        attempt = 0;
                        reconnect_at = None;
                        self.ws = Some(ws);
                        let now = self.now();
                        self.state.connected(now);
                    }
                    Err((reason, unauthorized)) => {
                        attempt = attempt.saturating_add(1);
                        let delay = self.opts.reconnect.delay_ms(attempt, rand::random());
                        tracing::debug!(error = %reason, delay, "connect failed");
                        reconnect_at = Some(self.now() + delay);
                        let _ = self.events.send(Event::ConnectFailed {
                            reason,
                            unauthorized,
                        });
                    }
                }
                if !self.carry_out().await {
                    return;
                }
                continue;
            }
            let deadline = self.state.next_deadline();
            let wake = match (deadline, reconnect_at) {
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
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => {
                            self.ws = None;
                            self.state.disconnected();
                            attempt = attempt.saturating_add(1);
                            reconnect_at = Some(now + self.opts.reconnect.delay_ms(attempt, rand::random()));
                        }
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

    /// One connection attempt; the error says why, and whether the token was refused.
    async fn connect(&self) -> Result<Ws, (String, bool)> {
        let url = format!("{}/v1/ws", self.opts.url.trim_end_matches('/'));
        let mut req = url
            .into_client_request()
            .map_err(|e| (format!("bad server URL {:?}: {e}", self.opts.url), false))?;
        let auth = HeaderValue::from_str(&format!("Bearer {}", self.opts.token)).map_err(|_| {
            (
                "the token has characters not allowed in a header".to_string(),
                true,
            )
        })?;
        req.headers_mut().insert("authorization", auth);
        let connector = self.tls.clone().map(tokio_tungstenite::Connector::Rustls);
        let fut = tokio_tungstenite::connect_async_tls_with_config(
            req,
            Some(ws_config()),
            true,
            connector,
        );
        match tokio::time::timeout(self.opts.connect_timeout, fut).await {
            Err(_) => Err((format!("no answer from {} in time", self.opts.url), false)),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
                let status = resp.status();
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                Err((
                    format!("the server refused the connection ({status}): {body}"),
                    status.as_u16() == 401,
                ))
            }
            Ok(Err(e)) => Err((format!("cannot connect to {}: {e}", self.opts.url), false)),
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
                    if ws.send(msg).await.is_err() {
                        self.ws = None;
                        self.state.disconnected();
                    }
                }
                Effect::Event(e) => {
                    let _ = self.events.send(e);
                }
            }
        }
        true
    }
}

async fn next_ws(
    ws: &mut Option<Ws>,
) -> Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>> {
    match ws {
        Some(ws) => ws.next().await,
        None => std::future::pending().await,
    }
}

/// The WebSocket settings of the SDK's connection. The read buffer is zero-filled up to its size
/// before every read, so it is kept well below the library's default of 128 KiB.
fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(16 << 10)
}
