//! The shared store of several instances on one PostgreSQL database (`--store postgres`):
//! [`schema`] (tables and their migration, safe when instances start together) and
//! [`store::PgStore`] (claims with `FOR UPDATE SKIP LOCKED` and leases, fenced ends, rescue of
//! expired leases, counts of the whole database).

mod batch;
mod conn;
mod notice;
pub mod schema;
pub mod store;

pub use store::{PgOptions, PgStore};
