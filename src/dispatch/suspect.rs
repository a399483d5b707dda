//! Crash suspects: jobs that were running when the last process died, so any of them may be what
//! killed it (see [`JobStore::claim_suspect`](crate::store::JobStore::claim_suspect)).
//!
//! Decides when one may be claimed and when claiming stops for it. A suspect runs alone: it is
//! claimed only while nothing else runs or is being claimed here, and nothing else is claimed
//! from then until its run ends (or its claim comes back empty). A job that takes the process down
//! again then costs no other job an attempt. Suspects go before the queue: while any waits, the
//! queue waits too.

use crate::job::JobId;

/// Where the run of a suspect is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Suspect {
    /// None is being claimed or running.
    #[default]
    Idle,
    Claiming,
    /// This one runs, alone.
    Running(JobId),
}

/// What a pump may claim now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Claim {
    /// Nothing: a suspect is being claimed or runs, or one waits for the others to end.
    Nothing,
    /// A suspect, alone (when the store has none to give after all, the queue).
    Suspect,
    /// Queued jobs, as pools have room.
    Queued,
}

impl Suspect {
    /// `suspects`: how many the store holds; `busy`: whether anything runs or is being claimed
    /// here.
    pub(super) fn next(self, suspects: usize, busy: bool) -> Claim {
        match self {
            Suspect::Claiming | Suspect::Running(_) => Claim::Nothing,
            Suspect::Idle if suspects == 0 => Claim::Queued,
            Suspect::Idle if busy => Claim::Nothing,
            Suspect::Idle => Claim::Suspect,
        }
    }

    /// A suspect's claim was sent.
    pub(super) fn claiming(&mut self) {
        *self = Suspect::Claiming;
    }

    /// The claim came back: `running` is the job handed to a pool, `None` when nothing was (none
    /// claimable, the claim failed, or no pool took it).
    pub(super) fn claimed(&mut self, running: Option<JobId>) {
        *self = running.map_or(Suspect::Idle, Suspect::Running);
    }

    /// The run of `id` ended; whether it was the suspect's, so every pool may claim again.
    pub(super) fn finished(&mut self, id: JobId) -> bool {
        let was = *self == Suspect::Running(id);
        if was {
            *self = Suspect::Idle;
        }
        was
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_suspects_the_queue_is_claimed() {
        assert_eq!(Suspect::Idle.next(0, false), Claim::Queued);
        assert_eq!(Suspect::Idle.next(0, true), Claim::Queued);
    }

    #[test]
    fn a_suspect_is_claimed_only_when_nothing_else_runs_or_is_claimed() {
        assert_eq!(Suspect::Idle.next(2, false), Claim::Suspect);
        // Other jobs are still running or being claimed: wait for them, claim nothing new.
        assert_eq!(Suspect::Idle.next(2, true), Claim::Nothing);
    }

    #[test]
    fn nothing_is_claimed_beside_a_suspect_being_claimed_or_running() {
        let id = JobId::random();
        for state in [Suspect::Claiming, Suspect::Running(id)] {
            assert_eq!(state.next(0, false), Claim::Nothing, "{state:?}");
            assert_eq!(state.next(3, false), Claim::Nothing, "{state:?}");
            assert_eq!(state.next(3, true), Claim::Nothing, "{state:?}");
        }
    }

    #[test]
    fn a_claimed_suspect_runs_until_its_own_run_ends() {
        let (id, other) = (JobId::random(), JobId::random());
        let mut s = Suspect::Idle;
        s.claiming();
        assert_eq!(s, Suspect::Claiming);
        s.claimed(Some(id));
        assert_eq!(s, Suspect::Running(id));
        // Another job's end (one that ran before the suspect was claimed) changes nothing.
        assert!(!s.finished(other));
        assert_eq!(s, Suspect::Running(id));
        assert!(s.finished(id));
        assert_eq!(s, Suspect::Idle);
        assert_eq!(s.next(1, false), Claim::Suspect);
    }

    #[test]
    fn an_empty_or_failed_claim_ends_it() {
        let mut s = Suspect::Idle;
        s.claiming();
        s.claimed(None);
        assert_eq!(s, Suspect::Idle);
        assert!(!s.finished(JobId::random()));
    }
}
