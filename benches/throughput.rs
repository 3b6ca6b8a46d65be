//! Items per second through a 4-stage pipeline with 4 async workers per stage,
//! bounded queues of 100 and a trivial handler (`n + 1` on a `u64`): how
//! much bergtalzug costs over the same pipeline written by hand with tokio.
//!
//! Timed, per run, from before the pipeline is built until every item came
//! out of the last stage and was counted, on a tokio multi-thread runtime
//! with 2 worker threads. Fair to the baselines: every variant runs as a
//! task on the runtime's workers, and a hand-written pipeline ends in its
//! last stage, whose workers count what they finish (`common::Tally`), as
//! bergtalzug's last stage hands its results to its tracker on the runtime;
//! none ends in a collector awaited on the thread in `block_on`, which made
//! every item (or batch) cross to a third thread and flattered bergtalzug.
//! Every stage holds at most about 104 items (bergtalzug's
//! `queue_size + workers`) in every variant:
//!
//! - `async-channel mpmc`: by hand, the plainest way: one bounded
//!   multi-consumer channel (capacity 100) per stage, each worker receives,
//!   handles and sends one item at a time.
//! - `tokio shared rx`: by hand, one item at a time; each stage's 4 worker
//!   tasks share one bounded `mpsc` receiver (capacity 100) behind a
//!   `tokio::sync::Mutex`.
//! - `tokio rr channels`: by hand, one item at a time; each worker owns a
//!   bounded `mpsc` channel (capacity 25, so 100 per stage) and every sender
//!   deals its items round-robin.
//! - `tokio batched`: by hand, as `shared rx`, but a worker takes what is
//!   ready (up to 16) under one lock and reserves room for all of it
//!   downstream at once (`recv_many` / `reserve_many`); channels of 40, so
//!   40 queued + 4 x 16 in hand = 104 per stage. bergtalzug batches its
//!   transport too; this is the fastest fair hand-written version found.
//! - `bergtalzug tracking on` / `off`: `sources::iter(0..N)` through four
//!   `Async` stages (`workers(4).queue_size(100)`), `retain_results(false)`,
//!   outcomes counted by an `on_complete` callback; all N must succeed.
//!
//! Each variant runs 5 times, interleaved, after one warm-up run; the
//! table shows the median and the best, and the median's ratio to the
//! fastest per-item baseline and to the batched one. Quick mode
//! (`BENCH_QUICK=1` or `--quick`): 20,000 items, one repetition, for CI.
//!
//! Two environment variables narrow a run, for instruction counts under
//! callgrind (`benches/callgrind.sh`); unset, the bench runs as above:
//!
//! - `BENCH_ONLY=<text>`: only the variants whose name (as printed, e.g.
//!   `bergtalzug tracking on`, `tokio batched`) contains `<text>`. They still
//!   get their one warm-up run, and no other.
//! - `BENCH_ITEMS=<n>`: `n` items per timed run instead of the mode's
//!   1,000,000 or 20,000 (the warm-up stays at most 20,000).
//!
//! The last line, `items run per variant: ...`, counts the warm-up too.
//!
//! ```text
//! cargo bench --bench throughput
//! BENCH_QUICK=1 cargo bench --bench throughput
//! BENCH_QUICK=1 BENCH_ONLY="tracking on" cargo bench --bench throughput
//! benches/callgrind.sh    # instruction counts per variant, 3 runs each
//! ```

mod common;
use common::{Tally, cpu_time, join_all, median};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bergtalzug::prelude::*;
use tokio::sync::{Mutex, mpsc};

const STAGES: usize = 4;
const WORKERS: usize = 4;
const QUEUE: usize = 100;
/// Most items a batched hand-written worker takes at once.
const BATCH: usize = 16;
/// Channel capacity of the batched baseline: with `WORKERS * BATCH` items in
/// hand, a stage holds `QUEUE + WORKERS` at most, as a bergtalzug stage does.
const BATCH_QUEUE: usize = QUEUE + WORKERS - WORKERS * BATCH;
const FULL_ITEMS: u64 = 1_000_000;
const FULL_REPS: usize = 5;
const QUICK_ITEMS: u64 = 20_000;
const WARMUP_ITEMS: u64 = 20_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Mpmc,
    SharedRx,
    RoundRobin,
    Batched,
    Tracking(bool),
}

impl Variant {
    const ALL: [Variant; 6] = [
        Variant::Mpmc,
        Variant::SharedRx,
        Variant::RoundRobin,
        Variant::Batched,
        Variant::Tracking(true),
        Variant::Tracking(false),
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::Mpmc => "async-channel mpmc (baseline)",
            Variant::SharedRx => "tokio shared rx (baseline)",
            Variant::RoundRobin => "tokio rr channels (baseline)",
            Variant::Batched => "tokio batched (baseline)",
            Variant::Tracking(true) => "bergtalzug tracking on",
            Variant::Tracking(false) => "bergtalzug tracking off",
        }
    }

    async fn run(self, n: u64) -> Duration {
        match self {
            Variant::Mpmc => common::mpmc(STAGES, WORKERS, QUEUE, n, plus_one).await,
            Variant::SharedRx => shared_rx(n).await,
            Variant::RoundRobin => round_robin(n).await,
            Variant::Batched => shared_rx_batched(n).await,
            Variant::Tracking(on) => bergtalzug(n, on).await,
        }
    }
}

async fn plus_one(x: u64) -> u64 {
    x + 1
}

/// Hand-written: one bounded channel per stage, its workers share the
/// receiver behind a tokio mutex.
async fn shared_rx(n: u64) -> Duration {
    let start = Instant::now();
    let tally = Arc::new(Tally::default());
    let (feed, first) = mpsc::channel::<u64>(QUEUE);
    let mut input = Arc::new(Mutex::new(first));
    let mut last = Vec::new();
    for stage in 0..STAGES {
        let (tx, rx) = mpsc::channel::<u64>(QUEUE);
        let is_last = stage + 1 == STAGES;
        for _ in 0..WORKERS {
            let input = input.clone();
            let tx = (!is_last).then(|| tx.clone());
            let tally = tally.clone();
            let task = tokio::spawn(async move {
                loop {
                    let next = input.lock().await.recv().await;
                    let Some(x) = next else { break };
                    match &tx {
                        Some(tx) => {
                            if tx.send(x + 1).await.is_err() {
                                break;
                            }
                        }
                        None => tally.add(x + 1),
                    }
                }
            });
            if is_last {
                last.push(task);
            }
        }
        input = Arc::new(Mutex::new(rx));
    }
    tokio::spawn(async move {
        for i in 0..n {
            if feed.send(i).await.is_err() {
                break;
            }
        }
    });
    join_all(last).await;
    let elapsed = start.elapsed();
    tally.check(n, STAGES, "shared rx");
    elapsed
}

/// Hand-written, batched: as [`shared_rx`], but a worker takes what is
/// ready (up to `BATCH`) in one lock, and reserves room for all of it in
/// the next channel before sending.
async fn shared_rx_batched(n: u64) -> Duration {
    let start = Instant::now();
    let tally = Arc::new(Tally::default());
    let (feed, first) = mpsc::channel::<u64>(BATCH_QUEUE);
    let mut input = Arc::new(Mutex::new(first));
    let mut last = Vec::new();
    for stage in 0..STAGES {
        let (tx, rx) = mpsc::channel::<u64>(BATCH_QUEUE);
        let is_last = stage + 1 == STAGES;
        for _ in 0..WORKERS {
            let input = input.clone();
            let tx = (!is_last).then(|| tx.clone());
            let tally = tally.clone();
            let task = tokio::spawn(async move {
                let mut batch = Vec::with_capacity(BATCH);
                loop {
                    batch.clear();
                    if input.lock().await.recv_many(&mut batch, BATCH).await == 0 {
                        break;
                    }
                    let Some(tx) = &tx else {
                        tally.add_many(batch.drain(..).map(|x| x + 1));
                        continue;
                    };
                    let Ok(permits) = tx.reserve_many(batch.len()).await else {
                        break;
                    };
                    for (permit, x) in permits.zip(batch.drain(..)) {
                        permit.send(x + 1);
                    }
                }
            });
            if is_last {
                last.push(task);
            }
        }
        input = Arc::new(Mutex::new(rx));
    }
    tokio::spawn(async move {
        let mut next = 0;
        while next < n {
            let k = (n - next).min(BATCH as u64);
            let Ok(permits) = feed.reserve_many(k as usize).await else {
                break;
            };
            for (permit, i) in permits.zip(next..next + k) {
                permit.send(i);
            }
            next += k;
        }
    });
    join_all(last).await;
    let elapsed = start.elapsed();
    tally.check(n, STAGES, "batched shared rx");
    elapsed
}

/// Sends each item to the next of `outs` in turn; false once they closed.
async fn send_round_robin(outs: &[mpsc::Sender<u64>], next: &mut usize, x: u64) -> bool {
    let ok = outs[*next].send(x).await.is_ok();
    *next = (*next + 1) % outs.len();
    ok
}

/// Hand-written: one bounded channel per worker (`QUEUE / WORKERS` each),
/// every sender deals its items round-robin over the next stage's workers.
async fn round_robin(n: u64) -> Duration {
    let start = Instant::now();
    let tally = Arc::new(Tally::default());
    // Built from the last stage back, so each stage knows its downstream;
    // the last stage's workers count what they finish.
    let mut downstream: Vec<mpsc::Sender<u64>> = Vec::new();
    let mut last = Vec::new();
    for stage in (0..STAGES).rev() {
        let mut inputs = Vec::with_capacity(WORKERS);
        for _ in 0..WORKERS {
            let (tx, mut rx) = mpsc::channel::<u64>(QUEUE / WORKERS);
            inputs.push(tx);
            let outs = downstream.clone();
            let tally = tally.clone();
            let task = tokio::spawn(async move {
                let mut next = 0;
                while let Some(x) = rx.recv().await {
                    if outs.is_empty() {
                        tally.add(x + 1);
                    } else if !send_round_robin(&outs, &mut next, x + 1).await {
                        break;
                    }
                }
            });
            if stage + 1 == STAGES {
                last.push(task);
            }
        }
        downstream = inputs;
    }
    tokio::spawn(async move {
        let mut next = 0;
        for i in 0..n {
            if !send_round_robin(&downstream, &mut next, i).await {
                break;
            }
        }
    });
    join_all(last).await;
    let elapsed = start.elapsed();
    tally.check(n, STAGES, "rr channels");
    elapsed
}

/// bergtalzug with the same shape; outcomes counted by a callback.
async fn bergtalzug(n: u64, tracking: bool) -> Duration {
    let start = Instant::now();
    let stages = (0..STAGES)
        .map(|i| {
            StageConfig::new(format!("s{i}"), ExecutionType::Async)
                .workers(WORKERS)
                .queue_size(QUEUE)
        })
        .collect();
    let config = PipelineConfig::new("bench", stages)
        .stats_interval(Duration::ZERO)
        .enable_tracking(tracking)
        .retain_results(false);
    let succeeded = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let (ok, bad) = (succeeded.clone(), failed.clone());
    let pipeline = Pipeline::builder(config)
        .expect("valid config")
        .source(sources::iter(0..n))
        .async_stage("s0", |item: WorkItem<u64>| async move {
            Ok(item.map(|n| n + 1))
        })
        .async_stage("s1", |item: WorkItem<u64>| async move {
            Ok(item.map(|n| n + 1))
        })
        .async_stage("s2", |item: WorkItem<u64>| async move {
            Ok(item.map(|n| n + 1))
        })
        .async_stage("s3", |item: WorkItem<u64>| async move {
            Ok(item.map(|n| n + 1))
        })
        .on_complete(move |r| {
            let counter = if r.success { &ok } else { &bad };
            counter.fetch_add(1, Ordering::Relaxed);
        })
        .build()
        .expect("pipeline builds");
    let results = pipeline.run().await.expect("pipeline runs");
    let elapsed = start.elapsed();
    assert!(results.is_empty(), "retain_results is off");
    assert_eq!(
        (
            succeeded.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed)
        ),
        (n, 0),
        "bergtalzug (tracking {tracking}): every item must complete successfully"
    );
    elapsed
}

/// The variants `BENCH_ONLY` selects (those whose name contains it), or all
/// of them when it is unset or empty. Panics when it matches none.
fn selected() -> Vec<Variant> {
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let chosen: Vec<Variant> = Variant::ALL
        .into_iter()
        .filter(|v| v.name().contains(only.as_str()))
        .collect();
    assert!(
        !chosen.is_empty(),
        "BENCH_ONLY={only:?} matches no variant; they are: {:?}",
        Variant::ALL.map(Variant::name)
    );
    chosen
}

/// `BENCH_ITEMS`, the items per timed run, if set. Panics unless it is a
/// positive whole number.
fn items_override() -> Option<u64> {
    let text = std::env::var("BENCH_ITEMS")
        .ok()
        .filter(|t| !t.is_empty())?;
    match text.parse() {
        Ok(n) if n > 0 => Some(n),
        _ => panic!("BENCH_ITEMS={text:?} is not a positive number of items"),
    }
}

/// A ratio for the table, or `-` when its baseline was not run.
fn ratio(of: f64, to: Option<f64>) -> String {
    to.map_or("-".into(), |to| format!("{:.2}x", of / to))
}

fn main() {
    // `cargo bench` passes `--bench`; other unknown arguments are ignored too.
    let quick = common::quick();
    let (items, reps) = if quick {
        (QUICK_ITEMS, 1)
    } else {
        (FULL_ITEMS, FULL_REPS)
    };
    let items = items_override().unwrap_or(items);
    let variants = selected();
    let warmup = WARMUP_ITEMS.min(items);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");

    println!(
        "throughput: {STAGES} stages x {WORKERS} async workers, queue {QUEUE}, \
         {items} u64 items, {reps} rep(s), 2 tokio worker threads{}",
        if quick { " (quick)" } else { "" }
    );

    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut cpu_ns: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    // Each run is a task on the runtime's workers, as a pipeline's work is:
    // the thread in `block_on` only waits for it.
    let on_workers = |variant: Variant, n: u64| async move {
        tokio::spawn(variant.run(n))
            .await
            .expect("a variant panicked")
    };
    runtime.block_on(async {
        for &variant in &variants {
            on_workers(variant, warmup).await;
        }
        for rep in 0..reps {
            for (i, &variant) in variants.iter().enumerate() {
                let cpu_before = cpu_time();
                let elapsed = on_workers(variant, items).await;
                let cpu = cpu_time()
                    .zip(cpu_before)
                    .map(|(after, before)| (after - before).as_nanos() as f64 / items as f64);
                let rate = items as f64 / elapsed.as_secs_f64();
                println!(
                    "  rep {}: {:<30} {:>8.1} ms {:>12.0} items/s {:>8} CPU ns/item",
                    rep + 1,
                    variant.name(),
                    elapsed.as_secs_f64() * 1e3,
                    rate,
                    cpu.map_or("?".into(), |c| format!("{c:.0}"))
                );
                rates[i].push(rate);
                cpu_ns[i].extend(cpu);
            }
        }
    });

    for r in rates.iter_mut().chain(&mut cpu_ns) {
        r.sort_by(f64::total_cmp);
    }
    // Medians of the baselines that ran (`BENCH_ONLY` may leave some out).
    let median_of = |v: Variant| {
        let i = variants.iter().position(|&w| w == v)?;
        Some(median(&rates[i]))
    };
    let per_item = [Variant::Mpmc, Variant::SharedRx, Variant::RoundRobin]
        .into_iter()
        .filter_map(median_of)
        .reduce(f64::max);
    let batched = median_of(Variant::Batched);

    println!();
    println!(
        "{:<30} {:>14} {:>14} {:>9} {:>9} {:>12}",
        "variant", "median items/s", "best items/s", "/per-item", "/batched", "CPU ns/item"
    );
    for ((variant, r), cpu) in variants.iter().zip(&rates).zip(&cpu_ns) {
        let med = median(r);
        println!(
            "{:<30} {:>14.0} {:>14.0} {:>9} {:>9} {:>12}",
            variant.name(),
            med,
            r[r.len() - 1],
            ratio(med, per_item),
            ratio(med, batched),
            if cpu.is_empty() {
                "?".into()
            } else {
                format!("{:.0}", median(cpu))
            }
        );
    }
    println!(
        "(ratios of medians: /per-item = vs the fastest of mpmc, shared rx and rr channels; \
         /batched = vs tokio batched; - = not run; \
         CPU ns/item = median process CPU time per item, both threads, 10 ms ticks)"
    );
    println!(
        "peak RSS (VmHWM): {}",
        common::status_kib("VmHWM").map_or_else(|| "unavailable".into(), |kib| format!("{kib} kB"))
    );
    println!(
        "items run per variant: {} ({warmup} warm-up + {reps} x {items})",
        warmup + reps as u64 * items
    );
}
