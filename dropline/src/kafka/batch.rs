//! The batch stages (allocator, settler) on the consumer loop: each batch
//! is applied, and so finished, as the loop hands it over; what a failure
//! means is decided here.
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
//! A message that does not decode never reaches the apply step: the loop
//! dead-letters it at once.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use rdkafka::consumer::StreamConsumer;
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use tokio_util::sync::CancellationToken;

use super::consume::{run_consumer, ConsumerStage, Polling};
use super::metrics::APPLY_RETRIES;
use super::{DeadLetters, GroupContext, PartitionKey};

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
    type Error: Failure + Send;

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

/// Runs the consumer loop for a batch stage until `shutdown`, or until the
/// consumer hits a fatal error (`Err`). A batch received is finished even
/// if shutdown arrives meanwhile, unless a dependency is down: then nothing
/// of it is stored and its next owner redelivers it.
pub async fn run_batches<S>(
    consumer: &StreamConsumer<GroupContext>,
    stage: &S,
    dead_letters: &DeadLetters,
    options: &BatchOptions,
    shutdown: &CancellationToken,
) -> Result<(), KafkaError>
where
    S: BatchStage + Sync,
    S::Item: Send + Sync,
{
    let polling = Polling { stage: options.stage, max: options.max, linger: options.linger };
    let mut batched = Batched { stage, dead_letters, options, shutdown, finished: BTreeMap::new() };
    run_consumer(consumer, &mut batched, dead_letters, &polling, shutdown).await
}

/// A batch stage as the loop sees it: a batch applied is finished, up to
/// the highest offset of each of its partitions.
struct Batched<'a, S> {
    stage: &'a S,
    dead_letters: &'a DeadLetters,
    options: &'a BatchOptions,
    shutdown: &'a CancellationToken,
    finished: BTreeMap<PartitionKey, i64>,
}

impl<S> ConsumerStage for Batched<'_, S>
where
    S: BatchStage + Sync,
    S::Item: Send + Sync,
{
    type Item = S::Item;

    fn decode(&self, message: &OwnedMessage) -> Result<S::Item, String> {
        self.stage.decode(message)
    }

    async fn accept(&mut self, batch: Vec<(Option<S::Item>, &OwnedMessage)>) -> Option<()> {
        let mut next: BTreeMap<PartitionKey, i64> = BTreeMap::new();
        for (_, m) in &batch {
            let slot = next.entry((m.topic().to_owned(), m.partition())).or_insert(0);
            *slot = (*slot).max(m.offset() + 1);
        }
        // Dead-lettered messages are parked already: only the rest apply.
        let items: Vec<(S::Item, &OwnedMessage)> = batch.into_iter().filter_map(|(i, m)| Some((i?, m))).collect();
        apply_with_policy(self.stage, self.dead_letters, &items, self.options, self.shutdown).await?;
        self.finished.extend(next);
        Some(())
    }

    fn finished(&mut self) -> Vec<(PartitionKey, i64)> {
        std::mem::take(&mut self.finished).into_iter().collect()
    }
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
        ::metrics::counter!(APPLY_RETRIES.name, "stage" => options.stage, "kind" => kind).increment(1);
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
