//! The source actor: admits items into the pipeline, only on demand.
//!
//! - **Owns**: the user's [`Source`](crate::source::Source) (erased), the
//!   injections waiting for room, and the count of items in the pipeline.
//! - **Receives**: [`SourceMsg`]: `Demand` from the first stage; `Released`
//!   from the tracker; `Inject` from a handle (`Pipeline::inject`, straight)
//!   or the root (an embedding actor's `PipelineMsg::Inject`); `Close` and
//!   `Window` from the root; `Refilled` from its refill task; `RetryRefill`
//!   from itself after a failed refill or "nothing yet".
//! - **Sends**: `Items` to the first stage; `InputClosed`, rejected
//!   duplicates and `SourceError` events to the tracker.
//! - **Supervised by**: the pipeline root. A panic in `refill` or `ack` is
//!   caught here: the pipeline fails (`SourcePanicked`), the input closes
//!   and the pipeline drains, and the source is kept so that every admitted
//!   item is still acknowledged once. After `max_refill_failures` failed
//!   refills in a row the input closes the same way (`SourceFailed`).
//! - **Invariants**: it never sends the first stage more than it asked for,
//!   and never has more than the pipeline's window (Σ `queue_size + workers`,
//!   at the worker counts of now) admitted and not yet finished, so the tracker's backlog is bounded too.
//!   Every admitted item is counted in `admitted` before it is sent. A
//!   refill runs on a task of its own, holding the source, so the mailbox
//!   is served while it waits: acks go to the source's acknowledger at
//!   once (to the source itself once it is back), and every item the
//!   source handed out and the pipeline did not admit is given back to it
//!   (`Source::release`).
//!
//! Injected items go before the source's own: an injection is answered once
//! all its items are admitted, so an injecting caller waits for room.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use rustc_hash::FxHashSet;
use tokio::sync::watch;

use crate::error::PipelineError;
use crate::event::PipelineEvent;
use crate::item::{ItemError, ItemErrorKind, JobId, WorkItem, WorkItemResult};
use crate::ports::{Outlet, Releases, Upstream};
use crate::shared::Shared;
use crate::source::{Ack, Acknowledger, DynSource, OwnedRefill, Refill, RefillEnd};
use crate::timers::Timers;
use crate::tracker::TrackerMsg;

/// The source actor's mailbox.
pub(crate) enum SourceMsg<T> {
    /// From the first stage: room for this many more items.
    Demand(usize),
    /// From the tracker: this many admitted items have finished; with
    /// tracking on, their job ids (refused duplicates left out); when the
    /// source wants them, their acknowledgements.
    Released(usize, Vec<JobId>, Vec<Ack>),
    /// From a handle, or the root: admit these; the reply comes once all
    /// are admitted.
    Inject(Vec<WorkItem<T>>, RpcReplyPort<Result<(), PipelineError>>),
    /// From the root: admit nothing more (stop or abort).
    Close,
    /// From itself: ask the source again after a failed refill.
    RetryRefill,
    /// From its refill task: the source back, with what it was asked for
    /// and what it answered.
    Refilled(Box<dyn DynSource<T>>, usize, RefillEnd<T>),
    /// From the root, before it stops the pipeline: answered once every
    /// message before it (every acknowledgement) is handled.
    Flush(RpcReplyPort<()>),
    /// From the root, after a stage was resized: the pipeline's window
    /// (Σ each stage's room at its worker count now).
    Window(usize),
    /// From the root, when a stage ended from outside: the job ids of the
    /// items admitted and not released yet (`None` with tracking off).
    Outstanding(RpcReplyPort<Option<Vec<JobId>>>),
}

impl<T: Send + 'static> Upstream for ActorRef<SourceMsg<T>> {
    fn demand(&self, n: usize) {
        let _ = self.cast(SourceMsg::Demand(n));
    }
}

impl<T: Send + 'static> Releases for ActorRef<SourceMsg<T>> {
    fn released(&self, n: usize, ids: Vec<JobId>, acks: Vec<Ack>) {
        let _ = self.cast(SourceMsg::Released(n, ids, acks));
    }
}

pub(crate) struct SourceActor<T>(std::marker::PhantomData<fn() -> T>);

impl<T> SourceActor<T> {
    pub(crate) fn new() -> Self {
        SourceActor(std::marker::PhantomData)
    }
}

pub(crate) struct SourceArgs<T> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) source: Option<Box<dyn DynSource<T>>>,
    /// The source's own acknowledgement path, if it has one.
    pub(crate) acknowledger: Option<Box<dyn Acknowledger>>,
    pub(crate) first_stage: Arc<dyn Outlet<T>>,
    pub(crate) tracker: ActorRef<TrackerMsg>,
}

struct Injection<T> {
    items: VecDeque<WorkItem<T>>,
    /// How many of its items, from the first, were admitted so far.
    admitted: usize,
    reply: RpcReplyPort<Result<(), PipelineError>>,
}

pub(crate) struct SourceState<T> {
    shared: Arc<Shared>,
    /// `None` while a refill task holds it, or with no source at all.
    source: Option<Box<dyn DynSource<T>>>,
    acknowledger: Option<Box<dyn Acknowledger>>,
    /// A refill task holds the source.
    refilling: bool,
    /// Acks that came while the source (without an acknowledger) was out.
    deferred_acks: Vec<Ack>,
    /// `Flush` calls waiting for the source to come back.
    flushes: Vec<RpcReplyPort<()>>,
    /// Items from the source that were not admitted, to give back to it.
    unadmitted: Vec<WorkItem<T>>,
    first_stage: Arc<dyn Outlet<T>>,
    tracker: ActorRef<TrackerMsg>,
    closing: watch::Receiver<bool>,
    /// Room the first stage has granted.
    demand: usize,
    /// Most items admitted and not yet finished.
    window: usize,
    /// Items admitted and not yet finished.
    outstanding: usize,
    /// Most items asked of `refill` at once: the first stage's queue_size.
    max_refill: usize,
    /// Items a source returned beyond what it was asked for.
    carry: VecDeque<WorkItem<T>>,
    injections: VecDeque<Injection<T>>,
    /// Job ids in the pipeline now (tracking on): duplicates are refused.
    active: Option<FxHashSet<JobId>>,
    exhausted: bool,
    closed: bool,
    retry_pending: bool,
    /// Refills failed in a row; the wait before the next doubles with each.
    failures_in_a_row: u32,
    /// The wait before asking the source again, ended with the actor.
    timers: Timers<SourceMsg<T>>,
}

impl<T: Send + 'static> Actor for SourceActor<T> {
    type Msg = SourceMsg<T>;
    type State = SourceState<T>;
    type Arguments = SourceArgs<T>;

    async fn pre_start(
        &self,
        _myself: ActorRef<SourceMsg<T>>,
        args: SourceArgs<T>,
    ) -> Result<SourceState<T>, ActorProcessingErr> {
        let config = &args.shared.config;
        Ok(SourceState {
            window: config.stages.iter().map(|s| s.item_room()).sum(),
            max_refill: config.stages[0].queue_size,
            closing: args.shared.closing.subscribe(),
            active: config.enable_tracking.then(FxHashSet::default),
            shared: args.shared,
            source: args.source,
            acknowledger: args.acknowledger,
            refilling: false,
            deferred_acks: Vec::new(),
            flushes: Vec::new(),
            unadmitted: Vec::new(),
            first_stage: args.first_stage,
            tracker: args.tracker,
            demand: 0,
            outstanding: 0,
            carry: VecDeque::new(),
            injections: VecDeque::new(),
            exhausted: false,
            closed: false,
            retry_pending: false,
            failures_in_a_row: 0,
            timers: Timers::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SourceMsg<T>>,
        message: SourceMsg<T>,
        state: &mut SourceState<T>,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SourceMsg::Demand(n) => state.demand += n,
            SourceMsg::Released(n, ids, acks) => {
                state.outstanding = state.outstanding.saturating_sub(n);
                if let Some(active) = state.active.as_mut() {
                    for id in &ids {
                        active.remove(id);
                    }
                }
                if !acks.is_empty() {
                    state.ack(acks).await;
                }
            }
            SourceMsg::Flush(reply) => {
                if state.refilling {
                    state.flushes.push(reply);
                } else {
                    let _ = reply.send(());
                }
                return Ok(());
            }
            SourceMsg::Outstanding(reply) => {
                let ids = state.active.as_ref().map(|a| a.iter().cloned().collect());
                let _ = reply.send(ids);
                return Ok(());
            }
            SourceMsg::Inject(items, reply) => {
                if state.closed {
                    let _ = reply.send(Err(PipelineError::InputClosed(
                        state.shared.name.to_string(),
                    )));
                } else {
                    state.injections.push_back(Injection {
                        items: items.into(),
                        admitted: 0,
                        reply,
                    });
                }
            }
            SourceMsg::Close => state.close_input(),
            // Shrunk below what is out: nothing more is admitted until
            // enough has finished.
            SourceMsg::Window(window) => state.window = window,
            SourceMsg::RetryRefill => state.retry_pending = false,
            SourceMsg::Refilled(source, count, fetched) => {
                state.source = Some(source);
                state.refilling = false;
                let deferred = std::mem::take(&mut state.deferred_acks);
                if !deferred.is_empty() {
                    state.ack(deferred).await;
                }
                state.refilled(&myself, count, fetched);
            }
        }
        state.pump(&myself);
        state.release_unadmitted().await;
        if !state.refilling {
            for reply in state.flushes.drain(..) {
                let _ = reply.send(());
            }
        }
        Ok(())
    }
}

/// Longest wait between refills of a failing source, unless
/// `queue_refresh_rate` is longer still.
const MAX_REFILL_BACKOFF: Duration = Duration::from_secs(30);

/// The wait after the `failures`-th failed refill in a row: the refresh
/// rate, doubled for each further failure, at most [`MAX_REFILL_BACKOFF`]
/// (or the refresh rate, if that is longer).
fn refill_backoff(rate: Duration, failures: u32) -> Duration {
    let doubled = rate.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
    doubled.min(MAX_REFILL_BACKOFF.max(rate))
}

impl<T: Send + 'static> SourceState<T> {
    /// Admits what the demand and the window allow: carried-over items first,
    /// then injections, then the source.
    fn pump(&mut self, myself: &ActorRef<SourceMsg<T>>) {
        self.withdraw_abandoned();
        loop {
            if self.closed {
                return;
            }
            let room = self
                .demand
                .min(self.window.saturating_sub(self.outstanding));
            if room == 0 {
                return;
            }
            if !self.carry.is_empty() {
                let n = room.min(self.carry.len());
                let batch = self.carry.drain(..n).collect();
                self.admit(batch, true);
                continue;
            }
            if let Some(injection) = self.injections.front_mut() {
                let n = room.min(injection.items.len());
                let batch: Vec<_> = injection.items.drain(..n).collect();
                injection.admitted += n;
                if injection.items.is_empty() {
                    let injection = self.injections.pop_front().expect("front exists");
                    let _ = injection.reply.send(Ok(()));
                }
                self.admit(batch, false);
                continue;
            }
            if self.refilling {
                return; // the source is out on a refill
            }
            let Some(source) = self.source.take() else {
                return; // fed by injection only: open until stopped
            };
            if self.exhausted || self.retry_pending {
                self.source = Some(source);
                if self.exhausted {
                    self.close_input();
                }
                return;
            }
            let count = room.min(self.max_refill);
            let mut closing = self.closing.clone();
            let cancel = Box::pin(async move {
                let _ = closing.wait_for(|closing| *closing).await;
            });
            let mut refill = source.refill(count, cancel);
            // A source with items at hand answers at once: no task for it.
            let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
            match refill.as_mut().poll(&mut cx) {
                std::task::Poll::Ready((source, end)) => {
                    self.source = Some(source);
                    self.refilled(myself, count, end);
                }
                std::task::Poll::Pending => {
                    self.refilling = true;
                    spawn_refill(refill, count, myself.clone());
                    return;
                }
            }
        }
    }

    /// The source answered a refill of `count` (or the refill ended).
    fn refilled(&mut self, myself: &ActorRef<SourceMsg<T>>, count: usize, fetched: RefillEnd<T>) {
        let refill = match fetched {
            RefillEnd::Cancelled => {
                self.close_input();
                return;
            }
            RefillEnd::Panicked(message) => {
                self.source_panicked("refill", message);
                return;
            }
            RefillEnd::Answered(refill) => refill,
        };
        match refill {
            Ok(Refill::Exhausted) => self.exhausted = true,
            Ok(Refill::NothingYet) => self.nothing_yet(myself),
            Ok(Refill::Items(items)) if items.is_empty() => self.nothing_yet(myself),
            Ok(Refill::Items(mut items)) => {
                self.failures_in_a_row = 0;
                if self.closed {
                    self.unadmitted.extend(items);
                    return;
                }
                if items.len() > count {
                    tracing::warn!(target: "bergtalzug::source",
                        pipeline = %self.shared.name,
                        "refill({count}) returned {} items; the rest wait for room",
                        items.len()
                    );
                }
                // Injections may have taken some of the room meanwhile.
                let room = self
                    .demand
                    .min(self.window.saturating_sub(self.outstanding));
                if items.len() > room {
                    self.carry.extend(items.split_off(room));
                }
                self.admit(items, true);
            }
            Err(e) => {
                let message = format!("{e:#}");
                self.failures_in_a_row += 1;
                let limit = self.shared.config.max_refill_failures;
                if limit > 0 && self.failures_in_a_row >= limit {
                    self.give_up(message);
                    return;
                }
                let retry_in = refill_backoff(
                    self.shared.config.queue_refresh_rate,
                    self.failures_in_a_row,
                );
                self.shared
                    .source_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(target: "bergtalzug::source",
                    pipeline = %self.shared.name,
                    failures_in_a_row = self.failures_in_a_row,
                    "refill failed, asking again in {retry_in:?}: {message}"
                );
                let _ = self
                    .tracker
                    .cast(TrackerMsg::Event(PipelineEvent::SourceError { message }));
                self.retry_pending = true;
                self.timers
                    .after(myself, retry_in, || SourceMsg::RetryRefill);
            }
        }
    }

    /// The source has nothing right now: ask again after the refresh rate.
    fn nothing_yet(&mut self, myself: &ActorRef<SourceMsg<T>>) {
        self.failures_in_a_row = 0;
        self.retry_pending = true;
        let wait = self.shared.config.queue_refresh_rate;
        self.timers.after(myself, wait, || SourceMsg::RetryRefill);
    }

    /// Gives the source back what it handed out and was not admitted, once
    /// it is in hand; a panic in `release` is contained.
    async fn release_unadmitted(&mut self) {
        if self.unadmitted.is_empty() {
            return;
        }
        let Some(source) = self.source.as_mut() else {
            return; // out on a refill: released when it is back
        };
        let items = std::mem::take(&mut self.unadmitted);
        let n = items.len();
        if let Err(panic) = AssertUnwindSafe(source.release(items)).catch_unwind().await {
            let message = crate::contain::panic_message(&*panic);
            tracing::error!(target: "bergtalzug::source",
                pipeline = %self.shared.name,
                "the source's release panicked while given back {n} items: {message}"
            );
            self.source_panicked("release", message);
        }
    }

    /// Drops the injections whose caller is gone (its `inject` future was
    /// dropped): what they had not admitted is never admitted. Items
    /// already admitted from them stay in and get their outcomes.
    fn withdraw_abandoned(&mut self) {
        if !self.injections.iter().any(|i| i.reply.is_closed()) {
            return;
        }
        let (gone, kept) = std::mem::take(&mut self.injections)
            .into_iter()
            .partition(|i| i.reply.is_closed());
        self.injections = kept;
        for injection in gone {
            let Injection {
                items, admitted, ..
            } = injection;
            tracing::debug!(
                target: "bergtalzug::source",
                pipeline = %self.shared.name,
                "an inject call was dropped after {admitted} of its items were admitted; \
                 the other {} are withdrawn",
                items.len()
            );
            // Their `Drop` is user code.
            crate::contain::drop_logged(items, || "withdrawn injected items".to_string());
        }
    }

    /// Counts the batch in, refuses ids already in the pipeline, and sends
    /// the rest to the first stage. Refused items `from_source` are given
    /// back to it (`Source::release`), never acknowledged.
    fn admit(&mut self, batch: Vec<WorkItem<T>>, from_source: bool) {
        let n = batch.len();
        self.shared
            .admitted
            .fetch_add(n as u64, std::sync::atomic::Ordering::AcqRel);
        self.outstanding += n;
        let (accepted, refused) = match self.active.as_mut() {
            None => (batch, Vec::new()),
            Some(active) => {
                let mut accepted = Vec::with_capacity(n);
                let mut refused = Vec::new();
                for mut item in batch {
                    item.head.metadata.names = Some(self.shared.names.clone());
                    if active.insert(item.head.job_id.clone()) {
                        accepted.push(item);
                    } else {
                        let error = ItemError::new(
                            "source",
                            ItemErrorKind::DuplicateJobId,
                            format!(
                                "job id {} is already in the pipeline; not admitted",
                                item.head.job_id
                            ),
                        );
                        tracing::warn!(target: "bergtalzug::source", pipeline = %self.shared.name, job_id = %item.head.job_id, "duplicate job id refused");
                        let job_id = item.head.job_id.clone();
                        let metadata = std::mem::take(&mut item.head.metadata);
                        if from_source {
                            self.unadmitted.push(item);
                        } else {
                            // Its data is dropped here, and its `Drop` is user code.
                            crate::contain::drop_logged(item, || {
                                format!("refused duplicate {job_id}")
                            });
                        }
                        refused.push(WorkItemResult::failed(job_id, metadata, error));
                    }
                }
                (accepted, refused)
            }
        };
        self.demand -= accepted.len();
        if !refused.is_empty() {
            let _ = self.tracker.cast(TrackerMsg::Refused(refused));
        }
        if !accepted.is_empty() {
            self.first_stage.send(accepted);
        }
    }

    /// Hands `acks` to the source's acknowledger, or to the source (held
    /// back while it is out on a refill), once each; a panic in `ack` is
    /// contained (the pipeline then fails as for a panicking source, but
    /// every later item is still acknowledged).
    async fn ack(&mut self, acks: Vec<Ack>) {
        let n = acks.len();
        let acking = match (self.acknowledger.as_mut(), self.source.as_mut()) {
            (Some(acknowledger), _) => acknowledger.ack(acks),
            (None, Some(source)) => source.ack(acks),
            (None, None) => {
                if self.refilling {
                    self.deferred_acks.extend(acks);
                }
                return;
            }
        };
        if let Err(panic) = AssertUnwindSafe(acking).catch_unwind().await {
            let message = crate::contain::panic_message(&*panic);
            tracing::error!(target: "bergtalzug::source",
                pipeline = %self.shared.name,
                "the source's ack panicked while acknowledging {n} items: {message}"
            );
            self.source_panicked("ack", message);
        }
    }

    /// The source panicked: the pipeline fails with `SourcePanicked`, the
    /// input closes, and the items admitted finish (and are acknowledged).
    fn source_panicked(&mut self, during: &str, message: String) {
        tracing::error!(target: "bergtalzug::source",
            pipeline = %self.shared.name,
            "the source panicked in {during}; finishing the items it admitted: {message}"
        );
        let _ = self
            .tracker
            .cast(TrackerMsg::Event(PipelineEvent::SourceError {
                message: format!("source panicked: {message}"),
            }));
        self.shared.fail(PipelineError::SourcePanicked {
            pipeline: self.shared.name.to_string(),
            message,
        });
        self.close_input();
    }

    /// `max_refill_failures` refills failed in a row: the pipeline fails
    /// with `SourceFailed`, the input closes, the items admitted finish.
    fn give_up(&mut self, message: String) {
        let failures = self.failures_in_a_row;
        self.shared
            .source_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::error!(target: "bergtalzug::source",
            pipeline = %self.shared.name,
            failures_in_a_row = failures,
            "refill failed {failures} times in a row (max_refill_failures), giving up the source: {message}"
        );
        let _ = self
            .tracker
            .cast(TrackerMsg::Event(PipelineEvent::SourceError {
                message: message.clone(),
            }));
        self.shared.fail(PipelineError::SourceFailed {
            pipeline: self.shared.name.to_string(),
            failures,
            message,
        });
        self.close_input();
    }

    fn close_input(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        for injection in self.injections.drain(..) {
            let pipeline = self.shared.name.to_string();
            let _ = injection.reply.send(Err(match injection.admitted {
                0 => PipelineError::InputClosed(pipeline),
                admitted => PipelineError::PartlyAdmitted {
                    pipeline,
                    admitted,
                    refused: injection.items.len(),
                },
            }));
        }
        // Carried-over items were never admitted: given back to the source.
        if !self.carry.is_empty() {
            tracing::warn!(target: "bergtalzug::source",
                pipeline = %self.shared.name,
                "input closed with {} items the source returned beyond its demand; \
                 they were not admitted and go back to the source",
                self.carry.len()
            );
            self.unadmitted.extend(self.carry.drain(..));
        }
        let _ = self.tracker.cast(TrackerMsg::InputClosed);
        // Batch stages cut their partial batches from now on.
        let _ = self.shared.input_closed.send_replace(true);
    }
}

/// Runs a refill that has to wait on a task of its own, and sends the
/// source back with the answer (the refill watches `closing` itself).
fn spawn_refill<T: Send + 'static>(
    refill: OwnedRefill<T>,
    count: usize,
    myself: ActorRef<SourceMsg<T>>,
) {
    tokio::spawn(async move {
        let (source, end) = refill.await;
        // A source actor that is gone drops the source here.
        let _ = myself.cast(SourceMsg::Refilled(source, count, end));
    });
}
