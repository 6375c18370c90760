//! The payment webhook against a hold the allocator made: a webhook for an
//! order nobody was given is refused, a payment in another currency is
//! recorded for refund without paying the order, and the genuine one pays
//! it. (Webhooks refused on their signature or shape, before any store, are
//! in `ingress/tests/refusals.rs`.)

mod common;

use common::{Options, Stack};
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
