//! A job that survives being killed: its items live in a queue file, so
//! running the program again finishes the rest.
//!
//! ```sh
//! cargo run --example resume --features sqlite            # kill it (Ctrl-C, kill -9) midway
//! cargo run --example resume --features sqlite            # it resumes and finishes
//! cargo run --example resume --features sqlite -- --reset # start the job over
//! ```
//!
//! `--db PATH` picks the queue file (default `resume-job.db` in the system
//! temp directory), `--items N` the job's size (default 5000). While it
//! runs, `sqlite3 PATH "SELECT state, COUNT(*) FROM items GROUP BY state"`
//! shows its progress from outside.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bergtalzug::prelude::*;
use bergtalzug::queue::{QueueOptions, WorkQueue};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let db = arg("--db").map_or_else(|| std::env::temp_dir().join("resume-job.db"), PathBuf::from);
    let items: u64 = arg("--items").map_or(Ok(5_000), |n| n.parse())?;
    if std::env::args().any(|a| a == "--reset") {
        for suffix in [
            "",
            "-wal",
            "-shm",
            ".results",
            ".results-wal",
            ".results-shm",
        ] {
            let mut path = db.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
        let mut runs = db.clone().into_os_string();
        runs.push(".runs");
        let _ = std::fs::remove_dir_all(runs);
        println!("reset {}", db.display());
    }

    let queue = WorkQueue::open(&format!("sqlite:{}", db.display()), QueueOptions::default())?;
    // Enqueuing the same job ids again adds nothing: safe on every start.
    let added = queue
        .enqueue((0..items).map(|n| (format!("page-{n:05}"), n)))
        .await?;
    let before = queue.counts().await?;
    if added == items {
        println!("new job: {items} items in {}", db.display());
    } else {
        println!(
            "resuming the job in {}: {} done and {} dead already, {} pending, {} \
             in flight when the last run died (they run again)",
            db.display(),
            before.done,
            before.dead,
            before.pending,
            before.leased
        );
    }

    let config = PipelineConfig::new(
        "resume",
        vec![
            StageConfig::new("fetch", ExecutionType::Async)
                .workers(16)
                .queue_size(32),
            StageConfig::new("store", ExecutionType::Thread)
                .workers(1)
                .queue_size(8),
        ],
    )
    .stats_interval(Duration::ZERO)
    // The queue is the record of what finished: keep no results in memory.
    .retain_results(false);
    // The results, beside the queue: `FILE.results`.
    let mut results_path = db.clone().into_os_string();
    results_path.push(".results");
    let sink = rusqlite::Connection::open(&results_path)?;
    sink.pragma_update(None, "journal_mode", "WAL")?;
    sink.execute_batch(
        "CREATE TABLE IF NOT EXISTS results (job_id TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    )?;
    let sink = std::sync::Arc::new(std::sync::Mutex::new(sink));
    let results = sink.clone();
    let pipeline = Pipeline::builder(config)?
        .source(queue.source::<u64>()?)
        .async_stage("fetch", |item: WorkItem<u64>| async move {
            // An I/O-bound step: 1-10 ms, like an HTTP GET.
            tokio::time::sleep(Duration::from_millis(1 + item.data % 10)).await;
            if item.data % 997 == 13 {
                anyhow::bail!("page {} answered 404", item.data);
            }
            Ok(item.map(|n| n * 2))
        })
        // Idempotent: a sink keyed by job id (an upsert) holds each result
        // once, however often a crash makes an item run again.
        .sync_stage("store", move |item: WorkItem<u64>| {
            sink.lock().unwrap().execute(
                "INSERT INTO results (job_id, value) VALUES (?1, ?2)
                 ON CONFLICT (job_id) DO UPDATE SET value = excluded.value",
                rusqlite::params![item.job_id().to_string(), item.data as i64],
            )?;
            Ok(item)
        })
        .build()?;
    pipeline.stop_on_ctrl_c();

    let started = Instant::now();
    let watcher = {
        let queue = queue.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Ok(c) = queue.counts().await {
                    println!(
                        "  {} done, {} dead, {} leased, {} pending",
                        c.done, c.dead, c.leased, c.pending
                    );
                }
            }
        })
    };
    let outcome = pipeline.run().await;
    watcher.abort();
    let after = queue.counts().await?;
    println!(
        "this run: {} done, {} dead in {:.1?}; the job: {} of {} done, {} dead, {} pending",
        after.done - before.done,
        after.dead - before.dead,
        started.elapsed(),
        after.done,
        after.total(),
        after.dead,
        after.pending
    );
    let stored: i64 =
        results
            .lock()
            .unwrap()
            .query_row("SELECT COUNT(*) FROM results", [], |row| row.get(0))?;
    println!("results stored, each once: {stored}");
    for letter in queue.dead_letters().await?.iter().take(5) {
        println!(
            "  dead: {} in stage `{}` ({}): {}",
            letter.job_id, letter.stage, letter.kind, letter.error
        );
    }
    outcome?;
    Ok(())
}
