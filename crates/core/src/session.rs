//! One connected device as the core sees it: who it is and, per conversation, how far the
//! server has pushed to it and whether a `notify` is outstanding.

use std::collections::{HashMap, VecDeque};

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
    pub user: String,
    pub device: String,
    pub convs: HashMap<String, PushState>,
    /// conversation -> client message ids refused (for rate, or held back behind one that
    /// was), in the order they arrived. Only the first may be admitted; each admission lets
    /// the next one go. So resends, in whatever order they come, are numbered in the order the
    /// connection first sent them. Each entry keeps when it was last refused: one the client
    /// stopped resending (it gave up, or it was refused for another reason) expires.
    pub held_back: HashMap<String, VecDeque<(String, u64)>>,
}

impl Session {
    pub fn new(user: String, device: String) -> Self {
        Session {
            user,
            device,
            convs: HashMap::new(),
            held_back: HashMap::new(),
        }
    }
}
