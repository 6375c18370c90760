//! The settler's writes: one batch of messages in one transaction. Every
//! statement is an idempotent upsert (see [`crate::record`]), so a batch
//! redelivered after a crash (or a message produced twice) changes nothing
//! the second time, and an order's state only ever moves forward.
//!
//! The record is also where a hold becomes final: each new hold's units and
//! its buyer's limit are checked here against the live orders (see
//! [`crate::claims`]), and a hold the record refuses is voided, whatever
//! Redis said. A payment for an order that is not paid in the record is
//! recorded for refund.

use dropline::messages::{Decision, OrderChange, OrderState, Outcome, PaymentFailure, PaymentRecord};
use dropline::stock::Ledger;
use sqlx::MySqlPool;

use crate::claims::{Claim, Locked, Void, WriteError};
use crate::record::payments::Failed;
use crate::record::{intents, orders, payments};

/// What one batch writes.
#[derive(Debug, Default)]
pub struct Batch {
    intents: Vec<Decision>,
    /// Without their payments, which are in `payments`.
    orders: Vec<OrderChange>,
    payments: Vec<(String, PaymentRecord)>,
    /// Orders cancelled with a refund (a paid order within the policy, or
    /// with its event): their payments go back, of the share they keep.
    cancelled_paid: Vec<String>,
    /// Declined attempts to pay, each after the order change it came with
    /// (its index in `orders`): a failure's change is written in its place
    /// among the order's changes.
    failures: Vec<(usize, Failed)>,
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
            self.orders.push(OrderChange {
                order_id: d.intent_id,
                event_id: d.event_id,
                user_id: d.user_id.clone(),
                quantity: d.quantity,
                amount_cents,
                state: OrderState::Held,
                expires_at_ms,
                at_ms: d.decided_at_ms,
                payment: None,
                payment_started_at_ms: None,
                payment_failure: None,
                refund_cents: None,
            });
        }
        self.intents.push(d);
    }

    pub fn add_order_event(&mut self, mut e: OrderChange) {
        if let Some(p) = e.payment.take() {
            self.payments.push((e.order_id.to_string(), p));
        }
        if let Some(PaymentFailure { provider_event_id, payment_id, reason }) = e.payment_failure.take() {
            self.failures.push((
                self.orders.len(),
                Failed {
                    provider_event_id,
                    payment_id,
                    order_id: e.order_id.to_string(),
                    event_id: e.event_id,
                    reason,
                    at_ms: e.at_ms,
                },
            ));
        }
        if e.state == OrderState::Cancelled && e.refund_cents.is_some() {
            self.cancelled_paid.push(e.order_id.to_string());
        }
        self.orders.push(e);
    }

    /// Writes the batch in one transaction. Its first statement locks the
    /// events its new holds belong to (see [`crate::claims::Locked`]).
    pub async fn write(&self, db: &MySqlPool, ledger: &Ledger) -> Result<Written, WriteError> {
        let mut tx = db.begin().await?;
        let locked = Locked::lock(&mut tx, &self.claims).await?;
        intents::insert(&mut tx, &self.intents).await?;
        // The orders in their order, each declined attempt right after the
        // change it came with (which wrote the order if it was new: the
        // failure's change reads it).
        let mut from = 0;
        for (at, failed) in &self.failures {
            orders::upsert(&mut tx, &self.orders[from..=*at]).await?;
            payments::insert_failures(&mut tx, std::slice::from_ref(failed)).await?;
            from = at + 1;
        }
        orders::upsert(&mut tx, &self.orders[from..]).await?;
        payments::insert(&mut tx, &self.payments).await?;
        let (units, voided) = crate::claims::settle(&mut tx, ledger, &locked, &self.claims).await?;
        // Money for an order the record does not have as paid (it ended
        // first, or was voided) goes back, whatever the ledger answered.
        let touched: Vec<&str> = self
            .payments
            .iter()
            .map(|(order_id, _)| order_id.as_str())
            .chain(voided.iter().map(|v| v.order_id.as_str()))
            .chain(self.cancelled_paid.iter().map(String::as_str))
            .collect();
        payments::refund_unpaid(&mut tx, &touched).await?;
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
