//! How typed stages are bound to a pipeline and spawned, and the narrow
//! references the actors hold of one another.
//!
//! A [`StageBinding`] is a stage's handler together with the code that spawns
//! its supervisor, compiled for the handler's own input and output types.
//! The root spawns the bindings from the last stage to the first, handing
//! each the `Outlet` of the stage after it; it never sees their types.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef};

use crate::batcher::{BatchControl, BatchKey, Batcher, BatcherArgs};
use crate::config::{ExecutionType, HandlerKind};
use crate::item::WorkItem;
use crate::ports::{FailPipeline, Outlet, StageControl};
use crate::process::ProcessOptions;
use crate::process::child::{Call, Init};
use crate::process::entry::Entry;
use crate::process::spawn::ChildSpec;
use crate::process::wire::Wire;
use crate::runner::StageRunner;
use crate::runner::async_rt::AsyncRunner;
use crate::runner::cpu;
use crate::runner::process::ProcessRunner;
use crate::runner::thread::ThreadRunner;
use crate::shape::{Batch, IntoChildren};
use crate::shared::Shared;
use crate::source::{DynSource, Source, erase_source};
use crate::splitter::{Next, SplitControl, SplitMsg, Splitter, SplitterArgs};
use crate::stage::{Downstream, Policies, Stage, StageArgs};
use crate::tracker::TrackerMsg;

/// What spawning a stage needs from the root.
pub(crate) struct SpawnCtx {
    pub(crate) shared: Arc<Shared>,
    pub(crate) index: usize,
    pub(crate) tracker: ActorRef<TrackerMsg>,
    pub(crate) supervisor: ActorCell,
    pub(crate) fail: Arc<dyn FailPipeline>,
}

/// A spawned stage: its inlet (an `Arc<dyn Outlet<I>>`, typed for the stage
/// before it) and its controls.
pub(crate) struct Spawned {
    pub(crate) inlet: Box<dyn Any + Send>,
    pub(crate) control: Box<dyn StageControl>,
}

type SpawnFuture = Pin<Box<dyn Future<Output = Result<Spawned, ActorProcessingErr>> + Send>>;
type SpawnFn = Box<dyn FnOnce(SpawnCtx, Option<Box<dyn Any + Send>>) -> SpawnFuture + Send>;

/// A stage's handler, ready to be spawned as a supervisor with its workers.
pub(crate) struct StageBinding {
    kind: HandlerKind,
    retries: bool,
    /// Bound with a batch method: a batcher in front of it.
    batch: bool,
    spawn: SpawnFn,
}

impl std::fmt::Debug for StageBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageBinding")
            .field("kind", &self.kind)
            .field("retries", &self.retries)
            .finish()
    }
}

impl StageBinding {
    /// Binds an `async fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>>`.
    pub(crate) fn asynchronous<I, O, F, Fut>(handler: F, policies: Policies<I>) -> Self
    where
        I: Send + 'static,
        O: Send + 'static,
        F: Fn(WorkItem<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<WorkItem<O>>> + Send + 'static,
    {
        Self::asynchronous_keeping(handler, None, policies)
    }

    /// Like [`asynchronous`](Self::asynchronous), for a stage that retries:
    /// a copy of each input is kept for the next attempt (and for the dead
    /// letter when the last one fails).
    pub(crate) fn asynchronous_retrying<I, O, F, Fut>(handler: F, policies: Policies<I>) -> Self
    where
        I: Clone + Send + 'static,
        O: Send + 'static,
        F: Fn(WorkItem<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<WorkItem<O>>> + Send + 'static,
    {
        Self::asynchronous_keeping(handler, Some(I::clone), policies)
    }

    fn asynchronous_keeping<I, O, F, Fut>(
        handler: F,
        keep: Option<fn(&I) -> I>,
        policies: Policies<I>,
    ) -> Self
    where
        I: Send + 'static,
        O: Send + 'static,
        F: Fn(WorkItem<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<WorkItem<O>>> + Send + 'static,
    {
        StageBinding {
            kind: HandlerKind::Async,
            retries: keep.is_some(),
            batch: false,
            spawn: Box::new(move |ctx, outlet| {
                Box::pin(spawn_stage::<I, O, _>(
                    ctx,
                    AsyncRunner(handler),
                    keep,
                    outlet,
                    policies,
                ))
            }),
        }
    }

    /// Binds a blocking `fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>>`; it
    /// runs on the stage's own threads, `workers` at a time, for a Thread
    /// or a Cpu stage.
    pub(crate) fn blocking<I, O, F>(handler: F, policies: Policies<I>) -> Self
    where
        I: Send + 'static,
        O: Send + 'static,
        F: Fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>> + Send + Sync + 'static,
    {
        Self::blocking_keeping(handler, None, policies)
    }

    /// Like [`blocking`](Self::blocking), for a stage that retries: a copy
    /// of each input is kept for the next attempt (and for the dead letter
    /// when the last one fails).
    pub(crate) fn blocking_retrying<I, O, F>(handler: F, policies: Policies<I>) -> Self
    where
        I: Clone + Send + 'static,
        O: Send + 'static,
        F: Fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>> + Send + Sync + 'static,
    {
        Self::blocking_keeping(handler, Some(I::clone), policies)
    }

    fn blocking_keeping<I, O, F>(
        handler: F,
        keep: Option<fn(&I) -> I>,
        policies: Policies<I>,
    ) -> Self
    where
        I: Send + 'static,
        O: Send + 'static,
        F: Fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>> + Send + Sync + 'static,
    {
        StageBinding {
            kind: HandlerKind::Blocking,
            retries: keep.is_some(),
            batch: false,
            spawn: Box::new(move |ctx, outlet| {
                Box::pin(async move {
                    let handler = Arc::new(handler);
                    let config = &ctx.shared.config.stages[ctx.index];
                    let stuck = ctx.shared.gauges[ctx.index].stuck_threads.clone();
                    match config.execution_type {
                        ExecutionType::Thread => {
                            let runner = ThreadRunner::new(&config.name, handler, stuck);
                            spawn_stage::<I, O, _>(ctx, runner, keep, outlet, policies).await
                        }
                        ExecutionType::Cpu => {
                            let runner = cpu::runner(&config.name, handler, stuck);
                            spawn_stage::<I, O, _>(ctx, runner, keep, outlet, policies).await
                        }
                        ExecutionType::Async | ExecutionType::Process => Err(format!(
                            "stage `{}`: a blocking handler cannot run as {}",
                            config.name, config.execution_type
                        )
                        .into()),
                    }
                })
            }),
        }
    }

    /// Binds a plain `fn` for a `Process` stage from `I` to `O` (a
    /// [`Call`] with the resource `init` builds, crossing as `W` says): it
    /// runs in worker processes, which the stage starts as `options` say
    /// (see [`crate::process`]).
    pub(crate) fn process<I, O, W, R, F>(
        init: Init<R>,
        handler: F,
        options: ProcessOptions,
        policies: Policies<I>,
    ) -> Self
    where
        I: Send + 'static,
        O: Send + 'static,
        W: Wire<I, O>,
        R: 'static,
        F: Call<R>,
    {
        StageBinding {
            kind: HandlerKind::Process,
            // A failed attempt's input is decoded from the bytes sent to the
            // worker: retries need no copy and no `Clone`.
            retries: true,
            batch: false,
            spawn: Box::new(move |ctx, outlet| {
                Box::pin(async move {
                    let config = &ctx.shared.config.stages[ctx.index];
                    if config.execution_type != ExecutionType::Process {
                        return Err(format!(
                            "stage `{}`: a process handler cannot run as {}",
                            config.name, config.execution_type
                        )
                        .into());
                    }
                    let spec = ChildSpec::new(
                        ctx.shared.name.clone(),
                        config.name.as_str().into(),
                        &options,
                        Entry::of(init, handler),
                    );
                    let runner = ProcessRunner::<I, O, W>::new(spec, ctx.fail.clone());
                    spawn_stage::<I, O, _>(ctx, runner, None, outlet, policies).await
                })
            }),
        }
    }

    /// This stage, with its output (a [`Children`](crate::shape::Children)
    /// or a `Vec` per item) split into its items by a splitter between it
    /// and the next stage.
    pub(crate) fn split<P, O>(self) -> Self
    where
        P: IntoChildren<Child = O>,
        O: Send + 'static,
    {
        let inner = self.spawn;
        StageBinding {
            kind: self.kind,
            retries: self.retries,
            batch: self.batch,
            spawn: Box::new(move |ctx, outlet| {
                Box::pin(async move {
                    let name = ctx.shared.config.stages[ctx.index].name.clone();
                    let next = match outlet {
                        None => Next::Tracker,
                        Some(next) => Next::Stage(
                            *next.downcast::<Arc<dyn Outlet<O>>>().map_err(|_| {
                                format!("stage `{name}` splits into a type the next stage does not take (a bug in the builder)")
                            })?,
                        ),
                    };
                    let args = SplitterArgs {
                        shared: ctx.shared.clone(),
                        index: ctx.index,
                        tracker: ctx.tracker.clone(),
                        next,
                    };
                    let (splitter, _) = Actor::spawn_linked(
                        None,
                        Splitter::<P, O>::new(),
                        args,
                        ctx.supervisor.clone(),
                    )
                    .await?;
                    let into: Arc<dyn Outlet<P>> = Arc::new(splitter.clone());
                    let spawned = match inner(ctx, Some(Box::new(into))).await {
                        Ok(spawned) => spawned,
                        Err(e) => {
                            splitter.stop(None);
                            return Err(e);
                        }
                    };
                    let _ = splitter.cast(SplitMsg::Connect(spawned.control.demand_port()));
                    Ok(Spawned {
                        inlet: spawned.inlet,
                        control: Box::new(SplitControl {
                            stage: spawned.control,
                            splitter,
                        }),
                    })
                })
            }),
        }
    }

    /// This stage (whose input is batches) with a batcher in front of it,
    /// which gathers the items the stage before sends into batches.
    pub(crate) fn batch<I: Send + 'static>(self, key: Option<BatchKey<I>>) -> Self {
        let inner = self.spawn;
        StageBinding {
            kind: self.kind,
            retries: self.retries,
            batch: true,
            spawn: Box::new(move |ctx, outlet| {
                Box::pin(async move {
                    let name = ctx.shared.config.stages[ctx.index].name.clone();
                    let (shared, index, tracker, supervisor) = (
                        ctx.shared.clone(),
                        ctx.index,
                        ctx.tracker.clone(),
                        ctx.supervisor.clone(),
                    );
                    let spawned = inner(ctx, outlet).await?;
                    let stage = *spawned
                        .inlet
                        .downcast::<Arc<dyn Outlet<Batch<I>>>>()
                        .map_err(|_| {
                            format!("stage `{name}` does not take batches (a bug in the builder)")
                        })?;
                    let args = BatcherArgs {
                        shared,
                        index,
                        tracker,
                        stage,
                        key,
                    };
                    let (batcher, _) = match Actor::spawn_linked(
                        None,
                        Batcher::<I>::new(),
                        args,
                        supervisor,
                    )
                    .await
                    {
                        Ok(spawned) => spawned,
                        Err(e) => {
                            spawned.control.cell().stop(None);
                            return Err(e.into());
                        }
                    };
                    spawned.control.connect(Arc::new(batcher.clone()));
                    let inlet: Arc<dyn Outlet<I>> = Arc::new(batcher.clone());
                    Ok(Spawned {
                        inlet: Box::new(inlet),
                        control: Box::new(BatchControl {
                            stage: spawned.control,
                            batcher,
                        }),
                    })
                })
            }),
        }
    }

    /// Whether it was bound with a batch method.
    pub(crate) fn batches(&self) -> bool {
        self.batch
    }

    /// Which kind of handler this is.
    pub(crate) fn kind(&self) -> HandlerKind {
        self.kind
    }

    /// Whether the handler was bound to retry (it keeps a copy of each input).
    pub(crate) fn retries(&self) -> bool {
        self.retries
    }

    pub(crate) fn spawn(self, ctx: SpawnCtx, outlet: Option<Box<dyn Any + Send>>) -> SpawnFuture {
        (self.spawn)(ctx, outlet)
    }
}

async fn spawn_stage<I, O, R>(
    ctx: SpawnCtx,
    runner: R,
    keep: Option<fn(&I) -> I>,
    outlet: Option<Box<dyn Any + Send>>,
    policies: Policies<I>,
) -> Result<Spawned, ActorProcessingErr>
where
    I: Send + 'static,
    O: Send + 'static,
    R: StageRunner<I, O>,
{
    let name = &ctx.shared.config.stages[ctx.index].name;
    let downstream = match outlet {
        None => Downstream::Tracker,
        Some(next) => Downstream::Stage(*next.downcast::<Arc<dyn Outlet<O>>>().map_err(|_| {
            format!(
                "stage `{name}` produces a type the next stage does not take (a bug in the builder)"
            )
        })?),
    };
    let args = StageArgs {
        shared: ctx.shared.clone(),
        index: ctx.index,
        runner: Arc::new(runner),
        keep,
        downstream,
        tracker: ctx.tracker,
        fail: ctx.fail,
        policies,
    };
    let (stage, _) =
        Actor::spawn_linked(None, Stage::<I, O, R>::new(), args, ctx.supervisor).await?;
    let inlet: Arc<dyn Outlet<I>> = Arc::new(stage.clone());
    Ok(Spawned {
        inlet: Box::new(inlet),
        control: Box::new(stage),
    })
}

/// Where a pipeline's items come from: a [`Source`], or only `inject`.
pub(crate) struct SourceBinding<T> {
    pub(crate) source: Option<Box<dyn DynSource<T>>>,
}

impl<T> std::fmt::Debug for SourceBinding<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceBinding")
            .field("source", &self.source.is_some())
            .finish()
    }
}

impl<T: Send + 'static> SourceBinding<T> {
    /// Items from `source`, asked for on demand.
    pub(crate) fn from_source<S: Source<Item = T>>(source: S) -> Self {
        SourceBinding {
            source: Some(erase_source(source)),
        }
    }

    /// Items only by injection; the input stays open until stopped.
    pub(crate) fn injected() -> Self {
        SourceBinding { source: None }
    }
}
