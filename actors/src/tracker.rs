//! The tracker actor: where every item's outcome ends up.
//!
//! - **Owns**: the completion callbacks and the retained results; it keeps
//!   the counters and duration histograms behind `PipelineStats` in
//!   `Shared::tally`, where stats read them without asking it (it may be
//!   waiting for a slow subscriber).
//! - **Receives**: [`TrackerMsg`]: `Finished` results from the stages (and
//!   refused duplicates from the source), each failure's kept input just
//!   before it (`Inputs`); `InputClosed` from the source or the root;
//!   `Event`s to publish.
//! - **Sends**: `Released` to the source (so it may admit more), events to
//!   subscribers, dead letters to the sink, and `Finished` to the root once
//!   every admitted item has an outcome and the input is closed.
//! - **Supervised by**: the pipeline root.
//! - **Invariants**: each result is counted, called back and published once;
//!   its mailbox holds at most the pipeline's window of results, because
//!   the source admits an item only after an earlier one was released here.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::dead_letter::{DeadLetter, DeadLetterSink};
use crate::event::PipelineEvent;
use crate::item::JobId;
use crate::item::{ItemError, ItemErrorKind, WorkItemMetadata, WorkItemResult};
use crate::lineage::{Combined, Lineage, Settled};
use crate::ports::{Releases, ReportFiled};
use crate::shared::{FinishReport, Shared};
use crate::source::Ack;
use crate::tally::Tally;

/// A completion callback: called once per item, on the tracker's task,
/// which owns it (so it may keep state: `FnMut`, and needs no `Sync`).
pub(crate) type Callback = Box<dyn FnMut(&WorkItemResult) + Send>;

/// The tracker's mailbox.
pub(crate) enum TrackerMsg {
    /// From the root, first: where to send `Released`.
    Connect(Box<dyn Releases>, bool),
    /// From the stages: outcomes.
    Finished(Vec<WorkItemResult>),
    /// From the source: duplicates it refused (`DuplicateJobId`), counted
    /// and reported like any outcome but never acknowledged to the source
    /// nor released from its set of live ids: the live item with the same
    /// job id is still running.
    Refused(Vec<WorkItemResult>),
    /// From a stage that keeps inputs, just before the failures they
    /// belong to: each failed item's last input, for its dead letter.
    Inputs(Vec<(JobId, Box<dyn Any + Send>)>),
    /// From the source or the root: no more items will be admitted.
    InputClosed,
    /// From any actor: an event every subscriber must get.
    Event(PipelineEvent),
    /// From a splitter (the split of stage `stage`), before it sends them
    /// on: `parent` made these children (more may follow; `first` on the
    /// first of them).
    Derived {
        parent: JobId,
        children: Vec<JobId>,
        stage: u16,
        first: bool,
    },
    /// From a splitter: the own results of parents that made children
    /// (their split panicked, or they were cancelled), final nodes of
    /// their families. (A parent with no children sends its result in
    /// `Finished`: it is an item of its own.)
    Ended(Vec<WorkItemResult>),
    /// From a splitter, after its last `Derived` for `parent`: the split
    /// ended with at least one child, so `parent` is no item any more (a
    /// split with none sends the parent's own, filtered, result instead).
    Retired(JobId),
    /// From a batcher, before the batch goes to its stage: the items in
    /// it (their ids and metadata), for the batch's failure to become
    /// theirs.
    Batched {
        batch: JobId,
        /// The batch stage.
        stage: u16,
        members: Vec<(JobId, WorkItemMetadata)>,
    },
    /// From the splitter after a batch stage: the batch's items went on
    /// with their own outcomes; forget it.
    Unbatched(JobId),
    /// From the root, after a stage ended from outside and the others were
    /// killed: answered once every message before it is handled (every
    /// outcome the stages sent is recorded and released to the source).
    Quiesce(RpcReplyPort<()>),
    /// From the root, after `Quiesce`: the admitted items that will get no
    /// outcome from a stage (their ids, tracking on; `None` when tracking
    /// is off and only their count is known) end `Cancelled` in `stage`
    /// with `message`; the pipeline may then finish with them missing.
    Lost {
        ids: Option<Vec<JobId>>,
        stage: String,
        message: String,
    },
}

pub(crate) struct Tracker;

pub(crate) struct TrackerArgs {
    pub(crate) shared: Arc<Shared>,
    pub(crate) finish: Box<dyn ReportFiled>,
    pub(crate) callbacks: Vec<Callback>,
    pub(crate) dead_letters: Option<DeadLetterSink>,
}

pub(crate) struct TrackerState {
    shared: Arc<Shared>,
    finish: Box<dyn ReportFiled>,
    release: Option<Box<dyn Releases>>,
    /// The source wants an `Ack` per item.
    acks: bool,
    callbacks: Vec<Callback>,
    dead_letters: Option<DeadLetterSink>,
    /// Kept inputs of failures not recorded yet.
    inputs: FxHashMap<JobId, Box<dyn Any + Send>>,
    results: Vec<WorkItemResult>,
    /// Which admitted item each split's child descends from.
    lineage: Lineage,
    /// The items of each batch in a batch stage (and the stage).
    batches: FxHashMap<JobId, (u16, Vec<(JobId, WorkItemMetadata)>)>,
    input_closed: bool,
    /// Items the stages will never report were given up (`Lost`).
    swept: bool,
    done: bool,
}

impl Actor for Tracker {
    type Msg = TrackerMsg;
    type State = TrackerState;
    type Arguments = TrackerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<TrackerMsg>,
        args: TrackerArgs,
    ) -> Result<TrackerState, ActorProcessingErr> {
        Ok(TrackerState {
            finish: args.finish,
            release: None,
            acks: false,
            callbacks: args.callbacks,
            dead_letters: args.dead_letters,
            inputs: FxHashMap::default(),
            results: Vec::new(),
            lineage: Lineage::default(),
            batches: FxHashMap::default(),
            input_closed: false,
            swept: false,
            done: false,
            shared: args.shared,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<TrackerMsg>,
        message: TrackerMsg,
        state: &mut TrackerState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            TrackerMsg::Connect(release, acks) => {
                state.release = Some(release);
                state.acks = acks;
            }
            TrackerMsg::Finished(results) => state.record(results, Origin::Stage).await,
            TrackerMsg::Refused(results) => state.record(results, Origin::Refused).await,
            TrackerMsg::Inputs(inputs) => state.inputs.extend(inputs),
            TrackerMsg::InputClosed => state.input_closed = true,
            TrackerMsg::Quiesce(reply) => {
                let _ = reply.send(());
            }
            TrackerMsg::Lost {
                ids,
                stage,
                message,
            } => {
                if let Some(ids) = ids {
                    let mut families = Vec::new();
                    let lost = ids
                        .into_iter()
                        .filter(|id| match state.lineage.lost(id, &message, &stage) {
                            Some(family) => {
                                families.push(family);
                                false
                            }
                            None => true,
                        })
                        .map(|id| {
                            let error =
                                ItemError::new(&*stage, ItemErrorKind::Cancelled, &*message);
                            WorkItemResult::failed(id, WorkItemMetadata::default(), error)
                        })
                        .collect();
                    state.record(lost, Origin::Stage).await;
                    let mut roots = Roots::default();
                    let tracking = state.shared.config.enable_tracking;
                    let mut tally = state.shared.tally.lock().unwrap_or_else(|e| e.into_inner());
                    for family in families {
                        roots.family(&mut tally, tracking, state.acks, family);
                    }
                    drop(tally);
                    state.settle(roots);
                }
                state.forget_the_dead();
                state.swept = true;
            }
            TrackerMsg::Derived {
                parent,
                children,
                stage,
                first,
            } => state.lineage.derived(&parent, children, stage, first),
            TrackerMsg::Ended(results) => state.record(results, Origin::Parent).await,
            TrackerMsg::Batched {
                batch,
                stage,
                members,
            } => {
                state.batches.insert(batch, (stage, members));
            }
            TrackerMsg::Unbatched(batch) => {
                state.batches.remove(&batch);
            }
            TrackerMsg::Retired(parent) => {
                let (made_by, settled) = state.lineage.retired(&parent);
                state.made_by(made_by);
                let mut roots = Roots::default();
                if let Settled::Family(family) = settled {
                    let tracking = state.shared.config.enable_tracking;
                    let mut tally = state.shared.tally.lock().unwrap_or_else(|e| e.into_inner());
                    roots.family(&mut tally, tracking, state.acks, family);
                }
                state.settle(roots);
            }
            TrackerMsg::Event(event) => {
                if state.shared.events.has_subscribers() {
                    let events = &state.shared.events;
                    Box::pin(events.publish(&state.shared.name, vec![event])).await;
                }
            }
        }
        state.finish_if_done().await;
        Ok(())
    }
}

/// The admitted items one message finished: how many, their ids (tracking
/// on) and their acks (when the source wants them).
#[derive(Default)]
struct Roots {
    n: usize,
    ids: Vec<JobId>,
    acks: Vec<Ack>,
}

impl Roots {
    /// An admitted item whose descendants are all finished (each of the
    /// items with its id that split at once, tracking off).
    fn family(&mut self, tally: &mut Tally, tracking: bool, acks: bool, family: Combined) {
        let roots = family.roots as usize;
        self.n += roots;
        for _ in 0..roots {
            tally.count(family.error.as_ref());
        }
        if tracking {
            self.ids
                .extend(std::iter::repeat_n(family.root.clone(), roots));
        }
        if acks && roots > 0 {
            let ack = Ack::combined(family);
            self.acks.extend(std::iter::repeat_n(ack, roots));
        }
    }
}

/// Where a batch of results comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Items that went into the pipeline (or were given up in it).
    Stage,
    /// The own results of parents that made children (`Ended`).
    Parent,
    /// Duplicates the source refused at the door.
    Refused,
}

impl TrackerState {
    async fn record(&mut self, results: Vec<WorkItemResult>, origin: Origin) {
        let results = if self.batches.is_empty() {
            results
        } else {
            self.unbatch(results)
        };
        let tracking = self.shared.config.enable_tracking;
        let mut roots = Roots::default();
        let shared = self.shared.clone();
        {
            let mut tally = shared.tally.lock().unwrap_or_else(|e| e.into_inner());
            for result in &results {
                let (made_by, settled) = match origin {
                    Origin::Stage => self.lineage.finished(result),
                    Origin::Parent => self.lineage.ended(result),
                    // A refused duplicate was never an item of the pipeline.
                    Origin::Refused => (None, Settled::Plain),
                };
                if made_by.is_some() {
                    tally.count_derived(!result.success);
                }
                self.made_by(made_by);
                match settled {
                    Settled::Plain => {
                        roots.n += 1;
                        tally.count(result.error.as_deref());
                        if tracking && origin != Origin::Refused {
                            roots.ids.push(result.job_id.clone());
                        }
                        if self.acks && origin != Origin::Refused {
                            roots.acks.push(Ack::of(result));
                        }
                    }
                    Settled::Open => {}
                    Settled::Family(family) => {
                        roots.family(&mut tally, tracking, self.acks, family)
                    }
                }
                tally.time(result, tracking);
            }
        }
        for result in &results {
            for callback in &mut self.callbacks {
                if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| callback(result)))
                {
                    // Its payload's `Drop` is user code too (and outside the
                    // macro, which may not evaluate its arguments).
                    let message = crate::contain::take_message(panic);
                    tracing::error!(target: "bergtalzug::tracker",
                        pipeline = %self.shared.name,
                        job_id = %result.job_id,
                        "completion callback panicked: {message}"
                    );
                }
            }
        }
        if self.dead_letters.is_some() {
            // Boxed, as the publishing below and the end in `finish_if_done`:
            // their futures are large and rarely awaited, and `handle`'s
            // future, which would carry them inline, is copied by ractor on
            // every message (1,416 bytes inline, 536 boxed).
            Box::pin(self.send_dead_letters(&results)).await;
        } else if !self.inputs.is_empty() {
            // The inputs' `Drop` is user code.
            for (job_id, input) in self.inputs.drain() {
                crate::contain::drop_logged(input, || format!("the kept input of item {job_id}"));
            }
        }
        let hub = &self.shared.events;
        if hub.has_subscribers() {
            // Only the results some filter takes are copied into events.
            let events: Vec<_> = results
                .iter()
                .filter(|r| hub.wants_finished(r.success))
                .map(|r| PipelineEvent::ItemFinished(Box::new(r.clone())))
                .collect();
            if !events.is_empty() {
                Box::pin(hub.publish(&self.shared.name, events)).await;
            }
        }
        // Tracking off keeps nothing, as in the seed.
        if self.shared.config.retain_results && tracking {
            self.results.extend(results);
        }
        self.settle(roots);
    }

    /// A batch's result (a failure of the whole batch: an error, a panic,
    /// a timeout, an abort) becomes each of its items' result.
    fn unbatch(&mut self, results: Vec<WorkItemResult>) -> Vec<WorkItemResult> {
        let mut out = Vec::with_capacity(results.len());
        for result in results {
            let Some((stage, members)) = self.batches.remove(&result.job_id) else {
                out.push(result);
                continue;
            };
            // Its items failed in the batch stage (as the stage counts its
            // batches: a cancelled one is no failure of the stage's).
            if result
                .error
                .as_ref()
                .is_some_and(|e| e.kind != ItemErrorKind::Cancelled)
            {
                self.shared.gauges[stage as usize]
                    .count_batch_items(|b| &b.failed, members.len() as u64);
            }
            if let Some(input) = self.inputs.remove(&result.job_id) {
                crate::contain::drop_logged(input, || {
                    format!("the kept input of batch {}", result.job_id)
                });
            }
            let n = members.len();
            for (id, metadata) in members {
                let error = result.error.clone().map(|mut e| {
                    e.message = format!("its batch of {n} failed: {}", e.message);
                    e
                });
                out.push(WorkItemResult {
                    job_id: id,
                    success: error.is_none(),
                    error,
                    metadata,
                });
            }
        }
        out
    }

    /// After `Lost`: the actors that held items were killed, so no result
    /// will come for what the ledger, the batches and the kept inputs still
    /// hold. They are dropped (the splits' budgets of live children given
    /// back), rather than kept until the tracker stops.
    fn forget_the_dead(&mut self) {
        for (stage, n) in self.lineage.clear() {
            self.shared.gauges[stage as usize]
                .derived_live
                .fetch_sub(n, std::sync::atomic::Ordering::AcqRel);
        }
        self.batches.clear();
        for (job_id, input) in self.inputs.drain() {
            crate::contain::drop_logged(input, || format!("the kept input of item {job_id}"));
        }
    }

    /// A derived item left the budget of the split that made it.
    fn made_by(&self, stage: Option<u16>) {
        if let Some(stage) = stage {
            self.shared.gauges[stage as usize]
                .derived_live
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    }

    /// Tells the source which admitted items finished.
    fn settle(&self, roots: Roots) {
        if roots.n == 0 {
            return;
        }
        if let Some(release) = &self.release {
            release.released(roots.n, roots.ids, roots.acks);
        }
    }

    async fn send_dead_letters(&mut self, results: &[WorkItemResult]) {
        for result in results.iter().filter(|r| !r.success) {
            let input = self.inputs.remove(&result.job_id);
            let Some(letter) = DeadLetter::new(result, input) else {
                continue;
            };
            let Some(sink) = self.dead_letters.as_mut() else {
                return;
            };
            let window = self
                .shared
                .config
                .stages
                .iter()
                .map(|s| s.item_room())
                .sum();
            let mut stop_waiting = self.shared.stop_waiting.subscribe();
            if !sink
                .deliver(
                    letter,
                    &self.shared.name,
                    &mut stop_waiting,
                    window,
                    &self.shared.events,
                )
                .await
            {
                tracing::error!(target: "bergtalzug::tracker",
                    pipeline = %self.shared.name,
                    "the dead-letter receiver is gone; later dead letters are dropped"
                );
                self.dead_letters = None;
            }
        }
    }

    async fn finish_if_done(&mut self) {
        let all = self.swept || self.shared.finished() >= self.shared.admitted();
        if self.done || !self.input_closed || !all {
            return;
        }
        self.done = true;
        let stats = self.shared.final_stats();
        tracing::debug!(target: "bergtalzug::tracker", pipeline = %self.shared.name, "finished: {stats}");
        if self.shared.events.has_subscribers() {
            let finished = vec![PipelineEvent::PipelineFinished(Box::new(stats.clone()))];
            Box::pin(self.shared.events.publish(&self.shared.name, finished)).await;
        }
        self.shared.events.close();
        let report = FinishReport {
            results: std::mem::take(&mut self.results),
            stats,
        };
        self.shared.report.file(report);
        self.finish.filed();
    }
}
