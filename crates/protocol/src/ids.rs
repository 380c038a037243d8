//! Identifiers: which user, device, conversation and client message ids are valid, and the
//! deterministic id of a direct (two-person) conversation.
//!
//! Ids are short printable ASCII so that they can go in URLs, logs and keys without escaping.

use sha2::{Digest, Sha256};
use std::fmt;

/// Longest id of any kind, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Prefix of every direct conversation id; group ids may not start with it.
pub const DIRECT_PREFIX: &str = "d_";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdKind {
    User,
    Device,
    Conversation,
    ClientMessage,
}

impl fmt::Display for IdKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdKind::User => "user id",
            IdKind::Device => "device id",
            IdKind::Conversation => "conversation id",
            IdKind::ClientMessage => "client message id",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{0} is empty")]
    Empty(IdKind),
    #[error("{kind} is {len} bytes long; the limit is {MAX_ID_LEN}")]
    TooLong { kind: IdKind, len: usize },
    #[error("{kind} {id:?} contains {ch:?}; use letters, digits and . _ - @ : only")]
    BadChar { kind: IdKind, id: String, ch: char },
}

/// Checks that `id` is 1..=128 bytes of `[A-Za-z0-9._@:-]`.
pub fn validate_id(kind: IdKind, id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty(kind));
    }
    if id.len() > MAX_ID_LEN {
        return Err(IdError::TooLong {
            kind,
            len: id.len(),
        });
    }
    if let Some(ch) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@' | ':')))
    {
        return Err(IdError::BadChar {
            kind,
            id: id.to_string(),
            ch,
        });
    }
    Ok(())
}

/// Validates a conversation id as a client names it.
pub fn validate_conv_id(id: &str) -> Result<(), IdError> {
    validate_id(IdKind::Conversation, id)
}

/// The id of the direct conversation between two users: the same whichever of the two asks.
///
/// `d_` followed by the first 32 hex digits of SHA-256 over the two user ids, sorted and
/// length-prefixed (so that ("ab","c") and ("a","bc") differ).
pub fn direct_conv_id(a: &str, b: &str) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut h = Sha256::new();
    for part in [lo, hi] {
        h.update((part.len() as u32).to_be_bytes());
        h.update(part.as_bytes());
    }
    let digest = h.finalize();
    let mut out = String::with_capacity(DIRECT_PREFIX.len() + 32);
    out.push_str(DIRECT_PREFIX);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in &digest[..16] {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

/// Whether a conversation id names a direct conversation.
pub fn is_direct(conv: &str) -> bool {
    conv.starts_with(DIRECT_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_id_is_symmetric_and_unambiguous() {
        assert_eq!(
            direct_conv_id("alice", "bob"),
            direct_conv_id("bob", "alice")
        );
        assert_ne!(direct_conv_id("ab", "c"), direct_conv_id("a", "bc"));
        let id = direct_conv_id("alice", "bob");
        assert!(is_direct(&id));
        assert_eq!(id.len(), 34);
        validate_conv_id(&id).unwrap();
        // Stored direct conversations are keyed by it: it must never change.
        assert_eq!(id, "d_884a452152d3bf048cc051df8f708aff");
    }

    #[test]
    fn id_validation() {
        assert!(validate_id(IdKind::User, "alice@example.com").is_ok());
        assert_eq!(
            validate_id(IdKind::User, ""),
            Err(IdError::Empty(IdKind::User))
        );
        assert!(matches!(
            validate_id(IdKind::Device, "a b"),
            Err(IdError::BadChar { ch: ' ', .. })
        ));
        assert!(matches!(
            validate_id(IdKind::User, &"x".repeat(129)),
            Err(IdError::TooLong { len: 129, .. })
        ));
    }
}
