//! One conformance suite for the three job stores, as River's `riverdrivertest` is for its
//! drivers: each test below is a function generic over a [`Backend`] (where a store lives and how
//! it is opened), and `suite!` runs every one of them on the memory store, SQLite and PostgreSQL
//! (a throwaway cluster, one database per test: see [`crate::pg`]).
//!
//! The tests use only the public seam (`offload::store::JobStore` and its types). Where stores
//! legitimately differ, a test asks the store, never names it:
//! - `durable()`: only a durable store keeps jobs, results, attempts and keys across a reopen,
//!   and only it is asked to release a run (the Dispatcher releases runs on durable stores alone);
//! - `shared()`: a shared store learns its counts, and what became claimable, from the database
//!   (every 250 ms, ended jobs every 5 s; a dropped instance's jobs once its lease runs out), so
//!   the tests wait up to [`SETTLE`] for it to show a change. A store alone on its data must
//!   show every change at once.

use std::cell::RefCell;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use offload::domain::PayloadRecord;
use offload::error::ErrorBody;
use offload::job::{Job, JobId, JobKind, JobStatus, Owner, ResultMeta};
use offload::kind::{Input, Work};
use offload::store::{
    CancelOutcome, Claimed, Final, IdempotencyKey, Inserted, JobStore, ListFilter, MemoryStore, NewJob, Pending,
    PgOptions, PgStore, ResultBody, Retention, SqliteOptions, SqliteStore, StatusCounts, StoreError, SyncMode,
};

use crate::pg::Postgres;

/// The longest a shared store may take to show a change (its ended counts are read every 5 s; a
/// stopped instance's lease, 1 s here, runs out and is rescued every third of it).
const SETTLE: Duration = Duration::from_secs(10);

/// What a test's store keeps of finished work.
#[derive(Clone, Copy)]
struct Limits {
    ttl: Duration,
    result_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { ttl: Duration::from_secs(3600), result_bytes: 1 << 20 }
    }
}

/// Where one test's store lives, and how it is opened.
trait Backend {
    /// An empty place of its own: nothing, a directory, a database.
    fn new() -> Self;
    /// A store in this place. Opened again after the last one was dropped, a durable store
    /// finds what that one kept.
    fn open(&self, limits: Limits) -> Box<dyn JobStore>;
}

struct Memory;

impl Backend for Memory {
    fn new() -> Self {
        Memory
    }

    fn open(&self, limits: Limits) -> Box<dyn JobStore> {
        let retention = Retention { ttl: limits.ttl, result_bytes: limits.result_bytes, finished_jobs: 10_000 };
        Box::new(MemoryStore::new(retention))
    }
}

struct Sqlite(tempfile::TempDir);

impl Backend for Sqlite {
    fn new() -> Self {
        Sqlite(tempfile::Builder::new().prefix("offload-conformance-").tempdir().unwrap())
    }

    fn open(&self, limits: Limits) -> Box<dyn JobStore> {
        let options = SqliteOptions {
            dir: self.0.path().to_path_buf(),
            sync: SyncMode::Normal,
            max_attempts: 5,
            ttl: limits.ttl,
            result_bytes: limits.result_bytes,
        };
        // The last store's writer thread lets go of the directory's lock a moment after its drop.
        let deadline = Instant::now() + SETTLE;
        loop {
            match SqliteStore::open(&options, Default::default()) {
                Ok(store) => return Box::new(store),
                Err(e) if e.contains("in use") && Instant::now() < deadline => std::thread::sleep(ms(5)),
                Err(e) => panic!("open the SQLite store: {e}"),
            }
        }
    }
}

struct Pg(String);

impl Backend for Pg {
    fn new() -> Self {
        let cluster = Postgres::get();
        Pg(actix_rt::System::new().block_on(cluster.fresh_database()))
    }

    fn open(&self, limits: Limits) -> Box<dyn JobStore> {
        let options = PgOptions {
            url: self.0.clone(),
            lease: Duration::from_secs(1),
            max_attempts: 5,
            ttl: limits.ttl,
            connections: 4,
            result_budget: limits.result_bytes,
        };
        Box::new(PgStore::open(&options).unwrap_or_else(|e| panic!("open the PostgreSQL store: {e}")))
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

thread_local! {
    /// What this test's writes run on (PostgreSQL's bound their waits with tokio timers).
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

/// A write, waited for.
fn wait<T>(write: Pending<T>) -> Result<T, StoreError> {
    RUNTIME.with(|rt| {
        let mut rt = rt.borrow_mut();
        let rt = rt.get_or_insert_with(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap());
        rt.block_on(write)
    })
}

/// Waits until `check` holds: at once for a store alone on its data, within [`SETTLE`] for a
/// shared one. `check` returns what it saw, for the failure message.
fn eventually<T: std::fmt::Debug>(store: &dyn JobStore, what: &str, mut check: impl FnMut() -> (bool, T)) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let (ok, seen) = check();
        if ok {
            return;
        }
        assert!(store.shared(), "{what}: a store alone on its data shows it at once; saw {seen:?}");
        assert!(Instant::now() < deadline, "{what}: not within {SETTLE:?}; saw {seen:?}");
        std::thread::sleep(ms(20));
    }
}

fn kind(name: &str) -> JobKind {
    JobKind::named(name).unwrap()
}

/// A job to submit: its input a string, stored as its bytes with some bulk data.
fn new_job(kind_name: &str, owner: Option<Owner>) -> NewJob {
    let mut job = Job::new(JobId::random(), kind(kind_name), SystemTime::now());
    job.owner = owner;
    let spec = format!("{{\"job\":\"{}\"}}", job.id);
    NewJob { job, record: record_of_spec(&spec), payload: Input::new(spec), weight: 10 }
}

fn record_of_spec(spec: &str) -> PayloadRecord {
    PayloadRecord { spec: spec.as_bytes().to_vec(), data: Some(Bytes::from(format!("data of {spec}"))) }
}

/// What [`new_job`] stored for job `id`.
fn record_of(id: JobId) -> PayloadRecord {
    record_of_spec(&format!("{{\"job\":\"{id}\"}}"))
}

/// The work handed over is the job's own input: as accepted here, or as stored.
fn assert_work_of(claimed: &Claimed) {
    let id = claimed.job.id;
    match &claimed.work {
        Work::Ready(input) => {
            let spec = input.downcast_ref::<String>().expect("the input as submitted");
            assert_eq!(record_of_spec(spec), record_of(id), "job {id}: another job's input");
        }
        Work::Stored(record) => assert_eq!(record, &record_of(id), "job {id}: its record as stored"),
    }
}

fn created(inserted: Result<Inserted, StoreError>) -> Vec<Job> {
    match inserted {
        Ok(Inserted::Created(jobs)) => jobs,
        other => panic!("expected new jobs, got {other:?}"),
    }
}

fn add(store: &dyn JobStore, kind_name: &str, owner: Option<Owner>) -> Job {
    created(wait(store.insert(vec![new_job(kind_name, owner)], None))).remove(0)
}

fn ids(jobs: &[Job]) -> Vec<JobId> {
    jobs.iter().map(|j| j.id).collect()
}

/// The next job of `kind` claimable now, if any (asking again when the store answers that the
/// job it found was not claimable after all).
fn claim(store: &dyn JobStore, kind_name: &str) -> Option<Claimed> {
    for _ in 0..100 {
        let pending = store.claim(kind(kind_name))?;
        if let Some(claimed) = wait(pending).expect("claim") {
            assert_work_of(&claimed);
            return Some(claimed);
        }
    }
    panic!("claims of {kind_name} keep finding nothing claimable")
}

/// The next job of `kind` to claim, as soon as the store sees it, suspects first (a job cut off
/// by the last process's death runs alone, as the Dispatcher runs it).
fn claim_soon(store: &dyn JobStore, kind_name: &str) -> Claimed {
    let mut claimed = None;
    eventually(store, &format!("a job of {kind_name} is claimable"), || {
        if let Some(pending) = store.claim_suspect() {
            claimed = wait(pending).expect("claim a suspect");
            claimed.iter().for_each(assert_work_of);
        }
        if claimed.is_none() {
            claimed = claim(store, kind_name);
        }
        (claimed.is_some(), ())
    });
    claimed.unwrap()
}

/// Claims and starts the next job of `kind`, as a worker would: the job as it runs.
fn run(store: &dyn JobStore, kind_name: &str) -> Job {
    let mut job = claim_soon(store, kind_name).job;
    if let Some(hook) = store.start_hook() {
        hook(job.id, job.attempts);
    }
    assert!(wait(store.start(job.id, job.attempts, SystemTime::now())).unwrap(), "start {}", job.id);
    job.start(SystemTime::now());
    job
}

fn meta(bytes: usize) -> ResultMeta {
    ResultMeta { content_type: "application/pdf".into(), bytes, filename: "r.pdf".into(), extra: Default::default() }
}

/// The result bytes of job `id`: `size` bytes, each the id's first byte.
fn result_bytes(id: JobId, size: usize) -> Bytes {
    Bytes::from(vec![id.to_bytes()[0]; size])
}

fn succeed(store: &dyn JobStore, job: &Job, size: usize) -> Option<Job> {
    let outcome = Final::Succeeded { meta: meta(size), bytes: result_bytes(job.id, size) };
    wait(store.finish(job.id, job.attempts, outcome)).expect("finish")
}

fn get(store: &dyn JobStore, id: JobId) -> Option<Job> {
    store.get(id).expect("get")
}

fn status(store: &dyn JobStore, id: JobId) -> Option<(JobStatus, u32)> {
    get(store, id).map(|j| (j.status, j.attempts))
}

fn result_of(store: &dyn JobStore, id: JobId) -> Option<Bytes> {
    let (_, body) = store.result(id).expect("result")?;
    match body {
        ResultBody::Whole(bytes) => Some(bytes),
        ResultBody::Stream { len, mut reader } => Some(reader.read_at(0, len).expect("read the result")),
    }
}

/// The ids `filter` lists, each job checked against it.
fn list(store: &dyn JobStore, filter: ListFilter) -> Vec<JobId> {
    let jobs = store.list(&filter).expect("list");
    assert!(jobs.len() <= filter.limit, "{} jobs listed past a limit of {}", jobs.len(), filter.limit);
    for job in &jobs {
        let fits = filter.status.is_none_or(|s| job.status == s)
            && filter.kind.is_none_or(|k| job.kind == k)
            && filter.owner.is_none_or(|o| job.owner == Some(o));
        assert!(fits, "listed a job the filter leaves out: {job:?} for {filter:?}");
    }
    ids(&jobs)
}

fn all(limit: usize) -> ListFilter {
    ListFilter { limit, ..Default::default() }
}

fn counts(queued: usize, running: usize, succeeded: usize, failed: usize, cancelled: usize) -> StatusCounts {
    StatusCounts { queued, running, succeeded, failed, cancelled }
}

fn by_status(store: &dyn JobStore, expected: StatusCounts) {
    eventually(store, "stats().by_status", || {
        let seen = store.stats().by_status;
        (seen == expected, seen)
    });
}

fn cancelled_by_test() -> ErrorBody {
    ErrorBody::new("cancelled", "by the conformance suite")
}

// The tests, each generic over the store.

fn a_batch_is_inserted_whole_with_its_payloads<B: Backend>() {
    let place = B::new();
    let store = place.open(Limits::default());
    let store = store.as_ref();
    let owner = Owner::from_bytes([7; 16]);
    let batch = vec![new_job("conf-a", Some(owner)), new_job("conf-b", None), new_job("conf-a", Some(owner))];
    let expected: Vec<Job> = batch.iter().map(|n| n.job.clone()).collect();
    let jobs = created(wait(store.insert(batch, None)));
    assert_eq!(ids(&jobs), ids(&expected), "the jobs created, in order");
    for job in &expected {
        let stored = get(store, job.id).expect("inserted");
        assert_eq!(
            (stored.kind, stored.owner, stored.status, stored.attempts),
            (job.kind, job.owner, JobStatus::Queued, 0)
        );
    }
    by_status(store, counts(3, 0, 0, 0, 0));
    eventually(store, "queued per kind", || {
        let stats = store.stats();
        let seen = (stats.queued(kind("conf-a")), stats.queued(kind("conf-b")), stats.queued_bytes);
        (seen == (2, 1, 30), seen)
    });

    // All or none: a batch with one job the store cannot take (its id is taken) leaves nothing.
    let (x, y) = (new_job("conf-a", None), new_job("conf-b", None));
    let (x_id, y_id) = (x.job.id, y.job.id);
    let mut taken = new_job("conf-a", None);
    taken.job.id = expected[0].id;
    let refused = wait(store.insert(vec![x, y, taken], None));
    assert!(refused.is_err(), "a batch with a taken id: {refused:?}");
    assert_eq!((get(store, x_id), get(store, y_id)), (None, None), "nothing of the refused batch is kept");
    assert_eq!(list(store, all(10)), vec![expected[2].id, expected[1].id, expected[0].id]);
    by_status(store, counts(3, 0, 0, 0, 0));

    // Each claimed with its own input (checked by `claim`).
    assert_eq!(claim_soon(store, "conf-a").job.id, expected[0].id);
    assert_eq!(claim_soon(store, "conf-a").job.id, expected[2].id);
    assert_eq!(claim_soon(store, "conf-b").job.id, expected[1].id);
}

fn an_idempotency_key_replays_its_jobs_and_refuses_another_request<B: Backend>() {
    let place = B::new();
    let first_store = place.open(Limits::default());
    let store = first_store.as_ref();
    let key = IdempotencyKey { key: "conformance-key".into(), fingerprint: [1; 32] };
    let other_request = IdempotencyKey { fingerprint: [2; 32], ..key.clone() };
    let first = created(wait(store.insert(vec![new_job("conf-a", None), new_job("conf-b", None)], Some(key.clone()))));
    let (again_a, again_b) = (new_job("conf-a", None), new_job("conf-b", None));
    let not_kept = [again_a.job.id, again_b.job.id];
    match wait(store.insert(vec![again_a, again_b], Some(key.clone()))) {
        Ok(Inserted::Replayed(jobs)) => assert_eq!(ids(&jobs), ids(&first), "the first request's jobs, in order"),
        other => panic!("expected a replay, got {other:?}"),
    }
    assert_eq!(store.replay(&key).unwrap().map(|j| ids(&j)), Some(ids(&first)));
    let refused = wait(store.insert(vec![new_job("conf-a", None)], Some(other_request.clone())));
    assert_eq!(refused.unwrap_err(), StoreError::KeyReused);
    assert_eq!(store.replay(&other_request).unwrap_err(), StoreError::KeyReused);
    let unknown = IdempotencyKey { key: "never-used".into(), fingerprint: [1; 32] };
    assert!(store.replay(&unknown).unwrap().is_none());
    assert!(not_kept.iter().all(|id| get(store, *id).is_none()), "a replay creates nothing");
    by_status(store, counts(2, 0, 0, 0, 0));

    if !store.durable() {
        return;
    }
    // Keys are kept with the jobs.
    drop(first_store);
    let reopened = place.open(Limits::default());
    let store = reopened.as_ref();
    assert_eq!(store.replay(&key).unwrap().map(|j| ids(&j)), Some(ids(&first)), "the key after a reopen");
    match wait(store.insert(vec![new_job("conf-a", None)], Some(key.clone()))) {
        Ok(Inserted::Replayed(jobs)) => assert_eq!(ids(&jobs), ids(&first)),
        other => panic!("expected a replay after a reopen, got {other:?}"),
    }
    let refused = wait(store.insert(vec![new_job("conf-a", None)], Some(other_request)));
    assert_eq!(refused.unwrap_err(), StoreError::KeyReused);
}

fn claims_take_the_oldest_job_of_each_kind_and_nothing_when_none_waits<B: Backend>() {
    let place = B::new();
    let store = place.open(Limits::default());
    let store = store.as_ref();
    assert!(claim(store, "conf-a").is_none(), "an empty store");
    let batch = vec![new_job("conf-a", None), new_job("conf-b", None), new_job("conf-a", None)];
    let first = created(wait(store.insert(batch, None)));
    let later_b = add(store, "conf-b", None);
    let later_a = add(store, "conf-a", None);
    assert!(claim(store, "conf-never-submitted").is_none(), "a kind with no jobs");

    let b = claim_soon(store, "conf-b").job;
    assert_eq!((b.id, b.status, b.attempts), (first[1].id, JobStatus::Queued, 1), "claimed: counted, still queued");
    assert_eq!(claim_soon(store, "conf-a").job.id, first[0].id, "kinds are independent");
    assert_eq!(claim_soon(store, "conf-a").job.id, first[2].id);
    assert_eq!(claim_soon(store, "conf-b").job.id, later_b.id);
    assert!(claim(store, "conf-b").is_none(), "every conf-b job claimed");
    assert_eq!(claim_soon(store, "conf-a").job.id, later_a.id);
    assert!(claim(store, "conf-a").is_none(), "every conf-a job claimed");
    eventually(store, "nothing queued per kind", || {
        let stats = store.stats();
        let seen = (stats.queued(kind("conf-a")), stats.queued(kind("conf-b")));
        (seen == (0, 0), seen)
    });
}

fn ends_are_fenced_on_the_attempt<B: Backend>() {
    let place = B::new();
    let store = place.open(Limits::default());
    let store = store.as_ref();
    add(store, "conf-a", None);
    let claimed = claim_soon(store, "conf-a").job;
    assert!(!wait(store.start(claimed.id, claimed.attempts + 1, SystemTime::now())).unwrap(), "start, another attempt");
    assert!(wait(store.start(claimed.id, claimed.attempts, SystemTime::now())).unwrap());
    assert!(!wait(store.start(claimed.id, claimed.attempts, SystemTime::now())).unwrap(), "started twice");
    let (id, attempt) = (claimed.id, claimed.attempts);
    assert_eq!(status(store, id), Some((JobStatus::Running, 1)));

    let late = Final::Succeeded { meta: meta(3), bytes: result_bytes(id, 3) };
    assert!(wait(store.finish(id, attempt + 1, late)).unwrap().is_none(), "another attempt's end changes nothing");
    assert_eq!(status(store, id), Some((JobStatus::Running, 1)));
    assert!(result_of(store, id).is_none());

    let failed = wait(store.finish(id, attempt, Final::Failed(ErrorBody::new("boom", "it broke")))).unwrap();
    let failed = failed.expect("this attempt's end");
    assert_eq!((failed.status, failed.error.as_ref().map(|e| e.code.as_str())), (JobStatus::Failed, Some("boom")));
    let again = Final::Succeeded { meta: meta(3), bytes: result_bytes(id, 3) };
    assert!(wait(store.finish(id, attempt, again)).unwrap().is_none(), "a second end of the attempt changes nothing");
    let stored = get(store, id).unwrap();
    assert_eq!((stored.status, stored.error.map(|e| e.code)), (JobStatus::Failed, Some("boom".to_string())));
    assert!(result_of(store, id).is_none());
    let unknown = wait(store.finish(JobId::random(), 1, Final::Failed(ErrorBody::new("x", "y")))).unwrap();
    assert!(unknown.is_none(), "the end of a job never submitted");
    by_status(store, counts(0, 0, 0, 1, 0));
}

fn a_released_run_is_queued_again_with_its_attempt_counted<B: Backend>() {
    let place = B::new();
    let store = place.open(Limits::default());
    let store = store.as_ref();
    if !store.durable() {
        // Nothing outlives a store that is not durable: the Dispatcher fails a stopped run
        // rather than release it.
        return;
    }
    let (a, b) = (add(store, "conf-a", None), add(store, "conf-a", None));
    let running = run(store, "conf-a");
    assert_eq!(running.id, a.id);
    assert!(!wait(store.release(a.id, running.attempts + 1)).unwrap(), "release, another attempt");
    assert!(wait(store.release(a.id, running.attempts)).unwrap());
    let released = get(store, a.id).unwrap();
    assert_eq!((released.status, released.attempts, released.started_at), (JobStatus::Queued, 1, None));
    assert!(!wait(store.release(a.id, running.attempts)).unwrap(), "released twice");
    by_status(store, counts(2, 0, 0, 0, 0));

    let rerun = claim_soon(store, "conf-a").job;
    assert_eq!((rerun.id, rerun.attempts), (a.id, 2), "the released job first, its run counted");
    // A claim that never started gives its attempt back.
    let waiting = claim_soon(store, "conf-a").job;
    assert_eq!((waiting.id, waiting.attempts), (b.id, 1));
    assert!(wait(store.release(b.id, 1)).unwrap());
    assert_eq!(status(store, b.id), Some((JobStatus::Queued, 0)));
    assert_eq!(claim_soon(store, "conf-a").job.attempts, 1);
    // An ended run is not released.
    assert!(wait(store.start(rerun.id, rerun.attempts, SystemTime::now())).unwrap());
    assert!(succeed(store, &rerun, 4).is_some());
    assert!(!wait(store.release(a.id, rerun.attempts)).unwrap(), "released after its end");
    assert_eq!(status(store, a.id), Some((JobStatus::Succeeded, 2)));
}

fn cancel_ends_queued_and_running_jobs_and_reports_finished_ones<B: Backend>() {
    let place = B::new();
    let store = place.open(Limits::default());
    let store = store.as_ref();
    let (done, running, queued) = (add(store, "conf-a", None), add(store, "conf-a", None), add(store, "conf-a", None));
    let done_run = run(store, "conf-a");
    assert!(succeed(store, &done_run, 5).is_some());
    let run_b = run(store, "conf-a");
    assert_eq!((done_run.id, run_b.id), (done.id, running.id));

    match wait(store.cancel(queued.id, cancelled_by_test())).unwrap() {
        CancelOutcome::Cancelled(job) => {
            assert_eq!((job.id, job.status), (queued.id, JobStatus::Cancelled));
            assert_eq!(job.error.map(|e| e.code), Some("cancelled".to_string()));
        }
        other => panic!("cancel a queued job: {other:?}"),
    }
    assert!(claim(store, "conf-a").is_none(), "a cancelled job is never claimed");
    match wait(store.cancel(running.id, cancelled_by_test())).unwrap() {
        CancelOutcome::Cancelled(job) => assert_eq!((job.id, job.status), (running.id, JobStatus::Cancelled)),
        other => panic!("cancel a running job: {other:?}"),
    }
    assert!(succeed(store, &run_b, 5).is_none(), "the cancelled run's own end changes nothing");
    assert!(result_of(store, running.id).is_none());
    match wait(store.cancel(done.id, cancelled_by_test())).unwrap() {
        CancelOutcome::Finished(job) => assert_eq!((job.id, job.status), (done.id, JobStatus::Succeeded)),
        other => panic!("cancel a finished job: {other:?}"),
    }
    match wait(store.cancel(queued.id, cancelled_by_test())).unwrap() {
        CancelOutcome::Finished(job) => assert_eq!(job.status, JobStatus::Cancelled, "cancelled twice"),
        other => panic!("cancel a cancelled job: {other:?}"),
    }
    assert!(matches!(wait(store.cancel(JobId::random(), cancelled_by_test())).unwrap(), CancelOutcome::Unknown));
    for (id, expected) in
        [(done.id, JobStatus::Succeeded), (running.id, JobStatus::Cancelled), (queued.id, JobStatus::Cancelled)]
    {
        assert_eq!(get(store, id).map(|j| j.status), Some(expected));
    }
    by_status(store, counts(0, 0, 1, 0, 2));
}

fn finished_jobs_are_forgotten_after_their_ttl<B: Backend>() {
    let place = B::new();
    let ttl = Duration::from_secs(1);
    let store = place.open(Limits { ttl, ..Limits::default() });
    let store = store.as_ref();
    let old = add(store, "conf-a", None);
    let old_run = run(store, "conf-a");
    assert!(succeed(store, &old_run, 10).is_some());
    std::thread::sleep(ttl + ms(300));
    let (recent, running, queued) =
        (add(store, "conf-a", None), add(store, "conf-a", None), add(store, "conf-a", None));
    let recent_run = run(store, "conf-a");
    assert!(succeed(store, &recent_run, 20).is_some());
    let running_run = run(store, "conf-a");
    assert_eq!((recent_run.id, running_run.id), (recent.id, running.id));

    assert_eq!(wait(store.expire(SystemTime::now())).unwrap(), 1, "only the job finished past its TTL");
    assert!(get(store, old.id).is_none() && result_of(store, old.id).is_none());
    assert_eq!(result_of(store, recent.id), Some(result_bytes(recent.id, 20)));
    assert_eq!(status(store, running.id), Some((JobStatus::Running, 1)), "unfinished jobs never expire");
    assert_eq!(status(store, queued.id), Some((JobStatus::Queued, 0)));
    assert_eq!(list(store, all(10)), vec![queued.id, running.id, recent.id]);
    by_status(store, counts(1, 1, 1, 0, 0));
    eventually(store, "result bytes", || {
        let seen = store.stats().result_bytes;
        (seen == 20, seen)
    });
}

fn results_past_the_byte_budget_forget_the_oldest_finished_jobs<B: Backend>() {
    let place = B::new();
    let store = place.open(Limits { result_bytes: 250, ..Limits::default() });
    let store = store.as_ref();
    let jobs: Vec<Job> = (0..3).map(|_| add(store, "conf-a", None)).collect();
    for job in &jobs {
        let running = run(store, "conf-a");
        assert_eq!(running.id, job.id);
        assert!(succeed(store, &running, 100).is_some());
    }
    eventually(store, "the oldest finished job forgotten", || {
        let seen = (get(store, jobs[0].id).is_none(), store.stats().result_bytes);
        (seen == (true, 200), seen)
    });
    for job in &jobs[1..] {
        assert_eq!(result_of(store, job.id), Some(result_bytes(job.id, 100)), "newer results kept");
    }

    // A result larger than the whole budget is not kept: its job fails.
    let big = add(store, "conf-a", None);
    let big_run = run(store, "conf-a");
    let ended = succeed(store, &big_run, 251).expect("its end");
    assert_eq!((ended.status, ended.error.map(|e| e.code)), (JobStatus::Failed, Some("result_too_large".into())));
    assert_eq!(get(store, big.id).map(|j| j.status), Some(JobStatus::Failed));
    assert!(result_of(store, big.id).is_none());
    assert_eq!(result_of(store, jobs[2].id), Some(result_bytes(jobs[2].id, 100)));
}

fn a_durable_store_keeps_jobs_results_attempts_and_queues_cut_off_runs_again<B: Backend>() {
    let place = B::new();
    let first = place.open(Limits::default());
    let store = first.as_ref();
    if !store.durable() {
        // Nothing survives a store that is not durable.
        return;
    }
    let owner = Owner::from_bytes([3; 16]);
    let (done, cut, waiting) =
        (add(store, "conf-a", Some(owner)), add(store, "conf-a", None), add(store, "conf-a", None));
    let done_run = run(store, "conf-a");
    let ended = succeed(store, &done_run, 42).expect("its end");
    let cut_run = run(store, "conf-a");
    assert_eq!((done_run.id, cut_run.id), (done.id, cut.id));
    // Dropped with a run going, as a crash would leave it.
    drop(first);

    let reopened = place.open(Limits::default());
    let store = reopened.as_ref();
    let kept = get(store, done.id).expect("a finished job is kept");
    assert_eq!((kept.status, kept.attempts, kept.owner), (JobStatus::Succeeded, 1, Some(owner)));
    let shown = |t: Option<SystemTime>| t.map(offload::job::rfc3339);
    assert_eq!(shown(kept.finished_at), shown(ended.finished_at), "finished_at as the API shows it");
    assert_eq!(result_of(store, done.id), Some(result_bytes(done.id, 42)));
    assert_eq!(status(store, waiting.id), Some((JobStatus::Queued, 0)));
    eventually(store, "the run cut off is queued again, counted", || {
        let seen = status(store, cut.id);
        (seen == Some((JobStatus::Queued, 1)), seen)
    });
    by_status(store, counts(2, 0, 1, 0, 0));

    let mut claimed = [claim_soon(store, "conf-a").job, claim_soon(store, "conf-a").job];
    claimed.sort_by_key(|j| j.id != cut.id);
    assert_eq!((claimed[0].id, claimed[0].attempts), (cut.id, 2), "the cut-off run counted, this one too");
    assert_eq!((claimed[1].id, claimed[1].attempts), (waiting.id, 1));
    assert!(claim(store, "conf-a").is_none());
}

fn lists_are_newest_first_filtered_and_counted_per_owner<B: Backend>() {
    let place = B::new();
    let store = place.open(Limits::default());
    let store = store.as_ref();
    let (alice, bob, nobody) = (Owner::from_bytes([1; 16]), Owner::from_bytes([2; 16]), Owner::from_bytes([9; 16]));
    let j1 = add(store, "conf-a", Some(alice));
    let j2 = add(store, "conf-b", Some(alice));
    let j3 = add(store, "conf-a", Some(bob));
    let j4 = add(store, "conf-a", Some(alice));
    let j5 = add(store, "conf-b", None);
    let first = run(store, "conf-a");
    assert!(succeed(store, &first, 7).is_some());
    let second = run(store, "conf-a");
    assert_eq!((first.id, second.id), (j1.id, j3.id));

    let filter = |status: Option<JobStatus>, kind_name: Option<&str>, owner: Option<Owner>, limit: usize| ListFilter {
        status,
        kind: kind_name.map(kind),
        owner,
        limit,
    };
    let cases: Vec<(&str, ListFilter, Vec<JobId>)> = vec![
        ("every job", all(10), vec![j5.id, j4.id, j3.id, j2.id, j1.id]),
        ("limit", all(2), vec![j5.id, j4.id]),
        ("queued", filter(Some(JobStatus::Queued), None, None, 10), vec![j5.id, j4.id, j2.id]),
        ("running", filter(Some(JobStatus::Running), None, None, 10), vec![j3.id]),
        ("succeeded", filter(Some(JobStatus::Succeeded), None, None, 10), vec![j1.id]),
        ("failed", filter(Some(JobStatus::Failed), None, None, 10), vec![]),
        ("kind", filter(None, Some("conf-a"), None, 10), vec![j4.id, j3.id, j1.id]),
        ("kind and status", filter(Some(JobStatus::Queued), Some("conf-b"), None, 10), vec![j5.id, j2.id]),
        ("queued, limit", filter(Some(JobStatus::Queued), None, None, 1), vec![j5.id]),
        ("owner", filter(None, None, Some(alice), 10), vec![j4.id, j2.id, j1.id]),
        ("another owner", filter(None, None, Some(bob), 10), vec![j3.id]),
        ("owner and kind", filter(None, Some("conf-a"), Some(alice), 10), vec![j4.id, j1.id]),
        ("owner and status", filter(Some(JobStatus::Running), None, Some(alice), 10), vec![]),
        ("an owner with no jobs", filter(None, None, Some(nobody), 10), vec![]),
    ];
    for (what, filter, expected) in cases {
        eventually(store, &format!("list: {what}"), || {
            let seen = list(store, filter.clone());
            (seen == expected, seen)
        });
    }
    for (owner, expected) in
        [(alice, counts(2, 0, 1, 0, 0)), (bob, counts(0, 1, 0, 0, 0)), (nobody, counts(0, 0, 0, 0, 0))]
    {
        eventually(store, &format!("counts of {owner}"), || {
            let seen = store.counts(owner).unwrap();
            (seen == expected, seen)
        });
    }
    by_status(store, counts(3, 1, 1, 0, 0));
    eventually(store, "queued per kind", || {
        let stats = store.stats();
        let seen = (stats.queued(kind("conf-a")), stats.queued(kind("conf-b")), stats.queued.total());
        (seen == (1, 2, 3), seen)
    });
    // A shared store counts an owner's pending jobs itself (every instance's); one alone on its
    // data leaves that to its Dispatcher.
    if store.shared() {
        assert!(store.durable(), "a shared store keeps its jobs");
        eventually(store, "pending jobs per owner", || {
            let seen = (store.owner_pending(alice), store.owner_pending(bob), store.owner_pending(nobody));
            (seen == (Some(2), Some(1), Some(0)), seen)
        });
    } else {
        assert_eq!(store.owner_pending(alice), None);
    }
}

/// Runs every test on every store: `memory_store::…`, `sqlite_store::…`, `postgres_store::…`.
macro_rules! suite {
    ($($test:ident),* $(,)?) => {
        suite!(@store memory_store, Memory; $($test),*);
        suite!(@store sqlite_store, Sqlite; $($test),*);
        suite!(@store postgres_store, Pg; $($test),*);
    };
    (@store $module:ident, $backend:ident; $($test:ident),*) => {
        mod $module {
            $(
                #[test]
                fn $test() {
                    super::$test::<super::$backend>();
                }
            )*
        }
    };
}

suite!(
    a_batch_is_inserted_whole_with_its_payloads,
    an_idempotency_key_replays_its_jobs_and_refuses_another_request,
    claims_take_the_oldest_job_of_each_kind_and_nothing_when_none_waits,
    ends_are_fenced_on_the_attempt,
    a_released_run_is_queued_again_with_its_attempt_counted,
    cancel_ends_queued_and_running_jobs_and_reports_finished_ones,
    finished_jobs_are_forgotten_after_their_ttl,
    results_past_the_byte_budget_forget_the_oldest_finished_jobs,
    a_durable_store_keeps_jobs_results_attempts_and_queues_cut_off_runs_again,
    lists_are_newest_first_filtered_and_counted_per_owner,
);
