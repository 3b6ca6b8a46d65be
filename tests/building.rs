//! Configuration and binding mistakes are caught before anything runs, with
//! errors that name the stage or field.

use std::time::Duration;

use bergtalzug::PipelineBuilder;
use bergtalzug::prelude::*;

fn three_stages() -> PipelineConfig {
    PipelineConfig::new(
        "p",
        vec![
            StageConfig::new("fetch", ExecutionType::Async),
            StageConfig::new("parse", ExecutionType::Thread),
            StageConfig::new("crunch", ExecutionType::Cpu),
        ],
    )
}

async fn id(i: WorkItem<u32>) -> anyhow::Result<WorkItem<u32>> {
    Ok(i)
}

fn id_sync(i: WorkItem<u32>) -> anyhow::Result<WorkItem<u32>> {
    Ok(i)
}

fn builder() -> PipelineBuilder<u32, u32> {
    Pipeline::builder(three_stages())
        .unwrap()
        .source(sources::iter(0..1u32))
}

#[test]
fn binding_mistakes_name_the_stage() {
    let unknown = builder().async_stage("fetsh", id).build().unwrap_err();
    assert!(matches!(&unknown, BuildError::UnknownStage { stage, .. } if stage == "fetsh"));
    assert!(
        unknown.to_string().contains("fetch, parse, crunch"),
        "{unknown}"
    );

    let order = builder().sync_stage("parse", id_sync).build().unwrap_err();
    assert_eq!(
        order,
        BuildError::OutOfOrder {
            stage: "parse".into(),
            expected: "fetch".into()
        }
    );

    let twice = builder()
        .async_stage("fetch", id)
        .async_stage("fetch", id)
        .build()
        .unwrap_err();
    assert!(matches!(&twice, BuildError::BoundTwice { stage } if stage == "fetch"));

    let kind = builder().sync_stage("fetch", id_sync).build().unwrap_err();
    assert!(
        matches!(&kind, BuildError::WrongHandlerKind { stage, execution_type: ExecutionType::Async, .. } if stage == "fetch")
    );
    assert!(kind.to_string().contains(".async_stage"), "{kind}");

    let kind = builder()
        .async_stage("fetch", id)
        .async_stage("parse", id)
        .build()
        .unwrap_err();
    assert!(matches!(&kind, BuildError::WrongHandlerKind { stage, .. } if stage == "parse"));

    let missing = builder()
        .async_stage("fetch", id)
        .sync_stage("parse", id_sync)
        .build()
        .unwrap_err();
    assert_eq!(
        missing,
        BuildError::MissingStage {
            stage: "crunch".into()
        }
    );

    // Binding a stage before the input does not compile (see the
    // `compile_fail` examples in src/builder.rs); building without one is
    // an error.
    let no_input = Pipeline::builder(PipelineConfig::new(
        "p",
        vec![StageConfig::new("fetch", ExecutionType::Async)],
    ))
    .unwrap()
    .build()
    .unwrap_err();
    assert!(matches!(no_input, BuildError::MissingSource { .. }));

    assert!(
        builder()
            .async_stage("fetch", id)
            .sync_stage("parse", id_sync)
            .sync_stage("crunch", id_sync)
            .build()
            .is_ok()
    );
}

#[test]
fn a_builder_shows_itself_so_a_refused_config_can_be_unwrapped() {
    // `unwrap_err` needs the builder to be Debug.
    let bad = PipelineConfig::new("p", vec![]);
    let err = Pipeline::builder(bad).unwrap_err();
    assert!(matches!(err, ConfigError::Invalid { ref field, .. } if field == "stages"));
    let shown = format!("{:?}", builder().async_stage("fetch", id));
    assert!(
        shown.contains("PipelineBuilder") && shown.contains("fetch"),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_and_dead_letter_callbacks_may_both_keep_state() {
    // Both take FnMut: each is owned by the tracker and may mutate what it
    // captured, here a plain Vec moved in and handed back through a channel.
    let (ids_tx, ids_rx) = std::sync::mpsc::channel();
    let (letters_tx, letters_rx) = std::sync::mpsc::channel();
    let mut failed = Vec::new();
    let mut letters = Vec::new();
    let config = PipelineConfig::new(
        "p",
        vec![StageConfig::new("check", ExecutionType::Async).workers(2)],
    )
    .stats_interval(Duration::ZERO);
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(0..20u32))
        .async_stage("check", |i: WorkItem<u32>| async move {
            anyhow::ensure!(!i.data.is_multiple_of(4), "a multiple of 4");
            Ok(i)
        })
        .on_complete(move |r: &WorkItemResult| {
            if !r.success {
                failed.push(r.job_id.clone());
                let _ = ids_tx.send(failed.len());
            }
        })
        .on_dead_letter(move |letter| {
            letters.push(letter.job_id);
            let _ = letters_tx.send(letters.len());
        })
        .build()
        .unwrap();
    let results = tokio::time::timeout(Duration::from_secs(10), pipeline.run())
        .await
        .expect("the pipeline hung")
        .unwrap();
    assert_eq!(results.len(), 20);
    assert_eq!(ids_rx.try_iter().last(), Some(5));
    assert_eq!(letters_rx.try_iter().last(), Some(5));
}

#[test]
fn a_retrying_method_on_a_stage_without_a_retry_policy_is_refused() {
    let config = PipelineConfig::new(
        "p",
        vec![
            StageConfig::new("fetch", ExecutionType::Async),
            StageConfig::new("parse", ExecutionType::Thread),
        ],
    );
    let err = Pipeline::builder(config.clone())
        .unwrap()
        .source(sources::iter(0..1u32))
        .retrying_async_stage("fetch", id)
        .sync_stage("parse", id_sync)
        .build()
        .unwrap_err();
    assert_eq!(
        err,
        BuildError::RetryWithoutPolicy {
            stage: "fetch".into(),
            method: "retrying_async_stage",
            plain: "async_stage",
        }
    );
    assert!(err.to_string().contains("no `retry` policy"), "{err}");
    let err = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(0..1u32))
        .async_stage("fetch", id)
        .retrying_sync_stage("parse", id_sync)
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, BuildError::RetryWithoutPolicy { stage, method: "retrying_sync_stage", .. } if stage == "parse"),
        "{err}"
    );
    // An explicit "never retry" policy is a choice, not a mistake.
    let once = PipelineConfig::new(
        "p",
        vec![
            StageConfig::new("fetch", ExecutionType::Async)
                .retry(RetryPolicy::fixed(1, Duration::from_millis(1))),
        ],
    );
    assert!(
        Pipeline::builder(once)
            .unwrap()
            .source(sources::iter(0..1u32))
            .retrying_async_stage("fetch", id)
            .build()
            .is_ok()
    );
}

#[test]
fn a_process_handler_fits_only_a_process_stage() {
    let config = PipelineConfig::new("p", vec![StageConfig::new("crunch", ExecutionType::Cpu)]);
    let err = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(0..1u32))
        .process_stage("crunch", id_sync)
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, BuildError::WrongHandlerKind { stage, execution_type: ExecutionType::Cpu, .. } if stage == "crunch"),
        "{err}"
    );
    // A Process stage retries without a Clone bound or another method.
    let config = PipelineConfig::new(
        "p",
        vec![
            StageConfig::new("isolated", ExecutionType::Process)
                .retry(RetryPolicy::fixed(3, Duration::from_millis(1))),
        ],
    );
    assert!(
        Pipeline::builder(config)
            .unwrap()
            .source(sources::iter(0..1u32))
            .process_stage("isolated", id_sync)
            .build()
            .is_ok()
    );
}

#[test]
fn process_stages_need_a_process_handler() {
    let config = PipelineConfig::new(
        "p",
        vec![StageConfig::new("isolated", ExecutionType::Process)],
    );
    let err = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(0..1u32))
        .sync_stage("isolated", id_sync)
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, BuildError::WrongHandlerKind { stage, execution_type: ExecutionType::Process, .. } if stage == "isolated"),
        "{err}"
    );
}

#[test]
fn bad_configs_are_refused_before_building() {
    let config = PipelineConfig::new(
        "p",
        vec![StageConfig::new("fetch", ExecutionType::Async).queue_size(0)],
    );
    let err = Pipeline::builder(config).err().unwrap();
    assert!(
        matches!(&err, ConfigError::InvalidStage { stage, field, .. } if stage == "fetch" && field == "queue_size")
    );
    let err = Pipeline::builder(PipelineConfig::new(
        "p",
        vec![StageConfig::new("completed", ExecutionType::Async)],
    ))
    .err()
    .unwrap();
    assert!(err.to_string().contains("reserved"), "{err}");
}

const SEED_TOML: &str = r#"
pipeline_name = "my_pipeline"
queue_refresh_rate = 1.0
stats_interval_seconds = 10.0
enable_tracking = true

[[stages]]
name = "fetch"
execution_type = "async"
workers = 10
queue_size = 100

[[stages]]
name = "parse"
execution_type = "thread"
workers = 5
queue_size = 50

[[stages]]
name = "compute"
execution_type = "interpreter"
workers = 4
queue_size = 20

[[stages]]
name = "store"
execution_type = "async"
"#;

#[test]
fn the_seeds_quick_start_config_loads_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let toml_path = dir.path().join("pipeline.toml");
    std::fs::write(&toml_path, SEED_TOML).unwrap();
    let from_toml = PipelineConfig::from_path(&toml_path).unwrap();
    assert_eq!(from_toml.pipeline_name, "my_pipeline");
    assert_eq!(from_toml.stages.len(), 4);
    assert_eq!(from_toml.stages[2].execution_type, ExecutionType::Cpu);
    assert_eq!(from_toml.stages[3].workers, 5);
    assert_eq!(from_toml.stages[3].queue_size, 1000);
    assert_eq!(from_toml.stats_interval, Duration::from_secs(10));

    let json_path = dir.path().join("pipeline.json");
    std::fs::write(&json_path, serde_json::to_string(&from_toml).unwrap()).unwrap();
    assert_eq!(PipelineConfig::from_path(&json_path).unwrap(), from_toml);

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, SEED_TOML.replace("workers = 5", "workers = 0")).unwrap();
    let err = PipelineConfig::from_path(&bad).unwrap_err();
    assert!(
        matches!(&err, ConfigError::InvalidStage { stage, field, .. } if stage == "parse" && field == "workers")
    );

    let typo = SEED_TOML.replace("queue_size = 50", "queue_sise = 50");
    let err = PipelineConfig::from_toml_str(&typo).unwrap_err();
    assert!(err.to_string().contains("queue_sise"), "{err}");
    let err =
        PipelineConfig::from_toml_str(&SEED_TOML.replace("\"thread\"", "\"fiber\"")).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Parse { field: Some(f), .. } if f == "stages[1].execution_type"),
        "{err}"
    );

    let missing = dir.path().join("nope.toml");
    assert!(matches!(
        PipelineConfig::from_path(&missing),
        Err(ConfigError::Io { .. })
    ));
}
