//! Split and filter: what a splitting stage's handler returns for one item.
//!
//! A stage whose output is [`Children<O>`] (or a `Vec<O>`) and that is
//! followed by [`PipelineBuilder::split`](crate::PipelineBuilder::split)
//! turns each item into 0..n items of type `O`, its *children*:
//!
//! - each child's job id is derived from its parent's: shown
//!   `<parent>/<index>`, index from 0 in the order the children come
//!   ([`derived_id`]), so the same input split the same way gets the same
//!   ids on every run; it never equals an id a user chose (even one
//!   spelled the same), so ids containing `/` are safe;
//! - each child carries its parent's metadata (`custom` included), with the
//!   parent's id under [`PARENT_ID`] in `custom`;
//! - no child at all means the item was *filtered*: it ends as a success,
//!   with `true` under [`FILTERED`] in its result's `custom`;
//! - children are drawn lazily, as the next stage asks for them: an
//!   iterator or a stream that yields a million children never has more
//!   than the next stage's room of them in memory.
//!
//! The item the source admitted is finished when all its descendants are;
//! `Source::ack` hears of it once, with the combined outcome (see
//! `docs/shapes.md`).
//!
//! ```
//! use bergtalzug_actors::item::WorkItem;
//! use bergtalzug_actors::shape::Children;
//!
//! // One line of text becomes one child per word; an empty line is filtered.
//! fn words(item: WorkItem<String>) -> anyhow::Result<WorkItem<Children<String>>> {
//!     Ok(item.map(|line| {
//!         let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
//!         Children::from(words)
//!     }))
//! }
//! let item = words(WorkItem::new("a b".to_string())).unwrap();
//! assert!(!item.data.is_empty());
//! ```

use std::fmt;
use std::pin::Pin;

use futures::Stream;

use crate::item::{JobId, WorkItem, WorkItemMetadata};

/// The key in a child's `custom` metadata that holds its parent's job id.
pub const PARENT_ID: &str = "parent_id";

/// The key in a filtered item's result (`custom`) that says it was filtered
/// (value `true`): a split that gave it no children.
pub const FILTERED: &str = "filtered";

/// The job id of the `index`th child (from 0) of `parent`, shown
/// `<parent>/<index>`.
///
/// It is the parent's id and the index, not a string: it equals only
/// another child `index` of the same parent, never an id a user chose,
/// even one spelled the same (see [`JobId`]).
///
/// ```
/// use bergtalzug_actors::item::JobId;
/// use bergtalzug_actors::shape::derived_id;
///
/// let child = derived_id(&JobId::from("file-3"), 17);
/// assert_eq!(child.to_string(), "file-3/17");
/// assert_eq!(child, derived_id(&JobId::from("file-3"), 17));
/// assert_ne!(child, JobId::from("file-3/17"));
/// ```
pub fn derived_id(parent: &JobId, index: u64) -> JobId {
    JobId::derived(parent, index)
}

type BoxIter<O> = Box<dyn Iterator<Item = anyhow::Result<O>> + Send>;
type BoxStream<O> = Pin<Box<dyn Stream<Item = anyhow::Result<O>> + Send>>;

/// The children of one item: none (filtered), some in memory, or drawn
/// lazily from an iterator or a stream.
///
/// A child that is an `Err` fails alone (as a child item, with its derived
/// id); its siblings go on. A panic while drawing a child fails the rest of
/// the split: the children drawn before it go on, and the parent ends
/// `Panicked`.
pub struct Children<O>(pub(crate) Draw<O>);

/// How the children are drawn.
pub(crate) enum Draw<O> {
    /// In memory already: drawn on the splitter's task.
    Ready(std::vec::IntoIter<anyhow::Result<O>>),
    /// A blocking iterator: drawn on a blocking thread, a chunk at a time.
    Iter(BoxIter<O>),
    /// A stream: polled on a task, a chunk at a time.
    Stream(BoxStream<O>),
    /// A batch's outcomes: each item keeps its own id and metadata (they
    /// are not derived, and not counted in the split's budget).
    Members(std::vec::IntoIter<Member<O>>),
}

/// A batch member's id, metadata and outcome.
pub(crate) type Member<O> = (JobId, WorkItemMetadata, anyhow::Result<O>);

impl<O: Send + 'static> Children<O> {
    /// No children: the item is filtered (a success).
    pub fn none() -> Self {
        Children(Draw::Ready(Vec::new().into_iter()))
    }

    /// Exactly one child.
    pub fn one(child: O) -> Self {
        Children(Draw::Ready(vec![Ok(child)].into_iter()))
    }

    /// Children already in memory, some of them failed (each `Err` fails
    /// alone).
    pub fn from_results(children: Vec<anyhow::Result<O>>) -> Self {
        Children(Draw::Ready(children.into_iter()))
    }

    /// Children drawn from an iterator as the next stage has room for them.
    /// It may block (reading a file): it is drawn on a blocking thread, up
    /// to a chunk of children at a time.
    pub fn iter(children: impl Iterator<Item = O> + Send + 'static) -> Self {
        Children(Draw::Iter(Box::new(children.map(Ok))))
    }

    /// Like [`iter`](Self::iter), with children that may fail (each `Err`
    /// fails alone, as its own child).
    pub fn try_iter(children: impl Iterator<Item = anyhow::Result<O>> + Send + 'static) -> Self {
        Children(Draw::Iter(Box::new(children)))
    }

    /// Children drawn from a stream as the next stage has room for them
    /// (each `Err` fails alone).
    pub fn stream(children: impl Stream<Item = anyhow::Result<O>> + Send + 'static) -> Self {
        Children(Draw::Stream(Box::pin(children)))
    }

    /// True for [`Children::none`] (and empty vectors): known to be filtered
    /// before drawing. An iterator or a stream is not known to be empty.
    pub fn is_empty(&self) -> bool {
        match &self.0 {
            Draw::Ready(v) => v.len() == 0,
            Draw::Members(v) => v.len() == 0,
            Draw::Iter(_) | Draw::Stream(_) => false,
        }
    }
}

impl<O> From<Vec<O>> for Children<O> {
    fn from(children: Vec<O>) -> Self {
        Children(Draw::Ready(
            children.into_iter().map(Ok).collect::<Vec<_>>().into_iter(),
        ))
    }
}

impl<O> fmt::Debug for Children<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Draw::Ready(v) => write!(f, "Children({} in memory)", v.len()),
            Draw::Iter(_) => f.write_str("Children(iterator)"),
            Draw::Stream(_) => f.write_str("Children(stream)"),
            Draw::Members(v) => write!(f, "Children({} batch outcomes)", v.len()),
        }
    }
}

/// What a splitting stage may output: [`Children<O>`], or a `Vec<O>` (what
/// a `Process` stage returns, its children crossing as serde data).
pub trait IntoChildren: Send + 'static {
    /// The children's type.
    type Child: Send + 'static;
    /// The children, to draw.
    fn into_children(self) -> Children<Self::Child>;
}

impl<O: Send + 'static> IntoChildren for Children<O> {
    type Child = O;
    fn into_children(self) -> Children<O> {
        self
    }
}

impl<O: Send + 'static> IntoChildren for Vec<O> {
    type Child = O;
    fn into_children(self) -> Children<O> {
        Children::from(self)
    }
}

/// A batch of items, for a batch stage's handler (see
/// [`PipelineBuilder::async_batch_stage`](crate::PipelineBuilder::async_batch_stage)):
/// at most `batch_size` items, all of one key when the stage batches by
/// key. The handler returns one outcome per item, in order.
#[derive(Debug, Clone)]
pub struct Batch<I> {
    pub(crate) items: Vec<WorkItem<I>>,
    pub(crate) key: Option<u64>,
}

impl<I> Batch<I> {
    /// The items, in the order they arrived.
    pub fn items(&self) -> &[WorkItem<I>] {
        &self.items
    }

    /// The items, to take their data.
    pub fn into_items(self) -> Vec<WorkItem<I>> {
        self.items
    }

    /// How many items it holds.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Never true for a batch a handler is given.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The hash of its items' key, when the stage batches by key
    /// ([`PipelineBuilder::batch_by`](crate::PipelineBuilder::batch_by)).
    pub fn key(&self) -> Option<u64> {
        self.key
    }

    /// Each item's id and metadata, kept while the handler runs.
    pub(crate) fn members(&self) -> Vec<(JobId, WorkItemMetadata)> {
        self.items
            .iter()
            .map(|i| (i.job_id().clone(), i.metadata().clone()))
            .collect()
    }
}

/// What a batch stage's handler returned, paired with its items: split
/// back into the items by the splitter after the stage.
pub(crate) struct Unbatched<O>(pub(crate) Vec<Member<O>>);

impl<O: Send + 'static> IntoChildren for Unbatched<O> {
    type Child = O;
    fn into_children(self) -> Children<O> {
        Children(Draw::Members(self.0.into_iter()))
    }
}
