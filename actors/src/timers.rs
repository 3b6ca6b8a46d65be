//! Timers an actor sets for itself that end with it.
//!
//! `ActorRef::send_after` spawns a task that sleeps and then sends; the
//! task outlives the actor until its sleep runs out. For a long wait (a
//! retry's backoff, a rate limit's pace, a batch's wait, a failing
//! source's backoff) that keeps a task and the actor's cell alive long
//! after the pipeline finished. [`Timers`] keeps the handles and aborts
//! them when it is dropped with the actor's state, however the actor ends.

use std::time::Duration;

use ractor::{ActorRef, Message, MessagingErr};
use tokio::task::JoinHandle;

/// An actor's pending timers, aborted when dropped.
pub(crate) struct Timers<M>(Vec<JoinHandle<Result<(), MessagingErr<M>>>>);

impl<M: Message> Timers<M> {
    pub(crate) fn new() -> Self {
        Timers(Vec::new())
    }

    /// Sends `message()` to `to` after `wait`. Timers that have fired are
    /// forgotten here, so the list holds only the pending ones (and at
    /// most one that fired since the last call).
    pub(crate) fn after(&mut self, to: &ActorRef<M>, wait: Duration, message: fn() -> M) {
        self.0.retain(|timer| !timer.is_finished());
        self.0.push(to.send_after(wait, message));
    }
}

impl<M> Drop for Timers<M> {
    fn drop(&mut self) {
        for timer in &self.0 {
            timer.abort();
        }
    }
}
