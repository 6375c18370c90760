//! The one consumer loop of the batch stages (allocator, settler): poll a
//! batch, hand it to the stage's apply step, store offsets only once its
//! effect is durable, and decide what a failure means.
//!
//! Failures come in two kinds, told apart by type, never by message:
//! - **unavailable**: a dependency is down or busy (Redis, MySQL, the
//!   broker). Retrying is the only right answer, with backoff and without
//!   limit; nothing is ever dead-lettered for it, and the partition waits.
//! - **permanent**: the messages themselves cannot be applied (a constraint
//!   that always fails, an answer that cannot be read). The batch is tried
//!   [`BatchOptions::permanent_attempts`] times, then split message by
//!   message; a message that still fails alone goes to the dead-letter
//!   topic with its reason, and the rest of the partition keeps flowing.
//!
//! A message that does not decode never reaches the apply step: it is
//! dead-lettered at once.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::metrics::APPLY_RETRIES;
use super::{DeadLetters, GroupContext};

/// Whether retrying can ever help.
pub trait Failure: Display {
    /// True when the messages themselves cannot be applied; false when a
    /// dependency is unavailable and a retry may succeed.
    fn is_permanent(&self) -> bool;
}

/// What a batch stage supplies: how to read a message and how to make the
/// effect of a batch durable. The loop owns everything else.
pub trait BatchStage {
    type Item;
    type Error: Failure;

    /// Decodes and validates one message; `Err` carries the dead-letter
    /// reason.
    fn decode(&self, message: &OwnedMessage) -> Result<Self::Item, String>;

    /// Makes the effect of every item durable (idempotently: a batch may be
    /// applied again after a crash or a failure). The slice pairs each item
    /// with its message, for headers such as the request id.
    fn apply(&self, items: &[(Self::Item, &OwnedMessage)]) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

#[derive(Debug, Clone)]
pub struct BatchOptions {
    pub stage: &'static str,
    pub max: usize,
    pub linger: Duration,
    /// Attempts at a permanently failing batch (and then at each of its
    /// messages alone) before a message is dead-lettered.
    pub permanent_attempts: u32,
    /// Cap of the backoff between attempts.
    pub max_backoff: Duration,
}

/// Histograms the loop records for every stage.
pub struct BatchMetrics {
    pub batch_size: &'static str,
    pub batch_duration: &'static str,
}

/// Runs the loop until `shutdown`, or until the consumer hits a fatal error
/// (`Err`: see [`fatal`]). A batch received is finished even if shutdown
/// arrives meanwhile, unless a dependency is down: then nothing of it is
/// stored and its next owner redelivers it. Stored offsets are committed
/// synchronously on the way out.
pub async fn run_batches<S>(
    consumer: &StreamConsumer<GroupContext>,
    stage: &S,
    dead_letters: &DeadLetters,
    options: &BatchOptions,
    metrics: &BatchMetrics,
    shutdown: &CancellationToken,
) -> Result<(), KafkaError>
where
    S: BatchStage + Sync,
    S::Item: Send + Sync,
{
    loop {
        let batch = next_batch(consumer, options.max, options.linger, shutdown).await?;
        if batch.is_empty() {
            break;
        }
        let started = Instant::now();
        ::metrics::histogram!(metrics.batch_size).record(batch.len() as f64);
        let mut items = Vec::with_capacity(batch.len());
        let mut parked_all = true;
        for message in &batch {
            match stage.decode(message) {
                Ok(item) => items.push((item, message)),
                Err(reason) => {
                    let parked = super::retry_until("dead-letter", shutdown, || {
                        dead_letters.park(message, "undecodable", &reason)
                    })
                    .await;
                    if parked.is_none() {
                        parked_all = false;
                        break;
                    }
                }
            }
        }
        if !parked_all || apply_with_policy(stage, dead_letters, &items, options, shutdown).await.is_none() {
            break;
        }
        // Every message up to the highest offset of each partition in the
        // batch has a durable effect or is parked.
        store_after(consumer, &batch);
        ::metrics::histogram!(metrics.batch_duration).record(started.elapsed().as_secs_f64());
    }
    commit_stored(consumer);
    Ok(())
}

/// Applies `items` under the failure policy. `None` means shutdown came
/// while a dependency was down: nothing may be stored.
async fn apply_with_policy<S>(
    stage: &S,
    dead_letters: &DeadLetters,
    items: &[(S::Item, &OwnedMessage)],
    options: &BatchOptions,
    shutdown: &CancellationToken,
) -> Option<()>
where
    S: BatchStage + Sync,
{
    if items.is_empty() {
        return Some(());
    }
    match apply_bounded(stage, items, options, shutdown).await? {
        Ok(()) => Some(()),
        Err(_) if items.len() > 1 => {
            // One message spoils the batch; find which by applying each one
            // alone. Those that succeed are idempotent repeats or new effects.
            tracing::warn!(stage = options.stage, messages = items.len(), "batch keeps failing; applying one by one");
            for one in items.chunks(1) {
                Box::pin(apply_with_policy(stage, dead_letters, one, options, shutdown)).await?;
            }
            Some(())
        }
        Err(e) => {
            let (_, message) = &items[0];
            let reason = format!("cannot be applied: {e}");
            super::retry_until("dead-letter", shutdown, || dead_letters.park(message, "unappliable", &reason)).await
        }
    }
}

/// Tries `items` until it succeeds, a permanent failure repeated
/// `permanent_attempts` times (`Some(Err)`), or shutdown during an outage
/// (`None`). Unavailable dependencies are retried without limit.
async fn apply_bounded<S>(
    stage: &S,
    items: &[(S::Item, &OwnedMessage)],
    options: &BatchOptions,
    shutdown: &CancellationToken,
) -> Option<Result<(), S::Error>>
where
    S: BatchStage + Sync,
{
    let mut delay = Duration::from_millis(100);
    let mut permanent_failures = 0;
    loop {
        let error = match stage.apply(items).await {
            Ok(()) => return Some(Ok(())),
            Err(e) => e,
        };
        let kind = if error.is_permanent() { "permanent" } else { "unavailable" };
        ::metrics::counter!(APPLY_RETRIES, "stage" => options.stage, "kind" => kind).increment(1);
        if error.is_permanent() {
            permanent_failures += 1;
            if permanent_failures >= options.permanent_attempts {
                return Some(Err(error));
            }
        } else if shutdown.is_cancelled() {
            return None;
        }
        tracing::warn!(stage = options.stage, error = %error, kind, retry_in_ms = delay.as_millis() as u64,
            "applying a batch failed; retrying");
        tokio::select! {
            // A permanent failure is finished even during shutdown (it
            // ends in the dead-letter topic); an outage stops here.
            _ = shutdown.cancelled(), if !error.is_permanent() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(options.max_backoff);
    }
}

/// Waits for the first message (or cancellation), then gathers more until
/// `max` messages or `linger` has passed. An empty batch means shutdown;
/// `Err` a fatal error of the consumer.
pub async fn next_batch<C: ConsumerContext + 'static>(
    consumer: &StreamConsumer<C>,
    max: usize,
    linger: Duration,
    shutdown: &CancellationToken,
) -> Result<Vec<OwnedMessage>, KafkaError> {
    let mut batch = Vec::with_capacity(max);
    loop {
        let received = tokio::select! {
            _ = shutdown.cancelled() => return Ok(batch),
            m = consumer.recv() => m,
        };
        match received {
            Ok(m) => {
                batch.push(m.detach());
                break;
            }
            Err(e) => {
                if let Some(fatal) = fatal(consumer) {
                    return Err(fatal);
                }
                tracing::warn!(error = %e, "kafka receive failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(batch),
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
    }
    let deadline = tokio::time::Instant::now() + linger;
    while batch.len() < max {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => batch.push(m.detach()),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "kafka receive failed");
                break;
            }
            Err(_) => break,
        }
    }
    Ok(batch)
}

/// The fatal error the consumer's client has hit, if any. librdkafka raises
/// one when this member is fenced: another consumer joined the group with
/// the same `group.instance.id`. A fenced consumer never gets work again,
/// so the stage must end (non-zero) rather than sit idle and look alive.
pub fn fatal<C: ConsumerContext + 'static>(consumer: &StreamConsumer<C>) -> Option<KafkaError> {
    let (code, reason) = consumer.client().fatal_error()?;
    tracing::error!(%code, reason, "the kafka consumer hit a fatal error; if it was fenced, another instance uses \
        the same DROPLINE_KAFKA_GROUP_INSTANCE_ID: give each instance its own. Stopping");
    Some(KafkaError::MessageConsumptionFatal(code))
}

/// Stores, for each partition in `messages`, the offset after the highest
/// one. Call only when every message up to it has a durable effect.
pub fn store_after<C: ConsumerContext + 'static>(consumer: &StreamConsumer<C>, messages: &[OwnedMessage]) {
    let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for m in messages {
        let slot = next.entry((m.topic(), m.partition())).or_insert(0);
        *slot = (*slot).max(m.offset() + 1);
    }
    store_offsets(consumer, next.into_iter().map(|((t, p), o)| (t, p, o)));
}

/// Stores explicit next-offsets. A partition revoked in the meantime refuses
/// the store; its new owner redelivers, and every effect is idempotent.
pub fn store_offsets<'a, C: ConsumerContext + 'static>(
    consumer: &StreamConsumer<C>,
    next: impl IntoIterator<Item = (&'a str, i32, i64)>,
) {
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, offset) in next {
        if let Err(e) = tpl.add_partition_offset(topic, partition, Offset::Offset(offset)) {
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
pub fn commit_stored<C: ConsumerContext + 'static>(consumer: &StreamConsumer<C>) {
    match consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!(error = %e, "final offset commit failed"),
    }
}
