//! The ready-made sources feed a pipeline to the end of their input: an
//! iterator of data, an iterator of work items, a `Stream`, a channel.

use std::time::Duration;

use bergtalzug::prelude::*;

mod common;
use common::*;

async fn collect<S: Source<Item = u64>>(source: S) -> Vec<WorkItemResult> {
    let pipeline = Pipeline::builder(config(
        "sources",
        vec![
            StageConfig::new("a", ExecutionType::Async)
                .workers(2)
                .queue_size(7),
        ],
    ))
    .unwrap()
    .source(source)
    .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
    .build()
    .unwrap();
    within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iterators_of_data_and_of_items() {
    assert_eq!(collect(sources::iter(0..100u64)).await.len(), 100);
    let items = (0..50u64).map(|n| WorkItem::with_job_id(format!("job-{n}"), n));
    let results = collect(sources::items(items)).await;
    assert_eq!(results.len(), 50);
    assert!(results.iter().any(|r| r.job_id == JobId::from("job-49")));
    assert!(collect(sources::iter(Vec::<u64>::new())).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_yields_slowly_is_read_to_its_end() {
    let stream = futures::stream::unfold(0u64, |n| async move {
        if n == 40 {
            return None;
        }
        if n % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Some((WorkItem::new(n), n + 1))
    });
    let results = collect(sources::stream(stream)).await;
    assert_eq!(results.len(), 40);
    assert_unique_ids(&results);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_from_an_existing_receiver() {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let feeder = tokio::spawn(async move {
        for n in 0..30u64 {
            tx.send(WorkItem::new(n)).await.unwrap();
        }
    });
    let results = collect(sources::from_receiver(rx)).await;
    feeder.await.unwrap();
    assert_eq!(results.len(), 30);
}

/// A queue that hands out messages and records every acknowledgement.
struct AckingQueue {
    next: u64,
    end: u64,
    acks: std::sync::Arc<std::sync::Mutex<Vec<bergtalzug::Ack>>>,
}

impl Source for AckingQueue {
    type Item = u64;

    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<u64>>> {
        let end = self.end.min(self.next + count as u64);
        let items = (self.next..end)
            .map(|n| WorkItem::with_job_id(format!("msg-{n}"), n))
            .collect();
        self.next = end;
        Ok(items)
    }

    fn wants_acks(&self) -> bool {
        true
    }

    async fn ack(&mut self, outcomes: Vec<bergtalzug::Ack>) {
        // A slow acknowledgement (a network call) holds only the source.
        tokio::task::yield_now().await;
        self.acks.lock().unwrap().extend(outcomes);
    }
}

async fn acks_after(stop: Option<Duration>, abort: bool) {
    let acks = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let pipeline = Pipeline::builder(config(
        "acks",
        vec![
            StageConfig::new("a", ExecutionType::Async)
                .workers(3)
                .queue_size(16),
            StageConfig::new("b", ExecutionType::Thread)
                .workers(2)
                .queue_size(16),
        ],
    ))
    .unwrap()
    .source(AckingQueue {
        next: 0,
        end: 2_000,
        acks: acks.clone(),
    })
    .async_stage("a", |i: WorkItem<u64>| async move {
        tokio::time::sleep(Duration::from_micros(50)).await;
        if i.data % 7 == 0 {
            anyhow::bail!("{} is a multiple of 7", i.data);
        }
        Ok(i)
    })
    .sync_stage("b", Ok)
    .build()
    .unwrap();
    pipeline.start().await.unwrap();
    if let Some(after) = stop {
        tokio::time::sleep(after).await;
        if abort {
            within(Duration::from_secs(10), pipeline.abort())
                .await
                .unwrap();
        } else {
            within(Duration::from_secs(10), pipeline.stop())
                .await
                .unwrap();
        }
    }
    let results = within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    // Every admitted item is acknowledged once, with its own outcome,
    // before run() returns.
    let acks = acks.lock().unwrap();
    assert_eq!(acks.len(), results.len(), "stop {stop:?} abort {abort}");
    let by_id: std::collections::HashMap<_, _> =
        acks.iter().map(|a| (a.job_id.clone(), a)).collect();
    assert_eq!(by_id.len(), acks.len(), "an item was acknowledged twice");
    for r in &results {
        let ack = by_id.get(&r.job_id).expect("every result is acknowledged");
        assert_eq!(ack.is_success(), r.success);
        assert_eq!(ack.error, r.error);
    }
    if stop.is_none() {
        assert_eq!(acks.len(), 2_000);
        assert_eq!(acks.iter().filter(|a| !a.is_success()).count(), 286);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acking_source_hears_every_outcome_once_before_run_returns() {
    acks_after(None, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_pipeline_acknowledges_what_it_admitted() {
    acks_after(Some(Duration::from_millis(20)), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_pipeline_acknowledges_the_cancelled_items() {
    acks_after(Some(Duration::from_millis(20)), true).await;
}

/// An acking queue that panics in its `refill_panics`-th refill or in its
/// `ack_panics`-th ack (after it has recorded what it was told).
struct PanickingQueue {
    queue: AckingQueue,
    refills: u32,
    acks: u32,
    refill_panics: u32,
    ack_panics: u32,
}

impl Source for PanickingQueue {
    type Item = u64;

    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<u64>>> {
        self.refills += 1;
        assert!(self.refills != self.refill_panics, "refill bug");
        self.queue.refill(count.min(4)).await
    }

    fn wants_acks(&self) -> bool {
        true
    }

    async fn ack(&mut self, outcomes: Vec<bergtalzug::Ack>) {
        self.acks += 1;
        self.queue.ack(outcomes).await;
        assert!(self.acks != self.ack_panics, "ack bug");
    }
}

/// Every admitted item is acknowledged once, whatever the source does: a
/// panic in `refill` or in `ack` fails the run (`SourcePanicked`) but
/// still acknowledges every item it had admitted, before `run` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_source_still_acknowledges_every_admitted_item() {
    for (refill_panics, ack_panics) in [(3, 0), (0, 1), (0, 2)] {
        let acks = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let pipeline = Pipeline::builder(config(
            "panicking-queue",
            vec![
                StageConfig::new("a", ExecutionType::Async)
                    .workers(2)
                    .queue_size(4),
            ],
        ))
        .unwrap()
        .source(PanickingQueue {
            queue: AckingQueue {
                next: 0,
                end: 1_000,
                acks: acks.clone(),
            },
            refills: 0,
            acks: 0,
            refill_panics,
            ack_panics,
        })
        .async_stage("a", |i: WorkItem<u64>| async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok(i)
        })
        .build()
        .unwrap();
        let err = within(Duration::from_secs(10), pipeline.run())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, PipelineError::SourcePanicked { message, .. } if message.contains("bug")),
            "{err}"
        );
        let admitted = pipeline.stats().await.unwrap().admitted_items;
        assert!(admitted > 0);
        let acks = acks.lock().unwrap();
        let ids: std::collections::HashSet<_> = acks.iter().map(|a| a.job_id.clone()).collect();
        assert_eq!(ids.len(), acks.len(), "an item was acknowledged twice");
        assert_eq!(
            acks.len() as u64,
            admitted,
            "refill panics at {refill_panics}, ack at {ack_panics}"
        );
    }
}

/// An injection cut short by the input closing says how many of its items
/// were admitted (the first ones, in order); those, and only those, get
/// outcomes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injection_cut_short_says_which_items_got_in() {
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let pipeline = Pipeline::builder(config(
        "cut-short",
        vec![
            StageConfig::new("gate", ExecutionType::Async)
                .workers(1)
                .queue_size(10),
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
    pipeline.start().await.unwrap();
    let injecting = tokio::spawn({
        let pipeline = pipeline.clone();
        async move {
            let items = (0..100u64)
                .map(|n| WorkItem::with_job_id(format!("job-{n}"), n))
                .collect();
            pipeline.inject(items).await
        }
    });
    // Room for 11 (queue 10 + 1 worker): the rest wait until the stop.
    while pipeline.stats().await.unwrap().admitted_items < 11 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stopping = tokio::spawn({
        let pipeline = pipeline.clone();
        async move { pipeline.stop().await }
    });
    let err = within(Duration::from_secs(10), injecting)
        .await
        .unwrap()
        .unwrap_err();
    gate.add_permits(100);
    within(Duration::from_secs(10), stopping)
        .await
        .unwrap()
        .unwrap();
    let results = pipeline.run().await.unwrap();
    let PipelineError::PartlyAdmitted {
        admitted, refused, ..
    } = err
    else {
        panic!("not a partial admission: {err}");
    };
    assert_eq!(admitted + refused, 100);
    assert_eq!(admitted, results.len());
    let mut ids: Vec<_> = results.iter().map(|r| r.job_id.to_string()).collect();
    ids.sort_by_key(|id| id[4..].parse::<u64>().unwrap());
    let first: Vec<_> = (0..admitted).map(|n| format!("job-{n}")).collect();
    assert_eq!(ids, first, "the first `admitted` items, in order");
}
