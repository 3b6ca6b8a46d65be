//! Per-worker resources: a state (a database connection, an HTTP client)
//! built once per worker of a stage and handed to its handler with each
//! item (see [`PipelineBuilder::async_stage_with`](crate::PipelineBuilder::async_stage_with)).
//!
//! A stage keeps its resources in a pool: a handler takes one as it
//! starts (building one when none is idle) and gives it back when it is
//! done. At most `workers` handlers of a stage run at once, so at most
//! `workers` resources exist (after a shrink, the extra ones stay idle
//! until the stage ends). A handler that panics while holding one drops it
//! with its worker: the replacement worker builds a fresh one. A
//! constructor that fails fails its worker as a panic does: the item it was
//! about to run fails `Panicked` with the stage and the constructor's
//! error, the worker is replaced, and the replacement counts against the
//! stage's restart budget (a resource that can never be built trips it).
//! Resources are dropped when the stage ends.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

/// A stage's idle resources.
pub(crate) struct ResourcePool<R> {
    stage: String,
    idle: Mutex<Vec<R>>,
}

impl<R> ResourcePool<R> {
    pub(crate) fn new(stage: &str) -> Arc<Self> {
        Arc::new(ResourcePool {
            stage: stage.to_string(),
            idle: Mutex::new(Vec::new()),
        })
    }

    /// An idle resource, if there is one.
    pub(crate) fn take(self: &Arc<Self>) -> Option<Held<R>> {
        let value = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
        Some(self.hold(value))
    }

    /// A newly built resource, held.
    pub(crate) fn hold(self: &Arc<Self>, value: R) -> Held<R> {
        Held {
            value: Some(value),
            pool: self.clone(),
        }
    }

    /// The constructor failed: fail the worker (see the module docs).
    pub(crate) fn failed(&self, error: anyhow::Error) -> ! {
        panic!(
            "stage `{}`: its per-worker resource could not be built: {error:#}",
            self.stage
        )
    }
}

/// A worker's resource while its handler runs: derefs to the resource;
/// given back to the stage's pool when dropped (unless dropped by a panic,
/// which drops the resource with it).
pub struct Held<R> {
    value: Option<R>,
    pool: Arc<ResourcePool<R>>,
}

impl<R> Deref for Held<R> {
    type Target = R;
    fn deref(&self) -> &R {
        self.value.as_ref().expect("held until dropped")
    }
}

impl<R> DerefMut for Held<R> {
    fn deref_mut(&mut self) -> &mut R {
        self.value.as_mut().expect("held until dropped")
    }
}

impl<R> Drop for Held<R> {
    fn drop(&mut self) {
        let Some(value) = self.value.take() else {
            return;
        };
        if std::thread::panicking() {
            // Its handler panicked: the resource may be broken.
            crate::contain::drop_logged(value, || {
                format!(
                    "a resource of stage `{}` dropped after a panic",
                    self.pool.stage
                )
            });
            return;
        }
        self.pool
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(value);
    }
}

impl<R> std::fmt::Debug for Held<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("stage", &self.pool.stage)
            .finish()
    }
}
