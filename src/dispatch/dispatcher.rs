//! The Dispatcher: admission, handing jobs to pools, and the timers around running jobs.
//!
//! Handlers send it submissions and cancels; workers send it events with `do_send`. It never
//! awaits a worker or a client: store writes are futures it spawns on its own context, and it
//! publishes job changes to the [`Hub`] and the observers without waiting. Reads (`GET /jobs…`)
//! do not come here at all: handlers read the store.
//!
//! Each pool is fed at most `1 + PREFETCH` claimed jobs per thread (one running, the others
//! waiting in the pool's own, unbounded, mailbox), so a claim's commit is hidden behind the jobs
//! before it; the rest stays queued in the store, bounded by [`Admission`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;

use super::drain::{self, Draining, Held, ShutdownPolicy};
use super::ended::{self, job_props, Effect};
use super::owners::Owners;
use super::progress::{self, Push};
use super::suspect::{Claim, Suspect};
use crate::async_io::analytics::{AnalyticsHandle, Event};
use crate::async_io::webhooks::Deliver;
use crate::domain::callback::CallbackUrl;
use crate::domain::PayloadRecord;
use crate::error::ErrorBody;
use crate::job::{Job, JobId, JobKind, JobStatus, Owner, ResultMeta};
use crate::kind::NewWork;
use crate::metrics::Metrics;
use crate::realtime::Hub;
use crate::store::{
    CancelOutcome, Claimed, Final, IdempotencyKey, Inserted, JobStore, NewJob, StatusCounts, StoreError,
};
use crate::workers::{Execute, Interrupt, JobControl, JobFailure, Outcome, WorkerEvent};

/// How much work is accepted.
#[derive(Clone, Copy, Debug)]
pub struct Admission {
    /// Most jobs per pool, queued plus running.
    pub max_pending: usize,
    /// Most payload bytes held by queued jobs, all pools together.
    pub max_queued_bytes: usize,
    /// Most jobs of one API key, queued plus running, all pools together (`None`: no limit).
    pub max_pending_per_key: Option<usize>,
    /// Running time after which a job fails with `timeout`.
    pub job_timeout: Duration,
}

/// A worker pool as the Dispatcher sees it.
pub struct Pool {
    /// The pool's `SyncArbiter` address.
    pub recipient: Recipient<Execute>,
    /// Threads in the pool.
    pub workers: usize,
    /// Jobs handed to the pool whose `Finished` event has not arrived yet.
    in_flight: usize,
    /// Claims sent to the store and not answered yet.
    claiming: usize,
    /// Recent job run time, seconds (exponentially weighted), for `Retry-After`.
    mean_secs: f64,
}

impl Pool {
    pub fn new(recipient: Recipient<Execute>, workers: usize) -> Self {
        Pool { recipient, workers, in_flight: 0, claiming: 0, mean_secs: 0.05 }
    }

    /// Jobs the pool may hold at once: per thread one running and [`PREFETCH`] waiting.
    fn capacity(&self) -> usize {
        self.workers.max(1) * (1 + PREFETCH)
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
    /// WebSocket subscriptions.
    pub hub: Arc<Hub>,
}

/// A job handed to a worker: waiting in the pool's mailbox until the worker starts it.
struct Running {
    /// The job as claimed, then started, with the progress reported since (what watchers get).
    job: Job,
    control: JobControl,
    /// The timeout timer, cancelled when the job finishes.
    timer: SpawnHandle,
}

pub struct Dispatcher {
    store: Arc<dyn JobStore>,
    /// Suspects (see [`JobStore::claim_suspect`]) run one at a time with nothing beside them.
    suspect: Suspect,
    pools: HashMap<JobKind, Pool>,
    running: HashMap<JobId, Running>,
    admission: Admission,
    /// Admitted jobs whose insert has not committed yet, per kind, and their bytes: counted
    /// against the limits like queued ones, so concurrent submissions cannot overshoot them.
    reserved: HashMap<JobKind, usize>,
    reserved_bytes: usize,
    /// With `--max-pending-per-key`, each API key owner's jobs admitted here (see [`Owners`]).
    owners: Owners,
    /// A pump of every pool is scheduled (after a failed claim).
    retry_scheduled: bool,
    /// How often finished jobs are checked for expiry.
    sweep_every: Duration,
    /// An expiry sweep is in progress.
    sweeping: bool,
    /// The shutdown's drain, as the store's policy has it, and the writes it waits for.
    drain: Draining,
    /// When progress of each watched job is pushed.
    progress: progress::Throttle,
    observers: Observers,
}

/// Claimed jobs waiting in a pool's mailbox per thread: enough that a claim's commit (an fsync,
/// ~0.3-2 ms here) hides behind the jobs before it even when jobs take half a millisecond.
const PREFETCH: usize = 3;
/// How long to wait before retrying a store write that failed (disk full, I/O error).
const STORE_RETRY: Duration = Duration::from_secs(1);

impl Dispatcher {
    pub fn new(
        store: Arc<dyn JobStore>,
        pools: HashMap<JobKind, Pool>,
        admission: Admission,
        ttl: Duration,
        observers: Observers,
        owners: HashMap<Owner, usize>,
    ) -> Self {
        let sweep_every =
            crate::clock::sweep_every((ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(10)));
        let capabilities = store.capabilities();
        let limited = admission.max_pending_per_key.is_some();
        let owners = Owners::new(limited, capabilities.counts_owners, owners);
        Dispatcher {
            store,
            suspect: Suspect::Idle,
            pools,
            running: HashMap::new(),
            admission,
            reserved: HashMap::new(),
            reserved_bytes: 0,
            owners,
            retry_scheduled: false,
            sweep_every,
            sweeping: false,
            drain: Draining::new(ShutdownPolicy::of(capabilities)),
            progress: progress::Throttle::default(),
            observers,
        }
    }

    /// A job changed status: tell its watchers, and if it ended, everyone else.
    fn changed(&mut self, job: &Job) {
        self.observers.hub.publish(job);
        if job.status.is_terminal() {
            self.progress.ended(job.id);
            self.ended(job);
        }
    }

    /// A job reached its final state: count it, record the event, send its webhook.
    fn ended(&mut self, job: &Job) {
        for effect in ended::effects(job, self.owners.until_end()) {
            let o = &self.observers;
            match effect {
                Effect::Count { kind, status, ran } => {
                    o.metrics.jobs_finished.with_label_values(&[kind, status]).inc();
                    if let Some(ran) = ran {
                        o.metrics.job_duration.with_label_values(&[kind, status]).observe(ran.as_secs_f64());
                    }
                }
                Effect::Record(event) => o.analytics.record(event),
                Effect::OwnerSettled(owner) => self.owners.settled(owner, 1),
                Effect::Webhook(deliver) => o.webhooks.do_send(deliver),
            }
        }
    }

    /// Progress to watchers, throttled (see [`progress`]); a delayed push carries the latest value.
    fn push_progress(&mut self, id: JobId, ctx: &mut Context<Self>) {
        match self.progress.progressed(id, Instant::now()) {
            Push::Now => {
                if let Some(r) = self.running.get(&id) {
                    self.observers.hub.publish(&r.job);
                }
            }
            Push::After(delay) => {
                ctx.run_later(delay, move |this, _| {
                    if this.progress.due(id, Instant::now()) {
                        if let Some(r) = this.running.get(&id).filter(|r| r.job.status == JobStatus::Running) {
                            this.observers.hub.publish(&r.job);
                        }
                    }
                });
            }
            Push::Scheduled => {}
        }
    }

    /// Claims queued jobs of `kind` while its pool has room. Jobs cut off by a crash go first,
    /// each alone: nothing else is claimed while one waits to run or runs.
    fn pump(&mut self, kind: JobKind, ctx: &mut Context<Self>) {
        if !self.drain.may_claim() {
            return;
        }
        let busy = !self.running.is_empty() || self.pools.values().any(|p| p.claiming > 0);
        match self.suspect.next(self.store.stats().suspects, busy) {
            Claim::Nothing => return,
            Claim::Suspect => {
                if let Some(claim) = self.store.claim_suspect() {
                    self.suspect.claiming();
                    ctx.spawn(claim.into_actor(self).map(|res, this, ctx| this.on_suspect_claimed(res, ctx)));
                    return;
                }
            }
            Claim::Queued => {}
        }
        loop {
            let Some(pool) = self.pools.get_mut(&kind) else { return };
            if pool.in_flight + pool.claiming >= pool.capacity() {
                return;
            }
            // The job leaves the store's queue count now and is counted in `claiming` instead.
            let Some(claim) = self.store.claim(kind) else { return };
            pool.claiming += 1;
            ctx.spawn(claim.into_actor(self).map(move |res, this, ctx| this.on_claimed(kind, res, ctx)));
        }
    }

    fn on_claimed(&mut self, kind: JobKind, res: Result<Option<Claimed>, StoreError>, ctx: &mut Context<Self>) {
        if let Some(pool) = self.pools.get_mut(&kind) {
            pool.claiming -= 1;
        }
        match res {
            Ok(Some(claimed)) => self.hand_to_pool(claimed, ctx),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(kind = kind.as_str(), "cannot claim a job: {e}");
                self.retry_pump(ctx);
                self.check_drained();
                return;
            }
        }
        self.pump(kind, ctx);
        self.check_drained();
    }

    fn on_suspect_claimed(&mut self, res: Result<Option<Claimed>, StoreError>, ctx: &mut Context<Self>) {
        self.suspect.claimed(None);
        match res {
            Ok(Some(claimed)) => {
                let id = claimed.job.id;
                tracing::warn!(job = %id, attempt = claimed.job.attempts, "running a job cut off by a crash, alone");
                self.hand_to_pool(claimed, ctx);
                self.suspect.claimed(self.running.contains_key(&id).then_some(id));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("cannot claim a job cut off by a crash: {e}");
                self.retry_pump(ctx);
                self.check_drained();
                return;
            }
        }
        self.pump_all(ctx);
        self.check_drained();
    }

    fn pump_all(&mut self, ctx: &mut Context<Self>) {
        let kinds: Vec<JobKind> = self.pools.keys().copied().collect();
        for kind in kinds {
            self.pump(kind, ctx);
        }
    }

    /// Pumps every pool again after [`STORE_RETRY`] (a claim failed); one timer at a time.
    fn retry_pump(&mut self, ctx: &mut Context<Self>) {
        if !self.retry_scheduled {
            self.retry_scheduled = true;
            ctx.run_later(STORE_RETRY, |this, ctx| {
                this.retry_scheduled = false;
                this.pump_all(ctx);
            });
        }
    }

    fn hand_to_pool(&mut self, claimed: Claimed, ctx: &mut Context<Self>) {
        let Claimed { job, work, .. } = claimed;
        let (id, kind) = (job.id, job.kind);
        let control = JobControl::default();
        let deadline = Instant::now() + self.admission.job_timeout;
        let Some(pool) = self.pools.get_mut(&kind) else { return };
        let msg = Execute {
            id,
            attempt: job.attempts,
            work,
            control: control.clone(),
            deadline,
            events: ctx.address().recipient(),
        };
        if let Err(err) = pool.recipient.try_send(msg) {
            tracing::error!(job = %id, kind = kind.as_str(), "worker pool unavailable: {err}");
            let error = ErrorBody::new("pool_unavailable", "the worker pool is not running");
            self.finish(id, job.attempts, Final::Failed(error), ctx);
            return;
        }
        pool.in_flight += 1;
        if self.drain.stops_claimed() {
            // Claimed just before the drain began: it never starts, and goes back to the queue.
            control.interrupt(Interrupt::Shutdown);
        }
        let timer = ctx.run_later(self.admission.job_timeout, move |this, ctx| this.time_out(id, ctx));
        self.running.insert(id, Running { job, control, timer });
    }

    /// A worker started a job: it is running now (readers and watchers see it at once).
    fn on_started(&mut self, id: JobId, ctx: &mut Context<Self>) {
        let Some(running) = self.running.get_mut(&id) else { return };
        // Cancelled, timed out or stopped while its worker picked it up: its end is being
        // written; it must not be shown running again.
        if running.control.interrupted().is_some() {
            return;
        }
        let now = crate::clock::now();
        if !running.job.start(now) {
            return;
        }
        let attempt = running.job.attempts;
        let job = running.job.clone();
        let write = self.store.start(id, attempt, now);
        ctx.spawn(write.into_actor(self).map(move |res, _, _| {
            if let Err(e) = res {
                // Readers already see it running; the final write records the start too.
                tracing::warn!(job = %id, "cannot record the job's start: {e}");
            }
        }));
        self.changed(&job);
    }

    /// A run stopped by a shutdown goes back to the queue, for the next start.
    fn release(&mut self, id: JobId, attempt: u32, ctx: &mut Context<Self>) {
        self.drain.releasing += 1;
        let write = self.store.release(id, attempt);
        ctx.spawn(write.into_actor(self).map(move |res, this, _| {
            this.drain.releasing -= 1;
            match res {
                Ok(true) => {
                    tracing::info!(job = %id, "job stopped by the shutdown; it runs again after the next start")
                }
                Ok(false) => {}
                Err(e) => tracing::error!(job = %id, "cannot queue the job again (the next start will): {e}"),
            }
            this.check_drained();
        }));
    }

    fn time_out(&mut self, id: JobId, ctx: &mut Context<Self>) {
        if let Some(running) = self.running.get(&id) {
            running.control.interrupt(Interrupt::TimedOut);
            tracing::warn!(job = %id, "job timed out");
            let attempt = running.job.attempts;
            self.finish(id, attempt, Final::Failed(self.timeout_error()), ctx);
        }
    }

    /// Writes a run's end (fenced on its attempt); retried while the store cannot write, so the
    /// job never stays `running` for good.
    fn finish(&mut self, id: JobId, attempt: u32, outcome: Final, ctx: &mut Context<Self>) {
        let retry = outcome.clone();
        let write = self.store.finish(id, attempt, outcome);
        self.drain.finishing += 1;
        ctx.spawn(write.into_actor(self).map(move |res, this, ctx| {
            this.drain.finishing -= 1;
            match res {
                Ok(Some(job)) => {
                    let (kind, status) = (job.kind.as_str(), job.status.as_str());
                    tracing::info!(job = %id, kind, status, attempt, "job finished");
                    this.changed(&job);
                }
                Ok(None) => tracing::debug!(job = %id, attempt, "completion refused: this run no longer holds the job"),
                Err(e) => {
                    tracing::warn!(job = %id, "cannot record the job's end, retrying: {e}");
                    this.drain.finishing += 1;
                    ctx.run_later(STORE_RETRY, move |this, ctx| {
                        this.drain.finishing -= 1;
                        this.finish(id, attempt, retry, ctx)
                    });
                }
            }
            this.check_drained();
        }));
    }

    fn on_finished(&mut self, id: JobId, outcome: Outcome, elapsed: Duration, ctx: &mut Context<Self>) {
        let Some(running) = self.running.remove(&id) else { return };
        ctx.cancel_future(running.timer);
        let kind = running.job.kind;
        if let Some(pool) = self.pools.get_mut(&kind) {
            pool.in_flight -= 1;
            pool.mean_secs = 0.8 * pool.mean_secs + 0.2 * elapsed.as_secs_f64();
        }
        let outcome = match outcome {
            Ok(out) => {
                let meta = ResultMeta {
                    content_type: out.content_type.to_string(),
                    bytes: out.bytes.len(),
                    filename: out.filename,
                    extra: out.extra,
                };
                Some(Final::Succeeded { meta, bytes: out.bytes })
            }
            Err(JobFailure::Error(error)) => Some(Final::Failed(error)),
            Err(JobFailure::Interrupted(Interrupt::TimedOut)) => Some(Final::Failed(self.timeout_error())),
            Err(JobFailure::Interrupted(Interrupt::Cancelled)) => Some(Final::Cancelled(None)),
            // Back to the queue for the next start, or failed when the grace period ended.
            Err(JobFailure::Interrupted(Interrupt::Shutdown)) => {
                if self.drain.policy().releases_stopped_runs() {
                    self.release(id, running.job.attempts, ctx);
                }
                None
            }
        };
        if let Some(outcome) = outcome {
            self.finish(id, running.job.attempts, outcome, ctx);
        }
        if self.suspect.finished(id) {
            self.pump_all(ctx);
        } else {
            self.pump(kind, ctx);
        }
        self.check_drained();
    }

    fn timeout_error(&self) -> ErrorBody {
        let secs = self.admission.job_timeout.as_secs_f64();
        ErrorBody::new("timeout", format!("the job ran longer than the {secs} s limit"))
    }

    /// Jobs accepted and not yet ended, per kind: queued in the store, being claimed, handed to
    /// the pool, and admitted but not yet committed.
    fn pending_of(&self, kind: JobKind) -> usize {
        let in_pool = self.pools.get(&kind).map_or(0, |p| p.in_flight + p.claiming);
        in_pool + self.store.stats().queued(kind) + self.reserved.get(&kind).copied().unwrap_or(0)
    }

    /// What a drain waits for (see [`Draining::outstanding`]).
    fn drain_outstanding(&self) -> usize {
        let claiming = self.pools.values().map(|p| p.claiming).sum();
        let accepted = self.pools.keys().map(|k| self.pending_of(*k)).sum();
        self.drain.outstanding(Held { running: self.running.len(), claiming, accepted })
    }

    fn check_drained(&mut self) {
        if self.drain.awaited() && self.drain_outstanding() == 0 {
            self.drain.resolve();
        }
    }

    /// The grace period is over: the runs still going stop, and the store's policy says what
    /// becomes of them and of the queue ([`drain::stop`]).
    fn stop_everything(&mut self, ctx: &mut Context<Self>) {
        for running in self.running.values() {
            running.control.interrupt(Interrupt::Shutdown);
        }
        let runs: Vec<(JobId, u32)> = self.running.iter().map(|(id, r)| (*id, r.job.attempts)).collect();
        let work = drain::stop(self.store.clone(), self.drain.policy(), runs);
        ctx.spawn(work.into_actor(self).map(|ended, this, _| {
            for job in &ended {
                this.changed(job);
            }
            this.drain.resolve();
        }));
    }

    /// Deletes finished jobs past their TTL; a store deletes them in bounded batches (short
    /// transactions), so while a batch found some, the next follows at once.
    fn sweep(&mut self, ctx: &mut Context<Self>) {
        if self.sweeping {
            return;
        }
        self.sweeping = true;
        let expire = self.store.expire(crate::clock::now());
        ctx.spawn(expire.into_actor(self).map(|res, this, ctx| {
            this.sweeping = false;
            match res {
                Ok(0) => {}
                Ok(expired) => {
                    tracing::debug!(expired, "finished jobs expired");
                    this.sweep(ctx);
                }
                Err(e) => tracing::warn!("expiry sweep failed: {e}"),
            }
        }));
    }

    fn retry_after(&self, kind: JobKind) -> u64 {
        let Some(pool) = self.pools.get(&kind) else { return 1 };
        let backlog = self.pending_of(kind) as f64;
        let secs = backlog * pool.mean_secs / pool.workers.max(1) as f64;
        secs.ceil().clamp(1.0, 60.0) as u64
    }
}

impl Actor for Dispatcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Handlers wait when the mailbox is full; keep it deep enough for bursts.
        ctx.set_mailbox_capacity(1024);
        ctx.run_interval(self.sweep_every, |this, ctx| {
            this.sweep(ctx);
            // A safety net: claims resume by themselves whatever stopped them.
            this.pump_all(ctx);
        });
        // What a shared store learns of other instances: work to claim, cancels, changes.
        let events = RemoteEvents {
            dispatcher: ctx.address(),
            hub: self.observers.hub.clone(),
            webhooks: self.observers.webhooks.clone(),
        };
        self.store.set_events(Arc::new(events));
        // Jobs recovered from the store run at once.
        self.pump_all(ctx);
    }
}

/// What other instances did, from a shared store: pumps woken, local runs of jobs cancelled
/// elsewhere stopped, changes published to this instance's followers.
struct RemoteEvents {
    dispatcher: Addr<Dispatcher>,
    hub: Arc<crate::realtime::Hub>,
    webhooks: Recipient<Deliver>,
}

impl crate::store::StoreEvents for RemoteEvents {
    fn claimable(&self) {
        self.dispatcher.do_send(Wake);
    }

    fn cancelled(&self, id: JobId) {
        self.dispatcher.do_send(StopRun(id));
    }

    fn changed(&self, job: Job) {
        self.hub.publish(&job);
    }

    fn wants(&self, id: JobId) -> bool {
        self.hub.is_watched(id)
    }

    fn watched(&self) -> Vec<JobId> {
        self.hub.watched()
    }

    fn owed(&self, hooks: Vec<crate::store::OwedWebhook>) {
        for w in hooks {
            self.webhooks.do_send(Deliver { job: w.job, owner: w.owner, url: w.url, body: w.body });
        }
    }
}

/// The store has claimable work this Dispatcher did not submit.
#[derive(Message)]
#[rtype(result = "()")]
struct Wake;

impl Handler<Wake> for Dispatcher {
    type Result = ();

    fn handle(&mut self, _: Wake, ctx: &mut Context<Self>) {
        self.pump_all(ctx);
    }
}

/// A job was cancelled by another instance: its run here stops at its next checkpoint (its end is
/// then refused by the store, which already holds the cancel).
#[derive(Message)]
#[rtype(result = "()")]
struct StopRun(JobId);

impl Handler<StopRun> for Dispatcher {
    type Result = ();

    fn handle(&mut self, StopRun(id): StopRun, _: &mut Context<Self>) {
        if let Some(running) = self.running.get(&id) {
            tracing::info!(job = %id, "job cancelled on another instance: stopping its run here");
            running.control.interrupt(Interrupt::Cancelled);
        }
    }
}

/// Accept new jobs, all or none (one upload may carry several images).
#[derive(Message)]
#[rtype(result = "Result<Submitted, SubmitError>")]
pub struct Submit {
    /// Each job's payload, as the worker needs it and as stored.
    pub jobs: Vec<(NewWork, PayloadRecord)>,
    /// Where each job's final state is POSTed.
    pub callback: Option<CallbackUrl>,
    pub key: Option<IdempotencyKey>,
    /// The API key's owner (the service runs with keys).
    pub owner: Option<Owner>,
}

/// The jobs of an accepted submission.
#[derive(Debug)]
pub struct Submitted {
    pub jobs: Vec<Job>,
    /// The key was seen before with this request: these are the first request's jobs.
    pub replayed: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// Too much work pending; try again after this many seconds.
    Overloaded { retry_after: u64, reason: String },
    /// Draining for shutdown.
    ShuttingDown,
    /// No pool runs this kind of job.
    NoPool(JobKind),
    /// The store cannot write; nothing was accepted.
    Storage(String),
    /// The store failed while committing: these jobs may exist (see [`StoreError::Uncertain`]).
    Uncertain { message: String, ids: Vec<JobId> },
    /// The idempotency key was used for another request.
    KeyReused,
    /// The request alone is more than the limits allow, so no retry can ever fit it (a 413, not
    /// a "retry later").
    NeverFits(String),
    /// A kind with a name no kind may have (a bug of the kind's, caught before anything is stored).
    UnknownKind(&'static str),
}

impl Handler<Submit> for Dispatcher {
    type Result = ResponseActFuture<Self, Result<Submitted, SubmitError>>;

    fn handle(&mut self, msg: Submit, _: &mut Context<Self>) -> Self::Result {
        let owner = msg.owner.filter(|_| self.admission.max_pending_per_key.is_some());
        let count = msg.jobs.len();
        let admitted = self.admit(msg);
        let (insert, wanted, weight) = match admitted {
            Ok(parts) => parts,
            Err(e) => {
                self.rejected(&e);
                return Box::pin(fut::ready(Err(e)));
            }
        };
        Box::pin(insert.into_actor(self).map(move |res, this, ctx| {
            for (kind, n) in &wanted {
                if let Some(r) = this.reserved.get_mut(kind) {
                    *r -= n;
                }
            }
            this.reserved_bytes -= weight;
            if let Some(owner) = owner {
                this.owners.inserted(owner, count, matches!(res, Ok(Inserted::Created(_))));
            }
            let outcome = match res {
                Ok(Inserted::Created(jobs)) => {
                    for job in &jobs {
                        this.observers.metrics.jobs_submitted.with_label_values(&[job.kind.as_str()]).inc();
                        this.observers.analytics.record(Event::internal("job_submitted", job_props(job)));
                    }
                    for kind in wanted.keys() {
                        this.pump(*kind, ctx);
                    }
                    Ok(Submitted { jobs, replayed: false })
                }
                Ok(Inserted::Replayed(jobs)) => Ok(Submitted { jobs, replayed: true }),
                Err(StoreError::KeyReused) => Err(SubmitError::KeyReused),
                Err(StoreError::Unavailable(m)) => Err(SubmitError::Storage(m)),
                Err(StoreError::Uncertain { message, ids }) => Err(SubmitError::Uncertain { message, ids }),
            };
            if let Err(e) = &outcome {
                this.rejected(e);
            }
            outcome
        }))
    }
}

type Admitted = (crate::store::Pending<Inserted>, HashMap<JobKind, usize>, usize);

impl Dispatcher {
    fn rejected(&self, e: &SubmitError) {
        let reason = match e {
            SubmitError::Overloaded { .. } => "overloaded",
            SubmitError::ShuttingDown => "shutting_down",
            SubmitError::NoPool(_) => "no_pool",
            SubmitError::Storage(_) | SubmitError::Uncertain { .. } => "storage_unavailable",
            SubmitError::KeyReused => "idempotency_key_reused",
            SubmitError::NeverFits(_) => "never_fits",
            SubmitError::UnknownKind(_) => "unknown_kind",
        };
        self.observers.metrics.jobs_rejected.with_label_values(&[reason]).inc();
    }

    /// Checks the limits and sends the insert; the jobs are reserved until it commits.
    fn admit(&mut self, msg: Submit) -> Result<Admitted, SubmitError> {
        if self.drain.started() {
            return Err(SubmitError::ShuttingDown);
        }
        if let Err(StoreError::Unavailable(m)) = self.store.health() {
            return Err(SubmitError::Storage(m));
        }
        let mut wanted: HashMap<JobKind, usize> = HashMap::new();
        let mut kinds = Vec::with_capacity(msg.jobs.len());
        for (work, _) in &msg.jobs {
            let kind = JobKind::named(work.name()).ok_or_else(|| SubmitError::UnknownKind(work.name()))?;
            *wanted.entry(kind).or_default() += 1;
            kinds.push(kind);
        }
        let first_kind = kinds[0];
        for (&kind, &count) in &wanted {
            // Without a pool here, only a shared store has someone else to run it.
            if !self.pools.contains_key(&kind) && !self.store.capabilities().shared {
                return Err(SubmitError::NoPool(kind));
            }
            let limit = self.admission.max_pending;
            if count > limit {
                return Err(SubmitError::NeverFits(format!(
                    "the request makes {count} {} jobs, more than the {limit} that may be pending",
                    kind.as_str()
                )));
            }
            let pending = self.pending_of(kind);
            if pending + count > self.admission.max_pending {
                let limit = self.admission.max_pending;
                let reason = format!("{pending} {} jobs are pending, the limit is {limit}", kind.as_str());
                return Err(SubmitError::Overloaded { retry_after: self.retry_after(kind), reason });
            }
        }
        if let (Some(limit), Some(owner)) = (self.admission.max_pending_per_key, msg.owner) {
            let count = msg.jobs.len();
            if count > limit {
                return Err(SubmitError::NeverFits(format!(
                    "the request makes {count} jobs, more than the {limit} this API key may have pending"
                )));
            }
            let pending = self.owners.pending(owner, self.store.owner_pending(owner));
            if pending + count > limit {
                let kind = first_kind;
                let reason = format!("this API key has {pending} jobs pending; its limit is {limit}");
                return Err(SubmitError::Overloaded { retry_after: self.retry_after(kind), reason });
            }
        }
        let weight: usize = msg.jobs.iter().map(|(w, _)| w.weight).sum();
        if weight > self.admission.max_queued_bytes {
            return Err(SubmitError::NeverFits(format!(
                "the request would hold about {weight} bytes while queued, more than the {} allowed for all queued jobs",
                self.admission.max_queued_bytes
            )));
        }
        let held = self.store.stats().queued_bytes + self.reserved_bytes;
        if held + weight > self.admission.max_queued_bytes {
            let kind = first_kind;
            let reason = "queued jobs hold as much memory as allowed".to_string();
            return Err(SubmitError::Overloaded { retry_after: self.retry_after(kind), reason });
        }
        let now = crate::clock::now();
        let jobs: Vec<NewJob> = msg
            .jobs
            .into_iter()
            .zip(kinds)
            .map(|((work, record), kind)| {
                let mut job = Job::new(JobId::random(), kind, now);
                job.callback = msg.callback.clone();
                job.owner = msg.owner;
                NewJob { job, payload: work.input, record, weight: work.weight }
            })
            .collect();
        for (kind, n) in &wanted {
            *self.reserved.entry(*kind).or_default() += n;
        }
        self.reserved_bytes += weight;
        if let (Some(_), Some(owner)) = (self.admission.max_pending_per_key, msg.owner) {
            self.owners.admitted(owner, jobs.len());
        }
        Ok((self.store.insert(jobs, msg.key), wanted, weight))
    }
}

impl Handler<WorkerEvent> for Dispatcher {
    type Result = ();

    fn handle(&mut self, event: WorkerEvent, ctx: &mut Context<Self>) {
        match event {
            WorkerEvent::Started { id } => self.on_started(id, ctx),
            WorkerEvent::Progress { id, fraction, stage } => {
                // Not after a cancel, a timeout or a shutdown: the run's end is being written.
                let live = |r: &&mut Running| r.job.status == JobStatus::Running && r.control.interrupted().is_none();
                let Some(running) = self.running.get_mut(&id).filter(live) else {
                    return;
                };
                if running.job.advance(fraction, Some(stage.clone())) {
                    self.store.progress(id, fraction, Some(stage));
                    if self.observers.hub.is_watched(id) {
                        self.push_progress(id, ctx);
                    }
                }
            }
            WorkerEvent::Finished { id, outcome, elapsed } => self.on_finished(id, outcome, elapsed, ctx),
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
    Storage(String),
}

impl Handler<CancelJob> for Dispatcher {
    type Result = ResponseActFuture<Self, Result<Job, CancelError>>;

    fn handle(&mut self, msg: CancelJob, _: &mut Context<Self>) -> Self::Result {
        let id = msg.0;
        let reason = ErrorBody::new("cancelled", "cancelled by a client request");
        let write = self.store.cancel(id, reason);
        Box::pin(write.into_actor(self).map(move |res, this, _| match res {
            Ok(CancelOutcome::Cancelled(job)) => {
                if let Some(running) = this.running.get(&id) {
                    running.control.interrupt(Interrupt::Cancelled);
                }
                tracing::info!(job = %id, "job cancelled");
                this.changed(&job);
                this.check_drained();
                Ok(job)
            }
            Ok(CancelOutcome::Finished(job)) => Err(CancelError::AlreadyFinished(Box::new(job))),
            Ok(CancelOutcome::Unknown) => Err(CancelError::NotFound),
            Err(e) => Err(CancelError::Storage(e.to_string())),
        }))
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
    pub result_bytes: usize,
    pub store_healthy: bool,
}

impl Handler<GetLoad> for Dispatcher {
    type Result = LoadStats;
    fn handle(&mut self, _: GetLoad, _: &mut Context<Self>) -> LoadStats {
        let stats = self.store.stats();
        let pools = self.pools.iter().map(|(kind, p)| (*kind, stats.queued(*kind), p.in_flight, p.workers)).collect();
        let store_healthy = self.store.health().is_ok();
        LoadStats { pools, by_status: stats.by_status, result_bytes: stats.result_bytes, store_healthy }
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
    /// Why the store cannot write, while it cannot.
    pub storage: Option<String>,
}

impl Handler<Readiness> for Dispatcher {
    type Result = ReadyState;
    fn handle(&mut self, _: Readiness, _: &mut Context<Self>) -> ReadyState {
        let mut pools_down: Vec<JobKind> =
            self.pools.iter().filter(|(_, p)| !p.recipient.connected()).map(|(k, _)| *k).collect();
        pools_down.sort_by_key(|k| k.as_str());
        let storage = self.store.health().err().map(|e| e.to_string());
        ReadyState { draining: self.drain.started(), pools_down, storage }
    }
}

/// Stop taking jobs; resolve when the drain is complete (see [`Dispatcher::drain_outstanding`])
/// or when `grace` is over.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain {
    pub grace: Duration,
}

impl Handler<Drain> for Dispatcher {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: Drain, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        if self.drain.wait(tx) {
            let queued: usize = self.store.stats().queued.total();
            let policy = self.drain.policy();
            tracing::info!(
                running = self.running.len(),
                queued,
                ?policy,
                grace_secs = msg.grace.as_secs_f64(),
                "draining"
            );
            if policy.stops_unstarted() {
                // Jobs waiting in a pool's mailbox never start: they stay queued for the next start.
                for running in self.running.values().filter(|r| r.job.status == JobStatus::Queued) {
                    running.control.interrupt(Interrupt::Shutdown);
                }
            }
            ctx.run_later(msg.grace, |this, ctx| {
                if this.drain_outstanding() > 0 {
                    tracing::warn!(running = this.running.len(), "grace period over; stopping the remaining jobs");
                }
                this.stop_everything(ctx);
            });
        }
        self.check_drained();
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}
