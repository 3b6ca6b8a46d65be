//! Each item runs in a tracing span per stage with the fixed fields
//! `pipeline`, `stage`, `worker` and `job_id`, so whatever a handler logs
//! says where it came from.
//!
//! Alone in its test binary: tracing caches per call site whether anyone is
//! interested, and subscribers set by tests running at the same time on
//! other threads race with that cache.

use std::time::Duration;

use bergtalzug::prelude::*;

mod common;
use common::*;

#[tokio::test(start_paused = true)]
async fn each_item_runs_in_a_span_per_stage_with_the_fixed_fields() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("warn,spans=info,bergtalzug::item=debug")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let log = |stage: &'static str| {
        move |i: WorkItem<u64>| async move {
            tracing::info!("handled in {stage}");
            Ok(i)
        }
    };
    let pipeline = Pipeline::builder(config(
        "spans",
        vec![
            StageConfig::new("a", ExecutionType::Async).workers(1),
            StageConfig::new("b", ExecutionType::Async).workers(1),
        ],
    ))
    .unwrap()
    .source(sources::items(
        (0..3u64).map(|n| WorkItem::with_job_id(format!("job-{n}"), n)),
    ))
    .async_stage("a", log("a"))
    .async_stage("b", log("b"))
    .build()
    .unwrap();
    within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap();

    let text = captured.text();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("handled in")).collect();
    assert_eq!(lines.len(), 6, "{text}");
    for n in 0..3 {
        for stage in ["a", "b"] {
            let span = format!("item{{pipeline=spans stage={stage} worker=w0 job_id=job-{n}}}");
            let expected = format!("handled in {stage}");
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains(&span) && l.ends_with(&expected)),
                "no line in {span}: {text}"
            );
        }
    }
}
