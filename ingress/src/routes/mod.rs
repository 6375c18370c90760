//! The HTTP API. Handlers read the body themselves (bounded) so that every
//! failure, including a body that is too large, is a problem+json answer.

mod events;
mod orders;
mod purchases;
mod webhooks;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::BoxError;
use axum::Router;
use tower::ServiceBuilder;
use tracing::Instrument;

use crate::metrics::{REQUESTS, REQUEST_DURATION};
use crate::problem::{ErrorCode, Problem};
use crate::AppState;

pub fn router(state: Arc<AppState>) -> Router {
    // Searches get a class of their own: a few slow `LIKE`s must not take
    // every MySQL connection from the purchase path. The excess is shed at
    // once (503, Retry-After) rather than queued behind them.
    let search = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(refused))
        .load_shed()
        .concurrency_limit(state.config.search_max_concurrent_requests);
    let request_timeout = Duration::from_millis(state.config.http_request_timeout_ms);
    Router::new()
        .route("/v1/events", get(events::list).layer(search))
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
        .layer(middleware::from_fn(well_formed_uri))
        // The handler's future is dropped at the deadline. Every handler is
        // safe to stop at an await: a purchase retried with its key produces
        // the same intent, and the rest are reads or idempotent.
        .layer(ServiceBuilder::new().layer(HandleErrorLayer::new(refused)).timeout(request_timeout))
        .layer(middleware::from_fn(record))
        .with_state(state)
}

/// The answer for a request a tower layer refused, told apart by the
/// error's type.
async fn refused(error: BoxError) -> Problem {
    if error.is::<tower::timeout::error::Elapsed>() {
        Problem::new(ErrorCode::RequestTimeout).retry_after(1)
    } else if error.is::<tower::load_shed::error::Overloaded>() {
        Problem::new(ErrorCode::Overloaded).retry_after(1)
    } else {
        tracing::error!(error = %error, "request failed in a layer");
        Problem::new(ErrorCode::Internal)
    }
}

/// Refuses a path or query whose percent-encoding is broken or does not
/// decode to UTF-8, before a route sees it (axum would answer plain text).
async fn well_formed_uri(request: Request, next: Next) -> Response {
    let uri = request.uri();
    if !decodes_to_utf8(uri.path()) {
        return Problem::new(ErrorCode::InvalidPath).detail("the path must be percent-encoded UTF-8").into_response();
    }
    if !uri.query().is_none_or(|q| decodes_to_utf8(&q.replace('+', " "))) {
        return Problem::new(ErrorCode::InvalidQuery).detail("the query must be percent-encoded UTF-8").into_response();
    }
    next.run(request).await
}

/// Whether every `%` starts two hex digits and the decoded bytes are UTF-8.
fn decodes_to_utf8(s: &str) -> bool {
    let bytes = s.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let Some(byte) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) else { return false };
            decoded.push(byte);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    std::str::from_utf8(&decoded).is_ok()
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

#[cfg(test)]
mod tests {
    use super::decodes_to_utf8;

    #[test]
    fn broken_percent_encoding_and_non_utf8_are_refused() {
        for ok in ["/v1/events/1", "/v1/events/caf%C3%A9", "q=a%20b&limit=10", ""] {
            assert!(decodes_to_utf8(ok), "{ok}");
        }
        for bad in ["/v1/events/%ZZ", "/v1/events/%F", "/v1/events/%", "/v1/events/%FF", "q=%C3"] {
            assert!(!decodes_to_utf8(bad), "{bad}");
        }
    }
}
