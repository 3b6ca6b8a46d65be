//! Execution models: how a worker runs its batch through the stage's handler.
//!
//! One file per model, each one [`StageRunner`]:
//!
//! - [`async_rt::AsyncRunner`]: awaited on the worker actor's own task;
//! - [`thread::ThreadRunner`]: the batch goes to a thread of the stage's own
//!   ([`lanes`]);
//! - [`cpu::runner`]: the same, for CPU-bound work;
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
//! replaced. The user code a runner calls around the handler (the `Clone`
//! of a kept copy, the `Drop` of what it drops, the `Display` of an error)
//! is contained the same way ([`crate::contain`]): an item whose data
//! panics when copied fails `Panicked` by itself, and the worker goes on.
//!
//! The stage puts each batch in the worker's [`hand`], shared with it, and
//! the worker takes the items from there as it starts them: the items a
//! worker has not started are always within the stage's reach, for an idle
//! worker to take or, when the worker dies, to run elsewhere.
//!
//! Results stream back to the stage as they are ready: after each item the
//! worker sends what it has if [`FLUSH_AFTER`] has passed since its last
//! report, and an async worker also sends what it has before awaiting a
//! handler that does not complete at once; so a batch of fast items is
//! reported in one message and finished items do not wait behind a slow
//! one. (A blocking handler cannot be looked into: its batch's reporter
//! sits in the hand, and the stage takes the results it holds when another
//! worker is idle, or when the worker dies.)
//!
//! # Attempts, retries and timeouts
//!
//! An attempt that fails (an error not marked [`Permanent`], a panic, a
//! timeout) while the stage's retry policy allows another comes back to the
//! stage as [`Outcome::Retry`], with the copy of its input taken before the
//! handler ran; the stage holds it for the backoff, without a worker, and
//! queues it again. An Async attempt past the stage's `timeout` is dropped
//! (cancelled at its next await). A blocking attempt cannot be stopped:
//! [`watch`] fails it `TimedOut` at the deadline, hands back the rest of its
//! batch and gives the worker up, so the stage replaces it while the late
//! handler finishes on its thread, which the stage gives up ([`lanes`]);
//! what it returns then is discarded.

pub(crate) mod async_rt;
pub(crate) mod cpu;
pub(crate) mod hand;
pub(crate) mod lanes;
pub(crate) mod process;
pub(crate) mod thread;
pub(crate) mod watch;

use std::any::Any;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::ActorRef;

use crate::contain;
use crate::event::{EventHub, PipelineEvent, WorkerId};
use crate::item::{
    ItemError, ItemErrorKind, JobId, Permanent, StageTimes, WorkItem, WorkItemMetadata,
    WorkItemResult,
};
use crate::stage::StageMsg;
use hand::{Hand, HandState};

pub(crate) use crate::contain::panic_message;

/// How long a worker may hold finished items before reporting them. Each
/// report wakes the stage; at 100 µs a Cpu stage of 50 µs items lost a fifth
/// of its speed to wake-ups (benches/cpu.rs). A batch holds about this much
/// work anyway (`stage::BATCH_WORK`), so it bounds the wait as well.
pub(crate) const FLUSH_AFTER: Duration = Duration::from_millis(1);

/// Runs batches of a stage's items in one execution model.
pub(crate) trait StageRunner<I, O>: Send + Sync + 'static {
    /// Runs the items in the worker's hand (`ctx.hand`) in order, taking
    /// each as it starts it, until the hand is empty, reporting outcomes
    /// to the stage as they are ready. `Err` says why the worker must fail
    /// (a panic, or a blocking attempt given up at its deadline); the
    /// report saying so was sent.
    fn run(&self, ctx: &Arc<RunCtx<I, O>>) -> impl Future<Output = Result<(), String>> + Send;

    /// Ends what the runner keeps between batches, before the stage stops
    /// (a Process stage's worker processes: the stage stops once they are
    /// reaped). Nothing by default.
    fn shutdown(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Everything a worker needs to run items, shared with the threads it uses.
pub(crate) struct RunCtx<I, O> {
    pub(crate) pipeline: Arc<str>,
    pub(crate) stage: Arc<str>,
    pub(crate) worker: WorkerId,
    pub(crate) stage_ref: ActorRef<StageMsg<I, O>>,
    pub(crate) tracking: bool,
    pub(crate) events: Arc<EventHub>,
    /// Copies an input before each attempt, for a retry or a dead letter:
    /// set only for stages bound to retry whose policy allows more than one
    /// attempt.
    pub(crate) keep: Option<fn(&I) -> I>,
    /// All attempts the stage's retry policy allows (1 without one).
    pub(crate) max_attempts: u32,
    /// How long one attempt may take.
    pub(crate) timeout: Option<Duration>,
    /// The items the worker was given and has not started, shared with
    /// the stage.
    pub(crate) hand: Arc<Hand<I, O>>,
}

/// What became of one item in a stage.
pub(crate) enum Outcome<I, O> {
    /// The handler returned the item for the next stage.
    Done(WorkItem<O>),
    /// The item failed here; its result is final.
    Failed(Box<Failed>),
    /// The attempt failed and the retry policy allows another: the item as
    /// it was before the attempt, its attempts counted.
    Retry(WorkItem<I>),
}

impl<I, O> Outcome<I, O> {
    pub(crate) fn job_id(&self) -> &JobId {
        match self {
            Outcome::Done(item) => &item.job_id,
            Outcome::Failed(failed) => &failed.result.job_id,
            Outcome::Retry(item) => &item.job_id,
        }
    }
}

/// An item's final failure, with its last input when the stage kept one.
pub(crate) struct Failed {
    pub(crate) result: WorkItemResult,
    /// A `WorkItem<I>` of the stage's input type, for the dead letter.
    pub(crate) input: Option<Box<dyn Any + Send>>,
}

/// A worker's report to its stage.
pub(crate) struct WorkerReport<I, O> {
    pub(crate) worker: WorkerId,
    /// Outcomes, in the order the items were given.
    pub(crate) outcomes: Vec<Outcome<I, O>>,
    /// Items of the batch the worker did not start (after a panic or a
    /// timeout), in order.
    pub(crate) returned: Vec<WorkItem<I>>,
    /// Handler time spent on `outcomes`.
    pub(crate) busy: Duration,
    /// The worker is about to fail (a panic, or a blocking attempt given up
    /// at its deadline), for this reason: give it no more work, replace it.
    pub(crate) failing: Option<String>,
}

/// How one attempt ended.
pub(crate) enum Ran<O> {
    /// The handler returned.
    Returned(anyhow::Result<WorkItem<O>>),
    /// The handler panicked with this payload.
    Panicked(Box<dyn Any + Send>),
    /// The attempt ran past the stage's timeout.
    TimedOut(Duration),
    /// The handler never got the item: copying its data for a retry
    /// panicked, with this message.
    Uncopied(String),
}

impl<O> Ran<O> {
    #[inline]
    pub(crate) fn caught(result: std::thread::Result<anyhow::Result<WorkItem<O>>>) -> Self {
        match result {
            Ok(returned) => Ran::Returned(returned),
            Err(payload) => Ran::Panicked(payload),
        }
    }
}

/// One item's pass through the handler: what is held aside, and how the
/// item's outcome is put together afterwards.
pub(crate) struct Attempt<I> {
    job_id: JobId,
    created: Instant,
    attempts: u32,
    names: Option<crate::item::StageNames>,
    stages: Vec<StageTimes>,
    custom: Option<BTreeMap<String, serde_json::Value>>,
    /// A copy of the input, when the stage keeps one.
    kept: Option<I>,
    /// Copying the input panicked, with this message: the attempt does not
    /// run ([`Attempt::checked`]).
    uncopied: Option<String>,
}

impl<I: Send + 'static> Attempt<I> {
    /// Counts the attempt and takes the item's stage times aside (stamping
    /// `started` on the first attempt) before the handler gets it.
    #[inline]
    pub(crate) fn begin<O>(ctx: &RunCtx<I, O>, item: &mut WorkItem<I>, now: Instant) -> Self {
        item.metadata.attempts += 1;
        let attempts = item.metadata.attempts;
        let mut stages = std::mem::take(&mut item.metadata.stages);
        if ctx.tracking {
            if let Some(times) = stages.last_mut() {
                times.started.get_or_insert(now);
                times.attempt_started = Some(now);
                times.attempts = attempts;
            }
        }
        let custom = &item.metadata.custom;
        let (kept, uncopied) = match ctx.keep {
            None => (None, None),
            // The user's `Clone`: a panic in it fails this item only.
            Some(keep) => match contain::call(|| keep(&item.data)) {
                Ok(kept) => (Some(kept), None),
                Err(message) => (None, Some(message)),
            },
        };
        Attempt {
            job_id: item.job_id.clone(),
            created: item.metadata.created(),
            attempts,
            names: item.metadata.names.take(),
            stages,
            custom: (!custom.is_empty()).then(|| custom.clone()),
            kept,
            uncopied,
        }
    }

    pub(crate) fn job_id(&self) -> &JobId {
        &self.job_id
    }

    /// The item for the handler, or, when its data panicked as it was
    /// copied, how the attempt ended (the item is dropped).
    #[inline]
    pub(crate) fn checked<O>(&mut self, item: WorkItem<I>) -> Result<WorkItem<I>, Ran<O>> {
        match self.uncopied.take() {
            None => Ok(item),
            Some(message) => {
                contain::drop_logged(item, || {
                    format!("item {} after its copy failed", self.job_id)
                });
                Err(Ran::Uncopied(message))
            }
        }
    }

    /// The handler returned `out`: it keeps the item's identity and times.
    #[inline(always)]
    pub(crate) fn succeed<O>(
        mut self,
        ctx: &RunCtx<I, O>,
        mut out: WorkItem<O>,
        now: Instant,
    ) -> Outcome<I, O> {
        self.stamp_completed(ctx, now);
        if let Some(kept) = self.kept.take() {
            contain::drop_logged(kept, || {
                format!(
                    "the copy of item {} kept for a retry in stage `{}`",
                    self.job_id, ctx.stage
                )
            });
        }
        out.job_id = self.job_id;
        out.metadata.stages = self.stages;
        out.metadata.names = self.names;
        out.metadata.attempts = self.attempts;
        out.metadata.set_created(self.created);
        Outcome::Done(out)
    }

    /// The attempt failed: another attempt if the policy allows one and the
    /// input was kept, else the item's final result, with the metadata it
    /// had when the handler got it.
    pub(crate) fn fail<O>(
        mut self,
        ctx: &RunCtx<I, O>,
        kind: ItemErrorKind,
        message: String,
        retryable: bool,
        now: Instant,
    ) -> Outcome<I, O> {
        self.stamp_completed(ctx, now);
        let mut metadata = WorkItemMetadata::default();
        metadata.set_created(self.created);
        metadata.names = self.names;
        metadata.stages = self.stages;
        metadata.attempts = self.attempts;
        metadata.custom = self.custom.unwrap_or_default();
        if retryable && self.attempts < ctx.max_attempts {
            if let Some(data) = self.kept.take() {
                return Outcome::Retry(WorkItem {
                    job_id: self.job_id,
                    data,
                    metadata,
                });
            }
        }
        metadata.finished = Some(now);
        let input = self.kept.map(|data| {
            Box::new(WorkItem {
                job_id: self.job_id.clone(),
                data,
                metadata: metadata.clone(),
            }) as Box<dyn Any + Send>
        });
        let mut error = ItemError::new(&*ctx.stage, kind, message);
        error.attempts = self.attempts;
        Outcome::Failed(Box::new(Failed {
            result: WorkItemResult::failed(self.job_id, metadata, error),
            input,
        }))
    }

    fn stamp_completed<O>(&mut self, ctx: &RunCtx<I, O>, now: Instant) {
        if ctx.tracking {
            if let Some(times) = self.stages.last_mut() {
                times.completed = Some(now);
                if let Some(began) = times.attempt_started.take() {
                    times.handler += now.saturating_duration_since(began);
                }
            }
        }
    }
}

/// Collects a worker's outcomes and sends them to the stage in batches.
pub(crate) struct Reporter<I, O> {
    ctx: Arc<RunCtx<I, O>>,
    outcomes: Vec<Outcome<I, O>>,
    /// When the handler started on the first outcome not yet sent, and
    /// finished the last: items run back to back, so the handler time of
    /// a report is the span between (one subtraction per report, not per
    /// item).
    first_started: Option<Instant>,
    last_done: Instant,
    last_flush: Instant,
    events: Vec<PipelineEvent>,
}

impl<I: Send + 'static, O: Send + 'static> Reporter<I, O> {
    pub(crate) fn new(ctx: &Arc<RunCtx<I, O>>, batch: usize, now: Instant) -> Self {
        Reporter {
            ctx: ctx.clone(),
            outcomes: Vec::with_capacity(batch),
            first_started: None,
            last_done: now,
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
    #[inline(always)]
    pub(crate) fn push(&mut self, outcome: Outcome<I, O>, started: Instant, now: Instant) {
        self.record(outcome, started, now);
        if now.saturating_duration_since(self.last_flush) >= FLUSH_AFTER {
            self.flush(Vec::new(), None, now);
        }
    }

    /// Records how an attempt ended. After a panic, reports it with the
    /// rest of the batch (`rest`) handed back and returns why the worker
    /// must now fail.
    #[inline(always)]
    pub(crate) fn settle(
        &mut self,
        attempt: Attempt<I>,
        ran: Ran<O>,
        started: Instant,
        now: Instant,
        rest: &mut dyn Iterator<Item = WorkItem<I>>,
    ) -> Result<(), String> {
        let ctx = &*self.ctx;
        let outcome = match ran {
            Ran::Returned(Ok(out)) => attempt.succeed(ctx, out, now),
            Ran::Returned(Err(e)) => {
                let retryable = !Permanent::is(&e);
                // The error's `Display` and `Drop` are user code.
                let message = contain::call(|| format!("{e:#}")).unwrap_or_else(|panic| {
                    format!("(the handler's error cannot be shown: its Display panicked: {panic})")
                });
                contain::drop_logged(e, || format!("the error of item {}", attempt.job_id()));
                attempt.fail(ctx, ItemErrorKind::Failed, message, retryable, now)
            }
            Ran::Uncopied(panic) => {
                let message = format!("copying the item's data for a retry panicked: {panic}");
                attempt.fail(ctx, ItemErrorKind::Panicked, message, false, now)
            }
            Ran::TimedOut(limit) => {
                let message = format!("the attempt ran past the stage's timeout of {limit:?}");
                attempt.fail(ctx, ItemErrorKind::TimedOut, message, true, now)
            }
            Ran::Panicked(payload) => {
                let message = contain::take_message(payload);
                let outcome =
                    attempt.fail(ctx, ItemErrorKind::Panicked, message.clone(), true, now);
                let reason = format!("handler panicked: {message}");
                self.record(outcome, started, now);
                self.flush(rest.collect(), Some(reason.clone()), now);
                return Err(reason);
            }
        };
        self.push(outcome, started, now);
        Ok(())
    }

    /// Fails the attempt in hand at the stage's timeout (`limit`) and gives
    /// the worker up for `reason`, with the unstarted rest of its batch
    /// handed back, all in one report: a report without `failing` would
    /// let the stage count the dying worker idle and give it more work.
    pub(crate) fn time_out(
        mut self,
        attempt: Attempt<I>,
        limit: Duration,
        started: Instant,
        now: Instant,
        returned: Vec<WorkItem<I>>,
        reason: String,
    ) {
        let message = format!("the attempt ran past the stage's timeout of {limit:?}");
        let outcome = attempt.fail(&self.ctx, ItemErrorKind::TimedOut, message, true, now);
        self.record(outcome, started, now);
        self.flush(returned, Some(reason), now);
    }

    #[inline(always)]
    pub(crate) fn record(&mut self, outcome: Outcome<I, O>, started: Instant, now: Instant) {
        self.first_started.get_or_insert(started);
        self.last_done = now;
        if self.ctx.events.wants_lifecycle() {
            let success = matches!(outcome, Outcome::Done(_));
            self.events.push(PipelineEvent::ItemCompleted {
                job_id: outcome.job_id().clone(),
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
            self.flush(Vec::new(), None, crate::clock::now());
        }
    }

    /// Sends the outcomes recorded so far, or an empty report if there are
    /// none: the stage looks into the worker's hand on every report, and
    /// the worker just put items back in it.
    pub(crate) fn flush_offered(&mut self) {
        if self.outcomes.is_empty() {
            if !self.events.is_empty() {
                self.ctx.events.lifecycle(std::mem::take(&mut self.events));
            }
            let report = WorkerReport {
                worker: self.ctx.worker,
                outcomes: Vec::new(),
                returned: Vec::new(),
                busy: Duration::ZERO,
                failing: None,
            };
            let _ = self.ctx.stage_ref.cast(StageMsg::Report(report));
        } else {
            self.flush(Vec::new(), None, crate::clock::now());
        }
    }

    /// Sends everything left.
    pub(crate) fn finish(mut self, now: Instant) {
        self.flush(Vec::new(), None, now);
    }

    /// From the stage, while the worker is busy with a later item: the
    /// outcomes recorded and not sent, and the handler time spent on them.
    pub(crate) fn take_outcomes(&mut self) -> (Vec<Outcome<I, O>>, Duration) {
        if !self.events.is_empty() {
            self.ctx.events.lifecycle(std::mem::take(&mut self.events));
        }
        let busy = self.first_started.take().map_or(Duration::ZERO, |s| {
            self.last_done.saturating_duration_since(s)
        });
        (std::mem::take(&mut self.outcomes), busy)
    }

    /// The outcomes recorded and not sent, for the stage that closed the
    /// worker's hand.
    pub(crate) fn into_outcomes(mut self) -> Vec<Outcome<I, O>> {
        if !self.events.is_empty() {
            self.ctx.events.lifecycle(std::mem::take(&mut self.events));
        }
        std::mem::take(&mut self.outcomes)
    }

    fn flush(&mut self, returned: Vec<WorkItem<I>>, failing: Option<String>, now: Instant) {
        if !self.events.is_empty() {
            self.ctx.events.lifecycle(std::mem::take(&mut self.events));
        }
        if self.outcomes.is_empty() && returned.is_empty() && failing.is_none() {
            return;
        }
        let report = WorkerReport {
            worker: self.ctx.worker,
            outcomes: std::mem::take(&mut self.outcomes),
            returned,
            busy: self.first_started.take().map_or(Duration::ZERO, |s| {
                self.last_done.saturating_duration_since(s)
            }),
            failing,
        };
        self.last_flush = now;
        // The stage is gone only when the pipeline is shutting down; the
        // report's items are dropped here then.
        if let Err(unsent) = self.ctx.stage_ref.cast(StageMsg::Report(report)) {
            contain::drop_logged(unsent, || "a report its stage was gone for".to_string());
        }
    }
}

/// The reporter of a worker's own task (Async, Process), which sends what
/// it holds if the task ends without finishing its batch (a panic outside
/// the handler's guard, or a kill): results that came back are delivered,
/// ahead of the stage's `Reap` of the worker. (A blocking batch's reporter
/// sits in the worker's hand, where the stage takes what it holds.)
pub(crate) struct Sending<I: Send + 'static, O: Send + 'static>(pub(crate) Reporter<I, O>);

impl<I: Send + 'static, O: Send + 'static> Sending<I, O> {
    /// Sends everything left.
    pub(crate) fn finish(mut self, now: Instant) {
        self.0.flush(Vec::new(), None, now);
    }

    /// Sends everything left with the unstarted items handed back, and
    /// tells the stage the worker is giving up for `reason`.
    pub(crate) fn give_up(mut self, returned: Vec<WorkItem<I>>, reason: String, now: Instant) {
        self.0.flush(returned, Some(reason), now);
    }
}

impl<I: Send + 'static, O: Send + 'static> std::ops::Deref for Sending<I, O> {
    type Target = Reporter<I, O>;
    fn deref(&self) -> &Reporter<I, O> {
        &self.0
    }
}

impl<I: Send + 'static, O: Send + 'static> std::ops::DerefMut for Sending<I, O> {
    fn deref_mut(&mut self) -> &mut Reporter<I, O> {
        &mut self.0
    }
}

impl<I: Send + 'static, O: Send + 'static> Drop for Sending<I, O> {
    fn drop(&mut self) {
        self.0.flush_done();
    }
}

/// Whether any subscriber wants [`item_span`]s now; asked once per batch,
/// so that a batch nobody traces makes no span at all.
#[inline]
pub(crate) fn item_spans_enabled() -> bool {
    tracing::span_enabled!(tracing::Level::DEBUG)
}

/// The span of one item's pass through a stage's handler, with the fixed
/// fields `pipeline`, `stage`, `worker` and `job_id`, at DEBUG.
#[inline]
pub(crate) fn item_span<I, O>(ctx: &RunCtx<I, O>, job_id: &JobId) -> tracing::Span {
    tracing::debug_span!(
        "item",
        pipeline = %ctx.pipeline,
        stage = %ctx.stage,
        worker = %ctx.worker,
        job_id = %job_id
    )
}

/// Runs the worker's hand through a blocking handler on the current
/// thread; shared by the Thread and Cpu models, with or without a timeout
/// (then [`watch`] watches the same hand). The batch's reporter was put in
/// the hand by [`Hand::begin_batch`]. One lock per item, taken between two
/// items: it settles the one that ended and takes the next, so the items
/// not started stay within the stage's reach and the outcomes not reported
/// yet are never lost with a handler that blocks. One clock read per item:
/// an item's end is the next one's start.
pub(crate) fn run_blocking<I: Send + 'static, O: Send + 'static, F>(
    ctx: &Arc<RunCtx<I, O>>,
    handler: &F,
) -> Result<(), String>
where
    F: Fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>>,
{
    let traced = item_spans_enabled();
    let mut ran = None;
    loop {
        let next = {
            let mut guard = ctx.hand.lock();
            let state: &mut HandState<I, O> = &mut guard;
            // Under a timeout, the real clock: the watcher's deadlines are
            // on it (tokio's may be paused in tests).
            let now = match ctx.timeout {
                Some(_) => Instant::now(),
                None => crate::clock::now(),
            };
            let Some(reporter) = state.reporter.as_mut() else {
                // Given up at the deadline, or taken by the stage: a late
                // result is discarded (its `Drop` is user code).
                drop(guard);
                if let Some(late) = ran.take() {
                    contain::drop_logged(late, || {
                        format!("a late result in stage `{}`", ctx.stage)
                    });
                }
                return Ok(());
            };
            if let Some(ran) = ran.take() {
                let (started, attempt) = state.current.take().expect("the attempt is in hand");
                let pending = &mut state.pending;
                let mut rest = std::iter::from_fn(|| pending.pop_front());
                if let Err(reason) = reporter.settle(attempt, ran, started, now, &mut rest) {
                    state.reporter = None;
                    return Err(reason);
                }
            }
            let Some(mut item) = state.pending.pop_front() else {
                if let Some(reporter) = state.reporter.take() {
                    reporter.finish(now);
                }
                return Ok(());
            };
            let mut attempt = Attempt::begin(ctx, &mut item, now);
            reporter.started(attempt.job_id());
            match attempt.checked(item) {
                Ok(item) => {
                    let span = traced.then(|| item_span(ctx, attempt.job_id()));
                    state.current = Some((now, attempt));
                    Some((item, span))
                }
                Err(uncopied) => {
                    // Its data panicked as it was copied: the attempt ends
                    // without running, settled under the next lock.
                    state.current = Some((now, attempt));
                    ran = Some(uncopied);
                    None
                }
            }
        };
        let Some((item, span)) = next else {
            continue;
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _entered = span.as_ref().map(tracing::Span::enter);
            handler(item)
        }));
        ran = Some(Ran::caught(result));
    }
}
