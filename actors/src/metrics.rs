//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (crate
//! feature `metrics`).
//!
//! The pipeline registers its metrics when it starts, with the recorder
//! installed at that time (install yours first, e.g.
//! `metrics_exporter_prometheus::PrometheusBuilder`). Every metric carries
//! the label `pipeline`; the per-stage ones also `stage`. The full list,
//! with units, is in `docs/observability.md`.
//!
//! Nothing is recorded on the workers' path:
//!
//! - counters and gauges are copied from the stage's own counters by the
//!   pipeline's monitor every second, and once more when the pipeline ends
//!   (so a finished pipeline's numbers are exact);
//! - histograms (queue wait, service time, end-to-end latency) are fed by
//!   the tracker from each finished item's stage times, so they need
//!   `enable_tracking` (the default).
//!
//! `examples/prometheus.rs` serves them in Prometheus format.

use metrics::{Counter, Gauge, Histogram, Unit};
use std::sync::atomic::Ordering;

use crate::gauges::StageGauges;

/// The pipeline's item counts at one instant, as the metrics copy them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Totals {
    pub(crate) admitted: u64,
    pub(crate) finished: u64,
    pub(crate) failed: u64,
    pub(crate) cancelled: u64,
    pub(crate) source_errors: u64,
}

/// The handles of one stage's metrics.
pub(crate) struct StageMetrics {
    admitted: Counter,
    completed: Counter,
    failed: Counter,
    retried: Counter,
    stalled: Counter,
    queued: Gauge,
    in_flight: Gauge,
    waiting_downstream: Gauge,
    workers: Gauge,
    stuck_threads: Gauge,
    pub(crate) queue_wait: Histogram,
    pub(crate) service: Histogram,
}

/// The handles of a pipeline's metrics, registered once at its start.
pub(crate) struct Metrics {
    admitted: Counter,
    finished: Counter,
    failed: Counter,
    cancelled: Counter,
    source_errors: Counter,
    active: Gauge,
    pub(crate) latency: Histogram,
    pub(crate) stages: Vec<StageMetrics>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("stages", &self.stages.len())
            .finish_non_exhaustive()
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "bergtalzug_items_admitted_total",
        "Items taken into the pipeline"
    );
    describe_counter!(
        "bergtalzug_items_finished_total",
        "Items that reached their outcome (completed, failed or cancelled)"
    );
    describe_counter!(
        "bergtalzug_items_failed_total",
        "Items that failed, cancelled ones included"
    );
    describe_counter!(
        "bergtalzug_items_cancelled_total",
        "Items cancelled by an abort"
    );
    describe_counter!(
        "bergtalzug_source_errors_total",
        "Failed refill calls of the pipeline's source"
    );
    describe_gauge!(
        "bergtalzug_items_active",
        "Items admitted and not yet finished"
    );
    describe_histogram!(
        "bergtalzug_item_latency_seconds",
        Unit::Seconds,
        "Created-to-finished time of finished items"
    );
    describe_counter!(
        "bergtalzug_stage_items_admitted_total",
        "Items that entered the stage's queue from upstream"
    );
    describe_counter!(
        "bergtalzug_stage_items_completed_total",
        "Items the stage's handler finished successfully"
    );
    describe_counter!(
        "bergtalzug_stage_items_failed_total",
        "Items that failed in the stage"
    );
    describe_counter!(
        "bergtalzug_stage_items_retried_total",
        "Items the stage tried again after a failed attempt"
    );
    describe_counter!(
        "bergtalzug_stage_items_stalled_total",
        "Items reported stalled in the stage"
    );
    describe_gauge!(
        "bergtalzug_stage_queue_depth",
        "Items waiting in the stage's queue"
    );
    describe_gauge!(
        "bergtalzug_stage_in_flight",
        "Items the stage's workers hold"
    );
    describe_gauge!(
        "bergtalzug_stage_waiting_downstream",
        "Items done in the stage and waiting for the next stage's demand"
    );
    describe_gauge!("bergtalzug_stage_workers", "Live workers of the stage");
    describe_gauge!(
        "bergtalzug_stage_stuck_threads",
        "Threads of a Thread or Cpu stage still running attempts it gave up"
    );
    describe_histogram!(
        "bergtalzug_stage_queue_wait_seconds",
        Unit::Seconds,
        "Time items waited in the stage's queue"
    );
    describe_histogram!(
        "bergtalzug_stage_service_seconds",
        Unit::Seconds,
        "Time the stage's handler took per item"
    );
}

impl Metrics {
    /// Registers the pipeline's metrics with the installed recorder.
    pub(crate) fn register(pipeline: &str, stage_names: &[std::sync::Arc<str>]) -> Metrics {
        describe();
        let pipeline = pipeline.to_string();
        let stages = stage_names
            .iter()
            .map(|stage| {
                let labels = [("pipeline", pipeline.clone()), ("stage", stage.to_string())];
                StageMetrics {
                    admitted: metrics::counter!("bergtalzug_stage_items_admitted_total", &labels),
                    completed: metrics::counter!("bergtalzug_stage_items_completed_total", &labels),
                    failed: metrics::counter!("bergtalzug_stage_items_failed_total", &labels),
                    retried: metrics::counter!("bergtalzug_stage_items_retried_total", &labels),
                    stalled: metrics::counter!("bergtalzug_stage_items_stalled_total", &labels),
                    queued: metrics::gauge!("bergtalzug_stage_queue_depth", &labels),
                    in_flight: metrics::gauge!("bergtalzug_stage_in_flight", &labels),
                    waiting_downstream: metrics::gauge!(
                        "bergtalzug_stage_waiting_downstream",
                        &labels
                    ),
                    workers: metrics::gauge!("bergtalzug_stage_workers", &labels),
                    stuck_threads: metrics::gauge!("bergtalzug_stage_stuck_threads", &labels),
                    queue_wait: metrics::histogram!("bergtalzug_stage_queue_wait_seconds", &labels),
                    service: metrics::histogram!("bergtalzug_stage_service_seconds", &labels),
                }
            })
            .collect();
        let labels = [("pipeline", pipeline)];
        Metrics {
            admitted: metrics::counter!("bergtalzug_items_admitted_total", &labels),
            finished: metrics::counter!("bergtalzug_items_finished_total", &labels),
            failed: metrics::counter!("bergtalzug_items_failed_total", &labels),
            cancelled: metrics::counter!("bergtalzug_items_cancelled_total", &labels),
            source_errors: metrics::counter!("bergtalzug_source_errors_total", &labels),
            active: metrics::gauge!("bergtalzug_items_active", &labels),
            latency: metrics::histogram!("bergtalzug_item_latency_seconds", &labels),
            stages,
        }
    }

    /// Copies the counters and gauges. `ended`: the pipeline has finished
    /// and its actors have stopped, so nothing is held and no worker lives
    /// (the stages' own gauges may not have caught up).
    pub(crate) fn sync(&self, totals: Totals, gauges: &[StageGauges], ended: bool) {
        let Totals {
            admitted,
            finished,
            failed,
            cancelled,
            source_errors,
        } = totals;
        self.admitted.absolute(admitted);
        self.finished.absolute(finished);
        self.failed.absolute(failed);
        self.cancelled.absolute(cancelled);
        self.source_errors.absolute(source_errors);
        self.active.set(admitted.saturating_sub(finished) as f64);
        for (m, g) in self.stages.iter().zip(gauges) {
            // A batch stage's items, not its batches.
            let items = g.items();
            m.admitted.absolute(items.admitted);
            m.completed.absolute(items.processed);
            m.failed.absolute(items.failed);
            m.retried.absolute(g.retried.load(Ordering::Relaxed));
            m.stalled.absolute(g.stalled.load(Ordering::Relaxed));
            let gauge = |n: &std::sync::atomic::AtomicUsize| {
                if ended {
                    0.0
                } else {
                    n.load(Ordering::Relaxed) as f64
                }
            };
            m.queued.set(gauge(&g.queued));
            m.in_flight.set(gauge(&g.in_flight));
            m.waiting_downstream.set(gauge(&g.waiting_downstream));
            m.workers.set(gauge(&g.workers));
            // Given-up threads outlive the pipeline: not zeroed at its end.
            m.stuck_threads
                .set(g.stuck_threads.load(Ordering::Relaxed) as f64);
        }
    }
}
