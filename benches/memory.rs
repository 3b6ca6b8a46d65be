//! Peak memory (RSS) of a pipeline run, in a fresh process per run: does
//! bergtalzug's memory stay bounded by its configuration when results are
//! not retained, and what does each retained result cost?
//!
//! Every run is a child process: the bench re-executes its own binary with
//! `BERGTALZUG_MEMORY_CHILD=<variant>:<items>`; the child builds a tokio
//! multi-thread runtime with 2 worker threads, runs the variant once, then
//! reads its own peak resident set size (`VmHWM` in `/proc/self/status`)
//! and prints it. No run sees memory another run touched.
//!
//! - `idle runtime`: the runtime and nothing else: the floor.
//! - `async-channel mpmc`: by hand, 4 stages x 4 tokio tasks joined by
//!   bounded `async-channel`s of 100, handler `n + 1` (as in
//!   `benches/throughput.rs`): what the same shape costs without bergtalzug.
//! - `bergtalzug retain off` / `retain on`: `sources::iter(0..N)` through 4
//!   `Async` stages (`workers(4).queue_size(100)`), handler `n + 1`,
//!   tracking on, `stats_interval` zero, `retain_results(false)` or
//!   `(true)`; every outcome counted by `on_complete`. With results
//!   retained, the child keeps the `Vec<WorkItemResult>` that `run()`
//!   returned alive until it has read `VmHWM`.
//!
//! Targets: with `retain_results(false)`, peak RSS at 10,000,000 items
//! within 10 % of that at 1,000,000 (issues 6 and 14) and under 64 MiB
//! (issue 6); with results retained, at most 256 bytes per result (issue
//! 14; it was 426, and issue 6 had asked 512), where bytes per result =
//! (VmHWM retain on - VmHWM retain off) / N at the same N. The hand-written
//! `mpmc` at both sizes, in the same run, shows the floor of the shape.
//!
//! Each (variant, N) runs 3 times, interleaved; the table shows the median
//! and the spread of VmHWM. Quick mode (`BENCH_QUICK=1` or `--quick`):
//! 20,000 and 200,000 items, one run each, for CI.
//!
//! ```text
//! cargo bench --bench memory
//! BENCH_QUICK=1 cargo bench --bench memory
//! ```

mod common;
use common::{status_kib, verdict};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bergtalzug::prelude::*;

/// Names the variant a child process runs: `<variant>:<items>`.
const CHILD_ENV: &str = "BERGTALZUG_MEMORY_CHILD";
const STAGES: usize = 4;
const WORKERS: usize = 4;
const QUEUE: usize = 100;
const FULL_SMALL: u64 = 1_000_000;
const FULL_LARGE: u64 = 10_000_000;
const FULL_REPS: usize = 3;
const QUICK_SMALL: u64 = 20_000;
const QUICK_LARGE: u64 = 200_000;
/// Targets of issues 6 and 14.
const MAX_GROWTH: f64 = 0.10;
const MAX_PEAK_KIB: u64 = 64 * 1024;
const MAX_BYTES_PER_RESULT: f64 = 256.0;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Idle,
    Mpmc,
    Bergtalzug { retain: bool },
}

impl Variant {
    fn key(self) -> &'static str {
        match self {
            Variant::Idle => "idle",
            Variant::Mpmc => "mpmc",
            Variant::Bergtalzug { retain: false } => "retain-off",
            Variant::Bergtalzug { retain: true } => "retain-on",
        }
    }

    fn from_key(key: &str) -> Option<Variant> {
        Some(match key {
            "idle" => Variant::Idle,
            "mpmc" => Variant::Mpmc,
            "retain-off" => Variant::Bergtalzug { retain: false },
            "retain-on" => Variant::Bergtalzug { retain: true },
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Variant::Idle => "idle runtime (floor)",
            Variant::Mpmc => "async-channel mpmc (baseline)",
            Variant::Bergtalzug { retain: false } => "bergtalzug retain off",
            Variant::Bergtalzug { retain: true } => "bergtalzug retain on",
        }
    }
}

/// What a child reports.
#[derive(Clone, Copy, Debug)]
struct Measured {
    hwm_kib: u64,
    secs: f64,
}

/// The bergtalzug pipeline; returns what `run()` returned.
async fn bergtalzug(n: u64, retain: bool) -> Vec<WorkItemResult> {
    let stages = (0..STAGES)
        .map(|i| {
            StageConfig::new(format!("s{i}"), ExecutionType::Async)
                .workers(WORKERS)
                .queue_size(QUEUE)
        })
        .collect();
    let config = PipelineConfig::new("memory", stages)
        .stats_interval(Duration::ZERO)
        .enable_tracking(true)
        .retain_results(retain);
    let succeeded = Arc::new(AtomicU64::new(0));
    let ok = succeeded.clone();
    let mut builder = Pipeline::builder(config)
        .expect("valid config")
        .source(sources::iter(0..n));
    for i in 0..STAGES {
        builder = builder.async_stage(&format!("s{i}"), |item: WorkItem<u64>| async move {
            Ok(item.map(|n| n + 1))
        });
    }
    let pipeline = builder
        .on_complete(move |r| {
            if r.success {
                ok.fetch_add(1, Ordering::Relaxed);
            }
        })
        .build()
        .expect("pipeline builds");
    let results = pipeline.run().await.expect("pipeline runs");
    assert_eq!(succeeded.load(Ordering::Relaxed), n, "every item succeeds");
    assert_eq!(results.len() as u64, if retain { n } else { 0 });
    results
}

/// In the child: run one variant, print `VmHWM` and the time taken.
fn child(spec: &str) {
    let (key, items) = spec.split_once(':').expect("<variant>:<items>");
    let variant = Variant::from_key(key).expect("known variant");
    let n: u64 = items.parse().expect("item count");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let start = Instant::now();
    let results = runtime.block_on(async move {
        match variant {
            Variant::Idle => Vec::new(),
            Variant::Mpmc => {
                common::mpmc(STAGES, WORKERS, QUEUE, n, |x| async move { x + 1 }).await;
                Vec::new()
            }
            Variant::Bergtalzug { retain } => bergtalzug(n, retain).await,
        }
    });
    let secs = start.elapsed().as_secs_f64();
    let hwm = status_kib("VmHWM").expect("VmHWM in /proc/self/status");
    // The results stay alive (and resident) until VmHWM was read.
    std::hint::black_box(&results);
    println!(
        "CHILD hwm_kib={hwm} secs={secs:.3} results={}",
        results.len()
    );
}

/// In the parent: run one variant in a fresh process.
fn spawn(variant: Variant, n: u64) -> Measured {
    let exe = std::env::current_exe().expect("own executable");
    let output = Command::new(exe)
        .env(CHILD_ENV, format!("{}:{n}", variant.key()))
        .output()
        .expect("child runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "child {variant:?} {n} failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("CHILD "))
        .expect("child prints its result");
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("{name} in {line}"))
            .to_string()
    };
    Measured {
        hwm_kib: field("hwm_kib").parse().expect("hwm_kib"),
        secs: field("secs").parse().expect("secs"),
    }
}

fn median(sorted: &[u64]) -> u64 {
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2
    }
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child(&spec);
        return;
    }
    // `cargo bench` passes `--bench`; other unknown arguments are ignored too.
    let quick = common::quick();
    let (small, large, reps) = if quick {
        (QUICK_SMALL, QUICK_LARGE, 1)
    } else {
        (FULL_SMALL, FULL_LARGE, FULL_REPS)
    };
    let load = common::load_average();
    let off = Variant::Bergtalzug { retain: false };
    let on = Variant::Bergtalzug { retain: true };
    let runs: Vec<(Variant, u64)> = vec![
        (Variant::Idle, 0),
        (Variant::Mpmc, small),
        (Variant::Mpmc, large),
        (off, small),
        (off, large),
        (on, small),
    ];

    println!(
        "memory: peak RSS (VmHWM) per run, each in a fresh process; {STAGES} stages x \
         {WORKERS} async workers, queue {QUEUE}, u64 items, tracking on, 2 tokio worker \
         threads, {reps} run(s) each{}",
        if quick { " (quick)" } else { "" }
    );
    println!(
        "size_of: WorkItemResult {} B, WorkItem<u64> {} B (a tracked result holds \
         up to 4 stages' times inline, 28 B each, more in an allocation of their \
         own: see item::size_tests)",
        std::mem::size_of::<WorkItemResult>(),
        std::mem::size_of::<WorkItem<u64>>(),
    );

    let mut measured: Vec<Vec<Measured>> = vec![Vec::new(); runs.len()];
    for rep in 0..reps {
        for (i, &(variant, n)) in runs.iter().enumerate() {
            let m = spawn(variant, n);
            println!(
                "  run {}: {:<30} {:>11} items  VmHWM {:>9} KiB  {:>7.2} s",
                rep + 1,
                variant.name(),
                n,
                m.hwm_kib,
                m.secs
            );
            measured[i].push(m);
        }
    }

    let hwm = |variant: Variant, n: u64| -> Vec<u64> {
        let i = runs
            .iter()
            .position(|&r| r == (variant, n))
            .expect("measured");
        let mut v: Vec<u64> = measured[i].iter().map(|m| m.hwm_kib).collect();
        v.sort_unstable();
        v
    };

    println!();
    println!(
        "{:<30} {:>11} {:>14} {:>20} {:>11}",
        "variant", "items", "median KiB", "min..max KiB", "median s"
    );
    for (i, &(variant, n)) in runs.iter().enumerate() {
        let v = hwm(variant, n);
        let mut secs: Vec<f64> = measured[i].iter().map(|m| m.secs).collect();
        secs.sort_by(f64::total_cmp);
        println!(
            "{:<30} {:>11} {:>14} {:>20} {:>11.2}",
            variant.name(),
            n,
            median(&v),
            format!("{}..{}", v[0], v[v.len() - 1]),
            secs[secs.len() / 2]
        );
    }

    let off_small = median(&hwm(off, small));
    let off_large = median(&hwm(off, large));
    let on_small = median(&hwm(on, small));
    let growth = off_large as f64 / off_small as f64 - 1.0;
    let per_result = (on_small as f64 - off_small as f64) * 1024.0 / small as f64;
    println!();
    println!(
        "retain off: {large} items vs {small}: {:+.1} % ({off_small} -> {off_large} KiB); \
         target <= +{:.0} % and < {} KiB{}",
        growth * 100.0,
        MAX_GROWTH * 100.0,
        MAX_PEAK_KIB,
        if quick {
            String::new()
        } else {
            format!(
                ": {}",
                verdict(growth <= MAX_GROWTH && off_large < MAX_PEAK_KIB)
            )
        }
    );
    println!(
        "retain on: ({on_small} - {off_small}) KiB / {small} = {per_result:.0} bytes per \
         retained result; target (issue 14) <= {MAX_BYTES_PER_RESULT:.0}{}",
        if quick {
            String::new()
        } else {
            format!(": {}", verdict(per_result <= MAX_BYTES_PER_RESULT))
        }
    );
    let (mpmc_small, mpmc_large) = (
        median(&hwm(Variant::Mpmc, small)),
        median(&hwm(Variant::Mpmc, large)),
    );
    println!(
        "baseline, async-channel mpmc: {large} items vs {small}: {:+.1} % ({mpmc_small} -> \
         {mpmc_large} KiB); bergtalzug retain off is {:+} KiB over it at {large}",
        (mpmc_large as f64 / mpmc_small as f64 - 1.0) * 100.0,
        off_large as i64 - mpmc_large as i64
    );
    common::print_load(&load);
}
