//! A Process stage in a test binary that keeps the libtest harness: the
//! worker command is this binary running only the `bergtalzug_worker` test,
//! which calls `bergtalzug::process::init()` (see `bergtalzug::process`).

use std::time::Duration;

use bergtalzug::prelude::*;
use bergtalzug::process::ProcessOptions;

/// The workers' entry. In the test run itself it returns at once and passes.
#[test]
fn bergtalzug_worker() {
    bergtalzug::process::init();
}

fn square(item: WorkItem<u64>) -> anyhow::Result<WorkItem<u64>> {
    if item.data == 5 {
        std::process::abort();
    }
    Ok(item.map(|n| n * n))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_stage_runs_under_the_libtest_harness() {
    let config = PipelineConfig::new(
        "libtest",
        vec![StageConfig::new("square", ExecutionType::Process).workers(2)],
    )
    .stats_interval(Duration::ZERO);
    let options = ProcessOptions::new().args([
        "bergtalzug_worker",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ]);
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(0..20u64))
        .process_stage_with("square", square, options)
        .build()
        .unwrap();
    let results = tokio::time::timeout(Duration::from_secs(60), pipeline.run())
        .await
        .expect("the pipeline hung")
        .unwrap();
    assert_eq!(results.len(), 20);
    let failed: Vec<_> = results.iter().filter(|r| !r.success).collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    let error = failed[0].error.as_ref().unwrap();
    assert_eq!(error.kind, ItemErrorKind::ProcessDied, "{error}");
    assert!(error.message.contains("SIGABRT"), "{error}");
}
