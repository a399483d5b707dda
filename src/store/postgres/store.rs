//! [`PgStore`]: jobs in PostgreSQL, shared by every instance on the database.
//!
//! A claim takes the oldest queued job no instance holds with `FOR UPDATE SKIP LOCKED`, counts
//! the attempt and writes this instance as the lease owner until `now() + lease`; a heartbeat
//! renews this instance's leases every third of the lease; any instance gives expired leases
//! back to the queue (or fails the job `worker_lost` past `--max-attempts`). Starts, ends and
//! releases are fenced on (attempt, lease owner): an instance that comes back late changes
//! nothing. Counts for admission and `GET /jobs` are the database's, refreshed every 250 ms.
//!
//! The hot path is one statement per step, each on a shared, pipelined connection
//! ([`super::conn`]): submissions without a key are grouped into one insert of many jobs
//! ([`Inner::batcher`], group commit), a claim returns its payload, and an end writes the row,
//! the result, the payload's deletion, the owed webhook and the notice in one statement, from
//! the job as this instance holds it. Running jobs' progress is written and announced every
//! 50 ms, for all of them in one statement.
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
use crate::domain::{JobPayload, PayloadRecord};
use crate::error::ErrorBody;
use crate::job::{Job, JobId, JobKind, JobStatus, Owner, ResultMeta};
use crate::store::codes::{
    content_type, kind_code, kind_of, micros, pack_ids, status_code, status_of, time_of, unpack_ids,
};
use crate::store::{
    apply_final, kind_index, CancelOutcome, Claimed, Final, IdempotencyKey, Inserted, JobStore, ListFilter, NewJob,
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
/// Webhooks of stopped instances taken per rescue (each rescue, every third of the lease).
const RESCUED_WEBHOOKS: i64 = 100;

/// The job columns [`job_from_row`] reads, in its order.
macro_rules! job_columns {
    () => {
        "seq, id, kind, status, attempts, progress, stage, created_at, started_at, finished_at, error_code, \
         error_message, result_type, result_bytes, result_name, result_width, result_height, callback, owner"
    };
}

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
    url: String,
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
    claimable: [usize; 2],
    /// Jobs this instance claimed (then started), as they are in the database: an end is
    /// written from this, in one statement.
    held: HashMap<JobId, Held>,
    stats: StoreStats,
    events: Option<Arc<dyn StoreEvents>>,
}

struct Held {
    job: Job,
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
            url: options.url.clone(),
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
        run_on(&rt, async move {
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

    /// A read, blocking the calling thread on the store's runtime.
    fn read<T: Send>(&self, fut: impl Future<Output = Result<T, StoreError>> + Send) -> Result<T, StoreError> {
        run_on(self.rt(), fut)
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Runs `fut` on `rt` from any thread (an async context included: then from a thread of its own).
fn run_on<T: Send>(rt: &tokio::runtime::Runtime, fut: impl Future<Output = T> + Send) -> T {
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| s.spawn(|| rt.block_on(fut)).join().expect("store read thread"))
    } else {
        rt.block_on(fut)
    }
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
            "SELECT status, kind, lease_owner IS NULL, count(*), coalesce(sum(weight), 0)::BIGINT \
             FROM offload_jobs WHERE status IN (0, 1) GROUP BY 1, 2, 3",
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
        let mut queued = [0usize; 2];
        let (mut queued_bytes, mut claimable) = (0, [0usize; 2]);
        let (mut queued_n, mut running_n) = (0, 0);
        for row in live {
            let status = stored_status(row.get(0))?;
            let kind = stored_kind(row.get(1))?;
            let free: bool = row.get(2);
            let n = row.get::<_, i64>(3) as usize;
            if status == JobStatus::Queued {
                queued_n += n;
                queued[kind_index(kind)] += n;
                queued_bytes += row.get::<_, i64>(4) as usize;
                if free {
                    claimable[kind_index(kind)] += n;
                }
            } else {
                running_n += n;
            }
        }
        let wake = self.with_state(|s| {
            let more = claimable.iter().zip(&s.claimable).any(|(now, before)| now > before);
            s.claimable = claimable;
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

    /// Renews this instance's leases: on the jobs it holds and on the webhooks it delivers.
    async fn heartbeat(&self) -> Result<(), StoreError> {
        let conn = self.conns.shared().await?;
        conn.query(
            "WITH j AS (UPDATE offload_jobs SET lease_until = now() + make_interval(secs => $2) \
               WHERE lease_owner = $1 RETURNING 1), \
             w AS (UPDATE offload_webhooks SET lease_until = now() + make_interval(secs => $2) \
               WHERE lease_owner = $1 RETURNING 1) \
             SELECT (SELECT count(*) FROM j), (SELECT count(*) FROM w)",
            &[&self.me, &self.lease.as_secs_f64()],
        )
        .await?;
        Ok(())
    }

    /// Webhooks whose lease ran out (the instance delivering them stopped, or none took them
    /// yet), taken by this instance: at most `limit` at a time.
    async fn take_webhooks(&self, limit: i64) -> Result<Vec<OwedWebhook>, StoreError> {
        let conn = self.conns.shared().await?;
        let rows = conn
            .query(
                "UPDATE offload_webhooks SET lease_owner = $1, lease_until = now() + make_interval(secs => $2) \
                 WHERE job_id IN (SELECT job_id FROM offload_webhooks WHERE lease_until IS NULL OR lease_until < now() \
                   LIMIT $3 FOR UPDATE SKIP LOCKED) \
                 RETURNING job_id, url, body",
                &[&self.me, &self.lease.as_secs_f64(), &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let id: Vec<u8> = r.get(0);
                let url = CallbackUrl::parse(&r.get::<_, String>(1), CallbackPolicy { allow_private: true }).ok()?;
                Some(OwedWebhook {
                    job: JobId::from_bytes(id.try_into().ok()?),
                    url,
                    body: Bytes::from(r.get::<_, Vec<u8>>(2)),
                })
            })
            .collect())
    }

    /// Jobs whose holder stopped renewing: queued again, or failed past the attempts allowed.
    /// Followers everywhere hear of both.
    async fn rescue(&self) -> Result<(), StoreError> {
        let conn = self.conns.shared().await?;
        let lost = crate::store::worker_lost(self.max_attempts);
        let now = micros(SystemTime::now());
        let failed = conn
            .execute(
                "UPDATE offload_jobs SET status = 3, stage = 'failed', error_code = $2, error_message = $3, \
                 finished_at = $4, lease_owner = NULL, lease_until = NULL \
                 WHERE lease_owner IS NOT NULL AND lease_until < now() AND status IN (0, 1) AND attempts >= $1 \
                 RETURNING pg_notify('offload', 'j3' || encode(id, 'hex') || $5)",
                &[&(self.max_attempts as i32), &lost.code, &lost.message, &now, &EVERYONE],
            )
            .await?;
        let requeued = conn
            .execute(
                "UPDATE offload_jobs SET status = 0, stage = 'queued', progress = 0, started_at = NULL, \
                 lease_owner = NULL, lease_until = NULL \
                 WHERE lease_owner IS NOT NULL AND lease_until < now() AND status IN (0, 1) \
                 RETURNING pg_notify('offload', 'j0' || encode(id, 'hex') || $1), pg_notify('offload', 'q')",
                &[&EVERYONE],
            )
            .await?;
        if failed + requeued > 0 {
            tracing::info!(requeued, failed, "jobs of an instance that stopped renewing its leases taken back");
        }
        // Webhooks a stopped instance owed: delivered from here (only once the Dispatcher
        // listens: before that, the start takes them with `owed_webhooks`).
        if let Some(events) = self.with_state(|s| s.events.clone()) {
            let owed = self.take_webhooks(RESCUED_WEBHOOKS).await?;
            if !owed.is_empty() {
                tracing::info!(owed = owed.len(), "delivering webhooks owed by an instance that stopped");
                events.owed(owed);
            }
        }
        Ok(())
    }

    /// This instance's runs that started or moved since the last time: written (readers on
    /// every instance see them) and announced (followers on every instance get them), in one
    /// statement for all of them.
    async fn write_progress(&self) -> Result<(), StoreError> {
        let mut started = Vec::new();
        // Each run as held, and whether its progress moved (not only its start).
        let moved: Vec<(Job, bool)> = self.with_state(|s| {
            s.held
                .values_mut()
                .filter(|h| (h.dirty || h.start_unsaid) && h.job.status == JobStatus::Running)
                .map(|h| {
                    if std::mem::take(&mut h.start_unsaid) {
                        started.push(notice::changed(h.job.id, JobStatus::Running, &self.tag));
                    }
                    (h.job.clone(), std::mem::take(&mut h.dirty))
                })
                .collect()
        });
        if moved.is_empty() {
            return Ok(());
        }
        let announced: Vec<_> =
            moved.iter().filter(|m| m.1).map(|(j, _)| (j.id, j.progress, j.stage.clone())).collect();
        let mut notices = started;
        notices.extend(notice::progress(&self.tag, &announced));
        let raw: Vec<[u8; 16]> = moved.iter().map(|(j, _)| j.id.to_bytes()).collect();
        let ids: Vec<&[u8]> = raw.iter().map(|b| b.as_slice()).collect();
        let attempts: Vec<i32> = moved.iter().map(|(j, _)| j.attempts as i32).collect();
        let starts: Vec<Option<i64>> = moved.iter().map(|(j, _)| j.started_at.map(micros)).collect();
        let fractions: Vec<f32> = moved.iter().map(|(j, _)| j.progress).collect();
        let stages: Vec<Option<&str>> = moved.iter().map(|(j, _)| j.stage.as_deref()).collect();
        let conn = self.conns.shared().await?;
        conn.query(
            "WITH u AS (UPDATE offload_jobs o SET status = 1, started_at = x.t, progress = x.p, stage = x.s \
               FROM unnest($1::bytea[], $2::int4[], $3::int8[], $4::real[], $5::text[]) AS x(id, a, t, p, s) \
               WHERE o.id = x.id AND o.attempts = x.a AND o.lease_owner = $6 AND o.status IN (0, 1) RETURNING 1), \
             n AS (SELECT pg_notify('offload', t) FROM unnest($7::text[]) AS t) \
             SELECT (SELECT count(*) FROM u), (SELECT count(*) FROM n)",
            &[&ids, &attempts, &starts, &fractions, &stages, &self.me, &notices],
        )
        .await?;
        Ok(())
    }

    /// One connection that LISTENs; reconnects with backoff when it drops, and then refreshes
    /// (notifications sent meanwhile are lost: the refresh and the slow poll catch up).
    async fn listen(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.listen_once().await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!("database listener: {e}; reconnecting in {backoff:?}");
                    self.conns.fail(&e);
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn listen_once(self: &Arc<Self>) -> Result<(), tokio_postgres::Error> {
        use futures::StreamExt;
        let (client, mut connection) = tokio_postgres::connect(&self.url, NoTls).await?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        let _ = tx.send(n.payload().to_string());
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        });
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        let load = client.prepare(concat!("SELECT ", job_columns!(), " FROM offload_jobs WHERE id = ANY($1)")).await?;
        self.refresh_now.notify_one();
        while let Some(first) = rx.recv().await {
            // Whatever arrived meanwhile is handled together: one read for all the jobs.
            let mut batch = vec![first];
            while batch.len() < 1000 {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            self.on_notices(&client, &load, batch).await;
        }
        match driver.await {
            Ok(result) => result,
            Err(_) => Ok(()),
        }
    }

    async fn on_notices(&self, client: &Client, load: &tokio_postgres::Statement, payloads: Vec<String>) {
        let Some(events) = self.with_state(|s| s.events.clone()) else { return };
        let mut work = false;
        let mut changes: Vec<(JobId, JobStatus)> = Vec::new();
        let mut progress: Vec<(JobId, f32, Option<String>)> = Vec::new();
        for payload in &payloads {
            match notice::parse(payload) {
                Some(Notice::Work) => work = true,
                Some(Notice::Cancelled(id)) => events.cancelled(id),
                Some(Notice::Changed { id, status, from }) if from != self.tag && events.wants(id) => {
                    if !changes.contains(&(id, status)) {
                        changes.push((id, status));
                    }
                }
                Some(Notice::Progress { from, jobs }) if from != self.tag => {
                    progress.extend(jobs.into_iter().filter(|(id, _, _)| events.wants(*id)));
                }
                Some(_) => {}
                None => tracing::debug!("unknown notice {payload:?}"),
            }
        }
        if work {
            self.refresh_now.notify_one();
        }
        let mut wanted: Vec<[u8; 16]> =
            changes.iter().map(|c| c.0).chain(progress.iter().map(|p| p.0)).map(|id| id.to_bytes()).collect();
        wanted.sort_unstable();
        wanted.dedup();
        if wanted.is_empty() {
            return;
        }
        let ids: Vec<&[u8]> = wanted.iter().map(|b| b.as_slice()).collect();
        let rows = match client.query(load, &[&ids]).await {
            Ok(rows) => rows,
            Err(e) => return tracing::warn!("cannot read jobs changed elsewhere: {e}"),
        };
        let jobs: HashMap<JobId, Job> =
            rows.iter().filter_map(|r| job_from_row(r).ok()).map(|(_, j)| (j.id, j)).collect();
        for (id, status) in changes {
            if let Some(snapshot) = jobs.get(&id).and_then(|job| as_of(job, status)) {
                events.changed(snapshot);
            }
        }
        for (id, fraction, stage) in progress {
            if let Some(job) = jobs.get(&id).filter(|j| j.status == JobStatus::Running) {
                let mut job = job.clone();
                job.advance(fraction, stage);
                events.changed(job);
            }
        }
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

/// The job as it was when it reached `status`, from its state now: itself, or (it ended before
/// this instance read it) the running job it was, so a follower sees every status it went
/// through. `None` for a state the job left for an earlier one (queued again).
fn as_of(job: &Job, status: JobStatus) -> Option<Job> {
    if job.status == status {
        return Some(job.clone());
    }
    if status == JobStatus::Running && job.status.is_terminal() && job.started_at.is_some() {
        let mut then = job.clone();
        then.status = JobStatus::Running;
        then.stage = Some("started".into());
        then.progress = 0.0;
        then.finished_at = None;
        then.error = None;
        then.result = None;
        return Some(then);
    }
    None
}

fn stored_status(code: i16) -> Result<JobStatus, StoreError> {
    status_of(i64::from(code)).ok_or_else(|| unavailable(format!("a stored job has status {code}")))
}

fn stored_kind(code: i16) -> Result<JobKind, StoreError> {
    kind_of(i64::from(code)).ok_or_else(|| unavailable(format!("a stored job has kind {code}")))
}

fn job_from_row(r: &Row) -> Result<(i64, Job), StoreError> {
    let id: Vec<u8> = r.get(1);
    let id: [u8; 16] = id.try_into().map_err(|_| unavailable("a stored job id is not 16 bytes"))?;
    let status = stored_status(r.get(3))?;
    let error = r
        .get::<_, Option<String>>(10)
        .map(|code| ErrorBody::new(code, r.get::<_, Option<String>>(11).unwrap_or_default()));
    let result = r.get::<_, Option<String>>(12).map(|t| ResultMeta {
        content_type: content_type(&t),
        bytes: r.get::<_, Option<i64>>(13).unwrap_or(0) as usize,
        filename: r.get::<_, Option<String>>(14).unwrap_or_default(),
        dimensions: r.get::<_, Option<i32>>(15).zip(r.get::<_, Option<i32>>(16)).map(|(w, h)| (w as u32, h as u32)),
    });
    let callback = r
        .get::<_, Option<String>>(17)
        .and_then(|raw| CallbackUrl::parse(&raw, CallbackPolicy { allow_private: true }).ok());
    let owner = r.get::<_, Option<Vec<u8>>>(18).and_then(|o| <[u8; 16]>::try_from(o).ok()).map(Owner::from_bytes);
    let job = Job {
        id: JobId::from_bytes(id),
        kind: stored_kind(r.get(2))?,
        status,
        attempts: r.get::<_, i32>(4) as u32,
        progress: r.get::<_, f32>(5),
        stage: r.get(6),
        created_at: time_of(r.get(7)),
        started_at: r.get::<_, Option<i64>>(8).map(time_of),
        finished_at: r.get::<_, Option<i64>>(9).map(time_of),
        error,
        result,
        callback,
        owner,
    };
    Ok((r.get(0), job))
}

/// The mutable fields of a job as statement parameters ($n onward in [`SAVE_SET`]'s order).
struct Fields<'a> {
    status: i16,
    progress: f32,
    stage: Option<&'a str>,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    error_code: Option<&'a str>,
    error_message: Option<&'a str>,
    result_type: Option<&'a str>,
    result_bytes: Option<i64>,
    result_name: Option<&'a str>,
    result_width: Option<i32>,
    result_height: Option<i32>,
}

impl<'a> Fields<'a> {
    fn of(job: &'a Job) -> Self {
        let result = job.result.as_ref();
        Fields {
            status: status_code(job.status) as i16,
            progress: job.progress,
            stage: job.stage.as_deref(),
            started_at: job.started_at.map(micros),
            finished_at: job.finished_at.map(micros),
            error_code: job.error.as_ref().map(|e| e.code.as_str()),
            error_message: job.error.as_ref().map(|e| e.message.as_str()),
            result_type: result.map(|m| m.content_type),
            result_bytes: result.map(|m| m.bytes as i64),
            result_name: result.map(|m| m.filename.as_str()),
            result_width: result.and_then(|m| m.dimensions).map(|d| d.0 as i32),
            result_height: result.and_then(|m| m.dimensions).map(|d| d.1 as i32),
        }
    }

    fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 12] {
        [
            &self.status,
            &self.progress,
            &self.stage,
            &self.started_at,
            &self.finished_at,
            &self.error_code,
            &self.error_message,
            &self.result_type,
            &self.result_bytes,
            &self.result_name,
            &self.result_width,
            &self.result_height,
        ]
    }
}

/// Writes every mutable field of `job` back ($2…$13), and lets go of its lease.
async fn save(tx: &tokio_postgres::Transaction<'_>, seq: i64, job: &Job) -> Result<(), StoreError> {
    let fields = Fields::of(job);
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&seq];
    params.extend(fields.params());
    tx.execute(
        "UPDATE offload_jobs SET status = $2, progress = $3, stage = $4, started_at = $5, finished_at = $6, \
         error_code = $7, error_message = $8, result_type = $9, result_bytes = $10, result_name = $11, \
         result_width = $12, result_height = $13, lease_owner = NULL, lease_until = NULL WHERE seq = $1",
        &params,
    )
    .await
    .map_err(unavailable)?;
    Ok(())
}

/// The job as a run's end leaves it (started, if the start was not recorded), with the result
/// to keep; `None` if the state machine refuses the end. A result larger than `budget` fails it.
fn ended(mut job: Job, outcome: Final, budget: usize) -> Option<(Job, Option<Bytes>)> {
    let outcome = match outcome {
        Final::Succeeded { bytes, .. } if bytes.len() > budget => {
            Final::Failed(crate::store::result_too_large(bytes.len(), budget))
        }
        other => other,
    };
    let bytes = match &outcome {
        Final::Succeeded { bytes, .. } => Some(bytes.clone()),
        _ => None,
    };
    let now = SystemTime::now();
    job.start(now);
    apply_final(&mut job, outcome, now).then_some(())?;
    let bytes = bytes.filter(|_| job.status == JobStatus::Succeeded);
    Some((job, bytes))
}

/// The webhook a job's end owes: its URL and the final job object, exactly as POSTed.
fn owed_body(job: &Job) -> Option<(&str, Vec<u8>)> {
    let url = job.callback.as_ref()?;
    Some((url.as_str(), serde_json::to_vec(&job.view()).unwrap_or_default()))
}

impl Inner {
    /// A job's end in a transaction: the row, no more payload, the webhook owed if it has a
    /// callback (held by this instance, which delivers it).
    async fn end(&self, tx: &tokio_postgres::Transaction<'_>, seq: i64, job: &Job) -> Result<(), StoreError> {
        save(tx, seq, job).await?;
        tx.execute("DELETE FROM offload_payloads WHERE seq = $1", &[&seq]).await.map_err(unavailable)?;
        if let Some((url, body)) = owed_body(job) {
            tx.execute(
                "INSERT INTO offload_webhooks (job_id, url, body, lease_owner, lease_until) \
                 VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5)) \
                 ON CONFLICT (job_id) DO UPDATE SET url = $2, body = $3, lease_owner = $4, \
                 lease_until = now() + make_interval(secs => $5)",
                &[&job.id.to_bytes().as_slice(), &url, &body, &self.me, &self.lease.as_secs_f64()],
            )
            .await
            .map_err(unavailable)?;
        }
        Ok(())
    }

    /// Submissions without a key, inserted in one statement: one commit for all, every
    /// submitter answered after it.
    async fn insert_batch(self: Arc<Self>, batch: Vec<InsertRequest>) {
        let all: Vec<&NewJob> = batch.iter().flat_map(|r| &r.jobs).collect();
        let result = self.insert_many(&all).await;
        if result.is_ok() {
            self.inserted(&all);
        }
        for request in batch {
            let answer = match &result {
                Ok(()) => Ok(Inserted::Created(request.jobs.into_iter().map(|n| n.job).collect())),
                Err(e) => Err(e.clone()),
            };
            let _ = request.reply.send(answer);
        }
    }

    async fn insert_many(&self, jobs: &[&NewJob]) -> Result<(), StoreError> {
        let raw: Vec<[u8; 16]> = jobs.iter().map(|n| n.job.id.to_bytes()).collect();
        let ids: Vec<&[u8]> = raw.iter().map(|b| b.as_slice()).collect();
        let kinds: Vec<i16> = jobs.iter().map(|n| kind_code(n.job.kind) as i16).collect();
        let statuses: Vec<i16> = jobs.iter().map(|n| status_code(n.job.status) as i16).collect();
        let attempts: Vec<i32> = jobs.iter().map(|n| n.job.attempts as i32).collect();
        let progress: Vec<f32> = jobs.iter().map(|n| n.job.progress).collect();
        let stages: Vec<Option<&str>> = jobs.iter().map(|n| n.job.stage.as_deref()).collect();
        let created: Vec<i64> = jobs.iter().map(|n| micros(n.job.created_at)).collect();
        let callbacks: Vec<Option<&str>> = jobs.iter().map(|n| n.job.callback.as_ref().map(|c| c.as_str())).collect();
        let weights: Vec<i64> = jobs.iter().map(|n| n.weight as i64).collect();
        let owners: Vec<Option<Vec<u8>>> = jobs.iter().map(|n| n.job.owner.map(|o| o.to_bytes().to_vec())).collect();
        let specs: Vec<&[u8]> = jobs.iter().map(|n| n.record.spec.as_slice()).collect();
        let data: Vec<Option<&[u8]>> = jobs.iter().map(|n| n.record.data.as_deref()).collect();
        let conn = self.conns.shared().await?;
        let row = conn
            .query_opt(
                "WITH new AS (SELECT * FROM unnest($1::bytea[], $2::int2[], $3::int2[], $4::int4[], $5::real[], \
                   $6::text[], $7::int8[], $8::text[], $9::int8[], $10::bytea[], $11::bytea[], $12::bytea[]) \
                   AS x(id, kind, status, attempts, progress, stage, created_at, callback, weight, owner, spec, data)), \
                 j AS (INSERT INTO offload_jobs (id, kind, status, attempts, progress, stage, created_at, callback, \
                   weight, owner) SELECT id, kind, status, attempts, progress, stage, created_at, callback, weight, \
                   owner FROM new RETURNING seq, id), \
                 p AS (INSERT INTO offload_payloads (seq, spec, data) \
                   SELECT j.seq, new.spec, new.data FROM j JOIN new USING (id)) \
                 SELECT count(*), pg_notify('offload', 'q') FROM j",
                &[
                    &ids, &kinds, &statuses, &attempts, &progress, &stages, &created, &callbacks, &weights, &owners,
                    &specs, &data,
                ],
            )
            .await?;
        let n = row.map_or(0, |r| r.get::<_, i64>(0)) as usize;
        if n != jobs.len() {
            return Err(unavailable(format!("inserted {n} of {} jobs", jobs.len())));
        }
        Ok(())
    }

    /// What this instance added, counted before the next refresh sees it.
    fn inserted(&self, jobs: &[&NewJob]) {
        self.with_state(|s| {
            for new in jobs {
                let k = kind_index(new.job.kind);
                s.claimable[k] += 1;
                s.stats.queued[k] += 1;
                s.stats.by_status.queued += 1;
                s.stats.queued_bytes += new.weight;
            }
        });
    }

    /// A submission with an `Idempotency-Key`, in a transaction of its own: the jobs and the
    /// key together, or (another request with the key committed first) nothing, and that
    /// request's jobs.
    async fn insert_keyed(self: Arc<Self>, jobs: Vec<NewJob>, key: IdempotencyKey) -> Result<Inserted, StoreError> {
        let mut conn = self.conns.alone().await?;
        let tx = conn.transaction().await.map_err(unavailable)?;
        let mut first_seq = None;
        for new in &jobs {
            let job = &new.job;
            let row = tx
                .query_one(
                    "INSERT INTO offload_jobs (id, kind, status, attempts, progress, stage, created_at, callback, weight, owner) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING seq",
                    &[
                        &job.id.to_bytes().as_slice(),
                        &(kind_code(job.kind) as i16),
                        &(status_code(job.status) as i16),
                        &(job.attempts as i32),
                        &job.progress,
                        &job.stage,
                        &micros(job.created_at),
                        &job.callback.as_ref().map(|c| c.as_str()),
                        &(new.weight as i64),
                        &job.owner.map(|o| o.to_bytes().to_vec()),
                    ],
                )
                .await
                .map_err(unavailable)?;
            let seq: i64 = row.get(0);
            first_seq.get_or_insert(seq);
            tx.execute(
                "INSERT INTO offload_payloads (seq, spec, data) VALUES ($1, $2, $3)",
                &[&seq, &new.record.spec, &new.record.data.as_deref()],
            )
            .await
            .map_err(unavailable)?;
        }
        let Some(first) = first_seq else { return Ok(Inserted::Created(Vec::new())) };
        let ids = pack_ids(jobs.iter().map(|j| j.job.id));
        let added = tx
            .execute(
                "INSERT INTO offload_idempotency (key, fingerprint, first_seq, ids) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (key) DO NOTHING",
                &[&key.key, &key.fingerprint.as_slice(), &first, &ids],
            )
            .await
            .map_err(unavailable)?;
        if added == 0 {
            // Another request with this key committed first: nothing of this one is kept.
            tx.rollback().await.map_err(unavailable)?;
            drop(conn);
            return match self.replay(&key).await? {
                Some(jobs) => Ok(Inserted::Replayed(jobs)),
                None => Err(unavailable("the idempotency key vanished meanwhile")),
            };
        }
        tx.execute("SELECT pg_notify('offload', 'q')", &[]).await.map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        drop(conn);
        self.inserted(&jobs.iter().collect::<Vec<_>>());
        Ok(Inserted::Created(jobs.into_iter().map(|n| n.job).collect()))
    }

    async fn replay(&self, key: &IdempotencyKey) -> Result<Option<Vec<Job>>, StoreError> {
        let conn = self.conns.shared().await?;
        let row =
            conn.query_opt("SELECT fingerprint, ids FROM offload_idempotency WHERE key = $1", &[&key.key]).await?;
        let Some(row) = row else { return Ok(None) };
        let print: Vec<u8> = row.get(0);
        if print != key.fingerprint {
            return Err(StoreError::KeyReused);
        }
        let ids: Vec<u8> = row.get(1);
        let mut jobs = Vec::new();
        for id in unpack_ids(&ids) {
            if let Some((_, job)) = self.load(id).await? {
                jobs.push(self.live(job));
            }
        }
        Ok(Some(jobs))
    }

    /// Claims, for as many jobs of each kind as were asked together: one statement per kind.
    async fn claim_batch(self: Arc<Self>, batch: Vec<ClaimRequest>) {
        let mut by_kind: HashMap<JobKind, Vec<ClaimRequest>> = HashMap::new();
        for request in batch {
            by_kind.entry(request.kind).or_default().push(request);
        }
        for (kind, requests) in by_kind {
            match self.claim_many(kind, requests.len()).await {
                Ok(claimed) => {
                    let mut claimed = claimed.into_iter();
                    for request in requests {
                        let _ = request.reply.send(Ok(claimed.next()));
                    }
                }
                Err(e) => {
                    for request in requests {
                        let _ = request.reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// Up to `n` of the oldest claimable jobs of `kind`, with their payloads, in one round trip.
    async fn claim_many(&self, kind: JobKind, n: usize) -> Result<Vec<Claimed>, StoreError> {
        let conn = self.conns.shared().await?;
        let rows = conn
            .query(
                concat!(
                    "WITH picked AS (SELECT seq FROM offload_jobs WHERE status = 0 AND lease_owner IS NULL AND kind = $1 \
                       ORDER BY seq LIMIT $4 FOR UPDATE SKIP LOCKED), \
                     claimed AS (UPDATE offload_jobs SET attempts = attempts + 1, lease_owner = $2, \
                       lease_until = now() + make_interval(secs => $3) WHERE seq IN (SELECT seq FROM picked) \
                       RETURNING ",
                    job_columns!(),
                    ") SELECT claimed.*, p.spec, p.data FROM claimed LEFT JOIN offload_payloads p ON p.seq = claimed.seq \
                     ORDER BY claimed.seq"
                ),
                &[&(kind_code(kind) as i16), &self.me, &self.lease.as_secs_f64(), &(n as i64)],
            )
            .await?;
        drop(conn);
        if rows.len() < n {
            self.with_state(|s| s.claimable[kind_index(kind)] = 0);
        }
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            let (seq, job) = job_from_row(&row)?;
            let record = row
                .get::<_, Option<Vec<u8>>>(19)
                .map(|spec| PayloadRecord { spec, data: row.get::<_, Option<Vec<u8>>>(20).map(Bytes::from) });
            let decoded = match record {
                Some(record) => JobPayload::decode(job.kind, record),
                None => Err("the payload is missing".to_string()),
            };
            match decoded {
                Ok(payload) => {
                    self.with_state(|s| {
                        s.held.insert(job.id, Held { job: job.clone(), start_unsaid: false, dirty: false })
                    });
                    claimed.push(Claimed { job, payload });
                }
                Err(message) => self.unreadable(seq, job, message).await?,
            }
        }
        Ok(claimed)
    }

    /// A claimed job whose stored payload cannot be read: failed, for good.
    async fn unreadable(&self, seq: i64, mut job: Job, message: String) -> Result<(), StoreError> {
        tracing::error!(job = %job.id, "stored payload unreadable: {message}");
        job.fail(ErrorBody::new("payload_unreadable", message), SystemTime::now());
        let mut conn = self.conns.alone().await?;
        let tx = conn.transaction().await.map_err(unavailable)?;
        self.end(&tx, seq, &job).await?;
        tx.execute("SELECT pg_notify('offload', $1)", &[&notice::changed(job.id, job.status, EVERYONE)])
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)
    }

    /// A start is noted here, and written with the next progress (within 50 ms): a start costs
    /// no statement of its own. The attempt was counted at the claim, so a crash before the
    /// write loses nothing: the lease brings the job back either way.
    fn start(&self, id: JobId, attempt: u32, at: SystemTime) -> bool {
        self.with_state(|s| {
            let Some(held) = s.held.get_mut(&id).filter(|h| h.job.attempts == attempt) else { return false };
            let started = held.job.start(at);
            held.start_unsaid |= started;
            started
        })
    }

    fn settle(&self, id: JobId) {
        self.with_state(|s| s.held.remove(&id));
    }

    /// Ends of runs, in one statement for all: each job's row, its result, its payload gone,
    /// its webhook owed (held by this instance, which delivers it) and its notices, fenced on
    /// (attempt, lease owner) job by job.
    async fn end_batch(self: Arc<Self>, batch: Vec<EndRequest>) {
        let result = self.end_many(&batch).await;
        self.with_state(|s| {
            for request in &batch {
                let id = request.job.id;
                match &result {
                    Ok(ended) => {
                        s.held.remove(&id);
                        if ended.contains(&id) {
                            *s.stats.by_status.slot(request.job.status) += 1;
                            s.stats.result_bytes += request.bytes.as_ref().map_or(0, Bytes::len);
                        }
                    }
                    // Not ended: the Dispatcher retries, and may, from the job as held.
                    Err(_) => {
                        if let Some(held) = s.held.get_mut(&id) {
                            held.job.status = JobStatus::Running;
                        }
                    }
                }
            }
        });
        // Results past the budget: the oldest finished jobs go now, not at the next sweep.
        let over = self.with_state(|s| s.stats.result_bytes).saturating_sub(self.result_budget);
        if over > 0 && !self.evicting.swap(true, std::sync::atomic::Ordering::AcqRel) {
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(e) = this.evict(over).await {
                    tracing::warn!("cannot forget the oldest results: {e}");
                }
                this.evicting.store(false, std::sync::atomic::Ordering::Release);
            });
        }
        for request in batch {
            let answer = match &result {
                Ok(ended) => Ok(ended.contains(&request.job.id).then_some(request.job)),
                Err(e) => Err(e.clone()),
            };
            let _ = request.reply.send(answer);
        }
    }

    async fn end_many(&self, batch: &[EndRequest]) -> Result<Vec<JobId>, StoreError> {
        let raw: Vec<[u8; 16]> = batch.iter().map(|r| r.job.id.to_bytes()).collect();
        let ids: Vec<&[u8]> = raw.iter().map(|b| b.as_slice()).collect();
        let attempts: Vec<i32> = batch.iter().map(|r| r.job.attempts as i32).collect();
        let fields: Vec<Fields> = batch.iter().map(|r| Fields::of(&r.job)).collect();
        let owed: Vec<Option<(&str, Vec<u8>)>> = batch.iter().map(|r| owed_body(&r.job)).collect();
        let said: Vec<String> = batch.iter().map(|r| notice::changed(r.job.id, r.job.status, &self.tag)).collect();
        let ran: Vec<Option<String>> = batch
            .iter()
            .map(|r| r.start_unsaid.then(|| notice::changed(r.job.id, JobStatus::Running, &self.tag)))
            .collect();
        let column = |f: for<'f> fn(&'f Fields<'_>) -> Option<&'f str>| fields.iter().map(f).collect::<Vec<_>>();
        let statuses: Vec<i16> = fields.iter().map(|f| f.status).collect();
        let progress: Vec<f32> = fields.iter().map(|f| f.progress).collect();
        let started: Vec<Option<i64>> = fields.iter().map(|f| f.started_at).collect();
        let finished: Vec<Option<i64>> = fields.iter().map(|f| f.finished_at).collect();
        let result_bytes: Vec<Option<i64>> = fields.iter().map(|f| f.result_bytes).collect();
        let widths: Vec<Option<i32>> = fields.iter().map(|f| f.result_width).collect();
        let heights: Vec<Option<i32>> = fields.iter().map(|f| f.result_height).collect();
        let results: Vec<Option<&[u8]>> = batch.iter().map(|r| r.bytes.as_deref()).collect();
        let urls: Vec<Option<&str>> = owed.iter().map(|o| o.as_ref().map(|o| o.0)).collect();
        let bodies: Vec<Option<&[u8]>> = owed.iter().map(|o| o.as_ref().map(|o| o.1.as_slice())).collect();
        let conn = self.conns.shared().await?;
        let rows = conn
            .query(
                "WITH x AS (SELECT * FROM unnest($1::bytea[], $2::int4[], $3::int2[], $4::real[], $5::text[], \
                   $6::int8[], $7::int8[], $8::text[], $9::text[], $10::text[], $11::int8[], $12::text[], $13::int4[], \
                   $14::int4[], $15::bytea[], $16::text[], $17::bytea[], $18::text[], $19::text[]) \
                   AS x(id, attempt, status, progress, stage, started_at, finished_at, error_code, error_message, \
                   result_type, result_bytes, result_name, result_width, result_height, result, url, body, said, ran)), \
                 u AS (UPDATE offload_jobs o SET status = x.status, progress = x.progress, stage = x.stage, \
                   started_at = x.started_at, finished_at = x.finished_at, error_code = x.error_code, \
                   error_message = x.error_message, result_type = x.result_type, result_bytes = x.result_bytes, \
                   result_name = x.result_name, result_width = x.result_width, result_height = x.result_height, \
                   lease_owner = NULL, lease_until = NULL \
                   FROM x WHERE o.id = x.id AND o.attempts = x.attempt AND o.lease_owner = $20 AND o.status IN (0, 1) \
                   RETURNING o.seq, o.id), \
                 r AS (INSERT INTO offload_results (seq, bytes) SELECT u.seq, x.result FROM u JOIN x USING (id) \
                   WHERE x.result IS NOT NULL ON CONFLICT (seq) DO UPDATE SET bytes = excluded.bytes), \
                 d AS (DELETE FROM offload_payloads WHERE seq IN (SELECT seq FROM u)), \
                 w AS (INSERT INTO offload_webhooks (job_id, url, body, lease_owner, lease_until) \
                   SELECT u.id, x.url, x.body, $20, now() + make_interval(secs => $21) FROM u JOIN x USING (id) \
                   WHERE x.url IS NOT NULL ON CONFLICT (job_id) DO UPDATE SET url = excluded.url, \
                   body = excluded.body, lease_owner = excluded.lease_owner, lease_until = excluded.lease_until) \
                 SELECT u.id, CASE WHEN x.ran IS NOT NULL THEN pg_notify('offload', x.ran) END, \
                   pg_notify('offload', x.said) FROM u JOIN x USING (id)",
                &[
                    &ids,
                    &attempts,
                    &statuses,
                    &progress,
                    &column(|f| f.stage),
                    &started,
                    &finished,
                    &column(|f| f.error_code),
                    &column(|f| f.error_message),
                    &column(|f| f.result_type),
                    &result_bytes,
                    &column(|f| f.result_name),
                    &widths,
                    &heights,
                    &results,
                    &urls,
                    &bodies,
                    &said,
                    &ran,
                    &self.me,
                    &self.lease.as_secs_f64(),
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| <[u8; 16]>::try_from(r.get::<_, Vec<u8>>(0)).ok())
            .map(JobId::from_bytes)
            .collect())
    }

    /// An end this instance has no copy of the job for: read and locked in a transaction.
    async fn finish_read(&self, id: JobId, attempt: u32, outcome: Final) -> Result<Option<Job>, StoreError> {
        let mut conn = self.conns.alone().await?;
        let tx = conn.transaction().await.map_err(unavailable)?;
        let row = tx
            .query_opt(
                concat!(
                    "SELECT ",
                    job_columns!(),
                    " FROM offload_jobs WHERE id = $1 AND attempts = $2 AND lease_owner = $3 \
                     AND status IN (0, 1) FOR UPDATE"
                ),
                &[&id.to_bytes().as_slice(), &(attempt as i32), &self.me],
            )
            .await
            .map_err(unavailable)?;
        let Some((job, bytes)) = row.map(|r| job_from_row(&r)).transpose()?.and_then(|(seq, job)| {
            let (job, bytes) = ended(job, outcome, self.result_budget)?;
            Some(((seq, job), bytes))
        }) else {
            self.settle(id);
            return Ok(None);
        };
        let (seq, job) = job;
        if let Some(bytes) = bytes {
            tx.execute(
                "INSERT INTO offload_results (seq, bytes) VALUES ($1, $2) ON CONFLICT (seq) DO UPDATE SET bytes = $2",
                &[&seq, &bytes.as_ref()],
            )
            .await
            .map_err(unavailable)?;
        }
        self.end(&tx, seq, &job).await?;
        tx.execute("SELECT pg_notify('offload', $1)", &[&notice::changed(id, job.status, &self.tag)])
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        self.settle(id);
        Ok(Some(job))
    }

    async fn cancel(self: Arc<Self>, id: JobId, reason: ErrorBody) -> Result<CancelOutcome, StoreError> {
        let mut conn = self.conns.alone().await?;
        let tx = conn.transaction().await.map_err(unavailable)?;
        let row = tx
            .query_opt(
                concat!("SELECT ", job_columns!(), " FROM offload_jobs WHERE id = $1 FOR UPDATE"),
                &[&id.to_bytes().as_slice()],
            )
            .await
            .map_err(unavailable)?;
        let Some((seq, mut job)) = row.map(|r| job_from_row(&r)).transpose()? else {
            return Ok(CancelOutcome::Unknown);
        };
        if job.status.is_terminal() {
            return Ok(CancelOutcome::Finished(job));
        }
        job.cancel(SystemTime::now());
        job.error = Some(reason);
        self.end(&tx, seq, &job).await?;
        // Followers elsewhere see it (this instance's Dispatcher tells its own); the instance
        // running it stops the run.
        tx.execute("SELECT pg_notify('offload', $1)", &[&notice::changed(id, job.status, &self.tag)])
            .await
            .map_err(unavailable)?;
        tx.execute("SELECT pg_notify('offload', $1)", &[&notice::cancelled(id)]).await.map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        self.settle(id);
        Ok(CancelOutcome::Cancelled(job))
    }

    async fn release(self: Arc<Self>, id: JobId, attempt: u32) -> Result<bool, StoreError> {
        let conn = self.conns.shared().await?;
        // A claim that never started gives its attempt back.
        let changed = conn
            .execute(
                "UPDATE offload_jobs SET attempts = CASE WHEN status = 0 THEN attempts - 1 ELSE attempts END, \
                 status = 0, stage = 'queued', progress = 0, started_at = NULL, lease_owner = NULL, lease_until = NULL \
                 WHERE id = $1 AND attempts = $2 AND lease_owner = $3 AND status IN (0, 1) \
                 RETURNING pg_notify('offload', $4), pg_notify('offload', 'q')",
                &[
                    &id.to_bytes().as_slice(),
                    &(attempt as i32),
                    &self.me,
                    &notice::changed(id, JobStatus::Queued, EVERYONE),
                ],
            )
            .await?;
        self.settle(id);
        Ok(changed == 1)
    }

    /// Forgets finished jobs past the TTL, in batches; then, while the results kept pass the
    /// budget, the oldest finished jobs.
    async fn expire(self: Arc<Self>, now: SystemTime) -> Result<usize, StoreError> {
        let cutoff = micros(now.checked_sub(self.ttl).unwrap_or(SystemTime::UNIX_EPOCH));
        let mut total = 0;
        loop {
            let mut conn = self.conns.alone().await?;
            let tx = conn.transaction().await.map_err(unavailable)?;
            let rows = tx
                .query(
                    "SELECT seq FROM offload_jobs WHERE finished_at < $1 ORDER BY finished_at LIMIT 2000 \
                     FOR UPDATE SKIP LOCKED",
                    &[&cutoff],
                )
                .await
                .map_err(unavailable)?;
            let seqs: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
            forget(&tx, &seqs).await?;
            tx.commit().await.map_err(unavailable)?;
            total += seqs.len();
            if seqs.len() < 2000 {
                break;
            }
        }
        let over = self.with_state(|s| s.stats.result_bytes).saturating_sub(self.result_budget);
        if over > 0 {
            total += self.evict(over).await?;
        }
        Ok(total)
    }

    /// The oldest finished jobs holding at least `over` result bytes, forgotten.
    async fn evict(&self, over: usize) -> Result<usize, StoreError> {
        let mut conn = self.conns.alone().await?;
        let tx = conn.transaction().await.map_err(unavailable)?;
        let rows = tx
            .query(
                "SELECT seq, coalesce(result_bytes, 0) FROM offload_jobs WHERE finished_at IS NOT NULL \
                 ORDER BY finished_at, seq LIMIT 2000 FOR UPDATE SKIP LOCKED",
                &[],
            )
            .await
            .map_err(unavailable)?;
        let (mut seqs, mut freed) = (Vec::new(), 0usize);
        for row in rows {
            if freed >= over {
                break;
            }
            seqs.push(row.get::<_, i64>(0));
            freed += row.get::<_, i64>(1).max(0) as usize;
        }
        forget(&tx, &seqs).await?;
        tx.commit().await.map_err(unavailable)?;
        if !seqs.is_empty() {
            tracing::info!(jobs = seqs.len(), freed, "finished jobs forgotten early: results past --result-disk");
        }
        self.with_state(|s| s.stats.result_bytes = s.stats.result_bytes.saturating_sub(freed));
        Ok(seqs.len())
    }

    async fn list(&self, filter: ListFilter) -> Result<Vec<Job>, StoreError> {
        let conn = self.conns.shared().await?;
        let mut clauses = Vec::new();
        if let Some(s) = filter.status {
            clauses.push(format!("status = {}", status_code(s)));
        }
        if let Some(k) = filter.kind {
            clauses.push(format!("kind = {}", kind_code(k)));
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
        let limit = filter.limit as i64;
        let rows = match &owner {
            Some(o) => conn.client().query(&sql, &[&limit, o]).await,
            None => conn.client().query(&sql, &[&limit]).await,
        }
        .map_err(unavailable)?;
        rows.iter().map(|r| job_from_row(r).map(|(_, j)| self.live(j))).collect()
    }
}

/// Deletes jobs and everything kept with them.
async fn forget(tx: &tokio_postgres::Transaction<'_>, seqs: &[i64]) -> Result<(), StoreError> {
    if seqs.is_empty() {
        return Ok(());
    }
    for sql in [
        "DELETE FROM offload_jobs WHERE seq = ANY($1)",
        "DELETE FROM offload_payloads WHERE seq = ANY($1)",
        "DELETE FROM offload_results WHERE seq = ANY($1)",
        "DELETE FROM offload_idempotency WHERE first_seq = ANY($1)",
    ] {
        tx.execute(sql, &[&seqs]).await.map_err(unavailable)?;
    }
    Ok(())
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
        if tokio::runtime::Handle::try_current().is_ok() {
            let rt = self.rt.clone();
            std::thread::scope(|s| s.spawn(|| rt.block_on(fut)).join().expect("read thread"))
        } else {
            self.rt.block_on(fut)
        }
    }
}

impl JobStore for PgStore {
    fn durable(&self) -> bool {
        true
    }

    fn shared(&self) -> bool {
        true
    }

    fn insert(&self, jobs: Vec<NewJob>, key: Option<IdempotencyKey>) -> Pending<Inserted> {
        if let Some(key) = key {
            return self.write(move |inner| Box::pin(inner.insert_keyed(jobs, key)));
        }
        let (reply, answer) = oneshot::channel();
        if self.inserts.send(InsertRequest { jobs, reply }).is_err() {
            return crate::store::ready(Err(unavailable("the store is closed")));
        }
        Box::pin(async move { answer.await.map_err(|_| unavailable("the store is closed"))? })
    }

    fn claim(&self, kind: JobKind) -> Option<Pending<Option<Claimed>>> {
        let any = self.inner.with_state(|s| {
            let slot = &mut s.claimable[kind_index(kind)];
            let any = *slot > 0;
            *slot = slot.saturating_sub(1);
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
            let job = held.job.clone();
            if job.status.is_terminal() {
                return Some(None);
            }
            let (job, bytes) = match ended(job, outcome.clone(), self.inner.result_budget) {
                Some(end) => end,
                None => return Some(None),
            };
            held.job.status = job.status;
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
        self.write(move |inner| Box::pin(inner.cancel(id, reason)))
    }

    fn release(&self, id: JobId, attempt: u32) -> Pending<bool> {
        self.write(move |inner| Box::pin(inner.release(id, attempt)))
    }

    fn expire(&self, now: SystemTime) -> Pending<usize> {
        self.write(move |inner| Box::pin(inner.expire(now)))
    }

    fn webhook_done(&self, id: JobId) {
        let inner = self.inner.clone();
        self.rt().spawn(async move {
            if let Ok(conn) = inner.conns.shared().await {
                let _ =
                    conn.execute("DELETE FROM offload_webhooks WHERE job_id = $1", &[&id.to_bytes().as_slice()]).await;
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
        self.inner.with_state(|s| s.stats)
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

    fn health(&self) -> Result<(), StoreError> {
        match self.inner.conns.failing() {
            Some(m) => Err(StoreError::Unavailable(m)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_that_ended_before_it_was_read_shows_its_run_first() {
        let mut job = Job::new(JobId::random(), JobKind::Pdf, SystemTime::now());
        job.start(SystemTime::now());
        job.fail(ErrorBody::new("timeout", "too slow"), SystemTime::now());
        let running = as_of(&job, JobStatus::Running).expect("a running snapshot");
        assert_eq!(running.status, JobStatus::Running);
        assert!(running.error.is_none() && running.finished_at.is_none());
        assert_eq!(as_of(&job, JobStatus::Failed).map(|j| j.status), Some(JobStatus::Failed));
        // Queued again since: nothing to show for the old state.
        assert!(as_of(&Job::new(JobId::random(), JobKind::Pdf, SystemTime::now()), JobStatus::Running).is_none());
    }
}
