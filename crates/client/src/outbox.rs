//! The outbox (the seeds' waiting-ack queue): every message the app sent and the server has not
//! yet accepted, in the order the app sent it, with its retry schedule.
//!
//! Rules: a message keeps its client message id for life, so every resend is recognised by the
//! server's dedup; messages of one conversation are (re)sent in their original order, so the
//! server numbers them in that order; a retryable rejection waits (at least its retry-after); a
//! message that used all its attempts, or got a non-retryable rejection, fails.

use crate::backoff::RetryPolicy;
use ordo_protocol::ClientFrame;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Where a message goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Target {
    /// An existing conversation (a group, or a direct conversation by its id).
    Conv(String),
    /// The direct conversation with this user.
    User(String),
}

/// One message waiting for `accepted`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    pub cmid: String,
    pub target: Target,
    pub body: String,
    pub reply_to: Option<u64>,
    /// Sends so far (0: never sent).
    pub attempts: u32,
    /// When the next send is due, in the caller's milliseconds; 0 means "as soon as possible".
    pub due_ms: u64,
    /// Sent on the current connection and not refused: the server has it or will answer. A
    /// later message of the same conversation may follow it at once (TCP keeps their order);
    /// one that is not in flight (refused for now, or never sent) holds the later ones back.
    #[serde(skip)]
    pub in_flight: bool,
}

impl Pending {
    pub fn frame(&self) -> ClientFrame {
        let (conv, to) = match &self.target {
            Target::Conv(c) => (Some(c.clone()), None),
            Target::User(u) => (None, Some(u.clone())),
        };
        ClientFrame::Send {
            conv,
            to,
            cmid: self.cmid.clone(),
            body: self.body.clone(),
            reply_to: self.reply_to,
        }
    }
}

/// Why a message was given up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Every attempt went unanswered or was refused with a retryable error.
    Exhausted { attempts: u32 },
    /// The server refused it for good.
    Rejected { code: String, message: String },
}

#[derive(Clone, Debug, Default)]
pub struct Outbox {
    queue: VecDeque<Pending>,
    policy: RetryPolicy,
}

impl Outbox {
    pub fn new(policy: RetryPolicy, pending: Vec<Pending>) -> Self {
        Outbox {
            queue: pending.into(),
            policy,
        }
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Pending> {
        self.queue.iter()
    }

    pub fn get(&self, cmid: &str) -> Option<&Pending> {
        self.queue.iter().find(|p| p.cmid == cmid)
    }

    pub fn push(&mut self, p: Pending) {
        self.queue.push_back(p);
    }

    /// The server accepted `cmid`: it leaves the outbox.
    pub fn accepted(&mut self, cmid: &str) -> Option<Pending> {
        let i = self.queue.iter().position(|p| p.cmid == cmid)?;
        self.queue.remove(i)
    }

    /// After a (re)connect every pending message is due at once, in order, with its attempt
    /// count kept.
    pub fn all_due_now(&mut self) {
        for p in &mut self.queue {
            p.due_ms = 0;
            p.in_flight = false;
        }
    }

    /// The messages to send now, in order, each marked as sent once more with its next retry
    /// time. Within a conversation nothing overtakes an earlier message that is waiting: a
    /// message refused for now holds back every later one, and a resend also waits for every
    /// earlier message whose own resend is not due yet (it may have been refused without us
    /// knowing yet). Only a first send may follow messages in flight at once, which pipelines
    /// new messages. `unit` yields jitter in `[0, 1)`. Messages that used up their attempts
    /// are returned as failed instead.
    pub fn take_due(
        &mut self,
        now_ms: u64,
        mut unit: impl FnMut() -> f64,
    ) -> (Vec<Pending>, Vec<(Pending, Failure)>) {
        let mut send = Vec::new();
        let mut failed = Vec::new();
        // Conversations where a later message may not go at all, and where only first sends may.
        let mut blocked: Vec<Target> = Vec::new();
        let mut only_new: Vec<Target> = Vec::new();
        let mut keep = VecDeque::with_capacity(self.queue.len());
        while let Some(mut p) = self.queue.pop_front() {
            let resend = p.attempts > 0;
            if blocked.contains(&p.target) || (resend && only_new.contains(&p.target)) {
                keep.push_back(p);
                continue;
            }
            if p.due_ms > now_ms {
                if p.in_flight {
                    only_new.push(p.target.clone());
                } else {
                    blocked.push(p.target.clone());
                }
                keep.push_back(p);
                continue;
            }
            if p.attempts > 0 && !self.policy.may_retry(p.attempts) {
                let attempts = p.attempts;
                failed.push((p, Failure::Exhausted { attempts }));
                continue;
            }
            p.attempts += 1;
            p.in_flight = true;
            p.due_ms = now_ms + self.policy.delay_ms(p.attempts, unit());
            send.push(p.clone());
            keep.push_back(p);
        }
        self.queue = keep;
        (send, failed)
    }

    /// A retryable rejection: wait at least `retry_after_ms` (or the regular backoff) before
    /// this message and the later ones of its conversation go again.
    pub fn retry_later(&mut self, cmid: &str, now_ms: u64, retry_after_ms: Option<u64>) {
        if let Some(p) = self.queue.iter_mut().find(|p| p.cmid == cmid) {
            // The server's hint, but never longer than our own longest backoff.
            let wait = retry_after_ms.unwrap_or(0).min(self.policy.max_ms);
            p.due_ms = p.due_ms.max(now_ms.saturating_add(wait));
            p.in_flight = false;
        }
    }

    /// A non-retryable rejection: the message fails and leaves the outbox.
    pub fn reject(&mut self, cmid: &str) -> Option<Pending> {
        self.accepted(cmid)
    }

    /// The earliest time [`take_due`](Self::take_due) would send something, if any: messages
    /// held back behind a waiting one of their conversation do not count.
    pub fn next_due(&self) -> Option<u64> {
        let mut blocked: Vec<&Target> = Vec::new();
        let mut only_new: Vec<&Target> = Vec::new();
        let mut next: Option<u64> = None;
        for p in &self.queue {
            let resend = p.attempts > 0;
            if blocked.contains(&&p.target) || (resend && only_new.contains(&&p.target)) {
                continue;
            }
            next = Some(next.map_or(p.due_ms, |n| n.min(p.due_ms)));
            if p.due_ms > 0 {
                if p.in_flight {
                    only_new.push(&p.target);
                } else {
                    blocked.push(&p.target);
                }
            }
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pending(cmid: &str, conv: &str) -> Pending {
        Pending {
            cmid: cmid.into(),
            target: Target::Conv(conv.into()),
            body: cmid.into(),
            reply_to: None,
            attempts: 0,
            due_ms: 0,
            in_flight: false,
        }
    }

    #[test]
    fn resends_follow_the_schedule_then_fail() {
        let mut o = Outbox::new(RetryPolicy::default(), vec![pending("a", "c")]);
        let mut now = 0;
        let mut sends = Vec::new();
        loop {
            let (sent, failed) = o.take_due(now, || 0.5);
            if !failed.is_empty() {
                assert_eq!(failed[0].1, Failure::Exhausted { attempts: 10 });
                break;
            }
            if !sent.is_empty() {
                sends.push(now);
            }
            now = o.next_due().unwrap();
        }
        assert_eq!(
            sends,
            vec![0, 500, 1500, 3500, 7500, 15500, 31500, 63500, 123500, 183500]
        );
        assert!(o.is_empty());
    }

    #[test]
    fn a_later_message_never_overtakes_an_earlier_one_of_its_conversation() {
        let mut o = Outbox::new(
            RetryPolicy::default(),
            vec![pending("a", "c"), pending("b", "c"), pending("x", "other")],
        );
        let (sent, _) = o.take_due(0, || 0.5);
        assert_eq!(sent.len(), 3);
        o.retry_later("a", 0, Some(10_000));
        // b's own timer fires at 500, but a waits until 10,000: b waits with it; x goes.
        let (sent, _) = o.take_due(600, || 0.5);
        assert_eq!(
            sent.iter().map(|p| p.cmid.as_str()).collect::<Vec<_>>(),
            vec!["x"]
        );
        // At 10,000 a goes, then b right behind it (x's own retry is due too).
        let (sent, _) = o.take_due(10_000, || 0.5);
        assert_eq!(
            sent.iter().map(|p| p.cmid.as_str()).collect::<Vec<_>>(),
            vec!["a", "b", "x"]
        );
    }

    proptest! {
        /// Whatever the interleaving of sends, timer firings, acceptances, reconnects and
        /// rejections, each conversation's messages go out in their original relative order
        /// every time a batch is sent, nothing is sent after it was accepted, and every message
        /// ends accepted or failed exactly once.
        #[test]
        fn order_and_single_outcome(ops in proptest::collection::vec((0u8..5, 0usize..12, 0u64..5000), 1..200)) {
            let mut o = Outbox::new(RetryPolicy::default(), Vec::new());
            let mut now = 0u64;
            let mut created = 0usize;
            let mut outcome: std::collections::HashMap<String, &'static str> = Default::default();
            for (op, pick, dt) in ops {
                now += dt;
                match op {
                    0 => {
                        let conv = if pick % 2 == 0 { "c0" } else { "c1" };
                        o.push(pending(&format!("m{created:03}"), conv));
                        created += 1;
                    }
                    1 => {
                        let (sent, failed) = o.take_due(now, || (pick as f64) / 12.0);
                        for conv in ["c0", "c1"] {
                            let ids: Vec<&str> = sent.iter()
                                .filter(|p| p.target == Target::Conv(conv.into()))
                                .map(|p| p.cmid.as_str()).collect();
                            let mut sorted = ids.clone();
                            sorted.sort();
                            prop_assert_eq!(ids, sorted);
                        }
                        for p in &sent {
                            prop_assert!(!outcome.contains_key(&p.cmid), "{} sent after its outcome", p.cmid);
                        }
                        for (p, _) in failed {
                            prop_assert!(outcome.insert(p.cmid, "failed").is_none());
                        }
                    }
                    2 => {
                        let ids: Vec<String> = o.iter().map(|p| p.cmid.clone()).collect();
                        if !ids.is_empty() {
                            let id = &ids[pick % ids.len()];
                            let p = o.accepted(id).unwrap();
                            prop_assert!(outcome.insert(p.cmid, "accepted").is_none());
                        }
                    }
                    3 => o.all_due_now(),
                    _ => {
                        let ids: Vec<String> = o.iter().map(|p| p.cmid.clone()).collect();
                        if !ids.is_empty() {
                            o.retry_later(&ids[pick % ids.len()], now, Some(dt));
                        }
                    }
                }
            }
            // Drain: everything ends with exactly one outcome.
            for _ in 0..100 {
                let ids: Vec<String> = o.iter().map(|p| p.cmid.clone()).collect();
                for id in ids {
                    o.accepted(&id).unwrap();
                    prop_assert!(outcome.insert(id, "accepted").is_none());
                }
            }
            prop_assert_eq!(outcome.len(), created);
        }
    }
}
