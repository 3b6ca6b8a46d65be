//! Property tests over random topologies mixing split, filter, batch and
//! plain stages in every model (Async, Thread, Cpu and Process), with
//! errors, panics, timeouts, retries, stops and aborts:
//!
//! - every admitted item is acked exactly once, and its ack is a success
//!   exactly when every final item it split into succeeded;
//! - every final item (a derived child, a filtered or failed parent, an
//!   item that never split) has exactly one result; run to its end, the
//!   results are exactly those a model of the topology predicts;
//! - the items alive at once never exceed the bound configuration sets.
//!
//! This file has its own `main` (`harness = false` in Cargo.toml): a
//! Process stage starts this very binary again as its workers, so `main`
//! calls `bergtalzug::process::init()` first and then runs the property
//! with proptest's runner (failures shrink and are kept in
//! `shapes_properties.proptest-regressions` as with the macro).
//!
//! 128 cases of small items: the whole file runs in seconds.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bergtalzug::Ack;
use bergtalzug::prelude::*;
use bergtalzug::shape::{Batch, Children};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};
use serde::{Deserialize, Serialize};

mod common;
use common::*;

/// Counts the items alive (in the pipeline's data) and their peak.
#[derive(Default)]
struct Census {
    live: AtomicUsize,
    peak: AtomicUsize,
}

/// The census a new [`Token`] counts in: each case sets its own. (In a
/// worker process it is one nobody reads: what the bound is about is the
/// parent's memory.)
static CURRENT: RwLock<Option<Arc<Census>>> = RwLock::new(None);

fn census() -> Arc<Census> {
    if let Some(census) = CURRENT.read().unwrap().as_ref() {
        return census.clone();
    }
    CURRENT
        .write()
        .unwrap()
        .get_or_insert_with(Default::default)
        .clone()
}

/// Counted while it lives; one per value in the pipeline's data, made
/// again when a value is read back from a worker process.
struct Token(Arc<Census>);

impl Token {
    fn new() -> Token {
        let census = census();
        let now = census.live.fetch_add(1, Ordering::SeqCst) + 1;
        census.peak.fetch_max(now, Ordering::SeqCst);
        Token(census)
    }
}

impl Clone for Token {
    fn clone(&self) -> Token {
        Token::new()
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct D {
    v: u64,
    #[serde(skip, default = "Token::new")]
    _t: Token,
}

impl D {
    fn new(v: u64) -> D {
        D {
            v,
            _t: Token::new(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Shape {
    Plain { retry: bool },
    Split,
    Batch { size: usize },
}

#[derive(Debug, Clone, Copy)]
struct Spec {
    shape: Shape,
    model: ExecutionType,
    workers: usize,
    queue: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum End {
    Complete,
    Stop,
    Abort,
}

fn spec() -> impl Strategy<Value = Spec> {
    let shape = prop_oneof![
        any::<bool>().prop_map(|retry| Shape::Plain { retry }),
        Just(Shape::Split),
        (1usize..5).prop_map(|size| Shape::Batch { size }),
    ];
    let model = prop_oneof![
        Just(ExecutionType::Async),
        Just(ExecutionType::Thread),
        Just(ExecutionType::Cpu),
        Just(ExecutionType::Process)
    ];
    (shape, model, 1usize..4, 1usize..5).prop_map(|(shape, model, workers, queue)| Spec {
        shape,
        model,
        workers,
        queue,
    })
}

const TIMEOUT: Duration = Duration::from_millis(40);

/// How many children a split makes of `v`, and the child `i`'s value.
fn children(v: u64) -> impl Iterator<Item = u64> {
    (0..v % 4).map(move |i| v * 3 + i + 1)
}

/// The model: the final items `v` (with id `id`) becomes from stage `k`
/// on, and whether each succeeds.
fn predict(specs: &[Spec], k: usize, id: String, v: u64, out: &mut Vec<(String, bool)>) {
    let Some(spec) = specs.get(k) else {
        out.push((id, true));
        return;
    };
    let ok = match spec.shape {
        Shape::Plain { retry } => {
            let blocking = spec.model != ExecutionType::Async;
            !(v % 11 == 3
                || (blocking && v % 13 == 5)
                || (!blocking && v % 19 == 7)
                || (!retry && v % 5 == 1))
        }
        Shape::Batch { .. } => v % 17 != 2,
        Shape::Split => {
            let kids: Vec<u64> = children(v).collect();
            if kids.is_empty() {
                out.push((id.clone(), true)); // filtered
            }
            for (i, c) in kids.into_iter().enumerate() {
                predict(specs, k + 1, format!("{id}/{i}"), c, out);
            }
            return;
        }
    };
    if ok {
        predict(specs, k + 1, id, v, out);
    } else {
        out.push((id, false));
    }
}

fn plain(item: WorkItem<D>) -> anyhow::Result<WorkItem<D>> {
    let v = item.data.v;
    if v % 11 == 3 {
        return Err(Permanent(anyhow::anyhow!("bad value {v}")).into());
    }
    assert!(v % 13 != 5, "panic on {v}");
    anyhow::ensure!(
        !(v % 5 == 1 && item.metadata().attempts() == 1),
        "transient {v}"
    );
    Ok(item)
}

async fn plain_async(item: WorkItem<D>) -> anyhow::Result<WorkItem<D>> {
    let v = item.data.v;
    if v % 11 == 3 {
        return Err(Permanent(anyhow::anyhow!("bad value {v}")).into());
    }
    if v % 19 == 7 {
        tokio::time::sleep(TIMEOUT * 20).await;
    }
    anyhow::ensure!(
        !(v % 5 == 1 && item.metadata().attempts() == 1),
        "transient {v}"
    );
    Ok(item)
}

/// A Process stage's split: the children as a `Vec` (they cross back whole).
fn split_all(item: WorkItem<D>) -> anyhow::Result<WorkItem<Vec<D>>> {
    Ok(item.map(|d| children(d.v).map(D::new).collect()))
}

fn batch_outcomes(batch: Batch<D>) -> anyhow::Result<Vec<anyhow::Result<D>>> {
    Ok(batch
        .into_items()
        .into_iter()
        .map(|i| {
            anyhow::ensure!(i.data.v % 17 != 2, "row {} refused", i.data.v);
            Ok(i.data)
        })
        .collect())
}

/// Hands out the values as items (their tokens made as they are handed
/// out), records acks.
struct Acking {
    values: Vec<u64>,
    next: usize,
    acks: Arc<Mutex<Vec<Ack>>>,
}

impl Source for Acking {
    type Item = D;
    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<D>>> {
        let end = (self.next + count).min(self.values.len());
        let items = (self.next..end)
            .map(|i| WorkItem::with_job_id(format!("r{i}"), D::new(self.values[i])))
            .collect();
        self.next = end;
        Ok(items)
    }
    fn wants_acks(&self) -> bool {
        true
    }
    async fn ack(&mut self, outcomes: Vec<Ack>) {
        self.acks.lock().unwrap().extend(outcomes);
    }
}

/// The most items the configuration lets live at once: the window, each
/// split's budget and the parents it holds (each with its children in
/// memory), and the copies retrying stages keep.
fn bound(config: &PipelineConfig, specs: &[Spec]) -> usize {
    let stages = &config.stages;
    let window: usize = stages.iter().map(|s| s.item_room()).sum();
    let mut extra = 0;
    for (i, spec) in specs.iter().enumerate() {
        match spec.shape {
            Shape::Split => {
                let after: usize = stages[i + 1..].iter().map(|s| s.item_room()).sum();
                extra += after.max(stages[i].item_room()) + spec.workers.max(2) * 4;
            }
            Shape::Plain { retry: true } => extra += stages[i].capacity(),
            Shape::Plain { .. } | Shape::Batch { .. } => {}
        }
    }
    window + extra
}

async fn check(specs: Vec<Spec>, values: Vec<u64>, end: End) {
    let census = Arc::new(Census::default());
    *CURRENT.write().unwrap() = Some(census.clone());
    let stages: Vec<StageConfig> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut c = StageConfig::new(format!("s{i}"), s.model)
                .workers(s.workers)
                .queue_size(s.queue);
            match s.shape {
                Shape::Plain { retry: true } => {
                    c = c.retry(RetryPolicy::fixed(2, Duration::from_millis(1)))
                }
                Shape::Batch { size } => c = c.batch(size, Duration::from_millis(5)),
                Shape::Plain { retry: false } | Shape::Split => {}
            }
            if s.model == ExecutionType::Async {
                c = c.timeout(TIMEOUT);
            }
            c
        })
        .collect();
    let config = PipelineConfig::new("props", stages).stats_interval(Duration::ZERO);
    let limit = bound(&config, &specs);
    let acks = Arc::new(Mutex::new(Vec::new()));
    let source = Acking {
        values: values.clone(),
        next: 0,
        acks: acks.clone(),
    };
    let mut builder = Pipeline::builder(config).unwrap().source(source);
    for (i, s) in specs.iter().enumerate() {
        let name = format!("s{i}");
        builder = match (s.shape, s.model) {
            // A Process stage retries by its config alone: the item crosses
            // as bytes, nothing to clone.
            (Shape::Plain { .. }, ExecutionType::Process) => builder.process_stage(&name, plain),
            (Shape::Split, ExecutionType::Process) => {
                builder.process_stage(&name, split_all).split()
            }
            (Shape::Batch { .. }, ExecutionType::Process) => {
                builder.process_batch_stage(&name, batch_outcomes)
            }
            (Shape::Plain { retry: false }, ExecutionType::Async) => {
                builder.async_stage(&name, plain_async)
            }
            (Shape::Plain { retry: true }, ExecutionType::Async) => {
                builder.retrying_async_stage(&name, plain_async)
            }
            (Shape::Plain { retry: false }, _) => builder.sync_stage(&name, plain),
            (Shape::Plain { retry: true }, _) => builder.retrying_sync_stage(&name, plain),
            (Shape::Split, ExecutionType::Async) => builder
                .async_stage(&name, |item: WorkItem<D>| async move {
                    Ok(item.map(|d| {
                        let kids = children(d.v).map(|v| Ok(D::new(v)));
                        Children::stream(futures::stream::iter(kids))
                    }))
                })
                .split(),
            (Shape::Split, _) => builder
                .sync_stage(&name, |item: WorkItem<D>| {
                    Ok(item.map(|d| Children::iter(children(d.v).map(D::new))))
                })
                .split(),
            (Shape::Batch { .. }, ExecutionType::Async) => {
                builder.async_batch_stage(&name, |b: Batch<D>| async move { batch_outcomes(b) })
            }
            (Shape::Batch { .. }, _) => builder.sync_batch_stage(&name, batch_outcomes),
        };
    }
    let pipeline = Arc::new(builder.build().unwrap());
    let runner = {
        let p = pipeline.clone();
        tokio::spawn(async move { p.run_outcome().await })
    };
    match end {
        End::Complete => {}
        End::Stop => {
            tokio::time::sleep(Duration::from_millis(3)).await;
            let _ = pipeline.stop().await;
        }
        End::Abort => {
            tokio::time::sleep(Duration::from_millis(3)).await;
            let _ = pipeline.abort().await;
        }
    }
    let outcome = within(Duration::from_secs(30), runner).await.unwrap();
    let stats = pipeline.stats().await.unwrap();
    let acks = acks.lock().unwrap().clone();
    let results = outcome.results;

    // Every final item has one result; every admitted item one ack.
    assert_unique_ids(&results);
    let ack_ids: HashSet<String> = acks.iter().map(|a| a.job_id.to_string()).collect();
    assert_eq!(ack_ids.len(), acks.len(), "an item was acked twice");
    assert_eq!(acks.len() as u64, stats.admitted_items, "acks: {acks:?}");
    assert_eq!(stats.completed_items, stats.admitted_items);
    assert_eq!(stats.active_items, 0);
    // Each ack is the combined outcome of the final items it became.
    let mut families: HashMap<String, bool> = HashMap::new();
    for r in &results {
        let root = r.job_id.to_string().split('/').next().unwrap().to_string();
        *families.entry(root).or_insert(true) &= r.success;
    }
    for ack in &acks {
        let id = ack.job_id.to_string();
        let all_ok = families.get(&id).copied().unwrap_or(false);
        assert_eq!(ack.is_success(), all_ok, "ack of {id}: {ack:?}");
    }
    if end == End::Complete {
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        let mut expected = Vec::new();
        for (i, &v) in values.iter().enumerate() {
            predict(&specs, 0, format!("r{i}"), v, &mut expected);
        }
        let mut got: Vec<(String, bool)> = results
            .iter()
            .map(|r| (r.job_id.to_string(), r.success))
            .collect();
        expected.sort();
        got.sort();
        assert_eq!(got, expected, "results differ from the model");
    }
    let peak = census.peak.load(Ordering::SeqCst);
    assert!(peak <= limit, "{peak} items alive at once, bound {limit}");
}

/// The property, `cases` times, with proptest's shrinking and regression
/// file; every case on a runtime of its own.
fn acks_results_and_bounds_hold_through_any_topology() {
    let config = Config {
        cases: 128,
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel(
            "proptest-regressions",
        ))),
        ..Config::default()
    };
    let strategy = (
        prop::collection::vec(spec(), 1..4),
        prop::collection::vec(0u64..200, 1..25),
        prop_oneof![
            Just(End::Complete),
            Just(End::Complete),
            Just(End::Stop),
            Just(End::Abort)
        ],
    );
    let outcome = TestRunner::new(config).run(&strategy, |(specs, values, end)| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(check(specs, values, end));
        Ok(())
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
}

fn main() {
    // First: in a worker process this serves its stage and never returns.
    bergtalzug::process::init();
    run_tests(&[(
        "acks_results_and_bounds_hold_through_any_topology",
        acks_results_and_bounds_hold_through_any_topology,
    )]);
}
