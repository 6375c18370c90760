//! `payments`: one row per provider payment id (the key), whatever the
//! number of webhooks for it or the event ids they came under.

use dropline::messages::PaymentRecord;
use sqlx::{MySql, QueryBuilder};

use super::{push_list, Tx, CHUNK};

/// Records payments, each with the order it is for; a payment recorded
/// before is left as it is.
pub async fn insert(tx: &mut Tx<'_>, payments: &[(String, PaymentRecord)]) -> Result<(), sqlx::Error> {
    for chunk in payments.chunks(CHUNK) {
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT INTO payments (payment_id, provider_event_id, order_id, amount_cents, disposition, \
             recorded_at, refund_cents) ",
        );
        let now = chrono::Utc::now();
        q.push_values(chunk, |mut row, (order_id, p)| {
            row.push_bind(&p.payment_id)
                .push_bind(&p.provider_event_id)
                .push_bind(order_id)
                .push_bind(p.amount_cents)
                .push_bind(p.disposition)
                .push_bind(now)
                // A payment for refund of an order its buyer cancelled
                // within the policy is refunded the share the order keeps.
                .push("(SELECT o.refund_cents FROM orders o WHERE o.order_id = ")
                .push_bind_unseparated(order_id)
                .push_unseparated(")");
        });
        q.push(" ON DUPLICATE KEY UPDATE payment_id = payment_id");
        q.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// A declined attempt to pay, as `payment_failures` keeps it.
#[derive(Debug, Clone)]
pub struct Failed {
    pub provider_event_id: String,
    pub payment_id: String,
    pub order_id: String,
    pub event_id: u64,
    pub reason: String,
    pub at_ms: i64,
}

/// Records declined attempts, one row per provider event id: a failure
/// recorded before is left as it is (and its change is not written again).
/// The reason is cut to the column's 255 characters.
pub async fn insert_failures(tx: &mut Tx<'_>, failures: &[Failed]) -> Result<(), sqlx::Error> {
    for chunk in failures.chunks(CHUNK) {
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT INTO payment_failures (provider_event_id, payment_id, order_id, event_id, reason, failed_at) ",
        );
        q.push_values(chunk, |mut row, f| {
            row.push_bind(&f.provider_event_id)
                .push_bind(&f.payment_id)
                .push_bind(&f.order_id)
                .push_bind(f.event_id)
                .push_bind(f.reason.chars().take(255).collect::<String>())
                .push_bind(dropline::db::from_ms(f.at_ms));
        });
        q.push(" ON DUPLICATE KEY UPDATE provider_event_id = provider_event_id");
        q.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Marks for refund the captured payments of those of `order_ids` the
/// record does not have as paid: all of each, or the share its order keeps
/// (a paid order cancelled within the policy).
pub async fn refund_unpaid(tx: &mut Tx<'_>, order_ids: &[&str]) -> Result<(), sqlx::Error> {
    for chunk in order_ids.chunks(CHUNK) {
        let mut q = QueryBuilder::<MySql>::new(
            "UPDATE payments p JOIN orders o ON o.order_id = p.order_id \
             SET p.disposition = 'refund_required', p.refund_cents = o.refund_cents \
             WHERE p.disposition = 'captured' AND o.state <> 'paid' AND p.order_id IN ",
        );
        push_list(&mut q, chunk);
        q.build().execute(&mut **tx).await?;
    }
    Ok(())
}
