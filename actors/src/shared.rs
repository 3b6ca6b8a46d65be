//! State shared by a pipeline's actors and its handles: read-mostly
//! configuration, live counters, the event hub, and the completion slot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;

use crate::config::PipelineConfig;
use crate::error::PipelineError;
use crate::event::EventHub;
use crate::item::{StageNames, WorkItemResult};
use crate::root::FinishReport;
use crate::stats::{PipelineStats, StageGauges, Tally};

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
    /// The tracker's report, once every admitted item has its outcome.
    pub(crate) report: Report,
    /// Why the pipeline failed, if it did (the first reason wins): its
    /// source panicked, or a stage went over its restart budget.
    pub(crate) failure: Mutex<Option<PipelineError>>,
    pub(crate) completion: Completion,
    /// Counts and timings of finished items, kept by the tracker.
    pub(crate) tally: Mutex<Tally>,
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
            gauges: config
                .stages
                .iter()
                .map(|_| StageGauges::default())
                .collect(),
            events: Arc::new(EventHub::default()),
            started: Mutex::new(None),
            closing: watch::Sender::new(false),
            report: Report::default(),
            failure: Mutex::new(None),
            completion: Completion::default(),
            tally: Mutex::new(Tally::new(config.stages.len())),
            config,
        }
    }

    pub(crate) fn admitted(&self) -> u64 {
        self.admitted.load(Ordering::Acquire)
    }

    /// A stats snapshot, from the gauges and the tally; never waits for an actor.
    pub(crate) fn stats(&self) -> PipelineStats {
        self.tally
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .snapshot(self)
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
    outcome: Mutex<Option<Result<Vec<WorkItemResult>, PipelineError>>>,
    stats: Mutex<Option<PipelineStats>>,
}

impl Default for Completion {
    fn default() -> Self {
        Completion {
            done: watch::Sender::new(false),
            outcome: Mutex::new(None),
            stats: Mutex::new(None),
        }
    }
}

impl Completion {
    /// Records the outcome (first one wins) and wakes every waiter.
    pub(crate) fn finish(
        &self,
        outcome: Result<Vec<WorkItemResult>, PipelineError>,
        stats: Option<PipelineStats>,
    ) {
        if *self.done.borrow() {
            return;
        }
        *self.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
        if stats.is_some() {
            *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = stats;
        }
        self.done.send_replace(true);
    }

    pub(crate) fn is_done(&self) -> bool {
        *self.done.borrow()
    }

    pub(crate) async fn wait(&self) {
        let mut rx = self.done.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    /// The outcome; the results go to the first caller only.
    pub(crate) fn take(&self, pipeline: &str) -> Result<Vec<WorkItemResult>, PipelineError> {
        let mut outcome = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        match outcome.as_mut() {
            Some(Ok(results)) => {
                let results = std::mem::take(results);
                *outcome = Some(Err(PipelineError::ResultsTaken(pipeline.to_string())));
                Ok(results)
            }
            Some(Err(e)) => Err(e.clone()),
            None => Err(PipelineError::NotRunning(pipeline.to_string())),
        }
    }

    pub(crate) fn stats(&self) -> Option<PipelineStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
