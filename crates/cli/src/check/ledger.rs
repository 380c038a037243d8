//! The ledger of a check: what every device sent, what the server accepted, what every device
//! was handed, and the verdict.
//!
//! Checked as events arrive: each device gets each conversation's seqs exactly as 1, 2, 3, ...
//! (a repeat is a duplicate, a jump is a misorder) and receipts never go back. Checked at the
//! end: every accepted message is at its seq on every member device, every device saw the same
//! message at the same seq, every sent message was accepted once, and each device's messages
//! kept their send order.

use ordo_client::{Event, Message, Status};
use serde::Serialize;
use std::collections::HashMap;

/// The verdict, printed and (with `--json`) written as JSON.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub seed: u64,
    pub seconds: f64,
    pub devices: usize,
    pub sent: u64,
    pub accepted: u64,
    pub delivered: u64,
    pub server_kills: u64,
    /// SIGKILLs of the database's primary (with `--pg-cluster`), and for each how long until a
    /// primary took writes again (a standby promoted, or the primary restarted), in ms.
    pub db_kills: u64,
    pub db_recovery_ms: Vec<u64>,
    pub client_kills: u64,
    pub disconnects: u64,
    /// Cluster nodes (`--nodes`; 0: one server, not a cluster).
    pub nodes: usize,
    /// Nodes SIGKILLed (then restarted), SIGSTOPped past their lease (then resumed), and cut
    /// off NATS.
    pub node_kills: u64,
    pub node_pauses: u64,
    pub nats_cuts: u64,
    /// Nodes stopped with SIGTERM (then restarted): each hands its partitions over first, and
    /// must exit cleanly.
    pub node_stops: u64,
    /// For each SIGTERM, ms until the other nodes held every partition of the node.
    pub handover_ms: Vec<u64>,
    /// Nodes found exited and restarted: most stopped themselves on finding, after a pause,
    /// that another node had taken over a partition they had work on.
    pub self_stops: u64,
    /// For each kill and pause, ms until the other nodes held every partition of the node.
    pub takeover_ms: Vec<u64>,
    /// Takeovers that did not finish in time, nodes that could not be restarted, and nodes
    /// that exited for any reason but a lost partition (each also in `violations`).
    pub node_failures: u64,
    /// Accepted messages missing on a member device.
    pub lost: u64,
    /// Sent messages never accepted (still in an outbox when the check ended: with `settled`
    /// false, the run was cut short rather than a message lost).
    pub unaccepted: u64,
    /// Messages handed to a device twice, or accepted under two seqs.
    pub duplicated: u64,
    /// Seqs skipped or out of order, devices disagreeing on a seq, or a device's messages
    /// numbered out of send order.
    pub misordered: u64,
    pub receipt_regressions: u64,
    /// Messages handed to a device as from a user or device other than the one that wrote
    /// them (each body names its writer): one user's message sent as another's.
    pub misattributed: u64,
    /// Messages handed to a device whose user is not a member of their conversation.
    pub leaked: u64,
    /// TypeScript SDK devices (`--ts-clients`), each a Node process; of `sent`, `delivered`
    /// and `client_kills`, theirs (a kill is a SIGKILL of the process).
    pub ts_devices: usize,
    pub ts_sent: u64,
    pub ts_delivered: u64,
    pub ts_kills: u64,
    /// TypeScript device processes that exited, or answered nothing, by themselves (each then
    /// started again on its store): an SDK that stops or hangs fails the check.
    pub ts_exits: u64,
    /// Messages a SIGKILLed TypeScript device had printed but not yet recorded as taken,
    /// handed to it again after the restart: the repeat the SDK documents for the last
    /// message before a crash, allowed once each.
    pub repeated_after_kill: u64,
    /// Devices that could not be started (each also in `violations`).
    pub device_failures: u64,
    /// Everything was delivered before the settle deadline.
    pub settled: bool,
    /// The first violations, in words.
    pub violations: Vec<String>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.settled
            && self.lost == 0
            && self.unaccepted == 0
            && self.duplicated == 0
            && self.misordered == 0
            && self.receipt_regressions == 0
            && self.misattributed == 0
            && self.leaked == 0
            && self.node_failures == 0
            && self.device_failures == 0
            && self.ts_exits == 0
    }

    pub fn print(&self) {
        println!(
            "ordo check: seed {}, {:.1} s, {} devices",
            self.seed, self.seconds, self.devices
        );
        println!(
            "  sent {}  accepted {}  delivered {}",
            self.sent, self.accepted, self.delivered
        );
        println!(
            "  server kills {}  client kills {}  disconnects {}",
            self.server_kills, self.client_kills, self.disconnects
        );
        if self.ts_devices > 0 {
            println!(
                "  TypeScript devices {}: sent {}  delivered {}  kills {}  unbidden exits {}  repeated after a kill {}",
                self.ts_devices,
                self.ts_sent,
                self.ts_delivered,
                self.ts_kills,
                self.ts_exits,
                self.repeated_after_kill
            );
        }
        if self.device_failures > 0 {
            println!(
                "  devices that could not be started {}",
                self.device_failures
            );
        }
        if self.db_kills > 0 {
            let mut ms = self.db_recovery_ms.clone();
            ms.sort_unstable();
            println!(
                "  database primary kills {}  primary back after (ms) p50 {}  max {}",
                self.db_kills,
                ms.get(ms.len() / 2).copied().unwrap_or(0),
                ms.last().copied().unwrap_or(0)
            );
        }
        if self.nodes > 0 {
            let mut ms = self.takeover_ms.clone();
            ms.sort_unstable();
            let mut hand = self.handover_ms.clone();
            hand.sort_unstable();
            println!(
                "  nodes: {}; node kills {}, pauses {}, SIGTERMs {}, NATS cuts {}, self-stops {}; takeover p50 {} ms, max {} ms; handover after SIGTERM p50 {} ms, max {} ms",
                self.nodes,
                self.node_kills,
                self.node_pauses,
                self.node_stops,
                self.nats_cuts,
                self.self_stops,
                ms.get(ms.len() / 2).copied().unwrap_or(0),
                ms.last().copied().unwrap_or(0),
                hand.get(hand.len() / 2).copied().unwrap_or(0),
                hand.last().copied().unwrap_or(0)
            );
            if self.node_failures > 0 {
                println!("  node failures {}", self.node_failures);
            }
        }
        println!(
            "  lost {}  unaccepted {}  duplicated {}  misordered {}  receipt regressions {}  settled {}",
            self.lost,
            self.unaccepted,
            self.duplicated,
            self.misordered,
            self.receipt_regressions,
            self.settled
        );
        if self.misattributed > 0 || self.leaked > 0 {
            println!(
                "  misattributed {}  leaked {}",
                self.misattributed, self.leaked
            );
        }
        for v in &self.violations {
            println!("  ! {v}");
        }
        println!("{}", if self.passed() { "PASS" } else { "FAIL" });
    }
}

const MAX_VIOLATIONS: usize = 30;

pub struct Ledger {
    /// (user, device) per device index.
    devices: Vec<(String, String)>,
    /// Conversation -> member users.
    members: Vec<(String, Vec<String>)>,
    /// Per device: (conversation, cmid) in send order.
    sent: Vec<Vec<(String, String)>>,
    accepted: HashMap<String, (String, u64)>,
    /// Per device: conversation -> (seq, cmid) in the order handed out.
    received: Vec<HashMap<String, Vec<(u64, String)>>>,
    /// (observer device, conversation, user) -> (delivered, read).
    receipts: HashMap<(usize, String, String), (u64, u64)>,
    outbox_empty: Vec<bool>,
    /// Devices from this index on are TypeScript devices.
    ts_from: usize,
    /// Per device: the message it may be handed again, once, after a SIGKILL (conv, seq, cmid).
    repeatable: Vec<Option<(String, u64, String)>>,
    report: Report,
}

impl Ledger {
    pub fn new(devices: Vec<(String, String)>, members: Vec<(String, Vec<String>)>) -> Self {
        let n = devices.len();
        Ledger {
            devices,
            members,
            sent: vec![Vec::new(); n],
            accepted: HashMap::new(),
            received: vec![HashMap::new(); n],
            receipts: HashMap::new(),
            outbox_empty: vec![false; n],
            repeatable: vec![None; n],
            ts_from: n,
            report: Report::default(),
        }
    }

    /// Devices from `index` on are TypeScript devices (counted apart in the report).
    pub fn ts_devices_from(mut self, index: usize) -> Self {
        self.ts_from = index.min(self.devices.len());
        self
    }

    fn violation(&mut self, v: String) {
        if self.report.violations.len() < MAX_VIOLATIONS {
            self.report.violations.push(v);
        }
    }

    fn name(&self, d: usize) -> String {
        format!("{}/{}", self.devices[d].0, self.devices[d].1)
    }

    pub fn sent(&mut self, device: usize, conv: &str, cmid: String) {
        self.report.sent += 1;
        if device >= self.ts_from {
            self.report.ts_sent += 1;
        }
        self.outbox_empty[device] = false;
        self.sent[device].push((conv.to_string(), cmid));
    }

    pub fn outbox_empty(&mut self, device: usize, empty: bool) {
        self.outbox_empty[device] = empty;
    }

    /// `device` was SIGKILLed right after it was handed `m` and may not have recorded it as
    /// taken: its first message of `m.conv` after the restart may be `m` again.
    pub fn may_repeat(&mut self, device: usize, m: &Message) {
        self.repeatable[device] = Some((m.conv.clone(), m.seq, m.cmid.clone()));
    }

    /// `device`'s process ended or hung by itself (it is started again): the check fails.
    pub fn unbidden_exit(&mut self, device: usize, how: &str) {
        let who = self.name(device);
        self.violation(format!("{who} ended unbidden: {how}"));
    }

    /// `device` could not be started: the check fails.
    pub fn device_failure(&mut self, device: usize, why: String) {
        self.report.device_failures += 1;
        let who = self.name(device);
        self.violation(format!("{who} could not be started: {why}"));
    }

    /// Whether `m` is the repeat [`may_repeat`](Self::may_repeat) allowed `device` (a first
    /// message of the conversation after the restart uses the allowance up, whatever it is).
    fn allowed_repeat(&mut self, device: usize, m: &Message) -> bool {
        if !matches!(&self.repeatable[device], Some((c, _, _)) if *c == m.conv) {
            return false;
        }
        let Some((conv, seq, cmid)) = self.repeatable[device].take() else {
            return false;
        };
        let last = self.received[device]
            .get(&conv)
            .and_then(|l| l.last())
            .map_or(0, |(s, _)| *s);
        seq == m.seq && cmid == m.cmid && last == seq
    }

    pub fn event(&mut self, device: usize, ev: Event) {
        match ev {
            Event::Message(m) if self.allowed_repeat(device, &m) => {
                self.report.repeated_after_kill += 1;
            }
            Event::Message(m) => {
                self.report.delivered += 1;
                if device >= self.ts_from {
                    self.report.ts_delivered += 1;
                }
                self.check_origin(device, &m);
                // Every device gets every message, its sender's devices too: a message handed
                // out is as good a witness of its acceptance as the `Sent` status (which a
                // crashing client may never have shown), and a message stored twice shows up
                // here as one client message id at two seqs.
                self.note_accepted(device, &m.cmid, &m.conv, m.seq);
                let list = self.received[device].entry(m.conv.clone()).or_default();
                let last = list.last().map_or(0, |(s, _)| *s);
                if m.seq == last + 1 {
                    list.push((m.seq, m.cmid));
                } else if m.seq <= last {
                    self.report.duplicated += 1;
                    let who = self.name(device);
                    self.violation(format!(
                        "{who} was handed {} seq {} again (after {last})",
                        m.conv, m.seq
                    ));
                } else {
                    list.push((m.seq, m.cmid));
                    self.report.misordered += 1;
                    let who = self.name(device);
                    self.violation(format!(
                        "{who} was handed {} seq {} right after {last}",
                        m.conv, m.seq
                    ));
                }
            }
            Event::Status {
                cmid,
                conv: Some(conv),
                status: Status::Sent(seq),
            } => self.note_accepted(device, &cmid, &conv, seq),
            Event::Receipt {
                conv,
                user,
                delivered,
                read,
            } => {
                let key = (device, conv.clone(), user.clone());
                let before = self.receipts.get(&key).copied().unwrap_or((0, 0));
                if delivered < before.0 || read < before.1 {
                    self.report.receipt_regressions += 1;
                    let who = self.name(device);
                    self.violation(format!(
                        "{who} saw {user}'s receipt in {conv} go from {before:?} to ({delivered}, {read})"
                    ));
                }
                self.receipts
                    .insert(key, (before.0.max(delivered), before.1.max(read)));
            }
            _ => {}
        }
    }

    /// A message handed to `device` is of a conversation its user is in, and from the user
    /// and device that wrote it: the check's devices write `user/device#n` (system messages
    /// have no sender). Either going wrong is one user's data shown to, or sent as, another.
    fn check_origin(&mut self, device: usize, m: &Message) {
        let who = self.name(device);
        if !self.conv_members(&m.conv).contains(&self.devices[device].0) {
            self.report.leaked += 1;
            self.violation(format!(
                "{who} was handed {} seq {} ({}), of a conversation it is not in",
                m.conv, m.seq, m.cmid
            ));
        }
        if m.event.is_some() || m.from.is_empty() {
            return;
        }
        let writer = m.body.split('#').next().unwrap_or_default();
        if writer != format!("{}/{}", m.from, m.device) {
            self.report.misattributed += 1;
            self.violation(format!(
                "{who} was handed {} seq {} ({}) as from {}/{}, but {writer} wrote it",
                m.conv, m.seq, m.cmid, m.from, m.device
            ));
        }
    }

    /// `cmid` is at (`conv`, `seq`), as `device` learnt; the same message anywhere else is a
    /// duplicate (the server stored it twice).
    fn note_accepted(&mut self, device: usize, cmid: &str, conv: &str, seq: u64) {
        match self.accepted.get(cmid) {
            Some(prev) if *prev != (conv.to_string(), seq) => {
                self.report.duplicated += 1;
                let (who, prev) = (self.name(device), prev.clone());
                self.violation(format!(
                    "{who} has {cmid} at {conv} seq {seq}, but it is also at {} seq {}",
                    prev.0, prev.1
                ));
            }
            Some(_) => {}
            None => {
                self.accepted
                    .insert(cmid.to_string(), (conv.to_string(), seq));
            }
        }
    }

    fn conv_members(&self, conv: &str) -> &[String] {
        self.members
            .iter()
            .find(|(c, _)| c == conv)
            .map_or(&[], |(_, m)| m.as_slice())
    }

    /// Highest seq anyone knows of in `conv`.
    fn conv_max(&self, conv: &str) -> u64 {
        let accepted = self
            .accepted
            .values()
            .filter(|(c, _)| c == conv)
            .map(|(_, s)| *s)
            .max()
            .unwrap_or(0);
        let received = self
            .received
            .iter()
            .filter_map(|r| r.get(conv)?.last().map(|(s, _)| *s))
            .max()
            .unwrap_or(0);
        accepted.max(received)
    }

    /// Every outbox is empty, every sent message accepted, and every member device has every
    /// conversation up to its highest seq.
    pub fn settled(&self) -> bool {
        if !self.outbox_empty.iter().all(|e| *e) {
            return false;
        }
        if self
            .sent
            .iter()
            .flatten()
            .any(|(_, cmid)| !self.accepted.contains_key(cmid))
        {
            return false;
        }
        self.members.iter().all(|(conv, users)| {
            let max = self.conv_max(conv);
            self.devices
                .iter()
                .enumerate()
                .filter(|(_, (u, _))| users.contains(u))
                .all(|(d, _)| {
                    self.received[d]
                        .get(conv)
                        .and_then(|l| l.last())
                        .map_or(0, |(s, _)| *s)
                        >= max
                })
        })
    }

    pub fn verify(&mut self, settled: bool) -> Report {
        self.report.settled = settled;
        self.report.devices = self.devices.len();
        self.report.ts_devices = self.devices.len() - self.ts_from;
        self.report.accepted = self.accepted.len() as u64;
        // Every sent message accepted.
        let unaccepted: Vec<String> = self
            .sent
            .iter()
            .flatten()
            .filter(|(_, cmid)| !self.accepted.contains_key(cmid))
            .map(|(_, c)| c.clone())
            .collect();
        for cmid in unaccepted {
            self.report.unaccepted += 1;
            self.violation(format!("{cmid} was sent but never accepted"));
        }
        // Every accepted message at its seq on every member device; all devices agree.
        let mut at: HashMap<(String, u64), String> = HashMap::new();
        for d in 0..self.devices.len() {
            for (conv, list) in self.received[d].clone() {
                for (seq, cmid) in list {
                    match at.get(&(conv.clone(), seq)) {
                        Some(other) if *other != cmid => {
                            self.report.misordered += 1;
                            let who = self.name(d);
                            self.violation(format!(
                                "{who} has {cmid} at {conv} seq {seq}, another device has {other}"
                            ));
                        }
                        Some(_) => {}
                        None => {
                            at.insert((conv.clone(), seq), cmid);
                        }
                    }
                }
            }
        }
        let accepted: Vec<(String, String, u64)> = self
            .accepted
            .iter()
            .map(|(cmid, (conv, seq))| (cmid.clone(), conv.clone(), *seq))
            .collect();
        for (cmid, conv, seq) in accepted {
            let users = self.conv_members(&conv).to_vec();
            for d in 0..self.devices.len() {
                if !users.contains(&self.devices[d].0) {
                    continue;
                }
                let has = self.received[d]
                    .get(&conv)
                    .is_some_and(|l| l.iter().any(|(s, c)| *s == seq && *c == cmid));
                if !has {
                    self.report.lost += 1;
                    let who = self.name(d);
                    self.violation(format!("{who} never got {cmid} ({conv} seq {seq})"));
                }
            }
        }
        // Sender FIFO: each device's messages numbered in send order, per conversation.
        for d in 0..self.devices.len() {
            let mut last: HashMap<String, u64> = HashMap::new();
            for (conv, cmid) in self.sent[d].clone() {
                let Some((c, seq)) = self.accepted.get(&cmid).cloned() else {
                    continue;
                };
                let prev = last.insert(c.clone(), seq).unwrap_or(0);
                if seq <= prev {
                    self.report.misordered += 1;
                    let who = self.name(d);
                    self.violation(format!(
                        "{who}'s {cmid} in {conv} got seq {seq}, not after its earlier message's {prev}"
                    ));
                }
            }
        }
        std::mem::take(&mut self.report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(conv: &str, seq: u64, cmid: &str) -> Event {
        Event::Message(Message {
            conv: conv.into(),
            seq,
            from: "a".into(),
            device: "d0".into(),
            cmid: cmid.into(),
            body: format!("a/d0#{seq}"),
            reply_to: None,
            ts: 0,
            event: None,
        })
    }

    fn sent_ok(conv: &str, seq: u64, cmid: &str) -> Event {
        Event::Status {
            cmid: cmid.into(),
            conv: Some(conv.into()),
            status: Status::Sent(seq),
        }
    }

    fn ledger() -> Ledger {
        Ledger::new(
            vec![("a".into(), "d0".into()), ("b".into(), "d0".into())],
            vec![("g".into(), vec!["a".into(), "b".into()])],
        )
    }

    fn clean() -> Ledger {
        let mut l = ledger();
        l.sent(0, "g", "x".into());
        l.sent(0, "g", "y".into());
        l.event(0, sent_ok("g", 1, "x"));
        l.event(0, sent_ok("g", 2, "y"));
        l.outbox_empty(0, true);
        l.outbox_empty(1, true);
        l
    }

    #[test]
    fn a_clean_run_passes() {
        let mut l = clean();
        for d in 0..2 {
            l.event(d, msg("g", 1, "x"));
            l.event(d, msg("g", 2, "y"));
        }
        assert!(l.settled());
        let r = l.verify(true);
        assert!(r.passed(), "{r:?}");
    }

    #[test]
    fn each_kind_of_violation_is_caught() {
        // Lost: b never gets y.
        let mut l = clean();
        l.event(0, msg("g", 1, "x"));
        l.event(0, msg("g", 2, "y"));
        l.event(1, msg("g", 1, "x"));
        assert!(!l.settled());
        let r = l.verify(false);
        assert_eq!(r.lost, 1);
        assert!(!r.passed());

        // Duplicated and skipped.
        let mut l = clean();
        l.event(1, msg("g", 1, "x"));
        l.event(1, msg("g", 1, "x"));
        l.event(0, msg("g", 2, "y"));
        let r = l.verify(true);
        assert_eq!(r.duplicated, 1);
        assert_eq!(r.misordered, 1);

        // Devices disagree on a seq; a message accepted under two seqs.
        let mut l = clean();
        l.event(0, msg("g", 1, "x"));
        l.event(1, msg("g", 1, "y"));
        l.event(0, sent_ok("g", 3, "x"));
        let r = l.verify(true);
        assert!(r.misordered >= 1);
        assert!(r.duplicated >= 1);

        // Sender FIFO: y was sent after x but numbered before it.
        let mut l = ledger();
        l.sent(0, "g", "x".into());
        l.sent(0, "g", "y".into());
        l.event(0, sent_ok("g", 2, "x"));
        l.event(0, sent_ok("g", 1, "y"));
        let r = l.verify(true);
        assert_eq!(r.misordered, 1);

        // Receipts going back.
        let mut l = clean();
        let receipt = |d, r| Event::Receipt {
            conv: "g".into(),
            user: "b".into(),
            delivered: d,
            read: r,
        };
        l.event(0, receipt(2, 1));
        l.event(0, receipt(1, 1));
        let r = l.verify(true);
        assert_eq!(r.receipt_regressions, 1);

        // The server stored a resend twice: one message at two seqs, in order otherwise.
        let mut l = clean();
        for d in 0..2 {
            l.event(d, msg("g", 1, "x"));
            l.event(d, msg("g", 2, "y"));
            l.event(d, msg("g", 3, "x"));
        }
        let r = l.verify(true);
        assert!(r.duplicated >= 1, "{r:?}");
        assert!(!r.passed());

        // Acceptance seen only through delivery (the sender crashed before its status).
        let mut l = ledger();
        l.sent(0, "g", "x".into());
        l.outbox_empty(0, true);
        l.outbox_empty(1, true);
        for d in 0..2 {
            l.event(d, msg("g", 1, "x"));
        }
        assert!(l.settled());
        assert!(l.verify(true).passed());

        // Sent, never accepted.
        let mut l = ledger();
        l.sent(0, "g", "z".into());
        let r = l.verify(true);
        assert_eq!(r.unaccepted, 1);
        assert!(!r.passed());

        // a's message handed out as b's; a message of a conversation b is not in.
        let mut l = clean();
        let as_b = |e| match e {
            Event::Message(m) => Event::Message(Message {
                from: "b".into(),
                ..m
            }),
            e => e,
        };
        for d in 0..2 {
            l.event(d, as_b(msg("g", 1, "x")));
            l.event(d, msg("g", 2, "y"));
        }
        l.event(1, msg("a-only", 1, "z"));
        let r = l.verify(true);
        assert_eq!(r.misattributed, 2);
        assert_eq!(r.leaked, 1);
        assert!(!r.passed());
    }

    #[test]
    fn only_the_last_message_before_a_sigkill_may_come_again_once() {
        let mut l = clean();
        for d in 0..2 {
            l.event(d, msg("g", 1, "x"));
            l.event(d, msg("g", 2, "y"));
        }
        // Device 1 was killed right after y: y once more is the allowed repeat...
        let Event::Message(y) = msg("g", 2, "y") else {
            unreachable!()
        };
        l.may_repeat(1, &y);
        l.event(1, msg("g", 2, "y"));
        // ...but not twice, and not on another device.
        l.event(1, msg("g", 2, "y"));
        l.event(0, msg("g", 2, "y"));
        let r = l.verify(true);
        assert_eq!(r.repeated_after_kill, 1);
        assert_eq!(r.duplicated, 2);

        // Another message of the conversation first uses the allowance up; x is no repeat.
        let mut l = clean();
        l.event(1, msg("g", 1, "x"));
        l.may_repeat(1, &y);
        l.event(1, msg("g", 1, "x"));
        l.event(1, msg("g", 2, "y"));
        l.event(1, msg("g", 2, "y"));
        let r = l.verify(true);
        assert_eq!(r.repeated_after_kill, 0);
        assert_eq!(r.duplicated, 2);
    }
}
