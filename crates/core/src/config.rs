//! Tunables of the delivery rules. The server fills these from its configuration.

use crate::model::Retention;
use ordo_protocol::Limits;

#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub limits: Limits,
    /// Most pushed-but-unacknowledged messages per device and conversation; past it the device
    /// gets `notify` and pulls.
    pub push_window: u64,
    /// Groups with more members than this get no `receipt` frames (every member would be told
    /// of every other member's moves); their positions are in the overview.
    pub receipt_max_members: usize,
    /// The most members a group may have: an admin request that would go past it is refused.
    /// Every message into a group costs a push per member's device, at once, on the path of
    /// everyone else's messages.
    pub max_group_members: usize,
    /// How long a (sender, client message id) pair is remembered, in milliseconds.
    pub dedup_window_ms: u64,
    /// Most dedup entries kept in memory (the most recent; the store holds them all). Entries
    /// of batches not yet committed are kept beyond it.
    pub dedup_cache_entries: usize,
    /// Bytes of the filter that tells a new client message id from one that may have been
    /// seen inside the window, without asking the store.
    pub dedup_filter_bytes: usize,
    /// Bytes of sends that all connections together may have waiting for dedup lookups; past
    /// it a send that would wait is refused as unavailable (each connection also has its own
    /// bound, 1,024 sends and 1 MiB).
    pub max_parked_bytes: usize,
    /// Conversations held in memory (the most recently used; the store holds them all).
    /// Conversations with unfinished work are held beyond it.
    pub conv_cache_entries: usize,
    /// Conversations that one step of age-based retention covers; a step runs every second
    /// while a pass is under way, and a pass starts every [`retention_pass_ms`](Self::retention_pass_ms).
    pub retention_sweep_convs: u32,
    /// How often a pass of age-based retention over every stored conversation starts.
    pub retention_pass_ms: u64,
    /// Sustained sends per second per user; 0 disables the limit.
    pub rate_per_sec: f64,
    /// Sends a user may burst above the sustained rate.
    pub rate_burst: f64,
    /// Retention given to conversations that do not set their own.
    pub default_retention: Retention,
    /// Default `limit` of a `sync` that names none.
    pub default_sync_limit: u32,
    /// For each durable message in a conversation of at most this many members, the members
    /// (but the sender) with no connected device are reported ([`crate::Action::Offline`], for
    /// offline push); 0 reports nothing.
    pub offline_max_members: usize,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            limits: Limits::default(),
            push_window: 256,
            receipt_max_members: 1000,
            max_group_members: 100_000,
            dedup_window_ms: 24 * 60 * 60 * 1000,
            dedup_cache_entries: 100_000,
            dedup_filter_bytes: 32 << 20,
            max_parked_bytes: 64 << 20,
            conv_cache_entries: 50_000,
            retention_sweep_convs: 2_000,
            retention_pass_ms: 60_000,
            rate_per_sec: 1000.0,
            rate_burst: 2000.0,
            default_retention: Retention::default(),
            default_sync_limit: 100,
            offline_max_members: 0,
        }
    }
}
