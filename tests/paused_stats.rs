//! Statistics and stall reports on controlled runs: tokio's time is paused,
//! and item times are stamped by tokio's clock (the `test-clock` feature),
//! so every duration here is exact.
//!
//! `cargo test --features test-clock --test paused_stats`

use std::time::Duration;

use bergtalzug::prelude::*;

mod common;
use common::*;

/// The value HDR reports at quantile `q` lies between the exact order
/// statistic and the next one (2 significant digits: within 1 %).
fn assert_quantile(got: Option<Duration>, sorted: &[Duration], q: f64, what: &str) {
    let got = got.unwrap_or_else(|| panic!("{what}: no value"));
    let rank = ((q * sorted.len() as f64).ceil() as usize).max(1);
    let low = sorted[rank - 1].as_secs_f64() * 0.99;
    let high = sorted[rank.min(sorted.len() - 1)].as_secs_f64() * 1.01;
    let got_s = got.as_secs_f64();
    assert!(
        (low..=high).contains(&got_s),
        "{what} p{}: {got:?}, want {:?}",
        q * 100.0,
        sorted[rank - 1]
    );
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[tokio::test(start_paused = true)]
async fn percentiles_utilisation_and_bottleneck_of_a_controlled_run() {
    // Stage a: one worker; item n takes n + 1 ms, in order, so item k waits
    // k(k+1)/2 ms in the queue. Stage b: four workers, 1 ms per item, never
    // a wait. Everything is admitted at t = 0.
    let pipeline = Pipeline::builder(config(
        "controlled",
        vec![
            StageConfig::new("a", ExecutionType::Async)
                .workers(1)
                .queue_size(100),
            StageConfig::new("b", ExecutionType::Async)
                .workers(4)
                .queue_size(100),
        ],
    ))
    .unwrap()
    .source(sources::iter(0..100u64))
    .async_stage("a", |i: WorkItem<u64>| async move {
        tokio::time::sleep(ms(i.data + 1)).await;
        Ok(i)
    })
    .async_stage("b", |i: WorkItem<u64>| async move {
        tokio::time::sleep(ms(1)).await;
        Ok(i)
    })
    .build()
    .unwrap();
    let results = within(Duration::from_secs(60), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 100);
    let stats = pipeline.stats().await.unwrap();

    let service: Vec<Duration> = (1..=100).map(ms).collect();
    let waits: Vec<Duration> = (0..100u64).map(|k| ms(k * (k + 1) / 2)).collect();
    let totals: Vec<Duration> = (0..100u64).map(|k| ms((k + 1) * (k + 2) / 2 + 1)).collect();
    let a = stats.stage("a").unwrap();
    let b = stats.stage("b").unwrap();
    for (q, got_service, got_wait, got_total) in [
        (0.5, a.p50_duration, a.p50_queue_wait, stats.p50_duration),
        (0.9, a.p90_duration, a.p90_queue_wait, stats.p90_duration),
        (0.99, a.p99_duration, a.p99_queue_wait, stats.p99_duration),
    ] {
        assert_quantile(got_service, &service, q, "a service");
        assert_quantile(got_wait, &waits, q, "a queue wait");
        assert_quantile(got_total, &totals, q, "end to end");
    }
    for got in [b.p50_duration, b.p90_duration, b.p99_duration] {
        assert_quantile(got, &[ms(1)], 0.5, "b service");
    }
    assert!(b.p99_queue_wait.unwrap() < ms(1), "{:?}", b.p99_queue_wait);
    assert_eq!(a.average_duration, Some(Duration::from_micros(50_500)));

    // 5,051 ms in all: a was busy for 5,050 of them, b's four workers for
    // 100 ms between them.
    assert_eq!(stats.elapsed, ms(5_051));
    assert!(a.utilisation > 0.99, "a: {}", a.utilisation);
    assert!(b.utilisation < 0.01, "b: {}", b.utilisation);
    assert_eq!(stats.bottleneck.as_deref(), Some("a"));
    // The whole run fits in the recent window: both rates are 100 / 5.051 s.
    let rate = 100.0 / 5.051;
    assert!((stats.recent_items_per_second - rate).abs() < 0.01 * rate);
    assert!((stats.items_per_second - rate).abs() < 0.01 * rate);
    assert!((a.items_per_second - rate).abs() < 0.01 * rate);
}

#[tokio::test(start_paused = true)]
async fn recent_throughput_follows_the_last_ten_seconds() {
    // One worker: 50 items of 10 ms (0.5 s), then 50 items of 400 ms (20 s).
    // Over the last 10 s: 2.5 items/s; since the start: 100 / 20.5 s.
    let pipeline = Pipeline::builder(config(
        "window",
        vec![StageConfig::new("s", ExecutionType::Async).workers(1)],
    ))
    .unwrap()
    .source(sources::iter(0..100u64))
    .async_stage("s", |i: WorkItem<u64>| async move {
        tokio::time::sleep(if i.data < 50 { ms(10) } else { ms(400) }).await;
        Ok(i)
    })
    .build()
    .unwrap();
    within(Duration::from_secs(60), pipeline.run())
        .await
        .unwrap();
    let stats = pipeline.stats().await.unwrap();
    assert_eq!(stats.elapsed, ms(20_500));
    assert!(
        (2.2..=2.8).contains(&stats.recent_items_per_second),
        "recent {}",
        stats.recent_items_per_second
    );
    assert!((stats.items_per_second - 100.0 / 20.5).abs() < 0.05);
    let s = stats.stage("s").unwrap();
    assert!(
        (2.2..=2.8).contains(&s.items_per_second),
        "{}",
        s.items_per_second
    );
    assert!(s.utilisation > 0.9, "{}", s.utilisation);
}

#[tokio::test(start_paused = true)]
async fn an_item_held_past_the_threshold_is_reported_once_with_its_age() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    // The stall check runs every 250 ms (a quarter of the threshold): the
    // stuck item is seen at 1.00 s or within 250 ms after.
    let items = (0..10u64).map(|n| {
        let id = if n == 4 {
            "stuck".to_string()
        } else {
            format!("item-{n}")
        };
        WorkItem::with_job_id(id, n)
    });
    let pipeline = Pipeline::builder(
        config(
            "stalls",
            vec![StageConfig::new("slow", ExecutionType::Async).workers(2)],
        )
        .stall_threshold(Duration::from_secs(1)),
    )
    .unwrap()
    .source(sources::items(items))
    .async_stage("slow", |i: WorkItem<u64>| async move {
        let took = if i.data == 4 { ms(5_000) } else { ms(100) };
        tokio::time::sleep(took).await;
        Ok(i)
    })
    .build()
    .unwrap();
    let mut events = pipeline.subscribe_filtered(EventFilter::failures());
    within(Duration::from_secs(60), pipeline.run())
        .await
        .unwrap();

    let mut stalls = Vec::new();
    while let Some(event) = events.recv().await {
        if let PipelineEvent::ItemStalled {
            job_id,
            stage,
            worker,
            age,
        } = event
        {
            stalls.push((job_id, stage, worker, age));
        }
    }
    assert_eq!(stalls.len(), 1, "{stalls:?}");
    let (job_id, stage, worker, age) = &stalls[0];
    assert_eq!(job_id, &JobId::from("stuck"));
    assert_eq!(&**stage, "slow");
    assert!(
        *age >= Duration::from_secs(1) && *age <= ms(1_250),
        "{age:?}"
    );

    let stats = pipeline.stats().await.unwrap();
    assert_eq!(stats.stalled_items, 1);
    assert_eq!(stats.stage("slow").unwrap().stalled, 1);

    let logs = captured.text();
    let warnings: Vec<&str> = logs.lines().filter(|l| l.contains("stalled")).collect();
    assert_eq!(warnings.len(), 1, "{logs}");
    let warning = warnings[0];
    assert!(warning.contains("WARN"), "{warning}");
    for field in [
        "pipeline=stalls",
        "stage=slow",
        &format!("worker={worker}"),
        "job_id=stuck",
        &format!("age_ms={}", age.as_millis()),
    ] {
        assert!(warning.contains(field), "{field} missing: {warning}");
    }
}
