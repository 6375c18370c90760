//! The expirer: releases holds that were not paid in time.
//!
//! The allocator publishes a delayed message for every hold on
//! `hold-expiry`. The expirer reads them as they come, keeps them in its
//! [`schedule`] until their deadline, and then asks the ledger to expire the
//! hold. The hold script ends a hold exactly once, whoever asks first (a
//! late payment, a cancel, or this), so a redelivered expiry message is
//! harmless. Whatever final state it finds is published on `order-events`,
//! which also repairs a cancel or payment whose own publish was lost.
//!
//! The consumer never sleeps on a deadline: it keeps polling, pausing a
//! partition only when too many of its holds wait in memory, so the group
//! never drops it for missing `max.poll.interval.ms`.
//!
//! - [`schedule`]: the per-partition delay queue and its offset rule.
//! - [`config`]: settings; [`metrics`]: metric names.

pub mod config;
pub mod metrics;
pub mod schedule;

use std::time::Duration;

use dropline::kafka::{self, DeadLetters, GroupContext, Publisher, Record, WhenFull};
use dropline::messages::{now_ms, HoldExpiry, Topics};
use dropline::stage::Stage;
use dropline::stock::{EndOutcome, Ledger};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::TopicPartitionList;
use tokio_util::sync::CancellationToken;

pub use config::{ExpirerConfig, DEFAULT_OPS_PORT};

use crate::metrics::{HOLDS_ENDED, LATENESS, PAUSED, PENDING};
use crate::schedule::{Due, PartitionKey, Schedule, Waiting};

#[derive(Debug, thiserror::Error)]
pub enum ExpirerError {
    #[error(transparent)]
    Stage(#[from] dropline::stage::StageError),
    #[error("redis pool: {0}")]
    RedisPool(#[from] deadpool_redis::CreatePoolError),
    #[error(transparent)]
    KafkaSetup(#[from] kafka::KafkaSetupError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// How long a hold whose release failed waits before it is tried again.
const FAILED_RETRY_MS: i64 = 1000;

/// Holds released concurrently in one tick.
const RELEASES_PER_TICK: usize = 512;

struct Expirer {
    ledger: Ledger,
    publisher: Publisher,
    topics: Topics,
}

/// What became of one due hold.
enum Released {
    Done,
    NotDue(i64),
    Failed,
}

pub async fn run(config: ExpirerConfig, shutdown: CancellationToken) -> Result<(), ExpirerError> {
    let ready = Stage::start(&config, &shutdown).await?.ready;
    let topics = config.kafka.topics();
    kafka::ensure_topics(&config.kafka, &topics.all()).await?;
    let publisher = Publisher::new(&config.kafka, "expirer-producer", WhenFull::Wait)?;
    let dead_letters = DeadLetters::new(publisher.clone(), topics.dead_letter.clone(), "expirer");
    let consumer = kafka::subscribed(
        &config.kafka,
        &config.group_id,
        "expirer-consumer",
        &[&topics.hold_expiry],
        &ready,
        &shutdown,
    )?;
    let expirer = Expirer { ledger: Ledger::new(config.redis.pool()?, &config.redis.key_prefix), publisher, topics };
    let mut schedule = Schedule::new(config.max_pending_per_partition);
    ready.set(true);
    tracing::info!("expirer consuming");

    let mut tick = tokio::time::interval(Duration::from_millis(config.tick_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            received = consumer.recv() => match received {
                Ok(m) => {
                    let m = m.detach();

                    let hold = match decode(&m) {
                        Ok(hold) => Some(Waiting { hold, request_id: kafka::request_id(&m) }),
                        Err(reason) => {
                            let parked = kafka::retry_until("dead-letter", &shutdown, || dead_letters.park(&m, "undecodable", &reason)).await;
                            if parked.is_none() { break; }
                            None
                        }
                    };
                    let revoked = consumer.context().take_revoked();
                    schedule.add_after(revoked, (m.topic().to_owned(), m.partition()), m.offset(), hold);
                    apply_flow(&consumer, &mut schedule);
                }
                Err(e) => {
                    if let Some(fatal) = kafka::fatal(&consumer) {
                        ready.set(false);
                        return Err(fatal.into());
                    }
                    tracing::warn!(error = %e, "kafka receive failed");
                }
            },
            _ = tick.tick() => {
                forget_revoked(&consumer, &mut schedule);
                expirer.release_due(&mut schedule).await;
                let committable = schedule.take_committable();
                kafka::store_offsets(&consumer, committable.iter().map(|((t, p), o)| (t.as_str(), *p, *o)));
                apply_flow(&consumer, &mut schedule);
                ::metrics::gauge!(PENDING).set(schedule.waiting() as f64);
                ::metrics::gauge!(PAUSED).set(schedule.paused() as f64);
            }
        }
    }
    ready.set(false);
    // Holds still waiting stay uncommitted: the next owner reads them again.
    kafka::commit_stored(&consumer);
    tracing::info!(waiting = schedule.waiting(), "expirer stopped");
    Ok(())
}

impl Expirer {
    async fn release_due(&self, schedule: &mut Schedule) {
        let due = schedule.due(now_ms(), RELEASES_PER_TICK);
        if due.is_empty() {
            return;
        }
        let results = futures::future::join_all(due.iter().map(|d| self.release(d))).await;
        let now = now_ms();
        for (d, result) in due.iter().zip(results) {
            record(schedule, d, result, now);
        }
    }

    async fn release(&self, due: &Due) -> Released {
        let HoldExpiry { order_id, event_id, .. } = due.hold;
        let hold = match self.ledger.expire(event_id, order_id).await {
            Ok(EndOutcome::Ended(hold)) => hold,
            Ok(EndOutcome::NotDue { remaining_ms }) => return Released::NotDue(now_ms() + remaining_ms as i64),
            Ok(EndOutcome::UnknownOrder) => {
                // Only a lost, rolled-back or retired ledger lacks a hold
                // it decided. If the record still has it held, the settler's
                // reconciler rebuilds the ledger and ends the hold itself.
                tracing::warn!(%order_id, event_id, "hold not in the ledger at its deadline");
                ::metrics::counter!(HOLDS_ENDED, "state" => "unknown").increment(1);
                return Released::Done;
            }
            Err(e) => {
                tracing::warn!(error = %e, %order_id, "expiring a hold failed; retrying next tick");
                return Released::Failed;
            }
        };
        let event = hold.order_event(order_id, event_id, None);
        let payload = serde_json::to_vec(&event).expect("messages serialize");
        let key = order_id.to_string();
        let record = Record::new(&self.topics.order_events, &key, &payload).request_id(due.request_id.as_deref());
        let sent = self.publisher.publish(record).await;
        if let Err(e) = sent {
            tracing::warn!(error = %e, %order_id, "publishing an ended hold failed; retrying next tick");
            return Released::Failed;
        }
        ::metrics::counter!(HOLDS_ENDED, "state" => hold.state.as_str()).increment(1);
        tracing::debug!(request_id = due.request_id.as_deref(), %order_id, state = hold.state.as_str(), "hold ended");
        if let Some(ended) = hold.ended_at_ms.filter(|_| hold.state == dropline::messages::OrderState::Expired) {
            ::metrics::histogram!(LATENESS).record((ended - hold.expires_at_ms).max(0) as f64 / 1000.0);
        }
        Released::Done
    }
}

/// Records in `schedule` what became of a due hold.
fn record(schedule: &mut Schedule, due: &Due, released: Released, now_ms: i64) {
    match released {
        Released::Done => schedule.done(&due.partition, due.offset),
        Released::NotDue(at) => schedule.retry_at(&due.partition, due.offset, at),
        // Back off, behind the holds of other events: a ledger that stays
        // fenced or unreachable for one event must not keep the earliest
        // slots of every tick and starve the rest.
        Released::Failed => schedule.retry_at(&due.partition, due.offset, now_ms + FAILED_RETRY_MS),
    }
}

fn forget_revoked(consumer: &StreamConsumer<GroupContext>, schedule: &mut Schedule) {
    for revoked in consumer.context().take_revoked() {
        schedule.forget(&revoked);
    }
}

fn apply_flow(consumer: &StreamConsumer<GroupContext>, schedule: &mut Schedule) {
    let (pause, resume) = schedule.flow_changes();
    for (parts, pausing) in [(pause, true), (resume, false)] {
        if parts.is_empty() {
            continue;
        }
        let tpl = tpl_of(&parts);
        let result = if pausing { consumer.pause(&tpl) } else { consumer.resume(&tpl) };
        match result {
            Ok(()) => {
                tracing::info!(partitions = ?parts, paused = pausing, "partition flow changed")
            }
            Err(e) => tracing::warn!(error = %e, "pause/resume failed"),
        }
    }
}

fn tpl_of(parts: &[PartitionKey]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (topic, partition) in parts {
        tpl.add_partition(topic, *partition);
    }
    tpl
}

fn decode(m: &OwnedMessage) -> Result<HoldExpiry, String> {
    let payload = m.payload().ok_or("empty payload")?;
    serde_json::from_slice(payload).map_err(|e| format!("undecodable hold expiry: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn hold(event_id: u64, deadline: i64) -> Option<Waiting> {
        let hold = HoldExpiry { order_id: Uuid::new_v4(), event_id, expires_at_ms: deadline };
        Some(Waiting { hold, request_id: None })
    }

    #[test]
    fn holds_that_fail_to_release_do_not_starve_the_holds_behind_them() {
        let partition: PartitionKey = ("t".to_owned(), 0);
        let mut schedule = Schedule::new(RELEASES_PER_TICK * 2);
        // A full tick of holds of event 1, whose ledger cannot be reached,
        // falls due before the one hold of event 2.
        let stuck = RELEASES_PER_TICK as i64;
        for offset in 0..stuck {
            schedule.add(partition.clone(), offset, hold(1, 1_000 + offset));
        }
        schedule.add(partition.clone(), stuck, hold(2, 5_000));
        let now = 10_000;
        let first = schedule.due(now, RELEASES_PER_TICK);
        assert!(first.iter().all(|d| d.hold.event_id == 1));
        for d in &first {
            record(&mut schedule, d, Released::Failed, now);
        }
        let next = schedule.due(now, RELEASES_PER_TICK);
        assert_eq!(next.len(), 1, "the failed holds wait out their backoff");
        assert_eq!(next[0].hold.event_id, 2);
        assert_eq!(schedule.due(now + FAILED_RETRY_MS, RELEASES_PER_TICK * 2).len(), RELEASES_PER_TICK + 1);
    }
}
