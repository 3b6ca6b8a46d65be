//! The [`Source`] trait: where a pipeline's items come from.
//!
//! A source is asked for up to `count` items whenever the first stage has
//! room: the demand-driven counterpart of the seed's `refill_queue(count)`.
//! Returning an empty `Vec` means the source is exhausted; the pipeline then
//! finishes the items it has and stops. A long-lived source (a queue, a
//! watched directory) overrides [`Source::fetch`] instead, which can also
//! answer [`Refill::NothingYet`]: "nothing right now, ask again". An error is logged, reported as a
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
use std::panic::AssertUnwindSafe;
use std::pin::Pin;

use futures::FutureExt;

use crate::item::{ItemError, JobId, WorkItem, WorkItemResult};

/// What [`Source::fetch`] found.
#[derive(Debug)]
#[non_exhaustive]
pub enum Refill<T> {
    /// Items to admit (at most the `count` asked for are admitted at once;
    /// the rest wait for room). An empty `Vec` here means the same as
    /// [`NothingYet`](Refill::NothingYet).
    Items(Vec<WorkItem<T>>),
    /// Nothing right now: the pipeline stays open and asks again after
    /// `queue_refresh_rate`, not before (no busy polling). Acks, injections
    /// and `stop()` are served meanwhile.
    NothingYet,
    /// Nothing will ever come: the pipeline finishes what it has and stops.
    Exhausted,
}

impl<T> From<Vec<WorkItem<T>>> for Refill<T> {
    /// The [`Source::refill`] convention: an empty batch is the end.
    fn from(items: Vec<WorkItem<T>>) -> Self {
        if items.is_empty() {
            Refill::Exhausted
        } else {
            Refill::Items(items)
        }
    }
}

/// A source's acknowledgement path on its own, for a source whose
/// [`fetch`](Source::fetch) may wait (a broker's blocking read): the
/// pipeline calls it as soon as items finish, even while a refill is
/// pending, which [`Source::ack`] (it needs the source itself) cannot be.
/// Returned once by [`Source::acknowledger`].
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use bergtalzug_actors::source::{Ack, AckFuture, Acknowledger};
///
/// struct Done(Arc<Mutex<Vec<Ack>>>);
///
/// impl Acknowledger for Done {
///     fn ack(&mut self, outcomes: Vec<Ack>) -> AckFuture<'_> {
///         Box::pin(async move { self.0.lock().unwrap().extend(outcomes) })
///     }
/// }
/// ```
pub trait Acknowledger: Send + 'static {
    /// Told the final outcome of admitted items, each exactly once, as
    /// [`Source::ack`] would be. A panic is contained: the pipeline fails
    /// as for a panicking source, and later items are still acknowledged.
    fn ack(&mut self, outcomes: Vec<Ack>) -> AckFuture<'_>;
}

/// The future an [`Acknowledger`] returns.
pub type AckFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// The final outcome of one admitted item, for [`Source::ack`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Ack {
    /// The item's id.
    pub job_id: JobId,
    /// Why it did not succeed; `None` when it did. For an item that was
    /// split (see [`crate::shape`]): the first failure among the items it
    /// split into, its message counting them.
    pub error: Option<Box<ItemError>>,
    /// For an item that was split: the ids of the items it split into that
    /// failed (at most 1000 are named; `error` counts them all). Empty
    /// otherwise.
    pub failed: Vec<JobId>,
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
            failed: Vec::new(),
        }
    }

    pub(crate) fn combined(outcome: crate::lineage::Combined) -> Self {
        Ack {
            job_id: outcome.root,
            error: outcome.error.map(Box::new),
            failed: outcome.failed,
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
    /// queue or a network) and return fewer items than asked. It runs on a
    /// task of its own: while it waits, the pipeline goes on (acks through
    /// an [`acknowledger`](Source::acknowledger), injections, `stop()`,
    /// which drops a pending refill). Called through the default
    /// [`fetch`](Source::fetch) only; a source that overrides `fetch` is
    /// never asked here.
    fn refill(
        &mut self,
        count: usize,
    ) -> impl Future<Output = anyhow::Result<Vec<WorkItem<Self::Item>>>> + Send;

    /// What the pipeline calls for items: up to `count` of them, or
    /// "nothing yet", or "exhausted". The default calls
    /// [`refill`](Source::refill) (an empty batch: exhausted).
    ///
    /// Override it for a long-lived source that must say "nothing right
    /// now" without ending the run and without waiting inside: the pipeline
    /// asks again after `queue_refresh_rate`.
    ///
    /// ```
    /// use bergtalzug_actors::{item::WorkItem, source::{Refill, Source}};
    ///
    /// struct Inbox { waiting: Vec<u64>, closed: bool }
    ///
    /// impl Source for Inbox {
    ///     type Item = u64;
    ///     async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<u64>>> {
    ///         let n = count.min(self.waiting.len());
    ///         Ok(self.waiting.drain(..n).map(WorkItem::new).collect())
    ///     }
    ///     async fn fetch(&mut self, count: usize) -> anyhow::Result<Refill<u64>> {
    ///         Ok(match (self.waiting.is_empty(), self.closed) {
    ///             (false, _) => Refill::Items(self.refill(count).await?),
    ///             (true, false) => Refill::NothingYet,
    ///             (true, true) => Refill::Exhausted,
    ///         })
    ///     }
    /// }
    /// ```
    ///
    /// # Cancel safety
    ///
    /// A pending `fetch` (or `refill`) is dropped when the pipeline stops;
    /// items it had taken but not returned are the source's to put back.
    fn fetch(
        &mut self,
        count: usize,
    ) -> impl Future<Output = anyhow::Result<Refill<Self::Item>>> + Send {
        async move { Ok(Refill::from(self.refill(count).await?)) }
    }

    /// Given back the items the source handed out that the pipeline did
    /// not admit: those returned beyond the demand when the input closed,
    /// and those refused because an item with the same job id was in the
    /// pipeline (the live one is acknowledged when it finishes; a refused
    /// duplicate is never acknowledged, so that a queue does not ack or
    /// dead-letter the entry that is still running). A durable source
    /// releases their leases here at once. The default drops them (a
    /// panic in their `Drop` is logged and contained). Called on the
    /// source's task, never while a refill runs; a panic in an override
    /// fails the pipeline as one in `ack` does.
    fn release(
        &mut self,
        unadmitted: Vec<WorkItem<Self::Item>>,
    ) -> impl Future<Output = ()> + Send {
        crate::contain::drop_logged(unadmitted, || {
            "items the source handed out that were not admitted".to_string()
        });
        async {}
    }

    /// An acknowledgement path of its own, taken once when the pipeline
    /// starts: a source whose refill may wait returns one so that finished
    /// items are acknowledged at once rather than after the refill. With
    /// one, [`ack`](Source::ack) is not called. Default `None`.
    fn acknowledger(&mut self) -> Option<Box<dyn Acknowledger>> {
        None
    }

    /// How many more items `refill` will hand out, if the source knows.
    ///
    /// Read once, when the pipeline starts, as
    /// [`PipelineStats::expected_items`](crate::stats::PipelineStats::expected_items):
    /// progress bars show it as their total. The default, `None`, means
    /// "unknown" (a spinner with a rate instead of a bar). A wrong hint
    /// changes only what is shown, never what runs.
    ///
    /// ```
    /// use bergtalzug_actors::{item::WorkItem, source::Source};
    ///
    /// struct Numbers { next: u64, end: u64 }
    ///
    /// impl Source for Numbers {
    ///     type Item = u64;
    ///     async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<u64>>> {
    ///         let end = self.end.min(self.next + count as u64);
    ///         let items = (self.next..end).map(WorkItem::new).collect();
    ///         self.next = end;
    ///         Ok(items)
    ///     }
    ///     fn size_hint(&self) -> Option<u64> {
    ///         Some(self.end - self.next)
    ///     }
    /// }
    /// assert_eq!(Numbers { next: 0, end: 10 }.size_hint(), Some(10));
    /// ```
    fn size_hint(&self) -> Option<u64> {
        None
    }

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
    /// closed, or refused as duplicates) are not: they go to
    /// [`release`](Source::release).
    /// Called on the source's task: while it runs, no refill does, and
    /// while a refill waits, acks wait for it (a source whose refill may
    /// wait gives an [`acknowledger`](Source::acknowledger) instead).
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

/// How a refill ended, for the source actor.
pub(crate) enum RefillEnd<T> {
    /// `cancel` fired first; the refill was dropped.
    Cancelled,
    /// The refill panicked (its message).
    Panicked(String),
    /// The source's answer.
    Answered(anyhow::Result<Refill<T>>),
}

/// A refill that owns its source and gives it back at the end, whatever
/// the end: so it can be polled once where it was made and, if it has to
/// wait, moved to a task of its own.
pub(crate) type OwnedRefill<T> =
    Pin<Box<dyn Future<Output = (Box<dyn DynSource<T>>, RefillEnd<T>)> + Send>>;

/// A [`Source`] behind a pointer, as the source actor holds it (one boxed
/// future per refill, not per item).
pub(crate) trait DynSource<T>: Send + 'static {
    /// Asks for `count` items (`Source::fetch`), raced against `cancel`,
    /// a panic caught; the source comes back with the answer.
    fn refill(
        self: Box<Self>,
        count: usize,
        cancel: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> OwnedRefill<T>;
    fn size_hint(&self) -> Option<u64>;
    fn wants_acks(&self) -> bool;
    fn ack(&mut self, outcomes: Vec<Ack>) -> AckFuture<'_>;
    fn release(&mut self, unadmitted: Vec<WorkItem<T>>) -> AckFuture<'_>;
    fn acknowledger(&mut self) -> Option<Box<dyn Acknowledger>>;
}

impl<S: Source> DynSource<S::Item> for S {
    fn refill(
        self: Box<Self>,
        count: usize,
        cancel: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> OwnedRefill<S::Item> {
        Box::pin(async move {
            let mut source = self;
            let end = {
                let fetch = AssertUnwindSafe(Source::fetch(&mut *source, count)).catch_unwind();
                futures::pin_mut!(fetch);
                match futures::future::select(cancel, fetch).await {
                    futures::future::Either::Left(((), _)) => RefillEnd::Cancelled,
                    futures::future::Either::Right((Err(panic), _)) => {
                        RefillEnd::Panicked(crate::contain::panic_message(&*panic))
                    }
                    futures::future::Either::Right((Ok(answer), _)) => RefillEnd::Answered(answer),
                }
            };
            (source as Box<dyn DynSource<S::Item>>, end)
        })
    }

    fn size_hint(&self) -> Option<u64> {
        Source::size_hint(self)
    }

    fn wants_acks(&self) -> bool {
        Source::wants_acks(self)
    }

    fn ack(&mut self, outcomes: Vec<Ack>) -> AckFuture<'_> {
        Box::pin(Source::ack(self, outcomes))
    }

    fn release(&mut self, unadmitted: Vec<WorkItem<S::Item>>) -> AckFuture<'_> {
        Box::pin(Source::release(self, unadmitted))
    }

    fn acknowledger(&mut self) -> Option<Box<dyn Acknowledger>> {
        Source::acknowledger(self)
    }
}

pub(crate) fn erase_source<S: Source>(source: S) -> Box<dyn DynSource<S::Item>> {
    Box::new(source)
}
