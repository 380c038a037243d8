//! The [`Core`] state machine: events in (connect, send, ack, read, sync, admin, commit done,
//! ticks), [`Action`]s out.
//!
//! Group commit lives here as a rule, not as I/O: every change joins the *pending* set; the
//! caller takes it as a [`Batch`] whenever no batch is in flight, makes it durable, and reports
//! back with [`Core::commit_done`]. Only then are the answers to that batch released: `accepted`
//! to senders, `msg`/`notify` to devices, `receipt`s, admin replies. So no client ever sees a seq
//! that a crash could take back.

use crate::config::CoreConfig;
use crate::conv::{Conv, Cursor};
use crate::dedup::{DedupCache, DedupFilter, FilterKey};
use crate::error::CoreError;
use crate::loading::{Loads, Waiting};
use crate::model::*;
use crate::rate::TokenBucket;
use crate::rng::SplitMix64;
use crate::session::{LookedUp, LookupState, Parked, PushState, Session};
use foldhash::{HashMap, HashMapExt};
use ordo_protocol::{
    direct_conv_id, validate_id, ConvKind, ErrorCode, IdKind, Message, ServerFrame, DIRECT_PREFIX,
};
use std::collections::BTreeSet;
use std::mem::take;
use std::sync::Arc;

/// Most refused sends remembered per connection and conversation to keep their order; past it,
/// further ones are refused without being queued (the client resends them in order anyway).
const MAX_HELD_BACK: usize = 4096;

/// Most sends one connection may have waiting for a dedup lookup (and behind one), and most
/// bytes of them; past either, a send is refused as unavailable, to be resent shortly.
const MAX_PARKED: usize = 1024;
const MAX_PARKED_BYTES: usize = 1 << 20;
/// How long a client is asked to wait before resending a send refused for that.
const PARKED_RETRY_MS: u64 = 100;

/// Most direct conversation ids a connection remembers (by peer) before it starts over.
const MAX_DIRECT_REMEMBERED: usize = 256;

/// A held-back send not resent for this long is forgotten (the client's longest backoff is a
/// minute, ±30 %), provided the client resent the others behind it at least
/// [`RESENDS_BEFORE_EXPIRY`] times meanwhile: a message the client gave up on must not block
/// its conversation for good. See [`crate::session::HeldBack`].
pub(crate) const HELD_BACK_TTL_MS: u64 = 120_000;
const RESENDS_BEFORE_EXPIRY: u32 = 2;

/// Identifies one connected device; chosen by the caller, unique while connected.
pub type SessionId = u64;
/// Identifies one admin request; chosen by the caller, echoed in [`Action::AdminDone`].
pub type Ticket = u64;

/// Something the caller must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this frame to this connection.
    Send {
        session: SessionId,
        frame: ServerFrame,
    },
    /// Send this same frame to each of these connections (a message pushed to every online
    /// member device: encode it once).
    Broadcast {
        sessions: Vec<SessionId>,
        frame: ServerFrame,
    },
    /// An admin request finished (its change is durable, or it failed).
    AdminDone {
        ticket: Ticket,
        reply: Result<AdminReply, CoreError>,
    },
    /// Ask the store what (`user`, `cmid`) was accepted as, and hand the answer to
    /// [`Core::looked_up`] with this `id`. The send that needs it waits, and so do the later
    /// sends of its connection; other frames do not. Lookups may be answered in any order,
    /// from a store state that includes every batch committed before the lookup was asked.
    Lookup { id: u64, user: String, cmid: String },
    /// Load conversation `conv` from the store and hand it to [`Core::loaded`] (`None` if the
    /// store does not hold it). The frames that need it wait; asked once per conversation
    /// until answered. Answers may come in any order, from a store state that includes every
    /// batch committed before the load was asked.
    Load { conv: String },
    /// List every conversation `user` is a member of, as stored, and hand the list to
    /// [`Core::member_convs_loaded`] with this `id` (for a `convs` overview).
    LoadMember { id: u64, user: String },
    /// Ask the store which conversations of this slice hold messages past their max age, and
    /// hand the answer to [`Core::expired`]. One at a time; may be answered from any store state
    /// after it was asked.
    Sweep(AgeSweep),
    /// A frame for which [`Core::on_frame`] returned [`Handled::Waits`](crate::Handled::Waits)
    /// is handled now: for a `sync`, read `plan`'s page and hand it to [`Core::serve_page`];
    /// `None` when it was answered without one. Only for frames [`crate::may_read`] names.
    Reply {
        session: SessionId,
        plan: Option<SyncPlan>,
    },
}

/// The same actions with every [`Action::Broadcast`] written out as one [`Action::Send`] per
/// connection, in order (for code that looks at frames one connection at a time).
pub fn per_session(actions: Vec<Action>) -> Vec<Action> {
    let mut out = Vec::with_capacity(actions.len());
    for a in actions {
        match a {
            Action::Broadcast { sessions, frame } => {
                out.extend(sessions.into_iter().map(|session| Action::Send {
                    session,
                    frame: frame.clone(),
                }))
            }
            other => out.push(other),
        }
    }
    out
}

/// Admin reply: the group as it now stands.
pub type AdminReply = ConvRecord;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminOp {
    CreateGroup {
        id: String,
        members: Vec<String>,
        retention: Retention,
    },
    UpdateGroup {
        id: String,
        add: Vec<String>,
        remove: Vec<String>,
        retention: Option<Retention>,
    },
    /// The group as committed.
    Get { id: String },
}

/// What a `sync` should read from the store: seqs `from..=to`, at most `limit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncPlan {
    pub conv: String,
    pub epoch: u64,
    pub from: u64,
    pub to: u64,
    pub limit: u32,
}

/// A `send` frame as the core takes it. Exactly one of `conv` and `to` should be set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendRequest<'a> {
    pub conv: Option<&'a str>,
    /// A user: the direct conversation with them, created on the first send.
    pub to: Option<&'a str>,
    pub cmid: String,
    pub body: String,
    pub reply_to: Option<u64>,
}

/// Who waits for which seq to become durable, to be told `accepted`.
#[derive(Clone, Debug)]
struct Waiter {
    session: SessionId,
    cmid: Arc<str>,
    conv: Arc<str>,
    seq: u64,
    ts: u64,
}

/// Changes not yet handed out in a batch, plus the answers that wait on them.
#[derive(Default)]
pub(crate) struct Pending {
    messages: Vec<Arc<StoredMessage>>,
    /// Conversations with new messages.
    convs: BTreeSet<String>,
    /// Conversations created or changed by an admin request: their whole record is written.
    records: BTreeSet<String>,
    dedup_forget_before_ms: Option<u64>,
    cursors: BTreeSet<(String, String, String)>,
    trim_before_ms: Vec<(String, u64)>,
    waiters: Vec<Waiter>,
    admin: Vec<(Ticket, String)>,
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
    receipts: BTreeSet<(String, String)>,
}

pub struct Core {
    cfg: CoreConfig,
    rng: SplitMix64,
    /// The conversations in use (hot); the store holds them all. See [`crate::loading`].
    pub(crate) convs: HashMap<String, Conv>,
    /// Conversations being loaded and what waits for them; evictions; overviews being listed.
    pub(crate) loads: Loads,
    /// The most recent (user, cmid) -> what it was accepted as; the store holds the rest.
    dedup: DedupCache,
    /// Every dedup key of the window, roughly: which keys are certainly new.
    filter: DedupFilter,
    /// Lookups asked and not answered yet, by id: whose send waits for each.
    lookups: HashMap<u64, SessionId>,
    /// Bytes of sends parked on every connection together.
    parked_total: usize,
    next_lookup: u64,
    /// No dedup entry the store holds (and has not been told to forget) was accepted before
    /// this; `None` if it holds none.
    dedup_stored_since: Option<u64>,
    /// The newest acceptance time given out (or stored, at start).
    newest_ts: u64,
    pub(crate) sessions: HashMap<SessionId, Session>,
    by_user: HashMap<String, BTreeSet<SessionId>>,
    buckets: HashMap<String, TokenBucket>,
    pub(crate) pending: Pending,
    pub(crate) in_flight: Option<InFlight>,
    /// Emptied lists of the last batch, reused by the next one: growing them again from nothing
    /// for every batch costs a trail of ever larger allocations.
    spare_messages: Vec<Arc<StoredMessage>>,
    spare_waiters: Vec<Waiter>,
    next_batch: u64,
    /// Where age-based retention stands.
    sweep: Sweep,
    pub(crate) stats: CoreStats,
    /// Test-only: safeguards switched off by the simulation (all on unless it says so).
    #[cfg(feature = "fault-injection")]
    faults: crate::fault::Faults,
}

/// Running totals the caller exports as metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoreStats {
    /// Resends answered from the dedup table.
    pub dedup_hits: u64,
    /// Messages made durable and acknowledged.
    pub accepted: u64,
    /// `msg` frames pushed.
    pub pushed: u64,
    /// `notify` frames sent.
    pub notified: u64,
    /// Dedup keys looked up in the store (the cache did not hold them and the filter could
    /// not rule them out).
    pub dedup_lookups: u64,
    /// Conversations (and users' lists of them) loaded from the store.
    pub conv_loads: u64,
}

/// Why a send cannot be handled yet.
enum Wait {
    /// Its key must be looked up in the store.
    Lookup,
    /// Its conversation must be loaded; what the store answered for its key, if it was looked
    /// up, goes with it.
    Load(String, Option<LookedUp>),
}

impl Core {
    /// Starts the rules over what the store holds: no conversation is loaded until it is used
    /// ([`Action::Load`]). `seed` feeds the generator of
    /// epochs and the dedup filter's hash: random in production, fixed in a simulation. The
    /// dedup filter starts empty: the caller adds the keys the store holds with
    /// [`dedup_filter_add`](Self::dedup_filter_add) and then calls
    /// [`dedup_filter_complete`](Self::dedup_filter_complete); meanwhile every send the cache
    /// cannot answer is looked up.
    pub fn new(cfg: CoreConfig, seed: u64, snapshot: Snapshot) -> Self {
        let filter = DedupFilter::new(cfg.dedup_filter_bytes, cfg.dedup_window_ms, seed);
        Core {
            cfg,
            rng: SplitMix64::new(seed),
            convs: HashMap::new(),
            loads: Loads::default(),
            dedup: DedupCache::default(),
            filter,
            lookups: HashMap::new(),
            parked_total: 0,
            next_lookup: 1,
            // A store with entries may hold them from any time.
            dedup_stored_since: (snapshot.last_ts > 0).then_some(0),
            newest_ts: snapshot.last_ts,
            sessions: HashMap::new(),
            by_user: HashMap::new(),
            buckets: HashMap::new(),
            pending: Pending::default(),
            in_flight: None,
            spare_messages: Vec::new(),
            spare_waiters: Vec::new(),
            next_batch: 1,
            sweep: Sweep::default(),
            stats: CoreStats::default(),
            #[cfg(feature = "fault-injection")]
            faults: crate::fault::Faults::default(),
        }
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

    // ----- connections -----

    pub fn connect(&mut self, session: SessionId, user: &str, device: &str) {
        self.sessions.insert(session, Session::new(user, device));
        self.by_user
            .entry(user.to_string())
            .or_default()
            .insert(session);
    }

    pub fn disconnect(&mut self, session: SessionId) {
        self.forget_waiting(session);
        if let Some(s) = self.sessions.remove(&session) {
            self.parked_total = self.parked_total.saturating_sub(s.parked_bytes);
            if let Some(set) = self.by_user.get_mut(&*s.user) {
                set.remove(&session);
                if set.is_empty() {
                    self.by_user.remove(&*s.user);
                }
            }
        }
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    // ----- sending -----

    /// A `send` from a connected device. Returns the frames to answer with at once (a duplicate
    /// of a durable message, or a rejection); a new message is answered at commit. A send whose
    /// client message id must be looked up in the store returns [`Action::Lookup`] and waits,
    /// and the connection's later sends wait behind it, in order.
    pub fn send(&mut self, session: SessionId, req: SendRequest<'_>, now_ms: u64) -> Vec<Action> {
        match self.sessions.get(&session) {
            None => Vec::new(),
            Some(s) if !s.parked.is_empty() => self.park_behind(session, req, now_ms),
            Some(_) => self.send_now(session, req, None, now_ms),
        }
    }

    /// Handles a send whose turn it is, with what the store answered for its key if it was
    /// looked up.
    fn send_now(
        &mut self,
        session: SessionId,
        mut req: SendRequest<'_>,
        looked_up: Option<LookedUp>,
        now_ms: u64,
    ) -> Vec<Action> {
        match self.try_send(session, &mut req, looked_up, now_ms) {
            Ok(Ok(actions)) => actions,
            Ok(Err(Wait::Lookup)) => self.park_first(session, req, None, now_ms),
            Ok(Err(Wait::Load(conv, answer))) => {
                self.park_first(session, req, Some((conv, answer)), now_ms)
            }
            // Only a stored message takes the request's id and body; a refused one still has them.
            Err(e) => vec![Action::Send {
                session,
                frame: ServerFrame::rejected(req.cmid, e.code(), e.to_string(), e.retry_after_ms()),
            }],
        }
    }

    /// Tries a send; `Ok(Err(_))` if it must wait for the store first (nothing has changed
    /// then).
    fn try_send(
        &mut self,
        session: SessionId,
        req: &mut SendRequest<'_>,
        looked_up: Option<LookedUp>,
        now_ms: u64,
    ) -> Result<Result<Vec<Action>, Wait>, CoreError> {
        let (conv, to, reply_to) = (req.conv, req.to, req.reply_to);
        let cmid: &str = &req.cmid;
        let (user, device) = match self.sessions.get(&session) {
            Some(s) => (s.user.clone(), s.device.clone()),
            None => return Ok(Ok(Vec::new())),
        };
        validate_id(IdKind::ClientMessage, cmid)?;
        let direct: Arc<str>;
        let conv_id: &str = match (conv, to) {
            (Some(c), None) => {
                validate_id(IdKind::Conversation, c)?;
                c
            }
            (None, Some(peer)) => {
                validate_id(IdKind::User, peer)?;
                direct = self.direct_conv(session, &user, peer);
                &direct
            }
            _ => {
                return Err(CoreError::Invalid(
                    "a send names exactly one of `conv` or `to`".into(),
                ))
            }
        };

        // A resend carries the same body: one too large was never accepted.
        if req.body.len() > self.cfg.limits.max_body_bytes {
            return Err(CoreError::BodyTooLarge {
                len: req.body.len(),
                max: self.cfg.limits.max_body_bytes,
            });
        }

        // A resend inside the dedup window gets the original answer, wherever it is.
        let window = self.cfg.dedup_window_ms;
        let fkey = self.filter.key(&user, cmid);
        let known = self
            .dedup
            .get(&user, cmid)
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
            // A conversation the core does not hold has nothing uncommitted.
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
            };
            if durable {
                return Ok(Ok(vec![accepted_action(waiter)]));
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
                return Ok(Ok(vec![accepted_action(Waiter {
                    session,
                    cmid: Arc::from(cmid),
                    conv: Arc::from(d.conv),
                    seq: d.seq,
                    ts: d.ts,
                })]));
            }
            // The cache forgot an entry the store may not have had when it answered: ask again.
            Some((_, mark)) if self.dedup.lost_since(mark) => return Ok(Err(Wait::Lookup)),
            Some(_) => {}
            None if self.filter.surely_new_key(fkey, now_ms) => {}
            None => return Ok(Err(Wait::Lookup)),
        }

        // A new message: its conversation is needed (the store's answer for its key, if it
        // was looked up, waits with it).
        if !self.touch_held(conv_id) && self.is_cold(conv_id) {
            return Ok(Err(Wait::Load(conv_id.to_string(), looked_up)));
        }

        if !self.convs.contains_key(conv_id) {
            match to {
                Some(_) if reply_to.is_some() => {
                    return Err(CoreError::Invalid(
                        "reply_to names a seq, but this conversation has no messages yet".into(),
                    ))
                }
                Some(peer) => {
                    let members: BTreeSet<String> =
                        [user.to_string(), peer.to_string()].into_iter().collect();
                    let rec = ConvRecord {
                        id: conv_id.to_string(),
                        kind: ConvKind::Direct,
                        epoch: self.rng.next_epoch(),
                        max_seq: 0,
                        first_seq: 1,
                        members,
                        retention: Retention::default(),
                        created_ms: now_ms,
                    };
                    // Creation is only recorded together with its first message below.
                    self.admit(session, conv_id, cmid, &user, now_ms)?;
                    self.convs
                        .insert(conv_id.to_string(), Conv::new(rec, false));
                    let (cmid, body) = (take(&mut req.cmid), take(&mut req.body));
                    let actions = self.append(
                        session, &user, &device, conv_id, cmid, body, None, now_ms, fkey,
                    );
                    self.touch(conv_id);
                    return Ok(Ok(actions));
                }
                None => return Err(CoreError::NoSuchConversation(conv_id.to_string())),
            }
        }
        let c = &self.convs[conv_id];
        if !c.is_member(&user) {
            return Err(CoreError::NotMember(conv_id.to_string()));
        }
        if let Some(r) = reply_to {
            if r == 0 || r > c.rec.max_seq {
                return Err(CoreError::Invalid(format!(
                    "reply_to {r} is not a seq of conversation {conv_id:?} (1..={})",
                    c.rec.max_seq
                )));
            }
        }
        self.admit(session, conv_id, cmid, &user, now_ms)?;
        let (cmid, body) = (take(&mut req.cmid), take(&mut req.body));
        Ok(Ok(self.append(
            session, &user, &device, conv_id, cmid, body, reply_to, now_ms, fkey,
        )))
    }

    /// Parks a send whose key must be looked up (or, with `load`, whose conversation must be
    /// loaded), first in its connection's line (it is the one whose turn it was), and asks for
    /// the lookup or the load.
    fn park_first(
        &mut self,
        session: SessionId,
        req: SendRequest<'_>,
        load: Option<(String, Option<LookedUp>)>,
        now_ms: u64,
    ) -> Vec<Action> {
        let Some(s) = self.sessions.get_mut(&session) else {
            return Vec::new();
        };
        // With nothing parked behind it, a send past the server-wide budget can be refused
        // (and held back) without changing the order of any other.
        let bytes = Parked::size_of(&req);
        if s.parked.is_empty() && self.parked_total + bytes > self.cfg.max_parked_bytes {
            self.refuse_busy(session, &req);
            self.release_busy(session, now_ms);
            return vec![busy(session, req.cmid, "sends of all connections")];
        }
        if let Some((conv, answer)) = load {
            let parked = Parked::new(&req, LookupState::Load(conv.clone(), answer));
            s.parked_bytes += parked.bytes();
            self.parked_total += parked.bytes();
            s.parked.push_front(parked);
            return self.wait_for(&conv, Waiting::Send(session));
        }
        let id = self.next_lookup;
        self.next_lookup += 1;
        let parked = Parked::new(
            &req,
            LookupState::Asked {
                id,
                mark: self.dedup.mark(),
            },
        );
        let lookup = Action::Lookup {
            id,
            user: s.user.to_string(),
            cmid: parked.cmid.clone(),
        };
        s.parked_bytes += parked.bytes();
        self.parked_total += parked.bytes();
        s.parked.push_front(parked);
        self.lookups.insert(id, session);
        self.stats.dedup_lookups += 1;
        vec![lookup]
    }

    /// Parks a send behind the connection's sends that wait for a lookup, asking for its own
    /// lookup at once if it will need one, so that lookups overlap.
    fn park_behind(
        &mut self,
        session: SessionId,
        req: SendRequest<'_>,
        now_ms: u64,
    ) -> Vec<Action> {
        let Some(s) = self.sessions.get_mut(&session) else {
            return Vec::new();
        };
        let bytes = Parked::size_of(&req);
        let full = s.parked.len() >= MAX_PARKED
            || s.parked_bytes + bytes > MAX_PARKED_BYTES
            || self.parked_total + bytes > self.cfg.max_parked_bytes;
        if full || !s.busy_refused.is_empty() {
            self.refuse_busy(session, &req);
            return vec![busy(session, req.cmid, "earlier sends of this connection")];
        }
        let user = s.user.clone();
        let cmid = req.cmid.as_str();
        let needs_lookup = validate_id(IdKind::ClientMessage, cmid).is_ok()
            && self.dedup.get(&user, cmid).is_none()
            && !self.filter.surely_new(&user, cmid, now_ms);
        let mut out = Vec::new();
        let state = if needs_lookup {
            let id = self.next_lookup;
            self.next_lookup += 1;
            self.lookups.insert(id, session);
            self.stats.dedup_lookups += 1;
            out.push(Action::Lookup {
                id,
                user: user.to_string(),
                cmid: cmid.to_string(),
            });
            LookupState::Asked {
                id,
                mark: self.dedup.mark(),
            }
        } else {
            LookupState::NotAsked
        };
        if let Some(s) = self.sessions.get_mut(&session) {
            s.parked_bytes += bytes;
            s.parked.push_back(Parked::new(&req, state));
            self.parked_total += bytes;
        }
        out
    }

    /// Remembers a send refused because the connection had too many waiting (and every later
    /// one until they are through). Once the waiting sends are sequenced, the refused ones are
    /// held back like sends refused for rate ([`HeldBack`](crate::session::HeldBack)), so that
    /// a later send cannot be sequenced before a refused one's resend.
    fn refuse_busy(&mut self, session: SessionId, req: &SendRequest<'_>) {
        let Some(user) = self.sessions.get(&session).map(|s| s.user.clone()) else {
            return;
        };
        let conv: Arc<str> = match (req.conv, req.to) {
            (Some(c), None) if validate_id(IdKind::Conversation, c).is_ok() => Arc::from(c),
            (None, Some(peer)) if validate_id(IdKind::User, peer).is_ok() => {
                self.direct_conv(session, &user, peer)
            }
            _ => return,
        };
        if validate_id(IdKind::ClientMessage, &req.cmid).is_err() {
            return;
        }
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let known = s
            .busy_refused
            .iter()
            .any(|(c, m)| **c == *conv && *m == req.cmid);
        if !known && s.busy_refused.len() < MAX_HELD_BACK {
            s.busy_refused.push((conv.to_string(), req.cmid.clone()));
        }
    }

    /// The connection's waiting sends are all through: the sends refused meanwhile are held back
    /// from now on, in the order they were refused.
    fn release_busy(&mut self, session: SessionId, now_ms: u64) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        if !s.parked.is_empty() || s.busy_refused.is_empty() {
            return;
        }
        for (conv, cmid) in std::mem::take(&mut s.busy_refused) {
            let h = s.held_back.entry(conv).or_default();
            if !h.queue.iter().any(|(c, _)| *c == cmid) && h.queue.len() < MAX_HELD_BACK {
                h.queue.push_back((cmid, now_ms));
            }
        }
    }

    /// The store's answer to [`Action::Lookup`] `id`: `found` is what the key was accepted
    /// as, if the store holds it. Sends that waited for it (and behind it) go on now; returns
    /// what they answer, and maybe further lookups.
    pub fn looked_up(&mut self, id: u64, found: Option<DedupRecord>, now_ms: u64) -> Vec<Action> {
        let Some(session) = self.lookups.remove(&id) else {
            return Vec::new();
        };
        let Some(s) = self.sessions.get_mut(&session) else {
            return Vec::new();
        };
        let Some(p) = s
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
    pub(crate) fn drain_parked(&mut self, session: SessionId, now_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        while let Some(p) = self
            .sessions
            .get_mut(&session)
            .and_then(|s| match s.parked.front() {
                Some(p)
                    if !matches!(p.lookup, LookupState::Asked { .. } | LookupState::Load(..)) =>
                {
                    s.parked.pop_front()
                }
                _ => None,
            })
        {
            let Some(s) = self.sessions.get_mut(&session) else {
                break;
            };
            s.parked_bytes = s.parked_bytes.saturating_sub(p.bytes());
            self.parked_total = self.parked_total.saturating_sub(p.bytes());
            let looked_up = match p.lookup {
                LookupState::Answered { found, mark } => Some((found, mark)),
                _ => None,
            };
            let req = SendRequest {
                conv: p.conv.as_deref(),
                to: p.to.as_deref(),
                cmid: p.cmid,
                body: p.body,
                reply_to: p.reply_to,
            };
            out.extend(self.send_now(session, req, looked_up, now_ms));
        }
        self.release_busy(session, now_ms);
        out
    }

    /// Adds dedup entries the store holds to the filter (a restarted core's filter starts
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

    /// Dedup entries the core holds in memory (the store holds all of them).
    pub fn dedup_cached(&self) -> usize {
        self.dedup.len()
    }

    /// The direct conversation of `user` (the session's) with `peer`, remembered per session: a
    /// client sending to a user names them on every send, and the id is a SHA-256 to compute.
    fn direct_conv(&mut self, session: SessionId, user: &str, peer: &str) -> Arc<str> {
        let Some(s) = self.sessions.get_mut(&session) else {
            return Arc::from(direct_conv_id(user, peer));
        };
        let known = s.direct.get_or_insert_with(Default::default);
        if let Some(id) = known.get(peer) {
            return id.clone();
        }
        if known.len() >= MAX_DIRECT_REMEMBERED {
            known.clear();
        }
        let id: Arc<str> = Arc::from(direct_conv_id(user, peer));
        known.insert(peer.to_string(), id.clone());
        id
    }

    /// The per-user rate limit, applied so that it never reorders one device's messages: once a
    /// send is refused for rate, the same connection's later new sends into that conversation
    /// are refused too until the refused one is resent.
    fn admit(
        &mut self,
        session: SessionId,
        conv_id: &str,
        cmid: &str,
        user: &str,
        now_ms: u64,
    ) -> Result<(), CoreError> {
        let (rate, burst) = (self.cfg.rate_per_sec, self.cfg.rate_burst);
        if let Some(h) = self
            .sessions
            .get_mut(&session)
            .and_then(|s| s.held_back.get_mut(conv_id))
        {
            if h.queue.front().is_some_and(|(c, _)| c == cmid) {
                h.others_resent = 0;
            } else if h.queue.iter().any(|(c, _)| c == cmid) {
                h.others_resent = h.others_resent.saturating_add(1);
            }
            if h.others_resent >= RESENDS_BEFORE_EXPIRY
                && h.queue.front().is_some_and(|(c, at)| {
                    c != cmid && at.saturating_add(HELD_BACK_TTL_MS) < now_ms
                })
            {
                h.queue.pop_front();
                h.others_resent = 0;
            }
            if let Some(entry) = h.queue.iter_mut().find(|(c, _)| c == cmid) {
                entry.1 = now_ms;
            }
            if h.queue.front().is_some_and(|(first, _)| first != cmid) {
                if !h.queue.iter().any(|(c, _)| c == cmid) && h.queue.len() < MAX_HELD_BACK {
                    h.queue.push_back((cmid.to_string(), now_ms));
                }
                return Err(CoreError::HeldBack {
                    earlier: h.queue.front().map(|(c, _)| c.clone()).unwrap_or_default(),
                    retry_after_ms: 1,
                });
            }
        }
        if !self.buckets.contains_key(user) {
            self.buckets
                .insert(user.to_string(), TokenBucket::new(burst, now_ms));
        }
        let taken = match self.buckets.get_mut(user) {
            Some(b) => b.take(rate, burst, now_ms),
            None => Ok(()),
        };
        if let Some(s) = self.sessions.get_mut(&session) {
            match taken {
                Ok(()) => {
                    if let Some(h) = s.held_back.get_mut(conv_id) {
                        if h.queue.front().is_some_and(|(first, _)| first == cmid) {
                            h.queue.pop_front();
                            h.others_resent = 0;
                        }
                        if h.queue.is_empty() {
                            s.held_back.remove(conv_id);
                        }
                    }
                }
                Err(_) => {
                    let h = s.held_back.entry(conv_id.to_string()).or_default();
                    if h.queue.is_empty() {
                        h.queue.push_back((cmid.to_string(), now_ms));
                    }
                }
            }
        }
        taken.map_err(CoreError::RateLimited)
    }

    #[allow(clippy::too_many_arguments)]
    fn append(
        &mut self,
        session: SessionId,
        user: &Arc<str>,
        device: &str,
        conv_id: &str,
        cmid: String,
        body: String,
        reply_to: Option<u64>,
        now_ms: u64,
        fkey: FilterKey,
    ) -> Vec<Action> {
        let Some(conv) = self.convs.get_mut(conv_id) else {
            return Vec::new();
        };
        conv.rec.max_seq += 1;
        let seq = conv.rec.max_seq;
        let conv_key = conv.id.clone();
        let shared_cmid: Arc<str> = Arc::from(cmid.as_str());
        self.pending.messages.push(Arc::new(Message {
            conv: conv_id.to_string(),
            seq,
            from: user.to_string(),
            device: device.to_string(),
            cmid,
            body,
            reply_to,
            ts: now_ms,
        }));
        if !self.pending.convs.contains(conv_id) {
            self.pending.convs.insert(conv_id.to_string());
        }
        let cmid = shared_cmid;
        self.filter.insert_key(fkey, now_ms);
        self.dedup.insert(
            user,
            cmid.clone(),
            conv_key.clone(),
            seq,
            now_ms,
            self.next_batch,
        );
        self.newest_ts = self.newest_ts.max(now_ms);
        self.dedup_stored_since.get_or_insert(now_ms);
        self.pending.waiters.push(Waiter {
            session,
            cmid,
            conv: conv_key,
            seq,
            ts: now_ms,
        });
        Vec::new()
    }

    // ----- positions -----

    fn member_conv(
        &self,
        session: SessionId,
        conv: &str,
    ) -> Result<(Arc<str>, Arc<str>), CoreError> {
        let s = self
            .sessions
            .get(&session)
            .ok_or_else(|| CoreError::Invalid("connection is closed".into()))?;
        validate_id(IdKind::Conversation, conv)?;
        let c = self
            .convs
            .get(conv)
            .filter(|c| c.is_durable())
            .ok_or_else(|| CoreError::NoSuchConversation(conv.to_string()))?;
        if !c.is_durable_member(&s.user) {
            return Err(CoreError::NotMember(conv.to_string()));
        }
        Ok((s.user.clone(), s.device.clone()))
    }

    /// A cumulative delivered position from a device. Positions past what is durable are
    /// clamped; positions behind the current one are ignored (cursors never go back).
    pub fn ack(&mut self, session: SessionId, conv: &str, seq: u64) -> Result<(), CoreError> {
        let (user, device) = self.member_conv(session, conv)?;
        self.move_cursor(&user, &device, conv, Some(seq), None);
        Ok(())
    }

    /// A cumulative read position; reading implies delivery.
    pub fn read(&mut self, session: SessionId, conv: &str, seq: u64) -> Result<(), CoreError> {
        let (user, device) = self.member_conv(session, conv)?;
        self.move_cursor(&user, &device, conv, Some(seq), Some(seq));
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
        let cur = conv.cursors.entry(user, device);
        let before = *cur;
        if let Some(d) = delivered {
            cur.delivered = cur.delivered.max(d.min(cap));
        }
        if let Some(r) = read {
            cur.read = cur.read.max(r.min(cap));
        }
        if *cur != before {
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
        session: SessionId,
        conv: &str,
        after: u64,
        limit: Option<u32>,
    ) -> Result<SyncPlan, CoreError> {
        let (user, device) = self.member_conv(session, conv)?;
        let limit = match limit {
            Some(0) => return Err(CoreError::Invalid("sync limit must be at least 1".into())),
            Some(l) => l.min(self.cfg.limits.max_sync_limit),
            None => self.cfg.default_sync_limit,
        };
        self.move_cursor(&user, &device, conv, Some(after), None);
        if let Some(s) = self.sessions.get_mut(&session) {
            s.reading = Some(conv.to_string());
        }
        let c = &self.convs[conv];
        Ok(SyncPlan {
            conv: conv.to_string(),
            epoch: c.rec.epoch,
            from: after.saturating_add(1),
            to: c.durable_seq,
            limit,
        })
    }

    /// A `sync` answer went out to the device, covering everything up to `up_to`. If the
    /// device is still behind and will not ask again by itself (`has_more` false), it is
    /// told to pull.
    pub fn sync_served(
        &mut self,
        session: SessionId,
        conv: &str,
        up_to: u64,
        has_more: bool,
    ) -> Vec<Action> {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.reading = None;
        }
        // Held while the page was read (see `Session::reading`).
        let Some(c) = self.convs.get(conv) else {
            return Vec::new();
        };
        let durable = c.durable_seq;
        let Some(s) = self.sessions.get_mut(&session) else {
            return Vec::new();
        };
        // A connection's push position starts at its device's delivered position, whichever
        // comes first: a push or a (possibly partial) sync.
        let delivered = c.cursor(&s.user, &s.device).delivered;
        let st = s.convs.entry(conv.to_string()).or_insert(PushState {
            sent_up_to: delivered,
            notified: false,
        });
        st.sent_up_to = st.sent_up_to.max(up_to);
        st.notified = false;
        if !has_more && durable > st.sent_up_to {
            st.notified = true;
            return vec![Action::Send {
                session,
                frame: ServerFrame::Notify {
                    conv: conv.to_string(),
                    max_seq: durable,
                },
            }];
        }
        Vec::new()
    }

    // ----- admin -----

    /// A group as committed.
    pub fn group(&self, id: &str) -> Option<ConvRecord> {
        let c = self.convs.get(id)?;
        let mut rec = c.durable_rec.clone()?;
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
    ) -> Result<Vec<Action>, CoreError> {
        let id = match &op {
            AdminOp::CreateGroup { id, .. }
            | AdminOp::UpdateGroup { id, .. }
            | AdminOp::Get { id } => id,
        };
        validate_id(IdKind::Conversation, id)?;
        // What can be refused without the group is refused before it is loaded.
        match &op {
            AdminOp::CreateGroup { id, members, .. } => {
                if id.starts_with(DIRECT_PREFIX) {
                    return Err(CoreError::Invalid(format!(
                        "group ids may not start with {DIRECT_PREFIX:?}: that prefix is for direct conversations"
                    )));
                }
                validate_members(members)?;
            }
            AdminOp::UpdateGroup { add, remove, .. } => {
                validate_members(add)?;
                validate_members(remove)?;
            }
            AdminOp::Get { .. } => {}
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
                    .ok_or_else(|| CoreError::NoSuchConversation(id.clone()));
                return Ok(vec![Action::AdminDone { ticket, reply }]);
            }
            AdminOp::CreateGroup {
                id,
                members,
                retention,
            } => {
                validate_id(IdKind::Conversation, &id)?;
                if id.starts_with(DIRECT_PREFIX) {
                    return Err(CoreError::Invalid(format!(
                        "group ids may not start with {DIRECT_PREFIX:?}: that prefix is for direct conversations"
                    )));
                }
                if self.convs.contains_key(&id) {
                    return Err(CoreError::AlreadyExists(id));
                }
                let members = validate_members(&members)?;
                let rec = ConvRecord {
                    id: id.clone(),
                    kind: ConvKind::Group,
                    epoch: self.rng.next_epoch(),
                    max_seq: 0,
                    first_seq: 1,
                    members,
                    retention,
                    created_ms: now_ms,
                };
                self.convs.insert(id.clone(), Conv::new(rec, false));
                self.pending.records.insert(id.clone());
                self.pending.admin.push((ticket, id));
            }
            AdminOp::UpdateGroup {
                id,
                add,
                remove,
                retention,
            } => {
                let add = validate_members(&add)?;
                let remove = validate_members(&remove)?;
                let c = self
                    .convs
                    .get_mut(&id)
                    .filter(|c| c.rec.kind == ConvKind::Group)
                    .ok_or_else(|| CoreError::NoSuchConversation(id.clone()))?;
                c.rec.members.extend(add);
                for u in &remove {
                    c.rec.members.remove(u);
                }
                if let Some(r) = retention {
                    c.rec.retention = r;
                }
                for sid in remove.iter().flat_map(|u| self.by_user.get(u)).flatten() {
                    if let Some(s) = self.sessions.get_mut(sid) {
                        s.convs.remove(&id);
                    }
                }
                self.pending.records.insert(id.clone());
                self.pending.admin.push((ticket, id));
            }
        }
        Ok(Vec::new())
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
            if let Some(max) = c.rec.retention.or(default).max_count {
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
            receipts: p.receipts,
        });
        Some(batch)
    }

    /// The batch `id` is durable: release everything that waited on it.
    pub fn commit_done(&mut self, id: u64, outcome: CommitOutcome) -> Vec<Action> {
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
                c.durable_rec = Some(rec);
            }
        }
        for pos in f.positions {
            if let Some(c) = self.convs.get_mut(&pos.id) {
                c.changed = commit;
                c.durable_seq = c.durable_seq.max(pos.max_seq);
                if let Some(d) = c.durable_rec.as_mut() {
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
                    d.first_seq = d.first_seq.max(first);
                }
            } else {
                // Trimmed while not held: a load already under way may have read it before.
                self.trimmed_cold(&cid, first, commit);
            }
        }
        let mut waiters = f.waiters;
        out.extend(waiters.drain(..).map(accepted_action));
        self.spare_waiters = waiters;
        for (ticket, cid) in f.admin {
            let reply = self
                .group(&cid)
                .ok_or_else(|| CoreError::NoSuchConversation(cid.clone()));
            out.push(Action::AdminDone { ticket, reply });
        }
        self.stats.accepted += f.messages.len() as u64;
        let mut messages = f.messages;
        for m in messages.drain(..) {
            self.fan_out(m, &mut out);
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
    /// done (a conversation the core does not hold must have nothing uncommitted).
    pub(crate) fn pinned_convs(&self) -> std::collections::HashSet<&str> {
        let p = &self.pending;
        let mut out: std::collections::HashSet<&str> = std::collections::HashSet::new();
        out.extend(p.convs.iter().map(String::as_str));
        out.extend(p.records.iter().map(String::as_str));
        out.extend(p.cursors.iter().map(|(c, _, _)| c.as_str()));
        out.extend(p.receipts.iter().map(|(c, _)| c.as_str()));
        out.extend(p.waiters.iter().map(|w| &*w.conv));
        out.extend(p.admin.iter().map(|(_, c)| c.as_str()));
        if let Some(f) = &self.in_flight {
            out.extend(f.convs.iter().map(|c| c.id.as_str()));
            out.extend(f.positions.iter().map(|c| c.id.as_str()));
            out.extend(f.cursors.iter().map(|c| c.conv.as_str()));
            out.extend(f.receipts.iter().map(|(c, _)| c.as_str()));
            out.extend(f.waiters.iter().map(|w| &*w.conv));
            out.extend(f.admin.iter().map(|(_, c)| c.as_str()));
            out.extend(f.messages.iter().map(|m| m.conv.as_str()));
        }
        out.extend(self.sessions.values().filter_map(|s| s.reading.as_deref()));
        out
    }

    /// Storage failed: nothing pending or in flight will become durable, and no lookup will be
    /// answered. Every waiting sender and admin request is told to retry. The caller then rebuilds the core from the store,
    /// which is the truth, and drops the connections.
    pub fn abort_all(&mut self, reason: &str) -> Vec<Action> {
        let mut out = Vec::new();
        let pending = std::mem::take(&mut self.pending);
        let (mut waiters, mut admin) = (pending.waiters, pending.admin);
        if let Some(f) = self.in_flight.take() {
            waiters.extend(f.waiters);
            admin.extend(f.admin);
        }
        for w in waiters {
            out.push(Action::Send {
                session: w.session,
                frame: ServerFrame::rejected(
                    w.cmid.to_string(),
                    ErrorCode::Unavailable,
                    format!("the message could not be stored ({reason}); resend it"),
                    Some(1000),
                ),
            });
        }
        // Sends waiting for a lookup will not get one.
        self.lookups.clear();
        self.parked_total = 0;
        for (sid, s) in self.sessions.iter_mut() {
            s.parked_bytes = 0;
            s.busy_refused.clear();
            for p in s.parked.drain(..) {
                out.push(Action::Send {
                    session: *sid,
                    frame: ServerFrame::rejected(
                        p.cmid,
                        ErrorCode::Unavailable,
                        format!("the message could not be checked against the store ({reason}); resend it"),
                        Some(1000),
                    ),
                });
            }
        }
        for (ticket, _) in admin {
            out.push(Action::AdminDone {
                ticket,
                reply: Err(CoreError::Unavailable(format!(
                    "the change could not be stored ({reason}); retry"
                ))),
            });
        }
        out
    }

    fn fan_out(&mut self, m: Arc<Message>, out: &mut Vec<Action>) {
        let Some(c) = self.convs.get(&m.conv) else {
            return;
        };
        let durable = c.durable_seq;
        let window = self.cfg.push_window;
        let mut pushed = Vec::new();
        for user in c.durable_members() {
            let Some(sids) = self.by_user.get(user) else {
                continue;
            };
            for sid in sids {
                let Some(s) = self.sessions.get_mut(sid) else {
                    continue;
                };
                let cursor = c.cursor(user, &s.device);
                if !s.convs.contains_key(&m.conv) {
                    let st = PushState {
                        sent_up_to: cursor.delivered,
                        notified: false,
                    };
                    s.convs.insert(m.conv.clone(), st);
                }
                let Some(st) = s.convs.get_mut(&m.conv) else {
                    continue;
                };
                let in_window = m.seq.saturating_sub(cursor.delivered) <= window;
                if st.sent_up_to + 1 == m.seq && in_window {
                    st.sent_up_to = m.seq;
                    self.stats.pushed += 1;
                    pushed.push(*sid);
                } else if !st.notified && st.sent_up_to < m.seq {
                    st.notified = true;
                    self.stats.notified += 1;
                    out.push(Action::Send {
                        session: *sid,
                        frame: ServerFrame::Notify {
                            conv: m.conv.clone(),
                            max_seq: durable,
                        },
                    });
                }
            }
        }
        if !pushed.is_empty() {
            out.push(Action::Broadcast {
                sessions: pushed,
                frame: ServerFrame::Msg(m),
            });
        }
    }

    fn publish_receipt(&mut self, cid: &str, user: &str, out: &mut Vec<Action>) {
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
        let frame = ServerFrame::Receipt {
            conv: cid.to_string(),
            user: user.to_string(),
            delivered: new.delivered,
            read: new.read,
        };
        for member in c.durable_members() {
            for sid in self.by_user.get(member).into_iter().flatten() {
                out.push(Action::Send {
                    session: *sid,
                    frame: frame.clone(),
                });
            }
        }
    }
}

fn accepted_action(w: Waiter) -> Action {
    Action::Send {
        session: w.session,
        frame: ServerFrame::Accepted {
            cmid: w.cmid.to_string(),
            conv: w.conv.to_string(),
            seq: w.seq,
            ts: w.ts,
        },
    }
}

/// A send refused because too many sends wait for dedup lookups (`whose`).
fn busy(session: SessionId, cmid: String, whose: &str) -> Action {
    let e = CoreError::Busy {
        what: format!("too many {whose} are waiting for the store"),
        retry_after_ms: PARKED_RETRY_MS,
    };
    Action::Send {
        session,
        frame: ServerFrame::rejected(cmid, e.code(), e.to_string(), e.retry_after_ms()),
    }
}

/// A client message id used in another conversation inside its window.
fn reused(cmid: &str, conv: &str) -> CoreError {
    CoreError::Invalid(format!(
        "client message id {cmid:?} was already used in conversation {conv:?}; use a new id per message"
    ))
}

fn validate_members(users: &[String]) -> Result<BTreeSet<String>, CoreError> {
    users
        .iter()
        .map(|u| validate_id(IdKind::User, u).map(|_| u.clone()))
        .collect::<Result<_, _>>()
        .map_err(CoreError::from)
}
