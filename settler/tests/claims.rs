//! Two settlers on one event at once: while a partition changes hands, the
//! settler that lost it may still be writing its last batch when the one
//! that got it writes the next. The record must still give each unit to one
//! live order. Runs against the real local MariaDB.

use std::time::Duration;

use dropline::messages::{Decision, OrderState, Outcome};
use dropline_settler::store::Batch;
use dropline_testkit::{eventually, Deployment};
use sqlx::{Connection, MySqlPool, Row};
use uuid::Uuid;

fn held(order: Uuid, user: &str, unit: u32) -> Decision {
    let now = chrono::Utc::now().timestamp_millis();
    Decision {
        intent_id: order,
        event_id: 1,
        user_id: user.to_owned(),
        quantity: 1,
        decided_at_ms: now,
        outcome: Outcome::Held { expires_at_ms: now + 600_000, amount_cents: 4500, units: vec![unit] },
    }
}

fn batch_of(decision: Decision) -> Batch {
    let mut batch = Batch::default();
    batch.add_decision(decision);
    batch
}

async fn state(db: &MySqlPool, order: Uuid) -> OrderState {
    let (state,): (OrderState,) = sqlx::query_as("SELECT CAST(state AS CHAR) FROM orders WHERE order_id = ?")
        .bind(order.to_string())
        .fetch_one(db)
        .await
        .unwrap();
    state
}

/// Transactions waiting for a row lock of this database's tables, as
/// InnoDB's status reports them (its INFORMATION_SCHEMA tables are a cache
/// that is only refreshed once nobody read it for 100 ms: a poll every
/// 50 ms never sees a change).
async fn waiting(db: &MySqlPool, name: &str) -> usize {
    let status: String = sqlx::raw_sql("SHOW ENGINE INNODB STATUS").fetch_one(db).await.unwrap().get("Status");
    let table = format!("of table `{name}`.");
    status
        .split("TRX HAS BEEN WAITING")
        .skip(1)
        .filter(|wait| wait.lines().nth(1).is_some_and(|l| l.contains(&table)))
        .count()
}

/// Two buyers' batches claim unit 2 of event 1, and both start before
/// either commits: they are held back at the unit itself (another
/// transaction has a row for it, uncommitted) until both have read its
/// owner, or one waits for the event, then let go. One order gets the unit
/// and the other is voided; never both held with one unit between them.
#[tokio::test]
async fn two_batches_claiming_one_unit_at_once_give_it_to_one_order() {
    let deployment = Deployment::create().await;
    let (db, ledger, url) = (deployment.db.clone(), deployment.ledger.clone(), deployment.mysql_url());
    let name = format!("dropline_{}", deployment.name);
    dropline::db::migrate(&db).await.unwrap();
    sqlx::query(
        "INSERT INTO events (id, name, venue, starts_at, sale_opens_at, sale_closes_at, capacity, price_cents, \
         currency, per_user_limit, hold_ttl_secs) VALUES (1, 'claims', 'test', UTC_TIMESTAMP() + INTERVAL 1 DAY, \
         UTC_TIMESTAMP(), UTC_TIMESTAMP() + INTERVAL 1 DAY, 10, 4500, 'EUR', 10, 600)",
    )
    .execute(&db)
    .await
    .unwrap();
    // Unit 2's row, written and not committed: both grants wait for it.
    let mut blocker = sqlx::MySqlConnection::connect(&url).await.unwrap();
    let mut hold_back = blocker.begin().await.unwrap();
    sqlx::query("INSERT INTO order_units (event_id, unit_no, order_id) VALUES (1, 2, ?)")
        .bind(Uuid::new_v4().to_string())
        .execute(&mut *hold_back)
        .await
        .unwrap();

    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
    let writes: Vec<_> = [(first, "alice"), (second, "bob")]
        .into_iter()
        .map(|(order, buyer)| {
            let (db, ledger) = (db.clone(), ledger.clone());
            tokio::spawn(async move { batch_of(held(order, buyer, 2)).write(&db, &ledger).await })
        })
        .collect();
    eventually("both batches waiting on a lock", Duration::from_secs(20), || async {
        (waiting(&db, &name).await == 2).then_some(())
    })
    .await;
    hold_back.rollback().await.unwrap();
    for write in writes {
        write.await.unwrap().unwrap();
    }

    let states = [state(&db, first).await, state(&db, second).await];
    let owner: Vec<(String,)> = sqlx::query_as("SELECT order_id FROM order_units WHERE event_id = 1 AND unit_no = 2")
        .fetch_all(&db)
        .await
        .unwrap();
    let live: Vec<Uuid> =
        [first, second].into_iter().zip(states).filter(|(_, s)| s.is_live()).map(|(o, _)| o).collect();
    assert_eq!(live.len(), 1, "one order keeps unit 2, the other is voided: {states:?}");
    assert!(states.contains(&OrderState::Voided), "{states:?}");
    assert_eq!(owner, [(live[0].to_string(),)], "unit 2 belongs to the live order");

    deployment.drop_database().await;
}
