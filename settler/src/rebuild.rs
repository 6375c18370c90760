//! Rebuilding an event's ledger from the record after Redis lost it (came
//! back empty, or the event's keys are gone) or fell behind it (came back
//! without its last writes). The reconciler runs it on its own; operators
//! run `dropctl rebuild`.
//!
//! The order of steps is what makes it safe:
//! 1. Fence the event: allocation and hold changes are refused (the stages
//!    retry), so nothing new is decided while the ledger is rebuilt.
//! 2. Wait out the allocators' in-flight publishes: a decision taken just
//!    before the fence reaches Kafka within the producer's message timeout.
//! 3. Wait until the settler group has committed past every decision and
//!    order event on Kafka at that point: MySQL then has them all.
//! 4. Read the event, its orders with their units, payments and decided
//!    intents from MySQL, and write stock, free units, holds (with their
//!    deadlines), per-user counts and decisions (the intents' idempotency
//!    state) back in one MULTI/EXEC. What changed is logged.
//! 5. Lift the fence. Queued intents are decided on the rebuilt ledger;
//!    redelivered ones find their earlier decision.
//!
//! If a step fails the fence is lifted and nothing was changed; the rebuild
//! can simply run again. Only one rebuild of an event runs at a time (the
//! fence is taken only if free); a rebuild that dies leaves the fence to
//! expire after `fence_ttl_secs`.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dropline::config::KafkaArgs;
use dropline::events::Event;
use dropline::messages::{OrderState, RejectReason, Topics};
use dropline::stock::{Hold, Ledger, Restore, StockLevels, Verdict};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::MySqlPool;
use uuid::Uuid;

/// How a rebuild waits for the rest of the pipeline.
#[derive(Debug, Clone)]
pub struct RebuildOptions {
    /// The settler consumer group whose progress proves MySQL is complete.
    pub settler_group: String,
    /// Longest an allocator's decision can still be on its way to Kafka
    /// after the fence (its producer's message timeout, plus a margin).
    pub in_flight_grace: Duration,
    /// How long to wait for the settlers to catch up.
    pub catch_up_timeout: Duration,
    pub fence_ttl_secs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("event {0}'s ledger is being rebuilt already")]
    InProgress(u64),
    #[error("event {0} is not in MySQL")]
    UnknownEvent(u64),
    #[error("mysql: {0}")]
    Mysql(#[from] sqlx::Error),
    #[error(transparent)]
    Ledger(#[from] dropline::stock::LedgerError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("the settlers did not catch up within {0:?}")]
    NotCaughtUp(Duration),
    #[error("the record is inconsistent: {0}")]
    Record(String),
}

/// Rebuilds `event_id`'s ledger; returns the counters it was rebuilt with.
pub async fn rebuild(
    db: &MySqlPool,
    ledger: &Ledger,
    kafka: &KafkaArgs,
    options: &RebuildOptions,
    event_id: u64,
    why: &str,
) -> Result<StockLevels, RebuildError> {
    let event = Event::load(db, event_id).await?.ok_or(RebuildError::UnknownEvent(event_id))?;
    let before = ledger.levels(event_id).await?;
    tracing::warn!(event_id, ?before, why, "rebuilding the event's ledger from MySQL; sales of the event are fenced");
    if !ledger.fence(event_id, options.fence_ttl_secs).await? {
        return Err(RebuildError::InProgress(event_id));
    }
    let rebuilt = async {
        tokio::time::sleep(options.in_flight_grace).await;
        wait_for_settlers(kafka, &kafka.topics(), &options.settler_group, options.catch_up_timeout).await?;
        let restore = load(db, &event).await?;
        let old = ledger.holds(event_id).await?;
        let levels = ledger.restore(event_id, &restore).await?;
        Ok::<_, RebuildError>((restore, old, levels))
    }
    .await;
    // Lifted either way: a rebuild that failed changed nothing (the restore
    // is one MULTI/EXEC), and the next attempt fences again.
    ledger.unfence(event_id).await?;
    let (restore, old, levels) = rebuilt?;
    let changes = log_changes(event_id, &old, &restore);
    tracing::warn!(
        event_id,
        why,
        ?before,
        after = ?levels,
        holds = restore.holds.len(),
        holds_changed = changes,
        decisions = restore.decisions.len(),
        "ledger rebuilt from MySQL; fence lifted"
    );
    Ok(levels)
}

/// Logs each hold whose state the rebuild changed (the first few in
/// full); returns how many changed.
fn log_changes(event_id: u64, old: &HashMap<Uuid, Hold>, restore: &Restore) -> usize {
    const SHOWN: usize = 20;
    let mut changed = 0;
    for (id, hold) in &restore.holds {
        let was = old.get(id).map(|h| h.state.as_str()).unwrap_or("absent");
        if was == hold.state.as_str() {
            continue;
        }
        changed += 1;
        if changed <= SHOWN {
            tracing::warn!(event_id, order_id = %id, was, now = hold.state.as_str(), "rebuild changed a hold");
        }
    }
    let record: std::collections::HashSet<&Uuid> = restore.holds.iter().map(|(id, _)| id).collect();
    for (id, hold) in old.iter().filter(|(id, _)| !record.contains(id)) {
        changed += 1;
        if changed <= SHOWN {
            tracing::warn!(event_id, order_id = %id, was = hold.state.as_str(), now = "absent",
                "rebuild dropped a hold MySQL never recorded");
        }
    }
    changed
}

/// Waits until the settler group's committed offsets reach the end of
/// every partition of the topics it consumes, as the ends stand now.
pub async fn wait_for_settlers(
    kafka: &KafkaArgs,
    topics: &Topics,
    group: &str,
    timeout: Duration,
) -> Result<(), RebuildError> {
    let probe: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", &kafka.brokers).set("group.id", group).create()?;
    let wait = Duration::from_secs(10);
    let mut ends = TopicPartitionList::new();
    for topic in [&topics.decisions, &topics.order_events] {
        let metadata = probe.fetch_metadata(Some(topic), wait)?;
        for t in metadata.topics() {
            for p in t.partitions() {
                let (_, high) = probe.fetch_watermarks(topic, p.id(), wait)?;
                ends.add_partition_offset(topic, p.id(), Offset::Offset(high))?;
            }
        }
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let committed = probe.committed_offsets(ends.clone(), wait)?;
        let behind = ends.elements().iter().any(|end| {
            let at = committed
                .find_partition(end.topic(), end.partition())
                .and_then(|c| match c.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                })
                .unwrap_or(0);
            matches!(end.offset(), Offset::Offset(high) if at < high)
        });
        if !behind {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(RebuildError::NotCaughtUp(timeout));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[derive(sqlx::FromRow)]
struct OrderRow {
    order_id: String,
    user_id: String,
    quantity: u32,
    amount_cents: u64,
    state: String,
    expires_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    payment_id: Option<String>,
    units: Option<String>,
}

#[derive(sqlx::FromRow)]
struct IntentRow {
    intent_id: String,
    outcome: String,
    reject_reason: Option<String>,
    decided_at: DateTime<Utc>,
}

fn parse<T: serde::de::DeserializeOwned>(value: &str) -> Result<T, RebuildError> {
    serde_json::from_value(serde_json::Value::String(value.to_owned()))
        .map_err(|_| RebuildError::Record(format!("unexpected value {value:?}")))
}

fn parse_units(raw: Option<&str>) -> Result<Vec<u32>, RebuildError> {
    raw.unwrap_or_default()
        .split(',')
        .filter(|u| !u.is_empty())
        .map(|u| u.parse().map_err(|_| RebuildError::Record(format!("bad unit list {raw:?}"))))
        .collect()
}

fn uuid(raw: &str) -> Result<Uuid, RebuildError> {
    Uuid::parse_str(raw).map_err(|_| RebuildError::Record(format!("bad id {raw:?}")))
}

/// The event's ledger as MySQL records it.
async fn load(db: &MySqlPool, event: &Event) -> Result<Restore, RebuildError> {
    let orders: Vec<OrderRow> = sqlx::query_as(
        "SELECT o.order_id, o.user_id, o.quantity, o.amount_cents, CAST(o.state AS CHAR) AS state, o.expires_at, \
         o.updated_at, (SELECT MIN(p.payment_id) FROM payments p WHERE p.order_id = o.order_id \
         AND p.disposition = 'captured') AS payment_id, (SELECT GROUP_CONCAT(u.unit_no) FROM order_units u \
         WHERE u.order_id = o.order_id) AS units FROM orders o WHERE o.event_id = ?",
    )
    .bind(event.id)
    .fetch_all(db)
    .await?;
    let intents: Vec<IntentRow> = sqlx::query_as(
        "SELECT intent_id, CAST(outcome AS CHAR) AS outcome, reject_reason, decided_at FROM intents WHERE event_id = ?",
    )
    .bind(event.id)
    .fetch_all(db)
    .await?;

    let mut holds = Vec::with_capacity(orders.len());
    let mut held_orders: HashMap<Uuid, (i64, u64, Vec<u32>)> = HashMap::new();
    for o in orders {
        let id = uuid(&o.order_id)?;
        let state: OrderState = parse(&o.state)?;
        let expires_at_ms = o.expires_at.timestamp_millis();
        let units = parse_units(o.units.as_deref())?;
        held_orders.insert(id, (expires_at_ms, o.amount_cents, units.clone()));
        holds.push((
            id,
            Hold {
                user_id: o.user_id,
                quantity: o.quantity,
                amount_cents: o.amount_cents,
                state,
                expires_at_ms,
                ended_at_ms: state.is_final().then(|| o.updated_at.timestamp_millis()),
                payment_id: o.payment_id.filter(|_| state == OrderState::Paid),
                // A live order's units; an ended one's went back.
                units: if state.is_live() { units } else { Vec::new() },
            },
        ));
    }
    let mut decisions = Vec::with_capacity(intents.len());
    for i in intents {
        let id = uuid(&i.intent_id)?;
        let decided_at_ms = i.decided_at.timestamp_millis();
        let verdict = if i.outcome == "held" {
            // A held decision's order is written in the same transaction.
            let (expires_at_ms, amount_cents, units) = held_orders
                .get(&id)
                .ok_or_else(|| RebuildError::Record(format!("intent {id} was held but has no order")))?;
            Verdict::Held {
                expires_at_ms: *expires_at_ms,
                amount_cents: *amount_cents,
                decided_at_ms,
                units: units.clone(),
            }
        } else {
            let reason: RejectReason = parse(i.reject_reason.as_deref().unwrap_or_default())?;
            Verdict::Rejected { reason, decided_at_ms }
        };
        decisions.push((id, verdict));
    }
    Ok(Restore { rules: event.rules(), holds, decisions })
}
