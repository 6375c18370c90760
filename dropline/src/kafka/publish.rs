//! The one way Dropline writes to Kafka: a [`Publisher`] sends a record and
//! answers only once the broker acknowledged it (or refused it for good), so
//! every stage can tie an acknowledged effect, or a stored offset, to the
//! broker's ack. Metrics and error classification live here, once.

use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;
use thiserror::Error;

use super::{export_statistics, metrics, REQUEST_ID_HEADER, STATISTICS_INTERVAL_MS};
use crate::config::KafkaArgs;

/// Producer context that exports librdkafka's statistics.
pub struct ProducerStats {
    client: &'static str,
}

impl ClientContext for ProducerStats {
    fn stats(&self, statistics: Statistics) {
        export_statistics(self.client, &statistics);
    }
}

/// The raw client behind [`Publisher`].
pub type Producer = FutureProducer<ProducerStats>;

/// The settings of every Dropline producer: idempotent, acknowledged by
/// every in-sync replica, and a bounded local queue so a stalled broker
/// pushes back instead of filling memory.
fn producer_config(args: &KafkaArgs) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &args.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", args.linger_ms.to_string())
        .set("message.timeout.ms", args.message_timeout_ms.to_string())
        .set("queue.buffering.max.messages", args.producer_queue_max_messages.to_string())
        .set("compression.type", "lz4")
        .set("statistics.interval.ms", STATISTICS_INTERVAL_MS);
    config
}

/// A raw producer with the stages' settings. Only the produce ceiling
/// (`dropctl ceiling produce`) should use one directly: it measures the
/// broker without the publisher's bookkeeping. Everything else publishes
/// through a [`Publisher`].
pub fn producer(args: &KafkaArgs, client: &'static str) -> Result<Producer, KafkaError> {
    producer_config(args).create_with_context(ProducerStats { client })
}

/// What a publish does when the producer's local queue is full
/// (`DROPLINE_KAFKA_PRODUCER_QUEUE_MAX_MESSAGES` records not yet acked).
/// Chosen once per publisher; this is the only place the wait is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Fail at once with [`PublishError::QueueFull`]. For the ingress: a
    /// buyer is better served by a 503 with Retry-After now than by a
    /// connection held while the broker lags.
    Refuse,
    /// Wait for room, checking every 100 ms, for at most the message timeout
    /// (`DROPLINE_KAFKA_MESSAGE_TIMEOUT_MS`): as long as a queued record may
    /// wait for the broker anyway. For consumer stages, which hold their
    /// batch either way; failing at once would only make them produce again
    /// what is already queued.
    Wait,
}

impl WhenFull {
    fn queue_wait(self, args: &KafkaArgs) -> Duration {
        match self {
            WhenFull::Refuse => Duration::ZERO,
            WhenFull::Wait => Duration::from_millis(args.message_timeout_ms),
        }
    }
}

/// Why a record was not acknowledged. Each variant keeps librdkafka's error.
#[derive(Debug, Error)]
pub enum PublishError {
    /// The local queue had no room (at once, or within the wait).
    #[error("the producer's queue is full: {0}")]
    QueueFull(#[source] KafkaError),
    /// Queued, but not acknowledged within the message timeout. The broker
    /// may still have it: publish the same record again, never a new one.
    #[error("no acknowledgement within the message timeout: {0}")]
    TimedOut(#[source] KafkaError),
    /// Refused by the broker, or by the client on its behalf (too large, an
    /// unknown topic, a fatal producer error).
    #[error("the record was refused: {0}")]
    Refused(#[source] KafkaError),
}

impl PublishError {
    /// The bounded `outcome` label of [`metrics::PUBLISHED`].
    pub fn outcome(&self) -> &'static str {
        match self {
            PublishError::QueueFull(_) => "queue_full",
            PublishError::TimedOut(_) => "timed_out",
            PublishError::Refused(_) => "refused",
        }
    }
}

impl From<KafkaError> for PublishError {
    fn from(e: KafkaError) -> Self {
        match e.rdkafka_error_code() {
            Some(RDKafkaErrorCode::QueueFull) => PublishError::QueueFull(e),
            Some(RDKafkaErrorCode::MessageTimedOut | RDKafkaErrorCode::RequestTimedOut) => PublishError::TimedOut(e),
            _ => PublishError::Refused(e),
        }
    }
}

/// One record to publish.
pub struct Record<'a> {
    pub(super) topic: &'a str,
    pub(super) key: Option<&'a [u8]>,
    pub(super) payload: Option<&'a [u8]>,
    pub(super) headers: Option<OwnedHeaders>,
}

impl<'a> Record<'a> {
    /// `payload` under `key` on `topic` (a name from
    /// [`Topics`](crate::messages::Topics)).
    pub fn new(topic: &'a str, key: &'a str, payload: &'a [u8]) -> Self {
        Self { topic, key: Some(key.as_bytes()), payload: Some(payload), headers: None }
    }

    /// Adds a header.
    pub fn header(mut self, key: &str, value: &str) -> Self {
        let headers = self.headers.take().unwrap_or_default();
        self.headers = Some(headers.insert(Header { key, value: Some(value) }));
        self
    }

    /// Carries a purchase's request id on, if it has one.
    pub fn request_id(self, request_id: Option<&str>) -> Self {
        match request_id {
            Some(id) => self.header(REQUEST_ID_HEADER, id),
            None => self,
        }
    }
}

/// Where the broker wrote a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub partition: i32,
    pub offset: i64,
}

/// Publishes records and waits for the broker's acknowledgement. Cheap to
/// clone: clones share one producer.
#[derive(Clone)]
pub struct Publisher {
    producer: Producer,
    client: &'static str,
    queue_wait: Duration,
}

impl Publisher {
    /// A publisher named `client` in metrics (`allocator-producer`).
    pub fn new(args: &KafkaArgs, client: &'static str, when_full: WhenFull) -> Result<Self, KafkaError> {
        Ok(Self { producer: producer(args, client)?, client, queue_wait: when_full.queue_wait(args) })
    }

    /// Publishes one record; `Ok` once the broker acknowledged it.
    pub async fn publish(&self, record: Record<'_>) -> Result<(), PublishError> {
        self.publish_at(record).await.map(|_| ())
    }

    /// [`Publisher::publish`], saying where the record was written.
    pub async fn publish_at(&self, record: Record<'_>) -> Result<Written, PublishError> {
        let topic = record.topic;
        let started = Instant::now();
        let outgoing = FutureRecord {
            topic,
            partition: None,
            payload: record.payload,
            key: record.key,
            timestamp: None,
            headers: record.headers,
        };
        ::metrics::gauge!(metrics::PUBLISH_IN_FLIGHT.name, "client" => self.client)
            .set(f64::from(self.producer.in_flight_count()));
        let result = match self.producer.send(outgoing, self.queue_wait).await {
            Ok(delivery) => Ok(Written { partition: delivery.partition, offset: delivery.offset }),
            Err((e, _)) => Err(PublishError::from(e)),
        };
        let outcome = match &result {
            Ok(_) => {
                ::metrics::histogram!(metrics::PUBLISH_DURATION.name, "client" => self.client, "topic" => topic.to_owned())
                    .record(started.elapsed().as_secs_f64());
                "acked"
            }
            Err(e) => e.outcome(),
        };
        ::metrics::counter!(metrics::PUBLISHED.name, "client" => self.client, "topic" => topic.to_owned(), "outcome" => outcome)
            .increment(1);
        result
    }

    /// Publishes every record at once and waits for all of them; the
    /// outcomes come back in the records' order.
    pub async fn publish_all<'a>(
        &self,
        records: impl IntoIterator<Item = Record<'a>>,
    ) -> Vec<Result<(), PublishError>> {
        join_all(records.into_iter().map(|r| self.publish(r))).await
    }

    /// Blocks until every queued record is acknowledged or `timeout` passes.
    /// Only for shutdown; run it off the runtime's workers.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::kafka_args as args;

    #[test]
    fn every_producer_is_idempotent_and_acked_by_all_replicas() {
        let config = producer_config(&args(&[
            "--kafka-message-timeout-ms=7000",
            "--kafka-linger-ms=9",
            "--kafka-producer-queue-max-messages=1234",
        ]));
        for (key, value) in [
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("compression.type", "lz4"),
            ("message.timeout.ms", "7000"),
            ("linger.ms", "9"),
            ("queue.buffering.max.messages", "1234"),
            ("statistics.interval.ms", STATISTICS_INTERVAL_MS),
        ] {
            assert_eq!(config.get(key), Some(value), "{key}");
        }
    }

    #[test]
    fn a_full_queue_is_refused_at_once_or_waited_on_for_the_message_timeout() {
        let args = args(&["--kafka-message-timeout-ms=7000"]);
        assert_eq!(WhenFull::Refuse.queue_wait(&args), Duration::ZERO);
        assert_eq!(WhenFull::Wait.queue_wait(&args), Duration::from_millis(7000));
    }

    #[test]
    fn a_record_waits_for_the_broker_as_long_as_on_kafka_unless_told() {
        assert_eq!(producer_config(&args(&[])).get("message.timeout.ms"), Some("120000"));
    }

    #[test]
    fn errors_are_told_apart_by_code() {
        let produced = |code| PublishError::from(KafkaError::MessageProduction(code));
        assert!(matches!(produced(RDKafkaErrorCode::QueueFull), PublishError::QueueFull(_)));
        assert!(matches!(produced(RDKafkaErrorCode::MessageTimedOut), PublishError::TimedOut(_)));
        assert!(matches!(produced(RDKafkaErrorCode::RequestTimedOut), PublishError::TimedOut(_)));
        assert!(matches!(produced(RDKafkaErrorCode::MessageSizeTooLarge), PublishError::Refused(_)));
        assert!(matches!(PublishError::from(KafkaError::Canceled), PublishError::Refused(_)));
        assert_eq!(produced(RDKafkaErrorCode::QueueFull).outcome(), "queue_full");
    }

    #[test]
    fn a_record_carries_its_request_id_only_if_it_has_one() {
        use rdkafka::message::Headers;
        let with = Record::new("t.intents", "1", b"{}").request_id(Some("req-1"));
        let headers = with.headers.expect("a header");
        assert_eq!(headers.count(), 1);
        assert_eq!(headers.get(0).key, REQUEST_ID_HEADER);
        assert_eq!(headers.get(0).value, Some(&b"req-1"[..]));
        assert!(Record::new("t.intents", "1", b"{}").request_id(None).headers.is_none());
    }
}
