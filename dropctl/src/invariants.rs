//! The invariants of a sale, checked against the two stores after the
//! pipeline went quiet: Redis (the ledger) and MySQL (the record).

use std::fmt;
use std::time::Duration;

use anyhow::Context;
use dropline::stock::{Ledger, StockLevels};
use sqlx::MySqlPool;

/// One checked invariant.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// Every check of one event.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub event_id: u64,
    pub redis: StockLevels,
    pub mysql: OrderCounts,
    pub checks: Vec<Check>,
}

impl Verdict {
    pub fn all_hold(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.checks {
            writeln!(f, "  [{}] {:<44} {}", if c.ok { "ok" } else { "FAIL" }, c.name, c.detail)?;
        }
        Ok(())
    }
}

/// Units per order state in MySQL, and what else the checks read there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderCounts {
    pub capacity: u64,
    pub per_user_limit: u64,
    pub held: u64,
    pub paid: u64,
    pub cancelled: u64,
    pub expired: u64,
    pub voided: u64,
    pub intents: u64,
    pub captured_payments: u64,
    pub refunds: u64,
    pub paid_orders: u64,
    pub paid_orders_without_one_capture: u64,
    pub captures_on_unpaid_orders: u64,
    pub max_units_per_user: u64,
    pub overdue_holds: u64,
    /// Live orders that do not own exactly their quantity of units.
    pub live_orders_with_wrong_units: u64,
    /// Unit rows numbered beyond the event's capacity.
    pub units_beyond_capacity: u64,
}

pub async fn mysql_counts(db: &MySqlPool, event_id: u64, grace: Duration) -> anyhow::Result<OrderCounts> {
    let (capacity, per_user_limit): (u32, u32) =
        sqlx::query_as("SELECT capacity, per_user_limit FROM events WHERE id = ?")
            .bind(event_id)
            .fetch_optional(db)
            .await?
            .context("event not in MySQL")?;
    let mut c = OrderCounts { capacity: capacity.into(), per_user_limit: per_user_limit.into(), ..Default::default() };
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT CAST(state AS CHAR), CAST(SUM(quantity) AS SIGNED) FROM orders WHERE event_id = ? GROUP BY state",
    )
    .bind(event_id)
    .fetch_all(db)
    .await?;
    for (state, units) in rows {
        let units = units as u64;
        match state.as_str() {
            "held" => c.held = units,
            "paid" => c.paid = units,
            "cancelled" => c.cancelled = units,
            "expired" => c.expired = units,
            "voided" => c.voided = units,
            _ => {}
        }
    }
    let one = |sql: &'static str| {
        let db = db.clone();
        async move {
            let (n,): (i64,) = sqlx::query_as(sql).bind(event_id).fetch_one(&db).await?;
            anyhow::Ok(n as u64)
        }
    };
    c.intents = one("SELECT COUNT(*) FROM intents WHERE event_id = ?").await?;
    c.paid_orders = one("SELECT COUNT(*) FROM orders WHERE event_id = ? AND state = 'paid'").await?;
    c.captured_payments = one("SELECT COUNT(*) FROM payments p JOIN orders o ON o.order_id = p.order_id \
         WHERE o.event_id = ? AND p.disposition = 'captured'")
    .await?;
    c.refunds = one("SELECT COUNT(*) FROM payments p JOIN orders o ON o.order_id = p.order_id \
         WHERE o.event_id = ? AND p.disposition = 'refund_required'")
    .await?;
    c.paid_orders_without_one_capture =
        one("SELECT COUNT(*) FROM orders o WHERE o.event_id = ? AND o.state = 'paid' AND \
         (SELECT COUNT(*) FROM payments p WHERE p.order_id = o.order_id AND p.disposition = 'captured') <> 1")
        .await?;
    c.captures_on_unpaid_orders = one("SELECT COUNT(*) FROM payments p JOIN orders o ON o.order_id = p.order_id \
         WHERE o.event_id = ? AND p.disposition = 'captured' AND o.state <> 'paid'")
    .await?;
    c.max_units_per_user =
        one("SELECT COALESCE(MAX(units), 0) FROM (SELECT CAST(SUM(quantity) AS SIGNED) AS units FROM orders \
         WHERE event_id = ? AND state IN ('held', 'paid') GROUP BY user_id) per_user")
        .await?;
    c.live_orders_with_wrong_units = one("SELECT COUNT(*) FROM orders o WHERE o.event_id = ? \
         AND o.state IN ('held', 'paid') AND o.quantity <> (SELECT COUNT(*) FROM order_units u \
         WHERE u.event_id = o.event_id AND u.order_id = o.order_id)")
    .await?;
    let (beyond,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM order_units WHERE event_id = ? AND unit_no > ?")
        .bind(event_id)
        .bind(capacity)
        .fetch_one(db)
        .await?;
    c.units_beyond_capacity = beyond as u64;
    let (overdue,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM orders WHERE event_id = ? AND state = 'held' AND expires_at < ?")
            .bind(event_id)
            .bind(chrono::Utc::now() - grace)
            .fetch_one(db)
            .await?;
    c.overdue_holds = overdue as u64;
    Ok(c)
}

fn check(name: &'static str, ok: bool, detail: String) -> Check {
    Check { name, ok, detail }
}

/// Checks an event. `accepted` is the number of purchases the ingress
/// answered 202, when the caller knows it.
pub async fn verify(
    db: &MySqlPool,
    ledger: &Ledger,
    event_id: u64,
    accepted: Option<u64>,
    grace: Duration,
) -> anyhow::Result<Verdict> {
    let redis = ledger.levels(event_id).await?.context("the event has no ledger in Redis")?;
    let m = mysql_counts(db, event_id, grace).await?;
    let mut checks = vec![
        check(
            "no oversell (MySQL held + paid <= capacity)",
            m.held + m.paid <= m.capacity,
            format!("{} + {} <= {}", m.held, m.paid, m.capacity),
        ),
        check(
            "no unit sold twice (one live order per unit)",
            m.live_orders_with_wrong_units == 0 && m.units_beyond_capacity == 0,
            format!(
                "{} live orders without exactly their units, {} units beyond capacity",
                m.live_orders_with_wrong_units, m.units_beyond_capacity
            ),
        ),
        check(
            "conservation in Redis",
            redis.is_conserved() && redis.capacity == m.capacity,
            format!("available {} + held {} + sold {} = {}", redis.available, redis.held, redis.sold, redis.capacity),
        ),
        check(
            "conservation in MySQL (vs Redis available)",
            redis.available + m.held + m.paid == m.capacity,
            format!("available {} + held {} + paid {} = {}", redis.available, m.held, m.paid, m.capacity),
        ),
        check(
            "Redis and MySQL agree",
            redis.held == m.held && redis.sold == m.paid,
            format!("held {}/{}, sold {}/{}", redis.held, m.held, redis.sold, m.paid),
        ),
        check(
            "each paid order has exactly one captured payment",
            m.paid_orders_without_one_capture == 0 && m.captures_on_unpaid_orders == 0,
            format!("{} paid orders, {} captures, {} refunds to make", m.paid_orders, m.captured_payments, m.refunds),
        ),
        check(
            "holds end by their deadline",
            m.overdue_holds == 0,
            format!("{} held past deadline + {}s", m.overdue_holds, grace.as_secs()),
        ),
        check(
            "per-user limit",
            m.max_units_per_user <= m.per_user_limit,
            format!("max {} units per buyer, limit {}", m.max_units_per_user, m.per_user_limit),
        ),
    ];
    if let Some(accepted) = accepted {
        checks.push(check(
            "every accepted purchase has one outcome",
            m.intents == accepted,
            format!("{} decided of {accepted} accepted", m.intents),
        ));
    }
    Ok(Verdict { event_id, redis, mysql: m, checks })
}

/// Waits until Redis and MySQL agree and no hold is left (and, when the
/// caller knows them, every accepted purchase is decided and every
/// acknowledged payment recorded), or `timeout`. Returns whether they
/// settled.
pub async fn wait_quiet(
    db: &MySqlPool,
    ledger: &Ledger,
    event_id: u64,
    accepted: Option<u64>,
    payments: Option<u64>,
    timeout: Duration,
) -> anyhow::Result<bool> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let redis = ledger.levels(event_id).await?.unwrap_or_default();
        // MySQL down for a moment (a restart) is one more way of not being
        // quiet yet: keep polling until the deadline.
        match mysql_counts(db, event_id, Duration::ZERO).await {
            Ok(m) => {
                let quiet = redis.held == 0
                    && m.held == 0
                    && redis.sold == m.paid
                    && accepted.is_none_or(|a| m.intents == a)
                    && payments.is_none_or(|p| m.captured_payments + m.refunds == p);
                if quiet {
                    return Ok(true);
                }
            }
            Err(e) if e.downcast_ref().is_some_and(dropline::db::is_transient) => {
                tracing::warn!(error = %format!("{e:#}"), event_id, "mysql unavailable while waiting for quiet; polling on");
            }
            Err(e) => return Err(e),
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
