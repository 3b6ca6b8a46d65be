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
use std::time::{Duration, Instant};

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
    ($fut:ident, $reporter:ident, $items:ident, $hand:expr, $lap:ident) => {
        match futures::poll!($fut.as_mut()) {
            Poll::Ready(output) => output,
            Poll::Pending => {
                // Time passes in the await: the clock is read after it.
                $lap.awaited();
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

/// Runs the handler's future `$fut` to its end, under the stage's timeout
/// if it has one, with a panic in it (or in dropping it at the deadline)
/// contained: how the attempt ran.
macro_rules! attempt_on {
    ($fut:ident, $ctx:ident, $attempt:ident, $reporter:ident, $items:ident, $hand:expr, $lap:ident) => {{
        let fut = AssertUnwindSafe($fut).catch_unwind();
        match $ctx.timeout {
            None => {
                let mut fut = std::pin::pin!(fut);
                Ran::caught(ready_or_flush!(fut, $reporter, $items, $hand, $lap))
            }
            Some(limit) => {
                // At the deadline the handler's future is dropped, and its
                // `Drop` is user code: the block that drops it is guarded
                // too.
                let timed = AssertUnwindSafe(async {
                    let mut fut = std::pin::pin!(tokio::time::timeout(limit, fut));
                    match ready_or_flush!(fut, $reporter, $items, $hand, $lap) {
                        Ok(result) => Ran::caught(result),
                        Err(_) => Ran::TimedOut(limit),
                    }
                });
                match timed.catch_unwind().await {
                    Ok(ran) => ran,
                    Err(payload) => {
                        let message = crate::contain::take_message(payload);
                        tracing::error!(target: "bergtalzug::stage",
                            stage = %$ctx.stage,
                            job_id = %$attempt.job_id(),
                            "dropping a timed-out handler's future panicked: {message}; the panic was contained"
                        );
                        Ran::TimedOut(limit)
                    }
                }
            }
        }
    }};
}

/// How long, at the pace of the last items, an async worker with tracking
/// off goes between readings of the clock ([`Lap`]).
const READ_EVERY: Duration = Duration::from_micros(20);
const READ_EVERY_NS: u64 = READ_EVERY.as_nanos() as u64;
/// The most items between two readings, however fast they were: a handler
/// that turns slow without awaiting is timed again within this many.
const MAX_SKIP: u32 = 16;

/// The clock of an async batch. With tracking off no item needs a time of
/// its own: only the reporter's flush ([`FLUSH_AFTER`](super::FLUSH_AFTER),
/// 1 ms) and the batch's handler time (which sizes batches) read it. So
/// after an item that completed at once, the clock is read only every few
/// items, as many as took about [`READ_EVERY`] at the pace measured at the
/// last reading (at most [`MAX_SKIP`]); in between the last reading
/// stands in. A reading on this machine cost 8 % of the CPU of a pipeline
/// of trivial handlers (`perf`, docs/performance.md). After an await, a
/// failure, and at the batch's end it is read every time; with tracking on
/// (stage times per item), after every item.
struct Lap {
    last: Instant,
    /// Items since the last reading.
    items: u32,
    /// Items to go before the next reading.
    skip: u32,
}

impl Lap {
    fn new(now: Instant) -> Self {
        Lap {
            last: now,
            items: 0,
            skip: 0,
        }
    }

    /// Now, or the last reading while items go fast.
    #[inline]
    fn after_item(&mut self) -> Instant {
        if self.skip > 0 {
            self.skip -= 1;
            self.items += 1;
            return self.last;
        }
        let now = crate::clock::now();
        // In whole nanoseconds of u64 (584 years): no 128-bit division.
        let took = now.saturating_duration_since(self.last);
        let took = took.as_secs() * 1_000_000_000 + u64::from(took.subsec_nanos());
        let per_item = took / (u64::from(self.items) + 1);
        self.skip = (READ_EVERY_NS / per_item.max(1)).min(u64::from(MAX_SKIP)) as u32;
        self.last = now;
        self.items = 0;
        now
    }

    /// Now, read (the pace is not measured: the next item reads again).
    fn read(&mut self) -> Instant {
        let now = crate::clock::now();
        self.last = now;
        self.items = 0;
        self.skip = 0;
        now
    }

    /// The handler awaited: the next reading is taken.
    fn awaited(&mut self) {
        self.skip = 0;
    }

    /// Whether the last reading is older than the last item.
    fn stale(&self) -> bool {
        self.items > 0
    }
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
        let mut lap = Lap::new(started);
        let mut reporter = Sending(Reporter::new(ctx, items.len(), started));
        // Once per batch: whether any subscriber wants item spans.
        let traced = item_spans_enabled();
        while let Some(mut item) = items.pop_front().or_else(|| hand.next()) {
            let mut attempt = Attempt::begin(ctx, &mut item, started);
            reporter.started(attempt.job_id());
            let item = match attempt.checked(item) {
                Ok(item) => item,
                Err(ran) => {
                    let now = lap.read();
                    let mut returned =
                        std::iter::from_fn(|| items.pop_front().or_else(|| hand.next()));
                    reporter.settle(&mut attempt, ran, started, now, &mut returned)?;
                    started = now;
                    continue;
                }
            };
            // A handler that panics while building its future is caught too.
            // The future is pinned where it is polled (no `async fn` around
            // it): each move of a future holding an item is a memcpy. Only
            // a traced item's future is wrapped in its span: with no
            // subscriber for item spans, `Instrumented` still entered and
            // left the empty span at every poll and at its drop (about 40
            // instructions per item and stage, callgrind).
            let ran = if traced {
                let span = item_span(ctx, attempt.job_id());
                let made = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    let _entered = span.enter();
                    (self.0)(item)
                }));
                match made {
                    Ok(fut) => {
                        let fut = fut.instrument(span);
                        attempt_on!(fut, ctx, attempt, reporter, items, hand, lap)
                    }
                    Err(payload) => Ran::Panicked(crate::contain::take_message(payload)),
                }
            } else {
                match std::panic::catch_unwind(AssertUnwindSafe(|| (self.0)(item))) {
                    Ok(fut) => attempt_on!(fut, ctx, attempt, reporter, items, hand, lap),
                    Err(payload) => Ran::Panicked(crate::contain::take_message(payload)),
                }
            };
            let now = match &ran {
                Ran::Returned(Ok(_)) if !ctx.tracking => lap.after_item(),
                // Stage times, or a failure's finish time.
                _ => lap.read(),
            };
            // Taken only after a panic, to be handed back.
            let mut returned = std::iter::from_fn(|| items.pop_front().or_else(|| hand.next()));
            reporter.settle(&mut attempt, ran, started, now, &mut returned)?;
            started = now;
        }
        if lap.stale() {
            // The batch's handler time ends now.
            started = lap.read();
            reporter.done_by(started);
        }
        reporter.finish(started);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// However fast the items, the clock is read at least every
    /// `MAX_SKIP + 1` items; an item slower than `READ_EVERY` reads it
    /// every time, and so does the first item after an await.
    #[test]
    fn the_clock_is_read_every_few_fast_items_and_after_every_slow_one() {
        let mut lap = Lap::new(crate::clock::now());
        let (mut since_read, mut skipped) = (0, 0);
        for _ in 0..1_000 {
            let skipping = lap.skip > 0;
            lap.after_item();
            since_read = if skipping { since_read + 1 } else { 0 };
            skipped += u32::from(skipping);
            assert!(
                since_read <= MAX_SKIP,
                "{since_read} items without a reading"
            );
        }
        assert!(skipped > 0, "fast items skip readings");

        lap.awaited();
        lap.after_item();
        assert_eq!(lap.items, 0, "the item after an await reads the clock");

        // A handler that turns slow without awaiting is timed again
        // within MAX_SKIP + 1 items, then after every item.
        let slow = |lap: &mut Lap| {
            let until = Instant::now() + READ_EVERY * 2;
            while Instant::now() < until {}
            lap.after_item();
        };
        let mut n = 0;
        loop {
            slow(&mut lap);
            n += 1;
            if lap.items == 0 {
                break;
            }
            assert!(n <= MAX_SKIP, "{n} slow items without a reading");
        }
        for _ in 0..3 {
            slow(&mut lap);
            assert_eq!(
                lap.skip, 0,
                "an item slower than READ_EVERY reads every time"
            );
        }
    }
}
