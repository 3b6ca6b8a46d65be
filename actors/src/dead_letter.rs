//! Dead letters: every item that ends without success, handed to a sink the
//! user gives the pipeline, so that it can be stored, looked into and
//! replayed.
//!
//! A dead letter carries the item's id, its [`ItemError`] (stage, kind,
//! message, attempts), its metadata (lineage: the stages it went through
//! and their times, and the user's custom metadata) and, when the stage it
//! failed in keeps its inputs (stages bound to retry do), the input of its
//! last attempt. [`DeadLetter::replay`] turns a letter back into a fresh
//! item for [`inject`](crate::Pipeline::inject) when that input
//! is of the pipeline's input type (the item failed in the first stage, or
//! the stages before did not change its type); otherwise the job id is the
//! handle to fetch the work again.
//!
//! ```
//! use bergtalzug_actors::dead_letter::DeadLetter;
//!
//! fn store(letter: DeadLetter) {
//!     eprintln!(
//!         "{} failed in `{}` after {} attempt(s): {}",
//!         letter.job_id, letter.error.stage, letter.error.attempts, letter.error.message
//!     );
//! }
//! # let _ = store;
//! ```

use std::any::Any;
use std::fmt;

use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::item::{ItemError, JobId, WorkItem, WorkItemMetadata, WorkItemResult};

/// An item that ended without success.
#[non_exhaustive]
pub struct DeadLetter {
    /// The item's id.
    pub job_id: JobId,
    /// Where and how it failed, and after how many attempts.
    pub error: ItemError,
    /// Its metadata when it failed: created, the stages it entered with
    /// their times and attempts, and the user's custom metadata.
    pub metadata: WorkItemMetadata,
    /// The last attempt's input, a `WorkItem` of the failing stage's input
    /// type, when that stage kept one.
    input: Option<Box<dyn Any + Send>>,
}

impl fmt::Debug for DeadLetter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetter")
            .field("job_id", &self.job_id)
            .field("error", &self.error)
            .field("has_input", &self.input.is_some())
            .finish_non_exhaustive()
    }
}

impl DeadLetter {
    pub(crate) fn new(result: &WorkItemResult, input: Option<Box<dyn Any + Send>>) -> Option<Self> {
        Some(DeadLetter {
            job_id: result.job_id.clone(),
            error: result.error.as_deref()?.clone(),
            metadata: result.metadata.clone(),
            input,
        })
    }

    /// Whether the failing stage kept the item's input.
    pub fn has_input(&self) -> bool {
        self.input.is_some()
    }

    /// The last attempt's input, if the stage kept it and it is a
    /// `WorkItem<I>`.
    pub fn input<I: 'static>(&self) -> Option<&WorkItem<I>> {
        self.input.as_ref()?.downcast_ref()
    }

    /// A fresh item with the same job id, data and custom metadata, ready
    /// to inject again; `None` when there is no kept input of type `I`.
    pub fn replay<I: 'static>(self) -> Option<WorkItem<I>> {
        let old = *self.input?.downcast::<WorkItem<I>>().ok()?;
        let mut item = WorkItem::with_job_id(old.head.job_id, old.data);
        item.head.metadata.custom = old.head.metadata.custom;
        Some(item)
    }
}

/// Where dead letters go.
#[non_exhaustive]
pub enum DeadLetterSink {
    /// Called on the tracker's task for each letter; keep it quick. A panic
    /// in it is logged and the letter dropped.
    Callback(Box<dyn FnMut(DeadLetter) + Send>),
    /// Sent into a bounded channel; a full channel holds the tracker (and so
    /// the pipeline) back until the receiver catches up, with a warning
    /// after a second, so read it while the pipeline runs. `abort` and a
    /// stop's deadline do not wait for it: the letters left are then
    /// buffered (at most the items still in the pipeline) and forwarded by
    /// a task as the receiver reads, even after `run` returned. A dropped
    /// receiver is logged once and its letters dropped.
    Channel(mpsc::Sender<DeadLetter>),
}

impl fmt::Debug for DeadLetterSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeadLetterSink::Callback(_) => "DeadLetterSink::Callback",
            DeadLetterSink::Channel(_) => "DeadLetterSink::Channel",
        })
    }
}

impl DeadLetterSink {
    /// Delivers one letter. Returns false once the sink is gone for good.
    ///
    /// A full channel is waited for (logged after
    /// [`SUBSCRIBER_STALL_WARNING`](crate::event::SUBSCRIBER_STALL_WARNING),
    /// then every 30 s) until `stop_waiting` turns true (abort, a stop's
    /// deadline): from then on letters go through a buffer of `spill`
    /// letters (the most the pipeline can still end) that a task forwards
    /// to the receiver as it reads, so none is lost and the pipeline ends.
    pub(crate) async fn deliver(
        &mut self,
        letter: DeadLetter,
        pipeline: &str,
        stop_waiting: &mut watch::Receiver<bool>,
        spill: usize,
        hub: &crate::event::EventHub,
    ) -> bool {
        match self {
            DeadLetterSink::Callback(callback) => {
                let job_id = letter.job_id.clone();
                let call = std::panic::AssertUnwindSafe(|| callback(letter));
                if let Err(panic) = std::panic::catch_unwind(call) {
                    let message = crate::contain::take_message(panic);
                    tracing::error!(target: "bergtalzug::tracker", %job_id, "dead-letter callback panicked: {message}");
                }
                true
            }
            DeadLetterSink::Channel(sender) => {
                let letter = match sender.try_send(letter) {
                    Ok(()) => return true,
                    Err(mpsc::error::TrySendError::Closed(letter)) => {
                        // Its input's `Drop` is user code.
                        crate::contain::drop_logged(letter, || "an undelivered dead letter".into());
                        return false;
                    }
                    Err(mpsc::error::TrySendError::Full(letter)) => letter,
                };
                let warning = crate::event::SUBSCRIBER_STALL_WARNING;
                let mut waited = Duration::ZERO;
                if !*stop_waiting.borrow() {
                    let target = sender.clone();
                    let reserve = target.reserve();
                    tokio::pin!(reserve);
                    loop {
                        tokio::select! {
                            biased;
                            permit = &mut reserve => {
                                if !waited.is_zero() {
                                    hub.set_held_back_by(None);
                                }
                                return match permit {
                                Ok(permit) => {
                                    permit.send(letter);
                                    true
                                }
                                Err(_) => false,
                            }},
                            _ = stop_waiting.wait_for(|stop| *stop) => break,
                            _ = tokio::time::sleep(warning) => {
                                waited += warning;
                                if waited == warning {
                                    hub.set_held_back_by(Some("dead-letter receiver".into()));
                                }
                                if waited == warning || waited.as_secs().is_multiple_of(30) {
                                    tracing::warn!(target: "bergtalzug::tracker",
                                        pipeline,
                                        "the pipeline has waited {waited:.1?} for the dead-letter receiver: \
                                         its channel is full (read it while the pipeline runs, or use on_dead_letter)"
                                    );
                                }
                            }
                        }
                    }
                }
                if !waited.is_zero() {
                    hub.set_held_back_by(None);
                }
                // No more waiting: a task takes the letters to the receiver.
                let (spilled, mut rx) = mpsc::channel(spill.max(1));
                let target = std::mem::replace(sender, spilled);
                tokio::spawn(async move {
                    while let Some(letter) = rx.recv().await {
                        if target.send(letter).await.is_err() {
                            break;
                        }
                    }
                });
                sender.try_send(letter).is_ok()
            }
        }
    }
}
