//! Fire-and-forget analytics: the [`Analytics`] actor, on the async I/O arbiter, counts events and
//! forwards them to an optional sink.
//!
//! HTTP handlers (and the Dispatcher, for job events) hand events over through
//! [`AnalyticsHandle::submit`]: a push into a bounded queue under a short lock, and a wake-up
//! message when the queue was empty. It never waits for the actor; when the queue is full the
//! request is refused (503) rather than held.

pub mod aggregate;
pub mod event;
pub mod sink;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix::prelude::*;
use serde::Serialize;

pub use aggregate::{AggregateLimits, Counts};
pub use event::{parse_events, Event, EventError};
pub use sink::SinkSettings;

use self::aggregate::Aggregate;
use self::sink::{BatchOutcome, SinkBuffer};
use super::guard::guarded;
use crate::metrics::Metrics;

/// Events handed over and not yet counted.
struct IngestQueue {
    /// The events, when the oldest of them arrived, and the bytes they hold.
    inner: Mutex<(Vec<Event>, Option<Instant>, usize)>,
    limits: QueueLimits,
}

/// How much the hand-off queue holds at most: events, and bytes (a few huge events must not
/// hold what many small ones may).
#[derive(Clone, Copy, Debug)]
pub struct QueueLimits {
    pub events: usize,
    pub bytes: usize,
}

/// The hand-off queue is full: the actor is behind.
#[derive(Debug, thiserror::Error)]
#[error("analytics is behind ({capacity} events waiting); retry shortly")]
pub struct IngestError {
    capacity: usize,
}

impl IngestError {
    pub fn code(&self) -> &'static str {
        "overloaded"
    }
}

/// How HTTP handlers and the Dispatcher reach the analytics actor. Cheap to clone.
#[derive(Clone)]
pub struct AnalyticsHandle {
    queue: Arc<IngestQueue>,
    addr: Addr<Analytics>,
    metrics: Arc<Metrics>,
}

impl AnalyticsHandle {
    /// Hands `events` over, all or none; returns how many were taken.
    pub fn submit(&self, events: Vec<Event>) -> Result<usize, IngestError> {
        let n = events.len();
        let was_empty = {
            let mut guard = self.queue.inner.lock().unwrap_or_else(|p| p.into_inner());
            let (queued, since, held) = &mut *guard;
            let bytes: usize = events.iter().map(|e| e.bytes).sum();
            if queued.len() + n > self.queue.limits.events || *held + bytes > self.queue.limits.bytes {
                drop(guard);
                self.metrics.analytics_rejected.inc_by(n as u64);
                return Err(IngestError { capacity: self.queue.limits.events });
            }
            *held += bytes;
            let was_empty = queued.is_empty();
            if was_empty {
                *since = Some(Instant::now());
            }
            queued.extend(events);
            was_empty
        };
        self.metrics.analytics_ingested.inc_by(n as u64);
        if was_empty {
            self.addr.do_send(Wake);
        }
        Ok(n)
    }

    /// Records one of the service's own events; if the queue is full it is counted as rejected.
    pub fn record(&self, event: Event) {
        let _ = self.submit(vec![event]);
    }

    pub fn addr(&self) -> &Addr<Analytics> {
        &self.addr
    }
}

/// `GET /analytics/summary`.
#[derive(Debug, Serialize)]
pub struct Summary {
    #[serde(flatten)]
    pub counts: Counts,
    /// Events not forwarded: buffer full, or their batch ran out of attempts.
    pub dropped: u64,
    /// Events the sink accepted.
    pub forwarded: u64,
    /// Failed sink requests.
    pub sink_errors: u64,
    /// Events waiting to be forwarded (0 without a sink).
    pub buffered: u64,
}

pub struct Analytics {
    queue: Arc<IngestQueue>,
    aggregate: Aggregate,
    sink: Option<SinkBuffer>,
    /// The sink's client; created on the arbiter thread (awc clients are not `Send`).
    client: Option<awc::Client>,
    metrics: Arc<Metrics>,
}

/// Starts the actor under a supervisor on `arbiter`; returns the handle to reach it.
pub fn start(
    arbiter: &ArbiterHandle,
    limits: AggregateLimits,
    queue_limits: QueueLimits,
    sink: Option<SinkSettings>,
    metrics: Arc<Metrics>,
) -> AnalyticsHandle {
    let queue = Arc::new(IngestQueue { inner: Mutex::new((Vec::new(), None, 0)), limits: queue_limits });
    let actor_queue = queue.clone();
    let actor_metrics = metrics.clone();
    let addr = Supervisor::start_in_arbiter(arbiter, move |_| Analytics {
        queue: actor_queue,
        aggregate: Aggregate::new(limits),
        client: sink.as_ref().map(|s| super::client::http_client(s.timeout, false)),
        sink: sink.map(|s| SinkBuffer::new(s, actor_metrics.clone())),
        metrics: actor_metrics,
    });
    AnalyticsHandle { queue, addr, metrics }
}

impl Analytics {
    /// Counts everything handed over so far and feeds the sink buffer.
    fn drain(&mut self) {
        let (events, since) = {
            let mut guard = self.queue.inner.lock().unwrap_or_else(|p| p.into_inner());
            guard.2 = 0;
            (std::mem::take(&mut guard.0), guard.1.take())
        };
        if let Some(since) = since {
            self.metrics.analytics_lag.observe(since.elapsed().as_secs_f64());
        }
        for event in &events {
            #[cfg(feature = "test-hooks")]
            if event.name == "offload_test_panic" {
                panic!("test hook: analytics panic");
            }
            self.aggregate.add(event);
            if let Some(sink) = &mut self.sink {
                match serde_json::to_vec(event) {
                    Ok(json) => sink.push(json.into()),
                    Err(e) => tracing::warn!("analytics event not serializable: {e}"),
                }
            }
        }
    }

    /// Sends a batch if one is due (`force`: send a partial batch too).
    fn flush(&mut self, force: bool, ctx: &mut Context<Self>) {
        let (Some(sink), Some(client)) = (&mut self.sink, &self.client) else { return };
        if !(force || sink.batch_ready()) {
            return;
        }
        let Some(batch) = sink.take_batch() else { return };
        let client = client.clone();
        let settings = sink.settings().clone();
        let metrics = self.metrics.clone();
        let addr = ctx.address();
        // A separate task: a slow sink never holds up the actor; a panic in it ends only the task.
        actix_rt::spawn(async move {
            use futures::FutureExt;
            let send = sink::deliver(&client, &settings, &batch, |why| {
                metrics.analytics_sink_errors.inc();
                tracing::warn!(sink = %settings.url.host_str().unwrap_or_default(), "analytics batch failed: {why}");
            });
            let outcome = std::panic::AssertUnwindSafe(send).catch_unwind().await.unwrap_or(BatchOutcome::Dropped);
            addr.do_send(BatchDone { events: batch.events, outcome });
        });
    }

    fn summary(&self) -> Summary {
        Summary {
            counts: self.aggregate.counts(),
            dropped: self.metrics.analytics_dropped.get(),
            forwarded: self.metrics.analytics_forwarded.get(),
            sink_errors: self.metrics.analytics_sink_errors.get(),
            buffered: self.sink.as_ref().map_or(0, |s| s.len() as u64),
        }
    }
}

impl Actor for Analytics {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(sink) = &self.sink {
            ctx.run_interval(sink.settings().flush_interval, |this, ctx| {
                let metrics = this.metrics.clone();
                guarded(this, ctx, "analytics", &metrics, |this, ctx| {
                    this.drain();
                    this.flush(true, ctx);
                });
            });
        }
    }
}

impl Supervised for Analytics {
    fn restarting(&mut self, _: &mut Context<Self>) {
        tracing::warn!("analytics actor restarting");
    }
}

/// Events are waiting in the queue.
#[derive(Message)]
#[rtype(result = "()")]
struct Wake;

impl Handler<Wake> for Analytics {
    type Result = ();
    fn handle(&mut self, _: Wake, ctx: &mut Context<Self>) {
        let metrics = self.metrics.clone();
        guarded(self, ctx, "analytics", &metrics, |this, ctx| {
            this.drain();
            this.flush(false, ctx);
        });
    }
}

/// The counts so far, including every event handed over before this message.
#[derive(Message)]
#[rtype(result = "Option<Summary>")]
pub struct GetSummary;

impl Handler<GetSummary> for Analytics {
    type Result = Option<Summary>;
    fn handle(&mut self, _: GetSummary, ctx: &mut Context<Self>) -> Option<Summary> {
        let metrics = self.metrics.clone();
        guarded(self, ctx, "analytics", &metrics, |this, _| {
            this.drain();
            this.summary()
        })
    }
}

/// A batch task ended.
#[derive(Message)]
#[rtype(result = "()")]
struct BatchDone {
    events: usize,
    outcome: BatchOutcome,
}

impl Handler<BatchDone> for Analytics {
    type Result = ();
    fn handle(&mut self, msg: BatchDone, ctx: &mut Context<Self>) {
        match msg.outcome {
            BatchOutcome::Forwarded => self.metrics.analytics_forwarded.inc_by(msg.events as u64),
            BatchOutcome::Dropped => self.metrics.analytics_dropped.inc_by(msg.events as u64),
        }
        if let Some(sink) = &mut self.sink {
            sink.in_flight = false;
        }
        // More than a batch may have piled up while this one was out.
        self.flush(false, ctx);
    }
}
