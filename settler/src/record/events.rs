//! `events`, as the settler reads them (the ingress creates them).

use sqlx::MySqlPool;

use super::Tx;

/// An event's capacity and per-buyer limit, if the record has the event.
pub async fn limits(tx: &mut Tx<'_>, event_id: u64) -> Result<Option<(u32, u32)>, sqlx::Error> {
    sqlx::query_as("SELECT capacity, per_user_limit FROM events WHERE id = ?")
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
