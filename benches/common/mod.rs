//! Helpers shared by the benchmarks.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::time::{Duration, Instant};

/// Quick mode (`BENCH_QUICK=1` or `--quick`): checks that a benchmark runs,
/// not its timings. `cargo bench` passes `--bench`; other arguments are ignored.
pub fn quick() -> bool {
    std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
        || std::env::args().any(|a| a == "--quick")
}

/// CPU time (user + system) of the whole process so far, from
/// `/proc/self/stat`, in clock ticks of 10 ms (Linux's `USER_HZ`).
pub fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses: state is
    // field 3, utime field 14, stime field 15.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// A field of `/proc/self/status` in KiB, e.g. `VmHWM` (peak RSS).
pub fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    line[field.len() + 1..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The median of the values, in any order.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// How a target reads in a bench's verdict line.
pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

/// The plainest hand-written pipeline, the baseline the issues describe:
/// one bounded multi-consumer channel (`async-channel`, capacity `queue`)
/// per stage, `workers` tokio tasks per stage, each running `f` on one item
/// at a time. `f` must add 1 (the sum of the outputs is checked); returns
/// the time from the first channel's creation to the last item out.
pub async fn mpmc<F, Fut>(stages: usize, workers: usize, queue: usize, n: u64, f: F) -> Duration
where
    F: Fn(u64) -> Fut + Copy + Send + 'static,
    Fut: Future<Output = u64> + Send,
{
    let start = Instant::now();
    let (feed, first) = async_channel::bounded::<u64>(queue);
    let mut input = first;
    for _ in 0..stages {
        let (tx, rx) = async_channel::bounded::<u64>(queue);
        for _ in 0..workers {
            let (input, tx) = (input.clone(), tx.clone());
            tokio::spawn(async move {
                while let Ok(x) = input.recv().await {
                    if tx.send(f(x).await).await.is_err() {
                        break;
                    }
                }
            });
        }
        input = rx;
    }
    tokio::spawn(async move {
        for i in 0..n {
            if feed.send(i).await.is_err() {
                break;
            }
        }
    });
    let (mut count, mut sum) = (0u64, 0u64);
    while let Ok(x) = input.recv().await {
        count += 1;
        sum += x;
    }
    let elapsed = start.elapsed();
    let expected = n * n.saturating_sub(1) / 2 + n * stages as u64;
    assert_eq!((count, sum), (n, expected), "mpmc lost items");
    elapsed
}
