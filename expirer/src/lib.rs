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
//! It runs on the shared consumer loop (`dropline::kafka::run_consumer`) as
//! a delayed stage: the loop reads, dead-letters what does not decode, hands
//! over revoked partitions, pauses and resumes, and stores the offsets the
//! expirer reports finished; the expirer schedules the holds it is given and
//! releases them as they fall due. The consumer never sleeps on a deadline:
//! it keeps polling, and a partition is paused only while too many of its
//! holds wait in memory, so the group never drops it for missing
//! `max.poll.interval.ms`.
//!
//! The delay queue and its offset rule are the shared
//! `dropline::kafka::Schedule`.
//!
//! - [`config`]: settings; [`metrics`]: metric names.

pub mod config;
pub mod metrics;

use std::time::Duration;

use dropline::kafka::{self, PartitionKey, Publisher, Record};
use dropline::messages::{now_ms, HoldExpiry, Topics};
use dropline::stage::{self, Stage, StageError};
use dropline::stock::{EndOutcome, Ledger};
use rdkafka::message::{Message, OwnedMessage};
use tokio_util::sync::CancellationToken;

pub use config::ExpirerConfig;

use crate::metrics::{HOLDS_ENDED, LATENESS, PENDING};

/// A hold waiting for its deadline, with the request id of the purchase
/// that created it (for the logs and the order change it ends in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub hold: HoldExpiry,
    pub request_id: Option<String>,
}

type Schedule = kafka::Schedule<Waiting>;
type Due = kafka::Due<Waiting>;

/// How long a hold whose release failed waits before it is tried again.
const FAILED_RETRY_MS: i64 = 1000;

/// Holds released concurrently in one tick.
const RELEASES_PER_TICK: usize = 512;

/// Expiry messages taken from the consumer at once. A partition may hold
/// up to this many more than its limit before its pause takes effect.
const ACCEPT_MAX: usize = 512;

struct Expirer {
    ledger: Ledger,
    publisher: Publisher,
    topics: Topics,
    schedule: Schedule,
    tick: Duration,
}

/// What became of one due hold.
enum Released {
    Done,
    NotDue(i64),
    Failed,
}

pub async fn run(config: ExpirerConfig, shutdown: CancellationToken) -> Result<(), StageError> {
    let stage::Consumer { ready, topics, publisher, dead_letters, consumer } =
        Stage::start_consumer(&config, &config.group_id, |t| vec![&t.hold_expiry], &shutdown).await?;
    let mut expirer = Expirer {
        ledger: Ledger::new(config.shared.redis.pool()?, &config.shared.redis.key_prefix),
        publisher,
        topics,
        schedule: Schedule::new(config.max_pending_per_partition),
        tick: Duration::from_millis(config.tick_ms),
    };
    ready.set(true);
    tracing::info!("expirer consuming");
    // Nothing waits for more messages: what is there is scheduled at once.
    let polling = kafka::Polling { stage: "expirer", max: ACCEPT_MAX, linger: Duration::ZERO };
    let ended = kafka::run_consumer(&consumer, &mut expirer, &dead_letters, &polling, &shutdown).await;
    ready.set(false);
    // Holds still waiting stay uncommitted: the next owner reads them again.
    tracing::info!(waiting = expirer.schedule.waiting(), "expirer stopped");
    ended?;
    Ok(())
}

/// The expirer on the consumer loop: each hold read waits in the schedule;
/// the due step releases the holds whose deadline has come.
impl kafka::ConsumerStage for Expirer {
    type Item = Waiting;

    fn decode(&self, m: &OwnedMessage) -> Result<Waiting, String> {
        let payload = m.payload().ok_or("empty payload")?;
        let hold: HoldExpiry = serde_json::from_slice(payload).map_err(|e| format!("undecodable hold expiry: {e}"))?;
        Ok(Waiting { hold, request_id: kafka::request_id(m) })
    }

    async fn accept(&mut self, batch: Vec<(Option<Waiting>, &OwnedMessage)>) -> Option<()> {
        for (waiting, m) in batch {
            let at = waiting.map(|w| (w.hold.expires_at_ms, w));
            self.schedule.add((m.topic().to_owned(), m.partition()), m.offset(), at);
        }
        Some(())
    }

    fn finished(&mut self) -> Vec<(PartitionKey, i64)> {
        self.schedule.take_committable()
    }

    fn due_every(&self) -> Option<Duration> {
        Some(self.tick)
    }

    async fn work_due(&mut self) {
        self.release_due().await;
        ::metrics::gauge!(PENDING.name).set(self.schedule.waiting() as f64);
    }

    fn revoked(&mut self, partitions: &[PartitionKey]) {
        for p in partitions {
            self.schedule.forget(p);
        }
    }

    fn flow(&mut self) -> (Vec<PartitionKey>, Vec<PartitionKey>) {
        self.schedule.flow_changes()
    }
}

impl Expirer {
    async fn release_due(&mut self) {
        let due = self.schedule.due(now_ms(), RELEASES_PER_TICK);
        if due.is_empty() {
            return;
        }
        let results = futures::future::join_all(due.iter().map(|d| self.release(d))).await;
        let now = now_ms();
        for (d, result) in due.iter().zip(results) {
            record(&mut self.schedule, d, result, now);
        }
    }

    async fn release(&self, due: &Due) -> Released {
        let HoldExpiry { order_id, event_id, .. } = due.item.hold;
        let hold = match self.ledger.expire(event_id, order_id).await {
            Ok(EndOutcome::Ended(hold)) => hold,
            Ok(EndOutcome::NotDue { remaining_ms }) => return Released::NotDue(now_ms() + remaining_ms as i64),
            Ok(EndOutcome::UnknownOrder) => {
                // Only a lost, rolled-back or retired ledger lacks a hold
                // it decided. If the record still has it held, the settler's
                // reconciler rebuilds the ledger and ends the hold itself.
                tracing::warn!(%order_id, event_id, "hold not in the ledger at its deadline");
                ::metrics::counter!(HOLDS_ENDED.name, "state" => "unknown").increment(1);
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
        let request_id = due.item.request_id.as_deref();
        let record = Record::new(&self.topics.order_changes, &key, &payload).request_id(request_id);
        let sent = self.publisher.publish(record).await;
        if let Err(e) = sent {
            tracing::warn!(error = %e, %order_id, "publishing an ended hold failed; retrying next tick");
            return Released::Failed;
        }
        ::metrics::counter!(HOLDS_ENDED.name, "state" => hold.state.as_str()).increment(1);
        tracing::debug!(request_id, %order_id, state = hold.state.as_str(), "hold ended");
        if let Some(ended) = hold.ended_at_ms.filter(|_| hold.state == dropline::messages::OrderState::Expired) {
            ::metrics::histogram!(LATENESS.name).record((ended - hold.expires_at_ms).max(0) as f64 / 1000.0);
        }
        Released::Done
    }
}

/// Records in `schedule` what became of a due hold.
fn record(schedule: &mut Schedule, due: &Due, released: Released, now_ms: i64) {
    match released {
        Released::Done => schedule.done(&due.partition, due.offset),
        Released::NotDue(at) => schedule.retry_at(&due.partition, due.offset, at, due.item.clone()),
        // Back off, behind the holds of other events: a ledger that stays
        // fenced or unreachable for one event must not keep the earliest
        // slots of every tick and starve the rest.
        Released::Failed => schedule.retry_at(&due.partition, due.offset, now_ms + FAILED_RETRY_MS, due.item.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn hold(event_id: u64, deadline: i64) -> Option<(i64, Waiting)> {
        let hold = HoldExpiry { order_id: Uuid::new_v4(), event_id, expires_at_ms: deadline };
        Some((deadline, Waiting { hold, request_id: None }))
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
        assert!(first.iter().all(|d| d.item.hold.event_id == 1));
        for d in &first {
            record(&mut schedule, d, Released::Failed, now);
        }
        let next = schedule.due(now, RELEASES_PER_TICK);
        assert_eq!(next.len(), 1, "the failed holds wait out their backoff");
        assert_eq!(next[0].item.hold.event_id, 2);
        assert_eq!(schedule.due(now + FAILED_RETRY_MS, RELEASES_PER_TICK * 2).len(), RELEASES_PER_TICK + 1);
    }
}
