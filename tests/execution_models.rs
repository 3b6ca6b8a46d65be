//! Each execution model runs where it should, at the concurrency the stage
//! asks for: Async on the runtime, Thread and Cpu on the stage's own
//! threads; never more than `workers` items at once, and
//! all `workers` busy when there is work.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bergtalzug::prelude::*;

mod common;
use common::*;

/// Counts handler calls running at once.
#[derive(Default)]
struct Concurrency {
    now: AtomicUsize,
    peak: AtomicUsize,
}

impl Concurrency {
    fn enter(&self) {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }
    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn run_blocking_model(model: ExecutionType, workers: usize) -> (usize, Vec<String>) {
    let seen = Arc::new(Concurrency::default());
    let threads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (c, t) = (seen.clone(), threads.clone());
    let pipeline = Pipeline::builder(config(
        "blocking",
        vec![
            StageConfig::new("work", model)
                .workers(workers)
                .queue_size(16),
        ],
    ))
    .unwrap()
    .source(sources::iter(0..60u64))
    .sync_stage("work", move |i: WorkItem<u64>| {
        c.enter();
        let name = std::thread::current().name().unwrap_or("").to_string();
        t.lock().unwrap().push(name);
        std::thread::sleep(Duration::from_millis(5));
        c.leave();
        Ok(i)
    })
    .build()
    .unwrap();
    let results = within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 60);
    let names = threads.lock().unwrap().clone();
    (seen.peak.load(Ordering::SeqCst), names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_stages_use_blocking_threads_at_most_workers_at_once() {
    let (peak, threads) = run_blocking_model(ExecutionType::Thread, 3).await;
    assert_eq!(peak, 3, "all 3 workers busy, never more");
    assert!(
        threads
            .iter()
            .all(|n| !n.starts_with("tokio-runtime-worker")),
        "a blocking handler ran on a runtime worker: {threads:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_stages_run_on_their_own_pool_sized_to_workers() {
    let (peak, threads) = run_blocking_model(ExecutionType::Cpu, 3).await;
    assert_eq!(peak, 3, "all 3 workers busy, never more");
    assert!(
        threads.iter().all(|n| n.starts_with("work-cpu-")),
        "{threads:?}"
    );
    let distinct: std::collections::HashSet<_> = threads.iter().collect();
    assert!(distinct.len() <= 3, "the pool has 3 threads: {distinct:?}");
}

/// A blocking handler may call into the runtime, as on tokio's blocking
/// threads: `Handle::current().block_on(..)` for an async API.
async fn blocking_handlers_can_use_the_runtime(model: ExecutionType) {
    let pipeline = Pipeline::builder(config(
        "block-on",
        vec![StageConfig::new("bridge", model).workers(2).queue_size(8)],
    ))
    .unwrap()
    .source(sources::iter(0..20u64))
    .sync_stage("bridge", |i: WorkItem<u64>| {
        let handle = tokio::runtime::Handle::current();
        let doubled = handle.block_on(async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            i.data * 2
        });
        Ok(i.map(|_| doubled))
    })
    .build()
    .unwrap();
    let results = within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 20, "{model}");
    assert!(results.iter().all(|r| r.success), "{model}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_handlers_can_use_the_runtime() {
    blocking_handlers_can_use_the_runtime(ExecutionType::Thread).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_handlers_can_use_the_runtime() {
    blocking_handlers_can_use_the_runtime(ExecutionType::Cpu).await;
}

#[tokio::test(start_paused = true)]
async fn async_stages_run_workers_items_at_once() {
    let seen = Arc::new(Concurrency::default());
    let c = seen.clone();
    let pipeline = Pipeline::builder(config(
        "async",
        vec![
            StageConfig::new("io", ExecutionType::Async)
                .workers(8)
                .queue_size(32),
        ],
    ))
    .unwrap()
    .source(sources::iter(0..200u64))
    .async_stage("io", move |i: WorkItem<u64>| {
        let c = c.clone();
        async move {
            c.enter();
            tokio::time::sleep(Duration::from_millis(10)).await;
            c.leave();
            Ok(i)
        }
    })
    .build()
    .unwrap();
    let start = tokio::time::Instant::now();
    let results = within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 200);
    assert_eq!(seen.peak.load(Ordering::SeqCst), 8);
    // 200 items x 10 ms / 8 workers = 250 ms when all 8 stay busy.
    let elapsed = start.elapsed();
    assert!(elapsed < Duration::from_millis(400), "took {elapsed:?}");
}

/// Items are handed to a worker in batches, but an item that finished is
/// reported before the worker waits on a slow one behind it.
#[tokio::test(start_paused = true)]
async fn finished_items_never_wait_behind_a_slow_async_one() {
    let finished_at = Arc::new(std::sync::Mutex::new(Vec::new()));
    let f = finished_at.clone();
    let start = tokio::time::Instant::now();
    let pipeline = Pipeline::builder(config(
        "no-waiting",
        vec![
            StageConfig::new("io", ExecutionType::Async)
                .workers(1)
                .queue_size(50),
        ],
    ))
    .unwrap()
    .source(sources::iter(0..30u64))
    .async_stage("io", |i: WorkItem<u64>| async move {
        if i.data == 20 {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        Ok(i)
    })
    .on_complete(move |_| f.lock().unwrap().push(start.elapsed()))
    .build()
    .unwrap();
    let results = within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 30);
    let times = finished_at.lock().unwrap();
    // Items 0..20 finish at once; only the slow one and those behind it wait.
    let early = times
        .iter()
        .filter(|t| **t < Duration::from_secs(1))
        .count();
    assert!(
        early >= 20,
        "{early} items finished before the slow one: {times:?}"
    );
}

/// Waits, on the current thread, until `release` is set (10 s at most).
fn hold_until(release: &AtomicBool) {
    let start = std::time::Instant::now();
    while !release.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One slow item holds back only itself: the items batched behind it are
/// taken by the idle worker, and the items finished before it are reported,
/// while it runs (issue 12 item 2).
async fn a_slow_item_holds_back_only_itself(model: ExecutionType) {
    let release = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Outcomes::default());
    let builder = Pipeline::builder(config(
        "slow-one",
        vec![StageConfig::new("work", model).workers(2)],
    ))
    .unwrap()
    .source(sources::iter(0..20u64));
    let r = release.clone();
    let builder = match model {
        ExecutionType::Async => builder.async_stage("work", move |i: WorkItem<u64>| {
            let r = r.clone();
            async move {
                if i.data == 3 {
                    let start = std::time::Instant::now();
                    while !r.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(10) {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
                Ok(i)
            }
        }),
        _ => builder.sync_stage("work", move |i: WorkItem<u64>| {
            if i.data == 3 {
                hold_until(&r);
            }
            Ok(i)
        }),
    };
    let pipeline = builder.on_complete(outcomes.callback()).build().unwrap();
    pipeline.start().await.unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(5), async {
        while outcomes.total() < 19 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let stats = pipeline.stats().await.unwrap();
    release.store(true, Ordering::SeqCst);
    assert!(
        waited.is_ok(),
        "{model}: {} of 19 finished while one item was slow; the stage holds {:?}",
        outcomes.total(),
        stats.stages[0]
    );
    assert_eq!(stats.stages[0].in_flight, 1, "{model}");
    let results = within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 20, "{model}");
    assert!(results.iter().all(|r| r.success), "{model}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_item_holds_back_only_itself_async() {
    a_slow_item_holds_back_only_itself(ExecutionType::Async).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_item_holds_back_only_itself_thread() {
    a_slow_item_holds_back_only_itself(ExecutionType::Thread).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_item_holds_back_only_itself_cpu() {
    a_slow_item_holds_back_only_itself(ExecutionType::Cpu).await;
}

/// Hands out 5 items, then, once `gate` is opened, 4 more at once (less
/// work than is worth splitting between workers), then nothing.
struct TwoBursts {
    turn: u8,
    gate: Arc<tokio::sync::Notify>,
}

impl Source for TwoBursts {
    type Item = u64;

    async fn refill(&mut self, _count: usize) -> anyhow::Result<Vec<WorkItem<u64>>> {
        self.turn += 1;
        Ok(match self.turn {
            1 => (0..5).map(WorkItem::new).collect(),
            2 => {
                self.gate.notified().await;
                (100..104).map(WorkItem::new).collect()
            }
            _ => Vec::new(),
        })
    }
}

/// A batch that outlives its pace is shared: when one worker was given a
/// whole batch of fast items (too little work to split between workers)
/// and one of them blocks, the idle worker takes the rest within
/// milliseconds, though the blocked worker sends nothing (issue 12 item 2).
async fn a_blocked_batch_is_shared_with_an_idle_worker(model: ExecutionType) {
    let release = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Outcomes::default());
    let gate = Arc::new(tokio::sync::Notify::new());
    let source = TwoBursts {
        turn: 0,
        gate: gate.clone(),
    };
    let r = release.clone();
    let pipeline = Pipeline::builder(config(
        "blocked-batch",
        vec![StageConfig::new("work", model).workers(2)],
    ))
    .unwrap()
    .source(source)
    .sync_stage("work", move |i: WorkItem<u64>| {
        if i.data == 101 {
            hold_until(&r);
        }
        Ok(i)
    })
    .on_complete(outcomes.callback())
    .build()
    .unwrap();
    pipeline.start().await.unwrap();
    // Warm up: the stage learns that items are fast.
    within(Duration::from_secs(5), async {
        while outcomes.total() < 5 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    gate.notify_one();
    let waited = tokio::time::timeout(Duration::from_secs(5), async {
        while outcomes.total() < 5 + 3 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    release.store(true, Ordering::SeqCst);
    assert!(
        waited.is_ok(),
        "{model}: {} of 8 finished while one item was blocked",
        outcomes.total()
    );
    let results = within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 9, "{model}");
    assert!(results.iter().all(|r| r.success), "{model}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_batch_is_shared_with_an_idle_worker_thread() {
    a_blocked_batch_is_shared_with_an_idle_worker(ExecutionType::Thread).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_batch_is_shared_with_an_idle_worker_cpu() {
    a_blocked_batch_is_shared_with_an_idle_worker(ExecutionType::Cpu).await;
}
