//! Errors of the core's rules, each mapped to the protocol's error code a client sees.

use ordo_protocol::{ErrorCode, IdError};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    BadId(#[from] IdError),
    #[error("{0}")]
    Invalid(String),
    #[error("body is {len} bytes; the limit is {max}")]
    BodyTooLarge { len: usize, max: usize },
    /// Also the answer to a non-member of a conversation that exists: one answer, word for
    /// word, so that it tells no one which conversations exist or who has talked to whom.
    #[error("conversation {0:?} does not exist or you are not a member of it")]
    NoSuchConversation(String),
    #[error("conversation {0:?} already exists")]
    AlreadyExists(String),
    #[error("sending too fast; retry in {0} ms")]
    RateLimited(u64),
    #[error("message {earlier:?} of this conversation was refused for rate and must be resent first, to keep your messages in order")]
    HeldBack {
        earlier: String,
        retry_after_ms: u64,
    },
    #[error("more refused sends than the server keeps in order on one connection (sends held back in {max} conversations, or 4,096 in one): the connection is closed; reconnect and resend pending messages in order")]
    HeldBackFull { max: usize },
    #[error("{0}")]
    Unavailable(String),
    #[error("the server is busy: {what}; retry in {retry_after_ms} ms")]
    Busy { what: String, retry_after_ms: u64 },
    /// The answer of another node of a cluster, which owns what the request was about.
    #[error("{message}")]
    Remote { code: ErrorCode, message: String },
}

impl CoreError {
    pub fn code(&self) -> ErrorCode {
        match self {
            CoreError::BadId(_) | CoreError::Invalid(_) | CoreError::AlreadyExists(_) => {
                ErrorCode::Invalid
            }
            CoreError::BodyTooLarge { .. } => ErrorCode::TooLarge,
            CoreError::NoSuchConversation(_) => ErrorCode::NotFound,
            CoreError::RateLimited(_)
            | CoreError::HeldBack { .. }
            | CoreError::HeldBackFull { .. } => ErrorCode::RateLimited,
            CoreError::Unavailable(_) | CoreError::Busy { .. } => ErrorCode::Unavailable,
            CoreError::Remote { code, .. } => *code,
        }
    }

    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            CoreError::RateLimited(ms) => Some(*ms),
            CoreError::HeldBackFull { .. } => Some(1),
            CoreError::HeldBack { retry_after_ms, .. } | CoreError::Busy { retry_after_ms, .. } => {
                Some(*retry_after_ms)
            }
            _ => None,
        }
    }
}
