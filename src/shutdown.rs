//! Graceful shutdown on SIGTERM or SIGINT:
//! 1. the Dispatcher starts draining: `/readyz` answers 503, new submissions get 503, while status
//!    and result requests keep working;
//! 2. with the durable store, no job starts any more and running jobs get the grace period, then
//!    go back to the queue for the next start; with the memory store, accepted jobs run until
//!    they are all done or the grace period ends (then the rest fail with code `shutdown`);
//! 3. once every write is committed the store tidies its files (the WAL is emptied), the HTTP
//!    server stops, and the process exits 0.

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use actix_web::dev::ServerHandle;

use crate::dispatch::{Dispatcher, Drain};
use crate::store::JobStore;

pub async fn on_signal(dispatcher: Addr<Dispatcher>, store: Arc<dyn JobStore>, server: ServerHandle, grace: Duration) {
    let signal = match wait_for_signal().await {
        Ok(name) => name,
        Err(err) => {
            tracing::error!("cannot listen for shutdown signals: {err}");
            return;
        }
    };
    tracing::info!(signal, grace_secs = grace.as_secs_f64(), "shutdown requested; draining");
    if let Err(err) = dispatcher.send(Drain { grace }).await {
        tracing::error!("dispatcher gone while draining: {err}");
    }
    if let Err(e) = store.close().await {
        tracing::warn!("the store could not tidy its files: {e}");
    }
    tracing::info!("all jobs ended; stopping the HTTP server");
    server.stop(true).await;
}

async fn wait_for_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
