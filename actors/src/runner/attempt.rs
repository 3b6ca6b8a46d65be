//! One item's attempt in a stage, in any execution model: what is held
//! aside while the handler runs ([`Attempt`]), how the attempt ended
//! ([`Ran`]), and the item's outcome from that ([`Attempt::end`]), where
//! whether a failure is retried is decided, once for every model
//! ([`Ran::retryable`]).

use std::any::Any;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::RunCtx;
use crate::contain;
use crate::item::{
    AttemptStart, ItemError, ItemErrorKind, JobId, Permanent, StageNames, StageStamps, WorkItem,
    WorkItemMetadata, WorkItemResult, since,
};
use crate::outcome::{Failed, Outcome};

/// How one attempt ended, in any execution model.
pub(crate) enum Ran<O> {
    /// The handler returned.
    Returned(anyhow::Result<WorkItem<O>>),
    /// The handler panicked, with this message (caught in this process, or
    /// in a worker process that goes on).
    Panicked(String),
    /// The attempt ran past the stage's timeout.
    TimedOut(Duration),
    /// The handler never got the item: copying its data for a retry
    /// panicked, with this message.
    Uncopied(String),
    /// The handler never got the item: it cannot be sent to a worker
    /// process (or had again from what was sent), for this reason.
    Unsendable(String),
    /// The handler never got the item: the stage cannot start its worker
    /// processes.
    NoWorkers(String),
    /// The worker process died or broke while it held the item.
    Lost {
        kind: ItemErrorKind,
        message: String,
    },
}

impl<O> Ran<O> {
    /// A handler call under `catch_unwind`; a panic's payload is turned
    /// into its message here (its `Drop` is user code, and contained).
    #[inline]
    pub(crate) fn caught(result: std::thread::Result<anyhow::Result<WorkItem<O>>>) -> Self {
        match result {
            Ok(returned) => Ran::Returned(returned),
            Err(payload) => Ran::Panicked(contain::take_message(payload)),
        }
    }

    /// Whether a failed attempt may be tried again (if the stage's policy
    /// has attempts left and the input was kept). The one place this is
    /// decided, for every execution model: an error the handler marked
    /// [`Permanent`], and an item the handler never got because of what it
    /// is (its copy or its encoding failed) or because the stage has no
    /// workers, fail at once; a panic, a timeout and a lost worker process
    /// may be the moment's, not the item's.
    pub(crate) fn retryable(&self) -> bool {
        match self {
            Ran::Returned(Ok(_)) => false,
            Ran::Returned(Err(e)) => !Permanent::is(e),
            Ran::Panicked(_) | Ran::TimedOut(_) | Ran::Lost { .. } => true,
            Ran::Uncopied(_) | Ran::Unsendable(_) | Ran::NoWorkers(_) => false,
        }
    }
}

/// One item's pass through the handler: what is held aside, and how the
/// item's outcome is put together afterwards.
pub(crate) struct Attempt<I> {
    pub(super) job_id: JobId,
    /// When the item was created ([`item::epoch_ns`](crate::item::epoch_ns)).
    pub(super) created: u64,
    pub(super) attempts: u32,
    /// The item's place in the stage's input order.
    pub(super) seq: u32,
    pub(super) names: Option<StageNames>,
    pub(super) stages: StageStamps,
    /// When this attempt began (stamped when tracking is on).
    pub(super) began: Option<AttemptStart>,
    pub(super) custom: Option<BTreeMap<String, serde_json::Value>>,
    /// A copy of the input, when the stage keeps one.
    pub(super) kept: Option<I>,
    /// Copying the input panicked, with this message: the attempt does not
    /// run ([`Attempt::checked`]).
    uncopied: Option<String>,
}

impl<I: Send + 'static> Attempt<I> {
    /// Counts the attempt and takes the item's stage times aside (stamping
    /// `started` on the first attempt) before the handler gets it.
    #[inline]
    pub(crate) fn begin<O>(ctx: &RunCtx<I, O>, item: &mut WorkItem<I>, now: Instant) -> Self {
        item.head.metadata.attempts += 1;
        let attempts = item.head.metadata.attempts;
        let created = item.head.metadata.created_ns();
        let mut began = None;
        // Only tracking gives an item stage times and names: without it
        // they stay in the head (and go on with the item the handler
        // returns, when it keeps the head), whose lines after its first 64
        // bytes are then not touched (see `WorkItemMetadata`'s order), here
        // or in `succeed`.
        let (names, stages) = if ctx.tracking {
            let mut stages = std::mem::take(&mut item.head.metadata.stages);
            if let Some(times) = stages.last_mut() {
                began = Some(times.attempt_begins(since(created, now), false));
                times.set_attempts(attempts);
            }
            (item.head.metadata.names.take(), stages)
        } else {
            (None, StageStamps::new())
        };
        let custom = &item.head.metadata.custom;
        let (kept, uncopied) = match ctx.keep {
            None => (None, None),
            // The user's `Clone`: a panic in it fails this item only.
            Some(keep) => match contain::call(|| keep(&item.data)) {
                Ok(kept) => (Some(kept), None),
                Err(message) => (None, Some(message)),
            },
        };
        Attempt {
            job_id: item.head.job_id.clone(),
            created,
            attempts,
            seq: item.head.metadata.seq,
            names,
            stages,
            began,
            custom: (!custom.is_empty()).then(|| custom.clone()),
            kept,
            uncopied,
        }
    }

    pub(crate) fn job_id(&self) -> &JobId {
        &self.job_id
    }

    /// The job id, for the outcome: the attempt is spent ([`Attempt::end`]).
    fn take_job_id(&mut self) -> JobId {
        std::mem::replace(&mut self.job_id, JobId::SPENT)
    }

    /// The item for the handler, or, when its data panicked as it was
    /// copied, how the attempt ended (the item is dropped).
    #[inline]
    pub(crate) fn checked<O>(&mut self, item: WorkItem<I>) -> Result<WorkItem<I>, Ran<O>> {
        match self.uncopied.take() {
            None => Ok(item),
            Some(message) => {
                contain::drop_logged(item, || {
                    format!("item {} after its copy failed", self.job_id)
                });
                Err(Ran::Uncopied(message))
            }
        }
    }

    /// The handler returned `out`: it keeps the item's identity and times.
    #[inline(always)]
    fn succeed<O>(
        &mut self,
        ctx: &RunCtx<I, O>,
        mut out: WorkItem<O>,
        now: Instant,
    ) -> Outcome<I, O> {
        self.stamp_completed(ctx, now);
        if let Some(kept) = self.kept.take() {
            contain::drop_logged(kept, || {
                format!(
                    "the copy of item {} kept for a retry in stage `{}`",
                    self.job_id, ctx.stage
                )
            });
        }
        out.head.job_id = self.take_job_id();
        if ctx.tracking {
            out.head.metadata.stages = std::mem::take(&mut self.stages);
            out.head.metadata.names = self.names.take();
        }
        out.head.metadata.attempts = self.attempts;
        out.head.metadata.seq = self.seq;
        out.head.metadata.set_created_ns(self.created);
        Outcome::Done(out)
    }

    /// The item's outcome in this stage, from how its attempt ended: the
    /// output, another attempt ([`Ran::retryable`], if the policy has one
    /// left and the input was kept), or its final failure.
    ///
    /// The attempt is spent after it (its job id and times went to the
    /// outcome). By reference, not by value: the attempt is some 250 bytes
    /// (the stage times inline), and each move of it was a `memcpy`, two
    /// per item in every stage.
    #[inline(always)]
    pub(crate) fn end<O>(
        &mut self,
        ctx: &RunCtx<I, O>,
        ran: Ran<O>,
        now: Instant,
    ) -> Outcome<I, O> {
        match ran {
            Ran::Returned(Ok(out)) => self.succeed(ctx, out, now),
            failed => self.end_failed(ctx, failed, now),
        }
    }

    /// [`Attempt::end`] of an attempt that did not return its output: out
    /// of the line of the items that succeed.
    #[cold]
    #[inline(never)]
    fn end_failed<O>(&mut self, ctx: &RunCtx<I, O>, ran: Ran<O>, now: Instant) -> Outcome<I, O> {
        let retryable = ran.retryable();
        let (kind, message) = match ran {
            Ran::Returned(Ok(out)) => return self.succeed(ctx, out, now),
            Ran::Returned(Err(e)) => {
                // The error's `Display` and `Drop` are user code.
                let message = contain::call(|| format!("{e:#}")).unwrap_or_else(|panic| {
                    format!("(the handler's error cannot be shown: its Display panicked: {panic})")
                });
                contain::drop_logged(e, || format!("the error of item {}", self.job_id));
                (ItemErrorKind::Failed, message)
            }
            Ran::Panicked(message) => (ItemErrorKind::Panicked, message),
            Ran::TimedOut(limit) => (
                ItemErrorKind::TimedOut,
                format!("the attempt ran past the stage's timeout of {limit:?}"),
            ),
            Ran::Uncopied(panic) => (
                ItemErrorKind::Panicked,
                format!("copying the item's data for a retry panicked: {panic}"),
            ),
            Ran::Unsendable(message) => (ItemErrorKind::Failed, message),
            Ran::NoWorkers(message) => (ItemErrorKind::ProcessDied, message),
            Ran::Lost { kind, message } => (kind, message),
        };
        self.fail(ctx, kind, message, retryable, now)
    }

    /// The attempt failed: another attempt if `retryable`, the policy
    /// allows one and the input was kept, else the item's final result,
    /// with the metadata it had when the handler got it.
    fn fail<O>(
        &mut self,
        ctx: &RunCtx<I, O>,
        kind: ItemErrorKind,
        message: String,
        retryable: bool,
        now: Instant,
    ) -> Outcome<I, O> {
        self.stamp_completed(ctx, now);
        let mut metadata = WorkItemMetadata::default();
        metadata.set_created_ns(self.created);
        metadata.names = self.names.take();
        metadata.stages = std::mem::take(&mut self.stages);
        metadata.attempts = self.attempts;
        metadata.seq = self.seq;
        metadata.custom = self.custom.take().unwrap_or_default();
        let job_id = self.take_job_id();
        if retryable
            && self.attempts < ctx.max_attempts
            && let Some(data) = self.kept.take()
        {
            return Outcome::Retry(WorkItem::from_parts(job_id, data, metadata));
        }
        metadata.set_finished(Some(now));
        let input = self.kept.take().map(|data| {
            Box::new(WorkItem::from_parts(job_id.clone(), data, metadata.clone()))
                as Box<dyn Any + Send>
        });
        let mut error = ItemError::new(&*ctx.stage, kind, message);
        error.attempts = self.attempts;
        Outcome::Failed(Box::new(Failed {
            result: WorkItemResult::failed(job_id, metadata, error),
            input,
        }))
    }

    fn stamp_completed<O>(&mut self, ctx: &RunCtx<I, O>, now: Instant) {
        if ctx.tracking
            && let Some(times) = self.stages.last_mut()
        {
            times.attempt_ends(self.began.take(), since(self.created, now));
        }
    }
}
