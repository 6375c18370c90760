//! Following topics from their ends, outside any group: how an ingress
//! hears of decisions and order changes as they happen, to push them to
//! the buyers' open streams. It commits nothing and joins no group (the
//! group id is only what librdkafka asks of every consumer); a restarted
//! reader starts again at the ends, and its streams, reconnecting, read
//! their state afresh.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaArgs;

/// A consumer assigned every partition of `topics`, from their ends. The
/// partitions are those the broker lists now: a topic that gains some
/// later is followed on the ones it had (Dropline never adds any).
pub async fn tail(
    args: &KafkaArgs,
    client: &str,
    topics: &[String],
    wait: Duration,
) -> Result<StreamConsumer, KafkaError> {
    Ok(tail_from_ends(args, client, topics, wait).await?.0)
}

/// Where a tail starts on one partition: the partition's end (its high
/// watermark) as the broker answered before the consumer was assigned.
/// Every message acknowledged after that answer is at or past it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailStart {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// [`tail`], assigned at the ends the broker gave (rather than at "the
/// end" as the consumer later finds it), which it returns: the reader
/// knows exactly which messages it will see.
pub async fn tail_from_ends(
    args: &KafkaArgs,
    client: &str,
    topics: &[String],
    wait: Duration,
) -> Result<(StreamConsumer, Vec<TailStart>), KafkaError> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("client.id", client)
        .set("group.id", format!("{client}-unjoined"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", args.fetch_wait_max_ms.to_string())
        .create()?;
    let topics = topics.to_vec();
    // Metadata calls block: off the runtime's workers.
    let (consumer, starts) = tokio::task::spawn_blocking(move || {
        let starts = ends(&consumer, &topics, wait);
        (consumer, starts)
    })
    .await
    .expect("a kafka metadata call panicked");
    let starts = starts?;
    let mut assignment = TopicPartitionList::new();
    for s in &starts {
        assignment.add_partition_offset(&s.topic, s.partition, Offset::Offset(s.offset))?;
    }
    consumer.assign(&assignment)?;
    Ok((consumer, starts))
}

/// Every partition of `topics` and its high watermark now. Blocks.
pub fn ends<C: Consumer>(consumer: &C, topics: &[String], wait: Duration) -> Result<Vec<TailStart>, KafkaError> {
    let mut ends = Vec::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), wait)?;
        for t in metadata.topics() {
            for p in t.partitions() {
                let (_, high) = consumer.fetch_watermarks(t.name(), p.id(), wait)?;
                ends.push(TailStart { topic: t.name().to_owned(), partition: p.id(), offset: high });
            }
        }
    }
    Ok(ends)
}
