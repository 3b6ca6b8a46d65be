//! Gather: batch stages cut a batch when it is full (at once), at
//! `batch_timeout` after its first item, per key without mixing keys, and
//! when the pipeline stops; a bad record fails alone, a handler error,
//! panic or timeout fails the batch's items, each with its own result and
//! ack; retries run the whole batch again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bergtalzug::prelude::*;
use bergtalzug::shape::{Batch, Children};
use tokio::time::Instant;

mod common;
use common::*;

/// The batches a handler saw: when (since the start) and which items.
type Seen = Arc<Mutex<Vec<(Duration, Vec<u64>)>>>;

fn batch_config(size: usize, timeout: Duration) -> PipelineConfig {
    PipelineConfig::new(
        "batches",
        vec![
            StageConfig::new("insert", ExecutionType::Async)
                .workers(1)
                .queue_size(2)
                .batch(size, timeout),
        ],
    )
    .stats_interval(Duration::ZERO)
}

fn recording(
    seen: &Seen,
    start: Instant,
) -> impl Fn(Batch<u64>) -> std::future::Ready<anyhow::Result<Vec<anyhow::Result<u64>>>>
+ Send
+ Sync
+ 'static {
    let seen = seen.clone();
    move |batch: Batch<u64>| {
        let items: Vec<u64> = batch.items().iter().map(|i| i.data).collect();
        seen.lock().unwrap().push((start.elapsed(), items.clone()));
        std::future::ready(Ok(items.into_iter().map(Ok).collect()))
    }
}

#[tokio::test(start_paused = true)]
async fn a_full_batch_leaves_at_once_and_a_partial_one_at_batch_timeout() {
    let seen: Seen = Arc::default();
    let start = Instant::now();
    let pipeline = Pipeline::builder(batch_config(3, Duration::from_secs(10)))
        .unwrap()
        .injected::<u64>()
        .async_batch_stage("insert", recording(&seen, start))
        .build()
        .unwrap();
    pipeline.start().await.unwrap();
    pipeline
        .inject((0..3).map(WorkItem::new).collect())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "a full batch leaves at once");
        assert_eq!(seen[0].1, [0, 1, 2]);
        assert!(seen[0].0 < Duration::from_millis(1));
    }
    let at = start.elapsed();
    pipeline
        .inject((3..5).map(WorkItem::new).collect())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(seen.lock().unwrap().len(), 1, "a partial batch waits");
    tokio::time::sleep(Duration::from_secs(2)).await;
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].1, [3, 4]);
        let waited = seen[1].0 - at;
        assert!(
            waited >= Duration::from_secs(10) && waited < Duration::from_millis(10_010),
            "left after {waited:?}"
        );
    }
    pipeline.stop().await.unwrap();
    let results = pipeline.run().await.unwrap();
    assert_eq!(results.len(), 5);
    assert!(results.iter().all(|r| r.success));
}

#[tokio::test(start_paused = true)]
async fn a_stopping_pipeline_flushes_partial_batches() {
    let seen: Seen = Arc::default();
    let start = Instant::now();
    let pipeline = Pipeline::builder(batch_config(100, Duration::from_secs(3600)))
        .unwrap()
        .injected::<u64>()
        .async_batch_stage("insert", recording(&seen, start))
        .build()
        .unwrap();
    pipeline.start().await.unwrap();
    pipeline
        .inject((0..7).map(WorkItem::new).collect())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(seen.lock().unwrap().is_empty());
    within(Duration::from_secs(60), pipeline.stop())
        .await
        .unwrap();
    let results = pipeline.run().await.unwrap();
    assert_eq!(results.len(), 7);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].0 < Duration::from_secs(2),
        "flushed on stop, not at the timeout"
    );
}

#[tokio::test(start_paused = true)]
async fn per_key_batches_do_not_mix() {
    let seen: Seen = Arc::default();
    let start = Instant::now();
    let pipeline = Pipeline::builder(batch_config(4, Duration::from_secs(1)))
        .unwrap()
        .injected::<u64>()
        .batch_by("insert", |item: &WorkItem<u64>| item.data % 3)
        .async_batch_stage("insert", recording(&seen, start))
        .build()
        .unwrap();
    pipeline.start().await.unwrap();
    // The input stays open: batches are cut only when full or due.
    pipeline
        .inject((0..40).map(WorkItem::new).collect())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    pipeline.stop().await.unwrap();
    let results = pipeline.run().await.unwrap();
    assert_eq!(results.len(), 40);
    let seen = seen.lock().unwrap();
    let mut all: Vec<u64> = Vec::new();
    for (_, batch) in seen.iter() {
        assert!(batch.len() <= 4);
        let key = batch[0] % 3;
        assert!(
            batch.iter().all(|n| n % 3 == key),
            "keys mixed in {batch:?}"
        );
        all.extend(batch);
    }
    all.sort();
    assert_eq!(all, (0..40).collect::<Vec<_>>());
    assert!(
        seen.iter().filter(|(_, b)| b.len() == 4).count() >= 8,
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_record_fails_alone_and_a_failed_batch_fails_each_item() {
    let letters = Arc::new(Mutex::new(Vec::new()));
    let config = PipelineConfig::new(
        "batches",
        vec![
            StageConfig::new("insert", ExecutionType::Thread)
                .workers(1)
                .queue_size(2)
                .batch(5, Duration::from_millis(20)),
        ],
    )
    .stats_interval(Duration::ZERO);
    let l = letters.clone();
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .on_dead_letter(move |d| l.lock().unwrap().push(d.job_id.to_string()))
        .source(sources::items(
            (0..10u64).map(|n| WorkItem::with_job_id(format!("r{n}"), n)),
        ))
        .sync_batch_stage("insert", |batch: Batch<u64>| {
            // The batch holding 7 is refused whole; 2 is refused alone.
            anyhow::ensure!(
                batch.items().iter().all(|i| i.data != 7),
                "deadlock detected"
            );
            Ok(batch
                .into_items()
                .into_iter()
                .map(|i| {
                    anyhow::ensure!(i.data != 2, "constraint violated by {}", i.data);
                    Ok(i.data)
                })
                .collect())
        })
        .build()
        .unwrap();
    let results = within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    assert_unique_ids(&results);
    assert_eq!(results.len(), 10, "one result per item, none per batch");
    let failed: Vec<&WorkItemResult> = results.iter().filter(|r| !r.success).collect();
    let r2 = results.iter().find(|r| r.job_id == "r2".into()).unwrap();
    assert!(
        r2.error
            .as_ref()
            .unwrap()
            .message
            .contains("constraint violated by 2")
    );
    let r7 = results.iter().find(|r| r.job_id == "r7".into()).unwrap();
    let e7 = r7.error.as_ref().unwrap();
    assert!(e7.message.contains("deadlock detected"), "{}", e7.message);
    assert_eq!(e7.stage, "insert");
    // Every item of 7's batch failed with it, each under its own id.
    let whole: Vec<_> = failed
        .iter()
        .filter(|r| r.error.as_ref().unwrap().message.contains("deadlock"))
        .collect();
    assert!(!whole.is_empty() && whole.len() <= 5);
    assert!(whole.iter().all(|r| r.job_id.to_string().starts_with('r')));
    let mut letters = letters.lock().unwrap().clone();
    letters.sort();
    let mut expected: Vec<String> = failed.iter().map(|r| r.job_id.to_string()).collect();
    expected.sort();
    assert_eq!(letters, expected, "a dead letter per failed item");
    let stats = pipeline.stats().await.unwrap();
    assert_eq!(stats.completed_items, 10);
    assert_eq!(stats.failed_items, failed.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_attempt_is_retried_whole() {
    let attempts = Arc::new(Mutex::new(0u32));
    let config = PipelineConfig::new(
        "batches",
        vec![
            StageConfig::new("insert", ExecutionType::Async)
                .workers(1)
                .batch(10, Duration::from_millis(20))
                .retry(RetryPolicy::fixed(2, Duration::from_millis(1))),
        ],
    )
    .stats_interval(Duration::ZERO);
    let a = attempts.clone();
    let results = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(0..10u64))
        .retrying_async_batch_stage("insert", move |batch: Batch<u64>| {
            let a = a.clone();
            async move {
                let first = {
                    let mut a = a.lock().unwrap();
                    *a += 1;
                    *a == 1
                };
                anyhow::ensure!(!first, "connection reset");
                Ok(batch.into_items().into_iter().map(|i| Ok(i.data)).collect())
            }
        })
        .build()
        .unwrap()
        .run()
        .await
        .unwrap();
    assert_eq!(results.len(), 10);
    assert!(results.iter().all(|r| r.success), "{:?}", results[0].error);
    assert!(*attempts.lock().unwrap() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_timing_out_fails_each_of_its_items_timed_out() {
    let config = PipelineConfig::new(
        "batches",
        vec![
            StageConfig::new("insert", ExecutionType::Async)
                .workers(1)
                .batch(4, Duration::from_millis(10))
                .timeout(Duration::from_millis(50)),
        ],
    )
    .stats_interval(Duration::ZERO);
    let results = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(0..4u64))
        .async_batch_stage("insert", |batch: Batch<u64>| async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(batch.into_items().into_iter().map(|i| Ok(i.data)).collect())
        })
        .build()
        .unwrap();
    let results = within(Duration::from_secs(30), results.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 4);
    for r in &results {
        assert_eq!(r.error.as_ref().unwrap().kind, ItemErrorKind::TimedOut);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_then_batch_accounts_for_every_child() {
    let config = PipelineConfig::new(
        "files",
        vec![
            StageConfig::new("read", ExecutionType::Thread)
                .workers(1)
                .queue_size(2),
            StageConfig::new("write", ExecutionType::Async)
                .workers(1)
                .queue_size(2)
                .batch(16, Duration::from_millis(10)),
        ],
    )
    .stats_interval(Duration::ZERO)
    .retain_results(false);
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter([1000u64, 0, 7]))
        .sync_stage("read", |file: WorkItem<u64>| {
            Ok(file.map(|n| Children::iter(0..n)))
        })
        .split()
        .async_batch_stage("write", |batch: Batch<u64>| async move {
            Ok(batch.into_items().into_iter().map(|r| Ok(r.data)).collect())
        })
        .build()
        .unwrap();
    within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    let stats = pipeline.stats().await.unwrap();
    assert_eq!(stats.admitted_items, 3);
    assert_eq!(stats.completed_items, 3);
    assert_eq!(stats.failed_items, 0);
    assert_eq!(stats.derived_items_finished, 1007);
    assert_eq!(stats.stages[0].derived, 1007);
}

/// Before the fix the split's budget of live children was the batch
/// stage's capacity counted in batches (here 2), so its batches could
/// never fill: they left only at the timeout, two records at a time.
#[tokio::test(start_paused = true)]
async fn a_split_feeds_a_batch_stage_full_batches() {
    let seen: Seen = Arc::default();
    let start = Instant::now();
    let config = PipelineConfig::new(
        "files",
        vec![
            StageConfig::new("read", ExecutionType::Async)
                .workers(1)
                .queue_size(1),
            StageConfig::new("insert", ExecutionType::Async)
                .workers(1)
                .queue_size(1)
                .batch(500, Duration::from_secs(60)),
        ],
    )
    .stats_interval(Duration::ZERO);
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .injected::<u64>()
        .async_stage("read", |file: WorkItem<u64>| async move {
            Ok(file.map(|n| Children::from((0..n).collect::<Vec<u64>>())))
        })
        .split()
        .async_batch_stage("insert", recording(&seen, start))
        .build()
        .unwrap();
    pipeline.start().await.unwrap();
    pipeline.inject(vec![WorkItem::new(2000)]).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    {
        let seen = seen.lock().unwrap();
        let sizes: Vec<usize> = seen.iter().map(|(_, b)| b.len()).collect();
        assert_eq!(
            sizes,
            [500, 500, 500, 500],
            "full batches, long before the timeout"
        );
    }
    pipeline.stop().await.unwrap();
    assert_eq!(pipeline.run().await.unwrap().len(), 2000);
}

#[test]
fn batch_fields_read_from_files_and_are_checked() {
    let text = r#"
        pipeline_name = "load"
        [[stages]]
        name = "insert"
        execution_type = "async"
        batch_size = 500
        batch_timeout = 2.5
    "#;
    let config = PipelineConfig::from_toml_str(text).unwrap();
    assert_eq!(config.stages[0].batch_size, Some(500));
    assert_eq!(
        config.stages[0].batch_timeout,
        Some(Duration::from_millis(2500))
    );
    let bad = text.replace("batch_size = 500", "batch_size = 0");
    let error = PipelineConfig::from_toml_str(&bad).unwrap_err().to_string();
    assert!(
        error.contains("insert") && error.contains("batch_size"),
        "{error}"
    );
    let orphan = text.replace("batch_size = 500", "");
    let error = PipelineConfig::from_toml_str(&orphan)
        .unwrap_err()
        .to_string();
    assert!(error.contains("batch_timeout"), "{error}");
}

#[test]
fn a_batch_stage_bound_one_item_at_a_time_is_a_build_error_naming_it() {
    let config = batch_config(10, Duration::from_secs(1));
    let error = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(0..3u64))
        .async_stage("insert", |i: WorkItem<u64>| async move { Ok(i) })
        .build()
        .unwrap_err();
    assert!(
        matches!(error, BuildError::BatchMismatch { ref stage, .. } if stage == "insert"),
        "{error}"
    );
    let plain = PipelineConfig::new("p", vec![StageConfig::new("insert", ExecutionType::Async)]);
    let error = Pipeline::builder(plain)
        .unwrap()
        .source(sources::iter(0..3u64))
        .async_batch_stage("insert", |b: Batch<u64>| async move {
            Ok(b.into_items().into_iter().map(|i| Ok(i.data)).collect())
        })
        .build()
        .unwrap_err();
    assert!(error.to_string().contains("no batch_size"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_ids_spelled_like_batch_ids_are_items_of_their_own() {
    // The batches of `insert` are shown `batch:insert:<n>`: users' items
    // with those ids are not taken for them, failed or not.
    let ids = ["batch:insert:1", "batch:insert:2", "r0", "r1", "r2", "r3"];
    let items: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| WorkItem::with_job_id(*id, n as u64))
        .collect();
    let pipeline = Pipeline::builder(batch_config(3, Duration::from_millis(20)))
        .unwrap()
        .source(sources::items(items))
        .async_batch_stage("insert", |batch: Batch<u64>| async move {
            // The second batch (r1..r3) fails whole.
            anyhow::ensure!(batch.items().iter().all(|i| i.data < 3), "lock timeout");
            Ok(batch.into_items().into_iter().map(|i| Ok(i.data)).collect())
        })
        .build()
        .unwrap();
    let results = within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    assert_unique_ids(&results);
    let mut got: Vec<(String, bool)> = results
        .iter()
        .map(|r| (r.job_id.to_string(), r.success))
        .collect();
    got.sort();
    let expected: Vec<(String, bool)> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| (id.to_string(), n < 3))
        .collect();
    let mut expected = expected;
    expected.sort();
    assert_eq!(got, expected, "one result per item, none per batch");
    let stats = pipeline.stats().await.unwrap();
    assert_eq!(stats.admitted_items, 6);
    assert_eq!(stats.completed_items, 6);
    assert_eq!(stats.failed_items, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stages_stats_count_items_and_its_batches_apart() {
    // 30 items in batches of 10: item 3 fails alone, the batch of 15
    // fails whole.
    let pipeline = Pipeline::builder(batch_config(10, Duration::from_secs(10)))
        .unwrap()
        .source(sources::iter(0..30u64))
        .async_batch_stage("insert", |batch: Batch<u64>| async move {
            anyhow::ensure!(batch.items().iter().all(|i| i.data != 15), "deadlock");
            Ok(batch
                .into_items()
                .into_iter()
                .map(|i| {
                    anyhow::ensure!(i.data != 3, "bad row");
                    Ok(i.data)
                })
                .collect())
        })
        .build()
        .unwrap();
    within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    let stats = pipeline.stats().await.unwrap();
    let insert = stats.stage("insert").unwrap();
    assert_eq!(insert.admitted, 30, "items in");
    assert_eq!(insert.processed, 19, "items done");
    assert_eq!(insert.failed, 11, "one alone, ten with their batch");
    let batches = insert.batches.expect("a batch stage counts its batches");
    assert_eq!(
        (batches.admitted, batches.processed, batches.failed),
        (3, 2, 1)
    );
    assert_eq!(stats.completed_items, 30);
    assert_eq!(stats.failed_items, 11);
}
