//! A stage's rate limit: items wait here, without a worker, until the
//! limiter lets them start.
//!
//! The limiter is `governor`'s (GCRA: one unit comes back every
//! `interval / allowed`, up to `burst` saved), on tokio's clock, so that
//! paused time in tests applies. Items leave in the order they came, and
//! only as many as there are idle workers for (each goes to a worker of its
//! own, alone in its batch), so an item starts as soon as it is let
//! through: the limiter's pace is the pace of starts.
//!
//! **Invariant** (`debug_assert!`ed in [`Rate::release`]): an item leaves
//! only with the limiter's permit (or when there is no limit); and when the
//! limiter refused the first item waiting, one `Pace` timer is set, for no
//! later than the limiter allows it.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::config::RateLimit;
use crate::item::WorkItem;

/// What one item costs, in units of the stage's rate limit.
pub(crate) type CostFn<I> = Arc<dyn Fn(&WorkItem<I>) -> u32 + Send + Sync>;

/// The shortest `Pace` timer: a limiter that says "now" after refusing is
/// asked again this much later rather than at once.
const MIN_PACE: Duration = Duration::from_micros(100);

/// tokio's clock, for governor: paused time in tests applies.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct TokioClock;

impl Clock for TokioClock {
    type Instant = std::time::Instant;

    fn now(&self) -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<std::time::Instant>>;

/// The limiter and the items waiting for it.
pub(super) struct Rate<I> {
    limiter: Option<(RateLimit, Limiter)>,
    cost: Option<CostFn<I>>,
    waiting: VecDeque<WorkItem<I>>,
    /// When the `Pace` timer set last fires.
    wake_at: Option<tokio::time::Instant>,
}

impl<I> Rate<I> {
    pub(super) fn new(limit: Option<RateLimit>, cost: Option<CostFn<I>>) -> Self {
        let mut rate = Rate {
            limiter: None,
            cost,
            waiting: VecDeque::new(),
            wake_at: None,
        };
        rate.set(limit);
        rate
    }

    /// Whether items wait here before they run.
    pub(super) fn limited(&self) -> bool {
        self.limiter.is_some()
    }

    pub(super) fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Another item to start after the ones waiting.
    pub(super) fn push(&mut self, item: WorkItem<I>) {
        self.waiting.push_back(item);
    }

    /// A new limit, in force at once. The new limiter starts with nothing
    /// saved (its first unit comes one period after the change), so a
    /// change never lets a burst through by itself. `None`: no limit.
    pub(super) fn set(&mut self, limit: Option<RateLimit>) {
        self.limiter = limit.map(|limit| {
            let burst = NonZeroU32::new(limit.burst.max(1)).expect("at least 1");
            let quota = Quota::with_period(limit.period())
                .expect("validation refuses a zero period")
                .allow_burst(burst);
            let limiter = RateLimiter::direct_with_clock(quota, TokioClock);
            // Spend the saved burst: the change takes effect from now.
            let _ = limiter.check_n(burst);
            (limit, limiter)
        });
        // A timer set for the old limit may fire late for the new one.
        self.wake_at = None;
    }

    /// The `Pace` timer fired.
    pub(super) fn woke(&mut self) {
        let now = tokio::time::Instant::now();
        if self.wake_at.is_some_and(|at| at <= now) {
            self.wake_at = None;
        }
    }

    /// Lets through, in order, up to `room` items the limiter allows now
    /// (every item when there is no limit); returns them, and when to set
    /// a `Pace` timer, if one must be set.
    pub(super) fn release(&mut self, room: usize) -> (Vec<WorkItem<I>>, Option<Duration>) {
        let Some((limit, limiter)) = &self.limiter else {
            return (self.waiting.drain(..).collect(), None);
        };
        let mut out = Vec::new();
        let mut timer = None;
        while out.len() < room {
            let Some(head) = self.waiting.front() else {
                break;
            };
            let cost = self.cost.as_ref().map_or(1, |cost| cost(head));
            let Some(units) = NonZeroU32::new(cost.min(limit.burst.max(1))) else {
                // Free: it costs nothing.
                out.extend(self.waiting.pop_front());
                continue;
            };
            match limiter.check_n(units) {
                Ok(Ok(())) => out.extend(self.waiting.pop_front()),
                Ok(Err(not_until)) => {
                    let wait = not_until.wait_time_from(TokioClock.now()).max(MIN_PACE);
                    let due = tokio::time::Instant::now() + wait;
                    if self.wake_at.is_none_or(|at| due < at) {
                        self.wake_at = Some(due);
                        timer = Some(wait);
                    }
                    debug_assert!(
                        self.wake_at.is_some(),
                        "items wait for the rate limit with no timer set"
                    );
                    break;
                }
                Err(_) => unreachable!("a cost is capped at the burst"),
            }
        }
        (out, timer)
    }

    /// Every item waiting, for an abort.
    pub(super) fn take_all(&mut self) -> impl Iterator<Item = WorkItem<I>> + use<I> {
        std::mem::take(&mut self.waiting).into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn items_pass_at_the_limit_s_pace_on_tokio_s_clock() {
        let mut rate = Rate::new(Some(RateLimit::per_second(10)), None);
        for n in 0..5u32 {
            rate.push(WorkItem::new(n));
        }
        // Nothing saved at the start: the first comes after one period.
        let (out, timer) = rate.release(5);
        assert!(out.is_empty());
        assert_eq!(timer, Some(Duration::from_millis(100)));
        tokio::time::advance(Duration::from_millis(100)).await;
        rate.woke();
        let (out, timer) = rate.release(5);
        assert_eq!(out.iter().map(|i| i.data).collect::<Vec<_>>(), [0]);
        assert_eq!(timer, Some(Duration::from_millis(100)));
        // No room: nothing asked, nothing let through.
        tokio::time::advance(Duration::from_millis(300)).await;
        rate.woke();
        assert!(rate.release(0).0.is_empty());
        // The burst is 1: a quiet spell saves only one.
        let (out, _) = rate.release(5);
        assert_eq!(out.len(), 1);
        rate.set(None);
        assert_eq!(rate.release(0).0.len(), 3, "no limit: everything goes");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cost_is_charged_in_units_and_capped_at_the_burst() {
        let cost: CostFn<u32> = Arc::new(|item: &WorkItem<u32>| item.data);
        let mut rate = Rate::new(Some(RateLimit::per_second(10).burst(4)), Some(cost));
        rate.push(WorkItem::new(0)); // free
        rate.push(WorkItem::new(100)); // charged 4, the burst
        let (out, timer) = rate.release(5);
        assert_eq!(out.len(), 1);
        // 4 units at 100 ms each, from an empty bucket.
        assert_eq!(timer, Some(Duration::from_millis(400)));
        tokio::time::advance(Duration::from_millis(400)).await;
        rate.woke();
        assert_eq!(rate.release(5).0.len(), 1);
    }
}
