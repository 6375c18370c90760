//! `orders`: one row per hold, whose state only moves forward: 'held' may
//! become a final state, 'paid' may become 'cancelled' (within the event's
//! policy); no other final state ever changes.

use chrono::{DateTime, Utc};
use dropline::db::from_ms;
use dropline::messages::{OrderChange, OrderState};
use sqlx::{MySql, MySqlPool, QueryBuilder};

use super::{push_list, Tx, CHUNK, LOOKUP};

/// Records the orders (an order change each, a new hold's made up from its
/// decision), moving each one's state forward only. Payments are not
/// written here.
pub async fn upsert(tx: &mut Tx<'_>, orders: &[OrderChange]) -> Result<(), sqlx::Error> {
    for chunk in orders.chunks(CHUNK) {
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT INTO orders (order_id, event_id, user_id, quantity, amount_cents, state, expires_at, \
             created_at, updated_at, payment_started_at, refund_cents) ",
        );
        q.push_values(chunk, |mut row, o| {
            row.push_bind(o.order_id.to_string())
                .push_bind(o.event_id)
                .push_bind(&o.user_id)
                .push_bind(o.quantity)
                .push_bind(o.amount_cents)
                .push_bind(o.state)
                .push_bind(from_ms(o.expires_at_ms))
                .push_bind(from_ms(o.at_ms))
                .push_bind(from_ms(o.at_ms))
                .push_bind(o.payment_started_at_ms.map(from_ms))
                .push_bind(o.refund_cents);
        });
        // Assigned in order, each reading the stored `state` until the
        // last: a held order takes the start of payment (once) and its
        // extended deadline (which only ever grows), then its new state. A
        // paid order moves once more, to cancelled, and only by a cancel
        // that carries its refund (its buyer's within the policy, or the
        // host's of the event), which the order keeps; a cancel reaching a
        // held order first keeps it too. Any other ended order changes no
        // more.
        q.push(
            " ON DUPLICATE KEY UPDATE \
             payment_started_at = IF(state = 'held', COALESCE(payment_started_at, VALUES(payment_started_at)), \
             payment_started_at), \
             expires_at = IF(state = 'held', GREATEST(expires_at, VALUES(expires_at)), expires_at), \
             refund_cents = IF(state IN ('held', 'paid') AND VALUES(state) = 'cancelled', \
             COALESCE(VALUES(refund_cents), refund_cents), refund_cents), \
             updated_at = IF((state = 'held' AND VALUES(state) <> 'held') OR (state = 'paid' \
             AND VALUES(state) = 'cancelled' AND VALUES(refund_cents) IS NOT NULL), VALUES(updated_at), updated_at), \
             state = IF(state = 'held' OR (state = 'paid' AND VALUES(state) = 'cancelled' \
             AND VALUES(refund_cents) IS NOT NULL), VALUES(state), state)",
        );
        q.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// A live (held or paid) order of a buyer.
#[derive(sqlx::FromRow)]
pub struct LiveOrder {
    pub order_id: String,
    pub user_id: String,
    pub quantity: u32,
    pub state: OrderState,
}

/// The live orders of `buyers` for an event (read under the event's lock:
/// see [`crate::claims::Locked`]).
pub async fn live_of_buyers(tx: &mut Tx<'_>, event_id: u64, buyers: &[&str]) -> Result<Vec<LiveOrder>, sqlx::Error> {
    let mut live = Vec::new();
    for chunk in buyers.chunks(LOOKUP) {
        let mut q = QueryBuilder::<MySql>::new(
            "SELECT order_id, user_id, quantity, CAST(state AS CHAR) AS state FROM orders \
             FORCE INDEX (orders_by_buyer) WHERE event_id = ",
        );
        q.push_bind(event_id).push(" AND state IN ('held', 'paid') AND user_id IN ");
        push_list(&mut q, chunk);
        live.extend(q.build_query_as::<LiveOrder>().fetch_all(&mut **tx).await?);
    }
    Ok(live)
}

/// The states of the orders the record has among `order_ids`.
pub async fn states(tx: &mut Tx<'_>, order_ids: &[&str]) -> Result<Vec<(String, OrderState)>, sqlx::Error> {
    let mut states = Vec::new();
    for chunk in order_ids.chunks(LOOKUP) {
        let mut q = QueryBuilder::<MySql>::new("SELECT order_id, CAST(state AS CHAR) FROM orders WHERE order_id IN ");
        push_list(&mut q, chunk);
        states.extend(q.build_query_as::<(String, OrderState)>().fetch_all(&mut **tx).await?);
    }
    Ok(states)
}

/// Ends a held order in `state` at `at`; an order no longer held is left
/// as it is. Whether it was held.
pub async fn end_held(
    tx: &mut Tx<'_>,
    order_id: &str,
    state: OrderState,
    at: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("UPDATE orders SET state = ?, updated_at = ? WHERE order_id = ? AND state = 'held'")
        .bind(state)
        .bind(at)
        .bind(order_id)
        .execute(&mut **tx)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// An order's latest committed state, locked for the transaction.
pub async fn state_locked(tx: &mut Tx<'_>, order_id: &str) -> Result<Option<OrderState>, sqlx::Error> {
    sqlx::query_scalar("SELECT CAST(state AS CHAR) FROM orders WHERE order_id = ? LOCK IN SHARE MODE")
        .bind(order_id)
        .fetch_optional(&mut **tx)
        .await
}

/// Cancels a paid order the ledger cancelled (within the policy, or with
/// its event) before the change reached the record, keeping its refund.
/// Whether it was paid.
pub async fn cancel_paid(
    tx: &mut Tx<'_>,
    order_id: &str,
    refund_cents: u64,
    at: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE orders SET state = 'cancelled', refund_cents = ?, updated_at = ? WHERE order_id = ? AND state = 'paid'",
    )
    .bind(refund_cents)
    .bind(at)
    .bind(order_id)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Voids an order the record refused, whatever its state.
pub async fn void(tx: &mut Tx<'_>, order_id: &str, at: DateTime<Utc>) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE orders SET state = 'voided', updated_at = ? WHERE order_id = ?")
        .bind(at)
        .bind(order_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// An event's live orders (held or paid), by id.
pub async fn live(db: &MySqlPool, event_id: u64) -> Result<std::collections::HashMap<String, OrderState>, sqlx::Error> {
    sqlx::query_as("SELECT order_id, CAST(state AS CHAR) FROM orders WHERE event_id = ? AND state IN ('held', 'paid')")
        .bind(event_id)
        .fetch_all(db)
        .await
        .map(|rows: Vec<(String, OrderState)>| rows.into_iter().collect())
}

/// Up to 500 of an event's orders still held with a deadline before
/// `before`.
pub async fn held_past(db: &MySqlPool, event_id: u64, before: DateTime<Utc>) -> Result<Vec<String>, sqlx::Error> {
    let overdue: Vec<(String,)> = sqlx::query_as(
        "SELECT order_id FROM orders WHERE event_id = ? AND state = 'held' AND expires_at < ? LIMIT 500",
    )
    .bind(event_id)
    .bind(before)
    .fetch_all(db)
    .await?;
    Ok(overdue.into_iter().map(|(id,)| id).collect())
}

/// The units an event's live orders have, by state (held, paid).
pub async fn live_units(db: &MySqlPool, event_id: u64) -> Result<Vec<(OrderState, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT CAST(state AS CHAR), CAST(SUM(quantity) AS SIGNED) FROM orders \
         WHERE event_id = ? AND state IN ('held', 'paid') GROUP BY state",
    )
    .bind(event_id)
    .fetch_all(db)
    .await
}

/// The units paid for, of each of `events` that has any.
pub async fn paid_units(db: &MySqlPool, events: &[u64]) -> Result<std::collections::HashMap<u64, u64>, sqlx::Error> {
    let mut paid = std::collections::HashMap::new();
    for chunk in events.chunks(LOOKUP) {
        let mut q = QueryBuilder::<MySql>::new(
            "SELECT event_id, CAST(SUM(quantity) AS UNSIGNED) FROM orders WHERE state = 'paid' AND event_id IN ",
        );
        push_list(&mut q, chunk);
        q.push(" GROUP BY event_id");
        let rows: Vec<(u64, u64)> = q.build_query_as().fetch_all(db).await?;
        paid.extend(rows);
    }
    Ok(paid)
}

/// An order as the record has it, with its captured payment and its units:
/// what a rebuild restores.
#[derive(sqlx::FromRow)]
pub struct RecordedOrder {
    pub order_id: String,
    pub user_id: String,
    pub quantity: u32,
    pub amount_cents: u64,
    pub state: OrderState,
    pub expires_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub payment_id: Option<String>,
    /// Comma-separated unit numbers.
    pub units: Option<String>,
    pub payment_started_at: Option<DateTime<Utc>>,
}

/// Every order of an event.
pub async fn of_event(db: &MySqlPool, event_id: u64) -> Result<Vec<RecordedOrder>, sqlx::Error> {
    sqlx::query_as(
        "SELECT o.order_id, o.user_id, o.quantity, o.amount_cents, CAST(o.state AS CHAR) AS state, o.expires_at, \
         o.updated_at, (SELECT MIN(p.payment_id) FROM payments p WHERE p.order_id = o.order_id \
         AND p.disposition = 'captured') AS payment_id, (SELECT GROUP_CONCAT(u.unit_no) FROM order_units u \
         WHERE u.order_id = o.order_id) AS units, o.payment_started_at FROM orders o WHERE o.event_id = ?",
    )
    .bind(event_id)
    .fetch_all(db)
    .await
}
