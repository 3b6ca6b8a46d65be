//! The [`Source`] trait: where a pipeline's items come from.
//!
//! A source is asked for up to `count` items whenever the first stage has
//! room: the demand-driven counterpart of the seed's `refill_queue(count)`.
//! Returning an empty `Vec` means the source is exhausted; the pipeline then
//! finishes the items it has and stops. An error is logged, reported as a
//! [`PipelineEvent::SourceError`](crate::event::PipelineEvent::SourceError)
//! and counted in `PipelineStats::source_errors`; the source is asked again
//! after `queue_refresh_rate`, then twice as long after each further failure
//! in a row (at most 30 s, or the refresh rate if longer), and at the
//! refresh rate again once a refill succeeds.
//!
//! ```
//! use bergtalzug_actors::{item::WorkItem, source::Source};
//!
//! struct Numbers { next: u64, end: u64 }
//!
//! impl Source for Numbers {
//!     type Item = u64;
//!     async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<u64>>> {
//!         let end = self.end.min(self.next + count as u64);
//!         let items = (self.next..end).map(WorkItem::new).collect();
//!         self.next = end;
//!         Ok(items) // empty once `end` is reached: exhausted
//!     }
//! }
//! ```

use std::future::Future;
use std::pin::Pin;

use crate::item::{ItemError, JobId, WorkItem, WorkItemResult};

/// The final outcome of one admitted item, for [`Source::ack`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Ack {
    /// The item's id.
    pub job_id: JobId,
    /// Why it did not succeed; `None` when it did.
    pub error: Option<ItemError>,
}

impl Ack {
    /// Whether the item went through every stage.
    pub fn is_success(&self) -> bool {
        self.error.is_none()
    }

    pub(crate) fn of(result: &WorkItemResult) -> Self {
        Ack {
            job_id: result.job_id.clone(),
            error: result.error.clone(),
        }
    }
}

/// A demand-driven supplier of work items.
pub trait Source: Send + 'static {
    /// The data type of the items, the first stage's input.
    type Item: Send + 'static;

    /// Returns up to `count` items; an empty `Vec` means "exhausted".
    ///
    /// Called only when the first stage has room for `count` items, never
    /// with more than the first stage's `queue_size`. It may wait (for a
    /// queue or a network) and return fewer items than asked.
    fn refill(
        &mut self,
        count: usize,
    ) -> impl Future<Output = anyhow::Result<Vec<WorkItem<Self::Item>>>> + Send;

    /// Whether the pipeline calls [`ack`](Source::ack). Default false.
    fn wants_acks(&self) -> bool {
        false
    }

    /// Told the final outcome of admitted items, each exactly once and in
    /// batches, when [`wants_acks`](Source::wants_acks) says so: a source
    /// backed by a queue deletes what succeeded and requeues (or
    /// dead-letters) the rest, for at-least-once delivery. Every admitted
    /// item is acknowledged, injected ones included, before the pipeline
    /// reports that it finished; items the source handed out but the
    /// pipeline never admitted (returned beyond the demand when the input
    /// closed) are not, so a queue's visibility timeout brings them back.
    /// Called on the source's task: while it runs, no refill does.
    ///
    /// ```
    /// use bergtalzug_actors::source::{Ack, Source};
    /// use bergtalzug_actors::item::WorkItem;
    ///
    /// struct Queue { pending: Vec<String>, done: Vec<String>, requeued: Vec<String> }
    ///
    /// impl Source for Queue {
    ///     type Item = String;
    ///     async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<String>>> {
    ///         let n = count.min(self.pending.len());
    ///         Ok(self.pending.drain(..n).map(|m| WorkItem::with_job_id(m.as_str(), m.clone())).collect())
    ///     }
    ///     fn wants_acks(&self) -> bool { true }
    ///     async fn ack(&mut self, outcomes: Vec<Ack>) {
    ///         for ack in outcomes {
    ///             let list = if ack.is_success() { &mut self.done } else { &mut self.requeued };
    ///             list.push(ack.job_id.to_string());
    ///         }
    ///     }
    /// }
    /// ```
    fn ack(&mut self, outcomes: Vec<Ack>) -> impl Future<Output = ()> + Send {
        let _ = outcomes;
        async {}
    }
}

/// The future a boxed source returns.
pub(crate) type RefillFuture<'a, T> =
    Pin<Box<dyn Future<Output = anyhow::Result<Vec<WorkItem<T>>>> + Send + 'a>>;

/// A [`Source`] behind a pointer, as the source actor holds it (one boxed
/// future per refill, not per item).
pub(crate) trait DynSource<T>: Send + 'static {
    fn refill(&mut self, count: usize) -> RefillFuture<'_, T>;
    fn wants_acks(&self) -> bool;
    fn ack(&mut self, outcomes: Vec<Ack>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

impl<S: Source> DynSource<S::Item> for S {
    fn refill(&mut self, count: usize) -> RefillFuture<'_, S::Item> {
        Box::pin(Source::refill(self, count))
    }

    fn wants_acks(&self) -> bool {
        Source::wants_acks(self)
    }

    fn ack(&mut self, outcomes: Vec<Ack>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(Source::ack(self, outcomes))
    }
}

pub(crate) fn erase_source<S: Source>(source: S) -> Box<dyn DynSource<S::Item>> {
    Box::new(source)
}
