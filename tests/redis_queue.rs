//! The work queue on Redis Streams (feature `redis`), in one process: what
//! a consumer group records of a run. The multi-process tests (SIGKILL,
//! SIGSTOP, poison, a Redis restart) are in `redis_scale.rs`.
//!
//! Needs a server: `BERGTALZUG_REDIS_URL=redis://127.0.0.1:PORT/0`. Without
//! it every test prints why and passes, unless `BERGTALZUG_REQUIRE_REDIS=1`
//! (CI), when it fails.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bergtalzug::prelude::*;
use bergtalzug::queue::{QueueOptions, WorkQueue};

mod common;
use common::*;

/// The server's URL, or `None` (with a line saying so) to skip.
fn server() -> Option<String> {
    match std::env::var("BERGTALZUG_REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("BERGTALZUG_REQUIRE_REDIS").as_deref() != Ok("1"),
                "BERGTALZUG_REQUIRE_REDIS=1 but BERGTALZUG_REDIS_URL is not set"
            );
            eprintln!("skipped: no Redis (set BERGTALZUG_REDIS_URL=redis://HOST:PORT/0)");
            None
        }
    }
}

/// A queue URL on a stream of its own.
fn stream_url(server: &str, name: &str) -> String {
    let stream = format!("test-{name}-{}", uuid::Uuid::new_v4().simple());
    let sep = if server.contains('?') { '&' } else { '?' };
    format!("{server}{sep}stream={stream}")
}

fn quick(options: QueueOptions) -> QueueOptions {
    options
        .claim_idle(Duration::from_millis(1500))
        .claim_every(Duration::from_millis(200))
        .renew_every(Duration::from_millis(400))
        .read_block(Duration::from_millis(200))
}

fn one_stage(name: &str) -> PipelineConfig {
    config(
        name,
        vec![
            StageConfig::new("work", ExecutionType::Async)
                .workers(4)
                .queue_size(8),
        ],
    )
    .queue_refresh_rate(Duration::from_millis(20))
    .retain_results(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueuing_a_job_again_adds_only_the_new_job_ids() {
    let Some(server) = server() else { return };
    let queue = WorkQueue::open(&stream_url(&server, "enqueue"), QueueOptions::default()).unwrap();
    let first = queue.enqueue((0..10u64).map(|n| (format!("n{n}"), n)));
    assert_eq!(first.await.unwrap(), 10);
    let again = queue.enqueue((5..15u64).map(|n| (format!("n{n}"), n)));
    assert_eq!(again.await.unwrap(), 5);
    let dir = tempfile::tempdir().unwrap();
    let lines = dir.path().join("input.txt");
    std::fs::write(&lines, "alpha\nbeta\n").unwrap();
    assert_eq!(queue.enqueue_lines(&lines).await.unwrap(), 2);
    assert_eq!(queue.enqueue_lines(&lines).await.unwrap(), 0);
    let counts = queue.counts().await.unwrap();
    assert_eq!((counts.pending, counts.leased, counts.done), (17, 0, 0));
}

/// Successes are acknowledged, final failures are in the dead-letter
/// stream with their stage, kind, error, attempts and delivery count, a
/// sealed batch job ends by itself, and nothing stays pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_job_ends_with_successes_done_and_failures_dead_lettered() {
    let Some(server) = server() else { return };
    let queue = WorkQueue::open(
        &stream_url(&server, "done-dead"),
        quick(QueueOptions::default()),
    )
    .unwrap();
    queue
        .enqueue((0..200u64).map(|n| (format!("n{n}"), n)))
        .await
        .unwrap();
    queue.seal().await.unwrap();
    let pipeline = Pipeline::builder(one_stage("done-and-dead"))
        .unwrap()
        .source(queue.source::<u64>().unwrap())
        .async_stage("work", |i: WorkItem<u64>| async move {
            if i.data % 10 == 3 {
                anyhow::bail!("{} ends in 3", i.data);
            }
            Ok(i)
        })
        .build()
        .unwrap();
    within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    let counts = queue.counts().await.unwrap();
    assert_eq!(
        (counts.done, counts.dead, counts.leased, counts.pending),
        (180, 20, 0, 0)
    );
    let dead = queue.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 20);
    assert!(
        dead.iter().all(|d| d.stage == "work"
            && d.kind == "failed"
            && d.error.ends_with("ends in 3")
            && d.attempts == 1
            && d.deliveries == 1
            && d.payload.parse::<u64>().unwrap() % 10 == 3),
        "{:?}",
        dead.first()
    );
    let stats = queue.broker_stats().unwrap();
    assert_eq!(stats.dead_lettered, 20);
    assert!(stats.ack_batches >= 1 && stats.ack_errors == 0, "{stats:?}");
}

/// A batch consumer started before the producer sealed the job waits for
/// the seal (and for new entries) rather than ending on an empty stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_consumer_waits_for_the_seal() {
    let Some(server) = server() else { return };
    let queue =
        WorkQueue::open(&stream_url(&server, "seal"), quick(QueueOptions::default())).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let pipeline = Pipeline::builder(one_stage("seal"))
        .unwrap()
        .source(queue.source::<u64>().unwrap())
        .async_stage("work", move |i: WorkItem<u64>| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push(i.data);
                Ok(i)
            }
        })
        .build()
        .unwrap();
    pipeline.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    queue.enqueue([("a", 1u64), ("b", 2)]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(seen.lock().unwrap().len(), 2, "new entries are read");
    queue.enqueue([("c", 3u64)]).await.unwrap();
    queue.seal().await.unwrap();
    within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap();
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_unstable();
    assert_eq!(seen, vec![1, 2, 3]);
}

/// The first stage's demand bounds every read: the consumer group never
/// hands this consumer more entries than the pipeline has room for (what
/// it holds is at most the window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_never_holds_more_than_the_pipeline_has_room_for() {
    let Some(server) = server() else { return };
    let url = stream_url(&server, "bounded");
    let queue = WorkQueue::open(&url, quick(QueueOptions::default())).unwrap();
    queue
        .enqueue((0..300u64).map(|n| (format!("n{n}"), n)))
        .await
        .unwrap();
    queue.seal().await.unwrap();
    let (gate_tx, gate_rx) = async_channel::bounded::<()>(1);
    let pipeline = Pipeline::builder(one_stage("bounded"))
        .unwrap()
        .source(queue.source::<u64>().unwrap())
        .async_stage("work", move |i: WorkItem<u64>| {
            let gate = gate_rx.clone();
            async move {
                let _ = gate.recv().await;
                Ok(i)
            }
        })
        .build()
        .unwrap();
    pipeline.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let counts = queue.counts().await.unwrap();
    // The window of one stage: queue_size + workers.
    assert!(
        counts.leased > 0 && counts.leased <= 12,
        "held {} with a window of 12",
        counts.leased
    );
    gate_tx.close();
    within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    assert_eq!(queue.counts().await.unwrap().done, 300);
}

/// A following (service-mode) consumer goes on when the stream is empty
/// and takes what is enqueued later; `stop()` ends it with nothing held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_following_consumer_waits_for_new_entries_until_stopped() {
    let Some(server) = server() else { return };
    let queue = WorkQueue::open(
        &stream_url(&server, "follow"),
        quick(QueueOptions::default().follow(true)),
    )
    .unwrap();
    let pipeline = Pipeline::builder(one_stage("follow"))
        .unwrap()
        .source(queue.source::<u64>().unwrap())
        .async_stage("work", |i: WorkItem<u64>| async move { Ok(i) })
        .build()
        .unwrap();
    pipeline.start().await.unwrap();
    for round in 0..3u64 {
        queue
            .enqueue((0..20u64).map(|n| (format!("r{round}-{n}"), n)))
            .await
            .unwrap();
        within(Duration::from_secs(10), async {
            while queue.counts().await.unwrap().done < 20 * (round + 1) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
    within(Duration::from_secs(10), pipeline.stop())
        .await
        .unwrap();
    let _ = within(Duration::from_secs(10), pipeline.run()).await;
    let counts = queue.counts().await.unwrap();
    assert_eq!((counts.done, counts.leased, counts.pending), (60, 0, 0));
}

/// Acknowledgements never wait behind a blocked read: with a read blocking
/// for 10 s on an empty stream, finished items are acknowledged at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_are_written_while_a_read_blocks() {
    let Some(server) = server() else { return };
    let queue = WorkQueue::open(
        &stream_url(&server, "ack-behind-read"),
        QueueOptions::default()
            .follow(true)
            .read_block(Duration::from_secs(10)),
    )
    .unwrap();
    queue
        .enqueue((0..5u64).map(|n| (format!("n{n}"), n)))
        .await
        .unwrap();
    let pipeline = Pipeline::builder(one_stage("ack-behind-read"))
        .unwrap()
        .source(queue.source::<u64>().unwrap())
        .async_stage("work", |i: WorkItem<u64>| async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(i)
        })
        .build()
        .unwrap();
    pipeline.start().await.unwrap();
    let started = std::time::Instant::now();
    within(Duration::from_secs(3), async {
        while queue.counts().await.unwrap().done < 5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(3));
    within(Duration::from_secs(15), pipeline.abort())
        .await
        .unwrap();
    let _ = within(Duration::from_secs(15), pipeline.run()).await;
}

/// An aborted consumer releases what it was holding: a second consumer
/// takes it over at its next claim scan (well before `claim_idle`), the
/// job completes, every item done once in the queue's count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_consumer_releases_its_entries_to_a_peer_at_once() {
    let Some(server) = server() else { return };
    let url = stream_url(&server, "abort");
    // A claim_idle far above the test's time: only a release can explain
    // the takeover.
    let options = QueueOptions::default()
        .claim_idle(Duration::from_secs(60))
        .claim_every(Duration::from_millis(200))
        .renew_every(Duration::from_secs(5))
        .read_block(Duration::from_millis(200));
    let queue = WorkQueue::open(&url, options.clone().consumer("first")).unwrap();
    queue
        .enqueue((0..100u64).map(|n| (format!("n{n}"), n)))
        .await
        .unwrap();
    queue.seal().await.unwrap();
    let run = |queue: &WorkQueue, delay: u64| {
        Pipeline::builder(one_stage("abort"))
            .unwrap()
            .source(queue.source::<u64>().unwrap())
            .async_stage("work", move |i: WorkItem<u64>| async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                Ok(i)
            })
            .build()
            .unwrap()
    };
    let first = run(&queue, 50);
    first.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    within(Duration::from_secs(10), first.abort())
        .await
        .unwrap();
    let _ = within(Duration::from_secs(10), first.run()).await;
    drop(first);
    let after = queue.counts().await.unwrap();
    assert!(
        after.done < 100,
        "the first run finished the job: make it slower"
    );

    let peer = WorkQueue::open(&url, options.consumer("second")).unwrap();
    let second = run(&peer, 1);
    within(Duration::from_secs(15), second.run()).await.unwrap();
    let counts = queue.counts().await.unwrap();
    assert_eq!(
        (counts.done, counts.leased, counts.pending, counts.dead),
        (100, 0, 0, 0)
    );
    assert!(
        queue.broker_stats().unwrap().released > 0,
        "{:?}",
        queue.broker_stats()
    );
}

/// A consumer started again under its name takes back its own pending
/// entries first (no wait for `claim_idle`), each delivery counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_consumer_takes_back_its_own_entries_first() {
    let Some(server) = server() else { return };
    let url = stream_url(&server, "own");
    let options = QueueOptions::default()
        .claim_idle(Duration::from_secs(60))
        .read_block(Duration::from_millis(100))
        .consumer("host-a");
    let queue = WorkQueue::open(&url, options.clone()).unwrap();
    queue
        .enqueue((0..5u64).map(|n| (format!("n{n}"), n)))
        .await
        .unwrap();
    queue.seal().await.unwrap();
    // A consumer that read and died: the entries are in its pending list.
    let mut redis = redis::Client::open(server.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let stream = url.split("stream=").nth(1).unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("bergtalzug")
        .arg("host-a")
        .arg("COUNT")
        .arg(5)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(queue.counts().await.unwrap().leased, 5);

    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let pipeline = Pipeline::builder(one_stage("own"))
        .unwrap()
        .source(queue.source::<u64>().unwrap())
        .async_stage("work", move |i: WorkItem<u64>| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push(i.data);
                Ok(i)
            }
        })
        .build()
        .unwrap();
    within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap();
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_unstable();
    assert_eq!(seen, vec![0, 1, 2, 3, 4]);
    let stats = queue.broker_stats().unwrap();
    assert_eq!(stats.redelivered, 5, "{stats:?}");
    assert_eq!(queue.counts().await.unwrap().done, 5);
}

/// The result sink keeps each job id's first result and counts the
/// refused writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_result_sink_keeps_the_first_result_of_each_job_id() {
    let Some(server) = server() else { return };
    let queue = WorkQueue::open(&stream_url(&server, "sink"), QueueOptions::default()).unwrap();
    let sink = queue.result_sink("out").unwrap();
    assert!(sink.is_empty().await.unwrap());
    assert!(sink.put("a", &1u64).await.unwrap());
    assert!(!sink.put("a", &2u64).await.unwrap());
    assert!(sink.put("b", &3u64).await.unwrap());
    assert_eq!(sink.get::<u64>("a").await.unwrap(), Some(1));
    assert_eq!(sink.get::<u64>("c").await.unwrap(), None);
    assert_eq!(sink.len().await.unwrap(), 2);
    assert_eq!(sink.duplicates().await.unwrap(), 1);
}

/// Bad URLs and options are refused at open, naming what is wrong.
#[test]
fn a_bad_url_or_option_is_refused_clearly() {
    let err = |url: &str, options: QueueOptions| {
        format!("{:#}", WorkQueue::open(url, options).unwrap_err())
    };
    let e = err("redis://127.0.0.1:1/0", QueueOptions::default());
    assert!(e.contains("stream=NAME"), "{e}");
    let e = err("rediss://127.0.0.1:1/0?stream=s", QueueOptions::default());
    assert!(e.contains("TLS"), "{e}");
    let e = err(
        "redis://127.0.0.1:1/0?stream=s",
        QueueOptions::default()
            .claim_idle(Duration::from_secs(3))
            .renew_every(Duration::from_secs(3)),
    );
    assert!(e.contains("renew_every") && e.contains("claim_idle"), "{e}");
    let e = err(
        "redis://127.0.0.1:1/0?stream=s",
        QueueOptions::default().claim_every(Duration::ZERO),
    );
    assert!(e.contains("claim_every"), "{e}");
    let e = err(
        "redis://127.0.0.1:1/0?stream=s",
        QueueOptions::default().ack_timeout(Duration::ZERO),
    );
    assert!(e.contains("ack_timeout"), "{e}");
    let e = err("kafka://x", QueueOptions::default());
    assert!(
        e.contains("unknown scheme") && e.contains("redis://"),
        "{e}"
    );
}

/// A TCP relay to the server that the test can cut: Redis going away for
/// the consumers connected through it (its connections are dropped, new
/// ones refused), while the server itself stays up for others.
struct Relay {
    url: String,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    async fn start(server: &str) -> Relay {
        let rest = server.strip_prefix("redis://").expect("a redis:// URL");
        let (upstream, db) = rest.split_once('/').unwrap_or((rest, "0"));
        let upstream = upstream.to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}/{db}", listener.local_addr().unwrap());
        let (cut, mut cut_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            loop {
                let mut client = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => return,
                    },
                    // Dropping the listener refuses new connections.
                    _ = cut_rx.changed() => return,
                };
                let upstream = upstream.clone();
                let mut cut_rx = cut_rx.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Relay { url, cut }
    }

    fn cut(&self) {
        let _ = self.cut.send(true);
    }
}

/// A consumer whose Redis goes away for good while it works does not hang:
/// it gives up writing its outcomes after `ack_timeout`, the run ends with
/// the source's failure, and the entries stay pending in Redis, so a peer
/// takes them back after `claim_idle` and the job is finished, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_whose_redis_went_away_ends_and_a_peer_finishes_its_work() {
    let Some(server) = server() else { return };
    let relay = Arc::new(Relay::start(&server).await);
    let stream = format!("test-gone-{}", uuid::Uuid::new_v4().simple());
    let on = |base: &str| format!("{base}?stream={stream}");
    let direct = WorkQueue::open(&on(&server), quick(QueueOptions::default())).unwrap();
    direct
        .enqueue((0..40u64).map(|n| (format!("n{n}"), n)))
        .await
        .unwrap();
    direct.seal().await.unwrap();

    let relayed = WorkQueue::open(
        &on(&relay.url),
        quick(QueueOptions::default()).ack_timeout(Duration::from_millis(800)),
    )
    .unwrap();
    let config = one_stage("redis-gone").max_refill_failures(3);
    let cutter = relay.clone();
    let lonely = Pipeline::builder(config)
        .unwrap()
        .source(relayed.source::<u64>().unwrap())
        .async_stage("work", move |i: WorkItem<u64>| {
            // Redis goes away as soon as the first item runs: none of the
            // outcomes can be written.
            cutter.cut();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(i)
            }
        })
        .build()
        .unwrap();
    let ended = within(Duration::from_secs(30), lonely.run()).await;
    let e = ended.expect_err("the source failed: Redis is gone");
    assert!(matches!(e, PipelineError::SourceFailed { .. }), "{e}");
    let stats = relayed.broker_stats().unwrap();
    assert!(
        stats.acks_abandoned > 0,
        "outcomes given up after ack_timeout: {stats:?}"
    );

    // A peer, on a Redis it can reach, takes the entries back and finishes.
    let ran = Arc::new(Mutex::new(Vec::new()));
    let seen = ran.clone();
    let peer = Pipeline::builder(one_stage("redis-peer"))
        .unwrap()
        .source(direct.source::<u64>().unwrap())
        .async_stage("work", move |i: WorkItem<u64>| {
            seen.lock().unwrap().push(i.data);
            async move { Ok(i) }
        })
        .build()
        .unwrap();
    within(Duration::from_secs(30), peer.run()).await.unwrap();
    let counts = direct.counts().await.unwrap();
    assert_eq!(
        (counts.done, counts.dead, counts.leased, counts.pending),
        (40, 0, 0, 0)
    );
    let mut ran = ran.lock().unwrap().clone();
    ran.sort_unstable();
    ran.dedup();
    assert_eq!(
        ran,
        (0..40).collect::<Vec<_>>(),
        "every item ran on the peer"
    );
}

/// A Redis that cannot be reached makes refills fail (counted, retried by
/// the pipeline's backoff) rather than hang or lose anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_fails_refills_with_a_clear_error() {
    let queue = WorkQueue::open(
        "redis://127.0.0.1:1/0?stream=nowhere",
        QueueOptions::default(),
    )
    .unwrap();
    let e = format!("{:#}", queue.counts().await.unwrap_err());
    assert!(e.contains("cannot connect to Redis"), "{e}");
}

/// With the feature `metrics` the broker's counters reach the `metrics`
/// facade, labelled by stream (run with `--features redis,prometheus`).
#[cfg(feature = "prometheus")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_counters_are_exported_as_metrics() {
    let Some(server) = server() else { return };
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    let url = stream_url(&server, "metrics");
    let queue = WorkQueue::open(&url, quick(QueueOptions::default())).unwrap();
    queue
        .enqueue((0..30u64).map(|n| (format!("n{n}"), n)))
        .await
        .unwrap();
    queue.seal().await.unwrap();
    let pipeline = Pipeline::builder(one_stage("metrics"))
        .unwrap()
        .source(queue.source::<u64>().unwrap())
        .async_stage("work", |i: WorkItem<u64>| async move {
            if i.data < 3 {
                anyhow::bail!("no");
            }
            Ok(i)
        })
        .build()
        .unwrap();
    within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    let stream = url.split("stream=").nth(1).unwrap();
    let text = handle.render();
    let line = format!("bergtalzug_queue_dead_lettered_total{{stream=\"{stream}\"}} 3");
    assert!(text.contains(&line), "{line} not in\n{text}");
    assert!(
        text.contains(&format!(
            "bergtalzug_queue_ack_batches_total{{stream=\"{stream}\"}}"
        )),
        "{text}"
    );
}
