//! The payment provider's webhook. It is answered 2xx only once the
//! payment's effect is on Kafka: paid, or recorded for refund. Anything less
//! is an error, and the provider retries.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use dropline::messages::{PaymentDisposition, PaymentRecord};
use dropline::payments::{self, PaymentWebhook, SignatureError, PAYMENT_SUCCEEDED, SIGNATURE_HEADER};
use dropline::stock::PayOutcome;

use super::{read_body, RequestId};
use crate::metrics::WEBHOOKS;
use crate::problem::{ErrorCode, Problem};
use crate::AppState;

fn counted(result: &'static str) {
    metrics::counter!(WEBHOOKS, "result" => result).increment(1);
}

pub async fn payment(
    State(app): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let result = handle(&app, &request_id.0, &headers, body).await;
    if result.is_err() {
        counted("rejected");
    }
    result
}

async fn handle(app: &AppState, request_id: &str, headers: &HeaderMap, body: Body) -> Result<Response, Problem> {
    let raw = read_body(body, app.config.max_body_bytes).await?;
    // The signature covers the raw bytes; nothing is parsed before it holds.
    let signature = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok());
    let now = chrono::Utc::now().timestamp();
    payments::verify(app.config.webhook_secret.as_bytes(), signature, &raw, now, app.config.webhook_tolerance_secs)
        .map_err(|e| {
            // Every other failure, an oversized header included, is refused
            // before a MAC is computed or is a mismatch: invalid_signature.
            let code = if e == SignatureError::Stale { ErrorCode::StaleSignature } else { ErrorCode::InvalidSignature };
            Problem::new(code).detail(e.to_string())
        })?;
    // Providers add fields over time: those are ignored, anything else off
    // the documented shape is refused like every other body.
    let hook: PaymentWebhook = crate::extract::json_lenient(headers, &raw)?;
    if hook.kind != PAYMENT_SUCCEEDED {
        // Acknowledged so the provider stops sending it; nothing to do.
        counted("ignored");
        return Ok(Json(serde_json::json!({ "status": "ignored" })).into_response());
    }
    let order_id = hook.order_id;
    // Unknown orders are refused, not acknowledged: the provider keeps the
    // payment and its retries visible instead of it vanishing here.
    let event_id = app.orders.event_of(order_id).await?.ok_or(ErrorCode::OrderNotFound)?;
    let hold = app.ledger.hold(event_id, order_id).await.map_err(|e| Problem::unavailable("redis", &e))?;
    let hold = hold.ok_or(ErrorCode::OrderNotFound)?;
    let event = app.events.get(event_id).await.map_err(|e| Problem::unavailable("mysql", &e))?;
    let event = event.ok_or(ErrorCode::OrderNotFound)?;

    // A payment for the wrong amount or in another currency does not pay the
    // order. The provider has taken the money all the same, so it is
    // acknowledged and recorded for refund (a refusal would only make the
    // provider retry it forever), and the hold runs on. Providers differ in
    // the case of currency codes ("eur"); the event's is upper case.
    let wrong_currency = !hook.currency.eq_ignore_ascii_case(&event.currency);
    let (hold, disposition) = if hook.amount_cents != hold.amount_cents || wrong_currency {
        tracing::warn!(%order_id, paid = hook.amount_cents, due = hold.amount_cents,
            paid_currency = %hook.currency, due_currency = %event.currency, "payment does not match the order");
        (hold, PaymentDisposition::RefundRequired)
    } else {
        match app
            .ledger
            .pay(event_id, order_id, &hook.payment_id)
            .await
            .map_err(|e| Problem::unavailable("redis", &e))?
        {
            PayOutcome::Paid(h) => (h, PaymentDisposition::Captured),
            PayOutcome::Refund(h) => (h, PaymentDisposition::RefundRequired),
            PayOutcome::UnknownOrder => return Err(ErrorCode::OrderNotFound.into()),
        }
    };
    let record = PaymentRecord {
        provider_event_id: hook.id.clone(),
        payment_id: hook.payment_id.clone(),
        amount_cents: hook.amount_cents,
        disposition,
    };
    app.publish_order_event(&hold.order_event(order_id, event_id, Some(record)), request_id).await?;
    counted(disposition.as_str());
    tracing::info!(%order_id, payment_id = %hook.payment_id, disposition = disposition.as_str(), "payment recorded");
    Ok(Json(serde_json::json!({ "status": disposition.as_str(), "order_state": hold.state })).into_response())
}
