//! Kafka clients as every stage sets them up, and the consumer plumbing they
//! share.
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

mod batch;
mod consume;
mod dead_letters;
mod group;

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::StreamConsumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

pub use self::batch::{run_batches, BatchOptions, BatchStage, Failure};
pub use self::consume::{run_consumer, ConsumerStage, Polling};
pub use self::dead_letters::DeadLetters;
pub use self::group::{decode_assignment, watch, GroupContext, PartitionKey};
use crate::config::KafkaArgs;

/// Metrics of every Kafka client and of the consumer loop, declared once for
/// all stages. `client` labels name the stage and role
/// (`allocator-consumer`, `ingress-producer`) of librdkafka's and the
/// group's figures; `stage` labels the loop's (`allocator`, `expirer`).
pub mod metrics {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

    pub const CONSUMER_LAG: &str = "dropline_kafka_consumer_lag_messages";
    pub const BROKER_RTT: &str = "dropline_kafka_broker_rtt_seconds";
    pub const CLIENT_QUEUE: &str = "dropline_kafka_client_queue_messages";
    pub const DEAD_LETTERS: &str = "dropline_kafka_dead_letters_total";
    pub const ASSIGNED_PARTITIONS: &str = "dropline_kafka_consumer_assigned_partitions";
    pub const UNOWNED_PARTITIONS: &str = "dropline_kafka_consumer_group_unowned_partitions";
    pub const APPLY_RETRIES: &str = "dropline_kafka_apply_retries_total";
    pub const BATCH_SIZE: &str = "dropline_kafka_batch_size";
    pub const BATCH_DURATION: &str = "dropline_kafka_batch_duration_seconds";
    pub const PAUSED_PARTITIONS: &str = "dropline_kafka_paused_partitions";

    pub fn describe() {
        describe_gauge!(
            CONSUMER_LAG,
            "Messages between a partition's end and the consumer's position, per topic and partition."
        );
        describe_gauge!(
            BROKER_RTT,
            Unit::Seconds,
            "p99 round-trip time to each broker over librdkafka's last statistics window."
        );
        describe_gauge!(CLIENT_QUEUE, "Messages waiting in the client's local queues (a producer's unsent messages).");
        describe_counter!(DEAD_LETTERS, "Messages parked on the dead-letter topic, by stage and reason.");
        describe_gauge!(
            ASSIGNED_PARTITIONS,
            "Partitions this consumer holds now; a consumer stage is ready only above 0."
        );
        describe_gauge!(
            UNOWNED_PARTITIONS,
            "Partitions of the consumer's topics that no member of its group owns, as the group describes itself."
        );
        describe_counter!(
            APPLY_RETRIES,
            "Failed attempts to apply a batch, by stage and kind: unavailable (a dependency is down; retried \
             without limit) or permanent (retried a bounded number of times, then dead-lettered)."
        );
        describe_histogram!(BATCH_SIZE, Unit::Count, "Messages per batch the consumer loop hands to its stage.");
        describe_histogram!(
            BATCH_DURATION,
            Unit::Seconds,
            "Time from a batch's receipt to the stage having taken it and its finished offsets being stored (for \
             a batch stage, its whole effect; the expirer only schedules the holds)."
        );
        describe_gauge!(
            PAUSED_PARTITIONS,
            "Partitions paused because the stage keeps too many of their messages in memory (the expirer's \
             waiting holds)."
        );
    }
}

/// How often librdkafka reports the statistics exported above.
const STATISTICS_INTERVAL_MS: &str = "5000";

fn export_statistics(client: &'static str, stats: &Statistics) {
    ::metrics::gauge!(metrics::CLIENT_QUEUE, "client" => client).set(stats.msg_cnt as f64);
    for broker in stats.brokers.values() {
        // Bootstrap and internal pseudo-brokers have no node id.
        if let Some(rtt) = broker.rtt.as_ref().filter(|_| broker.nodeid >= 0) {
            ::metrics::gauge!(metrics::BROKER_RTT, "client" => client, "broker" => broker.nodename.clone())
                .set(rtt.p99 as f64 / 1e6);
        }
    }
    for topic in stats.topics.values() {
        for p in topic.partitions.values() {
            // -1 is librdkafka's internal unassigned partition; a lag of -1
            // means not known yet.
            if p.partition >= 0 && p.consumer_lag >= 0 {
                ::metrics::gauge!(metrics::CONSUMER_LAG, "client" => client, "topic" => topic.topic.clone(),
                    "partition" => p.partition.to_string())
                .set(p.consumer_lag as f64);
            }
        }
    }
}

/// Producer context that exports librdkafka's statistics.
pub struct ProducerStats {
    client: &'static str,
}

impl ClientContext for ProducerStats {
    fn stats(&self, statistics: Statistics) {
        export_statistics(self.client, &statistics);
    }
}

/// The producer every stage uses.
pub type Producer = FutureProducer<ProducerStats>;

#[derive(Debug, Error)]
pub enum KafkaSetupError {
    #[error("kafka: {0}")]
    Client(#[from] KafkaError),
    #[error("creating topic {topic}: {code}")]
    CreateTopic { topic: String, code: RDKafkaErrorCode },
}

/// A producer for stage-to-stage traffic: idempotent, acks from every
/// in-sync replica, and a bounded local queue so a stalled broker pushes
/// back instead of filling memory.
pub fn producer(args: &KafkaArgs, client: &'static str) -> Result<Producer, KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", args.linger_ms.to_string())
        .set("message.timeout.ms", args.message_timeout_ms.to_string())
        .set("queue.buffering.max.messages", args.producer_queue_max_messages.to_string())
        .set("compression.type", "lz4")
        .set("statistics.interval.ms", STATISTICS_INTERVAL_MS)
        .create_with_context(ProducerStats { client })
}

/// A group consumer that never stores an offset by itself. `ready` follows
/// its assignment: a consumer stage is ready only while it holds partitions.
///
/// It joins as a static member (`group.instance.id`): a restarted instance,
/// even after kill -9, takes its partitions straight back instead of waiting
/// for the group to give up on its old session (tansu never does for a
/// dynamic member). The id is the configured one, or `<client>@<host>`.
pub fn consumer(
    args: &KafkaArgs,
    group_id: &str,
    client: &'static str,
    ready: &crate::ops::Readiness,
) -> Result<StreamConsumer<GroupContext>, KafkaError> {
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
        .set("session.timeout.ms", "10000")
        .set("max.poll.interval.ms", "300000")
        .set("fetch.wait.max.ms", args.fetch_wait_max_ms.to_string())
        .set("statistics.interval.ms", STATISTICS_INTERVAL_MS)
        .create_with_context(GroupContext::new(client, ready.clone()))
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
pub async fn ensure_topics(args: &KafkaArgs, names: &[&str]) -> Result<(), KafkaSetupError> {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &args.brokers).create()?;
    let topics: Vec<NewTopic<'_>> =
        names.iter().map(|n| NewTopic::new(n, args.partitions, TopicReplication::Fixed(1))).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&topics, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(KafkaSetupError::CreateTopic { topic, code }),
        }
    }
    Ok(())
}

/// Sends a record and waits for the broker's acknowledgement.
pub async fn send_acked(
    producer: &Producer,
    topic: &str,
    key: &str,
    payload: &[u8],
    headers: Option<OwnedHeaders>,
) -> Result<(), KafkaError> {
    let mut record = FutureRecord::to(topic).key(key).payload(payload);
    if let Some(h) = headers {
        record = record.headers(h);
    }
    match producer.send(record, Duration::from_secs(0)).await {
        Ok(_) => Ok(()),
        Err((e, _)) => Err(e),
    }
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

/// Headers carrying `request_id` on to the next topic.
pub fn request_id_headers(request_id: Option<&str>) -> Option<OwnedHeaders> {
    request_id.map(|id| OwnedHeaders::new().insert(Header { key: REQUEST_ID_HEADER, value: Some(id) }))
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
