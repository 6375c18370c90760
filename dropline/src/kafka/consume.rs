//! The one consumer loop of every consuming stage. It owns the consumer:
//! polling, decoding (a message that does not decode is dead-lettered at
//! once, so it never blocks its partition), fatal errors, rebalances,
//! pause/resume, the offset store and the metrics of all of it. A stage
//! ([`ConsumerStage`]) supplies only what is its own: how to decode a
//! message, how to take a batch, which offsets it has finished, and,
//! optionally, a step for work that comes due later.
//!
//! Two shapes of stage fit it:
//! - a batch stage ([`super::BatchStage`]: the allocator, the settler)
//!   makes a batch durable as it takes it: every offset of it is finished
//!   at once;
//! - a delayed stage (the expirer) keeps what it takes in memory and
//!   finishes it later, in its due step, in any order. It reports, per
//!   partition, the offset after its finished prefix, so the committed
//!   offset never passes a message whose effect is not durable yet, and it
//!   asks for a partition to be paused while it keeps too much of it.
//!
//! **Rebalances.** librdkafka runs the rebalance callbacks only inside a
//! poll, so a revocation comes between two messages of a batch being
//! gathered, or between two steps; never while the stage works on a batch,
//! which is therefore always finished. The loop keeps the stage in step with
//! the group: a message read before its partition was revoked is abandoned
//! (its next owner, maybe this consumer again, reads it from the committed
//! offset), and the stage is told of a revocation before it is given any
//! message read after it, so it forgets that partition's state first.
//! Otherwise a partition given back would mix the state of its previous
//! assignment with messages read again, and could store an offset past one
//! whose effect is not durable.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio::time::Interval;
use tokio_util::sync::CancellationToken;

use super::metrics::{BATCH_DURATION, BATCH_SIZE, PAUSED_PARTITIONS};
use super::{DeadLetters, GroupContext, PartitionKey};

/// What a consuming stage supplies; the loop ([`run_consumer`]) owns the
/// rest.
pub trait ConsumerStage: Send {
    type Item: Send;

    /// Decodes and validates one message; `Err` carries the dead-letter
    /// reason.
    fn decode(&self, message: &OwnedMessage) -> Result<Self::Item, String>;

    /// Takes a batch: every message read, in offset order per partition,
    /// with its item, or `None` for one that was dead-lettered (it needs
    /// nothing more, but its offset is still the stage's to finish).
    /// `None` back means shutdown came before its effect was durable: the
    /// loop ends and stores nothing of it.
    fn accept(&mut self, batch: Vec<(Option<Self::Item>, &OwnedMessage)>) -> impl Future<Output = Option<()>> + Send;

    /// For each partition whose finished prefix grew since the last call,
    /// the offset after it: every message before it has a durable effect.
    fn finished(&mut self) -> Vec<(PartitionKey, i64)>;

    /// How often [`ConsumerStage::work_due`] runs; never by default.
    fn due_every(&self) -> Option<Duration> {
        None
    }

    /// Does the work that has come due. Failures are the stage's: what
    /// fails stays unfinished and is tried again on a later step.
    fn work_due(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// These partitions were taken from this consumer: forget what is kept
    /// for them. Their new owner starts from the committed offset.
    fn revoked(&mut self, _partitions: &[PartitionKey]) {}

    /// Partitions to pause (the stage keeps too much of them) and to resume.
    fn flow(&mut self) -> (Vec<PartitionKey>, Vec<PartitionKey>) {
        (Vec::new(), Vec::new())
    }
}

/// How the loop reads for a stage.
#[derive(Debug, Clone)]
pub struct Polling {
    /// The stage's name, the `stage` label of the loop's metrics.
    pub stage: &'static str,
    /// Messages in a batch at most.
    pub max: usize,
    /// How long a batch waits for more messages after its first.
    pub linger: Duration,
}

/// Runs `stage` until `shutdown`, or until the consumer hits a fatal error
/// (`Err`: see [`fatal`]). A batch received is handed to the stage even if
/// shutdown arrives meanwhile; what the stage finished is stored, and
/// stored offsets are committed synchronously on the way out.
pub async fn run_consumer<S: ConsumerStage>(
    consumer: &StreamConsumer<GroupContext>,
    stage: &mut S,
    dead_letters: &DeadLetters,
    polling: &Polling,
    shutdown: &CancellationToken,
) -> Result<(), KafkaError> {
    let mut group = Group { consumer, stage_name: polling.stage, paused: BTreeSet::new() };
    group.publish_paused();
    let mut due = stage.due_every().map(|every| {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    });
    loop {
        // Only these waits race each other: both are cancel-safe, and once a
        // message is in hand nothing may drop it.
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick(&mut due) => None,
            received = next_message(consumer) => Some(received?),
        };
        let Some(first) = first else {
            group.hand_over(stage, &mut Vec::new());
            stage.work_due().await;
            group.settle(stage);
            continue;
        };
        let started = Instant::now();
        let batch = group.gather(stage, first, polling).await;
        if batch.is_empty() {
            continue;
        }
        ::metrics::histogram!(BATCH_SIZE.name, "stage" => polling.stage).record(batch.len() as f64);
        let Some(decoded) = decode(&*stage, dead_letters, &batch, shutdown).await else { break };
        if stage.accept(decoded).await.is_none() {
            break;
        }
        group.settle(stage);
        ::metrics::histogram!(BATCH_DURATION.name, "stage" => polling.stage).record(started.elapsed().as_secs_f64());
    }
    commit_stored(consumer);
    Ok(())
}

/// The consumer's side of the loop: its group membership and flow.
struct Group<'a> {
    consumer: &'a StreamConsumer<GroupContext>,
    stage_name: &'static str,
    /// Partitions paused at the stage's request.
    paused: BTreeSet<PartitionKey>,
}

impl Group<'_> {
    /// Gathers a batch after its first message: more until `max` messages
    /// or `linger` has passed, keeping revocations in order (module doc).
    async fn gather<S: ConsumerStage>(
        &mut self,
        stage: &mut S,
        first: OwnedMessage,
        polling: &Polling,
    ) -> Vec<OwnedMessage> {
        let mut batch = Vec::with_capacity(polling.max);
        self.hand_over(stage, &mut batch);
        batch.push(first);
        let deadline = tokio::time::Instant::now() + polling.linger;
        while batch.len() < polling.max {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Ok(Ok(m)) => {
                    let m = m.detach();
                    self.hand_over(stage, &mut batch);
                    batch.push(m);
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "kafka receive failed");
                    break;
                }
                Err(_) => break,
            }
        }
        self.hand_over(stage, &mut batch);
        batch
    }

    /// Tells the stage of the partitions revoked since the last call, and
    /// abandons the messages of `batch` read from them before.
    fn hand_over<S: ConsumerStage>(&mut self, stage: &mut S, batch: &mut Vec<OwnedMessage>) {
        let revoked = self.consumer.context().take_revoked();
        if revoked.is_empty() {
            return;
        }
        batch.retain(|m| !revoked.iter().any(|(topic, partition)| topic == m.topic() && *partition == m.partition()));
        stage.revoked(&revoked);
        // librdkafka keeps a partition paused by the application across a
        // rebalance: resumed now, a later assignment of it here fetches.
        let resume: Vec<PartitionKey> = revoked.into_iter().filter(|p| self.paused.contains(p)).collect();
        self.set_flow(&resume, false);
    }

    /// Stores what the stage finished and applies the flow it asks for.
    fn settle<S: ConsumerStage>(&mut self, stage: &mut S) {
        store_offsets(self.consumer, stage.finished());
        let (pause, resume) = stage.flow();
        self.set_flow(&pause, true);
        self.set_flow(&resume, false);
    }

    fn set_flow(&mut self, partitions: &[PartitionKey], pause: bool) {
        if partitions.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in partitions {
            tpl.add_partition(topic, *partition);
            if pause {
                self.paused.insert((topic.clone(), *partition));
            } else {
                self.paused.remove(&(topic.clone(), *partition));
            }
        }
        let result = if pause { self.consumer.pause(&tpl) } else { self.consumer.resume(&tpl) };
        match result {
            Ok(()) => tracing::info!(stage = self.stage_name, ?partitions, paused = pause, "partition flow changed"),
            Err(e) => {
                tracing::warn!(stage = self.stage_name, error = %e, ?partitions, paused = pause, "pause/resume failed")
            }
        }
        self.publish_paused();
    }

    fn publish_paused(&self) {
        ::metrics::gauge!(PAUSED_PARTITIONS.name, "stage" => self.stage_name).set(self.paused.len() as f64);
    }
}

/// Waits for the next message; cancel-safe, as `StreamConsumer::recv` is.
/// `Err` is a fatal error of the consumer; others are logged and waited out.
async fn next_message(consumer: &StreamConsumer<GroupContext>) -> Result<OwnedMessage, KafkaError> {
    loop {
        match consumer.recv().await {
            Ok(m) => return Ok(m.detach()),
            Err(e) => {
                if let Some(fatal) = fatal(consumer) {
                    return Err(fatal);
                }
                tracing::warn!(error = %e, "kafka receive failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The next tick of the stage's due step; never without one.
async fn tick(due: &mut Option<Interval>) {
    match due {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Decodes every message of `batch`; one that does not decode is parked on
/// the dead-letter topic at once. `None`: shutdown came while it could not
/// be parked.
async fn decode<'m, S: ConsumerStage>(
    stage: &S,
    dead_letters: &DeadLetters,
    batch: &'m [OwnedMessage],
    shutdown: &CancellationToken,
) -> Option<Vec<(Option<S::Item>, &'m OwnedMessage)>> {
    let mut decoded = Vec::with_capacity(batch.len());
    for message in batch {
        let item = match stage.decode(message) {
            Ok(item) => Some(item),
            Err(reason) => {
                super::retry_until("dead-letter", shutdown, || dead_letters.park(message, "undecodable", &reason))
                    .await?;
                None
            }
        };
        decoded.push((item, message));
    }
    Some(decoded)
}

/// The fatal error the consumer's client has hit, if any. librdkafka raises
/// one when this member is fenced: another consumer joined the group with
/// the same `group.instance.id`. A fenced consumer never gets work again,
/// so the stage must end (non-zero) rather than sit idle and look alive.
fn fatal<C: ConsumerContext + 'static>(consumer: &StreamConsumer<C>) -> Option<KafkaError> {
    let (code, reason) = consumer.client().fatal_error()?;
    tracing::error!(%code, reason, "the kafka consumer hit a fatal error; if it was fenced, another instance uses \
        the same DROPLINE_KAFKA_GROUP_INSTANCE_ID: give each instance its own. Stopping");
    Some(KafkaError::MessageConsumptionFatal(code))
}

/// Stores next-offsets. A partition revoked in the meantime refuses the
/// store; its new owner redelivers, and every effect is idempotent.
fn store_offsets<C: ConsumerContext + 'static>(consumer: &StreamConsumer<C>, next: Vec<(PartitionKey, i64)>) {
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in &next {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            tracing::warn!(error = %e, topic, partition, "bad offset to store");
        }
    }
    if tpl.count() == 0 {
        return;
    }
    if let Err(e) = consumer.store_offsets(&tpl) {
        tracing::warn!(error = %e, "storing offsets refused; the partition's new owner will redeliver");
    }
}

/// Commits what was stored, synchronously, on shutdown.
fn commit_stored<C: ConsumerContext + 'static>(consumer: &StreamConsumer<C>) {
    match consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!(error = %e, "final offset commit failed"),
    }
}
