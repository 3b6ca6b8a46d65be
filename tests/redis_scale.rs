//! Many consumer processes share one job on Redis Streams (feature
//! `redis`): real child processes (this test binary started again with
//! `--consume`), SIGKILLed, SIGSTOPped, poisoned, stopped, and the Redis
//! server itself killed and started again from its append-only file.
//!
//! `harness = false`: `main` is the child's entry as well as the runner.
//! Needs `BERGTALZUG_REDIS_URL` (skips with a message without it, fails
//! without it when `BERGTALZUG_REQUIRE_REDIS=1`); the Redis-restart
//! scenario starts a `redis-server` of its own.
//!
//! Scaled to a few minutes on a shared 2-core machine: the kill scenario
//! has the 30,000 items and four consumers; the others fewer items
//! (stated in each); `claim_idle` is 2 s rather than the default 30 s.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bergtalzug::prelude::*;
use bergtalzug::queue::{QueueCounts, QueueOptions, WorkQueue};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const GROUP: &str = "bergtalzug";

/// A consumer's settings, passed to the child as `key=value` arguments.
#[derive(Clone, Debug)]
struct Spec {
    claim_idle_ms: u64,
    claim_every_ms: u64,
    /// 0: renewal off.
    renew_every_ms: u64,
    workers: usize,
    queue: usize,
    /// Items whose number is a multiple of this plus 7 always fail.
    failing_every: u64,
    /// The item that aborts the process (u64::MAX: none).
    abort_on: u64,
    /// (item, ms): one item that takes long.
    slow: (u64, u64),
    /// A fixed handler time in ms (0: 2-5 ms by item number).
    work_ms: u64,
    /// On SIGTERM: `stop_within` this many ms (0: no handler).
    stop_within_ms: u64,
    /// Deliveries before an entry is dead-lettered.
    max_deliveries: u32,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            claim_idle_ms: 2000,
            claim_every_ms: 500,
            renew_every_ms: 600,
            workers: 8,
            queue: 16,
            failing_every: 0,
            abort_on: u64::MAX,
            slow: (u64::MAX, 0),
            work_ms: 0,
            stop_within_ms: 0,
            max_deliveries: 3,
        }
    }
}

impl Spec {
    fn args(&self) -> Vec<String> {
        vec![
            format!("claim_idle_ms={}", self.claim_idle_ms),
            format!("claim_every_ms={}", self.claim_every_ms),
            format!("renew_every_ms={}", self.renew_every_ms),
            format!("workers={}", self.workers),
            format!("queue={}", self.queue),
            format!("failing_every={}", self.failing_every),
            format!("abort_on={}", self.abort_on),
            format!("slow_item={}", self.slow.0),
            format!("slow_ms={}", self.slow.1),
            format!("work_ms={}", self.work_ms),
            format!("stop_within_ms={}", self.stop_within_ms),
            format!("max_deliveries={}", self.max_deliveries),
        ]
    }

    fn parse(args: &[String]) -> Spec {
        let kv: HashMap<&str, u64> = args
            .iter()
            .filter_map(|a| a.split_once('='))
            .map(|(k, v)| (k, v.parse().unwrap()))
            .collect();
        Spec {
            claim_idle_ms: kv["claim_idle_ms"],
            claim_every_ms: kv["claim_every_ms"],
            renew_every_ms: kv["renew_every_ms"],
            workers: kv["workers"] as usize,
            queue: kv["queue"] as usize,
            failing_every: kv["failing_every"],
            abort_on: kv["abort_on"],
            slow: (kv["slow_item"], kv["slow_ms"]),
            work_ms: kv["work_ms"],
            stop_within_ms: kv["stop_within_ms"],
            max_deliveries: kv["max_deliveries"] as u32,
        }
    }

    fn fails(&self, n: u64) -> bool {
        self.failing_every > 0 && n % self.failing_every == 7
    }
}

fn options(spec: &Spec) -> QueueOptions {
    QueueOptions::default()
        .max_deliveries(spec.max_deliveries)
        .claim_idle(Duration::from_millis(spec.claim_idle_ms))
        .claim_every(Duration::from_millis(spec.claim_every_ms))
        .renew_every(Duration::from_millis(spec.renew_every_ms))
        .read_block(Duration::from_millis(200))
}

fn append(path: &Path) -> Mutex<std::fs::File> {
    Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap(),
    )
}

/// The child: consumes `url` as consumer `name`, logging each handler
/// call to `DIR/attempts-NAME.log` and each first write of a result to
/// `DIR/writes-NAME.log`.
fn consume(url: &str, name: &str, dir: &Path, spec: Spec) {
    let attempts = Arc::new(append(&dir.join(format!("attempts-{name}.log"))));
    let writes = Arc::new(append(&dir.join(format!("writes-{name}.log"))));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ok = runtime.block_on(async {
        let queue = WorkQueue::open(url, options(&spec).consumer(name)).unwrap();
        let sink = queue.result_sink("out").unwrap();
        let config = PipelineConfig::new(
            "redis-scale",
            vec![
                StageConfig::new("work", ExecutionType::Async)
                    .queue_size(spec.queue)
                    .workers(spec.workers),
                StageConfig::new("store", ExecutionType::Async)
                    .queue_size(8)
                    .workers(4),
            ],
        )
        .stats_interval(Duration::ZERO)
        .queue_refresh_rate(Duration::from_millis(50))
        // A broker outage is waited out, not given up on.
        .max_refill_failures(0)
        .retain_results(false);
        let work_spec = spec.clone();
        let pipeline = Pipeline::builder(config)
            .unwrap()
            .source(queue.source::<u64>().unwrap())
            .async_stage("work", move |item: WorkItem<u64>| {
                let attempts = attempts.clone();
                let spec = work_spec.clone();
                async move {
                    writeln!(attempts.lock().unwrap(), "{}", item.job_id()).unwrap();
                    if item.data == spec.abort_on {
                        std::process::abort();
                    }
                    let ms = if item.data == spec.slow.0 {
                        spec.slow.1
                    } else if spec.work_ms > 0 {
                        spec.work_ms
                    } else {
                        2 + item.data % 4
                    };
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    if spec.fails(item.data) {
                        anyhow::bail!("{} is meant to fail", item.data);
                    }
                    Ok(item)
                }
            })
            .async_stage("store", move |item: WorkItem<u64>| {
                let sink = sink.clone();
                let writes = writes.clone();
                async move {
                    // Idempotent, so retried through a broker outage.
                    let job = item.job_id().to_string();
                    let mut backoff = Duration::from_millis(50);
                    let first = loop {
                        match sink.put(&job, &item.data).await {
                            Ok(first) => break first,
                            Err(_) if backoff < Duration::from_secs(20) => {
                                tokio::time::sleep(backoff).await;
                                backoff *= 2;
                            }
                            Err(e) => return Err(e),
                        }
                    };
                    if first {
                        writeln!(writes.lock().unwrap(), "{job}").unwrap();
                    }
                    Ok(item)
                }
            })
            .build()
            .unwrap();
        if spec.stop_within_ms > 0 {
            let p = pipeline.clone();
            let within = Duration::from_millis(spec.stop_within_ms);
            tokio::spawn(async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .unwrap();
                term.recv().await;
                let _ = p.stop_within(within).await;
            });
        }
        let result = pipeline.run().await;
        drop(pipeline);
        eprintln!("consumer {name}: {:?}", queue.broker_stats());
        match result {
            Ok(_) => true,
            Err(e) => {
                eprintln!("consumer {name}: {e:#}");
                false
            }
        }
    });
    std::process::exit(if ok { 0 } else { 2 });
}

/// The server's URL, or `None` (with a line saying so) to skip.
fn server() -> Option<String> {
    match std::env::var("BERGTALZUG_REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("BERGTALZUG_REQUIRE_REDIS").as_deref() != Ok("1"),
                "BERGTALZUG_REQUIRE_REDIS=1 but BERGTALZUG_REDIS_URL is not set"
            );
            println!("  skipped: no Redis (set BERGTALZUG_REDIS_URL=redis://HOST:PORT/0)");
            None
        }
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// One job on a stream of its own, its items enqueued and sealed.
struct Job {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    server: String,
    stream: String,
    url: String,
    n: u64,
}

fn job(server: &str, name: &str, n: u64) -> Job {
    let dir = tempfile::tempdir().unwrap();
    let stream = format!("scale-{name}-{}", uuid::Uuid::new_v4().simple());
    let sep = if server.contains('?') { '&' } else { '?' };
    let url = format!("{server}{sep}stream={stream}");
    block_on(async {
        let queue = WorkQueue::open(&url, QueueOptions::default()).unwrap();
        let added = queue
            .enqueue((0..n).map(|i| (format!("item-{i}"), i)))
            .await
            .unwrap();
        assert_eq!(added, n);
        queue.seal().await.unwrap();
    });
    Job {
        dir: dir.path().to_path_buf(),
        _dir: dir,
        server: server.to_string(),
        stream,
        url,
        n,
    }
}

impl Job {
    fn spawn(&self, name: &str, spec: &Spec) -> Child {
        Command::new(std::env::current_exe().unwrap())
            .arg("--consume")
            .arg(&self.url)
            .arg(name)
            .arg(&self.dir)
            .args(spec.args())
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn redis(&self) -> redis::Connection {
        let client = redis::Client::open(self.server.as_str()).unwrap();
        client
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap()
    }

    /// How many entries each consumer holds.
    fn held(&self) -> BTreeMap<String, u64> {
        let reply: redis::Value = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg(GROUP)
            .query(&mut self.redis())
            .unwrap();
        let mut out = BTreeMap::new();
        if let redis::Value::Array(parts) = reply
            && let Some(redis::Value::Array(consumers)) = parts.get(3)
        {
            for c in consumers {
                let pair: (String, u64) = redis::from_redis_value(c.clone()).unwrap();
                out.insert(pair.0, pair.1);
            }
        }
        out
    }

    fn held_by(&self, consumer: &str) -> u64 {
        self.held().get(consumer).copied().unwrap_or(0)
    }

    fn counts(&self) -> QueueCounts {
        block_on(async {
            WorkQueue::open(&self.url, QueueOptions::default())
                .unwrap()
                .counts()
                .await
                .unwrap()
        })
    }

    fn wait_done(&self, at_least: u64, limit: Duration) {
        let started = Instant::now();
        while self.counts().done < at_least {
            assert!(
                started.elapsed() < limit,
                "not {at_least} done within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn outcome(&self) -> Outcome {
        let (counts, dead, results, dups) = block_on(async {
            let queue = WorkQueue::open(&self.url, QueueOptions::default()).unwrap();
            let sink = queue.result_sink("out").unwrap();
            (
                queue.counts().await.unwrap(),
                queue.dead_letters().await.unwrap(),
                sink.len().await.unwrap(),
                sink.duplicates().await.unwrap(),
            )
        });
        let mut attempts = BTreeMap::new();
        let mut writes = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let into = if name.starts_with("attempts-") {
                &mut attempts
            } else if name.starts_with("writes-") {
                &mut writes
            } else {
                continue;
            };
            for line in std::fs::read_to_string(&path).unwrap().lines() {
                *into.entry(line.to_string()).or_insert(0usize) += 1;
            }
        }
        Outcome {
            counts,
            dead,
            results,
            refused_writes: dups,
            attempts,
            writes,
        }
    }

    fn all_ids(&self) -> BTreeSet<String> {
        (0..self.n).map(|i| format!("item-{i}")).collect()
    }
}

struct Outcome {
    counts: QueueCounts,
    dead: Vec<bergtalzug::queue::DeadItem>,
    /// Results in the sink.
    results: u64,
    /// Writes the sink refused as duplicates.
    refused_writes: u64,
    attempts: BTreeMap<String, usize>,
    /// First writes per job id (more than one would be a double write).
    writes: BTreeMap<String, usize>,
}

impl Outcome {
    fn extra_attempts(&self) -> usize {
        self.attempts.values().map(|n| n - 1).sum()
    }

    fn double_writes(&self) -> usize {
        self.writes.values().filter(|&&n| n > 1).count()
    }

    /// Every item ran; the sink holds `done` results, none written twice;
    /// nothing is left pending or held.
    fn assert_complete(&self, job: &Job, done: u64) {
        let attempted: BTreeSet<String> = self.attempts.keys().cloned().collect();
        assert_eq!(
            attempted,
            job.all_ids(),
            "every item processed at least once"
        );
        assert_eq!(self.results, done, "the sink holds one result per success");
        assert_eq!(self.double_writes(), 0, "a result was written twice");
        assert_eq!(
            (self.counts.done, self.counts.leased, self.counts.pending),
            (done, 0, 0),
            "nothing pending at the end: {:?}",
            self.counts
        );
    }
}

fn wait_for(child: &mut Child, limit: Duration) -> ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("a consumer did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, signal: Signal) {
    kill(Pid::from_raw(child.id() as i32), signal).unwrap();
}

/// Polls until `consumer` holds nothing; how long that took.
fn until_released(job: &Job, consumer: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    while job.held_by(consumer) > 0 {
        assert!(
            started.elapsed() < limit,
            "{consumer}'s entries not re-owned within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed()
}

/// Four consumers share 30,000 items of 2-5 ms; one is SIGKILLed at about
/// a third: its entries are re-owned within claim_idle + claim_every + 1 s,
/// the three survivors finish the job and exit 0 by themselves, every item
/// ran, the sink holds exactly N results with no double write, and the
/// items run twice are more than none and at most what the killed one held.
fn a_killed_consumer_s_entries_are_taken_over_and_the_job_completes() {
    let Some(server) = server() else { return };
    let job = job(&server, "kill", 30_000);
    let spec = Spec::default();
    let mut consumers: Vec<(String, Child)> = (0..4)
        .map(|i| {
            let name = format!("c{i}");
            let child = job.spawn(&name, &spec);
            (name, child)
        })
        .collect();
    job.wait_done(job.n / 3, Duration::from_secs(120));
    let (victim, mut child) = consumers.remove(1);
    signal(&child, Signal::SIGKILL);
    let _ = child.wait();
    let held = job.held_by(&victim);
    let reowned = until_released(&job, &victim, Duration::from_secs(30));
    let bound = Duration::from_millis(spec.claim_idle_ms + spec.claim_every_ms + 1000);
    for (name, child) in &mut consumers {
        let status = wait_for(child, Duration::from_secs(150));
        assert!(status.success(), "survivor {name} ended with {status}");
    }
    let outcome = job.outcome();
    outcome.assert_complete(&job, job.n);
    let extra = outcome.extra_attempts();
    println!(
        "  killed {victim} holding {held}: re-owned in {reowned:.2?} (bound {bound:?}); \
         {extra} items ran twice; the sink refused {} duplicate writes",
        outcome.refused_writes
    );
    assert!(reowned <= bound, "re-owned in {reowned:?}, bound {bound:?}");
    assert!(extra > 0, "the killed consumer was running items");
    assert!(
        extra as u64 <= held,
        "{extra} items ran again; the killed consumer held {held}"
    );
}

/// A consumer SIGSTOPped for 3 x claim_idle and continued: its peers take
/// its entries, and its late acks and writes are harmless (6,000 items,
/// three consumers).
fn a_stopped_and_continued_consumer_s_late_acks_are_harmless() {
    let Some(server) = server() else { return };
    let job = job(&server, "sigstop", 6_000);
    let spec = Spec::default();
    let mut consumers: Vec<(String, Child)> = (0..3)
        .map(|i| {
            let name = format!("c{i}");
            let child = job.spawn(&name, &spec);
            (name, child)
        })
        .collect();
    job.wait_done(job.n / 3, Duration::from_secs(60));
    signal(&consumers[1].1, Signal::SIGSTOP);
    std::thread::sleep(Duration::from_millis(100));
    let held = job.held_by("c1");
    std::thread::sleep(Duration::from_millis(3 * spec.claim_idle_ms));
    let taken = job.held_by("c1");
    signal(&consumers[1].1, Signal::SIGCONT);
    for (name, child) in &mut consumers {
        let status = wait_for(child, Duration::from_secs(90));
        assert!(status.success(), "{name} ended with {status}");
    }
    let outcome = job.outcome();
    outcome.assert_complete(&job, job.n);
    let extra = outcome.extra_attempts();
    println!(
        "  c1 stopped holding {held} ({taken} still its after 3 x claim_idle); \
         {extra} items ran twice; the sink refused {} duplicate writes",
        outcome.refused_writes
    );
    assert_eq!(taken, 0, "the stopped consumer's entries were taken over");
    assert!(extra as u64 <= held, "{extra} ran again, {held} held");
}

/// Items whose handler always fails, and one whose handler aborts the
/// process, each reach the dead-letter stream exactly once; the aborting
/// one after max_deliveries (3) runs, never a fourth; the rest completes
/// (300 items, two consumers started again under their names when they
/// die).
fn poison_items_reach_the_dead_letters_exactly_once() {
    let Some(server) = server() else { return };
    let job = job(&server, "poison", 300);
    let spec = Spec {
        failing_every: 50,
        abort_on: 123,
        workers: 4,
        queue: 8,
        ..Spec::default()
    };
    let names = ["c0", "c1"];
    let mut consumers: Vec<Option<Child>> =
        names.iter().map(|n| Some(job.spawn(n, &spec))).collect();
    let mut crashes = 0;
    let started = Instant::now();
    while consumers.iter().any(Option::is_some) {
        assert!(started.elapsed() < Duration::from_secs(90), "the job hung");
        for (i, slot) in consumers.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            if let Some(status) = child.try_wait().unwrap() {
                if status.success() {
                    *slot = None;
                } else {
                    crashes += 1;
                    assert!(crashes <= 3, "more crashes than max_deliveries");
                    *slot = Some(job.spawn(names[i], &spec));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let outcome = job.outcome();
    let poison = "item-123";
    let failing: BTreeSet<String> = (0..job.n)
        .filter(|&n| spec.fails(n))
        .map(|n| format!("item-{n}"))
        .collect();
    println!(
        "  {crashes} crashes; the poison ran {} times; {} dead letters",
        outcome.attempts[poison],
        outcome.dead.len()
    );
    assert_eq!(
        crashes, 3,
        "each of max_deliveries deliveries killed a consumer"
    );
    assert_eq!(outcome.attempts[poison], 3, "not run a fourth time");
    let mut dead_ids: Vec<&str> = outcome.dead.iter().map(|d| d.job_id.as_str()).collect();
    dead_ids.sort_unstable();
    let mut expected: Vec<&str> = failing.iter().map(String::as_str).chain([poison]).collect();
    expected.sort_unstable();
    assert_eq!(
        dead_ids, expected,
        "each poison item dead-lettered exactly once"
    );
    let poisoned = outcome.dead.iter().find(|d| d.job_id == poison).unwrap();
    assert_eq!(
        (
            poisoned.kind.as_str(),
            poisoned.stage.as_str(),
            poisoned.deliveries
        ),
        ("max deliveries", "queue", 3)
    );
    assert_eq!(poisoned.payload, "123");
    assert!(
        outcome
            .dead
            .iter()
            .filter(|d| d.job_id != poison)
            .all(|d| d.kind == "failed" && d.stage == "work" && d.error.contains("meant to fail")),
        "{:?}",
        outcome.dead
    );
    let done = job.n - expected.len() as u64;
    assert_eq!(outcome.results, done);
    assert_eq!(outcome.double_writes(), 0);
    assert_eq!(
        (
            outcome.counts.done,
            outcome.counts.dead,
            outcome.counts.leased,
            outcome.counts.pending
        ),
        (done, expected.len() as u64, 0, 0)
    );
}

/// How many times the slow item (4 x claim_idle) ran, with a peer ready
/// to take idle entries. Deliveries are not limited here (20): without
/// renewal the item is taken every claim_idle + claim_every while it runs,
/// and with 3 its fourth delivery would dead-letter it before its first
/// run could finish (a race the test is not about).
fn runs_of_a_slow_item(server: &str, renew_every_ms: u64) -> usize {
    let spec = Spec {
        claim_idle_ms: 1000,
        claim_every_ms: 200,
        renew_every_ms,
        slow: (0, 4000),
        workers: 4,
        queue: 4,
        max_deliveries: 20,
        ..Spec::default()
    };
    let job = job(server, "lease", 20);
    let mut first = job.spawn("c0", &spec);
    let started = Instant::now();
    while job.held_by("c0") == 0 {
        assert!(started.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut second = job.spawn("c1", &spec);
    for child in [&mut first, &mut second] {
        let status = wait_for(child, Duration::from_secs(30));
        assert!(status.success(), "{status}");
    }
    let outcome = job.outcome();
    outcome.assert_complete(&job, job.n);
    outcome.attempts["item-0"]
}

/// An item that takes 4 x claim_idle keeps its lease while its consumer
/// lives (it runs once); with lease renewal off a peer takes it and it
/// runs again.
fn a_long_item_keeps_its_lease_and_without_renewal_it_would_run_twice() {
    let Some(server) = server() else { return };
    let renewed = runs_of_a_slow_item(&server, 300);
    let unrenewed = runs_of_a_slow_item(&server, 0);
    println!("  the slow item ran {renewed} time(s) with renewal, {unrenewed} without");
    assert_eq!(renewed, 1, "its lease was renewed");
    assert!(unrenewed >= 2, "without renewal a peer takes it");
}

/// A lone consumer with lease renewal off never claims its own entry: an
/// item that takes 4 x claim_idle runs once and completes, though
/// `max_deliveries` is 3 (claiming its own idle entry every claim_idle
/// would count a delivery each time and dead-letter it while it ran).
fn a_consumer_never_claims_its_own_running_item() {
    let Some(server) = server() else { return };
    let spec = Spec {
        claim_idle_ms: 1000,
        claim_every_ms: 200,
        renew_every_ms: 0,
        slow: (0, 4000),
        workers: 4,
        queue: 4,
        max_deliveries: 3,
        ..Spec::default()
    };
    let job = job(&server, "own", 20);
    let mut only = job.spawn("c0", &spec);
    let status = wait_for(&mut only, Duration::from_secs(30));
    assert!(status.success(), "{status}");
    let outcome = job.outcome();
    outcome.assert_complete(&job, job.n);
    assert_eq!(outcome.attempts["item-0"], 1, "the slow item ran once");
}

/// A consumer stopped gracefully (SIGTERM: `stop_within` 200 ms) releases
/// what it held: its peer owns it within claim_every + 1 s of the stop's
/// deadline, though claim_idle is 30 s (400 items of 100 ms).
fn a_graceful_stop_releases_its_entries_to_a_peer_at_once() {
    let Some(server) = server() else { return };
    let job = job(&server, "graceful", 400);
    let spec = Spec {
        claim_idle_ms: 30_000,
        claim_every_ms: 500,
        renew_every_ms: 5_000,
        work_ms: 100,
        workers: 4,
        queue: 16,
        stop_within_ms: 200,
        ..Spec::default()
    };
    let mut leaving = job.spawn("c0", &spec);
    let mut staying = job.spawn("c1", &spec);
    job.wait_done(40, Duration::from_secs(30));
    let held = job.held_by("c0");
    signal(&leaving, Signal::SIGTERM);
    let stopped = Instant::now();
    let status = wait_for(&mut leaving, Duration::from_secs(10));
    assert!(status.success(), "the stopped consumer ended with {status}");
    let released = until_released(&job, "c0", Duration::from_secs(10));
    let since_stop = stopped.elapsed();
    let bound = Duration::from_millis(spec.stop_within_ms + spec.claim_every_ms + 1000);
    let status = wait_for(&mut staying, Duration::from_secs(60));
    assert!(status.success(), "{status}");
    let outcome = job.outcome();
    outcome.assert_complete(&job, job.n);
    println!(
        "  c0 held {held}; its peer owned them {since_stop:.2?} after SIGTERM \
         ({released:.2?} after it exited; bound {bound:?})"
    );
    assert!(held > 0);
    assert!(since_stop <= bound, "{since_stop:?} > {bound:?}");
}

/// A redis-server of the test's own, with AOF `always`, that can be
/// killed and started again on the same port and directory.
struct OwnServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl OwnServer {
    fn start() -> Option<OwnServer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let child = Self::spawn(port, dir.path())?;
        Some(OwnServer { child, port, dir })
    }

    fn spawn(port: u16, dir: &Path) -> Option<Child> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .spawn()
            .ok()?;
        let url = format!("redis://127.0.0.1:{port}/0");
        let started = Instant::now();
        loop {
            let up = redis::Client::open(url.as_str())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if up.is_ok() {
                return Some(child);
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn kill_and_restart(&mut self) {
        signal(&self.child, Signal::SIGKILL);
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_secs(1));
        self.child = Self::spawn(self.port, self.dir.path()).expect("redis-server again");
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// redis-server SIGKILLed mid-run and started again from its append-only
/// file (`appendfsync always`): the consumers reconnect and finish, and
/// nothing is lost (5,000 items, two consumers).
fn a_redis_server_killed_and_restarted_from_its_aof_loses_nothing() {
    if server().is_none() {
        return;
    }
    let Some(mut own) = OwnServer::start() else {
        assert!(
            std::env::var("BERGTALZUG_REQUIRE_REDIS").as_deref() != Ok("1"),
            "redis-server is not installed"
        );
        println!("  skipped: no redis-server to start");
        return;
    };
    let job = job(&own.url(), "restart", 5_000);
    let spec = Spec::default();
    let mut consumers: Vec<Child> = (0..2).map(|i| job.spawn(&format!("c{i}"), &spec)).collect();
    job.wait_done(job.n / 3, Duration::from_secs(60));
    own.kill_and_restart();
    let after_restart = job.counts();
    for child in &mut consumers {
        let status = wait_for(child, Duration::from_secs(120));
        assert!(status.success(), "a consumer ended with {status}");
    }
    let outcome = job.outcome();
    outcome.assert_complete(&job, job.n);
    println!(
        "  restarted at {} done; {} items ran twice",
        after_restart.done,
        outcome.extra_attempts()
    );
    assert!(
        after_restart.done >= job.n / 3,
        "the AOF kept what was done"
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--consume") {
        let spec = Spec::parse(&args[i + 4..]);
        consume(&args[i + 1], &args[i + 2], Path::new(&args[i + 3]), spec);
        return;
    }
    let tests: [(&str, fn()); 7] = [
        (
            "a_killed_consumer_s_entries_are_taken_over_and_the_job_completes",
            a_killed_consumer_s_entries_are_taken_over_and_the_job_completes,
        ),
        (
            "a_stopped_and_continued_consumer_s_late_acks_are_harmless",
            a_stopped_and_continued_consumer_s_late_acks_are_harmless,
        ),
        (
            "poison_items_reach_the_dead_letters_exactly_once",
            poison_items_reach_the_dead_letters_exactly_once,
        ),
        (
            "a_long_item_keeps_its_lease_and_without_renewal_it_would_run_twice",
            a_long_item_keeps_its_lease_and_without_renewal_it_would_run_twice,
        ),
        (
            "a_consumer_never_claims_its_own_running_item",
            a_consumer_never_claims_its_own_running_item,
        ),
        (
            "a_graceful_stop_releases_its_entries_to_a_peer_at_once",
            a_graceful_stop_releases_its_entries_to_a_peer_at_once,
        ),
        (
            "a_redis_server_killed_and_restarted_from_its_aof_loses_nothing",
            a_redis_server_killed_and_restarted_from_its_aof_loses_nothing,
        ),
    ];
    common::run_tests(&tests);
}
