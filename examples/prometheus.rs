//! A pipeline's metrics in Prometheus format, served on localhost.
//!
//! ```text
//! cargo run --release --example prometheus --features prometheus
//! cargo run --release --example prometheus --features prometheus -- 50000 127.0.0.1:9000 60
//! curl -s localhost:9000/metrics | grep bergtalzug_
//! ```
//!
//! Arguments: items (default 20,000), the address to serve on (default
//! `127.0.0.1:9000`), and how many seconds to keep serving after the
//! pipeline has finished (default 30). Metrics are listed in
//! `docs/observability.md`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bergtalzug::prelude::*;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Histogram buckets for the `*_seconds` metrics: 100 µs to 10 s.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

async fn fetch(item: WorkItem<u64>) -> anyhow::Result<WorkItem<u64>> {
    tokio::time::sleep(Duration::from_millis(1 + item.data % 5)).await;
    Ok(item)
}

fn check(item: WorkItem<u64>) -> anyhow::Result<WorkItem<u64>> {
    anyhow::ensure!(item.data % 101 != 7, "item {} is rejected", item.data);
    Ok(item.map(|n| n * 2))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: prometheus [ITEMS] [ADDR] [LINGER_SECONDS]";
    let items: u64 = args
        .next()
        .map_or(Ok(20_000), |a| a.parse())
        .context(usage)?;
    let addr: SocketAddr = args
        .next()
        .map_or(Ok(([127, 0, 0, 1], 9000).into()), |a| a.parse())
        .context(usage)?;
    let linger = Duration::from_secs(args.next().map_or(Ok(30), |a| a.parse()).context(usage)?);

    // Install the recorder (and its HTTP listener) before the pipeline starts.
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)?
        .install()
        .context("cannot start the Prometheus exporter")?;
    println!("serving metrics on http://{addr}/metrics");

    let config = PipelineConfig::new(
        "prometheus_demo",
        vec![
            StageConfig::new("fetch", ExecutionType::Async)
                .workers(16)
                .queue_size(100),
            StageConfig::new("check", ExecutionType::Cpu)
                .workers(2)
                .queue_size(50),
        ],
    )
    .stats_interval(Duration::ZERO)
    .retain_results(false);
    let pipeline = Pipeline::builder(config)?
        .source(sources::iter(0..items))
        .async_stage("fetch", fetch)
        .sync_stage("check", check)
        .build()?;
    pipeline.run().await?;
    println!("{}", pipeline.stats().await?);
    println!("finished; serving the final numbers for {linger:?}");
    tokio::time::sleep(linger).await;
    Ok(())
}
