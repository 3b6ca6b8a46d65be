//! Process stages: whatever a worker process does (abort, segfault, being
//! killed, hanging, panicking, writing garbage), only the item it was
//! running fails, every other item completes, and no worker process is left
//! behind.
//!
//! This file has its own `main` (`harness = false` in Cargo.toml): a Process
//! stage starts this very binary again as its workers, and `main` must call
//! `bergtalzug::process::init()` before anything else. Run one test by
//! giving part of its name: `cargo test --test process -- abort`. Every test
//! is bounded in time.

#![allow(unsafe_code)] // One test-only handler segfaults on purpose.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bergtalzug::prelude::*;
use bergtalzug::process::ProcessOptions;
use bergtalzug::shape::Batch;
use serde::{Deserialize, Serialize};

/// What a worker should do with an item.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Act {
    /// Return twice the number.
    Double(u64),
    /// `std::process::abort()`.
    Abort,
    /// Write through a null pointer.
    Segfault,
    /// Panic in the handler.
    Panic,
    /// Return an error.
    Fail,
    /// Return an error marked permanent.
    FailPermanent,
    /// Exit the process with this status.
    Exit(i32),
    /// Sleep this many milliseconds, then double 0.
    Sleep(u64),
    /// Write our pid to this file, then sleep (to be killed from outside).
    AwaitKill(String),
    /// Write a frame of garbage to the parent, then return normally.
    Garbage,
    /// Write a frame header claiming 4 GiB to the parent, then sleep.
    HugeLength,
    /// Return this process's id.
    Pid,
    /// Abort if this file does not exist yet (creating it first): the first
    /// attempt dies, the next one returns 1.
    AbortOnce(String),
    /// Fail (transiently) until the attempt the worker sees is this one,
    /// then return that attempt.
    FailUntilAttempt(u32),
    /// Return how many bytes standard input gives.
    ReadStdin,
    /// Return 1 if this environment variable is set, else 0.
    Env(String),
    /// Print this to stdout and to stderr, then return 0.
    Print(String),
    /// Return the custom metadata `in` times 3, and set `out` = "seen".
    Custom,
    /// Start `sleep 60`, write our pid and its pid to this file, then sleep
    /// (to be killed).
    AwaitKillWithChild(String),
    /// `fork()`: the copy sleeps 40 s holding the socket; this process
    /// aborts.
    ForkAndAbort,
    /// 1 if our command line has `cmdline`, plus 2 if our name is `comm`.
    Named { cmdline: String, comm: String },
    /// Its `Serialize` panics (in the parent): it never reaches a worker.
    Unsendable(Unsendable),
}

/// Data whose `Serialize` panics.
#[derive(Debug, Clone, Deserialize)]
struct Unsendable;

impl Serialize for Unsendable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        panic!("this data cannot be serialized");
    }
}

fn act(item: WorkItem<Act>) -> anyhow::Result<WorkItem<u64>> {
    let n = match &item.data {
        Act::Double(n) => n * 2,
        Act::Abort => std::process::abort(),
        Act::Segfault => {
            // SAFETY: none; this is the point. Only ever runs in a worker
            // process, which the test expects to die by SIGSEGV.
            unsafe { std::ptr::null_mut::<u64>().write_volatile(1) };
            0
        }
        Act::Panic => panic!("the handler panicked on purpose"),
        Act::Fail => anyhow::bail!("the handler failed on purpose"),
        Act::FailPermanent => return Err(Permanent(anyhow::anyhow!("never retry this")).into()),
        Act::Exit(code) => std::process::exit(*code),
        Act::Sleep(ms) => {
            std::thread::sleep(Duration::from_millis(*ms));
            0
        }
        Act::AwaitKill(marker) => {
            std::fs::write(marker, std::process::id().to_string())?;
            std::thread::sleep(Duration::from_secs(60));
            0
        }
        Act::Garbage => {
            let mut frame = 16u32.to_le_bytes().to_vec();
            frame.extend_from_slice(&[0xff; 16]);
            write_to_parent(&frame);
            1
        }
        Act::HugeLength => {
            write_to_parent(&u32::MAX.to_le_bytes());
            write_to_parent(&[0; 1024]);
            std::thread::sleep(Duration::from_secs(60));
            0
        }
        Act::AbortOnce(marker) => {
            if std::fs::exists(marker)? {
                1
            } else {
                std::fs::write(marker, b"")?;
                std::process::abort()
            }
        }
        Act::FailUntilAttempt(n) => {
            let seen = item.metadata().attempts();
            anyhow::ensure!(seen >= *n, "attempt {seen} of {n}");
            u64::from(seen)
        }
        Act::Pid => std::process::id() as u64,
        Act::ReadStdin => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
            buf.len() as u64
        }
        Act::Env(key) => std::env::var_os(key).is_some() as u64,
        Act::Print(text) => {
            println!("{text} on stdout");
            eprintln!("{text} on stderr");
            0
        }
        Act::AwaitKillWithChild(marker) => {
            let child = std::process::Command::new("sleep").arg("60").spawn()?;
            let pids = format!("{} {}", std::process::id(), child.id());
            std::fs::write(marker, pids)?;
            std::thread::sleep(Duration::from_secs(60));
            0
        }
        Act::ForkAndAbort => {
            // SAFETY: the copy only sleeps and exits.
            match unsafe { nix::unistd::fork() }? {
                nix::unistd::ForkResult::Child => {
                    std::thread::sleep(Duration::from_secs(40));
                    std::process::exit(0)
                }
                nix::unistd::ForkResult::Parent { .. } => std::process::abort(),
            }
        }
        Act::Unsendable(_) => unreachable!("it never reaches a worker"),
        Act::Named { cmdline, comm } => {
            let line = String::from_utf8_lossy(&std::fs::read("/proc/self/cmdline")?).to_string();
            let name = std::fs::read_to_string("/proc/self/comm")?;
            u64::from(line.contains(cmdline.as_str())) + 2 * u64::from(name.trim_end() == comm)
        }
        Act::Custom => {
            let custom = &item.metadata().custom;
            let n = custom.get("in").and_then(|v| v.as_u64()).unwrap_or(0) * 3;
            let mut out = item.map(|_| n);
            out.metadata_mut()
                .custom
                .insert("out".into(), "seen".into());
            return Ok(out);
        }
    };
    Ok(item.map(|_| n))
}

/// Writes straight into the socket to the parent: the worker's only socket.
fn write_to_parent(bytes: &[u8]) {
    let fd: i32 = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
        })
        .find_map(|fd| fd.file_name().to_str()?.parse().ok())
        .expect("the worker has its socket");
    // SAFETY: `fd` is open (listed just now) and stays open while borrowed:
    // nothing else in the worker closes it during this call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let fd = fd.try_clone_to_owned().unwrap();
    std::fs::File::from(fd).write_all(bytes).unwrap();
}

/// Runs `acts` through one Process stage (job ids `"<index>"`) and a Thread
/// stage that records what it returned; gives the results and the returned
/// numbers by index, having checked that every item finished exactly once
/// and that no worker process is left.
async fn run(
    name: &str,
    stage: StageConfig,
    options: ProcessOptions,
    acts: Vec<Act>,
) -> (BTreeMap<usize, WorkItemResult>, BTreeMap<usize, u64>) {
    let items = acts
        .into_iter()
        .enumerate()
        .map(|(i, a)| WorkItem::with_job_id(i.to_string(), a))
        .collect();
    let (results, returned) = run_bound(name, stage, items, |b, name| {
        b.process_stage_with(name, act, options)
    })
    .await;
    let index = |n: u64| n as usize;
    (
        results.into_iter().map(|(n, r)| (index(n), r)).collect(),
        returned.into_iter().map(|(n, d)| (index(n), d)).collect(),
    )
}

fn stage_name(pipeline: &str) -> String {
    format!("{pipeline}-stage")
}

fn stage(pipeline: &str, workers: usize) -> StageConfig {
    StageConfig::new(stage_name(pipeline), ExecutionType::Process)
        .workers(workers)
        .queue_size(16)
}

/// `Double(0..n)` with `special` inserted at index `at`.
fn doubles_with(n: u64, at: usize, special: Act) -> Vec<Act> {
    let mut acts: Vec<Act> = (0..n).map(Act::Double).collect();
    acts.insert(at, special);
    acts
}

/// Every item but `at` doubled its number; `at` failed with `kind`, and its
/// message contains `needle`.
fn only_one_failed(
    (results, returned): &(BTreeMap<usize, WorkItemResult>, BTreeMap<usize, u64>),
    at: usize,
    kind: ItemErrorKind,
    needle: &str,
) {
    assert_eq!(returned.len(), results.len() - 1, "only item {at} failed");
    for (i, r) in results {
        if *i == at {
            let e = r.error.as_ref().expect("the special item failed");
            println!("    {e}");
            assert!(!r.success);
            assert_eq!(e.kind, kind, "{e}");
            assert!(e.message.contains(needle), "{e}");
            assert!(e.stage.ends_with("-stage"), "{e}");
        } else {
            assert!(r.success, "item {i} should have completed: {:?}", r.error);
            let n = if *i < at { *i } else { *i - 1 } as u64;
            assert_eq!(returned[i], 2 * n, "item {i}");
        }
    }
}

/// Pids of this process's children (zombies included).
fn children() -> Vec<(u32, String)> {
    children_of(std::process::id())
}

/// Whether process `pid` runs (is neither gone nor a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after = &stat[stat.rfind(')')? + 2..];
            Some(!after.starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Waits up to 3 s for every process of `pids` to be dead.
async fn all_dead(pids: &[i32], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {left:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Pids of process `me`'s children (zombies included), and their states.
fn children_of(me: u32) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let mut fields = after.split_whitespace();
        let state = fields.next().unwrap_or("?").to_string();
        if fields.next().and_then(|p| p.parse::<u32>().ok()) == Some(me) {
            found.push((pid, state));
        }
    }
    found
}

/// No child process of ours is left, not even a zombie (waits up to 3 s for
/// the runtime to reap what was killed).
async fn no_children_left() {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left = children();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "worker processes left behind (pid, state): {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- the tests ----

async fn abort_fails_only_its_item() {
    let acts = doubles_with(30, 7, Act::Abort);
    let results = run("abort", stage("abort", 2), ProcessOptions::new(), acts).await;
    only_one_failed(&results, 7, ItemErrorKind::ProcessDied, "SIGABRT");
}

async fn segfault_fails_only_its_item() {
    let acts = doubles_with(30, 3, Act::Segfault);
    let results = run("segv", stage("segv", 2), ProcessOptions::new(), acts).await;
    only_one_failed(&results, 3, ItemErrorKind::ProcessDied, "SIGSEGV");
}

/// A worker that dies while the next items are still being written to it
/// may have answered items whose replies are not read yet: they must
/// complete, and only the item it died on fail (a failed write is not taken
/// for the death of the first unanswered item). A race: many deaths among
/// quick items make it show.
async fn a_death_while_items_are_being_sent_blames_the_right_item() {
    let acts: Vec<Act> = (0..600)
        .map(|i| {
            if i % 4 == 3 {
                Act::Abort
            } else {
                Act::Double(i)
            }
        })
        .collect();
    let (results, returned) = run("deaths", stage("deaths", 2), ProcessOptions::new(), acts).await;
    for (i, r) in &results {
        if i % 4 == 3 {
            let e = r.error.as_ref().expect("the aborting item failed");
            assert_eq!(e.kind, ItemErrorKind::ProcessDied, "{e}");
            assert!(e.message.contains("SIGABRT"), "{e}");
        } else {
            assert!(r.success, "item {i} should have completed: {:?}", r.error);
            assert_eq!(returned[i], 2 * *i as u64);
        }
    }
}

async fn exit_status_is_reported() {
    let acts = doubles_with(10, 4, Act::Exit(7));
    let results = run("exit", stage("exit", 1), ProcessOptions::new(), acts).await;
    only_one_failed(
        &results,
        4,
        ItemErrorKind::ProcessDied,
        "exited with status 7",
    );
}

async fn sigkill_from_outside_fails_only_its_item() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pid");
    let acts = doubles_with(20, 5, Act::AwaitKill(marker.display().to_string()));
    let killer = tokio::spawn(async move {
        loop {
            if let Ok(pid) = std::fs::read_to_string(&marker)
                && let Ok(pid) = pid.trim().parse::<i32>()
            {
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .unwrap();
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let results = run("sigkill", stage("sigkill", 2), ProcessOptions::new(), acts).await;
    killer.await.unwrap();
    only_one_failed(&results, 5, ItemErrorKind::ProcessDied, "SIGKILL");
}

async fn a_hang_past_the_timeout_is_killed() {
    let acts = doubles_with(20, 2, Act::Sleep(60_000));
    let started = Instant::now();
    let stage = stage("hang", 2).timeout(Duration::from_millis(300));
    let results = run("hang", stage, ProcessOptions::new(), acts).await;
    only_one_failed(&results, 2, ItemErrorKind::TimedOut, "timeout");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the hung item was not cut short: {:?}",
        started.elapsed()
    );
}

async fn a_slow_item_within_the_timeout_completes() {
    let acts = doubles_with(6, 1, Act::Sleep(100));
    let stage = stage("slow", 1).timeout(Duration::from_secs(5));
    let (results, _) = run("slow", stage, ProcessOptions::new(), acts).await;
    assert!(results.values().all(|r| r.success));
}

/// One slow item holds back only itself and the few items written ahead to
/// its worker process (at most 3): an idle worker takes the rest of its
/// batch (issue 12 item 2). The slow item comes late, when batches are
/// large.
async fn a_slow_item_holds_back_only_itself() {
    let mut acts: Vec<Act> = (0..200).map(Act::Double).collect();
    acts[150] = Act::Sleep(1500);
    let items = acts
        .into_iter()
        .enumerate()
        .map(|(i, a)| WorkItem::with_job_id(i.to_string(), a));
    let config =
        PipelineConfig::new("slow-one", vec![stage("slow-one", 2)]).stats_interval(Duration::ZERO);
    let start = Instant::now();
    let finished = Arc::new(Mutex::new(Vec::new()));
    let record = finished.clone();
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(sources::items(items))
        .process_stage(&stage_name("slow-one"), act)
        .on_complete(move |r| {
            record
                .lock()
                .unwrap()
                .push((r.job_id.to_string(), start.elapsed()))
        })
        .build()
        .unwrap();
    let results = pipeline.run().await.unwrap();
    assert_eq!(results.len(), 200);
    assert!(results.iter().all(|r| r.success));
    let finished = finished.lock().unwrap().clone();
    let slow = finished.iter().find(|(id, _)| id == "150").unwrap().1;
    let behind: Vec<_> = finished
        .iter()
        .filter(|(id, at)| id != "150" && *at + Duration::from_millis(300) > slow)
        .collect();
    assert!(
        behind.len() <= 3,
        "{} items waited behind the slow one: {behind:?}",
        behind.len()
    );
    no_children_left().await;
}

async fn a_panic_fails_only_its_item_and_keeps_the_process() {
    let mut acts = vec![Act::Pid];
    acts.extend((0..10).map(Act::Double));
    acts.insert(4, Act::Panic);
    acts.push(Act::Pid);
    let last = acts.len() - 1;
    let (results, returned) = run("panic", stage("panic", 1), ProcessOptions::new(), acts).await;
    let e = results[&4]
        .error
        .as_ref()
        .expect("the panic failed its item");
    assert_eq!(e.kind, ItemErrorKind::Panicked);
    assert!(e.message.contains("panicked on purpose"), "{e}");
    assert_eq!(results.values().filter(|r| !r.success).count(), 1);
    // The panic was caught in the worker process, which went on.
    assert_eq!(
        returned[&0], returned[&last],
        "the worker process was replaced"
    );
}

/// The data's `Serialize` is user code the parent runs: a panic in it fails
/// that item only, never the worker holding the batch.
async fn a_panicking_serialize_fails_only_its_item() {
    let acts = doubles_with(20, 7, Act::Unsendable(Unsendable));
    let results = run(
        "unsendable",
        stage("unsendable", 2),
        ProcessOptions::new(),
        acts,
    )
    .await;
    only_one_failed(&results, 7, ItemErrorKind::Failed, "cannot be serialized");
}

async fn errors_fail_their_item_with_the_message() {
    let mut acts = doubles_with(10, 2, Act::Fail);
    acts.insert(6, Act::FailPermanent);
    let (results, _) = run("errors", stage("errors", 2), ProcessOptions::new(), acts).await;
    for (i, r) in &results {
        match i {
            2 => {
                let e = r.error.as_ref().unwrap();
                assert_eq!(e.kind, ItemErrorKind::Failed);
                assert_eq!(e.message, "the handler failed on purpose");
            }
            6 => {
                let e = r.error.as_ref().unwrap();
                assert_eq!(e.kind, ItemErrorKind::Failed);
                assert_eq!(e.message, "never retry this");
            }
            _ => assert!(r.success),
        }
    }
}

async fn garbage_from_a_worker_fails_its_item_and_replaces_it() {
    let mut acts: Vec<Act> = (0..20).map(Act::Double).collect();
    acts.insert(4, Act::Garbage);
    acts.insert(12, Act::HugeLength);
    let (results, _) = run("garbage", stage("garbage", 1), ProcessOptions::new(), acts).await;
    for (i, r) in &results {
        if *i == 4 || *i == 12 {
            let e = r.error.as_ref().expect("the garbage item failed");
            assert_eq!(e.kind, ItemErrorKind::ProcessDied, "{e}");
            assert!(e.message.contains("corrupt reply"), "{e}");
        } else {
            assert!(r.success, "item {i}: {:?}", r.error);
        }
    }
    assert!(
        results[&12]
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("above the limit")
    );
}

async fn the_whole_item_crosses() {
    let config = PipelineConfig::new(
        "whole",
        vec![
            StageConfig::new("tag", ExecutionType::Async).workers(2),
            StageConfig::new("whole-stage", ExecutionType::Process).workers(2),
            StageConfig::new("check", ExecutionType::Thread).workers(1),
        ],
    )
    .stats_interval(Duration::ZERO);
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(0..40u64))
        .async_stage("tag", |mut item: WorkItem<u64>| async move {
            let n = item.data;
            item.metadata_mut().custom.insert("in".into(), n.into());
            Ok(item.map(|_| Act::Custom))
        })
        .process_stage("whole-stage", act)
        .sync_stage("check", |item: WorkItem<u64>| {
            let seen = &item.metadata().custom["out"];
            anyhow::ensure!(seen == "seen", "custom metadata lost: {seen}");
            let n = item.metadata().custom["in"].as_u64().unwrap();
            anyhow::ensure!(item.data == 3 * n, "{} != 3 * {n}", item.data);
            Ok(item)
        })
        .build()
        .unwrap();
    let results = pipeline.run().await.unwrap();
    assert_eq!(results.len(), 40);
    for r in &results {
        assert!(r.success, "{:?}", r.error);
        assert!(r.metadata.stage_duration("whole-stage").is_some());
    }
    no_children_left().await;
}

async fn job_ids_cross_unchanged() {
    let acts = (0..50).map(Act::Double).collect();
    let (results, returned) = run("ids", stage("ids", 2), ProcessOptions::new(), acts).await;
    // `run` parsed every job id back to its index, in both stages.
    assert_eq!(
        results.keys().copied().collect::<Vec<_>>(),
        (0..50).collect::<Vec<_>>()
    );
    assert!(results.values().all(|r| r.success));
    assert!(returned.iter().all(|(i, n)| *n == 2 * *i as u64));
}

/// A Process stage's handler splits: `n` becomes `0..n` (0: filtered).
fn count_to(item: WorkItem<u64>) -> anyhow::Result<WorkItem<Vec<u64>>> {
    Ok(item.map(|n| (0..n).collect()))
}

async fn a_process_stage_splits_with_lineage() {
    let config =
        PipelineConfig::new("split", vec![stage("split", 2)]).stats_interval(Duration::ZERO);
    let items = [("a", 3u64), ("b", 0)].map(|(id, n)| WorkItem::with_job_id(id, n));
    let results = Pipeline::builder(config)
        .unwrap()
        .source(sources::items(items))
        .process_stage(&stage_name("split"), count_to)
        .split()
        .build()
        .unwrap()
        .run()
        .await
        .unwrap();
    let mut ids: Vec<String> = results.iter().map(|r| r.job_id.to_string()).collect();
    ids.sort();
    assert_eq!(ids, ["a/0", "a/1", "a/2", "b"]);
    assert!(results.iter().all(|r| r.success));
    for r in &results {
        match r.job_id.to_string().as_str() {
            "b" => assert_eq!(r.metadata.custom[bergtalzug::shape::FILTERED], true),
            _ => assert_eq!(r.metadata.custom[bergtalzug::shape::PARENT_ID], "a"),
        }
    }
    no_children_left().await;
}

async fn workers_are_recycled_after_n_items() {
    let acts: Vec<Act> = (0..20).map(|_| Act::Pid).collect();
    let options = ProcessOptions::new().recycle_after(5);
    let (results, returned) = run("recycle", stage("recycle", 1), options, acts).await;
    assert!(results.values().all(|r| r.success));
    let pids: Vec<u64> = returned.values().copied().collect();
    for chunk in pids.chunks(5) {
        assert!(chunk.iter().all(|p| *p == chunk[0]), "{pids:?}");
    }
    let distinct: std::collections::BTreeSet<u64> = pids.iter().copied().collect();
    assert_eq!(distinct.len(), 4, "{pids:?}");
}

/// By default workers inherit the parent's environment, as Python's
/// process pools do.
async fn the_environment_is_inherited_by_default() {
    let acts = vec![
        Act::Env("BERGTALZUG_TEST_SECRET".into()),
        Act::Env("PASSED_ON".into()),
        Act::Env("GIVEN".into()),
    ];
    let options = ProcessOptions::new().env("GIVEN", "1");
    let (results, returned) = run("envall", stage("envall", 1), options, acts).await;
    assert!(results.values().all(|r| r.success));
    assert_eq!(
        returned.values().copied().collect::<Vec<_>>(),
        vec![1, 1, 1]
    );
}

async fn the_environment_is_clean() {
    // BERGTALZUG_TEST_SECRET and PASSED_ON are set by `main`.
    let acts = vec![
        Act::Env("BERGTALZUG_TEST_SECRET".into()),
        Act::Env("PATH".into()),
        Act::Env("GIVEN".into()),
        Act::Env("PASSED_ON".into()),
    ];
    let options = ProcessOptions::new()
        .clean_env()
        .env("GIVEN", "1")
        .inherit_env("PASSED_ON");
    let (results, returned) = run("env", stage("env", 1), options, acts).await;
    assert!(results.values().all(|r| r.success));
    assert_eq!(
        returned.values().copied().collect::<Vec<_>>(),
        vec![0, 1, 1, 1]
    );
}

async fn captured_worker_output_reaches_tracing() {
    let acts = vec![Act::Print("hello from a worker".into())];
    let options = ProcessOptions::new().capture_output();
    let (results, _) = run("logs", stage("logs", 1), options, acts).await;
    assert!(results[&0].success);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let log = String::from_utf8_lossy(&LOG.lock().unwrap()).to_string();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("hello from a worker"))
            .collect();
        let has = |stream: &str, level: &str| {
            lines.iter().any(|l| {
                l.contains(&format!("hello from a worker on {stream}"))
                    && l.contains(level)
                    && l.contains("stage=logs-stage")
                    && l.contains("worker=w")
                    && l.contains("pipeline=logs")
            })
        };
        if has("stdout", "INFO") && has("stderr", "WARN") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "worker output not logged: {lines:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `count` doubles through one Process stage started with `options`,
/// for a pipeline expected to fail: its error.
async fn run_to_error(
    name: &str,
    stage: StageConfig,
    options: ProcessOptions,
    acts: Vec<Act>,
) -> PipelineError {
    let config = PipelineConfig::new(name, vec![stage]).stats_interval(Duration::ZERO);
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(acts))
        .process_stage_with(&stage_name(name), act, options)
        .build()
        .unwrap();
    let error = pipeline.run().await.expect_err("the pipeline should fail");
    println!("    {error}");
    no_children_left().await;
    error
}

/// A worker that cannot start serving (here a program that exits at once,
/// as `main` does that forgets `process::init()` and stops on arguments it
/// does not know) fails the pipeline, quickly and once, with the hint: not
/// every item in turn, each starting worker processes of its own.
async fn workers_that_cannot_start_fail_the_pipeline_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("starts");
    let script = format!("echo started >> '{}'; exit 2", log.display());
    let options = ProcessOptions::new()
        .program("/bin/sh")
        .args(["-c", &script]);
    let started = Instant::now();
    let acts = (0..2000).map(Act::Double).collect();
    let error = run_to_error("nostart", stage("nostart", 2), options, acts).await;
    match &error {
        PipelineError::WorkersCannotStart { stage, message, .. } => {
            assert_eq!(stage, "nostart-stage");
            assert!(message.contains("before it started serving"), "{error}");
            assert!(message.contains("process::init"), "{error}");
        }
        other => panic!("not WorkersCannotStart: {other}"),
    }
    let starts = std::fs::read_to_string(&log).unwrap().lines().count();
    assert!(starts <= 6, "{starts} worker processes started");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    let options = ProcessOptions::new()
        .program("/bin/sleep")
        .args(["30"])
        .start_timeout(Duration::from_millis(200));
    let acts = (0..100).map(Act::Double).collect();
    let error = run_to_error("slowstart", stage("slowstart", 1), options, acts).await;
    assert!(
        matches!(&error, PipelineError::WorkersCannotStart { message, .. }
            if message.contains("did not start serving within")),
        "{error}"
    );
}

/// A crash loop of worker processes trips the stage's restart budget, as
/// a crash loop of worker actors does: the pipeline fails, naming the
/// stage.
async fn a_crash_loop_of_worker_processes_trips_the_restart_budget() {
    let stage = stage("budget", 2).restart_budget(RestartBudget::new(3, Duration::from_secs(60)));
    let acts = (0..1000).map(|_| Act::Abort).collect();
    let error = run_to_error("budget", stage, ProcessOptions::new(), acts).await;
    assert!(
        matches!(&error, PipelineError::RestartBudgetExceeded { stage, .. } if stage == "budget-stage"),
        "{error}"
    );
}

/// A worker that dies while a process it forked holds its socket open
/// fails its item at once: its exit is watched, not only its socket. (The
/// fork, in the worker's process group, is killed with it.)
async fn a_worker_that_forks_and_dies_fails_its_item_at_once() {
    let started = Instant::now();
    let acts = doubles_with(10, 3, Act::ForkAndAbort);
    let results = run("fork", stage("fork", 1), ProcessOptions::new(), acts).await;
    only_one_failed(&results, 3, ItemErrorKind::ProcessDied, "SIGABRT");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the item waited for the fork: {:?}",
        started.elapsed()
    );
}

/// A worker killed at the stage's timeout takes what its handler started
/// with it: the worker's process group is ended, not only the worker.
async fn a_killed_worker_takes_its_children_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pids");
    let acts = doubles_with(6, 2, Act::AwaitKillWithChild(marker.display().to_string()));
    let stage = stage("grandchild", 1).timeout(Duration::from_secs(1));
    let results = run("grandchild", stage, ProcessOptions::new(), acts).await;
    only_one_failed(&results, 2, ItemErrorKind::TimedOut, "timeout");
    let pids: Vec<i32> = std::fs::read_to_string(&marker)
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2);
    all_dead(&pids, "a killed worker's child outlived run()").await;
}

/// When `run()` returns, every worker process has been reaped: none is
/// left even for a moment.
async fn run_returns_after_the_workers_are_reaped() {
    for round in 0..5 {
        let name = format!("reaped{round}");
        let config =
            PipelineConfig::new(&name, vec![stage(&name, 2)]).stats_interval(Duration::ZERO);
        let pipeline = Pipeline::builder(config)
            .unwrap()
            .source(sources::iter((0..20).map(Act::Double)))
            .process_stage(&stage_name(&name), act)
            .build()
            .unwrap();
        let results = pipeline.run().await.unwrap();
        let left = children();
        assert!(
            left.is_empty(),
            "round {round}: left (pid, state): {left:?}"
        );
        assert!(results.iter().all(|r| r.success));
    }
}

/// Worker processes live as long as their stage, whatever threads of the
/// program's runtime end: with `block_in_place` and a short keep-alive,
/// the threads that started them end (their parent-death signal, when it
/// was the thread's, killed them then).
async fn workers_outlive_the_threads_that_started_them() {
    let run = || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_keep_alive(Duration::from_millis(10))
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let config = PipelineConfig::new("threads", vec![stage("threads", 2)])
                .stats_interval(Duration::ZERO);
            let pipeline = Pipeline::builder(config)
                .unwrap()
                .source(sources::iter((0..60).map(|_| Act::Sleep(25))))
                .process_stage("threads-stage", act)
                .build()
                .unwrap();
            let busy = tokio::spawn(async {
                let until = Instant::now() + Duration::from_millis(1200);
                while Instant::now() < until {
                    let blockers: Vec<_> = (0..4)
                        .map(|_| {
                            tokio::spawn(async {
                                tokio::task::block_in_place(|| {
                                    std::thread::sleep(Duration::from_millis(2))
                                })
                            })
                        })
                        .collect();
                    for b in blockers {
                        let _ = b.await;
                    }
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
            });
            let results = pipeline.run().await.unwrap();
            let _ = busy.await;
            results
        })
    };
    let results = tokio::task::spawn_blocking(run).await.unwrap();
    assert_eq!(results.len(), 60);
    let failed: Vec<_> = results.iter().filter_map(|r| r.error.as_ref()).collect();
    assert!(failed.is_empty(), "{failed:#?}");
    no_children_left().await;
}

/// `ps` and `pgrep` show a worker process under the program's name, with
/// its pipeline and stage.
async fn workers_are_named_after_the_program_pipeline_and_stage() {
    let exe = std::env::current_exe().unwrap();
    let mut comm = exe.file_name().unwrap().to_str().unwrap().to_string();
    comm.truncate(15);
    let acts = vec![Act::Named {
        cmdline: "(bergtalzug worker names/names-stage)".into(),
        comm,
    }];
    let (results, returned) = run("names", stage("names", 1), ProcessOptions::new(), acts).await;
    assert!(results[&0].success, "{:?}", results[&0].error);
    assert_eq!(returned[&0], 3, "1: the command line, 2: the name");
}

/// Runs this binary with `args` as a parent of its own, in a process group
/// of its own (as a shell starts a job); gives it with its stdout and
/// stderr piped.
fn parent(args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(args)
        .process_group(0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// By default a worker's output goes where the parent's goes, as in
/// Python's process pools: here, to the pipes of a parent started with
/// `--print`.
async fn worker_output_reaches_the_parents_stdout_and_stderr() {
    let child = parent(&["--print"]);
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("the parent ended")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("hello from a worker on stdout"),
        "stdout: {stdout}"
    );
    assert!(
        stderr.contains("hello from a worker on stderr"),
        "stderr: {stderr}"
    );
}

/// `--print`: one item through a Process stage that prints.
fn print_through() -> ! {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let ok = runtime.block_on(async {
        let config =
            PipelineConfig::new("print", vec![stage("print", 1)]).stats_interval(Duration::ZERO);
        let pipeline = Pipeline::builder(config)
            .unwrap()
            .source(sources::iter([Act::Print("hello from a worker".into())]))
            .process_stage("print-stage", act)
            .build()
            .unwrap();
        let results = pipeline.run().await.unwrap();
        results.iter().all(|r| r.success)
    });
    std::process::exit(if ok { 0 } else { 1 })
}

/// Ctrl-C in a terminal goes to the whole foreground process group. The
/// worker processes must not take it (the parent decides), and
/// `stop_on_ctrl_c` stops gracefully: every item in the pipeline completes.
/// The parent is this binary with `--ctrl-c` (see `ctrl_c_parent`); SIGINT
/// goes to its process group once its two workers run.
async fn ctrl_c_stops_gracefully_and_spares_the_workers() {
    let child = parent(&["--ctrl-c"]);
    let pid = child.id().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while children_of(pid).iter().filter(|(_, s)| s != "Z").count() < 2 {
        assert!(Instant::now() < deadline, "the workers did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let group = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGINT).unwrap();
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("the parent stopped")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("    {}", stdout.trim());
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("stopping"), "{stderr}");
    assert!(stdout.contains("all completed"), "{stdout}");
}

/// `--ctrl-c`: a pipeline of 400 items of 50 ms that stops on Ctrl-C;
/// prints how its items ended and exits 0 if all completed and some were
/// left unread (the stop came).
fn ctrl_c_parent() -> ! {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let ok = runtime.block_on(async {
        let config =
            PipelineConfig::new("ctrlc", vec![stage("ctrlc", 2)]).stats_interval(Duration::ZERO);
        let pipeline = Pipeline::builder(config)
            .unwrap()
            .source(sources::iter((0..400).map(|_| Act::Sleep(50))))
            .process_stage("ctrlc-stage", act)
            .build()
            .unwrap();
        pipeline.stop_on_ctrl_c();
        let results = pipeline.run().await.unwrap();
        let failed: Vec<_> = results.iter().filter_map(|r| r.error.as_ref()).collect();
        if failed.is_empty() && results.len() < 400 {
            println!("all completed: {} of 400 items read", results.len());
            true
        } else {
            println!("{} results, failed: {failed:?}", results.len());
            false
        }
    });
    std::process::exit(if ok { 0 } else { 1 })
}

/// Retries work as in the other models, without `Clone`: the input of a
/// failed attempt is recovered from the bytes sent to the worker. An item
/// whose first attempt killed its worker succeeds on its second; a hang is
/// tried again and fails `TimedOut` after its last attempt, and its dead
/// letter carries its input.
async fn retries_run_the_item_again_in_a_new_process() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("once").display().to_string();
    let mut acts: Vec<Act> = (0..10).map(Act::Double).collect();
    acts[3] = Act::AbortOnce(marker);
    acts[7] = Act::Sleep(60_000);
    let items = acts
        .into_iter()
        .enumerate()
        .map(|(i, a)| WorkItem::with_job_id(i.to_string(), a));
    let stage = stage("retry", 2)
        .timeout(Duration::from_millis(300))
        .retry(RetryPolicy::fixed(2, Duration::from_millis(10)));
    let config = PipelineConfig::new("retry", vec![stage]).stats_interval(Duration::ZERO);
    let letters = Arc::new(Mutex::new(Vec::new()));
    let sink = letters.clone();
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(sources::items(items))
        .process_stage("retry-stage", act)
        .on_dead_letter(move |letter| sink.lock().unwrap().push(letter))
        .build()
        .unwrap();
    let results = pipeline.run().await.unwrap();
    assert_eq!(results.len(), 10);
    for r in &results {
        let i: usize = r.job_id.to_string().parse().unwrap();
        match i {
            3 => {
                assert!(r.success, "{:?}", r.error);
                assert_eq!(r.metadata.attempts(), 2);
            }
            7 => {
                let e = r.error.as_ref().expect("the hang failed");
                assert_eq!(e.kind, ItemErrorKind::TimedOut, "{e}");
                assert_eq!(e.attempts, 2, "{e}");
            }
            _ => {
                assert!(r.success, "{:?}", r.error);
                assert_eq!(r.metadata.attempts(), 1);
            }
        }
    }
    {
        let letters = letters.lock().unwrap();
        assert_eq!(letters.len(), 1);
        let input = letters[0]
            .input::<Act>()
            .expect("the dead letter has its input");
        assert!(matches!(input.data, Act::Sleep(60_000)), "{:?}", input.data);
    }
    no_children_left().await;
}

/// A handler in a worker process reads the attempt it is on, as it would
/// in-process: a retry is attempt 2, whichever process runs it.
async fn a_handler_sees_its_attempt_in_the_worker_process() {
    let stage = stage("attempts", 2).retry(RetryPolicy::fixed(3, Duration::from_millis(5)));
    let acts = vec![
        Act::FailUntilAttempt(1),
        Act::FailUntilAttempt(3),
        Act::FailUntilAttempt(9),
    ];
    let (results, returned) = run("attempts", stage, ProcessOptions::new(), acts).await;
    assert_eq!(returned.get(&0), Some(&1), "{returned:?}");
    assert_eq!(returned.get(&1), Some(&3), "{returned:?}");
    // (The result's own `attempts()` is the collector stage's, after it.)
    let times = results[&1].metadata.stage(&stage_name("attempts"));
    assert_eq!(times.map(|t| t.attempts()), Some(3));
    let e = results[&2]
        .error
        .as_ref()
        .expect("attempt 9 is never reached");
    assert_eq!(e.attempts, 3, "{e}");
    assert!(e.message.contains("attempt 3 of 9"), "{e}");
    no_children_left().await;
}

/// A handler's output whose `Deserialize` panics (in the parent) for 7.
#[derive(Debug, Serialize)]
struct Unreadable(u64);

impl<'de> Deserialize<'de> for Unreadable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        if n == 7 {
            panic!("this reply cannot be read");
        }
        Ok(Unreadable(n))
    }
}

fn unreadable(item: WorkItem<u64>) -> anyhow::Result<WorkItem<Unreadable>> {
    Ok(item.map(Unreadable))
}

/// The output's `Deserialize` is user code the parent runs: a panic in it
/// fails that item only (its reply cannot be read), and the pipeline goes
/// on with the others.
async fn a_panicking_deserialize_of_a_reply_fails_only_its_item() {
    let config = PipelineConfig::new("unreadable", vec![stage("unreadable", 2)])
        .stats_interval(Duration::ZERO);
    let results = tokio::time::timeout(
        Duration::from_secs(60),
        Pipeline::builder(config)
            .unwrap()
            .source(sources::iter(0..20u64))
            .process_stage("unreadable-stage", unreadable)
            .build()
            .unwrap()
            .run(),
    )
    .await
    .expect("the run ended")
    .unwrap();
    assert_eq!(results.len(), 20, "every item has one outcome");
    let failed: Vec<_> = results.iter().filter(|r| !r.success).collect();
    assert_eq!(
        failed.len(),
        1,
        "only the unreadable reply fails: {failed:?}"
    );
    let e = failed[0].error.as_ref().unwrap();
    assert_eq!(e.kind, ItemErrorKind::ProcessDied, "{e}");
    assert!(e.message.contains("cannot be read"), "{e}");
    no_children_left().await;
}

/// `stage_duration` is the handler's time over the attempts, in Process
/// stages too: the backoff before the second attempt is not counted.
async fn stage_duration_leaves_out_the_retry_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("once").display().to_string();
    let backoff = Duration::from_millis(500);
    let stage = stage("handler-time", 1).retry(RetryPolicy::fixed(2, backoff));
    let config = PipelineConfig::new("handler-time", vec![stage]).stats_interval(Duration::ZERO);
    let results = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter([Act::AbortOnce(marker)]))
        .process_stage("handler-time-stage", act)
        .build()
        .unwrap()
        .run()
        .await
        .unwrap();
    let r = &results[0];
    assert!(r.success, "{:?}", r.error);
    let times = r.metadata.stage("handler-time-stage").unwrap();
    assert_eq!(times.attempts(), 2);
    let handler = r.metadata.stage_duration("handler-time-stage").unwrap();
    assert!(handler < backoff, "the backoff was counted: {handler:?}");
    assert!(times.duration().unwrap() >= backoff, "{times:?}");
    assert!(times.retry_wait().unwrap() >= backoff, "{times:?}");
}

/// `init()` serves the stage by the handler's address, without running the
/// rest of `main`: with `--init-must-serve`, `main` exits 99 after `init()`.
async fn init_finds_the_handler_by_address() {
    let options = ProcessOptions::new().args(["--init-must-serve"]);
    let acts = (0..10).map(Act::Double).collect();
    let (results, _) = run("byaddr", stage("byaddr", 2), options, acts).await;
    assert!(results.values().all(|r| r.success), "{results:?}");
}

/// `main` skips `process::init()` when given `--no-init`: the worker then
/// runs `main` and this test again up to the builder's `process_stage`,
/// which serves the stage.
async fn the_builder_serves_when_init_was_not_called() {
    let options = ProcessOptions::new().args(["--no-init", "the_builder_serves_when_init"]);
    let acts = doubles_with(20, 9, Act::Abort);
    let results = run("noinit", stage("noinit", 2), options, acts).await;
    only_one_failed(&results, 9, ItemErrorKind::ProcessDied, "SIGABRT");
}

async fn abort_leaves_no_worker_behind() {
    let config = PipelineConfig::new("abort-all", vec![stage("abort-all", 2)])
        .stats_interval(Duration::ZERO);
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter((0..10).map(|_| Act::Sleep(30_000))))
        .process_stage("abort-all-stage", act)
        .build()
        .unwrap();
    pipeline.start().await.unwrap();
    // Wait until both workers run an item.
    let deadline = Instant::now() + Duration::from_secs(10);
    while children().iter().filter(|(_, s)| s != "Z").count() < 2 {
        assert!(Instant::now() < deadline, "workers did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    pipeline.abort().await.unwrap();
    let results = pipeline.run().await.unwrap();
    assert_eq!(results.len(), 10);
    assert!(results.iter().all(|r| r.is_cancelled()), "{results:?}");
    no_children_left().await;
}

/// A parent killed by SIGKILL cannot clean up: its busy workers see that
/// their parent is gone and end their process groups, with what their
/// handlers started. The parent here is this binary started with
/// `--hold-workers DIR` (see `main`), whose two workers each start a child,
/// write both pids into DIR and sleep.
async fn workers_die_with_a_killed_parent() {
    let dir = tempfile::tempdir().unwrap();
    let mut parent = tokio::process::Command::new(std::env::current_exe().unwrap())
        .arg("--hold-workers")
        .arg(dir.path())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid_file = |i: usize| dir.path().join(format!("pid-{i}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let pids: Vec<i32> = loop {
        // Each file: the worker's pid and its child's.
        let pids: Vec<i32> = (0..2)
            .filter_map(|i| std::fs::read_to_string(pid_file(i)).ok())
            .flat_map(|s| {
                s.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        if pids.len() == 4 {
            break pids;
        }
        assert!(Instant::now() < deadline, "the workers did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    parent.start_kill().unwrap();
    parent.wait().await.unwrap();
    all_dead(&pids, "workers or their children outlived their parent").await;
}

/// `--hold-workers DIR`: runs a pipeline whose two workers write their pids
/// to DIR/pid-0 and DIR/pid-1 and hang, until killed.
fn hold_workers(dir: &str) -> ! {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let config =
            PipelineConfig::new("held", vec![stage("held", 2)]).stats_interval(Duration::ZERO);
        let acts: Vec<Act> = (0..2)
            .map(|i| Act::AwaitKillWithChild(format!("{dir}/pid-{i}")))
            .collect();
        let pipeline = Pipeline::builder(config)
            .unwrap()
            .source(sources::iter(acts))
            .process_stage("held-stage", act)
            .build()
            .unwrap();
        let _ = pipeline.run().await;
    });
    std::process::exit(0)
}

// ---- per-worker resources and batch stages ----

/// Set in the workers of the resource and batch tests: where a resource's
/// `Drop` leaves its mark, and the abort-once marker.
const DIR_VAR: &str = "BERGTALZUG_TEST_DIR";

/// How many resources this process built (a worker builds one, once).
static BUILT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A per-worker resource: counts what it served; leaves
/// `$BERGTALZUG_TEST_DIR/dropped-<pid>` when dropped.
struct Counter {
    served: u64,
    /// Not `Send`: it never leaves its worker process.
    _here: std::rc::Rc<()>,
}

impl Drop for Counter {
    fn drop(&mut self) {
        if let Some(dir) = std::env::var_os(DIR_VAR) {
            let mark = std::path::Path::new(&dir).join(format!("dropped-{}", std::process::id()));
            let _ = std::fs::write(mark, self.served.to_string());
        }
    }
}

fn open_counter() -> anyhow::Result<Counter> {
    BUILT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    Ok(Counter {
        served: 0,
        _here: std::rc::Rc::new(()),
    })
}

/// What a worker says of itself and its resource: pid, resources built in
/// that process, and the count of what the resource served with this one.
fn whoami(served: u64) -> u64 {
    let built = BUILT.load(std::sync::atomic::Ordering::SeqCst);
    (u64::from(std::process::id()) << 32) | (built << 16) | served
}

/// (pid, resources built, served) from [`whoami`].
fn parts(n: u64) -> (u64, u64, u64) {
    (n >> 32, (n >> 16) & 0xffff, n & 0xffff)
}

fn count_item(counter: &mut Counter, item: WorkItem<u64>) -> anyhow::Result<WorkItem<u64>> {
    counter.served += 1;
    Ok(item.map(|_| whoami(counter.served)))
}

fn count_batch(
    counter: &mut Counter,
    batch: Batch<u64>,
) -> anyhow::Result<Vec<anyhow::Result<u64>>> {
    counter.served += 1;
    Ok(batch
        .items()
        .iter()
        .map(|_| Ok(whoami(counter.served)))
        .collect())
}

fn refuse_to_connect() -> anyhow::Result<Counter> {
    Err(anyhow::anyhow!("no database at db://nowhere")).map_err(|e| e.context("connecting"))
}

/// A batch handler: doubles each number and checks that its job id
/// crossed; 13 fails alone; a batch holding 1042 fails whole; a batch
/// holding 2023 aborts its worker process; a batch holding 3077 aborts it
/// the first time (leaving `$BERGTALZUG_TEST_DIR/aborted`).
fn double_batch(batch: Batch<u64>) -> anyhow::Result<Vec<anyhow::Result<u64>>> {
    let has = |n: u64| batch.items().iter().any(|i| i.data == n);
    if has(2023) {
        std::process::abort();
    }
    anyhow::ensure!(!has(1042), "the batch holding 1042 cannot be written");
    if has(3077) {
        let marker = std::path::Path::new(&std::env::var_os(DIR_VAR).unwrap()).join("aborted");
        if !marker.exists() {
            std::fs::write(marker, b"")?;
            std::process::abort();
        }
    }
    Ok(batch
        .into_items()
        .into_iter()
        .map(|item| {
            anyhow::ensure!(item.data != 13, "record 13 is bad");
            anyhow::ensure!(
                item.job_id().to_string() == item.data.to_string(),
                "wrong id"
            );
            Ok(item.data * 2)
        })
        .collect())
}

/// Runs `items` (job ids: numbers) through the Process stage `bind` binds
/// and a Thread stage that records what it got; gives the results and the
/// outputs by job id, having checked that every item finished exactly once
/// and that no worker process is left.
async fn run_bound<D: Send + 'static>(
    name: &str,
    stage: StageConfig,
    items: Vec<WorkItem<D>>,
    bind: impl FnOnce(bergtalzug::PipelineBuilder<D, D>, &str) -> bergtalzug::PipelineBuilder<D, u64>,
) -> (BTreeMap<u64, WorkItemResult>, BTreeMap<u64, u64>) {
    let count = items.len();
    let config = PipelineConfig::new(
        name,
        vec![
            stage,
            StageConfig::new("collect", ExecutionType::Thread).workers(1),
        ],
    )
    .stats_interval(Duration::ZERO);
    let returned = Arc::new(Mutex::new(BTreeMap::new()));
    let record = returned.clone();
    let builder = Pipeline::builder(config)
        .unwrap()
        .source(sources::items(items));
    let pipeline = bind(builder, &stage_name(name))
        .sync_stage("collect", move |item: WorkItem<u64>| {
            let n: u64 = item.job_id().to_string().parse()?;
            record.lock().unwrap().insert(n, item.data);
            Ok(item)
        })
        .build()
        .unwrap();
    let results = pipeline.run().await.unwrap();
    assert_eq!(results.len(), count, "every item has one outcome");
    let by_id: BTreeMap<u64, WorkItemResult> = results
        .into_iter()
        .map(|r| (r.job_id.to_string().parse().unwrap(), r))
        .collect();
    assert_eq!(by_id.len(), count, "no item finished twice");
    no_children_left().await;
    let returned = returned.lock().unwrap().clone();
    (by_id, returned)
}

/// Items numbered `numbers`, each its number as its job id.
fn numbered(numbers: std::ops::Range<u64>) -> Vec<WorkItem<u64>> {
    numbers
        .map(|n| WorkItem::with_job_id(n.to_string(), n))
        .collect()
}

/// What became of each output's worker processes: for each pid, the
/// counts its resource had served, sorted; every one was built once.
fn served_by_pid(returned: &BTreeMap<u64, u64>) -> BTreeMap<u64, Vec<u64>> {
    let mut by_pid: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for n in returned.values() {
        let (pid, built, served) = parts(*n);
        assert_eq!(built, 1, "worker process {pid} built {built} resources");
        by_pid.entry(pid).or_default().push(served);
    }
    for served in by_pid.values_mut() {
        served.sort();
    }
    by_pid
}

/// Each worker process builds its resource once, in that process, and
/// keeps it for every item it runs; a recycled process builds a fresh
/// one; a process that ends drops it.
async fn a_resource_is_built_once_per_worker_process_and_again_after_recycling() {
    let dir = tempfile::tempdir().unwrap();
    let options = ProcessOptions::new()
        .recycle_after(10)
        .env(DIR_VAR, dir.path());
    let (results, returned) = run_bound("res", stage("res", 2), numbered(0..60), |b, name| {
        b.process_stage_using(name, open_counter, count_item, options)
    })
    .await;
    assert!(results.values().all(|r| r.success), "{results:?}");
    let by_pid = served_by_pid(&returned);
    for (pid, served) in &by_pid {
        // One resource served each of the process's items, in turn.
        let expected: Vec<u64> = (1..=served.len() as u64).collect();
        assert_eq!(served, &expected, "worker process {pid}");
        assert!(served.len() <= 10, "worker process {pid} was not recycled");
    }
    assert!(by_pid.len() >= 6, "{} worker processes", by_pid.len());
    // Every process ended normally (recycled, or at the end of the run)
    // and dropped its resource there.
    for (pid, served) in &by_pid {
        let mark = dir.path().join(format!("dropped-{pid}"));
        let dropped = std::fs::read_to_string(&mark)
            .unwrap_or_else(|e| panic!("worker process {pid} did not drop its resource: {e}"));
        assert_eq!(dropped, served.len().to_string(), "worker process {pid}");
    }
}

/// A resource that cannot be built: each worker process that tries tells
/// the parent and exits, the item its worker was about to run fails with
/// the stage and the constructor's error, and the replacements count
/// against the restart budget, which fails the run; every item ends once.
async fn a_resource_that_cannot_be_built_fails_the_run_naming_the_stage() {
    let budget = RestartBudget::new(3, Duration::from_secs(60));
    let config = PipelineConfig::new("nores", vec![stage("nores", 2).restart_budget(budget)])
        .stats_interval(Duration::ZERO);
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(0..200u64))
        .process_stage_using(
            "nores-stage",
            refuse_to_connect,
            count_item,
            ProcessOptions::new(),
        )
        .build()
        .unwrap();
    let outcome = pipeline.run_outcome().await;
    let error = outcome.error.expect("the run fails");
    println!("    {error}");
    assert!(
        matches!(&error, PipelineError::RestartBudgetExceeded { stage, .. } if stage == "nores-stage"),
        "{error}"
    );
    let admitted = pipeline.stats().await.unwrap().admitted_items;
    assert!(admitted > 0);
    assert_eq!(
        outcome.results.len() as u64,
        admitted,
        "every admitted item has one outcome"
    );
    let ids: std::collections::BTreeSet<_> = outcome.results.iter().map(|r| &r.job_id).collect();
    assert_eq!(ids.len(), outcome.results.len(), "no item finished twice");
    let failed: Vec<&ItemError> = outcome
        .results
        .iter()
        .filter_map(|r| r.error.as_deref())
        .filter(|e| e.kind != ItemErrorKind::Cancelled)
        .collect();
    assert!(!failed.is_empty() && failed.len() <= 8, "{failed:?}");
    for e in failed {
        assert_eq!(e.kind, ItemErrorKind::Panicked, "{e}");
        assert_eq!(e.stage, "nores-stage");
        assert!(
            e.message.contains(
                "stage `nores-stage`: its per-worker resource could not be built: \
                 connecting: no database at db://nowhere"
            ),
            "{e}"
        );
    }
    assert!(outcome.results.iter().all(|r| !r.success));
    no_children_left().await;

    // Without a budget the run goes on, each item failing in turn: it
    // ends, and nothing waits for a resource that never comes.
    let config =
        PipelineConfig::new("nores2", vec![stage("nores2", 2)]).stats_interval(Duration::ZERO);
    let results = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(0..6u64))
        .process_stage_using(
            "nores2-stage",
            refuse_to_connect,
            count_item,
            ProcessOptions::new(),
        )
        .build()
        .unwrap()
        .run()
        .await
        .unwrap();
    assert_eq!(results.len(), 6);
    for r in &results {
        let e = r.error.as_ref().expect("failed");
        assert!(e.message.contains("could not be built: connecting"), "{e}");
    }
    no_children_left().await;
}

/// A batch stage's batch crosses whole, with its items' ids; a bad record
/// fails alone, and the rest of its batch completes.
async fn a_process_batch_with_one_bad_record_fails_only_that_record() {
    let stage = stage("bad", 2).batch(10, Duration::from_secs(10));
    let ran = run_bound("bad", stage, numbered(0..30), |b, name| {
        b.process_batch_stage(name, double_batch)
    })
    .await;
    only_these_failed(&ran, 13..14, ItemErrorKind::Failed, &["record 13 is bad"]);
    let e = ran.0[&13].error.as_ref().unwrap();
    assert!(!e.message.contains("its batch"), "{e}");
}

/// Every item numbered in `failed` failed with `kind` and a message that
/// holds each of `needles`; every other item doubled its number.
fn only_these_failed(
    (results, returned): &(BTreeMap<u64, WorkItemResult>, BTreeMap<u64, u64>),
    failed: std::ops::Range<u64>,
    kind: ItemErrorKind,
    needles: &[&str],
) {
    for (n, r) in results {
        if failed.contains(n) {
            let e = r.error.as_ref().expect("it failed");
            assert_eq!(e.kind, kind, "{e}");
            for needle in needles {
                assert!(e.message.contains(needle), "{e}");
            }
        } else {
            assert!(r.success, "{n}: {:?}", r.error);
            assert_eq!(returned[n], 2 * n);
        }
    }
}

/// A batch handler's error fails its whole batch, each item with a result
/// of its own; the other batches complete.
async fn a_process_batch_handler_error_fails_the_whole_batch() {
    let stage = stage("whole", 2).batch(10, Duration::from_secs(10));
    let ran = run_bound("whole", stage, numbered(1030..1060), |b, name| {
        b.process_batch_stage(name, double_batch)
    })
    .await;
    let needles = ["its batch of 10 failed", "the batch holding 1042"];
    only_these_failed(&ran, 1040..1050, ItemErrorKind::Failed, &needles);
}

/// A worker process that aborts in a batch fails that batch's items, each
/// with its own result; the process is replaced and the batches after it
/// complete.
async fn a_worker_process_aborting_mid_batch_fails_that_batch_and_the_stage_goes_on() {
    let stage = stage("midbatch", 1).batch(10, Duration::from_secs(10));
    let ran = run_bound("midbatch", stage, numbered(2000..2040), |b, name| {
        b.process_batch_stage(name, double_batch)
    })
    .await;
    let needles = ["its batch of 10 failed", "SIGABRT"];
    only_these_failed(&ran, 2020..2030, ItemErrorKind::ProcessDied, &needles);
}

/// A batch whose worker process died is tried again whole under the
/// stage's retry policy (the batch is had again from the bytes sent), in a
/// new process, with its items' ids and data.
async fn a_process_batch_is_retried_whole_in_a_new_process() {
    let dir = tempfile::tempdir().unwrap();
    let stage = stage("batchretry", 1)
        .batch(10, Duration::from_secs(10))
        .retry(RetryPolicy::fixed(2, Duration::from_millis(10)));
    let options = ProcessOptions::new().env(DIR_VAR, dir.path());
    let ran = run_bound("batchretry", stage, numbered(3070..3090), |b, name| {
        b.process_batch_stage_with(name, double_batch, options)
    })
    .await;
    assert!(
        dir.path().join("aborted").exists(),
        "the first attempt did not abort"
    );
    only_these_failed(&ran, 0..0, ItemErrorKind::Failed, &[]);
}

/// A batch stage with a resource per worker process: built once per
/// process, given to the handler with each batch.
async fn a_process_batch_stage_uses_one_resource_per_worker_process() {
    let stage = stage("batchres", 2).batch(5, Duration::from_secs(10));
    let (results, returned) = run_bound("batchres", stage, numbered(0..50), |b, name| {
        b.process_batch_stage_using(name, open_counter, count_batch, ProcessOptions::new())
    })
    .await;
    assert!(results.values().all(|r| r.success), "{results:?}");
    let by_pid = served_by_pid(&returned);
    assert!(by_pid.len() <= 2, "{by_pid:?}");
    for (pid, served) in &by_pid {
        // Each batch of 5 got the resource once: 5 items per count.
        let mut expected: Vec<u64> = (1..=(served.len() / 5) as u64)
            .flat_map(|b| [b; 5])
            .collect();
        expected.sort();
        assert_eq!(served, &expected, "worker process {pid}");
    }
}

/// `main` skips `process::init()` when given `--no-init`: a worker of a
/// batch stage with a resource then runs this test again up to the
/// builder's `process_batch_stage_using`, which serves the stage (it
/// recognises its constructor and handler).
async fn the_builder_serves_a_batch_stage_with_a_resource_without_init() {
    let stage = stage("noinitbatch", 2).batch(5, Duration::from_secs(10));
    let options = ProcessOptions::new().args(["--no-init", "the_builder_serves_a_batch_stage"]);
    let (results, returned) = run_bound("noinitbatch", stage, numbered(0..20), |b, name| {
        b.process_batch_stage_using(name, open_counter, count_batch, options)
    })
    .await;
    assert!(results.values().all(|r| r.success), "{results:?}");
    assert!(served_by_pid(&returned).len() <= 2);
}

// ---- the runner ----

static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

type Test = fn() -> Pin<Box<dyn Future<Output = ()>>>;

macro_rules! tests {
    ($($name:ident),* $(,)?) => {
        vec![$((stringify!($name), (|| Box::pin($name()) as Pin<Box<dyn Future<Output = ()>>>) as Test)),*]
    };
}

fn main() {
    // First: in a worker process this serves the stage and never returns.
    // (`--no-init` is for `the_builder_serves_when_init_was_not_called`.)
    if !std::env::args().any(|a| a == "--no-init") {
        bergtalzug::process::init();
    }
    // For `init_finds_the_handler_by_address`: a worker must not get here.
    if std::env::args().any(|a| a == "--init-must-serve") {
        std::process::exit(99);
    }
    // SAFETY: no other thread runs yet. For `the_environment_is_clean`.
    unsafe {
        std::env::set_var("BERGTALZUG_TEST_SECRET", "hunter2");
        std::env::set_var("PASSED_ON", "yes");
    }
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--hold-workers") {
        hold_workers(&args[i + 1]);
    }
    if args.iter().any(|a| a == "--print") {
        print_through();
    }
    if args.iter().any(|a| a == "--ctrl-c") {
        ctrl_c_parent();
    }
    tracing_subscriber::fmt()
        .with_writer(|| Capture)
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .init();
    let filters: Vec<String> = args
        .into_iter()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let tests: Vec<(&str, Test)> = tests![
        abort_fails_only_its_item,
        segfault_fails_only_its_item,
        exit_status_is_reported,
        a_death_while_items_are_being_sent_blames_the_right_item,
        sigkill_from_outside_fails_only_its_item,
        a_hang_past_the_timeout_is_killed,
        a_slow_item_within_the_timeout_completes,
        a_slow_item_holds_back_only_itself,
        a_panic_fails_only_its_item_and_keeps_the_process,
        errors_fail_their_item_with_the_message,
        a_panicking_serialize_fails_only_its_item,
        garbage_from_a_worker_fails_its_item_and_replaces_it,
        the_whole_item_crosses,
        job_ids_cross_unchanged,
        a_process_stage_splits_with_lineage,
        workers_are_recycled_after_n_items,
        the_environment_is_inherited_by_default,
        the_environment_is_clean,
        captured_worker_output_reaches_tracing,
        worker_output_reaches_the_parents_stdout_and_stderr,
        workers_that_cannot_start_fail_the_pipeline_once,
        a_crash_loop_of_worker_processes_trips_the_restart_budget,
        a_worker_that_forks_and_dies_fails_its_item_at_once,
        a_killed_worker_takes_its_children_with_it,
        run_returns_after_the_workers_are_reaped,
        workers_outlive_the_threads_that_started_them,
        workers_are_named_after_the_program_pipeline_and_stage,
        ctrl_c_stops_gracefully_and_spares_the_workers,
        retries_run_the_item_again_in_a_new_process,
        a_handler_sees_its_attempt_in_the_worker_process,
        stage_duration_leaves_out_the_retry_backoff,
        a_panicking_deserialize_of_a_reply_fails_only_its_item,
        init_finds_the_handler_by_address,
        the_builder_serves_when_init_was_not_called,
        workers_die_with_a_killed_parent,
        abort_leaves_no_worker_behind,
        a_resource_is_built_once_per_worker_process_and_again_after_recycling,
        a_resource_that_cannot_be_built_fails_the_run_naming_the_stage,
        a_process_batch_with_one_bad_record_fails_only_that_record,
        a_process_batch_handler_error_fails_the_whole_batch,
        a_worker_process_aborting_mid_batch_fails_that_batch_and_the_stage_goes_on,
        a_process_batch_is_retried_whole_in_a_new_process,
        a_process_batch_stage_uses_one_resource_per_worker_process,
        the_builder_serves_a_batch_stage_with_a_resource_without_init,
    ];
    let mut failed = Vec::new();
    let mut ran = 0;
    for (name, test) in tests {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(|| {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                match tokio::time::timeout(Duration::from_secs(60), test()).await {
                    Ok(()) => {}
                    Err(_) => panic!("timed out after 60 s"),
                }
            });
        });
        let took = started.elapsed();
        match outcome {
            Ok(()) => println!("test {name} ... ok ({took:.2?})"),
            Err(_) => {
                println!("test {name} ... FAILED ({took:.2?})");
                failed.push(name);
            }
        }
    }
    println!(
        "\ntest result: {}. {} passed; {} failed",
        if failed.is_empty() { "ok" } else { "FAILED" },
        ran - failed.len(),
        failed.len()
    );
    if !failed.is_empty() {
        println!("failed: {failed:?}");
        std::process::exit(1);
    }
}
