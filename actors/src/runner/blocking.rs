//! The loop of a blocking handler, shared by the Thread and Cpu models.

use std::sync::Arc;
use std::time::Instant;

use super::attempt::{Attempt, Ran};
use super::hand::HandState;
use super::lanes::Ending;
use super::{RunCtx, item_span, item_spans_enabled};
use crate::contain;
use crate::item::WorkItem;

/// Runs the worker's hand through a blocking handler on the current
/// thread; shared by the Thread and Cpu models, with or without a timeout
/// (then [`watch`] watches the same hand). The batch's reporter was put in
/// the hand by [`Hand::begin_batch`]. One lock per item, taken between two
/// items: it settles the one that ended and takes the next, so the items
/// not started stay within the stage's reach and the outcomes not reported
/// yet are never lost with a handler that blocks. One clock read per item:
/// an item's end is the next one's start.
pub(crate) fn run_blocking<I: Send + 'static, O: Send + 'static, F>(
    ctx: &Arc<RunCtx<I, O>>,
    handler: &F,
    ending: &Ending,
) -> Result<(), String>
where
    F: Fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>>,
{
    let traced = item_spans_enabled();
    let mut ran = None;
    loop {
        let next = {
            let mut guard = ctx.hand.lock();
            let state: &mut HandState<I, O> = &mut guard;
            // Under a timeout, the real clock: the watcher's deadlines are
            // on it (tokio's may be paused in tests).
            let now = match ctx.timeout {
                Some(_) => Instant::now(),
                None => crate::clock::now(),
            };
            let Some(reporter) = state.reporter.as_mut() else {
                // Given up at the deadline, or taken by the stage: a late
                // result is discarded (its `Drop` is user code).
                drop(guard);
                if let Some(late) = ran.take() {
                    contain::drop_logged(late, || {
                        format!("a late result in stage `{}`", ctx.stage)
                    });
                }
                ending.now();
                return Ok(());
            };
            if let Some(ran) = ran.take() {
                let (started, mut attempt) = state.current.take().expect("the attempt is in hand");
                let pending = &mut state.pending;
                let mut rest = std::iter::from_fn(|| pending.pop_front());
                if let Err(reason) = reporter.settle(&mut attempt, ran, started, now, &mut rest) {
                    state.reporter = None;
                    return Err(reason);
                }
            }
            let Some(mut item) = state.pending.pop_front() else {
                // Before the last report: the pipeline may end on it, and
                // this thread is not stuck in a handler.
                ending.now();
                if let Some(reporter) = state.reporter.take() {
                    reporter.finish(now);
                }
                return Ok(());
            };
            let mut attempt = Attempt::begin(ctx, &mut item, now);
            reporter.started(attempt.job_id());
            match attempt.checked(item) {
                Ok(item) => {
                    let span = traced.then(|| item_span(ctx, attempt.job_id()));
                    state.current = Some((now, attempt));
                    Some((item, span))
                }
                Err(uncopied) => {
                    // Its data panicked as it was copied: the attempt ends
                    // without running, settled under the next lock.
                    state.current = Some((now, attempt));
                    ran = Some(uncopied);
                    None
                }
            }
        };
        let Some((item, span)) = next else {
            continue;
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _entered = span.as_ref().map(tracing::Span::enter);
            handler(item)
        }));
        ran = Some(Ran::caught(result));
    }
}
