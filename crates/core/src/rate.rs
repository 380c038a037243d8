//! Per-user token bucket for the send rate limit. Time comes in as milliseconds from the caller.

#[derive(Clone, Debug)]
pub struct TokenBucket {
    tokens: f64,
    last_ms: u64,
}

impl TokenBucket {
    pub fn new(burst: f64, now_ms: u64) -> Self {
        TokenBucket {
            tokens: burst,
            last_ms: now_ms,
        }
    }

    /// Takes one token, or says how many milliseconds until one is available.
    pub fn take(&mut self, rate_per_sec: f64, burst: f64, now_ms: u64) -> Result<(), u64> {
        if rate_per_sec <= 0.0 {
            return Ok(());
        }
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64 / 1000.0;
        self.last_ms = self.last_ms.max(now_ms);
        self.tokens = (self.tokens + elapsed * rate_per_sec).min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - self.tokens) / rate_per_sec * 1000.0;
            Err(wait.ceil().max(1.0) as u64)
        }
    }

    /// Whether the bucket has refilled to `burst` by `now_ms` (a new bucket would be the same).
    pub fn is_full(&self, rate_per_sec: f64, burst: f64, now_ms: u64) -> bool {
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64 / 1000.0;
        self.tokens + elapsed * rate_per_sec >= burst
    }

    /// Returns a token taken for a send that was not taken after all.
    pub fn give_back(&mut self, burst: f64) {
        self.tokens = (self.tokens + 1.0).min(burst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_limits_and_refills() {
        let mut b = TokenBucket::new(2.0, 0);
        assert!(b.take(10.0, 2.0, 0).is_ok());
        assert!(b.take(10.0, 2.0, 0).is_ok());
        let wait = b.take(10.0, 2.0, 0).unwrap_err();
        assert_eq!(wait, 100);
        assert!(b.take(10.0, 2.0, 100).is_ok());
        // A clock that goes backwards never adds tokens.
        assert!(b.take(10.0, 2.0, 50).is_err());
        // Full again (as a new bucket would be) once it has refilled to the burst.
        assert!(!b.is_full(10.0, 2.0, 150));
        assert!(b.is_full(10.0, 2.0, 300));
    }
}
