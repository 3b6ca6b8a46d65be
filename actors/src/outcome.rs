//! What a worker reports to its stage: each item's [`Outcome`] there, in
//! [`WorkerReport`]s. The data runners produce and the stage settles;
//! it imports nothing but items.

use std::any::Any;
use std::time::Duration;

use crate::event::WorkerId;
use crate::item::{JobId, WorkItem, WorkItemResult};

/// What became of one item in a stage.
pub(crate) enum Outcome<I, O> {
    /// The handler returned the item for the next stage.
    Done(WorkItem<O>),
    /// The item failed here; its result is final.
    Failed(Box<Failed>),
    /// The attempt failed and the retry policy allows another: the item as
    /// it was before the attempt, its attempts counted.
    Retry(WorkItem<I>),
}

impl<I, O> Outcome<I, O> {
    pub(crate) fn job_id(&self) -> &JobId {
        match self {
            Outcome::Done(item) => &item.head.job_id,
            Outcome::Failed(failed) => &failed.result.job_id,
            Outcome::Retry(item) => &item.head.job_id,
        }
    }
}

/// An item's final failure, with its last input when the stage kept one.
pub(crate) struct Failed {
    pub(crate) result: WorkItemResult,
    /// A `WorkItem<I>` of the stage's input type, for the dead letter.
    pub(crate) input: Option<Box<dyn Any + Send>>,
}

/// A worker's report to its stage.
pub(crate) struct WorkerReport<I, O> {
    pub(crate) worker: WorkerId,
    /// Outcomes, in the order the items were given.
    pub(crate) outcomes: Vec<Outcome<I, O>>,
    /// Items of the batch the worker did not start (after a panic or a
    /// timeout), in order.
    pub(crate) returned: Vec<WorkItem<I>>,
    /// Handler time spent on `outcomes`.
    pub(crate) busy: Duration,
    /// The worker is about to fail (a panic, or a blocking attempt given up
    /// at its deadline), for this reason: give it no more work, replace it.
    pub(crate) failing: Option<String>,
}
