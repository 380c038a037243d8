//! Property: random interleavings of sends, resends, batch takes and commits, acks, syncs and
//! crashes, checked step by step and at the end against a model of every rule (G1-G8).

use crate::support::*;
use ordo_core::{Action, Batch, ConvRecord, CoreConfig, Retention, SessionId};
use ordo_protocol::{direct_conv_id, ErrorCode, ServerFrame};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};

const USERS: [&str; 4] = ["u0", "u1", "u2", "u3"];

/// (user index, device name); u0 has two devices.
const DEVICES: [(usize, &str); 5] = [(0, "p"), (0, "l"), (1, "p"), (2, "p"), (3, "p")];

/// Group "g" holds u0..u2; u3 is a member only of direct conversations.
const GROUP_MEMBERS: [&str; 3] = ["u0", "u1", "u2"];

#[derive(Clone, Debug)]
enum Target {
    Group,
    To(usize),
}

/// Target 0 is the group, 1..=4 the direct conversation with USERS[t - 1] (self included).
const TARGETS: usize = 5;

fn target(t: usize) -> Target {
    match t {
        0 => Target::Group,
        t => Target::To(t - 1),
    }
}

fn conv_of(user: &str, t: &Target) -> String {
    match t {
        Target::Group => "g".to_string(),
        Target::To(p) => direct_conv_id(user, USERS[*p]),
    }
}

#[derive(Clone, Debug)]
enum Op {
    Send {
        dev: usize,
        target: usize,
    },
    Resend {
        dev: usize,
        pick: usize,
        other: Option<usize>,
    },
    Take,
    Commit,
    Ack {
        dev: usize,
        target: usize,
        back: bool,
        read: bool,
    },
    Sync {
        dev: usize,
        target: usize,
        limit: u32,
    },
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..5usize, 0..TARGETS).prop_map(|(dev, target)| Op::Send { dev, target }),
        4 => (0..5usize, any::<usize>(), proptest::option::weighted(0.2, 0..TARGETS))
            .prop_map(|(dev, pick, other)| Op::Resend { dev, pick, other }),
        4 => Just(Op::Take),
        4 => Just(Op::Commit),
        2 => (0..5usize, 0..TARGETS, any::<bool>(), any::<bool>())
            .prop_map(|(dev, target, back, read)| Op::Ack { dev, target, back, read }),
        2 => (0..5usize, 0..TARGETS, 1..4u32)
            .prop_map(|(dev, target, limit)| Op::Sync { dev, target, limit }),
        1 => Just(Op::Crash),
    ]
}

/// One device as the client SDK sees it.
#[derive(Debug, Default)]
struct Dev {
    sid: SessionId,
    /// conv -> seqs received (pushed or synced), in arrival order.
    recv: BTreeMap<String, Vec<u64>>,
    /// conv -> the server asked this device to pull (notify, has_more, or a reconnect).
    needs_sync: BTreeSet<String>,
    /// (conv, user) -> last receipt seen in this session.
    receipts: HashMap<(String, String), (u64, u64)>,
}

impl Dev {
    /// The last seq this device received in `conv` (0: none yet).
    fn last(&self, conv: &str) -> u64 {
        self.recv
            .get(conv)
            .and_then(|r| r.last().copied())
            .unwrap_or(0)
    }
}

struct Model {
    s: Sim,
    in_flight: Option<Batch>,
    devs: Vec<Dev>,
    next_sid: SessionId,
    next_cmid: u64,
    /// (user, cmid, target) of every new send, for resends.
    sent: Vec<(usize, String, usize)>,
    /// (user, cmid) -> conv, as the core's dedup table should hold it.
    keys: HashMap<(String, String), String>,
    /// (user, cmid) -> (conv, seq) from every `accepted`.
    accepted: HashMap<(String, String), (String, u64)>,
    /// sid -> sends not answered yet.
    outstanding: HashMap<SessionId, i64>,
    /// sid -> cmids of the new sends it made, in order.
    fifo: HashMap<SessionId, Vec<(String, String)>>,
    /// (sid, cmid) -> seq answered to that session.
    answered: HashMap<(SessionId, String), u64>,
}

impl Model {
    fn new() -> Self {
        let mut s = Sim::new(CoreConfig {
            push_window: 4,
            ..cfg()
        });
        s.group("g", &GROUP_MEMBERS, Retention::default());
        let mut m = Model {
            s,
            in_flight: None,
            devs: DEVICES.iter().map(|_| Dev::default()).collect(),
            next_sid: 1,
            next_cmid: 0,
            sent: Vec::new(),
            keys: HashMap::new(),
            accepted: HashMap::new(),
            outstanding: HashMap::new(),
            fifo: HashMap::new(),
            answered: HashMap::new(),
        };
        m.connect_all();
        m
    }

    fn connect_all(&mut self) {
        for (i, (u, d)) in DEVICES.iter().enumerate() {
            let sid = self.next_sid;
            self.next_sid += 1;
            self.s.core.connect(sid, USERS[*u], d);
            let dev = &mut self.devs[i];
            dev.sid = sid;
            dev.receipts.clear();
            // A connecting client syncs every conversation it belongs to.
            for c in self.s.store.convs.values() {
                if c.members.contains(USERS[*u]) {
                    dev.needs_sync.insert(c.id.clone());
                }
            }
            self.outstanding.insert(sid, 0);
        }
    }

    fn dev_of(&self, sid: SessionId) -> usize {
        self.devs
            .iter()
            .position(|d| d.sid == sid)
            .expect("frames go to current sessions only")
    }

    fn is_member(&self, conv: &str, user: &str) -> bool {
        self.s
            .store
            .convs
            .get(conv)
            .is_some_and(|c| c.members.contains(user))
    }

    /// Checks and records every frame the core emitted.
    fn process(&mut self, actions: Vec<Action>) {
        for a in ordo_core::per_session(actions) {
            let Action::Send { session, frame } = a else {
                continue;
            };
            let di = self.dev_of(session);
            let user = USERS[DEVICES[di].0].to_string();
            match frame {
                ServerFrame::Accepted {
                    cmid,
                    conv,
                    seq,
                    ts,
                } => {
                    let m = self
                        .s
                        .store
                        .message(&conv, seq)
                        .unwrap_or_else(|| panic!("accepted {conv}/{seq} is not stored"));
                    assert_eq!(
                        (m.from.as_str(), m.cmid.as_str(), m.ts),
                        (user.as_str(), cmid.as_str(), ts)
                    );
                    let key = (user.clone(), cmid.clone());
                    let prev = self.accepted.insert(key.clone(), (conv.clone(), seq));
                    assert!(
                        prev.is_none() || prev == Some((conv, seq)),
                        "{key:?} accepted as {prev:?} and as another seq"
                    );
                    self.answered.insert((session, cmid), seq);
                    *self.outstanding.get_mut(&session).unwrap() -= 1;
                }
                ServerFrame::Rejected { .. } => {
                    *self.outstanding.get_mut(&session).unwrap() -= 1;
                }
                ServerFrame::Msg(m) => {
                    assert_eq!(
                        self.s.store.message(&m.conv, m.seq),
                        Some(&*m),
                        "a pushed msg is durable and as stored"
                    );
                    assert!(self.is_member(&m.conv, &user));
                    self.receive(di, &m.conv, m.seq);
                }
                ServerFrame::Notify { conv, max_seq } => {
                    assert!(self.is_member(&conv, &user));
                    assert!(max_seq <= self.s.store.max_seq(&conv));
                    self.devs[di].needs_sync.insert(conv);
                }
                ServerFrame::Receipt {
                    conv,
                    user: who,
                    delivered,
                    read,
                } => {
                    assert!(self.is_member(&conv, &user));
                    assert!(read <= delivered);
                    assert!(delivered <= self.s.store.max_seq(&conv));
                    let prev = self.devs[di]
                        .receipts
                        .insert((conv, who), (delivered, read))
                        .unwrap_or((0, 0));
                    assert!(delivered >= prev.0 && read >= prev.1, "receipt went back");
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// A device gets a seq: it must be exactly the next one (no gap, no repeat).
    fn receive(&mut self, di: usize, conv: &str, seq: u64) {
        let recv = self.devs[di].recv.entry(conv.to_string()).or_default();
        let expected = recv.last().map_or(1, |l| l + 1);
        assert_eq!(seq, expected, "device {di} in {conv} after {recv:?}");
        recv.push(seq);
    }

    fn do_send(&mut self, di: usize, cmid: String, t: usize, is_resend: bool) {
        let user = USERS[DEVICES[di].0];
        let tgt = target(t);
        let conv = conv_of(user, &tgt);
        let sid = self.devs[di].sid;
        let out = match &tgt {
            Target::Group => self.s.send(sid, "g", &cmid),
            Target::To(p) => self.s.send_to(sid, USERS[*p], &cmid),
        };
        *self.outstanding.get_mut(&sid).unwrap() += 1;
        let key = (user.to_string(), cmid.clone());
        match self.keys.get(&key) {
            Some(c) if *c != conv => {
                assert_eq!(rejected(&out).0, ErrorCode::Invalid);
            }
            Some(_) => {
                // A duplicate: answered now (durable) or at a commit.
                assert!(out.len() <= 1);
            }
            None if matches!(tgt, Target::Group) && !GROUP_MEMBERS.contains(&user) => {
                assert_eq!(rejected(&out).0, ErrorCode::NotFound);
            }
            None => {
                assert!(out.is_empty(), "a new message is answered at commit");
                self.keys.insert(key, conv.clone());
                self.fifo.entry(sid).or_default().push((conv, cmid.clone()));
                if !is_resend {
                    self.sent.push((DEVICES[di].0, cmid, t));
                }
            }
        }
        self.process(out);
    }

    fn take(&mut self) {
        if self.in_flight.is_some() {
            assert!(self.s.core.take_batch().is_none(), "one batch in flight");
            return;
        }
        if let Some(b) = self.s.core.take_batch() {
            for m in &b.messages {
                assert!(
                    !self
                        .s
                        .store
                        .dedup
                        .keys()
                        .any(|(user, cmid)| *user == m.from && *cmid == m.cmid),
                    "a duplicate was stored again: {m:?}"
                );
            }
            self.in_flight = Some(b);
        }
    }

    fn commit(&mut self) {
        let Some(b) = self.in_flight.take() else {
            return;
        };
        let outcome = self.s.store.apply(&b).expect("no seq is stored twice");
        for rec in self.s.store.convs.values() {
            assert_eq!(
                self.s.store.seqs(&rec.id),
                (1..=rec.max_seq).collect::<Vec<_>>(),
                "stored seqs of {} are 1..=max_seq",
                rec.id
            );
        }
        let out = self.s.core.commit_done(b.id, outcome);
        self.process(out);
    }

    fn sync(&mut self, di: usize, t: usize, limit: u32) {
        let user = USERS[DEVICES[di].0];
        let conv = conv_of(user, &target(t));
        let sid = self.devs[di].sid;
        let after = self.devs[di].last(&conv);
        self.s.warm(&conv);
        let res = self.s.core.sync(sid, &conv, after, Some(limit));
        // A non-member gets the answer for a conversation that does not exist.
        if !self.s.store.convs.contains_key(&conv) || !self.is_member(&conv, user) {
            assert_eq!(code(res), ErrorCode::NotFound);
            return;
        }
        let plan = res.expect("a member syncs");
        assert_eq!(
            (plan.from, plan.to),
            (after + 1, self.s.store.max_seq(&conv))
        );
        let msgs = self.s.store.read(&plan);
        for m in &msgs {
            self.receive(di, &conv, m.seq);
        }
        let up_to = msgs.last().map_or(after, |m| m.seq);
        let has_more = up_to < plan.to;
        self.devs[di].needs_sync.remove(&conv);
        if has_more {
            self.devs[di].needs_sync.insert(conv.clone());
        }
        let out = self.s.core.sync_served(sid, &conv, up_to, has_more);
        self.process(out);
    }

    fn ack(&mut self, di: usize, t: usize, back: bool, read: bool) {
        let user = USERS[DEVICES[di].0];
        let conv = conv_of(user, &target(t));
        let sid = self.devs[di].sid;
        let last = self.devs[di].last(&conv);
        let seq = if back { last / 2 } else { last };
        self.s.warm(&conv);
        let res = if read {
            self.s.core.read(sid, &conv, seq)
        } else {
            self.s.core.ack(sid, &conv, seq)
        };
        // A non-member gets the answer for a conversation that does not exist.
        if !self.s.store.convs.contains_key(&conv) || !self.is_member(&conv, user) {
            assert_eq!(code(res), ErrorCode::NotFound);
        } else {
            res.expect("a member acks");
        }
    }

    fn crash(&mut self) {
        self.in_flight = None;
        self.s.restart(CoreConfig {
            push_window: 4,
            ..cfg()
        });
        self.keys = self
            .s
            .store
            .dedup
            .iter()
            .map(|(key, d)| (key.clone(), d.conv.clone()))
            .collect();
        self.connect_all();
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Send { dev, target } => {
                let cmid = format!("c{}", self.next_cmid);
                self.next_cmid += 1;
                self.do_send(dev, cmid, target, false);
            }
            Op::Resend { dev, pick, other } => {
                let user = DEVICES[dev].0;
                let mine: Vec<_> = self.sent.iter().filter(|s| s.0 == user).cloned().collect();
                if mine.is_empty() {
                    return;
                }
                let (_, cmid, t) = mine[pick % mine.len()].clone();
                self.do_send(dev, cmid, other.unwrap_or(t), true);
            }
            Op::Take => self.take(),
            Op::Commit => self.commit(),
            Op::Ack {
                dev,
                target,
                back,
                read,
            } => self.ack(dev, target, back, read),
            Op::Sync { dev, target, limit } => self.sync(dev, target, limit),
            Op::Crash => self.crash(),
        }
    }

    /// Commits everything, then checks the end state.
    fn finish(&mut self) {
        self.commit();
        loop {
            self.take();
            if self.in_flight.is_none() {
                break;
            }
            self.commit();
        }
        // Every send of the current sessions got exactly one answer.
        for d in &self.devs {
            assert_eq!(self.outstanding[&d.sid], 0, "session {} unanswered", d.sid);
        }
        for (sid, n) in &self.outstanding {
            assert!(*n >= 0, "session {sid} got more answers than sends");
        }
        // Every (user, cmid) is stored once, under the seq it was accepted as.
        let mut stored: HashMap<(String, String), Vec<(String, u64)>> = HashMap::new();
        for m in self.s.store.messages.values() {
            stored
                .entry((m.from.clone(), m.cmid.clone()))
                .or_default()
                .push((m.conv.clone(), m.seq));
        }
        for (k, v) in &stored {
            assert_eq!(v.len(), 1, "{k:?} stored as {v:?}");
            let entries: Vec<(String, u64)> = (self.s.store.dedup.values())
                .filter(|d| (&d.user, &d.cmid) == (&k.0, &k.1))
                .map(|d| (d.conv.clone(), d.seq))
                .collect();
            assert_eq!(entries, v.clone());
        }
        for (k, v) in &self.accepted {
            assert_eq!(stored.get(k), Some(&vec![v.clone()]), "{k:?}");
        }
        // Sender FIFO: a session's new sends got increasing seqs per conversation.
        for (sid, sends) in &self.fifo {
            let mut last: HashMap<&str, u64> = HashMap::new();
            for (conv, cmid) in sends {
                if let Some(seq) = self.answered.get(&(*sid, cmid.clone())) {
                    let prev = last.insert(conv, *seq).unwrap_or(0);
                    assert!(*seq > prev, "session {sid} in {conv}: {prev} then {seq}");
                }
            }
        }
        // No device is left behind silently: it is caught up or was told to pull.
        let convs: Vec<ConvRecord> = self.s.store.convs.values().cloned().collect();
        for (di, (u, _)) in DEVICES.iter().enumerate() {
            for c in convs.iter().filter(|c| c.members.contains(USERS[*u])) {
                let d = &self.devs[di];
                let have = d.last(&c.id);
                assert!(
                    have == c.max_seq || d.needs_sync.contains(&c.id),
                    "device {di} stuck at {have} of {} in {} without a notify",
                    c.max_seq,
                    c.id
                );
            }
        }
        // After pulling, every device holds every seq of its conversations, exactly once.
        for (di, (u, _)) in DEVICES.iter().enumerate() {
            for c in convs.iter().filter(|c| c.members.contains(USERS[*u])) {
                let t = (0..TARGETS)
                    .find(|t| conv_of(USERS[*u], &target(*t)) == c.id)
                    .expect("every conversation is reachable");
                for _ in 0..=c.max_seq {
                    self.sync(di, t, 3);
                }
                assert_eq!(
                    self.devs[di].recv.get(&c.id).cloned().unwrap_or_default(),
                    (1..=c.max_seq).collect::<Vec<_>>()
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_interleavings_keep_every_rule(ops in proptest::collection::vec(op(), 1..80)) {
        let mut m = Model::new();
        for op in &ops {
            m.apply(op);
        }
        m.finish();
    }
}
