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
    let (consumer, assignment) = tokio::task::spawn_blocking(move || {
        let mut assignment = TopicPartitionList::new();
        for topic in &topics {
            let metadata = match consumer.fetch_metadata(Some(topic), wait) {
                Ok(metadata) => metadata,
                Err(e) => return (consumer, Err(e)),
            };
            for t in metadata.topics() {
                for p in t.partitions() {
                    if let Err(e) = assignment.add_partition_offset(t.name(), p.id(), Offset::End) {
                        return (consumer, Err(e));
                    }
                }
            }
        }
        (consumer, Ok(assignment))
    })
    .await
    .expect("a kafka metadata call panicked");
    consumer.assign(&assignment?)?;
    Ok(consumer)
}
