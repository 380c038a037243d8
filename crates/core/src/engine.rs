//! The [`Core`]: Ordo's delivery rules as one state machine, events in (connect, frames,
//! admin requests, store answers, commit done, ticks), [`Action`]s out.
//!
//! Inside, it is two halves that speak only through [`crate::seam`]: the
//! [`Owner`] of the conversations (sequencing, dedup, membership, cursors,
//! retention, group commit) and the [`Hub`] of the connections (push windows,
//! `notify`, the held-back order of refused sends, rate buckets). Here they sit in one process
//! and the core hands each event across at once, in order; the seam is where conversations can
//! later live on other nodes.

use crate::config::CoreConfig;
use crate::error::CoreError;
use crate::hub::{Hub, Step};
use crate::model::*;
use crate::owner::{Answer, Out, Owner};
use ordo_protocol::{Message, ServerFrame};
use std::collections::BTreeMap;

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
    /// A durable message whose conversation's members `users` (not its sender) have no
    /// connected device: for an offline push. Only with
    /// [`offline_max_members`](CoreConfig::offline_max_members) set, for conversations of at
    /// most that many members; `epoch` is the conversation's.
    Offline {
        msg: std::sync::Arc<Message>,
        epoch: u64,
        users: Vec<String>,
    },
    /// A backend post ([`Core::post`]) is durable (or was already: a repeat), or was refused.
    Posted {
        ticket: Ticket,
        reply: Result<crate::posting::Posted, CoreError>,
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
    /// List one page of the conversations a user is a member of, as stored, and hand it to
    /// [`Core::member_convs_loaded`] with this `id` (for a `convs` overview).
    LoadMember { id: u64, ask: MemberPageAsk },
    /// Ask the store which conversations of this slice hold messages past their max age, and
    /// hand the answer to [`Core::expired`]. One at a time; may be answered from any store state
    /// after it was asked.
    Sweep(AgeSweep),
    /// Close this connection (WebSocket close code 1013, try again later) with this reason:
    /// the core could no longer keep the order of its refused sends (see
    /// [`crate::held_back`]). The client reconnects and resends its pending messages in order.
    /// The core has already forgotten the connection, as after [`Core::disconnect`].
    Close { session: SessionId, reason: String },
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

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AdminOp {
    /// A new group; each member's joining is recorded in it ([`ordo_protocol::ConvEvent`]).
    CreateGroup {
        id: String,
        members: Vec<String>,
        retention: Retention,
        name: Option<String>,
        metadata: BTreeMap<String, String>,
    },
    /// A change of a group: members added, removed, or reported as having left (each recorded
    /// in the group as an event), its retention, its name (an event too; empty: no name), its
    /// metadata (replaced whole).
    UpdateGroup {
        id: String,
        add: Vec<String>,
        remove: Vec<String>,
        leave: Vec<String>,
        retention: Option<Retention>,
        name: Option<String>,
        metadata: Option<BTreeMap<String, String>>,
    },
    /// The group as committed.
    Get { id: String },
    /// Deletes a group: every member is removed (a `removed` event pushed to their connected
    /// devices), every message, the name and the metadata go; the id may be used again.
    DeleteGroup { id: String },
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
    /// Users whose send rate is tracked now (those connected, and those who sent within the
    /// time their bucket takes to refill, at least).
    pub rate_buckets: u64,
}

/// The two halves, joined in one process.
pub struct Core {
    owner: Owner,
    hub: Hub,
}

impl Core {
    /// Starts the rules over what the store holds: no conversation is loaded until it is used
    /// ([`Action::Load`]). `seed` feeds the generator of epochs and the dedup filter's hash:
    /// random in production, fixed in a simulation. The dedup filter starts empty: the caller
    /// adds the keys the store holds with [`dedup_filter_add`](Self::dedup_filter_add) and then
    /// calls [`dedup_filter_complete`](Self::dedup_filter_complete); meanwhile every send the
    /// cache cannot answer is looked up.
    pub fn new(cfg: CoreConfig, seed: u64, snapshot: Snapshot) -> Self {
        Core {
            hub: Hub::new(cfg.clone()),
            owner: Owner::new(cfg, seed, snapshot),
        }
    }

    /// Test-only: switches off the safeguards `faults` names, so that the simulation can show
    /// it catches the resulting bugs. Only with the `fault-injection` feature.
    #[cfg(feature = "fault-injection")]
    pub fn set_faults(&mut self, faults: crate::fault::Faults) {
        self.owner.set_faults(faults);
    }

    pub fn stats(&self) -> CoreStats {
        let hub = self.hub.stats();
        CoreStats {
            pushed: hub.pushed,
            notified: hub.notified,
            rate_buckets: hub.rate_buckets,
            ..self.owner.stats()
        }
    }

    pub fn config(&self) -> &CoreConfig {
        self.owner.config()
    }

    /// Hands the owner's output across: actions for the driver as they are, events through the
    /// hub, in order.
    fn route(&mut self, outs: Vec<Out>) -> Vec<Action> {
        let mut actions = Vec::with_capacity(outs.len());
        for o in outs {
            match o {
                Out::Io(a) => actions.push(a),
                Out::Hub(e) => self.hub.on_event(e, &mut actions),
            }
        }
        self.forget_closed(&actions);
        actions
    }

    /// A connection the core closes ([`Action::Close`]) is forgotten at once by both halves.
    fn forget_closed(&mut self, actions: &[Action]) {
        for a in actions {
            if let Action::Close { session, .. } = a {
                self.disconnect(*session);
            }
        }
    }

    /// What the hub made of a frame or send: its own answer, or the owner's.
    fn step(&mut self, step: Step, now_ms: u64) -> crate::frame::Handled {
        use crate::frame::Handled;
        match step {
            Step::Done(actions) => {
                self.forget_closed(&actions);
                Handled::Done(actions)
            }
            Step::Ask(origin, req) => match self.owner.handle(&origin, req, now_ms) {
                Answer::Done(outs) => Handled::Done(self.route(outs)),
                Answer::Read(plan) => Handled::Read(plan),
                Answer::Waits(outs) => Handled::Waits(self.route(outs)),
            },
        }
    }

    // ----- connections -----

    pub fn connect(&mut self, session: SessionId, user: &str, device: &str) {
        self.hub.connect(session, user, device);
    }

    pub fn disconnect(&mut self, session: SessionId) {
        self.owner.gone(session);
        self.hub.disconnect(session);
    }

    /// The `msg` of `seq` in `conv` pushed to `session` could not be queued (its queue was
    /// full): the device is pushed nothing more of `conv` until it syncs, as after a `notify`,
    /// and the driver owes it that `notify` once its queue has room. A device is never pushed
    /// past a gap it was not told of, and a reader that keeps up is not dropped for a large
    /// release.
    pub fn push_missed(&mut self, session: SessionId, conv: &str, seq: u64) {
        self.hub.push_missed(session, conv, seq);
    }

    pub fn session_count(&self) -> usize {
        self.hub.session_count()
    }

    // ----- frames -----

    /// Handles one decoded frame from a connected device; see [`crate::frame`].
    pub fn on_frame(
        &mut self,
        session: SessionId,
        frame: ordo_protocol::ClientFrame,
        now_ms: u64,
    ) -> crate::frame::Handled {
        let step = self.hub.on_frame(session, frame, now_ms);
        self.step(step, now_ms)
    }

    /// A `send` from a connected device. Returns the frames to answer with at once (a duplicate
    /// of a durable message, or a rejection); a new message is answered at commit. A send whose
    /// client message id must be looked up in the store returns [`Action::Lookup`] and waits,
    /// and the connection's later sends wait behind it, in order.
    pub fn send(&mut self, session: SessionId, req: SendRequest<'_>, now_ms: u64) -> Vec<Action> {
        let step = self.hub.send(session, req, now_ms);
        match self.step(step, now_ms) {
            crate::frame::Handled::Done(a) | crate::frame::Handled::Waits(a) => a,
            crate::frame::Handled::Read(_) => Vec::new(),
        }
    }

    /// A cumulative delivered position from a device, for a conversation the core holds.
    pub fn ack(&mut self, session: SessionId, conv: &str, seq: u64) -> Result<(), CoreError> {
        let origin = self.origin(session)?;
        self.owner.ack(&origin, conv, seq)
    }

    /// A cumulative read position; reading implies delivery.
    pub fn read(&mut self, session: SessionId, conv: &str, seq: u64) -> Result<(), CoreError> {
        let origin = self.origin(session)?;
        self.owner.read(&origin, conv, seq)
    }

    /// Starts a `sync` of a conversation the core holds: checks membership, applies the
    /// piggybacked ack, and says what to read.
    pub fn sync(
        &mut self,
        session: SessionId,
        conv: &str,
        after: u64,
        limit: Option<u32>,
    ) -> Result<SyncPlan, CoreError> {
        let origin = self.origin(session)?;
        self.owner.sync(&origin, conv, after, limit)
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
        let Ok(origin) = self.origin(session) else {
            return Vec::new();
        };
        let outs = self.owner.sync_served(&origin, conv, up_to, has_more);
        self.route(outs)
    }

    /// Answers a `sync` with the page the store returned for `plan`: `messages` (seqs in
    /// `plan.from..=plan.to`, in order, possibly cut short by a count or size budget) and
    /// `first_seq`, the conversation's lowest stored seq as the store reported it. The `synced`
    /// frame comes first, then whatever the served page makes due (a `notify` if the device is
    /// still behind).
    pub fn serve_page(
        &mut self,
        session: SessionId,
        plan: SyncPlan,
        messages: Vec<Message>,
        first_seq: u64,
    ) -> Vec<Action> {
        let Ok(origin) = self.origin(session) else {
            return Vec::new();
        };
        let outs = self.owner.serve_page(&origin, plan, messages, first_seq);
        self.route(outs)
    }

    fn origin(&self, session: SessionId) -> Result<crate::seam::Origin, CoreError> {
        self.hub
            .origin(session)
            .ok_or_else(|| CoreError::Invalid("connection is closed".into()))
    }

    // ----- store answers -----

    /// The store's answer to [`Action::Lookup`] `id`.
    pub fn looked_up(&mut self, id: u64, found: Option<DedupRecord>, now_ms: u64) -> Vec<Action> {
        let outs = self.owner.looked_up(id, found, now_ms);
        self.route(outs)
    }

    /// The store's answer to [`Action::Load`] of `conv`.
    pub fn loaded(&mut self, conv: &str, state: Option<ConvState>, now_ms: u64) -> Vec<Action> {
        let outs = self.owner.loaded(conv, state, now_ms);
        self.route(outs)
    }

    /// The store's answer to [`Action::LoadMember`] `id`.
    pub fn member_convs_loaded(&mut self, id: u64, page: MemberPage) -> Vec<Action> {
        let outs = self.owner.member_convs_loaded(id, page);
        self.route(outs)
    }

    /// The store's answer to [`Action::Sweep`].
    pub fn expired(&mut self, expired: Expired) {
        self.owner.expired(expired);
    }

    pub fn dedup_filter_add(&mut self, entries: &[DedupRecord]) {
        self.owner.dedup_filter_add(entries);
    }

    pub fn dedup_filter_complete(&mut self) {
        self.owner.dedup_filter_complete();
    }

    pub fn dedup_cached(&self) -> usize {
        self.owner.dedup_cached()
    }

    /// Holds `state`, read from the store, if the core does not hold that conversation yet.
    pub fn warm(&mut self, state: ConvState) {
        self.owner.warm(state);
    }

    pub fn convs_held(&self) -> usize {
        self.owner.convs_held()
    }

    pub fn evict(&mut self) {
        self.owner.evict();
    }

    /// See [`Owner::busy_with`].
    pub fn busy_with(&self, of: &dyn Fn(&str) -> bool) -> bool {
        self.owner.busy_with(of)
    }

    /// See [`Owner::forget_convs`].
    pub fn forget_convs(&mut self, of: &dyn Fn(&str) -> bool) -> Result<usize, CoreError> {
        self.owner.forget_convs(of)
    }

    /// See [`Owner::read_failed`].
    pub fn read_failed(&mut self, session: SessionId) {
        self.owner.read_failed(session);
    }

    /// See [`Owner::set_keep_overviews`].
    pub fn set_keep_overviews(&mut self, keep: bool) {
        self.owner.set_keep_overviews(keep);
    }

    /// See [`Owner::dedup_filter_incomplete`].
    pub fn dedup_filter_incomplete(&mut self) {
        self.owner.dedup_filter_incomplete();
    }

    // ----- admin -----

    /// A group as committed.
    pub fn group(&self, id: &str) -> Option<ConvRecord> {
        self.owner.group(id)
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
        let outs = self.owner.admin(ticket, op, now_ms)?;
        Ok(self.route(outs))
    }

    /// A message of the app's backend: answered with [`Action::Posted`] once durable.
    pub fn post(
        &mut self,
        ticket: Ticket,
        post: crate::posting::AdminPost,
        now_ms: u64,
    ) -> Vec<Action> {
        let outs = self.owner.post(ticket, post, now_ms);
        self.route(outs)
    }

    /// Whether the store can be reached; see [`Owner::set_store_reachable`].
    pub fn set_store_reachable(&mut self, reachable: Result<(), String>) {
        self.owner.set_store_reachable(reachable);
    }

    // ----- ticks -----

    /// Forgets dedup entries older than the window.
    pub fn expire_dedup(&mut self, now_ms: u64) {
        self.owner.expire_dedup(now_ms);
    }

    /// Age-based retention: the next step to ask of the store, if one is due.
    #[must_use]
    pub fn retention_tick(&mut self, now_ms: u64) -> Vec<Action> {
        self.owner.retention_tick(now_ms)
    }

    // ----- group commit -----

    pub fn has_pending(&self) -> bool {
        self.owner.has_pending()
    }

    pub fn in_flight(&self) -> bool {
        self.owner.in_flight()
    }

    /// Hands out the next batch to make durable, if there is something pending and no other
    /// batch is in flight.
    pub fn take_batch(&mut self) -> Option<Batch> {
        self.owner.take_batch()
    }

    /// The batch `id` is durable: release everything that waited on it.
    pub fn commit_done(&mut self, id: u64, outcome: CommitOutcome) -> Vec<Action> {
        let outs = self.owner.commit_done(id, outcome);
        self.route(outs)
    }

    /// Storage failed: every waiting sender and admin request is told to retry. The caller
    /// then rebuilds the core from the store, which is the truth, and drops the connections.
    pub fn abort_all(&mut self, reason: &str) -> Vec<Action> {
        let outs = self.owner.abort_all(reason);
        self.route(outs)
    }

    /// The conversation owner, for a driver that runs the halves apart.
    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    /// The session hub, for a driver that runs the halves apart.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }
}
