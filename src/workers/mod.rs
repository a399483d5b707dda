//! The worker side: the actor hosted by each `SyncArbiter` pool (one pool per kind, running that
//! kind's [`Runner`]) and the panic boundary around every job. What a running job sees (its
//! context, its outcome) is the kinds' vocabulary, in [`crate::kind::context`].
//!
//! A worker never waits on anything but its own work: it reports to the Dispatcher with
//! `do_send` (fire and forget) and checks its job's control flag between steps.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;

use crate::error::ErrorBody;
use crate::job::JobId;
pub use crate::kind::context::{
    Interrupt, JobContext, JobControl, JobFailure, JobOutput, Outcome, StartHook, WorkerEvent,
};
use crate::kind::{Runner, Work};
use crate::process::WorkerSched;

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
        let mut job = JobContext::new(id, control, deadline, events.clone());
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
