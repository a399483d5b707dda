//! The panic boundary of the async I/O actors.
//!
//! A panic inside an actor's handler would unwind through its event loop task and take the actor
//! (and its supervisor) down for good. Each handler runs inside [`guarded`]: a panic is caught,
//! logged and counted, and the actor is stopped so its `Supervisor` restarts it on the same
//! address; callers never see it go.

use std::panic::{catch_unwind, AssertUnwindSafe};

use actix::{Actor, ActorContext, Context};

use crate::metrics::Metrics;

/// Runs `f` on the actor; on panic stops the actor (the supervisor restarts it) and returns `None`.
pub fn guarded<A, R>(
    actor: &mut A,
    ctx: &mut Context<A>,
    name: &'static str,
    metrics: &Metrics,
    f: impl FnOnce(&mut A, &mut Context<A>) -> R,
) -> Option<R>
where
    A: Actor<Context = Context<A>>,
{
    match catch_unwind(AssertUnwindSafe(|| f(actor, ctx))) {
        Ok(r) => Some(r),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(actor = name, "async I/O actor panicked; restarting it: {message}");
            metrics.async_restarts.with_label_values(&[name]).inc();
            ctx.stop();
            None
        }
    }
}
