//! The pipeline: download → validate → store, and the report of a run.
//!
//! | stage      | model | workers        | retry                     | fails permanently on |
//! |------------|-------|----------------|---------------------------|----------------------|
//! | `download` | Async | many (32)      | 3 attempts, from 50 ms    | HTTP 4xx             |
//! | `validate` | Cpu   | one per core   | none                      | any failed check     |
//! | `store`    | Async | many (32)      | 3 attempts, from 50 ms    | —                    |
//!
//! Connection errors and HTTP 5xx are retried; a 4xx answer and an invalid
//! file are wrapped in [`Permanent`], so they are never retried and go
//! straight to the dead-letter sink ([`crate::report::dead_letter_sink`]).
//!
//! Each `validate` worker holds a DuckDB connection of its own
//! (`sync_stage_with`, [`validate::open`]), opened the first time the
//! worker needs one and dropped when the stage ends.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use bergtalzug::prelude::*;
use bytes::Bytes;
use object_store::{ObjectStoreExt, PutPayload};
use serde::Serialize;

use crate::destination::Destination;
use crate::report::{DeadFile, DeadFiles, dead_letter_sink};
use crate::validate::{self, Invalid};

/// The stages, in order.
pub const STAGES: [&str; 3] = ["download", "validate", "store"];

/// How to run the job.
#[derive(Debug, Clone)]
pub struct Options {
    /// `(file name, URL)` pairs; the name is the item's job id and must be
    /// unique.
    pub files: Vec<(String, String)>,
    /// Where the Parquet files go.
    pub destination: Destination,
    /// Download workers.
    pub download_workers: usize,
    /// Validate workers (one per core is the point).
    pub validate_workers: usize,
    /// Store workers.
    pub store_workers: usize,
}

/// A downloaded CSV file.
#[derive(Debug, Clone)]
pub struct Downloaded {
    /// Its bytes.
    pub body: Bytes,
}

/// A validated file, as Parquet.
#[derive(Debug, Clone)]
pub struct ParquetFile {
    /// Data rows.
    pub rows: u64,
    /// The Parquet bytes.
    pub parquet: Bytes,
}

/// A file that passed a stage, with its sizes.
#[derive(Debug, Clone, Serialize)]
pub struct Passed {
    /// The file's name.
    pub file: String,
    /// Bytes the stage produced (CSV downloaded, Parquet written or stored).
    pub bytes: u64,
    /// Data rows (validate and store).
    pub rows: Option<u64>,
    /// Where it was stored (store).
    pub key: Option<String>,
}

/// The files each stage passed, in the order they passed.
#[derive(Debug, Default)]
struct Ledger {
    downloaded: Mutex<Vec<Passed>>,
    validated: Mutex<Vec<Passed>>,
    stored: Mutex<Vec<Passed>>,
    /// Bytes taken in by each stage, for its MB/s.
    bytes_in: [AtomicU64; 3],
}

impl Ledger {
    fn pass(&self, stage: usize, list: &Mutex<Vec<Passed>>, bytes_in: u64, passed: Passed) {
        self.bytes_in[stage].fetch_add(bytes_in, Ordering::Relaxed);
        list.lock().expect("not poisoned").push(passed);
    }
}

/// One stage's figures from a run.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    /// The stage's name.
    pub name: String,
    /// Its execution model.
    pub model: String,
    /// Its workers.
    pub workers: usize,
    /// Items it finished.
    pub processed: u64,
    /// Items that failed in it.
    pub failed: u64,
    /// Retries it made.
    pub retried: u64,
    /// Mean, median and 99th-percentile handler time, in ms.
    pub avg_ms: Option<f64>,
    /// Median handler time, in ms.
    pub p50_ms: Option<f64>,
    /// 99th-percentile handler time, in ms.
    pub p99_ms: Option<f64>,
    /// From the first item it started to the last it finished, in seconds.
    pub busy_secs: f64,
    /// Items (finished or failed) per second of `busy_secs`.
    pub items_per_sec: f64,
    /// Megabytes taken in per second of `busy_secs` (CSV for download and
    /// validate, Parquet for store).
    pub mb_per_sec: f64,
    /// What the stage could take if never starved: workers / mean handler
    /// time, in items per second (an upper bound: async workers share the
    /// runtime's threads).
    pub capacity_per_sec: Option<f64>,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Where the Parquet files went.
    pub destination: String,
    /// Files listed for download.
    pub listed: usize,
    /// Wall-clock time of the pipeline, in seconds.
    pub elapsed_secs: f64,
    /// Files downloaded.
    pub downloaded: Vec<Passed>,
    /// Files that passed every check (written as Parquet).
    pub validated: Vec<Passed>,
    /// Files validation rejected, with the check and reason.
    pub rejected: Vec<DeadFile>,
    /// Files stored.
    pub stored: Vec<Passed>,
    /// Files that failed otherwise (download or store).
    pub failed: Vec<DeadFile>,
    /// Per-stage figures.
    pub stages: Vec<StageReport>,
}

/// The download stage: `GET` the URL. 4xx is permanent; 5xx and connection
/// errors are retried by the stage's policy.
async fn download(
    client: reqwest::Client,
    ledger: Arc<Ledger>,
    item: WorkItem<String>,
) -> anyhow::Result<WorkItem<Downloaded>> {
    let file = item.job_id().to_string();
    let url = &item.data;
    let response = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("{file}: GET {url} failed"))?;
    let status = response.status();
    if status.is_client_error() {
        return Err(Permanent(anyhow!("{file}: GET {url} answered HTTP {status}")).into());
    }
    anyhow::ensure!(
        status.is_success(),
        "{file}: GET {url} answered HTTP {status}"
    );
    let body = response
        .bytes()
        .await
        .with_context(|| format!("{file}: reading the body of {url} failed"))?;
    let passed = Passed {
        file,
        bytes: body.len() as u64,
        rows: None,
        key: None,
    };
    ledger.pass(0, &ledger.downloaded, body.len() as u64, passed);
    Ok(item.map(|_| Downloaded { body }))
}

/// The validate stage: DuckDB (the worker's connection) checks the CSV and
/// writes Parquet. A failed check is permanent.
fn check(
    duckdb: &duckdb::Connection,
    work_dir: &Path,
    ledger: &Ledger,
    item: WorkItem<Downloaded>,
) -> anyhow::Result<WorkItem<ParquetFile>> {
    let file = item.job_id().to_string();
    let body = &item.data.body;
    let valid = match validate::validate(duckdb, &file, body, work_dir) {
        Ok(valid) => valid,
        Err(Invalid::Rejected(rejection)) => return Err(Permanent(rejection.into()).into()),
        Err(Invalid::Internal(e)) => {
            return Err(e.context(format!("{file}: validation could not run")));
        }
    };
    let passed = Passed {
        file,
        bytes: valid.parquet.len() as u64,
        rows: Some(valid.rows),
        key: None,
    };
    ledger.pass(1, &ledger.validated, body.len() as u64, passed);
    Ok(item.map(|_| ParquetFile {
        rows: valid.rows,
        parquet: valid.parquet,
    }))
}

/// The store stage: puts the Parquet bytes at the destination.
async fn store(
    destination: Destination,
    ledger: Arc<Ledger>,
    item: WorkItem<ParquetFile>,
) -> anyhow::Result<WorkItem<ParquetFile>> {
    let file = item.job_id().to_string();
    let key = destination.key(&file);
    let bytes = item.data.parquet.clone();
    destination
        .store
        .put(&key, PutPayload::from(bytes.clone()))
        .await
        .with_context(|| format!("{file}: cannot store {key} in {}", destination.display))?;
    let passed = Passed {
        file,
        bytes: bytes.len() as u64,
        rows: Some(item.data.rows),
        key: Some(key.to_string()),
    };
    ledger.pass(2, &ledger.stored, bytes.len() as u64, passed);
    Ok(item)
}

/// Runs the job over `options.files` and reports what became of each.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    let retry = RetryPolicy::exponential(3, Duration::from_millis(50));
    let config = PipelineConfig::new(
        "etl-duckdb",
        vec![
            StageConfig::new(STAGES[0], ExecutionType::Async)
                .workers(options.download_workers)
                .queue_size(2 * options.download_workers)
                .retry(retry)
                .timeout(Duration::from_secs(60)),
            // Items here hold a whole CSV file: a short queue bounds memory.
            StageConfig::new(STAGES[1], ExecutionType::Cpu)
                .workers(options.validate_workers)
                .queue_size(2 * options.validate_workers),
            StageConfig::new(STAGES[2], ExecutionType::Async)
                .workers(options.store_workers)
                .queue_size(2 * options.store_workers)
                .retry(retry)
                .timeout(Duration::from_secs(60)),
        ],
    )
    .stats_interval(Duration::ZERO);

    let listed = options.files.len();
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()?;
    let work_dir = tempfile::Builder::new().prefix("etl-duckdb-").tempdir()?;
    let work = work_dir.path().to_path_buf();
    let ledger = Arc::new(Ledger::default());
    let dead: DeadFiles = Arc::default();
    let items = options
        .files
        .into_iter()
        .map(|(name, url)| WorkItem::with_job_id(name, url));

    let (l1, l2, l3) = (ledger.clone(), ledger.clone(), ledger.clone());
    let destination = options.destination.clone();
    let pipeline = Pipeline::builder(config)?
        .source(sources::items(items))
        // Retrying stages keep a copy of each input for the next attempt.
        .retrying_async_stage(STAGES[0], move |item| {
            download(client.clone(), l1.clone(), item)
        })
        .sync_stage_with(STAGES[1], validate::open, move |duckdb, item| {
            check(duckdb, &work, &l2, item)
        })
        .retrying_async_stage(STAGES[2], move |item| {
            store(destination.clone(), l3.clone(), item)
        })
        .on_dead_letter(dead_letter_sink(dead.clone()))
        .build()?;

    let started = Instant::now();
    let results = pipeline.run().await?;
    let elapsed = started.elapsed();
    let stats = pipeline.stats().await?;
    drop(work_dir);

    let stages = stats
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            // The stage's busy window: first start to last finish.
            let times = results.iter().filter_map(|r| r.metadata.stage(&s.name));
            let (mut first, mut last) = (None::<Instant>, None::<Instant>);
            for t in times {
                if let Some(start) = t.started() {
                    first = Some(first.map_or(start, |f| f.min(start)));
                }
                if let Some(end) = t.completed() {
                    last = Some(last.map_or(end, |l| l.max(end)));
                }
            }
            let busy = match (first, last) {
                (Some(f), Some(l)) => l.saturating_duration_since(f).as_secs_f64(),
                _ => 0.0,
            };
            let per_sec = |n: f64| if busy > 0.0 { n / busy } else { 0.0 };
            let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
            StageReport {
                name: s.name.clone(),
                model: s.execution_type.to_string(),
                workers: s.workers,
                processed: s.processed,
                failed: s.failed,
                retried: s.retried,
                avg_ms: ms(s.average_duration),
                p50_ms: ms(s.p50_duration),
                p99_ms: ms(s.p99_duration),
                busy_secs: busy,
                items_per_sec: per_sec((s.processed + s.failed) as f64),
                mb_per_sec: per_sec(ledger.bytes_in[i].load(Ordering::Relaxed) as f64 / 1e6),
                capacity_per_sec: s
                    .average_duration
                    .filter(|d| !d.is_zero())
                    .map(|d| s.workers as f64 / d.as_secs_f64()),
            }
        })
        .collect();

    let take = |list: &Mutex<Vec<Passed>>| std::mem::take(&mut *list.lock().expect("not poisoned"));
    let dead = std::mem::take(&mut *dead.lock().expect("not poisoned"));
    let (rejected, failed) = dead.into_iter().partition(DeadFile::is_rejection);
    Ok(Report {
        destination: options.destination.display.clone(),
        listed,
        elapsed_secs: elapsed.as_secs_f64(),
        downloaded: take(&ledger.downloaded),
        validated: take(&ledger.validated),
        rejected,
        stored: take(&ledger.stored),
        failed,
        stages,
    })
}

impl Report {
    /// The report as the program prints it.
    pub fn print(&self) {
        let mb = |list: &[Passed]| list.iter().map(|p| p.bytes).sum::<u64>() as f64 / 1e6;
        let rows: u64 = self.validated.iter().filter_map(|p| p.rows).sum();
        println!(
            "{} files listed, pipeline ran {:.2} s",
            self.listed, self.elapsed_secs
        );
        println!(
            "  downloaded {:>5} files  {:>9.2} MB of CSV",
            self.downloaded.len(),
            mb(&self.downloaded)
        );
        println!(
            "  validated  {:>5} files  {:>9.2} MB of Parquet, {rows} rows",
            self.validated.len(),
            mb(&self.validated)
        );
        println!("  rejected   {:>5} files", self.rejected.len());
        println!(
            "  stored     {:>5} files  {:>9.2} MB to {}",
            self.stored.len(),
            mb(&self.stored),
            self.destination
        );
        println!(
            "  failed     {:>5} files (download or store)",
            self.failed.len()
        );
        if !self.rejected.is_empty() {
            println!();
            println!("Rejected by validation:");
            for d in &self.rejected {
                println!("  {}", d.reason);
            }
        }
        if !self.failed.is_empty() {
            println!();
            println!("Failed:");
            for d in &self.failed {
                println!(
                    "  {} in {} ({}, {} attempt(s)): {}",
                    d.file, d.stage, d.kind, d.attempts, d.reason
                );
            }
        }
        println!();
        let ms = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.2}"));
        let table = std::iter::once(
            [
                "stage",
                "model",
                "workers",
                "done",
                "failed",
                "retried",
                "avg ms",
                "p50 ms",
                "p99 ms",
                "busy s",
                "items/s",
                "MB/s",
                "capacity/s",
            ]
            .map(String::from),
        )
        .chain(self.stages.iter().map(|s| {
            [
                s.name.clone(),
                s.model.clone(),
                s.workers.to_string(),
                s.processed.to_string(),
                s.failed.to_string(),
                s.retried.to_string(),
                ms(s.avg_ms),
                ms(s.p50_ms),
                ms(s.p99_ms),
                format!("{:.2}", s.busy_secs),
                format!("{:.1}", s.items_per_sec),
                format!("{:.1}", s.mb_per_sec),
                s.capacity_per_sec
                    .map_or_else(|| "-".into(), |c| format!("{c:.0}")),
            ]
        }));
        for row in table {
            let mut line = format!("{:<9}{:<6}", row[0], row[1]);
            for cell in &row[2..] {
                line.push_str(&format!("{cell:>11}"));
            }
            println!("{}", line.trim_end());
        }
    }
}
