//! What the simulation checks, and what it calls a violation.
//!
//! Continuously, as things happen: no app is handed a seq twice, out of order or past a hole
//! (G5); no device stores a message that differs from the server's at that seq (G3) or the same
//! message under two seqs (G2); the server's durable delivered and read positions never claim
//! more than the device has stored (a double tick is never a lie); with strict receipts, no
//! Delivered or Read status before every other member got there (G7). With the rule checks on,
//! also the implementation rules an app cannot see: every position a client sends is covered
//! by what it stored, every message is stored before it is handed on, every pushed message is
//! durable.
//!
//! At quiescence (faults off, everything settled): the server's conversations are gap-free
//! (G3), hold each (sender, cmid) once (G2) and every accepted message where it was accepted
//! (G1); every member device stored every message, as the server has it, and its app got all
//! of them (G5, G6); every send was accepted exactly once or failed for a reason (G1, G2); each
//! sender device's messages are in the order it sent them (G4); with receipts, every position
//! reached the server and every sender shows Delivered, then Read (G7).

use crate::world::{Sim, DEVICES};
use ordo_client::Status;
use ordo_core::Batch;
use ordo_protocol::ClientFrame;
use std::collections::HashMap;
use std::fmt;

/// Which promise a violation breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// G1: an accepted message is not durable (gone after a crash, or pushed before durable).
    NotDurable,
    /// G2: one (sender, cmid) stored or accepted twice.
    Duplicated,
    /// G3: a hole, a reused seq, or two parties holding different messages at one seq.
    Sequence,
    /// G4: a sender device's messages numbered out of the order it sent them.
    SenderOrder,
    /// G5: an app was handed a seq it already had.
    AppDuplicate,
    /// G5: an app was handed a seq out of order, past a hole.
    AppOrder,
    /// G6: a member device or its app lacks a message at the end; a valid send failed.
    Lost,
    /// G7: a receipt or status that is wrong, or never arrives.
    Receipts,
    /// Store before ack: a position (ack, sync, read) went out before the messages it covers
    /// were stored, so the server believes a device has what it has not (a false double tick).
    AckBeforeStore,
    /// Store before send: a message went out before it was in the outbox on disk, so it is
    /// delivered although the app's `send` never returned.
    SendBeforeStore,
    /// Another rule of the client's store (a message handed on before it was stored, a stored
    /// run with a hole).
    StoreRule,
    /// The run did not settle, or a device was not back up at the end.
    Stuck,
    /// Anything else: an unexpected error or event, a panic.
    Other,
}

/// A broken promise, with what exactly was seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub kind: Kind,
    pub detail: String,
}

impl Violation {
    pub fn new(kind: Kind, detail: impl Into<String>) -> Violation {
        Violation {
            kind,
            detail: detail.into(),
        }
    }

    /// Names where it was seen.
    pub fn at(self, who: &str) -> Violation {
        Violation {
            detail: format!("{who}: {}", self.detail),
            ..self
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:?}] {}", self.kind, self.detail)
    }
}

pub(crate) fn fail<T>(kind: Kind, detail: impl Into<String>) -> Result<T, Violation> {
    Err(Violation::new(kind, detail))
}

impl Sim {
    /// A broken implementation rule: a violation with the rule checks on, ignored without.
    pub(crate) fn rule(&self, kind: Kind, detail: String) -> Result<(), Violation> {
        if self.opts.rule_checks {
            fail(kind, detail)
        } else {
            Ok(())
        }
    }

    /// No position is sent to the server before the messages it covers are stored: an `ack`,
    /// the `after` of a `sync`, a `read`.
    pub(crate) fn check_transmit(&self, d: usize, f: &ClientFrame) -> Result<(), Violation> {
        let db = &self.devs[d].db;
        let name = self.name(d);
        let bad = match f {
            ClientFrame::Ack { acks } => acks
                .iter()
                .find(|p| p.seq > db.contiguous(&p.conv))
                .map(|p| format!("ack {}/{}", p.conv, p.seq)),
            ClientFrame::Sync { conv, after, .. } if *after > db.contiguous(conv) => {
                Some(format!("sync {conv} after {after}"))
            }
            ClientFrame::Read { conv, seq } if *seq > db.contiguous(conv) => {
                Some(format!("read {conv}/{seq}"))
            }
            _ => None,
        };
        match bad {
            Some(what) => self.rule(
                Kind::AckBeforeStore,
                format!("{name}: {what} sent before it was stored"),
            ),
            None => Ok(()),
        }
    }

    /// The positions a batch makes durable on the server never claim more than the device
    /// stored: a sender shown Delivered is never told a lie.
    pub(crate) fn check_cursors(&self, b: &Batch) -> Result<(), Violation> {
        for c in &b.cursors {
            let Some(d) = self
                .devs
                .iter()
                .position(|x| x.user == c.user && x.device == c.device)
            else {
                continue;
            };
            let db = &self.devs[d].db;
            let (stored, read) = (db.contiguous(&c.conv), db.read(&c.conv));
            if c.delivered > stored || c.read > read {
                return fail(
                    Kind::AckBeforeStore,
                    format!(
                        "the server has {} at delivered {}, read {} of {}; the device stored {stored}, read {read}",
                        self.name(d),
                        c.delivered,
                        c.read,
                        c.conv
                    ),
                );
            }
        }
        Ok(())
    }

    /// A Delivered or Read status may show only once every other member has got there, by
    /// the server's durable positions.
    pub(crate) fn check_status(
        &self,
        d: usize,
        cmid: &str,
        status: &Status,
    ) -> Result<(), Violation> {
        let dev = &self.devs[d];
        let Some((conv, seq)) = dev.db.accepted.get(cmid) else {
            return fail(
                Kind::Receipts,
                format!("{cmid} is {status:?} but was never accepted"),
            );
        };
        let Some(rec) = self.server.store.convs.get(conv) else {
            return fail(
                Kind::Receipts,
                format!("{cmid} is {status:?} in {conv}, which the server does not have"),
            );
        };
        for v in rec.members.iter().filter(|v| *v != dev.user) {
            let (dl, rd) = self.server.store.position(conv, v);
            let got = if *status == Status::Read { rd } else { dl };
            if got < *seq {
                return fail(
                    Kind::Receipts,
                    format!(
                        "G7: {}/{} shows {cmid} ({conv}/{seq}) as {status:?}, but {v} has delivered {dl}, read {rd}",
                        dev.user, dev.device
                    ),
                );
            }
        }
        Ok(())
    }

    /// The contract at quiescence.
    pub(crate) fn check_final(&mut self) -> Result<(), Violation> {
        let store = &self.server.store;
        // G3: gap-free, no reuse; G2: one message per (sender, cmid).
        let mut by_key: HashMap<(String, String), (String, u64)> = HashMap::new();
        for (id, rec) in &store.convs {
            let seqs: Vec<u64> = store
                .messages
                .range((id.clone(), 0)..=(id.clone(), u64::MAX))
                .map(|((_, s), _)| *s)
                .collect();
            if seqs != (1..=rec.max_seq).collect::<Vec<_>>() {
                return fail(
                    Kind::Sequence,
                    format!("G3: {id} holds {seqs:?}, max_seq {}", rec.max_seq),
                );
            }
        }
        for ((conv, seq), m) in &store.messages {
            if let Some(prev) =
                by_key.insert((m.from.clone(), m.cmid.clone()), (conv.clone(), *seq))
            {
                return fail(
                    Kind::Duplicated,
                    format!(
                        "G2: ({}, {}) stored twice: {prev:?} and {conv}/{seq}",
                        m.from, m.cmid
                    ),
                );
            }
        }
        // G1: every message a sender was told is accepted is stored where it was accepted.
        for d in 0..self.devs.len() {
            let dev = &self.devs[d];
            for s in &dev.sends {
                let Some(r) = dev.db.accepted.get(&s.cmid) else {
                    continue;
                };
                let stored = by_key.get(&(dev.user.to_string(), s.cmid.clone()));
                if stored != Some(r) {
                    let there = store.messages.get(r).map(|m| (&m.from, &m.cmid));
                    return fail(
                        Kind::NotDurable,
                        format!(
                            "G1: {} was told {} is accepted as {r:?}; the server has it at {stored:?}, and {there:?} there",
                            self.name(d),
                            s.cmid
                        ),
                    );
                }
            }
        }
        // Nothing stored that no app sent (a send that went out before the outbox write, and
        // the app crashed before its `send` returned).
        for ((user, cmid), at) in &by_key {
            let known = self
                .devs
                .iter()
                .any(|d| d.user == user && d.sends.iter().any(|s| &s.cmid == cmid));
            if !known {
                return fail(
                    Kind::SendBeforeStore,
                    format!("{user}'s {cmid} stored at {at:?}, but no app's send returned it"),
                );
            }
        }
        for d in 0..self.devs.len() {
            let name = self.name(d);
            let dev = &self.devs[d];
            if dev.st.is_none() || dev.conn.is_none() {
                return fail(
                    Kind::Stuck,
                    format!("{name} is not running and connected at the end"),
                );
            }
            if !dev.db.outbox.is_empty() {
                return fail(
                    Kind::Stuck,
                    format!("{name}'s outbox is not empty: {:?}", dev.db.outbox),
                );
            }
            // G6, G5: every member device has every message, as stored, and its app too.
            for (id, rec) in &store.convs {
                let member = rec.members.contains(dev.user);
                let have = dev.db.contiguous(id);
                let want = if member { rec.max_seq } else { 0 };
                if have != want {
                    return fail(
                        Kind::Lost,
                        format!(
                            "G6: {name} has {id} up to {have}, the server up to {} (member: {member})",
                            rec.max_seq
                        ),
                    );
                }
                let seen = dev.seen.get(id).copied().unwrap_or(0);
                if seen != want {
                    return fail(
                        Kind::Lost,
                        format!("G5: {name}'s app has {id} up to {seen} of {want}"),
                    );
                }
                for seq in 1..=want {
                    let key = (id.clone(), seq);
                    if dev.db.messages.get(&key) != store.messages.get(&key) {
                        return fail(
                            Kind::Sequence,
                            format!("G3: {name} holds another {id}/{seq}"),
                        );
                    }
                }
            }
            // Every send: accepted exactly once, as sent, or failed.
            let mut last_seq: HashMap<&str, (u64, &str)> = HashMap::new();
            for s in &dev.sends {
                let stored = by_key.get(&(dev.user.to_string(), s.cmid.clone()));
                let recorded = dev.db.accepted.get(&s.cmid);
                match (recorded, stored) {
                    (Some(r), Some(st)) => {
                        if r != st || st.0 != s.conv {
                            return fail(
                                Kind::Other,
                                format!(
                                    "{name}: {} recorded as {r:?}, stored as {st:?}, sent to {}",
                                    s.cmid, s.conv
                                ),
                            );
                        }
                        let m = &store.messages[st];
                        if m.body != s.body || m.device != dev.device {
                            return fail(
                                Kind::Other,
                                format!("{name}: {} stored as {m:?}", s.cmid),
                            );
                        }
                        if !s.valid {
                            return fail(
                                Kind::Other,
                                format!(
                                    "{name}: {} to {} accepted though not allowed",
                                    s.cmid, s.conv
                                ),
                            );
                        }
                        // G4: sender FIFO per conversation, retries included.
                        let last = last_seq.entry(s.conv.as_str()).or_insert((0, ""));
                        if st.1 <= last.0 {
                            let refused = if dev.refused.contains(last.1) {
                                " (that one was refused for rate, then resent)"
                            } else {
                                ""
                            };
                            return fail(
                                Kind::SenderOrder,
                                format!(
                                    "G4: {name} sent {} after {}, which got seq {}{refused}, yet it got {}",
                                    s.cmid, last.1, last.0, st.1
                                ),
                            );
                        }
                        *last = (st.1, s.cmid.as_str());
                    }
                    (Some(r), None) => {
                        return fail(
                            Kind::NotDurable,
                            format!("G1: {name}: {} accepted as {r:?}, not stored", s.cmid),
                        );
                    }
                    (None, stored) => {
                        if !dev.db.removed.contains(&s.cmid) {
                            return fail(
                                Kind::Stuck,
                                format!("{name}: {} neither accepted nor failed", s.cmid),
                            );
                        }
                        let why = match dev.status.get(&s.cmid) {
                            Some(Status::Failed(why)) => why.clone(),
                            other => format!("(status {other:?})"),
                        };
                        if s.valid || stored.is_some() {
                            return fail(
                                Kind::Lost,
                                format!(
                                    "{name}: {} to {} failed: {why}; stored: {stored:?}",
                                    s.cmid, s.conv
                                ),
                            );
                        }
                        self.stats.failed += 1;
                    }
                }
            }
        }
        // Each device sees one sender device's messages in the order they were sent.
        for r in &self.devs {
            for s in &self.devs {
                for conv in r.db.convs.keys() {
                    let got: Vec<&str> =
                        r.db.messages
                            .range((conv.clone(), 0)..=(conv.clone(), u64::MAX))
                            .map(|(_, m)| m)
                            .filter(|m| m.from == s.user && m.device == s.device)
                            .map(|m| m.cmid.as_str())
                            .collect();
                    let sent: Vec<&str> = s
                        .sends
                        .iter()
                        .filter(|x| &x.conv == conv && s.db.accepted.contains_key(&x.cmid))
                        .map(|x| x.cmid.as_str())
                        .collect();
                    if got != sent {
                        return fail(
                            Kind::SenderOrder,
                            format!(
                                "G4: {}/{} has {}/{}'s messages of {conv} as {got:?}, sent as {sent:?}",
                                r.user, r.device, s.user, s.device
                            ),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// G7: every member device's delivered position (and, once the apps read everything, its
    /// read position) reached the server, and every sender shows its messages as Delivered
    /// (or Read) accordingly. Checked before the apps read, since a read implies delivery and
    /// would hide a lost ack.
    pub(crate) fn check_positions(&self, read: bool) -> Result<(), Violation> {
        let store = &self.server.store;
        for (id, rec) in &store.convs {
            for (user, device) in DEVICES.iter().filter(|(u, _)| rec.members.contains(*u)) {
                let key = (id.clone(), user.to_string(), device.to_string());
                let (dl, rd) = store
                    .cursors
                    .get(&key)
                    .map_or((0, 0), |c| (c.delivered, c.read));
                if dl != rec.max_seq || (read && rd != rec.max_seq) {
                    return fail(
                        Kind::Receipts,
                        format!(
                            "G7: the server has {user}/{device} at delivered {dl}, read {rd} of {id} (max {})",
                            rec.max_seq
                        ),
                    );
                }
            }
        }
        for d in 0..self.devs.len() {
            let dev = &self.devs[d];
            for s in &dev.sends {
                let Some(at) = dev.db.accepted.get(&s.cmid) else {
                    continue;
                };
                let status = dev.db.sent.get(at).map(|x| &x.status);
                let ok = match status {
                    Some(Status::Read) => true,
                    Some(Status::Delivered) => !read,
                    _ => false,
                };
                if !ok {
                    let what = if read { "read" } else { "got" };
                    return fail(
                        Kind::Receipts,
                        format!(
                            "G7: {} shows {} ({at:?}) as {status:?} although every member {what} it",
                            self.name(d),
                            s.cmid
                        ),
                    );
                }
            }
        }
        Ok(())
    }
}
