//! Job state behind one narrow interface.
//!
//! The [`Dispatcher`](super::Dispatcher) is the only caller. Today [`MemoryStore`] keeps everything
//! in process; the roadmap swaps in an embedded durable store, then PostgreSQL, behind the same
//! trait, without touching the Dispatcher's callers.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::domain::JobPayload;
use crate::error::ErrorBody;
use crate::job::{Job, JobId, JobKind, JobStatus, ResultMeta};

/// A change to a job, applied by the store under the rules of [`Job`]'s state machine.
#[derive(Debug)]
pub enum Transition {
    Start,
    Progress { fraction: f32, stage: Option<String> },
    Succeed { meta: ResultMeta, bytes: Bytes },
    Fail(ErrorBody),
    Cancel { reason: Option<ErrorBody> },
}

/// Which jobs `GET /jobs` lists.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub status: Option<JobStatus>,
    pub kind: Option<JobKind>,
    pub limit: usize,
}

/// How long and how much finished work is kept.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// Finished jobs are forgotten this long after they finish.
    pub ttl: Duration,
    /// Most result bytes held; the oldest finished jobs go first past it.
    pub result_bytes: usize,
    /// Most finished jobs remembered.
    pub finished_jobs: usize,
}

/// Why a result cannot be stored.
#[derive(Debug, PartialEq, Eq)]
pub enum StoreError {
    /// A single result larger than the whole result budget.
    ResultTooLarge { bytes: usize, budget: usize },
}

pub trait JobStore: Send + 'static {
    /// Records a new queued job with the payload its worker will need; `weight` is the payload's
    /// approximate size in bytes, counted against the queued-bytes budget.
    fn insert(&mut self, job: Job, payload: JobPayload, weight: usize);
    /// A snapshot of one job.
    fn get(&self, id: JobId) -> Option<Job>;
    /// Applies a transition. `Ok(Some(job))`: it changed the job; `Ok(None)`: nothing changed
    /// (unknown job, or the transition is not allowed from the job's state).
    fn apply(&mut self, id: JobId, change: Transition, now: SystemTime) -> Result<Option<Job>, StoreError>;
    /// Takes the oldest queued job of `kind` with its payload, leaving it queued (the worker's
    /// start event moves it on). Cancelled jobs are skipped.
    fn next_queued(&mut self, kind: JobKind) -> Option<(JobId, JobPayload)>;
    /// Jobs of `kind` accepted but not yet handed to a worker.
    fn queued(&self, kind: JobKind) -> usize;
    /// Bytes held by the payloads of queued jobs.
    fn queued_bytes(&self) -> usize;
    /// Ids of jobs not yet handed to a worker, oldest first.
    fn queued_ids(&self) -> Vec<JobId>;
    /// The bytes of a succeeded job's result.
    fn result(&self, id: JobId) -> Option<(ResultMeta, Bytes)>;
    /// Jobs matching `filter`, newest first.
    fn list(&self, filter: &ListFilter) -> Vec<Job>;
    /// Forgets finished jobs past their TTL or past the retention limits; returns how many.
    fn expire(&mut self, now: SystemTime) -> usize;
    /// Counters for readiness and operators.
    fn stats(&self) -> StoreStats;
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub jobs: usize,
    /// Jobs held now, by status.
    pub by_status: StatusCounts,
    pub finished: usize,
    pub result_bytes: usize,
    pub queued_bytes: usize,
}

/// How many jobs are in each status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatusCounts {
    pub queued: usize,
    pub running: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub cancelled: usize,
}

impl StatusCounts {
    fn slot(&mut self, status: JobStatus) -> &mut usize {
        match status {
            JobStatus::Queued => &mut self.queued,
            JobStatus::Running => &mut self.running,
            JobStatus::Succeeded => &mut self.succeeded,
            JobStatus::Failed => &mut self.failed,
            JobStatus::Cancelled => &mut self.cancelled,
        }
    }

    fn moved(&mut self, from: JobStatus, to: JobStatus) {
        *self.slot(from) -= 1;
        *self.slot(to) += 1;
    }
}

/// Everything in process memory, bounded by [`Retention`] and the Dispatcher's admission limits.
pub struct MemoryStore {
    /// All known jobs by id.
    entries: HashMap<JobId, Entry>,
    /// Creation order (sequence number → id), for newest-first listing.
    by_creation: BTreeMap<u64, JobId>,
    /// Next creation sequence number.
    next_seq: u64,
    /// Queued ids per kind, oldest first; may hold ids that were cancelled meanwhile.
    queues: HashMap<JobKind, VecDeque<JobId>>,
    /// Finished ids in the order they finished, for TTL and budget eviction.
    finished: VecDeque<JobId>,
    /// Sum of stored result sizes.
    result_bytes: usize,
    /// Sum of queued payload weights.
    queued_bytes: usize,
    /// Jobs held, by status.
    counts: StatusCounts,
    /// Jobs per kind still holding their payload (accepted, not yet handed to a worker).
    waiting: HashMap<JobKind, usize>,
    retention: Retention,
}

struct Entry {
    job: Job,
    seq: u64,
    /// The work description, until a worker takes it.
    payload: Option<(JobPayload, usize)>,
    /// The result bytes once succeeded.
    result: Option<Bytes>,
}

impl MemoryStore {
    pub fn new(retention: Retention) -> Self {
        MemoryStore {
            entries: HashMap::new(),
            by_creation: BTreeMap::new(),
            next_seq: 0,
            queues: HashMap::new(),
            finished: VecDeque::new(),
            result_bytes: 0,
            queued_bytes: 0,
            waiting: HashMap::new(),
            counts: StatusCounts::default(),
            retention,
        }
    }

    fn drop_payload(&mut self, id: JobId) -> Option<JobPayload> {
        let entry = self.entries.get_mut(&id)?;
        let (payload, weight) = entry.payload.take()?;
        self.queued_bytes -= weight;
        *self.waiting.entry(entry.job.kind).or_default() -= 1;
        Some(payload)
    }

    fn remove(&mut self, id: JobId) {
        self.drop_payload(id);
        if let Some(entry) = self.entries.remove(&id) {
            *self.counts.slot(entry.job.status) -= 1;
            self.by_creation.remove(&entry.seq);
            if let Some(result) = entry.result {
                self.result_bytes -= result.len();
            }
        }
    }

    /// Evicts the oldest finished jobs until `extra` more result bytes fit the budget.
    fn make_room(&mut self, extra: usize) {
        while self.result_bytes + extra > self.retention.result_bytes {
            match self.finished.pop_front() {
                Some(id) => self.remove(id),
                None => break,
            }
        }
    }
}

impl JobStore for MemoryStore {
    fn insert(&mut self, job: Job, payload: JobPayload, weight: usize) {
        let id = job.id;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queues.entry(job.kind).or_default().push_back(id);
        self.by_creation.insert(seq, id);
        self.queued_bytes += weight;
        *self.waiting.entry(job.kind).or_default() += 1;
        self.counts.queued += 1;
        self.entries.insert(id, Entry { job, seq, payload: Some((payload, weight)), result: None });
    }

    fn get(&self, id: JobId) -> Option<Job> {
        self.entries.get(&id).map(|e| e.job.clone())
    }

    fn apply(&mut self, id: JobId, change: Transition, now: SystemTime) -> Result<Option<Job>, StoreError> {
        let Some(entry) = self.entries.get_mut(&id) else { return Ok(None) };
        let before = entry.job.status;
        let was_terminal = before.is_terminal();
        let changed = match change {
            Transition::Start => entry.job.start(now),
            Transition::Progress { fraction, stage } => entry.job.advance(fraction, stage),
            Transition::Succeed { meta, bytes } => {
                if entry.job.status != JobStatus::Running {
                    return Ok(None);
                }
                if bytes.len() > self.retention.result_bytes {
                    return Err(StoreError::ResultTooLarge { bytes: bytes.len(), budget: self.retention.result_bytes });
                }
                self.make_room(bytes.len());
                // make_room only evicts finished jobs, never this running one.
                let entry = self.entries.get_mut(&id).expect("a running job is not evicted");
                self.result_bytes += bytes.len();
                entry.result = Some(bytes);
                entry.job.succeed(meta, now)
            }
            Transition::Fail(error) => entry.job.fail(error, now),
            Transition::Cancel { reason } => {
                let changed = entry.job.cancel(now);
                if changed {
                    entry.job.error = reason;
                }
                changed
            }
        };
        if !changed {
            return Ok(None);
        }
        let job = self.entries[&id].job.clone();
        if job.status != before {
            self.counts.moved(before, job.status);
        }
        if job.status.is_terminal() && !was_terminal {
            self.drop_payload(id);
            self.finished.push_back(id);
            while self.finished.len() > self.retention.finished_jobs {
                if let Some(old) = self.finished.pop_front() {
                    self.remove(old);
                }
            }
        }
        Ok(Some(job))
    }

    fn next_queued(&mut self, kind: JobKind) -> Option<(JobId, JobPayload)> {
        loop {
            let id = self.queues.get_mut(&kind)?.pop_front()?;
            let still_queued = self.entries.get(&id).is_some_and(|e| e.job.status == JobStatus::Queued);
            if still_queued {
                if let Some(payload) = self.drop_payload(id) {
                    return Some((id, payload));
                }
            }
        }
    }

    fn queued(&self, kind: JobKind) -> usize {
        self.waiting.get(&kind).copied().unwrap_or(0)
    }

    fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    fn queued_ids(&self) -> Vec<JobId> {
        self.queues
            .values()
            .flatten()
            .copied()
            .filter(|id| self.entries.get(id).is_some_and(|e| e.payload.is_some()))
            .collect()
    }

    fn result(&self, id: JobId) -> Option<(ResultMeta, Bytes)> {
        let entry = self.entries.get(&id)?;
        Some((entry.job.result.clone()?, entry.result.clone()?))
    }

    fn list(&self, filter: &ListFilter) -> Vec<Job> {
        self.by_creation
            .values()
            .rev()
            .filter_map(|id| self.entries.get(id))
            .map(|e| &e.job)
            .filter(|j| filter.status.is_none_or(|s| j.status == s))
            .filter(|j| filter.kind.is_none_or(|k| j.kind == k))
            .take(filter.limit)
            .cloned()
            .collect()
    }

    fn expire(&mut self, now: SystemTime) -> usize {
        let mut removed = 0;
        while let Some(&id) = self.finished.front() {
            let finished_at = self.entries.get(&id).and_then(|e| e.job.finished_at);
            let due = finished_at.is_none_or(|t| t + self.retention.ttl <= now);
            if !due {
                break;
            }
            self.finished.pop_front();
            self.remove(id);
            removed += 1;
        }
        removed
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            jobs: self.entries.len(),
            by_status: self.counts,
            finished: self.finished.len(),
            result_bytes: self.result_bytes,
            queued_bytes: self.queued_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::pdf::DocumentSpec;

    fn store(ttl_secs: u64, result_bytes: usize, finished_jobs: usize) -> MemoryStore {
        MemoryStore::new(Retention { ttl: Duration::from_secs(ttl_secs), result_bytes, finished_jobs })
    }

    fn payload() -> JobPayload {
        JobPayload::Pdf(DocumentSpec::titled("t"))
    }

    fn add(s: &mut MemoryStore, now: SystemTime) -> JobId {
        let id = JobId::random();
        s.insert(Job::new(id, JobKind::Pdf, now), payload(), 100);
        id
    }

    fn finish(s: &mut MemoryStore, id: JobId, size: usize, now: SystemTime) {
        s.apply(id, Transition::Start, now).unwrap();
        let meta =
            ResultMeta { content_type: "application/pdf", bytes: size, filename: "x.pdf".into(), dimensions: None };
        s.apply(id, Transition::Succeed { meta, bytes: Bytes::from(vec![0; size]) }, now).unwrap();
    }

    #[test]
    fn queue_is_fifo_and_skips_cancelled_jobs() {
        let now = SystemTime::now();
        let mut s = store(60, 1000, 10);
        let a = add(&mut s, now);
        let b = add(&mut s, now);
        let c = add(&mut s, now);
        assert_eq!(s.queued_bytes(), 300);
        s.apply(b, Transition::Cancel { reason: None }, now).unwrap();
        assert_eq!(s.queued_bytes(), 200, "a cancelled job's payload is dropped at once");
        assert_eq!(s.queued(JobKind::Pdf), 2);
        assert_eq!(s.next_queued(JobKind::Pdf).map(|(id, _)| id), Some(a));
        assert_eq!(s.next_queued(JobKind::Pdf).map(|(id, _)| id), Some(c));
        assert!(s.next_queued(JobKind::Pdf).is_none());
        assert_eq!(s.queued_bytes(), 0);
        assert_eq!(s.queued(JobKind::Pdf), 0);
    }

    #[test]
    fn results_past_the_budget_evict_the_oldest_finished_jobs() {
        let now = SystemTime::now();
        let mut s = store(60, 250, 10);
        let ids: Vec<_> = (0..3).map(|_| add(&mut s, now)).collect();
        for id in &ids {
            finish(&mut s, *id, 100, now);
        }
        assert!(s.get(ids[0]).is_none(), "oldest result evicted");
        assert!(s.result(ids[1]).is_some() && s.result(ids[2]).is_some());
        assert_eq!(s.stats().result_bytes, 200);
    }

    #[test]
    fn a_result_larger_than_the_budget_is_refused() {
        let now = SystemTime::now();
        let mut s = store(60, 50, 10);
        let id = add(&mut s, now);
        s.apply(id, Transition::Start, now).unwrap();
        let meta = ResultMeta { content_type: "application/pdf", bytes: 51, filename: "x".into(), dimensions: None };
        let err = s.apply(id, Transition::Succeed { meta, bytes: Bytes::from(vec![0; 51]) }, now);
        assert_eq!(err, Err(StoreError::ResultTooLarge { bytes: 51, budget: 50 }));
    }

    #[test]
    fn finished_jobs_expire_after_the_ttl_and_past_the_count_limit() {
        let t0 = SystemTime::now();
        let mut s = store(10, 10_000, 2);
        let a = add(&mut s, t0);
        let b = add(&mut s, t0);
        let c = add(&mut s, t0);
        let running = add(&mut s, t0);
        s.apply(running, Transition::Start, t0).unwrap();
        finish(&mut s, a, 1, t0);
        finish(&mut s, b, 1, t0 + Duration::from_secs(5));
        finish(&mut s, c, 1, t0 + Duration::from_secs(6));
        assert!(s.get(a).is_none(), "count limit of 2 finished jobs");
        assert_eq!(s.expire(t0 + Duration::from_secs(15)), 1);
        assert!(s.get(b).is_none() && s.get(c).is_some());
        assert_eq!(s.expire(t0 + Duration::from_secs(3600)), 1);
        assert!(s.get(running).is_some(), "unfinished jobs never expire");
    }

    #[test]
    fn listing_is_newest_first_and_filtered() {
        let now = SystemTime::now();
        let mut s = store(60, 1000, 10);
        let a = add(&mut s, now);
        let b = add(&mut s, now);
        let c = add(&mut s, now);
        finish(&mut s, b, 1, now);
        let all = s.list(&ListFilter { limit: 10, ..Default::default() });
        assert_eq!(all.iter().map(|j| j.id).collect::<Vec<_>>(), vec![c, b, a]);
        let done = s.list(&ListFilter { status: Some(JobStatus::Succeeded), limit: 10, ..Default::default() });
        assert_eq!(done.len(), 1);
        let counts = s.stats().by_status;
        assert_eq!((counts.queued, counts.succeeded), (2, 1));
        s.expire(now + Duration::from_secs(61));
        assert_eq!(s.stats().by_status.succeeded, 0, "expired jobs leave the counts");
        assert_eq!(s.list(&ListFilter { limit: 1, ..Default::default() })[0].id, c);
    }
}
