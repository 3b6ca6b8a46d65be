//! What a durable queue costs (feature `sqlite`): the same pipelines fed by
//! the in-memory `sources::iter` and by a `WorkQueue` file, with either
//! durability setting.
//!
//! - `trivial 4x4`: four `Async` stages of 4 workers, queue 100, a handler
//!   adding 1: the queue's cost per item with nothing to hide it.
//! - `I/O-bound`: one `Async` stage of 64 workers, queue 128, each item
//!   waiting 1-10 ms (`1 + n % 10`), as an HTTP call would: the target is a
//!   queue that costs under 5 % of the in-memory run's time.
//!
//! Variants per pipeline: `in-memory`, `queue Full` (SQLite `synchronous =
//! FULL`, an fsync per commit) and `queue Normal` (`synchronous = NORMAL`,
//! WAL). The queue is filled before the clock starts; timed from building
//! the pipeline until `run` returns and
//! every item is `done` in the file. Reported: items/s (median of the
//! repetitions), process CPU per item (`/proc/self/stat`, 10 ms ticks),
//! and bytes written per item: `wchar` (bytes the process handed to
//! `write`) and `write_bytes` (bytes it caused to go to storage) from
//! `/proc/self/io`, the run only. Quick mode (`BENCH_QUICK=1`): few items,
//! one repetition, for CI.
//!
//! ```text
//! cargo bench --bench durable --features sqlite
//! ```

mod common;
use common::{cpu_time, median, quick, verdict};

use std::time::{Duration, Instant};

use bergtalzug::prelude::*;
use bergtalzug::queue::{Durability, QueueOptions, WorkQueue};

#[derive(Clone, Copy, PartialEq)]
enum Feed {
    Memory,
    Queue(Durability),
}

impl Feed {
    fn name(self) -> &'static str {
        match self {
            Feed::Memory => "in-memory",
            Feed::Queue(Durability::Full) => "queue Full",
            Feed::Queue(_) => "queue Normal",
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Shape {
    Trivial,
    IoBound,
}

/// (wchar, write_bytes) of this process so far.
fn io_written() -> (u64, u64) {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    let field = |name: &str| {
        io.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (field("wchar:"), field("write_bytes:"))
}

struct Measured {
    seconds: f64,
    cpu: Duration,
    wchar: u64,
    write_bytes: u64,
}

async fn run(shape: Shape, feed: Feed, n: u64) -> Measured {
    let dir = tempfile::tempdir().expect("a temp dir");
    let queue = match feed {
        Feed::Memory => None,
        Feed::Queue(durability) => {
            let url = format!("sqlite:{}", dir.path().join("bench.db").display());
            let queue = WorkQueue::open(&url, QueueOptions::default().durability(durability))
                .expect("queue opens");
            queue
                .enqueue((0..n).map(|i| (format!("i{i}"), i)))
                .await
                .expect("enqueue");
            Some(queue)
        }
    };
    let stages = match shape {
        Shape::Trivial => (0..4)
            .map(|i| {
                StageConfig::new(format!("s{i}"), ExecutionType::Async)
                    .workers(4)
                    .queue_size(100)
            })
            .collect(),
        Shape::IoBound => vec![
            StageConfig::new("s0", ExecutionType::Async)
                .workers(64)
                .queue_size(128),
        ],
    };
    let config = PipelineConfig::new("durable-bench", stages)
        .stats_interval(Duration::ZERO)
        .retain_results(false);
    let (cpu0, (w0, b0), start) = (cpu_time(), io_written(), Instant::now());
    let builder = Pipeline::builder(config).expect("valid config");
    let builder = match &queue {
        None => builder.source(sources::iter(0..n)),
        Some(queue) => builder.source(queue.source::<u64>().expect("a consumer")),
    };
    let pipeline = match shape {
        Shape::Trivial => builder
            .async_stage("s0", |i: WorkItem<u64>| async move { Ok(i.map(|n| n + 1)) })
            .async_stage("s1", |i: WorkItem<u64>| async move { Ok(i.map(|n| n + 1)) })
            .async_stage("s2", |i: WorkItem<u64>| async move { Ok(i.map(|n| n + 1)) })
            .async_stage("s3", |i: WorkItem<u64>| async move { Ok(i.map(|n| n + 1)) })
            .build(),
        Shape::IoBound => builder
            .async_stage("s0", |i: WorkItem<u64>| async move {
                tokio::time::sleep(Duration::from_millis(1 + i.data % 10)).await;
                Ok(i)
            })
            .build(),
    }
    .expect("pipeline builds");
    pipeline.run().await.expect("pipeline runs");
    let seconds = start.elapsed().as_secs_f64();
    let (w1, b1) = io_written();
    let cpu = cpu_time()
        .zip(cpu0)
        .map_or(Duration::ZERO, |(b, a)| b.saturating_sub(a));
    let stats = pipeline.stats().await.expect("stats");
    assert_eq!(stats.completed_items, n, "every item succeeded");
    if let Some(queue) = &queue {
        let counts = queue.counts().await.expect("counts");
        assert_eq!((counts.done, counts.leased, counts.pending), (n, 0, 0));
    }
    Measured {
        seconds,
        cpu,
        wchar: w1 - w0,
        write_bytes: b1 - b0,
    }
}

fn main() {
    let quick = quick();
    let reps = if quick { 1 } else { 3 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let feeds = [
        Feed::Memory,
        Feed::Queue(Durability::Full),
        Feed::Queue(Durability::Normal),
    ];
    for (shape, n) in [
        (Shape::Trivial, if quick { 2_000 } else { 100_000 }),
        (Shape::IoBound, if quick { 500 } else { 20_000 }),
    ] {
        let title = match shape {
            Shape::Trivial => "trivial 4x4",
            Shape::IoBound => "I/O-bound (64 workers, 1-10 ms)",
        };
        println!("\n{title}, {n} items, median of {reps}");
        println!(
            "{:<14} {:>12} {:>10} {:>14} {:>14} {:>16}",
            "variant", "items/s", "vs memory", "CPU us/item", "wchar B/item", "storage B/item"
        );
        // Warm-up.
        runtime.block_on(run(shape, Feed::Memory, n.min(1_000)));
        let mut rows: Vec<(Feed, Vec<Measured>)> = feeds.iter().map(|f| (*f, vec![])).collect();
        for _ in 0..reps {
            for (feed, runs) in &mut rows {
                runs.push(runtime.block_on(run(shape, *feed, n)));
            }
        }
        let rate = |runs: &[Measured]| {
            median(
                &runs
                    .iter()
                    .map(|m| n as f64 / m.seconds)
                    .collect::<Vec<_>>(),
            )
        };
        let memory_rate = rate(&rows[0].1);
        for (feed, runs) in &rows {
            let per = |f: &dyn Fn(&Measured) -> f64| {
                median(&runs.iter().map(f).collect::<Vec<_>>()) / n as f64
            };
            let r = rate(runs);
            println!(
                "{:<14} {:>12.0} {:>9.1}% {:>14.1} {:>14.0} {:>16.0}",
                feed.name(),
                r,
                (memory_rate / r - 1.0) * 100.0,
                per(&|m| m.cpu.as_secs_f64() * 1e6),
                per(&|m| m.wchar as f64),
                per(&|m| m.write_bytes as f64),
            );
        }
        if shape == Shape::IoBound {
            for (feed, runs) in rows.iter().skip(1) {
                let cost = memory_rate / rate(runs) - 1.0;
                println!(
                    "target: {} costs under 5 % on the I/O-bound pipeline: {} ({:.1} %)",
                    feed.name(),
                    verdict(cost < 0.05),
                    cost * 100.0
                );
            }
        }
    }
}
