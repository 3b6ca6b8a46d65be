//! The worker actor: runs batches of one stage's items through its handler.
//!
//! - **Owns**: nothing but its batch while it runs.
//! - **Receives**: [`WorkerMsg::Run`] once, from itself as it starts; it
//!   then runs what its stage puts in its hand ([`crate::runner::hand`]) and
//!   waits for more there, woken by the hand, not by a message per batch.
//!   It takes the items from the hand one by one, so the stage can take
//!   back those it has not started. It stops waiting when the stage
//!   retires it (a shrink: the stage's stop is then taken) or closes its
//!   hand (it is being killed).
//! - **Sends**: reports to its stage's inbox, as items finish (the first
//!   since the stage last took them rings it: `StageMsg::Reports`).
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
    /// From the worker itself, once, as it starts: run the items the stage
    /// puts in the worker's hand (`RunCtx::hand`), in order, and wait in the
    /// hand for more, until the stage retires the worker or closes its
    /// hand. No reply; the outcomes go back as reports in the stage's inbox.
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

    async fn post_start(
        &self,
        myself: ActorRef<WorkerMsg>,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Its only message: the loop below runs for the worker's life.
        myself.cast(WorkerMsg::Run)?;
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<WorkerMsg>,
        message: WorkerMsg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            // Between batches the worker waits in its hand, not in its
            // mailbox: a batch costs the stage a wake-up, not a message. A
            // kill still ends it at once (ractor races `handle` against the
            // signal port); a stop is taken once it is retired.
            WorkerMsg::Run => loop {
                state.runner.run(&state.ctx).await.map_err(|reason| {
                    format!(
                        "worker {} of stage `{}` stopped: {reason}",
                        state.ctx.worker, state.ctx.stage
                    )
                })?;
                if !state.ctx.hand.wait_for_work().await {
                    return Ok(());
                }
            },
        }
    }
}
