//! The pipeline end to end: ingress -> Kafka -> allocator -> settler and
//! expirer, on the real Redis, MariaDB and broker.

mod common;

use std::time::Duration;

use common::{eventually, Options, Stack};
use dropctl::api::Api;
use dropctl::drill::{self, DropPlan};
use dropline::messages::PurchaseIntent;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use serde_json::json;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_sells_exactly_the_capacity_and_the_books_balance() {
    let stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    let plan = DropPlan {
        tickets: 40,
        buyers: 150,
        concurrency: 64,
        hold_ttl_secs: 3,
        per_user_limit: 2,
        pay_share: 0.5,
        cancel_share: 0.25,
        user_prefix: "buyer-".into(),
    };
    let report = drill::run(&api, &stack.keys, &stack.db, &stack.ledger, &plan).await.unwrap();
    let verdict = report.verdict.clone().unwrap();
    assert!(report.passed(), "{report:#?}\n{verdict}");
    assert_eq!(report.held, 40, "exactly the capacity was held at sell-out");
    assert_eq!(report.at_sellout_redis.available, 0);
    assert_eq!(report.oversold(), 0);
    let m = report.final_counts();
    assert_eq!(m.paid, report.paid, "every captured payment is a paid order");
    assert_eq!(m.cancelled, report.cancelled);
    assert_eq!(m.expired, report.walked_away, "every walk-away expired");
    assert_eq!(m.held, 0);
    assert_eq!(verdict.redis.sold, report.paid);
    assert_eq!(verdict.redis.available, 40 - report.paid);
    assert_eq!(m.captured_payments, report.paid);
    stack.stop().await;
}

async fn open_event(stack: &Stack, capacity: u32, hold_ttl_secs: u32) -> u64 {
    let api = Api::new(&stack.api).unwrap();
    let now = chrono::Utc::now();
    let event = api
        .create_event(
            &stack.admin_token(),
            &json!({
                "name": "Pipeline test", "venue": "Test Hall",
                "starts_at": now + chrono::Duration::days(1),
                "sale_opens_at": now - chrono::Duration::seconds(5),
                "sale_closes_at": now + chrono::Duration::hours(1),
                "capacity": capacity, "price_cents": 1000, "currency": "EUR",
                "per_user_limit": 2, "hold_ttl_secs": hold_ttl_secs,
            }),
        )
        .await
        .unwrap();
    event["id"].as_u64().unwrap()
}

async fn intents_rows(stack: &Stack, intent: Uuid) -> i64 {
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM intents WHERE intent_id = ?")
        .bind(intent.to_string())
        .fetch_one(&stack.db)
        .await
        .unwrap();
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_intent_delivered_twice_is_decided_once() {
    let stack = Stack::start(Options::default()).await;
    let event = open_event(&stack, 10, 60).await;
    let producer = dropline::kafka::producer(&stack.kafka).unwrap();
    let intent = PurchaseIntent {
        intent_id: Uuid::new_v4(),
        event_id: event,
        user_id: "twice".into(),
        quantity: 2,
        accepted_at_ms: dropline::messages::now_ms(),
    };
    let payload = serde_json::to_vec(&intent).unwrap();
    for _ in 0..2 {
        dropline::kafka::send_acked(&producer, &stack.topics.intents, &event.to_string(), &payload, None)
            .await
            .unwrap();
    }
    // A third delivery after the first decision was recorded.
    eventually("the decision", Duration::from_secs(30), || async {
        (intents_rows(&stack, intent.intent_id).await == 1).then_some(())
    })
    .await;
    dropline::kafka::send_acked(&producer, &stack.topics.intents, &event.to_string(), &payload, None).await.unwrap();
    // A marker intent behind it shows when the allocator got past it.
    let marker = PurchaseIntent { intent_id: Uuid::new_v4(), user_id: "marker".into(), quantity: 1, ..intent.clone() };
    dropline::kafka::send_acked(
        &producer,
        &stack.topics.intents,
        &event.to_string(),
        &serde_json::to_vec(&marker).unwrap(),
        None,
    )
    .await
    .unwrap();
    eventually("the marker's decision", Duration::from_secs(30), || async {
        (intents_rows(&stack, marker.intent_id).await == 1).then_some(())
    })
    .await;
    assert_eq!(intents_rows(&stack, intent.intent_id).await, 1);
    let levels = stack.ledger.levels(event).await.unwrap().unwrap();
    assert_eq!(levels.held, 3, "2 for the twice-delivered intent, 1 for the marker");
    assert_eq!(stack.ledger.user_units(event, "twice").await.unwrap(), 2);
    let (orders,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM orders WHERE order_id = ?")
        .bind(intent.intent_id.to_string())
        .fetch_one(&stack.db)
        .await
        .unwrap();
    assert_eq!(orders, 1);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_intent_is_dead_lettered_and_the_partition_keeps_flowing() {
    let stack = Stack::start(Options::default()).await;
    let event = open_event(&stack, 10, 60).await;
    let producer = dropline::kafka::producer(&stack.kafka).unwrap();
    let key = event.to_string();
    dropline::kafka::send_acked(&producer, &stack.topics.intents, &key, b"{not json", None).await.unwrap();
    let good = PurchaseIntent {
        intent_id: Uuid::new_v4(),
        event_id: event,
        user_id: "after-poison".into(),
        quantity: 1,
        accepted_at_ms: dropline::messages::now_ms(),
    };
    dropline::kafka::send_acked(&producer, &stack.topics.intents, &key, &serde_json::to_vec(&good).unwrap(), None)
        .await
        .unwrap();
    eventually("the intent behind the poison", Duration::from_secs(30), || async {
        (intents_rows(&stack, good.intent_id).await == 1).then_some(())
    })
    .await;

    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .set("group.id", format!("{}-dlq-reader", stack.name))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&stack.topics.dead_letter]).unwrap();
    let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await.expect("a dead letter").unwrap();
    assert_eq!(m.payload(), Some(&b"{not json"[..]));
    let headers = m.headers().expect("dead letters carry headers");
    let reason = headers.iter().find(|h| h.key == "dropline-dlq-reason").and_then(|h| h.value).unwrap();
    assert!(String::from_utf8_lossy(reason).contains("undecodable intent"), "{}", String::from_utf8_lossy(reason));
    let stage = headers.iter().find(|h| h.key == "dropline-dlq-stage").and_then(|h| h.value).unwrap();
    assert_eq!(stage, b"allocator");
    stack.stop().await;
}
