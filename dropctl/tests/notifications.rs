//! The notifier end to end: every change of an order, written by the
//! record's outbox in the change's own transaction, reaches the host's
//! endpoint (the receiver, `dropctl receive`'s library) as one signed
//! webhook, in order per order, through outages of the endpoint, and what
//! keeps failing is dead-lettered and recorded, never lost.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{eventually, eventually_or, Options, Stack};
use dropctl::api::{Api, Purchase};
use dropctl::invariants::{self, CheckOptions, Row};
use dropctl::quiet::{self, Quiet};
use dropctl::receiver::Delivered;
use rdkafka::message::{Headers, Message};
use uuid::Uuid;

/// Buys one ticket and waits for the hold; the order id.
async fn hold(stack: &Stack, api: &Api, user: &str, event: u64) -> Uuid {
    let token = stack.token(user);
    let intent = match api.purchase(&token, event, &Uuid::new_v4().to_string(), 1).await.unwrap() {
        Purchase::Accepted(id) => id,
        other => panic!("purchase not accepted: {other:?}"),
    };
    eventually("the hold", Duration::from_secs(30), || async {
        let s = api.intent(&token, intent).await.unwrap();
        (s.status == "held").then_some(())
    })
    .await;
    intent
}

/// The types delivered for each order, in arrival order.
fn by_order(deliveries: &[Delivered]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in deliveries {
        out.entry(d.order_id.clone().unwrap_or_default()).or_default().push(d.kind.clone());
    }
    out
}

/// Waits until the receiver has `want` for `order`.
async fn delivered(stack: &Stack, order: Uuid, want: &[&str]) {
    let order = order.to_string();
    eventually_or(
        &format!("{want:?} delivered for {order}"),
        Duration::from_secs(60),
        || async {
            (by_order(&stack.inbox.deliveries()).get(&order).map(Vec::as_slice)
                == Some(&want.iter().map(|s| s.to_string()).collect::<Vec<_>>()[..]))
            .then_some(())
        },
        || format!("{:#?}", by_order(&stack.inbox.deliveries())),
    )
    .await
}

/// Opens an event (capacity, hold TTL) and waits until its opening, its
/// first change, reached the host: each test's count starts after it.
async fn open(stack: &Stack, capacity: u32, hold_ttl_secs: u32) -> u64 {
    let event = stack.open_event(capacity, hold_ttl_secs).await;
    let told = stack.told(1, |d| d.event_id == event && d.kind.starts_with("event.")).await;
    assert_eq!(told, ["event.opened"]);
    event
}

/// The outcome rows of the event's changes: (kind, outcome, attempts).
async fn outcomes(stack: &Stack, event: u64) -> Vec<(String, String, u32)> {
    sqlx::query_as(
        "SELECT n.kind, CAST(n.outcome AS CHAR), n.attempts FROM notifications n \
         JOIN outbox c ON c.change_id = n.notification_id WHERE c.event_id = ? ORDER BY c.seq",
    )
    .bind(event)
    .fetch_all(&stack.db)
    .await
    .unwrap()
}

async fn changes_in_outbox(stack: &Stack, event: u64) -> i64 {
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM outbox WHERE event_id = ?")
        .bind(event)
        .fetch_one(&stack.db)
        .await
        .unwrap();
    n
}

/// The books of `event`, checked once every deadline passed and the
/// pipeline (the notifier included) went quiet.
async fn check(stack: &Stack, event: u64) -> invariants::Verdict {
    let q = Quiet {
        pipeline: Some(stack.pipeline()),
        past_deadlines: true,
        grace: Duration::from_secs(30),
        timeout: Duration::from_secs(60),
    };
    assert!(quiet::wait_quiet(&stack.db, event, &q).await.unwrap(), "the pipeline went quiet");
    let options =
        CheckOptions { grace: Duration::from_secs(30), provider: Some(stack.paysim.clone()), ..Default::default() };
    invariants::verify(&stack.db, &stack.ledger, event, &options).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_of_an_order_reaches_the_host_once_signed_and_in_order() {
    // Ben's hold must be announced before its reminder is due (6 s in):
    // room enough on a loaded machine.
    let options = Options { notifier_args: vec!["--reminder-lead-secs=6".into()], ..Default::default() };
    let stack = Stack::start(options).await;
    let api = Api::new(&stack.api).unwrap();
    let event = open(&stack, 10, 12).await;

    // Ann pays (her start of payment is a change too), Ben walks away
    // (reminded, then expired), Cat cancels.
    let (ann, ben, cat) = tokio::join!(
        hold(&stack, &api, "ann", event),
        hold(&stack, &api, "ben", event),
        hold(&stack, &api, "cat", event)
    );
    api.pay(&stack.token("ann"), ann, 1).await.unwrap();
    api.cancel(&stack.token("cat"), cat).await.unwrap();
    delivered(&stack, ann, &["order.held", "order.payment_started", "order.paid"]).await;
    delivered(&stack, cat, &["order.held", "order.cancelled"]).await;
    delivered(&stack, ben, &["order.held", "order.hold_expiring", "order.expired"]).await;

    let inbox = stack.inbox.summary();
    assert_eq!((inbox.delivered, inbox.duplicates, inbox.bad_signatures, inbox.refused), (9, 0, 0, 0), "{inbox:?}");
    let deliveries: Vec<Delivered> =
        stack.inbox.deliveries().into_iter().filter(|d| d.kind != "event.opened").collect();
    for d in &deliveries {
        assert_eq!(d.event_id, event, "{d:?}");
        let order: Uuid = d.order_id.as_deref().unwrap().parse().unwrap();
        let buyer = [(ann, "ann"), (ben, "ben"), (cat, "cat")].iter().find(|(o, _)| *o == order).unwrap().1;
        assert_eq!(d.buyer.as_deref(), Some(buyer), "{d:?}");
    }
    // Each order's changes came in the order the record made them.
    for order in [ann, ben, cat] {
        let seqs: Vec<u64> =
            deliveries.iter().filter(|d| d.order_id == Some(order.to_string())).filter_map(|d| d.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{order}: {seqs:?}");
    }
    // Every change has its one outcome, delivered at the first attempt. The
    // notifier records an outcome after the host answered: the receiver can
    // hold the last webhook a moment before its row is written.
    let rows = eventually("an outcome for every change", Duration::from_secs(30), || async {
        let rows = outcomes(&stack, event).await;
        (rows.len() as i64 == changes_in_outbox(&stack, event).await).then_some(rows)
    })
    .await;
    assert!(rows.iter().all(|(_, outcome, attempts)| outcome == "delivered" && *attempts == 1), "{rows:?}");

    // The relay publishing every change again (as after a crash between
    // the broker's ack and marking them) announces none twice.
    let again = sqlx::query("UPDATE outbox SET published_at = NULL WHERE event_id = ?")
        .bind(event)
        .execute(&stack.db)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(again, 8, "7 changes of its orders and the sale's opening");
    let verdict = check(&stack, event).await;
    assert!(verdict.all_hold(), "{verdict}");
    assert_eq!(verdict.mysql.order_changes, 8, "{verdict}");
    let inbox = stack.inbox.summary();
    assert_eq!((inbox.delivered, inbox.duplicates), (9, 0), "{inbox:?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_the_host_loses_nothing_and_delivers_nothing_twice() {
    let stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    let event = open(&stack, 10, 10).await;
    stack.inbox.set_down(true);
    let mut orders = Vec::new();
    for buyer in ["dan", "eve", "fay", "gus", "hal"] {
        orders.push(hold(&stack, &api, buyer, event).await);
    }
    // Every hold's webhook was tried, and refused, more than once.
    eventually("the notifier to retry every hold through the outage", Duration::from_secs(60), || async {
        orders.iter().all(|o| stack.inbox.refused_for(&o.to_string()) >= 2).then_some(())
    })
    .await;
    assert_eq!(stack.inbox.summary().delivered, 1, "only the opening, before the outage");
    stack.inbox.set_down(false);
    for order in &orders {
        delivered(&stack, *order, &["order.held"]).await;
    }
    let verdict = check(&stack, event).await;
    assert!(verdict.all_hold(), "{verdict}");
    // The holds expired meanwhile: five changes more, delivered too.
    let inbox = stack.inbox.summary();
    assert_eq!((inbox.delivered, inbox.duplicates, inbox.bad_signatures), (11, 0, 0), "{inbox:?}");
    let rows = outcomes(&stack, event).await;
    assert_eq!(rows.len(), 11, "{rows:?}");
    assert!(rows.iter().all(|(_, outcome, _)| outcome == "delivered"), "{rows:?}");
    let retried = rows.iter().filter(|(kind, _, attempts)| kind == "order.held" && *attempts > 1).count();
    assert_eq!(retried, 5, "every hold's webhook was retried through the outage: {rows:?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_keeps_failing_is_dead_lettered_once_and_the_next_flows() {
    let options = Options { notifier_args: vec!["--max-attempts=3".into()], ..Default::default() };
    let stack = Stack::start(options).await;
    let api = Api::new(&stack.api).unwrap();
    let event = open(&stack, 10, 10).await;
    // A message no notifier can read goes to the dead-letter topic too.
    let publisher = stack.publisher();
    publisher.publish(dropline::kafka::Record::new(&stack.topics.changes, "poison", b"{not json")).await.unwrap();

    stack.inbox.set_down(true);
    let doomed = hold(&stack, &api, "ivy", event).await;
    let dead = eventually("the webhook to be dead-lettered", Duration::from_secs(60), || async {
        let rows = outcomes(&stack, event).await;
        (rows.len() == 2).then_some(rows)
    })
    .await;
    assert_eq!(
        dead,
        vec![
            ("event.opened".to_owned(), "delivered".to_owned(), 1),
            ("order.held".to_owned(), "dead_lettered".to_owned(), 3)
        ]
    );
    assert_eq!(stack.inbox.summary().refused, 3);
    stack.inbox.set_down(false);
    let next = hold(&stack, &api, "jon", event).await;
    delivered(&stack, next, &["order.held"]).await;
    let doomed_kinds = by_order(&stack.inbox.deliveries()).remove(&doomed.to_string()).unwrap_or_default();
    assert!(!doomed_kinds.contains(&"order.held".to_owned()), "a dead letter is not sent again: {doomed_kinds:?}");

    let mut kinds = Vec::new();
    for m in stack.dead_letters(2).await {
        let headers = m.headers().unwrap();
        let header = |name: &str| {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(header("dropline-dlq-stage").as_deref(), Some("notifier"));
        kinds.push((header("dropline-dlq-kind").unwrap(), m.key().map(|k| String::from_utf8_lossy(k).into_owned())));
    }
    kinds.sort();
    assert_eq!(
        kinds,
        vec![
            ("undecodable".to_owned(), Some("poison".to_owned())),
            ("undeliverable".to_owned(), Some(doomed.to_string()))
        ]
    );
    let verdict = check(&stack, event).await;
    assert!(verdict.all_hold(), "{verdict}");
    assert_eq!(verdict.mysql.changes_dead_lettered, 1, "{verdict}");
    assert!(verdict.check(Row::ChangesNotified).unwrap().detail.contains("1 dead-lettered"), "{verdict}");
    stack.stop().await;
}
