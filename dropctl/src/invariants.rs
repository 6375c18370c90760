//! The invariants of a sale, checked against the two stores: Redis (the
//! ledger) and MySQL (the record). [`verify`] returns one [`Check`] per
//! [`Row`]; the printers and the tests read those, never the printed text.
//!
//! Every row compares facts the pipeline could get wrong, and each has a test
//! in `dropctl/tests/invariants.rs` that breaks it on purpose and sees it fail.
//! When to check (after the pipeline went quiet) is [`crate::quiet`]'s job,
//! and it never waits for a row's own condition.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::LazyLock;
use std::time::Duration;

use anyhow::Context;
use dropline::messages::OrderState;
use dropline::redis_pool::redis;
use dropline::stock::{Hold, Ledger, StockLevels};
use sqlx::MySqlPool;
use uuid::Uuid;

use crate::record::{self, Count};

/// One row of the invariant table. The id is stable: tests and tools match
/// on it, whatever the printed title says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Row {
    /// MySQL's live units (held + paid) fit in the capacity plus the
    /// oversell allowance; what went beyond the capacity is shown as such.
    NoOversell,
    /// Every live order owns exactly its quantity of units, all numbered
    /// within the capacity and allowance.
    UnitOwners,
    /// Redis: available + held + sold = capacity + allowance, both as the
    /// record has them, and the available count matches the units it has
    /// left to hand out.
    RedisConserved,
    /// Redis' counters are what its holds add up to, and no unit it has
    /// free again belongs to a live hold or is free twice: a hold released
    /// twice breaks both.
    ReleasedOnce,
    /// Every order is in the same state (held, paid or ended) in both stores.
    StoresAgree,
    /// Each paid order has exactly one captured payment.
    PaidOrdersCaptured,
    /// A payment for an order that is not paid is recorded for refund.
    RefundsDue,
    /// Every payment row belongs to an order in the record.
    PaymentsHaveOrders,
    /// Every payment the provider acknowledged is recorded (when the caller
    /// counted them).
    PaymentsRecorded,
    /// Expired holds ended within the grace of their deadline, and no hold
    /// is still held past deadline + grace.
    HoldsOnTime,
    /// No buyer has more live units than the event's limit.
    PerUserLimit,
    /// Every purchase the ingress accepted has its decision in the record.
    AcceptedDecided,
    /// Every state an order reached is a change in the outbox, once, and
    /// every change has exactly one notification, delivered or
    /// dead-lettered; none announces a change that was not made.
    ChangesNotified,
    /// Every payment recorded for refund has one refund, made by the
    /// provider under its own refund id, and no other payment has one;
    /// asked of the provider (when the caller names it), each is its one
    /// refund there, and no other refund of the event's payments is.
    RefundsMade,
}

impl Row {
    /// The stable id, for tests, tools and logs.
    pub fn id(self) -> &'static str {
        match self {
            Row::NoOversell => "no_oversell",
            Row::UnitOwners => "unit_owners",
            Row::RedisConserved => "redis_conserved",
            Row::ReleasedOnce => "released_once",
            Row::StoresAgree => "stores_agree",
            Row::PaidOrdersCaptured => "paid_orders_captured",
            Row::RefundsDue => "refunds_due",
            Row::PaymentsHaveOrders => "payments_have_orders",
            Row::PaymentsRecorded => "payments_recorded",
            Row::HoldsOnTime => "holds_on_time",
            Row::PerUserLimit => "per_user_limit",
            Row::AcceptedDecided => "accepted_decided",
            Row::ChangesNotified => "changes_notified",
            Row::RefundsMade => "refunds_made",
        }
    }

    /// What the printed table calls it.
    pub fn title(self) -> &'static str {
        match self {
            Row::NoOversell => "capacity + oversell allowance bound what sold",
            Row::UnitOwners => "no unit sold twice (one live order per unit)",
            Row::RedisConserved => "conservation in Redis",
            Row::ReleasedOnce => "each hold released once (Redis)",
            Row::StoresAgree => "Redis and MySQL agree on every order",
            Row::PaidOrdersCaptured => "each paid order has exactly one captured payment",
            Row::RefundsDue => "payments for unpaid orders are refunds",
            Row::PaymentsHaveOrders => "every payment has its order",
            Row::PaymentsRecorded => "every acknowledged payment is recorded",
            Row::HoldsOnTime => "holds end by their deadline",
            Row::PerUserLimit => "per-user limit",
            Row::AcceptedDecided => "every accepted purchase has one outcome",
            Row::ChangesNotified => "every order change notified once",
            Row::RefundsMade => "each refund made once, by the provider",
        }
    }
}

/// One checked invariant.
#[derive(Debug, Clone)]
pub struct Check {
    pub row: Row,
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

    /// The rows that failed, in table order.
    pub fn failing(&self) -> Vec<Row> {
        self.checks.iter().filter(|c| !c.ok).map(|c| c.row).collect()
    }

    pub fn check(&self, row: Row) -> Option<&Check> {
        self.checks.iter().find(|c| c.row == row)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.checks {
            let status = if c.ok { "[ok]" } else { "[FAIL]" };
            writeln!(f, "  {status:<6} {:<48} {}", c.row.title(), c.detail)?;
        }
        Ok(())
    }
}

/// What the caller knows beyond the two stores, and how strict to be.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Purchases the caller saw accepted (202): the record must have exactly
    /// this many decisions. The ingress' own acceptance records are checked
    /// one by one either way.
    pub accepted: Option<u64>,
    /// Payments the provider was told about (captured or to refund): each
    /// must be a payment row.
    pub acknowledged_payments: Option<u64>,
    /// How long past its deadline a hold may end (or still be held).
    pub grace: Duration,
    /// The payment provider's API, whose refunds are compared with the
    /// record's; none: the record's side only.
    pub provider: Option<String>,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self { accepted: None, acknowledged_payments: None, grace: production_grace(), provider: None }
    }
}

/// The settler's default overdue grace (`DROPLINE_SETTLER_OVERDUE_GRACE_SECS`):
/// in production a hold still held this long past its deadline is ended by
/// the reconciler, so a release later than this means its expiry was lost.
/// Read from the settler's own flag definition, so the two cannot drift.
pub fn production_grace() -> Duration {
    static GRACE: LazyLock<Duration> = LazyLock::new(|| {
        use clap::CommandFactory;
        let settler = dropline_settler::SettlerConfig::command();
        let secs = settler
            .get_arguments()
            .find(|a| a.get_id() == "overdue_grace_secs")
            .and_then(|a| a.get_default_values().first()?.to_str()?.parse().ok())
            .expect("the settler's --overdue-grace-secs has a numeric default");
        Duration::from_secs(secs)
    });
    *GRACE
}

/// How late expired holds ended: (ended - deadline) over every expired
/// order of the event, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lateness {
    pub expired: u64,
    pub p50_ms: i64,
    pub p99_ms: i64,
    pub max_ms: i64,
}

impl Lateness {
    fn of(mut late_ms: Vec<i64>) -> Self {
        late_ms.sort_unstable();
        let at = |q: f64| {
            // Nearest rank: the smallest value with at least q of them at or below.
            let rank = ((q * late_ms.len() as f64).ceil() as usize).clamp(1, late_ms.len());
            late_ms[rank - 1]
        };
        if late_ms.is_empty() {
            return Self::default();
        }
        Self { expired: late_ms.len() as u64, p50_ms: at(0.50), p99_ms: at(0.99), max_ms: at(1.0) }
    }
}

/// Units per order state in MySQL, and what else the checks read there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderCounts {
    pub capacity: u64,
    /// Units the host accepts to sell beyond the capacity.
    pub oversell_allowance: u64,
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
    /// Payment rows (of any event: a payment row names no event) whose order
    /// is not in the record.
    pub payments_without_order: u64,
    pub max_units_per_user: u64,
    /// Holds still held past their deadline plus the grace, and the one
    /// most overdue (milliseconds past its deadline).
    pub overdue_holds: u64,
    pub most_overdue_ms: i64,
    pub lateness: Lateness,
    /// Live orders that do not own exactly their quantity of units.
    pub live_orders_with_wrong_units: u64,
    /// Unit rows numbered beyond the event's capacity and allowance.
    pub units_beyond_capacity: u64,
    /// Changes of the event's orders in the outbox, orders whose state is
    /// none of them, changes without a notification, notifications of no
    /// change, and changes whose webhook was dead-lettered.
    pub order_changes: u64,
    pub states_without_change: u64,
    pub changes_unnotified: u64,
    pub notifications_without_change: u64,
    pub changes_dead_lettered: u64,
    pub changes_repeated: u64,
    /// The event's refunds, those the provider has not confirmed, payments
    /// recorded for refund without one, and refunds recorded as made
    /// without the provider's id.
    pub refund_rows: u64,
    pub refunds_waiting: u64,
    pub payments_without_refund: u64,
    pub refunded_without_provider_id: u64,
    /// Refunds of payments not recorded for refund, and refunds missing
    /// their changes in the outbox.
    pub refunds_without_due: u64,
    pub refunds_without_change: u64,
    /// Payment steps (started, declined) without their change.
    pub payment_steps_without_change: u64,
}

impl OrderCounts {
    /// Every unit the event may sell: its capacity and allowance.
    pub fn sellable(&self) -> u64 {
        self.capacity + self.oversell_allowance
    }

    /// Live units beyond the capacity (inside the allowance, if the row
    /// holds).
    pub fn oversold(&self) -> u64 {
        (self.held + self.paid).saturating_sub(self.capacity)
    }
}

/// MySQL's counts for an event. `grace` decides which holds count as
/// overdue.
pub async fn mysql_counts(db: &MySqlPool, event_id: u64, grace: Duration) -> anyhow::Result<OrderCounts> {
    let (capacity, allowance, per_user_limit) =
        record::event_limits(db, event_id).await?.context("event not in MySQL")?;
    let mut c = OrderCounts {
        capacity: capacity.into(),
        oversell_allowance: allowance.into(),
        per_user_limit: per_user_limit.into(),
        ..Default::default()
    };
    for (state, units) in record::units_by_state(db, event_id).await? {
        let units = units as u64;
        match state {
            OrderState::Held => c.held = units,
            OrderState::Paid => c.paid = units,
            OrderState::Cancelled => c.cancelled = units,
            OrderState::Expired => c.expired = units,
            OrderState::Voided => c.voided = units,
        }
    }
    let count = |what| record::count(db, what, event_id);
    c.intents = count(Count::Intents).await?;
    c.paid_orders = count(Count::PaidOrders).await?;
    c.captured_payments = count(Count::CapturedPayments).await?;
    c.refunds = count(Count::Refunds).await?;
    c.paid_orders_without_one_capture = count(Count::PaidOrdersWithoutOneCapture).await?;
    c.captures_on_unpaid_orders = count(Count::CapturesOnUnpaidOrders).await?;
    c.payments_without_order = record::payments_without_order(db).await?;
    c.max_units_per_user = count(Count::MaxUnitsPerUser).await?;
    c.live_orders_with_wrong_units = count(Count::LiveOrdersWithWrongUnits).await?;
    c.units_beyond_capacity = record::units_beyond(db, event_id, c.sellable()).await?;
    c.order_changes = count(Count::OrderChanges).await?;
    c.states_without_change = count(Count::StatesWithoutChange).await?;
    c.changes_unnotified = count(Count::ChangesUnnotified).await?;
    c.notifications_without_change = count(Count::NotificationsWithoutChange).await?;
    c.changes_dead_lettered = count(Count::ChangesDeadLettered).await?;
    c.changes_repeated = count(Count::ChangesRepeated).await?;
    c.refund_rows = count(Count::RefundRows).await?;
    c.refunds_waiting = count(Count::RefundsWaiting).await?;
    c.payments_without_refund = count(Count::PaymentsWithoutRefund).await?;
    c.refunded_without_provider_id = count(Count::RefundedWithoutProviderId).await?;
    c.refunds_without_due = count(Count::RefundsWithoutDue).await?;
    c.refunds_without_change = count(Count::RefundsWithoutChange).await?;
    c.payment_steps_without_change = count(Count::PaymentStepsWithoutChange).await?;
    c.lateness = Lateness::of(record::expiry_lateness_ms(db, event_id).await?);
    let now = chrono::Utc::now();
    let (overdue, oldest) = record::held_past(db, event_id, now - grace).await?;
    c.overdue_holds = overdue as u64;
    c.most_overdue_ms = oldest.map_or(0, |t| (now - t).num_milliseconds());
    Ok(c)
}

/// Which bucket an order's state falls in, for comparing the stores: the
/// ways a hold ends are told apart by other rows.
fn bucket(state: OrderState) -> &'static str {
    match state {
        OrderState::Held => "held",
        OrderState::Paid => "paid",
        OrderState::Cancelled | OrderState::Expired | OrderState::Voided => "ended",
    }
}

/// What the two stores say about each order.
#[derive(Debug, Default)]
struct OrderStates {
    /// Orders whose bucket differs, or that only one store has.
    differ: u64,
    /// One example, for the detail.
    example: Option<String>,
}

async fn compare_orders(db: &MySqlPool, event_id: u64, ledger: &HashMap<Uuid, Hold>) -> anyhow::Result<OrderStates> {
    let rows = record::order_states(db, event_id).await?;
    let mut out = OrderStates::default();
    let mut seen = HashSet::with_capacity(rows.len());
    for (order, mysql) in rows {
        let id = Uuid::parse_str(&order).with_context(|| format!("order id {order:?}"))?;
        seen.insert(id);
        let redis = ledger.get(&id).map(|h| bucket(h.state));
        if redis != Some(bucket(mysql)) {
            out.differ += 1;
            out.example
                .get_or_insert_with(|| format!("{id}: MySQL {}, Redis {}", mysql.as_str(), redis.unwrap_or("absent")));
        }
    }
    for id in ledger.keys().filter(|id| !seen.contains(id)) {
        out.differ += 1;
        out.example.get_or_insert_with(|| format!("{id}: MySQL absent, Redis {}", bucket(ledger[id].state)));
    }
    Ok(out)
}

/// The intents the ingress answered 202 for this event (its acceptance
/// records in Redis, kept for the idempotency window) that have no decision
/// in the record.
async fn accepted_without_decision(
    db: &MySqlPool,
    ledger: &Ledger,
    event_id: u64,
) -> anyhow::Result<(u64, u64, Option<Uuid>)> {
    // The ingress' Idempotency-Key records (ingress/src/intents.rs): `st`
    // is `accepted` once the buyer was told 202.
    #[derive(serde::Deserialize)]
    struct KeyRecord {
        id: Uuid,
        e: u64,
        st: String,
    }
    let mut conn = ledger.pool().get().await?;
    let pattern = ledger.keys().idempotency_pattern();
    let keys = conn.keys_matching(&pattern).await?;
    let mut accepted = Vec::new();
    for chunk in keys.chunks(500) {
        let bodies: Vec<Option<String>> = redis::cmd("MGET").arg(chunk).query_async(&mut conn).await?;
        for body in bodies.into_iter().flatten() {
            let Ok(record) = serde_json::from_str::<KeyRecord>(&body) else { continue };
            if record.e == event_id && record.st == "accepted" {
                accepted.push(record.id);
            }
        }
    }
    let decided: HashSet<Uuid> =
        record::decided_intents(db, event_id).await?.into_iter().filter_map(|id| Uuid::parse_str(&id).ok()).collect();
    let missing: Vec<Uuid> = accepted.iter().filter(|id| !decided.contains(id)).copied().collect();
    Ok((accepted.len() as u64, missing.len() as u64, missing.first().copied()))
}

/// Redis' counters against its own holds and free units.
#[derive(Debug, Default)]
struct LedgerSelf {
    held_in_holds: u64,
    sold_in_holds: u64,
    free_twice: u64,
    free_but_live: u64,
}

async fn ledger_self(ledger: &Ledger, event_id: u64, holds: &HashMap<Uuid, Hold>) -> anyhow::Result<LedgerSelf> {
    let units = |state| holds.values().filter(|h| h.state == state).map(|h| u64::from(h.quantity)).sum();
    let mut out = LedgerSelf {
        held_in_holds: units(OrderState::Held),
        sold_in_holds: units(OrderState::Paid),
        ..Default::default()
    };
    let key = ledger.keys().event(event_id).free;
    let mut conn = ledger.pool().get().await?;
    let free: Vec<u32> = redis::cmd("LRANGE").arg(&key).arg(0).arg(-1).query_async(&mut conn).await?;
    let live: HashSet<u32> =
        holds.values().filter(|h| h.state.is_live()).flat_map(|h| h.units.iter().copied()).collect();
    let mut seen = HashSet::with_capacity(free.len());
    for unit in free {
        if !seen.insert(unit) {
            out.free_twice += 1;
        }
        if live.contains(&unit) {
            out.free_but_live += 1;
        }
    }
    Ok(out)
}

fn check(row: Row, ok: bool, detail: String) -> Check {
    Check { row, ok, detail }
}

/// Checks an event against both stores.
pub async fn verify(db: &MySqlPool, ledger: &Ledger, event_id: u64, options: &CheckOptions) -> anyhow::Result<Verdict> {
    let redis = ledger.levels(event_id).await?.context("the event has no ledger in Redis")?;
    let damage = ledger.damage(event_id).await?;
    let holds = ledger.holds(event_id).await?;
    let grace = options.grace;
    let m = mysql_counts(db, event_id, grace).await?;
    let own = ledger_self(ledger, event_id, &holds).await?;
    let orders = compare_orders(db, event_id, &holds).await?;
    let (accepted, undecided, example) = accepted_without_decision(db, ledger, event_id).await?;
    let late = &m.lateness;
    let mut checks = vec![
        check(
            Row::NoOversell,
            m.held + m.paid <= m.sellable(),
            format!(
                "{} + {} <= {} + allowance {}; {} oversold",
                m.held,
                m.paid,
                m.capacity,
                m.oversell_allowance,
                m.oversold()
            ),
        ),
        check(
            Row::UnitOwners,
            m.live_orders_with_wrong_units == 0 && m.units_beyond_capacity == 0,
            format!(
                "{} live orders without exactly their units, {} units beyond capacity and allowance",
                m.live_orders_with_wrong_units, m.units_beyond_capacity
            ),
        ),
        check(
            Row::RedisConserved,
            redis.is_conserved()
                && (redis.capacity, redis.allowance) == (m.capacity, m.oversell_allowance)
                && damage.is_none(),
            format!(
                "available {} + held {} + sold {} = {} + allowance {}{}",
                redis.available,
                redis.held,
                redis.sold,
                redis.capacity,
                redis.allowance,
                damage.map(|d| format!("; {d}")).unwrap_or_default()
            ),
        ),
        check(
            Row::ReleasedOnce,
            redis.held == own.held_in_holds
                && redis.sold == own.sold_in_holds
                && own.free_twice == 0
                && own.free_but_live == 0,
            format!(
                "counters held/sold {}/{}, its holds {}/{}; {} units free twice, {} free but held",
                redis.held, redis.sold, own.held_in_holds, own.sold_in_holds, own.free_twice, own.free_but_live
            ),
        ),
        check(
            Row::StoresAgree,
            orders.differ == 0,
            format!(
                "held {}/{}, sold {}/{}; {} orders differ{}",
                own.held_in_holds,
                m.held,
                own.sold_in_holds,
                m.paid,
                orders.differ,
                orders.example.map(|e| format!(" ({e})")).unwrap_or_default()
            ),
        ),
        check(
            Row::PaidOrdersCaptured,
            m.paid_orders_without_one_capture == 0,
            format!(
                "{} paid orders, {} captures, {} without exactly one",
                m.paid_orders, m.captured_payments, m.paid_orders_without_one_capture
            ),
        ),
        check(
            Row::RefundsDue,
            m.captures_on_unpaid_orders == 0,
            format!("{} refunds to make, {} captures on unpaid orders", m.refunds, m.captures_on_unpaid_orders),
        ),
        check(
            Row::PaymentsHaveOrders,
            m.payments_without_order == 0,
            format!("{} payments (any event) without an order", m.payments_without_order),
        ),
    ];
    if let Some(acknowledged) = options.acknowledged_payments {
        checks.push(check(
            Row::PaymentsRecorded,
            m.captured_payments + m.refunds == acknowledged,
            format!("{} captures + {} refunds of {acknowledged} acknowledged", m.captured_payments, m.refunds),
        ));
    }
    let grace_ms = grace.as_millis() as i64;
    checks.extend([
        check(
            Row::HoldsOnTime,
            late.max_ms <= grace_ms && m.overdue_holds == 0,
            format!(
                "{} expired, late p50 {} p99 {} max {} ms; {} held past deadline + {}s{}",
                late.expired,
                late.p50_ms,
                late.p99_ms,
                late.max_ms,
                m.overdue_holds,
                grace.as_secs(),
                if m.overdue_holds > 0 { format!(" (by up to {} ms)", m.most_overdue_ms) } else { String::new() }
            ),
        ),
        check(
            Row::PerUserLimit,
            m.max_units_per_user <= m.per_user_limit,
            format!("max {} units per buyer, limit {}", m.max_units_per_user, m.per_user_limit),
        ),
        check(
            Row::AcceptedDecided,
            undecided == 0 && options.accepted.is_none_or(|a| m.intents == a),
            format!(
                "{} decided; {undecided} of {accepted} accepted by the ingress undecided{}{}",
                m.intents,
                example.map(|id| format!(" (e.g. {id})")).unwrap_or_default(),
                options.accepted.map(|a| format!("; {a} accepted by the caller")).unwrap_or_default()
            ),
        ),
        check(
            Row::ChangesNotified,
            m.states_without_change == 0
                && m.refunds_without_change == 0
                && m.payment_steps_without_change == 0
                && m.changes_unnotified == 0
                && m.notifications_without_change == 0
                && m.changes_repeated == 0,
            format!(
                "{} changes, {} notified ({} dead-lettered); {} unnotified, {} states, {} refunds and {} payment \
                 steps without a change, {} notifications of no change, {} repeated",
                m.order_changes,
                m.order_changes - m.changes_unnotified.min(m.order_changes),
                m.changes_dead_lettered,
                m.changes_unnotified,
                m.states_without_change,
                m.refunds_without_change,
                m.payment_steps_without_change,
                m.notifications_without_change,
                m.changes_repeated
            ),
        ),
    ]);
    checks.push(refunds_made(db, event_id, &m, options.provider.as_deref()).await?);
    Ok(Verdict { event_id, redis, mysql: m, checks })
}

/// How the record's refunds compare with the provider's, when it is asked.
#[derive(Debug, Default, PartialEq, Eq)]
struct ProviderSide {
    /// Refunds made that the provider has under the same id, for the same
    /// payment and amount, made under our refund id as its key.
    matched: u64,
    /// Refunds made that the provider does not have that way.
    unmatched: u64,
    /// The provider's refunds of the event's payments that are none of
    /// ours (a captured payment refunded, a payment refunded twice).
    extra: u64,
}

async fn refunds_made(db: &MySqlPool, event_id: u64, m: &OrderCounts, provider: Option<&str>) -> anyhow::Result<Check> {
    let side = match provider {
        Some(url) => Some(compare_with_provider(db, event_id, url).await?),
        None => None,
    };
    let ok = m.refunds_waiting == 0
        && m.payments_without_refund == 0
        && m.refunds_without_due == 0
        && m.refunded_without_provider_id == 0
        && side.as_ref().is_none_or(|s| s.unmatched == 0 && s.extra == 0);
    let provider = match side {
        Some(s) => {
            format!(
                "; the provider has {} of them, {} not as recorded (another id, payment, amount or key, or none), \
                 {} refunds of none",
                s.matched, s.unmatched, s.extra
            )
        }
        None => "; the provider not asked".to_owned(),
    };
    Ok(check(
        Row::RefundsMade,
        ok,
        format!(
            "{} refunds, {} made, {} not made; {} payments for refund without one, {} refunds of no payment \
             for refund, {} made without the provider's id{provider}",
            m.refund_rows,
            m.refund_rows - m.refunds_waiting.min(m.refund_rows),
            m.refunds_waiting,
            m.payments_without_refund,
            m.refunds_without_due,
            m.refunded_without_provider_id,
        ),
    ))
}

async fn compare_with_provider(db: &MySqlPool, event_id: u64, url: &str) -> anyhow::Result<ProviderSide> {
    #[derive(serde::Deserialize)]
    struct Listing {
        refunds: Vec<dropline::payments::ProviderRefund>,
    }
    let url = format!("{}/v1/refunds", url.trim_end_matches('/'));
    let listing: Listing = reqwest::Client::new()
        .get(&url)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("reading the provider's refunds at {url}"))?
        .json()
        .await
        .context("reading the provider's refunds")?;
    let payments: HashSet<String> = record::payment_ids(db, event_id).await?.into_iter().collect();
    let theirs: HashMap<&str, &dropline::payments::ProviderRefund> = listing
        .refunds
        .iter()
        .filter(|r| payments.contains(&r.payment_id))
        .map(|r| (r.refund_id.as_str(), r))
        .collect();
    let mut side = ProviderSide::default();
    let mut ours = HashSet::new();
    for made in record::refunds_made(db, event_id).await? {
        let same = theirs.get(made.provider_refund_id.as_str()).is_some_and(|r| {
            r.payment_id == made.payment_id
                && r.amount_cents == made.amount_cents
                && r.idempotency_key == made.refund_id
        });
        match same {
            true => side.matched += 1,
            false => side.unmatched += 1,
        }
        ours.insert(made.provider_refund_id);
    }
    side.extra = theirs.keys().filter(|id| !ours.contains(**id)).count() as u64;
    Ok(side)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lateness_takes_nearest_rank_percentiles() {
        assert_eq!(Lateness::of(vec![]), Lateness::default());
        let l = Lateness::of((1..=100).rev().collect());
        assert_eq!((l.expired, l.p50_ms, l.p99_ms, l.max_ms), (100, 50, 99, 100));
        let l = Lateness::of(vec![7]);
        assert_eq!((l.p50_ms, l.p99_ms, l.max_ms), (7, 7, 7));
    }

    #[test]
    fn the_default_grace_is_the_settlers() {
        let settler = <dropline_settler::SettlerConfig as clap::Parser>::parse_from(["settler"]);
        assert_eq!(production_grace(), Duration::from_secs(settler.overdue_grace_secs));
    }

    #[test]
    fn row_ids_are_distinct() {
        let rows = [
            Row::NoOversell,
            Row::UnitOwners,
            Row::RedisConserved,
            Row::ReleasedOnce,
            Row::StoresAgree,
            Row::PaidOrdersCaptured,
            Row::RefundsDue,
            Row::PaymentsHaveOrders,
            Row::PaymentsRecorded,
            Row::HoldsOnTime,
            Row::PerUserLimit,
            Row::AcceptedDecided,
            Row::ChangesNotified,
        ];
        let ids: HashSet<_> = rows.iter().map(|r| r.id()).collect();
        assert_eq!(ids.len(), rows.len());
    }
}
