//! One WebSocket connection: decode frames, pass them to the router (whose core holds every
//! frame's rule), read from the store the pages the router asks for to answer a `sync`, and write
//! the router's frames out in the encoding the client last spoke.
//!
//! A reader loop and a writer task share one bounded queue of outgoing frames. Bad frames get an
//! `error` frame and the connection stays usable; a frame over the size limit closes the socket
//! with 1009, a text message that is not UTF-8 with 1007; a connection the router dropped as too
//! slow is closed with 1013; a connection whose token expires is closed with 4001 then.
//!
//! **Pacing.** The reader stops reading frames while the queue is more than half full (in
//! frames or bytes) or while the connection has as many sends unanswered as a quarter of its
//! queue (at most 4,096), and goes on once the writer has put frames out: a client that
//! pipelines sends or syncs faster than it reads answers is slowed to its own pace (TCP holds
//! the rest) rather than dropped, and the answers one commit releases to it fit the half of
//! the queue that pushes leave free (the router pushes into the first half only, and owes a
//! `notify` for what did not fit). While the reader waits, each write the writer completes
//! counts as hearing from the client (it is reading); a connection with frames queued whose
//! writer puts nothing out for a third of the idle timeout (30 s by default) is not reading: it
//! is closed with 1013. One waiting only for its sends' answers (the server is slow, not the
//! client) is never closed for it.

use crate::auth::Claims;
use crate::metrics as m;
use crate::router::{Budget, Command, Outbound, SessionHandle};
use crate::AppState;
use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use ordo_core::{may_read, SessionId, SyncPlan};
use ordo_protocol::{decode_client, Encoding, ErrorCode, ServerFrame, PROTOCOL_VERSION};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// A session id not given before in this process (connections and a cluster's remote sessions
/// share them).
pub(crate) fn next_session() -> SessionId {
    NEXT_SESSION.fetch_add(1, Ordering::Relaxed)
}

/// How long a closing connection may take to flush what is queued for it.
const WRITER_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Most frames written to the socket at once (one flush) when more are queued.
const WRITE_BATCH: usize = 256;
/// Most bytes (by the budget's count) written at once: a flush is also the writer's report of
/// progress to a paced reader, so it comes often even on a slow link.
const WRITE_BATCH_BYTES: usize = 64 * 1024;

/// Most sends one connection may have unanswered before its reader waits for answers.
const MAX_UNANSWERED: usize = 4096;

/// WebSocket close codes used by the server.
pub mod close {
    pub const GOING_AWAY: u16 = 1001;
    pub const INVALID_TEXT: u16 = 1007;
    pub const TOO_BIG: u16 = 1009;
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The connection's token expired (an application code: 4000-4999 are left to
    /// applications by RFC 6455).
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// The connection's token was revoked through the admin API.
    pub const TOKEN_REVOKED: u16 = 4003;
    /// Nothing was heard from the connection (not even an answer to the server's pings) for
    /// `idle_timeout_secs`.
    pub const IDLE: u16 = 4002;
}

struct Conn {
    state: AppState,
    session: SessionId,
    tx: mpsc::Sender<Outbound>,
    budget: Arc<Budget>,
    /// Sends unanswered past which the reader waits.
    max_unanswered: usize,
    /// Last encoding the client spoke: true for MessagePack.
    msgpack: Arc<AtomicBool>,
}

pub async fn run(
    socket: WebSocket,
    state: AppState,
    claims: Claims,
    enc: Encoding,
    _user_slot: crate::http::UserSlot,
) {
    let Claims {
        user,
        device,
        exp,
        iat,
    } = claims;
    let idle = state.idle_timeout;
    // The token's expiry ends the connection: a token is good until then, not for as long as
    // one connection lasts.
    let expires = tokio::time::Instant::now()
        + std::time::Duration::from_millis(
            exp.saturating_mul(1000)
                .saturating_sub(crate::router::now_ms()),
        );
    let session = next_session();
    let _live = state.live.clone();
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Outbound>(state.outbound_queue);
    let kick = Arc::new(crate::router::Kick::default());
    let msgpack = Arc::new(AtomicBool::new(enc == Encoding::MsgPack));
    let (close_tx, mut close_rx) = oneshot::channel::<(u16, String)>();
    let mut close_open = true;

    let budget = Arc::new(Budget::new(state.outbound_bytes));
    // `welcome` is queued before the router knows the session, so that it is always first.
    let welcome = Outbound::new(ServerFrame::Welcome {
        user: user.clone(),
        device: device.clone(),
        protocol: PROTOCOL_VERSION,
        server_time: crate::router::now_ms(),
        limits: state.limits.clone(),
    });
    budget.try_take(welcome.weight());
    let _ = tx.try_send(welcome);
    let handle = SessionHandle {
        tx: tx.clone(),
        budget: budget.clone(),
        kick: kick.clone(),
    };
    if state
        .router
        .send(Command::Connect {
            session,
            user: user.clone(),
            device: device.clone(),
            handle,
        })
        .await
        .is_err()
    {
        let _ = sink
            .send(close_msg(close::GOING_AWAY, "server is shutting down"))
            .await;
        return;
    }
    tracing::debug!(session, %user, %device, "connected");

    // Writer: frames from the router and from this connection, then an optional close.
    let writer_msgpack = msgpack.clone();
    let writer_budget = budget.clone();
    let writer = tokio::spawn(async move {
        // Looked up once: a registry lookup per frame is a hash and an allocation each.
        let delivered = metrics::counter!(m::DELIVERED);
        // WebSocket pings: a live client answers them (its WebSocket library does), so a quiet
        // connection is not taken for a dead one.
        let mut ping = tokio::time::interval(idle / 3);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        // A shutdown's close goes after what is queued (answers to sends the server took, or
        // refused as it stopped); any other close goes at once.
        let mut last_words = None;
        loop {
            tokio::select! {
                biased;
                close = &mut close_rx, if close_open => match close {
                    Ok((code, reason)) if code == close::GOING_AWAY => {
                        last_words = Some(close_msg(code, &reason));
                        close_open = false;
                    }
                    Ok((code, reason)) => {
                        let _ = sink.send(close_msg(code, &reason)).await;
                        break;
                    }
                    // Ended without a close frame to send: write out what is queued.
                    Err(_) => close_open = false,
                },
                frame = rx.recv() => {
                    let Some(frame) = frame else { break };
                    let enc = if writer_msgpack.load(Ordering::Relaxed) {
                        Encoding::MsgPack
                    } else {
                        Encoding::Json
                    };
                    // Everything already queued goes out in one write.
                    let mut next = Some(frame);
                    let mut queued = 0;
                    let mut pushed = 0;
                    let mut answers = 0;
                    let mut written = 0;
                    let mut failed = false;
                    while let Some(out) = next.take() {
                        pushed += u64::from(out.is_msg());
                        answers += usize::from(out.is_answer());
                        written += out.weight();
                        if sink.feed(out.message(enc)).await.is_err() {
                            failed = true;
                            break;
                        }
                        queued += 1;
                        if queued < WRITE_BATCH && written < WRITE_BATCH_BYTES {
                            next = rx.try_recv().ok();
                        }
                    }
                    delivered.increment(pushed);
                    if failed || sink.flush().await.is_err() {
                        break;
                    }
                    // Out of the queue and onto the socket: the budget has room again.
                    writer_budget.give(written);
                    writer_budget.answered(answers);
                    writer_budget.written.notify_one();
                }
                _ = ping.tick() => {
                    if sink.send(WsMessage::Ping(Default::default())).await.is_err() {
                        break;
                    }
                }
            }
        }
        if let Some(m) = last_words {
            let _ = sink.send(m).await;
        }
        let _ = sink.close().await;
    });

    let conn = Conn {
        state: state.clone(),
        session,
        tx: tx.clone(),
        budget,
        max_unanswered: (state.outbound_queue / 4).clamp(1, MAX_UNANSWERED),
        msgpack,
    };
    let mut shutdown = state.shutdown.clone();
    // Both timers are made once, not per frame (a timer made and dropped for every frame read
    // costs throughput): a frame only notes the time, and the idle timer, when it fires,
    // moves on to that time plus `idle` if something was heard since.
    let mut heard = tokio::time::Instant::now();
    let expiry = tokio::time::sleep_until(expires);
    let idle_timer = tokio::time::sleep_until(heard + idle);
    // While paced with frames queued: `stalled` after the writer last put something out (or
    // since the wait began).
    let stalled = idle / 3;
    let mut was_waiting = false;
    let stall_timer = tokio::time::sleep_until(heard + stalled);
    tokio::pin!(expiry, idle_timer, stall_timer);
    // Subscribed before the check, so that a revocation stored meanwhile is seen by one or
    // the other.
    let mut revoked = state.tokens.revocations.subscribe();
    revoked.mark_unchanged();
    let is_revoked = |iat| {
        state
            .tokens
            .check_revoked(&Claims {
                user: user.clone(),
                device: device.clone(),
                exp,
                iat,
            })
            .err()
            .map(|_| {
                (
                    close::TOKEN_REVOKED,
                    "the token was revoked; reconnect with a new one".to_string(),
                )
            })
    };
    let mut first = is_revoked(iat);
    let close = loop {
        let paced = conn.paced();
        let waiting = paced && conn.queued();
        if waiting && !was_waiting {
            stall_timer
                .as_mut()
                .reset(tokio::time::Instant::now() + stalled);
        }
        was_waiting = waiting;
        if let Some(c) = first.take() {
            break Some(c);
        }
        tokio::select! {
            _ = kick.woken.notified() => break Some((close::TRY_AGAIN_LATER, kick.reason())),
            _ = revoked.changed() => {
                match is_revoked(iat) {
                    Some(c) => break Some(c),
                    None => continue,
                }
            }
            _ = shutdown.changed() => break Some((close::GOING_AWAY, "server is shutting down; reconnect".to_string())),
            _ = &mut expiry => break Some((close::TOKEN_EXPIRED, "the token expired; reconnect with a new one".to_string())),
            _ = &mut idle_timer => {
                if heard + idle > tokio::time::Instant::now() {
                    idle_timer.as_mut().reset(heard + idle);
                    continue;
                }
                break Some((close::IDLE, format!("nothing heard for {} s, not even an answer to a ping", idle.as_secs())));
            }
            // Paced: frames went out (the client reads: it is alive); read on if there is room
            // now.
            _ = conn.budget.written.notified(), if paced => {
                heard = tokio::time::Instant::now();
                stall_timer.as_mut().reset(heard + stalled);
            }
            _ = &mut stall_timer, if waiting => break Some(too_slow()),
            msg = stream.next(), if !paced => match msg {
                None => break None,
                Some(Err(e)) => break read_error_close(&e, state.limits.max_frame_bytes),
                Some(Ok(WsMessage::Close(_))) => break None,
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => heard = tokio::time::Instant::now(),
                Some(Ok(WsMessage::Text(t))) => {
                    heard = tokio::time::Instant::now();
                    if let Err(c) = conn.on_message(t.as_bytes(), Encoding::Json).await { break Some(c) }
                }
                Some(Ok(WsMessage::Binary(b))) => {
                    heard = tokio::time::Instant::now();
                    if let Err(c) = conn.on_message(&b, Encoding::MsgPack).await { break Some(c) }
                }
            }
        }
    };
    let _ = state.router.send(Command::Disconnect { session }).await;
    if let Some(c) = close {
        let _ = close_tx.send(c);
    }
    drop(conn);
    drop(tx);
    // A peer that stopped reading must not pin the task and socket: give the writer a grace
    // period to flush and close, then cut it off.
    let mut writer = writer;
    if tokio::time::timeout(WRITER_GRACE, &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
    tracing::debug!(session, "disconnected");
}

/// A close frame; its reason cut to the 123 bytes a close frame has room for (a longer one is a
/// protocol error at the client), at a character boundary.
fn close_msg(code: u16, reason: &str) -> WsMessage {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    WsMessage::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(reason[..end].to_string()),
    }))
}

/// A read error after which the socket may still take a close frame: a message over the size
/// limit gets 1009, a text message that is not UTF-8 gets 1007 (the WebSocket protocol ends
/// the connection there: no `error` frame can answer it); anything else (reset, protocol
/// violation) just ends the connection.
fn read_error_close(e: &axum::Error, limit: usize) -> Option<(u16, String)> {
    use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(WsError::Utf8(_)) = s.downcast_ref::<WsError>() {
            return Some((
                close::INVALID_TEXT,
                "text message is not valid UTF-8; send MessagePack frames as binary".to_string(),
            ));
        }
        if let Some(WsError::Capacity(c)) = s.downcast_ref::<WsError>() {
            let reason = match c {
                CapacityError::MessageTooLong { size, .. } => {
                    format!("frame of {size} bytes exceeds max_frame_bytes {limit}")
                }
                other => format!("frame too large ({other}); max_frame_bytes is {limit}"),
            };
            return Some((close::TOO_BIG, reason));
        }
        src = s.source();
    }
    None
}

impl Conn {
    /// Whether the reader should wait for the writer before reading another frame (see the
    /// module docs).
    fn paced(&self) -> bool {
        self.budget.unanswered() >= self.max_unanswered
            || self.budget.over_half()
            || self.tx.capacity() < self.tx.max_capacity() / 2
    }

    /// Whether frames wait for the writer (queued, or taken and being written).
    fn queued(&self) -> bool {
        self.budget.used() > 0 || self.tx.capacity() < self.tx.max_capacity()
    }

    /// Handles one incoming message; an error is the close (code, reason) that ends the
    /// connection.
    async fn on_message(&self, bytes: &[u8], enc: Encoding) -> Result<(), Close> {
        let limit = self.state.limits.max_frame_bytes;
        if bytes.len() > limit {
            return Err((
                close::TOO_BIG,
                format!(
                    "frame of {} bytes exceeds max_frame_bytes {limit}",
                    bytes.len()
                ),
            ));
        }
        self.msgpack
            .store(enc == Encoding::MsgPack, Ordering::Relaxed);
        let frame = match decode_client(bytes, enc) {
            Ok(f) => f,
            Err(e) => {
                metrics::counter!(m::FRAME_ERRORS).increment(1);
                self.reply(ServerFrame::error(ErrorCode::Malformed, e.to_string()))?;
                return Ok(());
            }
        };
        let session = self.session;
        if let ordo_protocol::ClientFrame::Send { .. } = frame {
            self.budget.send_read();
        }
        if !may_read(&frame) {
            return self
                .router(Command::Frame {
                    session,
                    frame,
                    read: None,
                })
                .await;
        }
        // A frame that may need history: wait for the router's answer, and serve the page
        // before reading the next frame, so that frames are answered in the order they came.
        let (reply, rx) = oneshot::channel();
        self.router(Command::Frame {
            session,
            frame,
            read: Some(reply),
        })
        .await?;
        match rx.await.map_err(|_| going_away())? {
            Some(plan) => self.read_page(plan).await,
            None => Ok(()),
        }
    }

    /// Reads the page `plan` names from the store (off the async workers: the read may block on
    /// the disk) and hands it to the router, which answers the `sync` with it.
    async fn read_page(&self, plan: SyncPlan) -> Result<(), Close> {
        let store = self.state.store.clone();
        let (c, from, to, lim) = (plan.conv.clone(), plan.from, plan.to, plan.limit);
        let budget = self.state.max_sync_bytes;
        let page =
            tokio::task::spawn_blocking(move || store.read_page(&c, from, to, lim, budget)).await;
        let page = match page {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                tracing::error!(error = %e, conv = %plan.conv, "sync read failed");
                self.router(Command::ReadFailed {
                    session: self.session,
                })
                .await?;
                return self.reply(ServerFrame::error_about(
                    ErrorCode::Unavailable,
                    "history could not be read; retry the sync",
                    "sync",
                    Some(&plan.conv),
                ));
            }
            Err(_) => {
                self.router(Command::ReadFailed {
                    session: self.session,
                })
                .await?;
                return self.reply(ServerFrame::error_about(
                    ErrorCode::Internal,
                    "sync failed; retry",
                    "sync",
                    Some(&plan.conv),
                ));
            }
        };
        metrics::counter!(m::DELIVERED).increment(page.messages.len() as u64);
        self.router(Command::PageRead {
            session: self.session,
            plan,
            messages: page.messages,
            first_seq: page.first_seq,
        })
        .await
    }

    /// Queues a frame for this connection. A full queue means the peer is not reading: the
    /// connection is closed rather than waited on, so it can never pin the task or memory.
    fn reply(&self, frame: ServerFrame) -> Result<(), Close> {
        let out = Outbound::new(frame);
        let weight = out.weight();
        if !self.budget.try_take(weight) {
            return Err(too_slow());
        }
        match self.tx.try_send(out) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.budget.give(weight);
                Err(too_slow())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(going_away()),
        }
    }

    /// Sends to the router; fails with a close if the router is gone (server stopping).
    async fn router(&self, cmd: Command) -> Result<(), Close> {
        self.state.router.send(cmd).await.map_err(|_| going_away())
    }
}

/// A close frame to send: (code, reason).
type Close = (u16, String);

/// The close of a connection whose queue (in frames or bytes) is full: it is not reading.
fn too_slow() -> Close {
    metrics::counter!(m::SLOW_CONSUMERS).increment(1);
    (
        close::TRY_AGAIN_LATER,
        "dropped: too slow to keep up; reconnect and sync".into(),
    )
}

fn going_away() -> Close {
    (
        close::GOING_AWAY,
        "server is shutting down; reconnect".into(),
    )
}
