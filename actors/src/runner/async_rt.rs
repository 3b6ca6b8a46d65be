//! `Async`: the handler's future is awaited on the worker actor's own task,
//! one item at a time; `workers` actors give the stage its concurrency. An
//! attempt past the stage's timeout is dropped, which cancels it at its next
//! `.await`.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::Poll;

use futures::FutureExt;
use tracing::Instrument;

use super::{Attempt, Ran, Reporter, RunCtx, StageRunner, item_span, item_spans_enabled};
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
        let mut started = crate::clock::now();
        let mut reporter = Reporter::new(ctx, items.len(), started);
        // Once per batch: when no subscriber wants item spans, each item
        // gets the empty span, which costs a branch per poll.
        let traced = item_spans_enabled();
        let mut items = items.into_iter();
        while let Some(mut item) = items.next() {
            let mut attempt = Attempt::begin(ctx, &mut item, started);
            reporter.started(attempt.job_id());
            let item = match attempt.checked(item) {
                Ok(item) => item,
                Err(ran) => {
                    let now = crate::clock::now();
                    reporter.settle(attempt, ran, started, now, &mut items)?;
                    started = now;
                    continue;
                }
            };
            let span = match traced {
                true => item_span(ctx, attempt.job_id()),
                false => tracing::Span::none(),
            };
            // A handler that panics while building its future is caught too.
            // The future is pinned where it is polled (no `async fn` around
            // it): each move of a future holding an item is a memcpy.
            let made = std::panic::catch_unwind(AssertUnwindSafe(|| {
                let _entered = span.enter();
                (self.0)(item)
            }));
            let ran = match made {
                Ok(fut) => {
                    let fut = AssertUnwindSafe(fut.instrument(span)).catch_unwind();
                    match ctx.timeout {
                        None => {
                            let mut fut = std::pin::pin!(fut);
                            Ran::caught(ready_or_flush!(fut, reporter))
                        }
                        Some(limit) => {
                            // At the deadline the handler's future is
                            // dropped, and its `Drop` is user code: the
                            // block that drops it is guarded too.
                            let timed = AssertUnwindSafe(async {
                                let mut fut = std::pin::pin!(tokio::time::timeout(limit, fut));
                                match ready_or_flush!(fut, reporter) {
                                    Ok(result) => Ran::caught(result),
                                    Err(_) => Ran::TimedOut(limit),
                                }
                            });
                            match timed.catch_unwind().await {
                                Ok(ran) => ran,
                                Err(payload) => {
                                    let message = crate::contain::take_message(payload);
                                    tracing::error!(
                                        stage = %ctx.stage,
                                        job_id = %attempt.job_id(),
                                        "dropping a timed-out handler's future panicked: {message}; the panic was contained"
                                    );
                                    Ran::TimedOut(limit)
                                }
                            }
                        }
                    }
                }
                Err(payload) => Ran::Panicked(payload),
            };
            let now = crate::clock::now();
            reporter.settle(attempt, ran, started, now, &mut items)?;
            started = now;
        }
        reporter.finish(started);
        Ok(())
    }
}
