//! What a long-lived or durable source can rely on: acks that never wait
//! behind a refill, refused duplicates that are never acked as the live
//! item, "nothing yet" that keeps the run open without busy polling, and
//! every item it handed out that was not admitted given back to it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bergtalzug::prelude::*;
use bergtalzug::{Ack, AckFuture, Acknowledger};

mod common;
use common::*;

/// Records the acks it is told, on its own path.
struct Recorder(Arc<Mutex<Vec<Ack>>>);

impl Acknowledger for Recorder {
    fn ack(&mut self, outcomes: Vec<Ack>) -> AckFuture<'_> {
        Box::pin(async move { self.0.lock().unwrap().extend(outcomes) })
    }
}

/// Hands out `first` items once, then waits for new work that never comes
/// (a queue that is empty right now, read with a blocking call).
struct WaitingQueue {
    first: u64,
    handed_out: bool,
    acks: Arc<Mutex<Vec<Ack>>>,
}

impl Source for WaitingQueue {
    type Item = u64;

    async fn refill(&mut self, _count: usize) -> anyhow::Result<Vec<WorkItem<u64>>> {
        if self.handed_out {
            std::future::pending::<()>().await;
        }
        self.handed_out = true;
        Ok((0..self.first).map(WorkItem::new).collect())
    }

    fn acknowledger(&mut self) -> Option<Box<dyn Acknowledger>> {
        Some(Box::new(Recorder(self.acks.clone())))
    }
}

/// Before the fix the source actor awaited the refill in its handler, so
/// the acks of finished items queued behind a refill waiting for new work
/// (a broker would then redeliver them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_items_are_acknowledged_while_a_refill_waits_for_new_work() {
    let acks = Arc::new(Mutex::new(Vec::new()));
    let pipeline = Pipeline::builder(config(
        "waiting-refill",
        vec![
            StageConfig::new("a", ExecutionType::Async)
                .workers(2)
                .queue_size(16),
        ],
    ))
    .unwrap()
    .source(WaitingQueue {
        first: 10,
        handed_out: false,
        acks: acks.clone(),
    })
    .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
    .build()
    .unwrap();
    pipeline.start().await.unwrap();
    within(Duration::from_secs(5), async {
        while acks.lock().unwrap().len() < 10 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // The pending refill is dropped by stop(); the run ends.
    within(Duration::from_secs(5), pipeline.stop())
        .await
        .unwrap();
    let results = within(Duration::from_secs(5), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 10);
    let acks = acks.lock().unwrap();
    assert_eq!(acks.len(), 10, "each item acknowledged once");
    assert!(acks.iter().all(Ack::is_success));
}

/// Hands out `a`, then `a` again (while the first is still running) with
/// `b`; records acks and what it is given back.
struct RedeliveringQueue {
    refills: u32,
    acks: Arc<Mutex<Vec<Ack>>>,
    released: Arc<Mutex<Vec<String>>>,
}

impl Source for RedeliveringQueue {
    type Item = u64;

    async fn refill(&mut self, _count: usize) -> anyhow::Result<Vec<WorkItem<u64>>> {
        self.refills += 1;
        Ok(match self.refills {
            1 => vec![WorkItem::with_job_id("a", 0)],
            2 => vec![WorkItem::with_job_id("a", 1), WorkItem::with_job_id("b", 2)],
            _ => Vec::new(),
        })
    }

    fn wants_acks(&self) -> bool {
        true
    }

    async fn ack(&mut self, outcomes: Vec<Ack>) {
        self.acks.lock().unwrap().extend(outcomes);
    }

    async fn release(&mut self, unadmitted: Vec<WorkItem<u64>>) {
        let mut released = self.released.lock().unwrap();
        released.extend(unadmitted.iter().map(|i| i.job_id().to_string()));
    }
}

/// Before the fix a refused duplicate became a failed result that the
/// tracker acked with the live original's job id: a queue would have
/// dead-lettered the entry that was still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_duplicate_is_given_back_and_never_acked_as_the_live_item() {
    let acks = Arc::new(Mutex::new(Vec::new()));
    let released = Arc::new(Mutex::new(Vec::new()));
    let pipeline = Pipeline::builder(config(
        "redelivered",
        vec![
            StageConfig::new("a", ExecutionType::Async)
                .workers(2)
                .queue_size(4),
        ],
    ))
    .unwrap()
    .source(RedeliveringQueue {
        refills: 0,
        acks: acks.clone(),
        released: released.clone(),
    })
    .async_stage("a", |i: WorkItem<u64>| async move {
        if i.data == 0 {
            // The original is still running when its duplicate arrives.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(i)
    })
    .build()
    .unwrap();
    let results = within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap();
    // The duplicate is still reported, as refused.
    assert_eq!(results.len(), 3);
    let refused: Vec<_> = results
        .iter()
        .filter(|r| matches!(&r.error, Some(e) if e.kind == ItemErrorKind::DuplicateJobId))
        .collect();
    assert_eq!(refused.len(), 1);
    let mut acked: Vec<_> = acks
        .lock()
        .unwrap()
        .iter()
        .map(|a| (a.job_id.to_string(), a.is_success()))
        .collect();
    acked.sort();
    assert_eq!(
        acked,
        vec![("a".to_string(), true), ("b".to_string(), true)],
        "the live item's outcome only, once each"
    );
    assert_eq!(*released.lock().unwrap(), vec!["a".to_string()]);
}

/// Has work at some moments only: `Items`, then nothing twice, then more
/// `Items`, then the end. Records when it was asked.
struct Intermittent {
    asked: Arc<Mutex<Vec<Instant>>>,
}

impl Source for Intermittent {
    type Item = u64;

    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<u64>>> {
        match self.fetch(count).await? {
            Refill::Items(items) => Ok(items),
            _ => Ok(Vec::new()),
        }
    }

    async fn fetch(&mut self, _count: usize) -> anyhow::Result<Refill<u64>> {
        let call = {
            let mut asked = self.asked.lock().unwrap();
            asked.push(Instant::now());
            asked.len()
        };
        Ok(match call {
            1 => Refill::Items((0..5).map(WorkItem::new).collect()),
            2 | 3 => Refill::NothingYet,
            4 => Refill::Items((5..8).map(WorkItem::new).collect()),
            _ => Refill::Exhausted,
        })
    }
}

/// Before the fix the only answer for "nothing now" was an empty batch,
/// which ended the run after the first five items.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_yet_keeps_the_run_open_and_asks_again_after_the_refresh_rate() {
    let asked = Arc::new(Mutex::new(Vec::new()));
    let rate = Duration::from_millis(40);
    let pipeline = Pipeline::builder(
        config(
            "intermittent",
            vec![
                StageConfig::new("a", ExecutionType::Async)
                    .workers(2)
                    .queue_size(4),
            ],
        )
        .queue_refresh_rate(rate),
    )
    .unwrap()
    .source(Intermittent {
        asked: asked.clone(),
    })
    .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
    .build()
    .unwrap();
    let results = within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 8, "the items after the quiet spell ran too");
    let asked = asked.lock().unwrap();
    // Asked once per answer: no polling in between.
    assert_eq!(asked.len(), 5, "asked {} times", asked.len());
    for (i, pair) in asked.windows(2).enumerate().skip(1).take(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= rate, "after nothing yet #{i} asked again in {gap:?}");
    }
}

/// Returns far more than asked on its first refill, then waits; records
/// what it is given back.
struct Overfull {
    handed_out: bool,
    released: Arc<Mutex<Vec<u64>>>,
}

impl Source for Overfull {
    type Item = u64;

    async fn refill(&mut self, _count: usize) -> anyhow::Result<Vec<WorkItem<u64>>> {
        if self.handed_out {
            std::future::pending::<()>().await;
        }
        self.handed_out = true;
        Ok((0..100u64)
            .map(|n| WorkItem::with_job_id(n.to_string(), n))
            .collect())
    }

    async fn release(&mut self, unadmitted: Vec<WorkItem<u64>>) {
        let mut released = self.released.lock().unwrap();
        released.extend(unadmitted.iter().map(|i| i.data));
    }
}

/// Before the fix the carry (items beyond the demand) was dropped silently
/// on close; a durable source could not release their leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_handed_out_but_not_admitted_are_given_back_on_close() {
    let released = Arc::new(Mutex::new(Vec::new()));
    let pipeline = Pipeline::builder(config(
        "overfull",
        vec![
            StageConfig::new("a", ExecutionType::Async)
                .workers(1)
                .queue_size(4),
        ],
    ))
    .unwrap()
    .source(Overfull {
        handed_out: false,
        released: released.clone(),
    })
    .async_stage("a", |i: WorkItem<u64>| async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok(i)
    })
    .build()
    .unwrap();
    pipeline.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    within(Duration::from_secs(5), pipeline.stop())
        .await
        .unwrap();
    let results = within(Duration::from_secs(5), pipeline.run())
        .await
        .unwrap();
    let released = released.lock().unwrap();
    assert!(!released.is_empty(), "some items were never admitted");
    // Every item handed out either got an outcome or was given back.
    let mut all: Vec<u64> = results
        .iter()
        .map(|r| r.job_id.to_string().parse().unwrap())
        .chain(released.iter().copied())
        .collect();
    all.sort_unstable();
    assert_eq!(all, (0..100).collect::<Vec<_>>());
}

/// As [`WaitingQueue`], but acknowledging through `Source::ack`, which
/// needs the source itself: the acks wait for the refill to come back.
struct WaitingAckingQueue {
    first: u64,
    handed_out: bool,
    acks: Arc<Mutex<Vec<Ack>>>,
}

impl Source for WaitingAckingQueue {
    type Item = u64;

    async fn refill(&mut self, _count: usize) -> anyhow::Result<Vec<WorkItem<u64>>> {
        if self.handed_out {
            std::future::pending::<()>().await;
        }
        self.handed_out = true;
        Ok((0..self.first).map(WorkItem::new).collect())
    }

    fn wants_acks(&self) -> bool {
        true
    }

    async fn ack(&mut self, outcomes: Vec<Ack>) {
        self.acks.lock().unwrap().extend(outcomes);
    }
}

/// Acks held back while `Source::ack`'s source is out on a refill are
/// delivered once `stop()` brings it back, each once, before `run` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_held_back_by_a_waiting_refill_are_delivered_before_run_returns() {
    let acks = Arc::new(Mutex::new(Vec::new()));
    let pipeline = Pipeline::builder(config(
        "held-back-acks",
        vec![
            StageConfig::new("a", ExecutionType::Async)
                .workers(2)
                .queue_size(16),
        ],
    ))
    .unwrap()
    .source(WaitingAckingQueue {
        first: 10,
        handed_out: false,
        acks: acks.clone(),
    })
    .async_stage("a", |i: WorkItem<u64>| async move { Ok(i) })
    .build()
    .unwrap();
    pipeline.start().await.unwrap();
    within(Duration::from_secs(5), async {
        while pipeline.stats().await.unwrap().completed_items < 10 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        acks.lock().unwrap().is_empty(),
        "the refill still holds the source"
    );
    within(Duration::from_secs(5), pipeline.stop())
        .await
        .unwrap();
    let results = within(Duration::from_secs(5), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 10);
    assert_eq!(acks.lock().unwrap().len(), 10, "each acknowledged once");
}
