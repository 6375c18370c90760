//! The settler's writes. Every statement is an idempotent upsert, so a batch
//! redelivered after a crash (or a message produced twice) changes nothing
//! the second time, and an order's state only ever moves forward.

use dropline::db::from_ms;
use dropline::messages::{Decision, OrderEvent, OrderState, Outcome, PaymentRecord};
use sqlx::{MySql, MySqlPool, QueryBuilder};

/// Rows per statement; well under MySQL's placeholder limit.
const CHUNK: usize = 500;

/// What one batch writes.
#[derive(Debug, Default)]
pub struct Batch {
    intents: Vec<Decision>,
    orders: Vec<OrderRow>,
    payments: Vec<(String, PaymentRecord)>,
}

#[derive(Debug)]
struct OrderRow {
    order_id: String,
    event_id: u64,
    user_id: String,
    quantity: u32,
    amount_cents: u64,
    state: OrderState,
    expires_at_ms: i64,
    at_ms: i64,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.intents.is_empty() && self.orders.is_empty() && self.payments.is_empty()
    }

    pub fn add_decision(&mut self, d: Decision) {
        if let Outcome::Held { expires_at_ms, amount_cents } = d.outcome {
            self.orders.push(OrderRow {
                order_id: d.intent_id.to_string(),
                event_id: d.event_id,
                user_id: d.user_id.clone(),
                quantity: d.quantity,
                amount_cents,
                state: OrderState::Held,
                expires_at_ms,
                at_ms: d.decided_at_ms,
            });
        }
        self.intents.push(d);
    }

    pub fn add_order_event(&mut self, e: OrderEvent) {
        let order_id = e.order_id.to_string();
        if let Some(p) = e.payment {
            self.payments.push((order_id.clone(), p));
        }
        self.orders.push(OrderRow {
            order_id,
            event_id: e.event_id,
            user_id: e.user_id,
            quantity: e.quantity,
            amount_cents: e.amount_cents,
            state: e.state,
            expires_at_ms: e.expires_at_ms,
            at_ms: e.at_ms,
        });
    }

    /// Writes the batch in one transaction; returns the rows written per
    /// table (intents, orders, payments).
    pub async fn write(&self, db: &MySqlPool) -> Result<[usize; 3], sqlx::Error> {
        let mut tx = db.begin().await?;
        for chunk in self.intents.chunks(CHUNK) {
            let mut q = QueryBuilder::<MySql>::new(
                "INSERT INTO intents (intent_id, event_id, user_id, quantity, outcome, reject_reason, decided_at) ",
            );
            q.push_values(chunk, |mut row, d| {
                let (outcome, reason) = match d.outcome {
                    Outcome::Held { .. } => ("held", None),
                    Outcome::Rejected { reason } => ("rejected", Some(reason.as_str())),
                };
                row.push_bind(d.intent_id.to_string())
                    .push_bind(d.event_id)
                    .push_bind(&d.user_id)
                    .push_bind(d.quantity)
                    .push_bind(outcome)
                    .push_bind(reason)
                    .push_bind(from_ms(d.decided_at_ms));
            });
            // A decision never changes; a redelivered one is a no-op.
            q.push(" ON DUPLICATE KEY UPDATE intent_id = intent_id");
            q.build().execute(&mut *tx).await?;
        }
        for chunk in self.orders.chunks(CHUNK) {
            let mut q = QueryBuilder::<MySql>::new(
                "INSERT INTO orders (order_id, event_id, user_id, quantity, amount_cents, state, expires_at, \
                 created_at, updated_at) ",
            );
            q.push_values(chunk, |mut row, o| {
                row.push_bind(&o.order_id)
                    .push_bind(o.event_id)
                    .push_bind(&o.user_id)
                    .push_bind(o.quantity)
                    .push_bind(o.amount_cents)
                    .push_bind(o.state.as_str())
                    .push_bind(from_ms(o.expires_at_ms))
                    .push_bind(from_ms(o.at_ms))
                    .push_bind(from_ms(o.at_ms));
            });
            // Forward only: 'held' may become a final state; a final state
            // never changes. updated_at is assigned first, while `state`
            // still holds the stored value.
            q.push(
                " ON DUPLICATE KEY UPDATE \
                 updated_at = IF(state = 'held' AND VALUES(state) <> 'held', VALUES(updated_at), updated_at), \
                 state = IF(state = 'held', VALUES(state), state)",
            );
            q.build().execute(&mut *tx).await?;
        }
        for chunk in self.payments.chunks(CHUNK) {
            let mut q = QueryBuilder::<MySql>::new(
                "INSERT INTO payments (payment_id, provider_event_id, order_id, amount_cents, disposition, \
                 recorded_at) ",
            );
            let now = chrono::Utc::now();
            q.push_values(chunk, |mut row, (order_id, p)| {
                row.push_bind(&p.payment_id)
                    .push_bind(&p.provider_event_id)
                    .push_bind(order_id)
                    .push_bind(p.amount_cents)
                    .push_bind(p.disposition.as_str())
                    .push_bind(now);
            });
            // One row per payment, whatever the number of webhooks for it.
            q.push(" ON DUPLICATE KEY UPDATE payment_id = payment_id");
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok([self.intents.len(), self.orders.len(), self.payments.len()])
    }
}
