//! Behaviour tests of the core's delivery rules (contract G1-G9 of ARCHITECTURE.md), through the
//! public API only. The core's in-memory [`MemoryStore`] plays the durable store: it applies
//! committed batches the way any backend must, and rebuilds a [`Snapshot`] for restarts.

use ordo_core::{
    Action, AdminOp, Batch, CommitOutcome, ConvRecord, Core, CoreConfig, CoreError, DedupRecord,
    MemoryStore, Retention, SendRequest, SessionId, Snapshot, SyncPlan,
};
use ordo_protocol::{direct_conv_id, ConvKind, ErrorCode, ServerFrame};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// The default configuration with the rate limit off, so that tests send freely.
fn cfg() -> CoreConfig {
    CoreConfig {
        rate_per_sec: 0.0,
        ..CoreConfig::default()
    }
}

/// The durable store: what a real backend holds after applying the committed batches.
type Store = MemoryStore;

/// A core plus its store and a clock.
struct Sim {
    core: Core,
    store: Store,
    now: u64,
    next_ticket: u64,
}

impl Sim {
    fn new(cfg: CoreConfig) -> Self {
        Sim {
            core: Core::new(cfg, 7, Snapshot::default()),
            store: Store::default(),
            now: 1_000,
            next_ticket: 1,
        }
    }

    /// A crash and restart: whatever is pending or in flight is lost, the core is rebuilt from
    /// the store. Sessions must connect again.
    fn restart(&mut self, cfg: CoreConfig) {
        self.core = Core::new(cfg, 99, self.store.snapshot());
    }

    fn send(&mut self, sid: SessionId, conv: &str, cmid: &str) -> Vec<Action> {
        self.core.send(
            sid,
            SendRequest {
                conv: Some(conv),
                to: None,
                cmid: cmid.to_string(),
                body: format!("body of {cmid}"),
                reply_to: None,
            },
            self.now,
        )
    }

    fn send_to(&mut self, sid: SessionId, to: &str, cmid: &str) -> Vec<Action> {
        self.core.send(
            sid,
            SendRequest {
                conv: None,
                to: Some(to),
                cmid: cmid.to_string(),
                body: format!("body of {cmid}"),
                reply_to: None,
            },
            self.now,
        )
    }

    fn take(&mut self) -> Batch {
        self.core.take_batch().expect("a batch is pending")
    }

    /// The store makes the batch durable and the core is told.
    fn commit(&mut self, b: &Batch) -> Vec<Action> {
        let outcome = self.store.apply(b).expect("no seq is stored twice");
        self.core.commit_done(b.id, outcome)
    }

    /// Asks to add `user` to group `id`, without committing.
    fn add_member(&mut self, ticket: u64, id: &str, user: &str) {
        let op = AdminOp::UpdateGroup {
            id: id.into(),
            add: vec![user.into()],
            remove: vec![],
            retention: None,
        };
        self.core
            .admin(ticket, op, self.now)
            .expect("a valid change");
    }

    fn commit_pending(&mut self) {
        let b = self.take();
        self.commit(&b);
    }

    /// Commits everything pending, batch after batch; returns the batches and the actions.
    fn flush(&mut self) -> (Vec<Batch>, Vec<Action>) {
        let mut batches = Vec::new();
        let mut out = Vec::new();
        while let Some(b) = self.core.take_batch() {
            out.extend(self.commit(&b));
            batches.push(b);
        }
        (batches, out)
    }

    fn group(&mut self, id: &str, members: &[&str], retention: Retention) {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.core
            .admin(
                ticket,
                AdminOp::CreateGroup {
                    id: id.to_string(),
                    members: members.iter().map(|m| m.to_string()).collect(),
                    retention,
                },
                self.now,
            )
            .expect("valid group");
        let (_, out) = self.flush();
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::AdminDone { ticket: t, reply: Ok(_) } if *t == ticket)));
    }
}

fn frames(actions: &[Action], sid: SessionId) -> Vec<ServerFrame> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { session, frame } if *session == sid => Some(frame.clone()),
            Action::Broadcast { sessions, frame } if sessions.contains(&sid) => Some(frame.clone()),
            _ => None,
        })
        .collect()
}

/// "cmid:seq" of every `accepted` a session got, in order.
fn accepted_order(actions: &[Action], sid: SessionId) -> Vec<String> {
    accepted(actions, sid)
        .into_iter()
        .map(|(cmid, _, seq, _)| format!("{cmid}:{seq}"))
        .collect()
}

/// Resends are recognised for one second.
fn short_dedup_window() -> CoreConfig {
    CoreConfig {
        dedup_window_ms: 1_000,
        ..cfg()
    }
}

/// alice (session 1), alone in group `g`.
fn alice_alone_in_g(cfg: CoreConfig) -> Sim {
    let mut s = Sim::new(cfg);
    s.group("g", &["alice"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s
}

/// alice (session 1) in group `g` with bob, allowed one send per second and no burst.
fn one_per_second() -> Sim {
    let mut s = Sim::new(CoreConfig {
        rate_per_sec: 1.0,
        rate_burst: 1.0,
        ..CoreConfig::default()
    });
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s
}

/// Seqs of the `msg` frames a session got, in order.
fn msg_seqs(actions: &[Action], sid: SessionId) -> Vec<u64> {
    frames(actions, sid)
        .into_iter()
        .filter_map(|f| match f {
            ServerFrame::Msg(m) => Some(m.seq),
            _ => None,
        })
        .collect()
}

fn notifies(actions: &[Action], sid: SessionId) -> Vec<u64> {
    frames(actions, sid)
        .into_iter()
        .filter_map(|f| match f {
            ServerFrame::Notify { max_seq, .. } => Some(max_seq),
            _ => None,
        })
        .collect()
}

/// (cmid, conv, seq, ts) of every `accepted` a session got.
fn accepted(actions: &[Action], sid: SessionId) -> Vec<(String, String, u64, u64)> {
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
fn receipts(actions: &[Action], sid: SessionId) -> Vec<(String, u64, u64)> {
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
fn rejected(actions: &[Action]) -> (ErrorCode, bool, Option<u64>) {
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

fn code(r: Result<impl std::fmt::Debug, CoreError>) -> ErrorCode {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.code(),
    }
}

fn batch_seqs(b: &Batch, conv: &str) -> Vec<u64> {
    b.messages
        .iter()
        .filter(|m| m.conv == conv)
        .map(|m| m.seq)
        .collect()
}

fn info(core: &Core, sid: SessionId, conv: &str) -> ordo_protocol::ConvInfo {
    core.overview(sid)
        .into_iter()
        .find(|c| c.conv == conv)
        .unwrap_or_else(|| panic!("{conv} not in the overview of session {sid}"))
}

// ---------------------------------------------------------------------------------------------
// G1 / G3: sequencing and group commit
// ---------------------------------------------------------------------------------------------

#[test]
fn seqs_start_at_one_and_are_gap_free_per_conversation() {
    let mut s = Sim::new(cfg());
    s.group("g1", &["alice", "bob"], Retention::default());
    s.group("g2", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    for i in 0..5 {
        assert!(s.send(1, "g1", &format!("a{i}")).is_empty());
        assert!(s.send(2, "g2", &format!("b{i}")).is_empty());
        assert!(s.send(2, "g1", &format!("c{i}")).is_empty());
    }
    let b = s.take();
    assert_eq!(batch_seqs(&b, "g1"), (1..=10).collect::<Vec<_>>());
    assert_eq!(batch_seqs(&b, "g2"), (1..=5).collect::<Vec<_>>());
    // Both groups were committed before: the batch moves their seq ranges and does not rewrite
    // their records (member lists).
    assert!(b.convs.is_empty());
    let pos = |id: &str| b.positions.iter().find(|p| p.id == id).unwrap().clone();
    assert_eq!(pos("g1").max_seq, 10);
    assert_eq!(pos("g2").max_seq, 5);
    assert!(
        b.dedup_put.is_empty(),
        "every message is its own dedup entry"
    );
    s.commit(&b);
    assert_eq!(s.store.dedup.len(), 15);

    s.send(1, "g1", "late1");
    s.send(1, "g2", "late2");
    let b = s.take();
    assert_eq!(batch_seqs(&b, "g1"), vec![11]);
    assert_eq!(batch_seqs(&b, "g2"), vec![6]);
    s.commit(&b);
    assert_eq!(s.store.seqs("g1"), (1..=11).collect::<Vec<_>>());
    assert_eq!(s.store.seqs("g2"), (1..=6).collect::<Vec<_>>());
    assert_eq!(info(&s.core, 1, "g1").max_seq, 11);
    assert_eq!(s.core.stats().accepted, 17);
}

#[test]
fn nothing_is_visible_before_its_batch_commits() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");

    assert!(s.send(1, "g", "m1").is_empty(), "no answer before commit");
    assert_eq!(info(&s.core, 2, "g").max_seq, 0);
    assert_eq!(s.core.sync(2, "g", 0, None).unwrap().to, 0);
    let b1 = s.take();
    assert!(s.send(1, "g", "m2").is_empty());
    // In flight is not durable either.
    assert_eq!(info(&s.core, 2, "g").max_seq, 0);
    assert_eq!(s.core.sync(2, "g", 0, None).unwrap().to, 0);
    assert_eq!(s.core.stats().accepted, 0);
    assert_eq!(s.core.stats().pushed, 0);

    let out = s.commit(&b1);
    assert_eq!(accepted(&out, 1).len(), 1, "only m1 is durable: {out:?}");
    assert_eq!(accepted(&out, 1)[0].2, 1);
    assert_eq!(msg_seqs(&out, 1), vec![1]);
    assert_eq!(msg_seqs(&out, 2), vec![1]);
    assert_eq!(info(&s.core, 2, "g").max_seq, 1);
    assert_eq!(s.core.sync(2, "g", 0, None).unwrap().to, 1);

    let (_, out) = s.flush();
    assert_eq!(accepted(&out, 1)[0].2, 2);
    assert_eq!(msg_seqs(&out, 2), vec![2]);
}

#[test]
fn a_new_group_is_invisible_and_unanswered_until_durable() {
    let mut s = Sim::new(cfg());
    s.core.connect(1, "alice", "a1");
    s.core
        .admin(
            42,
            AdminOp::CreateGroup {
                id: "g".into(),
                members: vec!["alice".into()],
                retention: Retention::default(),
            },
            s.now,
        )
        .unwrap();
    assert!(s.core.group("g").is_none());
    assert!(s.core.overview(1).is_empty());
    assert_eq!(code(s.core.sync(1, "g", 0, None)), ErrorCode::NotFound);
    let b = s.take();
    assert_eq!(b.convs.len(), 1);
    assert_eq!(b.convs[0].kind, ConvKind::Group);
    let out = s.commit(&b);
    match &out[..] {
        [Action::AdminDone {
            ticket: 42,
            reply: Ok(rec),
        }] => {
            assert_eq!(rec.id, "g");
            assert_eq!(rec.members, BTreeSet::from(["alice".to_string()]));
            assert_eq!(rec.max_seq, 0);
            assert_ne!(rec.epoch, 0);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(s.core.overview(1).len(), 1);
}

#[test]
fn one_batch_in_flight_and_pending_sends_join_the_next() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    assert!(s.core.take_batch().is_none(), "nothing pending");
    assert!(!s.core.has_pending());

    s.send(1, "g", "m1");
    assert!(s.core.has_pending());
    let b1 = s.take();
    assert!(s.core.in_flight());
    assert!(
        s.core.take_batch().is_none(),
        "one batch in flight at a time"
    );
    s.send(1, "g", "m2");
    s.send(1, "g", "m3");
    assert!(s.core.take_batch().is_none(), "still in flight");

    // A report for another batch changes nothing.
    assert!(s
        .core
        .commit_done(b1.id + 100, CommitOutcome::default())
        .is_empty());
    assert!(s.core.in_flight());
    assert!(s.core.take_batch().is_none());

    let out = s.commit(&b1);
    assert_eq!(
        accepted(&out, 1)
            .into_iter()
            .map(|a| a.0)
            .collect::<Vec<_>>(),
        vec!["m1"]
    );
    assert!(!s.core.in_flight());
    let b2 = s.take();
    assert!(b2.id > b1.id);
    assert_eq!(batch_seqs(&b2, "g"), vec![2, 3], "group commit");
    let out = s.commit(&b2);
    assert_eq!(
        accepted(&out, 1)
            .into_iter()
            .map(|a| (a.0, a.2))
            .collect::<Vec<_>>(),
        vec![("m2".to_string(), 2), ("m3".to_string(), 3)]
    );
    // A late duplicate report of a committed batch is ignored.
    assert!(s
        .core
        .commit_done(b2.id, CommitOutcome::default())
        .is_empty());
    assert!(s.core.take_batch().is_none());
}

/// A conversation's record (with its member list) is written when it is created or changed; a
/// batch of new messages writes only its seq range, and a restart from the store has both.
#[test]
fn messages_move_the_seq_range_without_rewriting_the_record() {
    let mut s = Sim::new(cfg());
    s.core.connect(1, "alice", "a1");
    // A direct conversation's first batch creates it: the whole record.
    s.send_to(1, "bob", "d1");
    let b = s.take();
    assert_eq!(b.convs.len(), 1);
    assert!(b.positions.is_empty());
    s.commit(&b);
    s.send_to(1, "bob", "d2");
    let b = s.take();
    assert!(b.convs.is_empty());
    assert_eq!(b.positions.len(), 1);
    assert_eq!((b.positions[0].max_seq, b.positions[0].first_seq), (2, 1));
    s.commit(&b);

    s.group("g", &["alice", "bob"], Retention::default());
    s.send(1, "g", "m1");
    s.commit_pending();
    // A membership change in the same batch as a message: the whole record, once.
    s.add_member(900, "g", "carol");
    s.send(1, "g", "m2");
    let b = s.take();
    assert!(b.positions.is_empty());
    assert_eq!(b.convs.len(), 1);
    assert_eq!(b.convs[0].max_seq, 2);
    assert!(b.convs[0].members.contains("carol"));
    s.commit(&b);
    s.send(1, "g", "m3");
    s.commit_pending();

    s.restart(cfg());
    let g = s.core.group("g").unwrap();
    assert_eq!(g.max_seq, 3);
    assert_eq!(
        g.members.iter().cloned().collect::<Vec<_>>(),
        ["alice", "bob", "carol"]
    );
    assert_eq!(s.store.max_seq(&direct_conv_id("alice", "bob")), 2);
}

// ---------------------------------------------------------------------------------------------
// G4: sender FIFO
// ---------------------------------------------------------------------------------------------

#[test]
fn sends_from_one_session_get_increasing_seqs_in_send_order() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    let mut out = Vec::new();
    let mut in_flight: Option<Batch> = None;
    for i in 0..30u64 {
        out.extend(s.send(1, "g", &format!("a{i}")));
        if i % 3 == 0 {
            out.extend(s.send(2, "g", &format!("b{i}")));
        }
        // Commit at irregular points, sometimes leaving a batch in flight across sends.
        if i % 4 == 1 {
            if let Some(b) = in_flight.take() {
                out.extend(s.commit(&b));
            }
            in_flight = s.core.take_batch();
        }
    }
    if let Some(b) = in_flight.take() {
        out.extend(s.commit(&b));
    }
    out.extend(s.flush().1);
    let acc = accepted(&out, 1);
    assert_eq!(
        acc.iter().map(|a| a.0.clone()).collect::<Vec<_>>(),
        (0..30).map(|i| format!("a{i}")).collect::<Vec<_>>(),
        "answered in send order"
    );
    let seqs: Vec<u64> = acc.iter().map(|a| a.2).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(s.store.seqs("g"), (1..=40).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------------
// G2: idempotent send
// ---------------------------------------------------------------------------------------------

#[test]
fn duplicate_while_pending_is_answered_at_commit_with_the_same_seq() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    s.send(1, "g", "x");
    assert!(s.send(1, "g", "x").is_empty(), "no answer before commit");
    assert!(s
        .core
        .send(
            1,
            SendRequest {
                conv: Some("g"),
                to: None,
                cmid: "x".into(),
                body: "other body".into(),
                reply_to: None
            },
            s.now + 5
        )
        .is_empty());
    let b = s.take();
    assert_eq!(b.messages.len(), 1, "a duplicate stores nothing");
    let out = s.commit(&b);
    let acc = accepted(&out, 1);
    assert_eq!(acc.len(), 3, "every send gets its answer");
    assert!(
        acc.iter().all(|a| *a == acc[0]),
        "identical answers {acc:?}"
    );
    assert_eq!(acc[0].2, 1);
    assert_eq!(msg_seqs(&out, 2), vec![1], "delivered once");
    assert_eq!(s.core.stats().dedup_hits, 2);
    assert_eq!(s.store.message("g", 1).unwrap().body, "body of x");
}

#[test]
fn duplicate_while_in_flight_is_answered_after_the_original_is_durable() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    s.send(1, "g", "x");
    let b1 = s.take();
    assert!(s.send(1, "g", "x").is_empty(), "not durable yet: no answer");
    let mut out = s.commit(&b1);
    // The resend's answer comes at this commit or at the next one, never before.
    let (batches, more) = s.flush();
    out.extend(more);
    assert!(batches
        .iter()
        .all(|b| b.messages.is_empty() && b.dedup_put.is_empty()));
    let acc = accepted(&out, 1);
    assert_eq!(acc.len(), 2, "{out:?}");
    assert_eq!(acc[0], acc[1]);
    assert_eq!(acc[0].2, 1);
    assert_eq!(msg_seqs(&out, 2), vec![1]);
    assert_eq!(s.store.seqs("g"), vec![1]);
}

#[test]
fn duplicate_after_durable_is_answered_at_once_with_the_original_answer() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(3, "alice", "a2");
    s.core.connect(2, "bob", "b1");
    s.send(1, "g", "x");
    let (_, out) = s.flush();
    let original = accepted(&out, 1);
    assert_eq!(original.len(), 1);

    s.now += 5_000;
    let out = s.core.send(
        1,
        SendRequest {
            conv: Some("g"),
            to: None,
            cmid: "x".into(),
            body: "changed".into(),
            reply_to: None,
        },
        s.now,
    );
    assert_eq!(accepted(&out, 1), original, "the same answer, same ts");
    assert_eq!(out.len(), 1);
    // The key is (user, cmid): another device of the same user is a resend too.
    let out = s.send(3, "g", "x");
    assert_eq!(accepted(&out, 3), original);
    assert!(s.core.take_batch().is_none(), "nothing new to store");
    assert!(!s.core.has_pending());
    assert_eq!(s.core.stats().dedup_hits, 2);
    assert_eq!(s.store.seqs("g"), vec![1]);

    // Another user may use the same cmid: it is a different message.
    assert!(s.send(2, "g", "x").is_empty());
    let (_, out) = s.flush();
    assert_eq!(accepted(&out, 2)[0].2, 2);
}

#[test]
fn after_the_dedup_window_a_resend_is_a_new_message() {
    let mut s = alice_alone_in_g(short_dedup_window());
    s.now = 10_000;
    s.send(1, "g", "x");
    s.send(1, "g", "y");
    s.flush();

    s.now = 10_999;
    let out = s.send(1, "g", "x");
    assert_eq!(accepted(&out, 1)[0].2, 1, "still inside the window");

    s.core.expire_dedup(10_999);
    assert!(s.core.take_batch().is_none(), "nothing expired yet");
    s.core.expire_dedup(11_000);
    let b = s.take();
    // Both were accepted at 10,000: everything accepted before 10,001 may go.
    assert_eq!(b.dedup_forget_before_ms, Some(10_001));
    assert!(b.dedup_delete.is_empty());
    s.commit(&b);
    assert!(s.store.dedup.is_empty());

    s.now = 11_001;
    assert!(s.send(1, "g", "x").is_empty(), "a new message now");
    let (batches, out) = s.flush();
    assert_eq!(batch_seqs(&batches[0], "g"), vec![3]);
    assert_eq!(accepted(&out, 1)[0].2, 3);
}

#[test]
fn past_the_window_a_resend_is_new_even_before_expiry_runs() {
    let mut s = alice_alone_in_g(short_dedup_window());
    s.now = 5_000;
    s.send(1, "g", "x");
    s.flush();
    s.now = 6_000;
    assert!(s.send(1, "g", "x").is_empty());
    let (_, out) = s.flush();
    assert_eq!(accepted(&out, 1)[0].2, 2);
    // The later expiry of the first acceptance must not forget the second one.
    s.core.expire_dedup(6_500);
    s.flush();
    s.now = 6_500;
    let out = s.send(1, "g", "x");
    assert_eq!(accepted(&out, 1)[0].2, 2, "the renewed key is still known");
    assert_eq!(
        s.store
            .dedup
            .get(&("alice".into(), "x".into()))
            .unwrap()
            .seq,
        2
    );
}

/// A store may keep expired dedup entries next to newer ones (the embedded store forgets them
/// by runs): a core rebuilt from such a snapshot answers a resend from the newest entry of its
/// key and treats a key whose only entry is expired as new.
#[test]
fn a_restart_from_a_snapshot_with_stale_dedup_entries_keeps_the_newest() {
    let mut s = alice_alone_in_g(short_dedup_window());
    s.now = 5_000;
    s.send(1, "g", "x");
    s.send(1, "g", "y");
    s.flush();
    s.now = 6_000;
    s.send(1, "g", "x");
    s.flush();
    let entry = |cmid: &str, seq, ts| DedupRecord {
        user: "alice".into(),
        cmid: cmid.into(),
        conv: "g".into(),
        seq,
        ts,
    };
    let mut snapshot = s.store.snapshot();
    // As a store that kept the expired ones would hand them back, oldest last.
    snapshot.dedup = vec![
        entry("x", 3, 6_000),
        entry("y", 2, 5_000),
        entry("x", 1, 5_000),
    ];
    s.core = Core::new(short_dedup_window(), 5, snapshot);
    s.core.connect(1, "alice", "a1");
    s.now = 6_500;
    let out = s.send(1, "g", "x");
    assert_eq!(accepted(&out, 1)[0].2, 3, "answered from the newest entry");
    assert!(s.send(1, "g", "y").is_empty(), "y's window is over: new");
    let (batches, out) = s.flush();
    assert_eq!(batch_seqs(&batches[0], "g"), vec![4]);
    assert_eq!(accepted(&out, 1)[0].2, 4);
    // Expiring the old entries forgets neither the renewed x nor the new y.
    s.core.expire_dedup(6_999);
    s.flush();
    s.now = 6_999;
    assert_eq!(accepted(&s.send(1, "g", "x"), 1)[0].2, 3);
    assert_eq!(accepted(&s.send(1, "g", "y"), 1)[0].2, 4);
}

#[test]
fn reusing_a_cmid_in_another_conversation_is_rejected() {
    let mut s = Sim::new(cfg());
    s.group("g1", &["alice", "bob"], Retention::default());
    s.group("g2", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.send(1, "g1", "x");
    // While the original is pending...
    let (code, retryable, after) = rejected(&s.send(1, "g2", "x"));
    assert_eq!((code, retryable, after), (ErrorCode::Invalid, false, None));
    let (batches, _) = s.flush();
    assert!(batch_seqs(&batches[0], "g2").is_empty());
    // ... and after it is durable, including through `to`.
    assert_eq!(rejected(&s.send(1, "g2", "x")).0, ErrorCode::Invalid);
    assert_eq!(rejected(&s.send_to(1, "bob", "x")).0, ErrorCode::Invalid);
    assert!(s.core.take_batch().is_none());
    assert!(s.store.seqs("g2").is_empty());
    assert!(!s.store.convs.contains_key(&direct_conv_id("alice", "bob")));
}

// ---------------------------------------------------------------------------------------------
// Direct conversations, G8 authorization and G9 bad input
// ---------------------------------------------------------------------------------------------

#[test]
fn a_send_to_a_user_creates_the_direct_conversation() {
    let mut s = Sim::new(cfg());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    s.core.connect(3, "carol", "c1");
    let id = direct_conv_id("alice", "bob");
    assert!(s.send_to(1, "bob", "hello").is_empty());
    // Not durable yet: nobody may read it.
    assert_eq!(code(s.core.sync(2, &id, 0, None)), ErrorCode::NotFound);
    assert!(s.core.overview(2).is_empty());

    let b = s.take();
    assert_eq!(b.convs.len(), 1);
    let rec = &b.convs[0];
    assert_eq!(rec.id, id);
    assert_eq!(rec.kind, ConvKind::Direct);
    assert_eq!(
        rec.members,
        BTreeSet::from(["alice".to_string(), "bob".to_string()])
    );
    assert_eq!((rec.max_seq, rec.first_seq), (1, 1));
    assert_ne!(rec.epoch, 0);
    let out = s.commit(&b);
    assert_eq!(
        accepted(&out, 1),
        vec![("hello".to_string(), id.clone(), 1, s.now)]
    );
    for sid in [1, 2] {
        match &frames(&out, sid)[..] {
            [.., ServerFrame::Msg(m)] => {
                assert_eq!((m.conv.as_str(), m.seq), (id.as_str(), 1));
                assert_eq!((m.from.as_str(), m.device.as_str()), ("alice", "a1"));
                assert_eq!(m.body, "body of hello");
            }
            other => panic!("session {sid}: {other:?}"),
        }
    }
    assert!(frames(&out, 3).is_empty());

    // Either side, by `to` or by id, lands in the same conversation.
    s.send_to(2, "alice", "re");
    s.send(2, &id, "re2");
    let (_, out) = s.flush();
    assert_eq!(
        accepted(&out, 2)
            .into_iter()
            .map(|a| (a.1, a.2))
            .collect::<Vec<_>>(),
        vec![(id.clone(), 2), (id.clone(), 3)]
    );
    let i = info(&s.core, 2, &id);
    assert_eq!((i.kind, i.max_seq, i.first_seq), (ConvKind::Direct, 3, 1));

    // A third user can neither write nor read it.
    assert_eq!(rejected(&s.send(3, &id, "intrude")).0, ErrorCode::NotMember);
    assert_eq!(code(s.core.sync(3, &id, 0, None)), ErrorCode::NotMember);
    assert!(s.core.overview(3).is_empty());
    assert!(s.core.take_batch().is_none());
}

#[test]
fn sends_to_many_users_each_land_in_their_own_direct_conversation() {
    // More peers than a connection remembers direct ids for, then the first ones again.
    let mut s = Sim::new(cfg());
    s.core.connect(1, "alice", "a1");
    let peers: Vec<String> = (0..300).map(|i| format!("u{i}")).collect();
    for (i, p) in peers.iter().enumerate() {
        s.send_to(1, p, &format!("first-{i}"));
        s.now += 1;
    }
    for (i, p) in peers.iter().enumerate().take(3) {
        s.send_to(1, p, &format!("again-{i}"));
    }
    let (_, out) = s.flush();
    let got = accepted(&out, 1);
    assert_eq!(got.len(), 303);
    for (cmid, conv, seq, _) in got {
        let (round, i) = cmid.split_once('-').unwrap();
        let i: usize = i.parse().unwrap();
        assert_eq!(conv, direct_conv_id("alice", &peers[i]), "{cmid}");
        assert_eq!(seq, if round == "first" { 1 } else { 2 }, "{cmid}");
    }
}

#[test]
fn non_members_are_rejected_with_not_member() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(3, "carol", "c1");
    s.send(1, "g", "m1");
    s.flush();

    let (c, retryable, _) = rejected(&s.send(3, "g", "x"));
    assert_eq!((c, retryable), (ErrorCode::NotMember, false));
    assert_eq!(code(s.core.sync(3, "g", 0, None)), ErrorCode::NotMember);
    assert_eq!(code(s.core.ack(3, "g", 1)), ErrorCode::NotMember);
    assert_eq!(code(s.core.read(3, "g", 1)), ErrorCode::NotMember);
    assert!(s.core.overview(3).is_empty());
    assert!(s.core.take_batch().is_none(), "nothing stored");
    assert_eq!(s.store.seqs("g"), vec![1]);
    assert!(s.store.cursors.is_empty());
}

#[test]
fn unknown_conversations_are_not_found() {
    let mut s = Sim::new(cfg());
    s.core.connect(1, "alice", "a1");
    assert_eq!(rejected(&s.send(1, "nope", "x")).0, ErrorCode::NotFound);
    // A direct id is created only by `to`, never by naming it.
    let d = direct_conv_id("alice", "bob");
    assert_eq!(rejected(&s.send(1, &d, "y")).0, ErrorCode::NotFound);
    assert_eq!(code(s.core.sync(1, "nope", 0, None)), ErrorCode::NotFound);
    assert_eq!(code(s.core.ack(1, "nope", 1)), ErrorCode::NotFound);
    assert_eq!(code(s.core.read(1, "nope", 1)), ErrorCode::NotFound);
    assert!(s.core.take_batch().is_none());
    // The rejected cmid was not remembered: it can be used for a real message.
    s.group("g", &["alice"], Retention::default());
    assert!(s.send(1, "g", "x").is_empty());
}

#[test]
fn bodies_over_the_limit_are_too_large() {
    let mut c = cfg();
    c.limits.max_body_bytes = 10;
    let mut s = Sim::new(c);
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    let send = |s: &mut Sim, conv: Option<&str>, to: Option<&str>, cmid: &str, body: &str| {
        s.core.send(
            1,
            SendRequest {
                conv,
                to,
                cmid: cmid.to_string(),
                body: body.to_string(),
                reply_to: None,
            },
            s.now,
        )
    };
    assert!(send(&mut s, Some("g"), None, "ok", "0123456789").is_empty());
    let (c, retryable, _) = rejected(&send(&mut s, Some("g"), None, "big", "0123456789a"));
    assert_eq!((c, retryable), (ErrorCode::TooLarge, false));
    // Bytes, not characters: six two-byte characters are 12 bytes.
    assert_eq!(
        rejected(&send(&mut s, Some("g"), None, "utf", "éééééé")).0,
        ErrorCode::TooLarge
    );
    // An oversized first message does not create the direct conversation.
    assert_eq!(
        rejected(&send(&mut s, None, Some("bob"), "d", "0123456789a")).0,
        ErrorCode::TooLarge
    );
    let (batches, _) = s.flush();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].messages.len(), 1);
    assert!(batches[0].convs.is_empty());
    assert_eq!(batches[0].positions.len(), 1);
    assert!(!s.store.convs.contains_key(&direct_conv_id("alice", "bob")));
    // The rejected cmid is free for a corrected resend.
    assert!(send(&mut s, Some("g"), None, "big", "short").is_empty());
    let (_, out) = s.flush();
    assert_eq!(accepted(&out, 1)[0].2, 2);
}

#[test]
fn invalid_ids_and_arguments_are_rejected_as_invalid() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    let body = || "hi".to_string();
    let now = s.now;
    type Case<'a> = (Option<&'a str>, Option<&'a str>, String, Option<u64>);
    let cases: Vec<Case> = vec![
        (Some("g"), None, String::new(), None),
        (Some("g"), None, "has space".into(), None),
        (Some("g"), None, "x".repeat(129), None),
        (Some("bad/id"), None, "c1".into(), None),
        (None, Some("bad user"), "c2".into(), None),
        (Some("g"), Some("bob"), "c3".into(), None),
        (None, None, "c4".into(), None),
        (Some("g"), None, "c5".into(), Some(0)),
        (Some("g"), None, "c6".into(), Some(1)),
    ];
    for (conv, to, cmid, reply_to) in cases {
        let out = s.core.send(
            1,
            SendRequest {
                conv,
                to,
                cmid: cmid.clone(),
                body: body(),
                reply_to,
            },
            now,
        );
        let (c, retryable, _) = rejected(&out);
        assert_eq!(
            (c, retryable),
            (ErrorCode::Invalid, false),
            "{conv:?} {to:?} {cmid:?} {reply_to:?}"
        );
        match &frames(&out, 1)[0] {
            ServerFrame::Rejected { cmid: echoed, .. } => assert_eq!(echoed, &cmid),
            f => panic!("{f:?}"),
        }
    }
    assert!(s.core.take_batch().is_none(), "nothing stored");
    assert_eq!(code(s.core.sync(1, "bad id", 0, None)), ErrorCode::Invalid);
    assert_eq!(code(s.core.sync(1, "g", 0, Some(0))), ErrorCode::Invalid);
    assert_eq!(code(s.core.ack(1, "", 0)), ErrorCode::Invalid);

    // reply_to must name an existing seq.
    s.send(1, "g", "first");
    assert!(s
        .core
        .send(
            1,
            SendRequest {
                conv: Some("g"),
                to: None,
                cmid: "reply".into(),
                body: body(),
                reply_to: Some(1)
            },
            now
        )
        .is_empty());
    let (_, out) = s.flush();
    assert_eq!(accepted(&out, 1).len(), 2);
    assert_eq!(s.store.message("g", 2).unwrap().reply_to, Some(1));
}

#[test]
fn sending_too_fast_is_rate_limited_with_a_retry_hint() {
    let mut s = Sim::new(CoreConfig {
        rate_per_sec: 1.0,
        rate_burst: 2.0,
        ..CoreConfig::default()
    });
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    s.now = 0;
    assert!(s.send(1, "g", "m1").is_empty());
    assert!(s.send(1, "g", "m2").is_empty());
    let (c, retryable, after) = rejected(&s.send(1, "g", "m3"));
    assert_eq!(c, ErrorCode::RateLimited);
    assert!(retryable);
    assert_eq!(after, Some(1_000));
    // A new direct conversation is not created by a limited send.
    assert_eq!(
        rejected(&s.send_to(1, "carol", "d1")).0,
        ErrorCode::RateLimited
    );
    // Resends of accepted messages are not new sends: they are not limited.
    assert!(s.send(1, "g", "m1").is_empty());
    // Per user: bob is not affected.
    assert!(s.send(2, "g", "b1").is_empty());
    let (batches, out) = s.flush();
    assert_eq!(batches[0].messages.len(), 3);
    assert!(
        batches[0].convs.is_empty(),
        "no direct conversation is created"
    );
    assert_eq!(batches[0].positions.len(), 1);
    assert_eq!(accepted(&out, 1).len(), 3);

    s.now = 1_000;
    assert!(s.send(1, "g", "m3").is_empty(), "a token came back");
    let (_, out) = s.flush();
    assert_eq!(accepted(&out, 1)[0].2, 4);
    assert_eq!(
        s.store.seqs("g"),
        vec![1, 2, 3, 4],
        "rejections left no hole"
    );
}

// ---------------------------------------------------------------------------------------------
// Fan-out: msg, notify, push window, large groups, sync
// ---------------------------------------------------------------------------------------------

/// G4 under the rate limit: once m1 is refused for rate, m2 from the same connection must not
/// overtake it when a token comes back; m2 is held back until m1 is resent.
#[test]
fn a_rate_limited_send_holds_back_later_sends_so_order_holds() {
    let mut s = one_per_second();
    s.core.connect(3, "alice", "a2");
    s.now = 0;
    assert!(s.send(1, "g", "m0").is_empty());
    assert_eq!(rejected(&s.send(1, "g", "m1")).0, ErrorCode::RateLimited);
    s.now = 5_000;
    // Tokens are back, but m2 may not overtake m1.
    let (c, retryable, _) = rejected(&s.send(1, "g", "m2"));
    assert_eq!((c, retryable), (ErrorCode::RateLimited, true));
    // Another device of the same user is not held back by this one's order.
    assert!(s.send(3, "g", "x1").is_empty());
    s.now = 10_000;
    assert!(
        s.send(1, "g", "m1").is_empty(),
        "the refused message goes first"
    );
    s.now = 15_000;
    assert!(s.send(1, "g", "m2").is_empty(), "then the next one");
    let (_, out) = s.flush();
    let order: Vec<(String, u64)> = accepted(&out, 1)
        .into_iter()
        .map(|(cmid, _, seq, _)| (cmid, seq))
        .collect();
    assert_eq!(
        order,
        vec![
            ("m0".to_string(), 1),
            ("m1".to_string(), 3),
            ("m2".to_string(), 4)
        ]
    );
}

/// G4 with several refused messages: whatever order their resends come in, they are numbered
/// in the order the connection first sent them.
#[test]
fn refused_messages_are_admitted_in_their_first_send_order() {
    let mut s = Sim::new(CoreConfig {
        rate_per_sec: 1.0,
        rate_burst: 2.0,
        ..CoreConfig::default()
    });
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.now = 0;
    assert!(s.send(1, "g", "m0").is_empty());
    assert!(s.send(1, "g", "m1").is_empty());
    for m in ["m2", "m3", "m4"] {
        assert_eq!(rejected(&s.send(1, "g", m)).0, ErrorCode::RateLimited);
    }
    // Later, with two tokens back, the resends arrive out of order.
    s.now = 10_000;
    assert!(s.send(1, "g", "m2").is_empty(), "the first refused goes");
    assert_eq!(
        rejected(&s.send(1, "g", "m4")).0,
        ErrorCode::RateLimited,
        "m4 may not overtake m3, though a token is there"
    );
    assert!(s.send(1, "g", "m3").is_empty());
    s.now = 11_000;
    assert!(s.send(1, "g", "m4").is_empty());
    let (_, out) = s.flush();
    let order: Vec<String> = accepted_order(&out, 1);
    assert_eq!(order, ["m0:1", "m1:2", "m2:3", "m3:4", "m4:5"]);
}

/// A refused send the client gave up on does not hold its conversation back for good: once it
/// has not been resent for two minutes while the client kept resending the next one, that one
/// goes.
#[test]
fn a_held_back_send_that_is_never_resent_expires() {
    let mut s = one_per_second();
    s.now = 0;
    assert!(s.send(1, "g", "m0").is_empty());
    assert_eq!(rejected(&s.send(1, "g", "m1")).0, ErrorCode::RateLimited);
    s.now = 60_000;
    assert_eq!(
        rejected(&s.send(1, "g", "m2")).0,
        ErrorCode::RateLimited,
        "still held back behind m1"
    );
    s.now = 100_000;
    assert_eq!(
        rejected(&s.send(1, "g", "m2")).0,
        ErrorCode::RateLimited,
        "resent once: m1 is still waited for"
    );
    s.now = 200_000; // m1 was never resent; m2 was resent twice meanwhile
    assert!(s.send(1, "g", "m2").is_empty(), "m1's hold expired");
    let (_, out) = s.flush();
    let order: Vec<String> = accepted_order(&out, 1);
    assert_eq!(order, ["m0:1", "m2:2"]);
}

/// A clock jumping forward right after a refusal does not let the next send overtake the
/// refused one (found by the simulation, seed 866: a send pipelined behind a rate-refused one
/// arrived after the server's clock jumped four minutes and was numbered first).
#[test]
fn a_clock_jump_does_not_let_a_later_send_overtake_a_held_back_one() {
    let mut s = one_per_second();
    s.now = 0;
    assert!(s.send(1, "g", "m0").is_empty());
    assert_eq!(rejected(&s.send(1, "g", "m1")).0, ErrorCode::RateLimited);
    s.now = 253_000;
    assert_eq!(
        rejected(&s.send(1, "g", "m2")).0,
        ErrorCode::RateLimited,
        "m2 was sent after m1 and m1 is not given up on"
    );
    assert!(s.send(1, "g", "m1").is_empty());
    s.now = 260_000;
    assert!(s.send(1, "g", "m2").is_empty());
    let (_, out) = s.flush();
    let order: Vec<String> = accepted_order(&out, 1);
    assert_eq!(order, ["m0:1", "m1:2", "m2:3"]);
}

/// A fresh connection counts as caught up to its stored delivered position, even when its
/// first contact with the conversation is a partial sync of older history.
#[test]
fn a_partial_sync_does_not_lower_the_push_position_below_the_stored_one() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    s.send(1, "g", "m1");
    s.send(1, "g", "m2");
    s.flush();
    s.core.read(2, "g", 2).unwrap();
    s.flush();
    s.core.disconnect(2);
    s.core.connect(3, "bob", "b1");
    let plan = s.core.sync(3, "g", 0, Some(1)).unwrap();
    assert_eq!((plan.from, plan.to, plan.limit), (1, 2, 1));
    assert!(s.core.sync_served(3, "g", 1, true).is_empty());
    s.send(1, "g", "m3");
    let (_, out) = s.flush();
    assert_eq!(msg_seqs(&out, 3), vec![3], "pushed, not notified");
    assert!(notifies(&out, 3).is_empty());
}

#[test]
fn every_online_device_of_every_member_gets_msg_in_seq_order() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob", "carol"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "alice", "a2");
    s.core.connect(3, "bob", "b1");
    s.core.connect(4, "bob", "b2");
    s.core.connect(5, "dave", "d1"); // not a member; carol is offline
    let mut out = Vec::new();
    s.send(1, "g", "a-1");
    s.send(3, "g", "b-1");
    s.send(1, "g", "a-2");
    let b = s.take();
    s.send(4, "g", "b-2");
    s.send(2, "g", "a-3");
    out.extend(s.commit(&b));
    out.extend(s.flush().1);
    for sid in 1..=4 {
        assert_eq!(msg_seqs(&out, sid), vec![1, 2, 3, 4, 5], "session {sid}");
        for f in frames(&out, sid) {
            if let ServerFrame::Msg(m) = f {
                assert_eq!(Some(&*m), s.store.message("g", m.seq), "as stored");
            }
        }
        assert!(notifies(&out, sid).is_empty());
    }
    assert!(frames(&out, 5).is_empty());
    assert_eq!(s.core.stats().pushed, 20);
    // `accepted` comes before the pushes of the same commit.
    let first = frames(&out, 1);
    assert!(matches!(first[0], ServerFrame::Accepted { .. }));
}

#[test]
fn past_the_push_window_a_device_gets_one_notify_until_it_syncs() {
    let mut s = Sim::new(CoreConfig {
        push_window: 3,
        ..cfg()
    });
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    let mut out = Vec::new();
    for i in 1..=6 {
        s.send(1, "g", &format!("m{i}"));
        out.extend(s.flush().1);
    }
    assert_eq!(msg_seqs(&out, 2), vec![1, 2, 3]);
    assert_eq!(
        notifies(&out, 2),
        vec![4],
        "one notify, not one per message"
    );
    // The sender's own device is a device like any other.
    assert_eq!(msg_seqs(&out, 1), vec![1, 2, 3]);
    assert_eq!(notifies(&out, 1), vec![4]);
    // An ack alone does not reset the notify: the device was told to sync.
    s.core.ack(2, "g", 3).unwrap();
    s.send(1, "g", "m7");
    let out = s.flush().1;
    assert!(frames(&out, 2)
        .iter()
        .all(|f| !matches!(f, ServerFrame::Msg(_) | ServerFrame::Notify { .. })));

    // Bob syncs everything and acks it: pushes resume.
    let plan = s.core.sync(2, "g", 3, None).unwrap();
    assert_eq!((plan.from, plan.to), (4, 7));
    let got = s.store.read(&plan);
    assert_eq!(
        got.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![4, 5, 6, 7]
    );
    assert!(s.core.sync_served(2, "g", 7, false).is_empty());
    s.core.ack(2, "g", 7).unwrap();
    s.send(1, "g", "m8");
    let out = s.flush().1;
    assert_eq!(msg_seqs(&out, 2), vec![8]);
    assert!(notifies(&out, 2).is_empty());

    // Without acking, the window fills again and one notify follows.
    let mut out = Vec::new();
    for i in 9..=14 {
        s.send(1, "g", &format!("m{i}"));
        out.extend(s.flush().1);
    }
    assert_eq!(msg_seqs(&out, 2), vec![9, 10]);
    assert_eq!(notifies(&out, 2), vec![11]);
}

#[test]
fn a_whole_batch_past_the_window_gives_one_notify_with_the_batch_max() {
    let mut s = Sim::new(CoreConfig {
        push_window: 2,
        ..cfg()
    });
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    for i in 1..=5 {
        s.send(1, "g", &format!("m{i}"));
    }
    let (batches, out) = s.flush();
    assert_eq!(batches.len(), 1);
    assert_eq!(msg_seqs(&out, 2), vec![1, 2]);
    assert_eq!(notifies(&out, 2), vec![5]);
    assert_eq!(s.core.stats().notified, 2);
}

#[test]
fn groups_larger_than_receipt_max_members_get_pushes_but_no_receipts() {
    let mut s = Sim::new(CoreConfig {
        receipt_max_members: 2,
        ..cfg()
    });
    s.group("big", &["alice", "bob", "carol"], Retention::default());
    s.group("small", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    let mut out = Vec::new();
    for i in 1..=3 {
        s.send(1, "big", &format!("big{i}"));
        s.send(1, "small", &format!("small{i}"));
        out.extend(s.flush().1);
    }
    // Every member of both groups is pushed every message, in order.
    for conv in ["big", "small"] {
        let seqs: Vec<u64> = frames(&out, 2)
            .into_iter()
            .filter_map(|f| match f {
                ServerFrame::Msg(m) if m.conv == conv => Some(m.seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, vec![1, 2, 3], "{conv}");
    }
    // bob's acks move receipts in the small group only.
    s.core.ack(2, "big", 3).unwrap();
    s.core.ack(2, "small", 3).unwrap();
    let out = s.flush().1;
    let receipts: Vec<String> = frames(&out, 1)
        .into_iter()
        .filter_map(|f| match f {
            ServerFrame::Receipt { conv, .. } => Some(conv),
            _ => None,
        })
        .collect();
    assert_eq!(receipts, vec!["small".to_string()]);
    // The big group's positions are still in the overview.
    let big = s
        .core
        .overview(1)
        .into_iter()
        .find(|c| c.conv == "big")
        .unwrap();
    let bob = big.members.iter().find(|m| m.user == "bob").unwrap();
    assert_eq!(bob.delivered, 3);
}

#[test]
fn sync_plans_and_sync_served_notify_a_device_left_behind() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    for i in 1..=5 {
        s.send(1, "g", &format!("m{i}"));
    }
    s.flush();
    s.core.connect(2, "bob", "b1");
    let epoch = info(&s.core, 2, "g").epoch;

    let plan = s.core.sync(2, "g", 0, Some(2)).unwrap();
    assert_eq!(
        plan,
        SyncPlan {
            conv: "g".into(),
            epoch,
            from: 1,
            to: 5,
            limit: 2
        }
    );
    assert_eq!(s.core.sync(2, "g", 0, None).unwrap().limit, 100);
    assert_eq!(s.core.sync(2, "g", 0, Some(5_000)).unwrap().limit, 1_000);

    assert!(
        s.core.sync_served(2, "g", 2, true).is_empty(),
        "it asks again"
    );
    s.core.sync(2, "g", 2, Some(2)).unwrap();
    // The server stops early without has_more: the device is still behind and is told.
    let out = s.core.sync_served(2, "g", 4, false);
    assert_eq!(
        frames(&out, 2),
        vec![ServerFrame::Notify {
            conv: "g".into(),
            max_seq: 5
        }]
    );
    s.core.sync(2, "g", 4, None).unwrap();
    assert!(s.core.sync_served(2, "g", 5, false).is_empty(), "caught up");
    // Caught up: the next message is pushed.
    s.send(1, "g", "m6");
    let out = s.flush().1;
    assert_eq!(msg_seqs(&out, 2), vec![6]);

    // A plan never reaches past what is durable.
    s.send(1, "g", "m7");
    let b = s.take();
    assert_eq!(s.core.sync(2, "g", 6, None).unwrap().to, 6);
    s.commit(&b);
    assert_eq!(s.core.sync(2, "g", 6, None).unwrap().to, 7);
}

#[test]
fn a_device_that_was_offline_gets_notify_not_a_gap() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    for i in 1..=3 {
        s.send(1, "g", &format!("m{i}"));
    }
    s.flush();
    s.core.connect(2, "bob", "b1");
    s.send(1, "g", "m4");
    let out = s.flush().1;
    assert!(msg_seqs(&out, 2).is_empty(), "4 would leave 1..3 as a gap");
    assert_eq!(notifies(&out, 2), vec![4]);

    // A device that acked everything before reconnecting is pushed at once.
    s.core.disconnect(2);
    s.core.connect(3, "bob", "b1");
    s.core.ack(3, "g", 4).unwrap();
    s.flush();
    s.core.disconnect(3);
    s.core.connect(4, "bob", "b1");
    s.send(1, "g", "m5");
    let out = s.flush().1;
    assert_eq!(msg_seqs(&out, 4), vec![5]);
    assert!(frames(&out, 2).is_empty() && frames(&out, 3).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Cursors and G7 receipts
// ---------------------------------------------------------------------------------------------

fn cursor_in(b: &Batch, user: &str, device: &str) -> Option<(u64, u64)> {
    b.cursors
        .iter()
        .find(|c| c.user == user && c.device == device)
        .map(|c| (c.delivered, c.read))
}

#[test]
fn acks_are_cumulative_clamped_to_durable_and_never_go_back() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    for i in 1..=3 {
        s.send(1, "g", &format!("m{i}"));
    }
    s.flush();
    s.send(1, "g", "m4");
    let b = s.take(); // seq 4 assigned, not durable

    s.core.ack(2, "g", 10).unwrap();
    s.commit(&b);
    let (batches, _) = s.flush();
    assert_eq!(cursor_in(&batches[0], "bob", "b1"), Some((3, 0)), "clamped");
    assert_eq!(info(&s.core, 2, "g").delivered, 3);

    s.core.ack(2, "g", 1).unwrap();
    s.core.sync(2, "g", 0, None).unwrap();
    assert!(s.core.take_batch().is_none(), "going back changes nothing");
    assert_eq!(info(&s.core, 2, "g").delivered, 3);

    s.core.ack(2, "g", 4).unwrap();
    let (batches, _) = s.flush();
    assert_eq!(cursor_in(&batches[0], "bob", "b1"), Some((4, 0)));
    // A sync's `after` is an ack too.
    s.send(1, "g", "m5");
    s.flush();
    s.core.sync(2, "g", 5, None).unwrap();
    let (batches, _) = s.flush();
    assert_eq!(cursor_in(&batches[0], "bob", "b1"), Some((5, 0)));
    assert_eq!(s.store.cursors.len(), 1);
}

#[test]
fn receipts_go_to_members_at_commit_with_the_user_max_over_devices() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    s.core.connect(3, "bob", "b2");
    s.core.connect(4, "carol", "c1");
    for i in 1..=5 {
        s.send(1, "g", &format!("m{i}"));
    }
    s.flush();

    s.core.ack(2, "g", 3).unwrap();
    let b = s.take();
    assert_eq!(cursor_in(&b, "bob", "b1"), Some((3, 0)));
    let out = s.commit(&b);
    for sid in [1, 2, 3] {
        assert_eq!(
            receipts(&out, sid),
            vec![("bob".to_string(), 3, 0)],
            "{sid}"
        );
    }
    assert!(frames(&out, 4).is_empty(), "not to non-members");

    // Another device behind the user's max: stored, but the user's receipt does not move.
    s.core.ack(3, "g", 2).unwrap();
    let (batches, out) = s.flush();
    assert_eq!(cursor_in(&batches[0], "bob", "b2"), Some((2, 0)));
    assert!(receipts(&out, 1).is_empty());

    s.core.ack(3, "g", 5).unwrap();
    let (_, out) = s.flush();
    assert_eq!(receipts(&out, 1), vec![("bob".to_string(), 5, 0)]);

    s.core.read(2, "g", 4).unwrap();
    let (_, out) = s.flush();
    assert_eq!(receipts(&out, 1), vec![("bob".to_string(), 5, 4)]);

    s.core.read(2, "g", 2).unwrap();
    let (batches, out) = s.flush();
    assert!(batches.is_empty() && out.is_empty(), "read never goes back");

    let i = info(&s.core, 1, "g");
    let bob = i.members.iter().find(|m| m.user == "bob").unwrap();
    assert_eq!((bob.delivered, bob.read), (5, 4));
    let alice = i.members.iter().find(|m| m.user == "alice").unwrap();
    assert_eq!((alice.delivered, alice.read), (0, 0));
    assert_eq!((i.delivered, i.read), (0, 0), "alice's device positions");
}

#[test]
fn read_implies_delivered_and_is_clamped_to_durable() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    for i in 1..=3 {
        s.send(1, "g", &format!("m{i}"));
    }
    s.flush();
    s.core.read(2, "g", 2).unwrap();
    let (batches, out) = s.flush();
    assert_eq!(cursor_in(&batches[0], "bob", "b1"), Some((2, 2)));
    assert_eq!(receipts(&out, 1), vec![("bob".to_string(), 2, 2)]);
    s.core.read(2, "g", 99).unwrap();
    let (batches, out) = s.flush();
    assert_eq!(cursor_in(&batches[0], "bob", "b1"), Some((3, 3)));
    assert_eq!(receipts(&out, 1), vec![("bob".to_string(), 3, 3)]);
    let i = info(&s.core, 2, "g");
    assert_eq!((i.delivered, i.read), (3, 3));
}

#[test]
fn receipts_are_monotone_for_every_observer() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob", "carol"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    s.core.connect(3, "bob", "b2");
    s.core.connect(4, "carol", "c1");
    let mut out = Vec::new();
    for i in 1..=8u64 {
        s.send(1, "g", &format!("m{i}"));
        out.extend(s.flush().1);
        // Devices ack and read out of order, sometimes behind.
        let _ = s.core.ack(2 + (i % 2), "g", i.saturating_sub(i % 3));
        let _ = s.core.read(4, "g", i / 2);
        let _ = s.core.read(3, "g", i.saturating_sub(4));
        out.extend(s.flush().1);
    }
    for sid in 1..=4 {
        let mut last: HashMap<String, (u64, u64)> = HashMap::new();
        for (user, d, r) in receipts(&out, sid) {
            let prev = last.insert(user.clone(), (d, r)).unwrap_or((0, 0));
            assert!(
                d >= prev.0 && r >= prev.1,
                "{sid} {user}: {prev:?} -> {d},{r}"
            );
            assert!(r <= d, "read implies delivered");
        }
        assert!(last.contains_key("bob") && last.contains_key("carol"));
    }
}

// ---------------------------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------------------------

#[test]
fn count_retention_trims_in_the_batch_and_raises_first_seq() {
    let mut s = Sim::new(cfg());
    s.group(
        "g",
        &["alice"],
        Retention {
            max_count: Some(3),
            max_age_ms: None,
        },
    );
    s.core.connect(1, "alice", "a1");
    s.send(1, "g", "m1");
    s.send(1, "g", "m2");
    let (batches, _) = s.flush();
    assert!(batches[0].trim_below.is_empty(), "under the count");

    for i in 3..=5 {
        s.send(1, "g", &format!("m{i}"));
    }
    let (batches, _) = s.flush();
    assert_eq!(batches[0].trim_below, vec![("g".to_string(), 3)]);
    assert_eq!(batches[0].positions[0].first_seq, 3);
    assert_eq!(s.store.seqs("g"), vec![3, 4, 5]);
    let i = info(&s.core, 1, "g");
    assert_eq!((i.first_seq, i.max_seq), (3, 5));

    s.send(1, "g", "m6");
    let (batches, _) = s.flush();
    assert_eq!(batches[0].trim_below, vec![("g".to_string(), 4)]);
    assert_eq!(s.store.seqs("g"), vec![4, 5, 6]);
    assert_eq!(info(&s.core, 1, "g").first_seq, 4);
}

#[test]
fn default_count_retention_applies_to_direct_conversations() {
    let mut s = Sim::new(CoreConfig {
        default_retention: Retention {
            max_count: Some(2),
            max_age_ms: None,
        },
        ..cfg()
    });
    s.core.connect(1, "alice", "a1");
    let id = direct_conv_id("alice", "bob");
    for i in 1..=4 {
        s.send_to(1, "bob", &format!("m{i}"));
    }
    let (batches, _) = s.flush();
    assert_eq!(batches[0].trim_below, vec![(id.clone(), 3)]);
    assert_eq!(s.store.seqs(&id), vec![3, 4]);
    assert_eq!(info(&s.core, 1, &id).first_seq, 3);
}

#[test]
fn shrinking_a_groups_count_retention_trims_at_the_next_batch() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice"], Retention::default());
    s.core.connect(1, "alice", "a1");
    for i in 1..=5 {
        s.send(1, "g", &format!("m{i}"));
    }
    s.flush();
    s.core
        .admin(
            9,
            AdminOp::UpdateGroup {
                id: "g".into(),
                add: vec![],
                remove: vec![],
                retention: Some(Retention {
                    max_count: Some(1),
                    max_age_ms: None,
                }),
            },
            s.now,
        )
        .unwrap();
    let (batches, out) = s.flush();
    assert_eq!(batches[0].trim_below, vec![("g".to_string(), 5)]);
    assert!(
        matches!(&out[..], [Action::AdminDone { ticket: 9, reply: Ok(r) }] if r.first_seq == 5)
    );
    assert_eq!(s.store.seqs("g"), vec![5]);
}

#[test]
fn age_retention_trims_by_time_and_takes_first_seq_from_the_store() {
    let mut s = Sim::new(cfg());
    s.group(
        "g",
        &["alice"],
        Retention {
            max_age_ms: Some(1_000),
            max_count: None,
        },
    );
    s.group("keep", &["alice"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.now = 10_000;
    for i in 1..=3 {
        s.send(1, "g", &format!("old{i}"));
    }
    s.send(1, "keep", "k1");
    s.flush();
    s.now = 15_000;
    s.send(1, "g", "new4");
    s.send(1, "g", "new5");
    s.flush();

    s.core.retention_tick(15_500);
    let b = s.take();
    assert_eq!(b.trim_before_ms, vec![("g".to_string(), 14_500)]);
    assert!(b.messages.is_empty() && b.trim_below.is_empty());
    let outcome = s.store.apply(&b).unwrap();
    assert_eq!(outcome.first_seqs, vec![("g".to_string(), 4)]);
    // Not raised before the trim is durable.
    assert_eq!(info(&s.core, 1, "g").first_seq, 1);
    s.core.commit_done(b.id, outcome);
    let i = info(&s.core, 1, "g");
    assert_eq!((i.first_seq, i.max_seq), (4, 5));
    assert_eq!(s.store.seqs("g"), vec![4, 5]);

    // Everything old: first_seq is max_seq + 1, and later ticks have nothing to do for it.
    s.core.retention_tick(100_000);
    s.flush();
    let i = info(&s.core, 1, "g");
    assert_eq!((i.first_seq, i.max_seq), (6, 5));
    assert!(s.store.seqs("g").is_empty());
    s.core.retention_tick(200_000);
    assert!(s.core.take_batch().is_none());
    assert_eq!(s.store.seqs("keep"), vec![1]);

    // Numbering goes on after a full trim.
    s.now = 200_000;
    s.send(1, "g", "after");
    let (_, out) = s.flush();
    assert_eq!(accepted(&out, 1)[0].2, 6);
    let i = info(&s.core, 1, "g");
    assert_eq!((i.first_seq, i.max_seq), (6, 6));
}

// ---------------------------------------------------------------------------------------------
// Restart and storage failure (G2, G3, G6 across crashes)
// ---------------------------------------------------------------------------------------------

#[test]
fn a_restarted_core_keeps_seq_numbering_cursors_and_dedup() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    let direct = direct_conv_id("alice", "bob");
    s.send(1, "g", "g1");
    s.send(1, "g", "g2");
    s.send_to(1, "bob", "d1");
    let (_, out) = s.flush();
    let original: HashMap<String, (String, u64, u64)> = accepted(&out, 1)
        .into_iter()
        .map(|(c, conv, seq, ts)| (c, (conv, seq, ts)))
        .collect();
    s.core.read(2, "g", 2).unwrap();
    s.flush();
    let epoch = info(&s.core, 1, "g").epoch;
    // A batch that never becomes durable, and a pending send: both lost in the crash.
    s.send(1, "g", "lost");
    let _lost = s.take();
    s.send(1, "g", "lost2");

    s.now += 60_000;
    s.restart(cfg());
    s.core.connect(11, "alice", "a1");
    s.core.connect(12, "bob", "b1");

    // Resends of durable messages are answered at once, as before.
    for cmid in ["g1", "g2", "d1"] {
        let target = &original[cmid].0;
        let out = if target == &direct {
            s.send_to(11, "bob", cmid)
        } else {
            s.send(11, target, cmid)
        };
        let (conv, seq, ts) = original[cmid].clone();
        assert_eq!(accepted(&out, 11), vec![(cmid.to_string(), conv, seq, ts)]);
    }
    assert!(s.core.take_batch().is_none());
    assert_eq!(rejected(&s.send(11, &direct, "g1")).0, ErrorCode::Invalid);

    // Numbering goes on from the durable max; the lost seq was never visible, so it is reused.
    s.send(11, "g", "lost");
    s.send(12, &direct, "d2");
    let (_, out) = s.flush();
    assert_eq!(accepted(&out, 11)[0].2, 3);
    assert_eq!(accepted(&out, 12)[0].2, 2);
    assert_eq!(s.store.seqs("g"), vec![1, 2, 3]);
    let i = info(&s.core, 12, "g");
    assert_eq!(i.epoch, epoch, "same history, same epoch");
    assert_eq!((i.delivered, i.read), (2, 2), "cursors survive");
    let bob = i.members.iter().find(|m| m.user == "bob").unwrap();
    assert_eq!((bob.delivered, bob.read), (2, 2));
    // Bob's durable cursor in g is 2, so 3 is pushed to his new session; in the direct
    // conversation he never acked seq 1, so he is told to pull instead of getting a gap.
    assert_eq!(msg_seqs(&out, 12), vec![3]);
    assert_eq!(notifies(&out, 12), vec![2]);

    // The restored dedup window still expires.
    s.core.expire_dedup(s.now + 10 * 24 * 60 * 60 * 1000);
    let b = s.take();
    assert!(b.dedup_forget_before_ms.is_some());
    s.commit(&b);
    assert!(s.store.dedup.is_empty());
}

#[test]
fn abort_all_tells_every_waiter_to_retry_and_a_rebuild_recovers() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.send(1, "g", "m1");
    s.flush();
    s.send(1, "g", "x");
    let _in_flight = s.take();
    s.send(1, "g", "y");
    s.send(1, "g", "x"); // a duplicate waiting too
    s.core
        .admin(
            5,
            AdminOp::CreateGroup {
                id: "h".into(),
                members: vec!["alice".into()],
                retention: Retention::default(),
            },
            s.now,
        )
        .unwrap();
    let out = s.core.abort_all("disk full");
    let mut rejected_cmids = Vec::new();
    for f in frames(&out, 1) {
        match f {
            ServerFrame::Rejected {
                cmid,
                code,
                retryable,
                retry_after_ms,
                ..
            } => {
                assert_eq!(code, ErrorCode::Unavailable);
                assert!(retryable);
                assert!(retry_after_ms.is_some());
                rejected_cmids.push(cmid);
            }
            f => panic!("unexpected {f:?}"),
        }
    }
    rejected_cmids.sort();
    assert_eq!(rejected_cmids, vec!["x", "x", "y"]);
    assert!(out.iter().any(|a| matches!(
        a,
        Action::AdminDone {
            ticket: 5,
            reply: Err(_)
        }
    )));
    assert!(!s.core.in_flight());
    assert!(s.core.take_batch().is_none());

    // The caller rebuilds from the store: x and y are new messages, numbered after m1.
    s.restart(cfg());
    s.core.connect(2, "alice", "a1");
    s.send(2, "g", "y");
    s.send(2, "g", "x");
    let (_, out) = s.flush();
    assert_eq!(
        accepted(&out, 2)
            .into_iter()
            .map(|a| (a.0, a.2))
            .collect::<Vec<_>>(),
        vec![("y".to_string(), 2), ("x".to_string(), 3)]
    );
    assert!(!s.store.convs.contains_key("h"));
}

// ---------------------------------------------------------------------------------------------
// Admin and membership
// ---------------------------------------------------------------------------------------------

#[test]
fn admin_validates_and_membership_changes_apply() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    s.core.connect(3, "carol", "c1");
    let create = |id: &str, members: &[&str]| AdminOp::CreateGroup {
        id: id.into(),
        members: members.iter().map(|m| m.to_string()).collect(),
        retention: Retention::default(),
    };
    let now = s.now;
    assert_eq!(
        code(s.core.admin(1, create("g", &["alice"]), now)),
        ErrorCode::Invalid,
        "already exists"
    );
    assert!(matches!(
        s.core.admin(1, create("g", &["alice"]), now),
        Err(CoreError::AlreadyExists(_))
    ));
    assert_eq!(
        code(s.core.admin(1, create("d_abc", &["alice"]), now)),
        ErrorCode::Invalid
    );
    assert_eq!(
        code(s.core.admin(1, create("bad id", &["alice"]), now)),
        ErrorCode::Invalid
    );
    assert_eq!(
        code(s.core.admin(1, create("ok", &["bad user"]), now)),
        ErrorCode::Invalid
    );
    let update = |id: &str, add: &[&str], remove: &[&str]| AdminOp::UpdateGroup {
        id: id.into(),
        add: add.iter().map(|m| m.to_string()).collect(),
        remove: remove.iter().map(|m| m.to_string()).collect(),
        retention: None,
    };
    assert_eq!(
        code(s.core.admin(1, update("nope", &["carol"], &[]), now)),
        ErrorCode::NotFound
    );
    let direct = direct_conv_id("alice", "bob");
    s.send_to(1, "bob", "d");
    s.flush();
    assert_eq!(
        code(s.core.admin(1, update(&direct, &["carol"], &[]), now)),
        ErrorCode::NotFound,
        "direct conversations have fixed members"
    );
    assert!(s.core.take_batch().is_none(), "failed admin stores nothing");

    s.core
        .admin(7, update("g", &["carol"], &["bob"]), now)
        .unwrap();
    let (batches, out) = s.flush();
    assert_eq!(
        batches[0].convs[0].members,
        BTreeSet::from(["alice".to_string(), "carol".to_string()])
    );
    assert!(matches!(
        &out[..],
        [Action::AdminDone {
            ticket: 7,
            reply: Ok(_)
        }]
    ));
    assert_eq!(rejected(&s.send(2, "g", "b")).0, ErrorCode::NotMember);
    assert_eq!(code(s.core.sync(2, "g", 0, None)), ErrorCode::NotMember);
    assert!(s.send(3, "g", "c").is_empty());
    let (_, out) = s.flush();
    assert_eq!(msg_seqs(&out, 1), vec![1]);
    assert_eq!(msg_seqs(&out, 3), vec![1]);
    assert!(frames(&out, 2).is_empty(), "a removed member gets nothing");
    assert_eq!(s.core.group("g").unwrap().max_seq, 1);
}

// ---------------------------------------------------------------------------------------------
// Regressions: each test below once failed on a real defect of the core
// ---------------------------------------------------------------------------------------------

/// `publish_receipt` reads the live in-memory cursors, which already include acks whose batch
/// is not yet durable. A receipt released by the commit of batch N reports positions that only
/// batch N+1 will store.
#[test]
fn a_receipt_reports_only_durable_positions() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    for i in 1..=3 {
        s.send(1, "g", &format!("m{i}"));
    }
    s.flush();
    s.core.ack(2, "g", 1).unwrap();
    let b1 = s.take();
    assert_eq!(cursor_in(&b1, "bob", "b1"), Some((1, 0)));
    s.core.ack(2, "g", 3).unwrap(); // joins the next batch
    let out = s.commit(&b1);
    assert_eq!(
        receipts(&out, 1),
        vec![("bob".to_string(), 1, 0)],
        "batch {} stored delivered=1; delivered=3 is not durable",
        b1.id
    );
}

/// The consequence of the bug above across a crash: the sender sees bob's delivered position
/// go 3 -> 2, breaking G7 (cumulative and monotone).
#[test]
fn receipts_never_go_back_across_a_crash() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    for i in 1..=3 {
        s.send(1, "g", &format!("m{i}"));
    }
    s.flush();
    let mut seen = Vec::new();
    s.core.ack(2, "g", 1).unwrap();
    let b1 = s.take();
    s.core.ack(2, "g", 3).unwrap();
    seen.extend(receipts(&s.commit(&b1), 1));
    // Crash before the batch holding delivered=3 is taken.
    s.restart(cfg());
    s.core.connect(11, "alice", "a1");
    s.core.connect(12, "bob", "b1");
    s.core.ack(12, "g", 2).unwrap();
    seen.extend(receipts(&s.flush().1, 11));
    let delivered: Vec<u64> = seen.iter().map(|r| r.1).collect();
    assert!(
        delivered.windows(2).all(|w| w[0] <= w[1]),
        "alice saw bob's delivered position go back: {delivered:?}"
    );
}

/// `take_batch` raises the in-memory `first_seq` for count retention when it hands the batch
/// out, and `overview` reports it before the trim is durable. After a crash the store still
/// has the older messages and the overview's `first_seq` goes back.
#[test]
fn overview_first_seq_moves_only_when_the_trim_is_durable() {
    let mut s = Sim::new(cfg());
    s.group(
        "g",
        &["alice"],
        Retention {
            max_count: Some(2),
            max_age_ms: None,
        },
    );
    s.core.connect(1, "alice", "a1");
    for i in 1..=3 {
        s.send(1, "g", &format!("m{i}"));
    }
    s.flush();
    assert_eq!(info(&s.core, 1, "g").first_seq, 2);
    s.send(1, "g", "m4");
    let _b = s.take(); // trims below 3, not durable yet
    let i = info(&s.core, 1, "g");
    assert_eq!(s.store.seqs("g"), vec![2, 3], "seq 2 is still stored");
    assert_eq!(
        (i.first_seq, i.max_seq),
        (2, 3),
        "overview must describe durable state"
    );
}

/// The admin reply of a batch is built from the live record, so it includes later changes that
/// are still pending.
#[test]
fn an_admin_reply_describes_only_what_its_batch_made_durable() {
    let mut s = Sim::new(cfg());
    s.core
        .admin(
            1,
            AdminOp::CreateGroup {
                id: "g".into(),
                members: vec!["alice".into()],
                retention: Retention::default(),
            },
            s.now,
        )
        .unwrap();
    let b1 = s.take();
    s.core
        .admin(
            2,
            AdminOp::UpdateGroup {
                id: "g".into(),
                add: vec!["mallory".into()],
                remove: vec![],
                retention: None,
            },
            s.now,
        )
        .unwrap();
    let out = s.commit(&b1);
    match &out[..] {
        [Action::AdminDone {
            ticket: 1,
            reply: Ok(rec),
        }] => assert_eq!(
            rec.members,
            BTreeSet::from(["alice".to_string()]),
            "mallory's addition is not durable"
        ),
        other => panic!("{other:?}"),
    }
}

/// `expire_dedup` queues forgetting an expired key; a resend of that cmid before the next batch
/// is taken is a new message and queues a put of the same key. If the batch told the store to
/// forget the renewed entry too, it would be lost on disk: after a restart, another resend
/// inside the new window would be stored a second time (G2).
#[test]
fn a_batch_never_forgets_the_dedup_entries_it_puts() {
    let mut s = alice_alone_in_g(short_dedup_window());
    s.send(1, "g", "x");
    s.flush();
    s.now += 1_000;
    s.core.expire_dedup(s.now);
    assert!(
        s.send(1, "g", "x").is_empty(),
        "past the window: a new message"
    );
    let b = s.take();
    assert_eq!(batch_seqs(&b, "g"), vec![2]);
    let forget = b
        .dedup_forget_before_ms
        .expect("the first acceptance expired");
    assert!(b.messages.iter().all(|m| m.ts >= forget));
    s.commit(&b);
    assert_eq!(s.store.dedup.len(), 1, "the renewed entry is stored");
}

/// Membership changes take effect in memory when the admin request arrives, before the batch
/// holding them is durable: a user being added can read the history at once, and if the store
/// then fails (or the server crashes) the addition never happened, yet the history was served.
#[test]
fn an_added_member_reads_only_once_the_addition_is_durable() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "carol", "c1");
    s.send(1, "g", "secret");
    s.flush();
    s.add_member(3, "g", "carol");
    // Not committed: the admin has no answer yet, and a crash would undo the addition.
    assert_eq!(code(s.core.sync(2, "g", 0, None)), ErrorCode::NotMember);
}

/// Regression: the first send of a direct conversation used to drop an impossible reply_to
/// silently instead of rejecting it (fixed in the working tree while these tests were written).
#[test]
fn reply_to_is_checked_on_the_first_direct_message_too() {
    let mut s = Sim::new(cfg());
    s.core.connect(1, "alice", "a1");
    let out = s.core.send(
        1,
        SendRequest {
            conv: None,
            to: Some("bob"),
            cmid: "x".into(),
            body: "hi".into(),
            reply_to: Some(5),
        },
        s.now,
    );
    assert_eq!(rejected(&out).0, ErrorCode::Invalid);
    assert!(s.core.take_batch().is_none(), "no conversation created");
}

// ---------------------------------------------------------------------------------------------
// Property: random interleavings, duplicates, commit points and crashes
// ---------------------------------------------------------------------------------------------

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
                assert_eq!(rejected(&out).0, ErrorCode::NotMember);
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
                        .contains_key(&(m.from.clone(), m.cmid.clone())),
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
        let after = self.devs[di]
            .recv
            .get(&conv)
            .and_then(|r| r.last().copied())
            .unwrap_or(0);
        let res = self.s.core.sync(sid, &conv, after, Some(limit));
        if !self.s.store.convs.contains_key(&conv) {
            assert_eq!(code(res), ErrorCode::NotFound);
            return;
        }
        if !self.is_member(&conv, user) {
            assert_eq!(code(res), ErrorCode::NotMember);
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
        let last = self.devs[di]
            .recv
            .get(&conv)
            .and_then(|r| r.last().copied())
            .unwrap_or(0);
        let seq = if back { last / 2 } else { last };
        let res = if read {
            self.s.core.read(sid, &conv, seq)
        } else {
            self.s.core.ack(sid, &conv, seq)
        };
        if !self.s.store.convs.contains_key(&conv) {
            assert_eq!(code(res), ErrorCode::NotFound);
        } else if !self.is_member(&conv, user) {
            assert_eq!(code(res), ErrorCode::NotMember);
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
            .map(|(k, d)| (k.clone(), d.conv.clone()))
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
            assert_eq!(
                self.s.store.dedup.get(k).map(|d| (d.conv.clone(), d.seq)),
                Some(v[0].clone())
            );
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
                let have = d
                    .recv
                    .get(&c.id)
                    .and_then(|r| r.last().copied())
                    .unwrap_or(0);
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
