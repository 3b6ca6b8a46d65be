//! Split then batch: one item splits into N records, gathered into batches
//! of 500 (or per 10 ms), each batch summed. What does it cost beside a
//! hand-written tokio pipeline of the same shape, and is the peak memory
//! set by the configuration rather than by N?
//!
//! - `tokio chunks_timeout`: by hand: a blocking thread (`spawn_blocking`)
//!   yields the N records into a bounded `tokio::sync::mpsc` channel of
//!   1024; a task reads it as a stream, `chunks_timeout(500, 10 ms)`, and
//!   sums each batch (the last stage ends there, on the runtime).
//! - `bergtalzug split+batch`: `sources::iter([N])` -> a `Thread` stage
//!   whose handler returns `Children::iter(0..N)` with `.split()` (drawn on
//!   a blocking thread as the next stage has room) -> an `Async` batch
//!   stage (`batch(500, 10 ms)`, `workers(2).queue_size(2)`) summing each
//!   batch. `retain_results(false)`, tracking on, `stats_interval` zero.
//!
//! Every variant runs in a child process of its own (the bench re-executes
//! itself with `BERGTALZUG_SHAPES_CHILD=<variant>:<n>`) on a tokio runtime
//! of 2 workers, and prints its wall time, CPU time (user + system, from
//! `/proc/self/stat`, 10 ms ticks) and peak RSS (`VmHWM`). Reported:
//! records/s, CPU per record, peak RSS at N = 1,000,000 and 3,000,000
//! (the bound: RSS at 3,000,000 within 10 % of that at 1,000,000; below
//! about a million the run has not reached its steady state), and the
//! throughput ratio bergtalzug / tokio. Quick mode (`BENCH_QUICK=1` or
//! `--quick`): N = 20,000 and 200,000, to check that it runs.
//!
//! Measured (release, the shared 2-core machine; docs/shapes.md): peak RSS
//! 26.4 MiB at 1,000,000 records, 25.8 at 3,000,000, 26.6 at 10,000,000
//! (tokio by hand: 4.4 MiB); 420,000 records/s against tokio's 4,700,000
//! (0.09), 2.6 µs of CPU per record against 0.2 µs.
//!
//! ```text
//! cargo bench --bench shapes
//! ```

mod common;
use common::{cpu_time, quick, status_kib, verdict};

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bergtalzug::prelude::*;
use bergtalzug::shape::{Batch, Children};
use tokio_stream::StreamExt;

const CHILD_ENV: &str = "BERGTALZUG_SHAPES_CHILD";
const BATCH: usize = 500;
const WAIT: Duration = Duration::from_millis(10);

async fn by_hand(n: u64) -> u64 {
    let (tx, rx) = tokio::sync::mpsc::channel::<u64>(1024);
    tokio::task::spawn_blocking(move || {
        for record in 0..n {
            if tx.blocking_send(record).is_err() {
                return;
            }
        }
    });
    let sum = Arc::new(AtomicU64::new(0));
    let s = sum.clone();
    tokio::spawn(async move {
        let batches = tokio_stream::wrappers::ReceiverStream::new(rx).chunks_timeout(BATCH, WAIT);
        tokio::pin!(batches);
        while let Some(batch) = batches.next().await {
            s.fetch_add(batch.iter().sum::<u64>(), Ordering::Relaxed);
        }
    })
    .await
    .unwrap();
    sum.load(Ordering::Relaxed)
}

async fn bergtalzug(n: u64) -> u64 {
    let config = PipelineConfig::new(
        "shapes",
        vec![
            StageConfig::new("read", ExecutionType::Thread)
                .workers(1)
                .queue_size(1),
            StageConfig::new("write", ExecutionType::Async)
                .workers(2)
                .queue_size(2)
                .batch(BATCH, WAIT),
        ],
    )
    .stats_interval(Duration::ZERO)
    .retain_results(false);
    let sum = Arc::new(AtomicU64::new(0));
    let s = sum.clone();
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter([n]))
        .sync_stage("read", |file: WorkItem<u64>| {
            Ok(file.map(|n| Children::iter(0..n)))
        })
        .split()
        .async_batch_stage("write", move |batch: Batch<u64>| {
            let s = s.clone();
            async move {
                let records = batch.into_items();
                s.fetch_add(
                    records.iter().map(|r| r.data).sum::<u64>(),
                    Ordering::Relaxed,
                );
                Ok(records.into_iter().map(|r| Ok(r.data)).collect())
            }
        })
        .build()
        .unwrap();
    pipeline.run().await.unwrap();
    let stats = pipeline.stats().await.unwrap();
    assert_eq!(stats.derived_items_finished, n);
    assert_eq!(stats.completed_items, 1);
    sum.load(Ordering::Relaxed)
}

fn child(spec: &str) {
    let (variant, n) = spec.split_once(':').expect("variant:n");
    let n: u64 = n.parse().expect("a count");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cpu0 = cpu_time().unwrap_or_default();
    let start = Instant::now();
    let sum = rt.block_on(async {
        match variant {
            "tokio" => by_hand(n).await,
            "bergtalzug" => bergtalzug(n).await,
            other => panic!("unknown variant {other}"),
        }
    });
    let wall = start.elapsed();
    let cpu = cpu_time().unwrap_or_default().saturating_sub(cpu0);
    assert_eq!(sum, n * (n - 1) / 2, "every record counted once");
    let hwm = status_kib("VmHWM").unwrap_or(0);
    println!("{} {} {}", wall.as_secs_f64(), cpu.as_secs_f64(), hwm);
}

struct Run {
    wall: f64,
    cpu: f64,
    hwm_kib: u64,
}

fn run(variant: &str, n: u64) -> Run {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .env(CHILD_ENV, format!("{variant}:{n}"))
        .output()
        .expect("the child runs");
    assert!(
        out.status.success(),
        "{variant}:{n} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().expect("a line");
    let mut f = line.split_whitespace();
    Run {
        wall: f.next().unwrap().parse().unwrap(),
        cpu: f.next().unwrap().parse().unwrap(),
        hwm_kib: f.next().unwrap().parse().unwrap(),
    }
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child(&spec);
        return;
    }
    let (small, large) = if quick() {
        (20_000, 200_000)
    } else {
        (1_000_000, 3_000_000)
    };
    println!(
        "{:<26} {:>10} {:>14} {:>14} {:>12}",
        "variant", "records", "records/s", "CPU/record", "peak RSS"
    );
    let mut rates = std::collections::HashMap::new();
    let mut peaks = std::collections::HashMap::new();
    for n in [small, large] {
        for (variant, label) in [
            ("tokio", "tokio chunks_timeout"),
            ("bergtalzug", "bergtalzug split+batch"),
        ] {
            let r = run(variant, n);
            let rate = n as f64 / r.wall;
            println!(
                "{label:<26} {n:>10} {rate:>14.0} {:>11.0} ns {:>9} KiB",
                r.cpu * 1e9 / n as f64,
                r.hwm_kib
            );
            rates.insert((variant, n), rate);
            peaks.insert((variant, n), r.hwm_kib);
        }
    }
    let ratio = rates[&("bergtalzug", large)] / rates[&("tokio", large)];
    println!("throughput bergtalzug / tokio at {large}: {ratio:.2}");
    let (p_small, p_large) = (peaks[&("bergtalzug", small)], peaks[&("bergtalzug", large)]);
    let growth = p_large as f64 / p_small as f64 - 1.0;
    println!(
        "peak RSS of bergtalzug, {small} -> {large} records from one item: {p_small} -> {p_large} KiB ({:+.1} %): bounded by configuration (within 10 %): {}",
        growth * 100.0,
        verdict(growth <= 0.10)
    );
}
