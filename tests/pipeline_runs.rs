//! A pipeline runs end to end in every execution model, keeps each item's
//! identity, timings and custom metadata, and reports per-stage stats.

use std::time::Duration;

use bergtalzug::prelude::*;

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_item_completes_through_every_model() {
    let config = PipelineConfig::new(
        "models",
        vec![
            StageConfig::new("fetch", ExecutionType::Async)
                .workers(4)
                .queue_size(16),
            StageConfig::new("parse", ExecutionType::Thread)
                .workers(2)
                .queue_size(8),
            StageConfig::new("compute", ExecutionType::Cpu)
                .workers(2)
                .queue_size(8),
            StageConfig::new("store", ExecutionType::Async)
                .workers(4)
                .queue_size(16),
        ],
    )
    .stats_interval(Duration::ZERO);
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(0..2_000u64))
        .async_stage("fetch", |item: WorkItem<u64>| async move {
            Ok(item.map(|n| n.to_string()))
        })
        .sync_stage("parse", |item: WorkItem<String>| {
            Ok(item.map(|s| s.parse::<u64>().unwrap()))
        })
        .sync_stage("compute", |item: WorkItem<u64>| Ok(item.map(|n| n * 2)))
        .async_stage("store", |item: WorkItem<u64>| async move { Ok(item) })
        .build()
        .unwrap();
    let results = within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 2_000);
    assert!(results.iter().all(|r| r.success));
    assert_unique_ids(&results);
    let r = &results[0];
    for stage in ["fetch", "parse", "compute", "store"] {
        assert!(
            r.metadata.stage_duration(stage).is_some(),
            "no time for {stage}"
        );
    }
    assert!(r.total_duration().is_some());

    let stats = pipeline.stats().await.unwrap();
    assert_eq!(stats.completed_items, 2_000);
    assert_eq!(stats.failed_items, 0);
    assert_eq!(stats.active_items, 0);
    assert_eq!(stats.success_rate, 1.0);
    for s in &stats.stages {
        assert_eq!(s.processed, 2_000, "stage {}", s.name);
        assert!(s.p50_duration.is_some());
    }
}
