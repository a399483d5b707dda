//! [`PgStore`]: jobs in PostgreSQL, shared by every instance on the database.
//!
//! A claim takes the oldest queued job no instance holds with `FOR UPDATE SKIP LOCKED`, counts
//! the attempt and writes this instance as the lease owner until `now() + lease`; a heartbeat
//! renews this instance's leases every third of the lease; any instance gives expired leases
//! back to the queue (or fails the job `worker_lost` past `--max-attempts`). Starts, ends and
//! releases are fenced on (attempt, lease owner): an instance that comes back late changes
//! nothing. Counts for admission and `GET /jobs` are the database's, refreshed every 250 ms.
//!
//! The store runs its own small tokio runtime (threads `pg`); writes are futures on it, reads
//! block on it from the caller's thread (handlers call them in `web::block`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio_postgres::{Client, NoTls, Row};

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
}

/// Connections kept open (each pipelines concurrent queries; transactions take one alone).
const CONNECTIONS: usize = 4;
/// Results larger than this are sent from the database piece by piece.
const STREAM_ABOVE: usize = 1 << 20;

const JOB_COLUMNS: &str = "seq, id, kind, status, attempts, progress, stage, created_at, started_at, finished_at, \
     error_code, error_message, result_type, result_bytes, result_name, result_width, result_height, callback, owner";

pub struct PgStore {
    rt: Option<tokio::runtime::Runtime>,
    inner: Arc<Inner>,
}

struct Inner {
    conns: Vec<tokio::sync::Mutex<Option<Client>>>,
    url: String,
    /// This instance, as the lease owner.
    me: Vec<u8>,
    lease: Duration,
    max_attempts: u32,
    ttl: Duration,
    state: Mutex<State>,
    /// Asks the counts refresh to run now (a notification said there is new work).
    refresh_now: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    /// Queued jobs no instance holds, per kind, as last counted (plus what this instance added).
    claimable: [usize; 2],
    /// Jobs this instance claimed and did not start: (attempt, weight).
    claimed: HashMap<JobId, (u32, usize)>,
    /// Jobs this instance runs: attempt.
    started: HashMap<JobId, u32>,
    /// Live progress of this instance's jobs.
    progress: HashMap<JobId, (f32, Option<String>)>,
    stats: StoreStats,
    failing: Option<String>,
    events: Option<Arc<dyn StoreEvents>>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl PgStore {
    /// Connects, migrates the schema (safe with other instances starting), and starts the
    /// heartbeat, the lease rescue and the counts refresh.
    pub fn open(options: &PgOptions) -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pg")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let inner = Arc::new(Inner {
            conns: (0..CONNECTIONS).map(|_| tokio::sync::Mutex::new(None)).collect(),
            url: options.url.clone(),
            me: JobId::random().to_bytes().to_vec(),
            lease: options.lease.max(Duration::from_secs(1)),
            max_attempts: options.max_attempts.max(1),
            ttl: options.ttl,
            state: Mutex::new(State::default()),
            refresh_now: tokio::sync::Notify::new(),
        });
        let setup = inner.clone();
        run_on(&rt, async move {
            let mut client = setup.connect().await.map_err(|e| e.to_string())?;
            super::schema::migrate(&mut client).await?;
            setup.refresh().await.map_err(|e| e.to_string())
        })?;
        for task in [Task::Refresh, Task::Heartbeat, Task::Rescue, Task::Listen] {
            let inner = inner.clone();
            rt.spawn(async move { inner.run(task).await });
        }
        Ok(PgStore { rt: Some(rt), inner })
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
    Listen,
}

/// The channel of the notifications instances send each other (inside the transactions that
/// cause them, so they arrive once committed): `q` new work, `j<id>` a job changed, `c<id>` a
/// job was cancelled. Ids only: payloads stay far under NOTIFY's 8,000 bytes.
const CHANNEL: &str = "offload";

fn notify_sql() -> String {
    format!("SELECT pg_notify('{CHANNEL}', $1)")
}

impl Inner {
    async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = tokio_postgres::connect(&self.url, NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!("database connection ended: {e}");
            }
        });
        Ok(client)
    }

    /// A connection of the pool, (re)connected as needed.
    async fn conn(&self) -> Result<tokio::sync::MappedMutexGuard<'_, Client>, StoreError> {
        let start = (rand::random::<u32>() as usize) % self.conns.len();
        let mut guard = None;
        for i in 0..self.conns.len() {
            if let Ok(g) = self.conns[(start + i) % self.conns.len()].try_lock() {
                guard = Some(g);
                break;
            }
        }
        let mut guard = match guard {
            Some(g) => g,
            None => self.conns[start].lock().await,
        };
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = Some(self.connect().await.map_err(|e| {
                self.fail(&e);
                unavailable(e)
            })?);
        }
        Ok(tokio::sync::MutexGuard::map(guard, |c| c.as_mut().expect("connected")))
    }

    fn fail(&self, e: &dyn std::fmt::Display) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).failing = Some(e.to_string());
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    async fn run(self: Arc<Self>, task: Task) {
        if let Task::Listen = task {
            return self.listen().await;
        }
        let every = match task {
            Task::Refresh => Duration::from_millis(250),
            _ => self.lease / 3,
        };
        let mut tick = tokio::time::interval(every);
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
                Task::Refresh => self.refresh().await,
                Task::Heartbeat => self.heartbeat().await,
                Task::Rescue => self.rescue().await,
                Task::Listen => unreachable!(),
            };
            if let Err(e) = result {
                tracing::warn!("store background work failed: {e}");
                self.fail(&e);
            }
        }
    }

    /// The counts of the whole database; wakes the Dispatcher when there is more to claim.
    async fn refresh(&self) -> Result<(), StoreError> {
        let rows = {
            let conn = self.conn().await?;
            conn.query(
                "SELECT status, kind, lease_owner IS NULL, count(*), coalesce(sum(weight), 0)::BIGINT, \
                 coalesce(sum(result_bytes), 0)::BIGINT FROM offload_jobs GROUP BY 1, 2, 3",
                &[],
            )
            .await
            .map_err(unavailable)?
        };
        let mut stats = StoreStats::default();
        let mut claimable = [0usize; 2];
        for row in rows {
            let status = stored_status(row.get(0))?;
            let kind = stored_kind(row.get(1))?;
            let free: bool = row.get(2);
            let n = row.get::<_, i64>(3) as usize;
            *stats.by_status.slot(status) += n;
            if status == JobStatus::Queued {
                stats.queued[kind_index(kind)] += n;
                stats.queued_bytes += row.get::<_, i64>(4) as usize;
                if free {
                    claimable[kind_index(kind)] += n;
                }
            }
            stats.result_bytes += row.get::<_, i64>(5) as usize;
        }
        let wake = self.with_state(|s| {
            let more = claimable.iter().zip(&s.claimable).any(|(now, before)| now > before);
            s.claimable = claimable;
            s.stats = stats;
            s.failing = None;
            more.then(|| s.events.clone()).flatten()
        });
        if let Some(events) = wake {
            events.claimable();
        }
        Ok(())
    }

    async fn heartbeat(&self) -> Result<(), StoreError> {
        let conn = self.conn().await?;
        conn.execute(
            "UPDATE offload_jobs SET lease_until = now() + make_interval(secs => $2) WHERE lease_owner = $1",
            &[&self.me, &self.lease.as_secs_f64()],
        )
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    /// Jobs whose holder stopped renewing: queued again, or failed past the attempts allowed.
    async fn rescue(&self) -> Result<(), StoreError> {
        let conn = self.conn().await?;
        let lost = crate::store::worker_lost(self.max_attempts);
        let now = micros(SystemTime::now());
        let failed = conn
            .execute(
                "UPDATE offload_jobs SET status = 3, stage = 'failed', error_code = $2, error_message = $3, \
                 finished_at = $4, lease_owner = NULL, lease_until = NULL \
                 WHERE lease_owner IS NOT NULL AND lease_until < now() AND status IN (0, 1) AND attempts >= $1",
                &[&(self.max_attempts as i32), &lost.code, &lost.message, &now],
            )
            .await
            .map_err(unavailable)?;
        let requeued = conn
            .execute(
                "UPDATE offload_jobs SET status = 0, stage = 'queued', progress = 0, started_at = NULL, \
                 lease_owner = NULL, lease_until = NULL \
                 WHERE lease_owner IS NOT NULL AND lease_until < now() AND status IN (0, 1)",
                &[],
            )
            .await
            .map_err(unavailable)?;
        if failed + requeued > 0 {
            tracing::info!(requeued, failed, "jobs of an instance that stopped renewing its leases taken back");
            conn.execute(&notify_sql(), &[&"q"]).await.map_err(unavailable)?;
        }
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
                    self.fail(&e);
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn listen_once(self: &Arc<Self>) -> Result<(), tokio_postgres::Error> {
        use futures::StreamExt;
        let (client, mut connection) = tokio_postgres::connect(&self.url, NoTls).await?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
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
        self.refresh_now.notify_one();
        while let Some(payload) = rx.recv().await {
            self.on_notification(&client, &payload).await;
        }
        match driver.await {
            Ok(result) => result,
            Err(_) => Ok(()),
        }
    }

    async fn on_notification(&self, client: &Client, payload: &str) {
        let (tag, id) = payload.split_at(payload.len().min(1));
        let id = id.parse::<JobId>().ok();
        let Some(events) = self.with_state(|s| s.events.clone()) else { return };
        match (tag, id) {
            ("q", _) => self.refresh_now.notify_one(),
            ("c", Some(id)) => events.cancelled(id),
            ("j", Some(id)) => {
                if let Ok(Some((_, job))) = self.load(client, id).await {
                    events.changed(self.live(job));
                }
            }
            _ => {}
        }
    }

    async fn load(&self, conn: &Client, id: JobId) -> Result<Option<(i64, Job)>, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM offload_jobs WHERE id = $1");
        let row = conn.query_opt(&sql, &[&id.to_bytes().as_slice()]).await.map_err(unavailable)?;
        row.map(|r| job_from_row(&r)).transpose()
    }

    /// A job as readers see it: with this instance's live progress.
    fn live(&self, mut job: Job) -> Job {
        if let Some((fraction, stage)) = self.with_state(|s| s.progress.get(&job.id).cloned()) {
            job.advance(fraction, stage);
        }
        job
    }
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

/// Writes every mutable field of `job` back, and lets go of its lease.
async fn save(tx: &tokio_postgres::Transaction<'_>, seq: i64, job: &Job) -> Result<(), StoreError> {
    let result = job.result.as_ref();
    tx.execute(
        "UPDATE offload_jobs SET status = $2, attempts = $3, progress = $4, stage = $5, started_at = $6, \
         finished_at = $7, error_code = $8, error_message = $9, result_type = $10, result_bytes = $11, \
         result_name = $12, result_width = $13, result_height = $14, lease_owner = NULL, lease_until = NULL \
         WHERE seq = $1",
        &[
            &seq,
            &(status_code(job.status) as i16),
            &(job.attempts as i32),
            &job.progress,
            &job.stage,
            &job.started_at.map(micros),
            &job.finished_at.map(micros),
            &job.error.as_ref().map(|e| e.code.as_str()),
            &job.error.as_ref().map(|e| e.message.as_str()),
            &result.map(|m| m.content_type),
            &result.map(|m| m.bytes as i64),
            &result.map(|m| m.filename.as_str()),
            &result.and_then(|m| m.dimensions).map(|d| d.0 as i32),
            &result.and_then(|m| m.dimensions).map(|d| d.1 as i32),
        ],
    )
    .await
    .map_err(unavailable)?;
    Ok(())
}

/// A job's end: the row, no more payload, the webhook owed if it has a callback.
async fn end(tx: &tokio_postgres::Transaction<'_>, seq: i64, job: &Job) -> Result<(), StoreError> {
    save(tx, seq, job).await?;
    tx.execute("DELETE FROM offload_payloads WHERE seq = $1", &[&seq]).await.map_err(unavailable)?;
    if let Some(url) = &job.callback {
        let body = serde_json::to_vec(&job.view()).unwrap_or_default();
        tx.execute(
            "INSERT INTO offload_webhooks (job_id, url, body) VALUES ($1, $2, $3) \
             ON CONFLICT (job_id) DO UPDATE SET url = $2, body = $3",
            &[&job.id.to_bytes().as_slice(), &url.as_str(), &body],
        )
        .await
        .map_err(unavailable)?;
    }
    Ok(())
}

impl Inner {
    async fn insert(self: Arc<Self>, jobs: Vec<NewJob>, key: Option<IdempotencyKey>) -> Result<Inserted, StoreError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(unavailable)?;
        let mut created = Vec::with_capacity(jobs.len());
        let mut first_seq = None;
        let mut kinds = [0usize; 2];
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
            kinds[kind_index(job.kind)] += 1;
            created.push(job.clone());
        }
        if let (Some(key), Some(first)) = (&key, first_seq) {
            let ids = pack_ids(created.iter().map(|j| j.id));
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
                return match self.replay(key).await? {
                    Some(jobs) => Ok(Inserted::Replayed(jobs)),
                    None => Err(unavailable("the idempotency key vanished meanwhile")),
                };
            }
        }
        tx.execute(&notify_sql(), &[&"q"]).await.map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        self.with_state(|s| {
            for (i, n) in kinds.iter().enumerate() {
                s.claimable[i] += n;
                s.stats.queued[i] += n;
            }
            s.stats.by_status.queued += created.len();
            s.stats.queued_bytes += jobs.iter().map(|j| j.weight).sum::<usize>();
        });
        Ok(Inserted::Created(created))
    }

    async fn replay(&self, key: &IdempotencyKey) -> Result<Option<Vec<Job>>, StoreError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt("SELECT fingerprint, ids FROM offload_idempotency WHERE key = $1", &[&key.key])
            .await
            .map_err(unavailable)?;
        let Some(row) = row else { return Ok(None) };
        let print: Vec<u8> = row.get(0);
        if print != key.fingerprint {
            return Err(StoreError::KeyReused);
        }
        let ids: Vec<u8> = row.get(1);
        let mut jobs = Vec::new();
        for id in unpack_ids(&ids) {
            if let Some((_, job)) = self.load(&conn, id).await? {
                jobs.push(self.live(job));
            }
        }
        Ok(Some(jobs))
    }

    async fn claim(self: Arc<Self>, kind: JobKind) -> Result<Option<Claimed>, StoreError> {
        let conn = self.conn().await?;
        // The claim and the payload in one round trip.
        let sql = format!(
            "WITH claimed AS (UPDATE offload_jobs SET attempts = attempts + 1, lease_owner = $2, \
             lease_until = now() + make_interval(secs => $3) \
             WHERE seq = (SELECT seq FROM offload_jobs WHERE status = 0 AND lease_owner IS NULL AND kind = $1 \
                          ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED) \
             RETURNING {JOB_COLUMNS}, weight) \
             SELECT claimed.*, p.spec, p.data FROM claimed LEFT JOIN offload_payloads p ON p.seq = claimed.seq"
        );
        let row = conn
            .query_opt(&sql, &[&(kind_code(kind) as i16), &self.me, &self.lease.as_secs_f64()])
            .await
            .map_err(unavailable)?;
        let Some(row) = row else {
            self.with_state(|s| s.claimable[kind_index(kind)] = 0);
            return Ok(None);
        };
        let (seq, job) = job_from_row(&row)?;
        let weight = row.get::<_, i64>(19) as usize;
        let record = row
            .get::<_, Option<Vec<u8>>>(20)
            .map(|spec| PayloadRecord { spec, data: row.get::<_, Option<Vec<u8>>>(21).map(Bytes::from) });
        drop(conn);
        let decoded = match record {
            Some(record) => JobPayload::decode(job.kind, record),
            None => Err("the payload is missing".to_string()),
        };
        match decoded {
            Ok(payload) => {
                self.with_state(|s| {
                    s.claimed.insert(job.id, (job.attempts, weight));
                });
                Ok(Some(Claimed { job, payload }))
            }
            Err(message) => {
                tracing::error!(job = %job.id, "stored payload unreadable: {message}");
                let mut job = job;
                job.fail(ErrorBody::new("payload_unreadable", message), SystemTime::now());
                let mut conn = self.conn().await?;
                let tx = conn.transaction().await.map_err(unavailable)?;
                end(&tx, seq, &job).await?;
                tx.commit().await.map_err(unavailable)?;
                Ok(None)
            }
        }
    }

    async fn start(self: Arc<Self>, id: JobId, attempt: u32, at: SystemTime) -> Result<bool, StoreError> {
        let conn = self.conn().await?;
        let changed = conn
            .execute(
                "UPDATE offload_jobs SET status = 1, started_at = $4, stage = 'started', progress = 0 \
                 WHERE id = $1 AND attempts = $2 AND lease_owner = $3 AND status = 0",
                &[&id.to_bytes().as_slice(), &(attempt as i32), &self.me, &micros(at)],
            )
            .await
            .map_err(unavailable)?;
        if changed == 1 {
            conn.execute(&notify_sql(), &[&format!("j{id}")]).await.map_err(unavailable)?;
        }
        self.with_state(|s| {
            if changed == 1 && s.claimed.remove(&id).is_some() {
                s.started.insert(id, attempt);
            }
        });
        Ok(changed == 1)
    }

    /// The job, if this instance holds it with this attempt, locked for the transaction.
    async fn held(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        id: JobId,
        attempt: u32,
    ) -> Result<Option<(i64, Job)>, StoreError> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM offload_jobs WHERE id = $1 AND attempts = $2 AND lease_owner = $3 \
             AND status IN (0, 1) FOR UPDATE"
        );
        let row =
            tx.query_opt(&sql, &[&id.to_bytes().as_slice(), &(attempt as i32), &self.me]).await.map_err(unavailable)?;
        row.map(|r| job_from_row(&r)).transpose()
    }

    fn settle(&self, id: JobId) {
        self.with_state(|s| {
            s.claimed.remove(&id);
            s.started.remove(&id);
            s.progress.remove(&id);
        });
    }

    async fn finish(self: Arc<Self>, id: JobId, attempt: u32, outcome: Final) -> Result<Option<Job>, StoreError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(unavailable)?;
        let Some((seq, mut job)) = self.held(&tx, id, attempt).await? else {
            self.settle(id);
            return Ok(None);
        };
        let bytes = match &outcome {
            Final::Succeeded { bytes, .. } => Some(bytes.clone()),
            _ => None,
        };
        if job.status == JobStatus::Queued {
            // Started as far as this instance knows; the end records it.
            let at = self.with_state(|s| s.started.contains_key(&id)).then(SystemTime::now);
            job.start(at.unwrap_or_else(SystemTime::now));
        }
        if !apply_final(&mut job, outcome, SystemTime::now()) {
            self.settle(id);
            return Ok(None);
        }
        if let Some(bytes) = bytes.filter(|_| job.status == JobStatus::Succeeded) {
            tx.execute(
                "INSERT INTO offload_results (seq, bytes) VALUES ($1, $2) ON CONFLICT (seq) DO UPDATE SET bytes = $2",
                &[&seq, &bytes.as_ref()],
            )
            .await
            .map_err(unavailable)?;
        }
        end(&tx, seq, &job).await?;
        tx.execute(&notify_sql(), &[&format!("j{id}")]).await.map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        self.settle(id);
        Ok(Some(job))
    }

    async fn cancel(self: Arc<Self>, id: JobId, reason: ErrorBody) -> Result<CancelOutcome, StoreError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(unavailable)?;
        let sql = format!("SELECT {JOB_COLUMNS} FROM offload_jobs WHERE id = $1 FOR UPDATE");
        let row = tx.query_opt(&sql, &[&id.to_bytes().as_slice()]).await.map_err(unavailable)?;
        let Some((seq, mut job)) = row.map(|r| job_from_row(&r)).transpose()? else {
            return Ok(CancelOutcome::Unknown);
        };
        if job.status.is_terminal() {
            return Ok(CancelOutcome::Finished(job));
        }
        job.cancel(SystemTime::now());
        job.error = Some(reason);
        end(&tx, seq, &job).await?;
        // Followers everywhere see it; the instance running it stops the run.
        tx.execute(&notify_sql(), &[&format!("j{id}")]).await.map_err(unavailable)?;
        tx.execute(&notify_sql(), &[&format!("c{id}")]).await.map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        self.settle(id);
        Ok(CancelOutcome::Cancelled(job))
    }

    async fn release(self: Arc<Self>, id: JobId, attempt: u32) -> Result<bool, StoreError> {
        let conn = self.conn().await?;
        // A claim that never started gives its attempt back.
        let changed = conn
            .execute(
                "UPDATE offload_jobs SET attempts = CASE WHEN status = 0 THEN attempts - 1 ELSE attempts END, \
                 status = 0, stage = 'queued', progress = 0, started_at = NULL, lease_owner = NULL, lease_until = NULL \
                 WHERE id = $1 AND attempts = $2 AND lease_owner = $3 AND status IN (0, 1)",
                &[&id.to_bytes().as_slice(), &(attempt as i32), &self.me],
            )
            .await
            .map_err(unavailable)?;
        if changed == 1 {
            conn.execute(&notify_sql(), &[&format!("j{id}")]).await.map_err(unavailable)?;
            conn.execute(&notify_sql(), &[&"q"]).await.map_err(unavailable)?;
        }
        self.settle(id);
        Ok(changed == 1)
    }

    async fn expire(self: Arc<Self>, now: SystemTime) -> Result<usize, StoreError> {
        let cutoff = micros(now.checked_sub(self.ttl).unwrap_or(SystemTime::UNIX_EPOCH));
        let mut total = 0;
        loop {
            let mut conn = self.conn().await?;
            let tx = conn.transaction().await.map_err(unavailable)?;
            let rows = tx
                .query(
                    "DELETE FROM offload_jobs WHERE seq IN (SELECT seq FROM offload_jobs WHERE finished_at < $1 \
                     ORDER BY finished_at LIMIT 2000 FOR UPDATE SKIP LOCKED) RETURNING seq",
                    &[&cutoff],
                )
                .await
                .map_err(unavailable)?;
            let seqs: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
            for table in ["offload_payloads", "offload_results"] {
                tx.execute(&format!("DELETE FROM {table} WHERE seq = ANY($1)"), &[&seqs]).await.map_err(unavailable)?;
            }
            tx.execute("DELETE FROM offload_idempotency WHERE first_seq = ANY($1)", &[&seqs])
                .await
                .map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)?;
            total += seqs.len();
            if seqs.len() < 2000 {
                return Ok(total);
            }
        }
    }

    async fn list(&self, filter: ListFilter) -> Result<Vec<Job>, StoreError> {
        let conn = self.conn().await?;
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
        let mut sql = format!("SELECT {JOB_COLUMNS} FROM offload_jobs");
        if !clauses.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&clauses.join(" AND "));
        }
        sql.push_str(" ORDER BY seq DESC LIMIT $1");
        let limit = filter.limit as i64;
        let rows = match &owner {
            Some(o) => conn.query(&sql, &[&limit, o]).await,
            None => conn.query(&sql, &[&limit]).await,
        }
        .map_err(unavailable)?;
        rows.iter().map(|r| job_from_row(r).map(|(_, j)| self.live(j))).collect()
    }
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
            let conn = inner.conn().await?;
            let row = conn
                .query_opt(
                    "SELECT substring(bytes FROM $2 FOR $3) FROM offload_results WHERE seq = $1",
                    &[&seq, &(offset as i32 + 1), &(max as i32)],
                )
                .await
                .map_err(unavailable)?;
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

    fn insert(&self, jobs: Vec<NewJob>, key: Option<IdempotencyKey>) -> Pending<Inserted> {
        self.write(move |inner| Box::pin(inner.insert(jobs, key)))
    }

    fn claim(&self, kind: JobKind) -> Option<Pending<Option<Claimed>>> {
        let any = self.inner.with_state(|s| {
            let slot = &mut s.claimable[kind_index(kind)];
            let any = *slot > 0;
            *slot = slot.saturating_sub(1);
            any
        });
        any.then(|| self.write(move |inner| Box::pin(inner.claim(kind))))
    }

    fn start(&self, id: JobId, attempt: u32, at: SystemTime) -> Pending<bool> {
        self.write(move |inner| Box::pin(inner.start(id, attempt, at)))
    }

    fn finish(&self, id: JobId, attempt: u32, outcome: Final) -> Pending<Option<Job>> {
        self.write(move |inner| Box::pin(inner.finish(id, attempt, outcome)))
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
            if let Ok(conn) = inner.conn().await {
                let _ =
                    conn.execute("DELETE FROM offload_webhooks WHERE job_id = $1", &[&id.to_bytes().as_slice()]).await;
            }
        });
    }

    fn owed_webhooks(&self) -> Result<Vec<OwedWebhook>, StoreError> {
        let inner = self.inner.clone();
        self.read(async move {
            let conn = inner.conn().await?;
            // Taken for an hour by this instance, so instances starting together deliver each once.
            let rows = conn
                .query(
                    "UPDATE offload_webhooks SET lease_owner = $1, lease_until = now() + interval '1 hour' \
                     WHERE lease_owner IS NULL OR lease_until < now() RETURNING job_id, url, body",
                    &[&inner.me],
                )
                .await
                .map_err(unavailable)?;
            Ok(rows
                .iter()
                .filter_map(|r| {
                    let id: Vec<u8> = r.get(0);
                    let url =
                        CallbackUrl::parse(&r.get::<_, String>(1), CallbackPolicy { allow_private: true }).ok()?;
                    Some(OwedWebhook {
                        job: JobId::from_bytes(id.try_into().ok()?),
                        url,
                        body: Bytes::from(r.get::<_, Vec<u8>>(2)),
                    })
                })
                .collect())
        })
    }

    fn set_events(&self, events: Arc<dyn StoreEvents>) {
        self.inner.with_state(|s| s.events = Some(events));
    }

    fn progress(&self, id: JobId, fraction: f32, stage: Option<String>) {
        self.inner.with_state(|s| {
            let entry = s.progress.entry(id).or_insert((0.0, None));
            if fraction.is_finite() && fraction > entry.0 {
                entry.0 = fraction;
            }
            if stage.is_some() {
                entry.1 = stage;
            }
        });
    }

    fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let inner = self.inner.clone();
        self.read(async move {
            let conn = inner.conn().await?;
            Ok(inner.load(&conn, id).await?.map(|(_, job)| inner.live(job)))
        })
    }

    fn list(&self, filter: &ListFilter) -> Result<Vec<Job>, StoreError> {
        let (inner, filter) = (self.inner.clone(), filter.clone());
        self.read(async move { inner.list(filter).await })
    }

    fn result(&self, id: JobId) -> Result<Option<(ResultMeta, ResultBody)>, StoreError> {
        let inner = self.inner.clone();
        let found = self.read(async move {
            let conn = inner.conn().await?;
            let Some((seq, job)) = inner.load(&conn, id).await? else { return Ok(None) };
            let Some(meta) = job.result.filter(|_| job.status == JobStatus::Succeeded) else { return Ok(None) };
            let len = conn
                .query_opt("SELECT length(bytes) FROM offload_results WHERE seq = $1", &[&seq])
                .await
                .map_err(unavailable)?
                .map(|r| r.get::<_, i32>(0) as usize);
            let Some(len) = len else { return Ok(None) };
            if len > STREAM_ABOVE {
                return Ok(Some((meta, seq, len, None)));
            }
            let row = conn
                .query_one("SELECT bytes FROM offload_results WHERE seq = $1", &[&seq])
                .await
                .map_err(unavailable)?;
            Ok(Some((meta, seq, len, Some(Bytes::from(row.get::<_, Vec<u8>>(0))))))
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
            let conn = inner.conn().await?;
            let rows = conn
                .query(
                    "SELECT status, count(*) FROM offload_jobs WHERE owner = $1 GROUP BY status",
                    &[&owner.to_bytes().as_slice()],
                )
                .await
                .map_err(unavailable)?;
            let mut counts = StatusCounts::default();
            for row in rows {
                let status = stored_status(row.get(0))?;
                *counts.slot(status) += row.get::<_, i64>(1) as usize;
            }
            Ok(counts)
        })
    }

    fn health(&self) -> Result<(), StoreError> {
        match self.inner.with_state(|s| s.failing.clone()) {
            Some(m) => Err(StoreError::Unavailable(m)),
            None => Ok(()),
        }
    }
}
