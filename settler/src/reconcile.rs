//! The reconciler: it compares the Redis ledger (the fast path) with MySQL
//! (the record) for every current event, exports the difference, and
//! repairs Redis from the record when the two truly disagree.
//!
//! While intents flow the two differ by what is still in Kafka, for a few
//! seconds. A pass repairs an event (a fenced rebuild, see
//! [`crate::rebuild`]) when:
//! - its ledger is missing (Redis came back empty);
//! - an allocator asked (it found the ledger missing or damaged);
//! - its ledger is damaged (its counters and unit numbers disagree);
//! - the record voided a hold the ledger gave (Redis came back behind);
//! - the same non-zero drift lasted `repair_after` passes and the settlers
//!   have recorded everything on Kafka, so no message in flight explains it.
//!
//! It is also the backstop for holds: a hold still held in the record past
//! its deadline plus `overdue_grace` (its expiry was lost with a Redis that
//! forgot it, say) is expired through the ledger and its end published like
//! the expirer would.
//!
//! Events compared: those whose sale is open or closed less than a day ago,
//! at most `MAX_EVENTS`, which bounds the `event_id` label.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use dropline::config::KafkaArgs;
use dropline::kafka::{Publisher, Record};
use dropline::messages::{OrderState, Topics};
use dropline::stock::{EndOutcome, Ledger};
use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::metrics::{DRIFT, OVERDUE_ENDED, REBUILDS};
use crate::rebuild::RebuildOptions;
use crate::record::{events, orders};

const MAX_EVENTS: u32 = 200;

/// Redis minus MySQL units, held and sold, for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drift {
    pub held: i64,
    pub sold: i64,
}

impl Drift {
    pub fn is_zero(&self) -> bool {
        self.held == 0 && self.sold == 0
    }
}

/// One comparison of every current event.
#[derive(Debug, Default)]
pub struct Measurement {
    pub drift: HashMap<u64, Drift>,
    /// Current events with no ledger in Redis: lost, or never pre-warmed.
    pub missing: Vec<u64>,
    /// Current events whose ledger cannot decide, and why.
    pub damaged: Vec<(u64, String)>,
}

/// Compares every current event once.
pub async fn measure(db: &MySqlPool, ledger: &Ledger) -> Result<Measurement, anyhow::Error> {
    measure_events(db, ledger, &events::current(db, MAX_EVENTS).await?).await
}

async fn measure_events(db: &MySqlPool, ledger: &Ledger, events: &[u64]) -> Result<Measurement, anyhow::Error> {
    let mut out = Measurement::default();
    for &event_id in events {
        let Some(redis) = ledger.levels(event_id).await? else {
            out.missing.push(event_id);
            continue;
        };
        if let Some(why) = ledger.damage(event_id).await? {
            out.damaged.push((event_id, why));
        }
        out.drift.insert(event_id, drift_of(db, event_id, redis).await?);
    }
    Ok(out)
}

async fn drift_of(db: &MySqlPool, event_id: u64, redis: dropline::stock::StockLevels) -> Result<Drift, sqlx::Error> {
    let rows = orders::live_units(db, event_id).await?;
    let mysql = |state| rows.iter().find(|(s, _)| *s == state).map_or(0, |(_, n)| *n);
    Ok(Drift { held: redis.held as i64 - mysql(OrderState::Held), sold: redis.sold as i64 - mysql(OrderState::Paid) })
}

/// How the reconciler runs.
#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    pub every: Duration,
    /// Passes the same drift must last before it is repaired.
    pub repair_after: u32,
    /// How long past its deadline a hold may stay held in the record
    /// before the reconciler ends it.
    pub overdue_grace: Duration,
    pub rebuild: RebuildOptions,
}

/// Why the reconciler repairs an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    Missing,
    Damaged(String),
    Refused,
    Drift(Drift, u32),
    LostHold(Uuid),
    /// A stage found the ledger missing or damaged and asked.
    Requested(String),
}

impl Repair {
    fn label(&self) -> &'static str {
        match self {
            Repair::Missing => "missing",
            Repair::Damaged(_) => "damaged",
            Repair::Refused => "refused",
            Repair::Drift(..) => "drift",
            Repair::LostHold(_) => "lost_hold",
            Repair::Requested(_) => "requested",
        }
    }
}

impl std::fmt::Display for Repair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Repair::Missing => write!(f, "the event has no ledger in Redis"),
            Repair::Damaged(why) => write!(f, "the ledger is damaged: {why}"),
            Repair::Refused => write!(f, "MySQL voided a hold the ledger gave, so the ledger is behind"),
            Repair::Drift(d, passes) => write!(
                f,
                "Redis counts {:+} held and {:+} sold units against MySQL for {passes} passes with the settlers caught up",
                d.held, d.sold
            ),
            Repair::LostHold(order) => write!(f, "hold {order} is held in MySQL past its deadline but Redis lacks it"),
            Repair::Requested(why) => write!(f, "an allocator asked: {why}"),
        }
    }
}

pub struct Reconciler {
    pub db: MySqlPool,
    pub ledger: Ledger,
    pub kafka: KafkaArgs,
    pub publisher: Publisher,
    pub topics: Topics,
    pub options: ReconcileOptions,
    /// Events whose holds the settler just voided.
    pub voided: Arc<Voided>,
}

/// Events whose holds the settler voided since the reconciler last looked:
/// a set, so it stays as small as the number of events however many holds
/// are voided.
#[derive(Default)]
pub struct Voided {
    events: std::sync::Mutex<BTreeSet<u64>>,
    notify: tokio::sync::Notify,
}

impl Voided {
    pub fn add(&self, event_id: u64) {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).insert(event_id);
        self.notify.notify_one();
    }

    fn take(&self) -> BTreeSet<u64> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Reconciler {
    /// Runs a pass every `options.every` (and at once when the settler
    /// reports a voided hold), until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.options.every);
        let mut seen: HashMap<u64, (Drift, u32)> = HashMap::new();
        // Repairs that failed, tried again on the next pass: a void or a
        // request is not found again by measuring.
        let mut retry: BTreeMap<u64, Repair> = BTreeMap::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                _ = self.voided.notify.notified() => {}
            }
            let mut repairs = std::mem::take(&mut retry);
            for event_id in self.voided.take() {
                repairs.insert(event_id, Repair::Refused);
            }
            match self.ledger.take_rebuild_requests().await {
                Ok(requests) => repairs.extend(requests.into_iter().map(|(e, why)| (e, Repair::Requested(why)))),
                Err(e) => tracing::warn!(error = %e, "reading rebuild requests failed"),
            }
            match self.pass(&mut seen).await {
                Ok(found) => {
                    for (event_id, why) in found {
                        repairs.entry(event_id).or_insert(why);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "a reconciliation pass failed"),
            }
            for (event_id, why) in repairs {
                if shutdown.is_cancelled() {
                    return;
                }
                // Not dropped on shutdown: the rebuild sees the token itself
                // and lifts its fence before it returns.
                let repaired = self.repair(event_id, &why, &shutdown).await;
                seen.remove(&event_id);
                match repaired {
                    Ok(()) => {}
                    Err(crate::rebuild::RebuildError::UnknownEvent(_)) => {
                        tracing::error!(event_id, %why, "the record has no such event; its intents are dead-lettered");
                        if let Err(e) = self.ledger.mark_unknown_event(event_id).await {
                            tracing::warn!(error = %e, event_id, "recording an unknown event failed");
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, event_id, %why, "repairing a ledger failed; retrying next pass");
                        retry.insert(event_id, why);
                    }
                }
            }
        }
    }

    /// Measures, exports the gauges, ends overdue holds, and returns the
    /// events that need a repair.
    async fn pass(&self, seen: &mut HashMap<u64, (Drift, u32)>) -> Result<Vec<(u64, Repair)>, anyhow::Error> {
        let events = events::current(&self.db, MAX_EVENTS).await?;
        let m = measure_events(&self.db, &self.ledger, &events).await?;
        let mut repairs: Vec<(u64, Repair)> = m.missing.into_iter().map(|e| (e, Repair::Missing)).collect();
        repairs.extend(m.damaged.into_iter().map(|(e, why)| (e, Repair::Damaged(why))));
        seen.retain(|event_id, _| m.drift.contains_key(event_id));
        for (&event_id, &d) in &m.drift {
            let id = event_id.to_string();
            ::metrics::gauge!(DRIFT.name, "event_id" => id.clone(), "state" => "held").set(d.held as f64);
            ::metrics::gauge!(DRIFT.name, "event_id" => id, "state" => "sold").set(d.sold as f64);
            if d.is_zero() {
                seen.remove(&event_id);
                continue;
            }
            let passes = match seen.get(&event_id) {
                Some((last, n)) if *last == d => n + 1,
                _ => 1,
            };
            seen.insert(event_id, (d, passes));
            if passes >= self.options.repair_after && self.unexplained(event_id, d).await {
                repairs.push((event_id, Repair::Drift(d, passes)));
            }
        }
        for &event_id in &events {
            repairs.extend(self.end_overdue_holds(event_id).await?);
        }
        Ok(repairs)
    }

    /// Whether a lasting drift survives the settlers catching up: if they
    /// are behind, or the drift changes once they are not, messages in
    /// flight explain it and there is nothing to repair.
    async fn unexplained(&self, event_id: u64, drift: Drift) -> bool {
        let topics = self.kafka.topics();
        let caught_up = crate::rebuild::wait_for_settlers(
            &self.kafka,
            &topics,
            &self.options.rebuild.settler_group,
            Duration::from_secs(2),
        )
        .await;
        if caught_up.is_err() {
            return false;
        }
        match self.ledger.levels(event_id).await {
            Ok(Some(levels)) => drift_of(&self.db, event_id, levels).await.is_ok_and(|now| now == drift),
            _ => false,
        }
    }

    /// Ends the event's holds the record has as held past deadline + grace.
    /// Returns a repair when the ledger has lost such a hold.
    async fn end_overdue_holds(&self, event_id: u64) -> Result<Option<(u64, Repair)>, anyhow::Error> {
        let overdue = orders::held_past(&self.db, event_id, chrono::Utc::now() - self.options.overdue_grace).await?;
        for order in overdue {
            let Ok(order_id) = Uuid::parse_str(&order) else { continue };
            let hold = match self.ledger.expire(event_id, order_id).await {
                Ok(EndOutcome::Ended(hold)) => hold,
                // Redis' clock says it is not due yet: the expirer's job.
                Ok(EndOutcome::NotDue { .. }) => continue,
                Ok(EndOutcome::UnknownOrder) => return Ok(Some((event_id, Repair::LostHold(order_id)))),
                // A missing or fenced ledger is being dealt with already.
                Err(e) => {
                    tracing::debug!(error = %e, event_id, order_id = %order, "cannot end an overdue hold now");
                    continue;
                }
            };
            let event = hold.order_event(order_id, event_id, None);
            let payload = serde_json::to_vec(&event).expect("messages serialize");
            self.publisher.publish(Record::new(&self.topics.order_changes, &order, &payload)).await?;
            ::metrics::counter!(OVERDUE_ENDED.name).increment(1);
            tracing::warn!(event_id, order_id = %order, state = hold.state.as_str(),
                "a hold outlived its deadline in the record; ended it through the ledger and told the settler");
        }
        Ok(None)
    }

    async fn repair(
        &self,
        event_id: u64,
        why: &Repair,
        shutdown: &CancellationToken,
    ) -> Result<(), crate::rebuild::RebuildError> {
        let broker = crate::rebuild::Broker { kafka: &self.kafka, publisher: &self.publisher, topics: &self.topics };
        let rebuilt = crate::rebuild::rebuild(
            &self.db,
            &self.ledger,
            &broker,
            &self.options.rebuild,
            event_id,
            &why.to_string(),
            shutdown,
        )
        .await;
        match rebuilt {
            Ok(_) => {
                ::metrics::counter!(REBUILDS.name, "reason" => why.label()).increment(1);
                Ok(())
            }
            // Another settler's reconciler got there first.
            Err(crate::rebuild::RebuildError::InProgress(_)) => {
                tracing::info!(event_id, %why, "the ledger is being rebuilt by another settler");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}
