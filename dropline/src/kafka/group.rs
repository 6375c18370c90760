//! A consumer's place in its group: which partitions it holds, whether it
//! should report ready, and whether it is stuck.
//!
//! A consumer that subscribed holds nothing until the group coordinator has
//! assigned it partitions, and with some brokers (tansu keeps a dead dynamic
//! member forever) it may never get any while partitions sit unowned. So a
//! consumer stage is ready only while it holds an assignment, and a watchdog
//! compares the group's assignments with the topics' partitions: holding
//! nothing while partitions are left unowned is reported unhealthy, logged
//! and counted, so an orchestrator restarts it.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;
use tokio_util::sync::CancellationToken;

use super::metrics::{ASSIGNED_PARTITIONS, UNOWNED_PARTITIONS};
use crate::config::KafkaArgs;
use crate::ops::Readiness;

pub type PartitionKey = (String, i32);

/// What a consumer holds, shared between its rebalance callbacks and the
/// watchdog.
#[derive(Default)]
struct Assignment {
    held: BTreeSet<PartitionKey>,
    revoked: Vec<PartitionKey>,
}

/// Consumer context every stage uses: exports statistics, tracks the
/// assignment, and keeps readiness in step with it.
pub struct GroupContext {
    client: &'static str,
    assignment: Arc<Mutex<Assignment>>,
    ready: Readiness,
}

impl GroupContext {
    pub(super) fn new(client: &'static str, ready: Readiness) -> Self {
        // Ready only once the group gave this consumer something to do.
        ready.set_assigned(false);
        ::metrics::gauge!(ASSIGNED_PARTITIONS.name, "client" => client).set(0.0);
        Self { client, assignment: Arc::default(), ready }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Assignment> {
        self.assignment.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Partitions revoked since the last call, so a stage can drop what it
    /// buffered for them (their new owner starts from the committed offset).
    pub fn take_revoked(&self) -> Vec<PartitionKey> {
        std::mem::take(&mut self.lock().revoked)
    }

    /// The partitions this consumer holds now.
    pub fn held(&self) -> BTreeSet<PartitionKey> {
        self.lock().held.clone()
    }

    fn publish(&self, held: usize) {
        ::metrics::gauge!(ASSIGNED_PARTITIONS.name, "client" => self.client).set(held as f64);
        self.ready.set_assigned(held > 0);
    }
}

impl ClientContext for GroupContext {
    fn stats(&self, statistics: Statistics) {
        super::export_statistics(self.client, &statistics);
    }
}

fn keys(tpl: &rdkafka::TopicPartitionList) -> Vec<PartitionKey> {
    tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect()
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // Revocations are applied before the partitions go, so the stage
        // sees them on its next step and stops storing offsets for them.
        if let Rebalance::Revoke(tpl) = rebalance {
            let parts = keys(tpl);
            tracing::info!(client = self.client, partitions = ?parts, "partitions revoked");
            let mut a = self.lock();
            for p in &parts {
                a.held.remove(p);
            }
            a.revoked.extend(parts);
            // Under the lock: the watch sets the gauge again from it.
            self.publish(a.held.len());
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts = keys(tpl);
                tracing::info!(client = self.client, partitions = ?parts, "partitions assigned");
                let mut a = self.lock();
                a.held.extend(parts);
                self.publish(a.held.len());
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(client = self.client, error = %e, "rebalance error"),
        }
    }
}

/// How long a consumer may hold nothing while partitions of its topics are
/// unowned before it reports itself unhealthy: long enough for a rebalance
/// and a static member's rejoin to finish.
pub const STUCK_AFTER: Duration = Duration::from_secs(30);

/// Watches a consumer's group until `shutdown`: every `every`, counts the
/// subscribed topics' partitions that no member of the group owns. A
/// consumer that holds nothing while some are unowned for [`STUCK_AFTER`]
/// is marked unhealthy (its `/healthz` fails) and logged; it recovers by
/// itself if the group assigns it work again.
pub fn watch(
    args: &KafkaArgs,
    group_id: &str,
    topics: Vec<String>,
    context: &GroupContext,
    every: Duration,
    shutdown: CancellationToken,
) -> Result<(), rdkafka::error::KafkaError> {
    // Its own client: describing a group is a blocking call, and it must not
    // share the consumer's queue.
    let probe: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &args.brokers).create()?;
    let group = group_id.to_owned();
    let assignment = context.assignment.clone();
    let ready = context.ready.clone();
    let client = context.client;
    std::thread::Builder::new()
        .name(format!("{client}-watch"))
        .spawn(move || {
            let mut stuck_since: Option<std::time::Instant> = None;
            let mut described_once = false;
            let mut undescribed = 0;
            let mut describe = true;
            while !shutdown.is_cancelled() {
                let held = {
                    let a = assignment.lock().unwrap_or_else(|p| p.into_inner());
                    // Set again every round, under the lock the rebalances
                    // hold: the exporter drops a gauge nobody set for a
                    // minute, and DroplineConsumerStuck needs this one
                    // however long the assignment stays as it is.
                    ::metrics::gauge!(ASSIGNED_PARTITIONS.name, "client" => client).set(a.held.len() as f64);
                    a.held.len()
                };
                let described = if describe { unowned_partitions(&probe, &group, &topics) } else { Ok(None) };
                match described {
                    Ok(None) if !describe => {}
                    // The broker cannot say what its members hold (tansu
                    // answers DescribeGroups with an error or without
                    // assignments): nothing to judge by, and asking again
                    // only loads it. Readiness still follows this
                    // consumer's own assignment.
                    Ok(None) | Err(_)
                        if !described_once && {
                            undescribed += 1;
                            undescribed >= 3
                        } =>
                    {
                        tracing::info!(client, group = %group,
                            "the broker does not describe its groups' assignments; the stuck-consumer watch is off");
                        describe = false;
                    }
                    Ok(None) => {}
                    Ok(Some(unowned)) => {
                        described_once = true;
                        ::metrics::gauge!(UNOWNED_PARTITIONS.name, "client" => client).set(unowned as f64);
                        if held == 0 && unowned > 0 {
                            let since = *stuck_since.get_or_insert_with(std::time::Instant::now);
                            if since.elapsed() >= STUCK_AFTER && ready.healthy() {
                                tracing::error!(
                                    client,
                                    group = %group,
                                    unowned,
                                    "this consumer holds no partitions while the group leaves some unowned; \
                                     reporting unhealthy"
                                );
                                ready.set_healthy(false);
                            }
                        } else {
                            stuck_since = None;
                            if !ready.healthy() {
                                tracing::info!(client, group = %group, held, "consumer holds work again; healthy");
                            }
                            ready.set_healthy(true);
                        }
                    }
                    // A broker that cannot describe the group tells nothing
                    // either way.
                    Err(e) => tracing::debug!(client, error = %e, "describing the consumer group failed"),
                }
                // Sleeps in short steps so shutdown is noticed soon.
                let until = std::time::Instant::now() + every;
                while std::time::Instant::now() < until && !shutdown.is_cancelled() {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
        .map_err(|e| rdkafka::error::KafkaError::ClientCreation(e.to_string()))?;
    Ok(())
}

/// Partitions of `topics` that no member of `group` is assigned; `None`
/// when the group description carries no member's assignment to read.
fn unowned_partitions(
    probe: &BaseConsumer,
    group: &str,
    topics: &[String],
) -> Result<Option<usize>, rdkafka::error::KafkaError> {
    let timeout = Duration::from_secs(5);
    let mut all: BTreeSet<PartitionKey> = BTreeSet::new();
    for topic in topics {
        let metadata = probe.fetch_metadata(Some(topic), timeout)?;
        for t in metadata.topics() {
            all.extend(t.partitions().iter().map(|p| (t.name().to_owned(), p.id())));
        }
    }
    let groups = probe.fetch_group_list(Some(group), timeout)?;
    let mut owned: BTreeSet<PartitionKey> = BTreeSet::new();
    let mut described = false;
    for g in groups.groups() {
        for member in g.members() {
            // An assignment that decodes, even to no partitions, is a
            // statement; absent or empty bytes say nothing.
            if let Some(parts) = member.assignment().filter(|b| !b.is_empty()).and_then(decode_assignment) {
                described = true;
                owned.extend(parts);
            }
        }
    }
    Ok(described.then(|| all.difference(&owned).count()))
}

/// Reads the partitions of a consumer-protocol member assignment: a version
/// (int16), then an array (int32 count) of topic (int16-length string) and
/// partitions (int32 count of int32); user data after that is ignored.
pub fn decode_assignment(bytes: &[u8]) -> Option<Vec<PartitionKey>> {
    struct Reader<'a>(&'a [u8]);
    impl Reader<'_> {
        fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
            let (head, rest) = self.0.split_at_checked(N)?;
            self.0 = rest;
            head.try_into().ok()
        }
        fn i16(&mut self) -> Option<i16> {
            self.take::<2>().map(i16::from_be_bytes)
        }
        fn i32(&mut self) -> Option<i32> {
            self.take::<4>().map(i32::from_be_bytes)
        }
        fn string(&mut self) -> Option<String> {
            let len = usize::try_from(self.i16()?).ok()?;
            let (s, rest) = self.0.split_at_checked(len)?;
            self.0 = rest;
            String::from_utf8(s.to_vec()).ok()
        }
    }
    let mut r = Reader(bytes);
    r.i16()?;
    let topics = r.i32()?;
    let mut out = Vec::new();
    for _ in 0..topics.max(0) {
        let topic = r.string()?;
        let partitions = r.i32()?;
        for _ in 0..partitions.max(0) {
            out.push((topic.clone(), r.i32()?));
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_assignments_decode() {
        let mut bytes = vec![0, 1, 0, 0, 0, 2];
        for (topic, parts) in [("a.intents", vec![0i32, 3]), ("b", vec![7])] {
            bytes.extend((topic.len() as i16).to_be_bytes());
            bytes.extend(topic.as_bytes());
            bytes.extend((parts.len() as i32).to_be_bytes());
            for p in parts {
                bytes.extend(p.to_be_bytes());
            }
        }
        bytes.extend((-1i32).to_be_bytes());
        let decoded = decode_assignment(&bytes).unwrap();
        assert_eq!(decoded, vec![("a.intents".into(), 0), ("a.intents".into(), 3), ("b".into(), 7)]);
        // Truncated input is refused, not misread.
        assert!(decode_assignment(&bytes[..10]).is_none());
        assert_eq!(decode_assignment(&[0, 0, 0, 0, 0, 0]).unwrap(), vec![]);
    }
}
