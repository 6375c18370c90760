//! `events`, as the settler reads them (the ingress creates them).

use std::collections::HashMap;

use sqlx::{MySql, MySqlPool, QueryBuilder};

use super::{push_list, Tx, LOOKUP};

/// Locks the events' rows until the transaction ends, in id order (so two
/// transactions that lock some of the same events never wait on each
/// other), and returns each one's sellable units (its capacity and
/// oversell allowance) and per-buyer limit. An event the record lacks is
/// not in the map.
pub async fn lock_limits(tx: &mut Tx<'_>, event_ids: &[u64]) -> Result<HashMap<u64, (u32, u32)>, sqlx::Error> {
    let mut ids = event_ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut limits = HashMap::new();
    for chunk in ids.chunks(LOOKUP) {
        let mut q = QueryBuilder::<MySql>::new(
            "SELECT id, capacity + oversell_allowance, per_user_limit FROM events WHERE id IN ",
        );
        push_list(&mut q, chunk);
        q.push(" ORDER BY id FOR UPDATE");
        for (id, sellable, limit) in q.build_query_as::<(u64, u32, u32)>().fetch_all(&mut **tx).await? {
            limits.insert(id, (sellable, limit));
        }
    }
    Ok(limits)
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
/// announces each; each ingress re-reads a changed event); the number
/// opened now. An event is opened once: another settler's same update finds
/// it opened. The due events are found first and then updated by id, so
/// their rows are locked in id order, as a settler's batch locks them
/// (through the opening-time index, which the optimizer picks when few
/// events are unopened, they were locked in that index's order, and could
/// deadlock with a batch holding two events that open together).
pub async fn open_due(db: &MySqlPool) -> Result<u64, sqlx::Error> {
    let due: Vec<u64> = sqlx::query_scalar(
        "SELECT id FROM events WHERE opened_at IS NULL AND sale_opens_at <= UTC_TIMESTAMP(3) \
         AND cancelled_at IS NULL ORDER BY id",
    )
    .fetch_all(db)
    .await?;
    let mut opened = 0;
    for chunk in due.chunks(LOOKUP) {
        let mut q = QueryBuilder::<MySql>::new(
            "UPDATE events FORCE INDEX (PRIMARY) SET opened_at = sale_opens_at, changed_at = UTC_TIMESTAMP(3) \
             WHERE opened_at IS NULL AND cancelled_at IS NULL AND id IN ",
        );
        push_list(&mut q, chunk);
        opened += q.build().execute(db).await?.rows_affected();
    }
    Ok(opened)
}

/// An event whose sale opened and is not cancelled, as the sold-out watch
/// reads it.
#[derive(Debug, Clone, Copy, sqlx::FromRow)]
pub struct Selling {
    pub id: u64,
    /// Its capacity and oversell allowance.
    pub sellable: u64,
    pub sold_out: bool,
    /// Its sale closed: sold out stays so.
    pub closed: bool,
}

/// Events whose sale opened and closed less than a day ago (payments for
/// their holds still arrive), not cancelled, newest first, at most `max`
/// (past it the oldest are not watched: warned of by the caller).
pub async fn selling(db: &MySqlPool, max: u32) -> Result<Vec<Selling>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, CAST(capacity + oversell_allowance AS UNSIGNED) AS sellable, sold_out_at IS NOT NULL AS sold_out, \
         sale_closes_at <= UTC_TIMESTAMP(3) AS closed \
         FROM events WHERE opened_at IS NOT NULL AND cancelled_at IS NULL \
         AND sale_closes_at >= UTC_TIMESTAMP(3) - INTERVAL 1 DAY ORDER BY id DESC LIMIT ?",
    )
    .bind(max)
    .fetch_all(db)
    .await
}

/// Records the event sold out (every unit it may sell paid for) or back on
/// sale, if it was not already and the record's paid units say so as the
/// update runs (the outbox trigger announces the move); whether it moved
/// now. Of settlers that saw the same move, one makes it, and a cancel or a
/// payment recorded since the caller counted is seen: the count is the
/// update's own. A sale is back on sale only until it closes: a paid order
/// cancelled afterwards leaves it sold out.
pub async fn set_sold_out(db: &MySqlPool, event_id: u64, sold_out: bool) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE events e SET e.sold_out_at = IF(?, UTC_TIMESTAMP(3), NULL), e.changed_at = UTC_TIMESTAMP(3) \
         WHERE e.id = ? AND (e.sold_out_at IS NULL) = ? AND e.cancelled_at IS NULL \
         AND (? OR e.sale_closes_at > UTC_TIMESTAMP(3)) \
         AND ((SELECT COALESCE(SUM(o.quantity), 0) FROM orders o WHERE o.event_id = e.id AND o.state = 'paid') \
              >= e.capacity + e.oversell_allowance) = ?",
    )
    .bind(sold_out)
    .bind(event_id)
    .bind(sold_out)
    .bind(sold_out)
    .bind(sold_out)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}
