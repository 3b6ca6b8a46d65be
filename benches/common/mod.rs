//! Helpers shared by the benchmarks.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bergtalzug::prelude::*;
use tokio::sync::{Mutex, mpsc};

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
    mpmc_of::<u64, F, Fut>(stages, workers, queue, n, f).await
}

/// [`mpmc`] carrying items of any [`Item`] type: the feeder makes them
/// with [`Item::new`], the last stage counts their [`Item::value`].
pub async fn mpmc_of<T, F, Fut>(
    stages: usize,
    workers: usize,
    queue: usize,
    n: u64,
    f: F,
) -> Duration
where
    T: Item,
    F: Fn(T) -> Fut + Copy + Send + 'static,
    Fut: Future<Output = T> + Send,
{
    let start = Instant::now();
    let tally = Arc::new(Tally::default());
    let (feed, first) = async_channel::bounded::<T>(queue);
    let mut input = first;
    let mut last = Vec::new();
    for stage in 0..stages {
        let out = (stage + 1 < stages).then(|| async_channel::bounded::<T>(queue));
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
                        None => tally.add(y.value()),
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
            if feed.send(T::new(i)).await.is_err() {
                break;
            }
        }
    });
    join_all(last).await;
    let elapsed = start.elapsed();
    tally.check(n, stages, "mpmc");
    elapsed
}

/// The system's load average over 1, 5 and 15 minutes, from `/proc/loadavg`
/// (the benches' own threads count too), or `unavailable`.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unavailable".into())
}

/// Prints the load average taken before the runs (`before`) and now.
pub fn print_load(before: &str) {
    println!(
        "load average (1, 5, 15 min): {before} before the runs, {} after",
        load_average()
    );
}

/// CPU-bound work: `rounds` dependent multiply / rotate / xor steps seeded
/// by `x`; `std::hint::black_box` on its input, round count and output
/// keeps the optimizer from removing or folding it.
pub fn crunch(x: u64, rounds: u64) -> u64 {
    let mut h = black_box(x) ^ 0x9E37_79B9_7F4A_7C15;
    for i in 0..black_box(rounds) {
        h = (h ^ i).wrapping_mul(0xBF58_476D_1CE4_E5B9).rotate_left(27);
    }
    black_box(h)
}

/// Rounds that make one call of [`crunch`] take about `work` on this
/// machine (the best of five timings of 100 calls, on the calling thread).
pub fn calibrate(work: Duration) -> u64 {
    let mut rounds = 10_000u64;
    loop {
        let start = Instant::now();
        for x in 0..100 {
            crunch(x, rounds);
        }
        let per_call = start.elapsed() / 100;
        if per_call >= Duration::from_millis(1) / 100 {
            let best = (0..5)
                .map(|_| {
                    let start = Instant::now();
                    for x in 0..100 {
                        crunch(x, rounds);
                    }
                    start.elapsed() / 100
                })
                .min()
                .expect("five runs");
            return ((rounds as f64 * work.as_secs_f64() / best.as_secs_f64()) as u64).max(1);
        }
        rounds *= 4;
    }
}

/// The time of one call of [`crunch`] with `rounds` on this thread: the
/// best of 10 means over 100 calls each, so that other load on the machine
/// (a preemption in one batch) does not inflate it.
pub fn time_crunch(rounds: u64) -> Duration {
    (0..10)
        .map(|_| {
            let start = Instant::now();
            for x in 0..100 {
                crunch(x, rounds);
            }
            start.elapsed() / 100
        })
        .min()
        .expect("ten batches")
}

/// What the 4 x 4 pipelines carry: made from its index by the source, passed
/// on by value (a move, never a copy of what it owns), stepped by every
/// stage's handler (its value goes up by 1) and counted by its value in the
/// last stage ([`Tally::check`] then knows whether an item was lost).
pub trait Item: Send + 'static {
    /// How the bench's header names the item.
    const NAME: &'static str;
    /// The item with index `i`; its value is `i`.
    fn new(i: u64) -> Self;
    /// A stage's handler: the same item, its value 1 higher.
    fn step(self) -> Self;
    /// The value the last stage counts.
    fn value(&self) -> u64;
}

impl Item for u64 {
    const NAME: &'static str = "u64 items";

    fn new(i: u64) -> u64 {
        i
    }

    fn step(self) -> u64 {
        self + 1
    }

    fn value(&self) -> u64 {
        *self
    }
}

/// Bytes in a [`Payload`].
pub const PAYLOAD_BYTES: usize = 4096;

/// 4 KiB on the heap behind one pointer: moving the item moves 8 bytes,
/// and nothing copies the 4 KiB. Its value is the little-endian `u64` in
/// its first 8 bytes, which a stage's handler reads and writes (touching
/// the payload cheaply, as a handler that bumps a counter in a record).
pub struct Payload(Box<[u8; PAYLOAD_BYTES]>);

impl Item for Payload {
    const NAME: &'static str = "4 KiB payloads (Box<[u8; 4096]>)";

    fn new(i: u64) -> Payload {
        let mut bytes: Box<[u8; PAYLOAD_BYTES]> = vec![0u8; PAYLOAD_BYTES]
            .into_boxed_slice()
            .try_into()
            .expect("PAYLOAD_BYTES bytes");
        bytes[..8].copy_from_slice(&i.to_le_bytes());
        Payload(bytes)
    }

    fn step(mut self) -> Payload {
        let next = self.value() + 1;
        self.0[..8].copy_from_slice(&next.to_le_bytes());
        self
    }

    fn value(&self) -> u64 {
        u64::from_le_bytes(self.0[..8].try_into().expect("8 bytes"))
    }
}

/// The shape of `benches/throughput.rs` and `benches/payload.rs`: stages,
/// workers per stage, queue per stage.
pub const CHAIN_STAGES: usize = 4;
pub const CHAIN_WORKERS: usize = 4;
pub const CHAIN_QUEUE: usize = 100;
/// Most items a batched hand-written worker takes at once.
pub const CHAIN_BATCH: usize = 16;
/// Channel capacity of the batched baseline: with `CHAIN_WORKERS *
/// CHAIN_BATCH` items in hand, a stage holds `CHAIN_QUEUE + CHAIN_WORKERS`
/// at most, as a bergtalzug stage does.
pub const CHAIN_BATCH_QUEUE: usize = CHAIN_QUEUE + CHAIN_WORKERS - CHAIN_WORKERS * CHAIN_BATCH;

/// The variants of the 4 x 4 pipeline, by hand and with bergtalzug (their
/// doc: `benches/throughput.rs`). Each carries items of any [`Item`]
/// type and ends in its last stage.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Chain {
    Mpmc,
    SharedRx,
    RoundRobin,
    Batched,
    Tracking(bool),
}

impl Chain {
    pub const ALL: [Chain; 6] = [
        Chain::Mpmc,
        Chain::SharedRx,
        Chain::RoundRobin,
        Chain::Batched,
        Chain::Tracking(true),
        Chain::Tracking(false),
    ];

    pub fn name(self) -> &'static str {
        match self {
            Chain::Mpmc => "async-channel mpmc (baseline)",
            Chain::SharedRx => "tokio shared rx (baseline)",
            Chain::RoundRobin => "tokio rr channels (baseline)",
            Chain::Batched => "tokio batched (baseline)",
            Chain::Tracking(true) => "bergtalzug tracking on",
            Chain::Tracking(false) => "bergtalzug tracking off",
        }
    }

    /// One run of `n` items; the time from before the pipeline is built
    /// until every item was counted. Panics if an item was lost or failed.
    pub async fn run<T: Item>(self, n: u64) -> Duration {
        match self {
            Chain::Mpmc => mpmc_of(CHAIN_STAGES, CHAIN_WORKERS, CHAIN_QUEUE, n, step::<T>).await,
            Chain::SharedRx => shared_rx::<T>(n).await,
            Chain::RoundRobin => round_robin::<T>(n).await,
            Chain::Batched => shared_rx_batched::<T>(n).await,
            Chain::Tracking(on) => bergtalzug_chain::<T>(n, on).await,
        }
    }
}

async fn step<T: Item>(x: T) -> T {
    x.step()
}

/// Hand-written: one bounded channel per stage, its workers share the
/// receiver behind a tokio mutex.
async fn shared_rx<T: Item>(n: u64) -> Duration {
    let start = Instant::now();
    let tally = Arc::new(Tally::default());
    let (feed, first) = mpsc::channel::<T>(CHAIN_QUEUE);
    let mut input = Arc::new(Mutex::new(first));
    let mut last = Vec::new();
    for stage in 0..CHAIN_STAGES {
        let (tx, rx) = mpsc::channel::<T>(CHAIN_QUEUE);
        let is_last = stage + 1 == CHAIN_STAGES;
        for _ in 0..CHAIN_WORKERS {
            let input = input.clone();
            let tx = (!is_last).then(|| tx.clone());
            let tally = tally.clone();
            let task = tokio::spawn(async move {
                loop {
                    let next = input.lock().await.recv().await;
                    let Some(x) = next else { break };
                    match &tx {
                        Some(tx) => {
                            if tx.send(x.step()).await.is_err() {
                                break;
                            }
                        }
                        None => tally.add(x.step().value()),
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
            if feed.send(T::new(i)).await.is_err() {
                break;
            }
        }
    });
    join_all(last).await;
    let elapsed = start.elapsed();
    tally.check(n, CHAIN_STAGES, "shared rx");
    elapsed
}

/// Hand-written, batched: as [`shared_rx`], but a worker takes what is
/// ready (up to `CHAIN_BATCH`) in one lock, and reserves room for all of
/// it in the next channel before sending.
async fn shared_rx_batched<T: Item>(n: u64) -> Duration {
    let start = Instant::now();
    let tally = Arc::new(Tally::default());
    let (feed, first) = mpsc::channel::<T>(CHAIN_BATCH_QUEUE);
    let mut input = Arc::new(Mutex::new(first));
    let mut last = Vec::new();
    for stage in 0..CHAIN_STAGES {
        let (tx, rx) = mpsc::channel::<T>(CHAIN_BATCH_QUEUE);
        let is_last = stage + 1 == CHAIN_STAGES;
        for _ in 0..CHAIN_WORKERS {
            let input = input.clone();
            let tx = (!is_last).then(|| tx.clone());
            let tally = tally.clone();
            let task = tokio::spawn(async move {
                let mut batch = Vec::with_capacity(CHAIN_BATCH);
                loop {
                    batch.clear();
                    if input.lock().await.recv_many(&mut batch, CHAIN_BATCH).await == 0 {
                        break;
                    }
                    let Some(tx) = &tx else {
                        tally.add_many(batch.drain(..).map(|x| x.step().value()));
                        continue;
                    };
                    let Ok(permits) = tx.reserve_many(batch.len()).await else {
                        break;
                    };
                    for (permit, x) in permits.zip(batch.drain(..)) {
                        permit.send(x.step());
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
            let k = (n - next).min(CHAIN_BATCH as u64);
            let Ok(permits) = feed.reserve_many(k as usize).await else {
                break;
            };
            for (permit, i) in permits.zip(next..next + k) {
                permit.send(T::new(i));
            }
            next += k;
        }
    });
    join_all(last).await;
    let elapsed = start.elapsed();
    tally.check(n, CHAIN_STAGES, "batched shared rx");
    elapsed
}

/// Sends each item to the next of `outs` in turn; false once they closed.
async fn send_round_robin<T: Item>(outs: &[mpsc::Sender<T>], next: &mut usize, x: T) -> bool {
    let ok = outs[*next].send(x).await.is_ok();
    *next = (*next + 1) % outs.len();
    ok
}

/// Hand-written: one bounded channel per worker (`CHAIN_QUEUE /
/// CHAIN_WORKERS` each), every sender deals its items round-robin over the
/// next stage's workers.
async fn round_robin<T: Item>(n: u64) -> Duration {
    let start = Instant::now();
    let tally = Arc::new(Tally::default());
    // Built from the last stage back, so each stage knows its downstream;
    // the last stage's workers count what they finish.
    let mut downstream: Vec<mpsc::Sender<T>> = Vec::new();
    let mut last = Vec::new();
    for stage in (0..CHAIN_STAGES).rev() {
        let mut inputs = Vec::with_capacity(CHAIN_WORKERS);
        for _ in 0..CHAIN_WORKERS {
            let (tx, mut rx) = mpsc::channel::<T>(CHAIN_QUEUE / CHAIN_WORKERS);
            inputs.push(tx);
            let outs = downstream.clone();
            let tally = tally.clone();
            let task = tokio::spawn(async move {
                let mut next = 0;
                while let Some(x) = rx.recv().await {
                    if outs.is_empty() {
                        tally.add(x.step().value());
                    } else if !send_round_robin(&outs, &mut next, x.step()).await {
                        break;
                    }
                }
            });
            if stage + 1 == CHAIN_STAGES {
                last.push(task);
            }
        }
        downstream = inputs;
    }
    tokio::spawn(async move {
        let mut next = 0;
        for i in 0..n {
            if !send_round_robin(&downstream, &mut next, T::new(i)).await {
                break;
            }
        }
    });
    join_all(last).await;
    let elapsed = start.elapsed();
    tally.check(n, CHAIN_STAGES, "rr channels");
    elapsed
}

/// bergtalzug with the same shape: `sources::iter`, `Async` stages whose
/// handler is [`Item::step`], `retain_results(false)`, outcomes counted by
/// an `on_complete` callback; every item must succeed.
async fn bergtalzug_chain<T: Item>(n: u64, tracking: bool) -> Duration {
    let start = Instant::now();
    let stages = (0..CHAIN_STAGES)
        .map(|i| {
            StageConfig::new(format!("s{i}"), ExecutionType::Async)
                .workers(CHAIN_WORKERS)
                .queue_size(CHAIN_QUEUE)
        })
        .collect();
    let config = PipelineConfig::new("bench", stages)
        .stats_interval(Duration::ZERO)
        .enable_tracking(tracking)
        .retain_results(false);
    let succeeded = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let (ok, bad) = (succeeded.clone(), failed.clone());
    let mut builder = Pipeline::builder(config)
        .expect("valid config")
        .source(sources::iter((0..n).map(T::new)));
    for i in 0..CHAIN_STAGES {
        builder = builder.async_stage(&format!("s{i}"), |item: WorkItem<T>| async move {
            Ok(item.map(T::step))
        });
    }
    let pipeline = builder
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
pub fn selected<V: Copy>(all: &[V], name: fn(V) -> &'static str) -> Vec<V> {
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let chosen: Vec<V> = all
        .iter()
        .copied()
        .filter(|&v| name(v).contains(only.as_str()))
        .collect();
    assert!(
        !chosen.is_empty(),
        "BENCH_ONLY={only:?} matches no variant; they are: {:?}",
        all.iter().map(|&v| name(v)).collect::<Vec<_>>()
    );
    chosen
}

/// `BENCH_ITEMS`, the items per timed run, if set. Panics unless it is a
/// positive whole number.
pub fn items_override() -> Option<u64> {
    let text = std::env::var("BENCH_ITEMS")
        .ok()
        .filter(|t| !t.is_empty())?;
    match text.parse() {
        Ok(n) if n > 0 => Some(n),
        _ => panic!("BENCH_ITEMS={text:?} is not a positive number of items"),
    }
}

/// A tokio multi-thread runtime with 2 worker threads, as every bench uses.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Timed runs of every variant: items/s and process CPU ns per item, one
/// row per variant, each sorted.
pub struct Rounds<V> {
    pub variants: Vec<V>,
    pub rates: Vec<Vec<f64>>,
    pub cpu_ns: Vec<Vec<f64>>,
    name: fn(V) -> &'static str,
}

/// Runs every variant once on `warmup` items, then `reps` rounds in which
/// each variant in turn runs `items` (so a burst of load on the machine
/// hits all of them), each run a task on the runtime's workers, as a
/// pipeline's work is (the thread in `block_on` only waits for it). Prints
/// a line per timed run.
pub fn interleaved<V, F, Fut>(
    runtime: &tokio::runtime::Runtime,
    variants: &[V],
    name: fn(V) -> &'static str,
    (warmup, items, reps): (u64, u64, usize),
    run: F,
) -> Rounds<V>
where
    V: Copy,
    F: Fn(V, u64) -> Fut,
    Fut: Future<Output = Duration> + Send + 'static,
{
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut cpu_ns: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let on_workers = |variant: V, n: u64| {
        let task = tokio::spawn(run(variant, n));
        async move { task.await.expect("a variant panicked") }
    };
    runtime.block_on(async {
        for &variant in variants {
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
                    name(variant),
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
    Rounds {
        variants: variants.to_vec(),
        rates,
        cpu_ns,
        name,
    }
}

/// A column of ratios: each variant's median against the fastest median
/// of the variants in `of` that ran (`-` when none did).
pub struct Reference<V> {
    pub header: &'static str,
    pub of: Vec<V>,
}

impl<V: Copy + PartialEq> Rounds<V> {
    /// The median items/s of `v`, if it ran.
    pub fn median(&self, v: V) -> Option<f64> {
        let i = self.variants.iter().position(|&w| w == v)?;
        Some(median(&self.rates[i]))
    }

    /// The median CPU ns per item of `v`, if it ran and was measured.
    pub fn cpu(&self, v: V) -> Option<f64> {
        let i = self.variants.iter().position(|&w| w == v)?;
        (!self.cpu_ns[i].is_empty()).then(|| median(&self.cpu_ns[i]))
    }

    /// The fastest median of `of`, if any of them ran.
    pub fn reference(&self, of: &[V]) -> Option<f64> {
        of.iter().filter_map(|&v| self.median(v)).reduce(f64::max)
    }

    /// The table: median and best items/s, the median's ratio to each
    /// reference, and the median CPU ns per item.
    pub fn print_table(&self, references: &[Reference<V>]) {
        let refs: Vec<Option<f64>> = references.iter().map(|r| self.reference(&r.of)).collect();
        print!(
            "{:<30} {:>14} {:>14}",
            "variant", "median items/s", "best items/s"
        );
        for r in references {
            print!(" {:>12}", r.header);
        }
        println!(" {:>12}", "CPU ns/item");
        for (i, &v) in self.variants.iter().enumerate() {
            let med = median(&self.rates[i]);
            print!(
                "{:<30} {:>14.0} {:>14.0}",
                (self.name)(v),
                med,
                self.rates[i][self.rates[i].len() - 1]
            );
            for r in &refs {
                print!(" {:>12}", ratio(med, *r));
            }
            println!(
                " {:>12}",
                self.cpu(v).map_or("?".into(), |c| format!("{c:.0}"))
            );
        }
    }
}

/// A ratio for a table, or `-` when its reference was not run.
pub fn ratio(of: f64, to: Option<f64>) -> String {
    to.map_or("-".into(), |to| format!("{:.2}x", of / to))
}

/// Issue 14's targets for the 4 x 4 pipeline (trivial handlers or 4 KiB
/// payloads), against the batched hand-written pipeline of the same run:
/// tracking off at least 1.0x its items/s, tracking on at least 0.7x, and
/// tracking on's CPU per item at most 1.5x its. Prints one line per target
/// whose variants ran.
pub fn print_chain_targets(rounds: &Rounds<Chain>) {
    let batched = rounds.median(Chain::Batched);
    let batched_cpu = rounds.cpu(Chain::Batched);
    for (tracking, min) in [(false, 1.0), (true, 0.7)] {
        if let Some((med, b)) = rounds.median(Chain::Tracking(tracking)).zip(batched) {
            println!(
                "target (issue 14): {} {:.2}x tokio batched >= {min:.1}x: {}",
                Chain::Tracking(tracking).name(),
                med / b,
                verdict(med / b >= min)
            );
        }
    }
    if let Some((cpu, b)) = rounds.cpu(Chain::Tracking(true)).zip(batched_cpu) {
        println!(
            "target (issue 14): bergtalzug tracking on CPU/item {:.2}x tokio batched's <= 1.5x: {}",
            cpu / b,
            verdict(cpu / b <= 1.5)
        );
    }
}
