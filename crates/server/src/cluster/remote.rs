//! The NATS side of a node: what it hears from the other nodes, the connections of other nodes
//! it serves as an owner, and the one task that publishes what the router sends.
//!
//! **The dispatcher** reads this node's subject. Connections other nodes announce
//! ([`NodeMsg::Open`]) become *remote sessions*; their frames go to them in order; whatever is
//! for the router (answers and pushes for this node's connections, a kick, a missed push,
//! admin requests and posts) goes to the router.
//!
//! **A remote session** is a session of this node's core like a local connection: the owner
//! decides for it, the hub pushes to it, and its outgoing queue is bounded the same way. Its
//! reader task hands its frames to the router in the order their numbers say (a number out of
//! order means NATS lost a frame: the session is dropped, and its node closes the connection,
//! whose client resends in order) and reads the history pages its `sync`s need; its writer task
//! sends what the router queues for it back to the connection's node, several frames per NATS
//! message. A remote session not announced again for [`FORGET_AFTER`] is forgotten (its node
//! died, or forgot it).

use super::route::ClusterEvent;
use super::wire::{self, NodeMsg, OpenSession, Peer, WireError};
use crate::metrics as m;
use crate::router::{Budget, Command, Kick, Outbound, SessionHandle};
use futures_util::StreamExt;
use ordo_core::{may_read, SessionId};
use ordo_protocol::{ClientFrame, ErrorCode, ServerFrame};
use ordo_store::Store;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How often a node announces its connections to the others.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(5);
/// A remote session not announced for this long is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(20);
/// Frames of one remote session waiting for the router; past it the session is dropped.
const INBOX: usize = 1024;
/// Most frames one NATS message back to a connection's node carries.
const OUT_BATCH: usize = 256;
/// Most bytes (by the budget's count) one such message carries.
const OUT_BATCH_BYTES: usize = 256 * 1024;
/// How long an admin request or a post forwarded to another node waits for its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the dispatcher and the remote sessions share.
#[derive(Clone)]
pub struct Ctx {
    pub node: Arc<str>,
    pub prefix: Arc<str>,
    pub nats: async_nats::Client,
    pub router: mpsc::Sender<Command>,
    pub store: Arc<StoreRef>,
    pub outbound_queue: usize,
    pub outbound_bytes: usize,
    pub max_sync_bytes: usize,
}

impl Ctx {
    /// Publishes `msg` to node `to`; false if it could not be sent.
    pub async fn publish(&self, to: &str, msg: &NodeMsg) -> bool {
        let Ok(bytes) = wire::encode(msg) else {
            return false;
        };
        self.nats
            .publish(wire::node_subject(&self.prefix, to), bytes.into())
            .await
            .is_ok()
    }
}

/// The store, for the pages remote sessions read; let go of on a blocking thread where it can,
/// not on an async worker: dropping the last reference closes the store, which may block. (As
/// the runtime shuts down it may still go on a worker; the PostgreSQL store, whose client
/// cannot close there, then closes its connections on a thread of their own.)
///
/// The server [releases](StoreRef::release) it once its router has ended, so that a remote
/// session's task still waiting on NATS then does not keep the store open past the server.
pub struct StoreRef(Mutex<Option<Arc<dyn Store>>>);

impl StoreRef {
    pub fn new(store: Arc<dyn Store>) -> Arc<StoreRef> {
        Arc::new(StoreRef(Mutex::new(Some(store))))
    }

    fn get(&self) -> Option<Arc<dyn Store>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Lets go of the store: pages are no longer read for remote sessions (each is told the
    /// router is gone, as it is). Returns it, for the caller to drop where it may block.
    pub fn release(&self) -> Option<Arc<dyn Store>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl Drop for StoreRef {
    fn drop(&mut self) {
        if let Some(store) = self.release() {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn_blocking(move || drop(store))),
                Err(_) => drop(store),
            }
        }
    }
}

/// One remote session as the dispatcher knows it.
struct Entry {
    inbox: mpsc::Sender<(u64, ClientFrame)>,
    seen: Instant,
}

/// A connection of another node's process.
type Key = (Peer, SessionId);
type Registry = Arc<Mutex<HashMap<Key, Entry>>>;

/// Runs the dispatcher until the subscription ends.
pub async fn dispatch(
    ctx: Ctx,
    mut sub: async_nats::Subscriber,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let registry: Registry = Arc::default();
    // Each node's process as last heard from.
    let mut incs: HashMap<Arc<str>, u64> = HashMap::new();
    let mut sweep = tokio::time::interval(ANNOUNCE_EVERY);
    loop {
        tokio::select! {
            _ = stop.changed() => {
                // Every remote session ends (its frames stop), and lets go of the store.
                registry.lock().unwrap_or_else(|p| p.into_inner()).clear();
                break;
            }
            msg = sub.next() => {
                let Some(msg) = msg else { break };
                match wire::decode::<NodeMsg>(&msg.payload) {
                    Ok(m) => on_message(&ctx, &registry, &mut incs, m, msg.reply).await,
                    Err(e) => tracing::warn!(error = %e, "a message from another node could not be read"),
                }
            }
            _ = sweep.tick() => {
                {
                    let mut r = registry.lock().unwrap_or_else(|p| p.into_inner());
                    r.retain(|_, e| e.seen.elapsed() < FORGET_AFTER);
                    metrics::gauge!(m::CLUSTER_REMOTE_SESSIONS).set(r.len() as f64);
                }
                // NATS's round trip (a PING answered by its PONG), off this loop.
                let nats = ctx.nats.clone();
                tokio::spawn(async move {
                    let started = Instant::now();
                    if tokio::time::timeout(REQUEST_TIMEOUT, nats.flush()).await.is_ok() {
                        metrics::histogram!(m::CLUSTER_NATS_RTT_SECONDS)
                            .record(started.elapsed().as_secs_f64());
                    }
                });
            }
        }
    }
}

async fn on_message(
    ctx: &Ctx,
    registry: &Registry,
    incs: &mut HashMap<Arc<str>, u64>,
    msg: NodeMsg,
    reply: Option<async_nats::Subject>,
) {
    match msg {
        NodeMsg::Open { from, sessions } => {
            // The sessions of an earlier process of that node are gone with it.
            if incs.insert(from.node.clone(), from.inc) != Some(from.inc) {
                registry
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|(peer, _), _| peer.node != from.node || peer.inc == from.inc);
            }
            for s in sessions {
                open(ctx, registry, from.clone(), s);
            }
        }
        NodeMsg::Close { from, session } => {
            registry
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&(from, session));
        }
        NodeMsg::Frame {
            from,
            session,
            n,
            frame,
        } => {
            let key = (from, session);
            let sent = {
                let r = registry.lock().unwrap_or_else(|p| p.into_inner());
                r.get(&key).map(|e| e.inbox.try_send((n, frame)).is_ok())
            };
            let why = match sent {
                Some(true) => return,
                Some(false) => "its frames came faster than this node took them",
                None => "this node does not know the connection",
            };
            registry
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            let kick = NodeMsg::Kick {
                inc: key.0.inc,
                session,
                reason: format!("the node owning the conversation dropped the connection ({why}); reconnect and resend"),
            };
            ctx.publish(&key.0.node, &kick).await;
        }
        NodeMsg::Admin { op } => {
            let (tx, rx) = oneshot::channel();
            let event = ClusterEvent::AdminIn { op, reply: tx };
            answer(ctx, reply, event, rx).await;
        }
        NodeMsg::Post { post } => {
            let (tx, rx) = oneshot::channel();
            let event = ClusterEvent::PostIn { post, reply: tx };
            answer(ctx, reply, event, rx).await;
        }
        other => {
            let _ = ctx
                .router
                .send(Command::Cluster(ClusterEvent::Inbound(other)))
                .await;
        }
    }
}

/// Hands a forwarded admin request or post to the router (`event`), and answers it on `reply`
/// once the router has (off the dispatcher).
async fn answer<T: serde::Serialize + Send + 'static>(
    ctx: &Ctx,
    reply: Option<async_nats::Subject>,
    event: ClusterEvent,
    rx: oneshot::Receiver<Result<T, ordo_core::CoreError>>,
) {
    let asked = ctx.router.send(Command::Cluster(event)).await.is_ok();
    let Some(reply) = reply else { return };
    let nats = ctx.nats.clone();
    tokio::spawn(async move {
        let result = match asked {
            true => rx.await.unwrap_or_else(|_| {
                Err(ordo_core::CoreError::Unavailable(
                    "the node stopped; retry".into(),
                ))
            }),
            false => Err(ordo_core::CoreError::Unavailable(
                "the node is stopping; retry".into(),
            )),
        };
        let result = result.map_err(|e| WireError {
            code: e.code(),
            message: e.to_string(),
        });
        if let Ok(bytes) = wire::encode(&result) {
            let _ = nats.publish(reply, bytes.into()).await;
        }
    });
}

/// A connection of node `from` announced: a remote session of this node's core, unless it is
/// one already (then it is only marked as heard of).
fn open(ctx: &Ctx, registry: &Registry, from: Peer, s: OpenSession) {
    let key = (from, s.session);
    let mut r = registry.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = r.get_mut(&key) {
        e.seen = Instant::now();
        return;
    }
    let (inbox, frames) = mpsc::channel(INBOX);
    r.insert(
        key.clone(),
        Entry {
            inbox,
            seen: Instant::now(),
        },
    );
    metrics::gauge!(m::CLUSTER_REMOTE_SESSIONS).set(r.len() as f64);
    tokio::spawn(run_session(ctx.clone(), registry.clone(), key, s, frames));
}

/// One remote session, from its announcement until it is closed, dropped or forgotten.
async fn run_session(
    ctx: Ctx,
    registry: Registry,
    key: Key,
    s: OpenSession,
    mut frames: mpsc::Receiver<(u64, ClientFrame)>,
) {
    let session = crate::conn::next_session();
    let (tx, mut rx) = mpsc::channel::<Outbound>(ctx.outbound_queue);
    let budget = Arc::new(Budget::new(ctx.outbound_bytes));
    let kick = Arc::new(Kick::default());
    let handle = SessionHandle {
        tx,
        budget: budget.clone(),
        kick: kick.clone(),
    };
    let connected = ctx
        .router
        .send(Command::ConnectRemote {
            session,
            user: s.user,
            device: s.device,
            handle,
            origin: key.clone(),
        })
        .await;
    if connected.is_err() {
        return;
    }
    // The writer: frames for the connection, back to its node. Once the router dropped the
    // session it also forgets it here, so that a later frame of the connection is answered
    // with a kick (the one it sends now may be lost).
    let (wctx, wkey, wkick, wregistry) = (ctx.clone(), key.clone(), kick.clone(), registry.clone());
    let forget = move |r: &Registry, k: &Key| {
        r.lock().unwrap_or_else(|p| p.into_inner()).remove(k);
    };
    let writer = tokio::spawn(async move {
        loop {
            tokio::select! {
                biased;
                first = rx.recv() => {
                    let Some(first) = first else {
                        // The router let go of the session: dropped (tell its node), or closed.
                        if wkick.kicked() {
                            forget(&wregistry, &wkey);
                            let msg = NodeMsg::Kick { inc: wkey.0.inc, session: wkey.1, reason: wkick.reason() };
                            wctx.publish(&wkey.0.node, &msg).await;
                        }
                        break;
                    };
                    let mut out = vec![first];
                    let mut bytes = out[0].weight();
                    while out.len() < OUT_BATCH && bytes < OUT_BATCH_BYTES {
                        match rx.try_recv() {
                            Ok(o) => {
                                bytes += o.weight();
                                out.push(o);
                            }
                            Err(_) => break,
                        }
                    }
                    let answers = out.iter().filter(|o| o.is_answer()).count();
                    let msg = NodeMsg::Out {
                        inc: wkey.0.inc,
                        session: wkey.1,
                        frames: out.iter().map(|o| o.frame().clone()).collect(),
                    };
                    let sent = wctx.publish(&wkey.0.node, &msg).await;
                    budget.give(bytes);
                    budget.answered(answers);
                    if !sent {
                        // Frames were lost: the connection must start over.
                        let msg = NodeMsg::Kick {
                            inc: wkey.0.inc,
                            session: wkey.1,
                            reason: "frames from the node owning the conversation could not be sent; reconnect and sync".into(),
                        };
                        wctx.publish(&wkey.0.node, &msg).await;
                        break;
                    }
                }
                _ = wkick.woken.notified() => {
                    forget(&wregistry, &wkey);
                    let msg = NodeMsg::Kick { inc: wkey.0.inc, session: wkey.1, reason: wkick.reason() };
                    wctx.publish(&wkey.0.node, &msg).await;
                    break;
                }
            }
        }
    });
    // The reader: frames in the order their numbers say.
    let mut expected = 1;
    let mut gap = None;
    // (A kick ends the writer, which tells the connection's node; its close ends this.)
    while let Some((n, frame)) = frames.recv().await {
        if n != expected {
            gap = Some(format!(
                "frame {n} of the connection came where frame {expected} was due: frames between the nodes were lost; reconnect and resend"
            ));
            break;
        }
        expected += 1;
        if !forward_frame(&ctx, session, frame).await {
            break;
        }
    }
    if let Some(reason) = gap {
        metrics::counter!(m::CLUSTER_KICKS).increment(1);
        let msg = NodeMsg::Kick {
            inc: key.0.inc,
            session: key.1,
            reason,
        };
        ctx.publish(&key.0.node, &msg).await;
    }
    registry
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&key);
    let _ = ctx.router.send(Command::Disconnect { session }).await;
    // The router lets go of the queue: the writer sends what is left and ends, unless NATS
    // takes none of it (reconnecting): then it is cut off, as a connection's writer is.
    let mut writer = writer;
    if tokio::time::timeout(Duration::from_secs(5), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

/// Hands one frame of a remote session to the router, as a connection does (reading the page
/// a `sync` needs); false if the router is gone.
async fn forward_frame(ctx: &Ctx, session: SessionId, frame: ClientFrame) -> bool {
    if !may_read(&frame) {
        return ctx
            .router
            .send(Command::Frame {
                session,
                frame,
                read: None,
            })
            .await
            .is_ok();
    }
    let (reply, rx) = oneshot::channel();
    let sent = ctx
        .router
        .send(Command::Frame {
            session,
            frame,
            read: Some(reply),
        })
        .await;
    if sent.is_err() {
        return false;
    }
    let Ok(Some(plan)) = rx.await else {
        return true;
    };
    let Some(store) = ctx.store.get() else {
        return false;
    };
    let (c, from, to, lim, budget) = (
        plan.conv.clone(),
        plan.from,
        plan.to,
        plan.limit,
        ctx.max_sync_bytes,
    );
    let page =
        // The store goes back with the blocking thread: its last reference is never let go of
        // on this worker.
        tokio::task::spawn_blocking(move || {
            let page = store.read_page(&c, from, to, lim, budget);
            drop(store);
            page
        })
        .await;
    match page {
        Ok(Ok(page)) => ctx
            .router
            .send(Command::PageRead {
                session,
                plan,
                messages: page.messages,
                first_seq: page.first_seq,
            })
            .await
            .is_ok(),
        _ => {
            if ctx
                .router
                .send(Command::ReadFailed { session })
                .await
                .is_err()
            {
                return false;
            }
            ctx.router
                .send(Command::Cluster(ClusterEvent::Say {
                    session,
                    frame: ServerFrame::error_about(
                        ErrorCode::Unavailable,
                        "history could not be read; retry the sync",
                        "sync",
                        Some(&plan.conv),
                    ),
                }))
                .await
                .is_ok()
        }
    }
}

/// The task that publishes what the router hands it (the router never waits on NATS), in
/// order; `queued` counts the bytes handed over and not published yet.
pub async fn publisher(
    nats: async_nats::Client,
    mut rx: mpsc::Receiver<(String, Vec<u8>)>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
) {
    while let Some((subject, bytes)) = rx.recv().await {
        let n = bytes.len();
        if let Err(e) = nats.publish(subject, bytes.into()).await {
            tracing::warn!(error = %e, "publishing to another node failed");
        }
        queued.fetch_sub(n, std::sync::atomic::Ordering::AcqRel);
    }
}
