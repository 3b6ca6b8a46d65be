//! A stage's workers and what each holds.
//!
//! **Invariants** (checked by [`Pool::check`] in debug builds):
//! - every item a worker was given and has not reported is in its slot's
//!   `held`, once, in the order given (those not started are the end), and
//!   `in_flight` is their sum;
//! - an idle worker holds nothing and is neither failing, dead nor
//!   retiring, and is listed idle once;
//! - a hungry worker (a blocking stage's, running low: see
//!   [`Pool::top_up`]) holds something, is neither failing, dead nor
//!   retiring, is not idle, and is listed hungry once;
//! - a retiring worker (the stage shrank) gets no new work, and is stopped
//!   as soon as it holds nothing.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{ActorId, ActorRef};
use rustc_hash::FxHashMap;

use crate::event::WorkerId;
use crate::item::{JobId, WorkItem};
use crate::outcome::{Outcome, WorkerReport};
use crate::runner::hand::{Hand, Harvest, Taken};
use crate::worker::WorkerMsg;

/// How many busy workers an idle one looks into, busiest first, for items
/// they have not started.
const STEAL_TRIES: usize = 4;
/// A busy worker's unstarted items are taken for idle workers only once it
/// has gone this long without finishing an item: its batch (about
/// [`BATCH_WORK`](super::batching::BATCH_WORK) of work) has outlived its
/// pace. Batches of fast items are not split after they were given: in a
/// flowing pipeline a worker is idle for a moment between batches all the
/// time, and taking from a busy one then would only cut batches into more
/// messages.
pub(super) const STEAL_AFTER: Duration = Duration::from_millis(2);

/// One worker, as its stage sees it.
pub(super) struct Slot<I, O> {
    actor: ActorRef<WorkerMsg>,
    /// The items given to the worker and not started yet (shared with it).
    pub(super) hand: Arc<Hand<I, O>>,
    /// Job ids, creation times (nanoseconds after the clock's epoch, as
    /// the metadata keeps them) and places (`seq`) of the items the worker
    /// holds and has not reported, in the order given (those not started
    /// are the end): enough to account for them if the worker dies.
    pub(super) held: VecDeque<(JobId, u64, u32)>,
    /// It reported a panic or a timeout and is about to fail: no more work
    /// for it.
    pub(super) failing: bool,
    /// It died (or is being killed): no more work for it; its hand is
    /// closed and what was in it waits in `harvest` for its `Reap`.
    pub(super) dead: bool,
    /// The stage shrank: it finishes what it holds, gets nothing more, and
    /// is stopped (not replaced) once it holds nothing.
    pub(super) retiring: bool,
    pub(super) harvest: Harvest<I, O>,
    /// Since when it has held the front of `held` (stall detection).
    pub(super) since: Instant,
    /// When it was last given items or last reported a finished one: its
    /// unstarted items stay its own until [`STEAL_AFTER`] after that.
    progress: Instant,
    /// The front of `held` was reported stalled.
    pub(super) stalled: bool,
    /// Listed hungry: it runs low and gets the next batch before it ends
    /// the one it has ([`Pool::top_up`]).
    hungry: bool,
}

impl<I: Send + 'static, O: Send + 'static> Slot<I, O> {
    /// Closes the worker's hand (it died or is being killed), keeping what
    /// was in it for the reap.
    fn close(&mut self) {
        self.dead = true;
        let Harvest {
            outcomes,
            unstarted,
        } = self.hand.close();
        self.harvest.outcomes.extend(outcomes);
        self.harvest.unstarted.extend(unstarted);
    }

    /// Stops a retiring worker that holds nothing; its termination is
    /// reaped as any other, and it is not replaced.
    fn stop(&mut self) {
        debug_assert!(self.retiring && self.held.is_empty());
        // It waits for work in its hand: retired, it stops waiting, and
        // its mailbox takes the stop.
        self.hand.retire();
        self.actor.stop(Some("the stage shrank".into()));
    }

    /// Takes work from it for others, and runs nothing new.
    fn busy(&self) -> bool {
        !self.failing && !self.dead && self.held.len() > 1
    }
}

/// Lists `worker` hungry or not, once: its flag and the list agree.
fn list_hungry<I, O>(list: &mut Vec<WorkerId>, worker: WorkerId, slot: &mut Slot<I, O>, on: bool) {
    if on && !slot.hungry {
        list.push(worker);
    } else if !on && slot.hungry {
        list.retain(|w| *w != worker);
    }
    slot.hungry = on;
}

/// What a worker's report made of it.
pub(super) enum AfterReport {
    /// Its worker was reaped already.
    Gone,
    /// It goes on with the rest of its batch.
    Busy,
    /// It holds nothing: listed idle.
    Idle,
    /// It is failing: give it nothing more.
    Failing,
}

/// Items taken from a busy worker for idle ones.
pub(super) struct Stolen<I, O> {
    /// Items it had not started.
    pub(super) unstarted: Vec<WorkItem<I>>,
    /// Outcomes its blocking handler returned and it had not reported, and
    /// the handler time spent on them.
    pub(super) outcomes: Vec<Outcome<I, O>>,
    pub(super) busy: Duration,
}

/// A stage's workers.
pub(super) struct Pool<I, O> {
    /// By worker: looked up on every report and every batch given, so
    /// hashed with Fx, not SipHash (the keys are the stage's own).
    pub(super) slots: FxHashMap<WorkerId, Slot<I, O>>,
    by_actor: FxHashMap<ActorId, WorkerId>,
    idle: Vec<WorkerId>,
    /// Busy workers running low, for [`Pool::top_up`].
    hungry: Vec<WorkerId>,
    in_flight: usize,
    next_worker: u64,
    /// Workers that died and are not replaced yet: who, and why.
    pub(super) to_replace: VecDeque<(WorkerId, String)>,
}

impl<I: Send + 'static, O: Send + 'static> Pool<I, O> {
    pub(super) fn new() -> Self {
        Pool {
            slots: FxHashMap::default(),
            by_actor: FxHashMap::default(),
            idle: Vec::new(),
            hungry: Vec::new(),
            in_flight: 0,
            next_worker: 0,
            to_replace: VecDeque::new(),
        }
    }

    /// The id for the next worker spawned.
    pub(super) fn next_id(&mut self) -> WorkerId {
        let id = WorkerId(self.next_worker);
        self.next_worker += 1;
        id
    }

    /// A worker spawned with `hand`: idle.
    pub(super) fn add(
        &mut self,
        id: WorkerId,
        actor: ActorRef<WorkerMsg>,
        hand: Arc<Hand<I, O>>,
        now: Instant,
    ) {
        self.by_actor.insert(actor.get_id(), id);
        self.slots.insert(
            id,
            Slot {
                actor,
                hand,
                held: VecDeque::new(),
                failing: false,
                dead: false,
                retiring: false,
                harvest: Harvest::default(),
                since: now,
                progress: now,
                stalled: false,
                hungry: false,
            },
        );
        self.idle.push(id);
    }

    /// Items in workers' hands and not reported.
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub(super) fn has_idle(&self) -> bool {
        !self.idle.is_empty()
    }

    pub(super) fn idle_count(&self) -> usize {
        self.idle.len()
    }

    /// Workers counted in the stage's size: all but those failing (a
    /// worker seen dead that reported no panic is counted until its reap
    /// replaces it).
    pub(super) fn live(&self) -> usize {
        self.slots
            .values()
            .filter(|s| !s.failing && !s.retiring)
            .count()
    }

    /// The stage shrinks by `n` workers: idle ones are stopped now, then
    /// busy ones (those holding least first) retire: they finish what they
    /// hold, get nothing more, and are stopped once they hold nothing.
    /// Returns how many were found to retire.
    pub(super) fn retire(&mut self, n: usize) -> usize {
        let mut retired = 0;
        while retired < n {
            let Some(worker) = self.idle.pop() else {
                break;
            };
            let slot = self
                .slots
                .get_mut(&worker)
                .expect("idle workers have slots");
            slot.retiring = true;
            slot.stop();
            retired += 1;
        }
        if retired < n {
            let mut busy: Vec<_> = self
                .slots
                .iter()
                .filter(|(_, s)| !s.failing && !s.dead && !s.retiring)
                .map(|(id, s)| (s.held.len(), *id))
                .collect();
            busy.sort_unstable();
            for (_, worker) in busy.into_iter().take(n - retired) {
                self.slots.get_mut(&worker).expect("listed above").retiring = true;
                self.unlist_hungry(worker);
                retired += 1;
            }
        }
        retired
    }

    /// The stage grows by up to `n` workers: busy retiring workers (not
    /// stopped yet) take work again first. Returns how many did.
    pub(super) fn unretire(&mut self, n: usize) -> usize {
        let mut back = 0;
        for slot in self.slots.values_mut() {
            if back == n {
                break;
            }
            if slot.retiring && !slot.held.is_empty() && !slot.dead && !slot.failing {
                slot.retiring = false;
                back += 1;
            }
        }
        back
    }

    /// Whether some worker holds more than the item it runs.
    pub(super) fn any_busy(&self) -> bool {
        self.slots.values().any(Slot::busy)
    }

    /// The worker of this actor died: its hand is closed at once (a
    /// blocking thread that outlives it reports under the hand's lock, so
    /// whatever it sent is queued ahead of the reap, and it sends nothing
    /// more), and it gets no more work.
    pub(super) fn died(&mut self, actor: ActorId) -> Option<WorkerId> {
        let worker = self.by_actor.remove(&actor)?;
        if let Some(slot) = self.slots.get_mut(&worker) {
            slot.close();
        }
        self.idle.retain(|w| *w != worker);
        self.unlist_hungry(worker);
        Some(worker)
    }

    /// Gives `items` to the next idle worker, which its hand wakes; hands
    /// them back when no worker is idle. A worker that died after its last
    /// report gets them all the same: its death closes its hand (`died`,
    /// before its reap), which takes them back. In a blocking stage
    /// (`low_water`, as for [`Pool::reported`]) the worker is listed hungry
    /// at once if it holds less: it reports only every
    /// [`BLOCKING_FLUSH_AFTER`](crate::runner::BLOCKING_FLUSH_AFTER), so
    /// its next batch must be in hand before a report says it ran low.
    pub(super) fn give(
        &mut self,
        items: Vec<WorkItem<I>>,
        low_water: Option<usize>,
        now: Instant,
    ) -> Result<(), Vec<WorkItem<I>>> {
        let Some(worker) = self.idle.pop() else {
            return Err(items);
        };
        let slot = self
            .slots
            .get_mut(&worker)
            .expect("idle workers have slots");
        slot.since = now;
        slot.stalled = false;
        slot.progress = now;
        Self::hand_over(slot, &mut self.in_flight, items);
        let hungry = low_water.is_some_and(|low| slot.held.len() < low);
        list_hungry(&mut self.hungry, worker, slot, hungry);
        Ok(())
    }

    /// Gives `items` to the next hungry worker, after what it holds; hands
    /// them back when none is hungry. A worker of a blocking stage (Thread,
    /// Cpu) takes the items in its hand one by one on its thread, so items
    /// added before it ends its batch run on, without the round trip
    /// through the stage and back to the thread that ending a batch costs
    /// (a report, the stage's turn, a wake-up of the worker and one of a
    /// thread: 5 µs of a 2-thread Cpu stage's 50 µs items idled in it,
    /// docs/performance.md). Items added stay within the stage's reach:
    /// an idle worker takes those not started from a worker that made no
    /// progress for [`STEAL_AFTER`], as from any batch. A worker still
    /// under `low_water` after this stays hungry, behind the others: a
    /// top-up of what little was queued must not leave it unlisted until
    /// its next report, which may find it run dry.
    pub(super) fn top_up(
        &mut self,
        items: Vec<WorkItem<I>>,
        low_water: usize,
    ) -> Result<(), Vec<WorkItem<I>>> {
        let Some(worker) = self.hungry.pop() else {
            return Err(items);
        };
        let slot = self
            .slots
            .get_mut(&worker)
            .expect("hungry workers have slots");
        Self::hand_over(slot, &mut self.in_flight, items);
        if slot.held.len() < low_water {
            self.hungry.insert(0, worker);
        } else {
            slot.hungry = false;
        }
        Ok(())
    }

    pub(super) fn has_hungry(&self) -> bool {
        !self.hungry.is_empty()
    }

    fn unlist_hungry(&mut self, worker: WorkerId) {
        if let Some(slot) = self.slots.get_mut(&worker) {
            list_hungry(&mut self.hungry, worker, slot, false);
        }
    }

    /// Puts `items` in `slot`'s hand, after what it holds, recorded in
    /// order and counted in flight.
    fn hand_over(slot: &mut Slot<I, O>, in_flight: &mut usize, items: Vec<WorkItem<I>>) {
        slot.held.extend(items.iter().map(|i| {
            (
                i.head.job_id.clone(),
                i.head.metadata.created_ns(),
                i.head.metadata.seq,
            )
        }));
        *in_flight += items.len();
        slot.hand.give(items);
    }

    /// `worker` reported `n` items (outcomes and items handed back);
    /// `finished`: some had outcomes; `failing`: it is about to fail;
    /// `low_water`: a blocking stage's, under which a busy worker is
    /// listed hungry ([`Pool::top_up`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn reported(
        &mut self,
        worker: WorkerId,
        n: usize,
        finished: bool,
        failing: bool,
        aborting: bool,
        low_water: Option<usize>,
        now: Instant,
    ) -> AfterReport {
        let Some(slot) = self.slots.get_mut(&worker) else {
            return AfterReport::Gone;
        };
        for _ in 0..n {
            slot.held.pop_front();
        }
        if finished {
            slot.progress = now;
        }
        if n > 0 && !slot.held.is_empty() {
            // The worker goes on with the rest of its batch.
            slot.since = now;
            slot.stalled = false;
        }
        self.in_flight -= n;
        let after = if failing {
            slot.failing = true;
            // An earlier report may have emptied its hold and listed it
            // idle; a failing worker is given nothing more.
            self.idle.retain(|w| *w != worker);
            AfterReport::Failing
        } else if slot.held.is_empty() && slot.retiring {
            slot.stop();
            AfterReport::Busy
        } else if slot.held.is_empty() && !slot.dead && !slot.failing && !aborting {
            self.idle.push(worker);
            AfterReport::Idle
        } else {
            AfterReport::Busy
        };
        let hungry = matches!(after, AfterReport::Busy)
            && low_water.is_some_and(|low| slot.held.len() < low)
            && !slot.dead
            && !slot.failing
            && !slot.retiring
            && !aborting;
        list_hungry(&mut self.hungry, worker, slot, hungry);
        after
    }

    /// In a blocking stage, as a worker's report came: what the others'
    /// handlers returned and they have not reported yet, as their reports.
    /// Each would have woken the stage by itself within its report period
    /// ([`BLOCKING_FLUSH_AFTER`](crate::runner::BLOCKING_FLUSH_AFTER)), and
    /// taking them now puts its next one a period off: so the stage wakes
    /// once per period for all its workers rather than once for each (a
    /// wake-up of the runtime's threads from a handler thread is a
    /// system call or two on each side). A report of the worker on its way
    /// meanwhile covers items before these: it takes as many off the front
    /// of what the worker holds when it comes, as [`Pool::steal`] relies on.
    pub(super) fn unreported(&self) -> Vec<WorkerReport<I, O>> {
        let mut reports = Vec::new();
        for (worker, slot) in &self.slots {
            if slot.dead || slot.failing || slot.held.is_empty() {
                continue;
            }
            let (outcomes, busy) = slot.hand.take_unreported();
            if !outcomes.is_empty() {
                reports.push(WorkerReport {
                    worker: *worker,
                    outcomes,
                    returned: Vec::new(),
                    busy,
                    failing: None,
                });
            }
        }
        reports
    }

    /// Takes a dead worker out, its hand closed: what it held is the
    /// caller's to account for.
    pub(super) fn remove(&mut self, worker: WorkerId) -> Option<Slot<I, O>> {
        self.unlist_hungry(worker);
        let mut slot = self.slots.remove(&worker)?;
        self.idle.retain(|w| *w != worker);
        slot.close();
        self.in_flight -= slot.held.len();
        Some(slot)
    }

    /// On abort: no worker is idle or replaced; every hand is closed (so
    /// that a thread a worker leaves behind adds nothing) and every worker
    /// killed. Each is reaped when its termination arrives.
    pub(super) fn kill_all(&mut self) {
        self.idle.clear();
        self.hungry.clear();
        self.to_replace.clear();
        for slot in self.slots.values_mut() {
            slot.hungry = false;
            slot.close();
            slot.actor.kill();
        }
    }

    /// While workers are idle (and nothing is queued): takes from the
    /// busiest worker of those that finished nothing for [`STEAL_AFTER`]
    /// what it has not started, keeping it an even share, and what its
    /// blocking handler returned and it has not reported yet; so an item
    /// that takes long holds back only itself.
    pub(super) fn steal(&mut self) -> Option<Stolen<I, O>> {
        if self.idle.is_empty() {
            return None;
        }
        let idle = self.idle.len();
        // The busiest first, of those whose batch outlived its pace; an
        // async worker keeps its batch to itself while its handlers
        // complete at once, so look at a few. (The clock is read only if
        // one may be taken from.)
        let mut now = None;
        let mut stale = |s: &Slot<I, O>| {
            s.busy() && {
                let now = *now.get_or_insert_with(crate::clock::now);
                s.progress + STEAL_AFTER <= now
            }
        };
        // Nothing to allocate for while every busy worker makes progress
        // (the common case, looked at on every message).
        let first = self.slots.iter().position(|(_, s)| stale(s))?;
        let mut candidates: Vec<_> = self
            .slots
            .iter()
            .skip(first)
            .filter(|(_, s)| stale(s))
            .map(|(id, s)| (s.held.len(), *id))
            .collect();
        candidates.sort_unstable_by(|a, b| b.cmp(a));
        for (_, victim) in candidates.into_iter().take(STEAL_TRIES) {
            let slot = self.slots.get_mut(&victim).expect("listed above");
            let Taken {
                unstarted,
                outcomes,
                busy,
            } = slot
                .hand
                .take_for_others(|unstarted| unstarted - unstarted / (idle + 1));
            if unstarted.is_empty() && outcomes.is_empty() {
                continue;
            }
            for item in unstarted.iter().rev() {
                let back = slot.held.pop_back();
                debug_assert!(
                    back.is_some_and(|(job_id, _, _)| job_id == item.head.job_id),
                    "the unstarted items are the end of what a worker holds"
                );
            }
            // They were held before the rest (reports on their way, if any,
            // take the same number off the front).
            for _ in 0..outcomes.len() {
                slot.held.pop_front();
            }
            if slot.held.is_empty() && slot.retiring {
                slot.stop();
            } else if slot.held.is_empty() {
                // It had not started on its batch: all of it went to others.
                // The wake-up it has yet to read finds its hand empty.
                self.idle.push(victim);
                self.unlist_hungry(victim);
            }
            self.in_flight -= unstarted.len() + outcomes.len();
            return Some(Stolen {
                unstarted,
                outcomes,
                busy,
            });
        }
        None
    }

    /// Checks the invariants, in debug builds (of pools small enough that
    /// a pass over every worker per message costs little).
    pub(super) fn check(&self) {
        if cfg!(debug_assertions) && self.slots.len() <= 256 {
            let held: usize = self.slots.values().map(|s| s.held.len()).sum();
            debug_assert_eq!(held, self.in_flight, "in_flight is what the workers hold");
            let mut seen = std::collections::HashSet::with_capacity(self.idle.len());
            for worker in &self.idle {
                let slot = &self.slots[worker];
                debug_assert!(
                    slot.held.is_empty() && !slot.failing && !slot.dead && !slot.retiring,
                    "idle worker {worker} holds {} items (failing {}, dead {})",
                    slot.held.len(),
                    slot.failing,
                    slot.dead
                );
                debug_assert!(seen.insert(*worker), "{worker} listed idle twice");
            }
            for worker in &self.hungry {
                let slot = &self.slots[worker];
                debug_assert!(
                    slot.hungry
                        && !slot.held.is_empty()
                        && !slot.failing
                        && !slot.dead
                        && !slot.retiring,
                    "hungry worker {worker} holds {} items (failing {}, dead {}, retiring {})",
                    slot.held.len(),
                    slot.failing,
                    slot.dead,
                    slot.retiring
                );
                debug_assert!(
                    seen.insert(*worker),
                    "{worker} listed idle and hungry, or twice"
                );
            }
            let flagged = self.slots.values().filter(|s| s.hungry).count();
            debug_assert_eq!(flagged, self.hungry.len(), "hungry flags match the list");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ractor::{Actor, ActorProcessingErr};

    /// A worker actor that does nothing with its wake-ups.
    struct Asleep;

    impl Actor for Asleep {
        type Msg = WorkerMsg;
        type State = ();
        type Arguments = ();

        async fn pre_start(
            &self,
            _myself: ActorRef<WorkerMsg>,
            _args: (),
        ) -> Result<(), ActorProcessingErr> {
            Ok(())
        }
    }

    /// A worker whose last item was reported (so it was listed idle) and
    /// whose give-up came in a report of its own is not idle: the stage
    /// gives nothing to a worker that is about to fail.
    #[tokio::test]
    async fn a_worker_that_gives_up_after_reporting_everything_is_not_idle() {
        let (actor, handle) = Actor::spawn(None, Asleep, ()).await.unwrap();
        let mut pool = Pool::<u32, u32>::new();
        let now = Instant::now();
        let worker = pool.next_id();
        pool.add(worker, actor.clone(), Arc::new(Hand::new()), now);
        assert!(pool.give(vec![WorkItem::new(1)], None, now).is_ok());
        assert!(!pool.has_idle());

        let after = pool.reported(worker, 1, true, false, false, None, now);
        assert!(matches!(after, AfterReport::Idle));
        assert_eq!(pool.idle_count(), 1);

        let after = pool.reported(worker, 0, false, true, false, None, now);
        assert!(matches!(after, AfterReport::Failing));
        assert!(!pool.has_idle(), "a failing worker is listed idle");
        assert!(pool.give(vec![WorkItem::new(2)], None, now).is_err());
        pool.check();

        // Nor does a later report list it idle again.
        let after = pool.reported(worker, 0, false, false, false, None, now);
        assert!(!matches!(after, AfterReport::Idle));
        assert!(!pool.has_idle());
        pool.check();

        actor.stop(None);
        handle.await.unwrap();
    }

    fn items(n: u32) -> Vec<WorkItem<u32>> {
        (0..n).map(WorkItem::new).collect()
    }

    /// In a blocking stage a worker gets its next batch while it still
    /// holds items: when it is given less than the low water, and when a
    /// report leaves it with less; never once it is failing or retiring,
    /// and a worker that holds nothing is idle, not hungry.
    #[tokio::test]
    async fn a_blocking_worker_running_low_is_topped_up_until_it_fails_or_retires() {
        let (actor, handle) = Actor::spawn(None, Asleep, ()).await.unwrap();
        let mut pool = Pool::<u32, u32>::new();
        let now = Instant::now();
        let low = Some(8);
        let worker = pool.next_id();
        pool.add(worker, actor.clone(), Arc::new(Hand::new()), now);

        assert!(pool.give(items(2), low, now).is_ok());
        assert!(pool.has_hungry(), "2 held, under the low water of 8");
        assert!(pool.top_up(items(2), 8).is_ok());
        assert!(pool.has_hungry(), "4 held: still under the low water");
        pool.check();
        assert!(pool.top_up(items(4), 8).is_ok());
        assert!(!pool.has_hungry(), "8 held: not under the low water");
        assert!(pool.top_up(items(1), 8).is_err(), "nobody is hungry");
        assert_eq!(pool.in_flight(), 8);
        pool.check();

        // A report of 3 leaves 5: hungry again, listed once.
        let after = pool.reported(worker, 3, true, false, false, low, now);
        assert!(matches!(after, AfterReport::Busy));
        let after = pool.reported(worker, 0, false, false, false, low, now);
        assert!(matches!(after, AfterReport::Busy));
        pool.check();
        assert!(pool.top_up(items(3), 8).is_ok());
        assert!(!pool.has_hungry());

        // Reported empty: idle, not hungry.
        let after = pool.reported(worker, 8, true, false, false, low, now);
        assert!(matches!(after, AfterReport::Idle));
        assert!(!pool.has_hungry());
        pool.check();

        // Failing: neither.
        assert!(pool.give(items(2), low, now).is_ok());
        assert!(pool.has_hungry());
        let after = pool.reported(worker, 1, true, true, false, low, now);
        assert!(matches!(after, AfterReport::Failing));
        assert!(!pool.has_hungry(), "a failing worker gets nothing more");
        assert!(pool.top_up(items(1), 8).is_err());
        pool.check();

        actor.stop(None);
        handle.await.unwrap();
    }

    /// Counts the reports its workers send.
    #[derive(Default)]
    struct Counted(std::sync::atomic::AtomicUsize);

    impl crate::ports::Reports<u32, u32> for Counted {
        fn report(
            &self,
            _report: WorkerReport<u32, u32>,
        ) -> Result<(), Vec<WorkerReport<u32, u32>>> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }

    fn blocking_ctx(
        worker: WorkerId,
        hand: &Arc<Hand<u32, u32>>,
        reports: &Arc<Counted>,
    ) -> Arc<crate::runner::RunCtx<u32, u32>> {
        Arc::new(crate::runner::RunCtx {
            pipeline: "p".into(),
            stage: "s".into(),
            worker,
            reports: reports.clone(),
            tracking: false,
            events: Arc::new(crate::event::EventHub::default()),
            keep: None,
            max_attempts: 1,
            timeout: None,
            hand: hand.clone(),
        })
    }

    /// In a blocking stage, what a busy worker's handler returned and it
    /// has not reported is taken with another worker's report, in order and
    /// counted off what it holds, and the worker's own next report is put
    /// a period off: so the stage is woken once per period, not once per
    /// worker. A failing worker is left alone.
    #[tokio::test]
    async fn a_blocking_workers_unreported_outcomes_go_with_another_report() {
        use crate::runner::BLOCKING_FLUSH_AFTER;
        let (actor, handle) = Actor::spawn(None, Asleep, ()).await.unwrap();
        let mut pool = Pool::<u32, u32>::new();
        let reports = Arc::new(Counted::default());
        let start = Instant::now();
        let (a, b) = (pool.next_id(), pool.next_id());
        let (hand_a, hand_b) = (Arc::new(Hand::new()), Arc::new(Hand::new()));
        pool.add(a, actor.clone(), hand_a.clone(), start);
        pool.add(b, actor.clone(), hand_b.clone(), start);
        assert!(pool.give(items(4), None, start).is_ok());
        assert!(pool.give(items(4), None, start).is_ok());
        assert_eq!(pool.in_flight(), 8);
        assert!(pool.unreported().is_empty(), "nothing has run");

        // Worker b's thread: a batch of 4, of which it finishes 2 within
        // its report period, so it sends nothing yet.
        let ctx = blocking_ctx(b, &hand_b, &reports);
        assert!(hand_b.begin_batch(&ctx));
        let done_at = start + BLOCKING_FLUSH_AFTER / 2;
        {
            let mut state = hand_b.lock();
            for _ in 0..2 {
                let item = state.pending.pop_front().unwrap();
                state
                    .reporter
                    .as_mut()
                    .unwrap()
                    .push(Outcome::Done(item), start, done_at);
            }
        }
        assert_eq!(reports.0.load(std::sync::atomic::Ordering::SeqCst), 0);

        let taken = pool.unreported();
        assert_eq!(taken.len(), 1, "only b has outcomes not reported");
        assert_eq!(taken[0].worker, b);
        let ids: Vec<u32> = taken[0]
            .outcomes
            .iter()
            .map(|o| match o {
                Outcome::Done(item) => item.data,
                _ => unreachable!("both succeeded"),
            })
            .collect();
        assert_eq!(ids, [0, 1], "in the order they ran");
        assert_eq!(taken[0].busy, BLOCKING_FLUSH_AFTER / 2);
        let after = pool.reported(b, 2, true, false, false, None, done_at);
        assert!(matches!(after, AfterReport::Busy));
        assert_eq!(pool.in_flight(), 6);
        pool.check();

        // Its next item, done after its report would have been due (a
        // period after its batch began), waits for the period that began
        // with the last outcome taken.
        {
            let mut state = hand_b.lock();
            let item = state.pending.pop_front().unwrap();
            let reporter = state.reporter.as_mut().unwrap();
            let later = start + BLOCKING_FLUSH_AFTER + BLOCKING_FLUSH_AFTER / 4;
            reporter.push(Outcome::Done(item), done_at, later);
            assert_eq!(reports.0.load(std::sync::atomic::Ordering::SeqCst), 0);
            assert_eq!(reporter.flush_due(), Some(done_at + BLOCKING_FLUSH_AFTER));
        }

        // A failing worker's outcomes are its own report's.
        pool.reported(b, 0, false, true, false, None, done_at);
        assert!(pool.unreported().is_empty());
        pool.check();

        actor.stop(None);
        handle.await.unwrap();
    }

    /// A hungry worker that retires (the stage shrank) is given nothing
    /// more: it finishes what it holds and stops.
    #[tokio::test]
    async fn a_retiring_worker_is_not_topped_up() {
        let (actor, handle) = Actor::spawn(None, Asleep, ()).await.unwrap();
        let mut pool = Pool::<u32, u32>::new();
        let now = Instant::now();
        let worker = pool.next_id();
        pool.add(worker, actor.clone(), Arc::new(Hand::new()), now);
        assert!(pool.give(items(2), Some(8), now).is_ok());
        assert!(pool.has_hungry());
        assert_eq!(pool.retire(1), 1);
        assert!(!pool.has_hungry());
        assert!(pool.top_up(items(1), 8).is_err());
        pool.check();
        actor.stop(None);
        handle.await.unwrap();
    }
}
