//! Split and filter: children carry their lineage in every model, zero
//! children is a filtered success, the source is acked once per admitted
//! item with the combined outcome, stats count admitted and derived items,
//! and a split's children never outnumber the room after it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bergtalzug::Ack;
use bergtalzug::prelude::*;
use bergtalzug::shape::{Batch, Children, FILTERED, PARENT_ID};

mod common;
use common::*;

/// Hands out `items` (id, n): item `id` is to split into `n` children. Acks
/// are recorded.
struct Splittable {
    items: Vec<(String, u64)>,
    acks: Arc<Mutex<Vec<Ack>>>,
}

impl Source for Splittable {
    type Item = u64;

    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<u64>>> {
        let n = count.min(self.items.len());
        Ok(self
            .items
            .drain(..n)
            .map(|(id, n)| {
                let mut item = WorkItem::with_job_id(id.as_str(), n);
                item.metadata_mut().custom.insert("file".into(), id.into());
                item
            })
            .collect())
    }

    fn wants_acks(&self) -> bool {
        true
    }

    async fn ack(&mut self, outcomes: Vec<Ack>) {
        self.acks.lock().unwrap().extend(outcomes);
    }
}

fn source(items: &[(&str, u64)]) -> (Splittable, Arc<Mutex<Vec<Ack>>>) {
    let acks = Arc::new(Mutex::new(Vec::new()));
    let items = items.iter().map(|(id, n)| (id.to_string(), *n)).collect();
    (
        Splittable {
            items,
            acks: acks.clone(),
        },
        acks,
    )
}

fn two_stages(split: ExecutionType) -> PipelineConfig {
    PipelineConfig::new(
        "shapes",
        vec![
            StageConfig::new("split", split).workers(2).queue_size(4),
            StageConfig::new("store", ExecutionType::Async)
                .workers(2)
                .queue_size(4),
        ],
    )
    .stats_interval(Duration::ZERO)
}

/// The child `index` of an item that splits into `n`: its data is the index.
fn blocking_split(item: WorkItem<u64>) -> anyhow::Result<WorkItem<Children<u64>>> {
    Ok(item.map(|n| Children::iter(0..n)))
}

async fn run_split(
    split: ExecutionType,
    items: &[(&str, u64)],
) -> (Vec<WorkItemResult>, Vec<Ack>, PipelineStats) {
    let (source, acks) = source(items);
    let builder = Pipeline::builder(two_stages(split)).unwrap().source(source);
    let builder = match split {
        ExecutionType::Async => builder
            .async_stage("split", |item: WorkItem<u64>| async move {
                Ok(item.map(|n| Children::stream(futures::stream::iter((0..n).map(Ok)))))
            })
            .split(),
        _ => builder.sync_stage("split", blocking_split).split(),
    };
    let pipeline = builder
        .async_stage("store", |item: WorkItem<u64>| async move { Ok(item) })
        .build()
        .unwrap();
    let outcome = within(Duration::from_secs(30), pipeline.run_outcome()).await;
    let results = outcome.results;
    let stats = pipeline.stats().await.unwrap();
    let acks = acks.lock().unwrap().clone();
    (results, acks, stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_carry_lineage_in_every_model() {
    for model in [
        ExecutionType::Async,
        ExecutionType::Thread,
        ExecutionType::Cpu,
    ] {
        let (results, acks, _) = run_split(model, &[("f1", 3), ("f2", 2)]).await;
        assert_unique_ids(&results);
        let mut ids: Vec<String> = results.iter().map(|r| r.job_id.to_string()).collect();
        ids.sort();
        assert_eq!(ids, ["f1/0", "f1/1", "f1/2", "f2/0", "f2/1"], "{model}");
        for r in &results {
            assert!(r.success, "{model}: {:?}", r.error);
            let parent = r.job_id.to_string().split('/').next().unwrap().to_string();
            let custom = &r.metadata.custom;
            assert_eq!(custom[PARENT_ID], parent.as_str(), "{model}");
            // The parent's metadata travels on.
            assert_eq!(custom["file"], parent.as_str(), "{model}");
        }
        assert_eq!(acks.len(), 2, "{model}: one ack per admitted item");
        assert!(acks.iter().all(Ack::is_success));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_with_no_children_is_a_filtered_success() {
    let (results, acks, stats) =
        run_split(ExecutionType::Thread, &[("empty", 0), ("one", 1)]).await;
    let filtered: Vec<_> = results
        .iter()
        .filter(|r| r.job_id == "empty".into())
        .collect();
    assert_eq!(filtered.len(), 1);
    assert!(filtered[0].success);
    assert_eq!(filtered[0].metadata.custom[FILTERED], true);
    assert_eq!(results.len(), 2);
    assert_eq!(acks.len(), 2);
    assert!(acks.iter().all(Ack::is_success));
    assert_eq!(stats.completed_items, 2);
    assert_eq!(stats.failed_items, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_item_is_acked_once_with_the_combined_outcome() {
    let (source, acks) = source(&[("good", 4), ("bad", 4)]);
    let pipeline = Pipeline::builder(two_stages(ExecutionType::Thread))
        .unwrap()
        .source(source)
        .sync_stage("split", |item: WorkItem<u64>| {
            // The child 2 of `bad` fails to parse; its siblings go on.
            let bad = item.job_id() == &JobId::from("bad");
            Ok(item.map(move |n| {
                Children::try_iter((0..n).map(move |i| {
                    anyhow::ensure!(!(bad && i == 2), "record {i} is corrupt");
                    Ok(i)
                }))
            }))
        })
        .split()
        .async_stage("store", |item: WorkItem<u64>| async move {
            // And child 3 of `bad` fails in the next stage.
            let id = item.job_id().to_string();
            anyhow::ensure!(id != "bad/3", "store refused {id}");
            Ok(item)
        })
        .build()
        .unwrap();
    let outcome = within(Duration::from_secs(30), pipeline.run_outcome()).await;
    let acks = acks.lock().unwrap().clone();
    let by_id: HashMap<String, &Ack> = acks.iter().map(|a| (a.job_id.to_string(), a)).collect();
    assert_eq!(acks.len(), 2, "one ack per admitted item: {acks:?}");
    assert!(by_id["good"].is_success());
    let bad = by_id["bad"];
    let error = bad
        .error
        .as_ref()
        .expect("a failed descendant fails the item");
    assert!(
        error.message.starts_with("2 of 4 items"),
        "{}",
        error.message
    );
    let mut failed: Vec<String> = bad.failed.iter().map(ToString::to_string).collect();
    failed.sort();
    assert_eq!(failed, ["bad/2", "bad/3"]);
    // Results are per final item: 8 children, 2 failed.
    let results = &outcome.results;
    assert_eq!(results.len(), 8);
    assert_eq!(results.iter().filter(|r| !r.success).count(), 2);
    let failures: BTreeMap<String, String> = results
        .iter()
        .filter_map(|r| Some((r.job_id.to_string(), r.error.as_ref()?.stage.clone())))
        .collect();
    assert_eq!(failures["bad/2"], "split");
    assert_eq!(failures["bad/3"], "store");
    // Stats: admitted items counted once each, derived ones apart.
    let stats = &pipeline.stats().await.unwrap();
    assert_eq!(stats.admitted_items, 2);
    assert_eq!(stats.completed_items, 2);
    assert_eq!(stats.failed_items, 1);
    assert_eq!(stats.derived_items_finished, 8);
    assert_eq!(stats.derived_items_failed, 2);
    assert_eq!(stats.stages[0].derived, 8);
    assert_eq!(stats.stages[0].derived_live, 0);
    assert_eq!(
        stats.stages[1].admitted, 7,
        "the failed child never reached store"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_drawing_fails_the_rest_of_the_split_only() {
    let (source, acks) = source(&[("p", 10)]);
    let pipeline = Pipeline::builder(two_stages(ExecutionType::Thread))
        .unwrap()
        .source(source)
        .sync_stage("split", |item: WorkItem<u64>| {
            Ok(item.map(|n| {
                Children::iter((0..n).inspect(|i| {
                    assert!(*i < 3, "child {i} is too much");
                }))
            }))
        })
        .split()
        .async_stage("store", |item: WorkItem<u64>| async move { Ok(item) })
        .build()
        .unwrap();
    let outcome = within(Duration::from_secs(30), pipeline.run_outcome()).await;
    let results = &outcome.results;
    let ok = results.iter().filter(|r| r.success).count();
    assert_eq!(ok, 3, "the children drawn before the panic go on");
    let parent: Vec<_> = results.iter().filter(|r| r.job_id == "p".into()).collect();
    assert_eq!(parent.len(), 1);
    assert_eq!(
        parent[0].error.as_ref().unwrap().kind,
        ItemErrorKind::Panicked
    );
    let acks = acks.lock().unwrap();
    assert_eq!(acks.len(), 1);
    assert!(!acks[0].is_success());
}

/// A child that counts itself while it lives.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(live: &Arc<AtomicUsize>, peak: &AtomicUsize) -> Self {
        let now = live.fetch_add(1, Ordering::SeqCst) + 1;
        peak.fetch_max(now, Ordering::SeqCst);
        Counted(live.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_never_holds_more_children_than_the_room_after_it() {
    let live = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let config = PipelineConfig::new(
        "fanout",
        vec![
            StageConfig::new("split", ExecutionType::Thread)
                .workers(1)
                .queue_size(1),
            StageConfig::new("slow", ExecutionType::Async)
                .workers(2)
                .queue_size(8),
        ],
    )
    .stats_interval(Duration::ZERO)
    .retain_results(false);
    let (l, p) = (live.clone(), peak.clone());
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter([20_000u64]))
        .sync_stage("split", move |item: WorkItem<u64>| {
            let (l, p) = (l.clone(), p.clone());
            Ok(item.map(move |n| Children::iter((0..n).map(move |_| Counted::new(&l, &p)))))
        })
        .split()
        .async_stage("slow", |item: WorkItem<Counted>| async move {
            tokio::task::yield_now().await;
            Ok(item)
        })
        .build()
        .unwrap();
    within(Duration::from_secs(60), pipeline.run_outcome()).await;
    let stats = pipeline.stats().await.unwrap();
    assert_eq!(stats.derived_items_finished, 20_000);
    assert_eq!(stats.completed_items, 1);
    assert_eq!(live.load(Ordering::SeqCst), 0);
    // The room after the split: `slow`'s queue_size + workers.
    let room = 8 + 2;
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= room, "{peak} children alive at once, room {room}");
}

#[test]
fn a_policy_given_before_split_is_a_build_error_naming_the_stage() {
    let keyed = Pipeline::builder(two_stages(ExecutionType::Thread))
        .unwrap()
        .source(sources::iter([3u64]))
        .sync_stage("split", blocking_split)
        .keyed_by("store", |item: &WorkItem<Children<u64>>| {
            item.job_id().to_string()
        })
        .split()
        .async_stage("store", |item: WorkItem<u64>| async move { Ok(item) })
        .build()
        .unwrap_err();
    assert_eq!(
        keyed,
        BuildError::PolicyBeforeSplit {
            stage: "store".into(),
            method: "keyed_by"
        }
    );
    assert!(keyed.to_string().contains("after `.split()`"), "{keyed}");

    let batched = PipelineConfig::new(
        "b",
        vec![
            StageConfig::new("split", ExecutionType::Thread),
            StageConfig::new("write", ExecutionType::Async).batch(10, Duration::from_millis(5)),
        ],
    );
    let batched = Pipeline::builder(batched)
        .unwrap()
        .source(sources::iter([3u64]))
        .sync_stage("split", blocking_split)
        .batch_by("write", |_: &WorkItem<Children<u64>>| 0)
        .split()
        .async_batch_stage("write", |batch: Batch<u64>| async move {
            Ok(batch.into_items().into_iter().map(|i| Ok(i.data)).collect())
        })
        .build()
        .unwrap_err();
    assert!(
        matches!(&batched, BuildError::PolicyBeforeSplit { stage, method: "batch_by" } if stage == "write"),
        "{batched}"
    );

    // After the split, over the children, it is where it belongs.
    Pipeline::builder(two_stages(ExecutionType::Thread))
        .unwrap()
        .source(sources::iter([3u64]))
        .sync_stage("split", blocking_split)
        .split()
        .keyed_by("store", |item: &WorkItem<u64>| item.data % 2)
        .async_stage("store", |item: WorkItem<u64>| async move { Ok(item) })
        .build()
        .expect("keyed_by after .split() builds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_ids_spelled_like_derived_ids_are_accounted_apart() {
    // `a` splits into two children, shown `a/0` and `a/1`; the user's own
    // items `a/0` (one child, `a/0/0`) and `a/1` (filtered) pass the same
    // split while `a`'s children are still in `store`.
    let (source, acks) = source(&[("a", 2), ("a/0", 1), ("a/1", 0)]);
    let pipeline = Pipeline::builder(two_stages(ExecutionType::Thread))
        .unwrap()
        .source(source)
        .sync_stage("split", blocking_split)
        .split()
        .async_stage("store", |item: WorkItem<u64>| async move {
            let of_a = item.metadata().custom[PARENT_ID] == "a";
            if of_a {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // `a`'s child 1 (its data is its index) fails: only `a` may
            // hear of it.
            anyhow::ensure!(!(of_a && item.data == 1), "store refused a's child 1");
            Ok(item)
        })
        .build()
        .unwrap();
    let outcome = within(Duration::from_secs(30), pipeline.run_outcome()).await;
    let mut ids: Vec<(String, bool)> = outcome
        .results
        .iter()
        .map(|r| (r.job_id.to_string(), r.success))
        .collect();
    ids.sort();
    let expected = [
        ("a/0", true),
        ("a/0/0", true),
        ("a/1", false),
        ("a/1", true),
    ];
    let expected: Vec<(String, bool)> = expected.iter().map(|(i, s)| (i.to_string(), *s)).collect();
    assert_eq!(ids, expected, "one result per final item");
    let filtered = outcome
        .results
        .iter()
        .find(|r| r.job_id == JobId::from("a/1"))
        .expect("the user's a/1 has its result");
    assert_eq!(filtered.metadata.custom[FILTERED], true);
    let acks = acks.lock().unwrap().clone();
    assert_eq!(acks.len(), 3, "one ack per admitted item: {acks:?}");
    let by_id: HashMap<String, &Ack> = acks.iter().map(|a| (a.job_id.to_string(), a)).collect();
    assert_eq!(by_id.len(), 3, "each admitted item acked once: {acks:?}");
    let a = by_id["a"];
    assert!(!a.is_success(), "a's failed child fails a");
    assert_eq!(a.failed.len(), 1);
    assert_eq!(a.failed[0].to_string(), "a/1");
    assert!(by_id["a/0"].is_success(), "{:?}", by_id["a/0"]);
    assert!(by_id["a/1"].is_success(), "{:?}", by_id["a/1"]);
    let stats = pipeline.stats().await.unwrap();
    assert_eq!(stats.admitted_items, 3);
    assert_eq!(stats.completed_items, 3, "finished, `a` failed among them");
    assert_eq!(stats.failed_items, 1);
    assert_eq!(stats.derived_items_finished, 3);
    assert_eq!(stats.stages[0].derived_live, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_with_one_id_that_split_with_tracking_off_are_each_acked() {
    // Tracking off does not refuse duplicate ids: three items `x` split at
    // once, the middle one with no children (filtered) while the first's
    // children are open (one worker: they reach the split in order).
    let (source, acks) = source(&[("x", 3), ("x", 0), ("x", 3)]);
    let mut config = two_stages(ExecutionType::Thread).enable_tracking(false);
    config.stages[0].workers = 1;
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(source)
        .sync_stage("split", blocking_split)
        .split()
        .async_stage("store", |item: WorkItem<u64>| async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(item)
        })
        .build()
        .unwrap();
    within(Duration::from_secs(30), pipeline.run_outcome()).await;
    let acks = acks.lock().unwrap().clone();
    assert_eq!(acks.len(), 3, "one ack per admitted item: {acks:?}");
    assert!(
        acks.iter()
            .all(|a| a.job_id == JobId::from("x") && a.is_success())
    );
    let stats = pipeline.stats().await.unwrap();
    assert_eq!(stats.admitted_items, 3);
    assert_eq!(stats.completed_items, 3);
    assert_eq!(stats.derived_items_finished, 6);
    assert_eq!(stats.stages[0].derived_live, 0);
}
