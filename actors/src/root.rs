//! The pipeline root: the one actor a user (or a user's supervisor) sees.
//!
//! - **Owns**: the tracker, the stage supervisors and the source actor, all
//!   spawned linked to it, in that order, and wired together.
//! - **Receives**: [`PipelineMsg`]: `Stop`, `Abort`, `Stats`, `Subscribe`,
//!   `SetRateLimit` and `SetWorkers` from handles or other actors, `Inject`
//!   from other actors (a handle's `inject` goes to the source straight);
//!   `StageFailed` from a stage over its restart budget; `LogStats` from its
//!   timer; `Finished` from the tracker.
//! - **Sends**: other actors' injections and `Close` to the source, `Abort`
//!   to the stages. Stats are read from `Shared`, never asked of an actor.
//! - **Supervises**: its children, which end only when it stops them; any
//!   other end (a panic, or a stop or kill from outside) ends the run with
//!   an error naming the child. A source that ends closes the input: the
//!   pipeline finishes the items it has and reports the error (a panic in
//!   `refill` or `ack` is caught in the source actor, which does the same
//!   and stays to acknowledge). A stage that ends aborts the pipeline: the
//!   other stages are killed, and every item left without an outcome ends
//!   `Cancelled` through the tracker. A tracker that ends leaves nothing to
//!   record outcomes: the run ends at once. Errors: [`PipelineError::ActorFailed`]
//!   (a panic: a bug in bergtalzug) or [`PipelineError::ActorStopped`].
//! - **Ends**: when the tracker has filed its report, it stops its children,
//!   records the outcome for the handles, and stops with the reason
//!   [`FINISHED`]; if the pipeline failed (source panic, restart budget) it
//!   fails with the error instead, so a supervising parent can tell the two
//!   apart. Stopped from outside, it aborts and accounts for every item in
//!   `post_stop` first.
//!
//! # Shutdown protocol
//!
//! | request | input | queued items | items in workers |
//! |---|---|---|---|
//! | `Stop` | closed: no refill, injections refused | run to their outcome | run to their outcome |
//! | `Abort`, a stage over budget, stopped from outside | closed | end `Cancelled` | workers are killed; their items end `Cancelled` |
//! | a stage stopped or killed from outside | closed | the other stages are killed; every item without an outcome ends `Cancelled` | likewise |
//!
//! Either way every admitted item gets exactly one outcome before the
//! pipeline reports that it finished. A refill in progress when the input
//! closes is abandoned (its future dropped). Abort (and a stop's deadline)
//! never waits for an observer: lossless subscribers and a full
//! dead-letter channel are no longer waited for (`Shared::stop_waiting`).
//! A stop or abort that comes while `start` is starting waits for it.

use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::binding::{SourceBinding, SpawnCtx, StageBinding};
use crate::config::{ConfigError, PipelineConfig, RateLimit};
use crate::dead_letter::DeadLetterSink;
use crate::error::PipelineError;
use crate::event::{EventFilter, EventStream, PipelineEvent};
use crate::item::WorkItem;
use crate::ports::{FailPipeline, Outlet, ReportFiled, StageControl, Upstream};
use crate::shared::{FinishReport, Shared};
use crate::source_actor::{SourceActor, SourceArgs, SourceMsg};
use crate::stats::PipelineStats;
use crate::tracker::{Callback, Tracker, TrackerArgs, TrackerMsg};

/// The stop reason of a root that finished normally.
pub const FINISHED: &str = "pipeline finished";

/// How long the root waits for its children to stop when it finishes.
const CHILD_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a root stopped from outside waits for its aborted items to be
/// accounted for before it gives up (and ends `Interrupted`).
const STOP_ACCOUNTING_TIMEOUT: Duration = Duration::from_secs(30);

/// The pipeline root's mailbox; `T` is the pipeline's input type.
///
/// What an actor system sends a pipeline it embeds (see the `embed`
/// module): `Inject`, `Stop`, `Abort`, `Stats`, `Subscribe`. The other
/// variants come from the pipeline's own actors; their payloads cannot be
/// made outside it.
#[non_exhaustive]
pub enum PipelineMsg<T> {
    /// Admit these items; the reply comes once all are admitted (so the
    /// caller waits for room), or with `InputClosed` (none was admitted) or
    /// `PartlyAdmitted` (the first `admitted` were) once the input closes.
    Inject(Vec<WorkItem<T>>, RpcReplyPort<Result<(), PipelineError>>),
    /// Graceful stop: take no more input, finish every item in the pipeline.
    Stop,
    /// Stop now: take no more input, cancel every item in the pipeline.
    Abort,
    /// A statistics snapshot.
    Stats(RpcReplyPort<PipelineStats>),
    /// A subscription to the events `filter` matches, from now on; hand the
    /// stream to [`crate::event::forward_to_actor`] to get them as messages.
    Subscribe(EventFilter, RpcReplyPort<EventStream>),
    /// A new rate limit for `stage` (`None`: none), in force at once (as
    /// Broadway's `update_rate_limiting`). The reply comes once it is, or
    /// with [`PipelineError::InvalidChange`] naming the stage and field.
    SetRateLimit {
        /// The stage's name.
        stage: String,
        /// The new limit.
        limit: Option<RateLimit>,
        /// Where the answer goes.
        reply: RpcReplyPort<Result<(), PipelineError>>,
    },
    /// A new worker count for `stage`: it grows at once; when it shrinks,
    /// busy workers finish the items they hold first. The reply comes once
    /// the stage took it, or with [`PipelineError::InvalidChange`].
    SetWorkers {
        /// The stage's name.
        stage: String,
        /// The new count, 1 to [`MAX_WORKERS`](crate::config::MAX_WORKERS).
        workers: usize,
        /// Where the answer goes.
        reply: RpcReplyPort<Result<(), PipelineError>>,
    },
    /// From a stage over its restart budget: fail the pipeline (abort it,
    /// account for every item, end with the error).
    StageFailed(Failure),
    /// From its own timer, every `stats_interval`: log the stats line.
    LogStats(Tick),
    /// From the tracker: every item has its outcome (the report is filed).
    /// Only the tracker can make one.
    Finished(Filed),
}

/// The proof that the tracker filed its report; see [`PipelineMsg::Finished`].
#[derive(Debug)]
pub struct Filed(());

/// Why a stage failed the pipeline; see [`PipelineMsg::StageFailed`].
#[derive(Debug)]
pub struct Failure(PipelineError);

impl Failure {
    pub(crate) fn new(error: PipelineError) -> Self {
        Failure(error)
    }
}

impl<T: Send + 'static> FailPipeline for ActorRef<PipelineMsg<T>> {
    fn fail(&self, error: PipelineError) {
        let _ = self.cast(PipelineMsg::StageFailed(Failure::new(error)));
    }
}

impl<T: Send + 'static> ReportFiled for ActorRef<PipelineMsg<T>> {
    fn filed(&self) {
        let _ = self.cast(PipelineMsg::Finished(Filed(())));
    }
}

/// A tick of the root's stats timer; see [`PipelineMsg::LogStats`].
#[derive(Debug)]
pub struct Tick(());

/// Everything a pipeline is made of, as the builder assembled it.
pub(crate) struct PipelineParts<T> {
    /// The validated configuration.
    pub(crate) config: PipelineConfig,
    /// Where the items come from.
    pub(crate) source: SourceBinding<T>,
    /// One binding per stage, in config order.
    pub(crate) stages: Vec<StageBinding>,
    /// Completion callbacks, called once per item.
    pub(crate) callbacks: Vec<Callback>,
    /// Where items that end without success go.
    pub(crate) dead_letters: Option<DeadLetterSink>,
}

/// The root actor of a pipeline whose input type is `T`.
pub(crate) struct PipelineActor<T>(PhantomData<fn(T)>);

impl<T> PipelineActor<T> {
    pub(crate) fn new() -> Self {
        PipelineActor(PhantomData)
    }
}

/// The root's start-up arguments; made by the handle, `Pipeline`.
pub(crate) struct PipelineArgs<T> {
    shared: Arc<Shared>,
    parts: PipelineParts<T>,
    /// Where the source actor is put once spawned, for `Pipeline::inject`
    /// to reach it without a hop through the root.
    source_slot: Arc<OnceLock<ActorRef<SourceMsg<T>>>>,
}

impl<T> PipelineArgs<T> {
    pub(crate) fn new(
        shared: Arc<Shared>,
        parts: PipelineParts<T>,
        source_slot: Arc<OnceLock<ActorRef<SourceMsg<T>>>>,
    ) -> Self {
        PipelineArgs {
            shared,
            parts,
            source_slot,
        }
    }
}

/// The root's state.
pub(crate) struct PipelineState<T> {
    shared: Arc<Shared>,
    source: ActorRef<SourceMsg<T>>,
    stages: Vec<Box<dyn StageControl>>,
    tracker: ActorRef<TrackerMsg>,
    /// Each stage's worker count, as last set (`set_workers`): the
    /// source's window follows it.
    workers: Vec<usize>,
    /// The root is stopping its children itself.
    concluding: bool,
    /// The stats line's timer task, ended with the root (left alone it
    /// would live on until its next tick, `stats_interval` later).
    stats_timer: Option<tokio::task::JoinHandle<()>>,
    /// A stage ended from outside: the others are being killed.
    sweeping: bool,
}

impl<T: Send + 'static> Actor for PipelineActor<T> {
    type Msg = PipelineMsg<T>;
    type State = PipelineState<T>;
    type Arguments = PipelineArgs<T>;

    async fn pre_start(
        &self,
        myself: ActorRef<PipelineMsg<T>>,
        args: PipelineArgs<T>,
    ) -> Result<PipelineState<T>, ActorProcessingErr> {
        let PipelineArgs {
            shared,
            parts,
            source_slot,
        } = args;
        let mut spawned: Vec<ActorCell> = Vec::new();
        let result = spawn_children(&myself, &shared, parts, &mut spawned).await;
        match &result {
            Ok(state) => {
                let _ = source_slot.set(state.source.clone());
            }
            Err(_) => {
                for cell in spawned {
                    cell.kill();
                }
            }
        }
        result
    }

    async fn handle(
        &self,
        myself: ActorRef<PipelineMsg<T>>,
        message: PipelineMsg<T>,
        state: &mut PipelineState<T>,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            PipelineMsg::Inject(items, reply) => {
                if let Err(ractor::MessagingErr::SendErr(SourceMsg::Inject(_, reply))) =
                    state.source.cast(SourceMsg::Inject(items, reply))
                {
                    let _ = reply.send(Err(PipelineError::InputClosed(
                        state.shared.name.to_string(),
                    )));
                }
            }
            PipelineMsg::Stop => state.close_input(),
            PipelineMsg::Abort => {
                state.shared.stop_waiting();
                state.close_input();
                for stage in &state.stages {
                    stage.abort();
                }
            }
            PipelineMsg::Stats(reply) => {
                let _ = reply.send(state.shared.stats());
            }
            PipelineMsg::StageFailed(Failure(error)) => {
                tracing::error!(target: "bergtalzug::pipeline", pipeline = %state.shared.name, "{error}");
                state.shared.fail(error);
                state.shared.stop_waiting();
                state.close_input();
                for stage in &state.stages {
                    stage.abort();
                }
            }
            PipelineMsg::LogStats(Tick(())) => {
                if !state.shared.completion.is_done() {
                    log_stats(&state.shared.stats());
                }
            }
            PipelineMsg::SetRateLimit {
                stage,
                limit,
                reply,
            } => {
                let checked = state.stage_named(&stage).and_then(|index| {
                    match limit.map(|l| l.validate_for(&stage)) {
                        Some(Err(error)) => Err(state.invalid(error)),
                        _ => Ok(index),
                    }
                });
                match checked {
                    Ok(index) => state.stages[index].set_rate_limit(limit, reply),
                    Err(error) => {
                        let _ = reply.send(Err(error));
                    }
                }
            }
            PipelineMsg::SetWorkers {
                stage,
                workers,
                reply,
            } => {
                let checked = state.stage_named(&stage).and_then(|index| {
                    crate::config::check_workers(workers)
                        .map(|()| index)
                        .map_err(|message| {
                            state.invalid(ConfigError::InvalidStage {
                                stage: stage.clone(),
                                field: "workers".into(),
                                message,
                            })
                        })
                });
                match checked {
                    Ok(index) => {
                        state.stages[index].resize(workers, reply);
                        // The window grows with the stage's room (or
                        // shrinks), so that added workers get items.
                        state.workers[index] = workers;
                        let stages = &state.shared.config.stages;
                        let window = stages
                            .iter()
                            .zip(&state.workers)
                            .map(|(stage, &w)| stage.item_room_with(w))
                            .sum();
                        state.source.cast(SourceMsg::Window(window)).ok();
                    }
                    Err(error) => {
                        let _ = reply.send(Err(error));
                    }
                }
            }
            PipelineMsg::Subscribe(filter, reply) => {
                let by = "PipelineMsg::Subscribe (an actor's subscription)".to_string();
                let _ = reply.send(state.shared.events.subscribe_as(filter, by));
            }
            PipelineMsg::Finished(Filed(())) => {
                let report = state.shared.report.take(Duration::ZERO).await;
                match state.conclude(&myself, report).await {
                    Ok(()) => myself.stop(Some(FINISHED.into())),
                    // The supervisor sees `ActorFailed` with the reason.
                    Err(error) => return Err(error.into()),
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<PipelineMsg<T>>,
        event: SupervisionEvent,
        state: &mut PipelineState<T>,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason, failed) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string(), true),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".into()), false)
            }
            _ => return Ok(()),
        };
        // Children stop on their own only when the root stops them.
        if state.concluding || state.shared.completion.is_done() {
            return Ok(());
        }
        let id = cell.get_id();
        if id == state.source.get_id() {
            state.source_ended(reason, failed);
            return Ok(());
        }
        if id == state.tracker.get_id() {
            return Err(state.tracker_ended(&myself, reason, failed).into());
        }
        // A stage's supervisor, or a splitter or batcher of the stage: the
        // items it held are lost either way.
        let Some((index, companion)) = state.stages.iter().enumerate().find_map(|(i, s)| {
            if s.cell().get_id() == id {
                Some((i, false))
            } else {
                s.companions()
                    .iter()
                    .any(|c| c.get_id() == id)
                    .then_some((i, true))
            }
        }) else {
            return Ok(());
        };
        if state.sweeping {
            return Ok(()); // killed by the sweep below
        }
        match state
            .stage_ended(index, id, companion, reason, failed)
            .await
        {
            Ok(()) => Ok(()),
            Err(error) => {
                state.shared.events.close();
                state.shared.completion.fail(error.clone());
                myself.stop_children(None);
                Err(error.into())
            }
        }
    }

    /// Stopped from outside (e.g. by its supervisor's
    /// `stop_children_and_wait`) before it finished: aborts, waits until
    /// every admitted item is accounted for, and ends like an abort.
    async fn post_stop(
        &self,
        myself: ActorRef<PipelineMsg<T>>,
        state: &mut PipelineState<T>,
    ) -> Result<(), ActorProcessingErr> {
        if state.shared.completion.is_done() {
            return Ok(());
        }
        tracing::info!(target: "bergtalzug::pipeline", pipeline = %state.shared.name, "stopped from outside: aborting and accounting for every item");
        state.shared.stop_waiting();
        state.close_input();
        for stage in &state.stages {
            stage.abort();
        }
        let report = state.shared.report.take(STOP_ACCOUNTING_TIMEOUT).await;
        let _ = state.conclude(&myself, report).await;
        Ok(())
    }
}

/// The periodic stats line: the seed's fields as tracing fields, and the
/// whole snapshot as the message.
fn log_stats(stats: &PipelineStats) {
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
    tracing::info!(target: "bergtalzug::pipeline",
        pipeline = %stats.pipeline_name,
        active_items = stats.active_items,
        active_by_stage = ?stats.active_by_stage,
        completed_items = stats.completed_items,
        failed_items = stats.failed_items,
        success_rate = stats.success_rate,
        average_duration_ms = ms(stats.average_duration),
        items_per_second = stats.recent_items_per_second,
        bottleneck = stats.bottleneck.as_deref(),
        "{stats}"
    );
}

/// Spawns the tracker, the stages from last to first (each knowing the
/// next), and the source, then wires demand and releases.
async fn spawn_children<T: Send + 'static>(
    myself: &ActorRef<PipelineMsg<T>>,
    shared: &Arc<Shared>,
    parts: PipelineParts<T>,
    spawned: &mut Vec<ActorCell>,
) -> Result<PipelineState<T>, ActorProcessingErr> {
    let cell = myself.get_cell();
    let root = myself.clone();
    let tracker_args = TrackerArgs {
        shared: shared.clone(),
        finish: Box::new(root),
        callbacks: parts.callbacks,
        dead_letters: parts.dead_letters,
    };
    let (tracker, _) = Actor::spawn_linked(None, Tracker, tracker_args, cell.clone()).await?;
    spawned.push(tracker.get_cell());

    let mut stages: Vec<Box<dyn StageControl>> = Vec::with_capacity(parts.stages.len());
    let mut outlet = None;
    for (index, binding) in parts.stages.into_iter().enumerate().rev() {
        let ctx = SpawnCtx {
            shared: shared.clone(),
            index,
            tracker: tracker.clone(),
            supervisor: cell.clone(),
            fail: Arc::new(myself.clone()),
        };
        let stage = binding.spawn(ctx, outlet.take()).await?;
        spawned.push(stage.control.cell());
        outlet = Some(stage.inlet);
        stages.push(stage.control);
    }
    stages.reverse();
    let first_stage = *outlet
        .ok_or("a pipeline needs at least one stage")?
        .downcast::<Arc<dyn Outlet<T>>>()
        .map_err(
            |_| "the first stage does not take the source's item type (a bug in the builder)",
        )?;

    let _ = shared
        .expected
        .set(parts.source.source.as_ref().and_then(|s| s.size_hint()));
    let mut input = parts.source.source;
    let acknowledger = input.as_mut().and_then(|s| s.acknowledger());
    let wants_acks = acknowledger.is_some() || input.as_ref().is_some_and(|s| s.wants_acks());
    let source_args = SourceArgs {
        shared: shared.clone(),
        source: input,
        acknowledger,
        first_stage,
        tracker: tracker.clone(),
    };
    let (source, _) = Actor::spawn_linked(None, SourceActor::new(), source_args, cell).await?;
    spawned.push(source.get_cell());

    tracker.cast(TrackerMsg::Connect(Box::new(source.clone()), wants_acks))?;
    for (i, stage) in stages.iter().enumerate() {
        let upstream: Arc<dyn Upstream> = match i {
            0 => Arc::new(source.clone()),
            _ => stages[i - 1].demand_port(),
        };
        stage.connect(upstream);
    }
    #[cfg(feature = "metrics")]
    shared.install_metrics();
    *shared.started.lock().unwrap_or_else(|e| e.into_inner()) = Some(crate::clock::now());
    crate::monitor::spawn(
        shared.clone(),
        stages.iter().map(|s| s.stall_port()).collect(),
    );
    let interval = shared.config.stats_interval;
    let stats_timer = (!interval.is_zero())
        .then(|| myself.send_interval(interval, || PipelineMsg::LogStats(Tick(()))));
    Ok(PipelineState {
        stats_timer,
        shared: shared.clone(),
        source,
        stages,
        tracker,
        workers: shared.config.stages.iter().map(|s| s.workers).collect(),
        concluding: false,
        sweeping: false,
    })
}

impl<T> Drop for PipelineState<T> {
    /// However the root ends (even killed), waiters are woken: a pipeline
    /// stopped from outside ends `Interrupted` rather than hanging `run`.
    fn drop(&mut self) {
        if let Some(timer) = self.stats_timer.take() {
            timer.abort();
        }
        if !self.shared.completion.is_done() {
            self.shared.events.close();
            self.shared.completion.fail(PipelineError::Interrupted {
                pipeline: self.shared.name.to_string(),
                reason: "its root actor stopped".into(),
            });
        }
    }
}

impl<T: Send + 'static> PipelineState<T> {
    /// The index of the stage called `name`, or the error naming it.
    fn stage_named(&self, name: &str) -> Result<usize, PipelineError> {
        self.shared.config.stage_index(name).ok_or_else(|| {
            let known: Vec<_> = self
                .shared
                .config
                .stages
                .iter()
                .map(|s| s.name.as_str())
                .collect();
            self.invalid(ConfigError::InvalidStage {
                stage: name.to_string(),
                field: "name".into(),
                message: format!(
                    "is not a stage of this pipeline (stages: {})",
                    known.join(", ")
                ),
            })
        })
    }

    fn invalid(&self, error: ConfigError) -> PipelineError {
        PipelineError::InvalidChange {
            pipeline: self.shared.name.to_string(),
            error,
        }
    }

    /// Ends the pipeline from the tracker's report (`None`: it did not come
    /// in time): stops the children, then records the outcome for the
    /// handles, which it returns.
    async fn conclude(
        &mut self,
        myself: &ActorRef<PipelineMsg<T>>,
        report: Option<FinishReport>,
    ) -> Result<(), PipelineError> {
        self.concluding = true;
        // Every acknowledgement reaches the source before it stops.
        let _ = self
            .source
            .call(SourceMsg::Flush, Some(CHILD_STOP_TIMEOUT))
            .await;
        myself
            .stop_children_and_wait(Some(FINISHED.into()), Some(CHILD_STOP_TIMEOUT))
            .await;
        let pipeline = self.shared.name.to_string();
        let failure = self
            .shared
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let (results, error, stats) = match (report, failure) {
            (None, _) => {
                let reason =
                    format!("not every item was accounted for within {STOP_ACCOUNTING_TIMEOUT:?}");
                let error = PipelineError::Interrupted { pipeline, reason };
                (Vec::new(), Some(error), None)
            }
            // A failed pipeline keeps what completed, for `run_outcome`.
            (Some(report), error) => (report.results, error, Some(report.stats)),
        };
        let result = error.clone().map_or(Ok(()), Err);
        #[cfg(feature = "metrics")]
        self.shared.sync_metrics(true);
        self.shared.completion.finish(results, error, stats);
        result
    }

    fn close_input(&self) {
        let _ = self.shared.closing.send_replace(true);
        let _ = self.source.cast(SourceMsg::Close);
    }

    /// Admitted items without an outcome (yet).
    fn unfinished(&self) -> u64 {
        self.shared
            .admitted()
            .saturating_sub(self.shared.finished())
    }

    /// The source actor ended before the pipeline did: the input is
    /// closed, the items admitted finish, and the pipeline fails (a panic
    /// in `refill` or `ack` is caught in the source actor itself; this is
    /// any other panic, or a stop from outside).
    fn source_ended(&mut self, reason: String, failed: bool) {
        let pipeline = self.shared.name.to_string();
        let error = if failed {
            PipelineError::SourcePanicked {
                pipeline,
                message: reason.clone(),
            }
        } else {
            PipelineError::ActorStopped {
                pipeline,
                actor: "source".into(),
                reason: reason.clone(),
                unaccounted: 0,
            }
        };
        tracing::error!(target: "bergtalzug::pipeline", pipeline = %self.shared.name, "{error}; finishing the items it admitted");
        let _ = self
            .tracker
            .cast(TrackerMsg::Event(PipelineEvent::SourceError {
                message: error.to_string(),
            }));
        self.shared.fail(error);
        let _ = self.shared.closing.send_replace(true);
        let _ = self.shared.input_closed.send_replace(true);
        let _ = self.tracker.cast(TrackerMsg::InputClosed);
    }

    /// The tracker ended before the pipeline did: nothing can record the
    /// outcomes left, so the pipeline ends at once with the error, which
    /// counts the items left without one.
    fn tracker_ended(
        &mut self,
        myself: &ActorRef<PipelineMsg<T>>,
        reason: String,
        failed: bool,
    ) -> PipelineError {
        let pipeline = self.shared.name.to_string();
        let error = if failed {
            PipelineError::ActorFailed {
                pipeline,
                actor: "tracker".into(),
                message: reason,
            }
        } else {
            PipelineError::ActorStopped {
                pipeline,
                actor: "tracker".into(),
                reason,
                unaccounted: self.unfinished(),
            }
        };
        tracing::error!(target: "bergtalzug::pipeline", pipeline = %self.shared.name, "{error}");
        self.shared.events.close();
        self.shared.completion.fail(error.clone());
        myself.stop_children(None);
        error
    }

    /// Stage `index` ended before the pipeline did (it was stopped or
    /// killed from outside, or failed): the pipeline is aborted at once.
    /// The other stages are killed, the tracker records what they had sent,
    /// and every admitted item still without an outcome (in the stages, or
    /// on its way between them) ends `Cancelled`, by its job id from the
    /// source's record (tracking on), or is counted in the error. The
    /// pipeline then finishes as usual and fails with the error. `Err`:
    /// the tracker or the source did not answer; the pipeline must end now.
    async fn stage_ended(
        &mut self,
        index: usize,
        dead: ractor::ActorId,
        companion: bool,
        reason: String,
        failed: bool,
    ) -> Result<(), PipelineError> {
        let stage = self.shared.names[index].to_string();
        // What the messages call the actor that ended.
        let what = match companion {
            false => format!("stage `{stage}`"),
            true => format!("the splitter or batcher of stage `{stage}`"),
        };
        let pipeline = self.shared.name.to_string();
        let how = if failed {
            "failed"
        } else {
            "was stopped from outside"
        };
        tracing::error!(target: "bergtalzug::pipeline", pipeline = %pipeline, stage = %stage, "{what} {how} ({reason}); aborting the pipeline");
        self.sweeping = true;
        self.shared.stop_waiting();
        self.close_input();
        if !companion {
            // A stage stopped gracefully leaves its workers behind.
            for worker in self.stages[index].cell().get_children() {
                worker.kill();
            }
        }
        // Every other actor that may hold items: stages, splitters, batchers.
        let living: Vec<_> = self
            .stages
            .iter()
            .flat_map(|s| std::iter::once(s.cell()).chain(s.companions()))
            .filter(|cell| cell.get_id() != dead)
            .collect();
        for cell in living {
            let _ = cell.kill_and_wait(Some(CHILD_STOP_TIMEOUT)).await;
        }
        let actor = match companion {
            false => format!("stage {stage}"),
            true => format!("the splitter or batcher of stage {stage}"),
        };
        let error = |unaccounted| {
            if failed {
                PipelineError::ActorFailed {
                    pipeline: pipeline.clone(),
                    actor: actor.clone(),
                    message: reason.clone(),
                }
            } else {
                PipelineError::ActorStopped {
                    pipeline: pipeline.clone(),
                    actor: actor.clone(),
                    reason: reason.clone(),
                    unaccounted,
                }
            }
        };
        let quiet = self
            .tracker
            .call(TrackerMsg::Quiesce, Some(CHILD_STOP_TIMEOUT))
            .await;
        let outstanding = self
            .source
            .call(SourceMsg::Outstanding, Some(CHILD_STOP_TIMEOUT))
            .await;
        let (Ok(ractor::rpc::CallResult::Success(())), Ok(ractor::rpc::CallResult::Success(ids))) =
            (quiet, outstanding)
        else {
            return Err(error(self.unfinished()));
        };
        let unaccounted = if ids.is_some() { 0 } else { self.unfinished() };
        self.shared.fail(error(unaccounted));
        let message =
            format!("pipeline aborted: {what} {how} ({reason}) while the item was in the pipeline");
        self.tracker
            .cast(TrackerMsg::Lost {
                ids,
                stage,
                message,
            })
            .map_err(|_| error(self.unfinished()))
    }
}
