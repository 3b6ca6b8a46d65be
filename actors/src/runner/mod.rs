//! Execution models: how a worker runs its batch through the stage's handler.
//!
//! One file per model, each one [`StageRunner`]:
//!
//! - [`async_rt::AsyncRunner`]: awaited on the worker actor's own task;
//! - [`thread::ThreadRunner`]: the batch goes to a thread of the stage's own
//!   ([`lanes`]);
//! - [`cpu::runner`]: the same, for CPU-bound work;
//! - [`process::ProcessRunner`]: the batch goes to a worker process.
//!
//! Runners are generic over the handler, so a handler's future is never
//! boxed and its data never erased: the stage and its workers are compiled
//! for their own input and output types.
//!
//! Whatever the model, each item is handled the same way ([`Attempt`]): the
//! pipeline's own bookkeeping (stage times) is held aside while the handler
//! runs, so that a failing or panicking handler still leaves a complete
//! result; an error fails the item with its chain (`{:#}`); a panic fails the
//! item as `Panicked`, hands the untouched rest of the batch back to the
//! stage in the same report, and makes the worker fail so that it is
//! replaced. The user code a runner calls around the handler (the `Clone`
//! of a kept copy, the `Drop` of what it drops, the `Display` of an error)
//! is contained the same way ([`crate::contain`]): an item whose data
//! panics when copied fails `Panicked` by itself, and the worker goes on.
//!
//! The stage puts each batch in the worker's [`hand`], shared with it, and
//! the worker takes the items from there as it starts them: the items a
//! worker has not started are always within the stage's reach, for an idle
//! worker to take or, when the worker dies, to run elsewhere.
//!
//! Results stream back to the stage as they are ready: after each item the
//! worker sends what it has if [`FLUSH_AFTER`] (a blocking worker:
//! [`BLOCKING_FLUSH_AFTER`]) has passed since its last report, and an
//! async worker also sends what it has before awaiting a
//! handler that does not complete at once; so a batch of fast items is
//! reported in one message and finished items do not wait behind a slow
//! one. (A blocking handler cannot be looked into: its batch's reporter
//! sits in the hand, and the stage takes the results it holds when another
//! worker is idle, or when the worker dies.)
//!
//! # Attempts, retries and timeouts
//!
//! An attempt that fails (an error not marked [`Permanent`], a panic, a
//! timeout) while the stage's retry policy allows another comes back to the
//! stage as [`Outcome::Retry`], with the copy of its input taken before the
//! handler ran; the stage holds it for the backoff, without a worker, and
//! queues it again. An Async attempt past the stage's `timeout` is dropped
//! (cancelled at its next await). A blocking attempt cannot be stopped:
//! [`watch`] fails it `TimedOut` at the deadline, hands back the rest of its
//! batch and gives the worker up, so the stage replaces it while the late
//! handler finishes on its thread, which the stage gives up ([`lanes`]);
//! what it returns then is discarded.

pub(crate) mod async_rt;
pub(crate) mod attempt;
pub(crate) mod blocking;
pub(crate) mod cpu;
pub(crate) mod hand;
pub(crate) mod lanes;
pub(crate) mod process;
pub(crate) mod report;
pub(crate) mod thread;
pub(crate) mod watch;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::event::{EventHub, WorkerId};
use crate::item::JobId;
use crate::ports::Reports;
use hand::Hand;

/// How long a worker may hold finished items before reporting them. Each
/// report wakes the stage; at 100 µs a Cpu stage of 50 µs items lost a fifth
/// of its speed to wake-ups (benches/cpu.rs). A batch holds about this much
/// work anyway (`stage::BATCH_WORK`), so it bounds the wait as well.
pub(crate) const FLUSH_AFTER: Duration = Duration::from_millis(1);

/// [`FLUSH_AFTER`] for a blocking worker (Thread, Cpu), whose stage tops it
/// up so that its batch does not end while work is queued: its reports are
/// what wakes the runtime's threads, and each wake-up takes a core from a
/// handler thread. At 1 ms a Cpu stage of two workers on 2 cores spent
/// 2.3–2.6 µs of the runtime's CPU per 50 µs item, at 2 ms 1.3–2.0
/// (benches/cpu.rs, by-process A/B). The stage takes what its other
/// workers finished with each report (`Pool::unreported`), so it is woken
/// about once per period for all of them.
pub(crate) const BLOCKING_FLUSH_AFTER: Duration = Duration::from_millis(2);

/// Runs batches of a stage's items in one execution model.
pub(crate) trait StageRunner<I, O>: Send + Sync + 'static {
    /// Runs the items in the worker's hand (`ctx.hand`) in order, taking
    /// each as it starts it, until the hand is empty, reporting outcomes
    /// to the stage as they are ready. `Err` says why the worker must fail
    /// (a panic, or a blocking attempt given up at its deadline); the
    /// report saying so was sent.
    fn run(&self, ctx: &Arc<RunCtx<I, O>>) -> impl Future<Output = Result<(), String>> + Send;

    /// Whether the stage gives a busy worker its next batch before the
    /// worker ends the one it has (`Pool::top_up`): for runners whose
    /// worker takes the items in its hand one by one on a thread of its
    /// own, so that the thread runs on. No by default.
    fn prefills(&self) -> bool {
        false
    }

    /// Ends what the runner keeps between batches, before the stage stops
    /// (a Process stage's worker processes: the stage stops once they are
    /// reaped). Nothing by default.
    fn shutdown(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Everything a worker needs to run items, shared with the threads it uses.
pub(crate) struct RunCtx<I, O> {
    pub(crate) pipeline: Arc<str>,
    pub(crate) stage: Arc<str>,
    pub(crate) worker: WorkerId,
    /// Where the worker's reports go: its stage.
    pub(crate) reports: Arc<dyn Reports<I, O>>,
    pub(crate) tracking: bool,
    pub(crate) events: Arc<EventHub>,
    /// Copies an input before each attempt, for a retry or a dead letter:
    /// set only for stages bound to retry whose policy allows more than one
    /// attempt.
    pub(crate) keep: Option<fn(&I) -> I>,
    /// All attempts the stage's retry policy allows (1 without one).
    pub(crate) max_attempts: u32,
    /// How long one attempt may take.
    pub(crate) timeout: Option<Duration>,
    /// The items the worker was given and has not started, shared with
    /// the stage.
    pub(crate) hand: Arc<Hand<I, O>>,
}

/// Whether any subscriber wants [`item_span`]s now; asked once per batch,
/// so that a batch nobody traces makes no span at all.
#[inline]
pub(crate) fn item_spans_enabled() -> bool {
    tracing::span_enabled!(target: "bergtalzug::item", tracing::Level::DEBUG)
}

/// The span of one item's pass through a stage's handler, with the fixed
/// fields `pipeline`, `stage`, `worker` and `job_id`, at DEBUG.
#[inline]
pub(crate) fn item_span<I, O>(ctx: &RunCtx<I, O>, job_id: &JobId) -> tracing::Span {
    tracing::debug_span!(
        target: "bergtalzug::item",
        "item",
        pipeline = %ctx.pipeline,
        stage = %ctx.stage,
        worker = %ctx.worker,
        job_id = %job_id
    )
}
