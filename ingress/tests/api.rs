//! The API's answers that depend on what the stores hold: refusals by the
//! event or the idempotency record, replays, rate limits, and events
//! created and read. Runs the ingress alone, on the real Redis, MariaDB and
//! broker. (Refusals that need no store are in `refusals.rs`.)

mod common;

use std::time::Duration;

use common::Ingress;
use dropline::redis_pool::redis::AsyncCommands;
use dropline_ingress::intents::{intent_id, IntentRecord, IntentStore, KeyClaim, KeyState};
use dropline_testkit::{event_body, eventually, refused};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

/// What a request could change: the event's stock counters, every Redis
/// key of the test (idempotency records, intents), and the rows MySQL keeps.
#[derive(Debug, PartialEq)]
struct Books {
    levels: Option<dropline::stock::StockLevels>,
    redis_keys: Vec<String>,
    rows: Vec<(String, i64)>,
}

async fn books(stack: &Ingress, event: u64) -> Books {
    let mut conn = stack.ledger.pool().get().await.unwrap();
    let mut redis_keys: Vec<String> =
        dropline::redis_pool::redis::cmd("KEYS").arg(format!("{}:*", stack.name)).query_async(&mut conn).await.unwrap();
    redis_keys.sort();
    let mut rows = Vec::new();
    for table in ["events", "intents", "orders", "payments", "order_units"] {
        let (n,): (i64,) = sqlx::query_as(&format!("SELECT COUNT(*) FROM {table}")).fetch_one(&stack.db).await.unwrap();
        rows.push((table.to_owned(), n));
    }
    Books { levels: stack.ledger.levels(event).await.unwrap(), redis_keys, rows }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchases_the_event_refuses_change_nothing() {
    let stack = Ingress::start(&[]).await;
    let http = dropline_testkit::http();
    let event = stack.create_event(&event_body(-5)).await;
    let url = format!("{}/v1/events/{event}/purchases", stack.api);
    let token = stack.token("alice");
    let post = |key: &str| http.post(&url).bearer_auth(&token).header("idempotency-key", key);
    let cases = vec![
        ("zero", post("k1").json(&json!({"quantity": 0})), StatusCode::BAD_REQUEST, "invalid_body"),
        ("over the limit", post("k1").json(&json!({"quantity": 3})), StatusCode::BAD_REQUEST, "invalid_body"),
        ("an unknown event", stack.purchase(&http, 999_999, "alice", "k1"), StatusCode::NOT_FOUND, "event_not_found"),
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

/// The JSON body of the answer to `request`.
async fn answer(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

fn intent_store(stack: &Ingress) -> IntentStore {
    IntentStore::new(stack.ledger.pool().clone(), &stack.name, 600)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_at_the_door_is_replayed_and_decides_its_intent() {
    let stack = Ingress::start(&[]).await;
    let http = dropline_testkit::http();
    let token = stack.token("alice");
    let later = stack.create_event(&event_body(3600)).await;
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
    assert!(matches!(claim, KeyClaim::New { .. }), "{claim:?}");
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
    assert_eq!(store.get(pending).await.unwrap().map(|r| r.intent.event_id), Some(later));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_belongs_to_one_event_and_its_intent_id_to_that_event() {
    let stack = Ingress::start(&[]).await;
    let http = dropline_testkit::http();
    let first = stack.create_event(&event_body(-5)).await;
    let second = stack.create_event(&event_body(-5)).await;
    let buy = |event: u64| stack.purchase(&http, event, "bob", "one-key");
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
    let records: Vec<String> =
        dropline::redis_pool::redis::cmd("KEYS").arg(&name).query_async(&mut conn).await.unwrap();
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
    let stack = Ingress::start(&[]).await;
    let http = dropline_testkit::http();
    let event = stack.create_event(&event_body(-5)).await;
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
    let carol = answer(stack.purchase(&http, event, "carol", "same-key")).await;
    assert_ne!(carol["intent_id"], first["intent_id"]);

    // The status is the buyer's only; nobody else sees it.
    let status_url = format!("{}{location}", stack.api);
    let mine = answer(http.get(&status_url).bearer_auth(&token)).await;
    assert_eq!(mine["status"], "queued", "no allocator runs in this test");
    refused(http.get(&status_url).bearer_auth(stack.token("mallory")), StatusCode::NOT_FOUND, "not_found").await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_over_their_rate_gets_429_with_retry_after() {
    let stack = Ingress::start(&["--user-per-sec=1".to_owned(), "--user-burst=2".to_owned()]).await;
    let http = dropline_testkit::http();
    // A sale that has not opened answers right after the limiter, so the
    // requests are quick and produce nothing.
    let event = stack.create_event(&event_body(3600)).await;
    let started = std::time::Instant::now();
    let mut let_through = 0;
    let refusal = loop {
        let r = stack.purchase(&http, event, "dan", &format!("r{let_through}")).send().await.unwrap();
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
    let r = stack.purchase(&http, event, "eve", "e1").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_created_pre_warmed_read_and_searched() {
    let stack = Ingress::start(&[]).await;
    let http = dropline_testkit::http();
    let admin = stack.admin_token();
    refused(
        http.post(format!("{}/v1/admin/events/77/prewarm", stack.api)).bearer_auth(&admin),
        StatusCode::NOT_FOUND,
        "event_not_found",
    )
    .await;
    refused(http.get(format!("{}/v1/events/999999", stack.api)), StatusCode::NOT_FOUND, "event_not_found").await;

    // Good requests: create, prewarm again (a no-op), list, search, read.
    let id = stack.create_event(&event_body(-5)).await;
    let again = answer(http.post(format!("{}/v1/admin/events/{id}/prewarm", stack.api)).bearer_auth(&admin)).await;
    assert_eq!(again["created"], false);
    let one = answer(http.get(format!("{}/v1/events/{id}", stack.api))).await;
    assert_eq!(one["availability"]["available"], 5);
    assert_eq!(one["capacity"], 5);
    let found = answer(http.get(format!("{}/v1/events?q=API%20test&limit=10", stack.api))).await;
    assert_eq!(found["events"].as_array().unwrap().len(), 1);
    let none = answer(http.get(format!("{}/v1/events?q=nothing-like-it", stack.api))).await;
    assert!(none["events"].as_array().unwrap().is_empty());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_nobody_was_given_is_not_found() {
    let stack = Ingress::start(&[]).await;
    let http = dropline_testkit::http();
    let token = stack.token("fred");
    let unknown = Uuid::new_v4();
    for (method, path) in [
        (reqwest::Method::GET, format!("/v1/orders/{unknown}")),
        (reqwest::Method::POST, format!("/v1/orders/{unknown}/cancel")),
        (reqwest::Method::POST, format!("/v1/orders/{unknown}/payments")),
    ] {
        let url = format!("{}{path}", stack.api);
        refused(http.request(method, &url).bearer_auth(&token), StatusCode::NOT_FOUND, "order_not_found").await;
    }
    stack.stop().await;
}

/// A queued purchase shows how many undecided intents of its event are ahead
/// of it, from its offset and the allocator group's committed offset; as the
/// group commits (here the test commits for it: no allocator runs), the
/// number falls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_purchase_shows_its_place_in_the_allocators_line() {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};

    let stack = Ingress::start(&[]).await;
    let mut body = event_body(-5);
    body["capacity"] = json!(100);
    let event = stack.create_event(&body).await;
    let http = dropline_testkit::http();
    let mut intents = Vec::new();
    for i in 0..5 {
        let r = stack.purchase(&http, event, &format!("buyer-{i}"), "k").send().await.unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        intents
            .push((format!("buyer-{i}"), r.json::<Value>().await.unwrap()["intent_id"].as_str().unwrap().to_owned()));
    }
    let ahead_of = |user: String, intent: String| {
        let req = http.get(format!("{}/v1/intents/{intent}", stack.api)).bearer_auth(stack.token(&user));
        async move {
            let body: Value = req.send().await.unwrap().json().await.unwrap();
            assert_eq!(body["status"], "queued", "{body}");
            body["ahead"].as_u64()
        }
    };
    // Nothing decided: each has every earlier purchase of the event ahead.
    for (i, (user, intent)) in intents.iter().enumerate() {
        let ahead =
            eventually("a place in line", Duration::from_secs(10), || ahead_of(user.clone(), intent.clone())).await;
        assert_eq!(ahead, i as u64, "{user}");
    }

    // The allocators decide the first three.
    let group: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", dropline_testkit::brokers())
        .set("group.id", format!("{}-allocator", stack.name))
        .create()
        .unwrap();
    let mut decided = TopicPartitionList::new();
    for partition in 0..3 {
        decided.add_partition_offset(&format!("{}.intents", stack.name), partition, Offset::Offset(3)).unwrap();
    }
    tokio::task::spawn_blocking(move || group.commit(&decided, CommitMode::Sync)).await.unwrap().unwrap();
    let (user, intent) = intents[4].clone();
    eventually("the place to fall", Duration::from_secs(10), || async {
        (ahead_of(user.clone(), intent.clone()).await == Some(1)).then_some(())
    })
    .await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_sell_out_purchases_are_refused_from_memory_and_reopen_when_stock_comes_back() {
    let stack = Ingress::start(&[]).await;
    let http = dropline_testkit::http();
    let mut body = event_body(-5);
    body["capacity"] = json!(1);
    let event = stack.create_event(&body).await;
    let r = stack.purchase(&http, event, "ann", "k").json(&json!({"quantity": 1})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let held: Uuid = r.json::<Value>().await.unwrap()["intent_id"].as_str().unwrap().parse().unwrap();
    let undecided = [dropline::stock::Undecided { intent_id: held, user_id: "ann", quantity: 1 }];
    stack.ledger.allocate(event, &undecided).await.unwrap();
    // The ingress trusts its last read of the ledger for a quarter second.
    eventually("the ingress to see the sell-out", Duration::from_secs(5), || async {
        let key = Uuid::new_v4().to_string();
        let r = stack.purchase(&http, event, "probe", &key).json(&json!({"quantity": 1})).send().await.unwrap();
        (r.status() == StatusCode::CONFLICT).then_some(())
    })
    .await;

    // Sold out: a new purchase is told so, and nothing about it is
    // written (no idempotency record, no decision, nothing produced).
    let before = books(&stack, event).await;
    let sold_out = refused(
        stack.purchase(&http, event, "bob", "b1").json(&json!({"quantity": 1})),
        StatusCode::CONFLICT,
        "sold_out",
    )
    .await;
    assert_eq!(sold_out["code"], "sold_out");
    assert_eq!(books(&stack, event).await, before, "a refusal from memory changes nothing");
    assert!(intent_store(&stack).key_record("bob", "b1").await.unwrap().is_none());
    assert_eq!(stack.ledger.verdict(event, intent_id(event, "bob", "b1")).await.unwrap(), None);
    // A retry of the accepted purchase still gets its 202.
    let again = stack.purchase(&http, event, "ann", "k").json(&json!({"quantity": 1})).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    assert_eq!(again.json::<Value>().await.unwrap()["intent_id"], held.to_string());
    // The key used again for another quantity, or first for another event
    // and now for this one, is refused as reused, as before the sell-out.
    let other = stack.create_event(&event_body(-5)).await;
    let first = stack.purchase(&http, other, "ann", "elsewhere").send().await.unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    for (key, quantity) in [("k", 2), ("elsewhere", 1)] {
        let request = stack.purchase(&http, event, "ann", key).json(&json!({ "quantity": quantity }));
        refused(request, StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused").await;
    }
    // A key whose owner died mid-request (its intent may be on Kafka) is
    // taken over once its lease ran out and produced again: its 202.
    let zed = intent_id(event, "zed", "z");
    let record = IntentRecord { event_id: event, user_id: "zed".into(), quantity: 1, accepted_at_ms: 1 };
    let claimed = intent_store(&stack).claim("z", zed, &record, Duration::from_millis(1)).await.unwrap();
    assert!(matches!(claimed, KeyClaim::New { .. }), "{claimed:?}");
    let taken_over = eventually("the dead owner's lease to run out", Duration::from_secs(5), || async {
        let r = stack.purchase(&http, event, "zed", "z").send().await.unwrap();
        (r.status() != StatusCode::CONFLICT).then_some(r)
    })
    .await;
    assert_eq!(taken_over.status(), StatusCode::ACCEPTED);
    assert_eq!(taken_over.json::<Value>().await.unwrap()["intent_id"], zed.to_string());

    // The hold is cancelled: purchases reopen within the quarter second
    // the ingress trusts its last read of the ledger (and a request).
    stack.ledger.cancel(event, held, "ann").await.unwrap();
    let cancelled_at = std::time::Instant::now();
    eventually("purchases reopened", Duration::from_secs(5), || async {
        let r = stack.purchase(&http, event, "bob", "b1").json(&json!({"quantity": 1})).send().await.unwrap();
        (r.status() == StatusCode::ACCEPTED).then_some(())
    })
    .await;
    assert!(cancelled_at.elapsed() < Duration::from_secs(1), "reopened in {:?}", cancelled_at.elapsed());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_address_has_a_budget_and_only_trusted_proxies_say_who_the_address_is() {
    let limits = ["--ip-per-sec=1", "--ip-burst=3", "--user-per-sec=1", "--user-burst=3"].map(String::from);
    let through_proxy = [limits.to_vec(), vec!["--trusted-proxies=127.0.0.1/32".into()]].concat();
    let stack = Ingress::start(&through_proxy).await;
    let http = dropline_testkit::http();
    let event = stack.create_event(&event_body(-5)).await;
    let read = |from: &str| {
        http.get(format!("{}/v1/events/{event}", stack.api)).header("x-forwarded-for", format!("{from}, 127.0.0.1"))
    };
    // Many buyers behind one address share its budget (a burst of 3; sent
    // at once, so it has no time to refill)...
    let answers = futures::future::join_all((0..4).map(|_| async {
        let r = read("203.0.113.7").send().await.unwrap();
        let retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
        (r.status(), retry_after, r.json::<Value>().await.unwrap())
    }))
    .await;
    let limited: Vec<_> = answers.iter().filter(|(status, ..)| *status == StatusCode::TOO_MANY_REQUESTS).collect();
    assert_eq!(limited.len(), 1, "{answers:?}");
    let (_, retry_after, body) = limited[0];
    assert_eq!(body["code"], "rate_limited");
    assert!(body["detail"].as_str().unwrap().contains("network address"), "{body}");
    assert!(retry_after.as_deref().unwrap().parse::<u64>().unwrap() >= 1);
    // ...and another address has its own.
    assert_eq!(read("203.0.113.8").send().await.unwrap().status(), StatusCode::OK);

    // One buyer from many addresses still has one buyer's budget.
    let buy = |i: u32| {
        stack
            .purchase(&http, event, "mallory", &format!("k{i}"))
            .header("x-forwarded-for", format!("198.51.100.{i}"))
            .json(&json!({"quantity": 1}))
    };
    // Sent at once, so the budget (a burst of 3) has no time to refill.
    let answers = futures::future::join_all((0..4).map(|i| async move {
        let r = buy(i).send().await.unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    }))
    .await;
    let limited: Vec<&Value> =
        answers.iter().filter(|(status, _)| *status == StatusCode::TOO_MANY_REQUESTS).map(|(_, b)| b).collect();
    assert_eq!(limited.len(), 1, "{answers:?}");
    assert_eq!(limited[0]["code"], "rate_limited");
    assert!(limited[0].get("detail").is_none(), "the buyer's budget, not an address's: {answers:?}");
    stack.stop().await;

    // Behind no trusted proxy, X-Forwarded-For is the client's own say:
    // every request counts against the connection's address.
    let direct = [limits.to_vec(), vec!["--trusted-proxies=10.0.0.0/8".into()]].concat();
    let stack = Ingress::start(&direct).await;
    let event = stack.create_event(&event_body(-5)).await;
    let spoofed =
        |i: u32| http.get(format!("{}/v1/events/{event}", stack.api)).header("x-forwarded-for", format!("192.0.2.{i}"));
    let answers =
        futures::future::join_all((0..4).map(|i| async move { spoofed(i).send().await.unwrap().status() })).await;
    assert_eq!(answers.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count(), 1, "{answers:?}");
    stack.stop().await;
}

/// Rows MySQL has read from this test's `events` table (MariaDB's user
/// statistics, switched on for the test).
async fn events_rows_read(stack: &Ingress) -> i64 {
    let database: (String,) = sqlx::query_as("SELECT DATABASE()").fetch_one(&stack.db).await.unwrap();
    let read: Option<(i64,)> = sqlx::query_as(
        "SELECT CAST(ROWS_READ AS SIGNED) FROM information_schema.TABLE_STATISTICS \
         WHERE TABLE_SCHEMA = ? AND TABLE_NAME = 'events'",
    )
    .bind(database.0)
    .fetch_optional(&stack.db)
    .await
    .unwrap();
    read.map_or(0, |r| r.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_reads_come_from_memory_with_no_mysql_query_per_request() {
    let stack = Ingress::start(&[]).await;
    sqlx::query("SET GLOBAL userstat = 1").execute(&stack.db).await.unwrap();
    let http = dropline_testkit::http();
    let mut ids = Vec::new();
    for (name, venue) in [("Aurora Live", "Hall A"), ("Borealis Night", "Hall B"), ("Comet Club", "Borealis Dome")] {
        let mut body = event_body(-5);
        body["name"] = json!(name);
        body["venue"] = json!(venue);
        ids.push(stack.create_event(&body).await);
    }
    let before = events_rows_read(&stack).await;
    for round in 0..50 {
        let id = ids[round % ids.len()];
        let one: Value = http.get(format!("{}/v1/events/{id}", stack.api)).send().await.unwrap().json().await.unwrap();
        assert_eq!((one["id"].as_u64(), one["availability"]["available"].as_u64()), (Some(id), Some(5)), "{one}");
        let all: Value =
            http.get(format!("{}/v1/events?limit=10", stack.api)).send().await.unwrap().json().await.unwrap();
        assert_eq!(all["events"].as_array().unwrap().len(), 3, "{all}");
        let found: Value =
            http.get(format!("{}/v1/events?q=BOREALIS", stack.api)).send().await.unwrap().json().await.unwrap();
        let names: Vec<&str> =
            found["events"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["Borealis Night", "Comet Club"], "name or venue, case aside");
    }
    let read = events_rows_read(&stack).await - before;
    assert!(read < 50, "150 reads made MySQL read {read} event rows");

    // Availability follows the ledger within a refresh or two.
    let undecided = [dropline::stock::Undecided { intent_id: Uuid::new_v4(), user_id: "ann", quantity: 2 }];
    stack.ledger.allocate(ids[0], &undecided).await.unwrap();
    eventually("the snapshot's counters", Duration::from_secs(5), || async {
        let one: Value =
            http.get(format!("{}/v1/events/{}", stack.api, ids[0])).send().await.unwrap().json().await.unwrap();
        (one["availability"]["available"] == 3 && one["availability"]["held"] == 2).then_some(())
    })
    .await;
    stack.stop().await;
}

/// Every command Redis runs, as `MONITOR` shows it, to see which a request
/// caused: commands run before a marker this test sends after the answer
/// are the ones it may have caused. On a Redis Cluster, every primary's.
struct Monitor {
    nodes: Vec<MonitoredNode>,
}

/// One node's MONITOR stream, and a connection to it for the markers.
struct MonitoredNode {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::TcpStream>>,
    marker: dropline::redis_pool::Pool,
}

impl Monitor {
    async fn start() -> Monitor {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let url = dropline_testkit::redis_url();
        let mut conn = dropline_testkit::redis(1).pool().unwrap().get().await.unwrap();
        let mut addrs: Vec<String> =
            conn.primaries().await.unwrap().into_iter().map(|(h, p)| format!("{h}:{p}")).collect();
        if addrs.is_empty() {
            addrs.push(url.trim_start_matches("redis://").split('/').next().unwrap().to_owned());
        }
        let mut nodes = Vec::new();
        for addr in addrs {
            let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            stream.write_all(b"MONITOR\r\n").await.unwrap();
            let mut lines = tokio::io::BufReader::new(stream).lines();
            assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("+OK"));
            let marker = dropline::config::RedisArgs::new(format!("redis://{addr}"), 1).pool().unwrap();
            nodes.push(MonitoredNode { lines, marker });
        }
        Monitor { nodes }
    }

    /// Whether any command since the last call named `key`.
    async fn touched(&mut self, key: &str) -> bool {
        let mut touched = false;
        for node in &mut self.nodes {
            let marker = Uuid::new_v4().to_string();
            let mut conn = node.marker.get().await.unwrap();
            let _: String =
                dropline::redis_pool::redis::cmd("ECHO").arg(&marker).query_async(&mut *conn).await.unwrap();
            loop {
                let line = tokio::time::timeout(Duration::from_secs(10), node.lines.next_line()).await;
                let line = line.expect("the marker comes through").unwrap().expect("MONITOR goes on");
                if line.contains(&marker) {
                    break;
                }
                touched |= line.contains(key);
            }
        }
        touched
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_a_sell_out_settles_refusals_read_nothing_and_accepted_purchases_still_get_their_202() {
    // The hold-off: the request timeout and the quarter second the door
    // trusts its last read of the stock.
    let stack = Ingress::start(&["--http-request-timeout-ms=2000".into()]).await;
    let http = dropline_testkit::http();
    let keys = dropline::stock::Keys::new(&stack.name);
    let mut body = event_body(-5);
    body["capacity"] = json!(1);
    let event = stack.create_event(&body).await;
    let r = stack.purchase(&http, event, "ann", "k").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let held: Uuid = r.json::<Value>().await.unwrap()["intent_id"].as_str().unwrap().parse().unwrap();
    let undecided = [dropline::stock::Undecided { intent_id: held, user_id: "ann", quantity: 1 }];
    stack.ledger.allocate(event, &undecided).await.unwrap();

    let mut monitor = Monitor::start().await;
    // A purchase's answer, and whether its key's record was read for it.
    let buy = |user: &'static str, key: String| {
        let (request, record) = (stack.purchase(&http, event, user, &key), keys.idempotency(user, &key));
        async move {
            let r = request.send().await.unwrap();
            let status = r.status();
            let body: Value = r.json().await.unwrap();
            (status, body["code"].as_str().map(str::to_owned), record)
        }
    };
    // The first refusals of the sell-out read their key first: a copy of
    // one of them may still be in flight elsewhere.
    let (status, code, record) = eventually("the ingress to see the sell-out", Duration::from_secs(5), || async {
        let answer = buy("bob", Uuid::new_v4().to_string()).await;
        (answer.0 == StatusCode::CONFLICT).then_some(answer)
    })
    .await;
    assert_eq!((status, code.as_deref()), (StatusCode::CONFLICT, Some("sold_out")));
    assert!(monitor.touched(&record).await, "a refusal within the hold-off reads its key");

    // Once the hold-off passed and the tail read past it, none does.
    let shared = tokio::sync::Mutex::new(monitor);
    // A fresh refusal, and whether it read its key.
    let refusal_read = || async {
        let (status, code, record) = buy("bob", Uuid::new_v4().to_string()).await;
        assert_eq!((status, code.as_deref()), (StatusCode::CONFLICT, Some("sold_out")));
        shared.lock().await.touched(&record).await
    };
    eventually("refusals that read nothing", Duration::from_secs(20), || async {
        (!refusal_read().await).then_some(())
    })
    .await;
    let mut monitor = shared.lock().await;
    for i in 0..20 {
        let (status, code, record) = buy("cy", format!("c{i}")).await;
        assert_eq!((status, code.as_deref()), (StatusCode::CONFLICT, Some("sold_out")));
        assert!(!monitor.touched(&record).await, "refusal {i} read its key");
    }
    assert_eq!(stack.ledger.verdict(event, intent_id(event, "cy", "c0")).await.unwrap(), None);

    // The accepted purchase's retry reads its record, and gets its 202.
    let again = stack.purchase(&http, event, "ann", "k").send().await.unwrap();
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    assert_eq!(again.json::<Value>().await.unwrap()["intent_id"], held.to_string());

    // Another replica, which missed the sell-out, accepts one: it records
    // the key and produces the intent. Once the tail read it, the event's
    // refusals read first again, for a whole hold-off, and its retry here
    // is answered from its record: its 202.
    let dave = intent_id(event, "dave", "d");
    let record = IntentRecord { event_id: event, user_id: "dave".into(), quantity: 1, accepted_at_ms: 1 };
    assert!(intent_store(&stack).record_accepted("d", dave, &record).await.unwrap());
    let intent = dropline::messages::PurchaseIntent {
        intent_id: dave,
        event_id: event,
        user_id: "dave".into(),
        quantity: 1,
        accepted_at_ms: 1,
    };
    let producer: rdkafka::producer::FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", dropline_testkit::brokers()).create().unwrap();
    let payload = serde_json::to_vec(&intent).unwrap();
    let topic = format!("{}.intents", stack.name);
    let partition_key = event.to_string();
    let written = rdkafka::producer::FutureRecord::to(&topic).key(&partition_key).payload(&payload);
    producer.send(written, Duration::from_secs(10)).await.unwrap();
    drop(monitor);
    eventually("the tail to read the new intent", Duration::from_secs(10), || async {
        refusal_read().await.then_some(())
    })
    .await;
    let r = stack.purchase(&http, event, "dave", "d").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(r.json::<Value>().await.unwrap()["intent_id"], dave.to_string());
    stack.stop().await;
}
