//! `events`, as the settler reads them (the ingress creates them).

use sqlx::MySqlPool;

use super::Tx;

/// The units an event may sell (its capacity and oversell allowance) and
/// its per-buyer limit, if the record has the event.
pub async fn limits(tx: &mut Tx<'_>, event_id: u64) -> Result<Option<(u32, u32)>, sqlx::Error> {
    sqlx::query_as("SELECT capacity + oversell_allowance, per_user_limit FROM events WHERE id = ?")
        .bind(event_id)
        .fetch_optional(&mut **tx)
        .await
}

/// Events whose sale is open or closed less than a day ago, newest first,
/// at most `max`.
pub async fn current(db: &MySqlPool, max: u32) -> Result<Vec<u64>, sqlx::Error> {
    let rows: Vec<(u64,)> = sqlx::query_as(
        "SELECT id FROM events WHERE sale_opens_at <= UTC_TIMESTAMP(3) \
         AND sale_closes_at >= UTC_TIMESTAMP(3) - INTERVAL 1 DAY ORDER BY id DESC LIMIT ?",
    )
    .bind(max)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// Records the opening of every sale whose time came (the outbox trigger
/// announces each); the number opened now. An event is opened once:
/// another settler's same update finds it opened.
pub async fn open_due(db: &MySqlPool) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE events SET opened_at = sale_opens_at \
         WHERE opened_at IS NULL AND sale_opens_at <= UTC_TIMESTAMP(3) AND cancelled_at IS NULL",
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// An event whose sale opened and is not cancelled, as the sold-out watch
/// reads it.
#[derive(Debug, Clone, Copy, sqlx::FromRow)]
pub struct Selling {
    pub id: u64,
    /// Its capacity and oversell allowance.
    pub sellable: u64,
    pub sold_out: bool,
}

/// Events whose sale opened and closed less than a day ago (payments for
/// their holds still arrive), not cancelled, newest first, at most `max`.
pub async fn selling(db: &MySqlPool, max: u32) -> Result<Vec<Selling>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, CAST(capacity + oversell_allowance AS UNSIGNED) AS sellable, sold_out_at IS NOT NULL AS sold_out \
         FROM events WHERE opened_at IS NOT NULL AND cancelled_at IS NULL \
         AND sale_closes_at >= UTC_TIMESTAMP(3) - INTERVAL 1 DAY ORDER BY id DESC LIMIT ?",
    )
    .bind(max)
    .fetch_all(db)
    .await
}

/// Records the event sold out (every unit it may sell paid for) or back on
/// sale, if it was not already (the outbox trigger announces the move);
/// whether it moved now. Of settlers that saw the same move, one makes it.
pub async fn set_sold_out(db: &MySqlPool, event_id: u64, sold_out: bool) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE events SET sold_out_at = IF(?, UTC_TIMESTAMP(3), NULL) \
         WHERE id = ? AND (sold_out_at IS NULL) = ? AND cancelled_at IS NULL",
    )
    .bind(sold_out)
    .bind(event_id)
    .bind(sold_out)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}
