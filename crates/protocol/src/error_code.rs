//! The closed set of machine-readable codes carried by `rejected` and `error` frames.
//!
//! Clients branch on these codes, so they are part of the protocol: a new code is a protocol
//! change and goes into `docs/protocol.md`.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame could not be decoded (not JSON/MessagePack, unknown type, missing field).
    Malformed,
    /// A field is present but its value is not allowed (bad id, empty body, zero limit...).
    Invalid,
    /// The message body is larger than the server's `max_body_bytes`.
    TooLarge,
    /// The user is not a member of the conversation.
    NotMember,
    /// The conversation does not exist.
    NotFound,
    /// The user sends faster than the server's per-user rate; retry after `retry_after_ms`.
    RateLimited,
    /// The server cannot make the message durable right now; retry later.
    Unavailable,
    /// The server is shutting down; reconnect and retry.
    ShuttingDown,
    /// An unexpected server-side failure; retry later.
    Internal,
}

impl ErrorCode {
    /// Whether a client should resend the same frame (same client message id) later.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::RateLimited
                | ErrorCode::Unavailable
                | ErrorCode::ShuttingDown
                | ErrorCode::Internal
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::Invalid => "invalid",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::NotMember => "not_member",
            ErrorCode::NotFound => "not_found",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
