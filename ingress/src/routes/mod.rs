//! The HTTP API: each route, its handler and the layers around it. Requests
//! are read by the extractors in [`crate::extract`] and every failure is a
//! problem+json answer, whether an extractor, a layer or a handler refuses.

mod events;
mod orders;
mod page;
mod purchases;
mod rooms;
mod streams;
mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::middleware;
use axum::routing::{get, patch, post, put};
use axum::Router;
use tower::ServiceBuilder;

use crate::layers::{self, refused};
use crate::problem::{ErrorCode, Problem};
use crate::state::AppState;

pub fn router(state: Arc<AppState>) -> Router {
    // Searches get a class of their own: a few slow `LIKE`s must not take
    // every MySQL connection from the purchase path. The excess is shed at
    // once (503, Retry-After) rather than queued behind them.
    let search = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(refused))
        .load_shed()
        .concurrency_limit(state.config.search_max_concurrent_requests);
    // Purchases in the handler at once are capped, and the excess shed at
    // once: when the broker slows, waiting purchases would otherwise pile
    // up in the producer until they time out (and a timed-out idempotent
    // producer must start a new epoch). Shedding keeps every admitted
    // purchase's wait short.
    let in_flight = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(layers::refused_purchase))
        .load_shed()
        .concurrency_limit(state.config.purchases_max_in_flight);
    let request_timeout = Duration::from_millis(state.config.http_request_timeout_ms);
    let purchases = middleware::from_fn_with_state(purchases::COUNTER, layers::count);
    // Public reads carry validators: availability and places move within a
    // second; a draw never changes once made.
    let live = || middleware::from_fn_with_state(1u32, layers::cacheable);
    let settled = || middleware::from_fn_with_state(300u32, layers::cacheable);
    let webhooks = middleware::from_fn_with_state(webhooks::COUNTER, layers::count);
    let order_actions = || middleware::from_fn_with_state(state.limits.clone(), layers::order_action_budget);
    // The buyers' API, under a budget per client address. Payments,
    // cancels, the provider's webhooks and the admin API are not: they have
    // budgets of their own, which no flood of buyers uses up.
    let buyers = Router::new()
        .route("/v1/events", get(events::list).layer(search).layer(live()))
        .route("/v1/events/{event_id}", get(events::get_one).layer(live()))
        .route("/v1/events/{event_id}/purchases", post(purchases::create).layer(in_flight).route_layer(purchases))
        .route("/v1/events/{event_id}/waiting-room", get(rooms::get_one).layer(live()))
        .route("/v1/events/{event_id}/waiting-room/draw", get(rooms::draw).layer(settled()))
        .route("/v1/events/{event_id}/queue", post(rooms::join).get(rooms::standing))
        .route("/v1/events/{event_id}/queue/challenge", get(rooms::challenge))
        .route("/v1/events/{event_id}/queue/events", get(streams::ticket))
        .route("/v1/intents/{intent_id}", get(purchases::status))
        .route("/v1/intents/{intent_id}/events", get(streams::intent))
        .route("/v1/orders/{order_id}", get(orders::get_one))
        .route("/waiting-room/{event_id}", get(page::waiting_room).layer(settled()))
        .route("/assets/waiting-room.js", get(page::script).layer(settled()))
        .route_layer(middleware::from_fn_with_state(state.clone(), layers::ip_budget));
    Router::new()
        .merge(buyers)
        .route("/v1/orders/{order_id}/cancel", post(orders::cancel).route_layer(order_actions()))
        .route("/v1/orders/{order_id}/payments", post(orders::start_payment).route_layer(order_actions()))
        .route("/v1/admin/events", post(events::create))
        .route("/v1/admin/events/{event_id}", patch(events::change))
        .route("/v1/admin/events/{event_id}/prewarm", post(events::prewarm))
        .route("/v1/admin/events/{event_id}/pause", post(events::pause))
        .route("/v1/admin/events/{event_id}/resume", post(events::resume))
        .route("/v1/admin/events/{event_id}/cancel", post(events::cancel))
        .route("/v1/admin/events/{event_id}/waiting-room", put(rooms::set).patch(rooms::change))
        .route("/v1/admin/events/{event_id}/waiting-room/beacon", put(rooms::set_beacon))
        .route("/v1/webhooks/payments", post(webhooks::payment).route_layer(webhooks).route_layer(order_actions()))
        .fallback(|| async { Problem::new(ErrorCode::NotFound) })
        .method_not_allowed_fallback(|| async { Problem::new(ErrorCode::MethodNotAllowed) })
        .layer(middleware::from_fn(layers::well_formed_uri))
        // The handler's future is dropped at the deadline. Every handler is
        // safe to stop at an await: a purchase retried with its key produces
        // the same intent, and the rest are reads or idempotent.
        .layer(ServiceBuilder::new().layer(HandleErrorLayer::new(refused)).timeout(request_timeout))
        .layer(middleware::from_fn(layers::record))
        .with_state(state)
}
