//! Client conformance vectors: scenarios run through the Rust client state machine
//! ([`ClientState`]) and recorded as JSON (what went in, and every effect that came out), in
//! `sdk/typescript/conformance/`. The TypeScript SDK's test suite replays each file through its
//! own state machine and must produce the same effects, byte for byte once parsed, so the two
//! SDKs cannot drift apart.
//!
//! This test records every scenario again and compares with the committed files: a change of
//! behaviour here fails it until the vectors are recorded again with
//! `ORDO_BLESS=1 cargo test -p ordo-client --test conformance` (and the TypeScript SDK made to
//! match them, which its own tests check).
//!
//! The format (one JSON object per file), which `sdk/typescript/test/conformance.test.ts` reads:
//!
//! - `config`, `device`, `seed`: how the client is built (seeds are below 2^53);
//! - `steps`: in order, each `{"in": <input>, "out": [<effect>...]}`, where an input is one of
//!   `{"connected": {"now"}}`, `"disconnected"`, `{"tick": {"now"}}`,
//!   `{"frame": {"frame": <server frame as on the wire>, "now"}}`,
//!   `{"send": {"target": {"conv"}|{"user"}, "body", "reply_to", "now"}}`,
//!   `{"mark_read": {"conv", "seq"}}`, or `{"restart": {"seed", "snapshot"}}`: the client
//!   crashed and is rebuilt from its store, which must hold exactly `snapshot`;
//! - a step may carry `"crash_after": k`: the client crashed after carrying out only its first
//!   `k` effects (the later ones, persists included, never happened);
//! - an effect is `{"persist": [<store op>...]}`, `{"transmit": <client frame as on the wire>}`
//!   or `{"event": <event>}`, in the shapes of the TypeScript SDK's `StoreOp` and `Event`.

use ordo_client::{
    ClientConfig, ClientSnapshot, ClientState, Effect, Event, MemoryStore, Pending, Status,
    StoreOp, Target,
};
use ordo_protocol::{
    encode, ConvEvent, ConvInfo, Encoded, Encoding, ErrorCode, Message, ServerFrame,
};
use serde_json::{json, Value};
use std::path::PathBuf;

fn wire<T: serde::Serialize>(frame: &T) -> Value {
    match encode(frame, Encoding::Json) {
        Encoded::Text(s) => serde_json::from_str(&s).expect("a frame encodes as JSON"),
        Encoded::Binary(_) => unreachable!("JSON encoding gives text"),
    }
}

fn status(s: &Status) -> Value {
    match s {
        Status::Pending => json!({"state": "pending"}),
        Status::Sent(seq) => json!({"state": "sent", "seq": seq}),
        Status::Delivered => json!({"state": "delivered"}),
        Status::Read => json!({"state": "read"}),
        Status::Failed(reason) => json!({"state": "failed", "reason": reason}),
    }
}

fn target(t: &Target) -> Value {
    match t {
        Target::Conv(c) => json!({"conv": c}),
        Target::User(u) => json!({"user": u}),
    }
}

fn pending(p: &Pending) -> Value {
    json!({
        "cmid": p.cmid, "target": target(&p.target), "body": p.body, "reply_to": p.reply_to,
        "attempts": p.attempts, "due_ms": p.due_ms,
    })
}

fn message(m: &Message) -> Value {
    serde_json::to_value(m).expect("a message serializes")
}

fn op(o: &StoreOp) -> Value {
    match o {
        StoreOp::PutPending(p) => json!({"op": "put_pending", "pending": pending(p)}),
        StoreOp::RemovePending(cmid) => json!({"op": "remove_pending", "cmid": cmid}),
        StoreOp::PutMessages {
            conv,
            messages,
            contiguous,
        } => json!({
            "op": "put_messages", "conv": conv,
            "messages": messages.iter().map(message).collect::<Vec<_>>(), "contiguous": contiguous,
        }),
        StoreOp::SetConv {
            conv,
            epoch,
            contiguous,
            reset,
        } => json!({
            "op": "set_conv", "conv": conv, "epoch": epoch, "contiguous": contiguous,
            "reset": reset,
        }),
        StoreOp::SetRead { conv, seq } => json!({"op": "set_read", "conv": conv, "seq": seq}),
        StoreOp::PutSent {
            conv,
            seq,
            cmid,
            status: s,
        } => json!({
            "op": "put_sent", "conv": conv, "seq": seq, "cmid": cmid, "status": status(s),
        }),
    }
}

fn event(e: &Event) -> Value {
    match e {
        Event::Message(m) => json!({"type": "message", "message": message(m)}),
        Event::Removed { conv, seq, left } => {
            json!({"type": "removed", "conv": conv, "seq": seq, "left": left})
        }
        Event::Status {
            cmid,
            conv,
            status: s,
        } => json!({"type": "status", "cmid": cmid, "conv": conv, "status": status(s)}),
        Event::Receipt {
            conv,
            user,
            delivered,
            read,
        } => json!({
            "type": "receipt", "conv": conv, "user": user, "delivered": delivered, "read": read,
        }),
        Event::HistoryGap { conv, from, to } => {
            json!({"type": "history_gap", "conv": conv, "from": from, "to": to})
        }
        Event::EpochReset { conv, epoch } => {
            json!({"type": "epoch_reset", "conv": conv, "epoch": epoch})
        }
        Event::ServerError { code, message } => {
            json!({"type": "server_error", "code": code, "message": message})
        }
        Event::Connected => json!({"type": "connected"}),
        Event::Disconnected => json!({"type": "disconnected"}),
        Event::ConnectFailed {
            reason,
            unauthorized,
        } => json!({"type": "connect_failed", "reason": reason, "unauthorized": unauthorized}),
    }
}

fn effect(e: &Effect) -> Value {
    match e {
        Effect::Persist(ops) => json!({"persist": ops.iter().map(op).collect::<Vec<_>>()}),
        Effect::Transmit(f) => json!({"transmit": wire(f)}),
        Effect::Event(e) => json!({"event": event(e)}),
    }
}

fn snapshot(s: &ClientSnapshot) -> Value {
    json!({
        "outbox": s.outbox.iter().map(pending).collect::<Vec<_>>(),
        "convs": s.convs.iter().map(|c| json!({
            "conv": c.conv, "epoch": c.epoch, "contiguous": c.contiguous, "read": c.read,
        })).collect::<Vec<_>>(),
        "sent": s.sent.iter().map(|x| json!({
            "conv": x.conv, "seq": x.seq, "cmid": x.cmid, "status": status(&x.status),
        })).collect::<Vec<_>>(),
    })
}

fn config(c: &ClientConfig) -> Value {
    json!({
        "retry": {
            "initial_ms": c.retry.initial_ms, "factor": c.retry.factor, "max_ms": c.retry.max_ms,
            "jitter": c.retry.jitter, "max_attempts": c.retry.max_attempts,
        },
        "ack_delay_ms": c.ack_delay_ms, "ack_every": c.ack_every,
        "reorder_capacity": c.reorder_capacity, "sync_limit": c.sync_limit,
    })
}

/// A scenario being recorded: the client, the store its effects went to, the steps so far.
struct Rec {
    name: &'static str,
    about: &'static str,
    cfg: ClientConfig,
    device: &'static str,
    seed: u64,
    st: ClientState,
    db: MemoryStore,
    steps: Vec<Value>,
}

impl Rec {
    fn new(name: &'static str, about: &'static str, cfg: ClientConfig) -> Rec {
        let seed = 42;
        Rec {
            name,
            about,
            st: ClientState::new(cfg.clone(), "phone", seed, ClientSnapshot::default()),
            cfg,
            device: "phone",
            seed,
            db: MemoryStore::default(),
            steps: Vec::new(),
        }
    }

    /// Drains the effects of the last input, carrying out the first `keep` (all: `None`).
    fn record(&mut self, input: Value, keep: Option<usize>) -> Vec<Effect> {
        let mut out = Vec::new();
        while let Some(e) = self.st.poll_effect() {
            if keep.is_none_or(|k| out.len() < k) {
                if let Effect::Persist(ops) = &e {
                    self.db
                        .apply(ops)
                        .unwrap_or_else(|r| panic!("{}: store refused {ops:?}: {r}", self.name));
                }
            }
            out.push(e);
        }
        let mut step = json!({"in": input, "out": out.iter().map(effect).collect::<Vec<_>>()});
        if let Some(k) = keep {
            step["crash_after"] = json!(k);
        }
        self.steps.push(step);
        out
    }

    fn connected(&mut self, now: u64) -> Vec<Effect> {
        self.st.connected(now);
        self.record(json!({"connected": {"now": now}}), None)
    }

    fn disconnected(&mut self) -> Vec<Effect> {
        self.st.disconnected();
        self.record(json!("disconnected"), None)
    }

    fn tick(&mut self, now: u64) -> Vec<Effect> {
        self.st.tick(now);
        self.record(json!({"tick": {"now": now}}), None)
    }

    fn frame(&mut self, f: ServerFrame, now: u64) -> Vec<Effect> {
        let input = json!({"frame": {"frame": wire(&f), "now": now}});
        self.st.frame(f, now);
        self.record(input, None)
    }

    /// A frame whose effects are carried out only up to `keep` before the client crashes.
    fn frame_then_crash(&mut self, f: ServerFrame, now: u64, keep: usize) -> Vec<Effect> {
        let input = json!({"frame": {"frame": wire(&f), "now": now}});
        self.st.frame(f, now);
        self.record(input, Some(keep))
    }

    fn send(&mut self, t: Target, body: &str, reply_to: Option<u64>, now: u64) -> String {
        let input =
            json!({"send": {"target": target(&t), "body": body, "reply_to": reply_to, "now": now}});
        let cmid = self.st.send(t, body.to_string(), reply_to, now);
        self.record(input, None);
        cmid
    }

    fn mark_read(&mut self, conv: &str, seq: u64) -> Vec<Effect> {
        self.st.mark_read(conv, seq);
        self.record(json!({"mark_read": {"conv": conv, "seq": seq}}), None)
    }

    /// The client is rebuilt from its store (after a crash, or a clean stop).
    fn restart(&mut self, seed: u64) {
        let snap = self.db.snapshot();
        self.steps.push(
            json!({"in": {"restart": {"seed": seed, "snapshot": snapshot(&snap)}}, "out": []}),
        );
        self.st = ClientState::new(self.cfg.clone(), self.device, seed, snap);
    }

    fn finish(self) -> (String, Value) {
        let v = json!({
            "name": self.name, "about": self.about, "config": config(&self.cfg),
            "device": self.device, "seed": self.seed, "steps": self.steps,
        });
        (self.name.to_string(), v)
    }
}

// ----- frames a server would send (the client state tests' builders, and a few more) -----

#[allow(dead_code)] // the state tests' harness: this test uses its frame builders only
#[path = "state/support.rs"]
mod support;

use support::{accepted, info, m, push, receipt, rejected, welcome, EPOCH, OTHER, TEAM};

fn m_epoch(conv: &str, epoch: u64, seq: u64) -> Message {
    Message {
        cmid: format!("bob-{conv}-{epoch}-{seq}"),
        ..m(conv, seq)
    }
}

fn synced(
    conv: &str,
    epoch: u64,
    messages: Vec<Message>,
    first: u64,
    max: u64,
    more: bool,
) -> ServerFrame {
    ServerFrame::Synced {
        conv: conv.into(),
        epoch,
        messages,
        has_more: more,
        first_seq: first,
        max_seq: max,
    }
}

fn page(conv: &str, seqs: std::ops::RangeInclusive<u64>) -> Vec<Message> {
    seqs.map(|s| m(conv, s)).collect()
}

fn convs(list: Vec<ConvInfo>, has_more: bool) -> ServerFrame {
    ServerFrame::Convs {
        conversations: list,
        has_more,
    }
}

fn online(name: &'static str, about: &'static str, cfg: ClientConfig) -> Rec {
    let mut r = Rec::new(name, about, cfg);
    r.connected(0);
    r.frame(welcome("alice"), 0);
    r
}

// ----- the scenarios -----

fn resend() -> Rec {
    let mut r = Rec::new(
        "resend",
        "sent offline, then resent with the same cmid on every connect and on the backoff \
         schedule; a duplicate accept changes nothing; a later message waits behind a refused one",
        ClientConfig::default(),
    );
    let a = r.send(Target::Conv(TEAM.into()), "first", None, 0);
    let b = r.send(Target::Conv(TEAM.into()), "second", Some(3), 5);
    let c = r.send(Target::User("bob".into()), "to bob", None, 6);
    r.connected(10);
    r.frame(welcome("alice"), 10);
    r.tick(400);
    r.tick(1_000);
    r.disconnected();
    r.tick(5_000);
    r.connected(6_000);
    r.frame(rejected(&a, ErrorCode::RateLimited, Some(300)), 6_010);
    r.tick(6_200);
    r.frame(accepted(&b, TEAM, 9), 6_250);
    r.tick(6_400);
    r.frame(accepted(&a, TEAM, 8), 6_500);
    r.frame(accepted(&a, TEAM, 8), 6_510);
    r.frame(accepted(&c, "d_bob", 1), 6_600);
    r.tick(60_000);
    r
}

fn failures() -> Rec {
    let mut cfg = ClientConfig::default();
    cfg.retry.max_attempts = Some(3);
    let mut r = online(
        "failures",
        "a non-retryable rejection fails the message at once; one never answered fails after \
         its attempts; each leaves the outbox",
        cfg,
    );
    let a = r.send(Target::Conv("board".into()), "nobody home", None, 0);
    let _b = r.send(Target::Conv(TEAM.into()), "unanswered", None, 0);
    r.frame(rejected(&a, ErrorCode::NotFound, None), 10);
    for now in [700, 1_500, 3_000, 6_000, 12_000] {
        r.tick(now);
    }
    r
}

fn reorder() -> Rec {
    let mut r = online(
        "reorder",
        "pushes out of order wait behind the hole, which a sync fills; duplicates are dropped; \
         each seq reaches the app once, in order, stored first",
        ClientConfig::default(),
    );
    r.frame(push(TEAM, 1), 10);
    r.frame(push(TEAM, 3), 11);
    r.frame(push(TEAM, 4), 12);
    r.frame(push(TEAM, 3), 13);
    r.frame(synced(TEAM, EPOCH, page(TEAM, 2..=4), 1, 4, false), 20);
    r.frame(push(TEAM, 2), 21);
    r.frame(push(TEAM, 5), 22);
    r.tick(300);
    r.frame(
        ServerFrame::Notify {
            conv: OTHER.into(),
            max_seq: 3,
        },
        400,
    );
    r.frame(synced(OTHER, 5, page(OTHER, 1..=2), 1, 3, true), 410);
    r.frame(synced(OTHER, 5, page(OTHER, 3..=3), 1, 3, false), 420);
    r.tick(700);
    r
}

fn acks() -> Rec {
    let cfg = ClientConfig {
        ack_every: 4,
        ..ClientConfig::default()
    };
    let mut r = online(
        "acks",
        "acks are cumulative and batched: after a delay, or at once after ack_every messages; \
         the overview's older delivered position is acknowledged again",
        cfg,
    );
    for s in 1..=3 {
        r.frame(push(TEAM, s), s);
    }
    r.tick(100);
    r.tick(250);
    for s in 4..=9 {
        r.frame(push(TEAM, s), 300 + s);
    }
    r.frame(
        convs(
            vec![info(TEAM, 9, 5, 0, &[("alice", 5, 0), ("bob", 9, 9)])],
            false,
        ),
        400,
    );
    r.tick(401);
    r.disconnected();
    r.tick(1_000);
    r
}

fn gaps() -> Rec {
    let mut r = online(
        "gaps",
        "retention removed history: the hole is reported once as a gap, buffered messages past \
         it are handed on, and a sync after everything was removed reports it too",
        ClientConfig::default(),
    );
    r.frame(push(TEAM, 1), 1);
    r.frame(push(TEAM, 9), 2);
    r.frame(synced(TEAM, EPOCH, page(TEAM, 8..=10), 8, 10, false), 3);
    r.frame(
        ServerFrame::Notify {
            conv: OTHER.into(),
            max_seq: 20,
        },
        4,
    );
    r.frame(synced(OTHER, EPOCH, vec![], 21, 20, false), 5);
    r
}

fn epochs() -> Rec {
    let mut r = online(
        "epochs",
        "a conversation's history was reset on the server: the client drops its position, \
         reports the reset, and fetches the new history from the start",
        ClientConfig::default(),
    );
    r.frame(synced(TEAM, EPOCH, page(TEAM, 1..=3), 1, 3, false), 1);
    r.mark_read(TEAM, 3);
    r.frame(
        convs(
            vec![ConvInfo {
                epoch: 91,
                ..info(TEAM, 2, 3, 3, &[("alice", 3, 3), ("bob", 3, 3)])
            }],
            false,
        ),
        2,
    );
    r.frame(synced(TEAM, 91, vec![], 1, 2, false), 3);
    r.frame(
        synced(
            TEAM,
            91,
            (1..=2).map(|s| m_epoch(TEAM, 91, s)).collect(),
            1,
            2,
            false,
        ),
        4,
    );
    r.tick(500);
    r
}

fn statuses() -> Rec {
    let mut r = online(
        "statuses",
        "our messages move pending, sent, delivered, read from accepts, receipts and overviews, \
         learning the members first; reads are sent, and sent again after a reconnect",
        ClientConfig::default(),
    );
    let a = r.send(Target::Conv(TEAM.into()), "one", None, 0);
    let b = r.send(Target::Conv(TEAM.into()), "two", None, 0);
    r.frame(receipt(TEAM, "bob", 1, 0), 1);
    r.frame(accepted(&a, TEAM, 1), 2);
    r.frame(accepted(&b, TEAM, 2), 3);
    r.frame(
        convs(
            vec![info(
                TEAM,
                2,
                2,
                0,
                &[("alice", 2, 0), ("bob", 1, 0), ("carol", 2, 1)],
            )],
            false,
        ),
        4,
    );
    r.frame(receipt(TEAM, "bob", 2, 1), 5);
    r.frame(receipt(TEAM, "carol", 2, 2), 6);
    r.frame(receipt(TEAM, "bob", 2, 2), 7);
    r.frame(push(TEAM, 3), 8);
    r.mark_read(TEAM, 3);
    r.mark_read(TEAM, 2);
    r.disconnected();
    r.frame(push(TEAM, 4), 9);
    r.connected(10);
    r.frame(
        convs(
            vec![info(TEAM, 4, 3, 1, &[("alice", 3, 1), ("bob", 2, 2)])],
            true,
        ),
        11,
    );
    r.frame(
        convs(
            vec![ConvInfo {
                member_count: 300,
                others_delivered: 0,
                others_read: 0,
                ..info("big", 0, 0, 0, &[])
            }],
            false,
        ),
        12,
    );
    // A group too large to list its members: statuses follow the others' lowest positions.
    let big = r.send(Target::Conv("big".into()), "to many", None, 13);
    r.frame(accepted(&big, "big", 1), 14);
    for (others_delivered, others_read) in [(1, 0), (1, 1)] {
        r.frame(
            convs(
                vec![ConvInfo {
                    member_count: 300,
                    others_delivered,
                    others_read,
                    ..info("big", 1, 1, 0, &[])
                }],
                false,
            ),
            15,
        );
    }
    r
}

fn reorder_overflow() -> Rec {
    let cfg = ClientConfig {
        reorder_capacity: 2,
        ..ClientConfig::default()
    };
    let mut r = online(
        "reorder_overflow",
        "a hole never holds more than reorder_capacity messages: the lowest are kept, the \
         highest dropped and pulled again",
        cfg,
    );
    for s in [1, 3, 5, 4, 6, 2] {
        r.frame(push(TEAM, s), s);
    }
    r.frame(synced(TEAM, EPOCH, page(TEAM, 2..=4), 1, 7, true), 10);
    r.frame(synced(TEAM, EPOCH, page(TEAM, 5..=7), 1, 7, false), 11);
    r
}

fn removed() -> Rec {
    let mut r = online(
        "removed",
        "this user is removed from a group: the event is handed over if it is next, and the \
         client is told; server errors on sync and convs let them be asked again",
        ClientConfig::default(),
    );
    r.frame(push(TEAM, 1), 1);
    r.frame(
        ServerFrame::Msg(
            Message {
                from: String::new(),
                device: String::new(),
                cmid: "#event:team:77:2".into(),
                body: String::new(),
                event: Some(ConvEvent::Removed {
                    users: vec!["alice".into()],
                }),
                ..m(TEAM, 2)
            }
            .into(),
        ),
        2,
    );
    r.frame(push(OTHER, 2), 3);
    r.frame(
        ServerFrame::Error {
            code: ErrorCode::NotFound,
            message: "no such conversation".into(),
            request: Some("sync".into()),
            conv: Some(OTHER.into()),
        },
        4,
    );
    r.frame(push(OTHER, 3), 5);
    r.frame(
        ServerFrame::Error {
            code: ErrorCode::Unavailable,
            message: "busy".into(),
            request: Some("convs".into()),
            conv: None,
        },
        6,
    );
    r.frame(receipt(OTHER, "bob", 1, 1), 7);
    r
}

fn crashes() -> Rec {
    let mut r = online(
        "crashes",
        "crashes between storing and acknowledging, and between accept and its store: the \
         restarted client resumes from what was stored, acks nothing it lacks, resends what \
         was not recorded as accepted",
        ClientConfig::default(),
    );
    let a = r.send(Target::Conv(TEAM.into()), "hello", None, 0);
    // The page is stored (first effect) but the client dies before handing or acking it.
    r.frame_then_crash(synced(TEAM, EPOCH, page(TEAM, 1..=3), 1, 3, false), 10, 1);
    r.restart(7);
    r.connected(20);
    r.frame(welcome("alice"), 20);
    r.frame(
        convs(
            vec![info(TEAM, 5, 0, 0, &[("alice", 0, 0), ("bob", 5, 0)])],
            false,
        ),
        21,
    );
    // The accept arrives, but the client dies before storing it: the message is resent.
    r.frame_then_crash(accepted(&a, TEAM, 4), 22, 0);
    r.restart(8);
    r.connected(30);
    r.frame(welcome("alice"), 30);
    r.frame(accepted(&a, TEAM, 4), 31);
    r.frame(
        synced(
            TEAM,
            EPOCH,
            page(TEAM, 4..=5)
                .into_iter()
                .map(|mut x| {
                    if x.seq == 4 {
                        x.from = "alice".into();
                        x.device = "phone".into();
                        x.cmid = a.clone();
                    }
                    x
                })
                .collect(),
            1,
            5,
            false,
        ),
        32,
    );
    r.tick(300);
    r.frame(receipt(TEAM, "bob", 5, 4), 33);
    r.restart(9);
    r.connected(40);
    r
}

fn random_walk(seed: u64) -> Rec {
    // A long deterministic mix of everything, driven by xorshift: sends, pushes and pages in and
    // out of order, accepts and rejections, receipts, overviews, ticks, drops and restarts.
    let mut rng = seed | 1;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let cfg = ClientConfig {
        ack_every: 5,
        reorder_capacity: 4,
        sync_limit: 3,
        ..ClientConfig::default()
    };
    let mut r = Rec::new(
        "random_walk",
        "a long deterministic mix of sends, pushes and pages in and out of order, accepts and \
         rejections, receipts, overviews, timers, dropped connections and restarts",
        cfg,
    );
    let convs_ = [TEAM, OTHER];
    let mut max = [0u64; 2];
    let mut sent: Vec<(String, usize)> = Vec::new();
    let mut accepted_at: std::collections::HashMap<String, u64> = Default::default();
    let mut now = 0u64;
    let mut online_ = false;
    let mut restarts = 100;
    for _ in 0..400 {
        now += next(400);
        let ci = next(2) as usize;
        let conv = convs_[ci];
        match next(14) {
            0 if !online_ => {
                r.connected(now);
                r.frame(welcome("alice"), now);
                online_ = true;
            }
            0 | 1 if online_ && next(3) == 0 => {
                r.disconnected();
                online_ = false;
            }
            2 => {
                let cmid = r.send(Target::Conv(conv.into()), &format!("m{now}"), None, now);
                sent.push((cmid, ci));
            }
            3 if online_ && !sent.is_empty() => {
                let i = next(sent.len() as u64) as usize;
                let (cmid, ci) = sent[i].clone();
                let seq = *accepted_at.entry(cmid.clone()).or_insert_with(|| {
                    max[ci] += 1;
                    max[ci]
                });
                r.frame(accepted(&cmid, convs_[ci], seq), now);
            }
            4 if online_ && !sent.is_empty() => {
                let i = next(sent.len() as u64) as usize;
                let code = [
                    ErrorCode::RateLimited,
                    ErrorCode::Unavailable,
                    ErrorCode::NotMember,
                ][next(3) as usize];
                r.frame(rejected(&sent[i].0.clone(), code, Some(next(900))), now);
            }
            5 | 6 if online_ => {
                max[ci] += 1;
                let s = max[ci].saturating_sub(next(3)).max(1);
                r.frame(push(conv, s), now);
            }
            7 if online_ && max[ci] > 0 => {
                let after = next(max[ci] + 1);
                let hi = (after + 3).min(max[ci]);
                r.frame(
                    synced(
                        conv,
                        EPOCH,
                        page(conv, after + 1..=hi),
                        1,
                        max[ci],
                        hi < max[ci],
                    ),
                    now,
                );
            }
            8 if online_ => {
                let d = next(max[ci] + 1);
                let rd = next(d + 1);
                r.frame(receipt(conv, "bob", d, rd), now);
            }
            9 if online_ => {
                let list = convs_
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let d = next(max[i] + 1);
                        info(
                            c,
                            max[i],
                            next(max[i] + 1),
                            0,
                            &[("alice", 0, 0), ("bob", d, next(d + 1))],
                        )
                    })
                    .collect();
                r.frame(convs(list, false), now);
            }
            10 => {
                let upto = r.st.contiguous(conv);
                r.mark_read(conv, upto.saturating_sub(next(2)));
            }
            11 if next(6) == 0 => {
                if online_ {
                    // A frame whose effects are cut short by the crash.
                    max[ci] += 1;
                    let keep = next(3) as usize;
                    r.frame_then_crash(push(conv, max[ci]), now, keep);
                }
                restarts += 1;
                r.restart(restarts);
                online_ = false;
            }
            _ => {
                r.tick(now);
            }
        }
    }
    r
}

fn scenarios() -> Vec<Rec> {
    vec![
        resend(),
        failures(),
        reorder(),
        reorder_overflow(),
        acks(),
        gaps(),
        epochs(),
        statuses(),
        removed(),
        crashes(),
        random_walk(0x9e37_79b9),
    ]
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../sdk/typescript/conformance")
}

#[test]
fn vectors_match_the_state_machine() {
    let bless = std::env::var("ORDO_BLESS").is_ok_and(|v| v == "1");
    let mut stale = Vec::new();
    let mut names = Vec::new();
    for rec in scenarios() {
        let (name, v) = rec.finish();
        let text = serde_json::to_string_pretty(&v).expect("a vector serializes") + "\n";
        let path = dir().join(format!("{name}.json"));
        names.push(format!("{name}.json"));
        if bless {
            std::fs::create_dir_all(dir()).expect("the vector folder can be made");
            std::fs::write(&path, &text).expect("a vector can be written");
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            stale.push(path.display().to_string());
        }
    }
    if !bless {
        let mut present: Vec<String> = std::fs::read_dir(dir())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".json"))
                    .collect()
            })
            .unwrap_or_default();
        present.retain(|n| !names.contains(n));
        assert!(
            present.is_empty(),
            "vectors no scenario records any more: {present:?}; delete them"
        );
    }
    assert!(
        stale.is_empty(),
        "the client state machine no longer produces these conformance vectors: {stale:?}. If \
         the change is intended, record them again with `ORDO_BLESS=1 cargo test -p \
         ordo-client --test conformance` and make the TypeScript SDK pass them \
         (`npm test` in sdk/typescript)"
    );
}

/// Every vector covers what it is named for: checked on the recorded effects, so that a
/// scenario that stops exercising its rule (after a change of the state machine) is noticed.
#[test]
fn scenarios_exercise_their_rules() {
    let all: Vec<(String, Value)> = scenarios().into_iter().map(Rec::finish).collect();
    let text = |name: &str| {
        serde_json::to_string(&all.iter().find(|(n, _)| n == name).unwrap().1).unwrap()
    };
    assert!(
        text("resend").matches("\"type\":\"send\"").count() >= 6,
        "resends recorded"
    );
    assert!(text("failures").contains("not accepted after 3 attempts"));
    assert!(text("failures").contains("not_found"));
    assert!(text("reorder").contains("\"type\":\"sync\""));
    assert!(text("statuses").contains("\"cmid\":\"phone-"));
    assert!(text("acks").contains("\"type\":\"ack\""));
    assert!(text("gaps").contains("history_gap"));
    assert!(text("epochs").contains("epoch_reset"));
    assert!(text("statuses").contains("\"state\":\"read\""));
    assert!(text("statuses").contains("\"state\":\"delivered\""));
    assert!(text("removed").contains("\"type\":\"removed\""));
    assert!(text("crashes").contains("crash_after"));
    let walk = text("random_walk");
    for needle in [
        "restart",
        "crash",
        "\"state\":\"failed\"",
        "\"type\":\"ack\"",
        "\"type\":\"sync\"",
    ] {
        assert!(walk.contains(needle), "the random walk covers {needle}");
    }
}
