//! Ceilings for the performance report: what this machine does with the
//! same building blocks and none of Dropline's work, measured in the same run
//! as Dropline's own figures (scripts/bench.sh).
//!
//! - [`http`]: a bare hyper server answering every request 202 with a small
//!   JSON body, the ingress' answer without its work.
//! - [`produce`]: raw rdkafka produce rate, with the producer settings the
//!   stages use (idempotent, acks=all, the same linger).
//! - [`insert`]: multi-row INSERTs into MariaDB, the settler's write without
//!   its upsert logic.
//! - [`naive`]: the design Dropline replaces: one MySQL transaction per
//!   purchase decrementing a hot stock row.
//! - [`outbox`]: the settler's own batch writer with the record's outbox
//!   (its triggers) and without it, on databases of their own: what the
//!   outbox costs the settler.
//!
//! The SQL of the last two is what they measure, on scratch tables of
//! their own, so it stays here.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use dropline::config::{KafkaArgs, MysqlArgs};
use futures::future::join_all;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rdkafka::producer::FutureRecord;
use sqlx::{MySql, QueryBuilder};
use tokio::net::TcpListener;

/// Serves 202 to everything until the process is stopped.
pub async fn http(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    eprintln!("bare hyper server on {}", listener.local_addr()?);
    let body = Bytes::from_static(br#"{"intent_id":"00000000-0000-0000-0000-000000000000","status":"queued"}"#);
    loop {
        let (stream, _) = listener.accept().await?;
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_req: Request<hyper::body::Incoming>| {
                let body = body.clone();
                async move {
                    let mut r = Response::new(Full::new(body));
                    *r.status_mut() = StatusCode::ACCEPTED;
                    r.headers_mut().insert("content-type", "application/json".parse().expect("static"));
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A measured rate.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Rate {
    pub count: u64,
    pub secs: f64,
    pub per_sec: f64,
}

fn rate(count: u64, started: Instant) -> Rate {
    let secs = started.elapsed().as_secs_f64();
    Rate { count, secs, per_sec: count as f64 / secs }
}

/// What [`produce`] writes: a fresh purchase intent per message (the
/// allocator's input), or a fresh held decision (the settler's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Payload {
    Intent,
    Decision,
}

fn payload(kind: Payload, event_id: u64, i: u64) -> Vec<u8> {
    let intent_id = uuid::Uuid::new_v4();
    let user_id = format!("bench-user-{i}");
    let now = dropline::messages::now_ms();
    match kind {
        Payload::Intent => serde_json::to_vec(&dropline::messages::PurchaseIntent {
            intent_id,
            event_id,
            user_id,
            quantity: 1,
            accepted_at_ms: now,
        }),
        Payload::Decision => serde_json::to_vec(&dropline::messages::Decision {
            intent_id,
            event_id,
            user_id,
            quantity: 1,
            decided_at_ms: now,
            outcome: dropline::messages::Outcome::Held {
                expires_at_ms: now + 600_000,
                amount_cents: 4_500,
                units: vec![u32::try_from(i + 1).expect("fewer than 4 billion messages")],
            },
        }),
    }
    .expect("messages serialize")
}

/// Produces `messages` fresh messages to `topic`, for `events` events from
/// `event_id` in turn, each keyed by its event as the stages key them (so
/// several events spread over the partitions), with `in_flight` sends
/// outstanding, and waits for every acknowledgement.
pub async fn produce(
    kafka: &KafkaArgs,
    topic: &str,
    kind: Payload,
    event_id: u64,
    events: u64,
    messages: u64,
    in_flight: usize,
) -> anyhow::Result<Rate> {
    anyhow::ensure!(events > 0, "at least one event");
    dropline::kafka::ensure_topics(kafka, &[topic]).await?;
    // The raw producer, not the stages' Publisher: this measures the
    // broker's own rate, without the publisher's metrics and error mapping.
    // The settings are the stages' (`dropline::kafka::producer`).
    let producer = dropline::kafka::producer(kafka, "ceiling-producer")?;
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers = (0..in_flight).map(|_| {
        let (producer, next) = (producer.clone(), next.clone());
        let topic = topic.to_owned();
        async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= messages {
                    return anyhow::Ok(());
                }
                let event = event_id + i % events;
                let key = event.to_string();
                let body = payload(kind, event, i);
                producer
                    .send(FutureRecord::to(&topic).key(&key).payload(&body), Duration::from_secs(5))
                    .await
                    .map_err(|(e, _)| e)?;
            }
        }
    });
    for r in join_all(workers).await {
        r?;
    }
    Ok(rate(messages, started))
}

/// Inserts `rows` order-shaped rows in statements of `batch` rows.
pub async fn insert(mysql: &MysqlArgs, rows: u64, batch: usize) -> anyhow::Result<Rate> {
    dropline::db::create_database(&mysql.url).await?;
    let db = dropline::db::connect(mysql).await?;
    sqlx::query("DROP TABLE IF EXISTS ceiling_rows").execute(&db).await?;
    sqlx::query(
        "CREATE TABLE ceiling_rows (id CHAR(36) CHARACTER SET ascii PRIMARY KEY, event_id BIGINT UNSIGNED NOT NULL, \
         user_id VARCHAR(128) NOT NULL, quantity INT UNSIGNED NOT NULL, state VARCHAR(16) NOT NULL, \
         at DATETIME(3) NOT NULL) ENGINE = InnoDB",
    )
    .execute(&db)
    .await?;
    let started = Instant::now();
    let mut done = 0;
    while done < rows {
        let n = batch.min((rows - done) as usize);
        let mut q =
            QueryBuilder::<MySql>::new("INSERT INTO ceiling_rows (id, event_id, user_id, quantity, state, at) ");
        q.push_values(0..n, |mut row, _| {
            row.push_bind(uuid::Uuid::new_v4().to_string())
                .push_bind(1u64)
                .push_bind("ceiling-user")
                .push_bind(1u32)
                .push_bind("held")
                .push_bind(chrono::Utc::now());
        });
        q.build().execute(&db).await?;
        done += n as u64;
    }
    let r = rate(rows, started);
    sqlx::query("DROP TABLE ceiling_rows").execute(&db).await?;
    Ok(r)
}

/// What [`outbox`] measured: held orders written per second by the
/// settler's batch writer with the outbox's triggers and without them,
/// rounds interleaved, each side's best round.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OutboxCost {
    pub with_outbox: Rate,
    pub without_outbox: Rate,
    /// with / without.
    pub ratio: f64,
}

/// The settler's write of `orders` new holds (one event, a unit and a buyer
/// each, `batch` decisions a transaction), `rounds` times on a database
/// with the outbox and as many on one whose triggers are dropped.
pub async fn outbox(mysql: &MysqlArgs, orders: u32, batch: usize, rounds: u32) -> anyhow::Result<OutboxCost> {
    use dropline::messages::{Decision, Outcome};
    // Every hold has a unit and a buyer of its own: the writer never asks
    // the ledger about a competing hold, so no Redis is needed.
    let ledger = dropline::stock::Ledger::new(
        dropline::config::RedisArgs::new("redis://127.0.0.1:1", 1).pool()?,
        "ceiling-outbox",
    );
    dropline::db::create_database(&mysql.url).await?;
    let mut best: [Option<Rate>; 2] = [None, None];
    for round in 0..rounds * 2 {
        let with_outbox = round % 2 == 0;
        let url = format!("{}_{}", mysql.url, if with_outbox { "with" } else { "without" });
        let args = MysqlArgs { url: url.clone(), ..mysql.clone() };
        let server = dropline::db::connect(&MysqlArgs { url: mysql.url.clone(), ..mysql.clone() }).await?;
        let name = url.rsplit('/').next().unwrap_or_default().to_owned();
        sqlx::query(&format!("DROP DATABASE IF EXISTS `{name}`")).execute(&server).await?;
        dropline::db::create_database(&url).await?;
        let db = dropline::db::connect(&args).await?;
        dropline::db::migrate(&db).await?;
        if !with_outbox {
            for trigger in ["orders_to_outbox_on_insert", "orders_to_outbox_on_update"] {
                sqlx::query(&format!("DROP TRIGGER {trigger}")).execute(&db).await?;
            }
        }
        let now = chrono::Utc::now();
        let event = sqlx::query(
            "INSERT INTO events (name, venue, starts_at, sale_opens_at, sale_closes_at, capacity, price_cents, \
             currency, per_user_limit, hold_ttl_secs) VALUES ('outbox ceiling', 'nowhere', ?, ?, ?, ?, 1000, 'EUR', 1, 600)",
        )
        .bind(now + chrono::Duration::days(1))
        .bind(now)
        .bind(now + chrono::Duration::hours(1))
        .bind(orders)
        .execute(&db)
        .await?
        .last_insert_id();
        let decisions: Vec<Decision> = (1..=orders)
            .map(|unit| Decision {
                intent_id: uuid::Uuid::new_v4(),
                event_id: event,
                user_id: format!("ceiling-buyer-{unit}"),
                quantity: 1,
                decided_at_ms: now.timestamp_millis(),
                outcome: Outcome::Held {
                    expires_at_ms: (now + chrono::Duration::minutes(10)).timestamp_millis(),
                    amount_cents: 1000,
                    units: vec![unit],
                },
            })
            .collect();
        let started = Instant::now();
        for chunk in decisions.chunks(batch) {
            let mut b = dropline_settler::store::Batch::default();
            for d in chunk {
                b.add_decision(d.clone());
            }
            b.write(&db, &ledger).await?;
        }
        let measured = rate(u64::from(orders), started);
        let (changes,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM outbox").fetch_one(&db).await?;
        anyhow::ensure!(
            changes == if with_outbox { i64::from(orders) } else { 0 },
            "{changes} outbox rows for {orders} orders"
        );
        db.close().await;
        sqlx::query(&format!("DROP DATABASE `{name}`")).execute(&server).await?;
        let slot = &mut best[usize::from(!with_outbox)];
        if slot.is_none_or(|b| measured.per_sec > b.per_sec) {
            *slot = Some(measured);
        }
    }
    let [Some(with_outbox), Some(without_outbox)] = best else { anyhow::bail!("no round ran") };
    Ok(OutboxCost { with_outbox, without_outbox, ratio: with_outbox.per_sec / without_outbox.per_sec })
}

/// One transaction per purchase on a hot row, `concurrency` at a time.
pub async fn naive(mysql: &MysqlArgs, purchases: u64, concurrency: usize) -> anyhow::Result<Rate> {
    dropline::db::create_database(&mysql.url).await?;
    let db = dropline::db::connect(&MysqlArgs { pool_size: concurrency as u32, ..mysql.clone() }).await?;
    sqlx::query("DROP TABLE IF EXISTS ceiling_stock").execute(&db).await?;
    sqlx::query("DROP TABLE IF EXISTS ceiling_orders").execute(&db).await?;
    sqlx::query("CREATE TABLE ceiling_stock (id INT PRIMARY KEY, stock INT NOT NULL) ENGINE = InnoDB")
        .execute(&db)
        .await?;
    sqlx::query(
        "CREATE TABLE ceiling_orders (id BIGINT AUTO_INCREMENT PRIMARY KEY, user_id VARCHAR(64) NOT NULL) ENGINE = InnoDB",
    )
    .execute(&db)
    .await?;
    sqlx::query("INSERT INTO ceiling_stock VALUES (1, ?)").bind(purchases as i64).execute(&db).await?;
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers = (0..concurrency).map(|_| {
        let (db, next) = (db.clone(), next.clone());
        async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= purchases {
                    return anyhow::Ok(());
                }
                let mut tx = db.begin().await?;
                let taken = sqlx::query("UPDATE ceiling_stock SET stock = stock - 1 WHERE id = 1 AND stock > 0")
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if taken == 1 {
                    sqlx::query("INSERT INTO ceiling_orders (user_id) VALUES (?)")
                        .bind(format!("u{i}"))
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
            }
        }
    });
    for r in join_all(workers).await {
        r.context("naive purchase")?;
    }
    let r = rate(purchases, started);
    sqlx::query("DROP TABLE ceiling_stock").execute(&db).await?;
    sqlx::query("DROP TABLE ceiling_orders").execute(&db).await?;
    Ok(r)
}
