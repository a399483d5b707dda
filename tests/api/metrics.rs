//! `GET /metrics`: well-formed Prometheus text whose counters follow the work.

use std::time::Duration;

use awc::http::StatusCode;
use serde_json::json;

use crate::helpers::{id_of, report, spawn_app};

#[actix_rt::test]
async fn metrics_parse_and_follow_the_work() {
    let app = spawn_app().await;
    let before = app.metrics().await;
    assert_eq!(before.value("offload_jobs_submitted_total", &[("kind", "pdf")]), 0.0);
    assert_eq!(before.value("offload_pool_workers", &[("pool", "pdf")]), 2.0);
    assert_eq!(before.value("offload_websocket_connections", &[]), 0.0);

    let job = app.submit_pdf(&report(20)).await;
    app.wait_finished(id_of(&job)).await;
    let failing = app.submit_pdf(&json!({"title": "x", "test_hook": "panic"})).await;
    app.wait_finished(id_of(&failing)).await;
    app.post_json("/generate-pdf", &json!({"title": ""})).await.expect_error(422, "invalid_field", "empty title");
    let events = json!([{"name": "a"}, {"name": "b"}, {"name": "c"}]);
    assert_eq!(app.post_json("/analytics/events", &events).await.status, StatusCode::ACCEPTED);
    let (_, ws) = app.client.ws(app.url("/ws")).connect().await.expect("WebSocket connect");

    let m = app
        .wait_metrics(Duration::from_secs(5), |m| {
            m.value("offload_websocket_connections", &[]) == 1.0
                && m.value("offload_jobs_finished_total", &[("kind", "pdf"), ("status", "failed")]) == 1.0
        })
        .await;
    assert_eq!(m.value("offload_jobs_submitted_total", &[("kind", "pdf")]), 2.0);
    assert_eq!(m.value("offload_jobs_finished_total", &[("kind", "pdf"), ("status", "succeeded")]), 1.0);
    assert_eq!(m.value("offload_job_duration_seconds_count", &[("kind", "pdf"), ("status", "succeeded")]), 1.0);
    assert!(m.value("offload_job_duration_seconds_sum", &[("kind", "pdf"), ("status", "succeeded")]) > 0.0);
    assert_eq!(m.value("offload_jobs", &[("status", "succeeded")]), 1.0);
    assert_eq!(m.value("offload_pool_queued_jobs", &[("pool", "pdf")]), 0.0);
    assert_eq!(m.value("offload_pool_in_flight_jobs", &[("pool", "pdf")]), 0.0);
    // 3 client events, 2 job_submitted, 1 job_succeeded, 1 job_failed.
    assert_eq!(m.value("offload_analytics_events_ingested_total", &[]), 7.0);
    let route = |method: &str, route: &str, status: &str| {
        m.value(
            "offload_http_request_duration_seconds_count",
            &[("method", method), ("route", route), ("status", status)],
        )
    };
    assert_eq!(route("POST", "/generate-pdf", "202"), 2.0);
    assert_eq!(route("POST", "/generate-pdf", "422"), 1.0);
    assert!(route("GET", "/jobs/{id}", "200") >= 2.0, "routes are labelled by pattern, not path: {}", m.dump());
    assert_eq!(route("POST", "/analytics/events", "202"), 1.0);
    assert!(m.has("offload_webhook_pending"));
    assert!(m.has("offload_analytics_events_forwarded_total"));

    drop(ws);
    app.wait_metrics(Duration::from_secs(5), |m| m.value("offload_websocket_connections", &[]) == 0.0).await;
}

#[actix_rt::test]
async fn made_up_http_methods_add_no_series() {
    // Any token is a valid method: 200 different ones must not make 200 series.
    let app = spawn_app().await;
    let count = "offload_http_request_duration_seconds_count";
    app.get("/healthz").await;
    let before = app.metrics().await.series(count);
    for n in 0..200 {
        let reply = app.request(&format!("BREW{n}"), "/jobs", None, Vec::new()).await;
        assert_eq!(reply.status.as_u16(), 405, "BREW{n}");
    }
    let m = app.metrics().await;
    let other = m.value(count, &[("method", "other"), ("route", "/jobs"), ("status", "405")]);
    assert_eq!(other, 200.0, "{}", m.dump());
    assert!(m.series(count) <= before + 2, "{} series before, {} after", before, m.series(count));
}
