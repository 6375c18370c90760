//! The settler's writes. Every statement is an idempotent upsert, so a batch
//! redelivered after a crash (or a message produced twice) changes nothing
//! the second time, and an order's state only ever moves forward.
//!
//! The record is also where a hold becomes final: each new hold's units and
//! its buyer's limit are checked here against the live orders (see
//! [`crate::claims`]), and a hold the record refuses is voided, whatever
//! Redis said. A payment for an order that is not paid in the record is
//! recorded for refund.

use dropline::db::from_ms;
use dropline::messages::{Decision, OrderEvent, OrderState, Outcome, PaymentRecord};
use dropline::stock::{Ledger, LedgerError};
use sqlx::{MySql, MySqlPool, QueryBuilder};

use crate::claims::{Claim, Void};

/// Rows per statement; well under MySQL's placeholder limit.
pub(crate) const CHUNK: usize = 500;

/// What one batch writes.
#[derive(Debug, Default)]
pub struct Batch {
    intents: Vec<Decision>,
    orders: Vec<OrderRow>,
    payments: Vec<(String, PaymentRecord)>,
    claims: Vec<Claim>,
}

/// What a batch wrote.
#[derive(Debug, Default)]
pub struct Written {
    pub intents: usize,
    pub orders: usize,
    pub payments: usize,
    pub units: usize,
    /// Holds the record refused.
    pub voided: Vec<Void>,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("mysql: {0}")]
    Mysql(#[from] sqlx::Error),
    /// Asking the ledger whether a competing hold ended.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
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
        if let Outcome::Held { expires_at_ms, amount_cents, ref units } = d.outcome {
            self.claims.push(Claim {
                order_id: d.intent_id.to_string(),
                event_id: d.event_id,
                user_id: d.user_id.clone(),
                units: units.clone(),
            });
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

    /// Writes the batch in one transaction.
    pub async fn write(&self, db: &MySqlPool, ledger: &Ledger) -> Result<Written, WriteError> {
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
            // One row per provider payment id (the key), whatever the number
            // of webhooks for it or the event ids they came under.
            q.push(" ON DUPLICATE KEY UPDATE payment_id = payment_id");
            q.build().execute(&mut *tx).await?;
        }
        let (units, voided) = crate::claims::settle(&mut tx, ledger, &self.claims).await?;
        // Money for an order the record does not have as paid (it ended
        // first, or was voided) goes back, whatever the ledger answered.
        let touched: Vec<&str> = self
            .payments
            .iter()
            .map(|(order_id, _)| order_id.as_str())
            .chain(voided.iter().map(|v| v.order_id.as_str()))
            .collect();
        for chunk in touched.chunks(CHUNK) {
            let mut q = QueryBuilder::<MySql>::new(
                "UPDATE payments p JOIN orders o ON o.order_id = p.order_id \
                 SET p.disposition = 'refund_required' \
                 WHERE p.disposition = 'captured' AND o.state <> 'paid' AND p.order_id IN ",
            );
            crate::claims::push_list(&mut q, chunk);
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(Written {
            intents: self.intents.len(),
            orders: self.orders.len(),
            payments: self.payments.len(),
            units,
            voided,
        })
    }
}
