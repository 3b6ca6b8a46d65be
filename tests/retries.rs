//! Retries, timeouts and dead letters: a failed attempt is tried again
//! under the stage's policy without holding a worker, an attempt past the
//! stage's timeout fails `TimedOut` in every model, and every item that ends
//! without success reaches the dead-letter sink, replayable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bergtalzug::prelude::*;
use tokio::sync::mpsc;

mod common;
use common::*;

fn stage(name: &str, model: ExecutionType) -> StageConfig {
    StageConfig::new(name, model).workers(2).queue_size(8)
}

#[tokio::test(start_paused = true)]
async fn a_failing_attempt_is_retried_until_it_succeeds() {
    let policy = RetryPolicy::exponential(3, Duration::from_millis(100));
    let pipeline = Pipeline::builder(config(
        "retries",
        // Room for every item: items waiting to retry count against it.
        vec![
            stage("flaky", ExecutionType::Async)
                .queue_size(64)
                .retry(policy),
        ],
    ))
    .unwrap()
    .source(sources::iter(0..30u64))
    .retrying_async_stage("flaky", |item: WorkItem<u64>| async move {
        // Every third item fails its first two attempts.
        if item.data.is_multiple_of(3) && item.metadata().attempts() < 3 {
            anyhow::bail!(
                "attempt {} of {} failed",
                item.metadata().attempts(),
                item.data
            );
        }
        Ok(item)
    })
    .build()
    .unwrap();
    let start = tokio::time::Instant::now();
    let results = within(Duration::from_secs(60), pipeline.run())
        .await
        .unwrap();
    let elapsed = start.elapsed();
    assert_eq!(results.len(), 30);
    assert_unique_ids(&results);
    assert!(
        results.iter().all(|r| r.success),
        "every item succeeds at last"
    );
    for r in &results {
        let times = r.metadata.stage("flaky").unwrap();
        let expected = if r.metadata.attempts() == 3 { 3 } else { 1 };
        assert_eq!(times.attempts(), expected);
    }
    let retried_items = results
        .iter()
        .filter(|r| r.metadata.attempts() == 3)
        .count();
    assert_eq!(retried_items, 10);
    let stats = pipeline.stats().await.unwrap();
    assert_eq!(
        stats.stage("flaky").unwrap().retried,
        20,
        "two retries each"
    );
    assert_eq!(stats.stage("flaky").unwrap().failed, 0);
    // Backoff 100 ms, then 200 ms.
    assert!(elapsed >= Duration::from_millis(300), "took {elapsed:?}");
    assert!(elapsed < Duration::from_millis(400), "took {elapsed:?}");
}

#[tokio::test(start_paused = true)]
async fn a_retry_waits_without_holding_a_worker() {
    let policy = RetryPolicy::fixed(2, Duration::from_secs(10));
    let finished = Arc::new(Mutex::new(Vec::new()));
    let log = finished.clone();
    let start = tokio::time::Instant::now();
    let pipeline = Pipeline::builder(config(
        "patient",
        vec![
            StageConfig::new("one", ExecutionType::Async)
                .workers(1)
                .queue_size(4)
                .retry(policy),
        ],
    ))
    .unwrap()
    .source(sources::iter(0..20u64))
    .retrying_async_stage("one", |item: WorkItem<u64>| async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if item.data == 0 {
            anyhow::bail!("item 0 always fails");
        }
        Ok(item)
    })
    .on_complete(move |r| log.lock().unwrap().push((r.success, start.elapsed())))
    .build()
    .unwrap();
    let results = within(Duration::from_secs(60), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 20);
    let finished = finished.lock().unwrap();
    let last_success = finished.iter().filter(|(ok, _)| *ok).map(|(_, t)| *t).max();
    // With the worker held for the 10 s wait, the others would finish after it.
    assert!(
        last_success.unwrap() < Duration::from_secs(1),
        "the other 19 items finished at {last_success:?}"
    );
    let (ok, at) = *finished.last().unwrap();
    assert!(!ok, "item 0 fails last");
    assert!(at >= Duration::from_secs(10), "after its backoff: {at:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_reach_the_dead_letters_with_their_input() {
    let policy = RetryPolicy::fixed(3, Duration::from_millis(1));
    let (tx, mut rx) = mpsc::channel(4);
    let collector = tokio::spawn(async move {
        let mut letters = Vec::new();
        while let Some(letter) = rx.recv().await {
            letters.push(letter);
        }
        letters
    });
    let pipeline = Pipeline::builder(config(
        "dead",
        vec![
            stage("parse", ExecutionType::Thread).retry(policy),
            stage("store", ExecutionType::Async),
        ],
    ))
    .unwrap()
    .source(sources::iter((0..100u64).map(|n| format!("row-{n}"))))
    .retrying_sync_stage("parse", |item: WorkItem<String>| {
        let n: u64 = item.data.trim_start_matches("row-").parse()?;
        if n % 10 == 7 {
            anyhow::bail!("row {n} is malformed");
        }
        Ok(item.map(|_| n))
    })
    .async_stage("store", |item: WorkItem<u64>| async move { Ok(item) })
    .dead_letters(tx)
    .build()
    .unwrap();
    let results = within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    let letters = within(Duration::from_secs(5), collector).await.unwrap();
    let failed: Vec<_> = results.iter().filter(|r| !r.success).collect();
    assert_eq!(failed.len(), 10);
    assert_eq!(letters.len(), 10, "one letter per failed item");
    for r in &failed {
        let e = r.error.as_ref().unwrap();
        assert_eq!(e.attempts, 3);
        assert_eq!(r.metadata.stage("parse").unwrap().attempts(), 3);
    }
    let mut replays = Vec::new();
    for letter in letters {
        assert_eq!(letter.error.stage, "parse");
        assert_eq!(letter.error.kind, ItemErrorKind::Failed);
        assert_eq!(letter.error.attempts, 3);
        assert!(letter.error.message.contains("is malformed"));
        assert!(letter.metadata.stage("parse").is_some(), "lineage kept");
        let input = letter
            .input::<String>()
            .expect("a retrying stage keeps its input");
        assert_eq!(input.job_id(), &letter.job_id);
        let id = letter.job_id.clone();
        let item = letter.replay::<String>().unwrap();
        assert_eq!(item.job_id(), &id);
        replays.push(item);
    }
    // Replay the letters into a pipeline whose parser was fixed.
    let pipeline = Pipeline::builder(config(
        "replay",
        vec![stage("parse", ExecutionType::Thread)],
    ))
    .unwrap()
    .injected::<String>()
    .sync_stage("parse", |item: WorkItem<String>| Ok(item.map(|s| s.len())))
    .build()
    .unwrap();
    pipeline.start().await.unwrap();
    pipeline.inject(replays).await.unwrap();
    pipeline.stop().await.unwrap();
    let replayed = pipeline.run().await.unwrap();
    assert_eq!(replayed.len(), 10);
    assert!(replayed.iter().all(|r| r.success));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_error_is_not_retried_and_its_letter_says_so() {
    let letters = Arc::new(Mutex::new(Vec::new()));
    let sink = letters.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let pipeline = Pipeline::builder(config(
        "permanent",
        vec![stage("check", ExecutionType::Cpu).retry(RetryPolicy::fixed(5, Duration::ZERO))],
    ))
    .unwrap()
    .source(sources::iter(0..10u64))
    .retrying_sync_stage("check", move |item: WorkItem<u64>| {
        counted.fetch_add(1, Ordering::SeqCst);
        if item.data == 4 {
            return Err(Permanent(anyhow::anyhow!("4 is not allowed")).into());
        }
        Ok(item)
    })
    .on_dead_letter(move |letter| sink.lock().unwrap().push(letter))
    .build()
    .unwrap();
    let results = within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.iter().filter(|r| !r.success).count(), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 10, "no second attempt");
    let letters = letters.lock().unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].error.attempts, 1);
    assert_eq!(letters[0].error.message, "4 is not allowed");
}

#[tokio::test(start_paused = true)]
async fn an_async_attempt_past_the_timeout_is_cancelled() {
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = dropped.clone();
    struct SetOnDrop(Arc<AtomicBool>);
    impl Drop for SetOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let pipeline = Pipeline::builder(config(
        "slow",
        vec![stage("fetch", ExecutionType::Async).timeout(Duration::from_secs(1))],
    ))
    .unwrap()
    .source(sources::iter(0..10u64))
    .async_stage("fetch", move |item: WorkItem<u64>| {
        let flag = flag.clone();
        async move {
            if item.data == 3 {
                let _guard = SetOnDrop(flag);
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            Ok(item)
        }
    })
    .build()
    .unwrap();
    let start = tokio::time::Instant::now();
    let results = within(Duration::from_secs(60), pipeline.run())
        .await
        .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(results.len(), 10);
    let failed: Vec<_> = results.iter().filter(|r| !r.success).collect();
    assert_eq!(failed.len(), 1);
    let e = failed[0].error.as_ref().unwrap();
    assert_eq!(e.kind, ItemErrorKind::TimedOut);
    assert!(e.message.contains("timeout of 1s"), "{}", e.message);
    assert!(
        dropped.load(Ordering::SeqCst),
        "the handler's future was dropped"
    );
}

async fn a_blocking_attempt_past_the_timeout_fails_at_the_deadline(model: ExecutionType) {
    let pipeline = Pipeline::builder(config(
        "stuck",
        vec![stage("crunch", model).timeout(Duration::from_millis(100))],
    ))
    .unwrap()
    .source(sources::iter(0..50u64))
    .sync_stage("crunch", |item: WorkItem<u64>| {
        if item.data == 7 {
            std::thread::sleep(Duration::from_secs(3));
        }
        Ok(item)
    })
    .build()
    .unwrap();
    let mut events = pipeline.subscribe_filtered(EventFilter::none().with_control());
    let start = std::time::Instant::now();
    let results = within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{model}: the pipeline waited for the stuck handler: {:?}",
        start.elapsed()
    );
    assert_eq!(results.len(), 50, "{model}");
    assert_unique_ids(&results);
    let failed: Vec<_> = results.iter().filter(|r| !r.success).collect();
    assert_eq!(failed.len(), 1, "{model}");
    assert_eq!(
        failed[0].error.as_ref().unwrap().kind,
        ItemErrorKind::TimedOut
    );
    let mut restarted = 0;
    while let Some(event) = events.recv().await {
        if let PipelineEvent::WorkerRestarted { reason, .. } = event {
            assert!(reason.contains("timeout"), "{reason}");
            restarted += 1;
        }
    }
    assert_eq!(restarted, 1, "{model}: the stuck worker is replaced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thread_attempt_past_the_timeout_fails_at_the_deadline() {
    a_blocking_attempt_past_the_timeout_fails_at_the_deadline(ExecutionType::Thread).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_attempt_past_the_timeout_fails_at_the_deadline() {
    a_blocking_attempt_past_the_timeout_fails_at_the_deadline(ExecutionType::Cpu).await;
}

/// A worker whose blocking attempt is given up at the timeout is dying: it
/// gets no more work, so no item that never ran fails `WorkerLost` with it
/// (issue 20 item 5). Every attempt here runs past the timeout: each fails
/// `TimedOut`, none is lost.
async fn items_that_never_ran_are_not_lost_with_a_timed_out_worker(model: ExecutionType) {
    // The race it guards against (the stage handing the dying worker more
    // work) is narrow: many short rounds.
    for round in 0..4 {
        let pipeline = Pipeline::builder(config(
            "never-ran",
            vec![
                stage("crunch", model)
                    .workers(8)
                    .timeout(Duration::from_millis(5)),
            ],
        ))
        .unwrap()
        .source(sources::iter(0..300u64))
        .sync_stage("crunch", |item: WorkItem<u64>| {
            std::thread::sleep(Duration::from_millis(12));
            Ok(item)
        })
        .build()
        .unwrap();
        let results = within(Duration::from_secs(30), pipeline.run())
            .await
            .unwrap();
        assert_eq!(results.len(), 300, "{model} round {round}");
        assert_unique_ids(&results);
        let lost: Vec<_> = results
            .iter()
            .filter_map(|r| r.error.as_ref())
            .filter(|e| e.kind != ItemErrorKind::TimedOut)
            .collect();
        assert!(lost.is_empty(), "{model} round {round}: {lost:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_that_never_ran_are_not_lost_with_a_timed_out_thread_worker() {
    items_that_never_ran_are_not_lost_with_a_timed_out_worker(ExecutionType::Thread).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_that_never_ran_are_not_lost_with_a_timed_out_cpu_worker() {
    items_that_never_ran_are_not_lost_with_a_timed_out_worker(ExecutionType::Cpu).await;
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_attempt_is_retried() {
    let attempts = Arc::new(Mutex::new(HashMap::<u64, u32>::new()));
    let seen = attempts.clone();
    let pipeline = Pipeline::builder(config(
        "retry-timeouts",
        vec![
            stage("fetch", ExecutionType::Async)
                .timeout(Duration::from_secs(1))
                .retry(RetryPolicy::fixed(2, Duration::from_millis(10))),
        ],
    ))
    .unwrap()
    .source(sources::iter(0..6u64))
    .retrying_async_stage("fetch", move |item: WorkItem<u64>| {
        *seen.lock().unwrap().entry(item.data).or_default() += 1;
        async move {
            if item.data == 2 && item.metadata().attempts() == 1 {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            Ok(item)
        }
    })
    .build()
    .unwrap();
    let results = within(Duration::from_secs(60), pipeline.run())
        .await
        .unwrap();
    assert!(results.iter().all(|r| r.success));
    assert_eq!(attempts.lock().unwrap()[&2], 2);
    assert_eq!(
        pipeline
            .stats()
            .await
            .unwrap()
            .stage("fetch")
            .unwrap()
            .retried,
        1
    );
}

#[tokio::test(start_paused = true)]
async fn abort_cancels_items_waiting_to_be_retried() {
    let letters = Arc::new(Mutex::new(Vec::new()));
    let sink = letters.clone();
    let pipeline = Pipeline::builder(config(
        "abort-retries",
        vec![
            stage("fail", ExecutionType::Async)
                .retry(RetryPolicy::fixed(5, Duration::from_secs(3600))),
        ],
    ))
    .unwrap()
    .source(sources::iter(0..8u64))
    .retrying_async_stage("fail", |_: WorkItem<u64>| async move {
        Err::<WorkItem<u64>, _>(anyhow::anyhow!("down"))
    })
    .on_dead_letter(move |letter| sink.lock().unwrap().push(letter))
    .build()
    .unwrap();
    pipeline.start().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = pipeline.stats().await.unwrap();
    assert_eq!(
        stats.stage("fail").unwrap().retried,
        8,
        "all wait for a retry"
    );
    within(Duration::from_secs(5), pipeline.abort())
        .await
        .unwrap();
    let results = pipeline.run().await.unwrap();
    assert_eq!(results.len(), 8);
    assert!(results.iter().all(|r| r.is_cancelled()));
    let letters = letters.lock().unwrap();
    assert_eq!(letters.len(), 8, "cancelled items are dead letters too");
    assert!(
        letters
            .iter()
            .all(|l| l.error.message.contains("waited to be retried"))
    );
    assert!(letters.iter().all(|l| l.error.attempts == 1));
}

#[test]
fn retry_and_timeout_load_from_files_and_bad_values_name_the_field() {
    let config = PipelineConfig::from_toml_str(
        r#"
        pipeline_name = "p"
        [[stages]]
        name = "store"
        execution_type = "async"
        timeout = 2.5
        retry = { max_attempts = 4, initial_delay = 0.05, multiplier = 2.0, max_delay = 1.0, jitter = 0.2 }
        "#,
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    let stage = &config.stages[0];
    assert_eq!(stage.timeout, Some(Duration::from_millis(2500)));
    let retry = stage.retry.unwrap();
    assert_eq!(retry.max_attempts, 4);
    assert_eq!(retry.initial_delay, Duration::from_millis(50));
    assert_eq!(retry.max_delay, Duration::from_secs(1));
    let json = serde_json::to_string(&config).unwrap();
    assert_eq!(PipelineConfig::from_json_str(&json).unwrap(), config);

    let bad = |retry: &str| {
        let text = format!(
            "pipeline_name = \"p\"\n[[stages]]\nname = \"s\"\nexecution_type = \"async\"\n{retry}\n"
        );
        PipelineConfig::from_toml_str(&text)
            .unwrap_err()
            .to_string()
    };
    let e = bad("retry = { max_attempts = 0, initial_delay = 1.0 }");
    assert!(
        e.contains("`retry.max_attempts`") && e.contains("stage `s`"),
        "{e}"
    );
    let e = bad("retry = { max_attempts = 2, initial_delay = 1.0, jitter = 1.5 }");
    assert!(e.contains("`retry.jitter`"), "{e}");
    let e = bad("retry = { max_attempts = 2, initial_delay = 1.0, multiplier = 0.5 }");
    assert!(e.contains("`retry.multiplier`"), "{e}");
    let e = bad("retry = { max_attempts = 2 }");
    assert!(e.contains("stages[0].retry.initial_delay"), "{e}");
    let e = bad("timeout = 0");
    assert!(e.contains("`timeout`"), "{e}");
    let e = bad("timeout = -1");
    assert!(e.contains("stages[0].timeout"), "{e}");
}

/// `stage_duration` is the handler's time, summed over the attempts; the
/// retry backoff and the wait in the queue again are `retry_wait`, and the
/// whole stay from first start to last end is `StageTimes::duration`.
async fn stage_duration_is_handler_time(model: ExecutionType) {
    let backoff = Duration::from_millis(300);
    let stage = stage("flaky", model).retry(RetryPolicy::fixed(2, backoff));
    let builder = Pipeline::builder(config("handler-time", vec![stage]))
        .unwrap()
        .source(sources::iter(0..4u64));
    let pipeline = if model == ExecutionType::Async {
        builder
            .retrying_async_stage("flaky", |item: WorkItem<u64>| async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                anyhow::ensure!(item.metadata().attempts() > 1, "first attempt fails");
                Ok(item)
            })
            .build()
    } else {
        builder
            .retrying_sync_stage("flaky", |item: WorkItem<u64>| {
                std::thread::sleep(Duration::from_millis(5));
                anyhow::ensure!(item.metadata().attempts() > 1, "first attempt fails");
                Ok(item)
            })
            .build()
    }
    .unwrap();
    let results = within(Duration::from_secs(20), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 4);
    for r in &results {
        assert!(r.success, "{:?}", r.error);
        let handler = r.metadata.stage_duration("flaky").unwrap();
        let times = r.metadata.stage("flaky").unwrap();
        assert_eq!(times.attempts(), 2);
        assert!(handler >= Duration::from_millis(10), "{model}: {handler:?}");
        assert!(
            handler < backoff / 2,
            "{model}: the backoff was counted: {handler:?}"
        );
        assert_eq!(times.handler_duration(), Some(handler));
        assert!(times.duration().unwrap() >= backoff, "{model}: {times:?}");
        let wait = times.retry_wait().unwrap();
        assert!(
            wait >= backoff
                && wait + handler <= times.duration().unwrap() + Duration::from_micros(1)
        );
    }
    let stats = pipeline.stats().await.unwrap();
    let flaky = &stats.stages[0];
    assert!(
        flaky.p99_duration.unwrap() < backoff / 2,
        "{model}: stage stats count handler time: {:?}",
        flaky.p99_duration
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_duration_is_the_async_handlers_time_without_the_retry_wait() {
    stage_duration_is_handler_time(ExecutionType::Async).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_duration_is_the_thread_handlers_time_without_the_retry_wait() {
    stage_duration_is_handler_time(ExecutionType::Thread).await;
}

/// A handler that never returns, for the items `hangs` picks.
fn hanging(hangs: fn(u64) -> bool) -> impl Fn(WorkItem<u64>) -> anyhow::Result<WorkItem<u64>> {
    move |item| {
        if hangs(item.data) {
            loop {
                std::thread::park();
            }
        }
        Ok(item)
    }
}

/// Every worker of a Cpu stage gets stuck in turn (2 workers, 4 items that
/// never return): each stuck attempt is given up at the timeout and the
/// stage goes on with its other items on other threads, to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_stage_whose_workers_all_hang_still_finishes_every_item() {
    let pipeline = Pipeline::builder(config(
        "all-stuck",
        vec![stage("crunch", ExecutionType::Cpu).timeout(Duration::from_millis(300))],
    ))
    .unwrap()
    .source(sources::iter(0..200u64))
    .sync_stage("crunch", hanging(|n| n % 50 == 7))
    .build()
    .unwrap();
    let results = within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 200);
    assert_unique_ids(&results);
    let failed: Vec<_> = results.iter().filter(|r| !r.success).collect();
    assert_eq!(failed.len(), 4);
    assert!(
        failed
            .iter()
            .all(|r| r.error.as_ref().unwrap().kind == ItemErrorKind::TimedOut)
    );
    let stats = pipeline.stats().await.unwrap();
    assert_eq!(stats.stages[0].stuck_threads, 4, "each hang keeps a thread");
}

/// Stuck Thread attempts do not take threads of tokio's blocking pool: with
/// a pool of 4 and 8 attempts that never return, the stage finishes and the
/// program's own `spawn_blocking` still runs.
#[test]
fn stuck_thread_attempts_leave_the_blocking_pool_to_the_program() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(4)
            .enable_all()
            .build()
            .unwrap();
        let outcome = runtime.block_on(async {
            let pipeline = Pipeline::builder(config(
                "pool",
                vec![stage("io", ExecutionType::Thread).timeout(Duration::from_millis(200))],
            ))
            .unwrap()
            .source(sources::iter(0..100u64))
            .sync_stage("io", hanging(|n| n % 12 == 5))
            .build()
            .unwrap();
            let results = pipeline.run().await.unwrap();
            let timed_out = results
                .iter()
                .filter(|r| {
                    r.error
                        .as_ref()
                        .is_some_and(|e| e.kind == ItemErrorKind::TimedOut)
                })
                .count();
            let own = tokio::task::spawn_blocking(|| 42).await.unwrap();
            (results.len(), timed_out, own)
        });
        drop(runtime);
        let _ = done.send(outcome);
    });
    let outcome = finished
        .recv_timeout(Duration::from_secs(30))
        .expect("the stage or the program's spawn_blocking hung");
    assert_eq!(outcome, (100, 8, 42));
}
