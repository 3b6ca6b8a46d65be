//! `Async`: the handler's future is awaited on the worker actor's own task,
//! one item at a time; `workers` actors give the stage its concurrency. An
//! attempt past the stage's timeout is dropped, which cancels it at its next
//! `.await`.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use futures::FutureExt;

use super::{Attempt, Ran, Reporter, RunCtx, StageRunner};
use crate::item::WorkItem;

/// Awaits the pinned future `$fut`; if it cannot finish at once, first sends
/// what is done, so that finished items never wait behind a slow one.
macro_rules! ready_or_flush {
    ($fut:ident, $reporter:ident) => {
        match futures::poll!($fut.as_mut()) {
            Poll::Ready(output) => output,
            Poll::Pending => {
                $reporter.flush_done();
                $fut.await
            }
        }
    };
}

/// Runs an `async fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>>`.
pub(crate) struct AsyncRunner<F>(pub(crate) F);

impl<I, O, F, Fut> StageRunner<I, O> for AsyncRunner<F>
where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(WorkItem<I>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<WorkItem<O>>> + Send + 'static,
{
    async fn run(&self, ctx: &Arc<RunCtx<I, O>>, items: Vec<WorkItem<I>>) -> Result<(), String> {
        let mut started = Instant::now();
        let mut reporter = Reporter::new(ctx, items.len(), started);
        let mut items = items.into_iter();
        while let Some(mut item) = items.next() {
            let attempt = Attempt::begin(ctx, &mut item, started);
            reporter.started(attempt.job_id());
            // A handler that panics while building its future is caught too.
            // The future is pinned where it is polled (no `async fn` around
            // it): each move of a future holding an item is a memcpy.
            let ran = match std::panic::catch_unwind(AssertUnwindSafe(|| (self.0)(item))) {
                Ok(fut) => {
                    let fut = AssertUnwindSafe(fut).catch_unwind();
                    match ctx.timeout {
                        None => {
                            let mut fut = std::pin::pin!(fut);
                            Ran::caught(ready_or_flush!(fut, reporter))
                        }
                        Some(limit) => {
                            let mut fut = std::pin::pin!(tokio::time::timeout(limit, fut));
                            match ready_or_flush!(fut, reporter) {
                                Ok(result) => Ran::caught(result),
                                Err(_) => Ran::TimedOut(limit),
                            }
                        }
                    }
                }
                Err(payload) => Ran::Panicked(payload),
            };
            let now = Instant::now();
            reporter.settle(attempt, ran, started, now, &mut items)?;
            started = now;
        }
        reporter.finish(started);
        Ok(())
    }
}
