//! The consumer side of the SQLite queue: a run's leases, its outcomes
//! written with the next lease, and the isolation of suspects (items that
//! runs died with). The store itself is `sqlite.rs`.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde::de::DeserializeOwned;

use bergtalzug_actors::item::{ItemErrorKind, WorkItem};
use bergtalzug_actors::source::{Ack, AckFuture, Acknowledger, Refill, Source};

use super::{DeadItem, InFlight, QueueCounts};

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

/// The consumer side of a [`WorkQueue`]: each refill leases pending items;
/// outcomes are acknowledged on their own path (they never wait behind a
/// refill); items not admitted are released at once.
///
/// Acknowledgements are written in the next lease's transaction (one commit
/// for both: the fewer commits, the fewer fsyncs), or at once when nothing
/// else is in flight (the run is ending or idle), or when 1024 are waiting,
/// and at the latest [`MAX_UNSAVED_AGE`] after they came: a pipeline whose
/// every slot holds a slow item leases nothing, and what finished before
/// must not wait for them to be recorded (and seen from outside). So what
/// a crash can run again stays within the window: the items in the
/// pipeline plus those finished since the last lease, which freed the
/// room the next lease fills.
///
/// A run that dies takes every item it had in flight down with it, the
/// innocent with the poison. So an item that runs have died with
/// `max_deliveries - 1` times is a suspect: it is leased alone, once this
/// run has nothing else in flight, so that its last delivery counts
/// against it only if it is the one that kills the process.
pub(crate) struct LeaseSource<T> {
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
    /// A write of what is unsaved is due within [`MAX_UNSAVED_AGE`].
    write_due: AtomicBool,
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

/// Outcomes wait at most this long for a lease to write them with.
const MAX_UNSAVED_AGE: Duration = Duration::from_millis(200);

impl Consumer {
    fn take_unsaved(&self) -> Vec<Settle> {
        std::mem::take(&mut *self.unsaved.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Takes outcomes of the run's items: written at once when nothing
    /// else is in flight or many are waiting, else with the next lease or
    /// within [`MAX_UNSAVED_AGE`].
    async fn acknowledged(self: &Arc<Self>, outcomes: Vec<Settle>) {
        let n = outcomes.len();
        let waiting = {
            let mut unsaved = self.unsaved.lock().unwrap_or_else(|e| e.into_inner());
            unsaved.extend(outcomes);
            unsaved.len()
        };
        if self.in_flight.remove(n) == 0 {
            self.on_drained().await;
        } else if waiting >= MAX_UNSAVED {
            let settle = self.take_unsaved();
            self.save(settle).await;
        } else if !self.write_due.swap(true, Ordering::AcqRel) {
            // Written by a lease before then, or else by this. A weak
            // handle: the run ends (its lock file freed, what waits
            // written by its `Drop`) when the pipeline lets it go, not
            // when this wakes.
            let consumer = Arc::downgrade(self);
            tokio::spawn(async move {
                tokio::time::sleep(MAX_UNSAVED_AGE).await;
                let Some(consumer) = consumer.upgrade() else {
                    return;
                };
                // Cleared first: an outcome that comes after the take
                // below makes a write due again.
                consumer.write_due.store(false, Ordering::Release);
                let settle = consumer.take_unsaved();
                consumer.save(settle).await;
            });
        }
    }

    /// Nothing is in flight any more (the run is ending or idle): writes
    /// what waits, then wakes a wait for the drain (a suspect's lease).
    async fn on_drained(self: &Arc<Self>) {
        let settle = self.take_unsaved();
        self.save(settle).await;
        self.in_flight.drained.notify_waiters();
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

impl<T> std::fmt::Debug for LeaseSource<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseSource")
            .field("run", &self.consumer.run.id)
            .field("follow", &self.follow)
            .finish()
    }
}

impl<T> LeaseSource<T> {
    /// A run's source: `run` registered, `max_deliveries` as configured.
    pub(crate) fn new(
        store: Arc<dyn Store>,
        run: Run,
        follow: bool,
        max_deliveries: u32,
        pending_at_start: u64,
    ) -> Self {
        LeaseSource {
            consumer: Arc::new(Consumer {
                store,
                run,
                in_flight: InFlight::default(),
                unsaved: Mutex::new(Vec::new()),
                write_due: AtomicBool::new(false),
            }),
            follow,
            // With one delivery allowed there is no second chance to isolate.
            suspect_from: if max_deliveries >= 2 {
                max_deliveries - 1
            } else {
                u32::MAX
            },
            pending_at_start,
            _item: PhantomData,
        }
    }

    /// This run's id, as the `items.lease_owner` column shows it.
    pub(crate) fn run_id(&self) -> &str {
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

impl<T: DeserializeOwned + Send + 'static> Source for LeaseSource<T> {
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
            // Outcomes acknowledged while these were still counted in
            // flight wait for a write: this is the last one.
            self.consumer.on_drained().await;
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
        Box::pin(
            self.consumer
                .acknowledged(outcomes.into_iter().map(Settle::of).collect()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::QueueOptions;
    use crate::queue::sqlite::SqliteStore;

    /// When the items a run leased and did not admit are released last,
    /// the outcomes acknowledged while they were still in flight are
    /// written then: a run that ends so holds no lease (they used to wait
    /// for a lease that never came, until the run was dropped).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outcomes_acknowledged_before_the_last_release_are_written_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&path, &QueueOptions::default()).unwrap());
        let jobs = (0..3u64).map(|n| (format!("n{n}"), n.to_string()));
        assert_eq!(store.enqueue(jobs.collect()).unwrap(), 3);
        let run = store.register(3).unwrap();
        let mut source = LeaseSource::<u64>::new(store.clone(), run, false, 3, 3);
        let mut items = source.refill(3).await.unwrap();
        assert_eq!(items.len(), 3);
        let finished = items.remove(0);
        let done = Settle::Done(finished.job_id().to_string());
        source.consumer.acknowledged(vec![done]).await;
        source.release(items).await;
        let counts = store.counts().unwrap();
        assert_eq!(
            (counts.done, counts.pending, counts.leased),
            (1, 2, 0),
            "{counts:?}"
        );
    }
}
