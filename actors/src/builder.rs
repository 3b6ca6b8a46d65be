//! The typed builder: the only way to pair a configuration with handlers.
//!
//! Handlers are bound in config order, each with the method that fits its
//! stage's execution type; each stage's input type is the previous stage's
//! output type, checked by the compiler:
//!
//! ```
//! use bergtalzug::prelude::*;
//!
//! async fn fetch(item: WorkItem<u32>) -> anyhow::Result<WorkItem<String>> {
//!     Ok(item.map(|n| format!("payload {n}")))
//! }
//!
//! fn measure(item: WorkItem<String>) -> anyhow::Result<WorkItem<usize>> {
//!     Ok(item.map(|s| s.len()))
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = PipelineConfig::new("demo", vec![
//!     StageConfig::new("fetch", ExecutionType::Async).workers(8),
//!     StageConfig::new("measure", ExecutionType::Cpu).workers(2),
//! ]);
//! let pipeline = Pipeline::builder(config)?
//!     .source(sources::iter(0..100u32))
//!     .async_stage("fetch", fetch)
//!     .sync_stage("measure", measure)
//!     .build()?;
//! # let _ = pipeline;
//! # Ok(()) }
//! ```
//!
//! Binding a stage under the wrong name, with a handler kind its execution
//! type cannot run, twice, or leaving one unbound, is a [`BuildError`]
//! naming the stage; so is binding it out of order when the types still
//! fit (`OutOfOrder`):
//!
//! ```
//! use bergtalzug::prelude::*;
//!
//! let config = PipelineConfig::new("demo", vec![StageConfig::new("crunch", ExecutionType::Cpu)]);
//! let err = Pipeline::builder(config).unwrap()
//!     .source(sources::iter(0..10u32))
//!     .async_stage("crunch", |item: WorkItem<u32>| async move { Ok(item) })
//!     .build()
//!     .unwrap_err();
//! assert!(matches!(err, BuildError::WrongHandlerKind { ref stage, .. } if stage == "crunch"));
//! ```
//!
//! # What the compiler catches
//!
//! Some mistakes never compile, so they never reach [`build`](PipelineBuilder::build):
//!
//! - **A stage bound before the input.** Until `.source(..)` or
//!   `.injected::<T>()` is called there is no type for the first stage to
//!   take; the compiler says "a stage is bound before the pipeline's
//!   input":
//!
//!   ```compile_fail,E0277
//!   use bergtalzug::prelude::*;
//!
//!   async fn fetch(item: WorkItem<u32>) -> anyhow::Result<WorkItem<u32>> { Ok(item) }
//!
//!   let config = PipelineConfig::new("demo", vec![StageConfig::new("fetch", ExecutionType::Async)]);
//!   let pipeline = Pipeline::builder(config).unwrap()
//!       .async_stage("fetch", fetch)           // before .source(..)
//!       .source(sources::iter(0..10u32))
//!       .build();
//!   ```
//!
//! - **Handlers out of order whose types differ.** Each stage takes what the
//!   one before it gives, so a handler bound at the wrong place usually takes
//!   the wrong type: `error[E0631]: type mismatch in function arguments`,
//!   with `expected function signature fn(WorkItem<A>)` (what the stage at
//!   this place is given) and `found fn(WorkItem<B>)` (what the handler
//!   takes). Compare the order of the calls with the config's; the
//!   compiler's suggestion to wrap the function in a closure does not apply.
//!
//!   ```compile_fail,E0631
//!   use bergtalzug::prelude::*;
//!
//!   async fn fetch(item: WorkItem<u32>) -> anyhow::Result<WorkItem<String>> {
//!       Ok(item.map(|n| n.to_string()))
//!   }
//!   fn parse(item: WorkItem<String>) -> anyhow::Result<WorkItem<usize>> {
//!       Ok(item.map(|s| s.len()))
//!   }
//!
//!   let config = PipelineConfig::new("demo", vec![
//!       StageConfig::new("fetch", ExecutionType::Async),
//!       StageConfig::new("parse", ExecutionType::Thread),
//!   ]);
//!   let pipeline = Pipeline::builder(config).unwrap()
//!       .source(sources::iter(0..10u32))
//!       .sync_stage("parse", parse)            // parse takes String, the source gives u32
//!       .async_stage("fetch", fetch)
//!       .build();
//!   ```
//!
//! - **A retrying stage whose input is not `Clone`**: the `retrying_*`
//!   methods require it.
//!
//! # Retrying stages
//!
//! Another attempt needs the input again, so a stage whose config has a
//! [`RetryPolicy`](crate::config::RetryPolicy) is bound with
//! [`retrying_async_stage`](PipelineBuilder::retrying_async_stage) or
//! [`retrying_sync_stage`](PipelineBuilder::retrying_sync_stage), which
//! require its input type to be `Clone` and keep a copy of each input while
//! an attempt runs. Other stages need no `Clone`. Binding a retrying stage
//! with the plain method is a [`BuildError::RetryNeedsCopy`], and binding a
//! stage whose config has no `retry` policy with a `retrying_*` method is a
//! [`BuildError::RetryWithoutPolicy`] (it would copy every input for
//! nothing; a policy of `max_attempts = 1`, "never retry", is accepted):
//!
//! ```
//! use std::time::Duration;
//! use bergtalzug::prelude::*;
//!
//! async fn store(item: WorkItem<String>) -> anyhow::Result<WorkItem<String>> {
//!     Ok(item)
//! }
//!
//! let config = PipelineConfig::new("demo", vec![
//!     StageConfig::new("store", ExecutionType::Async)
//!         .retry(RetryPolicy::exponential(3, Duration::from_millis(50))),
//! ]);
//! let source = || sources::iter(["a".to_string()]);
//! let err = Pipeline::builder(config.clone()).unwrap()
//!     .source(source())
//!     .async_stage("store", store)
//!     .build()
//!     .unwrap_err();
//! assert!(matches!(err, BuildError::RetryNeedsCopy { ref stage, .. } if stage == "store"));
//!
//! let pipeline = Pipeline::builder(config).unwrap()
//!     .source(source())
//!     .retrying_async_stage("store", store)
//!     .build();
//! assert!(pipeline.is_ok());
//!
//! let no_policy = PipelineConfig::new("demo", vec![StageConfig::new("store", ExecutionType::Async)]);
//! let err = Pipeline::builder(no_policy).unwrap()
//!     .source(source())
//!     .retrying_async_stage("store", store)
//!     .build()
//!     .unwrap_err();
//! assert!(matches!(err, BuildError::RetryWithoutPolicy { ref stage, .. } if stage == "store"));
//! ```

use std::future::Future;
use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::batcher::{BatchKey, batch_key};
use crate::binding::StageBinding as Binding;
use crate::binding::{SourceBinding, StageBinding};
use crate::config::{ConfigError, ExecutionType, HandlerKind, PipelineConfig};
use crate::dead_letter::{DeadLetter, DeadLetterSink};
use crate::item::{WorkItem, WorkItemResult};
use crate::pipeline::Pipeline;
use crate::process::child::{Call, no_resource};
use crate::process::wire::{Batches, Items, Wire};
use crate::process::{self, ProcessOptions};
use crate::resource::{Held, ResourcePool};
use crate::root::PipelineParts;
use crate::shape::{Batch, IntoChildren, Unbatched};
use crate::source::Source;
use crate::stage::{Policies, key_fn};
use crate::tracker::Callback;

/// Why a builder could not make a pipeline. Every variant names the stage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A handler was bound to a name no stage has.
    #[error("no stage is called `{stage}` (stages: {known})")]
    UnknownStage {
        /// The name given.
        stage: String,
        /// The configured stage names, in order.
        known: String,
    },
    /// A handler was bound out of config order.
    #[error(
        "stage `{stage}` was bound where stage `{expected}` comes; bind handlers in config order"
    )]
    OutOfOrder {
        /// The name given.
        stage: String,
        /// The stage that comes at this position.
        expected: String,
    },
    /// A stage was bound twice.
    #[error("stage `{stage}` is bound twice")]
    BoundTwice {
        /// The stage.
        stage: String,
    },
    /// The handler kind does not fit the stage's execution type.
    #[error("stage `{stage}` is {execution_type}: {hint}")]
    WrongHandlerKind {
        /// The stage.
        stage: String,
        /// Its configured execution type.
        execution_type: ExecutionType,
        /// Which builder method fits it.
        hint: String,
    },
    /// A configured stage has no handler.
    #[error("stage `{stage}` has no handler; bind one with the builder")]
    MissingStage {
        /// The stage.
        stage: String,
    },
    /// A stage with a retry policy was bound with a method that keeps no
    /// copy of its input, so it could not try an item again.
    #[error(
        "stage `{stage}` retries (up to {max_attempts} attempts) and needs a copy of each input: bind it with .{method} (its input type must be Clone)"
    )]
    RetryNeedsCopy {
        /// The stage.
        stage: String,
        /// Its policy's `max_attempts`.
        max_attempts: u32,
        /// The builder method that fits it.
        method: &'static str,
    },
    /// A stage was bound with a `retrying_*` method, but its config has
    /// no `retry` policy, so the copy kept of each input would never be used.
    #[error(
        "stage `{stage}` is bound with .{method} but its config has no `retry` policy: add one, or bind it with .{plain}"
    )]
    RetryWithoutPolicy {
        /// The stage.
        stage: String,
        /// The `retrying_*` method it was bound with.
        method: &'static str,
        /// The method that fits a stage that does not retry.
        plain: &'static str,
    },
    /// `keyed_by` or `cost_by` named a stage other than the next one to
    /// bind: they are called just before the stage's handler is bound.
    #[error(
        "`.{method}(\"{stage}\", ..)` must come just before stage `{stage}` is bound (the next stage to bind is {expected})"
    )]
    PolicyOutOfPlace {
        /// The stage named.
        stage: String,
        /// `keyed_by` or `cost_by`.
        method: &'static str,
        /// The next stage to bind, or `none`.
        expected: String,
    },
    /// `.split()` was called before any stage was bound: it splits the
    /// output of the stage bound just before it.
    #[error(
        "pipeline `{pipeline}`: .split() comes right after the stage whose output it splits (no stage is bound yet)"
    )]
    SplitWithoutStage {
        /// The pipeline.
        pipeline: String,
    },
    /// `keyed_by`, `cost_by` or `batch_by` was called between a stage and
    /// the `.split()` of its output: it would see the unsplit items, and the
    /// split makes items of another type, so it cannot apply to the stage
    /// after.
    #[error(
        "`.{method}(\"{stage}\", ..)` comes before `.split()`, over the items being split: call it after `.split()`, just before stage `{stage}` is bound"
    )]
    PolicyBeforeSplit {
        /// The stage named (the one after the split).
        stage: String,
        /// `keyed_by`, `cost_by` or `batch_by`.
        method: &'static str,
    },
    /// A stage whose config has a `batch_size` was bound with a method that
    /// takes one item at a time, or a stage without one with a batch method.
    #[error("stage `{stage}`: {hint}")]
    BatchMismatch {
        /// The stage.
        stage: String,
        /// What fits it.
        hint: String,
    },
    /// Neither `.source(..)` nor `.injected::<T>()` was called.
    #[error("pipeline `{pipeline}` has no input: call .source(..) or .injected::<T>()")]
    MissingSource {
        /// The pipeline.
        pipeline: String,
    },
}

/// The input type of a builder that has no input yet.
#[derive(Debug)]
pub enum NoInput {}

/// The state of a builder that has no input yet: call `.source(..)` or
/// `.injected::<T>()` before binding stages.
#[derive(Debug)]
pub enum NeedsInput {}

/// The state of a builder that has its input: stages can be bound.
#[derive(Debug)]
pub enum HasInput {}

/// What a builder must be to bind stages: one that has its input. Only
/// `PipelineBuilder<_, _, HasInput>` is; the compiler names this trait
/// when a stage is bound before `.source(..)`.
#[diagnostic::on_unimplemented(
    message = "a stage is bound before the pipeline's input",
    label = "no `.source(..)` or `.injected::<T>()` before this stage",
    note = "call `.source(..)` or `.injected::<T>()` first: the first stage takes the input's items, each further stage the previous stage's output"
)]
pub trait InputGiven: sealed::Sealed {}

impl<T, C> InputGiven for PipelineBuilder<T, C, HasInput> {}

mod sealed {
    pub trait Sealed {}
    impl<T, C, S> Sealed for super::PipelineBuilder<T, C, S> {}
}

/// Pairs a configuration with a source and one handler per stage.
///
/// `T` is the pipeline's input type (the source's items), `C` the output
/// type of the last stage bound so far, and `S` whether the input was given
/// yet ([`NeedsInput`] from [`Pipeline::builder`], [`HasInput`] after
/// `.source(..)` or `.injected::<T>()`): stages are bound only after it.
#[must_use = "a builder does nothing until .build()"]
pub struct PipelineBuilder<T, C, S = HasInput> {
    config: PipelineConfig,
    source: Option<SourceBinding<T>>,
    handlers: Vec<StageBinding>,
    callbacks: Vec<Callback>,
    dead_letters: Option<DeadLetterSink>,
    error: Option<BuildError>,
    /// The policies given for the next stage (`keyed_by`, `cost_by`).
    next: Policies<C>,
    /// The batch key given for the next stage (`batch_by`).
    batch_key: Option<BatchKey<C>>,
    _types: PhantomData<fn(T, S) -> C>,
}

impl<T, C, S> std::fmt::Debug for PipelineBuilder<T, C, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bound: Vec<&str> = self
            .config
            .stages
            .iter()
            .take(self.handlers.len())
            .map(|s| s.name.as_str())
            .collect();
        f.debug_struct("PipelineBuilder")
            .field("pipeline", &self.config.pipeline_name)
            .field("input", &self.source)
            .field("bound", &bound)
            .field("callbacks", &self.callbacks.len())
            .field("dead_letters", &self.dead_letters)
            .field("error", &self.error)
            .finish()
    }
}

impl Pipeline<NoInput> {
    /// Starts building a pipeline; the config is validated here.
    pub fn builder(
        config: PipelineConfig,
    ) -> Result<PipelineBuilder<NoInput, NoInput, NeedsInput>, ConfigError> {
        config.validate()?;
        Ok(PipelineBuilder {
            config,
            source: None,
            handlers: Vec::new(),
            callbacks: Vec::new(),
            dead_letters: None,
            error: None,
            next: Policies::default(),
            batch_key: None,
            _types: PhantomData,
        })
    }
}

impl<C> PipelineBuilder<NoInput, C, NeedsInput> {
    /// Feeds the pipeline from `source`; its items are the first stage's input.
    pub fn source<S: Source>(self, source: S) -> PipelineBuilder<S::Item, S::Item> {
        self.input(SourceBinding::from_source(source))
    }

    /// Feeds the pipeline only by [`Pipeline::inject`]: it runs until stopped,
    /// or until its last handle is dropped (then nothing could inject into
    /// it or stop it, and it stops gracefully: what it admitted finishes).
    /// Embedded with [`Pipeline::spawn_linked`], it runs until stopped
    /// through its root, handles or not.
    pub fn injected<T: Send + 'static>(self) -> PipelineBuilder<T, T> {
        self.input(SourceBinding::injected())
    }

    fn input<T: Send + 'static>(self, source: SourceBinding<T>) -> PipelineBuilder<T, T> {
        PipelineBuilder {
            config: self.config,
            source: Some(source),
            handlers: self.handlers,
            callbacks: self.callbacks,
            dead_letters: self.dead_letters,
            error: self.error,
            next: Policies::default(),
            batch_key: None,
            _types: PhantomData,
        }
    }

    /// Always [`BuildError::MissingSource`]: a pipeline needs an input.
    pub fn build(self) -> Result<Pipeline<NoInput>, BuildError> {
        Err(BuildError::MissingSource {
            pipeline: self.config.pipeline_name.clone(),
        })
    }
}

/// The stage methods of a builder with no input yet: they only make the
/// compiler say so (see [`InputGiven`]), in one error, rather than a type
/// mismatch against [`NoInput`] and a missing `.source` method after it.
#[doc(hidden)]
impl<C> PipelineBuilder<NoInput, C, NeedsInput> {
    pub fn async_stage<I, F, Fut>(self, _name: &str, _handler: F) -> Self
    where
        Self: InputGiven,
        F: Fn(WorkItem<I>) -> Fut,
    {
        unreachable!("no builder without input implements InputGiven")
    }

    pub fn retrying_async_stage<I, F, Fut>(self, _name: &str, _handler: F) -> Self
    where
        Self: InputGiven,
        F: Fn(WorkItem<I>) -> Fut,
    {
        unreachable!("no builder without input implements InputGiven")
    }

    pub fn sync_stage<I, R, F>(self, _name: &str, _handler: F) -> Self
    where
        Self: InputGiven,
        F: Fn(WorkItem<I>) -> R,
    {
        unreachable!("no builder without input implements InputGiven")
    }

    pub fn retrying_sync_stage<I, R, F>(self, _name: &str, _handler: F) -> Self
    where
        Self: InputGiven,
        F: Fn(WorkItem<I>) -> R,
    {
        unreachable!("no builder without input implements InputGiven")
    }

    pub fn process_stage<I, O>(
        self,
        _name: &str,
        _handler: fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>>,
    ) -> Self
    where
        Self: InputGiven,
    {
        unreachable!("no builder without input implements InputGiven")
    }

    pub fn process_stage_with<I, O>(
        self,
        _name: &str,
        _handler: fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>>,
        _options: ProcessOptions,
    ) -> Self
    where
        Self: InputGiven,
    {
        unreachable!("no builder without input implements InputGiven")
    }
}

impl<T, C, S> PipelineBuilder<T, C, S> {
    /// Adds a completion callback: called exactly once per item, with its
    /// result, on the tracker's task (keep it quick). The tracker owns it,
    /// so it may keep state (`FnMut`: push failed ids into a `Vec`, count).
    /// A panic in it is logged and ignored.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use bergtalzug::prelude::*;
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let config = PipelineConfig::new("odd", vec![StageConfig::new("check", ExecutionType::Async)]);
    /// let failed = Arc::new(Mutex::new(Vec::new()));
    /// let mut seen = 0;
    /// let pipeline = Pipeline::builder(config)?
    ///     .on_complete({
    ///         let failed = failed.clone();
    ///         move |r: &WorkItemResult| {
    ///             seen += 1;
    ///             if !r.success {
    ///                 failed.lock().unwrap().push(r.job_id.clone());
    ///             }
    ///         }
    ///     })
    ///     .source(sources::iter(0..10u32))
    ///     .async_stage("check", |i: WorkItem<u32>| async move {
    ///         anyhow::ensure!(i.data % 2 == 0, "odd");
    ///         Ok(i)
    ///     })
    ///     .build()?;
    /// pipeline.run().await?;
    /// assert_eq!(failed.lock().unwrap().len(), 5);
    /// # Ok(()) }
    /// ```
    pub fn on_complete(mut self, callback: impl FnMut(&WorkItemResult) + Send + 'static) -> Self {
        self.callbacks.push(Box::new(callback));
        self
    }

    /// Sends every item that ends without success (failed, timed out,
    /// cancelled, refused) to `callback`, on the tracker's task, as a
    /// [`DeadLetter`]: its id, error, attempts, lineage and, from stages
    /// bound to retry, its last input. Like [`on_complete`](Self::on_complete),
    /// it is owned by the tracker and may keep state (`FnMut`). A panic in it
    /// is logged.
    pub fn on_dead_letter(mut self, callback: impl FnMut(DeadLetter) + Send + 'static) -> Self {
        self.dead_letters = Some(DeadLetterSink::Callback(Box::new(callback)));
        self
    }

    /// Sends every item that ends without success into `sender` as a
    /// [`DeadLetter`]. The channel is bounded: while it is full the
    /// pipeline waits for its receiver (with a warning after a second, and
    /// `PipelineStats::held_back_by`), so read it while the pipeline runs.
    /// `abort` and `stop_within`'s deadline do not wait for it: the letters
    /// left are then forwarded by a task as the receiver reads.
    pub fn dead_letters(mut self, sender: tokio::sync::mpsc::Sender<DeadLetter>) -> Self {
        self.dead_letters = Some(DeadLetterSink::Channel(sender));
        self
    }
}

impl<T: Send + 'static, C: Send + 'static> PipelineBuilder<T, C> {
    /// Gives the next stage (`name`, bound right after this call) key
    /// lanes: items with the same `key` never run at the same time and
    /// leave the stage in their input order, while items of different keys
    /// run in parallel (as Broadway's `partition_by`, Akka's
    /// `mapAsyncPartitioned`). A retry keeps its key's lane: later items of
    /// that key wait until it is done or has failed for good. Keys are
    /// compared by a 64-bit hash (two that collide share a lane: less
    /// parallelism, never two of one key at once). See
    /// `docs/flow-policies.md`.
    ///
    /// ```
    /// use bergtalzug::prelude::*;
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // (customer, amount): each customer's records are applied in order.
    /// let config = PipelineConfig::new("ledger", vec![
    ///     StageConfig::new("apply", ExecutionType::Async).workers(8),
    /// ]);
    /// let records = (0..100u32).map(|n| (n % 4, n));
    /// let results = Pipeline::builder(config)?
    ///     .source(sources::iter(records))
    ///     .keyed_by("apply", |item: &WorkItem<(u32, u32)>| item.data.0)
    ///     .async_stage("apply", |item: WorkItem<(u32, u32)>| async move { Ok(item) })
    ///     .build()?
    ///     .run()
    ///     .await?;
    /// assert_eq!(results.len(), 100);
    /// # Ok(()) }
    /// ```
    pub fn keyed_by<K: std::hash::Hash>(
        mut self,
        name: &str,
        key: impl Fn(&WorkItem<C>) -> K + Send + Sync + 'static,
    ) -> Self {
        if self.policy_in_place(name, "keyed_by") {
            self.next.key = Some(key_fn(key));
        }
        self
    }

    /// Gives the items of the next stage (`name`, bound right after this
    /// call) a cost in units of its rate limit (1 by default): an item
    /// costing 5 uses 5 of the `allowed` units per interval (an item that
    /// costs more than the burst is charged the burst; 0 is free). See
    /// [`RateLimit`](crate::config::RateLimit).
    pub fn cost_by(
        mut self,
        name: &str,
        cost: impl Fn(&WorkItem<C>) -> u32 + Send + Sync + 'static,
    ) -> Self {
        if self.policy_in_place(name, "cost_by") {
            self.next.cost = Some(std::sync::Arc::new(cost));
        }
        self
    }

    /// Whether `name` is the next stage to bind; records the error if not.
    fn policy_in_place(&mut self, name: &str, method: &'static str) -> bool {
        if self.error.is_some() {
            return false;
        }
        let next = self.config.stages.get(self.handlers.len());
        if next.is_some_and(|s| s.name == name) {
            return true;
        }
        self.error = Some(BuildError::PolicyOutOfPlace {
            stage: name.to_string(),
            method,
            expected: next.map_or("none".to_string(), |s| format!("`{}`", s.name)),
        });
        false
    }

    /// Binds the handler of the next stage, an `Async` one.
    pub fn async_stage<O, F, Fut>(mut self, name: &str, handler: F) -> PipelineBuilder<T, O>
    where
        O: Send + 'static,
        F: Fn(WorkItem<C>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<WorkItem<O>>> + Send + 'static,
    {
        self.check(name, HandlerKind::Async);
        let policies = std::mem::take(&mut self.next);
        self.handlers
            .push(StageBinding::asynchronous(handler, policies));
        self.retype()
    }

    /// Binds the handler of the next stage, an `Async` one that retries
    /// failed items under its config's `retry` policy: a copy of each input
    /// is kept while an attempt runs (and goes into the dead letter when
    /// the last attempt fails).
    pub fn retrying_async_stage<O, F, Fut>(
        mut self,
        name: &str,
        handler: F,
    ) -> PipelineBuilder<T, O>
    where
        C: Clone,
        O: Send + 'static,
        F: Fn(WorkItem<C>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<WorkItem<O>>> + Send + 'static,
    {
        self.check(name, HandlerKind::Async);
        let policies = std::mem::take(&mut self.next);
        self.handlers
            .push(StageBinding::asynchronous_retrying(handler, policies));
        self.retype()
    }

    /// Binds the handler of the next stage, an `Async` one, with a
    /// resource per worker: `init` builds it (a connection, a client) the
    /// first time a worker needs one, and the handler gets it, [`Held`],
    /// with each item; it goes back to the stage when the handler's
    /// future is done, for the next item. A failing `init` fails the item
    /// `Panicked` with the stage and its error and replaces the worker,
    /// counted against the stage's restart budget. See [`crate::resource`].
    ///
    /// ```
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use std::sync::Arc;
    /// use bergtalzug::prelude::*;
    /// use bergtalzug::resource::Held;
    ///
    /// struct Connection { queries: u64 }
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let opened = Arc::new(AtomicUsize::new(0));
    /// let config = PipelineConfig::new("store", vec![
    ///     StageConfig::new("insert", ExecutionType::Async).workers(3),
    /// ]);
    /// let o = opened.clone();
    /// let results = Pipeline::builder(config)?
    ///     .source(sources::iter(0..100u32))
    ///     .async_stage_with(
    ///         "insert",
    ///         move || {
    ///             o.fetch_add(1, Ordering::SeqCst);
    ///             async { Ok(Connection { queries: 0 }) }
    ///         },
    ///         |item: WorkItem<u32>, mut db: Held<Connection>| async move {
    ///             db.queries += 1;
    ///             Ok(item)
    ///         },
    ///     )
    ///     .build()?
    ///     .run()
    ///     .await?;
    /// assert_eq!(results.len(), 100);
    /// assert!(opened.load(Ordering::SeqCst) <= 3, "one connection per worker at most");
    /// # Ok(()) }
    /// ```
    pub fn async_stage_with<R, O, Init, InitFut, F, Fut>(
        self,
        name: &str,
        init: Init,
        handler: F,
    ) -> PipelineBuilder<T, O>
    where
        R: Send + 'static,
        O: Send + 'static,
        Init: Fn() -> InitFut + Send + Sync + 'static,
        InitFut: Future<Output = anyhow::Result<R>> + Send + 'static,
        F: Fn(WorkItem<C>, Held<R>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<WorkItem<O>>> + Send + 'static,
    {
        let pool = ResourcePool::new(name);
        let init = std::sync::Arc::new(init);
        let handler = std::sync::Arc::new(handler);
        self.async_stage(name, move |item: WorkItem<C>| {
            let (pool, init, handler) = (pool.clone(), init.clone(), handler.clone());
            async move {
                let held = match pool.take() {
                    Some(held) => held,
                    None => match init().await {
                        Ok(value) => pool.hold(value),
                        Err(e) => pool.failed(e),
                    },
                };
                handler(item, held).await
            }
        })
    }

    /// Binds the handler of the next stage, a `Thread` or `Cpu` one, with
    /// a resource per worker built by a blocking `init` (see
    /// [`async_stage_with`](Self::async_stage_with)); the handler gets it
    /// as `&mut R` with each item.
    pub fn sync_stage_with<R, O, Init, F>(
        self,
        name: &str,
        init: Init,
        handler: F,
    ) -> PipelineBuilder<T, O>
    where
        R: Send + 'static,
        O: Send + 'static,
        Init: Fn() -> anyhow::Result<R> + Send + Sync + 'static,
        F: Fn(&mut R, WorkItem<C>) -> anyhow::Result<WorkItem<O>> + Send + Sync + 'static,
    {
        let pool = ResourcePool::new(name);
        self.sync_stage(name, move |item: WorkItem<C>| {
            let mut held = match pool.take() {
                Some(held) => held,
                None => match init() {
                    Ok(value) => pool.hold(value),
                    Err(e) => pool.failed(e),
                },
            };
            handler(&mut held, item)
        })
    }

    /// Binds the handler of the next stage, a `Thread` or `Cpu` one.
    pub fn sync_stage<O, F>(mut self, name: &str, handler: F) -> PipelineBuilder<T, O>
    where
        O: Send + 'static,
        F: Fn(WorkItem<C>) -> anyhow::Result<WorkItem<O>> + Send + Sync + 'static,
    {
        self.check(name, HandlerKind::Blocking);
        let policies = std::mem::take(&mut self.next);
        self.handlers
            .push(StageBinding::blocking(handler, policies));
        self.retype()
    }

    /// Binds the handler of the next stage, a `Thread` or `Cpu` one that
    /// retries failed items under its config's `retry` policy: a copy of
    /// each input is kept while an attempt runs (and goes into the dead
    /// letter when the last attempt fails).
    pub fn retrying_sync_stage<O, F>(mut self, name: &str, handler: F) -> PipelineBuilder<T, O>
    where
        C: Clone,
        O: Send + 'static,
        F: Fn(WorkItem<C>) -> anyhow::Result<WorkItem<O>> + Send + Sync + 'static,
    {
        self.check(name, HandlerKind::Blocking);
        let policies = std::mem::take(&mut self.next);
        self.handlers
            .push(StageBinding::blocking_retrying(handler, policies));
        self.retype()
    }

    /// Binds the handler of the next stage, a `Process` one: a plain `fn`
    /// over serde data, run in worker processes started from this very
    /// program (see [`crate::process`]; call [`crate::process::init`] first
    /// in `main`). A crash, abort or timeout in a worker fails only the item
    /// it was running. A stage with a `retry` policy needs no other method
    /// and no `Clone`: an input is recovered from the bytes sent to the
    /// worker when an attempt fails.
    ///
    /// ```no_run
    /// use bergtalzug::prelude::*;
    ///
    /// fn risky(item: WorkItem<u64>) -> anyhow::Result<WorkItem<u64>> {
    ///     if item.data == 13 {
    ///         std::process::abort(); // only this item fails
    ///     }
    ///     Ok(item.map(|n| n * 2))
    /// }
    ///
    /// # #[allow(clippy::needless_doctest_main)]
    /// #[tokio::main]
    /// async fn main() -> Result<(), Box<dyn std::error::Error>> {
    ///     bergtalzug::process::init(); // first: a worker process never returns from it
    ///     let config = PipelineConfig::new("isolated", vec![
    ///         StageConfig::new("risky", ExecutionType::Process).workers(2),
    ///     ]);
    ///     let results = Pipeline::builder(config)?
    ///         .source(sources::iter(0..100u64))
    ///         .process_stage("risky", risky)
    ///         .build()?
    ///         .run()
    ///         .await?;
    ///     assert_eq!(results.iter().filter(|r| !r.success).count(), 1);
    ///     Ok(())
    /// }
    /// ```
    pub fn process_stage<O>(
        self,
        name: &str,
        handler: fn(WorkItem<C>) -> anyhow::Result<WorkItem<O>>,
    ) -> PipelineBuilder<T, O>
    where
        C: Serialize + DeserializeOwned,
        O: Serialize + DeserializeOwned + Send + 'static,
    {
        self.process_stage_with(name, handler, ProcessOptions::default())
    }

    /// [`Self::process_stage`] with options: the worker command, extra
    /// environment (or a clean one), output read into `tracing`, recycling
    /// after N items, the frame limit.
    pub fn process_stage_with<O>(
        mut self,
        name: &str,
        handler: fn(WorkItem<C>) -> anyhow::Result<WorkItem<O>>,
        options: ProcessOptions,
    ) -> PipelineBuilder<T, O>
    where
        C: Serialize + DeserializeOwned,
        O: Serialize + DeserializeOwned + Send + 'static,
    {
        let policies = std::mem::take(&mut self.next);
        let binding = self.process_binding::<C, O, Items, (), _>(
            name,
            no_resource,
            handler,
            options,
            policies,
        );
        self.handlers.push(binding);
        self.retype()
    }

    /// Binds the handler of the next stage, a `Process` one, with a
    /// resource per worker process: `init` builds it (a connection, a
    /// model, a DuckDB instance) once, when the worker process starts, in
    /// that process, and the handler gets it as `&mut R` with each item, as
    /// with [`sync_stage_with`](Self::sync_stage_with). The resource never
    /// leaves the worker process, so `R` need not be `Send` or
    /// `Serialize`. It is dropped when the worker process ends normally:
    /// when the stage is done with it, at the end of the run, or when it is
    /// recycled ([`ProcessOptions::recycle_after`]: the next process builds
    /// a fresh one). A process killed (a crash, the stage's timeout, an
    /// abort) does not drop it.
    ///
    /// `init` runs before the worker process says it is ready, so it counts
    /// in [`ProcessOptions::start_timeout`] (10 s by default). A failing
    /// (or panicking) `init` is told to the parent, and the process exits:
    /// the item the worker was about to run fails `Panicked` with the stage
    /// and the constructor's error (`stage `db`: its per-worker resource
    /// could not be built: ...`), the rest go back to the stage's queue,
    /// and the worker is replaced, counted against the stage's
    /// [`restart_budget`](crate::config::StageConfig::restart_budget): a
    /// resource that can never be built fails the run with
    /// [`PipelineError::RestartBudgetExceeded`](crate::error::PipelineError::RestartBudgetExceeded).
    ///
    /// ```no_run
    /// use bergtalzug::prelude::*;
    /// use bergtalzug::process::ProcessOptions;
    ///
    /// /// Not `Send`, not `Serialize`: it lives in its worker process.
    /// struct Model { weights: std::rc::Rc<Vec<f64>> }
    ///
    /// fn load() -> anyhow::Result<Model> {
    ///     Ok(Model { weights: std::rc::Rc::new(vec![0.5; 1024]) })
    /// }
    ///
    /// fn score(model: &mut Model, item: WorkItem<Vec<f64>>) -> anyhow::Result<WorkItem<f64>> {
    ///     let w = model.weights.clone();
    ///     Ok(item.map(|x| x.iter().zip(w.iter()).map(|(a, b)| a * b).sum()))
    /// }
    ///
    /// # #[allow(clippy::needless_doctest_main)]
    /// #[tokio::main]
    /// async fn main() -> Result<(), Box<dyn std::error::Error>> {
    ///     bergtalzug::process::init(); // first: a worker process never returns from it
    ///     let config = PipelineConfig::new("score", vec![
    ///         StageConfig::new("score", ExecutionType::Process).workers(2),
    ///     ]);
    ///     let rows = (0..100).map(|i| vec![i as f64; 1024]);
    ///     let results = Pipeline::builder(config)?
    ///         .source(sources::iter(rows))
    ///         // One model per worker process, loaded once.
    ///         .process_stage_using("score", load, score, ProcessOptions::new())
    ///         .build()?
    ///         .run()
    ///         .await?;
    ///     assert_eq!(results.len(), 100);
    ///     Ok(())
    /// }
    /// ```
    pub fn process_stage_using<R, O>(
        mut self,
        name: &str,
        init: fn() -> anyhow::Result<R>,
        handler: fn(&mut R, WorkItem<C>) -> anyhow::Result<WorkItem<O>>,
        options: ProcessOptions,
    ) -> PipelineBuilder<T, O>
    where
        R: 'static,
        C: Serialize + DeserializeOwned,
        O: Serialize + DeserializeOwned + Send + 'static,
    {
        let policies = std::mem::take(&mut self.next);
        let binding =
            self.process_binding::<C, O, Items, R, _>(name, init, handler, options, policies);
        self.handlers.push(binding);
        self.retype()
    }

    /// Binds the handler of the next stage, a `Process` batch stage (its
    /// config has a [`batch_size`](crate::config::StageConfig::batch_size)):
    /// as [`sync_batch_stage`](Self::sync_batch_stage), run in a worker
    /// process. A batch crosses to the worker process as one frame and its
    /// outcomes come back as one (a batch of 500 records is one round
    /// trip); the items' ids and custom metadata cross with their data.
    /// The handler returns one outcome per item, in order: an `Err`
    /// outcome fails its item alone; an `Err` from the handler, a panic,
    /// the stage's timeout or the worker process dying (abort, segfault,
    /// killed) fails the whole batch attempt, each item with its own
    /// result (`its batch of N failed: ...`), and the stage goes on (a
    /// dead process is replaced). A stage with a `retry` policy tries a
    /// failed batch again whole, with no other method and no `Clone` (the
    /// batch is had again from the bytes sent). With
    /// [`batch_by`](Self::batch_by) before it, batches are per key.
    ///
    /// # Errors
    ///
    /// [`build`](Self::build) fails with [`BuildError::BatchMismatch`] when
    /// the stage has no `batch_size`.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use bergtalzug::prelude::*;
    /// use bergtalzug::shape::Batch;
    ///
    /// fn insert(batch: Batch<u32>) -> anyhow::Result<Vec<anyhow::Result<u32>>> {
    ///     // One statement for up to 100 rows; row 13 is refused alone.
    ///     Ok(batch.into_items().into_iter().map(|row| {
    ///         anyhow::ensure!(row.data != 13, "row 13 violates a constraint");
    ///         Ok(row.data)
    ///     }).collect())
    /// }
    ///
    /// # #[allow(clippy::needless_doctest_main)]
    /// #[tokio::main]
    /// async fn main() -> Result<(), Box<dyn std::error::Error>> {
    ///     bergtalzug::process::init(); // first: a worker process never returns from it
    ///     let config = PipelineConfig::new("load", vec![
    ///         StageConfig::new("insert", ExecutionType::Process)
    ///             .workers(2)
    ///             .batch(100, Duration::from_millis(50)),
    ///     ]);
    ///     let results = Pipeline::builder(config)?
    ///         .source(sources::iter(0..1000u32))
    ///         .process_batch_stage("insert", insert)
    ///         .build()?
    ///         .run()
    ///         .await?;
    ///     assert_eq!(results.len(), 1000);
    ///     assert_eq!(results.iter().filter(|r| !r.success).count(), 1);
    ///     Ok(())
    /// }
    /// ```
    pub fn process_batch_stage<O>(
        self,
        name: &str,
        handler: fn(Batch<C>) -> anyhow::Result<Vec<anyhow::Result<O>>>,
    ) -> PipelineBuilder<T, O>
    where
        C: Serialize + DeserializeOwned,
        O: Serialize + DeserializeOwned + Send + 'static,
    {
        self.process_batch_stage_with(name, handler, ProcessOptions::default())
    }

    /// [`process_batch_stage`](Self::process_batch_stage) with options (see
    /// [`process_stage_with`](Self::process_stage_with)).
    pub fn process_batch_stage_with<O>(
        mut self,
        name: &str,
        handler: fn(Batch<C>) -> anyhow::Result<Vec<anyhow::Result<O>>>,
        options: ProcessOptions,
    ) -> PipelineBuilder<T, O>
    where
        C: Serialize + DeserializeOwned,
        O: Serialize + DeserializeOwned + Send + 'static,
    {
        let binding = self.process_binding::<Batch<C>, Unbatched<O>, Batches, (), _>(
            name,
            no_resource,
            handler,
            options,
            Policies::default(),
        );
        self.push_batch(binding)
    }

    /// [`process_batch_stage`](Self::process_batch_stage) with a resource
    /// per worker process, built once in that process by `init` and given
    /// to the handler with each batch (see
    /// [`process_stage_using`](Self::process_stage_using)): a connection
    /// per worker process, one transaction per batch.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use bergtalzug::prelude::*;
    /// use bergtalzug::process::ProcessOptions;
    /// use bergtalzug::shape::Batch;
    ///
    /// struct Table { rows: Vec<u32> }
    ///
    /// fn open() -> anyhow::Result<Table> {
    ///     Ok(Table { rows: Vec::new() })
    /// }
    ///
    /// fn insert(table: &mut Table, batch: Batch<u32>) -> anyhow::Result<Vec<anyhow::Result<u64>>> {
    ///     let rows: Vec<u32> = batch.into_items().into_iter().map(|i| i.data).collect();
    ///     table.rows.extend(&rows);
    ///     let total = table.rows.len() as u64;
    ///     Ok(rows.iter().map(|_| Ok(total)).collect())
    /// }
    ///
    /// # #[allow(clippy::needless_doctest_main)]
    /// #[tokio::main]
    /// async fn main() -> Result<(), Box<dyn std::error::Error>> {
    ///     bergtalzug::process::init();
    ///     let config = PipelineConfig::new("load", vec![
    ///         StageConfig::new("insert", ExecutionType::Process).batch(500, Duration::from_secs(2)),
    ///     ]);
    ///     let results = Pipeline::builder(config)?
    ///         .source(sources::iter(0..10_000u32))
    ///         .process_batch_stage_using("insert", open, insert, ProcessOptions::new())
    ///         .build()?
    ///         .run()
    ///         .await?;
    ///     assert!(results.iter().all(|r| r.success));
    ///     Ok(())
    /// }
    /// ```
    // The handler's type is written out: it is what the user writes.
    #[allow(clippy::type_complexity)]
    pub fn process_batch_stage_using<R, O>(
        mut self,
        name: &str,
        init: fn() -> anyhow::Result<R>,
        handler: fn(&mut R, Batch<C>) -> anyhow::Result<Vec<anyhow::Result<O>>>,
        options: ProcessOptions,
    ) -> PipelineBuilder<T, O>
    where
        R: 'static,
        C: Serialize + DeserializeOwned,
        O: Serialize + DeserializeOwned + Send + 'static,
    {
        let binding = self.process_binding::<Batch<C>, Unbatched<O>, Batches, R, _>(
            name,
            init,
            handler,
            options,
            Policies::default(),
        );
        self.push_batch(binding)
    }

    /// A Process stage's binding, from `I` to `O`: in a worker process of
    /// this stage (when `main` did not call `process::init`), this serves
    /// the stage and never returns.
    fn process_binding<I, O, W, R, F>(
        &mut self,
        name: &str,
        init: fn() -> anyhow::Result<R>,
        handler: F,
        options: ProcessOptions,
        policies: Policies<I>,
    ) -> Binding
    where
        I: Send + 'static,
        O: Send + 'static,
        W: Wire<I, O>,
        R: 'static,
        F: Call<R>,
    {
        process::serve_if_worker(&self.config.pipeline_name, name, init, handler);
        self.check(name, HandlerKind::Process);
        Binding::process::<I, O, W, R, F>(init, handler, options, policies)
    }

    /// Gives the next stage (`name`, a batch stage bound right after this
    /// call) batches by key: items whose `key` is the same are batched
    /// together (by target table, by partition), each key's batch cut on
    /// its own size and timeout. Keys are compared by a 64-bit hash.
    pub fn batch_by<K: std::hash::Hash>(
        mut self,
        name: &str,
        key: impl Fn(&WorkItem<C>) -> K + Send + Sync + 'static,
    ) -> Self {
        if self.policy_in_place(name, "batch_by") {
            self.batch_key = Some(batch_key(key));
        }
        self
    }

    /// Binds the handler of the next stage, an `Async` batch stage (its
    /// config has a [`batch_size`](crate::config::StageConfig::batch_size)):
    /// it gets a [`Batch`] of items and returns one outcome per item, in
    /// order. An `Err` outcome fails its item alone; an `Err` from the
    /// handler (or a panic, or the stage's timeout) fails the whole batch,
    /// each item with the batch's error. Retries (with
    /// [`retrying_async_batch_stage`](Self::retrying_async_batch_stage)),
    /// the timeout and dead letters apply per batch attempt; results,
    /// events, acks and dead letters are per item. Items leave the stage
    /// under their own ids and metadata. See `docs/shapes.md`.
    ///
    /// # Errors
    ///
    /// [`build`](Self::build) fails with [`BuildError::BatchMismatch`] when
    /// the stage has no `batch_size`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use bergtalzug::prelude::*;
    /// use bergtalzug::shape::Batch;
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let config = PipelineConfig::new("load", vec![
    ///     StageConfig::new("insert", ExecutionType::Async).batch(100, Duration::from_millis(50)),
    /// ]);
    /// let results = Pipeline::builder(config)?
    ///     .source(sources::iter(0..1000u32))
    ///     .async_batch_stage("insert", |batch: Batch<u32>| async move {
    ///         // One round trip for up to 100 rows; row 13 is refused alone.
    ///         Ok(batch.into_items().into_iter().map(|row| {
    ///             anyhow::ensure!(row.data != 13, "row 13 violates a constraint");
    ///             Ok(row.data)
    ///         }).collect())
    ///     })
    ///     .build()?
    ///     .run()
    ///     .await?;
    /// assert_eq!(results.len(), 1000);
    /// assert_eq!(results.iter().filter(|r| !r.success).count(), 1);
    /// # Ok(()) }
    /// ```
    pub fn async_batch_stage<O, F, Fut>(mut self, name: &str, handler: F) -> PipelineBuilder<T, O>
    where
        O: Send + 'static,
        F: Fn(Batch<C>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<Vec<anyhow::Result<O>>>> + Send + 'static,
    {
        self.check(name, HandlerKind::Async);
        let handler = async_batches(handler);
        let binding = Binding::asynchronous(handler, Policies::default());
        self.push_batch(binding)
    }

    /// [`async_batch_stage`](Self::async_batch_stage) for a stage with a
    /// `retry` policy: a failed batch is tried again whole (a copy of it is
    /// kept while an attempt runs).
    pub fn retrying_async_batch_stage<O, F, Fut>(
        mut self,
        name: &str,
        handler: F,
    ) -> PipelineBuilder<T, O>
    where
        C: Clone,
        O: Send + 'static,
        F: Fn(Batch<C>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<Vec<anyhow::Result<O>>>> + Send + 'static,
    {
        self.check(name, HandlerKind::Async);
        let handler = async_batches(handler);
        let binding = Binding::asynchronous_retrying(handler, Policies::default());
        self.push_batch(binding)
    }

    /// [`async_batch_stage`](Self::async_batch_stage) for a `Thread` or
    /// `Cpu` batch stage: a blocking handler.
    pub fn sync_batch_stage<O, F>(mut self, name: &str, handler: F) -> PipelineBuilder<T, O>
    where
        O: Send + 'static,
        F: Fn(Batch<C>) -> anyhow::Result<Vec<anyhow::Result<O>>> + Send + Sync + 'static,
    {
        self.check(name, HandlerKind::Blocking);
        let binding = Binding::blocking(sync_batches(handler), Policies::default());
        self.push_batch(binding)
    }

    /// [`sync_batch_stage`](Self::sync_batch_stage) for a stage with a
    /// `retry` policy: a failed batch is tried again whole.
    pub fn retrying_sync_batch_stage<O, F>(
        mut self,
        name: &str,
        handler: F,
    ) -> PipelineBuilder<T, O>
    where
        C: Clone,
        O: Send + 'static,
        F: Fn(Batch<C>) -> anyhow::Result<Vec<anyhow::Result<O>>> + Send + Sync + 'static,
    {
        self.check(name, HandlerKind::Blocking);
        let binding = Binding::blocking_retrying(sync_batches(handler), Policies::default());
        self.push_batch(binding)
    }

    /// A batch stage's binding: its batcher in front, its splitter behind.
    fn push_batch<O: Send + 'static>(mut self, binding: Binding) -> PipelineBuilder<T, O> {
        let key = self.batch_key.take();
        let binding = binding.split::<Unbatched<O>, O>().batch::<C>(key);
        self.handlers.push(binding);
        self.retype()
    }

    /// Splits the output of the stage bound just before: that stage's
    /// handler returns, for each item, its children, as a
    /// [`Children<O>`](crate::shape::Children) (none: the item is filtered;
    /// some in memory; an iterator or a stream drawn lazily) or a `Vec<O>`
    /// (what a `Process` stage returns), and each child goes on to the next
    /// stage as an item of its own. Works after every binding method
    /// (`async_stage`, `sync_stage`, `retrying_*`, `process_stage`): the
    /// stage's retries, timeout and dead letters apply to its handler.
    ///
    /// Children are drawn only as the next stage has room, and never more
    /// than the room of the stages after it are unfinished at once, so one
    /// item may split into millions. Each child's job id is
    /// `<parent>/<index>` and its `custom` metadata is its parent's plus
    /// [`PARENT_ID`](crate::shape::PARENT_ID); the admitted item is acked
    /// once, when all its descendants are finished. See
    /// [`crate::shape`] and `docs/shapes.md`.
    ///
    /// # Errors
    ///
    /// [`build`](Self::build) fails with [`BuildError::SplitWithoutStage`]
    /// when no stage is bound before it, and with
    /// [`BuildError::PolicyBeforeSplit`] when `keyed_by`, `cost_by` or
    /// `batch_by` for the next stage comes between the stage and its
    /// `.split()` (it belongs after the split: it is over the children).
    ///
    /// ```
    /// use bergtalzug::prelude::*;
    /// use bergtalzug::shape::Children;
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let config = PipelineConfig::new("lines", vec![
    ///     StageConfig::new("split", ExecutionType::Thread).workers(2),
    ///     StageConfig::new("store", ExecutionType::Async),
    /// ]);
    /// let files = ["a\nb\nc".to_string(), String::new()];
    /// let results = Pipeline::builder(config)?
    ///     .source(sources::iter(files))
    ///     .sync_stage("split", |file: WorkItem<String>| {
    ///         Ok(file.map(|text| {
    ///             let lines: Vec<String> = text.lines().map(str::to_string).collect();
    ///             Children::iter(lines.into_iter())
    ///         }))
    ///     })
    ///     .split()
    ///     .async_stage("store", |line: WorkItem<String>| async move { Ok(line) })
    ///     .build()?
    ///     .run()
    ///     .await?;
    /// // Three lines, and the empty file: filtered, a success.
    /// assert_eq!(results.len(), 4);
    /// assert!(results.iter().all(|r| r.success));
    /// # Ok(()) }
    /// ```
    pub fn split(mut self) -> PipelineBuilder<T, C::Child>
    where
        C: IntoChildren,
    {
        // A policy given for the next stage is over the items being split:
        // it cannot carry over to the children's type.
        let given = [
            (self.next.key.is_some(), "keyed_by"),
            (self.next.cost.is_some(), "cost_by"),
            (self.batch_key.is_some(), "batch_by"),
        ];
        if let Some(&(_, method)) = given.iter().find(|(set, _)| *set) {
            let stage = &self.config.stages[self.handlers.len()].name;
            self.error.get_or_insert(BuildError::PolicyBeforeSplit {
                stage: stage.clone(),
                method,
            });
        }
        match self.handlers.pop() {
            Some(last) => self.handlers.push(last.split::<C, C::Child>()),
            None => {
                self.error.get_or_insert(BuildError::SplitWithoutStage {
                    pipeline: self.config.pipeline_name.clone(),
                });
            }
        }
        self.retype()
    }

    /// Checks the bindings and makes the pipeline (nothing runs yet).
    pub fn build(self) -> Result<Pipeline<T>, BuildError> {
        if let Some(error) = self.error {
            return Err(error);
        }
        for (stage, binding) in self.config.stages.iter().zip(&self.handlers) {
            match (stage.batch_size.is_some(), binding.batches()) {
                (true, false) => {
                    return Err(BuildError::BatchMismatch {
                        stage: stage.name.clone(),
                        hint: "its config has a batch_size: bind it with .async_batch_stage, .sync_batch_stage (their retrying_ forms with a retry policy) or .process_batch_stage".into(),
                    });
                }
                (false, true) => {
                    return Err(BuildError::BatchMismatch {
                        stage: stage.name.clone(),
                        hint: "it is bound with a batch method but its config has no batch_size: set one (StageConfig::batch)".into(),
                    });
                }
                _ => {}
            }
            let copies = binding.kind() != HandlerKind::Process && binding.retries();
            if copies && stage.retry.is_none() {
                let async_kind = binding.kind() == HandlerKind::Async;
                return Err(BuildError::RetryWithoutPolicy {
                    stage: stage.name.clone(),
                    method: if async_kind {
                        "retrying_async_stage"
                    } else {
                        "retrying_sync_stage"
                    },
                    plain: if async_kind {
                        "async_stage"
                    } else {
                        "sync_stage"
                    },
                });
            }
            if stage.max_attempts() > 1 && !binding.retries() {
                return Err(BuildError::RetryNeedsCopy {
                    stage: stage.name.clone(),
                    max_attempts: stage.max_attempts(),
                    method: match binding.kind() {
                        HandlerKind::Async => "retrying_async_stage",
                        HandlerKind::Blocking | HandlerKind::Process => "retrying_sync_stage",
                    },
                });
            }
        }
        if let Some(missing) = self.config.stages.get(self.handlers.len()) {
            return Err(BuildError::MissingStage {
                stage: missing.name.clone(),
            });
        }
        let Some(source) = self.source else {
            return Err(BuildError::MissingSource {
                pipeline: self.config.pipeline_name.clone(),
            });
        };
        Ok(Pipeline::new(PipelineParts {
            config: self.config,
            source,
            stages: self.handlers,
            callbacks: self.callbacks,
            dead_letters: self.dead_letters,
        }))
    }

    /// Records the first binding error: the stage at this position must be
    /// called `name` and take a handler of `kind`.
    fn check(&mut self, name: &str, kind: HandlerKind) {
        if self.error.is_some() {
            return;
        }
        let position = self.handlers.len();
        let stages = &self.config.stages;
        self.error = match (stages.get(position), self.config.stage_index(name)) {
            (_, None) => Some(BuildError::UnknownStage {
                stage: name.to_string(),
                known: stages
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
            (_, Some(i)) if i < position => Some(BuildError::BoundTwice {
                stage: name.to_string(),
            }),
            (Some(expected), Some(_)) if expected.name != name => Some(BuildError::OutOfOrder {
                stage: name.to_string(),
                expected: expected.name.clone(),
            }),
            (Some(stage), Some(_)) if stage.execution_type.handler_kind() != kind => {
                Some(BuildError::WrongHandlerKind {
                    stage: name.to_string(),
                    execution_type: stage.execution_type,
                    hint: match stage.execution_type.handler_kind() {
                        HandlerKind::Async => "bind an async fn with .async_stage".into(),
                        HandlerKind::Blocking => "bind a blocking fn with .sync_stage".into(),
                        HandlerKind::Process => {
                            "bind a plain fn over serde data with .process_stage".into()
                        }
                    },
                })
            }
            _ => None,
        };
    }

    fn retype<C2>(self) -> PipelineBuilder<T, C2> {
        PipelineBuilder {
            config: self.config,
            source: self.source,
            handlers: self.handlers,
            callbacks: self.callbacks,
            dead_letters: self.dead_letters,
            error: self.error,
            next: Policies::default(),
            batch_key: None,
            _types: PhantomData,
        }
    }
}

/// Checks a batch handler's outcomes against its batch: one per item.
fn pair<O>(
    members: Vec<(crate::item::JobId, crate::item::WorkItemMetadata)>,
    outcomes: Vec<anyhow::Result<O>>,
) -> anyhow::Result<Unbatched<O>> {
    anyhow::ensure!(
        outcomes.len() == members.len(),
        "the batch handler returned {} outcomes for {} items",
        outcomes.len(),
        members.len()
    );
    Ok(Unbatched(
        members
            .into_iter()
            .zip(outcomes)
            .map(|((id, metadata), outcome)| (id, metadata, outcome))
            .collect(),
    ))
}

/// What a batch stage's wrapped async handler returns.
type BatchFuture<O> =
    std::pin::Pin<Box<dyn Future<Output = anyhow::Result<WorkItem<Unbatched<O>>>> + Send>>;

/// A batch handler as a stage's handler over one batch item: each item's
/// id and metadata are kept aside while it runs, and paired with its
/// outcome after.
fn async_batches<I, O, F, Fut>(
    handler: F,
) -> impl Fn(WorkItem<Batch<I>>) -> BatchFuture<O> + Send + Sync + 'static
where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(Batch<I>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<Vec<anyhow::Result<O>>>> + Send + 'static,
{
    move |item: WorkItem<Batch<I>>| {
        let members = item.data.members();
        let (id, batch, _) = item.into_parts();
        let outcomes = handler(batch);
        Box::pin(async move {
            let unbatched = pair(members, outcomes.await?)?;
            Ok(WorkItem::with_job_id(id, unbatched))
        })
    }
}

/// [`async_batches`] for a blocking handler.
fn sync_batches<I, O, F>(
    handler: F,
) -> impl Fn(WorkItem<Batch<I>>) -> anyhow::Result<WorkItem<Unbatched<O>>> + Send + Sync + 'static
where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(Batch<I>) -> anyhow::Result<Vec<anyhow::Result<O>>> + Send + Sync + 'static,
{
    move |item: WorkItem<Batch<I>>| {
        let members = item.data.members();
        let (id, batch, _) = item.into_parts();
        let unbatched = pair(members, handler(batch)?)?;
        Ok(WorkItem::with_job_id(id, unbatched))
    }
}
