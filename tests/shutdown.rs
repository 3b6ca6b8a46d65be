//! Stopping: `stop` lets every admitted item finish, `abort` cancels what is
//! in flight, and either way every admitted item has exactly one outcome.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bergtalzug::prelude::*;
use bergtalzug::shape::Batch;

mod common;
use common::*;

fn endless() -> impl Iterator<Item = u64> + Send + 'static {
    0u64..
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_lets_every_admitted_item_finish() {
    let outcomes = Arc::new(Outcomes::default());
    let pipeline = Pipeline::builder(config(
        "stop",
        vec![
            StageConfig::new("a", ExecutionType::Async)
                .workers(4)
                .queue_size(20),
            StageConfig::new("b", ExecutionType::Thread)
                .workers(2)
                .queue_size(20),
        ],
    ))
    .unwrap()
    .source(sources::iter(endless()))
    .async_stage("a", |i: WorkItem<u64>| async move {
        tokio::time::sleep(Duration::from_millis(1)).await;
        Ok(i)
    })
    .sync_stage("b", Ok)
    .on_complete(outcomes.callback())
    .build()
    .unwrap();
    pipeline.start().await.unwrap();
    within(Duration::from_secs(60), async {
        while outcomes.total() < 200 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    within(Duration::from_secs(10), pipeline.stop())
        .await
        .unwrap();
    assert!(pipeline.is_finished() && !pipeline.is_running());
    let results = pipeline.run().await.unwrap();
    let stats = pipeline.stats().await.unwrap();
    assert_eq!(results.len() as u64, stats.admitted_items);
    assert!(results.iter().all(|r| r.success), "stop cancels nothing");
    assert_unique_ids(&results);
    assert_eq!(stats.active_items, 0);
    assert_eq!(outcomes.total(), stats.admitted_items);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_cancels_what_is_in_flight() {
    let pipeline = Pipeline::builder(config(
        "abort",
        vec![
            StageConfig::new("quick", ExecutionType::Async)
                .workers(2)
                .queue_size(10),
            StageConfig::new("stuck", ExecutionType::Async)
                .workers(3)
                .queue_size(10),
        ],
    ))
    .unwrap()
    .source(sources::iter(endless()))
    .async_stage("quick", |i: WorkItem<u64>| async move { Ok(i) })
    .async_stage("stuck", |i: WorkItem<u64>| async move {
        std::future::pending::<()>().await;
        Ok(i)
    })
    .build()
    .unwrap();
    let mut events = pipeline.subscribe();
    pipeline.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    within(Duration::from_secs(10), pipeline.abort())
        .await
        .unwrap();
    let results = pipeline.run().await.unwrap();
    let stats = pipeline.stats().await.unwrap();
    assert_eq!(results.len() as u64, stats.admitted_items);
    assert!(!results.is_empty());
    assert_unique_ids(&results);
    assert!(
        results.iter().all(|r| r.is_cancelled()),
        "nothing could complete"
    );
    // The three items held by the stuck workers are cancelled too.
    let held = results
        .iter()
        .filter(|r| r.error.as_ref().unwrap().message.contains("worker held"))
        .count();
    assert_eq!(held, 3);
    assert_eq!(stats.cancelled_items, stats.admitted_items);
    let mut finished = 0;
    let mut last = None;
    while let Some(event) = events.recv().await {
        if matches!(event, PipelineEvent::ItemFinished(_)) {
            finished += 1;
        }
        last = Some(event);
    }
    assert_eq!(finished, results.len());
    assert!(matches!(last, Some(PipelineEvent::PipelineFinished(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_does_not_wait_for_blocking_handlers() {
    let pipeline = Pipeline::builder(config(
        "abort-blocking",
        vec![
            StageConfig::new("slow", ExecutionType::Thread)
                .workers(2)
                .queue_size(4),
        ],
    ))
    .unwrap()
    .source(sources::iter(endless()))
    .sync_stage("slow", |i: WorkItem<u64>| {
        std::thread::sleep(Duration::from_millis(400));
        Ok(i)
    })
    .build()
    .unwrap();
    pipeline.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    within(Duration::from_secs(10), pipeline.abort())
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "abort waited {:?}",
        started.elapsed()
    );
    let results = pipeline.run().await.unwrap();
    assert_eq!(
        results.len() as u64,
        pipeline.stats().await.unwrap().admitted_items
    );
    assert!(results.iter().all(|r| r.is_cancelled()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_pipeline_refuses_input() {
    let pipeline = Pipeline::builder(config(
        "closed",
        vec![StageConfig::new("a", ExecutionType::Async)],
    ))
    .unwrap()
    .injected::<u64>()
    .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
    .build()
    .unwrap();
    assert!(matches!(
        pipeline.inject(vec![WorkItem::new(1)]).await,
        Err(PipelineError::NotRunning(_))
    ));
    pipeline.start().await.unwrap();
    pipeline
        .inject((0..10).map(WorkItem::new).collect())
        .await
        .unwrap();
    within(Duration::from_secs(10), pipeline.stop())
        .await
        .unwrap();
    assert!(matches!(
        pipeline.inject(vec![WorkItem::new(1)]).await,
        Err(PipelineError::InputClosed(_))
    ));
    let results = pipeline.run().await.unwrap();
    assert_eq!(results.len(), 10);
    assert!(matches!(
        pipeline.run().await,
        Err(PipelineError::ResultsTaken(_))
    ));
}

/// An injection after a stop was asked for (through the same handle) is
/// refused, even while the stop is still waiting for an item in flight and
/// though `inject` goes to the source without passing the root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injection_after_a_stop_request_is_refused() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let held = gate.clone();
    let pipeline = Pipeline::builder(config(
        "stopping",
        vec![StageConfig::new("a", ExecutionType::Async)],
    ))
    .unwrap()
    .injected::<u64>()
    .async_stage("a", move |i: WorkItem<u64>| {
        let gate = held.clone();
        async move {
            let _permit = gate.acquire().await;
            Ok(i)
        }
    })
    .build()
    .unwrap();
    pipeline.start().await.unwrap();
    pipeline.inject(vec![WorkItem::new(1)]).await.unwrap();
    let mut stop = std::pin::pin!(pipeline.stop());
    // Polled once: the stop is asked for, and waits for item 1.
    let pending =
        std::future::poll_fn(|cx| std::task::Poll::Ready(stop.as_mut().poll(cx).is_pending()))
            .await;
    assert!(pending, "the stop waits for the item in flight");
    assert!(matches!(
        within(
            Duration::from_secs(10),
            pipeline.inject(vec![WorkItem::new(2)])
        )
        .await,
        Err(PipelineError::InputClosed(_))
    ));
    gate.add_permits(1);
    within(Duration::from_secs(10), stop).await.unwrap();
    let results = pipeline.run().await.unwrap();
    assert_eq!(
        results.len(),
        1,
        "only the item injected before the stop ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_fed_pipeline_ends_with_its_senders_or_on_stop() {
    // Ends when the senders are gone.
    let (tx, source) = sources::channel::<u64>(8);
    let pipeline = Pipeline::builder(config(
        "channel",
        vec![StageConfig::new("a", ExecutionType::Async)],
    ))
    .unwrap()
    .source(source)
    .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
    .build()
    .unwrap();
    pipeline.start().await.unwrap();
    let feeder = tokio::spawn(async move {
        for n in 0..100 {
            tx.send(WorkItem::new(n)).await.unwrap();
        }
    });
    let results = within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap();
    feeder.await.unwrap();
    assert_eq!(results.len(), 100);

    // Stops while the source waits on an idle channel.
    let (tx, source) = sources::channel::<u64>(8);
    let pipeline = Pipeline::builder(config(
        "idle-channel",
        vec![StageConfig::new("a", ExecutionType::Async)],
    ))
    .unwrap()
    .source(source)
    .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
    .build()
    .unwrap();
    pipeline.start().await.unwrap();
    tx.send(WorkItem::new(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    within(Duration::from_secs(10), pipeline.stop())
        .await
        .unwrap();
    assert_eq!(pipeline.run().await.unwrap().len(), 1);
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_kept_only_when_asked() {
    let outcomes = Arc::new(Outcomes::default());
    let pipeline = Pipeline::builder(
        config(
            "no-results",
            vec![StageConfig::new("a", ExecutionType::Async)],
        )
        .retain_results(false),
    )
    .unwrap()
    .source(sources::iter(0..1_000u64))
    .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
    .on_complete(outcomes.callback())
    .build()
    .unwrap();
    let results = within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap();
    assert!(results.is_empty());
    assert_eq!(outcomes.ok.load(Ordering::SeqCst), 1_000);
    assert_eq!(pipeline.stats().await.unwrap().completed_items, 1_000);
}

/// As in the seed, tracking off keeps nothing per item: `run()` returns no
/// results, while callbacks, events and stats still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_off_keeps_no_results() {
    let outcomes = Arc::new(Outcomes::default());
    let pipeline = Pipeline::builder(
        config(
            "untracked",
            vec![StageConfig::new("a", ExecutionType::Async)],
        )
        .enable_tracking(false),
    )
    .unwrap()
    .source(sources::iter(0..1_000u64))
    .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
    .on_complete(outcomes.callback())
    .build()
    .unwrap();
    let mut events = pipeline.subscribe_filtered(EventFilter::finished());
    let results = within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap();
    assert!(results.is_empty(), "{} results kept", results.len());
    assert_eq!(outcomes.ok.load(Ordering::SeqCst), 1_000);
    assert_eq!(pipeline.stats().await.unwrap().completed_items, 1_000);
    let mut finished = 0;
    while let Some(event) = events.recv().await {
        finished += usize::from(matches!(event, PipelineEvent::ItemFinished(_)));
    }
    assert_eq!(finished, 1_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_stopped_from_outside_never_leaves_run_hanging() {
    let pipeline = Pipeline::builder(config(
        "killed",
        vec![StageConfig::new("a", ExecutionType::Async)],
    ))
    .unwrap()
    .source(sources::iter(endless()))
    .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
    .build()
    .unwrap();
    // A parent actor that owns the pipeline kills it.
    let (parent, _) = ractor::Actor::spawn(None, Parent, ()).await.unwrap();
    let root = pipeline.spawn_linked(parent.get_cell()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    root.kill();
    let err = within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap_err();
    assert!(matches!(err, PipelineError::Interrupted { .. }), "{err}");
    assert!(!pipeline.is_running());
    parent.stop(None);
}

struct Parent;

impl ractor::Actor for Parent {
    type Msg = ();
    type State = ();
    type Arguments = ();
    async fn pre_start(
        &self,
        _: ractor::ActorRef<()>,
        _: (),
    ) -> Result<(), ractor::ActorProcessingErr> {
        Ok(())
    }
    async fn handle_supervisor_evt(
        &self,
        _: ractor::ActorRef<()>,
        _: ractor::SupervisionEvent,
        _: &mut (),
    ) -> Result<(), ractor::ActorProcessingErr> {
        Ok(())
    }
}

/// An abort that lands while panicking workers hand back their unstarted
/// items still accounts for every item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_amid_panics_accounts_for_every_item() {
    for model in [
        ExecutionType::Async,
        ExecutionType::Thread,
        ExecutionType::Cpu,
    ] {
        for round in 0..10u64 {
            let builder = Pipeline::builder(config(
                "abort-panics",
                vec![StageConfig::new("risky", model).workers(3).queue_size(30)],
            ))
            .unwrap()
            .source(sources::iter(endless()));
            let work = |i: WorkItem<u64>| -> anyhow::Result<WorkItem<u64>> {
                std::thread::sleep(Duration::from_micros(50));
                if i.data % 7 == 3 {
                    panic!("planned");
                }
                Ok(i)
            };
            let pipeline = match model {
                ExecutionType::Async => {
                    builder.async_stage("risky", move |i| async move { work(i) })
                }
                _ => builder.sync_stage("risky", work),
            }
            .build()
            .unwrap();
            pipeline.start().await.unwrap();
            tokio::time::sleep(Duration::from_micros(200 + round * 150)).await;
            within(Duration::from_secs(10), pipeline.abort())
                .await
                .unwrap();
            let results = pipeline.run().await.unwrap();
            let stats = pipeline.stats().await.unwrap();
            assert_eq!(
                results.len() as u64,
                stats.admitted_items,
                "{model} round {round}"
            );
            assert_unique_ids(&results);
        }
    }
}

/// `stop_within` drains what it can and cancels what is left at the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_within_cancels_what_is_left_at_the_deadline() {
    let outcomes = Arc::new(Outcomes::default());
    let pipeline = Pipeline::builder(config(
        "deadline",
        vec![
            // One worker: items reach `slow` in order, so none of the first
            // ten can wait behind two items that never end (with two, a
            // worker that ran ahead sent 10 and 11 first on a loaded
            // machine, both `slow` workers hung on them, and the test hung).
            StageConfig::new("quick", ExecutionType::Async)
                .workers(1)
                .queue_size(10),
            StageConfig::new("slow", ExecutionType::Async)
                .workers(2)
                .queue_size(10),
        ],
    ))
    .unwrap()
    .source(sources::iter(endless()))
    .async_stage("quick", |i: WorkItem<u64>| async move { Ok(i) })
    .async_stage("slow", |i: WorkItem<u64>| async move {
        if i.data >= 10 {
            // Never on its own (a 60 s sleep could end first on a loaded
            // machine, where reaching 10 outcomes once took a minute).
            std::future::pending::<()>().await;
        }
        Ok(i)
    })
    .on_complete(outcomes.callback())
    .build()
    .unwrap();
    pipeline.start().await.unwrap();
    within(Duration::from_secs(60), async {
        while outcomes.total() < 10 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let started = std::time::Instant::now();
    within(
        Duration::from_secs(10),
        pipeline.stop_within(Duration::from_millis(200)),
    )
    .await
    .unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let results = pipeline.run().await.unwrap();
    assert_eq!(
        results.len() as u64,
        pipeline.stats().await.unwrap().admitted_items
    );
    assert_eq!(results.iter().filter(|r| r.success).count(), 10);
    assert!(
        results
            .iter()
            .filter(|r| !r.success)
            .all(|r| r.is_cancelled())
    );
}

/// A result a handler returned is never replaced by another outcome: when
/// `stop_within` cancels what is left at its deadline, while a blocking
/// handler holds its worker, every item whose handler had returned keeps
/// its result, whether or not its worker had reported it yet (issue 12
/// item 1). With one worker no other worker can take anything from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_that_came_back_is_never_replaced() {
    for model in [ExecutionType::Thread, ExecutionType::Cpu] {
        for workers in [1, 2] {
            let release = Arc::new(AtomicBool::new(false));
            let blocked = Arc::new(AtomicBool::new(false));
            let returned = Arc::new(Mutex::new(HashSet::new()));
            let (r, b, back) = (release.clone(), blocked.clone(), returned.clone());
            let pipeline = Pipeline::builder(config(
                "came-back",
                vec![StageConfig::new("work", model).workers(workers)],
            ))
            .unwrap()
            .source(sources::iter(0..20u64))
            .sync_stage("work", move |i: WorkItem<u64>| {
                if i.data == 3 {
                    b.store(true, Ordering::SeqCst);
                    let start = std::time::Instant::now();
                    while !r.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(10) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                back.lock().unwrap().insert(i.job_id().clone());
                Ok(i)
            })
            .build()
            .unwrap();
            pipeline.start().await.unwrap();
            within(Duration::from_secs(10), async {
                while !blocked.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let came_back = returned.lock().unwrap().clone();
            within(
                Duration::from_secs(10),
                pipeline.stop_within(Duration::from_millis(300)),
            )
            .await
            .unwrap();
            let results = within(Duration::from_secs(10), pipeline.run())
                .await
                .unwrap();
            release.store(true, Ordering::SeqCst);
            assert_eq!(results.len(), 20, "{model} x {workers}");
            assert_unique_ids(&results);
            assert!(!came_back.is_empty(), "{model} x {workers}");
            for r in &results {
                if came_back.contains(&r.job_id) {
                    assert!(
                        r.success,
                        "{model} x {workers}: {} returned Ok, yet {:?}",
                        r.job_id, r.error
                    );
                } else {
                    assert!(r.success || r.is_cancelled(), "{model} x {workers}: {r:?}");
                }
            }
        }
    }
}

/// Every item fails, slowly enough to be stopped mid-run, into a dead-letter
/// channel of one letter that nobody reads until `run` has returned.
fn unread_dead_letters(
    name: &str,
) -> (
    Pipeline<u64>,
    tokio::sync::mpsc::Receiver<bergtalzug::DeadLetter>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let pipeline = Pipeline::builder(config(
        name,
        vec![StageConfig::new("reject", ExecutionType::Async).workers(2)],
    ))
    .unwrap()
    .source(sources::iter(endless()))
    .async_stage("reject", |i: WorkItem<u64>| async move {
        anyhow::bail!("rejected {}", i.data);
        #[allow(unreachable_code)]
        Ok(i)
    })
    .dead_letters(tx)
    .build()
    .unwrap();
    (pipeline, rx)
}

/// `abort` and `stop_within`'s deadline return whatever observers do: a
/// lossless event stream kept and never read, a dead-letter receiver read
/// only after `run`. Nothing is lost: the stream and the receiver still get
/// every item's event and letter afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_and_deadlines_return_whatever_observers_do() {
    for deadline in [None, Some(Duration::from_millis(100))] {
        let (pipeline, mut letters) = unread_dead_letters("observed");
        let mut events = pipeline.subscribe_lossless();
        let _forgotten = pipeline.subscribe();
        pipeline.start().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!pipeline.is_finished(), "held back by the letters");
        match deadline {
            None => within(Duration::from_secs(5), pipeline.abort()).await,
            Some(d) => within(Duration::from_secs(5), pipeline.stop_within(d)).await,
        }
        .unwrap();
        let results = pipeline.run().await.unwrap();
        assert!(!results.is_empty());
        assert!(results.iter().all(|r| !r.success));
        let mut got = 0;
        while within(Duration::from_secs(5), letters.recv())
            .await
            .is_some()
        {
            got += 1;
        }
        assert_eq!(
            got,
            results.len(),
            "every dead letter delivered ({deadline:?})"
        );
        let mut finished = 0;
        while let Some(event) = events.recv().await {
            finished += usize::from(matches!(event, PipelineEvent::ItemFinished(_)));
        }
        assert_eq!(finished, results.len(), "every ItemFinished ({deadline:?})");
    }
}

/// An endless source that takes a while to say how much it holds (it
/// counts a directory, say): `start` is in flight until the test lets it
/// go on (`go`), and a little longer.
struct SlowToStart {
    next: u64,
    entered: Arc<std::sync::atomic::AtomicBool>,
    go: Arc<std::sync::atomic::AtomicBool>,
}

impl Source for SlowToStart {
    type Item = u64;
    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<u64>>> {
        let items = (self.next..self.next + count as u64)
            .map(WorkItem::new)
            .collect();
        self.next += count as u64;
        Ok(items)
    }
    fn size_hint(&self) -> Option<u64> {
        self.entered.store(true, Ordering::SeqCst);
        while !self.go.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(20));
        None
    }
}

/// A stop or abort sent from another task while `start` is still starting
/// is not lost: it waits for the start and then takes effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_start_takes_effect_once_the_pipeline_is_up() {
    for round in 0..50u32 {
        let entered = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let go = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pipeline = Pipeline::builder(config(
            "stopped-while-starting",
            vec![
                StageConfig::new("a", ExecutionType::Async).workers(2),
                StageConfig::new("b", ExecutionType::Async).workers(2),
            ],
        ))
        .unwrap()
        .source(SlowToStart {
            next: 0,
            entered: entered.clone(),
            go: go.clone(),
        })
        .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
        .async_stage("b", |i: WorkItem<u64>| async move { Ok(i) })
        .build()
        .unwrap();
        let starting = tokio::spawn({
            let pipeline = pipeline.clone();
            async move { pipeline.start().await }
        });
        while !entered.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(
            !starting.is_finished() && !pipeline.is_running(),
            "round {round}"
        );
        go.store(true, Ordering::SeqCst);
        let abort = round % 2 == 1;
        let stopped = if abort {
            within(Duration::from_secs(10), pipeline.abort()).await
        } else {
            within(Duration::from_secs(10), pipeline.stop()).await
        };
        assert_eq!(stopped, Ok(()), "round {round}");
        starting.await.unwrap().unwrap();
        assert!(pipeline.is_finished());
        let results = within(Duration::from_secs(10), pipeline.run())
            .await
            .unwrap();
        assert_eq!(
            results.len() as u64,
            pipeline.stats().await.unwrap().admitted_items
        );
        if !abort {
            assert!(results.iter().all(|r| r.success));
        }
    }
}

/// A Thread handler that never returns: once the pipeline is aborted,
/// `main` (here: a thread that owns its runtime) must be able to return and
/// drop the runtime, which waits for tokio's blocking threads. The stuck
/// thread is the stage's own and nothing waits for it.
#[test]
fn a_thread_handler_that_never_returns_does_not_keep_the_program_from_exiting() {
    let (exited, exit) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = two_worker_runtime();
        let stuck = runtime.block_on(async {
            let entered = Arc::new(tokio::sync::Notify::new());
            let notify = entered.clone();
            let pipeline = Pipeline::builder(config(
                "never-returns",
                vec![
                    StageConfig::new("stuck", ExecutionType::Thread)
                        .workers(1)
                        .queue_size(4),
                ],
            ))
            .unwrap()
            .source(sources::iter(0..10u64))
            .sync_stage("stuck", move |i: WorkItem<u64>| {
                if i.data < 10 {
                    notify.notify_one();
                    loop {
                        std::thread::park();
                    }
                }
                Ok(i)
            })
            .build()
            .unwrap();
            pipeline.start().await.unwrap();
            within(Duration::from_secs(10), entered.notified()).await;
            within(Duration::from_secs(10), pipeline.abort())
                .await
                .unwrap();
            let results = within(Duration::from_secs(10), pipeline.run())
                .await
                .unwrap();
            assert!(results.iter().all(|r| r.is_cancelled()));
            pipeline.stats().await.unwrap().stages[0].stuck_threads
        });
        drop(runtime);
        let _ = exited.send(stuck);
    });
    let stuck = exit
        .recv_timeout(Duration::from_secs(20))
        .expect("the runtime waited for the stuck handler's thread: the program cannot exit");
    assert_eq!(stuck, 1, "the stuck thread is accounted for");
}

/// A program that runs many short pipelines keeps no task per finished
/// one: every actor and helper task ends with its pipeline (the stats
/// monitor used to live on until its next tick, up to a second later, and
/// the stats line's timer until its own, `stats_interval` later: 10 s by
/// default). An aborted pipeline leaves none either, though a retry's
/// backoff, a rate limit's pace, a batch's wait or a quiet source's
/// refresh was still minutes away (their timers used to run out alone).
#[test]
fn a_finished_pipeline_leaves_no_task_behind() {
    let runtime = two_worker_runtime();
    runtime.block_on(async {
        let before = alive_tasks();
        for round in 0..3u64 {
            let stages = vec![StageConfig::new("a", ExecutionType::Async)];
            // With the stats line's timer (the default) and without.
            let config = match round {
                0 => PipelineConfig::new("short", stages),
                _ => config("short", stages),
            };
            let pipeline = Pipeline::builder(config)
                .unwrap()
                .injected::<u64>()
                .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
                .build()
                .unwrap();
            pipeline.start().await.unwrap();
            pipeline.inject(vec![WorkItem::new(round)]).await.unwrap();
            within(Duration::from_secs(10), pipeline.stop())
                .await
                .unwrap();
        }
        let deadline = std::time::Instant::now() + TASKS_END_WITHIN;
        while alive_tasks() > before && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            alive_tasks(),
            before,
            "tasks left behind by finished pipelines"
        );

        // Aborted while items wait 20 s for their retry, and while the
        // rate limit makes the others wait up to a minute: their timers
        // end too.
        let waiting = vec![
            StageConfig::new("retry", ExecutionType::Async)
                .retry(RetryPolicy::fixed(3, Duration::from_secs(20))),
            StageConfig::new("paced", ExecutionType::Async)
                .rate_limit(RateLimit::new(1, Duration::from_secs(60))),
        ];
        let pipeline = Pipeline::builder(config("waiting", waiting))
            .unwrap()
            .injected::<u64>()
            .retrying_async_stage("retry", |i: WorkItem<u64>| async move {
                if i.data.is_multiple_of(2) {
                    Err(anyhow::anyhow!("down"))
                } else {
                    Ok(i)
                }
            })
            .async_stage("paced", |i: WorkItem<u64>| async move { Ok(i) })
            .build()
            .unwrap();
        pipeline.start().await.unwrap();
        pipeline
            .inject((0..6).map(WorkItem::new).collect())
            .await
            .unwrap();
        let mut waited = 0;
        loop {
            let stats = pipeline.stats().await.unwrap();
            let retried = stats.stage("retry").unwrap().retried;
            let paced = stats.stage("paced").unwrap().admitted;
            if retried == 3 && paced == 3 {
                break;
            }
            waited += 1;
            assert!(
                waited < 1000,
                "3 items wait to retry and 3 wait for the limit: {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        within(Duration::from_secs(10), pipeline.abort())
            .await
            .unwrap();
        drop(pipeline);
        let deadline = std::time::Instant::now() + TASKS_END_WITHIN;
        while alive_tasks() > before && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            alive_tasks(),
            before,
            "timers left behind by an aborted pipeline"
        );

        // Aborted while a batch waits a minute to fill: its timer ends too.
        let gathering = vec![
            StageConfig::new("gather", ExecutionType::Async).batch(100, Duration::from_secs(60)),
        ];
        let pipeline = Pipeline::builder(config("gathering", gathering))
            .unwrap()
            .injected::<u64>()
            .async_batch_stage("gather", |batch: Batch<u64>| async move {
                Ok(batch.items().iter().map(|i| Ok(i.data)).collect())
            })
            .build()
            .unwrap();
        pipeline.start().await.unwrap();
        pipeline
            .inject((0..3).map(WorkItem::new).collect())
            .await
            .unwrap();
        let mut waited = 0;
        loop {
            let stats = pipeline.stats().await.unwrap();
            if stats.stage("gather").unwrap().admitted == 3 {
                break;
            }
            waited += 1;
            assert!(waited < 1000, "3 items wait for their batch: {stats:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        within(Duration::from_secs(10), pipeline.abort())
            .await
            .unwrap();
        drop(pipeline);
        let deadline = std::time::Instant::now() + TASKS_END_WITHIN;
        while alive_tasks() > before && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(alive_tasks(), before, "a batch's timer left behind");

        // Aborted while the source, which had nothing, is asked again only
        // a minute later: that timer ends too.
        let log = Arc::new(AtomicBool::new(false));
        let idle = Quiet(log.clone());
        let quiet = config("quiet", vec![StageConfig::new("a", ExecutionType::Async)])
            .queue_refresh_rate(Duration::from_secs(60));
        let pipeline = Pipeline::builder(quiet)
            .unwrap()
            .source(idle)
            .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
            .build()
            .unwrap();
        pipeline.start().await.unwrap();
        let mut waited = 0;
        while !log.load(Ordering::SeqCst) {
            waited += 1;
            assert!(waited < 1000, "the source was never asked");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        within(Duration::from_secs(10), pipeline.abort())
            .await
            .unwrap();
        drop(pipeline);
        let deadline = std::time::Instant::now() + TASKS_END_WITHIN;
        while alive_tasks() > before && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(alive_tasks(), before, "the source's timer left behind");
    });
}

/// A runtime of 2 worker threads, as the machine the tests run on has.
fn two_worker_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// How long the tasks of a pipeline that finished have to end. Well under
/// the 1 s tick of the stats monitor, so that a timer that runs out on its
/// own instead of ending with its actor is caught; the tasks of a finished
/// pipeline end within milliseconds.
const TASKS_END_WITHIN: Duration = Duration::from_millis(300);

/// A pipeline fed only by `inject` whose last handle is dropped can no
/// longer be fed or stopped: it stops, the items it admitted finish (and
/// get their callbacks), and its actors end.
#[test]
fn dropping_the_last_handle_of_an_injected_pipeline_stops_it_after_what_it_admitted() {
    let runtime = two_worker_runtime();
    runtime.block_on(async {
        let before = alive_tasks();
        let done = Arc::new(AtomicU64::new(0));
        let counted = done.clone();
        let stages = vec![StageConfig::new("slow", ExecutionType::Async).workers(2)];
        let pipeline = Pipeline::builder(config("forgotten", stages))
            .unwrap()
            .injected::<u64>()
            .async_stage("slow", |i: WorkItem<u64>| async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(i)
            })
            .on_complete(move |r| {
                if r.success {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
            })
            .build()
            .unwrap();
        pipeline.start().await.unwrap();
        pipeline
            .inject((0..6).map(WorkItem::new).collect())
            .await
            .unwrap();
        // A clone dropped first changes nothing: the input stays open (a
        // stop would refuse this injection at once).
        drop(pipeline.clone());
        within(
            Duration::from_secs(5),
            pipeline.inject(vec![WorkItem::new(6)]),
        )
        .await
        .expect("a clone's drop closed the input");
        drop(pipeline);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while (done.load(Ordering::SeqCst) < 7 || alive_tasks() > before)
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(done.load(Ordering::SeqCst), 7, "the admitted items finish");
        assert_eq!(
            alive_tasks(),
            before,
            "the forgotten pipeline's actors are left running"
        );
    });
}

/// A source that never has anything yet, recording that it was asked.
struct Quiet(Arc<AtomicBool>);

impl Source for Quiet {
    type Item = u64;

    async fn refill(&mut self, _count: usize) -> anyhow::Result<Vec<WorkItem<u64>>> {
        Ok(Vec::new())
    }

    async fn fetch(&mut self, _count: usize) -> anyhow::Result<Refill<u64>> {
        self.0.store(true, Ordering::SeqCst);
        Ok(Refill::NothingYet)
    }
}
