//! Chaos: a million items through four stages (Async, Thread, Cpu, Async)
//! with 1 % errors, 0.1 % panics, timeouts and retries; once to the end and
//! once stopped at a random moment. Nothing is lost, nothing finishes twice,
//! and memory stays flat.
//!
//! Ignored by default (about ten seconds in release); `.ci/run` runs it:
//! `cargo test --release --test chaos -- --ignored --nocapture`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use bergtalzug::prelude::*;

mod common;
use common::*;

const ITEMS: u64 = 1_000_000;

/// A deterministic per-(item, stage, attempt) dice roll in 0..10_000.
fn roll(item: &WorkItem<u64>, stage: u64) -> u64 {
    let attempt = u64::from(item.metadata().attempts());
    let mut z = item.data.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ stage.wrapping_mul(0xBF58_476D_1CE4_E5B9)
        ^ attempt.wrapping_mul(0x94D0_49BB_1331_11EB);
    z = (z ^ (z >> 31)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 29)) % 10_000
}

/// 1 % errors, 0.1 % panics.
fn chaos(item: WorkItem<u64>, stage: u64) -> anyhow::Result<WorkItem<u64>> {
    match roll(&item, stage) {
        0..10 => panic!("planned panic"),
        10..110 => anyhow::bail!("planned error"),
        _ => Ok(item),
    }
}

/// The resident set size now, in KiB (Linux).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

struct Run {
    finished: u64,
    admitted: u64,
    failed: u64,
    retried: u64,
    /// Peak RSS over the first and the second half of the run, in KiB.
    rss_halves: (u64, u64),
}

async fn chaos_run(stop_at: Option<u64>) -> Run {
    let stages = vec![
        StageConfig::new("fetch", ExecutionType::Async)
            .workers(16)
            .queue_size(200)
            .timeout(Duration::from_millis(200))
            .retry(RetryPolicy::exponential(3, Duration::from_millis(1)).jitter(0.5)),
        StageConfig::new("parse", ExecutionType::Thread)
            .workers(2)
            .queue_size(200)
            .retry(RetryPolicy::fixed(2, Duration::ZERO)),
        StageConfig::new("crunch", ExecutionType::Cpu)
            .workers(2)
            .queue_size(200),
        StageConfig::new("store", ExecutionType::Async)
            .workers(8)
            .queue_size(200)
            .timeout(Duration::from_millis(200)),
    ];
    let config = config("chaos", stages).retain_results(false);
    // One byte per job id: how many times it finished.
    let seen: Arc<Vec<AtomicU8>> = Arc::new((0..ITEMS).map(|_| AtomicU8::new(0)).collect());
    let finished = Arc::new(AtomicU64::new(0));
    let (seen_cb, finished_cb) = (seen.clone(), finished.clone());
    let items = (0..ITEMS).map(|n| WorkItem::with_job_id(n.to_string(), n));
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(sources::items(items))
        .retrying_async_stage("fetch", |item: WorkItem<u64>| async move {
            if roll(&item, 9) == 0 {
                // One in ten thousand attempts hangs past the timeout.
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            chaos(item, 0)
        })
        .retrying_sync_stage("parse", |item: WorkItem<u64>| chaos(item, 1))
        .sync_stage("crunch", |item: WorkItem<u64>| chaos(item, 2))
        .async_stage("store", |item: WorkItem<u64>| async move { chaos(item, 3) })
        .on_complete(move |r| {
            let n: usize = r.job_id.to_string().parse().unwrap();
            seen_cb[n].fetch_add(1, Ordering::Relaxed);
            finished_cb.fetch_add(1, Ordering::Relaxed);
        })
        .build()
        .unwrap();
    pipeline.start().await.unwrap();
    let mut halves = (0, 0);
    loop {
        let done = finished.load(Ordering::Relaxed);
        let rss = rss_kib();
        if done < ITEMS / 2 {
            halves.0 = halves.0.max(rss);
        } else {
            halves.1 = halves.1.max(rss);
        }
        if stop_at.is_some_and(|at| done >= at) {
            within(Duration::from_secs(30), pipeline.stop())
                .await
                .unwrap();
            break;
        }
        if pipeline.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    within(Duration::from_secs(120), pipeline.run())
        .await
        .unwrap();
    let stats = pipeline.stats().await.unwrap();
    let twice = seen
        .iter()
        .filter(|c| c.load(Ordering::Relaxed) > 1)
        .count();
    assert_eq!(twice, 0, "{twice} items finished more than once");
    let once = seen
        .iter()
        .filter(|c| c.load(Ordering::Relaxed) == 1)
        .count() as u64;
    assert_eq!(
        once, stats.admitted_items,
        "every admitted item finished once"
    );
    assert_eq!(finished.load(Ordering::Relaxed), stats.admitted_items);
    assert_eq!(stats.completed_items, stats.admitted_items);
    assert_eq!(stats.active_items, 0);
    Run {
        finished: stats.completed_items,
        admitted: stats.admitted_items,
        failed: stats.failed_items,
        retried: stats.stages.iter().map(|s| s.retried).sum(),
        rss_halves: halves,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a million items: run in release by .ci/run"]
async fn a_million_items_through_chaos() {
    // The planned panics are expected: keep them out of the output.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let planned = info.payload().downcast_ref::<&str>() == Some(&"planned panic");
        if !planned {
            default_hook(info);
        }
    }));

    let start = std::time::Instant::now();
    let full = chaos_run(None).await;
    let took = start.elapsed();
    assert_eq!(full.admitted, ITEMS);
    assert_eq!(full.finished, ITEMS);
    // About 2.4 % of items fail somewhere after their retries.
    assert!(
        full.failed > ITEMS / 100 && full.failed < ITEMS / 20,
        "{}",
        full.failed
    );
    assert!(full.retried > ITEMS / 100, "{}", full.retried);
    let (first, second) = full.rss_halves;
    println!(
        "full run: {} items in {took:.1?}, {} failed, {} retries, peak RSS {} MiB (first half) / {} MiB (second half)",
        full.finished,
        full.failed,
        full.retried,
        first / 1024,
        second / 1024
    );
    assert!(
        second <= first + first / 10 + 4 * 1024,
        "memory grew: {first} KiB in the first half, {second} KiB in the second"
    );

    let stop_at = fastrand::u64(ITEMS / 10..ITEMS * 9 / 10);
    let stopped = chaos_run(Some(stop_at)).await;
    println!(
        "stopped after {stop_at} finished: {} admitted, all {} finished, {} failed",
        stopped.admitted, stopped.finished, stopped.failed
    );
    assert!(stopped.admitted < ITEMS, "the stop closed the input");
    assert!(stopped.finished >= stop_at);
}
