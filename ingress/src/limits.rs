//! Admission control with governor, each refusal a `429` with `Retry-After`:
//! - purchases: one limiter for the whole process (the rate the pipeline is
//!   sized for) and one per buyer (no single client takes the queue);
//! - the buyers' API: one per client address (behind the deployment's own
//!   proxies, the address they forwarded for), so one network cannot take
//!   the intake whatever tokens it holds;
//! - waiting rooms: one per buyer for joins, status and challenges (a bot
//!   hammering with one token), and one per event for joins;
//! - order actions (payments, cancels, the provider's webhooks): a budget of
//!   their own, so a purchase flood never sheds them.
//!
//! The keyed maps are pruned on a timer, so a flood of distinct buyers,
//! addresses or events cannot grow them without bound.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio_util::sync::CancellationToken;

pub struct Limits {
    admission: DefaultDirectRateLimiter,
    per_user: DefaultKeyedRateLimiter<String>,
    room_per_user: DefaultKeyedRateLimiter<String>,
    per_ip: DefaultKeyedRateLimiter<IpAddr>,
    joins_per_event: DefaultKeyedRateLimiter<u64>,
    order_actions: DefaultDirectRateLimiter,
    clock: DefaultClock,
}

/// The rates and bursts of every limiter, per second.
#[derive(Debug, Clone, Copy)]
pub struct Rates {
    pub admit: (u32, u32),
    pub user: (u32, u32),
    pub room_user: (u32, u32),
    pub ip: (u32, u32),
    pub joins_per_event: (u32, u32),
    pub order_actions: (u32, u32),
}

impl Rates {
    /// The same generous rate everywhere but where a test sets its own.
    pub fn all(per_sec: u32, burst: u32) -> Self {
        let r = (per_sec, burst);
        Rates { admit: r, user: r, room_user: r, ip: r, joins_per_event: r, order_actions: r }
    }
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
    pub fn new(rates: Rates) -> Self {
        let q = |(per_sec, burst): (u32, u32)| quota(per_sec, burst);
        Self {
            admission: RateLimiter::direct(q(rates.admit)),
            per_user: RateLimiter::keyed(q(rates.user)),
            room_per_user: RateLimiter::keyed(q(rates.room_user)),
            per_ip: RateLimiter::keyed(q(rates.ip)),
            joins_per_event: RateLimiter::keyed(q(rates.joins_per_event)),
            order_actions: RateLimiter::direct(q(rates.order_actions)),
            clock: DefaultClock::default(),
        }
    }

    fn refused(&self, not_until: governor::NotUntil<<DefaultClock as Clock>::Instant>) -> Refused {
        Refused { retry_after_secs: not_until.wait_time_from(self.clock.now()).as_secs() + 1 }
    }

    /// A purchase. Checks the buyer's own limit first, so one noisy buyer
    /// does not burn the shared admission budget.
    pub fn admit(&self, user_id: &str) -> Result<(), Refused> {
        self.per_user.check_key(&user_id.to_owned()).map_err(|nu| self.refused(nu))?;
        self.admission.check().map_err(|nu| self.refused(nu))
    }

    /// A buyer's waiting-room request; for a join, also the event's joins.
    pub fn room(&self, user_id: &str, joining: Option<u64>) -> Result<(), Refused> {
        self.room_per_user.check_key(&user_id.to_owned()).map_err(|nu| self.refused(nu))?;
        match joining {
            Some(event_id) => self.joins_per_event.check_key(&event_id).map_err(|nu| self.refused(nu)),
            None => Ok(()),
        }
    }

    /// A request to the buyers' API from `ip`.
    pub fn ip(&self, ip: IpAddr) -> Result<(), Refused> {
        self.per_ip.check_key(&ip).map_err(|nu| self.refused(nu))
    }

    /// A payment, a cancel or a provider's webhook.
    pub fn order_action(&self) -> Result<(), Refused> {
        self.order_actions.check().map_err(|nu| self.refused(nu))
    }

    /// Drops keyed state that no longer limits anyone.
    pub fn prune(&self) {
        self.per_user.retain_recent();
        self.per_user.shrink_to_fit();
        self.room_per_user.retain_recent();
        self.room_per_user.shrink_to_fit();
        self.per_ip.retain_recent();
        self.per_ip.shrink_to_fit();
        self.joins_per_event.retain_recent();
        self.joins_per_event.shrink_to_fit();
    }

    pub fn tracked_users(&self) -> usize {
        self.per_user.len()
    }

    pub fn tracked_addresses(&self) -> usize {
        self.per_ip.len()
    }
}

/// Prunes `limits` every `every` until shutdown.
pub async fn prune_periodically(limits: std::sync::Arc<Limits>, every: Duration, shutdown: CancellationToken) {
    dropline::shutdown::every(every, &shutdown, || async { limits.prune() }).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buyer_past_their_burst_is_refused_with_a_retry_hint() {
        let limits = Limits::new(Rates { user: (1, 2), ..Rates::all(1000, 1000) });
        assert!(limits.admit("a").is_ok());
        assert!(limits.admit("a").is_ok());
        let refused = limits.admit("a").unwrap_err();
        assert!(refused.retry_after_secs >= 1);
        // Another buyer is not affected.
        assert!(limits.admit("b").is_ok());
    }

    #[test]
    fn the_shared_budget_caps_everyone() {
        let limits = Limits::new(Rates { admit: (1, 3), ..Rates::all(100, 100) });
        for user in ["a", "b", "c"] {
            assert!(limits.admit(user).is_ok());
        }
        assert!(limits.admit("d").is_err());
    }

    #[test]
    fn room_requests_have_their_own_budgets_per_buyer_and_joins_per_event() {
        let limits = Limits::new(Rates { room_user: (1, 2), joins_per_event: (1, 3), ..Rates::all(1000, 1000) });
        assert!(limits.room("bot", None).is_ok());
        assert!(limits.room("bot", Some(1)).is_ok());
        assert!(limits.room("bot", None).is_err(), "one buyer hammering");
        assert!(limits.admit("bot").is_ok(), "purchases keep their own budget");
        assert!(limits.room("a", Some(1)).is_ok());
        assert!(limits.room("b", Some(1)).is_ok());
        assert!(limits.room("c", Some(1)).is_err(), "the event's joins");
        assert!(limits.room("c", Some(2)).is_ok(), "another event's are apart");
    }

    #[test]
    fn order_actions_are_not_shed_by_a_purchase_flood() {
        let limits = Limits::new(Rates { admit: (1, 1), order_actions: (1000, 1000), ..Rates::all(1000, 1000) });
        assert!(limits.admit("a").is_ok());
        assert!(limits.admit("b").is_err());
        for _ in 0..100 {
            assert!(limits.order_action().is_ok());
        }
    }

    #[test]
    fn pruning_forgets_idle_buyers() {
        let limits = Limits::new(Rates::all(1000, 1000));
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
