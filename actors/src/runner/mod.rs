//! Execution models: how a worker runs its batch through the stage's handler.
//!
//! One file per model, each one [`StageRunner`]:
//!
//! - [`async_rt::AsyncRunner`]: awaited on the worker actor's own task;
//! - [`thread::ThreadRunner`]: the batch goes to one of tokio's blocking threads;
//! - [`cpu::CpuRunner`]: the batch goes to the stage's rayon pool;
//! - [`process::ProcessRunner`]: the batch goes to a worker process.
//!
//! Runners are generic over the handler, so a handler's future is never
//! boxed and its data never erased: the stage and its workers are compiled
//! for their own input and output types.
//!
//! Whatever the model, each item is handled the same way ([`Attempt`]): the
//! pipeline's own bookkeeping (stage times) is held aside while the handler
//! runs, so that a failing or panicking handler still leaves a complete
//! result; an error fails the item with its chain (`{:#}`); a panic fails the
//! item as `Panicked`, hands the untouched rest of the batch back to the
//! stage in the same report, and makes the worker fail so that it is
//! replaced.
//!
//! Results stream back to the stage as they are ready: after each item the
//! worker sends what it has if [`FLUSH_AFTER`] has passed since its last
//! report, and an async worker also sends what it has before awaiting a
//! handler that does not complete at once; so a batch of fast items is
//! reported in one message and finished items do not wait behind a slow
//! one. (A blocking handler cannot be looked into: items finished within
//! [`FLUSH_AFTER`] before a slow one in the same batch wait for it. The
//! stage keeps such batches to about a millisecond of recent work.)

pub(crate) mod async_rt;
pub(crate) mod cpu;
pub(crate) mod process;
pub(crate) mod thread;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::ActorRef;

use crate::event::{EventHub, PipelineEvent, WorkerId};
use crate::item::{
    ItemError, ItemErrorKind, JobId, StageTimes, WorkItem, WorkItemMetadata, WorkItemResult,
};
use crate::stage::StageMsg;

/// How long a worker may hold finished items before reporting them. Each
/// report wakes the stage; at 100 µs a Cpu stage of 50 µs items lost a fifth
/// of its speed to wake-ups (benches/cpu.rs). A batch holds about this much
/// work anyway (`stage::BATCH_WORK`), so it bounds the wait as well.
pub(crate) const FLUSH_AFTER: Duration = Duration::from_millis(1);

/// Runs batches of a stage's items in one execution model.
pub(crate) trait StageRunner<I, O>: Send + Sync + 'static {
    /// Runs `items` in order, reporting outcomes to the stage as they are
    /// ready. `Err` carries a panic message: the worker must then fail.
    fn run(
        &self,
        ctx: &Arc<RunCtx<I, O>>,
        items: Vec<WorkItem<I>>,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

/// Everything a worker needs to run items, shared with the threads it uses.
pub(crate) struct RunCtx<I, O> {
    pub(crate) stage: Arc<str>,
    pub(crate) worker: WorkerId,
    pub(crate) stage_ref: ActorRef<StageMsg<I, O>>,
    pub(crate) tracking: bool,
    pub(crate) events: Arc<EventHub>,
}

/// What became of one item in a stage.
pub(crate) enum Outcome<O> {
    /// The handler returned the item for the next stage.
    Done(WorkItem<O>),
    /// The item failed here; its result is final.
    Failed(Box<WorkItemResult>),
}

/// A worker's report to its stage.
pub(crate) struct WorkerReport<I, O> {
    pub(crate) worker: WorkerId,
    /// Outcomes, in the order the items were given.
    pub(crate) outcomes: Vec<Outcome<O>>,
    /// Items of the batch the worker did not start (after a panic), in order.
    pub(crate) returned: Vec<WorkItem<I>>,
    /// Handler time spent on `outcomes`.
    pub(crate) busy: Duration,
    /// The handler panicked with this message and the worker is about to
    /// fail: give it no more work, replace it.
    pub(crate) panic: Option<String>,
}

/// One item's pass through the handler: what is held aside, and how the
/// item's outcome is put together afterwards.
pub(crate) struct Attempt {
    job_id: JobId,
    created: Instant,
    names: Option<crate::item::StageNames>,
    stages: Vec<StageTimes>,
    custom: Option<BTreeMap<String, serde_json::Value>>,
}

impl Attempt {
    /// Takes the item's stage times aside (stamping `started`) before the
    /// handler gets it.
    pub(crate) fn begin<I, O>(ctx: &RunCtx<I, O>, item: &mut WorkItem<I>, now: Instant) -> Attempt {
        let mut stages = std::mem::take(&mut item.metadata.stages);
        if ctx.tracking {
            if let Some(times) = stages.last_mut() {
                times.started = Some(now);
            }
        }
        let custom = &item.metadata.custom;
        Attempt {
            job_id: item.job_id.clone(),
            created: item.metadata.created(),
            names: item.metadata.names.take(),
            stages,
            custom: (!custom.is_empty()).then(|| custom.clone()),
        }
    }

    /// The handler returned `out`: it keeps the item's identity and times.
    pub(crate) fn succeed<I, O>(
        mut self,
        ctx: &RunCtx<I, O>,
        mut out: WorkItem<O>,
        now: Instant,
    ) -> Outcome<O> {
        self.stamp_completed(ctx, now);
        out.job_id = self.job_id;
        out.metadata.stages = self.stages;
        out.metadata.names = self.names;
        out.metadata.set_created(self.created);
        Outcome::Done(out)
    }

    /// The handler failed or panicked: the item's result, with the metadata
    /// it had when the handler got it.
    pub(crate) fn fail<I, O>(
        mut self,
        ctx: &RunCtx<I, O>,
        kind: ItemErrorKind,
        message: String,
        now: Instant,
    ) -> Outcome<O> {
        self.stamp_completed(ctx, now);
        let mut metadata = WorkItemMetadata::default();
        metadata.set_created(self.created);
        metadata.names = self.names;
        metadata.stages = self.stages;
        metadata.custom = self.custom.unwrap_or_default();
        metadata.finished = Some(now);
        let error = ItemError::new(&*ctx.stage, kind, message);
        Outcome::Failed(Box::new(WorkItemResult::failed(
            self.job_id,
            metadata,
            error,
        )))
    }

    fn stamp_completed<I, O>(&mut self, ctx: &RunCtx<I, O>, now: Instant) {
        if ctx.tracking {
            if let Some(times) = self.stages.last_mut() {
                times.completed = Some(now);
            }
        }
    }
}

/// Collects a worker's outcomes and sends them to the stage in batches.
pub(crate) struct Reporter<'a, I, O> {
    ctx: &'a RunCtx<I, O>,
    outcomes: Vec<Outcome<O>>,
    busy: Duration,
    last_flush: Instant,
    events: Vec<PipelineEvent>,
}

impl<'a, I: Send + 'static, O: Send + 'static> Reporter<'a, I, O> {
    pub(crate) fn new(ctx: &'a RunCtx<I, O>, batch: usize, now: Instant) -> Self {
        Reporter {
            ctx,
            outcomes: Vec::with_capacity(batch),
            busy: Duration::ZERO,
            last_flush: now,
            events: Vec::new(),
        }
    }

    /// Notes that the handler is about to start on an item.
    pub(crate) fn started(&mut self, job_id: &JobId) {
        if self.ctx.events.wants_lifecycle() {
            // At once, not with the next report: the handler may take long.
            self.ctx.events.lifecycle(vec![PipelineEvent::ItemStarted {
                job_id: job_id.clone(),
                stage: self.ctx.stage.clone(),
                worker: self.ctx.worker,
            }]);
        }
    }

    /// Records an outcome and sends what has accumulated when it is time.
    pub(crate) fn push(&mut self, outcome: Outcome<O>, started: Instant, now: Instant) {
        self.record(outcome, started, now);
        if now.saturating_duration_since(self.last_flush) >= FLUSH_AFTER {
            self.flush(Vec::new(), None, now);
        }
    }

    /// Records what the handler did with an item. After a panic, reports
    /// it with the rest of the batch (`rest`) handed back and returns the
    /// panic message: the worker must then fail.
    pub(crate) fn settle(
        &mut self,
        attempt: Attempt,
        result: std::thread::Result<anyhow::Result<WorkItem<O>>>,
        started: Instant,
        now: Instant,
        rest: &mut dyn Iterator<Item = WorkItem<I>>,
    ) -> Result<(), String> {
        match result {
            Ok(Ok(out)) => self.push(attempt.succeed(self.ctx, out, now), started, now),
            Ok(Err(e)) => {
                let outcome = attempt.fail(self.ctx, ItemErrorKind::Failed, format!("{e:#}"), now);
                self.push(outcome, started, now);
            }
            Err(payload) => {
                let message = panic_message(&*payload);
                let outcome = attempt.fail(self.ctx, ItemErrorKind::Panicked, message.clone(), now);
                self.record(outcome, started, now);
                self.flush(rest.collect(), Some(message.clone()), now);
                return Err(message);
            }
        }
        Ok(())
    }

    fn record(&mut self, outcome: Outcome<O>, started: Instant, now: Instant) {
        self.busy += now.saturating_duration_since(started);
        if self.ctx.events.wants_lifecycle() {
            let (job_id, success) = match &outcome {
                Outcome::Done(item) => (item.job_id.clone(), true),
                Outcome::Failed(result) => (result.job_id.clone(), false),
            };
            self.events.push(PipelineEvent::ItemCompleted {
                job_id,
                stage: self.ctx.stage.clone(),
                worker: self.ctx.worker,
                success,
            });
        }
        self.outcomes.push(outcome);
    }

    /// Sends the outcomes recorded so far, if any.
    pub(crate) fn flush_done(&mut self) {
        if !self.outcomes.is_empty() {
            self.flush(Vec::new(), None, Instant::now());
        }
    }

    /// Sends everything left.
    pub(crate) fn finish(mut self, now: Instant) {
        self.flush(Vec::new(), None, now);
    }

    fn flush(&mut self, returned: Vec<WorkItem<I>>, panic: Option<String>, now: Instant) {
        if !self.events.is_empty() {
            self.ctx.events.lifecycle(std::mem::take(&mut self.events));
        }
        if self.outcomes.is_empty() && returned.is_empty() && panic.is_none() {
            return;
        }
        let report = WorkerReport {
            worker: self.ctx.worker,
            outcomes: std::mem::take(&mut self.outcomes),
            returned,
            busy: std::mem::take(&mut self.busy),
            panic,
        };
        self.last_flush = now;
        // The stage is gone only when the pipeline is shutting down.
        let _ = self.ctx.stage_ref.cast(StageMsg::Report(report));
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// Runs a batch through a blocking handler on the current thread; shared by
/// the Thread and Cpu models. One clock read per item: an item's end is the
/// next one's start.
pub(crate) fn run_blocking<I: Send + 'static, O: Send + 'static, F>(
    ctx: &RunCtx<I, O>,
    handler: &F,
    items: Vec<WorkItem<I>>,
) -> Result<(), String>
where
    F: Fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>>,
{
    let mut started = Instant::now();
    let mut reporter = Reporter::new(ctx, items.len(), started);
    let mut items = items.into_iter();
    while let Some(mut item) = items.next() {
        let attempt = Attempt::begin(ctx, &mut item, started);
        reporter.started(&attempt.job_id);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(item)));
        let now = Instant::now();
        reporter.settle(attempt, result, started, now, &mut items)?;
        started = now;
    }
    reporter.finish(started);
    Ok(())
}
