//! The clock that stamps item times and observation samples.
//!
//! Normally `std::time::Instant::now()`. With the crate feature
//! `test-clock`, tokio's clock instead, so that a test running under paused
//! time (`#[tokio::test(start_paused = true)]`) sees the durations it
//! controls: a handler that sleeps 10 ms is timed at exactly 10 ms. The
//! feature is for tests only: with tokio's `test-util` on, each reading looks
//! up the current runtime.

use std::time::Instant;

/// Now, by the pipeline's clock.
#[inline]
pub(crate) fn now() -> Instant {
    #[cfg(feature = "test-clock")]
    {
        tokio::time::Instant::now().into_std()
    }
    #[cfg(not(feature = "test-clock"))]
    {
        Instant::now()
    }
}
