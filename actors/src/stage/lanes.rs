//! Key lanes: items with the same key (a function of the item, given when
//! the stage was bound) never run at the same time and leave the lane in
//! their input order; items of different keys run in parallel.
//!
//! One item per key is *out* (let through to run: queued, waiting for the
//! rate limit, in a worker, or waiting out a retry's backoff); the others
//! of that key wait in its lane. The key is free again only once the item
//! out has its outcome in this stage (done, or failed for good): a retry
//! keeps it, so no later item of the key overtakes one being retried.
//! Keys are compared by a 64-bit hash: two keys that collide share a lane
//! (less parallelism, never two of one key at once).
//!
//! **Invariant** (`debug_assert!`ed by [`Lanes::check`]): at most one item
//! per key is out; every lane that waits belongs to a key that is out; a
//! lane holds its items in input order.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::item::WorkItem;

/// The key of an item, hashed.
pub(crate) type KeyFn<I> = Arc<dyn Fn(&WorkItem<I>) -> u64 + Send + Sync>;

/// A key function over any hashable key.
pub(crate) fn key_fn<I, K: Hash>(
    key: impl Fn(&WorkItem<I>) -> K + Send + Sync + 'static,
) -> KeyFn<I> {
    Arc::new(move |item| rustc_hash::FxBuildHasher.hash_one(key(item)))
}

/// A stage's key lanes.
pub(super) struct Lanes<I> {
    key: KeyFn<I>,
    /// Per key out, the seq of the item out.
    out: FxHashMap<u64, u32>,
    /// Per seq out, its key.
    keys: FxHashMap<u32, u64>,
    /// The items waiting behind the one out, per key.
    lanes: FxHashMap<u64, VecDeque<WorkItem<I>>>,
    waiting: usize,
}

impl<I> Lanes<I> {
    pub(super) fn new(key: KeyFn<I>) -> Self {
        Lanes {
            key,
            out: FxHashMap::default(),
            keys: FxHashMap::default(),
            lanes: FxHashMap::default(),
            waiting: 0,
        }
    }

    /// Items waiting in lanes.
    pub(super) fn len(&self) -> usize {
        self.waiting
    }

    /// Keys with an item out.
    #[cfg(test)]
    pub(super) fn out(&self) -> usize {
        self.out.len()
    }

    /// A new item: returned if its key is free (it is out now), else it
    /// waits in its key's lane.
    pub(super) fn admit(&mut self, item: WorkItem<I>) -> Option<WorkItem<I>> {
        let key = (self.key)(&item);
        let seq = item.head.metadata.seq;
        let admitted = match self.out.entry(key) {
            std::collections::hash_map::Entry::Occupied(_) => {
                let lane = self.lanes.entry(key).or_default();
                debug_assert!(
                    lane.back()
                        .is_none_or(|last| (seq.wrapping_sub(last.head.metadata.seq) as i32) > 0),
                    "a lane holds its items in input order"
                );
                lane.push_back(item);
                self.waiting += 1;
                None
            }
            std::collections::hash_map::Entry::Vacant(free) => {
                free.insert(seq);
                self.keys.insert(seq, key);
                Some(item)
            }
        };
        self.check();
        admitted
    }

    /// The item `seq` has its outcome here: its key is free, and the next
    /// item of that key, if one waits, is out now (returned).
    pub(super) fn finished(&mut self, seq: u32) -> Option<WorkItem<I>> {
        let key = self.keys.remove(&seq)?;
        let was = self.out.remove(&key);
        debug_assert_eq!(was, Some(seq), "the item out of its key's lane");
        let next = match self.lanes.get_mut(&key) {
            Some(lane) => {
                let next = lane.pop_front();
                if lane.is_empty() {
                    self.lanes.remove(&key);
                }
                next
            }
            None => None,
        };
        if let Some(next) = &next {
            self.waiting -= 1;
            self.out.insert(key, next.head.metadata.seq);
            self.keys.insert(next.head.metadata.seq, key);
        }
        self.check();
        next
    }

    /// Every item waiting, for an abort; no key is out any more.
    pub(super) fn take_all(&mut self) -> Vec<WorkItem<I>> {
        self.out.clear();
        self.keys.clear();
        self.waiting = 0;
        std::mem::take(&mut self.lanes)
            .into_values()
            .flatten()
            .collect()
    }

    fn check(&self) {
        debug_assert_eq!(self.out.len(), self.keys.len(), "one item out per key");
        debug_assert!(
            self.lanes.keys().all(|key| self.out.contains_key(key)),
            "a lane waits only behind an item of its key that is out"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(seq: u32, key: u32) -> WorkItem<u32> {
        let mut item = WorkItem::new(key);
        item.head.metadata.seq = seq;
        item
    }

    #[test]
    fn one_item_per_key_is_out_and_the_next_follows_in_order() {
        let mut lanes = Lanes::new(key_fn(|i: &WorkItem<u32>| i.data));
        assert!(lanes.admit(item(0, 7)).is_some());
        assert!(
            lanes.admit(item(1, 8)).is_some(),
            "another key runs beside it"
        );
        assert!(lanes.admit(item(2, 7)).is_none());
        assert!(lanes.admit(item(3, 7)).is_none());
        assert_eq!((lanes.len(), lanes.out()), (2, 2));
        let next = lanes.finished(0).expect("the next of key 7");
        assert_eq!(next.head.metadata.seq, 2);
        assert!(lanes.finished(1).is_none());
        assert_eq!(lanes.finished(2).map(|i| i.head.metadata.seq), Some(3));
        assert!(lanes.finished(3).is_none());
        assert_eq!((lanes.len(), lanes.out()), (0, 0));
        assert!(lanes.finished(99).is_none(), "an item never out");
    }
}
