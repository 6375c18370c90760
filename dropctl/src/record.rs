//! dropctl's own reads of the record (MySQL), for the invariants and for
//! knowing when the pipeline went quiet. An audit must not lean on the code
//! it checks, so it keeps its own queries here instead of calling the
//! stages' `record` modules, and reads every table they write.

use chrono::{DateTime, Utc};
use dropline::messages::OrderState;
use sqlx::MySqlPool;

/// An event's capacity, oversell allowance and per-buyer limit, if the
/// record has the event.
pub async fn event_limits(db: &MySqlPool, event_id: u64) -> Result<Option<(u32, u32, u32)>, sqlx::Error> {
    sqlx::query_as("SELECT capacity, oversell_allowance, per_user_limit FROM events WHERE id = ?")
        .bind(event_id)
        .fetch_optional(db)
        .await
}

/// Units of an event's orders, by state.
pub async fn units_by_state(db: &MySqlPool, event_id: u64) -> Result<Vec<(OrderState, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT CAST(state AS CHAR), CAST(SUM(quantity) AS SIGNED) FROM orders WHERE event_id = ? GROUP BY state",
    )
    .bind(event_id)
    .fetch_all(db)
    .await
}

/// A count over one event's rows.
#[derive(Debug, Clone, Copy)]
pub enum Count {
    Intents,
    PaidOrders,
    CapturedPayments,
    Refunds,
    PaidOrdersWithoutOneCapture,
    CapturesOnUnpaidOrders,
    /// The most units one buyer's live orders have.
    MaxUnitsPerUser,
    /// Live orders that do not own exactly their quantity of units.
    LiveOrdersWithWrongUnits,
    /// Changes of the event's orders in the outbox.
    OrderChanges,
    /// Orders whose current state has no change in the outbox: a change
    /// the outbox missed.
    StatesWithoutChange,
    /// Changes with no notification recorded (delivered or dead-lettered).
    ChangesUnnotified,
    /// Notifications of no change in the outbox (reminders aside).
    NotificationsWithoutChange,
    /// Changes whose webhook was dead-lettered.
    ChangesDeadLettered,
    /// Changes announced more than once: an order reaches each state once,
    /// and each of its refunds each of its states.
    ChangesRepeated,
    /// The event's refunds (one per payment recorded for refund).
    RefundRows,
    /// Refunds the provider has not made (requested, failed or rejected).
    RefundsWaiting,
    /// Refunds the refund worker is still trying (requested or failed):
    /// what the wait for quiet waits for; a rejected one waits for no one.
    RefundsInFlight,
    /// Refunds of a payment that is not recorded for refund (captured, or
    /// not in the record at all), or of another amount than is due (all of
    /// it, or the share a cancellation within the policy refunds): money
    /// that should not go back.
    RefundsWithoutDue,
    /// Refunds without their `refund_requested` change, or made without
    /// their `refunded` one.
    RefundsWithoutChange,
    /// Payments started (orders with `payment_started_at`) without their
    /// `payment_started` change, and declined attempts without their
    /// `payment_failed` one.
    PaymentStepsWithoutChange,
    /// Payments recorded for refund that have no refund.
    PaymentsWithoutRefund,
    /// Refunds recorded as made without the provider's refund id.
    RefundedWithoutProviderId,
}

impl Count {
    fn sql(self) -> &'static str {
        match self {
            Count::Intents => "SELECT COUNT(*) FROM intents WHERE event_id = ?",
            Count::PaidOrders => "SELECT COUNT(*) FROM orders WHERE event_id = ? AND state = 'paid'",
            Count::CapturedPayments => {
                "SELECT COUNT(*) FROM payments p JOIN orders o ON o.order_id = p.order_id \
                 WHERE o.event_id = ? AND p.disposition = 'captured'"
            }
            Count::Refunds => {
                "SELECT COUNT(*) FROM payments p JOIN orders o ON o.order_id = p.order_id \
                 WHERE o.event_id = ? AND p.disposition = 'refund_required'"
            }
            Count::PaidOrdersWithoutOneCapture => {
                "SELECT COUNT(*) FROM orders o WHERE o.event_id = ? AND o.state = 'paid' AND \
                 (SELECT COUNT(*) FROM payments p WHERE p.order_id = o.order_id AND p.disposition = 'captured') <> 1"
            }
            Count::CapturesOnUnpaidOrders => {
                "SELECT COUNT(*) FROM payments p JOIN orders o ON o.order_id = p.order_id \
                 WHERE o.event_id = ? AND p.disposition = 'captured' AND o.state <> 'paid'"
            }
            Count::MaxUnitsPerUser => {
                "SELECT COALESCE(MAX(units), 0) FROM (SELECT CAST(SUM(quantity) AS SIGNED) AS units FROM orders \
                 WHERE event_id = ? AND state IN ('held', 'paid') GROUP BY user_id) per_user"
            }
            Count::LiveOrdersWithWrongUnits => {
                "SELECT COUNT(*) FROM orders o WHERE o.event_id = ? \
                 AND o.state IN ('held', 'paid') AND o.quantity <> (SELECT COUNT(*) FROM order_units u \
                 WHERE u.event_id = o.event_id AND u.order_id = o.order_id)"
            }
            Count::OrderChanges => "SELECT COUNT(*) FROM outbox WHERE event_id = ?",
            // Orders whose state has not moved since the outbox came (its
            // migration) are the only ones expected to have its change. The
            // two names are compared as ASCII: the columns' collations are
            // the tables', which a database created on an older server may
            // have set differently.
            Count::StatesWithoutChange => {
                "SELECT COUNT(*) FROM orders o WHERE o.event_id = ? \
                 AND o.updated_at >= (SELECT MIN(installed_on) FROM _sqlx_migrations WHERE version = 20261206000001) \
                 AND NOT EXISTS (SELECT 1 FROM outbox c WHERE c.order_id = o.order_id AND c.subject = 'order' \
                 AND CONVERT(c.kind USING ascii) = CONVERT(o.state USING ascii))"
            }
            Count::ChangesUnnotified => {
                "SELECT COUNT(*) FROM outbox c LEFT JOIN notifications n ON n.notification_id = c.change_id \
                 WHERE c.event_id = ? AND n.notification_id IS NULL"
            }
            Count::NotificationsWithoutChange => {
                "SELECT COUNT(*) FROM notifications n LEFT JOIN outbox c ON c.change_id = n.notification_id \
                 WHERE n.event_id = ? AND n.kind <> 'order.hold_expiring' AND c.change_id IS NULL"
            }
            Count::ChangesRepeated => {
                // An order's change is one per order, state, refund and
                // step; a change of the event (told to a holder or not) is
                // its own.
                "SELECT COUNT(*) - COUNT(DISTINCT subject, IF(subject = 'event', change_id, COALESCE(order_id, change_id)), \
                 kind, COALESCE(refund_id, step_id, '')) FROM outbox WHERE event_id = ?"
            }
            Count::RefundRows => {
                "SELECT COUNT(*) FROM refunds r JOIN orders o ON o.order_id = r.order_id WHERE o.event_id = ?"
            }
            Count::RefundsWaiting => {
                "SELECT COUNT(*) FROM refunds r JOIN orders o ON o.order_id = r.order_id \
                 WHERE o.event_id = ? AND r.state <> 'refunded'"
            }
            // A payment of nothing has nothing to give back. Payments
            // recorded before the refunds' migration got no refund (see
            // it): they are counted, for an operator to settle.
            Count::PaymentsWithoutRefund => {
                "SELECT COUNT(*) FROM payments p JOIN orders o ON o.order_id = p.order_id \
                 WHERE o.event_id = ? AND p.disposition = 'refund_required' \
                 AND COALESCE(p.refund_cents, p.amount_cents) > 0 \
                 AND NOT EXISTS (SELECT 1 FROM refunds r WHERE r.payment_id = p.payment_id)"
            }
            Count::RefundsInFlight => {
                "SELECT COUNT(*) FROM refunds r JOIN orders o ON o.order_id = r.order_id \
                 WHERE o.event_id = ? AND r.state IN ('requested', 'failed')"
            }
            Count::RefundsWithoutDue => {
                "SELECT COUNT(*) FROM refunds r JOIN orders o ON o.order_id = r.order_id \
                 WHERE o.event_id = ? AND NOT EXISTS (SELECT 1 FROM payments p \
                 WHERE p.payment_id = r.payment_id AND p.disposition = 'refund_required' \
                 AND r.amount_cents = COALESCE(p.refund_cents, p.amount_cents))"
            }
            Count::RefundsWithoutChange => {
                "SELECT COUNT(*) FROM refunds r JOIN orders o ON o.order_id = r.order_id WHERE o.event_id = ? \
                 AND (NOT EXISTS (SELECT 1 FROM outbox c WHERE c.refund_id = r.refund_id \
                 AND c.kind = 'refund_requested') OR (r.state = 'refunded' AND NOT EXISTS \
                 (SELECT 1 FROM outbox c WHERE c.refund_id = r.refund_id AND c.kind = 'refunded')))"
            }
            Count::PaymentStepsWithoutChange => {
                "SELECT (SELECT COUNT(*) FROM orders o WHERE o.event_id = e.id AND o.payment_started_at IS NOT NULL \
                 AND NOT EXISTS (SELECT 1 FROM outbox c WHERE c.order_id = o.order_id \
                 AND c.kind = 'payment_started')) + (SELECT COUNT(*) FROM payment_failures f \
                 WHERE f.event_id = e.id AND NOT EXISTS (SELECT 1 FROM outbox c \
                 WHERE c.step_id = f.provider_event_id AND c.kind = 'payment_failed')) FROM (SELECT ? AS id) e"
            }
            Count::RefundedWithoutProviderId => {
                "SELECT COUNT(*) FROM refunds r JOIN orders o ON o.order_id = r.order_id \
                 WHERE o.event_id = ? AND r.state = 'refunded' AND r.provider_refund_id IS NULL"
            }
            Count::ChangesDeadLettered => {
                "SELECT COUNT(*) FROM notifications n JOIN outbox c ON c.change_id = n.notification_id \
                 WHERE c.event_id = ? AND n.outcome = 'dead_lettered'"
            }
        }
    }
}

/// The event's changes not published by the outbox relay yet.
pub async fn unpublished_changes(db: &MySqlPool, event_id: u64) -> Result<u64, sqlx::Error> {
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM outbox WHERE event_id = ? AND published_at IS NULL")
        .bind(event_id)
        .fetch_one(db)
        .await?;
    Ok(n as u64)
}

/// A refund the record has as made: ours, the payment's, and the
/// provider's id for it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MadeRefund {
    pub refund_id: String,
    pub payment_id: String,
    pub amount_cents: u64,
    pub provider_refund_id: String,
}

/// The event's refunds the record has as made.
pub async fn refunds_made(db: &MySqlPool, event_id: u64) -> Result<Vec<MadeRefund>, sqlx::Error> {
    sqlx::query_as(
        "SELECT r.refund_id, r.payment_id, r.amount_cents, r.provider_refund_id FROM refunds r \
         JOIN orders o ON o.order_id = r.order_id \
         WHERE o.event_id = ? AND r.state = 'refunded' AND r.provider_refund_id IS NOT NULL",
    )
    .bind(event_id)
    .fetch_all(db)
    .await
}

/// The ids of the event's payments, whatever became of them.
pub async fn payment_ids(db: &MySqlPool, event_id: u64) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT p.payment_id FROM payments p JOIN orders o ON o.order_id = p.order_id WHERE o.event_id = ?",
    )
    .bind(event_id)
    .fetch_all(db)
    .await
}

pub async fn count(db: &MySqlPool, what: Count, event_id: u64) -> Result<u64, sqlx::Error> {
    let (n,): (i64,) = sqlx::query_as(what.sql()).bind(event_id).fetch_one(db).await?;
    Ok(n as u64)
}

/// Payment rows (of any event: a payment row names no event) whose order
/// is not in the record.
pub async fn payments_without_order(db: &MySqlPool) -> Result<u64, sqlx::Error> {
    let (orphans,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM payments p LEFT JOIN orders o ON o.order_id = p.order_id WHERE o.order_id IS NULL",
    )
    .fetch_one(db)
    .await?;
    Ok(orphans as u64)
}

/// Unit rows of an event numbered beyond `sellable` (its capacity and
/// oversell allowance).
pub async fn units_beyond(db: &MySqlPool, event_id: u64, sellable: u64) -> Result<u64, sqlx::Error> {
    let (beyond,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM order_units WHERE event_id = ? AND unit_no > ?")
        .bind(event_id)
        .bind(sellable)
        .fetch_one(db)
        .await?;
    Ok(beyond as u64)
}

/// How late each expired hold of an event ended, in milliseconds past its
/// deadline. A final order's updated_at is when its hold ended: the
/// settler sets it once, from the ledger's end time, when the order leaves
/// 'held', and never again (see settler/src/record/orders.rs).
pub async fn expiry_lateness_ms(db: &MySqlPool, event_id: u64) -> Result<Vec<i64>, sqlx::Error> {
    let late: Vec<(i64,)> = sqlx::query_as(
        "SELECT CAST(TIMESTAMPDIFF(MICROSECOND, expires_at, updated_at) DIV 1000 AS SIGNED) FROM orders \
         WHERE event_id = ? AND state = 'expired'",
    )
    .bind(event_id)
    .fetch_all(db)
    .await?;
    Ok(late.into_iter().map(|(ms,)| ms).collect())
}

/// How many of an event's holds are still held with a deadline before
/// `before`, and the earliest of those deadlines.
pub async fn held_past(
    db: &MySqlPool,
    event_id: u64,
    before: DateTime<Utc>,
) -> Result<(i64, Option<DateTime<Utc>>), sqlx::Error> {
    sqlx::query_as(
        "SELECT COUNT(*), MIN(expires_at) FROM orders WHERE event_id = ? AND state = 'held' AND expires_at < ?",
    )
    .bind(event_id)
    .bind(before)
    .fetch_one(db)
    .await
}

/// Every order of an event, and its state.
pub async fn order_states(db: &MySqlPool, event_id: u64) -> Result<Vec<(String, OrderState)>, sqlx::Error> {
    sqlx::query_as("SELECT order_id, CAST(state AS CHAR) FROM orders WHERE event_id = ?")
        .bind(event_id)
        .fetch_all(db)
        .await
}

/// The ids of an event's decided intents.
pub async fn decided_intents(db: &MySqlPool, event_id: u64) -> Result<Vec<String>, sqlx::Error> {
    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT intent_id FROM intents WHERE event_id = ?").bind(event_id).fetch_all(db).await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// The latest deadline of an event's orders.
pub async fn last_deadline(db: &MySqlPool, event_id: u64) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    let (last,): (Option<DateTime<Utc>>,) =
        sqlx::query_as("SELECT MAX(expires_at) FROM orders WHERE event_id = ?").bind(event_id).fetch_one(db).await?;
    Ok(last)
}

/// How many of an event's holds are still held with a deadline in
/// `[since, until)`.
pub async fn held_between(
    db: &MySqlPool,
    event_id: u64,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<i64, sqlx::Error> {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM orders WHERE event_id = ? AND state = 'held' AND expires_at < ? AND expires_at >= ?",
    )
    .bind(event_id)
    .bind(until)
    .bind(since)
    .fetch_one(db)
    .await?;
    Ok(n)
}
