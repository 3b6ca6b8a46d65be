//! The splitter: draws the children of a split stage's items, as the next
//! stage asks for them.
//!
//! - **Owns**: the parents its stage finished (each with its children not
//!   drawn yet: an iterator, a stream, or a vector), the children drawn and
//!   waiting for the next stage's demand.
//! - **Receives**: [`SplitMsg`]: `Connect` (its stage, where it asks for
//!   parents), `Items` (parents, from its stage, never more than it asked
//!   for), `Demand` (from the next stage), `Drawn` (a draw's chunk, from
//!   the task that drew it), `Wake` (itself, while its budget is full),
//!   `Abort` (the root, through its stage's controls).
//! - **Sends**: `Demand` to its stage, `Items` (children) to the next stage,
//!   never more than it asked for, and to the tracker: `Derived` (the ids
//!   of children, before they leave), `Retired` (a parent whose split
//!   ended), `Ended` (the own result of a parent that made children: its
//!   draw panicked, or an abort), results (filtered parents, children that
//!   failed, the children themselves when its stage is the last).
//! - **Supervised by**: the root (spawned linked to it, before its stage,
//!   which sends into it); stopped with the other children at the end.
//! - **Invariants** (after every message): one draw at a time, from the
//!   oldest parent; it draws no more children than the next stage has room
//!   for, and never more than its budget of live children (children made
//!   here and not yet finished: `StageGauges::derived_live`, which the
//!   tracker lowers), so a parent with a million children holds at most
//!   the budget of them in the pipeline at once. Every parent ends once:
//!   `Retired` after its last `Derived`, or its own result (filtered,
//!   panicked while drawing, cancelled).

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::item::{ItemError, ItemErrorKind, JobId, WorkItem, WorkItemMetadata, WorkItemResult};
use crate::ports::{Outlet, Upstream};
use crate::shape::{Children, Draw, FILTERED, IntoChildren, PARENT_ID, derived_id};
use crate::shared::Shared;
use crate::tracker::TrackerMsg;

/// At most this many children are drawn at once.
const CHUNK: usize = 1024;
/// While its budget of live children is full, the splitter looks again
/// this often.
const BUDGET_POLL: Duration = Duration::from_millis(1);

/// A splitter's mailbox: parents of type `P`, children of type `O`.
pub(crate) enum SplitMsg<P, O> {
    /// From the binding, once both are spawned: its stage, to ask for parents.
    Connect(Arc<dyn Upstream>),
    /// From its stage: parents, at most as many as it asked for.
    Items(Vec<WorkItem<P>>),
    /// From the next stage: room for this many more children.
    Demand(usize),
    /// From a draw's task: the chunk drawn.
    Drawn(Drawn<O>),
    /// From itself: the budget of live children may have room.
    Wake,
    /// From the root: cancel every parent held and the children drawn.
    Abort,
}

/// A chunk of children, and what is left to draw.
pub(crate) struct Drawn<O> {
    children: Vec<anyhow::Result<O>>,
    /// The rest; `None` when the draw ended.
    rest: Option<Draw<O>>,
    /// The draw panicked (the message): the parent's split ends there.
    panic: Option<String>,
}

impl<P: Send + 'static, O: Send + 'static> Outlet<P> for ActorRef<SplitMsg<P, O>> {
    fn send(&self, items: Vec<WorkItem<P>>) {
        let _ = self.cast(SplitMsg::Items(items));
    }
}

impl<P: Send + 'static, O: Send + 'static> Upstream for ActorRef<SplitMsg<P, O>> {
    fn demand(&self, n: usize) {
        let _ = self.cast(SplitMsg::Demand(n));
    }
}

/// Where the children go.
pub(crate) enum Next<O> {
    Stage(Arc<dyn Outlet<O>>),
    /// The split stage is the last: its children are results.
    Tracker,
}

pub(crate) struct Splitter<P, O>(std::marker::PhantomData<fn(P) -> O>);

impl<P, O> Splitter<P, O> {
    pub(crate) fn new() -> Self {
        Splitter(std::marker::PhantomData)
    }
}

pub(crate) struct SplitterArgs<O> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) index: usize,
    pub(crate) tracker: ActorRef<TrackerMsg>,
    pub(crate) next: Next<O>,
}

/// A parent whose children are being drawn.
struct Parent<O> {
    id: JobId,
    metadata: WorkItemMetadata,
    /// Children drawn so far (the next child's index).
    drawn: u64,
    /// What is left to draw; `None` while a draw is out.
    draw: Option<Draw<O>>,
}

pub(crate) struct SplitterState<O> {
    shared: Arc<Shared>,
    index: usize,
    stage: u16,
    name: Arc<str>,
    tracker: ActorRef<TrackerMsg>,
    next: Next<O>,
    upstream: Option<Arc<dyn Upstream>>,
    parents: VecDeque<Parent<O>>,
    /// Parents asked for and not received.
    requested: usize,
    /// Parents it holds at most.
    room: usize,
    /// Room downstream.
    credit: usize,
    outbox: VecDeque<WorkItem<O>>,
    /// A draw is out (on a task or a blocking thread).
    drawing: bool,
    /// Live children at most (see the module's invariants).
    budget: usize,
    wake_armed: bool,
    aborting: bool,
}

impl<P, O> Actor for Splitter<P, O>
where
    P: IntoChildren<Child = O>,
    O: Send + 'static,
{
    type Msg = SplitMsg<P, O>;
    type State = SplitterState<O>;
    type Arguments = SplitterArgs<O>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: SplitterArgs<O>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let stages = &args.shared.config.stages;
        let config = &stages[args.index];
        // The room of the stages after it (its own, when it is the last).
        let after: usize = stages[args.index + 1..].iter().map(|s| s.item_room()).sum();
        Ok(SplitterState {
            index: args.index,
            stage: args.index as u16,
            name: args.shared.names[args.index].clone(),
            tracker: args.tracker,
            next: args.next,
            upstream: None,
            parents: VecDeque::new(),
            requested: 0,
            room: config.workers.max(2),
            credit: 0,
            outbox: VecDeque::new(),
            drawing: false,
            budget: after.max(config.item_room()).max(1),
            wake_armed: false,
            aborting: false,
            shared: args.shared,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SplitMsg::Connect(upstream) => state.upstream = Some(upstream),
            SplitMsg::Items(parents) => {
                state.requested = state.requested.saturating_sub(parents.len());
                state.receive(parents);
            }
            SplitMsg::Demand(n) => state.credit += n,
            SplitMsg::Drawn(drawn) => {
                state.drawing = false;
                state.drawn(drawn);
            }
            SplitMsg::Wake => state.wake_armed = false,
            SplitMsg::Abort => state.abort(),
        }
        state.pump(&myself);
        Ok(())
    }
}

impl<O: Send + 'static> SplitterState<O> {
    fn receive<P: IntoChildren<Child = O>>(&mut self, parents: Vec<WorkItem<P>>) {
        for parent in parents {
            let (id, data, metadata) = parent.into_parts();
            if self.aborting {
                let result = self.cancelled(id, metadata);
                let _ = self.tracker.cast(TrackerMsg::Finished(vec![result]));
                crate::contain::drop_logged(data, || "a parent cancelled by an abort".into());
                continue;
            }
            let Children(draw) = data.into_children();
            if let Draw::Members(members) = &draw {
                // A batch's outcomes: its items are done in the batch stage.
                let failed = members.as_slice().iter().filter(|m| m.2.is_err()).count();
                let gauges = &self.shared.gauges[self.index];
                gauges.count_batch_items(|b| &b.processed, (members.len() - failed) as u64);
                gauges.count_batch_items(|b| &b.failed, failed as u64);
            }
            self.parents.push_back(Parent {
                id,
                metadata,
                drawn: 0,
                draw: Some(draw),
            });
        }
    }

    fn cancelled(&self, id: JobId, metadata: WorkItemMetadata) -> WorkItemResult {
        let mut error = ItemError::new(
            &*self.name,
            ItemErrorKind::Cancelled,
            "pipeline aborted while its children were being drawn",
        );
        error.attempts = metadata.attempts();
        WorkItemResult::failed(id, metadata, error)
    }

    fn abort(&mut self) {
        self.aborting = true;
        let mut results: Vec<WorkItemResult> = Vec::new();
        // Parents that made children: final nodes of their families.
        let mut ended = Vec::new();
        let mut unbatched = Vec::new();
        for parent in std::mem::take(&mut self.parents) {
            match parent.draw {
                // A batch some of whose items went on already: the rest
                // are cancelled one by one (a cancelled batch would cancel
                // them all).
                Some(Draw::Members(rest)) => {
                    for (id, metadata, outcome) in rest {
                        crate::contain::drop_logged(outcome, || format!("cancelled item {id}"));
                        results.push(self.cancelled(id, metadata));
                    }
                    unbatched.push(parent.id);
                }
                _ if parent.drawn > 0 => ended.push(self.cancelled(parent.id, parent.metadata)),
                _ => results.push(self.cancelled(parent.id, parent.metadata)),
            }
        }
        for child in std::mem::take(&mut self.outbox) {
            let (id, data, metadata) = child.into_parts();
            crate::contain::drop_logged(data, || format!("cancelled item {id}"));
            results.push(self.cancelled(id, metadata));
        }
        if !results.is_empty() {
            let _ = self.tracker.cast(TrackerMsg::Finished(results));
        }
        if !ended.is_empty() {
            let _ = self.tracker.cast(TrackerMsg::Ended(ended));
        }
        for batch in unbatched {
            let _ = self.tracker.cast(TrackerMsg::Unbatched(batch));
        }
    }

    fn pump<P: IntoChildren<Child = O>>(&mut self, myself: &ActorRef<SplitMsg<P, O>>) {
        if self.aborting {
            return;
        }
        loop {
            self.forward();
            if !self.draw_next(myself) {
                break;
            }
        }
        let held = self.parents.len() + self.requested;
        let free = self.room.saturating_sub(held);
        if free > 0
            && (free * 2 >= self.room || held == 0)
            && let Some(upstream) = &self.upstream
        {
            self.requested += free;
            upstream.demand(free);
        }
    }

    /// Sends the next stage what it has room for.
    fn forward(&mut self) {
        let Next::Stage(next) = &self.next else {
            return;
        };
        let n = self.credit.min(self.outbox.len());
        if n > 0 {
            self.credit -= n;
            next.send(self.outbox.drain(..n).collect());
        }
    }

    /// Starts a draw from the oldest parent if there is room; true when
    /// it drew at once (from memory), so the caller may go on.
    fn draw_next<P: IntoChildren<Child = O>>(&mut self, myself: &ActorRef<SplitMsg<P, O>>) -> bool {
        if self.drawing {
            return false;
        }
        let Some(parent) = self.parents.front_mut() else {
            return false;
        };
        let want = match self.next {
            Next::Stage(_) => self.credit.saturating_sub(self.outbox.len()),
            Next::Tracker => CHUNK,
        };
        if let Some(Draw::Members(_)) = parent.draw {
            let k = want.min(CHUNK);
            if k == 0 {
                return false;
            }
            let Some(Draw::Members(mut members)) = parent.draw.take() else {
                unreachable!("matched above")
            };
            let chunk: Vec<_> = members.by_ref().take(k).collect();
            self.members_drawn(chunk, members);
            return true;
        }
        let live = self.shared.gauges[self.index]
            .derived_live
            .load(Ordering::Acquire);
        let budget = self.budget.saturating_sub(live);
        let k = want.min(budget).min(CHUNK);
        if k == 0 {
            if want > 0 && !self.wake_armed {
                self.wake_armed = true;
                myself.send_after(BUDGET_POLL, || SplitMsg::Wake);
            }
            return false;
        }
        let draw = parent
            .draw
            .take()
            .expect("a parent not being drawn has its draw");
        match draw {
            Draw::Ready(mut children) => {
                let chunk: Vec<_> = children.by_ref().take(k).collect();
                let rest = (children.len() > 0).then_some(Draw::Ready(children));
                self.drawn(Drawn {
                    children: chunk,
                    rest,
                    panic: None,
                });
                true
            }
            Draw::Iter(mut children) => {
                self.drawing = true;
                let me = myself.clone();
                tokio::task::spawn_blocking(move || {
                    let mut chunk = Vec::with_capacity(k);
                    let drawn = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        while chunk.len() < k {
                            match children.next() {
                                Some(child) => chunk.push(child),
                                None => return false,
                            }
                        }
                        true
                    }));
                    let drawn = match drawn {
                        Ok(more) => Drawn {
                            children: chunk,
                            rest: more.then_some(Draw::Iter(children)),
                            panic: None,
                        },
                        Err(payload) => Drawn {
                            children: chunk,
                            rest: None,
                            panic: Some(crate::contain::take_message(payload)),
                        },
                    };
                    let _ = me.cast(SplitMsg::Drawn(drawn));
                });
                false
            }
            Draw::Members(_) => unreachable!("drawn above"),
            Draw::Stream(mut children) => {
                self.drawing = true;
                let me = myself.clone();
                tokio::spawn(async move {
                    let mut chunk = Vec::with_capacity(k);
                    let drawn = AssertUnwindSafe(async {
                        while chunk.len() < k {
                            match children.next().await {
                                Some(child) => chunk.push(child),
                                None => return false,
                            }
                        }
                        true
                    })
                    .catch_unwind()
                    .await;
                    let drawn = match drawn {
                        Ok(more) => Drawn {
                            children: chunk,
                            rest: more.then_some(Draw::Stream(children)),
                            panic: None,
                        },
                        Err(payload) => Drawn {
                            children: chunk,
                            rest: None,
                            panic: Some(crate::contain::take_message(payload)),
                        },
                    };
                    let _ = me.cast(SplitMsg::Drawn(drawn));
                });
                false
            }
        }
    }

    /// A chunk of a batch's outcomes: each item goes on (or fails) under
    /// its own id; after the last, the batch is forgotten.
    fn members_drawn(
        &mut self,
        chunk: Vec<crate::shape::Member<O>>,
        rest: std::vec::IntoIter<crate::shape::Member<O>>,
    ) {
        let mut finished = Vec::new();
        let finished_at = self.shared.config.enable_tracking.then(crate::clock::now);
        for (id, metadata, outcome) in chunk {
            match outcome {
                Ok(data) => {
                    let mut item = WorkItem::with_job_id(id, data);
                    *item.metadata_mut() = metadata;
                    match self.next {
                        Next::Stage(_) => self.outbox.push_back(item),
                        Next::Tracker => {
                            finished.push(WorkItemResult::completed(item, finished_at))
                        }
                    }
                }
                Err(e) => {
                    let mut error =
                        ItemError::new(&*self.name, ItemErrorKind::Failed, format!("{e:#}"));
                    error.attempts = metadata.attempts().max(1);
                    crate::contain::drop_logged(e, || "an item's error".into());
                    finished.push(WorkItemResult::failed(id, metadata, error));
                }
            }
        }
        if !finished.is_empty() {
            let _ = self.tracker.cast(TrackerMsg::Finished(finished));
        }
        if rest.len() == 0 {
            let batch = self.parents.pop_front().expect("a batch is being drawn");
            let _ = self.tracker.cast(TrackerMsg::Unbatched(batch.id));
        } else if let Some(parent) = self.parents.front_mut() {
            parent.draw = Some(Draw::Members(rest));
        }
    }

    /// A chunk drawn from the oldest parent: its children are registered
    /// with the tracker, then sent on; a parent whose draw ended ends too.
    fn drawn(&mut self, drawn: Drawn<O>) {
        if self.aborting {
            // Its parent was cancelled; these children were never items.
            crate::contain::drop_logged(drawn, || "children drawn after an abort".into());
            return;
        }
        let Some(parent) = self.parents.front_mut() else {
            return;
        };
        let n = drawn.children.len();
        let mut finished = Vec::new();
        if n > 0 {
            let gauges = &self.shared.gauges[self.index];
            gauges.derived.fetch_add(n as u64, Ordering::Relaxed);
            gauges.derived_live.fetch_add(n, Ordering::AcqRel);
            let first = parent.drawn;
            let ids: Vec<JobId> = (0..n as u64)
                .map(|i| derived_id(&parent.id, first + i))
                .collect();
            // Registered before any of them can reach a result.
            let _ = self.tracker.cast(TrackerMsg::Derived {
                parent: parent.id.clone(),
                children: ids.clone(),
                stage: self.stage,
                first: first == 0,
            });
            let parent_id = serde_json::Value::String(parent.id.to_string());
            let finished_at = self.shared.config.enable_tracking.then(crate::clock::now);
            for (id, child) in ids.into_iter().zip(drawn.children) {
                let mut metadata = parent.metadata.clone();
                metadata.custom.insert(PARENT_ID.into(), parent_id.clone());
                match child {
                    Ok(data) => {
                        let mut item = WorkItem::with_job_id(id, data);
                        *item.metadata_mut() = metadata;
                        match self.next {
                            Next::Stage(_) => self.outbox.push_back(item),
                            Next::Tracker => {
                                finished.push(WorkItemResult::completed(item, finished_at))
                            }
                        }
                    }
                    Err(e) => {
                        let error =
                            ItemError::new(&*self.name, ItemErrorKind::Failed, format!("{e:#}"));
                        crate::contain::drop_logged(e, || "a child's error".into());
                        finished.push(WorkItemResult::failed(id, metadata, error));
                    }
                }
            }
            parent.drawn += n as u64;
        }
        let ended = drawn.panic.is_some() || drawn.rest.is_none();
        if let Some(message) = drawn.panic {
            let parent = self.parents.pop_front().expect("looked up above");
            let message = format!(
                "drawing its children panicked after {} of them: {message}",
                parent.drawn
            );
            let error = ItemError::new(&*self.name, ItemErrorKind::Panicked, message);
            let result = WorkItemResult::failed(parent.id, parent.metadata, error);
            if parent.drawn == 0 {
                finished.push(result);
            } else {
                // A final node of its family, after its children's
                // failures (same sender, in order).
                if !finished.is_empty() {
                    let _ = self
                        .tracker
                        .cast(TrackerMsg::Finished(std::mem::take(&mut finished)));
                }
                let _ = self.tracker.cast(TrackerMsg::Ended(vec![result]));
            }
        } else if ended {
            let parent = self.parents.pop_front().expect("looked up above");
            if parent.drawn == 0 {
                let mut item = WorkItem::with_job_id(parent.id, ());
                *item.metadata_mut() = parent.metadata;
                item.metadata_mut()
                    .custom
                    .insert(FILTERED.into(), serde_json::Value::Bool(true));
                let at = self.shared.config.enable_tracking.then(crate::clock::now);
                finished.push(WorkItemResult::completed(item, at));
            } else {
                // After its children's failures (same sender, in order):
                // the family cannot close before they are counted.
                if !finished.is_empty() {
                    let _ = self
                        .tracker
                        .cast(TrackerMsg::Finished(std::mem::take(&mut finished)));
                }
                let _ = self.tracker.cast(TrackerMsg::Retired(parent.id));
            }
        } else if let Some(parent) = self.parents.front_mut() {
            parent.draw = drawn.rest;
        }
        if !finished.is_empty() {
            let _ = self.tracker.cast(TrackerMsg::Finished(finished));
        }
    }
}

/// The controls of a split stage: its stage's, with the splitter aborted
/// beside it and the demand of the next stage going to the splitter.
pub(crate) struct SplitControl<P, O> {
    pub(crate) stage: Box<dyn crate::ports::StageControl>,
    pub(crate) splitter: ActorRef<SplitMsg<P, O>>,
}

impl<P: Send + 'static, O: Send + 'static> crate::ports::StageControl for SplitControl<P, O> {
    fn connect(&self, upstream: Arc<dyn Upstream>) {
        self.stage.connect(upstream);
    }

    fn abort(&self) {
        self.stage.abort();
        let _ = self.splitter.cast(SplitMsg::Abort);
    }

    fn cell(&self) -> ractor::ActorCell {
        self.stage.cell()
    }

    fn companions(&self) -> Vec<ractor::ActorCell> {
        let mut cells = self.stage.companions();
        cells.push(self.splitter.get_cell());
        cells
    }

    fn demand_port(&self) -> Arc<dyn Upstream> {
        Arc::new(self.splitter.clone())
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
