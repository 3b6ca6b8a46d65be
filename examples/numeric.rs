//! The Python Bergtalzug's Example 2, in Rust: download data, compute on it
//! with `ndarray` (NumPy's counterpart), save the results to files, and
//! print a per-stage summary.
//!
//! ```text
//! cargo run --release --example numeric              # 400 matrices, compute in a Cpu stage
//! cargo run --release --example numeric -- 2000      # as many as you like
//! cargo run --release --example numeric -- 400 --process   # compute in worker processes
//! cargo run --release --example numeric -- 400 --keep      # keep the saved results
//! ```
//!
//! - `download` (Async, many workers): fetches each matrix over HTTP from a
//!   small server the example starts on the loopback interface (so it needs
//!   no network): a `GET /matrix/<id>` answered with little-endian `f64`s.
//!   One request in 50 is answered `404` and fails here.
//! - `compute` (Cpu, one worker per core; `--process`: a Process stage,
//!   crash-isolated worker processes): builds an `ndarray::Array2`,
//!   standardizes its columns, forms the Gram matrix `AᵀA` and finds its
//!   largest eigenvalue by power iteration.
//! - `save` (Async): writes each result as JSON to a temporary directory.
//!
//! In Python the middle stage forced a choice between threads, interpreters
//! and processes because of the GIL; here a `Cpu` stage runs on threads of
//! its own, and `Process` is there for code that must be isolated.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bergtalzug::prelude::*;
use ndarray::{Array1, Array2, Axis};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Rows and columns of every matrix.
const ROWS: usize = 256;
const COLS: usize = 48;

/// What the source hands out: which matrix to fetch, and from where.
#[derive(Debug, Clone)]
struct Job {
    id: u64,
    url: String,
}

/// A downloaded matrix, row-major. Plain serde data, so that it can cross to
/// a worker process too.
#[derive(Debug, Serialize, Deserialize)]
struct Matrix {
    id: u64,
    rows: usize,
    cols: usize,
    values: Vec<f64>,
}

/// What `compute` finds.
#[derive(Debug, Serialize, Deserialize)]
struct Analysis {
    id: u64,
    column_means: Vec<f64>,
    frobenius_norm: f64,
    largest_eigenvalue: f64,
    iterations: usize,
}

/// A deterministic pseudo-random number from `seed` (splitmix64).
fn mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The loopback "data API": `GET /matrix/<id>` gives ROWS x COLS f64s.
async fn serve(listener: TcpListener) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let line = String::from_utf8_lossy(&request);
            let id = line
                .split_whitespace()
                .nth(1)
                .and_then(|path| path.strip_prefix("/matrix/"))
                .and_then(|id| id.parse::<u64>().ok());
            let response = match id {
                Some(id) if id % 50 != 17 => {
                    let mut body = Vec::with_capacity(ROWS * COLS * 8);
                    for i in 0..(ROWS * COLS) as u64 {
                        let x = (mix(id * 1_000_003 + i) % 20_000) as f64 / 1000.0 - 10.0;
                        // Some columns correlate, so that the spectrum has structure.
                        let x = x + (i % COLS as u64) as f64 * 0.1;
                        body.extend_from_slice(&x.to_le_bytes());
                    }
                    let mut r = format!(
                        "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\
                         Content-Length: {}\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(&body);
                    r
                }
                _ => b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
            };
            let _ = socket.write_all(&response).await;
        });
    }
}

/// ASYNC: downloads the matrix behind the job's URL.
async fn download(item: WorkItem<Job>) -> anyhow::Result<WorkItem<Matrix>> {
    let url = item
        .data
        .url
        .strip_prefix("http://")
        .context("not an http URL")?;
    let (host, path) = url.split_once('/').context("no path in the URL")?;
    let mut socket = TcpStream::connect(host).await?;
    socket
        .write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    socket.read_to_end(&mut response).await?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let status = String::from_utf8_lossy(&response[..split]);
    let status = status.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!("GET {} answered {status}", item.data.url);
    }
    let body = &response[split + 4..];
    anyhow::ensure!(
        body.len() == ROWS * COLS * 8,
        "expected {} bytes, got {}",
        ROWS * COLS * 8,
        body.len()
    );
    let values = body
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect();
    let id = item.data.id;
    Ok(item.map(|_| Matrix {
        id,
        rows: ROWS,
        cols: COLS,
        values,
    }))
}

/// CPU (or PROCESS): standardizes the columns, forms AᵀA and finds its
/// largest eigenvalue by power iteration.
fn compute(item: WorkItem<Matrix>) -> anyhow::Result<WorkItem<Analysis>> {
    let m = &item.data;
    let a = Array2::from_shape_vec((m.rows, m.cols), m.values.clone())?;
    let means = a.mean_axis(Axis(0)).context("an empty matrix")?;
    let std = a
        .std_axis(Axis(0), 1.0)
        .mapv(|s| if s > 0.0 { s } else { 1.0 });
    let z = (&a - &means) / &std;
    let gram = z.t().dot(&z) / (m.rows as f64 - 1.0);
    let mut v = Array1::from_elem(m.cols, 1.0 / (m.cols as f64).sqrt());
    let (mut lambda, mut iterations) = (0.0, 0);
    for i in 1..=500 {
        let w = gram.dot(&v);
        let norm = w.dot(&w).sqrt();
        anyhow::ensure!(norm.is_finite() && norm > 0.0, "power iteration diverged");
        let next = w / norm;
        let converged = (norm - lambda).abs() < 1e-10 * norm;
        (v, lambda, iterations) = (next, norm, i);
        if converged {
            break;
        }
    }
    let frobenius_norm = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let id = m.id;
    Ok(item.map(|_| Analysis {
        id,
        column_means: means.to_vec(),
        frobenius_norm,
        largest_eigenvalue: lambda,
        iterations,
    }))
}

/// ASYNC: saves the analysis as a JSON file.
async fn save(
    item: WorkItem<Analysis>,
    dir: std::path::PathBuf,
) -> anyhow::Result<WorkItem<Analysis>> {
    let path = dir.join(format!("{}.json", item.job_id()));
    tokio::fs::write(&path, serde_json::to_vec_pretty(&item.data)?)
        .await
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(item)
}

fn ms(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.2} ms", d.as_secs_f64() * 1e3))
        .unwrap_or_else(|| "-".into())
}

fn main() -> anyhow::Result<()> {
    // First: with --process, the compute stage's worker processes are this
    // program started again, and they start serving here.
    bergtalzug::process::init();
    tokio::runtime::Runtime::new()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let isolate = args.iter().any(|a| a == "--process");
    let keep = args.iter().any(|a| a == "--keep");
    let total: u64 = match args.iter().find(|a| !a.starts_with("--")) {
        Some(n) => n
            .parse()
            .context("usage: numeric [ITEMS] [--process] [--keep]")?,
        None => 400,
    };
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let out = tempfile::tempdir()?;

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let server = listener.local_addr()?;
    tokio::spawn(serve(listener));

    let compute_model = if isolate {
        ExecutionType::Process
    } else {
        ExecutionType::Cpu
    };
    let config = PipelineConfig::new(
        "numeric",
        vec![
            StageConfig::new("download", ExecutionType::Async)
                .workers(16)
                .queue_size(64),
            StageConfig::new("compute", compute_model)
                .workers(cores)
                .queue_size(16),
            StageConfig::new("save", ExecutionType::Async)
                .workers(8)
                .queue_size(64),
        ],
    )
    .stats_interval(Duration::ZERO);

    let jobs = (0..total).map(move |id| {
        WorkItem::with_job_id(
            format!("matrix-{id}"),
            Job {
                id,
                url: format!("http://{server}/matrix/{id}"),
            },
        )
    });
    let dir = out.path().to_path_buf();
    let builder = Pipeline::builder(config)?
        .source(sources::items(jobs))
        .async_stage("download", download);
    let builder = if isolate {
        builder.process_stage("compute", compute)
    } else {
        builder.sync_stage("compute", compute)
    };
    let pipeline = builder
        .async_stage("save", move |item| save(item, dir.clone()))
        .on_complete(|result| {
            if let Some(error) = &result.error {
                println!(
                    "✗ {} failed in {}: {}",
                    result.job_id, error.stage, error.message
                );
            }
        })
        .build()?;

    let started = Instant::now();
    let results = pipeline.run().await?;
    let elapsed = started.elapsed();

    let stats = pipeline.stats().await?;
    let ok = results.iter().filter(|r| r.success).count();
    println!();
    println!(
        "{} matrices of {ROWS}x{COLS} in {:.2} s ({:.0}/s): {} completed, {} failed, \
         success rate {:.1}%",
        results.len(),
        elapsed.as_secs_f64(),
        results.len() as f64 / elapsed.as_secs_f64(),
        ok,
        results.len() - ok,
        stats.success_rate * 100.0
    );
    println!();
    println!(
        "{:<9} {:<8} {:>7} {:>9} {:>7} {:>11} {:>11} {:>11} {:>11}",
        "stage", "model", "workers", "processed", "failed", "avg", "p50", "p99", "queue wait"
    );
    for s in &stats.stages {
        println!(
            "{:<9} {:<8} {:>7} {:>9} {:>7} {:>11} {:>11} {:>11} {:>11}",
            s.name,
            s.execution_type.to_string(),
            s.workers,
            s.processed,
            s.failed,
            ms(s.average_duration),
            ms(s.p50_duration),
            ms(s.p99_duration),
            ms(s.average_queue_wait),
        );
    }
    let stored = std::fs::read_dir(out.path())?.count();
    if let Some(r) = results.iter().find(|r| r.success) {
        let path = out.path().join(format!("{}.json", r.job_id));
        let analysis: Analysis = serde_json::from_slice(&std::fs::read(&path)?)?;
        println!();
        println!(
            "{}: largest eigenvalue of the correlation matrix {:.4} ({} iterations), \
             Frobenius norm {:.1}",
            r.job_id, analysis.largest_eigenvalue, analysis.iterations, analysis.frobenius_norm
        );
    }
    println!();
    anyhow::ensure!(
        stored == ok,
        "saved {stored} files for {ok} completed items"
    );
    if keep {
        println!("{stored} results saved in {}", out.keep().display());
    } else {
        println!(
            "{stored} results saved in {}, removed now (run with --keep to keep them)",
            out.path().display()
        );
    }
    Ok(())
}
