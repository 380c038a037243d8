//! The server side: the core's two real halves, the session [`Hub`] and the conversation
//! [`Owner`], driven apart, with the seam between them a channel each way that delays what
//! crosses it (in order), as it would between nodes; a model of the durable store, group commit
//! with one batch in flight, housekeeping, and crashes. Every client frame enters through
//! [`Hub::on_frame`], as it does in the server (whose `Core` hands what crosses the seam over
//! at once).
//!
//! Dedup lookups, conversation loads and users' lists of conversations are answered by the
//! store as it stood when they were asked, after a random delay and in any order; a restarted
//! core's dedup filter is rebuilt page by page from the store meanwhile. The core holds only a
//! handful of conversations, so loads and evictions happen on every seed.
//!
//! A crash loses the core and every connection, and keeps exactly what the store had made
//! durable; the restarted core is rebuilt from the store's snapshot. Under
//! [`Sabotage::FsyncBeforeAccept`] the answers for a batch go out when the batch is taken,
//! before it is durable, and a crash before the fsync rolls the store back.

use crate::checks::{Kind, Violation};
use crate::faults::Sabotage;
use crate::network::{short, short_s};
use crate::world::Sim;
use ordo_core::hub::{Hub, Step};
use ordo_core::owed::{self, Owed};
use ordo_core::owner::{Answer as Owned, Out, Owner};
use ordo_core::seam::{Origin, Request, ToHub};
use ordo_core::{
    may_read, Action, Batch, CommitOutcome, ConvState, CoreConfig, DedupRecord, Expired,
    MemberPage, MemoryStore, SessionId, SyncPlan,
};
use ordo_protocol::{Limits, ServerFrame};
use std::collections::{BTreeMap, VecDeque};

/// What a store backend holds after applying the committed batches: the truth a restarted core
/// is rebuilt from.
pub type ServerStore = MemoryStore;

/// The store applies a batch; a seq stored twice is a G3 violation.
fn apply(store: &mut ServerStore, b: &Batch) -> Result<CommitOutcome, Violation> {
    store
        .apply(b)
        .map_err(|e| Violation::new(Kind::Sequence, format!("G3: {e}")))
}

/// The batch being written. Normally it is not applied to the store until its fsync is done
/// (`at`); sabotaged, it was applied and answered at once, and `rollback` is the store as it
/// was before, which a crash before `at` brings back.
pub struct InFlight {
    pub batch: Option<Batch>,
    pub at: u64,
    pub rollback: Option<ServerStore>,
}

pub struct Server {
    pub cfg: CoreConfig,
    pub owner: Owner,
    pub hub: Hub,
    /// What the hub sent the owner and the owner has not handled yet, in order.
    pub to_owner: VecDeque<(u64, ToOwner)>,
    /// What the owner sent the hub and the hub has not handled yet, in order.
    pub to_hub: VecDeque<(u64, ToHub)>,
    pub store: ServerStore,
    pub up: bool,
    pub restart_at: Option<u64>,
    pub incarnation: u64,
    pub in_flight: Option<InFlight>,
    /// The server's clock minus the simulation's (it jumps; see [`crate::faults`]).
    pub clock_offset: i64,
    pub housekeeping_at: u64,
    /// Dedup lookups, conversation loads and users' lists asked and not answered, with the
    /// store's answer as of when they were asked, in the order they will be answered.
    pub lookups: Vec<Lookup>,
    /// The filter's rebuild after a restart: when the next page comes, and after which entry.
    pub scan: Option<Scan>,
    /// Pages being read for `sync`s: served later (batches may commit meanwhile), read from
    /// the store as it stands then, as the server's connection reads off the core's task.
    pub pages: Vec<PageRead>,
    /// Per connection, what the pushes left out for a full queue are owed as, sent at the next
    /// housekeeping (see [`crate::faults::FaultPlan::push_full`]).
    pub owed: BTreeMap<SessionId, Owed>,
}

pub struct PageRead {
    pub at: u64,
    pub origin: Origin,
    pub plan: SyncPlan,
}

/// What crosses the seam to the owner.
pub enum ToOwner {
    Request(Origin, Request),
    /// The connection is gone (after all its requests).
    Gone(SessionId),
}

/// Most milliseconds something takes to cross the seam.
const SEAM_MS: u64 = 30;

pub struct Lookup {
    pub at: u64,
    pub answer: Answer,
}

/// What the store answers a read with, as it stood when the read was asked.
pub enum Answer {
    Key(u64, Option<DedupRecord>),
    Conv(String, Option<ConvState>),
    Member(u64, MemberPage),
    Expired(Expired),
}

pub struct Scan {
    pub at: u64,
    pub after: Option<DedupRecord>,
}

impl Sim {
    /// The time the server reads from its clock.
    pub(crate) fn server_now(&self) -> u64 {
        (self.now as i64 + self.server.clock_offset).max(0) as u64
    }

    /// Hands the core's next batch to the writer, if it is idle.
    pub(crate) fn pump(&mut self) -> Result<(), Violation> {
        if !self.server.up || self.server.in_flight.is_some() {
            return Ok(());
        }
        let Some(b) = self.server.owner.take_batch() else {
            return Ok(());
        };
        let at = self.now + self.rng.range((1, 25));
        if self.opts.sabotage != Sabotage::FsyncBeforeAccept {
            self.server.in_flight = Some(InFlight {
                batch: Some(b),
                at,
                rollback: None,
            });
            return Ok(());
        }
        // Sabotaged: written (readable) but not yet fsynced, and answered already.
        let rollback = self.server.store.clone();
        let outcome = apply(&mut self.server.store, &b)?;
        tr!(
            self,
            "batch {} ({} messages) answered before its fsync",
            b.id,
            b.messages.len()
        );
        self.server.in_flight = Some(InFlight {
            batch: None,
            at,
            rollback: Some(rollback),
        });
        self.check_cursors(&b)?;
        let outs = self.server.owner.commit_done(b.id, outcome);
        self.owner_outs(outs)
    }

    /// The batch in flight is durable now (fsync returned).
    pub(crate) fn commit(&mut self) -> Result<(), Violation> {
        let Some(mut f) = self.server.in_flight.take() else {
            return Ok(());
        };
        let crash = self.faults_on && self.rng.chance(self.plan.crash_in_commit);
        let Some(b) = f.batch.take() else {
            // Sabotaged: the answers went out long ago; only the fsync is left.
            if crash {
                self.server.in_flight = Some(f);
                tr!(self, "server crash before the fsync of answered changes");
                self.server_crash();
                return Ok(());
            }
            tr!(self, "fsync done");
            return self.pump();
        };
        let outcome = apply(&mut self.server.store, &b)?;
        tr!(
            self,
            "commit batch {} ({} messages)",
            b.id,
            b.messages.len()
        );
        self.check_cursors(&b)?;
        if crash {
            tr!(self, "server crash after the commit, before any answer");
            self.server_crash();
            return Ok(());
        }
        let outs = self.server.owner.commit_done(b.id, outcome);
        self.owner_outs(outs)?;
        self.pump()
    }

    /// The server's periodic housekeeping, as its router does it: expire dedup entries and
    /// apply retention, on its own clock (which may have jumped).
    pub(crate) fn housekeeping(&mut self) -> Result<(), Violation> {
        self.server.housekeeping_at = self.now + self.rng.range((500, 3_000));
        // The queues have room again: the notifies owed go out.
        for (session, mut owed) in std::mem::take(&mut self.server.owed) {
            while let Some(frame) = owed.take_first() {
                tr!(self, "owed {} to session {session}", short_s(&frame));
                self.send_to_client(session, frame);
            }
        }
        let now = self.server_now();
        self.server.owner.expire_dedup(now);
        let actions = self.server.owner.retention_tick(now);
        self.dispatch(actions)?;
        self.pump()
    }

    pub(crate) fn server_crash(&mut self) {
        self.stats.server_crashes += 1;
        tr!(self, "SERVER CRASH");
        self.server.up = false;
        self.server.lookups.clear();
        self.server.scan = None;
        self.server.pages.clear();
        self.server.owed.clear();
        self.server.to_owner.clear();
        self.server.to_hub.clear();
        if let Some(rollback) = self.server.in_flight.take().and_then(|f| f.rollback) {
            tr!(self, "the unsynced batch is lost");
            self.server.store = rollback;
        }
        self.server.incarnation += 1;
        self.server.restart_at = Some(self.now + self.rng.range((50, 2_500)));
        let now = self.now;
        for c in self.conns.values_mut().filter(|c| c.alive || c.drain_c2s) {
            c.close();
            c.client_detect = Some(now + 1 + self.rng.next_u64() % 400);
            c.server_detect = None;
        }
    }

    pub(crate) fn server_restart(&mut self) {
        self.server.restart_at = None;
        let mut owner = Owner::new(
            self.server.cfg.clone(),
            self.seed ^ (self.server.incarnation << 40),
            self.server.store.snapshot(),
        );
        owner.set_faults(self.opts.sabotage.core_faults());
        self.server.owner = owner;
        self.server.hub = Hub::new(self.server.cfg.clone());
        self.server.up = true;
        self.server.scan = Some(Scan {
            at: self.now + self.rng.range((0, 400)),
            after: None,
        });
        tr!(self, "server up (incarnation {})", self.server.incarnation);
    }

    pub(crate) fn server_detect(&mut self, sid: SessionId) {
        let up = self.server.up;
        let inc = self.server.incarnation;
        if let Some(c) = self.conns.get_mut(&sid) {
            c.server_detect = None;
            c.drain_c2s = false;
            if up && c.incarnation == inc {
                self.server.hub.disconnect(sid);
                self.cross_to_owner(ToOwner::Gone(sid));
            }
        }
        self.forget_dead(sid);
    }

    /// The store answers the next lookup (as it stood when it was asked).
    pub(crate) fn answer_lookup(&mut self) -> Result<(), Violation> {
        if self.server.lookups.is_empty() {
            return Ok(());
        }
        let l = self.server.lookups.remove(0);
        let now = self.server_now();
        let outs = match l.answer {
            Answer::Key(id, found) => {
                tr!(
                    self,
                    "lookup {id} answered: {:?}",
                    found.as_ref().map(|d| (&d.conv, d.seq))
                );
                self.server.owner.looked_up(id, found, now)
            }
            Answer::Conv(conv, state) => {
                tr!(self, "load of {conv} answered (held: {})", state.is_some());
                self.server.owner.loaded(&conv, state, now)
            }
            Answer::Member(id, page) => {
                tr!(
                    self,
                    "overview {id} listed ({} conversations, more: {})",
                    page.convs.len(),
                    page.more
                );
                self.server.owner.member_convs_loaded(id, page)
            }
            Answer::Expired(expired) => {
                tr!(self, "retention step: {:?}", expired.trims);
                self.server.owner.expired(expired);
                Vec::new()
            }
        };
        self.owner_outs(outs)?;
        self.pump()
    }

    /// Starts reading the page of `plan` for `origin`: served after a random delay, during
    /// which batches may commit; the connection's next frame waits until then.
    fn read_page(&mut self, origin: Origin, plan: SyncPlan) {
        if let Some(c) = self.conns.get_mut(&origin.session) {
            c.reading = true;
        }
        let at = self.now + self.rng.range((0, 40));
        self.server.pages.push(PageRead { at, origin, plan });
    }

    /// The earliest page being read is served, from the store as it stands now.
    pub(crate) fn serve_page(&mut self) -> Result<(), Violation> {
        let Some(i) = (0..self.server.pages.len()).min_by_key(|&i| self.server.pages[i].at) else {
            return Ok(());
        };
        let p = self.server.pages.remove(i);
        if let Some(c) = self.conns.get_mut(&p.origin.session) {
            c.reading = false;
        }
        let page = self.server.store.read(&p.plan);
        let first_seq = self.server.store.first_seq(&p.plan.conv);
        tr!(
            self,
            "page of {} read ({} messages, plan up to {})",
            p.plan.conv,
            page.len(),
            p.plan.to
        );
        let outs = self
            .server
            .owner
            .serve_page(&p.origin, p.plan, page, first_seq);
        self.owner_outs(outs)?;
        self.pump()
    }

    /// The store lists a few more dedup keys for the restarted core's filter.
    pub(crate) fn scan_step(&mut self) {
        let Some(scan) = self.server.scan.take() else {
            return;
        };
        let n = self.rng.range((1, 8)) as usize;
        let page = self.server.store.dedup_scan(scan.after.as_ref(), n);
        self.server.owner.dedup_filter_add(&page);
        if page.len() < n {
            tr!(self, "dedup filter complete");
            self.server.owner.dedup_filter_complete();
            return;
        }
        self.server.scan = Some(Scan {
            at: self.now + self.rng.range((1, 200)),
            after: page.last().cloned(),
        });
    }

    pub(crate) fn dispatch(&mut self, actions: Vec<Action>) -> Result<(), Violation> {
        for a in ordo_core::per_session(actions) {
            let answer = match &a {
                Action::Lookup { id, user, cmid } => {
                    self.stats.lookups += 1;
                    Some(Answer::Key(*id, self.server.store.dedup_lookup(user, cmid)))
                }
                Action::Load { conv } => {
                    self.stats.loads += 1;
                    Some(Answer::Conv(
                        conv.clone(),
                        self.server.store.load_conv(conv),
                    ))
                }
                Action::LoadMember { id, ask } => {
                    self.stats.loads += 1;
                    Some(Answer::Member(*id, self.server.store.member_convs(ask)))
                }
                Action::Sweep(sweep) => Some(Answer::Expired(self.server.store.expired(sweep))),
                _ => None,
            };
            if let Some(answer) = answer {
                let at = self.now + self.rng.range((1, 60));
                // Answers overtake one another: each goes in at a random place.
                let i = self.rng.range((0, self.server.lookups.len() as u64)) as usize;
                self.server
                    .lookups
                    .insert(i.min(self.server.lookups.len()), Lookup { at, answer });
                continue;
            }
            if let Action::Close { session, reason } = &a {
                // The core closes a connection it can no longer keep in order: both halves
                // forget it, and the device sees it drop.
                tr!(self, "server closes connection {session}: {reason}");
                let session = *session;
                self.server.hub.disconnect(session);
                self.cross_to_owner(ToOwner::Gone(session));
                let now = self.now;
                if let Some(c) = self.conns.get_mut(&session) {
                    c.close();
                    c.client_detect = Some(now + 1);
                    c.server_detect = None;
                }
                continue;
            }
            if let Action::Reply { session, plan } = a {
                match plan {
                    // A sync that waited for its conversation: its page is read now (for a
                    // connection still there).
                    Some(plan) => {
                        if let Some(origin) = self.server.hub.origin(session) {
                            self.read_page(origin, plan);
                        }
                    }
                    // Answered without a page: the connection's next frame may come.
                    None => {
                        if let Some(c) = self.conns.get_mut(&session) {
                            c.reading = false;
                        }
                    }
                }
                continue;
            }
            if let Action::Send { session, frame } = a {
                if let ServerFrame::Msg(m) = &frame {
                    if self.server.store.messages.get(&(m.conv.clone(), m.seq)) != Some(m) {
                        self.rule(
                            Kind::NotDurable,
                            format!("G1: pushed {}/{} is not durable", m.conv, m.seq),
                        )?;
                    }
                }
                if owed::is_push(&frame) {
                    let full = self.faults_on && self.rng.chance(self.plan.push_full);
                    let behind = self
                        .server
                        .owed
                        .get(&session)
                        .is_some_and(|o| o.holds_back(&frame));
                    if full || behind {
                        tr!(
                            self,
                            "queue full: {} left out for session {session}",
                            short_s(&frame)
                        );
                        if let ServerFrame::Msg(m) = &frame {
                            self.server.hub.push_missed(session, &m.conv, m.seq);
                        }
                        self.stats.pushes_left_out += 1;
                        self.server.owed.entry(session).or_default().owe(&frame);
                        continue;
                    }
                }
                self.send_to_client(session, frame);
            }
        }
        Ok(())
    }

    pub(crate) fn deliver_to_server(&mut self, sid: SessionId) -> Result<(), Violation> {
        let Some(c) = self.conns.get_mut(&sid) else {
            return Ok(());
        };
        let held = self.devs[c.dev].cut_off_until;
        let Some(i) = c.next_c2s(held) else {
            return Ok(());
        };
        let (_, _, f) = c.c2s.remove(i);
        let (dev, incarnation) = (c.dev, c.incarnation);
        if !self.server.up || incarnation != self.server.incarnation {
            return Ok(());
        }
        tr!(self, "{} -> {}", self.name(dev), short(&f));
        let now = self.server_now();
        let waits_for_answer = may_read(&f);
        match self.server.hub.on_frame(sid, f, now) {
            Step::Done(actions) => self.dispatch(actions),
            Step::Ask(origin, req) => {
                // A `sync` holds the connection's next frame back until it is answered, as the
                // server's connection does.
                if waits_for_answer {
                    if let Some(c) = self.conns.get_mut(&sid) {
                        c.reading = true;
                    }
                }
                self.cross_to_owner(ToOwner::Request(origin, req));
                Ok(())
            }
        }
    }

    /// Something starts across the seam to the owner: it arrives after a random delay, after
    /// everything sent before it.
    fn cross_to_owner(&mut self, what: ToOwner) {
        let at = seam_time(
            self.now + self.rng.range((0, SEAM_MS)),
            &self.server.to_owner,
        );
        self.server.to_owner.push_back((at, what));
    }

    fn cross_to_hub(&mut self, what: ToHub) {
        let at = seam_time(self.now + self.rng.range((0, SEAM_MS)), &self.server.to_hub);
        self.server.to_hub.push_back((at, what));
    }

    /// The owner handles the next thing the hub sent it.
    pub(crate) fn owner_receive(&mut self) -> Result<(), Violation> {
        let Some((_, what)) = self.server.to_owner.pop_front() else {
            return Ok(());
        };
        let (origin, req) = match what {
            ToOwner::Gone(sid) => {
                self.server.owner.gone(sid);
                return Ok(());
            }
            ToOwner::Request(origin, req) => (origin, req),
        };
        let sync = matches!(req, Request::Sync { .. });
        let now = self.server_now();
        match self.server.owner.handle(&origin, req, now) {
            Owned::Done(outs) => {
                // Answered without a page: the connection's next frame may come.
                if sync {
                    if let Some(c) = self.conns.get_mut(&origin.session) {
                        c.reading = false;
                    }
                }
                self.owner_outs(outs)?;
            }
            // The page is read off the owner's task: the connection's next frame waits for it.
            Owned::Read(plan) => self.read_page(origin, plan),
            // It waits for a conversation to load (a `sync`'s answer comes with the load's).
            Owned::Waits(outs) => self.owner_outs(outs)?,
        }
        self.pump()
    }

    /// The hub handles the next thing the owner sent it.
    pub(crate) fn hub_receive(&mut self) -> Result<(), Violation> {
        let Some((_, event)) = self.server.to_hub.pop_front() else {
            return Ok(());
        };
        let mut actions = Vec::new();
        self.server.hub.on_event(event, &mut actions);
        self.dispatch(actions)
    }

    /// Carries out what the owner said: store reads and admin answers at once, events for the
    /// hub across the seam.
    fn owner_outs(&mut self, outs: Vec<Out>) -> Result<(), Violation> {
        let mut actions = Vec::new();
        for o in outs {
            match o {
                Out::Io(a) => actions.push(a),
                Out::Hub(e) => self.cross_to_hub(e),
            }
        }
        self.dispatch(actions)
    }

    /// A device's connection reaches the server: the core learns of the session, and the
    /// device gets its welcome.
    pub(crate) fn accept_connection(&mut self, sid: SessionId, d: usize) {
        let (user, device) = (self.devs[d].user, self.devs[d].device);
        self.server.hub.connect(sid, user, device);
        let server_time = self.server_now();
        self.send_to_client(
            sid,
            ServerFrame::Welcome {
                user: user.into(),
                device: device.into(),
                protocol: 1,
                server_time,
                limits: Limits::default(),
            },
        );
    }
}

/// When something sent now, `at` at the earliest, arrives after what is ahead of it on `line`.
fn seam_time<T>(at: u64, line: &VecDeque<(u64, T)>) -> u64 {
    line.back().map_or(at, |(last, _)| at.max(*last))
}
