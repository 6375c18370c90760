//! Rebuilding an event's ledger from the record after Redis lost it (came
//! back empty, or the event's keys are gone) or fell behind it (came back
//! without its last writes). The reconciler runs it on its own; operators
//! run `dropctl rebuild`.
//!
//! The order of steps is what makes it safe:
//! 1. Fence the event: allocation and hold changes are refused (the stages
//!    retry), so nothing new is decided while the ledger is rebuilt.
//! 2. Wait out the allocators' in-flight publishes: an allocator marks an
//!    event in Redis before it decides and unmarks it once Kafka has the
//!    decisions, so a decision taken before the fence is on Kafka when the
//!    mark is gone. A mark not renewed for `in_flight_grace` belongs to an
//!    allocator that died.
//! 3. Wait until the settler group has committed past every decision and
//!    order change on Kafka at that point: MySQL then has them all.
//! 4. Read the event, its orders with their units, payments and decided
//!    intents from MySQL, and write stock, free units, holds (with their
//!    deadlines), per-user counts and decisions (the intents' idempotency
//!    state) back in one MULTI/EXEC. What changed is logged.
//! 5. Lift the fence. Queued intents are decided on the rebuilt ledger;
//!    redelivered ones find their earlier decision.
//!
//! If a step fails the fence is lifted and nothing was changed; the rebuild
//! can simply run again. Only one rebuild of an event runs at a time (the
//! fence is taken only if free, with a token of its own). The fence is
//! renewed while the rebuild runs, so a slow one keeps it; a rebuild that
//! dies leaves it to expire after `fence_ttl_secs`. The restore applies only
//! under the rebuild's own fence, and only its owner lifts it.

use std::collections::HashMap;
use std::time::Duration;

use dropline::config::KafkaArgs;
use dropline::events::Event;
use dropline::kafka::{GroupOffsets, PublishError, Publisher, Record};
use dropline::messages::{OrderState, OutcomeKind, Topics};
use dropline::stock::{Hold, Ledger, Restore, StockLevels, Verdict};
use rdkafka::error::KafkaError;
use sqlx::MySqlPool;
use uuid::Uuid;

use crate::record::{intents, orders};

/// How a rebuild waits for the rest of the pipeline.
#[derive(Debug, Clone)]
pub struct RebuildOptions {
    /// The settler consumer group whose progress proves MySQL is complete.
    pub settler_group: String,
    /// How long an allocator's in-flight mark counts without renewal: past
    /// it, the allocator is taken for dead (it renews its marks every second
    /// while it publishes, and pauses at most 2 s between attempts).
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
    Kafka(#[from] KafkaError),
    #[error("publishing: {0}")]
    Publish(#[from] PublishError),
    #[error("the settlers did not catch up within {0:?}")]
    NotCaughtUp(Duration),
    #[error("the rebuild was stopped by shutdown; nothing was changed")]
    Cancelled,
    #[error("allocators were still publishing decisions of the event after {0:?}")]
    StillPublishing(Duration),
    #[error("the record is inconsistent: {0}")]
    Record(String),
}

/// The broker as a rebuild uses it: where it publishes the holds Redis
/// ended and MySQL does not know of yet, and where it watches the settlers
/// catch up.
pub struct Broker<'a> {
    pub kafka: &'a KafkaArgs,
    pub publisher: &'a Publisher,
    pub topics: &'a Topics,
}

/// Rebuilds `event_id`'s ledger; returns the counters it was rebuilt with.
pub async fn rebuild(
    db: &MySqlPool,
    ledger: &Ledger,
    broker: &Broker<'_>,
    options: &RebuildOptions,
    event_id: u64,
    why: &str,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<StockLevels, RebuildError> {
    // An event the record lacks is not fenced at all.
    Event::load(db, event_id).await?.ok_or(RebuildError::UnknownEvent(event_id))?;
    let before = ledger.levels(event_id).await?;
    tracing::warn!(event_id, ?before, why, "rebuilding the event's ledger from MySQL; sales of the event are fenced");
    let Some(fence) = ledger.fence(event_id, options.fence_ttl_secs).await? else {
        return Err(RebuildError::InProgress(event_id));
    };
    let steps = async {
        wait_for_allocators(ledger, event_id, options).await?;
        carry_forward(db, ledger, broker, event_id).await?;
        wait_for_settlers(broker.kafka, broker.topics, &options.settler_group, options.catch_up_timeout).await?;
        // Read again now that the ledger is fenced: a host's change of
        // capacity or pause that wrote the ledger first is committed by
        // then (see `Event::load_settled`).
        let event = Event::load_settled(db, event_id).await?.ok_or(RebuildError::UnknownEvent(event_id))?;
        let restore = load(db, &event).await?;
        let old = ledger.holds(event_id).await?;
        let levels = ledger.restore(&fence, &restore).await?;
        Ok::<_, RebuildError>((restore, old, levels))
    };
    // Renew the fence at a third of its lifetime while the steps run, in a
    // task of its own: some steps block on the broker's client.
    let renew_every = Duration::from_secs((options.fence_ttl_secs / 3).max(1));
    let renewing = {
        let (ledger, fence, ttl) = (ledger.clone(), fence.clone(), options.fence_ttl_secs);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(renew_every).await;
                match ledger.renew_fence(&fence, ttl).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::error!(event_id, "the rebuild's fence was lost; the restore will not apply");
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, event_id, "renewing the rebuild's fence failed"),
                }
            }
        })
    };
    let rebuilt = tokio::select! {
        r = steps => r,
        _ = shutdown.cancelled() => Err(RebuildError::Cancelled),
    };
    renewing.abort();
    // Lifted either way: a rebuild that failed changed nothing (the restore
    // is one MULTI/EXEC), and the next attempt fences again.
    if !ledger.unfence(&fence).await? {
        tracing::warn!(event_id, "the rebuild's fence had expired before it was lifted");
    }
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

/// Publishes every hold that Redis has ended (paid, cancelled, expired) while
/// MySQL still has it held, before the ledger is rebuilt from MySQL. Such a
/// hold's own order change was lost (the publish after a payment, a cancel
/// or an expiry failed, and its caller was told to retry), and rebuilding
/// from MySQL alone would put its units back on hold over an outcome that
/// happened. The settler's upserts only move an order forward, so this is
/// harmless for a hold whose event is merely late.
async fn carry_forward(
    db: &MySqlPool,
    ledger: &Ledger,
    broker: &Broker<'_>,
    event_id: u64,
) -> Result<(), RebuildError> {
    let live = orders::live(db, event_id).await?;
    if live.is_empty() {
        return Ok(());
    }
    let mut carried = 0;
    for (order_id, hold) in ledger.holds(event_id).await? {
        let id = order_id.to_string();
        // Held in the record and ended in the ledger; or paid in the record
        // and cancelled with its refund in the ledger.
        let carry = match live.get(&id) {
            Some(OrderState::Held) => hold.state.is_final(),
            Some(OrderState::Paid) => hold.state == OrderState::Cancelled && hold.refund_cents.is_some(),
            _ => false,
        };
        if !carry {
            continue;
        }
        let event = hold.order_event(order_id, event_id, None);
        let payload = serde_json::to_vec(&event).expect("messages serialize");
        broker.publisher.publish(Record::new(&broker.topics.order_changes, &id, &payload)).await?;
        carried += 1;
    }
    if carried > 0 {
        tracing::warn!(
            event_id,
            carried,
            "published holds Redis had ended and MySQL did not know of, before the rebuild"
        );
    }
    Ok(())
}

/// Waits until no allocator is publishing decisions of the event it took
/// before the fence.
async fn wait_for_allocators(ledger: &Ledger, event_id: u64, options: &RebuildOptions) -> Result<(), RebuildError> {
    let stale_after_ms = options.in_flight_grace.as_millis() as i64;
    let deadline = tokio::time::Instant::now() + options.catch_up_timeout;
    while ledger.in_flight(event_id, stale_after_ms).await? > 0 {
        if tokio::time::Instant::now() >= deadline {
            return Err(RebuildError::StillPublishing(options.catch_up_timeout));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Waits until the settler group's committed offsets reach the end of
/// every partition of the topics it consumes, as the ends stand now.
pub async fn wait_for_settlers(
    kafka: &KafkaArgs,
    topics: &Topics,
    group: &str,
    timeout: Duration,
) -> Result<(), RebuildError> {
    let probe = GroupOffsets::new(kafka, group, Duration::from_secs(10))?;
    let consumed = [topics.decisions.clone(), topics.order_changes.clone()];
    let ends = probe.read(&consumed).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let now = probe.read(&consumed).await?;
        let behind = ends.iter().any(|end| {
            let at = now.iter().find(|p| p.topic == end.topic && p.partition == end.partition);
            at.and_then(|p| p.committed).unwrap_or(0) < end.high
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
    let orders = orders::of_event(db, event.id).await?;
    let intents = intents::of_event(db, event.id).await?;

    let mut holds = Vec::with_capacity(orders.len());
    let mut held_orders: HashMap<Uuid, (i64, u64, Vec<u32>)> = HashMap::new();
    for o in orders {
        let id = uuid(&o.order_id)?;
        let state = o.state;
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
                payment_started_at_ms: o.payment_started_at.map(|t| t.timestamp_millis()),
                // Its refund, if it had one, is in the record already.
                refund_cents: None,
            },
        ));
    }
    let mut decisions = Vec::with_capacity(intents.len());
    for i in intents {
        let id = uuid(&i.intent_id)?;
        let decided_at_ms = i.decided_at.timestamp_millis();
        let verdict = if i.outcome == OutcomeKind::Held {
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
            let reason = i.reject_reason.ok_or_else(|| RebuildError::Record(format!("intent {id} has no reason")))?;
            Verdict::Rejected { reason, decided_at_ms }
        };
        decisions.push((id, verdict));
    }
    Ok(Restore { rules: event.rules(), holds, decisions })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record this version cannot read stops the rebuild; it never
    /// restores a guess. (States and reasons are read through their
    /// `FromStr`, tested in `dropline::messages`.)
    #[test]
    fn unit_lists_and_ids_from_the_record_are_read_strictly() {
        assert_eq!(parse_units(Some("3,1,2")).unwrap(), [3, 1, 2]);
        assert_eq!(parse_units(None).unwrap(), [0u32; 0]);
        assert_eq!(parse_units(Some("")).unwrap(), [0u32; 0]);
        for bad in ["1,x", "1,-2", "1;2", "4294967296"] {
            assert!(matches!(parse_units(Some(bad)), Err(RebuildError::Record(_))), "{bad}");
        }
        assert!(matches!(uuid("not-a-uuid"), Err(RebuildError::Record(_))));
    }
}
