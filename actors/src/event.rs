//! Pipeline events and their subscribers.
//!
//! Every event is one [`PipelineEvent`]; `docs/events.md` lists them all.
//!
//! # Delivery
//!
//! Each subscriber has its own bounded buffer ([`EVENT_BUFFER`] events).
//! What happens when it is full is the subscriber's choice:
//!
//! - **Lossy** (the default: `subscribe()`, any filter): the pipeline never
//!   waits for the subscriber. A full buffer drops its oldest event to make
//!   room, so a subscriber that falls behind sees the latest events and
//!   always the last one (`PipelineFinished`); [`EventStream::dropped`]
//!   counts what it lost. A stream kept and never read costs its buffer
//!   and nothing else.
//! - **Lossless** ([`EventFilter::lossless`]): terminal and control events
//!   (`ItemFinished`, `WorkerRestarted`, `ItemStalled`, `SourceError`,
//!   `PipelineFinished`) are never dropped: when the buffer
//!   is full the tracker waits for the subscriber, and the pipeline slows
//!   to its pace (its memory stays bounded because the source admits new
//!   items only as old ones are tracked). A wait of more than
//!   [`SUBSCRIBER_STALL_WARNING`] is logged as a warning naming the place
//!   the subscriber subscribed, and sent to the other subscribers as
//!   [`PipelineEvent::SubscriberStalled`]. `abort` and the deadline of
//!   `stop_within` do not wait for it: from then on what does not fit is
//!   kept for it beyond its buffer (at most the items still in the
//!   pipeline). Drop a lossless stream you stop reading.
//!
//! **Lifecycle events** (`ItemQueued`, `ItemStarted`, `ItemCompleted`) are
//! sent only while someone subscribes to them and never slow the data
//! path: a full lossless buffer drops them, counted in
//! [`EventStream::dropped`].
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
//! the stream's policy above takes over (lossy: its oldest events go;
//! lossless: the pipeline waits), so its mailbox stays bounded too.

use std::collections::VecDeque;
use std::panic::Location;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use ractor::{ActorRef, Message};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

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
    /// The pipeline has waited [`SUBSCRIBER_STALL_WARNING`] (then every
    /// 30 s) for a lossless subscriber whose buffer is full; sent to the
    /// other subscribers, and logged as a warning. Control, but never
    /// waited for: a full buffer drops it.
    SubscriberStalled {
        /// Where the stalled subscriber subscribed (`file:line:column`).
        subscriber: String,
        /// How long the pipeline has waited for it so far.
        waited: std::time::Duration,
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
            PipelineEvent::SourceError { .. }
            | PipelineEvent::SubscriberStalled { .. }
            | PipelineEvent::PipelineFinished(_) => None,
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
    lossless: bool,
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
            lossless: false,
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
            lossless: false,
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

    /// Adds `WorkerRestarted`, `ItemStalled`, `SubscriberStalled` and `SourceError`.
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

    /// Delivers terminal and control events losslessly: when this
    /// subscriber's buffer is full, the pipeline waits for it (and slows to
    /// its pace) instead of dropping its oldest events. An explicit choice,
    /// because a lossless subscriber that stops reading holds the pipeline
    /// back: the wait is logged as a warning naming where it subscribed,
    /// and sent to the other subscribers as
    /// [`PipelineEvent::SubscriberStalled`]. `abort` and a stop's deadline
    /// stop waiting for it (what does not fit its buffer is then kept for
    /// it beyond the buffer: at most the items still in the pipeline).
    /// Lifecycle events are still dropped when its buffer is full.
    pub fn lossless(mut self) -> Self {
        self.lossless = true;
        self
    }

    /// Whether [`EventFilter::lossless`] was asked for.
    pub fn is_lossless(&self) -> bool {
        self.lossless
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
            | PipelineEvent::SubscriberStalled { .. }
            | PipelineEvent::SourceError { .. } => self.control,
        };
        kind && match &self.stage {
            None => true,
            Some(stage) => event.stage() == Some(&**stage),
        }
    }
}

/// How long a lossless publish waits for a full subscriber before it says so.
pub const SUBSCRIBER_STALL_WARNING: std::time::Duration = std::time::Duration::from_secs(1);

/// One subscriber's bounded buffer: a queue the publishers push to and the
/// [`EventStream`] pops from.
struct Ring {
    inner: Mutex<RingInner>,
    /// The stream's task, woken when an event arrives or the ring closes.
    reader: AtomicWaker,
    /// A lossless publisher waiting for room (only the tracker waits).
    room: Notify,
    dropped: AtomicU64,
    lossless: bool,
    /// Who subscribed, for warnings: where `subscribe` was called.
    origin: String,
}

struct RingInner {
    queue: VecDeque<PipelineEvent>,
    /// No more events will come.
    closed: bool,
    /// The stream was dropped.
    gone: bool,
}

impl Ring {
    fn lock(&self) -> std::sync::MutexGuard<'_, RingInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pushes without waiting. When the buffer is full, a lossy ring drops
    /// its oldest event and a lossless ring drops `event` if it may be
    /// dropped (`droppable`); a lossless ring past its capacity only takes
    /// undroppable events once waiting has been given up (`overflow`).
    /// Returns `Err(event)` when a lossless publisher must wait, `Ok(false)`
    /// when the stream is gone.
    fn try_push(
        &self,
        event: PipelineEvent,
        droppable: bool,
        overflow: bool,
    ) -> Result<bool, PipelineEvent> {
        let mut inner = self.lock();
        if inner.gone || inner.closed {
            return Ok(!inner.gone);
        }
        if inner.queue.len() >= EVENT_BUFFER {
            if !self.lossless {
                inner.queue.pop_front();
                self.dropped.fetch_add(1, Ordering::Relaxed);
            } else if droppable {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return Ok(true);
            } else if !overflow {
                return Err(event);
            }
        }
        inner.queue.push_back(event);
        drop(inner);
        self.reader.wake();
        Ok(true)
    }

    fn close(&self) {
        self.lock().closed = true;
        self.reader.wake();
        self.room.notify_one();
    }
}

struct Subscriber {
    ring: Arc<Ring>,
    filter: EventFilter,
}

/// The subscriber list shared by the actors that publish events.
#[derive(Default)]
pub(crate) struct EventHub {
    subscribers: Mutex<Vec<Subscriber>>,
    any: AtomicBool,
    lifecycle: AtomicBool,
    /// Someone's filter takes `ItemFinished` of items that succeeded.
    finished_ok: AtomicBool,
    /// Someone's filter takes `ItemFinished` of items that failed.
    finished_failed: AtomicBool,
    closed: AtomicBool,
    /// Set on abort (and when a deadline passes): lossless publishers stop
    /// waiting, and a full lossless buffer grows past its size instead
    /// (by at most the items still in the pipeline, as the input is closed).
    overflow: AtomicBool,
    /// The observer a publisher has waited for longer than
    /// [`SUBSCRIBER_STALL_WARNING`], while it still waits.
    held_back_by: Mutex<Option<String>>,
}

impl std::fmt::Debug for EventHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventHub")
            .field("subscribed", &self.has_subscribers())
            .finish()
    }
}

impl EventHub {
    /// A new subscriber; receives the events `filter` matches, from now on,
    /// as the filter's delivery says (lossy unless [`EventFilter::lossless`]).
    #[track_caller]
    pub(crate) fn subscribe(&self, filter: EventFilter) -> EventStream {
        self.subscribe_as(filter, Location::caller().to_string())
    }

    /// A new subscriber called `origin` in warnings (where it subscribed).
    pub(crate) fn subscribe_as(&self, filter: EventFilter, origin: String) -> EventStream {
        let ring = Arc::new(Ring {
            inner: Mutex::new(RingInner {
                queue: VecDeque::new(),
                closed: false,
                gone: false,
            }),
            reader: AtomicWaker::new(),
            room: Notify::new(),
            dropped: AtomicU64::new(0),
            lossless: filter.lossless,
            origin,
        });
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        if self.closed.load(Ordering::Acquire) {
            ring.lock().closed = true;
        } else {
            subs.push(Subscriber {
                ring: ring.clone(),
                filter,
            });
            self.refresh(&subs);
        }
        EventStream { ring }
    }

    fn refresh(&self, subs: &[Subscriber]) {
        self.any.store(!subs.is_empty(), Ordering::Release);
        let lifecycle = subs.iter().any(|s| s.filter.lifecycle);
        self.lifecycle.store(lifecycle, Ordering::Release);
        let finished_ok = subs
            .iter()
            .any(|s| s.filter.finished && !s.filter.failures_only);
        self.finished_ok.store(finished_ok, Ordering::Release);
        let finished_failed = subs.iter().any(|s| s.filter.finished);
        self.finished_failed
            .store(finished_failed, Ordering::Release);
    }

    /// True while some subscriber's filter takes the `ItemFinished` of an
    /// item that succeeded (`success`) or failed: the tracker builds only
    /// those (a failures-only subscriber costs nothing per success).
    #[inline]
    pub(crate) fn wants_finished(&self, success: bool) -> bool {
        match success {
            true => self.finished_ok.load(Ordering::Relaxed),
            false => self.finished_failed.load(Ordering::Relaxed),
        }
    }

    /// True while anyone listens: publishers skip building events otherwise.
    #[inline]
    pub(crate) fn has_subscribers(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    /// True while anyone listens to lifecycle events.
    #[inline]
    pub(crate) fn wants_lifecycle(&self) -> bool {
        self.lifecycle.load(Ordering::Relaxed)
    }

    /// Publishes lifecycle events without waiting: a full buffer drops them
    /// (a lossy one its oldest events), counted per subscriber.
    pub(crate) fn lifecycle(&self, events: Vec<PipelineEvent>) {
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        let before = subs.len();
        subs.retain(|s| {
            events
                .iter()
                .filter(|e| s.filter.matches(e))
                .all(|e| !matches!(s.ring.try_push(e.clone(), true, false), Ok(false)))
        });
        if subs.len() != before {
            self.refresh(&subs);
        }
    }

    /// Publishes terminal and control events: a lossy subscriber never
    /// holds this up (its oldest events make room); a lossless one is
    /// waited for until it has room, the hub is told to stop waiting
    /// ([`EventHub::stop_waiting`]: abort, a deadline) or its stream is
    /// dropped. A wait longer than [`SUBSCRIBER_STALL_WARNING`] is logged,
    /// naming where the subscriber subscribed, and reported to the other
    /// subscribers as [`PipelineEvent::SubscriberStalled`].
    pub(crate) async fn publish(&self, pipeline: &str, events: Vec<PipelineEvent>) {
        let rings: Vec<(Arc<Ring>, EventFilter)> = {
            let subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
            subs.iter()
                .map(|s| (s.ring.clone(), s.filter.clone()))
                .collect()
        };
        let mut gone = false;
        for (ring, filter) in &rings {
            for event in events.iter().filter(|e| filter.matches(e)) {
                if !self.push_waiting(pipeline, ring, event.clone()).await {
                    gone = true;
                    break;
                }
            }
        }
        if gone {
            let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
            subs.retain(|s| !s.ring.lock().gone);
            self.refresh(&subs);
        }
    }

    /// Pushes one event, waiting for a lossless ring's room; false when the
    /// stream is gone.
    async fn push_waiting(&self, pipeline: &str, ring: &Ring, event: PipelineEvent) -> bool {
        let mut event = event;
        let mut waited = std::time::Duration::ZERO;
        loop {
            let overflow = self.overflow.load(Ordering::Acquire);
            match ring.try_push(event, false, overflow) {
                Ok(open) => {
                    if !waited.is_zero() {
                        self.set_held_back_by(None);
                        tracing::info!(target: "bergtalzug::events",
                            pipeline,
                            subscriber = %ring.origin,
                            "the lossless event subscriber at {} read again after {waited:.1?}",
                            ring.origin
                        );
                    }
                    return open;
                }
                Err(back) => event = back,
            }
            let room = ring.room.notified();
            if tokio::time::timeout(SUBSCRIBER_STALL_WARNING, room)
                .await
                .is_err()
            {
                waited += SUBSCRIBER_STALL_WARNING;
                // Said at once, then every half minute while it lasts.
                if waited == SUBSCRIBER_STALL_WARNING || waited.as_secs().is_multiple_of(30) {
                    self.stalled(pipeline, ring, waited);
                }
            }
        }
    }

    /// Says that the pipeline waits for `ring`'s subscriber.
    fn stalled(&self, pipeline: &str, ring: &Ring, waited: std::time::Duration) {
        let subscriber = ring.origin.clone();
        self.set_held_back_by(Some(format!("subscriber at {subscriber}")));
        tracing::warn!(target: "bergtalzug::events",
            pipeline,
            subscriber = %subscriber,
            "the pipeline has waited {waited:.1?} for the lossless event subscriber at {subscriber}: \
             its buffer of {EVENT_BUFFER} events is full and it does not read (read it, drop it, or subscribe lossy)"
        );
        let event = PipelineEvent::SubscriberStalled { subscriber, waited };
        let subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        for s in subs.iter() {
            if !std::ptr::eq(Arc::as_ptr(&s.ring), ring) && s.filter.matches(&event) {
                let _ = s.ring.try_push(event.clone(), true, false);
            }
        }
    }

    /// The observer the pipeline waits for now, if it has waited for it
    /// longer than [`SUBSCRIBER_STALL_WARNING`] (for `PipelineStats`).
    pub(crate) fn held_back_by(&self) -> Option<String> {
        self.held_back_by
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records (`Some`) or clears the observer the pipeline waits for.
    pub(crate) fn set_held_back_by(&self, observer: Option<String>) {
        *self.held_back_by.lock().unwrap_or_else(|e| e.into_inner()) = observer;
    }

    /// Lossless subscribers are no longer waited for (abort, a stop's
    /// deadline): what does not fit their buffers is kept beyond them.
    pub(crate) fn stop_waiting(&self) {
        self.overflow.store(true, Ordering::Release);
        let subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        for s in subs.iter() {
            s.ring.room.notify_one();
        }
    }

    /// Ends every stream: no more events will come.
    pub(crate) fn close(&self) {
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        self.closed.store(true, Ordering::Release);
        for s in subs.drain(..) {
            s.ring.close();
        }
        self.refresh(&subs);
    }
}

/// A subscription to a pipeline's events; ends after `PipelineFinished`.
///
/// Read it with [`EventStream::recv`] or as a `futures::Stream`.
pub struct EventStream {
    ring: Arc<Ring>,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("lossless", &self.ring.lossless)
            .field("subscribed_at", &self.ring.origin)
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl EventStream {
    /// The next event, or `None` once the pipeline has finished.
    pub async fn recv(&mut self) -> Option<PipelineEvent> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    /// The next event if one is ready.
    pub fn try_recv(&mut self) -> Option<PipelineEvent> {
        self.pop()
    }

    fn pop(&self) -> Option<PipelineEvent> {
        let event = self.ring.lock().queue.pop_front();
        if event.is_some() && self.ring.lossless {
            self.ring.room.notify_one();
        }
        event
    }

    fn poll_event(&self, cx: &mut Context<'_>) -> Poll<Option<PipelineEvent>> {
        self.ring.reader.register(cx.waker());
        if let Some(event) = self.pop() {
            return Poll::Ready(Some(event));
        }
        if self.ring.lock().closed {
            // An event may have come just before the close.
            return Poll::Ready(self.pop());
        }
        Poll::Pending
    }

    /// How many events this stream lost because its buffer was full: for a
    /// lossy subscription (the default), the oldest events it had not read;
    /// for a lossless one, lifecycle events only.
    pub fn dropped(&self) -> u64 {
        self.ring.dropped.load(Ordering::Relaxed)
    }

    /// Whether the pipeline waits for this subscriber rather than drop its
    /// terminal and control events ([`EventFilter::lossless`]).
    pub fn is_lossless(&self) -> bool {
        self.ring.lossless
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.ring.lock().gone = true;
        self.ring.room.notify_one();
    }
}

impl futures::Stream for EventStream {
    type Item = PipelineEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<PipelineEvent>> {
        self.poll_event(cx)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn restart(n: u64) -> PipelineEvent {
        PipelineEvent::WorkerRestarted {
            stage: "s".into(),
            worker: WorkerId(n),
            replacement: WorkerId(n + 1),
            reason: String::new(),
        }
    }

    fn worker_of(event: &PipelineEvent) -> u64 {
        match event {
            PipelineEvent::WorkerRestarted { worker, .. } => worker.0,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_lossy_stream_drops_its_oldest_events_and_never_waits() {
        let hub = EventHub::default();
        let mut stream = hub.subscribe(EventFilter::all());
        let n = EVENT_BUFFER as u64 + 100;
        hub.publish("p", (0..n).map(restart).collect()).await;
        assert_eq!(stream.dropped(), 100);
        hub.close();
        let mut got = Vec::new();
        while let Some(event) = stream.recv().await {
            got.push(worker_of(&event));
        }
        assert_eq!(got, (100..n).collect::<Vec<_>>(), "the newest, in order");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_lossless_stream_is_waited_for_until_read_or_told_to_stop() {
        let hub = Arc::new(EventHub::default());
        let mut stream = hub.subscribe(EventFilter::all().lossless());
        let full = (0..EVENT_BUFFER as u64).map(restart).collect();
        hub.publish("p", full).await;
        // Lifecycle events never wait: dropped and counted.
        hub.lifecycle(vec![PipelineEvent::ItemQueued {
            job_id: "j".into(),
            stage: "s".into(),
        }]);
        assert_eq!(stream.dropped(), 1);
        let waiting = tokio::spawn({
            let hub = hub.clone();
            async move { hub.publish("p", vec![restart(9_000)]).await }
        });
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        assert!(!waiting.is_finished(), "waits for room");
        assert!(hub.held_back_by().unwrap().contains("event.rs"));
        assert_eq!(worker_of(&stream.recv().await.unwrap()), 0);
        waiting.await.unwrap();
        assert_eq!(hub.held_back_by(), None);
        // Told to stop waiting: the buffer grows instead.
        hub.stop_waiting();
        hub.publish("p", vec![restart(9_001), restart(9_002)]).await;
        hub.close();
        let mut last = Vec::new();
        while let Some(event) = stream.recv().await {
            last.push(worker_of(&event));
        }
        assert_eq!(last.len(), EVENT_BUFFER + 2, "nothing lost");
        assert_eq!(&last[last.len() - 3..], &[9_000, 9_001, 9_002]);
    }
}
