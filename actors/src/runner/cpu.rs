//! `Cpu`: CPU-bound handlers, `workers` at a time on the stage's own
//! threads, named `{stage}-cpu-{n}`. Items move; nothing is copied.
//!
//! A Cpu stage runs like a Thread stage ([`super::thread`]): at most
//! `workers` batches out, each on a thread of the stage's own, so the stage
//! never keeps more than `workers` threads busy and never touches tokio's
//! threads. Set `workers` to the cores the stage may use. (It used to run
//! on a rayon pool of `workers` threads; a pool that size cannot replace a
//! thread stuck in an attempt given up at the timeout, so batches queued
//! behind it never started and the stage hung: see [`super::lanes`].)

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use super::lanes::Lanes;
use super::thread::ThreadRunner;

/// A Cpu stage's runner: `stuck` counts the threads given up and still
/// running.
pub(crate) fn runner<F>(stage: &str, handler: Arc<F>, stuck: Arc<AtomicUsize>) -> ThreadRunner<F> {
    ThreadRunner {
        handler,
        lanes: Lanes::new(stage, format!("{stage}-cpu"), stuck),
    }
}
