//! End-to-end tests: the real server over real HTTP on 127.0.0.1:0.

mod analytics;
mod architecture;
mod conformance;
mod durability;
mod errors;
mod helpers;
mod images;
mod jobs;
mod keys;
mod metrics;
mod openapi;
mod own_kind;
mod page;
mod pdf;
mod pg;
mod postgres;
mod process;
mod recovery;
mod reliability;
mod shutdown;
mod storage;
mod tmpfs;
mod webhooks;
mod ws;
