//! Blocking attempts under a stage timeout.
//!
//! A blocking handler cannot be interrupted, so the worker's task watches
//! the clock while a thread runs the batch ([`super::run_blocking`]). The
//! batch, the attempt in hand and the reporter sit in the worker's
//! [`Hand`](super::hand::Hand), behind one lock shared by both sides: the
//! thread takes items from it one by one, and the watcher, at the deadline,
//! takes the attempt, fails it `TimedOut` (or sends it to be retried), and
//! in the same report hands the unstarted rest back and gives the worker
//! up, so that the stage never gives a dying worker more work. Whatever
//! the thread finishes after that finds the batch given up and is
//! discarded (its `Drop` contained), so every item is reported exactly
//! once and in order. The worker's thread is then given up too
//! ([`super::lanes`]): the stage's next batches run on other threads.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::RunCtx;
use super::hand::Hand;
use crate::item::WorkItem;

/// At the deadline of the attempt in hand, if it is still running: fails
/// it, hands the rest back and returns why the worker gives up.
fn expire<I: Send + 'static, O: Send + 'static>(
    hand: &Hand<I, O>,
    limit: Duration,
) -> Result<Option<Instant>, String> {
    let mut state = hand.lock();
    let now = Instant::now();
    let deadline = match &state.current {
        Some((started, _)) => *started + limit,
        None if state.reporter.is_some() => return Ok(Some(now + limit)),
        None => return Ok(None),
    };
    if deadline > now {
        return Ok(Some(deadline));
    }
    let (started, attempt) = state.current.take().expect("checked above");
    let rest: Vec<_> = state.pending.drain(..).collect();
    let reporter = state
        .reporter
        .take()
        .expect("running batches have reporters");
    let reason = format!(
        "item {} ran past the stage's timeout of {limit:?} in a blocking handler, which cannot be stopped; its thread is left to finish",
        attempt.job_id()
    );
    // One report, sent under the hand's lock: the outcome and the worker
    // giving up, so the stage never counts it idle.
    reporter.time_out(attempt, limit, started, now, rest, reason.clone());
    Err(reason)
}

/// Runs the worker's hand on a thread `spawn` provides, failing an attempt
/// that runs past `limit`. `spawn` gets the job and returns its
/// completion. The batch's reporter is in the hand already.
pub(crate) async fn run_watched<I, O, F, S, Fut>(
    ctx: &Arc<RunCtx<I, O>>,
    handler: Arc<F>,
    limit: Duration,
    spawn: S,
) -> Result<(), String>
where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>> + Send + Sync + 'static,
    S: FnOnce(super::lanes::Batch) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let job = {
        let ctx = ctx.clone();
        Box::new(move |ending: &super::lanes::Ending| {
            super::blocking::run_blocking(&ctx, &*handler, ending)
        })
    };
    let mut done = std::pin::pin!(spawn(job));
    loop {
        let Some(deadline) = expire(&ctx.hand, limit)? else {
            return done.await;
        };
        // Relative to now: the deadline is on the real clock, which a
        // blocking thread shares (tokio's may be paused in tests).
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        tokio::select! {
            result = &mut done => return result,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
