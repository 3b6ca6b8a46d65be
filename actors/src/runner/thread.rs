//! `Thread`: each batch runs on a thread of the stage's own ([`lanes`]), so
//! a blocking handler never stalls the runtime and never takes a thread of
//! tokio's blocking pool. A stage has at most `workers` batches out at once,
//! so at most `workers` of its threads are busy (plus, after a timeout or an
//! abort, threads still finishing attempts given up on: see [`lanes`]).
//!
//! `Cpu` stages run the same way (see [`super::cpu`]).

use std::sync::Arc;

use super::blocking::run_blocking;
use super::lanes::{self, Lanes};
use super::{RunCtx, StageRunner, watch};
use crate::item::WorkItem;

/// Runs a blocking `fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>>` on the
/// stage's own threads.
pub(crate) struct ThreadRunner<F> {
    pub(crate) handler: Arc<F>,
    pub(crate) lanes: Lanes,
}

impl<F> ThreadRunner<F> {
    /// A Thread stage's runner: its threads are named `{stage}-thread-{n}`;
    /// `stuck` counts those given up and still running.
    pub(crate) fn new(
        stage: &str,
        handler: Arc<F>,
        stuck: Arc<std::sync::atomic::AtomicUsize>,
    ) -> Self {
        ThreadRunner {
            handler,
            lanes: Lanes::new(stage, format!("{stage}-thread"), stuck),
        }
    }
}

impl<I, O, F> StageRunner<I, O> for ThreadRunner<F>
where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>> + Send + Sync + 'static,
{
    /// The thread takes the items in its hand one by one: items added
    /// before it ends its batch run on that thread, with no round trip
    /// through the stage.
    fn prefills(&self) -> bool {
        true
    }

    async fn run(&self, ctx: &Arc<RunCtx<I, O>>) -> Result<(), String> {
        if !ctx.hand.begin_batch(ctx) {
            return Ok(());
        }
        let handler = self.handler.clone();
        match ctx.timeout {
            None => {
                let ctx = ctx.clone();
                let batch: lanes::Batch =
                    Box::new(move |ending| run_blocking(&ctx, &*handler, ending));
                self.lanes.run(batch).await
            }
            Some(limit) => {
                let on_lane = |batch| self.lanes.run(batch);
                watch::run_watched(ctx, handler, limit, on_lane).await
            }
        }
    }
}
