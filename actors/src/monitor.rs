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
//!   workers have held that long (`StageMsg::CheckStalls`), every quarter of the
//!   threshold (between 10 ms and 1 s), so a stall is noticed at most a
//!   quarter of the threshold late.
//!
//! It is spawned by the root once the actors are wired and ends with the
//! pipeline. It costs one wake-up per tick and one message per stage per
//! stall check.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ports::StallCheck;
use crate::shared::Shared;
use crate::tally::SAMPLE_EVERY;

/// How often stalls are looked for, for a threshold.
fn stall_period(threshold: Duration) -> Duration {
    (threshold / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Starts the monitor of a pipeline whose actors are running.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    stages: Vec<Arc<dyn StallCheck>>,
) -> tokio::task::JoinHandle<()> {
    let threshold = shared.config.stall_threshold;
    let period = threshold.map_or(SAMPLE_EVERY, |t| stall_period(t).min(SAMPLE_EVERY));
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await; // the first tick is immediate
        let mut last_sample: Option<Instant> = None;
        // It ends with the pipeline, not at its next tick (up to a second
        // later): a program that runs many short pipelines keeps no task
        // per finished one.
        let done = shared.completion.wait();
        tokio::pin!(done);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = &mut done => return,
            }
            let now = crate::clock::now();
            if last_sample.is_none_or(|t| now.saturating_duration_since(t) >= SAMPLE_EVERY) {
                last_sample = Some(now);
                shared.sample();
                #[cfg(feature = "metrics")]
                shared.sync_metrics(false);
            }
            if let Some(threshold) = threshold {
                for stage in &stages {
                    stage.check_stalls(threshold);
                }
            }
        }
    })
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
