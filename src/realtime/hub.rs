//! [`Hub`]: who follows which job. The Dispatcher publishes every job change here; WebSocket
//! connections subscribe and unsubscribe here. Publishing only writes into outboxes under a short
//! lock, so it never waits on a socket.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use super::Outbox;
use crate::access::Caller;
use crate::job::{Job, JobId};

#[derive(Default)]
pub struct Hub {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The connections following each job.
    watchers: HashMap<JobId, Vec<Watcher>>,
    /// The jobs each connection follows, to clean up when it goes.
    followed: HashMap<u64, HashSet<JobId>>,
}

struct Watcher {
    conn: u64,
    outbox: Arc<Outbox>,
    /// Who follows: a change reaches the outbox only if the job exists for this caller, so a
    /// subscription to another key's job (refused as unknown) never sees it, not even in the
    /// moment between being registered and refused.
    caller: Caller,
}

impl Hub {
    pub fn new() -> Self {
        Self::default()
    }

    /// Follows `ids` for connection `conn` of `caller`: each known job's current state (from
    /// `current`) goes into `outbox`, and every change published from the moment it is
    /// registered. Returns the ids that are not known jobs (or not the caller's).
    ///
    /// The watcher is registered first and the snapshot read after, without holding the hub's
    /// lock (the read may touch the disk: call this off the event loop); a change published in
    /// between reaches the outbox before the snapshot, and the outbox drops a snapshot older than
    /// what it already holds, so nothing is missed and a job never goes backwards.
    pub fn subscribe(
        &self,
        conn: u64,
        outbox: &Arc<Outbox>,
        ids: Vec<JobId>,
        caller: Caller,
        mut current: impl FnMut(JobId) -> Option<Job>,
    ) -> Vec<JobId> {
        {
            let mut inner = self.lock();
            for id in &ids {
                if inner.followed.entry(conn).or_default().insert(*id) {
                    inner.watchers.entry(*id).or_default().push(Watcher { conn, outbox: outbox.clone(), caller });
                }
            }
        }
        let mut unknown = Vec::new();
        for id in ids {
            match current(id).filter(|job| caller.may_see(job)) {
                Some(job) => outbox.push(job),
                None => unknown.push(id),
            }
        }
        if !unknown.is_empty() {
            self.unsubscribe(conn, Some(unknown.clone()));
        }
        unknown
    }

    /// Stops following `ids` (`None`: every job; the connection is gone).
    pub fn unsubscribe(&self, conn: u64, ids: Option<Vec<JobId>>) {
        let mut inner = self.lock();
        let ids: Vec<JobId> = match ids {
            Some(ids) => {
                if let Some(set) = inner.followed.get_mut(&conn) {
                    ids.iter().for_each(|id| {
                        set.remove(id);
                    });
                }
                ids
            }
            None => inner.followed.remove(&conn).map(|s| s.into_iter().collect()).unwrap_or_default(),
        };
        for id in ids {
            if let Some(list) = inner.watchers.get_mut(&id) {
                list.retain(|w| {
                    let other = w.conn != conn;
                    if !other {
                        w.outbox.forget(id);
                    }
                    other
                });
                if list.is_empty() {
                    inner.watchers.remove(&id);
                }
            }
        }
    }

    /// Every job someone follows.
    pub fn watched(&self) -> Vec<JobId> {
        self.lock().watchers.keys().copied().collect()
    }

    /// Whether anyone follows `id` (lets the publisher skip building snapshots).
    pub fn is_watched(&self, id: JobId) -> bool {
        self.lock().watchers.contains_key(&id)
    }

    /// A job changed: its snapshot goes to every connection following it.
    pub fn publish(&self, job: &Job) {
        if let Some(watchers) = self.lock().watchers.get(&job.id) {
            for w in watchers.iter().filter(|w| w.caller.may_see(job)) {
                w.outbox.push(job.clone());
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::job::{JobKind, Owner};

    #[test]
    fn subscribers_get_the_snapshot_then_changes_until_they_leave() {
        let hub = Hub::new();
        let outbox = Arc::new(Outbox::new());
        let job = Job::new(JobId::random(), JobKind::named("pdf").unwrap(), SystemTime::now());
        let missing = JobId::random();
        let unknown =
            hub.subscribe(1, &outbox, vec![job.id, missing], Caller::Open, |id| (id == job.id).then(|| job.clone()));
        assert_eq!(unknown, vec![missing]);
        let mut running = job.clone();
        running.start(SystemTime::now());
        hub.publish(&running);
        let seen: Vec<_> = outbox.take().into_iter().map(|j| j.status).collect();
        assert_eq!(seen, vec![crate::job::JobStatus::Queued, crate::job::JobStatus::Running]);
        hub.unsubscribe(1, None);
        assert!(!hub.is_watched(job.id));
        hub.publish(&running);
        assert!(outbox.take().is_empty());
    }

    #[test]
    fn a_keyed_caller_never_sees_another_keys_job() {
        let hub = Hub::new();
        let (mine, theirs) = (Owner::from_bytes([1; 16]), Owner::from_bytes([2; 16]));
        let mut job = Job::new(JobId::random(), JobKind::named("pdf").unwrap(), SystemTime::now());
        job.owner = Some(theirs);
        let outbox = Arc::new(Outbox::new());
        // A change published while the refused subscription is registered is not delivered.
        let unknown = hub.subscribe(1, &outbox, vec![job.id], Caller::Key(mine), |_| {
            hub.publish(&job);
            Some(job.clone())
        });
        assert_eq!(unknown, vec![job.id]);
        assert!(outbox.take().is_empty());
        let theirs_box = Arc::new(Outbox::new());
        assert!(hub.subscribe(2, &theirs_box, vec![job.id], Caller::Key(theirs), |_| Some(job.clone())).is_empty());
        assert_eq!(theirs_box.take().len(), 1);
    }
}
