//! What the dashboard costs a pipeline: the 4-stage, 4-worker throughput
//! pipeline of `benches/throughput.rs` (trivial `n + 1` handlers, queues of
//! 100, tracking on, `retain_results(false)`, outcomes counted by a
//! callback) run three ways, interleaved in one process:
//!
//! - `dashboard off`: no dashboard (the baseline);
//! - `dashboard on, nobody watching`: served on loopback and watching the
//!   pipeline (its sampler reads `stats()` once a second), no client;
//! - `dashboard on, 5 viewers`: the same with five clients reading the
//!   event stream from the start (so the failures subscription is held the
//!   whole run) on a thread of their own in this process; their CPU counts
//!   in CPU ns/item, as a browser's would not;
//! - `failures subscription only`: no dashboard, but the subscription a
//!   watched dashboard holds (`subscribe_filtered(EventFilter::failures())`,
//!   read by a task): what of the cost of watching is the subscription's.
//!
//! Timed from the start of the run until every item was counted (the
//! pipeline is built, the dashboard started and the viewers connected
//! before the clock; the dashboard is shut down after it); 2 tokio worker
//! threads. Each variant runs 5 times after a warm-up; the
//! table shows the median and the best, the median's ratio to `off`, and
//! the median CPU time per item. Quick mode (`BENCH_QUICK=1` or
//! `--quick`): 20,000 items, one repetition, for CI.
//!
//! ```text
//! cargo bench --features dashboard --bench dashboard
//! BENCH_QUICK=1 cargo bench --features dashboard --bench dashboard
//! ```

mod common;
use common::{cpu_time, median};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bergtalzug::dashboard::Dashboard;
use bergtalzug::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const STAGES: usize = 4;
const WORKERS: usize = 4;
const QUEUE: usize = 100;
const VIEWERS: usize = 5;
const FULL_ITEMS: u64 = 2_000_000;
const FULL_REPS: usize = 5;
const QUICK_ITEMS: u64 = 20_000;
const WARMUP_ITEMS: u64 = 20_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Off,
    Idle,
    Watched,
    Subscribed,
}

impl Variant {
    const ALL: [Variant; 4] = [
        Variant::Off,
        Variant::Idle,
        Variant::Watched,
        Variant::Subscribed,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::Off => "dashboard off",
            Variant::Idle => "dashboard on, nobody watching",
            Variant::Watched => "dashboard on, 5 viewers",
            Variant::Subscribed => "failures subscription only",
        }
    }
}

fn pipeline(n: u64, ok: Arc<AtomicU64>) -> Pipeline<u64> {
    let stages = (0..STAGES)
        .map(|i| {
            StageConfig::new(format!("s{i}"), ExecutionType::Async)
                .workers(WORKERS)
                .queue_size(QUEUE)
        })
        .collect();
    let config = PipelineConfig::new("bench", stages)
        .stats_interval(Duration::ZERO)
        .retain_results(false);
    Pipeline::builder(config)
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
            if r.success {
                ok.fetch_add(1, Ordering::Relaxed);
            }
        })
        .build()
        .expect("pipeline builds")
}

/// `n` clients reading `/api/events` on a thread of their own; returns
/// once each has its `hello`. The thread ends when the server closes them,
/// giving the bytes they read.
fn viewers(addr: SocketAddr, n: usize) -> std::thread::JoinHandle<u64> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("client runtime");
        runtime.block_on(async move {
            let mut readers = Vec::new();
            for _ in 0..n {
                let ready = ready_tx.clone();
                readers.push(tokio::spawn(async move {
                    let mut stream = tokio::net::TcpStream::connect(addr)
                        .await
                        .expect("connects");
                    let request = format!("GET /api/events HTTP/1.1\r\nHost: {addr}\r\n\r\n");
                    stream.write_all(request.as_bytes()).await.expect("asks");
                    let mut chunk = vec![0u8; 1 << 16];
                    let (mut bytes, mut said) = (0u64, false);
                    while let Ok(k) = stream.read(&mut chunk).await {
                        if k == 0 {
                            break;
                        }
                        bytes += k as u64;
                        if !said && chunk[..k].windows(12).any(|w| w == b"event: hello") {
                            said = true;
                            let _ = ready.send(());
                        }
                    }
                    bytes
                }));
            }
            let mut total = 0;
            for reader in readers {
                total += reader.await.unwrap_or(0);
            }
            total
        })
    });
    for _ in 0..n {
        ready_rx.recv().expect("a viewer connected");
    }
    thread
}

/// One run: the elapsed time and the bytes the viewers read.
async fn run(variant: Variant, n: u64) -> (Duration, u64) {
    let dashboard = match variant {
        Variant::Off | Variant::Subscribed => None,
        Variant::Idle | Variant::Watched => Some(
            Dashboard::serve("127.0.0.1:0")
                .await
                .expect("the dashboard binds"),
        ),
    };
    let ok = Arc::new(AtomicU64::new(0));
    let pipeline = pipeline(n, ok.clone());
    let clients = match (&dashboard, variant) {
        (Some(dashboard), _) => {
            dashboard.watch(&pipeline);
            (variant == Variant::Watched).then(|| viewers(dashboard.local_addr(), VIEWERS))
        }
        (None, _) => None,
    };
    let start = Instant::now();
    let subscription = (variant == Variant::Subscribed).then(|| {
        let mut events = pipeline.subscribe_filtered(EventFilter::failures());
        tokio::spawn(async move { while events.recv().await.is_some() {} })
    });
    let results = pipeline.run().await.expect("pipeline runs");
    let elapsed = start.elapsed();
    assert!(results.is_empty(), "retain_results is off");
    assert_eq!(ok.load(Ordering::Relaxed), n, "every item completes");
    if let Some(reader) = subscription {
        let _ = reader.await;
    }
    if let Some(dashboard) = dashboard {
        dashboard.shutdown();
    }
    let bytes = clients.map_or(0, |c| c.join().unwrap_or(0));
    (elapsed, bytes)
}

fn main() {
    let quick = common::quick();
    let (items, reps) = if quick {
        (QUICK_ITEMS, 1)
    } else {
        (FULL_ITEMS, FULL_REPS)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    println!(
        "dashboard: {STAGES} stages x {WORKERS} async workers, queue {QUEUE}, {items} u64 items, \
         {reps} rep(s), 2 tokio worker threads, {VIEWERS} viewers on a thread of their own{}",
        if quick { " (quick)" } else { "" }
    );
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); Variant::ALL.len()];
    let mut cpu_ns: Vec<Vec<f64>> = vec![Vec::new(); Variant::ALL.len()];
    runtime.block_on(async {
        for variant in Variant::ALL {
            run(variant, WARMUP_ITEMS.min(items)).await;
        }
        for rep in 0..reps {
            for (i, variant) in Variant::ALL.into_iter().enumerate() {
                let cpu_before = cpu_time();
                let (elapsed, bytes) = run(variant, items).await;
                let cpu = cpu_time()
                    .zip(cpu_before)
                    .map(|(after, before)| (after - before).as_nanos() as f64 / items as f64);
                let rate = items as f64 / elapsed.as_secs_f64();
                println!(
                    "  rep {}: {:<30} {:>8.1} ms {:>12.0} items/s {:>6} CPU ns/item {:>9} bytes to viewers",
                    rep + 1,
                    variant.name(),
                    elapsed.as_secs_f64() * 1e3,
                    rate,
                    cpu.map_or("?".into(), |c| format!("{c:.0}")),
                    bytes
                );
                rates[i].push(rate);
                cpu_ns[i].extend(cpu);
            }
        }
    });
    for r in rates.iter_mut().chain(&mut cpu_ns) {
        r.sort_by(f64::total_cmp);
    }
    let off = median(&rates[0]);
    println!();
    println!(
        "{:<30} {:>14} {:>14} {:>8} {:>12}",
        "variant", "median items/s", "best items/s", "/off", "CPU ns/item"
    );
    for ((variant, r), cpu) in Variant::ALL.into_iter().zip(&rates).zip(&cpu_ns) {
        let med = median(r);
        println!(
            "{:<30} {:>14.0} {:>14.0} {:>7.3}x {:>12}",
            variant.name(),
            med,
            r[r.len() - 1],
            med / off,
            if cpu.is_empty() {
                "?".into()
            } else {
                format!("{:.0}", median(cpu))
            }
        );
    }
    println!(
        "(/off = ratio of medians to `dashboard off`; CPU ns/item = median process CPU time \
         per item, every thread, 10 ms ticks)"
    );
}
