//! State shared by a pipeline's actors and its handles: read-mostly
//! configuration, live counters, the event hub, and the completion slot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use tokio::sync::watch;

use crate::config::PipelineConfig;
use crate::error::PipelineError;
use crate::event::EventHub;
use crate::gauges::StageGauges;
use crate::item::{StageNames, WorkItemResult};
use crate::stats::PipelineStats;
use crate::tally::{Live, Tally};

pub(crate) struct Shared {
    pub(crate) config: PipelineConfig,
    pub(crate) name: Arc<str>,
    /// Items handed to the pipeline so far; bumped before they are sent.
    pub(crate) admitted: AtomicU64,
    /// Failed refills so far.
    pub(crate) source_errors: AtomicU64,
    /// The stage names, in order; shared by the stages, events and every
    /// tracked item's metadata.
    pub(crate) names: StageNames,
    pub(crate) gauges: Vec<StageGauges>,
    pub(crate) events: Arc<EventHub>,
    pub(crate) started: Mutex<Option<Instant>>,
    /// Set when the source should stop: a refill in progress is abandoned.
    pub(crate) closing: watch::Sender<bool>,
    /// Set once no more items will be admitted (the source closed its
    /// input, exhausted or stopped): batch stages then cut partial batches.
    pub(crate) input_closed: watch::Sender<bool>,
    /// Set on abort (and at a stop's deadline): observers are no longer
    /// waited for (lossless subscribers, a full dead-letter channel).
    pub(crate) stop_waiting: watch::Sender<bool>,
    /// The tracker's report, once every admitted item has its outcome.
    pub(crate) report: Report,
    /// Why the pipeline failed, if it did (the first reason wins): its
    /// source panicked, or a stage went over its restart budget.
    pub(crate) failure: Mutex<Option<PipelineError>>,
    pub(crate) completion: Completion,
    /// Counts and timings of finished items, kept by the tracker.
    pub(crate) tally: Mutex<Tally>,
    /// How many items the source said it would hand out, read at the start.
    pub(crate) expected: OnceLock<Option<u64>>,
    /// The metrics handles, registered at the start.
    #[cfg(feature = "metrics")]
    pub(crate) metrics: OnceLock<Arc<crate::metrics::Metrics>>,
}

impl Shared {
    pub(crate) fn new(config: PipelineConfig) -> Self {
        Shared {
            name: config.pipeline_name.as_str().into(),
            admitted: AtomicU64::new(0),
            source_errors: AtomicU64::new(0),
            names: Arc::new(
                config
                    .stages
                    .iter()
                    .map(|s| Arc::from(s.name.as_str()))
                    .collect(),
            ),
            gauges: config.stages.iter().map(StageGauges::for_stage).collect(),
            events: Arc::new(EventHub::default()),
            started: Mutex::new(None),
            closing: watch::Sender::new(false),
            input_closed: watch::Sender::new(false),
            stop_waiting: watch::Sender::new(false),
            report: Report::default(),
            failure: Mutex::new(None),
            completion: Completion::default(),
            tally: Mutex::new(Tally::new(config.stages.len())),
            expected: OnceLock::new(),
            #[cfg(feature = "metrics")]
            metrics: OnceLock::new(),
            config,
        }
    }

    pub(crate) fn admitted(&self) -> u64 {
        self.admitted.load(Ordering::Acquire)
    }

    /// The live counters, as the tally reads them.
    pub(crate) fn live(&self) -> Live<'_> {
        Live {
            config: &self.config,
            gauges: &self.gauges,
            started: self.started_at(),
            admitted: self.admitted(),
            expected: self.expected_items(),
            source_errors: self.source_errors.load(Ordering::Relaxed),
            held_back_by: self.events.held_back_by(),
        }
    }

    /// A stats snapshot, from the gauges and the tally; never waits for an actor.
    pub(crate) fn stats(&self) -> PipelineStats {
        let live = self.live();
        self.tally
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .snapshot(&live, crate::clock::now())
    }

    /// The stats at the end, when every admitted item has its outcome: no
    /// stage holds an item then, whatever its gauges say (a stage publishes
    /// them after it sent its last results, which can be after the
    /// tracker's final snapshot).
    pub(crate) fn final_stats(&self) -> PipelineStats {
        let mut stats = self.stats();
        for stage in &mut stats.stages {
            stage.queued = 0;
            stage.in_flight = 0;
            stage.waiting_downstream = 0;
        }
        for held in stats.active_by_stage.values_mut() {
            *held = 0;
        }
        stats
    }

    /// Samples the counters for the recent window, if a sample is due.
    pub(crate) fn sample(&self) {
        let live = self.live();
        self.tally
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sample(&live, crate::clock::now());
    }

    /// Copies the counters and gauges to the `metrics` facade, if the
    /// pipeline registered its metrics. `ended`: see [`crate::metrics::Metrics::sync`].
    #[cfg(feature = "metrics")]
    pub(crate) fn sync_metrics(&self, ended: bool) {
        if let Some(metrics) = self.metrics.get() {
            let totals = {
                let tally = self.tally.lock().unwrap_or_else(|e| e.into_inner());
                crate::metrics::Totals {
                    admitted: self.admitted(),
                    finished: tally.finished,
                    failed: tally.failed,
                    cancelled: tally.cancelled,
                    source_errors: self.source_errors.load(Ordering::Relaxed),
                }
            };
            metrics.sync(totals, &self.gauges, ended);
        }
    }

    /// Registers the pipeline's metrics (at its start) with the recorder
    /// installed now, and hands them to the tally for its histograms.
    #[cfg(feature = "metrics")]
    pub(crate) fn install_metrics(&self) {
        let metrics = Arc::new(crate::metrics::Metrics::register(&self.name, &self.names));
        if self.metrics.set(metrics.clone()).is_ok() {
            self.tally.lock().unwrap_or_else(|e| e.into_inner()).metrics = Some(metrics);
        }
    }

    /// Items the source said it would hand out, if it knew.
    pub(crate) fn expected_items(&self) -> Option<u64> {
        self.expected.get().copied().flatten()
    }

    /// From now on nothing waits for an observer: abort and deadlines
    /// return whatever subscribers and dead-letter receivers do.
    pub(crate) fn stop_waiting(&self) {
        self.stop_waiting.send_replace(true);
        self.events.stop_waiting();
    }

    /// Records why the pipeline failed; the first reason is kept.
    pub(crate) fn fail(&self, error: PipelineError) {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(error);
    }

    /// Items finished so far.
    pub(crate) fn finished(&self) -> u64 {
        self.tally
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .finished
    }

    pub(crate) fn started_at(&self) -> Option<Instant> {
        *self.started.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the tracker hands over at the end: every result kept, and the
/// final stats.
pub(crate) struct FinishReport {
    pub(crate) results: Vec<WorkItemResult>,
    pub(crate) stats: PipelineStats,
}

/// What the tracker hands over when every admitted item has its outcome:
/// filed here rather than sent, so that a root being stopped (whose mailbox
/// is closed) can still wait for it.
pub(crate) struct Report {
    filed: watch::Sender<bool>,
    report: Mutex<Option<FinishReport>>,
}

impl Default for Report {
    fn default() -> Self {
        Report {
            filed: watch::Sender::new(false),
            report: Mutex::new(None),
        }
    }
}

impl Report {
    pub(crate) fn file(&self, report: FinishReport) {
        *self.report.lock().unwrap_or_else(|e| e.into_inner()) = Some(report);
        self.filed.send_replace(true);
    }

    /// Waits for the report, at most `limit`; takes it.
    pub(crate) async fn take(&self, limit: std::time::Duration) -> Option<FinishReport> {
        let mut rx = self.filed.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|filed| *filed)).await;
        self.report.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// How a pipeline ended, kept for its handles.
pub(crate) struct Completion {
    done: watch::Sender<bool>,
    ending: Mutex<Option<Ending>>,
    stats: Mutex<Option<PipelineStats>>,
}

/// The results kept (until a handle takes them) and why the pipeline
/// failed, if it did.
struct Ending {
    results: Option<Vec<WorkItemResult>>,
    error: Option<PipelineError>,
}

impl Default for Completion {
    fn default() -> Self {
        Completion {
            done: watch::Sender::new(false),
            ending: Mutex::new(None),
            stats: Mutex::new(None),
        }
    }
}

impl Completion {
    /// Records the outcome (first one wins) and wakes every waiter: the
    /// results kept, and the error if the pipeline failed.
    pub(crate) fn finish(
        &self,
        results: Vec<WorkItemResult>,
        error: Option<PipelineError>,
        stats: Option<PipelineStats>,
    ) {
        if *self.done.borrow() {
            return;
        }
        *self.ending.lock().unwrap_or_else(|e| e.into_inner()) = Some(Ending {
            results: Some(results),
            error,
        });
        if stats.is_some() {
            *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = stats;
        }
        self.done.send_replace(true);
    }

    /// Records a failure that left no report.
    pub(crate) fn fail(&self, error: PipelineError) {
        self.finish(Vec::new(), Some(error), None);
    }

    pub(crate) fn is_done(&self) -> bool {
        *self.done.borrow()
    }

    pub(crate) async fn wait(&self) {
        let mut rx = self.done.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    /// The outcome as `run` returns it: the results (to the first caller
    /// only) or the error (the results then stay for [`Completion::take_all`]).
    pub(crate) fn take(&self, pipeline: &str) -> Result<Vec<WorkItemResult>, PipelineError> {
        let mut ending = self.ending.lock().unwrap_or_else(|e| e.into_inner());
        match ending.as_mut() {
            None => Err(PipelineError::NotRunning(pipeline.to_string())),
            Some(Ending {
                error: Some(error), ..
            }) => Err(error.clone()),
            Some(Ending { results, .. }) => results
                .take()
                .ok_or_else(|| PipelineError::ResultsTaken(pipeline.to_string())),
        }
    }

    /// The results (to the first caller only; later ones get none and
    /// `ResultsTaken` if there is no other error) together with the error.
    pub(crate) fn take_all(&self, pipeline: &str) -> (Vec<WorkItemResult>, Option<PipelineError>) {
        let mut ending = self.ending.lock().unwrap_or_else(|e| e.into_inner());
        match ending.as_mut() {
            None => (
                Vec::new(),
                Some(PipelineError::NotRunning(pipeline.to_string())),
            ),
            Some(Ending { results, error }) => match (results.take(), error) {
                (Some(results), error) => (results, error.clone()),
                (None, Some(error)) => (Vec::new(), Some(error.clone())),
                (None, None) => (
                    Vec::new(),
                    Some(PipelineError::ResultsTaken(pipeline.to_string())),
                ),
            },
        }
    }

    pub(crate) fn stats(&self) -> Option<PipelineStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
