//! Pipeline events and their subscribers.
//!
//! Every event is one [`PipelineEvent`]; `docs/events.md` lists them all.
//!
//! # Delivery
//!
//! Each subscriber has its own bounded buffer ([`EVENT_BUFFER`] events).
//!
//! - **Terminal and control events** (`ItemFinished`, `WorkerRestarted`,
//!   `SourceError`, `PipelineFinished`) are never dropped: when a
//!   subscriber's buffer is full the tracker waits for it, and the pipeline
//!   slows to the subscriber's pace (its memory stays bounded because the
//!   source admits new items only as old ones are tracked).
//! - **Lifecycle events** (`ItemQueued`, `ItemStarted`, `ItemCompleted`)
//!   are sent only while someone subscribes, and dropped when the buffer is
//!   full; [`EventStream::dropped`] counts them. They never slow the data path.
//!
//! Drop an [`EventStream`] you no longer read: a subscriber that never reads
//! holds the pipeline back once its buffer is full.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::sync::mpsc;

use crate::item::{JobId, WorkItemResult};
use crate::stats::PipelineStats;

/// How many events a subscriber's buffer holds.
pub const EVENT_BUFFER: usize = 4096;

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

struct Subscriber {
    tx: mpsc::Sender<PipelineEvent>,
    dropped: Arc<AtomicU64>,
}

/// The subscriber list shared by the actors that publish events.
#[derive(Default)]
pub struct EventHub {
    subscribers: Mutex<Vec<Subscriber>>,
    any: AtomicBool,
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
    /// A new subscriber; receives every event published from now on.
    pub fn subscribe(&self) -> EventStream {
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        if !self.closed.load(Ordering::Acquire) {
            subs.push(Subscriber {
                tx,
                dropped: dropped.clone(),
            });
            self.any.store(true, Ordering::Release);
        }
        EventStream { rx, dropped }
    }

    /// True while anyone listens: publishers skip building events otherwise.
    #[inline]
    pub fn has_subscribers(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    /// Publishes lifecycle events without waiting: a full buffer drops them
    /// (counted per subscriber).
    pub(crate) fn lifecycle(&self, events: Vec<PipelineEvent>) {
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subs.retain(|s| {
            for event in &events {
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
        self.any.store(!subs.is_empty(), Ordering::Release);
    }

    /// Publishes events every subscriber must get, waiting for room.
    pub(crate) async fn publish(&self, events: Vec<PipelineEvent>) {
        let senders: Vec<mpsc::Sender<PipelineEvent>> = {
            let subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
            subs.iter().map(|s| s.tx.clone()).collect()
        };
        let mut gone = false;
        for tx in &senders {
            for event in &events {
                if tx.send(event.clone()).await.is_err() {
                    gone = true;
                    break;
                }
            }
        }
        if gone {
            let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
            subs.retain(|s| !s.tx.is_closed());
            self.any.store(!subs.is_empty(), Ordering::Release);
        }
    }

    /// Ends every stream: no more events will come.
    pub(crate) fn close(&self) {
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        self.closed.store(true, Ordering::Release);
        subs.clear();
        self.any.store(false, Ordering::Release);
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
