//! `Cpu`: each batch runs on the stage's own rayon pool, sized to the stage's
//! workers, so CPU-bound handlers never oversubscribe the cores the user gave
//! them and never touch tokio's threads. Items move; nothing is copied.

use std::sync::Arc;

use super::{RunCtx, run_blocking};
use crate::handler::Payload;
use crate::item::WorkItem;

pub(crate) async fn run(
    pool: &rayon::ThreadPool,
    ctx: Arc<RunCtx>,
    items: Vec<WorkItem<Payload>>,
) -> Result<(), String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    pool.spawn(move || {
        let _ = tx.send(run_blocking(&ctx, items));
    });
    rx.await
        .unwrap_or_else(|_| Err("the rayon task ended without reporting".to_string()))
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
