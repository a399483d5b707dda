//! Retry delays: exponential backoff with jitter, so many failing deliveries do not retry in step.

use std::time::Duration;

use rand::Rng;

#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// Delay before the first retry.
    pub first: Duration,
    /// Longest delay, whatever the attempt.
    pub max: Duration,
}

impl Backoff {
    /// Delay before retry number `retry` (1 = the first retry): `first × 2^(retry−1)`, at most
    /// `max`, then scaled by a random factor in [0.8, 1.2).
    pub fn delay(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(30);
        let base = self.first.saturating_mul(1u32 << doublings).min(self.max);
        base.mul_f64(rand::rng().random_range(0.8..1.2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_within_the_jitter_and_stop_at_the_cap() {
        let b = Backoff { first: Duration::from_secs(1), max: Duration::from_secs(10) };
        for _ in 0..200 {
            let d1 = b.delay(1).as_secs_f64();
            let d3 = b.delay(3).as_secs_f64();
            let d9 = b.delay(9).as_secs_f64();
            assert!((0.8..1.2).contains(&d1), "{d1}");
            assert!((3.2..4.8).contains(&d3), "{d3}");
            assert!((8.0..12.0).contains(&d9), "{d9}");
        }
        assert!(b.delay(u32::MAX) <= Duration::from_secs(12), "no overflow on huge attempt numbers");
    }

    #[test]
    fn jitter_spreads_retries() {
        let b = Backoff { first: Duration::from_secs(1), max: Duration::from_secs(10) };
        let delays: std::collections::HashSet<_> = (0..20).map(|_| b.delay(2)).collect();
        assert!(delays.len() > 10, "delays should differ: {delays:?}");
    }
}
