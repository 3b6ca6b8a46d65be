//! Stage handlers with their types erased, so that one stage actor serves
//! every stage of a typed pipeline.
//!
//! The typed builder in `bergtalzug` checks at compile time that each stage's
//! input type is the previous stage's output type; here the data travels as a
//! [`Payload`] and each handler unwraps its input and wraps its output. The
//! unwrap cannot fail for a pipeline the builder made.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::item::WorkItem;

/// An item's data with its type erased.
pub type Payload = Box<dyn Any + Send>;

/// The future an erased async handler returns.
pub type PayloadFuture = Pin<Box<dyn Future<Output = anyhow::Result<WorkItem<Payload>>> + Send>>;

type AsyncFn = dyn Fn(WorkItem<Payload>) -> PayloadFuture + Send + Sync;
type SyncFn = dyn Fn(WorkItem<Payload>) -> anyhow::Result<WorkItem<Payload>> + Send + Sync;

/// A stage's handler, type-erased: what a worker calls for each item.
#[derive(Clone)]
pub enum StageHandler {
    /// Awaited on the tokio runtime (`Async` stages).
    Async(Arc<AsyncFn>),
    /// Called on a blocking or rayon thread (`Thread` and `Cpu` stages).
    Sync(Arc<SyncFn>),
}

impl std::fmt::Debug for StageHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StageHandler::Async(_) => "StageHandler::Async",
            StageHandler::Sync(_) => "StageHandler::Sync",
        })
    }
}

impl StageHandler {
    /// Erases an `async fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>>`.
    pub fn from_async<I, O, F, Fut>(f: F) -> Self
    where
        I: Send + 'static,
        O: Send + 'static,
        F: Fn(WorkItem<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<WorkItem<O>>> + Send + 'static,
    {
        StageHandler::Async(Arc::new(move |item: WorkItem<Payload>| {
            let fut = f(unerase::<I>(item));
            Box::pin(async move { fut.await.map(erase) }) as PayloadFuture
        }))
    }

    /// Erases a `fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>>`.
    pub fn from_sync<I, O, F>(f: F) -> Self
    where
        I: Send + 'static,
        O: Send + 'static,
        F: Fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>> + Send + Sync + 'static,
    {
        StageHandler::Sync(Arc::new(move |item: WorkItem<Payload>| {
            f(unerase::<I>(item)).map(erase)
        }))
    }

    /// True for handlers built with [`StageHandler::from_async`].
    pub fn is_async(&self) -> bool {
        matches!(self, StageHandler::Async(_))
    }
}

/// Wraps typed data as a [`Payload`].
pub fn erase<T: Send + 'static>(item: WorkItem<T>) -> WorkItem<Payload> {
    item.map(|d| Box::new(d) as Payload)
}

/// Unwraps a [`Payload`]; the typed builder guarantees the type.
fn unerase<T: 'static>(item: WorkItem<Payload>) -> WorkItem<T> {
    item.map(|d| match d.downcast::<T>() {
        Ok(d) => *d,
        Err(_) => panic!(
            "bergtalzug: a stage received data of the wrong type (expected {}); \
             this is a bug in the pipeline builder",
            std::any::type_name::<T>()
        ),
    })
}
