//! Conservation, by property: for random stage counts, execution models,
//! worker counts, queue sizes, error, panic and timeout rates, retry
//! policies, and a random stop or abort, every admitted item finishes
//! exactly once, the counts agree, and the items alive never exceed
//! Σ(queue_size + workers) plus one refill (plus, in retrying stages, the
//! copy each running attempt keeps, and the item of each blocking attempt
//! that ran so long the stage may have given it up at its timeout: its
//! thread still holds it, as documented for stuck handlers).
//!
//! `PROPTEST_CASES=500 cargo test --release --test properties` runs more.

use std::sync::Arc;
use std::time::Duration;

use bergtalzug::prelude::*;
use proptest::prelude::*;

mod common;
use common::*;

#[derive(Debug, Clone)]
struct StageSpec {
    model: ExecutionType,
    workers: usize,
    queue_size: usize,
    /// Per mille of items failing here with an error.
    errors: u64,
    /// Per mille of items panicking here.
    panics: u64,
    /// Some items take a little time here.
    slow: bool,
    /// Per mille of attempts that hang past the stage's timeout (a stage
    /// with a rate has a timeout).
    hangs: u64,
    /// All attempts allowed, and the backoff, when the stage retries.
    retry: Option<(u32, u64)>,
}

#[derive(Debug, Clone, Copy)]
enum Ending {
    Exhausted,
    Stop,
    Abort,
}

fn stage_spec() -> impl Strategy<Value = StageSpec> {
    (
        prop_oneof![
            Just(ExecutionType::Async),
            Just(ExecutionType::Thread),
            Just(ExecutionType::Cpu)
        ],
        1usize..5,
        1usize..12,
        0u64..80,
        0u64..30,
        any::<bool>(),
        prop_oneof![2 => Just(0u64), 1 => 1u64..20],
        prop::option::of((2u32..5, 0u64..3)),
    )
        .prop_map(
            |(model, workers, queue_size, errors, panics, slow, hangs, retry)| StageSpec {
                model,
                workers,
                queue_size,
                errors,
                panics,
                slow,
                hangs,
                retry,
            },
        )
}

fn ending() -> impl Strategy<Value = Ending> {
    prop_oneof![
        2 => Just(Ending::Exhausted),
        1 => Just(Ending::Stop),
        1 => Just(Ending::Abort),
    ]
}

/// A deterministic per-(item, stage) dice roll in 0..1000.
fn roll(value: u64, stage: usize) -> u64 {
    let mut z = value.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (stage as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 31)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 29)) % 1000
}

/// A stage's timeout, when it has planned hangs: far above a normal item's
/// time, far below a hang's.
const TIMEOUT: Duration = Duration::from_millis(40);
const HANG: Duration = Duration::from_millis(400);

/// The dice for an attempt: a retry may go otherwise than the first try.
fn attempt_roll(item: &WorkItem<Tracked>, index: usize) -> u64 {
    let attempt = u64::from(item.metadata().attempts());
    roll(item.data.value ^ (attempt << 40), index)
}

fn step(
    spec: &StageSpec,
    index: usize,
    item: WorkItem<Tracked>,
) -> anyhow::Result<WorkItem<Tracked>> {
    let r = attempt_roll(&item, index);
    if r < spec.panics {
        panic!("planned panic");
    }
    if r < spec.panics + spec.errors {
        anyhow::bail!("planned error");
    }
    Ok(item)
}

/// Blocking attempts that held their item long enough that their stage may
/// have given them up at its timeout while they still held it (on a loaded
/// machine a short attempt can overrun too). Each may keep one item alive
/// beyond what the stage holds, until its thread returns.
#[derive(Default)]
struct Overruns {
    running: std::sync::atomic::AtomicUsize,
    overran: std::sync::atomic::AtomicUsize,
}

/// Counts one blocking attempt holding its item, from its handler's start.
struct Holding<'a> {
    overruns: &'a Overruns,
    since: std::time::Instant,
}

impl<'a> Holding<'a> {
    fn new(overruns: &'a Overruns) -> Self {
        overruns.running.fetch_add(1, SeqCst);
        Holding {
            overruns,
            since: std::time::Instant::now(),
        }
    }
}

impl Drop for Holding<'_> {
    // Also when the attempt panics: its item lives until the unwinding drops it.
    fn drop(&mut self) {
        // A quarter of the timeout: the stage's clock for the attempt starts
        // on this thread just before the handler does.
        if self.since.elapsed() >= TIMEOUT / 4 {
            self.overruns.overran.fetch_add(1, SeqCst);
        }
        self.overruns.running.fetch_sub(1, SeqCst);
    }
}

use std::sync::atomic::Ordering::SeqCst;

/// A blocking attempt that hangs: it lets go of its item first, since the
/// pipeline has given it up by the time it returns.
fn hangs_blocking(
    spec: &StageSpec,
    index: usize,
    item: WorkItem<Tracked>,
) -> Option<WorkItem<Tracked>> {
    if attempt_roll(&item, index) >= 1000 - spec.hangs {
        drop(item);
        std::thread::sleep(HANG);
        return None;
    }
    Some(item)
}

async fn run_case(stages: Vec<StageSpec>, items: u64, ending: Ending, stop_after: u64) {
    let census = Arc::new(Census::default());
    let overruns = Arc::new(Overruns::default());
    let configs = stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut c = StageConfig::new(format!("s{i}"), s.model)
                .workers(s.workers)
                .queue_size(s.queue_size);
            if s.hangs > 0 {
                c = c.timeout(TIMEOUT);
            }
            if let Some((attempts, delay)) = s.retry {
                let policy = RetryPolicy::exponential(attempts, Duration::from_millis(delay));
                c = c.retry(policy.jitter(0.5));
            }
            c
        })
        .collect::<Vec<_>>();
    let config = config("prop", configs);
    let bound = config
        .stages
        .iter()
        .map(|s| s.queue_size + s.workers)
        .sum::<usize>()
        + config.stages[0].queue_size
        + stages
            .iter()
            .filter(|s| s.retry.is_some())
            .map(|s| s.workers)
            .sum::<usize>();
    let outcomes = Arc::new(Outcomes::default());
    let source = {
        let census = census.clone();
        sources::iter((0..items).map(move |n| Tracked::new(n, &census)))
    };
    let mut builder = Pipeline::builder(config.clone())
        .unwrap()
        .source(source)
        .on_complete(outcomes.callback());
    for (index, spec) in stages.iter().enumerate() {
        let name = format!("s{index}");
        let spec = spec.clone();
        let asynchronous = {
            let spec = spec.clone();
            move |item: WorkItem<Tracked>| {
                let spec = spec.clone();
                async move {
                    if attempt_roll(&item, index) >= 1000 - spec.hangs {
                        tokio::time::sleep(HANG).await;
                    }
                    if spec.slow && item.data.value.is_multiple_of(7) {
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    }
                    step(&spec, index, item)
                }
            }
        };
        let overruns = overruns.clone();
        let blocking = move |item: WorkItem<Tracked>| {
            let Some(item) = hangs_blocking(&spec, index, item) else {
                anyhow::bail!("given up at the timeout: never seen");
            };
            let _holding = Holding::new(&overruns);
            if spec.slow && item.data.value % 7 == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
            step(&spec, index, item)
        };
        builder = match (stages[index].model, stages[index].retry.is_some()) {
            (ExecutionType::Async, false) => builder.async_stage(&name, asynchronous),
            (ExecutionType::Async, true) => builder.retrying_async_stage(&name, asynchronous),
            (_, false) => builder.sync_stage(&name, blocking),
            (_, true) => builder.retrying_sync_stage(&name, blocking),
        };
    }
    let pipeline = builder.build().unwrap();
    pipeline.start().await.unwrap();
    match ending {
        Ending::Exhausted => {}
        Ending::Stop | Ending::Abort => {
            while outcomes.total() < stop_after && !pipeline.is_finished() {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            let end = async {
                match ending {
                    Ending::Stop => pipeline.stop().await,
                    _ => pipeline.abort().await,
                }
            };
            within(Duration::from_secs(30), end).await.unwrap();
        }
    }
    let results = within(Duration::from_secs(60), pipeline.run())
        .await
        .unwrap();
    let stats = pipeline.stats().await.unwrap();

    // Every admitted item finished exactly once.
    assert_eq!(results.len() as u64, stats.admitted_items);
    assert_eq!(outcomes.total(), stats.admitted_items);
    assert_unique_ids(&results);
    if matches!(ending, Ending::Exhausted) {
        assert_eq!(stats.admitted_items, items);
    }
    // The counts agree.
    let failed = results.iter().filter(|r| !r.success).count() as u64;
    let cancelled = results.iter().filter(|r| r.is_cancelled()).count() as u64;
    assert_eq!(stats.completed_items, results.len() as u64);
    assert_eq!(stats.failed_items, failed);
    assert_eq!(stats.cancelled_items, cancelled);
    assert_eq!(stats.active_items, 0);
    let processed_last = stats.stages.last().unwrap().processed;
    assert_eq!(
        processed_last,
        results.len() as u64 - failed,
        "the last stage's successes are the completions"
    );
    if !matches!(ending, Ending::Abort) {
        assert_eq!(cancelled, 0);
    }
    // Only planned outcomes, after every attempt the policy allows.
    for r in results.iter().filter(|r| !r.success) {
        let e = r.error.as_ref().unwrap();
        let spec = &stages[config.stage_index(&e.stage).unwrap()];
        match e.kind {
            ItemErrorKind::Failed => assert_eq!(e.message, "planned error"),
            ItemErrorKind::Panicked => assert_eq!(e.message, "planned panic"),
            ItemErrorKind::TimedOut => assert!(spec.hangs > 0, "{e}"),
            ItemErrorKind::Cancelled => {}
            other => panic!("unexpected {other}: {e}"),
        }
        if e.kind != ItemErrorKind::Cancelled {
            let allowed = spec.retry.map_or(1, |(attempts, _)| attempts);
            assert_eq!(e.attempts, allowed, "{e}");
        }
    }
    for (spec, s) in stages.iter().zip(&stats.stages) {
        if spec.retry.is_none() {
            assert_eq!(s.retried, 0, "stage {}", s.name);
        }
    }
    // Every stage still has all its workers.
    for (spec, s) in stages.iter().zip(&stats.stages) {
        if !matches!(ending, Ending::Abort) {
            assert_eq!(s.workers, spec.workers, "stage {}", s.name);
        }
    }
    // Memory was bounded by the configuration, plus the items of blocking
    // attempts that may have been given up while they held them (counted
    // once their threads are back; planned hangs let go of theirs first).
    within(HANG * 4, async {
        while overruns.running.load(SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let bound = bound + overruns.overran.load(SeqCst);
    assert!(
        census.peak() <= bound,
        "peak {} items alive, bound {bound}",
        census.peak()
    );
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(24),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_item_finishes_exactly_once(
        stages in prop::collection::vec(stage_spec(), 1..5),
        items in 1u64..1500,
        ending in ending(),
        stop_after in 0u64..500,
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run_case(stages, items, ending, stop_after));
    }
}
