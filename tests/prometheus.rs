//! Metrics through the `metrics` facade, scraped over HTTP from the
//! Prometheus exporter after a run whose numbers are known.
//!
//! Needs the `prometheus` feature: `cargo test --features prometheus --test prometheus`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use bergtalzug::prelude::*;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

mod common;
use common::*;

/// A free port on the loopback interface (bound, read and released).
fn free_local_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// `GET /metrics` over plain HTTP/1.1; retried while the listener starts,
/// for at most 10 s.
fn scrape(addr: SocketAddr) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(
                stream,
                "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            )?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })();
        match attempt {
            Ok(response) if response.starts_with("HTTP/1.1 200") => return response,
            other if Instant::now() > deadline => panic!("no metrics at {addr}: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The value of the sample `name` whose labels include every one of `labels`.
fn value(body: &str, name: &str, labels: &[&str]) -> f64 {
    let found: Vec<f64> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?} in\n{body}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrape_matches_a_known_run() {
    let addr = free_local_addr();
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[0.001, 0.002, 0.005, 0.01, 0.1, 1.0],
        )
        .unwrap()
        .install()
        .unwrap();

    // 200 items through a (2 ms each) and b, which rejects 7, 57, 107, 157
    // on both of their attempts.
    let pipeline = Pipeline::builder(config(
        "scrape",
        vec![
            StageConfig::new("a", ExecutionType::Async)
                .workers(4)
                .queue_size(20),
            StageConfig::new("b", ExecutionType::Thread)
                .workers(2)
                .queue_size(20)
                .retry(RetryPolicy::fixed(2, Duration::from_millis(1))),
        ],
    ))
    .unwrap()
    .source(sources::iter(0..200u64))
    .async_stage("a", |i: WorkItem<u64>| async move {
        tokio::time::sleep(Duration::from_millis(2)).await;
        Ok(i)
    })
    .retrying_sync_stage("b", |i: WorkItem<u64>| {
        anyhow::ensure!(i.data % 50 != 7, "rejected");
        Ok(i)
    })
    .build()
    .unwrap();
    let results = within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 200);

    let body = tokio::task::spawn_blocking(move || scrape(addr))
        .await
        .unwrap();
    let p = r#"pipeline="scrape""#;
    let (a, b) = (r#"stage="a""#, r#"stage="b""#);
    assert_eq!(value(&body, "bergtalzug_items_admitted_total", &[p]), 200.0);
    assert_eq!(value(&body, "bergtalzug_items_finished_total", &[p]), 200.0);
    assert_eq!(value(&body, "bergtalzug_items_failed_total", &[p]), 4.0);
    assert_eq!(value(&body, "bergtalzug_items_cancelled_total", &[p]), 0.0);
    assert_eq!(value(&body, "bergtalzug_source_errors_total", &[p]), 0.0);
    assert_eq!(value(&body, "bergtalzug_items_active", &[p]), 0.0);
    for (stage, completed, failed, retried) in [(a, 200.0, 0.0, 0.0), (b, 196.0, 4.0, 4.0)] {
        let labels = [p, stage];
        assert_eq!(
            value(&body, "bergtalzug_stage_items_admitted_total", &labels),
            200.0
        );
        assert_eq!(
            value(&body, "bergtalzug_stage_items_completed_total", &labels),
            completed
        );
        assert_eq!(
            value(&body, "bergtalzug_stage_items_failed_total", &labels),
            failed
        );
        assert_eq!(
            value(&body, "bergtalzug_stage_items_retried_total", &labels),
            retried
        );
        assert_eq!(
            value(&body, "bergtalzug_stage_items_stalled_total", &labels),
            0.0
        );
        for gauge in [
            "bergtalzug_stage_queue_depth",
            "bergtalzug_stage_in_flight",
            "bergtalzug_stage_waiting_downstream",
            "bergtalzug_stage_workers",
            "bergtalzug_stage_stuck_threads",
        ] {
            assert_eq!(value(&body, gauge, &labels), 0.0, "{gauge} {stage}");
        }
        // Every item was timed in every stage it entered, failures included.
        for histogram in [
            "bergtalzug_stage_service_seconds_count",
            "bergtalzug_stage_queue_wait_seconds_count",
        ] {
            assert_eq!(
                value(&body, histogram, &labels),
                200.0,
                "{histogram} {stage}"
            );
        }
    }
    // Stage a sleeps 2 ms per item: 200 items take at least 0.4 s in all,
    // and none is done within 1 ms.
    let service_a = value(&body, "bergtalzug_stage_service_seconds_sum", &[p, a]);
    assert!(
        service_a >= 0.4,
        "stage a's service time sums to {service_a} s"
    );
    let fast = value(
        &body,
        "bergtalzug_stage_service_seconds_bucket",
        &[p, a, r#"le="0.001""#],
    );
    assert_eq!(fast, 0.0);
    assert_eq!(
        value(&body, "bergtalzug_item_latency_seconds_count", &[p]),
        200.0
    );
    assert!(value(&body, "bergtalzug_item_latency_seconds_sum", &[p]) >= 0.4);
}
