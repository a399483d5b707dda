//! The Dispatcher: the single owner of job state.
//!
//! Handlers send it messages and get answers; workers send it events with `do_send`. It never
//! awaits a worker or a client. It keeps each pool's own mailbox at most one job per thread
//! deep (a `SyncArbiter` mailbox is unbounded) and holds the rest in the store's queue, bounded
//! by [`Admission`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use bytes::Bytes;
use tokio::sync::oneshot;

use super::store::{JobStore, ListFilter, StatusCounts, StoreError, Transition};
use crate::async_io::analytics::{AnalyticsHandle, Event};
use crate::async_io::webhooks::Deliver;
use crate::domain::callback::CallbackUrl;
use crate::domain::JobPayload;
use crate::error::ErrorBody;
use crate::job::{Job, JobId, JobKind, JobStatus, ResultMeta};
use crate::metrics::Metrics;
use crate::realtime::Outbox;
use crate::workers::{Execute, Interrupt, JobControl, JobFailure, WorkerEvent};

/// How much work is accepted.
#[derive(Clone, Copy, Debug)]
pub struct Admission {
    /// Most jobs per pool, queued plus running.
    pub max_pending: usize,
    /// Most payload bytes held by queued jobs, all pools together.
    pub max_queued_bytes: usize,
    /// Running time after which a job fails with `timeout`.
    pub job_timeout: Duration,
}

/// A worker pool as the Dispatcher sees it.
pub struct Pool {
    /// The pool's `SyncArbiter` address.
    pub recipient: Recipient<Execute>,
    /// Threads in the pool: how many jobs may be handed to it at once.
    pub workers: usize,
    /// Jobs handed to the pool whose `Finished` event has not arrived yet.
    in_flight: usize,
    /// Recent job run time, seconds (exponentially weighted), for `Retry-After`.
    mean_secs: f64,
}

impl Pool {
    pub fn new(recipient: Recipient<Execute>, workers: usize) -> Self {
        Pool { recipient, workers, in_flight: 0, mean_secs: 0.05 }
    }
}

/// Who hears about jobs besides WebSocket watchers. Data flows one way: the Dispatcher tells
/// them, never waits for them.
pub struct Observers {
    pub metrics: Arc<Metrics>,
    /// Job events (`job_submitted`, `job_succeeded`, …) go to analytics.
    pub analytics: AnalyticsHandle,
    /// Final job objects of jobs with a `callback_url`.
    pub webhooks: Recipient<Deliver>,
}

/// A job handed to a worker.
struct Running {
    kind: JobKind,
    control: JobControl,
    /// The timeout timer, cancelled when the job finishes.
    timer: SpawnHandle,
}

pub struct Dispatcher {
    store: Box<dyn JobStore>,
    pools: HashMap<JobKind, Pool>,
    running: HashMap<JobId, Running>,
    admission: Admission,
    /// How often finished jobs are checked for expiry.
    sweep_every: Duration,
    /// Set once a drain starts: the callers waiting for the last job to end.
    draining: Option<Vec<oneshot::Sender<()>>>,
    /// WebSocket connections following each job.
    watchers: HashMap<JobId, Vec<Watcher>>,
    /// Jobs each connection follows, to clean up when it goes.
    followed: HashMap<u64, HashSet<JobId>>,
    /// When progress of a job was last pushed, and whether a delayed push is scheduled.
    progress_pushed: HashMap<JobId, (Instant, bool)>,
    observers: Observers,
}

/// A connection following a job.
struct Watcher {
    conn: u64,
    outbox: Arc<Outbox>,
}

/// Least time between two progress events of one job to its watchers (the contract allows one
/// per 50 ms and wants a change shown within 100 ms).
const PROGRESS_PUSH_EVERY: Duration = Duration::from_millis(50);

impl Dispatcher {
    pub fn new(
        store: Box<dyn JobStore>,
        pools: HashMap<JobKind, Pool>,
        admission: Admission,
        ttl: Duration,
        observers: Observers,
    ) -> Self {
        let sweep_every = (ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(10));
        Dispatcher {
            store,
            pools,
            running: HashMap::new(),
            admission,
            sweep_every,
            draining: None,
            watchers: HashMap::new(),
            followed: HashMap::new(),
            progress_pushed: HashMap::new(),
            observers,
        }
    }

    /// Applies a transition and tells the job's watchers: every status change at once, progress
    /// at most once per [`PROGRESS_PUSH_EVERY`] (a delayed push carries the latest value).
    fn apply(
        &mut self,
        id: JobId,
        change: Transition,
        now: SystemTime,
        ctx: &mut Context<Self>,
    ) -> Result<Option<Job>, StoreError> {
        let progress_only = matches!(change, Transition::Progress { .. });
        let applied = self.store.apply(id, change, now)?;
        if let Some(job) = &applied {
            if self.watchers.contains_key(&id) {
                if progress_only {
                    self.push_progress(id, ctx);
                } else {
                    self.push(job);
                }
            }
            if job.status.is_terminal() {
                self.progress_pushed.remove(&id);
                self.ended(job);
            }
        }
        Ok(applied)
    }

    /// A job reached its final state: count it, record the event, send its webhook.
    fn ended(&self, job: &Job) {
        let kind = job.kind.as_str();
        let status = job.status.as_str();
        let o = &self.observers;
        o.metrics.jobs_finished.with_label_values(&[kind, status]).inc();
        let ran = job.started_at.zip(job.finished_at).and_then(|(s, f)| f.duration_since(s).ok());
        if let Some(ran) = ran {
            o.metrics.job_duration.with_label_values(&[kind, status]).observe(ran.as_secs_f64());
        }
        let mut props = job_props(job);
        let name = match job.status {
            JobStatus::Succeeded => {
                props.insert("duration_ms".into(), ran.map_or(0, |d| d.as_millis() as u64).into());
                "job_succeeded"
            }
            JobStatus::Failed => {
                props.insert("code".into(), job.error.as_ref().map_or("", |e| e.code.as_str()).into());
                "job_failed"
            }
            _ => "job_cancelled",
        };
        o.analytics.record(Event::internal(name, props));
        if let Some(url) = &job.callback {
            self.send_webhook(job, url.clone());
        }
    }

    fn send_webhook(&self, job: &Job, url: CallbackUrl) {
        match serde_json::to_vec(&job.view()) {
            Ok(body) => self.observers.webhooks.do_send(Deliver { job: job.id, url, body: body.into() }),
            Err(e) => tracing::error!(job = %job.id, "job object not serializable: {e}"),
        }
    }

    fn push(&mut self, job: &Job) {
        if let Some(watchers) = self.watchers.get(&job.id) {
            for w in watchers {
                w.outbox.push(job.clone());
            }
        }
    }

    fn push_progress(&mut self, id: JobId, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let (last, scheduled) = self.progress_pushed.get(&id).copied().unwrap_or((now - PROGRESS_PUSH_EVERY, false));
        if scheduled {
            return;
        }
        let since = now.duration_since(last);
        if since >= PROGRESS_PUSH_EVERY {
            if let Some(job) = self.store.get(id) {
                self.push(&job);
            }
            self.progress_pushed.insert(id, (now, false));
        } else {
            self.progress_pushed.insert(id, (last, true));
            ctx.run_later(PROGRESS_PUSH_EVERY - since, move |this, _| {
                if let Some(entry) = this.progress_pushed.get_mut(&id) {
                    *entry = (Instant::now(), false);
                    if let Some(job) = this.store.get(id).filter(|j| !j.status.is_terminal()) {
                        this.push(&job);
                    }
                }
            });
        }
    }

    /// Hands queued jobs of `kind` to its pool while it has idle threads.
    fn pump(&mut self, kind: JobKind, ctx: &mut Context<Self>) {
        loop {
            let Some(pool) = self.pools.get(&kind) else { return };
            if pool.in_flight >= pool.workers {
                return;
            }
            let Some((id, payload)) = self.store.next_queued(kind) else { return };
            let control = JobControl::default();
            let deadline = Instant::now() + self.admission.job_timeout;
            let msg = Execute { id, payload, control: control.clone(), deadline, events: ctx.address().recipient() };
            if let Err(err) = pool.recipient.try_send(msg) {
                tracing::error!(job = %id, kind = kind.as_str(), "worker pool unavailable: {err}");
                let error = ErrorBody::new("pool_unavailable", "the worker pool is not running");
                let _ = self.apply(id, Transition::Fail(error), SystemTime::now(), ctx);
                continue;
            }
            if let Some(pool) = self.pools.get_mut(&kind) {
                pool.in_flight += 1;
            }
            let timer = ctx.run_later(self.admission.job_timeout, move |this, ctx| this.time_out(id, ctx));
            self.running.insert(id, Running { kind, control, timer });
        }
    }

    fn time_out(&mut self, id: JobId, ctx: &mut Context<Self>) {
        if let Some(running) = self.running.get(&id) {
            running.control.interrupt(Interrupt::TimedOut);
            let error = self.timeout_error();
            if self.apply(id, Transition::Fail(error), SystemTime::now(), ctx).ok().flatten().is_some() {
                tracing::warn!(job = %id, "job timed out");
            }
        }
    }

    fn on_finished(&mut self, id: JobId, outcome: crate::workers::Outcome, elapsed: Duration, ctx: &mut Context<Self>) {
        let Some(running) = self.running.remove(&id) else { return };
        ctx.cancel_future(running.timer);
        if let Some(pool) = self.pools.get_mut(&running.kind) {
            pool.in_flight -= 1;
            pool.mean_secs = 0.8 * pool.mean_secs + 0.2 * elapsed.as_secs_f64();
        }
        let now = SystemTime::now();
        let change = match outcome {
            Ok(out) => {
                let meta = ResultMeta {
                    content_type: out.content_type,
                    bytes: out.bytes.len(),
                    filename: out.filename,
                    dimensions: out.dimensions,
                };
                Transition::Succeed { meta, bytes: out.bytes }
            }
            Err(JobFailure::Error(error)) => Transition::Fail(error),
            Err(JobFailure::Interrupted(Interrupt::TimedOut)) => Transition::Fail(self.timeout_error()),
            Err(JobFailure::Interrupted(Interrupt::Cancelled)) => Transition::Cancel { reason: None },
            Err(JobFailure::Interrupted(Interrupt::Shutdown)) => Transition::Fail(shutdown_error()),
        };
        match self.apply(id, change, now, ctx) {
            Ok(Some(job)) => {
                tracing::info!(job = %id, kind = job.kind.as_str(), status = job.status.as_str(), elapsed_ms = elapsed.as_millis() as u64, "job finished")
            }
            Ok(None) => {}
            Err(StoreError::ResultTooLarge { bytes, budget }) => {
                let error = ErrorBody::new(
                    "result_too_large",
                    format!("the result has {bytes} bytes, more than the {budget} bytes kept for results"),
                );
                let _ = self.apply(id, Transition::Fail(error), now, ctx);
            }
        }
        self.pump(running.kind, ctx);
        self.check_drained();
    }

    fn timeout_error(&self) -> ErrorBody {
        let secs = self.admission.job_timeout.as_secs_f64();
        ErrorBody::new("timeout", format!("the job ran longer than the {secs} s limit"))
    }

    /// Jobs accepted and not yet ended: queued in the store plus handed to a pool.
    fn pending(&self) -> usize {
        self.pools.iter().map(|(kind, p)| p.in_flight + self.store.queued(*kind)).sum()
    }

    fn check_drained(&mut self) {
        if self.draining.as_ref().is_some_and(|w| !w.is_empty()) && self.pending() == 0 {
            for waiter in self.draining.as_mut().map(std::mem::take).unwrap_or_default() {
                let _ = waiter.send(());
            }
        }
    }

    /// The grace period is over: everything still queued or running fails with `shutdown`.
    fn stop_everything(&mut self, ctx: &mut Context<Self>) {
        let now = SystemTime::now();
        for id in self.store.queued_ids() {
            let _ = self.apply(id, Transition::Fail(shutdown_error()), now, ctx);
        }
        let running: Vec<JobId> = self.running.keys().copied().collect();
        for id in running {
            self.running[&id].control.interrupt(Interrupt::Shutdown);
            let _ = self.apply(id, Transition::Fail(shutdown_error()), now, ctx);
        }
        for waiter in self.draining.as_mut().map(std::mem::take).unwrap_or_default() {
            let _ = waiter.send(());
        }
    }

    fn retry_after(&self, kind: JobKind) -> u64 {
        let Some(pool) = self.pools.get(&kind) else { return 1 };
        let backlog = (self.store.queued(kind) + pool.in_flight) as f64;
        let secs = backlog * pool.mean_secs / pool.workers.max(1) as f64;
        secs.ceil().clamp(1.0, 60.0) as u64
    }
}

/// The properties every job analytics event carries.
fn job_props(job: &Job) -> serde_json::Map<String, serde_json::Value> {
    let mut props = serde_json::Map::new();
    props.insert("job_id".into(), job.id.to_string().into());
    props.insert("kind".into(), job.kind.as_str().into());
    props
}

fn shutdown_error() -> ErrorBody {
    ErrorBody::new("shutdown", "the service shut down before the job could finish; submit it again")
}

impl Actor for Dispatcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Handlers wait when the mailbox is full; keep it deep enough for bursts.
        ctx.set_mailbox_capacity(1024);
        ctx.run_interval(self.sweep_every, |this, _| {
            let expired = this.store.expire(SystemTime::now());
            if expired > 0 {
                tracing::debug!(expired, "finished jobs expired");
            }
        });
    }
}

/// Accept new jobs, all or none (one upload may carry several images).
#[derive(Message)]
#[rtype(result = "Result<Vec<Job>, SubmitError>")]
pub struct Submit {
    pub jobs: Vec<JobPayload>,
    /// Where each job's final state is POSTed.
    pub callback: Option<CallbackUrl>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// Too much work pending; try again after this many seconds.
    Overloaded { retry_after: u64, reason: String },
    /// Draining for shutdown.
    ShuttingDown,
    /// No pool runs this kind of job.
    NoPool(JobKind),
}

impl Handler<Submit> for Dispatcher {
    type Result = Result<Vec<Job>, SubmitError>;

    fn handle(&mut self, msg: Submit, ctx: &mut Context<Self>) -> Self::Result {
        let result = self.admit(msg, ctx);
        if let Err(e) = &result {
            let reason = match e {
                SubmitError::Overloaded { .. } => "overloaded",
                SubmitError::ShuttingDown => "shutting_down",
                SubmitError::NoPool(_) => "no_pool",
            };
            self.observers.metrics.jobs_rejected.with_label_values(&[reason]).inc();
        }
        result
    }
}

impl Dispatcher {
    fn admit(&mut self, msg: Submit, ctx: &mut Context<Self>) -> Result<Vec<Job>, SubmitError> {
        if self.draining.is_some() {
            return Err(SubmitError::ShuttingDown);
        }
        let mut wanted: HashMap<JobKind, usize> = HashMap::new();
        for payload in &msg.jobs {
            *wanted.entry(payload.kind()).or_default() += 1;
        }
        for (&kind, &count) in &wanted {
            let Some(pool) = self.pools.get(&kind) else { return Err(SubmitError::NoPool(kind)) };
            let pending = self.store.queued(kind) + pool.in_flight;
            if pending + count > self.admission.max_pending {
                let limit = self.admission.max_pending;
                let reason = format!("{pending} {} jobs are pending, the limit is {limit}", kind.as_str());
                return Err(SubmitError::Overloaded { retry_after: self.retry_after(kind), reason });
            }
        }
        let weight: usize = msg.jobs.iter().map(JobPayload::approx_bytes).sum();
        if self.store.queued_bytes() + weight > self.admission.max_queued_bytes {
            let kind = msg.jobs.first().map_or(JobKind::Pdf, JobPayload::kind);
            let reason = "queued jobs hold as much memory as allowed".to_string();
            return Err(SubmitError::Overloaded { retry_after: self.retry_after(kind), reason });
        }
        let now = SystemTime::now();
        let mut accepted = Vec::with_capacity(msg.jobs.len());
        for payload in msg.jobs {
            let mut job = Job::new(JobId::random(), payload.kind(), now);
            job.callback = msg.callback.clone();
            let weight = payload.approx_bytes();
            self.store.insert(job.clone(), payload, weight);
            self.observers.metrics.jobs_submitted.with_label_values(&[job.kind.as_str()]).inc();
            self.observers.analytics.record(Event::internal("job_submitted", job_props(&job)));
            accepted.push(job);
        }
        for kind in wanted.keys() {
            self.pump(*kind, ctx);
        }
        Ok(accepted)
    }
}

impl Handler<WorkerEvent> for Dispatcher {
    type Result = ();

    fn handle(&mut self, event: WorkerEvent, ctx: &mut Context<Self>) {
        let now = SystemTime::now();
        match event {
            WorkerEvent::Started { id } => {
                let _ = self.apply(id, Transition::Start, now, ctx);
            }
            WorkerEvent::Progress { id, fraction, stage } => {
                let _ = self.apply(id, Transition::Progress { fraction, stage: Some(stage) }, now, ctx);
            }
            WorkerEvent::Finished { id, outcome, elapsed } => self.on_finished(id, outcome, elapsed, ctx),
        }
    }
}

/// One job's current state.
#[derive(Message)]
#[rtype(result = "Option<Job>")]
pub struct GetJob(pub JobId);

impl Handler<GetJob> for Dispatcher {
    type Result = Option<Job>;
    fn handle(&mut self, msg: GetJob, _: &mut Context<Self>) -> Option<Job> {
        self.store.get(msg.0)
    }
}

/// A succeeded job's result bytes.
#[derive(Message)]
#[rtype(result = "Result<(ResultMeta, Bytes), ResultError>")]
pub struct GetResult(pub JobId);

#[derive(Debug)]
pub enum ResultError {
    NotFound,
    NotReady(Box<Job>),
}

impl Handler<GetResult> for Dispatcher {
    type Result = Result<(ResultMeta, Bytes), ResultError>;
    fn handle(&mut self, msg: GetResult, _: &mut Context<Self>) -> Self::Result {
        match self.store.result(msg.0) {
            Some(found) => Ok(found),
            None => {
                Err(self.store.get(msg.0).map_or(ResultError::NotFound, |job| ResultError::NotReady(Box::new(job))))
            }
        }
    }
}

/// Cancel a job: a queued job never starts; a running one stops at its next checkpoint.
#[derive(Message)]
#[rtype(result = "Result<Job, CancelError>")]
pub struct CancelJob(pub JobId);

#[derive(Debug)]
pub enum CancelError {
    NotFound,
    AlreadyFinished(Box<Job>),
}

impl Handler<CancelJob> for Dispatcher {
    type Result = Result<Job, CancelError>;
    fn handle(&mut self, msg: CancelJob, ctx: &mut Context<Self>) -> Self::Result {
        let id = msg.0;
        let job = self.store.get(id).ok_or(CancelError::NotFound)?;
        if job.status.is_terminal() {
            return Err(CancelError::AlreadyFinished(Box::new(job)));
        }
        if let Some(running) = self.running.get(&id) {
            running.control.interrupt(Interrupt::Cancelled);
        }
        let reason = ErrorBody::new("cancelled", "cancelled by a client request");
        let _ = self.apply(id, Transition::Cancel { reason: Some(reason) }, SystemTime::now(), ctx);
        let job = self.store.get(id).ok_or(CancelError::NotFound)?;
        tracing::info!(job = %id, "job cancelled");
        self.check_drained();
        Ok(job)
    }
}

/// Jobs, newest first, with how many jobs are held in each status.
#[derive(Message)]
#[rtype(result = "(Vec<Job>, StatusCounts)")]
pub struct ListJobs(pub ListFilter);

impl Handler<ListJobs> for Dispatcher {
    type Result = MessageResult<ListJobs>;
    fn handle(&mut self, msg: ListJobs, _: &mut Context<Self>) -> Self::Result {
        MessageResult((self.store.list(&msg.0), self.store.stats().by_status))
    }
}

/// Queue sizes and jobs held, for `GET /metrics`.
#[derive(Message)]
#[rtype(result = "LoadStats")]
pub struct GetLoad;

#[derive(Debug, Clone, MessageResponse)]
pub struct LoadStats {
    /// Per pool: (kind, queued, in flight, threads).
    pub pools: Vec<(JobKind, usize, usize, usize)>,
    pub by_status: StatusCounts,
}

impl Handler<GetLoad> for Dispatcher {
    type Result = LoadStats;
    fn handle(&mut self, _: GetLoad, _: &mut Context<Self>) -> LoadStats {
        let pools =
            self.pools.iter().map(|(kind, p)| (*kind, self.store.queued(*kind), p.in_flight, p.workers)).collect();
        LoadStats { pools, by_status: self.store.stats().by_status }
    }
}

/// Whether new work can be taken.
#[derive(Message)]
#[rtype(result = "ReadyState")]
pub struct Readiness;

#[derive(Debug, Clone, PartialEq, Eq, MessageResponse)]
pub struct ReadyState {
    pub draining: bool,
    /// Pools whose threads are gone.
    pub pools_down: Vec<JobKind>,
}

impl Handler<Readiness> for Dispatcher {
    type Result = ReadyState;
    fn handle(&mut self, _: Readiness, _: &mut Context<Self>) -> ReadyState {
        let mut pools_down: Vec<JobKind> =
            self.pools.iter().filter(|(_, p)| !p.recipient.connected()).map(|(k, _)| *k).collect();
        pools_down.sort_by_key(|k| k.as_str());
        ReadyState { draining: self.draining.is_some(), pools_down }
    }
}

/// Stop taking jobs; resolve when every accepted job has ended, or when `grace` is over (then
/// whatever is left fails with `shutdown`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain {
    pub grace: Duration,
}

impl Handler<Drain> for Dispatcher {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: Drain, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        if self.draining.is_none() {
            tracing::info!(pending = self.pending(), grace_secs = msg.grace.as_secs_f64(), "draining");
            ctx.run_later(msg.grace, |this, ctx| {
                if this.pending() > 0 {
                    tracing::warn!(pending = this.pending(), "grace period over; stopping the remaining jobs");
                }
                this.stop_everything(ctx);
            });
        }
        self.draining.get_or_insert_with(Vec::new).push(tx);
        self.check_drained();
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

/// Follow jobs: their current state goes into `outbox` at once, then every change.
#[derive(Message)]
#[rtype(result = "Vec<JobId>")]
pub struct Subscribe {
    /// The connection, for unsubscribe and cleanup.
    pub conn: u64,
    pub outbox: Arc<Outbox>,
    pub ids: Vec<JobId>,
}

impl Handler<Subscribe> for Dispatcher {
    /// The ids that are not known jobs.
    type Result = MessageResult<Subscribe>;

    fn handle(&mut self, msg: Subscribe, _: &mut Context<Self>) -> Self::Result {
        let mut unknown = Vec::new();
        for id in msg.ids {
            let Some(job) = self.store.get(id) else {
                unknown.push(id);
                continue;
            };
            msg.outbox.push(job);
            if !self.followed.entry(msg.conn).or_default().insert(id) {
                continue;
            }
            self.watchers.entry(id).or_default().push(Watcher { conn: msg.conn, outbox: msg.outbox.clone() });
        }
        MessageResult(unknown)
    }
}

/// Stop following jobs (`ids: None`: all of them, the connection is gone).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unsubscribe {
    pub conn: u64,
    pub ids: Option<Vec<JobId>>,
}

impl Handler<Unsubscribe> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: Unsubscribe, _: &mut Context<Self>) {
        let ids: Vec<JobId> = match msg.ids {
            Some(ids) => {
                if let Some(set) = self.followed.get_mut(&msg.conn) {
                    ids.iter().for_each(|id| {
                        set.remove(id);
                    });
                }
                ids
            }
            None => self.followed.remove(&msg.conn).map(|s| s.into_iter().collect()).unwrap_or_default(),
        };
        for id in ids {
            if let Some(list) = self.watchers.get_mut(&id) {
                list.retain(|w| w.conn != msg.conn);
                if list.is_empty() {
                    self.watchers.remove(&id);
                }
            }
        }
    }
}
