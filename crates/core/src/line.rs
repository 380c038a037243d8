//! The conversation owner's line of waiting sends per connection: sends that wait for the store
//! (to say whether their client message id was accepted before, or to load their
//! conversation), and the sends of the same connection behind them, so that one connection's
//! sends are sequenced in the order it sent them.

use crate::model::DedupRecord;
use crate::seam::{Origin, SendCmd};
use std::collections::VecDeque;

/// One connection's waiting sends.
#[derive(Clone, Debug)]
pub struct Line {
    pub origin: Origin,
    pub parked: VecDeque<Parked>,
    /// Bytes of bodies and ids in `parked`.
    pub bytes: usize,
}

impl Line {
    pub fn new(origin: Origin) -> Self {
        Line {
            origin,
            parked: VecDeque::new(),
            bytes: 0,
        }
    }
}

/// A send that waits, and for what.
#[derive(Clone, Debug)]
pub struct Parked {
    pub cmd: SendCmd,
    pub lookup: LookupState,
}

/// What the store answered for a dedup key (the entry, if it holds one), and the dedup cache's
/// mark when the lookup was asked.
pub type LookedUp = (Option<DedupRecord>, u64);

#[derive(Clone, Debug)]
pub enum LookupState {
    /// No lookup asked: it waits only behind others (it may still need one when its turn comes).
    NotAsked,
    /// Lookup `id` asked when the dedup cache stood at `mark`.
    Asked { id: u64, mark: u64 },
    /// It waits for its conversation to be loaded, with the store's answer for its key if it
    /// was looked up.
    Load(String, Option<LookedUp>),
    /// The store answered.
    Answered {
        found: Option<DedupRecord>,
        mark: u64,
    },
}

impl Parked {
    /// What a send counts against its connection's budget of waiting bytes.
    pub fn size_of(cmd: &SendCmd) -> usize {
        cmd.body.len() + cmd.cmid.len() + cmd.conv.len() + cmd.peer.as_ref().map_or(0, String::len)
    }

    pub fn bytes(&self) -> usize {
        Self::size_of(&self.cmd)
    }
}
