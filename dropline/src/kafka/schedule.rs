//! The delay queue of the delayed stages (the expirer's holds, the
//! notifier's deliveries): what a partition gave them waits here, per
//! partition, until it falls due, and is finished in any order.
//!
//! Nothing here is the source of truth. The committed offset of a partition
//! never passes its oldest item still waiting, so after a restart or a
//! rebalance everything unfinished is read again from Kafka. Items are
//! indexed by due time as well as offset: a partition may mix items with
//! different delays, and a short one must not wait behind a long one.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::PartitionKey;

#[derive(Debug)]
struct Partition<T> {
    /// Offset -> (due time, item) still waiting (or being worked on).
    waiting: BTreeMap<i64, (i64, T)>,
    /// (due time, offset) of everything in `waiting`.
    by_due: BTreeSet<(i64, i64)>,
    /// One past the highest offset read.
    next_offset: i64,
    /// The offset last handed out for storing.
    stored: i64,
    paused: bool,
}

impl<T> Partition<T> {
    /// Everything before this offset is done.
    fn committable(&self) -> i64 {
        self.waiting.keys().next().copied().unwrap_or(self.next_offset)
    }
}

/// An item whose time has come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due<T> {
    pub partition: PartitionKey,
    pub offset: i64,
    /// When it fell due (Unix milliseconds).
    pub at_ms: i64,
    pub item: T,
}

#[derive(Debug)]
pub struct Schedule<T> {
    partitions: HashMap<PartitionKey, Partition<T>>,
    max_per_partition: usize,
}

impl<T: Clone> Schedule<T> {
    /// A partition is paused while it has `max_per_partition` items waiting.
    pub fn new(max_per_partition: usize) -> Self {
        Self { partitions: HashMap::new(), max_per_partition }
    }

    /// Records a message read at `offset`: an item due at a time (Unix
    /// milliseconds), or `None` for one with nothing to wait for (it was
    /// dead-lettered, or needed nothing).
    pub fn add(&mut self, partition: PartitionKey, offset: i64, item: Option<(i64, T)>) {
        let p = self.partitions.entry(partition).or_insert_with(|| Partition {
            waiting: BTreeMap::new(),
            by_due: BTreeSet::new(),
            next_offset: offset,
            stored: offset,
            paused: false,
        });
        p.next_offset = p.next_offset.max(offset + 1);
        if let Some((due, item)) = item {
            p.by_due.insert((due, offset));
            p.waiting.insert(offset, (due, item));
        }
    }

    /// Items due at `now_ms`, earliest first, at most `limit`: up to
    /// `limit` from each partition, then the earliest of those, so one
    /// partition full of due items never hides another's.
    pub fn due(&self, now_ms: i64, limit: usize) -> Vec<Due<T>> {
        let mut out = Vec::new();
        for (key, p) in &self.partitions {
            for &(at_ms, offset) in p.by_due.iter().take(limit) {
                if at_ms > now_ms {
                    break;
                }
                let item = p.waiting[&offset].1.clone();
                out.push(Due { partition: key.clone(), offset, at_ms, item });
            }
        }
        out.sort_by_key(|d| d.at_ms);
        out.truncate(limit);
        out
    }

    /// The item at `offset` needs nothing more.
    pub fn done(&mut self, partition: &PartitionKey, offset: i64) {
        if let Some(p) = self.partitions.get_mut(partition) {
            if let Some((due, _)) = p.waiting.remove(&offset) {
                p.by_due.remove(&(due, offset));
            }
        }
    }

    /// Looks at the item again at `at_ms`, as it now is (`item`).
    pub fn retry_at(&mut self, partition: &PartitionKey, offset: i64, at_ms: i64, item: T) {
        if let Some(p) = self.partitions.get_mut(partition) {
            if let Some(slot) = p.waiting.get_mut(&offset) {
                p.by_due.remove(&(slot.0, offset));
                *slot = (at_ms, item);
                p.by_due.insert((at_ms, offset));
            }
        }
    }

    /// The items still waiting in `partition`, in offset order.
    pub fn waiting_in(&self, partition: &PartitionKey) -> impl Iterator<Item = (i64, &T)> {
        self.partitions.get(partition).into_iter().flat_map(|p| p.waiting.iter().map(|(o, (_, item))| (*o, item)))
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
    /// drop items just read again, and the next commit would pass them
    /// unfinished.
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

    fn p0() -> PartitionKey {
        ("t".to_owned(), 0)
    }

    fn at(due: i64) -> Option<(i64, u32)> {
        Some((due, 7))
    }

    #[test]
    fn a_partition_given_back_never_commits_past_items_read_again() {
        let mut s = Schedule::new(100);
        // Items at 10 and 11 wait; 12..=49 were read and needed nothing.
        s.add(p0(), 10, at(5_000));
        s.add(p0(), 11, at(5_000));
        for offset in 12..50 {
            s.add(p0(), offset, None);
        }
        assert_eq!(s.take_committable(), vec![], "nothing passes the item at 10");
        // A rebalance takes the partition and gives it back: the consumer
        // loop hands the revocation over, then what it reads again from the
        // committed offset, 10.
        s.forget(&p0());
        s.add(p0(), 10, at(5_000));
        s.add(p0(), 11, at(5_000));
        s.add(p0(), 12, None);
        assert_eq!(s.take_committable(), vec![]);
        s.done(&p0(), 10);
        assert_eq!(s.take_committable(), vec![(p0(), 11)]);
        assert_eq!(s.waiting(), 1);
    }

    #[test]
    fn short_delays_do_not_wait_behind_long_ones() {
        let mut s = Schedule::new(100);
        s.add(p0(), 10, at(5_000));
        s.add(p0(), 11, at(1_000));
        let due = s.due(2_000, 10);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].offset, 11);
    }

    #[test]
    fn a_partition_full_of_due_items_does_not_hide_an_earlier_one_elsewhere() {
        let mut s = Schedule::new(1_000);
        let p1: PartitionKey = ("t".to_owned(), 1);
        // Whichever partition the map visits first, the earliest item of
        // all comes out.
        for o in 0..10 {
            s.add(p0(), o, at(500 + o));
            s.add(p1.clone(), o, at(600 + o));
        }
        s.add(p1.clone(), 10, at(100));
        let due = s.due(10_000, 3);
        assert_eq!(
            due.iter().map(|d| (d.partition.1, d.at_ms)).collect::<Vec<_>>(),
            vec![(1, 100), (0, 500), (0, 501)]
        );
    }

    #[test]
    fn the_committed_offset_never_passes_a_waiting_item() {
        let mut s = Schedule::new(100);
        s.add(p0(), 10, at(5_000));
        s.add(p0(), 11, at(1_000));
        s.add(p0(), 12, None);
        s.done(&p0(), 11);
        assert!(s.take_committable().is_empty(), "offset 10 still waits");
        s.done(&p0(), 10);
        assert_eq!(s.take_committable(), vec![(p0(), 13)]);
        assert!(s.take_committable().is_empty(), "nothing new to store");
    }

    #[test]
    fn an_item_retried_later_waits_for_its_new_time_as_it_now_is() {
        let mut s = Schedule::new(100);
        s.add(p0(), 1, at(1_000));
        s.retry_at(&p0(), 1, 3_000, 8);
        assert!(s.due(2_000, 10).is_empty());
        let due = s.due(3_000, 10);
        assert_eq!((due.len(), due[0].item, due[0].at_ms), (1, 8, 3_000));
        assert_eq!(s.waiting_in(&p0()).collect::<Vec<_>>(), vec![(1, &8)]);
    }

    #[test]
    fn full_partitions_pause_and_resume_at_half() {
        let mut s = Schedule::new(4);
        for o in 0..4 {
            s.add(p0(), o, at(1_000 + o));
        }
        assert_eq!(s.flow_changes(), (vec![p0()], vec![]));
        assert_eq!(s.paused(), 1);
        s.done(&p0(), 0);
        assert_eq!(s.flow_changes(), (vec![], vec![]), "3 waiting: still above half");
        s.done(&p0(), 1);
        assert_eq!(s.flow_changes(), (vec![], vec![p0()]));
    }

    #[test]
    fn forgetting_a_partition_drops_its_items() {
        let mut s = Schedule::new(10);
        s.add(p0(), 1, at(1));
        s.forget(&p0());
        assert_eq!(s.waiting(), 0);
        assert!(s.due(10, 10).is_empty());
    }
}
