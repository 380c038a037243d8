//! One connected device as the session hub sees it: who it is, per conversation how far the
//! server has pushed to it and whether a `notify` is outstanding, and the sends it had refused
//! for rate and must resend first.

use crate::held_back::Gate;
use foldhash::{HashMap, HashMapExt};
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
    /// The sends refused for rate and held back, see [`crate::held_back`].
    pub held_back: Gate,
    /// peer -> the id of the direct conversation with them, as sends to a user are resolved
    /// (boxed: most connections never send by user, and an idle one should not pay for it).
    pub direct: Option<Box<HashMap<String, Arc<str>>>>,
}

impl Session {
    pub fn new(user: &str, device: &str) -> Self {
        Session {
            user: Arc::from(user),
            device: Arc::from(device),
            convs: HashMap::new(),
            held_back: Gate::new(),
            direct: None,
        }
    }
}
