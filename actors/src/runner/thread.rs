//! `Thread`: each batch runs on one of tokio's blocking threads, so a
//! blocking handler never stalls the runtime. A stage has at most `workers`
//! batches out at once, so at most `workers` threads are busy for it (plus,
//! under a timeout, threads still finishing attempts given up on).

use std::sync::Arc;

use super::{RunCtx, StageRunner, run_blocking, watch};
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
    async fn run(&self, ctx: &Arc<RunCtx<I, O>>) -> Result<(), String> {
        if !ctx.hand.begin_batch(ctx) {
            return Ok(());
        }
        let handler = self.0.clone();
        match ctx.timeout {
            None => {
                let ctx = ctx.clone();
                on_blocking_thread(Box::new(move || run_blocking(&ctx, &*handler))).await
            }
            Some(limit) => watch::run_watched(ctx, handler, limit, on_blocking_thread).await,
        }
    }
}

async fn on_blocking_thread(
    job: Box<dyn FnOnce() -> Result<(), String> + Send>,
) -> Result<(), String> {
    match tokio::task::spawn_blocking(job).await {
        Ok(result) => result,
        Err(e) => Err(format!("blocking task ended abnormally: {e}")),
    }
}
