//! The stage's inbox for its workers' reports, behind one doorbell.
//!
//! A worker puts its report in the inbox; the first report put in since
//! the stage last emptied it rings the stage (one `StageMsg::Reports`),
//! and the stage empties the inbox at the start of every message it
//! handles. So while the stage is busy, the reports of all its workers
//! cost it one message, not one each, and what they finished goes on in
//! one batch.
//!
//! **Order**: the reports are taken in the order they were put in, and
//! before whatever message the stage handles next. A worker's `Reap` is
//! sent once its death is known, after every report it put in (a blocking
//! thread that outlives its worker reports under the hand's lock, which
//! the death closes first), so the reap finds them taken, as it found them
//! ahead of it in the mailbox before.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::outcome::WorkerReport;

pub(super) struct Inbox<I, O> {
    state: Mutex<State<I, O>>,
    /// Reports put in and not taken: while some are, what the stage
    /// finished waits for them, to go downstream in one batch.
    len: AtomicUsize,
}

struct State<I, O> {
    reports: Vec<WorkerReport<I, O>>,
    /// A doorbell is on its way to the stage: the next report put in
    /// rings no other.
    rung: bool,
}

impl<I, O> Inbox<I, O> {
    pub(super) fn new() -> Self {
        Inbox {
            state: Mutex::new(State {
                reports: Vec::new(),
                rung: false,
            }),
            len: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<I, O>> {
        // Nothing under the lock can panic but an allocation.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From a worker: puts `report` in; `true` when the stage is to be rung
    /// (no doorbell is on its way). The caller rings it after this returns,
    /// outside the lock, and calls [`Inbox::unrung`] if it cannot.
    pub(super) fn put(&self, report: WorkerReport<I, O>) -> bool {
        let mut state = self.lock();
        state.reports.push(report);
        self.len.fetch_add(1, Ordering::Release);
        !std::mem::replace(&mut state.rung, true)
    }

    /// The doorbell could not be rung (the stage is gone): everything in
    /// the inbox, for its items to be dropped where their `Drop` is
    /// contained. The next report put in tries to ring again, and so
    /// takes what was put in meanwhile.
    pub(super) fn unrung(&self) -> Vec<WorkerReport<I, O>> {
        let mut state = self.lock();
        state.rung = false;
        self.len.store(0, Ordering::Release);
        std::mem::take(&mut state.reports)
    }

    /// From the stage: every report put in, in order, into `reports`
    /// (empty; it becomes the inbox's buffer, so that the two are reused
    /// in turn). A doorbell on its way may then find the inbox empty; a
    /// report put in after this rings again.
    pub(super) fn take(&self, reports: &mut Vec<WorkerReport<I, O>>) {
        debug_assert!(reports.is_empty());
        if self.len.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut state = self.lock();
        state.rung = false;
        self.len.store(0, Ordering::Release);
        std::mem::swap(&mut state.reports, reports);
    }

    /// Whether reports are waiting to be taken.
    pub(super) fn waiting(&self) -> bool {
        self.len.load(Ordering::Acquire) > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::WorkerId;
    use std::time::Duration;

    fn report(worker: u64) -> WorkerReport<u32, u32> {
        WorkerReport {
            worker: WorkerId(worker),
            outcomes: Vec::new(),
            returned: Vec::new(),
            busy: Duration::ZERO,
            failing: None,
        }
    }

    fn workers(reports: &[WorkerReport<u32, u32>]) -> Vec<u64> {
        reports.iter().map(|r| r.worker.0).collect()
    }

    /// One doorbell for however many reports come before the stage takes
    /// them, in the order they came; one more for the first after.
    #[test]
    fn reports_before_the_stage_takes_them_ring_once_and_keep_their_order() {
        let inbox = Inbox::<u32, u32>::new();
        assert!(inbox.put(report(1)), "the first report rings");
        assert!(!inbox.put(report(2)), "a doorbell is on its way");
        assert!(!inbox.put(report(1)));
        assert!(inbox.waiting());

        let mut taken = Vec::new();
        inbox.take(&mut taken);
        assert_eq!(workers(&taken), [1, 2, 1]);
        assert!(!inbox.waiting());

        // The doorbell on its way finds nothing; the next report rings.
        let mut none = Vec::new();
        inbox.take(&mut none);
        assert!(none.is_empty());
        assert!(inbox.put(report(3)), "the first report after a take rings");
    }

    /// A stage that is gone hands back every report not taken, and the
    /// next report tries to ring again rather than wait in the inbox.
    #[test]
    fn a_doorbell_that_cannot_ring_hands_back_every_report_not_taken() {
        let inbox = Inbox::<u32, u32>::new();
        assert!(inbox.put(report(1)));
        assert!(!inbox.put(report(2)));
        assert_eq!(workers(&inbox.unrung()), [1, 2]);
        assert!(!inbox.waiting());
        assert!(inbox.put(report(3)), "it rings again");
    }
}
