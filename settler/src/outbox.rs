//! The outbox relay: publishes the record's changes on `changes`, in the
//! order they were written, and marks them published.
//!
//! The changes themselves are written by the database, in the transaction
//! that makes each one (see `record::outbox`), so none is missed and none
//! is invented. The relay is the only way out of the table: it reads what
//! is not published yet, publishes it with the idempotent producer keyed by
//! order, each order's changes one after another (a change is sent only
//! once the one before it of its order was acknowledged, so a retry inside
//! the producer never reorders them), and marks what the broker
//! acknowledged. A crash in between publishes those rows again under the
//! same change ids, which the notifier deduplicates. A row this version
//! cannot read goes to the dead-letter topic with its reason and is marked
//! too: it never holds up the rows behind it.
//!
//! One relay runs per database: a settler relays while its connection
//! holds the database's named lock (`GET_LOCK`); the others wait for it,
//! and meanwhile report how old the oldest unpublished change is, so a
//! relay that stopped moving raises the alert from its peers. The lock goes
//! with the connection, whose session closes after a short idle time (see
//! [`outbox::lead`]), so a settler that dies or loses MySQL lets another
//! take over.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dropline::kafka::{DeadLetters, Publisher, Record};
use dropline::messages::Change;
use sqlx::{Connection, MySqlConnection, MySqlPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::{OUTBOX_LAG, OUTBOX_PUBLISHED, OUTBOX_RELAYING};
use crate::record::outbox;

/// Rows published at once.
const BATCH: u32 = 500;

/// How long a settler that is not the relay waits before it tries again
/// (and measures the outbox's lag), and how long the relay waits after a
/// failure.
const RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("mysql: {0}")]
    Mysql(#[from] sqlx::Error),
    #[error("publishing change {change_id}: {error}")]
    Publish { change_id: uuid::Uuid, error: dropline::kafka::PublishError },
    #[error("dead-lettering outbox row {seq}: {error}")]
    DeadLetter { seq: u64, error: dropline::kafka::PublishError },
}

pub struct Relay {
    pub db: MySqlPool,
    pub publisher: Publisher,
    pub dead_letters: DeadLetters,
    pub topic: String,
    /// Woken by the settler after each commit, so a change goes out at once.
    pub wake: Arc<Notify>,
    /// How often the table is read when nothing wakes the relay (changes
    /// written by another process: another settler, the ingress).
    pub poll: Duration,
}

impl Relay {
    pub async fn run(self, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            if let Err(e) = self.relay_while_leading(&shutdown).await {
                tracing::warn!(error = %e, "the outbox relay failed; trying again");
            }
            ::metrics::gauge!(OUTBOX_RELAYING.name).set(0.0);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
    }

    /// Waits to hold the relay lock, then relays until shutdown or a
    /// failure. The connection is the pool's no more: closing it (whatever
    /// way this returns) lets the lock go.
    async fn relay_while_leading(&self, shutdown: &CancellationToken) -> Result<(), RelayError> {
        let mut conn = self.db.acquire().await?.detach();
        // Idle between two reads for at most a poll (or a wait for a wake):
        // four polls and half a minute is the longest a dead relay's lock
        // outlives it.
        let idle_secs = (self.poll.as_secs() * 4).max(30);
        ::metrics::gauge!(OUTBOX_RELAYING.name).set(0.0);
        while !outbox::lead(&mut conn, idle_secs).await? {
            // Set again every round: the exporter drops a gauge nobody set
            // for a minute, and DroplineOutboxStalled reads this one.
            ::metrics::gauge!(OUTBOX_RELAYING.name).set(0.0);
            // Someone else relays: say how far behind it is.
            report_lag(outbox::oldest_unpublished(&mut conn).await?);
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
        tracing::info!("relaying the outbox");
        ::metrics::gauge!(OUTBOX_RELAYING.name).set(1.0);
        let relayed = self.relay(&mut conn, shutdown).await;
        let _ = conn.close().await;
        relayed
    }

    async fn relay(&self, conn: &mut MySqlConnection, shutdown: &CancellationToken) -> Result<(), RelayError> {
        loop {
            ::metrics::gauge!(OUTBOX_RELAYING.name).set(1.0);
            let rows = outbox::unpublished(conn, BATCH).await?;
            report_lag(rows.first().map(|r| r.changed_at));
            if rows.is_empty() {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(self.poll) => {}
                }
                continue;
            }
            let mut done: Vec<u64> = Vec::with_capacity(rows.len());
            // Each order's changes, in the order they were written.
            let mut by_order: BTreeMap<String, Vec<(u64, Change)>> = BTreeMap::new();
            for row in &rows {
                match row.change() {
                    Ok(change) => by_order.entry(change.key()).or_default().push((row.seq, change)),
                    Err(unreadable) => {
                        self.dead_letter(row, &unreadable).await?;
                        done.push(row.seq);
                    }
                }
            }
            let sent = futures::future::join_all(by_order.values().map(|changes| self.publish_in_order(changes))).await;
            let mut failed = None;
            for (acked, error) in sent {
                done.extend(acked);
                failed = failed.or(error);
            }
            outbox::mark_published(conn, &done).await?;
            ::metrics::counter!(OUTBOX_PUBLISHED.name).increment(done.len() as u64);
            if let Some(e) = failed {
                return Err(e);
            }
        }
    }

    /// Publishes one order's changes one after another; the seqs the broker
    /// acknowledged, and the error that stopped the rest, if one did.
    async fn publish_in_order(&self, changes: &[(u64, Change)]) -> (Vec<u64>, Option<RelayError>) {
        let mut acked = Vec::with_capacity(changes.len());
        for (seq, change) in changes {
            let payload = serde_json::to_vec(change).expect("changes serialize");
            let key = change.key();
            if let Err(error) = self.publisher.publish(Record::new(&self.topic, &key, &payload)).await {
                return (acked, Some(RelayError::Publish { change_id: change.change_id, error }));
            }
            acked.push(*seq);
        }
        (acked, None)
    }

    async fn dead_letter(&self, row: &outbox::Row, unreadable: &outbox::Unreadable) -> Result<(), RelayError> {
        let payload = serde_json::to_vec(row).expect("rows serialize");
        let key = row.order_id.clone().unwrap_or_else(|| row.event_id.to_string());
        let origin = format!("outbox seq {}", row.seq);
        let reason = unreadable.to_string();
        self.dead_letters
            .park_record(&key, &payload, &origin, "unreadable", &reason)
            .await
            .map_err(|error| RelayError::DeadLetter { seq: row.seq, error })
    }
}

/// The outbox's lag gauge: the age of the oldest change not published yet,
/// or 0.
fn report_lag(oldest: Option<chrono::DateTime<chrono::Utc>>) {
    let age_ms = oldest.map_or(0, |t| (chrono::Utc::now() - t).num_milliseconds().max(0));
    ::metrics::gauge!(OUTBOX_LAG.name).set(age_ms as f64 / 1000.0);
}
