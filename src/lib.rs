//! # bergtalzug
//!
//! Multi-stage, concurrent ETL pipelines for Rust, built as supervised
//! actors on [`ractor`] and [`tokio`]: items flow through your stages
//! (download → transform → store ...), each with its own execution model,
//! worker count and bounded queue; every item is tracked to exactly one
//! outcome; memory is bounded by the configuration, never by the input.
//!
//! It keeps the words and defaults of the Python library Bergtalzug
//! (stages, workers, `queue_size`, `refill`, `WorkItem`, tracker,
//! completion callbacks, stats), with typed stages checked at compile time,
//! demand-driven input instead of polling, and supervision.
//!
//! ```
//! use bergtalzug::prelude::*;
//! use std::time::Duration;
//!
//! async fn fetch(item: WorkItem<u32>) -> anyhow::Result<WorkItem<Vec<u8>>> {
//!     Ok(item.map(|n| n.to_le_bytes().to_vec()))            // e.g. an HTTP GET
//! }
//!
//! fn checksum(item: WorkItem<Vec<u8>>) -> anyhow::Result<WorkItem<u64>> {
//!     Ok(item.map(|bytes| bytes.iter().map(|b| *b as u64).sum()))
//! }
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = PipelineConfig::new("quick", vec![
//!     StageConfig::new("fetch", ExecutionType::Async).workers(16).queue_size(100),
//!     StageConfig::new("checksum", ExecutionType::Cpu).workers(2).queue_size(50),
//! ])
//! .stats_interval(Duration::ZERO);
//!
//! let pipeline = Pipeline::builder(config)?
//!     .source(sources::iter(0..1_000u32))
//!     .async_stage("fetch", fetch)
//!     .sync_stage("checksum", checksum)
//!     .on_complete(|r| if !r.success { eprintln!("{} failed: {:?}", r.job_id, r.error) })
//!     .build()?;
//!
//! let results = pipeline.run().await?;
//! assert_eq!(results.len(), 1_000);
//! println!("{}", pipeline.stats().await?);
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - [`PipelineConfig`] / [`StageConfig`] / [`ExecutionType`]: serde data,
//!   loadable from TOML or JSON with the seed's keys.
//! - [`Pipeline::builder`] → [`PipelineBuilder`]: binds a [`Source`] and one
//!   handler per stage; [`BuildError`] if they do not fit.
//! - [`Pipeline`]: `run`, `start`, `stats`, `subscribe`, `inject`, `stop`,
//!   `abort`, `spawn_linked`.
//! - [`sources`]: sources from an iterator, a `Stream` or a channel, the
//!   files of a directory (by glob), and the lines of a file or of stdin.
//! - `queue` (feature `sqlite` or `redis`): durable work, a job in a local
//!   SQLite file that a killed run resumes (`docs/durable-work.md`), or in a
//!   Redis stream that many hosts share (`docs/scale-out.md`).
//! - `progress` (feature `progress`, on by default): a progress bar in a
//!   terminal, plain progress lines elsewhere.
//! - `dashboard` (feature `dashboard`): a live page in the browser for
//!   running pipelines, and a JSON API with server-sent events.
//! - Observation: [`PipelineStats`] (percentiles, recent throughput,
//!   utilisation, the bottleneck), [`PipelineEvent`] (including stalled
//!   items), a tracing span per item per stage, and metrics through the
//!   `metrics` facade (feature `metrics`); see `docs/observability.md`.
//! - [`process`]: Process stages' worker processes; a program with a
//!   Process stage calls [`process::init`] first in `main`.
//! - [`embed`]: what a ractor actor system needs to embed a pipeline
//!   ([`PipelineMsg`], [`FINISHED`], [`forward_to_actor`]).
//! - The engine (the data, the runners, the actors, the builder and the
//!   handle) is the `bergtalzug-actors` crate; everything public there is
//!   re-exported here.
//!
//! The docs in `docs/` cover the architecture, the guide for Python
//! Bergtalzug users, events and performance.

#[cfg(feature = "dashboard")]
pub mod dashboard;
#[cfg(feature = "progress")]
pub mod progress;
#[cfg(any(feature = "sqlite", feature = "redis"))]
pub mod queue;
pub mod sources;

#[doc(inline)]
pub use bergtalzug_actors::process;

/// Configuration: [`PipelineConfig`], [`StageConfig`], and the limits
/// validation holds them to ([`config::MAX_WORKERS`], [`config::MAX_DURATION`], ...).
pub use bergtalzug_actors::config;
#[doc(inline)]
pub use bergtalzug_actors::embed;
/// Events and subscriptions: [`PipelineEvent`], [`EventFilter`],
/// [`EventStream`] and their delivery policy.
pub use bergtalzug_actors::event;
/// Per-worker resources: [`resource::Held`], what `async_stage_with` hands its handler.
pub use bergtalzug_actors::resource;
/// Split and filter: [`shape::Children`], what a splitting stage returns, and the lineage keys.
pub use bergtalzug_actors::shape;

#[doc(inline)]
pub use bergtalzug_actors::config::{
    ConfigError, ExecutionType, PipelineConfig, RateLimit, RestartBudget, RetryPolicy, StageConfig,
};
#[doc(inline)]
pub use bergtalzug_actors::dead_letter::{DeadLetter, DeadLetterSink};
#[doc(inline)]
pub use bergtalzug_actors::embed::{FINISHED, PipelineMsg};
#[doc(inline)]
pub use bergtalzug_actors::error::PipelineError;
#[doc(inline)]
pub use bergtalzug_actors::event::{
    ActorEvent, EventFilter, EventStream, PipelineEvent, WorkerId, forward_to_actor,
};
#[doc(inline)]
pub use bergtalzug_actors::item::{
    ItemError, ItemErrorKind, JobId, Permanent, StageTimes, WorkItem, WorkItemMetadata,
    WorkItemResult,
};
#[doc(inline)]
pub use bergtalzug_actors::source::{Ack, AckFuture, Acknowledger, Refill, Source};
#[doc(inline)]
pub use bergtalzug_actors::stats::{BatchCounts, PipelineStats, StageStats};
#[doc(inline)]
pub use bergtalzug_actors::{
    BuildError, HasInput, InputGiven, NeedsInput, NoInput, Pipeline, PipelineBuilder, RunOutcome,
};

/// Everything a pipeline program needs: `use bergtalzug::prelude::*;`
pub mod prelude {
    pub use crate::sources;
    pub use crate::{
        BuildError, ConfigError, DeadLetter, EventFilter, ExecutionType, ItemError, ItemErrorKind,
        JobId, Permanent, Pipeline, PipelineConfig, PipelineError, PipelineEvent, PipelineStats,
        RateLimit, Refill, RestartBudget, RetryPolicy, RunOutcome, Source, StageConfig, StageStats,
        WorkItem, WorkItemMetadata, WorkItemResult,
    };
}

/// The README's example is compiled and run as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
