//! Per-source token buckets, for handshake floods.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Token buckets keyed by source; `rate` tokens per second, at most `burst`.
#[derive(Debug)]
pub struct RateLimiter<K> {
    rate: f64,
    burst: f64,
    buckets: HashMap<K, (f64, Instant)>,
    max_entries: usize,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// A limiter allowing `rate` per second with bursts of `burst`.
    pub fn new(rate: u32, burst: u32) -> Self {
        RateLimiter {
            rate: rate as f64,
            burst: burst as f64,
            buckets: HashMap::new(),
            max_entries: 65_536,
        }
    }

    /// Takes a token for `key` if one is available.
    pub fn allow(&mut self, key: &K, now: Instant) -> bool {
        self.allow_n(key, 1, now)
    }

    /// Takes `n` tokens (bytes, say) for `key` if that many are available.
    pub fn allow_n(&mut self, key: &K, n: u32, now: Instant) -> bool {
        let n = n as f64;
        if self.buckets.len() >= self.max_entries {
            // Forget sources that have been quiet long enough to be full.
            let full_after = Duration::from_secs_f64(self.burst / self.rate);
            self.buckets
                .retain(|_, (_, t)| now.saturating_duration_since(*t) < full_after);
            if self.buckets.len() >= self.max_entries {
                return false;
            }
        }
        let (tokens, last) = self.buckets.entry(key.clone()).or_insert((self.burst, now));
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * self.rate).min(self.burst);
        *last = now;
        if *tokens >= n {
            *tokens -= n;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let mut r = RateLimiter::new(20, 5);
        let t = Instant::now();
        let allowed = (0..10).filter(|_| r.allow(&1u32, t)).count();
        assert_eq!(allowed, 5, "burst of 5");
        assert!(!r.allow(&1, t));
        assert!(r.allow(&2, t), "other sources unaffected");
        // 20/s: one token every 50 ms.
        assert!(r.allow(&1, t + Duration::from_millis(50)));
        assert!(!r.allow(&1, t + Duration::from_millis(60)));
        let later = t + Duration::from_secs(1);
        let allowed = (0..10).filter(|_| r.allow(&1u32, later)).count();
        assert_eq!(allowed, 5, "refills to the burst, not beyond");
    }

    #[test]
    fn byte_budget() {
        let mut r = RateLimiter::new(1000, 1500);
        let t = Instant::now();
        assert!(r.allow_n(&1u8, 1400, t));
        assert!(!r.allow_n(&1u8, 1400, t), "budget spent");
        assert!(r.allow_n(&1u8, 1400, t + Duration::from_millis(1300)));
    }
}
