//! What a shutdown does with the jobs accepted: the drain, decided by what the store keeps.
//!
//! A store that keeps jobs across restarts ([`Capabilities::keeps_jobs`]) gets
//! [`ShutdownPolicy::Release`]: nothing more is claimed once the drain begins, jobs claimed and
//! not started go back to the queue at once, the drain waits only for the runs under way (and
//! the writes they cause), and runs still going when the grace period ends are stopped and put
//! back in the queue, all for the next start. A store that loses its jobs with the process gets
//! [`ShutdownPolicy::FailQueued`]: its queue keeps running through the grace period (nobody else
//! ever will), the drain waits for everything accepted, and what is left when the grace period
//! ends, running or queued, fails with `shutdown` so that no client waits for it in vain.
//!
//! [`Draining`] holds the drain's state: who waits for it to end and the writes it waits for.

use std::sync::Arc;

use tokio::sync::oneshot;

use crate::error::ErrorBody;
use crate::job::{Job, JobId, JobKind};
use crate::store::{Capabilities, Final, JobStore};

/// What a shutdown does with the jobs of a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ShutdownPolicy {
    /// Jobs stay in the store, queued, for the next start.
    Release,
    /// Queued jobs keep running until the grace period ends; then all left fail.
    FailQueued,
}

impl ShutdownPolicy {
    pub(super) fn of(store: Capabilities) -> Self {
        if store.keeps_jobs {
            ShutdownPolicy::Release
        } else {
            ShutdownPolicy::FailQueued
        }
    }

    /// Whether queued jobs are still claimed once a drain began.
    pub(super) fn claims_while_draining(self) -> bool {
        self == ShutdownPolicy::FailQueued
    }

    /// Whether jobs claimed and not started yet are stopped when the drain begins (they never
    /// start, and go back to the queue).
    pub(super) fn stops_unstarted(self) -> bool {
        self == ShutdownPolicy::Release
    }

    /// Whether a run stopped by the shutdown goes back to the queue; if not, it fails with
    /// `shutdown` when the grace period ends.
    pub(super) fn releases_stopped_runs(self) -> bool {
        self == ShutdownPolicy::Release
    }

    /// Whether the jobs still queued when the grace period ends fail.
    pub(super) fn fails_queued(self) -> bool {
        self == ShutdownPolicy::FailQueued
    }
}

/// The jobs a drain may wait for, as the Dispatcher counts them.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Held {
    /// Handed to a pool and not finished (waiting in its mailbox or running).
    pub(super) running: usize,
    /// Claims sent to the store and not answered.
    pub(super) claiming: usize,
    /// Accepted and not ended, every kind with a pool here: queued in the store, being claimed,
    /// in a pool, or admitted and not committed.
    pub(super) accepted: usize,
}

/// A drain: set off by the first `Drain`, over once nothing it waits for is left (or when the
/// grace period ends).
pub(super) struct Draining {
    policy: ShutdownPolicy,
    /// Set once a drain starts: the callers waiting for it to end.
    waiters: Option<Vec<oneshot::Sender<()>>>,
    /// Release writes (runs stopped by a shutdown) not committed yet.
    pub(super) releasing: usize,
    /// Final writes not committed yet.
    pub(super) finishing: usize,
}

impl Draining {
    pub(super) fn new(policy: ShutdownPolicy) -> Self {
        Draining { policy, waiters: None, releasing: 0, finishing: 0 }
    }

    pub(super) fn policy(&self) -> ShutdownPolicy {
        self.policy
    }

    /// Whether a drain began.
    pub(super) fn started(&self) -> bool {
        self.waiters.is_some()
    }

    /// Whether new claims may start.
    pub(super) fn may_claim(&self) -> bool {
        !self.started() || self.policy.claims_while_draining()
    }

    /// Whether a job claimed now is stopped before it starts (claimed just before the drain began).
    pub(super) fn stops_claimed(&self) -> bool {
        self.started() && self.policy.stops_unstarted()
    }

    /// `waiter` waits for the drain to end; whether this began it.
    pub(super) fn wait(&mut self, waiter: oneshot::Sender<()>) -> bool {
        let began = !self.started();
        self.waiters.get_or_insert_with(Vec::new).push(waiter);
        began
    }

    /// Whether someone waits for the drain to end.
    pub(super) fn awaited(&self) -> bool {
        self.waiters.as_ref().is_some_and(|w| !w.is_empty())
    }

    /// What the drain still waits for: with [`ShutdownPolicy::Release`] only the jobs running
    /// here and the writes they cause (queued ones are kept for the next start); with
    /// [`ShutdownPolicy::FailQueued`] everything accepted.
    pub(super) fn outstanding(&self, held: Held) -> usize {
        match self.policy {
            ShutdownPolicy::Release => held.running + self.releasing + self.finishing + held.claiming,
            ShutdownPolicy::FailQueued => held.accepted + self.finishing,
        }
    }

    /// The drain is over: everyone waiting hears it (later waiters are answered as they come).
    pub(super) fn resolve(&mut self) {
        for waiter in self.waiters.as_mut().map(std::mem::take).unwrap_or_default() {
            let _ = waiter.send(());
        }
    }
}

/// The grace period is over and these runs (`(job, attempt)`) are still going (their runs were
/// told to stop): puts them back in the queue, or fails them and every job still queued. The
/// jobs it ended.
pub(super) async fn stop(store: Arc<dyn JobStore>, policy: ShutdownPolicy, runs: Vec<(JobId, u32)>) -> Vec<Job> {
    let mut ended = Vec::new();
    for (id, attempt) in runs {
        if policy.releases_stopped_runs() {
            match store.release(id, attempt).await {
                Ok(_) => tracing::info!(job = %id, "job stopped by the shutdown; queued again for the next start"),
                Err(e) => tracing::error!(job = %id, "cannot queue the job again (the next start will): {e}"),
            }
        } else if let Ok(Some(job)) = store.finish(id, attempt, Final::Failed(shutdown_error())).await {
            ended.push(job);
        }
    }
    if policy.fails_queued() {
        // Nothing of such a store outlives the process: queued jobs fail now.
        let kinds: Vec<JobKind> = store.stats().queued.iter().map(|(kind, _)| kind).collect();
        for kind in kinds {
            while let Some(claim) = store.claim(kind) {
                let Ok(Some(claimed)) = claim.await else { continue };
                let (id, attempt) = (claimed.job.id, claimed.job.attempts);
                if let Ok(Some(job)) = store.finish(id, attempt, Final::Failed(shutdown_error())).await {
                    ended.push(job);
                }
            }
        }
    }
    ended
}

fn shutdown_error() -> ErrorBody {
    ErrorBody::new("shutdown", "the service shut down before the job could finish; submit it again")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMORY: Capabilities = Capabilities { keeps_jobs: false, shared: false, counts_owners: false };
    const EMBEDDED: Capabilities = Capabilities { keeps_jobs: true, shared: false, counts_owners: false };
    const SHARED: Capabilities = Capabilities { keeps_jobs: true, shared: true, counts_owners: true };

    #[test]
    fn a_store_that_keeps_jobs_releases_them_and_one_that_does_not_fails_them() {
        assert_eq!(ShutdownPolicy::of(MEMORY), ShutdownPolicy::FailQueued);
        assert_eq!(ShutdownPolicy::of(EMBEDDED), ShutdownPolicy::Release);
        assert_eq!(ShutdownPolicy::of(SHARED), ShutdownPolicy::Release);
    }

    #[test]
    fn what_each_policy_does() {
        use ShutdownPolicy::*;
        // (claims while draining, stops unstarted jobs, releases stopped runs, fails the queue)
        let table = [(Release, (false, true, true, false)), (FailQueued, (true, false, false, true))];
        for (p, want) in table {
            let got = (p.claims_while_draining(), p.stops_unstarted(), p.releases_stopped_runs(), p.fails_queued());
            assert_eq!(got, want, "{p:?}");
        }
    }

    #[test]
    fn claims_stop_at_the_drain_only_for_a_store_that_keeps_jobs() {
        for (policy, while_draining) in [(ShutdownPolicy::Release, false), (ShutdownPolicy::FailQueued, true)] {
            let mut d = Draining::new(policy);
            assert!(d.may_claim() && !d.stops_claimed() && !d.started());
            let (tx, _rx) = oneshot::channel();
            assert!(d.wait(tx));
            assert!(d.started());
            assert_eq!(d.may_claim(), while_draining, "{policy:?}");
            assert_eq!(d.stops_claimed(), !while_draining, "{policy:?}");
        }
    }

    #[test]
    fn a_release_drain_waits_for_runs_claims_and_writes_not_the_queue() {
        let mut d = Draining::new(ShutdownPolicy::Release);
        assert_eq!(d.outstanding(Held { running: 0, claiming: 0, accepted: 40 }), 0);
        assert_eq!(d.outstanding(Held { running: 2, claiming: 1, accepted: 40 }), 3);
        (d.releasing, d.finishing) = (1, 2);
        assert_eq!(d.outstanding(Held { running: 0, claiming: 0, accepted: 40 }), 3);
    }

    #[test]
    fn a_fail_queued_drain_waits_for_everything_accepted() {
        let mut d = Draining::new(ShutdownPolicy::FailQueued);
        assert_eq!(d.outstanding(Held { running: 2, claiming: 1, accepted: 40 }), 40);
        d.finishing = 2;
        assert_eq!(d.outstanding(Held { running: 0, claiming: 0, accepted: 0 }), 2);
        // Releases are no business of it (nothing is released), so they are not waited for.
        (d.releasing, d.finishing) = (3, 0);
        assert_eq!(d.outstanding(Held::default()), 0);
    }

    #[test]
    fn every_waiter_hears_the_end_and_later_ones_wait_anew() {
        let mut d = Draining::new(ShutdownPolicy::Release);
        assert!(!d.awaited());
        let (a, mut ra) = oneshot::channel();
        let (b, mut rb) = oneshot::channel();
        assert!(d.wait(a));
        assert!(!d.wait(b), "only the first waiter begins the drain");
        assert!(d.awaited());
        d.resolve();
        assert_eq!((ra.try_recv(), rb.try_recv()), (Ok(()), Ok(())));
        assert!(!d.awaited() && d.started(), "over, and still draining");
        let (c, mut rc) = oneshot::channel();
        assert!(!d.wait(c));
        assert!(d.awaited());
        assert!(rc.try_recv().is_err());
    }
}
