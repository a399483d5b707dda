//! The shared store of several instances on one PostgreSQL database (`--store postgres`):
//! - [`schema`]: tables and their migration, safe when instances start together;
//! - [`store::PgStore`]: claims with `FOR UPDATE SKIP LOCKED` and leases, fenced ends, rescue of
//!   expired leases, counts of the whole database;
//! - `conn`: shared pipelined connections with prepared statements, and connections lent to one
//!   transaction at a time;
//! - `batch`: group commit: requests of one kind that wait are run as one statement;
//! - `notice`: what instances tell each other over `NOTIFY`.

mod batch;
mod conn;
mod notice;
pub mod schema;
pub mod store;

pub use store::{PgOptions, PgStore};
