//! The monitor: a task beside the pipeline's actors that watches, and never
//! touches the data path.
//!
//! Every tick it
//!
//! - samples the counters for the recent window of [`crate::stats`]
//!   (throughput, utilisation, bottleneck), every [`SAMPLE_EVERY`];
//! - with the `metrics` feature, copies the stage gauges and counters to
//!   the `metrics` facade, every [`SAMPLE_EVERY`];
//! - with a `stall_threshold`, asks each stage to report the items its
//!   workers have held that long ([`report_stall`]), every quarter of the
//!   threshold (between 10 ms and 1 s), so a stall is noticed at most a
//!   quarter of the threshold late.
//!
//! It is spawned by the root once the actors are wired and ends with the
//! pipeline. It costs one wake-up per tick and one message per stage per
//! stall check.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ractor::ActorRef;

use crate::event::{PipelineEvent, WorkerId};
use crate::item::JobId;
use crate::shared::Shared;
use crate::stats::SAMPLE_EVERY;
use crate::tracker::TrackerMsg;

/// Asks a stage to report its stalled items (those held this long).
pub(crate) type StallPort = Arc<dyn Fn(Duration) + Send + Sync>;

/// How often stalls are looked for, for a threshold.
fn stall_period(threshold: Duration) -> Duration {
    (threshold / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Starts the monitor of a pipeline whose actors are running.
pub(crate) fn spawn(shared: Arc<Shared>, stages: Vec<StallPort>) -> tokio::task::JoinHandle<()> {
    let threshold = shared.config.stall_threshold;
    let period = threshold.map_or(SAMPLE_EVERY, |t| stall_period(t).min(SAMPLE_EVERY));
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await; // the first tick is immediate
        let mut last_sample: Option<Instant> = None;
        loop {
            ticks.tick().await;
            if shared.completion.is_done() {
                return;
            }
            let now = crate::clock::now();
            if last_sample.is_none_or(|t| now.saturating_duration_since(t) >= SAMPLE_EVERY) {
                last_sample = Some(now);
                shared.sample();
                #[cfg(feature = "metrics")]
                if let Some(metrics) = shared.metrics.get() {
                    metrics.sync(&shared, false);
                }
            }
            if let Some(threshold) = threshold {
                for stage in &stages {
                    stage(threshold);
                }
            }
        }
    })
}

/// Reports one stalled item: counted in the stage's stats, a warning with
/// the fixed fields, and an `ItemStalled` event (through the tracker, so
/// that it is never dropped).
pub(crate) fn report_stall(
    shared: &Shared,
    stage: usize,
    tracker: &ActorRef<TrackerMsg>,
    job_id: &JobId,
    worker: WorkerId,
    age: Duration,
) {
    shared.gauges[stage].stalled.fetch_add(1, Ordering::Relaxed);
    let name = &shared.names[stage];
    tracing::warn!(
        pipeline = %shared.name,
        stage = %name,
        worker = %worker,
        job_id = %job_id,
        age_ms = age.as_millis() as u64,
        "item stalled: worker {worker} of stage `{name}` has held job {job_id} for {age:.1?}"
    );
    if shared.events.has_subscribers() {
        let _ = tracker.cast(TrackerMsg::Event(PipelineEvent::ItemStalled {
            job_id: job_id.clone(),
            stage: name.clone(),
            worker,
            age,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalls_are_looked_for_four_times_per_threshold_within_bounds() {
        assert_eq!(
            stall_period(Duration::from_secs(2)),
            Duration::from_millis(500)
        );
        assert_eq!(
            stall_period(Duration::from_millis(1)),
            Duration::from_millis(10)
        );
        assert_eq!(
            stall_period(Duration::from_secs(60)),
            Duration::from_secs(1)
        );
    }
}
