//! Pipelines inside a ractor system.
//!
//! ```text
//! cargo run --example embedded
//! ```
//!
//! - `Host`, the user's supervisor, spawns two pipelines linked under it and
//!   watches them end through supervision events (overriding
//!   `handle_supervisor_evt`: ractor's default would stop the host when a
//!   child exits).
//! - `Feeder` feeds the first pipeline by message: each `PipelineMsg::Inject`
//!   is answered once the items are admitted, so the feeder goes at the
//!   pipeline's pace; then it sends `PipelineMsg::Stop`.
//! - The second pipeline reads its own source.
//! - `Alarm` subscribes to the failures of both and reacts to each.

use std::time::Duration;

use bergtalzug::prelude::*;
use bergtalzug::{ActorEvent, FINISHED, PipelineMsg};
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

/// An upload job, fed by message.
#[derive(Debug)]
struct Upload {
    bytes: usize,
}

fn uploads() -> anyhow::Result<Pipeline<Upload>> {
    let config = PipelineConfig::new(
        "uploads",
        vec![
            StageConfig::new("compress", ExecutionType::Cpu)
                .workers(2)
                .queue_size(20),
            StageConfig::new("upload", ExecutionType::Async)
                .workers(8)
                .queue_size(20),
        ],
    )
    .stats_interval(Duration::ZERO);
    Ok(Pipeline::builder(config)?
        .injected::<Upload>()
        .sync_stage("compress", |item: WorkItem<Upload>| {
            anyhow::ensure!(item.data.bytes > 0, "empty upload");
            Ok(item.map(|u| u.bytes / 3))
        })
        .async_stage("upload", |item: WorkItem<usize>| async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            Ok(item)
        })
        .build()?)
}

fn reports() -> anyhow::Result<Pipeline<u32>> {
    let config = PipelineConfig::new(
        "reports",
        vec![
            StageConfig::new("render", ExecutionType::Async)
                .workers(4)
                .queue_size(10),
        ],
    )
    .stats_interval(Duration::ZERO);
    Ok(Pipeline::builder(config)?
        .source(sources::iter(1..=60u32))
        .async_stage("render", |item: WorkItem<u32>| async move {
            tokio::time::sleep(Duration::from_millis(3)).await;
            anyhow::ensure!(
                !item.data.is_multiple_of(25),
                "report {} has no data",
                item.data
            );
            Ok(item)
        })
        .build()?)
}

/// Feeds the uploads pipeline by message.
struct Feeder;

enum FeederMsg {
    Feed(ActorRef<PipelineMsg<Upload>>, usize),
}

impl Actor for Feeder {
    type Msg = FeederMsg;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<FeederMsg>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<FeederMsg>,
        msg: FeederMsg,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        let FeederMsg::Feed(pipeline, count) = msg;
        for batch in 0..count / 10 {
            let items = (0..10)
                .map(|i| {
                    WorkItem::new(Upload {
                        bytes: (batch * 10 + i) % 37 * 1000,
                    })
                })
                .collect();
            // Answered once admitted: a full pipeline makes the feeder wait.
            pipeline
                .call(|reply| PipelineMsg::Inject(items, reply), None)
                .await?
                .unwrap()?;
        }
        println!("feeder: {count} uploads injected, stopping the pipeline");
        pipeline.cast(PipelineMsg::Stop)?;
        Ok(())
    }
}

/// Reacts to failures.
struct Alarm;

struct Failure(ActorEvent);

impl From<ActorEvent> for Failure {
    fn from(event: ActorEvent) -> Self {
        Failure(event)
    }
}

impl Actor for Alarm {
    type Msg = Failure;
    type State = usize;
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<Failure>, _: ()) -> Result<usize, ActorProcessingErr> {
        Ok(0)
    }

    async fn handle(
        &self,
        _: ActorRef<Failure>,
        Failure(event): Failure,
        count: &mut usize,
    ) -> Result<(), ActorProcessingErr> {
        if let PipelineEvent::ItemFinished(result) = event.event() {
            *count += 1;
            let error = result.error.as_ref().expect("a failure");
            println!(
                "alarm #{count}: {} failed in {}: {}",
                result.job_id, error.stage, error.message
            );
        }
        Ok(())
    }
}

/// The user's supervisor: hosts both pipelines.
struct Host;

struct HostState {
    running: usize,
    uploads: Pipeline<Upload>,
    reports: Pipeline<u32>,
}

impl Actor for Host {
    type Msg = ();
    type State = HostState;
    type Arguments = (ActorRef<FeederMsg>, ActorRef<Failure>);

    async fn pre_start(
        &self,
        myself: ActorRef<()>,
        (feeder, alarm): Self::Arguments,
    ) -> Result<HostState, ActorProcessingErr> {
        let (uploads, reports) = (uploads()?, reports()?);
        for failures in [
            uploads.subscribe_filtered(EventFilter::failures()),
            reports.subscribe_filtered(EventFilter::failures()),
        ] {
            bergtalzug::forward_to_actor(failures, alarm.clone());
        }
        let root = uploads.spawn_linked(myself.get_cell()).await?;
        reports.spawn_linked(myself.get_cell()).await?;
        feeder.cast(FeederMsg::Feed(root, 200))?;
        Ok(HostState {
            running: 2,
            uploads,
            reports,
        })
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<()>,
        event: SupervisionEvent,
        state: &mut HostState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorTerminated(_, _, Some(reason)) if reason == FINISHED => {
                state.running -= 1;
                println!(
                    "host: a pipeline finished ({} still running)",
                    state.running
                );
            }
            SupervisionEvent::ActorFailed(_, reason) => {
                state.running -= 1;
                println!("host: a pipeline failed: {reason}");
            }
            _ => {}
        }
        if state.running == 0 {
            for stats in [state.uploads.stats().await?, state.reports.stats().await?] {
                println!("host: {stats}");
            }
            myself.stop(None);
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<()>,
        _: &mut HostState,
    ) -> Result<(), ActorProcessingErr> {
        // Stop children gracefully: a pipeline stopped this way accounts for
        // every item before it ends (ractor would otherwise kill it).
        myself
            .stop_children_and_wait(None, Some(Duration::from_secs(30)))
            .await;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (feeder, _) = Actor::spawn(None, Feeder, ()).await?;
    let (alarm, _) = Actor::spawn(None, Alarm, ()).await?;
    let (_host, host_done) = Actor::spawn(None, Host, (feeder.clone(), alarm.clone())).await?;
    host_done.await?;
    tokio::time::sleep(Duration::from_millis(20)).await; // the alarm's last messages
    feeder.stop(None);
    alarm.stop(None);
    Ok(())
}
