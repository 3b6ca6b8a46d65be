//! `Cpu`: each batch runs on the stage's own rayon pool, sized to the stage's
//! workers, so CPU-bound handlers never oversubscribe the cores the user gave
//! them and never touch tokio's threads. Items move; nothing is copied. An
//! attempt given up at the stage's timeout keeps its pool thread until it
//! returns, so the pool runs one thread short meanwhile.

use std::sync::Arc;

use super::{RunCtx, StageRunner, run_blocking, watch};
use crate::item::WorkItem;

/// Runs a blocking `fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>>` on the
/// stage's rayon pool.
pub(crate) struct CpuRunner<F> {
    pub(crate) handler: Arc<F>,
    pub(crate) pool: Arc<rayon::ThreadPool>,
}

impl<I, O, F> StageRunner<I, O> for CpuRunner<F>
where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>> + Send + Sync + 'static,
{
    async fn run(&self, ctx: &Arc<RunCtx<I, O>>) -> Result<(), String> {
        if !ctx.hand.begin_batch(ctx) {
            return Ok(());
        }
        let handler = self.handler.clone();
        let on_pool = |job: Box<dyn FnOnce() -> Result<(), String> + Send>| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.pool.spawn(move || {
                let _ = tx.send(job());
            });
            async move {
                rx.await
                    .unwrap_or_else(|_| Err("the rayon task ended without reporting".to_string()))
            }
        };
        match ctx.timeout {
            None => {
                let ctx = ctx.clone();
                on_pool(Box::new(move || run_blocking(&ctx, &*handler))).await
            }
            Some(limit) => watch::run_watched(ctx, handler, limit, on_pool).await,
        }
    }
}

/// The pool of a Cpu stage: `workers` threads named after the stage.
pub(crate) fn pool(stage: &str, workers: usize) -> Result<rayon::ThreadPool, String> {
    let name = stage.to_string();
    rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .thread_name(move |i| format!("{name}-cpu-{i}"))
        .build()
        .map_err(|e| format!("cannot build the rayon pool for stage `{stage}`: {e}"))
}
