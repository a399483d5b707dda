//! [`PgStore`]: jobs in PostgreSQL, shared by every instance on the database.
//!
//! A claim takes the oldest queued job no instance holds with `FOR UPDATE SKIP LOCKED`, counts
//! the attempt and writes this instance as the lease owner until `now() + lease`; a heartbeat
//! renews this instance's leases every third of the lease; any instance gives expired leases
//! back to the queue (or fails the job `worker_lost` past `--max-attempts`). Starts, ends and
//! releases are fenced on (attempt, lease owner): an instance that comes back late changes
//! nothing. Counts for admission and `GET /jobs` are the database's: queued and running every
//! 250 ms and on notices, ended ones every 5 s.
//!
//! The hot path is one statement per step, each on a shared, pipelined connection
//! (`conn`) and each carrying as many jobs as wait (`batch`): submissions
//! without a key are grouped into one insert of many jobs (group commit), claims return their
//! payloads, and an end writes the row, the result, the payload's deletion, the owed webhook and
//! the notices, from the job as this instance holds it. A start is noted in memory and written,
//! with progress, every 50 ms for all running jobs in one statement.
//!
//! - [`writes`]: submissions, claims, starts, ends, cancels, releases;
//! - [`listen`]: starts and progress written and announced, the notices of other instances;
//! - [`upkeep`]: leases renewed and rescued, retention by TTL and by the result budget;
//! - [`rows`]: rows and parameters.
//!
//! The store runs its own small tokio runtime (threads `pg`); writes are futures on it, reads
//! block on it from the caller's thread (handlers call them in `web::block`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Client, NoTls, Row};

use super::batch;
use super::conn::{unavailable, Conns};
use super::notice::{self, Notice, CHANNEL};
use crate::domain::callback::{CallbackPolicy, CallbackUrl};
use crate::domain::PayloadRecord;
use crate::error::ErrorBody;
use crate::job::{Job, JobId, JobKind, JobStatus, Owner, ResultMeta};
use crate::kind::Work;
use crate::store::codes::{extra_text, micros, pack_ids, status_code, status_of, unpack_ids};
use crate::store::{
    apply_final, CancelOutcome, Capabilities, Claimed, Final, IdempotencyKey, Inserted, JobStore, ListFilter, NewJob,
    OwedWebhook, Pending, ResultBody, ResultReader, StatusCounts, StoreError, StoreEvents, StoreStats,
};

/// How a [`PgStore`] is set up.
#[derive(Clone, Debug)]
pub struct PgOptions {
    pub url: String,
    pub lease: Duration,
    pub max_attempts: u32,
    pub ttl: Duration,
    /// Connections to keep open (half shared by single statements, half for transactions),
    /// besides the one that listens.
    pub connections: usize,
    /// Most result bytes kept in the database, all instances together: a larger result fails
    /// its job, and past it the oldest finished jobs go first.
    pub result_budget: usize,
}

/// Results larger than this are sent from the database piece by piece.
const STREAM_ABOVE: usize = 1 << 20;
/// One grouped insert takes at most this many jobs, and this many payload bytes (a larger
/// submission goes alone).
const BATCH_JOBS: usize = 512;
const BATCH_BYTES: usize = 8 << 20;
/// Grouped inserts in flight at once.
const BATCHERS: usize = 1;
/// How often running jobs' progress is written and announced (the contract's 50 ms).
const PROGRESS_EVERY: Duration = Duration::from_millis(50);
/// How often the counts of ended jobs (a scan of every kept job) are read again; the live
/// counts (queued, running: an index scan) are read every 250 ms and on notifications.
const ENDED_COUNTS_EVERY: Duration = Duration::from_secs(5);
/// The sender tag of notices meant for every instance, the sender included (it matches no
/// instance's hex tag).
const EVERYONE: &str = "********";
/// The advisory lock an eviction holds (one instance evicts at a time).
const EVICT_LOCK: i64 = 0x6f66_666c_6f61_6402; // "offload" + 2
/// Webhooks of stopped instances taken per rescue (each rescue, every third of the lease).
const RESCUED_WEBHOOKS: i64 = 100;
/// The longest a request waits for a read (a job, a list, a result, counts): they take
/// milliseconds, and never wait on a lock, so a read this late means the database is stuck.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a request waits for its write (a submission, a cancel): the server's own
/// statement timeout, which also holds while the server does not answer at all.
const WRITE_TIMEOUT: Duration = super::conn::STATEMENT_TIMEOUT;

/// The most a grouped statement's requests tried one by one (the database refused the group)
/// may take together: the ones not tried by then get the group's error.
const ONE_BY_ONE: Duration = Duration::from_secs(5);
/// How soon an end skipped because another session holds its row is tried again (doubling up
/// to a second while the row stays locked).
const SKIPPED_END_RETRY: Duration = Duration::from_millis(100);

use crate::store::codes::job_columns;

mod listen;
mod rows;
mod upkeep;
mod writes;

use rows::*;

pub struct PgStore {
    rt: Option<tokio::runtime::Runtime>,
    inner: Arc<Inner>,
    /// Submissions without a key, claims and ends, each grouped into statements of many.
    inserts: mpsc::UnboundedSender<InsertRequest>,
    claims: mpsc::UnboundedSender<ClaimRequest>,
    ends: mpsc::UnboundedSender<EndRequest>,
}

struct Inner {
    conns: Conns,
    /// This instance, as the lease owner.
    me: Vec<u8>,
    /// This instance as the sender of notices (8 hex digits of `me`).
    tag: String,
    lease: Duration,
    max_attempts: u32,
    ttl: Duration,
    result_budget: usize,
    /// An eviction (results past the budget) is running.
    evicting: std::sync::atomic::AtomicBool,
    state: Mutex<State>,
    /// Asks the counts refresh to run now (a notification said there is new work).
    refresh_now: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    /// Queued jobs no instance holds, per kind, as last counted (plus what this instance added).
    claimable: crate::store::KindCounts,
    /// Jobs this instance claimed (then started), as they are in the database: an end is
    /// written from this, in one statement.
    held: HashMap<JobId, Held>,
    /// Webhooks this instance holds a lease on and delivers (renewed by the heartbeat until
    /// delivered or dropped).
    delivering: std::collections::HashSet<JobId>,
    stats: StoreStats,
    /// Queued and running jobs per API key owner, every instance together, as last counted
    /// (plus what this instance added since): `--max-pending-per-key` on PostgreSQL.
    owners: HashMap<Owner, usize>,
    events: Option<Arc<dyn StoreEvents>>,
}

struct Held {
    job: Job,
    /// Its end is being written: a second end (a timeout and the run's own) is refused, and the
    /// progress writer leaves it alone; readers still see the run as held until it commits.
    ending: bool,
    /// The start is known here and not yet written (it is written with the next progress).
    start_unsaid: bool,
    /// Progress changed since it was last written.
    dirty: bool,
}

struct InsertRequest {
    jobs: Vec<NewJob>,
    reply: oneshot::Sender<Result<Inserted, StoreError>>,
}

impl batch::Weigh for InsertRequest {
    fn jobs(&self) -> usize {
        self.jobs.len()
    }
    fn bytes(&self) -> usize {
        weight(&self.jobs)
    }
}

struct ClaimRequest {
    kind: JobKind,
    reply: oneshot::Sender<Result<Option<Claimed>, StoreError>>,
}

impl batch::Weigh for ClaimRequest {}

/// A run's end, worked out from the job as held: the final job, the result to keep, the webhook
/// owed.
struct EndRequest {
    job: Job,
    bytes: Option<Bytes>,
    /// Followers elsewhere have not heard the job started (its start was not written yet).
    start_unsaid: bool,
    reply: oneshot::Sender<Result<Option<Job>, StoreError>>,
}

/// A grouped statement's failure, and whether the database refused what it carries (then its
/// requests are worth trying one by one; not when it timed out or lost its connection).
struct Grouped {
    error: StoreError,
    refused: bool,
}

impl Grouped {
    fn of(e: tokio_postgres::Error) -> Self {
        Grouped { refused: super::conn::refused(&e), error: unavailable(e) }
    }

    fn other(error: StoreError) -> Self {
        Grouped { error, refused: false }
    }
}

/// What one end statement did: the jobs it ended, and those whose rows were locked by another
/// session (skipped, to be tried again).
#[derive(Default)]
struct Ends {
    ended: Vec<JobId>,
    skipped: Vec<JobId>,
}

impl Ends {
    /// `batch` split into the requests answered (whether each ended its job) and those skipped.
    #[allow(clippy::type_complexity)]
    fn split(&self, batch: Vec<EndRequest>) -> (Vec<(EndRequest, Result<bool, StoreError>)>, Vec<EndRequest>) {
        let (skipped, done): (Vec<_>, Vec<_>) = batch.into_iter().partition(|r| self.skipped.contains(&r.job.id));
        let done = done
            .into_iter()
            .map(|r| {
                let ended = self.ended.contains(&r.job.id);
                (r, Ok(ended))
            })
            .collect();
        (done, skipped)
    }
}

impl batch::Weigh for EndRequest {
    fn bytes(&self) -> usize {
        self.bytes.as_ref().map_or(0, Bytes::len)
    }
}

impl PgStore {
    /// Connects, migrates the schema (safe with other instances starting), and starts the
    /// heartbeat, the lease rescue, the counts refresh, the progress writer, the listener and
    /// the insert batchers.
    pub fn open(options: &PgOptions) -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pg")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let me = JobId::random().to_bytes().to_vec();
        let tag = me[..4].iter().map(|b| format!("{b:02x}")).collect();
        let inner = Arc::new(Inner {
            conns: Conns::new(options.url.clone(), options.connections),
            me,
            tag,
            lease: options.lease.max(Duration::from_secs(1)),
            max_attempts: options.max_attempts.max(1),
            ttl: options.ttl,
            result_budget: options.result_budget.max(1),
            evicting: std::sync::atomic::AtomicBool::new(false),
            state: Mutex::new(State::default()),
            refresh_now: tokio::sync::Notify::new(),
        });
        let setup = inner.clone();
        run_on(rt.handle(), async move {
            let mut client = setup.conns.connect().await.map_err(|e| e.to_string())?;
            super::schema::migrate(&mut client).await?;
            setup.refresh(true).await.map_err(|e| e.to_string())
        })?;
        for task in [Task::Refresh, Task::Heartbeat, Task::Rescue, Task::Progress, Task::Listen] {
            let inner = inner.clone();
            rt.spawn(async move { inner.run(task).await });
        }
        let _in_rt = rt.enter();
        let limits = batch::Limits { jobs: BATCH_JOBS, bytes: BATCH_BYTES, tasks: BATCHERS };
        let i = inner.clone();
        let inserts = batch::start(limits, move |b| i.clone().insert_batch(b));
        let i = inner.clone();
        let claims = batch::start(limits, move |b| i.clone().claim_batch(b));
        let i = inner.clone();
        let ends = batch::start(limits, move |b| i.clone().end_batch(b));
        drop(_in_rt);
        Ok(PgStore { rt: Some(rt), inner, inserts, claims, ends })
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("the runtime lives as long as the store")
    }

    /// A write, run on the store's runtime; the future resolves with its result.
    fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(Arc<Inner>) -> std::pin::Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>,
    ) -> Pending<T> {
        let handle = self.rt().spawn(f(self.inner.clone()));
        Box::pin(async move { handle.await.map_err(|e| unavailable(format!("store task: {e}")))? })
    }

    /// A read, blocking the calling thread on the store's runtime, for at most [`READ_TIMEOUT`].
    fn read<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        run_on(self.rt().handle(), bounded(READ_TIMEOUT, fut))
    }

    /// A request's write (a keyed submission, a cancel), given up after [`WRITE_TIMEOUT`].
    fn write_bounded<T: Send + 'static>(
        &self,
        f: impl FnOnce(Arc<Inner>) -> std::pin::Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>,
    ) -> Pending<T> {
        Box::pin(bounded(WRITE_TIMEOUT, self.write(f)))
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A write whose outcome cannot be known: `jobs` may exist.
fn uncertain(e: impl std::fmt::Display, jobs: &[&NewJob]) -> StoreError {
    StoreError::Uncertain { message: e.to_string(), ids: jobs.iter().map(|n| n.job.id).collect() }
}

/// `fut`, or `Unavailable` once `within` passed (the database did not answer in time: a request
/// is answered 503 rather than left waiting on it).
async fn bounded<T>(within: Duration, fut: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    bounded_or(within, fut, StoreError::Unavailable).await
}

/// [`bounded`], with the error a wait that ran out becomes (for a write whose statement may be
/// in flight, one that says so).
async fn bounded_or<T>(
    within: Duration,
    fut: impl Future<Output = Result<T, StoreError>>,
    ran_out: impl FnOnce(String) -> StoreError,
) -> Result<T, StoreError> {
    match tokio::time::timeout(within, fut).await {
        Ok(done) => done,
        Err(_) => Err(ran_out(format!("the database did not answer within {} s", within.as_secs()))),
    }
}

/// Runs `fut` on the store's runtime and waits for it on the calling thread, whatever that is
/// (a handler's blocking-pool thread, the start-up thread): the future runs on the store's own
/// threads, the caller only waits on a channel (no thread is made per read).
fn run_on<T: Send + 'static>(rt: &tokio::runtime::Handle, fut: impl Future<Output = T> + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().expect("the store's runtime runs until the store is dropped")
}

#[derive(Clone, Copy)]
enum Task {
    Refresh,
    Heartbeat,
    Rescue,
    Progress,
    Listen,
}

impl Inner {
    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    async fn run(self: Arc<Self>, task: Task) {
        if let Task::Listen = task {
            return self.listen().await;
        }
        let every = match task {
            Task::Refresh => Duration::from_millis(250),
            Task::Progress => PROGRESS_EVERY,
            _ => self.lease / 3,
        };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ended_read = Instant::now();
        loop {
            if let Task::Refresh = task {
                // The slow poll, or at once when a notification said so (at most every 20 ms).
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = self.refresh_now.notified() => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            } else {
                tick.tick().await;
            }
            let result = match task {
                Task::Refresh => {
                    let ended = ended_read.elapsed() >= ENDED_COUNTS_EVERY;
                    let result = self.refresh(ended).await;
                    if ended && result.is_ok() {
                        ended_read = Instant::now();
                    }
                    result
                }
                Task::Heartbeat => self.heartbeat().await,
                Task::Rescue => self.rescue().await,
                Task::Progress => self.write_progress().await,
                Task::Listen => unreachable!(),
            };
            if let Err(e) = result {
                tracing::warn!("store background work failed: {e}");
                self.conns.fail(&e);
            }
        }
    }

    /// The counts of the whole database (the ended ones too when `ended`); wakes the Dispatcher
    /// when there is more to claim.
    async fn refresh(&self, ended: bool) -> Result<(), StoreError> {
        let conn = self.conns.shared().await?;
        let live = conn.query(
            "SELECT status, kind, lease_owner IS NULL, owner, count(*), coalesce(sum(weight), 0)::BIGINT \
             FROM offload_jobs WHERE status IN (0, 1) GROUP BY 1, 2, 3, 4",
            &[],
        );
        let (live, done) = if ended {
            let done = conn.query(
                "SELECT status, count(*), coalesce(sum(result_bytes), 0)::BIGINT FROM offload_jobs \
                 WHERE status >= 2 GROUP BY 1",
                &[],
            );
            let (live, done) = futures::join!(live, done);
            (live?, Some(done?))
        } else {
            (live.await?, None)
        };
        let mut queued = crate::store::KindCounts::default();
        let (mut queued_bytes, mut claimable) = (0, crate::store::KindCounts::default());
        let (mut queued_n, mut running_n) = (0, 0);
        let mut owners: HashMap<Owner, usize> = HashMap::new();
        for row in live {
            let status = stored_status(row.get(0))?;
            let kind = stored_kind(row.get(1))?;
            let free: bool = row.get(2);
            let n = row.get::<_, i64>(4) as usize;
            if let Some(owner) = row.get::<_, Option<Vec<u8>>>(3).and_then(|b| <[u8; 16]>::try_from(b).ok()) {
                *owners.entry(Owner::from_bytes(owner)).or_default() += n;
            }
            if status == JobStatus::Queued {
                queued_n += n;
                // Its payload's bytes count until it starts; a claimed job no longer waits.
                queued_bytes += row.get::<_, i64>(5) as usize;
                if free {
                    *queued.slot(kind) += n;
                    *claimable.slot(kind) += n;
                }
            } else {
                running_n += n;
            }
        }
        let wake = self.with_state(|s| {
            let more = claimable.iter().any(|(kind, now)| now > s.claimable.get(kind));
            s.claimable = claimable;
            s.owners = owners;
            let stats = &mut s.stats;
            stats.queued = queued;
            stats.queued_bytes = queued_bytes;
            stats.by_status.queued = queued_n;
            stats.by_status.running = running_n;
            if let Some(done) = &done {
                let (mut counts, mut bytes) = (StatusCounts::default(), 0);
                for row in done {
                    if let Ok(status) = stored_status(row.get(0)) {
                        *counts.slot(status) += row.get::<_, i64>(1) as usize;
                    }
                    bytes += row.get::<_, i64>(2) as usize;
                }
                stats.by_status.succeeded = counts.succeeded;
                stats.by_status.failed = counts.failed;
                stats.by_status.cancelled = counts.cancelled;
                stats.result_bytes = bytes;
            }
            more.then(|| s.events.clone()).flatten()
        });
        self.conns.recovered();
        if let Some(events) = wake {
            events.claimable();
        }
        Ok(())
    }

    async fn load(&self, id: JobId) -> Result<Option<(i64, Job)>, StoreError> {
        let conn = self.conns.shared().await?;
        let row = conn
            .query_opt(
                concat!("SELECT ", job_columns!(), " FROM offload_jobs WHERE id = $1"),
                &[&id.to_bytes().as_slice()],
            )
            .await?;
        row.map(|r| job_from_row(&r)).transpose()
    }

    /// A job as readers see it: a run of this instance as it is now (started, its progress),
    /// before the next write says so.
    fn live(&self, mut job: Job) -> Job {
        self.with_state(|s| {
            let Some(held) = s.held.get(&job.id) else { return };
            let run = &held.job;
            if run.attempts == job.attempts && run.status == JobStatus::Running && !job.status.is_terminal() {
                job.status = JobStatus::Running;
                job.started_at = run.started_at;
                job.progress = run.progress;
                job.stage = run.stage.clone();
            }
        });
        job
    }
}

impl Inner {
    async fn list(&self, filter: ListFilter) -> Result<Vec<Job>, StoreError> {
        let conn = self.conns.shared().await?;
        let mut clauses = Vec::new();
        if let Some(s) = filter.status {
            clauses.push(format!("status = {}", status_code(s)));
        }
        if let Some(k) = filter.kind {
            // Kind names are letters, digits, `-` and `_` (checked when named): safe as a literal.
            clauses.push(format!("kind = '{}'", k.as_str()));
        }
        let owner = filter.owner.map(|o| o.to_bytes().to_vec());
        if owner.is_some() {
            clauses.push("owner = $2".to_string());
        }
        let mut sql = concat!("SELECT ", job_columns!(), " FROM offload_jobs").to_string();
        if !clauses.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&clauses.join(" AND "));
        }
        sql.push_str(" ORDER BY seq DESC LIMIT $1");
        // A run of this instance whose start is not written yet is `queued` in its row and
        // running as readers see it: read enough queued rows to leave those out.
        let extra = if filter.status == Some(JobStatus::Queued) { self.with_state(|s| s.held.len()) } else { 0 };
        let limit = (filter.limit + extra) as i64;
        let rows = match &owner {
            Some(o) => conn.query_built(&sql, &[&limit, o]).await,
            None => conn.query_built(&sql, &[&limit]).await,
        }?;
        let mut jobs = Vec::with_capacity(rows.len());
        for row in &rows {
            let (_, job) = job_from_row(row)?;
            let job = self.live(job);
            if filter.status.is_none_or(|s| job.status == s) {
                jobs.push(job);
            }
        }
        jobs.truncate(filter.limit);
        Ok(jobs)
    }
}

fn weight(jobs: &[NewJob]) -> usize {
    jobs.iter().map(|j| j.weight).sum()
}

/// Reads a large result from the database piece by piece.
struct PieceReader {
    inner: Arc<Inner>,
    rt: tokio::runtime::Handle,
    seq: i64,
}

impl ResultReader for PieceReader {
    fn read_at(&mut self, offset: usize, max: usize) -> Result<Bytes, StoreError> {
        let inner = self.inner.clone();
        let seq = self.seq;
        let fut = async move {
            let conn = inner.conns.shared().await?;
            let row = conn
                .query_opt(
                    "SELECT substring(bytes FROM $2 FOR $3) FROM offload_results WHERE seq = $1",
                    &[&seq, &(offset as i32 + 1), &(max as i32)],
                )
                .await?;
            Ok(row.map(|r| Bytes::from(r.get::<_, Vec<u8>>(0))).unwrap_or_default())
        };
        run_on(&self.rt, bounded(READ_TIMEOUT, fut))
    }
}

impl JobStore for PgStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities { keeps_jobs: true, shared: true, counts_owners: true }
    }

    fn insert(&self, jobs: Vec<NewJob>, key: Option<IdempotencyKey>) -> Pending<Inserted> {
        // Given up at the bound, a submission whose statement may be in flight may still commit.
        let ids: Vec<JobId> = jobs.iter().map(|n| n.job.id).collect();
        let unknown = move |message| StoreError::Uncertain { message, ids };
        if let Some(key) = key {
            let write = self.write(move |inner| Box::pin(inner.insert_keyed(jobs, key)));
            return Box::pin(bounded_or(WRITE_TIMEOUT, write, unknown));
        }
        let (reply, answer) = oneshot::channel();
        if self.inserts.send(InsertRequest { jobs, reply }).is_err() {
            return crate::store::ready(Err(unavailable("the store is closed")));
        }
        // Given up after the bound, it is not inserted if it still waits for its statement (a
        // request whose answer is gone is left out).
        let answer = async move { answer.await.map_err(|_| unavailable("the store is closed"))? };
        Box::pin(bounded_or(WRITE_TIMEOUT, answer, unknown))
    }

    fn claim(&self, kind: JobKind) -> Option<Pending<Option<Claimed>>> {
        // The job leaves the queue's count now, as the trait asks (the next refresh counts it
        // again if the claim found nothing).
        let any = self.inner.with_state(|s| {
            let slot = s.claimable.slot(kind);
            let any = *slot > 0;
            *slot = slot.saturating_sub(1);
            if any {
                let queued = s.stats.queued.slot(kind);
                *queued = queued.saturating_sub(1);
            }
            any
        });
        if !any {
            return None;
        }
        let (reply, answer) = oneshot::channel();
        Some(match self.claims.send(ClaimRequest { kind, reply }) {
            Ok(()) => Box::pin(async move { answer.await.map_err(|_| unavailable("the store is closed"))? }),
            Err(_) => crate::store::ready(Err(unavailable("the store is closed"))),
        })
    }

    fn start(&self, id: JobId, attempt: u32, at: SystemTime) -> Pending<bool> {
        crate::store::ready(Ok(self.inner.start(id, attempt, at)))
    }

    fn finish(&self, id: JobId, attempt: u32, outcome: Final) -> Pending<Option<Job>> {
        // From the job as held, unless another end of it is being written (a timeout and the
        // run's own end): the first one wins.
        let held = self.inner.with_state(|s| {
            let held = s.held.get_mut(&id).filter(|h| h.job.attempts == attempt)?;
            if held.ending {
                return Some(None);
            }
            let (job, bytes) = match ended(held.job.clone(), outcome.clone(), self.inner.result_budget) {
                Some(end) => end,
                None => return Some(None),
            };
            held.ending = true;
            Some(Some((job, bytes, held.start_unsaid)))
        });
        let (job, bytes, start_unsaid) = match held {
            None => {
                return self.write(move |inner| Box::pin(async move { inner.finish_read(id, attempt, outcome).await }))
            }
            Some(None) => return crate::store::ready(Ok(None)),
            Some(Some(end)) => end,
        };
        let (reply, answer) = oneshot::channel();
        match self.ends.send(EndRequest { job, bytes, start_unsaid, reply }) {
            Ok(()) => Box::pin(async move { answer.await.map_err(|_| unavailable("the store is closed"))? }),
            Err(_) => crate::store::ready(Err(unavailable("the store is closed"))),
        }
    }

    fn cancel(&self, id: JobId, reason: ErrorBody) -> Pending<CancelOutcome> {
        self.write_bounded(move |inner| Box::pin(inner.cancel(id, reason)))
    }

    fn release(&self, id: JobId, attempt: u32) -> Pending<bool> {
        self.write(move |inner| Box::pin(inner.release(id, attempt)))
    }

    /// Judged by the database's clock, not by `now` (this instance's): every instance forgets
    /// a job at the same time, whatever its own clock says.
    fn expire(&self, _now: SystemTime) -> Pending<usize> {
        self.write(move |inner| Box::pin(inner.expire()))
    }

    fn webhook_done(&self, id: JobId) {
        let inner = self.inner.clone();
        self.rt().spawn(async move {
            // A row another session holds locked is not waited for: tried again a few times.
            let mut deleted = Ok(false);
            for pause in [0, 200, 500, 1000, 2000, 5000] {
                tokio::time::sleep(Duration::from_millis(pause)).await;
                deleted = match inner.conns.shared().await {
                    Ok(conn) => conn
                        .query_opt(
                            "WITH d AS (DELETE FROM offload_webhooks WHERE job_id IN (SELECT job_id FROM offload_webhooks \
                               WHERE job_id = $1 FOR UPDATE SKIP LOCKED) RETURNING 1) \
                             SELECT NOT EXISTS (SELECT 1 FROM d) AND EXISTS (SELECT 1 FROM offload_webhooks WHERE job_id = $1)",
                            &[&id.to_bytes().as_slice()],
                        )
                        .await
                        .map(|r| r.is_some_and(|r| r.get::<_, bool>(0))),
                    Err(e) => Err(e),
                };
                if !matches!(deleted, Ok(true)) {
                    break;
                }
            }
            match deleted {
                // Left leased: it expires, and another delivery follows (at least once).
                Err(e) => tracing::warn!(job = %id, "cannot mark the webhook delivered: {e}"),
                Ok(true) => tracing::warn!(job = %id, "cannot mark the webhook delivered: its row stays locked"),
                Ok(false) => {}
            }
            inner.with_state(|s| s.delivering.remove(&id));
        });
    }

    fn webhook_dropped(&self, id: JobId) {
        let inner = self.inner.clone();
        self.rt().spawn(async move {
            inner.with_state(|s| s.delivering.remove(&id));
            // Let go of it: any instance's rescue takes it again after a minute (as it does if
            // its row is locked now and the lease runs out).
            if let Ok(conn) = inner.conns.shared().await {
                let _ = conn
                    .execute(
                        "UPDATE offload_webhooks SET lease_owner = NULL, lease_until = now() + interval '1 minute' \
                         WHERE job_id IN (SELECT job_id FROM offload_webhooks WHERE job_id = $1 AND lease_owner = $2 \
                           FOR UPDATE SKIP LOCKED)",
                        &[&id.to_bytes().as_slice(), &inner.me],
                    )
                    .await;
            }
        });
    }

    fn owed_webhooks(&self) -> Result<Vec<OwedWebhook>, StoreError> {
        let inner = self.inner.clone();
        // Taken by lease, so instances starting together deliver each once.
        self.read(async move { inner.take_webhooks(i64::MAX).await })
    }

    fn set_events(&self, events: Arc<dyn StoreEvents>) {
        self.inner.with_state(|s| s.events = Some(events));
    }

    fn progress(&self, id: JobId, fraction: f32, stage: Option<String>) {
        self.inner.with_state(|s| {
            if let Some(held) = s.held.get_mut(&id) {
                if held.job.advance(fraction, stage) {
                    held.dirty = true;
                }
            }
        });
    }

    fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let inner = self.inner.clone();
        self.read(async move { Ok(inner.load(id).await?.map(|(_, job)| inner.live(job))) })
    }

    fn list(&self, filter: &ListFilter) -> Result<Vec<Job>, StoreError> {
        let (inner, filter) = (self.inner.clone(), filter.clone());
        self.read(async move { inner.list(filter).await })
    }

    fn result(&self, id: JobId) -> Result<Option<(ResultMeta, ResultBody)>, StoreError> {
        let inner = self.inner.clone();
        let found = self.read(async move {
            let Some((seq, job)) = inner.load(id).await? else { return Ok(None) };
            let Some(meta) = job.result.filter(|_| job.status == JobStatus::Succeeded) else { return Ok(None) };
            let conn = inner.conns.shared().await?;
            // Small results come whole with their length; a large one only its length.
            let row = conn
                .query_opt(
                    "SELECT length(bytes), CASE WHEN length(bytes) <= $2 THEN bytes END FROM offload_results \
                     WHERE seq = $1",
                    &[&seq, &(STREAM_ABOVE as i32)],
                )
                .await?;
            let Some(row) = row else { return Ok(None) };
            let len = row.get::<_, i32>(0) as usize;
            let whole = row.get::<_, Option<Vec<u8>>>(1).map(Bytes::from);
            Ok(Some((meta, seq, len, whole)))
        })?;
        Ok(found.map(|(meta, seq, len, whole)| {
            let body = match whole {
                Some(bytes) => ResultBody::Whole(bytes),
                None => ResultBody::Stream {
                    len,
                    reader: Box::new(PieceReader { inner: self.inner.clone(), rt: self.rt().handle().clone(), seq }),
                },
            };
            (meta, body)
        }))
    }

    fn replay(&self, key: &IdempotencyKey) -> Result<Option<Vec<Job>>, StoreError> {
        let (inner, key) = (self.inner.clone(), key.clone());
        self.read(async move { inner.replay(&key).await })
    }

    fn stats(&self) -> StoreStats {
        self.inner.with_state(|s| s.stats.clone())
    }

    fn owner_pending(&self, owner: Owner) -> Option<usize> {
        Some(self.inner.with_state(|s| s.owners.get(&owner).copied().unwrap_or(0)))
    }

    fn counts(&self, owner: Owner) -> Result<StatusCounts, StoreError> {
        let inner = self.inner.clone();
        self.read(async move {
            let conn = inner.conns.shared().await?;
            let rows = conn
                .query(
                    "SELECT status, count(*) FROM offload_jobs WHERE owner = $1 GROUP BY status",
                    &[&owner.to_bytes().as_slice()],
                )
                .await?;
            let mut counts = StatusCounts::default();
            for row in rows {
                let status = stored_status(row.get(0))?;
                *counts.slot(status) += row.get::<_, i64>(1) as usize;
            }
            Ok(counts)
        })
    }

    /// `Err` while the last background statement failed, or while the database has not
    /// answered a statement for [`STALL_AFTER`](super::conn::STALL_AFTER) (frozen, or the way to
    /// it lost): both clear by themselves.
    fn health(&self) -> Result<(), StoreError> {
        if let Some(m) = self.inner.conns.failing() {
            return Err(StoreError::Unavailable(m));
        }
        match self.inner.conns.stalled() {
            Some(waited) => {
                Err(StoreError::Unavailable(format!("the database has not answered for {} s", waited.as_secs())))
            }
            None => Ok(()),
        }
    }
}
