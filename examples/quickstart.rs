//! The Python Bergtalzug's Quick Start, in Rust: fetch (Async) → parse
//! (Thread) → compute (Cpu) → store (Async), on data the example generates
//! itself, ending with a per-stage summary.
//!
//! ```text
//! cargo run --release --example quickstart            # 2,000 items
//! cargo run --release --example quickstart -- 20000   # as many as you like
//! cargo run --release --example quickstart | cat      # plain progress lines
//! cargo run --release --example quickstart -- --keep  # keep the stored results
//! cargo run --release --example quickstart --features dashboard -- 50000 --dashboard 127.0.0.1:9000
//! ```
//!
//! In a terminal it shows a live progress bar (the `progress` feature, on by
//! default) with a line of per-stage detail: queue, busy workers,
//! utilisation, and the bottleneck. Piped or redirected, it prints a plain
//! progress line every 2 seconds instead.
//!
//! - `fetch` stands in for an HTTP API: each record is served as JSON after a
//!   few milliseconds of (simulated) network latency. Many workers.
//! - `parse` decodes the JSON with serde, a blocking step. One record in 97
//!   is served corrupt, and fails here.
//! - `compute` does real CPU work (a numerical integration per record) on
//!   the stage's own threads, one worker per core.
//! - `store` writes each result to a file in a temporary directory, removed
//!   when the example ends unless it is given `--keep`.
//!
//! With `--dashboard ADDR` (built with the `dashboard` feature) it also
//! serves the live dashboard on `ADDR` (open `http://ADDR/`), and keeps
//! serving the final state after the run until Enter is pressed.

use std::time::{Duration, Instant};

use anyhow::Context;
use bergtalzug::prelude::*;
use bergtalzug::progress::Progress;
use serde::{Deserialize, Serialize};

/// What the source hands out: where to fetch a record.
#[derive(Debug)]
struct Job {
    id: u64,
    url: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    id: u64,
    samples: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct Summary {
    id: u64,
    mean: f64,
    integral: f64,
}

/// The seed's `refill_queue`: hands out up to `count` jobs, then none.
struct Jobs {
    next: u64,
    total: u64,
}

impl Source for Jobs {
    type Item = Job;

    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<Job>>> {
        let end = self.total.min(self.next + count as u64);
        let jobs = (self.next..end)
            .map(|id| {
                let url = format!("https://api.example.com/item/{id}");
                WorkItem::with_job_id(format!("item-{id}"), Job { id, url })
            })
            .collect();
        self.next = end;
        Ok(jobs) // empty once every job was handed out: the pipeline finishes
    }

    /// How many jobs are left: the progress bar's total.
    fn size_hint(&self) -> Option<u64> {
        Some(self.total - self.next)
    }
}

/// A deterministic pseudo-random number from `seed` (splitmix64).
fn mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// ASYNC: "downloads" the record behind the job's URL.
async fn fetch(item: WorkItem<Job>) -> anyhow::Result<WorkItem<Vec<u8>>> {
    let id = item.data.id;
    let latency = Duration::from_millis(2 + mix(id) % 8);
    tokio::time::sleep(latency).await;
    let samples = (0..256)
        .map(|i| (mix(id * 1000 + i) % 10_000) as f64 / 100.0)
        .collect();
    let mut body = serde_json::to_vec(&Record { id, samples })?;
    if id % 97 == 42 {
        body.truncate(body.len() / 2); // a corrupt response
    }
    tracing::debug!(url = %item.data.url, bytes = body.len(), "fetched");
    Ok(item.map(|_| body))
}

/// THREAD: decodes the JSON (blocking work).
fn parse(item: WorkItem<Vec<u8>>) -> anyhow::Result<WorkItem<Record>> {
    let record: Record = serde_json::from_slice(&item.data)
        .with_context(|| format!("{} bytes of JSON do not decode", item.data.len()))?;
    Ok(item.map(|_| record))
}

/// CPU: integrates a curve through the samples (real CPU work).
fn compute(item: WorkItem<Record>) -> anyhow::Result<WorkItem<Summary>> {
    let samples = &item.data.samples;
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    let steps = 20_000;
    let mut integral = 0.0;
    for step in 0..steps {
        let x = step as f64 / steps as f64 * (samples.len() - 1) as f64;
        let (i, frac) = (x.floor() as usize, x.fract());
        let y = samples[i] * (1.0 - frac) + samples[(i + 1).min(samples.len() - 1)] * frac;
        integral += y.sin().abs() / steps as f64;
    }
    let id = item.data.id;
    Ok(item.map(|_| Summary { id, mean, integral }))
}

/// ASYNC: stores the result as a JSON file.
async fn store(
    item: WorkItem<Summary>,
    dir: std::path::PathBuf,
) -> anyhow::Result<WorkItem<Summary>> {
    let path = dir.join(format!("{}.json", item.job_id()));
    tokio::fs::write(&path, serde_json::to_vec(&item.data)?)
        .await
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(item)
}

fn ms(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.2} ms", d.as_secs_f64() * 1e3))
        .unwrap_or_else(|| "-".into())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // A bar in a terminal, plain lines when piped; logs go through it so
    // that they do not tear the bar.
    let progress = Progress::new();
    let logs = progress.clone();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(progress.is_bar())
        .with_writer(move || logs.writer())
        .init();
    const USAGE: &str = "usage: quickstart [ITEMS] [--keep] [--dashboard ADDR]";
    let mut args = std::env::args().skip(1);
    let (mut keep, mut total, mut dashboard) = (false, 2_000u64, None::<String>);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--keep" => keep = true,
            "--dashboard" => dashboard = Some(args.next().context(USAGE)?),
            n => total = n.parse().context(USAGE)?,
        }
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let out = tempfile::tempdir()?;

    // 1. The configuration: the seed's Quick Start, with a Cpu stage where it
    //    had a process pool.
    let config = PipelineConfig::new(
        "my_pipeline",
        vec![
            StageConfig::new("fetch", ExecutionType::Async)
                .workers(10)
                .queue_size(100),
            StageConfig::new("parse", ExecutionType::Thread)
                .workers(5)
                .queue_size(50),
            StageConfig::new("compute", ExecutionType::Cpu)
                .workers(cores)
                .queue_size(20),
            StageConfig::new("store", ExecutionType::Async)
                .workers(10)
                .queue_size(100),
        ],
    )
    .queue_refresh_rate(Duration::from_secs(1))
    .stats_interval(Duration::from_secs(10))
    .stall_threshold(Duration::from_secs(5));

    // 2-4. The source, the handlers in config order, a completion callback.
    let dir = out.path().to_path_buf();
    let pipeline = Pipeline::builder(config)?
        .source(Jobs { next: 0, total })
        .async_stage("fetch", fetch)
        .sync_stage("parse", parse)
        .sync_stage("compute", compute)
        .async_stage("store", move |item| store(item, dir.clone()))
        .on_complete({
            let progress = progress.clone();
            move |result| {
                if let Some(error) = &result.error {
                    progress.println(format!(
                        "✗ {} failed in {}: {}",
                        result.job_id, error.stage, error.message
                    ));
                }
            }
        })
        .build()?;

    // The live dashboard, when asked for: loopback addresses keep it on
    // this machine.
    #[cfg(feature = "dashboard")]
    let board = match &dashboard {
        Some(addr) => {
            let board = bergtalzug::dashboard::Dashboard::serve(addr.as_str())
                .await
                .with_context(|| format!("cannot serve the dashboard on {addr}"))?;
            board.watch(&pipeline);
            progress.println(format!("dashboard at {}", board.url()));
            Some(board)
        }
        None => None,
    };
    #[cfg(not(feature = "dashboard"))]
    anyhow::ensure!(
        dashboard.is_none(),
        "--dashboard needs the dashboard feature: cargo run --example quickstart --features dashboard"
    );

    // First Ctrl-C: finish what is in the pipeline; second: abort.
    pipeline.stop_on_ctrl_c();
    let started = Instant::now();
    let shown = progress.watch(&pipeline);
    let results = pipeline.run().await?;
    let elapsed = started.elapsed();
    shown.await?;

    // The summary: totals, then one line per stage.
    let stats = pipeline.stats().await?;
    let ok = results.iter().filter(|r| r.success).count();
    println!();
    println!(
        "{} items in {:.2} s ({:.0} items/s): {} completed, {} failed, success rate {:.1}%",
        results.len(),
        elapsed.as_secs_f64(),
        results.len() as f64 / elapsed.as_secs_f64(),
        ok,
        results.len() - ok,
        stats.success_rate * 100.0
    );
    println!();
    println!(
        "{:<8} {:<7} {:>7} {:>9} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10} {:>5}",
        "stage",
        "model",
        "workers",
        "processed",
        "failed",
        "p50",
        "p90",
        "p99",
        "wait p50",
        "wait p99",
        "busy"
    );
    for s in &stats.stages {
        println!(
            "{:<8} {:<7} {:>7} {:>9} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10} {:>4.0}%",
            s.name,
            s.execution_type.to_string(),
            s.workers,
            s.processed,
            s.failed,
            ms(s.p50_duration),
            ms(s.p90_duration),
            ms(s.p99_duration),
            ms(s.p50_queue_wait),
            ms(s.p99_queue_wait),
            s.utilisation * 100.0,
        );
    }
    if let Some(bottleneck) = &stats.bottleneck {
        println!("bottleneck (busiest over the last 10 s): {bottleneck}");
    }
    if let Some(r) = results.iter().find(|r| r.success) {
        println!();
        println!("Job {}: total {}", r.job_id, ms(r.total_duration()));
        for stage in ["fetch", "parse", "compute", "store"] {
            println!("  {stage}: {}", ms(r.metadata.stage_duration(stage)));
        }
    }
    let stored = std::fs::read_dir(out.path())?.count();
    anyhow::ensure!(
        stored == ok,
        "stored {stored} files for {ok} completed items"
    );
    println!();
    if keep {
        let dir = out.keep();
        println!("{stored} results stored in {}", dir.display());
    } else {
        println!(
            "{stored} results stored in {}, removed now (run with --keep to keep them)",
            out.path().display()
        );
    }
    #[cfg(feature = "dashboard")]
    if let Some(board) = board {
        use std::io::IsTerminal;
        if std::io::stdin().is_terminal() {
            println!(
                "the dashboard shows the final state at {}: press Enter to exit",
                board.url()
            );
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
        }
    }
    Ok(())
}
