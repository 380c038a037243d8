//! The harness of the client state tests: a client under test ([`Tc`]) whose effects are all
//! carried out on the client crate's reference store and checked ([`carry_out`]), the frames a
//! server would send, and short views of the effects (the frames transmitted, the seqs handed,
//! the statuses told).

use ordo_client::{
    ClientConfig, ClientSnapshot, ClientState, Effect, Event, MemoryStore, Status, Target,
};
use ordo_protocol::{
    ClientFrame, ConvInfo, ConvKind, ErrorCode, Limits, MemberPosition, Message, ServerFrame,
};

/// Carries out one effect on the store and checks the ordering rules that hold for every
/// effect: a message reaches the app only once stored, and no position (`ack`, the `after` of a
/// `sync`, `read`) is sent to the server before the messages it covers are stored.
pub fn carry_out(db: &mut MemoryStore, e: &Effect) -> Result<(), String> {
    match e {
        Effect::Persist(ops) => db.apply(ops).map_err(|r| r.to_string()),
        Effect::Transmit(ClientFrame::Ack { acks }) => {
            for p in acks {
                if p.seq > db.contiguous(&p.conv) {
                    return Err(format!(
                        "ack {}/{} sent before it was stored (stored up to {})",
                        p.conv,
                        p.seq,
                        db.contiguous(&p.conv)
                    ));
                }
            }
            Ok(())
        }
        Effect::Transmit(ClientFrame::Sync { conv, after, .. }) if *after > db.contiguous(conv) => {
            Err(format!(
                "sync {conv} after {after} acknowledges what is not stored ({})",
                db.contiguous(conv)
            ))
        }
        Effect::Transmit(ClientFrame::Read { conv, seq }) if *seq > db.contiguous(conv) => {
            Err(format!(
                "read {conv}/{seq} beyond what is stored ({})",
                db.contiguous(conv)
            ))
        }
        Effect::Event(Event::Message(m)) => match db.message(&m.conv, m.seq) {
            Some(stored) if stored == m => Ok(()),
            _ => Err(format!(
                "{}/{} handed to the app before it was stored",
                m.conv, m.seq
            )),
        },
        _ => Ok(()),
    }
}

pub const TEAM: &str = "team";

pub const OTHER: &str = "other";

pub const EPOCH: u64 = 77;

/// A client under test with its local store; every effect is carried out and checked.
pub struct Tc {
    pub st: ClientState,
    pub db: MemoryStore,
}

impl Tc {
    pub fn new(cfg: ClientConfig) -> Self {
        Tc {
            st: ClientState::new(cfg, "phone", 42, ClientSnapshot::default()),
            db: MemoryStore::default(),
        }
    }

    /// A client restarted from what `db` holds.
    pub fn restarted(cfg: ClientConfig, db: MemoryStore) -> Self {
        Tc {
            st: ClientState::new(cfg, "phone", 43, db.snapshot()),
            db,
        }
    }

    /// Connected as `user`, welcome read, effects taken.
    pub fn online_with(cfg: ClientConfig, user: &str) -> Self {
        let mut c = Tc::new(cfg);
        c.st.connected(0);
        c.st.frame(welcome(user), 0);
        c.take();
        c
    }

    pub fn online(user: &str) -> Self {
        Tc::online_with(ClientConfig::default(), user)
    }

    pub fn take(&mut self) -> Vec<Effect> {
        let mut out = Vec::new();
        while let Some(e) = self.st.poll_effect() {
            if let Err(why) = carry_out(&mut self.db, &e) {
                panic!("{why}\n  effect: {e:?}\n  effects before it: {out:#?}");
            }
            out.push(e);
        }
        out
    }

    pub fn frame(&mut self, f: ServerFrame, now: u64) -> Vec<Effect> {
        self.st.frame(f, now);
        self.take()
    }

    pub fn tick(&mut self, now: u64) -> Vec<Effect> {
        self.st.tick(now);
        self.take()
    }

    pub fn send(&mut self, target: Target, body: &str, now: u64) -> (String, Vec<Effect>) {
        let cmid = self.st.send(target, body.to_string(), None, now);
        (cmid, self.take())
    }

    pub fn connect(&mut self, now: u64) -> Vec<Effect> {
        self.st.connected(now);
        self.take()
    }
}

pub fn team() -> Target {
    Target::Conv(TEAM.into())
}

pub fn welcome(user: &str) -> ServerFrame {
    ServerFrame::Welcome {
        user: user.into(),
        device: "phone".into(),
        protocol: 1,
        server_time: 0,
        limits: Limits::default(),
    }
}

pub fn m(conv: &str, seq: u64) -> Message {
    Message {
        conv: conv.into(),
        seq,
        from: "bob".into(),
        device: "tab".into(),
        cmid: format!("bob-{conv}-{seq}"),
        body: format!("{conv} #{seq}"),
        reply_to: None,
        ts: 1_000 + seq,
        event: None,
    }
}

pub fn push(conv: &str, seq: u64) -> ServerFrame {
    ServerFrame::Msg(m(conv, seq).into())
}

pub fn notify(conv: &str, max_seq: u64) -> ServerFrame {
    ServerFrame::Notify {
        conv: conv.into(),
        max_seq,
    }
}

pub fn synced(
    conv: &str,
    epoch: u64,
    seqs: std::ops::RangeInclusive<u64>,
    first_seq: u64,
    max_seq: u64,
    has_more: bool,
) -> ServerFrame {
    ServerFrame::Synced {
        conv: conv.into(),
        epoch,
        messages: seqs.map(|s| m(conv, s)).collect(),
        has_more,
        first_seq,
        max_seq,
    }
}

pub fn accepted(cmid: &str, conv: &str, seq: u64) -> ServerFrame {
    ServerFrame::Accepted {
        cmid: cmid.into(),
        conv: conv.into(),
        seq,
        ts: 5_000 + seq,
    }
}

pub fn rejected(cmid: &str, code: ErrorCode, retry_after_ms: Option<u64>) -> ServerFrame {
    ServerFrame::rejected(cmid, code, format!("refused: {code}"), retry_after_ms)
}

pub fn receipt(conv: &str, user: &str, delivered: u64, read: u64) -> ServerFrame {
    ServerFrame::Receipt {
        conv: conv.into(),
        user: user.into(),
        delivered,
        read,
    }
}

/// An overview entry; `members` are (user, delivered, read).
pub fn info(
    conv: &str,
    max_seq: u64,
    delivered: u64,
    read: u64,
    members: &[(&str, u64, u64)],
) -> ConvInfo {
    ConvInfo {
        conv: conv.into(),
        kind: ConvKind::Group,
        epoch: EPOCH,
        max_seq,
        first_seq: 1,
        delivered,
        read,
        member_count: members.len() as u64,
        others_delivered: 0,
        others_read: 0,
        name: None,
        members: members
            .iter()
            .map(|(u, d, r)| MemberPosition {
                user: u.to_string(),
                delivered: *d,
                read: *r,
            })
            .collect(),
    }
}

pub fn overview(list: Vec<ConvInfo>) -> ServerFrame {
    ServerFrame::Convs {
        conversations: list,
        has_more: false,
    }
}

/// The frames transmitted, written short: `send <cmid>`, `ack team:3 other:1`, `sync team>2`,
/// `read team:3`, `convs` (`convs >team` for a page after `team`).
pub fn wire(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Transmit(f) => Some(short(f)),
            _ => None,
        })
        .collect()
}

pub fn short(f: &ClientFrame) -> String {
    match f {
        ClientFrame::Send { cmid, .. } => format!("send {cmid}"),
        ClientFrame::Ack { acks } => {
            let parts: Vec<String> = acks
                .iter()
                .map(|p| format!("{}:{}", p.conv, p.seq))
                .collect();
            format!("ack {}", parts.join(" "))
        }
        ClientFrame::Read { conv, seq } => format!("read {conv}:{seq}"),
        ClientFrame::Sync { conv, after, .. } => format!("sync {conv}>{after}"),
        ClientFrame::Convs { after: None, .. } => "convs".into(),
        ClientFrame::Convs { after: Some(a), .. } => format!("convs >{a}"),
        ClientFrame::Ping { .. } => "ping".into(),
    }
}

/// Seqs handed to the app, in order.
pub fn handed(effects: &[Effect]) -> Vec<u64> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Event(Event::Message(m)) => Some(m.seq),
            _ => None,
        })
        .collect()
}

pub fn statuses(effects: &[Effect]) -> Vec<(String, Status)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Event(Event::Status { cmid, status, .. }) => {
                Some((cmid.clone(), status.clone()))
            }
            _ => None,
        })
        .collect()
}

pub fn send_frame(conv: Option<&str>, to: Option<&str>, cmid: &str, body: &str) -> ClientFrame {
    ClientFrame::Send {
        conv: conv.map(str::to_string),
        to: to.map(str::to_string),
        cmid: cmid.into(),
        body: body.into(),
        reply_to: None,
    }
}

/// Ticks every 10 ms over `times`; the highest delivered position the client told the server,
/// by `ack` or by the `after` of a `sync`.
pub fn told_delivered(c: &mut Tc, times: std::ops::Range<u64>) -> u64 {
    let mut told = 0;
    for t in times.step_by(10) {
        for f in c.tick(t) {
            match f {
                Effect::Transmit(ClientFrame::Ack { acks }) => {
                    told = acks.iter().map(|p| p.seq).max().unwrap_or(0).max(told)
                }
                Effect::Transmit(ClientFrame::Sync { after, .. }) => told = told.max(after),
                _ => {}
            }
        }
    }
    told
}
