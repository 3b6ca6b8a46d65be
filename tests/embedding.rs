//! A pipeline as one more child in a ractor supervision tree: its parent
//! learns how it ended, can stop it (every item still accounted for), feeds
//! it by message with backpressure, and actors get the events they ask for.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bergtalzug::prelude::*;
use bergtalzug::{ActorEvent, FINISHED, PipelineMsg};
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::mpsc;

mod common;
use common::*;

/// How a child ended, as its supervisor saw it.
#[derive(Debug, PartialEq)]
enum Seen {
    Terminated(Option<String>),
    Failed(String),
}

/// A user's supervisor: reports its children's ends, and stops them
/// gracefully when it stops (as docs/embedding.md tells users to).
struct Supervisor;

impl Actor for Supervisor {
    type Msg = ();
    type State = mpsc::UnboundedSender<Seen>;
    type Arguments = mpsc::UnboundedSender<Seen>;

    async fn pre_start(
        &self,
        _: ActorRef<()>,
        seen: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(seen)
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<()>,
        event: SupervisionEvent,
        seen: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let _ = match event {
            SupervisionEvent::ActorTerminated(_, _, reason) => seen.send(Seen::Terminated(reason)),
            SupervisionEvent::ActorFailed(_, err) => seen.send(Seen::Failed(err.to_string())),
            _ => Ok(()),
        };
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<()>,
        _: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        myself
            .stop_children_and_wait(None, Some(Duration::from_secs(20)))
            .await;
        Ok(())
    }
}

async fn supervisor() -> (ActorRef<()>, mpsc::UnboundedReceiver<Seen>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (sup, _) = Actor::spawn(None, Supervisor, tx).await.unwrap();
    (sup, rx)
}

fn numbers(name: &str, items: u64) -> Pipeline<u64> {
    Pipeline::builder(config(
        name,
        vec![
            StageConfig::new("a", ExecutionType::Async)
                .workers(2)
                .queue_size(8),
            StageConfig::new("b", ExecutionType::Thread)
                .workers(2)
                .queue_size(8),
        ],
    ))
    .unwrap()
    .source(sources::iter(0..items))
    .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
    .sync_stage("b", Ok)
    .build()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_pipeline_tells_its_supervisor_and_leaves_it_running() {
    let (sup, mut seen) = supervisor().await;
    // Two pipelines of the same name run side by side: no global names.
    let first = numbers("same-name", 500);
    let second = numbers("same-name", 300);
    first.spawn_linked(sup.get_cell()).await.unwrap();
    second.spawn_linked(sup.get_cell()).await.unwrap();
    assert_eq!(
        within(Duration::from_secs(10), first.run())
            .await
            .unwrap()
            .len(),
        500
    );
    assert_eq!(
        within(Duration::from_secs(10), second.run())
            .await
            .unwrap()
            .len(),
        300
    );
    for _ in 0..2 {
        let end = within(Duration::from_secs(10), seen.recv()).await.unwrap();
        assert_eq!(end, Seen::Terminated(Some(FINISHED.to_string())));
    }
    assert_eq!(
        sup.get_status(),
        ractor::ActorStatus::Running,
        "the parent lives on"
    );
    sup.stop(None);
}

/// Panics on its second refill.
struct Exploding(u32);

impl Source for Exploding {
    type Item = u64;
    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<u64>>> {
        self.0 += 1;
        assert!(self.0 < 2, "the queue service is gone");
        Ok((0..count as u64).map(WorkItem::new).collect())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_pipeline_tells_its_supervisor_why() {
    let (sup, mut seen) = supervisor().await;
    let pipeline = Pipeline::builder(config(
        "exploding",
        vec![StageConfig::new("a", ExecutionType::Async)],
    ))
    .unwrap()
    .source(Exploding(0))
    .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
    .build()
    .unwrap();
    pipeline.spawn_linked(sup.get_cell()).await.unwrap();
    let err = within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap_err();
    assert!(matches!(err, PipelineError::SourcePanicked { .. }), "{err}");
    match within(Duration::from_secs(10), seen.recv()).await.unwrap() {
        Seen::Failed(reason) => assert!(reason.contains("the queue service is gone"), "{reason}"),
        other => panic!("expected a failure, saw {other:?}"),
    }
    sup.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_supervisor_stops_the_pipeline_with_every_item_accounted_for() {
    let (sup, _seen) = supervisor().await;
    let outcomes = Arc::new(Outcomes::default());
    let pipeline = Pipeline::builder(config(
        "stopped",
        vec![
            StageConfig::new("a", ExecutionType::Async)
                .workers(2)
                .queue_size(8),
            StageConfig::new("slow", ExecutionType::Async)
                .workers(2)
                .queue_size(8),
        ],
    ))
    .unwrap()
    .source(sources::iter(0u64..))
    .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
    .async_stage("slow", |i: WorkItem<u64>| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(i)
    })
    .on_complete(outcomes.callback())
    .build()
    .unwrap();
    pipeline.spawn_linked(sup.get_cell()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    within(Duration::from_secs(20), sup.stop_and_wait(None, None))
        .await
        .unwrap();
    let results = within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap();
    let stats = pipeline.stats().await.unwrap();
    assert!(stats.admitted_items > 0);
    assert_eq!(results.len() as u64, stats.admitted_items);
    assert_eq!(outcomes.total(), stats.admitted_items);
    assert!(
        results.iter().any(|r| r.success),
        "some finished before the stop"
    );
    assert!(
        results.iter().any(|r| r.is_cancelled()),
        "the rest were cancelled"
    );
    assert_unique_ids(&results);
}

#[tokio::test(start_paused = true)]
async fn injection_by_message_waits_for_room() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let pipeline = Pipeline::builder(config(
        "by-message",
        vec![
            StageConfig::new("gate", ExecutionType::Async)
                .workers(1)
                .queue_size(3),
        ],
    ))
    .unwrap()
    .injected::<u64>()
    .async_stage("gate", move |i: WorkItem<u64>| {
        let g = g.clone();
        async move {
            g.acquire().await?.forget();
            Ok(i)
        }
    })
    .build()
    .unwrap();
    let root = pipeline
        .spawn_linked(supervisor().await.0.get_cell())
        .await
        .unwrap();
    let inject = |from: u64, to: u64| {
        let root = root.clone();
        async move {
            let items = (from..to).map(WorkItem::new).collect();
            root.call(|reply| PipelineMsg::Inject(items, reply), None)
                .await
                .unwrap()
        }
    };
    // Room for 4 (queue 3 + 1 worker)...
    within(Duration::from_secs(1), inject(0, 4))
        .await
        .unwrap()
        .unwrap();
    // ...then the sender waits.
    let waiting = tokio::spawn(inject(4, 8));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !waiting.is_finished(),
        "injection returned while the pipeline was full"
    );
    gate.add_permits(8);
    within(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    root.cast(PipelineMsg::Stop).unwrap();
    let results = within(Duration::from_secs(5), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 8);
}

/// An actor that keeps what it is sent.
struct Collector;

enum CollectorMsg {
    Event(ActorEvent),
}

impl From<ActorEvent> for CollectorMsg {
    fn from(event: ActorEvent) -> Self {
        CollectorMsg::Event(event)
    }
}

impl Actor for Collector {
    type Msg = CollectorMsg;
    type State = Arc<Mutex<Vec<PipelineEvent>>>;
    type Arguments = Arc<Mutex<Vec<PipelineEvent>>>;

    async fn pre_start(
        &self,
        _: ActorRef<CollectorMsg>,
        got: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(got)
    }

    async fn handle(
        &self,
        _: ActorRef<CollectorMsg>,
        CollectorMsg::Event(event): CollectorMsg,
        got: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        got.lock().unwrap().push(event.into_event());
        Ok(())
    }
}

fn flaky() -> Pipeline<u64> {
    Pipeline::builder(config(
        "flaky",
        vec![
            StageConfig::new("a", ExecutionType::Async)
                .workers(2)
                .queue_size(8),
            StageConfig::new("b", ExecutionType::Cpu)
                .workers(2)
                .queue_size(8),
        ],
    ))
    .unwrap()
    .source(sources::iter(0..200u64))
    .async_stage("a", |i: WorkItem<u64>| async move {
        anyhow::ensure!(i.data % 10 != 1, "a rejects {}", i.data);
        Ok(i)
    })
    .sync_stage("b", |i: WorkItem<u64>| {
        anyhow::ensure!(i.data % 10 != 2, "b rejects {}", i.data);
        Ok(i)
    })
    .build()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_subscriber_actor_receives_exactly_what_it_asked_for() {
    let pipeline = flaky();
    let b_failures = Arc::new(Mutex::new(Vec::new()));
    let (collector, _) = Actor::spawn(None, Collector, b_failures.clone())
        .await
        .unwrap();
    let forwarding =
        pipeline.subscribe_actor(collector.clone(), EventFilter::failures().stage("b"));
    // A second actor subscribes by message, to the finished items only.
    let finished = Arc::new(Mutex::new(Vec::new()));
    let (other, _) = Actor::spawn(None, Collector, finished.clone())
        .await
        .unwrap();
    let root = pipeline
        .spawn_linked(supervisor().await.0.get_cell())
        .await
        .unwrap();
    let stream = root
        .call(
            |reply| PipelineMsg::Subscribe(EventFilter::finished(), reply),
            None,
        )
        .await
        .unwrap()
        .unwrap();
    let forwarding_other = bergtalzug::forward_to_actor(stream, other.clone());

    let results = within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap();
    within(Duration::from_secs(5), forwarding).await.unwrap();
    within(Duration::from_secs(5), forwarding_other)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await; // the actors drain their mailboxes

    let got = b_failures.lock().unwrap();
    let failed_in_b: Vec<_> = results
        .iter()
        .filter(|r| r.error.as_ref().is_some_and(|e| e.stage == "b"))
        .map(|r| r.job_id.clone())
        .collect();
    assert_eq!(failed_in_b.len(), 20);
    let mut ids = Vec::new();
    for event in got.iter() {
        match event {
            PipelineEvent::ItemFinished(r) => {
                assert!(!r.success);
                assert_eq!(r.error.as_ref().unwrap().stage, "b");
                ids.push(r.job_id.clone());
            }
            PipelineEvent::PipelineFinished(_) => {}
            other => panic!("not asked for: {other:?}"),
        }
    }
    ids.sort();
    let mut expected = failed_in_b;
    expected.sort();
    assert_eq!(ids, expected);
    assert!(matches!(
        got.last(),
        Some(PipelineEvent::PipelineFinished(_))
    ));

    // Subscribed after the start: every item finished from then on, and the end.
    let finished = finished.lock().unwrap();
    assert!(finished.iter().all(|e| matches!(
        e,
        PipelineEvent::ItemFinished(_) | PipelineEvent::PipelineFinished(_)
    )));
    assert!(matches!(
        finished.last(),
        Some(PipelineEvent::PipelineFinished(_))
    ));
    collector.stop(None);
    other.stop(None);
}

/// An actor that waits at a gate before handling each event.
struct Sluggish;

impl Actor for Sluggish {
    type Msg = CollectorMsg;
    type State = (Arc<tokio::sync::Semaphore>, Arc<Mutex<Vec<PipelineEvent>>>);
    type Arguments = Self::State;

    async fn pre_start(
        &self,
        _: ActorRef<CollectorMsg>,
        state: Self::State,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(state)
    }

    async fn handle(
        &self,
        _: ActorRef<CollectorMsg>,
        CollectorMsg::Event(event): CollectorMsg,
        (gate, got): &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        gate.acquire().await?.forget();
        got.lock().unwrap().push(event.into_event());
        Ok(())
    }
}

/// A subscriber that does not keep up holds the pipeline back instead of
/// piling events up, and still gets every terminal event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_actor_slows_the_pipeline_and_loses_nothing() {
    let items = 20_000u64;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let got = Arc::new(Mutex::new(Vec::new()));
    let (slow, _) = Actor::spawn(None, Sluggish, (gate.clone(), got.clone()))
        .await
        .unwrap();
    let pipeline = numbers("slow-subscriber", items);
    pipeline.subscribe_actor(slow.clone(), EventFilter::finished().lossless());
    pipeline.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Held back: at most the actor's window, the subscription's buffer and
    // the pipeline's own capacity finished (2 stages x (8 + 2) = 20).
    let bound =
        (bergtalzug::event::ACTOR_EVENT_WINDOW + bergtalzug::event::EVENT_BUFFER + 20 + 64) as u64;
    let stats = pipeline.stats().await.unwrap();
    assert!(!pipeline.is_finished());
    assert!(
        stats.completed_items <= bound,
        "{} finished with the subscriber stuck",
        stats.completed_items
    );
    gate.add_permits(items as usize + 1);
    let results = within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len() as u64, items);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let got = got.lock().unwrap();
    let finished = got
        .iter()
        .filter(|e| matches!(e, PipelineEvent::ItemFinished(_)))
        .count();
    assert_eq!(finished as u64, items, "every ItemFinished delivered");
    slow.stop(None);
}

/// What an embedding supervisor does to one of the pipeline's own actors.
#[derive(Debug, Clone, Copy)]
enum Blow {
    /// `kill()` the child spawned `n`-th: tracker, last stage .. first
    /// stage, source.
    Kill(usize),
    /// `stop(None)` the child spawned `n`-th.
    Stop(usize),
    /// `root.stop_children(None)`.
    StopAll,
}

/// Every child's end ends the run: `run()` returns an error naming it, and
/// (the tracker alive) every admitted item has exactly one outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_childs_end_ends_the_run() {
    let names = ["tracker", "stage b", "stage a", "source"];
    for blow in [
        Blow::Kill(1),
        Blow::Stop(2),
        Blow::Kill(3),
        Blow::Stop(3),
        Blow::Kill(0),
        Blow::StopAll,
    ] {
        let (sup, _seen) = supervisor().await;
        let outcomes = Arc::new(Outcomes::default());
        let pipeline = Pipeline::builder(config(
            "blown",
            vec![
                StageConfig::new("a", ExecutionType::Async)
                    .workers(2)
                    .queue_size(8),
                StageConfig::new("b", ExecutionType::Thread)
                    .workers(2)
                    .queue_size(8),
            ],
        ))
        .unwrap()
        .source(sources::iter(0u64..))
        .async_stage("a", |i: WorkItem<u64>| async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok(i)
        })
        .sync_stage("b", |i: WorkItem<u64>| {
            std::thread::sleep(Duration::from_millis(1));
            Ok(i)
        })
        .on_complete(outcomes.callback())
        .build()
        .unwrap();
        let root = pipeline.spawn_linked(sup.get_cell()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut children = root.get_children();
        children.sort_by_key(|c| c.get_id().pid());
        assert_eq!(children.len(), 4);
        match blow {
            Blow::Kill(n) => children[n].kill(),
            Blow::Stop(n) => children[n].stop(None),
            Blow::StopAll => root.stop_children(None),
        }
        let outcome = within(Duration::from_secs(10), pipeline.run_outcome()).await;
        let err = outcome.error.expect("the run fails");
        let admitted = pipeline.stats().await.unwrap().admitted_items;
        match blow {
            Blow::Kill(n) | Blow::Stop(n) => {
                assert!(err.to_string().contains(names[n]), "{blow:?}: {err}");
                if n != 0 {
                    // The tracker lives: every item accounted for, once.
                    assert_eq!(outcomes.total(), admitted, "{blow:?}: {err}");
                    assert_eq!(outcome.results.len() as u64, admitted, "{blow:?}");
                    assert_unique_ids(&outcome.results);
                }
            }
            Blow::StopAll => {}
        }
        assert!(!pipeline.is_running(), "{blow:?}");
        sup.stop(None);
    }
}

/// With tracking off the items a killed stage held have no job ids to end
/// with: the error counts them instead, and the callbacks got every other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_stage_with_tracking_off_counts_what_it_lost() {
    let (sup, _seen) = supervisor().await;
    let outcomes = Arc::new(Outcomes::default());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let pipeline = Pipeline::builder(
        config(
            "untracked-blown",
            vec![
                StageConfig::new("a", ExecutionType::Async)
                    .workers(2)
                    .queue_size(8),
                StageConfig::new("held", ExecutionType::Async)
                    .workers(2)
                    .queue_size(8),
            ],
        )
        .enable_tracking(false),
    )
    .unwrap()
    .source(sources::iter(0u64..))
    .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
    .async_stage("held", move |i: WorkItem<u64>| {
        let g = g.clone();
        async move {
            g.acquire().await?.forget();
            Ok(i)
        }
    })
    .on_complete(outcomes.callback())
    .build()
    .unwrap();
    let root = pipeline.spawn_linked(sup.get_cell()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut children = root.get_children();
    children.sort_by_key(|c| c.get_id().pid());
    children[1].kill(); // the last stage, holding its items at the gate
    let err = within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap_err();
    let PipelineError::ActorStopped {
        actor, unaccounted, ..
    } = &err
    else {
        panic!("{err}");
    };
    assert_eq!(actor, "stage held");
    let admitted = pipeline.stats().await.unwrap().admitted_items;
    assert!(*unaccounted > 0, "{err}");
    assert_eq!(outcomes.total() + unaccounted, admitted, "{err}");
    assert!(err.to_string().contains("got no outcome"), "{err}");
    sup.stop(None);
}

/// A stage's splitter and batcher hold items too: when one of them (or
/// the batch stage) dies, the pipeline fails naming it, every admitted item
/// still ends once (no hang waiting for what the dead actor held), and the
/// children it held are no longer counted live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_splitter_or_batcher_fails_the_run_and_every_item_ends() {
    use bergtalzug::shape::{Batch, Children};
    for victim in ["splitter", "batcher", "batch stage"] {
        let (sup, _seen) = supervisor().await;
        let pipeline = Pipeline::builder(config(
            "companions",
            vec![
                StageConfig::new("split", ExecutionType::Async)
                    .workers(2)
                    .queue_size(4),
                StageConfig::new("store", ExecutionType::Async)
                    .workers(1)
                    .queue_size(2)
                    .batch(8, Duration::from_millis(5)),
            ],
        ))
        .unwrap()
        .source(sources::iter(0u64..))
        .async_stage("split", |item: WorkItem<u64>| async move {
            Ok(item.map(|n| Children::iter(n * 10..n * 10 + 10)))
        })
        .split()
        .async_batch_stage("store", |batch: Batch<u64>| async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            Ok(batch.items().iter().map(|i| Ok(i.data)).collect())
        })
        .build()
        .unwrap();
        let root = pipeline.spawn_linked(sup.get_cell()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The root's children in spawn order: the stages come last first,
        // `store`'s supervisor (the one with 1 worker) then the batcher in
        // front of it, `split`'s splitter then its supervisor (2 workers).
        let mut children = root.get_children();
        children.sort_by_key(|c| c.get_id().pid());
        let with_workers = |n: usize| {
            children
                .iter()
                .position(|c| c.get_children().len() == n)
                .expect("a stage supervisor")
        };
        let (store, split) = (with_workers(1), with_workers(2));
        assert!(store + 2 < split, "a batcher and a splitter between them");
        match victim {
            "batcher" => children[store + 1].kill(),
            "batch stage" => children[store].kill(),
            _ => children[split - 1].kill(),
        }
        let outcome = within(Duration::from_secs(10), pipeline.run_outcome()).await;
        let err = outcome.error.expect("the run fails");
        let named = match victim {
            "batch stage" => "stage store",
            _ => "splitter or batcher of stage",
        };
        assert!(err.to_string().contains(named), "{victim}: {err}");
        let stats = pipeline.stats().await.unwrap();
        assert_eq!(stats.active_items, 0, "{victim}: {err}");
        assert_eq!(
            stats.completed_items, stats.admitted_items,
            "{victim}: {err}"
        );
        // The children the dead actors held are no longer counted live.
        assert_eq!(stats.stages[0].derived_live, 0, "{victim}: {err}");
        sup.stop(None);
    }
}
