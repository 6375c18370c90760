//! Where a queued purchase stands in the allocators' line: its intent's
//! offset against the allocator group's committed offset on its partition.
//! Every intent of an event is on one partition (the event id is the key),
//! so the intents ahead of it there are the ones the allocators decide
//! first.
//!
//! One task per ingress reads the group's committed offsets twice a second;
//! a status request reads them from memory. The allocators commit what they
//! decided every second, so a place can be up to about a second behind, and
//! it only ever falls.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dropline::config::KafkaArgs;
use dropline::kafka::GroupOffsets;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often the allocator group's offsets are read.
const REFRESH: Duration = Duration::from_millis(500);

/// The allocator group's committed offset per partition of the intents
/// topic, as last read (the oldest offset still there where nothing is
/// committed yet).
#[derive(Clone)]
pub struct AllocationLine {
    decided_up_to: Arc<RwLock<HashMap<i32, i64>>>,
    /// Counts the reads, for the streams of queued purchases to wake on.
    reads: Arc<watch::Sender<u64>>,
}

impl Default for AllocationLine {
    fn default() -> Self {
        Self { decided_up_to: Arc::default(), reads: Arc::new(watch::channel(0).0) }
    }
}

impl AllocationLine {
    /// Intents ahead of the one written at `offset` of `partition`, not yet
    /// decided; `None` until the group's offsets have been read.
    pub fn ahead(&self, partition: i32, offset: i64) -> Option<u64> {
        let read = self.decided_up_to.read().unwrap_or_else(|e| e.into_inner());
        read.get(&partition).map(|committed| (offset - committed).max(0) as u64)
    }

    /// Whether the allocators are past the intent written at `offset` of
    /// `partition`: it is decided.
    pub fn passed(&self, partition: i32, offset: i64) -> bool {
        let read = self.decided_up_to.read().unwrap_or_else(|e| e.into_inner());
        read.get(&partition).is_some_and(|committed| *committed > offset)
    }

    /// Changes once per read of the offsets.
    pub fn updates(&self) -> watch::Receiver<u64> {
        self.reads.subscribe()
    }

    /// Reads `group`'s offsets on `topic` until shutdown.
    pub async fn follow(self, kafka: KafkaArgs, group: String, topic: String, shutdown: CancellationToken) {
        let probe = match GroupOffsets::new(&kafka, &group, Duration::from_secs(5)) {
            Ok(probe) => probe,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the allocator group's offsets; no places in its line");
                return;
            }
        };
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let topics = [topic];
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match probe.read(&topics).await {
                Ok(partitions) => {
                    let committed = partitions.iter().map(|p| (p.partition, p.committed.unwrap_or(p.low).max(p.low)));
                    let mut write = self.decided_up_to.write().unwrap_or_else(|e| e.into_inner());
                    *write = committed.collect();
                    drop(write);
                    self.reads.send_modify(|n| *n += 1);
                }
                Err(e) => tracing::debug!(error = %e, "allocator group offsets not read"),
            }
        }
    }
}
