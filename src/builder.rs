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
//! Binding a stage under the wrong name, out of order, with a handler kind
//! its execution type cannot run, or leaving one unbound, is a
//! [`BuildError`] naming the stage:
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
//! # Retrying stages
//!
//! Another attempt needs the input again, so a stage whose config has a
//! [`RetryPolicy`](bergtalzug_actors::config::RetryPolicy) is bound with
//! [`retrying_async_stage`](PipelineBuilder::retrying_async_stage) or
//! [`retrying_sync_stage`](PipelineBuilder::retrying_sync_stage), which
//! require its input type to be `Clone` and keep a copy of each input while
//! an attempt runs. Other stages need no `Clone`. Binding a retrying stage
//! with the plain method is a [`BuildError::RetryNeedsCopy`]:
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
//! ```

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use bergtalzug_actors::config::{ConfigError, ExecutionType, PipelineConfig};
use bergtalzug_actors::dead_letter::{DeadLetter, DeadLetterSink};
use bergtalzug_actors::item::{WorkItem, WorkItemResult};
use bergtalzug_actors::process::{self, ProcessOptions};
use bergtalzug_actors::source::Source;
use bergtalzug_actors::{
    Callback, HandlerKind, PipelineParts, PipelineRuntime, SourceBinding, StageBinding,
};

use crate::pipeline::Pipeline;

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
    /// Neither `.source(..)` nor `.injected::<T>()` was called.
    #[error("pipeline `{pipeline}` has no input: call .source(..) or .injected::<T>()")]
    MissingSource {
        /// The pipeline.
        pipeline: String,
    },
}

/// Marks a builder that has no input yet.
#[derive(Debug)]
pub enum NoInput {}

/// Pairs a configuration with a source and one handler per stage.
///
/// `T` is the pipeline's input type (the source's items), `C` the output
/// type of the last stage bound so far.
#[must_use = "a builder does nothing until .build()"]
pub struct PipelineBuilder<T, C> {
    config: PipelineConfig,
    source: Option<SourceBinding<T>>,
    handlers: Vec<StageBinding>,
    callbacks: Vec<Callback>,
    dead_letters: Option<DeadLetterSink>,
    error: Option<BuildError>,
    _types: PhantomData<fn(T) -> C>,
}

impl Pipeline<NoInput> {
    /// Starts building a pipeline; the config is validated here.
    pub fn builder(
        config: PipelineConfig,
    ) -> Result<PipelineBuilder<NoInput, NoInput>, ConfigError> {
        config.validate()?;
        Ok(PipelineBuilder {
            config,
            source: None,
            handlers: Vec::new(),
            callbacks: Vec::new(),
            dead_letters: None,
            error: None,
            _types: PhantomData,
        })
    }
}

impl PipelineBuilder<NoInput, NoInput> {
    /// Feeds the pipeline from `source`; its items are the first stage's input.
    pub fn source<S: Source>(self, source: S) -> PipelineBuilder<S::Item, S::Item> {
        self.input(SourceBinding::from_source(source))
    }

    /// Feeds the pipeline only by [`Pipeline::inject`]: it runs until stopped.
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
            _types: PhantomData,
        }
    }
}

impl<T: Send + 'static, C: Send + 'static> PipelineBuilder<T, C> {
    /// Binds the handler of the next stage, an `Async` one.
    pub fn async_stage<O, F, Fut>(mut self, name: &str, handler: F) -> PipelineBuilder<T, O>
    where
        O: Send + 'static,
        F: Fn(WorkItem<C>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<WorkItem<O>>> + Send + 'static,
    {
        self.check(name, |t| matches!(t, ExecutionType::Async));
        self.handlers.push(StageBinding::asynchronous(handler));
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
        self.check(name, |t| matches!(t, ExecutionType::Async));
        self.handlers
            .push(StageBinding::asynchronous_retrying(handler));
        self.retype()
    }

    /// Binds the handler of the next stage, a `Thread` or `Cpu` one.
    pub fn sync_stage<O, F>(mut self, name: &str, handler: F) -> PipelineBuilder<T, O>
    where
        O: Send + 'static,
        F: Fn(WorkItem<C>) -> anyhow::Result<WorkItem<O>> + Send + Sync + 'static,
    {
        self.check(name, |t| {
            matches!(t, ExecutionType::Thread | ExecutionType::Cpu)
        });
        self.handlers.push(StageBinding::blocking(handler));
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
        self.check(name, |t| {
            matches!(t, ExecutionType::Thread | ExecutionType::Cpu)
        });
        self.handlers.push(StageBinding::blocking_retrying(handler));
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
        // In a worker process of this stage (when `main` did not call
        // `process::init`), this serves the stage and never returns.
        process::serve_if_worker(&self.config.pipeline_name, name, handler);
        self.check(name, |t| matches!(t, ExecutionType::Process));
        self.handlers.push(StageBinding::process(handler, options));
        self.retype()
    }

    /// Adds a completion callback: called exactly once per item, with its
    /// result, on the tracker's task (keep it quick). A panic in it is
    /// logged and ignored.
    pub fn on_complete(
        mut self,
        callback: impl Fn(&WorkItemResult) + Send + Sync + 'static,
    ) -> Self {
        self.callbacks.push(Arc::new(callback));
        self
    }

    /// Sends every item that ends without success (failed, timed out,
    /// cancelled, refused) to `callback`, on the tracker's task, as a
    /// [`DeadLetter`]: its id, error, attempts, lineage and, from stages
    /// bound to retry, its last input. A panic in it is logged.
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

    /// Checks the bindings and makes the pipeline (nothing runs yet).
    pub fn build(self) -> Result<Pipeline<T>, BuildError> {
        if let Some(error) = self.error {
            return Err(error);
        }
        for (stage, binding) in self.config.stages.iter().zip(&self.handlers) {
            if stage.max_attempts() > 1 && !binding.retries() {
                return Err(BuildError::RetryNeedsCopy {
                    stage: stage.name.clone(),
                    max_attempts: stage.max_attempts(),
                    method: match binding.kind() {
                        HandlerKind::Async => "retrying_async_stage",
                        _ => "retrying_sync_stage",
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
        let runtime = PipelineRuntime::new(PipelineParts {
            config: self.config,
            source,
            stages: self.handlers,
            callbacks: self.callbacks,
            dead_letters: self.dead_letters,
        });
        Ok(Pipeline::new(runtime))
    }

    /// Records the first binding error: the stage at this position must be
    /// called `name` and run the handler kind `fits` accepts.
    fn check(&mut self, name: &str, fits: impl Fn(ExecutionType) -> bool) {
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
            (Some(stage), Some(_)) if !fits(stage.execution_type) => {
                Some(BuildError::WrongHandlerKind {
                    stage: name.to_string(),
                    execution_type: stage.execution_type,
                    hint: match stage.execution_type {
                        ExecutionType::Async => "bind an async fn with .async_stage".into(),
                        ExecutionType::Thread | ExecutionType::Cpu => {
                            "bind a blocking fn with .sync_stage".into()
                        }
                        ExecutionType::Process => {
                            "bind a plain fn over serde data with .process_stage".into()
                        }
                        other => format!(
                            "{other} stages are not supported by this version of bergtalzug"
                        ),
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
            _types: PhantomData,
        }
    }
}
