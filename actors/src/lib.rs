//! The engine of [bergtalzug](https://docs.rs/bergtalzug): the actors that run
//! a pipeline, their messages, and the types they share with the front door.
//!
//! Users depend on `bergtalzug`, which re-exports what they need from here.
//!
//! # Tour
//!
//! - [`config`]: `PipelineConfig`, `StageConfig`, `ExecutionType`; serde data
//!   with the Python library's names and defaults, plus validation.
//! - [`item`]: `WorkItem`, `JobId`, metadata, `WorkItemResult`, `ItemError`.
//! - [`source`]: the demand-driven `Source` trait.
//! - [`binding`]: typed stage handlers and sources, ready to spawn.
//! - [`event`]: `PipelineEvent`, subscriptions and their delivery policy.
//! - [`stats`]: `PipelineStats`, `StageStats`: counts, percentiles, recent
//!   throughput, utilisation and the bottleneck stage.
//! - Observation beside the actors: `monitor` (samples for the recent
//!   window, stall checks, metrics), `metrics` (the `metrics` facade, crate
//!   feature `metrics`); `docs/observability.md` lists every metric, span
//!   and event.
//! - The actors, one per file, each opening with its contract:
//!   `root` (the pipeline root, [`PipelineActor`]), `source_actor`, `stage`
//!   (stage supervisor), `worker`, `tracker`; the execution models in
//!   `runner/` (`async_rt`, `thread`, `cpu`, `process`; `lanes`: the
//!   threads of Thread and Cpu stages).
//! - `contain`: how panics of user code the engine calls besides the
//!   handler (`Clone`, `Drop`, `Display`, panic payloads) are contained.
//! - [`process`]: Process stages' worker processes: [`process::init`],
//!   [`process::ProcessOptions`], the child's side and the wire.
//!
//! # The flow
//!
//! ```text
//!             Demand(n)           Demand(n)
//!   source  <-----------  stage 1  <--------  stage 2  ...  last stage
//!   actor   ----------->  supervisor ------>  supervisor        |
//!              Items         |  ^                               | results
//!                      Run   v  | Report                        v
//!                          workers                           tracker --> callbacks,
//!                                                                        stats, events
//! ```
//!
//! Every hop carries batches; every data message answers a demand, so no
//! mailbox holds more than its receiver asked for. See `docs/architecture.md`.

pub mod binding;
pub(crate) mod clock;
pub mod config;
pub(crate) mod contain;
pub mod dead_letter;
pub mod error;
pub mod event;
pub(crate) mod gauges;
pub mod item;
#[cfg(feature = "metrics")]
pub(crate) mod metrics;
pub(crate) mod monitor;
pub(crate) mod outcome;
pub(crate) mod ports;
pub mod process;
pub mod root;
pub(crate) mod runner;
pub(crate) mod shared;
pub mod source;
pub(crate) mod source_actor;
pub(crate) mod stage;
pub mod stats;
pub(crate) mod tally;
pub(crate) mod tracker;
pub(crate) mod worker;

pub use binding::{HandlerKind, SourceBinding, StageBinding};
pub use root::{FINISHED, PipelineActor, PipelineMsg, PipelineParts, PipelineRuntime, RunOutcome};
pub use tracker::Callback;

/// With ractor's `cluster` feature the blanket `Message` impl is gone: each
/// message type declares itself a local (never serialised) message.
#[cfg(feature = "cluster")]
mod cluster {
    impl<T: Send + 'static> ractor::Message for crate::root::PipelineMsg<T> {}
    impl<T: Send + 'static> ractor::Message for crate::source_actor::SourceMsg<T> {}
    impl<I: Send + 'static, O: Send + 'static> ractor::Message for crate::stage::StageMsg<I, O> {}
    impl ractor::Message for crate::worker::WorkerMsg {}
    impl ractor::Message for crate::tracker::TrackerMsg {}
}
