//! [`MemoryStore`]: every job in process memory (`--store memory`), bounded by [`Retention`] and
//! the Dispatcher's admission limits. Nothing survives the process; writes resolve at once.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::SystemTime;

use bytes::Bytes;

use super::{
    apply_final, ready, result_too_large, CancelOutcome, Capabilities, Claimed, Final, IdempotencyKey, Inserted,
    JobStore, ListFilter, NewJob, OwedWebhook, Pending, ResultBody, Retention, StatusCounts, StoreError, StoreStats,
};
use crate::error::ErrorBody;
use crate::job::{Job, JobId, JobKind, JobStatus, Owner, ResultMeta};
use crate::kind::{Input, Work};

pub struct MemoryStore {
    inner: Mutex<Inner>,
}

struct Inner {
    /// All known jobs by id.
    entries: HashMap<JobId, Entry>,
    /// Creation order (sequence number → id), for newest-first listing.
    by_creation: BTreeMap<u64, JobId>,
    /// Next creation sequence number.
    next_seq: u64,
    /// Queued ids per kind, oldest first; may hold ids that were cancelled meanwhile.
    queues: std::collections::HashMap<JobKind, VecDeque<JobId>>,
    /// Finished ids in the order they finished, for TTL and budget eviction.
    finished: VecDeque<JobId>,
    /// Idempotency keys → (fingerprint, the jobs created), forgotten with the first job.
    keys: HashMap<String, ([u8; 32], Vec<JobId>)>,
    stats: StoreStats,
    retention: Retention,
}

struct Entry {
    job: Job,
    seq: u64,
    /// The work description, until a worker takes it, with its weight.
    payload: Option<(Input, usize)>,
    /// The result bytes once succeeded.
    result: Option<Bytes>,
    /// The key this job was created under (to forget it with the job).
    key: Option<String>,
    /// Payload bytes of a claimed job not started yet (still counted as queued bytes).
    claimed_weight: usize,
}

impl MemoryStore {
    pub fn new(retention: Retention) -> Self {
        MemoryStore {
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                by_creation: BTreeMap::new(),
                next_seq: 0,
                queues: Default::default(),
                finished: VecDeque::new(),
                keys: HashMap::new(),
                stats: StoreStats::default(),
                retention,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent-enough counters; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn drop_payload(&mut self, id: JobId) -> Option<Input> {
        let entry = self.entries.get_mut(&id)?;
        self.stats.queued_bytes -= std::mem::take(&mut entry.claimed_weight);
        let (payload, weight) = entry.payload.take()?;
        self.stats.queued_bytes -= weight;
        *self.stats.queued.slot(entry.job.kind) -= 1;
        Some(payload)
    }

    fn remove(&mut self, id: JobId) {
        self.drop_payload(id);
        if let Some(entry) = self.entries.remove(&id) {
            let slot = self.stats.by_status.slot(entry.job.status);
            *slot = slot.saturating_sub(1);
            self.by_creation.remove(&entry.seq);
            if let Some(result) = entry.result {
                self.stats.result_bytes -= result.len();
            }
            if let Some(key) = entry.key {
                self.keys.remove(&key);
            }
        }
    }

    /// Evicts the oldest finished jobs until `extra` more result bytes fit the budget.
    fn make_room(&mut self, extra: usize) {
        while self.stats.result_bytes + extra > self.retention.result_bytes {
            match self.finished.pop_front() {
                Some(id) => self.remove(id),
                None => break,
            }
        }
    }

    fn jobs(&self, ids: &[JobId]) -> Vec<Job> {
        ids.iter().filter_map(|id| self.entries.get(id)).map(|e| e.job.clone()).collect()
    }

    /// Bookkeeping once a job changed from `before`.
    fn changed(&mut self, id: JobId, before: JobStatus) -> Job {
        let job = self.entries[&id].job.clone();
        self.stats.by_status.moved(before, job.status);
        if job.status.is_terminal() && !before.is_terminal() {
            self.drop_payload(id);
            self.finished.push_back(id);
            while self.finished.len() > self.retention.finished_jobs {
                if let Some(old) = self.finished.pop_front() {
                    self.remove(old);
                }
            }
        }
        job
    }
}

impl JobStore for MemoryStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities { keeps_jobs: false, shared: false, counts_owners: false }
    }

    fn insert(&self, jobs: Vec<NewJob>, key: Option<IdempotencyKey>) -> Pending<Inserted> {
        let mut s = self.lock();
        if let Some(k) = &key {
            if let Some((print, ids)) = s.keys.get(&k.key) {
                let outcome = if *print == k.fingerprint {
                    Ok(Inserted::Replayed(s.jobs(ids)))
                } else {
                    Err(StoreError::KeyReused)
                };
                return ready(outcome);
            }
        }
        // All or none: a batch with an id the store knows (or twice) changes nothing, as a
        // database's unique key refuses it.
        let mut seen = std::collections::HashSet::with_capacity(jobs.len());
        if let Some(taken) = jobs.iter().map(|n| n.job.id).find(|id| s.entries.contains_key(id) || !seen.insert(*id)) {
            return ready(Err(StoreError::Unavailable(format!("job {taken} exists already; nothing was inserted"))));
        }
        let mut created = Vec::with_capacity(jobs.len());
        for new in jobs {
            let id = new.job.id;
            let seq = s.next_seq;
            s.next_seq += 1;
            s.queues.entry(new.job.kind).or_default().push_back(id);
            s.by_creation.insert(seq, id);
            s.stats.queued_bytes += new.weight;
            *s.stats.queued.slot(new.job.kind) += 1;
            s.stats.by_status.queued += 1;
            created.push(new.job.clone());
            let entry = Entry {
                job: new.job,
                seq,
                payload: Some((new.payload, new.weight)),
                result: None,
                key: key.as_ref().map(|k| k.key.clone()),
                claimed_weight: 0,
            };
            s.entries.insert(id, entry);
        }
        if let Some(k) = key {
            s.keys.insert(k.key, (k.fingerprint, created.iter().map(|j| j.id).collect()));
        }
        ready(Ok(Inserted::Created(created)))
    }

    fn claim(&self, kind: JobKind) -> Option<Pending<Option<Claimed>>> {
        let mut s = self.lock();
        while let Some(id) = s.queues.entry(kind).or_default().pop_front() {
            let still_queued = s.entries.get(&id).is_some_and(|e| e.job.status == JobStatus::Queued);
            if !still_queued {
                continue;
            }
            let weight = s.entries[&id].payload.as_ref().map_or(0, |(_, w)| *w);
            let Some(payload) = s.drop_payload(id) else { continue };
            // Its bytes stay counted until it starts: the payload now waits in a pool's mailbox.
            s.stats.queued_bytes += weight;
            let entry = s.entries.get_mut(&id).expect("checked above");
            entry.claimed_weight = weight;
            entry.job.claim();
            let job = entry.job.clone();
            return Some(ready(Ok(Some(Claimed { job, work: Work::Ready(payload) }))));
        }
        None
    }

    fn start(&self, id: JobId, attempt: u32, at: SystemTime) -> Pending<bool> {
        let mut s = self.lock();
        let Some(entry) = s.entries.get_mut(&id).filter(|e| e.job.attempts == attempt) else { return ready(Ok(false)) };
        if !entry.job.start(at) {
            return ready(Ok(false));
        }
        let weight = std::mem::take(&mut entry.claimed_weight);
        s.stats.queued_bytes -= weight;
        s.changed(id, JobStatus::Queued);
        ready(Ok(true))
    }

    fn finish(&self, id: JobId, attempt: u32, outcome: Final) -> Pending<Option<Job>> {
        let mut s = self.lock();
        let now = SystemTime::now();
        let held = s.entries.get(&id).filter(|e| !e.job.status.is_terminal() && e.job.attempts == attempt);
        let Some(before) = held.map(|e| e.job.status) else { return ready(Ok(None)) };
        let outcome = match outcome {
            Final::Succeeded { bytes, .. } if bytes.len() > s.retention.result_bytes => {
                Final::Failed(result_too_large(bytes.len(), s.retention.result_bytes))
            }
            Final::Succeeded { meta, bytes } => {
                s.make_room(bytes.len());
                // make_room only evicts finished jobs, never this running one.
                s.stats.result_bytes += bytes.len();
                s.entries.get_mut(&id).expect("a running job is not evicted").result = Some(bytes.clone());
                Final::Succeeded { meta, bytes }
            }
            other => other,
        };
        let entry = s.entries.get_mut(&id).expect("checked above");
        if !apply_final(&mut entry.job, outcome, now) {
            return ready(Ok(None));
        }
        ready(Ok(Some(s.changed(id, before))))
    }

    fn cancel(&self, id: JobId, reason: ErrorBody) -> Pending<CancelOutcome> {
        let mut s = self.lock();
        let Some(entry) = s.entries.get_mut(&id) else { return ready(Ok(CancelOutcome::Unknown)) };
        let before = entry.job.status;
        if !apply_final(&mut entry.job, Final::Cancelled(Some(reason)), SystemTime::now()) {
            return ready(Ok(CancelOutcome::Finished(entry.job.clone())));
        }
        ready(Ok(CancelOutcome::Cancelled(s.changed(id, before))))
    }

    fn release(&self, id: JobId, attempt: u32) -> Pending<bool> {
        // Nothing outlives the process: a stopped run is not kept for later, it fails.
        let _ = (id, attempt);
        ready(Ok(false))
    }

    fn expire(&self, now: SystemTime) -> Pending<usize> {
        let mut s = self.lock();
        let mut removed = 0;
        while let Some(&id) = s.finished.front() {
            let finished_at = s.entries.get(&id).and_then(|e| e.job.finished_at);
            let due = finished_at.is_none_or(|t| t + s.retention.ttl <= now);
            if !due {
                break;
            }
            s.finished.pop_front();
            s.remove(id);
            removed += 1;
        }
        ready(Ok(removed))
    }

    fn webhook_done(&self, _id: JobId) {}

    fn owed_webhooks(&self) -> Result<Vec<OwedWebhook>, StoreError> {
        Ok(Vec::new())
    }

    fn progress(&self, id: JobId, fraction: f32, stage: Option<String>) {
        if let Some(entry) = self.lock().entries.get_mut(&id) {
            entry.job.advance(fraction, stage);
        }
    }

    fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        Ok(self.lock().entries.get(&id).map(|e| e.job.clone()))
    }

    fn list(&self, filter: &ListFilter) -> Result<Vec<Job>, StoreError> {
        let s = self.lock();
        Ok(s.by_creation
            .values()
            .rev()
            .filter_map(|id| s.entries.get(id))
            .map(|e| &e.job)
            .filter(|j| filter.status.is_none_or(|st| j.status == st))
            .filter(|j| filter.kind.is_none_or(|k| j.kind == k))
            .filter(|j| filter.owner.is_none_or(|o| j.owner == Some(o)))
            .take(filter.limit)
            .cloned()
            .collect())
    }

    fn result(&self, id: JobId) -> Result<Option<(ResultMeta, ResultBody)>, StoreError> {
        let s = self.lock();
        Ok(s.entries.get(&id).and_then(|e| Some((e.job.result.clone()?, ResultBody::Whole(e.result.clone()?)))))
    }

    fn replay(&self, key: &IdempotencyKey) -> Result<Option<Vec<Job>>, StoreError> {
        let s = self.lock();
        match s.keys.get(&key.key) {
            None => Ok(None),
            Some((print, ids)) if *print == key.fingerprint => Ok(Some(s.jobs(ids))),
            Some(_) => Err(StoreError::KeyReused),
        }
    }

    fn stats(&self) -> StoreStats {
        self.lock().stats.clone()
    }

    fn counts(&self, owner: Owner) -> Result<StatusCounts, StoreError> {
        let s = self.lock();
        let mut counts = StatusCounts::default();
        for entry in s.entries.values().filter(|e| e.job.owner == Some(owner)) {
            *counts.slot(entry.job.status) += 1;
        }
        Ok(counts)
    }

    fn health(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Counts of a store's jobs by status (for tests).
#[cfg(test)]
fn counts(s: &MemoryStore) -> super::StatusCounts {
    s.stats().by_status
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::executor::block_on;

    use super::*;
    use crate::domain::PayloadRecord;

    fn store(ttl_secs: u64, result_bytes: usize, finished_jobs: usize) -> MemoryStore {
        MemoryStore::new(Retention { ttl: Duration::from_secs(ttl_secs), result_bytes, finished_jobs })
    }

    fn new_job(now: SystemTime) -> NewJob {
        let record = PayloadRecord { spec: b"t".to_vec(), data: None };
        NewJob {
            job: Job::new(JobId::random(), JobKind::named("pdf").unwrap(), now),
            payload: Input::new(()),
            record,
            weight: 100,
        }
    }

    fn add(s: &MemoryStore, now: SystemTime) -> JobId {
        let new = new_job(now);
        let id = new.job.id;
        block_on(s.insert(vec![new], None)).unwrap();
        id
    }

    fn meta(size: usize) -> ResultMeta {
        ResultMeta {
            content_type: "application/pdf".into(),
            bytes: size,
            filename: "x.pdf".into(),
            extra: Default::default(),
        }
    }

    fn claim(s: &MemoryStore) -> Job {
        let mut job = block_on(s.claim(JobKind::named("pdf").unwrap()).expect("a queued job")).unwrap().unwrap().job;
        assert!(block_on(s.start(job.id, job.attempts, SystemTime::now())).unwrap());
        job.start(SystemTime::now());
        job
    }

    fn succeed(s: &MemoryStore, job: &Job, size: usize) -> Option<Job> {
        let outcome = Final::Succeeded { meta: meta(size), bytes: Bytes::from(vec![0; size]) };
        block_on(s.finish(job.id, job.attempts, outcome)).unwrap()
    }

    #[test]
    fn queue_is_fifo_and_skips_cancelled_jobs() {
        let now = SystemTime::now();
        let s = store(60, 1000, 10);
        let a = add(&s, now);
        let b = add(&s, now);
        let c = add(&s, now);
        assert_eq!(s.stats().queued_bytes, 300);
        block_on(s.cancel(b, ErrorBody::new("cancelled", "test"))).unwrap();
        assert_eq!(s.stats().queued_bytes, 200, "a cancelled job's payload is dropped at once");
        assert_eq!(s.stats().queued(JobKind::named("pdf").unwrap()), 2);
        assert_eq!(claim(&s).id, a);
        assert_eq!(claim(&s).id, c);
        assert!(s.claim(JobKind::named("pdf").unwrap()).is_none());
        assert_eq!(s.stats().queued_bytes, 0);
        assert_eq!(counts(&s).running, 2);
    }

    #[test]
    fn completions_are_fenced_on_the_attempt() {
        let s = store(60, 1000, 10);
        add(&s, SystemTime::now());
        let job = claim(&s);
        assert_eq!(job.attempts, 1);
        let stale = Job { attempts: 7, ..job.clone() };
        assert!(succeed(&s, &stale, 1).is_none(), "another attempt's completion is refused");
        assert!(succeed(&s, &job, 1).is_some());
        assert!(succeed(&s, &job, 1).is_none(), "a duplicate completion changes nothing");
    }

    #[test]
    fn results_past_the_budget_evict_the_oldest_finished_jobs() {
        let now = SystemTime::now();
        let s = store(60, 250, 10);
        let ids: Vec<_> = (0..3).map(|_| add(&s, now)).collect();
        for _ in &ids {
            let job = claim(&s);
            succeed(&s, &job, 100);
        }
        assert!(s.get(ids[0]).unwrap().is_none(), "oldest result evicted");
        assert!(s.result(ids[1]).unwrap().is_some() && s.result(ids[2]).unwrap().is_some());
        assert_eq!(s.stats().result_bytes, 200);
    }

    #[test]
    fn a_result_larger_than_the_budget_fails_the_job() {
        let s = store(60, 50, 10);
        add(&s, SystemTime::now());
        let job = claim(&s);
        let ended = succeed(&s, &job, 51).unwrap();
        assert_eq!(ended.status, JobStatus::Failed);
        assert_eq!(ended.error.unwrap().code, "result_too_large");
    }

    #[test]
    fn finished_jobs_expire_after_the_ttl_and_past_the_count_limit() {
        let t0 = SystemTime::now();
        let s = store(10, 10_000, 2);
        let a = add(&s, t0);
        let b = add(&s, t0);
        let c = add(&s, t0);
        let running = add(&s, t0);
        let jobs: Vec<Job> = (0..4).map(|_| claim(&s)).collect();
        for job in &jobs[..3] {
            succeed(&s, job, 1);
        }
        assert!(s.get(a).unwrap().is_none(), "count limit of 2 finished jobs");
        let later = SystemTime::now() + Duration::from_secs(15);
        assert_eq!(block_on(s.expire(later)).unwrap(), 2);
        assert!(s.get(b).unwrap().is_none() && s.get(c).unwrap().is_none());
        assert!(s.get(running).unwrap().is_some(), "unfinished jobs never expire");
    }

    #[test]
    fn idempotency_keys_replay_the_first_jobs_and_refuse_another_request() {
        let s = store(60, 1000, 10);
        let key = IdempotencyKey { key: "k".into(), fingerprint: [1; 32] };
        let Inserted::Created(first) = block_on(s.insert(vec![new_job(SystemTime::now())], Some(key.clone()))).unwrap()
        else {
            panic!("created")
        };
        let again = block_on(s.insert(vec![new_job(SystemTime::now())], Some(key.clone()))).unwrap();
        assert!(matches!(again, Inserted::Replayed(ref jobs) if jobs[0].id == first[0].id));
        assert_eq!(s.replay(&key).unwrap().unwrap()[0].id, first[0].id);
        let other = IdempotencyKey { key: "k".into(), fingerprint: [2; 32] };
        assert_eq!(s.replay(&other).unwrap_err(), StoreError::KeyReused);
        assert_eq!(counts(&s).queued, 1);
    }

    #[test]
    fn listing_is_newest_first_and_filtered() {
        let now = SystemTime::now();
        let s = store(60, 1000, 10);
        let a = add(&s, now);
        let b = add(&s, now);
        let c = add(&s, now);
        let first = claim(&s);
        assert_eq!(first.id, a);
        succeed(&s, &first, 1);
        let all = s.list(&ListFilter { limit: 10, ..Default::default() }).unwrap();
        assert_eq!(all.iter().map(|j| j.id).collect::<Vec<_>>(), vec![c, b, a]);
        let done = s.list(&ListFilter { status: Some(JobStatus::Succeeded), limit: 10, ..Default::default() }).unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!((counts(&s).queued, counts(&s).succeeded), (2, 1));
    }
}
