//! The dead-letter topic: where a message that can never be applied goes,
//! with its reason, so the partition behind it keeps flowing.

use rdkafka::message::{Message, OwnedMessage};

use super::{metrics, PublishError, Publisher, Record};

/// Where messages that cannot be processed go, with the reason, so the
/// partition behind them keeps flowing.
#[derive(Clone)]
pub struct DeadLetters {
    publisher: Publisher,
    topic: String,
    stage: &'static str,
}

impl DeadLetters {
    pub fn new(publisher: Publisher, topic: String, stage: &'static str) -> Self {
        // The series exists from the start: dashboards show 0, not no data.
        for kind in ["undecodable", "unappliable"] {
            ::metrics::counter!(metrics::DEAD_LETTERS.name, "stage" => stage, "kind" => kind).increment(0);
        }
        Self { publisher, topic, stage }
    }

    /// Parks a message on the dead-letter topic and waits until the broker
    /// has it; only then may its offset be stored.
    /// `kind` is a bounded label (`undecodable`, `unappliable`); `reason`
    /// the full text, carried in a header.
    pub async fn park(&self, message: &OwnedMessage, kind: &'static str, reason: &str) -> Result<(), PublishError> {
        let record = Record { topic: &self.topic, key: message.key(), payload: message.payload(), headers: None }
            .header("dropline-dlq-kind", kind)
            .header("dropline-dlq-reason", reason)
            .header("dropline-dlq-stage", self.stage)
            .header("dropline-dlq-topic", message.topic())
            .header("dropline-dlq-partition", &message.partition().to_string())
            .header("dropline-dlq-offset", &message.offset().to_string());
        tracing::warn!(
            stage = self.stage,
            topic = message.topic(),
            partition = message.partition(),
            offset = message.offset(),
            kind,
            reason,
            "message dead-lettered"
        );
        self.publisher.publish(record).await?;
        // Counted once it is parked, not once per attempt.
        ::metrics::counter!(metrics::DEAD_LETTERS.name, "stage" => self.stage, "kind" => kind).increment(1);
        Ok(())
    }

    /// Parks what never was a message (a row the outbox relay cannot
    /// publish): `payload` under `key`, with where it came from (`origin`,
    /// say `outbox seq 12`) in place of a topic and offset.
    pub async fn park_record(
        &self,
        key: &str,
        payload: &[u8],
        origin: &str,
        kind: &'static str,
        reason: &str,
    ) -> Result<(), PublishError> {
        let record = Record::new(&self.topic, key, payload)
            .header("dropline-dlq-kind", kind)
            .header("dropline-dlq-reason", reason)
            .header("dropline-dlq-stage", self.stage)
            .header("dropline-dlq-origin", origin);
        tracing::warn!(stage = self.stage, origin, kind, reason, "record dead-lettered");
        self.publisher.publish(record).await?;
        ::metrics::counter!(metrics::DEAD_LETTERS.name, "stage" => self.stage, "kind" => kind).increment(1);
        Ok(())
    }
}
