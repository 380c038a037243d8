//! One connected device as the core sees it: who it is and, per conversation, how far the
//! server has pushed to it and whether a `notify` is outstanding.

use foldhash::{HashMap, HashMapExt};
use std::collections::VecDeque;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PushState {
    /// Highest seq this connection has been sent (pushed or synced); pushes continue only
    /// from exactly here, so a device never receives a pushed gap.
    pub sent_up_to: u64,
    /// A `notify` was sent and the device has not synced since.
    pub notified: bool,
}

#[derive(Clone, Debug)]
pub struct Session {
    /// Shared with what the session's sends are remembered under (no copy per send).
    pub user: Arc<str>,
    pub device: Arc<str>,
    pub convs: HashMap<String, PushState>,
    /// conversation -> the sends refused there and held back, see [`HeldBack`].
    pub held_back: HashMap<String, HeldBack>,
    /// peer -> the id of the direct conversation with them, as sends to a user are resolved
    /// (boxed: most connections never send by user, and an idle one should not pay for it).
    pub direct: Option<Box<HashMap<String, Arc<str>>>>,
    /// Sends waiting for a dedup lookup, and the sends behind them, in the order they came.
    pub parked: VecDeque<Parked>,
    /// Bytes of bodies and ids in `parked`.
    pub parked_bytes: usize,
    /// (conversation, client message id) of sends refused while `parked` was full, in order;
    /// held back once `parked` is empty.
    pub busy_refused: Vec<(String, String)>,
    /// The conversation of a `sync` whose page is being read (a connection has one at a time):
    /// held in memory until the page is served, which moves the push position.
    pub reading: Option<String>,
}

/// A send that waits: for the store to say whether its client message id was accepted before
/// or to load its conversation, or behind a send of its connection that does, so that one connection's sends are sequenced
/// in the order it sent them.
#[derive(Clone, Debug)]
pub struct Parked {
    pub conv: Option<String>,
    pub to: Option<String>,
    pub cmid: String,
    pub body: String,
    pub reply_to: Option<u64>,
    pub lookup: LookupState,
}

/// What the store answered for a dedup key (the entry, if it holds one), and the dedup cache's
/// mark when the lookup was asked.
pub type LookedUp = (Option<crate::model::DedupRecord>, u64);

#[derive(Clone, Debug)]
pub enum LookupState {
    /// No lookup asked: it waits only behind others (it may still need one when its turn comes).
    NotAsked,
    /// Lookup `id` asked when the dedup cache stood at `mark`.
    Asked { id: u64, mark: u64 },
    /// It waits for its conversation to be loaded, with the store's answer for its key if it
    /// was looked up: (what was found, the dedup cache's mark when it was asked).
    Load(String, Option<LookedUp>),
    /// The store answered.
    Answered {
        found: Option<crate::model::DedupRecord>,
        mark: u64,
    },
}

impl Parked {
    pub fn new(req: &crate::engine::SendRequest<'_>, lookup: LookupState) -> Self {
        Parked {
            conv: req.conv.map(str::to_string),
            to: req.to.map(str::to_string),
            cmid: req.cmid.clone(),
            body: req.body.clone(),
            reply_to: req.reply_to,
            lookup,
        }
    }

    /// What a send counts against its connection's budget of waiting bytes.
    pub fn size_of(req: &crate::engine::SendRequest<'_>) -> usize {
        req.body.len() + req.cmid.len() + req.conv.map_or(0, str::len) + req.to.map_or(0, str::len)
    }

    pub fn bytes(&self) -> usize {
        self.body.len()
            + self.cmid.len()
            + self.conv.as_ref().map_or(0, String::len)
            + self.to.as_ref().map_or(0, String::len)
    }
}

/// Client message ids refused in one conversation (for rate, or held back behind one that was),
/// in the order they arrived. Only the first may be admitted; each admission lets the next one
/// go. So resends, in whatever order they come, are numbered in the order the connection first
/// sent them.
///
/// The first one is forgotten when the client stopped resending it (it gave up, or it was
/// refused for another reason) while it keeps resending the others: not resent for
/// [`HELD_BACK_TTL_MS`](crate::engine) and the others resent at least twice meanwhile. Time
/// alone is not enough: a clock that jumps forward would let a message sent right after the
/// first one through ahead of it.
#[derive(Clone, Debug, Default)]
pub struct HeldBack {
    /// (client message id, when it was last refused), in first-send order.
    pub queue: VecDeque<(String, u64)>,
    /// Resends of the others seen since the first one was last seen.
    pub others_resent: u32,
}

impl Session {
    pub fn new(user: &str, device: &str) -> Self {
        Session {
            user: Arc::from(user),
            device: Arc::from(device),
            convs: HashMap::new(),
            held_back: HashMap::new(),
            direct: None,
            parked: VecDeque::new(),
            parked_bytes: 0,
            busy_refused: Vec::new(),
            reading: None,
        }
    }
}
