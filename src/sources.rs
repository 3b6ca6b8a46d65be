//! Ready-made sources: from an iterator, a `Stream`, or a channel.
//!
//! ```
//! use bergtalzug::prelude::*;
//!
//! let numbers = sources::iter(0..1000u32);            // data, one item each
//! let named = sources::items(vec![WorkItem::with_job_id("a", 1u8)]);
//! let (tx, rx) = sources::channel::<String>(64);     // fed while running
//! assert_eq!(numbers.size_hint(), Some(1000));        // known: progress shows a total
//! assert_eq!(rx.size_hint(), None);                   // unknown: a spinner
//! # drop((numbers, named, tx, rx));
//! ```

use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::mpsc;

use crate::{Source, WorkItem};

/// A source over an iterator of work items; see [`iter`] and [`items`].
///
/// The iterator is advanced on the source actor's task: it should not block
/// for long (use [`channel`] or your own [`Source`] for blocking input).
#[derive(Debug)]
pub struct IterSource<I> {
    iter: I,
}

/// The iterator behind [`iter`]: each element wrapped in a [`WorkItem`].
pub type DataIter<I> =
    std::iter::Map<I, fn(<I as Iterator>::Item) -> WorkItem<<I as Iterator>::Item>>;

/// Each element becomes a [`WorkItem`] with a random job id.
pub fn iter<I>(data: I) -> IterSource<DataIter<I::IntoIter>>
where
    I: IntoIterator,
    I::Item: Send + 'static,
    I::IntoIter: Send + 'static,
{
    IterSource {
        iter: data
            .into_iter()
            .map(WorkItem::new as fn(I::Item) -> WorkItem<I::Item>),
    }
}

/// Work items made by the caller (with their own job ids or metadata).
pub fn items<I, T>(items: I) -> IterSource<I::IntoIter>
where
    I: IntoIterator<Item = WorkItem<T>>,
    I::IntoIter: Send + 'static,
    T: Send + 'static,
{
    IterSource {
        iter: items.into_iter(),
    }
}

impl<I, T> Source for IterSource<I>
where
    I: Iterator<Item = WorkItem<T>> + Send + 'static,
    T: Send + 'static,
{
    type Item = T;

    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<T>>> {
        Ok(self.iter.by_ref().take(count).collect())
    }

    /// The iterator's length when it knows it exactly (a range, a `Vec`).
    fn size_hint(&self) -> Option<u64> {
        exact(self.iter.size_hint())
    }
}

fn exact((low, high): (usize, Option<usize>)) -> Option<u64> {
    (high == Some(low)).then_some(low as u64)
}

/// A source over a `Stream` of work items; see [`stream`].
///
/// `refill` waits for the first item, then takes whatever else is ready, up
/// to the count asked for: a slow stream never delays items it already has.
pub struct StreamSource<S> {
    /// Fused: a stream that ended is never polled again.
    stream: std::pin::Pin<Box<futures::stream::Fuse<S>>>,
}

impl<S> std::fmt::Debug for StreamSource<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamSource")
    }
}

/// Reads work items from a stream; the pipeline's input ends with it.
pub fn stream<S, T>(stream: S) -> StreamSource<S>
where
    S: Stream<Item = WorkItem<T>> + Send + 'static,
    T: Send + 'static,
{
    StreamSource {
        stream: Box::pin(stream.fuse()),
    }
}

impl<S, T> Source for StreamSource<S>
where
    S: Stream<Item = WorkItem<T>> + Send + 'static,
    T: Send + 'static,
{
    type Item = T;

    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<T>>> {
        let mut batch = Vec::new();
        let Some(first) = self.stream.next().await else {
            return Ok(batch);
        };
        batch.push(first);
        while batch.len() < count {
            match self.stream.next().now_or_never() {
                Some(Some(item)) => batch.push(item),
                _ => break,
            }
        }
        Ok(batch)
    }

    /// The stream's length when it knows it exactly.
    fn size_hint(&self) -> Option<u64> {
        exact(self.stream.size_hint())
    }
}

/// A source fed through a channel; see [`channel`].
#[derive(Debug)]
pub struct ChannelSource<T> {
    rx: mpsc::Receiver<WorkItem<T>>,
}

/// A bounded channel whose receiving end is a source: send work items into
/// the pipeline while it runs; the input ends when every sender is dropped.
/// `capacity` bounds what waits in the channel.
pub fn channel<T: Send + 'static>(
    capacity: usize,
) -> (mpsc::Sender<WorkItem<T>>, ChannelSource<T>) {
    let (tx, rx) = mpsc::channel(capacity);
    (tx, ChannelSource { rx })
}

/// A source over an existing receiver.
pub fn from_receiver<T: Send + 'static>(rx: mpsc::Receiver<WorkItem<T>>) -> ChannelSource<T> {
    ChannelSource { rx }
}

impl<T: Send + 'static> Source for ChannelSource<T> {
    type Item = T;

    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<T>>> {
        let mut batch = Vec::with_capacity(count.min(1024));
        // Waits for at least one item, or returns none once the channel closed.
        self.rx.recv_many(&mut batch, count).await;
        Ok(batch)
    }
}
