//! Durable work: a job's items in a queue that outlives the process, so a
//! run that was killed is resumed by running the same program again.
//!
//! A [`WorkQueue`] is opened from a URL; today `sqlite:PATH` (or a plain
//! path), a file on local disk through SQLite (feature `sqlite`). The
//! producer side enqueues items with their job ids
//! ([`enqueue`](WorkQueue::enqueue), [`enqueue_lines`](WorkQueue::enqueue_lines));
//! the consumer side is a [`Source`]: [`WorkQueue::source`].
//!
//! - An item is **leased** when the pipeline takes it, and leaves the queue
//!   only when acknowledged with its final outcome: a success is marked
//!   `done`; a final failure is marked `dead` and written to the
//!   `dead_letters` table with its error, stage and attempts in the same
//!   transaction; a cancelled item (a `stop()`) is released, `pending`
//!   again. Each batch of acknowledgements is one transaction.
//! - A run holds a lock file while it consumes. When a consumer opens, the
//!   leases of runs whose lock is free (the process died) are released, so
//!   the new run resumes where the dead one stopped; an item that was
//!   leased [`max_deliveries`](QueueOptions::max_deliveries) times by runs
//!   that died with it (a poison item that kills the process) goes to the
//!   dead letters without running again.
//! - Delivery is at least once: a crash can run again at most the items in
//!   flight, the pipeline's window Σ(`queue_size` + `workers`). A sink
//!   keyed by job id (an upsert) then holds each result once.
//! - [`WorkQueue::counts`] reads pending, leased, done and dead from
//!   anywhere while a job runs; `sqlite3 FILE` shows the same tables.
//!
//! See `docs/durable-work.md` for the tables, the durability setting and
//! its measured cost. Long runs should use `retain_results(false)`: the
//! queue, not the pipeline's memory, is the record of what finished.
//!
//! ```
//! use bergtalzug::prelude::*;
//! use bergtalzug::queue::{QueueOptions, WorkQueue};
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> anyhow::Result<()> {
//! let dir = tempfile::tempdir()?;
//! let url = format!("sqlite:{}", dir.path().join("job.db").display());
//! let queue = WorkQueue::open(&url, QueueOptions::default())?;
//! queue.enqueue((0..100u64).map(|n| (format!("n-{n}"), n))).await?;
//!
//! let config = PipelineConfig::new("double", vec![StageConfig::new("double", ExecutionType::Async)])
//!     .retain_results(false);
//! let pipeline = Pipeline::builder(config)?
//!     .source(queue.source::<u64>()?)
//!     .async_stage("double", |i: WorkItem<u64>| async move { Ok(i.map(|n| n * 2)) })
//!     .build()?;
//! pipeline.run().await?;
//! let counts = queue.counts().await?;
//! assert_eq!((counts.done, counts.pending, counts.leased), (100, 0, 0));
//! # Ok(()) }
//! ```

mod sqlite;

use std::marker::PhantomData;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use serde::de::DeserializeOwned;

use bergtalzug_actors::item::{ItemErrorKind, WorkItem};
use bergtalzug_actors::source::{Ack, AckFuture, Acknowledger, Refill, Source};

/// How hard a commit holds on to what it wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// Every commit is on disk before it returns (SQLite `synchronous =
    /// FULL`, an fsync per commit): nothing acknowledged is lost, even to a
    /// power cut. The default.
    #[default]
    Full,
    /// A commit survives the process being killed, not the machine losing
    /// power or the OS crashing (SQLite `synchronous = NORMAL` in WAL mode):
    /// after a power cut the last commits may be lost, so their items run
    /// again (still at least once). Cheaper: see docs/durable-work.md.
    Normal,
}

/// The options of a [`WorkQueue`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct QueueOptions {
    /// How many runs may take an item and die with it before it goes to
    /// the dead letters without running again. Default 3; at least 1.
    pub max_deliveries: u32,
    /// Whether commits are synced to disk. Default [`Durability::Full`].
    pub durability: Durability,
    /// Whether the source waits for new items when the queue is empty
    /// (`true`: answers "nothing yet" and asks again every
    /// `queue_refresh_rate`, so the run goes on until stopped) or ends
    /// the run (`false`, the default: a job that is enqueued first).
    pub follow: bool,
    /// How long a writer waits for another's lock on the file before it
    /// fails. Default 5 s.
    pub busy_timeout: Duration,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            max_deliveries: 3,
            durability: Durability::Full,
            follow: false,
            busy_timeout: Duration::from_secs(5),
        }
    }
}

impl QueueOptions {
    /// Sets [`max_deliveries`](QueueOptions::max_deliveries).
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = n;
        self
    }

    /// Sets [`durability`](QueueOptions::durability).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Sets [`follow`](QueueOptions::follow).
    pub fn follow(mut self, follow: bool) -> Self {
        self.follow = follow;
        self
    }
}

/// A job's progress: how many items are in each state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueCounts {
    /// Waiting to be taken.
    pub pending: u64,
    /// Taken by a run, no outcome yet.
    pub leased: u64,
    /// Finished successfully.
    pub done: u64,
    /// Failed for good, in the dead letters.
    pub dead: u64,
}

impl QueueCounts {
    /// Every item the queue holds.
    pub fn total(&self) -> u64 {
        self.pending + self.leased + self.done + self.dead
    }
}

/// One entry of the dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadItem {
    /// The item's job id.
    pub job_id: String,
    /// The stage it failed in (`queue` for a poison item never run again).
    pub stage: String,
    /// The kind of failure, as [`ItemErrorKind`] displays it, or
    /// `max deliveries` for a poison item.
    pub kind: String,
    /// The error message.
    pub error: String,
    /// How many times its last stage ran its handler on it.
    pub attempts: u32,
    /// How many runs took it.
    pub deliveries: u32,
    /// Its payload as enqueued (JSON).
    pub payload: String,
}

/// What an acknowledgement does to an item's row.
#[derive(Debug, Clone)]
pub(crate) enum Settle {
    Done(String),
    Release(String),
    Dead {
        job_id: String,
        stage: String,
        kind: String,
        error: String,
        attempts: u32,
    },
}

impl Settle {
    fn of(ack: Ack) -> Self {
        let job_id = ack.job_id.to_string();
        match ack.error {
            None => Settle::Done(job_id),
            Some(e) if e.kind == ItemErrorKind::Cancelled => Settle::Release(job_id),
            Some(e) => Settle::Dead {
                job_id,
                stage: e.stage,
                kind: e.kind.to_string(),
                error: e.message,
                attempts: e.attempts,
            },
        }
    }
}

/// Which pending items a lease takes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Pick {
    /// Those taken by fewer than `suspect_from` runs that died with them.
    Clean { suspect_from: u32 },
    /// One suspect: taken by at least `suspect_from` runs that died.
    OneSuspect { suspect_from: u32 },
}

/// What a lease took: (job id, payload) each; when it took nothing,
/// whether suspects are waiting to run alone.
#[derive(Debug, Default)]
pub(crate) struct Leased {
    pub(crate) items: Vec<(String, String)>,
    pub(crate) suspects_waiting: bool,
}

/// A backend: the blocking operations on the queue's store, called off the
/// async threads. One invariant: a row leaves `leased` only by its run's
/// settle or release, or when its run is found dead.
pub(crate) trait Store: Send + Sync + 'static {
    /// Adds the items whose job id is new; returns how many were.
    fn enqueue(&self, items: Vec<(String, String)>) -> anyhow::Result<u64>;
    /// Registers a consumer run: releases the leases of dead runs (and
    /// dead-letters those leased `max_deliveries` times).
    fn register(&self, max_deliveries: u32) -> anyhow::Result<Run>;
    /// Records `settle` (as [`settle`](Store::settle) does), then leases
    /// up to `count` pending items to `run` as `pick` says: one transaction.
    fn lease(
        &self,
        run: &str,
        settle: &[Settle],
        count: usize,
        pick: Pick,
    ) -> anyhow::Result<Leased>;
    /// Records outcomes of items leased by `run`, in one transaction.
    fn settle(&self, run: &str, outcomes: &[Settle]) -> anyhow::Result<()>;
    /// How many items are in each state.
    fn counts(&self) -> anyhow::Result<QueueCounts>;
    /// The dead letters, oldest first.
    fn dead_letters(&self) -> anyhow::Result<Vec<DeadItem>>;
}

/// A consumer run: its id, and what keeps it alive to other runs (its lock
/// file, held while this lives).
pub(crate) struct Run {
    pub(crate) id: String,
    pub(crate) _lock: Box<dyn Send + Sync>,
}

/// A durable queue of work items, opened by URL (see the [module](self)).
#[derive(Clone)]
pub struct WorkQueue {
    store: Arc<dyn Store>,
    options: QueueOptions,
    url: String,
}

impl std::fmt::Debug for WorkQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkQueue")
            .field("url", &self.url)
            .field("options", &self.options)
            .finish()
    }
}

impl WorkQueue {
    /// Opens (creating if need be) the queue at `url`: `sqlite:PATH`,
    /// `sqlite://PATH` or a plain file path.
    ///
    /// # Errors
    ///
    /// An unknown scheme, `max_deliveries` of 0, or a file that cannot be
    /// opened or is not a queue (the error names the file).
    pub fn open(url: &str, options: QueueOptions) -> anyhow::Result<Self> {
        anyhow::ensure!(
            options.max_deliveries >= 1,
            "queue option max_deliveries must be at least 1 (got 0)"
        );
        let path = match url.split_once(':') {
            Some(("sqlite", rest)) => rest.strip_prefix("//").unwrap_or(rest),
            Some((scheme, _)) if scheme.len() > 1 && !url.starts_with('/') => {
                anyhow::bail!(
                    "work queue URL {url:?}: unknown scheme {scheme:?} (this build knows sqlite:PATH)"
                )
            }
            _ => url,
        };
        let store = sqlite::SqliteStore::open(Path::new(path), &options)?;
        Ok(WorkQueue {
            store: Arc::new(store),
            options,
            url: url.to_string(),
        })
    }

    /// Adds items with their job ids; an id already in the queue (in any
    /// state) is skipped, so enqueuing a job again is harmless. Returns how
    /// many were new. One transaction.
    ///
    /// # Errors
    ///
    /// An item that cannot be serialised as JSON, or the store failing.
    pub async fn enqueue<I, K, T>(&self, items: I) -> anyhow::Result<u64>
    where
        I: IntoIterator<Item = (K, T)>,
        K: Into<String>,
        T: Serialize,
    {
        let rows = items
            .into_iter()
            .map(|(id, data)| {
                let id = id.into();
                let payload = serde_json::to_string(&data)
                    .with_context(|| format!("cannot serialise the item {id}"))?;
                Ok((id, payload))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        self.blocking(move |store| store.enqueue(rows)).await
    }

    /// Adds each line of a text file as a `String` item, with the job id
    /// `PATH:N` (N from one), as [`sources::lines`](crate::sources::lines)
    /// numbers them. Returns how many were new.
    ///
    /// # Errors
    ///
    /// The file cannot be read or is not UTF-8 (naming the file and line).
    pub async fn enqueue_lines(&self, path: impl AsRef<Path>) -> anyhow::Result<u64> {
        let path = path.as_ref();
        let text = tokio::fs::read_to_string(path)
            .await
            .with_context(|| format!("cannot read {} as text", path.display()))?;
        let name = path.display().to_string();
        let items: Vec<_> = text
            .lines()
            .enumerate()
            .map(|(i, line)| (format!("{name}:{}", i + 1), line.to_string()))
            .collect();
        self.enqueue(items).await
    }

    /// The consumer side: a [`Source`] of the queue's pending items, as
    /// `T` (each payload deserialised; one that does not fit goes to the
    /// dead letters). Registers a run: the leases of runs that died are
    /// released first.
    ///
    /// # Errors
    ///
    /// The store failing.
    pub fn source<T: DeserializeOwned + Send + 'static>(&self) -> anyhow::Result<QueueSource<T>> {
        let max = self.options.max_deliveries;
        let run = self.store.register(max)?;
        let pending = self.store.counts()?.pending;
        Ok(QueueSource {
            consumer: Arc::new(Consumer {
                store: self.store.clone(),
                run,
                in_flight: InFlight::default(),
                unsaved: Mutex::new(Vec::new()),
            }),
            follow: self.options.follow,
            // With one delivery allowed there is no second chance to isolate.
            suspect_from: if max >= 2 { max - 1 } else { u32::MAX },
            pending_at_start: pending,
            _item: PhantomData,
        })
    }

    /// How many items are pending, leased, done and dead, now.
    ///
    /// # Errors
    ///
    /// The store failing.
    pub async fn counts(&self) -> anyhow::Result<QueueCounts> {
        self.blocking(|store| store.counts()).await
    }

    /// The dead letters, in the order they died.
    ///
    /// # Errors
    ///
    /// The store failing.
    pub async fn dead_letters(&self) -> anyhow::Result<Vec<DeadItem>> {
        self.blocking(|store| store.dead_letters()).await
    }

    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> anyhow::Result<R> + Send + 'static,
    ) -> anyhow::Result<R> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&*store))
            .await
            .context("a work queue operation panicked")?
    }
}

/// The consumer side of a [`WorkQueue`]: each refill leases pending items;
/// outcomes are acknowledged on their own path (they never wait behind a
/// refill); items not admitted are released at once.
///
/// Acknowledgements are written in the next lease's transaction (one commit
/// for both: the fewer commits, the fewer fsyncs), or at once when nothing
/// else is in flight (the run is ending or idle), or when 1024 are waiting.
/// So what a crash can run again stays within the window: the items in
/// the pipeline plus those finished since the last lease, which freed the
/// room the next lease fills.
///
/// A run that dies takes every item it had in flight down with it, the
/// innocent with the poison. So an item that runs have died with
/// `max_deliveries - 1` times is a suspect: it is leased alone, once this
/// run has nothing else in flight, so that its last delivery counts
/// against it only if it is the one that kills the process.
pub struct QueueSource<T> {
    consumer: Arc<Consumer>,
    follow: bool,
    /// Deliveries (by runs that died) from which an item runs alone.
    suspect_from: u32,
    pending_at_start: u64,
    _item: PhantomData<fn() -> T>,
}

/// What a run's source and acknowledger share.
struct Consumer {
    store: Arc<dyn Store>,
    run: Run,
    in_flight: InFlight,
    /// Outcomes acknowledged and not yet written.
    unsaved: Mutex<Vec<Settle>>,
}

impl Drop for Consumer {
    /// Writes what is still waiting (normally nothing: the last outcome of
    /// a run, with nothing else in flight, is written at once).
    fn drop(&mut self) {
        let settle = self.take_unsaved();
        if settle.is_empty() {
            return;
        }
        if let Err(e) = self.store.settle(&self.run.id, &settle) {
            tracing::error!(target: "bergtalzug::queue",
                "could not record the outcome of {} items at the end of the run: {e:#}; \
                 they run again in the next run", settle.len());
        }
    }
}

/// Outcomes waiting beyond this many are written without waiting for a lease.
const MAX_UNSAVED: usize = 1024;

impl Consumer {
    fn take_unsaved(&self) -> Vec<Settle> {
        std::mem::take(&mut *self.unsaved.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Writes `settle` now, off the async threads; a failure is logged
    /// (the items stay leased and the next run takes them again).
    async fn save(self: &Arc<Self>, settle: Vec<Settle>) {
        if settle.is_empty() {
            return;
        }
        let n = settle.len();
        let consumer = self.clone();
        let outcome =
            tokio::task::spawn_blocking(move || consumer.store.settle(&consumer.run.id, &settle))
                .await;
        if let Ok(Err(e)) | Err(e) = outcome.map_err(anyhow::Error::from) {
            tracing::error!(target: "bergtalzug::queue",
                "could not record the outcome of {n} items: {e:#}; they stay leased \
                 and run again in the next run");
        }
    }
}

impl<T> std::fmt::Debug for QueueSource<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueSource")
            .field("run", &self.consumer.run.id)
            .field("follow", &self.follow)
            .finish()
    }
}

impl<T> QueueSource<T> {
    /// This run's id, as the `items.lease_owner` column shows it.
    pub fn run_id(&self) -> &str {
        &self.consumer.run.id
    }

    /// Writes the outcomes waiting and leases, in one transaction.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: the transaction runs on a blocking thread, to its end;
    /// if this future is gone by then, what it leased is released at once.
    async fn lease(&self, count: usize, pick: Pick) -> anyhow::Result<(Vec<WorkItem<T>>, bool)>
    where
        T: DeserializeOwned + Send + 'static,
    {
        let consumer = self.consumer.clone();
        let mut taken = tokio::task::spawn_blocking(move || {
            let settle = consumer.take_unsaved();
            match consumer.store.lease(&consumer.run.id, &settle, count, pick) {
                Ok(leased) => Ok(Taken {
                    consumer,
                    leased: Some(leased),
                }),
                Err(e) => {
                    // Not written: kept for the next try.
                    consumer
                        .unsaved
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend(settle);
                    Err(e)
                }
            }
        })
        .await
        .context("leasing from the work queue panicked")??;
        // From here on nothing awaits: the items are this run's.
        let Leased {
            items: rows,
            suspects_waiting,
        } = taken.leased.take().unwrap_or_default();
        let mut items = Vec::with_capacity(rows.len());
        let mut unfit = Vec::new();
        for (id, payload) in rows {
            match serde_json::from_str::<T>(&payload) {
                Ok(data) => items.push(WorkItem::with_job_id(id, data)),
                Err(e) => unfit.push(Settle::Dead {
                    job_id: id,
                    stage: "queue".into(),
                    kind: "unreadable payload".into(),
                    error: format!("the payload does not deserialise as the item type: {e}"),
                    attempts: 0,
                }),
            }
        }
        if !unfit.is_empty() {
            self.consumer
                .unsaved
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(unfit);
        }
        self.consumer.in_flight.add(items.len());
        Ok((items, suspects_waiting))
    }
}

/// A lease's items on their way to the source: released if they never get
/// there (the refill was dropped while its transaction ran).
struct Taken {
    consumer: Arc<Consumer>,
    leased: Option<Leased>,
}

impl Drop for Taken {
    fn drop(&mut self) {
        let Some(leased) = self.leased.take() else {
            return;
        };
        if leased.items.is_empty() {
            return;
        }
        let release: Vec<_> = leased
            .items
            .into_iter()
            .map(|(id, _)| Settle::Release(id))
            .collect();
        // On a blocking thread (where the task's output is dropped) or
        // at worst briefly on an async one.
        if let Err(e) = self.consumer.store.settle(&self.consumer.run.id, &release) {
            tracing::error!(target: "bergtalzug::queue",
                "could not release {} items of a dropped refill: {e:#}; the next run does",
                release.len());
        }
    }
}

impl<T: DeserializeOwned + Send + 'static> Source for QueueSource<T> {
    type Item = T;

    /// Leases up to `count` pending items; none left: exhausted.
    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<T>>> {
        match self.fetch(count).await? {
            Refill::Items(items) => Ok(items),
            _ => Ok(Vec::new()),
        }
    }

    /// Leases up to `count` pending items, suspects one at a time when
    /// nothing else is in flight (waiting here for that: acks do not wait
    /// behind it). None left: exhausted, or "nothing yet" with `follow`.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a lease is one transaction, and the wait holds nothing.
    async fn fetch(&mut self, count: usize) -> anyhow::Result<Refill<T>> {
        let suspect_from = self.suspect_from;
        loop {
            let (items, suspects_waiting) = self.lease(count, Pick::Clean { suspect_from }).await?;
            if !items.is_empty() {
                return Ok(Refill::Items(items));
            }
            if !suspects_waiting {
                return Ok(if self.follow {
                    Refill::NothingYet
                } else {
                    Refill::Exhausted
                });
            }
            self.consumer.in_flight.drained().await;
            let (items, _) = self.lease(1, Pick::OneSuspect { suspect_from }).await?;
            if !items.is_empty() {
                return Ok(Refill::Items(items));
            }
        }
    }

    fn size_hint(&self) -> Option<u64> {
        (!self.follow).then_some(self.pending_at_start)
    }

    fn acknowledger(&mut self) -> Option<Box<dyn Acknowledger>> {
        Some(Box::new(QueueAcknowledger {
            consumer: self.consumer.clone(),
        }))
    }

    /// Releases the leases of items that were not admitted (refused
    /// duplicates, or beyond the demand at close) at once: pending again,
    /// their delivery not counted.
    async fn release(&mut self, unadmitted: Vec<WorkItem<T>>) {
        let settle: Vec<_> = unadmitted
            .iter()
            .map(|i| Settle::Release(i.job_id().to_string()))
            .collect();
        self.consumer.save(settle).await;
        if self.consumer.in_flight.remove(unadmitted.len()) == 0 {
            self.consumer.in_flight.drained.notify_waiters();
        }
    }
}

/// Takes a run's outcomes: written with the next lease, or at once when
/// nothing else is in flight or many are waiting.
struct QueueAcknowledger {
    consumer: Arc<Consumer>,
}

impl Acknowledger for QueueAcknowledger {
    fn ack(&mut self, outcomes: Vec<Ack>) -> AckFuture<'_> {
        Box::pin(async move {
            let n = outcomes.len();
            let waiting = {
                let mut unsaved = self
                    .consumer
                    .unsaved
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                unsaved.extend(outcomes.into_iter().map(Settle::of));
                unsaved.len()
            };
            let idle = self.consumer.in_flight.remove(n) == 0;
            if idle || waiting >= MAX_UNSAVED {
                let settle = self.consumer.take_unsaved();
                self.consumer.save(settle).await;
            }
            if idle {
                self.consumer.in_flight.drained.notify_waiters();
            }
        })
    }
}

/// How many of its leased items a run has not been told the outcome of;
/// a wait for it to reach zero.
#[derive(Default)]
struct InFlight {
    count: std::sync::atomic::AtomicUsize,
    drained: tokio::sync::Notify,
}

impl InFlight {
    fn add(&self, n: usize) {
        self.count.fetch_add(n, std::sync::atomic::Ordering::AcqRel);
    }

    /// `n` more told (saturating: injected items are acked too); returns
    /// how many are left. Wakes `drained` at zero.
    fn remove(&self, n: usize) -> usize {
        use std::sync::atomic::Ordering;
        let before = self
            .count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                Some(c.saturating_sub(n))
            })
            .unwrap_or(0);
        before.saturating_sub(n)
    }

    async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            if self.count.load(std::sync::atomic::Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}
