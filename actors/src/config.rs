//! Pipeline configuration: plain serde data plus validation.
//!
//! The field names and defaults are those of the Python Bergtalzug
//! (`ETLPipelineConfig`, `StageConfig`), so a config file written for it reads
//! the same here:
//!
//! ```
//! use bergtalzug_actors::config::{ExecutionType, PipelineConfig};
//!
//! let config = PipelineConfig::from_toml_str(r#"
//!     pipeline_name = "my_pipeline"
//!     queue_refresh_rate = 1.0
//!     stats_interval_seconds = 0
//!
//!     [[stages]]
//!     name = "fetch"
//!     execution_type = "async"
//!     workers = 10
//!     queue_size = 100
//!
//!     [[stages]]
//!     name = "compute"
//!     execution_type = "interpreter"   # the seed's name for a Cpu stage
//! "#)?;
//! assert_eq!(config.stages[1].execution_type, ExecutionType::Cpu);
//! assert_eq!(config.stages[1].workers, 5); // the seed's default
//! # Ok::<(), bergtalzug_actors::config::ConfigError>(())
//! ```

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Stage names the Python library reserves for its metadata keys.
pub const RESERVED_STAGE_NAMES: [&str; 3] = ["created", "completed", "error"];

/// The most workers one stage may have. Each worker is an actor (about
/// 10 KiB); a Thread, Cpu or Process worker is also an OS thread or process.
/// 100,000 Async workers took 960 MiB before any item ran, and 10^9 aborted
/// the program on allocation, so validation refuses more than this.
pub const MAX_WORKERS: usize = 10_000;

/// The largest `queue_size` of one stage. Buffers grow only with the items
/// that wait, but the window of the whole pipeline is the sum of every
/// stage's `queue_size + workers`, which must not overflow.
pub const MAX_QUEUE_SIZE: usize = u32::MAX as usize;

/// The longest duration any field may hold: 10 years (365-day years). A
/// longer timeout, retry delay, window or interval cannot be told from
/// "never" and overflows the clock's arithmetic (`timeout = 1e19` made every
/// Thread attempt panic), so validation refuses it.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// The shortest period of a repeating timer (`stats_interval_seconds`,
/// `queue_refresh_rate`): 1 ms. A shorter one fires faster than the pipeline
/// can answer it (`stats_interval_seconds = 1e-7` grew an idle pipeline's
/// memory by 900 MiB in 6 s and hung `stop()`), so validation refuses it.
pub const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// A batch stage's batcher holds at most this many batches' worth of
/// items (`BATCHER_ROOM * batch_size`): with more keys filling at once, the
/// oldest batch is cut before it is full.
pub const BATCHER_ROOM: usize = 4;

/// How a stage runs its handler.
///
/// | seed          | here      | runs on                                         |
/// |---------------|-----------|-------------------------------------------------|
/// | `ASYNC`       | `Async`   | the tokio runtime, awaited by each worker       |
/// | `THREAD`      | `Thread`  | threads owned by the stage, at most `workers` busy |
/// | `INTERPRETER` | `Cpu`     | the same, for CPU-bound work: `workers` = cores |
/// | `PROCESS`     | `Process` | worker OS processes (crash isolation)           |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ExecutionType {
    /// An `async fn` handler awaited on the tokio runtime: I/O-bound work.
    Async,
    /// A blocking `fn` handler on a thread of the stage's: blocking I/O, FFI.
    Thread,
    /// A blocking `fn` handler on a thread of the stage's: CPU-bound work.
    /// Config files may also say `"interpreter"`, the seed's name for it.
    #[serde(alias = "interpreter")]
    Cpu,
    /// A handler in worker OS processes: crash isolation.
    Process,
}

impl ExecutionType {
    /// The lowercase name used in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionType::Async => "async",
            ExecutionType::Thread => "thread",
            ExecutionType::Cpu => "cpu",
            ExecutionType::Process => "process",
        }
    }

    /// The kind of handler a stage of this model is bound with.
    pub(crate) fn handler_kind(self) -> HandlerKind {
        match self {
            ExecutionType::Async => HandlerKind::Async,
            ExecutionType::Thread | ExecutionType::Cpu => HandlerKind::Blocking,
            ExecutionType::Process => HandlerKind::Process,
        } // no `_ =>`: a new model does not compile until it has a place
    }
}

/// Which builder method binds a stage's handler: the three shapes of
/// handler, one per family of execution models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandlerKind {
    /// An `async fn`, for `Async` stages.
    Async,
    /// A blocking `fn`, for `Thread` and `Cpu` stages.
    Blocking,
    /// A plain `fn` over serde data, for `Process` stages.
    Process,
}

impl std::fmt::Display for ExecutionType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One stage of a pipeline: its name, execution model, concurrency and buffer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct StageConfig {
    /// Unique name; the handler is bound to it. Not `created`, `completed` or `error`.
    pub name: String,
    /// How the handler runs.
    pub execution_type: ExecutionType,
    /// How many items this stage works on at once. Default 5; at most
    /// [`MAX_WORKERS`].
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// How many items may wait in front of this stage. Default 1000; at
    /// most [`MAX_QUEUE_SIZE`].
    #[serde(default = "default_queue_size")]
    pub queue_size: usize,
    /// Fail the pipeline if this stage replaces more workers than this
    /// within a time window (a crash loop); none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_budget: Option<RestartBudget>,
    /// How long one attempt may take; none by default. An Async attempt is
    /// cancelled at the deadline, a Process attempt's child is killed, and a
    /// Thread or Cpu attempt (which cannot be interrupted) is failed
    /// `TimedOut` and its late result discarded. Seconds in files; at most
    /// [`MAX_DURATION`].
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_seconds")]
    pub timeout: Option<Duration>,
    /// Whether and how a failed attempt is tried again; none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// At most this many items (or units of an item's cost) start per
    /// interval, with a burst; none by default. Changeable while running
    /// (`Pipeline::set_rate_limit`). See [`RateLimit`] and
    /// `docs/flow-policies.md`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Keep the input order at the stage's output, however many workers
    /// run and however long each item takes: items done early wait in the
    /// stage (counted against its room) for the ones before them. Failures
    /// leave in their place too. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ordered: bool,
    /// A worker range the stage tunes its count within, from the latency
    /// and errors it measures; `workers` is where it starts (brought into
    /// the range). None by default: `workers` stays as set. See
    /// [`AdaptiveWorkers`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<AdaptiveWorkers>,
    /// A batch stage's batches hold at most this many items (bound with a
    /// `*_batch_stage` method of the builder); none by default. A batch is
    /// cut when it is full, [`batch_timeout`](Self::batch_timeout) after its
    /// first item, when its stage's batcher holds `4 * batch_size` items
    /// (its oldest batch goes then), or as soon as the input is closed.
    /// At most [`MAX_QUEUE_SIZE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// How long a batch waits for more items after its first; 1 s when
    /// `batch_size` is set and this is not. Seconds in files.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_seconds")]
    pub batch_timeout: Option<Duration>,
}

/// The range an adaptive stage keeps its worker count in. The stage grows
/// while every worker is busy and latency stays near the lowest it has
/// seen, and shrinks in proportion when latency grows past it (or by a
/// quarter when attempts fail): see `docs/flow-policies.md` for the rule.
/// The count it chose is `StageStats::workers`.
///
/// In files: `adaptive = { min = 1, max = 64 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AdaptiveWorkers {
    /// The fewest workers; at least 1.
    pub min: usize,
    /// The most workers; at most [`MAX_WORKERS`].
    pub max: usize,
}

impl AdaptiveWorkers {
    /// Between `min` and `max` workers.
    pub fn new(min: usize, max: usize) -> Self {
        AdaptiveWorkers { min, max }
    }

    fn check(&self) -> Result<(), (&'static str, String)> {
        check_workers(self.min).map_err(|m| ("adaptive.min", m))?;
        check_workers(self.max).map_err(|m| ("adaptive.max", m))?;
        if self.min > self.max {
            return Err((
                "adaptive.max",
                format!(
                    "must be at least adaptive.min ({}), not {}",
                    self.min, self.max
                ),
            ));
        }
        Ok(())
    }
}

/// A stage's rate limit: at most `allowed` units per `interval`, spread
/// evenly (one unit every `interval / allowed`), of which up to `burst` may
/// be used at once after a quiet spell. A unit is one item, unless the
/// stage was bound with a cost function
/// ([`cost_by`](crate::PipelineBuilder::cost_by)). Over any window
/// of length `w`, at most `burst + allowed * w / interval` units start.
///
/// In files: `rate_limit = { allowed = 50, interval = 1.0, burst = 1 }`
/// (seconds; `interval` defaults to 1 s and `burst` to 1).
///
/// ```
/// use std::time::Duration;
/// use bergtalzug_actors::config::RateLimit;
///
/// let limit = RateLimit::per_second(50).burst(10);
/// assert_eq!(limit.period(), Duration::from_millis(20));
/// assert_eq!(RateLimit::new(3, Duration::from_secs(60)).period(), Duration::from_secs(20));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RateLimit {
    /// Units allowed per `interval`; at least 1.
    pub allowed: u32,
    /// The interval. Default 1 s; seconds in files.
    #[serde(default = "default_rate_interval", with = "seconds")]
    pub interval: Duration,
    /// Units that may start at once after a quiet spell. Default 1 (the
    /// smoothest: one every `interval / allowed`). An item that costs more
    /// than the burst is charged the burst.
    #[serde(default = "default_burst")]
    pub burst: u32,
}

fn default_rate_interval() -> Duration {
    Duration::from_secs(1)
}

fn default_burst() -> u32 {
    1
}

impl RateLimit {
    /// At most `allowed` units per `interval`, with a burst of 1.
    pub fn new(allowed: u32, interval: Duration) -> Self {
        RateLimit {
            allowed,
            interval,
            burst: default_burst(),
        }
    }

    /// At most `allowed` units a second, with a burst of 1.
    pub fn per_second(allowed: u32) -> Self {
        Self::new(allowed, Duration::from_secs(1))
    }

    /// Lets up to `burst` units start at once after a quiet spell.
    pub fn burst(mut self, burst: u32) -> Self {
        self.burst = burst;
        self
    }

    /// The time one unit takes to come back: `interval / allowed`.
    pub fn period(&self) -> Duration {
        self.interval / self.allowed.max(1)
    }

    /// Checks the fields, naming the one that is wrong (`rate_limit.allowed`).
    pub(crate) fn check(&self) -> Result<(), (&'static str, String)> {
        if self.allowed == 0 {
            return Err(("rate_limit.allowed", "must be at least 1".into()));
        }
        if self.burst == 0 {
            return Err(("rate_limit.burst", "must be at least 1".into()));
        }
        check_at_most_max("rate_limit.interval", self.interval)?;
        if self.period().is_zero() {
            return Err((
                "rate_limit.interval",
                format!(
                    "must leave at least 1 ns per unit: {} s for {} units is too short",
                    self.interval.as_secs_f64(),
                    self.allowed
                ),
            ));
        }
        Ok(())
    }

    /// Checks a rate limit for stage `stage`, as validation does.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidStage`] naming the stage and the field.
    pub fn validate_for(&self, stage: &str) -> Result<(), ConfigError> {
        self.check()
            .map_err(|(field, message)| ConfigError::InvalidStage {
                stage: stage.to_string(),
                field: field.into(),
                message,
            })
    }
}

/// How a stage tries a failed item again: up to `max_attempts` attempts in
/// all, waiting `initial_delay`, then `multiplier` times longer after each
/// further failure, never more than `max_delay`, with up to `jitter` of each
/// wait taken off at random so that retries spread out.
///
/// A retry waits without holding a worker and then re-enters the stage's
/// queue. Every failure is retried except a cancellation and an error the
/// handler marks [`Permanent`](crate::item::Permanent).
///
/// In files:
/// `retry = { max_attempts = 3, initial_delay = 0.05, multiplier = 2.0, max_delay = 5.0, jitter = 0.2 }`
/// (only `max_attempts` and `initial_delay` are required; the rest default
/// to a fixed delay with no jitter and a 30 s cap).
///
/// ```
/// use std::time::Duration;
/// use bergtalzug_actors::config::RetryPolicy;
///
/// let policy = RetryPolicy::exponential(4, Duration::from_millis(100))
///     .max_delay(Duration::from_millis(250));
/// assert_eq!(policy.delay_before(2, 0.0), Duration::from_millis(100));
/// assert_eq!(policy.delay_before(3, 0.0), Duration::from_millis(200));
/// assert_eq!(policy.delay_before(4, 0.0), Duration::from_millis(250));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// All attempts, the first included; 1 means never retry.
    pub max_attempts: u32,
    /// The wait before the second attempt.
    #[serde(with = "seconds")]
    pub initial_delay: Duration,
    /// Each further wait is this many times the previous one; 1 is a fixed
    /// delay. At least 1.
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
    /// No wait is longer than this. Default 30 s.
    #[serde(default = "default_max_delay", with = "seconds")]
    pub max_delay: Duration,
    /// The share of each wait, from 0 to 1, that may be taken off at random.
    /// Default 0.
    #[serde(default)]
    pub jitter: f64,
}

fn default_multiplier() -> f64 {
    1.0
}

fn default_max_delay() -> Duration {
    Duration::from_secs(30)
}

impl RetryPolicy {
    /// Up to `max_attempts` attempts in all, `delay` apart.
    pub fn fixed(max_attempts: u32, delay: Duration) -> Self {
        RetryPolicy {
            max_attempts,
            initial_delay: delay,
            multiplier: 1.0,
            max_delay: default_max_delay().max(delay),
            jitter: 0.0,
        }
    }

    /// Up to `max_attempts` attempts in all, waiting `initial_delay` and then
    /// twice as long after each further failure (30 s at most).
    pub fn exponential(max_attempts: u32, initial_delay: Duration) -> Self {
        RetryPolicy {
            multiplier: 2.0,
            ..Self::fixed(max_attempts, initial_delay)
        }
    }

    /// Sets the growth factor between waits (at least 1).
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// Caps every wait.
    pub fn max_delay(mut self, max_delay: Duration) -> Self {
        self.max_delay = max_delay;
        self
    }

    /// Takes up to this share (0 to 1) of each wait off at random.
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// The wait before attempt number `attempt` (2 for the first retry).
    /// `random` in `[0, 1)` picks how much jitter is taken off.
    pub fn delay_before(&self, attempt: u32, random: f64) -> Duration {
        let retries = attempt.saturating_sub(2).min(1024) as i32;
        let base = self.initial_delay.as_secs_f64() * self.multiplier.powi(retries);
        let capped = base.min(self.max_delay.as_secs_f64());
        let jittered = capped * (1.0 - self.jitter.clamp(0.0, 1.0) * random.clamp(0.0, 1.0));
        Duration::try_from_secs_f64(jittered).unwrap_or(self.max_delay)
    }

    fn check(&self) -> Result<(), (&'static str, String)> {
        if self.max_attempts == 0 {
            return Err(("retry.max_attempts", "must be at least 1".into()));
        }
        check_at_most_max("retry.initial_delay", self.initial_delay)?;
        check_at_most_max("retry.max_delay", self.max_delay)?;
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err((
                "retry.multiplier",
                format!(
                    "must be a finite number of at least 1, not {}",
                    self.multiplier
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err((
                "retry.jitter",
                format!("must be between 0 and 1, not {}", self.jitter),
            ));
        }
        Ok(())
    }
}

/// How many worker replacements a stage may make within a window before
/// the pipeline fails loudly instead of replacing workers forever.
///
/// In files: `restart_budget = { max_restarts = 10, window = 60.0 }`
/// (seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RestartBudget {
    /// Replacements allowed within `window`; one more fails the pipeline.
    pub max_restarts: u32,
    /// The sliding window.
    #[serde(with = "seconds")]
    pub window: Duration,
}

impl RestartBudget {
    /// At most `max_restarts` replacements within any `window`.
    pub fn new(max_restarts: u32, window: Duration) -> Self {
        RestartBudget {
            max_restarts,
            window,
        }
    }
}

/// Refuses a duration longer than [`MAX_DURATION`], naming `field`.
fn check_at_most_max(field: &'static str, d: Duration) -> Result<(), (&'static str, String)> {
    if d > MAX_DURATION {
        return Err((
            field,
            format!(
                "must be at most {} s (10 years), not {} s",
                MAX_DURATION.as_secs(),
                d.as_secs_f64()
            ),
        ));
    }
    Ok(())
}

/// Refuses a timer period that is neither zero (when `zero_ok`) nor between
/// [`MIN_INTERVAL`] and [`MAX_DURATION`], naming `field`.
fn check_interval(
    field: &'static str,
    d: Duration,
    zero_ok: bool,
) -> Result<(), (&'static str, String)> {
    if d.is_zero() && zero_ok {
        return Ok(());
    }
    if d < MIN_INTERVAL {
        let off = if zero_ok { "zero (off) or " } else { "" };
        return Err((
            field,
            format!(
                "must be {off}at least 0.001 s (1 ms), not {} s",
                d.as_secs_f64()
            ),
        ));
    }
    check_at_most_max(field, d)
}

/// Refuses a worker count outside `1..=MAX_WORKERS`.
pub(crate) fn check_workers(workers: usize) -> Result<(), String> {
    if workers == 0 {
        return Err("must be at least 1".into());
    }
    if workers > MAX_WORKERS {
        return Err(format!("must be at most {MAX_WORKERS}, not {workers}"));
    }
    Ok(())
}

fn default_workers() -> usize {
    5
}

fn default_queue_size() -> usize {
    1000
}

impl StageConfig {
    /// A stage with the seed's defaults: 5 workers, a queue of 1000.
    pub fn new(name: impl Into<String>, execution_type: ExecutionType) -> Self {
        StageConfig {
            name: name.into(),
            execution_type,
            workers: default_workers(),
            queue_size: default_queue_size(),
            restart_budget: None,
            timeout: None,
            retry: None,
            rate_limit: None,
            ordered: false,
            adaptive: None,
            batch_size: None,
            batch_timeout: None,
        }
    }

    /// Makes this a batch stage: its handler gets batches of at most
    /// `size` items, cut at the latest `timeout` after their first item
    /// (see [`StageConfig::batch_size`]).
    pub fn batch(mut self, size: usize, timeout: Duration) -> Self {
        self.batch_size = Some(size);
        self.batch_timeout = Some(timeout);
        self
    }

    /// The batch timeout in force: `batch_timeout`, or 1 s.
    pub fn batch_wait(&self) -> Duration {
        self.batch_timeout.unwrap_or(Duration::from_secs(1))
    }

    /// Items (not batches) this stage may hold: [`capacity`](Self::capacity)
    /// for a plain stage; for a batch stage, its capacity in batches of
    /// `batch_size` plus its batcher's `4 * batch_size` ([`BATCHER_ROOM`]). Their sum over the
    /// stages is the pipeline's window of admitted items.
    pub fn item_room(&self) -> usize {
        self.item_room_with(self.workers)
    }

    /// [`item_room`](Self::item_room) once the stage has `workers` workers
    /// (it was resized while running).
    pub(crate) fn item_room_with(&self, workers: usize) -> usize {
        let capacity = self.capacity_with(workers);
        match self.batch_size {
            None => capacity,
            Some(size) => capacity
                .saturating_mul(size)
                .saturating_add(size.saturating_mul(BATCHER_ROOM)),
        }
    }

    /// Lets the stage tune its worker count within `min..=max` (see
    /// [`AdaptiveWorkers`]); `workers` is where it starts.
    pub fn adaptive(mut self, min: usize, max: usize) -> Self {
        self.adaptive = Some(AdaptiveWorkers::new(min, max));
        self
    }

    /// The worker count the stage starts with: `workers`, brought into the
    /// adaptive range if there is one.
    pub fn initial_workers(&self) -> usize {
        match self.adaptive {
            Some(range) if range.min <= range.max => self.workers.clamp(range.min, range.max),
            _ => self.workers,
        }
    }

    /// Limits how many items (or units of cost) start per interval; see
    /// [`RateLimit`].
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = Some(limit);
        self
    }

    /// Keeps the input order at the stage's output (see
    /// [`StageConfig::ordered`]).
    pub fn ordered(mut self, on: bool) -> Self {
        self.ordered = on;
        self
    }

    /// Limits how long one attempt may take.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Tries failed items again under `policy`. The stage's input type must
    /// be `Clone` (checked when the handler is bound).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// How many attempts this stage makes at most: 1 without a retry policy.
    pub fn max_attempts(&self) -> u32 {
        self.retry.map_or(1, |r| r.max_attempts)
    }

    /// Sets how many items this stage works on at once.
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Fails the pipeline when this stage replaces more workers than the
    /// budget allows.
    pub fn restart_budget(mut self, budget: RestartBudget) -> Self {
        self.restart_budget = Some(budget);
        self
    }

    /// Sets how many items may wait in front of this stage.
    pub fn queue_size(mut self, queue_size: usize) -> Self {
        self.queue_size = queue_size;
        self
    }

    /// The most items this stage holds at once: waiting, being worked on, or
    /// done and waiting for the next stage to ask for them.
    /// (With an adaptive range, the most workers it may have.)
    pub fn capacity(&self) -> usize {
        self.capacity_with(self.workers)
    }

    /// [`capacity`](Self::capacity) with `workers` workers.
    fn capacity_with(&self, workers: usize) -> usize {
        let workers = match self.adaptive {
            Some(range) => range.max.max(workers),
            None => workers,
        };
        self.queue_size.saturating_add(workers)
    }
}

/// A whole pipeline: its name, stages in order, and pipeline-wide settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PipelineConfig {
    /// The name used in logs, events and stats.
    pub pipeline_name: String,
    /// The stages, in the order items flow through them.
    pub stages: Vec<StageConfig>,
    /// After a failing `refill`, how long to wait before asking the source
    /// again. Default 1 s; at least [`MIN_INTERVAL`]. (The seed also polls
    /// at this rate; here refill is demand-driven and never waits for it.)
    /// Seconds in files.
    #[serde(default = "default_refresh", with = "seconds")]
    pub queue_refresh_rate: Duration,
    /// How often the stats line is logged; zero disables it. Default 10 s;
    /// otherwise at least [`MIN_INTERVAL`]. `stats_interval_seconds` in files.
    #[serde(
        default = "default_stats_interval",
        rename = "stats_interval_seconds",
        with = "seconds"
    )]
    pub stats_interval: Duration,
    /// Stamp per-stage times on every item, keep timing statistics, refuse
    /// duplicate job ids, and keep results for `run()`. Default true. Off,
    /// as in the seed, nothing is kept per item: `run()` returns no results
    /// (whatever `retain_results` says); completion callbacks, events, dead
    /// letters and the counts in stats still work.
    #[serde(default = "default_true")]
    pub enable_tracking: bool,
    /// Keep every item's `WorkItemResult` and return them from `run()`.
    /// Default true (the seed's behaviour); turn off for unbounded inputs and
    /// use completion callbacks or events instead. Results are kept only
    /// when `enable_tracking` is on too.
    #[serde(default = "default_true")]
    pub retain_results: bool,
    /// Report an item a worker has held longer than this: a
    /// `PipelineEvent::ItemStalled` and a warning naming the job id, stage,
    /// worker and age, once per item and stage. None (the default) turns
    /// stall detection off. `stall_threshold_seconds` in files.
    #[serde(
        default,
        rename = "stall_threshold_seconds",
        skip_serializing_if = "Option::is_none",
        with = "opt_seconds"
    )]
    pub stall_threshold: Option<Duration>,
    /// After this many failed refills in a row the source is given up: the
    /// input closes, the items already admitted finish, and `run()` returns
    /// `PipelineError::SourceFailed` with the last error (and what
    /// completed, through `run_outcome()`). Default 5: at the default
    /// `queue_refresh_rate` the run ends about 15 s after the first failure
    /// of a source that never recovers, whether or not a tracing subscriber
    /// shows the warnings. 0 never gives up (the seed's behaviour).
    #[serde(default = "default_refill_failures")]
    pub max_refill_failures: u32,
}

fn default_refill_failures() -> u32 {
    5
}

fn default_refresh() -> Duration {
    Duration::from_secs(1)
}

fn default_stats_interval() -> Duration {
    Duration::from_secs(10)
}

fn default_true() -> bool {
    true
}

impl PipelineConfig {
    /// A pipeline with the seed's defaults.
    pub fn new(pipeline_name: impl Into<String>, stages: Vec<StageConfig>) -> Self {
        PipelineConfig {
            pipeline_name: pipeline_name.into(),
            stages,
            queue_refresh_rate: default_refresh(),
            stats_interval: default_stats_interval(),
            enable_tracking: true,
            retain_results: true,
            stall_threshold: None,
            max_refill_failures: default_refill_failures(),
        }
    }

    /// Sets the wait after a failing `refill` before the source is asked again.
    pub fn queue_refresh_rate(mut self, rate: Duration) -> Self {
        self.queue_refresh_rate = rate;
        self
    }

    /// Sets how often the stats line is logged; zero disables it.
    pub fn stats_interval(mut self, interval: Duration) -> Self {
        self.stats_interval = interval;
        self
    }

    /// Turns per-item tracking on or off (off: no results are kept; see
    /// [`PipelineConfig::enable_tracking`]).
    pub fn enable_tracking(mut self, on: bool) -> Self {
        self.enable_tracking = on;
        self
    }

    /// Reports items held by a worker longer than `threshold` (see
    /// [`PipelineConfig::stall_threshold`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// use bergtalzug_actors::config::{ExecutionType, PipelineConfig, StageConfig};
    ///
    /// let config = PipelineConfig::new("p", vec![StageConfig::new("s", ExecutionType::Async)])
    ///     .stall_threshold(Duration::from_secs(30));
    /// assert_eq!(config.stall_threshold, Some(Duration::from_secs(30)));
    /// ```
    pub fn stall_threshold(mut self, threshold: Duration) -> Self {
        self.stall_threshold = Some(threshold);
        self
    }

    /// Gives up the source after `failures` failed refills in a row (0:
    /// never); see [`PipelineConfig::max_refill_failures`].
    pub fn max_refill_failures(mut self, failures: u32) -> Self {
        self.max_refill_failures = failures;
        self
    }

    /// Keeps every item's result for `run()` to return, or not.
    pub fn retain_results(mut self, on: bool) -> Self {
        self.retain_results = on;
        self
    }

    /// Parses and validates a TOML document with the seed's keys.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let config: PipelineConfig =
            serde_path_to_error::deserialize(toml::Deserializer::new(text))
                .map_err(|e| parse_error("TOML", e))?;
        config.validate()?;
        Ok(config)
    }

    /// Parses and validates a JSON document with the seed's keys.
    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let mut de = serde_json::Deserializer::from_str(text);
        let config: PipelineConfig =
            serde_path_to_error::deserialize(&mut de).map_err(|e| parse_error("JSON", e))?;
        de.end().map_err(|e| ConfigError::Parse {
            format: "JSON",
            field: None,
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a `.toml` or `.json` file.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        match path.extension().and_then(|e| e.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("json") => Self::from_json_str(&text),
            Some(ext) if ext.eq_ignore_ascii_case("toml") => Self::from_toml_str(&text),
            _ => Err(ConfigError::Io {
                path: path.display().to_string(),
                message: "unknown file type: use a .toml or .json file".into(),
            }),
        }
    }

    /// Checks the rules the Python library checks, and a few more: at least
    /// one stage; unique, non-empty, non-reserved names; workers and
    /// queue_size above zero; and what would parse but could not run:
    /// at most [`MAX_WORKERS`] workers and a `queue_size` of at most
    /// [`MAX_QUEUE_SIZE`] per stage, no duration longer than
    /// [`MAX_DURATION`], and timer periods (`stats_interval_seconds`,
    /// `queue_refresh_rate`) of at least [`MIN_INTERVAL`] (or zero, for the
    /// stats line, to turn it off).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.pipeline_name.trim().is_empty() {
            return Err(ConfigError::Invalid {
                field: "pipeline_name".into(),
                message: "must not be empty".into(),
            });
        }
        if self.stages.is_empty() {
            return Err(ConfigError::Invalid {
                field: "stages".into(),
                message: "must list at least one stage".into(),
            });
        }
        if self.stall_threshold.is_some_and(|t| t.is_zero()) {
            return Err(ConfigError::Invalid {
                field: "stall_threshold_seconds".into(),
                message: "must be longer than zero".into(),
            });
        }
        let pipeline_checks = [
            check_interval("queue_refresh_rate", self.queue_refresh_rate, false),
            check_interval("stats_interval_seconds", self.stats_interval, true),
            self.stall_threshold
                .map_or(Ok(()), |t| check_at_most_max("stall_threshold_seconds", t)),
        ];
        if let Some(Err((field, message))) = pipeline_checks.into_iter().find(Result::is_err) {
            return Err(ConfigError::Invalid {
                field: field.into(),
                message,
            });
        }
        let mut seen = std::collections::HashSet::new();
        for stage in &self.stages {
            let invalid = |field: &str, message: String| ConfigError::InvalidStage {
                stage: stage.name.clone(),
                field: field.into(),
                message,
            };
            if stage.name.trim().is_empty() {
                return Err(invalid("name", "must not be empty".into()));
            }
            if RESERVED_STAGE_NAMES.contains(&stage.name.as_str()) {
                return Err(invalid(
                    "name",
                    "must not be one of the reserved names created, completed and error".into(),
                ));
            }
            if !seen.insert(stage.name.as_str()) {
                return Err(invalid("name", "is used by more than one stage".into()));
            }
            check_workers(stage.workers).map_err(|message| invalid("workers", message))?;
            if stage.queue_size == 0 {
                return Err(invalid("queue_size", "must be at least 1".into()));
            }
            if stage.queue_size > MAX_QUEUE_SIZE {
                return Err(invalid(
                    "queue_size",
                    format!("must be at most {MAX_QUEUE_SIZE}, not {}", stage.queue_size),
                ));
            }
            if stage.ordered && stage.capacity() > u32::MAX as usize {
                return Err(invalid(
                    "queue_size",
                    format!(
                        "of an ordered stage must leave queue_size + workers at most {}",
                        u32::MAX
                    ),
                ));
            }
            if stage.restart_budget.is_some_and(|b| b.window.is_zero()) {
                return Err(invalid(
                    "restart_budget.window",
                    "must be longer than zero".into(),
                ));
            }
            match (stage.batch_size, stage.batch_timeout) {
                (Some(0), _) => return Err(invalid("batch_size", "must be at least 1".into())),
                (Some(n), _) if n > MAX_QUEUE_SIZE => {
                    return Err(invalid(
                        "batch_size",
                        format!("must be at most {MAX_QUEUE_SIZE}, not {n}"),
                    ));
                }
                (None, Some(_)) => {
                    return Err(invalid(
                        "batch_timeout",
                        "is set but batch_size is not: a batch stage needs both".into(),
                    ));
                }
                (_, Some(t)) if t.is_zero() => {
                    return Err(invalid("batch_timeout", "must be longer than zero".into()));
                }
                _ => {}
            }
            if stage.timeout.is_some_and(|t| t.is_zero()) {
                return Err(invalid("timeout", "must be longer than zero".into()));
            }
            let durations = [
                stage.timeout.map(|t| check_at_most_max("timeout", t)),
                stage
                    .restart_budget
                    .map(|b| check_at_most_max("restart_budget.window", b.window)),
                stage.retry.map(|r| r.check()),
                stage.rate_limit.map(|r| r.check()),
                stage.adaptive.map(|a| a.check()),
                stage
                    .batch_timeout
                    .map(|t| check_at_most_max("batch_timeout", t)),
            ];
            if let Some(Some(Err((field, message)))) =
                durations.into_iter().find(|c| matches!(c, Some(Err(_))))
            {
                return Err(invalid(field, message));
            }
        }
        Ok(())
    }

    /// The index of the stage called `name`.
    pub fn stage_index(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.name == name)
    }
}

/// Why a configuration was rejected. Every variant names the field, and the
/// stage where there is one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A pipeline-level field has a bad value.
    #[error("invalid pipeline config: `{field}` {message}")]
    Invalid {
        /// The field, e.g. `stages`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A stage's field has a bad value.
    #[error("invalid config for stage `{stage}`: `{field}` {message}")]
    InvalidStage {
        /// The stage's name as written.
        stage: String,
        /// The field, e.g. `workers`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The text is not a valid config document.
    #[error("cannot parse {format} config{}: {message}", field.as_ref().map(|f| format!(" (field `{f}`)")).unwrap_or_default())]
    Parse {
        /// `TOML` or `JSON`.
        format: &'static str,
        /// The field the parser complained about, when it named one.
        field: Option<String>,
        /// The parser's message.
        message: String,
    },
    /// The file could not be read.
    #[error("cannot read config file {path}: {message}")]
    Io {
        /// The path as given.
        path: String,
        /// The I/O error.
        message: String,
    },
}

/// Turns a parser error into a [`ConfigError::Parse`] naming the field: the
/// path to where parsing stopped (`stages[1].workers`), plus the field a
/// "missing field" or "unknown field" message names.
fn parse_error<E: std::fmt::Display>(
    format: &'static str,
    e: serde_path_to_error::Error<E>,
) -> ConfigError {
    let message = one_line(&e.inner().to_string());
    let path = e.path().to_string();
    let named = ["missing field `", "unknown field `"]
        .iter()
        .find_map(|marker| {
            let start = message.find(marker)? + marker.len();
            let len = message[start..].find('`')?;
            Some((
                marker.starts_with("missing"),
                message[start..start + len].to_string(),
            ))
        });
    let (missing, named) = match named {
        Some((missing, name)) => (missing, Some(name)),
        None => (false, None),
    };
    let field = match (path.as_str(), named) {
        (".", None) | ("", None) => None,
        (".", Some(name)) | ("", Some(name)) => Some(name),
        (path, Some(name)) if missing => Some(format!("{path}.{name}")),
        (path, _) => Some(path.to_string()),
    };
    ConfigError::Parse {
        format,
        field,
        message,
    }
}

/// A parser's message on one line. The toml crate writes the position, a
/// snippet with a caret, and the message last: keep the message and the
/// position.
fn one_line(message: &str) -> String {
    let mut lines = message.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default();
    match (
        first.strip_prefix("TOML parse error at "),
        lines.next_back(),
    ) {
        (Some(position), Some(last)) => format!("{last} (at {position})"),
        _ => first.to_string(),
    }
}

/// Durations as fractional seconds, as the seed writes them.
mod seconds {
    use super::*;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(|_| {
            serde::de::Error::custom(format!(
                "{secs} is not a duration in seconds (must be finite and not negative)"
            ))
        })
    }
}

/// Optional durations as fractional seconds.
mod opt_seconds {
    use super::*;

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Secs(#[serde(with = "seconds")] Duration);
        Ok(Option::<Secs>::deserialize(d)?.map(|Secs(d)| d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_seeds() {
        let c = PipelineConfig::new("p", vec![StageConfig::new("a", ExecutionType::Async)]);
        assert_eq!(c.stages[0].workers, 5);
        assert_eq!(c.stages[0].queue_size, 1000);
        assert_eq!(c.queue_refresh_rate, Duration::from_secs(1));
        assert_eq!(c.stats_interval, Duration::from_secs(10));
        assert!(c.enable_tracking && c.retain_results);
    }

    #[test]
    fn validation_names_the_stage_and_field() {
        let c = PipelineConfig::new(
            "p",
            vec![StageConfig::new("fetch", ExecutionType::Async).workers(0)],
        );
        let e = c.validate().unwrap_err();
        assert!(
            matches!(&e, ConfigError::InvalidStage { stage, field, .. } if stage == "fetch" && field == "workers")
        );
        assert!(e.to_string().contains("fetch") && e.to_string().contains("workers"));

        for reserved in RESERVED_STAGE_NAMES {
            let c =
                PipelineConfig::new("p", vec![StageConfig::new(reserved, ExecutionType::Async)]);
            assert!(c.validate().unwrap_err().to_string().contains("reserved"));
        }
        let dup = PipelineConfig::new(
            "p",
            vec![
                StageConfig::new("a", ExecutionType::Async),
                StageConfig::new("a", ExecutionType::Thread),
            ],
        );
        assert!(
            dup.validate()
                .unwrap_err()
                .to_string()
                .contains("more than one")
        );
        assert!(PipelineConfig::new("p", vec![]).validate().is_err());
    }

    #[test]
    fn errors_read_as_sentences() {
        let none = PipelineConfig::new("p", vec![]).validate().unwrap_err();
        assert_eq!(
            none.to_string(),
            "invalid pipeline config: `stages` must list at least one stage"
        );
        let reserved =
            PipelineConfig::new("p", vec![StageConfig::new("error", ExecutionType::Async)])
                .validate()
                .unwrap_err();
        assert_eq!(
            reserved.to_string(),
            "invalid config for stage `error`: `name` must not be one of the reserved names created, completed and error"
        );
        let fast = PipelineConfig::new("p", vec![StageConfig::new("a", ExecutionType::Async)])
            .stats_interval(Duration::from_nanos(100))
            .validate()
            .unwrap_err();
        assert_eq!(
            fast.to_string(),
            "invalid pipeline config: `stats_interval_seconds` must be zero (off) or at least 0.001 s (1 ms), not 0.0000001 s"
        );
        let long = PipelineConfig::new(
            "p",
            vec![
                StageConfig::new("a", ExecutionType::Thread).timeout(Duration::from_secs_f64(1e19)),
            ],
        )
        .validate()
        .unwrap_err();
        assert_eq!(
            long.to_string(),
            "invalid config for stage `a`: `timeout` must be at most 315360000 s (10 years), not 10000000000000000000 s"
        );
    }

    #[test]
    fn json_and_toml_agree() {
        let toml = PipelineConfig::from_toml_str(
            "pipeline_name = \"p\"\nqueue_refresh_rate = 0.5\n[[stages]]\nname = \"a\"\nexecution_type = \"thread\"\nworkers = 2\n",
        )
        .unwrap();
        let json = PipelineConfig::from_json_str(
            r#"{"pipeline_name":"p","queue_refresh_rate":0.5,"stages":[{"name":"a","execution_type":"thread","workers":2}]}"#,
        )
        .unwrap();
        assert_eq!(toml, json);
        assert_eq!(json.queue_refresh_rate, Duration::from_millis(500));
    }

    #[test]
    fn parse_errors_name_the_field() {
        let e = PipelineConfig::from_json_str(r#"{"pipeline_name":"p","stages":[{"name":"a"}]}"#)
            .unwrap_err();
        assert!(
            matches!(&e, ConfigError::Parse { field: Some(f), .. } if f == "stages[0].execution_type"),
            "{e}"
        );
        let e = PipelineConfig::from_toml_str(
            "pipeline_name = \"p\"\nstats_interval_seconds = -1\nstages = []",
        )
        .unwrap_err();
        assert!(e.to_string().contains("stats_interval_seconds"), "{e}");
    }
}
