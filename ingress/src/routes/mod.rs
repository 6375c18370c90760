//! The HTTP API. Handlers read the body themselves (bounded) so that every
//! failure, including a body that is too large, is a problem+json answer.

mod events;
mod orders;
mod purchases;
mod webhooks;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use tracing::Instrument;

use crate::metrics::{REQUESTS, REQUEST_DURATION};
use crate::problem::{ErrorCode, Problem};
use crate::AppState;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/events", get(events::list))
        .route("/v1/events/{event_id}", get(events::get_one))
        .route("/v1/events/{event_id}/purchases", post(purchases::create))
        .route("/v1/intents/{intent_id}", get(purchases::status))
        .route("/v1/orders/{order_id}", get(orders::get_one))
        .route("/v1/orders/{order_id}/cancel", post(orders::cancel))
        .route("/v1/orders/{order_id}/payments", post(orders::start_payment))
        .route("/v1/admin/events", post(events::create))
        .route("/v1/admin/events/{event_id}/prewarm", post(events::prewarm))
        .route("/v1/webhooks/payments", post(webhooks::payment))
        .fallback(|| async { Problem::new(ErrorCode::NotFound) })
        .method_not_allowed_fallback(|| async { Problem::new(ErrorCode::MethodNotAllowed) })
        .layer(middleware::from_fn(record))
        .with_state(state)
}

/// The id that follows a request through every stage's logs: the caller's
/// `X-Request-Id` when it is sane, a fresh one otherwise.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

const REQUEST_ID: &str = "x-request-id";

/// Counts and times every request by route template (never the raw path),
/// status and error code: all bounded label values. Tags it with its request
/// id, in the logs and in the answer.
async fn record(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    request.extensions_mut().insert(RequestId(id.clone()));
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let span = tracing::info_span!("request", request_id = %id, route = %route);
    let mut response = next.run(request).instrument(span).await;
    if let Ok(value) = axum::http::HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    let code = response.extensions().get::<ErrorCode>().map_or("none", |c| c.as_str());
    metrics::counter!(REQUESTS, "route" => route.clone(), "method" => method.clone(),
        "status" => response.status().as_u16().to_string(), "error_code" => code)
    .increment(1);
    metrics::histogram!(REQUEST_DURATION, "route" => route, "method" => method).record(started.elapsed().as_secs_f64());
    response
}

/// Reads a body up to `limit` bytes.
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, Problem> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        // to_bytes reports an oversized body as a length-limit error; any
        // other failure is the client's connection breaking.
        let too_large = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            Problem::new(ErrorCode::PayloadTooLarge).detail(format!("at most {limit} bytes"))
        } else {
            Problem::new(ErrorCode::InvalidBody).detail("the body could not be read")
        }
    })
}
