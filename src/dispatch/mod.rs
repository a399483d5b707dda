//! The Dispatcher actor: admission (backpressure), claiming queued jobs from the store for the
//! worker pools, timeouts, cancel, expiry sweeps and draining. Job records live in the
//! [`store`](crate::store); WebSocket subscriptions in the [`realtime`](crate::realtime) hub.

pub mod dispatcher;

pub use dispatcher::{
    Admission, CancelError, CancelJob, Dispatcher, Drain, GetLoad, LoadStats, Observers, Pool, Readiness, ReadyState,
    Submit, SubmitError, Submitted,
};
