//! A worker's reports to its stage: outcomes collected and sent in
//! batches ([`Reporter`]), and the guard that sends what is left when a
//! worker's task ends early ([`Sending`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::attempt::{Attempt, Ran};
use super::{BLOCKING_FLUSH_AFTER, FLUSH_AFTER, RunCtx};
use crate::contain;
use crate::event::PipelineEvent;
use crate::item::{JobId, WorkItem};
use crate::outcome::{Outcome, WorkerReport};

/// Collects a worker's outcomes and sends them to the stage in batches.
pub(crate) struct Reporter<I, O> {
    ctx: Arc<RunCtx<I, O>>,
    outcomes: Vec<Outcome<I, O>>,
    /// When the handler started on the first outcome not yet sent, and
    /// finished the last: items run back to back, so the handler time of
    /// a report is the span between (one subtraction per report, not per
    /// item).
    first_started: Option<Instant>,
    last_done: Instant,
    /// When the outcomes held are due to be reported: `period` after the
    /// last report (compared, not subtracted, per item).
    flush_at: Instant,
    /// [`FLUSH_AFTER`], or [`BLOCKING_FLUSH_AFTER`] for a blocking batch.
    period: Duration,
    events: Vec<PipelineEvent>,
}

impl<I: Send + 'static, O: Send + 'static> Reporter<I, O> {
    /// A reporter for a batch of `batch` items begun at `now`, reporting
    /// every [`FLUSH_AFTER`] until the batch ends.
    pub(crate) fn new(ctx: &Arc<RunCtx<I, O>>, batch: usize, now: Instant) -> Self {
        Self::every(FLUSH_AFTER, ctx, batch, now)
    }

    /// A reporter for a blocking batch (Thread, Cpu), reporting every
    /// [`BLOCKING_FLUSH_AFTER`].
    pub(crate) fn blocking(ctx: &Arc<RunCtx<I, O>>, batch: usize, now: Instant) -> Self {
        Self::every(BLOCKING_FLUSH_AFTER, ctx, batch, now)
    }

    fn every(period: Duration, ctx: &Arc<RunCtx<I, O>>, batch: usize, now: Instant) -> Self {
        Reporter {
            ctx: ctx.clone(),
            outcomes: Vec::with_capacity(batch),
            first_started: None,
            last_done: now,
            flush_at: now + period,
            period,
            events: Vec::new(),
        }
    }

    /// Notes that the handler is about to start on an item.
    pub(crate) fn started(&mut self, job_id: &JobId) {
        if self.ctx.events.wants_lifecycle() {
            // At once, not with the next report: the handler may take long.
            self.ctx.events.lifecycle(vec![PipelineEvent::ItemStarted {
                job_id: job_id.clone(),
                stage: self.ctx.stage.clone(),
                worker: self.ctx.worker,
            }]);
        }
    }

    /// Records an outcome and sends what has accumulated when it is time.
    #[inline(always)]
    pub(crate) fn push(&mut self, outcome: Outcome<I, O>, started: Instant, now: Instant) {
        self.record(outcome, started, now);
        if now >= self.flush_at {
            self.flush(Vec::new(), None, now);
        }
    }

    /// Records how an attempt in this process ended. After a panic,
    /// reports it with the rest of the batch (`rest`) handed back and
    /// returns why the worker must now fail.
    #[inline(always)]
    pub(crate) fn settle(
        &mut self,
        attempt: &mut Attempt<I>,
        ran: Ran<O>,
        started: Instant,
        now: Instant,
        rest: &mut dyn Iterator<Item = WorkItem<I>>,
    ) -> Result<(), String> {
        // A panic here (in the worker's own process) fails the worker.
        let panicked = match &ran {
            Ran::Panicked(message) => Some(format!("handler panicked: {message}")),
            _ => None,
        };
        let outcome = attempt.end(&self.ctx, ran, now);
        match panicked {
            None => {
                self.push(outcome, started, now);
                Ok(())
            }
            Some(reason) => {
                self.record(outcome, started, now);
                self.flush(rest.collect(), Some(reason.clone()), now);
                Err(reason)
            }
        }
    }

    /// Fails the attempt in hand at the stage's timeout (`limit`) and gives
    /// the worker up for `reason`, with the unstarted rest of its batch
    /// handed back, all in one report: a report without `failing` would
    /// let the stage count the dying worker idle and give it more work.
    pub(crate) fn time_out(
        mut self,
        mut attempt: Attempt<I>,
        limit: Duration,
        started: Instant,
        now: Instant,
        returned: Vec<WorkItem<I>>,
        reason: String,
    ) {
        let outcome = attempt.end(&self.ctx, Ran::TimedOut(limit), now);
        self.record(outcome, started, now);
        self.flush(returned, Some(reason), now);
    }

    #[inline(always)]
    pub(crate) fn record(&mut self, outcome: Outcome<I, O>, started: Instant, now: Instant) {
        self.first_started.get_or_insert(started);
        self.last_done = now;
        if self.ctx.events.wants_lifecycle() {
            let success = matches!(outcome, Outcome::Done(_));
            self.events.push(PipelineEvent::ItemCompleted {
                job_id: outcome.job_id().clone(),
                stage: self.ctx.stage.clone(),
                worker: self.ctx.worker,
                success,
            });
        }
        self.outcomes.push(outcome);
    }

    /// The last outcome recorded was done by `now` (a later reading of the
    /// clock than the one it was recorded with).
    pub(crate) fn done_by(&mut self, now: Instant) {
        self.last_done = now;
    }

    /// When the outcomes recorded and not sent are due to be sent, if
    /// there are any: the reporter's period after the last report.
    pub(crate) fn flush_due(&self) -> Option<Instant> {
        (!self.outcomes.is_empty()).then_some(self.flush_at)
    }

    /// Sends the outcomes recorded so far, if any.
    pub(crate) fn flush_done(&mut self) {
        if !self.outcomes.is_empty() {
            self.flush(Vec::new(), None, crate::clock::now());
        }
    }

    /// Sends the outcomes recorded so far, or an empty report if there are
    /// none: the stage looks into the worker's hand on every report, and
    /// the worker just put items back in it.
    pub(crate) fn flush_offered(&mut self) {
        if self.outcomes.is_empty() {
            if !self.events.is_empty() {
                self.ctx.events.lifecycle(std::mem::take(&mut self.events));
            }
            let report = WorkerReport {
                worker: self.ctx.worker,
                outcomes: Vec::new(),
                returned: Vec::new(),
                busy: Duration::ZERO,
                failing: None,
            };
            let _ = self.ctx.reports.report(report);
        } else {
            self.flush(Vec::new(), None, crate::clock::now());
        }
    }

    /// Sends everything left.
    pub(crate) fn finish(mut self, now: Instant) {
        self.flush(Vec::new(), None, now);
    }

    /// From the stage, while the worker is busy with a later item: the
    /// outcomes recorded and not sent, and the handler time spent on them.
    /// The stage took what the worker would have reported, so its next
    /// report is due a period after the last of them: while the stage takes
    /// them with every other worker's report, this worker's own timer does
    /// not wake it as well.
    pub(crate) fn take_outcomes(&mut self) -> (Vec<Outcome<I, O>>, Duration) {
        if !self.events.is_empty() {
            self.ctx.events.lifecycle(std::mem::take(&mut self.events));
        }
        let busy = self.first_started.take().map_or(Duration::ZERO, |s| {
            self.last_done.saturating_duration_since(s)
        });
        if !self.outcomes.is_empty() {
            self.flush_at = self.last_done + self.period;
        }
        (std::mem::take(&mut self.outcomes), busy)
    }

    /// The outcomes recorded and not sent, for the stage that closed the
    /// worker's hand.
    pub(crate) fn into_outcomes(mut self) -> Vec<Outcome<I, O>> {
        if !self.events.is_empty() {
            self.ctx.events.lifecycle(std::mem::take(&mut self.events));
        }
        std::mem::take(&mut self.outcomes)
    }

    fn flush(&mut self, returned: Vec<WorkItem<I>>, failing: Option<String>, now: Instant) {
        if !self.events.is_empty() {
            self.ctx.events.lifecycle(std::mem::take(&mut self.events));
        }
        if self.outcomes.is_empty() && returned.is_empty() && failing.is_none() {
            return;
        }
        let report = WorkerReport {
            worker: self.ctx.worker,
            outcomes: std::mem::take(&mut self.outcomes),
            returned,
            busy: self.first_started.take().map_or(Duration::ZERO, |s| {
                self.last_done.saturating_duration_since(s)
            }),
            failing,
        };
        self.flush_at = now + self.period;
        // The stage is gone only when the pipeline is shutting down; the
        // report's items are dropped here then.
        if let Err(unsent) = self.ctx.reports.report(report) {
            contain::drop_logged(unsent, || "a report its stage was gone for".to_string());
        }
    }
}

/// The reporter of a worker's own task (Async, Process), which sends what
/// it holds if the task ends without finishing its batch (a panic outside
/// the handler's guard, or a kill): results that came back are delivered,
/// ahead of the stage's `Reap` of the worker. (A blocking batch's reporter
/// sits in the worker's hand, where the stage takes what it holds.)
pub(crate) struct Sending<I: Send + 'static, O: Send + 'static>(pub(crate) Reporter<I, O>);

impl<I: Send + 'static, O: Send + 'static> Sending<I, O> {
    /// Sends everything left.
    pub(crate) fn finish(mut self, now: Instant) {
        self.0.flush(Vec::new(), None, now);
    }

    /// Sends everything left with the unstarted items handed back, and
    /// tells the stage the worker is giving up for `reason`.
    pub(crate) fn give_up(mut self, returned: Vec<WorkItem<I>>, reason: String, now: Instant) {
        self.0.flush(returned, Some(reason), now);
    }
}

impl<I: Send + 'static, O: Send + 'static> std::ops::Deref for Sending<I, O> {
    type Target = Reporter<I, O>;
    fn deref(&self) -> &Reporter<I, O> {
        &self.0
    }
}

impl<I: Send + 'static, O: Send + 'static> std::ops::DerefMut for Sending<I, O> {
    fn deref_mut(&mut self) -> &mut Reporter<I, O> {
        &mut self.0
    }
}

impl<I: Send + 'static, O: Send + 'static> Drop for Sending<I, O> {
    fn drop(&mut self) {
        self.0.flush_done();
    }
}
