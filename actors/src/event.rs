//! Pipeline events and their subscribers.
//!
//! Every event is one [`PipelineEvent`]; `docs/events.md` lists them all.
//!
//! # Delivery
//!
//! Each subscriber has its own bounded buffer ([`EVENT_BUFFER`] events).
//!
//! - **Terminal and control events** (`ItemFinished`, `WorkerRestarted`,
//!   `ItemStalled`, `SourceError`, `PipelineFinished`) are never dropped: when a
//!   subscriber's buffer is full the tracker waits for it, and the pipeline
//!   slows to the subscriber's pace (its memory stays bounded because the
//!   source admits new items only as old ones are tracked).
//! - **Lifecycle events** (`ItemQueued`, `ItemStarted`, `ItemCompleted`)
//!   are sent only while someone subscribes, and dropped when the buffer is
//!   full; [`EventStream::dropped`] counts them. They never slow the data path.
//!
//! Drop an [`EventStream`] you no longer read: a subscriber that never reads
//! holds the pipeline back once its buffer is full.
//!
//! # Filters
//!
//! An [`EventFilter`] picks what a subscriber gets; events it leaves out
//! are never queued for that subscriber. `PipelineFinished` always comes.
//!
//! ```
//! use bergtalzug_actors::event::EventFilter;
//!
//! let failures = EventFilter::failures();                 // failed items, restarts, source errors
//! let parse = EventFilter::lifecycle().stage("parse");    // one stage's item lifecycle
//! let both = EventFilter::finished().failures_only().stage("store");
//! # drop((failures, parse, both));
//! ```
//!
//! # Actors
//!
//! [`forward_to_actor`] delivers a stream to an actor as its own messages,
//! each an [`ActorEvent`] holding one of [`ACTOR_EVENT_WINDOW`] permits until
//! the actor drops it: an actor that falls behind stops the forwarding, and
//! the policy above takes over, so its mailbox stays bounded too.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use ractor::{ActorRef, Message};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::item::{JobId, WorkItemResult};
use crate::stats::PipelineStats;

/// How many events a subscriber's buffer holds.
pub const EVENT_BUFFER: usize = 4096;

/// How many delivered events an actor may hold (in its mailbox or being
/// handled) before forwarding waits for it.
pub const ACTOR_EVENT_WINDOW: usize = 1024;

/// A worker's identity within its stage; a replacement gets a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct WorkerId(pub u64);

impl std::fmt::Display for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "w{}", self.0)
    }
}

/// Something that happened in a pipeline.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum PipelineEvent {
    /// An item entered a stage's queue. Lifecycle: may be dropped.
    ItemQueued {
        /// The item.
        job_id: JobId,
        /// The stage.
        stage: Arc<str>,
    },
    /// A worker started the stage's handler on an item. Lifecycle: may be dropped.
    ItemStarted {
        /// The item.
        job_id: JobId,
        /// The stage.
        stage: Arc<str>,
        /// The worker.
        worker: WorkerId,
    },
    /// The stage's handler returned for an item. Lifecycle: may be dropped.
    ItemCompleted {
        /// The item.
        job_id: JobId,
        /// The stage.
        stage: Arc<str>,
        /// The worker.
        worker: WorkerId,
        /// False when the handler failed or panicked.
        success: bool,
    },
    /// An item reached its outcome: completed, failed or cancelled. Never dropped.
    ItemFinished(Box<WorkItemResult>),
    /// A worker died (its handler panicked) and was replaced. Never dropped.
    WorkerRestarted {
        /// The stage.
        stage: Arc<str>,
        /// The worker that died.
        worker: WorkerId,
        /// Its replacement.
        replacement: WorkerId,
        /// Why it died.
        reason: String,
    },
    /// A worker has held an item longer than the pipeline's
    /// `stall_threshold`; sent once per item and stage. The item goes on
    /// (this is a report, not a timeout). Never dropped.
    ItemStalled {
        /// The item.
        job_id: JobId,
        /// The stage.
        stage: Arc<str>,
        /// The worker holding it.
        worker: WorkerId,
        /// How long the worker had held it when it was noticed.
        age: std::time::Duration,
    },
    /// The source's `refill` failed; it is asked again after
    /// `queue_refresh_rate`. Never dropped.
    SourceError {
        /// The error chain.
        message: String,
    },
    /// Every item has its outcome; the pipeline has stopped. The last event.
    PipelineFinished(Box<PipelineStats>),
}

impl PipelineEvent {
    /// The stage the event is about, if it is about one: the stage of a
    /// lifecycle event or a restart, the failing stage of a failed item.
    pub fn stage(&self) -> Option<&str> {
        match self {
            PipelineEvent::ItemQueued { stage, .. }
            | PipelineEvent::ItemStarted { stage, .. }
            | PipelineEvent::ItemCompleted { stage, .. }
            | PipelineEvent::WorkerRestarted { stage, .. }
            | PipelineEvent::ItemStalled { stage, .. } => Some(stage),
            PipelineEvent::ItemFinished(result) => result.error.as_ref().map(|e| e.stage.as_str()),
            PipelineEvent::SourceError { .. } | PipelineEvent::PipelineFinished(_) => None,
        }
    }

    /// True for the events that may be dropped for a slow subscriber.
    pub fn is_lifecycle(&self) -> bool {
        matches!(
            self,
            PipelineEvent::ItemQueued { .. }
                | PipelineEvent::ItemStarted { .. }
                | PipelineEvent::ItemCompleted { .. }
        )
    }
}

/// Which events a subscriber wants. The default takes every event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFilter {
    lifecycle: bool,
    finished: bool,
    control: bool,
    failures_only: bool,
    stage: Option<Arc<str>>,
}

impl Default for EventFilter {
    fn default() -> Self {
        EventFilter::all()
    }
}

impl EventFilter {
    /// Every event.
    pub fn all() -> Self {
        EventFilter {
            lifecycle: true,
            finished: true,
            control: true,
            failures_only: false,
            stage: None,
        }
    }

    /// Nothing but `PipelineFinished`; add kinds with the `with_` methods.
    pub fn none() -> Self {
        EventFilter {
            lifecycle: false,
            finished: false,
            control: false,
            failures_only: false,
            stage: None,
        }
    }

    /// Only `ItemFinished` (and `PipelineFinished`).
    pub fn finished() -> Self {
        EventFilter::none().with_finished()
    }

    /// Only what went wrong: failed items, worker restarts, stalled items,
    /// source errors.
    pub fn failures() -> Self {
        EventFilter::none()
            .with_finished()
            .with_control()
            .failures_only()
    }

    /// Only the item lifecycle: queued, started, completed.
    pub fn lifecycle() -> Self {
        EventFilter::none().with_lifecycle()
    }

    /// Adds `ItemQueued`, `ItemStarted`, `ItemCompleted`.
    pub fn with_lifecycle(mut self) -> Self {
        self.lifecycle = true;
        self
    }

    /// Adds `ItemFinished`.
    pub fn with_finished(mut self) -> Self {
        self.finished = true;
        self
    }

    /// Adds `WorkerRestarted`, `ItemStalled` and `SourceError`.
    pub fn with_control(mut self) -> Self {
        self.control = true;
        self
    }

    /// Of `ItemFinished` and `ItemCompleted`, only those that failed.
    pub fn failures_only(mut self) -> Self {
        self.failures_only = true;
        self
    }

    /// Only events about the stage called `stage` (a failed item's failing
    /// stage; `SourceError` is about no stage and is left out).
    pub fn stage(mut self, stage: impl Into<String>) -> Self {
        self.stage = Some(stage.into().into());
        self
    }

    /// True if a subscriber with this filter gets `event`.
    pub fn matches(&self, event: &PipelineEvent) -> bool {
        let kind = match event {
            PipelineEvent::PipelineFinished(_) => return true,
            PipelineEvent::ItemQueued { .. } | PipelineEvent::ItemStarted { .. } => {
                self.lifecycle && !self.failures_only
            }
            PipelineEvent::ItemCompleted { success, .. } => {
                self.lifecycle && (!self.failures_only || !success)
            }
            PipelineEvent::ItemFinished(result) => {
                self.finished && (!self.failures_only || !result.success)
            }
            PipelineEvent::WorkerRestarted { .. }
            | PipelineEvent::ItemStalled { .. }
            | PipelineEvent::SourceError { .. } => self.control,
        };
        kind && match &self.stage {
            None => true,
            Some(stage) => event.stage() == Some(&**stage),
        }
    }
}

struct Subscriber {
    tx: mpsc::Sender<PipelineEvent>,
    dropped: Arc<AtomicU64>,
    filter: EventFilter,
}

/// The subscriber list shared by the actors that publish events.
#[derive(Default)]
pub struct EventHub {
    subscribers: Mutex<Vec<Subscriber>>,
    any: AtomicBool,
    lifecycle: AtomicBool,
    closed: AtomicBool,
}

impl std::fmt::Debug for EventHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventHub")
            .field("subscribed", &self.has_subscribers())
            .finish()
    }
}

impl EventHub {
    /// A new subscriber; receives the events `filter` matches, from now on.
    pub fn subscribe(&self, filter: EventFilter) -> EventStream {
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        if !self.closed.load(Ordering::Acquire) {
            subs.push(Subscriber {
                tx,
                dropped: dropped.clone(),
                filter,
            });
            self.refresh(&subs);
        }
        EventStream { rx, dropped }
    }

    fn refresh(&self, subs: &[Subscriber]) {
        self.any.store(!subs.is_empty(), Ordering::Release);
        let lifecycle = subs.iter().any(|s| s.filter.lifecycle);
        self.lifecycle.store(lifecycle, Ordering::Release);
    }

    /// True while anyone listens: publishers skip building events otherwise.
    #[inline]
    pub fn has_subscribers(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    /// True while anyone listens to lifecycle events.
    #[inline]
    pub fn wants_lifecycle(&self) -> bool {
        self.lifecycle.load(Ordering::Relaxed)
    }

    /// Publishes lifecycle events without waiting: a full buffer drops them
    /// (counted per subscriber).
    pub(crate) fn lifecycle(&self, events: Vec<PipelineEvent>) {
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subs.retain(|s| {
            for event in events.iter().filter(|e| s.filter.matches(e)) {
                match s.tx.try_send(event.clone()) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        s.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return false,
                }
            }
            true
        });
        self.refresh(&subs);
    }

    /// Publishes events every subscriber must get, waiting for room.
    pub(crate) async fn publish(&self, events: Vec<PipelineEvent>) {
        let senders: Vec<(mpsc::Sender<PipelineEvent>, EventFilter)> = {
            let subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
            subs.iter()
                .map(|s| (s.tx.clone(), s.filter.clone()))
                .collect()
        };
        let mut gone = false;
        for (tx, filter) in &senders {
            for event in events.iter().filter(|e| filter.matches(e)) {
                if tx.send(event.clone()).await.is_err() {
                    gone = true;
                    break;
                }
            }
        }
        if gone {
            let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
            subs.retain(|s| !s.tx.is_closed());
            self.refresh(&subs);
        }
    }

    /// Ends every stream: no more events will come.
    pub(crate) fn close(&self) {
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        self.closed.store(true, Ordering::Release);
        subs.clear();
        self.refresh(&subs);
    }
}

/// A subscription to a pipeline's events; ends after `PipelineFinished`.
///
/// Read it with [`EventStream::recv`] or as a `futures::Stream`.
#[derive(Debug)]
pub struct EventStream {
    rx: mpsc::Receiver<PipelineEvent>,
    dropped: Arc<AtomicU64>,
}

impl EventStream {
    /// The next event, or `None` once the pipeline has finished.
    pub async fn recv(&mut self) -> Option<PipelineEvent> {
        self.rx.recv().await
    }

    /// The next event if one is ready.
    pub fn try_recv(&mut self) -> Option<PipelineEvent> {
        self.rx.try_recv().ok()
    }

    /// How many lifecycle events were dropped because this stream's buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl futures::Stream for EventStream {
    type Item = PipelineEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<PipelineEvent>> {
        self.rx.poll_recv(cx)
    }
}

/// An event delivered to an actor by [`forward_to_actor`]. It holds one of
/// the actor's [`ACTOR_EVENT_WINDOW`] permits until it is dropped, so keep
/// it only while handling it.
#[derive(Debug)]
pub struct ActorEvent {
    event: PipelineEvent,
    _permit: OwnedSemaphorePermit,
}

impl ActorEvent {
    /// The event.
    pub fn event(&self) -> &PipelineEvent {
        &self.event
    }

    /// The event, giving the permit back.
    pub fn into_event(self) -> PipelineEvent {
        self.event
    }
}

impl std::ops::Deref for ActorEvent {
    type Target = PipelineEvent;

    fn deref(&self) -> &PipelineEvent {
        &self.event
    }
}

/// Delivers `events` to `actor` as its own messages (`M: From<ActorEvent>`),
/// until the stream ends or the actor stops. At most
/// [`ACTOR_EVENT_WINDOW`] delivered events are held by the actor at once;
/// past that, forwarding waits, and the stream's own policy applies.
pub fn forward_to_actor<M>(
    mut events: EventStream,
    actor: ActorRef<M>,
) -> tokio::task::JoinHandle<()>
where
    M: Message + From<ActorEvent>,
{
    let window = Arc::new(Semaphore::new(ACTOR_EVENT_WINDOW));
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let Ok(permit) = window.clone().acquire_owned().await else {
                break;
            };
            let message = M::from(ActorEvent {
                event,
                _permit: permit,
            });
            if actor.cast(message).is_err() {
                break;
            }
        }
    })
}
