//! A Process stage whose handler sometimes aborts its process, as a crash
//! in a C library would: the pipeline completes, and reports those items
//! as failed with the signal that killed their worker; every other item
//! completes.
//!
//! ```text
//! cargo run --release --example process_stage          # 1,000 items
//! cargo run --release --example process_stage -- 5000
//! ```
//!
//! `main` calls `bergtalzug::process::init()` first: the stage's worker
//! processes are this program started again, and they serve the stage from
//! there instead of running `main`.

use std::time::{Duration, Instant};

use anyhow::Context;
use bergtalzug::prelude::*;
use bergtalzug::process::ProcessOptions;

/// PROCESS: "parses" a record with a fragile native library that aborts
/// the whole process on one record in 100, and hangs on one in 400.
fn fragile_parse(item: WorkItem<u64>) -> anyhow::Result<WorkItem<String>> {
    let n = item.data;
    if n % 100 == 37 {
        eprintln!("libfragile: assertion failed on record {n}");
        std::process::abort();
    }
    if n % 400 == 123 {
        std::thread::sleep(Duration::from_secs(3600)); // killed by the stage timeout
    }
    if n % 250 == 1 {
        anyhow::bail!("record {n} is malformed"); // an ordinary error
    }
    Ok(item.map(|n| format!("record {n}: {}", n * n)))
}

fn main() -> anyhow::Result<()> {
    // First: in a worker process this serves the stage and never returns.
    bergtalzug::process::init();
    tokio::runtime::Runtime::new()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,bergtalzug::process=info".into()),
        )
        .init();
    let total: u64 = match std::env::args().nth(1) {
        Some(n) => n.parse().context("usage: process_stage [ITEMS]")?,
        None => 1_000,
    };
    let config = PipelineConfig::new(
        "isolated",
        vec![
            StageConfig::new("parse", ExecutionType::Process)
                .workers(2)
                .queue_size(100)
                .timeout(Duration::from_secs(1)),
        ],
    )
    .stats_interval(Duration::ZERO);
    let pipeline = Pipeline::builder(config)?
        .source(sources::iter(0..total))
        .process_stage_with(
            "parse",
            fragile_parse,
            ProcessOptions::new().recycle_after(10_000),
        )
        .build()?;

    // First Ctrl-C: finish what is in the pipeline; second: abort.
    pipeline.stop_on_ctrl_c();
    let started = Instant::now();
    let results = pipeline.run().await?;
    let elapsed = started.elapsed();

    let mut by_kind = std::collections::BTreeMap::<String, usize>::new();
    for r in &results {
        let kind = r
            .error
            .as_ref()
            .map_or("completed".into(), |e| e.kind.to_string());
        *by_kind.entry(kind).or_default() += 1;
    }
    println!(
        "{} items in {:.2} s; outcomes: {by_kind:?}",
        results.len(),
        elapsed.as_secs_f64()
    );
    for r in results.iter().filter(|r| !r.success).take(5) {
        println!("  {}: {}", r.job_id, r.error.as_ref().expect("failed"));
    }
    let aborted = (0..total).filter(|n| n % 100 == 37).count();
    let died = by_kind.get("process died").copied().unwrap_or(0);
    anyhow::ensure!(results.len() as u64 == total, "every item has an outcome");
    anyhow::ensure!(died == aborted, "{died} items died, {aborted} aborted");
    println!("the pipeline survived {died} aborted worker processes");
    Ok(())
}
