//! What a running job sees: its [`JobContext`] (progress, cancellation, its deadline), what it
//! returns ([`Outcome`]), and what it reports to the Dispatcher ([`WorkerEvent`]). Kinds use these;
//! the worker pools (`crate::workers`) host the runs.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;

use crate::error::ErrorBody;
use crate::job::JobId;

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
    /// Fields the job's `result` shows beside its type and size (an image's `width`, `height`).
    pub extra: crate::job::ResultExtra,
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
    /// A run's context: `control` is its stop flag, `events` where it reports.
    pub(crate) fn new(id: JobId, control: JobControl, deadline: Instant, events: Recipient<WorkerEvent>) -> Self {
        JobContext { id, control, deadline, events: Some(events), last_progress: None }
    }

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
