//! The durable work queue (feature `sqlite`): what it records of a run, in
//! one process. The crash tests are in `durable_crash.rs`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bergtalzug::prelude::*;
use bergtalzug::queue::{Durability, QueueCounts, QueueOptions, WorkQueue};

mod common;
use common::*;

fn url(dir: &tempfile::TempDir) -> String {
    format!("sqlite:{}", dir.path().join("queue.db").display())
}

fn one_stage(name: &str) -> PipelineConfig {
    config(
        name,
        vec![
            StageConfig::new("work", ExecutionType::Async)
                .workers(4)
                .queue_size(8),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueuing_a_job_again_adds_only_the_new_job_ids() {
    let dir = tempfile::tempdir().unwrap();
    let queue = WorkQueue::open(&url(&dir), QueueOptions::default()).unwrap();
    assert_eq!(
        queue
            .enqueue((0..10u64).map(|n| (format!("n{n}"), n)))
            .await
            .unwrap(),
        10
    );
    assert_eq!(
        queue
            .enqueue((5..15u64).map(|n| (format!("n{n}"), n)))
            .await
            .unwrap(),
        5
    );
    let lines = dir.path().join("input.txt");
    std::fs::write(&lines, "alpha\nbeta\n").unwrap();
    assert_eq!(queue.enqueue_lines(&lines).await.unwrap(), 2);
    assert_eq!(queue.enqueue_lines(&lines).await.unwrap(), 0);
    let counts = queue.counts().await.unwrap();
    assert_eq!(
        counts,
        QueueCounts {
            pending: 17,
            ..QueueCounts::default()
        }
    );
}

/// Successes are done; final failures are dead with their stage, kind,
/// error and attempts; nothing stays leased; the sink saw each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_marks_successes_done_and_failures_dead_with_their_error() {
    for durability in [Durability::Full, Durability::Normal] {
        let dir = tempfile::tempdir().unwrap();
        let queue =
            WorkQueue::open(&url(&dir), QueueOptions::default().durability(durability)).unwrap();
        queue
            .enqueue((0..200u64).map(|n| (format!("n{n}"), n)))
            .await
            .unwrap();
        let pipeline = Pipeline::builder(one_stage("done-and-dead").retain_results(false))
            .unwrap()
            .source(queue.source::<u64>().unwrap())
            .async_stage("work", |i: WorkItem<u64>| async move {
                if i.data % 10 == 3 {
                    anyhow::bail!("{} ends in 3", i.data);
                }
                Ok(i)
            })
            .build()
            .unwrap();
        within(Duration::from_secs(20), pipeline.run())
            .await
            .unwrap();
        let counts = queue.counts().await.unwrap();
        assert_eq!(
            counts,
            QueueCounts {
                pending: 0,
                leased: 0,
                done: 180,
                dead: 20
            },
            "{durability:?}"
        );
        let dead = queue.dead_letters().await.unwrap();
        assert_eq!(dead.len(), 20);
        for letter in &dead {
            let n: u64 = letter.job_id[1..].parse().unwrap();
            assert_eq!(n % 10, 3);
            assert_eq!(letter.stage, "work");
            assert_eq!(letter.kind, "failed");
            assert_eq!(letter.error, format!("{n} ends in 3"));
            assert_eq!(letter.attempts, 1);
            assert_eq!(letter.deliveries, 1);
            assert_eq!(letter.payload, n.to_string());
        }
    }
}

/// A stopped run releases what it cancelled (pending again, the delivery
/// not counted against it); the next run does the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_run_releases_its_cancelled_items_for_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let queue = WorkQueue::open(&url(&dir), QueueOptions::default()).unwrap();
    queue
        .enqueue((0..100u64).map(|n| (format!("n{n}"), n)))
        .await
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let run = |seen: Arc<Mutex<Vec<u64>>>| {
        Pipeline::builder(one_stage("stopped").retain_results(false))
            .unwrap()
            .source(queue.source::<u64>().unwrap())
            .async_stage("work", move |i: WorkItem<u64>| {
                let seen = seen.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    seen.lock().unwrap().push(i.data);
                    Ok(i)
                }
            })
            .build()
            .unwrap()
    };
    let first = run(seen.clone());
    first.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(40)).await;
    within(Duration::from_secs(10), first.abort())
        .await
        .unwrap();
    let _ = within(Duration::from_secs(10), first.run()).await;
    let after_stop = queue.counts().await.unwrap();
    assert_eq!(
        after_stop.leased, 0,
        "cancelled items are released: {after_stop:?}"
    );
    assert!(after_stop.pending > 0, "{after_stop:?}");
    assert_eq!(after_stop.done + after_stop.pending, 100);

    let second = run(seen.clone());
    within(Duration::from_secs(20), second.run()).await.unwrap();
    let counts = queue.counts().await.unwrap();
    assert_eq!(
        (counts.done, counts.pending, counts.leased, counts.dead),
        (100, 0, 0, 0)
    );
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen, (0..100).collect::<Vec<_>>());
}

/// Progress is readable from another handle on the file while a job runs,
/// and shows what finished while every slot holds a blocked item (so that
/// no lease comes to write it with).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_readable_from_outside_while_the_job_runs() {
    let dir = tempfile::tempdir().unwrap();
    let queue = WorkQueue::open(&url(&dir), QueueOptions::default()).unwrap();
    queue
        .enqueue((0..60u64).map(|n| (format!("n{n}"), n)))
        .await
        .unwrap();
    let (gate_tx, gate_rx) = async_channel::bounded::<()>(1);
    let pipeline = Pipeline::builder(one_stage("watched").retain_results(false))
        .unwrap()
        .source(queue.source::<u64>().unwrap())
        .async_stage("work", move |i: WorkItem<u64>| {
            let gate = gate_rx.clone();
            async move {
                if i.data >= 30 {
                    let _ = gate.recv().await;
                }
                Ok(i)
            }
        })
        .build()
        .unwrap();
    pipeline.start().await.unwrap();
    let outside = WorkQueue::open(&url(&dir), QueueOptions::default()).unwrap();
    let counts = within(Duration::from_secs(10), async {
        loop {
            let c = outside.counts().await.unwrap();
            if c.done == 30 && c.leased > 0 {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(counts.total(), 60);
    assert!(
        counts.leased <= 12,
        "at most the window is leased: {counts:?}"
    );
    gate_tx.close();
    within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap();
    assert_eq!(outside.counts().await.unwrap().done, 60);
}

/// With `follow`, an empty queue keeps the run open; items enqueued later
/// run; `stop()` ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_following_source_waits_for_new_items_until_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let queue = WorkQueue::open(&url(&dir), QueueOptions::default().follow(true)).unwrap();
    let pipeline = Pipeline::builder(
        one_stage("follow")
            .retain_results(false)
            .queue_refresh_rate(Duration::from_millis(10)),
    )
    .unwrap()
    .source(queue.source::<u64>().unwrap())
    .async_stage("work", |i: WorkItem<u64>| async move { Ok(i) })
    .build()
    .unwrap();
    pipeline.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    queue
        .enqueue((0..20u64).map(|n| (format!("n{n}"), n)))
        .await
        .unwrap();
    within(Duration::from_secs(10), async {
        while queue.counts().await.unwrap().done < 20 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    within(Duration::from_secs(10), pipeline.stop())
        .await
        .unwrap();
    within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap();
}

#[test]
fn a_bad_url_or_option_is_refused_clearly() {
    let e = WorkQueue::open("kafka://localhost/jobs", QueueOptions::default()).unwrap_err();
    assert!(e.to_string().contains("unknown scheme \"kafka\""), "{e}");
    // Without the feature, a Redis URL says which feature it needs.
    #[cfg(not(feature = "redis"))]
    {
        let e = WorkQueue::open("redis://localhost/jobs", QueueOptions::default()).unwrap_err();
        assert!(e.to_string().contains("needs the feature redis"), "{e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let e = WorkQueue::open(&url(&dir), QueueOptions::default().max_deliveries(0)).unwrap_err();
    assert!(e.to_string().contains("max_deliveries"), "{e}");
    let not_a_db = dir.path().join("text.db");
    std::fs::write(
        &not_a_db,
        "this is not a database, it is long enough to be read",
    )
    .unwrap();
    let e = WorkQueue::open(not_a_db.to_str().unwrap(), QueueOptions::default()).unwrap_err();
    assert!(format!("{e:#}").contains("text.db"), "{e:#}");
}
