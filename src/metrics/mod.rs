//! Prometheus metrics (`GET /metrics`), with the `prometheus` crate.
//!
//! One [`Metrics`] per application, with its own registry (so several applications in one process,
//! as in the tests, never mix their counts). Counters and histograms are updated where things
//! happen (the Dispatcher, the async I/O actors, the WebSocket task, the HTTP middleware); gauges
//! of state the Dispatcher owns (queue sizes, jobs held) are read from it when scraped.

pub mod middleware;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Every metric the service exports. Shared as `Arc<Metrics>`; every field is thread-safe.
pub struct Metrics {
    registry: Registry,
    /// Jobs accepted, by kind.
    pub jobs_submitted: IntCounterVec,
    /// Jobs that ended, by kind and final status.
    pub jobs_finished: IntCounterVec,
    /// Submissions refused with 503, by reason (`overloaded`, `shutting_down`).
    pub jobs_rejected: IntCounterVec,
    /// Run time of jobs that ran, by kind and final status (from start to end).
    pub job_duration: HistogramVec,
    /// Jobs the store holds now, by status (set when scraped).
    pub jobs_held: IntGaugeVec,
    /// Jobs waiting in the queue of each pool (set when scraped).
    pub pool_queued: IntGaugeVec,
    /// Jobs handed to each pool and not finished (set when scraped).
    pub pool_in_flight: IntGaugeVec,
    /// Threads of each pool (set when scraped).
    pub pool_workers: IntGaugeVec,
    /// Open WebSocket connections.
    pub ws_connections: IntGauge,
    /// Analytics events taken in (from clients and from the service's own job events).
    pub analytics_ingested: IntCounter,
    /// Analytics events refused because the hand-off queue was full.
    pub analytics_rejected: IntCounter,
    /// Analytics events the sink accepted.
    pub analytics_forwarded: IntCounter,
    /// Analytics events given up on: buffer full, or a batch out of attempts.
    pub analytics_dropped: IntCounter,
    /// Failed sink requests (each attempt counts).
    pub analytics_sink_errors: IntCounter,
    /// Webhook deliveries that ended, by outcome (`delivered`, `failed`, `refused`, `dropped`).
    pub webhook_deliveries: IntCounterVec,
    /// Webhook attempts that failed, by reason (`status`, `network`, `timeout`).
    pub webhook_attempt_failures: IntCounterVec,
    /// Webhook deliveries waiting or in progress.
    pub webhook_pending: IntGauge,
    /// Async I/O actors restarted after a panic, by actor.
    pub async_restarts: IntCounterVec,
    /// HTTP request durations, by method, route pattern and status.
    pub http_requests: HistogramVec,
    /// Time from an analytics hand-off to the event being counted.
    pub analytics_lag: Histogram,
    /// Embedded store: time of one group commit (the transaction and its fsync).
    pub store_commit: Histogram,
    /// Embedded store: writes in one group commit.
    pub store_batch: Histogram,
    /// Embedded store: group commits that failed (nothing of them was kept).
    pub store_write_errors: IntCounter,
    /// 1 while the store writes, 0 while writes fail (set when scraped).
    pub store_healthy: IntGauge,
    /// Bytes of results the store keeps (set when scraped).
    pub store_result_bytes: IntGauge,
}

/// Writes per group commit: 1 to 1024.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// Job run times: 1 ms to 5 min.
const JOB_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
/// HTTP request times: 100 µs to 10 s.
const HTTP_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("offload".into()), None).expect("a valid prefix");
        // Every metric is built, then registered: one place for both.
        let add = |metric: Box<dyn Collector>| registry.register(metric).expect("unique metric name");
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            add(Box::new(metric.clone()));
            metric
        };
        let counter = |name: &str, help: &str| counter_vec(name, help, &[]).with_label_values::<&str>(&[]);
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            add(Box::new(metric.clone()));
            metric
        };
        let gauge = |name: &str, help: &str| gauge_vec(name, help, &[]).with_label_values::<&str>(&[]);
        let histogram_vec = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            let metric = HistogramVec::new(opts, labels).expect("valid metric");
            add(Box::new(metric.clone()));
            metric
        };
        let analytics_lag = histogram_vec(
            "analytics_lag_seconds",
            "Time from an analytics hand-off to the event being counted",
            &[],
            HTTP_BUCKETS,
        )
        .with_label_values::<&str>(&[]);
        Metrics {
            jobs_submitted: counter_vec("jobs_submitted_total", "Jobs accepted", &["kind"]),
            jobs_finished: counter_vec("jobs_finished_total", "Jobs that ended, by final status", &["kind", "status"]),
            jobs_rejected: counter_vec("jobs_rejected_total", "Submissions refused with 503", &["reason"]),
            job_duration: histogram_vec(
                "job_duration_seconds",
                "Job run time from start to end",
                &["kind", "status"],
                JOB_BUCKETS,
            ),
            jobs_held: gauge_vec("jobs", "Jobs held now, by status", &["status"]),
            pool_queued: gauge_vec("pool_queued_jobs", "Jobs waiting for a worker", &["pool"]),
            pool_in_flight: gauge_vec("pool_in_flight_jobs", "Jobs handed to a worker and not finished", &["pool"]),
            pool_workers: gauge_vec("pool_workers", "Worker threads in the pool", &["pool"]),
            ws_connections: gauge("websocket_connections", "Open WebSocket connections"),
            analytics_ingested: counter("analytics_events_ingested_total", "Analytics events taken in"),
            analytics_rejected: counter(
                "analytics_events_rejected_total",
                "Analytics events refused with 503 because the hand-off queue was full",
            ),
            analytics_forwarded: counter("analytics_events_forwarded_total", "Analytics events the sink accepted"),
            analytics_dropped: counter(
                "analytics_events_dropped_total",
                "Analytics events not forwarded: buffer full or out of attempts",
            ),
            analytics_sink_errors: counter("analytics_sink_errors_total", "Failed analytics sink requests"),
            webhook_deliveries: counter_vec(
                "webhook_deliveries_total",
                "Webhook deliveries that ended, by outcome",
                &["outcome"],
            ),
            webhook_attempt_failures: counter_vec(
                "webhook_attempt_failures_total",
                "Webhook attempts that failed, by reason",
                &["reason"],
            ),
            webhook_pending: gauge("webhook_pending", "Webhook deliveries waiting or in progress"),
            async_restarts: counter_vec(
                "async_actor_restarts_total",
                "Async I/O actors restarted after a panic",
                &["actor"],
            ),
            http_requests: histogram_vec(
                "http_request_duration_seconds",
                "HTTP request durations",
                &["method", "route", "status"],
                HTTP_BUCKETS,
            ),
            analytics_lag,
            store_commit: histogram_vec(
                "store_commit_seconds",
                "Embedded store: time of one group commit, fsync included",
                &[],
                HTTP_BUCKETS,
            )
            .with_label_values::<&str>(&[]),
            store_batch: histogram_vec(
                "store_commit_writes",
                "Embedded store: writes in one group commit",
                &[],
                BATCH_BUCKETS,
            )
            .with_label_values::<&str>(&[]),
            store_write_errors: counter(
                "store_write_errors_total",
                "Embedded store: group commits that failed (nothing of them was kept)",
            ),
            store_healthy: gauge("store_healthy", "1 while the store takes writes, 0 while writes fail"),
            store_result_bytes: gauge("store_result_bytes", "Bytes of stored results"),
            registry,
        }
    }

    /// Every metric in the Prometheus text format (version 0.0.4).
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!("metrics could not be encoded: {e}");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_the_prefix() {
        let m = Metrics::new();
        m.jobs_submitted.with_label_values(&["pdf"]).inc();
        m.http_requests.with_label_values(&["GET", "/healthz", "200"]).observe(0.001);
        m.ws_connections.set(3);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains("offload_jobs_submitted_total{kind=\"pdf\"} 1"), "{text}");
        assert!(text.contains("offload_websocket_connections 3"), "{text}");
        assert!(text.contains("# TYPE offload_http_request_duration_seconds histogram"), "{text}");
        assert!(text.contains("offload_analytics_events_dropped_total 0"), "{text}");
    }

    #[test]
    fn two_instances_do_not_share_counts() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.analytics_ingested.inc_by(5);
        assert_eq!(b.analytics_ingested.get(), 0);
    }
}
