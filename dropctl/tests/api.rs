//! Every endpoint's bad input gets a problem+json 4xx with a stable code,
//! and changes nothing. Runs the ingress and paysim only (no consumers), on
//! the real Redis, MariaDB and broker.

mod common;

use std::time::Duration;

use common::{eventually, Options, Stack};
use deadpool_redis::redis::AsyncCommands;
use dropline::auth::{Audience, TokenKeys};
use dropline::payments::{sign, SIGNATURE_HEADER};
use dropline_ingress::intents::{intent_id, Claim, IntentRecord, IntentStore, KeyState};
use reqwest::header::HeaderValue;
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

/// Sends a request and checks it was refused with `status` and `code`.
async fn refused(req: reqwest::RequestBuilder, status: StatusCode, code: &str) -> Value {
    let r = req.send().await.unwrap();
    let got = r.status();
    let content_type = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
    let body: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!((got, body["code"].as_str()), (status, Some(code)), "{body}");
    assert_eq!(content_type.as_deref(), Some("application/problem+json"));
    assert_eq!(body["status"], status.as_u16());
    assert!(body["title"].is_string());
    body
}

fn event_body(opens_in_secs: i64) -> Value {
    let now = chrono::Utc::now();
    json!({
        "name": "API test", "venue": "Hall",
        "starts_at": now + chrono::Duration::days(1),
        "sale_opens_at": now + chrono::Duration::seconds(opens_in_secs),
        "sale_closes_at": now + chrono::Duration::seconds(opens_in_secs + 3600),
        "capacity": 5, "price_cents": 1200, "currency": "EUR",
        "per_user_limit": 2, "hold_ttl_secs": 60,
    })
}

async fn create_event(stack: &Stack, http: &Client, body: &Value) -> u64 {
    let r = http
        .post(format!("{}/v1/admin/events", stack.api))
        .bearer_auth(stack.admin_token())
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    r.json::<Value>().await.unwrap()["id"].as_u64().unwrap()
}

/// What a request could change: the event's stock counters, every Redis
/// key of the test (idempotency records, intents), and the rows MySQL keeps.
#[derive(Debug, PartialEq)]
struct Books {
    levels: Option<dropline::stock::StockLevels>,
    redis_keys: Vec<String>,
    rows: Vec<(String, i64)>,
}

async fn books(stack: &Stack, event: u64) -> Books {
    let mut conn = stack.ledger.pool().get().await.unwrap();
    let mut redis_keys: Vec<String> =
        deadpool_redis::redis::cmd("KEYS").arg(format!("{}:*", stack.name)).query_async(&mut conn).await.unwrap();
    redis_keys.sort();
    let mut rows = Vec::new();
    for table in ["events", "intents", "orders", "payments", "order_units"] {
        let (n,): (i64,) = sqlx::query_as(&format!("SELECT COUNT(*) FROM {table}")).fetch_one(&stack.db).await.unwrap();
        rows.push((table.to_owned(), n));
    }
    Books { levels: stack.ledger.levels(event).await.unwrap(), redis_keys, rows }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_purchases_are_refused_and_change_nothing() {
    let stack = Stack::start(Options { consumers: false, ..Default::default() }).await;
    let http = Client::new();
    let event = create_event(&stack, &http, &event_body(-5)).await;
    let url = format!("{}/v1/events/{event}/purchases", stack.api);
    let token = stack.token("alice");
    let post = |key: &str| http.post(&url).bearer_auth(&token).header("idempotency-key", key);

    refused(http.post(&url).json(&json!({"quantity": 1})), StatusCode::UNAUTHORIZED, "unauthorized").await;
    refused(
        http.post(&url).bearer_auth("not-a-jwt").header("idempotency-key", "k"),
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    let foreign = TokenKeys::new(&[7; 32], "dropline", Audience::Buyer).mint("alice", 60).unwrap();
    refused(
        http.post(&url).bearer_auth(foreign).header("idempotency-key", "k").json(&json!({"quantity": 1})),
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    refused(
        http.post(&url).bearer_auth(&token).json(&json!({"quantity": 1})),
        StatusCode::BAD_REQUEST,
        "missing_idempotency_key",
    )
    .await;
    let raw = |body: &'static str| post("k1").header("content-type", "application/json").body(body);
    let cases = vec![
        ("long key", post(&"k".repeat(300)).json(&json!({"quantity": 1})), StatusCode::BAD_REQUEST, "invalid_header"),
        (
            "no content type",
            post("k1").body("{\"quantity\": 1}"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "latin-1 JSON",
            post("k1").header("content-type", "application/json; charset=latin1").body("{\"quantity\": 1}"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        ("truncated JSON", raw("{\"quantity\": "), StatusCode::BAD_REQUEST, "invalid_body"),
        ("an array", raw("[1]"), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body_shape"),
        ("a number", raw("1"), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body_shape"),
        ("null", raw("null"), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body_shape"),
        (
            "a string quantity",
            post("k1").json(&json!({"quantity": "one"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body_shape",
        ),
        ("a float quantity", raw("{\"quantity\": 1.5}"), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body_shape"),
        (
            "an unknown field",
            post("k1").json(&json!({"quantity": 1, "price": 0})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body_shape",
        ),
        (
            "a repeated field",
            raw("{\"quantity\": 1, \"quantity\": 2}"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body_shape",
        ),
        (
            "a negative quantity",
            post("k1").json(&json!({"quantity": -1})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body_shape",
        ),
        ("zero", post("k1").json(&json!({"quantity": 0})), StatusCode::BAD_REQUEST, "invalid_body"),
        ("over the limit", post("k1").json(&json!({"quantity": 3})), StatusCode::BAD_REQUEST, "invalid_body"),
        (
            "too large",
            post("k1").header("content-type", "application/json").body(vec![b' '; 4096]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            "two keys",
            post("k1").header("idempotency-key", "k2").json(&json!({"quantity": 1})),
            StatusCode::BAD_REQUEST,
            "invalid_header",
        ),
        (
            "a non-ASCII key",
            http.post(&url)
                .bearer_auth(&token)
                .header("idempotency-key", HeaderValue::from_bytes(b"k\xff").unwrap())
                .json(&json!({"quantity": 1})),
            StatusCode::BAD_REQUEST,
            "invalid_header",
        ),
        (
            "a non-UTF-8 token",
            http.post(&url)
                .header("authorization", HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap())
                .header("idempotency-key", "k1")
                .json(&json!({"quantity": 1})),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "a broken escape in the path",
            http.post(format!("{}/v1/events/%ZZ/purchases", stack.api))
                .bearer_auth(&token)
                .header("idempotency-key", "k1")
                .json(&json!({"quantity": 1})),
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        (
            "a non-UTF-8 path",
            http.post(format!("{}/v1/events/{event}%FF/purchases", stack.api))
                .bearer_auth(&token)
                .header("idempotency-key", "k1")
                .json(&json!({"quantity": 1})),
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        (
            "a broken query",
            http.post(format!("{url}?x=%E0%A4"))
                .bearer_auth(&token)
                .header("idempotency-key", "k1")
                .json(&json!({"quantity": 1})),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "an event id that is not a number",
            http.post(format!("{}/v1/events/abc/purchases", stack.api))
                .bearer_auth(&token)
                .header("idempotency-key", "k1")
                .json(&json!({"quantity": 1})),
            StatusCode::NOT_FOUND,
            "event_not_found",
        ),
        (
            "an unknown event",
            http.post(format!("{}/v1/events/999999/purchases", stack.api))
                .bearer_auth(&token)
                .header("idempotency-key", "k1")
                .json(&json!({"quantity": 1})),
            StatusCode::NOT_FOUND,
            "event_not_found",
        ),
    ];
    let start = books(&stack, event).await;
    for (case, request, status, code) in cases {
        let body = refused(request, status, code).await;
        if case == "over the limit" {
            assert!(body["errors"][0].as_str().unwrap().contains("quantity"), "{body}");
        }
        assert_eq!(books(&stack, event).await, start, "{case} changed nothing");
    }

    // Nothing moved in the ledger, and no intent was recorded for the key.
    let levels = stack.ledger.levels(event).await.unwrap().unwrap();
    assert_eq!((levels.available, levels.held), (5, 0));
    let store = intent_store(&stack);
    assert_eq!(store.get(intent_id(event, "alice", "k1")).await.unwrap(), None);
    assert_eq!(store.key_record("alice", "k1").await.unwrap(), None);
    stack.stop().await;
}

fn intent_store(stack: &Stack) -> IntentStore {
    IntentStore::new(stack.ledger.pool().clone(), &stack.name, 600)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_at_the_door_is_replayed_and_decides_its_intent() {
    let stack = Stack::start(Options { consumers: false, ..Default::default() }).await;
    let http = Client::new();
    let token = stack.token("alice");
    let later = create_event(&stack, &http, &event_body(3600)).await;
    let url = format!("{}/v1/events/{later}/purchases", stack.api);
    let post = |key: &str| http.post(&url).bearer_auth(&token).header("idempotency-key", key);
    let first = refused(post("k2").json(&json!({"quantity": 1})), StatusCode::CONFLICT, "sale_not_open").await;
    // The key keeps its answer: a retry gets the same refusal, word for word.
    let again = refused(post("k2").json(&json!({"quantity": 1})), StatusCode::CONFLICT, "sale_not_open").await;
    assert_eq!(first, again);
    let store = intent_store(&stack);
    let record = store.key_record("alice", "k2").await.unwrap().expect("the refusal is recorded");
    assert!(matches!(&record.state, KeyState::Refused { answer } if answer.code == "sale_not_open"), "{record:?}");
    // The refusal is the intent's decision too, should a copy of it be on
    // Kafka; nothing was produced, so there is no intent to follow.
    let intent = intent_id(later, "alice", "k2");
    assert_eq!(record.intent_id, intent);
    assert_eq!(store.get(intent).await.unwrap(), None);
    let keys = dropline::stock::EventKeys::new(&stack.name, later);
    let mut conn = stack.ledger.pool().get().await.unwrap();
    let reason: Option<String> = conn.hget(&keys.refused, intent.to_string()).await.unwrap();
    assert_eq!(reason.as_deref(), Some("sale_not_open"));
    // Used for another quantity, the key is refused as reused.
    refused(post("k2").json(&json!({"quantity": 2})), StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused").await;

    // A key whose owner died mid-request (it may have reached the broker)
    // answers "in progress" while the owner's lease runs, then is taken
    // over and produced, never refused at the door: a refusal could
    // contradict a decision already under way.
    let pending = intent_id(later, "alice", "k3");
    let record = IntentRecord {
        event_id: later,
        user_id: "alice".into(),
        quantity: 1,
        accepted_at_ms: dropline::messages::now_ms(),
    };
    let claim = store.claim("k3", pending, &record, Duration::from_millis(1500)).await.unwrap();
    assert!(matches!(claim, Claim::New { .. }), "{claim:?}");
    let r = post("k3").json(&json!({"quantity": 1})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "idempotency_in_progress");
    let taken_over = eventually("the lease to run out", Duration::from_secs(10), || async {
        let r = post("k3").json(&json!({"quantity": 1})).send().await.unwrap();
        (r.status() != StatusCode::CONFLICT).then_some(r)
    })
    .await;
    assert_eq!(taken_over.status(), StatusCode::ACCEPTED);
    let body: Value = taken_over.json().await.unwrap();
    assert_eq!(body["intent_id"], pending.to_string());
    assert!(matches!(store.key_record("alice", "k3").await.unwrap().unwrap().state, KeyState::Accepted));
    assert_eq!(store.get(pending).await.unwrap().map(|r| r.event_id), Some(later));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_belongs_to_one_event_and_its_intent_id_to_that_event() {
    let stack = Stack::start(Options { consumers: false, ..Default::default() }).await;
    let http = Client::new();
    let token = stack.token("bob");
    let first = create_event(&stack, &http, &event_body(-5)).await;
    let second = create_event(&stack, &http, &event_body(-5)).await;
    let buy = |event: u64| {
        http.post(format!("{}/v1/events/{event}/purchases", stack.api))
            .bearer_auth(&token)
            .header("idempotency-key", "one-key")
            .json(&json!({"quantity": 1}))
    };
    let r = buy(first).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let accepted: Value = r.json().await.unwrap();
    assert_eq!(accepted["intent_id"], intent_id(first, "bob", "one-key").to_string());
    // For another event, while the key's record is kept: reused.
    refused(buy(second), StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused").await;
    // Once the record is gone (it expired), the key is free again, and for
    // another event it is another intent: the first one's hold is not
    // mistaken for it.
    let name = format!("{}:idem:*", stack.name);
    let mut conn = stack.ledger.pool().get().await.unwrap();
    let records: Vec<String> = deadpool_redis::redis::cmd("KEYS").arg(&name).query_async(&mut conn).await.unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    let _: () = conn.del(&records[0]).await.unwrap();
    let r = buy(second).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let other: Value = r.json().await.unwrap();
    assert_eq!(other["intent_id"], intent_id(second, "bob", "one-key").to_string());
    assert_ne!(other["intent_id"], accepted["intent_id"]);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_returns_the_same_answer_and_cannot_be_reused() {
    let stack = Stack::start(Options { consumers: false, ..Default::default() }).await;
    let http = Client::new();
    let event = create_event(&stack, &http, &event_body(-5)).await;
    let url = format!("{}/v1/events/{event}/purchases", stack.api);
    let token = stack.token("bob");
    let request = |q: u32| {
        http.post(&url).bearer_auth(&token).header("idempotency-key", "same-key").json(&json!({"quantity": q}))
    };
    let send = |q: u32| request(q).send();
    let first = send(1).await.unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let location = first.headers()["location"].to_str().unwrap().to_owned();
    let first: Value = first.json().await.unwrap();
    let again = send(1).await.unwrap();
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    let again: Value = again.json().await.unwrap();
    assert_eq!(first, again);
    assert_eq!(location, format!("/v1/intents/{}", first["intent_id"].as_str().unwrap()));
    assert_eq!(first["status"], "queued");
    refused(request(2), StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused").await;
    // Another buyer's same key is another purchase.
    let carol = http
        .post(&url)
        .bearer_auth(stack.token("carol"))
        .header("idempotency-key", "same-key")
        .json(&json!({"quantity": 1}))
        .send()
        .await
        .unwrap();
    let carol: Value = carol.json().await.unwrap();
    assert_ne!(carol["intent_id"], first["intent_id"]);

    // The status is the buyer's only; nobody else sees it.
    let status_url = format!("{}{location}", stack.api);
    let mine: Value = http.get(&status_url).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
    assert_eq!(mine["status"], "queued", "no allocator runs in this test");
    refused(http.get(&status_url).bearer_auth(stack.token("mallory")), StatusCode::NOT_FOUND, "not_found").await;
    refused(
        http.get(format!("{}/v1/intents/not-a-uuid", stack.api)).bearer_auth(&token),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    refused(http.get(&status_url), StatusCode::UNAUTHORIZED, "unauthorized").await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_over_their_rate_gets_429_with_retry_after() {
    let stack = Stack::start(Options { consumers: false, user_per_sec: 1, user_burst: 2, ..Default::default() }).await;
    let http = Client::new();
    // A sale that has not opened answers right after the limiter, so the
    // requests are quick and produce nothing.
    let event = create_event(&stack, &http, &event_body(3600)).await;
    let url = format!("{}/v1/events/{event}/purchases", stack.api);
    let token = stack.token("dan");
    let started = std::time::Instant::now();
    let mut let_through = 0;
    let refusal = loop {
        let r = http
            .post(&url)
            .bearer_auth(&token)
            .header("idempotency-key", format!("r{let_through}"))
            .json(&json!({"quantity": 1}))
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            break r;
        }
        assert_eq!(r.status(), StatusCode::CONFLICT, "past the limiter: the sale is not open");
        let_through += 1;
        assert!(let_through <= 10, "the limiter never refused");
    };
    // The burst of 2, plus one per second that passed meanwhile.
    assert!(let_through >= 2 && let_through <= 2 + started.elapsed().as_secs() + 1, "{let_through} let through");
    let retry: u64 = refusal.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry));
    let body: Value = refusal.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited");
    // Another buyer is not held back by dan.
    let r = http
        .post(&url)
        .bearer_auth(stack.token("eve"))
        .header("idempotency-key", "e1")
        .json(&json!({"quantity": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_admin_and_event_requests_are_refused() {
    let stack = Stack::start(Options { consumers: false, ..Default::default() }).await;
    let http = Client::new();
    let admin_url = format!("{}/v1/admin/events", stack.api);
    refused(http.post(&admin_url).json(&event_body(0)), StatusCode::UNAUTHORIZED, "unauthorized").await;
    refused(
        http.post(&admin_url).bearer_auth(stack.token("buyer")).json(&event_body(0)),
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    let admin = stack.admin_token();
    refused(
        http.post(&admin_url).bearer_auth(&admin).body("{}"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
    refused(
        http.post(&admin_url).bearer_auth(&admin).json(&json!({"name": "x"})),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body_shape",
    )
    .await;
    refused(
        http.post(&admin_url).bearer_auth(&admin).json(&json!([event_body(0)])),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body_shape",
    )
    .await;
    let mut extra = event_body(0);
    extra["discount"] = json!(10);
    refused(
        http.post(&admin_url).bearer_auth(&admin).json(&extra),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body_shape",
    )
    .await;
    let mut wrong = event_body(0);
    wrong["capacity"] = json!("5");
    refused(
        http.post(&admin_url).bearer_auth(&admin).json(&wrong),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body_shape",
    )
    .await;
    let twice = serde_json::to_string(&event_body(0)).unwrap().replacen('{', "{\"capacity\": 9,", 1);
    refused(
        http.post(&admin_url).bearer_auth(&admin).header("content-type", "application/json").body(twice),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body_shape",
    )
    .await;
    let mut bad = event_body(0);
    bad["capacity"] = json!(0);
    bad["currency"] = json!("euro");
    bad["per_user_limit"] = json!(0);
    bad["sale_closes_at"] = bad["sale_opens_at"].clone();
    bad["name"] = json!("  ");
    let body =
        refused(http.post(&admin_url).bearer_auth(&admin).json(&bad), StatusCode::BAD_REQUEST, "invalid_body").await;
    assert_eq!(body["errors"].as_array().unwrap().len(), 5, "every problem is reported at once: {body}");
    let (events,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM events").fetch_one(&stack.db).await.unwrap();
    assert_eq!(events, 0, "no event was created");

    refused(
        http.post(format!("{}/v1/admin/events/77/prewarm", stack.api)).bearer_auth(&admin),
        StatusCode::NOT_FOUND,
        "event_not_found",
    )
    .await;
    refused(http.get(format!("{}/v1/events/0", stack.api)), StatusCode::NOT_FOUND, "event_not_found").await;
    refused(http.get(format!("{}/v1/events/12x", stack.api)), StatusCode::NOT_FOUND, "event_not_found").await;
    refused(http.get(format!("{}/v1/events?limit=0", stack.api)), StatusCode::BAD_REQUEST, "invalid_query").await;
    refused(http.get(format!("{}/v1/events?limit=abc&after=-1", stack.api)), StatusCode::BAD_REQUEST, "invalid_query")
        .await;
    refused(http.get(format!("{}/v1/events?colour=red", stack.api)), StatusCode::BAD_REQUEST, "invalid_query").await;
    refused(http.get(format!("{}/v1/events?q=%FF", stack.api)), StatusCode::BAD_REQUEST, "invalid_query").await;
    refused(http.get(format!("{}/v1/events?q=%Z1", stack.api)), StatusCode::BAD_REQUEST, "invalid_query").await;
    refused(http.get(format!("{}/v1/events?limit=1&limit=2", stack.api)), StatusCode::BAD_REQUEST, "invalid_query")
        .await;
    refused(http.get(format!("{}/v1/events/%ZZ", stack.api)), StatusCode::BAD_REQUEST, "invalid_path").await;
    refused(http.get(format!("{}/v1/events/1%C3", stack.api)), StatusCode::BAD_REQUEST, "invalid_path").await;
    refused(
        http.post(format!("{}/v1/admin/events/%FF/prewarm", stack.api)).bearer_auth(&admin),
        StatusCode::BAD_REQUEST,
        "invalid_path",
    )
    .await;
    refused(http.get(format!("{}/v1/nowhere", stack.api)), StatusCode::NOT_FOUND, "not_found").await;
    refused(
        http.request(Method::DELETE, format!("{}/v1/events", stack.api)),
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;

    // Good requests: create, prewarm again (a no-op), list, search, read.
    let id = create_event(&stack, &http, &event_body(-5)).await;
    let again: Value = http
        .post(format!("{}/v1/admin/events/{id}/prewarm", stack.api))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["created"], false);
    let one: Value = http.get(format!("{}/v1/events/{id}", stack.api)).send().await.unwrap().json().await.unwrap();
    assert_eq!(one["availability"]["available"], 5);
    assert_eq!(one["capacity"], 5);
    let found: Value =
        http.get(format!("{}/v1/events?q=API%20test&limit=10", stack.api)).send().await.unwrap().json().await.unwrap();
    assert_eq!(found["events"].as_array().unwrap().len(), 1);
    let none: Value =
        http.get(format!("{}/v1/events?q=nothing-like-it", stack.api)).send().await.unwrap().json().await.unwrap();
    assert!(none["events"].as_array().unwrap().is_empty());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_order_requests_are_refused() {
    let stack = Stack::start(Options { consumers: false, ..Default::default() }).await;
    let http = Client::new();
    let token = stack.token("fred");
    let unknown = Uuid::new_v4();
    for (method, path) in [
        (Method::GET, format!("/v1/orders/{unknown}")),
        (Method::POST, format!("/v1/orders/{unknown}/cancel")),
        (Method::POST, format!("/v1/orders/{unknown}/payments")),
        (Method::GET, "/v1/orders/not-a-uuid".to_owned()),
        (Method::POST, "/v1/orders/not-a-uuid/cancel".to_owned()),
    ] {
        let url = format!("{}{path}", stack.api);
        refused(http.request(method.clone(), &url).bearer_auth(&token), StatusCode::NOT_FOUND, "order_not_found").await;
        refused(http.request(method, &url), StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    for (method, path) in [
        (Method::GET, "/v1/orders/%ZZ"),
        (Method::POST, "/v1/orders/%FF%FE/cancel"),
        (Method::POST, "/v1/orders/%E2%82/payments"),
        (Method::GET, "/v1/intents/%G0"),
    ] {
        let url = format!("{}{path}", stack.api);
        refused(http.request(method, &url).bearer_auth(&token), StatusCode::BAD_REQUEST, "invalid_path").await;
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_with_bad_signatures_or_stale_timestamps_are_refused_and_change_nothing() {
    let stack = Stack::start(Options::default()).await;
    let http = Client::new();
    let event = create_event(&stack, &http, &event_body(-5)).await;
    let token = stack.token("gina");
    let api = dropctl::api::Api::new(&stack.api).unwrap();
    let dropctl::api::Purchase::Accepted(order) = api.purchase(&token, event, "g1", 1).await.unwrap() else { panic!() };
    common::eventually("the hold", std::time::Duration::from_secs(30), || async {
        stack.ledger.hold(event, order).await.unwrap()
    })
    .await;

    let url = format!("{}/v1/webhooks/payments", stack.api);
    let body = serde_json::to_vec(&json!({
        "id": "evt_1", "type": "payment.succeeded", "payment_id": "pay_1", "order_id": order,
        "amount_cents": 1200, "currency": "EUR", "created_at": 0
    }))
    .unwrap();
    let now = chrono::Utc::now().timestamp();
    let hook = |sig: Option<String>, body: Vec<u8>| {
        let mut r = http.post(&url).header("content-type", "application/json").body(body);
        if let Some(sig) = sig {
            r = r.header(SIGNATURE_HEADER, sig);
        }
        r
    };
    refused(hook(None, body.clone()), StatusCode::UNAUTHORIZED, "invalid_signature").await;
    refused(hook(Some(sign(&[7; 32], now, &body)), body.clone()), StatusCode::UNAUTHORIZED, "invalid_signature").await;
    refused(hook(Some("t=abc,v1=zz".into()), body.clone()), StatusCode::UNAUTHORIZED, "invalid_signature").await;
    // Signed, then tampered with.
    let mut tampered = body.clone();
    let secret = stack.secrets.webhook.clone();
    let sig = sign(secret.as_bytes(), now, &body);
    tampered.extend_from_slice(b" ");
    refused(hook(Some(sig), tampered), StatusCode::UNAUTHORIZED, "invalid_signature").await;
    refused(
        hook(Some(sign(secret.as_bytes(), now - 3600, &body)), body.clone()),
        StatusCode::UNAUTHORIZED,
        "stale_signature",
    )
    .await;
    refused(
        hook(Some(sign(secret.as_bytes(), now + 3600, &body)), body.clone()),
        StatusCode::UNAUTHORIZED,
        "stale_signature",
    )
    .await;
    let garbage = b"{\"id\": 1}".to_vec();
    // JSON of another shape: the webhook ignores unknown fields, nothing else.
    refused(
        hook(Some(sign(secret.as_bytes(), now, &garbage)), garbage),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body_shape",
    )
    .await;
    let stranger = serde_json::to_vec(&json!({
        "id": "evt_2", "type": "payment.succeeded", "payment_id": "pay_2", "order_id": Uuid::new_v4(),
        "amount_cents": 1200, "currency": "EUR", "created_at": 0
    }))
    .unwrap();
    refused(hook(Some(sign(secret.as_bytes(), now, &stranger)), stranger), StatusCode::NOT_FOUND, "order_not_found")
        .await;

    // A header of 5,000 signatures is refused on its size, before any MAC;
    // so are five signatures, the genuine one among them.
    let genuine = sign(secret.as_bytes(), now, &body);
    let flood = format!("t={now}{}", ",v1=00".repeat(5_000));
    let body_ = refused(hook(Some(flood), body.clone()), StatusCode::UNAUTHORIZED, "invalid_signature").await;
    assert!(body_["detail"].as_str().unwrap().contains("longer than"), "{body_}");
    let genuine_v1 = genuine.split_once(",v1=").unwrap().1;
    let five = format!("t={now}{},v1={genuine_v1}", ",v1=00".repeat(4));
    let body_ = refused(hook(Some(five), body.clone()), StatusCode::UNAUTHORIZED, "invalid_signature").await;
    assert!(body_["detail"].as_str().unwrap().contains("more than 4 signatures"), "{body_}");
    // A timestamp at i64::MIN is stale, not an overflow.
    let ancient = format!("t={},v1={genuine_v1}", i64::MIN);
    refused(hook(Some(ancient), body.clone()), StatusCode::UNAUTHORIZED, "stale_signature").await;
    // A negative or out-of-range amount is not a number of cents.
    for amount in ["-1", "-9223372036854775808", "18446744073709551616", "12.5"] {
        let weird = format!(
            r#"{{"id":"evt_3","type":"payment.succeeded","payment_id":"pay_3","order_id":"{order}",
            "amount_cents":{amount},"currency":"EUR","created_at":0}}"#
        )
        .into_bytes();
        let signed = hook(Some(sign(secret.as_bytes(), now, &weird)), weird);
        refused(signed, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body_shape").await;
    }

    // A payment in another currency is money taken that does not pay the
    // order: acknowledged (the provider would retry a refusal forever) and
    // recorded for refund.
    let dollars = serde_json::to_vec(&json!({
        "id": "evt_4", "type": "payment.succeeded", "payment_id": "pay_4", "order_id": order,
        "amount_cents": 1200, "currency": "USD", "created_at": 0
    }))
    .unwrap();
    let r = hook(Some(sign(secret.as_bytes(), now, &dollars)), dollars).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "refund_required");

    let hold = stack.ledger.hold(event, order).await.unwrap().unwrap();
    assert_eq!(hold.state, dropline::messages::OrderState::Held, "no bad webhook paid the order");
    assert_eq!(stack.ledger.levels(event).await.unwrap().unwrap().sold, 0);

    // The genuine webhook pays it, with the currency in lower case and a
    // field Dropline does not know, as providers send them.
    let body = serde_json::to_vec(&json!({
        "id": "evt_1", "type": "payment.succeeded", "payment_id": "pay_1", "order_id": order,
        "amount_cents": 1200, "currency": "eur", "created_at": 0, "livemode": false
    }))
    .unwrap();
    let r = hook(Some(sign(secret.as_bytes(), now, &body)), body.clone()).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "captured");
    assert_eq!(stack.ledger.levels(event).await.unwrap().unwrap().sold, 1);
    stack.stop().await;
}

/// The admin routes, as the router declares them: a route added there is
/// covered here without anyone remembering to.
fn admin_routes() -> Vec<(Method, String)> {
    let router = include_str!("../../ingress/src/routes/mod.rs");
    let routes: Vec<(Method, String)> = router
        .lines()
        .filter_map(|l| l.trim().strip_prefix(".route(\""))
        .filter(|l| l.starts_with("/v1/admin/"))
        .map(|l| {
            let (path, handler) = l.split_once('"').unwrap();
            let method = if handler.contains("get(") { Method::GET } else { Method::POST };
            (method, path.to_owned())
        })
        .collect();
    assert!(routes.len() >= 2, "found the admin routes: {routes:?}");
    routes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buyer_tokens_do_not_open_admin_routes_nor_admin_tokens_buyer_routes() {
    let stack = Stack::start(Options { consumers: false, ..Default::default() }).await;
    let http = Client::new();
    let event = create_event(&stack, &http, &event_body(-5)).await;
    let buyer = stack.token("henry");
    // The buyer secret, claiming the admin audience: a storefront (or its
    // leaked secret) must not be able to make itself an admin.
    let forged = TokenKeys::new(stack.secrets.jwt.as_bytes(), "dropline", Audience::Admin).mint("henry", 60).unwrap();
    // The admin secret under another issuer.
    let elsewhere =
        TokenKeys::new(stack.secrets.admin_jwt.as_bytes(), "elsewhere", Audience::Admin).mint("ops", 60).unwrap();
    for (method, path) in admin_routes() {
        let url = format!("{}{}", stack.api, path.replace("{event_id}", &event.to_string()));
        let req = || http.request(method.clone(), &url).json(&event_body(0));
        let body = refused(req().bearer_auth(&buyer), StatusCode::FORBIDDEN, "forbidden").await;
        assert!(body["detail"].as_str().unwrap().contains("buyer token"), "{path}: {body}");
        refused(req().bearer_auth(&forged), StatusCode::UNAUTHORIZED, "unauthorized").await;
        refused(req().bearer_auth(&elsewhere), StatusCode::UNAUTHORIZED, "unauthorized").await;
        refused(req(), StatusCode::UNAUTHORIZED, "unauthorized").await;
        // The admin token opens it: the refusals above were about the token.
        let r = req().bearer_auth(stack.admin_token()).send().await.unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }

    let admin = stack.admin_token();
    let order = Uuid::new_v4();
    for (method, path) in [
        (Method::POST, format!("/v1/events/{event}/purchases")),
        (Method::GET, format!("/v1/intents/{order}")),
        (Method::GET, format!("/v1/orders/{order}")),
        (Method::POST, format!("/v1/orders/{order}/cancel")),
        (Method::POST, format!("/v1/orders/{order}/payments")),
    ] {
        let req = http
            .request(method, format!("{}{path}", stack.api))
            .bearer_auth(&admin)
            .header("idempotency-key", "k")
            .json(&json!({"quantity": 1}));
        refused(req, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    stack.stop().await;
}
