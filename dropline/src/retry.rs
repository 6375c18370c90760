//! How retried work is spaced: the notifier's webhooks, the settler's
//! refunds.

use std::time::Duration;

use rand::Rng;

/// How attempts at one piece of work are spaced, and how many there are.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    /// Attempts before the work is given up on (dead-lettered).
    pub attempts: u32,
}

impl Backoff {
    /// The wait after the `failed`-th failed attempt (from 1): the base
    /// doubled each time, capped, then a random time in its upper half, so
    /// work that failed together does not come back together.
    pub fn after(&self, failed: u32) -> Duration {
        let doubled = self.base.saturating_mul(1u32 << failed.saturating_sub(1).min(20));
        let full = doubled.min(self.max).as_millis() as u64;
        Duration::from_millis(rand::rng().random_range(full / 2..=full))
    }

    /// Whether another attempt follows the `failed`-th failure.
    pub fn retries_after(&self, failed: u32) -> bool {
        failed < self.attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_in_the_upper_half() {
        let b = Backoff { base: Duration::from_millis(100), max: Duration::from_secs(1), attempts: 5 };
        for _ in 0..50 {
            let first = b.after(1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100), "{first:?}");
            let third = b.after(3);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400), "{third:?}");
            let late = b.after(40);
            assert!(late >= Duration::from_millis(500) && late <= Duration::from_secs(1), "{late:?}");
        }
        assert!(b.retries_after(4));
        assert!(!b.retries_after(5));
    }
}
