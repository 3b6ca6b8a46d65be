//! Pipeline and per-stage statistics.
//!
//! Counts come from each stage's gauges (atomics the stage updates once per
//! message, readable at any time); durations and percentiles come from the
//! tracker, which records each finished item's per-stage times in HDR
//! histograms (when tracking is on). Rates and utilisation are measured over
//! the last [`RECENT_WINDOW`], from samples the pipeline takes every
//! second. Both serialise, durations as seconds (`null` when unknown).
//!
//! ```
//! use bergtalzug_actors::stats::PipelineStats;
//!
//! fn report(stats: &PipelineStats) {
//!     println!("{stats}"); // the one-line stats log
//!     if let Some(stage) = stats.bottleneck.as_deref().and_then(|b| stats.stage(b)) {
//!         println!(
//!             "{} is busy {:.0}% of the time, p99 service {:?}",
//!             stage.name,
//!             stage.utilisation * 100.0,
//!             stage.p99_duration
//!         );
//!     }
//!     let json = serde_json::to_string(stats).unwrap(); // for dashboards and scripts
//!     # drop(json);
//! }
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::config::ExecutionType;
use crate::item::{ItemErrorKind, WorkItemResult};
use crate::shared::Shared;

/// The window over which `recent_items_per_second`, each stage's
/// `items_per_second` and `utilisation`, and the bottleneck are measured.
pub const RECENT_WINDOW: Duration = Duration::from_secs(10);

/// How often the pipeline samples its counters for the recent window.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(1);

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
    /// Items the source said it would hand out in all (its
    /// [`size_hint`](crate::source::Source::size_hint) at the start), when
    /// it knows; progress bars use it as their total.
    pub expected_items: Option<u64>,
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
    /// Median created-to-finished time (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub p50_duration: Option<Duration>,
    /// 90th-percentile created-to-finished time (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub p90_duration: Option<Duration>,
    /// 99th-percentile created-to-finished time (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub p99_duration: Option<Duration>,
    /// Finished items per second since the start.
    pub items_per_second: f64,
    /// Finished items per second over the last [`RECENT_WINDOW`].
    pub recent_items_per_second: f64,
    /// The stage whose workers were busiest over the last
    /// [`RECENT_WINDOW`] (highest `utilisation`); `None` while no stage has
    /// worked. When even its utilisation is well below 1.0, the input, not
    /// a stage, is what holds the pipeline back.
    pub bottleneck: Option<String>,
    /// Items reported stalled so far (see `PipelineConfig::stall_threshold`).
    pub stalled_items: u64,
    /// Failed `refill` calls so far (each is also a `SourceError` event).
    pub source_errors: u64,
    /// The observer the pipeline has been waiting for, for more than a
    /// second, right now: `subscriber at file:line:column` for a lossless
    /// event subscriber (see `EventFilter::lossless`), `dead-letter
    /// receiver` for a full dead-letter channel; `None` while it waits for
    /// no observer.
    pub held_back_by: Option<String>,
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
    /// Items that entered its queue from upstream (the source for the first
    /// stage).
    pub admitted: u64,
    /// Items its handler finished successfully.
    pub processed: u64,
    /// Items that failed in it.
    pub failed: u64,
    /// Items it retried.
    pub retried: u64,
    /// Items waiting in its queue now.
    pub queued: usize,
    /// Items its workers hold now: given to them, started or not (at most
    /// `workers` are running; an idle worker takes the others from a busy
    /// one, see docs/architecture.md, "The hand").
    pub in_flight: usize,
    /// Items done here and waiting for the next stage to ask for them.
    pub waiting_downstream: usize,
    /// Items its handler finished (either way) per second over the last
    /// [`RECENT_WINDOW`].
    pub items_per_second: f64,
    /// Share of its workers' time spent in the handler over the last
    /// [`RECENT_WINDOW`], from 0.0 to 1.0 (an item's time is counted when
    /// it finishes). Near 1.0: the stage is saturated.
    pub utilisation: f64,
    /// Items reported stalled in it so far.
    pub stalled: u64,
    /// Threads of a Thread or Cpu stage still running attempts it gave up
    /// (at the stage's timeout, or on abort), which cannot be stopped: each
    /// holds its stack and what its handler holds until the handler
    /// returns, then ends. Always 0 in other models.
    pub stuck_threads: usize,
    /// Mean handler time (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub average_duration: Option<Duration>,
    /// Median handler time (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub p50_duration: Option<Duration>,
    /// 90th-percentile handler time (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub p90_duration: Option<Duration>,
    /// 99th-percentile handler time (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub p99_duration: Option<Duration>,
    /// Mean time items waited in its queue (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub average_queue_wait: Option<Duration>,
    /// Median queue wait (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub p50_queue_wait: Option<Duration>,
    /// 90th-percentile queue wait (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub p90_queue_wait: Option<Duration>,
    /// 99th-percentile queue wait (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub p99_queue_wait: Option<Duration>,
}

impl PipelineStats {
    /// The stats of the stage called `name`.
    pub fn stage(&self, name: &str) -> Option<&StageStats> {
        self.stages.iter().find(|s| s.name == name)
    }
}

impl std::fmt::Display for PipelineStats {
    /// One line, the seed's stats log: the pipeline's counts and rate (over
    /// the recent window), then per stage its queue, items in workers,
    /// counts and utilisation.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: active {} completed {} failed {} success {:.1}% {:.0} items/s",
            self.pipeline_name,
            self.active_items,
            self.completed_items,
            self.failed_items,
            self.success_rate * 100.0,
            self.recent_items_per_second
        )?;
        if let Some(d) = self.average_duration {
            write!(f, " avg {:.1} ms", d.as_secs_f64() * 1e3)?;
        }
        for s in &self.stages {
            write!(
                f,
                " | {} q{} w{} done {} failed {} busy {:.0}%",
                s.name,
                s.queued,
                s.in_flight,
                s.processed,
                s.failed,
                s.utilisation * 100.0
            )?;
            if s.stuck_threads > 0 {
                write!(f, " stuck threads {}", s.stuck_threads)?;
            }
        }
        if let Some(b) = &self.bottleneck {
            write!(f, " | bottleneck {b}")?;
        }
        if let Some(o) = &self.held_back_by {
            write!(f, " | held back by {o}")?;
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
    fn done(&self) -> u64 {
        self.processed.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed)
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

    /// The value at quantile `q` (0.0 to 1.0): the smallest recorded value
    /// that at least `q` of the values do not exceed, to 2 significant
    /// digits (HDR's highest equivalent value).
    pub(crate) fn quantile(&self, q: f64) -> Option<Duration> {
        (!self.hist.is_empty()).then(|| Duration::from_micros(self.hist.value_at_quantile(q)))
    }

    /// (p50, p90, p99).
    fn percentiles(&self) -> [Option<Duration>; 3] {
        [self.quantile(0.5), self.quantile(0.9), self.quantile(0.99)]
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
    recent: Recent,
    /// The metrics handles, once the pipeline has started.
    #[cfg(feature = "metrics")]
    pub(crate) metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
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
            recent: Recent::default(),
            #[cfg(feature = "metrics")]
            metrics: None,
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
            #[cfg(feature = "metrics")]
            let metrics = self.metrics.as_deref();
            if let Some(total) = result.total_duration() {
                self.total.record(total);
                #[cfg(feature = "metrics")]
                if let Some(m) = metrics {
                    m.latency.record(total);
                }
            }
            for times in &result.metadata.stages {
                let i = times.stage as usize;
                if i >= self.service.len() {
                    continue;
                }
                if let Some(d) = times.handler_duration() {
                    self.service[i].record(d);
                    #[cfg(feature = "metrics")]
                    if let Some(m) = metrics {
                        m.stages[i].service.record(d);
                    }
                }
                if let Some(d) = times.queue_wait() {
                    self.queue_wait[i].record(d);
                    #[cfg(feature = "metrics")]
                    if let Some(m) = metrics {
                        m.stages[i].queue_wait.record(d);
                    }
                }
            }
        }
    }

    /// Takes a sample for the recent window if the last one is
    /// [`SAMPLE_EVERY`] old.
    pub(crate) fn sample(&mut self, shared: &Shared, now: Instant) {
        let finished = self.finished;
        self.recent
            .sample(shared, finished, shared.started_at(), now);
    }

    pub(crate) fn snapshot(&mut self, shared: &Shared) -> PipelineStats {
        let now = crate::clock::now();
        let started = shared.started_at();
        let elapsed = started
            .map(|t| now.saturating_duration_since(t))
            .unwrap_or_default();
        self.sample(shared, now);
        let recent = self.recent.rates(shared, self.finished, started, now);
        let admitted = shared.admitted();
        let stages: Vec<StageStats> = shared
            .config
            .stages
            .iter()
            .enumerate()
            .map(|(i, config)| {
                let g = &shared.gauges[i];
                let [p50, p90, p99] = self.service[i].percentiles();
                let [w50, w90, w99] = self.queue_wait[i].percentiles();
                let (items_per_second, utilisation) = recent.stages[i];
                StageStats {
                    name: config.name.clone(),
                    execution_type: config.execution_type,
                    workers: g.workers.load(Ordering::Relaxed),
                    admitted: g.admitted.load(Ordering::Relaxed),
                    processed: g.processed.load(Ordering::Relaxed),
                    failed: g.failed.load(Ordering::Relaxed),
                    retried: g.retried.load(Ordering::Relaxed),
                    queued: g.queued.load(Ordering::Relaxed),
                    in_flight: g.in_flight.load(Ordering::Relaxed),
                    waiting_downstream: g.waiting_downstream.load(Ordering::Relaxed),
                    items_per_second,
                    utilisation,
                    stalled: g.stalled.load(Ordering::Relaxed),
                    stuck_threads: g.stuck_threads.load(Ordering::Relaxed),
                    average_duration: self.service[i].mean(),
                    p50_duration: p50,
                    p90_duration: p90,
                    p99_duration: p99,
                    average_queue_wait: self.queue_wait[i].mean(),
                    p50_queue_wait: w50,
                    p90_queue_wait: w90,
                    p99_queue_wait: w99,
                }
            })
            .collect();
        let bottleneck = stages
            .iter()
            .filter(|s| s.utilisation > 0.0)
            .max_by(|a, b| a.utilisation.total_cmp(&b.utilisation))
            .map(|s| s.name.clone());
        let [p50, p90, p99] = self.total.percentiles();
        PipelineStats {
            pipeline_name: shared.name.to_string(),
            elapsed,
            admitted_items: admitted,
            expected_items: shared.expected_items(),
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
            p50_duration: p50,
            p90_duration: p90,
            p99_duration: p99,
            items_per_second: if elapsed.is_zero() {
                0.0
            } else {
                self.finished as f64 / elapsed.as_secs_f64()
            },
            recent_items_per_second: recent.finished,
            bottleneck,
            stalled_items: shared
                .gauges
                .iter()
                .map(|g| g.stalled.load(Ordering::Relaxed))
                .sum(),
            held_back_by: shared.events.held_back_by(),
            source_errors: shared.source_errors.load(Ordering::Relaxed),
            stages,
        }
    }
}

/// Counters at one instant, for rates over the recent window.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    finished: u64,
    /// Per stage: items done (either way) and busy nanoseconds.
    stages: Vec<(u64, u64)>,
}

impl Sample {
    fn take(shared: &Shared, finished: u64, at: Instant) -> Sample {
        Sample {
            at,
            finished,
            stages: shared
                .gauges
                .iter()
                .map(|g| (g.done(), g.busy_ns.load(Ordering::Relaxed)))
                .collect(),
        }
    }
}

/// Rates over the recent window.
struct Rates {
    finished: f64,
    /// Per stage: items per second and utilisation.
    stages: Vec<(f64, f64)>,
}

/// Samples of the last [`RECENT_WINDOW`] (and the newest one before it).
#[derive(Debug, Default)]
struct Recent {
    samples: VecDeque<Sample>,
}

impl Recent {
    fn sample(&mut self, shared: &Shared, finished: u64, started: Option<Instant>, now: Instant) {
        if self.samples.is_empty() {
            // The start, when every counter was zero: the first base.
            let Some(started) = started else { return };
            self.samples.push_back(Sample {
                at: started,
                finished: 0,
                stages: vec![(0, 0); shared.gauges.len()],
            });
        }
        if self
            .samples
            .back()
            .is_some_and(|s| now.saturating_duration_since(s.at) < SAMPLE_EVERY)
        {
            return;
        }
        self.samples.push_back(Sample::take(shared, finished, now));
        // Keep one sample at least a window old, as the window's base.
        while self
            .samples
            .get(1)
            .is_some_and(|s| now.saturating_duration_since(s.at) >= RECENT_WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// Rates from the base sample (a window ago, or the oldest one, or the
    /// start) to now.
    fn rates(
        &self,
        shared: &Shared,
        finished: u64,
        started: Option<Instant>,
        now: Instant,
    ) -> Rates {
        let stages = shared.gauges.len();
        let base = match (self.samples.front(), started) {
            (Some(s), _) => s.clone(),
            (None, Some(at)) => Sample {
                at,
                finished: 0,
                stages: vec![(0, 0); stages],
            },
            (None, None) => {
                return Rates {
                    finished: 0.0,
                    stages: vec![(0.0, 0.0); stages],
                };
            }
        };
        let span = now.saturating_duration_since(base.at).as_secs_f64();
        if span <= 0.0 {
            return Rates {
                finished: 0.0,
                stages: vec![(0.0, 0.0); stages],
            };
        }
        let current = Sample::take(shared, finished, now);
        Rates {
            finished: current.finished.saturating_sub(base.finished) as f64 / span,
            stages: current
                .stages
                .iter()
                .zip(&base.stages)
                .zip(&shared.config.stages)
                .map(|((&(done, busy), &(done0, busy0)), config)| {
                    let rate = done.saturating_sub(done0) as f64 / span;
                    let capacity = span * 1e9 * config.workers as f64;
                    let utilisation = (busy.saturating_sub(busy0) as f64 / capacity).min(1.0);
                    (rate, utilisation)
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_follow_the_recorded_distribution() {
        let mut t = Timings::default();
        assert_eq!(t.quantile(0.5), None);
        assert_eq!(t.mean(), None);
        // 1..=100 ms, once each.
        for ms in 1..=100 {
            t.record(Duration::from_millis(ms));
        }
        let close = |d: Option<Duration>, ms: u64| {
            let got = d.unwrap().as_secs_f64() * 1e3;
            assert!(
                (got - ms as f64).abs() <= ms as f64 * 0.01,
                "{got} ms, want {ms} ms"
            );
        };
        close(t.quantile(0.5), 50);
        close(t.quantile(0.9), 90);
        close(t.quantile(0.99), 99);
        close(t.mean(), 50); // 50.5 ms, truncated to the microsecond
        assert_eq!(t.percentiles()[2], t.quantile(0.99));
    }
}
