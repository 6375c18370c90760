//! The dead-letter topic: where a message that can never be applied goes,
//! with its reason, so the partition behind it keeps flowing.

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;

use super::{metrics, Producer};

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
        for kind in ["undecodable", "unappliable"] {
            ::metrics::counter!(metrics::DEAD_LETTERS, "stage" => stage, "kind" => kind).increment(0);
        }
        Self { producer, topic, stage }
    }

    /// Parks a message on the dead-letter topic and waits until the broker
    /// has it; only then may its offset be stored.
    /// `kind` is a bounded label (`undecodable`, `unappliable`); `reason`
    /// the full text, carried in a header.
    pub async fn park(&self, message: &OwnedMessage, kind: &'static str, reason: &str) -> Result<(), KafkaError> {
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        let headers = OwnedHeaders::new()
            .insert(Header { key: "dropline-dlq-kind", value: Some(kind) })
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
            kind,
            reason,
            "message dead-lettered"
        );
        self.producer.send(record, Duration::from_secs(0)).await.map_err(|(e, _)| e)?;
        // Counted once it is parked, not once per attempt.
        ::metrics::counter!(metrics::DEAD_LETTERS, "stage" => self.stage, "kind" => kind).increment(1);
        Ok(())
    }
}
