//! `Async`: the handler's future is awaited on the worker actor's own task,
//! one item at a time; `workers` actors give the stage its concurrency.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::Poll;

use futures::FutureExt;
use tracing::Instrument;

use super::{Attempt, Reporter, RunCtx, StageRunner, item_span};
use crate::item::WorkItem;

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
        let ctx: &RunCtx<I, O> = ctx;
        let mut started = crate::clock::now();
        let mut reporter = Reporter::new(ctx, items.len(), started);
        let mut items = items.into_iter();
        while let Some(mut item) = items.next() {
            let attempt = Attempt::begin(ctx, &mut item, started);
            reporter.started(&attempt.job_id);
            let span = item_span(ctx, &attempt.job_id);
            // A handler that panics while building its future is caught too.
            let made = std::panic::catch_unwind(AssertUnwindSafe(|| {
                let _entered = span.enter();
                (self.0)(item)
            }));
            let result = match made {
                Ok(fut) => {
                    let fut = fut.instrument(span);
                    let mut fut = std::pin::pin!(AssertUnwindSafe(fut).catch_unwind());
                    match futures::poll!(fut.as_mut()) {
                        Poll::Ready(result) => result,
                        // It will wait: send what is done first, so that
                        // finished items never wait behind a slow one.
                        Poll::Pending => {
                            reporter.flush_done();
                            fut.await
                        }
                    }
                }
                Err(payload) => Err(payload),
            };
            let now = crate::clock::now();
            reporter.settle(attempt, result, started, now, &mut items)?;
            started = now;
        }
        reporter.finish(started);
        Ok(())
    }
}
