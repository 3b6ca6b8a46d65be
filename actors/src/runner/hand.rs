//! A worker's hand: the items it was given and has not started, and (for
//! the blocking models) the outcomes it has and has not reported yet,
//! shared between the worker and its stage.
//!
//! The stage puts a batch in the hand, which wakes the worker if it waits
//! for work ([`Hand::wait_for_work`]: a `Notify`, not a mailbox message);
//! the worker takes the items one by one as it starts them. So the items a
//! worker has not started are never out of the stage's reach:
//!
//! - an idle worker takes unstarted items from a busy one's hand
//!   ([`Hand::take_back`]), so one slow item holds back only itself;
//! - when a worker dies or is killed, the stage closes its hand
//!   ([`Hand::close`]): the items it never started go back to the queue (or
//!   are cancelled on abort), and the outcomes a blocking handler returned
//!   but the worker had not reported yet are delivered, not replaced. What
//!   a late thread does with a closed hand is discarded.
//!
//! One lock per item in the blocking models (taken once between two items);
//! an async worker keeps its batch to itself while its handlers complete at
//! once and puts the rest back in its hand before it awaits one that does
//! not (see `async_rt`), so the fast path takes two locks per batch.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::RunCtx;
use super::attempt::Attempt;
use super::report::Reporter;
use crate::item::{JobId, WorkItem};
use crate::outcome::Outcome;

/// What one worker holds, shared with its stage.
pub(crate) struct Hand<I, O> {
    state: Mutex<HandState<I, O>>,
    /// Wakes the worker waiting for work: given items, retired, closed.
    /// A wake-up given while the worker runs is kept (`notify_one`'s
    /// permit), so none is lost between its last look and its wait.
    wake: Notify,
}

pub(crate) struct HandState<I, O> {
    /// Items given to the worker and not started yet, in order.
    pub(crate) pending: VecDeque<WorkItem<I>>,
    /// A blocking batch's reporter while it runs, holding the outcomes not
    /// reported yet; gone once the batch is finished, given up or closed.
    pub(crate) reporter: Option<Reporter<I, O>>,
    /// The attempt a blocking handler is running, and when it started.
    pub(crate) current: Option<(Instant, Attempt<I>)>,
    /// The stage took what the worker held (it died or is being killed):
    /// the worker starts nothing more and whatever it finishes is discarded.
    pub(crate) closed: bool,
    /// The stage shrank and stops this worker, which holds nothing: it
    /// stops waiting for work, so that its stop is taken.
    retired: bool,
}

/// What the stage takes from a closed hand.
pub(crate) struct Harvest<I, O> {
    /// Outcomes that came back and were not reported, in order.
    pub(crate) outcomes: Vec<Outcome<I, O>>,
    /// Items never started, in order.
    pub(crate) unstarted: Vec<WorkItem<I>>,
}

/// What the stage takes from a busy worker's hand for idle ones.
pub(crate) struct Taken<I, O> {
    pub(crate) unstarted: Vec<WorkItem<I>>,
    pub(crate) outcomes: Vec<Outcome<I, O>>,
    /// Handler time spent on `outcomes`.
    pub(crate) busy: Duration,
}

impl<I: Send + 'static, O: Send + 'static> HandState<I, O> {
    /// The outcomes a blocking batch's reporter holds unreported, and the
    /// handler time spent on them; its next report is put a period off.
    fn take_unreported(&mut self) -> (Vec<Outcome<I, O>>, Duration) {
        match self.reporter.as_mut() {
            Some(reporter) => reporter.take_outcomes(),
            None => (Vec::new(), Duration::ZERO),
        }
    }
}

impl<I, O> Default for Harvest<I, O> {
    fn default() -> Self {
        Harvest {
            outcomes: Vec::new(),
            unstarted: Vec::new(),
        }
    }
}

impl<I: Send + 'static, O: Send + 'static> Hand<I, O> {
    pub(crate) fn new() -> Self {
        Hand {
            state: Mutex::new(HandState {
                pending: VecDeque::new(),
                reporter: None,
                current: None,
                closed: false,
                retired: false,
            }),
            wake: Notify::new(),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, HandState<I, O>> {
        // Nothing that can panic runs under the lock but the sending of a
        // report, and the state stays whole if it does.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From the stage: more items for the worker, after the ones it has;
    /// wakes the worker if it waits for work.
    pub(crate) fn give(&self, items: Vec<WorkItem<I>>) {
        let mut state = self.lock();
        if state.pending.is_empty() {
            // An idle worker's hand is empty: the batch becomes it, uncopied.
            state.pending = VecDeque::from(items);
        } else {
            state.pending.extend(items);
        }
        drop(state);
        self.wake.notify_one();
    }

    /// From the stage, stopping a retired worker that holds nothing: the
    /// worker stops waiting for work.
    pub(crate) fn retire(&self) {
        self.lock().retired = true;
        self.wake.notify_one();
    }

    /// From a worker whose hand is empty: waits until the stage gives it
    /// items (`true`), or closes its hand or retires it (`false`: the
    /// worker is to end).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it takes nothing from the hand (a worker killed while
    /// it waits holds nothing it started).
    pub(crate) async fn wait_for_work(&self) -> bool {
        loop {
            {
                let state = self.lock();
                if state.closed || state.retired {
                    return false;
                }
                if !state.pending.is_empty() {
                    return true;
                }
            }
            self.wake.notified().await;
        }
    }

    /// From the stage, for idle workers: some of the items the worker has
    /// not started, from the end of its batch, in order (`share` says how
    /// many, of how many there are), and the outcomes a blocking handler
    /// returned that the worker has not reported while its thread is busy
    /// with a later item, with the handler time spent on them.
    pub(crate) fn take_for_others(&self, share: impl FnOnce(usize) -> usize) -> Taken<I, O> {
        let mut state = self.lock();
        let n = share(state.pending.len()).min(state.pending.len());
        let from = state.pending.len() - n;
        let unstarted = state.pending.drain(from..).collect();
        let (outcomes, busy) = state.take_unreported();
        Taken {
            unstarted,
            outcomes,
            busy,
        }
    }

    /// From the stage, as another worker's report came: the outcomes a
    /// blocking handler returned that the worker has not reported yet,
    /// with the handler time spent on them (none from an async worker,
    /// whose reporter is its own).
    pub(crate) fn take_unreported(&self) -> (Vec<Outcome<I, O>>, Duration) {
        self.lock().take_unreported()
    }

    /// From the stage's stall check: the item a blocking handler is
    /// running now, if one is. Its batch's earlier items may have finished
    /// and wait, unreported, in the hand's reporter (up to
    /// [`BLOCKING_FLUSH_AFTER`](super::BLOCKING_FLUSH_AFTER)), so the front
    /// of what the stage counts the worker holding is not always the one
    /// that is running.
    pub(crate) fn running(&self) -> Option<JobId> {
        let state = self.lock();
        state
            .current
            .as_ref()
            .map(|(_, attempt)| attempt.job_id().clone())
    }

    /// From a blocking worker's task, before its thread starts on the
    /// hand: puts the batch's reporter in it. `false` when there is
    /// nothing to run.
    pub(crate) fn begin_batch(&self, ctx: &Arc<RunCtx<I, O>>) -> bool {
        let mut state = self.lock();
        if state.closed || state.pending.is_empty() {
            return false;
        }
        debug_assert!(state.reporter.is_none(), "one batch at a time");
        let now = match ctx.timeout {
            Some(_) => Instant::now(),
            None => crate::clock::now(),
        };
        state.reporter = Some(Reporter::blocking(ctx, state.pending.len(), now));
        true
    }

    /// From a worker: every item it has not started (none once closed).
    pub(crate) fn take_all(&self) -> VecDeque<WorkItem<I>> {
        let mut state = self.lock();
        if state.closed {
            return VecDeque::new();
        }
        std::mem::take(&mut state.pending)
    }

    /// From a worker: the next item to start (none once closed).
    pub(crate) fn next(&self) -> Option<WorkItem<I>> {
        let mut state = self.lock();
        if state.closed {
            return None;
        }
        state.pending.pop_front()
    }

    /// From a worker about to await: puts the items it has not started
    /// back in front of what the hand holds, within the stage's reach.
    pub(crate) fn put_back(&self, items: &mut VecDeque<WorkItem<I>>) {
        if items.is_empty() {
            return;
        }
        // Even into a closed hand: the stage takes what is left when it
        // reaps the worker, so nothing put back is lost.
        let mut state = self.lock();
        let later = std::mem::take(&mut state.pending);
        state.pending = std::mem::take(items);
        state.pending.extend(later);
    }

    /// From the stage, when the worker died or is being killed: takes the
    /// items it never started and the outcomes it had not reported, and
    /// closes the hand so that the worker starts nothing more from it and
    /// reports nothing more. Called again when the worker is reaped, for
    /// anything put in since.
    pub(crate) fn close(&self) -> Harvest<I, O> {
        let mut state = self.lock();
        state.closed = true;
        state.current = None;
        let harvest = Harvest {
            outcomes: state
                .reporter
                .take()
                .map(Reporter::into_outcomes)
                .unwrap_or_default(),
            unstarted: state.pending.drain(..).collect(),
        };
        drop(state);
        self.wake.notify_one();
        harvest
    }
}
