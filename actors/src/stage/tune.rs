//! Adaptive concurrency: a stage given a worker range (`adaptive = { min,
//! max }`) chooses its worker count from what it measures.
//!
//! **The rule** (a gradient on latency, with additive increase, as
//! Netflix's `concurrency-limits` Gradient and Vector's adaptive request
//! concurrency do):
//!
//! - the stage measures each window's mean handler latency (a window: at
//!   least as many items as it has workers, and at least two of those
//!   latencies of time), and keeps a *baseline*: the lowest window mean
//!   seen in a window without errors, drifting up 0.1 % a window so that
//!   a service that really got slower moves it;
//! - **errors** (a failed attempt, retried or not, a timeout) in a window:
//!   multiply by 0.75;
//! - **latency past the baseline** (mean above 1.2 x baseline): shrink in
//!   proportion, to `count * 1.2 * baseline / mean` (and by one at least):
//!   a service that queues
//!   past its limit answers `count` requests in `count / limit` times the
//!   latency, so this lands near the limit at once;
//! - otherwise, when every worker was busy through the window
//!   (saturated): grow, doubling until the first decrease or the first
//!   window whose latency is 5 % past the baseline (slow start), then by
//!   one;
//! - always within `min..=max`.
//!
//! Why latency: more concurrency than a service can serve only queues in
//! it: throughput stays flat while latency grows, so latency rising above
//! the baseline marks the knee, where throughput is already at its best.
//!
//! **Invariant** (`debug_assert!`ed in [`Tune::decide`]): the count chosen
//! is always within the range.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::AdaptiveWorkers;

/// Latency up to this many times the baseline is not "grown".
const TOLERANCE: f64 = 1.2;
/// Slow start (doubling) ends once latency is this many times the baseline.
const SLOW_START_EXIT: f64 = 1.05;
/// The factor on errors.
const ON_ERRORS: f64 = 0.75;
/// How much the baseline drifts up per window.
const DRIFT: f64 = 1.001;
/// The shortest window.
const MIN_WINDOW: Duration = Duration::from_millis(10);

/// The controller of one stage.
#[derive(Debug)]
pub(super) struct Tune {
    range: AdaptiveWorkers,
    /// The lowest window mean latency seen (drifting up), in seconds.
    baseline: Option<f64>,
    slow_start: bool,
    // The current window.
    since: Instant,
    items: u64,
    busy: Duration,
    errors: u64,
    samples: u32,
    saturated: u32,
}

impl Tune {
    pub(super) fn new(range: AdaptiveWorkers) -> Self {
        Tune {
            range,
            baseline: None,
            slow_start: true,
            since: Instant::now(),
            items: 0,
            busy: Duration::ZERO,
            errors: 0,
            samples: 0,
            saturated: 0,
        }
    }

    /// A worker's report: `items` outcomes in `busy` handler time, `errors`
    /// of them failed attempts.
    pub(super) fn observe(&mut self, items: usize, errors: usize, busy: Duration) {
        self.items += items as u64;
        self.errors += errors as u64;
        self.busy += busy;
    }

    /// After a message: whether every worker is busy.
    pub(super) fn sample(&mut self, saturated: bool) {
        self.samples += 1;
        self.saturated += u32::from(saturated);
    }

    /// The worker count for the next window, if this window is over.
    pub(super) fn decide(&mut self, current: usize) -> Option<usize> {
        if self.items == 0 {
            return None;
        }
        let mean = self.busy.as_secs_f64() / self.items as f64;
        let now = Instant::now();
        let long_enough =
            now.duration_since(self.since) >= MIN_WINDOW.max(Duration::from_secs_f64(2.0 * mean));
        if self.items < current as u64 || !long_enough {
            return None;
        }
        // A window with errors says nothing of the latency of calls that
        // work (failures are often quick): it leaves the baseline alone.
        let baseline = match self.baseline {
            Some(b) if self.errors > 0 => b,
            Some(b) => (b * DRIFT).min(mean),
            None => mean,
        };
        if self.errors == 0 {
            self.baseline = Some(baseline);
        }
        let saturated = self.saturated * 2 >= self.samples;
        let c = current as f64;
        let next = if self.errors > 0 {
            self.slow_start = false;
            (c * ON_ERRORS).floor()
        } else if mean
            > baseline
                * if self.slow_start {
                    SLOW_START_EXIT
                } else {
                    TOLERANCE
                }
        {
            // (A window's mean lags behind a doubling: slow start ends at
            // the first sign of growth.)
            self.slow_start = false;
            (c * TOLERANCE * baseline / mean).floor().min(c - 1.0)
        } else if saturated && self.slow_start {
            c * 2.0
        } else if saturated {
            c + 1.0
        } else {
            c
        };
        let next = (next as usize).clamp(self.range.min, self.range.max);
        debug_assert!(
            (self.range.min..=self.range.max).contains(&next),
            "a tuned worker count outside its range"
        );
        self.since = now;
        self.items = 0;
        self.busy = Duration::ZERO;
        self.errors = 0;
        self.samples = 0;
        self.saturated = 0;
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service of hidden limit 32 and 10 ms latency below it.
    fn window(tune: &mut Tune, c: usize, errors: usize) {
        let latency = 0.010 * (c as f64 / 32.0).max(1.0);
        tune.observe(c, errors, Duration::from_secs_f64(latency * c as f64));
        tune.sample(true);
    }

    #[tokio::test(start_paused = true)]
    async fn it_finds_a_hidden_limit_and_backs_off_on_errors() {
        let mut tune = Tune::new(AdaptiveWorkers { min: 1, max: 256 });
        let mut c = 4;
        let mut seen = Vec::new();
        for _ in 0..40 {
            window(&mut tune, c, 0);
            tokio::time::advance(Duration::from_millis(100)).await;
            c = tune.decide(c).expect("a window is over");
            seen.push(c);
        }
        let settled = &seen[20..];
        assert!(
            settled.iter().all(|c| (30..=40).contains(c)),
            "settled near 32: {seen:?}"
        );
        window(&mut tune, c, 5);
        tokio::time::advance(Duration::from_millis(100)).await;
        let after = tune.decide(c).unwrap();
        assert!(after < c, "errors bring it down: {c} -> {after}");
    }
}
