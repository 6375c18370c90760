//! The ingress's SQL: the events it creates and searches, and the orders and
//! intents it looks up in the record (MySQL), which the settler writes, once
//! Redis no longer has them.

use chrono::{DateTime, Utc};
use dropline::events::{Event, EventTerms, COLUMNS};
use dropline::messages::{OrderState, OutcomeKind, RejectReason};
use sqlx::MySqlPool;
use uuid::Uuid;

/// How a search query is bounded on the server, which MySQL and MariaDB
/// spell differently: each ignores (MariaDB) or refuses (MySQL) the other's
/// form, so the server is asked once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchTimeout {
    /// `SET STATEMENT max_statement_time=<secs> FOR SELECT ...`
    MariaDb {
        ms: u64,
    },
    /// `SELECT /*+ MAX_EXECUTION_TIME(<ms>) */ ...`
    MySql {
        ms: u64,
    },
    None,
}

impl SearchTimeout {
    /// Asks the server which form it takes, for a bound of `ms`.
    pub async fn detect(db: &MySqlPool, ms: u64) -> Result<Self, sqlx::Error> {
        let (version,): (String,) = sqlx::query_as("SELECT VERSION()").fetch_one(db).await?;
        Ok(if version.to_ascii_lowercase().contains("mariadb") {
            SearchTimeout::MariaDb { ms }
        } else {
            SearchTimeout::MySql { ms }
        })
    }

    /// `select_rest` is the statement after its `SELECT`.
    fn bound(self, select_rest: &str) -> String {
        match self {
            SearchTimeout::MariaDb { ms } => {
                format!("SET STATEMENT max_statement_time={}.{:03} FOR SELECT {select_rest}", ms / 1000, ms % 1000)
            }
            SearchTimeout::MySql { ms } => format!("SELECT /*+ MAX_EXECUTION_TIME({ms}) */ {select_rest}"),
            SearchTimeout::None => format!("SELECT {select_rest}"),
        }
    }
}

/// Creates an event; returns its id.
pub async fn insert_event(db: &MySqlPool, new: &EventTerms) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO events (name, venue, starts_at, sale_opens_at, sale_closes_at, capacity, price_cents, \
         currency, per_user_limit, hold_ttl_secs) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(new.name.trim())
    .bind(new.venue.trim())
    .bind(new.starts_at)
    .bind(new.sale_opens_at)
    .bind(new.sale_closes_at)
    .bind(new.capacity)
    .bind(new.price_cents)
    .bind(&new.currency)
    .bind(new.per_user_limit)
    .bind(new.hold_ttl_secs)
    .execute(db)
    .await?;
    Ok(done.last_insert_id())
}

/// Events whose name or venue contains `q`, by id, after `after`.
pub async fn search_events(
    db: &MySqlPool,
    timeout: SearchTimeout,
    q: Option<&str>,
    after: u64,
    limit: u32,
) -> Result<Vec<Event>, sqlx::Error> {
    let pattern = q.map(|q| format!("%{}%", q.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")));
    let sql = timeout.bound(&format!(
        "{COLUMNS} FROM events WHERE id > ? AND (? IS NULL OR name LIKE ? OR venue LIKE ?) ORDER BY id LIMIT ?"
    ));
    sqlx::query_as::<_, Event>(&sql)
        .bind(after)
        .bind(&pattern)
        .bind(&pattern)
        .bind(&pattern)
        .bind(limit)
        .fetch_all(db)
        .await
}

/// The event of an order the settler recorded.
pub async fn event_of_order(db: &MySqlPool, order_id: Uuid) -> Result<Option<u64>, sqlx::Error> {
    let row: Option<(u64,)> = sqlx::query_as("SELECT event_id FROM orders WHERE order_id = ?")
        .bind(order_id.to_string())
        .fetch_optional(db)
        .await?;
    Ok(row.map(|(event_id,)| event_id))
}

/// An order as the settler recorded it.
#[derive(sqlx::FromRow)]
pub struct RecordedOrder {
    pub event_id: u64,
    pub user_id: String,
    pub quantity: u32,
    pub amount_cents: u64,
    pub state: OrderState,
    pub expires_at: DateTime<Utc>,
}

pub async fn order(db: &MySqlPool, order_id: Uuid) -> Result<Option<RecordedOrder>, sqlx::Error> {
    sqlx::query_as(
        "SELECT event_id, user_id, quantity, amount_cents, CAST(state AS CHAR) AS state, expires_at \
         FROM orders WHERE order_id = ?",
    )
    .bind(order_id.to_string())
    .fetch_optional(db)
    .await
}

/// An intent as the settler recorded its decision.
#[derive(sqlx::FromRow)]
pub struct RecordedIntent {
    pub event_id: u64,
    pub quantity: u32,
    pub outcome: OutcomeKind,
    reject_reason: Option<String>,
}

impl RecordedIntent {
    /// Why it was rejected, if it was and the reason is one this version
    /// knows.
    pub fn reason(&self) -> Option<RejectReason> {
        self.reject_reason.as_deref().and_then(|r| r.parse().ok())
    }
}

/// The intent `intent_id` of `user_id`, if the settler recorded it.
pub async fn intent(db: &MySqlPool, intent_id: Uuid, user_id: &str) -> Result<Option<RecordedIntent>, sqlx::Error> {
    sqlx::query_as(
        "SELECT event_id, quantity, CAST(outcome AS CHAR) AS outcome, reject_reason FROM intents \
         WHERE intent_id = ? AND user_id = ?",
    )
    .bind(intent_id.to_string())
    .bind(user_id)
    .fetch_optional(db)
    .await
}
