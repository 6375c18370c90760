//! Kafka clients as every stage sets them up: the one [`Publisher`], and the
//! consumer plumbing the stages share: the one consumer loop, in-order
//! offset storage and the dead-letter topic.
//!
//! Consumers run with `enable.auto.offset.store=false`: an offset is stored
//! only after the effect of its message is durable, and librdkafka's periodic
//! auto-commit then commits what was stored. Nothing commits per message.
//!
//! - `consume`: the one consumer loop every consuming stage runs on
//!   ([`run_consumer`]).
//! - `batch`: batch stages on it ([`run_batches`]), and what their failures
//!   mean.
//! - `dead_letters`: the dead-letter topic.
//! - `group`: a consumer's place in its group, readiness and the stuck
//!   watch.
//! - `offsets`: how far a group has come, read from outside it.
//! - `schedule`: the delay queue of the delayed stages, and its offset
//!   rule.
//! - `tail`: topics followed from their ends, outside any group.

mod batch;
mod consume;
mod dead_letters;
mod group;
pub mod metrics;
mod offsets;
mod publish;
mod schedule;
mod tail;

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::StreamConsumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::statistics::Statistics;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

pub use self::batch::{run_batches, BatchOptions, BatchStage, Failure};
pub use self::consume::{run_consumer, ConsumerStage, Polling};
pub use self::dead_letters::DeadLetters;
pub use self::group::{decode_assignment, watch, GroupContext, PartitionKey};
pub use self::offsets::{GroupOffsets, PartitionOffsets};
pub use self::publish::{producer, Producer, PublishError, Publisher, Record, WhenFull, Written};
pub use self::schedule::{Due, Schedule};
pub use self::tail::{ends, tail, tail_from_ends, TailStart};
use crate::config::KafkaArgs;

/// How often librdkafka reports the statistics [`export_statistics`] exports.
const STATISTICS_INTERVAL_MS: &str = "5000";

fn export_statistics(client: &'static str, stats: &Statistics) {
    ::metrics::gauge!(metrics::CLIENT_QUEUE.name, "client" => client).set(stats.msg_cnt as f64);
    for broker in stats.brokers.values() {
        // Bootstrap and internal pseudo-brokers have no node id.
        if let Some(rtt) = broker.rtt.as_ref().filter(|_| broker.nodeid >= 0) {
            ::metrics::gauge!(metrics::BROKER_RTT.name, "client" => client, "broker" => broker.nodename.clone())
                .set(rtt.p99 as f64 / 1e6);
        }
    }
    for topic in stats.topics.values() {
        for p in topic.partitions.values() {
            // -1 is librdkafka's internal unassigned partition; a lag of -1
            // means not known yet.
            if p.partition >= 0 && p.consumer_lag >= 0 {
                ::metrics::gauge!(metrics::CONSUMER_LAG.name, "client" => client, "topic" => topic.topic.clone(),
                    "partition" => p.partition.to_string())
                .set(p.consumer_lag as f64);
            }
        }
    }
}

#[derive(Debug, Error)]
pub enum KafkaSetupError {
    #[error("kafka: {0}")]
    Client(#[from] KafkaError),
    #[error("creating topic {topic}: {code}")]
    CreateTopic { topic: String, code: RDKafkaErrorCode },
}

/// A group consumer that never stores an offset by itself. `ready` follows
/// its assignment: a consumer stage is ready only while it holds partitions.
///
/// It joins as a static member (`group.instance.id`): a restarted instance,
/// even after kill -9, takes its partitions straight back instead of waiting
/// for the group to give up on its old session. The id is the configured
/// one, or `<client>@<host>`; an empty one joins dynamically (on tansu, the
/// only way to run two instances of a stage: see the README).
pub fn consumer(
    args: &KafkaArgs,
    group_id: &str,
    client: &'static str,
    ready: &crate::ops::Readiness,
) -> Result<StreamConsumer<GroupContext>, KafkaError> {
    consumer_config(args, group_id, client).create_with_context(GroupContext::new(client, ready.clone()))
}

/// The settings of every Dropline consumer: offsets stored by the stage
/// once its side effect is durable, committed in the background.
fn consumer_config(args: &KafkaArgs, group_id: &str, client: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    if let Some(id) = args.instance_id(client) {
        config.set("group.instance.id", id);
    }
    config
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", args.session_timeout_ms.to_string())
        .set("max.poll.interval.ms", "300000")
        .set("fetch.wait.max.ms", args.fetch_wait_max_ms.to_string())
        .set("statistics.interval.ms", STATISTICS_INTERVAL_MS);
    config
}

/// A consumer stage's consumer: created as [`consumer`] does, subscribed
/// to `topics`, with the group [`watch`] running until `shutdown`.
pub fn subscribed(
    args: &KafkaArgs,
    group_id: &str,
    client: &'static str,
    topics: &[&str],
    ready: &crate::ops::Readiness,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<StreamConsumer<GroupContext>, KafkaError> {
    use rdkafka::consumer::Consumer;
    let consumer = consumer(args, group_id, client, ready)?;
    consumer.subscribe(topics)?;
    let names = topics.iter().map(|t| (*t).to_owned()).collect();
    watch(args, group_id, names, consumer.context(), Duration::from_secs(5), shutdown.clone())?;
    Ok(consumer)
}

/// Creates the topics that do not exist yet. Existing topics are left as
/// they are, so every stage runs this on start: a consumer that subscribes
/// to a missing topic would otherwise wait for librdkafka's next metadata
/// refresh (minutes) before it sees the topic appear.
impl KafkaArgs {
    /// The batch loop's options for `stage`.
    pub fn batch_options(&self, stage: &'static str, max: usize, linger_ms: u64) -> BatchOptions {
        BatchOptions {
            stage,
            max,
            linger: Duration::from_millis(linger_ms),
            permanent_attempts: self.permanent_failure_attempts,
            max_backoff: Duration::from_secs(5),
        }
    }
}

pub async fn ensure_topics(args: &KafkaArgs, names: &[&str]) -> Result<(), KafkaSetupError> {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &args.brokers).create()?;
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| NewTopic::new(n, args.partitions, TopicReplication::Fixed(args.replication_factor)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&topics, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(KafkaSetupError::CreateTopic { topic, code }),
        }
    }
    Ok(())
}

/// The Kafka header that carries a purchase's request id from the ingress
/// through every stage, so one purchase can be followed in all their logs.
pub const REQUEST_ID_HEADER: &str = "dropline-request-id";

/// The request id a message carries, if any.
pub fn request_id(message: &OwnedMessage) -> Option<String> {
    use rdkafka::message::Headers;
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == REQUEST_ID_HEADER)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_owned)
}

/// Retries a fallible async step with capped exponential backoff until it
/// succeeds or shutdown is asked for. Stages use it where giving up would
/// mean losing or skipping a message.
pub async fn retry_until<T, E: std::fmt::Display, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    mut step: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match step().await {
            Ok(v) => return Some(v),
            Err(e) => {
                tracing::warn!(error = %e, what, retry_in_ms = delay.as_millis() as u64, "step failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(flags: &[&str]) -> ClientConfig {
        consumer_config(&crate::config::kafka_args(flags), "dropline-settler", "settler-consumer")
    }

    #[test]
    fn a_consumer_stores_its_offsets_itself_and_joins_as_a_static_member() {
        let config = config(&["--kafka-group-instance-id=local-settler-0"]);
        assert_eq!(config.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(config.get("group.instance.id"), Some("local-settler-0"));
        assert_eq!(config.get("group.id"), Some("dropline-settler"));
        assert!(self::config(&["--kafka-group-instance-id="]).get("group.instance.id").is_none());
    }

    #[test]
    fn the_session_timeout_is_ten_seconds_unless_told() {
        assert_eq!(config(&[]).get("session.timeout.ms"), Some("10000"));
        assert_eq!(config(&["--kafka-session-timeout-ms=45000"]).get("session.timeout.ms"), Some("45000"));
    }
}
