//! The pipeline end to end: ingress -> Kafka -> allocator -> settler and
//! expirer, on the real Redis, MariaDB and broker.

mod common;

use std::time::Duration;

use common::{eventually, Options, Stack};
use dropctl::api::Api;
use dropctl::drill::{self, DropPlan};
use dropline::kafka::Record;
use dropline::messages::{Decision, HoldExpiry, Outcome, PurchaseIntent, RejectReason};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_sells_exactly_the_capacity_and_the_books_balance() {
    let stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    // The host accepts to oversell 5: the drop sells 45, 5 of them beyond
    // the capacity, and every count shows them as such.
    let plan = DropPlan {
        tickets: 40,
        oversell_allowance: 5,
        buyers: 150,
        concurrency: 64,
        hold_ttl_secs: 3,
        per_user_limit: 2,
        pay_share: 0.5,
        cancel_share: 0.25,
        late_pay_share: 0.0,
        payment_trouble_share: 0.0,
        paid_cancel_share: 0.1,
        webhook_copies: 2,
        user_prefix: "buyer-".into(),
        grace: dropctl::invariants::production_grace(),
        pipeline: Some(stack.pipeline()),
        provider: Some(stack.paysim.clone()),
        room: None,
    };
    let report = drill::run(&api, &stack.keys, &stack.db, &stack.ledger, &plan).await.unwrap();
    let verdict = report.verdict.clone().unwrap();
    assert!(report.passed(), "{report:#?}\n{verdict}");
    assert!(report.sold_out_exactly(), "{report:#?}");
    assert_eq!(report.held, 45, "exactly the capacity and the allowance were held at sell-out");
    assert_eq!(report.at_sellout_redis.available, 0);
    assert_eq!((report.at_sellout_redis.allowance, report.at_sellout_redis.oversold()), (5, 5));
    let m = report.final_counts();
    assert_eq!((m.capacity, m.oversell_allowance), (40, 5));
    assert_eq!(report.oversold(), m.paid.saturating_sub(40), "what was sold beyond the capacity shows as oversold");
    assert!(verdict.check(dropctl::invariants::Row::NoOversell).unwrap().detail.contains("<= 40 + allowance 5"));
    assert_eq!(m.paid, report.paid, "every captured payment is a paid order");
    // Holders who cancelled, and payers who cancelled within the policy.
    assert!(report.cancelled_after_paying > 0, "{report:#?}");
    assert_eq!(m.cancelled, report.cancelled + report.cancelled_after_paying);
    assert_eq!(m.refund_rows, report.cancelled_after_paying, "each paid cancel has its refund");
    assert_eq!(m.expired, report.walked_away + report.too_late, "every walk-away expired");
    assert_eq!(m.held, 0);
    assert_eq!(verdict.redis.sold, report.paid);
    assert_eq!(verdict.redis.available, 45 - report.paid);
    assert_eq!(m.captured_payments, report.paid);

    // The drift gauge's measurement: none now, and it sees a lost write.
    use dropline_settler::reconcile::{measure, Drift};
    let drift = measure(&stack.db, &stack.ledger).await.unwrap().drift;
    assert_eq!(drift[&report.event_id], Drift { held: 0, sold: 0 });
    let stock = dropline::stock::EventKeys::new(&stack.name, report.event_id).stock;
    let mut conn = stack.ledger.pool().get().await.unwrap();
    let _: i64 = dropline::redis_pool::redis::cmd("HINCRBY")
        .arg(&stock)
        .arg("sold")
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let drift = measure(&stack.db, &stack.ledger).await.unwrap().drift;
    assert_eq!(drift[&report.event_id], Drift { held: 0, sold: -1 });
    // No message in flight explains it, so the reconciler repairs it from
    // the record after a few passes.
    eventually("the reconciler to repair the drift", Duration::from_secs(60), || async {
        let levels = stack.ledger.levels(report.event_id).await.unwrap()?;
        (levels.sold == report.paid && levels.is_conserved()).then_some(())
    })
    .await;
    stack.stop().await;
}

/// The demo's path: every buyer waits in the pre-queue, is placed by the
/// draw, buys once admitted; the sale sells exactly its capacity, the books
/// balance, and the published draw checks out, by the drill and by the
/// README's `dropctl verify-draw` (and it fails on a tampered copy: its
/// exit status and message are asserted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_through_a_waiting_room_sells_exactly_the_capacity_and_its_draw_verifies() {
    let stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    let plan = DropPlan {
        tickets: 20,
        oversell_allowance: 0,
        buyers: 80,
        concurrency: 32,
        hold_ttl_secs: 8,
        per_user_limit: 1,
        pay_share: 0.5,
        cancel_share: 0.25,
        late_pay_share: 0.0,
        payment_trouble_share: 0.0,
        paid_cancel_share: 0.0,
        webhook_copies: 1,
        user_prefix: "fan-".into(),
        grace: dropctl::invariants::production_grace(),
        pipeline: Some(stack.pipeline()),
        provider: Some(stack.paysim.clone()),
        room: Some(drill::RoomPlan {
            opens_in_secs: 6,
            outflow_per_sec: 40,
            time_to_act_secs: 10,
            proof_of_work_bits: 8,
        }),
    };
    let report = drill::run(&api, &stack.keys, &stack.db, &stack.ledger, &plan).await.unwrap();
    let verdict = report.verdict.clone().unwrap();
    assert!(report.passed(), "{report:#?}\n{verdict}");
    assert!(report.sold_out_exactly(), "{report:#?}");
    let draw = report.draw.clone().unwrap();
    assert_eq!(draw.mismatch, None);
    assert!(draw.entrants >= 2 && draw.buyers_drawn == draw.entrants, "{draw:?}");
    assert_eq!(report.oversold(), 0);
    // Every buyer followed the line on their ticket's stream, none polled.
    let line = report.line.clone().unwrap();
    assert_eq!(line.streamed, 80, "{line:?}");
    assert!(line.events >= 80, "{line:?}");

    // The README's check, as a buyer runs it.
    let verify = |event: u64| {
        std::process::Command::new(common::process::bin_dir().join("dropctl"))
            .args(["verify-draw", &event.to_string()])
            .env("DROPLINE_INGRESS_URL", &stack.api)
            .output()
            .unwrap()
    };
    let out = verify(report.event_id);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("the draw of {} tickets holds", draw.entrants)), "{stdout}");
    // A tampered copy (two places swapped) fails the same check.
    let mut tampered = dropctl::api::Api::new(&stack.api).unwrap().draw(report.event_id).await.unwrap();
    tampered.order.swap(0, 1);
    let saved = std::env::temp_dir().join(format!("{}-draw.json", stack.name));
    std::fs::write(&saved, serde_json::to_vec(&tampered).unwrap()).unwrap();
    let out = std::process::Command::new(common::process::bin_dir().join("dropctl"))
        .args(["verify-draw", &report.event_id.to_string(), "--file", saved.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("does not hold"), "{stderr}");
    let _ = std::fs::remove_file(&saved);
    stack.stop().await;
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
    let event = stack.open_event(10, 60).await;
    let publisher = stack.publisher();
    let intent = PurchaseIntent {
        intent_id: Uuid::new_v4(),
        event_id: event,
        user_id: "twice".into(),
        quantity: 2,
        accepted_at_ms: dropline::messages::now_ms(),
    };
    let payload = serde_json::to_vec(&intent).unwrap();
    let key = event.to_string();
    for _ in 0..2 {
        publisher.publish(Record::new(&stack.topics.intents, &key, &payload)).await.unwrap();
    }
    // A third delivery after the first decision was recorded.
    eventually("the decision", Duration::from_secs(30), || async {
        (intents_rows(&stack, intent.intent_id).await == 1).then_some(())
    })
    .await;
    publisher.publish(Record::new(&stack.topics.intents, &key, &payload)).await.unwrap();
    // A marker intent behind it shows when the allocator got past it.
    let marker = PurchaseIntent { intent_id: Uuid::new_v4(), user_id: "marker".into(), quantity: 1, ..intent.clone() };
    publisher.publish(Record::new(&stack.topics.intents, &key, &serde_json::to_vec(&marker).unwrap())).await.unwrap();
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
    let event = stack.open_event(10, 60).await;
    let publisher = stack.publisher();
    let key = event.to_string();
    publisher.publish(Record::new(&stack.topics.intents, &key, b"{not json")).await.unwrap();
    let good = PurchaseIntent {
        intent_id: Uuid::new_v4(),
        event_id: event,
        user_id: "after-poison".into(),
        quantity: 1,
        accepted_at_ms: dropline::messages::now_ms(),
    };
    publisher.publish(Record::new(&stack.topics.intents, &key, &serde_json::to_vec(&good).unwrap())).await.unwrap();
    eventually("the intent behind the poison", Duration::from_secs(30), || async {
        (intents_rows(&stack, good.intent_id).await == 1).then_some(())
    })
    .await;

    let m = stack.dead_letters(1).await.remove(0);
    assert_eq!(m.payload(), Some(&b"{not json"[..]));
    let headers = m.headers().expect("dead letters carry headers");
    let reason = headers.iter().find(|h| h.key == "dropline-dlq-reason").and_then(|h| h.value).unwrap();
    assert!(String::from_utf8_lossy(reason).contains("undecodable intent"), "{}", String::from_utf8_lossy(reason));
    let stage = headers.iter().find(|h| h.key == "dropline-dlq-stage").and_then(|h| h.value).unwrap();
    assert_eq!(stage, b"allocator");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_the_record_can_never_take_is_dead_lettered_and_the_partition_keeps_flowing() {
    let stack = Stack::start(Options::default()).await;
    let event = stack.open_event(10, 60).await;
    let publisher = stack.publisher();
    let key = event.to_string();
    let decision = |user_id: String| Decision {
        intent_id: Uuid::new_v4(),
        event_id: event,
        user_id,
        quantity: 1,
        decided_at_ms: dropline::messages::now_ms(),
        outcome: Outcome::Rejected { reason: RejectReason::SoldOut },
    };
    // It decodes, but MySQL refuses the row for its own sake (a user id
    // longer than the column): retrying can never help.
    let poison = decision("p".repeat(300));
    let good = decision("after-poison".into());
    for d in [&poison, &good] {
        publisher.publish(Record::new(&stack.topics.decisions, &key, &serde_json::to_vec(d).unwrap())).await.unwrap();
    }
    eventually("the decision behind the poison", Duration::from_secs(60), || async {
        (intents_rows(&stack, good.intent_id).await == 1).then_some(())
    })
    .await;
    assert_eq!(intents_rows(&stack, poison.intent_id).await, 0);

    let m = stack.dead_letters(1).await.remove(0);
    let parked: Decision = serde_json::from_slice(m.payload().unwrap()).unwrap();
    assert_eq!(parked.intent_id, poison.intent_id);
    let header = |name: &str| {
        let h = m.headers().expect("dead letters carry headers");
        h.iter().find(|h| h.key == name).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(header("dropline-dlq-stage").as_deref(), Some("settler"));
    assert_eq!(header("dropline-dlq-kind").as_deref(), Some("unappliable"));
    stack.stop().await;
}

/// Purchases and follows the intent until it is decided.
async fn buy_and_wait(stack: &Stack, api: &Api, user: &str, event: u64, quantity: u32) -> (Uuid, serde_json::Value) {
    let token = stack.token(user);
    let key = Uuid::new_v4().to_string();
    let intent = match api.purchase(&token, event, &key, quantity).await.unwrap() {
        dropctl::api::Purchase::Accepted(id) => id,
        other => panic!("purchase not accepted: {other:?}"),
    };
    let status = eventually("the decision", Duration::from_secs(30), || async {
        let s = api.intent(&token, intent).await.unwrap();
        (s.status != "queued").then_some(s)
    })
    .await;
    (intent, json!({ "status": status.status, "reason": status.reason, "order": status.order }))
}

async fn order_state_in_mysql(stack: &Stack, order: Uuid) -> Option<String> {
    sqlx::query_as::<_, (String,)>("SELECT CAST(state AS CHAR) FROM orders WHERE order_id = ?")
        .bind(order.to_string())
        .fetch_optional(&stack.db)
        .await
        .unwrap()
        .map(|r| r.0)
}

async fn wait_order_state(stack: &Stack, order: Uuid, state: &str) {
    eventually(&format!("order {order} {state} in MySQL"), Duration::from_secs(30), || async {
        (order_state_in_mysql(stack, order).await.as_deref() == Some(state)).then_some(())
    })
    .await
}

async fn payments_of(stack: &Stack, order: Uuid) -> Vec<(String, String)> {
    sqlx::query_as("SELECT payment_id, CAST(disposition AS CHAR) FROM payments WHERE order_id = ?")
        .bind(order.to_string())
        .fetch_all(&stack.db)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_buyers_racing_for_the_last_ticket_over_http_get_one_hold() {
    let stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    let event = stack.open_event(1, 60).await;
    let (a, b) =
        tokio::join!(buy_and_wait(&stack, &api, "racer-a", event, 1), buy_and_wait(&stack, &api, "racer-b", event, 1));
    let statuses = [a.1["status"].as_str().unwrap(), b.1["status"].as_str().unwrap()];
    assert_eq!(statuses.iter().filter(|s| **s == "held").count(), 1, "{a:?} {b:?}");
    let loser = if statuses[0] == "held" { &b.1 } else { &a.1 };
    assert_eq!(loser["reason"], "sold_out");
    let levels = stack.ledger.levels(event).await.unwrap().unwrap();
    assert_eq!((levels.available, levels.held), (0, 1));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_user_limit_holds_across_purchases() {
    let stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    let event = stack.open_event(10, 60).await;
    let (_, first) = buy_and_wait(&stack, &api, "greedy", event, 2).await;
    assert_eq!(first["status"], "held");
    let (_, second) = buy_and_wait(&stack, &api, "greedy", event, 1).await;
    assert_eq!((second["status"].as_str(), second["reason"].as_str()), (Some("rejected"), Some("limit_reached")));
    assert_eq!(stack.ledger.user_units(event, "greedy").await.unwrap(), 2);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_gives_the_stock_back_at_once() {
    let stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    let event = stack.open_event(1, 60).await;
    let (order, held) = buy_and_wait(&stack, &api, "canceller", event, 1).await;
    assert_eq!(held["status"], "held");
    let token = stack.token("canceller");
    assert_eq!(api.cancel(&stack.token("someone-else"), order).await.unwrap(), "order_not_found");
    assert_eq!(api.cancel(&token, order).await.unwrap(), "cancelled");
    let levels = stack.ledger.levels(event).await.unwrap().unwrap();
    assert_eq!((levels.available, levels.held), (1, 0), "the stock is back as soon as cancel answers");
    assert_eq!(api.cancel(&token, order).await.unwrap(), "cancelled", "cancelling twice is harmless");
    wait_order_state(&stack, order, "cancelled").await;
    // The ticket is for sale again.
    let (_, next) = buy_and_wait(&stack, &api, "next-in-line", event, 1).await;
    assert_eq!(next["status"], "held");
    // A paid or cancelled order cannot be paid for again.
    let r = dropline_testkit::http()
        .post(format!("{}/v1/orders/{order}/payments", stack.api))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::CONFLICT);
    stack.stop().await;
}

/// Opens a payment at the provider for a held order; returns its checkout.
async fn open_payment(stack: &Stack, user: &str, order: Uuid) -> String {
    stack.start_payment(user, order).await["checkout_url"].as_str().unwrap().to_owned()
}

async fn confirm(checkout: &str, copies: u32) -> serde_json::Value {
    let r =
        dropline_testkit::http().post(format!("{checkout}/confirm?wait=true&copies={copies}")).send().await.unwrap();
    assert!(r.status().is_success());
    let body: serde_json::Value = r.json().await.unwrap();
    serde_json::from_str(body["webhook_body"].as_str().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_after_expiry_is_refunded_through_the_provider_once_and_the_stock_is_released_once() {
    let stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    let event = stack.open_event(1, 1).await;
    let (order, held) = buy_and_wait(&stack, &api, "slowpoke", event, 1).await;
    assert_eq!(held["status"], "held");
    let checkout = open_payment(&stack, "slowpoke", order).await;
    // The expirer releases the hold at its deadline.
    wait_order_state(&stack, order, "expired").await;
    let levels = stack.ledger.levels(event).await.unwrap().unwrap();
    assert_eq!((levels.available, levels.held, levels.sold), (1, 0, 0));
    // The provider's next refund calls fail: two refused, then one made
    // whose answer is lost.
    let http = dropline_testkit::http();
    let faults = json!({ "refund_failures": 2, "refund_lost_answers": 1 });
    let r = http.post(format!("{}/v1/faults", stack.paysim)).json(&faults).send().await.unwrap();
    assert!(r.status().is_success());
    // The buyer pays anyway: the money is recorded for refund, never lost.
    let answer = confirm(&checkout, 1).await;
    assert_eq!(answer["status"], "refund_required");
    assert_eq!(answer["order_state"], "expired");
    let payments = eventually("the refund record", Duration::from_secs(30), || async {
        let p = payments_of(&stack, order).await;
        (!p.is_empty()).then_some(p)
    })
    .await;
    assert_eq!(payments.len(), 1);
    assert_eq!(payments[0].1, "refund_required");
    // The settler's refund worker retries until the provider has made it,
    // under one idempotency key: one refund at the provider.
    let (refund_id, provider_refund_id, attempts) = eventually("the refund made", Duration::from_secs(60), || async {
        let row: Option<(String, Option<String>, u32, String)> = sqlx::query_as(
            "SELECT refund_id, provider_refund_id, attempts, CAST(state AS CHAR) FROM refunds WHERE order_id = ?",
        )
        .bind(order.to_string())
        .fetch_optional(&stack.db)
        .await
        .unwrap();
        row.filter(|r| r.3 == "refunded").map(|r| (r.0, r.1.unwrap(), r.2))
    })
    .await;
    assert_eq!(attempts, 4, "two refused calls, one whose answer was lost, then the one that read it");
    let listing: serde_json::Value =
        http.get(format!("{}/v1/refunds", stack.paysim)).send().await.unwrap().json().await.unwrap();
    let refunds = listing["refunds"].as_array().unwrap();
    assert_eq!(refunds.len(), 1, "{listing}");
    assert_eq!(refunds[0]["refund_id"], provider_refund_id.as_str());
    assert_eq!(refunds[0]["idempotency_key"], refund_id.as_str());
    assert_eq!(refunds[0]["payment_id"], payments[0].0.as_str());
    assert_eq!(order_state_in_mysql(&stack, order).await.as_deref(), Some("expired"));
    let levels = stack.ledger.levels(event).await.unwrap().unwrap();
    assert_eq!((levels.available, levels.held, levels.sold), (1, 0, 0), "released exactly once");
    // The buyer is told: the refund requested, then made, once each.
    let told =
        stack.told(2, |d| d.order_id.as_deref() == Some(order.to_string().as_str()) && d.kind.contains("refund")).await;
    assert_eq!(told, ["order.refund_requested", "order.refunded"]);
    // And the books, the provider's refunds included, balance.
    let verdict = stack.books_balance(event).await;
    let made = verdict.check(dropctl::invariants::Row::RefundsMade).unwrap();
    assert!(made.detail.contains("1 refunds, 1 made") && made.detail.contains("the provider has 1"), "{verdict}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_racing_the_expiry_ends_the_order_one_way_only() {
    let stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    let event = stack.open_event(5, 1).await;
    let mut orders = Vec::new();
    for i in 0..5 {
        let user = format!("racer-{i}");
        let (order, _) = buy_and_wait(&stack, &api, &user, event, 1).await;
        orders.push((order, open_payment(&stack, &user, order).await));
    }
    // Pay each hold close to its one-second deadline, staggered around it,
    // while the expirer is working through the same holds.
    let hold = stack.ledger.hold(event, orders[0].0).await.unwrap().unwrap();
    let mut tasks = Vec::new();
    for (i, (order, checkout)) in orders.iter().cloned().enumerate() {
        let at = hold.expires_at_ms - 200 + 100 * i as i64;
        tasks.push(tokio::spawn(async move {
            let wait = (at - dropline::messages::now_ms()).max(0) as u64;
            tokio::time::sleep(Duration::from_millis(wait)).await;
            (order, confirm(&checkout, 1).await)
        }));
    }
    let mut paid = 0;
    for t in tasks {
        let (order, answer) = t.await.unwrap();
        let state = answer["order_state"].as_str().unwrap().to_owned();
        match answer["status"].as_str().unwrap() {
            "captured" => {
                assert_eq!(state, "paid");
                paid += 1;
            }
            "refund_required" => assert_eq!(state, "expired"),
            other => panic!("unexpected {other}"),
        }
        wait_order_state(&stack, order, &state).await;
    }
    let levels = stack.ledger.levels(event).await.unwrap().unwrap();
    assert_eq!((levels.sold, levels.held, levels.available), (paid, 0, 5 - paid));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_webhooks_make_one_paid_order_and_one_payment() {
    let stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    let event = stack.open_event(3, 60).await;
    let (order, _) = buy_and_wait(&stack, &api, "payer", event, 1).await;
    let checkout = open_payment(&stack, "payer", order).await;
    let answer = confirm(&checkout, 4).await;
    assert_eq!(answer["status"], "captured");
    wait_order_state(&stack, order, "paid").await;
    let payments = eventually("the payment record", Duration::from_secs(30), || async {
        let p = payments_of(&stack, order).await;
        (!p.is_empty()).then_some(p)
    })
    .await;
    assert_eq!(payments.len(), 1, "{payments:?}");
    assert_eq!(payments[0].1, "captured");
    let levels = stack.ledger.levels(event).await.unwrap().unwrap();
    assert_eq!((levels.sold, levels.held, levels.available), (1, 0, 2));
    // The status follows the order.
    let status = api.intent(&stack.token("payer"), order).await.unwrap();
    assert_eq!(status.status, "paid");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_are_released_after_an_expirer_restart() {
    let mut stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    let event = stack.open_event(2, 1).await;
    let (order, held) = buy_and_wait(&stack, &api, "walker", event, 1).await;
    assert_eq!(held["status"], "held");
    // The expirer goes down with the hold's expiry message read or not.
    stack.stop_stage("expirer").await;
    let hold = stack.ledger.hold(event, order).await.unwrap().unwrap();
    eventually("the deadline to pass", Duration::from_secs(10), || async {
        (dropline::messages::now_ms() > hold.expires_at_ms + 500).then_some(())
    })
    .await;
    let still = stack.ledger.hold(event, order).await.unwrap().unwrap();
    assert_eq!(still.state, dropline::messages::OrderState::Held, "nothing released it while the expirer was down");
    stack.start_expirer();
    wait_order_state(&stack, order, "expired").await;
    let levels = stack.ledger.levels(event).await.unwrap().unwrap();
    assert_eq!((levels.available, levels.held), (2, 0));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_never_lets_the_expirer_commit_past_a_hold_still_waiting() {
    let mut stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    let event = stack.open_event(5, 1).await;
    // On the partition of the event's holds: one due at once, then one that
    // waits out the whole test.
    // A raw producer: the test needs each record's partition and offset,
    // which the stages' publisher does not hand back.
    let producer: FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", common::brokers()).create().unwrap();
    let key = event.to_string();
    let mut sent = Vec::new();
    for expires_at_ms in [0, dropline::messages::now_ms() + 600_000] {
        let hold = HoldExpiry { order_id: Uuid::new_v4(), event_id: event, expires_at_ms };
        let payload = serde_json::to_vec(&hold).unwrap();
        let record = FutureRecord::to(&stack.topics.hold_expiry).key(&key).payload(&payload);
        sent.push(producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap());
    }
    let (partition, waiting) = (sent[1].partition, sent[1].offset);
    let probe: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .set("group.id", format!("{}-expirer", stack.name))
        .create()
        .unwrap();
    let topic = stack.topics.hold_expiry.clone();
    let committed = || {
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition(&topic, partition);
        let committed = probe.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
        match committed.find_partition(&topic, partition).map(|e| e.offset()) {
            Some(rdkafka::Offset::Offset(at)) => Some(at),
            _ => None,
        }
    };
    // Holds behind the waiting one are released, before and after the group
    // takes the partitions away and gives them back, and the group never
    // commits past the waiting one meanwhile.
    let (before, _) = buy_and_wait(&stack, &api, "before", event, 1).await;
    wait_order_state(&stack, before, "expired").await;
    rebalance_expirers(&stack).await;
    let (after, _) = buy_and_wait(&stack, &api, "after", event, 1).await;
    eventually("the hold behind it released after the rebalance", Duration::from_secs(30), || async {
        let at = committed();
        assert!(at.is_none_or(|at| at <= waiting), "committed {at:?}, past the hold waiting at {waiting}");
        (order_state_in_mysql(&stack, after).await.as_deref() == Some("expired")).then_some(())
    })
    .await;
    // A drained expirer commits what it stored: up to the waiting hold.
    stack.stop_stage("expirer").await;
    assert_eq!(committed(), Some(waiting), "committed up to the waiting hold, never past it");
    stack.stop().await;
}

/// Makes the expirers' group rebalance twice: a member joins (every
/// partition is revoked and shared out again, some to it), then leaves
/// (they all go back). It reads for nothing and commits nothing.
async fn rebalance_expirers(stack: &Stack) {
    let intruder: std::sync::Arc<StreamConsumer> = std::sync::Arc::new(
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", common::brokers())
            .set("group.id", format!("{}-expirer", stack.name))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .create()
            .unwrap(),
    );
    intruder.subscribe(&[&stack.topics.hold_expiry]).unwrap();
    // A member takes part in its group's rebalances only while it polls.
    let polling = tokio::spawn({
        let intruder = intruder.clone();
        async move {
            loop {
                let _ = intruder.recv().await;
            }
        }
    });
    eventually("the group to share its partitions with a new member", Duration::from_secs(60), || async {
        (intruder.assignment().ok()?.count() > 0).then_some(())
    })
    .await;
    polling.abort();
    let _ = polling.await;
    // Dropping it closes it (blocking): it leaves the group.
    tokio::task::spawn_blocking(move || drop(intruder)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_allocator_has_committed_what_it_decided() {
    let mut stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    let event = stack.open_event(10, 60).await;
    for i in 0..3 {
        buy_and_wait(&stack, &api, &format!("drain-{i}"), event, 1).await;
    }
    stack.stop_stage("allocator").await;
    // The group's committed offsets reach the end of every partition.
    let probe: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .set("group.id", format!("{}-allocator", stack.name))
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition(&stack.topics.intents, p);
    }
    let committed = probe.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    let mut total = 0;
    for e in committed.elements() {
        let (_, high) = probe.fetch_watermarks(&stack.topics.intents, e.partition(), Duration::from_secs(10)).unwrap();
        let at = match e.offset() {
            rdkafka::Offset::Offset(o) => o,
            _ => 0,
        };
        assert_eq!(at, high, "partition {} committed up to its end", e.partition());
        total += high;
    }
    assert_eq!(total, 3, "three intents were produced and committed");
    stack.stop().await;
}

/// Reads `topic` from the start until `want` messages whose payload mentions
/// `needle` were seen; returns their request-id headers.
async fn request_ids_on(stack: &Stack, topic: &str, needle: &str, want: usize) -> Vec<Option<String>> {
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .set("group.id", format!("{}-reader-{}", stack.name, Uuid::new_v4().simple()))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut found = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while found.len() < want {
        let m = tokio::time::timeout_at(deadline, consumer.recv()).await.expect("messages in time").unwrap();
        if String::from_utf8_lossy(m.payload().unwrap_or_default()).contains(needle) {
            found.push(dropline::kafka::request_id(&m.detach()));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_travels_with_the_purchase_through_every_stage() {
    let stack = Stack::start(Options::default()).await;
    let event = stack.open_event(2, 1).await;
    let http = dropline_testkit::http();
    let r = http
        .post(format!("{}/v1/events/{event}/purchases", stack.api))
        .bearer_auth(stack.token("traced"))
        .header("idempotency-key", "trace-1")
        .header("x-request-id", "rid-purchase-1")
        .json(&json!({"quantity": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "rid-purchase-1");
    let order: Uuid = r.json::<serde_json::Value>().await.unwrap()["intent_id"].as_str().unwrap().parse().unwrap();
    let needle = order.to_string();
    assert_eq!(request_ids_on(&stack, &stack.topics.intents, &needle, 1).await, vec![Some("rid-purchase-1".into())]);
    assert_eq!(request_ids_on(&stack, &stack.topics.decisions, &needle, 1).await, vec![Some("rid-purchase-1".into())]);
    assert_eq!(
        request_ids_on(&stack, &stack.topics.hold_expiry, &needle, 1).await,
        vec![Some("rid-purchase-1".into())]
    );
    // The expirer ends the hold under the purchase's request id.
    wait_order_state(&stack, order, "expired").await;
    assert_eq!(
        request_ids_on(&stack, &stack.topics.order_changes, &needle, 1).await,
        vec![Some("rid-purchase-1".into())]
    );
    // Without a usable header, the ingress makes one up.
    let r = http
        .get(format!("{}/v1/events/{event}", stack.api))
        .header("x-request-id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    let made_up = r.headers()["x-request-id"].to_str().unwrap();
    assert_eq!(made_up.len(), 32, "{made_up}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_ledger_is_rebuilt_from_mysql_and_the_sale_goes_on() {
    let stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    let event = stack.open_event(6, 60).await;
    let (alice, held) = buy_and_wait(&stack, &api, "alice", event, 2).await;
    assert_eq!(held["status"], "held");
    let (bob, _) = buy_and_wait(&stack, &api, "bob", event, 1).await;
    let checkout = open_payment(&stack, "bob", bob).await;
    assert_eq!(confirm(&checkout, 1).await["status"], "captured");
    let (carol, _) = buy_and_wait(&stack, &api, "carol", event, 1).await;
    assert_eq!(api.cancel(&stack.token("carol"), carol).await.unwrap(), "cancelled");
    wait_order_state(&stack, alice, "held").await;
    wait_order_state(&stack, bob, "paid").await;
    wait_order_state(&stack, carol, "cancelled").await;

    // Redis loses the event's ledger.
    stack.lose_ledger(event).await;

    // A buyer arriving now waits (the allocator will not guess) and is
    // decided once the settler has rebuilt the ledger from MySQL.
    let (dave, decided) = buy_and_wait(&stack, &api, "dave", event, 2).await;
    assert_eq!(decided["status"], "held", "{decided}");
    let levels = stack.ledger.levels(event).await.unwrap().unwrap();
    assert_eq!(
        (levels.capacity, levels.available, levels.held, levels.sold),
        (6, 1, 4, 1),
        "alice 2 and dave 2 held, bob's 1 sold, carol's returned"
    );
    // Per-user counts, holds and decisions came back too.
    let (_, more) = buy_and_wait(&stack, &api, "alice", event, 1).await;
    assert_eq!((more["status"].as_str(), more["reason"].as_str()), (Some("rejected"), Some("limit_reached")));
    assert!(matches!(stack.ledger.verdict(event, alice).await.unwrap(), Some(dropline::stock::Verdict::Held { .. })));
    let checkout = open_payment(&stack, "alice", alice).await;
    assert_eq!(confirm(&checkout, 1).await["status"], "captured");
    wait_order_state(&stack, dave, "held").await;
    let levels = stack.ledger.levels(event).await.unwrap().unwrap();
    assert!(levels.is_conserved());
    assert_eq!((levels.held, levels.sold), (2, 3));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_that_lost_writes_cannot_sell_a_unit_twice() {
    let stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    let event = stack.open_event(2, 60).await;
    let before = common::redis_snapshot(stack.ledger.pool(), &format!("{}:*", stack.name)).await;

    // Alice buys and pays for one ticket: unit 1.
    let (alice, held) = buy_and_wait(&stack, &api, "alice", event, 1).await;
    assert_eq!(held["status"], "held");
    let checkout = open_payment(&stack, "alice", alice).await;
    assert_eq!(confirm(&checkout, 1).await["status"], "captured");
    wait_order_state(&stack, alice, "paid").await;

    // Redis fails over to a replica that never saw any of it.
    common::redis_roll_back(stack.ledger.pool(), &format!("{}:*", stack.name), &before).await;
    assert_eq!(stack.ledger.levels(event).await.unwrap().unwrap().available, 2);

    // The ledger hands Bob both units, Alice's among them. The record
    // refuses: Bob's order is voided, Alice keeps her ticket.
    let (bob, held) = buy_and_wait(&stack, &api, "bob", event, 2).await;
    assert_eq!(held["status"], "held", "Redis alone decided: {held}");
    wait_order_state(&stack, bob, "voided").await;
    wait_order_state(&stack, alice, "paid").await;

    // What Bob sees: his order is voided, and paying it is refused with a
    // stable code.
    let bob_token = stack.token("bob");
    eventually("the rebuilt ledger to show bob's order voided", Duration::from_secs(30), || async {
        (api.order_state(&bob_token, bob).await.unwrap() == "voided").then_some(())
    })
    .await;
    let refused = api.start_payment(&bob_token, bob).await.unwrap();
    assert_eq!(refused.err().as_deref(), Some("order_voided"));

    // The reconciler rebuilt Redis from the record: one sold, one free.
    let levels = stack.ledger.levels(event).await.unwrap().unwrap();
    assert_eq!((levels.available, levels.held, levels.sold), (1, 0, 1), "{levels:?}");
    let verdict = dropctl::invariants::verify(&stack.db, &stack.ledger, event, &Default::default()).await.unwrap();
    assert!(verdict.all_hold(), "{verdict}");
    let units: Vec<(u32, String)> =
        sqlx::query_as("SELECT unit_no, order_id FROM order_units WHERE event_id = ? ORDER BY unit_no")
            .bind(event)
            .fetch_all(&stack.db)
            .await
            .unwrap();
    assert_eq!(units, vec![(1, alice.to_string())]);

    // The next buyer gets the free unit, and it is recorded as theirs.
    let (carol, held) = buy_and_wait(&stack, &api, "carol", event, 1).await;
    assert_eq!(held["status"], "held");
    wait_order_state(&stack, carol, "held").await;
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM order_units WHERE order_id = ? AND unit_no = 2")
        .bind(carol.to_string())
        .fetch_one(&stack.db)
        .await
        .unwrap();
    assert_eq!(n, 1);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_that_lost_writes_cannot_break_the_per_user_limit() {
    let stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    // Ten tickets, two per buyer. Xavier holds units 1 and 2 when the
    // replica last heard from the primary.
    let event = stack.open_event(10, 60).await;
    let (xavier, _) = buy_and_wait(&stack, &api, "xavier", event, 2).await;
    let before = common::redis_snapshot(stack.ledger.pool(), &format!("{}:*", stack.name)).await;
    // Then he cancels, and Dana gets his two units.
    assert_eq!(api.cancel(&stack.token("xavier"), xavier).await.unwrap(), "cancelled");
    let (first, _) = buy_and_wait(&stack, &api, "dana", event, 2).await;
    wait_order_state(&stack, first, "held").await;
    wait_order_state(&stack, xavier, "cancelled").await;
    common::redis_roll_back(stack.ledger.pool(), &format!("{}:*", stack.name), &before).await;
    // Redis forgot both: it gives Dana two more, units 3 and 4, which no one
    // has. Only her limit is broken, and the record sees it.
    let (second, held) = buy_and_wait(&stack, &api, "dana", event, 2).await;
    assert_eq!(held["status"], "held");
    wait_order_state(&stack, second, "voided").await;
    wait_order_state(&stack, first, "held").await;
    eventually("the ledger rebuilt with dana's first order", Duration::from_secs(30), || async {
        (stack.ledger.user_units(event, "dana").await.unwrap() == 2
            && stack.ledger.levels(event).await.unwrap().is_some_and(|l| l.held == 2))
        .then_some(())
    })
    .await;
    let verdict = dropctl::invariants::verify(&stack.db, &stack.ledger, event, &Default::default()).await.unwrap();
    assert!(verdict.all_hold(), "{verdict}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_keeps_a_payment_whose_order_event_was_lost() {
    let stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    let event = stack.open_event(3, 120).await;
    let (order, held) = buy_and_wait(&stack, &api, "payer", event, 1).await;
    assert_eq!(held["status"], "held");
    wait_order_state(&stack, order, "held").await;
    // The hold script records the payment, and the publish that should have
    // told the settler is lost (the broker failed; the provider was told to
    // retry). MySQL still has the order held.
    let paid = stack.ledger.pay(event, order, "pay-lost-publish").await.unwrap();
    assert!(matches!(paid, dropline::stock::PayOutcome::Paid(_)), "{paid:?}");
    // A rebuild from MySQL alone would put the unit back on hold.
    stack.ledger.request_rebuild(event, "test: a rebuild while an order change is lost").await.unwrap();
    wait_order_state(&stack, order, "paid").await;
    let hold = stack.ledger.hold(event, order).await.unwrap().expect("the hold is in the ledger");
    assert_eq!(hold.state, dropline::messages::OrderState::Paid);
    let levels = stack.ledger.levels(event).await.unwrap().unwrap();
    assert_eq!((levels.available, levels.held, levels.sold), (2, 0, 1), "{levels:?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prewarm_after_the_opening_rebuilds_a_lost_ledger_instead_of_refilling_it() {
    let stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    let event = stack.open_event(4, 120).await;
    let (order, _) = buy_and_wait(&stack, &api, "early", event, 1).await;
    wait_order_state(&stack, order, "held").await;
    // Redis loses the event's keys mid-sale.
    stack.lose_ledger(event).await;
    let answer = dropline_testkit::http()
        .post(format!("{}/v1/admin/events/{event}/prewarm", stack.api))
        .bearer_auth(stack.admin_token())
        .send()
        .await
        .unwrap();
    let status = answer.status();
    let body: serde_json::Value = answer.json().await.unwrap();
    // Either the pre-warm asked for the rebuild, or the reconciler had
    // already found the ledger missing and rebuilt it (then the pre-warm
    // found it there). Never a fresh ledger.
    let asked = status == 202 && body["rebuild_requested"] == true;
    let found = status == 200 && body["created"] == false;
    assert!(asked || found, "{status} {body}");
    // Rebuilt from the record: the early buyer's unit stays taken.
    let levels = eventually("the ledger rebuilt from MySQL", Duration::from_secs(60), || async {
        stack.ledger.levels(event).await.ok().flatten()
    })
    .await;
    assert_eq!((levels.available, levels.held, levels.sold), (3, 1, 0), "{levels:?}");
    stack.stop().await;
}

/// One answer to a purchase: its status, and the intent id (202) or the
/// problem code; and whether it carried a Retry-After.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    status: u16,
    said: String,
    retry_after: bool,
}

impl Answer {
    /// Not an answer yet: another copy is being answered (409
    /// `idempotency_in_progress`), the copy was shed at the ingress's
    /// in-flight cap before it reached its key (429 `busy`), or a backing
    /// service was slow on this busy machine (503); all say when to retry.
    fn retry_later(&self) -> bool {
        (self.status == 409 && self.said == "idempotency_in_progress")
            || (self.status == 429 && self.said == "busy")
            || self.status == 503
    }
}

async fn send_purchase(http: &reqwest::Client, url: &str, token: &str, key: &str) -> Answer {
    let r = http
        .post(url)
        .bearer_auth(token)
        .header("idempotency-key", key)
        .json(&json!({ "quantity": 1 }))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry_after = r.headers().contains_key("retry-after");
    let body: serde_json::Value = r.json().await.unwrap();
    let said = if status == 202 { &body["intent_id"] } else { &body["code"] };
    Answer { status, said: said.as_str().unwrap_or_default().to_owned(), retry_after }
}

/// Sends `copies` copies of one purchase at once.
async fn copies_at_once(http: &reqwest::Client, url: &str, token: &str, key: &str, copies: usize) -> Vec<Answer> {
    let sent: Vec<_> = (0..copies)
        .map(|_| {
            let (http, url, token, key) = (http.clone(), url.to_owned(), token.to_owned(), key.to_owned());
            tokio::spawn(async move { send_purchase(&http, &url, &token, &key).await })
        })
        .collect();
    let mut answers = Vec::with_capacity(copies);
    for s in sent {
        answers.push(s.await.unwrap());
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_one_purchase_sent_at_once_through_the_sell_out_get_one_answer() {
    const COPIES: usize = 50;
    const CAPACITY: u32 = 10;
    let stack = Stack::start(Options::default()).await;
    let event = stack.open_event(CAPACITY, 60).await;
    let url = format!("{}/v1/events/{event}/purchases", stack.api);
    let http = dropline_testkit::http_builder().pool_max_idle_per_host(256).build().unwrap();
    // A new buyer (and key) every 50 ms, each sending 50 copies of its
    // purchase at once, from well before the sell-out until 12 keys after
    // it was seen in the ledger (at least 40 keys): the first keys take
    // the stock, then the allocator rejects, then the door refuses, with
    // keys in flight across each change.
    let mut buyers = Vec::new();
    let mut sold_out_at = None;
    let mut pace = tokio::time::interval(Duration::from_millis(50));
    for k in 0.. {
        assert!(k < 400, "the event never sold out");
        if sold_out_at.is_none() && stack.ledger.levels(event).await.unwrap().is_some_and(|l| l.available == 0) {
            sold_out_at = Some(k);
        }
        if sold_out_at.is_some_and(|at| k >= at + 12) && k >= 40 {
            break;
        }
        let (http, url, token) = (http.clone(), url.clone(), stack.token(&format!("burst-{k}")));
        buyers.push(tokio::spawn(async move {
            let key = format!("key-{k}");
            let answers = copies_at_once(&http, &url, &token, &key, COPIES).await;
            (token, key, answers)
        }));
        pace.tick().await;
    }
    let keys = buyers.len();
    let mut finals = Vec::new();
    let (mut in_progress, mut door_refused) = (0, 0);
    for b in buyers {
        let (token, key, answers) = b.await.unwrap();
        let (waiting, answered): (Vec<_>, Vec<_>) = answers.into_iter().partition(Answer::retry_later);
        assert!(waiting.iter().all(|a| a.retry_after), "{key}: told to retry without Retry-After: {waiting:?}");
        in_progress += waiting.iter().filter(|a| a.status == 409).count();
        // The key's answer, asked again later (once its owner is done), is
        // the one every copy that was answered got.
        let first = eventually("a final answer to the replay", Duration::from_secs(30), || async {
            let a = send_purchase(&http, &url, &token, &key).await;
            (!a.retry_later()).then_some(a)
        })
        .await;
        assert!(first.status == 202 || first.status == 409, "{key}: {first:?}");
        for a in &answered {
            assert_eq!((a.status, &a.said), (first.status, &first.said), "{key}: two different final answers");
        }
        // Unless its owner failed (503), or every copy was shed before any
        // took the key.
        let shed = waiting.iter().all(|a| a.said == "busy");
        assert!(
            !answered.is_empty() || shed || waiting.iter().any(|a| a.status == 503),
            "{key}: its owner never answered"
        );
        if first.status == 409 {
            assert_eq!(first.said, "sold_out", "{key}");
            door_refused += 1;
        }
        finals.push((key, first));
    }
    let accepted: std::collections::BTreeSet<String> =
        finals.iter().filter(|(_, a)| a.status == 202).map(|(_, a)| a.said.clone()).collect();
    assert_eq!(accepted.len() + door_refused, keys, "one intent per accepted key");
    assert!(accepted.len() >= CAPACITY as usize, "{finals:?}");
    assert!(door_refused > 0, "keys after the sell-out was seen are refused at the door: {finals:?}");
    assert!(in_progress > 0, "copies met their owner in flight");

    // Every accepted intent is decided once, and nothing else is: the
    // record holds exactly the accepted intents, CAPACITY of them held.
    let decided: Vec<(String, String)> = eventually("every accepted intent decided", Duration::from_secs(60), || {
        let db = stack.db.clone();
        let want = accepted.len();
        async move {
            let rows: Vec<(String, String)> =
                sqlx::query_as("SELECT intent_id, CAST(outcome AS CHAR) FROM intents WHERE event_id = ?")
                    .bind(event)
                    .fetch_all(&db)
                    .await
                    .unwrap();
            (rows.len() >= want).then_some(rows)
        }
    })
    .await;
    let ids: std::collections::BTreeSet<String> = decided.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids, accepted);
    assert_eq!(decided.iter().filter(|(_, o)| o == "held").count(), CAPACITY as usize);
    let levels = stack.ledger.levels(event).await.unwrap().unwrap();
    assert_eq!((levels.available, levels.held), (0, u64::from(CAPACITY)));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_intent_that_never_reached_the_allocator_fails_the_check_after_the_wait() {
    let stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    let event = stack.open_event(10, 2).await;
    let (held, _) = buy_and_wait(&stack, &api, "paula", event, 1).await;
    wait_order_state(&stack, held, "held").await;
    // The ingress' acceptance record of an intent it never produced (a
    // purchase answered 202 whose message was lost): nothing on Kafka.
    let lost = Uuid::new_v4();
    let store = dropline_ingress::intents::IntentStore::new(stack.ledger.pool().clone(), &stack.name, 3600);
    let record = dropline_ingress::intents::IntentRecord {
        event_id: event,
        user_id: "quentin".into(),
        quantity: 1,
        accepted_at_ms: dropline::messages::now_ms(),
    };
    assert!(store.record_accepted(&lost.to_string(), lost, &record).await.unwrap());
    // Quiet comes from the pipeline: the groups catch up and Paula's hold
    // expires. It never waits for the lost intent to be decided.
    let grace = dropctl::invariants::production_grace();
    let settle = dropctl::quiet::Quiet {
        pipeline: Some(stack.pipeline()),
        past_deadlines: true,
        grace,
        timeout: Duration::from_secs(60),
    };
    assert!(dropctl::quiet::wait_quiet(&stack.db, event, &settle).await.unwrap(), "the pipeline went quiet");
    // Caught up means recorded: the expiry is in MySQL already.
    assert_eq!(order_state_in_mysql(&stack, held).await.as_deref(), Some("expired"));
    let options = dropctl::invariants::CheckOptions { accepted: Some(2), ..Default::default() };
    let verdict = dropctl::invariants::verify(&stack.db, &stack.ledger, event, &options).await.unwrap();
    assert_eq!(verdict.failing(), vec![dropctl::invariants::Row::AcceptedDecided], "{verdict}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_handed_out_is_never_not_found_while_redis_catches_up() {
    let mut stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    let event = stack.open_event(10, 60).await;
    let before = common::redis_snapshot(stack.ledger.pool(), &format!("{}:*", stack.name)).await;
    let (alice, held) = buy_and_wait(&stack, &api, "alice", event, 1).await;
    assert_eq!(held["status"], "held");
    wait_order_state(&stack, alice, "held").await;

    // Redis fails over to a replica that never saw Alice's purchase: only
    // MySQL has her order. She still sees it, and her cancel waits (503,
    // Retry-After) for the ledger to have it back, then goes through.
    common::redis_roll_back(stack.ledger.pool(), &format!("{}:*", stack.name), &before).await;
    let token = stack.token("alice");
    assert_eq!(api.order_state(&token, alice).await.unwrap(), "held");
    assert_eq!(api.intent(&token, alice).await.unwrap().status, "held");
    let r = dropline_testkit::http()
        .post(format!("{}/v1/orders/{alice}/cancel", stack.api))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    // (Or the rebuild it asked for is under way: the ledger is fenced.)
    if r.status() != reqwest::StatusCode::OK {
        assert_eq!(r.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().contains_key("retry-after"));
        let code = r.json::<serde_json::Value>().await.unwrap()["code"].clone();
        assert!(code == "order_not_ready" || code == "dependency_unavailable", "{code}");
    }
    eventually("the cancel to go through once the ledger is rebuilt", Duration::from_secs(30), || async {
        match api.cancel(&token, alice).await {
            Ok(state) => Some(state),
            Err(e) if dropctl::api::is_retryable(&e) => None,
            Err(e) => panic!("{e:#}"),
        }
    })
    .await;
    wait_order_state(&stack, alice, "cancelled").await;

    // The settler is behind and Redis loses a decision it had made: the
    // order exists nowhere yet, but its intent was accepted, so its buyer
    // is told to come back (503), not that it does not exist. (Another
    // event: stopping the settler may cut a rebuild of the first one short,
    // leaving it fenced until the fence expires.)
    stack.stop_stage("settler").await;
    let event = stack.open_event(10, 60).await;
    let (bob, held) = buy_and_wait(&stack, &api, "bob", event, 1).await;
    assert_eq!(held["status"], "held");
    let keys = dropline::stock::EventKeys::new(&stack.name, event);
    let mut conn = stack.ledger.pool().get().await.unwrap();
    let _: () = dropline::redis_pool::redis::pipe()
        .hdel(&keys.holds, bob.to_string())
        .hdel(&keys.decisions, bob.to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    let bob_token = stack.token("bob");
    let r = dropline_testkit::http()
        .get(format!("{}/v1/orders/{bob}", stack.api))
        .bearer_auth(&bob_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().contains_key("retry-after"));
    // Someone else's order, and an id never handed out, are still 404.
    let r = dropline_testkit::http()
        .get(format!("{}/v1/orders/{bob}", stack.api))
        .bearer_auth(stack.token("mallory"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::NOT_FOUND);
    let r = dropline_testkit::http()
        .get(format!("{}/v1/orders/{}", stack.api, Uuid::new_v4()))
        .bearer_auth(&bob_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::NOT_FOUND);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intent_for_an_event_the_record_does_not_have_is_dead_lettered_not_retried_forever() {
    let stack = Stack::start(Options::default()).await;
    let event = stack.open_event(10, 60).await;
    let publisher = stack.publisher();
    // Only a foreign producer could write this: the ingress checks the event.
    let unknown = event + 1_000_000;
    let intent = |event_id: u64, user: &str| PurchaseIntent {
        intent_id: Uuid::new_v4(),
        event_id,
        user_id: user.into(),
        quantity: 1,
        accepted_at_ms: dropline::messages::now_ms(),
    };
    let poison = intent(unknown, "lost-soul");
    let good = intent(event, "after-unknown");
    for i in [&poison, &good] {
        let key = i.event_id.to_string();
        publisher.publish(Record::new(&stack.topics.intents, &key, &serde_json::to_vec(i).unwrap())).await.unwrap();
    }
    eventually("the intent beside the unknown event's", Duration::from_secs(60), || async {
        (intents_rows(&stack, good.intent_id).await == 1).then_some(())
    })
    .await;
    let m = stack.dead_letters(1).await.remove(0);
    let parked: PurchaseIntent = serde_json::from_slice(m.payload().unwrap()).unwrap();
    assert_eq!(parked.intent_id, poison.intent_id);
    let kind = m.headers().unwrap().iter().find(|h| h.key == "dropline-dlq-kind").and_then(|h| h.value);
    assert_eq!(kind, Some(&b"unappliable"[..]));
    stack.stop().await;
}
