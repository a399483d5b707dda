//! Job records behind one seam: what the Dispatcher writes and what readers (HTTP handlers, the
//! WebSocket hub) read.
//!
//! - [`memory`]: [`MemoryStore`], everything in process (`--store memory`): fast, lost on exit.
//! - [`sqlite`]: [`SqliteStore`], the embedded durable store (the default): one writer thread
//!   with group commit, reader connections of their own, recovery at start.
//! - [`postgres`]: [`PgStore`], one database shared by several instances (`--store postgres`):
//!   `SKIP LOCKED` claims with leases, LISTEN/NOTIFY between instances ([`StoreEvents`]).
//!
//! The shape fits both a process alone on its data and a shared database: a job is *claimed* for
//! a worker (attempt + 1; a shared database writes it with a lease owner, the embedded store,
//! alone on its directory, keeps it in memory and counts started runs from its start log after
//! a crash), and its end is *fenced* on that attempt, so a late or duplicate completion changes
//! nothing. Writes return a future that resolves once the
//! change is committed; reads are plain calls that never queue behind writes (call them off the
//! event loop, e.g. in `web::block`). State transitions are [`Job`]'s methods, in one place.
//! Progress is kept in memory only: it is not worth a write.

pub mod codes;
pub mod memory;
pub mod postgres;
pub mod sqlite;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::domain::callback::CallbackUrl;
use crate::domain::PayloadRecord;
use crate::error::ErrorBody;
use crate::job::{Job, JobId, JobKind, JobStatus, Owner, ResultMeta};
use crate::kind::{Input, Work};

pub use memory::MemoryStore;
pub use postgres::{PgOptions, PgStore};
pub use sqlite::{SqliteOptions, SqliteStore, SyncMode};

/// A write that resolves once it is committed.
pub type Pending<T> = BoxFuture<'static, Result<T, StoreError>>;

/// Why the store could not do what was asked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store cannot write (disk full, I/O error) or read; nothing was changed.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A write reached the storage but whether it was kept is unknown: a commit whose fsync
    /// failed (its frames may be replayed by a restart), or a database's answer lost with its
    /// connection. `ids`: the jobs an insert would have created, which may exist.
    #[error("storage failed while committing, the outcome is unknown: {message}")]
    Uncertain { message: String, ids: Vec<JobId> },
    /// An idempotency key already used for a different request.
    #[error("the Idempotency-Key was already used for a different request")]
    KeyReused,
}

/// A job to create, with its payload in both forms: as the worker needs it and as stored.
pub struct NewJob {
    pub job: Job,
    pub payload: Input,
    pub record: PayloadRecord,
    /// Approximate bytes the payload holds while queued (the queued-bytes budget).
    pub weight: usize,
}

/// A client's `Idempotency-Key` and what it was sent with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyKey {
    pub key: String,
    /// SHA-256 of the request as parsed (payloads and callback): equal requests, equal prints.
    pub fingerprint: [u8; 32],
}

/// What an insert did.
#[derive(Debug)]
pub enum Inserted {
    /// New jobs, committed.
    Created(Vec<Job>),
    /// The key was seen with the same request: nothing created; the jobs of the first request.
    Replayed(Vec<Job>),
}

/// A job taken for a worker, with this attempt counted; still `queued` until the worker starts
/// it ([`JobStore::start`]).
pub struct Claimed {
    pub job: Job,
    pub work: Work,
}

/// How a run ended, as the Dispatcher reports it.
#[derive(Clone, Debug)]
pub enum Final {
    Succeeded { meta: ResultMeta, bytes: Bytes },
    Failed(ErrorBody),
    Cancelled(Option<ErrorBody>),
}

/// What a cancel did.
#[derive(Debug)]
pub enum CancelOutcome {
    /// Cancelled now (it was queued or running).
    Cancelled(Job),
    /// It had already ended.
    Finished(Job),
    Unknown,
}

/// A result's bytes: whole, or (large ones) read from disk piece by piece as they are sent.
pub enum ResultBody {
    Whole(Bytes),
    Stream { len: usize, reader: Box<dyn ResultReader> },
}

/// Reads a stored result piece by piece (each read may touch the disk: call it off the event loop).
pub trait ResultReader: Send {
    /// Up to `max` bytes from `offset`.
    fn read_at(&mut self, offset: usize, max: usize) -> Result<Bytes, StoreError>;
}

/// A webhook owed: written with the job's final state, removed once delivered or given up.
#[derive(Clone, Debug)]
pub struct OwedWebhook {
    pub job: JobId,
    /// The job's owner, kept with the webhook (its signing secret is derived from it at delivery,
    /// so no secret is stored, and a webhook owed past its job's expiry is still signed right).
    pub owner: Option<Owner>,
    pub url: CallbackUrl,
    /// The final job object, exactly as POSTed.
    pub body: Bytes,
}

/// Which jobs `GET /jobs` lists.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub status: Option<JobStatus>,
    pub kind: Option<JobKind>,
    /// Only this owner's jobs (the service runs with API keys); `None`: every job.
    pub owner: Option<Owner>,
    pub limit: usize,
}

/// How long and how much finished work is kept.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// Finished jobs are forgotten this long after they finish.
    pub ttl: Duration,
    /// Most result bytes kept; the oldest finished jobs go first past it.
    pub result_bytes: usize,
    /// Most finished jobs remembered (memory store only: on disk the byte budget bounds it).
    pub finished_jobs: usize,
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
    pub fn slot(&mut self, status: JobStatus) -> &mut usize {
        match status {
            JobStatus::Queued => &mut self.queued,
            JobStatus::Running => &mut self.running,
            JobStatus::Succeeded => &mut self.succeeded,
            JobStatus::Failed => &mut self.failed,
            JobStatus::Cancelled => &mut self.cancelled,
        }
    }

    /// A job moved from `from` to `to`.
    pub fn moved(&mut self, from: JobStatus, to: JobStatus) {
        if from != to {
            let slot = self.slot(from);
            *slot = slot.saturating_sub(1);
            *self.slot(to) += 1;
        }
    }
}

/// A count per kind: a few entries, found by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KindCounts(Vec<(JobKind, usize)>);

impl KindCounts {
    pub fn get(&self, kind: JobKind) -> usize {
        self.0.iter().find(|(k, _)| *k == kind).map_or(0, |(_, n)| *n)
    }

    /// The count of `kind`, created at 0.
    pub fn slot(&mut self, kind: JobKind) -> &mut usize {
        let at = match self.0.iter().position(|(k, _)| *k == kind) {
            Some(at) => at,
            None => {
                self.0.push((kind, 0));
                self.0.len() - 1
            }
        };
        &mut self.0[at].1
    }

    pub fn total(&self) -> usize {
        self.0.iter().map(|(_, n)| n).sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = (JobKind, usize)> + '_ {
        self.0.iter().copied()
    }
}

/// Counters kept in memory by every store, for admission, metrics and `GET /jobs`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub by_status: StatusCounts,
    /// Jobs waiting for a worker, per kind.
    pub queued: KindCounts,
    /// Bytes held by the payloads of queued jobs.
    pub queued_bytes: usize,
    /// Bytes of stored results.
    pub result_bytes: usize,
    /// Queued jobs that were running when the last process died (counted in `queued` too).
    pub suspects: usize,
}

impl StoreStats {
    pub fn queued(&self, kind: JobKind) -> usize {
        self.queued.get(kind)
    }
}

/// What a store does that its users must act on: the differences between stores, answered by
/// the store itself so that callers ask for what they need instead of which store it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Accepted jobs survive the process: a shutdown leaves them queued for the next start
    /// (see `dispatch::drain`); without it they are lost, so a shutdown ends them.
    pub keeps_jobs: bool,
    /// Other processes share the jobs, and so may run the kinds no pool here runs.
    pub shared: bool,
    /// The store counts each owner's queued and running jobs itself, every process together
    /// ([`JobStore::owner_pending`] answers `Some`); otherwise the Dispatcher counts them.
    pub counts_owners: bool,
}

/// The seam. Every method is cheap to call from an event loop except the reads (`get`, `list`,
/// `result`, `replay`), which may touch the disk.
pub trait JobStore: Send + Sync + 'static {
    /// What this store does differently from the others (a constant, cheap to ask).
    fn capabilities(&self) -> Capabilities;
    /// Whether accepted jobs survive the process ([`Capabilities::keeps_jobs`]).
    fn durable(&self) -> bool {
        self.capabilities().keeps_jobs
    }
    /// Whether other processes share the jobs ([`Capabilities::shared`]).
    fn shared(&self) -> bool {
        self.capabilities().shared
    }

    /// Creates jobs, all or none, with their payloads; with a key, at most once per key.
    fn insert(&self, jobs: Vec<NewJob>, key: Option<IdempotencyKey>) -> Pending<Inserted>;
    /// Takes the oldest queued job of `kind` for this process, attempt + 1 (a run that takes
    /// the process down must still be counted: each store makes sure of it before the job can
    /// run). `None` at once when nothing is queued: the job leaves `stats().queued` during this
    /// call. The answer is `None` when the job turned out not claimable (cancelled meanwhile);
    /// ask again.
    fn claim(&self, kind: JobKind) -> Option<Pending<Option<Claimed>>>;
    /// Claims the oldest *suspect*: a job that was running when the last process died, so it
    /// may be what killed it. The caller runs it alone (nothing else running or claimed), so a
    /// job that crashes the process takes no other job's attempts with it. `None` when there is
    /// none (always, for a store that does not survive the process).
    fn claim_suspect(&self) -> Option<Pending<Option<Claimed>>> {
        None
    }
    /// A worker started the claimed job at `at`: queued → running. Readers see it at once; a
    /// store need not write it on its own (the attempt was counted at the claim, the end records
    /// `started_at`).
    fn start(&self, id: JobId, attempt: u32, at: SystemTime) -> Pending<bool>;
    /// Ends a run, fenced: applies only while this process holds the job with this `attempt`. The
    /// result, and the webhook owed when the job has a callback, are written with the state.
    /// `None`: nothing changed (a late or duplicate completion).
    fn finish(&self, id: JobId, attempt: u32, outcome: Final) -> Pending<Option<Job>>;
    /// Cancels a queued or running job.
    fn cancel(&self, id: JobId, reason: ErrorBody) -> Pending<CancelOutcome>;
    /// Puts a claimed job back in the queue (its run was stopped by a shutdown, or it never
    /// started: then its attempt is not counted), fenced on the attempt. Whether it changed.
    fn release(&self, id: JobId, attempt: u32) -> Pending<bool>;
    /// Forgets finished jobs past their TTL; how many.
    fn expire(&self, now: SystemTime) -> Pending<usize>;
    /// A webhook was delivered or given up on: no longer owed.
    fn webhook_done(&self, id: JobId);
    /// A webhook this process could not take on (its queue was full): still owed, for whoever
    /// delivers it later (the next start; with a shared store, any instance after a while).
    fn webhook_dropped(&self, _id: JobId) {}
    /// Webhooks owed from before this start (a durable store after a crash).
    fn owed_webhooks(&self) -> Result<Vec<OwedWebhook>, StoreError>;

    /// Where a store shared with other processes reports what happened elsewhere. Stores alone
    /// on their data have nothing to report.
    fn set_events(&self, _events: std::sync::Arc<dyn StoreEvents>) {}

    /// What worker threads call right before a job runs (a durable store notes the start so that
    /// a run that takes the process down is counted as an attempt); `None` if nothing is needed.
    fn start_hook(&self) -> Option<crate::kind::context::StartHook> {
        None
    }

    /// The process is about to exit cleanly: leave the disk tidy (the embedded store copies its
    /// WAL back into the database and empties it).
    fn close(&self) -> Pending<()> {
        ready(Ok(()))
    }

    /// Progress of a running job, kept in memory only.
    fn progress(&self, id: JobId, fraction: f32, stage: Option<String>);

    /// One job, with its live progress.
    fn get(&self, id: JobId) -> Result<Option<Job>, StoreError>;
    /// Jobs matching `filter`, newest first.
    fn list(&self, filter: &ListFilter) -> Result<Vec<Job>, StoreError>;
    /// A succeeded job's result.
    fn result(&self, id: JobId) -> Result<Option<(ResultMeta, ResultBody)>, StoreError>;
    /// The jobs a key was first used for, if the key is known; `KeyReused` for another request.
    fn replay(&self, key: &IdempotencyKey) -> Result<Option<Vec<Job>>, StoreError>;

    fn stats(&self) -> StoreStats;
    /// Queued and running jobs per owner, as stored now (a read: call it off the event loop). The
    /// Dispatcher starts its per-key counts from it (`--max-pending-per-key`) and keeps them
    /// itself from then on. A store that starts empty has nothing to report.
    fn pending_by_owner(&self) -> Result<std::collections::HashMap<Owner, usize>, StoreError> {
        Ok(std::collections::HashMap::new())
    }
    /// A shared store's own count of `owner`'s queued and running jobs, every instance together
    /// (others end jobs this process submitted, unseen by its Dispatcher); `None` for a store
    /// alone on its data, whose jobs all end through this process's Dispatcher. A store whose
    /// [`Capabilities::counts_owners`] is set answers `Some`.
    fn owner_pending(&self, _owner: Owner) -> Option<usize> {
        None
    }
    /// How many of `owner`'s jobs are in each status (the service-wide counts are in `stats`).
    fn counts(&self, owner: Owner) -> Result<StatusCounts, StoreError>;
    /// `Err` while writes fail (disk full, I/O errors); clears once a write succeeds again.
    fn health(&self) -> Result<(), StoreError>;
}

/// What another process did, as a shared store learns it (PostgreSQL's LISTEN/NOTIFY).
pub trait StoreEvents: Send + Sync {
    /// Work this process did not submit became claimable (submitted elsewhere, or rescued).
    fn claimable(&self);
    /// A job was cancelled elsewhere: if it runs here, stop it.
    fn cancelled(&self, id: JobId);
    /// A job changed elsewhere: its new state, for the WebSocket followers here.
    fn changed(&self, job: Job);
    /// Whether anyone here follows `id` (a shared store reads a job it heard of only then).
    fn wants(&self, _id: JobId) -> bool {
        true
    }
    /// The jobs someone here follows (re-read after notices may have been lost).
    fn watched(&self) -> Vec<JobId> {
        Vec::new()
    }
    /// Webhooks owed by an instance that stopped (its lease on them ran out): deliver them.
    fn owed(&self, _hooks: Vec<OwedWebhook>) {}
}

/// The error a run gets when the process died under it too often.
pub fn worker_lost(attempts: u32) -> ErrorBody {
    ErrorBody::new(
        "worker_lost",
        format!("the job was started {attempts} times and each run was cut off (the process stopped); not retried"),
    )
}

/// Applies a run's end to a job under the state machine; whether it changed.
pub(crate) fn apply_final(job: &mut Job, outcome: Final, now: SystemTime) -> bool {
    match outcome {
        Final::Succeeded { meta, .. } => job.succeed(meta, now),
        Final::Failed(error) => job.fail(error, now),
        Final::Cancelled(reason) => {
            let changed = job.cancel(now);
            if changed {
                job.error = reason;
            }
            changed
        }
    }
}

/// The error of a result that cannot be kept at all.
pub(crate) fn result_too_large(bytes: usize, budget: usize) -> ErrorBody {
    ErrorBody::new(
        "result_too_large",
        format!("the result has {bytes} bytes, more than the {budget} bytes kept for results"),
    )
}

/// A future already resolved.
pub(crate) fn ready<T: Send + 'static>(value: Result<T, StoreError>) -> Pending<T> {
    Box::pin(std::future::ready(value))
}
