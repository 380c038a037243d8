//! Conversations on demand: the core holds only the conversations in use (*hot*), at most
//! [`CoreConfig::conv_cache_entries`](crate::CoreConfig) of them beyond those pinned by
//! unfinished work; the store holds them all.
//!
//! A frame, send or admin request that needs a conversation the core does not hold waits for
//! it: the core asks once ([`Action::Load`]) and whatever needs it queues behind the load, in
//! arrival order. [`Owner::loaded`] makes it hot and handles what waited. A connection's sends
//! wait in its line of parked sends (as they do for a dedup lookup), so one connection's sends
//! are still sequenced in the order it sent them; a `sync`, `ack` or `read` waits in the
//! conversation's line (a driver holds a waiting `sync`'s reply until [`Action::Reply`]).
//!
//! A conversation is *cold* when the core does not hold it; a cold conversation does not change
//! (every change goes through the core, and a conversation is evicted only once nothing
//! pending or in flight touches it), so a load asked while it was cold is current whenever it
//! is answered. The one exception is age retention, which trims conversations the core does
//! not hold: a load under way when such a trim commits gets the new first seq with its answer. An overview (`convs`) lists the user's conversations from the store
//! ([`Action::LoadMember`]); conversations that were evicted (or trimmed by age retention while
//! not held) while the list was being read may be older in it than what the core had, so then
//! the list is asked for again.
//!
//! Eviction is least-recently-used, in bulk: once more than the cache's worth are hot, the
//! oldest tenth goes (one pass over the stamps, so the cost per eviction stays constant).

use crate::conv::Conv;
use crate::engine::{Action, AdminOp, SessionId, Ticket};
use crate::line::LookupState;
use crate::model::{ConvState, MemberPage, MemberPageAsk};
use crate::owner::{Answer, Out, Owner};
use crate::seam::{Origin, Request, ToHub};
use foldhash::HashMap;
use ordo_protocol::{ConvInfo, ErrorCode, MemberPosition, Position, ServerFrame, MAX_CONVS_LIMIT};
use std::collections::VecDeque;
use std::sync::Arc;

/// Most frames (`sync`, `ack`, `read`) one connection may have waiting for conversations to
/// load; past it, a frame is answered with an `unavailable` error, to be repeated.
const MAX_WAITING_FRAMES: usize = 64;
/// Most overviews one connection may have being listed at once.
const MAX_OVERVIEWS: usize = 2;
/// Members whose records one overview page reads at most (past the first conversation): what
/// bounds the memory of listing a user's conversations, however large the groups.
const OVERVIEW_PAGE_MEMBERS: usize = 20_000;
/// About how many bytes one overview page holds at most (past its first conversation).
const OVERVIEW_PAGE_BYTES: usize = 256 * 1024;
/// How many recent changes (evictions, trims of conversations not held, records rewritten) are
/// remembered at least, to tell whether an overview's list is current; always more than one
/// bulk eviction and one retention step can make (see [`Owner::note_change`]).
const RECENT_CHANGES: usize = 4096;
/// How many times an overview is listed again because conversations changed while it was read;
/// after that it is answered from the last list (a conversation evicted meanwhile may show an
/// older first seq or member list, which the next overview or sync corrects).
const OVERVIEW_ATTEMPTS: u32 = 3;

/// Something that waits for a conversation to be loaded.
#[derive(Clone, Debug)]
pub(crate) enum Waiting {
    /// A request of this connection, handled again once the conversation is loaded.
    Request {
        origin: Origin,
        req: Request,
        now_ms: u64,
    },
    /// The first of the connection's parked sends.
    Send(SessionId),
    /// An admin request.
    Admin {
        ticket: Ticket,
        op: AdminOp,
        now_ms: u64,
    },
    /// A backend post.
    Post(crate::posting::PostJob),
}

/// What the core knows of loading: see the module docs.
#[derive(Default)]
pub(crate) struct Loads {
    /// Conversations asked for and not answered yet, and what waits for each, in order.
    waiting: HashMap<String, Vec<Waiting>>,
    /// Frames waiting per connection.
    frames_of: HashMap<SessionId, usize>,
    /// Overviews being listed, by id.
    overviews: HashMap<u64, Overview>,
    /// Overviews being listed per connection.
    overviews_of: HashMap<SessionId, usize>,
    next_overview: u64,
    /// Changes so far (see [`RECENT_CHANGES`]), and the most recent: (number, conversation,
    /// the commit that last changed it).
    changes: u64,
    recent: VecDeque<(u64, String, u64)>,
    /// Batches committed so far.
    commits: u64,
    /// The use stamp given last.
    clock: u64,
    /// While what waited for a load the store answered with nothing is handled: that
    /// conversation, which does not exist (rather than waiting to be loaded again).
    absent: Option<String>,
    /// Conversations being loaded that age retention trimmed meanwhile: the first seq their load
    /// may not show yet.
    raised: HashMap<String, u64>,
}

/// An overview page being listed.
struct Overview {
    origin: Origin,
    /// The conversations after which the page starts, and how many it may list.
    after: Option<String>,
    limit: usize,
    /// Changes and commits so far when the list was asked for.
    mark: u64,
    commits: u64,
    attempt: u32,
}

impl Conv {
    /// A conversation as the store holds it: its durable view is the whole of it.
    pub fn from_state(state: ConvState) -> Conv {
        let mut conv = Conv::new(state.rec, true);
        for c in state.cursors {
            let pos = crate::conv::Cursor {
                delivered: c.delivered,
                read: c.read,
            };
            *Arc::make_mut(&mut conv.cursors).entry(&c.user, &c.device) = pos;
            *conv.durable_cursors.entry(&c.user, &c.device) = pos;
        }
        let users: Vec<String> = conv.cursors.users().cloned().collect();
        for u in users {
            let pos = conv.durable_user_position(&u);
            conv.published.insert(u, pos);
        }
        conv
    }

    /// The overview entry of this conversation for `user`'s `device`, from its durable view:
    /// members are listed when there are at most `list_max` of them (the aggregates are always
    /// there).
    pub fn info(&self, user: &str, device: &str, list_max: usize) -> ConvInfo {
        let mine = self.durable_cursor(user, device);
        let count = self.durable_member_count();
        let position = |u: &String| self.published.get(u).copied().unwrap_or_default();
        let (mut others_delivered, mut others_read) = (self.durable_seq, self.durable_seq);
        for u in self.durable_members().filter(|u| **u != *user) {
            let p = position(u);
            others_delivered = others_delivered.min(p.delivered);
            others_read = others_read.min(p.read);
        }
        let members = if count <= list_max {
            self.durable_members()
                .map(|u| {
                    let p = position(u);
                    MemberPosition {
                        user: u.clone(),
                        delivered: p.delivered,
                        read: p.read,
                    }
                })
                .collect()
        } else {
            Vec::new()
        };
        ConvInfo {
            conv: self.rec.id.clone(),
            kind: self.rec.kind,
            epoch: self.rec.epoch,
            max_seq: self.durable_seq,
            first_seq: self.durable_first_seq(),
            delivered: mine.delivered,
            read: mine.read,
            member_count: count as u64,
            others_delivered,
            others_read,
            members,
            name: self.durable_rec.as_ref().and_then(|r| r.name.clone()),
        }
    }
}

impl Owner {
    /// Whether `conv` must be loaded before it can be used: the core does not hold it and the
    /// store has not just said it holds none.
    pub(crate) fn is_cold(&self, conv: &str) -> bool {
        !self.convs.contains_key(conv) && self.loads.absent.as_deref() != Some(conv)
    }

    /// Marks `conv` as just used (for eviction).
    pub(crate) fn touch(&mut self, conv: &str) {
        self.touch_held(conv);
    }

    /// Marks `conv` as just used if the core holds it; whether it does (one lookup, for the
    /// per-message path).
    pub(crate) fn touch_held(&mut self, conv: &str) -> bool {
        match self.convs.get_mut(conv) {
            Some(c) => {
                self.loads.clock += 1;
                c.used = self.loads.clock;
                true
            }
            None => false,
        }
    }

    /// Queues `w` behind the load of `conv`, asking for the load if nobody has yet.
    pub(crate) fn wait_for(&mut self, conv: &str, w: Waiting) -> Vec<Out> {
        if let Some(list) = self.loads.waiting.get_mut(conv) {
            list.push(w);
            return Vec::new();
        }
        self.loads.waiting.insert(conv.to_string(), vec![w]);
        self.stats.conv_loads += 1;
        vec![Out::Io(Action::Load {
            conv: conv.to_string(),
        })]
    }

    /// A request that needs cold conversation `conv`: it waits for the load, unless the
    /// connection has too many waiting already.
    pub(crate) fn park_request(
        &mut self,
        origin: &Origin,
        conv: &str,
        req: Request,
        now_ms: u64,
    ) -> Answer {
        let session = origin.session;
        let n = self.loads.frames_of.entry(session).or_insert(0);
        if *n >= MAX_WAITING_FRAMES {
            return Answer::Done(vec![Out::Hub(ToHub::Frame {
                session,
                frame: ServerFrame::error_about(
                    ErrorCode::Unavailable,
                    format!(
                        "{MAX_WAITING_FRAMES} requests of this connection already wait for conversations to load; repeat this one shortly"
                    ),
                    req.about().0,
                    Some(conv),
                ),
            })]);
        }
        *n += 1;
        let outs = self.wait_for(
            conv,
            Waiting::Request {
                origin: origin.clone(),
                req,
                now_ms,
            },
        );
        Answer::Waits(outs)
    }

    /// The `ack` positions whose conversations are cold wait (one frame per conversation); the
    /// others are returned to be applied now.
    pub(crate) fn park_cold_acks(
        &mut self,
        origin: &Origin,
        acks: Vec<Position>,
        now_ms: u64,
        out: &mut Vec<Out>,
    ) -> Vec<Position> {
        let mut hot = Vec::with_capacity(acks.len());
        for p in acks {
            let valid = ordo_protocol::validate_id(ordo_protocol::IdKind::Conversation, &p.conv);
            if valid.is_err() || !self.is_cold(&p.conv) {
                hot.push(p);
                continue;
            }
            let conv = p.conv.clone();
            match self.park_request(origin, &conv, Request::Ack(vec![p]), now_ms) {
                Answer::Done(a) | Answer::Waits(a) => out.extend(a),
                Answer::Read(_) => {}
            }
        }
        hot
    }

    /// The store's answer to [`Action::Load`] of `conv`: the conversation as stored, or `None`
    /// if it holds none. Everything that waited for it is handled now, in order; returns what
    /// that answers.
    pub fn loaded(&mut self, conv: &str, state: Option<ConvState>, now_ms: u64) -> Vec<Out> {
        let Some(waiting) = self.loads.waiting.remove(conv) else {
            return Vec::new();
        };
        let raised = self.loads.raised.remove(conv);
        match state {
            Some(mut state) if !self.convs.contains_key(conv) => {
                // Trimmed by age retention after the store may have read it.
                if let Some(first) = raised {
                    state.rec.first_seq = state.rec.first_seq.max(first);
                }
                self.convs.insert(conv.to_string(), Conv::from_state(state));
            }
            Some(_) => {}
            None => self.loads.absent = Some(conv.to_string()),
        }
        self.touch(conv);
        let mut out = Vec::new();
        for w in waiting {
            match w {
                Waiting::Request {
                    origin,
                    req,
                    now_ms,
                } => {
                    let session = origin.session;
                    if let Some(n) = self.loads.frames_of.get_mut(&session) {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            self.loads.frames_of.remove(&session);
                        }
                    }
                    let reply = matches!(req, Request::Sync { .. });
                    match self.handle(&origin, req, now_ms) {
                        Answer::Done(a) => {
                            out.extend(a);
                            if reply {
                                out.push(Out::Io(Action::Reply {
                                    session,
                                    plan: None,
                                }));
                            }
                        }
                        Answer::Read(plan) => out.push(Out::Io(Action::Reply {
                            session,
                            plan: Some(plan),
                        })),
                        // Cannot happen while `conv` is held or known absent; if it did, the
                        // request waits again and is answered then.
                        Answer::Waits(a) => out.extend(a),
                    }
                }
                Waiting::Send(session) => {
                    let Some(line) = self.lines.get_mut(&session) else {
                        continue;
                    };
                    let Some(front) = line.parked.front_mut() else {
                        continue;
                    };
                    let LookupState::Load(c, answer) = &mut front.lookup else {
                        continue;
                    };
                    if c != conv {
                        continue;
                    }
                    front.lookup = match answer.take() {
                        Some((found, mark)) => LookupState::Answered { found, mark },
                        None => LookupState::NotAsked,
                    };
                    out.extend(self.drain_parked(session, now_ms));
                }
                Waiting::Post(job) => out.extend(self.run_post(job)),
                Waiting::Admin { ticket, op, now_ms } => match self.admin(ticket, op, now_ms) {
                    Ok(a) => out.extend(a),
                    Err(e) => out.push(Out::Io(Action::AdminDone {
                        ticket,
                        reply: Err(e),
                    })),
                },
            }
        }
        self.loads.absent = None;
        self.evict();
        out
    }

    /// A `convs` frame: asks the store for one page of the user's conversations.
    pub(crate) fn ask_overview(
        &mut self,
        origin: &Origin,
        after: Option<String>,
        limit: Option<u32>,
    ) -> Vec<Out> {
        let session = origin.session;
        if self.loads.overviews_of.get(&session).copied().unwrap_or(0) >= MAX_OVERVIEWS {
            return vec![Out::Hub(ToHub::Frame {
                session,
                frame: ServerFrame::error_about(
                    ErrorCode::Unavailable,
                    "an overview for this connection is already being prepared; wait for it",
                    "convs",
                    None,
                ),
            })];
        }
        let limit = limit.unwrap_or(MAX_CONVS_LIMIT).clamp(1, MAX_CONVS_LIMIT) as usize;
        self.list_member_convs(origin.clone(), after, limit, 1)
    }

    fn list_member_convs(
        &mut self,
        origin: Origin,
        after: Option<String>,
        limit: usize,
        attempt: u32,
    ) -> Vec<Out> {
        let ask = MemberPageAsk {
            user: origin.user.to_string(),
            after: after.clone(),
            max_convs: limit,
            max_members: OVERVIEW_PAGE_MEMBERS,
        };
        let session = origin.session;
        self.loads.next_overview += 1;
        let id = self.loads.next_overview;
        let (mark, commits) = (self.loads.changes, self.loads.commits);
        let overview = Overview {
            origin,
            after,
            limit,
            mark,
            commits,
            attempt,
        };
        self.loads.overviews.insert(id, overview);
        *self.loads.overviews_of.entry(session).or_insert(0) += 1;
        self.stats.conv_loads += 1;
        vec![Out::Io(Action::LoadMember { id, ask })]
    }

    /// The store's answer to [`Action::LoadMember`] `id`: one page of the user's conversations
    /// as stored. Answers the `convs` frame that asked, from the page and the core's own copy
    /// of the conversations it holds (newer). If a conversation in the page changed while it
    /// was not held (evicted, or trimmed by age retention) after the page was asked for, the
    /// page may be older than what the core had: it is asked for again, up to three times, and
    /// then shown but not kept. A conversation the user joined meanwhile is added from the
    /// core's copy when it falls in the page's range. The answer ends early once it is large
    /// (about 256 KiB), and says whether more follow.
    pub fn member_convs_loaded(&mut self, id: u64, page: MemberPage) -> Vec<Out> {
        let Some(o) = self.loads.overviews.remove(&id) else {
            return Vec::new();
        };
        let session = o.origin.session;
        let Some(n) = self.loads.overviews_of.get_mut(&session) else {
            // The connection is gone.
            return Vec::new();
        };
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.loads.overviews_of.remove(&session);
        }
        let (user, device): (Arc<str>, Arc<str>) = (o.origin.user.clone(), o.origin.device.clone());
        let (stale, changed) = self.changed_since(o.mark, o.commits, &page.convs);
        if stale && o.attempt < OVERVIEW_ATTEMPTS {
            return self.list_member_convs(o.origin, o.after, o.limit, o.attempt + 1);
        }
        // A list that may be older than the core's view is shown, never kept: a conversation
        // held from it could number a seq the store already has.
        let keep = !stale && self.keep_overviews;
        let list_max = self.cfg.receipt_max_members;
        // The page covers ids after `after`, up to its last one if more follow.
        let end = page
            .more
            .then(|| page.convs.last().map(|s| s.rec.id.clone()))
            .flatten();
        let in_range = |id: &str| {
            o.after.as_deref().is_none_or(|a| id > a) && end.as_deref().is_none_or(|e| id <= e)
        };
        let mut more = page.more;
        let store_last = page.convs.last().map(|s| s.rec.id.clone());
        let mut conversations = Vec::with_capacity(page.convs.len());
        let mut listed = std::collections::HashSet::new();
        for state in page.convs {
            let id = state.rec.id.clone();
            listed.insert(id.clone());
            // What the core holds is newer than (or the same as) what the store held.
            let info = match self.convs.get(&id) {
                Some(c) if c.is_durable_member(&user) => c.info(&user, &device, list_max),
                Some(_) => continue,
                None => {
                    let c = Conv::from_state(state);
                    let info = c.info(&user, &device, list_max);
                    // Keep it: the device is likely to sync it next. (One being loaded is left
                    // to its load, which answers what waits for it.)
                    if keep && !self.loads.waiting.contains_key(&id) {
                        self.convs.insert(id.clone(), c);
                        self.touch(&id);
                    }
                    info
                }
            };
            conversations.push(info);
        }
        // Joined (or created) after the list was read: the core holds its record.
        for id in changed {
            if listed.contains(&id) || !in_range(&id) {
                continue;
            }
            if let Some(c) = self.convs.get(&id).filter(|c| c.is_durable_member(&user)) {
                conversations.push(c.info(&user, &device, list_max));
                listed.insert(id);
            }
        }
        conversations.sort_by(|a, b| a.conv.cmp(&b.conv));
        // Cut to the page's size: in entries (joined ones may have been added) and in bytes.
        let mut bytes = 0;
        let mut fits = 0;
        for info in &conversations {
            if fits >= o.limit || (fits > 0 && bytes >= OVERVIEW_PAGE_BYTES) {
                break;
            }
            bytes += ServerFrame::info_len(info);
            fits += 1;
        }
        if fits < conversations.len() {
            conversations.truncate(fits);
            more = true;
        }
        if conversations.is_empty() && more {
            // Every conversation the store listed was left meanwhile: a page is never empty
            // while more follow, so list the next one.
            if let Some(after) = store_last {
                return self.list_member_convs(o.origin, Some(after), o.limit, 1);
            }
        }
        self.evict();
        vec![Out::Hub(ToHub::Frame {
            session,
            frame: ServerFrame::Convs {
                conversations,
                has_more: more,
            },
        })]
    }

    /// What changed after `mark` (a count of changes; `commits`, of commits, when the list was
    /// asked for): whether the list `states` may be older than the core's view (one of them
    /// changed by a later commit and is not held now, or more changed than are remembered), and
    /// the conversations that changed.
    fn changed_since(&self, mark: u64, commits: u64, states: &[ConvState]) -> (bool, Vec<String>) {
        if self.loads.changes == mark {
            return (false, Vec::new());
        }
        let oldest = self.loads.recent.front().map_or(u64::MAX, |(n, _, _)| *n);
        let forgotten = oldest > mark + 1;
        let recent: Vec<&(u64, String, u64)> = self
            .loads
            .recent
            .iter()
            .filter(|(n, _, _)| *n > mark)
            .collect();
        let stale = forgotten
            || recent.iter().any(|(_, id, changed)| {
                *changed > commits
                    && !self.convs.contains_key(id)
                    && states.iter().any(|s| s.rec.id == *id)
            });
        (
            stale,
            recent.into_iter().map(|(_, id, _)| id.clone()).collect(),
        )
    }

    /// Counts a commit; returns its number.
    pub(crate) fn count_commit(&mut self) -> u64 {
        self.loads.commits += 1;
        self.loads.commits
    }

    /// Age retention trimmed `conv`, which the core does not hold, up to `first`: a load of it
    /// under way gets the new first seq, and an overview listed before is listed again (as
    /// after an eviction: a conversation not held changed).
    pub(crate) fn trimmed_cold(&mut self, conv: &str, first: u64, commit: u64) {
        if self.loads.waiting.contains_key(conv) {
            let r = self.loads.raised.entry(conv.to_string()).or_insert(0);
            *r = (*r).max(first);
        }
        self.note_change(conv.to_string(), commit);
    }

    /// Remembers that `conv` may differ from what a list of conversations read earlier holds:
    /// evicted (then `changed` is the commit that last changed it), trimmed while not held, or
    /// its record (members) rewritten (then `changed` is that commit).
    pub(crate) fn note_change(&mut self, conv: String, changed: u64) {
        self.loads.changes += 1;
        self.loads
            .recent
            .push_back((self.loads.changes, conv, changed));
        let cfg = &self.cfg;
        let keep = RECENT_CHANGES
            .max(cfg.conv_cache_entries / 10 + 2 * cfg.retention_sweep_convs as usize + 1024);
        while self.loads.recent.len() > keep {
            self.loads.recent.pop_front();
        }
    }

    /// A connection is gone: forget its waiting frames and overviews.
    pub(crate) fn forget_waiting(&mut self, session: SessionId) {
        if self.loads.frames_of.remove(&session).is_some() {
            for list in self.loads.waiting.values_mut() {
                list.retain(
                    |w| !matches!(w, Waiting::Request { origin, .. } if origin.session == session),
                );
            }
        }
        // Its overviews being listed are dropped when they are answered.
        self.loads.overviews_of.remove(&session);
    }

    /// Holds `state`, read from the store while the core did not hold that conversation (no
    /// effect if it does): for a driver that knows which conversations are about to be used,
    /// and for tests that call [`Owner::ack`], [`Owner::read`] or [`Owner::sync`] directly (those
    /// act on conversations the core holds; frames load what they need).
    pub fn warm(&mut self, state: ConvState) {
        let id = state.rec.id.clone();
        if self.convs.contains_key(&id) || self.loads.waiting.contains_key(&id) {
            return;
        }
        self.convs.insert(id.clone(), Conv::from_state(state));
        self.touch(&id);
    }

    /// Conversations being loaded.
    pub(crate) fn loads_waiting(&self) -> impl Iterator<Item = &str> {
        self.loads.waiting.keys().map(String::as_str)
    }

    /// Conversations the core holds.
    pub fn convs_held(&self) -> usize {
        self.convs.len()
    }

    /// Evicts the least recently used conversations once more than the cache's worth are held,
    /// down to nine tenths of it; conversations that pending or in-flight work touches stay.
    pub fn evict(&mut self) {
        let cap = self.cfg.conv_cache_entries;
        if self.convs.len() <= cap {
            return;
        }
        let pinned = self.pinned_convs();
        let target = cap - cap / 10;
        let mut stamps: Vec<(u64, &String)> = self
            .convs
            .iter()
            .filter(|(id, _)| !pinned.contains(id.as_str()))
            .map(|(id, c)| (c.used, id))
            .collect();
        let excess = self.convs.len().saturating_sub(target).min(stamps.len());
        if excess == 0 {
            return;
        }
        stamps.select_nth_unstable_by_key(excess - 1, |(used, _)| *used);
        let doomed: Vec<String> = stamps[..excess]
            .iter()
            .map(|(_, id)| (*id).clone())
            .collect();
        for id in doomed {
            let changed = self.convs.remove(&id).map_or(0, |c| c.changed);
            self.note_change(id, changed);
        }
    }
}
