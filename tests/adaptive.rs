//! Adaptive concurrency (docs/flow-policies.md): a stage given a worker
//! range, against a simulated service whose concurrency limit it does not
//! know. Paused tokio time, with item times stamped by tokio's clock (the
//! `test-clock` feature), so that the handler latencies the stage measures
//! are the simulated ones:
//!
//! `cargo test --features test-clock --test adaptive`

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bergtalzug::prelude::*;
use common::{config, within};
use tokio::time::Instant;

/// A simulated service with a concurrency limit the stage does not know:
/// up to `limit` calls at once take `base` each; past it, calls queue in
/// it (each takes `base * in_flight / limit`), or, when `fails`, the calls
/// over the limit fail at once (after 1 ms).
struct Service {
    in_flight: AtomicUsize,
    limit: usize,
    base: Duration,
    fails: bool,
}

impl Service {
    fn new(limit: usize, fails: bool) -> Arc<Self> {
        Arc::new(Service {
            in_flight: AtomicUsize::new(0),
            limit,
            base: Duration::from_millis(10),
            fails,
        })
    }

    async fn call(&self) -> anyhow::Result<()> {
        let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let result = if self.fails && n > self.limit {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Err(anyhow::anyhow!("overloaded: {n} calls at once"))
        } else {
            let load = (n as f64 / self.limit as f64).max(1.0);
            tokio::time::sleep(self.base.mul_f64(load)).await;
            Ok(())
        };
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

/// What one run against a [`Service`] measured.
struct ServiceRun {
    /// Items per second of paused time.
    throughput: f64,
    /// (seconds since the start, the stage's worker count), every 50 ms.
    workers: Vec<(f64, usize)>,
    /// (seconds since the start, failures so far), every 50 ms.
    failures: Vec<(f64, u64)>,
}

async fn run_service(stage: StageConfig, service: Arc<Service>, n: u64) -> ServiceRun {
    let pipeline = Pipeline::builder(config("service", vec![stage]))
        .unwrap()
        .source(sources::iter(0..n))
        .async_stage("call", move |item: WorkItem<u64>| {
            let service = service.clone();
            async move {
                service.call().await?;
                Ok(item)
            }
        })
        .build()
        .unwrap();
    let began = Instant::now();
    pipeline.start().await.unwrap();
    let watch = {
        let pipeline = pipeline.clone();
        tokio::spawn(async move {
            let (mut workers, mut failures) = (Vec::new(), Vec::new());
            while !pipeline.is_finished() {
                let stats = pipeline.stats().await.unwrap();
                let at = began.elapsed().as_secs_f64();
                workers.push((at, stats.stages[0].workers));
                failures.push((at, stats.failed_items));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (workers, failures)
        })
    };
    within(Duration::from_secs(600), pipeline.finished()).await;
    let took = began.elapsed().as_secs_f64();
    let (workers, failures) = watch.await.unwrap();
    ServiceRun {
        throughput: n as f64 / took,
        workers,
        failures,
    }
}

#[tokio::test(start_paused = true)]
async fn an_adaptive_stage_settles_near_a_hidden_limit_at_the_best_fixed_throughput() {
    let n = 6_000;
    let mut best = (0, 0.0);
    for workers in [8, 16, 32, 48, 64] {
        let stage = StageConfig::new("call", ExecutionType::Async)
            .workers(workers)
            .queue_size(256);
        let run = run_service(stage, Service::new(32, false), n).await;
        if run.throughput > best.1 {
            best = (workers, run.throughput);
        }
    }
    let stage = StageConfig::new("call", ExecutionType::Async)
        .workers(4)
        .queue_size(256)
        .adaptive(1, 256);
    let run = run_service(stage, Service::new(32, false), n).await;
    assert!(
        run.throughput >= 0.9 * best.1,
        "adaptive: {:.0}/s; best fixed ({} workers): {:.0}/s",
        run.throughput,
        best.0,
        best.1
    );
    eprintln!(
        "best fixed: {} workers, {:.0}/s; adaptive: {:.0}/s; workers over time: {:?}",
        best.0, best.1, run.throughput, run.workers
    );
    // Settled within 0.5 s: from then on, near the limit.
    let settled: Vec<usize> = run
        .workers
        .iter()
        .filter(|(at, _)| *at >= 0.5)
        .map(|(_, w)| *w)
        .collect();
    assert!(!settled.is_empty());
    assert!(
        settled.iter().all(|w| (28..=48).contains(w)),
        "worker counts after 0.5 s: {settled:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_adaptive_stage_backs_off_when_errors_rise() {
    let n = 6_000;
    let fixed = StageConfig::new("call", ExecutionType::Async)
        .workers(64)
        .queue_size(256);
    let fixed = run_service(fixed, Service::new(32, true), n).await;
    let adaptive = StageConfig::new("call", ExecutionType::Async)
        .workers(64)
        .queue_size(256)
        .adaptive(1, 64);
    let adaptive = run_service(adaptive, Service::new(32, true), n).await;
    let failed = |run: &ServiceRun| run.failures.last().map_or(0, |(_, f)| *f);
    assert!(
        failed(&adaptive) * 5 < failed(&fixed),
        "adaptive failed {}, 64 fixed workers {}",
        failed(&adaptive),
        failed(&fixed)
    );
    let late: Vec<usize> = adaptive
        .workers
        .iter()
        .filter(|(at, _)| *at >= 0.5)
        .map(|(_, w)| *w)
        .collect();
    eprintln!(
        "failing over 32: 64 fixed workers failed {}; adaptive failed {}, {:.0}/s; workers over time: {:?}",
        failed(&fixed),
        failed(&adaptive),
        adaptive.throughput,
        adaptive.workers
    );
    assert!(
        late.iter().all(|w| (16..=40).contains(w)),
        "it came down from 64 and stayed near the limit: {late:?}"
    );
    assert!(
        adaptive.throughput >= 0.75 * 3200.0,
        "it backed off too far: {:.0}/s",
        adaptive.throughput
    );
}
