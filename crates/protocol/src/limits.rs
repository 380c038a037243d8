//! Size and count limits that bound what one frame may ask of the server.
//!
//! The server enforces them; clients may read them from `welcome` to stay inside.

use serde::{Deserialize, Serialize};

/// Most conversations one `convs` page lists (and its default `limit`); a page also ends early
/// once it is large in bytes, and says whether more follow.
pub const MAX_CONVS_LIMIT: u32 = 500;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest WebSocket message the server reads; a larger one closes the socket with 1009.
    pub max_frame_bytes: usize,
    /// Largest `send` body in bytes (UTF-8); a larger one is `rejected` with `too_large`.
    pub max_body_bytes: usize,
    /// Largest `limit` a `sync` may ask for; larger requests are served this many messages.
    pub max_sync_limit: u32,
    /// Most conversations one `ack` frame may carry.
    pub max_acks_per_frame: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 64 * 1024,
            max_body_bytes: 32 * 1024,
            max_sync_limit: 1000,
            max_acks_per_frame: 1000,
        }
    }
}
