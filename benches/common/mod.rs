//! Helpers shared by the benchmarks.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// What the last stage of a hand-written pipeline counted: it ends there,
/// as a bergtalzug pipeline ends in its last stage (whose results its
/// tracker counts on the runtime), with no collector task awaited on the
/// thread that called `block_on` (every item would cross to that thread).
#[derive(Debug, Default)]
pub struct Tally {
    count: AtomicU64,
    sum: AtomicU64,
}

impl Tally {
    /// One item out of the last stage.
    pub fn add(&self, x: u64) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(x, Ordering::Relaxed);
    }

    /// Items out of the last stage, and many at once.
    pub fn add_many(&self, xs: impl Iterator<Item = u64>) {
        let (mut n, mut s) = (0, 0);
        for x in xs {
            n += 1;
            s += x;
        }
        self.count.fetch_add(n, Ordering::Relaxed);
        self.sum.fetch_add(s, Ordering::Relaxed);
    }

    /// Panics unless `n` items came out of `stages` stages that each added 1.
    pub fn check(&self, n: u64, stages: usize, what: &str) {
        let expected = n * n.saturating_sub(1) / 2 + n * stages as u64;
        assert_eq!(
            (
                self.count.load(Ordering::Relaxed),
                self.sum.load(Ordering::Relaxed)
            ),
            (n, expected),
            "{what} lost items"
        );
    }
}

/// Waits for every task (the workers of a hand-written pipeline end when
/// their input closes).
pub async fn join_all(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for task in tasks {
        task.await.expect("a worker task panicked");
    }
}

/// The plainest hand-written pipeline, the baseline the issues describe:
/// one bounded multi-consumer channel (`async-channel`, capacity `queue`)
/// per stage, `workers` tokio tasks per stage, each running `f` on one item
/// at a time; the last stage's workers count what they finish ([`Tally`]).
/// `f` must add 1 (the sum of the outputs is checked); returns the time
/// from the first channel's creation until the last worker ended.
pub async fn mpmc<F, Fut>(stages: usize, workers: usize, queue: usize, n: u64, f: F) -> Duration
where
    F: Fn(u64) -> Fut + Copy + Send + 'static,
    Fut: Future<Output = u64> + Send,
{
    let start = Instant::now();
    let tally = Arc::new(Tally::default());
    let (feed, first) = async_channel::bounded::<u64>(queue);
    let mut input = first;
    let mut last = Vec::new();
    for stage in 0..stages {
        let out = (stage + 1 < stages).then(|| async_channel::bounded::<u64>(queue));
        for _ in 0..workers {
            let input = input.clone();
            let tx = out.as_ref().map(|(tx, _)| tx.clone());
            let tally = tally.clone();
            let task = tokio::spawn(async move {
                while let Ok(x) = input.recv().await {
                    let y = f(x).await;
                    match &tx {
                        Some(tx) => {
                            if tx.send(y).await.is_err() {
                                break;
                            }
                        }
                        None => tally.add(y),
                    }
                }
            });
            if out.is_none() {
                last.push(task);
            }
        }
        if let Some((_, rx)) = out {
            input = rx;
        }
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
    tally.check(n, stages, "mpmc");
    elapsed
}
