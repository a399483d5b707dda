//! Progress to WebSocket followers: when a running job's progress is pushed.
//!
//! Workers may report progress far more often than followers want it. The contract allows one
//! event per [`PUSH_EVERY`] per job and wants a change shown within 100 ms, so a job's progress
//! is pushed at once when its last push is old enough, else once, later, when it is: that delayed
//! push carries the job's latest progress, so the last report is never lost, only merged. A job's
//! end is always pushed (not throttled here) and forgets its entry, so a delayed push due after
//! it sends nothing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::job::JobId;

/// Least time between two progress events of one job to its followers.
pub(super) const PUSH_EVERY: Duration = Duration::from_millis(50);

/// What to do with a progress report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Push {
    /// Push the job now.
    Now,
    /// Push it after this long (schedule [`Throttle::due`] then).
    After(Duration),
    /// A push is already scheduled; it will carry this progress.
    Scheduled,
}

/// When each followed job's progress was last pushed, and whether a delayed push is scheduled.
#[derive(Debug, Default)]
pub(super) struct Throttle {
    pushed: HashMap<JobId, (Instant, bool)>,
}

impl Throttle {
    /// The progress of `id` changed at `now`.
    pub(super) fn progressed(&mut self, id: JobId, now: Instant) -> Push {
        let since = match self.pushed.get(&id) {
            None => PUSH_EVERY,
            Some((_, true)) => return Push::Scheduled,
            Some((last, false)) => now.duration_since(*last),
        };
        if since >= PUSH_EVERY {
            self.pushed.insert(id, (now, false));
            Push::Now
        } else {
            self.pushed.insert(id, (now - since, true));
            Push::After(PUSH_EVERY - since)
        }
    }

    /// The delayed push of `id` is due at `now`: whether to push it (not if the job ended
    /// meanwhile: its end was pushed).
    pub(super) fn due(&mut self, id: JobId, now: Instant) -> bool {
        match self.pushed.get_mut(&id) {
            Some(entry) => {
                *entry = (now, false);
                true
            }
            None => false,
        }
    }

    /// `id` ended: nothing more of its progress is pushed.
    pub(super) fn ended(&mut self, id: JobId) {
        self.pushed.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_first_report_is_pushed_at_once() {
        let mut t = Throttle::default();
        assert_eq!(t.progressed(JobId::random(), Instant::now()), Push::Now);
    }

    #[test]
    fn reports_within_the_interval_make_one_delayed_push() {
        let (mut t, id, t0) = (Throttle::default(), JobId::random(), Instant::now());
        assert_eq!(t.progressed(id, t0), Push::Now);
        // 10 ms later: pushed 40 ms later, 50 ms after the last push.
        assert_eq!(t.progressed(id, t0 + 10 * MS), Push::After(40 * MS));
        // Later reports ride on that push (it sends the latest progress).
        assert_eq!(t.progressed(id, t0 + 20 * MS), Push::Scheduled);
        assert_eq!(t.progressed(id, t0 + 45 * MS), Push::Scheduled);
        assert!(t.due(id, t0 + 50 * MS));
        // The delayed push counts as the last one.
        assert_eq!(t.progressed(id, t0 + 60 * MS), Push::After(40 * MS));
        assert!(t.due(id, t0 + 100 * MS));
        assert_eq!(t.progressed(id, t0 + 150 * MS), Push::Now);
    }

    #[test]
    fn a_report_after_the_interval_is_pushed_at_once() {
        let (mut t, id, t0) = (Throttle::default(), JobId::random(), Instant::now());
        assert_eq!(t.progressed(id, t0), Push::Now);
        assert_eq!(t.progressed(id, t0 + 50 * MS), Push::Now);
        assert_eq!(t.progressed(id, t0 + 200 * MS), Push::Now);
    }

    #[test]
    fn jobs_are_throttled_each_on_its_own() {
        let (mut t, a, b, t0) = (Throttle::default(), JobId::random(), JobId::random(), Instant::now());
        assert_eq!(t.progressed(a, t0), Push::Now);
        assert_eq!(t.progressed(b, t0 + MS), Push::Now);
        assert_eq!(t.progressed(a, t0 + 2 * MS), Push::After(48 * MS));
        assert_eq!(t.progressed(b, t0 + 3 * MS), Push::After(48 * MS));
    }

    #[test]
    fn a_delayed_push_due_after_the_job_ended_sends_nothing() {
        let (mut t, id, t0) = (Throttle::default(), JobId::random(), Instant::now());
        assert_eq!(t.progressed(id, t0), Push::Now);
        assert_eq!(t.progressed(id, t0 + 10 * MS), Push::After(40 * MS));
        t.ended(id);
        assert!(!t.due(id, t0 + 50 * MS));
        // Forgotten: a later report (a job id never runs twice at once) starts afresh.
        assert_eq!(t.progressed(id, t0 + 51 * MS), Push::Now);
    }
}
