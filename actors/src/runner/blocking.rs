//! The loop of a blocking handler, shared by the Thread and Cpu models.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::attempt::{Attempt, Ran};
use super::hand::HandState;
use super::lanes::Ending;
use super::{RunCtx, item_span, item_spans_enabled};
use crate::contain;
use crate::item::WorkItem;

/// How long a blocking worker's thread that reported its batch waits in
/// the worker's hand for the next one, in microseconds (0: it does not,
/// and every batch goes to the worker with a `Run` and a new job for its
/// thread). Off by default: in benches/cpu.rs (2 cores, load 1.6–2, three
/// full runs) a wait of 500 µs took 0.3–2.1 µs of tokio CPU per item off but
/// ran no faster, 0–6 % slower (its threads block in the hand once per
/// batch, where the old path's next job was often queued already); with
/// other work on the machine (load 2.7) it ran 3–4 % faster. See
/// docs/performance.md, "CPU-bound stages: where the time goes".
static HAND_WAIT_US: AtomicU64 = AtomicU64::new(0);

/// Sets how long a blocking worker's thread waits in its hand for the next
/// batch (`Duration::ZERO`, the default: it does not), for the batches
/// started from now on. For benches comparing both paths in one process;
/// not part of the API.
#[doc(hidden)]
pub fn set_hand_wait(wait: Duration) {
    HAND_WAIT_US.store(
        u64::try_from(wait.as_micros()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
}

/// How long a thread of a stage without a timeout waits in its hand for
/// the next batch. A stage with a timeout never waits: its watcher
/// ([`super::watch`]) runs on the worker's task, once per batch, and must
/// see each batch.
fn hand_wait<I, O>(ctx: &RunCtx<I, O>) -> Option<Duration> {
    chosen_wait(ctx.timeout, HAND_WAIT_US.load(Ordering::Relaxed))
}

/// The wait for a stage with `timeout`, of `us` microseconds set.
fn chosen_wait(timeout: Option<Duration>, us: u64) -> Option<Duration> {
    (timeout.is_none() && us > 0).then(|| Duration::from_micros(us))
}

/// Runs the worker's hand through a blocking handler on the current
/// thread; shared by the Thread and Cpu models, with or without a timeout
/// (then [`watch`] watches the same hand). The batch's reporter was put in
/// the hand by [`Hand::begin_batch`]. One lock per item, taken between two
/// items: it settles the one that ended and takes the next, so the items
/// not started stay within the stage's reach and the outcomes not reported
/// yet are never lost with a handler that blocks. One clock read per item:
/// an item's end is the next one's start.
///
/// Once the hand is empty and the batch reported, the thread may wait in
/// the hand ([`hand_wait`]: when set, in stages without a timeout) for the
/// stage to give the worker its next batch, and run it as part of this
/// job: the stage sends no `Run` for it (see
/// [`Hand::give`](super::hand::Hand::give)).
pub(crate) fn run_blocking<I: Send + 'static, O: Send + 'static, F>(
    ctx: &Arc<RunCtx<I, O>>,
    handler: &F,
    ending: &Ending,
) -> Result<(), String>
where
    F: Fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>>,
{
    run_blocking_for(ctx, handler, ending, hand_wait(ctx))
}

/// [`run_blocking`], its thread waiting up to `wait` in the hand for each
/// next batch (not at all on `None`).
fn run_blocking_for<I: Send + 'static, O: Send + 'static, F>(
    ctx: &Arc<RunCtx<I, O>>,
    handler: &F,
    ending: &Ending,
    wait: Option<Duration>,
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
                let (started, attempt) = state.current.take().expect("the attempt is in hand");
                let pending = &mut state.pending;
                let mut rest = std::iter::from_fn(|| pending.pop_front());
                if let Err(reason) = reporter.settle(attempt, ran, started, now, &mut rest) {
                    state.reporter = None;
                    return Err(reason);
                }
            }
            let Some(mut item) = state.pending.pop_front() else {
                // Before the last report: the pipeline may end on it, and
                // this thread is not stuck in a handler.
                // A thread given up (its worker stopped waiting for it)
                // does not wait.
                let Some(wait) = wait.filter(|_| ending.waiting()) else {
                    ending.now();
                    if let Some(reporter) = state.reporter.take() {
                        reporter.finish(now);
                    }
                    return Ok(());
                };
                if let Some(reporter) = state.reporter.take() {
                    reporter.finish(now);
                }
                // Still under the lock the report was sent in: the stage's
                // next `give` to this worker finds the thread waiting.
                let (mut guard, given) = ctx.hand.wait_for_batch(guard, wait);
                if !given || !ending.resume() {
                    ending.now();
                    return Ok(());
                }
                guard.begin(ctx);
                continue;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventHub, WorkerId};
    use crate::outcome::{Outcome, WorkerReport};
    use crate::ports::Reports;
    use crate::runner::hand::Hand;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;

    /// Reports go to a channel.
    struct Collect(Mutex<mpsc::Sender<WorkerReport<u64, u64>>>);

    impl Reports<u64, u64> for Collect {
        fn report(&self, report: WorkerReport<u64, u64>) -> Result<(), WorkerReport<u64, u64>> {
            let _ = self.0.lock().unwrap().send(report);
            Ok(())
        }
    }

    type Reported = mpsc::Receiver<WorkerReport<u64, u64>>;

    fn ctx(timeout: Option<Duration>) -> (Arc<RunCtx<u64, u64>>, Reported) {
        let (tx, rx) = mpsc::channel();
        let ctx = Arc::new(RunCtx {
            pipeline: "p".into(),
            stage: "s".into(),
            worker: WorkerId(0),
            reports: Arc::new(Collect(Mutex::new(tx))),
            tracking: true,
            events: Arc::new(EventHub::default()),
            keep: None,
            max_attempts: 1,
            timeout,
            hand: Arc::new(Hand::new()),
        });
        (ctx, rx)
    }

    fn items(range: std::ops::Range<u64>) -> Vec<WorkItem<u64>> {
        range.map(WorkItem::new).collect()
    }

    /// The outputs of reports received until `n` outcomes came, within 5 s.
    fn outputs(rx: &Reported, n: usize) -> Vec<u64> {
        let mut out = Vec::new();
        while out.len() < n {
            let report = rx
                .recv_timeout(Duration::from_secs(5))
                .expect("a report within 5 s");
            assert!(report.failing.is_none() && report.returned.is_empty());
            out.extend(report.outcomes.into_iter().map(|o| match o {
                Outcome::Done(item) => item.data,
                _ => panic!("every item succeeds"),
            }));
        }
        out
    }

    /// Runs the worker's hand on a thread of its own that waits up to 5 s
    /// for each next batch; `calls` counts handler calls. The join handle
    /// gives the result and where the thread ended.
    fn spawn(
        ctx: &Arc<RunCtx<u64, u64>>,
        ending: &Ending,
        calls: &Arc<AtomicUsize>,
        wait: Option<Duration>,
    ) -> mpsc::Receiver<Result<(), String>> {
        assert!(ctx.hand.begin_batch(ctx));
        let (done, result) = mpsc::channel();
        let (ctx, ending, calls) = (ctx.clone(), ending.clone(), calls.clone());
        std::thread::spawn(move || {
            let handler = |item: WorkItem<u64>| {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok(item.map(|x| x + 100))
            };
            let _ = done.send(run_blocking_for(&ctx, &handler, &ending, wait));
        });
        result
    }

    const LONG: Option<Duration> = Some(Duration::from_secs(5));

    #[test]
    fn a_thread_waiting_in_its_hand_runs_the_batch_given_without_a_run() {
        let (ctx, reports) = ctx(None);
        let (ending, calls) = (Ending::new(), Arc::new(AtomicUsize::new(0)));
        assert!(!ctx.hand.give(items(0..3)), "nobody waits: a Run is due");
        let done = spawn(&ctx, &ending, &calls, LONG);
        assert_eq!(outputs(&reports, 3), [100, 101, 102]);
        // Its last report was sent under the lock it waits in: the next
        // batch goes to it, and the stage sends no Run.
        assert!(ctx.hand.give(items(3..5)), "the waiting thread takes it");
        assert_eq!(outputs(&reports, 2), [103, 104]);
        assert!(ctx.hand.give(items(5..6)));
        assert_eq!(outputs(&reports, 1), [105]);
        assert_eq!(calls.load(Ordering::SeqCst), 6);
        assert!(done.try_recv().is_err(), "still waiting for a batch");
        // Closing the hand ends the wait at once, with nothing in it.
        let harvest = ctx.hand.close();
        assert!(harvest.outcomes.is_empty() && harvest.unstarted.is_empty());
        let result = done.recv_timeout(Duration::from_secs(2)).expect("it ends");
        assert_eq!(result, Ok(()));
        assert!(ending.let_go(), "it runs no user code");
        assert!(reports.try_recv().is_err(), "nothing reported twice");
    }

    #[test]
    fn a_wait_that_times_out_ends_the_job_and_the_next_batch_needs_a_run() {
        let (ctx, reports) = ctx(None);
        let (ending, calls) = (Ending::new(), Arc::new(AtomicUsize::new(0)));
        ctx.hand.give(items(0..2));
        let done = spawn(&ctx, &ending, &calls, Some(Duration::from_millis(20)));
        assert_eq!(outputs(&reports, 2), [100, 101]);
        let result = done.recv_timeout(Duration::from_secs(2)).expect("it ends");
        assert_eq!(result, Ok(()));
        assert!(!ctx.hand.give(items(2..3)), "nobody waits any more");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // The batch stays in the hand for the worker's Run.
        assert!(ctx.hand.begin_batch(&ctx));
    }

    #[test]
    fn a_worker_gone_while_its_thread_waits_loses_nothing_and_the_thread_ends() {
        let (ctx, reports) = ctx(None);
        let (ending, calls) = (Ending::new(), Arc::new(AtomicUsize::new(0)));
        ctx.hand.give(items(0..3));
        let done = spawn(&ctx, &ending, &calls, LONG);
        assert_eq!(outputs(&reports, 3), [100, 101, 102]);
        // The worker is killed while its thread waits in the hand (its
        // wait for the thread is dropped): the thread is not stuck...
        assert!(ending.let_go());
        // ...and a batch the stage gives before it learns of the death is
        // left in the hand, not run.
        assert!(ctx.hand.give(items(3..5)));
        let result = done.recv_timeout(Duration::from_secs(2)).expect("it ends");
        assert_eq!(result, Ok(()));
        assert_eq!(calls.load(Ordering::SeqCst), 3, "nothing more ran");
        let harvest = ctx.hand.close();
        assert!(harvest.outcomes.is_empty());
        let unstarted: Vec<u64> = harvest.unstarted.iter().map(|i| i.data).collect();
        assert_eq!(unstarted, [3, 4], "the stage gets the batch back");
        assert!(reports.try_recv().is_err());
    }

    #[test]
    fn a_hand_closed_while_its_thread_waits_ends_the_wait_at_once() {
        let (ctx, reports) = ctx(None);
        let (ending, calls) = (Ending::new(), Arc::new(AtomicUsize::new(0)));
        ctx.hand.give(items(0..1));
        let done = spawn(&ctx, &ending, &calls, LONG);
        assert_eq!(outputs(&reports, 1), [100]);
        let start = std::time::Instant::now();
        let harvest = ctx.hand.close();
        assert!(harvest.outcomes.is_empty() && harvest.unstarted.is_empty());
        assert_eq!(done.recv_timeout(Duration::from_secs(2)), Ok(Ok(())));
        assert!(start.elapsed() < Duration::from_secs(2), "not the 5 s wait");
        assert!(
            !ctx.hand.give(items(1..2)),
            "a closed hand has nobody waiting"
        );
    }

    #[test]
    fn a_thread_given_up_while_it_runs_does_not_wait_after_its_batch() {
        let (ctx, reports) = ctx(None);
        let (ending, calls) = (Ending::new(), Arc::new(AtomicUsize::new(0)));
        ctx.hand.give(items(0..1));
        // Its worker stops waiting while the thread is in user code (before
        // it starts here): it is stuck, not idle.
        assert!(!ending.let_go());
        let done = spawn(&ctx, &ending, &calls, LONG);
        assert_eq!(outputs(&reports, 1), [100]);
        assert_eq!(done.recv_timeout(Duration::from_secs(2)), Ok(Ok(())));
        assert!(!ctx.hand.give(items(1..2)), "nobody waits");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_stage_with_a_timeout_does_not_wait() {
        let timeout = Some(Duration::from_secs(10));
        assert_eq!(chosen_wait(timeout, 500), None);
        assert_eq!(chosen_wait(None, 500), Some(Duration::from_micros(500)));
        assert_eq!(chosen_wait(None, 0), None, "0: no wait");
        let (ctx, reports) = ctx(timeout);
        assert_eq!(hand_wait(&ctx), None);
        let (ending, calls) = (Ending::new(), Arc::new(AtomicUsize::new(0)));
        ctx.hand.give(items(0..2));
        let done = spawn(&ctx, &ending, &calls, hand_wait(&ctx));
        assert_eq!(outputs(&reports, 2), [100, 101]);
        assert_eq!(done.recv_timeout(Duration::from_secs(2)), Ok(Ok(())));
        assert!(
            !ctx.hand.give(items(2..4)),
            "the next batch goes with a Run"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
