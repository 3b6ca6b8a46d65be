//! `Thread`: each batch runs on one of tokio's blocking threads, so a
//! blocking handler never stalls the runtime. A stage has at most `workers`
//! batches out at once, so at most `workers` threads are busy for it.

use std::sync::Arc;

use super::{RunCtx, StageRunner, run_blocking};
use crate::item::WorkItem;

/// Runs a blocking `fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>>` on
/// tokio's blocking threads.
pub(crate) struct ThreadRunner<F>(pub(crate) Arc<F>);

impl<I, O, F> StageRunner<I, O> for ThreadRunner<F>
where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>> + Send + Sync + 'static,
{
    async fn run(&self, ctx: &Arc<RunCtx<I, O>>, items: Vec<WorkItem<I>>) -> Result<(), String> {
        let (ctx, handler) = (ctx.clone(), self.0.clone());
        match tokio::task::spawn_blocking(move || run_blocking(&ctx, &*handler, items)).await {
            Ok(result) => result,
            Err(e) => Err(format!("blocking task ended abnormally: {e}")),
        }
    }
}
