//! The worker side: the actor hosted by each `SyncArbiter` pool (one pool per kind, running that
//! kind's [`Runner`]), the context a running job uses to
//! report progress and notice cancellation, and the panic boundary around every job.
//!
//! A worker never waits on anything but its own work: it reports to the Dispatcher with
//! `do_send` (fire and forget) and checks its job's control flag between steps.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;

use crate::configuration::WorkerSched;
use crate::error::ErrorBody;
use crate::job::JobId;
use crate::kind::{Runner, Work};

/// Hand a job to a pool. Sent by the Dispatcher only when a worker is free, so the pool's own
/// (unbounded) mailbox never holds more than one message per thread.
pub struct Execute {
    pub id: JobId,
    /// The attempt this run is (the job's `attempts` once claimed): the start hook notes it.
    pub attempt: u32,
    /// Its input, as accepted here or as stored.
    pub work: Work,
    /// Shared with the Dispatcher, which raises it on cancel, timeout or shutdown.
    pub control: JobControl,
    /// The worker gives up at its next checkpoint past this instant.
    pub deadline: Instant,
    /// Where the worker reports; the Dispatcher's address.
    pub events: Recipient<WorkerEvent>,
}

impl Message for Execute {
    type Result = ();
}

/// What workers tell the Dispatcher, in order, for each job.
#[derive(Debug)]
pub enum WorkerEvent {
    Started { id: JobId },
    Progress { id: JobId, fraction: f32, stage: String },
    Finished { id: JobId, outcome: Outcome, elapsed: Duration },
}

impl Message for WorkerEvent {
    type Result = ();
}

pub type Outcome = Result<JobOutput, JobFailure>;

/// A finished job's product.
#[derive(Debug)]
pub struct JobOutput {
    pub bytes: Bytes,
    pub content_type: &'static str,
    pub filename: String,
    pub dimensions: Option<(u32, u32)>,
}

#[derive(Debug)]
pub enum JobFailure {
    /// Stopped at a checkpoint because the Dispatcher (or the deadline) said so.
    Interrupted(Interrupt),
    /// The job itself failed, with a stable code.
    Error(ErrorBody),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Interrupt {
    Cancelled = 1,
    TimedOut = 2,
    Shutdown = 3,
}

/// A job's stop flag, shared by the Dispatcher (writer) and the worker (reader).
#[derive(Clone, Debug, Default)]
pub struct JobControl(Arc<AtomicU8>);

impl JobControl {
    /// Asks the job to stop at its next checkpoint; the first reason given wins.
    pub fn interrupt(&self, why: Interrupt) {
        let _ = self.0.compare_exchange(0, why as u8, Ordering::AcqRel, Ordering::Acquire);
    }

    pub fn interrupted(&self) -> Option<Interrupt> {
        match self.0.load(Ordering::Acquire) {
            1 => Some(Interrupt::Cancelled),
            2 => Some(Interrupt::TimedOut),
            3 => Some(Interrupt::Shutdown),
            _ => None,
        }
    }
}

/// Least time between two progress reports of one job: bounds the Dispatcher's mailbox traffic
/// however fast pages render, while staying well under the 50 ms a client may see.
const PROGRESS_EVERY: Duration = Duration::from_millis(10);

/// What a running job uses to talk to the outside world.
pub struct JobContext {
    id: JobId,
    control: JobControl,
    deadline: Instant,
    /// Where progress goes; `None` for work run outside the service (benchmarks).
    events: Option<Recipient<WorkerEvent>>,
    /// When progress was last sent, for throttling.
    last_progress: Option<Instant>,
}

impl JobContext {
    /// A context for running a job's code outside the service (the raw benchmark loop): no
    /// deadline to speak of, progress computed and throttled as usual but sent nowhere.
    pub fn detached() -> Self {
        JobContext {
            id: JobId::random(),
            control: JobControl::default(),
            deadline: Instant::now() + std::time::Duration::from_secs(86_400),
            events: None,
            last_progress: None,
        }
    }

    /// `Err` when the job must stop now: cancelled, past its deadline, or shutting down.
    pub fn checkpoint(&self) -> Result<(), JobFailure> {
        if let Some(why) = self.control.interrupted() {
            return Err(JobFailure::Interrupted(why));
        }
        if Instant::now() >= self.deadline {
            self.control.interrupt(Interrupt::TimedOut);
            return Err(JobFailure::Interrupted(Interrupt::TimedOut));
        }
        Ok(())
    }

    /// Reports progress (0..1) and a stage text, at most once per [`PROGRESS_EVERY`].
    pub fn progress(&mut self, fraction: f32, stage: impl FnOnce() -> String) {
        let now = Instant::now();
        if self.last_progress.is_some_and(|t| now.duration_since(t) < PROGRESS_EVERY) {
            return;
        }
        self.last_progress = Some(now);
        let stage = stage();
        if let Some(events) = &self.events {
            events.do_send(WorkerEvent::Progress { id: self.id, fraction, stage });
        }
    }
}

/// Called on the worker thread right before a job runs: lets a durable store note the start
/// and attempt where a crash of the process cannot lose them (see `store::sqlite::StartLog`).
pub type StartHook = Arc<dyn Fn(JobId, u32) + Send + Sync>;

/// The actor each pool thread runs: one kind's runner. Stateless: all job state lives with the
/// Dispatcher and the store.
pub struct JobWorker {
    on_start: Option<StartHook>,
    runner: Arc<dyn Runner>,
}

impl JobWorker {
    /// The pool factory: called on each pool thread as it starts. Lowers the thread's scheduling
    /// priority (Linux: nice values and scheduling classes are per thread): `nice`, and with
    /// [`WorkerSched::Idle`] the `SCHED_IDLE` class, so that when the workers keep every core busy,
    /// HTTP and event-loop threads still run first and stay responsive. Names the thread `name`
    /// (≤ 15 bytes) so that `top -H`, `perf` and `/proc` tell workers from HTTP threads.
    pub fn on_pool_thread(
        name: &std::ffi::CStr,
        nice: i32,
        sched: WorkerSched,
        on_start: Option<StartHook>,
        runner: Arc<dyn Runner>,
    ) -> Self {
        crate::process::name_thread(name);
        crate::process::lower_priority(nice, sched);
        JobWorker { on_start, runner }
    }
}

impl Actor for JobWorker {
    type Context = SyncContext<Self>;
}

impl Handler<Execute> for JobWorker {
    type Result = ();

    fn handle(&mut self, msg: Execute, _: &mut SyncContext<Self>) {
        let Execute { id, attempt, work, control, deadline, events } = msg;
        let started = Instant::now();
        let mut job = JobContext { id, control, deadline, events: Some(events.clone()), last_progress: None };
        let outcome = match job.checkpoint() {
            Err(stopped) => Err(stopped),
            Ok(()) => {
                if let Some(hook) = &self.on_start {
                    hook(id, attempt);
                }
                events.do_send(WorkerEvent::Started { id });
                let runner = &self.runner;
                run_guarded(|| runner.run(work, &mut job))
            }
        };
        events.do_send(WorkerEvent::Finished { id, outcome, elapsed: started.elapsed() });
    }
}

/// The panic boundary: a panicking job fails with `worker_panic` and its thread lives on (a
/// `SyncArbiter` thread that unwinds is gone for good, shrinking the pool).
pub fn run_guarded(work: impl FnOnce() -> Outcome) -> Outcome {
    catch_unwind(AssertUnwindSafe(work)).unwrap_or_else(|panic| {
        Err(JobFailure::Error(ErrorBody::new(
            "worker_panic",
            format!("the job crashed inside its worker: {}", crate::process::panic_message(panic.as_ref())),
        )))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_a_failed_outcome() {
        let outcome = run_guarded(|| panic!("boom"));
        match outcome {
            Err(JobFailure::Error(e)) => {
                assert_eq!(e.code, "worker_panic");
                assert!(e.message.contains("boom"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn the_first_interrupt_wins() {
        let c = JobControl::default();
        assert_eq!(c.interrupted(), None);
        c.interrupt(Interrupt::TimedOut);
        c.interrupt(Interrupt::Cancelled);
        assert_eq!(c.interrupted(), Some(Interrupt::TimedOut));
    }
}
