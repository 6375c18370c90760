//! Ledger drift: the Redis ledger (the fast path) against MySQL (the
//! record), per event. While intents flow the two differ by what is still in
//! Kafka, for a few seconds; a difference that lasts means a lost or doubled
//! effect, and the `dropline_settler_ledger_drift_units` alert fires. This
//! only measures; repairing is the reconciler's job.
//!
//! Events compared: those whose sale is open or closed less than a day ago,
//! at most `MAX_EVENTS`, which bounds the `event_id` label.

use std::collections::HashMap;
use std::time::Duration;

use dropline::stock::Ledger;
use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;

use dropline::config::KafkaArgs;

use crate::metrics::{DRIFT, REBUILDS};
use crate::rebuild::RebuildOptions;

const MAX_EVENTS: u32 = 200;

/// Redis minus MySQL units, held and sold, for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drift {
    pub held: i64,
    pub sold: i64,
}

/// One comparison of every current event.
#[derive(Debug, Default)]
pub struct Measurement {
    pub drift: HashMap<u64, Drift>,
    /// Current events with no ledger in Redis: lost, or never pre-warmed.
    pub missing: Vec<u64>,
}

/// Compares every current event once.
pub async fn measure(db: &MySqlPool, ledger: &Ledger) -> Result<Measurement, anyhow::Error> {
    let events: Vec<(u64,)> = sqlx::query_as(
        "SELECT id FROM events WHERE sale_opens_at <= UTC_TIMESTAMP(3) \
         AND sale_closes_at >= UTC_TIMESTAMP(3) - INTERVAL 1 DAY ORDER BY id DESC LIMIT ?",
    )
    .bind(MAX_EVENTS)
    .fetch_all(db)
    .await?;
    let mut out = Measurement::default();
    for (event_id,) in events {
        let Some(redis) = ledger.levels(event_id).await? else {
            out.missing.push(event_id);
            continue;
        };
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT CAST(state AS CHAR), CAST(SUM(quantity) AS SIGNED) FROM orders \
             WHERE event_id = ? AND state IN ('held', 'paid') GROUP BY state",
        )
        .bind(event_id)
        .fetch_all(db)
        .await?;
        let mysql = |state: &str| rows.iter().find(|(s, _)| s == state).map_or(0, |(_, n)| *n);
        out.drift.insert(
            event_id,
            Drift { held: redis.held as i64 - mysql("held"), sold: redis.sold as i64 - mysql("paid") },
        );
    }
    Ok(out)
}

/// Measures every `every` and exports the gauges, until shutdown. A current
/// event without a ledger is rebuilt from MySQL (see [`crate::rebuild`]):
/// this is how a Redis that came back empty heals without an operator.
pub async fn watch(
    db: MySqlPool,
    ledger: Ledger,
    kafka: KafkaArgs,
    rebuild: RebuildOptions,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match measure(&db, &ledger).await {
            Ok(m) => {
                for event_id in m.missing {
                    ::metrics::counter!(REBUILDS).increment(1);
                    let rebuilt = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        r = crate::rebuild::rebuild(&db, &ledger, &kafka, &rebuild, event_id) => r,
                    };
                    if let Err(e) = rebuilt {
                        tracing::error!(error = %e, event_id, "rebuilding a lost ledger failed; retrying next pass");
                    }
                }
                for (event_id, d) in m.drift {
                    let id = event_id.to_string();
                    ::metrics::gauge!(DRIFT, "event_id" => id.clone(), "state" => "held").set(d.held as f64);
                    ::metrics::gauge!(DRIFT, "event_id" => id, "state" => "sold").set(d.sold as f64);
                }
            }
            Err(e) => tracing::warn!(error = %e, "measuring ledger drift failed"),
        }
    }
}
