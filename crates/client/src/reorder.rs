//! Per-conversation reorder buffer: messages arrive pushed, pulled, duplicated and out of order;
//! the app gets each seq exactly once, in order, and never a seq past a hole.

use ordo_protocol::Message;
use std::collections::BTreeMap;

/// What offering a message produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Offer {
    /// Already delivered or already buffered: drop it.
    Duplicate,
    /// Buffered behind a hole; the caller should pull from `after`.
    Gap { after: u64 },
    /// These messages are now contiguous: store them and hand them on, in this order.
    Ready(Vec<Message>),
}

#[derive(Clone, Debug, Default)]
pub struct ReorderBuffer {
    /// Every seq up to here has been delivered (or reported removed by retention).
    contiguous: u64,
    waiting: BTreeMap<u64, Message>,
    /// Most messages held behind a hole; beyond it the highest are dropped (they will be pulled
    /// again), so a hole never grows memory without bound.
    capacity: usize,
}

impl ReorderBuffer {
    pub fn new(contiguous: u64, capacity: usize) -> Self {
        ReorderBuffer {
            contiguous,
            waiting: BTreeMap::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn contiguous(&self) -> u64 {
        self.contiguous
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn offer(&mut self, m: Message) -> Offer {
        if m.seq <= self.contiguous || self.waiting.contains_key(&m.seq) {
            return Offer::Duplicate;
        }
        if m.seq != self.contiguous.saturating_add(1) {
            if self.waiting.len() >= self.capacity {
                // Keep the lowest seqs: they are the next to become contiguous.
                if let Some((&high, _)) = self.waiting.last_key_value() {
                    if m.seq > high {
                        return Offer::Gap {
                            after: self.contiguous,
                        };
                    }
                    self.waiting.remove(&high);
                }
            }
            self.waiting.insert(m.seq, m);
            return Offer::Gap {
                after: self.contiguous,
            };
        }
        let mut ready = vec![m];
        self.contiguous += 1;
        while let Some(next) = self.waiting.remove(&(self.contiguous + 1)) {
            self.contiguous += 1;
            ready.push(next);
        }
        Offer::Ready(ready)
    }

    /// Retention removed everything below `first_seq`: the hole up to it is reported, not
    /// waited for. Returns the removed range `(from, to)` if it moved the position, and the
    /// buffered messages that became contiguous.
    pub fn skip_to(&mut self, first_seq: u64) -> (Option<(u64, u64)>, Vec<Message>) {
        if first_seq <= self.contiguous.saturating_add(1) {
            return (None, Vec::new());
        }
        let gap = (self.contiguous + 1, first_seq - 1);
        self.contiguous = first_seq - 1;
        self.waiting = self.waiting.split_off(&first_seq);
        let mut ready = Vec::new();
        while let Some(next) = self.waiting.remove(&(self.contiguous + 1)) {
            self.contiguous += 1;
            ready.push(next);
        }
        (Some(gap), ready)
    }

    /// Forgets everything (the conversation's epoch changed): start again from `contiguous`.
    pub fn reset(&mut self, contiguous: u64) {
        self.contiguous = contiguous;
        self.waiting.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(seq: u64) -> Message {
        Message {
            conv: "c".into(),
            seq,
            from: "u".into(),
            device: "d".into(),
            cmid: format!("m{seq}"),
            body: String::new(),
            reply_to: None,
            ts: 0,
            event: None,
        }
    }

    #[test]
    fn holes_wait_and_duplicates_drop() {
        let mut b = ReorderBuffer::new(0, 100);
        assert_eq!(b.offer(msg(2)), Offer::Gap { after: 0 });
        assert_eq!(b.offer(msg(2)), Offer::Duplicate);
        let Offer::Ready(r) = b.offer(msg(1)) else {
            panic!()
        };
        assert_eq!(r.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(b.offer(msg(1)), Offer::Duplicate);
        assert_eq!(b.contiguous(), 2);
    }

    #[test]
    fn retention_gap_is_reported_once() {
        let mut b = ReorderBuffer::new(3, 100);
        b.offer(msg(9));
        let (gap, ready) = b.skip_to(8);
        assert_eq!(gap, Some((4, 7)));
        assert!(ready.is_empty());
        assert_eq!(b.contiguous(), 7);
        let Offer::Ready(r) = b.offer(msg(8)) else {
            panic!()
        };
        assert_eq!(r.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![8, 9]);
        assert_eq!(b.skip_to(5), (None, vec![]));
    }

    proptest! {
        /// Any interleaving of duplicates, gaps and reorders hands out each seq once, in order,
        /// and once every seq has been offered, all of them.
        #[test]
        fn every_seq_once_in_order(
            n in 1u64..60,
            extra in proptest::collection::vec(0u64..60, 0..80),
            order in proptest::collection::vec(any::<u32>(), 0..140),
            capacity in 1usize..80,
        ) {
            let mut offers: Vec<u64> = (1..=n).collect();
            offers.extend(extra.into_iter().filter(|s| *s >= 1 && *s <= n));
            // A deterministic shuffle driven by `order`.
            for (i, k) in order.iter().enumerate() {
                let len = offers.len();
                offers.swap(i % len, *k as usize % len);
            }
            let mut b = ReorderBuffer::new(0, capacity);
            let mut out = Vec::new();
            let mut rounds = 0;
            // Offer everything; whatever overflowed the buffer is offered again (a re-pull),
            // until all is delivered.
            while b.contiguous() < n {
                rounds += 1;
                prop_assert!(rounds < 200);
                for s in &offers {
                    if let Offer::Ready(r) = b.offer(msg(*s)) {
                        out.extend(r.into_iter().map(|m| m.seq));
                    }
                }
                prop_assert!(b.waiting() <= capacity);
            }
            prop_assert_eq!(out, (1..=n).collect::<Vec<_>>());
        }
    }
}
