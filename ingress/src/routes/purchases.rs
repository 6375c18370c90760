//! The purchase path: validate, admit, record the idempotency key, produce
//! the intent, and answer 202 only once the broker has it.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use dropline::kafka;
use dropline::messages::{now_ms, PurchaseIntent, RejectReason};
use dropline::stock::Verdict;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureRecord, Producer};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{read_body, RequestId};
use crate::extract;
use crate::intents::{intent_id, IntentRecord, Reservation};
use crate::metrics::{PRODUCER_QUEUE, PRODUCE_DURATION, PURCHASES};
use crate::orders::OrderView;
use crate::problem::{ErrorCode, Problem};
use crate::AppState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PurchaseRequest {
    quantity: u32,
}

#[derive(Debug, Serialize)]
struct Accepted {
    intent_id: Uuid,
    event_id: u64,
    quantity: u32,
    status: &'static str,
    status_url: String,
}

fn outcome(label: &'static str) {
    metrics::counter!(PURCHASES, "outcome" => label).increment(1);
}

pub async fn create(
    State(app): State<Arc<AppState>>,
    Path(raw_id): Path<String>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let result = admit(&app, &raw_id, &request_id.0, &headers, body).await;
    if let Err(p) = &result {
        outcome(match p.code {
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::SoldOut => "sold_out",
            ErrorCode::SaleNotOpen => "sale_not_open",
            ErrorCode::SaleClosed => "sale_closed",
            ErrorCode::BrokerUnavailable | ErrorCode::DependencyUnavailable => "unavailable",
            _ => "invalid",
        });
    }
    result
}

async fn admit(
    app: &AppState,
    raw_id: &str,
    request_id: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let claims = extract::bearer(&app.tokens, headers)?;
    let event_id = extract::event_id(raw_id)?;
    let key = extract::idempotency_key(headers)?;
    let body = read_body(body, app.config.max_body_bytes).await?;
    let request: PurchaseRequest = extract::json(headers, &body)?;

    let event = app.events.get(event_id).await.map_err(|e| Problem::unavailable("mysql", &e))?;
    let event = event.ok_or(ErrorCode::EventNotFound)?;
    if request.quantity == 0 || request.quantity > event.per_user_limit {
        return Err(Problem::new(ErrorCode::InvalidBody)
            .errors(vec![format!("quantity: must be 1 to {} for this event", event.per_user_limit)]));
    }

    app.limits.admit(&claims.sub).map_err(|r| Problem::new(ErrorCode::RateLimited).retry_after(r.retry_after_secs))?;

    let id = intent_id(&claims.sub, &key);
    let record = IntentRecord {
        event_id,
        user_id: claims.sub.clone(),
        quantity: request.quantity,
        accepted: false,
        accepted_at_ms: now_ms(),
    };
    // The key is checked before the sale's state, so a retry of a purchase
    // that was accepted gets the same 202 even after the event sold out.
    let fresh = match app.intents.reserve(id, &record).await.map_err(|e| Problem::unavailable("redis", &e))? {
        Reservation::Existing(earlier) if !earlier.same_request(&record) => {
            return Err(Problem::new(ErrorCode::IdempotencyKeyReused)
                .detail("this Idempotency-Key was first used for another event or quantity"));
        }
        Reservation::Existing(earlier) if earlier.accepted => {
            outcome("replayed");
            return Ok(accepted(id, &earlier));
        }
        // Seen but never acknowledged to the buyer: the intent may already
        // be on Kafka (the broker acked, then this answer failed). It must
        // not be refused now; produce it again (it is decided only once).
        Reservation::Existing(_) => false,
        Reservation::New => true,
    };

    // Cheap answers at the door, for new keys only. The allocator decides
    // for real; these spare it (and the buyer) a round trip that cannot
    // succeed.
    if fresh {
        if let Err(refused) = door(app, &event, event_id).await {
            // The intent may exist after all, if Redis lost the key's record
            // (its decision is rebuilt from MySQL): then it is a retry.
            let decided = app.ledger.verdict(event_id, id).await.map_err(|e| Problem::unavailable("redis", &e))?;
            if decided.is_none() {
                // Nothing was produced: forget the key, so a retry gets
                // the same answer rather than skipping the door.
                app.intents.forget(id).await.map_err(|e| Problem::unavailable("redis", &e))?;
                return Err(refused);
            }
        }
    }

    produce(app, &record, id, request_id).await?;
    app.intents.mark_accepted(id, &record).await.map_err(|e| Problem::unavailable("redis", &e))?;
    outcome("admitted");
    Ok(accepted(id, &record))
}

/// Refusals that need no decision: the sale's window, and a sell-out seen
/// within the last quarter second.
async fn door(app: &AppState, event: &crate::events::Event, event_id: u64) -> Result<(), Problem> {
    let now = chrono::Utc::now();
    if now < event.sale_opens_at {
        return Err(Problem::new(ErrorCode::SaleNotOpen).detail(format!("the sale opens at {}", event.sale_opens_at)));
    }
    if now >= event.sale_closes_at {
        return Err(ErrorCode::SaleClosed.into());
    }
    if app.events.recently_available(event_id).await == Some(0) {
        return Err(Problem::new(ErrorCode::SoldOut).retry_after(5));
    }
    Ok(())
}

/// Produces the intent and waits for the broker's acknowledgement. A full
/// local queue fails at once: under a flood, waiting would only pile up
/// connections.
async fn produce(app: &AppState, record: &IntentRecord, id: Uuid, request_id: &str) -> Result<(), Problem> {
    let intent = PurchaseIntent {
        intent_id: id,
        event_id: record.event_id,
        user_id: record.user_id.clone(),
        quantity: record.quantity,
        accepted_at_ms: record.accepted_at_ms,
    };
    let payload = serde_json::to_vec(&intent).map_err(|_| Problem::new(ErrorCode::Internal))?;
    let key = record.event_id.to_string();
    let started = Instant::now();
    let headers = kafka::request_id_headers(Some(request_id)).unwrap_or_default();
    let record = FutureRecord::to(&app.topics.intents).key(&key).payload(&payload).headers(headers);
    let delivery = app.producer.send_result(record);
    metrics::gauge!(PRODUCER_QUEUE).set(f64::from(app.producer.in_flight_count()));
    let delivery = match delivery {
        Ok(d) => d,
        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
            return Err(Problem::new(ErrorCode::BrokerUnavailable).detail("intake is saturated").retry_after(1));
        }
        Err((e, _)) => return Err(broker_failed(&e)),
    };
    match delivery.await {
        Ok(Ok(_)) => {
            metrics::histogram!(PRODUCE_DURATION).record(started.elapsed().as_secs_f64());
            Ok(())
        }
        Ok(Err((e, _))) => Err(broker_failed(&e)),
        Err(_) => Err(Problem::new(ErrorCode::BrokerUnavailable).retry_after(1)),
    }
}

fn broker_failed(e: &KafkaError) -> Problem {
    tracing::warn!(error = %e, "intent not acknowledged by the broker");
    Problem::new(ErrorCode::BrokerUnavailable).retry_after(1)
}

fn accepted(id: Uuid, record: &IntentRecord) -> Response {
    let status_url = format!("/v1/intents/{id}");
    let body = Accepted {
        intent_id: id,
        event_id: record.event_id,
        quantity: record.quantity,
        status: "queued",
        status_url: status_url.clone(),
    };
    (StatusCode::ACCEPTED, [("location", status_url)], Json(body)).into_response()
}

#[derive(Debug, Serialize)]
struct IntentStatus {
    intent_id: Uuid,
    event_id: u64,
    quantity: u32,
    /// queued, rejected, or the order's state: held, paid, cancelled, expired.
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<RejectReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    order: Option<OrderView>,
}

/// `GET /v1/intents/{id}`: where a purchase stands. Only its buyer sees it.
pub async fn status(
    State(app): State<Arc<AppState>>,
    Path(raw_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let claims = extract::bearer(&app.tokens, &headers)?;
    let id = extract::uuid(&raw_id, ErrorCode::NotFound)?;
    let record = app.intents.get(id).await.map_err(|e| Problem::unavailable("redis", &e))?;
    let Some(record) = record.filter(|r| r.user_id == claims.sub) else {
        return settled_status(&app, id, &claims.sub).await;
    };
    let verdict = app.ledger.verdict(record.event_id, id).await.map_err(|e| Problem::unavailable("redis", &e))?;
    let (status, reason, order) = match verdict {
        None => ("queued", None, None),
        Some(Verdict::Rejected { reason, .. }) => ("rejected", Some(reason), None),
        Some(Verdict::Held { .. }) => {
            let order = app.orders.view(id).await?.ok_or(ErrorCode::NotFound)?;
            (order.state.as_str(), None, Some(order))
        }
    };
    let body =
        IntentStatus { intent_id: id, event_id: record.event_id, quantity: record.quantity, status, reason, order };
    Ok(Json(body).into_response())
}

/// An intent Redis has forgotten, from the settler's record.
async fn settled_status(app: &AppState, id: Uuid, user: &str) -> Result<Response, Problem> {
    let row: Option<(u64, u32, String, Option<String>)> = sqlx::query_as(
        "SELECT event_id, quantity, CAST(outcome AS CHAR), reject_reason FROM intents \
         WHERE intent_id = ? AND user_id = ?",
    )
    .bind(id.to_string())
    .bind(user)
    .fetch_optional(&app.db)
    .await
    .map_err(|e| Problem::unavailable("mysql", &e))?;
    let (event_id, quantity, outcome, reason) = row.ok_or(ErrorCode::NotFound)?;
    let (status, reason, order) = if outcome == "held" {
        let order = app.orders.view(id).await?.ok_or(ErrorCode::NotFound)?;
        (order.state.as_str(), None, Some(order))
    } else {
        let reason = reason.and_then(|r| serde_json::from_value(serde_json::Value::String(r)).ok());
        ("rejected", reason, None)
    };
    Ok(Json(IntentStatus { intent_id: id, event_id, quantity, status, reason, order }).into_response())
}
