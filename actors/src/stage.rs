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
//!   replaced at once, so the stage keeps its worker count; its hand is
//!   closed as soon as its death is known, and what it held is accounted
//!   for when its `Reap` arrives, after any report it sent.
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
//! slow ones go one at a time to every idle worker. A batch goes in the
//! worker's hand ([`crate::runner::hand`]), from which the worker takes one
//! item at a time; when a worker is idle and nothing is queued, it gets the
//! items a busy worker has not started (and the stage takes the results a
//! blocking handler returned and its worker has not reported), so one slow
//! item holds back only itself. When a worker dies, the results in its
//! hand are delivered and the items it never started run elsewhere; only
//! the item it was running is lost. Demand goes upstream in
//! chunks of at least half the stage's capacity, so that `Items` messages
//! are large too (measured on 2,000,000 items through 4 x 4 stages: about
//! 1.3x the throughput of quarter-capacity chunks).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use std::marker::PhantomData;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::binding::{DemandPort, FailPort, Outlet};
use crate::config::{RestartBudget, RetryPolicy};
use crate::error::PipelineError;
use crate::event::{PipelineEvent, WorkerId};
use crate::item::{
    ItemError, ItemErrorKind, JobId, StageTimes, WorkItem, WorkItemMetadata, WorkItemResult,
};
use crate::runner::hand::{Hand, Harvest, Taken};
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
/// How many busy workers an idle one looks into, busiest first, for items
/// they have not started.
const STEAL_TRIES: usize = 4;
/// While a worker is idle, nothing is queued and a busy worker may hold
/// items it has not started, the stage looks again this often (a worker
/// blocked in its handler sends nothing that would make it look).
const REBALANCE_AFTER: Duration = Duration::from_millis(5);
/// A busy worker's unstarted items are taken for idle workers only once it
/// has gone this long without finishing an item: its batch (about
/// [`BATCH_WORK`] of work) has outlived its pace. Batches of fast items
/// are not split after they were given: in a flowing pipeline a worker is
/// idle for a moment between batches all the time, and taking from a busy
/// one then would only cut batches into more messages.
const STEAL_AFTER: Duration = Duration::from_millis(2);

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
    /// From itself, [`REBALANCE_AFTER`] after a turn that left a worker
    /// idle while another may hold items it has not started: look again.
    Rebalance,
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

struct Slot<I, O> {
    actor: ActorRef<WorkerMsg>,
    /// The items given to the worker and not started yet (shared with it).
    hand: Arc<Hand<I, O>>,
    /// Job ids and creation times of the items the worker holds and has
    /// not reported, in the order given (those not started are the end):
    /// enough to account for them if the worker dies.
    held: VecDeque<(JobId, Instant)>,
    /// It reported a panic or a timeout and is about to fail: no more work
    /// for it.
    failing: bool,
    /// It died (or is being killed): no more work for it; its hand is
    /// closed and what was in it waits in `harvest` for its `Reap`.
    dead: bool,
    harvest: Harvest<I, O>,
    /// Since when it has held the front of `held` (stall detection).
    since: Instant,
    /// When it was last given items or last reported a finished one: its
    /// unstarted items stay its own until [`STEAL_AFTER`] after that.
    progress: Instant,
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
    slots: HashMap<WorkerId, Slot<I, O>>,
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
    /// A `Rebalance` is on its way.
    rebalance_armed: bool,
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
            rebalance_armed: false,
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
            StageMsg::Rebalance => state.rebalance_armed = false,
            StageMsg::Abort => state.abort(),
            StageMsg::CheckStalls(threshold) => state.check_stalls(threshold),
        }
        state.pump(&myself);
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
            if let Some(slot) = state.slots.get_mut(&worker) {
                // Closed now, before the reap is queued: a blocking thread
                // that outlives its worker reports under the hand's lock,
                // so whatever it sent is queued ahead of the reap, and it
                // sends nothing more.
                slot.close();
            }
            state.idle.retain(|w| *w != worker);
            // Supervision events overtake messages: the reap goes through the
            // mailbox, behind any report the worker sent before it died.
            let _ = myself.cast(StageMsg::Reap { worker, reason });
        }
        state.publish_gauges();
        Ok(())
    }
}

impl<I: Send + 'static, O: Send + 'static> Slot<I, O> {
    /// Closes the worker's hand (it died or is being killed), keeping what
    /// was in it for the reap.
    fn close(&mut self) {
        self.dead = true;
        let Harvest {
            outcomes,
            unstarted,
        } = self.hand.close();
        self.harvest.outcomes.extend(outcomes);
        self.harvest.unstarted.extend(unstarted);
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
            hand: Arc::new(Hand::new()),
        });
        let hand = ctx.hand.clone();
        let args = (ctx, self.runner.clone());
        let (actor, _) =
            Actor::spawn_linked(None, Worker::<I, O, R>::new(), args, myself.get_cell()).await?;
        self.by_actor.insert(actor.get_id(), id);
        self.slots.insert(
            id,
            Slot {
                actor,
                hand,
                held: VecDeque::new(),
                failing: false,
                dead: false,
                harvest: Harvest::default(),
                since: crate::clock::now(),
                progress: crate::clock::now(),
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
        if !report.outcomes.is_empty() {
            slot.progress = crate::clock::now();
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
        } else if slot.held.is_empty() && !slot.dead && !self.aborting {
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
        self.settle(myself, report.outcomes, finished);
    }

    /// Accounts for outcomes that came back from a worker: items done go
    /// downstream (the last stage's are results, even while aborting: a
    /// result that came back is never replaced), failures and `finished`
    /// go to the tracker, retries wait out their backoff.
    fn settle(
        &mut self,
        myself: &ActorRef<StageMsg<I, O>>,
        outcomes: Vec<Outcome<I, O>>,
        mut finished: Vec<WorkItemResult>,
    ) {
        let finished_at =
            (self.is_last() && self.shared.config.enable_tracking).then(crate::clock::now);
        let (mut processed, mut failed, mut retried) = (0, 0, 0);
        let mut inputs = Vec::new();
        for outcome in outcomes {
            match outcome {
                Outcome::Done(item) if self.is_last() => {
                    processed += 1;
                    finished.push(WorkItemResult::completed(item, finished_at));
                }
                Outcome::Done(item) if self.aborting => {
                    finished.push(self.cancel(item, "after this stage finished it"));
                }
                Outcome::Done(item) => {
                    processed += 1;
                    self.outbox.push_back(item);
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

    /// Accounts for what a dead worker held: the outcomes it had not
    /// reported are settled, the items it never started go back to the
    /// queue (cancelled on abort), and the one it was running fails
    /// `WorkerLost` (`Cancelled` on abort).
    async fn reap(&mut self, myself: &ActorRef<StageMsg<I, O>>, worker: WorkerId, reason: String) {
        let Some(mut slot) = self.slots.remove(&worker) else {
            return;
        };
        self.idle.retain(|w| *w != worker);
        slot.close();
        let Harvest {
            outcomes,
            unstarted,
        } = slot.harvest;
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
        let accounted: HashSet<&JobId> = outcomes
            .iter()
            .map(Outcome::job_id)
            .chain(unstarted.iter().map(|i| &i.job_id))
            .collect();
        let mut finished: Vec<_> = slot
            .held
            .iter()
            .filter(|(job_id, _)| !accounted.contains(job_id))
            .map(|(job_id, created)| {
                let mut metadata = WorkItemMetadata::default();
                metadata.set_created(*created);
                WorkItemResult::failed(
                    job_id.clone(),
                    metadata,
                    ItemError::new(&*self.name, kind, message.clone()),
                )
            })
            .collect();
        drop(accounted);
        if kind != ItemErrorKind::Cancelled {
            self.shared.gauges[self.index]
                .failed
                .fetch_add(finished.len() as u64, Ordering::Relaxed);
        }
        if self.aborting {
            let cancelled = unstarted
                .into_iter()
                .map(|i| self.cancel(i, "before it started"));
            finished.extend(cancelled);
        } else {
            // They never started: they run on another worker.
            for item in unstarted.into_iter().rev() {
                self.queue.push_front(item);
            }
        }
        self.settle(myself, outcomes, finished);
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
        // Each killed worker is reaped when its termination arrives: the
        // results it had are delivered, its other items cancelled. Its hand
        // is closed first, so that a thread it leaves behind adds nothing.
        for slot in self.slots.values_mut() {
            slot.close();
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
    fn pump(&mut self, myself: &ActorRef<StageMsg<I, O>>) {
        if let Downstream::Stage(next) = &self.downstream {
            let n = self.credit.min(self.outbox.len());
            if n > 0 {
                self.credit -= n;
                next.send(self.outbox.drain(..n).collect());
            }
        }
        self.steal(myself);
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
            slot.progress = crate::clock::now();
            slot.hand.give(items);
            if slot.actor.cast(WorkerMsg::Run).is_err() {
                // The worker died after its last report; its Reap is on the way.
                let items = slot.hand.take_back_all();
                slot.held.clear();
                self.in_flight -= take;
                for item in items.into_iter().rev() {
                    self.queue.push_front(item);
                }
            }
        }
        self.arm_rebalance(myself);
        self.request();
    }

    /// A worker blocked in its handler sends nothing for long: while a
    /// worker is idle, nothing is queued and a busy one holds more than the
    /// item it runs, look again in [`REBALANCE_AFTER`]. So a batch that
    /// outlives its pace (about 1 ms of work) is shared with idle workers
    /// within a few milliseconds, while batches of fast items are left
    /// whole (see [`SPLIT_WORK`]).
    fn arm_rebalance(&mut self, myself: &ActorRef<StageMsg<I, O>>) {
        if self.rebalance_armed
            || self.aborting
            || self.idle.is_empty()
            || !self.queue.is_empty()
            || !self
                .slots
                .values()
                .any(|s| !s.failing && !s.dead && s.held.len() > 1)
        {
            return;
        }
        self.rebalance_armed = true;
        myself.send_after(REBALANCE_AFTER, || StageMsg::Rebalance);
    }

    /// When workers are idle and nothing is queued, takes from the busy
    /// worker holding the most, of those that finished nothing for
    /// [`STEAL_AFTER`], what it has not started, for the idle workers, and what its blocking handler returned and it has not
    /// reported yet: so an item that takes long holds back only itself,
    /// never the rest of its batch while a worker is idle. The busy worker
    /// keeps an even share.
    fn steal(&mut self, myself: &ActorRef<StageMsg<I, O>>) {
        if self.aborting || self.idle.is_empty() || !self.queue.is_empty() {
            return;
        }
        let idle = self.idle.len();
        // The busiest first, of those whose batch outlived its pace; an
        // async worker keeps its batch to itself while its handlers
        // complete at once, so look at a few.
        let mut now = None;
        let mut candidates: Vec<_> = self
            .slots
            .iter()
            .filter(|(_, s)| !s.failing && !s.dead && s.held.len() > 1)
            .filter(|(_, s)| {
                let now = *now.get_or_insert_with(crate::clock::now);
                now.saturating_duration_since(s.progress) >= STEAL_AFTER
            })
            .map(|(id, s)| (s.held.len(), *id))
            .collect();
        candidates.sort_unstable_by(|a, b| b.cmp(a));
        for (_, victim) in candidates.into_iter().take(STEAL_TRIES) {
            let slot = self.slots.get_mut(&victim).expect("listed above");
            let Taken {
                unstarted: items,
                outcomes,
                busy,
            } = slot
                .hand
                .take_for_others(|unstarted| unstarted - unstarted / (idle + 1));
            if items.is_empty() && outcomes.is_empty() {
                continue;
            }
            for item in items.iter().rev() {
                let back = slot.held.pop_back();
                debug_assert!(
                    back.is_some_and(|(job_id, _)| job_id == item.job_id),
                    "the unstarted items are the end of what a worker holds"
                );
            }
            // They were held before the rest (reports on their way, if any,
            // take the same number off the front).
            for _ in 0..outcomes.len() {
                slot.held.pop_front();
            }
            if slot.held.is_empty() {
                // It had not started on its batch: all of it went to others.
                // The wake-up it has yet to read finds its hand empty.
                self.idle.push(victim);
            }
            self.in_flight -= items.len() + outcomes.len();
            self.queue.extend(items);
            if !outcomes.is_empty() {
                self.shared.gauges[self.index]
                    .busy_ns
                    .fetch_add(busy.as_nanos() as u64, Ordering::Relaxed);
                self.settle(myself, outcomes, Vec::new());
            }
            return;
        }
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
            if slot.stalled || slot.failing || slot.dead || age < threshold {
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
        // A worker seen dead that reported no panic is still counted: its
        // reap replaces it.
        g.workers.store(
            self.slots.values().filter(|s| !s.failing).count(),
            Ordering::Relaxed,
        );
    }
}
