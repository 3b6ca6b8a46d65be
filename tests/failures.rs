//! Failures stay with their item: a handler error or panic fails that item
//! and nothing else, a panicking worker is replaced, a panicking callback is
//! logged, a failing source is asked again later, a duplicate job id is
//! refused, and a panicking source ends the pipeline cleanly.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use bergtalzug::prelude::*;

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_error_fails_only_its_item() {
    let pipeline = Pipeline::builder(config(
        "errors",
        vec![
            StageConfig::new("check", ExecutionType::Async)
                .workers(3)
                .queue_size(10),
            StageConfig::new("store", ExecutionType::Thread)
                .workers(2)
                .queue_size(10),
        ],
    ))
    .unwrap()
    .source(sources::iter(0..300u64))
    .async_stage("check", |i: WorkItem<u64>| async move {
        if i.data % 10 == 3 {
            let inner: anyhow::Result<()> = Err(anyhow::anyhow!("value {} is odd", i.data));
            inner.context("validation failed")?;
        }
        Ok(i)
    })
    .sync_stage("store", Ok)
    .build()
    .unwrap();
    let results = within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 300);
    assert_unique_ids(&results);
    let failed: Vec<_> = results.iter().filter(|r| !r.success).collect();
    assert_eq!(failed.len(), 30);
    for r in failed {
        let e = r.error.as_ref().unwrap();
        assert_eq!(e.stage, "check");
        assert_eq!(e.kind, ItemErrorKind::Failed);
        assert_eq!(e.attempts, 1);
        // The whole chain, outermost first.
        assert!(
            e.message.starts_with("validation failed: value "),
            "{}",
            e.message
        );
        assert!(
            r.metadata.stage_duration("check").is_some(),
            "a failed item keeps its times"
        );
        assert!(r.metadata.stage("store").is_none());
    }
    let stats = pipeline.stats().await.unwrap();
    assert_eq!(stats.failed_items, 30);
    assert_eq!(stats.stage("check").unwrap().failed, 30);
    assert_eq!(stats.stage("store").unwrap().processed, 270);
}

async fn panics_in(model: ExecutionType) {
    let workers = 3;
    let mut stage = StageConfig::new("risky", model)
        .workers(workers)
        .queue_size(20);
    stage.queue_size = 20;
    let config = config("panics", vec![stage]);
    let builder = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(0..200u64));
    let check = |i: WorkItem<u64>| -> anyhow::Result<WorkItem<u64>> {
        if i.data % 50 == 7 {
            panic!("boom on item {}", i.data);
        }
        Ok(i)
    };
    let pipeline = match model {
        ExecutionType::Async => builder
            .async_stage("risky", move |i: WorkItem<u64>| async move { check(i) })
            .build(),
        _ => builder.sync_stage("risky", check).build(),
    }
    .unwrap();
    let mut events = pipeline.subscribe();
    let results = within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 200, "{model}");
    assert_unique_ids(&results);
    let panicked: Vec<_> = results.iter().filter(|r| !r.success).collect();
    assert_eq!(
        panicked.len(),
        4,
        "{model}: {:#?}",
        panicked.iter().map(|r| r.error.clone()).collect::<Vec<_>>()
    );
    for r in &panicked {
        let e = r.error.as_ref().unwrap();
        assert_eq!(e.kind, ItemErrorKind::Panicked, "{model}");
        assert_eq!(e.stage, "risky");
        assert!(e.message.starts_with("boom on item "), "{}", e.message);
    }
    let mut restarts = 0;
    while let Some(event) = events.recv().await {
        if let PipelineEvent::WorkerRestarted { stage, reason, .. } = event {
            assert_eq!(&*stage, "risky");
            assert!(reason.contains("boom on item"), "{reason}");
            restarts += 1;
        }
    }
    assert_eq!(restarts, 4, "{model}: one replacement per panic");
    // The stage kept its worker count.
    assert_eq!(
        pipeline.stats().await.unwrap().stages[0].workers,
        workers,
        "{model}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_fails_only_its_item_and_the_worker_is_replaced_async() {
    panics_in(ExecutionType::Async).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_fails_only_its_item_and_the_worker_is_replaced_thread() {
    panics_in(ExecutionType::Thread).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_fails_only_its_item_and_the_worker_is_replaced_cpu() {
    panics_in(ExecutionType::Cpu).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_callback_is_not_fatal() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let pipeline = Pipeline::builder(config(
        "callback",
        vec![StageConfig::new("a", ExecutionType::Async)],
    ))
    .unwrap()
    .source(sources::iter(0..100u64))
    .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
    .on_complete(|r| {
        if r.job_id.to_string().ends_with('0') {
            panic!("callback bug");
        }
    })
    .on_complete(move |_| {
        seen.fetch_add(1, Ordering::SeqCst);
    })
    .build()
    .unwrap();
    let results = within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 100);
    assert!(results.iter().all(|r| r.success));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        100,
        "later callbacks still run"
    );
}

/// Fails its first `failures` refills, then hands out `0..end`.
struct Flaky {
    failures: usize,
    inner: CountingSource,
}

impl Source for Flaky {
    type Item = u64;
    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<u64>>> {
        if self.failures > 0 {
            self.failures -= 1;
            anyhow::bail!("queue service unavailable");
        }
        self.inner.refill(count).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_refill_is_retried_with_backoff_from_the_refresh_rate() {
    let config = PipelineConfig::new("flaky", vec![StageConfig::new("a", ExecutionType::Async)])
        .queue_refresh_rate(Duration::from_secs(5))
        .stats_interval(Duration::ZERO);
    let (inner, _) = CountingSource::new(50);
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(Flaky { failures: 2, inner })
        .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
        .build()
        .unwrap();
    let mut events = pipeline.subscribe();
    let start = tokio::time::Instant::now();
    let results = within(Duration::from_secs(60), pipeline.run())
        .await
        .unwrap();
    let elapsed = start.elapsed();
    assert_eq!(results.len(), 50);
    assert!(
        elapsed >= Duration::from_secs(15),
        "asked again after 5 s, then after 10 s (backing off), took {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(16), "took {elapsed:?}");
    assert_eq!(pipeline.stats().await.unwrap().source_errors, 2);
    let mut errors = Vec::new();
    while let Some(event) = events.recv().await {
        if let PipelineEvent::SourceError { message } = event {
            errors.push(message);
        }
    }
    assert_eq!(errors, vec!["queue service unavailable"; 2]);
}

/// A source that can never refill (a directory that does not exist) ends
/// the run with its error after `max_refill_failures` failures in a row
/// (default 5: 1 + 2 + 4 + 8 s of backoff at the default refresh rate),
/// visible without a tracing subscriber; 0 keeps asking for ever.
#[tokio::test(start_paused = true)]
async fn a_source_that_always_fails_ends_the_run_with_its_error() {
    let pipeline = |limit: Option<u32>| {
        let mut config = PipelineConfig::new(
            "missing-dir",
            vec![StageConfig::new("a", ExecutionType::Async)],
        )
        .stats_interval(Duration::ZERO);
        if let Some(limit) = limit {
            config = config.max_refill_failures(limit);
        }
        let (inner, _) = CountingSource::new(10);
        Pipeline::builder(config)
            .unwrap()
            .source(Flaky {
                failures: usize::MAX,
                inner,
            })
            .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
            .build()
            .unwrap()
    };
    let failing = pipeline(None);
    let start = tokio::time::Instant::now();
    let err = within(Duration::from_secs(60), failing.run())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PipelineError::SourceFailed { failures: 5, message, .. }
            if message.contains("queue service unavailable")),
        "{err}"
    );
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(15) && took < Duration::from_secs(16),
        "{took:?}"
    );
    assert_eq!(failing.stats().await.unwrap().source_errors, 5);

    let patient = pipeline(Some(0));
    patient.start().await.unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(!patient.is_finished(), "0: asked again for ever");
    within(Duration::from_secs(60), patient.stop())
        .await
        .unwrap();
    assert!(patient.run().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_job_id_is_refused_clearly() {
    let items = vec![
        WorkItem::with_job_id("same", 1u64),
        WorkItem::with_job_id("other", 2),
        WorkItem::with_job_id("same", 3),
    ];
    let pipeline = Pipeline::builder(config(
        "dups",
        vec![StageConfig::new("a", ExecutionType::Async)],
    ))
    .unwrap()
    .source(sources::items(items))
    .async_stage("a", |i: WorkItem<u64>| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(i)
    })
    .build()
    .unwrap();
    let results = within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 3);
    let refused: Vec<_> = results.iter().filter(|r| !r.success).collect();
    assert_eq!(refused.len(), 1);
    let e = refused[0].error.as_ref().unwrap();
    assert_eq!(e.kind, ItemErrorKind::DuplicateJobId);
    assert_eq!(refused[0].job_id, JobId::from("same"));
    assert!(e.message.contains("same"), "{}", e.message);
}

/// Panics on its second refill.
struct Exploding {
    calls: usize,
}

impl Source for Exploding {
    type Item = u64;
    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<u64>>> {
        self.calls += 1;
        if self.calls == 2 {
            panic!("source bug");
        }
        Ok((0..count as u64).map(WorkItem::new).collect())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_source_finishes_what_it_admitted_and_reports() {
    let outcomes = Arc::new(Outcomes::default());
    let pipeline = Pipeline::builder(config(
        "exploding",
        vec![
            StageConfig::new("a", ExecutionType::Async)
                .workers(2)
                .queue_size(10),
        ],
    ))
    .unwrap()
    .source(Exploding { calls: 0 })
    .async_stage("a", |i: WorkItem<u64>| async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok(i)
    })
    .on_complete(outcomes.callback())
    .build()
    .unwrap();
    let err = within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PipelineError::SourcePanicked { message, .. } if message.contains("source bug")),
        "{err}"
    );
    let stats = pipeline.stats().await.unwrap();
    assert!(stats.admitted_items >= 10);
    assert_eq!(
        outcomes.total(),
        stats.admitted_items,
        "every admitted item finished"
    );
    assert_eq!(stats.active_items, 0);
}

/// A failed run keeps what completed: `run()` returns the error, and
/// `run_outcome()` hands over the results of every item that finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_still_returns_what_completed() {
    for first_run in [true, false] {
        let pipeline = Pipeline::builder(config(
            "exploding-outcome",
            vec![
                StageConfig::new("a", ExecutionType::Async)
                    .workers(2)
                    .queue_size(10),
            ],
        ))
        .unwrap()
        .source(Exploding { calls: 0 })
        .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
        .build()
        .unwrap();
        if first_run {
            let err = within(Duration::from_secs(10), pipeline.run())
                .await
                .unwrap_err();
            assert!(matches!(err, PipelineError::SourcePanicked { .. }), "{err}");
        }
        let outcome = within(Duration::from_secs(10), pipeline.run_outcome()).await;
        assert!(
            matches!(&outcome.error, Some(PipelineError::SourcePanicked { message, .. }) if message.contains("source bug")),
            "{:?}",
            outcome.error
        );
        let admitted = pipeline.stats().await.unwrap().admitted_items;
        assert!(admitted >= 10);
        assert_eq!(outcome.results.len() as u64, admitted);
        assert!(outcome.results.iter().all(|r| r.success));
        assert_unique_ids(&outcome.results);
        // Taken once: a later caller gets the error and no results.
        let again = pipeline.run_outcome().await;
        assert!(again.results.is_empty() && again.error.is_some());
    }
}

/// A handler that panics on every item is a crash loop: over its restart
/// budget, the stage fails the pipeline loudly instead of replacing workers
/// for ever, and every admitted item still has its outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_over_the_restart_budget_fails_the_pipeline() {
    let outcomes = Arc::new(Outcomes::default());
    let stage = StageConfig::new("doomed", ExecutionType::Thread)
        .workers(2)
        .queue_size(10)
        .restart_budget(RestartBudget::new(3, Duration::from_secs(60)));
    let pipeline = Pipeline::builder(config("crash-loop", vec![stage]))
        .unwrap()
        .source(sources::iter(0u64..))
        .sync_stage(
            "doomed",
            |_: WorkItem<u64>| -> anyhow::Result<WorkItem<u64>> { panic!("always") },
        )
        .on_complete(outcomes.callback())
        .build()
        .unwrap();
    let err = within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap_err();
    match &err {
        PipelineError::RestartBudgetExceeded {
            stage, restarts, ..
        } => {
            assert_eq!(stage, "doomed");
            assert_eq!(*restarts, 4);
        }
        other => panic!("expected the restart budget to fail the pipeline, got {other}"),
    }
    assert!(err.to_string().contains("doomed"), "{err}");
    let stats = pipeline.stats().await.unwrap();
    assert_eq!(
        outcomes.total(),
        stats.admitted_items,
        "every admitted item finished"
    );
    assert_eq!(stats.active_items, 0);
    assert!(stats.cancelled_items > 0, "the rest was cancelled");
}

#[test]
fn restart_budgets_load_from_files() {
    let config = PipelineConfig::from_toml_str(
        "pipeline_name = \"p\"\n[[stages]]\nname = \"a\"\nexecution_type = \"async\"\nrestart_budget = { max_restarts = 3, window = 60.0 }\n",
    )
    .unwrap();
    assert_eq!(
        config.stages[0].restart_budget,
        Some(RestartBudget::new(3, Duration::from_secs(60)))
    );
    let err = PipelineConfig::from_toml_str(
        "pipeline_name = \"p\"\n[[stages]]\nname = \"a\"\nexecution_type = \"async\"\nrestart_budget = { max_restarts = 3, window = 0 }\n",
    )
    .unwrap_err();
    assert!(err.to_string().contains("restart_budget.window"), "{err}");
}

/// Data whose copy panics for every tenth value: the copy a retrying stage
/// keeps is made outside the handler's guard, so it kills the worker.
#[derive(Debug)]
struct Touchy(u64);

impl Clone for Touchy {
    fn clone(&self) -> Self {
        if self.0 % 10 == 3 {
            panic!("Touchy({}) refuses to be copied", self.0);
        }
        Touchy(self.0)
    }
}

/// The items a worker that dies never started run on another worker: only
/// the item whose copy panicked fails (issue 20 items 5 and 9), whatever
/// the model keeps unstarted items in.
async fn items_a_dead_worker_never_started_run_elsewhere(model: ExecutionType) {
    let stage = StageConfig::new("touchy", model)
        .workers(2)
        .queue_size(50)
        .retry(RetryPolicy::exponential(2, Duration::from_millis(1)));
    let builder = Pipeline::builder(config("touchy", vec![stage]))
        .unwrap()
        .source(sources::iter((0..200u64).map(Touchy)));
    let builder = match model {
        ExecutionType::Async => {
            builder.retrying_async_stage("touchy", |i: WorkItem<Touchy>| async move { Ok(i) })
        }
        _ => builder.retrying_sync_stage("touchy", Ok::<WorkItem<Touchy>, anyhow::Error>),
    };
    let pipeline = builder.build().unwrap();
    let results = within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 200, "{model}");
    assert_unique_ids(&results);
    let failed = results.iter().filter(|r| !r.success).count();
    assert_eq!(failed, 20, "{model}: only the 20 touchy items fail");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_a_dead_async_worker_never_started_run_elsewhere() {
    items_a_dead_worker_never_started_run_elsewhere(ExecutionType::Async).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_a_dead_thread_worker_never_started_run_elsewhere() {
    items_a_dead_worker_never_started_run_elsewhere(ExecutionType::Thread).await;
}

// ---- User code the engine calls besides the handler ----
//
// The engine clones a retrying stage's input, drops the copy, drops the last
// stage's output and a callback's panic payload: a panic in any of them is
// contained like a handler's, and fails at most the item whose data panicked.

/// Data whose `Clone` or `Drop` panics, as chosen per item.
#[derive(Debug)]
struct Fragile {
    id: u64,
    /// Its `Clone` panics.
    clone_panics: bool,
    /// The `Drop` of its copies panics (the original's does not).
    copies_drop_panics: bool,
    /// Its own `Drop` panics.
    drop_panics: bool,
}

impl Fragile {
    fn new(id: u64) -> Self {
        Fragile {
            id,
            clone_panics: false,
            copies_drop_panics: false,
            drop_panics: false,
        }
    }
}

impl Clone for Fragile {
    fn clone(&self) -> Self {
        if self.clone_panics {
            panic!("clone of item {} panicked", self.id);
        }
        Fragile {
            drop_panics: self.copies_drop_panics,
            ..Fragile::new(self.id)
        }
    }
}

impl Drop for Fragile {
    fn drop(&mut self) {
        // Never while unwinding: that would abort the test binary.
        if self.drop_panics && !std::thread::panicking() {
            panic!("drop of item {} panicked", self.id);
        }
    }
}

/// A one-stage pipeline of `model` over 200 `Fragile` items made by `make`,
/// whose handler maps each input with `map`; bound to retry when `retrying`.
fn fragile_pipeline<O: Send + 'static>(
    model: ExecutionType,
    make: fn(u64) -> Fragile,
    retrying: bool,
    map: fn(Fragile) -> O,
) -> Pipeline<Fragile> {
    let mut stage = StageConfig::new("fragile", model).workers(2).queue_size(20);
    if retrying {
        stage = stage.retry(RetryPolicy::fixed(3, Duration::from_millis(1)));
    }
    let builder = Pipeline::builder(config("fragile", vec![stage]))
        .unwrap()
        .source(sources::iter((0..200u64).map(make)));
    let sync = move |i: WorkItem<Fragile>| -> anyhow::Result<WorkItem<O>> { Ok(i.map(map)) };
    match (model, retrying) {
        (ExecutionType::Async, false) => builder
            .async_stage("fragile", move |i| async move { sync(i) })
            .build(),
        (ExecutionType::Async, true) => builder
            .retrying_async_stage("fragile", move |i| async move { sync(i) })
            .build(),
        (_, false) => builder.sync_stage("fragile", sync).build(),
        (_, true) => builder.retrying_sync_stage("fragile", sync).build(),
    }
    .unwrap()
}

async fn a_panicking_clone_fails_only_its_item(model: ExecutionType) {
    let pipeline = fragile_pipeline(
        model,
        |id| Fragile {
            clone_panics: id % 10 == 3,
            ..Fragile::new(id)
        },
        true,
        |f| f.id,
    );
    let results = within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 200, "{model}");
    assert_unique_ids(&results);
    let failed: Vec<_> = results.iter().filter(|r| !r.success).collect();
    assert_eq!(
        failed.len(),
        20,
        "{model}: only the items whose data panicked fail: {:#?}",
        failed.iter().map(|r| r.error.clone()).collect::<Vec<_>>()
    );
    for r in failed {
        let e = r.error.as_ref().unwrap();
        assert_eq!(e.kind, ItemErrorKind::Panicked, "{model}");
        assert_eq!(e.attempts, 1, "{model}: no copy, no retry");
        assert!(e.message.contains("clone of item"), "{}", e.message);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_clone_fails_only_its_item_async() {
    a_panicking_clone_fails_only_its_item(ExecutionType::Async).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_clone_fails_only_its_item_thread() {
    a_panicking_clone_fails_only_its_item(ExecutionType::Thread).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_clone_fails_only_its_item_cpu() {
    a_panicking_clone_fails_only_its_item(ExecutionType::Cpu).await;
}

/// Every item succeeds although the engine's drop of something panics for
/// each.
async fn all_succeed(model: ExecutionType, pipeline: Pipeline<Fragile>) {
    let results = within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap_or_else(|e| panic!("{model}: {e}"));
    assert_eq!(results.len(), 200, "{model}");
    assert_unique_ids(&results);
    let failed: Vec<_> = results.iter().filter(|r| !r.success).collect();
    assert!(
        failed.is_empty(),
        "{model}: a handler's result stands: {:#?}",
        failed.iter().map(|r| r.error.clone()).collect::<Vec<_>>()
    );
}

async fn a_panicking_drop_of_a_kept_copy_leaves_the_result_alone(model: ExecutionType) {
    let make = |id| Fragile {
        copies_drop_panics: true,
        ..Fragile::new(id)
    };
    all_succeed(model, fragile_pipeline(model, make, true, |f| f.id)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_drop_of_a_kept_copy_leaves_the_result_alone_async() {
    a_panicking_drop_of_a_kept_copy_leaves_the_result_alone(ExecutionType::Async).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_drop_of_a_kept_copy_leaves_the_result_alone_thread() {
    a_panicking_drop_of_a_kept_copy_leaves_the_result_alone(ExecutionType::Thread).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_drop_of_a_kept_copy_leaves_the_result_alone_cpu() {
    a_panicking_drop_of_a_kept_copy_leaves_the_result_alone(ExecutionType::Cpu).await;
}

async fn a_panicking_drop_of_the_last_output_leaves_the_result_alone(model: ExecutionType) {
    // The output is the input with a `Drop` that panics, dropped by the
    // engine once the item is finished.
    let output = |mut f: Fragile| {
        f.drop_panics = true;
        f
    };
    all_succeed(model, fragile_pipeline(model, Fragile::new, false, output)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_drop_of_the_last_output_leaves_the_result_alone_async() {
    a_panicking_drop_of_the_last_output_leaves_the_result_alone(ExecutionType::Async).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_drop_of_the_last_output_leaves_the_result_alone_thread() {
    a_panicking_drop_of_the_last_output_leaves_the_result_alone(ExecutionType::Thread).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_drop_of_the_last_output_leaves_the_result_alone_cpu() {
    a_panicking_drop_of_the_last_output_leaves_the_result_alone(ExecutionType::Cpu).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_panic_whose_payload_panics_on_drop_is_not_fatal() {
    struct Payload;
    impl Drop for Payload {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                panic!("payload drop panicked");
            }
        }
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let pipeline = Pipeline::builder(config(
        "payload",
        vec![StageConfig::new("a", ExecutionType::Async)],
    ))
    .unwrap()
    .source(sources::iter(0..100u64))
    .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
    .on_complete(|r| {
        if r.job_id.to_string().ends_with('0') {
            std::panic::panic_any(Payload);
        }
    })
    .on_complete(move |_| {
        seen.fetch_add(1, Ordering::SeqCst);
    })
    .build()
    .unwrap();
    let results = within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 100);
    assert!(results.iter().all(|r| r.success));
    assert_eq!(calls.load(Ordering::SeqCst), 100);
}

/// Aborting drops what the pipeline holds: queued items, items in workers,
/// late reports of blocking workers. Each `Drop` panics here, and every
/// admitted item still gets its outcome.
async fn abort_drops_data_whose_drop_panics(model: ExecutionType) {
    let stage = StageConfig::new("hold", model).workers(2).queue_size(20);
    let builder = Pipeline::builder(config("abort-fragile", vec![stage]))
        .unwrap()
        .source(sources::iter((0u64..).map(|id| Fragile {
            drop_panics: true,
            ..Fragile::new(id)
        })));
    let pipeline = match model {
        ExecutionType::Async => builder
            .async_stage("hold", |i: WorkItem<Fragile>| async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(i)
            })
            .build(),
        _ => builder
            .sync_stage("hold", |i: WorkItem<Fragile>| {
                std::thread::sleep(Duration::from_millis(20));
                Ok(i)
            })
            .build(),
    }
    .unwrap();
    pipeline.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    within(Duration::from_secs(10), pipeline.abort())
        .await
        .unwrap_or_else(|e| panic!("{model}: {e}"));
    let results = within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap_or_else(|e| panic!("{model}: {e}"));
    assert_unique_ids(&results);
    let stats = pipeline.stats().await.unwrap();
    assert_eq!(results.len() as u64, stats.admitted_items, "{model}");
    assert!(results.iter().any(|r| r.is_cancelled()), "{model}");
    // Let the blocking workers' late reports arrive at their stage.
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_drops_data_whose_drop_panics_async() {
    abort_drops_data_whose_drop_panics(ExecutionType::Async).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_drops_data_whose_drop_panics_thread() {
    abort_drops_data_whose_drop_panics(ExecutionType::Thread).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_drops_data_whose_drop_panics_cpu() {
    abort_drops_data_whose_drop_panics(ExecutionType::Cpu).await;
}

/// A refused duplicate's data is dropped by the engine: its `Drop` is user
/// code, and a panic in it neither kills the source nor costs another item
/// its outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_duplicate_whose_drop_panics_is_still_refused_clearly() {
    let items = vec![
        WorkItem::with_job_id("same", Fragile::new(1)),
        WorkItem::with_job_id("other", Fragile::new(2)),
        WorkItem::with_job_id(
            "same",
            Fragile {
                drop_panics: true,
                ..Fragile::new(3)
            },
        ),
    ];
    let pipeline = Pipeline::builder(config(
        "dup-drop",
        vec![StageConfig::new("a", ExecutionType::Async)],
    ))
    .unwrap()
    .source(sources::items(items))
    .async_stage("a", |i: WorkItem<Fragile>| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(i.map(|f| f.id))
    })
    .build()
    .unwrap();
    let results = within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 3);
    let refused: Vec<_> = results.iter().filter(|r| !r.success).collect();
    assert_eq!(refused.len(), 1, "{results:?}");
    let e = refused[0].error.as_ref().unwrap();
    assert_eq!(e.kind, ItemErrorKind::DuplicateJobId);
}
