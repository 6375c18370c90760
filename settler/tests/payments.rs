//! The record keeps one row per provider payment, however often and under
//! however many webhook event ids the provider delivers it. Runs against the
//! real local MariaDB.

use dropline::messages::{OrderChange, OrderState, PaymentDisposition, PaymentRecord};
use dropline::stock::Ledger;
use dropline_settler::store::Batch;
use sqlx::MySqlPool;
use uuid::Uuid;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// A database of the test's own.
async fn database(tag: &str) -> (String, MySqlPool) {
    let name = format!("dropline_{tag}{}", &Uuid::new_v4().simple().to_string()[..12]);
    let url = format!("{}/{name}", env_or("DROPLINE_TEST_MYSQL_SERVER", "mysql://root@127.0.0.1:3306"));
    dropline::db::create_database(&url).await.unwrap();
    let db = dropline::db::connect(&dropline::config::MysqlArgs::new(url, 2)).await.unwrap();
    (name, db)
}

fn paid(order_id: Uuid, event_id: &str, payment_id: &str, disposition: PaymentDisposition) -> OrderChange {
    let now = chrono::Utc::now().timestamp_millis();
    OrderChange {
        order_id,
        event_id: 1,
        user_id: "alice".to_owned(),
        quantity: 1,
        amount_cents: 1200,
        state: OrderState::Paid,
        expires_at_ms: now + 60_000,
        at_ms: now,
        payment: Some(PaymentRecord {
            provider_event_id: event_id.to_owned(),
            payment_id: payment_id.to_owned(),
            amount_cents: 1200,
            disposition,
        }),
        payment_started_at_ms: None,
        payment_failure: None,
        refund_cents: None,
    }
}

async fn rows(db: &MySqlPool, payment_id: &str) -> Vec<(String, String)> {
    sqlx::query_as("SELECT provider_event_id, CAST(disposition AS CHAR) FROM payments WHERE payment_id = ?")
        .bind(payment_id)
        .fetch_all(db)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_payment_delivered_twice_and_under_new_event_ids_is_one_row() {
    let (name, db) = database("pay").await;
    dropline::db::migrate(&db).await.unwrap();
    let redis =
        dropline::config::RedisArgs::new(env_or("DROPLINE_REDIS_URL", "redis://127.0.0.1:6379"), 16).pool().unwrap();
    let ledger = Ledger::new(redis, &name);
    let order = Uuid::new_v4();
    let captured = PaymentDisposition::Captured;

    // Two event ids for one payment in one batch, then a redelivery of the
    // first and a third event id in the next.
    let mut first = Batch::default();
    first.add_order_event(paid(order, "evt_a", "pay_1", captured));
    first.add_order_event(paid(order, "evt_b", "pay_1", captured));
    first.write(&db, &ledger).await.unwrap();
    let mut second = Batch::default();
    second.add_order_event(paid(order, "evt_a", "pay_1", captured));
    second.add_order_event(paid(order, "evt_c", "pay_1", captured));
    second.write(&db, &ledger).await.unwrap();
    assert_eq!(rows(&db, "pay_1").await, [("evt_a".to_owned(), "captured".to_owned())]);

    // Another payment for the same order is another row (to refund).
    let mut third = Batch::default();
    third.add_order_event(paid(order, "evt_d", "pay_2", PaymentDisposition::RefundRequired));
    third.write(&db, &ledger).await.unwrap();
    assert_eq!(rows(&db, "pay_2").await, [("evt_d".to_owned(), "refund_required".to_owned())]);

    sqlx::query(&format!("DROP DATABASE {name}")).execute(&db).await.unwrap();
}

/// A database the old key let duplicates into keeps each payment's first
/// row when migration 3 makes the payment id the key.
#[tokio::test]
async fn the_migration_collapses_duplicates_the_old_key_let_in() {
    let (name, db) = database("paymig").await;
    sqlx::raw_sql(include_str!("../../dropline/migrations/20261122000001_schema.sql")).execute(&db).await.unwrap();
    let order = Uuid::new_v4().to_string();
    for (event_id, payment_id, at) in [
        ("evt_b", "pay_1", "2026-01-01 10:00:01"),
        ("evt_a", "pay_1", "2026-01-01 10:00:00"),
        ("evt_c", "pay_1", "2026-01-01 10:00:00"),
        ("evt_d", "pay_2", "2026-01-01 10:00:02"),
    ] {
        sqlx::query(
            "INSERT INTO payments (provider_event_id, payment_id, order_id, amount_cents, disposition, recorded_at) \
             VALUES (?, ?, ?, 1200, 'captured', ?)",
        )
        .bind(event_id)
        .bind(payment_id)
        .bind(&order)
        .bind(at)
        .execute(&db)
        .await
        .unwrap();
    }
    sqlx::raw_sql(include_str!("../../dropline/migrations/20261122000003_payments_by_payment_id.sql"))
        .execute(&db)
        .await
        .unwrap();
    let all: Vec<(String, String)> =
        sqlx::query_as("SELECT payment_id, provider_event_id FROM payments ORDER BY payment_id")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(all, [("pay_1".to_owned(), "evt_a".to_owned()), ("pay_2".to_owned(), "evt_d".to_owned())]);
    let again = sqlx::query(
        "INSERT INTO payments (provider_event_id, payment_id, order_id, amount_cents, disposition, recorded_at) \
         VALUES ('evt_e', 'pay_1', ?, 1200, 'captured', NOW())",
    )
    .bind(&order)
    .execute(&db)
    .await;
    assert!(again.is_err(), "the payment id is the key now");
    sqlx::query(&format!("DROP DATABASE {name}")).execute(&db).await.unwrap();
}
