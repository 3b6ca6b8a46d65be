//! A stage's credit: how many items it may send downstream, and how many
//! it has asked of upstream, against its room.
//!
//! **Invariant**: the items the stage holds (queued, waiting to retry, in
//! workers, waiting downstream) plus those asked of upstream and not
//! received never exceed its capacity, `queue_size + workers`: the stage
//! never asks for more than it has room for, so no mailbox holds more than
//! its receiver asked for. After the stage shrinks (fewer workers) it may
//! hold more than its new capacity for a while: it then asks for nothing
//! until it holds less (the bound in force is the old capacity until then).

/// Credit both ways, for a stage of `capacity`.
#[derive(Debug)]
pub(super) struct Credit {
    capacity: usize,
    /// The capacity before a shrink, while the stage still holds more than
    /// its new capacity.
    shrunk_from: Option<usize>,
    /// Items downstream asked for and has not been sent yet.
    downstream: usize,
    /// Items asked of upstream and not yet received.
    requested: usize,
}

impl Credit {
    pub(super) fn new(capacity: usize) -> Self {
        Credit {
            capacity,
            shrunk_from: None,
            downstream: 0,
            requested: 0,
        }
    }

    /// The stage's capacity changed (its worker count did).
    pub(super) fn resize(&mut self, capacity: usize) {
        if capacity < self.capacity {
            let bound = self.shrunk_from.unwrap_or(self.capacity);
            self.shrunk_from = Some(bound);
        }
        self.capacity = capacity;
    }

    /// Downstream has room for `n` more.
    pub(super) fn granted(&mut self, n: usize) {
        self.downstream += n;
    }

    /// How many of `ready` items may go downstream now; counted as sent.
    pub(super) fn send(&mut self, ready: usize) -> usize {
        let n = self.downstream.min(ready);
        self.downstream -= n;
        n
    }

    /// `n` items came from upstream.
    pub(super) fn received(&mut self, n: usize) {
        self.requested = self.requested.saturating_sub(n);
    }

    /// How many to ask of upstream now that the stage holds `held`: the
    /// room it has, in chunks of at least half its capacity so that
    /// batches stay large, or whatever room there is when it holds nothing
    /// and asked for nothing, or when it is `starved` (a worker is to be
    /// given more and nothing is queued: waiting for half the room to free
    /// would let the worker run dry); counted as requested.
    pub(super) fn request(&mut self, held: usize, starved: bool) -> Option<usize> {
        if held + self.requested <= self.capacity {
            self.shrunk_from = None;
        }
        let bound = self.shrunk_from.unwrap_or(self.capacity);
        debug_assert!(
            held + self.requested <= bound,
            "a stage holds {held} and asked for {} more, over its capacity {bound}",
            self.requested,
        );
        let free = self.capacity.saturating_sub(held + self.requested);
        let asked = held + self.requested;
        (free > 0 && (free >= self.capacity.div_ceil(2) || asked == 0 || starved)).then(|| {
            self.requested += free;
            free
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_asks_for_its_room_in_chunks_of_half_its_capacity() {
        let mut credit = Credit::new(10);
        assert_eq!(credit.request(0, false), Some(10));
        credit.received(10);
        // Holding 6: 4 free is less than half, not asked yet.
        assert_eq!(credit.request(6, false), None);
        assert_eq!(credit.request(5, false), Some(5));
        assert_eq!(credit.request(5, false), None, "already asked");
    }

    #[test]
    fn a_starved_stage_asks_for_whatever_room_it_has() {
        let mut credit = Credit::new(10);
        assert_eq!(credit.request(0, false), Some(10));
        credit.received(10);
        assert_eq!(credit.request(8, false), None, "2 free is less than half");
        assert_eq!(
            credit.request(8, true),
            Some(2),
            "a worker is to be given more"
        );
        assert_eq!(credit.request(8, true), None, "already asked, nothing free");
        credit.received(2);
        assert_eq!(credit.request(10, true), None, "full: starved or not");
    }

    #[test]
    fn a_shrunk_stage_asks_for_nothing_until_it_holds_less_than_its_new_capacity() {
        let mut credit = Credit::new(10);
        assert_eq!(credit.request(0, false), Some(10));
        credit.received(10);
        credit.resize(4);
        assert_eq!(credit.request(10, false), None);
        assert_eq!(
            credit.request(3, false),
            None,
            "1 free is less than half of 4"
        );
        assert_eq!(credit.request(2, false), Some(2));
        credit.resize(8);
        assert_eq!(credit.request(2, false), Some(4));
    }

    #[test]
    fn downstream_credit_bounds_what_is_sent() {
        let mut credit = Credit::new(4);
        assert_eq!(credit.send(3), 0);
        credit.granted(2);
        assert_eq!(credit.send(3), 2);
        assert_eq!(credit.send(3), 0);
    }
}
