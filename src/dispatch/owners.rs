//! Per-API-key pending counts (`--max-pending-per-key`): who counts an owner's jobs, and so when
//! a job stops counting here.
//!
//! A store alone on its data sees every job end through this process's Dispatcher, so the
//! Dispatcher counts each owner's jobs itself: from the store's count at start, up on admission,
//! down when an insert fails or replays (nothing was created) and when a job ends. A store that
//! counts owners itself ([`Capabilities::counts_owners`](crate::store::Capabilities), a database
//! shared by instances that end each other's jobs) answers for the jobs it holds; here are then
//! only the jobs admitted whose insert has not committed yet, so concurrent submissions cannot
//! overshoot the limit between admission and commit.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use crate::job::Owner;

/// Each owner's jobs admitted here and not settled.
#[derive(Debug, Default)]
pub(super) struct Owners {
    counts: HashMap<Owner, usize>,
    /// Jobs are counted here until they end (not only until their insert commits).
    until_end: bool,
}

impl Owners {
    /// `limited`: whether a per-key limit is set; `store_counts`: whether the store counts owners
    /// itself; `stored`: each owner's queued and running jobs in the store at start.
    pub(super) fn new(limited: bool, store_counts: bool, stored: HashMap<Owner, usize>) -> Self {
        let counts = if store_counts { HashMap::new() } else { stored };
        Owners { counts, until_end: limited && !store_counts }
    }

    /// Whether a job's end settles it here.
    pub(super) fn until_end(&self) -> bool {
        self.until_end
    }

    /// `owner`'s jobs admitted and not ended: the count here plus the store's own (`stored`, when
    /// it counts owners).
    pub(super) fn pending(&self, owner: Owner, stored: Option<usize>) -> usize {
        stored.unwrap_or(0) + self.counts.get(&owner).copied().unwrap_or(0)
    }

    /// `n` jobs of `owner` were admitted; their insert is under way.
    pub(super) fn admitted(&mut self, owner: Owner, n: usize) {
        *self.counts.entry(owner).or_default() += n;
    }

    /// The insert of `n` admitted jobs of `owner` answered: `created` whether it created them.
    /// They stay counted here until they end, unless the store counts them from now on; nothing
    /// was created by a failed insert or a replay.
    pub(super) fn inserted(&mut self, owner: Owner, n: usize, created: bool) {
        if !created || !self.until_end {
            self.settled(owner, n);
        }
    }

    /// `n` jobs of `owner` counted here are no longer.
    pub(super) fn settled(&mut self, owner: Owner, n: usize) {
        if let Entry::Occupied(mut e) = self.counts.entry(owner) {
            *e.get_mut() = e.get().saturating_sub(n);
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(b: u8) -> Owner {
        Owner::from_bytes([b; 16])
    }

    #[test]
    fn alone_on_its_data_the_count_starts_from_the_store_and_lasts_until_the_end() {
        let (a, b) = (owner(1), owner(2));
        let mut o = Owners::new(true, false, HashMap::from([(a, 2)]));
        assert!(o.until_end());
        assert_eq!((o.pending(a, None), o.pending(b, None)), (2, 0));
        o.admitted(a, 3);
        o.inserted(a, 3, true);
        assert_eq!(o.pending(a, None), 5, "created jobs count until they end");
        o.settled(a, 1);
        assert_eq!(o.pending(a, None), 4);
    }

    #[test]
    fn a_failed_or_replayed_insert_gives_its_jobs_back() {
        let a = owner(1);
        let mut o = Owners::new(true, false, HashMap::new());
        o.admitted(a, 2);
        assert_eq!(o.pending(a, None), 2, "counted while the insert is under way");
        o.inserted(a, 2, false);
        assert_eq!(o.pending(a, None), 0);
    }

    #[test]
    fn a_store_that_counts_owners_holds_the_count_once_the_insert_commits() {
        let a = owner(1);
        // The store's count at start is its own to keep.
        let mut o = Owners::new(true, true, HashMap::from([(a, 7)]));
        assert!(!o.until_end());
        assert_eq!(o.pending(a, Some(7)), 7);
        o.admitted(a, 2);
        assert_eq!(o.pending(a, Some(7)), 9, "admitted, not committed: counted here");
        o.inserted(a, 2, true);
        assert_eq!(o.pending(a, Some(9)), 9, "committed: the store counts them");
    }

    #[test]
    fn without_a_limit_nothing_is_counted_until_the_end() {
        assert!(!Owners::new(false, false, HashMap::new()).until_end());
    }

    #[test]
    fn settling_more_than_counted_stops_at_zero() {
        let a = owner(1);
        let mut o = Owners::new(true, false, HashMap::from([(a, 1)]));
        o.settled(a, 3);
        o.settled(owner(2), 1);
        assert_eq!((o.pending(a, None), o.pending(owner(2), None)), (0, 0));
    }
}
