//! The payment webhook against a hold the allocator made: a webhook for an
//! order nobody was given is refused, a payment in another currency is
//! recorded for refund without paying the order, and the genuine one pays
//! it. (Webhooks refused on their signature or shape, before any store, are
//! in `ingress/tests/refusals.rs`.) Then the provider's troubles: a declined
//! card and the retry that pays, a confirmation that times out, a payment
//! confirmed twice, and the hold extended once when paying starts.

mod common;

use std::time::Duration;

use common::{eventually, Options, Stack};
use dropline::payments::{sign, SIGNATURE_HEADER};
use dropline_testkit::{create_event, event_body, refused};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_pays_only_its_order_in_its_currency() {
    let stack = Stack::start(Options::default()).await;
    let http = dropline_testkit::http();
    let event = create_event(&http, &stack.api, &stack.admin_token(), &event_body(-5)).await;
    let token = stack.token("gina");
    let api = dropctl::api::Api::new(&stack.api).unwrap();
    let dropctl::api::Purchase::Accepted(order) = api.purchase(&token, event, "g1", 1).await.unwrap() else { panic!() };
    common::eventually("the hold", std::time::Duration::from_secs(30), || async {
        stack.ledger.hold(event, order).await.unwrap()
    })
    .await;

    let url = format!("{}/v1/webhooks/payments", stack.api);
    let secret = stack.secrets.webhook.clone();
    let now = chrono::Utc::now().timestamp();
    let hook = |body: Value| {
        let body = serde_json::to_vec(&body).unwrap();
        let signature = sign(secret.as_bytes(), now, &body);
        http.post(&url).header("content-type", "application/json").header(SIGNATURE_HEADER, signature).body(body)
    };
    let stranger = json!({
        "id": "evt_2", "type": "payment.succeeded", "payment_id": "pay_2", "order_id": Uuid::new_v4(),
        "amount_cents": 1200, "currency": "EUR", "created_at": 0
    });
    refused(hook(stranger), StatusCode::NOT_FOUND, "order_not_found").await;

    // A payment in another currency is money taken that does not pay the
    // order: acknowledged (the provider would retry a refusal forever) and
    // recorded for refund.
    let dollars = json!({
        "id": "evt_4", "type": "payment.succeeded", "payment_id": "pay_4", "order_id": order,
        "amount_cents": 1200, "currency": "USD", "created_at": 0
    });
    let r = hook(dollars).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "refund_required");

    let hold = stack.ledger.hold(event, order).await.unwrap().unwrap();
    assert_eq!(hold.state, dropline::messages::OrderState::Held, "no bad webhook paid the order");
    assert_eq!(stack.ledger.levels(event).await.unwrap().unwrap().sold, 0);

    // The genuine webhook pays it, with the currency in lower case and a
    // field Dropline does not know, as providers send them.
    let genuine = json!({
        "id": "evt_1", "type": "payment.succeeded", "payment_id": "pay_1", "order_id": order,
        "amount_cents": 1200, "currency": "eur", "created_at": 0, "livemode": false
    });
    let r = hook(genuine).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "captured");
    assert_eq!(stack.ledger.levels(event).await.unwrap().unwrap().sold, 1);
    stack.stop().await;
}

/// The changes the host was told of about `order` (reminders aside), in
/// the order delivered, once there are `count` of them.
async fn told(stack: &Stack, order: Uuid, count: usize) -> Vec<String> {
    let order = order.to_string();
    stack.told(count, |d| d.order_id.as_deref() == Some(order.as_str()) && d.kind != "order.hold_expiring").await
}

/// A hold for `user`, decided.
async fn held(stack: &Stack, api: &dropctl::api::Api, user: &str, event: u64) -> Uuid {
    let token = stack.token(user);
    let dropctl::api::Purchase::Accepted(order) =
        api.purchase(&token, event, &Uuid::new_v4().to_string(), 1).await.unwrap()
    else {
        panic!("{user}'s purchase was not accepted")
    };
    eventually("the hold", Duration::from_secs(30), || async { stack.ledger.hold(event, order).await.unwrap() }).await;
    order
}

fn at(v: &Value) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap().with_timezone(&chrono::Utc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_card_leaves_the_hold_held_and_the_retry_pays_it_once_extended_once() {
    let stack = Stack::start(Options::default()).await;
    let api = dropctl::api::Api::new(&stack.api).unwrap();
    let event = stack.open_event(1, 30).await;
    let order = held(&stack, &api, "dora", event).await;
    let deadline = stack.ledger.hold(event, order).await.unwrap().unwrap().expires_at_ms;

    // Starting to pay extends the hold once, by the ingress' 2 s.
    let first = stack.start_payment("dora", order).await;
    assert_eq!(at(&first["pay_before"]).timestamp_millis(), deadline + 2_000, "{first}");
    let url = first["checkout_url"].as_str().unwrap().to_owned();
    let http = dropline_testkit::http();
    let r = http.post(format!("{url}/confirm?wait=true&outcome=decline")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    let hold = stack.ledger.hold(event, order).await.unwrap().unwrap();
    assert_eq!(hold.state, dropline::messages::OrderState::Held, "a declined card leaves the hold held");
    assert_eq!(hold.expires_at_ms, deadline + 2_000);

    // She tries again: the same payment, and no second extension.
    let again = stack.start_payment("dora", order).await;
    assert_eq!(again["payment_id"], first["payment_id"]);
    assert_eq!(again["pay_before"], first["pay_before"]);
    let r = http.post(format!("{url}/confirm?wait=true")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    let answer: Value = serde_json::from_str(body["webhook_body"].as_str().unwrap()).unwrap();
    assert_eq!(answer["status"], "captured");

    // A decline the provider delivers late, once the order is paid, is
    // acknowledged and ignored: the buyer is not told their card failed.
    let late = json!({
        "id": "evt_late_decline", "type": "payment.failed", "payment_id": first["payment_id"], "order_id": order,
        "amount_cents": 1200, "currency": "EUR", "created_at": 0, "failure_reason": "card_declined"
    });
    let body = serde_json::to_vec(&late).unwrap();
    let signature = sign(stack.secrets.webhook.as_bytes(), chrono::Utc::now().timestamp(), &body);
    let r = http
        .post(format!("{}/v1/webhooks/payments", stack.api))
        .header("content-type", "application/json")
        .header(SIGNATURE_HEADER, signature)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "ignored");

    // Told in order: held, started, declined, paid; each once.
    let kinds = told(&stack, order, 4).await;
    assert_eq!(kinds, ["order.held", "order.payment_started", "order.payment_failed", "order.paid"]);
    let failure: (String, String) =
        sqlx::query_as("SELECT payment_id, reason FROM payment_failures WHERE order_id = ?")
            .bind(order.to_string())
            .fetch_one(&stack.db)
            .await
            .unwrap();
    assert_eq!((failure.0.as_str(), failure.1.as_str()), (first["payment_id"].as_str().unwrap(), "card_declined"));
    let (expires_at, started): (chrono::DateTime<chrono::Utc>, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("SELECT expires_at, payment_started_at FROM orders WHERE order_id = ?")
            .bind(order.to_string())
            .fetch_one(&stack.db)
            .await
            .unwrap();
    assert_eq!(expires_at.timestamp_millis(), deadline + 2_000, "the record has the extended deadline");
    assert!(started.is_some());
    stack.books_balance(event).await;
    assert_eq!(told(&stack, order, 4).await.len(), 4, "nothing announced twice");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_whose_payment_started_expires_at_its_extended_deadline() {
    let stack = Stack::start(Options::default()).await;
    let api = dropctl::api::Api::new(&stack.api).unwrap();
    let event = stack.open_event(1, 2).await;
    let order = held(&stack, &api, "ezra", event).await;
    let deadline = stack.ledger.hold(event, order).await.unwrap().unwrap().expires_at_ms;
    let started = stack.start_payment("ezra", order).await;
    let pay_before = at(&started["pay_before"]);
    assert_eq!(pay_before.timestamp_millis(), deadline + 2_000);
    // He never pays. The expirer, told of the first deadline, finds the
    // hold not due then and releases it at the extended one, not before.
    assert_eq!(told(&stack, order, 3).await, ["order.held", "order.payment_started", "order.expired"]);
    let ended_at = stack.ledger.hold(event, order).await.unwrap().unwrap().ended_at_ms.unwrap();
    assert!(ended_at >= pay_before.timestamp_millis(), "expired at {ended_at}, before {pay_before}");
    let levels = stack.ledger.levels(event).await.unwrap().unwrap();
    assert_eq!((levels.available, levels.held, levels.sold), (1, 0, 0));
    stack.books_balance(event).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmation_that_timed_out_and_one_confirmed_twice_each_make_one_paid_order() {
    let stack = Stack::start(Options::default()).await;
    let api = dropctl::api::Api::new(&stack.api).unwrap();
    let event = stack.open_event(2, 15).await;
    let http = dropline_testkit::http();

    // Finn's confirmation times out at the provider, which captured the
    // payment all the same; he confirms again.
    let finn = held(&stack, &api, "finn", event).await;
    let finn_pay = stack.start_payment("finn", finn).await;
    let url = finn_pay["checkout_url"].as_str().unwrap();
    let r = http.post(format!("{url}/confirm?outcome=timeout&delay_ms=500")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(api.confirm(url, 1).await.unwrap(), "captured");

    // Gil's payment is confirmed twice: two webhooks, two event ids.
    let gil = held(&stack, &api, "gil", event).await;
    let gil_pay = stack.start_payment("gil", gil).await;
    assert_eq!(api.confirm_twice(gil_pay["checkout_url"].as_str().unwrap()).await.unwrap(), "captured");

    for (order, pay) in [(finn, &finn_pay), (gil, &gil_pay)] {
        // Every webhook the provider sent was acknowledged (the timed-out
        // one's late delivery included), and made one payment row.
        let id = pay["payment_id"].as_str().unwrap();
        eventually("the provider's deliveries acknowledged", Duration::from_secs(30), || async {
            let p: Value =
                http.get(format!("{}/v1/payments/{id}", stack.paysim)).send().await.unwrap().json().await.unwrap();
            let acked = p["deliveries"].as_array().unwrap().iter().filter(|d| d["status"] == 200).count();
            (acked >= 2).then_some(())
        })
        .await;
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT payment_id, CAST(disposition AS CHAR) FROM payments WHERE order_id = ?")
                .bind(order.to_string())
                .fetch_all(&stack.db)
                .await
                .unwrap();
        assert_eq!(rows, [(id.to_owned(), "captured".to_owned())]);
        assert_eq!(told(&stack, order, 3).await, ["order.held", "order.payment_started", "order.paid"]);
    }
    let levels = stack.ledger.levels(event).await.unwrap().unwrap();
    assert_eq!((levels.available, levels.held, levels.sold), (0, 0, 2));
    let captures: Value = http.get(format!("{}/v1/captures", stack.paysim)).send().await.unwrap().json().await.unwrap();
    assert_eq!(captures["captures"].as_array().unwrap().len(), 2, "one capture each");
    stack.books_balance(event).await;
    stack.stop().await;
}
