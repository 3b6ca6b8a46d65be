//! Latency of one item through an idle 4-stage pipeline, and how long a
//! pipeline takes to start and to stop, against the same written by hand
//! with tokio.
//!
//! Per item: 4 `Async` stages (`workers(4).queue_size(100)`), handler
//! `n + 1` on a `u64`, `stats_interval` zero, fed only by
//! `Pipeline::inject` (`.injected::<u64>()`). One item at a time: the clock
//! starts just before `inject(vec![WorkItem::new(x)])` and stops in the
//! `on_complete` callback, which stamps `Instant::now()` and sends the stamp
//! on a tokio channel (`callback` columns); the measuring task also notes
//! when it received it (`awaited` columns). After each item the measuring
//! task sleeps 1 ms (tokio's timer granularity), so the pipeline is idle and
//! the runtime's threads park before the next item: this measures the cold
//! path, wake-ups included. The measuring task is a tokio task on the same
//! runtime (2 worker threads).
//!
//! - `tokio tasks (baseline)`: 4 tasks joined by bounded `mpsc` channels of
//!   100, each receiving, adding 1 and sending; the last sends
//!   `Instant::now()` on the completion channel.
//! - `ractor chain, 14 actors`: 14 bare ractor actors, each casting `n + 1`
//!   to the next, the last stamping `Instant::now()`: as many actor
//!   messages as one item takes through the pipeline (the injection to the
//!   source; per stage the batch to it, `Run` to a worker and the worker's
//!   report; the results to the tracker), with nothing else done. The
//!   floor of a design that moves an item by these messages.
//! - `bergtalzug tracking on` (the target) and `tracking off`.
//!
//! The variants take turns item by item, so load on the machine hits all,
//! in a new order each round (shuffled with a fixed seed). What ran just
//! before moves a variant's figures: in one fixed order (the table's), the
//! variant run right after the other bergtalzug pipeline took 11-26 us
//! less at p50 than the other, whichever of the two it was
//! (docs/performance.md).
//!
//! Start-up: building and `start()`ing a 4 x 16 pipeline (4 `Async`
//! stages, 16 workers each, queue 100, injected), then injecting one item
//! and waiting for its callback (`first item`: the pipeline really works),
//! then `stop()` (returns once every actor has stopped). The baseline
//! spawns 64 tokio tasks with 5 channels, sends one item through, then
//! closes the input and joins all 64 tasks. The runtime's count of alive
//! tasks is printed before and after, to show that nothing is left behind.
//!
//! Targets: per item, tracking on, p50 < 30 us and p99 < 100 us (issue 14;
//! it was 55–59 / 107–112 us; issue 6 had asked 100 us / 1 ms), printed
//! beside the hand-written chain's p50 and p99 of the same run; build +
//! start of the 4 x 16 pipeline < 5 ms (median; issue 6).
//!
//! Full: 2,000 items per variant, 50 start-ups. Quick mode (`BENCH_QUICK=1`
//! or `--quick`): 100 items, 5 start-ups, for CI.
//!
//! ```text
//! cargo bench --bench latency
//! BENCH_QUICK=1 cargo bench --bench latency
//! ```

mod common;
use common::verdict;
use std::time::{Duration, Instant};

use bergtalzug::prelude::*;
use tokio::sync::mpsc;

const STAGES: usize = 4;
const WORKERS: usize = 4;
const QUEUE: usize = 100;
const PAUSE: Duration = Duration::from_millis(1);
const FULL_SAMPLES: usize = 2_000;
const QUICK_SAMPLES: usize = 100;
const WARMUP_SAMPLES: usize = 50;
const STARTUP_WORKERS: usize = 16;
const FULL_STARTUPS: usize = 50;
const QUICK_STARTUPS: usize = 5;
/// Targets of issue 14 (per item) and issue 6 (start-up).
const P50_TARGET: Duration = Duration::from_micros(30);
const P99_TARGET: Duration = Duration::from_micros(100);
const STARTUP_TARGET: Duration = Duration::from_millis(5);

/// One item's trip: `(callback, awaited)` times since just before inject.
type Sample = (Duration, Duration);

/// Something one item at a time goes through.
enum Subject {
    Tokio {
        feed: mpsc::Sender<u64>,
        done: mpsc::UnboundedReceiver<Instant>,
    },
    Bergtalzug {
        pipeline: Pipeline<u64>,
        done: mpsc::UnboundedReceiver<Instant>,
    },
    Ractor {
        head: ractor::ActorRef<u64>,
        actors: Vec<(ractor::ActorCell, tokio::task::JoinHandle<()>)>,
        done: mpsc::UnboundedReceiver<Instant>,
    },
}

/// The actor messages one item takes through an idle pipeline of
/// [`STAGES`] stages: the injection to the source, then per stage the
/// batch to the stage, its `Run` to a worker and the worker's report, and
/// the results to the tracker.
const ACTOR_HOPS: usize = 2 + 3 * STAGES;
const _: () = assert!(ACTOR_HOPS == 14, "the variant's name says 14");

/// One actor of the bare ractor chain: adds 1 and casts to the next, or
/// stamps the time at the end.
struct Hop;

enum Next {
    Actor(ractor::ActorRef<u64>),
    Done(mpsc::UnboundedSender<Instant>),
}

impl ractor::Actor for Hop {
    type Msg = u64;
    type State = Next;
    type Arguments = Next;

    async fn pre_start(
        &self,
        _myself: ractor::ActorRef<u64>,
        next: Next,
    ) -> Result<Next, ractor::ActorProcessingErr> {
        Ok(next)
    }

    async fn handle(
        &self,
        _myself: ractor::ActorRef<u64>,
        x: u64,
        next: &mut Next,
    ) -> Result<(), ractor::ActorProcessingErr> {
        match next {
            Next::Actor(actor) => actor.cast(x + 1)?,
            Next::Done(done) => {
                std::hint::black_box(x);
                let _ = done.send(Instant::now());
            }
        }
        Ok(())
    }
}

impl Subject {
    /// The hand-written chain: 4 tasks joined by bounded channels.
    fn tokio() -> Subject {
        let (feed, mut rx) = mpsc::channel::<u64>(QUEUE);
        for _ in 0..STAGES - 1 {
            let (tx, next) = mpsc::channel::<u64>(QUEUE);
            tokio::spawn(async move {
                while let Some(x) = rx.recv().await {
                    if tx.send(x + 1).await.is_err() {
                        break;
                    }
                }
            });
            rx = next;
        }
        let (done_tx, done) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(x) = rx.recv().await {
                std::hint::black_box(x + 1);
                if done_tx.send(Instant::now()).is_err() {
                    break;
                }
            }
        });
        Subject::Tokio { feed, done }
    }

    /// [`ACTOR_HOPS`] bare ractor actors in a chain: what the messages an
    /// item takes cost with nothing else done per hop.
    async fn ractor() -> Subject {
        let (done_tx, done) = mpsc::unbounded_channel();
        let (mut head, handle) = ractor::Actor::spawn(None, Hop, Next::Done(done_tx))
            .await
            .expect("actor spawns");
        let mut actors = vec![(head.get_cell(), handle)];
        for _ in 1..ACTOR_HOPS {
            let (next, handle) = ractor::Actor::spawn(None, Hop, Next::Actor(head))
                .await
                .expect("actor spawns");
            actors.push((next.get_cell(), handle));
            head = next;
        }
        Subject::Ractor { head, actors, done }
    }

    /// The bergtalzug pipeline, started.
    async fn bergtalzug(stages: usize, workers: usize, tracking: bool) -> Subject {
        let (pipeline, done) = build(stages, workers, tracking);
        pipeline.start().await.expect("pipeline starts");
        Subject::Bergtalzug { pipeline, done }
    }

    /// Sends `x` through and waits for it to come out.
    async fn one(&mut self, x: u64) -> Sample {
        match self {
            Subject::Tokio { feed, done } => {
                let start = Instant::now();
                feed.send(x).await.expect("chain runs");
                let stamped = done.recv().await.expect("chain runs");
                (stamped - start, start.elapsed())
            }
            Subject::Bergtalzug { pipeline, done } => {
                let start = Instant::now();
                pipeline
                    .inject(vec![WorkItem::new(x)])
                    .await
                    .expect("pipeline takes the item");
                let stamped = done.recv().await.expect("pipeline runs");
                (stamped - start, start.elapsed())
            }
            Subject::Ractor { head, done, .. } => {
                let start = Instant::now();
                head.cast(x).expect("chain runs");
                let stamped = done.recv().await.expect("chain runs");
                (stamped - start, start.elapsed())
            }
        }
    }

    async fn close(self) {
        match self {
            Subject::Tokio { feed, mut done } => {
                drop(feed);
                while done.recv().await.is_some() {}
            }
            Subject::Bergtalzug { pipeline, .. } => pipeline.stop().await.expect("stops"),
            Subject::Ractor { actors, .. } => {
                for (cell, handle) in actors {
                    cell.stop(None);
                    handle.await.expect("actor stops");
                }
            }
        }
    }
}

/// An injected pipeline of `stages` Async stages with `workers` each; every
/// successful outcome sends its `Instant::now()` on the returned channel.
fn build(
    stages: usize,
    workers: usize,
    tracking: bool,
) -> (Pipeline<u64>, mpsc::UnboundedReceiver<Instant>) {
    let config = PipelineConfig::new(
        "latency",
        (0..stages)
            .map(|i| {
                StageConfig::new(format!("s{i}"), ExecutionType::Async)
                    .workers(workers)
                    .queue_size(QUEUE)
            })
            .collect(),
    )
    .stats_interval(Duration::ZERO)
    .enable_tracking(tracking)
    .retain_results(false);
    let mut builder = Pipeline::builder(config)
        .expect("valid config")
        .injected::<u64>();
    for i in 0..stages {
        builder = builder.async_stage(&format!("s{i}"), |item: WorkItem<u64>| async move {
            Ok(item.map(|n| n + 1))
        });
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let pipeline = builder
        .on_complete(move |r| {
            assert!(r.success, "item failed: {:?}", r.error);
            let _ = tx.send(Instant::now());
        })
        .build()
        .expect("pipeline builds");
    (pipeline, rx)
}

const VARIANTS: [&str; 4] = [
    "tokio tasks (baseline)",
    "ractor chain, 14 actors",
    "bergtalzug tracking on",
    "bergtalzug tracking off",
];

/// Per variant, `samples` items one at a time, variants taking turns.
async fn per_item(samples: usize) -> Vec<Vec<Sample>> {
    let mut subjects = vec![
        Subject::tokio(),
        Subject::ractor().await,
        Subject::bergtalzug(STAGES, WORKERS, true).await,
        Subject::bergtalzug(STAGES, WORKERS, false).await,
    ];
    let mut out = vec![Vec::with_capacity(samples); subjects.len()];
    // A new order each round (seeded: the same in every run). In one fixed
    // order the variant run right after the other bergtalzug pipeline took
    // 11-26 us less at p50 than the other, whichever of the two it was:
    // what ran before matters, and here each variant follows each in turn.
    let mut rng = fastrand::Rng::with_seed(14);
    let mut turns: Vec<usize> = (0..subjects.len()).collect();
    for i in 0..WARMUP_SAMPLES + samples {
        rng.shuffle(&mut turns);
        for &v in &turns {
            let sample = subjects[v].one(i as u64).await;
            if i >= WARMUP_SAMPLES {
                out[v].push(sample);
            }
            tokio::time::sleep(PAUSE).await;
        }
    }
    for subject in subjects {
        subject.close().await;
    }
    out
}

/// One start-up of the hand-written 4 x 16 equivalent:
/// `(spawned, first item, closed and joined)`.
async fn startup_tokio() -> (Duration, Duration, Duration) {
    let start = Instant::now();
    let (feed, first) = async_channel::bounded::<u64>(QUEUE);
    let mut input = first;
    let mut tasks = Vec::with_capacity(STAGES * STARTUP_WORKERS);
    for _ in 0..STAGES {
        let (tx, rx) = async_channel::bounded::<u64>(QUEUE);
        for _ in 0..STARTUP_WORKERS {
            let (input, tx) = (input.clone(), tx.clone());
            tasks.push(tokio::spawn(async move {
                while let Ok(x) = input.recv().await {
                    if tx.send(x + 1).await.is_err() {
                        break;
                    }
                }
            }));
        }
        input = rx;
    }
    let spawned = start.elapsed();
    let t = Instant::now();
    feed.send(1).await.expect("chain runs");
    input.recv().await.expect("chain runs");
    let first = t.elapsed();
    let t = Instant::now();
    drop(feed);
    for task in tasks {
        task.await.expect("task ends");
    }
    assert!(input.recv().await.is_err(), "closed");
    (spawned, first, t.elapsed())
}

/// One start-up of the 4 x 16 bergtalzug pipeline:
/// `(built and started, first item, stopped)`.
async fn startup_bergtalzug() -> (Duration, Duration, Duration) {
    let start = Instant::now();
    let (pipeline, mut done) = build(STAGES, STARTUP_WORKERS, true);
    pipeline.start().await.expect("pipeline starts");
    let started = start.elapsed();
    let t = Instant::now();
    pipeline
        .inject(vec![WorkItem::new(1)])
        .await
        .expect("pipeline takes the item");
    done.recv().await.expect("pipeline runs");
    let first = t.elapsed();
    let t = Instant::now();
    pipeline.stop().await.expect("pipeline stops");
    let stopped = t.elapsed();
    assert!(pipeline.is_finished());
    (started, first, stopped)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

fn main() {
    // `cargo bench` passes `--bench`; other unknown arguments are ignored too.
    let quick = common::quick();
    let (samples, startups) = if quick {
        (QUICK_SAMPLES, QUICK_STARTUPS)
    } else {
        (FULL_SAMPLES, FULL_STARTUPS)
    };

    let load = common::load_average();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");

    println!(
        "latency: one item at a time through {STAGES} stages ({WORKERS} async workers each, \
         queue {QUEUE}), {PAUSE:?} idle between items, {samples} items per variant after \
         {WARMUP_SAMPLES} warm-up; start-up of {STAGES} x {STARTUP_WORKERS}, {startups} times; \
         2 tokio worker threads{}",
        if quick { " (quick)" } else { "" }
    );

    // The measuring loops run as tokio tasks, on the runtime's threads.
    let per_item = runtime
        .block_on(runtime.spawn(per_item(samples)))
        .expect("per-item run");

    println!();
    println!(
        "{:<26} {:>9} {:>9} {:>9} {:>9} {:>9} | {:>9} {:>9}",
        "per item (us)", "min", "p50", "p90", "p99", "max", "awt p50", "awt p99"
    );
    let mut bergtalzug_on = (Duration::ZERO, Duration::ZERO);
    let mut baseline = (Duration::ZERO, Duration::ZERO);
    let mut actors = (Duration::ZERO, Duration::ZERO);
    for (name, samples) in VARIANTS.iter().zip(per_item) {
        let mut callback: Vec<Duration> = samples.iter().map(|s| s.0).collect();
        let mut awaited: Vec<Duration> = samples.iter().map(|s| s.1).collect();
        callback.sort_unstable();
        awaited.sort_unstable();
        println!(
            "{:<26} {:>9} {:>9} {:>9} {:>9} {:>9} | {:>9} {:>9}",
            name,
            us(callback[0]),
            us(percentile(&callback, 50.0)),
            us(percentile(&callback, 90.0)),
            us(percentile(&callback, 99.0)),
            us(callback[callback.len() - 1]),
            us(percentile(&awaited, 50.0)),
            us(percentile(&awaited, 99.0)),
        );
        let p50_p99 = (percentile(&callback, 50.0), percentile(&callback, 99.0));
        match *name {
            "bergtalzug tracking on" => bergtalzug_on = p50_p99,
            "tokio tasks (baseline)" => baseline = p50_p99,
            "ractor chain, 14 actors" => actors = p50_p99,
            _ => {}
        }
    }
    println!("(callback: inject to the on_complete stamp; awt: to the measuring task having it)");

    let (before, rows, after) = runtime
        .block_on(runtime.spawn(async move {
            let alive = || {
                tokio::runtime::Handle::current()
                    .metrics()
                    .num_alive_tasks()
            };
            let before = alive();
            let mut rows = [Vec::new(), Vec::new()];
            for _ in 0..startups {
                rows[0].push(startup_tokio().await);
                rows[1].push(startup_bergtalzug().await);
            }
            // Let anything that ends on its own finish.
            tokio::time::sleep(Duration::from_millis(50)).await;
            (before, rows, alive())
        }))
        .expect("start-up run");

    println!();
    println!(
        "{:<26} {:>16} {:>16} {:>16} {:>16}",
        "start-up 4 x 16 (us)", "build+start p50", "build+start max", "first item p50", "stop p50"
    );
    let names = ["tokio tasks (baseline)", "bergtalzug"];
    let mut started_p50 = Duration::ZERO;
    for (name, runs) in names.iter().zip(rows) {
        let mut started: Vec<Duration> = runs.iter().map(|r| r.0).collect();
        let mut first: Vec<Duration> = runs.iter().map(|r| r.1).collect();
        let mut stopped: Vec<Duration> = runs.iter().map(|r| r.2).collect();
        for v in [&mut started, &mut first, &mut stopped] {
            v.sort_unstable();
        }
        println!(
            "{:<26} {:>16} {:>16} {:>16} {:>16}",
            name,
            us(percentile(&started, 50.0)),
            us(started[started.len() - 1]),
            us(percentile(&first, 50.0)),
            us(percentile(&stopped, 50.0)),
        );
        started_p50 = percentile(&started, 50.0);
    }
    println!("alive tokio tasks: {before} before the start-ups, {after} after");

    if !quick {
        println!();
        println!(
            "targets: tracking on p50 {} us < {} us (issue 14): {}; p99 {} us < {} us \
             (issue 14): {}; tokio tasks in the same run: p50 {} us, p99 {} us; \
             {ACTOR_HOPS} bare ractor actors: p50 {} us, p99 {} us; build+start p50 {} us < {} us (issue 6): {}",
            us(bergtalzug_on.0),
            us(P50_TARGET),
            verdict(bergtalzug_on.0 < P50_TARGET),
            us(bergtalzug_on.1),
            us(P99_TARGET),
            verdict(bergtalzug_on.1 < P99_TARGET),
            us(baseline.0),
            us(baseline.1),
            us(actors.0),
            us(actors.1),
            us(started_p50),
            us(STARTUP_TARGET),
            verdict(started_p50 < STARTUP_TARGET),
        );
    }
    common::print_load(&load);
}
