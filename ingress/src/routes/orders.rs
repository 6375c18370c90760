//! A buyer's order: read it, cancel it, start paying for it.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use dropline::messages::OrderState;
use dropline::payments::{CreatePayment, PaymentSession};
use dropline::stock::EndOutcome;
use uuid::Uuid;

use crate::extract::{Buyer, NoBody, OrderId};
use crate::layers::RequestId;
use crate::orders::{not_ready, Lookup, OrderView, Source};
use crate::problem::{ErrorCode, Problem};
use crate::state::AppState;

/// The order if it exists and belongs to `user`; anyone else gets 404, so
/// order ids cannot be probed. An order handed out whose records are
/// catching up (after a fault) gets a retryable 503, never 404.
async fn owned(app: &AppState, order_id: Uuid, user: &str) -> Result<OrderView, Problem> {
    match app.orders.find(order_id, user).await? {
        Lookup::Found(order) => Ok(order),
        Lookup::Pending => Err(not_ready()),
        Lookup::Unknown => Err(ErrorCode::OrderNotFound.into()),
    }
}

/// An order MySQL has as held but the ledger has no hold for: Redis came
/// back behind. Nothing can change the hold until the ledger has it again,
/// so ask for the rebuild that puts it back and have the buyer retry.
async fn ledger_behind(app: &AppState, order: &OrderView) -> Problem {
    tracing::warn!(order_id = %order.order_id, event_id = order.event_id,
        "the record holds an order the ledger has lost; asking for a rebuild");
    if let Err(e) = app.ledger.request_rebuild(order.event_id, "a held order is missing from the ledger").await {
        return Problem::unavailable("redis", &e);
    }
    not_ready()
}

pub async fn get_one(
    State(app): State<Arc<AppState>>,
    Buyer(claims): Buyer,
    OrderId(id): OrderId,
) -> Result<Response, Problem> {
    Ok(Json(owned(&app, id, &claims.sub).await?).into_response())
}

/// `POST /v1/orders/{id}/cancel`: the buyer gives an unpaid hold back, or a
/// paid order within the event's cancellation policy (the policy's share of
/// the payment is then refunded through the provider); the stock is on sale
/// again as soon as this returns.
pub async fn cancel(
    State(app): State<Arc<AppState>>,
    Buyer(claims): Buyer,
    OrderId(id): OrderId,
    request_id: RequestId,
    _: NoBody,
) -> Result<Response, Problem> {
    let order = owned(&app, id, &claims.sub).await?;
    let event_id = order.event_id;
    let outcome = app.ledger.cancel(event_id, id, &claims.sub).await.map_err(|e| Problem::unavailable("redis", &e))?;
    let hold = match outcome {
        EndOutcome::Ended(hold) if hold.state == OrderState::Paid => cancel_paid(&app, &order, &claims.sub).await?,
        EndOutcome::Ended(hold) => hold,
        // The order exists (found above) but the ledger has no hold for it.
        // An ended order's state in the record is its answer; a held one
        // waits for the ledger to have it back.
        EndOutcome::UnknownOrder => {
            return match (order.source, order.state) {
                (Source::Record, OrderState::Held) | (Source::Ledger, _) => Err(ledger_behind(&app, &order).await),
                (Source::Record, _) => cancelled(order),
            };
        }
        EndOutcome::NotDue { .. } => return Err(ErrorCode::Internal.into()),
    };
    // Whatever state the hold is in now, tell the settler (again, if it was
    // told before: it applies each state once). If this fails, the buyer's
    // retry and the expirer's pass at the deadline both publish it again.
    app.publish_order_event(&hold.order_event(id, event_id, None), &request_id.0).await?;
    cancelled(OrderView::from_hold(id, event_id, &hold))
}

/// Cancels a paid order if the event's policy allows it now, noting the
/// share of its payment to refund. The event is read from the record: a
/// host may have just changed the policy.
async fn cancel_paid(app: &AppState, order: &OrderView, user: &str) -> Result<dropline::stock::Hold, Problem> {
    let event = app.events.fresh(order.event_id).await.map_err(|e| Problem::unavailable("mysql", &e))?;
    let event = event.ok_or(ErrorCode::Internal)?;
    let Some(refund_cents) = event.refund_on_cancel(order.amount_cents, chrono::Utc::now()) else {
        let detail = match event.cancel_paid_until {
            Some(until) => format!("paid orders of this event could be cancelled until {until}"),
            None => "paid orders of this event cannot be cancelled".to_owned(),
        };
        return Err(Problem::new(ErrorCode::CancellationNotAllowed).detail(detail));
    };
    let outcome = app
        .ledger
        .cancel_paid(order.event_id, order.order_id, user, refund_cents)
        .await
        .map_err(|e| Problem::unavailable("redis", &e))?;
    match outcome {
        EndOutcome::Ended(hold) => Ok(hold),
        EndOutcome::UnknownOrder | EndOutcome::NotDue { .. } => Err(ErrorCode::Internal.into()),
    }
}

/// The answer to a cancel, by the state the order ended in.
fn cancelled(view: OrderView) -> Result<Response, Problem> {
    match view.state {
        OrderState::Cancelled => Ok(Json(view).into_response()),
        other => Err(not_payable(other)),
    }
}

/// `POST /v1/orders/{id}/payments`: opens a payment with the provider. The
/// provider confirms it later through the signed webhook.
///
/// The first start extends the hold once (DROPLINE_PAYMENT_HOLD_EXTENSION_SECS)
/// and is published as the order's `payment_started` change; `pay_before`
/// is the extended deadline. A start after a declined attempt opens the
/// same payment again (one per order) and extends nothing.
pub async fn start_payment(
    State(app): State<Arc<AppState>>,
    Buyer(claims): Buyer,
    OrderId(id): OrderId,
    request_id: RequestId,
    _: NoBody,
) -> Result<Response, Problem> {
    let order = owned(&app, id, &claims.sub).await?;
    // Held in the record but not in the ledger: a payment opened now would
    // find no hold to pay.
    if order.source == Source::Record && order.state == OrderState::Held {
        return Err(ledger_behind(&app, &order).await);
    }
    if order.state != OrderState::Held {
        return Err(not_payable(order.state));
    }
    if order.expires_at <= chrono::Utc::now() {
        return Err(ErrorCode::OrderExpired.into());
    }
    let session = open_payment(&app, &order).await?;
    // The extension comes once the provider has the payment: a provider
    // that failed spends none of it.
    let extension_ms = app.config.payment_hold_extension_secs * 1000;
    let hold = app
        .ledger
        .start_payment(order.event_id, id, extension_ms)
        .await
        .map_err(|e| Problem::unavailable("redis", &e))?;
    let Some(hold) = hold else { return Err(ledger_behind(&app, &order).await) };
    if hold.state != OrderState::Held {
        // It ended while the payment was being opened (its deadline passed,
        // or the buyer cancelled it elsewhere).
        return Err(not_payable(hold.state));
    }
    // Published on every start, not only the one that extended: the settler
    // records the start once, and a start whose publication failed is
    // published by the buyer's retry.
    app.publish_order_event(&hold.order_event(id, order.event_id, None), &request_id.0).await?;
    let pay_before = dropline::db::from_ms(hold.expires_at_ms);
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "order_id": id,
            "payment_id": session.payment_id,
            "checkout_url": session.checkout_url,
            "amount_cents": session.amount_cents,
            "currency": session.currency,
            "pay_before": pay_before,
        })),
    )
        .into_response())
}

/// Asks the provider for a payment of `order`, the order id as its
/// idempotency key: one payment per order.
async fn open_payment(app: &AppState, order: &OrderView) -> Result<PaymentSession, Problem> {
    let event = app.events.get(order.event_id).await.map_err(|e| Problem::unavailable("mysql", &e))?;
    let currency = event.map(|e| e.terms.currency.clone()).ok_or(ErrorCode::Internal)?;
    let request = CreatePayment { order_id: order.order_id, amount_cents: order.amount_cents, currency };
    let url = format!("{}/v1/payments", app.config.provider.base());
    let answer = app
        .http
        .post(&url)
        .header("idempotency-key", order.order_id.to_string())
        .json(&request)
        .send()
        .await
        .and_then(|r| r.error_for_status());
    match answer {
        Ok(r) => r.json().await.map_err(|e| provider_failed(&e)),
        Err(e) => Err(provider_failed(&e)),
    }
}

/// Why an order that is not held cannot be paid (or cancelled).
fn not_payable(state: OrderState) -> Problem {
    match state {
        OrderState::Expired => Problem::new(ErrorCode::OrderExpired).detail("the hold had already expired"),
        OrderState::Voided => voided(),
        other => Problem::new(ErrorCode::OrderNotHeld).detail(format!("the order is {}", other.as_str())),
    }
}

/// What a buyer hears about a hold the record refused (see the settler's
/// claims): nothing to pay, and any payment made is refunded.
fn voided() -> Problem {
    Problem::new(ErrorCode::OrderVoided)
        .detail("the ledger had lost track of this ticket and it belongs to an earlier order; nothing is charged, and any payment made for it is refunded")
}

fn provider_failed(e: &reqwest::Error) -> Problem {
    tracing::warn!(error = %e, "payment provider failed");
    Problem::new(ErrorCode::PaymentProviderUnavailable).retry_after(2)
}
