//! The worker actor: runs batches of one stage's items through its handler.
//!
//! - **Owns**: nothing but its batch while it runs.
//! - **Receives**: [`WorkerMsg::Run`] from its stage supervisor, only when the
//!   stage counts it idle, after putting a batch in its hand
//!   ([`crate::runner::hand`]); the worker takes the items from there one by
//!   one, so the stage can take back those it has not started.
//! - **Sends**: `StageMsg::Report` to its stage, as items finish.
//! - **Supervised by**: its stage supervisor (linked at spawn). A handler
//!   panic makes the worker fail after it reported the panicked item and
//!   handed back the rest of its batch; the supervisor has replaced it by
//!   then. So does a blocking attempt given up at the stage's timeout.
//! - **Invariant**: every item it is given is reported exactly once, as an
//!   outcome or handed back, unless it is killed (abort), in which case its
//!   supervisor accounts for the items it held.

use std::marker::PhantomData;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::runner::{RunCtx, StageRunner};

/// A worker's mailbox.
pub(crate) enum WorkerMsg {
    /// From the stage supervisor: run the items it put in the worker's hand
    /// (`RunCtx::hand`), in order, until the hand is empty. No reply; the
    /// outcomes come back as `StageMsg::Report`.
    Run,
}

pub(crate) struct Worker<I, O, R>(PhantomData<fn(I, R) -> O>);

impl<I, O, R> Worker<I, O, R> {
    pub(crate) fn new() -> Self {
        Worker(PhantomData)
    }
}

pub(crate) struct WorkerState<I, O, R> {
    ctx: Arc<RunCtx<I, O>>,
    runner: Arc<R>,
}

impl<I, O, R> Actor for Worker<I, O, R>
where
    I: Send + 'static,
    O: Send + 'static,
    R: StageRunner<I, O>,
{
    type Msg = WorkerMsg;
    type State = WorkerState<I, O, R>;
    type Arguments = (Arc<RunCtx<I, O>>, Arc<R>);

    async fn pre_start(
        &self,
        _myself: ActorRef<WorkerMsg>,
        (ctx, runner): (Arc<RunCtx<I, O>>, Arc<R>),
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(WorkerState { ctx, runner })
    }

    async fn handle(
        &self,
        _myself: ActorRef<WorkerMsg>,
        message: WorkerMsg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            WorkerMsg::Run => state.runner.run(&state.ctx).await.map_err(|reason| {
                format!(
                    "worker {} of stage `{}` stopped: {reason}",
                    state.ctx.worker, state.ctx.stage
                )
                .into()
            }),
        }
    }
}
