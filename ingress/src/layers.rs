//! The layers around every route, for what every request shares: its
//! request id, metrics and logs ([`record`]), a well-formed URI, and the
//! answers for requests a timeout or a load shedder refused ([`refused`]);
//! the outcome counters some routes add ([`count`]); and the validators of
//! public reads ([`cacheable`]).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::BoxError;
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::metrics::{REQUESTS, REQUEST_DURATION};
use crate::peer::PeerAddr;
use crate::problem::{ErrorCode, Problem};
use crate::state::AppState;

/// The answer for a request a tower layer refused, told apart by the
/// error's type.
pub async fn refused(error: BoxError) -> Problem {
    if error.is::<tower::timeout::error::Elapsed>() {
        Problem::new(ErrorCode::RequestTimeout).retry_after(1)
    } else if error.is::<tower::load_shed::error::Overloaded>() {
        Problem::new(ErrorCode::Overloaded).retry_after(1)
    } else {
        tracing::error!(error = %error, "request failed in a layer");
        Problem::new(ErrorCode::Internal)
    }
}

/// [`refused`] for the purchase route: a purchase shed at the in-flight cap
/// is `busy` (429, like the admission limit: a refusal a flood expects),
/// not a 503 an SRE's error-rate alert would count.
pub async fn refused_purchase(error: BoxError) -> Problem {
    if error.is::<tower::load_shed::error::Overloaded>() {
        Problem::new(ErrorCode::Busy).retry_after(1)
    } else {
        refused(error).await
    }
}

/// Refuses a path or query whose percent-encoding is broken or does not
/// decode to UTF-8, before a route sees it (axum would answer plain text).
pub async fn well_formed_uri(request: Request, next: Next) -> Response {
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
pub async fn record(mut request: Request, next: Next) -> Response {
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
    metrics::counter!(REQUESTS.name, "route" => route.clone(), "method" => method.clone(),
        "status" => response.status().as_u16().to_string(), "error_code" => code)
    .increment(1);
    metrics::histogram!(REQUEST_DURATION.name, "route" => route, "method" => method)
        .record(started.elapsed().as_secs_f64());
    response
}

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = Problem;

    /// The id [`record`] gave the request.
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        parts.extensions.get::<RequestId>().cloned().ok_or_else(|| Problem::new(ErrorCode::Internal))
    }
}

/// What a handler says a success was, for its route's [`Counter`].
#[derive(Debug, Clone, Copy)]
pub struct Outcome(pub &'static str);

impl Outcome {
    pub fn mark(self, mut response: Response) -> Response {
        response.extensions_mut().insert(self);
        response
    }
}

/// A route's counter of answers by outcome: a problem counts under the
/// label `of_problem` gives its code, a success under the [`Outcome`] its
/// handler marked it with (an unmarked one is not counted). As a layer, it
/// also counts what the extractors refuse.
#[derive(Debug, Clone, Copy)]
pub struct Counter {
    pub metric: &'static str,
    pub label: &'static str,
    pub of_problem: fn(ErrorCode) -> &'static str,
}

pub async fn count(State(counter): State<Counter>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let outcome = match response.extensions().get::<ErrorCode>() {
        Some(code) => Some((counter.of_problem)(*code)),
        None => response.extensions().get::<Outcome>().map(|o| o.0),
    };
    if let Some(outcome) = outcome {
        metrics::counter!(counter.metric, counter.label => outcome).increment(1);
    }
    response
}

/// The order actions' own budget (payments, cancels, the provider's
/// webhooks): past it, `429` with `Retry-After`. No purchase uses it.
pub async fn order_action_budget(
    State(limits): State<std::sync::Arc<crate::limits::Limits>>,
    request: Request,
    next: Next,
) -> Response {
    match limits.order_action() {
        Ok(()) => next.run(request).await,
        Err(r) => Problem::new(ErrorCode::RateLimited).retry_after(r.retry_after_secs).into_response(),
    }
}

/// The buyers' API's budget per client address: the connection's peer, or
/// behind the deployment's own proxies, the client they forwarded for. A
/// request driven without a socket has no address and no such budget.
pub async fn ip_budget(State(app): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(PeerAddr(peer)) = request.extensions().get::<PeerAddr>().copied() {
        let client = app.proxies.client(peer.ip(), request.headers());
        if let Err(r) = app.limits.ip(client) {
            return Problem::new(ErrorCode::RateLimited)
                .detail("too many requests from your network address")
                .retry_after(r.retry_after_secs)
                .into_response();
        }
    }
    next.run(request).await
}

/// Public reads: an answer `200` gets a strong `ETag` (a hash of its body)
/// and `Cache-Control: public, max-age=<state>`, and a request whose
/// `If-None-Match` names that tag gets `304` without the body. Caches in
/// front of the ingress and pollers (`dropctl verify-draw`, a waiting-room
/// page) then move bytes only when something changed.
pub async fn cacheable(State(max_age_secs): State<u32>, request: Request, next: Next) -> Response {
    let asked = request.headers().get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let response = next.run(request).await;
    if response.status() != StatusCode::OK {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return Problem::new(ErrorCode::Internal).into_response();
    };
    let digest = Sha256::digest(&bytes);
    let tag = format!("\"{}\"", hex::encode(&digest[..16]));
    let cache_control = format!("public, max-age={max_age_secs}");
    for (name, value) in [(header::ETAG, &tag), (header::CACHE_CONTROL, &cache_control)] {
        if let Ok(value) = HeaderValue::from_str(value) {
            parts.headers.insert(name, value);
        }
    }
    if asked.is_some_and(|asked| names_tag(&asked, &tag)) {
        let mut not_modified = StatusCode::NOT_MODIFIED.into_response();
        for name in [header::ETAG, header::CACHE_CONTROL] {
            if let Some(value) = parts.headers.get(&name) {
                not_modified.headers_mut().insert(name, value.clone());
            }
        }
        return not_modified;
    }
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// Whether an `If-None-Match` list names `tag` (weakly: a `W/` prefix is
/// ignored), or is `*`.
fn names_tag(asked: &str, tag: &str) -> bool {
    asked.split(',').map(str::trim).any(|t| t == "*" || t.trim_start_matches("W/") == tag)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use axum::body::Body;
    use axum::http::StatusCode;
    use axum::routing::post;
    use axum::Router;
    use metrics::{Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};
    use tower::ServiceExt;

    use super::*;
    use crate::extract::IdempotencyKey;

    /// The counters asked for, with their labels.
    #[derive(Default)]
    struct Asked(Mutex<Vec<String>>);

    impl metrics::Recorder for Asked {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> metrics::Counter {
            let labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
            self.0.lock().unwrap().push(format!("{}{{{}}}", key.name(), labels.join(",")));
            metrics::Counter::noop()
        }

        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }

        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    #[test]
    fn a_route_counts_what_its_extractors_refuse_and_what_its_handler_marks() {
        fn refused(_: ErrorCode) -> &'static str {
            "refused"
        }
        async fn handler(_: IdempotencyKey) -> Response {
            Outcome("done").mark(StatusCode::OK.into_response())
        }
        let counter = Counter { metric: "test_total", label: "outcome", of_problem: refused };
        let app =
            Router::new().route("/", post(handler).route_layer(axum::middleware::from_fn_with_state(counter, count)));
        let asked = Asked::default();
        metrics::with_local_recorder(&asked, || {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            runtime.block_on(async {
                for key in [None, Some("k1")] {
                    let request = Request::post("/");
                    let request = match key {
                        Some(key) => request.header("idempotency-key", key),
                        None => request,
                    };
                    app.clone().oneshot(request.body(Body::empty()).unwrap()).await.unwrap();
                }
            })
        });
        assert_eq!(*asked.0.lock().unwrap(), ["test_total{outcome=refused}", "test_total{outcome=done}"]);
    }

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
