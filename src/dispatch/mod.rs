//! The Dispatcher actor: admission (backpressure), claiming queued jobs from the store for the
//! worker pools, timeouts, cancel, expiry sweeps and draining. Job records live in the
//! [`store`](crate::store); WebSocket subscriptions in the [`realtime`](crate::realtime) hub.
//!
//! The Dispatcher's decisions that need no actor live beside it, each with its own tests:
//! - `suspect`: when a job cut off by a crash may be claimed, alone.
//! - `progress`: when a running job's progress is pushed to its followers.
//! - `ended`: what must happen once a job ends (metrics, analytics, owner counts, webhook).
//! - `drain`: what a shutdown does with running and queued jobs, by what the store keeps.
//! - `owners`: who counts each API key's pending jobs, and until when.

pub mod dispatcher;
mod drain;
mod ended;
mod owners;
mod progress;
mod suspect;

pub use dispatcher::{
    Admission, CancelError, CancelJob, Dispatcher, Drain, GetLoad, LoadStats, Observers, Pool, Readiness, ReadyState,
    Submit, SubmitError, Submitted,
};
