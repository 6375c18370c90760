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
        "INSERT INTO events (name, venue, starts_at, sale_opens_at, sale_closes_at, capacity, \
         oversell_allowance, price_cents, currency, per_user_limit, hold_ttl_secs) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(new.name.trim())
    .bind(new.venue.trim())
    .bind(new.starts_at)
    .bind(new.sale_opens_at)
    .bind(new.sale_closes_at)
    .bind(new.capacity)
    .bind(new.oversell_allowance)
    .bind(new.price_cents)
    .bind(&new.currency)
    .bind(new.per_user_limit)
    .bind(new.hold_ttl_secs)
    .execute(db)
    .await?;
    Ok(done.last_insert_id())
}

/// The event, locked until the transaction ends: one change of an event
/// at a time.
pub async fn lock_event(tx: &mut sqlx::MySqlConnection, id: u64) -> Result<Option<Event>, sqlx::Error> {
    sqlx::query_as::<_, Event>(&format!("SELECT {COLUMNS} FROM events WHERE id = ? FOR UPDATE"))
        .bind(id)
        .fetch_optional(tx)
        .await
}

/// Writes an event's changed capacity, oversell allowance, date and
/// cancellation policy (its outbox changes are the triggers').
pub async fn change_event(
    tx: &mut sqlx::MySqlConnection,
    id: u64,
    terms: &EventTerms,
    policy: &crate::events::CancellationPolicy,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE events SET capacity = ?, oversell_allowance = ?, starts_at = ?, cancel_paid_until = ?, \
         cancel_refund_percent = ?, changed_at = UTC_TIMESTAMP(3) WHERE id = ?",
    )
    .bind(terms.capacity)
    .bind(terms.oversell_allowance)
    .bind(terms.starts_at)
    .bind(policy.until)
    .bind(policy.refund_percent)
    .bind(id)
    .execute(tx)
    .await?;
    Ok(())
}

/// Pauses (from now, unless paused already) or resumes an event's sale.
pub async fn set_paused(tx: &mut sqlx::MySqlConnection, id: u64, paused: bool) -> Result<(), sqlx::Error> {
    let sql = if paused {
        "UPDATE events SET paused_at = COALESCE(paused_at, UTC_TIMESTAMP(3)), changed_at = UTC_TIMESTAMP(3) WHERE id = ?"
    } else {
        "UPDATE events SET paused_at = NULL, changed_at = UTC_TIMESTAMP(3) WHERE id = ?"
    };
    sqlx::query(sql).bind(id).execute(tx).await?;
    Ok(())
}

/// Cancels an event: its sale closes now (a ledger rebuilt from the record
/// sells nothing more).
pub async fn cancel_event(tx: &mut sqlx::MySqlConnection, id: u64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE events SET cancelled_at = UTC_TIMESTAMP(3), sale_closes_at = LEAST(sale_closes_at, UTC_TIMESTAMP(3)), \
         changed_at = UTC_TIMESTAMP(3) WHERE id = ? AND cancelled_at IS NULL",
    )
    .bind(id)
    .execute(tx)
    .await?;
    Ok(())
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

/// An event's waiting room as the record keeps it, with its event's window.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RoomRow {
    pub event_id: u64,
    pub mode: dropline::room::Mode,
    pub prequeue_opens_at: DateTime<Utc>,
    pub outflow_per_sec: u32,
    pub time_to_act_secs: u32,
    pub proof_of_work_bits: u8,
    pub seed: Vec<u8>,
    pub seed_commitment: String,
    pub beacon_name: Option<String>,
    pub beacon_round: Option<u64>,
    pub beacon_randomness: Option<String>,
    pub list_hash: Option<String>,
    pub entrants: Option<u32>,
    pub drawn_at: Option<DateTime<Utc>>,
    pub sale_opens_at: DateTime<Utc>,
    pub sale_closes_at: DateTime<Utc>,
}

const ROOM_COLUMNS: &str = "r.event_id, r.mode, r.prequeue_opens_at, r.outflow_per_sec, r.time_to_act_secs, \
                            r.proof_of_work_bits, r.seed, \
                            r.seed_commitment, r.beacon_name, r.beacon_round, r.beacon_randomness, r.list_hash, r.entrants, r.drawn_at, e.sale_opens_at, e.sale_closes_at";

/// Records a waiting room; false when the event has one already.
pub async fn insert_room(
    db: &MySqlPool,
    event_id: u64,
    terms: &crate::rooms::RoomTerms,
    seed: &[u8],
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO waiting_rooms (event_id, mode, prequeue_opens_at, outflow_per_sec, time_to_act_secs, \
         proof_of_work_bits, beacon_name, beacon_round, seed, seed_commitment) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(event_id)
    .bind(terms.mode)
    .bind(terms.prequeue_opens_at)
    .bind(terms.outflow_per_sec)
    .bind(terms.time_to_act_secs)
    .bind(terms.proof_of_work_bits)
    .bind(terms.beacon.as_ref().map(|b| b.name.as_str()))
    .bind(terms.beacon.as_ref().map(|b| b.round))
    .bind(seed)
    .bind(dropline::room::draw::commitment(seed))
    .execute(db)
    .await;
    match done {
        Ok(_) => Ok(true),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(false),
        Err(e) => Err(e),
    }
}

pub async fn room(db: &MySqlPool, event_id: u64) -> Result<Option<RoomRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {ROOM_COLUMNS} FROM waiting_rooms r JOIN events e ON e.id = r.event_id WHERE r.event_id = ?"
    ))
    .bind(event_id)
    .fetch_optional(db)
    .await
}

/// Rooms whose line may still move: their sale closed less than an hour
/// ago (the longest time to act) or not at all.
pub async fn live_rooms(db: &MySqlPool) -> Result<Vec<RoomRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {ROOM_COLUMNS} FROM waiting_rooms r JOIN events e ON e.id = r.event_id WHERE e.sale_closes_at > ?"
    ))
    .bind(Utc::now() - chrono::Duration::hours(1))
    .fetch_all(db)
    .await
}

/// Changes what is given of a room's outflow and join difficulty; false
/// when there is no room.
pub async fn change_room(
    db: &MySqlPool,
    event_id: u64,
    outflow_per_sec: Option<u32>,
    proof_of_work_bits: Option<u8>,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE waiting_rooms SET outflow_per_sec = COALESCE(?, outflow_per_sec), \
         proof_of_work_bits = COALESCE(?, proof_of_work_bits) WHERE event_id = ?",
    )
    .bind(outflow_per_sec)
    .bind(proof_of_work_bits)
    .bind(event_id)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1 || room(db, event_id).await?.is_some())
}

/// Records the randomness of a room's beacon round, once; false when the
/// room names no round or has its randomness already.
pub async fn set_beacon_randomness(db: &MySqlPool, event_id: u64, randomness: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE waiting_rooms SET beacon_randomness = ? \
         WHERE event_id = ? AND beacon_round IS NOT NULL AND beacon_randomness IS NULL",
    )
    .bind(randomness)
    .bind(event_id)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Puts what a draw published on the record, once.
pub async fn record_draw(
    db: &MySqlPool,
    event_id: u64,
    list_hash: &str,
    order: &[Uuid],
    drawn_at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let packed: Vec<u8> = order.iter().flat_map(|t| *t.as_bytes()).collect();
    sqlx::query(
        "UPDATE waiting_rooms SET list_hash = ?, entrants = ?, drawn_order = ?, drawn_at = ? \
         WHERE event_id = ? AND drawn_at IS NULL",
    )
    .bind(list_hash)
    .bind(order.len() as u64)
    .bind(packed)
    .bind(drawn_at)
    .bind(event_id)
    .execute(db)
    .await?;
    Ok(())
}

/// The drawn order the record keeps, once the room is drawn.
pub async fn drawn_order(db: &MySqlPool, event_id: u64) -> Result<Option<Vec<Uuid>>, sqlx::Error> {
    let row: Option<(Option<Vec<u8>>,)> = sqlx::query_as("SELECT drawn_order FROM waiting_rooms WHERE event_id = ?")
        .bind(event_id)
        .fetch_optional(db)
        .await?;
    Ok(row.and_then(|(packed,)| packed).map(|packed| {
        packed.chunks_exact(16).map(|t| Uuid::from_bytes(t.try_into().expect("chunks of 16 bytes"))).collect()
    }))
}

/// The ids of the events whose sale opened by `opened_by` and did not
/// close before `closed_after`.
pub async fn events_on_sale_since(
    db: &MySqlPool,
    opened_by: DateTime<Utc>,
    closed_after: DateTime<Utc>,
) -> Result<Vec<u64>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM events WHERE sale_opens_at <= ? AND sale_closes_at > ?")
        .bind(opened_by)
        .bind(closed_after)
        .fetch_all(db)
        .await
}
