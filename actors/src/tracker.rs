//! The tracker actor: where every item's outcome ends up.
//!
//! - **Owns**: the completion callbacks, the retained results, the counters
//!   and duration histograms behind [`PipelineStats`].
//! - **Receives**: [`TrackerMsg`]: `Finished` results from the stages (and
//!   refused duplicates from the source); `InputClosed` from the source or
//!   the root; `Event`s to publish; `Stats` queries; `LogStats` ticks.
//! - **Sends**: `Released` to the source (so it may admit more), events to
//!   subscribers, and `Finished` to the root once every admitted item has an
//!   outcome and the input is closed.
//! - **Supervised by**: the pipeline root.
//! - **Invariants**: each result is counted, called back and published once;
//!   its mailbox holds at most the pipeline's window of results, because
//!   the source admits an item only after an earlier one was released here.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::event::PipelineEvent;
use crate::item::JobId;
use crate::item::{ItemErrorKind, WorkItemResult};
use crate::root::FinishReport;
use crate::shared::Shared;
use crate::stats::{PipelineStats, StageStats, Timings};

/// A completion callback: called once per item, on the tracker's task.
pub type Callback = Arc<dyn Fn(&WorkItemResult) + Send + Sync>;

/// Tells the source that items finished: how many, and their job ids
/// (tracking on).
pub(crate) type ReleasePort = Box<dyn Fn(usize, Vec<JobId>) + Send + Sync>;

/// Tells the root that the report is filed.
pub(crate) type FinishPort = Box<dyn Fn() + Send + Sync>;

/// The tracker's mailbox.
pub(crate) enum TrackerMsg {
    /// From the root, first: where to send `Released`.
    Connect(ReleasePort),
    /// From the stages (and the source, for refused duplicates): outcomes.
    Finished(Vec<WorkItemResult>),
    /// From the source or the root: no more items will be admitted.
    InputClosed,
    /// From any actor: an event every subscriber must get.
    Event(PipelineEvent),
    /// From the root: a stats snapshot.
    Stats(RpcReplyPort<PipelineStats>),
    /// From its own timer: log the stats line.
    LogStats,
}

pub(crate) struct Tracker;

pub(crate) struct TrackerArgs {
    pub(crate) shared: Arc<Shared>,
    pub(crate) finish: FinishPort,
    pub(crate) callbacks: Vec<Callback>,
}

pub(crate) struct TrackerState {
    shared: Arc<Shared>,
    finish: FinishPort,
    release: Option<ReleasePort>,
    callbacks: Vec<Callback>,
    results: Vec<WorkItemResult>,
    finished: u64,
    failed: u64,
    cancelled: u64,
    total: Timings,
    service: Vec<Timings>,
    queue_wait: Vec<Timings>,
    input_closed: bool,
    done: bool,
}

impl Actor for Tracker {
    type Msg = TrackerMsg;
    type State = TrackerState;
    type Arguments = TrackerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<TrackerMsg>,
        args: TrackerArgs,
    ) -> Result<TrackerState, ActorProcessingErr> {
        let stages = args.shared.config.stages.len();
        let interval = args.shared.config.stats_interval;
        if !interval.is_zero() {
            myself.send_interval(interval, || TrackerMsg::LogStats);
        }
        Ok(TrackerState {
            finish: args.finish,
            release: None,
            callbacks: args.callbacks,
            results: Vec::new(),
            finished: 0,
            failed: 0,
            cancelled: 0,
            total: Timings::default(),
            service: (0..stages).map(|_| Timings::default()).collect(),
            queue_wait: (0..stages).map(|_| Timings::default()).collect(),
            input_closed: false,
            done: false,
            shared: args.shared,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<TrackerMsg>,
        message: TrackerMsg,
        state: &mut TrackerState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            TrackerMsg::Connect(release) => state.release = Some(release),
            TrackerMsg::Finished(results) => state.record(results).await,
            TrackerMsg::InputClosed => state.input_closed = true,
            TrackerMsg::Event(event) => {
                if state.shared.events.has_subscribers() {
                    state.shared.events.publish(vec![event]).await;
                }
            }
            TrackerMsg::Stats(reply) => {
                let _ = reply.send(state.snapshot());
            }
            TrackerMsg::LogStats => {
                if !state.done {
                    let stats = state.snapshot();
                    tracing::info!(pipeline = %state.shared.name, "{stats}");
                }
            }
        }
        state.finish_if_done().await;
        Ok(())
    }
}

impl TrackerState {
    async fn record(&mut self, results: Vec<WorkItemResult>) {
        let n = results.len();
        let tracking = self.shared.config.enable_tracking;
        let mut released = Vec::with_capacity(if tracking { n } else { 0 });
        for result in &results {
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
            if tracking {
                let refused =
                    matches!(&result.error, Some(e) if e.kind == ItemErrorKind::DuplicateJobId);
                if !refused {
                    released.push(result.job_id.clone());
                }
            }
            for callback in &self.callbacks {
                if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| callback(result)))
                {
                    tracing::error!(
                        pipeline = %self.shared.name,
                        job_id = %result.job_id,
                        "completion callback panicked: {}",
                        crate::runner::panic_message(&*panic)
                    );
                }
            }
        }
        if self.shared.events.has_subscribers() {
            let events = results
                .iter()
                .map(|r| PipelineEvent::ItemFinished(Box::new(r.clone())))
                .collect();
            self.shared.events.publish(events).await;
        }
        if self.shared.config.retain_results {
            self.results.extend(results);
        }
        if let Some(release) = &self.release {
            release(n, released);
        }
    }

    async fn finish_if_done(&mut self) {
        if self.done || !self.input_closed || self.finished < self.shared.admitted() {
            return;
        }
        self.done = true;
        let stats = self.snapshot();
        tracing::debug!(pipeline = %self.shared.name, "finished: {stats}");
        if self.shared.events.has_subscribers() {
            self.shared
                .events
                .publish(vec![PipelineEvent::PipelineFinished(Box::new(
                    stats.clone(),
                ))])
                .await;
        }
        self.shared.events.close();
        let report = FinishReport {
            results: std::mem::take(&mut self.results),
            stats,
        };
        self.shared.report.file(report);
        (self.finish)();
    }

    pub(crate) fn snapshot(&self) -> PipelineStats {
        let shared = &self.shared;
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
            stages,
        }
    }
}
