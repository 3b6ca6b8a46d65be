//! Each stage's live counters: atomics its supervisor writes once per
//! message, read at any time by stats, metrics and the progress line.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Live counters of one stage, written by its supervisor, read by stats.
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
}

impl StageGauges {
    pub(crate) fn held(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
            + self.in_flight.load(Ordering::Relaxed)
            + self.waiting_downstream.load(Ordering::Relaxed)
    }

    /// Items its handler finished, either way.
    pub(crate) fn done(&self) -> u64 {
        self.processed.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed)
    }
}
