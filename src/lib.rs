//! offload: take heavy work off the request path.
//!
//! An HTTP service (actix-web 4) whose handlers only validate and hand a job to the
//! [`dispatch::Dispatcher`] actor, answering `202 Accepted` at once. The Dispatcher owns all job
//! state (behind the narrow [`store::JobStore`] interface), bounds how much work is accepted,
//! and feeds jobs to `SyncArbiter`-hosted worker pools, one pool per kind of work.
//!
//! Data flows one way: handler → Dispatcher → worker → Dispatcher → store → readers (polling
//! clients, WebSocket outboxes) and the async I/O arbiter (job events, webhooks).
//!
//! Crate map, each layer importing only the ones below it (a test, `tests/api/architecture.rs`,
//! checks that no import runs back up, and that only start-up names the kinds):
//! - Start-up, at the top:
//!   - [`startup`]: builds the whole application on any `TcpListener` (tests bind port 0), with
//!     the built-in kinds and any of your own ([`startup::KindRegistration`]).
//!   - [`kinds`]: the kinds of work built in, one folder each ([`kinds::pdf`], [`kinds::image`]):
//!     request types, runner, routes, OpenAPI paths. Nothing but start-up imports them.
//!   - [`configuration`]: every setting, as a flag and an `OFFLOAD_*` environment variable, in
//!     groups per concern. [`telemetry`]: the `tracing` subscriber and the panic hook.
//!     [`shutdown`]: SIGTERM/SIGINT: drain, grace period, stop. [`healthcheck`]: the container probe.
//! - The HTTP edge: [`routes`] (thin handlers, the JSON error format for everything actix
//!   answers, the OpenAPI document, the route table kinds add to) and [`realtime`] (WebSocket
//!   progress: per-connection coalescing outboxes, the hub).
//! - The engine: [`dispatch`] (admission, claims for the pools, timers, draining, and the
//!   decisions beside it), [`workers`] (the pool actor and its panic boundary), [`async_io`]
//!   (analytics and webhooks on their own arbiter), [`access`] (API keys: who is calling, which
//!   jobs they see), [`metrics`] (Prometheus).
//! - [`store`]: job records behind one seam: in memory, the embedded durable SQLite store, or
//!   PostgreSQL shared by several instances. It sees a kind's name and bytes, nothing more.
//! - The vocabulary, at the bottom: [`kind`] (the [`kind::Kind`] trait every kind implements, the
//!   context a run sees), [`job`] (id, kind name, status, the state machine), [`domain`] (request
//!   types every kind shares: callback URLs, JSON objects, a payload's stored form), [`error`]
//!   (the JSON error body), [`clock`] (the wall clock jobs are dated by), [`process`] (OS-level
//!   helpers: thread names and priorities, no transparent huge pages, panic text).

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
