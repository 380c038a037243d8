//! The router of a cluster's node: which frames its core takes, which go to other nodes, and
//! what it does when partitions move.
//!
//! A frame about a conversation goes to the core only if this node holds the lease of the
//! conversation's partition (and is not handing it over). Otherwise, for one of this node's
//! connections, it is forwarded to the node the lease table names, numbered in the
//! connection's stream to that node; with no live owner (the partition is moving), or for a
//! connection of another node (which forwarded it to the wrong owner), the connection is
//! closed and its client reconnects and resends. An `ack` is split by owner; `convs` and
//! `ping` are answered here.
//!
//! **Sender order across owners.** Each forwarded send is remembered until its answer comes
//! back. A send to a partition while the same connection has a send to that partition
//! unanswered at another node (its owner changed in between) closes the connection instead:
//! the client resends both, in order, to the new owner, and dedup answers the one the old
//! owner committed. A send unanswered for `forward_timeout` (its frame or its answer was lost)
//! closes the connection likewise.
//!
//! **Partitions moving** ([`ClusterEvent`], from the keeper): a partition taken is forgotten
//! first (whatever the core held of it is stale: another node owned it), and the dedup filter
//! is rebuilt from the store (the keys of sends its last owner accepted are not in it); one
//! handed over stops taking work, and the keeper is told once nothing touches it; one lost
//! with work on it stops the node (its commits would be refused: fail-stop).

use super::remote::{ANNOUNCE_EVERY, REQUEST_TIMEOUT};
use super::wire::{self, NodeMsg, OpenSession, Peer};
use crate::metrics as m;
use crate::router::{Outbound, Router};
use foldhash::{HashMap, HashMapExt};
use ordo_core::partition::partition_of;
use ordo_core::{AdminOp, AdminPost, AdminReply, CoreError, Posted, SessionId, SyncPlan};
use ordo_protocol::{direct_conv_id, ClientFrame, Position, ServerFrame};
use ordo_store::StoreError;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// What the keeper and the dispatcher tell the router.
pub enum ClusterEvent {
    /// This node took `part` at `epoch` (the store's fences hold it already).
    Gained { part: u32, epoch: u64 },
    /// Hand `part` over: take no more work for it, and say when nothing touches it.
    Release {
        part: u32,
        done: std::sync::mpsc::Sender<()>,
    },
    /// The handover of `part` did not finish in time: it stays this node's, at `epoch`.
    Keep { part: u32, epoch: u64 },
    /// This node lost `part` (the fences dropped it already).
    Lost { part: u32 },
    /// Each partition's live owner (`None` while it moves), and the live nodes.
    View {
        owners: Vec<Option<Arc<str>>>,
        live: Vec<Arc<str>>,
    },
    /// A message of another node for the router.
    Inbound(NodeMsg),
    /// This node's NATS connection broke or dropped messages (`why`): pushes and answers from
    /// other nodes may have been lost.
    NatsTrouble(String),
    /// An admin request another node forwarded here.
    AdminIn {
        op: AdminOp,
        reply: oneshot::Sender<Result<AdminReply, CoreError>>,
    },
    /// A backend post another node forwarded here.
    PostIn {
        post: AdminPost,
        reply: oneshot::Sender<Result<Posted, CoreError>>,
    },
    /// A frame for a session, from its remote session's task.
    Say {
        session: SessionId,
        frame: ServerFrame,
    },
}

/// Most bytes of messages to other nodes the router may have waiting for the publisher; past
/// it, a frame that cannot be forwarded closes its connection.
const PUBLISH_BYTES: usize = 64 << 20;

/// The publisher's queue: messages to other nodes, by subject, and their bytes not published
/// yet.
pub struct Outbox {
    pub tx: mpsc::Sender<(String, Vec<u8>)>,
    pub queued: Arc<std::sync::atomic::AtomicUsize>,
}

/// Where the answer to an admin request or a post goes.
type Reply<T> = oneshot::Sender<Result<T, CoreError>>;

/// Where a conversation's frames go.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Place {
    Here,
    Node(Arc<str>),
    /// No live owner: the partition is moving.
    Nowhere,
}

/// One of this node's connections, as forwarding knows it.
struct Local {
    user: String,
    device: String,
    /// The number of the last frame sent to each node.
    sent: HashMap<Arc<str>, u64>,
    /// Forwarded sends not answered yet, by client message id: (node, partition, when).
    unanswered: HashMap<String, (Arc<str>, u32, Instant)>,
    /// Forwarded `sync`s not answered yet, by conversation: when.
    syncs: std::collections::HashSet<String>,
    /// When a forwarded `sync` last went out to an empty set of them, or was last answered: the
    /// owner serves a connection's syncs one after the other, so an answer is progress for
    /// those still waiting.
    sync_progress: Instant,
}

/// Most forwarded `sync`s one connection may have unanswered (one per conversation); past it,
/// the connection is closed.
const MAX_SYNCS: usize = 16_384;

/// The router's cluster state.
pub struct ClusterState {
    node: Arc<str>,
    /// This process (its node id and incarnation), as other nodes know its connections.
    me: Peer,
    prefix: Arc<str>,
    partitions: u32,
    forward_timeout: Duration,
    /// Partitions held (and not being handed over), with their epochs.
    held: HashMap<u32, u64>,
    /// Partitions being handed over: the keeper waits on `done`.
    releasing: Vec<(u32, u64, std::sync::mpsc::Sender<()>)>,
    owners: Vec<Option<Arc<str>>>,
    live: Vec<Arc<str>>,
    out: Outbox,
    nats: async_nats::Client,
    locals: HashMap<SessionId, Local>,
    /// Remote sessions: (their node, its session id) to this core's session, and back (with
    /// the session's user).
    remotes: HashMap<(Peer, SessionId), SessionId>,
    remote_of: HashMap<SessionId, ((Peer, SessionId), String)>,
    last_announce: Instant,
    /// The dedup filter's rebuild now under way.
    pub scan: u64,
}

impl ClusterState {
    pub fn new(cfg: &super::ClusterConfig, nats: async_nats::Client, out: Outbox) -> Self {
        let node: Arc<str> = cfg.node_id.as_str().into();
        ClusterState {
            me: Peer {
                node: node.clone(),
                inc: rand::random(),
            },
            node,
            prefix: cfg.subject_prefix.as_str().into(),
            partitions: cfg.partitions,
            forward_timeout: cfg.forward_timeout,
            held: HashMap::new(),
            releasing: Vec::new(),
            owners: vec![None; cfg.partitions as usize],
            live: Vec::new(),
            out,
            nats,
            locals: HashMap::new(),
            remotes: HashMap::new(),
            remote_of: HashMap::new(),
            last_announce: Instant::now(),
            scan: 0,
        }
    }

    fn part(&self, conv: &str) -> u32 {
        partition_of(conv, self.partitions)
    }

    fn place(&self, conv: &str) -> Place {
        let part = self.part(conv);
        if self.held.contains_key(&part) {
            return Place::Here;
        }
        match self.owners.get(part as usize).cloned().flatten() {
            Some(n) if n != self.node => Place::Node(n),
            _ => Place::Nowhere,
        }
    }

    /// Whether this node's core may hold `conv` (it holds its partition's lease).
    pub fn holds(&self, conv: &str) -> bool {
        self.place(conv) == Place::Here
    }

    /// Hands a message to the publisher; false if its queue is full (in messages or bytes).
    fn publish(&self, to: &str, msg: &NodeMsg) -> bool {
        use std::sync::atomic::Ordering::AcqRel;
        let Ok(bytes) = wire::encode(msg) else {
            return false;
        };
        let n = bytes.len();
        let room = self
            .out
            .queued
            .fetch_update(AcqRel, std::sync::atomic::Ordering::Acquire, |q| {
                (q.saturating_add(n) <= PUBLISH_BYTES).then_some(q + n)
            })
            .is_ok();
        if !room {
            return false;
        }
        let sent = self
            .out
            .tx
            .try_send((wire::node_subject(&self.prefix, to), bytes))
            .is_ok();
        if !sent {
            self.out.queued.fetch_sub(n, AcqRel);
        }
        sent
    }

    fn others(&self) -> Vec<Arc<str>> {
        self.live
            .iter()
            .filter(|n| **n != self.node)
            .cloned()
            .collect()
    }

    /// Announces `sessions` of this node to `to`.
    fn announce(&self, to: &str, sessions: &[OpenSession]) {
        for chunk in sessions.chunks(1000) {
            self.publish(
                to,
                &NodeMsg::Open {
                    from: self.me.clone(),
                    sessions: chunk.to_vec(),
                },
            );
        }
    }

    fn all_sessions(&self) -> Vec<OpenSession> {
        self.locals
            .iter()
            .map(|(s, l)| OpenSession {
                session: *s,
                user: l.user.clone(),
                device: l.device.clone(),
            })
            .collect()
    }
}

/// Whether `f` answers a `sync`: its page, or an error about one.
fn answers_sync(f: &ServerFrame) -> bool {
    match f {
        ServerFrame::Synced { .. } => true,
        ServerFrame::Error { request, .. } => request.as_deref() == Some("sync"),
        _ => false,
    }
}

/// The conversation a send goes to.
fn send_conv(user: &str, conv: &Option<String>, to: &Option<String>) -> Option<String> {
    match (conv, to) {
        (Some(c), _) => Some(c.clone()),
        (None, Some(to)) => Some(direct_conv_id(user, to)),
        (None, None) => None,
    }
}

/// The conversation of an admin request.
fn admin_conv(op: &AdminOp) -> &str {
    match op {
        AdminOp::CreateGroup { id, .. }
        | AdminOp::UpdateGroup { id, .. }
        | AdminOp::Get { id }
        | AdminOp::DeleteGroup { id } => id,
    }
}

/// The conversation of a backend post, if it names one.
fn post_conv(post: &AdminPost) -> Option<String> {
    match (&post.conv, &post.to, &post.from) {
        (Some(c), _, _) => Some(c.clone()),
        (None, Some(to), Some(from)) => Some(direct_conv_id(from, to)),
        _ => None,
    }
}

/// Asks node `to` (over NATS request and reply) and decodes its answer.
async fn ask<T: serde::de::DeserializeOwned>(
    nats: async_nats::Client,
    subject: String,
    msg: NodeMsg,
) -> Result<T, CoreError> {
    let unavailable = |why: String| CoreError::Unavailable(why);
    let bytes = wire::encode(&msg).map_err(unavailable)?;
    let answer = tokio::time::timeout(REQUEST_TIMEOUT, nats.request(subject, bytes.into()))
        .await
        .map_err(|_| {
            unavailable("the node owning the conversation did not answer in time; retry".into())
        })?
        .map_err(|e| {
            unavailable(format!(
                "the node owning the conversation could not be asked ({e}); retry"
            ))
        })?;
    wire::decode::<T>(&answer.payload).map_err(|e| {
        unavailable(format!(
            "the answer of the node owning the conversation could not be read ({e})"
        ))
    })
}

fn remote_error(e: wire::WireError) -> CoreError {
    CoreError::Remote {
        code: e.code,
        message: e.message,
    }
}

impl Router {
    fn cluster(&self) -> &ClusterState {
        self.cluster
            .as_ref()
            .expect("only called on a cluster's node")
    }

    fn cluster_mut(&mut self) -> &mut ClusterState {
        self.cluster
            .as_mut()
            .expect("only called on a cluster's node")
    }

    /// One of this node's connections opened: the other nodes are told.
    pub(crate) fn cluster_connect(&mut self, session: SessionId, user: &str, device: &str) {
        let c = self.cluster_mut();
        c.locals.insert(
            session,
            Local {
                user: user.to_string(),
                device: device.to_string(),
                sent: HashMap::new(),
                unanswered: HashMap::new(),
                syncs: Default::default(),
                sync_progress: Instant::now(),
            },
        );
        let open = [OpenSession {
            session,
            user: user.to_string(),
            device: device.to_string(),
        }];
        for n in c.others() {
            c.announce(&n, &open);
        }
    }

    /// A session is gone: a connection of this node (the others are told), or a remote one.
    pub(crate) fn cluster_disconnect(&mut self, session: SessionId) {
        let c = self.cluster_mut();
        if c.locals.remove(&session).is_some() {
            let close = NodeMsg::Close {
                from: c.me.clone(),
                session,
            };
            for n in c.others() {
                c.publish(&n, &close);
            }
        }
        if let Some((key, _)) = c.remote_of.remove(&session) {
            // (The connection may have been announced again since: its new session stays.)
            if c.remotes.get(&key) == Some(&session) {
                c.remotes.remove(&key);
            }
        }
    }

    /// A remote session joined the core.
    pub(crate) fn cluster_remote(
        &mut self,
        session: SessionId,
        origin: (Peer, SessionId),
        user: &str,
    ) {
        let c = self.cluster_mut();
        c.remotes.insert(origin.clone(), session);
        c.remote_of.insert(session, (origin, user.to_string()));
    }

    /// Closes one of this node's connections (its client reconnects and resends in order).
    fn kick(&mut self, session: SessionId, reason: &str) {
        if let Some(h) = self.sessions.remove(&session) {
            metrics::counter!(m::CLUSTER_KICKS).increment(1);
            tracing::info!(session, reason, "closing a connection");
            h.kick.kick(reason);
        }
        self.core.disconnect(session);
        self.owed.remove(&session);
        self.replies.remove(&session);
    }

    /// Closes every connection of this node: pushes from other nodes may have been lost, and a
    /// client that reconnects asks for its overview and syncs what it is missing (a device
    /// that stayed connected would learn of a lost last message only with the next one).
    fn kick_all(&mut self, reason: &str) {
        let locals: Vec<SessionId> = self.cluster().locals.keys().copied().collect();
        if !locals.is_empty() {
            tracing::warn!(
                connections = locals.len(),
                reason,
                "closing this node's connections"
            );
        }
        for s in locals {
            self.kick(s, reason);
        }
    }

    /// A client frame on a cluster's node: see the module docs.
    pub(crate) fn cluster_frame(
        &mut self,
        session: SessionId,
        frame: ClientFrame,
        read: Option<oneshot::Sender<Option<SyncPlan>>>,
        now: u64,
    ) {
        let c = self.cluster();
        let remote = c.remote_of.contains_key(&session);
        let user = match (c.locals.get(&session), c.remote_of.get(&session)) {
            (Some(l), _) => l.user.clone(),
            (None, Some((_, user))) => user.clone(),
            // Gone meanwhile.
            (None, None) => return self.on_frame(session, frame, read, now),
        };
        let conv = match &frame {
            ClientFrame::Send { conv, to, .. } => send_conv(&user, conv, to),
            ClientFrame::Read { conv, .. } | ClientFrame::Sync { conv, .. } => Some(conv.clone()),
            ClientFrame::Ack { acks } if !remote => return self.split_ack(session, acks, now),
            _ => None,
        };
        let place = conv
            .as_deref()
            .map_or(Place::Here, |c| self.cluster().place(c));
        if remote {
            // Its node sent it here as the owner; another node owns it now.
            let all_here = match &frame {
                ClientFrame::Ack { acks } => acks.iter().all(|p| self.cluster().holds(&p.conv)),
                _ => place == Place::Here,
            };
            if all_here {
                return self.on_frame(session, frame, read, now);
            }
            if let Some(read) = read {
                let _ = read.send(None);
            }
            return self.kick(
                session,
                "the conversation moved to another node; reconnect and resend",
            );
        }
        let part = conv.as_deref().map(|c| self.cluster().part(c));
        let cmid = match &frame {
            ClientFrame::Send { cmid, .. } => Some(cmid.clone()),
            _ => None,
        };
        // A send to a partition whose sends of this connection are still unanswered at
        // another node: the two owners could order them the wrong way round.
        if let (Some(part), Some(_)) = (part, &cmid) {
            let me = self.cluster().node.clone();
            let target = match &place {
                Place::Node(n) => n.clone(),
                _ => me,
            };
            let split = self.cluster().locals.get(&session).is_some_and(|l| {
                l.unanswered
                    .values()
                    .any(|(n, p, _)| *p == part && *n != target)
            });
            if split {
                if let Some(read) = read {
                    let _ = read.send(None);
                }
                return self.kick(session, "the conversation moved between nodes while a send to it was unanswered; reconnect and resend");
            }
        }
        match place {
            Place::Here => self.on_frame(session, frame, read, now),
            Place::Nowhere => {
                if let Some(read) = read {
                    let _ = read.send(None);
                }
                self.kick(
                    session,
                    "the conversation is moving between nodes; reconnect and resend",
                )
            }
            Place::Node(node) => {
                if let Some(read) = read {
                    let _ = read.send(None);
                }
                self.forward(session, &node, frame, part.zip(cmid));
            }
        }
    }

    /// Forwards a frame of connection `session` to `node`; a send's (partition, client message
    /// id) is remembered until answered.
    fn forward(
        &mut self,
        session: SessionId,
        node: &Arc<str>,
        frame: ClientFrame,
        send: Option<(u32, String)>,
    ) {
        let c = self.cluster_mut();
        let from = c.me.clone();
        let Some(l) = c.locals.get_mut(&session) else {
            return;
        };
        if let ClientFrame::Sync { conv, .. } = &frame {
            if l.syncs.is_empty() {
                l.sync_progress = Instant::now();
            }
            l.syncs.insert(conv.clone());
            if l.syncs.len() > MAX_SYNCS {
                return self.kick(session, "too many syncs unanswered; reconnect");
            }
        }
        let n = l.sent.entry(node.clone()).or_insert(0);
        *n += 1;
        let msg = NodeMsg::Frame {
            from,
            session,
            n: *n,
            frame,
        };
        if let Some((part, cmid)) = send {
            l.unanswered
                .insert(cmid, (node.clone(), part, Instant::now()));
            metrics::counter!(m::CLUSTER_FORWARDED_SENDS).increment(1);
        }
        metrics::counter!(m::CLUSTER_FORWARDED).increment(1);
        if !c.publish(node, &msg) {
            self.kick(
                session,
                "this node could not forward the frame to the conversation's owner; reconnect and resend",
            );
        }
    }

    /// An `ack` of this node's connection: each owner gets its positions.
    fn split_ack(&mut self, session: SessionId, acks: &[Position], now: u64) {
        let mut here = Vec::new();
        let mut by_node: HashMap<Arc<str>, Vec<Position>> = HashMap::new();
        for p in acks {
            match self.cluster().place(&p.conv) {
                Place::Here => here.push(p.clone()),
                Place::Node(n) => by_node.entry(n).or_default().push(p.clone()),
                // Acked again with the next ack or sync.
                Place::Nowhere => {}
            }
        }
        if !here.is_empty() {
            self.on_frame(session, ClientFrame::Ack { acks: here }, None, now);
        }
        for (node, acks) in by_node {
            self.forward(session, &node, ClientFrame::Ack { acks }, None);
        }
    }

    /// A `msg` for `session` did not fit its queue: its owner (this core, or the node owning
    /// the conversation) pushes nothing more of it until the device syncs.
    pub(crate) fn missed(&mut self, session: SessionId, conv: &str, seq: u64) {
        if let Some(c) = self.cluster.as_ref() {
            if c.locals.contains_key(&session) {
                if let Place::Node(n) = c.place(conv) {
                    c.publish(
                        &n,
                        &NodeMsg::Missed {
                            from: c.me.clone(),
                            session,
                            conv: conv.to_string(),
                            seq,
                        },
                    );
                    return;
                }
            }
        }
        self.core.push_missed(session, conv, seq);
    }

    /// An admin request (`forwarded`: from another node, which must not forward it again):
    /// handed back if this node's core answers it.
    pub(crate) fn cluster_admin(
        &mut self,
        op: AdminOp,
        reply: Reply<AdminReply>,
        forwarded: bool,
    ) -> Option<(AdminOp, Reply<AdminReply>)> {
        let conv = Some(admin_conv(&op).to_string());
        self.place_request::<_, AdminReply>(conv, op, reply, forwarded, |op| NodeMsg::Admin { op })
    }

    /// A backend post (`forwarded`: from another node): handed back if this node's core takes
    /// it.
    pub(crate) fn cluster_post(
        &mut self,
        post: AdminPost,
        reply: Reply<Posted>,
        forwarded: bool,
    ) -> Option<(AdminPost, Reply<Posted>)> {
        let conv = post_conv(&post);
        self.place_request::<_, Posted>(conv, post, reply, forwarded, |post| NodeMsg::Post { post })
    }

    /// A request about `conv`: handed back for this node's core, asked of its owner (over NATS
    /// request and reply; never again by a node it was forwarded to), or refused while its
    /// partition moves.
    fn place_request<Q: Send + 'static, T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        conv: Option<String>,
        req: Q,
        reply: Reply<T>,
        forwarded: bool,
        wrap: fn(Q) -> NodeMsg,
    ) -> Option<(Q, Reply<T>)> {
        let c = self.cluster();
        match conv.map_or(Place::Here, |conv| c.place(&conv)) {
            Place::Here => Some((req, reply)),
            Place::Node(n) if !forwarded => {
                let (nats, subject) = (c.nats.clone(), wire::node_subject(&c.prefix, &n));
                tokio::spawn(async move {
                    let r = ask::<Result<T, wire::WireError>>(nats, subject, wrap(req)).await;
                    let _ = reply.send(r.and_then(|a| a.map_err(remote_error)));
                });
                None
            }
            _ => {
                let _ = reply.send(Err(CoreError::Unavailable(
                    "the conversation is moving between nodes; retry".into(),
                )));
                None
            }
        }
    }

    /// What the keeper or another node says.
    pub(crate) fn cluster_event(&mut self, e: ClusterEvent, now: u64) {
        match e {
            ClusterEvent::Gained { part, epoch } => {
                // This node's connections may have had sends refused by the last owner, to be
                // resent before any other: they reconnect and resend in order first.
                self.kick_all("conversations moved between nodes; reconnect and resend");
                let c = self.cluster_mut();
                let parts = c.partitions;
                c.held.insert(part, epoch);
                let of = move |conv: &str| partition_of(conv, parts) == part;
                if let Err(e) = self.core.forget_convs(&of) {
                    self.fail(StoreError::Fenced {
                        lease: format!("partition {part}"),
                        detail: format!("taken while this node's core still had work on it ({e}); restart the node"),
                    });
                    return;
                }
                // Sends its last owner accepted are not in the filter: rebuilt from the store.
                self.core.dedup_filter_incomplete();
                self.rescan_dedup();
            }
            ClusterEvent::Release { part, done } => {
                let c = self.cluster_mut();
                match c.held.remove(&part) {
                    Some(epoch) => c.releasing.push((part, epoch, done)),
                    None => {
                        let _ = done.send(());
                    }
                }
            }
            ClusterEvent::Keep { part, epoch } => {
                // Whether or not its drain finished meanwhile (the keeper no longer waited).
                let c = self.cluster_mut();
                c.releasing.retain(|r| r.0 != part);
                c.held.insert(part, epoch);
            }
            ClusterEvent::Lost { part } => {
                let c = self.cluster_mut();
                let parts = c.partitions;
                c.held.remove(&part);
                c.releasing.retain(|r| r.0 != part);
                let of = move |conv: &str| partition_of(conv, parts) == part;
                if self.core.forget_convs(&of).is_err() {
                    self.fail(StoreError::Fenced {
                        lease: format!("partition {part}"),
                        detail: "another node took it over while this node had work on it; the node stops, and its clients resend to the new owner".into(),
                    });
                }
            }
            ClusterEvent::View { owners, live } => {
                let c = self.cluster_mut();
                let new: Vec<Arc<str>> = live
                    .iter()
                    .filter(|n| **n != c.node && !c.live.contains(n))
                    .cloned()
                    .collect();
                let gone: Vec<Arc<str>> = c
                    .live
                    .iter()
                    .filter(|n| !live.contains(n))
                    .cloned()
                    .collect();
                // A partition its owner no longer holds: the sends a connection had refused
                // there (to be resent first, in order) are unknown to the next owner.
                let moved = c
                    .owners
                    .iter()
                    .zip(&owners)
                    .any(|(old, new)| old.is_some() && old != new);
                c.owners = owners;
                c.live = live;
                let all = c.all_sessions();
                for n in new {
                    c.announce(&n, &all);
                }
                if !gone.is_empty() {
                    // What a node that left committed may never have been pushed (it died
                    // first, or its pushes were still on their way): every connection here
                    // reconnects, and its client's overview shows it what it is missing.
                    self.kick_all(&format!(
                        "node {} left the cluster; reconnect and sync",
                        gone.join(", ")
                    ));
                } else if moved {
                    // Every connection reconnects and resends its pending messages in order:
                    // the next owner numbers them as sent.
                    self.kick_all("conversations moved between nodes; reconnect and resend");
                }
            }
            ClusterEvent::NatsTrouble(why) => {
                let reason = format!(
                    "this node's link to the other nodes was interrupted ({why}); reconnect and sync"
                );
                self.kick_all(&reason);
                // Frames of other nodes' connections may have been lost too: their nodes are
                // told to close them.
                let remotes: Vec<SessionId> = self.cluster().remote_of.keys().copied().collect();
                for s in remotes {
                    self.kick(s, &reason);
                }
            }
            ClusterEvent::Inbound(msg) => self.inbound(msg),
            ClusterEvent::AdminIn { op, reply } => {
                if let Some((op, reply)) = self.cluster_admin(op, reply, true) {
                    self.admin_here(op, reply, now);
                }
            }
            ClusterEvent::PostIn { post, reply } => {
                if let Some((post, reply)) = self.cluster_post(post, reply, true) {
                    self.post_here(post, reply, now);
                }
            }
            ClusterEvent::Say { session, frame } => self.send_to(session, frame),
        }
    }

    fn inbound(&mut self, msg: NodeMsg) {
        match msg {
            // For a connection of another process of this node (one before a restart): dropped.
            NodeMsg::Out { inc, .. } | NodeMsg::Kick { inc, .. }
                if inc != self.cluster().me.inc => {}
            NodeMsg::Out {
                session, frames, ..
            } => {
                let Some(l) = self.cluster_mut().locals.get_mut(&session) else {
                    return;
                };
                for f in &frames {
                    match f {
                        ServerFrame::Accepted { cmid, .. } | ServerFrame::Rejected { cmid, .. } => {
                            if let Some((_, _, at)) = l.unanswered.remove(&**cmid) {
                                metrics::histogram!(m::CLUSTER_FORWARD_SECONDS)
                                    .record(at.elapsed().as_secs_f64());
                            }
                        }
                        // A sync's answer (an error about another request does not count).
                        ServerFrame::Synced { conv, .. }
                        | ServerFrame::Error {
                            conv: Some(conv),
                            request: Some(_),
                            ..
                        } if answers_sync(f) && l.syncs.remove(conv.as_str()) => {
                            l.sync_progress = Instant::now();
                        }
                        _ => {}
                    }
                }
                for f in frames {
                    self.queue(session, Outbound::new(f));
                }
            }
            NodeMsg::Kick {
                session, reason, ..
            } if self.cluster().locals.contains_key(&session) => {
                self.kick(session, &reason);
            }
            NodeMsg::Missed {
                from,
                session,
                conv,
                seq,
            } => {
                if let Some(s) = self.cluster().remotes.get(&(from, session)).copied() {
                    self.core.push_missed(s, &conv, seq);
                }
            }
            // Handled by the dispatcher.
            _ => {}
        }
    }

    /// Every round: partitions drained are reported to the keeper.
    pub(crate) fn cluster_drain(&mut self) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        if c.releasing.is_empty() {
            return;
        }
        let parts = c.partitions;
        let mut releasing = std::mem::take(&mut c.releasing);
        let mut kept = Vec::new();
        releasing.retain(|(part, epoch, done)| {
            let part = *part;
            let of = move |conv: &str| partition_of(conv, parts) == part;
            if self.core.forget_convs(&of).is_err() {
                return true;
            }
            // The keeper gave up waiting: the partition stays this node's (it sends `Keep`).
            if done.send(()).is_err() {
                kept.push((part, *epoch));
            }
            false
        });
        let c = self.cluster_mut();
        c.releasing = releasing;
        c.held.extend(kept);
    }

    /// Every second: unanswered forwarded sends past their time close their connections, and
    /// connections are announced again.
    pub(crate) fn cluster_tick(&mut self) {
        let Some(c) = self.cluster.as_ref() else {
            return;
        };
        let late: Vec<SessionId> = c
            .locals
            .iter()
            .filter(|(_, l)| {
                let late = |at: &Instant| at.elapsed() > c.forward_timeout;
                l.unanswered.values().any(|(_, _, at)| late(at))
                    || (!l.syncs.is_empty() && late(&l.sync_progress))
            })
            .map(|(s, _)| *s)
            .collect();
        for s in late {
            self.kick(
                s,
                "a frame forwarded to the conversation's owner went unanswered; reconnect and resend",
            );
        }
        let c = self.cluster_mut();
        if c.last_announce.elapsed() >= ANNOUNCE_EVERY {
            c.last_announce = Instant::now();
            let all = c.all_sessions();
            for n in c.others() {
                c.announce(&n, &all);
            }
        }
    }
}
