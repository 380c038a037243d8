//! Message bodies that carry their own send time, so a receiver in the same process can tell a
//! message's delivery latency from the body alone, whatever system carried it.
//!
//! A body is 16 decimal digits (microseconds since the run's [`Clock`] started) followed by `x`
//! padding up to the requested size.

use std::fmt::Write;
use std::time::{Duration, Instant};

/// Digits of the time stamp at the start of every body.
pub const STAMP_LEN: usize = 16;

/// What follows the stamp, copied a slice at a time.
const PADDING: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";

/// The run's time base, shared by senders and receivers.
#[derive(Clone, Copy)]
pub struct Clock {
    base: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            base: Instant::now(),
        }
    }

    /// Microseconds since the clock started.
    pub fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }

    /// The instant `us` microseconds after the clock started.
    pub fn at(&self, us: u64) -> Instant {
        self.base + Duration::from_micros(us)
    }

    /// A body of `bytes` bytes (at least [`STAMP_LEN`]) stamped with `us`.
    pub fn body_at(&self, us: u64, bytes: usize) -> String {
        let mut s = String::with_capacity(bytes.max(STAMP_LEN));
        let _ = write!(s, "{us:016}");
        let mut pad = bytes.saturating_sub(s.len());
        while pad > 0 {
            let n = pad.min(PADDING.len());
            s.push_str(&PADDING[..n]);
            pad -= n;
        }
        s
    }

    /// The send time stamped at the start of a body (µs on the run clock); `None` if the body
    /// carries no stamp.
    pub fn stamp_of(body: &[u8]) -> Option<u64> {
        std::str::from_utf8(body.get(..STAMP_LEN)?)
            .ok()?
            .parse()
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_the_size_asked_and_carry_their_stamp() {
        let c = Clock::new();
        let b = c.body_at(5, 100);
        assert_eq!(b.len(), 100);
        assert!(b.starts_with("0000000000000005x"));
        assert_eq!(Clock::stamp_of(b.as_bytes()), Some(5));
        assert_eq!(c.body_at(7, 4).len(), STAMP_LEN);
        let long = c.body_at(9, 1000);
        assert_eq!(long.len(), 1000);
        assert!(long[STAMP_LEN..].bytes().all(|b| b == b'x'));
        assert_eq!(Clock::stamp_of(long.as_bytes()), Some(9));
        assert_eq!(Clock::stamp_of(b"short"), None);
        assert_eq!(Clock::stamp_of(b"0000000000000005"), Some(5));
        assert_eq!(Clock::stamp_of(b"not a number at all"), None);
    }
}
