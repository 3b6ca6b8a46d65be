//! What a running pipeline tells: events in causal order per item, a
//! periodic stats line every `stats_interval` (none when zero), and stats
//! that serialise to JSON with the seed's fields.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bergtalzug::prelude::*;
use futures::StreamExt;

mod common;
use common::*;

fn two_stage(name: &str, items: u64) -> Pipeline<u64> {
    Pipeline::builder(config(
        name,
        vec![
            StageConfig::new("a", ExecutionType::Async)
                .workers(2)
                .queue_size(4),
            StageConfig::new("b", ExecutionType::Cpu)
                .workers(2)
                .queue_size(4),
        ],
    ))
    .unwrap()
    .source(sources::iter(0..items))
    .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
    .sync_stage("b", |i: WorkItem<u64>| {
        if i.data == 3 {
            anyhow::bail!("three is rejected");
        }
        Ok(i)
    })
    .build()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_see_each_items_life_in_order() {
    let pipeline = two_stage("events", 20);
    let events = pipeline.subscribe();
    let run = tokio::spawn({
        let pipeline = pipeline.clone();
        async move { pipeline.run().await }
    });
    let all: Vec<PipelineEvent> = within(Duration::from_secs(10), events.collect()).await;
    let results = run.await.unwrap().unwrap();
    assert_eq!(results.len(), 20);
    assert!(
        matches!(all.last(), Some(PipelineEvent::PipelineFinished(stats)) if stats.completed_items == 20)
    );

    let mut lives: HashMap<JobId, Vec<String>> = HashMap::new();
    for event in &all {
        let (id, step) = match event {
            PipelineEvent::ItemQueued { job_id, stage } => {
                (job_id.clone(), format!("queued {stage}"))
            }
            PipelineEvent::ItemStarted { job_id, stage, .. } => {
                (job_id.clone(), format!("started {stage}"))
            }
            PipelineEvent::ItemCompleted {
                job_id,
                stage,
                success,
                ..
            } => (job_id.clone(), format!("completed {stage} {success}")),
            PipelineEvent::ItemFinished(r) => (r.job_id.clone(), format!("finished {}", r.success)),
            _ => continue,
        };
        lives.entry(id).or_default().push(step);
    }
    assert_eq!(lives.len(), 20);
    let ok = [
        "queued a",
        "started a",
        "completed a true",
        "queued b",
        "started b",
        "completed b true",
        "finished true",
    ];
    let rejected = [
        "queued a",
        "started a",
        "completed a true",
        "queued b",
        "started b",
        "completed b false",
        "finished false",
    ];
    for (id, life) in &lives {
        let failed = results.iter().any(|r| &r.job_id == id && !r.success);
        let expected: &[&str] = if failed { &rejected } else { &ok };
        assert_eq!(life, expected, "{id}");
    }
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn stats_lines(&self) -> usize {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines().filter(|l| l.contains(" items/s")).count()
    }
}

async fn slow_run(interval: Duration) -> usize {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let config = PipelineConfig::new(
        "logged",
        vec![StageConfig::new("slow", ExecutionType::Async).workers(1)],
    )
    .stats_interval(interval);
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(0..5u64))
        .async_stage("slow", |i: WorkItem<u64>| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok(i)
        })
        .build()
        .unwrap();
    within(Duration::from_secs(60), pipeline.run())
        .await
        .unwrap();
    captured.stats_lines()
}

#[tokio::test(start_paused = true)]
async fn the_stats_line_is_logged_every_interval_unless_zero() {
    // 5 s of work, a line every 2 s: at 2 s and 4 s.
    let lines = slow_run(Duration::from_secs(2)).await;
    assert!((2..=3).contains(&lines), "{lines} stats lines");
    assert_eq!(slow_run(Duration::ZERO).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_serialise_with_the_seeds_fields() {
    let pipeline = two_stage("json", 50);
    within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap();
    let stats = pipeline.stats().await.unwrap();
    assert_eq!(stats.completed_items, 50);
    assert_eq!(stats.failed_items, 1);
    assert!((stats.success_rate - 0.98).abs() < 1e-9);
    let json = serde_json::to_value(&stats).unwrap();
    for key in [
        "pipeline_name",
        "active_items",
        "active_by_stage",
        "completed_items",
        "failed_items",
        "success_rate",
        "average_duration",
        "stages",
    ] {
        assert!(json.get(key).is_some(), "missing {key}: {json}");
    }
    assert_eq!(json["stages"][1]["name"], "b");
    assert_eq!(json["stages"][1]["execution_type"], "cpu");
    assert_eq!(json["stages"][1]["failed"], 1);
    assert!(json["stages"][0]["p99_duration"].is_f64());
    assert_eq!(json["active_by_stage"]["a"], 0);
}
