//! The client side: for each device, the real [`ClientState`], its local store (the client
//! crate's in-memory [`MemoryStore`], which survives a crash of its client and refuses writes
//! that break the store's rules or record a message twice), the driver that carries out its effects
//! in order and reconnects with backoff, and the app that sends, reads and watches what it is
//! handed.
//!
//! A client crash loses the state machine and every effect not yet carried out; the restarted
//! one is built from the local store, on a fresh seed and a clock that starts again from zero
//! (the SDK's driver counts milliseconds from its start). Under [`Sabotage::StoreBeforeAck`]
//! the driver carries out the queued `Transmit`s before the `Persist`s queued before them.

use crate::checks::{Kind, Violation};
use crate::faults::Sabotage;
use crate::network::{short, short_s, Conn};
use crate::world::{Receipts, Sim, GROUPS, USERS};
use ordo_client::memory_store::Refused;
use ordo_client::{ClientState, Effect, Event, MemoryStore, RetryPolicy, Status, StoreOp, Target};
use ordo_core::SessionId;
use ordo_protocol::{direct_conv_id, validate_id, IdKind, ServerFrame};
use std::collections::{BTreeMap, HashMap, HashSet};

impl From<Refused> for Violation {
    fn from(r: Refused) -> Violation {
        match r {
            Refused::Rule(detail) => Violation::new(Kind::StoreRule, detail),
            Refused::Duplicate(detail) => Violation::new(Kind::Duplicated, detail),
        }
    }
}

/// One message an app sent (its `send` returned: the outbox write was carried out).
#[derive(Clone, Debug)]
pub struct AppSend {
    pub cmid: String,
    pub conv: String,
    pub body: String,
    /// To a conversation the user may write to; otherwise it must fail.
    pub valid: bool,
}

/// One device: its process (state machine and driver), its store, its app, its clock.
pub struct Dev {
    pub user: &'static str,
    pub device: &'static str,
    /// `None` while crashed.
    pub st: Option<ClientState>,
    pub db: MemoryStore,
    /// The connection this client believes it has.
    pub conn: Option<SessionId>,
    pub connect_at: Option<u64>,
    pub attempt: u32,
    pub restart_at: Option<u64>,
    /// When this process started: its clock reads 0 then.
    pub boot_at: u64,
    /// How far its clock jumped forward since.
    pub skew: u64,
    /// The last tick, on its clock.
    pub last_tick: u64,
    /// Partitioned away from the server until then.
    pub cut_off_until: u64,
    pub boots: u64,
    pub app_at: u64,
    /// cmid -> (conv, body, valid) of `send` calls whose outbox write is not carried out yet.
    pub intents: HashMap<String, (String, String, bool)>,
    pub sends: Vec<AppSend>,
    /// conv -> the last seq the app has: from events, or from the store after a restart.
    pub seen: BTreeMap<String, u64>,
    pub status: HashMap<String, Status>,
    /// cmids the server refused at least once with a retryable rejection (rate limit).
    pub refused: HashSet<String>,
    pub counter: u64,
}

impl Dev {
    /// The device's clock at simulated time `now`.
    pub fn clock(&self, now: u64) -> u64 {
        now - self.boot_at + self.skew
    }

    /// The simulated time at which the device's clock reads `t`.
    pub fn to_sim_time(&self, t: u64) -> u64 {
        (t + self.boot_at).saturating_sub(self.skew)
    }
}

impl Sim {
    pub(crate) fn dev_now(&self, d: usize) -> u64 {
        self.devs[d].clock(self.now)
    }

    pub(crate) fn client_tick(&mut self, d: usize) -> Result<(), Violation> {
        let now = self.dev_now(d);
        let dev = &mut self.devs[d];
        dev.last_tick = now;
        if let Some(st) = dev.st.as_mut() {
            st.tick(now);
            if st.next_deadline().is_some_and(|t| t <= now) {
                self.stats.idle_ticks += 1;
            }
        }
        self.drain(d)
    }

    pub(crate) fn deliver_to_client(&mut self, sid: SessionId) -> Result<(), Violation> {
        let Some(c) = self.conns.get_mut(&sid) else {
            return Ok(());
        };
        let held = self.devs[c.dev].cut_off_until;
        let Some(i) = c.next_s2c(held) else {
            return Ok(());
        };
        let (_, _, f) = c.s2c.remove(i);
        let d = c.dev;
        if self.devs[d].conn != Some(sid) {
            return Ok(());
        }
        tr!(self, "{} <- {}", self.name(d), short_s(&f));
        if let ServerFrame::Rejected {
            cmid,
            retryable: true,
            ..
        } = &f
        {
            self.stats.rejected_retryable += 1;
            self.devs[d].refused.insert(cmid.clone());
        }
        let now = self.dev_now(d);
        if let Some(st) = self.devs[d].st.as_mut() {
            st.frame(f, now);
        }
        self.drain(d)
    }

    pub(crate) fn client_detect(&mut self, sid: SessionId) -> Result<(), Violation> {
        let Some(c) = self.conns.get_mut(&sid) else {
            return Ok(());
        };
        c.client_detect = None;
        let d = c.dev;
        self.forget_dead(sid);
        if self.devs[d].conn != Some(sid) {
            return Ok(());
        }
        tr!(self, "{} sees its connection {sid} drop", self.name(d));
        self.devs[d].conn = None;
        if let Some(st) = self.devs[d].st.as_mut() {
            st.disconnected();
        }
        self.schedule_reconnect(d, 0);
        self.drain(d)
    }

    /// The driver's reconnect backoff, after `wasted` ms spent on a failed attempt.
    fn schedule_reconnect(&mut self, d: usize, wasted: u64) {
        let unit = self.rng.unit();
        let dev = &mut self.devs[d];
        dev.attempt = dev.attempt.saturating_add(1);
        dev.connect_at =
            Some(self.now + wasted + RetryPolicy::reconnect().delay_ms(dev.attempt, unit));
    }

    pub(crate) fn connect(&mut self, d: usize) -> Result<(), Violation> {
        self.devs[d].connect_at = None;
        if !self.server.up {
            tr!(self, "{} cannot connect: server down", self.name(d));
            self.stats.connect_failures += 1;
            self.schedule_reconnect(d, 0);
            return Ok(());
        }
        if self.devs[d].cut_off_until > self.now {
            // The attempt times out somewhere in the partition.
            let wasted = self.rng.range((200, 3_000));
            tr!(self, "{} cannot connect: cut off", self.name(d));
            self.stats.connect_failures += 1;
            self.schedule_reconnect(d, wasted);
            return Ok(());
        }
        let sid = self.next_sid;
        self.next_sid += 1;
        self.conns
            .insert(sid, Conn::new(d, self.server.incarnation, self.now));
        self.accept_connection(sid, d);
        tr!(self, "{} connects as {sid}", self.name(d));
        let now = self.dev_now(d);
        let dev = &mut self.devs[d];
        dev.conn = Some(sid);
        dev.attempt = 0;
        if let Some(st) = dev.st.as_mut() {
            st.connected(now);
        }
        self.drain(d)
    }

    pub(crate) fn client_crash(&mut self, d: usize) {
        self.stats.client_crashes += 1;
        tr!(self, "CLIENT CRASH {}", self.name(d));
        let now = self.now;
        let back = self.rng.range((50, 3_000));
        let detect = self.rng.range((1, 800));
        let dev = &mut self.devs[d];
        let held = dev.cut_off_until;
        dev.st = None;
        dev.connect_at = None;
        dev.restart_at = Some(now + back);
        if let Some(sid) = dev.conn.take() {
            if let Some(c) = self.conns.get_mut(&sid) {
                c.client_detect = None;
                if c.alive {
                    // The kernel still sends what the process wrote, then closes.
                    c.alive = false;
                    c.drain_c2s = true;
                    let fin = (now + detect).max(c.c2s_done(held) + 1).max(held + 1);
                    c.server_detect = Some(fin);
                }
            }
            self.forget_dead(sid);
        }
    }

    pub(crate) fn client_restart(&mut self, d: usize) -> Result<(), Violation> {
        let now = self.now;
        let name = self.name(d);
        // A real client seeds itself at random on every start; so does this one. (The state
        // ignores the seed's lowest bit, and its client message ids come from the seed
        // alone: a restart with the same seed would reuse the ids of the last life.)
        let seed = self.rng.next_u64();
        let faults = self.opts.sabotage.client_faults();
        let dev = &mut self.devs[d];
        dev.restart_at = None;
        dev.boots += 1;
        let mut st = ClientState::new(self.ccfg.clone(), dev.device, seed, dev.db.snapshot());
        st.set_faults(faults);
        dev.st = Some(st);
        // A new process: its clock starts from zero.
        dev.boot_at = now;
        dev.skew = 0;
        dev.last_tick = 0;
        // The restarted app first gets what was stored but not yet handed (the driver does
        // that from the store), so it has everything stored.
        for (conv, row) in &dev.db.convs {
            let seen = dev.seen.entry(conv.clone()).or_default();
            if *seen > row.contiguous {
                return Err(Violation::new(
                    Kind::Lost,
                    format!(
                        "{name}'s app had {conv} up to {seen}, the store only to {}",
                        row.contiguous
                    ),
                ));
            }
            *seen = row.contiguous;
        }
        dev.connect_at = Some(now);
        dev.attempt = 0;
        tr!(self, "{name} restarts");
        self.drain(d)
    }

    pub(crate) fn app(&mut self, d: usize) -> Result<(), Violation> {
        self.devs[d].app_at = self.now + self.rng.range((50, 1_500));
        if self.sends_left > 0 && self.rng.chance(0.6) {
            let n = if self.rng.chance(0.25) {
                self.rng.range((2, 4))
            } else {
                1
            };
            for _ in 0..n {
                if self.sends_left == 0 || self.devs[d].st.is_none() {
                    break;
                }
                self.sends_left -= 1;
                self.app_send(d)?;
            }
        } else if self.rng.chance(0.5) {
            let seen: Vec<(String, u64)> = self.devs[d]
                .seen
                .iter()
                .filter(|(_, s)| **s > 0)
                .map(|(c, s)| (c.clone(), *s))
                .collect();
            if !seen.is_empty() {
                let (conv, seq) = seen[self.rng.index(seen.len())].clone();
                if let Some(st) = self.devs[d].st.as_mut() {
                    st.mark_read(&conv, seq);
                }
                self.drain(d)?;
            }
        }
        Ok(())
    }

    fn app_send(&mut self, d: usize) -> Result<(), Violation> {
        let user = self.devs[d].user;
        let r = self.rng.unit();
        let outside = GROUPS.iter().find(|(_, m)| !m.contains(&user));
        let (target, conv, valid) = if r < 0.03 {
            (Target::Conv("nowhere".into()), "nowhere".to_string(), false)
        } else if let (true, Some((g, _))) = (r < 0.06, outside) {
            (Target::Conv(g.to_string()), g.to_string(), false)
        } else {
            let mut options: Vec<(Target, String)> = Vec::new();
            for (g, members) in GROUPS {
                if members.contains(&user) {
                    options.push((Target::Conv(g.into()), g.into()));
                    options.push((Target::Conv(g.into()), g.into()));
                }
            }
            for u in USERS.iter().filter(|u| **u != user) {
                options.push((Target::User(u.to_string()), direct_conv_id(user, u)));
            }
            let (t, c) = options[self.rng.index(options.len())].clone();
            (t, c, true)
        };
        let seen = self.devs[d].seen.get(&conv).copied().unwrap_or(0);
        let reply_to =
            (valid && matches!(target, Target::Conv(_)) && seen > 0 && self.rng.chance(0.2))
                .then(|| self.rng.range((1, seen)));
        let now = self.dev_now(d);
        let dev = &mut self.devs[d];
        dev.counter += 1;
        let body = format!("{}/{} #{}", dev.user, dev.device, dev.counter);
        let Some(st) = dev.st.as_mut() else {
            return Ok(());
        };
        let cmid = st.send(target, body.clone(), reply_to, now);
        if validate_id(IdKind::ClientMessage, &cmid).is_err() {
            return Err(Violation::new(
                Kind::Other,
                format!("invalid cmid {cmid:?}"),
            ));
        }
        dev.intents.insert(cmid, (conv, body, valid));
        self.drain(d)
    }

    /// The driver: carries out the client's effects in order (sabotaged: transmits first); a
    /// crash may strike before any of them.
    pub(crate) fn drain(&mut self, d: usize) -> Result<(), Violation> {
        let transmits_first = self.opts.sabotage == Sabotage::StoreBeforeAck;
        loop {
            let Some(st) = self.devs[d].st.as_mut() else {
                return Ok(());
            };
            let queue: Vec<Effect> = if transmits_first {
                let all: Vec<Effect> = std::iter::from_fn(|| st.poll_effect()).collect();
                let (mut first, rest): (Vec<Effect>, Vec<Effect>) = all
                    .into_iter()
                    .partition(|e| matches!(e, Effect::Transmit(_)));
                first.extend(rest);
                first
            } else {
                st.poll_effect().into_iter().collect()
            };
            if queue.is_empty() {
                return Ok(());
            }
            for e in queue {
                if self.faults_on && self.rng.chance(self.plan.crash_mid_effects) {
                    tr!(self, "{} crashes before {e:?}", self.name(d));
                    self.client_crash(d);
                    return Ok(());
                }
                self.effect(d, e)?;
            }
        }
    }

    fn effect(&mut self, d: usize, e: Effect) -> Result<(), Violation> {
        let name = self.name(d);
        match e {
            Effect::Persist(ops) => {
                let db = &mut self.devs[d].db;
                let stored = if self.opts.rule_checks {
                    db.apply(&ops)
                } else {
                    db.apply_ignoring_rules(&ops)
                };
                stored.map_err(|r| Violation::from(r).at(&name))?;
                for op in ops {
                    match op {
                        StoreOp::PutPending(p) => {
                            let dev = &mut self.devs[d];
                            if let Some((conv, body, valid)) = dev.intents.remove(&p.cmid) {
                                dev.sends.push(AppSend {
                                    cmid: p.cmid,
                                    conv,
                                    body,
                                    valid,
                                });
                                self.stats.sends += 1;
                            }
                        }
                        StoreOp::PutMessages { conv, messages, .. } => {
                            for m in messages {
                                let theirs = self.server.store.messages.get(&(conv.clone(), m.seq));
                                if theirs != Some(&m) {
                                    return Err(Violation::new(
                                        Kind::Sequence,
                                        format!(
                                            "G3: {name} stored {conv}/{} as {m:?}; the server has {theirs:?}",
                                            m.seq
                                        ),
                                    ));
                                }
                            }
                        }
                        StoreOp::SetConv { reset: true, .. } => {
                            return Err(Violation::new(
                                Kind::Other,
                                format!(
                                    "{name}: epoch reset, but epochs never change here: {op:?}"
                                ),
                            ));
                        }
                        _ => {}
                    }
                }
            }
            Effect::Transmit(f) => {
                self.check_transmit(d, &f)?;
                tr!(self, "{name} sends {}", short(&f));
                let Some(sid) = self.devs[d].conn else {
                    return Err(Violation::new(
                        Kind::Other,
                        format!("{name} transmits {} while disconnected", short(&f)),
                    ));
                };
                self.send_to_server(sid, f);
            }
            Effect::Event(ev) => self.app_event(d, ev)?,
        }
        Ok(())
    }

    fn app_event(&mut self, d: usize, ev: Event) -> Result<(), Violation> {
        let name = self.name(d);
        match ev {
            Event::Message(m) => {
                let seen = self.devs[d].seen.entry(m.conv.clone()).or_default();
                if m.seq != *seen + 1 {
                    let (kind, what) = if m.seq <= *seen {
                        (Kind::AppDuplicate, "again")
                    } else {
                        (Kind::AppOrder, "past a hole")
                    };
                    return Err(Violation::new(
                        kind,
                        format!(
                            "G5: {name}'s app got {}/{} {what}: it had {} up to {}",
                            m.conv, m.seq, m.conv, seen
                        ),
                    ));
                }
                *seen = m.seq;
                self.stats.handed += 1;
                if self.devs[d].db.message(&m.conv, m.seq) != Some(&m) {
                    self.rule(
                        Kind::StoreRule,
                        format!(
                            "{name}: {}/{} handed to the app before it was stored",
                            m.conv, m.seq
                        ),
                    )?;
                }
            }
            Event::Status { cmid, status, .. } => {
                match &status {
                    Status::Sent(seq) => {
                        let rec = self.devs[d].db.accepted.get(&cmid);
                        if rec.map(|r| r.1) != Some(*seq) {
                            return Err(Violation::new(
                                Kind::Other,
                                format!("{name}: {cmid} Sent({seq}) but stored as {rec:?}"),
                            ));
                        }
                    }
                    Status::Delivered | Status::Read if self.opts.receipts == Receipts::Strict => {
                        self.check_status(d, &cmid, &status)?;
                    }
                    _ => {}
                }
                tr!(self, "{name}: {cmid} is {status:?}");
                self.devs[d].status.insert(cmid, status);
            }
            Event::HistoryGap { conv, from, to } => {
                return Err(Violation::new(
                    Kind::Lost,
                    format!("G5: {name} reports {conv} {from}..={to} removed, with no retention"),
                ));
            }
            Event::EpochReset { conv, epoch } => {
                return Err(Violation::new(
                    Kind::Other,
                    format!("{name}: epoch reset of {conv} to {epoch}"),
                ));
            }
            Event::ServerError { code, message } => {
                return Err(Violation::new(
                    Kind::Other,
                    format!("{name} got an error: {code}: {message}"),
                ));
            }
            _ => {}
        }
        Ok(())
    }

    pub(crate) fn read_everything(&mut self) -> Result<(), Violation> {
        tr!(self, "--- every app reads everything ---");
        for d in 0..self.devs.len() {
            let convs: Vec<(String, u64)> = self.devs[d]
                .db
                .convs
                .iter()
                .map(|(c, r)| (c.clone(), r.contiguous))
                .collect();
            for (conv, seq) in convs {
                if let Some(st) = self.devs[d].st.as_mut() {
                    st.mark_read(&conv, seq);
                }
            }
            self.drain(d)?;
        }
        Ok(())
    }
}
