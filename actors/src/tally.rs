//! The accounting behind [`PipelineStats`]: each stage's live gauges,
//! the tracker's counts and duration histograms ([`Tally`]), and the
//! samples of the recent window.
//!
//! It reads what it is given ([`Live`]), never the pipeline's blackboard:
//! `shared` owns a `Tally` and hands it a view of the live counters.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::config::PipelineConfig;
use crate::gauges::StageGauges;
use crate::item::{ItemErrorKind, WorkItemResult};
use crate::stats::{BatchCounts, PipelineStats, RECENT_WINDOW, StageStats};

/// How often the pipeline samples its counters for the recent window.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// What a snapshot reads besides the tally: the pipeline's live counters,
/// as the blackboard (`shared`) holds them at this instant.
pub(crate) struct Live<'a> {
    pub(crate) config: &'a PipelineConfig,
    pub(crate) gauges: &'a [StageGauges],
    pub(crate) started: Option<Instant>,
    pub(crate) admitted: u64,
    pub(crate) expected: Option<u64>,
    pub(crate) source_errors: u64,
    pub(crate) held_back_by: Option<String>,
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
    #[cfg(test)]
    pub(crate) fn record(&mut self, d: Duration) {
        self.record_ns(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Records `ns` nanoseconds: integer arithmetic only, since the tracker
    /// records nine of these per item of a 4-stage pipeline (a `Duration`
    /// and its `u128` microseconds cost about twice as much).
    #[inline]
    pub(crate) fn record_ns(&mut self, ns: u64) {
        let micros = ns / 1_000;
        self.sum_micros += u128::from(micros);
        self.hist.saturating_record(micros.max(1));
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
    /// Derived items (split children) that reached a result, and how many
    /// of them failed.
    pub(crate) derived_finished: u64,
    pub(crate) derived_failed: u64,
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
            derived_finished: 0,
            derived_failed: 0,
            total: Timings::default(),
            service: (0..stages).map(|_| Timings::default()).collect(),
            queue_wait: (0..stages).map(|_| Timings::default()).collect(),
            recent: Recent::default(),
            #[cfg(feature = "metrics")]
            metrics: None,
        }
    }

    /// Counts one admitted item finished, with its (combined) outcome.
    pub(crate) fn count(&mut self, error: Option<&crate::item::ItemError>) {
        self.finished += 1;
        if let Some(error) = error {
            self.failed += 1;
            if error.kind == ItemErrorKind::Cancelled {
                self.cancelled += 1;
            }
        }
    }

    /// Counts a derived item (a split's child) that reached its result.
    pub(crate) fn count_derived(&mut self, failed: bool) {
        self.derived_finished += 1;
        self.derived_failed += u64::from(failed);
    }

    /// With tracking on, times one final item (admitted or derived).
    pub(crate) fn time(&mut self, result: &WorkItemResult, tracking: bool) {
        if tracking {
            #[cfg(feature = "metrics")]
            let metrics = self.metrics.as_deref();
            if let Some(total) = result.metadata.total_ns() {
                self.total.record_ns(total);
                #[cfg(feature = "metrics")]
                if let Some(m) = metrics {
                    m.latency.record(Duration::from_nanos(total));
                }
            }
            for times in &result.metadata.stages {
                let i = times.stage as usize;
                if i >= self.service.len() {
                    continue;
                }
                if let Some(ns) = times.handler_ns() {
                    self.service[i].record_ns(ns);
                    #[cfg(feature = "metrics")]
                    if let Some(m) = metrics {
                        m.stages[i].service.record(Duration::from_nanos(ns));
                    }
                }
                if let Some(ns) = times.queue_wait_ns() {
                    self.queue_wait[i].record_ns(ns);
                    #[cfg(feature = "metrics")]
                    if let Some(m) = metrics {
                        m.stages[i].queue_wait.record(Duration::from_nanos(ns));
                    }
                }
            }
        }
    }

    /// Takes a sample for the recent window if the last one is
    /// [`SAMPLE_EVERY`] old.
    pub(crate) fn sample(&mut self, live: &Live<'_>, now: Instant) {
        let finished = self.finished;
        self.recent.sample(live, finished, now);
    }

    pub(crate) fn snapshot(&mut self, live: &Live<'_>, now: Instant) -> PipelineStats {
        let started = live.started;
        let elapsed = started
            .map(|t| now.saturating_duration_since(t))
            .unwrap_or_default();
        self.sample(live, now);
        let recent = self.recent.rates(live, self.finished, now);
        let admitted = live.admitted;
        let stages: Vec<StageStats> = live
            .config
            .stages
            .iter()
            .enumerate()
            .map(|(i, config)| {
                let g = &live.gauges[i];
                let [p50, p90, p99] = self.service[i].percentiles();
                let [w50, w90, w99] = self.queue_wait[i].percentiles();
                let (items_per_second, utilisation) = recent.stages[i];
                let items = g.items();
                let retried = g.retried.load(Ordering::Relaxed);
                let batches = g.batch_items.as_ref().map(|_| {
                    let own = g.own();
                    BatchCounts {
                        admitted: own.admitted,
                        processed: own.processed,
                        failed: own.failed,
                        retried,
                    }
                });
                StageStats {
                    name: config.name.clone(),
                    execution_type: config.execution_type,
                    workers: g.workers.load(Ordering::Relaxed),
                    admitted: items.admitted,
                    processed: items.processed,
                    failed: items.failed,
                    retried,
                    batches,
                    queued: g.queued.load(Ordering::Relaxed),
                    in_flight: g.in_flight.load(Ordering::Relaxed),
                    waiting_downstream: g.waiting_downstream.load(Ordering::Relaxed),
                    items_per_second,
                    utilisation,
                    stalled: g.stalled.load(Ordering::Relaxed),
                    stuck_threads: g.stuck_threads.load(Ordering::Relaxed),
                    derived: g.derived.load(Ordering::Relaxed),
                    derived_live: g.derived_live.load(Ordering::Relaxed),
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
            pipeline_name: live.config.pipeline_name.clone(),
            elapsed,
            admitted_items: admitted,
            expected_items: live.expected,
            active_items: admitted.saturating_sub(self.finished),
            active_by_stage: live
                .config
                .stages
                .iter()
                .zip(live.gauges)
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
            stalled_items: live
                .gauges
                .iter()
                .map(|g| g.stalled.load(Ordering::Relaxed))
                .sum(),
            held_back_by: live.held_back_by.clone(),
            source_errors: live.source_errors,
            derived_items_finished: self.derived_finished,
            derived_items_failed: self.derived_failed,
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
    fn take(live: &Live<'_>, finished: u64, at: Instant) -> Sample {
        Sample {
            at,
            finished,
            stages: live
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
    fn sample(&mut self, live: &Live<'_>, finished: u64, now: Instant) {
        if self.samples.is_empty() {
            // The start, when every counter was zero: the first base.
            let Some(started) = live.started else { return };
            self.samples.push_back(Sample {
                at: started,
                finished: 0,
                stages: vec![(0, 0); live.gauges.len()],
            });
        }
        if self
            .samples
            .back()
            .is_some_and(|s| now.saturating_duration_since(s.at) < SAMPLE_EVERY)
        {
            return;
        }
        self.samples.push_back(Sample::take(live, finished, now));
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
    fn rates(&self, live: &Live<'_>, finished: u64, now: Instant) -> Rates {
        let stages = live.gauges.len();
        let base = match (self.samples.front(), live.started) {
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
        let current = Sample::take(live, finished, now);
        Rates {
            finished: current.finished.saturating_sub(base.finished) as f64 / span,
            stages: current
                .stages
                .iter()
                .zip(&base.stages)
                .zip(live.gauges)
                .map(|((&(done, busy), &(done0, busy0)), gauges)| {
                    let rate = done.saturating_sub(done0) as f64 / span;
                    // The workers it has now (a stage may be resized).
                    let workers = gauges.workers.load(Ordering::Relaxed).max(1);
                    let capacity = span * 1e9 * workers as f64;
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
