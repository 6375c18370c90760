//! How far a consumer group has come: its committed offsets against the
//! ends of the partitions it consumes, read without joining the group.
//! What a rebuild waits on (the settlers have everything), what `dropctl`
//! checks before it reads the books, and where a queued purchase stands in
//! the allocators' line.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaArgs;

/// One partition and its offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionOffsets {
    pub topic: String,
    pub partition: i32,
    /// The oldest offset the broker still has.
    pub low: i64,
    /// The next offset to be written: the partition's end.
    pub high: i64,
    /// The group's committed offset (the next it will read), if any.
    pub committed: Option<i64>,
}

impl PartitionOffsets {
    /// Messages the group has still to get past.
    pub fn lag(&self) -> i64 {
        (self.high - self.committed.unwrap_or(self.low).max(self.low)).max(0)
    }
}

/// Reads one group's offsets. Each call blocks for up to `wait` and runs on
/// the blocking pool, never on a runtime worker. Cheap to clone.
#[derive(Clone)]
pub struct GroupOffsets {
    probe: Arc<BaseConsumer>,
    wait: Duration,
}

impl GroupOffsets {
    /// A probe of `group`; it never subscribes, so it never joins the group.
    pub fn new(args: &KafkaArgs, group: &str, wait: Duration) -> Result<Self, KafkaError> {
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &args.brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()?;
        Ok(Self { probe: Arc::new(probe), wait })
    }

    /// Every partition of `topics`, with its ends and the group's committed
    /// offset, as they stand now.
    pub async fn read(&self, topics: &[String]) -> Result<Vec<PartitionOffsets>, KafkaError> {
        let (probe, wait, topics) = (Arc::clone(&self.probe), self.wait, topics.to_vec());
        tokio::task::spawn_blocking(move || read(&probe, &topics, wait)).await.expect("a kafka probe call panicked")
    }
}

fn read(probe: &BaseConsumer, topics: &[String], wait: Duration) -> Result<Vec<PartitionOffsets>, KafkaError> {
    let mut partitions = Vec::new();
    let mut asked = TopicPartitionList::new();
    for topic in topics {
        let metadata = probe.fetch_metadata(Some(topic), wait)?;
        for t in metadata.topics() {
            for p in t.partitions() {
                let (low, high) = probe.fetch_watermarks(topic, p.id(), wait)?;
                asked.add_partition(topic, p.id());
                partitions.push(PartitionOffsets {
                    topic: topic.clone(),
                    partition: p.id(),
                    low,
                    high,
                    committed: None,
                });
            }
        }
    }
    let committed = probe.committed_offsets(asked, wait)?;
    for p in &mut partitions {
        p.committed = match committed.find_partition(&p.topic, p.partition).map(|c| c.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        };
    }
    Ok(partitions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_from_the_commit_or_from_what_the_broker_still_has() {
        let p = |low, high, committed| PartitionOffsets { topic: "t".into(), partition: 0, low, high, committed };
        assert_eq!(p(0, 10, Some(4)).lag(), 6);
        assert_eq!(p(3, 10, None).lag(), 7, "nothing committed: all that is there");
        assert_eq!(p(8, 10, Some(2)).lag(), 2, "a commit below what retention kept");
        assert_eq!(p(0, 10, Some(10)).lag(), 0);
    }
}
