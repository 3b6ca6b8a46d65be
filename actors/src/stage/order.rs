//! Ordered output: what leaves the stage leaves in input order, however
//! many workers run and however long each item takes.
//!
//! Each item gets its place (`seq`) as the stage receives it. An item done
//! early waits here for the ones before it; a failure (a result for the
//! tracker) waits in its place too, so that downstream and the tracker see
//! the stage's outcomes in input order. A retry keeps its place: the items
//! after it wait until it is done or has failed for good. Everything
//! waiting here counts against the stage's room, so the buffer is bounded
//! by `queue_size + workers`.
//!
//! **Invariant** (`debug_assert!`ed in [`Reorder::put`]): places leave one
//! by one, each exactly once, in increasing order, with no gap.

use std::any::Any;
use std::collections::BTreeMap;

use crate::item::{JobId, WorkItem, WorkItemResult};

/// What an item's outcome in this stage sends on.
pub(super) enum Leaving<O> {
    /// Done: on to the next stage (a result, from the last stage).
    Next(WorkItem<O>),
    /// Ended here: its result for the tracker, and its last input for the
    /// dead letter (a stage bound to retry). Boxed: failures are rare, and
    /// every done item moves as a `Leaving` on its way out.
    Ended(Box<(WorkItemResult, Option<DeadInput>)>),
}

/// A failed item's last input, for its dead letter.
pub(super) type DeadInput = (JobId, Box<dyn Any + Send>);

/// The outcomes that wait for the ones before them.
pub(super) struct Reorder<O> {
    /// The place that leaves next.
    next: u64,
    waiting: BTreeMap<u64, Leaving<O>>,
}

impl<O> Reorder<O> {
    pub(super) fn new() -> Self {
        Reorder {
            next: 0,
            waiting: BTreeMap::new(),
        }
    }

    /// Outcomes waiting for an earlier one.
    pub(super) fn len(&self) -> usize {
        self.waiting.len()
    }

    /// The outcome of the item at place `low` (its place modulo 2^32: every
    /// place waiting is within 2^32 of the next, since the stage holds
    /// fewer items than that); `leave` gets, in order, every outcome that
    /// may leave now.
    pub(super) fn put(&mut self, low: u32, leaving: Leaving<O>, mut leave: impl FnMut(Leaving<O>)) {
        let seq = self.next + u64::from(low.wrapping_sub(self.next as u32));
        debug_assert!(
            seq >= self.next,
            "place {seq} has left already (next {})",
            self.next
        );
        let before = self.waiting.insert(seq, leaving);
        debug_assert!(before.is_none(), "place {seq} has two outcomes");
        while let Some(entry) = self.waiting.first_entry() {
            if *entry.key() != self.next {
                break;
            }
            leave(entry.remove());
            self.next += 1;
        }
        debug_assert!(
            self.waiting
                .first_key_value()
                .is_none_or(|(first, _)| *first > self.next),
            "an outcome that may leave still waits"
        );
    }

    /// Everything waiting, for an abort (their places no longer matter).
    pub(super) fn take_all(&mut self) -> impl Iterator<Item = Leaving<O>> + use<O> {
        std::mem::take(&mut self.waiting).into_values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::{ItemError, ItemErrorKind, WorkItemMetadata};

    #[test]
    fn outcomes_leave_in_input_order_failures_in_their_place() {
        let mut order = Reorder::new();
        let mut left = Vec::new();
        let mut leave = |l: Leaving<u32>| {
            left.push(match l {
                Leaving::Next(item) => item.data,
                Leaving::Ended(..) => 99,
            })
        };
        order.put(2, Leaving::Next(WorkItem::new(2)), &mut leave);
        order.put(1, Leaving::Next(WorkItem::new(1)), &mut leave);
        let failed = WorkItemResult::failed(
            JobId::random(),
            WorkItemMetadata::default(),
            ItemError::new("s", ItemErrorKind::Failed, "no"),
        );
        order.put(3, Leaving::Ended(Box::new((failed, None))), &mut leave);
        assert_eq!(order.len(), 3, "all wait for place 0");
        order.put(0, Leaving::Next(WorkItem::new(0)), &mut leave);
        assert_eq!(order.len(), 0);
        assert_eq!(left, [0, 1, 2, 99]);
    }
}
