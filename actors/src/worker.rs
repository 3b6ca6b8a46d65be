//! The worker actor: runs batches of one stage's items through its handler.
//!
//! - **Owns**: nothing but its batch while it runs.
//! - **Receives**: [`WorkerMsg::Run`] from its stage supervisor, only when the
//!   stage counts it idle, so its mailbox holds at most one batch.
//! - **Sends**: `StageMsg::Report` to its stage, as items finish.
//! - **Supervised by**: its stage supervisor (linked at spawn). A handler
//!   panic makes the worker fail after it reported the panicked item and
//!   handed back the rest of its batch; the supervisor replaces it.
//! - **Invariant**: every item it is given is reported exactly once, as an
//!   outcome or handed back — unless it is killed (abort), in which case its
//!   supervisor accounts for the items it held.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::handler::Payload;
use crate::item::WorkItem;
use crate::runner::{Model, RunCtx, run_batch};

/// A worker's mailbox.
pub(crate) enum WorkerMsg {
    /// From the stage supervisor: run these items, in order. No reply; the
    /// outcomes come back as `StageMsg::Report`.
    Run(Vec<WorkItem<Payload>>),
}

pub(crate) struct Worker;

pub(crate) struct WorkerArgs {
    pub(crate) ctx: Arc<RunCtx>,
    pub(crate) model: Model,
}

pub(crate) struct WorkerState {
    ctx: Arc<RunCtx>,
    model: Model,
}

impl Actor for Worker {
    type Msg = WorkerMsg;
    type State = WorkerState;
    type Arguments = WorkerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<WorkerMsg>,
        args: WorkerArgs,
    ) -> Result<WorkerState, ActorProcessingErr> {
        Ok(WorkerState {
            ctx: args.ctx,
            model: args.model,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<WorkerMsg>,
        message: WorkerMsg,
        state: &mut WorkerState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            WorkerMsg::Run(items) => {
                run_batch(&state.model, &state.ctx, items)
                    .await
                    .map_err(|panic| {
                        format!(
                            "handler of stage `{}` panicked in worker {}: {panic}",
                            state.ctx.stage, state.ctx.worker
                        )
                        .into()
                    })
            }
        }
    }
}
