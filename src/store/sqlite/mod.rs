//! [`SqliteStore`]: the embedded durable store (`--store sqlite`, the default).
//!
//! One database file in `--data-dir`, in WAL mode. Writes go through one writer thread with
//! group commit ([`writer`]); a `202` is answered after the commit that holds the job and its
//! payload, fsync'd with [`SyncMode::Full`]. Reads use connections of their own, so a reader
//! never waits behind the writer. A checkpointer thread copies the WAL back into the database
//! off the hot path, and `journal_size_limit` keeps the WAL file bounded.
//!
//! The queue of jobs waiting for a worker is kept in memory (ids, weights, and the jobs and
//! payloads accepted by this process), rebuilt from the database at start. The directory is
//! this process's alone, so claims and starts live in memory too: per job only the insert and
//! the end are written; a [`StartLog`] tells recovery which jobs had started.
//!
//! At start ([`SqliteStore::open`]): the data directory is locked (a second process refuses to
//! start), the schema is migrated, and jobs that were running when the last process died are
//! queued again with their attempt counted, or failed with `worker_lost` once they were started
//! `max_attempts` times.

mod schema;
mod startlog;
mod writer;

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use tokio::sync::oneshot;

use super::{
    ready, CancelOutcome, Capabilities, Claimed, Final, IdempotencyKey, Inserted, JobStore, ListFilter, NewJob,
    OwedWebhook, Pending, ResultBody, ResultReader, StatusCounts, StoreError, StoreStats,
};
use crate::domain::callback::{CallbackPolicy, CallbackUrl};
use crate::error::ErrorBody;
use crate::job::{Job, JobId, JobKind, JobStatus, Owner, ResultMeta};
use crate::kind::{Input, Work};
pub use startlog::{StartLog, Starts};
use writer::Op;

/// How hard a commit tries to reach the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SyncMode {
    /// fsync at every commit: an accepted job survives an OS crash or power loss.
    Full,
    /// fsync at checkpoints only: survives a crash of the process (`kill -9`), not of the OS.
    Normal,
}

/// How the store is opened, from configuration.
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    pub dir: PathBuf,
    pub sync: SyncMode,
    /// A job started this many times without finishing ends `failed` (`worker_lost`).
    pub max_attempts: u32,
    /// Finished jobs are deleted this long after they finish.
    pub ttl: Duration,
    /// Most result bytes kept on disk; the oldest finished jobs go first past it.
    pub result_bytes: usize,
}

/// The file name of the database inside the data directory.
const DB_FILE: &str = "offload.db";
/// Largest the WAL file is left at after a checkpoint.
const WAL_LIMIT: i64 = 64 << 20;
/// WAL length past which the writer restarts it (a RESTART checkpoint between two batches).
const RESTART_WAL_AT: i64 = WAL_LIMIT / 2;
/// How often the checkpointer runs.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// Reader connections kept open for reuse.
const IDLE_READERS: usize = 8;
/// Results larger than this are streamed from disk in pieces rather than read whole.
const STREAM_ABOVE: usize = 1 << 20;

pub struct SqliteStore {
    /// To the writer thread.
    ops: mpsc::Sender<Op>,
    shared: Arc<Shared>,
    /// Reader connections, reused.
    readers: Arc<Readers>,
    /// Which job each worker thread started last.
    start_log: Arc<StartLog>,
    /// Held open for the lock on the data directory (released when the process ends).
    _lock: File,
}

/// What the writer thread and the store's callers share.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Live state of claimed jobs: when a worker started them, and their progress (progress is
    /// never written to disk; the start is, without anyone waiting for it).
    progress: Mutex<HashMap<JobId, Live>>,
    /// The last write error, while writes fail.
    failing: Mutex<Option<String>>,
    /// Set for good when the data directory was deleted or replaced under this process: writes
    /// would go to files nobody can open again, so they are refused until a restart.
    gone: Mutex<Option<String>>,
    /// Told when jobs become claimable without a submission here (a recovery that waited for
    /// the disk finished).
    events: Mutex<Option<Arc<dyn super::StoreEvents>>>,
    /// Set by the checkpointer when the WAL grew long: the writer restarts it.
    pub(crate) restart_wal: AtomicBool,
    pub(crate) ttl: Duration,
    pub(crate) result_budget: usize,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    /// Test hook: writes fail while this file exists.
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    fail_file: PathBuf,
}

/// What readers see of a started job instead of the disk (where it is still `queued`).
#[derive(Default)]
pub(crate) struct Live {
    started: Option<SystemTime>,
    /// The attempt it runs as (counted once it started).
    attempt: u32,
    fraction: f32,
    stage: Option<String>,
}

/// The in-memory queue and counters.
pub(crate) struct State {
    /// Queued ids per kind, oldest first; an id without a `waiting` entry is skipped.
    queues: HashMap<JobKind, VecDeque<JobId>>,
    /// Jobs cut off by the last process's death, oldest first: each runs alone (see
    /// [`JobStore::claim_suspect`]).
    suspects: VecDeque<JobId>,
    waiting: HashMap<JobId, Waiting>,
    /// Claimed jobs not started yet → (attempt, payload weight, still counted in `queued_bytes`:
    /// the payload waits in a pool's mailbox).
    claimed: HashMap<JobId, (u32, usize)>,
    /// Claimed jobs a worker started → attempt. Neither a claim nor a start is written (the
    /// final write records both; the start log covers a crash), so on disk these jobs are still
    /// `queued`: this is where `running` is known, for counts, listings, readers and fences.
    pub(crate) started: HashMap<JobId, u32>,
    pub(crate) stats: StoreStats,
}

/// A queued job as the queue knows it.
pub(crate) struct Waiting {
    pub(crate) id: JobId,
    pub(crate) kind: JobKind,
    pub(crate) seq: i64,
    pub(crate) weight: usize,
    /// The payload and the job, for jobs accepted by this process (a claim needs no read).
    pub(crate) payload: Option<Input>,
    pub(crate) job: Option<Job>,
    /// It was running when the last process died: it may be what killed it, so it runs alone.
    pub(crate) suspect: bool,
}

impl State {
    pub(crate) fn enqueue_back(&mut self, w: Waiting) {
        self.count_in(&w);
        self.queue_of(&w).push_back(w.id);
        self.waiting.insert(w.id, w);
    }

    pub(crate) fn enqueue_front(&mut self, w: Waiting) {
        self.count_in(&w);
        self.queue_of(&w).push_front(w.id);
        self.waiting.insert(w.id, w);
    }

    fn queue_of(&mut self, w: &Waiting) -> &mut VecDeque<JobId> {
        if w.suspect {
            &mut self.suspects
        } else {
            self.queues.entry(w.kind).or_default()
        }
    }

    fn count_in(&mut self, w: &Waiting) {
        *self.stats.queued.slot(w.kind) += 1;
        self.stats.queued_bytes += w.weight;
        self.stats.suspects += usize::from(w.suspect);
    }

    /// The oldest suspect, taken out of its queue as [`State::pop_queued`] does.
    pub(crate) fn pop_suspect(&mut self) -> Option<Waiting> {
        while let Some(id) = self.suspects.pop_front() {
            if let Some(w) = self.waiting.remove(&id) {
                *self.stats.queued.slot(w.kind) -= 1;
                self.stats.suspects -= 1;
                return Some(w);
            }
        }
        None
    }

    /// Takes the oldest waiting job of `kind` out of the queue (on the caller's thread, so the
    /// Dispatcher's count of claims in progress and this queue's count never overlap). Its
    /// bytes stay counted: see
    /// [`State::claimed`], [`State::dropped`] and [`State::put_back`] for how the claim ends.
    pub(crate) fn pop_queued(&mut self, kind: JobKind) -> Option<Waiting> {
        while let Some(id) = self.queues.entry(kind).or_default().pop_front() {
            if let Some(w) = self.waiting.remove(&id) {
                *self.stats.queued.slot(kind) -= 1;
                return Some(w);
            }
        }
        None
    }

    /// A popped job is claimed with `attempt`: its bytes count until it starts or ends.
    pub(crate) fn claimed(&mut self, w: &Waiting, attempt: u32) {
        self.claimed.insert(w.id, (attempt, w.weight));
    }

    /// The attempt this process holds the job with (claimed or started), if it holds it.
    pub(crate) fn held_attempt(&self, id: JobId) -> Option<u32> {
        self.claimed.get(&id).map(|c| c.0).or_else(|| self.started.get(&id).copied())
    }

    /// A popped job turned out not runnable (gone, cancelled, unreadable).
    pub(crate) fn dropped(&mut self, w: &Waiting) {
        self.stats.queued_bytes -= w.weight;
    }

    /// The claim did not commit: the popped job is queued again, at the front.
    pub(crate) fn put_back(&mut self, w: Waiting) {
        *self.stats.queued.slot(w.kind) += 1;
        self.stats.suspects += usize::from(w.suspect);
        self.queue_of(&w).push_front(w.id);
        self.waiting.insert(w.id, w);
    }

    /// A worker started a claimed job: whether it was still claimed (not ended or released).
    pub(crate) fn start_claimed(&mut self, id: JobId, attempt: u32) -> bool {
        if self.claimed.get(&id).map(|c| c.0) != Some(attempt) {
            return false;
        }
        let (_, weight) = self.claimed.remove(&id).expect("checked");
        self.stats.queued_bytes -= weight;
        self.started.insert(id, attempt);
        self.stats.by_status.moved(JobStatus::Queued, JobStatus::Running);
        true
    }

    /// A held job ended or was released: it is no longer claimed or started. Returns the
    /// status it had as far as the counts know.
    pub(crate) fn settle(&mut self, id: JobId) -> JobStatus {
        if self.started.remove(&id).is_some() {
            return JobStatus::Running;
        }
        if let Some((_, weight)) = self.claimed.remove(&id) {
            self.stats.queued_bytes -= weight;
        }
        JobStatus::Queued
    }

    /// A queued job was cancelled.
    pub(crate) fn forget_queued(&mut self, id: JobId) {
        if let Some(w) = self.waiting.remove(&id) {
            *self.stats.queued.slot(w.kind) -= 1;
            self.stats.queued_bytes -= w.weight;
            self.stats.suspects -= usize::from(w.suspect);
        }
    }

    pub(crate) fn evicted(&mut self, statuses: &[JobStatus], result_bytes: usize) {
        for s in statuses {
            let slot = self.stats.by_status.slot(*s);
            *slot = slot.saturating_sub(1);
        }
        self.stats.result_bytes = self.stats.result_bytes.saturating_sub(result_bytes);
    }
}

impl Shared {
    pub(crate) fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub(crate) fn stats(&self) -> StoreStats {
        self.with_state(|s| s.stats.clone())
    }

    pub(crate) fn health(&self) -> Result<(), StoreError> {
        if let Some(message) = &*self.gone.lock().unwrap_or_else(|p| p.into_inner()) {
            return Err(StoreError::Unavailable(message.clone()));
        }
        match &*self.failing.lock().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(()),
            Some(message) => Err(StoreError::Unavailable(message.clone())),
        }
    }

    /// Marks the data directory gone (see [`Shared::gone`]); logs it loudly, once.
    fn set_gone(&self, message: String) {
        let mut gone = self.gone.lock().unwrap_or_else(|p| p.into_inner());
        if gone.is_none() {
            tracing::error!("{message}");
            *gone = Some(message);
        }
    }

    pub(crate) fn set_health(&self, error: Option<String>) {
        *self.failing.lock().unwrap_or_else(|p| p.into_inner()) = error;
    }

    /// `job` with its live state: started (if the write is not committed yet) and progress.
    pub(crate) fn live(&self, mut job: Job) -> Job {
        if job.status.is_terminal() {
            return job;
        }
        if let Some(live) = self.progress.lock().unwrap_or_else(|p| p.into_inner()).get(&job.id) {
            if let Some(at) = live.started.filter(|_| job.status == JobStatus::Queued) {
                job.attempts = job.attempts.max(live.attempt);
                job.start(at);
            }
            job.advance(live.fraction, live.stage.clone());
        }
        job
    }

    pub(crate) fn forget_progress(&self, id: JobId) {
        self.progress.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }

    /// `Err` when a write must not be tried: the data directory is gone, or (test builds) the
    /// `fail-writes` file exists in it.
    pub(crate) fn check_writable(&self) -> Result<(), String> {
        if let Some(message) = &*self.gone.lock().unwrap_or_else(|p| p.into_inner()) {
            return Err(message.clone());
        }
        #[cfg(feature = "test-hooks")]
        if self.fail_file.exists() {
            return Err("disk I/O error (test hook: fail-writes)".into());
        }
        Ok(())
    }

    /// Puts what recovery found in memory: the queue (every job queued on disk) and the counts.
    pub(crate) fn install(&self, recovered: Recovered) {
        self.with_state(|s| {
            s.stats = recovered.stats;
            // enqueue_back counts them in again.
            s.stats.queued = Default::default();
            s.stats.queued_bytes = 0;
            s.stats.suspects = 0;
            for w in recovered.queued {
                s.enqueue_back(w);
            }
        });
    }

    /// Tells the Dispatcher that jobs wait to be claimed.
    pub(crate) fn wake(&self) {
        if let Some(events) = &*self.events.lock().unwrap_or_else(|p| p.into_inner()) {
            events.claimable();
        }
    }
}

fn sql_error(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `options.dir`, locks it, migrates it and
    /// recovers what the last process left running. The error text is meant for the operator.
    pub fn open(options: &SqliteOptions, metrics: Arc<crate::metrics::Metrics>) -> Result<Self, String> {
        let dir = &options.dir;
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create the data directory {}: {e}", dir.display()))?;
        let lock = lock_dir(dir)?;
        let path = dir.join(DB_FILE);
        let mut conn = Connection::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        configure(&conn, options.sync).map_err(|e| format!("cannot configure {}: {e}", path.display()))?;
        schema::migrate(&mut conn)?;
        let (start_log, started) =
            StartLog::open(dir).map_err(|e| format!("cannot open the start log in {}: {e}", dir.display()))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queues: Default::default(),
                suspects: VecDeque::new(),
                waiting: HashMap::new(),
                claimed: HashMap::new(),
                started: HashMap::new(),
                stats: StoreStats::default(),
            }),
            progress: Mutex::new(HashMap::new()),
            failing: Mutex::new(None),
            gone: Mutex::new(None),
            events: Mutex::new(None),
            restart_wal: AtomicBool::new(false),
            ttl: options.ttl,
            result_budget: options.result_bytes,
            metrics,
            fail_file: dir.join("fail-writes"),
        });
        let (mut requeued, mut lost, mut pending) = (0, 0, None);
        match recover(&mut conn, options.max_attempts, &started) {
            Ok(recovered) => {
                (requeued, lost) = (recovered.requeued, recovered.lost);
                shared.install(recovered);
                // Test builds: die between the recovery's commit and the log's clear.
                #[cfg(feature = "test-hooks")]
                if std::env::var_os("OFFLOAD_TEST_KILL_AFTER_RECOVERY").is_some() {
                    // SAFETY: raising a signal on this process is always sound.
                    unsafe { libc::raise(libc::SIGKILL) };
                }
                // Safe to fail: a run the log still names is counted once however often it is read.
                if let Err(e) = start_log.clear() {
                    tracing::warn!("cannot clear the start log: {e}");
                }
            }
            Err(e) if waits_for_storage(&e) => {
                // Serve reads now; the writer finishes recovery once the disk takes writes.
                let message = format!("recovery after the last stop waits for the disk: {e}");
                tracing::error!("{message}; reads are served, writes refused until it succeeds (retried every second)");
                shared.with_state(|s| s.stats = count_stats(&conn).unwrap_or_default());
                shared.set_health(Some(message));
                pending = Some(writer::PendingRecovery {
                    max_attempts: options.max_attempts,
                    started,
                    start_log: start_log.clone(),
                });
            }
            Err(e) => return Err(format!("recovery failed: {e}")),
        }
        let (ops, rx) = mpsc::channel();
        let writer_shared = shared.clone();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                crate::process::name_thread(c"store-writer");
                writer::run(conn, rx, writer_shared, pending)
            })
            .map_err(|e| format!("cannot start the store writer: {e}"))?;
        let identity = DirIdentity::of(dir, &lock)?;
        start_checkpointer(&path, Arc::downgrade(&shared), identity)?;
        let stats = shared.stats();
        tracing::info!(
            path = %path.display(),
            queued = stats.by_status.queued,
            requeued,
            lost,
            finished = stats.by_status.succeeded + stats.by_status.failed + stats.by_status.cancelled,
            "store opened"
        );
        let readers = Arc::new(Readers { idle: Mutex::new(Vec::new()), path });
        Ok(SqliteStore { ops, shared, readers, start_log, _lock: lock })
    }

    /// Claims a job taken from the queue: at once when this process accepted it (job and payload
    /// are in memory; nothing is written), else after the writer thread read them.
    fn take(&self, mut waiting: Waiting) -> Pending<Option<Claimed>> {
        match (waiting.job.take(), waiting.payload.take()) {
            (Some(mut job), Some(payload)) => {
                job.claim();
                self.shared.with_state(|s| s.claimed(&waiting, job.attempts));
                ready(Ok(Some(Claimed { job, work: Work::Ready(payload) })))
            }
            (_, payload) => {
                waiting.payload = payload;
                self.send(|reply| Op::Claim { waiting: Box::new(waiting), reply })
            }
        }
    }

    fn send<T: Send + 'static>(&self, make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op) -> Pending<T> {
        let (tx, rx) = oneshot::channel();
        let sent = self.ops.send(make(tx));
        Box::pin(async move {
            if sent.is_err() {
                return Err(StoreError::Unavailable("the store writer has stopped".into()));
            }
            rx.await.unwrap_or_else(|_| Err(StoreError::Unavailable("the write was not committed".into())))
        })
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        self.readers.read(f)
    }
}

/// Read-only connections, opened on demand and kept for reuse: readers never wait for the
/// writer (WAL) nor for each other.
struct Readers {
    idle: Mutex<Vec<Connection>>,
    path: PathBuf,
}

impl Readers {
    /// Runs `f` on a reader connection.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match pooled {
            Some(c) => c,
            None => open_reader(&self.path).map_err(sql_error)?,
        };
        let out = f(&conn).map_err(sql_error);
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < IDLE_READERS {
            idle.push(conn);
        }
        out
    }
}

/// A large result read piece by piece, each piece in a short read of its own (a result never
/// changes once written; if its job is deleted meanwhile, the read fails and the download ends).
struct BlobReader {
    readers: Arc<Readers>,
    seq: i64,
}

impl ResultReader for BlobReader {
    fn read_at(&mut self, offset: usize, max: usize) -> Result<Bytes, StoreError> {
        self.readers.read(|conn| {
            let blob = conn.blob_open(rusqlite::MAIN_DB, "results", "bytes", self.seq, true)?;
            let mut buf = vec![0; max.min(blob.len().saturating_sub(offset))];
            blob.read_at_exact(&mut buf, offset)?;
            Ok(Bytes::from(buf))
        })
    }
}

fn lock_dir(dir: &Path) -> Result<File, String> {
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match crate::process::try_lock_exclusive(&file) {
        Ok(true) => Ok(file),
        Ok(false) => Err(format!(
            "the data directory {} is in use by another offload process; stop it or use another --data-dir",
            dir.display()
        )),
        Err(e) => Err(format!("cannot lock {}: {e}", path.display())),
    }
}

fn configure(conn: &Connection, sync: SyncMode) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(5))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidParameterName(format!("journal_mode is {mode}, not wal")));
    }
    conn.pragma_update(None, "synchronous", if sync == SyncMode::Full { "FULL" } else { "NORMAL" })?;
    conn.pragma_update(None, "journal_size_limit", WAL_LIMIT)?;
    // Checkpoints run on the checkpointer thread, not inside the writer's commits.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.pragma_update(None, "cache_size", -8192)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "cache_size", -2048)?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

/// Which directory and lock file this process opened, to notice when either is deleted or
/// replaced under it (`rm -rf` of the data directory: the open files live on, unlinked, and a
/// second process could lock a new directory at the same path).
struct DirIdentity {
    dir: PathBuf,
    dir_id: (u64, u64),
    lock: PathBuf,
    lock_id: (u64, u64),
}

impl DirIdentity {
    fn of(dir: &Path, lock: &File) -> Result<Self, String> {
        use std::os::unix::fs::MetadataExt;
        let dir_meta = std::fs::metadata(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        let lock_meta = lock.metadata().map_err(|e| format!("cannot read the lock file: {e}"))?;
        Ok(DirIdentity {
            dir: dir.to_path_buf(),
            dir_id: (dir_meta.dev(), dir_meta.ino()),
            lock: dir.join("lock"),
            lock_id: (lock_meta.dev(), lock_meta.ino()),
        })
    }

    /// `Err` with what changed, when the path no longer names what was opened.
    fn check(&self) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt;
        for (path, id, what) in [(&self.dir, self.dir_id, "data directory"), (&self.lock, self.lock_id, "lock file")] {
            match std::fs::metadata(path) {
                Ok(m) if (m.dev(), m.ino()) == id => {}
                Ok(_) => return Err(format!("the {what} {} was replaced by another", path.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(format!("the {what} {} was deleted", path.display()))
                }
                // Cannot tell (permissions changed, say): not a reason to stop writing.
                Err(e) => tracing::debug!("cannot check the {what}: {e}"),
            }
        }
        Ok(())
    }
}

fn start_checkpointer(path: &Path, shared: Weak<Shared>, identity: DirIdentity) -> Result<(), String> {
    let conn = Connection::open(path).map_err(|e| format!("cannot open the checkpointer's connection: {e}"))?;
    conn.busy_timeout(Duration::from_millis(100)).map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("store-checkpoint".into())
        .spawn(move || {
            crate::process::name_thread(c"store-checkpt");
            let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap_or(4096);
            let restart_at = RESTART_WAL_AT / page.max(512);
            loop {
                std::thread::sleep(CHECKPOINT_EVERY);
                let Some(shared) = shared.upgrade() else { return };
                if let Err(what) = identity.check() {
                    shared.set_gone(format!(
                        "{what} while this process used it: every write is refused from now on (it would go to \
                         unlinked files); restart the service"
                    ));
                    continue;
                }
                // PASSIVE never blocks the writer or readers. The WAL restarts from its start (and
                // is cut back to journal_size_limit) only when a write begins with every frame
                // copied back, which a steady stream of writes never allows: past RESTART_WAL_AT
                // the writer is asked to restart it between two batches.
                match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1)) {
                    Ok(frames) if frames > restart_at => shared.restart_wal.store(true, Ordering::Relaxed),
                    Ok(_) => {}
                    Err(e) => tracing::debug!("checkpoint skipped: {e}"),
                }
            }
        })
        .map(drop)
        .map_err(|e| format!("cannot start the checkpointer: {e}"))
}

/// Counts of jobs by status and the bytes of stored results, as on disk.
fn count_stats(conn: &Connection) -> rusqlite::Result<StoreStats> {
    let mut stats = StoreStats::default();
    let mut stmt = conn.prepare("SELECT status, count(*) FROM jobs GROUP BY status")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let status: i64 = r.get(0)?;
        let n: i64 = r.get(1)?;
        *stats.by_status.slot(schema::status_of(status)?) += n as usize;
    }
    stats.result_bytes =
        conn.query_row("SELECT coalesce(sum(result_bytes), 0) FROM jobs WHERE status = 2", [], |r| r.get::<_, i64>(0))?
            as usize;
    Ok(stats)
}

/// Whether recovery failed for want of a disk that takes writes (full, I/O errors), which may
/// pass, rather than for a database it cannot use.
fn waits_for_storage(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DiskFull | rusqlite::ErrorCode::SystemIoFailure | rusqlite::ErrorCode::ReadOnly)
    )
}

/// What recovery found.
pub(crate) struct Recovered {
    queued: Vec<Waiting>,
    stats: StoreStats,
    requeued: usize,
    lost: usize,
}

/// Jobs that were running when the last process died run again, or fail past `max_attempts`;
/// jobs it had claimed but not started (per the database and the start log) are queued as if
/// never claimed.
pub(crate) fn recover(conn: &mut Connection, max_attempts: u32, started: &Starts) -> rusqlite::Result<Recovered> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let running: Vec<(i64, Job)> = {
        // Started by the process that died: its worker threads noted them in the start log
        // (neither claims nor starts are written). Rows marked running on disk count too.
        let sql = format!("SELECT {} FROM jobs WHERE status = 1", schema::JOB_COLUMNS);
        let mut stmt = tx.prepare(&sql)?;
        let rows = stmt.query_map([], schema::job_from_row)?;
        let mut found: Vec<(i64, Job)> = rows.collect::<rusqlite::Result<_>>()?;
        for (id, logged) in started {
            let Some((seq, mut job)) = schema::load(&tx, *id)?.filter(|(_, j)| j.status == JobStatus::Queued) else {
                continue;
            };
            // Its run counts as an attempt (it may be what took the process down), once: a run a
            // shutdown released, or an earlier recovery counted, is on disk already.
            if let Some(attempts) = startlog::counted_attempts(job.attempts, *logged) {
                job.attempts = attempts;
                found.push((seq, job));
            }
        }
        found
    };
    let (mut requeued, mut lost) = (0, 0);
    let now = SystemTime::now();
    for (seq, mut job) in running {
        if job.attempts >= max_attempts {
            job.fail(super::worker_lost(job.attempts), now);
            writer::end(&tx, seq, &job)?;
            tracing::warn!(job = %job.id, attempts = job.attempts, "job failed: every run was cut off");
            lost += 1;
        } else {
            job.release();
            schema::save(&tx, seq, &job)?;
            tx.execute("UPDATE jobs SET suspect = 1 WHERE seq = ?1", params![seq])?;
            requeued += 1;
        }
    }
    let stats = count_stats(&tx)?;
    let queued = {
        // Suspects stay suspects until a run of theirs ends (a kill or a deploy before they ran
        // alone does not clear them).
        let mut stmt = tx.prepare("SELECT id, kind, seq, weight, suspect FROM jobs WHERE status = 0 ORDER BY seq")?;
        let rows = stmt.query_map([], |r| {
            Ok(Waiting {
                id: JobId::from_bytes(r.get(0)?),
                kind: schema::kind_of(r.get(1)?)?,
                seq: r.get(2)?,
                weight: r.get::<_, i64>(3)? as usize,
                payload: None,
                job: None,
                suspect: r.get(4)?,
            })
        })?;
        rows.collect::<rusqlite::Result<Vec<_>>>()?
    };
    tx.commit()?;
    Ok(Recovered { queued, stats, requeued, lost })
}

impl JobStore for SqliteStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities { keeps_jobs: true, shared: false, counts_owners: false }
    }

    fn set_events(&self, events: Arc<dyn super::StoreEvents>) {
        *self.shared.events.lock().unwrap_or_else(|p| p.into_inner()) = Some(events);
    }

    fn insert(&self, jobs: Vec<NewJob>, key: Option<IdempotencyKey>) -> Pending<Inserted> {
        self.send(|reply| Op::Insert { jobs, key, reply })
    }

    fn claim(&self, kind: JobKind) -> Option<Pending<Option<Claimed>>> {
        let waiting = self.shared.with_state(|s| s.pop_queued(kind))?;
        Some(self.take(waiting))
    }

    fn claim_suspect(&self) -> Option<Pending<Option<Claimed>>> {
        let waiting = self.shared.with_state(|s| s.pop_suspect())?;
        Some(self.take(waiting))
    }

    fn start(&self, id: JobId, attempt: u32, at: SystemTime) -> Pending<bool> {
        // No write: the start log has it for a crash, the final write records `started_at`.
        let started = self.shared.with_state(|s| {
            let started = s.start_claimed(id, attempt);
            if started {
                // Under the state lock: an end settled meanwhile cannot leave a live entry behind.
                let mut live = self.shared.progress.lock().unwrap_or_else(|p| p.into_inner());
                let entry = live.entry(id).or_default();
                entry.started = Some(at);
                entry.attempt = attempt;
            }
            started
        });
        ready(Ok(started))
    }

    fn finish(&self, id: JobId, attempt: u32, outcome: Final) -> Pending<Option<Job>> {
        self.send(|reply| Op::Finish { id, attempt, outcome, reply })
    }

    fn cancel(&self, id: JobId, reason: ErrorBody) -> Pending<CancelOutcome> {
        self.send(|reply| Op::Cancel { id, reason, reply })
    }

    fn release(&self, id: JobId, attempt: u32) -> Pending<bool> {
        self.send(|reply| Op::Release { id, attempt, reply })
    }

    fn expire(&self, now: SystemTime) -> Pending<usize> {
        self.send(|reply| Op::Expire { now, reply })
    }

    fn close(&self) -> Pending<()> {
        self.send(|reply| Op::Close { reply })
    }

    fn webhook_done(&self, id: JobId) {
        let _ = self.ops.send(Op::WebhookDone { id });
    }

    fn owed_webhooks(&self) -> Result<Vec<OwedWebhook>, StoreError> {
        self.read(|conn| {
            // Rows written before the owner was kept with them take their job's.
            let mut stmt = conn.prepare(
                "SELECT w.job_id, w.url, w.body, coalesce(w.owner, j.owner) FROM webhooks w \
                 LEFT JOIN jobs j ON j.id = w.job_id ORDER BY w.id",
            )?;
            let rows = stmt.query_map([], |r| {
                let owner = r.get::<_, Option<[u8; 16]>>(3)?.map(Owner::from_bytes);
                Ok((JobId::from_bytes(r.get(0)?), r.get::<_, String>(1)?, r.get::<_, Vec<u8>>(2)?, owner))
            })?;
            let mut owed = Vec::new();
            for row in rows {
                let (job, url, body, owner) = row?;
                match CallbackUrl::parse(&url, CallbackPolicy { allow_private: true }) {
                    Ok(url) => owed.push(OwedWebhook { job, owner, url, body: Bytes::from(body) }),
                    Err(e) => tracing::warn!(%job, "stored webhook URL unusable: {}", e.message),
                }
            }
            Ok(owed)
        })
    }

    fn start_hook(&self) -> Option<crate::kind::context::StartHook> {
        let log = self.start_log.clone();
        Some(Arc::new(move |id, attempt| log.mark(id, attempt)))
    }

    fn progress(&self, id: JobId, fraction: f32, stage: Option<String>) {
        let mut live = self.shared.progress.lock().unwrap_or_else(|p| p.into_inner());
        let entry = live.entry(id).or_default();
        if fraction.is_finite() && fraction > entry.fraction {
            entry.fraction = fraction;
        }
        if stage.is_some() {
            entry.stage = stage;
        }
    }

    fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let found = self.read(|conn| schema::load(conn, id))?;
        Ok(found.map(|(_, job)| self.shared.live(job)))
    }

    fn list(&self, filter: &ListFilter) -> Result<Vec<Job>, StoreError> {
        let started: Vec<JobId> = self.shared.with_state(|s| s.started.keys().copied().collect());
        if filter.status == Some(JobStatus::Running) {
            // Running is known in memory (on disk a started job is still `queued`).
            let mut jobs = Vec::new();
            for id in started {
                if let Some(job) = self.get(id)?.filter(|j| j.status == JobStatus::Running) {
                    jobs.push(job);
                }
            }
            jobs.retain(|j| filter.kind.is_none_or(|k| j.kind == k));
            jobs.retain(|j| filter.owner.is_none_or(|o| j.owner == Some(o)));
            jobs.sort_by_key(|j| std::cmp::Reverse(j.created_at));
            jobs.truncate(filter.limit);
            return Ok(jobs);
        }
        let mut sql = format!("SELECT {} FROM jobs", schema::JOB_COLUMNS);
        let mut clauses = Vec::new();
        if let Some(s) = filter.status {
            clauses.push(format!("status = {}", schema::status_code(s)));
        }
        if let Some(k) = filter.kind {
            // Kind names are letters, digits, `-` and `_` (checked when named): safe as a literal.
            clauses.push(format!("kind = '{}'", k.as_str()));
        }
        if filter.owner.is_some() {
            clauses.push("owner = ?2".to_string());
        }
        if !clauses.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&clauses.join(" AND "));
        }
        sql.push_str(" ORDER BY seq DESC LIMIT ?1");
        // Queued on disk includes the started ones: read enough to drop them.
        let extra = if filter.status == Some(JobStatus::Queued) { started.len() } else { 0 };
        let jobs = self.read(|conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let limit = (filter.limit + extra) as i64;
            let rows = match filter.owner {
                Some(owner) => stmt.query_map(params![limit, owner.to_bytes()], schema::job_from_row)?,
                None => stmt.query_map(params![limit], schema::job_from_row)?,
            };
            rows.map(|r| r.map(|(_, job)| job)).collect::<rusqlite::Result<Vec<_>>>()
        })?;
        let mut jobs: Vec<Job> = jobs.into_iter().map(|j| self.shared.live(j)).collect();
        jobs.retain(|j| filter.status.is_none_or(|s| j.status == s));
        jobs.truncate(filter.limit);
        Ok(jobs)
    }

    fn result(&self, id: JobId) -> Result<Option<(ResultMeta, ResultBody)>, StoreError> {
        let found = self.read(|conn| {
            let Some((seq, job)) = schema::load(conn, id)? else { return Ok(None) };
            let Some(meta) = job.result.filter(|_| job.status == JobStatus::Succeeded) else { return Ok(None) };
            let len: Option<i64> = conn
                .prepare_cached("SELECT length(bytes) FROM results WHERE seq = ?1")?
                .query_row(params![seq], |r| r.get(0))
                .optional()?;
            let Some(len) = len.map(|l| l as usize) else { return Ok(None) };
            if len > STREAM_ABOVE {
                return Ok(Some((meta, seq, len, None)));
            }
            let bytes: Vec<u8> = conn
                .prepare_cached("SELECT bytes FROM results WHERE seq = ?1")?
                .query_row(params![seq], |r| r.get(0))?;
            Ok(Some((meta, seq, len, Some(Bytes::from(bytes)))))
        })?;
        Ok(found.map(|(meta, seq, len, whole)| {
            let body = match whole {
                Some(bytes) => ResultBody::Whole(bytes),
                None => ResultBody::Stream { len, reader: Box::new(BlobReader { readers: self.readers.clone(), seq }) },
            };
            (meta, body)
        }))
    }

    fn replay(&self, key: &IdempotencyKey) -> Result<Option<Vec<Job>>, StoreError> {
        let known = self.read(|conn| {
            let row: Option<(Vec<u8>, Vec<u8>)> = conn
                .prepare_cached("SELECT fingerprint, ids FROM idempotency WHERE key = ?1")?
                .query_row(params![key.key], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((print, ids)) = row else { return Ok(None) };
            if print != key.fingerprint {
                return Ok(Some(Err(StoreError::KeyReused)));
            }
            let mut jobs = Vec::new();
            for id in schema::unpack_ids(&ids) {
                if let Some((_, job)) = schema::load(conn, id)? {
                    jobs.push(job);
                }
            }
            Ok(Some(Ok(jobs)))
        })?;
        match known {
            None => Ok(None),
            Some(Err(e)) => Err(e),
            // The jobs were deleted between the two reads: the key goes with them.
            Some(Ok(jobs)) if jobs.is_empty() => Ok(None),
            Some(Ok(jobs)) => Ok(Some(jobs.into_iter().map(|j| self.shared.live(j)).collect())),
        }
    }

    fn stats(&self) -> StoreStats {
        self.shared.stats()
    }

    fn pending_by_owner(&self) -> Result<HashMap<Owner, usize>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT owner, count(*) FROM jobs WHERE owner IS NOT NULL AND status IN (0, 1) GROUP BY owner",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, [u8; 16]>(0)?, r.get::<_, i64>(1)?)))?;
            let mut pending = HashMap::new();
            for row in rows {
                let (owner, n) = row?;
                pending.insert(Owner::from_bytes(owner), n as usize);
            }
            Ok(pending)
        })
    }

    fn counts(&self, owner: Owner) -> Result<StatusCounts, StoreError> {
        let mut counts = StatusCounts::default();
        self.read(|conn| {
            let mut stmt = conn.prepare_cached("SELECT status, count(*) FROM jobs WHERE owner = ?1 GROUP BY status")?;
            let rows = stmt.query_map(params![owner.to_bytes()], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (code, n) = row?;
                *counts.slot(schema::status_of(code)?) += n as usize;
            }
            Ok(())
        })?;
        // On disk a started job is still queued; the running ones are known in memory.
        let started: Vec<JobId> = self.shared.with_state(|s| s.started.keys().copied().collect());
        for id in started {
            if self.get(id)?.is_some_and(|j| j.owner == Some(owner) && j.status == JobStatus::Running) {
                counts.moved(JobStatus::Queued, JobStatus::Running);
            }
        }
        Ok(counts)
    }

    fn health(&self) -> Result<(), StoreError> {
        self.shared.health()
    }
}

#[cfg(test)]
mod tests {
    use futures::executor::block_on;

    use super::*;
    use crate::domain::PayloadRecord;

    fn options(dir: &Path) -> SqliteOptions {
        SqliteOptions {
            dir: dir.to_path_buf(),
            sync: SyncMode::Normal,
            max_attempts: 2,
            ttl: Duration::from_secs(3600),
            result_bytes: 1 << 20,
        }
    }

    /// A directory removed when the test ends.
    fn temp_dir(name: &str) -> tempfile::TempDir {
        tempfile::Builder::new().prefix(&format!("offload-store-{name}-")).tempdir().unwrap()
    }

    fn new_job() -> NewJob {
        let record = PayloadRecord { spec: b"stored".to_vec(), data: None };
        let job = Job::new(JobId::random(), JobKind::named("pdf").unwrap(), SystemTime::now());
        NewJob { job, payload: Input::new(()), record, weight: 10 }
    }

    fn meta() -> ResultMeta {
        ResultMeta {
            content_type: "application/pdf".into(),
            bytes: 3,
            filename: "r.pdf".into(),
            extra: Default::default(),
        }
    }

    #[test]
    fn a_second_open_of_the_same_directory_is_refused() {
        let dir = temp_dir("lock");
        let _first = SqliteStore::open(&options(dir.path()), Default::default()).unwrap();
        let err = SqliteStore::open(&options(dir.path()), Default::default()).err().expect("refused");
        assert!(err.contains("in use"), "{err}");
    }

    #[test]
    fn jobs_results_and_attempts_survive_a_reopen_and_runs_cut_off_are_counted() {
        let dir = temp_dir("reopen");
        let (done, cut, waiting) = {
            let store = SqliteStore::open(&options(dir.path()), Default::default()).unwrap();
            let Inserted::Created(jobs) = block_on(store.insert(vec![new_job(), new_job(), new_job()], None)).unwrap()
            else {
                panic!("created")
            };
            let first = block_on(store.claim(JobKind::named("pdf").unwrap()).unwrap()).unwrap().unwrap().job;
            assert_eq!(first.id, jobs[0].id, "oldest first");
            assert!(block_on(store.start(first.id, first.attempts, SystemTime::now())).unwrap());
            let outcome = Final::Succeeded { meta: meta(), bytes: Bytes::from_static(b"pdf") };
            let stale = block_on(store.finish(first.id, first.attempts + 1, Final::Failed(ErrorBody::new("x", "y"))));
            assert!(stale.unwrap().is_none(), "fenced on the attempt");
            let ended = block_on(store.finish(first.id, first.attempts, outcome)).unwrap().unwrap();
            // Claimed and started on a worker thread, its start not written yet: counted.
            let second = block_on(store.claim(JobKind::named("pdf").unwrap()).unwrap()).unwrap().unwrap().job;
            store.start_hook().expect("a start hook")(second.id, second.attempts);
            // Claimed, waiting in a pool's mailbox: not started, not counted.
            let third = block_on(store.claim(JobKind::named("pdf").unwrap()).unwrap()).unwrap().unwrap().job;
            (ended, second.id, third.id)
            // Dropped here with both claimed, as a crash would leave them.
        };
        let store = loop {
            // The lock goes with the file handle; the writer thread may still hold a connection.
            match SqliteStore::open(&options(dir.path()), Default::default()) {
                Ok(s) => break s,
                Err(e) if e.contains("in use") => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        };
        let again = store.get(done.id).unwrap().unwrap();
        assert_eq!((again.status, again.attempts), (JobStatus::Succeeded, 1));
        let shown = |j: &Job| j.finished_at.map(crate::job::rfc3339);
        assert_eq!(shown(&again), shown(&done), "finished_at as the API shows it");
        assert!(matches!(store.result(done.id).unwrap().unwrap().1, ResultBody::Whole(b) if b == "pdf"));
        let requeued = store.get(cut).unwrap().unwrap();
        assert_eq!((requeued.status, requeued.attempts), (JobStatus::Queued, 1));
        let never_started = store.get(waiting).unwrap().unwrap();
        assert_eq!((never_started.status, never_started.attempts), (JobStatus::Queued, 0));
        assert_eq!(store.stats().suspects, 1, "the run cut off is a suspect");
        let claimed = block_on(store.claim(JobKind::named("pdf").unwrap()).unwrap()).unwrap().unwrap();
        assert_eq!(claimed.job.id, waiting, "suspects are not claimed with the others");
        assert!(store.claim(JobKind::named("pdf").unwrap()).is_none());
        let claimed = block_on(store.claim_suspect().unwrap()).unwrap().unwrap();
        assert_eq!((claimed.job.id, claimed.job.attempts), (cut, 2));
        assert_eq!(store.stats().suspects, 0);
        assert!(matches!(claimed.work, Work::Stored(ref r) if r.spec == b"stored"), "read back as stored, not decoded");
    }

    #[test]
    fn a_database_from_a_newer_release_is_refused() {
        let dir = temp_dir("newer");
        drop(SqliteStore::open(&options(dir.path()), Default::default()).unwrap());
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.pragma_update(None, "user_version", schema::SCHEMA_VERSION + 1).unwrap();
        drop(conn);
        let err = loop {
            match SqliteStore::open(&options(dir.path()), Default::default()) {
                Err(e) if e.contains("in use") => std::thread::yield_now(),
                Err(e) => break e,
                Ok(_) => panic!("a newer schema was opened"),
            }
        };
        assert!(err.contains("newer than this binary"), "{err}");
    }

    #[test]
    fn idempotency_keys_replay_and_refuse_another_request() {
        let dir = temp_dir("idem");
        let store = SqliteStore::open(&options(dir.path()), Default::default()).unwrap();
        let key = IdempotencyKey { key: "abc".into(), fingerprint: [7; 32] };
        let Inserted::Created(first) = block_on(store.insert(vec![new_job()], Some(key.clone()))).unwrap() else {
            panic!("created")
        };
        let again = block_on(store.insert(vec![new_job()], Some(key.clone()))).unwrap();
        assert!(matches!(again, Inserted::Replayed(ref j) if j[0].id == first[0].id));
        let other = IdempotencyKey { key: "abc".into(), fingerprint: [8; 32] };
        assert_eq!(block_on(store.insert(vec![new_job()], Some(other.clone()))).unwrap_err(), StoreError::KeyReused);
        assert_eq!(store.replay(&other).unwrap_err(), StoreError::KeyReused);
        assert_eq!(store.stats().by_status.queued, 1);
    }
}
