//! A connection's pending job events, written by the Dispatcher, read by the connection task.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::job::{Job, JobId};

/// Pending job snapshots for one WebSocket connection.
///
/// Per job it holds at most one snapshot per status (a job has at most four: queued, running and
/// one final status), so its size is bounded by the connection's subscription cap however slowly
/// the client reads. A newer snapshot with the same status as the last pending one replaces it.
#[derive(Default)]
pub struct Outbox {
    pending: Mutex<Pending>,
    /// Wakes the connection task when something was added.
    ready: Notify,
}

#[derive(Default)]
struct Pending {
    /// Jobs with pending snapshots, in the order they first became pending.
    order: VecDeque<JobId>,
    snapshots: HashMap<JobId, Vec<Job>>,
    /// How far along the newest snapshot taken for each followed job was: an older one (a
    /// subscription's snapshot read before a change that was already pushed) is dropped, so
    /// a client never sees a job go backwards.
    newest: HashMap<JobId, Version>,
}

/// How far along a job is: its attempt, then queued < running < ended, then its progress.
type Version = (u32, u8, u32);

fn version(job: &Job) -> Version {
    let rank = match job.status {
        crate::job::JobStatus::Queued => 0,
        crate::job::JobStatus::Running => 1,
        _ => 2,
    };
    // Progress is in [0, 1]: the bits of a non-negative float order like the float.
    (job.attempts, rank, job.progress.max(0.0).to_bits())
}

impl Outbox {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a snapshot; never blocks beyond a short lock.
    pub fn push(&self, job: Job) {
        {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let id = job.id;
            let Pending { order, snapshots, newest } = &mut *p;
            let v = version(&job);
            match newest.get(&id) {
                Some(seen) if *seen > v => return,
                _ => {
                    newest.insert(id, v);
                }
            }
            let list = snapshots.entry(id).or_insert_with(|| {
                order.push_back(id);
                Vec::new()
            });
            match list.last_mut() {
                Some(last) if last.status == job.status => *last = job,
                _ => list.push(job),
            }
        }
        self.ready.notify_one();
    }

    /// The job is no longer followed: forget how far along it was.
    pub fn forget(&self, id: JobId) {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).newest.remove(&id);
    }

    /// Waits until something is pending (returns at once if something was added since the last
    /// [`Outbox::take`]).
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Everything pending, oldest job first, each job's snapshots in order.
    pub fn take(&self) -> Vec<Job> {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let Pending { order, snapshots, .. } = &mut *p;
        let mut out = Vec::new();
        for id in order.drain(..) {
            if let Some(list) = snapshots.remove(&id) {
                out.extend(list);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::error::ErrorBody;
    use crate::job::JobKind;

    #[test]
    fn progress_is_coalesced_and_every_status_is_kept() {
        let now = SystemTime::now();
        let outbox = Outbox::new();
        let mut job = Job::new(JobId::random(), JobKind::named("pdf").unwrap(), now);
        outbox.push(job.clone());
        job.start(now);
        for p in 1..100 {
            job.advance(p as f32 / 100.0, None);
            outbox.push(job.clone());
        }
        job.fail(ErrorBody::new("timeout", "slow"), now);
        outbox.push(job.clone());
        let out = outbox.take();
        let statuses: Vec<&str> = out.iter().map(|j| j.status.as_str()).collect();
        assert_eq!(statuses, ["queued", "running", "failed"]);
        assert!((out[1].progress - 0.99).abs() < 1e-6, "the latest progress is kept");
        assert!(outbox.take().is_empty());
    }

    #[test]
    fn a_snapshot_older_than_what_was_pushed_is_dropped() {
        let now = SystemTime::now();
        let outbox = Outbox::new();
        let mut job = Job::new(JobId::random(), JobKind::named("pdf").unwrap(), now);
        let queued = job.clone();
        job.claim();
        job.start(now);
        job.advance(0.5, None);
        outbox.push(job.clone());
        outbox.push(queued.clone());
        let mut older = job.clone();
        older.progress = 0.2;
        outbox.push(older);
        let out = outbox.take();
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].status.as_str(), out[0].progress), ("running", 0.5));
        outbox.forget(job.id);
        outbox.push(queued);
        assert_eq!(outbox.take().len(), 1, "forgotten once unsubscribed");
    }

    #[test]
    fn jobs_come_out_in_the_order_they_became_pending() {
        let now = SystemTime::now();
        let outbox = Outbox::new();
        let a = Job::new(JobId::random(), JobKind::named("pdf").unwrap(), now);
        let b = Job::new(JobId::random(), JobKind::named("image").unwrap(), now);
        outbox.push(b.clone());
        outbox.push(a.clone());
        outbox.push(b.clone());
        let ids: Vec<JobId> = outbox.take().iter().map(|j| j.id).collect();
        assert_eq!(ids, [b.id, a.id]);
    }
}
