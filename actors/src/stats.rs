//! Pipeline and per-stage statistics.
//!
//! Counts come from each stage's gauges (atomics the stage updates once per
//! message, readable at any time); durations and percentiles come from the
//! tracker, which records each finished item's per-stage times in HDR
//! histograms (when tracking is on). Rates and utilisation are measured over
//! the last [`RECENT_WINDOW`], from samples the pipeline takes every
//! second. Both serialise, durations as seconds (`null` when unknown).
//!
//! ```
//! use bergtalzug::PipelineStats;
//!
//! fn report(stats: &PipelineStats) {
//!     println!("{stats}"); // the one-line stats log
//!     if let Some(stage) = stats.bottleneck.as_deref().and_then(|b| stats.stage(b)) {
//!         println!(
//!             "{} is busy {:.0}% of the time, p99 service {:?}",
//!             stage.name,
//!             stage.utilisation * 100.0,
//!             stage.p99_duration
//!         );
//!     }
//!     let json = serde_json::to_string(stats).unwrap(); // for dashboards and scripts
//!     # drop(json);
//! }
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::config::ExecutionType;

/// The window over which `recent_items_per_second`, each stage's
/// `items_per_second` and `utilisation`, and the bottleneck are measured.
pub const RECENT_WINDOW: Duration = Duration::from_secs(10);

/// A snapshot of a pipeline: the seed's fields plus per-stage numbers.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct PipelineStats {
    /// The pipeline's name.
    pub pipeline_name: String,
    /// Time since the pipeline started.
    #[serde(serialize_with = "secs")]
    pub elapsed: Duration,
    /// Items taken into the pipeline so far.
    pub admitted_items: u64,
    /// Items the source said it would hand out in all (its
    /// [`size_hint`](crate::source::Source::size_hint) at the start), when
    /// it knows; progress bars use it as their total.
    pub expected_items: Option<u64>,
    /// Items in the pipeline now: admitted and not yet finished.
    pub active_items: u64,
    /// Items in each stage now: queued, being worked on, or waiting for the
    /// next stage.
    pub active_by_stage: BTreeMap<String, usize>,
    /// Items finished either way (the seed's `completed_items`).
    pub completed_items: u64,
    /// Items that failed (including cancelled ones).
    pub failed_items: u64,
    /// Items cancelled by an abort (part of `failed_items`).
    pub cancelled_items: u64,
    /// Successful share of `completed_items`; 1.0 before any finished.
    pub success_rate: f64,
    /// Mean created-to-finished time of finished items (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub average_duration: Option<Duration>,
    /// Median created-to-finished time (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub p50_duration: Option<Duration>,
    /// 90th-percentile created-to-finished time (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub p90_duration: Option<Duration>,
    /// 99th-percentile created-to-finished time (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub p99_duration: Option<Duration>,
    /// Finished items per second since the start.
    pub items_per_second: f64,
    /// Finished items per second over the last [`RECENT_WINDOW`].
    pub recent_items_per_second: f64,
    /// The stage whose workers were busiest over the last
    /// [`RECENT_WINDOW`] (highest `utilisation`); `None` while no stage has
    /// worked. When even its utilisation is well below 1.0, the input, not
    /// a stage, is what holds the pipeline back.
    pub bottleneck: Option<String>,
    /// Items reported stalled so far (see `PipelineConfig::stall_threshold`).
    pub stalled_items: u64,
    /// Failed `refill` calls so far (each is also a `SourceError` event).
    pub source_errors: u64,
    /// The observer the pipeline has been waiting for, for more than a
    /// second, right now: `subscriber at file:line:column` for a lossless
    /// event subscriber (see `EventFilter::lossless`), `dead-letter
    /// receiver` for a full dead-letter channel; `None` while it waits for
    /// no observer.
    pub held_back_by: Option<String>,
    /// Items split stages made (children, see [`crate::shape`]) that
    /// reached a result, either way. They are not admitted items: an
    /// admitted item that split counts once in `completed_items`, when all
    /// its descendants are finished.
    pub derived_items_finished: u64,
    /// Those of `derived_items_finished` that failed.
    pub derived_items_failed: u64,
    /// One entry per stage, in order.
    pub stages: Vec<StageStats>,
}

/// A snapshot of one stage.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct StageStats {
    /// The stage's name.
    pub name: String,
    /// Its execution model.
    pub execution_type: ExecutionType,
    /// Workers alive now.
    pub workers: usize,
    /// Items that entered its queue from upstream (the source for the first
    /// stage). A batch stage counts items in `admitted`, `processed`,
    /// `failed` and `items_per_second` (its batches are in
    /// [`batches`](Self::batches)).
    pub admitted: u64,
    /// Items its handler finished successfully.
    pub processed: u64,
    /// Items that failed in it (a batch stage's: alone, or with their
    /// batch).
    pub failed: u64,
    /// Items it retried (a batch stage's: batches, each retried whole).
    pub retried: u64,
    /// Items waiting in its queue now.
    pub queued: usize,
    /// Items its workers hold now: given to them, started or not (at most
    /// `workers` are running; an idle worker takes the others from a busy
    /// one, see docs/architecture.md, "The hand").
    pub in_flight: usize,
    /// Items done here and waiting for the next stage to ask for them.
    pub waiting_downstream: usize,
    /// Items its handler finished (either way) per second over the last
    /// [`RECENT_WINDOW`].
    pub items_per_second: f64,
    /// Share of its workers' time spent in the handler over the last
    /// [`RECENT_WINDOW`], from 0.0 to 1.0 (an item's time is counted when
    /// it finishes). Near 1.0: the stage is saturated.
    pub utilisation: f64,
    /// Items reported stalled in it so far.
    pub stalled: u64,
    /// Threads of a Thread or Cpu stage still running attempts it gave up
    /// (at the stage's timeout, or on abort), which cannot be stopped: each
    /// holds its stack and what its handler holds until the handler
    /// returns, then ends. Always 0 in other models.
    pub stuck_threads: usize,
    /// A batch stage's own counts, of batches; `None` for other stages.
    /// Its `queued`, `in_flight` and `waiting_downstream`, and its handler
    /// and queue times, are of batches too.
    pub batches: Option<BatchCounts>,
    /// Items this stage's split made (children), so far; 0 for a stage
    /// that does not split.
    pub derived: u64,
    /// Items this stage's split made that are not finished yet (nor split
    /// again): at most its budget, the room of the stages after it.
    pub derived_live: usize,
    /// Mean handler time (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub average_duration: Option<Duration>,
    /// Median handler time (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub p50_duration: Option<Duration>,
    /// 90th-percentile handler time (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub p90_duration: Option<Duration>,
    /// 99th-percentile handler time (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub p99_duration: Option<Duration>,
    /// Mean time items waited in its queue (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub average_queue_wait: Option<Duration>,
    /// Median queue wait (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub p50_queue_wait: Option<Duration>,
    /// 90th-percentile queue wait (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub p90_queue_wait: Option<Duration>,
    /// 99th-percentile queue wait (tracking on).
    #[serde(serialize_with = "secs_opt")]
    pub p99_queue_wait: Option<Duration>,
}

/// A batch stage's counts of batches (see [`StageStats::batches`]).
///
/// ```
/// use std::time::Duration;
/// use bergtalzug::prelude::*;
/// use bergtalzug::shape::Batch;
///
/// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = PipelineConfig::new("load", vec![
///     StageConfig::new("insert", ExecutionType::Async).batch(10, Duration::from_millis(50)),
/// ]);
/// let pipeline = Pipeline::builder(config)?
///     .source(sources::iter(0..100u32))
///     .async_batch_stage("insert", |batch: Batch<u32>| async move {
///         Ok(batch.into_items().into_iter().map(|row| Ok(row.data)).collect())
///     })
///     .build()?;
/// pipeline.run().await?;
/// let insert = pipeline.stats().await?.stages.remove(0);
/// assert_eq!(insert.processed, 100, "items");
/// assert_eq!(insert.batches.unwrap().processed, 10, "batches of 10");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct BatchCounts {
    /// Batches given to its handler.
    pub admitted: u64,
    /// Batches its handler returned outcomes for (some may be failures).
    pub processed: u64,
    /// Batches that failed whole (a handler error, a panic, the timeout).
    pub failed: u64,
    /// Batches it tried again.
    pub retried: u64,
}

impl PipelineStats {
    /// The stats of the stage called `name`.
    pub fn stage(&self, name: &str) -> Option<&StageStats> {
        self.stages.iter().find(|s| s.name == name)
    }
}

impl std::fmt::Display for PipelineStats {
    /// One line, the seed's stats log: the pipeline's counts and rate (over
    /// the recent window), then per stage its queue, items in workers,
    /// counts and utilisation.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: active {} completed {} failed {} success {:.1}% {:.0} items/s",
            self.pipeline_name,
            self.active_items,
            self.completed_items,
            self.failed_items,
            self.success_rate * 100.0,
            self.recent_items_per_second
        )?;
        if let Some(d) = self.average_duration {
            write!(f, " avg {:.1} ms", d.as_secs_f64() * 1e3)?;
        }
        for s in &self.stages {
            write!(
                f,
                " | {} q{} w{} done {} failed {} busy {:.0}%",
                s.name,
                s.queued,
                s.in_flight,
                s.processed,
                s.failed,
                s.utilisation * 100.0
            )?;
            if s.stuck_threads > 0 {
                write!(f, " stuck threads {}", s.stuck_threads)?;
            }
        }
        if let Some(b) = &self.bottleneck {
            write!(f, " | bottleneck {b}")?;
        }
        if let Some(o) = &self.held_back_by {
            write!(f, " | held back by {o}")?;
        }
        Ok(())
    }
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn secs_opt<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&d.as_secs_f64()),
        None => s.serialize_none(),
    }
}
