//! A host's controls over a live sale, end to end: the change applies to
//! the record and to the live ledger together, buyers see it at once, it is
//! announced as the event's change, and the books still balance.

mod common;

use std::time::Duration;

use common::{eventually, Options, Stack};
use dropctl::api::{Api, Purchase};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

/// One purchase of one ticket, followed until decided: `held`, or why not.
async fn try_buy(stack: &Stack, api: &Api, user: &str, event: u64) -> String {
    let token = stack.token(user);
    let intent = match api.purchase(&token, event, &Uuid::new_v4().to_string(), 1).await.unwrap() {
        Purchase::Accepted(id) => id,
        Purchase::Refused(code) => return code,
        Purchase::RetryAfter(_) => return "retry".into(),
    };
    eventually("the decision", Duration::from_secs(30), || async {
        let s = api.intent(&token, intent).await.unwrap();
        match s.status.as_str() {
            "queued" => None,
            "rejected" => Some(s.reason.unwrap_or_default()),
            other => Some(other.to_owned()),
        }
    })
    .await
}

/// A buyer who keeps trying (a new purchase each time) until held.
async fn buy_until_held(stack: &Stack, api: &Api, user: &str, event: u64) {
    eventually(&format!("{user}'s hold"), Duration::from_secs(30), || async {
        (try_buy(stack, api, user, event).await == "held").then_some(())
    })
    .await;
}

/// Opens an event (capacity, hold TTL) once its opening is recorded: the
/// event's changes each test makes come after it.
async fn open(stack: &Stack, capacity: u32, hold_ttl_secs: u32) -> u64 {
    let event = stack.open_event(capacity, hold_ttl_secs).await;
    stack.wait_opened(event).await;
    event
}

/// The buyers the host was told a change of the event (`kind`) for, one
/// entry per webhook, sorted.
fn holders_told(stack: &Stack, event: u64, kind: &str) -> Vec<String> {
    let mut buyers: Vec<String> = stack
        .inbox
        .deliveries()
        .into_iter()
        .filter(|d| d.event_id == event && d.kind == kind)
        .filter_map(|d| d.buyer)
        .collect();
    buyers.sort();
    buyers
}

async fn change(stack: &Stack, event: u64, body: Value) -> (StatusCode, Value) {
    let r = dropline_testkit::http()
        .patch(format!("{}/v1/admin/events/{event}", stack.api))
        .bearer_auth(stack.admin_token())
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_added_mid_sale_is_sold_at_once_announced_and_the_books_balance() {
    let stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    // Holds last 20 s: long enough for the changes below, short enough to
    // wait for them to lapse before the check. Ann pays (one of two: the
    // sale never sells out here).
    let event = open(&stack, 2, 20).await;
    paid_order(&stack, &api, "ann", event).await;
    assert_eq!(try_buy(&stack, &api, "ben", event).await, "held");
    assert_eq!(try_buy(&stack, &api, "cat", event).await, "sold_out");

    // The host adds two tickets: the ledger has them at once.
    let (status, view) = change(&stack, event, json!({ "capacity": 4 })).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["capacity"], 4);
    assert_eq!(
        (view["availability"]["capacity"].as_u64(), view["availability"]["available"].as_u64()),
        (Some(4), Some(2))
    );
    // Buyers who were turned away buy them.
    buy_until_held(&stack, &api, "cat", event).await;
    buy_until_held(&stack, &api, "dan", event).await;
    assert_eq!(try_buy(&stack, &api, "eve", event).await, "sold_out");

    // Stock already handed out cannot be taken back; stock never handed
    // out can.
    let (status, problem) = change(&stack, event, json!({ "capacity": 3 })).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(problem["code"], "capacity_in_use");
    let (status, view) = change(&stack, event, json!({ "capacity": 5 })).await;
    assert_eq!((status, view["availability"]["available"].as_u64()), (StatusCode::OK, Some(1)), "{view}");
    let (status, view) = change(&stack, event, json!({ "capacity": 4 })).await;
    assert_eq!((status, view["availability"]["available"].as_u64()), (StatusCode::OK, Some(0)), "{view}");
    // The same change again changes nothing, and announces nothing.
    let (status, _) = change(&stack, event, json!({ "capacity": 4 })).await;
    assert_eq!(status, StatusCode::OK);

    // Rescheduled.
    let later = (chrono::Utc::now() + chrono::Duration::days(30)).to_rfc3339();
    let (status, view) = change(&stack, event, json!({ "starts_at": later })).await;
    assert_eq!(status, StatusCode::OK, "{view}");

    // Bad changes are refused, and change nothing.
    for (body, code) in [
        (json!({}), "invalid_body"),
        (json!({ "capacity": 0 }), "invalid_body"),
        (json!({ "starts_at": "2001-01-01T00:00:00Z" }), "invalid_body"),
        (json!({ "capacity": 4, "oversell_allowance": null }), "invalid_body_shape"),
        (json!({ "capacity": 4, "price_cents": 1 }), "invalid_body_shape"),
        (json!({ "capacity": "four" }), "invalid_body_shape"),
    ] {
        let (status, problem) = change(&stack, event, body.clone()).await;
        assert!(status.is_client_error(), "{body}: {status} {problem}");
        assert_eq!(problem["code"], code, "{body}: {problem}");
    }
    let r = dropline_testkit::http()
        .patch(format!("{}/v1/admin/events/{event}", stack.api))
        .bearer_auth(stack.token("ann"))
        .json(&json!({ "capacity": 9 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "a buyer is no host");

    // Every change announced once, in order: the opening, 4, 5, 4, then
    // the new date.
    let told = stack.told(5, |d| d.event_id == event && d.kind.starts_with("event.") && d.buyer.is_none()).await;
    assert_eq!(
        told,
        [
            "event.opened",
            "event.capacity_changed",
            "event.capacity_changed",
            "event.capacity_changed",
            "event.rescheduled"
        ]
    );
    // The reschedule is also told to each ticket holder, naming them: Ann
    // (paid), and the others unless their holds lapsed before it.
    stack.told(1, |d| d.event_id == event && d.kind == "event.rescheduled" && d.buyer.is_some()).await;
    let capacities: Vec<u32> =
        sqlx::query_scalar("SELECT capacity FROM outbox WHERE event_id = ? AND kind = 'capacity_changed' ORDER BY seq")
            .bind(event)
            .fetch_all(&stack.db)
            .await
            .unwrap();
    assert_eq!(capacities, [4, 5, 4]);

    let verdict = stack.books_balance(event).await;
    assert_eq!((verdict.redis.capacity, verdict.mysql.capacity, verdict.mysql.expired), (4, 4, 3), "{verdict}");
    // Each holder's copy was delivered once: one per order the record had
    // live at the reschedule.
    let buyers = holders_told(&stack, event, "event.rescheduled");
    let mut written: Vec<String> = sqlx::query_scalar(
        "SELECT user_id FROM outbox WHERE event_id = ? AND kind = 'rescheduled' AND order_id IS NOT NULL",
    )
    .bind(event)
    .fetch_all(&stack.db)
    .await
    .unwrap();
    written.sort();
    assert_eq!(buyers, written);
    assert_eq!(buyers.first().map(String::as_str), Some("ann"), "{buyers:?}");
    assert!(buyers.iter().all(|b| ["ann", "ben", "cat", "dan"].contains(&b.as_str())), "{buyers:?}");
    stack.stop().await;
}

async fn admin_post(stack: &Stack, event: u64, action: &str) -> (StatusCode, Value) {
    let r = dropline_testkit::http()
        .post(format!("{}/v1/admin/events/{event}/{action}", stack.api))
        .bearer_auth(stack.admin_token())
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap())
}

/// What the ledger itself decides for a new intent, door aside.
async fn ledger_decides(stack: &Stack, event: u64, user: &str) -> dropline::stock::Verdict {
    let intent = dropline::stock::Undecided { intent_id: Uuid::new_v4(), user_id: user, quantity: 1 };
    stack.ledger.allocate(event, &[intent]).await.unwrap().remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_sale_refuses_purchases_keeps_its_holds_payable_and_resumes() {
    let stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    let event = open(&stack, 3, 20).await;
    let ann = match api.purchase(&stack.token("ann"), event, "ann-1", 1).await.unwrap() {
        Purchase::Accepted(id) => id,
        other => panic!("{other:?}"),
    };
    eventually("ann's hold", Duration::from_secs(30), || async { stack.ledger.hold(event, ann).await.unwrap() }).await;

    let (status, view) = admin_post(&stack, event, "pause").await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert!(view["paused_at"].is_string(), "{view}");
    // Refused at the door, and by the ledger itself (a purchase that got
    // past a door that had not heard yet).
    assert_eq!(try_buy(&stack, &api, "ben", event).await, "sale_paused");
    let refused = ledger_decides(&stack, event, "ben").await;
    assert!(
        matches!(
            refused,
            dropline::stock::Verdict::Rejected { reason: dropline::messages::RejectReason::SalePaused, .. }
        ),
        "{refused:?}"
    );
    // Pausing again changes nothing.
    assert_eq!(admin_post(&stack, event, "pause").await.0, StatusCode::OK);

    // A ledger lost and rebuilt while paused stays paused.
    stack.lose_ledger(event).await;
    stack.ledger.request_rebuild(event, "the test lost the ledger").await.unwrap();
    eventually("the rebuilt ledger", Duration::from_secs(30), || async {
        stack.ledger.levels(event).await.unwrap().filter(|l| l.held == 1)
    })
    .await;
    let refused = ledger_decides(&stack, event, "ben").await;
    assert!(matches!(refused, dropline::stock::Verdict::Rejected { .. }), "{refused:?}");

    // Ann's hold runs on, and she can pay it.
    let checkout = stack.start_payment("ann", ann).await;
    assert_eq!(api.confirm(checkout["checkout_url"].as_str().unwrap(), 1).await.unwrap(), "captured");

    let (status, view) = admin_post(&stack, event, "resume").await;
    assert_eq!((status, view["paused_at"].is_null()), (StatusCode::OK, true), "{view}");
    buy_until_held(&stack, &api, "ben", event).await;

    let told = stack.told(3, |d| d.event_id == event && d.kind.starts_with("event.") && d.buyer.is_none()).await;
    assert_eq!(told, ["event.opened", "event.paused", "event.resumed"]);
    let verdict = stack.books_balance(event).await;
    assert_eq!((verdict.mysql.paid, verdict.mysql.expired), (1, 1), "{verdict}");
    stack.stop().await;
}

/// The ledger's capacity and the record's.
async fn capacities(stack: &Stack, event: u64) -> (u64, u32) {
    let ledger = stack.ledger.levels(event).await.unwrap().unwrap().capacity;
    let record: u32 =
        sqlx::query_scalar("SELECT capacity FROM events WHERE id = ?").bind(event).fetch_one(&stack.db).await.unwrap();
    (ledger, record)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_and_retried_capacity_changes_leave_the_ledger_at_the_records_capacity() {
    let stack = Stack::start(Options::default()).await;
    let event = open(&stack, 10, 20).await;
    // Two hosts change it at once, again and again: whichever wins, the
    // ledger ends at the record's capacity.
    for round in 0..15u32 {
        let (a, b) = (11 + 2 * round, 12 + 2 * round);
        let (ra, rb) = tokio::join!(
            change(&stack, event, json!({ "capacity": a })),
            change(&stack, event, json!({ "capacity": b }))
        );
        assert_eq!((ra.0, rb.0), (StatusCode::OK, StatusCode::OK), "{ra:?} {rb:?}");
        let (ledger, record) = capacities(&stack, event).await;
        assert_eq!(ledger, u64::from(record), "round {round}: asked {a} and {b}");
    }
    // A grow whose write to the ledger fails (a rebuild holds it fenced)
    // is an error; the same call again completes it.
    let fence = stack.ledger.fence(event, 30).await.unwrap().expect("the fence");
    let (status, problem) = change(&stack, event, json!({ "capacity": 60 })).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
    assert!(stack.ledger.unfence(&fence).await.unwrap());
    let (status, _) = change(&stack, event, json!({ "capacity": 60 })).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(capacities(&stack, event).await, (60, 60));
    stack.stop().await;
}

/// `user` buys one ticket and pays for it; the order id.
async fn paid_order(stack: &Stack, api: &Api, user: &str, event: u64) -> Uuid {
    let token = stack.token(user);
    let Purchase::Accepted(order) = api.purchase(&token, event, &Uuid::new_v4().to_string(), 1).await.unwrap() else {
        panic!("{user}'s purchase was not accepted")
    };
    eventually("the hold", Duration::from_secs(30), || async { stack.ledger.hold(event, order).await.unwrap() }).await;
    assert_eq!(api.pay(&token, order, 1).await.unwrap(), "captured");
    order
}

async fn cancel(stack: &Stack, user: &str, order: Uuid) -> (StatusCode, Value) {
    let r = dropline_testkit::http()
        .post(format!("{}/v1/orders/{order}/cancel", stack.api))
        .bearer_auth(stack.token(user))
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_order_cancelled_within_the_policy_goes_back_on_sale_and_its_share_is_refunded_once() {
    let stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    let event = open(&stack, 2, 20).await;
    let ann = paid_order(&stack, &api, "ann", event).await;

    // No policy yet: a paid order cannot be cancelled.
    let (status, problem) = cancel(&stack, "ann", ann).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::CONFLICT, Some("cancellation_not_allowed")),
        "{problem}"
    );

    // The host allows it for an hour, 80% back.
    let until = chrono::Utc::now() + chrono::Duration::hours(1);
    let (status, view) =
        change(&stack, event, json!({ "cancellation": { "until": until.to_rfc3339(), "refund_percent": 80 } })).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["cancel_refund_percent"], 80);
    let (status, problem) =
        change(&stack, event, json!({ "cancellation": { "until": null, "refund_percent": 101 } })).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_body")), "{problem}");

    let (status, cancelled) = cancel(&stack, "ann", ann).await;
    assert_eq!((status, cancelled["state"].as_str()), (StatusCode::OK, Some("cancelled")), "{cancelled}");
    // Her ticket is on sale again at once, and sold again.
    let levels = stack.ledger.levels(event).await.unwrap().unwrap();
    assert_eq!((levels.available, levels.held, levels.sold), (2, 0, 0));
    // Cancelling again answers the same, and refunds nothing more.
    assert_eq!(cancel(&stack, "ann", ann).await.1["state"], "cancelled");
    let ben = paid_order(&stack, &api, "ben", event).await;

    // The provider refunds 80% of her payment, once.
    let refund: (u64, String) = eventually("ann's refund made", Duration::from_secs(60), || async {
        sqlx::query_as::<_, (u64, String)>(
            "SELECT amount_cents, CAST(state AS CHAR) FROM refunds WHERE order_id = ? AND state = 'refunded'",
        )
        .bind(ann.to_string())
        .fetch_optional(&stack.db)
        .await
        .unwrap()
    })
    .await;
    // The provider delivers her payment's webhook again: the money is
    // still to go back as the policy said, once.
    let payment: String = sqlx::query_scalar("SELECT payment_id FROM payments WHERE order_id = ?")
        .bind(ann.to_string())
        .fetch_one(&stack.db)
        .await
        .unwrap();
    let r = dropline_testkit::http()
        .post(format!("{}/v1/payments/{payment}/redeliver", stack.paysim))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let price: u64 = sqlx::query_scalar("SELECT amount_cents FROM orders WHERE order_id = ?")
        .bind(ann.to_string())
        .fetch_one(&stack.db)
        .await
        .unwrap();
    assert_eq!(refund.0, price * 80 / 100);
    let ann_id = ann.to_string();
    let told =
        stack.told(6, |d| d.order_id.as_deref() == Some(ann_id.as_str()) && d.kind != "order.hold_expiring").await;
    let expected = [
        "order.held",
        "order.payment_started",
        "order.paid",
        "order.cancelled",
        "order.refund_requested",
        "order.refunded",
    ];
    assert_eq!(told, expected);

    // Once the policy's time is past, a paid order stays paid.
    let past = chrono::Utc::now() - chrono::Duration::seconds(1);
    change(&stack, event, json!({ "cancellation": { "until": past.to_rfc3339(), "refund_percent": 80 } })).await;
    let (status, problem) = cancel(&stack, "ben", ben).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::CONFLICT, Some("cancellation_not_allowed")),
        "{problem}"
    );
    assert!(problem["detail"].as_str().unwrap().contains("could be cancelled until"), "{problem}");

    let verdict = stack.books_balance(event).await;
    assert_eq!((verdict.mysql.paid, verdict.mysql.cancelled), (1, 1), "{verdict}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_cancelled_releases_its_holds_refunds_its_paid_orders_in_full_and_tells_every_buyer() {
    let stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    let event = open(&stack, 4, 20).await;
    let ann = paid_order(&stack, &api, "ann", event).await;
    let ben = paid_order(&stack, &api, "ben", event).await;
    assert_eq!(try_buy(&stack, &api, "cat", event).await, "held");

    let (status, body) = admin_post(&stack, event, "cancel").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!((body["holds_released"].as_u64(), body["paid_orders_refunded"].as_u64()), (Some(1), Some(2)), "{body}");
    assert!(body["event"]["cancelled_at"].is_string(), "{body}");
    let levels = stack.ledger.levels(event).await.unwrap().unwrap();
    assert_eq!((levels.available, levels.held, levels.sold), (4, 0, 0), "every unit back, none for sale");
    // Nothing sells any more, and the event changes no more.
    assert_eq!(try_buy(&stack, &api, "dan", event).await, "sale_closed");
    assert!(matches!(ledger_decides(&stack, event, "dan").await, dropline::stock::Verdict::Rejected { .. }));
    assert_eq!(admin_post(&stack, event, "resume").await.1["code"], "event_cancelled");
    assert_eq!(change(&stack, event, json!({ "capacity": 9 })).await.1["code"], "event_cancelled");
    // Cancelling again ends nothing more.
    let (status, again) = admin_post(&stack, event, "cancel").await;
    assert_eq!(
        (status, again["holds_released"].as_u64(), again["paid_orders_refunded"].as_u64()),
        (StatusCode::OK, Some(0), Some(0))
    );

    // Every paid order is refunded in full through the provider, once.
    for order in [ann, ben] {
        let (refunded, price): (u64, u64) = eventually("the refund made", Duration::from_secs(60), || async {
            sqlx::query_as::<_, (u64, u64)>(
                "SELECT r.amount_cents, o.amount_cents FROM refunds r JOIN orders o USING (order_id) \
                 WHERE r.order_id = ? AND r.state = 'refunded'",
            )
            .bind(order.to_string())
            .fetch_optional(&stack.db)
            .await
            .unwrap()
        })
        .await;
        assert_eq!(refunded, price);
        let id = order.to_string();
        // Told of the cancel once (where the record had the order then:
        // held, or paid), then of what it did to their order.
        let told =
            stack.told(7, |d| d.order_id.as_deref() == Some(id.as_str()) && d.kind != "order.hold_expiring").await;
        assert_eq!(told.len(), 7, "{told:?}");
        assert_eq!(told.iter().filter(|k| *k == "event.cancelled").count(), 1, "{told:?}");
        assert!(told.contains(&"order.paid".to_owned()), "{told:?}");
        assert_eq!(&told[4..], ["order.cancelled", "order.refund_requested", "order.refunded"], "{told:?}");
    }
    let told = stack.told(2, |d| d.event_id == event && d.kind.starts_with("event.") && d.buyer.is_none()).await;
    assert_eq!(told, ["event.opened", "event.cancelled"]);
    let verdict = stack.books_balance(event).await;
    assert_eq!((verdict.mysql.paid, verdict.mysql.held, verdict.mysql.cancelled), (0, 0, 3), "{verdict}");
    // Every holder was told once (every change is notified by now), Cat
    // (held) too, whether the record had her hold when the cancel committed
    // or got it just after.
    assert_eq!(holders_told(&stack, event, "event.cancelled"), ["ann", "ben", "cat"]);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversell_allowance_sells_beyond_the_capacity_as_such_and_sold_out_is_announced_once_each_time() {
    let stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    let event = open(&stack, 2, 20).await;

    // The host accepts to oversell one ticket of two: three on sale.
    let (status, view) = change(&stack, event, json!({ "oversell_allowance": 1 })).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!((view["capacity"].as_u64(), view["oversell_allowance"].as_u64()), (Some(2), Some(1)), "{view}");
    let availability = &view["availability"];
    assert_eq!(
        (availability["capacity"].as_u64(), availability["allowance"].as_u64(), availability["available"].as_u64()),
        (Some(2), Some(1), Some(3)),
        "{view}"
    );
    // More allowance than capacity is refused, and changes nothing.
    let (status, problem) = change(&stack, event, json!({ "oversell_allowance": 3 })).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_body")), "{problem}");

    let paid: Vec<Uuid> = {
        let mut paid = Vec::new();
        for user in ["ann", "ben", "cat"] {
            paid.push(paid_order(&stack, &api, user, event).await);
        }
        paid
    };
    assert_eq!(try_buy(&stack, &api, "dan", event).await, "sold_out");
    // The third ticket was handed out: the allowance cannot be taken back.
    let (status, problem) = change(&stack, event, json!({ "oversell_allowance": 0 })).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("capacity_in_use")), "{problem}");
    let levels = stack.ledger.levels(event).await.unwrap().unwrap();
    assert_eq!((levels.sellable(), levels.sold, levels.oversold()), (3, 3, 1));

    // Every ticket it may sell is paid for: sold out, announced once.
    let told = stack.told(3, |d| d.event_id == event && d.kind.starts_with("event.") && d.buyer.is_none()).await;
    assert_eq!(told, ["event.opened", "event.capacity_changed", "event.sold_out"]);
    let allowances: Vec<u32> = sqlx::query_scalar(
        "SELECT oversell_allowance FROM outbox WHERE event_id = ? AND subject = 'event' ORDER BY seq",
    )
    .bind(event)
    .fetch_all(&stack.db)
    .await
    .unwrap();
    assert_eq!(allowances, [0, 1, 1]);

    // Cat cancels within the policy: back on sale; Dan buys it: sold out
    // again.
    let until = chrono::Utc::now() + chrono::Duration::hours(1);
    let policy = json!({ "cancellation": { "until": until.to_rfc3339(), "refund_percent": 100 } });
    assert_eq!(change(&stack, event, policy).await.0, StatusCode::OK);
    let (status, cancelled) = cancel(&stack, "cat", paid[2]).await;
    assert_eq!((status, cancelled["state"].as_str()), (StatusCode::OK, Some("cancelled")), "{cancelled}");
    stack.told(5, |d| d.event_id == event && d.kind.starts_with("event.") && d.buyer.is_none()).await;
    paid_order(&stack, &api, "dan", event).await;
    let told = stack.told(6, |d| d.event_id == event && d.kind.starts_with("event.") && d.buyer.is_none()).await;
    assert_eq!(
        told,
        [
            "event.opened",
            "event.capacity_changed",
            "event.sold_out",
            "event.policy_changed",
            "event.back_on_sale",
            "event.sold_out"
        ]
    );

    // A ledger Redis lost is rebuilt with the allowance, from the record.
    stack.lose_ledger(event).await;
    stack.ledger.request_rebuild(event, "the test lost the ledger").await.unwrap();
    let rebuilt = eventually("the rebuilt ledger", Duration::from_secs(30), || async {
        stack.ledger.levels(event).await.unwrap()
    })
    .await;
    assert_eq!((rebuilt.capacity, rebuilt.allowance, rebuilt.sold, rebuilt.available), (2, 1, 3, 0));
    assert_eq!(try_buy(&stack, &api, "eve", event).await, "sold_out");

    // The books: three sold of two, one of them inside the allowance, and
    // every count says so.
    let verdict = stack.books_balance(event).await;
    let m = &verdict.mysql;
    assert_eq!((m.capacity, m.oversell_allowance, m.paid, m.oversold()), (2, 1, 3, 1), "{verdict}");
    assert_eq!((verdict.redis.capacity, verdict.redis.allowance, verdict.redis.sold), (2, 1, 3), "{verdict}");
    let no_oversell = verdict.check(dropctl::invariants::Row::NoOversell).unwrap();
    assert_eq!(no_oversell.detail, "0 + 3 <= 2 + allowance 1; 1 oversold", "{verdict}");
    // Each announcement was made once, whatever the settlers' passes.
    let counted: Vec<(String, i64)> = sqlx::query_as(
        "SELECT kind, COUNT(*) FROM outbox WHERE event_id = ? AND subject = 'event' GROUP BY kind ORDER BY kind",
    )
    .bind(event)
    .fetch_all(&stack.db)
    .await
    .unwrap();
    let counted: Vec<(&str, i64)> = counted.iter().map(|(k, n)| (k.as_str(), *n)).collect();
    assert_eq!(
        counted,
        [("back_on_sale", 1), ("capacity_changed", 1), ("opened", 1), ("policy_changed", 1), ("sold_out", 2)]
    );
    stack.stop().await;
}
