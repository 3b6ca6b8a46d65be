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

use crate::item::WorkItem;

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
}

/// The future a boxed source returns.
pub(crate) type RefillFuture<'a, T> =
    Pin<Box<dyn Future<Output = anyhow::Result<Vec<WorkItem<T>>>> + Send + 'a>>;

/// A [`Source`] behind a pointer, as the source actor holds it (one boxed
/// future per refill, not per item).
pub(crate) trait DynSource<T>: Send + 'static {
    fn refill(&mut self, count: usize) -> RefillFuture<'_, T>;
}

impl<S: Source> DynSource<S::Item> for S {
    fn refill(&mut self, count: usize) -> RefillFuture<'_, S::Item> {
        Box::pin(Source::refill(self, count))
    }
}

pub(crate) fn erase_source<S: Source>(source: S) -> Box<dyn DynSource<S::Item>> {
    Box::new(source)
}
