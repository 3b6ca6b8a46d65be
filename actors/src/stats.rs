//! Pipeline and per-stage statistics.
//!
//! Counts come from each stage's gauges (atomics the stage updates once per
//! message, readable at any time); durations and percentiles come from the
//! tracker, which records each finished item's per-stage times in HDR
//! histograms (when tracking is on). Both serialise, durations as seconds.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::config::ExecutionType;
use crate::item::{ItemErrorKind, WorkItemResult};
use crate::shared::Shared;

/// A snapshot of a pipeline: the seed's fields plus per-stage numbers.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct PipelineStats {
    /// The pipeline's name.
    pub pipeline_name: String,
    /// Time since the pipeline started.
    #[serde(serialize_with = "secs")]
    pub elapsed: Duration,
    /// Items taken into the pipeline so far.
    pub admitted_items: u64,
    /// Items in the pipeline now: admitted and not yet finished.
    pub active_items: u64,
    /// Items in each stage now: queued, being worked on, or waiting for the
    /// next stage.
    pub active_by_stage: BTreeMap<String, usize>,
    /// Items finished either way (the seed's `completed_items`).
    pub completed_items: u64,
    /// Items that failed (including cancelled ones).
    pub failed_items: u64,
    /// Items cancelled by an abort (part of `failed_items`).
    pub cancelled_items: u64,
    /// Successful share of `completed_items`; 1.0 before any finished.
    pub success_rate: f64,
    /// Mean created-to-finished time of finished items (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub average_duration: Option<Duration>,
    /// Finished items per second since the start.
    pub items_per_second: f64,
    /// Failed `refill` calls so far (each is also a `SourceError` event).
    pub source_errors: u64,
    /// One entry per stage, in order.
    pub stages: Vec<StageStats>,
}

/// A snapshot of one stage.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct StageStats {
    /// The stage's name.
    pub name: String,
    /// Its execution model.
    pub execution_type: ExecutionType,
    /// Workers alive now.
    pub workers: usize,
    /// Items its handler finished successfully.
    pub processed: u64,
    /// Items that failed in it.
    pub failed: u64,
    /// Items it retried.
    pub retried: u64,
    /// Items waiting in its queue now.
    pub queued: usize,
    /// Items its workers hold now.
    pub in_flight: usize,
    /// Items done here and waiting for the next stage to ask for them.
    pub waiting_downstream: usize,
    /// Mean handler time (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub average_duration: Option<Duration>,
    /// Median handler time (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub p50_duration: Option<Duration>,
    /// 99th-percentile handler time (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub p99_duration: Option<Duration>,
    /// Mean time items waited in its queue (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub average_queue_wait: Option<Duration>,
}

impl PipelineStats {
    /// The stats of the stage called `name`.
    pub fn stage(&self, name: &str) -> Option<&StageStats> {
        self.stages.iter().find(|s| s.name == name)
    }
}

impl std::fmt::Display for PipelineStats {
    /// One line, the seed's stats log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: active {} completed {} failed {} success {:.1}% {:.0} items/s",
            self.pipeline_name,
            self.active_items,
            self.completed_items,
            self.failed_items,
            self.success_rate * 100.0,
            self.items_per_second
        )?;
        for s in &self.stages {
            write!(
                f,
                " | {} q{} w{} done {} failed {}",
                s.name, s.queued, s.in_flight, s.processed, s.failed
            )?;
        }
        Ok(())
    }
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn secs_opt<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

/// Live counters of one stage, written by its supervisor, read by stats.
#[derive(Debug, Default)]
pub(crate) struct StageGauges {
    pub(crate) queued: AtomicUsize,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) waiting_downstream: AtomicUsize,
    pub(crate) workers: AtomicUsize,
    pub(crate) processed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) retried: AtomicU64,
}

impl StageGauges {
    pub(crate) fn held(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
            + self.in_flight.load(Ordering::Relaxed)
            + self.waiting_downstream.load(Ordering::Relaxed)
    }
}

/// Duration distribution, in microseconds.
#[derive(Debug)]
pub(crate) struct Timings {
    hist: Histogram<u64>,
    sum_micros: u128,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            // 1 µs .. 1 day, 2 significant digits: a few KiB per histogram.
            hist: Histogram::new_with_bounds(1, 86_400_000_000, 2)
                .expect("histogram bounds are valid"),
            sum_micros: 0,
        }
    }
}

impl Timings {
    pub(crate) fn record(&mut self, d: Duration) {
        let micros = d.as_micros();
        self.sum_micros += micros;
        self.hist.saturating_record((micros as u64).max(1));
    }

    pub(crate) fn mean(&self) -> Option<Duration> {
        let n = self.hist.len();
        (n > 0).then(|| Duration::from_micros((self.sum_micros / n as u128) as u64))
    }

    pub(crate) fn quantile(&self, q: f64) -> Option<Duration> {
        (!self.hist.is_empty()).then(|| Duration::from_micros(self.hist.value_at_quantile(q)))
    }
}

/// What the tracker has counted and timed; shared, so that stats never wait
/// for the tracker (which may be waiting for a slow subscriber).
#[derive(Debug)]
pub(crate) struct Tally {
    pub(crate) finished: u64,
    pub(crate) failed: u64,
    pub(crate) cancelled: u64,
    total: Timings,
    service: Vec<Timings>,
    queue_wait: Vec<Timings>,
}

impl Tally {
    pub(crate) fn new(stages: usize) -> Self {
        Tally {
            finished: 0,
            failed: 0,
            cancelled: 0,
            total: Timings::default(),
            service: (0..stages).map(|_| Timings::default()).collect(),
            queue_wait: (0..stages).map(|_| Timings::default()).collect(),
        }
    }

    /// Counts (and, with tracking on, times) one finished item.
    pub(crate) fn record(&mut self, result: &WorkItemResult, tracking: bool) {
        self.finished += 1;
        if let Some(error) = &result.error {
            self.failed += 1;
            if error.kind == ItemErrorKind::Cancelled {
                self.cancelled += 1;
            }
        }
        if tracking {
            if let Some(total) = result.total_duration() {
                self.total.record(total);
            }
            for times in &result.metadata.stages {
                let i = times.stage as usize;
                if i >= self.service.len() {
                    continue;
                }
                if let Some(d) = times.duration() {
                    self.service[i].record(d);
                }
                if let Some(d) = times.queue_wait() {
                    self.queue_wait[i].record(d);
                }
            }
        }
    }

    pub(crate) fn snapshot(&self, shared: &Shared) -> PipelineStats {
        let elapsed = shared.started_at().map(|t| t.elapsed()).unwrap_or_default();
        let admitted = shared.admitted();
        let stages: Vec<StageStats> = shared
            .config
            .stages
            .iter()
            .enumerate()
            .map(|(i, config)| {
                let g = &shared.gauges[i];
                StageStats {
                    name: config.name.clone(),
                    execution_type: config.execution_type,
                    workers: g.workers.load(Ordering::Relaxed),
                    processed: g.processed.load(Ordering::Relaxed),
                    failed: g.failed.load(Ordering::Relaxed),
                    retried: g.retried.load(Ordering::Relaxed),
                    queued: g.queued.load(Ordering::Relaxed),
                    in_flight: g.in_flight.load(Ordering::Relaxed),
                    waiting_downstream: g.waiting_downstream.load(Ordering::Relaxed),
                    average_duration: self.service[i].mean(),
                    p50_duration: self.service[i].quantile(0.5),
                    p99_duration: self.service[i].quantile(0.99),
                    average_queue_wait: self.queue_wait[i].mean(),
                }
            })
            .collect();
        PipelineStats {
            pipeline_name: shared.name.to_string(),
            elapsed,
            admitted_items: admitted,
            active_items: admitted.saturating_sub(self.finished),
            active_by_stage: shared
                .config
                .stages
                .iter()
                .zip(&shared.gauges)
                .map(|(s, g)| (s.name.clone(), g.held()))
                .collect(),
            completed_items: self.finished,
            failed_items: self.failed,
            cancelled_items: self.cancelled,
            success_rate: if self.finished == 0 {
                1.0
            } else {
                (self.finished - self.failed) as f64 / self.finished as f64
            },
            average_duration: self.total.mean(),
            items_per_second: if elapsed.is_zero() {
                0.0
            } else {
                self.finished as f64 / elapsed.as_secs_f64()
            },
            source_errors: shared.source_errors.load(Ordering::Relaxed),
            stages,
        }
    }
}
