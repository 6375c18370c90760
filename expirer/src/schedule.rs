//! The expirer's delay queue: holds read from Kafka wait here, per
//! partition, until their deadline.
//!
//! Nothing here is the source of truth. The committed offset of a partition
//! never passes its oldest hold that is still waiting, so after a restart or
//! a rebalance every unreleased hold is read again from Kafka. Holds are
//! indexed by deadline as well as offset: a partition may mix events with
//! different TTLs, and a short-TTL hold must not wait behind a long one.

use std::collections::{BTreeMap, BTreeSet, HashMap};

pub use dropline::kafka::PartitionKey;
use dropline::messages::HoldExpiry;

/// A hold waiting for its deadline, with the request id of the purchase
/// that created it (for the logs and the order change it ends in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub hold: HoldExpiry,
    pub request_id: Option<String>,
}

#[derive(Debug, Default)]
struct Partition {
    /// Offset -> hold still waiting (or being released).
    waiting: BTreeMap<i64, Waiting>,
    /// (deadline, offset) of everything in `waiting`.
    by_deadline: BTreeSet<(i64, i64)>,
    /// One past the highest offset read.
    next_offset: i64,
    /// The offset last handed out for storing.
    stored: i64,
    paused: bool,
}

impl Partition {
    /// Everything before this offset is done.
    fn committable(&self) -> i64 {
        self.waiting.keys().next().copied().unwrap_or(self.next_offset)
    }
}

/// A hold whose deadline has come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub partition: PartitionKey,
    pub offset: i64,
    pub hold: HoldExpiry,
    pub request_id: Option<String>,
}

#[derive(Debug)]
pub struct Schedule {
    partitions: HashMap<PartitionKey, Partition>,
    max_per_partition: usize,
}

impl Schedule {
    pub fn new(max_per_partition: usize) -> Self {
        Self { partitions: HashMap::new(), max_per_partition }
    }

    /// Records a message read at `offset`: a hold to wait for, or `None`
    /// for one with nothing to wait for (it was dead-lettered).
    pub fn add(&mut self, partition: PartitionKey, offset: i64, waiting: Option<Waiting>) {
        let p = self.partitions.entry(partition).or_insert_with(|| Partition { stored: offset, ..Default::default() });
        p.next_offset = p.next_offset.max(offset + 1);
        if let Some(w) = waiting {
            p.by_deadline.insert((w.hold.expires_at_ms, offset));
            p.waiting.insert(offset, w);
        }
    }

    /// Holds due at `now_ms`, earliest deadline first, at most `limit`.
    pub fn due(&self, now_ms: i64, limit: usize) -> Vec<Due> {
        let mut out = Vec::new();
        for (key, p) in &self.partitions {
            for &(deadline, offset) in &p.by_deadline {
                if deadline > now_ms || out.len() >= limit {
                    break;
                }
                let w = &p.waiting[&offset];
                out.push(Due {
                    partition: key.clone(),
                    offset,
                    hold: w.hold.clone(),
                    request_id: w.request_id.clone(),
                });
            }
        }
        out.sort_by_key(|d| d.hold.expires_at_ms);
        out.truncate(limit);
        out
    }

    /// The hold at `offset` needs nothing more.
    pub fn done(&mut self, partition: &PartitionKey, offset: i64) {
        if let Some(p) = self.partitions.get_mut(partition) {
            if let Some(w) = p.waiting.remove(&offset) {
                p.by_deadline.remove(&(w.hold.expires_at_ms, offset));
            }
        }
    }

    /// Looks at the hold again at `deadline_ms` (the ledger's clock said it
    /// was not due yet).
    pub fn retry_at(&mut self, partition: &PartitionKey, offset: i64, deadline_ms: i64) {
        if let Some(p) = self.partitions.get_mut(partition) {
            if let Some(w) = p.waiting.get_mut(&offset) {
                p.by_deadline.remove(&(w.hold.expires_at_ms, offset));
                w.hold.expires_at_ms = deadline_ms;
                p.by_deadline.insert((deadline_ms, offset));
            }
        }
    }

    /// Offsets to store: for each partition whose done prefix grew, the
    /// offset after it.
    pub fn take_committable(&mut self) -> Vec<(PartitionKey, i64)> {
        let mut out = Vec::new();
        for (key, p) in &mut self.partitions {
            let c = p.committable();
            if c > p.stored {
                p.stored = c;
                out.push((key.clone(), c));
            }
        }
        out
    }

    /// Partitions to pause (full) and to resume (drained to half), updating
    /// their flags.
    pub fn flow_changes(&mut self) -> (Vec<PartitionKey>, Vec<PartitionKey>) {
        let (mut pause, mut resume) = (Vec::new(), Vec::new());
        for (key, p) in &mut self.partitions {
            if !p.paused && p.waiting.len() >= self.max_per_partition {
                p.paused = true;
                pause.push(key.clone());
            } else if p.paused && p.waiting.len() <= self.max_per_partition / 2 {
                p.paused = false;
                resume.push(key.clone());
            }
        }
        (pause, resume)
    }

    /// Forgets a partition this consumer no longer owns. A partition given
    /// back is read again from its committed offset and must start from a
    /// clean slate there, so the consumer loop calls this before it hands
    /// over any message read after the revocation: forgetting after would
    /// drop holds just read again, and the next commit would pass them
    /// unreleased.
    pub fn forget(&mut self, partition: &PartitionKey) {
        self.partitions.remove(partition);
    }

    pub fn waiting(&self) -> usize {
        self.partitions.values().map(|p| p.waiting.len()).sum()
    }

    pub fn paused(&self) -> usize {
        self.partitions.values().filter(|p| p.paused).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn hold(deadline: i64) -> Option<Waiting> {
        let hold = HoldExpiry { order_id: Uuid::new_v4(), event_id: 1, expires_at_ms: deadline };
        Some(Waiting { hold, request_id: None })
    }

    fn p0() -> PartitionKey {
        ("t".to_owned(), 0)
    }

    #[test]
    fn a_partition_given_back_never_commits_past_holds_read_again() {
        let mut s = Schedule::new(100);
        // Holds at 10 and 11 wait; 12..=49 were read and needed nothing.
        s.add(p0(), 10, hold(5_000));
        s.add(p0(), 11, hold(5_000));
        for offset in 12..50 {
            s.add(p0(), offset, None);
        }
        assert_eq!(s.take_committable(), vec![], "nothing passes the hold at 10");
        // A rebalance takes the partition and gives it back: the consumer
        // loop hands the revocation over, then what it reads again from the
        // committed offset, 10.
        s.forget(&p0());
        s.add(p0(), 10, hold(5_000));
        s.add(p0(), 11, hold(5_000));
        s.add(p0(), 12, None);
        assert_eq!(s.take_committable(), vec![]);
        s.done(&p0(), 10);
        assert_eq!(s.take_committable(), vec![(p0(), 11)]);
        assert_eq!(s.waiting(), 1);
    }

    #[test]
    fn short_deadlines_do_not_wait_behind_long_ones() {
        let mut s = Schedule::new(100);
        s.add(p0(), 10, hold(5_000));
        s.add(p0(), 11, hold(1_000));
        let due = s.due(2_000, 10);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].offset, 11);
    }

    #[test]
    fn the_committed_offset_never_passes_a_waiting_hold() {
        let mut s = Schedule::new(100);
        s.add(p0(), 10, hold(5_000));
        s.add(p0(), 11, hold(1_000));
        s.add(p0(), 12, None);
        s.done(&p0(), 11);
        assert!(s.take_committable().is_empty(), "offset 10 still waits");
        s.done(&p0(), 10);
        assert_eq!(s.take_committable(), vec![(p0(), 13)]);
        assert!(s.take_committable().is_empty(), "nothing new to store");
    }

    #[test]
    fn a_hold_not_yet_due_by_the_ledger_clock_is_retried_later() {
        let mut s = Schedule::new(100);
        s.add(p0(), 1, hold(1_000));
        s.retry_at(&p0(), 1, 3_000);
        assert!(s.due(2_000, 10).is_empty());
        assert_eq!(s.due(3_000, 10).len(), 1);
    }

    #[test]
    fn full_partitions_pause_and_resume_at_half() {
        let mut s = Schedule::new(4);
        for o in 0..4 {
            s.add(p0(), o, hold(1_000 + o));
        }
        assert_eq!(s.flow_changes(), (vec![p0()], vec![]));
        assert_eq!(s.paused(), 1);
        s.done(&p0(), 0);
        assert_eq!(s.flow_changes(), (vec![], vec![]), "3 waiting: still above half");
        s.done(&p0(), 1);
        assert_eq!(s.flow_changes(), (vec![], vec![p0()]));
    }

    #[test]
    fn forgetting_a_partition_drops_its_holds() {
        let mut s = Schedule::new(10);
        s.add(p0(), 1, hold(1));
        s.forget(&p0());
        assert_eq!(s.waiting(), 0);
        assert!(s.due(10, 10).is_empty());
    }
}
