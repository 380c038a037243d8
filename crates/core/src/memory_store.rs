//! The reference store: committed [`Batch`]es applied to plain maps, and the [`Snapshot`] a
//! restarted core is rebuilt from. It keeps nothing on disk; the rules tests and the simulation
//! use it as the durable truth to check the core against, so that both agree on what a batch
//! means. Where the contract leaves a store latitude it takes the strict side: it forgets
//! expired dedup entries exactly (a backend may keep some longer) and reports a first seq for
//! every age-based trim (a backend may report only those that moved).
//!
//! `ordo_store::MemStore` puts it behind a lock as a `Store`, which runs the store conformance
//! suite like every backend, so that the reference and the real backends are checked against
//! one another.

use crate::engine::SyncPlan;
use crate::model::{
    AgeSweep, Batch, CommitOutcome, ConvRecord, ConvState, CursorRecord, DedupRecord, Expired,
    GroupPage, MemberPage, MemberPageAsk, Snapshot,
};
use ordo_protocol::Message;
use std::collections::BTreeMap;
use std::fmt;

/// What the committed batches add up to.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    pub convs: BTreeMap<String, ConvRecord>,
    pub messages: BTreeMap<(String, u64), Message>,
    pub cursors: BTreeMap<(String, String, String), CursorRecord>,
    /// Dedup entries by (user, cmid): a client message id is its user's own; one reused past
    /// its window (in any conversation) replaces the entry it had.
    pub dedup: BTreeMap<(String, String), DedupRecord>,
}

/// A batch stored a seq its conversation already had: the core reused a seq (G3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqStoredTwice {
    pub conv: String,
    pub seq: u64,
}

impl fmt::Display for SeqStoredTwice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq {} of {} stored twice", self.seq, self.conv)
    }
}

impl std::error::Error for SeqStoredTwice {}

impl MemoryStore {
    /// Applies one batch atomically and reports the first seqs after age-based trims. A batch
    /// that stores a seq twice is refused whole.
    pub fn apply(&mut self, b: &Batch) -> Result<CommitOutcome, SeqStoredTwice> {
        if let Some(m) = b
            .messages
            .iter()
            .find(|m| self.messages.contains_key(&(m.conv.clone(), m.seq)))
        {
            return Err(SeqStoredTwice {
                conv: m.conv.clone(),
                seq: m.seq,
            });
        }
        for c in &b.convs {
            self.convs.insert(c.id.clone(), c.clone());
        }
        for p in &b.positions {
            if let Some(r) = self.convs.get_mut(&p.id) {
                r.max_seq = r.max_seq.max(p.max_seq);
                r.first_seq = r.first_seq.max(p.first_seq);
            }
        }
        for m in &b.messages {
            self.messages
                .insert((m.conv.clone(), m.seq), Message::clone(m));
        }
        // Deletes first: a key expired and then reused in the same batch must stay.
        for key in &b.dedup_delete {
            self.dedup.remove(key);
        }
        if let Some(before) = b.dedup_forget_before_ms {
            self.dedup.retain(|_, d| d.ts >= before);
        }
        let own = b.messages.iter().map(|m| DedupRecord::of(m));
        for d in b.dedup_put.iter().cloned().chain(own) {
            self.dedup.insert((d.user.clone(), d.cmid.clone()), d);
        }
        for c in &b.cursors {
            self.cursors.insert(
                (c.conv.clone(), c.user.clone(), c.device.clone()),
                c.clone(),
            );
        }
        for (conv, below) in &b.trim_below {
            self.messages.retain(|(c, s), _| c != conv || *s >= *below);
        }
        let mut first_seqs = Vec::new();
        for (conv, before) in &b.trim_before_ms {
            self.messages
                .retain(|(c, _), m| c != conv || m.ts >= *before);
            let first = self
                .seqs(conv)
                .first()
                .copied()
                .unwrap_or(self.max_seq(conv) + 1);
            if let Some(r) = self.convs.get_mut(conv) {
                r.first_seq = r.first_seq.max(first);
            }
            first_seqs.push((conv.clone(), first));
        }
        Ok(CommitOutcome { first_seqs })
    }

    /// One step of age-based retention: the conversations of the slice that hold a message
    /// past their max age.
    pub fn expired(&self, sweep: &AgeSweep) -> Expired {
        let max = sweep.max_convs.max(1) as usize;
        let slice: Vec<&ConvRecord> = self
            .convs
            .values()
            .filter(|r| sweep.after.as_ref().is_none_or(|a| r.id > *a))
            .take(max)
            .collect();
        let swept_to = (slice.len() >= max).then(|| slice[slice.len() - 1].id.clone());
        let trims = slice
            .into_iter()
            .filter_map(|r| {
                let age = r.retention.max_age_ms.or(sweep.default_max_age_ms)?;
                let cutoff = sweep.now_ms.saturating_sub(age);
                let oldest = self
                    .messages
                    .range((r.id.clone(), r.first_seq)..=(r.id.clone(), u64::MAX))
                    .next()?;
                (oldest.1.ts < cutoff).then(|| (r.id.clone(), cutoff))
            })
            .collect();
        Expired { trims, swept_to }
    }

    /// One conversation as stored: what a core loads when it is first used.
    pub fn load_conv(&self, conv: &str) -> Option<ConvState> {
        let rec = self.convs.get(conv)?.clone();
        let cursors = self
            .cursors
            .range((conv.to_string(), String::new(), String::new())..)
            .take_while(|((c, _, _), _)| c == conv)
            .map(|(_, r)| r.clone())
            .collect();
        Some(ConvState { rec, cursors })
    }

    /// One page of the groups after `after` (see [`GroupPage`]).
    pub fn groups(&self, after: Option<&str>, limit: usize) -> GroupPage {
        use std::ops::Bound;
        let start = after.map_or(Bound::Unbounded, |a| Bound::Excluded(a.to_string()));
        let records = self.convs.range((start, Bound::Unbounded)).map(|(id, r)| {
            let mut r = r.clone();
            if let Some(s) = self.load_conv(id) {
                r = s.rec;
            }
            Ok::<_, std::convert::Infallible>(r)
        });
        match GroupPage::collect(limit, records) {
            Ok(page) => page,
            Err(never) => match never {},
        }
    }

    /// One page of the conversations a user is a member of (see [`MemberPageAsk`]).
    pub fn member_convs(&self, ask: &MemberPageAsk) -> MemberPage {
        let ids = self
            .convs
            .values()
            .filter(|r| r.members.contains(&ask.user))
            .map(|r| Ok::<_, std::convert::Infallible>(r.id.clone()));
        match MemberPage::collect(ask, ids, |id| Ok(self.load_conv(id))) {
            Ok(page) => page,
            Err(never) => match never {},
        }
    }

    /// The stored seqs of `conv`, in order.
    pub fn seqs(&self, conv: &str) -> Vec<u64> {
        self.messages
            .range((conv.to_string(), 0)..=(conv.to_string(), u64::MAX))
            .map(|((_, s), _)| *s)
            .collect()
    }

    pub fn max_seq(&self, conv: &str) -> u64 {
        self.convs.get(conv).map_or(0, |r| r.max_seq)
    }

    /// Lowest seq still stored (1 for an unknown conversation).
    pub fn first_seq(&self, conv: &str) -> u64 {
        self.convs.get(conv).map_or(1, |r| r.first_seq)
    }

    pub fn message(&self, conv: &str, seq: u64) -> Option<&Message> {
        self.messages.get(&(conv.to_string(), seq))
    }

    /// What a server reads for a sync plan.
    pub fn read(&self, plan: &SyncPlan) -> Vec<Message> {
        if plan.from > plan.to {
            return Vec::new();
        }
        self.messages
            .range((plan.conv.clone(), plan.from)..=(plan.conv.clone(), plan.to))
            .take(plan.limit as usize)
            .map(|(_, m)| m.clone())
            .collect()
    }

    /// A user's durable (delivered, read): the furthest any of their devices got.
    pub fn position(&self, conv: &str, user: &str) -> (u64, u64) {
        self.cursors
            .values()
            .filter(|c| c.conv == conv && c.user == user)
            .fold((0, 0), |(d, r), c| (d.max(c.delivered), r.max(c.read)))
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            last_ts: self.dedup.values().map(|d| d.ts).max().unwrap_or(0),
        }
    }

    /// What (`user`, `cmid`) was last accepted as, if the store still holds it.
    pub fn dedup_lookup(&self, user: &str, cmid: &str) -> Option<DedupRecord> {
        self.dedup
            .get(&(user.to_string(), cmid.to_string()))
            .cloned()
    }

    /// Up to `max` dedup entries in acceptance order (then by user and cmid), starting after
    /// `after` (the last entry of the previous page, or the start): how a restarted core
    /// rebuilds its filter.
    pub fn dedup_scan(&self, after: Option<&DedupRecord>, max: usize) -> Vec<DedupRecord> {
        let key = |d: &DedupRecord| (d.ts, d.user.clone(), d.cmid.clone());
        let from = after.map(key);
        let mut all: Vec<&DedupRecord> = self
            .dedup
            .values()
            .filter(|d| from.as_ref().is_none_or(|f| key(d) > *f))
            .collect();
        all.sort_by_key(|d| key(d));
        all.into_iter().take(max).cloned().collect()
    }
}
