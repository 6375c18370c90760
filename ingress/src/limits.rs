//! Admission control with governor: one limiter for the whole process (the
//! rate the pipeline is sized for) and one per buyer (no single client takes
//! the queue). The per-buyer map is pruned on a timer, so a flood of distinct
//! users cannot grow it without bound.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio_util::sync::CancellationToken;

pub struct Limits {
    admission: DefaultDirectRateLimiter,
    per_user: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

/// Refused: retry after this many seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub retry_after_secs: u64,
}

fn quota(per_sec: u32, burst: u32) -> Quota {
    let rate = NonZeroU32::new(per_sec).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(rate).allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN))
}

impl Limits {
    pub fn new(admit_per_sec: u32, admit_burst: u32, user_per_sec: u32, user_burst: u32) -> Self {
        Self {
            admission: RateLimiter::direct(quota(admit_per_sec, admit_burst)),
            per_user: RateLimiter::keyed(quota(user_per_sec, user_burst)),
            clock: DefaultClock::default(),
        }
    }

    /// Checks the buyer's own limit first, so one noisy buyer does not burn
    /// the shared admission budget.
    pub fn admit(&self, user_id: &str) -> Result<(), Refused> {
        let now = self.clock.now();
        let refused = |wait: Duration| Refused { retry_after_secs: wait.as_secs() + 1 };
        self.per_user.check_key(&user_id.to_owned()).map_err(|nu| refused(nu.wait_time_from(now)))?;
        self.admission.check().map_err(|nu| refused(nu.wait_time_from(now)))
    }

    /// Drops per-buyer state that no longer limits anyone.
    pub fn prune(&self) {
        self.per_user.retain_recent();
        self.per_user.shrink_to_fit();
    }

    pub fn tracked_users(&self) -> usize {
        self.per_user.len()
    }
}

/// Prunes `limits` every `every` until shutdown.
pub async fn prune_periodically(limits: std::sync::Arc<Limits>, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => limits.prune(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buyer_past_their_burst_is_refused_with_a_retry_hint() {
        let limits = Limits::new(1000, 1000, 1, 2);
        assert!(limits.admit("a").is_ok());
        assert!(limits.admit("a").is_ok());
        let refused = limits.admit("a").unwrap_err();
        assert!(refused.retry_after_secs >= 1);
        // Another buyer is not affected.
        assert!(limits.admit("b").is_ok());
    }

    #[test]
    fn the_shared_budget_caps_everyone() {
        let limits = Limits::new(1, 3, 100, 100);
        for user in ["a", "b", "c"] {
            assert!(limits.admit(user).is_ok());
        }
        assert!(limits.admit("d").is_err());
    }

    #[test]
    fn pruning_forgets_idle_buyers() {
        let limits = Limits::new(1000, 1000, 1000, 1000);
        limits.admit("a").unwrap();
        assert_eq!(limits.tracked_users(), 1);
        // A buyer whose bucket refilled is indistinguishable from a new one;
        // retain_recent drops them. At 1000/s that takes a millisecond.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while limits.tracked_users() > 0 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
            limits.prune();
        }
        assert_eq!(limits.tracked_users(), 0);
    }
}
