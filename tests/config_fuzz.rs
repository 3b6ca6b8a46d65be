//! Hostile configuration: the TOML and JSON loaders never panic, whatever
//! the input, and a document that parses but holds a bad value is a
//! `ConfigError` naming the field.
//!
//! Three generators: arbitrary text; valid documents cut, spliced and
//! sprinkled with junk; and valid documents with one field set to a random
//! value of a random type, extreme numbers included (1e-7 s, 1e19 s, 10^9
//! workers). A value that parses but could not run (a timer faster than
//! 1 ms, a duration past 10 years, more workers than `MAX_WORKERS`) must be
//! refused too, naming its field; and configs at the limits must run. `cargo fuzz` needs a nightly toolchain, which this
//! machine does not have, so proptest does the fuzzing; it runs in every
//! `cargo test` (a few seconds) and longer with
//! `FUZZ_CASES=100000 cargo test --release --test config_fuzz`.

use std::time::Duration;

use bergtalzug::config::{MAX_DURATION, MAX_QUEUE_SIZE, MAX_WORKERS, MIN_INTERVAL};
use bergtalzug::prelude::*;
use proptest::prelude::*;
use serde_json::{Value, json};

mod common;
use common::within;

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(400)
}

fn valid() -> Value {
    json!({
        "pipeline_name": "fuzzed",
        "queue_refresh_rate": 0.5,
        "stats_interval_seconds": 0,
        "enable_tracking": true,
        "retain_results": false,
        "max_refill_failures": 5,
        "stages": [
            {"name": "fetch", "execution_type": "async", "workers": 10, "queue_size": 100,
             "timeout": 30.0,
             "retry": {"max_attempts": 3, "initial_delay": 0.05, "multiplier": 2.0,
                       "max_delay": 5.0, "jitter": 0.2}},
            {"name": "parse", "execution_type": "thread", "workers": 2, "queue_size": 50,
             "restart_budget": {"max_restarts": 5, "window": 60.0}},
            {"name": "crunch", "execution_type": "interpreter", "workers": 2}
        ]
    })
}

/// Parses `text` both ways it could be meant; neither may panic.
fn load(
    text: &str,
) -> (
    Result<PipelineConfig, ConfigError>,
    Result<PipelineConfig, ConfigError>,
) {
    (
        PipelineConfig::from_toml_str(text),
        PipelineConfig::from_json_str(text),
    )
}

/// Every error explains itself.
fn explained(result: &Result<PipelineConfig, ConfigError>) {
    if let Err(e) = result {
        assert!(!e.to_string().trim().is_empty(), "{e:?}");
    }
}

/// Every place a value can go, as a JSON pointer into [`valid`].
const FIELDS: &[&str] = &[
    "/pipeline_name",
    "/queue_refresh_rate",
    "/stats_interval_seconds",
    "/enable_tracking",
    "/retain_results",
    "/max_refill_failures",
    "/stages",
    "/stages/0",
    "/stages/0/name",
    "/stages/0/execution_type",
    "/stages/0/workers",
    "/stages/0/queue_size",
    "/stages/0/timeout",
    "/stages/0/retry",
    "/stages/0/retry/max_attempts",
    "/stages/0/retry/initial_delay",
    "/stages/0/retry/multiplier",
    "/stages/0/retry/max_delay",
    "/stages/0/retry/jitter",
    "/stages/1/restart_budget",
    "/stages/1/restart_budget/max_restarts",
    "/stages/1/restart_budget/window",
    "/stages/2/name",
    "/stages/2/workers",
];

fn any_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::from)),
        prop_oneof![Just(0.0), Just(-1.0), Just(1e300), Just(0.5), Just(2.0)].prop_map(Value::from),
        // Values that parse as durations or counts but could not run.
        prop_oneof![
            Just(1e-7),
            Just(1e-4),
            Just(1e19),
            Just(MAX_DURATION.as_secs_f64() * 1.01),
            Just(1e9)
        ]
        .prop_map(Value::from),
        prop_oneof![
            Just(1_000_000_000u64),
            Just(MAX_WORKERS as u64 + 1),
            Just(u64::MAX >> 1)
        ]
        .prop_map(Value::from),
        "[a-z_]{0,12}".prop_map(Value::from),
        prop_oneof![
            Just("created"),
            Just("async"),
            Just("process"),
            Just("fetch"),
            Just("")
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,10}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
        let (toml, json) = load(&text);
        explained(&toml);
        explained(&json);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let (toml, json) = load(&String::from_utf8_lossy(&bytes));
        explained(&toml);
        explained(&json);
    }

    #[test]
    fn mutated_documents_never_panic(
        toml_form in any::<bool>(),
        cut in (0.0f64..1.0, 0usize..40),
        junk in "[\\[\\]{}=,.:\"'#\\n a-z0-9-]{0,12}",
        at in 0.0f64..1.0,
        twice in any::<bool>(),
    ) {
        let mut text = if toml_form {
            toml::to_string(&valid()).unwrap()
        } else {
            serde_json::to_string_pretty(&valid()).unwrap()
        };
        let chars: Vec<char> = text.chars().collect();
        let start = (cut.0 * chars.len() as f64) as usize;
        let end = (start + cut.1).min(chars.len());
        let mut chars: Vec<char> = chars[..start].iter().chain(&chars[end..]).copied().collect();
        let at = (at * chars.len() as f64) as usize;
        chars.splice(at..at, junk.chars());
        text = chars.into_iter().collect();
        if twice {
            text = format!("{text}\n{text}");
        }
        let (toml, json) = load(&text);
        explained(&toml);
        explained(&json);
    }

    #[test]
    fn a_bad_value_names_its_field(field in prop::sample::select(FIELDS), value in any_value(), toml_form in any::<bool>()) {
        let mut doc = valid();
        *doc.pointer_mut(field).unwrap() = value;
        let text = if toml_form {
            // TOML has no null; a value TOML cannot hold is JSON's to test.
            match toml::to_string(&doc) {
                Ok(text) => text,
                Err(_) => return Ok(()),
            }
        } else {
            doc.to_string()
        };
        let result = if toml_form {
            PipelineConfig::from_toml_str(&text)
        } else {
            PipelineConfig::from_json_str(&text)
        };
        let key = field.rsplit('/').find(|p| p.parse::<usize>().is_err()).unwrap();
        match result {
            Ok(config) => {
                // Accepted: then it is valid, within what can run, and
                // survives a round trip (durations as float seconds, so not
                // always to the nanosecond).
                config.validate().unwrap();
                prop_assert!(runnable(&config), "accepted what cannot run: {}", text);
                let again = serde_json::to_string(&config).unwrap();
                let back = PipelineConfig::from_json_str(&again).unwrap();
                prop_assert_eq!(back.stages.len(), config.stages.len());
                prop_assert_eq!(&back.pipeline_name, &config.pipeline_name);
            }
            Err(ConfigError::Parse { field: Some(named), .. }) => {
                prop_assert!(
                    named.contains(key) || key == "stages",
                    "{} named `{}` for a bad {}", text, named, field
                );
            }
            Err(ConfigError::Parse { field: None, message, .. }) => {
                // Only a whole-document problem may go without a field.
                prop_assert!(false, "no field named for a bad {}: {} ({})", field, message, text);
            }
            Err(ConfigError::Invalid { field: named, .. })
            | Err(ConfigError::InvalidStage { field: named, .. }) => {
                prop_assert!(
                    named.contains(key) || ["name", "stages"].contains(&named.as_str()),
                    "named `{}` for a bad {}", named, field
                );
            }
            Err(other) => prop_assert!(false, "{other}"),
        }
    }
}

/// The limits of what can run, stated apart from `validate`: no duration
/// past [`MAX_DURATION`], timers no faster than [`MIN_INTERVAL`] (the stats
/// line may be off), at most [`MAX_WORKERS`] workers and [`MAX_QUEUE_SIZE`]
/// queued items per stage.
fn runnable(config: &PipelineConfig) -> bool {
    let duration = |d: Duration| d <= MAX_DURATION;
    let interval = |d: Duration| d >= MIN_INTERVAL && duration(d);
    interval(config.queue_refresh_rate)
        && (config.stats_interval.is_zero() || interval(config.stats_interval))
        && config.stall_threshold.is_none_or(duration)
        && config.stages.iter().all(|s| {
            s.workers <= MAX_WORKERS
                && s.queue_size <= MAX_QUEUE_SIZE
                && s.timeout.is_none_or(duration)
                && s.restart_budget.is_none_or(|b| duration(b.window))
                && s.retry
                    .is_none_or(|r| duration(r.initial_delay) && duration(r.max_delay))
        })
}

/// Each value once parsed but broke the run (issue 20): a timer that fired
/// faster than it was answered (memory grew by 900 MiB in 6 s and `stop()`
/// hung), an `Instant` overflow in every Thread attempt, a stage actor that
/// failed on its retry timer, an allocation failure that aborted.
#[test]
fn values_that_parse_but_cannot_run_are_refused_naming_the_field() {
    let cases: &[(&str, Value, Option<&str>, &str)] = &[
        (
            "/stats_interval_seconds",
            json!(1e-7),
            None,
            "stats_interval_seconds",
        ),
        (
            "/stats_interval_seconds",
            json!(1e19),
            None,
            "stats_interval_seconds",
        ),
        (
            "/queue_refresh_rate",
            json!(0.0),
            None,
            "queue_refresh_rate",
        ),
        (
            "/queue_refresh_rate",
            json!(1e-9),
            None,
            "queue_refresh_rate",
        ),
        ("/stages/1/timeout", json!(1e19), Some("parse"), "timeout"),
        ("/stages/0/timeout", json!(1e10), Some("fetch"), "timeout"),
        (
            "/stages/0/retry/initial_delay",
            json!(1e19),
            Some("fetch"),
            "retry.initial_delay",
        ),
        (
            "/stages/0/retry/max_delay",
            json!(1e19),
            Some("fetch"),
            "retry.max_delay",
        ),
        (
            "/stages/1/restart_budget/window",
            json!(1e19),
            Some("parse"),
            "restart_budget.window",
        ),
        (
            "/stages/0/workers",
            json!(1_000_000_000u64),
            Some("fetch"),
            "workers",
        ),
        (
            "/stages/2/workers",
            json!(MAX_WORKERS + 1),
            Some("crunch"),
            "workers",
        ),
        (
            "/stages/0/queue_size",
            json!(u64::MAX >> 1),
            Some("fetch"),
            "queue_size",
        ),
    ];
    for (pointer, value, stage, field) in cases {
        let mut doc = valid();
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        let parent = doc.pointer_mut(parent).unwrap().as_object_mut().unwrap();
        parent.insert(key.to_string(), value.clone());
        for toml_form in [false, true] {
            let result = if toml_form {
                PipelineConfig::from_toml_str(&toml::to_string(&doc).unwrap())
            } else {
                PipelineConfig::from_json_str(&doc.to_string())
            };
            let err = result.expect_err(&format!("{pointer} = {value} was accepted"));
            match (&err, stage) {
                (ConfigError::Invalid { field: named, .. }, None) => {
                    assert_eq!(named, field, "{err}")
                }
                (
                    ConfigError::InvalidStage {
                        stage: s,
                        field: named,
                        ..
                    },
                    Some(stage),
                ) => assert_eq!((s.as_str(), named.as_str()), (*stage, *field), "{err}"),
                _ => panic!("{pointer} = {value}: {err:?}"),
            }
            assert!(err.to_string().contains(field), "{err}");
        }
    }
}

/// The same checks for configs built in code.
#[test]
fn configs_built_in_code_are_held_to_the_same_limits() {
    let stage = || StageConfig::new("s", ExecutionType::Thread);
    let refused = |config: PipelineConfig| config.validate().is_err();
    let one = |s: StageConfig| PipelineConfig::new("p", vec![s]);
    assert!(refused(
        one(stage()).stats_interval(Duration::from_nanos(100))
    ));
    assert!(refused(one(stage()).queue_refresh_rate(Duration::ZERO)));
    assert!(refused(one(stage().timeout(Duration::MAX))));
    assert!(refused(one(stage().workers(MAX_WORKERS + 1))));
    assert!(refused(one(
        stage().retry(RetryPolicy::fixed(2, Duration::MAX))
    )));
    assert!(refused(one(
        stage().restart_budget(RestartBudget::new(1, Duration::MAX))
    )));
    // At the limits, accepted.
    let at_limits = one(stage()
        .workers(MAX_WORKERS)
        .queue_size(MAX_QUEUE_SIZE)
        .timeout(MAX_DURATION)
        .retry(RetryPolicy::exponential(3, MAX_DURATION))
        .restart_budget(RestartBudget::new(1, MAX_DURATION)))
    .stats_interval(MIN_INTERVAL)
    .queue_refresh_rate(MIN_INTERVAL)
    .stall_threshold(MAX_DURATION);
    at_limits.validate().unwrap();
    assert!(runnable(&at_limits));
}

/// A Thread stage with the longest timeout accepted runs every item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_timeout_runs_thread_items() {
    let config = PipelineConfig::new(
        "long-timeout",
        vec![
            StageConfig::new("slow", ExecutionType::Thread)
                .workers(2)
                .timeout(MAX_DURATION),
        ],
    )
    .stats_interval(Duration::ZERO);
    let results = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(0..100u64))
        .sync_stage("slow", Ok)
        .build()
        .unwrap();
    let results = within(Duration::from_secs(30), results.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 100);
    assert!(results.iter().all(|r| r.success), "{:?}", results[0].error);
}

/// An item waiting out the longest retry delay accepted keeps the stage
/// running (a delay of 1e19 s made the stage actor fail): it is still
/// waiting when aborted, and ends `Cancelled`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_retry_delay_keeps_the_stage_running() {
    let config = PipelineConfig::new(
        "long-delay",
        vec![
            StageConfig::new("flaky", ExecutionType::Async)
                .workers(1)
                .retry(RetryPolicy::fixed(2, MAX_DURATION)),
        ],
    )
    .stats_interval(Duration::ZERO);
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(0..3u64))
        .retrying_async_stage("flaky", |i: WorkItem<u64>| async move {
            anyhow::ensure!(i.metadata().attempts() > 1, "first attempts fail");
            Ok(i)
        })
        .build()
        .unwrap();
    pipeline.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = pipeline.stats().await.unwrap();
    assert_eq!(stats.completed_items, 0, "{stats}");
    assert!(pipeline.is_running());
    within(Duration::from_secs(5), pipeline.abort())
        .await
        .unwrap();
    let results = within(Duration::from_secs(5), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 3);
    assert!(
        results.iter().all(|r| r.is_cancelled()),
        "{:?}",
        results[0].error
    );
}

/// The fastest stats line accepted leaves an idle pipeline stoppable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fastest_stats_interval_leaves_an_idle_pipeline_stoppable() {
    let config = PipelineConfig::new(
        "fast-stats",
        vec![StageConfig::new("s", ExecutionType::Async).workers(1)],
    )
    .stats_interval(MIN_INTERVAL);
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .injected::<u64>()
        .async_stage("s", |i: WorkItem<u64>| async move { Ok(i) })
        .build()
        .unwrap();
    pipeline.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    within(Duration::from_secs(5), pipeline.stop())
        .await
        .unwrap();
    within(Duration::from_secs(5), pipeline.run())
        .await
        .unwrap();
}

/// The most workers accepted can be started and run items.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_most_workers_accepted_start_and_run() {
    let config = PipelineConfig::new(
        "many-workers",
        vec![
            StageConfig::new("wide", ExecutionType::Async)
                .workers(MAX_WORKERS)
                .queue_size(10),
        ],
    )
    .stats_interval(Duration::ZERO);
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(0..1_000u64))
        .async_stage("wide", |i: WorkItem<u64>| async move { Ok(i) })
        .build()
        .unwrap();
    let results = within(Duration::from_secs(60), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 1_000);
}

/// The largest queues accepted, in every stage, run items: nothing is
/// allocated up front for them, and the pipeline's window (their sum)
/// does not overflow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_queues_accepted_run() {
    let stage =
        |name: &str| StageConfig::new(name, ExecutionType::Async).queue_size(MAX_QUEUE_SIZE);
    let config = PipelineConfig::new("big-queues", vec![stage("a"), stage("b"), stage("c")])
        .stats_interval(Duration::ZERO);
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(0..1_000u64))
        .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
        .async_stage("b", |i: WorkItem<u64>| async move { Ok(i) })
        .async_stage("c", |i: WorkItem<u64>| async move { Ok(i) })
        .build()
        .unwrap();
    let results = within(Duration::from_secs(60), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 1_000);
}
