//! Durable work: a job's items in a queue that outlives the process, so a
//! run that was killed is resumed by running the same program again.
//!
//! A [`WorkQueue`] is opened from a URL: `sqlite:PATH` (or a plain path),
//! a file on local disk through SQLite (feature `sqlite`), or
//! `redis://HOST:PORT/DB?stream=NAME`, a Redis stream consumed by a
//! consumer group, so that many processes on many hosts share one job
//! (feature `redis`; docs/scale-out.md). The same program moves from one
//! machine to many by changing the URL. The
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
//!
//! With SQLite:
//!
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
//! With Redis, the same at-least-once contract across machines: a lease is
//! a consumer group's pending entry, renewed while its consumer lives and
//! reclaimed by a peer when it goes idle (see the `redis_streams` notes in
//! docs/scale-out.md).
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
//! # if cfg!(not(feature = "sqlite")) { return Ok(()); }
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

#[cfg(feature = "sqlite")]
mod leased;
#[cfg(feature = "redis")]
mod redis_streams;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::path::Path;
#[cfg(feature = "sqlite")]
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use serde::de::DeserializeOwned;

use bergtalzug_actors::item::WorkItem;
use bergtalzug_actors::source::{Acknowledger, Refill, Source};

#[cfg(feature = "redis")]
pub use redis_streams::{BrokerStats, ResultSink};

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
    /// fails. Default 5 s. SQLite only.
    pub busy_timeout: Duration,
    /// This consumer's name in the Redis consumer group. Give each host (or
    /// each process slot on a host) a stable name: a consumer started again
    /// under its old name takes back its own pending entries first. Default
    /// (`None`): `HOSTNAME-PID-RANDOM`, new each run, so a restarted process's
    /// old entries wait for `claim_idle` like a dead peer's. Redis only.
    pub consumer: Option<String>,
    /// How long an entry must sit idle (not renewed) in another consumer's
    /// hands before a peer reclaims it (`XPENDING … IDLE`, `XCLAIM`); a
    /// consumer never claims its own entries. Default 30 s. Redis
    /// only.
    pub claim_idle: Duration,
    /// How often a consumer looks for idle entries to reclaim. Default 5 s.
    /// A dead consumer's work is taken over within `claim_idle +
    /// claim_every` of its last renewal. Redis only.
    pub claim_every: Duration,
    /// How often a consumer renews the lease of every entry it holds
    /// (including items waiting in stage buffers). Must be shorter than
    /// `claim_idle` (the rule: at most a third of it, so that two renewals
    /// can be late before a peer steals live work). Default 10 s.
    /// `Duration::ZERO` turns renewal off: only for showing what it
    /// prevents. Redis only.
    pub renew_every: Duration,
    /// How long one read waits for new entries on the server (`XREADGROUP
    /// BLOCK`) when there are none. Default 1 s. Redis only.
    pub read_block: Duration,
    /// How long a consumer keeps trying to write a batch of outcomes
    /// (acknowledgements, dead letters, releases) while Redis cannot take
    /// them, counted from the batch's first failure, before it gives up on
    /// that batch (the attempt under way when it passes still runs to its
    /// end: at most the connection's 10 s response timeout). Its entries stay pending in
    /// Redis under this consumer's name, so nothing is lost: a peer (or
    /// this consumer started again under its name) takes them back after
    /// `claim_idle` and runs them again. Counted in
    /// [`BrokerStats::acks_abandoned`]. Without a bound a run whose Redis
    /// never came back would never end. Default 60 s. Redis only.
    pub ack_timeout: Duration,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            max_deliveries: 3,
            durability: Durability::Full,
            follow: false,
            busy_timeout: Duration::from_secs(5),
            consumer: None,
            claim_idle: Duration::from_secs(30),
            claim_every: Duration::from_secs(5),
            renew_every: Duration::from_secs(10),
            read_block: Duration::from_secs(1),
            ack_timeout: Duration::from_secs(60),
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

    /// Sets [`consumer`](QueueOptions::consumer).
    pub fn consumer(mut self, name: impl Into<String>) -> Self {
        self.consumer = Some(name.into());
        self
    }

    /// Sets [`claim_idle`](QueueOptions::claim_idle).
    pub fn claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle;
        self
    }

    /// Sets [`claim_every`](QueueOptions::claim_every).
    pub fn claim_every(mut self, every: Duration) -> Self {
        self.claim_every = every;
        self
    }

    /// Sets [`renew_every`](QueueOptions::renew_every).
    pub fn renew_every(mut self, every: Duration) -> Self {
        self.renew_every = every;
        self
    }

    /// Sets [`read_block`](QueueOptions::read_block).
    pub fn read_block(mut self, block: Duration) -> Self {
        self.read_block = block;
        self
    }

    /// Sets [`ack_timeout`](QueueOptions::ack_timeout).
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
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
    /// How many runs took it (with Redis: how many times the entry was
    /// delivered to a consumer that ran it).
    pub deliveries: u32,
    /// Its payload as enqueued (JSON).
    pub payload: String,
}
/// A durable queue of work items, opened by URL (see the [module](self)).
#[derive(Clone)]
pub struct WorkQueue {
    backend: Backend,
    options: QueueOptions,
    url: String,
}

/// Where the queue lives.
#[derive(Clone)]
enum Backend {
    #[cfg(feature = "sqlite")]
    Sqlite(Arc<dyn leased::Store>),
    #[cfg(feature = "redis")]
    Redis(redis_streams::Broker),
}

impl std::fmt::Debug for WorkQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkQueue")
            .field("url", &self.url)
            .field("options", &self.options)
            .finish()
    }
}

/// The schemes this build knows, for errors.
const SCHEMES: &str = match (cfg!(feature = "sqlite"), cfg!(feature = "redis")) {
    (true, true) => "sqlite:PATH and redis://HOST:PORT/DB?stream=NAME",
    (true, false) => "sqlite:PATH (redis:// needs the feature redis)",
    _ => "redis://HOST:PORT/DB?stream=NAME (sqlite: needs the feature sqlite)",
};

impl WorkQueue {
    /// Opens (creating if need be) the queue at `url`: `sqlite:PATH`,
    /// `sqlite://PATH` or a plain file path (feature `sqlite`), or
    /// `redis://[USER:PASSWORD@]HOST:PORT[/DB]?stream=NAME[&group=GROUP]`
    /// (feature `redis`: the stream `NAME` and its keys `NAME:*`, consumed
    /// by the group `GROUP`, default `bergtalzug`). A Redis queue connects
    /// at its first operation, not here.
    ///
    /// # Errors
    ///
    /// An unknown scheme, `max_deliveries` of 0, a Redis URL without a
    /// stream or with options that contradict each other (the error names
    /// the option), or a file that cannot be opened or is not a queue (the
    /// error names the file).
    pub fn open(url: &str, options: QueueOptions) -> anyhow::Result<Self> {
        anyhow::ensure!(
            options.max_deliveries >= 1,
            "queue option max_deliveries must be at least 1 (got 0)"
        );
        let backend = match url.split_once(':') {
            #[cfg(feature = "redis")]
            Some(("redis", _)) => Backend::Redis(redis_streams::Broker::open(url, &options)?),
            Some(("rediss", _)) => anyhow::bail!(
                "work queue URL {url:?}: TLS (rediss://) is not supported; use redis:// on a trusted network"
            ),
            Some(("sqlite", rest)) => {
                Self::open_sqlite(url, rest.strip_prefix("//").unwrap_or(rest), &options)?
            }
            Some((scheme, _)) if scheme.len() > 1 && !url.starts_with('/') => {
                anyhow::bail!(
                    "work queue URL {url:?}: unknown scheme {scheme:?} (this build knows {SCHEMES})"
                )
            }
            _ => Self::open_sqlite(url, url, &options)?,
        };
        Ok(WorkQueue {
            backend,
            options,
            url: url.to_string(),
        })
    }

    #[cfg(feature = "sqlite")]
    fn open_sqlite(_url: &str, path: &str, options: &QueueOptions) -> anyhow::Result<Backend> {
        Ok(Backend::Sqlite(Arc::new(sqlite::SqliteStore::open(
            Path::new(path),
            options,
        )?)))
    }

    #[cfg(not(feature = "sqlite"))]
    fn open_sqlite(url: &str, _path: &str, _options: &QueueOptions) -> anyhow::Result<Backend> {
        anyhow::bail!(
            "work queue URL {url:?}: a SQLite queue needs the feature sqlite (this build knows {SCHEMES})"
        )
    }

    /// Adds items with their job ids; an id already in the queue (in any
    /// state) is skipped, so enqueuing a job again is harmless. Returns how
    /// many were new. One transaction with SQLite; with Redis, atomic per
    /// batch of 1000 (a producer that dies midway enqueues again).
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
        match &self.backend {
            #[cfg(feature = "sqlite")]
            Backend::Sqlite(store) => blocking(store, move |store| store.enqueue(rows)).await,
            #[cfg(feature = "redis")]
            Backend::Redis(broker) => broker.enqueue(rows).await,
        }
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

    /// Seals a batch job: nothing more will be enqueued, so consumers
    /// without [`follow`](QueueOptions::follow) end once nothing is left
    /// undelivered and no consumer holds entries. With Redis a batch
    /// consumer waits for the seal (the producer may still be enqueuing);
    /// with SQLite a run without `follow` ends when nothing is pending, and
    /// sealing changes nothing.
    ///
    /// # Errors
    ///
    /// The store failing.
    pub async fn seal(&self) -> anyhow::Result<()> {
        match &self.backend {
            #[cfg(feature = "sqlite")]
            Backend::Sqlite(_) => Ok(()),
            #[cfg(feature = "redis")]
            Backend::Redis(broker) => broker.seal().await,
        }
    }

    /// The consumer side: a [`Source`] of the queue's pending items, as
    /// `T` (each payload deserialised; one that does not fit goes to the
    /// dead letters). With SQLite it registers a run: the leases of runs
    /// that died are released first. With Redis it joins the consumer
    /// group under [`consumer`](QueueOptions::consumer) (at its first
    /// refill): its own pending entries first, then entries idle in dead
    /// peers' hands, then new ones.
    ///
    /// # Errors
    ///
    /// The store failing.
    pub fn source<T: DeserializeOwned + Send + 'static>(&self) -> anyhow::Result<QueueSource<T>> {
        let inner = match &self.backend {
            #[cfg(feature = "sqlite")]
            Backend::Sqlite(store) => {
                let run = store.register(self.options.max_deliveries)?;
                let pending = store.counts()?.pending;
                Inner::Sqlite(leased::LeaseSource::new(
                    store.clone(),
                    run,
                    self.options.follow,
                    self.options.max_deliveries,
                    pending,
                ))
            }
            #[cfg(feature = "redis")]
            Backend::Redis(broker) => Inner::Redis(broker.source()),
        };
        Ok(QueueSource { inner })
    }

    /// How many items are pending, leased, done and dead, now. With Redis,
    /// `pending` is what no consumer has been given yet, and `leased` the
    /// consumer group's pending entries (delivered, not acknowledged).
    ///
    /// # Errors
    ///
    /// The store failing.
    pub async fn counts(&self) -> anyhow::Result<QueueCounts> {
        match &self.backend {
            #[cfg(feature = "sqlite")]
            Backend::Sqlite(store) => blocking(store, |store| store.counts()).await,
            #[cfg(feature = "redis")]
            Backend::Redis(broker) => broker.counts().await,
        }
    }

    /// The dead letters, in the order they died.
    ///
    /// # Errors
    ///
    /// The store failing.
    pub async fn dead_letters(&self) -> anyhow::Result<Vec<DeadItem>> {
        match &self.backend {
            #[cfg(feature = "sqlite")]
            Backend::Sqlite(store) => blocking(store, |store| store.dead_letters()).await,
            #[cfg(feature = "redis")]
            Backend::Redis(broker) => broker.dead_letters().await,
        }
    }

    /// This process's broker counters (claimed, redelivered,
    /// dead-lettered, lease renewals, ack batches, errors), summed over the
    /// sources this queue made. `None` for SQLite, which has no broker.
    #[cfg(feature = "redis")]
    pub fn broker_stats(&self) -> Option<BrokerStats> {
        match &self.backend {
            #[cfg(feature = "sqlite")]
            Backend::Sqlite(_) => None,
            Backend::Redis(broker) => Some(broker.stats()),
        }
    }

    /// A sink that keeps one result per job id, written once: the first
    /// write of a job id wins and later ones (a redelivered item run
    /// again) are told they were duplicates. Redis: a hash `STREAM:results:NAME`.
    ///
    /// # Errors
    ///
    /// The queue is not on Redis (a SQLite job writes its results keyed by
    /// job id in a table of its own: see examples/resume.rs).
    #[cfg(feature = "redis")]
    pub fn result_sink(&self, name: &str) -> anyhow::Result<ResultSink> {
        match &self.backend {
            #[cfg(feature = "sqlite")]
            Backend::Sqlite(_) => anyhow::bail!(
                "result_sink({name:?}): the queue {} is SQLite; its results belong in a table keyed by job id (see examples/resume.rs)",
                self.url
            ),
            Backend::Redis(broker) => Ok(broker.result_sink(name)),
        }
    }
}

#[cfg(feature = "sqlite")]
async fn blocking<R: Send + 'static>(
    store: &Arc<dyn leased::Store>,
    f: impl FnOnce(&dyn leased::Store) -> anyhow::Result<R> + Send + 'static,
) -> anyhow::Result<R> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&*store))
        .await
        .context("a work queue operation panicked")?
}

/// The consumer side of a [`WorkQueue`]: a [`Source`] whose outcomes are
/// acknowledged on their own path (they never wait behind a refill) and
/// whose items not admitted are released at once.
///
/// With SQLite, acknowledgements are written in the next lease's
/// transaction (one commit for both), or at once when nothing else is in
/// flight or 1024 are waiting; an item that runs died with
/// `max_deliveries - 1` times is a suspect, leased alone once nothing else
/// is in flight, so that its last delivery counts against it only if it is
/// the one that kills the process. With Redis, the same isolation of
/// suspects; acknowledgements are batched on a connection of their own;
/// see docs/scale-out.md.
pub struct QueueSource<T> {
    inner: Inner<T>,
}

enum Inner<T> {
    #[cfg(feature = "sqlite")]
    Sqlite(leased::LeaseSource<T>),
    #[cfg(feature = "redis")]
    Redis(redis_streams::RedisSource<T>),
}

impl<T> std::fmt::Debug for QueueSource<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueSource")
            .field("run", &self.run_id())
            .finish()
    }
}

impl<T> QueueSource<T> {
    /// This run's id: with SQLite as the `items.lease_owner` column shows
    /// it; with Redis the consumer's name in the group.
    pub fn run_id(&self) -> &str {
        match &self.inner {
            #[cfg(feature = "sqlite")]
            Inner::Sqlite(s) => s.run_id(),
            #[cfg(feature = "redis")]
            Inner::Redis(s) => s.consumer_name(),
        }
    }
}

impl<T: DeserializeOwned + Send + 'static> Source for QueueSource<T> {
    type Item = T;

    /// Takes up to `count` pending items; none left: exhausted.
    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<T>>> {
        match self.fetch(count).await? {
            Refill::Items(items) => Ok(items),
            _ => Ok(Vec::new()),
        }
    }

    /// Takes up to `count` items (never more), suspects one at a time when
    /// nothing else is in flight. None left: exhausted, or "nothing yet"
    /// with `follow` (with Redis, also while a batch job is not sealed or
    /// other consumers still hold entries).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: with SQLite a lease is one transaction; with Redis
    /// entries a dropped read had been given stay in this consumer's
    /// pending list, are not renewed, and are released when the source is
    /// dropped (or reclaimed after `claim_idle`).
    async fn fetch(&mut self, count: usize) -> anyhow::Result<Refill<T>> {
        match &mut self.inner {
            #[cfg(feature = "sqlite")]
            Inner::Sqlite(s) => s.fetch(count).await,
            #[cfg(feature = "redis")]
            Inner::Redis(s) => s.fetch(count).await,
        }
    }

    fn size_hint(&self) -> Option<u64> {
        match &self.inner {
            #[cfg(feature = "sqlite")]
            Inner::Sqlite(s) => s.size_hint(),
            #[cfg(feature = "redis")]
            Inner::Redis(_) => None,
        }
    }

    fn acknowledger(&mut self) -> Option<Box<dyn Acknowledger>> {
        match &mut self.inner {
            #[cfg(feature = "sqlite")]
            Inner::Sqlite(s) => s.acknowledger(),
            #[cfg(feature = "redis")]
            Inner::Redis(s) => Some(s.acknowledger()),
        }
    }

    /// Gives back the items that were not admitted (refused duplicates, or
    /// beyond the demand at close) at once, their delivery not counted.
    async fn release(&mut self, unadmitted: Vec<WorkItem<T>>) {
        match &mut self.inner {
            #[cfg(feature = "sqlite")]
            Inner::Sqlite(s) => s.release(unadmitted).await,
            #[cfg(feature = "redis")]
            Inner::Redis(s) => s.release(unadmitted).await,
        }
    }
}

/// How many of its leased items a run has not been told the outcome of;
/// a wait for it to reach zero.
#[derive(Default)]
pub(crate) struct InFlight {
    count: std::sync::atomic::AtomicUsize,
    pub(crate) drained: tokio::sync::Notify,
}

impl InFlight {
    pub(crate) fn add(&self, n: usize) {
        self.count.fetch_add(n, std::sync::atomic::Ordering::AcqRel);
    }

    /// `n` more told (saturating: injected items are acked too); returns
    /// how many are left. Wakes `drained` at zero.
    pub(crate) fn remove(&self, n: usize) -> usize {
        use std::sync::atomic::Ordering;
        let before = self
            .count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                Some(c.saturating_sub(n))
            })
            .unwrap_or(0);
        before.saturating_sub(n)
    }

    pub(crate) async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            if self.count.load(std::sync::atomic::Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}
