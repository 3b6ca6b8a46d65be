//! Flow control: the source is asked only for what the pipeline has room
//! for, memory is bounded by the configuration, and injection waits for room.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bergtalzug::prelude::*;

mod common;
use common::*;

fn capacity(config: &PipelineConfig) -> u64 {
    config
        .stages
        .iter()
        .map(|s| (s.queue_size + s.workers) as u64)
        .sum()
}

/// With a slow last stage, the source never hands out more than what has
/// finished plus Σ(queue_size + workers), and is never asked for more than
/// the first stage's queue_size at once.
#[tokio::test(start_paused = true)]
async fn source_never_outruns_a_slow_pipeline() {
    let config = config(
        "slow-sink",
        vec![
            StageConfig::new("a", ExecutionType::Async)
                .workers(2)
                .queue_size(10),
            StageConfig::new("b", ExecutionType::Async)
                .workers(3)
                .queue_size(5),
            StageConfig::new("slow", ExecutionType::Async)
                .workers(1)
                .queue_size(4),
        ],
    );
    let window = capacity(&config);
    let outcomes = Arc::new(Outcomes::default());
    let (mut source, log) = CountingSource::new(500);
    let violations = Arc::new(Mutex::new(Vec::new()));
    {
        let outcomes = outcomes.clone();
        let violations = violations.clone();
        source.probe = Some(Box::new(move |count, handed| {
            let finished = outcomes.total();
            if handed + count as u64 > finished + window {
                violations.lock().unwrap().push((handed, count, finished));
            }
        }));
    }
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(source)
        .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
        .async_stage("b", |i: WorkItem<u64>| async move { Ok(i) })
        .async_stage("slow", |i: WorkItem<u64>| async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok(i)
        })
        .on_complete(outcomes.callback())
        .build()
        .unwrap();
    let results = within(Duration::from_secs(60), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 500);
    assert!(
        violations.lock().unwrap().is_empty(),
        "{:?}",
        violations.lock().unwrap()
    );
    let asked = log.asked.lock().unwrap();
    assert!(
        asked.iter().all(|&n| n <= 10),
        "refill asked for more than queue_size: {asked:?}"
    );
    // The slow stage set the pace: the source was asked many times, a little each time.
    assert!(asked.len() > 20, "{asked:?}");
}

/// Items alive anywhere (queues, workers, mailboxes, tracker backlog) never
/// exceed Σ(queue_size + workers) plus one refill, however many flow through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_is_bounded_by_configuration() {
    let census = Arc::new(Census::default());
    let config = config(
        "bounded",
        vec![
            StageConfig::new("fast", ExecutionType::Async)
                .workers(4)
                .queue_size(20),
            StageConfig::new("thread", ExecutionType::Thread)
                .workers(2)
                .queue_size(10),
            StageConfig::new("slow", ExecutionType::Async)
                .workers(2)
                .queue_size(10),
        ],
    )
    .retain_results(false);
    let bound = capacity(&config) as usize + 20;
    let items = 20_000u64;
    let source = {
        let census = census.clone();
        sources::iter((0..items).map(move |n| Tracked::new(n, &census)))
    };
    let outcomes = Arc::new(Outcomes::default());
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(source)
        .async_stage("fast", |i: WorkItem<Tracked>| async move { Ok(i) })
        .sync_stage("thread", Ok)
        .async_stage("slow", |i: WorkItem<Tracked>| async move {
            if i.data.value.is_multiple_of(64) {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            Ok(i)
        })
        .on_complete(outcomes.callback())
        .build()
        .unwrap();
    let results = within(Duration::from_secs(60), pipeline.run())
        .await
        .unwrap();
    assert!(results.is_empty(), "retain_results(false) keeps nothing");
    assert_eq!(outcomes.ok.load(Ordering::SeqCst), items);
    assert_eq!(census.live(), 0, "every item was dropped at its end");
    assert!(
        census.peak() <= bound,
        "peak {} items alive, bound {bound}",
        census.peak()
    );
}

/// The source is asked when the first stage has room, not on a timer: with a
/// refresh rate of 10 s, 2,000 items through 3 stages take well under a
/// second of pipeline time.
#[tokio::test(start_paused = true)]
async fn refill_is_demand_driven() {
    let config = PipelineConfig::new(
        "demand",
        vec![
            StageConfig::new("a", ExecutionType::Async)
                .workers(4)
                .queue_size(50),
            StageConfig::new("b", ExecutionType::Async)
                .workers(4)
                .queue_size(50),
            StageConfig::new("c", ExecutionType::Async)
                .workers(4)
                .queue_size(50),
        ],
    )
    .queue_refresh_rate(Duration::from_secs(10))
    .stats_interval(Duration::ZERO);
    let step = |i: WorkItem<u64>| async move {
        tokio::time::sleep(Duration::from_micros(100)).await;
        Ok(i)
    };
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(0..2_000u64))
        .async_stage("a", step)
        .async_stage("b", step)
        .async_stage("c", step)
        .build()
        .unwrap();
    let start = tokio::time::Instant::now();
    let results = within(Duration::from_secs(60), pipeline.run())
        .await
        .unwrap();
    let elapsed = start.elapsed();
    assert_eq!(results.len(), 2_000);
    // 2,000 items x 100 µs / 4 workers = 50 ms of work per stage.
    assert!(
        elapsed < Duration::from_secs(1),
        "took {elapsed:?} of pipeline time"
    );
}

/// A stage never leaves a worker idle while it has queued items.
#[tokio::test(start_paused = true)]
async fn queued_items_never_wait_for_an_idle_worker() {
    let config = config(
        "busy",
        vec![
            StageConfig::new("work", ExecutionType::Async)
                .workers(4)
                .queue_size(50),
        ],
    );
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(0..400u64))
        .async_stage("work", |i: WorkItem<u64>| async move {
            tokio::time::sleep(Duration::from_millis(1 + i.data % 3)).await;
            Ok(i)
        })
        .build()
        .unwrap();
    pipeline.start().await.unwrap();
    let mut samples = 0;
    while !pipeline.is_finished() {
        tokio::time::sleep(Duration::from_micros(700)).await;
        let Ok(stats) = pipeline.stats().await else {
            break;
        };
        let stage = &stats.stages[0];
        if stage.queued > 0 {
            samples += 1;
            // Every worker holds at least one item (quick items go to
            // workers in small batches, so a worker may hold several).
            assert!(
                stage.in_flight >= 4,
                "idle worker while items queued: {stage:?}"
            );
        }
    }
    assert!(samples > 10, "too few samples: {samples}");
    assert_eq!(
        within(Duration::from_secs(30), pipeline.run())
            .await
            .unwrap()
            .len(),
        400
    );
}

/// An injected pipeline of one Async stage (1 worker, queue 4: room for 5)
/// whose handler passes an item only for a permit of `gate`.
fn gated(name: &str, gate: &Arc<tokio::sync::Semaphore>) -> Pipeline<u64> {
    let config = config(
        name,
        vec![
            StageConfig::new("gate", ExecutionType::Async)
                .workers(1)
                .queue_size(4),
        ],
    );
    let gate = gate.clone();
    Pipeline::builder(config)
        .unwrap()
        .injected::<u64>()
        .async_stage("gate", move |i: WorkItem<u64>| {
            let gate = gate.clone();
            async move {
                gate.acquire().await?.forget();
                Ok(i)
            }
        })
        .build()
        .unwrap()
}

/// `inject` waits while the pipeline is full and returns once there is room.
#[tokio::test(start_paused = true)]
async fn inject_waits_for_room() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let pipeline = gated("inject", &gate);
    pipeline.start().await.unwrap();
    // Room for 5 (queue 4 + 1 worker): 5 items are accepted at once...
    within(
        Duration::from_secs(1),
        pipeline.inject((0..5).map(WorkItem::new).collect()),
    )
    .await
    .unwrap();
    // ...the next ones wait while the stage is blocked.
    let more = pipeline.inject((5..10).map(WorkItem::new).collect());
    tokio::pin!(more);
    assert!(
        tokio::time::timeout(Duration::from_secs(5), &mut more)
            .await
            .is_err(),
        "inject returned although the pipeline was full"
    );
    gate.add_permits(10);
    within(Duration::from_secs(5), more).await.unwrap();
    pipeline.stop().await.unwrap();
    let results = pipeline.run().await.unwrap();
    assert_eq!(results.len(), 10);
    assert!(results.iter().all(|r| r.success));
}

/// A caller that gives up on `inject` (its future dropped, e.g. by a
/// timeout) withdraws the items not admitted yet: they never run, and the
/// pipeline does not keep room for them. Those admitted before run once.
#[tokio::test(start_paused = true)]
async fn a_dropped_inject_withdraws_what_it_had_not_admitted() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let pipeline = gated("withdrawn", &gate);
    pipeline.start().await.unwrap();
    // Room for 5 (queue 4 + 1 worker): the first 5 of 20 go in, then the
    // caller times out.
    let gave_up = tokio::time::timeout(
        Duration::from_secs(5),
        pipeline.inject((0..20).map(WorkItem::new).collect()),
    )
    .await;
    assert!(
        gave_up.is_err(),
        "inject returned although the stage was blocked"
    );
    assert_eq!(pipeline.stats().await.unwrap().admitted_items, 5);
    gate.add_permits(100);
    // A later injection is admitted at once, not behind the withdrawn 15.
    within(
        Duration::from_secs(5),
        pipeline.inject((100..103).map(WorkItem::new).collect()),
    )
    .await
    .unwrap();
    pipeline.stop().await.unwrap();
    let results = pipeline.run().await.unwrap();
    let mut ids: Vec<String> = results.iter().map(|r| r.job_id.to_string()).collect();
    ids.sort();
    assert_eq!(
        results.len(),
        8,
        "5 admitted before the timeout, 3 after: {ids:?}"
    );
    assert!(results.iter().all(|r| r.success));
    assert_eq!(pipeline.stats().await.unwrap().admitted_items, 8);
}
