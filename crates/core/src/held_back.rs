//! The held-back order: how a connection's refused sends keep their place. Once a send into a
//! conversation is refused for a reason that passes (the user's rate, in the session hub; the
//! conversation owner too busy to take it), that connection's later new sends into the
//! conversation are refused too until the refused one is resent. So resends, in whatever order
//! they come, are numbered in the order the connection first sent them (G4).
//!
//! Both halves of the core keep such a gate per connection, each for its own refusals: the hub
//! for rate (before the send crosses to the owner), the owner for being busy (where it decides
//! it). Each gate only ever refuses, never reorders, so the two in a row keep the order too.

use foldhash::{HashMap, HashMapExt};
use std::collections::VecDeque;

/// Most refused sends one gate (a connection has two: the hub's for rate, the owner's for
/// busy) remembers to keep their order, over all its conversations: with client message ids of
/// up to 128 bytes, a few hundred KiB at most per connection, and a check that scans little.
pub const MAX_HELD_BACK: usize = 1024;

/// Most conversations of one connection with sends held back. A gate that would have to
/// remember more (this many conversations, or [`MAX_HELD_BACK`] sends in all) cannot keep the
/// order any longer: the connection is closed, and the client resends in order on its next one.
pub const MAX_HELD_CONVS: usize = 64;

/// Why a connection whose gate overflowed is closed.
pub const OVERFLOW_REASON: &str = "too many refused sends to keep in order on this connection; reconnect and resend pending messages in order";

/// A held-back send not resent for this long is forgotten (the client's longest backoff is a
/// minute, ±30 %), provided the client resent the others behind it at least
/// two times meanwhile: a message the client gave up on must not block
/// its conversation for good. Time alone is not enough: a clock that jumps forward would let a
/// message sent right after the first one through ahead of it.
pub const HELD_BACK_TTL_MS: u64 = 120_000;
const RESENDS_BEFORE_EXPIRY: u32 = 2;

/// Client message ids refused in one conversation, in the order they must go. Only the first
/// may go; each one that goes lets the next one go.
#[derive(Clone, Debug, Default)]
pub struct HeldBack {
    /// (client message id, when it was last refused), in first-send order.
    queue: VecDeque<(String, u64)>,
    /// Resends of the others seen since the first one was last seen.
    others_resent: u32,
}

/// Why a send may not go yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Held {
    /// Behind this earlier refused send of the conversation.
    Behind(String),
    /// The gate cannot remember this send (it has sends held back in [`MAX_HELD_CONVS`] other
    /// conversations, or [`MAX_HELD_BACK`] in all): close the connection.
    Full,
}

impl HeldBack {
    /// A send of `cmid` arrives: whether it may go, or whom it waits behind (it is queued then,
    /// in arrival order, if it was not and the gate has `room`).
    fn check(&mut self, cmid: &str, now_ms: u64, room: bool) -> Result<(), Held> {
        if self.queue.front().is_some_and(|(c, _)| c == cmid) {
            self.others_resent = 0;
        } else if self.queue.iter().any(|(c, _)| c == cmid) {
            self.others_resent = self.others_resent.saturating_add(1);
        }
        if self.others_resent >= RESENDS_BEFORE_EXPIRY
            && self
                .queue
                .front()
                .is_some_and(|(c, at)| c != cmid && at.saturating_add(HELD_BACK_TTL_MS) < now_ms)
        {
            self.queue.pop_front();
            self.others_resent = 0;
        }
        if let Some(entry) = self.queue.iter_mut().find(|(c, _)| c == cmid) {
            entry.1 = now_ms;
        }
        match self.queue.front() {
            Some((first, _)) if first != cmid => {
                let first = first.clone();
                if !self.queue.iter().any(|(c, _)| c == cmid) {
                    if !room {
                        return Err(Held::Full);
                    }
                    self.queue.push_back((cmid.to_string(), now_ms));
                }
                Err(Held::Behind(first))
            }
            _ => Ok(()),
        }
    }
}

/// One connection's gate: per conversation, what is held back there.
#[derive(Clone, Debug, Default)]
pub struct Gate(HashMap<String, HeldBack>);

impl Gate {
    pub fn new() -> Self {
        Gate(HashMap::new())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the gate may remember one more send.
    fn room(&self) -> bool {
        self.0.values().map(|h| h.queue.len()).sum::<usize>() < MAX_HELD_BACK
    }

    /// A send of `cmid` into `conv` arrives: whether it may go (see [`HeldBack`]).
    pub fn check(&mut self, conv: &str, cmid: &str, now_ms: u64) -> Result<(), Held> {
        let full = self.0.len() >= MAX_HELD_CONVS;
        let room = self.room();
        match self.0.get_mut(conv) {
            Some(h) => h.check(cmid, now_ms, room),
            None if full => Err(Held::Full),
            None => Ok(()),
        }
    }

    /// `cmid` went through: the next one held back in `conv`, if any, may go.
    pub fn went(&mut self, conv: &str, cmid: &str) {
        if let Some(h) = self.0.get_mut(conv) {
            if h.queue.front().is_some_and(|(c, _)| c == cmid) {
                h.queue.pop_front();
                h.others_resent = 0;
            }
            if h.queue.is_empty() {
                self.0.remove(conv);
            }
        }
    }

    /// `cmid`, which was let through (so it is the first of `conv` to go), was refused after
    /// all: it goes first once resent, before anything held back behind it (also before a copy
    /// of itself that arrived meanwhile and was queued behind later sends).
    /// False if the gate cannot remember it (see [`Held::Full`]): close the connection.
    #[must_use]
    pub fn refused(&mut self, conv: &str, cmid: &str, now_ms: u64) -> bool {
        if !self.0.contains_key(conv) && self.0.len() >= MAX_HELD_CONVS {
            return false;
        }
        if let Some(h) = self.0.get_mut(conv) {
            h.queue.retain(|(c, _)| c != cmid);
        }
        if !self.room() {
            return false;
        }
        let h = self.0.entry(conv.to_string()).or_default();
        h.queue.push_front((cmid.to_string(), now_ms));
        h.others_resent = 0;
        true
    }

    /// `cmid` will not be resent (it was a resend of an accepted message, or it was refused
    /// for good): it holds nothing back.
    pub fn forget(&mut self, conv: &str, cmid: &str) {
        if let Some(h) = self.0.get_mut(conv) {
            h.queue.retain(|(c, _)| c != cmid);
            if h.queue.is_empty() {
                self.0.remove(conv);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_sends_go_in_their_first_send_order() {
        let mut g = Gate::new();
        assert_eq!(g.check("c", "a", 0), Ok(()));
        assert!(g.refused("c", "a", 0));
        assert_eq!(g.check("c", "b", 1), Err(Held::Behind("a".into())));
        assert_eq!(g.check("c", "c", 2), Err(Held::Behind("a".into())));
        // Other conversations are not held back.
        assert_eq!(g.check("d", "x", 2), Ok(()));
        assert_eq!(g.check("c", "c", 3), Err(Held::Behind("a".into())));
        assert_eq!(g.check("c", "a", 4), Ok(()));
        g.went("c", "a");
        assert_eq!(g.check("c", "c", 5), Err(Held::Behind("b".into())));
        assert_eq!(g.check("c", "b", 6), Ok(()));
        g.went("c", "b");
        // Let through and refused again: first once more, ahead of what waits behind it.
        assert!(g.refused("c", "b", 7));
        assert_eq!(g.check("c", "c", 8), Err(Held::Behind("b".into())));
        // A copy of b queued behind c meanwhile does not keep b behind c.
        g.went("c", "b");
        assert!(g.refused("c", "c", 8));
        assert_eq!(
            g.check("c", "b", 8),
            Err(Held::Behind("c".into())),
            "b's copy queued"
        );
        assert!(g.refused("c", "b", 9));
        assert_eq!(
            g.check("c", "c", 9),
            Err(Held::Behind("b".into())),
            "b first again"
        );
        assert_eq!(g.check("c", "b", 10), Ok(()));
        g.went("c", "b");
        g.forget("c", "b");
        assert_eq!(g.check("c", "c", 9), Ok(()));
        g.went("c", "c");
        assert!(g.is_empty());
    }

    #[test]
    fn a_gate_that_cannot_remember_says_so() {
        let mut g = Gate::new();
        for i in 0..MAX_HELD_CONVS {
            assert!(g.refused(&format!("c{i}"), "m", 0));
        }
        assert_eq!(g.check("other", "x", 1), Err(Held::Full));
        assert!(!g.refused("other", "x", 1), "nothing remembered");
        // At its limit in all, over two conversations.
        let mut g = Gate::new();
        assert!(g.refused("a", "a0", 0));
        assert!(g.refused("b", "b0", 0));
        for i in 2..MAX_HELD_BACK {
            assert!(g.check("b", &format!("b{i}"), 0).is_err());
        }
        assert_eq!(g.check("a", "a-late", 0), Err(Held::Full));
        assert!(!g.refused("a", "a-again", 0));
        assert_eq!(g.check("a", "a0", 0), Ok(()), "the first still goes");
        // One conversation at the limit.
        let mut g = Gate::new();
        assert!(g.refused("c", "m0", 0));
        for i in 1..MAX_HELD_BACK {
            assert_eq!(
                g.check("c", &format!("m{i}"), 0),
                Err(Held::Behind("m0".into()))
            );
        }
        assert_eq!(g.check("c", "late", 0), Err(Held::Full));
        assert_eq!(
            g.check("c", "m5", 0),
            Err(Held::Behind("m0".into())),
            "remembered"
        );
    }
}
