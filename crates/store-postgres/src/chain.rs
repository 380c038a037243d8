//! Where this writer's commits stand: the numbers its row in `ordo_writers` moves along, so
//! that commits in flight together take effect in order, and a commit whose outcome was lost
//! is read back, never guessed.
//!
//! Every commit attempt gets a number and follows the attempt begun just before it (or the
//! last fence): its statement moves the writer's row from that number to its own, and is
//! refused whole if the row holds anything else (`ordo_follows`, schema step 7). So the
//! attempts that take effect are a prefix of those begun, in order: a batch never commits
//! before the one begun before it, nor without it.
//!
//! A failed attempt (its connection broke, or the attempt before it failed) is settled by a
//! fence: a read-back that moves the row to a fresh number, so that no attempt begun before
//! the fence can take effect any more, and reads the last attempt that took effect (kept in
//! the row beside the number, and left as it is by fences): every attempt since the previous
//! fence up to that one took effect, the others begun before the fence did not. A fence whose
//! own answer was lost is not counted: the next one reads the same last attempt.
//!
//! This module holds only the bookkeeping (no I/O); [`crate::PgStore`] runs the statements.

use ordo_core::Batch;
use std::sync::Arc;

/// Fences kept for settling failed attempts: a failed attempt is settled by the first fence
/// after it, and only a few attempts are in flight at once.
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
    /// What the row holds once every attempt begun so far took effect: what the next follows.
    tail: u64,
    /// The last fence's number (0: the row as made at open).
    base: u64,
    /// An attempt begun since the last fence failed: the next commit fences first.
    broken: bool,
    /// Attempts numbered by [`Chain::begin`] whose commit has not started, with their batch.
    begun: Vec<(Arc<Batch>, Attempt)>,
    /// Attempts whose statements are running.
    running: Vec<u64>,
    /// Attempts that failed, with their batch, until the batch is given again.
    failed: Vec<(Arc<Batch>, u64)>,
    /// The last fences, oldest first.
    fences: Vec<Fence>,
}

/// What became of the attempt another follows, once it is not in flight any more.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ahead {
    /// It is begun or running still.
    InFlight,
    /// It failed: the attempt that follows it can never take effect.
    Failed,
    /// It took effect (or it is a fence): the row holds it, or has moved past it.
    Done,
}

impl Chain {
    fn next(&mut self) -> Attempt {
        self.last += 1;
        let a = Attempt {
            number: self.last,
            follows: self.tail,
        };
        self.tail = a.number;
        a
    }

    /// Numbers `batch`'s attempt, following every attempt numbered before it: batches are
    /// begun in the order they must take effect.
    pub fn begin(&mut self, batch: &Arc<Batch>) {
        let a = self.next();
        self.begun.push((batch.clone(), a));
    }

    /// The attempt to run for `batch`: the one [`Chain::begin`] numbered for it, or a new one.
    pub fn start(&mut self, batch: &Arc<Batch>) -> Attempt {
        let a = match self.begun.iter().position(|(b, _)| Arc::ptr_eq(b, batch)) {
            Some(i) => self.begun.remove(i).1,
            None => self.next(),
        };
        self.running.push(a.number);
        a
    }

    /// `a`, run for `batch`, finished: it took effect, or it failed and is settled later.
    pub fn finished(&mut self, batch: &Arc<Batch>, a: Attempt, took: bool) {
        self.running.retain(|n| *n != a.number);
        if !took {
            self.failed.push((batch.clone(), a.number));
            if a.number > self.base {
                self.broken = true;
            }
        }
    }

    /// Whether the attempt `number` is still in flight, and if not, how it ended.
    pub fn ahead(&self, number: u64) -> Ahead {
        if self.running.contains(&number) || self.begun.iter().any(|(_, a)| a.number == number) {
            Ahead::InFlight
        } else if self.failed.iter().any(|(_, n)| *n == number) {
            Ahead::Failed
        } else {
            Ahead::Done
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
    /// given again before any other, since every batch after it follows it.
    pub fn took_effect_unanswered(&self, batch: &Arc<Batch>) -> Option<u64> {
        self.failed
            .iter()
            .find(|(b, n)| !same(b, batch) && self.fate(*n) == Some(true))
            .map(|(b, _)| b.id)
    }

    /// Whether an attempt other than `batch`'s is begun or running. A fence is made only when
    /// none is: attempts begun after a fence follow it, and must not overtake earlier ones.
    pub fn others_in_flight(&self, batch: &Arc<Batch>) -> bool {
        let own = self
            .begun
            .iter()
            .find(|(b, _)| Arc::ptr_eq(b, batch))
            .map(|(_, a)| a.number);
        !self.running.is_empty() || self.begun.iter().any(|(_, a)| Some(a.number) != own)
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

    /// The number the row held as the last fence left it (0: none yet).
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
    fn attempts_follow_in_the_order_begun() {
        let mut c = Chain::default();
        let (a, b) = (batch(1), batch(2));
        c.begin(&a);
        c.begin(&b);
        // Started in either order, each keeps its place.
        let sb = c.start(&b);
        let sa = c.start(&a);
        assert_eq!(
            sa,
            Attempt {
                number: 1,
                follows: 0
            }
        );
        assert_eq!(
            sb,
            Attempt {
                number: 2,
                follows: 1
            }
        );
        assert_eq!(c.ahead(1), Ahead::InFlight);
        c.finished(&a, sa, true);
        assert_eq!(c.ahead(1), Ahead::Done);
        c.finished(&b, sb, true);
        // A batch never begun gets the next number, following the last.
        let n = c.start(&batch(3));
        assert_eq!(
            n,
            Attempt {
                number: 3,
                follows: 2
            }
        );
        assert!(!c.broken());
    }

    #[test]
    fn others_in_flight_leaves_out_the_batch_asking() {
        let mut c = Chain::default();
        let (a, b) = (batch(1), batch(2));
        c.begin(&a);
        assert!(!c.others_in_flight(&a));
        assert!(c.others_in_flight(&b));
        c.begin(&b);
        let sa = c.start(&a);
        assert!(c.others_in_flight(&b), "a is running");
        c.finished(&a, sa, true);
        assert!(!c.others_in_flight(&b));
        assert!(c.others_in_flight(&a), "b is begun");
    }

    #[test]
    fn a_fence_settles_failed_attempts_as_a_prefix() {
        let mut c = Chain::default();
        let (a, b, d) = (batch(1), batch(2), batch(3));
        for x in [&a, &b, &d] {
            c.begin(x);
        }
        let (sa, sb, sd) = (c.start(&a), c.start(&b), c.start(&d));
        // a took effect, b's answer was lost, d was refused (b's outcome unknown to it).
        c.finished(&a, sa, true);
        c.finished(&b, sb, false);
        c.finished(&d, sd, false);
        assert!(c.broken());
        assert_eq!(c.ahead(2), Ahead::Failed);
        assert_eq!(c.fate(2), None);
        // The fence finds the row at b's number: b took effect, d did not.
        let at = c.fence_number();
        c.fenced(at, 2);
        assert!(!c.broken());
        assert_eq!(c.fate(2), Some(true));
        assert_eq!(c.fate(3), Some(false));
        // d must wait for b to be given again.
        assert_eq!(c.took_effect_unanswered(&d), Some(2));
        c.settle(&b);
        assert_eq!(c.took_effect_unanswered(&d), None);
        // The next attempt follows the fence.
        c.settle(&d);
        let again = c.start(&d);
        assert_eq!(again.follows, at);
    }

    #[test]
    fn attempts_from_before_a_fence_never_count_after_it() {
        let mut c = Chain::default();
        let a = batch(1);
        let sa = c.start(&a);
        c.finished(&a, sa, false);
        // Nothing took effect: the row held 0.
        let f1 = c.fence_number();
        c.fenced(f1, 0);
        assert_eq!(c.fate(sa.number), Some(false));
        c.settle(&a);
        // Given again: a new attempt after the fence, which fails too; the second fence finds
        // the row at the first fence.
        let again = c.start(&a);
        c.finished(&a, again, false);
        assert!(c.broken());
        let f2 = c.fence_number();
        c.fenced(f2, f1);
        assert_eq!(c.fate(again.number), Some(false));
        // An attempt that failed after a fence it was begun before does not break the chain:
        // the fence settled it.
        let b = batch(2);
        c.begin(&b);
        let f3 = c.fence_number();
        c.fenced(f3, f2);
        let sb = c.start(&b);
        c.finished(&b, sb, false);
        assert!(!c.broken());
        assert_eq!(c.fate(sb.number), Some(false));
    }
}
