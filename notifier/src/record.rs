//! The notifier's SQL: `notifications` (what became of each webhook) and
//! `reminders` (the holds to remind their buyers of). Both tables are in
//! the record's database (see the outbox migration).

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sqlx::{MySql, MySqlPool, QueryBuilder};
use uuid::Uuid;

use crate::deliver::Reminder;

/// Rows per statement.
const CHUNK: usize = 500;

/// What became of one webhook.
#[derive(Debug, Clone)]
pub struct Settled {
    pub id: Uuid,
    pub kind: String,
    pub event_id: u64,
    pub order_id: Option<Uuid>,
    pub delivered: bool,
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// A reminder to send at `due_at`, for a hold just announced.
#[derive(Debug, Clone)]
pub struct Remind {
    pub order_id: Uuid,
    pub id: Uuid,
    pub event_id: u64,
    pub due_at: DateTime<Utc>,
}

/// Which of `ids` the record has an outcome for already.
pub async fn settled_among(db: &MySqlPool, ids: &[Uuid]) -> Result<HashSet<Uuid>, sqlx::Error> {
    let mut out = HashSet::new();
    for chunk in ids.chunks(CHUNK) {
        let mut q = QueryBuilder::<MySql>::new("SELECT notification_id FROM notifications WHERE notification_id IN ");
        push_ids(&mut q, chunk);
        let rows: Vec<(String,)> = q.build_query_as().fetch_all(db).await?;
        out.extend(rows.iter().filter_map(|(id,)| Uuid::parse_str(id).ok()));
    }
    Ok(out)
}

/// Records outcomes, the reminders of the holds delivered, and the
/// reminders done (`reminded`: their orders), in one transaction. An
/// outcome recorded before is left as it was.
pub async fn settle(
    db: &MySqlPool,
    settled: &[Settled],
    reminders: &[Remind],
    reminded: &[Uuid],
) -> Result<(), sqlx::Error> {
    let mut tx = db.begin().await?;
    let now = Utc::now();
    for chunk in settled.chunks(CHUNK) {
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT INTO notifications (notification_id, kind, event_id, order_id, outcome, attempts, last_error, \
             recorded_at) ",
        );
        q.push_values(chunk, |mut row, s| {
            row.push_bind(s.id.to_string())
                .push_bind(&s.kind)
                .push_bind(s.event_id)
                .push_bind(s.order_id.map(|o| o.to_string()))
                .push_bind(if s.delivered { "delivered" } else { "dead_lettered" })
                .push_bind(s.attempts)
                .push_bind(&s.last_error)
                .push_bind(now);
        });
        q.push(" ON DUPLICATE KEY UPDATE notification_id = notification_id");
        q.build().execute(&mut *tx).await?;
    }
    for chunk in reminders.chunks(CHUNK) {
        let mut q = QueryBuilder::<MySql>::new("INSERT INTO reminders (order_id, notification_id, event_id, due_at) ");
        q.push_values(chunk, |mut row, r| {
            row.push_bind(r.order_id.to_string()).push_bind(r.id.to_string()).push_bind(r.event_id).push_bind(r.due_at);
        });
        // A hold's one reminder keeps its id; a deadline extended since
        // (the buyer started paying) moves it later, until it is sent.
        q.push(" ON DUPLICATE KEY UPDATE due_at = IF(done_at IS NULL, GREATEST(due_at, VALUES(due_at)), due_at)");
        q.build().execute(&mut *tx).await?;
    }
    for chunk in reminded.chunks(CHUNK) {
        let mut q = QueryBuilder::<MySql>::new("UPDATE reminders SET done_at = UTC_TIMESTAMP(3) WHERE order_id IN ");
        push_ids(&mut q, chunk);
        q.build().execute(&mut *tx).await?;
    }
    tx.commit().await
}

/// `(?, ?, ...)` of ids.
fn push_ids(q: &mut QueryBuilder<'_, MySql>, ids: &[Uuid]) {
    q.push("(");
    let mut list = q.separated(", ");
    for id in ids {
        list.push_bind(id.to_string());
    }
    list.push_unseparated(")");
}

#[derive(sqlx::FromRow)]
struct DueRow {
    order_id: String,
    notification_id: String,
    event_id: u64,
    user_id: String,
    quantity: u32,
    amount_cents: u64,
    expires_at: DateTime<Utc>,
    held: bool,
}

/// Up to `limit` reminders due now that no notifier is sending, claimed
/// for this one for `claim_secs` (longer than it takes to send and record
/// them). Those whose hold ended, or whose deadline passed, are
/// marked done instead: there is nothing left to remind of.
pub async fn claim_due(db: &MySqlPool, limit: u32, claim_secs: u64) -> Result<Vec<Reminder>, sqlx::Error> {
    let mut tx = db.begin().await?;
    let rows: Vec<DueRow> = sqlx::query_as(
        "SELECT r.order_id, r.notification_id, r.event_id, o.user_id, o.quantity, o.amount_cents, o.expires_at, \
         (o.state = 'held' AND o.expires_at > UTC_TIMESTAMP(3)) AS held \
         FROM reminders r JOIN orders o ON o.order_id = r.order_id \
         WHERE r.done_at IS NULL AND r.due_at <= UTC_TIMESTAMP(3) \
         AND (r.claimed_until IS NULL OR r.claimed_until < UTC_TIMESTAMP(3)) \
         ORDER BY r.due_at LIMIT ? FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    let (live, needless): (Vec<DueRow>, Vec<DueRow>) = rows.into_iter().partition(|r| r.held);
    let ids = |rows: &[DueRow]| rows.iter().filter_map(|r| Uuid::parse_str(&r.order_id).ok()).collect::<Vec<_>>();
    if !needless.is_empty() {
        let mut q = QueryBuilder::<MySql>::new("UPDATE reminders SET done_at = UTC_TIMESTAMP(3) WHERE order_id IN ");
        push_ids(&mut q, &ids(&needless));
        q.build().execute(&mut *tx).await?;
    }
    if !live.is_empty() {
        let mut q = QueryBuilder::<MySql>::new("UPDATE reminders SET claimed_until = UTC_TIMESTAMP(3) + INTERVAL ");
        q.push_bind(claim_secs).push(" SECOND WHERE order_id IN ");
        push_ids(&mut q, &ids(&live));
        q.build().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    let reminders = live
        .into_iter()
        .filter_map(|r| {
            Some(Reminder {
                id: Uuid::parse_str(&r.notification_id).ok()?,
                event_id: r.event_id,
                order_id: Uuid::parse_str(&r.order_id).ok()?,
                user_id: r.user_id,
                quantity: r.quantity,
                amount_cents: r.amount_cents,
                expires_at: r.expires_at,
            })
        })
        .collect();
    Ok(reminders)
}
