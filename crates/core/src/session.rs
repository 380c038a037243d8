//! One connected device as the session hub sees it: who it is, per conversation how far the
//! server has pushed to it and whether a `notify` is outstanding, and the sends it had refused
//! and must resend first.

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
    /// Shared with the requests made on the session's behalf (no copy per send).
    pub user: Arc<str>,
    pub device: Arc<str>,
    pub convs: HashMap<String, PushState>,
    /// conversation -> the sends refused there and held back, see [`HeldBack`].
    pub held_back: HashMap<String, HeldBack>,
    /// peer -> the id of the direct conversation with them, as sends to a user are resolved
    /// (boxed: most connections never send by user, and an idle one should not pay for it).
    pub direct: Option<Box<HashMap<String, Arc<str>>>>,
}

/// Client message ids refused in one conversation (for rate, because the conversation owner
/// was too busy to take them, or held back behind one that was), in the order they arrived.
/// Only the first may be admitted; each admission lets the next one go. So resends, in
/// whatever order they come, are numbered in the order the connection first sent them.
///
/// The first one is forgotten when the client stopped resending it (it gave up, or it was
/// refused for another reason) while it keeps resending the others: not resent for
/// [`HELD_BACK_TTL_MS`](crate::hub) and the others resent at least twice meanwhile. Time
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
        }
    }
}
