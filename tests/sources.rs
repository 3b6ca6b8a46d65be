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

/// A queue that hands out messages and records every acknowledgement.
struct AckingQueue {
    next: u64,
    end: u64,
    acks: std::sync::Arc<std::sync::Mutex<Vec<bergtalzug::Ack>>>,
}

impl Source for AckingQueue {
    type Item = u64;

    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<u64>>> {
        let end = self.end.min(self.next + count as u64);
        let items = (self.next..end)
            .map(|n| WorkItem::with_job_id(format!("msg-{n}"), n))
            .collect();
        self.next = end;
        Ok(items)
    }

    fn wants_acks(&self) -> bool {
        true
    }

    async fn ack(&mut self, outcomes: Vec<bergtalzug::Ack>) {
        // A slow acknowledgement (a network call) holds only the source.
        tokio::task::yield_now().await;
        self.acks.lock().unwrap().extend(outcomes);
    }
}

async fn acks_after(stop: Option<Duration>, abort: bool) {
    let acks = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let pipeline = Pipeline::builder(config(
        "acks",
        vec![
            StageConfig::new("a", ExecutionType::Async)
                .workers(3)
                .queue_size(16),
            StageConfig::new("b", ExecutionType::Thread)
                .workers(2)
                .queue_size(16),
        ],
    ))
    .unwrap()
    .source(AckingQueue {
        next: 0,
        end: 2_000,
        acks: acks.clone(),
    })
    .async_stage("a", |i: WorkItem<u64>| async move {
        tokio::time::sleep(Duration::from_micros(50)).await;
        if i.data.is_multiple_of(7) {
            anyhow::bail!("{} is a multiple of 7", i.data);
        }
        Ok(i)
    })
    .sync_stage("b", Ok)
    .build()
    .unwrap();
    pipeline.start().await.unwrap();
    if let Some(after) = stop {
        tokio::time::sleep(after).await;
        if abort {
            within(Duration::from_secs(10), pipeline.abort())
                .await
                .unwrap();
        } else {
            within(Duration::from_secs(10), pipeline.stop())
                .await
                .unwrap();
        }
    }
    let results = within(Duration::from_secs(30), pipeline.run())
        .await
        .unwrap();
    // Every admitted item is acknowledged once, with its own outcome,
    // before run() returns.
    let acks = acks.lock().unwrap();
    assert_eq!(acks.len(), results.len(), "stop {stop:?} abort {abort}");
    let by_id: std::collections::HashMap<_, _> =
        acks.iter().map(|a| (a.job_id.clone(), a)).collect();
    assert_eq!(by_id.len(), acks.len(), "an item was acknowledged twice");
    for r in &results {
        let ack = by_id.get(&r.job_id).expect("every result is acknowledged");
        assert_eq!(ack.is_success(), r.success);
        assert_eq!(ack.error, r.error);
    }
    if stop.is_none() {
        assert_eq!(acks.len(), 2_000);
        assert_eq!(acks.iter().filter(|a| !a.is_success()).count(), 286);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acking_source_hears_every_outcome_once_before_run_returns() {
    acks_after(None, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_pipeline_acknowledges_what_it_admitted() {
    acks_after(Some(Duration::from_millis(20)), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_pipeline_acknowledges_the_cancelled_items() {
    acks_after(Some(Duration::from_millis(20)), true).await;
}

/// An acking queue that panics in its `refill_panics`-th refill or in its
/// `ack_panics`-th ack (after it has recorded what it was told).
struct PanickingQueue {
    queue: AckingQueue,
    refills: u32,
    acks: u32,
    refill_panics: u32,
    ack_panics: u32,
}

impl Source for PanickingQueue {
    type Item = u64;

    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<u64>>> {
        self.refills += 1;
        assert!(self.refills != self.refill_panics, "refill bug");
        self.queue.refill(count.min(4)).await
    }

    fn wants_acks(&self) -> bool {
        true
    }

    async fn ack(&mut self, outcomes: Vec<bergtalzug::Ack>) {
        self.acks += 1;
        self.queue.ack(outcomes).await;
        assert!(self.acks != self.ack_panics, "ack bug");
    }
}

/// Every admitted item is acknowledged once, whatever the source does: a
/// panic in `refill` or in `ack` fails the run (`SourcePanicked`) but
/// still acknowledges every item it had admitted, before `run` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_source_still_acknowledges_every_admitted_item() {
    for (refill_panics, ack_panics) in [(3, 0), (0, 1), (0, 2)] {
        let acks = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let pipeline = Pipeline::builder(config(
            "panicking-queue",
            vec![
                StageConfig::new("a", ExecutionType::Async)
                    .workers(2)
                    .queue_size(4),
            ],
        ))
        .unwrap()
        .source(PanickingQueue {
            queue: AckingQueue {
                next: 0,
                end: 1_000,
                acks: acks.clone(),
            },
            refills: 0,
            acks: 0,
            refill_panics,
            ack_panics,
        })
        .async_stage("a", |i: WorkItem<u64>| async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok(i)
        })
        .build()
        .unwrap();
        let err = within(Duration::from_secs(10), pipeline.run())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, PipelineError::SourcePanicked { message, .. } if message.contains("bug")),
            "{err}"
        );
        let admitted = pipeline.stats().await.unwrap().admitted_items;
        assert!(admitted > 0);
        let acks = acks.lock().unwrap();
        let ids: std::collections::HashSet<_> = acks.iter().map(|a| a.job_id.clone()).collect();
        assert_eq!(ids.len(), acks.len(), "an item was acknowledged twice");
        assert_eq!(
            acks.len() as u64,
            admitted,
            "refill panics at {refill_panics}, ack at {ack_panics}"
        );
    }
}

/// An injection cut short by the input closing says how many of its items
/// were admitted (the first ones, in order); those, and only those, get
/// outcomes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injection_cut_short_says_which_items_got_in() {
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let pipeline = Pipeline::builder(config(
        "cut-short",
        vec![
            StageConfig::new("gate", ExecutionType::Async)
                .workers(1)
                .queue_size(10),
        ],
    ))
    .unwrap()
    .injected::<u64>()
    .async_stage("gate", move |i: WorkItem<u64>| {
        let g = g.clone();
        async move {
            g.acquire().await?.forget();
            Ok(i)
        }
    })
    .build()
    .unwrap();
    pipeline.start().await.unwrap();
    let injecting = tokio::spawn({
        let pipeline = pipeline.clone();
        async move {
            let items = (0..100u64)
                .map(|n| WorkItem::with_job_id(format!("job-{n}"), n))
                .collect();
            pipeline.inject(items).await
        }
    });
    // Room for 11 (queue 10 + 1 worker): the rest wait until the stop.
    while pipeline.stats().await.unwrap().admitted_items < 11 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stopping = tokio::spawn({
        let pipeline = pipeline.clone();
        async move { pipeline.stop().await }
    });
    let err = within(Duration::from_secs(10), injecting)
        .await
        .unwrap()
        .unwrap_err();
    gate.add_permits(100);
    within(Duration::from_secs(10), stopping)
        .await
        .unwrap()
        .unwrap();
    let results = pipeline.run().await.unwrap();
    let PipelineError::PartlyAdmitted {
        admitted, refused, ..
    } = err
    else {
        panic!("not a partial admission: {err}");
    };
    assert_eq!(admitted + refused, 100);
    assert_eq!(admitted, results.len());
    let mut ids: Vec<_> = results.iter().map(|r| r.job_id.to_string()).collect();
    ids.sort_by_key(|id| id[4..].parse::<u64>().unwrap());
    let first: Vec<_> = (0..admitted).map(|n| format!("job-{n}")).collect();
    assert_eq!(ids, first, "the first `admitted` items, in order");
}

/// Runs `source` through one pass-through stage.
async fn run_all<S: Source>(source: S) -> Vec<WorkItemResult>
where
    S::Item: Send + 'static,
{
    let pipeline = Pipeline::builder(config(
        "ready-made",
        vec![
            StageConfig::new("a", ExecutionType::Async)
                .workers(2)
                .queue_size(3),
        ],
    ))
    .unwrap()
    .source(source)
    .async_stage("a", |i: WorkItem<S::Item>| async move { Ok(i) })
    .build()
    .unwrap();
    within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap()
}

fn tree() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["2024/03", "2024/04", "empty", ".hidden"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    for file in [
        "top.json",
        "notes.txt",
        "2024/03/a.json",
        "2024/03/b.json",
        "2024/03/c.csv",
        "2024/04/d.json",
        ".hidden/e.json",
    ] {
        std::fs::write(dir.path().join(file), file).unwrap();
    }
    dir
}

fn ids(results: &[WorkItemResult]) -> Vec<String> {
    let mut ids: Vec<String> = results.iter().map(|r| r.job_id.to_string()).collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_files_of_a_directory_that_match_a_glob_each_become_an_item() {
    let dir = tree();
    let all = sources::files(dir.path(), "**/*.json").unwrap();
    // Counted first: the progress bar's total.
    assert_eq!(all.size_hint(), Some(5));
    let results = run_all(all).await;
    assert_eq!(
        ids(&results),
        [
            ".hidden/e.json",
            "2024/03/a.json",
            "2024/03/b.json",
            "2024/04/d.json",
            "top.json"
        ]
    );
    assert!(results.iter().all(|r| r.success));

    // `*` stays in one directory; a deeper pattern reaches only its depth.
    let top = sources::files(dir.path(), "*.json").unwrap();
    assert_eq!(top.size_hint(), Some(1));
    assert_eq!(ids(&run_all(top).await), ["top.json"]);
    let march = sources::files(dir.path(), "2024/03/*").unwrap();
    assert_eq!(march.size_hint(), Some(3));
    assert_eq!(
        ids(&run_all(march).await),
        ["2024/03/a.json", "2024/03/b.json", "2024/03/c.csv"]
    );
    let none = sources::files(dir.path().join("empty"), "**/*").unwrap();
    assert_eq!(none.size_hint(), Some(0));
    assert!(run_all(none).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_item_carries_the_path_to_read() {
    let dir = tree();
    let pipeline = Pipeline::builder(config(
        "read",
        vec![StageConfig::new("read", ExecutionType::Async).workers(2)],
    ))
    .unwrap()
    .source(sources::files(dir.path(), "2024/**/*.json").unwrap())
    .async_stage("read", |i: WorkItem<std::path::PathBuf>| async move {
        let text = tokio::fs::read_to_string(&i.data).await?;
        Ok(i.map(|_| text))
    })
    .build()
    .unwrap();
    let results = within(Duration::from_secs(10), pipeline.run())
        .await
        .unwrap();
    assert_eq!(
        ids(&results),
        ["2024/03/a.json", "2024/03/b.json", "2024/04/d.json"]
    );
    assert!(results.iter().all(|r| r.success), "{:?}", results[0].error);
}

#[test]
fn a_missing_directory_or_a_bad_glob_is_an_error_when_the_source_is_made() {
    let dir = tree();
    let missing = sources::files(dir.path().join("nope"), "*").unwrap_err();
    assert!(format!("{missing:#}").contains("nope"), "{missing:#}");
    let bad = sources::files(dir.path(), "a**").unwrap_err();
    assert!(format!("{bad:#}").contains("a**"), "{bad:#}");
    let file = sources::files(dir.path().join("top.json"), "*").unwrap_err();
    assert!(format!("{file:#}").contains("top.json"), "{file:#}");
    let missing = sources::lines(dir.path().join("nope.txt")).unwrap_err();
    assert!(format!("{missing:#}").contains("nope.txt"), "{missing:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lines_of_a_file_each_become_an_item_numbered_from_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("input.txt");
    // 10 lines, Windows endings on some, no newline after the last.
    let text: String = (1..=10)
        .map(|n| format!("line {n}{}", if n % 3 == 0 { "\r\n" } else { "\n" }))
        .collect::<String>()
        .trim_end()
        .to_string();
    std::fs::write(&path, text).unwrap();
    let source = sources::lines(&path).unwrap();
    assert_eq!(source.size_hint(), Some(10));
    let results = run_all(source).await;
    assert_eq!(results.len(), 10);
    let name = path.display().to_string();
    for r in &results {
        assert!(r.success);
        let n: u64 = r
            .job_id
            .to_string()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(r.job_id.to_string(), format!("{name}:{n}"));
        assert!((1..=10).contains(&n));
    }
    assert_unique_ids(&results);

    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let source = sources::lines(&empty).unwrap();
    assert_eq!(source.size_hint(), Some(0));
    assert!(run_all(source).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_that_is_not_text_is_reported_and_the_lines_after_it_follow() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.txt");
    std::fs::write(&path, b"one\ntwo\n\xff\xfe\nfour\n").unwrap();
    let mut source = sources::lines(&path).unwrap();
    assert_eq!(source.size_hint(), Some(4));
    let first = source.refill(10).await.unwrap();
    let data: Vec<_> = first.iter().map(|i| i.data.as_str()).collect();
    assert_eq!(data, ["one", "two"]);
    let err = source.refill(10).await.unwrap_err();
    assert!(err.to_string().contains("line 3"), "{err}");
    let rest = source.refill(10).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].data, "four");
    assert_eq!(
        rest[0].job_id().to_string(),
        format!("{}:4", path.display())
    );
    assert!(source.refill(10).await.unwrap().is_empty());
}

/// Not a test on its own: run by the next test in a child process whose
/// stdin it sets, it reads stdin through `sources::stdin_lines` and prints
/// what it got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_reader_in_a_child() {
    if std::env::var_os("BERGTALZUG_STDIN_CHILD").is_none() {
        return;
    }
    let source = sources::stdin_lines();
    let hint = source.size_hint();
    let results = run_all(source).await;
    let mut lines: Vec<String> = results.iter().map(|r| r.job_id.to_string()).collect();
    lines.sort();
    println!("HINT {hint:?}");
    println!("IDS {}", lines.join(","));
}

#[test]
fn the_lines_of_stdin_each_become_an_item() {
    use std::io::Write;
    use std::process::{Command, Stdio};

    let child = |stdin: Stdio| {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "stdin_reader_in_a_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("BERGTALZUG_STDIN_CHILD", "1")
            .stdin(stdin)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let report = |out: std::process::Output| {
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        // libtest prints the test's name before its output, on the same line.
        let after = |tag: &str| {
            let line = text.lines().find(|l| l.contains(tag)).expect(&text);
            line[line.find(tag).unwrap() + tag.len()..].to_string()
        };
        let (hint, ids) = (after("HINT "), after("IDS "));
        (hint, ids)
    };

    // From a file (`program < file`): counted, so a bar has a total.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.txt");
    std::fs::write(&path, "a\nb\nc\n").unwrap();
    let out = child(std::fs::File::open(&path).unwrap().into())
        .wait_with_output()
        .unwrap();
    assert_eq!(
        report(out),
        ("Some(3)".into(), "stdin:1,stdin:2,stdin:3".into())
    );

    // From a pipe: no count; read until the writer closes it.
    let mut piped = child(Stdio::piped());
    let mut stdin = piped.stdin.take().unwrap();
    stdin.write_all(b"x\ny\n").unwrap();
    drop(stdin);
    let out = piped.wait_with_output().unwrap();
    assert_eq!(report(out), ("None".into(), "stdin:1,stdin:2".into()));
}
