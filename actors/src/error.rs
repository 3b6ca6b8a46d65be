//! The errors of a running pipeline.

/// Why a pipeline operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// The operation needs a running pipeline (call `start` first).
    #[error("pipeline `{0}` is not running")]
    NotRunning(String),
    /// The pipeline takes no more input: its source is exhausted, or it is
    /// stopping or finished.
    #[error("pipeline `{0}` takes no more input (source exhausted, stopping or finished)")]
    InputClosed(String),
    /// The input closed (the source was exhausted, or the pipeline began to
    /// stop) while an `inject` was being admitted: its first `admitted`
    /// items, in the order given, were admitted and get their outcomes as
    /// usual; the other `refused` were not admitted.
    #[error(
        "pipeline `{pipeline}` took no more input after {admitted} of the injected items; the last {refused} were not admitted"
    )]
    PartlyAdmitted {
        /// The pipeline.
        pipeline: String,
        /// How many of the injected items, from the first, were admitted.
        admitted: usize,
        /// How many, from the last, were not.
        refused: usize,
    },
    /// The pipeline's actors could not be started.
    #[error("pipeline `{pipeline}` could not start: {message}")]
    Start {
        /// The pipeline.
        pipeline: String,
        /// Why.
        message: String,
    },
    /// The source panicked (in `refill` or `ack`). Every item it had
    /// handed over was finished and acknowledged; the rest of its input
    /// was not read. What completed: `Pipeline::run_outcome`.
    #[error("the source of pipeline `{pipeline}` panicked: {message}")]
    SourcePanicked {
        /// The pipeline.
        pipeline: String,
        /// The panic message.
        message: String,
    },
    /// The source's `refill` failed `failures` times in a row, the
    /// pipeline's `max_refill_failures`: the input was closed and every
    /// item admitted before finished. What completed: `Pipeline::run_outcome`.
    #[error(
        "the source of pipeline `{pipeline}` failed {failures} times in a row, giving up: {message}"
    )]
    SourceFailed {
        /// The pipeline.
        pipeline: String,
        /// Failed refills in a row.
        failures: u32,
        /// The last error, with its chain.
        message: String,
    },
    /// A stage replaced more workers than its restart budget allows (its
    /// handler keeps panicking). The pipeline was aborted: every item it had
    /// admitted has its outcome (see callbacks and events, and
    /// `Pipeline::run_outcome` for the results).
    #[error(
        "pipeline `{pipeline}`: stage `{stage}` replaced {restarts} workers within {window:?}, over its restart budget; pipeline aborted"
    )]
    RestartBudgetExceeded {
        /// The pipeline.
        pipeline: String,
        /// The stage.
        stage: String,
        /// Replacements counted within the window.
        restarts: u32,
        /// The budget's window.
        window: std::time::Duration,
    },
    /// A Process stage's worker processes failed to start several times in
    /// a row (most often: `main` does not call `process::init()` first).
    /// The pipeline was aborted: every item it had admitted has its outcome.
    #[error(
        "pipeline `{pipeline}`: stage `{stage}` cannot start its worker processes ({failures} failed in a row); pipeline aborted; the last: {message}"
    )]
    WorkersCannotStart {
        /// The pipeline.
        pipeline: String,
        /// The stage.
        stage: String,
        /// Worker processes that failed to start in a row.
        failures: u32,
        /// How the last one failed, with a hint.
        message: String,
    },
    /// One of the pipeline's own actors failed: a bug in bergtalzug.
    #[error("pipeline `{pipeline}`: internal actor `{actor}` failed: {message}")]
    ActorFailed {
        /// The pipeline.
        pipeline: String,
        /// Which actor (`tracker`, `stage fetch`, ...).
        actor: String,
        /// Why.
        message: String,
    },
    /// One of the pipeline's own actors (a stage, the source or the
    /// tracker) was stopped or killed from outside, e.g. by an embedding
    /// supervisor, before the pipeline finished. The pipeline was aborted;
    /// the items the stopped actor held end `Cancelled` (tracking on) and
    /// `unaccounted` counts those that could get no outcome (tracking off,
    /// or the tracker itself was stopped).
    #[error(
        "pipeline `{pipeline}`: its `{actor}` was stopped from outside ({reason}); pipeline aborted{}",
        if *unaccounted > 0 { format!(", {unaccounted} items got no outcome") } else { String::new() }
    )]
    ActorStopped {
        /// The pipeline.
        pipeline: String,
        /// Which actor (`tracker`, `source`, `stage fetch`).
        actor: String,
        /// Its stop reason (`killed`, or the reason given to `stop`).
        reason: String,
        /// Admitted items without an outcome.
        unaccounted: u64,
    },
    /// The pipeline's root actor was stopped or killed from outside before
    /// every item had its outcome (its supervisor stopped it).
    #[error("pipeline `{pipeline}` was stopped from outside before it finished: {reason}")]
    Interrupted {
        /// The pipeline.
        pipeline: String,
        /// How it was stopped.
        reason: String,
    },
    /// A change asked of a running pipeline (`set_rate_limit`,
    /// `set_workers`) was refused: the error names the stage and field.
    #[error("pipeline `{pipeline}`: {error}")]
    InvalidChange {
        /// The pipeline.
        pipeline: String,
        /// What is wrong, naming the stage and field.
        error: crate::config::ConfigError,
    },
    /// `run` already returned this pipeline's results to another caller.
    #[error("the results of pipeline `{0}` were already returned by an earlier run()")]
    ResultsTaken(String),
}
