//! `outbox`: the record's changes, written by triggers in the transaction
//! that made each one (see the migration), and what the relay reads and
//! marks there.

use chrono::{DateTime, Utc};
use dropline::messages::{Change, ChangeSubject, EventChange, Holder, OrderState, PaymentStep, RefundState};
use sqlx::{MySql, MySqlConnection, QueryBuilder};
use uuid::Uuid;

/// One outbox row, as written.
#[derive(Debug, sqlx::FromRow, serde::Serialize)]
pub struct Row {
    pub seq: u64,
    pub change_id: String,
    pub subject: String,
    pub kind: String,
    pub event_id: u64,
    pub order_id: Option<String>,
    pub user_id: Option<String>,
    pub quantity: Option<u32>,
    pub amount_cents: Option<u64>,
    pub expires_at: Option<DateTime<Utc>>,
    pub changed_at: DateTime<Utc>,
    pub refund_id: Option<String>,
    pub payment_id: Option<String>,
    pub reason: Option<String>,
    pub capacity: Option<u32>,
    pub oversell_allowance: Option<u32>,
    pub starts_at: Option<DateTime<Utc>>,
}

/// A row this version cannot publish.
#[derive(Debug, thiserror::Error)]
#[error("outbox row {seq}: {problem}")]
pub struct Unreadable {
    pub seq: u64,
    pub problem: String,
}

impl Row {
    /// The change as it travels on `changes`.
    pub fn change(&self) -> Result<Change, Unreadable> {
        let seq = self.seq;
        let bad = |problem: String| Unreadable { seq, problem };
        let change_id = Uuid::parse_str(&self.change_id).map_err(|e| bad(format!("change id: {e}")))?;
        let missing = |column: &str| bad(format!("a {} change without {column}", self.subject));
        let id = |column: &str, value: &Option<String>| {
            Uuid::parse_str(value.as_deref().ok_or_else(|| missing(column))?).map_err(|e| bad(format!("{column}: {e}")))
        };
        let subject = match self.subject.as_str() {
            "refund" => ChangeSubject::Refund {
                order_id: id("order_id", &self.order_id)?,
                user_id: self.user_id.clone().ok_or_else(|| missing("user_id"))?,
                refund_id: id("refund_id", &self.refund_id)?,
                payment_id: self.payment_id.clone().ok_or_else(|| missing("payment_id"))?,
                amount_cents: self.amount_cents.ok_or_else(|| missing("amount_cents"))?,
                state: match self.kind.as_str() {
                    "refund_requested" => RefundState::Requested,
                    "refunded" => RefundState::Refunded,
                    other => return Err(bad(format!("no refund change {other:?} is known to this version"))),
                },
            },
            "event" => ChangeSubject::Event {
                change: self.kind.parse::<EventChange>().map_err(|e| bad(e.to_string()))?,
                capacity: self.capacity.ok_or_else(|| missing("capacity"))?,
                oversell_allowance: self.oversell_allowance.unwrap_or(0),
                starts_at_ms: self.starts_at.ok_or_else(|| missing("starts_at"))?.timestamp_millis(),
                holder: match &self.order_id {
                    Some(_) => Some(Holder {
                        order_id: id("order_id", &self.order_id)?,
                        user_id: self.user_id.clone().ok_or_else(|| missing("user_id"))?,
                    }),
                    None => None,
                },
            },
            "payment" => ChangeSubject::Payment {
                order_id: id("order_id", &self.order_id)?,
                user_id: self.user_id.clone().ok_or_else(|| missing("user_id"))?,
                amount_cents: self.amount_cents.ok_or_else(|| missing("amount_cents"))?,
                expires_at_ms: self.expires_at.ok_or_else(|| missing("expires_at"))?.timestamp_millis(),
                step: match self.kind.as_str() {
                    "payment_started" => PaymentStep::Started,
                    "payment_failed" => PaymentStep::Failed,
                    other => return Err(bad(format!("no payment change {other:?} is known to this version"))),
                },
                payment_id: self.payment_id.clone(),
                reason: self.reason.clone(),
            },
            "order" => ChangeSubject::Order {
                order_id: id("order_id", &self.order_id)?,
                user_id: self.user_id.clone().ok_or_else(|| missing("user_id"))?,
                quantity: self.quantity.ok_or_else(|| missing("quantity"))?,
                amount_cents: self.amount_cents.ok_or_else(|| missing("amount_cents"))?,
                expires_at_ms: self.expires_at.ok_or_else(|| missing("expires_at"))?.timestamp_millis(),
                state: self.kind.parse::<OrderState>().map_err(|e| bad(e.to_string()))?,
            },
            other => return Err(bad(format!("no change of a {other:?} is known to this version"))),
        };
        Ok(Change {
            change_id,
            seq,
            event_id: self.event_id,
            changed_at_ms: self.changed_at.timestamp_millis(),
            subject,
        })
    }
}

/// The oldest `limit` rows not published yet, in the order they were
/// written.
pub async fn unpublished(conn: &mut MySqlConnection, limit: u32) -> Result<Vec<Row>, sqlx::Error> {
    sqlx::query_as(
        "SELECT seq, change_id, CAST(subject AS CHAR) AS subject, kind, event_id, order_id, user_id, quantity, \
         amount_cents, expires_at, changed_at, refund_id, payment_id, reason, capacity, oversell_allowance, \
         starts_at FROM outbox \
         WHERE published_at IS NULL \
         ORDER BY seq LIMIT ?",
    )
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Marks rows published.
pub async fn mark_published(conn: &mut MySqlConnection, seqs: &[u64]) -> Result<(), sqlx::Error> {
    for chunk in seqs.chunks(super::CHUNK) {
        let mut q = QueryBuilder::<MySql>::new("UPDATE outbox SET published_at = UTC_TIMESTAMP(3) WHERE seq IN ");
        super::push_list(&mut q, chunk);
        q.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// How long ago the oldest change not published yet was written, if one
/// waits.
pub async fn oldest_unpublished(conn: &mut MySqlConnection) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar("SELECT changed_at FROM outbox WHERE published_at IS NULL ORDER BY seq LIMIT 1")
        .fetch_optional(conn)
        .await
}

/// Takes the database's one relay lock on this connection; false if
/// another connection (another settler) has it. It is the connection's
/// until the connection closes, so the session is first told to close
/// after `idle_secs` without a statement: a relay whose host vanished
/// without closing its connection lets the lock go then, not after the
/// server's default eight hours. (The name is the database's, hashed: a
/// lock name may have at most 64 characters.)
pub async fn lead(conn: &mut MySqlConnection, idle_secs: u64) -> Result<bool, sqlx::Error> {
    sqlx::query(&format!("SET SESSION wait_timeout = {idle_secs}")).execute(&mut *conn).await?;
    let got: Option<i64> =
        sqlx::query_scalar("SELECT GET_LOCK(CONCAT('dropline.outbox.', MD5(DATABASE())), 0)").fetch_one(conn).await?;
    Ok(got == Some(1))
}
