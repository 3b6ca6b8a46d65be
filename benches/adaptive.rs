//! Adaptive concurrency against a simulated service whose concurrency limit
//! the stage does not know, beside the sweep of fixed worker counts that a
//! user would otherwise have to run.
//!
//! The service (in process, tokio timers, real time): up to 32 calls at
//! once take 10 ms each; past 32 it queues (a call takes 10 ms x in flight
//! / 32), so its throughput is at best 3,200 calls/s whatever the
//! concurrency beyond 32. A second service fails the calls over 32 at once
//! (after 1 ms) instead.
//!
//! - the sweep (the baseline): one `Async` stage with 4 to 128 fixed
//!   workers, `queue_size` 256, each for the run's length; throughput
//!   counted after the first fifth (warm-up);
//! - adaptive: the same stage with `adaptive(1, 256)`, starting at 4
//!   workers; its worker count and throughput sampled every 50 ms;
//! - adaptive against the failing service, starting at 128 of at most 128.
//!
//! Prints the sweep, the adaptive runs, and writes the plot of worker count
//! and throughput over time to `docs/adaptive-concurrency.svg` (quick mode:
//! `target/adaptive-concurrency.svg`).
//!
//! ```sh
//! cargo bench --bench adaptive            # 3 s per run
//! BENCH_QUICK=1 cargo bench --bench adaptive
//! ```

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bergtalzug::prelude::*;

struct Service {
    in_flight: AtomicUsize,
    limit: usize,
    base: Duration,
    fails: bool,
}

impl Service {
    fn new(fails: bool) -> Arc<Self> {
        Arc::new(Service {
            in_flight: AtomicUsize::new(0),
            limit: 32,
            base: Duration::from_millis(10),
            fails,
        })
    }

    async fn call(&self) -> anyhow::Result<()> {
        let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let result = if self.fails && n > self.limit {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Err(anyhow::anyhow!("overloaded"))
        } else {
            let load = (n as f64 / self.limit as f64).max(1.0);
            tokio::time::sleep(self.base.mul_f64(load)).await;
            Ok(())
        };
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

/// One run: (seconds, workers, items/s over the last sample, failures so far).
struct Run {
    samples: Vec<(f64, usize, f64, u64)>,
    /// Items completed per second after the warm-up.
    throughput: f64,
    failed: u64,
}

async fn run(stage: StageConfig, service: Arc<Service>, length: Duration) -> Run {
    let config = PipelineConfig::new("adaptive", vec![stage])
        .stats_interval(Duration::ZERO)
        .retain_results(false);
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(0u64..))
        .async_stage("call", move |item: WorkItem<u64>| {
            let service = service.clone();
            async move {
                service.call().await?;
                Ok(item)
            }
        })
        .build()
        .unwrap();
    pipeline.start().await.unwrap();
    let began = Instant::now();
    let warm = length / 5;
    let mut samples = Vec::new();
    let (mut last_done, mut last_at) = (0u64, 0.0);
    let mut at_warm = None;
    while began.elapsed() < length {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let stats = pipeline.stats().await.unwrap();
        let at = began.elapsed().as_secs_f64();
        let done = stats.completed_items - stats.failed_items;
        let rate = (done - last_done) as f64 / (at - last_at);
        samples.push((at, stats.stages[0].workers, rate, stats.failed_items));
        if at_warm.is_none() && began.elapsed() >= warm {
            at_warm = Some((at, done));
        }
        (last_done, last_at) = (done, at);
    }
    let (warm_at, warm_done) = at_warm.unwrap_or((0.0, 0));
    let throughput = (last_done - warm_done) as f64 / (last_at - warm_at);
    let failed = pipeline.stats().await.unwrap().failed_items;
    pipeline.abort().await.unwrap();
    Run {
        samples,
        throughput,
        failed,
    }
}

fn stage(workers: usize) -> StageConfig {
    StageConfig::new("call", ExecutionType::Async)
        .workers(workers)
        .queue_size(256)
}

/// The plot: worker count (left axis) and throughput (right axis) over
/// time, for both adaptive runs, with the best fixed throughput marked.
fn svg(adaptive: &Run, failing: &Run, sweep: &[(usize, f64)], length: f64) -> String {
    let (w, h, pad) = (900.0, 420.0, 60.0);
    let max_workers = 128.0;
    let max_rate = 4000.0;
    let x = |t: f64| pad + (w - 2.0 * pad) * t / length;
    let yw = |c: f64| h - pad - (h - 2.0 * pad) * c / max_workers;
    let yr = |r: f64| h - pad - (h - 2.0 * pad) * r.min(max_rate) / max_rate;
    let line = |points: Vec<(f64, f64)>, colour: &str, dash: &str| {
        let pts: Vec<String> = points
            .iter()
            .map(|(a, b)| format!("{a:.1},{b:.1}"))
            .collect();
        format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\" points=\"{}\"/>\n",
            pts.join(" ")
        )
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(s, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    let _ = writeln!(
        s,
        "<text x=\"{pad}\" y=\"24\" font-size=\"15\">Adaptive concurrency against a service with a hidden limit of 32 (10 ms per call below it)</text>"
    );
    // Axes and grid.
    for c in [0.0, 32.0, 64.0, 96.0, 128.0] {
        let y = yw(c);
        let _ = writeln!(
            s,
            "<line x1=\"{pad}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{c}</text>",
            w - pad,
            pad - 6.0,
            y + 4.0
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\">{:.0}</text>",
            w - pad + 6.0,
            y + 4.0,
            c / max_workers * max_rate
        );
    }
    let mut t = 0.0;
    while t <= length + 1e-9 {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{t:.1} s</text>",
            x(t),
            h - pad + 18.0
        );
        t += (length / 6.0).max(0.1);
    }
    let _ = writeln!(
        s,
        "<text x=\"14\" y=\"{:.1}\" transform=\"rotate(-90 14 {:.1})\" text-anchor=\"middle\">workers</text>",
        h / 2.0,
        h / 2.0
    );
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" transform=\"rotate(90 {:.1} {:.1})\" text-anchor=\"middle\">items/s</text>",
        w - 12.0,
        h / 2.0,
        w - 12.0,
        h / 2.0
    );
    // The best fixed throughput.
    let best = sweep
        .iter()
        .cloned()
        .fold((0, 0.0), |a, b| if b.1 > a.1 { b } else { a });
    let y = yr(best.1);
    let _ = writeln!(
        s,
        "<line x1=\"{pad}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#999\" stroke-dasharray=\"2 3\"/><text x=\"{:.1}\" y=\"{:.1}\" fill=\"#666\">best fixed: {} workers, {:.0}/s</text>",
        w - pad,
        pad + 6.0,
        y - 5.0,
        best.0,
        best.1
    );
    s += &line(
        adaptive
            .samples
            .iter()
            .map(|p| (x(p.0), yw(p.1 as f64)))
            .collect(),
        "#1f77b4",
        "none",
    );
    s += &line(
        adaptive.samples.iter().map(|p| (x(p.0), yr(p.2))).collect(),
        "#ff7f0e",
        "none",
    );
    s += &line(
        failing
            .samples
            .iter()
            .map(|p| (x(p.0), yw(p.1 as f64)))
            .collect(),
        "#2ca02c",
        "6 3",
    );
    let legend = [
        ("#1f77b4", "none", "workers (adaptive)"),
        ("#ff7f0e", "none", "throughput (adaptive), right axis"),
        (
            "#2ca02c",
            "6 3",
            "workers (adaptive, service failing over 32)",
        ),
    ];
    for (i, (colour, dash, label)) in legend.iter().enumerate() {
        let y = 44.0 + 16.0 * i as f64;
        let _ = writeln!(
            s,
            "<line x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"{colour}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\"/><text x=\"{:.1}\" y=\"{:.1}\">{label}</text>",
            w - 360.0,
            w - 330.0,
            w - 324.0,
            y + 4.0
        );
    }
    s += "</svg>\n";
    s
}

fn main() {
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    let length = if quick {
        Duration::from_millis(600)
    } else {
        Duration::from_secs(3)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!("sweep: fixed workers against the service (limit 32, 10 ms), {length:?} each");
        println!("{:>8} {:>12}", "workers", "items/s");
        let mut sweep = Vec::new();
        for workers in [4, 8, 16, 24, 32, 48, 64, 128] {
            let r = run(stage(workers), Service::new(false), length).await;
            println!("{workers:>8} {:>12.0}", r.throughput);
            sweep.push((workers, r.throughput));
        }
        let best = sweep.iter().cloned().fold((0, 0.0), |a, b| if b.1 > a.1 { b } else { a });
        let adaptive = run(stage(4).adaptive(1, 256), Service::new(false), length).await;
        let settled: Vec<usize> = adaptive
            .samples
            .iter()
            .filter(|p| p.0 >= length.as_secs_f64() / 5.0)
            .map(|p| p.1)
            .collect();
        println!(
            "adaptive (1..=256, from 4): {:.0} items/s = {:.0} % of the best fixed ({} workers, {:.0}/s); workers after the warm-up: {}..={}",
            adaptive.throughput,
            100.0 * adaptive.throughput / best.1,
            best.0,
            best.1,
            settled.iter().min().unwrap_or(&0),
            settled.iter().max().unwrap_or(&0)
        );
        let fixed_failing = run(stage(128), Service::new(true), length).await;
        let failing = run(stage(128).adaptive(1, 128), Service::new(true), length).await;
        let late: Vec<usize> = failing
            .samples
            .iter()
            .filter(|p| p.0 >= length.as_secs_f64() / 5.0)
            .map(|p| p.1)
            .collect();
        println!(
            "failing over 32: 128 fixed workers: {:.0} items/s, {} failed; adaptive (from 128): {:.0} items/s, {} failed, workers after the warm-up {}..={}",
            fixed_failing.throughput,
            fixed_failing.failed,
            failing.throughput,
            failing.failed,
            late.iter().min().unwrap_or(&0),
            late.iter().max().unwrap_or(&0)
        );
        let path = if quick {
            "target/adaptive-concurrency.svg"
        } else {
            "docs/adaptive-concurrency.svg"
        };
        let plot = svg(&adaptive, &failing, &sweep, length.as_secs_f64());
        std::fs::write(path, plot).unwrap();
        println!("plot: {path}");
    });
}
