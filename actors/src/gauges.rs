//! Each stage's live counters: atomics its supervisor writes once per
//! message, read at any time by stats, metrics and the progress line.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Live counters of one stage, written by its supervisor, read by stats.
///
/// A batch stage's supervisor counts batches (they are its items); the
/// items in them are counted in [`BatchItems`].
#[derive(Debug, Default)]
pub(crate) struct StageGauges {
    pub(crate) queued: AtomicUsize,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) waiting_downstream: AtomicUsize,
    pub(crate) workers: AtomicUsize,
    /// Items received from upstream; bumped once per batch.
    pub(crate) admitted: AtomicU64,
    pub(crate) processed: AtomicU64,
    pub(crate) failed: AtomicU64,
    /// Items sent round again after a failed attempt; the retry code bumps it.
    pub(crate) retried: AtomicU64,
    /// Handler time of finished items, in nanoseconds; bumped once per report.
    pub(crate) busy_ns: AtomicU64,
    /// Items reported stalled.
    pub(crate) stalled: AtomicU64,
    /// Items its split made (children), so far; its splitter bumps it.
    pub(crate) derived: AtomicU64,
    /// Children its split made that are not finished (nor split again):
    /// its splitter adds, the tracker takes away; bounded by the
    /// splitter's budget.
    pub(crate) derived_live: AtomicUsize,
    /// Threads given up and still running (Thread and Cpu stages); the
    /// stage's runner keeps it.
    pub(crate) stuck_threads: Arc<AtomicUsize>,
    /// A batch stage's items (`None` for other stages).
    pub(crate) batch_items: Option<BatchItems>,
}

/// The items of a batch stage's batches: its batcher counts those it takes
/// in, the splitter after it those that leave (or fail alone), and the
/// tracker those that fail with their batch.
#[derive(Debug, Default)]
pub(crate) struct BatchItems {
    pub(crate) admitted: AtomicU64,
    pub(crate) processed: AtomicU64,
    pub(crate) failed: AtomicU64,
}

/// A stage's counts of items: `admitted`, `processed`, `failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ItemCounts {
    pub(crate) admitted: u64,
    pub(crate) processed: u64,
    pub(crate) failed: u64,
}

impl StageGauges {
    /// The gauges of a stage configured as `config`.
    pub(crate) fn for_stage(config: &crate::config::StageConfig) -> Self {
        StageGauges {
            batch_items: config.batch_size.map(|_| BatchItems::default()),
            ..StageGauges::default()
        }
    }

    /// Its own counts: of batches, for a batch stage.
    pub(crate) fn own(&self) -> ItemCounts {
        ItemCounts {
            admitted: self.admitted.load(Ordering::Relaxed),
            processed: self.processed.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }

    /// Its counts of items (a batch stage's: the items in its batches).
    pub(crate) fn items(&self) -> ItemCounts {
        match &self.batch_items {
            None => self.own(),
            Some(b) => ItemCounts {
                admitted: b.admitted.load(Ordering::Relaxed),
                processed: b.processed.load(Ordering::Relaxed),
                failed: b.failed.load(Ordering::Relaxed),
            },
        }
    }

    /// Counts `n` items of a batch stage as `counter` picks (nothing for
    /// another stage).
    pub(crate) fn count_batch_items(&self, counter: fn(&BatchItems) -> &AtomicU64, n: u64) {
        if let Some(b) = &self.batch_items {
            counter(b).fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn held(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
            + self.in_flight.load(Ordering::Relaxed)
            + self.waiting_downstream.load(Ordering::Relaxed)
    }

    /// Items finished in it, either way (a batch stage's: the items).
    pub(crate) fn done(&self) -> u64 {
        let items = self.items();
        items.processed + items.failed
    }
}
