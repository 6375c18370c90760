//! The settler: Dropline's writer into MySQL, the record of truth.
//!
//! It consumes `decisions` (every intent's one outcome, and each new hold)
//! and `order-events` (holds paid, cancelled or expired, and payments), and
//! writes each batch in one transaction of idempotent upserts. Offsets are
//! stored only after the commit; a crash in between redelivers the batch,
//! whose second write changes nothing.
//!
//! - [`store`]: one batch's write, in one transaction.
//! - [`claims`]: the record's check of every new hold's units and buyer
//!   limit; a hold it refuses is voided.
//! - [`record`]: the settler's SQL, by table: the upserts and their
//!   forward-only rule, and what the reconciler and a rebuild read.
//! - [`reconcile`]: how far the Redis ledger and MySQL disagree, as gauges,
//!   and the repairs: a ledger missing, damaged or behind is rebuilt; a hold
//!   left held past its deadline is ended.
//! - [`rebuild`]: rebuilding an event's ledger from MySQL, fenced.
//! - [`outbox`]: the relay that publishes the record's changes (written by
//!   the database in each change's own transaction) on `changes`.
//! - [`refunds`]: the worker that gives back, through the payment
//!   provider, the money of every payment the record keeps for refund.
//! - [`milestones`]: a sale opened, sold out, back on sale, recorded on
//!   the event (and so announced) once.
//! - [`config`]: settings; [`metrics`]: metric names.

pub mod claims;
pub mod config;
pub mod metrics;
pub mod milestones;
pub mod outbox;
pub mod rebuild;
pub mod reconcile;
pub mod record;
pub mod refunds;
pub mod store;

use std::sync::Arc;

use dropline::kafka;
use dropline::messages::{Decision, OrderChange};
use dropline::stage::{self, Stage, StageError};
use rdkafka::message::{Message, OwnedMessage};
use tokio_util::sync::CancellationToken;

pub use config::SettlerConfig;

use crate::claims::WriteError;
use crate::metrics::{ROWS, WRITE_ERRORS};
use crate::reconcile::{Reconciler, Voided};
use crate::store::Batch;

#[derive(Debug, thiserror::Error)]
pub enum SettlerError {
    #[error(transparent)]
    Stage(#[from] StageError),
    #[error("the refund worker's HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

impl From<sqlx::migrate::MigrateError> for SettlerError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        SettlerError::Stage(e.into())
    }
}

pub async fn run(config: SettlerConfig, shutdown: CancellationToken) -> Result<(), SettlerError> {
    let stage::Consumer { ready, topics, publisher, dead_letters, consumer } =
        Stage::start_consumer(&config, &config.group_id, |t| vec![&t.decisions, &t.order_changes], &shutdown).await?;
    let Some(db) = dropline::db::connect_and_migrate(&config.mysql, &shutdown).await? else {
        return Ok(());
    };
    let ledger = dropline::stock::Ledger::new(
        config.shared.redis.pool().map_err(StageError::from)?,
        &config.shared.redis.key_prefix,
    );
    let voided = Arc::new(Voided::default());
    let reconciler = Reconciler {
        db: db.clone(),
        ledger: ledger.clone(),
        kafka: config.shared.kafka.clone(),
        publisher: publisher.clone(),
        topics: topics.clone(),
        options: config.reconcile_options(),
        voided: voided.clone(),
    };
    tokio::spawn(reconciler.run(shutdown.clone()));
    let wake = Arc::new(tokio::sync::Notify::new());
    let relay = outbox::Relay {
        db: db.clone(),
        publisher,
        dead_letters: dead_letters.clone(),
        topic: topics.changes.clone(),
        wake: wake.clone(),
        poll: std::time::Duration::from_millis(config.outbox_poll_ms),
    };
    let relaying = tokio::spawn(relay.run(shutdown.clone()));
    let refunder = refunds::Refunder::new(db.clone(), config.refund_options())?;
    let refunding = tokio::spawn(refunder.run(shutdown.clone()));
    let milestones = milestones::Milestones {
        db: db.clone(),
        ledger: ledger.clone(),
        every: std::time::Duration::from_millis(config.milestone_poll_ms),
    };
    let watching = tokio::spawn(milestones.run(shutdown.clone()));
    ready.set(true);
    tracing::info!("settler consuming");

    let settler = Settler { db, ledger, decisions_topic: topics.decisions.clone(), voided, wake };
    let options = config.shared.kafka.batch_options("settler", config.batch_max, config.batch_linger_ms);
    let ended = kafka::run_batches(&consumer, &settler, &dead_letters, &options, &shutdown).await;
    ready.set(false);
    let _ = relaying.await;
    let _ = refunding.await;
    let _ = watching.await;
    tracing::info!("settler stopped");
    ended.map_err(StageError::from)?;
    Ok(())
}

struct Settler {
    db: sqlx::MySqlPool,
    ledger: dropline::stock::Ledger,
    decisions_topic: String,
    voided: Arc<Voided>,
    /// The outbox relay's: the batch wrote changes.
    wake: Arc<tokio::sync::Notify>,
}

/// A message the settler writes.
enum Settle {
    Decision(Decision),
    OrderChange(OrderChange),
}

impl kafka::Failure for WriteError {
    fn is_permanent(&self) -> bool {
        match self {
            // Only the rows' own fault is permanent: a data exception
            // (SQLSTATE class 22) or a broken constraint (class 23) will be
            // refused again. Anything else (a server gone, a deadlock, a
            // missing table after a bad deploy) waits for an operator or for
            // the server, and must never send work to the dead-letter topic.
            WriteError::Mysql(sqlx::Error::Database(e)) => {
                e.code().is_some_and(|state| state.starts_with("22") || state.starts_with("23"))
            }
            // A row this version cannot read, or a ledger answer it cannot
            // read, is a version or schema mismatch (a rolling deploy, a
            // migration not run): the messages are fine, and waiting for an
            // operator loses nothing, while parking them would.
            WriteError::Mysql(_) => false,
            WriteError::Ledger(_) => false,
        }
    }
}

impl kafka::BatchStage for Settler {
    type Item = Settle;
    type Error = WriteError;

    fn decode(&self, m: &OwnedMessage) -> Result<Settle, String> {
        if m.topic() == self.decisions_topic {
            decode::<Decision>(m).map(Settle::Decision)
        } else {
            decode::<OrderChange>(m).map(Settle::OrderChange)
        }
    }

    /// Writes the batch in one transaction of idempotent upserts.
    async fn apply(&self, items: &[(Settle, &OwnedMessage)]) -> Result<(), WriteError> {
        let mut batch = Batch::default();
        for (item, m) in items {
            tracing::debug!(
                request_id = kafka::request_id(m).as_deref(),
                topic = m.topic(),
                offset = m.offset(),
                "settling"
            );
            match item {
                Settle::Decision(d) => batch.add_decision(d.clone()),
                Settle::OrderChange(e) => batch.add_order_event(e.clone()),
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        let written = batch.write(&self.db, &self.ledger).await.inspect_err(|_| {
            ::metrics::counter!(WRITE_ERRORS.name).increment(1);
        })?;
        ::metrics::counter!(ROWS.name, "table" => "intents").increment(written.intents as u64);
        ::metrics::counter!(ROWS.name, "table" => "orders").increment(written.orders as u64);
        ::metrics::counter!(ROWS.name, "table" => "payments").increment(written.payments as u64);
        ::metrics::counter!(ROWS.name, "table" => "order_units").increment(written.units as u64);
        // A voided hold means the ledger is behind the record: have it
        // rebuilt, so it stops handing out what is taken.
        for void in &written.voided {
            self.voided.add(void.event_id);
        }
        self.wake.notify_one();
        Ok(())
    }
}

fn decode<T: serde::de::DeserializeOwned>(m: &OwnedMessage) -> Result<T, String> {
    let payload = m.payload().ok_or("empty payload")?;
    serde_json::from_slice(payload).map_err(|e| format!("undecodable message: {e}"))
}
