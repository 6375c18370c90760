//! Finding an order and telling its story: the live hold in the Redis ledger
//! first, MySQL (the settler's record) once Redis no longer has it.

use chrono::{DateTime, Utc};
use dropline::db::from_ms;
use dropline::messages::OrderState;
use dropline::stock::{Hold, Ledger};
use serde::Serialize;
use sqlx::MySqlPool;
use uuid::Uuid;

use crate::intents::IntentStore;
use crate::problem::Problem;

#[derive(Debug, Clone, Serialize)]
pub struct OrderView {
    pub order_id: Uuid,
    pub event_id: u64,
    pub quantity: u32,
    pub amount_cents: u64,
    pub state: OrderState,
    pub expires_at: DateTime<Utc>,
    pub order_url: String,
    #[serde(skip)]
    pub user_id: String,
}

impl OrderView {
    pub fn from_hold(order_id: Uuid, event_id: u64, hold: &Hold) -> Self {
        Self {
            order_id,
            event_id,
            quantity: hold.quantity,
            amount_cents: hold.amount_cents,
            state: hold.state,
            expires_at: from_ms(hold.expires_at_ms),
            order_url: format!("/v1/orders/{order_id}"),
            user_id: hold.user_id.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Orders {
    intents: IntentStore,
    ledger: Ledger,
    db: MySqlPool,
}

#[derive(sqlx::FromRow)]
struct OrderRow {
    event_id: u64,
    user_id: String,
    quantity: u32,
    amount_cents: u64,
    state: String,
    expires_at: DateTime<Utc>,
}

impl Orders {
    pub fn new(intents: IntentStore, ledger: Ledger, db: MySqlPool) -> Self {
        Self { intents, ledger, db }
    }

    /// The event an order belongs to.
    pub async fn event_of(&self, order_id: Uuid) -> Result<Option<u64>, Problem> {
        if let Some(record) = self.intents.get(order_id).await.map_err(|e| Problem::unavailable("redis", &e))? {
            return Ok(Some(record.event_id));
        }
        let row: Option<(u64,)> = sqlx::query_as("SELECT event_id FROM orders WHERE order_id = ?")
            .bind(order_id.to_string())
            .fetch_optional(&self.db)
            .await
            .map_err(|e| Problem::unavailable("mysql", &e))?;
        Ok(row.map(|r| r.0))
    }

    /// The order as it stands now, whoever owns it.
    pub async fn view(&self, order_id: Uuid) -> Result<Option<OrderView>, Problem> {
        let Some(event_id) = self.event_of(order_id).await? else {
            return Ok(None);
        };
        if let Some(hold) = self.ledger.hold(event_id, order_id).await.map_err(|e| Problem::unavailable("redis", &e))? {
            return Ok(Some(OrderView::from_hold(order_id, event_id, &hold)));
        }
        let row: Option<OrderRow> = sqlx::query_as(
            "SELECT event_id, user_id, quantity, amount_cents, CAST(state AS CHAR) AS state, expires_at \
             FROM orders WHERE order_id = ?",
        )
        .bind(order_id.to_string())
        .fetch_optional(&self.db)
        .await
        .map_err(|e| Problem::unavailable("mysql", &e))?;
        Ok(row.and_then(|r| {
            let state = serde_json::from_value(serde_json::Value::String(r.state)).ok()?;
            Some(OrderView {
                order_id,
                event_id: r.event_id,
                quantity: r.quantity,
                amount_cents: r.amount_cents,
                state,
                expires_at: r.expires_at,
                order_url: format!("/v1/orders/{order_id}"),
                user_id: r.user_id,
            })
        }))
    }
}
