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
