//! The outbox relay: publishes the record's changes on `changes`, in the
//! order they were written, and marks them published.
//!
//! The changes themselves are written by the database, in the transaction
//! that makes each one (see `record::outbox`), so none is missed and none
//! is invented. The relay is the only way out of the table: it reads what
//! is not published yet, publishes it with the idempotent producer (keyed
//! by order, so one order's changes stay in order on one partition), waits
//! for the broker's acks, and only then marks the rows. A crash in between
//! publishes those rows again under the same change ids, which the notifier
//! deduplicates.
//!
//! One relay runs per database: a settler relays while its connection
//! holds the database's named lock (`GET_LOCK`); the others wait for it.
//! The lock goes with the connection, so a settler that dies or loses
//! MySQL lets another take over.

use std::sync::Arc;
use std::time::Duration;

use dropline::kafka::{Publisher, Record};
use sqlx::{Connection, MySqlConnection, MySqlPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::{OUTBOX_LAG, OUTBOX_PUBLISHED, OUTBOX_RELAYING};
use crate::record::outbox;

/// Rows published at once.
const BATCH: u32 = 500;

/// How long a settler that is not the relay waits before it tries again,
/// and how long the relay waits after a failure.
const RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("mysql: {0}")]
    Mysql(#[from] sqlx::Error),
    #[error(transparent)]
    Unreadable(#[from] outbox::Unreadable),
    #[error("publishing change {change_id}: {error}")]
    Publish { change_id: uuid::Uuid, error: dropline::kafka::PublishError },
}

pub struct Relay {
    pub db: MySqlPool,
    pub publisher: Publisher,
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
        while !outbox::lead(&mut conn).await? {
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
            let rows = outbox::unpublished(conn, BATCH).await?;
            let oldest = rows.first().map(|r| (chrono::Utc::now() - r.changed_at).num_milliseconds());
            ::metrics::gauge!(OUTBOX_LAG.name).set(oldest.unwrap_or(0).max(0) as f64 / 1000.0);
            if rows.is_empty() {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(self.poll) => {}
                }
                continue;
            }
            let seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
            let changes = rows.into_iter().map(outbox::Row::change).collect::<Result<Vec<_>, _>>()?;
            let encoded: Vec<(String, Vec<u8>)> =
                changes.iter().map(|c| (c.key(), serde_json::to_vec(c).expect("changes serialize"))).collect();
            let sent = self
                .publisher
                .publish_all(encoded.iter().map(|(key, payload)| Record::new(&self.topic, key, payload)))
                .await;
            for (change, result) in changes.iter().zip(sent) {
                result.map_err(|error| RelayError::Publish { change_id: change.change_id, error })?;
            }
            outbox::mark_published(conn, &seqs).await?;
            ::metrics::counter!(OUTBOX_PUBLISHED.name).increment(seqs.len() as u64);
        }
    }
}
