//! Kafka clients as every stage sets them up, and the consumer plumbing they
//! share: batching, in-order offset storage and the dead-letter topic.
//!
//! Consumers run with `enable.auto.offset.store=false`: an offset is stored
//! only after the effect of its message is durable, and librdkafka's periodic
//! auto-commit then commits what was stored. Nothing commits per message.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::config::KafkaArgs;

/// Metrics of every Kafka client, declared once for all stages; `client`
/// labels name the stage and role (`allocator-consumer`, `ingress-producer`).
pub mod metrics {
    use metrics::{describe_counter, describe_gauge, Unit};

    pub const CONSUMER_LAG: &str = "dropline_kafka_consumer_lag_messages";
    pub const BROKER_RTT: &str = "dropline_kafka_broker_rtt_seconds";
    pub const CLIENT_QUEUE: &str = "dropline_kafka_client_queue_messages";
    pub const DEAD_LETTERS: &str = "dropline_kafka_dead_letters_total";

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
        describe_counter!(DEAD_LETTERS, "Messages parked on the dead-letter topic, by stage.");
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

/// A group consumer that never stores an offset by itself.
pub fn consumer(
    args: &KafkaArgs,
    group_id: &str,
    client: &'static str,
) -> Result<StreamConsumer<GroupContext>, KafkaError> {
    let mut config = ClientConfig::new();
    if let Some(id) = &args.group_instance_id {
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
        .create_with_context(GroupContext { client, revoked: Mutex::default() })
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

/// Consumer context that remembers which partitions were taken away, so a
/// stage can drop what it buffered for them (the new owner starts from the
/// committed offset).
pub struct GroupContext {
    client: &'static str,
    revoked: Mutex<Vec<(String, i32)>>,
}

impl GroupContext {
    /// Partitions revoked since the last call.
    pub fn take_revoked(&self) -> Vec<(String, i32)> {
        std::mem::take(&mut *self.revoked.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl ClientContext for GroupContext {
    fn stats(&self, statistics: Statistics) {
        export_statistics(self.client, &statistics);
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let parts: Vec<(String, i32)> =
                    tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
                tracing::info!(partitions = ?parts, "partitions revoked");
                self.revoked.lock().unwrap_or_else(|p| p.into_inner()).extend(parts);
            }
            Rebalance::Assign(tpl) => {
                let parts: Vec<(String, i32)> =
                    tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
                tracing::info!(partitions = ?parts, "partitions assigned");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

/// Waits for the first message (or cancellation), then gathers more until
/// `max` messages or `linger` has passed. An empty batch means shutdown.
pub async fn next_batch<C: ConsumerContext + 'static>(
    consumer: &StreamConsumer<C>,
    max: usize,
    linger: Duration,
    shutdown: &CancellationToken,
) -> Vec<OwnedMessage> {
    let mut batch = Vec::with_capacity(max);
    loop {
        let received = tokio::select! {
            _ = shutdown.cancelled() => return batch,
            m = consumer.recv() => m,
        };
        match received {
            Ok(m) => {
                batch.push(m.detach());
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "kafka receive failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return batch,
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
    batch
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

/// Where messages that cannot be processed go, with the reason, so the
/// partition behind them keeps flowing.
#[derive(Clone)]
pub struct DeadLetters {
    producer: Producer,
    topic: String,
    stage: &'static str,
}

impl DeadLetters {
    pub fn new(producer: Producer, topic: String, stage: &'static str) -> Self {
        // The series exists from the start: dashboards show 0, not no data.
        ::metrics::counter!(metrics::DEAD_LETTERS, "stage" => stage).increment(0);
        Self { producer, topic, stage }
    }

    /// Parks a message on the dead-letter topic and waits until the broker
    /// has it; only then may its offset be stored.
    pub async fn park(&self, message: &OwnedMessage, reason: &str) -> Result<(), KafkaError> {
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        let headers = OwnedHeaders::new()
            .insert(Header { key: "dropline-dlq-reason", value: Some(reason) })
            .insert(Header { key: "dropline-dlq-stage", value: Some(self.stage) })
            .insert(Header { key: "dropline-dlq-topic", value: Some(message.topic()) })
            .insert(Header { key: "dropline-dlq-partition", value: Some(&partition) })
            .insert(Header { key: "dropline-dlq-offset", value: Some(&offset) });
        let mut record = FutureRecord::to(&self.topic).headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        tracing::warn!(
            stage = self.stage,
            topic = message.topic(),
            partition = message.partition(),
            offset = message.offset(),
            reason,
            "message dead-lettered"
        );
        ::metrics::counter!(metrics::DEAD_LETTERS, "stage" => self.stage).increment(1);
        self.producer.send(record, Duration::from_secs(0)).await.map(|_| ()).map_err(|(e, _)| e)
    }
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
