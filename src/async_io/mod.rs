//! The async I/O arbiter: one extra thread with its own event loop for network work that must
//! never slow the request path or the CPU pools — analytics (counting, forwarding to a sink) and
//! webhook deliveries. Both actors run under a `Supervisor` with a panic boundary
//! ([`guard`]), and do their network requests in separate tasks, so neither a slow peer nor a
//! bug stops them.
//!
//! - [`analytics`]: fire-and-forget events, counted and optionally forwarded in batches.
//! - [`webhooks`]: signed POSTs of final job objects, with retries.
//! - [`client`]: the awc client, and the resolver that keeps webhooks off private addresses.
//! - [`backoff`]: exponential backoff with jitter.

pub mod analytics;
pub mod backoff;
pub mod client;
pub mod guard;
pub mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use self::analytics::{AggregateLimits, AnalyticsHandle, SinkSettings};
use self::backoff::Backoff;
use self::webhooks::{Signing, WebhookSettings, Webhooks};
use crate::configuration::Settings;
use crate::metrics::Metrics;
use crate::store::JobStore;

/// Handles to the async I/O actors.
#[derive(Clone)]
pub struct AsyncIo {
    pub analytics: AnalyticsHandle,
    pub webhooks: Addr<Webhooks>,
}

/// Starts the arbiter and its actors. Needs a running actix `System`.
pub fn start(settings: &Settings, signing: Signing, metrics: Arc<Metrics>, store: Arc<dyn JobStore>) -> AsyncIo {
    let arbiter = Arbiter::new();
    arbiter.spawn_fn(|| crate::process::name_thread(c"async-io"));
    let limits = AggregateLimits {
        max_names: settings.analytics.analytics_max_names,
        max_minutes: settings.analytics.analytics_minutes,
    };
    let sink = settings.analytics_sink.analytics_sink.clone().map(|url| SinkSettings {
        url,
        batch_size: settings.analytics_sink.analytics_batch_size.max(1),
        flush_interval: Duration::from(settings.analytics_sink.analytics_flush_interval).max(Duration::from_millis(10)),
        buffer: settings.analytics_sink.analytics_buffer.max(1),
        buffer_bytes: settings.analytics_sink.analytics_buffer_bytes.bytes().max(1),
        attempts: settings.analytics_sink.analytics_sink_attempts.max(1),
        timeout: settings.analytics_sink.analytics_sink_timeout.into(),
        backoff: Backoff { first: settings.analytics_sink.analytics_sink_backoff.into(), max: Duration::from_secs(30) },
    });
    let queue = analytics::QueueLimits {
        events: settings.analytics.analytics_queue.max(1),
        bytes: settings.analytics.analytics_queue_bytes.bytes().max(1),
    };
    let analytics = analytics::start(&arbiter.handle(), limits, queue, sink, metrics.clone());
    let webhook_settings = WebhookSettings {
        signing,
        max_attempts: settings.webhooks.webhook_max_attempts.max(1),
        backoff: Backoff { first: settings.webhooks.webhook_backoff.into(), max: Duration::from_secs(300) },
        timeout: settings.webhooks.webhook_timeout.into(),
        concurrency: settings.webhooks.webhook_concurrency.max(1),
        capacity: settings.webhooks.webhook_queue.max(1),
        public_only: !settings.webhooks.allow_private_webhooks,
    };
    let webhooks = webhooks::start(&arbiter.handle(), webhook_settings, metrics, store);
    AsyncIo { analytics, webhooks }
}
