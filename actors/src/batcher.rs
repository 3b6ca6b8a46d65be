//! The batcher: gathers a batch stage's items into batches, in front of it.
//!
//! - **Owns**: the batches being filled (one per key; a single one
//!   without a key) and the batches cut and waiting for the stage's demand.
//! - **Receives**: [`BatchMsg`]: `Connect` (from the root, through its
//!   stage's controls: where to ask for items), `Items` (from upstream,
//!   never more than it asked for), `Demand` (from its stage: room for
//!   batches), `Tick` (its timer), `InputClosed` (its watch task),
//!   `Abort` (the root).
//! - **Sends**: `Demand` upstream, `Batched` (a batch's items) to the
//!   tracker just before the batch goes to its stage, batches to its stage
//!   (never more than it asked for), cancellations to the tracker.
//! - **Supervised by**: the root, linked at spawn; stopped with the others.
//! - **Invariants** (after every message): it holds at most
//!   `4 * batch_size` items (held + asked for); a batch is cut when it is
//!   full, `batch_timeout` after its first item (one timer, for the
//!   earliest), when the batcher's room is full (the oldest batch), or at
//!   once once the input is closed, so no item waits for a batch that
//!   cannot fill.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::time::Instant;

use crate::item::{ItemError, ItemErrorKind, JobId, WorkItem, WorkItemResult};
use crate::ports::{Outlet, Upstream};
use crate::shape::Batch;
use crate::shared::Shared;
use crate::timers::Timers;
use crate::tracker::TrackerMsg;

/// A batcher holds at most this many batches' worth of items: with more
/// keys filling at once, the oldest batch is cut before it is full.
pub(crate) const BATCHER_ROOM: usize = crate::config::BATCHER_ROOM;

/// How an item's batch key is found: a hash of what the user's key
/// function returns.
pub(crate) type BatchKey<I> = Arc<dyn Fn(&WorkItem<I>) -> u64 + Send + Sync>;

/// Makes a [`BatchKey`] from a key function.
pub(crate) fn batch_key<I, K: std::hash::Hash>(
    key: impl Fn(&WorkItem<I>) -> K + Send + Sync + 'static,
) -> BatchKey<I> {
    Arc::new(move |item| {
        use std::hash::{BuildHasher, BuildHasherDefault};
        BuildHasherDefault::<rustc_hash::FxHasher>::default().hash_one(key(item))
    })
}

/// A batcher's mailbox.
pub(crate) enum BatchMsg<I> {
    /// From the root (through the stage's controls): where to ask for items.
    Connect(Arc<dyn Upstream>),
    /// From upstream: items, at most as many as it asked for.
    Items(Vec<WorkItem<I>>),
    /// From its stage: room for this many more batches.
    Demand(usize),
    /// From itself: the earliest batch may be due.
    Tick,
    /// From its watch task: no more items will be admitted.
    InputClosed,
    /// From the root: cancel every item held.
    Abort,
}

impl<I: Send + 'static> Outlet<I> for ActorRef<BatchMsg<I>> {
    fn send(&self, items: Vec<WorkItem<I>>) {
        let _ = self.cast(BatchMsg::Items(items));
    }
}

impl<I: Send + 'static> Upstream for ActorRef<BatchMsg<I>> {
    fn demand(&self, n: usize) {
        let _ = self.cast(BatchMsg::Demand(n));
    }
}

pub(crate) struct Batcher<I>(std::marker::PhantomData<fn(I)>);

impl<I> Batcher<I> {
    pub(crate) fn new() -> Self {
        Batcher(std::marker::PhantomData)
    }
}

pub(crate) struct BatcherArgs<I> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) index: usize,
    pub(crate) tracker: ActorRef<TrackerMsg>,
    /// The batch stage's inlet.
    pub(crate) stage: Arc<dyn Outlet<Batch<I>>>,
    pub(crate) key: Option<BatchKey<I>>,
}

/// A batch being filled.
struct Filling<I> {
    key: Option<u64>,
    items: Vec<WorkItem<I>>,
    due: Instant,
}

pub(crate) struct BatcherState<I> {
    shared: Arc<Shared>,
    index: usize,
    name: Arc<str>,
    tracker: ActorRef<TrackerMsg>,
    stage: Arc<dyn Outlet<Batch<I>>>,
    key: Option<BatchKey<I>>,
    size: usize,
    wait: Duration,
    upstream: Option<Arc<dyn Upstream>>,
    /// Oldest first.
    filling: VecDeque<Filling<I>>,
    ready: VecDeque<Batch<I>>,
    /// Items held (filling and ready).
    held: usize,
    /// Items asked for and not received.
    requested: usize,
    /// Batches the stage has room for.
    credit: usize,
    /// The batch ids made so far.
    made: u64,
    /// When the armed timer fires.
    armed: Option<Instant>,
    /// The wait timers (a batch's wait may be long), ended with the batcher.
    timers: Timers<BatchMsg<I>>,
    input_closed: bool,
    aborting: bool,
}

impl<I: Send + 'static> BatcherState<I> {
    fn room(&self) -> usize {
        self.size.saturating_mul(BATCHER_ROOM)
    }
}

impl<I: Send + 'static> Actor for Batcher<I> {
    type Msg = BatchMsg<I>;
    type State = BatcherState<I>;
    type Arguments = BatcherArgs<I>;

    async fn pre_start(
        &self,
        myself: ActorRef<BatchMsg<I>>,
        args: BatcherArgs<I>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let config = &args.shared.config.stages[args.index];
        let mut closed = args.shared.input_closed.subscribe();
        let me = myself.clone();
        tokio::spawn(async move {
            if closed.wait_for(|c| *c).await.is_ok() {
                let _ = me.cast(BatchMsg::InputClosed);
            }
        });
        Ok(BatcherState {
            name: args.shared.names[args.index].clone(),
            shared: args.shared.clone(),
            index: args.index,
            tracker: args.tracker,
            stage: args.stage,
            key: args.key,
            size: config.batch_size.unwrap_or(1).max(1),
            wait: config.batch_wait(),
            upstream: None,
            filling: VecDeque::new(),
            ready: VecDeque::new(),
            held: 0,
            requested: 0,
            credit: 0,
            made: 0,
            armed: None,
            timers: Timers::new(),
            input_closed: false,
            aborting: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<BatchMsg<I>>,
        message: BatchMsg<I>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            BatchMsg::Connect(upstream) => state.upstream = Some(upstream),
            BatchMsg::Items(items) => {
                state.requested = state.requested.saturating_sub(items.len());
                state.receive(items);
            }
            BatchMsg::Demand(n) => state.credit += n,
            BatchMsg::Tick => state.armed = None,
            BatchMsg::InputClosed => state.input_closed = true,
            BatchMsg::Abort => state.abort(),
        }
        state.pump(&myself);
        Ok(())
    }
}

impl<I: Send + 'static> BatcherState<I> {
    fn receive(&mut self, items: Vec<WorkItem<I>>) {
        self.shared.gauges[self.index].count_batch_items(|b| &b.admitted, items.len() as u64);
        if self.aborting {
            let results = items.into_iter().map(|i| self.cancelled(i)).collect();
            let _ = self.tracker.cast(TrackerMsg::Finished(results));
            return;
        }
        let now = Instant::now();
        for item in items {
            let key = self.key.as_ref().map(|k| k(&item));
            self.held += 1;
            match self.filling.iter_mut().find(|f| f.key == key) {
                Some(filling) => filling.items.push(item),
                None => self.filling.push_back(Filling {
                    key,
                    items: vec![item],
                    due: now + self.wait,
                }),
            }
            // A full batch is cut at once (and the next item of its key
            // starts a new one).
            if let Some(i) = self
                .filling
                .iter()
                .position(|f| f.key == key && f.items.len() >= self.size)
            {
                let full = self.filling.remove(i).expect("found above");
                self.ready.push_back(Batch {
                    items: full.items,
                    key: full.key,
                });
            }
        }
    }

    fn cancelled<T>(&self, item: WorkItem<T>) -> WorkItemResult {
        let (id, data, metadata) = item.into_parts();
        crate::contain::drop_logged(data, || format!("cancelled item {id}"));
        let mut error = ItemError::new(
            &*self.name,
            ItemErrorKind::Cancelled,
            "pipeline aborted while the item waited for its batch",
        );
        error.attempts = 0;
        WorkItemResult::failed(id, metadata, error)
    }

    fn abort(&mut self) {
        self.aborting = true;
        let filling = std::mem::take(&mut self.filling)
            .into_iter()
            .flat_map(|f| f.items);
        let ready = std::mem::take(&mut self.ready)
            .into_iter()
            .flat_map(|b| b.items);
        let results: Vec<_> = filling
            .chain(ready)
            .collect::<Vec<_>>()
            .into_iter()
            .map(|i| self.cancelled(i))
            .collect();
        self.held = 0;
        if !results.is_empty() {
            let _ = self.tracker.cast(TrackerMsg::Finished(results));
        }
    }

    /// Cuts the batches that are due, sends what the stage has room for,
    /// asks upstream for more, and sets the timer.
    fn pump(&mut self, myself: &ActorRef<BatchMsg<I>>) {
        if self.aborting {
            return;
        }
        let now = Instant::now();
        let mut i = 0;
        while i < self.filling.len() {
            if self.input_closed || self.filling[i].due <= now {
                let due = self.filling.remove(i).expect("in range");
                self.ready.push_back(Batch {
                    items: due.items,
                    key: due.key,
                });
            } else {
                i += 1;
            }
        }
        // A full room with no batch to send: the oldest goes now, so that
        // the batcher can take items again.
        if self.ready.is_empty()
            && self.held >= self.room()
            && let Some(oldest) = self.filling.pop_front()
        {
            self.ready.push_back(Batch {
                items: oldest.items,
                key: oldest.key,
            });
        }
        let n = self.credit.min(self.ready.len());
        if n > 0 {
            self.credit -= n;
            let mut batches = Vec::with_capacity(n);
            for batch in self.ready.drain(..n) {
                self.held -= batch.items.len();
                self.made += 1;
                let id = JobId::batch(&self.name, self.made);
                // Registered before the batch can fail.
                let _ = self.tracker.cast(TrackerMsg::Batched {
                    batch: id.clone(),
                    stage: self.index as u16,
                    members: batch.members(),
                });
                batches.push(WorkItem::with_job_id(id, batch));
            }
            self.stage.send(batches);
        }
        let wanted = self.held + self.requested;
        let free = self.room().saturating_sub(wanted);
        if free > 0
            && (free * 2 >= self.room() || wanted == 0)
            && let Some(upstream) = &self.upstream
        {
            self.requested += free;
            upstream.demand(free);
        }
        if let Some(due) = self.filling.iter().map(|f| f.due).min()
            && self.armed.is_none_or(|armed| due < armed)
        {
            self.armed = Some(due);
            let wait = due.saturating_duration_since(now);
            self.timers.after(myself, wait, || BatchMsg::Tick);
        }
    }
}

/// The controls of a batch stage: its stage's, with the batcher connected
/// upstream in its place and aborted beside it.
pub(crate) struct BatchControl<I> {
    pub(crate) stage: Box<dyn crate::ports::StageControl>,
    pub(crate) batcher: ActorRef<BatchMsg<I>>,
}

impl<I: Send + 'static> crate::ports::StageControl for BatchControl<I> {
    fn connect(&self, upstream: Arc<dyn Upstream>) {
        let _ = self.batcher.cast(BatchMsg::Connect(upstream));
    }

    fn abort(&self) {
        let _ = self.batcher.cast(BatchMsg::Abort);
        self.stage.abort();
    }

    fn cell(&self) -> ractor::ActorCell {
        self.stage.cell()
    }

    fn companions(&self) -> Vec<ractor::ActorCell> {
        let mut cells = self.stage.companions();
        cells.push(self.batcher.get_cell());
        cells
    }

    fn demand_port(&self) -> Arc<dyn Upstream> {
        self.stage.demand_port()
    }

    fn stall_port(&self) -> Arc<dyn crate::ports::StallCheck> {
        self.stage.stall_port()
    }

    fn set_rate_limit(
        &self,
        limit: Option<crate::config::RateLimit>,
        reply: ractor::RpcReplyPort<Result<(), crate::error::PipelineError>>,
    ) {
        self.stage.set_rate_limit(limit, reply);
    }

    fn resize(
        &self,
        workers: usize,
        reply: ractor::RpcReplyPort<Result<(), crate::error::PipelineError>>,
    ) {
        self.stage.resize(workers, reply);
    }
}
