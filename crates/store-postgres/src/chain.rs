//! Where this writer's commits stand: the numbers its row in `ordo_writers` moves along, so
//! that a commit whose outcome was lost is read back, never guessed, and a database that lost
//! commits it confirmed is noticed.
//!
//! Every commit attempt gets a number and follows the attempt before it (or the last fence):
//! its statement moves the writer's row from that number to its own, records it as the last
//! attempt that took effect, and is refused whole if the row holds anything else
//! (`ordo_follows`, schema step 7). One attempt runs at a time, so a row that holds less than
//! the attempt a commit follows, which took effect, means the database lost it.
//!
//! A failed attempt (its connection broke, or it never reached the database) is settled by a
//! fence: a read-back that moves the row to a fresh number, so that the attempt can no longer
//! take effect should it still be on its way, and reads the last attempt that took effect
//! (left as it is by fences): every attempt since the previous fence up to that one took
//! effect, the others before the fence did not. A fence whose own answer was lost counts for
//! nothing: the next one reads the same last attempt.
//!
//! This module holds only the bookkeeping (no I/O); [`crate::PgStore`] runs the statements.

use ordo_core::Batch;
use std::sync::Arc;

/// Fences kept for settling failed attempts: a failed attempt is settled by the first fence
/// after it.
const FENCES_KEPT: usize = 16;

/// A commit attempt: its number, and the number the writer's row must hold for it to move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Attempt {
    pub number: u64,
    pub follows: u64,
}

/// A read-back that moved the row to `at`, finding `found` the last attempt that took effect;
/// the fence before it (whose answer was seen) was `base`.
#[derive(Clone, Copy, Debug)]
struct Fence {
    base: u64,
    found: u64,
    at: u64,
}

/// The bookkeeping of one writer's commit attempts.
#[derive(Default)]
pub(crate) struct Chain {
    /// The last number given to an attempt or a fence.
    last: u64,
    /// What the row holds after the last attempt that took effect, or the last fence: what the
    /// next attempt follows.
    tail: u64,
    /// The last fence's number (0: the row as made at open).
    base: u64,
    /// An attempt since the last fence failed: the next commit fences first.
    broken: bool,
    /// Attempts that failed, with their batch, until the batch is given again.
    failed: Vec<(Arc<Batch>, u64)>,
    /// The last fences, oldest first.
    fences: Vec<Fence>,
}

impl Chain {
    /// The next attempt, following the last one that took effect (or the last fence).
    pub fn start(&mut self) -> Attempt {
        self.last += 1;
        Attempt {
            number: self.last,
            follows: self.tail,
        }
    }

    /// `a`, run for `batch`, finished: it took effect, or it failed and is settled later.
    pub fn finished(&mut self, batch: &Arc<Batch>, a: Attempt, took: bool) {
        if took {
            self.tail = a.number;
        } else {
            self.failed.push((batch.clone(), a.number));
            self.broken = true;
        }
    }

    /// The number of `batch`'s failed attempt, if its last attempt failed (the same batch:
    /// the same `Arc`, or an equal one).
    pub fn failed_attempt(&self, batch: &Arc<Batch>) -> Option<u64> {
        self.failed
            .iter()
            .rev()
            .find(|(b, _)| same(b, batch))
            .map(|(_, n)| *n)
    }

    /// Whether the attempt `number` took effect, if a fence since settled it.
    pub fn fate(&self, number: u64) -> Option<bool> {
        self.fences
            .iter()
            .find(|f| f.at > number)
            .map(|f| f.base < number && number <= f.found)
    }

    /// `batch` was given again and its failed attempt settled: forget it.
    pub fn settle(&mut self, batch: &Arc<Batch>) {
        self.failed.retain(|(b, _)| !same(b, batch));
    }

    /// A failed batch that took effect (settled by a fence), other than `batch`: it must be
    /// given again before any other.
    pub fn took_effect_unanswered(&self, batch: &Arc<Batch>) -> Option<u64> {
        self.failed
            .iter()
            .find(|(b, n)| !same(b, batch) && self.fate(*n) == Some(true))
            .map(|(b, _)| b.id)
    }

    /// Whether an attempt failed since the last fence: the next commit fences first.
    pub fn broken(&self) -> bool {
        self.broken
    }

    /// A number for a fence about to be made.
    pub fn fence_number(&mut self) -> u64 {
        self.last += 1;
        self.last
    }

    /// The fence `at` moved the row; the last attempt that took effect was `found`.
    pub fn fenced(&mut self, at: u64, found: u64) {
        self.fences.push(Fence {
            base: self.base,
            found,
            at,
        });
        self.base = at;
        self.tail = at;
        self.broken = false;
        // A fence is kept while a failed attempt before it may still be given again.
        let oldest = self
            .failed
            .iter()
            .map(|(_, n)| *n)
            .min()
            .unwrap_or(u64::MAX);
        while self.fences.len() > 1
            && (self.fences.len() > FENCES_KEPT || self.fences[1].at < oldest)
        {
            self.fences.remove(0);
        }
        // Failed attempts from before the fences kept can no longer be settled: forgotten
        // (their batches were long given again, or the server stopped).
        let first = self.fences.first().map_or(0, |f| f.base);
        self.failed.retain(|(_, n)| *n > first);
    }

    /// The last fence's number (0: none yet).
    pub fn base(&self) -> u64 {
        self.base
    }
}

/// Whether `a` and `b` are the same batch.
fn same(a: &Arc<Batch>, b: &Arc<Batch>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(id: u64) -> Arc<Batch> {
        Arc::new(Batch {
            id,
            ..Batch::default()
        })
    }

    #[test]
    fn each_attempt_follows_the_last_that_took_effect() {
        let mut c = Chain::default();
        let a = c.start();
        assert_eq!(
            a,
            Attempt {
                number: 1,
                follows: 0
            }
        );
        c.finished(&batch(1), a, true);
        let b = c.start();
        assert_eq!(
            b,
            Attempt {
                number: 2,
                follows: 1
            }
        );
        c.finished(&batch(2), b, true);
        assert!(!c.broken());
        assert_eq!(c.start().follows, 2);
    }

    #[test]
    fn a_fence_settles_a_failed_attempt_either_way() {
        let mut c = Chain::default();
        let (a, b) = (batch(1), batch(2));
        let sa = c.start();
        c.finished(&a, sa, false);
        assert!(c.broken());
        assert_eq!(c.failed_attempt(&a), Some(1));
        assert_eq!(
            c.failed_attempt(&batch(1)),
            Some(1),
            "an equal batch is the same"
        );
        assert_eq!(c.fate(1), None);
        // The fence finds it took effect: it must be answered before any other.
        let at = c.fence_number();
        c.fenced(at, 1);
        assert!(!c.broken());
        assert_eq!(c.fate(1), Some(true));
        assert_eq!(c.took_effect_unanswered(&b), Some(1));
        c.settle(&a);
        assert_eq!(c.took_effect_unanswered(&b), None);
        // The next attempt follows the fence; one that fails and is found not to have taken
        // effect is settled as such.
        let sb = c.start();
        assert_eq!(sb.follows, at);
        c.finished(&b, sb, false);
        let f2 = c.fence_number();
        c.fenced(f2, 1);
        assert_eq!(c.fate(sb.number), Some(false));
    }

    #[test]
    fn a_fence_whose_answer_was_lost_counts_for_nothing() {
        let mut c = Chain::default();
        let a = batch(1);
        let sa = c.start();
        c.finished(&a, sa, false);
        // A fence is numbered and made, but its answer is lost: not recorded.
        let lost = c.fence_number();
        assert!(c.broken());
        // The next fence reads the last attempt that took effect (none: 0), not the lost
        // fence's number.
        let at = c.fence_number();
        assert!(at > lost);
        c.fenced(at, 0);
        assert_eq!(c.fate(sa.number), Some(false));
    }
}
