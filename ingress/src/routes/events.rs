//! Events: created and pre-warmed by admins, listed and read by buyers.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use dropline::messages::OrderState;
use dropline::stock::{EndOutcome, StockLevels};
use futures::StreamExt;
use serde::Serialize;

use crate::events::{Event, EventChanges, EventTerms};
use crate::extract::{Admin, EventId, JsonBody, NoBody, SearchQuery};
use crate::layers::RequestId;
use crate::problem::{ErrorCode, Problem};
use crate::state::AppState;

#[derive(Serialize)]
struct EventView {
    #[serde(flatten)]
    event: Event,
    /// Live counters from the stock ledger; absent before the pre-warm.
    #[serde(skip_serializing_if = "Option::is_none")]
    availability: Option<StockLevels>,
}

pub async fn create(
    State(app): State<Arc<AppState>>,
    _: Admin,
    JsonBody(new): JsonBody<EventTerms>,
) -> Result<Response, Problem> {
    Problem::unless_valid(new.problems(), "the event is not valid")?;
    let event = app.events.create(&new).await.map_err(|e| Problem::unavailable("mysql", &e))?;
    // Pre-warm right away; if Redis fails here the event exists and the
    // admin retries with the idempotent prewarm call.
    app.events.prewarm(&event).await.map_err(|e| Problem::unavailable("redis", &e))?;
    let availability = app.events.levels(event.id).await.ok().flatten();
    app.events.catalog.insert(event.clone(), availability);
    tracing::info!(event_id = event.id, capacity = event.terms.capacity, "event created");
    let location = format!("/v1/events/{}", event.id);
    Ok((StatusCode::CREATED, [("location", location)], Json(EventView { event, availability })).into_response())
}

/// `PATCH /v1/admin/events/{id}`: a host changes the event's capacity or
/// oversell allowance (mid-sale too), its date or its cancellation policy;
/// see
/// [`crate::events::Events::change`]. Each change is published as the
/// event's change (`event.capacity_changed`, `event.rescheduled`,
/// `event.policy_changed`).
pub async fn change(
    State(app): State<Arc<AppState>>,
    _: Admin,
    EventId(id): EventId,
    JsonBody(changes): JsonBody<EventChanges>,
) -> Result<Response, Problem> {
    if changes.capacity.is_none()
        && changes.oversell_allowance.is_none()
        && changes.starts_at.is_none()
        && changes.cancellation.is_none()
    {
        return Err(Problem::new(ErrorCode::InvalidBody)
            .detail("nothing to change: give capacity, oversell_allowance, starts_at or cancellation"));
    }
    let event = app.events.change(id, &changes).await?;
    tracing::info!(event_id = id, capacity = event.terms.capacity, oversell_allowance = event.terms.oversell_allowance,
        starts_at = %event.terms.starts_at, "event changed");
    let availability = app.events.levels(id).await.map_err(|e| Problem::unavailable("redis", &e))?;
    Ok(Json(EventView { event, availability }).into_response())
}

/// `POST /v1/admin/events/{id}/pause`: the sale stops taking purchases
/// (`sale_paused`) until resumed; holds already made run on and can be paid.
pub async fn pause(
    State(app): State<Arc<AppState>>,
    _: Admin,
    EventId(id): EventId,
    _: NoBody,
) -> Result<Response, Problem> {
    paused(&app, id, true).await
}

/// `POST /v1/admin/events/{id}/resume`: the sale takes purchases again.
pub async fn resume(
    State(app): State<Arc<AppState>>,
    _: Admin,
    EventId(id): EventId,
    _: NoBody,
) -> Result<Response, Problem> {
    paused(&app, id, false).await
}

async fn paused(app: &AppState, id: u64, paused: bool) -> Result<Response, Problem> {
    let event = app.events.set_paused(id, paused).await?;
    tracing::info!(event_id = id, paused, "sale paused or resumed");
    let availability = app.events.levels(id).await.map_err(|e| Problem::unavailable("redis", &e))?;
    Ok(Json(EventView { event, availability }).into_response())
}

/// `POST /v1/admin/events/{id}/cancel`: the host cancels the event. Its
/// sale stops for good (`event.cancelled`); then every hold is released and
/// every paid order cancelled with all of its price refunded through the
/// provider, each order announced to its buyer by its own changes
/// (`order.cancelled`, `order.refund_requested`, `order.refunded`). Calling
/// it again finishes what a failed call left and changes nothing else.
pub async fn cancel(
    State(app): State<Arc<AppState>>,
    _: Admin,
    EventId(id): EventId,
    RequestId(request_id): RequestId,
    _: NoBody,
) -> Result<Response, Problem> {
    let event = app.events.cancel(id).await?;
    let redis = |e: dropline::stock::LedgerError| Problem::unavailable("redis", &e);
    if app.events.levels(id).await.map_err(redis)?.is_none() && chrono::Utc::now() >= event.terms.sale_opens_at {
        // Redis lost the ledger: its orders are unknown until it is rebuilt
        // from the record (paused, as the record now says).
        app.ledger.request_rebuild(id, "an event cancelled without its ledger").await.map_err(redis)?;
        return Err(Problem::new(ErrorCode::DependencyUnavailable)
            .detail("the event is cancelled; its ledger is being rebuilt before its orders can be ended: retry shortly")
            .retry_after(2));
    }
    let holds = app.ledger.holds(id).await.map_err(redis)?;
    let ended = futures::stream::iter(holds)
        .map(|(order_id, hold)| {
            let (app, request_id) = (&app, &request_id);
            async move { end_order(app, id, order_id, hold, request_id).await }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let (mut released, mut refunded) = (0u64, 0u64);
    for e in ended {
        match e? {
            Ended::Released => released += 1,
            Ended::Refunded => refunded += 1,
            Ended::Before => {}
        }
    }
    tracing::info!(event_id = id, released, refunded, "event cancelled");
    let availability = app.events.levels(id).await.map_err(redis)?;
    Ok(Json(serde_json::json!({
        "event": EventView { event, availability },
        "holds_released": released,
        "paid_orders_refunded": refunded,
    }))
    .into_response())
}

/// What cancelling an event did to one of its orders.
enum Ended {
    /// A hold, released now.
    Released,
    /// A paid order, cancelled now with all of its price to refund.
    Refunded,
    /// It had ended before (its change is published again all the same: a
    /// call that failed before publishing it is finished this way).
    Before,
}

async fn end_order(
    app: &AppState,
    event_id: u64,
    order_id: uuid::Uuid,
    hold: dropline::stock::Hold,
    request_id: &str,
) -> Result<Ended, Problem> {
    let redis = |e: dropline::stock::LedgerError| Problem::unavailable("redis", &e);
    let (user, amount) = (hold.user_id.clone(), hold.amount_cents);
    let cancel_paid = || app.ledger.cancel_paid(event_id, order_id, &user, amount);
    let (outcome, ended) = match hold.state {
        OrderState::Held => match app.ledger.cancel(event_id, order_id, &user).await.map_err(redis)? {
            // Paid since the holds were read: refunded like the others.
            EndOutcome::Ended(h) if h.state == OrderState::Paid => {
                (cancel_paid().await.map_err(redis)?, Ended::Refunded)
            }
            outcome => (outcome, Ended::Released),
        },
        OrderState::Paid => (cancel_paid().await.map_err(redis)?, Ended::Refunded),
        _ => (EndOutcome::Ended(hold), Ended::Before),
    };
    let EndOutcome::Ended(now) = outcome else { return Ok(Ended::Before) };
    app.publish_order_event(&now.order_event(order_id, event_id, None), request_id).await?;
    Ok(if now.state == OrderState::Cancelled { ended } else { Ended::Before })
}

pub async fn prewarm(
    State(app): State<Arc<AppState>>,
    _: Admin,
    EventId(id): EventId,
    _: NoBody,
) -> Result<Response, Problem> {
    // The record's event, not a snapshot's: a host may have changed its
    // capacity or paused it since.
    let event = app.events.fresh(id).await.map_err(|e| Problem::unavailable("mysql", &e))?;
    let event = event.ok_or(ErrorCode::EventNotFound)?;
    // Once the sale has opened, a missing ledger is one Redis lost: a
    // fresh one would sell again what MySQL has sold. Only a rebuild from
    // the record may bring it back, so that is what is asked for.
    let present = app.events.levels(id).await.map_err(|e| Problem::unavailable("redis", &e))?.is_some();
    if !present && chrono::Utc::now() >= event.terms.sale_opens_at {
        let why = "an admin asked to pre-warm a missing ledger after the sale opened";
        app.ledger.request_rebuild(id, why).await.map_err(|e| Problem::unavailable("redis", &e))?;
        tracing::warn!(event_id = id, "pre-warm after the opening: a rebuild from MySQL was requested instead");
        let body = serde_json::json!({ "event_id": id, "created": false, "rebuild_requested": true });
        return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
    }
    let created = app.events.prewarm(&event).await.map_err(|e| Problem::unavailable("redis", &e))?;
    let availability = app.events.levels(id).await.map_err(|e| Problem::unavailable("redis", &e))?;
    Ok(Json(serde_json::json!({ "event_id": id, "created": created, "availability": availability })).into_response())
}

/// `GET /v1/events/{id}`: from the snapshot, counters at most a refresh
/// old. An event it does not have yet (created on another replica since)
/// is read from the record once per cache period, its counters from Redis.
pub async fn get_one(State(app): State<Arc<AppState>>, EventId(id): EventId) -> Result<Response, Problem> {
    if let Some((event, availability)) = app.events.catalog.get(id) {
        return Ok(Json(EventView { event: Event::clone(&event), availability }).into_response());
    }
    let event = app.events.get(id).await.map_err(|e| Problem::unavailable("mysql", &e))?;
    let event = Event::clone(&*event.ok_or(ErrorCode::EventNotFound)?);
    let availability = app.events.levels(id).await.map_err(|e| Problem::unavailable("redis", &e))?;
    Ok(Json(EventView { event, availability }).into_response())
}

#[derive(Serialize)]
struct EventPage {
    events: Vec<Event>,
    /// Pass as `after` for the next page; absent on the last one.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_after: Option<u64>,
}

/// `GET /v1/events?q=<text>&after=<id>&limit=<1..100>`
pub async fn list(State(app): State<Arc<AppState>>, search: SearchQuery) -> Result<Response, Problem> {
    let SearchQuery { q, after, limit } = search;
    let events = app.events.search(q.as_deref(), after, limit).await.map_err(|e| Problem::unavailable("mysql", &e))?;
    let next_after = (events.len() == limit as usize).then(|| events.last().map(|e| e.id)).flatten();
    Ok(Json(EventPage { events, next_after }).into_response())
}
