//! The shared store of several instances on one PostgreSQL database (`--store postgres`, being
//! built: issue 12). What exists so far: [`schema`], the tables and their migration, safe when
//! several instances start together. The store itself (claims with `FOR UPDATE SKIP LOCKED` and
//! leases, LISTEN/NOTIFY wake-ups, cross-instance events) is not written yet, so `--store
//! postgres` is not offered.

pub mod schema;
