//! Stalled items: those a worker has held `stall_threshold` or longer,
//! looked for when the monitor asks (`StageMsg::CheckStalls`).
//!
//! The item looked at is the one a blocking handler runs, if one does
//! (the items before it in its batch may be done and not reported yet),
//! else the front of what the worker holds; its age is counted from when
//! the worker was given it or last reported, whichever came later (for a
//! blocking worker that overstates it by about the report period at most).
//!
//! **Invariant**: each item is reported at most once while the worker
//! that holds it goes without a report.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ractor::ActorRef;

use super::pool::Pool;
use crate::event::{PipelineEvent, WorkerId};
use crate::item::JobId;
use crate::shared::Shared;
use crate::tracker::TrackerMsg;

/// An item held too long.
pub(super) struct Stalled {
    pub(super) job_id: JobId,
    pub(super) worker: WorkerId,
    pub(super) age: Duration,
}

impl<I: Send + 'static, O: Send + 'static> Pool<I, O> {
    /// The items at the front of a worker's batch held `threshold` or
    /// longer and not reported yet; marked reported.
    pub(super) fn stalled(&mut self, threshold: Duration, now: Instant) -> Vec<Stalled> {
        let mut stalled = Vec::new();
        for (worker, slot) in &mut self.slots {
            let Some((front, _, _)) = slot.held.front() else {
                continue;
            };
            let age = now.saturating_duration_since(slot.since);
            if slot.stalled || slot.failing || slot.dead || age < threshold {
                continue;
            }
            let job_id = slot.hand.running().unwrap_or_else(|| front.clone());
            slot.stalled = true;
            stalled.push(Stalled {
                job_id,
                worker: *worker,
                age,
            });
        }
        stalled
    }
}

/// Reports one stalled item of stage `stage`: counted in the stage's
/// stats, a warning with the fixed fields, and an `ItemStalled` event
/// (through the tracker, so that it is never dropped).
pub(super) fn report(
    shared: &Shared,
    stage: usize,
    tracker: &ActorRef<TrackerMsg>,
    stalled: Stalled,
) {
    let Stalled {
        job_id,
        worker,
        age,
    } = stalled;
    shared.gauges[stage].stalled.fetch_add(1, Ordering::Relaxed);
    let name = &shared.names[stage];
    tracing::warn!(
        target: "bergtalzug::item",
        pipeline = %shared.name,
        stage = %name,
        worker = %worker,
        job_id = %job_id,
        age_ms = age.as_millis() as u64,
        "item stalled: worker {worker} of stage `{name}` has held job {job_id} for {age:.1?}"
    );
    if shared.events.has_subscribers() {
        let _ = tracker.cast(TrackerMsg::Event(PipelineEvent::ItemStalled {
            job_id,
            stage: name.clone(),
            worker,
            age,
        }));
    }
}
