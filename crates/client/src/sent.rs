//! Our accepted messages of one conversation whose status can still move (sent or delivered),
//! kept by what they wait for, so that a receipt moves exactly the messages it concerns: its
//! cost is the messages whose status changes, not every message sent and not yet read (which
//! grows without end in a group where someone never reads).

use crate::state::Status;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Default)]
pub(crate) struct SentMessages {
    by_seq: BTreeMap<u64, (String, Status)>,
    /// Seqs not `Delivered` yet (`Sent`).
    not_delivered: BTreeSet<u64>,
    /// Seqs `Sent` or `Delivered`.
    not_read: BTreeSet<u64>,
}

impl SentMessages {
    pub(crate) fn is_empty(&self) -> bool {
        self.by_seq.is_empty()
    }

    /// Records `cmid` at `seq` with `status` (a read one is not kept: read is final).
    pub(crate) fn put(&mut self, seq: u64, cmid: String, status: Status) {
        self.not_delivered.remove(&seq);
        self.not_read.remove(&seq);
        self.by_seq.remove(&seq);
        if status == Status::Read {
            return;
        }
        if status != Status::Delivered {
            self.not_delivered.insert(seq);
        }
        self.not_read.insert(seq);
        self.by_seq.insert(seq, (cmid, status));
    }

    /// Every other member got to `delivered` and read up to `read`: the messages whose status
    /// moves, in seq order, with their new status. Read ones are forgotten.
    pub(crate) fn advance(&mut self, delivered: u64, read: u64) -> Vec<(u64, String, Status)> {
        let mut out = Vec::new();
        let unread = self.not_read.split_off(&read.saturating_add(1));
        for seq in std::mem::replace(&mut self.not_read, unread) {
            if let Some((cmid, _)) = self.by_seq.remove(&seq) {
                out.push((seq, cmid, Status::Read));
            }
        }
        self.not_delivered = self.not_delivered.split_off(&read.saturating_add(1));
        let later = self.not_delivered.split_off(&delivered.saturating_add(1));
        for seq in std::mem::replace(&mut self.not_delivered, later) {
            if let Some((cmid, status)) = self.by_seq.get_mut(&seq) {
                *status = Status::Delivered;
                out.push((seq, cmid.clone(), Status::Delivered));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receipt_moves_only_what_it_concerns_in_seq_order() {
        let mut s = SentMessages::default();
        for seq in [3, 1, 2, 5] {
            s.put(seq, format!("c{seq}"), Status::Sent(seq));
        }
        s.put(4, "c4".into(), Status::Delivered);
        assert_eq!(
            s.advance(2, 0),
            vec![
                (1, "c1".into(), Status::Delivered),
                (2, "c2".into(), Status::Delivered)
            ]
        );
        assert_eq!(s.advance(2, 0), vec![], "nothing moves twice");
        assert_eq!(
            s.advance(5, 1),
            vec![
                (1, "c1".into(), Status::Read),
                (3, "c3".into(), Status::Delivered),
                (5, "c5".into(), Status::Delivered)
            ]
        );
        assert_eq!(
            s.advance(5, 9).len(),
            4,
            "everything left is read, and forgotten"
        );
        assert!(s.is_empty());
    }
}
