//! `refunds`: one row per payment whose money goes back, written by the
//! database's triggers in the transaction that recorded the payment for
//! refund (see the migration); the refund worker claims the rows due and
//! records what the provider answered.

use chrono::{DateTime, Utc};
use dropline::messages::RefundState;
use sqlx::{MySql, MySqlPool, QueryBuilder};

use super::push_list;

/// A refund to ask the provider for.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Due {
    pub refund_id: String,
    pub payment_id: String,
    pub amount_cents: u64,
    pub attempts: u32,
}

/// Takes up to `limit` refunds due for a call, for `claim_secs`: another
/// settler leaves them alone that long. Rows another claim is taking right
/// now are skipped, not waited for.
pub async fn claim(db: &MySqlPool, limit: u32, claim_secs: u64) -> Result<Vec<Due>, sqlx::Error> {
    let mut tx = db.begin().await?;
    let due: Vec<Due> = sqlx::query_as(
        "SELECT refund_id, payment_id, amount_cents, attempts FROM refunds \
         WHERE state IN ('requested', 'failed') AND next_attempt_at <= UTC_TIMESTAMP(3) \
         AND (claimed_until IS NULL OR claimed_until < UTC_TIMESTAMP(3)) \
         ORDER BY next_attempt_at LIMIT ? FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    if !due.is_empty() {
        let mut q = QueryBuilder::<MySql>::new("UPDATE refunds SET claimed_until = UTC_TIMESTAMP(3) + INTERVAL ");
        q.push_bind(claim_secs).push(" SECOND WHERE refund_id IN ");
        push_list(&mut q, &due.iter().map(|d| d.refund_id.as_str()).collect::<Vec<_>>());
        q.build().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(due)
}

/// The provider made the refund: it is `refunded`, under the provider's
/// refund id. A refund already recorded as refunded stays as it was.
pub async fn refunded(db: &MySqlPool, refund_id: &str, provider_refund_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE refunds SET state = 'refunded', provider_refund_id = ?, refunded_at = UTC_TIMESTAMP(3), \
         attempts = attempts + 1, last_error = NULL, claimed_until = NULL \
         WHERE refund_id = ? AND state <> 'refunded'",
    )
    .bind(provider_refund_id)
    .bind(refund_id)
    .execute(db)
    .await?;
    Ok(())
}

/// A call did not make the refund. `Some(next_attempt_at)`: `failed`,
/// tried again then. `None`: the provider refused it for good, `rejected`,
/// never called again on its own (an operator's case; setting it back to
/// `requested` has it tried again).
pub async fn not_made(
    db: &MySqlPool,
    refund_id: &str,
    error: &str,
    next_attempt_at: Option<DateTime<Utc>>,
) -> Result<(), sqlx::Error> {
    let error: String = error.chars().take(255).collect();
    let state = if next_attempt_at.is_some() { RefundState::Failed } else { RefundState::Rejected };
    sqlx::query(
        "UPDATE refunds SET state = ?, attempts = attempts + 1, last_error = ?, \
         next_attempt_at = COALESCE(?, next_attempt_at), claimed_until = NULL \
         WHERE refund_id = ? AND state <> 'refunded'",
    )
    .bind(state)
    .bind(error)
    .bind(next_attempt_at)
    .bind(refund_id)
    .execute(db)
    .await?;
    Ok(())
}

/// Refunds the provider has not confirmed, and how long the oldest has
/// waited (seconds).
pub async fn waiting(db: &MySqlPool) -> Result<(u64, f64), sqlx::Error> {
    let (n, oldest): (i64, Option<f64>) = sqlx::query_as(
        "SELECT COUNT(*), CAST(TIMESTAMPDIFF(MICROSECOND, MIN(requested_at), UTC_TIMESTAMP(3)) / 1e6 AS DOUBLE) \
         FROM refunds WHERE state <> 'refunded'",
    )
    .fetch_one(db)
    .await?;
    Ok((n as u64, oldest.unwrap_or(0.0).max(0.0)))
}
