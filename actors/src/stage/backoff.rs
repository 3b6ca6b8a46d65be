//! Items waiting out their retry backoff, without a worker.
//!
//! **Invariant**: one `Wake` timer serves them all, set for the earliest:
//! while items wait, the last timer set fires no later than the first of
//! them is due.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::item::WorkItem;

/// The items waiting, by when they are due (on tokio's clock, so that
/// paused time in tests applies).
pub(super) struct Backoff<I> {
    delayed: BTreeMap<(Instant, u64), WorkItem<I>>,
    next: u64,
    /// When the `Wake` timer set last will fire.
    wake_at: Option<Instant>,
}

impl<I> Backoff<I> {
    pub(super) fn new() -> Self {
        Backoff {
            delayed: BTreeMap::new(),
            next: 0,
            wake_at: None,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.delayed.len()
    }

    /// Holds `item` for `wait`; returns when to set a `Wake` timer, if one
    /// must be set (none set fires early enough).
    pub(super) fn hold(&mut self, item: WorkItem<I>, wait: Duration) -> Option<Duration> {
        let due = Instant::now() + wait;
        self.delayed.insert((due, self.next), item);
        self.next += 1;
        let timer = self.wake_at.is_none_or(|at| due < at).then(|| {
            self.wake_at = Some(due);
            wait
        });
        self.check();
        timer
    }

    /// The items whose backoff is over, in the order they were due, and
    /// when to set the next `Wake` timer, if one must be set.
    pub(super) fn due(&mut self) -> (Vec<WorkItem<I>>, Option<Duration>) {
        let now = Instant::now();
        if self.wake_at.is_some_and(|at| at <= now) {
            self.wake_at = None;
        }
        let mut ready = Vec::new();
        let mut timer = None;
        while let Some(entry) = self.delayed.first_entry() {
            let due = entry.key().0;
            if due > now {
                if self.wake_at.is_none_or(|at| due < at) {
                    self.wake_at = Some(due);
                    timer = Some(due - now);
                }
                break;
            }
            ready.push(entry.remove());
        }
        self.check();
        (ready, timer)
    }

    /// Every item waiting, for an abort.
    pub(super) fn take_all(&mut self) -> impl Iterator<Item = WorkItem<I>> + use<I> {
        std::mem::take(&mut self.delayed).into_values()
    }

    fn check(&self) {
        debug_assert!(
            self.delayed
                .first_key_value()
                .is_none_or(|((due, _), _)| self.wake_at.is_some_and(|at| at <= *due)),
            "items wait for a retry with no timer set for the first of them"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_timer_serves_every_waiting_item_earliest_first() {
        let mut backoff = Backoff::new();
        let item = |n: u32| WorkItem::new(n);
        assert_eq!(
            backoff.hold(item(1), Duration::from_secs(2)),
            Some(Duration::from_secs(2))
        );
        // A later item needs no timer of its own; an earlier one does.
        assert_eq!(backoff.hold(item(2), Duration::from_secs(3)), None);
        assert_eq!(
            backoff.hold(item(3), Duration::from_secs(1)),
            Some(Duration::from_secs(1))
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        let (ready, timer) = backoff.due();
        assert_eq!(ready.iter().map(|i| i.data).collect::<Vec<_>>(), [3]);
        // The next is item 1, at 2 s. (Only the last timer set is known: the
        // one set for it earlier fires too, a spare wake-up.)
        assert_eq!(timer, Some(Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(1)).await;
        let (ready, timer) = backoff.due();
        assert_eq!(ready.iter().map(|i| i.data).collect::<Vec<_>>(), [1]);
        assert_eq!(timer, Some(Duration::from_secs(1)));
        assert_eq!(backoff.len(), 1);
        assert_eq!(backoff.take_all().count(), 1);
    }
}
