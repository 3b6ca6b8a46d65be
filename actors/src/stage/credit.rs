//! A stage's credit: how many items it may send downstream, and how many
//! it has asked of upstream, against its room.
//!
//! **Invariant**: the items the stage holds (queued, waiting to retry, in
//! workers, waiting downstream) plus those asked of upstream and not
//! received never exceed its capacity, `queue_size + workers`: the stage
//! never asks for more than it has room for, so no mailbox holds more than
//! its receiver asked for.

/// Credit both ways, for a stage of `capacity`.
#[derive(Debug)]
pub(super) struct Credit {
    capacity: usize,
    /// Items downstream asked for and has not been sent yet.
    downstream: usize,
    /// Items asked of upstream and not yet received.
    requested: usize,
}

impl Credit {
    pub(super) fn new(capacity: usize) -> Self {
        Credit {
            capacity,
            downstream: 0,
            requested: 0,
        }
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
    /// batches stay large (or whatever room there is when it holds nothing
    /// and asked for nothing); counted as requested.
    pub(super) fn request(&mut self, held: usize) -> Option<usize> {
        debug_assert!(
            held + self.requested <= self.capacity,
            "a stage holds {held} and asked for {} more, over its capacity {}",
            self.requested,
            self.capacity
        );
        let free = self.capacity.saturating_sub(held + self.requested);
        let asked = held + self.requested;
        (free > 0 && (free >= self.capacity.div_ceil(2) || asked == 0)).then(|| {
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
        assert_eq!(credit.request(0), Some(10));
        credit.received(10);
        // Holding 6: 4 free is less than half, not asked yet.
        assert_eq!(credit.request(6), None);
        assert_eq!(credit.request(5), Some(5));
        assert_eq!(credit.request(5), None, "already asked");
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
