//! The conversation owner, one half of the core: sequencing, dedup, membership, cursors,
//! retention and group commit, for the conversations it holds (see [`crate::loading`]).
//!
//! It hears from connections only through the session hub, as [`Request`]s carrying their
//! [`Origin`], and answers with [`ToHub`] events in the order they are due; what the driver must
//! do (store reads, admin answers) comes out beside them as [`Action`]s, in the same [`Out`]
//! stream. See [`crate::seam`].
//!
//! Group commit lives here as a rule, not as I/O: every change joins the *pending* set; the
//! caller takes it as a [`Batch`] whenever no batch is in flight, makes it durable, and reports
//! back with [`Owner::commit_done`]. Only then are the answers to that batch released:
//! `accepted` to senders, messages to deliver, receipts, admin replies. So no client ever sees a
//! seq that a crash could take back.

use crate::config::CoreConfig;
use crate::conv::{Conv, Cursor};
use crate::dedup::{DedupCache, DedupFilter, FilterKey};
use crate::engine::{Action, AdminOp, CoreStats, SessionId, SyncPlan, Ticket};
use crate::error::CoreError;
use crate::held_back::{Gate, Held};
use crate::line::{Line, LookedUp, LookupState, Parked};
use crate::loading::{Loads, Waiting};
use crate::model::*;
use crate::posting::{posted, PostJob, Posted};
use crate::rng::SplitMix64;
use crate::seam::{Accepted, Delivery, Origin, Request, SendCmd, ToHub};
use foldhash::{HashMap, HashMapExt};
use ordo_protocol::{
    validate_id, ConvEvent, ConvKind, ErrorCode, IdKind, Message, ServerFrame, DIRECT_PREFIX,
};
use std::collections::BTreeSet;
use std::mem::take;
use std::sync::Arc;

/// Most sends one connection may have waiting for a dedup lookup (and behind one), and most
/// bytes of them; past either, a send is refused as unavailable, to be resent shortly.
const MAX_PARKED: usize = 1024;
const MAX_PARKED_BYTES: usize = 1 << 20;
/// How long a client is asked to wait before resending a send refused for that.
const PARKED_RETRY_MS: u64 = 100;

/// One step of the owner's output, in the order it is due.
#[derive(Clone, Debug)]
pub enum Out {
    /// For the driver: a store read, an admin answer, a held reply.
    Io(Action),
    /// For the session hub.
    Hub(ToHub),
}

/// What the owner made of a request.
#[derive(Debug)]
pub enum Answer {
    /// Handled; carry these out.
    Done(Vec<Out>),
    /// A `sync`: read this page from the store and hand it to [`Owner::serve_page`].
    Read(SyncPlan),
    /// It waits for a conversation to be loaded; carry these out (the load) meanwhile.
    Waits(Vec<Out>),
}

/// Who waits for which seq to become durable, to be told `accepted`.
type Waiter = Accepted;

/// Changes not yet handed out in a batch, plus the answers that wait on them.
#[derive(Default)]
pub(crate) struct Pending {
    pub(crate) messages: Vec<Arc<StoredMessage>>,
    /// Conversations with new messages.
    pub(crate) convs: BTreeSet<String>,
    /// Conversations created or changed by an admin request: their whole record is written.
    records: BTreeSet<String>,
    dedup_forget_before_ms: Option<u64>,
    cursors: BTreeSet<(String, String, String)>,
    trim_before_ms: Vec<(String, u64)>,
    waiters: Vec<Waiter>,
    admin: Vec<(Ticket, String)>,
    /// Backend posts, answered once this batch is durable.
    pub(crate) posts: Vec<(Ticket, Posted)>,
    /// Deleted groups: every message goes.
    purge: BTreeSet<String>,
    receipts: BTreeSet<(String, String)>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.messages.is_empty()
            && self.convs.is_empty()
            && self.records.is_empty()
            && self.dedup_forget_before_ms.is_none()
            && self.cursors.is_empty()
            && self.trim_before_ms.is_empty()
            && self.waiters.is_empty()
            && self.admin.is_empty()
            && self.posts.is_empty()
            && self.purge.is_empty()
            && self.receipts.is_empty()
    }
}

/// A pass of age-based retention over the stored conversations.
#[derive(Default)]
struct Sweep {
    /// When the current (or last) pass started.
    pass_started_ms: Option<u64>,
    /// The last conversation the pass covered, while it is under way.
    after: Option<String>,
    /// A step was asked of the store and not answered yet.
    asked: bool,
}

/// A batch handed out and not yet reported back.
pub(crate) struct InFlight {
    id: u64,
    messages: Vec<Arc<StoredMessage>>,
    /// The conversation records exactly as this batch writes them.
    convs: Vec<ConvRecord>,
    positions: Vec<ConvPosition>,
    cursors: Vec<CursorRecord>,
    waiters: Vec<Waiter>,
    admin: Vec<(Ticket, String)>,
    posts: Vec<(Ticket, Posted)>,
    receipts: BTreeSet<(String, String)>,
}

pub struct Owner {
    pub(crate) cfg: CoreConfig,
    pub(crate) rng: SplitMix64,
    /// The conversations in use (hot); the store holds them all. See [`crate::loading`].
    pub(crate) convs: HashMap<String, Conv>,
    /// Conversations being loaded and what waits for them; evictions; overviews being listed.
    pub(crate) loads: Loads,
    /// The most recent (user, cmid) -> what it was accepted as; the store holds the rest.
    pub(crate) dedup: DedupCache,
    /// Every dedup key of the window, roughly: which keys are certainly new.
    pub(crate) filter: DedupFilter,
    /// Lookups asked and not answered yet, by id: whose send waits for each.
    lookups: HashMap<u64, SessionId>,
    /// Per connection, the sends waiting for the store and those behind them.
    pub(crate) lines: HashMap<SessionId, Line>,
    /// Per connection, the sends refused because too many were waiting, held back so that no
    /// later send of the connection into their conversation overtakes their resend.
    gates: HashMap<SessionId, Gate>,
    /// Bytes of sends waiting in every line together.
    parked_total: usize,
    pub(crate) next_lookup: u64,
    /// Backend posts whose key the store is asked about, by lookup id, with the cache's mark.
    pub(crate) post_lookups: HashMap<u64, (PostJob, u64)>,
    /// Per connection, the conversation of a `sync` whose page is being read (one at a time):
    /// held in memory until the page is served.
    pub(crate) reading: HashMap<SessionId, String>,
    /// Whether an overview keeps the conversations it read (see [`Owner::set_keep_overviews`]).
    pub(crate) keep_overviews: bool,
    /// No dedup entry the store holds (and has not been told to forget) was accepted before
    /// this; `None` if it holds none.
    pub(crate) dedup_stored_since: Option<u64>,
    /// The newest acceptance time given out (or stored, at start).
    pub(crate) newest_ts: u64,
    pub(crate) pending: Pending,
    pub(crate) in_flight: Option<InFlight>,
    /// Emptied lists of the last batch, reused by the next one: growing them again from nothing
    /// for every batch costs a trail of ever larger allocations.
    spare_messages: Vec<Arc<StoredMessage>>,
    spare_waiters: Vec<Waiter>,
    pub(crate) next_batch: u64,
    /// Where age-based retention stands.
    sweep: Sweep,
    pub(crate) stats: CoreStats,
    /// Why the store cannot be reached, while it cannot (see [`Owner::set_store_reachable`]).
    pub(crate) store_down: Option<String>,
    /// Test-only: safeguards switched off by the simulation (all on unless it says so).
    #[cfg(feature = "fault-injection")]
    faults: crate::fault::Faults,
}

/// How long a send refused while the store cannot be reached is told to wait before it is
/// resent.
pub const STORE_DOWN_RETRY_MS: u64 = 1000;

/// Why a send cannot be handled yet.
enum Wait {
    /// Its key must be looked up in the store.
    Lookup,
    /// Its conversation must be loaded; what the store answered for its key, if it was looked
    /// up, goes with it.
    Load(String, Option<LookedUp>),
}

impl Owner {
    /// Starts the rules over what the store holds: no conversation is loaded until it is used
    /// ([`Action::Load`]). `seed` feeds the generator of epochs and the dedup filter's hash:
    /// random in production, fixed in a simulation. The dedup filter starts empty: the caller
    /// adds the keys the store holds with [`dedup_filter_add`](Self::dedup_filter_add) and then
    /// calls [`dedup_filter_complete`](Self::dedup_filter_complete); meanwhile every send the
    /// cache cannot answer is looked up.
    pub fn new(cfg: CoreConfig, seed: u64, snapshot: Snapshot) -> Self {
        let filter = DedupFilter::new(cfg.dedup_filter_bytes, cfg.dedup_window_ms, seed);
        Owner {
            cfg,
            rng: SplitMix64::new(seed),
            convs: HashMap::new(),
            loads: Loads::default(),
            dedup: DedupCache::default(),
            filter,
            lookups: HashMap::new(),
            lines: HashMap::new(),
            gates: HashMap::new(),
            parked_total: 0,
            next_lookup: 1,
            post_lookups: HashMap::new(),
            reading: HashMap::new(),
            keep_overviews: true,
            // A store with entries may hold them from any time.
            dedup_stored_since: (snapshot.last_ts > 0).then_some(0),
            newest_ts: snapshot.last_ts,
            pending: Pending::default(),
            in_flight: None,
            spare_messages: Vec::new(),
            spare_waiters: Vec::new(),
            next_batch: 1,
            sweep: Sweep::default(),
            stats: CoreStats::default(),
            store_down: None,
            #[cfg(feature = "fault-injection")]
            faults: crate::fault::Faults::default(),
        }
    }

    /// Whether the store can be reached: `Err(why)` once a commit failed because it cannot be
    /// (the batch waits and is tried again), `Ok` once a commit went through again. Meanwhile
    /// a new message is refused with `unavailable` and a `retry_after_ms` (and held back, so
    /// that its resend keeps the connection's order: see [`Owner::send`]), a new backend post
    /// likewise; resends of durable messages are still answered, and sends already taken wait
    /// for the batch they are in.
    pub fn set_store_reachable(&mut self, reachable: Result<(), String>) {
        self.store_down = reachable.err();
    }

    /// Test-only: switches off the safeguards `faults` names, so that the simulation can show
    /// it catches the resulting bugs. Only with the `fault-injection` feature.
    #[cfg(feature = "fault-injection")]
    pub fn set_faults(&mut self, faults: crate::fault::Faults) {
        self.faults = faults;
    }

    pub fn stats(&self) -> CoreStats {
        self.stats
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    /// A connection is gone: its waiting sends, frames and overviews are forgotten.
    pub fn gone(&mut self, session: SessionId) {
        self.forget_waiting(session);
        self.reading.remove(&session);
        self.gates.remove(&session);
        if let Some(line) = self.lines.remove(&session) {
            self.parked_total = self.parked_total.saturating_sub(line.bytes);
        }
    }

    /// Handles one request of a connection.
    pub fn handle(&mut self, origin: &Origin, req: Request, now_ms: u64) -> Answer {
        // A request about one conversation the owner does not hold waits for it to be loaded.
        if let Request::Sync { conv, .. } | Request::Read { conv, .. } = &req {
            if validate_id(IdKind::Conversation, conv).is_ok() && self.is_cold(conv) {
                let conv = conv.clone();
                return self.park_request(origin, &conv, req, now_ms);
            }
        }
        let outs = match req {
            Request::Send(cmd) => self.send(origin, cmd, now_ms),
            Request::Ack(acks) => {
                // Every valid position is applied even if another in the same frame is not;
                // those of conversations to be loaded first wait.
                let mut out = Vec::new();
                let acks = self.park_cold_acks(origin, acks, now_ms, &mut out);
                out.extend(acks.iter().filter_map(|p| {
                    let e = self.ack(origin, &p.conv, p.seq).err()?;
                    Some(error(origin.session, &e, "ack", Some(&p.conv)))
                }));
                out
            }
            Request::Read { conv, seq } => match self.read(origin, &conv, seq) {
                Ok(()) => Vec::new(),
                Err(e) => vec![error(origin.session, &e, "read", Some(&conv))],
            },
            Request::Sync { conv, after, limit } => match self.sync(origin, &conv, after, limit) {
                Ok(plan) => return Answer::Read(plan),
                Err(e) => vec![error(origin.session, &e, "sync", Some(&conv))],
            },
            Request::Overview { after, limit } => self.ask_overview(origin, after, limit),
        };
        Answer::Done(outs)
    }

    // ----- sending -----

    /// A `send` the hub admitted. A duplicate of a durable message or a refusal is answered at
    /// once; a new message is answered at commit. A send whose client message id must be
    /// looked up in the store asks for it ([`Action::Lookup`]) and waits, and the connection's
    /// later sends wait behind it, in order.
    pub fn send(&mut self, origin: &Origin, cmd: SendCmd, now_ms: u64) -> Vec<Out> {
        // The gate keeps the order of the sends the hub let through; those it holds back for
        // rate keep theirs in the hub's gate (one that passed through both in a row must not be
        // queued in both, or the two queues could ask for different orders).
        // A resend the dedup cache answers is not held back either: it is answered (and the
        // client, answered, would never resend it to clear a place in the gate).
        let window = self.cfg.dedup_window_ms;
        let answered = || {
            self.dedup
                .get(&origin.user, &cmd.cmid)
                .is_some_and(|d| now_ms < d.ts.saturating_add(window))
        };
        let gated = cmd.verdict.is_ok() && self.gates.contains_key(&origin.session) && !answered();
        let gate = match gated {
            true => self.gates.get_mut(&origin.session),
            false => None,
        };
        if let Some(gate) = gate {
            let held = gate.check(&cmd.conv, &cmd.cmid, now_ms);
            if held.is_ok() {
                gate.went(&cmd.conv, &cmd.cmid);
            }
            if gate.is_empty() {
                self.gates.remove(&origin.session);
            }
            if let Err(held) = held {
                let what = match held {
                    Held::Behind(earlier) => format!(
                        "message {earlier:?} of this conversation was refused while the server was busy and must be resent first, to keep your messages in order"
                    ),
                    Held::Full => {
                        // The order can no longer be kept on this connection.
                        let e = CoreError::HeldBackFull {
                            max: crate::held_back::MAX_HELD_CONVS,
                        };
                        return vec![
                            refused(origin.session, cmd.conv, cmd.cmid, e, true),
                            close(origin.session),
                        ];
                    }
                };
                let e = CoreError::Busy {
                    what,
                    retry_after_ms: PARKED_RETRY_MS,
                };
                // Only sends the hub let through (took a token for) are gated here.
                return vec![refused(origin.session, cmd.conv, cmd.cmid, e, true)];
            }
        }
        if cmd.verdict.is_ok() && !answered() {
            if let Some(why) = &self.store_down {
                let what = format!("its store cannot be reached ({why})");
                return self.busy(origin.session, cmd, what, STORE_DOWN_RETRY_MS, now_ms);
            }
        }
        match self.lines.get(&origin.session) {
            Some(l) if !l.parked.is_empty() => self.park_behind(origin, cmd, now_ms),
            _ => self.send_now(origin, cmd, None, now_ms),
        }
    }

    /// Handles a send whose turn it is, with what the store answered for its key if it was
    /// looked up.
    fn send_now(
        &mut self,
        origin: &Origin,
        mut cmd: SendCmd,
        looked_up: Option<LookedUp>,
        now_ms: u64,
    ) -> Vec<Out> {
        match self.try_send(origin, &mut cmd, looked_up, now_ms) {
            Ok(Ok(outs)) => outs,
            Ok(Err(Wait::Lookup)) => self.park_first(origin, cmd, None, now_ms),
            Ok(Err(Wait::Load(conv, answer))) => {
                self.park_first(origin, cmd, Some((conv, answer)), now_ms)
            }
            // Only a stored message takes the request's id and body; a refused one still has them.
            Err(e) => {
                // The client does not resend a send refused for good.
                if !e.code().retryable() {
                    self.forget_held(origin.session, &cmd.conv, &cmd.cmid);
                }
                let admitted = cmd.verdict.is_ok();
                vec![refused(origin.session, cmd.conv, cmd.cmid, e, admitted)]
            }
        }
    }

    /// Tries a send; `Ok(Err(_))` if it must wait for the store first (nothing has changed
    /// then).
    fn try_send(
        &mut self,
        origin: &Origin,
        cmd: &mut SendCmd,
        looked_up: Option<LookedUp>,
        now_ms: u64,
    ) -> Result<Result<Vec<Out>, Wait>, CoreError> {
        let session = origin.session;
        let user = &origin.user;
        let conv_id: &str = &cmd.conv.clone();
        let cmid: &str = &cmd.cmid;

        // A resend inside the dedup window gets the original answer, wherever it is.
        let window = self.cfg.dedup_window_ms;
        let fkey = self.filter.key(user, cmid);
        let known = self
            .dedup
            .get(user, cmid)
            .filter(|d| now_ms < d.ts.saturating_add(window));
        // Test-only sabotage: forget every earlier send.
        #[cfg(feature = "fault-injection")]
        let (known, looked_up) = match self.faults.no_dedup {
            true => (None, Some((None, self.dedup.mark()))),
            false => (known, looked_up),
        };
        if let Some(d) = known {
            if *d.conv != *conv_id {
                return Err(reused(cmid, &d.conv));
            }
            self.stats.dedup_hits += 1;
            // A conversation the owner does not hold has nothing uncommitted.
            let durable = self
                .convs
                .get(&*d.conv)
                .is_none_or(|c| c.durable_seq >= d.seq);
            let waiter = Waiter {
                session,
                cmid: Arc::from(cmid),
                conv: d.conv.clone(),
                seq: d.seq,
                ts: d.ts,
                duplicate: true,
                admitted: cmd.verdict.is_ok(),
            };
            if durable {
                self.forget_held(session, &waiter.conv, cmid);
                return Ok(Ok(vec![accepted(waiter)]));
            }
            self.pending.waiters.push(waiter);
            return Ok(Ok(Vec::new()));
        }
        match looked_up {
            // The store's answer: an entry it holds is durable.
            Some((Some(d), _)) if now_ms < d.ts.saturating_add(window) => {
                if d.conv != conv_id {
                    return Err(reused(cmid, &d.conv));
                }
                self.stats.dedup_hits += 1;
                self.forget_held(session, &d.conv, cmid);
                return Ok(Ok(vec![accepted(Waiter {
                    session,
                    cmid: Arc::from(cmid),
                    conv: Arc::from(d.conv),
                    seq: d.seq,
                    ts: d.ts,
                    duplicate: true,
                    admitted: cmd.verdict.is_ok(),
                })]));
            }
            // The cache forgot an entry the store may not have had when it answered: ask again.
            Some((_, mark)) if self.dedup.lost_since(mark) => return Ok(Err(Wait::Lookup)),
            Some(_) => {}
            None if self.filter.surely_new_key(fkey, now_ms) => {}
            None => return Ok(Err(Wait::Lookup)),
        }
        // A new message: the hub's verdict applies (before the conversation is loaded, so a
        // client over its rate makes the owner read nothing more).
        cmd.verdict.clone()?;

        // A new message: its conversation is needed (the store's answer for its key, if it
        // was looked up, waits with it).
        if !self.touch_held(conv_id) && self.is_cold(conv_id) {
            return Ok(Err(Wait::Load(conv_id.to_string(), looked_up)));
        }

        let reply_to = cmd.reply_to;
        if !self.convs.contains_key(conv_id) {
            match &cmd.peer {
                Some(_) if reply_to.is_some() => {
                    return Err(CoreError::Invalid(
                        "reply_to names a seq, but this conversation has no messages yet".into(),
                    ))
                }
                Some(peer) => {
                    // Creation is only recorded together with its first message below.
                    self.new_direct(conv_id, user, peer, now_ms);
                    let outs = self.append(origin, conv_id, cmd, None, now_ms, fkey);
                    self.touch(conv_id);
                    return Ok(Ok(outs));
                }
                None => return Err(CoreError::NoSuchConversation(conv_id.to_string())),
            }
        }
        let c = &self.convs[conv_id];
        if !c.is_member(user) {
            return Err(CoreError::NoSuchConversation(conv_id.to_string()));
        }
        if let Some(r) = reply_to {
            if r == 0 || r > c.rec.max_seq {
                return Err(CoreError::Invalid(format!(
                    "reply_to {r} is not a seq of conversation {conv_id:?} (1..={})",
                    c.rec.max_seq
                )));
            }
        }
        Ok(Ok(self.append(origin, conv_id, cmd, reply_to, now_ms, fkey)))
    }

    /// Parks a send whose key must be looked up (or, with `load`, whose conversation must be
    /// loaded), first in its connection's line (it is the one whose turn it was), and asks for
    /// the lookup or the load.
    fn park_first(
        &mut self,
        origin: &Origin,
        cmd: SendCmd,
        load: Option<(String, Option<LookedUp>)>,
        now_ms: u64,
    ) -> Vec<Out> {
        let session = origin.session;
        let bytes = Parked::size_of(&cmd);
        let empty = self.lines.get(&session).is_none_or(|l| l.parked.is_empty());
        // With nothing parked behind it, a send past the budget of every line can be refused
        // (and held back) without changing the order of any other.
        if empty && self.parked_total + bytes > self.cfg.max_parked_bytes {
            let what = "too many sends of all connections are waiting for the store".into();
            return self.busy(session, cmd, what, PARKED_RETRY_MS, now_ms);
        }
        let mark = self.dedup.mark();
        let (lookup, asked) = match load {
            Some((conv, answer)) => (LookupState::Load(conv, answer), None),
            None => {
                let id = self.next_lookup;
                self.next_lookup += 1;
                (LookupState::Asked { id, mark }, Some(id))
            }
        };
        let line = self
            .lines
            .entry(session)
            .or_insert_with(|| Line::new(origin.clone()));
        let cmid = cmd.cmid.clone();
        let parked = Parked { cmd, lookup };
        line.bytes += parked.bytes();
        self.parked_total += parked.bytes();
        let load_conv = match &parked.lookup {
            LookupState::Load(conv, _) => Some(conv.clone()),
            _ => None,
        };
        line.parked.push_front(parked);
        match (asked, load_conv) {
            (Some(id), _) => {
                self.lookups.insert(id, session);
                self.stats.dedup_lookups += 1;
                vec![Out::Io(Action::Lookup {
                    id,
                    user: origin.user.to_string(),
                    cmid,
                })]
            }
            (None, Some(conv)) => self.wait_for(&conv, Waiting::Send(session)),
            (None, None) => Vec::new(),
        }
    }

    /// Parks a send behind the connection's sends that wait for the store, asking for its own
    /// lookup at once if it will need one, so that lookups overlap.
    fn park_behind(&mut self, origin: &Origin, cmd: SendCmd, now_ms: u64) -> Vec<Out> {
        let session = origin.session;
        let Some(line) = self.lines.get(&session) else {
            return Vec::new();
        };
        let bytes = Parked::size_of(&cmd);
        let full = line.parked.len() >= MAX_PARKED
            || line.bytes + bytes > MAX_PARKED_BYTES
            || self.parked_total + bytes > self.cfg.max_parked_bytes;
        if full {
            let what = "too many earlier sends of this connection are waiting for the store";
            return self.busy(session, cmd, what.into(), PARKED_RETRY_MS, now_ms);
        }
        let user = &origin.user;
        let needs_lookup = self.dedup.get(user, &cmd.cmid).is_none()
            && !self.filter.surely_new(user, &cmd.cmid, now_ms);
        let mut out = Vec::new();
        let state = if needs_lookup {
            let id = self.next_lookup;
            self.next_lookup += 1;
            self.lookups.insert(id, session);
            self.stats.dedup_lookups += 1;
            out.push(Out::Io(Action::Lookup {
                id,
                user: user.to_string(),
                cmid: cmd.cmid.clone(),
            }));
            LookupState::Asked {
                id,
                mark: self.dedup.mark(),
            }
        } else {
            LookupState::NotAsked
        };
        if let Some(line) = self.lines.get_mut(&session) {
            line.bytes += bytes;
            line.parked.push_back(Parked { cmd, lookup: state });
            self.parked_total += bytes;
        }
        out
    }

    /// `cmid` was answered (accepted, perhaps by another copy of the frame, or refused for
    /// good): the client will not resend it, so it holds nothing back in the connection's gate.
    fn forget_held(&mut self, session: SessionId, conv: &str, cmid: &str) {
        if let Some(gate) = self.gates.get_mut(&session) {
            gate.forget(conv, cmid);
            if gate.is_empty() {
                self.gates.remove(&session);
            }
        }
    }

    /// Refuses a send because the store cannot take it now (`what`: too many sends wait for
    /// it, or it cannot be reached), and holds it back if the hub let it through: it passed
    /// the gate (it is the first of its conversation to go), so it goes first once resent,
    /// before anything held back behind it.
    fn busy(
        &mut self,
        session: SessionId,
        cmd: SendCmd,
        what: String,
        retry_after_ms: u64,
        now_ms: u64,
    ) -> Vec<Out> {
        let e = CoreError::Busy {
            what,
            retry_after_ms,
        };
        let admitted = cmd.verdict.is_ok();
        // One the hub held back is refused anyway, and the hub's gate keeps its place.
        let kept = !admitted
            || self
                .gates
                .entry(session)
                .or_default()
                .refused(&cmd.conv, &cmd.cmid, now_ms);
        let mut out = vec![refused(session, cmd.conv, cmd.cmid, e, admitted)];
        if !kept {
            // The order can no longer be kept on this connection.
            out.push(close(session));
        }
        out
    }

    /// The store's answer to [`Action::Lookup`] `id`: `found` is what the key was accepted
    /// as, if the store holds it. Sends that waited for it (and behind it) go on now; returns
    /// what they answer, and maybe further lookups.
    pub fn looked_up(&mut self, id: u64, found: Option<DedupRecord>, now_ms: u64) -> Vec<Out> {
        let found = match self.post_looked_up(id, found) {
            Ok(out) => return out,
            Err(found) => found,
        };
        let Some(session) = self.lookups.remove(&id) else {
            return Vec::new();
        };
        let Some(line) = self.lines.get_mut(&session) else {
            return Vec::new();
        };
        let Some(p) = line
            .parked
            .iter_mut()
            .find(|p| matches!(p.lookup, LookupState::Asked { id: i, .. } if i == id))
        else {
            return Vec::new();
        };
        if let LookupState::Asked { mark, .. } = p.lookup {
            p.lookup = LookupState::Answered { found, mark };
        }
        self.drain_parked(session, now_ms)
    }

    /// Handles the connection's parked sends whose turn has come: from the front, those
    /// answered or waiting only behind others.
    pub(crate) fn drain_parked(&mut self, session: SessionId, now_ms: u64) -> Vec<Out> {
        let mut out = Vec::new();
        while let Some(line) = self.lines.get_mut(&session) {
            let ready = line.parked.front().is_some_and(|p| {
                !matches!(p.lookup, LookupState::Asked { .. } | LookupState::Load(..))
            });
            if !ready {
                if line.parked.is_empty() {
                    self.lines.remove(&session);
                }
                break;
            }
            let Some(p) = line.parked.pop_front() else {
                break;
            };
            line.bytes = line.bytes.saturating_sub(p.bytes());
            self.parked_total = self.parked_total.saturating_sub(p.bytes());
            let origin = line.origin.clone();
            let looked_up = match p.lookup {
                LookupState::Answered { found, mark } => Some((found, mark)),
                _ => None,
            };
            out.extend(self.send_now(&origin, p.cmd, looked_up, now_ms));
        }
        out
    }

    /// Adds dedup entries the store holds to the filter (a restarted owner's filter starts
    /// empty); see [`dedup_filter_complete`](Self::dedup_filter_complete).
    pub fn dedup_filter_add(&mut self, entries: &[DedupRecord]) {
        for d in entries {
            self.filter.insert(&d.user, &d.cmid, d.ts);
        }
    }

    /// Every dedup entry the store held at start has been added to the filter: from now on a
    /// key the filter does not hold is new without asking the store.
    pub fn dedup_filter_complete(&mut self) {
        self.filter.set_complete();
    }

    /// Dedup entries the owner holds in memory (the store holds all of them).
    pub fn dedup_cached(&self) -> usize {
        self.dedup.len()
    }

    fn append(
        &mut self,
        origin: &Origin,
        conv_id: &str,
        cmd: &mut SendCmd,
        reply_to: Option<u64>,
        now_ms: u64,
        fkey: FilterKey,
    ) -> Vec<Out> {
        let Some(conv) = self.convs.get_mut(conv_id) else {
            return Vec::new();
        };
        conv.rec.max_seq += 1;
        let seq = conv.rec.max_seq;
        let conv_key = conv.id.clone();
        let (cmid, body) = (take(&mut cmd.cmid), take(&mut cmd.body));
        let shared_cmid: Arc<str> = Arc::from(cmid.as_str());
        self.pending.messages.push(Arc::new(Message {
            conv: conv_id.to_string(),
            seq,
            from: origin.user.to_string(),
            device: origin.device.to_string(),
            cmid,
            body,
            reply_to,
            ts: now_ms,
            event: None,
        }));
        if !self.pending.convs.contains(conv_id) {
            self.pending.convs.insert(conv_id.to_string());
        }
        let cmid = shared_cmid;
        self.filter.insert_key(fkey, now_ms);
        self.dedup.insert(
            &origin.user,
            cmid.clone(),
            conv_key.clone(),
            seq,
            now_ms,
            self.next_batch,
        );
        self.newest_ts = self.newest_ts.max(now_ms);
        self.dedup_stored_since.get_or_insert(now_ms);
        self.pending.waiters.push(Waiter {
            session: origin.session,
            cmid,
            conv: conv_key,
            seq,
            ts: now_ms,
            duplicate: false,
            admitted: true,
        });
        Vec::new()
    }

    // ----- positions -----

    fn member_conv(&self, origin: &Origin, conv: &str) -> Result<(), CoreError> {
        validate_id(IdKind::Conversation, conv)?;
        let c = self
            .convs
            .get(conv)
            .filter(|c| c.is_durable())
            .ok_or_else(|| CoreError::NoSuchConversation(conv.to_string()))?;
        if !c.is_durable_member(&origin.user) {
            return Err(CoreError::NoSuchConversation(conv.to_string()));
        }
        Ok(())
    }

    /// A cumulative delivered position from a device. Positions past what is durable are
    /// clamped; positions behind the current one are ignored (cursors never go back).
    pub fn ack(&mut self, origin: &Origin, conv: &str, seq: u64) -> Result<(), CoreError> {
        self.member_conv(origin, conv)?;
        self.move_cursor(&origin.user, &origin.device, conv, Some(seq), None);
        Ok(())
    }

    /// A cumulative read position; reading implies delivery.
    pub fn read(&mut self, origin: &Origin, conv: &str, seq: u64) -> Result<(), CoreError> {
        self.member_conv(origin, conv)?;
        self.move_cursor(&origin.user, &origin.device, conv, Some(seq), Some(seq));
        Ok(())
    }

    fn move_cursor(
        &mut self,
        user: &str,
        device: &str,
        conv_id: &str,
        delivered: Option<u64>,
        read: Option<u64>,
    ) {
        self.touch(conv_id);
        let Some(conv) = self.convs.get_mut(conv_id) else {
            return;
        };
        let cap = conv.durable_seq;
        let before = conv.cursors.get(user, device);
        let mut after = before;
        if let Some(d) = delivered {
            after.delivered = after.delivered.max(d.min(cap));
        }
        if let Some(r) = read {
            after.read = after.read.max(r.min(cap));
        }
        if after != before {
            // Copied only if a delivery still holds the old positions (across a seam).
            *Arc::make_mut(&mut conv.cursors).entry(user, device) = after;
            self.pending.cursors.insert((
                conv_id.to_string(),
                user.to_string(),
                device.to_string(),
            ));
            self.pending
                .receipts
                .insert((conv_id.to_string(), user.to_string()));
        }
    }

    /// Starts a `sync`: checks membership, applies the piggybacked ack, and says what to read.
    pub fn sync(
        &mut self,
        origin: &Origin,
        conv: &str,
        after: u64,
        limit: Option<u32>,
    ) -> Result<SyncPlan, CoreError> {
        self.member_conv(origin, conv)?;
        let limit = match limit {
            Some(0) => return Err(CoreError::Invalid("sync limit must be at least 1".into())),
            Some(l) => l.min(self.cfg.limits.max_sync_limit),
            None => self.cfg.default_sync_limit,
        };
        self.move_cursor(&origin.user, &origin.device, conv, Some(after), None);
        self.reading.insert(origin.session, conv.to_string());
        let c = &self.convs[conv];
        Ok(SyncPlan {
            conv: conv.to_string(),
            epoch: c.rec.epoch,
            from: after.saturating_add(1),
            to: c.durable_seq,
            limit,
        })
    }

    /// A `sync` answer went out to the device, covering everything up to `up_to`: the hub
    /// moves the connection's push position (and tells the device to pull if it is still
    /// behind and will not ask again by itself).
    pub fn sync_served(
        &mut self,
        origin: &Origin,
        conv: &str,
        up_to: u64,
        has_more: bool,
    ) -> Vec<Out> {
        self.reading.remove(&origin.session);
        // Held while the page was read (see `reading`).
        let Some(c) = self.convs.get(conv) else {
            return Vec::new();
        };
        vec![Out::Hub(ToHub::Served {
            session: origin.session,
            conv: conv.to_string(),
            up_to,
            has_more,
            durable_seq: c.durable_seq,
            delivered: c.cursor(&origin.user, &origin.device).delivered,
        })]
    }

    /// Answers a `sync` with the page the store returned for `plan`: `messages` (seqs in
    /// `plan.from..=plan.to`, in order, possibly cut short by a count or size budget) and
    /// `first_seq`, the conversation's lowest stored seq as the store reported it. The `synced`
    /// frame comes first, then whatever the served page makes due (a `notify` if the device is
    /// still behind).
    pub fn serve_page(
        &mut self,
        origin: &Origin,
        plan: SyncPlan,
        messages: Vec<Message>,
        first_seq: u64,
    ) -> Vec<Out> {
        let last = messages.last().map(|m| m.seq);
        let has_more = last.is_some_and(|l| l < plan.to);
        let up_to = last.unwrap_or(plan.to);
        let served = self.sync_served(origin, &plan.conv, up_to, has_more);
        let mut out = Vec::with_capacity(1 + served.len());
        out.push(Out::Hub(ToHub::Frame {
            session: origin.session,
            frame: ServerFrame::Synced {
                conv: plan.conv,
                epoch: plan.epoch,
                messages,
                has_more,
                // A trim committed after this sync was planned is not reported past the plan's
                // end.
                first_seq: first_seq.min(plan.to.saturating_add(1)),
                max_seq: plan.to,
            },
        }));
        out.extend(served);
        out
    }

    // ----- admin -----

    /// A group as committed.
    pub fn group(&self, id: &str) -> Option<ConvRecord> {
        let c = self.convs.get(id)?;
        let mut rec = c.durable_rec.as_deref()?.clone();
        if rec.kind != ConvKind::Group {
            return None;
        }
        rec.max_seq = c.durable_seq;
        rec.first_seq = c.durable_first_seq();
        Some(rec)
    }

    /// Starts an admin request; it is answered with [`Action::AdminDone`] (a change once it is
    /// durable). Returns what to do meanwhile: loading the group, or the answer itself. A
    /// request refused at once is the `Err`.
    pub fn admin(
        &mut self,
        ticket: Ticket,
        op: AdminOp,
        now_ms: u64,
    ) -> Result<Vec<Out>, CoreError> {
        let id = match &op {
            AdminOp::CreateGroup { id, .. }
            | AdminOp::UpdateGroup { id, .. }
            | AdminOp::Get { id }
            | AdminOp::DeleteGroup { id } => id,
        };
        validate_id(IdKind::Conversation, id)?;
        // What can be refused without the group is refused before it is loaded.
        match &op {
            AdminOp::CreateGroup {
                id,
                members,
                name,
                metadata,
                ..
            } => {
                if id.starts_with(DIRECT_PREFIX) {
                    return Err(CoreError::Invalid(format!(
                        "group ids may not start with {DIRECT_PREFIX:?}: that prefix is for direct conversations"
                    )));
                }
                let n = validate_members(members)?.len();
                self.within_group_limit(id, n)?;
                validate_group_info(name.as_deref(), Some(metadata))?;
            }
            AdminOp::UpdateGroup {
                id,
                add,
                remove,
                leave,
                name,
                metadata,
                ..
            } => {
                self.within_group_limit(id, validate_members(add)?.len())?;
                validate_members(remove)?;
                validate_members(leave)?;
                validate_group_info(name.as_deref(), metadata.as_ref())?;
            }
            AdminOp::Get { .. } | AdminOp::DeleteGroup { .. } => {}
        }
        if self.is_cold(id) {
            let id = id.clone();
            return Ok(self.wait_for(&id, Waiting::Admin { ticket, op, now_ms }));
        }
        self.touch(id);
        match op {
            AdminOp::Get { id } => {
                let reply = self
                    .group(&id)
                    .filter(|g| !g.deleted)
                    .ok_or_else(|| CoreError::NoSuchConversation(id.clone()));
                Ok(vec![Out::Io(Action::AdminDone { ticket, reply })])
            }
            AdminOp::CreateGroup {
                id,
                members,
                retention,
                name,
                metadata,
            } => {
                let members = validate_members(&members)?;
                if let Some(c) = self.convs.get_mut(&id) {
                    if !c.rec.deleted {
                        return Err(CoreError::AlreadyExists(id));
                    }
                    // The id of a deleted group: a new group with a new epoch, its seqs going
                    // on after the old ones (which are gone).
                    c.rec.epoch = self.rng.next_epoch();
                    c.rec.created_ms = now_ms;
                    c.rec.members = members;
                    c.rec.retention = retention;
                    c.rec.name = name.filter(|n| !n.is_empty());
                    c.rec.metadata = metadata;
                    c.rec.deleted = false;
                    self.pending.records.insert(id.clone());
                    self.pending.admin.push((ticket, id));
                    return Ok(Vec::new());
                }
                let rec = ConvRecord {
                    id: id.clone(),
                    kind: ConvKind::Group,
                    epoch: self.rng.next_epoch(),
                    max_seq: 0,
                    first_seq: 1,
                    members,
                    retention,
                    created_ms: now_ms,
                    name: name.filter(|n| !n.is_empty()),
                    metadata,
                    deleted: false,
                };
                // Its first members are the group as created, not a change: no event.
                self.convs.insert(id.clone(), Conv::new(rec, false));
                self.pending.records.insert(id.clone());
                self.pending.admin.push((ticket, id));
                Ok(Vec::new())
            }
            AdminOp::DeleteGroup { id } => {
                let c = self
                    .convs
                    .get_mut(&id)
                    .filter(|c| c.rec.kind == ConvKind::Group && !c.rec.deleted)
                    .ok_or_else(|| CoreError::NoSuchConversation(id.clone()))?;
                let former: Vec<String> = std::mem::take(&mut c.rec.members).into_iter().collect();
                c.rec.name = None;
                c.rec.metadata.clear();
                c.rec.deleted = true;
                // Every member is removed (their connected devices are told), then every
                // message goes, the events with them.
                if !former.is_empty() {
                    let users = former.clone();
                    self.append_event(&id, ConvEvent::Removed { users }, now_ms);
                }
                if let Some(c) = self.convs.get_mut(&id) {
                    c.rec.first_seq = c.rec.max_seq + 1;
                }
                self.pending.purge.insert(id.clone());
                self.pending.records.insert(id.clone());
                self.pending.admin.push((ticket, id.clone()));
                Ok(vec![Out::Hub(ToHub::Left {
                    conv: id,
                    users: former,
                })])
            }
            AdminOp::UpdateGroup {
                id,
                add,
                remove,
                leave,
                retention,
                name,
                metadata,
            } => {
                let add = validate_members(&add)?;
                let mut remove = validate_members(&remove)?;
                let leave = validate_members(&leave)?;
                remove.extend(leave.iter().cloned());
                let max = self.cfg.max_group_members;
                let c = self
                    .convs
                    .get_mut(&id)
                    .filter(|c| c.rec.kind == ConvKind::Group && !c.rec.deleted)
                    .ok_or_else(|| CoreError::NoSuchConversation(id.clone()))?;
                let after = c.rec.members.union(&add).count()
                    - remove
                        .iter()
                        .filter(|u| c.rec.members.contains(*u) || add.contains(*u))
                        .count();
                if after > max {
                    return Err(group_too_large(&id, after, max));
                }
                // What changes, as events: users added who were not members, users who were
                // members removed or gone (removal wins over an add of the same user).
                let joined: Vec<String> = add
                    .iter()
                    .filter(|u| !c.rec.members.contains(*u) && !remove.contains(*u))
                    .cloned()
                    .collect();
                let gone = |u: &&String| c.rec.members.contains(*u);
                let left: Vec<String> = leave.iter().filter(gone).cloned().collect();
                let removed: Vec<String> = remove
                    .iter()
                    .filter(gone)
                    .filter(|u| !leave.contains(*u))
                    .cloned()
                    .collect();
                c.rec.members.extend(add);
                for u in &remove {
                    c.rec.members.remove(u);
                }
                if let Some(r) = retention {
                    c.rec.retention = r;
                }
                let renamed = name
                    .map(|n| (!n.is_empty()).then_some(n))
                    .filter(|n| *n != c.rec.name);
                if let Some(n) = &renamed {
                    c.rec.name = n.clone();
                }
                if let Some(m) = metadata {
                    c.rec.metadata = m;
                }
                for event in [
                    (!joined.is_empty()).then_some(ConvEvent::Joined { users: joined }),
                    (!left.is_empty()).then_some(ConvEvent::Left { users: left }),
                    (!removed.is_empty()).then_some(ConvEvent::Removed { users: removed }),
                    renamed.map(|n| ConvEvent::Renamed {
                        name: n.unwrap_or_default(),
                    }),
                ]
                .into_iter()
                .flatten()
                {
                    self.append_event(&id, event, now_ms);
                }
                self.pending.records.insert(id.clone());
                self.pending.admin.push((ticket, id.clone()));
                let mut out = Vec::new();
                if !remove.is_empty() {
                    out.push(Out::Hub(ToHub::Left {
                        conv: id,
                        users: remove.into_iter().collect(),
                    }));
                }
                Ok(out)
            }
        }
    }

    /// Refuses a group change that by itself names more members than a group may have.
    fn within_group_limit(&self, id: &str, n: usize) -> Result<(), CoreError> {
        let max = self.cfg.max_group_members;
        if n > max {
            return Err(group_too_large(id, n, max));
        }
        Ok(())
    }

    // ----- ticks -----

    /// Forgets dedup entries older than the window; the next batch tells the store to forget
    /// what was accepted before the same time, if it may hold any.
    pub fn expire_dedup(&mut self, now_ms: u64) {
        let window = self.cfg.dedup_window_ms;
        self.dedup.expire(now_ms, window);
        // Entries accepted at or before `now - window` are past it.
        let Some(cutoff) = (now_ms + 1).checked_sub(window).filter(|c| *c > 0) else {
            return;
        };
        if self.dedup_stored_since.is_some_and(|since| cutoff > since) {
            // Once forgotten, nothing is left if nothing newer was accepted.
            self.dedup_stored_since = (self.newest_ts >= cutoff).then_some(cutoff);
            let before = self.pending.dedup_forget_before_ms.get_or_insert(0);
            *before = (*before).max(cutoff);
        }
    }

    /// Age-based retention: asks the store which conversations hold messages older than their
    /// max age ([`Action::Sweep`]), a slice of
    /// [`retention_sweep_convs`](CoreConfig::retention_sweep_convs) at a time (the core does not
    /// hold them all), a slice per call while a pass is under way, a pass every
    /// [`retention_pass_ms`](CoreConfig::retention_pass_ms). The answer goes to
    /// [`expired`](Self::expired).
    #[must_use]
    pub fn retention_tick(&mut self, now_ms: u64) -> Vec<Action> {
        if self.sweep.asked {
            return Vec::new();
        }
        if self.sweep.after.is_none() {
            if self
                .sweep
                .pass_started_ms
                .is_some_and(|t| now_ms < t.saturating_add(self.cfg.retention_pass_ms))
            {
                return Vec::new();
            }
            self.sweep.pass_started_ms = Some(now_ms);
        }
        self.sweep.asked = true;
        vec![Action::Sweep(AgeSweep {
            now_ms,
            default_max_age_ms: self.cfg.default_retention.max_age_ms,
            after: self.sweep.after.clone(),
            max_convs: self.cfg.retention_sweep_convs,
        })]
    }

    /// The store's answer to [`Action::Sweep`]: the conversations it names are trimmed in the
    /// next batch (their first seqs move once it is durable).
    pub fn expired(&mut self, expired: Expired) {
        self.sweep.asked = false;
        self.sweep.after = expired.swept_to;
        for (conv, cutoff) in expired.trims {
            if let Some(t) = self.pending.trim_before_ms.iter_mut().find(|t| t.0 == conv) {
                t.1 = t.1.max(cutoff);
            } else {
                self.pending.trim_before_ms.push((conv, cutoff));
            }
        }
    }

    // ----- group commit -----

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Hands out the next batch to make durable, if there is something pending and no other
    /// batch is in flight.
    pub fn take_batch(&mut self) -> Option<Batch> {
        if self.in_flight.is_some() || self.pending.is_empty() {
            return None;
        }
        let next = Pending {
            messages: std::mem::take(&mut self.spare_messages),
            waiters: std::mem::take(&mut self.spare_waiters),
            ..Pending::default()
        };
        let p = std::mem::replace(&mut self.pending, next);
        let id = self.next_batch;
        self.next_batch += 1;
        let default = self.cfg.default_retention;

        let mut trim_below = Vec::new();
        let mut convs = Vec::new();
        let mut positions = Vec::new();
        for cid in p.convs.union(&p.records) {
            let Some(c) = self.convs.get_mut(cid) else {
                continue;
            };
            if p.purge.contains(cid) {
                trim_below.push((cid.clone(), c.rec.first_seq));
            } else if let Some(max) = c.rec.retention.or(default).max_count {
                let keep_from = c.rec.max_seq.saturating_sub(max) + 1;
                if keep_from > c.rec.first_seq {
                    c.rec.first_seq = keep_from;
                    trim_below.push((cid.clone(), keep_from));
                }
            }
            // A conversation's first commit, or an admin change, writes the whole record; new
            // messages only move its seq range (a large group's member list is not rewritten).
            if p.records.contains(cid) || !c.is_durable() {
                convs.push(c.rec.clone());
            } else {
                positions.push(ConvPosition {
                    id: cid.clone(),
                    max_seq: c.rec.max_seq,
                    first_seq: c.rec.first_seq,
                });
            }
        }
        let cursors: Vec<CursorRecord> = p
            .cursors
            .iter()
            .filter_map(|(conv, user, device)| {
                self.convs.get(conv).map(|c| c.cursor_record(user, device))
            })
            .collect();
        let batch = Batch {
            id,
            messages: p.messages.clone(),
            convs: convs.clone(),
            positions: positions.clone(),
            dedup_put: Vec::new(),
            dedup_forget_before_ms: p.dedup_forget_before_ms,
            dedup_delete: Vec::new(),
            cursors: cursors.clone(),
            trim_below,
            trim_before_ms: p.trim_before_ms,
        };
        self.in_flight = Some(InFlight {
            id,
            messages: p.messages,
            convs,
            positions,
            cursors,
            waiters: p.waiters,
            admin: p.admin,
            posts: p.posts,
            receipts: p.receipts,
        });
        Some(batch)
    }

    /// The batch `id` is durable: release everything that waited on it.
    pub fn commit_done(&mut self, id: u64, outcome: CommitOutcome) -> Vec<Out> {
        let Some(f) = self.in_flight.take_if(|f| f.id == id) else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(f.waiters.len() + f.messages.len() + f.admin.len());
        let commit = self.count_commit();
        for rec in f.convs {
            // Created, or members or retention changed: an overview listed before may lack it.
            self.note_change(rec.id.clone(), commit);
            if let Some(c) = self.convs.get_mut(&rec.id) {
                c.changed = commit;
                let first = c.durable_rec.as_ref().map_or(1, |d| d.first_seq);
                c.durable_seq = c.durable_seq.max(rec.max_seq);
                let mut rec = rec;
                rec.first_seq = rec.first_seq.max(first);
                c.durable_rec = Some(Arc::new(rec));
            }
        }
        for pos in f.positions {
            if let Some(c) = self.convs.get_mut(&pos.id) {
                c.changed = commit;
                c.durable_seq = c.durable_seq.max(pos.max_seq);
                if let Some(d) = c.durable_rec.as_mut() {
                    let d = Arc::make_mut(d);
                    d.max_seq = d.max_seq.max(pos.max_seq);
                    d.first_seq = d.first_seq.max(pos.first_seq);
                }
            }
        }
        for cur in f.cursors {
            if let Some(c) = self.convs.get_mut(&cur.conv) {
                c.changed = commit;
                let d = c.durable_cursors.entry(&cur.user, &cur.device);
                d.delivered = d.delivered.max(cur.delivered);
                d.read = d.read.max(cur.read);
            }
        }
        for (cid, first) in outcome.first_seqs {
            if let Some(c) = self.convs.get_mut(&cid) {
                c.rec.first_seq = c.rec.first_seq.max(first);
                if let Some(d) = c.durable_rec.as_mut() {
                    let d = Arc::make_mut(d);
                    d.first_seq = d.first_seq.max(first);
                }
            } else {
                // Trimmed while not held: a load already under way may have read it before.
                self.trimmed_cold(&cid, first, commit);
            }
        }
        let mut waiters = f.waiters;
        for w in waiters.drain(..) {
            self.forget_held(w.session, &w.conv, &w.cmid);
            out.push(accepted(w));
        }
        self.spare_waiters = waiters;
        for (ticket, cid) in f.admin {
            let reply = self
                .group(&cid)
                .ok_or_else(|| CoreError::NoSuchConversation(cid.clone()));
            out.push(Out::Io(Action::AdminDone { ticket, reply }));
        }
        for (ticket, p) in f.posts {
            out.push(posted(ticket, Ok(p)));
        }
        self.stats.accepted += f.messages.len() as u64;
        let mut messages = f.messages;
        for m in messages.drain(..) {
            self.deliver(m, &mut out);
        }
        self.spare_messages = messages;
        for (cid, user) in f.receipts {
            self.publish_receipt(&cid, &user, &mut out);
        }
        self.dedup.shrink(self.cfg.dedup_cache_entries, id);
        self.evict();
        out
    }

    /// Conversations that pending or in-flight work touches: they stay in memory until it is
    /// done (a conversation the owner does not hold must have nothing uncommitted).
    pub(crate) fn pinned_convs(&self) -> std::collections::HashSet<&str> {
        let p = &self.pending;
        let mut out: std::collections::HashSet<&str> = std::collections::HashSet::new();
        out.extend(p.convs.iter().map(String::as_str));
        out.extend(p.records.iter().map(String::as_str));
        out.extend(p.cursors.iter().map(|(c, _, _)| c.as_str()));
        out.extend(p.receipts.iter().map(|(c, _)| c.as_str()));
        out.extend(p.waiters.iter().map(|w| &*w.conv));
        out.extend(p.admin.iter().map(|(_, c)| c.as_str()));
        out.extend(p.posts.iter().map(|(_, p)| p.conv.as_str()));
        if let Some(f) = &self.in_flight {
            out.extend(f.convs.iter().map(|c| c.id.as_str()));
            out.extend(f.positions.iter().map(|c| c.id.as_str()));
            out.extend(f.cursors.iter().map(|c| c.conv.as_str()));
            out.extend(f.receipts.iter().map(|(c, _)| c.as_str()));
            out.extend(f.waiters.iter().map(|w| &*w.conv));
            out.extend(f.admin.iter().map(|(_, c)| c.as_str()));
            out.extend(f.posts.iter().map(|(_, p)| p.conv.as_str()));
            out.extend(f.messages.iter().map(|m| m.conv.as_str()));
        }
        out.extend(self.reading.values().map(String::as_str));
        out
    }

    /// Whether any work not finished yet touches a conversation `of` says yes to: pending or in
    /// flight (see `pinned_convs`), a send parked in a connection's line, a load or an admin
    /// request waiting. A cluster's node hands a partition over only once this is false for it.
    pub fn busy_with(&self, of: &dyn Fn(&str) -> bool) -> bool {
        self.pinned_convs().into_iter().any(of)
            || self
                .lines
                .values()
                .any(|l| l.parked.iter().any(|p| of(&p.cmd.conv)))
            || self.loads_waiting().any(of)
            || self.post_lookups.values().any(|(job, _)| of(&job.conv))
            || self.pending.trim_before_ms.iter().any(|(c, _)| of(c))
    }

    /// The page a `sync` of `session` was to read could not be read (it was answered with an
    /// error): its conversation is no longer held for it.
    pub fn read_failed(&mut self, session: SessionId) {
        self.reading.remove(&session);
    }

    /// Whether an overview (`convs`) keeps the conversations it read from the store (the device
    /// is likely to sync them next). A cluster's node does not: a conversation whose partition
    /// it takes while the overview is read would be kept as it was before the takeover.
    pub fn set_keep_overviews(&mut self, keep: bool) {
        self.keep_overviews = keep;
    }

    /// Forgets every conversation `of` says yes to, and whatever it knows of them (a cluster's
    /// node that took or gave up their partition: their owner was another, or will be, and the
    /// store holds what it committed). Refused, with nothing forgotten, while work touches one
    /// of them ([`Owner::busy_with`]).
    pub fn forget_convs(&mut self, of: &dyn Fn(&str) -> bool) -> Result<usize, CoreError> {
        if self.busy_with(of) {
            return Err(CoreError::Unavailable(
                "work on these conversations is not finished".into(),
            ));
        }
        let doomed: Vec<String> = self.convs.keys().filter(|c| of(c)).cloned().collect();
        for id in &doomed {
            let changed = self.convs.remove(id).map_or(0, |c| c.changed);
            self.note_change(id.clone(), changed);
        }
        Ok(doomed.len())
    }

    /// The filter of dedup keys no longer holds every key the store holds (a cluster's node
    /// took a partition whose sends another node accepted): every send the cache cannot answer
    /// is looked up until the keys are added again and [`Owner::dedup_filter_complete`] is
    /// called.
    pub fn dedup_filter_incomplete(&mut self) {
        self.filter.set_incomplete();
    }

    /// Storage failed: nothing pending or in flight will become durable, and no lookup will be
    /// answered. Every waiting sender and admin request is told to retry. The caller then
    /// rebuilds the core from the store, which is the truth, and drops the connections.
    pub fn abort_all(&mut self, reason: &str) -> Vec<Out> {
        let mut out = Vec::new();
        let pending = std::mem::take(&mut self.pending);
        let (mut waiters, mut admin) = (pending.waiters, pending.admin);
        let mut posts: Vec<Ticket> = pending.posts.iter().map(|(t, _)| *t).collect();
        if let Some(f) = self.in_flight.take() {
            waiters.extend(f.waiters);
            admin.extend(f.admin);
            posts.extend(f.posts.iter().map(|(t, _)| *t));
        }
        posts.extend(self.post_lookups.drain().map(|(_, (job, _))| job.ticket));
        for ticket in posts {
            out.push(posted(
                ticket,
                Err(CoreError::Unavailable(format!(
                    "the message could not be stored ({reason}); post it again (same cmid)"
                ))),
            ));
        }
        for w in waiters {
            out.push(Out::Hub(ToHub::Frame {
                session: w.session,
                frame: ServerFrame::rejected(
                    w.cmid.to_string(),
                    ErrorCode::Unavailable,
                    format!("the message could not be stored ({reason}); resend it"),
                    Some(1000),
                ),
            }));
        }
        // Sends waiting for a lookup will not get one.
        self.lookups.clear();
        self.parked_total = 0;
        for (sid, line) in self.lines.drain() {
            for p in line.parked {
                out.push(Out::Hub(ToHub::Frame {
                    session: sid,
                    frame: ServerFrame::rejected(
                        p.cmd.cmid,
                        ErrorCode::Unavailable,
                        format!("the message could not be checked against the store ({reason}); resend it"),
                        Some(1000),
                    ),
                }));
            }
        }
        for (ticket, _) in admin {
            out.push(Out::Io(Action::AdminDone {
                ticket,
                reply: Err(CoreError::Unavailable(format!(
                    "the change could not be stored ({reason}); retry"
                ))),
            }));
        }
        out
    }

    /// A durable message, for the hub to push to the members' devices.
    fn deliver(&mut self, m: Arc<Message>, out: &mut Vec<Out>) {
        let Some(c) = self.convs.get(&m.conv) else {
            return;
        };
        let Some(rec) = c.durable_rec.clone() else {
            return;
        };
        out.push(Out::Hub(ToHub::Deliver(Delivery {
            msg: m,
            durable_seq: c.durable_seq,
            rec,
            cursors: c.cursors.clone(),
        })));
    }

    fn publish_receipt(&mut self, cid: &str, user: &str, out: &mut Vec<Out>) {
        let Some(c) = self.convs.get_mut(cid) else {
            return;
        };
        let pos = c.durable_user_position(user);
        let old = c.published.get(user).copied().unwrap_or_default();
        let new = Cursor {
            delivered: old.delivered.max(pos.delivered),
            read: old.read.max(pos.read),
        };
        if new == old {
            return;
        }
        c.published.insert(user.to_string(), new);
        if c.durable_member_count() > self.cfg.receipt_max_members {
            return;
        }
        let Some(rec) = c.durable_rec.clone() else {
            return;
        };
        out.push(Out::Hub(ToHub::Receipt {
            conv: cid.to_string(),
            user: user.to_string(),
            delivered: new.delivered,
            read: new.read,
            rec,
        }));
    }
}

fn accepted(w: Waiter) -> Out {
    Out::Hub(ToHub::Accepted(w))
}

fn refused(
    session: SessionId,
    conv: Arc<str>,
    cmid: String,
    error: CoreError,
    admitted: bool,
) -> Out {
    Out::Hub(ToHub::Refused {
        session,
        conv,
        cmid,
        error,
        admitted,
    })
}

/// Closes a connection whose refused sends can no longer be kept in order.
fn close(session: SessionId) -> Out {
    Out::Hub(ToHub::Close {
        session,
        reason: crate::held_back::OVERFLOW_REASON.into(),
    })
}

/// An error answer to a connection's `request` frame (its `type`), which named `conv`.
pub(crate) fn error(session: SessionId, e: &CoreError, request: &str, conv: Option<&str>) -> Out {
    Out::Hub(ToHub::Frame {
        session,
        frame: ServerFrame::error_about(e.code(), e.to_string(), request, conv),
    })
}

/// A group change that would leave the group with more than `max` members.
fn group_too_large(id: &str, n: usize, max: usize) -> CoreError {
    CoreError::Invalid(format!(
        "group {id:?} would have {n} members; the most a group may have is {max} (max_group_members)"
    ))
}

/// A client message id used in another conversation inside its window.
fn reused(cmid: &str, conv: &str) -> CoreError {
    CoreError::Invalid(format!(
        "client message id {cmid:?} was already used in conversation {conv:?}; use a new id per message"
    ))
}

/// Longest group name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Most metadata entries of a group, and most bytes of one key, of one value, of them all.
pub const MAX_METADATA_ENTRIES: usize = 64;
pub const MAX_METADATA_KEY_BYTES: usize = 64;
pub const MAX_METADATA_VALUE_BYTES: usize = 1024;
pub const MAX_METADATA_BYTES: usize = 8192;

/// Checks a group's name and metadata against their limits.
pub fn validate_group_info(
    name: Option<&str>,
    metadata: Option<&std::collections::BTreeMap<String, String>>,
) -> Result<(), CoreError> {
    if let Some(n) = name {
        if n.len() > MAX_NAME_BYTES || n.chars().any(char::is_control) {
            return Err(CoreError::Invalid(format!(
                "a group name is at most {MAX_NAME_BYTES} bytes, without control characters"
            )));
        }
    }
    let Some(m) = metadata else {
        return Ok(());
    };
    let total: usize = m.iter().map(|(k, v)| k.len() + v.len()).sum();
    let bad_key = m
        .keys()
        .find(|k| k.is_empty() || k.len() > MAX_METADATA_KEY_BYTES);
    let bad_value = m.values().any(|v| v.len() > MAX_METADATA_VALUE_BYTES);
    if m.len() > MAX_METADATA_ENTRIES
        || total > MAX_METADATA_BYTES
        || bad_key.is_some()
        || bad_value
    {
        return Err(CoreError::Invalid(format!(
            "metadata holds at most {MAX_METADATA_ENTRIES} entries of string values, keys of 1 to {MAX_METADATA_KEY_BYTES} bytes, values of at most {MAX_METADATA_VALUE_BYTES} bytes, {MAX_METADATA_BYTES} bytes in all"
        )));
    }
    Ok(())
}

fn validate_members(users: &[String]) -> Result<BTreeSet<String>, CoreError> {
    users
        .iter()
        .map(|u| validate_id(IdKind::User, u).map(|_| u.clone()))
        .collect::<Result<_, _>>()
        .map_err(CoreError::from)
}
