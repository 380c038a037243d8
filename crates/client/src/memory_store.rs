//! The reference client store: what the `Persist` effects of a [`ClientState`] wrote, kept in
//! plain maps. It keeps nothing on disk; the client's behaviour tests and the simulation
//! (`ordo-sim`) use it in place of the redb [`LocalStore`], so that both agree on what each
//! [`StoreOp`] means (as `ordo_core::MemoryStore` is the reference store on the server side).
//!
//! It models what a real store keeps across a crash: only what was persisted. A `Persist`
//! effect is stored when the driver carries it out, and nothing else is kept; a crashed client
//! is rebuilt from [`MemoryStore::snapshot`], so what its state machine held but had not
//! persisted yet (an effect still queued when it crashed) is lost, as on a device.
//!
//! Where a real store would take any write, this one takes the strict side: it refuses writes
//! that break the store's rules (a stored run that skips or repeats a seq, a cmid back in the
//! outbox after it left) and a message recorded under two seqs, and it keeps some bookkeeping
//! for the checks of its users (every seq a cmid was accepted as, the cmids that left the
//! outbox, where each stored message is). It also keeps sent messages once they are `Read`,
//! which [`LocalStore`] drops; [`MemoryStore::snapshot`] leaves them out as it does.
//!
//! [`ClientState`]: crate::ClientState
//! [`LocalStore`]: crate::LocalStore

use crate::outbox::Pending;
use crate::state::{ClientSnapshot, ConvSnapshot, SentSnapshot, Status, StoreOp};
use ordo_protocol::Message;
use std::collections::{BTreeMap, HashMap, HashSet};

/// What the store holds about one conversation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConvRow {
    pub epoch: Option<u64>,
    /// Every seq up to this one is stored.
    pub contiguous: u64,
    /// This device's read position.
    pub read: u64,
}

/// Why the store refused a write. The store is left as far as the write got: a refusal
/// reports a bug, and the test or the simulation run stops there.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// A write that breaks one of the store's own rules: a stored run that skips or repeats a
    /// seq or says another contiguous position, an empty run, a cmid that left the outbox put
    /// back into it, a read position beyond what is stored.
    #[error("{0}")]
    Rule(String),
    /// The same message recorded under two seqs: as a received message (by its sender and
    /// cmid), or as one of ours (by its cmid). The app would show it twice (G2).
    #[error("{0}")]
    Duplicate(String),
}

/// What a client's `Persist` effects wrote: the in-memory twin of the SDK's local store.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    /// The outbox, in the order messages entered it.
    pub outbox: Vec<Pending>,
    pub messages: BTreeMap<(String, u64), Message>,
    pub convs: BTreeMap<String, ConvRow>,
    /// Our sent messages by (conv, seq), with their last status (`Read` ones included).
    pub sent: BTreeMap<(String, u64), SentSnapshot>,
    /// cmid -> (conv, seq) from every `PutSent`.
    pub accepted: HashMap<String, (String, u64)>,
    /// cmids that left the outbox.
    pub removed: HashSet<String>,
    /// (sender, cmid) -> (conv, seq) of every stored message.
    pub by_cmid: HashMap<(String, String), (String, u64)>,
}

impl MemoryStore {
    /// How far `conv` is stored without a hole (0: nothing).
    pub fn contiguous(&self, conv: &str) -> u64 {
        self.convs.get(conv).map_or(0, |r| r.contiguous)
    }

    /// This device's read position in `conv`.
    pub fn read(&self, conv: &str) -> u64 {
        self.convs.get(conv).map_or(0, |r| r.read)
    }

    pub fn message(&self, conv: &str, seq: u64) -> Option<&Message> {
        self.messages.get(&(conv.to_string(), seq))
    }

    /// Applies the operations of one `Persist` effect, in order; stops at the first write that
    /// breaks a rule or records a message twice.
    pub fn apply(&mut self, ops: &[StoreOp]) -> Result<(), Refused> {
        self.apply_ops(ops, true)
    }

    /// Applies `ops` as a buggy client's store would: a write that breaks the store's rules is
    /// carried out as asked. A message recorded under two seqs is still refused (that is a
    /// violation of the contract, not of a rule of this store).
    pub fn apply_ignoring_rules(&mut self, ops: &[StoreOp]) -> Result<(), Refused> {
        self.apply_ops(ops, false)
    }

    fn apply_ops(&mut self, ops: &[StoreOp], rules: bool) -> Result<(), Refused> {
        let rule = |detail: String| {
            if rules {
                Err(Refused::Rule(detail))
            } else {
                Ok(())
            }
        };
        for op in ops {
            match op {
                StoreOp::PutPending(p) => {
                    if self.removed.contains(&p.cmid) {
                        rule(format!("{} went back into the outbox", p.cmid))?;
                    }
                    match self.outbox.iter_mut().find(|q| q.cmid == p.cmid) {
                        Some(q) => *q = p.clone(),
                        None => self.outbox.push(p.clone()),
                    }
                }
                StoreOp::RemovePending(cmid) => {
                    self.outbox.retain(|p| &p.cmid != cmid);
                    self.removed.insert(cmid.clone());
                }
                StoreOp::PutMessages {
                    conv,
                    messages,
                    contiguous,
                } => {
                    let row = self.convs.entry(conv.clone()).or_default();
                    let Some(last) = messages.last() else {
                        rule(format!("an empty PutMessages for {conv}"))?;
                        continue;
                    };
                    for (i, m) in messages.iter().enumerate() {
                        let want = row.contiguous + 1 + i as u64;
                        if m.conv != *conv || m.seq != want {
                            rule(format!(
                                "PutMessages stores {}/{} where {conv}/{want} is next (G5)",
                                m.conv, m.seq
                            ))?;
                        }
                    }
                    if *contiguous != last.seq {
                        rule(format!(
                            "PutMessages of {conv} up to {} says contiguous {contiguous}",
                            last.seq
                        ))?;
                    }
                    row.contiguous = last.seq;
                    for m in messages {
                        let at = (conv.clone(), m.seq);
                        let key = (m.from.clone(), m.cmid.clone());
                        if let Some(prev) = self.by_cmid.get(&key) {
                            if *prev != at {
                                return Err(Refused::Duplicate(format!(
                                    "G2: {}'s {} stored as {prev:?} and again as {at:?}",
                                    m.from, m.cmid
                                )));
                            }
                        }
                        self.by_cmid.insert(key, at.clone());
                        self.messages.insert(at, m.clone());
                    }
                }
                StoreOp::SetConv {
                    conv,
                    epoch,
                    contiguous,
                    reset,
                } => {
                    let row = self.convs.entry(conv.clone()).or_default();
                    row.epoch = *epoch;
                    if *reset {
                        self.messages.retain(|(c, _), _| c != conv);
                        self.by_cmid.retain(|_, (c, _)| c != conv);
                        row.contiguous = *contiguous;
                        row.read = 0;
                    } else {
                        row.contiguous = row.contiguous.max(*contiguous);
                    }
                }
                StoreOp::SetRead { conv, seq } => {
                    let row = self.convs.entry(conv.clone()).or_default();
                    if *seq > row.contiguous {
                        let stored = row.contiguous;
                        rule(format!(
                            "read position {conv}/{seq} beyond what is stored ({stored})"
                        ))?;
                    }
                    let row = self.convs.entry(conv.clone()).or_default();
                    row.read = row.read.max(*seq);
                }
                StoreOp::PutSent {
                    conv,
                    seq,
                    cmid,
                    status,
                } => {
                    let at = (conv.clone(), *seq);
                    if let Some(prev) = self.accepted.get(cmid) {
                        if *prev != at {
                            return Err(Refused::Duplicate(format!(
                                "G2: {cmid} accepted as {prev:?} and as {at:?}"
                            )));
                        }
                    }
                    self.accepted.insert(cmid.clone(), at.clone());
                    self.sent.insert(
                        at,
                        SentSnapshot {
                            conv: conv.clone(),
                            seq: *seq,
                            cmid: cmid.clone(),
                            status: status.clone(),
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// What a restarted client is built from: the outbox, each conversation's position, and
    /// our sent messages whose status can still move.
    pub fn snapshot(&self) -> ClientSnapshot {
        ClientSnapshot {
            outbox: self.outbox.clone(),
            convs: self
                .convs
                .iter()
                .map(|(c, r)| ConvSnapshot {
                    conv: c.clone(),
                    epoch: r.epoch,
                    contiguous: r.contiguous,
                    read: r.read,
                })
                .collect(),
            sent: self
                .sent
                .values()
                .filter(|s| s.status != Status::Read)
                .cloned()
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Target;

    fn m(conv: &str, seq: u64, cmid: &str) -> Message {
        Message {
            conv: conv.into(),
            seq,
            from: "bob".into(),
            device: "tab".into(),
            cmid: cmid.into(),
            body: format!("{conv} #{seq}"),
            reply_to: None,
            ts: seq,
            event: None,
        }
    }

    fn run(conv: &str, seqs: std::ops::RangeInclusive<u64>) -> StoreOp {
        let messages: Vec<Message> = seqs.map(|s| m(conv, s, &format!("{conv}-{s}"))).collect();
        StoreOp::PutMessages {
            conv: conv.into(),
            contiguous: messages.last().map_or(0, |m| m.seq),
            messages,
        }
    }

    fn pending(cmid: &str, attempts: u32) -> StoreOp {
        StoreOp::PutPending(Pending {
            cmid: cmid.into(),
            target: Target::Conv("team".into()),
            body: "hi".into(),
            reply_to: None,
            attempts,
            due_ms: 0,
            in_flight: false,
        })
    }

    fn sent(cmid: &str, seq: u64, status: Status) -> StoreOp {
        StoreOp::PutSent {
            conv: "team".into(),
            seq,
            cmid: cmid.into(),
            status,
        }
    }

    fn is_rule(r: Result<(), Refused>) -> bool {
        matches!(r, Err(Refused::Rule(_)))
    }

    #[test]
    fn runs_must_continue_the_stored_one_without_a_hole() {
        let mut s = MemoryStore::default();
        s.apply(&[run("team", 1..=3)]).unwrap();
        assert_eq!(s.contiguous("team"), 3);
        assert_eq!(s.message("team", 2).map(|m| m.seq), Some(2));
        assert!(is_rule(s.apply(&[run("team", 5..=5)])), "skips 4");
        assert!(is_rule(s.apply(&[run("team", 3..=4)])), "repeats 3");
        let empty = StoreOp::PutMessages {
            conv: "team".into(),
            messages: Vec::new(),
            contiguous: 3,
        };
        assert!(is_rule(s.apply(&[empty])));
        let lying = StoreOp::PutMessages {
            conv: "team".into(),
            messages: vec![m("team", 4, "team-4")],
            contiguous: 9,
        };
        assert!(is_rule(s.apply(std::slice::from_ref(&lying))));
        // Without the rules, the write is carried out as asked.
        let mut lax = MemoryStore::default();
        lax.apply_ignoring_rules(&[run("team", 2..=2), lying])
            .unwrap();
        assert_eq!(lax.contiguous("team"), 4);
        assert_eq!(lax.messages.len(), 2);
    }

    #[test]
    fn a_message_under_two_seqs_is_refused_even_without_the_rules() {
        let mut s = MemoryStore::default();
        s.apply(&[run("team", 1..=1)]).unwrap();
        let again = StoreOp::PutMessages {
            conv: "team".into(),
            messages: vec![m("team", 2, "team-1")],
            contiguous: 2,
        };
        assert!(matches!(
            s.apply_ignoring_rules(&[again]),
            Err(Refused::Duplicate(_))
        ));
        s.apply(&[sent("mine", 4, Status::Sent(4))]).unwrap();
        s.apply(&[sent("mine", 4, Status::Delivered)]).unwrap();
        assert!(matches!(
            s.apply_ignoring_rules(&[sent("mine", 5, Status::Sent(5))]),
            Err(Refused::Duplicate(_))
        ));
    }

    #[test]
    fn the_outbox_keeps_its_order_and_a_removed_cmid_may_not_come_back() {
        let mut s = MemoryStore::default();
        s.apply(&[pending("a", 0), pending("b", 0), pending("a", 1)])
            .unwrap();
        let order: Vec<(&str, u32)> = s
            .outbox
            .iter()
            .map(|p| (p.cmid.as_str(), p.attempts))
            .collect();
        assert_eq!(order, [("a", 1), ("b", 0)], "replaced in place");
        s.apply(&[StoreOp::RemovePending("a".into())]).unwrap();
        assert!(s.removed.contains("a"));
        assert!(is_rule(s.apply(&[pending("a", 2)])));
        s.apply_ignoring_rules(&[pending("a", 2)]).unwrap();
        assert_eq!(s.outbox.len(), 2);
    }

    #[test]
    fn reads_stay_within_what_is_stored_and_never_go_back() {
        let mut s = MemoryStore::default();
        s.apply(&[run("team", 1..=3)]).unwrap();
        let read = |seq| StoreOp::SetRead {
            conv: "team".into(),
            seq,
        };
        s.apply(&[read(2), read(1)]).unwrap();
        assert_eq!(s.read("team"), 2);
        assert!(is_rule(s.apply(&[read(4)])));
        assert_eq!(s.read("team"), 2);
        s.apply_ignoring_rules(&[read(4)]).unwrap();
        assert_eq!(s.read("team"), 4);
    }

    #[test]
    fn an_epoch_reset_drops_only_its_conversation() {
        let mut s = MemoryStore::default();
        s.apply(&[run("team", 1..=2), run("other", 1..=1)]).unwrap();
        s.apply(&[StoreOp::SetRead {
            conv: "team".into(),
            seq: 2,
        }])
        .unwrap();
        let set = |contiguous, reset| StoreOp::SetConv {
            conv: "team".into(),
            epoch: Some(8),
            contiguous,
            reset,
        };
        s.apply(&[set(1, false)]).unwrap();
        assert_eq!(
            s.contiguous("team"),
            2,
            "without a reset it never goes back"
        );
        s.apply(&[set(0, true)]).unwrap();
        assert_eq!(
            s.convs["team"],
            ConvRow {
                epoch: Some(8),
                contiguous: 0,
                read: 0
            }
        );
        assert_eq!(
            s.messages.keys().collect::<Vec<_>>(),
            [&("other".to_string(), 1u64)]
        );
        // The new epoch may store the same messages under the same seqs again.
        s.apply(&[run("team", 1..=2)]).unwrap();
        assert_eq!(s.contiguous("team"), 2);
    }

    #[test]
    fn a_snapshot_holds_what_a_restart_needs_and_no_read_sent_message() {
        let mut s = MemoryStore::default();
        s.apply(&[
            pending("p", 3),
            run("team", 1..=2),
            StoreOp::SetRead {
                conv: "team".into(),
                seq: 1,
            },
            sent("x", 3, Status::Delivered),
            sent("y", 4, Status::Sent(4)),
            sent("y", 4, Status::Read),
        ])
        .unwrap();
        let snap = s.snapshot();
        assert_eq!(snap.outbox.len(), 1);
        assert_eq!(snap.outbox[0].attempts, 3);
        assert_eq!(
            snap.convs,
            vec![ConvSnapshot {
                conv: "team".into(),
                epoch: None,
                contiguous: 2,
                read: 1
            }]
        );
        assert_eq!(
            snap.sent
                .iter()
                .map(|x| x.cmid.as_str())
                .collect::<Vec<_>>(),
            ["x"]
        );
        assert_eq!(s.sent.len(), 2, "the store itself keeps the read one");
    }
}
