//! The stage supervisor: one per stage.
//!
//! - **Owns**: the stage's queue (`queue_size`), the items done here that
//!   wait for the next stage's demand, the record of what each worker holds,
//!   its `workers` worker actors (a Thread or Cpu stage's threads are its
//!   runner's).
//! - **Receives**: [`StageMsg`]: `Connect` from the root; `Items` from
//!   upstream (never more than it asked for); `Demand` from downstream;
//!   `Reports` from its workers, the doorbell of their reports in its
//!   [`inbox`] (taken at the start of every message); `Reap`, `Respawn`
//!   and `Wake` from itself; `Abort` from the root.
//! - **Sends**: `Demand` upstream, `Items` downstream (never more than the
//!   downstream asked for), batches to idle workers (into their hands,
//!   which wake them: no message), finished results to the
//!   tracker (the last stage's successes and every failure).
//! - **Supervises**: its workers (linked at spawn). A worker that fails is
//!   replaced at once, so the stage keeps its worker count; its hand is
//!   closed as soon as its death is known, and what it held is accounted
//!   for when its `Reap` arrives, after any report it put in the inbox.
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
//! recent service time; [`batching`]), so fast handlers run many items per
//! message while slow ones go one at a time to every idle worker. A batch goes in the
//! worker's hand ([`crate::runner::hand`]), from which the worker takes one
//! item at a time; when a worker is idle and nothing is queued, it gets the
//! items a busy worker has not started (and the stage takes the results a
//! blocking handler returned and its worker has not reported), so one slow
//! item holds back only itself. When a worker dies, the results in its
//! hand are delivered and the items it never started run elsewhere; only
//! the item it was running is lost. Demand goes upstream in
//! chunks of at least half the stage's capacity, so that `Items` messages
//! are large too (measured on 2,000,000 items through 4 x 4 stages: about
//! 1.3x the throughput of quarter-capacity chunks), except in a blocking
//! stage whose busy worker is to be topped up while nothing is queued: its
//! workers hold most of its capacity, and it asks for what room it has.

//!
//! # Parts
//!
//! Each part keeps one invariant, asserted in debug builds where it lives:
//!
//! - [`credit`]: what the stage may send and has asked for, against its room;
//! - [`inbox`]: the workers' reports, behind one doorbell;
//! - [`pool`]: its workers and what each holds; taking unstarted items for
//!   idle workers;
//! - [`budget`]: the restart budget;
//! - [`backoff`]: items waiting to be retried, under one timer;
//! - [`batching`]: how many items a worker is given at once;
//! - [`stalls`]: items held too long;
//! - [`rate`]: the rate limit, and the items waiting for it under one timer;
//! - [`lanes`]: key lanes, one item per key out at a time;
//! - [`order`]: ordered output, outcomes leaving in input order;
//! - [`tune`]: adaptive concurrency, the worker count chosen within a range.
//!
//! # Flow policies
//!
//! An item received goes through the policies the stage has, in this
//! order, before it reaches the queue that idle workers are served from:
//! its key lane (it waits while an item of its key is out), then the rate
//! limit (it waits, holding no worker, until the limiter lets it start;
//! only as many are let through as there are idle workers, one to each).
//! Its outcome leaves through the reorder buffer when the stage is
//! ordered. Items waiting in any of them count against the stage's room,
//! so a limited or ordered stage holds back its upstream as any slow stage
//! does. See `docs/flow-policies.md`.
//!
//! This file is the actor: its mailbox, its ports, and how a message moves
//! items between the parts.

mod backoff;
mod batching;
mod budget;
mod credit;
mod inbox;
mod lanes;
mod order;
mod pool;
mod rate;
mod stalls;
mod tune;

use std::any::Any;
use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::config::{RateLimit, RetryPolicy};
use crate::error::PipelineError;
use crate::event::{PipelineEvent, WorkerId};
use crate::item::{
    ItemError, ItemErrorKind, JobId, Stamps, WorkItem, WorkItemMetadata, WorkItemResult,
};
use crate::outcome::{Failed, Outcome, WorkerReport};
use crate::ports::{FailPipeline, Outlet, Reports, StageControl, StallCheck, Upstream};
use crate::runner::hand::{Hand, Harvest};
use crate::runner::{BLOCKING_FLUSH_AFTER, RunCtx, StageRunner};
use crate::shared::Shared;
use crate::timers::Timers;
use crate::tracker::TrackerMsg;
use crate::worker::Worker;
use backoff::Backoff;
use batching::{BATCH_WORK, Batching, MAX_BATCH};
use budget::{Budget, OverBudget};
use credit::Credit;
use inbox::Inbox;
use lanes::Lanes;
pub(crate) use lanes::{KeyFn, key_fn};
use order::{Leaving, Reorder};
use pool::{AfterReport, Pool, Stolen};
pub(crate) use rate::CostFn;
use rate::Rate;
use tune::Tune;

/// What a stage's policies need of its items, given when it was bound: the
/// key of its key lanes, the cost of an item under its rate limit.
pub(crate) struct Policies<I> {
    pub(crate) key: Option<KeyFn<I>>,
    pub(crate) cost: Option<CostFn<I>>,
}

impl<I> Default for Policies<I> {
    fn default() -> Self {
        Policies {
            key: None,
            cost: None,
        }
    }
}

/// The reply to a change made while running.
type Changed = RpcReplyPort<Result<(), PipelineError>>;

/// Wait before trying again when a replacement worker cannot be spawned.
const RESPAWN_DELAY: Duration = Duration::from_millis(100);
/// While a worker is idle, nothing is queued and a busy worker may hold
/// items it has not started, the stage looks again this often (a worker
/// blocked in its handler sends nothing that would make it look).
const REBALANCE_AFTER: Duration = Duration::from_millis(5);

/// A stage supervisor's mailbox; `I` is the stage's input type. (Its
/// workers' reports, which carry its output type too, come through its
/// [`Inbox`].)
pub(crate) enum StageMsg<I> {
    /// From the root, first: where to ask for items.
    Connect(Arc<dyn Upstream>),
    /// From upstream: items, at most as many as this stage asked for.
    Items(Vec<WorkItem<I>>),
    /// From downstream: room for this many more items.
    Demand(usize),
    /// From a worker, the doorbell of the stage's [`Inbox`]: reports are
    /// in it. (The stage takes them at the start of every message.)
    Reports,
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
    /// From itself: the rate limit may let the items waiting for it start.
    Pace,
    /// From the root: a new rate limit (`None`: none), in force at once;
    /// the reply once it is.
    SetRate(Option<RateLimit>, Changed),
    /// From the root: a new worker count (validated); the reply once the
    /// stage has grown, or once its extra workers retire (they finish the
    /// items they hold first).
    Resize(usize, Changed),
}

impl<I: Send + 'static> Outlet<I> for ActorRef<StageMsg<I>> {
    fn send(&self, items: Vec<WorkItem<I>>) {
        // A closed stage means the pipeline is shutting down.
        let _ = self.cast(StageMsg::Items(items));
    }
}

impl<I: Send + 'static> Upstream for ActorRef<StageMsg<I>> {
    fn demand(&self, n: usize) {
        let _ = self.cast(StageMsg::Demand(n));
    }
}

/// Where a worker's reports go: its stage's [`Inbox`], which rings the
/// stage when a report is the first since the stage last took them.
struct ReportPort<I, O> {
    stage: ActorRef<StageMsg<I>>,
    inbox: Arc<Inbox<I, O>>,
}

impl<I: Send + 'static, O: Send + 'static> Reports<I, O> for ReportPort<I, O> {
    fn report(&self, report: WorkerReport<I, O>) -> Result<(), Vec<WorkerReport<I, O>>> {
        if self.inbox.put(report) && self.stage.cast(StageMsg::Reports).is_err() {
            // The stage is gone (the pipeline is shutting down).
            return Err(self.inbox.unrung());
        }
        Ok(())
    }
}

impl<I: Send + 'static> StallCheck for ActorRef<StageMsg<I>> {
    fn check_stalls(&self, threshold: Duration) {
        let _ = self.cast(StageMsg::CheckStalls(threshold));
    }
}

impl<I: Send + 'static> StageControl for ActorRef<StageMsg<I>> {
    fn connect(&self, upstream: Arc<dyn Upstream>) {
        let _ = self.cast(StageMsg::Connect(upstream));
    }

    fn abort(&self) {
        let _ = self.cast(StageMsg::Abort);
    }

    fn cell(&self) -> ActorCell {
        self.get_cell()
    }

    fn demand_port(&self) -> Arc<dyn Upstream> {
        Arc::new(self.clone())
    }

    fn stall_port(&self) -> Arc<dyn StallCheck> {
        Arc::new(self.clone())
    }

    fn set_rate_limit(&self, limit: Option<RateLimit>, reply: Changed) {
        let _ = self.cast(StageMsg::SetRate(limit, reply));
    }

    fn resize(&self, workers: usize, reply: Changed) {
        let _ = self.cast(StageMsg::Resize(workers, reply));
    }
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
    pub(crate) fail: Arc<dyn FailPipeline>,
    pub(crate) policies: Policies<I>,
}

pub(crate) struct StageState<I, O, R> {
    // What the stage was built with.
    shared: Arc<Shared>,
    index: usize,
    name: Arc<str>,
    queue_size: usize,
    /// How many workers the stage keeps (changes on `Resize`).
    workers: usize,
    runner: Arc<R>,
    tracker: ActorRef<TrackerMsg>,
    downstream: Downstream<O>,
    fail: Arc<dyn FailPipeline>,
    keep: Option<fn(&I) -> I>,
    retry: Option<RetryPolicy>,
    // What changes, in parts.
    upstream: Option<Arc<dyn Upstream>>,
    queue: VecDeque<WorkItem<I>>,
    outbox: VecDeque<WorkItem<O>>,
    /// Workers' reports not taken yet: while some are, what is done waits
    /// for them to go downstream in one batch (up to [`MAX_BATCH`]).
    inbox: Arc<Inbox<I, O>>,
    /// The buffer the inbox's reports are taken into, reused.
    reports: Vec<WorkerReport<I, O>>,
    /// What handling a message sends the tracker (results settled or
    /// cancelled, failures' last inputs), sent once it is handled.
    departing: Departures,
    credit: Credit,
    pool: Pool<I, O>,
    budget: Budget,
    backoff: Backoff<I>,
    batching: Batching,
    /// The place (`seq`) the next item received gets.
    next_seq: u64,
    rate: Rate<I>,
    lanes: Option<Lanes<I>>,
    reorder: Option<Reorder<O>>,
    /// With a worker range: the controller that picks the count in it.
    tune: Option<Tune>,
    aborting: bool,
    /// A `Rebalance` is on its way.
    rebalance_armed: bool,
    /// The timers that may be long (a retry's backoff, the rate limit's
    /// pace), ended with the stage rather than left to run out.
    timers: Timers<StageMsg<I>>,
}

impl<I, O, R> Actor for Stage<I, O, R>
where
    I: Send + 'static,
    O: Send + 'static,
    R: StageRunner<I, O>,
{
    type Msg = StageMsg<I>;
    type State = StageState<I, O, R>;
    type Arguments = StageArgs<I, O, R>;

    async fn pre_start(
        &self,
        _myself: ActorRef<StageMsg<I>>,
        args: StageArgs<I, O, R>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let config = &args.shared.config.stages[args.index];
        let name = args.shared.names[args.index].clone();
        Ok(StageState {
            index: args.index,
            queue_size: config.queue_size,
            workers: config.initial_workers(),
            runner: args.runner,
            tracker: args.tracker,
            upstream: None,
            downstream: args.downstream,
            queue: VecDeque::with_capacity(config.queue_size.min(4096)),
            outbox: VecDeque::new(),
            inbox: Arc::new(Inbox::new()),
            reports: Vec::new(),
            departing: Departures::default(),
            credit: Credit::new(config.capacity()),
            pool: Pool::new(),
            budget: Budget::new(config.restart_budget),
            backoff: Backoff::new(),
            batching: Batching::default(),
            next_seq: 0,
            rate: Rate::new(config.rate_limit, args.policies.cost),
            lanes: args.policies.key.map(Lanes::new),
            reorder: config.ordered.then(Reorder::new),
            tune: config.adaptive.map(Tune::new),
            aborting: false,
            fail: args.fail,
            keep: args.keep.filter(|_| config.max_attempts() > 1),
            retry: config.retry,
            rebalance_armed: false,
            timers: Timers::new(),
            name,
            shared: args.shared,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<StageMsg<I>>,
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
        _myself: ActorRef<StageMsg<I>>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // A Process stage's worker processes are reaped before the stage
        // (and so the pipeline) ends.
        state.runner.shutdown().await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<StageMsg<I>>,
        message: StageMsg<I>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Reports first, whatever the message: a `Reap` comes after its
        // worker's reports, and the doorbell finds them taken already when
        // another message came first.
        state.take_reports(&myself).await;
        // A change is answered once the stage has taken it, gauges included.
        let mut changed = None;
        match message {
            StageMsg::Connect(upstream) => state.upstream = Some(upstream),
            StageMsg::Items(items) => state.receive(items),
            StageMsg::Demand(n) => state.credit.granted(n),
            StageMsg::Reports => {}
            StageMsg::Reap { worker, reason } => state.reap(&myself, worker, reason).await,
            StageMsg::Respawn => state.respawn(&myself).await,
            StageMsg::Wake => state.wake(&myself),
            StageMsg::Rebalance => state.rebalance_armed = false,
            StageMsg::Abort => state.abort(),
            StageMsg::CheckStalls(threshold) => state.check_stalls(threshold),
            StageMsg::Pace => state.rate.woke(),
            StageMsg::SetRate(limit, reply) => {
                state.set_rate(limit);
                changed = Some(reply);
            }
            StageMsg::Resize(workers, reply) => {
                state.resize(&myself, workers).await;
                changed = Some(reply);
            }
        }
        // Results go to the tracker before new work goes to the workers,
        // as a worker's report did: the task woken last runs next on this
        // thread (tokio's LIFO slot), and a worker given an item after the
        // tracker was woken waits behind every task queued here. (With 64
        // workers sleeping 1 ms, results sent after the workers were given
        // their items cost 3 to 8 % of the sleep floor's rate.)
        state.depart();
        state.pump(&myself);
        state.publish_gauges();
        state.retune(&myself).await;
        // What `pump` or `retune` settled (outcomes taken from a busy
        // worker's hand for idle ones).
        state.depart();
        state.pool.check();
        if let Some(reply) = changed {
            let _ = reply.send(Ok(()));
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<StageMsg<I>>,
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
        if let Some(worker) = state.pool.died(cell.get_id()) {
            // Supervision events overtake messages: the reap goes through the
            // mailbox, and the stage takes its inbox first, with any report
            // the worker put in before it died.
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

    /// Whether busy workers get their next batch before they end the one
    /// they have ([`Pool::top_up`]): a blocking stage's, unless a rate
    /// limit lets items start one at a time.
    fn prefills(&self) -> bool {
        self.runner.prefills() && !self.rate.limited()
    }

    /// In a stage that [`prefills`](Self::prefills): the items under which
    /// a busy worker is given its next batch, a report period's worth
    /// ([`BLOCKING_FLUSH_AFTER`]) and a full batch more (about 3 ms of
    /// work), so that a report finds it holding a batch still.
    fn low_water(&self) -> Option<usize> {
        const BATCHES: usize = BLOCKING_FLUSH_AFTER
            .as_nanos()
            .div_ceil(BATCH_WORK.as_nanos()) as usize
            + 1;
        self.prefills().then(|| BATCHES * self.batching.full())
    }

    /// Items the stage holds: queued, waiting in a key lane, for the rate
    /// limit or to be retried, in workers, waiting for the ones before them
    /// (ordered), waiting for downstream's demand.
    fn held(&self) -> usize {
        self.queue.len()
            + self.lanes.as_ref().map_or(0, Lanes::len)
            + self.rate.len()
            + self.backoff.len()
            + self.pool.in_flight()
            + self.reorder.as_ref().map_or(0, Reorder::len)
            + self.outbox.len()
    }

    /// An item let through its key lane (if any): to the rate limit, if
    /// there is one, else to the queue.
    fn enter_rate(&mut self, item: WorkItem<I>) {
        if self.rate.limited() {
            self.rate.push(item);
        } else {
            self.queue.push_back(item);
        }
    }

    /// A new rate limit, in force at once: the items queued and not given
    /// to a worker yet wait for it too (first).
    fn set_rate(&mut self, limit: Option<RateLimit>) {
        let was = self.rate.limited();
        self.rate.set(limit);
        if !was && self.rate.limited() {
            let queued = std::mem::take(&mut self.queue);
            let waiting: Vec<_> = self.rate.take_all().collect();
            for item in queued.into_iter().chain(waiting) {
                self.rate.push(item);
            }
        }
    }

    /// An adaptive stage: counts whether every worker is busy, and at the
    /// end of a window resizes to the count its controller chose.
    async fn retune(&mut self, myself: &ActorRef<StageMsg<I>>) {
        if self.aborting {
            return;
        }
        let Some(tune) = &mut self.tune else {
            return;
        };
        tune.sample(!self.pool.has_idle());
        let Some(next) = tune.decide(self.workers) else {
            return;
        };
        if next != self.workers {
            tracing::debug!(
                target: "bergtalzug::stage",
                pipeline = %self.shared.name,
                stage = %self.name,
                "adaptive concurrency: {} -> {next} workers",
                self.workers
            );
            self.resize(myself, next).await;
            self.pump(myself);
            self.publish_gauges();
        }
    }

    /// A new worker count: grows at once (busy workers retiring from an
    /// earlier shrink take work again first), or retires the extra
    /// workers, idle ones at once, busy ones once they hold nothing.
    async fn resize(&mut self, myself: &ActorRef<StageMsg<I>>, workers: usize) {
        self.workers = workers;
        // An adaptive stage keeps room for the most workers of its range.
        let room = match self.shared.config.stages[self.index].adaptive {
            Some(range) => workers.max(range.max),
            None => workers,
        };
        self.credit.resize(self.queue_size.saturating_add(room));
        if self.aborting {
            return;
        }
        let live = self.pool.live();
        if workers > live {
            self.pool.unretire(workers - live);
            self.respawn(myself).await;
        } else if workers < live {
            self.pool.retire(live - workers);
        }
    }

    async fn spawn_worker(
        &mut self,
        myself: &ActorRef<StageMsg<I>>,
    ) -> Result<WorkerId, ActorProcessingErr> {
        let id = self.pool.next_id();
        let config = &self.shared.config.stages[self.index];
        let ctx = Arc::new(RunCtx {
            pipeline: self.shared.name.clone(),
            stage: self.name.clone(),
            worker: id,
            reports: Arc::new(ReportPort {
                stage: myself.clone(),
                inbox: self.inbox.clone(),
            }),
            tracking: self.shared.config.enable_tracking,
            events: self.shared.events.clone(),
            keep: self.keep,
            max_attempts: config.max_attempts(),
            timeout: config.timeout,
            hand: Arc::new(Hand::new()),
        });
        let hand = ctx.hand.clone();
        let args = (ctx, self.runner.clone());
        let (actor, _) =
            Actor::spawn_linked(None, Worker::<I, O, R>::new(), args, myself.get_cell()).await?;
        self.pool.add(id, actor, hand, crate::clock::now());
        Ok(id)
    }

    /// Spawns the workers that died; on failure, tries again later.
    ///
    /// Boxed: a spawn's future is large (over 600 bytes), and inline it
    /// would make every future that may respawn (`on_report`, `reap`,
    /// `resize`, `retune`, so this actor's `handle`) that much larger.
    /// ractor copies a `handle` future on every message, whatever the
    /// message: boxed, the stage's is 568 bytes instead of 1,296.
    fn respawn<'a>(
        &'a mut self,
        myself: &'a ActorRef<StageMsg<I>>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(self.replace_workers(myself))
    }

    async fn replace_workers(&mut self, myself: &ActorRef<StageMsg<I>>) {
        while !self.aborting {
            let Some((worker, reason)) = self.pool.to_replace.pop_front() else {
                break;
            };
            if self.pool.live() >= self.workers {
                // The stage shrank meanwhile: it needs no replacement.
                continue;
            }
            if !self.within_budget() {
                self.pool.to_replace.clear();
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
                        target: "bergtalzug::stage",
                        pipeline = %self.shared.name,
                        stage = %self.name,
                        "cannot spawn a replacement worker, trying again in {RESPAWN_DELAY:?}: {e}"
                    );
                    self.pool.to_replace.push_front((worker, reason));
                    myself.send_after(RESPAWN_DELAY, || StageMsg::Respawn);
                    return;
                }
            }
        }
        // Grown by a resize: new workers up to the count.
        while !self.aborting && self.pool.to_replace.is_empty() && self.pool.live() < self.workers {
            if let Err(e) = self.spawn_worker(myself).await {
                tracing::error!(
                    target: "bergtalzug::stage",
                    pipeline = %self.shared.name,
                    stage = %self.name,
                    "cannot spawn a worker to grow the stage, trying again in {RESPAWN_DELAY:?}: {e}"
                );
                myself.send_after(RESPAWN_DELAY, || StageMsg::Respawn);
                return;
            }
        }
    }

    /// Counts a replacement against the restart budget; over it, fails the
    /// pipeline (the root then aborts every stage) and replaces no more.
    fn within_budget(&mut self) -> bool {
        match self.budget.replace(crate::clock::now()) {
            Ok(()) => true,
            Err(None) => false,
            Err(Some(OverBudget { restarts, budget })) => {
                self.fail.fail(PipelineError::RestartBudgetExceeded {
                    pipeline: self.shared.name.to_string(),
                    stage: self.name.to_string(),
                    restarts,
                    window: budget.window,
                });
                false
            }
        }
    }

    fn receive(&mut self, mut items: Vec<WorkItem<I>>) {
        self.credit.received(items.len());
        self.shared.gauges[self.index]
            .admitted
            .fetch_add(items.len() as u64, Ordering::Relaxed);
        if self.aborting {
            for item in items {
                let result = self.cancel(item, "before it started");
                self.departing.finished.push(result);
            }
            return;
        }
        for item in &mut items {
            item.head.metadata.attempts = 0;
            // Modulo 2^32: the stage holds fewer items than that.
            item.head.metadata.seq = self.next_seq as u32;
            self.next_seq += 1;
        }
        if self.shared.config.enable_tracking {
            let now = crate::item::epoch_ns(crate::clock::now());
            for item in &mut items {
                let created = item.head.metadata.created_ns();
                let stages = &mut item.head.metadata.stages;
                if stages.is_empty() {
                    // Within the inline room for a short pipeline; one
                    // allocation of what is left for a longer one.
                    stages.reserve_exact(self.shared.config.stages.len() - self.index);
                }
                let at = now.saturating_sub(created);
                stages.push(Stamps::queued_at(self.index as u16, at));
            }
        }
        if self.shared.events.wants_lifecycle() {
            let events = items
                .iter()
                .map(|i| PipelineEvent::ItemQueued {
                    job_id: i.head.job_id.clone(),
                    stage: self.name.clone(),
                })
                .collect();
            self.shared.events.lifecycle(events);
        }
        if self.lanes.is_none() && !self.rate.limited() {
            if self.queue.is_empty() {
                // The batch becomes the queue, uncopied (and, given whole to
                // one worker, its hand).
                self.queue = VecDeque::from(items);
            } else {
                self.queue.extend(items);
            }
            return;
        }
        for item in items {
            let out = match &mut self.lanes {
                Some(lanes) => lanes.admit(item),
                None => Some(item),
            };
            if let Some(item) = out {
                self.enter_rate(item);
            }
        }
    }

    async fn on_report(&mut self, myself: &ActorRef<StageMsg<I>>, report: WorkerReport<I, O>) {
        let n = report.outcomes.len() + report.returned.len();
        let low_water = self.low_water();
        let after = self.pool.reported(
            report.worker,
            n,
            !report.outcomes.is_empty(),
            report.failing.is_some(),
            self.aborting,
            low_water,
            crate::clock::now(),
        );
        match after {
            AfterReport::Gone => {
                // Its worker was reaped already: every item it held is
                // accounted for. (The items' `Drop` is user code.)
                crate::contain::drop_logged(report, || "a late report".to_string());
                return;
            }
            AfterReport::Failing if !self.aborting => {
                // The worker is failing: replace it now, so that the
                // replacement is announced before the failed item's result.
                let reason = report.failing.clone().unwrap_or_default();
                tracing::warn!(
                    target: "bergtalzug::stage",
                    pipeline = %self.shared.name,
                    stage = %self.name,
                    worker = %report.worker,
                    "replacing the worker: {reason}"
                );
                self.pool.to_replace.push_back((report.worker, reason));
                self.respawn(myself).await;
            }
            AfterReport::Failing | AfterReport::Idle | AfterReport::Busy => {}
        }
        self.batching.observe(report.busy, report.outcomes.len());
        if let Some(tune) = &mut self.tune {
            let errors = report
                .outcomes
                .iter()
                .filter(|o| matches!(o, Outcome::Failed(_) | Outcome::Retry(_)))
                .count();
            tune.observe(report.outcomes.len(), errors, report.busy);
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
        self.settle(myself, report.outcomes, finished, Vec::new());
    }

    /// Accounts for outcomes that came back from a worker: items done go
    /// downstream (the last stage's are results, even while aborting: a
    /// result that came back is never replaced), failures and `finished`
    /// go to the tracker, retries wait out their backoff. `lost` are the
    /// results of items a dead worker held, by place. Each outcome frees
    /// its key lane and leaves through the reorder buffer, if the stage has
    /// them.
    fn settle(
        &mut self,
        myself: &ActorRef<StageMsg<I>>,
        outcomes: Vec<Outcome<I, O>>,
        finished: Vec<WorkItemResult>,
        lost: Vec<(u32, WorkItemResult)>,
    ) {
        let mut out = std::mem::take(&mut self.departing);
        out.finished.extend(finished);
        out.finished_at =
            (self.is_last() && self.shared.config.enable_tracking).then(crate::clock::now);
        let (mut processed, mut failed, mut retried) = (0, 0, 0);
        // No key lane to free, no order to keep, and not the last stage: a
        // done item goes straight to the outbox (what `leave` would do).
        let plain =
            self.lanes.is_none() && self.reorder.is_none() && !self.aborting && !self.is_last();
        if self.is_last() {
            // Every outcome becomes a result here (room made for all the
            // reports taken at once, by `take_reports`).
            out.finished.reserve(outcomes.len());
        }
        for outcome in outcomes {
            match outcome {
                Outcome::Done(item) if plain => {
                    processed += 1;
                    self.outbox.push_back(item);
                }
                Outcome::Done(item) if self.aborting && !self.is_last() => {
                    out.finished
                        .push(self.cancel(item, "after this stage finished it"));
                }
                Outcome::Done(item) => {
                    processed += 1;
                    let seq = item.head.metadata.seq;
                    self.leave(seq, Leaving::Next(item), &mut out);
                }
                Outcome::Failed(outcome) => {
                    failed += 1;
                    let Failed { result, input } = *outcome;
                    let seq = result.metadata.seq;
                    let input = input.map(|input| (result.job_id.clone(), input));
                    self.leave(seq, Leaving::Ended(Box::new((result, input))), &mut out);
                }
                Outcome::Retry(item) if self.aborting => {
                    out.finished
                        .push(self.cancel(item, "while it waited to be retried"));
                }
                Outcome::Retry(item) => {
                    retried += 1;
                    self.delay(myself, item);
                }
            }
        }
        for (seq, result) in lost {
            self.leave(seq, Leaving::Ended(Box::new((result, None))), &mut out);
        }
        let gauges = &self.shared.gauges[self.index];
        gauges.processed.fetch_add(processed, Ordering::Relaxed);
        gauges.failed.fetch_add(failed, Ordering::Relaxed);
        gauges.retried.fetch_add(retried, Ordering::Relaxed);
        self.departing = out;
    }

    /// Sends the tracker what handling this message settled or cancelled:
    /// the last inputs of failures (for their dead letters), then the
    /// results, one message each at most.
    fn depart(&mut self) {
        let out = &mut self.departing;
        if !out.inputs.is_empty() {
            let _ = self
                .tracker
                .cast(TrackerMsg::Inputs(std::mem::take(&mut out.inputs)));
        }
        if !out.finished.is_empty() {
            let _ = self
                .tracker
                .cast(TrackerMsg::Finished(std::mem::take(&mut out.finished)));
        }
    }

    /// Takes the reports in the inbox, in order.
    async fn take_reports(&mut self, myself: &ActorRef<StageMsg<I>>) {
        let mut reports = std::mem::take(&mut self.reports);
        self.inbox.take(&mut reports);
        if self.is_last() {
            // Every outcome becomes a result here: one allocation for all
            // the reports', not one growth per report (120 bytes each).
            let outcomes = reports.iter().map(|r| r.outcomes.len()).sum();
            self.departing.finished.reserve(outcomes);
        }
        let taken = !reports.is_empty();
        for report in reports.drain(..) {
            self.on_report(myself, report).await;
        }
        self.reports = reports;
        if taken && self.runner.prefills() && !self.aborting {
            // The other blocking workers' finished items go on with these.
            for report in self.pool.unreported() {
                self.on_report(myself, report).await;
            }
        }
    }

    /// The item at place `seq` has its outcome in this stage: its key lane
    /// lets the next item of its key through, and the outcome leaves, in
    /// its turn when the stage is ordered (at once while aborting).
    fn leave(&mut self, seq: u32, leaving: Leaving<O>, out: &mut Departures) {
        let next = self.lanes.as_mut().and_then(|lanes| lanes.finished(seq));
        if let Some(next) = next {
            if self.aborting {
                let result = self.cancel(next, "before it started");
                out.finished.push(result);
            } else {
                self.enter_rate(next);
            }
        }
        let last = self.is_last();
        match &mut self.reorder {
            Some(reorder) if !self.aborting => {
                let outbox = &mut self.outbox;
                reorder.put(seq, leaving, |l| out.depart(l, last, outbox));
            }
            _ => out.depart(leaving, last, &mut self.outbox),
        }
    }

    /// Holds an item for its retry backoff.
    fn delay(&mut self, myself: &ActorRef<StageMsg<I>>, item: WorkItem<I>) {
        let wait = self.retry.map_or(Duration::ZERO, |policy| {
            policy.delay_before(item.head.metadata.attempts + 1, fastrand::f64())
        });
        if let Some(timer) = self.backoff.hold(item, wait) {
            self.timers.after(myself, timer, || StageMsg::Wake);
        }
    }

    /// Queues the items whose backoff is over, and sets the timer for the next.
    fn wake(&mut self, myself: &ActorRef<StageMsg<I>>) {
        let (ready, timer) = self.backoff.due();
        for item in ready {
            // A retry is another start: the rate limit applies.
            self.enter_rate(item);
        }
        if let Some(timer) = timer {
            self.timers.after(myself, timer, || StageMsg::Wake);
        }
    }

    /// Accounts for what a dead worker held: the outcomes it had not
    /// reported are settled, the items it never started go back to the
    /// queue (cancelled on abort), and the one it was running fails
    /// `WorkerLost` (`Cancelled` on abort).
    async fn reap(&mut self, myself: &ActorRef<StageMsg<I>>, worker: WorkerId, reason: String) {
        let Some(slot) = self.pool.remove(worker) else {
            return;
        };
        let Harvest {
            outcomes,
            unstarted,
        } = slot.harvest;
        let kind = if self.aborting {
            ItemErrorKind::Cancelled
        } else {
            if !slot.failing && !slot.retiring {
                // It died without reporting a panic: replace it now.
                tracing::warn!(
                    target: "bergtalzug::stage",
                    pipeline = %self.shared.name,
                    stage = %self.name,
                    worker = %worker,
                    "worker died, replacing it: {reason}"
                );
                self.pool.to_replace.push_back((worker, reason.clone()));
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
            .chain(unstarted.iter().map(|i| &i.head.job_id))
            .collect();
        let lost: Vec<_> = slot
            .held
            .iter()
            .filter(|(job_id, _, _)| !accounted.contains(job_id))
            .map(|(job_id, created, seq)| {
                let mut metadata = WorkItemMetadata::default();
                metadata.set_created_ns(*created);
                metadata.seq = *seq;
                let result = WorkItemResult::failed(
                    job_id.clone(),
                    metadata,
                    ItemError::new(&*self.name, kind, message.clone()),
                );
                (*seq, result)
            })
            .collect();
        drop(accounted);
        if kind != ItemErrorKind::Cancelled {
            self.shared.gauges[self.index]
                .failed
                .fetch_add(lost.len() as u64, Ordering::Relaxed);
        }
        let mut finished = Vec::new();
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
        self.settle(myself, outcomes, finished, lost);
    }

    fn abort(&mut self) {
        if self.aborting {
            return;
        }
        self.aborting = true;
        let mut cancelled: Vec<_> = std::mem::take(&mut self.queue)
            .into_iter()
            .map(|i| self.cancel(i, "before it started"))
            .collect();
        let retrying: Vec<_> = self.backoff.take_all().collect();
        cancelled.extend(
            retrying
                .into_iter()
                .map(|i| self.cancel(i, "while it waited to be retried")),
        );
        let limited: Vec<_> = self.rate.take_all().collect();
        cancelled.extend(
            limited
                .into_iter()
                .map(|i| self.cancel(i, "while it waited for the rate limit")),
        );
        if let Some(lanes) = &mut self.lanes {
            let behind = lanes.take_all();
            cancelled.extend(
                behind
                    .into_iter()
                    .map(|i| self.cancel(i, "while it waited behind an item of its key")),
            );
        }
        let waiting = std::mem::take(&mut self.outbox);
        cancelled.extend(
            waiting
                .into_iter()
                .map(|i| self.cancel(i, "after this stage finished it")),
        );
        // Outcomes waiting for their turn: results stay results (a result
        // that came back is never replaced), items not passed on are
        // cancelled.
        let mut inputs = Vec::new();
        if let Some(reorder) = &mut self.reorder {
            let left: Vec<_> = reorder.take_all().collect();
            for leaving in left {
                match leaving {
                    Leaving::Next(item) if self.is_last() => {
                        let at = self.shared.config.enable_tracking.then(crate::clock::now);
                        cancelled.push(WorkItemResult::completed(item, at));
                    }
                    Leaving::Next(item) => {
                        cancelled.push(self.cancel(item, "after this stage finished it"));
                    }
                    Leaving::Ended(ended) => {
                        let (result, input) = *ended;
                        inputs.extend(input);
                        cancelled.push(result);
                    }
                }
            }
        }
        self.departing.inputs.extend(inputs);
        self.departing.finished.extend(cancelled);
        // Each killed worker is reaped when its termination arrives: the
        // results it had are delivered, its other items cancelled.
        self.pool.kill_all();
    }

    fn cancel<T>(&self, item: WorkItem<T>, when: &str) -> WorkItemResult {
        let message = format!("pipeline aborted {when}");
        let mut error = ItemError::new(&*self.name, ItemErrorKind::Cancelled, message);
        error.attempts = item.head.metadata.attempts;
        let (job_id, data, metadata) = item.into_parts();
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
    fn pump(&mut self, myself: &ActorRef<StageMsg<I>>) {
        if let Downstream::Stage(next) = &self.downstream
            && (self.outbox.len() >= MAX_BATCH || !self.inbox.waiting())
        {
            let n = self.credit.send(self.outbox.len());
            if n > 0 {
                // The outbox is filled item by item.
                next.send(take_front(&mut self.outbox, n, n));
            }
        }
        self.steal(myself);
        self.release(myself);
        let mut now = None;
        let low_water = self.low_water();
        while !self.queue.is_empty() && self.pool.has_idle() {
            let take = if self.rate.limited() {
                // One to each worker: an item let through starts at once.
                1
            } else {
                self.batching
                    .batch(self.queue.len(), self.pool.idle_count() - 1)
            };
            // An empty queue takes the next batch that comes as it is.
            let items = take_front(&mut self.queue, take, 0);
            let now = *now.get_or_insert_with(crate::clock::now);
            if let Err(items) = self.pool.give(items, low_water, now) {
                // Not reached: the loop runs while a worker is idle.
                for item in items.into_iter().rev() {
                    self.queue.push_front(item);
                }
                break;
            }
        }
        if let Some(low_water) = low_water
            && !self.aborting
        {
            // Busy workers running low get their next batch before they
            // end the one they have.
            let batch = self.batching.full();
            while !self.queue.is_empty() && self.pool.has_hungry() {
                let take = batch.min(self.queue.len());
                let items = take_front(&mut self.queue, take, 0);
                if let Err(items) = self.pool.top_up(items, low_water) {
                    // Not reached: the loop runs while a worker is hungry.
                    for item in items.into_iter().rev() {
                        self.queue.push_front(item);
                    }
                    break;
                }
            }
        }
        self.arm_rebalance(myself);
        self.request();
    }

    /// Lets through the rate limit as many items as there are idle workers
    /// the queue does not cover already ([`Rate::release`]), and sets the
    /// `Pace` timer when the limiter makes the next one wait.
    fn release(&mut self, myself: &ActorRef<StageMsg<I>>) {
        if self.aborting || self.rate.len() == 0 {
            return;
        }
        let room = self.pool.idle_count().saturating_sub(self.queue.len());
        let (released, timer) = self.rate.release(room);
        self.queue.extend(released);
        if let Some(timer) = timer {
            self.timers.after(myself, timer, || StageMsg::Pace);
        }
    }

    /// A worker blocked in its handler sends nothing for long: while a
    /// worker is idle, nothing is queued and a busy one holds more than the
    /// item it runs, look again in [`REBALANCE_AFTER`]. So a batch that
    /// outlives its pace (about 1 ms of work) is shared with idle workers
    /// within a few milliseconds, while batches of fast items are left
    /// whole.
    fn arm_rebalance(&mut self, myself: &ActorRef<StageMsg<I>>) {
        if self.rebalance_armed
            || self.aborting
            || !self.pool.has_idle()
            || !self.queue.is_empty()
            || !self.pool.any_busy()
        {
            return;
        }
        self.rebalance_armed = true;
        myself.send_after(REBALANCE_AFTER, || StageMsg::Rebalance);
    }

    /// When workers are idle and nothing is queued, takes what a busy
    /// worker has not started (and the results its blocking handler
    /// returned and it has not reported) for them ([`Pool::steal`]).
    fn steal(&mut self, myself: &ActorRef<StageMsg<I>>) {
        if self.aborting || !self.queue.is_empty() {
            return;
        }
        let Some(Stolen {
            unstarted,
            outcomes,
            busy,
        }) = self.pool.steal()
        else {
            return;
        };
        self.queue.extend(unstarted);
        if !outcomes.is_empty() {
            self.shared.gauges[self.index]
                .busy_ns
                .fetch_add(busy.as_nanos() as u64, Ordering::Relaxed);
            self.settle(myself, outcomes, Vec::new(), Vec::new());
        }
    }

    /// Asks upstream for the room the stage has ([`Credit::request`]).
    fn request(&mut self) {
        if self.aborting {
            return;
        }
        let Some(upstream) = &self.upstream else {
            return;
        };
        let held = self.held();
        // A stage whose busy workers are topped up asks for what room it
        // has as soon as one is to be given more than is queued: a Cpu
        // stage's workers hold most of its capacity, so half of it frees
        // only once they have nearly run dry.
        let starved = self.queue.is_empty()
            && self.prefills()
            && (self.pool.has_hungry() || self.pool.has_idle());
        if let Some(n) = self.credit.request(held, starved) {
            upstream.demand(n);
        }
    }

    /// Reports, once each, the items at the front of a worker's batch that
    /// it has held for `threshold` or longer.
    fn check_stalls(&mut self, threshold: Duration) {
        for stalled in self.pool.stalled(threshold, crate::clock::now()) {
            stalls::report(&self.shared, self.index, &self.tracker, stalled);
        }
    }

    fn tell_tracker_event(&self, event: PipelineEvent) {
        let _ = self.tracker.cast(TrackerMsg::Event(event));
    }

    fn publish_gauges(&self) {
        let g = &self.shared.gauges[self.index];
        let queued = self.queue.len()
            + self.backoff.len()
            + self.rate.len()
            + self.lanes.as_ref().map_or(0, Lanes::len);
        g.queued.store(queued, Ordering::Relaxed);
        g.in_flight.store(self.pool.in_flight(), Ordering::Relaxed);
        let reordering = self.reorder.as_ref().map_or(0, Reorder::len);
        g.waiting_downstream
            .store(self.outbox.len() + reordering, Ordering::Relaxed);
        g.workers.store(self.pool.live(), Ordering::Relaxed);
    }
}

/// The first `n` of `queue`, in order: all of it without a copy (its
/// buffer becomes the `Vec`, with a memmove at most, when its items do not
/// start at the buffer's front; `queue` gets a new one of `room`, so that
/// pushing to it again does not grow it step by step), part of it item by
/// item.
fn take_front<T>(queue: &mut VecDeque<T>, n: usize, room: usize) -> Vec<T> {
    if n == queue.len() {
        Vec::from(std::mem::replace(queue, VecDeque::with_capacity(room)))
    } else {
        queue.drain(..n).collect()
    }
}

/// What the outcomes settled in one message send on: results (and the last
/// inputs of failures, for their dead letters) for the tracker.
#[derive(Default)]
struct Departures {
    finished: Vec<WorkItemResult>,
    inputs: Vec<(JobId, Box<dyn Any + Send>)>,
    /// When the last stage's items finished (tracking on).
    finished_at: Option<std::time::Instant>,
}

impl Departures {
    /// An outcome leaves the stage: a done item to the outbox (a result,
    /// from the last stage), an ended one to the tracker.
    fn depart<O>(&mut self, leaving: Leaving<O>, last: bool, outbox: &mut VecDeque<WorkItem<O>>) {
        match leaving {
            Leaving::Next(item) if last => self
                .finished
                .push(WorkItemResult::completed(item, self.finished_at)),
            Leaving::Next(item) => outbox.push_back(item),
            Leaving::Ended(ended) => {
                let (result, input) = *ended;
                self.inputs.extend(input);
                self.finished.push(result);
            }
        }
    }
}
