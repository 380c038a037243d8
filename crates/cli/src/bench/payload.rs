//! Message bodies that carry their own send time, so a receiver in the same process can tell a
//! message's delivery latency from the body alone, whatever system carried it.
//!
//! A body is 16 decimal digits (microseconds since the run's [`Clock`] started) followed by `x`
//! padding up to the requested size.

use std::time::{Duration, Instant};

/// Digits of the time stamp at the start of every body.
pub const STAMP_LEN: usize = 16;

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
        let mut s = format!("{us:016}");
        if bytes > s.len() {
            s.extend(std::iter::repeat_n('x', bytes - s.len()));
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

    /// Microseconds from the body's stamp to now; `None` if the body carries no stamp.
    pub fn age_us(&self, body: &[u8]) -> Option<u64> {
        Some(self.now_us().saturating_sub(Self::stamp_of(body)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_the_size_asked_and_give_back_their_age() {
        let c = Clock::new();
        let b = c.body_at(5, 100);
        assert_eq!(b.len(), 100);
        assert!(b.starts_with("0000000000000005x"));
        assert!(c.age_us(b.as_bytes()).unwrap() <= c.now_us());
        assert_eq!(Clock::stamp_of(b.as_bytes()), Some(5));
        assert_eq!(c.body_at(7, 4).len(), STAMP_LEN);
        assert_eq!(Clock::stamp_of(b"short"), None);
        assert_eq!(c.age_us(b"short"), None);
        assert_eq!(c.age_us(b"not a number at all"), None);
    }
}
