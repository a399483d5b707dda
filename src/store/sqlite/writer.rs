//! The one writer thread and its group commit: it takes a write, drains whatever else is waiting
//! (up to a batch limit), applies them all in one `BEGIN IMMEDIATE` transaction, commits once (one
//! fsync), and only then changes the in-memory queue and counters and answers every waiter. When
//! the commit fails (disk full, I/O error) nothing of the batch happened: every waiter gets
//! `Unavailable`, and the store reports unhealthy until a write succeeds again (a probe write runs
//! every second meanwhile, so it recovers with no traffic too).

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::oneshot;

use super::schema::{self, micros};
use super::{Shared, Waiting};
use crate::error::ErrorBody;
use crate::job::{Job, JobId, JobStatus, Owner};
use crate::kind::Work;
use crate::store::{
    apply_final, result_too_large, CancelOutcome, Claimed, Final, IdempotencyKey, Inserted, NewJob, StoreError,
};

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A write waiting for the writer thread.
pub enum Op {
    Insert {
        jobs: Vec<NewJob>,
        key: Option<IdempotencyKey>,
        reply: Reply<Inserted>,
    },
    Claim {
        waiting: Box<Waiting>,
        reply: Reply<Option<Claimed>>,
    },
    Finish {
        id: JobId,
        attempt: u32,
        outcome: Final,
        reply: Reply<Option<Job>>,
    },
    Cancel {
        id: JobId,
        reason: ErrorBody,
        reply: Reply<CancelOutcome>,
    },
    Release {
        id: JobId,
        attempt: u32,
        reply: Reply<bool>,
    },
    Expire {
        now: SystemTime,
        reply: Reply<usize>,
    },
    WebhookDone {
        id: JobId,
    },
    /// Checkpoint and empty the WAL (a clean exit).
    Close {
        reply: Reply<()>,
    },
}

/// Most writes in one transaction, and most payload bytes (a large upload commits nearly alone).
const MAX_BATCH: usize = 1024;
const MAX_BATCH_BYTES: usize = 32 << 20;
/// A batch smaller than this waits up to [`LINGER`] once for more writes.
const LINGER_BELOW: usize = 8;
const LINGER: Duration = Duration::from_micros(200);
/// Expired jobs deleted per sweep transaction (keeps each short).
const EXPIRE_BATCH: i64 = 2000;

impl Op {
    fn bytes(&self) -> usize {
        match self {
            Op::Insert { jobs, .. } => jobs.iter().map(|j| j.weight).sum(),
            Op::Finish { outcome: Final::Succeeded { bytes, .. }, .. } => bytes.len(),
            _ => 64,
        }
    }
}

/// What to do once the batch's fate is known.
enum Done {
    Insert { reply: Reply<Inserted>, outcome: Result<Inserted, StoreError>, queued: Vec<(JobId, Waiting)> },
    Claim { reply: Reply<Option<Claimed>>, took: Took },
    Finish { reply: Reply<Option<Job>>, ended: Option<(Job, usize)>, evicted: Evicted },
    Cancel { reply: Reply<CancelOutcome>, outcome: CancelOutcome },
    Release { reply: Reply<bool>, released: Option<(JobId, Waiting)> },
    Expire { reply: Reply<usize>, evicted: Evicted },
    Closed { reply: Reply<()> },
    Nothing,
}

/// What a claim did with the job it took from the in-memory queue.
enum Took {
    Claimed(Box<(Claimed, Waiting)>),
    /// Not claimable after all (cancelled or gone).
    Skipped(Waiting),
    /// Failed: its stored payload is unreadable.
    Failed(Waiting),
}

/// Claims `waiting` (already taken from the in-memory queue by the caller) when its job or
/// payload must be read from disk first (jobs from before this start): attempt + 1, in memory
/// (nothing is written; see [`super::StartLog`]).
fn claim(tx: &Connection, mut waiting: Waiting) -> rusqlite::Result<Took> {
    let seq = waiting.seq;
    let Some(mut job) = schema::load_seq(tx, seq)?.filter(|j| j.id == waiting.id) else {
        return Ok(Took::Skipped(waiting));
    };
    if !job.claim() {
        return Ok(Took::Skipped(waiting));
    }
    let work = match waiting.payload.take() {
        Some(input) => Ok(Work::Ready(input)),
        None => load_payload(tx, seq)?,
    };
    match work {
        Ok(work) => Ok(Took::Claimed(Box::new((Claimed { job, work }, waiting)))),
        Err(message) => {
            tracing::error!(job = %waiting.id, "stored payload unreadable: {message}");
            job.fail(ErrorBody::new("payload_unreadable", message), SystemTime::now());
            end(tx, seq, &job)?;
            Ok(Took::Failed(waiting))
        }
    }
}

/// Finished jobs deleted (by TTL or for room): their statuses and result bytes.
#[derive(Default)]
struct Evicted {
    statuses: Vec<JobStatus>,
    result_bytes: usize,
}

/// A recovery that could not commit at start (disk full): the writer retries it every
/// [`RETRY_RECOVERY`], refusing every write meanwhile.
pub struct PendingRecovery {
    pub max_attempts: u32,
    /// What the start log named (kept until recovery commits).
    pub started: super::Starts,
    pub start_log: Arc<super::StartLog>,
}

const RETRY_RECOVERY: Duration = Duration::from_secs(1);

/// Tries a pending recovery again; `true` once it committed (the queue and counts installed).
fn retry_recovery(conn: &mut Connection, shared: &Shared, pending: &PendingRecovery) -> bool {
    let tried = shared
        .check_writable()
        .and_then(|()| super::recover(conn, pending.max_attempts, &pending.started).map_err(|e| e.to_string()));
    match tried {
        Ok(recovered) => {
            tracing::info!(
                requeued = recovered.requeued,
                lost = recovered.lost,
                "recovery finished; writes succeed again"
            );
            shared.install(recovered);
            if let Err(e) = pending.start_log.clear() {
                tracing::warn!("cannot clear the start log: {e}");
            }
            shared.set_health(None);
            shared.wake();
            true
        }
        Err(message) => {
            tracing::debug!("recovery still waits for the disk: {message}");
            shared.set_health(Some(format!("recovery after the last stop waits for the disk: {message}")));
            false
        }
    }
}

pub fn run(mut conn: Connection, ops: Receiver<Op>, shared: Arc<Shared>, mut pending: Option<PendingRecovery>) {
    let mut last_try = std::time::Instant::now();
    loop {
        if let Some(p) = &pending {
            if last_try.elapsed() >= RETRY_RECOVERY {
                last_try = std::time::Instant::now();
                if retry_recovery(&mut conn, &shared, p) {
                    pending = None;
                }
            }
        }
        let first = match ops.recv_timeout(Duration::from_secs(1)) {
            Ok(op) => op,
            Err(RecvTimeoutError::Timeout) => {
                if pending.is_none() && shared.health().is_err() {
                    probe(&mut conn, &shared);
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if pending.is_some() {
            // Nothing is written before recovery: the queue it rebuilds is not there yet.
            let message = "recovery after the last stop waits for the disk; nothing was written";
            abandon(first, &shared, message);
            while let Ok(op) = ops.try_recv() {
                abandon(op, &shared, message);
            }
            continue;
        }
        let mut batch_bytes = first.bytes();
        let mut batch = vec![first];
        let mut lingered = false;
        while batch.len() < MAX_BATCH && batch_bytes < MAX_BATCH_BYTES {
            let next = match ops.try_recv() {
                Ok(op) => Some(op),
                // A small batch waits once, briefly, for company: every commit rewrites the
                // pages it touches (the B-tree's edge, its parents) into the WAL, so a few more
                // writes per commit cost far less than a commit each.
                Err(_) if !lingered && batch.len() < LINGER_BELOW => {
                    lingered = true;
                    ops.recv_timeout(LINGER).ok()
                }
                Err(_) => None,
            };
            match next {
                Some(op) => {
                    batch_bytes += op.bytes();
                    batch.push(op);
                }
                None => break,
            }
        }
        if let [Op::Close { .. }] = batch.as_slice() {
            if let Some(Op::Close { reply }) = batch.pop() {
                let done = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
                let _ = reply.send(done.map_err(|e| StoreError::Unavailable(e.to_string())));
            }
            continue;
        }
        // A bug in one write must not stop every later one: the batch is rolled back (the
        // transaction's drop) and its waiters see their answers dropped (`Unavailable`).
        let committed =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| commit_batch(&mut conn, batch, &shared)));
        if let Err(panic) = committed {
            let message = crate::process::panic_message(panic.as_ref()).to_string();
            tracing::error!("store writer panicked; the batch was not kept: {message}");
        }
        if shared.restart_wal.swap(false, std::sync::atomic::Ordering::Relaxed) {
            restart_wal(&conn);
        }
    }
}

fn commit_batch(conn: &mut Connection, batch: Vec<Op>, shared: &Shared) {
    let began = std::time::Instant::now();
    shared.metrics.store_batch.observe(batch.len() as f64);
    let mut done = Vec::with_capacity(batch.len());
    let mut ops = batch.into_iter();
    // Err((message, whether the batch may have been kept)).
    let result = (|| -> Result<(), (String, bool)> {
        shared.check_writable().map_err(|m| (m, false))?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| (e.to_string(), false))?;
        for op in ops.by_ref() {
            // A claim carries a job taken out of the in-memory queue: if its write goes wrong in
            // any way, panics included, the job goes back.
            let rescue = op.claimed_waiting();
            let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| apply(&tx, op, shared)));
            let error = match applied {
                Ok(Ok(d)) => {
                    done.push(d);
                    continue;
                }
                Ok(Err(e)) => e.to_string(),
                Err(panic) => format!("a write panicked: {}", crate::process::panic_message(panic.as_ref())),
            };
            if let Some(w) = rescue {
                shared.with_state(|s| s.put_back(w));
            }
            return Err((error, false));
        }
        tx.commit().map_err(|e| (e.to_string(), commit_may_have_kept(&e)))
    })();
    match result {
        Ok(()) => {
            shared.metrics.store_commit.observe(began.elapsed().as_secs_f64());
            shared.set_health(None);
            for d in done {
                complete(d, shared);
            }
        }
        Err((message, uncertain)) => {
            if uncertain {
                tracing::error!(
                    "store commit failed; the batch may still be on disk (a restart before the next commit \
                     may replay it): {message}"
                );
            } else {
                tracing::error!("store write failed, nothing of the batch was kept: {message}");
            }
            shared.metrics.store_write_errors.inc();
            shared.set_health(Some(message.clone()));
            for d in done {
                fail(d, shared, &message, uncertain);
            }
            // Writes not applied yet: answered too, and their claimed jobs queued again.
            for op in ops {
                abandon(op, shared, &message);
            }
        }
    }
}

/// Whether a failed commit may still have reached the disk. In WAL mode the commit writes the
/// batch's frames, its commit frame last, then fsyncs: a full disk stops the writes before the
/// commit frame is whole (nothing can be replayed), but after an I/O error, a failed fsync above
/// all, every frame may be in the file, and a restart before the next commit (which would
/// overwrite them) replays them.
fn commit_may_have_kept(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::SystemIoFailure)
}

impl Op {
    /// The queue entry a claim took, rebuilt without its payload (read again from disk).
    fn claimed_waiting(&self) -> Option<Waiting> {
        match self {
            Op::Claim { waiting: w, .. } => Some(Waiting {
                id: w.id,
                kind: w.kind,
                seq: w.seq,
                weight: w.weight,
                payload: None,
                job: None,
                suspect: w.suspect,
            }),
            _ => None,
        }
    }
}

/// A write the batch did not get to: its job (a claim's) goes back to the queue, its waiter
/// hears `Unavailable`.
fn abandon(op: Op, shared: &Shared, message: &str) {
    let error = || StoreError::Unavailable(message.to_string());
    match op {
        Op::Claim { waiting, reply } => {
            shared.with_state(|s| s.put_back(*waiting));
            let _ = reply.send(Err(error()));
        }
        Op::Insert { reply, .. } => drop(reply.send(Err(error()))),
        Op::Release { reply, .. } => drop(reply.send(Err(error()))),
        Op::Finish { reply, .. } => drop(reply.send(Err(error()))),
        Op::Cancel { reply, .. } => drop(reply.send(Err(error()))),
        Op::Expire { reply, .. } => drop(reply.send(Err(error()))),
        Op::WebhookDone { .. } => {}
        Op::Close { reply } => drop(reply.send(Err(error()))),
    }
}

/// Copies what is left of the WAL back and makes the next write start it from the beginning
/// (the checkpointer has copied most of it already, so this is short). Waits for readers still
/// on an old snapshot (their reads are short) within the busy timeout.
fn restart_wal(conn: &Connection) {
    let began = std::time::Instant::now();
    match conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))) {
        Ok((busy, frames)) => {
            let ms = began.elapsed().as_secs_f64() * 1000.0;
            tracing::debug!(busy, frames, ms, "WAL restarted");
        }
        Err(e) => tracing::warn!("WAL restart failed: {e}"),
    }
}

/// A write with no effect, to learn whether the disk takes writes again.
fn probe(conn: &mut Connection, shared: &Shared) {
    let result = shared.check_writable().and_then(|()| {
        conn.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('probe', ?1)", params![micros(SystemTime::now())])
            .map(drop)
            .map_err(|e| e.to_string())
    });
    if result.is_ok() {
        tracing::info!("store writes succeed again");
    }
    shared.set_health(result.err());
}

fn apply(tx: &Connection, op: Op, shared: &Shared) -> rusqlite::Result<Done> {
    let now = SystemTime::now();
    Ok(match op {
        Op::Insert { jobs, key, reply } => {
            if let Some(k) = &key {
                let known: Option<(Vec<u8>, Vec<u8>)> = tx
                    .prepare_cached("SELECT fingerprint, ids FROM idempotency WHERE key = ?1")?
                    .query_row(params![k.key], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                if let Some((print, ids)) = known {
                    let outcome = if print == k.fingerprint {
                        let jobs = schema::unpack_ids(&ids)
                            .into_iter()
                            .filter_map(|id| schema::load(tx, id).transpose())
                            .map(|r| r.map(|(_, job)| shared.live(job)))
                            .collect::<rusqlite::Result<Vec<_>>>()?;
                        Ok(Inserted::Replayed(jobs))
                    } else {
                        Err(StoreError::KeyReused)
                    };
                    return Ok(Done::Insert { reply, outcome, queued: Vec::new() });
                }
            }
            let mut created = Vec::with_capacity(jobs.len());
            let mut queued = Vec::with_capacity(jobs.len());
            let mut first_seq = None;
            for new in jobs {
                let seq = schema::insert(tx, &new.job, new.weight)?;
                first_seq.get_or_insert(seq);
                tx.prepare_cached("INSERT INTO payloads (seq, spec, data) VALUES (?1, ?2, ?3)")?.execute(params![
                    seq,
                    new.record.spec,
                    new.record.data.as_deref()
                ])?;
                let waiting = Waiting {
                    id: new.job.id,
                    kind: new.job.kind,
                    seq,
                    weight: new.weight,
                    payload: Some(new.payload),
                    job: Some(new.job.clone()),
                    suspect: false,
                };
                queued.push((new.job.id, waiting));
                created.push(new.job);
            }
            if let (Some(k), Some(first_seq)) = (&key, first_seq) {
                tx.prepare_cached(
                    "INSERT INTO idempotency (key, fingerprint, first_seq, ids) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![
                    k.key,
                    k.fingerprint.as_slice(),
                    first_seq,
                    schema::pack_ids(created.iter().map(|j| j.id))
                ])?;
            }
            Done::Insert { reply, outcome: Ok(Inserted::Created(created)), queued }
        }
        // On an error the batch's caller queues the job again (see `commit_batch`).
        Op::Claim { waiting, reply } => Done::Claim { reply, took: claim(tx, *waiting)? },
        Op::Finish { id, attempt, outcome, reply } => {
            let Some((seq, mut job)) = held(tx, shared, id, attempt)? else {
                return Ok(Done::Finish { reply, ended: None, evicted: Evicted::default() });
            };
            // With its live state: its start (not written on its own) and the last progress a
            // failed or cancelled job keeps.
            job = shared.live(job);
            let mut evicted = Evicted::default();
            let budget = shared.result_budget;
            let (outcome, stored) = match outcome {
                Final::Succeeded { bytes, .. } if bytes.len() > budget => {
                    (Final::Failed(result_too_large(bytes.len(), budget)), None)
                }
                Final::Succeeded { meta, bytes } => {
                    evicted = make_room(tx, shared, bytes.len())?;
                    (Final::Succeeded { meta, bytes: Bytes::new() }, Some(bytes))
                }
                other => (other, None),
            };
            if !apply_final(&mut job, outcome, now) {
                return Ok(Done::Finish { reply, ended: None, evicted });
            }
            let result_len = stored.as_ref().map_or(0, Bytes::len);
            if let Some(bytes) = stored {
                tx.prepare_cached("INSERT OR REPLACE INTO results (seq, bytes) VALUES (?1, ?2)")?
                    .execute(params![seq, bytes.as_ref()])?;
            }
            end(tx, seq, &job)?;
            Done::Finish { reply, ended: Some((job, result_len)), evicted }
        }
        Op::Cancel { id, reason, reply } => {
            let Some((seq, mut job)) = schema::load(tx, id)? else {
                return Ok(Done::Cancel { reply, outcome: CancelOutcome::Unknown });
            };
            // With its live state (started, progress); counts move when the batch commits.
            job = shared.live(job);
            if !apply_final(&mut job, Final::Cancelled(Some(reason)), now) {
                return Ok(Done::Cancel { reply, outcome: CancelOutcome::Finished(job) });
            }
            end(tx, seq, &job)?;
            Done::Cancel { reply, outcome: CancelOutcome::Cancelled(job) }
        }
        Op::Release { id, attempt, reply } => {
            let Some((seq, mut job)) = held(tx, shared, id, attempt)? else {
                return Ok(Done::Release { reply, released: None });
            };
            // With its live state: a started job carries its attempt (counted), one that never
            // started keeps the attempts on disk.
            job = shared.live(job);
            job.release();
            schema::save(tx, seq, &job)?;
            let (weight, suspect): (i64, bool) = tx
                .prepare_cached("SELECT weight, suspect FROM jobs WHERE seq = ?1")?
                .query_row(params![seq], |r| Ok((r.get(0)?, r.get(1)?)))?;
            let waiting =
                Waiting { id, kind: job.kind, seq, weight: weight as usize, payload: None, job: None, suspect };
            Done::Release { reply, released: Some((id, waiting)) }
        }
        Op::Expire { now, reply } => {
            let cutoff = micros(now).saturating_sub(shared.ttl.as_micros() as i64);
            let rows: Vec<(i64, i64, Option<i64>)> = tx
                .prepare_cached(
                    "SELECT seq, status, result_bytes FROM jobs WHERE finished_at IS NOT NULL AND finished_at <= ?1 \
                     ORDER BY finished_at LIMIT ?2",
                )?
                .query_map(params![cutoff, EXPIRE_BATCH], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<_>>()?;
            let mut evicted = Evicted::default();
            for (seq, status, bytes) in rows {
                schema::delete(tx, seq)?;
                evicted.note(status, bytes);
            }
            Done::Expire { reply, evicted }
        }
        Op::WebhookDone { id } => {
            tx.prepare_cached("DELETE FROM webhooks WHERE job_id = ?1")?.execute(params![id.to_bytes()])?;
            Done::Nothing
        }
        // Batched with other writes (it normally comes alone): answered after their commit.
        Op::Close { reply } => Done::Closed { reply },
    })
}

impl Evicted {
    fn note(&mut self, status: i64, result_bytes: Option<i64>) {
        let status = match status {
            2 => JobStatus::Succeeded,
            3 => JobStatus::Failed,
            _ => JobStatus::Cancelled,
        };
        self.statuses.push(status);
        self.result_bytes += result_bytes.unwrap_or(0).max(0) as usize;
    }
}

/// The job, if this process holds it (claimed, not ended) with this attempt: the
/// fence every write about a run goes through.
fn held(tx: &Connection, shared: &Shared, id: JobId, attempt: u32) -> rusqlite::Result<Option<(i64, Job)>> {
    // The data directory is this process's alone (locked): what it holds, and with which
    // attempt, is known in memory.
    if shared.with_state(|s| s.held_attempt(id)) != Some(attempt) {
        return Ok(None);
    }
    let Some((seq, job)) = schema::load(tx, id)? else { return Ok(None) };
    Ok((!job.status.is_terminal()).then_some((seq, job)))
}

/// Writes a job's final state: the row, no more payload, the webhook owed if it has a callback.
pub fn end(tx: &Connection, seq: i64, job: &Job) -> rusqlite::Result<()> {
    schema::save(tx, seq, job)?;
    tx.prepare_cached("DELETE FROM payloads WHERE seq = ?1")?.execute(params![seq])?;
    if let Some(url) = &job.callback {
        let body = serde_json::to_vec(&job.view()).unwrap_or_default();
        tx.prepare_cached("INSERT OR REPLACE INTO webhooks (job_id, url, body, owner) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![job.id.to_bytes(), url.as_str(), body, job.owner.map(Owner::to_bytes)])?;
    }
    Ok(())
}

/// Deletes the oldest finished jobs until `extra` more result bytes fit the budget.
fn make_room(tx: &Connection, shared: &Shared, extra: usize) -> rusqlite::Result<Evicted> {
    let mut evicted = Evicted::default();
    let held = shared.stats().result_bytes;
    let over = |evicted: &Evicted| held.saturating_sub(evicted.result_bytes) + extra > shared.result_budget;
    while over(&evicted) {
        let rows: Vec<(i64, i64, Option<i64>)> = tx
            .prepare_cached(
                "SELECT seq, status, result_bytes FROM jobs WHERE finished_at IS NOT NULL ORDER BY finished_at LIMIT 64",
            )?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        if rows.is_empty() {
            break;
        }
        // One at a time, oldest first, and no more than makes room.
        for (seq, status, bytes) in rows {
            schema::delete(tx, seq)?;
            evicted.note(status, bytes);
            if !over(&evicted) {
                break;
            }
        }
    }
    Ok(evicted)
}

/// A job's stored payload, as stored: its kind reads it back on the worker thread.
fn load_payload(tx: &Connection, seq: i64) -> rusqlite::Result<Result<Work, String>> {
    let row: Option<(Vec<u8>, Option<Vec<u8>>)> = tx
        .prepare_cached("SELECT spec, data FROM payloads WHERE seq = ?1")?
        .query_row(params![seq], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(match row {
        None => Err("the job's payload is missing".to_string()),
        Some((spec, data)) => Ok(Work::Stored(crate::domain::PayloadRecord { spec, data: data.map(Bytes::from) })),
    })
}

/// The batch committed: change the in-memory state and answer.
fn complete(done: Done, shared: &Shared) {
    match done {
        Done::Insert { reply, outcome, queued } => {
            shared.with_state(|s| {
                s.stats.by_status.queued += queued.len();
                for (_, waiting) in queued {
                    s.enqueue_back(waiting);
                }
            });
            let _ = reply.send(outcome);
        }
        Done::Claim { reply, took } => {
            let claimed = shared.with_state(|s| match took {
                Took::Claimed(c) => {
                    let (claimed, waiting) = *c;
                    s.claimed(&waiting, claimed.job.attempts);
                    Some(claimed)
                }
                Took::Skipped(w) => {
                    s.dropped(&w);
                    None
                }
                Took::Failed(w) => {
                    s.dropped(&w);
                    s.stats.by_status.moved(JobStatus::Queued, JobStatus::Failed);
                    None
                }
            });
            let _ = reply.send(Ok(claimed));
        }
        Done::Finish { reply, ended, evicted } => {
            shared.with_state(|s| {
                s.evicted(&evicted.statuses, evicted.result_bytes);
                if let Some((job, bytes)) = &ended {
                    let before = s.settle(job.id);
                    s.stats.by_status.moved(before, job.status);
                    s.stats.result_bytes += bytes;
                }
            });
            if let Some((job, _)) = &ended {
                shared.forget_progress(job.id);
            }
            let _ = reply.send(Ok(ended.map(|(job, _)| job)));
        }
        Done::Cancel { reply, outcome } => {
            if let CancelOutcome::Cancelled(job) = &outcome {
                shared.with_state(|s| {
                    s.forget_queued(job.id);
                    let was = s.settle(job.id);
                    s.stats.by_status.moved(was, JobStatus::Cancelled);
                });
                shared.forget_progress(job.id);
            }
            let _ = reply.send(Ok(outcome));
        }
        Done::Release { reply, released } => {
            let changed = released.is_some();
            if let Some((id, waiting)) = released {
                shared.forget_progress(id);
                shared.with_state(|s| {
                    let was = s.settle(id);
                    s.stats.by_status.moved(was, JobStatus::Queued);
                    s.enqueue_front(waiting);
                });
            }
            let _ = reply.send(Ok(changed));
        }
        Done::Expire { reply, evicted } => {
            let n = evicted.statuses.len();
            shared.with_state(|s| s.evicted(&evicted.statuses, evicted.result_bytes));
            let _ = reply.send(Ok(n));
        }
        Done::Closed { reply } => drop(reply.send(Ok(()))),
        Done::Nothing => {}
    }
}

/// The batch was rolled back: undo what was taken from memory, answer `Unavailable`, or
/// `Uncertain` to an insert whose commit may still have reached the disk.
fn fail(done: Done, shared: &Shared, message: &str, uncertain: bool) {
    let error = || StoreError::Unavailable(message.to_string());
    match done {
        Done::Insert { reply, outcome: Ok(Inserted::Created(jobs)), .. } if uncertain => {
            let ids = jobs.iter().map(|j| j.id).collect();
            drop(reply.send(Err(StoreError::Uncertain { message: message.to_string(), ids })))
        }
        Done::Insert { reply, .. } => drop(reply.send(Err(error()))),
        Done::Claim { reply, took } => {
            // Nothing of it was kept: the job is queued again.
            let waiting = match took {
                Took::Claimed(c) => {
                    let (claimed, mut waiting) = *c;
                    if let Work::Ready(input) = claimed.work {
                        waiting.payload = Some(input);
                    }
                    waiting
                }
                Took::Skipped(w) | Took::Failed(w) => w,
            };
            shared.with_state(|s| s.put_back(waiting));
            let _ = reply.send(Err(error()));
        }
        Done::Finish { reply, .. } => drop(reply.send(Err(error()))),
        Done::Cancel { reply, .. } => drop(reply.send(Err(error()))),
        Done::Release { reply, .. } => drop(reply.send(Err(error()))),
        Done::Expire { reply, .. } => drop(reply.send(Err(error()))),
        Done::Closed { reply } => drop(reply.send(Err(error()))),
        Done::Nothing => {}
    }
}
