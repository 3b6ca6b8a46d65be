//! Flow policies (docs/flow-policies.md): rate limits, live resize,
//! ordered output and key lanes. Paused tokio time where a test measures
//! time: the rate limiter reads tokio's clock, and handlers stamp their
//! starts with it.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bergtalzug::PipelineMsg;
use bergtalzug::prelude::*;
use common::{CountingSource, alive_tasks, config, within};
use tokio::time::Instant;

/// When each handler call started, by tokio's clock.
#[derive(Default)]
struct Starts(Mutex<Vec<Instant>>);

impl Starts {
    fn stamp(&self) {
        self.0.lock().unwrap().push(Instant::now());
    }

    fn sorted(&self) -> Vec<Instant> {
        let mut starts = self.0.lock().unwrap().clone();
        starts.sort();
        starts
    }
}

/// Over every window between two starts, no more starts than the burst
/// plus the rate times the window's length.
fn assert_within_rate(starts: &[Instant], per_second: f64, burst: usize) {
    for i in 0..starts.len() {
        for j in i..starts.len() {
            let window = starts[j].duration_since(starts[i]).as_secs_f64();
            let allowed = burst as f64 + per_second * window + 1e-6;
            let count = (j - i + 1) as f64;
            assert!(
                count <= allowed,
                "{count} starts within {window:.4} s: more than {allowed:.2} ({per_second}/s, burst {burst})"
            );
        }
    }
}

/// Tracks how many handler calls run at once, and the most seen.
#[derive(Default)]
struct Running {
    now: AtomicUsize,
    peak: AtomicUsize,
}

impl Running {
    fn enter(&self) {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }

    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }

    fn reset_peak(&self) {
        self.peak
            .store(self.now.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}

/// A pseudo-random delay in 0..max_ms, fixed per item.
fn delay(n: u64, max_ms: u64) -> Duration {
    let mut rng = fastrand::Rng::with_seed(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    Duration::from_micros(rng.u64(0..max_ms * 1000))
}

#[tokio::test(start_paused = true)]
async fn a_limited_stage_never_exceeds_its_rate_over_any_window_beyond_the_burst() {
    let (rate, burst, n) = (20u32, 3u32, 120u64);
    let starts = Arc::new(Starts::default());
    let stage = StageConfig::new("call", ExecutionType::Async)
        .workers(8)
        .queue_size(16)
        .rate_limit(RateLimit::per_second(rate).burst(burst));
    let pipeline = Pipeline::builder(config("limited", vec![stage]))
        .unwrap()
        .source(sources::iter(0..n))
        .async_stage("call", {
            let starts = starts.clone();
            move |item: WorkItem<u64>| {
                let starts = starts.clone();
                async move {
                    starts.stamp();
                    tokio::time::sleep(delay(item.data, 30)).await;
                    Ok(item)
                }
            }
        })
        .build()
        .unwrap();
    let began = Instant::now();
    let results = within(Duration::from_secs(60), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), n as usize);
    assert!(results.iter().all(|r| r.success));
    let starts = starts.sorted();
    assert_within_rate(&starts, rate as f64, burst as usize);
    // And the limit is the pace: not far below it either.
    let took = starts.last().unwrap().duration_since(began).as_secs_f64();
    let least = (n - 1) as f64 / rate as f64;
    assert!(
        (least * 0.95..least * 1.1).contains(&took),
        "{n} items at {rate}/s took {took:.2} s (about {least:.2} s expected)"
    );
}

#[tokio::test(start_paused = true)]
async fn a_changed_rate_takes_effect_at_once() {
    let starts = Arc::new(Starts::default());
    let stage = StageConfig::new("call", ExecutionType::Async)
        .workers(4)
        .queue_size(20)
        .rate_limit(RateLimit::per_second(10));
    let pipeline = Pipeline::builder(config("changed", vec![stage]))
        .unwrap()
        .source(sources::iter(0..100_000u64))
        .async_stage("call", {
            let starts = starts.clone();
            move |item: WorkItem<u64>| {
                let starts = starts.clone();
                async move {
                    starts.stamp();
                    Ok(item)
                }
            }
        })
        .build()
        .unwrap();
    pipeline.start().await.unwrap();
    let t0 = Instant::now();
    let count = |from: Instant, to: Instant| {
        starts
            .sorted()
            .iter()
            .filter(|t| **t >= from && **t < to)
            .count()
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t1 = Instant::now();
    pipeline
        .set_rate_limit("call", Some(RateLimit::per_second(100)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t2 = Instant::now();
    pipeline
        .set_rate_limit("call", Some(RateLimit::per_second(5)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t3 = Instant::now();
    pipeline.set_rate_limit("call", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let t4 = Instant::now();
    let (slow, fast, slower, free) = (count(t0, t1), count(t1, t2), count(t2, t3), count(t3, t4));
    within(Duration::from_secs(10), pipeline.abort())
        .await
        .unwrap();
    assert!((19..=21).contains(&slow), "10/s for 2 s: {slow}");
    assert!((195..=201).contains(&fast), "100/s for 2 s: {fast}");
    assert!((9..=11).contains(&slower), "5/s for 2 s: {slower}");
    assert!(free > 100, "no limit: {free} in 10 ms");
    let all = starts.sorted();
    let in_window = |from: Instant, to: Instant| -> Vec<Instant> {
        all.iter()
            .copied()
            .filter(|t| *t >= from && *t < to)
            .collect()
    };
    assert_within_rate(&in_window(t1, t2), 100.0, 1);
    assert_within_rate(&in_window(t2, t3), 5.0, 1);
}

#[tokio::test(start_paused = true)]
async fn a_limited_stage_holds_the_source_back_and_no_worker_while_it_waits() {
    let (source, log) = CountingSource::new(10_000);
    let stages = vec![
        StageConfig::new("parse", ExecutionType::Async)
            .workers(2)
            .queue_size(10),
        StageConfig::new("call", ExecutionType::Async)
            .workers(4)
            .queue_size(10)
            .rate_limit(RateLimit::per_second(10)),
    ];
    let window: u64 = stages.iter().map(|s| s.capacity() as u64).sum();
    let pipeline = Pipeline::builder(config("held", stages))
        .unwrap()
        .source(source)
        .async_stage("parse", |item: WorkItem<u64>| async move { Ok(item) })
        .async_stage("call", |item: WorkItem<u64>| async move { Ok(item) })
        .build()
        .unwrap();
    pipeline.start().await.unwrap();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let stats = pipeline.stats().await.unwrap();
        let handed = log.handed_out.load(Ordering::SeqCst);
        assert!(
            handed <= stats.completed_items + window,
            "the source handed out {handed}: more than the {} done plus the window {window}",
            stats.completed_items
        );
        assert_eq!(
            stats.stages[1].in_flight, 0,
            "no worker is held while items wait for the limit"
        );
    }
    let stats = pipeline.stats().await.unwrap();
    assert!(
        (45..=52).contains(&stats.completed_items),
        "10/s for 5 s: {}",
        stats.completed_items
    );
    within(Duration::from_secs(10), pipeline.abort())
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_cost_per_item_is_charged_against_the_limit() {
    let starts = Arc::new(Starts::default());
    let stage = StageConfig::new("call", ExecutionType::Async)
        .workers(4)
        .rate_limit(RateLimit::per_second(10).burst(5));
    let pipeline = Pipeline::builder(config("cost", vec![stage]))
        .unwrap()
        .source(sources::iter(0..20u64))
        .cost_by("call", |_item: &WorkItem<u64>| 5)
        .async_stage("call", {
            let starts = starts.clone();
            move |item: WorkItem<u64>| {
                let starts = starts.clone();
                async move {
                    starts.stamp();
                    Ok(item)
                }
            }
        })
        .build()
        .unwrap();
    let began = Instant::now();
    within(Duration::from_secs(60), pipeline.run())
        .await
        .unwrap();
    // 20 items of 5 units at 10 units/s: 2 items a second, 10 s.
    let starts = starts.sorted();
    assert_within_rate(&starts, 2.0, 1);
    let took = starts.last().unwrap().duration_since(began).as_secs_f64();
    assert!((9.5..10.6).contains(&took), "took {took:.2} s");
}

#[tokio::test]
async fn rate_limits_and_order_read_from_files_and_bad_values_name_the_stage_and_field() {
    let config = PipelineConfig::from_toml_str(
        r#"
        pipeline_name = "p"
        [[stages]]
        name = "fetch"
        execution_type = "async"
        ordered = true
        rate_limit = { allowed = 50, interval = 2.0, burst = 5 }
        "#,
    )
    .unwrap();
    let stage = &config.stages[0];
    assert!(stage.ordered);
    assert_eq!(
        stage.rate_limit,
        Some(RateLimit::new(50, Duration::from_secs(2)).burst(5))
    );
    let json = PipelineConfig::from_json_str(
        r#"{"pipeline_name":"p","stages":[{"name":"fetch","execution_type":"async","rate_limit":{"allowed":3}}]}"#,
    )
    .unwrap();
    assert_eq!(json.stages[0].rate_limit, Some(RateLimit::per_second(3)));
    let bad = PipelineConfig::from_toml_str(
        "pipeline_name = \"p\"\n[[stages]]\nname = \"fetch\"\nexecution_type = \"async\"\nrate_limit = { allowed = 0 }\n",
    )
    .unwrap_err();
    assert!(
        matches!(&bad, ConfigError::InvalidStage { stage, field, .. } if stage == "fetch" && field == "rate_limit.allowed"),
        "{bad}"
    );
}

#[tokio::test]
async fn a_change_to_an_unknown_stage_or_a_bad_value_is_refused_naming_it() {
    let pipeline = Pipeline::builder(config(
        "refused",
        vec![StageConfig::new("work", ExecutionType::Async)],
    ))
    .unwrap()
    .injected::<u64>()
    .async_stage("work", |item: WorkItem<u64>| async move { Ok(item) })
    .build()
    .unwrap();
    assert!(matches!(
        pipeline.set_workers("work", 3).await,
        Err(PipelineError::NotRunning(_))
    ));
    pipeline.start().await.unwrap();
    let e = pipeline.set_workers("nope", 3).await.unwrap_err();
    assert!(e.to_string().contains("`nope`"), "{e}");
    let e = pipeline.set_workers("work", 0).await.unwrap_err();
    assert!(
        matches!(&e, PipelineError::InvalidChange { error: ConfigError::InvalidStage { stage, field, .. }, .. } if stage == "work" && field == "workers"),
        "{e}"
    );
    let e = pipeline
        .set_rate_limit("work", Some(RateLimit::per_second(1).burst(0)))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("rate_limit.burst"), "{e}");
    within(Duration::from_secs(10), pipeline.stop())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_rate_limit_changes_by_message_too() {
    use ractor::rpc::CallResult;
    let pipeline = Pipeline::builder(config(
        "by_message",
        vec![StageConfig::new("work", ExecutionType::Async)],
    ))
    .unwrap()
    .injected::<u64>()
    .async_stage("work", |item: WorkItem<u64>| async move { Ok(item) })
    .build()
    .unwrap();
    let (root, _) = ractor::Actor::spawn(None, Parent, ()).await.unwrap();
    let actor = pipeline.spawn_linked(root.get_cell()).await.unwrap();
    let answer = actor
        .call(
            |reply| PipelineMsg::SetRateLimit {
                stage: "work".into(),
                limit: Some(RateLimit::per_second(1000)),
                reply,
            },
            None,
        )
        .await
        .unwrap();
    assert!(matches!(answer, CallResult::Success(Ok(()))));
    let answer = actor
        .call(
            |reply| PipelineMsg::SetWorkers {
                stage: "work".into(),
                workers: 7,
                reply,
            },
            None,
        )
        .await
        .unwrap();
    assert!(matches!(answer, CallResult::Success(Ok(()))));
    assert_eq!(pipeline.stats().await.unwrap().stages[0].workers, 7);
    pipeline
        .inject((0..50).map(WorkItem::new).collect())
        .await
        .unwrap();
    within(Duration::from_secs(10), pipeline.stop())
        .await
        .unwrap();
    assert_eq!(pipeline.stats().await.unwrap().completed_items, 50);
    root.stop(None);
}

/// A parent for a pipeline spawned linked; it ignores what it hears.
struct Parent;

impl ractor::Actor for Parent {
    type Msg = ();
    type State = ();
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ractor::ActorRef<()>,
        _args: (),
    ) -> Result<(), ractor::ActorProcessingErr> {
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ractor::ActorRef<()>,
        _event: ractor::SupervisionEvent,
        _state: &mut (),
    ) -> Result<(), ractor::ActorProcessingErr> {
        Ok(())
    }
}

/// Runs items through one stage `model` (async or thread) whose
/// handler records how many run at once, resizing it to each of `sizes`
/// in turn while items flow; checks after each resize that stats follow
/// and that, once the retiring workers are done, no more than the new
/// count run at once.
async fn resize_while_flowing(model: ExecutionType, sizes: &[usize]) {
    let running = Arc::new(Running::default());
    let stage = StageConfig::new("work", model).workers(2).queue_size(64);
    let builder = Pipeline::builder(config("resized", vec![stage]))
        .unwrap()
        .source(sources::iter(0u64..));
    let pipeline = match model {
        ExecutionType::Async => builder
            .async_stage("work", {
                let running = running.clone();
                move |item: WorkItem<u64>| {
                    let running = running.clone();
                    async move {
                        running.enter();
                        tokio::time::sleep(delay(item.data, 2)).await;
                        running.leave();
                        Ok(item)
                    }
                }
            })
            .build()
            .unwrap(),
        _ => builder
            .sync_stage("work", {
                let running = running.clone();
                move |item: WorkItem<u64>| {
                    running.enter();
                    std::thread::sleep(delay(item.data, 2));
                    running.leave();
                    Ok(item)
                }
            })
            .build()
            .unwrap(),
    };
    pipeline.start().await.unwrap();
    for &size in sizes {
        pipeline.set_workers("work", size).await.unwrap();
        assert_eq!(pipeline.stats().await.unwrap().stages[0].workers, size);
        // Retiring workers finish their items (at most 2 ms each; more
        // time for threads on a loaded machine).
        tokio::time::sleep(Duration::from_millis(100)).await;
        running.reset_peak();
        tokio::time::sleep(Duration::from_millis(60)).await;
        let peak = running.peak();
        assert!(peak <= size, "{peak} ran at once with {size} workers");
        if size >= 4 {
            assert!(
                peak >= size / 2,
                "only {peak} ran at once with {size} workers"
            );
        }
    }
    // A graceful stop: every item admitted runs to its outcome.
    within(Duration::from_secs(60), pipeline.stop())
        .await
        .unwrap();
    let results = pipeline.run().await.unwrap();
    let stats = pipeline.stats().await.unwrap();
    assert!(results.len() > 1_000, "only {} items flowed", results.len());
    assert_eq!(results.len() as u64, stats.admitted_items);
    assert!(results.iter().all(|r| r.success), "an item failed");
    common::assert_unique_ids(&results);
    assert_eq!(stats.completed_items, stats.admitted_items);
    assert_eq!(stats.active_items, 0);
}

/// The pipeline's window follows a resize: a stage grown far past its
/// configured count, with a small queue, gets items for its workers (the
/// window stayed as configured once, and held it to 6 at once), and
/// once it is shrunk again no more items are in the pipeline than the
/// rooms in force allow.
#[tokio::test(start_paused = true)]
async fn a_grown_stage_gets_items_for_every_worker_and_a_shrunk_one_holds_less() {
    let running = Arc::new(Running::default());
    let stages = vec![
        StageConfig::new("work", ExecutionType::Async)
            .workers(2)
            .queue_size(1),
        StageConfig::new("after", ExecutionType::Async)
            .workers(2)
            .queue_size(1),
    ];
    let pipeline = Pipeline::builder(config("window", stages))
        .unwrap()
        .source(sources::iter(0u64..))
        .async_stage("work", {
            let running = running.clone();
            move |item: WorkItem<u64>| {
                let running = running.clone();
                async move {
                    running.enter();
                    tokio::time::sleep(Duration::from_millis(1) + delay(item.data, 4)).await;
                    running.leave();
                    Ok(item)
                }
            }
        })
        .async_stage("after", |item: WorkItem<u64>| async move { Ok(item) })
        .build()
        .unwrap();
    pipeline.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(running.peak() <= 2);
    pipeline.set_workers("work", 16).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    running.reset_peak();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Demand goes upstream in chunks of half the stage's room, so not
    // every worker is busy at every instant; with the configured window
    // no more than 6 could be.
    let peak = running.peak();
    assert!(peak >= 12, "only {peak} of 16 workers had an item at once");
    pipeline.set_workers("work", 2).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let active = pipeline.stats().await.unwrap().active_items;
    // (1 + 2) + (1 + 2): the rooms at 2 workers.
    assert!(
        active <= 6,
        "{active} items in the pipeline after the shrink"
    );
    within(Duration::from_secs(10), pipeline.stop())
        .await
        .unwrap();
    let results = pipeline.run().await.unwrap();
    assert!(results.iter().all(|r| r.success));
}

#[tokio::test(start_paused = true)]
async fn growing_and_shrinking_an_async_stage_while_items_flow_loses_nothing() {
    resize_while_flowing(ExecutionType::Async, &[16, 1, 8, 3, 12, 2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn growing_and_shrinking_a_thread_stage_while_items_flow_loses_nothing() {
    resize_while_flowing(ExecutionType::Thread, &[8, 1, 4]).await;
}

/// A shrink ends the workers it retires, the idle ones at once and the
/// busy ones once their items are done: their tasks are gone. (A worker
/// waits for work in its hand, not in its mailbox; a retired one must stop
/// waiting there for its stop to be taken.) And the stage still runs
/// items with the workers it kept.
#[tokio::test(start_paused = true)]
async fn shrinking_a_stage_ends_the_tasks_of_the_workers_it_retires() {
    let stages = vec![
        StageConfig::new("work", ExecutionType::Async)
            .workers(16)
            .queue_size(4),
    ];
    let pipeline = Pipeline::builder(config("shrink", stages))
        .unwrap()
        .injected::<u64>()
        .async_stage("work", |item: WorkItem<u64>| async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(item)
        })
        .build()
        .unwrap();
    pipeline.start().await.unwrap();
    // 4 of the 16 are busy when the shrink comes.
    pipeline
        .inject((0..4).map(WorkItem::new).collect())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let before = alive_tasks();
    pipeline.set_workers("work", 2).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = alive_tasks();
    assert!(
        after + 14 <= before,
        "{before} tasks before shrinking 16 workers to 2, {after} after"
    );
    pipeline
        .inject((4..10).map(WorkItem::new).collect())
        .await
        .unwrap();
    within(Duration::from_secs(10), pipeline.stop())
        .await
        .unwrap();
    let results = pipeline.run().await.unwrap();
    assert_eq!(results.len(), 10);
    assert!(results.iter().all(|r| r.success));
}

/// What the stage after an ordered one saw, in the order it saw it.
async fn ordered_run(workers: usize) -> (Vec<u64>, Vec<WorkItemResult>) {
    let n = 400u64;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let tries = Arc::new(Mutex::new(HashMap::<u64, u32>::new()));
    let stages = vec![
        StageConfig::new("work", ExecutionType::Async)
            .workers(workers)
            .queue_size(32)
            .ordered(true)
            .retry(RetryPolicy::fixed(3, Duration::from_millis(5))),
        StageConfig::new("collect", ExecutionType::Async).workers(1),
    ];
    let pipeline = Pipeline::builder(config("ordered", stages))
        .unwrap()
        .source(sources::iter(0..n))
        .retrying_async_stage("work", {
            let tries = tries.clone();
            move |item: WorkItem<u64>| {
                let tries = tries.clone();
                async move {
                    tokio::time::sleep(delay(item.data, 20)).await;
                    let attempt = {
                        let mut tries = tries.lock().unwrap();
                        let t = tries.entry(item.data).or_default();
                        *t += 1;
                        *t
                    };
                    // Every 7th fails once (then succeeds on its retry),
                    // every 11th fails for good.
                    anyhow::ensure!(item.data % 11 != 5, "always fails");
                    anyhow::ensure!(item.data % 7 != 3 || attempt > 1, "fails once");
                    Ok(item)
                }
            }
        })
        .async_stage("collect", {
            let seen = seen.clone();
            move |item: WorkItem<u64>| {
                seen.lock().unwrap().push(item.data);
                async move { Ok(item) }
            }
        })
        .build()
        .unwrap();
    let results = within(Duration::from_secs(120), pipeline.run())
        .await
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    (seen, results)
}

#[tokio::test(start_paused = true)]
async fn ordered_output_equals_input_order_with_any_worker_count_retries_and_failures() {
    for workers in [1, 3, 16] {
        let (seen, results) = ordered_run(workers).await;
        let expected: Vec<u64> = (0..400).filter(|n| n % 11 != 5).collect();
        assert_eq!(seen, expected, "with {workers} workers");
        assert_eq!(results.len(), 400);
        let failed = results.iter().filter(|r| !r.success).count();
        assert_eq!(failed, expected.len().abs_diff(400));
    }
}

#[tokio::test(start_paused = true)]
async fn an_ordered_last_stage_reports_its_results_in_input_order() {
    let stage = StageConfig::new("work", ExecutionType::Async)
        .workers(8)
        .queue_size(16)
        .ordered(true);
    let order = Arc::new(Mutex::new(Vec::new()));
    let pipeline = Pipeline::builder(config("ordered_last", vec![stage]))
        .unwrap()
        .on_complete({
            let order = order.clone();
            move |r: &WorkItemResult| order.lock().unwrap().push(r.success)
        })
        .source(sources::iter(0..200u64))
        .async_stage("work", |item: WorkItem<u64>| async move {
            tokio::time::sleep(delay(item.data, 10)).await;
            anyhow::ensure!(!item.data.is_multiple_of(9), "no multiples of 9");
            Ok(item)
        })
        .build()
        .unwrap();
    let results = within(Duration::from_secs(60), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.iter().filter(|r| r.success).count(), 200 - 23);
    // Results finish in input order: successes and failures interleave
    // exactly as the input's multiples of 9 do.
    let expected: Vec<bool> = (0..200u64).map(|n| n % 9 != 0).collect();
    assert_eq!(*order.lock().unwrap(), expected);
}

#[tokio::test(start_paused = true)]
async fn key_lanes_keep_per_key_order_never_run_one_key_twice_at_once_and_overlap_keys() {
    let n = 600u64;
    let keys = 6u64;
    let running = Arc::new(Running::default());
    let busy = Arc::new(Mutex::new(HashMap::<u64, bool>::new()));
    let order = Arc::new(Mutex::new(HashMap::<u64, Vec<u64>>::new()));
    let tries = Arc::new(Mutex::new(HashMap::<u64, u32>::new()));
    let stage = StageConfig::new("apply", ExecutionType::Async)
        .workers(8)
        .queue_size(32)
        .retry(RetryPolicy::fixed(2, Duration::from_millis(3)));
    let pipeline = Pipeline::builder(config("keyed", vec![stage]))
        .unwrap()
        .source(sources::iter(0..n))
        .keyed_by("apply", move |item: &WorkItem<u64>| item.data % keys)
        .retrying_async_stage("apply", {
            let (running, busy, order, tries) =
                (running.clone(), busy.clone(), order.clone(), tries.clone());
            move |item: WorkItem<u64>| {
                let (running, busy, order, tries) =
                    (running.clone(), busy.clone(), order.clone(), tries.clone());
                async move {
                    let key = item.data % keys;
                    let was = busy.lock().unwrap().insert(key, true);
                    assert_ne!(was, Some(true), "two items of key {key} at once");
                    running.enter();
                    tokio::time::sleep(delay(item.data, 10)).await;
                    running.leave();
                    busy.lock().unwrap().insert(key, false);
                    let attempt = {
                        let mut tries = tries.lock().unwrap();
                        let t = tries.entry(item.data).or_default();
                        *t += 1;
                        *t
                    };
                    // Every 5th fails once: its retry still comes before
                    // the later items of its key.
                    anyhow::ensure!(item.data % 5 != 1 || attempt > 1, "fails once");
                    order
                        .lock()
                        .unwrap()
                        .entry(key)
                        .or_default()
                        .push(item.data);
                    Ok(item)
                }
            }
        })
        .build()
        .unwrap();
    let results = within(Duration::from_secs(120), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), n as usize);
    assert!(results.iter().all(|r| r.success));
    let order = order.lock().unwrap();
    for key in 0..keys {
        let expected: Vec<u64> = (0..n).filter(|d| d % keys == key).collect();
        assert_eq!(order[&key], expected, "key {key} out of order");
    }
    let overlap = running.peak();
    assert!(overlap > 1, "distinct keys never overlapped ({overlap})");
    assert!(overlap <= keys as usize);
}

#[tokio::test]
async fn a_policy_named_for_another_stage_is_a_build_error() {
    let err = Pipeline::builder(config(
        "misplaced",
        vec![
            StageConfig::new("a", ExecutionType::Async),
            StageConfig::new("b", ExecutionType::Async),
        ],
    ))
    .unwrap()
    .source(sources::iter(0..10u64))
    .keyed_by("b", |item: &WorkItem<u64>| item.data)
    .async_stage("a", |item: WorkItem<u64>| async move { Ok(item) })
    .async_stage("b", |item: WorkItem<u64>| async move { Ok(item) })
    .build()
    .unwrap_err();
    assert!(
        matches!(&err, BuildError::PolicyOutOfPlace { stage, method: "keyed_by", .. } if stage == "b"),
        "{err}"
    );
}
