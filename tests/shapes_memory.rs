//! The memory bound of a split: one item split into 1,000,000 children
//! through a batch stage holds what the configuration allows, not the
//! fan-out.
//!
//! Each run is a child process of its own (this test binary started again
//! with `--child <n>`), so that its peak RSS (`VmHWM` in
//! `/proc/self/status`, which it prints) is its pipeline's alone. The
//! pipeline: `sources::iter([n])` -> a `Thread` stage whose handler returns
//! `Children::iter(0..n)`, `.split()` -> an `Async` batch stage
//! (`batch(500, 10 ms)`, `workers(2).queue_size(2)`) summing each batch.
//! Its budget of live children is the batch stage's `item_room`: (2 + 2)
//! batches of 500 plus its batcher's 4 x 500, 4,000 children.
//!
//! The test asserts that the peak at 1,000,000 children is within
//! [`GROWTH_KIB`] (24 MiB) of the peak at 10,000 (which already fills the budget),
//! and below [`ABSOLUTE_KIB`]. Drawing children without the budget (the
//! splitter ignoring its credit) holds them all: hundreds of MiB.
//!
//! `harness = false`: `main` is the child's entry as well as the runner.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bergtalzug::prelude::*;
use bergtalzug::shape::{Batch, Children};

const BATCH: usize = 500;
/// The fan-out that fills the budget (4,000 live children) many times over.
const SMALL: u64 = 10_000;
/// The fan-out of the bound's claim.
const LARGE: u64 = 1_000_000;
/// What 990,000 more children may add to the peak: the allocator's heap
/// reaching its steady state (a debug build measured 4 to 13 MiB more,
/// flat from 1,000,000 to 3,000,000), not the children (each live child
/// costs some hundred bytes: 990,000 of them held would be about 100 MiB;
/// the splitter drawing without its budget reached 1.2 GiB).
const GROWTH_KIB: u64 = 24 * 1024;
/// The peak RSS of the 1,000,000-child run, at most. A debug build
/// measured 17-22 MiB at 10,000 children, 26-29 MiB at 1,000,000 and
/// 28-29.5 MiB at 2,000,000 and 3,000,000 (each run prints its figure);
/// with the splitter drawing without its budget, 1.2 GiB at 1,000,000.
const ABSOLUTE_KIB: u64 = 48 * 1024;
/// A child run that takes longer has hung.
const CHILD_LIMIT: Duration = Duration::from_secs(120);

/// The child: runs the pipeline over one item of `n` children and prints
/// its peak RSS in KiB.
fn child(n: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sum = Arc::new(AtomicU64::new(0));
    let s = sum.clone();
    let stats = rt.block_on(async move {
        let config = common::config(
            "shapes-memory",
            vec![
                StageConfig::new("read", ExecutionType::Thread)
                    .workers(1)
                    .queue_size(1),
                StageConfig::new("write", ExecutionType::Async)
                    .workers(2)
                    .queue_size(2)
                    .batch(BATCH, Duration::from_millis(10)),
            ],
        )
        .retain_results(false);
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
                    s.fetch_add(records.iter().map(|r| r.data).sum(), Ordering::Relaxed);
                    Ok(records.into_iter().map(|r| Ok(r.data)).collect())
                }
            })
            .build()
            .unwrap();
        pipeline.run().await.unwrap();
        pipeline.stats().await.unwrap()
    });
    assert_eq!(stats.completed_items, 1, "the one admitted item completed");
    assert_eq!(stats.derived_items_finished, n, "every child finished");
    assert_eq!(stats.derived_items_failed, 0);
    assert_eq!(
        sum.load(Ordering::Relaxed),
        n * (n - 1) / 2,
        "every record counted once"
    );
    let hwm = peak_kib().expect("VmHWM in /proc/self/status");
    println!("peak_kib {hwm}");
}

/// `VmHWM` (peak RSS) of this process, in KiB.
fn peak_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line["VmHWM:".len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Runs a child over `n` children (killed after [`CHILD_LIMIT`]) and
/// returns its peak RSS in KiB.
fn peak_of(n: u64) -> u64 {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--child", &n.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the child starts");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > CHILD_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the run over {n} children hung: killed after {CHILD_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    assert!(
        status.success(),
        "the run over {n} children failed: {status}"
    );
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("peak_kib "))
        .unwrap_or_else(|| panic!("the run over {n} children printed no peak: {out}"));
    let kib = line.trim().parse().unwrap();
    println!(
        "  {n} children: peak RSS {kib} KiB ({:.1?})",
        started.elapsed()
    );
    kib
}

fn a_million_children_through_a_batch_stage_hold_the_configured_memory() {
    let small = peak_of(SMALL);
    let large = peak_of(LARGE);
    assert!(
        large <= small + GROWTH_KIB,
        "peak RSS grew with the fan-out: {small} KiB at {SMALL} children, \
         {large} KiB at {LARGE} (more than {GROWTH_KIB} KiB more)"
    );
    assert!(
        large <= ABSOLUTE_KIB,
        "peak RSS at {LARGE} children is {large} KiB, over the {ABSOLUTE_KIB} KiB bound"
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        child(args[i + 1].parse().expect("a count of children"));
        return;
    }
    let tests: [(&str, fn()); 1] = [(
        "a_million_children_through_a_batch_stage_hold_the_configured_memory",
        a_million_children_through_a_batch_stage_hold_the_configured_memory,
    )];
    common::run_tests(&tests);
}
