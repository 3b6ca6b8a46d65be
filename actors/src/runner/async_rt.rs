//! `Async`: the handler's future is awaited on the worker actor's own task,
//! one item at a time; `workers` actors give the stage its concurrency. An
//! attempt past the stage's timeout is dropped, which cancels it at its next
//! `.await`.
//!
//! The worker takes its whole batch out of its hand at once and keeps it
//! while handlers complete at once; before it awaits one that does not, it
//! reports what is done and puts the unstarted rest back in its hand, where
//! an idle worker of the stage may take it. It then takes items from the
//! hand one by one.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::Poll;

use futures::FutureExt;
use tracing::Instrument;

use super::attempt::{Attempt, Ran};
use super::hand::Hand;
use super::report::{Reporter, Sending};
use super::{RunCtx, StageRunner, item_span, item_spans_enabled};
use crate::item::WorkItem;

/// Awaits the pinned future `$fut`; if it cannot finish at once, first sends
/// what is done and puts the unstarted `$items` back in `$hand`, so that
/// neither finished nor unstarted items wait behind a slow one.
macro_rules! ready_or_flush {
    ($fut:ident, $reporter:ident, $items:ident, $hand:expr) => {
        match futures::poll!($fut.as_mut()) {
            Poll::Ready(output) => output,
            Poll::Pending => {
                // Back in the hand before the report goes: the stage looks
                // into the hand when the report comes.
                if $items.is_empty() {
                    $reporter.flush_done();
                } else {
                    $hand.put_back($items);
                    $reporter.flush_offered();
                }
                $fut.await
            }
        }
    };
}

/// The unstarted items an async worker keeps to itself: put back in its
/// hand if the worker ends while it holds them (a panic outside the
/// handler's guard, or a kill), so that the stage finds them there and
/// runs them elsewhere (or cancels them on abort).
struct Rest<'a, I: Send + 'static, O: Send + 'static> {
    items: VecDeque<WorkItem<I>>,
    hand: &'a Hand<I, O>,
}

impl<I: Send + 'static, O: Send + 'static> Drop for Rest<'_, I, O> {
    fn drop(&mut self) {
        self.hand.put_back(&mut self.items);
    }
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
    async fn run(&self, ctx: &Arc<RunCtx<I, O>>) -> Result<(), String> {
        let hand = &ctx.hand;
        let mut rest = Rest {
            items: hand.take_all(),
            hand,
        };
        let items = &mut rest.items;
        if items.is_empty() {
            return Ok(());
        }
        let mut started = crate::clock::now();
        let mut reporter = Sending(Reporter::new(ctx, items.len(), started));
        // Once per batch: when no subscriber wants item spans, each item
        // gets the empty span, which costs a branch per poll.
        let traced = item_spans_enabled();
        while let Some(mut item) = items.pop_front().or_else(|| hand.next()) {
            let mut attempt = Attempt::begin(ctx, &mut item, started);
            reporter.started(attempt.job_id());
            let item = match attempt.checked(item) {
                Ok(item) => item,
                Err(ran) => {
                    let now = crate::clock::now();
                    let mut returned =
                        std::iter::from_fn(|| items.pop_front().or_else(|| hand.next()));
                    reporter.settle(attempt, ran, started, now, &mut returned)?;
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
                            Ran::caught(ready_or_flush!(fut, reporter, items, hand))
                        }
                        Some(limit) => {
                            // At the deadline the handler's future is
                            // dropped, and its `Drop` is user code: the
                            // block that drops it is guarded too.
                            let timed = AssertUnwindSafe(async {
                                let mut fut = std::pin::pin!(tokio::time::timeout(limit, fut));
                                match ready_or_flush!(fut, reporter, items, hand) {
                                    Ok(result) => Ran::caught(result),
                                    Err(_) => Ran::TimedOut(limit),
                                }
                            });
                            match timed.catch_unwind().await {
                                Ok(ran) => ran,
                                Err(payload) => {
                                    let message = crate::contain::take_message(payload);
                                    tracing::error!(target: "bergtalzug::stage",
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
                Err(payload) => Ran::Panicked(crate::contain::take_message(payload)),
            };
            let now = crate::clock::now();
            // Taken only after a panic, to be handed back.
            let mut returned = std::iter::from_fn(|| items.pop_front().or_else(|| hand.next()));
            reporter.settle(attempt, ran, started, now, &mut returned)?;
            started = now;
        }
        reporter.finish(started);
        Ok(())
    }
}
