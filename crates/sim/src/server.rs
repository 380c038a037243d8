//! The server side: the real [`Core`] driven the way the server's router drives it (every client
//! frame through [`Core::on_frame`], the same entry point the server uses), a model of its
//! durable store, group commit with one batch in flight, housekeeping, and crashes.
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
use crate::network::short;
use crate::world::Sim;
use ordo_core::{
    may_read, Action, Batch, CommitOutcome, ConvState, Core, CoreConfig, DedupRecord, Expired,
    Handled, MemoryStore, SessionId, SyncPlan,
};
use ordo_protocol::{Limits, ServerFrame};

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
    pub core: Core,
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
}

pub struct PageRead {
    pub at: u64,
    pub session: SessionId,
    pub plan: SyncPlan,
}

pub struct Lookup {
    pub at: u64,
    pub answer: Answer,
}

/// What the store answers a read with, as it stood when the read was asked.
pub enum Answer {
    Key(u64, Option<DedupRecord>),
    Conv(String, Option<ConvState>),
    Member(u64, Vec<ConvState>),
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
        let Some(b) = self.server.core.take_batch() else {
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
        let actions = self.server.core.commit_done(b.id, outcome);
        self.dispatch(actions)
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
        let actions = self.server.core.commit_done(b.id, outcome);
        self.dispatch(actions)?;
        self.pump()
    }

    /// The server's periodic housekeeping, as its router does it: expire dedup entries and
    /// apply retention, on its own clock (which may have jumped).
    pub(crate) fn housekeeping(&mut self) -> Result<(), Violation> {
        self.server.housekeeping_at = self.now + self.rng.range((500, 3_000));
        let now = self.server_now();
        self.server.core.expire_dedup(now);
        let actions = self.server.core.retention_tick(now);
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
        let mut core = Core::new(
            self.server.cfg.clone(),
            self.seed ^ (self.server.incarnation << 40),
            self.server.store.snapshot(),
        );
        core.set_faults(self.opts.sabotage.core_faults());
        self.server.core = core;
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
                self.server.core.disconnect(sid);
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
        let actions = match l.answer {
            Answer::Key(id, found) => {
                tr!(
                    self,
                    "lookup {id} answered: {:?}",
                    found.as_ref().map(|d| (&d.conv, d.seq))
                );
                self.server.core.looked_up(id, found, now)
            }
            Answer::Conv(conv, state) => {
                tr!(self, "load of {conv} answered (held: {})", state.is_some());
                self.server.core.loaded(&conv, state, now)
            }
            Answer::Member(id, states) => {
                tr!(
                    self,
                    "overview {id} listed ({} conversations)",
                    states.len()
                );
                self.server.core.member_convs_loaded(id, states)
            }
            Answer::Expired(expired) => {
                tr!(self, "retention step: {:?}", expired.trims);
                self.server.core.expired(expired);
                Vec::new()
            }
        };
        self.dispatch(actions)?;
        self.pump()
    }

    /// Starts reading the page of `plan` for `sid`: served after a random delay, during which
    /// batches may commit; the connection's next frame waits until then.
    fn read_page(&mut self, sid: SessionId, plan: SyncPlan) {
        if let Some(c) = self.conns.get_mut(&sid) {
            c.reading = true;
        }
        let at = self.now + self.rng.range((0, 40));
        self.server.pages.push(PageRead {
            at,
            session: sid,
            plan,
        });
    }

    /// The earliest page being read is served, from the store as it stands now.
    pub(crate) fn serve_page(&mut self) -> Result<(), Violation> {
        let Some(i) = (0..self.server.pages.len()).min_by_key(|&i| self.server.pages[i].at) else {
            return Ok(());
        };
        let p = self.server.pages.remove(i);
        if let Some(c) = self.conns.get_mut(&p.session) {
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
        let actions = self
            .server
            .core
            .serve_page(p.session, p.plan, page, first_seq);
        self.dispatch(actions)?;
        self.pump()
    }

    /// The store lists a few more dedup keys for the restarted core's filter.
    pub(crate) fn scan_step(&mut self) {
        let Some(scan) = self.server.scan.take() else {
            return;
        };
        let n = self.rng.range((1, 8)) as usize;
        let page = self.server.store.dedup_scan(scan.after.as_ref(), n);
        self.server.core.dedup_filter_add(&page);
        if page.len() < n {
            tr!(self, "dedup filter complete");
            self.server.core.dedup_filter_complete();
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
                Action::LoadMember { id, user } => {
                    self.stats.loads += 1;
                    Some(Answer::Member(*id, self.server.store.member_convs(user)))
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
            if let Action::Reply { session, plan } = a {
                match plan {
                    // A sync that waited for its conversation: its page is read now.
                    Some(plan) => self.read_page(session, plan),
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
        let actions = match self.server.core.on_frame(sid, f, now) {
            Handled::Done(actions) => actions,
            // The page is read off the core's task: the connection's next frame waits for it.
            Handled::Read(plan) => {
                self.read_page(sid, plan);
                Vec::new()
            }
            // The frame waits for a conversation to load (its answer comes with the load's). A
            // `sync` holds the connection's next frame back until it is answered, as a `sync`
            // being read does.
            Handled::Waits(actions) => {
                if waits_for_answer {
                    if let Some(c) = self.conns.get_mut(&sid) {
                        c.reading = true;
                    }
                }
                actions
            }
        };
        self.dispatch(actions)?;
        self.pump()
    }

    /// A device's connection reaches the server: the core learns of the session, and the
    /// device gets its welcome.
    pub(crate) fn accept_connection(&mut self, sid: SessionId, d: usize) {
        let (user, device) = (self.devs[d].user, self.devs[d].device);
        self.server.core.connect(sid, user, device);
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
