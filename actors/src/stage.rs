//! The stage supervisor: one per stage.
//!
//! - **Owns**: the stage's queue (`queue_size`), the items done here that
//!   wait for the next stage's demand, the record of what each worker holds,
//!   its `workers` worker actors (a Thread or Cpu stage's threads are its
//!   runner's).
//! - **Receives**: [`StageMsg`]: `Connect` from the root; `Items` from
//!   upstream (never more than it asked for); `Demand` from downstream;
//!   `Report` from its workers; `Reap`, `Respawn` and `Wake` from itself;
//!   `Abort` from the root.
//! - **Sends**: `Demand` upstream, `Items` downstream (never more than the
//!   downstream asked for), `Run` to idle workers, finished results to the
//!   tracker (the last stage's successes and every failure).
//! - **Supervises**: its workers (linked at spawn). A worker that fails is
//!   replaced at once, so the stage keeps its worker count; what it held is
//!   accounted for when its `Reap` arrives, after any report it sent.
//! - **Retries**: an attempt that failed while the retry policy allows
//!   another comes back as `Outcome::Retry`; the stage holds it, without a
//!   worker, until its backoff is over (one `Wake` timer for the earliest),
//!   then queues it again. It still counts against the stage's room.
//! - **Invariants** (after every message):
//!   - held (queued + waiting to retry + in flight + waiting downstream) + demand outstanding
//!     upstream <= `queue_size + workers`: the stage never asks for more
//!     than it has room for;
//!   - no worker is idle while items are queued;
//!   - every item given to the stage is, exactly once, forwarded, sent to
//!     the tracker, or held.
//!
//! # Batches
//!
//! Items move between actors in batches of what is ready, never waiting to
//! fill one. An idle worker gets an even share of the queue, but at least
//! about 20 µs and at most about 1 ms of work (measured from the stage's
//! recent service time), so fast handlers run many items per message while
//! slow ones go one at a time to every idle worker. Demand goes upstream in
//! chunks of at least half the stage's capacity, so that `Items` messages
//! are large too (measured on 2,000,000 items through 4 x 4 stages: about
//! 1.3x the throughput of quarter-capacity chunks).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use std::marker::PhantomData;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, MessagingErr, SupervisionEvent};

use crate::binding::{DemandPort, FailPort, Outlet};
use crate::config::{RestartBudget, RetryPolicy};
use crate::error::PipelineError;
use crate::event::{PipelineEvent, WorkerId};
use crate::item::{
    ItemError, ItemErrorKind, JobId, StageTimes, WorkItem, WorkItemMetadata, WorkItemResult,
};
use crate::runner::{Outcome, RunCtx, StageRunner, WorkerReport};
use crate::shared::Shared;
use crate::tracker::TrackerMsg;
use crate::worker::{Worker, WorkerMsg};

/// The most items a worker is given at once.
const MAX_BATCH: usize = 64;
/// About how much work (by recent service time) a worker is given at most.
const BATCH_WORK: Duration = Duration::from_millis(1);
/// Less work than this is not split between workers.
const SPLIT_WORK: Duration = Duration::from_micros(20);
/// Wait before trying again when a replacement worker cannot be spawned.
const RESPAWN_DELAY: Duration = Duration::from_millis(100);

/// A stage supervisor's mailbox; `I` is the stage's input type, `O` its
/// output type.
pub(crate) enum StageMsg<I, O> {
    /// From the root, first: where to ask for items.
    Connect(DemandPort),
    /// From upstream: items, at most as many as this stage asked for.
    Items(Vec<WorkItem<I>>),
    /// From downstream: room for this many more items.
    Demand(usize),
    /// From a worker: outcomes of items it was given.
    Report(WorkerReport<I, O>),
    /// From itself, after a worker died: account for what it still held,
    /// and replace it unless its panic report already did.
    Reap { worker: WorkerId, reason: String },
    /// From itself: try again to spawn a missing worker.
    Respawn,
    /// From itself: items waiting to be retried may be due.
    Wake,
    /// From the root: cancel everything held and everything that arrives.
    Abort,
    /// From the pipeline's monitor: report the items workers have held
    /// longer than this (`stall_threshold`).
    CheckStalls(Duration),
}

/// Where a stage sends the items its handler finished.
pub(crate) enum Downstream<O> {
    Stage(Arc<dyn Outlet<O>>),
    /// The last stage: finished items are results.
    Tracker,
}

/// The stage supervisor of a stage from `I` to `O`, run by `R`.
pub(crate) struct Stage<I, O, R>(PhantomData<fn(I, R) -> O>);

impl<I, O, R> Stage<I, O, R> {
    pub(crate) fn new() -> Self {
        Stage(PhantomData)
    }
}

pub(crate) struct StageArgs<I, O, R> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) index: usize,
    pub(crate) runner: Arc<R>,
    /// Copies an input for another attempt: set when the handler was bound
    /// to retry.
    pub(crate) keep: Option<fn(&I) -> I>,
    pub(crate) downstream: Downstream<O>,
    pub(crate) tracker: ActorRef<TrackerMsg>,
    pub(crate) fail: FailPort,
}

struct Slot<I> {
    actor: ActorRef<WorkerMsg<I>>,
    /// Job ids and creation times of the items the worker holds, in the
    /// order given: enough to account for them if the worker dies.
    held: VecDeque<(JobId, Instant)>,
    /// It reported a panic and is about to fail: no more work for it.
    failing: bool,
    /// Since when it has held the front of `held` (stall detection).
    since: Instant,
    /// The front of `held` was reported stalled.
    stalled: bool,
}

pub(crate) struct StageState<I, O, R> {
    shared: Arc<Shared>,
    index: usize,
    name: Arc<str>,
    capacity: usize,
    workers: usize,
    runner: Arc<R>,
    tracker: ActorRef<TrackerMsg>,
    upstream: Option<DemandPort>,
    downstream: Downstream<O>,
    queue: VecDeque<WorkItem<I>>,
    outbox: VecDeque<WorkItem<O>>,
    /// Items downstream asked for and has not been sent yet.
    credit: usize,
    /// Items asked of upstream and not yet received.
    requested: usize,
    slots: HashMap<WorkerId, Slot<I>>,
    by_actor: HashMap<ActorId, WorkerId>,
    idle: Vec<WorkerId>,
    in_flight: usize,
    next_worker: u64,
    /// Workers that died and are not replaced yet: who, and why.
    to_replace: VecDeque<(WorkerId, String)>,
    aborting: bool,
    /// Recent per-item service time, in nanoseconds (0 = not known yet).
    service_ns: f64,
    fail: FailPort,
    budget: Option<RestartBudget>,
    keep: Option<fn(&I) -> I>,
    retry: Option<RetryPolicy>,
    /// Items waiting out their retry backoff, by when they are due (on
    /// tokio's clock, so that paused time in tests applies).
    delayed: BTreeMap<(tokio::time::Instant, u64), WorkItem<I>>,
    next_delayed: u64,
    /// When the `Wake` timer set last will fire.
    wake_at: Option<tokio::time::Instant>,
    /// When workers were replaced, within the budget's window.
    restarts: VecDeque<Instant>,
    /// The budget was exceeded: no more replacements.
    over_budget: bool,
}

impl<I, O, R> Actor for Stage<I, O, R>
where
    I: Send + 'static,
    O: Send + 'static,
    R: StageRunner<I, O>,
{
    type Msg = StageMsg<I, O>;
    type State = StageState<I, O, R>;
    type Arguments = StageArgs<I, O, R>;

    async fn pre_start(
        &self,
        _myself: ActorRef<StageMsg<I, O>>,
        args: StageArgs<I, O, R>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let config = &args.shared.config.stages[args.index];
        let name = args.shared.names[args.index].clone();
        Ok(StageState {
            index: args.index,
            capacity: config.capacity(),
            workers: config.workers,
            runner: args.runner,
            tracker: args.tracker,
            upstream: None,
            downstream: args.downstream,
            queue: VecDeque::with_capacity(config.queue_size.min(4096)),
            outbox: VecDeque::new(),
            credit: 0,
            requested: 0,
            slots: HashMap::new(),
            by_actor: HashMap::new(),
            idle: Vec::new(),
            in_flight: 0,
            next_worker: 0,
            to_replace: VecDeque::new(),
            aborting: false,
            service_ns: 0.0,
            fail: args.fail,
            budget: config.restart_budget,
            keep: args.keep.filter(|_| config.max_attempts() > 1),
            retry: config.retry,
            delayed: BTreeMap::new(),
            next_delayed: 0,
            wake_at: None,
            restarts: VecDeque::new(),
            over_budget: false,
            name,
            shared: args.shared,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<StageMsg<I, O>>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        for _ in 0..state.workers {
            state.spawn_worker(&myself).await?;
        }
        state.publish_gauges();
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<StageMsg<I, O>>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // A Process stage's worker processes are reaped before the stage
        // (and so the pipeline) ends.
        state.runner.shutdown().await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<StageMsg<I, O>>,
        message: StageMsg<I, O>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            StageMsg::Connect(upstream) => state.upstream = Some(upstream),
            StageMsg::Items(items) => state.receive(items),
            StageMsg::Demand(n) => state.credit += n,
            StageMsg::Report(report) => state.on_report(&myself, report).await,
            StageMsg::Reap { worker, reason } => state.reap(&myself, worker, reason).await,
            StageMsg::Respawn => state.respawn(&myself).await,
            StageMsg::Wake => state.wake(&myself),
            StageMsg::Abort => state.abort(),
            StageMsg::CheckStalls(threshold) => state.check_stalls(threshold),
        }
        state.pump();
        state.publish_gauges();
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<StageMsg<I, O>>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
        if let Some(worker) = state.by_actor.remove(&cell.get_id()) {
            // Supervision events overtake messages: the reap goes through the
            // mailbox, behind any report the worker sent before it died.
            let _ = myself.cast(StageMsg::Reap { worker, reason });
        }
        state.publish_gauges();
        Ok(())
    }
}

impl<I, O, R> StageState<I, O, R>
where
    I: Send + 'static,
    O: Send + 'static,
    R: StageRunner<I, O>,
{
    fn is_last(&self) -> bool {
        matches!(self.downstream, Downstream::Tracker)
    }

    async fn spawn_worker(
        &mut self,
        myself: &ActorRef<StageMsg<I, O>>,
    ) -> Result<WorkerId, ActorProcessingErr> {
        let id = WorkerId(self.next_worker);
        self.next_worker += 1;
        let ctx = Arc::new(RunCtx {
            pipeline: self.shared.name.clone(),
            stage: self.name.clone(),
            worker: id,
            stage_ref: myself.clone(),
            tracking: self.shared.config.enable_tracking,
            events: self.shared.events.clone(),
            keep: self.keep,
            max_attempts: self.shared.config.stages[self.index].max_attempts(),
            timeout: self.shared.config.stages[self.index].timeout,
        });
        let args = (ctx, self.runner.clone());
        let (actor, _) =
            Actor::spawn_linked(None, Worker::<I, O, R>::new(), args, myself.get_cell()).await?;
        self.by_actor.insert(actor.get_id(), id);
        self.slots.insert(
            id,
            Slot {
                actor,
                held: VecDeque::new(),
                failing: false,
                since: crate::clock::now(),
                stalled: false,
            },
        );
        self.idle.push(id);
        Ok(id)
    }

    /// Spawns the workers that died; on failure, tries again later.
    async fn respawn(&mut self, myself: &ActorRef<StageMsg<I, O>>) {
        while !self.aborting {
            let Some((worker, reason)) = self.to_replace.pop_front() else {
                break;
            };
            if !self.within_budget() {
                self.to_replace.clear();
                return;
            }
            match self.spawn_worker(myself).await {
                Ok(replacement) => {
                    self.tell_tracker_event(PipelineEvent::WorkerRestarted {
                        stage: self.name.clone(),
                        worker,
                        replacement,
                        reason,
                    });
                }
                Err(e) => {
                    tracing::error!(
                        pipeline = %self.shared.name,
                        stage = %self.name,
                        "cannot spawn a replacement worker, trying again in {RESPAWN_DELAY:?}: {e}"
                    );
                    self.to_replace.push_front((worker, reason));
                    myself.send_after(RESPAWN_DELAY, || StageMsg::Respawn);
                    return;
                }
            }
        }
    }

    /// Counts a replacement against the restart budget; over it, fails the
    /// pipeline (the root then aborts every stage) and replaces no more.
    fn within_budget(&mut self) -> bool {
        let Some(budget) = self.budget else {
            return true;
        };
        if self.over_budget {
            return false;
        }
        let now = crate::clock::now();
        while self
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > budget.window)
        {
            self.restarts.pop_front();
        }
        self.restarts.push_back(now);
        let restarts = self.restarts.len() as u32;
        if restarts <= budget.max_restarts {
            return true;
        }
        (self.fail)(PipelineError::RestartBudgetExceeded {
            pipeline: self.shared.name.to_string(),
            stage: self.name.to_string(),
            restarts,
            window: budget.window,
        });
        self.over_budget = true;
        false
    }

    fn receive(&mut self, mut items: Vec<WorkItem<I>>) {
        self.requested = self.requested.saturating_sub(items.len());
        self.shared.gauges[self.index]
            .admitted
            .fetch_add(items.len() as u64, Ordering::Relaxed);
        if self.aborting {
            let cancelled = items
                .into_iter()
                .map(|i| self.cancel(i, "before it started"))
                .collect();
            self.to_tracker(cancelled);
            return;
        }
        for item in &mut items {
            item.metadata.attempts = 0;
        }
        if self.shared.config.enable_tracking {
            let now = crate::clock::now();
            for item in &mut items {
                let stages = &mut item.metadata.stages;
                if stages.capacity() == 0 {
                    stages.reserve_exact(self.shared.config.stages.len() - self.index);
                }
                stages.push(StageTimes {
                    stage: self.index as u16,
                    attempts: 0,
                    queued: now,
                    started: None,
                    completed: None,
                    attempt_started: None,
                    handler: Duration::ZERO,
                });
            }
        }
        if self.shared.events.wants_lifecycle() {
            let events = items
                .iter()
                .map(|i| PipelineEvent::ItemQueued {
                    job_id: i.job_id.clone(),
                    stage: self.name.clone(),
                })
                .collect();
            self.shared.events.lifecycle(events);
        }
        self.queue.extend(items);
    }

    async fn on_report(&mut self, myself: &ActorRef<StageMsg<I, O>>, report: WorkerReport<I, O>) {
        let Some(slot) = self.slots.get_mut(&report.worker) else {
            // Its worker was reaped already: every item it held is accounted
            // for. (The items' `Drop` is user code.)
            crate::contain::drop_logged(report, || "a late report".to_string());
            return;
        };
        let n = report.outcomes.len() + report.returned.len();
        for _ in 0..n {
            slot.held.pop_front();
        }
        if n > 0 && !slot.held.is_empty() && self.shared.config.stall_threshold.is_some() {
            // The worker goes on with the rest of its batch.
            slot.since = crate::clock::now();
            slot.stalled = false;
        }
        self.in_flight -= n;
        if let Some(reason) = &report.failing {
            // The worker is failing: replace it now, so that the replacement
            // is announced before the failed item's result.
            slot.failing = true;
            if !self.aborting {
                tracing::warn!(
                    pipeline = %self.shared.name,
                    stage = %self.name,
                    worker = %report.worker,
                    "replacing the worker: {reason}"
                );
                self.to_replace.push_back((report.worker, reason.clone()));
                self.respawn(myself).await;
            }
        } else if slot.held.is_empty() && !self.aborting {
            self.idle.push(report.worker);
        }
        if !report.outcomes.is_empty() {
            let per_item = report.busy.as_nanos() as f64 / report.outcomes.len() as f64;
            self.service_ns = if self.service_ns == 0.0 {
                per_item
            } else {
                0.8 * self.service_ns + 0.2 * per_item
            };
        }
        let mut finished = Vec::new();
        if self.aborting {
            let cancelled = report
                .returned
                .into_iter()
                .map(|i| self.cancel(i, "before it started"));
            finished.extend(cancelled);
        } else {
            for item in report.returned.into_iter().rev() {
                self.queue.push_front(item);
            }
        }
        self.shared.gauges[self.index]
            .busy_ns
            .fetch_add(report.busy.as_nanos() as u64, Ordering::Relaxed);
        let finished_at =
            (self.is_last() && self.shared.config.enable_tracking).then(crate::clock::now);
        let (mut processed, mut failed, mut retried) = (0, 0, 0);
        let mut inputs = Vec::new();
        for outcome in report.outcomes {
            match outcome {
                Outcome::Done(item) if self.aborting => {
                    finished.push(self.cancel(item, "after this stage finished it"));
                }
                Outcome::Done(item) => {
                    processed += 1;
                    if self.is_last() {
                        finished.push(WorkItemResult::completed(item, finished_at));
                    } else {
                        self.outbox.push_back(item);
                    }
                }
                Outcome::Failed(outcome) => {
                    failed += 1;
                    let crate::runner::Failed { result, input } = *outcome;
                    if let Some(input) = input {
                        inputs.push((result.job_id.clone(), input));
                    }
                    finished.push(result);
                }
                Outcome::Retry(item) if self.aborting => {
                    finished.push(self.cancel(item, "while it waited to be retried"));
                }
                Outcome::Retry(item) => {
                    retried += 1;
                    self.delay(myself, item);
                }
            }
        }
        let gauges = &self.shared.gauges[self.index];
        gauges.processed.fetch_add(processed, Ordering::Relaxed);
        gauges.failed.fetch_add(failed, Ordering::Relaxed);
        gauges.retried.fetch_add(retried, Ordering::Relaxed);
        if !inputs.is_empty() {
            let _ = self.tracker.cast(TrackerMsg::Inputs(inputs));
        }
        self.to_tracker(finished);
    }

    /// Holds an item for its retry backoff.
    fn delay(&mut self, myself: &ActorRef<StageMsg<I, O>>, item: WorkItem<I>) {
        let wait = self.retry.map_or(Duration::ZERO, |policy| {
            policy.delay_before(item.metadata.attempts + 1, fastrand::f64())
        });
        let due = tokio::time::Instant::now() + wait;
        self.delayed.insert((due, self.next_delayed), item);
        self.next_delayed += 1;
        if self.wake_at.is_none_or(|at| due < at) {
            self.wake_at = Some(due);
            myself.send_after(wait, || StageMsg::Wake);
        }
    }

    /// Queues the items whose backoff is over, and sets the timer for the next.
    fn wake(&mut self, myself: &ActorRef<StageMsg<I, O>>) {
        let now = tokio::time::Instant::now();
        if self.wake_at.is_some_and(|at| at <= now) {
            self.wake_at = None;
        }
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                let due = entry.key().0;
                if self.wake_at.is_none_or(|at| due < at) {
                    self.wake_at = Some(due);
                    myself.send_after(due - now, || StageMsg::Wake);
                }
                break;
            }
            self.queue.push_back(entry.remove());
        }
    }

    async fn reap(&mut self, myself: &ActorRef<StageMsg<I, O>>, worker: WorkerId, reason: String) {
        let Some(slot) = self.slots.remove(&worker) else {
            return;
        };
        self.idle.retain(|w| *w != worker);
        self.in_flight -= slot.held.len();
        let kind = if self.aborting {
            ItemErrorKind::Cancelled
        } else {
            if !slot.failing {
                // It died without reporting a panic: replace it now.
                tracing::warn!(
                    pipeline = %self.shared.name,
                    stage = %self.name,
                    worker = %worker,
                    "worker died, replacing it: {reason}"
                );
                self.to_replace.push_back((worker, reason.clone()));
                self.respawn(myself).await;
            }
            ItemErrorKind::WorkerLost
        };
        let message = match kind {
            ItemErrorKind::Cancelled => "pipeline aborted while a worker held the item".to_string(),
            _ => format!("worker {worker} died holding the item: {reason}"),
        };
        let lost: Vec<_> = slot
            .held
            .into_iter()
            .map(|(job_id, created)| {
                let mut metadata = WorkItemMetadata::default();
                metadata.set_created(created);
                WorkItemResult::failed(
                    job_id,
                    metadata,
                    ItemError::new(&*self.name, kind, message.clone()),
                )
            })
            .collect();
        if kind != ItemErrorKind::Cancelled {
            self.shared.gauges[self.index]
                .failed
                .fetch_add(lost.len() as u64, Ordering::Relaxed);
        }
        self.to_tracker(lost);
    }

    fn abort(&mut self) {
        if self.aborting {
            return;
        }
        self.aborting = true;
        self.idle.clear();
        self.to_replace.clear();
        let mut cancelled: Vec<_> = std::mem::take(&mut self.queue)
            .into_iter()
            .map(|i| self.cancel(i, "before it started"))
            .collect();
        let retrying = std::mem::take(&mut self.delayed);
        cancelled.extend(
            retrying
                .into_values()
                .map(|i| self.cancel(i, "while it waited to be retried")),
        );
        let waiting = std::mem::take(&mut self.outbox);
        cancelled.extend(
            waiting
                .into_iter()
                .map(|i| self.cancel(i, "after this stage finished it")),
        );
        self.to_tracker(cancelled);
        // Each killed worker is reaped, its items cancelled, when its
        // termination arrives.
        for slot in self.slots.values() {
            slot.actor.kill();
        }
    }

    fn cancel<T>(&self, item: WorkItem<T>, when: &str) -> WorkItemResult {
        let message = format!("pipeline aborted {when}");
        let mut error = ItemError::new(&*self.name, ItemErrorKind::Cancelled, message);
        error.attempts = item.metadata.attempts;
        let WorkItem {
            job_id,
            data,
            metadata,
        } = item;
        crate::contain::drop_logged(data, || {
            format!(
                "the data of item {job_id}, cancelled in stage `{}`",
                self.name
            )
        });
        WorkItemResult::failed(job_id, metadata, error)
    }

    /// Moves what can move: finished items downstream, queued items to idle
    /// workers, demand upstream.
    fn pump(&mut self) {
        if let Downstream::Stage(next) = &self.downstream {
            let n = self.credit.min(self.outbox.len());
            if n > 0 {
                self.credit -= n;
                next.send(self.outbox.drain(..n).collect());
            }
        }
        while !self.queue.is_empty() {
            let Some(worker) = self.idle.pop() else { break };
            let (least, most) = self.batch_bounds();
            let share = self.queue.len().div_ceil(self.idle.len() + 1);
            let take = share.max(least).min(most).min(self.queue.len());
            let items: Vec<_> = self.queue.drain(..take).collect();
            let slot = self
                .slots
                .get_mut(&worker)
                .expect("idle workers have slots");
            slot.held.extend(
                items
                    .iter()
                    .map(|i| (i.job_id.clone(), i.metadata.created())),
            );
            if self.shared.config.stall_threshold.is_some() {
                slot.since = crate::clock::now();
                slot.stalled = false;
            }
            self.in_flight += take;
            if let Err(MessagingErr::SendErr(WorkerMsg::Run(items))) =
                slot.actor.cast(WorkerMsg::Run(items))
            {
                // The worker died after its last report; its Reap is on the way.
                slot.held.clear();
                self.in_flight -= items.len();
                for item in items.into_iter().rev() {
                    self.queue.push_front(item);
                }
            }
        }
        self.request();
    }

    /// How many items a worker is given at once: at least [`SPLIT_WORK`]
    /// worth (splitting less work between workers costs more than it
    /// gains), at most [`BATCH_WORK`] worth and [`MAX_BATCH`], by the
    /// stage's recent service time; one at a time until that is known.
    fn batch_bounds(&self) -> (usize, usize) {
        if self.service_ns == 0.0 {
            return (1, 1);
        }
        let items = |work: Duration| {
            ((work.as_nanos() as f64 / self.service_ns) as usize).clamp(1, MAX_BATCH)
        };
        (items(SPLIT_WORK), items(BATCH_WORK))
    }

    /// Asks upstream for the room the stage has, in chunks of at least half
    /// its capacity so that batches stay large.
    fn request(&mut self) {
        if self.aborting {
            return;
        }
        let Some(upstream) = &self.upstream else {
            return;
        };
        let held = self.queue.len() + self.delayed.len() + self.in_flight + self.outbox.len();
        let free = self.capacity.saturating_sub(held + self.requested);
        if free > 0 && (free >= self.capacity.div_ceil(2) || held + self.requested == 0) {
            self.requested += free;
            upstream(free);
        }
    }

    /// Reports, once each, the items at the front of a worker's batch that
    /// it has held for `threshold` or longer.
    fn check_stalls(&mut self, threshold: Duration) {
        let now = crate::clock::now();
        for (worker, slot) in &mut self.slots {
            let Some((job_id, _)) = slot.held.front() else {
                continue;
            };
            let age = now.saturating_duration_since(slot.since);
            if slot.stalled || slot.failing || age < threshold {
                continue;
            }
            slot.stalled = true;
            crate::monitor::report_stall(
                &self.shared,
                self.index,
                &self.tracker,
                job_id,
                *worker,
                age,
            );
        }
    }

    fn to_tracker(&self, results: Vec<WorkItemResult>) {
        if !results.is_empty() {
            let _ = self.tracker.cast(TrackerMsg::Finished(results));
        }
    }

    fn tell_tracker_event(&self, event: PipelineEvent) {
        let _ = self.tracker.cast(TrackerMsg::Event(event));
    }

    fn publish_gauges(&self) {
        let g = &self.shared.gauges[self.index];
        g.queued
            .store(self.queue.len() + self.delayed.len(), Ordering::Relaxed);
        g.in_flight.store(self.in_flight, Ordering::Relaxed);
        g.waiting_downstream
            .store(self.outbox.len(), Ordering::Relaxed);
        g.workers.store(
            self.slots.values().filter(|s| !s.failing).count(),
            Ordering::Relaxed,
        );
    }
}
