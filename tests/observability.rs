//! What a running pipeline tells: events in causal order per item, a
//! periodic stats line every `stats_interval` (none when zero), and stats
//! that serialise to JSON with the seed's fields.

use std::collections::HashMap;

use std::time::Duration;

use bergtalzug::prelude::*;
use futures::StreamExt;

mod common;
use common::*;

fn two_stage(name: &str, items: u64) -> Pipeline<u64> {
    Pipeline::builder(config(
        name,
        vec![
            StageConfig::new("a", ExecutionType::Async)
                .workers(2)
                .queue_size(4),
            StageConfig::new("b", ExecutionType::Cpu)
                .workers(2)
                .queue_size(4),
        ],
    ))
    .unwrap()
    .source(sources::iter(0..items))
    .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
    .sync_stage("b", |i: WorkItem<u64>| {
        if i.data == 3 {
            anyhow::bail!("three is rejected");
        }
        Ok(i)
    })
    .build()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_see_each_items_life_in_order() {
    let pipeline = two_stage("events", 20);
    let events = pipeline.subscribe();
    let run = tokio::spawn({
        let pipeline = pipeline.clone();
        async move { pipeline.run().await }
    });
    let all: Vec<PipelineEvent> = within(Duration::from_secs(10), events.collect()).await;
    let results = run.await.unwrap().unwrap();
    assert_eq!(results.len(), 20);
    assert!(
        matches!(all.last(), Some(PipelineEvent::PipelineFinished(stats)) if stats.completed_items == 20)
    );

    let mut lives: HashMap<JobId, Vec<String>> = HashMap::new();
    for event in &all {
        let (id, step) = match event {
            PipelineEvent::ItemQueued { job_id, stage } => {
                (job_id.clone(), format!("queued {stage}"))
            }
            PipelineEvent::ItemStarted { job_id, stage, .. } => {
                (job_id.clone(), format!("started {stage}"))
            }
            PipelineEvent::ItemCompleted {
                job_id,
                stage,
                success,
                ..
            } => (job_id.clone(), format!("completed {stage} {success}")),
            PipelineEvent::ItemFinished(r) => (r.job_id.clone(), format!("finished {}", r.success)),
            _ => continue,
        };
        lives.entry(id).or_default().push(step);
    }
    assert_eq!(lives.len(), 20);
    let ok = [
        "queued a",
        "started a",
        "completed a true",
        "queued b",
        "started b",
        "completed b true",
        "finished true",
    ];
    let rejected = [
        "queued a",
        "started a",
        "completed a true",
        "queued b",
        "started b",
        "completed b false",
        "finished false",
    ];
    for (id, life) in &lives {
        let failed = results.iter().any(|r| &r.job_id == id && !r.success);
        let expected: &[&str] = if failed { &rejected } else { &ok };
        assert_eq!(life, expected, "{id}");
    }
}

/// How many stats lines were logged.
fn stats_lines(captured: &Captured) -> usize {
    captured
        .lines()
        .iter()
        .filter(|l| l.contains(" items/s"))
        .count()
}

async fn slow_run(interval: Duration) -> usize {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let config = PipelineConfig::new(
        "logged",
        vec![StageConfig::new("slow", ExecutionType::Async).workers(1)],
    )
    .stats_interval(interval);
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(0..5u64))
        .async_stage("slow", |i: WorkItem<u64>| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok(i)
        })
        .build()
        .unwrap();
    within(Duration::from_secs(60), pipeline.run())
        .await
        .unwrap();
    stats_lines(&captured)
}

#[tokio::test(start_paused = true)]
async fn the_stats_line_is_logged_every_interval_unless_zero() {
    // 5 s of work, a line every 2 s: at 2 s and 4 s.
    let lines = slow_run(Duration::from_secs(2)).await;
    assert!((2..=3).contains(&lines), "{lines} stats lines");
    assert_eq!(slow_run(Duration::ZERO).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_serialise_with_the_seeds_fields() {
    let pipeline = two_stage("json", 50);
    within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap();
    let stats = pipeline.stats().await.unwrap();
    assert_eq!(stats.completed_items, 50);
    assert_eq!(stats.failed_items, 1);
    assert!((stats.success_rate - 0.98).abs() < 1e-9);
    let json = serde_json::to_value(&stats).unwrap();
    for key in [
        "pipeline_name",
        "active_items",
        "active_by_stage",
        "completed_items",
        "failed_items",
        "success_rate",
        "average_duration",
        "stages",
    ] {
        assert!(json.get(key).is_some(), "missing {key}: {json}");
    }
    assert_eq!(json["stages"][1]["name"], "b");
    assert_eq!(json["stages"][1]["execution_type"], "cpu");
    assert_eq!(json["stages"][1]["failed"], 1);
    assert!(json["stages"][0]["p99_duration"].is_f64());
    assert_eq!(json["active_by_stage"]["a"], 0);
}

/// The keys of a JSON object, sorted.
fn keys(value: &serde_json::Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_json_has_exactly_the_documented_shape() {
    let pipeline = two_stage("shape", 50);
    within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap();
    let json = serde_json::to_value(pipeline.stats().await.unwrap()).unwrap();
    let mut pipeline_keys = vec![
        "pipeline_name",
        "elapsed",
        "admitted_items",
        "expected_items",
        "active_items",
        "active_by_stage",
        "completed_items",
        "failed_items",
        "cancelled_items",
        "success_rate",
        "average_duration",
        "p50_duration",
        "p90_duration",
        "p99_duration",
        "items_per_second",
        "recent_items_per_second",
        "bottleneck",
        "stalled_items",
        "source_errors",
        "held_back_by",
        "derived_items_finished",
        "derived_items_failed",
        "stages",
    ];
    pipeline_keys.sort_unstable();
    assert_eq!(keys(&json), pipeline_keys);
    let mut stage_keys = vec![
        "name",
        "execution_type",
        "workers",
        "admitted",
        "processed",
        "failed",
        "retried",
        "queued",
        "in_flight",
        "waiting_downstream",
        "items_per_second",
        "utilisation",
        "stalled",
        "stuck_threads",
        "derived",
        "derived_live",
        "batches",
        "average_duration",
        "p50_duration",
        "p90_duration",
        "p99_duration",
        "average_queue_wait",
        "p50_queue_wait",
        "p90_queue_wait",
        "p99_queue_wait",
    ];
    stage_keys.sort_unstable();
    let stages = json["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 2);
    for stage in stages {
        assert_eq!(keys(stage), stage_keys);
        // Durations are seconds; counts are integers; rates are numbers.
        for key in ["p50_duration", "p90_duration", "p99_queue_wait"] {
            assert!(
                stage[key].as_f64().is_some_and(|s| s >= 0.0),
                "{key}: {stage}"
            );
        }
        assert_eq!(stage["admitted"], 50);
        assert!(
            stage["utilisation"]
                .as_f64()
                .is_some_and(|u| (0.0..=1.0).contains(&u))
        );
    }
    // 50 from `sources::iter(0..50)`, which knows its length.
    assert_eq!(json["expected_items"], 50);
    assert_eq!(json["admitted_items"], 50);
    assert_eq!(json["stalled_items"], 0);
    assert!(json["elapsed"].as_f64().is_some_and(|s| s > 0.0));
    assert!(json["p99_duration"].as_f64().is_some());
    assert!(
        json["recent_items_per_second"]
            .as_f64()
            .is_some_and(|r| r > 0.0)
    );
    assert!(json["bottleneck"].is_string(), "{}", json["bottleneck"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_item_is_reported_while_it_runs() {
    // Real time: one item holds its worker for 1 s; the threshold is 100 ms.
    let pipeline = Pipeline::builder(
        config(
            "stall",
            vec![
                StageConfig::new("fetch", ExecutionType::Async).workers(2),
                StageConfig::new("hang", ExecutionType::Thread).workers(1),
            ],
        )
        .stall_threshold(Duration::from_millis(100)),
    )
    .unwrap()
    .source(sources::items(vec![
        WorkItem::with_job_id("quick", 0u64),
        WorkItem::with_job_id("slow", 1u64),
    ]))
    .async_stage("fetch", |i: WorkItem<u64>| async move { Ok(i) })
    .sync_stage("hang", |i: WorkItem<u64>| {
        if i.data == 1 {
            std::thread::sleep(Duration::from_secs(1));
        }
        Ok(i)
    })
    .build()
    .unwrap();
    // The report comes while the item is still held.
    let (event, run) = run_to_first_control_event(&pipeline).await;
    assert!(!pipeline.is_finished());
    let PipelineEvent::ItemStalled {
        job_id, stage, age, ..
    } = event
    else {
        panic!("not a stall: {event:?}");
    };
    assert_eq!(job_id, JobId::from("slow"));
    assert_eq!(&*stage, "hang");
    assert!(age >= Duration::from_millis(100), "{age:?}");
    within(Duration::from_secs(10), run).await.unwrap().unwrap();
    let stats = pipeline.stats().await.unwrap();
    assert_eq!(stats.stalled_items, 1);
    assert_eq!(stats.stage("hang").unwrap().stalled, 1);
    assert_eq!(stats.stage("fetch").unwrap().stalled, 0);
}

/// A blocking worker holds the outcomes of its batch's quick items for up
/// to its report period while its thread goes on to the next: a stall
/// names the item the handler is running, not a finished one before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_stall_names_the_item_running_not_a_finished_one_before_it() {
    // Real time: the third item holds the only worker for 600 ms; the
    // threshold is 100 ms. The three come in one batch to that worker.
    let pipeline = Pipeline::builder(
        config(
            "stall-batch",
            vec![StageConfig::new("hang", ExecutionType::Thread).workers(1)],
        )
        .stall_threshold(Duration::from_millis(100)),
    )
    .unwrap()
    .source(sources::items(vec![
        WorkItem::with_job_id("quick-1", 0u64),
        WorkItem::with_job_id("quick-2", 0u64),
        WorkItem::with_job_id("slow", 1u64),
    ]))
    .sync_stage("hang", |i: WorkItem<u64>| {
        if i.data == 1 {
            std::thread::sleep(Duration::from_millis(600));
        }
        Ok(i)
    })
    .build()
    .unwrap();
    let (event, run) = run_to_first_control_event(&pipeline).await;
    let PipelineEvent::ItemStalled { job_id, .. } = event else {
        panic!("not a stall: {event:?}");
    };
    assert_eq!(job_id, JobId::from("slow"));
    within(Duration::from_secs(10), run).await.unwrap().unwrap();
    assert_eq!(pipeline.stats().await.unwrap().stalled_items, 1);
}

/// Runs `pipeline` in a task and waits (at most 5 s) for its first control
/// event (stalls, restarts, ...): the event and the running task.
async fn run_to_first_control_event(
    pipeline: &Pipeline<u64>,
) -> (
    PipelineEvent,
    tokio::task::JoinHandle<Result<Vec<WorkItemResult>, PipelineError>>,
) {
    let mut events = pipeline.subscribe_filtered(EventFilter::none().with_control());
    let run = tokio::spawn({
        let pipeline = pipeline.clone();
        async move { pipeline.run().await }
    });
    let event = within(Duration::from_secs(5), events.recv()).await.unwrap();
    (event, run)
}

fn two_async(name: &str, items: u64) -> Pipeline<u64> {
    Pipeline::builder(config(
        name,
        vec![
            StageConfig::new("a", ExecutionType::Async),
            StageConfig::new("b", ExecutionType::Async),
        ],
    ))
    .unwrap()
    .source(sources::iter(0..items))
    .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
    .async_stage("b", |i: WorkItem<u64>| async move { Ok(i) })
    .build()
    .unwrap()
}

/// A stream kept and never read (the default subscription is lossy) costs
/// its buffer and nothing else: the pipeline finishes, and the stream still
/// ends with `PipelineFinished`, counting what it lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_never_stalls_the_pipeline() {
    let pipeline = two_async("forgotten", 3_000);
    let mut forgotten = pipeline.subscribe();
    assert!(!forgotten.is_lossless());
    let results = within(Duration::from_secs(20), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 3_000);
    assert!(
        forgotten.dropped() > 0,
        "3,000 items make more events than fit"
    );
    let mut kept = 0u64;
    let mut last = None;
    while let Some(event) = forgotten.recv().await {
        kept += 1;
        last = Some(event);
    }
    assert!(kept <= bergtalzug::event::EVENT_BUFFER as u64);
    assert!(matches!(last, Some(PipelineEvent::PipelineFinished(_))));
}

/// A lossless subscriber is an explicit choice: one that does not read
/// holds the pipeline back, and the pipeline says so (a warning naming
/// where it subscribed, a `SubscriberStalled` event to the others); abort
/// does not wait for it, and it still gets every terminal event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_held_back_by_a_lossless_subscriber_says_so() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_global_default(subscriber);
    let pipeline = two_async("held-back", 1_000_000);
    let mut stuck = pipeline.subscribe_lossless();
    let mut watcher = pipeline.subscribe_filtered(EventFilter::none().with_control());
    pipeline.start().await.unwrap();
    let event = within(Duration::from_secs(10), watcher.recv())
        .await
        .unwrap();
    let PipelineEvent::SubscriberStalled { subscriber, waited } = event else {
        panic!("not a subscriber stall: {event:?}");
    };
    assert!(subscriber.contains("observability.rs"), "{subscriber}");
    assert!(waited >= Duration::from_secs(1));
    assert!(!pipeline.is_finished(), "held back");
    let held_back_by = pipeline.stats().await.unwrap().held_back_by.unwrap();
    assert!(held_back_by.contains("observability.rs"), "{held_back_by}");
    let log = captured.text();
    assert!(
        log.contains("lossless event subscriber at") && log.contains("observability.rs"),
        "{log}"
    );
    within(Duration::from_secs(5), pipeline.abort())
        .await
        .unwrap();
    let results = pipeline.run().await.unwrap();
    let mut finished = 0;
    let mut last = None;
    while let Some(event) = within(Duration::from_secs(5), stuck.recv()).await {
        if matches!(event, PipelineEvent::ItemFinished(_)) {
            finished += 1;
        }
        last = Some(event);
    }
    assert_eq!(finished, results.len(), "lossless: every ItemFinished");
    assert!(matches!(last, Some(PipelineEvent::PipelineFinished(_))));
}

/// Each subscriber gets the `ItemFinished` events its filter takes, and only
/// those: a failures-only subscriber the failed items, alone or beside one
/// that takes every finished item (the tracker builds only the events some
/// filter takes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_subscriber_gets_the_finished_items_its_filter_takes() {
    async fn finished_ids(mut events: bergtalzug::EventStream) -> (Vec<String>, Vec<String>) {
        let (mut ok, mut failed) = (Vec::new(), Vec::new());
        while let Some(event) = events.recv().await {
            match event {
                PipelineEvent::ItemFinished(result) if result.success => {
                    ok.push(result.job_id.to_string())
                }
                PipelineEvent::ItemFinished(result) => failed.push(result.job_id.to_string()),
                PipelineEvent::PipelineFinished(_) => break,
                _ => {}
            }
        }
        ok.sort();
        failed.sort();
        (ok, failed)
    }
    let build = |name: &str| {
        Pipeline::builder(config(
            name,
            vec![StageConfig::new("odd", ExecutionType::Async).workers(2)],
        ))
        .unwrap()
        .source(sources::items(
            (0..10u64).map(|n| WorkItem::with_job_id(format!("job-{n}"), n)),
        ))
        .async_stage("odd", |i: WorkItem<u64>| async move {
            if i.data % 2 == 1 {
                anyhow::bail!("odd");
            }
            Ok(i)
        })
        .build()
        .unwrap()
    };
    let odd: Vec<String> = (1..10).step_by(2).map(|n| format!("job-{n}")).collect();
    let even: Vec<String> = (0..10).step_by(2).map(|n| format!("job-{n}")).collect();

    // Beside a subscriber that takes every finished item.
    let pipeline = build("finished-both");
    let all = pipeline.subscribe_filtered(EventFilter::finished().lossless());
    let failures = pipeline.subscribe_filtered(EventFilter::failures().lossless());
    let control = pipeline.subscribe_filtered(EventFilter::none().with_control());
    let (all, failures, control) = (
        tokio::spawn(finished_ids(all)),
        tokio::spawn(finished_ids(failures)),
        tokio::spawn(finished_ids(control)),
    );
    within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap();
    assert_eq!(all.await.unwrap(), (even.clone(), odd.clone()));
    assert_eq!(failures.await.unwrap(), (vec![], odd.clone()));
    assert_eq!(control.await.unwrap(), (vec![], vec![]));

    // Alone.
    let pipeline = build("finished-alone");
    let failures = tokio::spawn(finished_ids(
        pipeline.subscribe_filtered(EventFilter::failures().lossless()),
    ));
    within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap();
    assert_eq!(failures.await.unwrap(), (vec![], odd));
}

/// The final stats of a finished run show no stage holding an item: every
/// admitted item has its outcome, even if a stage had not yet published its
/// gauges after sending its last results (seen once as `in_flight` 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_run_shows_no_stage_holding_an_item() {
    for run in 0..20 {
        let pipeline = two_stage(&format!("settled-{run}"), 300);
        within(Duration::from_secs(10), pipeline.run())
            .await
            .unwrap();
        let stats = pipeline.stats().await.unwrap();
        assert_eq!(stats.active_items, 0);
        for stage in &stats.stages {
            assert_eq!(
                (stage.queued, stage.in_flight, stage.waiting_downstream),
                (0, 0, 0),
                "run {run}, stage {}: {stats}",
                stage.name
            );
        }
        assert!(
            stats.active_by_stage.values().all(|held| *held == 0),
            "{stats}"
        );
    }
}
