//! The engine of [bergtalzug](https://docs.rs/bergtalzug): the actors that run
//! a pipeline, the contract's data, and the front door (builder and handle).
//!
//! Users depend on `bergtalzug`, which re-exports everything public here and
//! adds the batteries (ready-made sources, progress).
//!
//! # Layout
//!
//! The files sit on five floors; a file imports only from its own floor
//! or those below (`docs/architecture.md` has the module map, and
//! `tests/layering.rs` checks the rule):
//!
//! 1. **The contract's data**: [`config`], [`item`], [`error`], [`source`]
//!    (the `Source` trait), [`shape`] (split and filter), [`event`],
//!    [`stats`], [`dead_letter`], `lineage` (whom a split item descends
//!    from), [`resource`] (per-worker resources), and the
//!    small utilities `clock`, `contain` (panics of user code),
//!    `outcome` (what a worker reports of an item) and `timers` (an
//!    actor's timers, ended with it).
//! 2. **Ports**: `ports`, the traits the actors hold of one another.
//! 3. **Runners and worker processes**: `runner/` (one execution model per
//!    file, one attempt's judgement in `runner/attempt.rs`) and [`process`].
//! 4. **Actors**: `source_actor`, `stage/` (the stage supervisor, split by
//!    concern), `splitter` (draws a split stage's children), `batcher`
//!    (gathers a batch stage's items into batches), `worker`,
//!    `tracker`, `root`, `monitor`; `binding` (how a
//!    typed stage is spawned); the blackboard `shared` and the accounting
//!    (`gauges`, `tally`, `metrics`).
//! 5. **The front door**: [`PipelineBuilder`], [`Pipeline`], and [`embed`]
//!    for actor systems.
//!
//! # The flow
//!
//! ```text
//!             Demand(n)           Demand(n)
//!   source  <-----------  stage 1  <--------  stage 2  ...  last stage
//!   actor   ----------->  supervisor ------>  supervisor        |
//!              Items         |  ^                               | results
//!                     hand   v  | Report                        v
//!                          workers                           tracker --> callbacks,
//!                                                                        stats, events
//! ```
//!
//! Every hop carries batches; every data message answers a demand, so no
//! mailbox holds more than its receiver asked for. A batch reaches a worker
//! through its hand, which wakes it (no message). See `docs/architecture.md`.

// The contract's data: import nothing of the engine above this floor.
pub(crate) mod clock;
pub mod config;
pub(crate) mod contain;
pub mod dead_letter;
pub mod error;
pub mod event;
pub mod item;
pub(crate) mod lineage;
pub(crate) mod outcome;
pub mod resource;
pub mod shape;
pub mod source;
pub mod stats;
pub(crate) mod timers;

// Ports: traits over the data, with no actor behind them here.
pub(crate) mod ports;

// Runners and worker processes: how one attempt runs in each model.
pub mod process;
pub(crate) mod runner;

// Actors, their blackboard and the accounting.
pub(crate) mod batcher;
pub(crate) mod binding;
pub(crate) mod gauges;
#[cfg(feature = "metrics")]
pub(crate) mod metrics;
pub(crate) mod monitor;
pub(crate) mod root;
pub(crate) mod shared;
pub(crate) mod source_actor;
pub(crate) mod splitter;
pub(crate) mod stage;
pub(crate) mod tally;
pub(crate) mod tracker;
pub(crate) mod worker;

// The front door.
pub(crate) mod builder;
pub mod embed;
pub(crate) mod pipeline;

pub use builder::{BuildError, HasInput, InputGiven, NeedsInput, NoInput, PipelineBuilder};
pub use pipeline::{Pipeline, RunOutcome};

/// With ractor's `cluster` feature the blanket `Message` impl is gone: each
/// message type declares itself a local (never serialised) message.
#[cfg(feature = "cluster")]
mod cluster {
    impl<T: Send + 'static> ractor::Message for crate::root::PipelineMsg<T> {}
    impl<T: Send + 'static> ractor::Message for crate::source_actor::SourceMsg<T> {}
    impl<I: Send + 'static> ractor::Message for crate::stage::StageMsg<I> {}
    impl ractor::Message for crate::worker::WorkerMsg {}
    impl ractor::Message for crate::tracker::TrackerMsg {}
    impl<P: Send + 'static, O: Send + 'static> ractor::Message for crate::splitter::SplitMsg<P, O> {}
    impl<I: Send + 'static> ractor::Message for crate::batcher::BatchMsg<I> {}
}
