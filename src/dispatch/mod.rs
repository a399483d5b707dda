//! The Dispatcher actor and the job state it owns.
//!
//! - [`job`]: ids, kinds, statuses and the job state machine.
//! - [`store`]: the narrow [`JobStore`] interface and its in-memory implementation.
//! - [`dispatcher`]: the actor: admission (backpressure), routing to pools, timeouts, cancel,
//!   expiry and draining.

pub mod dispatcher;
pub mod store;

pub use crate::job::{Job, JobId, JobKind, JobStatus, ResultMeta};
pub use dispatcher::{
    Admission, CancelError, CancelJob, Dispatcher, Drain, GetJob, GetLoad, GetResult, ListJobs, LoadStats, Observers,
    Pool, Readiness, ReadyState, ResultError, Submit, SubmitError, Subscribe, Unsubscribe,
};
pub use store::{JobStore, ListFilter, MemoryStore, Retention};
