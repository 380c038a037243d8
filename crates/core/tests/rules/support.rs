//! The harness of the rules tests: a core with its durable store and a clock ([`Sim`]), the
//! starting points most tests share (who is in group `g` on which session, under which
//! configuration), and views of the actions the core returns (the frames a session got, the
//! seqs pushed, the answers, the receipts, the single rejection).

use ordo_core::{
    Action, AdminOp, Batch, Core, CoreConfig, CoreError, Handled, MemoryStore, Retention,
    SendRequest, SessionId, Snapshot,
};
use ordo_protocol::{ErrorCode, ServerFrame};
use std::ops::RangeInclusive;

/// The default configuration with the rate limit off, so that tests send freely.
pub fn cfg() -> CoreConfig {
    CoreConfig {
        rate_per_sec: 0.0,
        ..CoreConfig::default()
    }
}

/// The durable store: what a real backend holds after applying the committed batches.
pub type Store = MemoryStore;

/// A core plus its store and a clock.
pub struct Sim {
    pub core: Core,
    pub store: Store,
    pub now: u64,
    next_ticket: u64,
}

impl Sim {
    pub fn new(cfg: CoreConfig) -> Self {
        let mut core = Core::new(cfg, 7, Snapshot::default());
        // A new store holds no dedup key.
        core.dedup_filter_complete();
        Sim {
            core,
            store: Store::default(),
            now: 1_000,
            next_ticket: 1,
        }
    }

    /// A crash and restart: whatever is pending or in flight is lost, the core is rebuilt from
    /// the store (its dedup filter too, as the server does in the background). Sessions must
    /// connect again.
    pub fn restart(&mut self, cfg: CoreConfig) {
        self.restart_cold(cfg);
        let mut after = None;
        loop {
            let page = self.store.dedup_scan(after.as_ref(), 3);
            self.core.dedup_filter_add(&page);
            match page.last() {
                Some(last) if page.len() == 3 => after = Some(last.clone()),
                _ => break,
            }
        }
        self.core.dedup_filter_complete();
    }

    /// Has the core hold `conv` as stored (for tests that call the core's per-conversation
    /// calls directly rather than through frames).
    pub fn warm(&mut self, conv: &str) {
        if let Some(state) = self.store.load_conv(conv) {
            self.core.warm(state);
        }
    }

    /// A restart whose dedup filter is not rebuilt: every key the cache does not hold is
    /// looked up.
    pub fn restart_cold(&mut self, cfg: CoreConfig) {
        self.core = Core::new(cfg, 99, self.store.snapshot());
    }

    /// Answers every dedup lookup and conversation load among `actions` from the store at once
    /// (and those the answers lead to); returns the other actions.
    pub fn answer_lookups(&mut self, actions: Vec<Action>) -> Vec<Action> {
        let mut out = Vec::new();
        let mut queue = actions;
        while !queue.is_empty() {
            let mut next = Vec::new();
            for a in queue {
                match a {
                    Action::Lookup { id, user, cmid } => {
                        let found = self.store.dedup_lookup(&user, &cmid);
                        next.extend(self.core.looked_up(id, found, self.now));
                    }
                    Action::Load { conv } => {
                        let state = self.store.load_conv(&conv);
                        next.extend(self.core.loaded(&conv, state, self.now));
                    }
                    Action::LoadMember { id, ask } => {
                        let page = self.store.member_convs(&ask);
                        next.extend(self.core.member_convs_loaded(id, page));
                    }
                    other => out.push(other),
                }
            }
            queue = next;
        }
        out
    }

    /// A retention tick at `now`, the store answering the step it asks for at once.
    pub fn retention(&mut self, now: u64) {
        for a in self.core.retention_tick(now) {
            if let Action::Sweep(sweep) = a {
                let expired = self.store.expired(&sweep);
                self.core.expired(expired);
            }
        }
    }

    /// Hands `frame` from `sid` to the core as a driver would, answering what it needs from
    /// the store at once; returns the actions (a `sync` is answered with its page).
    pub fn frame(&mut self, sid: SessionId, frame: ordo_protocol::ClientFrame) -> Vec<Action> {
        let actions = match self.core.on_frame(sid, frame, self.now) {
            Handled::Done(a) | Handled::Waits(a) => a,
            Handled::Read(plan) => vec![Action::Reply {
                session: sid,
                plan: Some(plan),
            }],
        };
        let mut out = Vec::new();
        for a in self.answer_lookups(actions) {
            match a {
                Action::Reply {
                    session,
                    plan: Some(plan),
                } => {
                    let page = self.store.read(&plan);
                    let first = self.store.first_seq(&plan.conv);
                    out.extend(self.core.serve_page(session, plan, page, first));
                }
                Action::Reply { plan: None, .. } => {}
                other => out.push(other),
            }
        }
        out
    }

    /// The overview session `sid` gets for `convs` frames, every page of it.
    pub fn overview(&mut self, sid: SessionId) -> Vec<ordo_protocol::ConvInfo> {
        let mut all: Vec<ordo_protocol::ConvInfo> = Vec::new();
        loop {
            let after = all.last().map(|c| c.conv.clone());
            let (page, more) = self.overview_page(sid, after, None);
            all.extend(page);
            if !more {
                return all;
            }
        }
    }

    /// The page of the overview session `sid` gets for one `convs` frame, and whether more
    /// follow.
    pub fn overview_page(
        &mut self,
        sid: SessionId,
        after: Option<String>,
        limit: Option<u32>,
    ) -> (Vec<ordo_protocol::ConvInfo>, bool) {
        let out = self.frame(sid, ordo_protocol::ClientFrame::Convs { after, limit });
        let overviews: Vec<_> = out
            .into_iter()
            .filter_map(|a| match a {
                Action::Send {
                    session,
                    frame:
                        ServerFrame::Convs {
                            conversations,
                            has_more,
                        },
                } if session == sid => Some((conversations, has_more)),
                _ => None,
            })
            .collect();
        assert_eq!(overviews.len(), 1, "one overview page for session {sid}");
        overviews.into_iter().next().unwrap_or_default()
    }

    /// Sends `cmid` into `conv`, answering any dedup lookup it needs at once.
    pub fn send(&mut self, sid: SessionId, conv: &str, cmid: &str) -> Vec<Action> {
        let actions = self.core.send(sid, req(conv, cmid), self.now);
        self.answer_lookups(actions)
    }

    pub fn send_to(&mut self, sid: SessionId, to: &str, cmid: &str) -> Vec<Action> {
        let actions = self.core.send(
            sid,
            SendRequest {
                conv: None,
                to: Some(to),
                cmid: cmid.to_string(),
                body: format!("body of {cmid}"),
                reply_to: None,
            },
            self.now,
        );
        self.answer_lookups(actions)
    }

    /// Sends `m<i>` for every `i` of `numbers`, without committing.
    pub fn send_many(&mut self, sid: SessionId, conv: &str, numbers: RangeInclusive<u64>) {
        for i in numbers {
            self.send(sid, conv, &format!("m{i}"));
        }
    }

    pub fn take(&mut self) -> Batch {
        self.core.take_batch().expect("a batch is pending")
    }

    /// The store makes the batch durable and the core is told.
    pub fn commit(&mut self, b: &Batch) -> Vec<Action> {
        let outcome = self.store.apply(b).expect("no seq is stored twice");
        self.core.commit_done(b.id, outcome)
    }

    /// Asks to add `user` to group `id`, without committing.
    pub fn add_member(&mut self, ticket: u64, id: &str, user: &str) {
        let op = AdminOp::UpdateGroup {
            id: id.into(),
            add: vec![user.into()],
            remove: vec![],
            retention: None,
            leave: vec![],
            name: None,
            metadata: None,
        };
        let actions = self
            .core
            .admin(ticket, op, self.now)
            .expect("a valid change");
        self.answer_lookups(actions);
    }

    pub fn commit_pending(&mut self) {
        let b = self.take();
        self.commit(&b);
    }

    /// Commits everything pending, batch after batch; returns the batches and the actions.
    pub fn flush(&mut self) -> (Vec<Batch>, Vec<Action>) {
        let mut batches = Vec::new();
        let mut out = Vec::new();
        while let Some(b) = self.core.take_batch() {
            out.extend(self.commit(&b));
            batches.push(b);
        }
        (batches, out)
    }

    /// Asks to create group `id`, without committing.
    pub fn create_group(&mut self, ticket: u64, id: &str, members: &[&str], retention: Retention) {
        let op = AdminOp::CreateGroup {
            id: id.to_string(),
            members: members.iter().map(|m| m.to_string()).collect(),
            retention,
            name: None,
            metadata: Default::default(),
        };
        let actions = self.core.admin(ticket, op, self.now).expect("valid group");
        self.answer_lookups(actions);
    }

    /// Creates group `id` and commits it.
    pub fn group(&mut self, id: &str, members: &[&str], retention: Retention) {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.create_group(ticket, id, members, retention);
        let (_, out) = self.flush();
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::AdminDone { ticket: t, reply: Ok(_) } if *t == ticket)));
    }
}

/// A send of `cmid` into `conv` with the body `body of <cmid>`.
pub fn req<'a>(conv: &'a str, cmid: &str) -> SendRequest<'a> {
    SendRequest {
        conv: Some(conv),
        to: None,
        cmid: cmid.to_string(),
        body: format!("body of {cmid}"),
        reply_to: None,
    }
}

/// alice (session 1), alone in group `g`.
pub fn alice_alone_in_g(cfg: CoreConfig) -> Sim {
    let mut s = Sim::new(cfg);
    s.group("g", &["alice"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s
}

/// alice (session 1) and bob (session 2) in group `g`.
pub fn alice_and_bob_in_g(cfg: CoreConfig) -> Sim {
    let mut s = Sim::new(cfg);
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    s
}

/// alice (session 1) in group `g` with bob, allowed one send per second and `burst` at once.
/// Receipts for groups of at most 2: `big` (alice, bob, carol) gets none, `small` (alice, bob)
/// does; alice on session 1, bob on 2.
pub fn big_and_small() -> Sim {
    let mut s = Sim::new(CoreConfig {
        receipt_max_members: 2,
        ..cfg()
    });
    s.group("big", &["alice", "bob", "carol"], Retention::default());
    s.group("small", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    s
}

pub fn one_per_second(burst: f64) -> Sim {
    let mut s = Sim::new(CoreConfig {
        rate_per_sec: 1.0,
        rate_burst: burst,
        ..CoreConfig::default()
    });
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s
}

/// Count retention: only the newest `n` messages are kept.
pub fn keep_last(n: u64) -> Retention {
    Retention {
        max_count: Some(n),
        max_age_ms: None,
    }
}

pub fn frames(actions: &[Action], sid: SessionId) -> Vec<ServerFrame> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { session, frame } if *session == sid => Some(frame.clone()),
            Action::Broadcast { sessions, frame } if sessions.contains(&sid) => Some(frame.clone()),
            _ => None,
        })
        .collect()
}

/// Seqs of the `msg` frames a session got, in order.
pub fn msg_seqs(actions: &[Action], sid: SessionId) -> Vec<u64> {
    frames(actions, sid)
        .into_iter()
        .filter_map(|f| match f {
            ServerFrame::Msg(m) => Some(m.seq),
            _ => None,
        })
        .collect()
}

pub fn notifies(actions: &[Action], sid: SessionId) -> Vec<u64> {
    frames(actions, sid)
        .into_iter()
        .filter_map(|f| match f {
            ServerFrame::Notify { max_seq, .. } => Some(max_seq),
            _ => None,
        })
        .collect()
}

/// (cmid, conv, seq, ts) of every `accepted` a session got.
pub fn accepted(actions: &[Action], sid: SessionId) -> Vec<(String, String, u64, u64)> {
    frames(actions, sid)
        .into_iter()
        .filter_map(|f| match f {
            ServerFrame::Accepted {
                cmid,
                conv,
                seq,
                ts,
            } => Some((cmid, conv, seq, ts)),
            _ => None,
        })
        .collect()
}

/// (user, delivered, read) of every `receipt` a session got.
pub fn receipts(actions: &[Action], sid: SessionId) -> Vec<(String, u64, u64)> {
    frames(actions, sid)
        .into_iter()
        .filter_map(|f| match f {
            ServerFrame::Receipt {
                user,
                delivered,
                read,
                ..
            } => Some((user, delivered, read)),
            _ => None,
        })
        .collect()
}

/// The single `rejected` among the actions: (code, retryable, retry_after_ms).
pub fn rejected(actions: &[Action]) -> (ErrorCode, bool, Option<u64>) {
    let r: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Send {
                frame:
                    ServerFrame::Rejected {
                        code,
                        retryable,
                        retry_after_ms,
                        ..
                    },
                ..
            } => Some((*code, *retryable, *retry_after_ms)),
            _ => None,
        })
        .collect();
    assert_eq!(
        r.len(),
        1,
        "expected exactly one rejection, got {actions:?}"
    );
    assert_eq!(actions.len(), 1, "a rejection comes alone: {actions:?}");
    r[0]
}

pub fn code(r: Result<impl std::fmt::Debug, CoreError>) -> ErrorCode {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.code(),
    }
}

pub fn batch_seqs(b: &Batch, conv: &str) -> Vec<u64> {
    b.messages
        .iter()
        .filter(|m| m.conv == conv)
        .map(|m| m.seq)
        .collect()
}

pub fn info(s: &mut Sim, sid: SessionId, conv: &str) -> ordo_protocol::ConvInfo {
    s.overview(sid)
        .into_iter()
        .find(|c| c.conv == conv)
        .unwrap_or_else(|| panic!("{conv} not in the overview of session {sid}"))
}
