//! Requests the ingress refuses before it reads a store, each answered with
//! problem+json and a stable code, through the router without a socket.
//!
//! No service runs: the router's clients point at a closed port and connect
//! only on first use, so a refusal that consulted Redis, MySQL or the broker
//! would come out as 503 `dependency_unavailable` instead of its own code,
//! and nothing a refused request could have changed is reachable. The
//! refusals that need the stores (an unknown event, someone else's order)
//! are in `api.rs`.

use std::time::Duration;

use axum::body::Body;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::request::Builder;
use axum::http::{HeaderValue, Method, Request, StatusCode};
use axum::Router;
use clap::Parser;
use dropline::auth::{Audience, TokenKeys, Tokens};
use dropline::payments::{sign, SIGNATURE_HEADER};
use dropline_ingress::IngressConfig;
use dropline_testkit::{assert_problem, event_body, Secrets};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

/// Where nothing listens.
const CLOSED: &str = "127.0.0.1:1";
const PURCHASE: &str = "/v1/events/1/purchases";

/// The ingress's routes over clients of services that are down.
struct Api {
    router: Router,
    secrets: Secrets,
    keys: Tokens,
}

impl Api {
    fn new() -> Api {
        // A case that does reach MySQL fails its test at once.
        Api::with(CLOSED, &["--mysql-acquire-timeout-ms=200"])
    }

    /// The routes with MySQL at `mysql` and these settings besides.
    fn with(mysql: &str, settings: &[&str]) -> Api {
        let secrets = Secrets::generate();
        let args = [
            "ingress".to_owned(),
            format!("--redis-url=redis://{CLOSED}"),
            format!("--mysql-url=mysql://root@{mysql}/dropline"),
            format!("--kafka-brokers={CLOSED}"),
            "--max-body-bytes=1024".to_owned(),
        ];
        let settings = settings.iter().map(|s| s.to_string());
        let config = IngressConfig::parse_from(args.into_iter().chain(settings).chain(secrets.ingress_args()));
        let router = dropline_ingress::router(config).expect("the router builds without any service");
        Api { router, keys: secrets.tokens(), secrets }
    }

    fn token(&self, user: &str) -> String {
        self.keys.buyer.mint(user, 600).unwrap()
    }

    fn admin_token(&self) -> String {
        self.keys.admin.mint("admin", 600).unwrap()
    }

    async fn send(&self, request: Request<Body>) -> axum::response::Response {
        self.router.clone().oneshot(request).await.unwrap()
    }

    /// Sends `request` and checks it was refused with `status` and `code`.
    async fn refused(&self, request: Request<Body>, status: StatusCode, code: &str) -> Value {
        let what = format!("{} {}", request.method(), request.uri());
        let response = self.send(request).await;
        let got = response.status();
        let content_type = response.headers().get(CONTENT_TYPE).map(|v| v.to_str().unwrap().to_owned());
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        println!("{what}: {got} {body}");
        assert_problem(got, content_type.as_deref(), &body, status, code);
        body
    }
}

fn request(method: Method, uri: &str) -> Builder {
    Request::builder().method(method).uri(uri)
}

/// Finishing touches for a request under construction.
trait Build {
    fn bearer(self, token: &str) -> Self;
    /// The body as written (not re-encoded), as JSON.
    fn json(self, body: impl Into<String>) -> Request<Body>;
    fn empty(self) -> Request<Body>;
}

impl Build for Builder {
    fn bearer(self, token: &str) -> Self {
        self.header(AUTHORIZATION, format!("Bearer {token}"))
    }

    fn json(self, body: impl Into<String>) -> Request<Body> {
        self.header(CONTENT_TYPE, "application/json").body(Body::from(body.into())).unwrap()
    }

    fn empty(self) -> Request<Body> {
        self.body(Body::empty()).unwrap()
    }
}

#[tokio::test]
async fn bad_purchases_are_refused_before_any_store() {
    let api = Api::new();
    let token = api.token("alice");
    let buy = |key: &str| request(Method::POST, PURCHASE).bearer(&token).header("idempotency-key", key);
    let one = r#"{"quantity": 1}"#;
    let foreign = TokenKeys::new(&[7; 32], "dropline", Audience::Buyer).mint("alice", 60).unwrap();
    let in_path = |path: &str| request(Method::POST, path).bearer(&token).header("idempotency-key", "k1").json(one);
    let cases = [
        ("no token", request(Method::POST, PURCHASE).json(one), StatusCode::UNAUTHORIZED, "unauthorized"),
        (
            "not a JWT",
            request(Method::POST, PURCHASE).bearer("not-a-jwt").header("idempotency-key", "k").json(one),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "a token of another secret",
            request(Method::POST, PURCHASE).bearer(&foreign).header("idempotency-key", "k").json(one),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "an admin token",
            request(Method::POST, PURCHASE).bearer(&api.admin_token()).header("idempotency-key", "k").json(one),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "a non-UTF-8 token",
            request(Method::POST, PURCHASE)
                .header(AUTHORIZATION, HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap())
                .header("idempotency-key", "k1")
                .json(one),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "no key",
            request(Method::POST, PURCHASE).bearer(&token).json(one),
            StatusCode::BAD_REQUEST,
            "missing_idempotency_key",
        ),
        ("a long key", buy(&"k".repeat(300)).json(one), StatusCode::BAD_REQUEST, "invalid_header"),
        ("two keys", buy("k1").header("idempotency-key", "k2").json(one), StatusCode::BAD_REQUEST, "invalid_header"),
        (
            "a non-ASCII key",
            request(Method::POST, PURCHASE)
                .bearer(&token)
                .header("idempotency-key", HeaderValue::from_bytes(b"k\xff").unwrap())
                .json(one),
            StatusCode::BAD_REQUEST,
            "invalid_header",
        ),
        (
            "no content type",
            buy("k1").body(Body::from(one)).unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "latin-1 JSON",
            buy("k1").header(CONTENT_TYPE, "application/json; charset=latin1").body(Body::from(one)).unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        ("truncated JSON", buy("k1").json(r#"{"quantity": "#), StatusCode::BAD_REQUEST, "invalid_body"),
        ("an array", buy("k1").json("[1]"), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body_shape"),
        ("a number", buy("k1").json("1"), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body_shape"),
        ("null", buy("k1").json("null"), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body_shape"),
        (
            "a string quantity",
            buy("k1").json(r#"{"quantity": "one"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body_shape",
        ),
        (
            "a float quantity",
            buy("k1").json(r#"{"quantity": 1.5}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body_shape",
        ),
        (
            "a negative quantity",
            buy("k1").json(r#"{"quantity": -1}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body_shape",
        ),
        (
            "an unknown field",
            buy("k1").json(r#"{"quantity": 1, "price": 0}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body_shape",
        ),
        (
            "a repeated field",
            buy("k1").json(r#"{"quantity": 1, "quantity": 2}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body_shape",
        ),
        ("too large", buy("k1").json(" ".repeat(4096)), StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        (
            "a compressed body",
            buy("k1").header("content-encoding", "gzip").json(one),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        ("a broken escape in the path", in_path("/v1/events/%ZZ/purchases"), StatusCode::BAD_REQUEST, "invalid_path"),
        ("a non-UTF-8 path", in_path("/v1/events/1%FF/purchases"), StatusCode::BAD_REQUEST, "invalid_path"),
        ("a broken query", in_path("/v1/events/1/purchases?x=%E0%A4"), StatusCode::BAD_REQUEST, "invalid_query"),
        (
            "an event id that is not a number",
            in_path("/v1/events/abc/purchases"),
            StatusCode::NOT_FOUND,
            "event_not_found",
        ),
        ("event 0", in_path("/v1/events/0/purchases"), StatusCode::NOT_FOUND, "event_not_found"),
        ("a signed event id", in_path("/v1/events/+1/purchases"), StatusCode::NOT_FOUND, "event_not_found"),
        ("a leading zero", in_path("/v1/events/01/purchases"), StatusCode::NOT_FOUND, "event_not_found"),
    ];
    for (case, req, status, code) in cases {
        println!("{case}");
        api.refused(req, status, code).await;
    }
}

#[tokio::test]
async fn bad_event_requests_are_refused_before_any_store() {
    let api = Api::new();
    let admin = api.admin_token();
    let create = || request(Method::POST, "/v1/admin/events").bearer(&admin);
    api.refused(create().body(Body::from("{}")).unwrap(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
        .await;
    let mut extra = event_body(0);
    extra["discount"] = json!(10);
    let mut wrong = event_body(0);
    wrong["capacity"] = json!("5");
    let twice = event_body(0).to_string().replacen('{', "{\"capacity\": 9,", 1);
    for body in [
        json!({"name": "x"}).to_string(),
        json!([event_body(0)]).to_string(),
        extra.to_string(),
        wrong.to_string(),
        twice,
    ] {
        api.refused(create().json(body), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body_shape").await;
    }
    let mut bad = event_body(0);
    bad["capacity"] = json!(0);
    bad["currency"] = json!("euro");
    bad["per_user_limit"] = json!(0);
    bad["sale_closes_at"] = bad["sale_opens_at"].clone();
    bad["name"] = json!("  ");
    let body = api.refused(create().json(bad.to_string()), StatusCode::BAD_REQUEST, "invalid_body").await;
    assert_eq!(body["errors"].as_array().unwrap().len(), 5, "every problem is reported at once: {body}");
    // A date MySQL cannot keep is refused before it reaches the record.
    for at in ["+10000-01-01T00:00:00Z", "0001-01-01T00:00:00Z"] {
        let mut far = event_body(0);
        far["starts_at"] = json!(at);
        let body = api.refused(create().json(far.to_string()), StatusCode::BAD_REQUEST, "invalid_body").await;
        assert!(body["errors"][0].as_str().unwrap().starts_with("starts_at:"), "{body}");
    }

    let get = |uri: &str| request(Method::GET, uri).empty();
    for uri in ["/v1/events/0", "/v1/events/12x"] {
        api.refused(get(uri), StatusCode::NOT_FOUND, "event_not_found").await;
    }
    for query in ["limit=0", "limit=abc&after=-1", "colour=red", "q=%FF", "q=%Z1", "limit=1&limit=2"] {
        api.refused(get(&format!("/v1/events?{query}")), StatusCode::BAD_REQUEST, "invalid_query").await;
    }
    let long = get(&format!("/v1/events?q={}", "a".repeat(201)));
    let refusal = api.refused(long, StatusCode::BAD_REQUEST, "invalid_query").await;
    assert!(refusal["errors"][0].as_str().unwrap().starts_with("q:"), "{refusal}");
    for uri in ["/v1/events/%ZZ", "/v1/events/1%C3"] {
        api.refused(get(uri), StatusCode::BAD_REQUEST, "invalid_path").await;
    }
    let prewarm = request(Method::POST, "/v1/admin/events/%FF/prewarm").bearer(&admin).empty();
    api.refused(prewarm, StatusCode::BAD_REQUEST, "invalid_path").await;
    let prewarm = request(Method::POST, "/v1/admin/events/1/prewarm").bearer(&admin).json(r#"{"capacity": 5}"#);
    api.refused(prewarm, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body_shape").await;
    api.refused(get("/v1/nowhere"), StatusCode::NOT_FOUND, "not_found").await;
    let delete = request(Method::DELETE, "/v1/events").empty();
    api.refused(delete, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
}

#[tokio::test]
async fn bad_order_and_intent_requests_are_refused_before_any_store() {
    let api = Api::new();
    let token = api.token("fred");
    let order = uuid::Uuid::new_v4();
    for (method, path) in [
        (Method::GET, format!("/v1/orders/{order}")),
        (Method::POST, format!("/v1/orders/{order}/cancel")),
        (Method::POST, format!("/v1/orders/{order}/payments")),
        (Method::GET, format!("/v1/intents/{order}")),
    ] {
        api.refused(request(method, &path).empty(), StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    // Only the lower-case hyphenated form names an order: one order, one URL.
    let braced = format!("{{{order}}}");
    let urn = format!("urn:uuid:{order}");
    let simple = order.simple().to_string();
    let upper = order.to_string().to_uppercase();
    for id in ["not-a-uuid", &braced, &urn, &simple, &upper] {
        for path in [format!("/v1/orders/{id}"), format!("/v1/orders/{id}/cancel")] {
            let method = if path.ends_with("/cancel") { Method::POST } else { Method::GET };
            api.refused(request(method, &path).bearer(&token).empty(), StatusCode::NOT_FOUND, "order_not_found").await;
        }
    }
    let intent = request(Method::GET, "/v1/intents/not-a-uuid").bearer(&token).empty();
    api.refused(intent, StatusCode::NOT_FOUND, "not_found").await;
    // Cancel and payments take no body: options a client believes it sent
    // are refused, not ignored. `{}` or nothing at all goes on to the
    // record, which is down here.
    for action in ["cancel", "payments"] {
        let path = format!("/v1/orders/{order}/{action}");
        let with = |body: &str| request(Method::POST, &path).bearer(&token).json(body);
        for body in [r#"{"reason": "changed my mind"}"#, "[]", &format!(r#"{{"x": "{}"}}"#, "y".repeat(100))] {
            api.refused(with(body), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body_shape").await;
        }
        api.refused(with("{}"), StatusCode::SERVICE_UNAVAILABLE, "dependency_unavailable").await;
        let empty = request(Method::POST, &path).bearer(&token).empty();
        api.refused(empty, StatusCode::SERVICE_UNAVAILABLE, "dependency_unavailable").await;
    }
    for (method, path) in [
        (Method::GET, "/v1/orders/%ZZ"),
        (Method::POST, "/v1/orders/%FF%FE/cancel"),
        (Method::POST, "/v1/orders/%E2%82/payments"),
        (Method::GET, "/v1/intents/%G0"),
    ] {
        api.refused(request(method, path).bearer(&token).empty(), StatusCode::BAD_REQUEST, "invalid_path").await;
    }
}

/// The admin routes, as the router declares them: a route added there is
/// covered here without anyone remembering to.
fn admin_routes() -> Vec<(Method, String)> {
    let router = include_str!("../src/routes/mod.rs");
    let routes: Vec<(Method, String)> = router
        .lines()
        .filter_map(|l| l.trim().strip_prefix(".route(\""))
        .filter(|l| l.starts_with("/v1/admin/"))
        .flat_map(|l| {
            let (path, handler) = l.split_once('"').unwrap();
            let methods =
                [("get(", Method::GET), ("post(", Method::POST), ("put(", Method::PUT), ("patch(", Method::PATCH)];
            let path = path.replace("{event_id}", "1");
            methods.into_iter().filter(|(f, _)| handler.contains(f)).map(move |(_, m)| (m, path.clone()))
        })
        .collect();
    assert!(routes.len() >= 5, "found the admin routes: {routes:?}");
    routes
}

#[tokio::test]
async fn buyer_tokens_do_not_open_admin_routes_nor_admin_tokens_buyer_routes() {
    let api = Api::new();
    let buyer = api.token("henry");
    // The buyer secret, claiming the admin audience: a storefront (or its
    // leaked secret) must not be able to make itself an admin.
    let forged = TokenKeys::new(api.secrets.jwt.as_bytes(), "dropline", Audience::Admin).mint("henry", 60).unwrap();
    // The admin secret under another issuer.
    let elsewhere =
        TokenKeys::new(api.secrets.admin_jwt.as_bytes(), "elsewhere", Audience::Admin).mint("ops", 60).unwrap();
    for (method, path) in admin_routes() {
        let req = || request(method.clone(), &path);
        // A body the route takes: pre-warm, pause, resume and cancel take
        // none (`{}` is allowed).
        let event = match (&method, path.rsplit('/').next().unwrap()) {
            (_, "prewarm" | "pause" | "resume" | "cancel") => "{}".to_owned(),
            (&Method::PATCH, _) if path.matches('/').count() == 4 => json!({"capacity": 9}).to_string(),
            (&Method::PUT, "waiting-room") => {
                json!({"prequeue_opens_at": "2030-01-01T00:00:00Z", "outflow_per_sec": 5, "time_to_act_secs": 60})
                    .to_string()
            }
            (_, "waiting-room") => json!({"outflow_per_sec": 5}).to_string(),
            (_, "beacon") => json!({"randomness": "ab".repeat(16)}).to_string(),
            _ => event_body(0).to_string(),
        };
        let body = api.refused(req().bearer(&buyer).json(event.clone()), StatusCode::FORBIDDEN, "forbidden").await;
        assert!(body["detail"].as_str().unwrap().contains("buyer token"), "{path}: {body}");
        for token in [&forged, &elsewhere] {
            api.refused(req().bearer(token).json(event.clone()), StatusCode::UNAUTHORIZED, "unauthorized").await;
        }
        api.refused(req().json(event.clone()), StatusCode::UNAUTHORIZED, "unauthorized").await;
        // The admin token passes, on to MySQL (down here): the refusals
        // above were about the token.
        let passed = req().bearer(&api.admin_token()).json(event);
        api.refused(passed, StatusCode::SERVICE_UNAVAILABLE, "dependency_unavailable").await;
    }

    let admin = api.admin_token();
    let order = uuid::Uuid::new_v4();
    for (method, path) in [
        (Method::POST, "/v1/events/1/purchases".to_owned()),
        (Method::GET, format!("/v1/intents/{order}")),
        (Method::GET, format!("/v1/orders/{order}")),
        (Method::POST, format!("/v1/orders/{order}/cancel")),
        (Method::POST, format!("/v1/orders/{order}/payments")),
        (Method::POST, "/v1/events/1/queue".to_owned()),
        (Method::GET, "/v1/events/1/queue".to_owned()),
        (Method::GET, "/v1/events/1/queue/challenge".to_owned()),
    ] {
        let req = request(method, &path).bearer(&admin).header("idempotency-key", "k").json(r#"{"quantity": 1}"#);
        api.refused(req, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
}

#[tokio::test]
async fn webhooks_with_bad_signatures_or_bodies_are_refused_before_any_store() {
    let api = Api::new();
    let secret = api.secrets.webhook.clone();
    let order = uuid::Uuid::new_v4();
    let body = json!({
        "id": "evt_1", "type": "payment.succeeded", "payment_id": "pay_1", "order_id": order,
        "amount_cents": 1200, "currency": "EUR", "created_at": 0
    })
    .to_string();
    let now = chrono::Utc::now().timestamp();
    let hook = |signature: Option<String>, body: String| {
        let mut r = request(Method::POST, "/v1/webhooks/payments");
        if let Some(signature) = signature {
            r = r.header(SIGNATURE_HEADER, signature);
        }
        r.json(body)
    };
    let signed = |at: i64, body: &str| Some(sign(secret.as_bytes(), at, body.as_bytes()));
    let unsigned = hook(None, body.clone());
    api.refused(unsigned, StatusCode::UNAUTHORIZED, "invalid_signature").await;
    let foreign = hook(Some(sign(&[7; 32], now, body.as_bytes())), body.clone());
    api.refused(foreign, StatusCode::UNAUTHORIZED, "invalid_signature").await;
    api.refused(hook(Some("t=abc,v1=zz".into()), body.clone()), StatusCode::UNAUTHORIZED, "invalid_signature").await;
    // Signed, then tampered with.
    let tampered = hook(signed(now, &body), format!("{body} "));
    api.refused(tampered, StatusCode::UNAUTHORIZED, "invalid_signature").await;
    for at in [now - 3600, now + 3600] {
        api.refused(hook(signed(at, &body), body.clone()), StatusCode::UNAUTHORIZED, "stale_signature").await;
    }

    // A header of 5,000 signatures is refused on its size, before any MAC;
    // so are five signatures, the genuine one among them.
    let genuine = signed(now, &body).unwrap();
    let genuine_v1 = genuine.split_once(",v1=").unwrap().1;
    let flood = format!("t={now}{}", ",v1=00".repeat(5_000));
    let refusal = api.refused(hook(Some(flood), body.clone()), StatusCode::UNAUTHORIZED, "invalid_signature").await;
    assert!(refusal["detail"].as_str().unwrap().contains("longer than"), "{refusal}");
    let five = format!("t={now}{},v1={genuine_v1}", ",v1=00".repeat(4));
    let refusal = api.refused(hook(Some(five), body.clone()), StatusCode::UNAUTHORIZED, "invalid_signature").await;
    assert!(refusal["detail"].as_str().unwrap().contains("more than 4 signatures"), "{refusal}");
    // A timestamp at i64::MIN is stale, not an overflow.
    let ancient = format!("t={},v1={genuine_v1}", i64::MIN);
    api.refused(hook(Some(ancient), body.clone()), StatusCode::UNAUTHORIZED, "stale_signature").await;

    // Signed, but JSON of another shape: the webhook ignores unknown fields,
    // nothing else. A negative or out-of-range amount is not a number of
    // cents.
    let garbage = r#"{"id": 1}"#.to_owned();
    let mut shapes = vec![garbage];
    for amount in ["-1", "-9223372036854775808", "18446744073709551616", "12.5"] {
        shapes.push(format!(
            r#"{{"id":"evt_3","type":"payment.succeeded","payment_id":"pay_3","order_id":"{order}",
            "amount_cents":{amount},"currency":"EUR","created_at":0}}"#
        ));
    }
    for shape in shapes {
        let hooked = hook(signed(now, &shape), shape);
        api.refused(hooked, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body_shape").await;
    }

    // Signed and well formed, with ids longer than the record keeps: refused,
    // not acknowledged and then lost on the way to MySQL.
    for (id, payment_id) in [
        ("evt_4".to_owned(), "p".repeat(129)),
        ("e".repeat(129), "pay_4".to_owned()),
        (String::new(), "pay_4".to_owned()),
    ] {
        let long = json!({
            "id": id, "type": "payment.succeeded", "payment_id": payment_id, "order_id": order,
            "amount_cents": 1200, "currency": "EUR", "created_at": 0
        })
        .to_string();
        api.refused(hook(signed(now, &long), long.clone()), StatusCode::BAD_REQUEST, "invalid_body").await;
    }
}

#[tokio::test]
async fn a_store_that_is_down_is_a_retryable_503() {
    let api = Api::new();
    let started = std::time::Instant::now();
    let response = api.send(request(Method::GET, "/v1/events/1").empty()).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "bounded by the acquire timeout");
    let order = api.token("gina");
    let read = request(Method::GET, &format!("/v1/orders/{}", uuid::Uuid::new_v4())).bearer(&order).empty();
    api.refused(read, StatusCode::SERVICE_UNAVAILABLE, "dependency_unavailable").await;
}

#[tokio::test]
async fn every_answer_carries_a_request_id_the_callers_when_it_is_sane() {
    let api = Api::new();
    let id = |r: &axum::response::Response| r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let mine = api.send(request(Method::GET, "/v1/nowhere").header("x-request-id", "abc-123").empty()).await;
    assert_eq!(id(&mine), "abc-123");
    for insane in ["has space".to_owned(), "x".repeat(65)] {
        let theirs = api.send(request(Method::GET, "/v1/nowhere").header("x-request-id", &insane).empty()).await;
        let given = id(&theirs);
        assert!(given != insane && given.len() == 32, "{given}");
    }
}

/// A body that announces its length and then never sends a byte.
struct Announced(u64);

impl hyper::body::Body for Announced {
    type Data = axum::body::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::task::Poll::Pending
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.0)
    }
}

#[tokio::test]
async fn a_body_announced_past_the_limit_is_refused_before_it_is_read() {
    let api = Api::new();
    let token = api.token("hana");
    let request = request(Method::POST, PURCHASE)
        .bearer(&token)
        .header("idempotency-key", "k1")
        .header(CONTENT_TYPE, "application/json")
        .body(Body::new(Announced(1 << 30)))
        .unwrap();
    // Read, the body would never end: the answer comes from its length.
    let refused = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        api.refused(request, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await
    });
    refused.await.expect("refused without waiting for the body");
}

/// Purchases past the in-flight cap are shed at once with 429 `busy`,
/// before any store, and the cap frees up when a purchase ends.
#[tokio::test]
async fn purchases_past_the_in_flight_cap_are_shed_at_once() {
    // MySQL that takes connections and never answers: a purchase waits in
    // the handler for its event until the pool gives up.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mysql = hole.local_addr().unwrap().to_string();
    let api = Api::with(&mysql, &["--purchases-max-in-flight=1", "--mysql-acquire-timeout-ms=1500"]);
    let token = api.token("alice");
    let buy = |key: &str| {
        request(Method::POST, PURCHASE).bearer(&token).header("idempotency-key", key).json(r#"{"quantity": 1}"#)
    };
    let first = tokio::spawn(api.router.clone().oneshot(buy("k1")));
    // Once it is waiting on MySQL, it holds the one slot.
    let (_waiting, _) = hole.accept().await.unwrap();
    let started = std::time::Instant::now();
    let body = api.refused(buy("k2"), StatusCode::TOO_MANY_REQUESTS, "busy").await;
    assert!(started.elapsed() < Duration::from_millis(500), "shed after {:?}: {body}", started.elapsed());
    // The waiting purchase ends (MySQL never answered), and its slot is
    // free again: the next purchase is let in, and fails the same way.
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), StatusCode::SERVICE_UNAVAILABLE);
    let next = api.send(buy("k3")).await;
    assert_eq!(next.status(), StatusCode::SERVICE_UNAVAILABLE);
}
