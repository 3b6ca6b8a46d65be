//! A job in a durable queue survives its consumer being killed: real child
//! processes (this test binary started again with `--consume`), SIGKILLed
//! at random moments and started again until the job is done.
//!
//! `harness = false`: `main` is the child's entry as well as the runner.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use bergtalzug::prelude::*;
use bergtalzug::queue::{QueueOptions, WorkQueue};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The consumer's stages: (queue_size, workers) each.
const WORK: (usize, usize) = (8, 4);
const STORE: (usize, usize) = (4, 1);
/// The pipeline's in-flight window, Σ(queue_size + workers): the most a
/// crash can make run again.
const WINDOW: usize = WORK.0 + WORK.1 + STORE.0 + STORE.1;

/// Items whose number is a multiple of this fail for good.
const FAILING: u64 = 17;

fn failing(n: u64) -> bool {
    n.is_multiple_of(FAILING)
}

/// Where a consumer writes: its results (keyed by job id) and a log of
/// every attempt (one line per handler call, appended).
struct Sink {
    results: Mutex<rusqlite::Connection>,
    attempts: Mutex<std::fs::File>,
}

static SINK: OnceLock<Sink> = OnceLock::new();

fn sink() -> &'static Sink {
    SINK.get().expect("the sink is opened first")
}

fn open_results(path: &Path) -> rusqlite::Connection {
    let db = rusqlite::Connection::open(path).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    db.pragma_update(None, "journal_mode", "WAL").unwrap();
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS results (job_id TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    )
    .unwrap();
    db
}

/// The child: consumes the queue at `db` into the sink in `dir`; the item
/// numbered `poison` (if any) aborts the process.
fn consume(db: &str, dir: &Path, poison: Option<u64>) {
    let _ = SINK.set(Sink {
        results: Mutex::new(open_results(&dir.join("results.db"))),
        attempts: Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("attempts.log"))
                .unwrap(),
        ),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let queue = WorkQueue::open(db, QueueOptions::default().max_deliveries(3)).unwrap();
        let config = PipelineConfig::new(
            "durable-crash",
            vec![
                StageConfig::new("work", ExecutionType::Async)
                    .queue_size(WORK.0)
                    .workers(WORK.1),
                StageConfig::new("store", ExecutionType::Thread)
                    .queue_size(STORE.0)
                    .workers(STORE.1),
            ],
        )
        .stats_interval(Duration::ZERO)
        .retain_results(false);
        let pipeline = Pipeline::builder(config)
            .unwrap()
            .source(queue.source::<u64>().unwrap())
            .async_stage("work", move |item: WorkItem<u64>| async move {
                {
                    let mut log = sink().attempts.lock().unwrap();
                    writeln!(log, "{}", item.job_id()).unwrap();
                }
                if Some(item.data) == poison {
                    std::process::abort();
                }
                tokio::time::sleep(Duration::from_millis(2 + item.data % 5)).await;
                if failing(item.data) {
                    anyhow::bail!("{} is meant to fail", item.data);
                }
                Ok(item)
            })
            .sync_stage("store", |item: WorkItem<u64>| {
                sink().results.lock().unwrap().execute(
                    "INSERT OR REPLACE INTO results (job_id, value) VALUES (?1, ?2)",
                    rusqlite::params![item.job_id().to_string(), item.data as i64],
                )?;
                Ok(item)
            })
            .build()
            .unwrap();
        pipeline.run().await.unwrap();
    });
}

struct Job {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    db: String,
    n: u64,
}

fn job(n: u64) -> Job {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let db = format!("sqlite:{}", path.join("queue.db").display());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let queue = WorkQueue::open(&db, QueueOptions::default()).unwrap();
        let added = queue
            .enqueue((0..n).map(|i| (format!("item-{i}"), i)))
            .await
            .unwrap();
        assert_eq!(added, n);
    });
    Job {
        _dir: dir,
        dir: path,
        db,
        n,
    }
}

fn spawn_consumer(job: &Job, poison: Option<u64>) -> Child {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.arg("--consume").arg(&job.db).arg(&job.dir);
    if let Some(p) = poison {
        command.arg("--poison").arg(p.to_string());
    }
    command.spawn().unwrap()
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
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What a finished job left: the queue's counts and dead letters, the
/// sink's results, the attempts per job id.
struct Outcome {
    counts: bergtalzug::queue::QueueCounts,
    dead: BTreeSet<String>,
    dead_letters: Vec<bergtalzug::queue::DeadItem>,
    results: BTreeSet<String>,
    attempts: BTreeMap<String, usize>,
}

fn outcome(job: &Job) -> Outcome {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (counts, dead_letters) = runtime.block_on(async {
        let queue = WorkQueue::open(&job.db, QueueOptions::default()).unwrap();
        (
            queue.counts().await.unwrap(),
            queue.dead_letters().await.unwrap(),
        )
    });
    let results_db = open_results(&job.dir.join("results.db"));
    let results = results_db
        .prepare("SELECT job_id FROM results")
        .unwrap()
        .query_map([], |row| row.get::<_, String>(0))
        .unwrap()
        .collect::<Result<BTreeSet<_>, _>>()
        .unwrap();
    let mut attempts = BTreeMap::new();
    let log = std::fs::read_to_string(job.dir.join("attempts.log")).unwrap_or_default();
    for line in log.lines() {
        *attempts.entry(line.to_string()).or_insert(0) += 1;
    }
    Outcome {
        counts,
        dead: dead_letters.iter().map(|d| d.job_id.clone()).collect(),
        dead_letters,
        results,
        attempts,
    }
}

/// Killed four times at random moments and started again: every item ran
/// at least once, the sink holds each success once, the extra attempts are
/// at most the window per kill, the dead letters hold exactly the items
/// meant to fail, and nothing stays leased.
fn a_killed_consumer_resumes_and_finishes_the_job() {
    let job = job(1_000);
    let kills = 4;
    let mut killed = 0;
    while killed < kills {
        let mut child = spawn_consumer(&job, None);
        std::thread::sleep(Duration::from_millis(fastrand::u64(50..300)));
        if child.try_wait().unwrap().is_some() {
            break; // it finished before the kill: the job is done
        }
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
        let status = wait_for(&mut child, Duration::from_secs(10));
        assert!(!status.success());
        killed += 1;
    }
    assert!(
        killed >= 2,
        "the job finished before the second kill: make it longer"
    );
    let mut last = spawn_consumer(&job, None);
    let status = wait_for(&mut last, Duration::from_secs(60));
    assert!(status.success(), "the last run ended with {status}");

    let outcome = outcome(&job);
    let meant_to_fail: BTreeSet<String> = (0..job.n)
        .filter(|&i| failing(i))
        .map(|i| format!("item-{i}"))
        .collect();
    let meant_to_succeed: BTreeSet<String> = (0..job.n)
        .filter(|&i| !failing(i))
        .map(|i| format!("item-{i}"))
        .collect();
    assert_eq!(outcome.counts.leased, 0, "nothing stays leased");
    assert_eq!(outcome.counts.pending, 0);
    assert_eq!(outcome.counts.done as usize, meant_to_succeed.len());
    assert_eq!(outcome.dead, meant_to_fail, "the dead letters");
    assert!(
        outcome
            .dead_letters
            .iter()
            .all(|d| d.stage == "work" && d.kind == "failed" && d.error.contains("meant to fail")),
        "{:?}",
        outcome.dead_letters.first()
    );
    assert_eq!(
        outcome.results, meant_to_succeed,
        "the sink keyed by job id"
    );
    let all: BTreeSet<String> = (0..job.n).map(|i| format!("item-{i}")).collect();
    let attempted: BTreeSet<String> = outcome.attempts.keys().cloned().collect();
    assert_eq!(attempted, all, "every item ran at least once");
    let total: usize = outcome.attempts.values().sum();
    let extra = total - job.n as usize;
    println!(
        "  {killed} kills: {total} attempts for {} items, {extra} extra (bound {} = {killed} x window {WINDOW})",
        job.n,
        killed * WINDOW
    );
    assert!(
        extra <= killed * WINDOW,
        "{extra} extra attempts after {killed} kills; the window is {WINDOW}"
    );
}

/// An item whose handler aborts the process ends in the dead letters after
/// `max_deliveries` (3) runs died with it, without running a fourth time;
/// the rest of the job completes.
fn a_poison_item_ends_in_the_dead_letters_and_the_rest_completes() {
    let job = job(60);
    let poison = 7;
    let mut crashes = 0;
    loop {
        let mut child = spawn_consumer(&job, Some(poison));
        let status = wait_for(&mut child, Duration::from_secs(30));
        if status.success() {
            break;
        }
        crashes += 1;
        assert!(crashes <= 3, "more crashes than max_deliveries");
    }
    assert_eq!(crashes, 3, "each of max_deliveries runs died with it");
    let outcome = outcome(&job);
    assert_eq!(outcome.counts.leased, 0);
    assert_eq!(outcome.counts.pending, 0);
    let poison_id = format!("item-{poison}");
    let poisoned: Vec<_> = outcome
        .dead_letters
        .iter()
        .filter(|d| d.kind == "max deliveries")
        .collect();
    assert_eq!(poisoned.len(), 1);
    assert_eq!(poisoned[0].job_id, poison_id);
    assert_eq!(poisoned[0].deliveries, 3);
    assert_eq!(outcome.attempts[&poison_id], 3, "not run a fourth time");
    let expected_done: BTreeSet<String> = (0..job.n)
        .filter(|&i| i != poison && !failing(i))
        .map(|i| format!("item-{i}"))
        .collect();
    assert_eq!(outcome.results, expected_done);
    assert_eq!(outcome.counts.done as usize, expected_done.len());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--consume") {
        let poison = args
            .iter()
            .position(|a| a == "--poison")
            .map(|p| args[p + 1].parse().unwrap());
        consume(&args[i + 1], Path::new(&args[i + 2]), poison);
        return;
    }
    let tests: [(&str, fn()); 2] = [
        (
            "a_killed_consumer_resumes_and_finishes_the_job",
            a_killed_consumer_resumes_and_finishes_the_job,
        ),
        (
            "a_poison_item_ends_in_the_dead_letters_and_the_rest_completes",
            a_poison_item_ends_in_the_dead_letters_and_the_rest_completes,
        ),
    ];
    common::run_tests(&tests);
}
