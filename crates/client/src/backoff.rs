//! Exponential backoff with jitter, for resending messages and for reconnecting.
//!
//! Defaults follow the seeds: 500 ms first, doubling, capped at 60 s, each delay randomised by
//! ±30 % so that many clients that lost the same server do not come back in lockstep.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    pub initial_ms: u64,
    pub factor: f64,
    pub max_ms: u64,
    /// Each delay is multiplied by a random factor in `1 ± jitter`.
    pub jitter: f64,
    /// Attempts (the first send included) before a message is given up as failed; `None`
    /// retries for ever (used for reconnecting).
    pub max_attempts: Option<u32>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_ms: 500,
            factor: 2.0,
            max_ms: 60_000,
            jitter: 0.3,
            max_attempts: Some(10),
        }
    }
}

impl RetryPolicy {
    /// The reconnect policy: same curve, never gives up.
    pub fn reconnect() -> Self {
        RetryPolicy {
            max_attempts: None,
            ..RetryPolicy::default()
        }
    }

    /// The delay before attempt `attempt + 1`, after `attempt` attempts (1-based), given a
    /// uniform random number `unit` in `[0, 1)`.
    pub fn delay_ms(&self, attempt: u32, unit: f64) -> u64 {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let base = (self.initial_ms as f64 * self.factor.powi(exp)).min(self.max_ms as f64);
        let spread = 1.0 + self.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        (base * spread).max(0.0).round() as u64
    }

    /// Whether another attempt is allowed after `attempt` attempts.
    pub fn may_retry(&self, attempt: u32) -> bool {
        self.max_attempts.is_none_or(|m| attempt < m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_doubles_caps_and_jitters() {
        let p = RetryPolicy::default();
        let mid: Vec<u64> = (1..=10).map(|a| p.delay_ms(a, 0.5)).collect();
        assert_eq!(
            mid,
            vec![500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000]
        );
        assert_eq!(p.delay_ms(1, 0.0), 350);
        assert_eq!(p.delay_ms(1, 0.999_999), 650);
        assert_eq!(p.delay_ms(9, 0.0), 42_000);
        assert!(p.may_retry(9));
        assert!(!p.may_retry(10));
        assert!(RetryPolicy::reconnect().may_retry(u32::MAX));
    }
}
