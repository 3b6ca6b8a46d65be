//! Per-worker resources: built at most once per worker, handed to the
//! handler with each item, dropped when the stage ends or when a handler
//! panicked holding one; a constructor that keeps failing trips the
//! restart budget, its error naming the stage.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bergtalzug::prelude::*;
use bergtalzug::resource::Held;

mod common;
use common::*;

/// Counts how many exist.
struct Conn {
    live: Arc<AtomicUsize>,
    used: u64,
}

impl Conn {
    fn open(built: &AtomicUsize, live: &Arc<AtomicUsize>) -> Conn {
        built.fetch_add(1, Ordering::SeqCst);
        live.fetch_add(1, Ordering::SeqCst);
        Conn {
            live: live.clone(),
            used: 0,
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

fn config(model: ExecutionType, workers: usize) -> PipelineConfig {
    PipelineConfig::new(
        "resources",
        vec![StageConfig::new("db", model).workers(workers).queue_size(8)],
    )
    .stats_interval(Duration::ZERO)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_worker_builds_its_resource_once_and_the_stage_drops_them() {
    let (built, live) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (b, l) = (built.clone(), live.clone());
    let pipeline = Pipeline::builder(config(ExecutionType::Async, 3))
        .unwrap()
        .source(sources::iter(0..300u64))
        .async_stage_with(
            "db",
            move || {
                let conn = Conn::open(&b, &l);
                async move { Ok(conn) }
            },
            |item: WorkItem<u64>, mut conn: Held<Conn>| async move {
                conn.used += 1;
                tokio::task::yield_now().await;
                Ok(item.map(|_| conn.used))
            },
        )
        .build()
        .unwrap();
    let results = within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 300);
    let built = built.load(Ordering::SeqCst);
    assert!((1..=3).contains(&built), "{built} resources for 3 workers");
    drop(pipeline);
    // The stage's actors end with the pipeline; so do its resources.
    within(Duration::from_secs(10), async {
        while live.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_stage_gets_its_resource_by_reference() {
    let (built, live) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (b, l) = (built.clone(), live.clone());
    let results = Pipeline::builder(config(ExecutionType::Thread, 2))
        .unwrap()
        .source(sources::iter(0..200u64))
        .sync_stage_with(
            "db",
            move || Ok(Conn::open(&b, &l)),
            |conn: &mut Conn, item: WorkItem<u64>| {
                conn.used += 1;
                Ok(item)
            },
        )
        .build()
        .unwrap()
        .run()
        .await
        .unwrap();
    assert_eq!(results.len(), 200);
    assert!(built.load(Ordering::SeqCst) <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_panics_drops_its_resource_and_the_next_is_fresh() {
    let (built, live) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (b, l) = (built.clone(), live.clone());
    let results = Pipeline::builder(config(ExecutionType::Thread, 1))
        .unwrap()
        .source(sources::iter(0..10u64))
        .sync_stage_with(
            "db",
            move || Ok(Conn::open(&b, &l)),
            |conn: &mut Conn, item: WorkItem<u64>| {
                conn.used += 1;
                assert!(item.data != 4, "connection broke");
                Ok(item.map(|_| conn.used))
            },
        )
        .build()
        .unwrap()
        .run()
        .await
        .unwrap();
    assert_eq!(results.iter().filter(|r| !r.success).count(), 1);
    assert_eq!(
        built.load(Ordering::SeqCst),
        2,
        "a fresh resource after the panic"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_constructor_that_keeps_failing_trips_the_restart_budget() {
    let config = PipelineConfig::new(
        "resources",
        vec![
            StageConfig::new("db", ExecutionType::Async)
                .workers(1)
                .queue_size(4)
                .restart_budget(RestartBudget::new(2, Duration::from_secs(60))),
        ],
    )
    .stats_interval(Duration::ZERO);
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(0..20u64))
        .async_stage_with(
            "db",
            || async { Err::<Conn, _>(anyhow::anyhow!("connection refused")) },
            |item: WorkItem<u64>, _conn: Held<Conn>| async move { Ok(item) },
        )
        .build()
        .unwrap();
    let outcome = within(Duration::from_secs(30), pipeline.run_outcome()).await;
    let error = outcome.error.expect("the budget is exceeded");
    assert!(
        matches!(error, PipelineError::RestartBudgetExceeded { .. }),
        "{error}"
    );
    let failed: Vec<_> = outcome
        .results
        .iter()
        .filter_map(|r| r.error.as_ref())
        .filter(|e| e.kind == ItemErrorKind::Panicked)
        .collect();
    assert!(!failed.is_empty());
    for e in failed {
        assert_eq!(e.stage, "db");
        assert!(e.message.contains("stage `db`"), "{}", e.message);
        assert!(e.message.contains("connection refused"), "{}", e.message);
    }
    let stats = pipeline.stats().await.unwrap();
    assert_eq!(
        outcome.results.len() as u64,
        stats.admitted_items,
        "every admitted item has its outcome"
    );
}
