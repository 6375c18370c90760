//! Finding an order and telling its story: the live hold in the Redis ledger
//! first, MySQL (the settler's record) once Redis no longer has it.
//!
//! An order id a buyer was given must never be answered "not found", even
//! while Redis is behind (it lost writes, or is being rebuilt) and the
//! settler has not recorded the order yet. An order is known to exist when
//! the ledger or MySQL has it; it is known to be *coming* when its intent
//! was produced (the intent index has it) and is not rejected, or MySQL
//! recorded its intent as held: then the answer is [`Lookup::Pending`], which
//! the routes turn into a retryable 503. Only an id nothing knows of is
//! unknown (see the README's "When things break" for the one window left).

use chrono::{DateTime, Utc};
use dropline::db::from_ms;
use dropline::messages::{OrderState, OutcomeKind};
use dropline::stock::{Hold, Ledger};
use serde::Serialize;
use sqlx::MySqlPool;
use uuid::Uuid;

use crate::intents::IntentStore;
use crate::problem::{ErrorCode, Problem};
use crate::record;

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
    /// Where this view was read.
    #[serde(skip)]
    pub source: Source,
}

/// Where an order's state was read: the live ledger, or the settler's
/// record (MySQL) when the ledger has no hold for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Ledger,
    Record,
}

/// An order id, as its buyer may see it.
#[derive(Debug, Clone)]
pub enum Lookup {
    Found(OrderView),
    /// The order was handed out (or is being decided) but neither the
    /// ledger nor MySQL has it yet: ask again shortly.
    Pending,
    /// No such order, or not this buyer's.
    Unknown,
}

/// The answer to a buyer whose order's records are catching up.
pub fn not_ready() -> Problem {
    Problem::new(ErrorCode::OrderNotReady)
        .detail("this order's records are catching up after a fault; retry shortly")
        .retry_after(1)
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
            source: Source::Ledger,
        }
    }
}

#[derive(Clone)]
pub struct Orders {
    intents: IntentStore,
    ledger: Ledger,
    db: MySqlPool,
}

impl Orders {
    pub fn new(intents: IntentStore, ledger: Ledger, db: MySqlPool) -> Self {
        Self { intents, ledger, db }
    }

    /// The event an order belongs to.
    pub async fn event_of(&self, order_id: Uuid) -> Result<Option<u64>, Problem> {
        if let Some(record) = self.intents.get(order_id).await.map_err(|e| Problem::unavailable("redis", &e))? {
            return Ok(Some(record.intent.event_id));
        }
        record::event_of_order(&self.db, order_id).await.map_err(|e| Problem::unavailable("mysql", &e))
    }

    /// The order `order_id` as it stands now, for `user`.
    pub async fn find(&self, order_id: Uuid, user: &str) -> Result<Lookup, Problem> {
        let index = self.intents.get(order_id).await.map_err(|e| Problem::unavailable("redis", &e))?;
        if index.as_ref().is_some_and(|i| i.intent.user_id != user) {
            return Ok(Lookup::Unknown);
        }
        if let Some(event_id) = index.as_ref().map(|i| i.intent.event_id) {
            if let Some(view) = self.live(event_id, order_id).await? {
                return Ok(owned_by(view, user));
            }
        }
        if let Some(row) = self.row(order_id).await? {
            // The index is gone (Redis lost it, or it expired): the ledger
            // may still have the live hold.
            if index.is_none() {
                if let Some(view) = self.live(row.event_id, order_id).await? {
                    return Ok(owned_by(view, user));
                }
            }
            return Ok(owned_by(row, user));
        }
        // No order anywhere. Its intent may still be coming, or decided in
        // a ledger that lost the hold before the settler recorded it.
        if let Some(i) = &index {
            let verdict = self
                .ledger
                .verdict(i.intent.event_id, order_id)
                .await
                .map_err(|e| Problem::unavailable("redis", &e))?;
            if matches!(verdict, Some(dropline::stock::Verdict::Rejected { .. })) {
                return Ok(Lookup::Unknown);
            }
        }
        let recorded = record::intent(&self.db, order_id, user).await.map_err(|e| Problem::unavailable("mysql", &e))?;
        Ok(match recorded {
            Some(intent) if intent.outcome == OutcomeKind::Held => Lookup::Pending,
            Some(_) => Lookup::Unknown,
            None if index.is_some() => Lookup::Pending,
            None => Lookup::Unknown,
        })
    }

    /// The live hold, from the ledger.
    async fn live(&self, event_id: u64, order_id: Uuid) -> Result<Option<OrderView>, Problem> {
        let hold = self.ledger.hold(event_id, order_id).await.map_err(|e| Problem::unavailable("redis", &e))?;
        Ok(hold.map(|h| OrderView::from_hold(order_id, event_id, &h)))
    }

    /// The order as the settler recorded it.
    async fn row(&self, order_id: Uuid) -> Result<Option<OrderView>, Problem> {
        let row = record::order(&self.db, order_id).await.map_err(|e| Problem::unavailable("mysql", &e))?;
        Ok(row.map(|r| OrderView {
            order_id,
            event_id: r.event_id,
            quantity: r.quantity,
            amount_cents: r.amount_cents,
            state: r.state,
            expires_at: r.expires_at,
            order_url: format!("/v1/orders/{order_id}"),
            user_id: r.user_id,
            source: Source::Record,
        }))
    }
}

fn owned_by(view: OrderView, user: &str) -> Lookup {
    if view.user_id == user {
        Lookup::Found(view)
    } else {
        Lookup::Unknown
    }
}
