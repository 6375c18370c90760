//! The settler: Dropline's writer into MySQL, the record of truth.
//!
//! It consumes `decisions` (every intent's one outcome, and each new hold)
//! and `order-events` (holds paid, cancelled or expired, and payments), and
//! writes each batch in one transaction of idempotent upserts. Offsets are
//! stored only after the commit; a crash in between redelivers the batch,
//! whose second write changes nothing.
//!
//! - [`store`]: the upserts and their forward-only rule.
//! - [`claims`]: the record's check of every new hold's units and buyer
//!   limit; a hold it refuses is voided.
//! - [`reconcile`]: how far the Redis ledger and MySQL disagree, as gauges,
//!   and the repairs: a ledger missing, damaged or behind is rebuilt; a hold
//!   left held past its deadline is ended.
//! - [`rebuild`]: rebuilding an event's ledger from MySQL, fenced.
//! - [`config`]: settings; [`metrics`]: metric names.

pub mod claims;
pub mod config;
pub mod metrics;
pub mod rebuild;
pub mod reconcile;
pub mod store;

use std::time::{Duration, Instant};

use dropline::kafka::{self, DeadLetters};
use dropline::messages::{Decision, OrderEvent};
use dropline::ops::Readiness;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Message, OwnedMessage};
use tokio_util::sync::CancellationToken;

/// Where the ops endpoints listen unless configured.
pub const DEFAULT_OPS_PORT: u16 = 9102;

pub use config::SettlerConfig;

use crate::metrics::{BATCH_DURATION, BATCH_SIZE, ROWS, WRITE_ERRORS};
use crate::reconcile::Reconciler;
use crate::store::Batch;

#[derive(Debug, thiserror::Error)]
pub enum SettlerError {
    #[error(transparent)]
    Config(#[from] dropline::config::ConfigError),
    #[error("mysql: {0}")]
    Mysql(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    KafkaSetup(#[from] kafka::KafkaSetupError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("redis pool: {0}")]
    RedisPool(#[from] deadpool_redis::CreatePoolError),
    #[error("ops server: {0}")]
    Io(#[from] std::io::Error),
}

pub async fn run(config: SettlerConfig, shutdown: CancellationToken) -> Result<(), SettlerError> {
    config.validate()?;
    config.log_effective();
    // The recorder first: metrics described or created before it exists
    // would go nowhere.
    let prometheus = dropline::telemetry::metrics();
    metrics::describe();
    kafka::metrics::describe();
    let ready = Readiness::default();
    let ops = config.ops.addr_or(DEFAULT_OPS_PORT);
    dropline::ops::serve(ops, ready.clone(), prometheus, shutdown.clone()).await?;
    let db = dropline::db::connect(&config.mysql).await?;
    dropline::db::migrate(&db).await?;
    let topics = config.kafka.topics();
    kafka::ensure_topics(&config.kafka, &topics.all()).await?;
    let producer = kafka::producer(&config.kafka, "settler-producer")?;
    let dead_letters = DeadLetters::new(producer.clone(), topics.dead_letter.clone(), "settler");
    let consumer = kafka::consumer(&config.kafka, &config.group_id, "settler-consumer")?;
    consumer.subscribe(&[&topics.decisions, &topics.order_events])?;
    let ledger = dropline::stock::Ledger::new(config.redis.pool()?, &config.redis.key_prefix);
    let (refused, refusals) = tokio::sync::mpsc::unbounded_channel();
    let reconciler = Reconciler {
        db: db.clone(),
        ledger: ledger.clone(),
        kafka: config.kafka.clone(),
        producer,
        topics: topics.clone(),
        options: config.reconcile_options(),
        refused: refusals,
    };
    tokio::spawn(reconciler.run(shutdown.clone()));
    ready.set(true);
    tracing::info!("settler consuming");

    let linger = Duration::from_millis(config.batch_linger_ms);
    loop {
        let messages = kafka::next_batch(&consumer, config.batch_max, linger, &shutdown).await;
        if messages.is_empty() {
            break;
        }
        let started = Instant::now();
        let mut batch = Batch::default();
        let mut parked = true;
        for m in &messages {
            tracing::debug!(
                request_id = kafka::request_id(m).as_deref(),
                topic = m.topic(),
                offset = m.offset(),
                "settling"
            );
            let decoded = if m.topic() == topics.decisions {
                decode::<Decision>(m).map(|d| batch.add_decision(d))
            } else {
                decode::<OrderEvent>(m).map(|e| batch.add_order_event(e))
            };
            if let Err(reason) = decoded {
                if kafka::retry_until("dead-letter", &shutdown, || dead_letters.park(m, &reason)).await.is_none() {
                    parked = false;
                    break;
                }
            }
        }
        if !parked {
            break;
        }
        if !batch.is_empty() {
            let written = kafka::retry_until("write batch", &shutdown, || async {
                let result = batch.write(&db, &ledger).await;
                if result.is_err() {
                    ::metrics::counter!(WRITE_ERRORS).increment(1);
                }
                result
            })
            .await;
            let Some(written) = written else {
                break;
            };
            ::metrics::counter!(ROWS, "table" => "intents").increment(written.intents as u64);
            ::metrics::counter!(ROWS, "table" => "orders").increment(written.orders as u64);
            ::metrics::counter!(ROWS, "table" => "payments").increment(written.payments as u64);
            ::metrics::counter!(ROWS, "table" => "order_units").increment(written.units as u64);
            // A voided hold means the ledger is behind the record: have it
            // rebuilt, so it stops handing out what is taken.
            for void in &written.voided {
                let _ = refused.send(void.event_id);
            }
        }
        kafka::store_after(&consumer, &messages);
        ::metrics::histogram!(BATCH_SIZE).record(messages.len() as f64);
        ::metrics::histogram!(BATCH_DURATION).record(started.elapsed().as_secs_f64());
    }
    ready.set(false);
    kafka::commit_stored(&consumer);
    tracing::info!("settler stopped");
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(m: &OwnedMessage) -> Result<T, String> {
    let payload = m.payload().ok_or("empty payload")?;
    serde_json::from_slice(payload).map_err(|e| format!("undecodable message: {e}"))
}
