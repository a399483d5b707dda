//! offload: take heavy work off the request path.
//!
//! An HTTP service (actix-web 4) whose handlers only validate and hand a job to the
//! [`dispatch::Dispatcher`] actor, answering `202 Accepted` at once. The Dispatcher owns all job
//! state (behind the narrow [`store::JobStore`] interface), bounds how much work is accepted,
//! and feeds CPU-bound jobs to `SyncArbiter`-hosted worker pools, one pool per job kind.
//!
//! Data flows one way: handler → Dispatcher → worker → Dispatcher → readers (polling clients,
//! WebSocket outboxes) and the async I/O arbiter (job events, webhooks).
//!
//! Crate map:
//! - [`access`]: API keys: who is calling (the `Caller` extractor), which jobs they see.
//! - [`async_io`]: the async I/O arbiter: analytics (count, forward to a sink) and webhooks.
//! - [`configuration`]: every setting, as a flag and an `OFFLOAD_*` environment variable.
//! - [`telemetry`]: `tracing` subscriber (human-readable or JSON) and the panic hook.
//! - [`startup`]: builds the whole application on any `TcpListener` (tests bind port 0).
//! - [`shutdown`]: SIGTERM/SIGINT handling: drain, grace period, stop.
//! - [`routes`]: thin HTTP handlers and the JSON error format for everything actix answers.
//! - [`domain`]: "parse, don't validate" request types (the PDF document spec).
//! - [`realtime`]: WebSocket progress: per-connection coalescing outboxes, the connection task.
//! - [`dispatch`]: the Dispatcher actor: admission, claims for the pools, timers, draining.
//! - [`store`]: job records behind one seam: in memory, the embedded durable SQLite store, or
//!   PostgreSQL shared by several instances.
//! - [`workers`]: the worker actor, the panic boundary and the PDF renderer.
//! - [`error`]: the JSON error body shared by every error type.
//! - [`metrics`]: Prometheus metrics and the request-timing middleware.
//! - [`healthcheck`]: `offload --healthcheck`, the container health probe.
//! - [`clock`]: the wall clock jobs are dated by (test builds can put it off).
//! - [`job`]: the job vocabulary (id, kind, status, the state machine); imports nothing above it.
//! - [`process`]: OS-level helpers (thread names and priorities, no transparent huge pages, panic text).

pub mod access;
pub mod async_io;
pub mod clock;
pub mod configuration;
pub mod dispatch;
pub mod domain;
pub mod error;
pub mod healthcheck;
pub mod job;
pub mod kind;
pub mod kinds;
pub mod metrics;
pub mod process;
pub mod realtime;
pub mod routes;
pub mod shutdown;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod workers;
