//! The router task: the single owner of the [`Core`], and the bridge to the commit thread.
//!
//! Connections send it [`Command`]s over a bounded channel. It feeds them to the core (a client
//! frame through [`Core::on_frame`], which runs it through the session hub and the conversation
//! owner, the two halves the simulation drives apart), hands the
//! core's pending changes to the commit thread one batch at a time (while a batch is being
//! fsynced, new sends pile up into the next one: that is the group commit), and when a batch is
//! durable it carries out the core's actions: `accepted`, `msg`, `notify`, `receipt`, admin
//! replies. It never waits on a connection: a connection whose queue is full is dropped as too
//! slow and will resume from its cursor when it reconnects.
//!
//! Dedup keys the core cannot answer from memory ([`Action::Lookup`]) go to the lookup thread,
//! which asks the store for many at once and sends the answers back; at start it also lists
//! the dedup keys the store holds, page by page between lookups, for the core's filter.
//!
//! A store that cannot be reached ([`StoreError::Unreachable`]: a database server gone, or its
//! connection broken) is waited out: the commit thread tries the same batch again, with
//! backoff, until it goes through (the store has made sure the failed try took no effect), and
//! the lookup thread likewise its reads. Meanwhile the core refuses new messages with
//! `unavailable` and a time to retry after, and the senders of the batch in flight get their
//! `accepted` once it commits. Any other failed commit is fatal (fail-stop): every waiting
//! sender is told to retry, and the server stops with an error. After an I/O error the disk's
//! state is unknown; only a restart, which reloads from the store, knows again what is
//! durable.

use crate::metrics as m;
use axum::extract::ws::{Message as WsMessage, Utf8Bytes};
use foldhash::{HashMap, HashMapExt};
use ordo_core::owed::{self, Owed};
use ordo_core::{
    Action, AdminOp, AdminPost, AdminReply, AgeSweep, Batch, CommitOutcome, ConvState, Core,
    CoreConfig, CoreError, CoreStats, DedupRecord, Expired, Handled, MemberPage, MemberPageAsk,
    Posted, SessionId, SyncPlan, Ticket,
};
use ordo_protocol::{encode, ClientFrame, Encoded, Encoding, ErrorCode, Message, ServerFrame};
use ordo_store::{Store, StoreError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, Notify};

/// How a router reaches one connection.
#[derive(Clone)]
pub struct SessionHandle {
    pub tx: mpsc::Sender<Outbound>,
    /// Bytes queued for the connection and not yet written, against its budget.
    pub budget: Arc<Budget>,
    /// Woken when the router drops the connection (too slow, storage failed, or the core
    /// closed it).
    pub kick: Arc<Kick>,
}

/// A connection's outbound budget: about how many bytes of frames may wait for it at once
/// ([`ServerFrame::approx_len`]). A frame that would go past it means the peer is not reading
/// (or not fast enough): the connection is closed (1013) rather than allowed to grow the
/// server. A frame is always taken into an empty queue, however large.
///
/// It also paces the connection's reader (see `conn`): the sends read and not answered yet,
/// and a signal when the writer has written frames out.
pub struct Budget {
    used: std::sync::atomic::AtomicUsize,
    max: usize,
    unanswered: std::sync::atomic::AtomicUsize,
    /// Woken each time the writer has put frames on the socket.
    pub written: Notify,
}

impl SessionHandle {
    /// Whether pushes (`msg`, `notify`) may be queued: while the queue is at most half full, in
    /// frames and bytes. The other half is kept for answers (the connection's reader reads a
    /// frame only while the queue is under half full, and no more sends than a quarter of the
    /// queue go unanswered), so that an answer always finds room.
    fn push_room(&self) -> bool {
        self.tx.capacity() > self.tx.max_capacity() / 2 && !self.budget.over_half()
    }

    /// Queues `out` if it fits the connection's budget and queue.
    fn try_queue(&self, out: &Outbound) -> bool {
        let weight = out.weight();
        if !self.budget.try_take(weight) {
            return false;
        }
        match self.tx.try_send(out.clone()) {
            Ok(()) => true,
            Err(_) => {
                self.budget.give(weight);
                false
            }
        }
    }
}

impl Budget {
    pub fn new(max: usize) -> Self {
        Budget {
            used: 0.into(),
            max,
            unanswered: 0.into(),
            written: Notify::new(),
        }
    }

    /// Bytes taken (queued or being written).
    pub fn used(&self) -> usize {
        self.used.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether more than half the budget is taken.
    pub fn over_half(&self) -> bool {
        self.used.load(std::sync::atomic::Ordering::Acquire) > self.max / 2
    }

    /// A `send` was read and handed on: its answer is to come.
    pub fn send_read(&self) {
        self.unanswered
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// `n` answers to sends were written.
    pub fn answered(&self, n: usize) {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        let _ = self
            .unanswered
            .fetch_update(AcqRel, Acquire, |u| Some(u.saturating_sub(n)));
    }

    /// Sends read and not answered yet.
    pub fn unanswered(&self) -> usize {
        self.unanswered.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Takes `n` bytes of the budget, if there is room (or nothing is queued).
    pub fn try_take(&self, n: usize) -> bool {
        use std::sync::atomic::Ordering::AcqRel;
        self.used
            .fetch_update(AcqRel, std::sync::atomic::Ordering::Acquire, |used| {
                (used == 0 || used.saturating_add(n) <= self.max).then(|| used.saturating_add(n))
            })
            .is_ok()
    }

    /// Gives back `n` bytes taken before (the frame was written).
    pub fn give(&self, n: usize) {
        self.used.fetch_sub(n, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The router dropping a connection: the connection closes with code 1013 and this reason.
#[derive(Default)]
pub struct Kick {
    pub woken: Notify,
    reason: std::sync::Mutex<Option<String>>,
}

impl Kick {
    pub fn kick(&self, reason: &str) {
        if let Ok(mut r) = self.reason.lock() {
            r.get_or_insert_with(|| reason.to_string());
        }
        self.woken.notify_one();
    }

    /// Whether the router dropped the connection.
    pub fn kicked(&self) -> bool {
        self.reason.lock().map(|r| r.is_some()).unwrap_or(true)
    }

    /// Why the connection was dropped.
    pub fn reason(&self) -> String {
        self.reason
            .lock()
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or_else(|| "dropped by the server; reconnect and sync".to_string())
    }
}

/// What a connection's writer is handed: a frame, possibly shared with other connections (a
/// pushed `msg` goes to every member device). One pointer: the queue allocates its slots in
/// blocks up front, and an idle connection should not pay for a block of full-size frames.
#[derive(Clone)]
pub struct Outbound(Arc<SharedFrame>);

impl Outbound {
    pub fn new(frame: ServerFrame) -> Self {
        Outbound(Arc::new(SharedFrame::new(frame)))
    }

    /// What the frame counts against a connection's budget.
    pub fn weight(&self) -> usize {
        self.0.weight
    }

    /// Whether this is a pushed message (for the delivery counter).
    pub fn is_msg(&self) -> bool {
        matches!(self.0.frame, ServerFrame::Msg(_))
    }

    /// Whether this answers a `send` (`accepted` or `rejected`).
    pub fn is_answer(&self) -> bool {
        matches!(
            self.0.frame,
            ServerFrame::Accepted { .. } | ServerFrame::Rejected { .. }
        )
    }

    pub fn frame(&self) -> &ServerFrame {
        &self.0.frame
    }

    /// The frame as a WebSocket message in `enc`, encoded once per encoding, by the first
    /// connection that needs it (off the router task).
    pub fn message(&self, enc: Encoding) -> WsMessage {
        self.0.message(enc)
    }
}

/// A frame and its encodings, made when first needed.
struct SharedFrame {
    frame: ServerFrame,
    weight: usize,
    json: OnceLock<WsMessage>,
    msgpack: OnceLock<WsMessage>,
}

impl SharedFrame {
    fn new(frame: ServerFrame) -> Self {
        SharedFrame {
            weight: frame.approx_len(),
            frame,
            json: OnceLock::new(),
            msgpack: OnceLock::new(),
        }
    }

    fn message(&self, enc: Encoding) -> WsMessage {
        let slot = match enc {
            Encoding::Json => &self.json,
            Encoding::MsgPack => &self.msgpack,
        };
        slot.get_or_init(|| to_ws(encode(&self.frame, enc))).clone()
    }
}

pub enum Command {
    Connect {
        session: SessionId,
        user: String,
        device: String,
        handle: SessionHandle,
    },
    Disconnect {
        session: SessionId,
    },
    /// A decoded client frame. `read` is set only for the frames that may need a store read
    /// ([`ordo_core::may_read`]): it receives the page to read, or `None` once the frame is
    /// fully answered.
    Frame {
        session: SessionId,
        frame: ClientFrame,
        read: Option<oneshot::Sender<Option<SyncPlan>>>,
    },
    /// The page of a [`SyncPlan`] a connection was handed could not be read (it answered the
    /// `sync` with an error itself).
    ReadFailed {
        session: SessionId,
    },
    /// The page a connection read for a [`SyncPlan`] it was handed: answer the `sync` with it.
    PageRead {
        session: SessionId,
        plan: SyncPlan,
        messages: Vec<Message>,
        first_seq: u64,
    },
    Admin {
        op: AdminOp,
        reply: oneshot::Sender<Result<AdminReply, CoreError>>,
    },
    /// A message of the app's backend, answered once durable.
    Post {
        post: AdminPost,
        reply: oneshot::Sender<Result<Posted, CoreError>>,
    },
    /// A connection of another node of the cluster, served here as the owner of some of its
    /// conversations; `origin` is (its node, its session id there).
    ConnectRemote {
        session: SessionId,
        user: String,
        device: String,
        handle: SessionHandle,
        origin: (crate::cluster::wire::Peer, SessionId),
    },
    /// From the cluster's lease keeper or another node.
    Cluster(crate::cluster::route::ClusterEvent),
    /// Finish what is pending, then stop.
    Shutdown {
        done: oneshot::Sender<()>,
    },
}

/// What the commit thread reports.
enum Committed {
    /// The commit of batch `id` answered.
    Done {
        id: u64,
        result: Result<CommitOutcome, StoreError>,
    },
    /// The store cannot be reached (why); the batch is tried again.
    Retrying(String),
}

/// The first wait before a commit or a read is tried again on a store that cannot be reached;
/// it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// How long a server asked to stop waits for a store that cannot be reached before it stops
/// anyway, telling the senders still waiting to resend.
const SHUTDOWN_STORE_WAIT: Duration = Duration::from_secs(10);

/// A read the core asked for, done by the lookup thread.
enum Lookup {
    /// A dedup key: (lookup id, user, client message id).
    Key(u64, String, String),
    /// A conversation.
    Conv(String),
    /// A user's conversations, for an overview: (id, user).
    Member(u64, MemberPageAsk),
    /// A step of age retention.
    Sweep(AgeSweep),
    /// List the store's dedup keys for the filter again, from the start: rebuild number `n`.
    Rescan(u64),
}

/// What the lookup thread sends back.
enum Looked {
    /// Answers to lookups, by id.
    Found(Vec<(u64, Option<DedupRecord>)>),
    /// Conversations loaded.
    Loaded(Vec<(String, Option<ConvState>)>),
    /// A user's conversations: (id, them).
    Members(u64, MemberPage),
    /// The conversations of a retention step with messages past their age.
    Expired(Expired),
    /// A page of the dedup keys the store holds, for the filter; `done` on the last; `scan`
    /// is the rebuild it belongs to (0: the one at start).
    Scanned {
        entries: Vec<DedupRecord>,
        done: bool,
        scan: u64,
    },
    Failed(StoreError),
}

/// Dedup entries the lookup thread reads per page while it rebuilds the filter (between rounds
/// of lookups, which wait for it).
const SCAN_PAGE: usize = 4_096;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The router's per-message counters, looked up once (a registry lookup hashes the name).
struct Counters {
    accepted: metrics::Counter,
    dedup_hits: metrics::Counter,
    dedup_lookups: metrics::Counter,
    notifies: metrics::Counter,
    rejected: metrics::Counter,
    conv_loads: metrics::Counter,
}

impl Counters {
    fn new() -> Self {
        Counters {
            accepted: metrics::counter!(m::ACCEPTED),
            dedup_hits: metrics::counter!(m::DEDUP_HITS),
            dedup_lookups: metrics::counter!(m::DEDUP_LOOKUPS),
            notifies: metrics::counter!(m::NOTIFIES),
            rejected: metrics::counter!(m::REJECTED),
            conv_loads: metrics::counter!(m::CONV_LOADS),
        }
    }
}

pub struct Router {
    pub(crate) core: Core,
    pub(crate) sessions: HashMap<SessionId, SessionHandle>,
    admin: HashMap<Ticket, oneshot::Sender<Result<AdminReply, CoreError>>>,
    posts: HashMap<Ticket, oneshot::Sender<Result<Posted, CoreError>>>,
    /// Where offline members of a message are reported, if a webhook is set.
    webhook: Option<crate::webhook::WebhookSender>,
    /// The reply channels of frames waiting for a conversation to load, by connection (a
    /// connection sends no further frame until its waiting one is answered).
    pub(crate) replies: HashMap<SessionId, oneshot::Sender<Option<SyncPlan>>>,
    next_ticket: Ticket,
    writer: std::sync::mpsc::Sender<Batch>,
    committed: mpsc::UnboundedReceiver<Committed>,
    /// Lookups asked by the core since the last hand-over to the lookup thread.
    lookups: Vec<Lookup>,
    lookup_tx: std::sync::mpsc::Sender<Vec<Lookup>>,
    looked: mpsc::UnboundedReceiver<Looked>,
    /// When the filter's rebuild started, and how many keys it has read.
    scan: Option<(Instant, usize)>,
    last_now: u64,
    last_stats: CoreStats,
    counters: Counters,
    housekeeping: Duration,
    last_housekeeping: Instant,
    shutdown: Vec<oneshot::Sender<()>>,
    /// Set by a failed commit: the router stops and the server exits with this error.
    fatal: Option<StoreError>,
    /// When the batch now being committed was handed over.
    in_flight_since: Option<Instant>,
    /// Since when the store cannot be reached, while it cannot.
    store_down: Option<Instant>,
    /// When the first shutdown was asked for.
    stopping_since: Option<Instant>,
    /// Per connection, what its pushes that did not fit its queue are owed as (see
    /// [`Router::queue`] and [`ordo_core::owed`]), sent once the queue has room.
    pub(crate) owed: HashMap<SessionId, Owed>,
    /// On a cluster's node: what its router knows of the cluster (see `cluster::route`).
    pub(crate) cluster: Option<crate::cluster::route::ClusterState>,
}

/// Most frames one connection may be owed (notifies by conversation, receipts by conversation
/// and member); past it, the connection is dropped as too slow.
const MAX_OWED: usize = 4096;
/// How often owed frames are tried again while some are owed.
const OWED_RETRY: Duration = Duration::from_millis(50);

impl Router {
    /// Reports the offline members of messages to this webhook.
    pub fn set_webhook(&mut self, w: crate::webhook::WebhookSender) {
        self.webhook = Some(w);
    }

    /// Loads the core from the store and starts the commit thread.
    pub fn new(
        cfg: CoreConfig,
        store: Arc<dyn Store>,
        housekeeping: Duration,
    ) -> Result<Self, StoreError> {
        let snapshot = store.load()?;
        metrics::gauge!(m::STORE_UNREACHABLE).set(0.0);
        // Acceptance times never go back, even if the clock did across a restart: retention by
        // age relies on them growing along a conversation.
        let last_now = snapshot.last_ts;
        let core = Core::new(cfg, rand::random(), snapshot);
        let (writer, batches) = std::sync::mpsc::channel::<Batch>();
        let (done_tx, committed) = mpsc::unbounded_channel();
        let writer_store = store.clone();
        std::thread::Builder::new()
            .name("ordo-commit".into())
            .spawn(move || commit_thread(writer_store, batches, done_tx))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the commit thread: {e}")))?;
        let (lookup_tx, lookup_rx) = std::sync::mpsc::channel::<Vec<Lookup>>();
        let (looked_tx, looked) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("ordo-lookup".into())
            .spawn(move || lookup_thread(store, lookup_rx, looked_tx))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the lookup thread: {e}")))?;
        Ok(Router {
            core,
            sessions: HashMap::new(),
            admin: HashMap::new(),
            posts: HashMap::new(),
            webhook: None,
            replies: HashMap::new(),
            next_ticket: 1,
            writer,
            committed,
            lookups: Vec::new(),
            lookup_tx,
            looked,
            scan: Some((Instant::now(), 0)),
            last_now,
            last_stats: CoreStats::default(),
            counters: Counters::new(),
            housekeeping,
            last_housekeeping: Instant::now(),
            shutdown: Vec::new(),
            fatal: None,
            in_flight_since: None,
            store_down: None,
            stopping_since: None,
            owed: HashMap::new(),
            cluster: None,
        })
    }

    /// Makes this router a cluster's node's.
    pub fn set_cluster(&mut self, c: crate::cluster::route::ClusterState) {
        self.core.set_keep_overviews(false);
        self.cluster = Some(c);
    }

    /// Lists the store's dedup keys for the filter again (a cluster's node took a partition).
    pub(crate) fn rescan_dedup(&mut self) {
        let scan = match self.cluster.as_mut() {
            Some(c) => {
                c.scan += 1;
                c.scan
            }
            None => return,
        };
        self.scan = Some((Instant::now(), 0));
        self.lookups.push(Lookup::Rescan(scan));
    }

    fn now(&mut self) -> u64 {
        // Never let time go backwards inside the rules (dedup window, rate limit, ts order).
        self.last_now = self.last_now.max(now_ms());
        self.last_now
    }

    /// Runs until shutdown (after committing what is pending) or a storage failure.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Command>) -> Result<(), StoreError> {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry = tokio::time::interval(OWED_RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut open = true;
        loop {
            tokio::select! {
                biased;
                Some(c) = self.committed.recv() => self.on_committed(c),
                Some(l) = self.looked.recv() => self.on_looked(l),
                _ = tick.tick() => self.on_tick(),
                _ = retry.tick(), if !self.owed.is_empty() => self.send_owed(),
                cmd = rx.recv(), if open => match cmd {
                    Some(cmd) => {
                        self.handle(cmd);
                        // Take whatever else is queued before committing: a bigger batch.
                        for _ in 0..4096 {
                            match rx.try_recv() {
                                Ok(cmd) => self.handle(cmd),
                                Err(_) => break,
                            }
                        }
                    }
                    None => open = false,
                },
            }
            if let Some(e) = self.fatal.take() {
                for (_, h) in self.sessions.drain() {
                    h.kick
                        .kick("the server's store failed; reconnect once it is back");
                }
                return Err(e);
            }
            self.cluster_drain();
            self.record_stats();
            self.ask_lookups();
            self.start_commit();
            let stopping = !open || !self.shutdown.is_empty();
            if stopping && !self.core.has_pending() && !self.core.in_flight() {
                break;
            }
            if stopping && self.gave_up_on_the_store() {
                break;
            }
        }
        for done in self.shutdown.drain(..) {
            let _ = done.send(());
        }
        Ok(())
    }

    /// Asked to stop while the store cannot be reached: after [`SHUTDOWN_STORE_WAIT`], the
    /// senders still waiting are told to resend (their messages may yet be committed by the
    /// commit thread's try in progress; a resend is then answered from the store), and the
    /// router stops.
    fn gave_up_on_the_store(&mut self) -> bool {
        let since = *self.stopping_since.get_or_insert_with(Instant::now);
        if self.store_down.is_none() || since.elapsed() < SHUTDOWN_STORE_WAIT {
            return false;
        }
        tracing::warn!(
            "stopping while the store cannot be reached; waiting senders are told to resend"
        );
        let actions = self
            .core
            .abort_all("the server stopped while its store could not be reached");
        self.dispatch(actions);
        true
    }

    fn start_commit(&mut self) {
        if let Some(batch) = self.core.take_batch() {
            self.in_flight_since = Some(Instant::now());
            if self.writer.send(batch).is_err() {
                // The commit thread is gone: nothing can become durable any more.
                tracing::error!("commit thread stopped; failing pending sends");
                let actions = self.core.abort_all("commit thread stopped");
                self.dispatch(actions);
                self.fatal = Some(StoreError::Unavailable("the commit thread stopped".into()));
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        let now = self.now();
        match cmd {
            Command::Connect {
                session,
                user,
                device,
                handle,
            } => {
                self.core.connect(session, &user, &device);
                self.sessions.insert(session, handle);
                metrics::gauge!(m::CONNECTIONS).set(self.sessions.len() as f64);
                if self.cluster.is_some() {
                    self.cluster_connect(session, &user, &device);
                }
            }
            Command::ConnectRemote {
                session,
                user,
                device,
                handle,
                origin,
            } => {
                if self.cluster.is_none() {
                    return;
                }
                self.core.connect(session, &user, &device);
                self.sessions.insert(session, handle);
                self.cluster_remote(session, origin, &user);
            }
            Command::Cluster(e) => {
                if self.cluster.is_some() {
                    self.cluster_event(e, now);
                }
            }
            Command::Disconnect { session } => {
                if self.cluster.is_some() {
                    self.cluster_disconnect(session);
                }
                self.core.disconnect(session);
                self.replies.remove(&session);
                self.sessions.remove(&session);
                self.owed.remove(&session);
                metrics::gauge!(m::CONNECTIONS).set(self.sessions.len() as f64);
            }
            Command::Frame {
                session,
                frame,
                read,
            } if self.cluster.is_some() => self.cluster_frame(session, frame, read, now),
            Command::Frame {
                session,
                frame,
                read,
            } => self.on_frame(session, frame, read, now),
            Command::ReadFailed { session } => self.core.read_failed(session),
            Command::PageRead {
                session,
                plan,
                messages,
                first_seq,
            } => {
                let actions = self.core.serve_page(session, plan, messages, first_seq);
                self.dispatch(actions);
            }
            Command::Admin { op, reply } => {
                let here = match self.cluster.is_some() {
                    true => self.cluster_admin(op, reply, false),
                    false => Some((op, reply)),
                };
                if let Some((op, reply)) = here {
                    self.admin_here(op, reply, now);
                }
            }
            Command::Post { post, reply } => {
                let here = match self.cluster.is_some() {
                    true => self.cluster_post(post, reply, false),
                    false => Some((post, reply)),
                };
                if let Some((post, reply)) = here {
                    self.post_here(post, reply, now);
                }
            }
            Command::Shutdown { done } => self.shutdown.push(done),
        }
    }

    /// An admin request this node's core answers.
    pub(crate) fn admin_here(
        &mut self,
        op: AdminOp,
        reply: oneshot::Sender<Result<AdminReply, CoreError>>,
        now: u64,
    ) {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        match self.core.admin(ticket, op, now) {
            Ok(actions) => {
                self.admin.insert(ticket, reply);
                self.dispatch(actions);
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// A backend post this node's core takes.
    pub(crate) fn post_here(
        &mut self,
        post: AdminPost,
        reply: oneshot::Sender<Result<Posted, CoreError>>,
        now: u64,
    ) {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.posts.insert(ticket, reply);
        let actions = self.core.post(ticket, post, now);
        self.dispatch(actions);
    }

    pub(crate) fn on_frame(
        &mut self,
        session: SessionId,
        frame: ClientFrame,
        read: Option<oneshot::Sender<Option<SyncPlan>>>,
        now: u64,
    ) {
        match (self.core.on_frame(session, frame, now), read) {
            (Handled::Done(actions), read) => {
                self.dispatch(actions);
                if let Some(read) = read {
                    let _ = read.send(None);
                }
            }
            // The frame waits for a conversation to load: its reply goes out with the core's
            // `Action::Reply`.
            (Handled::Waits(actions), read) => {
                if let Some(read) = read {
                    self.replies.insert(session, read);
                }
                self.dispatch(actions);
            }
            // The connection reads the page off this task and sends it back as `PageRead`.
            (Handled::Read(plan), Some(read)) => {
                let _ = read.send(Some(plan));
            }
            // A frame the connection did not expect to need a read: nobody would serve it.
            (Handled::Read(plan), None) => {
                tracing::error!(
                    session,
                    conv = %plan.conv,
                    "a frame sent without a reply channel needs a store read"
                );
                self.send_to(
                    session,
                    ServerFrame::error_about(
                        ErrorCode::Internal,
                        "sync failed; retry",
                        "sync",
                        Some(&plan.conv),
                    ),
                );
            }
        }
    }

    /// Hands the lookups the core asked for to the lookup thread, all at once.
    fn ask_lookups(&mut self) {
        if self.lookups.is_empty() || self.fatal.is_some() {
            return;
        }
        let asked = std::mem::take(&mut self.lookups);
        if self.lookup_tx.send(asked).is_err() {
            self.fail(StoreError::Unavailable("the lookup thread stopped".into()));
        }
    }

    fn on_looked(&mut self, l: Looked) {
        match l {
            Looked::Found(answers) => {
                let now = self.now();
                for (id, found) in answers {
                    let actions = self.core.looked_up(id, found, now);
                    self.dispatch(actions);
                }
            }
            Looked::Loaded(convs) => {
                let now = self.now();
                for (id, state) in convs {
                    let actions = self.core.loaded(&id, state, now);
                    self.dispatch(actions);
                }
            }
            Looked::Members(id, page) => {
                let actions = self.core.member_convs_loaded(id, page);
                self.dispatch(actions);
            }
            Looked::Expired(mut expired) => {
                // A cluster's node trims only what it owns.
                if let Some(c) = &self.cluster {
                    expired.trims.retain(|(conv, _)| c.holds(conv));
                }
                self.core.expired(expired)
            }
            Looked::Scanned {
                entries,
                done,
                scan,
            } => {
                self.core.dedup_filter_add(&entries);
                if let Some((_, n)) = self.scan.as_mut() {
                    *n += entries.len();
                }
                // A rebuild started again since is what completes the filter.
                let current = self.cluster.as_ref().map_or(0, |c| c.scan);
                if done && scan == current {
                    self.core.dedup_filter_complete();
                    if let Some((started, n)) = self.scan.take() {
                        tracing::info!(
                            keys = n,
                            ms = started.elapsed().as_millis() as u64,
                            "dedup filter rebuilt from the store"
                        );
                    }
                }
            }
            Looked::Failed(e) => {
                tracing::error!(error = %e, "dedup lookup failed; stopping the server (restart it to reload from the store)");
                self.fail(e);
            }
        }
    }

    /// Storage failed: every waiting sender is told to retry, and the server stops.
    pub(crate) fn fail(&mut self, e: StoreError) {
        let actions = self.core.abort_all(&e.to_string());
        self.dispatch(actions);
        if self.fatal.is_none() {
            self.fatal = Some(e);
        }
    }

    fn on_committed(&mut self, c: Committed) {
        let (id, result) = match c {
            Committed::Done { id, result } => (id, result),
            Committed::Retrying(why) => {
                if self.store_down.is_none() {
                    tracing::warn!(error = %why, "the store cannot be reached; retrying the commit, and refusing new sends until it is back");
                    metrics::gauge!(m::STORE_UNREACHABLE).set(1.0);
                    self.store_down = Some(Instant::now());
                }
                // Clients are told only that much: the reason may name the database's address.
                self.core
                    .set_store_reachable(Err("the connection to it is lost".into()));
                return;
            }
        };
        if let Some(t) = self.in_flight_since.take() {
            metrics::histogram!(m::BATCH_SECONDS).record(t.elapsed().as_secs_f64());
        }
        if result.is_ok() {
            if let Some(since) = self.store_down.take() {
                tracing::warn!(
                    seconds = since.elapsed().as_secs_f64(),
                    "the store can be reached again; sends are taken again"
                );
                metrics::gauge!(m::STORE_UNREACHABLE).set(0.0);
                self.core.set_store_reachable(Ok(()));
            }
        }
        match result {
            Ok(outcome) => {
                let actions = self.core.commit_done(id, outcome);
                // The next batch goes to the store before this one's answers and pushes go
                // out: the commit thread works while the router sends them.
                self.start_commit();
                self.dispatch(actions);
            }
            Err(e) => {
                metrics::counter!(m::COMMIT_FAILURES).increment(1);
                tracing::error!(error = %e, "commit failed; stopping the server (restart it to reload from the store)");
                self.fail(e);
            }
        }
    }

    fn on_tick(&mut self) {
        metrics::gauge!(m::DEDUP_CACHED).set(self.core.dedup_cached() as f64);
        metrics::gauge!(m::CONVS_HELD).set(self.core.convs_held() as f64);
        let now = self.now();
        if self.last_housekeeping.elapsed() >= self.housekeeping {
            self.last_housekeeping = Instant::now();
            self.core.expire_dedup(now);
        }
        // The core starts a pass of retention every housekeeping interval, and steps through
        // it one slice of conversations per call.
        let actions = self.core.retention_tick(now);
        self.dispatch(actions);
        self.cluster_tick();
    }

    fn record_stats(&mut self) {
        let s = self.core.stats();
        let l = self.last_stats;
        if s == l {
            return;
        }
        let c = &self.counters;
        c.accepted.increment(s.accepted.saturating_sub(l.accepted));
        c.dedup_hits
            .increment(s.dedup_hits.saturating_sub(l.dedup_hits));
        c.dedup_lookups
            .increment(s.dedup_lookups.saturating_sub(l.dedup_lookups));
        c.notifies.increment(s.notified.saturating_sub(l.notified));
        c.conv_loads
            .increment(s.conv_loads.saturating_sub(l.conv_loads));
        self.last_stats = s;
    }

    fn dispatch(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send { session, frame } => self.send_to(session, frame),
                Action::Broadcast { sessions, frame } => self.broadcast(sessions, frame),
                Action::AdminDone { ticket, reply } => {
                    if let Some(tx) = self.admin.remove(&ticket) {
                        let _ = tx.send(reply);
                    }
                }
                Action::Offline { msg, epoch, users } => {
                    if let Some(w) = &self.webhook {
                        w.offer(&msg, epoch, users);
                    }
                }
                Action::Posted { ticket, reply } => {
                    if let Some(tx) = self.posts.remove(&ticket) {
                        let _ = tx.send(reply);
                    }
                }
                Action::Lookup { id, user, cmid } => self.lookups.push(Lookup::Key(id, user, cmid)),
                Action::Load { conv } => self.lookups.push(Lookup::Conv(conv)),
                Action::LoadMember { id, ask } => self.lookups.push(Lookup::Member(id, ask)),
                Action::Sweep(sweep) => self.lookups.push(Lookup::Sweep(sweep)),
                Action::Close { session, reason } => {
                    // The core has forgotten the connection already.
                    tracing::warn!(session, %reason, "closing a connection");
                    if let Some(h) = self.sessions.remove(&session) {
                        h.kick.kick(&reason);
                    }
                    self.replies.remove(&session);
                    metrics::gauge!(m::CONNECTIONS).set(self.sessions.len() as f64);
                }
                Action::Reply { session, plan } => {
                    if let Some(reply) = self.replies.remove(&session) {
                        let _ = reply.send(plan);
                    }
                }
            }
        }
    }

    /// Queues one shared copy of `frame` for every session.
    fn broadcast(&mut self, sessions: Vec<SessionId>, frame: ServerFrame) {
        let shared = Outbound::new(frame);
        for session in sessions {
            self.queue(session, shared.clone());
        }
    }

    pub(crate) fn send_to(&mut self, session: SessionId, frame: ServerFrame) {
        if let ServerFrame::Rejected { .. } = frame {
            self.counters.rejected.increment(1);
        }
        self.queue(session, Outbound::new(frame));
    }

    /// Queues a frame for a connection. A push (`msg`, `notify`, `receipt`) that does not fit
    /// the half of its queue pushes may use (see [`SessionHandle::push_room`]) is not a reason
    /// to drop a connection that reads: a large release (one commit with more for it than its
    /// queue holds) is paced instead. The push is left out (for a `msg` the core is told:
    /// nothing more of that conversation is pushed to it until it syncs) and the connection is
    /// owed what replaces it, a `notify` or the latest `receipt` ([`ordo_core::owed`]), sent once
    /// there is room; so are the later pushes of the same kind queued meanwhile. An answer that
    /// does not fit means the peer is not reading: it is dropped (1013).
    pub(crate) fn queue(&mut self, session: SessionId, out: Outbound) {
        let Some(h) = self.sessions.get(&session) else {
            return;
        };
        let frame = out.frame();
        let push = owed::is_push(frame);
        // Something owed of the same conversation goes first (no gap, no position going back).
        // (Nothing owed to anyone, the common case: no lookup on the path of every push.)
        let behind = push
            && !self.owed.is_empty()
            && self
                .owed
                .get(&session)
                .is_some_and(|owed| owed.holds_back(frame));
        let room = !push || (!behind && h.push_room());
        if room && h.try_queue(&out) {
            return;
        }
        if h.tx.is_closed() {
            return;
        }
        if !push {
            self.drop_slow(session);
            return;
        }
        if let ServerFrame::Msg(m) = frame {
            let (conv, seq) = (m.conv.clone(), m.seq);
            self.missed(session, &conv, seq);
        }
        let frame = out.frame();
        metrics::counter!(m::PUSHES_DEFERRED).increment(1);
        let owed = self.owed.entry(session).or_default();
        owed.owe(frame);
        if owed.len() > MAX_OWED {
            self.drop_slow(session);
        }
    }

    /// Queues the frames owed to connections, as many as now fit each.
    fn send_owed(&mut self) {
        let mut done = Vec::new();
        for (session, owed) in self.owed.iter_mut() {
            let Some(h) = self.sessions.get(session) else {
                done.push(*session);
                continue;
            };
            while h.push_room() {
                let Some(frame) = owed.take_first() else {
                    break;
                };
                let out = Outbound::new(frame);
                if !h.try_queue(&out) {
                    owed.put_back(out.frame());
                    break;
                }
            }
            if owed.is_empty() {
                done.push(*session);
            }
        }
        for session in done {
            self.owed.remove(&session);
        }
    }

    /// Drops a connection that does not read what it is sent fast enough (its queue or its
    /// byte budget is full): it closes with 1013 and resumes from its positions.
    fn drop_slow(&mut self, session: SessionId) {
        if let Some(h) = self.sessions.get(&session) {
            metrics::counter!(m::SLOW_CONSUMERS).increment(1);
            tracing::warn!(session, "connection too slow to keep up; dropping it");
            h.kick
                .kick("dropped: too slow to keep up; reconnect and sync");
        }
        self.core.disconnect(session);
        self.sessions.remove(&session);
        self.owed.remove(&session);
        // A frame waiting for a load is not answered now: its reader is let go.
        self.replies.remove(&session);
        metrics::gauge!(m::CONNECTIONS).set(self.sessions.len() as f64);
    }
}

/// A frame as a WebSocket message: text for JSON, binary for MessagePack.
fn to_ws(e: Encoded) -> WsMessage {
    match e {
        Encoded::Text(s) => WsMessage::Text(Utf8Bytes::from(s)),
        Encoded::Binary(b) => WsMessage::Binary(b.into()),
    }
}

fn commit_thread(
    store: Arc<dyn Store>,
    batches: std::sync::mpsc::Receiver<Batch>,
    done: mpsc::UnboundedSender<Committed>,
) {
    while let Ok(batch) = batches.recv() {
        let started = Instant::now();
        let (id, empty, messages) = (batch.id, batch.is_empty(), batch.messages.len());
        let batch = Arc::new(batch);
        let mut wait = RETRY_FIRST;
        let result = loop {
            match store.commit(batch.clone()) {
                // Nothing of it took effect (the store made sure): the same batch again.
                Err(StoreError::Unreachable(why)) => {
                    metrics::counter!(m::STORE_RETRIES).increment(1);
                    if done.send(Committed::Retrying(why)).is_err() {
                        return;
                    }
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(RETRY_MAX);
                }
                result => break result,
            }
        };
        let elapsed = started.elapsed();
        if !empty {
            metrics::counter!(m::COMMITS).increment(1);
            metrics::histogram!(m::COMMIT_MESSAGES).record(messages as f64);
            metrics::histogram!(m::COMMIT_SECONDS).record(elapsed.as_secs_f64());
        }
        if done.send(Committed::Done { id, result }).is_err() {
            break;
        }
    }
}

/// One round of the core's reads, sorted by kind; each kind is emptied once answered, so
/// that a round the store could not finish is taken up where it stopped.
#[derive(Default)]
struct Round {
    ids: Vec<u64>,
    keys: Vec<(String, String)>,
    convs: Vec<String>,
    members: Vec<(u64, MemberPageAsk)>,
    sweeps: Vec<AgeSweep>,
    /// The dedup keys are to be listed again from the start, as rebuild number this.
    rescan: Option<u64>,
}

impl Round {
    fn add(&mut self, l: Lookup) {
        match l {
            Lookup::Key(id, user, cmid) => {
                self.ids.push(id);
                self.keys.push((user, cmid));
            }
            Lookup::Conv(c) => self.convs.push(c),
            Lookup::Member(id, ask) => self.members.push((id, ask)),
            Lookup::Sweep(sweep) => self.sweeps.push(sweep),
            Lookup::Rescan(n) => self.rescan = Some(n),
        }
    }

    fn is_empty(&self) -> bool {
        self.keys.is_empty()
            && self.convs.is_empty()
            && self.members.is_empty()
            && self.sweeps.is_empty()
    }
}

/// Why a round of reads stopped.
enum Stopped {
    /// The store cannot be reached: the rest of the round is tried again.
    Unreachable(String),
    /// The store failed (reported to the router), or the router is gone.
    ForGood,
}

/// Answers what is left of a round: the dedup keys in one store call, the conversations in
/// another, each user's list in one each.
fn answer(
    store: &dyn Store,
    round: &mut Round,
    out: &mpsc::UnboundedSender<Looked>,
) -> Result<(), Stopped> {
    let failed = |e: StoreError| match e {
        StoreError::Unreachable(why) => Stopped::Unreachable(why),
        e => {
            let _ = out.send(Looked::Failed(e));
            Stopped::ForGood
        }
    };
    let gone = |_| Stopped::ForGood;
    if !round.convs.is_empty() {
        let loaded = store.load_convs(&round.convs).map_err(failed)?;
        let convs = std::mem::take(&mut round.convs);
        out.send(Looked::Loaded(convs.into_iter().zip(loaded).collect()))
            .map_err(gone)?;
    }
    if !round.keys.is_empty() {
        let found = store.dedup_lookup(&round.keys).map_err(failed)?;
        round.keys.clear();
        let ids = std::mem::take(&mut round.ids);
        out.send(Looked::Found(ids.into_iter().zip(found).collect()))
            .map_err(gone)?;
    }
    while let Some((id, ask)) = round.members.first() {
        let page = store.member_convs(ask).map_err(failed)?;
        out.send(Looked::Members(*id, page)).map_err(gone)?;
        round.members.remove(0);
    }
    while let Some(sweep) = round.sweeps.first() {
        let expired = store.expired(sweep).map_err(failed)?;
        out.send(Looked::Expired(expired)).map_err(gone)?;
        round.sweeps.remove(0);
    }
    Ok(())
}

/// Waits before a read is tried again on a store that cannot be reached (`wait` doubles, up to
/// [`RETRY_MAX`]); false if the router is gone meanwhile.
fn wait_for_store(why: &str, wait: &mut Duration, out: &mpsc::UnboundedSender<Looked>) -> bool {
    if *wait == RETRY_FIRST {
        tracing::warn!(error = %why, "the store cannot be reached; retrying reads until it is back");
    }
    metrics::counter!(m::STORE_RETRIES).increment(1);
    std::thread::sleep(*wait);
    *wait = (*wait * 2).min(RETRY_MAX);
    !out.is_closed()
}

/// The lookup thread: answers the core's dedup lookups and conversation loads, many per store
/// call, and meanwhile (lookups first: a send waits on each) lists the dedup keys the store
/// holds for the core's filter. A store that cannot be reached is waited out (the reads are
/// tried again); it stops at the first other store error, after reporting it.
fn lookup_thread(
    store: Arc<dyn Store>,
    asked: std::sync::mpsc::Receiver<Vec<Lookup>>,
    out: mpsc::UnboundedSender<Looked>,
) {
    use std::sync::mpsc::TryRecvError;
    let mut scan_from = None;
    let mut scanning = true;
    let mut scan = 0;
    let mut round = Round::default();
    let mut wait = RETRY_FIRST;
    loop {
        if !scanning && round.is_empty() {
            match asked.recv() {
                Ok(b) => b.into_iter().for_each(|l| round.add(l)),
                Err(_) => return,
            }
        }
        loop {
            match asked.try_recv() {
                Ok(b) => b.into_iter().for_each(|l| round.add(l)),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    if round.is_empty() {
                        return;
                    }
                    break;
                }
            }
        }
        if let Some(n) = round.rescan.take() {
            (scanning, scan_from, scan) = (true, None, n);
        }
        if !round.is_empty() {
            match answer(&*store, &mut round, &out) {
                Ok(()) => wait = RETRY_FIRST,
                Err(Stopped::Unreachable(why)) => {
                    if !wait_for_store(&why, &mut wait, &out) {
                        return;
                    }
                    continue;
                }
                Err(Stopped::ForGood) => return,
            }
        }
        // A page of the scan after every round of lookups, so that lookups (every send while the
        // filter is incomplete) cannot starve the rebuild that ends them.
        if !scanning {
            continue;
        }
        let sent = match store.dedup_scan(scan_from.clone(), SCAN_PAGE) {
            Ok(page) => {
                wait = RETRY_FIRST;
                scanning = page.next.is_some();
                scan_from = page.next;
                out.send(Looked::Scanned {
                    entries: page.entries,
                    done: !scanning,
                    scan,
                })
            }
            Err(StoreError::Unreachable(why)) => {
                if !wait_for_store(&why, &mut wait, &out) {
                    return;
                }
                Ok(())
            }
            Err(e) => {
                let _ = out.send(Looked::Failed(e));
                return;
            }
        };
        if sent.is_err() {
            return;
        }
    }
}
