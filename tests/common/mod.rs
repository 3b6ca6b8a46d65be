//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bergtalzug::prelude::*;

/// The tasks alive in the current tokio runtime: a pipeline's actors and
/// timers are tasks, so a count that does not fall back shows one left
/// behind.
pub fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Fails the test if `fut` takes longer than `limit`: a hang is a failure.
pub async fn within<F: Future>(limit: Duration, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {limit:?}: the pipeline hung"),
    }
}

/// Every result has a distinct job id.
pub fn assert_unique_ids(results: &[WorkItemResult]) {
    let ids: HashSet<_> = results.iter().map(|r| r.job_id.clone()).collect();
    assert_eq!(ids.len(), results.len(), "a job id finished twice");
}

/// A stage config without the periodic stats log.
pub fn config(name: &str, stages: Vec<StageConfig>) -> PipelineConfig {
    PipelineConfig::new(name, stages).stats_interval(Duration::ZERO)
}

/// What a [`CountingSource`] saw.
#[derive(Debug, Default)]
pub struct SourceLog {
    /// Every `refill(count)` call's count.
    pub asked: Mutex<Vec<usize>>,
    /// Items handed out so far.
    pub handed_out: AtomicU64,
}

/// Hands out `0..end` as `u64` items, recording every call.
pub struct CountingSource {
    pub next: u64,
    pub end: u64,
    pub log: Arc<SourceLog>,
    /// Called before each refill with (count, handed out so far).
    pub probe: Option<Box<dyn FnMut(usize, u64) + Send>>,
}

impl CountingSource {
    pub fn new(end: u64) -> (Self, Arc<SourceLog>) {
        let log = Arc::new(SourceLog::default());
        (
            CountingSource {
                next: 0,
                end,
                log: log.clone(),
                probe: None,
            },
            log,
        )
    }
}

impl Source for CountingSource {
    type Item = u64;

    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<u64>>> {
        let handed = self.log.handed_out.load(Ordering::SeqCst);
        if let Some(probe) = self.probe.as_mut() {
            probe(count, handed);
        }
        self.log.asked.lock().unwrap().push(count);
        let end = self.end.min(self.next + count as u64);
        let items: Vec<_> = (self.next..end).map(WorkItem::new).collect();
        self.next = end;
        self.log
            .handed_out
            .fetch_add(items.len() as u64, Ordering::SeqCst);
        Ok(items)
    }
}

/// Counts live values: `Tracked::new` increments, drop decrements, and the
/// peak is kept.
#[derive(Debug, Default)]
pub struct Census {
    live: AtomicUsize,
    peak: AtomicUsize,
}

impl Census {
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }
}

/// A value counted by a [`Census`] while it lives.
#[derive(Debug)]
pub struct Tracked {
    pub value: u64,
    census: Arc<Census>,
}

impl Tracked {
    pub fn new(value: u64, census: &Arc<Census>) -> Self {
        let live = census.live.fetch_add(1, Ordering::SeqCst) + 1;
        census.peak.fetch_max(live, Ordering::SeqCst);
        Tracked {
            value,
            census: census.clone(),
        }
    }
}

/// A copy is a live value too (a retrying stage keeps one per attempt).
impl Clone for Tracked {
    fn clone(&self) -> Self {
        Tracked::new(self.value, &self.census)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.census.live.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Completion callback counting outcomes.
#[derive(Debug, Default)]
pub struct Outcomes {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
}

impl Outcomes {
    pub fn total(&self) -> u64 {
        self.ok.load(Ordering::SeqCst) + self.failed.load(Ordering::SeqCst)
    }
    pub fn callback(self: &Arc<Self>) -> impl Fn(&WorkItemResult) + Send + Sync + 'static {
        let me = self.clone();
        move |r| {
            if r.success {
                me.ok.fetch_add(1, Ordering::SeqCst);
            } else {
                me.failed.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// A writer that keeps everything written to it: for checking log and
/// progress output. Clones share the buffer.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }

    /// Everything written so far, line by line.
    pub fn lines(&self) -> Vec<String> {
        self.text().lines().map(str::to_string).collect()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The runner of a `harness = false` test file: runs each test whose name
/// contains one of the command line's filters (every test without one),
/// its panic contained, prints a line per test and libtest's summary line,
/// and exits 1 if any failed.
pub fn run_tests(tests: &[(&str, fn())]) {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let mut failed = Vec::new();
    let mut ran = 0;
    for &(name, test) in tests {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        let started = std::time::Instant::now();
        match std::panic::catch_unwind(test) {
            Ok(()) => println!("test {name} ... ok ({:.2?})", started.elapsed()),
            Err(_) => {
                println!("test {name} ... FAILED ({:.2?})", started.elapsed());
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
        std::process::exit(1);
    }
}
