//! Blocking attempts under a stage timeout.
//!
//! A blocking handler cannot be interrupted, so the worker's task watches
//! the clock while a thread runs the batch. The batch, the attempt in hand
//! and the reporter sit behind one lock shared by both sides: the thread
//! takes items from it one by one, and the watcher, at the deadline, takes
//! the attempt, fails it `TimedOut` (or sends it to be retried), hands the
//! unstarted rest back and gives the worker up, all in one report (so the
//! stage never counts the dying worker idle). Whatever the thread finishes
//! after that finds the batch given up and is discarded (its `Drop`
//! contained), so every item is reported exactly once and in order. The
//! worker's thread is then given up too ([`super::lanes`]): the stage's next
//! batches run on other threads.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Attempt, Ran, Reporter, RunCtx};
use crate::item::WorkItem;

/// A batch shared by the thread running it and the task watching it.
pub(crate) struct Watched<I, O> {
    state: Mutex<State<I, O>>,
}

struct State<I, O> {
    /// Gone once the batch is finished or given up.
    reporter: Option<Reporter<I, O>>,
    /// Items not started yet, in order.
    pending: VecDeque<WorkItem<I>>,
    /// The attempt the handler is running, and when it started.
    current: Option<(Instant, Attempt<I>)>,
}

impl<I: Send + 'static, O: Send + 'static> Watched<I, O> {
    fn lock(&self) -> MutexGuard<'_, State<I, O>> {
        // Nothing that can panic runs under the lock.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the batch on the current (blocking) thread.
    fn run<F>(&self, ctx: &Arc<RunCtx<I, O>>, handler: &F) -> Result<(), String>
    where
        F: Fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>>,
    {
        loop {
            let (item, span) = {
                let mut state = self.lock();
                let State {
                    reporter,
                    pending,
                    current,
                } = &mut *state;
                let Some(reporter) = reporter.as_mut() else {
                    return Ok(()); // given up by the watcher
                };
                let Some(mut item) = pending.pop_front() else {
                    break;
                };
                let started = Instant::now();
                let mut attempt = Attempt::begin(ctx, &mut item, started);
                reporter.started(attempt.job_id());
                match attempt.checked(item) {
                    Ok(item) => {
                        let span = super::item_spans_enabled()
                            .then(|| super::item_span(ctx, attempt.job_id()));
                        *current = Some((started, attempt));
                        (item, span)
                    }
                    Err(ran) => {
                        let mut rest = std::iter::from_fn(|| pending.pop_front());
                        reporter.settle(attempt, ran, started, Instant::now(), &mut rest)?;
                        continue;
                    }
                }
            };
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                let _entered = span.as_ref().map(tracing::Span::enter);
                handler(item)
            }));
            let now = Instant::now();
            let mut state = self.lock();
            let State {
                reporter,
                pending,
                current,
            } = &mut *state;
            let Some(reporter) = reporter.as_mut() else {
                // Timed out: the late result is discarded (its `Drop` is
                // user code).
                drop(state);
                crate::contain::drop_logged(result, || {
                    format!("a late result in stage `{}`", ctx.stage)
                });
                return Ok(());
            };
            let (started, attempt) = current.take().expect("the attempt is in hand");
            let mut rest = std::iter::from_fn(|| pending.pop_front());
            reporter.settle(attempt, Ran::caught(result), started, now, &mut rest)?;
        }
        if let Some(reporter) = self.lock().reporter.take() {
            reporter.finish(Instant::now());
        }
        Ok(())
    }

    /// At the deadline of the attempt in hand, if it is still running:
    /// fails it, hands the rest back and returns why the worker gives up.
    fn expire(&self, limit: Duration) -> Result<Option<Instant>, String> {
        let mut state = self.lock();
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
        drop(state);
        let reason = format!(
            "item {} ran past the stage's timeout of {limit:?} in a blocking handler, which cannot be stopped; its thread is left to finish",
            attempt.job_id()
        );
        reporter.time_out(attempt, limit, started, now, rest, reason.clone());
        Err(reason)
    }
}

/// Runs `items` on a thread `spawn` provides, failing an attempt that runs
/// past `limit`. `spawn` gets the job and returns its completion.
pub(crate) async fn run_watched<I, O, F, S, Fut>(
    ctx: &Arc<RunCtx<I, O>>,
    handler: Arc<F>,
    items: Vec<WorkItem<I>>,
    limit: Duration,
    spawn: S,
) -> Result<(), String>
where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>> + Send + Sync + 'static,
    S: FnOnce(Box<dyn FnOnce() -> Result<(), String> + Send>) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let watched = Arc::new(Watched {
        state: Mutex::new(State {
            reporter: Some(Reporter::new(ctx, items.len(), Instant::now())),
            pending: items.into(),
            current: None,
        }),
    });
    let job = {
        let (watched, ctx) = (watched.clone(), ctx.clone());
        Box::new(move || watched.run(&ctx, &*handler))
    };
    let mut done = std::pin::pin!(spawn(job));
    loop {
        let Some(deadline) = watched.expire(limit)? else {
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
