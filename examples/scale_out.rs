//! One job, many machines: a producer enqueues a job into a Redis stream
//! and seals it; any number of consumers, on any hosts, share it through
//! the stream's consumer group, each result written once by job id.
//!
//! ```sh
//! redis-server --appendonly yes --appendfsync always &    # or your own Redis 7
//! export URL='redis://127.0.0.1:6379/0?stream=scale-demo'
//! cargo run --example scale_out --features redis -- produce "$URL" 20000
//! cargo run --example scale_out --features redis -- consume "$URL" host-a &  # on each host,
//! cargo run --example scale_out --features redis -- consume "$URL" host-b &  # its own name
//! cargo run --example scale_out --features redis -- status "$URL"
//! ```
//!
//! Kill a consumer (`kill -9`) midway: its entries go idle and a peer takes
//! them over after `claim_idle` (10 s here); started again under its name it
//! takes back its own first. Ctrl-C stops one gracefully: what it held is
//! released at once. Each consumer ends by itself once the job is sealed,
//! nothing is undelivered and no consumer holds anything. See
//! docs/scale-out.md.

use std::time::{Duration, Instant};

use bergtalzug::prelude::*;
use bergtalzug::queue::{QueueOptions, WorkQueue};

fn options() -> QueueOptions {
    QueueOptions::default()
        .claim_idle(Duration::from_secs(10))
        .claim_every(Duration::from_secs(2))
        // A third of claim_idle: two renewals may be late before a peer
        // would take live work.
        .renew_every(Duration::from_secs(3))
}

async fn produce(url: &str, items: u64) -> anyhow::Result<()> {
    let queue = WorkQueue::open(url, options())?;
    let added = queue
        .enqueue((0..items).map(|n| (format!("page-{n:06}"), n)))
        .await?;
    queue.seal().await?;
    println!("{added} new items (of {items}) in {url}; sealed");
    Ok(())
}

async fn consume(url: &str, name: &str) -> anyhow::Result<()> {
    let queue = WorkQueue::open(url, options().consumer(name))?;
    let sink = queue.result_sink("checksums")?;
    let config = PipelineConfig::new(
        "scale-out",
        vec![
            StageConfig::new("fetch", ExecutionType::Async)
                .workers(20)
                .queue_size(40),
            StageConfig::new("store", ExecutionType::Async)
                .workers(4)
                .queue_size(16),
        ],
    )
    // A broker outage (a Redis restart) is waited out, not given up on.
    .max_refill_failures(0)
    .retain_results(false);
    let pipeline = Pipeline::builder(config)?
        .source(queue.source::<u64>()?)
        .async_stage("fetch", |item: WorkItem<u64>| async move {
            // An I/O-bound step: a 10 ms wait, as for an HTTP request.
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok(item.map(|n| n.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
        })
        .async_stage("store", move |item: WorkItem<u64>| {
            let sink = sink.clone();
            async move {
                // Keyed by job id: a redelivered item's second write is refused.
                sink.put(&item.job_id().to_string(), &item.data).await?;
                Ok(item)
            }
        })
        .build()?;
    pipeline.stop_on_ctrl_c();
    let started = Instant::now();
    pipeline.run().await?;
    let stats = queue.broker_stats().unwrap_or_default();
    println!(
        "{name}: done in {:.1?}; claimed {}, redelivered {}, dead-lettered {}, \
         {} lease renewals, {} ack batches ({} failed and retried)",
        started.elapsed(),
        stats.claimed,
        stats.redelivered,
        stats.dead_lettered,
        stats.lease_renewals,
        stats.ack_batches,
        stats.ack_errors
    );
    Ok(())
}

async fn status(url: &str) -> anyhow::Result<()> {
    let queue = WorkQueue::open(url, options())?;
    let counts = queue.counts().await?;
    let sink = queue.result_sink("checksums")?;
    println!(
        "{url}: {} undelivered, {} held by consumers, {} done, {} dead; \
         {} results, {} duplicate writes refused",
        counts.pending,
        counts.leased,
        counts.done,
        counts.dead,
        sink.len().await?,
        sink.duplicates().await?
    );
    for dead in queue.dead_letters().await? {
        println!(
            "  dead: {} in {} ({}): {}",
            dead.job_id, dead.stage, dead.kind, dead.error
        );
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: scale_out produce URL [N] | consume URL NAME | status URL";
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["produce", url] => produce(url, 20_000).await,
        ["produce", url, n] => produce(url, n.parse()?).await,
        ["consume", url, name] => consume(url, name).await,
        ["status", url] => status(url).await,
        _ => anyhow::bail!("{usage}"),
    }
}
