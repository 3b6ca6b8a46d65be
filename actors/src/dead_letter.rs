//! Dead letters: every item that ends without success, handed to a sink the
//! user gives the pipeline, so that it can be stored, looked into and
//! replayed.
//!
//! A dead letter carries the item's id, its [`ItemError`] (stage, kind,
//! message, attempts), its metadata (lineage: the stages it went through
//! and their times, and the user's custom metadata) and, when the stage it
//! failed in keeps its inputs (stages bound to retry do), the input of its
//! last attempt. [`DeadLetter::replay`] turns a letter back into a fresh
//! item for [`inject`](crate::root::PipelineRuntime::inject) when that input
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

use tokio::sync::mpsc;

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
            error: result.error.clone()?,
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
        let mut item = WorkItem::with_job_id(old.job_id, old.data);
        item.metadata.custom = old.metadata.custom;
        Some(item)
    }
}

/// Where dead letters go.
pub enum DeadLetterSink {
    /// Called on the tracker's task for each letter; keep it quick. A panic
    /// in it is logged and the letter dropped.
    Callback(Box<dyn FnMut(DeadLetter) + Send>),
    /// Sent into a bounded channel; a full channel holds the tracker (and so
    /// the pipeline) back until the receiver catches up. A dropped receiver
    /// is logged once and its letters dropped.
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
    pub(crate) async fn deliver(&mut self, letter: DeadLetter) -> bool {
        match self {
            DeadLetterSink::Callback(callback) => {
                let job_id = letter.job_id.clone();
                let call = std::panic::AssertUnwindSafe(|| callback(letter));
                if let Err(panic) = std::panic::catch_unwind(call) {
                    tracing::error!(
                        %job_id,
                        "dead-letter callback panicked: {}",
                        crate::runner::panic_message(&*panic)
                    );
                }
                true
            }
            DeadLetterSink::Channel(sender) => sender.send(letter).await.is_ok(),
        }
    }
}
