//! The payment provider's webhook. It is answered 2xx only once the
//! payment's effect is on Kafka: paid, recorded for refund, or (an attempt
//! the provider declined) the failure recorded. Anything less is an error,
//! and the provider retries.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use dropline::messages::{PaymentDisposition, PaymentFailure, PaymentRecord};
use dropline::payments::{PaymentWebhook, PAYMENT_FAILED, PAYMENT_SUCCEEDED};
use dropline::stock::{Hold, PayOutcome};

use crate::events::Event;
use crate::extract::SignedWebhook;
use crate::layers::{Counter, Outcome, RequestId};
use crate::metrics::WEBHOOKS;
use crate::problem::{ErrorCode, Problem};
use crate::state::AppState;

/// Webhooks by result: a refused one is `rejected`.
pub const COUNTER: Counter = Counter { metric: WEBHOOKS.name, label: "result", of_problem: rejected };

fn rejected(_: ErrorCode) -> &'static str {
    "rejected"
}

pub async fn payment(
    State(app): State<Arc<AppState>>,
    RequestId(ref request_id): RequestId,
    SignedWebhook(hook): SignedWebhook,
) -> Result<Response, Problem> {
    if hook.kind != PAYMENT_SUCCEEDED && hook.kind != PAYMENT_FAILED {
        // Acknowledged so the provider stops sending it; nothing to do.
        return Ok(Outcome("ignored").mark(Json(serde_json::json!({ "status": "ignored" })).into_response()));
    }
    let order_id = hook.order_id;
    // Unknown orders are refused, not acknowledged: the provider keeps the
    // payment and its retries visible instead of it vanishing here.
    let event_id = app.orders.event_of(order_id).await?.ok_or(ErrorCode::OrderNotFound)?;
    let hold = app.ledger.hold(event_id, order_id).await.map_err(|e| Problem::unavailable("redis", &e))?;
    let hold = hold.ok_or(ErrorCode::OrderNotFound)?;
    if hook.kind == PAYMENT_FAILED {
        return declined(&app, &hook, event_id, hold, request_id).await;
    }
    let event = app.events.get(event_id).await.map_err(|e| Problem::unavailable("mysql", &e))?;
    let event = event.ok_or(ErrorCode::OrderNotFound)?;
    let (hold, disposition) = apply(&app, &hook, &event, hold).await?;
    let record = PaymentRecord {
        provider_event_id: hook.id.clone(),
        payment_id: hook.payment_id.clone(),
        amount_cents: hook.amount_cents,
        disposition,
    };
    app.publish_order_event(&hold.order_event(order_id, event_id, Some(record)), request_id).await?;
    tracing::info!(%order_id, payment_id = %hook.payment_id, disposition = disposition.as_str(), "payment recorded");
    let body = Json(serde_json::json!({ "status": disposition.as_str(), "order_state": hold.state }));
    Ok(Outcome(disposition.as_str()).mark(body.into_response()))
}

/// An attempt the provider declined. The hold is left as it is (held
/// until its deadline, for the buyer to try again); the failure is recorded
/// and announced once per provider event id, whatever the redeliveries.
async fn declined(
    app: &AppState,
    hook: &PaymentWebhook,
    event_id: u64,
    hold: Hold,
    request_id: &str,
) -> Result<Response, Problem> {
    let order_id = hook.order_id;
    if hold.state != dropline::messages::OrderState::Held {
        // A decline delivered late, once the order was paid or had ended:
        // nothing to tell the buyer, nothing to record.
        tracing::info!(%order_id, state = hold.state.as_str(), "a declined attempt of an order no longer held; ignored");
        let body = Json(serde_json::json!({ "status": "ignored", "order_state": hold.state }));
        return Ok(Outcome("ignored").mark(body.into_response()));
    }
    let reason = hook.failure_reason.clone().filter(|r| !r.trim().is_empty()).unwrap_or_else(|| "declined".into());
    let mut change = hold.order_event(order_id, event_id, None);
    change.payment_failure =
        Some(PaymentFailure { provider_event_id: hook.id.clone(), payment_id: hook.payment_id.clone(), reason });
    app.publish_order_event(&change, request_id).await?;
    tracing::info!(%order_id, payment_id = %hook.payment_id, "payment attempt declined");
    let body = Json(serde_json::json!({ "status": "declined", "order_state": hold.state }));
    Ok(Outcome("declined").mark(body.into_response()))
}

/// What the payment does to its hold, and what becomes of the money.
///
/// A payment for the wrong amount or in another currency does not pay the
/// order. The provider has taken the money all the same, so it is
/// acknowledged and recorded for refund (a refusal would only make the
/// provider retry it forever), and the hold runs on. Providers differ in
/// the case of currency codes ("eur"); the event's is upper case.
async fn apply(
    app: &AppState,
    hook: &PaymentWebhook,
    event: &Event,
    hold: Hold,
) -> Result<(Hold, PaymentDisposition), Problem> {
    let order_id = hook.order_id;
    let wrong_currency = !hook.currency.eq_ignore_ascii_case(&event.terms.currency);
    if hook.amount_cents != hold.amount_cents || wrong_currency {
        tracing::warn!(%order_id, paid = hook.amount_cents, due = hold.amount_cents,
            paid_currency = %hook.currency, due_currency = %event.terms.currency, "payment does not match the order");
        return Ok((hold, PaymentDisposition::RefundRequired));
    }
    match app.ledger.pay(event.id, order_id, &hook.payment_id).await.map_err(|e| Problem::unavailable("redis", &e))? {
        PayOutcome::Paid(h) => Ok((h, PaymentDisposition::Captured)),
        PayOutcome::Refund(h) => Ok((h, PaymentDisposition::RefundRequired)),
        PayOutcome::UnknownOrder => Err(ErrorCode::OrderNotFound.into()),
    }
}
