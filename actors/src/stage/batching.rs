//! How many items a worker is given at once.
//!
//! An idle worker gets an even share of the queue, but at least about
//! [`SPLIT_WORK`] and at most about [`BATCH_WORK`] of work (measured from
//! the stage's recent service time) and [`MAX_BATCH`] items, so fast
//! handlers run many items per message while slow ones go one at a time
//! to every idle worker. One at a time until the service time is known.
//!
//! **Invariant**: a batch holds at least one item, at most [`MAX_BATCH`],
//! and never more than are queued.

use std::time::Duration;

/// The most items a worker is given at once.
pub(super) const MAX_BATCH: usize = 64;
/// About how much work (by recent service time) a worker is given at most.
pub(super) const BATCH_WORK: Duration = Duration::from_millis(1);
/// Less work than this is not split between workers.
pub(super) const SPLIT_WORK: Duration = Duration::from_micros(20);

/// The stage's recent service time, for sizing batches.
#[derive(Debug, Default)]
pub(super) struct Batching {
    /// Recent per-item service time, in nanoseconds (0 = not known yet).
    service_ns: f64,
}

impl Batching {
    /// A worker spent `busy` on `items` items.
    pub(super) fn observe(&mut self, busy: Duration, items: usize) {
        if items == 0 {
            return;
        }
        let per_item = busy.as_nanos() as f64 / items as f64;
        self.service_ns = if self.service_ns == 0.0 {
            per_item
        } else {
            0.8 * self.service_ns + 0.2 * per_item
        };
    }

    /// How many of `queued` items the next idle worker gets, with `idle`
    /// other workers idle as well.
    pub(super) fn batch(&self, queued: usize, idle: usize) -> usize {
        let (least, most) = self.bounds();
        let share = queued.div_ceil(idle + 1);
        let take = share.max(least).min(most).min(queued);
        debug_assert!(queued == 0 || (1..=MAX_BATCH).contains(&take));
        take
    }

    /// The items of a full batch: about [`BATCH_WORK`] worth, at most
    /// [`MAX_BATCH`] (1 until the service time is known).
    pub(super) fn full(&self) -> usize {
        self.bounds().1
    }

    /// At least [`SPLIT_WORK`] worth (splitting less work between workers
    /// costs more than it gains), at most [`BATCH_WORK`] worth and
    /// [`MAX_BATCH`].
    fn bounds(&self) -> (usize, usize) {
        if self.service_ns == 0.0 {
            return (1, 1);
        }
        let items = |work: Duration| {
            ((work.as_nanos() as f64 / self.service_ns) as usize).clamp(1, MAX_BATCH)
        };
        (items(SPLIT_WORK), items(BATCH_WORK))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_items_go_in_large_batches_slow_ones_one_by_one() {
        let mut batching = Batching::default();
        assert_eq!(batching.batch(100, 0), 1, "one at a time until measured");
        batching.observe(Duration::from_micros(10), 10); // 1 µs each
        assert_eq!(batching.batch(1_000, 0), MAX_BATCH);
        // Shared between idle workers, but not below SPLIT_WORK (20 items).
        assert_eq!(batching.batch(40, 3), 20);
        let mut slow = Batching::default();
        slow.observe(Duration::from_millis(50), 1);
        assert_eq!(slow.batch(100, 0), 1);
        assert_eq!(slow.batch(0, 0), 0);
    }
}
