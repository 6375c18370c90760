//! Every row of the invariant table can fail: each test writes a consistent
//! sale into a database and a Redis key prefix of its own (the ledger's Lua
//! scripts for Redis, the settler's own batch writer for MySQL), sees every
//! row pass, breaks exactly one thing and sees exactly the rows that thing
//! breaks fail, by row id.
//!
//! The sale: 3 tickets, 1 per buyer. Carol's hold expired (she paid too
//! late: her refund was made) and Dave cancelled; then Alice paid, Bob and
//! Erin hold. Sold out: available 0, held 2, sold 1.

mod common;

use std::time::Duration;

use dropctl::invariants::{self, CheckOptions, Row, Verdict};
use dropctl::quiet::{self, Quiet};
use dropline::messages::{Decision, OrderState, Outcome, PaymentDisposition, PaymentRecord};
use dropline::stock::{EndOutcome, EventKeys, Ledger, PayOutcome, SaleRules, Verdict as LedgerVerdict};
use dropline_ingress::intents::{IntentRecord, IntentStore};
use dropline_notifier::record::Settled;
use dropline_settler::store::Batch;
use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use dropline::redis_pool::redis;

struct Books {
    name: String,
    db: MySqlPool,
    ledger: Ledger,
    event: u64,
    alice: Uuid,
    bob: Uuid,
    carol: Uuid,
    erin: Uuid,
}

const PRICE: u64 = 4_500;

impl Books {
    /// What the caller of the check knows: five purchases accepted, two
    /// payments acknowledged (Alice's capture, Carol's refund).
    fn options(&self) -> CheckOptions {
        CheckOptions { accepted: Some(5), acknowledged_payments: Some(2), ..Default::default() }
    }

    async fn verify(&self) -> Verdict {
        self.verify_with(&self.options()).await
    }

    /// The check, after the notifier's part is done (see
    /// [`Books::notify_outstanding`]).
    async fn verify_with(&self, options: &CheckOptions) -> Verdict {
        self.notify_outstanding().await;
        self.verify_as_is(options).await
    }

    /// The check of the books as they are.
    async fn verify_as_is(&self, options: &CheckOptions) -> Verdict {
        invariants::verify(&self.db, &self.ledger, self.event, options).await.unwrap()
    }

    /// Does the notifier's part: every change in the outbox without an
    /// outcome is recorded delivered, with the notifier's own writer, as
    /// the notifier does once the host took its webhook.
    async fn notify_outstanding(&self) {
        let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT c.change_id, c.kind, c.order_id FROM outbox c LEFT JOIN notifications n \
             ON n.notification_id = c.change_id WHERE c.event_id = ? AND n.notification_id IS NULL",
        )
        .bind(self.event)
        .fetch_all(&self.db)
        .await
        .unwrap();
        let settled: Vec<Settled> = rows
            .into_iter()
            .map(|(id, kind, order)| Settled {
                id: Uuid::parse_str(&id).unwrap(),
                // A change of the event names no order.
                kind: format!("{}.{kind}", if order.is_some() { "order" } else { "event" }),
                event_id: self.event,
                order_id: order.map(|o| Uuid::parse_str(&o).unwrap()),
                delivered: true,
                attempts: 1,
                last_error: None,
            })
            .collect();
        dropline_notifier::record::settle(&self.db, &settled, &[], &[]).await.unwrap();
    }

    async fn redis(&self) -> dropline::redis_pool::Connection {
        self.ledger.pool().get().await.unwrap()
    }

    fn keys(&self) -> EventKeys {
        EventKeys::new(&self.name, self.event)
    }

    async fn sql(&self, statement: &str, order: Uuid) {
        let done = sqlx::query(statement).bind(order.to_string()).execute(&self.db).await.unwrap();
        assert!(done.rows_affected() > 0, "{statement} changed nothing");
    }

    /// Writes the ingress' acceptance record of an intent: what it keeps
    /// once the broker acknowledged it and the buyer was told 202.
    async fn accept(&self, intent: Uuid, user: &str) {
        let store = IntentStore::new(self.ledger.pool().clone(), &self.name, 3600);
        let record = IntentRecord {
            event_id: self.event,
            user_id: user.into(),
            quantity: 1,
            accepted_at_ms: chrono::Utc::now().timestamp_millis(),
        };
        assert!(store.record_accepted(&intent.to_string(), intent, &record).await.unwrap());
    }

    async fn drop(self) {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS dropline_{}", self.name)).execute(&self.db).await;
        let mut conn = self.ledger.pool().get().await.unwrap();
        let keys: Vec<String> =
            redis::cmd("KEYS").arg(format!("{}:*", self.name)).query_async(&mut conn).await.unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL").arg(keys).query_async(&mut conn).await.unwrap();
        }
    }
}

async fn hold(ledger: &Ledger, event: u64, user: &str) -> (Uuid, Decision) {
    let id = Uuid::new_v4();
    let intent = dropline::stock::Undecided { intent_id: id, user_id: user, quantity: 1 };
    let verdicts = ledger.allocate(event, &[intent]).await.unwrap();
    let LedgerVerdict::Held { expires_at_ms, amount_cents, decided_at_ms, units } = verdicts[0].clone() else {
        panic!("{user} got no hold: {:?}", verdicts[0]);
    };
    let decision = Decision {
        intent_id: id,
        event_id: event,
        user_id: user.into(),
        quantity: 1,
        decided_at_ms,
        outcome: Outcome::Held { expires_at_ms, amount_cents, units },
    };
    (id, decision)
}

fn payment(order: Uuid, disposition: PaymentDisposition) -> PaymentRecord {
    PaymentRecord {
        provider_event_id: format!("evt-{order}"),
        payment_id: format!("pay-{order}"),
        amount_cents: PRICE,
        disposition,
    }
}

/// The sale rules of [`consistent_books`]' event, on sale now.
fn consistent_rules() -> SaleRules {
    let now = chrono::Utc::now();
    SaleRules {
        capacity: 3,
        oversell_allowance: 0,
        per_user_limit: 1,
        hold_ttl_ms: 1_000,
        opens_at_ms: (now - chrono::Duration::seconds(1)).timestamp_millis(),
        closes_at_ms: (now + chrono::Duration::hours(1)).timestamp_millis(),
        price_cents: PRICE,
        retain_until_ms: (now + chrono::Duration::hours(2)).timestamp_millis(),
        paused: false,
    }
}

/// A consistent sale, written the way the pipeline writes it.
async fn consistent_books() -> Books {
    dropline::telemetry::init_logs();
    let name = format!("i{}", &Uuid::new_v4().simple().to_string()[..12]);
    let db_url = format!("{}/dropline_{name}", common::mysql_server());
    dropline::db::create_database(&db_url).await.unwrap();
    let db = dropline::db::connect(&dropline::config::MysqlArgs::new(db_url, 3)).await.unwrap();
    dropline::db::migrate(&db).await.unwrap();
    let pool = common::redis(16).pool().unwrap();
    let ledger = Ledger::new(pool, &name);

    let now = chrono::Utc::now();
    let event = sqlx::query(
        "INSERT INTO events (name, venue, starts_at, sale_opens_at, sale_closes_at, capacity, price_cents, \
         currency, per_user_limit, hold_ttl_secs) VALUES ('checked', 'nowhere', ?, ?, ?, 3, ?, 'EUR', 1, 1)",
    )
    .bind(now + chrono::Duration::days(1))
    .bind(now - chrono::Duration::seconds(1))
    .bind(now + chrono::Duration::hours(1))
    .bind(PRICE)
    .execute(&db)
    .await
    .unwrap()
    .last_insert_id();
    assert!(ledger.prewarm(event, &consistent_rules()).await.unwrap());

    // Carol and Dave hold for a second; Dave cancels, Carol's hold expires
    // at its deadline and her payment arrives too late.
    let mut first = Batch::default();
    let (carol, d) = hold(&ledger, event, "carol").await;
    first.add_decision(d);
    let (dave, d) = hold(&ledger, event, "dave").await;
    first.add_decision(d);
    let EndOutcome::Ended(cancelled) = ledger.cancel(event, dave, "dave").await.unwrap() else { panic!("cancel") };
    first.add_order_event(cancelled.order_event(dave, event, None));
    let expired = common::eventually("carol's deadline", Duration::from_secs(10), || {
        let ledger = ledger.clone();
        async move {
            match ledger.expire(event, carol).await.unwrap() {
                EndOutcome::Ended(h) => Some(h),
                _ => None,
            }
        }
    })
    .await;
    assert_eq!(expired.state, OrderState::Expired);
    first.add_order_event(expired.order_event(carol, event, None));
    let PayOutcome::Refund(late) = ledger.pay(event, carol, &format!("pay-{carol}")).await.unwrap() else {
        panic!("carol's late payment is not a refund")
    };
    first.add_order_event(late.order_event(carol, event, Some(payment(carol, PaymentDisposition::RefundRequired))));
    first.write(&db, &ledger).await.unwrap();

    // The holds from now on last ten minutes: the sale's rule, changed
    // where the allocation script reads it.
    let mut conn = ledger.pool().get().await.unwrap();
    let stock = EventKeys::new(&name, event).stock;
    let _: () = redis::cmd("HSET").arg(&stock).arg("ttl_ms").arg(600_000).query_async(&mut conn).await.unwrap();

    let mut second = Batch::default();
    let (alice, d) = hold(&ledger, event, "alice").await;
    second.add_decision(d);
    let (bob, d) = hold(&ledger, event, "bob").await;
    second.add_decision(d);
    let (erin, d) = hold(&ledger, event, "erin").await;
    second.add_decision(d);
    // Alice starts paying (her hold is extended once), her card is
    // declined, and she pays.
    let started = ledger.start_payment(event, alice, 2_000).await.unwrap().expect("alice's hold");
    assert!(started.payment_started_at_ms.is_some());
    let mut declined = started.order_event(alice, event, None);
    declined.payment_failure = Some(dropline::messages::PaymentFailure {
        provider_event_id: format!("evt-declined-{alice}"),
        payment_id: format!("pay-{alice}"),
        reason: "card_declined".into(),
    });
    second.add_order_event(started.order_event(alice, event, None));
    second.add_order_event(declined);
    let PayOutcome::Paid(paid) = ledger.pay(event, alice, &format!("pay-{alice}")).await.unwrap() else {
        panic!("alice's payment did not pay")
    };
    second.add_order_event(paid.order_event(alice, event, Some(payment(alice, PaymentDisposition::Captured))));
    second.write(&db, &ledger).await.unwrap();

    // Carol's refund, recorded as made as the refund worker records it once
    // the provider made it.
    let refund: String = sqlx::query_scalar("SELECT refund_id FROM refunds WHERE order_id = ?")
        .bind(carol.to_string())
        .fetch_one(&db)
        .await
        .unwrap();
    dropline_settler::record::refunds::refunded(&db, &refund, &format!("re-{carol}")).await.unwrap();

    let books = Books { name, db, ledger, event, alice, bob, carol, erin };
    for (id, user) in [(alice, "alice"), (bob, "bob"), (carol, "carol"), (dave, "dave"), (erin, "erin")] {
        books.accept(id, user).await;
    }
    let v = books.verify().await;
    assert_eq!(v.failing(), vec![], "the consistent books fail:\n{v}");
    let levels = v.redis;
    assert_eq!((levels.available, levels.held, levels.sold), (0, 2, 1), "{v}");
    assert_eq!(v.mysql.lateness.expired, 1, "{v}");
    books
}

#[tokio::test]
async fn an_oversold_unit_written_into_mysql_fails_no_oversell() {
    let b = consistent_books().await;
    let zed = Uuid::new_v4();
    let now = chrono::Utc::now();
    sqlx::query(
        "INSERT INTO orders (order_id, event_id, user_id, quantity, amount_cents, state, expires_at, created_at, \
         updated_at) VALUES (?, ?, 'zed', 1, ?, 'held', ?, ?, ?)",
    )
    .bind(zed.to_string())
    .bind(b.event)
    .bind(PRICE)
    .bind(now + chrono::Duration::minutes(10))
    .bind(now)
    .bind(now)
    .execute(&b.db)
    .await
    .unwrap();
    sqlx::query("INSERT INTO order_units (event_id, unit_no, order_id) VALUES (?, 4, ?)")
        .bind(b.event)
        .bind(zed.to_string())
        .execute(&b.db)
        .await
        .unwrap();
    let v = b.verify().await;
    // A fourth live unit of three is necessarily also a unit beyond the
    // capacity (or a live order without its unit) and an order Redis never
    // gave: the three rows see the one oversell from three sides.
    assert_eq!(v.failing(), vec![Row::NoOversell, Row::UnitOwners, Row::StoresAgree], "{v}");
    b.drop().await;
}

#[tokio::test]
async fn an_allowance_the_record_took_back_alone_fails_no_oversell() {
    let b = consistent_books().await;
    // The host turns one of the three units into the oversell allowance,
    // in both stores: three live units of two is one oversold, and allowed.
    let set = |capacity: u32, allowance: u32| {
        let (db, event) = (b.db.clone(), b.event);
        async move {
            sqlx::query("UPDATE events SET capacity = ?, oversell_allowance = ? WHERE id = ?")
                .bind(capacity)
                .bind(allowance)
                .bind(event)
                .execute(&db)
                .await
                .unwrap();
        }
    };
    set(2, 1).await;
    let rules = SaleRules { capacity: 2, oversell_allowance: 1, ..consistent_rules() };
    let resized = b.ledger.resize(b.event, &rules).await.unwrap();
    assert_eq!(resized, dropline::stock::Resized::To { sellable: 3, available: 0 });
    let v = b.verify().await;
    assert_eq!(v.failing(), vec![], "{v}");
    assert_eq!(v.check(Row::NoOversell).unwrap().detail, "2 + 1 <= 2 + allowance 1; 1 oversold", "{v}");

    // The record alone loses the allowance: a unit sold beyond what it
    // allows, numbered beyond it, and a ledger that disagrees with it.
    set(2, 0).await;
    let v = b.verify().await;
    assert_eq!(v.failing(), vec![Row::NoOversell, Row::UnitOwners, Row::RedisConserved], "{v}");
    b.drop().await;
}

#[tokio::test]
async fn a_change_without_its_notification_fails_changes_notified() {
    let b = consistent_books().await;
    b.sql(
        "DELETE n FROM notifications n JOIN outbox c ON c.change_id = n.notification_id \
         WHERE c.order_id = ? AND c.kind = 'paid'",
        b.alice,
    )
    .await;
    let v = b.verify_as_is(&b.options()).await;
    assert_eq!(v.failing(), vec![Row::ChangesNotified], "{v}");
    assert_eq!(v.mysql.changes_unnotified, 1, "{v}");
    b.drop().await;
}

#[tokio::test]
async fn a_state_the_outbox_missed_fails_changes_notified() {
    let b = consistent_books().await;
    // As if the payment had been written with the outbox's trigger gone:
    // no change, and so nothing for the notifier to announce.
    b.sql(
        "DELETE n, c FROM outbox c JOIN notifications n ON n.notification_id = c.change_id \
         WHERE c.order_id = ? AND c.kind = 'paid'",
        b.alice,
    )
    .await;
    let v = b.verify_as_is(&b.options()).await;
    assert_eq!(v.failing(), vec![Row::ChangesNotified], "{v}");
    assert_eq!((v.mysql.states_without_change, v.mysql.changes_unnotified), (1, 0), "{v}");
    b.drop().await;
}

#[tokio::test]
async fn a_change_announced_twice_fails_changes_notified() {
    let b = consistent_books().await;
    // Alice's payment once more, under an id of its own, and notified.
    b.sql(
        "INSERT INTO outbox (change_id, subject, kind, event_id, order_id, user_id, quantity, amount_cents, \
         expires_at, changed_at, published_at) SELECT UUID(), subject, kind, event_id, order_id, user_id, quantity, \
         amount_cents, expires_at, changed_at, published_at FROM outbox WHERE order_id = ? AND kind = 'paid'",
        b.alice,
    )
    .await;
    let v = b.verify().await;
    assert_eq!(v.failing(), vec![Row::ChangesNotified], "{v}");
    assert_eq!((v.mysql.changes_repeated, v.mysql.changes_unnotified), (1, 0), "{v}");
    b.drop().await;
}

#[tokio::test]
async fn a_payment_start_the_outbox_missed_fails_changes_notified() {
    let b = consistent_books().await;
    b.sql(
        "DELETE n, c FROM outbox c JOIN notifications n ON n.notification_id = c.change_id \
         WHERE c.order_id = ? AND c.kind = 'payment_started'",
        b.alice,
    )
    .await;
    let v = b.verify_as_is(&b.options()).await;
    assert_eq!(v.failing(), vec![Row::ChangesNotified], "{v}");
    assert_eq!(v.mysql.payment_steps_without_change, 1, "{v}");
    b.drop().await;
}

#[tokio::test]
async fn a_declined_payment_the_outbox_missed_fails_changes_notified() {
    let b = consistent_books().await;
    b.sql(
        "DELETE n, c FROM outbox c JOIN notifications n ON n.notification_id = c.change_id \
         WHERE c.order_id = ? AND c.kind = 'payment_failed'",
        b.alice,
    )
    .await;
    let v = b.verify_as_is(&b.options()).await;
    assert_eq!(v.failing(), vec![Row::ChangesNotified], "{v}");
    assert!(v.check(Row::ChangesNotified).unwrap().detail.contains("0 refunds and 1 payment steps"), "{v}");
    b.drop().await;
}

#[tokio::test]
async fn a_notification_of_no_change_fails_changes_notified() {
    let b = consistent_books().await;
    let invented = Settled {
        id: Uuid::new_v4(),
        kind: "order.paid".into(),
        event_id: b.event,
        order_id: Some(b.bob),
        delivered: true,
        attempts: 1,
        last_error: None,
    };
    dropline_notifier::record::settle(&b.db, &[invented], &[], &[]).await.unwrap();
    let v = b.verify_as_is(&b.options()).await;
    assert_eq!(v.failing(), vec![Row::ChangesNotified], "{v}");
    assert_eq!(v.mysql.notifications_without_change, 1, "{v}");
    b.drop().await;
}

#[tokio::test]
async fn a_live_order_without_its_unit_fails_unit_owners() {
    let b = consistent_books().await;
    b.sql("DELETE FROM order_units WHERE order_id = ?", b.alice).await;
    let v = b.verify().await;
    assert_eq!(v.failing(), vec![Row::UnitOwners], "{v}");
    b.drop().await;
}

#[tokio::test]
async fn redis_counters_that_do_not_add_up_fail_redis_conserved() {
    let b = consistent_books().await;
    let mut conn = b.redis().await;
    let _: i64 =
        redis::cmd("HINCRBY").arg(b.keys().stock).arg("available").arg(1).query_async(&mut conn).await.unwrap();
    let v = b.verify().await;
    assert_eq!(v.failing(), vec![Row::RedisConserved], "{v}");
    b.drop().await;
}

#[tokio::test]
async fn a_hold_released_twice_fails_released_once() {
    let b = consistent_books().await;
    // Carol's ended hold is made to look held again, and the hold script
    // releases it a second time: its unit (now someone else's) is freed
    // again and the held counter drops below the holds it has.
    let mut again = b.ledger.hold(b.event, b.carol).await.unwrap().unwrap();
    again.state = OrderState::Held;
    again.ended_at_ms = None;
    again.payment_id = None;
    let mut conn = b.redis().await;
    let _: () = redis::cmd("HSET")
        .arg(b.keys().holds)
        .arg(b.carol.to_string())
        .arg(serde_json::to_string(&again).unwrap())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(matches!(b.ledger.expire(b.event, b.carol).await.unwrap(), EndOutcome::Ended(_)));
    let v = b.verify().await;
    assert_eq!(v.failing(), vec![Row::ReleasedOnce], "{v}");
    b.drop().await;
}

#[tokio::test]
async fn a_hold_paid_in_redis_but_held_in_mysql_fails_stores_agree() {
    let b = consistent_books().await;
    let mut paid = b.ledger.hold(b.event, b.bob).await.unwrap().unwrap();
    paid.state = OrderState::Paid;
    let keys = b.keys();
    let mut conn = b.redis().await;
    let _: () = redis::pipe()
        .atomic()
        .hset(&keys.holds, b.bob.to_string(), serde_json::to_string(&paid).unwrap())
        .ignore()
        .hincr(&keys.stock, "held", -1)
        .ignore()
        .hincr(&keys.stock, "sold", 1)
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    let v = b.verify().await;
    assert_eq!(v.failing(), vec![Row::StoresAgree], "{v}");
    b.drop().await;
}

#[tokio::test]
async fn a_paid_order_without_its_payment_fails_paid_orders_captured() {
    let b = consistent_books().await;
    b.sql("DELETE FROM payments WHERE order_id = ?", b.alice).await;
    // Without the provider's count, only the row that reads the order sees it.
    let v = b.verify_with(&CheckOptions::default()).await;
    assert_eq!(v.failing(), vec![Row::PaidOrdersCaptured], "{v}");
    // With it, the lost payment is also one the provider acknowledged.
    let v = b.verify().await;
    assert_eq!(v.failing(), vec![Row::PaidOrdersCaptured, Row::PaymentsRecorded], "{v}");
    b.drop().await;
}

#[tokio::test]
async fn a_late_payment_recorded_as_captured_fails_refunds_due() {
    let b = consistent_books().await;
    b.sql("UPDATE payments SET disposition = 'captured' WHERE order_id = ?", b.carol).await;
    let v = b.verify().await;
    // And her refund gives back money the record now says it kept.
    assert_eq!(v.failing(), vec![Row::RefundsDue, Row::RefundsMade], "{v}");
    b.drop().await;
}

#[tokio::test]
async fn a_payment_without_its_order_fails_payments_have_orders() {
    let b = consistent_books().await;
    let nobody = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO payments (provider_event_id, payment_id, order_id, amount_cents, disposition, recorded_at) \
         VALUES (?, ?, ?, ?, 'captured', NOW(3))",
    )
    .bind(format!("evt-{nobody}"))
    .bind(format!("pay-{nobody}"))
    .bind(nobody.to_string())
    .bind(PRICE)
    .execute(&b.db)
    .await
    .unwrap();
    let v = b.verify().await;
    assert_eq!(v.failing(), vec![Row::PaymentsHaveOrders], "{v}");
    b.drop().await;
}

#[tokio::test]
async fn a_due_refund_lost_fails_payments_recorded() {
    let b = consistent_books().await;
    b.sql("DELETE FROM payments WHERE order_id = ?", b.carol).await;
    let v = b.verify().await;
    // And her refund is of no payment the record keeps for refund.
    assert_eq!(v.failing(), vec![Row::PaymentsRecorded, Row::RefundsMade], "{v}");
    b.drop().await;
}

#[tokio::test]
async fn a_refund_the_provider_did_not_make_fails_refunds_made() {
    let b = consistent_books().await;
    b.sql("UPDATE refunds SET state = 'failed' WHERE order_id = ?", b.carol).await;
    let v = b.verify().await;
    assert_eq!(v.failing(), vec![Row::RefundsMade], "{v}");
    b.drop().await;
}

#[tokio::test]
async fn a_refund_of_another_amount_than_is_due_fails_refunds_made() {
    let b = consistent_books().await;
    b.sql("UPDATE refunds SET amount_cents = amount_cents - 1 WHERE order_id = ?", b.carol).await;
    let v = b.verify().await;
    assert_eq!(v.failing(), vec![Row::RefundsMade], "{v}");
    assert_eq!(v.mysql.refunds_without_due, 1, "{v}");
    b.drop().await;
}

#[tokio::test]
async fn a_refund_made_without_the_providers_id_fails_refunds_made() {
    let b = consistent_books().await;
    b.sql("UPDATE refunds SET provider_refund_id = NULL WHERE order_id = ?", b.carol).await;
    let v = b.verify().await;
    assert_eq!(v.failing(), vec![Row::RefundsMade], "{v}");
    b.drop().await;
}

#[tokio::test]
async fn a_refund_the_outbox_missed_fails_changes_notified() {
    let b = consistent_books().await;
    b.sql("DELETE FROM outbox WHERE order_id = ? AND kind = 'refunded'", b.carol).await;
    let v = b.verify_as_is(&b.options()).await;
    assert_eq!(v.failing(), vec![Row::ChangesNotified], "{v}");
    assert!(
        v.check(Row::ChangesNotified).unwrap().detail.contains("1 refunds and 0 payment steps without a change"),
        "{v}"
    );
    b.drop().await;
}

#[tokio::test]
async fn a_payment_for_refund_without_its_refund_fails_refunds_made() {
    let b = consistent_books().await;
    b.sql("DELETE FROM refunds WHERE order_id = ?", b.carol).await;
    let v = b.verify().await;
    assert_eq!(v.failing(), vec![Row::RefundsMade], "{v}");
    b.drop().await;
}

/// The provider's side: a paysim whose record holds Carol's payment and
/// the refunds given. Its address.
async fn provider_with(b: &Books, refunds: &[dropline::payments::ProviderRefund]) -> (String, CancellationToken) {
    let dir = std::env::temp_dir().join(format!("dropline-{}-paysim-{}", b.name, Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let captures = dir.join("captures.jsonl");
    let capture = dropline_paysim::Capture {
        payment_id: format!("pay-{}", b.carol),
        order_id: b.carol,
        amount_cents: PRICE,
        currency: "EUR".into(),
        webhook_id: format!("evt-{}", b.carol),
        captured_at: 0,
    };
    let lines = |items: Vec<String>| items.into_iter().map(|l| l + "\n").collect::<String>();
    std::fs::write(&captures, lines(vec![serde_json::to_string(&capture).unwrap()])).unwrap();
    std::fs::write(
        dir.join("captures.jsonl.refunds"),
        lines(refunds.iter().map(|r| serde_json::to_string(r).unwrap()).collect()),
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let paysim = dropline_paysim::start(
        <dropline_paysim::PaysimConfig as clap::Parser>::parse_from([
            "paysim".to_owned(),
            "--listen-addr=127.0.0.1:0".to_owned(),
            format!("--webhook-secret={}", dropline::secrets::random()),
            format!("--captures-path={}", captures.display()),
        ]),
        shutdown.clone(),
    )
    .await
    .unwrap();
    (format!("http://{}", paysim.addr), shutdown)
}

#[tokio::test]
async fn a_refund_the_provider_does_not_have_once_fails_refunds_made() {
    let b = consistent_books().await;
    let refund_id: String = sqlx::query_scalar("SELECT refund_id FROM refunds WHERE order_id = ?")
        .bind(b.carol.to_string())
        .fetch_one(&b.db)
        .await
        .unwrap();
    let made = dropline::payments::ProviderRefund {
        refund_id: format!("re-{}", b.carol),
        payment_id: format!("pay-{}", b.carol),
        amount_cents: PRICE,
        idempotency_key: refund_id,
        status: "succeeded".into(),
        created_at: 0,
    };
    // The provider made exactly the recorded refund: the row holds.
    let (provider, stop) = provider_with(&b, std::slice::from_ref(&made)).await;
    let v = b.verify_with(&CheckOptions { provider: Some(provider), ..b.options() }).await;
    assert_eq!(v.failing(), vec![], "{v}");
    assert!(v.check(Row::RefundsMade).unwrap().detail.contains("the provider has 1 of them"), "{v}");
    stop.cancel();
    // The provider never made it.
    let (provider, stop) = provider_with(&b, &[]).await;
    let v = b.verify_with(&CheckOptions { provider: Some(provider), ..b.options() }).await;
    assert_eq!(v.failing(), vec![Row::RefundsMade], "{v}");
    stop.cancel();
    // The provider made it, and another refund of the same payment.
    let twice = dropline::payments::ProviderRefund {
        refund_id: "re-again".into(),
        idempotency_key: Uuid::new_v4().to_string(),
        amount_cents: 1,
        ..made.clone()
    };
    let (provider, stop) = provider_with(&b, &[made, twice]).await;
    let v = b.verify_with(&CheckOptions { provider: Some(provider), ..b.options() }).await;
    assert_eq!(v.failing(), vec![Row::RefundsMade], "{v}");
    assert!(v.check(Row::RefundsMade).unwrap().detail.contains("1 refunds of none"), "{v}");
    stop.cancel();
    b.drop().await;
}

#[tokio::test]
async fn a_hold_released_past_the_grace_fails_holds_on_time() {
    let b = consistent_books().await;
    let grace = invariants::production_grace();
    sqlx::query("UPDATE orders SET updated_at = expires_at + INTERVAL ? SECOND WHERE order_id = ?")
        .bind(grace.as_secs() + 1)
        .bind(b.carol.to_string())
        .execute(&b.db)
        .await
        .unwrap();
    let v = b.verify().await;
    assert_eq!(v.failing(), vec![Row::HoldsOnTime], "{v}");
    let late = &v.mysql.lateness;
    assert_eq!((late.expired, late.max_ms), (1, (grace.as_millis() + 1_000) as i64), "{v}");
    b.drop().await;
}

#[tokio::test]
async fn a_hold_left_past_its_deadline_fails_holds_on_time() {
    let b = consistent_books().await;
    let grace = invariants::production_grace();
    sqlx::query("UPDATE orders SET expires_at = ? WHERE order_id = ?")
        .bind(chrono::Utc::now() - grace - chrono::Duration::seconds(5))
        .bind(b.bob.to_string())
        .execute(&b.db)
        .await
        .unwrap();
    let v = b.verify().await;
    assert_eq!(v.failing(), vec![Row::HoldsOnTime], "{v}");
    assert_eq!(v.mysql.overdue_holds, 1);
    b.drop().await;
}

#[tokio::test]
async fn a_buyer_over_the_limit_fails_per_user_limit() {
    let b = consistent_books().await;
    b.sql("UPDATE orders SET user_id = 'alice' WHERE order_id = ?", b.erin).await;
    let v = b.verify().await;
    assert_eq!(v.failing(), vec![Row::PerUserLimit], "{v}");
    b.drop().await;
}

#[tokio::test]
async fn an_accepted_intent_with_no_decision_fails_accepted_decided() {
    let b = consistent_books().await;
    // The caller counted one more 202 than the record has decisions.
    let v = b.verify_with(&CheckOptions { accepted: Some(6), ..b.options() }).await;
    assert_eq!(v.failing(), vec![Row::AcceptedDecided], "{v}");
    // The ingress accepted a purchase whose intent never reached the
    // allocator: its acceptance record, and nothing on Kafka.
    b.accept(Uuid::new_v4(), "frank").await;
    let v = b.verify_with(&CheckOptions { accepted: None, ..b.options() }).await;
    assert_eq!(v.failing(), vec![Row::AcceptedDecided], "{v}");
    b.drop().await;
}

#[tokio::test]
async fn the_wait_for_quiet_does_not_wait_out_a_late_hold() {
    let b = consistent_books().await;
    // Bob's deadline passed a moment ago and nothing ends his hold. With a
    // two-second grace the wait lasts until the grace is over (no longer:
    // it does not wait for the hold to end) and the row then fails.
    let grace = Duration::from_secs(2);
    sqlx::query("UPDATE orders SET expires_at = ? WHERE order_id = ?")
        .bind(chrono::Utc::now() - chrono::Duration::milliseconds(500))
        .bind(b.bob.to_string())
        .execute(&b.db)
        .await
        .unwrap();
    let settle = Quiet { pipeline: None, past_deadlines: false, grace, timeout: Duration::from_secs(20) };
    let started = tokio::time::Instant::now();
    assert!(quiet::wait_quiet(&b.db, b.event, &settle).await.unwrap());
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(1) && waited < Duration::from_secs(10), "waited {waited:?}");
    let v = b.verify_with(&CheckOptions { grace, ..b.options() }).await;
    assert_eq!(v.failing(), vec![Row::HoldsOnTime], "{v}");
    b.drop().await;
}
