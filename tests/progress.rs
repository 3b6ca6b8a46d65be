//! Progress shown as plain lines (what a pipe or CI gets): periodic lines
//! with the count, the total the source knows, the rate and every stage,
//! and a last line at the end.

use std::time::Duration;

use bergtalzug::prelude::*;
use bergtalzug::progress::{Progress, stage_line, summary_line};

mod common;
use common::*;

fn slow(name: &str, items: impl Source<Item = u64>) -> Pipeline<u64> {
    Pipeline::builder(config(
        name,
        vec![
            StageConfig::new("wait", ExecutionType::Async).workers(2),
            StageConfig::new("pass", ExecutionType::Thread).workers(1),
        ],
    ))
    .unwrap()
    .source(items)
    .async_stage("wait", |i: WorkItem<u64>| async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(i)
    })
    .sync_stage("pass", |i: WorkItem<u64>| {
        anyhow::ensure!(i.data != 5, "five fails");
        Ok(i)
    })
    .build()
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn plain_lines_show_the_count_of_the_total_and_every_stage() {
    // 20 items, 100 ms each on two workers: at least 1 s; a line every 300 ms.
    let out = Captured::default();
    let progress = Progress::lines(out.clone(), Duration::from_millis(300));
    assert!(!progress.is_bar());
    let pipeline = slow("lines", sources::iter(0..20u64));
    let shown = progress.watch(&pipeline);
    within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    within(Duration::from_secs(5), shown).await.unwrap();

    let lines = out.lines();
    assert!(lines.len() >= 4, "{lines:#?}");
    let (last, during) = lines.split_last().unwrap();
    for line in during {
        assert!(line.starts_with("lines: "), "{line}");
        assert!(line.contains("/20 ("), "{line}");
        assert!(line.contains(" | wait q"), "{line}");
        assert!(line.contains(" | pass q"), "{line}");
    }
    assert!(
        last.starts_with("lines: 20/20 (100.0%) ") && last.ends_with(" (finished)"),
        "{last}"
    );
    assert!(last.contains(", 1 failed"), "{last}");
    assert!(last.contains("bottleneck wait"), "{last}");
}

#[tokio::test(start_paused = true)]
async fn without_a_known_total_lines_count_what_is_done() {
    let out = Captured::default();
    let progress = Progress::lines(out.clone(), Duration::from_secs(10));
    // A channel source cannot know how many items will come.
    let (tx, rx) = sources::channel(8);
    let pipeline = slow("unknown", rx);
    let shown = progress.watch(&pipeline);
    let run = tokio::spawn({
        let pipeline = pipeline.clone();
        async move { pipeline.run().await }
    });
    for n in 10..16u64 {
        tx.send(WorkItem::new(n)).await.unwrap();
    }
    drop(tx);
    within(Duration::from_secs(30), run).await.unwrap().unwrap();
    within(Duration::from_secs(5), shown).await.unwrap();
    let lines = out.lines();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].starts_with("unknown: 6 done "), "{}", lines[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_detail_line_names_each_stage_in_order() {
    let pipeline = slow("detail", sources::iter(0..4u64));
    within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap();
    let stats = pipeline.stats().await.unwrap();
    let line = stage_line(&stats);
    let wait = line.find("wait q0 w0/2 ").expect(&line);
    let pass = line.find(" | pass q0 w0/1 ").expect(&line);
    assert!(wait < pass, "{line}");
    assert!(summary_line(&stats).starts_with("detail: 4/4 (100.0%) "));
}
