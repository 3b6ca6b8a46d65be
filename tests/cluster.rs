//! With the `cluster` feature (ractor's `cluster` on for the whole build,
//! as `ractor_cluster` needs), a pipeline still builds, runs under a user
//! actor whose message type implements `ractor::Message` itself, and
//! delivers events to it.
//!
//! `cargo test --features cluster --test cluster`
#![cfg(feature = "cluster")]

use std::time::Duration;

use bergtalzug::prelude::*;
use bergtalzug::{ActorEvent, FINISHED};
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::mpsc;

mod common;
use common::*;

enum HostMsg {
    Event(ActorEvent),
}

// Under `cluster` every message type says it is one (a local one here).
impl ractor::Message for HostMsg {}

impl From<ActorEvent> for HostMsg {
    fn from(event: ActorEvent) -> Self {
        HostMsg::Event(event)
    }
}

struct Host;

impl Actor for Host {
    type Msg = HostMsg;
    type State = mpsc::UnboundedSender<String>;
    type Arguments = mpsc::UnboundedSender<String>;

    async fn pre_start(
        &self,
        _: ActorRef<HostMsg>,
        out: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(out)
    }

    async fn handle(
        &self,
        _: ActorRef<HostMsg>,
        HostMsg::Event(event): HostMsg,
        out: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let PipelineEvent::ItemFinished(result) = event.event() {
            let _ = out.send(format!("finished {}", result.job_id));
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<HostMsg>,
        event: SupervisionEvent,
        out: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorTerminated(_, _, reason) = event {
            let _ = out.send(format!("terminated {}", reason.unwrap_or_default()));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_runs_under_a_cluster_build() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (host, _) = Actor::spawn(None, Host, tx).await.unwrap();
    let pipeline = Pipeline::builder(config(
        "cluster",
        vec![
            StageConfig::new("a", ExecutionType::Async).workers(2),
            StageConfig::new("b", ExecutionType::Cpu).workers(2),
        ],
    ))
    .unwrap()
    .source(sources::items(
        (0..10u64).map(|n| WorkItem::with_job_id(format!("job-{n}"), n)),
    ))
    .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
    .sync_stage("b", Ok)
    .build()
    .unwrap();
    pipeline.subscribe_actor(host.clone(), EventFilter::finished());
    pipeline.spawn_linked(host.get_cell()).await.unwrap();
    assert_eq!(
        within(Duration::from_secs(10), pipeline.run())
            .await
            .unwrap()
            .len(),
        10
    );
    // Supervision events overtake messages: wait for all of them, any order.
    let (mut finished, mut terminated) = (0, false);
    while finished < 10 || !terminated {
        let line = within(Duration::from_secs(10), rx.recv()).await.unwrap();
        if line.starts_with("finished job-") {
            finished += 1;
        } else {
            assert_eq!(line, format!("terminated {FINISHED}"));
            terminated = true;
        }
    }
    host.stop(None);
}
